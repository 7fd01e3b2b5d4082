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

/// What `Mailbox::remove` does with a message: a device policy's
/// `on_delete` in the backends' terms (one vocabulary for every store).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Disposal {
    /// The backend's own delete settings (IMAP `trash_mailbox`, JMAP, Gmail
    /// and Graph `delete_policy`).
    #[default]
    AsConfigured,
    /// Gone from the store (IMAP UID EXPUNGE, JMAP destroy, …).
    Expunge,
    /// Moved to the store's trash.
    Trash,
    /// Moved to the store's archive, or to this folder when named.
    Archive { folder: Option<String> },
    /// Left in place, marked with this keyword.
    Flag { keyword: String },
}

impl Disposal {
    /// A word for logs and errors.
    pub fn word(&self) -> &'static str {
        match self {
            Disposal::AsConfigured => "as configured",
            Disposal::Expunge => "expunge",
            Disposal::Trash => "trash",
            Disposal::Archive { .. } => "archive",
            Disposal::Flag { .. } => "flag",
        }
    }
}

#[async_trait]
pub trait Mailbox: Send {
    /// Makes a session kept warm from an earlier POP3 session current again
    /// (IMAP: re-SELECT). An error means the session is unusable and is
    /// discarded; a fresh one is opened instead.
    async fn reset(&mut self) -> Result<(), BackendError> {
        Ok(())
    }

    /// Names the view under which this session's `StoreId`s are valid: an
    /// id listed on one session names the same message on any session of
    /// the same account showing the same validity (IMAP: UIDVALIDITY, as
    /// of the last SELECT). `None`: ids never change meaning.
    fn validity(&self) -> Option<u64> {
        None
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

    /// The header section of each message (its stored octets up to and
    /// including the first empty line, cut at `limit` octets), in order;
    /// `None` for a message that is gone. Never changes a message (no
    /// `\Seen`). The default reads the start of each message through
    /// `fetch` and drops the stream at the header's end; a backend may ask
    /// its store for the header alone.
    async fn headers(&mut self, ids: &[StoreId], limit: usize) -> Result<Vec<Option<Bytes>>, BackendError> {
        use futures::StreamExt;
        let mut headers = Vec::with_capacity(ids.len());
        for id in ids {
            let mut stream = match self.fetch(id).await {
                Err(BackendError::MessageGone) => {
                    headers.push(None);
                    continue;
                }
                other => other?,
            };
            let mut header = Vec::new();
            while header.len() < limit {
                let Some(chunk) = stream.next().await else { break };
                let chunk = chunk?;
                // Look for the end again from just before the new chunk.
                let from = header.len().saturating_sub(3);
                header.extend_from_slice(&chunk);
                if let Some(end) = header_end(&header, from) {
                    header.truncate(end);
                    break;
                }
            }
            header.truncate(limit);
            headers.push(Some(Bytes::from(header)));
        }
        Ok(headers)
    }

    /// The client retrieved this message whole (POP3 RETR, not TOP): a store
    /// configured to mark retrieved mail read does it now. `fetch` itself
    /// never changes a message.
    async fn retrieved(&mut self, _id: &StoreId) -> Result<(), BackendError> {
        Ok(())
    }

    /// Makes `remove` do `disposal` for the rest of this POP3 session (set
    /// at every login: a warm session never keeps an earlier device's).
    /// `Err` when this backend cannot: check-config refuses such a policy
    /// beforehand, so this is a last line of defence.
    fn dispose_as(&mut self, disposal: &Disposal) -> Result<(), BackendError> {
        match disposal {
            Disposal::AsConfigured => Ok(()),
            other => Err(BackendError::Permanent(format!("on_delete = \"{}\" is not supported here", other.word()))),
        }
    }

    /// Which of `ids` carry `keyword` (left by `Disposal::Flag`), in order;
    /// a message that is gone may be reported either way (it is left out
    /// of the maildrop by the size measurement anyway).
    async fn carrying(&mut self, ids: &[StoreId], keyword: &str) -> Result<Vec<bool>, BackendError> {
        let _ = (ids, keyword);
        Err(BackendError::Permanent("keywords are not supported here".into()))
    }

    /// Which of `ids` are marked read (IMAP `\Seen`, JMAP `$seen`, Gmail
    /// without `UNREAD`, Graph `isRead`), in order, for a device policy's
    /// `only_unseen`; a message that is gone may be reported either way
    /// (the size measurement leaves it out). Never changes a message.
    async fn seen(&mut self, ids: &[StoreId]) -> Result<Vec<bool>, BackendError> {
        let _ = ids;
        Err(BackendError::Permanent("the read state is not supported here".into()))
    }

    /// Removes exactly these messages (the POP3 UPDATE state). Either every
    /// one is gone when this returns `Ok`, or an error says what was not done.
    async fn remove(&mut self, ids: &[StoreId]) -> Result<(), BackendError>;

    /// Ends the backend session politely. Never removes anything.
    async fn close(self: Box<Self>);
}

pub type SharedBackend = Arc<dyn Backend>;

/// Where the header section of `message` ends (after its empty line, CRLF or
/// bare LF), searching from `from`.
fn header_end(message: &[u8], from: usize) -> Option<usize> {
    if message.starts_with(b"\r\n") {
        return Some(2);
    }
    if message.starts_with(b"\n") {
        return Some(1);
    }
    let mut i = from;
    while i < message.len() {
        if message[i] == b'\n' {
            match message.get(i + 1..) {
                Some([b'\n', ..]) => return Some(i + 2),
                Some([b'\r', b'\n', ..]) => return Some(i + 3),
                _ => {}
            }
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::header_end;

    #[test]
    fn the_header_ends_at_the_first_empty_line() {
        let table: &[(&[u8], Option<usize>)] = &[
            (b"From: a\r\n\r\nbody\r\n\r\n", Some(11)),
            (b"From: a\n\nbody", Some(9)),
            (b"\r\nbody", Some(2)),
            (b"\nbody", Some(1)),
            (b"From: a\r\nSubject: b\r\n", None),
            (b"From: a\n\r\nbody", Some(10)),
        ];
        for (message, end) in table {
            assert_eq!(header_end(message, 0), *end, "{:?}", String::from_utf8_lossy(message));
        }
    }
}
