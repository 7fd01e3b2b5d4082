//! `sharing = "each_device_once"`: each device's record of the messages it
//! has had, so that every device of an account gets every message once.
//!
//! Owns the record (per account: per device, the UIDLs it retrieved whole
//! or DELE'd, each with a stable key when the message has a Message-ID),
//! where it is kept (a small JSON file, or records in the shared state
//! store with compare-and-set), and the two moments it is used:
//! - at login ([`Seat::hide_had`]), on the complete listing: the messages
//!   this device already had are left out of its maildrop; a message whose
//!   UIDL changed (Graph's archive round trip gives it a new id) is known
//!   again by its Message-ID.
//! - at UPDATE ([`Visit::commit`]): what the session retrieved and marked is
//!   added to the device's record, entries for messages no longer in the
//!   mailbox are dropped, and the marked messages that every other device
//!   of the account has had too are returned: only those may leave the
//!   store. A DELE'd message another device has not had yet stays in the
//!   mailbox, hidden from this device.
//!
//! Never written but at UPDATE: a dropped session records nothing, so the
//! device gets its messages again (the safe side). Never grows without
//! bound: entries are dropped when their message leaves the mailbox, and a
//! device's record keeps at most `MAX_ENTRIES_PER_DEVICE`. The store never
//! sees a message's content or headers, only UIDLs and hashed Message-IDs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::backend::{ListedMessage, Mailbox};
use crate::mail::{BackendError, StoreId};
use crate::state::SharedState;

/// The most entries one device's record keeps (the oldest go first).
pub const MAX_ENTRIES_PER_DEVICE: usize = 50_000;
/// A record file larger than this is refused rather than read.
const MAX_FILE_BYTES: u64 = 256 << 20;
/// Header octets read to find a Message-ID.
const HEADER_LIMIT: usize = 64 * 1024;
/// Compare-and-set attempts before an UPDATE gives up recording.
const WRITE_ATTEMPTS: usize = 8;
/// The record file's name beside the token store.
pub const DEFAULT_FILE_NAME: &str = "device-records.json";

/// One message a device has had.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub uidl: String,
    /// A hash of the Message-ID (`None`: the message has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// When it was recorded, Unix milliseconds.
    pub at: u64,
}

/// Every device's record of one account.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRecord {
    #[serde(default)]
    pub devices: BTreeMap<String, Vec<Entry>>,
}

impl AccountRecord {
    /// Each device's UIDLs, for lookups in time independent of the record's
    /// size.
    fn had_by(&self) -> HashMap<&str, HashSet<&str>> {
        self.devices
            .iter()
            .map(|(device, entries)| (device.as_str(), entries.iter().map(|e| e.uidl.as_str()).collect()))
            .collect()
    }

    /// Entries whose message changed UIDL get the new one: `renamed` maps
    /// a stable key to the UIDL its message is listed under now.
    fn rename(&mut self, renamed: &HashMap<String, String>, listed: &HashSet<String>) {
        for entries in self.devices.values_mut() {
            for entry in entries.iter_mut() {
                if let Some(uidl) = entry.key.as_ref().and_then(|k| renamed.get(k))
                    && !listed.contains(&entry.uidl)
                {
                    entry.uidl = uidl.clone();
                }
            }
        }
    }

    /// Drops what no longer needs keeping: devices no longer configured,
    /// entries for messages not in the complete listing made at
    /// `listed_at` (entries written since are kept: their message may have
    /// come after that listing), duplicates, and the oldest entries beyond
    /// `MAX_ENTRIES_PER_DEVICE`.
    pub fn prune(&mut self, devices: &[String], listed: &HashSet<String>, listed_at: u64) {
        self.devices.retain(|device, _| devices.contains(device));
        for entries in self.devices.values_mut() {
            entries.retain(|e| listed.contains(&e.uidl) || e.at >= listed_at);
            let mut seen = HashSet::new();
            // The newest entry of a UIDL wins.
            entries.sort_by_key(|e| std::cmp::Reverse(e.at));
            entries.retain(|e| seen.insert(e.uidl.clone()));
            entries.truncate(MAX_ENTRIES_PER_DEVICE);
            entries.reverse();
        }
    }
}

/// The stable key of a message: a hash of its Message-ID (Graph's
/// `internetMessageId` is this header), `None` without one.
pub fn stable_key(header: &[u8]) -> Option<String> {
    let message = mail_parser::MessageParser::new().parse_headers(header)?;
    let id = message.message_id()?.trim();
    if id.is_empty() {
        return None;
    }
    let digest = Sha256::digest(id.as_bytes());
    Some(digest[..16].iter().map(|b| format!("{b:02x}")).collect())
}

fn now_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Where the records live.
pub struct SeenStore {
    backing: Backing,
}

enum Backing {
    /// One JSON file for every account (0600, replaced atomically, locked
    /// with `flock` so that two processes on one file take turns).
    File { path: PathBuf, local: tokio::sync::Mutex<()> },
    /// The shared state store: one record per account, compare-and-set.
    Shared(Arc<dyn SharedState>),
}

#[derive(Default, Serialize, Deserialize)]
struct RecordFile {
    #[serde(default)]
    accounts: BTreeMap<String, VersionedRecord>,
}

#[derive(Default, Serialize, Deserialize)]
struct VersionedRecord {
    version: u64,
    #[serde(flatten)]
    record: AccountRecord,
}

fn unavailable(what: impl std::fmt::Display) -> BackendError {
    BackendError::unavailable(format!("device records: {what}"))
}

impl SeenStore {
    pub fn file(path: impl Into<PathBuf>) -> Arc<SeenStore> {
        Arc::new(SeenStore { backing: Backing::File { path: path.into(), local: tokio::sync::Mutex::new(()) } })
    }

    pub fn shared(state: Arc<dyn SharedState>) -> Arc<SeenStore> {
        Arc::new(SeenStore { backing: Backing::Shared(state) })
    }

    fn shared_key(account: &str) -> String {
        format!("seen:{}:{account}", account.len())
    }

    /// The account's record and its version (0: never written).
    pub async fn read(&self, account: &str) -> Result<(u64, AccountRecord), BackendError> {
        match &self.backing {
            Backing::File { path, local } => {
                let _turn = local.lock().await;
                let (path, account) = (path.clone(), account.to_string());
                tokio::task::spawn_blocking(move || {
                    let mut file = read_file(&path)?;
                    Ok(file.accounts.remove(&account).map(|v| (v.version, v.record)).unwrap_or_default())
                })
                .await
                .map_err(unavailable)?
            }
            Backing::Shared(state) => match state.read_record(&Self::shared_key(account)).await {
                Ok(None) => Ok((0, AccountRecord::default())),
                Ok(Some(v)) => {
                    let record =
                        serde_json::from_slice(&v.bytes).map_err(|e| unavailable(format!("malformed: {e}")))?;
                    Ok((v.version, record))
                }
                Err(e) => Err(unavailable(e)),
            },
        }
    }

    /// Writes `record` if the account's record is still at `expected`;
    /// `Ok(false)` when someone wrote it since (read again and retry).
    pub async fn write(&self, account: &str, expected: u64, record: &AccountRecord) -> Result<bool, BackendError> {
        let bytes = serde_json::to_vec(record).map_err(unavailable)?;
        match &self.backing {
            Backing::File { path, local } => {
                let _turn = local.lock().await;
                let (path, account, record) = (path.clone(), account.to_string(), record.clone());
                tokio::task::spawn_blocking(move || {
                    let _lock = lock_file(&path)?;
                    let mut file = read_file(&path)?;
                    let current = file.accounts.get(&account).map_or(0, |v| v.version);
                    if current != expected {
                        return Ok(false);
                    }
                    file.accounts.insert(account, VersionedRecord { version: expected + 1, record });
                    replace_file(&path, &serde_json::to_vec(&file).map_err(unavailable)?)?;
                    Ok(true)
                })
                .await
                .map_err(unavailable)?
            }
            Backing::Shared(state) => state
                .write_record(&Self::shared_key(account), expected, &bytes)
                .await
                .map(|written| written.is_some())
                .map_err(unavailable),
        }
    }
}

fn read_file(path: &Path) -> Result<RecordFile, BackendError> {
    let shown = path.display();
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(RecordFile::default()),
        Err(e) => return Err(unavailable(format!("{shown}: {e}"))),
        Ok(m) if m.len() > MAX_FILE_BYTES => {
            return Err(unavailable(format!("{shown} is larger than {MAX_FILE_BYTES} octets")));
        }
        Ok(_) => {}
    }
    let bytes = std::fs::read(path).map_err(|e| unavailable(format!("{shown}: {e}")))?;
    serde_json::from_slice(&bytes).map_err(|e| unavailable(format!("{shown}: malformed: {e}")))
}

fn lock_file(path: &Path) -> Result<std::fs::File, BackendError> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    let lock = path.with_file_name(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock)
        .map_err(|e| unavailable(format!("{}: {e}", lock.display())))?;
    file.lock().map_err(|e| unavailable(format!("{}: {e}", lock.display())))?;
    Ok(file)
}

/// Temporary file (0600) beside it, fsync, rename over it, fsync the
/// directory: after a crash the file is the old one or the new one, whole.
fn replace_file(path: &Path, bytes: &[u8]) -> Result<(), BackendError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(".tmp-{}", std::process::id()));
    let temp = dir.join(name);
    let written = (|| {
        let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&temp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(unavailable(format!("{}: {e}", path.display())));
    }
    Ok(())
}

/// One device's place among its account's devices: what a login under
/// `each_device_once` needs.
#[derive(Clone)]
pub struct Seat {
    store: Arc<SeenStore>,
    device: String,
    /// Every enabled device of the account (this one included): a DELE'd
    /// message leaves the store only once each of them has had it.
    devices: Arc<[String]>,
    /// Every configured device, disabled ones too: whose records are kept.
    kept: Arc<[String]>,
}

impl std::fmt::Debug for Seat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seat").field("device", &self.device).field("devices", &self.devices).finish()
    }
}

impl PartialEq for Seat {
    fn eq(&self, other: &Seat) -> bool {
        Arc::ptr_eq(&self.store, &other.store) && self.device == other.device && self.devices == other.devices
    }
}

impl Eq for Seat {}

impl Seat {
    pub fn new(store: Arc<SeenStore>, device: impl Into<String>, devices: &[String]) -> Seat {
        let device = device.into();
        let mut devices: Vec<String> = devices.to_vec();
        if !devices.contains(&device) {
            devices.push(device.clone());
        }
        let devices: Arc<[String]> = devices.into();
        Seat { store, device, kept: devices.clone(), devices }
    }

    /// Also keeps the records of these devices (configured but disabled:
    /// they do not hold messages back, but get their record back when
    /// enabled again).
    pub fn keeping(mut self, configured: &[String]) -> Seat {
        let mut kept: Vec<String> = self.devices.to_vec();
        kept.extend(configured.iter().filter(|d| !self.devices.contains(d)).cloned());
        self.kept = kept.into();
        self
    }

    /// On the complete listing made at `listed_at` (Unix ms, taken before
    /// listing): the messages this device has not had yet, and the visit
    /// to commit at UPDATE.
    pub async fn hide_had(
        &self,
        account: &str,
        mailbox: &mut dyn Mailbox,
        listed: Vec<ListedMessage>,
        listed_at: u64,
    ) -> Result<(Vec<ListedMessage>, Visit), BackendError> {
        let (_, mut record) = self.store.read(account).await?;
        let uidls: HashSet<String> = listed.iter().map(|m| m.uidl.clone()).collect();
        // Keys of recorded messages no longer listed under their UIDL: one
        // of them may be back under a new one.
        let orphans: HashSet<&String> = record
            .devices
            .values()
            .flatten()
            .filter(|e| !uidls.contains(&e.uidl))
            .filter_map(|e| e.key.as_ref())
            .collect();
        let mut renamed = HashMap::new();
        if !orphans.is_empty() {
            let had = record.had_by();
            let had_all =
                |uidl: &str| self.devices.iter().all(|d| had.get(d.as_str()).is_some_and(|h| h.contains(uidl)));
            let unknown: Vec<&ListedMessage> = listed.iter().filter(|m| !had_all(&m.uidl)).collect();
            if !unknown.is_empty() {
                let ids: Vec<StoreId> = unknown.iter().map(|m| m.id.clone()).collect();
                let headers = mailbox.headers(&ids, HEADER_LIMIT).await?;
                for (message, header) in unknown.iter().zip(headers) {
                    if let Some(key) = header.as_deref().and_then(stable_key)
                        && orphans.contains(&key)
                    {
                        tracing::info!(uidl = %message.uidl, "a message already had is back under a new UIDL");
                        renamed.insert(key, message.uidl.clone());
                    }
                }
            }
        }
        record.rename(&renamed, &uidls);
        let before = listed.len();
        let mine: HashSet<&str> =
            record.devices.get(&self.device).map(|e| e.iter().map(|e| e.uidl.as_str()).collect()).unwrap_or_default();
        let shown: Vec<ListedMessage> = listed.into_iter().filter(|m| !mine.contains(m.uidl.as_str())).collect();
        if shown.len() < before {
            tracing::debug!(hidden = before - shown.len(), "messages this device already had (each_device_once)");
        }
        let visit = Visit { seat: self.clone(), account: account.to_string(), listed: uidls, listed_at, renamed };
        Ok((shown, visit))
    }
}

/// One session's use of a device's record, from login to UPDATE.
#[derive(Debug)]
pub struct Visit {
    seat: Seat,
    account: String,
    /// The complete listing at login (UIDLs) and when it was begun.
    listed: HashSet<String>,
    listed_at: u64,
    /// Stable keys whose message is listed under a new UIDL.
    renamed: HashMap<String, String>,
}

impl Visit {
    /// UPDATE: records `had` (each message with its UIDL and, when it has
    /// a Message-ID, its header section) for this device, and returns the
    /// ones of `deleted` that every other device of the account has had
    /// too: only those may leave the store.
    pub async fn commit(
        &self,
        had: &[(StoreId, String, Option<bytes::Bytes>)],
        deleted: &[StoreId],
    ) -> Result<Vec<StoreId>, BackendError> {
        let at = now_millis();
        let entries: Vec<Entry> = had
            .iter()
            .map(|(_, uidl, header)| Entry { uidl: uidl.clone(), key: header.as_deref().and_then(stable_key), at })
            .collect();
        let uidl_of: HashMap<&StoreId, &String> = had.iter().map(|(id, uidl, _)| (id, uidl)).collect();
        let seat = &self.seat;
        for _ in 0..WRITE_ATTEMPTS {
            let (version, mut record) = seat.store.read(&self.account).await?;
            record.rename(&self.renamed, &self.listed);
            record.devices.entry(seat.device.clone()).or_default().extend(entries.iter().cloned());
            record.prune(&seat.kept, &self.listed, self.listed_at);
            let had = record.had_by();
            let leaving: Vec<StoreId> = deleted
                .iter()
                .filter(|id| {
                    uidl_of.get(id).is_some_and(|uidl| {
                        seat.devices.iter().all(|d| had.get(d.as_str()).is_some_and(|h| h.contains(uidl.as_str())))
                    })
                })
                .cloned()
                .collect();
            if seat.store.write(&self.account, version, &record).await? {
                if leaving.len() < deleted.len() {
                    tracing::info!(
                        kept = deleted.len() - leaving.len(),
                        "each_device_once: DELE'd messages other devices have not had stay in the mailbox"
                    );
                }
                return Ok(leaving);
            }
        }
        Err(unavailable("the record kept changing under this session; nothing recorded"))
    }
}

/// The record stores the router hands out: one per file, or the shared
/// state store.
pub struct Seats {
    shared: Option<Arc<SeenStore>>,
    beside_tokens: Option<PathBuf>,
    files: HashMap<PathBuf, Arc<SeenStore>>,
}

impl Seats {
    /// `token_store`: the token file, beside which the records file goes
    /// unless an account names one; `shared`: the `[state]` store, which
    /// holds every account's records when configured.
    pub fn new(token_store: Option<&Path>, shared: Option<Arc<dyn SharedState>>) -> Seats {
        Seats {
            shared: shared.map(SeenStore::shared),
            beside_tokens: token_store.map(|p| p.with_file_name(DEFAULT_FILE_NAME)),
            files: HashMap::new(),
        }
    }

    /// The seat of `device` among `devices`, its records where they go
    /// (`records_file` names a file for the account).
    pub fn seat(&mut self, records_file: Option<&Path>, device: &str, devices: &[String]) -> Result<Seat, String> {
        let store = match (&self.shared, records_file.map(Path::to_path_buf).or_else(|| self.beside_tokens.clone())) {
            (Some(shared), _) => shared.clone(),
            (None, Some(path)) => self.files.entry(path.clone()).or_insert_with(|| SeenStore::file(path)).clone(),
            (None, None) => {
                return Err("sharing = \"each_device_once\" needs somewhere to keep the device records: \
                            `records_file`, a [token_store] (the file goes beside it) or a [state] url"
                    .into());
            }
        };
        Ok(Seat::new(store, device, devices))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(uidl: &str, at: u64) -> Entry {
        Entry { uidl: uidl.into(), key: None, at }
    }

    fn set(items: &[&str]) -> HashSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn entries_for_vanished_messages_are_dropped_and_the_record_is_bounded() {
        let devices = vec!["a".to_string(), "b".to_string()];
        let mut record = AccountRecord::default();
        record.devices.insert("a".into(), vec![entry("u1", 10), entry("u2", 10), entry("u3", 30)]);
        record.devices.insert("b".into(), vec![entry("u2", 10), entry("u2", 11)]);
        record.devices.insert("gone-device".into(), vec![entry("u1", 10)]);
        // Listed at 20: u2 is still there; u1 vanished; u3 was recorded
        // after the listing began (its message may be newer than it).
        record.prune(&devices, &set(&["u2"]), 20);
        assert_eq!(record.devices["a"].iter().map(|e| e.uidl.as_str()).collect::<Vec<_>>(), ["u2", "u3"]);
        assert_eq!(record.devices["b"].len(), 1, "duplicates are merged");
        assert!(!record.devices.contains_key("gone-device"), "devices no longer configured are dropped");

        let many: Vec<Entry> = (0..MAX_ENTRIES_PER_DEVICE as u64 + 10).map(|i| entry(&format!("u{i}"), i)).collect();
        let listed: HashSet<String> = many.iter().map(|e| e.uidl.clone()).collect();
        record.devices.insert("a".into(), many);
        record.prune(&devices, &listed, 0);
        let kept = &record.devices["a"];
        assert_eq!(kept.len(), MAX_ENTRIES_PER_DEVICE);
        assert_eq!(kept[0].uidl, "u10", "the oldest go first");
    }

    #[test]
    fn the_stable_key_is_the_hashed_message_id() {
        let a = stable_key(b"From: x@example.com\r\nMessage-ID: <abc@example.com>\r\n\r\n").unwrap();
        let folded = stable_key(b"Message-ID:\r\n <abc@example.com>\r\nFrom: y@example.com\r\n\r\n").unwrap();
        assert_eq!(a, folded);
        assert_eq!(a.len(), 32);
        assert!(!a.contains("abc"), "the store never sees the Message-ID itself");
        assert_ne!(a, stable_key(b"Message-ID: <other@example.com>\r\n\r\n").unwrap());
        assert_eq!(stable_key(b"From: x@example.com\r\n\r\n"), None);
    }

    #[tokio::test]
    async fn the_file_store_compares_and_sets_and_survives_reopening() {
        let dir = std::env::temp_dir().join(format!("popgate-seen-{}-{}", std::process::id(), now_millis()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(DEFAULT_FILE_NAME);
        let store = SeenStore::file(&path);
        let (version, mut record) = store.read("printers").await.unwrap();
        assert_eq!(version, 0);
        record.devices.insert("a".into(), vec![entry("u1", 1)]);
        assert!(store.write("printers", 0, &record).await.unwrap());
        assert!(!store.write("printers", 0, &record).await.unwrap(), "a stale version never overwrites");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let reopened = SeenStore::file(&path);
        assert_eq!(reopened.read("printers").await.unwrap(), (1, record));
        assert_eq!(reopened.read("other").await.unwrap().0, 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
