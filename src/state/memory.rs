//! A process-local [`SharedState`]: what Redis does, in one process. Two
//! parts holding the same `MemoryState` behave like two replicas sharing a
//! Redis, which lets unit tests prove the sharing logic without a server;
//! it is also the reference the Redis implementation is tested against.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use moka::Expiry;
use moka::sync::Cache;

use super::{Lease, SharedState, StateError, Versioned};

pub struct MemoryState {
    values: Cache<String, (u64, Duration)>,
    records: Mutex<BTreeMap<String, Versioned>>,
    locks: Mutex<Locks>,
}

/// Held locks: key → (fence, until), and the last fence given out.
type Locks = (HashMap<String, (u64, Instant)>, u64);

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
        MemoryState {
            values: Cache::builder().max_capacity(capacity).expire_after(ByEntry).build(),
            records: Mutex::default(),
            locks: Mutex::default(),
        }
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

    async fn read_record(&self, key: &str) -> Result<Option<Versioned>, StateError> {
        Ok(self.records.lock().unwrap_or_else(|p| p.into_inner()).get(key).cloned())
    }

    async fn write_record(&self, key: &str, expected: u64, bytes: &[u8]) -> Result<Option<u64>, StateError> {
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        let current = records.get(key).map_or(0, |r| r.version);
        if current != expected {
            return Ok(None);
        }
        records.insert(key.to_string(), Versioned { version: current + 1, bytes: bytes.to_vec() });
        Ok(Some(current + 1))
    }

    async fn record_keys(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StateError> {
        let records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        Ok(records.keys().filter(|k| k.starts_with(prefix)).take(limit).cloned().collect())
    }

    async fn try_lock(&self, key: &str, ttl: Duration) -> Result<Option<Lease>, StateError> {
        let mut guard = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        let (held, last) = &mut *guard;
        *last += 1;
        let now = Instant::now();
        if held.get(key).is_some_and(|(_, until)| *until > now) {
            return Ok(None);
        }
        held.insert(key.to_string(), (*last, now + ttl));
        Ok(Some(Lease { key: key.to_string(), fence: *last }))
    }

    async fn unlock(&self, lease: &Lease) -> Result<bool, StateError> {
        let mut guard = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match guard.0.get(&lease.key) {
            Some((fence, until)) if *fence == lease.fence && *until > now => {
                guard.0.remove(&lease.key);
                Ok(true)
            }
            _ => Ok(false),
        }
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

    #[tokio::test]
    async fn records_are_compare_and_set_and_locks_fenced() {
        let s = MemoryState::new(10);
        assert_eq!(s.write_record("t:a", 0, b"one").await.unwrap(), Some(1));
        assert_eq!(s.write_record("t:a", 0, b"stale").await.unwrap(), None, "a stale writer loses");
        assert_eq!(s.write_record("t:a", 1, b"two").await.unwrap(), Some(2));
        assert_eq!(s.read_record("t:a").await.unwrap().unwrap().bytes, b"two");
        assert_eq!(s.record_keys("t:", 10).await.unwrap(), vec!["t:a".to_string()]);

        let first = s.try_lock("l", Duration::from_millis(50)).await.unwrap().unwrap();
        assert!(s.try_lock("l", Duration::from_secs(60)).await.unwrap().is_none());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let second = s.try_lock("l", Duration::from_secs(60)).await.unwrap().unwrap();
        assert!(second.fence > first.fence);
        assert!(!s.unlock(&first).await.unwrap(), "an expired lease releases nothing");
        assert!(s.unlock(&second).await.unwrap());
        assert!(s.try_lock("l", Duration::from_secs(60)).await.unwrap().is_some());
    }
}
