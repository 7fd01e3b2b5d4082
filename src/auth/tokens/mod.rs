//! OAuth tokens popgate holds for mapped accounts: what is stored, where
//! (`TokenStore`, by default an encrypted file), and the per-account
//! `TokenSource` that hands out access tokens and refreshes them.
//!
//! Never logs, formats or deletes a token: `StoredToken`'s Debug is
//! redacted, and nothing here removes an account's token — a refused
//! refresh or a device's wrong password leaves the store as it was.

mod file_store;
mod shared_store;
mod source;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use file_store::{EncryptedFileStore, StoreKey};
pub use shared_store::SharedTokenStore;
pub use source::{TokenSource, TokenSourceError, TokenSourceSettings};

use super::passwords::SecretSource;
use crate::mail::Secret;
use crate::state::StateConfig;

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs()
}

/// One account's tokens as stored.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredToken {
    pub access_token: Secret,
    /// Absent for the client-credentials grant (a new token is requested
    /// instead) and for providers that issue none.
    pub refresh_token: Option<Secret>,
    /// Unix seconds; `None` when the provider did not say (the token is then
    /// used until a backend refuses it).
    pub expires_at: Option<u64>,
    /// Unix seconds when it was issued to popgate.
    pub obtained_at: u64,
    /// The scopes granted, as the provider reported them.
    pub scope: Option<String>,
}

impl StoredToken {
    /// Seconds until expiry (negative once expired); `None` if unknown.
    pub fn remaining_secs(&self, now: u64) -> Option<i64> {
        self.expires_at.map(|at| at as i64 - now as i64)
    }

    pub fn is_expired(&self, now: u64) -> bool {
        self.remaining_secs(now).is_some_and(|r| r <= 0)
    }

    /// Expired, or expiring within `margin`.
    pub fn is_due(&self, now: u64, margin: Duration) -> bool {
        self.remaining_secs(now).is_some_and(|r| r <= margin.as_secs() as i64)
    }
}

impl fmt::Debug for StoredToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredToken")
            .field("access_token", &self.access_token)
            .field("refresh_token", &self.refresh_token.as_ref().map(|_| "<redacted>"))
            .field("expires_at", &self.expires_at)
            .field("obtained_at", &self.obtained_at)
            .field("scope", &self.scope)
            .finish()
    }
}

/// What happened to an account's token lately, as the process that
/// refreshes it saw it: kept beside the token (for the file store, in a
/// plain `NAME.notes` file — times only, nothing secret), so the admin
/// page and `oauth status` see what the refresher saw.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenNotes {
    /// Unix seconds of the last successful refresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refresh: Option<u64>,
    /// Unix seconds of the last refresh the provider answered
    /// `invalid_grant` (the refresh token is dead: only a sign-in helps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_invalid_grant: Option<u64>,
    /// Which refresh token that refusal was for (`fingerprint`), so a
    /// token stored since (a new sign-in) is not taken for the dead one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_refresh: Option<String>,
}

/// An event worth a note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenEvent {
    Refreshed,
    /// With the refused refresh token's `fingerprint`.
    InvalidGrant(Option<String>),
}

/// A short SHA-256 fingerprint of a token (16 hex digits: tells two tokens
/// apart, gives nothing away about either).
pub fn fingerprint(token: &Secret) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.expose().as_bytes());
    digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

impl TokenNotes {
    pub fn record(&mut self, event: TokenEvent, at: u64) {
        match event {
            TokenEvent::Refreshed => self.last_refresh = Some(at),
            TokenEvent::InvalidGrant(refused) => {
                self.last_invalid_grant = Some(at);
                self.refused_refresh = refused;
            }
        }
    }

    /// `token`'s refresh token is the one the provider refused: the
    /// account needs a sign-in (a new sign-in stores another one).
    pub fn needs_sign_in(&self, token: &StoredToken) -> bool {
        match (&self.refused_refresh, &token.refresh_token) {
            (Some(refused), Some(held)) => *refused == fingerprint(held),
            _ => false,
        }
    }
}

/// The stored form (inside the encryption).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRecord {
    access_token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at: Option<u64>,
    obtained_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scope: Option<String>,
}

impl From<&StoredToken> for TokenRecord {
    fn from(t: &StoredToken) -> Self {
        TokenRecord {
            access_token: t.access_token.expose().to_string(),
            refresh_token: t.refresh_token.as_ref().map(|r| r.expose().to_string()),
            expires_at: t.expires_at,
            obtained_at: t.obtained_at,
            scope: t.scope.clone(),
        }
    }
}

impl From<TokenRecord> for StoredToken {
    fn from(r: TokenRecord) -> Self {
        StoredToken {
            access_token: Secret::new(r.access_token),
            refresh_token: r.refresh_token.map(Secret::new),
            expires_at: r.expires_at,
            obtained_at: r.obtained_at,
            scope: r.scope,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("token store {path}: {source}")]
    Io { path: String, source: std::io::Error },
    /// Wrong key, or the file was damaged: it is left as it is.
    #[error("token store {0}: cannot decrypt it (wrong key, or the file is damaged); it is left untouched")]
    Decrypt(String),
    #[error("token store {path}: {why}")]
    Format { path: String, why: String },
    #[error("token store key: {0}")]
    Key(String),
    #[error("token store: {0}")]
    Other(String),
}

/// Where tokens live. One implementation per kind of store: the encrypted
/// file (default), or a store several replicas share (see docs/ACCOUNTS.md).
///
/// `save` must be atomic (a reader sees the old or the new token, never a
/// mix) and durable when it returns: a rotated refresh token is used only
/// after `save` succeeded.
///
/// A store several replicas share also versions each account's token and
/// hands out a refresh lock: the defaults below are those of a store one
/// process owns (version 0, the lock always granted), where the token
/// source's in-process lock is all the single-flight there is.
#[async_trait]
pub trait TokenStore: Send + Sync {
    async fn load(&self, account: &str) -> Result<Option<StoredToken>, StoreError>;
    async fn save(&self, account: &str, token: &StoredToken) -> Result<(), StoreError>;
    async fn load_all(&self) -> Result<BTreeMap<String, StoredToken>, StoreError>;

    /// The token and its version (0: the store has no versions).
    async fn load_versioned(&self, account: &str) -> Result<Option<(StoredToken, u64)>, StoreError> {
        Ok(self.load(account).await?.map(|token| (token, 0)))
    }

    /// Saves `token` only if the stored one is still at version `expected`
    /// (0: none): `Ok(Some(new version))`, or `Ok(None)` when someone stored
    /// a newer token meanwhile (which stays).
    async fn save_over(&self, account: &str, token: &StoredToken, expected: u64) -> Result<Option<u64>, StoreError> {
        let _ = expected;
        self.save(account, token).await.map(|()| Some(0))
    }

    /// The right to refresh `account`'s token, across every process that
    /// shares this store; `Ok(None)` while another holds it.
    async fn lock_refresh(&self, account: &str) -> Result<Option<RefreshLock>, StoreError> {
        let _ = account;
        Ok(Some(RefreshLock::default()))
    }

    /// Gives the right back (after the refreshed token is stored).
    async fn unlock_refresh(&self, lock: RefreshLock) {
        let _ = lock;
    }

    /// Notes `event` for `account` (see `TokenNotes`); a store that keeps no
    /// notes ignores it.
    async fn note(&self, account: &str, event: TokenEvent, at: u64) -> Result<(), StoreError> {
        let _ = (account, event, at);
        Ok(())
    }

    /// What was noted for `account`.
    async fn notes(&self, account: &str) -> Result<TokenNotes, StoreError> {
        let _ = account;
        Ok(TokenNotes::default())
    }

    /// How long a request waits for another process's refresh.
    fn refresh_wait(&self) -> Duration {
        Duration::ZERO
    }

    /// Tells every process sharing this store that refreshing `account`
    /// failed and must not be tried again for `wait` (a store one process
    /// owns has no one to tell: its token source remembers it itself).
    /// Best effort: a store that cannot take it leaves each process to its
    /// own backoff.
    async fn note_refresh_failure(&self, account: &str, wait: Duration) {
        let _ = (account, wait);
    }

    /// How long another process's failed refresh still asks `account` to
    /// wait, if at all.
    async fn refresh_backoff(&self, account: &str) -> Option<Duration> {
        let _ = account;
        None
    }
}

/// A held refresh lock; for a shared store, its key and fencing token.
#[derive(Debug, Default)]
pub struct RefreshLock {
    pub(crate) lease: Option<crate::state::Lease>,
}

/// The token store `[token_store]` and `[state]` describe: the shared one
/// when `[state] url` is set (seeded from the file, if any, on first use),
/// else the encrypted file.
pub fn open_store(config: &TokenStoreConfig, state: Option<&StateConfig>) -> Result<Arc<dyn TokenStore>, StoreError> {
    let file = config.open()?;
    match state {
        Some(state) if state.url.is_some() => {
            let shared = state.open().map_err(StoreError::Other)?.expect("a url is set");
            let source = config.key_source().map_err(|why| StoreError::Key(why.to_string()))?;
            let key = StoreKey::read(&source)?;
            Ok(Arc::new(SharedTokenStore::new(shared, key, state, Some(file))))
        }
        _ => {
            file.check_readable()?;
            Ok(Arc::new(file))
        }
    }
}

/// `[token_store]`: the encrypted token file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenStoreConfig {
    /// The encrypted file (created mode 0600 on first save).
    pub path: PathBuf,
    /// The 32-byte key, base64 or hex, in this environment variable…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_env: Option<String>,
    /// …or in this file (base64, hex, or 32 raw bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// This process refreshes tokens (true), or only reads what another
    /// replica refreshed and stored (false).
    #[serde(default = "yes")]
    pub refresh: bool,
}

fn yes() -> bool {
    true
}

impl TokenStoreConfig {
    pub fn key_source(&self) -> Result<SecretSource, &'static str> {
        SecretSource::from_keys(self.key_env.as_ref(), self.key_file.as_ref())?
            .ok_or("set key_env or key_file: the token store is always encrypted")
    }

    pub fn open(&self) -> Result<EncryptedFileStore, StoreError> {
        let source = self.key_source().map_err(|why| StoreError::Key(why.to_string()))?;
        let key = StoreKey::read(&source)?;
        Ok(EncryptedFileStore::new(self.path.clone(), key))
    }
}

/// Where a JSON answer is malformed, without serde's excerpt of the value
/// (which could be a token).
pub(crate) fn json_error(e: &serde_json::Error) -> String {
    format!("{:?} JSON error at line {} column {}", e.classify(), e.line(), e.column())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_do_not_print() {
        let t = StoredToken {
            access_token: Secret::new("ya29.secret-access"),
            refresh_token: Some(Secret::new("1//secret-refresh")),
            expires_at: Some(100),
            obtained_at: 40,
            scope: Some("https://mail.google.com/".into()),
        };
        let shown = format!("{t:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert_eq!(t.remaining_secs(90), Some(10));
        assert!(t.is_due(90, Duration::from_secs(10)));
        assert!(!t.is_due(89, Duration::from_secs(10)));
        assert!(!t.is_expired(99));
        assert!(t.is_expired(100));
    }

    #[test]
    fn an_invalid_grant_marks_only_the_refused_refresh_token() {
        let dead = StoredToken {
            access_token: Secret::new("a1"),
            refresh_token: Some(Secret::new("r1")),
            expires_at: Some(100),
            obtained_at: 40,
            scope: None,
        };
        let mut notes = TokenNotes::default();
        assert!(!notes.needs_sign_in(&dead));
        notes.record(TokenEvent::Refreshed, 50);
        notes.record(TokenEvent::InvalidGrant(dead.refresh_token.as_ref().map(fingerprint)), 60);
        assert_eq!((notes.last_refresh, notes.last_invalid_grant), (Some(50), Some(60)));
        assert!(notes.needs_sign_in(&dead));
        let signed_in_again = StoredToken { refresh_token: Some(Secret::new("r2")), obtained_at: 60, ..dead.clone() };
        assert!(!notes.needs_sign_in(&signed_in_again), "a new sign-in in the same second counts");
        assert_eq!(fingerprint(&Secret::new("r1")).len(), 16);
    }
}
