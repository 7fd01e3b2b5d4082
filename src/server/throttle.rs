//! Failed-login throttling, per client address and per user name.
//!
//! Each failure raises the delay before that address's (or that user's) next
//! login attempt is even looked at: nothing for the first `free_failures`,
//! then `base_delay`, doubling up to `max_delay`. Entries are forgotten after
//! `release_after` without a failure, so a throttled printer recovers by
//! itself. The delay is a per-session wait, never a lock: other sessions are
//! untouched. Memory is bounded by `max_entries` per table.

use std::hash::Hash;
use std::net::IpAddr;
use std::time::Duration;

use moka::sync::Cache;
use serde::{Deserialize, Serialize};

use crate::mail::InvalidSetting;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ThrottleConfig {
    /// Failures allowed before any delay.
    pub free_failures: u32,
    /// The first delay, in milliseconds; it doubles with each failure.
    pub base_delay_ms: u64,
    /// The longest delay, in milliseconds.
    pub max_delay_ms: u64,
    /// Seconds without a failure after which an address or user is forgiven.
    pub release_after_secs: u64,
    /// Addresses and user names remembered at most (each table).
    pub max_entries: u64,
}

impl ThrottleConfig {
    /// What serde cannot check; keys relative to `[throttle]`.
    pub fn check(&self) -> Result<(), InvalidSetting> {
        InvalidSetting::bounded("free_failures", self.free_failures, 0..=1_000)?;
        InvalidSetting::bounded("base_delay_ms", self.base_delay_ms, 0..=60_000)?;
        InvalidSetting::bounded("max_delay_ms", self.max_delay_ms, 0..=600_000)?;
        InvalidSetting::bounded("release_after_secs", self.release_after_secs, 1..=7 * 86_400)?;
        InvalidSetting::bounded("max_entries", self.max_entries, 1..=10_000_000)?;
        if self.max_delay_ms < self.base_delay_ms {
            return Err(InvalidSetting::new("max_delay_ms", "must be at least throttle.base_delay_ms"));
        }
        Ok(())
    }
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        ThrottleConfig {
            free_failures: 2,
            base_delay_ms: 500,
            max_delay_ms: 15_000,
            release_after_secs: 900,
            max_entries: 100_000,
        }
    }
}

pub struct LoginThrottle {
    inner: std::sync::RwLock<Tables>,
}

struct Tables {
    config: ThrottleConfig,
    by_address: Cache<IpAddr, u32>,
    by_user: Cache<String, u32>,
}

fn table<K: Hash + Eq + Send + Sync + 'static>(config: &ThrottleConfig) -> Cache<K, u32> {
    Cache::builder()
        .max_capacity(config.max_entries)
        .time_to_live(Duration::from_secs(config.release_after_secs.max(1)))
        .build()
}

impl LoginThrottle {
    pub fn new(config: ThrottleConfig) -> Self {
        LoginThrottle { inner: std::sync::RwLock::new(Tables::new(config)) }
    }

    fn tables(&self) -> std::sync::RwLockReadGuard<'_, Tables> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn config(&self) -> ThrottleConfig {
        self.tables().config.clone()
    }

    /// New settings (SIGHUP); the counters start afresh.
    pub fn reconfigure(&self, config: ThrottleConfig) {
        *self.inner.write().unwrap_or_else(|p| p.into_inner()) = Tables::new(config);
    }

    /// How long to wait before looking at a login from `address` for `user`.
    pub fn delay(&self, address: IpAddr, user: &str) -> Duration {
        self.tables().delay(address, user)
    }

    pub fn record_failure(&self, address: IpAddr, user: &str) {
        self.tables().record_failure(address, user)
    }

    /// A successful login forgives the user name (not the address: one good
    /// account must not launder an address's guessing).
    pub fn record_success(&self, user: &str) {
        self.tables().by_user.invalidate(user);
    }

    /// Entries held (for tests and metrics; approximate until maintenance).
    pub fn entries(&self) -> u64 {
        let t = self.tables();
        t.by_address.run_pending_tasks();
        t.by_user.run_pending_tasks();
        t.by_address.entry_count() + t.by_user.entry_count()
    }
}

impl Tables {
    fn new(config: ThrottleConfig) -> Self {
        Tables { by_address: table(&config), by_user: table(&config), config }
    }

    fn delay_after(&self, failures: u32) -> Duration {
        let Some(over) = failures.checked_sub(self.config.free_failures).filter(|n| *n > 0) else {
            return Duration::ZERO;
        };
        let factor = 1u64.checked_shl(over - 1).unwrap_or(u64::MAX);
        Duration::from_millis(self.config.base_delay_ms.saturating_mul(factor).min(self.config.max_delay_ms))
    }

    fn delay(&self, address: IpAddr, user: &str) -> Duration {
        let by_address = self.by_address.get(&address).unwrap_or(0);
        let by_user = self.by_user.get(user).unwrap_or(0);
        self.delay_after(by_address.max(by_user))
    }

    fn record_failure(&self, address: IpAddr, user: &str) {
        // A fresh insert restarts the release timer: release counts from the
        // last failure.
        let n = self.by_address.get(&address).unwrap_or(0).saturating_add(1);
        self.by_address.insert(address, n);
        let n = self.by_user.get(user).unwrap_or(0).saturating_add(1);
        self.by_user.insert(user.to_string(), n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_grows_and_caps() {
        let t = LoginThrottle::new(ThrottleConfig {
            free_failures: 2,
            base_delay_ms: 100,
            max_delay_ms: 1000,
            ..Default::default()
        });
        let a: IpAddr = "192.0.2.7".parse().unwrap();
        let mut seen = Vec::new();
        for _ in 0..8 {
            seen.push(t.delay(a, "printer").as_millis());
            t.record_failure(a, "printer");
        }
        assert_eq!(seen, vec![0, 0, 0, 100, 200, 400, 800, 1000]);
        // Another address, same user: the user's failures count.
        let b: IpAddr = "192.0.2.8".parse().unwrap();
        assert_eq!(t.delay(b, "printer").as_millis(), 1000);
        assert_eq!(t.delay(b, "someone-else").as_millis(), 0);
        t.record_success("printer");
        assert_eq!(t.delay(b, "printer").as_millis(), 0);
        // The address stays throttled after a success on one user.
        assert_eq!(t.delay(a, "someone-else").as_millis(), 1000);
    }

    #[test]
    fn entries_are_released_and_bounded() {
        let t = LoginThrottle::new(ThrottleConfig { release_after_secs: 1, max_entries: 50, ..Default::default() });
        for i in 0..1000u32 {
            t.record_failure(IpAddr::from(i.to_be_bytes()), &format!("user{i}"));
        }
        assert!(t.entries() <= 2 * 50 + 20, "tables bounded, got {}", t.entries());
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(t.entries(), 0);
    }
}
