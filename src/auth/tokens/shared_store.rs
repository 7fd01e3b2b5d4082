//! The token store replicas share (`[state] url`): each account's token is
//! one versioned record in the shared state store, sealed with the token
//! store's key (AES-256-GCM, the account name bound in as associated data,
//! so the store only ever holds ciphertext and a record cannot be replayed
//! under another account).
//!
//! A refresh happens under a lock in the store (`SET NX PX`, fenced, with
//! an expiry in case the refresher dies), and its result is written with
//! compare-and-set on the version the refresher read: a writer that raced
//! and lost never overwrites a newer token, so no rotation is lost.
//!
//! On first use, an account missing from the shared store is taken from
//! the encrypted file (the embedded store a deployment grows out of).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{
    EncryptedFileStore, RefreshLock, StoreError, StoreKey, StoredToken, TokenEvent, TokenNotes, TokenRecord, TokenStore,
};
use crate::state::{SharedState, StateConfig, StateError};

const RECORD_PREFIX: &str = "token:";
const LOCK_PREFIX: &str = "token-refresh:";
/// Until when (Unix milliseconds) a failed refresh asks every replica not
/// to call the token endpoint; the key expires with it.
const BACKOFF_PREFIX: &str = "token-backoff:";
/// An account's `TokenNotes` (plain JSON: times only).
const NOTES_PREFIX: &str = "token-notes:";
const AAD_PREFIX: &[u8] = b"popgate-token\x00v1\x00";
/// `popgate oauth status` lists at most this many accounts.
const MAX_ACCOUNTS: usize = 100_000;
/// An unconditional save (`popgate oauth login`) retries a lost race this
/// often before giving up.
const SAVE_ATTEMPTS: usize = 5;

pub struct SharedTokenStore {
    shared: Arc<dyn SharedState>,
    key: StoreKey,
    lock_ttl: Duration,
    wait: Duration,
    seed: Option<EncryptedFileStore>,
}

/// Keys carry the account's length first, so no name can run into another.
fn record_key(account: &str) -> String {
    format!("{RECORD_PREFIX}{}:{account}", account.len())
}

fn account_of(key: &str) -> Option<&str> {
    let (length, account) = key.strip_prefix(RECORD_PREFIX)?.split_once(':')?;
    (length.parse::<usize>().ok()? == account.len()).then_some(account)
}

fn unavailable(e: StateError) -> StoreError {
    StoreError::Other(e.to_string())
}

impl SharedTokenStore {
    pub fn new(
        shared: Arc<dyn SharedState>,
        key: StoreKey,
        config: &StateConfig,
        seed: Option<EncryptedFileStore>,
    ) -> Self {
        SharedTokenStore {
            shared,
            key,
            lock_ttl: Duration::from_secs(config.token_lock_secs),
            wait: Duration::from_millis(config.token_wait_ms),
            seed,
        }
    }

    fn aad(account: &str) -> Vec<u8> {
        [AAD_PREFIX, account.as_bytes()].concat()
    }

    fn seal(&self, account: &str, token: &StoredToken) -> Result<Vec<u8>, StoreError> {
        let plain = serde_json::to_vec(&TokenRecord::from(token)).map_err(|e| StoreError::Other(e.to_string()))?;
        self.key.seal(&Self::aad(account), plain)
    }

    fn open(&self, account: &str, sealed: &[u8]) -> Result<StoredToken, StoreError> {
        let shown = format!("shared record of account {account}");
        let plain = self.key.open(&Self::aad(account), sealed).ok_or_else(|| StoreError::Decrypt(shown.clone()))?;
        let record: TokenRecord = serde_json::from_slice(&plain)
            .map_err(|e| StoreError::Format { path: shown, why: super::json_error(&e) })?;
        Ok(record.into())
    }

    /// The account's token from the file, written into the shared store if
    /// that still has none (a concurrent import by another replica wins).
    async fn import(&self, account: &str) -> Result<Option<(StoredToken, u64)>, StoreError> {
        let Some(file) = &self.seed else { return Ok(None) };
        let Some(token) = file.load(account).await.ok().flatten() else { return Ok(None) };
        let sealed = self.seal(account, &token)?;
        match self.shared.write_record(&record_key(account), 0, &sealed).await.map_err(unavailable)? {
            Some(version) => {
                tracing::info!(account = %account, "token taken from the token file into the shared state store");
                Ok(Some((token, version)))
            }
            None => self.read(account).await,
        }
    }

    async fn read(&self, account: &str) -> Result<Option<(StoredToken, u64)>, StoreError> {
        match self.shared.read_record(&record_key(account)).await.map_err(unavailable)? {
            Some(record) => Ok(Some((self.open(account, &record.bytes)?, record.version))),
            None => Ok(None),
        }
    }
}

#[async_trait]
impl TokenStore for SharedTokenStore {
    async fn load(&self, account: &str) -> Result<Option<StoredToken>, StoreError> {
        Ok(self.load_versioned(account).await?.map(|(token, _)| token))
    }

    async fn save(&self, account: &str, token: &StoredToken) -> Result<(), StoreError> {
        for _attempt in 0..SAVE_ATTEMPTS {
            let version = self.read(account).await?.map_or(0, |(_, v)| v);
            if self.save_over(account, token, version).await?.is_some() {
                return Ok(());
            }
        }
        Err(StoreError::Other(format!("account {account}: the token kept changing while it was being stored")))
    }

    async fn load_all(&self) -> Result<BTreeMap<String, StoredToken>, StoreError> {
        let keys = self.shared.record_keys(RECORD_PREFIX, MAX_ACCOUNTS).await.map_err(unavailable)?;
        let mut all = BTreeMap::new();
        for account in keys.iter().filter_map(|k| account_of(k)) {
            if let Some((token, _)) = self.read(account).await? {
                all.insert(account.to_string(), token);
            }
        }
        if let Some(file) = &self.seed
            && let Ok(tokens) = file.load_all().await
        {
            for (account, token) in tokens {
                all.entry(account).or_insert(token);
            }
        }
        Ok(all)
    }

    async fn load_versioned(&self, account: &str) -> Result<Option<(StoredToken, u64)>, StoreError> {
        match self.read(account).await? {
            Some(found) => Ok(Some(found)),
            None => self.import(account).await,
        }
    }

    async fn save_over(&self, account: &str, token: &StoredToken, expected: u64) -> Result<Option<u64>, StoreError> {
        let sealed = self.seal(account, token)?;
        self.shared.write_record(&record_key(account), expected, &sealed).await.map_err(unavailable)
    }

    async fn lock_refresh(&self, account: &str) -> Result<Option<RefreshLock>, StoreError> {
        let key = format!("{LOCK_PREFIX}{}:{account}", account.len());
        let lease = self.shared.try_lock(&key, self.lock_ttl).await.map_err(unavailable)?;
        Ok(lease.map(|lease| RefreshLock { lease: Some(lease) }))
    }

    async fn unlock_refresh(&self, lock: RefreshLock) {
        if let Some(lease) = &lock.lease
            && let Ok(false) = self.shared.unlock(lease).await
        {
            tracing::warn!(
                "a token refresh lock had expired before its refresh was stored (state.token_lock_secs too short?)"
            );
        }
    }

    fn refresh_wait(&self) -> Duration {
        self.wait
    }

    async fn note(&self, account: &str, event: TokenEvent, at: u64) -> Result<(), StoreError> {
        let key = format!("{NOTES_PREFIX}{}:{account}", account.len());
        for _attempt in 0..SAVE_ATTEMPTS {
            let found = self.shared.read_record(&key).await.map_err(unavailable)?;
            let (mut notes, version) = match found {
                Some(record) => (serde_json::from_slice(&record.bytes).unwrap_or_default(), record.version),
                None => (TokenNotes::default(), 0),
            };
            notes.record(event.clone(), at);
            let bytes = serde_json::to_vec(&notes).map_err(|e| StoreError::Other(e.to_string()))?;
            if self.shared.write_record(&key, version, &bytes).await.map_err(unavailable)?.is_some() {
                return Ok(());
            }
        }
        Ok(())
    }

    async fn notes(&self, account: &str) -> Result<TokenNotes, StoreError> {
        let key = format!("{NOTES_PREFIX}{}:{account}", account.len());
        match self.shared.read_record(&key).await.map_err(unavailable)? {
            Some(record) => Ok(serde_json::from_slice(&record.bytes).unwrap_or_default()),
            None => Ok(TokenNotes::default()),
        }
    }

    async fn note_refresh_failure(&self, account: &str, wait: Duration) {
        let until = now_millis().saturating_add(wait.as_millis() as u64);
        let key = format!("{BACKOFF_PREFIX}{}:{account}", account.len());
        if let Err(e) = self.shared.set(&[(key, until)], wait.max(Duration::from_millis(1))).await {
            tracing::debug!(account = %account, error = %e, "refresh backoff not shared");
        }
    }

    async fn refresh_backoff(&self, account: &str) -> Option<Duration> {
        let key = format!("{BACKOFF_PREFIX}{}:{account}", account.len());
        let until = self.shared.get(&[key]).await.ok()?.into_iter().next()??;
        let left = until.checked_sub(now_millis()).filter(|left| *left > 0)?;
        Some(Duration::from_millis(left))
    }
}

fn now_millis() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mail::Secret;
    use crate::state::memory::MemoryState;

    fn token(access: &str) -> StoredToken {
        StoredToken {
            access_token: Secret::new(access),
            refresh_token: Some(Secret::new(format!("refresh-of-{access}"))),
            expires_at: Some(2_000_000_000),
            obtained_at: 1_900_000_000,
            scope: None,
        }
    }

    fn store(shared: Arc<dyn SharedState>, key_text: &str) -> SharedTokenStore {
        SharedTokenStore::new(shared, StoreKey::from_text(key_text).unwrap(), &StateConfig::default(), None)
    }

    #[tokio::test]
    async fn only_ciphertext_is_shared_and_stale_writers_lose() {
        let shared: Arc<dyn SharedState> = Arc::new(MemoryState::new(10));
        let key = StoreKey::generate_text();
        let (a, b) = (store(shared.clone(), &key), store(shared.clone(), &key));
        a.save("scans", &token("ACCESS-1")).await.unwrap();
        let record = shared.read_record(&record_key("scans")).await.unwrap().unwrap();
        for clear in [&b"ACCESS"[..], b"refresh", b"scans"] {
            assert!(!record.bytes.windows(clear.len()).any(|w| w == clear), "{clear:?} in clear");
        }
        let (seen, version) = b.load_versioned("scans").await.unwrap().unwrap();
        assert_eq!(seen, token("ACCESS-1"));
        // A writes a rotation; B, which read the older version, cannot
        // overwrite it.
        assert!(a.save_over("scans", &token("ACCESS-2"), version).await.unwrap().is_some());
        assert_eq!(b.save_over("scans", &token("ACCESS-STALE"), version).await.unwrap(), None);
        assert_eq!(b.load("scans").await.unwrap(), Some(token("ACCESS-2")));
        // Bound to the account: a record moved under another name is refused.
        shared.write_record(&record_key("other"), 0, &record.bytes).await.unwrap();
        assert!(matches!(b.load("other").await, Err(StoreError::Decrypt(_))));
        // Another key reads nothing.
        let wrong = store(shared.clone(), &StoreKey::generate_text());
        assert!(matches!(wrong.load("scans").await, Err(StoreError::Decrypt(_))));
        assert_eq!(account_of(&record_key("a:b")), Some("a:b"));
    }

    #[tokio::test]
    async fn one_refresh_lock_at_a_time() {
        let shared: Arc<dyn SharedState> = Arc::new(MemoryState::new(10));
        let key = StoreKey::generate_text();
        let (a, b) = (store(shared.clone(), &key), store(shared.clone(), &key));
        let held = a.lock_refresh("scans").await.unwrap().unwrap();
        assert!(b.lock_refresh("scans").await.unwrap().is_none());
        assert!(b.lock_refresh("other").await.unwrap().is_some());
        a.unlock_refresh(held).await;
        assert!(b.lock_refresh("scans").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn the_token_file_seeds_the_shared_store_once() {
        let dir = tempfile::tempdir().unwrap();
        let key = StoreKey::generate_text();
        let file = EncryptedFileStore::new(dir.path().join("t.enc"), StoreKey::from_text(&key).unwrap());
        file.save("scans", &token("FROM-FILE")).await.unwrap();
        let shared: Arc<dyn SharedState> = Arc::new(MemoryState::new(10));
        let store = SharedTokenStore::new(
            shared.clone(),
            StoreKey::from_text(&key).unwrap(),
            &StateConfig::default(),
            Some(file.clone()),
        );
        assert_eq!(store.load_versioned("scans").await.unwrap().unwrap().1, 1);
        store.save("scans", &token("ROTATED")).await.unwrap();
        // The file is not read again once the shared store has the account.
        assert_eq!(store.load("scans").await.unwrap(), Some(token("ROTATED")));
        assert_eq!(store.load_all().await.unwrap().len(), 1);
    }
}
