//! Failed-login throttling, per (client address, user name), per user name
//! and per client address.
//!
//! User names are case-folded first: `Victim` and `victim` are one name.
//! Each failure raises the wait before that pair's, that user's (from any
//! address) or that address's next attempt is answered: nothing for the
//! first `free_failures`, then `base_delay_ms`, doubling up to
//! `max_delay_ms`. Where the wait falls is chosen so that the right password
//! is never held up by someone else's guessing:
//! - a (address, user) pair with failures waits *before* its login is
//!   looked at;
//! - a user name guessed from many addresses waits only when the guess
//!   fails (before the `-ERR`): the real user, from anywhere, gets in;
//! - an address guessing many names waits before every login from it, but
//!   only after `address_free_failures` and at most `address_max_delay_ms`.
//!
//! A success forgives the pair and the user name (not the address: one good
//! account must not launder an address's guessing). Entries are forgotten
//! after `release_after` without a failure, so a throttled printer recovers
//! by itself. The delay is a per-session wait, never a lock: other sessions
//! are untouched. Memory is bounded by `max_entries` per table. Counters are
//! updated atomically (parallel failures all count).

use std::hash::Hash;
use std::net::IpAddr;
use std::time::Duration;

use moka::sync::Cache;
use serde::{Deserialize, Serialize};

use crate::mail::InvalidSetting;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ThrottleConfig {
    /// Failures of a user name (or address and user name) allowed before
    /// any delay.
    pub free_failures: u32,
    /// The first delay, in milliseconds; it doubles with each failure.
    pub base_delay_ms: u64,
    /// The longest delay, in milliseconds.
    pub max_delay_ms: u64,
    /// Failures from one address, whatever the user names, allowed before
    /// every login from it waits.
    pub address_free_failures: u32,
    /// The longest wait of a login for its address's failures alone (kept
    /// small: it also holds up the address's correct logins); never more
    /// than `max_delay_ms`.
    pub address_max_delay_ms: u64,
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
        InvalidSetting::bounded("address_free_failures", self.address_free_failures, 1..=100_000)?;
        InvalidSetting::bounded("address_max_delay_ms", self.address_max_delay_ms, 0..=60_000)?;
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
            address_free_failures: 20,
            address_max_delay_ms: 1_000,
            release_after_secs: 900,
            max_entries: 100_000,
        }
    }
}

/// The user name as the throttle counts it.
fn fold(user: &str) -> String {
    user.to_lowercase()
}

pub struct LoginThrottle {
    inner: std::sync::RwLock<Tables>,
}

struct Tables {
    config: ThrottleConfig,
    by_pair: Cache<(IpAddr, String), u32>,
    by_address: Cache<IpAddr, u32>,
    by_user: Cache<String, u32>,
}

fn table<K: Hash + Eq + Send + Sync + 'static>(config: &ThrottleConfig) -> Cache<K, u32> {
    Cache::builder()
        .max_capacity(config.max_entries)
        .time_to_live(Duration::from_secs(config.release_after_secs.max(1)))
        .build()
}

/// One more failure under `key`; an update restarts the release timer, so
/// release counts from the last failure. Atomic per key.
fn count<K: Hash + Eq + Send + Sync + Clone + 'static>(cache: &Cache<K, u32>, key: K) {
    cache.entry(key).and_upsert_with(|old| old.map_or(1, |e| e.into_value().saturating_add(1)));
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
        self.tables().delay(address, &fold(user))
    }

    /// How much longer a failed login must wait before its `-ERR`, when it
    /// already waited `waited` before it was looked at (the user name's own
    /// failures, from every address). Call before `record_failure`.
    pub fn failure_delay(&self, user: &str, waited: Duration) -> Duration {
        let t = self.tables();
        t.delay_after(t.by_user.get(&fold(user)).unwrap_or(0)).saturating_sub(waited)
    }

    pub fn record_failure(&self, address: IpAddr, user: &str) {
        let user = fold(user);
        let t = self.tables();
        count(&t.by_pair, (address, user.clone()));
        count(&t.by_address, address);
        count(&t.by_user, user);
    }

    /// A successful login forgives the user name, from this address and
    /// from all (not the address: one good account must not launder an
    /// address's guessing).
    pub fn record_success(&self, address: IpAddr, user: &str) {
        let user = fold(user);
        let t = self.tables();
        t.by_pair.invalidate(&(address, user.clone()));
        t.by_user.invalidate(&user);
    }

    /// Entries held (for tests and metrics; approximate until maintenance).
    pub fn entries(&self) -> u64 {
        let t = self.tables();
        t.by_pair.run_pending_tasks();
        t.by_address.run_pending_tasks();
        t.by_user.run_pending_tasks();
        t.by_pair.entry_count() + t.by_address.entry_count() + t.by_user.entry_count()
    }
}

impl Tables {
    fn new(config: ThrottleConfig) -> Self {
        Tables { by_pair: table(&config), by_address: table(&config), by_user: table(&config), config }
    }

    fn grown(free: u32, base_ms: u64, max_ms: u64, failures: u32) -> Duration {
        let Some(over) = failures.checked_sub(free).filter(|n| *n > 0) else {
            return Duration::ZERO;
        };
        let factor = 1u64.checked_shl(over - 1).unwrap_or(u64::MAX);
        Duration::from_millis(base_ms.saturating_mul(factor).min(max_ms))
    }

    fn delay_after(&self, failures: u32) -> Duration {
        let c = &self.config;
        Self::grown(c.free_failures, c.base_delay_ms, c.max_delay_ms, failures)
    }

    fn delay(&self, address: IpAddr, user: &str) -> Duration {
        let c = &self.config;
        let pair = self.delay_after(self.by_pair.get(&(address, user.to_string())).unwrap_or(0));
        let by_address = self.by_address.get(&address).unwrap_or(0);
        let cap = c.address_max_delay_ms.min(c.max_delay_ms);
        let address = Self::grown(c.address_free_failures, c.base_delay_ms.min(cap), cap, by_address);
        pair.max(address)
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
            address_free_failures: 20,
            address_max_delay_ms: 300,
            ..Default::default()
        });
        let a: IpAddr = "192.0.2.7".parse().unwrap();
        let mut seen = Vec::new();
        for _ in 0..8 {
            let before = t.delay(a, "printer");
            seen.push((before.as_millis(), t.failure_delay("printer", before).as_millis()));
            t.record_failure(a, "PRINTER");
        }
        let before: Vec<_> = seen.iter().map(|s| s.0).collect();
        assert_eq!(before, vec![0, 0, 0, 100, 200, 400, 800, 1000]);
        assert!(seen.iter().all(|s| s.1 == 0), "nothing more after a failure from the same pair: {seen:?}");
        // Another address, same user: no wait before, the user's wait after a
        // failure.
        let b: IpAddr = "192.0.2.8".parse().unwrap();
        assert_eq!(t.delay(b, "Printer").as_millis(), 0);
        assert_eq!(t.failure_delay("Printer", Duration::ZERO).as_millis(), 1000);
        assert_eq!(t.failure_delay("someone-else", Duration::ZERO).as_millis(), 0);
        // Another user from the guessing address: not slowed (8 failures are
        // under the address's 20).
        assert_eq!(t.delay(a, "someone-else").as_millis(), 0);
        t.record_success(b, "printer");
        assert_eq!(t.failure_delay("printer", Duration::ZERO).as_millis(), 0);
        assert_eq!(t.delay(a, "printer").as_millis(), 1000, "a success elsewhere does not forgive this pair");
        t.record_success(a, "printer");
        assert_eq!(t.delay(a, "printer").as_millis(), 0);
        // Many names from one address: every login from it waits, a little.
        for i in 0..20 {
            t.record_failure(a, &format!("guess{i}"));
        }
        assert_eq!(t.delay(a, "someone-else").as_millis(), 300);
    }

    #[test]
    fn parallel_failures_all_count() {
        let t = LoginThrottle::new(ThrottleConfig::default());
        let a: IpAddr = "192.0.2.9".parse().unwrap();
        let barrier = std::sync::Barrier::new(8);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    barrier.wait();
                    for _ in 0..2000 {
                        t.record_failure(a, "printer");
                    }
                });
            }
        });
        let tables = t.tables();
        assert_eq!(tables.by_pair.get(&(a, "printer".to_string())), Some(16_000));
        assert_eq!(tables.by_user.get("printer"), Some(16_000));
        assert_eq!(tables.by_address.get(&a), Some(16_000));
    }

    #[test]
    fn entries_are_released_and_bounded() {
        let t = LoginThrottle::new(ThrottleConfig { release_after_secs: 1, max_entries: 50, ..Default::default() });
        for i in 0..1000u32 {
            t.record_failure(IpAddr::from(i.to_be_bytes()), &format!("user{i}"));
        }
        assert!(t.entries() <= 3 * 50 + 30, "tables bounded, got {}", t.entries());
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(t.entries(), 0);
    }
}
