//! Backend connections shared by the POP3 sessions of an account.
//!
//! A POP3 session holds no backend connection between backend calls: the
//! maildrop listed at login answers STAT, LIST and UIDL, and each backend
//! call (the login's listing, a RETR or TOP stream, the UPDATE state's
//! removal) borrows one of the account's connections for its duration and
//! gives it back. A `StoreId` from the listing is valid on any connection
//! whose `Mailbox::validity` is the listing's (IMAP: a UID under the same
//! UIDVALIDITY); a connection showing another validity is never used for
//! that session, whose call then fails with a temporary error.
//!
//! Providers cap connections per account (Gmail 15, Dovecot
//! `mail_max_userip_connections` 10, Cyrus `maxlogins_per_user`): at most
//! `max_connections_per_account` are open per account, busy or idle. A call
//! waits for one in a first-come-first-served queue (tokio's semaphore is
//! FIFO), at most `wait_secs`, then fails with `BackendError::InUse`. New
//! logins are also admitted across all accounts (`max_concurrent_logins`,
//! `admit_login`): a burst of polls queues before its backend work instead
//! of piling onto the server and the event loop.
//!
//! Idle connections are keyed by backend, user and a fingerprint of the
//! credentials (an HMAC with a per-process random key: the secret itself is
//! never stored, and a connection is never handed to someone who logged in
//! with another password). A login takes one after `reset` gives it a fresh
//! view of the mailbox (IMAP: re-SELECT), so no session lists a stale
//! maildrop. A connection that failed a call is closed, never given back.
//! Idle connections are closed after `idle_secs` or `max_age_secs` after
//! their backend login; at most `max_per_account` are kept idle per account
//! (more while sessions of the account are waiting for one) and
//! `max_total` in all. When the server refuses a login because of its own
//! connection limit (`BackendError::InUse`), this account's idle
//! connections — one logged in with an older password or token is one —
//! are closed and the login is tried once more.
//!
//! With the pool disabled (`enabled = false`) a session keeps the
//! connection it logged in with for its whole life and closes it at the
//! end, still within the per-account cap.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ring::hmac;
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{Mailbox, SharedBackend};
use crate::mail::{BackendError, Credentials, InvalidSetting, Proof};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Keep backend connections open between backend calls and between
    /// POP3 sessions.
    pub enabled: bool,
    /// Seconds an unused connection is kept (stay under the server's own
    /// idle logout: IMAP servers may close after 30 minutes).
    pub idle_secs: u64,
    /// Seconds after its backend login that a connection is no longer
    /// kept: reuse skips the backend's password check, so a password
    /// changed or revoked at the provider must stop working through popgate
    /// soon.
    pub max_age_secs: u64,
    /// Idle connections kept per account when no session of the account is
    /// waiting for one.
    pub max_per_account: usize,
    /// Idle connections kept in all.
    pub max_total: usize,
    /// Backend connections open at once for one account, busy or idle:
    /// keep it below the server's per-user limit, leaving room for the
    /// user's own mail programs.
    pub max_connections_per_account: usize,
    /// Seconds a backend call waits in the account's queue for a
    /// connection before the client gets `-ERR [IN-USE]`.
    pub wait_secs: u64,
    /// POP3 logins doing their backend work (connection, listing, sizes)
    /// at once, all accounts together; the others queue first come, first
    /// served, at most `wait_secs`.
    pub max_concurrent_logins: usize,
}

impl PoolConfig {
    /// Keys relative to `[backend_pool]`.
    pub fn check(&self) -> Result<(), InvalidSetting> {
        InvalidSetting::bounded("idle_secs", self.idle_secs, 1..=86_400)?;
        InvalidSetting::bounded("max_age_secs", self.max_age_secs, 1..=86_400)?;
        InvalidSetting::bounded("max_per_account", self.max_per_account, 0..=100)?;
        InvalidSetting::bounded("max_total", self.max_total, 0..=1_000_000)?;
        InvalidSetting::bounded("max_connections_per_account", self.max_connections_per_account, 1..=100)?;
        InvalidSetting::bounded("wait_secs", self.wait_secs, 1..=600)?;
        InvalidSetting::bounded("max_concurrent_logins", self.max_concurrent_logins, 1..=10_000)
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            enabled: true,
            idle_secs: 240,
            max_age_secs: 900,
            max_per_account: 1,
            max_total: 1000,
            max_connections_per_account: 8,
            wait_secs: 30,
            max_concurrent_logins: 64,
        }
    }
}

/// Which account a connection counts against at the server.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct AccountKey {
    backend: usize,
    user: String,
}

struct Idle {
    mailbox: Box<dyn Mailbox>,
    /// Which credentials opened it (see `SessionPool::fingerprint`).
    fingerprint: Vec<u8>,
    since: Instant,
    /// When the backend login happened.
    opened: Instant,
}

/// One account's connections.
struct Account {
    /// One permit per backend call in progress; waiters are served in
    /// arrival order.
    calls: Arc<Semaphore>,
    state: Mutex<AccountState>,
}

#[derive(Default)]
struct AccountState {
    /// Connections open at the server: busy, idle, being opened or being
    /// closed. Never above the cap.
    open: usize,
    idle: Vec<Idle>,
    /// Calls queued for a permit: while there are any, a connection given
    /// back is kept even beyond `max_per_account`.
    waiting: usize,
}

impl Account {
    fn lock(&self) -> std::sync::MutexGuard<'_, AccountState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Counts one connection in its account's `open` until dropped (also when
/// the future that opened it is cancelled) or disarmed (kept idle).
struct Slot {
    account: Arc<Account>,
    armed: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.armed {
            self.account.lock().open -= 1;
        }
    }
}

/// Counts a call in its account's `waiting` while it queues.
struct Waiting<'a>(&'a Account);

impl<'a> Waiting<'a> {
    fn new(account: &'a Account) -> Self {
        account.lock().waiting += 1;
        Waiting(account)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.lock().waiting -= 1;
    }
}

pub struct SessionPool {
    config: PoolConfig,
    secret: hmac::Key,
    accounts: Mutex<HashMap<AccountKey, Arc<Account>>>,
    /// Admission control for logins, all accounts (`admit_login`).
    logging_in: Arc<Semaphore>,
    idle_total: AtomicUsize,
    logins: AtomicU64,
    reused: AtomicU64,
    in_use: AtomicU64,
}

/// A connection lent for one backend call: give it back with
/// `SharedMailbox::give_back`. Dropped without that (a cancelled call, a
/// client gone mid-stream), it is closed.
pub struct Borrowed {
    mailbox: Option<Box<dyn Mailbox>>,
    fingerprint: Vec<u8>,
    opened: Instant,
    reused: bool,
    pool: Arc<SessionPool>,
    // Dropped in this order: the connection stops counting only once
    // closed, and only then may a waiting call open another.
    slot: Option<Slot>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Borrowed {
    pub fn mailbox(&mut self) -> &mut dyn Mailbox {
        self.mailbox.as_deref_mut().expect("a lent connection is present until given back")
    }

    /// The connection was idle before (no backend login was needed).
    pub fn reused(&self) -> bool {
        self.reused
    }

    /// Keeps the connection for the account's next call, or closes it (it
    /// failed, is too old, or enough are idle).
    async fn give_back(mut self, healthy: bool) {
        let Some(mailbox) = self.mailbox.take() else { return };
        let pool = self.pool.clone();
        let config = &pool.config;
        let mut refused = Some(mailbox);
        if healthy && config.enabled && self.opened.elapsed() <= Duration::from_secs(config.max_age_secs) {
            let slot = self.slot.as_mut().expect("slot held until given back");
            let mut state = slot.account.lock();
            let wanted = state.idle.len() < config.max_per_account || state.waiting > 0;
            if wanted && pool.idle_total.load(Ordering::Relaxed) < config.max_total {
                let mailbox = refused.take().expect("not yet kept");
                state.idle.push(Idle {
                    mailbox,
                    fingerprint: std::mem::take(&mut self.fingerprint),
                    since: Instant::now(),
                    opened: self.opened,
                });
                pool.idle_total.fetch_add(1, Ordering::Relaxed);
                slot.armed = false;
            }
        }
        if let Some(mailbox) = refused {
            mailbox.close().await;
        }
        drop(self.slot.take());
        drop(self.permit.take());
    }
}

impl Drop for Borrowed {
    fn drop(&mut self) {
        let Some(mailbox) = self.mailbox.take() else { return };
        let (slot, permit) = (self.slot.take(), self.permit.take());
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    mailbox.close().await;
                    drop(slot);
                    drop(permit);
                });
            }
            Err(_) => drop(mailbox),
        }
    }
}

impl SessionPool {
    pub fn new(config: PoolConfig) -> Arc<Self> {
        let rng = ring::rand::SystemRandom::new();
        let secret = hmac::Key::generate(hmac::HMAC_SHA256, &rng).expect("system randomness");
        Arc::new(SessionPool {
            logging_in: Arc::new(Semaphore::new(config.max_concurrent_logins.max(1))),
            config,
            secret,
            accounts: Mutex::new(HashMap::new()),
            idle_total: AtomicUsize::new(0),
            logins: AtomicU64::new(0),
            reused: AtomicU64::new(0),
            in_use: AtomicU64::new(0),
        })
    }

    fn fingerprint(&self, credentials: &Credentials) -> Vec<u8> {
        let (kind, secret) = match &credentials.proof {
            Proof::Password(p) => (b"p", p.expose()),
            Proof::Bearer(t) => (b"b", t.expose()),
        };
        let mut ctx = hmac::Context::with_key(&self.secret);
        for part in [credentials.user.as_bytes(), kind, secret.as_bytes()] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        ctx.sign().as_ref().to_vec()
    }

    fn accounts(&self) -> std::sync::MutexGuard<'_, HashMap<AccountKey, Arc<Account>>> {
        self.accounts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The backend side of one POP3 session of this account; it holds no
    /// connection until a call borrows one.
    pub fn session(self: &Arc<Self>, backend: &SharedBackend, credentials: Credentials) -> SharedMailbox {
        let key = AccountKey { backend: Arc::as_ptr(backend) as *const () as usize, user: credentials.user.clone() };
        let account = self
            .accounts()
            .entry(key)
            .or_insert_with(|| {
                Arc::new(Account {
                    calls: Arc::new(Semaphore::new(self.config.max_connections_per_account.max(1))),
                    state: Mutex::new(AccountState::default()),
                })
            })
            .clone();
        SharedMailbox {
            pool: self.clone(),
            account,
            fingerprint: self.fingerprint(&credentials),
            backend: backend.clone(),
            credentials,
            validity: None,
            pinned: None,
        }
    }

    /// One of the account's connections for one call: an idle one of the
    /// same credentials, or a new login if the account is under its cap.
    async fn borrow(
        self: &Arc<Self>,
        account: &Arc<Account>,
        fingerprint: &[u8],
        backend: &SharedBackend,
        credentials: &Credentials,
    ) -> Result<Borrowed, BackendError> {
        let cap = self.config.max_connections_per_account.max(1);
        let wait = Duration::from_secs(self.config.wait_secs);
        let deadline = tokio::time::Instant::now() + wait;
        let in_use = || {
            self.in_use.fetch_add(1, Ordering::Relaxed);
            tracing::info!(cap, wait_secs = wait.as_secs(), "every backend connection of the account stayed busy");
            BackendError::InUse(format!("all {cap} backend connections of the account stayed busy"))
        };
        let permit = {
            let _waiting = Waiting::new(account);
            match tokio::time::timeout_at(deadline, account.calls.clone().acquire_owned()).await {
                Ok(Ok(permit)) => permit,
                Ok(Err(_)) => return Err(BackendError::unavailable("connection pool closed")),
                Err(_) => return Err(in_use()),
            }
        };
        let ttl = Duration::from_secs(self.config.idle_secs);
        let max_age = Duration::from_secs(self.config.max_age_secs);
        loop {
            enum Next {
                Reuse(Idle),
                /// Close this idle connection of other credentials, open in its place.
                Replace(Idle),
                Open,
                /// Every slot is taken by a connection being closed.
                Wait,
            }
            let next = {
                let mut state = account.lock();
                if let Some(i) = state.idle.iter().rposition(|i| i.fingerprint == fingerprint) {
                    Next::Reuse(state.idle.remove(i))
                } else if state.open < cap {
                    state.open += 1;
                    Next::Open
                } else if !state.idle.is_empty() {
                    Next::Replace(state.idle.remove(0))
                } else {
                    Next::Wait
                }
            };
            if matches!(next, Next::Reuse(_) | Next::Replace(_)) {
                self.idle_total.fetch_sub(1, Ordering::Relaxed);
            }
            // From here the slot of whatever was taken is ours.
            let slot = Slot { account: account.clone(), armed: !matches!(next, Next::Wait) };
            match next {
                Next::Reuse(idle) => {
                    // Too old counts here too, not only at check-in: a
                    // connection kept just before its maximum age must not
                    // serve past it.
                    if idle.since.elapsed() > ttl || idle.opened.elapsed() > max_age {
                        idle.mailbox.close().await;
                        drop(slot);
                        continue;
                    }
                    return Ok(Borrowed {
                        mailbox: Some(idle.mailbox),
                        fingerprint: fingerprint.to_vec(),
                        opened: idle.opened,
                        reused: true,
                        pool: self.clone(),
                        slot: Some(slot),
                        permit: Some(permit),
                    });
                }
                Next::Replace(idle) => idle.mailbox.close().await,
                Next::Open => {}
                Next::Wait => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(in_use());
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
            }
            let mailbox = self.open(account, backend, credentials).await?;
            return Ok(Borrowed {
                mailbox: Some(mailbox),
                fingerprint: fingerprint.to_vec(),
                opened: Instant::now(),
                reused: false,
                pool: self.clone(),
                slot: Some(slot),
                permit: Some(permit),
            });
        }
    }

    /// Admission control for logins, all accounts: at most
    /// `max_concurrent_logins` run at once, the others wait in arrival order
    /// (at most `wait_secs`, then `InUse`). Under overload sessions queue
    /// here, before any backend work, instead of all competing for the
    /// event loop with the sessions already logged in. Hold the permit for
    /// the login's backend work only.
    pub async fn admit_login(&self) -> Result<tokio::sync::SemaphorePermit<'_>, BackendError> {
        let wait = Duration::from_secs(self.config.wait_secs);
        match tokio::time::timeout(wait, self.logging_in.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(BackendError::unavailable("connection pool closed")),
            Err(_) => {
                self.in_use.fetch_add(1, Ordering::Relaxed);
                Err(BackendError::InUse("too many logins in progress".into()))
            }
        }
    }

    /// A backend login.
    async fn open(
        &self,
        account: &Account,
        backend: &SharedBackend,
        credentials: &Credentials,
    ) -> Result<Box<dyn Mailbox>, BackendError> {
        let mailbox = match backend.open(credentials).await {
            Err(BackendError::InUse(why)) => {
                // The server counts our idle connections against the
                // account's limit: give those back, then one more try.
                let closed = self.close_idle_of(account).await;
                if closed == 0 {
                    return Err(BackendError::InUse(why));
                }
                tracing::info!(
                    closed,
                    refusal = %why,
                    "server refused a login for too many connections; closed this account's idle connections, retrying once"
                );
                backend.open(credentials).await?
            }
            other => other?,
        };
        self.logins.fetch_add(1, Ordering::Relaxed);
        Ok(mailbox)
    }

    /// Closes every idle connection of `account`, whatever credentials
    /// opened it; returns how many.
    async fn close_idle_of(&self, account: &Account) -> usize {
        let idle: Vec<Idle> = std::mem::take(&mut account.lock().idle);
        let closed = idle.len();
        self.idle_total.fetch_sub(closed, Ordering::Relaxed);
        for connection in idle {
            connection.mailbox.close().await;
        }
        account.lock().open -= closed;
        closed
    }

    /// Closes connections idle for longer than `idle_secs`, logged in longer
    /// than `max_age_secs` ago, or beyond `max_per_account` idle, and
    /// forgets accounts with no connection and no session.
    pub async fn evict_expired(&self) {
        let ttl = Duration::from_secs(self.config.idle_secs);
        let max_age = Duration::from_secs(self.config.max_age_secs);
        let accounts: Vec<Arc<Account>> = {
            let mut accounts = self.accounts();
            accounts.retain(|_, account| Arc::strong_count(account) > 1 || account.lock().open > 0);
            accounts.values().cloned().collect()
        };
        for account in accounts {
            let expired: Vec<Idle> = {
                let mut state = account.lock();
                let (old, mut keep): (Vec<Idle>, Vec<Idle>) =
                    state.idle.drain(..).partition(|i| i.since.elapsed() > ttl || i.opened.elapsed() > max_age);
                let mut expired = old;
                // The most recently used are kept.
                let surplus = keep.len().saturating_sub(self.config.max_per_account);
                expired.extend(keep.drain(..surplus));
                state.idle = keep;
                expired
            };
            let closed = expired.len();
            if closed == 0 {
                continue;
            }
            self.idle_total.fetch_sub(closed, Ordering::Relaxed);
            for connection in expired {
                connection.mailbox.close().await;
            }
            account.lock().open -= closed;
        }
    }

    /// Closes every idle connection at once, all within `deadline`: a
    /// thousand connections to a server that stopped answering must not
    /// hold a shutdown for a thousand logout timeouts. Closing never
    /// removes anything.
    pub async fn close_all(&self, deadline: std::time::Duration) {
        let accounts: Vec<Arc<Account>> = self.accounts().values().cloned().collect();
        let mut all = Vec::new();
        for account in accounts {
            let idle = std::mem::take(&mut account.lock().idle);
            self.idle_total.fetch_sub(idle.len(), Ordering::Relaxed);
            account.lock().open -= idle.len();
            all.extend(idle);
        }
        let closing = futures::future::join_all(all.into_iter().map(|connection| connection.mailbox.close()));
        if tokio::time::timeout(deadline, closing).await.is_err() {
            tracing::warn!(?deadline, "idle backend connections still closing at the deadline; dropped");
        }
    }

    /// Backend logins performed (not counting reuses).
    pub fn logins(&self) -> u64 {
        self.logins.load(Ordering::Relaxed)
    }

    /// Idle connections reused by a login.
    pub fn reused(&self) -> u64 {
        self.reused.load(Ordering::Relaxed)
    }

    /// Calls refused after waiting `wait_secs` for a connection.
    pub fn in_use_refusals(&self) -> u64 {
        self.in_use.load(Ordering::Relaxed)
    }

    pub fn idle_count(&self) -> usize {
        self.idle_total.load(Ordering::Relaxed)
    }

    /// Backend connections open now (busy, idle, opening or closing).
    pub fn open_count(&self) -> usize {
        let accounts: Vec<Arc<Account>> = self.accounts().values().cloned().collect();
        accounts.iter().map(|a| a.lock().open).sum()
    }
}

/// The backend side of one POP3 session: the account's pool, the
/// credentials to open a connection with, and the validity under which
/// the session's maildrop was listed. Holds no connection between calls
/// (unless the pool is disabled).
pub struct SharedMailbox {
    pool: Arc<SessionPool>,
    account: Arc<Account>,
    fingerprint: Vec<u8>,
    backend: SharedBackend,
    credentials: Credentials,
    /// `Mailbox::validity` of the connection the maildrop was listed on.
    validity: Option<u64>,
    /// The pool is disabled: the session's own connection, kept between
    /// calls.
    pinned: Option<Borrowed>,
}

impl SharedMailbox {
    async fn take(&mut self) -> Result<Borrowed, BackendError> {
        if let Some(pinned) = self.pinned.take() {
            return Ok(pinned);
        }
        self.pool.borrow(&self.account, &self.fingerprint, &self.backend, &self.credentials).await
    }

    /// A connection with a fresh view of the mailbox, for the login's
    /// listing: an idle one after `reset` (a stale one is closed and the
    /// next tried), or a new login. The session's validity becomes this
    /// connection's.
    pub async fn borrow_fresh(&mut self) -> Result<Borrowed, BackendError> {
        loop {
            let mut lent = self.take().await?;
            if lent.reused {
                if let Err(e) = lent.mailbox().reset().await {
                    tracing::debug!(error = %e, "idle backend connection is stale; discarding");
                    lent.give_back(false).await;
                    continue;
                }
                self.pool.reused.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("reusing an idle backend connection");
            }
            self.validity = lent.mailbox().validity();
            return Ok(lent);
        }
    }

    /// A connection on which the session's `StoreId`s name the messages
    /// listed at login. An idle connection whose view is older is reset
    /// first; if the mailbox's validity is no longer the listing's, the
    /// call fails (temporarily) and touches nothing.
    pub async fn borrow(&mut self) -> Result<Borrowed, BackendError> {
        loop {
            let mut lent = match self.take().await {
                // After login the credentials are the session's, not the
                // client's guess: a token that expired since is temporary.
                Err(BackendError::AuthFailed) => {
                    return Err(BackendError::unavailable(
                        "the backend no longer accepts the session's credentials; nothing was touched",
                    ));
                }
                other => other?,
            };
            if lent.mailbox().validity() == self.validity {
                return Ok(lent);
            }
            if lent.reused {
                if let Err(e) = lent.mailbox().reset().await {
                    tracing::debug!(error = %e, "idle backend connection is stale; discarding");
                    lent.give_back(false).await;
                    continue;
                }
                if lent.mailbox().validity() == self.validity {
                    return Ok(lent);
                }
            }
            tracing::warn!(
                listed = ?self.validity,
                now = ?lent.mailbox().validity(),
                "the mailbox's validity (IMAP UIDVALIDITY) changed since the listing; nothing touched"
            );
            // The connection is sound, only its view is not this session's.
            self.give_back(lent, true).await;
            return Err(BackendError::unavailable(
                "the mailbox changed since login (its UIDVALIDITY); nothing was touched, try again",
            ));
        }
    }

    /// Returns a connection after a call: kept if `healthy` (the call
    /// ended cleanly and left the connection ready for another), closed
    /// otherwise.
    pub async fn give_back(&mut self, lent: Borrowed, healthy: bool) {
        if healthy && !self.pool.config.enabled {
            self.pinned = Some(lent);
            return;
        }
        lent.give_back(healthy).await;
    }

    /// The session ends.
    pub async fn end(mut self) {
        if let Some(pinned) = self.pinned.take() {
            pinned.give_back(true).await;
        }
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

    /// One login's worth: a fresh connection, given back clean.
    async fn log_in(
        pool: &Arc<SessionPool>,
        backend: &SharedBackend,
        credentials: &Credentials,
    ) -> Result<bool, BackendError> {
        let mut session = pool.session(backend, credentials.clone());
        let lent = session.borrow_fresh().await?;
        let reused = lent.reused();
        session.give_back(lent, true).await;
        session.end().await;
        Ok(reused)
    }

    #[tokio::test]
    async fn reuses_only_for_the_same_credentials() {
        let (store, backend) = backend();
        let pool = SessionPool::new(PoolConfig::default());
        let alice = Credentials::password("alice", "pw");
        assert!(!log_in(&pool, &backend, &alice).await.unwrap());
        assert_eq!(store.logins(), 1);

        // Same user, same password: reused, and it sees mail that arrived meanwhile.
        store.append("alice", &b"Subject: new\r\n\r\nhi\r\n"[..]);
        let mut session = pool.session(&backend, alice.clone());
        let mut lent = session.borrow_fresh().await.unwrap();
        assert!(lent.reused());
        assert_eq!(store.logins(), 1, "no new backend login");
        assert_eq!(lent.mailbox().list().await.unwrap().len(), 1);
        session.give_back(lent, true).await;

        // Same user, another password: never the idle connection.
        let wrong = Credentials::password("alice", "not-pw");
        assert!(matches!(log_in(&pool, &backend, &wrong).await, Err(BackendError::AuthFailed)));
        assert_eq!(pool.idle_count(), 1);
        assert_eq!(pool.open_count(), 1, "a failed login leaves nothing counted");
        // Another user: a new login.
        log_in(&pool, &backend, &Credentials::password("bob", "pw2")).await.unwrap();
        assert_eq!(store.logins(), 2);
        assert_eq!((pool.logins(), pool.reused()), (2, 1));
    }

    #[tokio::test]
    async fn stale_connections_are_discarded_and_replaced() {
        let (store, backend) = backend();
        let pool = SessionPool::new(PoolConfig::default());
        let alice = Credentials::password("alice", "pw");
        log_in(&pool, &backend, &alice).await.unwrap();
        // The idle connection fails its reset: it is closed, a new login is made.
        store.fail_next_reset();
        let mut session = pool.session(&backend, alice);
        let lent = session.borrow_fresh().await.unwrap();
        assert!(!lent.reused());
        assert_eq!(store.logins(), 2);
        assert_eq!(pool.idle_count(), 0);
        assert_eq!(pool.open_count(), 1);
        // A call that failed gives its connection back closed.
        session.give_back(lent, false).await;
        assert_eq!((pool.idle_count(), pool.open_count()), (0, 0));
    }

    #[tokio::test]
    async fn bounded_and_expiring() {
        let (_store, backend) = backend();
        let pool = SessionPool::new(PoolConfig { max_per_account: 2, idle_secs: 1, ..PoolConfig::default() });
        let alice = Credentials::password("alice", "pw");
        let mut sessions = Vec::new();
        for _ in 0..3 {
            let mut session = pool.session(&backend, alice.clone());
            let lent = session.borrow_fresh().await.unwrap();
            sessions.push((session, lent));
        }
        for (mut session, lent) in sessions {
            session.give_back(lent, true).await;
        }
        assert_eq!(pool.idle_count(), 2, "at most max_per_account kept");
        assert_eq!(pool.open_count(), 2);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        pool.evict_expired().await;
        assert_eq!((pool.idle_count(), pool.open_count()), (0, 0));
        // A connection past its maximum age is not kept, however recently used.
        let aged = SessionPool::new(PoolConfig { max_age_secs: 1, ..PoolConfig::default() });
        assert!(!log_in(&aged, &backend, &alice).await.unwrap());
        assert_eq!(aged.idle_count(), 1);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(!log_in(&aged, &backend, &alice).await.unwrap(), "a connection past max_age_secs was reused");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        aged.evict_expired().await;
        assert_eq!((aged.idle_count(), aged.open_count()), (0, 0));
        // Disabled: a session keeps its own connection between calls and
        // closes it at its end.
        let disabled = SessionPool::new(PoolConfig { enabled: false, ..PoolConfig::default() });
        let mut session = disabled.session(&backend, alice.clone());
        let lent = session.borrow_fresh().await.unwrap();
        session.give_back(lent, true).await;
        let lent = session.borrow().await.unwrap();
        assert!(!lent.reused(), "the session's own connection, not an idle one");
        session.give_back(lent, true).await;
        assert_eq!(disabled.logins(), 1);
        session.end().await;
        assert_eq!((disabled.idle_count(), disabled.open_count()), (0, 0));
    }

    /// Many sessions of one account calling at once: every call is served,
    /// in turn, and the account never has more connections open than its
    /// cap (counted at every borrow).
    #[tokio::test]
    async fn the_cap_is_never_exceeded_and_every_call_is_served() {
        let (store, backend) = backend();
        for n in 0..3 {
            store.append("alice", format!("Subject: {n}\r\n\r\nhi\r\n").into_bytes());
        }
        let cap = 3;
        let pool = SessionPool::new(PoolConfig { max_connections_per_account: cap, ..PoolConfig::default() });
        let alice = Credentials::password("alice", "pw");
        let peak = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (pool, backend, alice, peak) = (pool.clone(), backend.clone(), alice.clone(), peak.clone());
            tasks.push(tokio::spawn(async move {
                let mut session = pool.session(&backend, alice);
                let mut lent = session.borrow_fresh().await?;
                peak.fetch_max(pool.open_count(), Ordering::SeqCst);
                let listed = lent.mailbox().list().await?;
                session.give_back(lent, true).await;
                for message in &listed {
                    let mut lent = session.borrow().await?;
                    peak.fetch_max(pool.open_count(), Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    drop(lent.mailbox().fetch(&message.id).await?);
                    session.give_back(lent, true).await;
                }
                session.end().await;
                Ok::<usize, BackendError>(listed.len())
            }));
        }
        for task in tasks {
            assert_eq!(task.await.unwrap().unwrap(), 3);
        }
        assert!(peak.load(Ordering::SeqCst) <= cap, "{} open, cap {cap}", peak.load(Ordering::SeqCst));
        assert!(store.logins() as usize <= cap + 50, "logins {}", store.logins());
        assert_eq!(pool.in_use_refusals(), 0);
    }

    /// A call that cannot get a connection within `wait_secs` is refused
    /// with `InUse`, and the refusal leaves nothing counted.
    #[tokio::test]
    async fn a_bounded_wait_then_in_use() {
        let (_store, backend) = backend();
        let pool =
            SessionPool::new(PoolConfig { max_connections_per_account: 1, wait_secs: 1, ..PoolConfig::default() });
        let alice = Credentials::password("alice", "pw");
        let mut holder = pool.session(&backend, alice.clone());
        let held = holder.borrow_fresh().await.unwrap();
        let mut other = pool.session(&backend, alice.clone());
        assert!(matches!(other.borrow_fresh().await, Err(BackendError::InUse(_))));
        assert_eq!(pool.in_use_refusals(), 1);
        holder.give_back(held, true).await;
        let lent = other.borrow_fresh().await.unwrap();
        assert!(lent.reused());
        other.give_back(lent, true).await;
        assert_eq!(pool.open_count(), 1);
    }

    /// Logins beyond `max_concurrent_logins` wait their turn, then are
    /// refused with `InUse`; a permit given back admits the next.
    #[tokio::test]
    async fn logins_are_admitted_in_bounded_number() {
        let pool = SessionPool::new(PoolConfig { max_concurrent_logins: 1, wait_secs: 1, ..PoolConfig::default() });
        let first = pool.admit_login().await.unwrap();
        assert!(matches!(pool.admit_login().await, Err(BackendError::InUse(_))));
        drop(first);
        let _second = pool.admit_login().await.unwrap();
        assert_eq!(pool.in_use_refusals(), 1);
    }

    /// A connection dropped without being given back (a cancelled call) is
    /// closed and stops counting.
    #[tokio::test]
    async fn a_dropped_connection_is_closed_and_uncounted() {
        let (_store, backend) = backend();
        let pool = SessionPool::new(PoolConfig::default());
        let mut session = pool.session(&backend, Credentials::password("alice", "pw"));
        let lent = session.borrow_fresh().await.unwrap();
        assert_eq!(pool.open_count(), 1);
        drop(lent);
        for _ in 0..100 {
            if pool.open_count() == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!((pool.open_count(), pool.idle_count()), (0, 0));
    }
}
