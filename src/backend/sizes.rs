//! Exact POP3 sizes for every backend.
//!
//! POP3 requires LIST/STAT sizes to equal the octets RETR sends, but stores
//! report sizes that can be off: an IMAP server's RFC822.SIZE may not count a
//! bare CR the way POP3 sends it, JMAP's `size` counts stored octets, and the
//! Gmail and Graph APIs only estimate. A backend marks such sizes `Claimed`;
//! `ExactSizes::resolve` measures those messages once (streaming, nothing is
//! kept but the count) and caches the result keyed by user and UIDL, which is
//! safe because a UIDL names immutable content. Later sessions pay nothing.
//!
//! With a [`SizeStore`] shared between replicas (the server wires one to
//! Redis when `[state] url` is set), a size measured by any replica, or
//! before a restart, is found there before anything is measured. The local
//! cache is always consulted first and always filled, so a store that fails
//! only costs a measurement, never a wrong size. Backends know nothing of
//! the store: it is a trait here, implemented by the server.

use std::sync::Arc;
use std::time::Duration;

use moka::future::Cache;

use super::{ListedMessage, Mailbox, ReportedSize};
use crate::mail::BackendError;

/// Exact sizes kept outside this process, by (account, UIDL). Failures are
/// the store's to log; here they read as "not known" and are not retried.
#[async_trait::async_trait]
pub trait SizeStore: Send + Sync {
    /// The known sizes of `uidls` in `account`, in order.
    async fn sizes(&self, account: &str, uidls: &[&str]) -> Vec<Option<u64>>;
    /// Remembers measured sizes.
    async fn remember(&self, account: &str, sizes: &[(&str, u64)]);
}

#[derive(Clone)]
pub struct ExactSizes {
    cache: Cache<(String, String), u64>,
    shared: Option<Arc<dyn SizeStore>>,
}

impl ExactSizes {
    /// `capacity` is the number of (user, message) sizes kept.
    pub fn new(capacity: u64) -> Self {
        ExactSizes {
            cache: Cache::builder().max_capacity(capacity).time_to_idle(Duration::from_secs(7 * 24 * 3600)).build(),
            shared: None,
        }
    }

    /// Looks sizes up in, and adds measured sizes to, `store` too.
    pub fn shared_with(mut self, store: Arc<dyn SizeStore>) -> Self {
        self.shared = Some(store);
        self
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
            if let Some(shared) = &self.shared {
                shared.remember(user, &[(uidl, size)]).await;
            }
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
        if let (Some(shared), false) = (&self.shared, unknown.is_empty()) {
            let uidls: Vec<&str> = unknown.iter().map(|&i| listed[i].uidl.as_str()).collect();
            let known = shared.sizes(user, &uidls).await;
            let mut still = Vec::new();
            for (&i, size) in unknown.iter().zip(known.into_iter().chain(std::iter::repeat(None))) {
                match size {
                    Some(exact) => {
                        self.cache.insert((user.to_string(), listed[i].uidl.clone()), exact).await;
                        listed[i].size = ReportedSize::Exact(exact);
                    }
                    None => still.push(i),
                }
            }
            unknown = still;
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
        let mut measured = Vec::new();
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
            measured.push(i);
        }
        if let Some(shared) = &self.shared {
            let entries: Vec<(&str, u64)> =
                measured.iter().map(|&i| (listed[i].uidl.as_str(), listed[i].size.value())).collect();
            shared.remember(user, &entries).await;
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

    /// Counts what it measures: "a" and "c" are 5 octets.
    struct Counting(usize);

    #[async_trait]
    impl Mailbox for Counting {
        async fn list(&mut self) -> Result<Vec<ListedMessage>, BackendError> {
            unreachable!("not listed here")
        }
        async fn fetch(&mut self, _: &StoreId) -> Result<MessageStream<'_>, BackendError> {
            unreachable!("sizes come from canonical_sizes")
        }
        async fn canonical_sizes(&mut self, ids: &[StoreId]) -> Result<Vec<Option<u64>>, BackendError> {
            self.0 += ids.len();
            Ok(ids.iter().map(|_| Some(5)).collect())
        }
        async fn remove(&mut self, _: &[StoreId]) -> Result<(), BackendError> {
            unreachable!("nothing is removed")
        }
        async fn close(self: Box<Self>) {}
    }

    #[derive(Default)]
    struct Shared(std::sync::Mutex<std::collections::HashMap<(String, String), u64>>);

    #[async_trait]
    impl SizeStore for Shared {
        async fn sizes(&self, account: &str, uidls: &[&str]) -> Vec<Option<u64>> {
            let map = self.0.lock().unwrap();
            uidls.iter().map(|u| map.get(&(account.to_string(), u.to_string())).copied()).collect()
        }
        async fn remember(&self, account: &str, sizes: &[(&str, u64)]) {
            let mut map = self.0.lock().unwrap();
            for (u, size) in sizes {
                map.insert((account.to_string(), u.to_string()), *size);
            }
        }
    }

    #[tokio::test]
    async fn a_second_replica_finds_sizes_the_first_measured() {
        let store = Arc::new(Shared::default());
        let first = ExactSizes::new(100).shared_with(store.clone());
        let second = ExactSizes::new(100).shared_with(store.clone());
        let mut backend = Counting(0);
        first.resolve("acct", &mut backend, vec![claimed("a"), claimed("c")]).await.unwrap();
        assert_eq!(backend.0, 2);
        let listed =
            second.resolve("acct", &mut backend, vec![claimed("a"), claimed("c"), claimed("d")]).await.unwrap();
        assert_eq!(backend.0, 3, "only the new message is measured");
        assert!(listed.iter().all(|m| m.size == ReportedSize::Exact(5)));
        let other = second.resolve("other", &mut backend, vec![claimed("a")]).await.unwrap();
        assert_eq!((backend.0, other[0].size), (4, ReportedSize::Exact(5)), "never another account's size");
        first.correct("acct", "u-a", 6).await;
        let third = ExactSizes::new(100).shared_with(store);
        let listed = third.resolve("acct", &mut backend, vec![claimed("a")]).await.unwrap();
        assert_eq!((backend.0, listed[0].size), (4, ReportedSize::Exact(6)), "corrections are shared");
    }

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
