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

    /// A retrieval counted `size` octets for a message remembered with
    /// another size (a store whose output varies, like Graph's MIME
    /// conversion): later sessions list what was actually sent. Only sizes
    /// this cache measured are corrected; a store's own exact sizes are not
    /// remembered here.
    pub async fn correct(&self, user: &str, uidl: &str, size: u64) {
        let key = (user.to_string(), uidl.to_string());
        if self.cache.contains_key(&key) {
            self.cache.insert(key, size).await;
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
        let mut gone = Vec::new();
        for (&i, size) in unknown.iter().zip(sizes) {
            let message = &mut listed[i];
            let Some(size) = size else {
                // Expunged between the listing and now: this session does
                // not list it, and no size is remembered for it.
                tracing::debug!(uidl = %message.uidl, "message gone before it was measured; left out");
                gone.push(i);
                continue;
            };
            if message.size.value() != size {
                tracing::debug!(uidl = %message.uidl, claimed = message.size.value(), exact = size, "store size differs from canonical size");
            }
            message.size = ReportedSize::Exact(size);
            self.cache.insert((user.to_string(), message.uidl.clone()), size).await;
        }
        for i in gone.into_iter().rev() {
            listed.remove(i);
        }
        Ok(listed)
    }
}

#[cfg(test)]
mod tests {
    use async_trait::async_trait;

    use super::*;
    use crate::backend::MessageStream;
    use crate::mail::StoreId;

    /// Claims every size; measures "a" as 5 octets and finds "b" gone.
    struct Measured;

    #[async_trait]
    impl Mailbox for Measured {
        async fn list(&mut self) -> Result<Vec<ListedMessage>, BackendError> {
            unreachable!("not listed here")
        }
        async fn fetch(&mut self, _: &StoreId) -> Result<MessageStream<'_>, BackendError> {
            unreachable!("sizes come from canonical_sizes")
        }
        async fn canonical_sizes(&mut self, ids: &[StoreId]) -> Result<Vec<Option<u64>>, BackendError> {
            Ok(ids.iter().map(|id| (id.0 == "a").then_some(5)).collect())
        }
        async fn remove(&mut self, _: &[StoreId]) -> Result<(), BackendError> {
            unreachable!("nothing is removed")
        }
        async fn close(self: Box<Self>) {}
    }

    fn claimed(id: &str) -> ListedMessage {
        ListedMessage { id: StoreId(id.into()), uidl: format!("u-{id}"), size: ReportedSize::Claimed(1) }
    }

    #[tokio::test]
    async fn a_message_gone_before_measuring_is_left_out_and_not_remembered() {
        let sizes = ExactSizes::new(100);
        let listed = sizes.resolve("acct", &mut Measured, vec![claimed("a"), claimed("b")]).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].id.0.as_str(), listed[0].size), ("a", ReportedSize::Exact(5)));
        assert_eq!(sizes.cache.get(&("acct".to_string(), "u-a".to_string())).await, Some(5));
        assert_eq!(sizes.cache.get(&("acct".to_string(), "u-b".to_string())).await, None, "no size from 'gone'");
    }
}
