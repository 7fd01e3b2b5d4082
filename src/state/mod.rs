//! State shared between replicas, and the seam that keeps it optional.
//!
//! By default (`[state]` without a `url`) popgate is *embedded*: every part
//! keeps its state in its own process-local tables (the login throttle's
//! counters, the exact-size cache), exactly as a single replica always did,
//! and nothing needs installing. With `url = "redis://…"` those parts also
//! read and write a [`SharedState`] — Redis, Valkey or a managed Redis — so
//! that replicas count failed logins together and a size measured by one is
//! known to all.
//!
//! The shared store is an addition, never a dependency: every caller keeps
//! its local state too and falls back to it when the store fails, so Redis
//! being down makes popgate behave like independent replicas (logged, once
//! per outage), never refuse or lose anything. The store must never see a
//! secret in clear (no passwords, no tokens), and its URL is never logged
//! with a password (a password in the URL is refused; it comes from a file
//! or an environment variable).
//!
//! This module imports only `mail`: the server and auth use it; the
//! protocol core and the backends never do.

pub mod memory;
pub mod redis;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::mail::InvalidSetting;

/// A failure of the shared store; callers fall back to their local state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("shared state store unavailable: {0}")]
    Unavailable(String),
}

/// Numbers under string keys, each with an expiry, shared by every replica.
/// Keys are the caller's; the store puts its prefix in front. Every method
/// is bounded in time by the store's command timeout.
#[async_trait]
pub trait SharedState: Send + Sync {
    /// Adds one to each of `keys` (a missing key counts from zero) and
    /// (re)sets its expiry to `ttl`, atomically for all of them; returns the
    /// new counts in order. Parallel increments from any replica all count.
    async fn increment(&self, keys: &[String], ttl: Duration) -> Result<Vec<u64>, StateError>;
    /// Adds `n` to the number under `key` (a missing key counts from zero)
    /// and (re)sets its expiry to `ttl`, atomically; returns the new count.
    async fn add(&self, key: &str, n: u64, ttl: Duration) -> Result<u64, StateError> {
        let keys = vec![key.to_string(); n.clamp(1, 1_000) as usize];
        Ok(self.increment(&keys, ttl).await?.last().copied().unwrap_or(0))
    }
    /// The numbers under `keys`, in order (`None`: missing or expired).
    async fn get(&self, keys: &[String]) -> Result<Vec<Option<u64>>, StateError>;
    /// Sets each `(key, value)`, each expiring after `ttl`.
    async fn set(&self, entries: &[(String, u64)], ttl: Duration) -> Result<(), StateError>;
    /// Forgets `keys`.
    async fn remove(&self, keys: &[String]) -> Result<(), StateError>;

    /// The record under `key` and its version (`None`: never written).
    /// Records do not expire: they hold what must not be lost (tokens).
    async fn read_record(&self, key: &str) -> Result<Option<Versioned>, StateError>;
    /// Compare-and-set: writes `bytes` as the next version only if the
    /// record is still at version `expected` (0: absent). `Ok(None)` when
    /// someone wrote it since, which is then left as it is: a writer that
    /// read an old version can never overwrite a newer one.
    async fn write_record(&self, key: &str, expected: u64, bytes: &[u8]) -> Result<Option<u64>, StateError>;
    /// The keys of the records whose keys start with `prefix`, without the
    /// store's own prefix; at most `limit` of them.
    async fn record_keys(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StateError>;

    /// Takes the lock `key` for at most `ttl` unless someone holds it
    /// (`Ok(None)`). The lease carries a fencing token that grows with each
    /// taking, so a holder whose lease expired can never release a later
    /// holder's lock.
    async fn try_lock(&self, key: &str, ttl: Duration) -> Result<Option<Lease>, StateError>;
    /// Releases the lock if `lease` still holds it (compare-and-delete);
    /// false if it had expired or was taken by another.
    async fn unlock(&self, lease: &Lease) -> Result<bool, StateError>;

    /// Whether the last command reached the store (for `popgate_state_up`).
    fn is_up(&self) -> bool {
        true
    }
}

/// A record as stored: its bytes and the version they were written as.
#[derive(Clone, PartialEq, Eq)]
pub struct Versioned {
    pub version: u64,
    pub bytes: Vec<u8>,
}

/// A held lock: its key and fencing token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub key: String,
    pub fence: u64,
}

/// `[state]`: where state shared between replicas lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// `redis://host:port/db` or `rediss://host:port/db` (TLS); a user name
    /// may be given (`redis://user@host/0`), a password never: see
    /// `password_file` / `password_env`. None: embedded (process-local).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// A file holding the Redis password (ACL or `requirepass`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// An environment variable holding the Redis password.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// Put in front of every key, so that several deployments can share
    /// one Redis database.
    pub key_prefix: String,
    /// How long connecting may take, in milliseconds.
    pub connect_timeout_ms: u64,
    /// How long one command may take, in milliseconds; a login never waits
    /// longer than this for the store before using local state.
    pub command_timeout_ms: u64,
    /// After a failure, seconds during which the store is not asked again
    /// (local state only), so that an outage does not slow every login.
    pub retry_after_secs: u64,
    /// How long a shared exact size is kept without being read again.
    pub size_ttl_secs: u64,
    /// How long a replica's lock on an OAuth token refresh lasts if it is
    /// not released (the refresher died): longer than a token request.
    pub token_lock_secs: u64,
    /// How long a login waits for another replica's refresh (or for the
    /// store to come back) before answering `-ERR [SYS/TEMP]`.
    pub token_wait_ms: u64,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            url: None,
            password_file: None,
            password_env: None,
            key_prefix: "popgate:".into(),
            connect_timeout_ms: 2_000,
            command_timeout_ms: 500,
            retry_after_secs: 5,
            size_ttl_secs: 7 * 86_400,
            token_lock_secs: 60,
            token_wait_ms: 10_000,
        }
    }
}

impl StateConfig {
    /// What serde cannot check; keys relative to `[state]`.
    pub fn check(&self) -> Result<(), InvalidSetting> {
        InvalidSetting::bounded("connect_timeout_ms", self.connect_timeout_ms, 10..=60_000)?;
        InvalidSetting::bounded("command_timeout_ms", self.command_timeout_ms, 10..=60_000)?;
        InvalidSetting::bounded("retry_after_secs", self.retry_after_secs, 0..=3_600)?;
        InvalidSetting::bounded("size_ttl_secs", self.size_ttl_secs, 60..=90 * 86_400)?;
        InvalidSetting::bounded("key_prefix", self.key_prefix.len(), 0..=64)?;
        InvalidSetting::bounded("token_lock_secs", self.token_lock_secs, 5..=3_600)?;
        InvalidSetting::bounded("token_wait_ms", self.token_wait_ms, 100..=120_000)?;
        if self.key_prefix.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err(InvalidSetting::new("key_prefix", "printable ASCII only, no spaces"));
        }
        if self.password_file.is_some() && self.password_env.is_some() {
            return Err(InvalidSetting::new("password_env", "set either password_env or password_file, not both"));
        }
        if self.password_env.as_ref().is_some_and(|v| v.is_empty()) {
            return Err(InvalidSetting::new("password_env", "the environment variable name is empty"));
        }
        match &self.url {
            Some(url) => redis::RedisTarget::parse(url).map(drop).map_err(|why| InvalidSetting::new("url", why)),
            None if self.password_file.is_some() || self.password_env.is_some() => {
                Err(InvalidSetting::new("url", "a password is set but no url: set url = \"redis://host:port/0\""))
            }
            None => Ok(()),
        }
    }

    /// The password, read now (`check-config` and start-up).
    pub fn password(&self) -> Result<Option<crate::mail::Secret>, String> {
        if let Some(var) = &self.password_env {
            let value = std::env::var(var).map_err(|_| format!("environment variable {var} is not set"))?;
            if value.is_empty() {
                return Err(format!("environment variable {var} is empty"));
            }
            return Ok(Some(crate::mail::Secret::new(value)));
        }
        if let Some(path) = &self.password_file {
            let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let value = text.trim_end_matches(['\r', '\n']);
            if value.is_empty() {
                return Err(format!("{} is empty", path.display()));
            }
            return Ok(Some(crate::mail::Secret::new(value)));
        }
        Ok(None)
    }

    /// The shared store, if one is configured (not yet connected: it
    /// connects on first use, so popgate starts while Redis is down).
    ///
    /// One store per configuration and process: the server's throttle and
    /// sizes and the accounts' tokens share its connection, and an outage
    /// is logged once, not once per user of the store.
    pub fn open(&self) -> Result<Option<Arc<dyn SharedState>>, String> {
        type Opened = Vec<(StateConfig, std::sync::Weak<redis::RedisState>)>;
        static OPENED: std::sync::Mutex<Opened> = std::sync::Mutex::new(Vec::new());
        let Some(url) = &self.url else { return Ok(None) };
        let mut opened = OPENED.lock().unwrap_or_else(|p| p.into_inner());
        opened.retain(|(_, store)| store.strong_count() > 0);
        if let Some(store) = opened.iter().find(|(config, _)| config == self).and_then(|(_, s)| s.upgrade()) {
            return Ok(Some(store));
        }
        let password = self.password()?;
        let store = Arc::new(redis::RedisState::new(url, password, self)?);
        tracing::info!(store = %store.target(), "state shared through Redis");
        opened.push((self.clone(), Arc::downgrade(&store)));
        Ok(Some(store))
    }

    fn command_timeout(&self) -> Duration {
        Duration::from_millis(self.command_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_url(url: &str) -> StateConfig {
        StateConfig { url: Some(url.into()), ..Default::default() }
    }

    #[test]
    fn urls_are_checked_and_passwords_in_them_refused() {
        StateConfig::default().check().unwrap();
        with_url("redis://127.0.0.1:6379/0").check().unwrap();
        with_url("rediss://cache.example:6380/2").check().unwrap();
        with_url("redis://popgate@cache.example/1").check().unwrap();
        let e = with_url("redis://:hunter2@cache.example/0").check().unwrap_err().to_string();
        assert!(e.contains("password_file") && !e.contains("hunter2"), "{e}");
        let e = with_url("redis://user:hunter2@cache.example/0").check().unwrap_err().to_string();
        assert!(!e.contains("hunter2"), "{e}");
        assert!(with_url("http://cache.example/0").check().unwrap_err().to_string().contains("redis://"));
        assert!(with_url("redis://cache.example/x").check().is_err());
        assert!(with_url("redis:///tmp/socket").check().is_err());
        let e = StateConfig { password_env: Some("X".into()), ..Default::default() }.check().unwrap_err();
        assert!(e.to_string().contains("url"), "{e}");
        let e = StateConfig { command_timeout_ms: 0, ..with_url("redis://h/0") }.check().unwrap_err();
        assert!(e.to_string().contains("command_timeout_ms"), "{e}");
        let e = StateConfig { key_prefix: "a b".into(), ..with_url("redis://h/0") }.check().unwrap_err();
        assert!(e.to_string().contains("key_prefix"), "{e}");
    }
}
