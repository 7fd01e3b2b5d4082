//! Warm backend sessions for pollers.
//!
//! Printers poll every minute, and providers throttle logins. When a POP3
//! session ends cleanly its authenticated backend session is kept here,
//! keyed by backend, user and a fingerprint of the credentials (an HMAC
//! with a per-process random key: the secret itself is never stored, and a
//! session is never handed to someone who logged in with another password).
//! The next POP3 session of the same account takes it, after `reset` gives
//! it a fresh view of the mailbox (IMAP: re-SELECT), so a reused session
//! never serves a stale maildrop. Any error discards a session. Idle
//! sessions are closed after `idle_secs`; the pool is bounded per account
//! and in total.
//!
//! Warm sessions count against the server's per-account connection limit
//! (Gmail 15, Dovecot `mail_max_userip_connections` 10, Cyrus
//! `maxlogins_per_user`, often 2–5 where set), the same limit the user's own
//! mail programs live within. So at most one is kept per account unless
//! configured, and when the server refuses a login because of that limit
//! (`BackendError::InUse`), this account's idle sessions — a warm session
//! logged in with an older password or token is one — are closed and the
//! login is tried once more.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ring::hmac;
use serde::{Deserialize, Serialize};

use super::{Mailbox, SharedBackend};
use crate::mail::{BackendError, Credentials, InvalidSetting, Proof};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Keep backend sessions warm between POP3 sessions.
    pub enabled: bool,
    /// Seconds an unused session is kept (stay under the server's own idle
    /// logout: IMAP servers may close after 30 minutes).
    pub idle_secs: u64,
    /// Seconds after its backend login that a session is no longer kept:
    /// reuse skips the backend's password check, so a password changed or
    /// revoked at the provider must stop working through popgate soon.
    pub max_age_secs: u64,
    /// Warm sessions kept per account. Each holds one of the account's
    /// connections at the server: keep it below the server's per-user limit.
    pub max_per_account: usize,
    /// Warm sessions kept in all.
    pub max_total: usize,
}

impl PoolConfig {
    /// Keys relative to `[backend_pool]`.
    pub fn check(&self) -> Result<(), InvalidSetting> {
        InvalidSetting::bounded("idle_secs", self.idle_secs, 1..=86_400)?;
        InvalidSetting::bounded("max_age_secs", self.max_age_secs, 1..=86_400)?;
        InvalidSetting::bounded("max_per_account", self.max_per_account, 0..=100)?;
        InvalidSetting::bounded("max_total", self.max_total, 0..=1_000_000)
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig { enabled: true, idle_secs: 240, max_age_secs: 900, max_per_account: 1, max_total: 1000 }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    backend: usize,
    user: String,
    fingerprint: Vec<u8>,
}

struct Idle {
    mailbox: Box<dyn Mailbox>,
    since: Instant,
    /// When the backend login happened.
    opened: Instant,
}

/// What `checkout` lends: give it back with `checkin` after a clean end.
pub struct Lease {
    key: Key,
    opened: Instant,
    /// The session was warm (no backend login was needed).
    pub reused: bool,
}

pub struct SessionPool {
    config: PoolConfig,
    secret: hmac::Key,
    idle: Mutex<HashMap<Key, Vec<Idle>>>,
    logins: AtomicU64,
    reused: AtomicU64,
}

impl SessionPool {
    pub fn new(config: PoolConfig) -> Arc<Self> {
        let rng = ring::rand::SystemRandom::new();
        let secret = hmac::Key::generate(hmac::HMAC_SHA256, &rng).expect("system randomness");
        Arc::new(SessionPool {
            config,
            secret,
            idle: Mutex::new(HashMap::new()),
            logins: AtomicU64::new(0),
            reused: AtomicU64::new(0),
        })
    }

    fn key(&self, backend: &SharedBackend, credentials: &Credentials) -> Key {
        let (kind, secret) = match &credentials.proof {
            Proof::Password(p) => (b"p", p.expose()),
            Proof::Bearer(t) => (b"b", t.expose()),
        };
        let mut ctx = hmac::Context::with_key(&self.secret);
        for part in [credentials.user.as_bytes(), kind, secret.as_bytes()] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        Key {
            backend: Arc::as_ptr(backend) as *const () as usize,
            user: credentials.user.clone(),
            fingerprint: ctx.sign().as_ref().to_vec(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Vec<Idle>>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A logged-in session: a warm one made current, or a new login.
    pub async fn checkout(
        &self,
        backend: &SharedBackend,
        credentials: &Credentials,
    ) -> Result<(Box<dyn Mailbox>, Lease), BackendError> {
        let key = self.key(backend, credentials);
        if self.config.enabled {
            let ttl = Duration::from_secs(self.config.idle_secs);
            let max_age = Duration::from_secs(self.config.max_age_secs);
            loop {
                let candidate = {
                    let mut idle = self.lock();
                    let found = idle.get_mut(&key).and_then(|list| list.pop());
                    if idle.get(&key).is_some_and(|l| l.is_empty()) {
                        idle.remove(&key);
                    }
                    found
                };
                let Some(candidate) = candidate else { break };
                // Too old counts here too, not only at check-in: a session
                // kept just before its maximum age must not serve past it.
                if candidate.since.elapsed() > ttl || candidate.opened.elapsed() > max_age {
                    candidate.mailbox.close().await;
                    continue;
                }
                let candidate_opened = candidate.opened;
                let mut mailbox = candidate.mailbox;
                match mailbox.reset().await {
                    Ok(()) => {
                        self.reused.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!("reusing a warm backend session");
                        return Ok((mailbox, Lease { key, reused: true, opened: candidate_opened }));
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "warm backend session is stale; discarding");
                        mailbox.close().await;
                    }
                }
            }
        }
        let mailbox = match backend.open(credentials).await {
            Err(BackendError::InUse(why)) => {
                // The server counts our idle sessions against the account's
                // connection limit: give those back, then one more try.
                let closed = self.close_idle_of(&key).await;
                if closed == 0 {
                    return Err(BackendError::InUse(why));
                }
                tracing::info!(
                    closed,
                    refusal = %why,
                    "server refused a login for too many connections; closed this account's warm sessions, retrying once"
                );
                backend.open(credentials).await?
            }
            other => other?,
        };
        self.logins.fetch_add(1, Ordering::Relaxed);
        Ok((mailbox, Lease { key, reused: false, opened: Instant::now() }))
    }

    /// Keeps a session that ended cleanly for the next POP3 session of the
    /// same account (or closes it if the pool is off or full).
    pub async fn checkin(&self, lease: Lease, mailbox: Box<dyn Mailbox>) {
        if !self.config.enabled || lease.opened.elapsed() > Duration::from_secs(self.config.max_age_secs) {
            return mailbox.close().await;
        }
        let refused = {
            let mut idle = self.lock();
            let total: usize = idle.values().map(Vec::len).sum();
            let list = idle.entry(lease.key).or_default();
            if list.len() >= self.config.max_per_account || total >= self.config.max_total {
                Some(mailbox)
            } else {
                list.push(Idle { mailbox, since: Instant::now(), opened: lease.opened });
                None
            }
        };
        if let Some(mailbox) = refused {
            mailbox.close().await;
        }
    }

    /// Closes every idle session of the account `key` names (same backend,
    /// same user, whatever credentials they were opened with); returns how
    /// many.
    async fn close_idle_of(&self, key: &Key) -> usize {
        let sessions: Vec<Idle> = {
            let mut idle = self.lock();
            let keys: Vec<Key> =
                idle.keys().filter(|k| k.backend == key.backend && k.user == key.user).cloned().collect();
            keys.into_iter().filter_map(|k| idle.remove(&k)).flatten().collect()
        };
        let closed = sessions.len();
        for session in sessions {
            session.mailbox.close().await;
        }
        closed
    }

    /// Closes sessions idle for longer than `idle_secs` or logged in longer
    /// than `max_age_secs` ago.
    pub async fn evict_expired(&self) {
        let ttl = Duration::from_secs(self.config.idle_secs);
        let max_age = Duration::from_secs(self.config.max_age_secs);
        let expired: Vec<Idle> = {
            let mut idle = self.lock();
            let mut expired = Vec::new();
            for list in idle.values_mut() {
                let (old, keep): (Vec<Idle>, Vec<Idle>) =
                    list.drain(..).partition(|i| i.since.elapsed() > ttl || i.opened.elapsed() > max_age);
                expired.extend(old);
                *list = keep;
            }
            idle.retain(|_, list| !list.is_empty());
            expired
        };
        for session in expired {
            session.mailbox.close().await;
        }
    }

    /// Closes every warm session (shutdown).
    /// Closes every warm session at once, all within `deadline`: a thousand
    /// sessions on a server that stopped answering must not hold a shutdown
    /// for a thousand logout timeouts. Closing never removes anything.
    pub async fn close_all(&self, deadline: std::time::Duration) {
        let all: Vec<Idle> = self.lock().drain().flat_map(|(_, list)| list).collect();
        let closing = futures::future::join_all(all.into_iter().map(|session| session.mailbox.close()));
        if tokio::time::timeout(deadline, closing).await.is_err() {
            tracing::warn!(?deadline, "warm backend sessions still closing at the deadline; dropped");
        }
    }

    /// Backend logins performed (not counting reuses).
    pub fn logins(&self) -> u64 {
        self.logins.load(Ordering::Relaxed)
    }

    /// Warm sessions reused.
    pub fn reused(&self) -> u64 {
        self.reused.load(Ordering::Relaxed)
    }

    pub fn idle_count(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::demo::{DemoBackend, DemoStore};

    fn backend() -> (DemoStore, SharedBackend) {
        let store = DemoStore::new();
        store.add_user("alice", "pw");
        store.add_user("bob", "pw2");
        (store.clone(), Arc::new(DemoBackend::new(store)))
    }

    #[tokio::test]
    async fn reuses_only_for_the_same_credentials() {
        let (store, backend) = backend();
        let pool = SessionPool::new(PoolConfig::default());
        let alice = Credentials::password("alice", "pw");
        let (mailbox, lease) = pool.checkout(&backend, &alice).await.unwrap();
        pool.checkin(lease, mailbox).await;
        assert_eq!(store.logins(), 1);

        // Same user, same password: reused, and it sees mail that arrived meanwhile.
        store.append("alice", &b"Subject: new\r\n\r\nhi\r\n"[..]);
        let (mut mailbox, lease) = pool.checkout(&backend, &alice).await.unwrap();
        assert_eq!(store.logins(), 1, "no new backend login");
        assert_eq!(mailbox.list().await.unwrap().len(), 1);
        pool.checkin(lease, mailbox).await;

        // Same user, another password: never the warm session.
        let wrong = Credentials::password("alice", "not-pw");
        assert!(matches!(pool.checkout(&backend, &wrong).await, Err(BackendError::AuthFailed)));
        assert_eq!(pool.idle_count(), 1);
        // Another user: a new login.
        let (mailbox, _) = pool.checkout(&backend, &Credentials::password("bob", "pw2")).await.unwrap();
        mailbox.close().await;
        assert_eq!(store.logins(), 2);
        assert_eq!((pool.logins(), pool.reused()), (2, 1));
    }

    #[tokio::test]
    async fn stale_sessions_are_discarded_and_replaced() {
        let (store, backend) = backend();
        let pool = SessionPool::new(PoolConfig::default());
        let alice = Credentials::password("alice", "pw");
        let (mailbox, lease) = pool.checkout(&backend, &alice).await.unwrap();
        pool.checkin(lease, mailbox).await;
        // The warm session fails its reset: it is dropped, a new login is made.
        store.fail_next_reset();
        let (_mailbox, _) = pool.checkout(&backend, &alice).await.unwrap();
        assert_eq!(store.logins(), 2);
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn bounded_and_expiring() {
        let (_store, backend) = backend();
        let pool = SessionPool::new(PoolConfig { max_per_account: 2, idle_secs: 0, ..PoolConfig::default() });
        let alice = Credentials::password("alice", "pw");
        let mut leases = Vec::new();
        for _ in 0..3 {
            leases.push(pool.checkout(&backend, &alice).await.unwrap());
        }
        for (mailbox, lease) in leases {
            pool.checkin(lease, mailbox).await;
        }
        assert_eq!(pool.idle_count(), 2, "at most max_per_account kept");
        tokio::time::sleep(Duration::from_millis(5)).await;
        pool.evict_expired().await;
        assert_eq!(pool.idle_count(), 0);
        // A session past its maximum age is not kept, however recently used.
        let aged = SessionPool::new(PoolConfig { max_age_secs: 0, ..PoolConfig::default() });
        let (mailbox, lease) = aged.checkout(&backend, &alice).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        aged.checkin(lease, mailbox).await;
        assert_eq!(aged.idle_count(), 0);
        // Nor is one reused, or left in the pool, once past it.
        let aged = SessionPool::new(PoolConfig { max_age_secs: 1, ..PoolConfig::default() });
        let (mailbox, lease) = aged.checkout(&backend, &alice).await.unwrap();
        aged.checkin(lease, mailbox).await;
        assert_eq!(aged.idle_count(), 1);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let (mailbox, lease) = aged.checkout(&backend, &alice).await.unwrap();
        assert!(!lease.reused, "a session past max_age_secs was reused");
        aged.checkin(lease, mailbox).await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        aged.evict_expired().await;
        assert_eq!(aged.idle_count(), 0);
        let disabled = SessionPool::new(PoolConfig { enabled: false, ..PoolConfig::default() });
        let (mailbox, lease) = disabled.checkout(&backend, &alice).await.unwrap();
        disabled.checkin(lease, mailbox).await;
        assert_eq!(disabled.idle_count(), 0);
    }
}
