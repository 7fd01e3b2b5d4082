//! The in-memory store: the demo backend and the reference every other
//! backend is tested against.
//!
//! Accounts and messages live in a shared `DemoStore`; the demo loads a
//! folder of `.eml` files and gives each user name its own copy on first
//! login. Test knobs (`set_unavailable`, `claim_raw_sizes`) reproduce the
//! failures real stores have. Nothing is persisted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{Backend, Disposal, ListedMessage, Mailbox, MessageStream, ReportedSize};
use crate::mail::{BackendError, Credentials, Proof, StoreId};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoConfig {
    /// A folder of .eml files every demo user starts with; the built-in
    /// samples when unset.
    #[serde(default)]
    pub messages_dir: Option<PathBuf>,
}

/// Demo messages compiled into the binary, so `popgate` alone has mail.
const BUILTIN: &[&[u8]] = &[
    include_bytes!("../../config/demo/01-welcome.eml"),
    include_bytes!("../../config/demo/02-invoice.eml"),
    include_bytes!("../../config/demo/03-scan.eml"),
];

#[derive(Debug, Clone)]
struct StoredMessage {
    uid: u32,
    content: Bytes,
    /// Left by `Disposal::Flag`.
    keywords: Vec<String>,
}

#[derive(Debug, Default)]
struct Account {
    /// `None`: any password (demo accounts).
    password: Option<String>,
    next_uid: u32,
    messages: Vec<StoredMessage>,
    /// Messages `Disposal::Trash`/`Archive` moved out of the mailbox, by
    /// folder ("Trash", "Archive" or the named one).
    moved: Vec<(String, Bytes)>,
}

#[derive(Debug, Default)]
struct StoreState {
    accounts: HashMap<String, Account>,
    /// Seed for users that log in without an account (demo mode).
    demo_seed: Option<Vec<Bytes>>,
    unavailable: bool,
    fail_next_reset: bool,
    claim_raw_sizes: bool,
    chunk_size: usize,
    /// `remove` takes this long first (a slow backend in UPDATE).
    remove_delay: std::time::Duration,
    logins: u64,
}

/// A store shared by every session of a `DemoBackend` (and by tests, which
/// use it to put mail in and look at what is left).
#[derive(Debug, Clone, Default)]
pub struct DemoStore {
    state: Arc<Mutex<StoreState>>,
}

const UIDVALIDITY: u32 = 1;

impl DemoStore {
    pub fn new() -> Self {
        let store = DemoStore::default();
        store.lock().chunk_size = 64 * 1024;
        store
    }

    /// A demo store: any user name logs in with any password and finds its own
    /// copy of these messages.
    pub fn demo(messages: Vec<Bytes>) -> Self {
        let store = DemoStore::new();
        store.lock().demo_seed = Some(messages);
        store
    }

    pub fn from_config(config: &DemoConfig) -> std::io::Result<Self> {
        let messages = match &config.messages_dir {
            None => BUILTIN.iter().map(|m| Bytes::from_static(m)).collect(),
            Some(dir) => load_eml_dir(dir)?,
        };
        Ok(DemoStore::demo(messages))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StoreState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn add_user(&self, user: &str, password: &str) {
        self.lock().accounts.insert(
            user.to_string(),
            Account { password: Some(password.to_string()), next_uid: 1, ..Default::default() },
        );
    }

    /// Appends a message to a user's mailbox; returns its UID.
    pub fn append(&self, user: &str, content: impl Into<Bytes>) -> u32 {
        let mut state = self.lock();
        let account =
            state.accounts.entry(user.to_string()).or_insert_with(|| Account { next_uid: 1, ..Default::default() });
        let uid = account.next_uid;
        account.next_uid += 1;
        account.messages.push(StoredMessage { uid, content: content.into(), keywords: Vec::new() });
        uid
    }

    /// The contents left in a user's mailbox, oldest first.
    pub fn contents(&self, user: &str) -> Vec<Bytes> {
        self.lock()
            .accounts
            .get(user)
            .map(|a| a.messages.iter().map(|m| m.content.clone()).collect())
            .unwrap_or_default()
    }

    /// What `Disposal::Trash`/`Archive` moved to `folder` ("Trash",
    /// "Archive" or a named one), oldest first.
    pub fn moved_to(&self, user: &str, folder: &str) -> Vec<Bytes> {
        self.lock()
            .accounts
            .get(user)
            .map(|a| a.moved.iter().filter(|(f, _)| f == folder).map(|(_, c)| c.clone()).collect())
            .unwrap_or_default()
    }

    /// The keywords a message still in the mailbox carries.
    pub fn keywords(&self, user: &str, uid: u32) -> Vec<String> {
        self.lock()
            .accounts
            .get(user)
            .and_then(|a| a.messages.iter().find(|m| m.uid == uid))
            .map(|m| m.keywords.clone())
            .unwrap_or_default()
    }

    /// Every call fails with `Unavailable` while set (a store that went down).
    /// As another client: marks a message read (`\Seen`).
    pub fn mark_seen(&self, user: &str, uid: u32) {
        let mut state = self.lock();
        if let Some(message) = state.accounts.get_mut(user).and_then(|a| a.messages.iter_mut().find(|m| m.uid == uid))
            && !message.keywords.iter().any(|k| k == SEEN)
        {
            message.keywords.push(SEEN.to_string());
        }
    }

    pub fn set_unavailable(&self, down: bool) {
        self.lock().unavailable = down;
    }

    /// The next `Mailbox::reset` fails (a warm session that went stale).
    pub fn fail_next_reset(&self) {
        self.lock().fail_next_reset = true;
    }

    /// Report raw stored lengths as claimed sizes, as some IMAP servers do.
    pub fn claim_raw_sizes(&self, claim: bool) {
        self.lock().claim_raw_sizes = claim;
    }

    /// Every `Mailbox::remove` waits this long before removing (a backend
    /// slow to commit, for shutdown tests).
    pub fn delay_removals(&self, delay: std::time::Duration) {
        self.lock().remove_delay = delay;
    }

    pub fn set_chunk_size(&self, bytes: usize) {
        self.lock().chunk_size = bytes.max(1);
    }

    /// How many successful logins the store has seen.
    pub fn logins(&self) -> u64 {
        self.lock().logins
    }
}

/// The read flag, kept among a message's keywords.
const SEEN: &str = "\\Seen";

fn load_eml_dir(dir: &Path) -> std::io::Result<Vec<Bytes>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "eml"))
        .collect();
    paths.sort();
    paths.into_iter().map(|p| std::fs::read(p).map(Bytes::from)).collect()
}

pub struct DemoBackend {
    store: DemoStore,
}

impl DemoBackend {
    pub fn new(store: DemoStore) -> Self {
        DemoBackend { store }
    }
}

#[async_trait]
impl Backend for DemoBackend {
    fn kind(&self) -> &'static str {
        "demo"
    }

    async fn open(&self, credentials: &Credentials) -> Result<Box<dyn Mailbox>, BackendError> {
        let Proof::Password(password) = &credentials.proof else {
            return Err(BackendError::AuthFailed);
        };
        let mut state = self.store.lock();
        if state.unavailable {
            return Err(BackendError::unavailable("memory store is down"));
        }
        if !state.accounts.contains_key(&credentials.user) {
            let Some(seed) = state.demo_seed.clone() else {
                return Err(BackendError::AuthFailed);
            };
            let messages = seed
                .into_iter()
                .enumerate()
                .map(|(i, content)| StoredMessage { uid: i as u32 + 1, content, keywords: Vec::new() })
                .collect::<Vec<_>>();
            let next_uid = messages.len() as u32 + 1;
            state
                .accounts
                .insert(credentials.user.clone(), Account { password: None, next_uid, messages, moved: Vec::new() });
        }
        let account = &state.accounts[&credentials.user];
        if account.password.as_deref().is_some_and(|p| p != password.expose()) {
            return Err(BackendError::AuthFailed);
        }
        state.logins += 1;
        Ok(Box::new(MemoryMailbox {
            store: self.store.clone(),
            user: credentials.user.clone(),
            disposal: Disposal::AsConfigured,
        }))
    }
}

struct MemoryMailbox {
    store: DemoStore,
    user: String,
    /// Every disposal is supported: the reference for the other stores.
    disposal: Disposal,
}

impl MemoryMailbox {
    fn check(&self) -> Result<std::sync::MutexGuard<'_, StoreState>, BackendError> {
        let state = self.store.lock();
        if state.unavailable {
            return Err(BackendError::unavailable("memory store is down"));
        }
        Ok(state)
    }
}

fn uid_of(id: &StoreId) -> Result<u32, BackendError> {
    id.0.parse().map_err(|_| BackendError::MessageGone)
}

#[async_trait]
impl Mailbox for MemoryMailbox {
    async fn reset(&mut self) -> Result<(), BackendError> {
        let mut state = self.check()?;
        if std::mem::take(&mut state.fail_next_reset) {
            return Err(BackendError::unavailable("session went stale"));
        }
        Ok(())
    }

    async fn list(&mut self) -> Result<Vec<ListedMessage>, BackendError> {
        let state = self.check()?;
        let claim = state.claim_raw_sizes;
        let account = state.accounts.get(&self.user).ok_or(BackendError::AuthFailed)?;
        Ok(account
            .messages
            .iter()
            .map(|m| ListedMessage {
                id: StoreId(m.uid.to_string()),
                uidl: format!("{:08x}{:08x}", m.uid, UIDVALIDITY),
                size: if claim {
                    ReportedSize::Claimed(m.content.len() as u64)
                } else {
                    ReportedSize::Exact(crate::canonical::canonical_size(&m.content))
                },
            })
            .collect())
    }

    async fn fetch(&mut self, id: &StoreId) -> Result<MessageStream<'_>, BackendError> {
        let uid = uid_of(id)?;
        let (content, chunk) = {
            let state = self.check()?;
            let account = state.accounts.get(&self.user).ok_or(BackendError::MessageGone)?;
            let message = account.messages.iter().find(|m| m.uid == uid).ok_or(BackendError::MessageGone)?;
            (message.content.clone(), state.chunk_size)
        };
        let store = self.store.clone();
        let chunks = (0..content.len().div_ceil(chunk)).map(move |i| {
            if store.lock().unavailable {
                return Err(BackendError::unavailable("memory store went down mid-message"));
            }
            Ok(content.slice(i * chunk..((i + 1) * chunk).min(content.len())))
        });
        Ok(Box::pin(futures::stream::iter(chunks)))
    }

    async fn remove(&mut self, ids: &[StoreId]) -> Result<(), BackendError> {
        let uids = ids.iter().map(uid_of).collect::<Result<Vec<_>, _>>()?;
        let delay = self.check()?.remove_delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut state = self.check()?;
        let account = state.accounts.get_mut(&self.user).ok_or(BackendError::MessageGone)?;
        let folder = match &self.disposal {
            Disposal::AsConfigured | Disposal::Expunge => None,
            Disposal::Trash => Some("Trash".to_string()),
            Disposal::Archive { folder } => Some(folder.clone().unwrap_or_else(|| "Archive".into())),
            Disposal::Flag { keyword } => {
                for message in account.messages.iter_mut().filter(|m| uids.contains(&m.uid)) {
                    if !message.keywords.contains(keyword) {
                        message.keywords.push(keyword.clone());
                    }
                }
                return Ok(());
            }
        };
        let (removed, kept): (Vec<_>, Vec<_>) =
            std::mem::take(&mut account.messages).into_iter().partition(|m| uids.contains(&m.uid));
        account.messages = kept;
        if let Some(folder) = folder {
            account.moved.extend(removed.into_iter().map(|m| (folder.clone(), m.content)));
        }
        Ok(())
    }

    fn dispose_as(&mut self, disposal: &Disposal) -> Result<(), BackendError> {
        self.disposal = disposal.clone();
        Ok(())
    }

    async fn carrying(&mut self, ids: &[StoreId], keyword: &str) -> Result<Vec<bool>, BackendError> {
        let state = self.check()?;
        let account = state.accounts.get(&self.user).ok_or(BackendError::MessageGone)?;
        Ok(ids
            .iter()
            .map(|id| {
                uid_of(id)
                    .ok()
                    .and_then(|uid| account.messages.iter().find(|m| m.uid == uid))
                    .is_none_or(|m| m.keywords.iter().any(|k| k.eq_ignore_ascii_case(keyword)))
            })
            .collect())
    }

    /// Read: carrying the `\Seen` flag (`DemoStore::mark_seen`).
    async fn seen(&mut self, ids: &[StoreId]) -> Result<Vec<bool>, BackendError> {
        self.carrying(ids, SEEN).await
    }

    async fn close(self: Box<Self>) {}
}
