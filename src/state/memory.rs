//! A process-local [`SharedState`]: what Redis does, in one process. Two
//! parts holding the same `MemoryState` behave like two replicas sharing a
//! Redis, which lets unit tests prove the sharing logic without a server;
//! it is also the reference the Redis implementation is tested against.

use std::time::Duration;

use async_trait::async_trait;
use moka::Expiry;
use moka::sync::Cache;

use super::{SharedState, StateError};

pub struct MemoryState {
    values: Cache<String, (u64, Duration)>,
}

struct ByEntry;

impl Expiry<String, (u64, Duration)> for ByEntry {
    fn expire_after_create(&self, _: &String, v: &(u64, Duration), _: std::time::Instant) -> Option<Duration> {
        Some(v.1)
    }
    fn expire_after_update(
        &self,
        _: &String,
        v: &(u64, Duration),
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.1)
    }
}

impl MemoryState {
    pub fn new(capacity: u64) -> Self {
        MemoryState { values: Cache::builder().max_capacity(capacity).expire_after(ByEntry).build() }
    }
}

#[async_trait]
impl SharedState for MemoryState {
    async fn increment(&self, keys: &[String], ttl: Duration) -> Result<Vec<u64>, StateError> {
        Ok(keys
            .iter()
            .map(|key| {
                let entry = self
                    .values
                    .entry(key.clone())
                    .and_upsert_with(|old| (old.map_or(1, |e| e.into_value().0.saturating_add(1)), ttl));
                entry.into_value().0
            })
            .collect())
    }

    async fn get(&self, keys: &[String]) -> Result<Vec<Option<u64>>, StateError> {
        Ok(keys.iter().map(|key| self.values.get(key).map(|v| v.0)).collect())
    }

    async fn set(&self, entries: &[(String, u64)], ttl: Duration) -> Result<(), StateError> {
        for (key, value) in entries {
            self.values.insert(key.clone(), (*value, ttl));
        }
        Ok(())
    }

    async fn remove(&self, keys: &[String]) -> Result<(), StateError> {
        for key in keys {
            self.values.invalidate(key);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_expire_and_are_removed() {
        let s = MemoryState::new(100);
        let keys = vec!["a".to_string(), "b".to_string()];
        assert_eq!(s.increment(&keys, Duration::from_secs(60)).await.unwrap(), vec![1, 1]);
        assert_eq!(s.increment(&keys[..1], Duration::from_secs(60)).await.unwrap(), vec![2]);
        assert_eq!(s.get(&keys).await.unwrap(), vec![Some(2), Some(1)]);
        s.remove(&keys[..1]).await.unwrap();
        s.set(&[("c".into(), 7)], Duration::from_millis(50)).await.unwrap();
        assert_eq!(s.get(&["a".into(), "c".into()]).await.unwrap(), vec![None, Some(7)]);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(s.get(&["c".into()]).await.unwrap(), vec![None]);
    }
}
