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
//!
//! With a shared state store (`[state] url`), every failure is also counted
//! there (`INCR` + expiry, atomically for the three keys), and the waits
//! take the larger of the local and the shared count: an attacker spread
//! over replicas gets no more guesses than against one. The local tables
//! are always kept, so a store that fails or times out leaves exactly the
//! embedded behaviour (each replica counts its own).

use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;
use serde::{Deserialize, Serialize};

use crate::mail::InvalidSetting;
use crate::state::SharedState;

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
    shared: Option<Arc<dyn SharedState>>,
}

/// The keys of one login in the shared store: (pair, address, user). A
/// user name that is long or not plain printable ASCII goes in as its
/// SHA-256, so a guesser cannot make the store hold huge keys.
fn shared_keys(address: IpAddr, user: &str) -> [String; 3] {
    let user = if user.len() <= 64 && user.bytes().all(|b| b.is_ascii_graphic()) {
        user.to_string()
    } else {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(user.as_bytes());
        format!("sha256:{}", digest.iter().map(|b| format!("{b:02x}")).collect::<String>())
    };
    [format!("throttle:pair:{address}:{user}"), format!("throttle:addr:{address}"), format!("throttle:user:{user}")]
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
        LoginThrottle { inner: std::sync::RwLock::new(Tables::new(config)), shared: None }
    }

    /// Counts failures in `shared` too, so that replicas sharing it throttle
    /// together.
    pub fn shared_with(mut self, shared: Arc<dyn SharedState>) -> Self {
        self.shared = Some(shared);
        self
    }

    /// Failures counted by every replica for (pair, address, user), or
    /// zeros when there is no shared store or it fails.
    async fn shared_counts(&self, address: IpAddr, user: &str) -> [u32; 3] {
        let Some(shared) = &self.shared else { return [0; 3] };
        match shared.get(&shared_keys(address, user)).await {
            Ok(counts) => {
                let n = |i: usize| counts.get(i).copied().flatten().map_or(0, |c| u32::try_from(c).unwrap_or(u32::MAX));
                [n(0), n(1), n(2)]
            }
            Err(_) => [0; 3],
        }
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

    /// Counts a failure here, and (in the background) in the shared state
    /// store; callers that can wait use [`Self::record_failure_shared`].
    pub fn record_failure(&self, address: IpAddr, user: &str) {
        self.record_failure_locally(address, user);
        if let (Some(shared), Ok(runtime)) = (&self.shared, tokio::runtime::Handle::try_current()) {
            let (shared, keys) = (shared.clone(), shared_keys(address, &fold(user)));
            let release = Duration::from_secs(self.tables().config.release_after_secs.max(1));
            runtime.spawn(async move { shared.increment(&keys, release).await });
        }
    }

    fn record_failure_locally(&self, address: IpAddr, user: &str) {
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
        self.record_success_locally(address, user);
        if let (Some(shared), Ok(runtime)) = (&self.shared, tokio::runtime::Handle::try_current()) {
            let [pair, _, user] = shared_keys(address, &fold(user));
            let shared = shared.clone();
            runtime.spawn(async move { shared.remove(&[pair, user]).await });
        }
    }

    fn record_success_locally(&self, address: IpAddr, user: &str) {
        let user = fold(user);
        let t = self.tables();
        t.by_pair.invalidate(&(address, user.clone()));
        t.by_user.invalidate(&user);
    }

    /// [`Self::delay`], counting the failures of every replica sharing the
    /// state store.
    pub async fn delay_shared(&self, address: IpAddr, user: &str) -> Duration {
        let user = fold(user);
        let local = self.tables().delay(address, &user);
        if self.shared.is_none() {
            return local;
        }
        let [pair, by_address, _] = self.shared_counts(address, &user).await;
        local.max(self.tables().delay_for(pair, by_address))
    }

    /// [`Self::failure_delay`], counting the user name's failures on every
    /// replica sharing the state store.
    pub async fn failure_delay_shared(&self, user: &str, waited: Duration) -> Duration {
        let local = self.failure_delay(user, waited);
        let Some(shared) = &self.shared else { return local };
        let user = fold(user);
        let [_, _, key] = shared_keys(IpAddr::from([0, 0, 0, 0]), &user);
        let count = match shared.get(&[key]).await {
            Ok(counts) => counts.first().copied().flatten().map_or(0, |c| u32::try_from(c).unwrap_or(u32::MAX)),
            Err(_) => 0,
        };
        local.max(self.tables().delay_after(count).saturating_sub(waited))
    }

    /// [`Self::record_failure`], also in the shared state store.
    pub async fn record_failure_shared(&self, address: IpAddr, user: &str) {
        self.record_failure_locally(address, user);
        if let Some(shared) = &self.shared {
            let release = Duration::from_secs(self.tables().config.release_after_secs.max(1));
            let _ = shared.increment(&shared_keys(address, &fold(user)), release).await;
        }
    }

    /// [`Self::record_success`], also in the shared state store.
    pub async fn record_success_shared(&self, address: IpAddr, user: &str) {
        self.record_success_locally(address, user);
        if let Some(shared) = &self.shared {
            let [pair, _, user] = shared_keys(address, &fold(user));
            let _ = shared.remove(&[pair, user]).await;
        }
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
        let pair = self.by_pair.get(&(address, user.to_string())).unwrap_or(0);
        let by_address = self.by_address.get(&address).unwrap_or(0);
        self.delay_for(pair, by_address)
    }

    /// The wait before a login whose pair failed `pair` times and whose
    /// address failed `by_address` times.
    fn delay_for(&self, pair: u32, by_address: u32) -> Duration {
        let c = &self.config;
        let pair = self.delay_after(pair);
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

    /// Two replicas sharing one store: failures on A delay the pair, and
    /// the user's failed guesses, on B; B's success forgives the user on A.
    #[tokio::test]
    async fn replicas_sharing_a_store_throttle_together() {
        let config = ThrottleConfig { free_failures: 2, base_delay_ms: 100, max_delay_ms: 1000, ..Default::default() };
        let store: Arc<dyn SharedState> = Arc::new(crate::state::memory::MemoryState::new(100));
        let a = LoginThrottle::new(config.clone()).shared_with(store.clone());
        let b = LoginThrottle::new(config.clone()).shared_with(store.clone());
        let alone = LoginThrottle::new(config);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        for _ in 0..5 {
            a.record_failure_shared(ip, "Printer").await;
            alone.record_failure_shared(ip, "Printer").await;
        }
        assert_eq!(b.delay_shared(ip, "printer").await.as_millis(), 400, "A's failures count on B");
        assert_eq!(b.failure_delay_shared("PRINTER", Duration::ZERO).await.as_millis(), 400);
        assert_eq!(b.delay(ip, "printer"), Duration::ZERO, "B's own tables are untouched");
        b.record_failure_shared(ip, "printer").await;
        assert_eq!(a.delay_shared(ip, "printer").await.as_millis(), 800, "and B's count on A");
        b.record_success_shared(ip, "printer").await;
        assert_eq!(b.delay_shared(ip, "printer").await, Duration::ZERO);
        assert_eq!(a.delay_shared(ip, "printer").await.as_millis(), 400, "A's own tables still hold its five");
        assert_eq!(alone.delay_shared(ip, "printer").await.as_millis(), 400, "embedded: unchanged");
        // A huge user name is counted under a bounded key, shared all the same.
        let huge = "x".repeat(100_000);
        for _ in 0..3 {
            a.record_failure_shared(ip, &huge).await;
        }
        assert_eq!(b.delay_shared(ip, &huge).await.as_millis(), 100);
        assert!(shared_keys(ip, &huge).iter().all(|k| k.len() < 120), "{:?}", shared_keys(ip, "x")[0]);
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
