//! The default token store: one file, AES-256-GCM encrypted (ring), mode
//! 0600, replaced atomically (temporary file, fsync, rename, fsync of the
//! directory) under an advisory lock, so `popgate oauth login` and a running
//! gateway may both write it.
//!
//! Layout: `MAGIC`, a 12-byte random nonce, then the sealed JSON
//! `{"version":1,"accounts":{NAME: record}}` with its 16-byte tag. The magic
//! is the associated data. Never writes over a file it could not decrypt.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use base64::Engine as _;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use super::{StoreError, StoredToken, TokenEvent, TokenNotes, TokenRecord, TokenStore};
use crate::auth::passwords::SecretSource;

const MAGIC: &[u8] = b"popgate-tokens\x00v1\x00";
/// The notes file is refused beyond this size.
const MAX_NOTES_BYTES: usize = 1024 * 1024;
/// Accounts the notes file keeps.
const MAX_NOTED_ACCOUNTS: usize = 10_000;

/// The store's 32-byte key. Never printed.
pub struct StoreKey(LessSafeKey);

impl StoreKey {
    /// Base64 (standard or URL-safe, padded or not) or hex text for 32 bytes.
    pub fn from_text(text: &str) -> Result<StoreKey, StoreError> {
        let text = text.trim();
        let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            (0..32).map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).expect("hex")).collect()
        } else {
            let engines = [
                &base64::engine::general_purpose::STANDARD,
                &base64::engine::general_purpose::STANDARD_NO_PAD,
                &base64::engine::general_purpose::URL_SAFE,
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            ];
            engines
                .iter()
                .find_map(|e| e.decode(text).ok())
                .ok_or_else(|| StoreError::Key("not base64 or hex (`popgate oauth keygen FILE` makes one)".into()))?
        };
        StoreKey::from_bytes(&bytes)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<StoreKey, StoreError> {
        if bytes.len() != 32 {
            return Err(StoreError::Key(format!("must be 32 bytes, got {}", bytes.len())));
        }
        let key =
            UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| StoreError::Key("rejected by AES-256-GCM".into()))?;
        Ok(StoreKey(LessSafeKey::new(key)))
    }

    /// From the configured environment variable or key file. A key file
    /// others can read is refused: it would expose every token.
    pub fn read(source: &SecretSource) -> Result<StoreKey, StoreError> {
        if let SecretSource::File(path) = source {
            let shown = path.display().to_string();
            let meta = fs::metadata(path).map_err(|source| StoreError::Io { path: shown.clone(), source })?;
            if meta.permissions().mode() & 0o077 != 0 {
                return Err(StoreError::Key(format!("{shown} is readable by group or others: chmod 600 it")));
            }
            let bytes = fs::read(path).map_err(|source| StoreError::Io { path: shown.clone(), source })?;
            if bytes.len() == 32 && std::str::from_utf8(&bytes).map_or(true, |t| StoreKey::from_text(t).is_err()) {
                return StoreKey::from_bytes(&bytes);
            }
            let text = String::from_utf8(bytes).map_err(|_| StoreError::Key(format!("{shown} is not a key")))?;
            return StoreKey::from_text(&text).map_err(|e| StoreError::Key(format!("{shown}: {e}")));
        }
        let secret = source.read().map_err(|e| StoreError::Key(e.to_string()))?;
        StoreKey::from_text(secret.expose()).map_err(|e| StoreError::Key(format!("{}: {e}", source.describe())))
    }

    /// `plain` encrypted and authenticated with `aad`: a random nonce, then
    /// the ciphertext with its tag.
    pub(super) fn seal(&self, aad: &[u8], mut plain: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).map_err(|_| StoreError::Other("no system randomness".into()))?;
        self.0
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut plain)
            .map_err(|_| StoreError::Other("encryption failed".into()))?;
        let mut out = Vec::with_capacity(NONCE_LEN + plain.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&plain);
        Ok(out)
    }

    /// What [`Self::seal`] sealed with the same `aad`; `None` if the key,
    /// the associated data or the bytes differ.
    pub(super) fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return None;
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buffer = ciphertext.to_vec();
        let plain = self.0.open_in_place(nonce, Aad::from(aad), &mut buffer).ok()?;
        Some(plain.to_vec())
    }

    /// A new random key as base64 text (what `popgate oauth keygen` writes).
    pub fn generate_text() -> String {
        let mut bytes = [0u8; 32];
        SystemRandom::new().fill(&mut bytes).expect("system randomness");
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }
}

impl std::fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreKey(<redacted>)")
    }
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Contents {
    version: u32,
    accounts: BTreeMap<String, TokenRecord>,
}

/// The encrypted token file.
#[derive(Clone)]
pub struct EncryptedFileStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    key: StoreKey,
}

impl EncryptedFileStore {
    pub fn new(path: PathBuf, key: StoreKey) -> Self {
        EncryptedFileStore { inner: Arc::new(Inner { path, key }) }
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Reads and decrypts the file now (a missing file is fine): a wrong key
    /// or a damaged file stops startup instead of every device's login.
    pub fn check_readable(&self) -> Result<usize, StoreError> {
        Ok(self.inner.read()?.accounts.len())
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Other(format!("store task failed: {e}")))?
    }
}

impl Inner {
    fn shown(&self) -> String {
        self.path.display().to_string()
    }

    fn io(&self, source: std::io::Error) -> StoreError {
        StoreError::Io { path: self.shown(), source }
    }

    /// The whole store; empty if the file does not exist yet.
    fn read(&self) -> Result<Contents, StoreError> {
        let sealed = match fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Contents { version: 1, ..Default::default() });
            }
            Err(e) => return Err(self.io(e)),
        };
        let Some(rest) = sealed.strip_prefix(MAGIC) else {
            return Err(StoreError::Format { path: self.shown(), why: "not a popgate token store".into() });
        };
        if rest.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(StoreError::Decrypt(self.shown()));
        }
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| StoreError::Decrypt(self.shown()))?;
        let mut buffer = ciphertext.to_vec();
        let plain = self
            .key
            .0
            .open_in_place(nonce, Aad::from(MAGIC), &mut buffer)
            .map_err(|_| StoreError::Decrypt(self.shown()))?;
        let contents: Contents = serde_json::from_slice(plain).map_err(|e| StoreError::Format {
            path: self.shown(),
            why: format!("damaged contents: {}", super::json_error(&e)),
        })?;
        if contents.version != 1 {
            return Err(StoreError::Format {
                path: self.shown(),
                why: format!("unknown version {}", contents.version),
            });
        }
        Ok(contents)
    }

    fn seal(&self, contents: &Contents) -> Result<Vec<u8>, StoreError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).map_err(|_| StoreError::Other("no system randomness".into()))?;
        let mut buffer = serde_json::to_vec(contents).map_err(|e| StoreError::Other(e.to_string()))?;
        self.key
            .0
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(MAGIC), &mut buffer)
            .map_err(|_| StoreError::Other("encryption failed".into()))?;
        let mut out = Vec::with_capacity(MAGIC.len() + NONCE_LEN + buffer.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buffer);
        Ok(out)
    }

    /// Read, change one account, write back — under the lock, so two
    /// writers (a gateway and `popgate oauth login`) never lose each
    /// other's update.
    fn update(&self, account: &str, token: &StoredToken) -> Result<(), StoreError> {
        let _lock = self.lock()?;
        let mut contents = self.read()?;
        contents.version = 1;
        contents.accounts.insert(account.to_string(), TokenRecord::from(token));
        let sealed = self.seal(&contents)?;
        self.replace(&sealed)
    }

    fn lock(&self) -> Result<fs::File, StoreError> {
        let mut name = self.path.file_name().unwrap_or_default().to_os_string();
        name.push(".lock");
        let path = self.path.with_file_name(name);
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| StoreError::Io { path: path.display().to_string(), source })?;
        file.lock().map_err(|source| StoreError::Io { path: path.display().to_string(), source })?;
        Ok(file)
    }

    /// The notes file beside the store: `NAME.notes`, plain JSON (times
    /// only, nothing secret).
    fn notes_path(&self) -> PathBuf {
        let mut name = self.path.file_name().unwrap_or_default().to_os_string();
        name.push(".notes");
        self.path.with_file_name(name)
    }

    fn read_notes(&self) -> Result<BTreeMap<String, TokenNotes>, StoreError> {
        let path = self.notes_path();
        match fs::read(&path) {
            Ok(bytes) if bytes.len() <= MAX_NOTES_BYTES => serde_json::from_slice(&bytes)
                .map_err(|e| StoreError::Format { path: path.display().to_string(), why: super::json_error(&e) }),
            Ok(_) => Err(StoreError::Format { path: path.display().to_string(), why: "too large".into() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(source) => Err(StoreError::Io { path: path.display().to_string(), source }),
        }
    }

    /// Records `event` for `account` under the store's lock; notes of
    /// accounts beyond `MAX_NOTED_ACCOUNTS` are not kept.
    fn note(&self, account: &str, event: TokenEvent, at: u64) -> Result<(), StoreError> {
        let _lock = self.lock()?;
        let mut notes = self.read_notes().unwrap_or_default();
        if !notes.contains_key(account) && notes.len() >= MAX_NOTED_ACCOUNTS {
            return Ok(());
        }
        notes.entry(account.to_string()).or_default().record(event, at);
        let text = serde_json::to_vec_pretty(&notes).map_err(|e| StoreError::Other(e.to_string()))?;
        let path = self.notes_path();
        let temp = path.with_extension(format!("notes.tmp-{}", std::process::id()));
        let written = (|| {
            let mut file = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&temp)?;
            file.write_all(&text)?;
            file.sync_all()?;
            fs::rename(&temp, &path)
        })();
        written.map_err(|source| StoreError::Io { path: path.display().to_string(), source })
    }

    /// Temporary file (0600) in the same directory, fsync, rename over the
    /// store, fsync the directory: after a crash the store is the old or
    /// the new one, whole.
    fn replace(&self, sealed: &[u8]) -> Result<(), StoreError> {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut suffix = [0u8; 8];
        SystemRandom::new().fill(&mut suffix).map_err(|_| StoreError::Other("no system randomness".into()))?;
        let mut name = std::ffi::OsString::from(".");
        name.push(self.path.file_name().unwrap_or_default());
        name.push(format!(".tmp-{}-{:016x}", std::process::id(), u64::from_le_bytes(suffix)));
        let temp = dir.join(name);
        let written = (|| {
            let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temp)?;
            file.write_all(sealed)?;
            file.sync_all()?;
            drop(file);
            fs::rename(&temp, &self.path)?;
            fs::File::open(&dir)?.sync_all()
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&temp);
            return Err(self.io(e));
        }
        Ok(())
    }
}

#[async_trait]
impl TokenStore for EncryptedFileStore {
    async fn load(&self, account: &str) -> Result<Option<StoredToken>, StoreError> {
        let account = account.to_string();
        self.blocking(move |inner| Ok(inner.read()?.accounts.remove(&account).map(StoredToken::from))).await
    }

    async fn save(&self, account: &str, token: &StoredToken) -> Result<(), StoreError> {
        let (account, token) = (account.to_string(), token.clone());
        self.blocking(move |inner| inner.update(&account, &token)).await
    }

    async fn load_all(&self) -> Result<BTreeMap<String, StoredToken>, StoreError> {
        self.blocking(|inner| Ok(inner.read()?.accounts.into_iter().map(|(k, v)| (k, StoredToken::from(v))).collect()))
            .await
    }

    async fn note(&self, account: &str, event: TokenEvent, at: u64) -> Result<(), StoreError> {
        let account = account.to_string();
        self.blocking(move |inner| inner.note(&account, event, at)).await
    }

    async fn notes(&self, account: &str) -> Result<TokenNotes, StoreError> {
        let account = account.to_string();
        self.blocking(move |inner| Ok(inner.read_notes()?.remove(&account).unwrap_or_default())).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mail::Secret;

    fn token(access: &str, refresh: &str) -> StoredToken {
        StoredToken {
            access_token: Secret::new(access),
            refresh_token: Some(Secret::new(refresh)),
            expires_at: Some(2_000_000_000),
            obtained_at: 1_900_000_000,
            scope: None,
        }
    }

    fn key() -> StoreKey {
        StoreKey::from_text(&StoreKey::generate_text()).unwrap()
    }

    #[tokio::test]
    async fn notes_are_kept_beside_the_store_without_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let store = EncryptedFileStore::new(dir.path().join("tokens.enc"), key());
        let dead = token("access-secret-1", "refresh-secret-1");
        store.save("scans", &dead).await.unwrap();
        assert_eq!(store.notes("scans").await.unwrap(), TokenNotes::default());
        store.note("scans", TokenEvent::Refreshed, 100).await.unwrap();
        let refused = dead.refresh_token.as_ref().map(super::super::fingerprint);
        store.note("scans", TokenEvent::InvalidGrant(refused), 200).await.unwrap();
        let notes = store.notes("scans").await.unwrap();
        assert_eq!((notes.last_refresh, notes.last_invalid_grant), (Some(100), Some(200)));
        assert!(notes.needs_sign_in(&dead));
        assert!(!notes.needs_sign_in(&token("access-secret-2", "refresh-secret-2")));
        assert_eq!(store.notes("other").await.unwrap(), TokenNotes::default());
        let path = dir.path().join("tokens.enc.notes");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("secret"), "{text}");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        // The token itself is untouched by notes.
        assert_eq!(store.load("scans").await.unwrap(), Some(dead));
    }

    #[tokio::test]
    async fn round_trip_encrypted_0600_and_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.enc");
        let text = StoreKey::generate_text();
        let store = EncryptedFileStore::new(path.clone(), StoreKey::from_text(&text).unwrap());
        assert_eq!(store.load("a").await.unwrap(), None);
        store.save("a", &token("ACCESS-ONE-abc", "REFRESH-ONE-xyz")).await.unwrap();
        store.save("b", &token("ACCESS-TWO", "REFRESH-TWO")).await.unwrap();
        store.save("a", &token("ACCESS-THREE", "REFRESH-THREE")).await.unwrap();
        assert_eq!(store.load("a").await.unwrap(), Some(token("ACCESS-THREE", "REFRESH-THREE")));
        assert_eq!(store.load_all().await.unwrap().len(), 2);

        let bytes = std::fs::read(&path).unwrap();
        for needle in ["ACCESS", "REFRESH", "access_token", "\"a\""] {
            assert!(!bytes.windows(needle.len()).any(|w| w == needle.as_bytes()), "{needle} in clear");
        }
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        // The same key in hex opens it; another key does not, and a save
        // with the wrong key leaves the file as it was.
        let hex: String = base64::engine::general_purpose::STANDARD
            .decode(&text)
            .unwrap()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let again = EncryptedFileStore::new(path.clone(), StoreKey::from_text(&hex).unwrap());
        assert_eq!(again.load("b").await.unwrap(), Some(token("ACCESS-TWO", "REFRESH-TWO")));
        let wrong = EncryptedFileStore::new(path.clone(), key());
        assert!(matches!(wrong.load("a").await, Err(StoreError::Decrypt(_))));
        assert!(matches!(wrong.save("c", &token("x", "y")).await, Err(StoreError::Decrypt(_))));
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
    }

    #[tokio::test]
    async fn tampering_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.enc");
        let text = StoreKey::generate_text();
        let store = EncryptedFileStore::new(path.clone(), StoreKey::from_text(&text).unwrap());
        store.save("a", &token("x", "y")).await.unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(store.load("a").await, Err(StoreError::Decrypt(_))));
        std::fs::write(&path, b"something else").unwrap();
        assert!(matches!(store.load("a").await, Err(StoreError::Format { .. })));
    }

    #[test]
    fn keys() {
        assert!(StoreKey::from_text("c2hvcnQ=").is_err());
        assert!(StoreKey::from_text("not a key at all!").is_err());
        assert!(StoreKey::from_bytes(&[7u8; 32]).is_ok());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, format!("{}\n", StoreKey::generate_text())).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = StoreKey::read(&SecretSource::File(path.clone())).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(StoreKey::read(&SecretSource::File(path.clone())).is_ok());
        std::fs::write(&path, [9u8; 32]).unwrap();
        assert!(StoreKey::read(&SecretSource::File(path)).is_ok());
        assert!(!format!("{:?}", key()).contains('='));
    }
}
