//! Exact POP3 sizes for every backend.
//!
//! POP3 requires LIST/STAT sizes to equal the octets RETR sends, but stores
//! report sizes that can be off: an IMAP server's RFC822.SIZE may not count a
//! bare CR the way POP3 sends it, JMAP's `size` counts stored octets, and the
//! Gmail and Graph APIs only estimate. A backend marks such sizes `Claimed`;
//! `ExactSizes::resolve` measures those messages once (streaming, nothing is
//! kept but the count) and caches the result keyed by user and UIDL, which is
//! safe because a UIDL names immutable content. Later sessions pay nothing.

use std::time::Duration;

use moka::future::Cache;

use super::{ListedMessage, Mailbox, ReportedSize};
use crate::mail::BackendError;

#[derive(Clone)]
pub struct ExactSizes {
    cache: Cache<(String, String), u64>,
}

impl ExactSizes {
    /// `capacity` is the number of (user, message) sizes kept.
    pub fn new(capacity: u64) -> Self {
        ExactSizes {
            cache: Cache::builder().max_capacity(capacity).time_to_idle(Duration::from_secs(7 * 24 * 3600)).build(),
        }
    }

    /// Returns the listing with every size exact.
    pub async fn resolve(
        &self,
        user: &str,
        mailbox: &mut dyn Mailbox,
        mut listed: Vec<ListedMessage>,
    ) -> Result<Vec<ListedMessage>, BackendError> {
        let mut unknown = Vec::new();
        for (i, message) in listed.iter_mut().enumerate() {
            if let ReportedSize::Claimed(_) = message.size {
                match self.cache.get(&(user.to_string(), message.uidl.clone())).await {
                    Some(exact) => message.size = ReportedSize::Exact(exact),
                    None => unknown.push(i),
                }
            }
        }
        if unknown.is_empty() {
            return Ok(listed);
        }
        let ids: Vec<_> = unknown.iter().map(|&i| listed[i].id.clone()).collect();
        let sizes = mailbox.canonical_sizes(&ids).await?;
        if sizes.len() != ids.len() {
            return Err(BackendError::unavailable("backend measured the wrong number of messages"));
        }
        for (&i, size) in unknown.iter().zip(sizes) {
            let message = &mut listed[i];
            if message.size.value() != size {
                tracing::debug!(uidl = %message.uidl, claimed = message.size.value(), exact = size, "store size differs from canonical size");
            }
            message.size = ReportedSize::Exact(size);
            self.cache.insert((user.to_string(), message.uidl.clone()), size).await;
        }
        Ok(listed)
    }
}
