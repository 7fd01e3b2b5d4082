//! The seam between a POP3 session and a mail store.
//!
//! A `Backend` opens an authenticated `Mailbox` for a set of credentials; a
//! `Mailbox` lists its messages, streams one message's stored octets and
//! removes a set of messages. Backends know nothing of POP3: no message
//! numbers, no dot-stuffing, no reply texts. They never delete anything except
//! in `Mailbox::remove`, which the driver calls only in the UPDATE state.
//!
//! Sizes: a backend reports either an exact canonical (CRLF) size or a size it
//! merely claims; `sizes::ExactSizes` turns the latter into exact sizes, the
//! same way for every backend.

pub mod demo;
pub mod gmail;
pub mod graph;
pub mod http;
pub mod imap;
pub mod jmap;
pub mod pool;
pub mod select;
pub mod send;
pub mod sizes;
pub mod trust;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

use crate::mail::{BackendError, Credentials, StoreId};

/// A message as listed when the maildrop is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedMessage {
    pub id: StoreId,
    /// Stable across sessions, 1–70 octets of 0x21..=0x7E (RFC 1939 UIDL).
    pub uidl: String,
    pub size: ReportedSize,
}

/// A message's size as the store reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportedSize {
    /// The octets of the message's canonical CRLF form, guaranteed.
    Exact(u64),
    /// What the store claims; may differ from the canonical size.
    Claimed(u64),
}

impl ReportedSize {
    pub fn value(self) -> u64 {
        match self {
            ReportedSize::Exact(n) | ReportedSize::Claimed(n) => n,
        }
    }
}

/// The raw stored octets of one message, in chunks of bounded size.
pub type MessageStream<'a> = BoxStream<'a, Result<Bytes, BackendError>>;

#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// A short name for logs and metrics: "imap", "jmap", "demo", …
    fn kind(&self) -> &'static str;

    /// True if clients may log in with an OAuth bearer token (SASL XOAUTH2 /
    /// OAUTHBEARER) that this backend passes on to the store.
    fn accepts_bearer_tokens(&self) -> bool {
        false
    }

    /// A cheap reachability check for readiness (no login): `Ok` if the store
    /// answers.
    async fn probe(&self) -> Result<(), BackendError> {
        Ok(())
    }

    /// Authenticates and opens the configured mailbox.
    async fn open(&self, credentials: &Credentials) -> Result<Box<dyn Mailbox>, BackendError>;
}

#[async_trait]
pub trait Mailbox: Send {
    /// Makes a session kept warm from an earlier POP3 session current again
    /// (IMAP: re-SELECT). An error means the session is unusable and is
    /// discarded; a fresh one is opened instead.
    async fn reset(&mut self) -> Result<(), BackendError> {
        Ok(())
    }

    /// Every message in the mailbox now, oldest first.
    async fn list(&mut self) -> Result<Vec<ListedMessage>, BackendError>;

    /// The stored octets of a message, as a stream of chunks. The stream may be
    /// dropped early (TOP); the mailbox must stay usable or report
    /// `BackendError::Unavailable` on its next call.
    async fn fetch(&mut self, id: &StoreId) -> Result<MessageStream<'_>, BackendError>;

    /// The canonical sizes of the given messages, in order; `None` for a
    /// message that is gone (expunged since the listing), which the session
    /// then leaves out. The default streams each message; a backend may do
    /// it in fewer round trips.
    async fn canonical_sizes(&mut self, ids: &[StoreId]) -> Result<Vec<Option<u64>>, BackendError> {
        use futures::StreamExt;
        let mut sizes = Vec::with_capacity(ids.len());
        for id in ids {
            let mut counter = crate::canonical::CanonicalSize::new();
            let mut stream = match self.fetch(id).await {
                Err(BackendError::MessageGone) => {
                    sizes.push(None);
                    continue;
                }
                other => other?,
            };
            while let Some(chunk) = stream.next().await {
                counter.feed(&chunk?);
            }
            sizes.push(Some(counter.finish()));
        }
        Ok(sizes)
    }

    /// The client retrieved this message whole (POP3 RETR, not TOP): a store
    /// configured to mark retrieved mail read does it now. `fetch` itself
    /// never changes a message.
    async fn retrieved(&mut self, _id: &StoreId) -> Result<(), BackendError> {
        Ok(())
    }

    /// Removes exactly these messages (the POP3 UPDATE state). Either every
    /// one is gone when this returns `Ok`, or an error says what was not done.
    async fn remove(&mut self, ids: &[StoreId]) -> Result<(), BackendError>;

    /// Ends the backend session politely. Never removes anything.
    async fn close(self: Box<Self>);
}

pub type SharedBackend = Arc<dyn Backend>;
