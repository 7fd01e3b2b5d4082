//! IMAP backend: a POP3 maildrop that is one IMAP mailbox, logged into with
//! the POP3 client's own credentials (pass-through).
//!
//! Owns the IMAP configuration and everything said to the IMAP server:
//! connecting (`transport`, `connect`), the command/response discipline
//! (`conn`: timeouts, draining, poisoning), and the wire formats (`wire`).
//! A message is addressed by its UID (`StoreId`), its UIDL is written as
//! configured (`uidl_format`: Dovecot's POP3 default `%08Xu%08Xv` unless
//! set, so users keep their UIDLs when they move from a server's own POP3),
//! and it is read as one `UID FETCH n (UID BODY.PEEK[])` whose literal is
//! streamed as it arrives (`Body`, `Conn::start_literal`): the server's
//! cheapest way, and memory never grows with message size. Small messages
//! are fetched ahead in bounded batches (`prefetch_bytes`, `prefetched`):
//! a client reading the maildrop in order pays a backend round trip per
//! batch, not per message.
//!
//! A mailbox the server will not SELECT is a configuration error, logged
//! with the mailboxes the server does have. Without UIDPLUS, deleted mail
//! is moved to the trash the server names (RFC 6154 `\Trash`), else to the
//! configured `trash_mailbox`, looked up as given and inside the personal
//! namespace (`INBOX.Trash` on servers that keep folders under INBOX).
//!
//! NUL octets, which `BODY[]` cannot carry, are fetched with RFC 3516
//! `BINARY[]` where that is proven to give the stored octets
//! (`Chunks::restore_nuls`).
//!
//! Must never: send a bare EXPUNGE (it would also expunge what other clients
//! flagged \Deleted), remove anything outside `Mailbox::remove` or other
//! than exactly the given UIDs, use a connection again after a timeout or a
//! protocol error, mix up replies of different commands, or log a password.

mod backoff;
mod conn;
mod connect;
mod literal8;
#[cfg(test)]
mod tests;
mod transport;
mod wire;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_imap::imap_proto::{AttributeValue, MailboxDatum, NameAttribute, Response, ResponseCode};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use self::backoff::Backoff;
use self::conn::{Conn, Outcome, Started};
use self::transport::TlsSetup;
pub use self::wire::UidlFormat;
use self::wire::{
    Meaning, classify_refusal, encode_mailbox_name, quote_encoded_mailbox, quote_mailbox, read_refusal, uid_sets,
};
use super::{Backend, Disposal, ListedMessage, Mailbox, MessageStream, ReportedSize};
use crate::canonical::CanonicalSize;
use crate::mail::{BackendError, Credentials, InvalidSetting, StoreId};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImapTls {
    /// Cleartext (only sensible on loopback or a trusted network).
    None,
    /// Cleartext, upgraded with STARTTLS before login (required to succeed).
    Starttls,
    /// TLS from the first byte (port 993).
    #[default]
    Implicit,
}

/// Whether to trust RFC822.SIZE as the POP3 size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SizePolicy {
    /// Measure each message's canonical size once (then cached): always exact.
    #[default]
    Measure,
    /// Use RFC822.SIZE as is: no extra download, wrong if the server's
    /// sizes are (e.g. bare CR in stored mail).
    Trust,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImapConfig {
    pub host: String,
    /// 993 for implicit TLS, 143 otherwise.
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub tls: ImapTls,
    /// The mailbox POP3 shows as its maildrop.
    #[serde(default = "default_mailbox")]
    pub mailbox: String,
    /// PEM file of CA certificates to trust instead of the webpki roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Every IMAP command's time limit, in seconds.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    #[serde(default)]
    pub sizes: SizePolicy,
    /// Without UIDPLUS: UID MOVE deleted messages to the trash instead of
    /// expunging. The server's own special-use `\Trash` mailbox (RFC 6154)
    /// comes first; this name is used when the server names none, as given
    /// or inside the personal namespace (`INBOX.Trash`, `INBOX/Trash`).
    #[serde(default)]
    pub trash_mailbox: Option<String>,
    /// Set \Seen on messages RETR sends whole (never on TOP).
    #[serde(default)]
    pub mark_seen: bool,
    /// Octets per partial FETCH, where a message is read in parts: where
    /// NUL octets are restored (see `Body`). Messages are otherwise read
    /// as one streamed `BODY.PEEK[]`.
    #[serde(default = "default_chunk")]
    pub fetch_chunk_bytes: u32,
    /// At most this many octets of small messages fetched ahead, together
    /// with the one a RETR or TOP asked for (0: none): the next messages in
    /// UID order, in one `UID FETCH a,b,c (BODY.PEEK[])`, so that a client
    /// reading the maildrop in order pays one backend round trip per batch,
    /// not per message.
    #[serde(default = "default_prefetch")]
    pub prefetch_bytes: u32,
    /// Let POP3 clients log in with an OAuth bearer token (SASL XOAUTH2 /
    /// OAUTHBEARER), handed to the server with AUTHENTICATE XOAUTH2. For
    /// servers that accept OAuth (Gmail, Microsoft 365, Dovecot with an
    /// oauth2 passdb).
    #[serde(default)]
    pub oauth_passthrough: bool,
    /// How UIDLs are written: `dovecot` (`%08Xu%08Xv`, the default),
    /// `cyrus` (`%v.%u`), or a template of `%u` (UID) and `%v`
    /// (UIDVALIDITY), decimal or `%X`/`%x` hex, zero-padded with a width
    /// (`%08Xu`): make it what the server's own POP3 wrote, and users
    /// moving to popgate are not served their mail again (docs/BACKENDS.md).
    #[serde(default)]
    pub uidl_format: UidlFormat,
    /// How an idle connection is brought up to date before a login reuses
    /// it: `select` (the default: SELECT again, which re-reads UIDVALIDITY
    /// on any server) or `noop` (NOOP: the server reports the messages
    /// added and expunged since; about half the server's work per poll).
    /// `noop` is for servers that end the session (BYE) or say so
    /// (`OK [UIDVALIDITY]`) when the selected mailbox's UIDVALIDITY changes
    /// — Dovecot does (tests/connection_sharing.rs) — because a UID under
    /// an unannounced new UIDVALIDITY would name another message. Either
    /// way the UPDATE state SELECTs again before removing anything.
    #[serde(default)]
    pub reuse_check: ReuseCheck,
}

/// `reuse_check`: what refreshes an idle connection's view of the mailbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReuseCheck {
    #[default]
    Select,
    Noop,
}

fn default_mailbox() -> String {
    "INBOX".to_string()
}
fn default_timeout() -> u64 {
    30
}
/// 1 MiB: fewer partial FETCHes are much cheaper for the server (Dovecot
/// spends 198 ms of CPU on a 100 MiB message in 256 KiB partials, 147 ms in
/// 1 MiB ones), while popgate's memory stays a few MiB (docs/BENCHMARKS.md).
/// Only used where NUL octets are restored (`Body`).
fn default_chunk() -> u32 {
    1024 * 1024
}
fn default_prefetch() -> u32 {
    4 << 20
}

impl ImapConfig {
    pub fn new(host: impl Into<String>, port: Option<u16>, tls: ImapTls) -> Self {
        ImapConfig {
            host: host.into(),
            port,
            tls,
            mailbox: default_mailbox(),
            ca_file: None,
            timeout_secs: default_timeout(),
            sizes: SizePolicy::default(),
            trash_mailbox: None,
            mark_seen: false,
            fetch_chunk_bytes: default_chunk(),
            prefetch_bytes: default_prefetch(),
            oauth_passthrough: false,
            uidl_format: UidlFormat::default(),
            reuse_check: ReuseCheck::default(),
        }
    }

    pub fn port(&self) -> u16 {
        self.port.unwrap_or(if self.tls == ImapTls::Implicit { 993 } else { 143 })
    }

    /// What serde cannot check; keys relative to the backend's table.
    pub fn check(&self) -> Result<(), InvalidSetting> {
        if self.host.is_empty() {
            return Err(InvalidSetting::new("host", "must not be empty"));
        }
        InvalidSetting::bounded("timeout_secs", self.timeout_secs, 1..=3_600)?;
        InvalidSetting::bounded("fetch_chunk_bytes", self.fetch_chunk_bytes, 1024..=64 << 20)?;
        InvalidSetting::bounded("prefetch_bytes", self.prefetch_bytes, 0..=64 << 20)?;
        Ok(())
    }
}

/// Messages measured together in one `UID FETCH a,b,c (BODY.PEEK[])` for
/// `canonical_sizes` add up to at most this many octets; bigger messages are
/// streamed in chunks. async-imap buffers each FETCH response whole, so this
/// also bounds the memory one measurement takes.
const BATCH_BYTES: u64 = 1 << 20;
/// Longest UID set in one command; Dovecot accepts 64 KiB command lines.
const MAX_SET_LEN: usize = 4000;
/// LOGOUT is a courtesy: never hold a closing session longer than this.
const LOGOUT_LIMIT: Duration = Duration::from_secs(5);

pub struct ImapBackend {
    config: ImapConfig,
    /// Built once: parsing the roots for every login would be wasted work.
    tls: Option<TlsSetup>,
    /// Accounts the server asked us to leave alone for a while.
    backoff: Arc<Backoff>,
}

impl ImapBackend {
    pub fn new(config: ImapConfig) -> Result<Self, BackendError> {
        let tls = match config.tls {
            ImapTls::None => {
                if config.ca_file.is_some() {
                    tracing::warn!("imap ca_file is set but tls = \"none\": it is not used");
                }
                None
            }
            ImapTls::Starttls | ImapTls::Implicit => Some(TlsSetup::new(&config.host, config.ca_file.as_deref())?),
        };
        // Refuse a bad mailbox name now rather than at every login.
        quote_mailbox(&config.mailbox)?;
        if let Some(trash) = &config.trash_mailbox {
            quote_mailbox(trash)?;
        }
        Ok(ImapBackend { config, tls, backoff: Arc::new(Backoff::default()) })
    }
}

#[async_trait]
impl Backend for ImapBackend {
    fn kind(&self) -> &'static str {
        "imap"
    }

    fn accepts_bearer_tokens(&self) -> bool {
        self.config.oauth_passthrough
    }

    /// Reachability without a login: a TCP connection to the server.
    async fn probe(&self) -> Result<(), BackendError> {
        let address = (self.config.host.as_str(), self.config.port());
        let timeout = Duration::from_secs(self.config.timeout_secs.min(5));
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(address)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(BackendError::unavailable(format!("cannot connect: {e}"))),
            Err(_) => Err(BackendError::unavailable("connect timed out")),
        }
    }

    async fn open(&self, credentials: &Credentials) -> Result<Box<dyn Mailbox>, BackendError> {
        let logged_in = connect::connect_and_login(&self.config, self.tls.as_ref(), credentials, &self.backoff).await?;
        let mut conn = Conn::new(logged_in.session, Duration::from_secs(self.config.timeout_secs));
        conn.report_backoff_to(self.backoff.clone(), &credentials.user);
        match ImapMailbox::select(&mut conn, &self.config, logged_in.capabilities).await {
            Ok(selected) => {
                tracing::debug!(
                    user = %credentials.user,
                    mailbox = %self.config.mailbox,
                    exists = conn.exists,
                    uidvalidity = selected.uidvalidity,
                    uidplus = selected.uidplus,
                    r#move = selected.can_move,
                    read_only = selected.read_only,
                    "IMAP mailbox selected"
                );
                Ok(Box::new(ImapMailbox {
                    conn,
                    selected,
                    config: self.config.clone(),
                    chunk: self.config.fetch_chunk_bytes.max(1),
                    mark_seen: self.config.mark_seen,
                    sizes_policy: self.config.sizes,
                    trash: self.config.trash_mailbox.clone(),
                    trash_found: None,
                    sizes: HashMap::new(),
                    listed: Vec::new(),
                    prefetch: HashMap::new(),
                    backoff: self.backoff.clone(),
                    user: credentials.user.clone(),
                    disposal: Disposal::AsConfigured,
                }))
            }
            Err(e) => {
                let limit = conn.limit().min(LOGOUT_LIMIT);
                conn.logout(limit).await;
                Err(e)
            }
        }
    }
}

/// What SELECT and the capabilities told us about the mailbox.
struct Selected {
    /// The server's capabilities, kept for a re-SELECT (`reset`).
    capabilities: HashSet<String>,
    uidvalidity: u32,
    uidplus: bool,
    can_move: bool,
    read_only: bool,
}

struct ImapMailbox {
    conn: Conn,
    selected: Selected,
    config: ImapConfig,
    chunk: u32,
    mark_seen: bool,
    sizes_policy: SizePolicy,
    trash: Option<String>,
    /// The trash mailbox found on the server (quoted, as sent), once looked
    /// up.
    trash_found: Option<String>,
    /// RFC822.SIZE by UID, from the last `list`: picks the batches of
    /// `canonical_sizes`.
    sizes: HashMap<u32, u32>,
    /// The UIDs of the last `list`, ascending: which messages come next.
    listed: Vec<u32>,
    /// Bodies fetched ahead (`prefetched`), at most `prefetch_bytes` in
    /// all. Kept with the connection, valid while its UIDVALIDITY is: a
    /// UID names one message, whose octets never change.
    prefetch: HashMap<u32, Bytes>,
    backoff: Arc<Backoff>,
    /// The account logged in (for the backoff).
    user: String,
    /// What `remove` does (the device policy's `on_delete`).
    disposal: Disposal,
}

impl ImapMailbox {
    async fn select(
        conn: &mut Conn,
        config: &ImapConfig,
        capabilities: Option<HashSet<String>>,
    ) -> Result<Selected, BackendError> {
        let capabilities = match capabilities {
            Some(capabilities) => capabilities,
            None => {
                let mut capabilities = HashSet::new();
                conn.run("CAPABILITY", |response| {
                    if let Response::Capabilities(list) = response {
                        capabilities.extend(list.iter().map(capability_name));
                    }
                })
                .await?
                .ok_or_refused("CAPABILITY")?;
                capabilities
            }
        };
        let mut uidvalidity = None;
        let reply = conn
            .run(&format!("SELECT {}", quote_mailbox(&config.mailbox)?), |response| {
                if let Response::Data { outcome, .. } = response
                    && let Some(ResponseCode::UidValidity(v)) = outcome.code
                {
                    uidvalidity = Some(v);
                }
            })
            .await?;
        if reply.outcome != Outcome::Ok {
            let what = format!("selecting mailbox {:?}", config.mailbox);
            // Busy or too many sessions keep their meaning; any other
            // refusal of the configured mailbox (Cyrus: `NO Mailbox does
            // not exist`, without RFC 5530's [NONEXISTENT]) will not go away
            // by itself: a configuration error, reported with what the
            // server does have.
            match read_refusal(&reply.text).meaning {
                Meaning::Busy | Meaning::TooManyConnections => {
                    return Err(classify_refusal(reply.outcome == Outcome::Bad, &reply.text, &what));
                }
                // Exchange app-only: logged in, yet no mailbox may be opened.
                Meaning::Misconfigured(fix) => {
                    tracing::warn!(mailbox = %config.mailbox, refusal = %reply.text, "{fix}");
                    return Err(classify_refusal(reply.outcome == Outcome::Bad, &reply.text, &what));
                }
                _ => {}
            }
            let special_use = capabilities.contains("SPECIAL-USE");
            let mailboxes = match list_mailboxes(conn, special_use).await {
                Ok(listed) => describe_mailboxes(&listed),
                Err(e) => format!("(could not list them: {e})"),
            };
            tracing::warn!(
                mailbox = %config.mailbox,
                refusal = %reply.text,
                server_mailboxes = %mailboxes,
                "the IMAP server refused to select the configured mailbox: check `mailbox` (or the backend URL's path)"
            );
            return Err(BackendError::Permanent(format!(
                "the server refused to select mailbox {:?} ({}); it has: {mailboxes}",
                config.mailbox, reply.text
            )));
        }
        let reply = reply.ok_or_refused(&format!("selecting mailbox {:?}", config.mailbox))?;
        let Some(uidvalidity) = uidvalidity else {
            return Err(BackendError::Permanent("server sent no UIDVALIDITY: UIDLs would not be stable".into()));
        };
        Ok(Selected {
            uidvalidity,
            uidplus: capabilities.contains("UIDPLUS"),
            can_move: capabilities.contains("MOVE"),
            read_only: matches!(reply.code, Some(ResponseCode::ReadOnly)),
            capabilities,
        })
    }

    /// `reuse_check = "noop"`: a NOOP, which makes the server report the
    /// messages added (EXISTS) and expunged since, and proves the
    /// connection alive. False when the server announced another
    /// UIDVALIDITY, which only a SELECT may adopt; a BYE or a refusal is an
    /// error (the connection is then discarded).
    async fn noop_keeps_view(&mut self) -> Result<bool, BackendError> {
        let mut announced = None;
        self.conn
            .run("NOOP", |response| {
                if let Response::Data { outcome, .. } = response
                    && let Some(ResponseCode::UidValidity(v)) = outcome.code
                {
                    announced = Some(v);
                }
            })
            .await?
            .ok_or_refused("NOOP")?;
        Ok(announced.is_none_or(|v| v == self.selected.uidvalidity))
    }

    /// Selects the mailbox again and refuses to go on if its UIDVALIDITY
    /// changed since the listing: the UIDs this session marked would then
    /// name other messages (RFC 3501 2.3.1.1). Nothing is deleted; the
    /// client gets a temporary error and its next session lists afresh.
    async fn check_uidvalidity(&mut self) -> Result<(), BackendError> {
        let listed = self.selected.uidvalidity;
        let capabilities = Some(self.selected.capabilities.clone());
        self.selected = Self::select(&mut self.conn, &self.config, capabilities).await?;
        if self.selected.uidvalidity != listed {
            self.prefetch.clear();
            tracing::warn!(
                listed,
                now = self.selected.uidvalidity,
                "UIDVALIDITY changed during the session; nothing deleted"
            );
            return Err(BackendError::unavailable("the mailbox's UIDVALIDITY changed; nothing was deleted"));
        }
        Ok(())
    }

    /// Starts reading message `uid` as one streamed `BODY.PEEK[]` literal
    /// (PEEK: reading is not marking read).
    async fn body(&mut self, uid: u32) -> Result<Body<'_>, BackendError> {
        let mut inline: Option<Option<Bytes>> = None;
        let command = format!("UID FETCH {uid} (UID BODY.PEEK[])");
        let started = self
            .conn
            .start_literal(&command, uid, |response| {
                // A body sent as a quoted string (or NIL) is no literal.
                if let Some((got, data)) = fetched_body(response, None)
                    && got == uid
                    && inline.is_none()
                {
                    inline = Some(data.map(Bytes::copy_from_slice));
                }
            })
            .await?;
        let state = match started {
            Started::Literal => BodyState::Literal,
            Started::Done(reply) => {
                reply.ok_or_refused("fetching a message")?;
                match inline {
                    Some(Some(data)) => BodyState::Inline(data),
                    _ => return Err(BackendError::MessageGone),
                }
            }
        };
        Ok(Body {
            uid,
            binary: self.selected.capabilities.contains("BINARY"),
            chunk: self.chunk,
            offset: 0,
            held: Vec::new(),
            state,
            conn: &mut self.conn,
        })
    }

    /// Message `uid` from the bodies fetched ahead, or fetched now with
    /// the small messages after it in UID order (up to `prefetch_bytes` in
    /// all, in one command); `None`: it is to be streamed alone (large,
    /// unlisted, last, NUL octets to restore, or the batch was refused).
    async fn prefetched(&mut self, uid: u32) -> Result<Option<Bytes>, BackendError> {
        if let Some(body) = self.prefetch.get(&uid) {
            // A server that has gone away (shut down, the account closed)
            // is not served from: the client hears what the next command
            // would have found.
            self.conn.check_open()?;
            return Ok(Some(body.clone()));
        }
        let bound = u64::from(self.config.prefetch_bytes);
        // A message over a quarter of the bound is streamed: batching it
        // would save one round trip in many.
        let small = bound / 4;
        let Some(&size) = self.sizes.get(&uid) else { return Ok(None) };
        if u64::from(size) > small || size == 0 {
            return Ok(None);
        }
        let mut batch = vec![uid];
        let mut total = u64::from(size);
        let after = self.listed.partition_point(|&listed| listed <= uid);
        for &next in &self.listed[after..] {
            let size = u64::from(self.sizes.get(&next).copied().unwrap_or(u32::MAX));
            if size > small || total + size > bound || batch.len() >= MAX_PREFETCH {
                break;
            }
            batch.push(next);
            total += size;
        }
        if batch.len() < 2 {
            return Ok(None);
        }
        // The old batch goes before the new one comes: the bound holds.
        self.prefetch.clear();
        let binary = self.selected.capabilities.contains("BINARY");
        let wanted: HashSet<u32> = batch.iter().copied().collect();
        let mut fetched: HashMap<u32, Bytes> = HashMap::new();
        let mut held = 0u64;
        let set = uid_sets(&batch, MAX_SET_LEN).swap_remove(0);
        let reply = self
            .conn
            .run(&format!("UID FETCH {set} (UID BODY.PEEK[])"), |response| {
                if let Some((got, Some(data))) = fetched_body(response, None)
                    && wanted.contains(&got)
                    && !fetched.contains_key(&got)
                    && held + data.len() as u64 <= bound
                    // Whose NULs may need restoring: streamed alone.
                    && !(binary && stray_0x80(data))
                {
                    held += data.len() as u64;
                    fetched.insert(got, Bytes::copy_from_slice(data));
                }
            })
            .await?;
        if reply.outcome != Outcome::Ok {
            // E.g. one of them expunged meanwhile: each is fetched alone.
            tracing::debug!(reply = %reply.text, "prefetch refused");
            return Ok(None);
        }
        let body = fetched.get(&uid).cloned();
        self.prefetch = fetched;
        Ok(body)
    }

    /// Measures small messages together, one round trip per batch.
    async fn measure_batch(&mut self, batch: &[u32]) -> Result<HashMap<u32, u64>, BackendError> {
        let wanted: HashSet<u32> = batch.iter().copied().collect();
        let mut measured = HashMap::new();
        for set in uid_sets(batch, MAX_SET_LEN) {
            self.conn
                .run(&format!("UID FETCH {set} (UID BODY.PEEK[])"), |response| {
                    if let Some((uid, data)) = fetched_body(response, None)
                        && wanted.contains(&uid)
                        && let Some(data) = data
                    {
                        measured.insert(uid, crate::canonical::canonical_size(data));
                    }
                })
                .await?
                .ok_or_refused("measuring messages")?;
        }
        Ok(measured)
    }

    /// `Ok` only if none of `uids` is in the mailbox any more: what every
    /// removal checks before it reports success.
    async fn verify_gone(&mut self, uids: &[u32]) -> Result<(), BackendError> {
        let left = self.still_present(uids).await?;
        if !left.is_empty() {
            return Err(BackendError::Unavailable(format!(
                "{} of {} deleted messages are still in the mailbox",
                left.len(),
                uids.len()
            )));
        }
        Ok(())
    }

    /// Which of `uids` are still in the mailbox.
    async fn still_present(&mut self, uids: &[u32]) -> Result<Vec<u32>, BackendError> {
        let asked: HashSet<u32> = uids.iter().copied().collect();
        let mut left = Vec::new();
        for set in uid_sets(uids, MAX_SET_LEN) {
            self.conn
                .run(&format!("UID SEARCH UID {set}"), |response| {
                    if let Response::MailboxData(MailboxDatum::Search(found)) = response {
                        left.extend(found.iter().filter(|uid| asked.contains(uid)));
                    }
                })
                .await?
                .ok_or_refused("checking the deletion")?;
        }
        Ok(left)
    }

    /// Where deleted mail goes on a server without UIDPLUS, looked up once
    /// per session: see `choose_trash`.
    async fn trash_mailbox(&mut self) -> Result<String, BackendError> {
        if let Some(found) = &self.trash_found {
            return Ok(found.clone());
        }
        let special_use = self.selected.capabilities.contains("SPECIAL-USE");
        let listed = list_mailboxes(&mut self.conn, special_use).await?;
        match choose_trash(&listed, self.trash.as_deref()) {
            Some(name) => {
                tracing::debug!(trash = %name, "trash mailbox found");
                let quoted = quote_encoded_mailbox(&name)?;
                self.trash_found = Some(quoted.clone());
                Ok(quoted)
            }
            None => {
                let mailboxes = describe_mailboxes(&listed);
                tracing::warn!(
                    configured = self.trash.as_deref().unwrap_or("(none)"),
                    server_mailboxes = %mailboxes,
                    "the server lacks UIDPLUS and names no \\Trash mailbox, and trash_mailbox is not one of its mailboxes"
                );
                Err(BackendError::Permanent(format!(
                    "server lacks UIDPLUS and no trash mailbox was found (trash_mailbox = {:?}); it has: {mailboxes}",
                    self.trash
                )))
            }
        }
    }
}

/// The RFC 6154 special uses a delete policy moves mail to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SpecialUse {
    Trash,
    Archive,
}

impl ImapMailbox {
    /// The mailbox `on_delete = "trash"`/`"archive"` moves to: the one LIST
    /// marks with the special use, else `named` (as given or inside the
    /// personal namespace). Quoted, as sent.
    async fn special_use_mailbox(&mut self, wanted: SpecialUse, named: Option<String>) -> Result<String, BackendError> {
        let special_use = self.selected.capabilities.contains("SPECIAL-USE");
        let listed = list_mailboxes(&mut self.conn, special_use).await?;
        match choose_special_use(&listed, wanted, named.as_deref()) {
            Some(name) => quote_encoded_mailbox(&name),
            None => Err(BackendError::Permanent(format!(
                "no {wanted:?} mailbox: the server marks none \\{wanted:?} (RFC 6154) and {}; it has: {}",
                match &named {
                    Some(name) => format!("{name:?} is not one of its mailboxes"),
                    None => "none is named in the policy".into(),
                },
                describe_mailboxes(&listed)
            ))),
        }
    }

    /// Moves exactly `uids` to `target`: UID MOVE (RFC 6851) where the
    /// server has it, else UID COPY, then \Deleted and UID EXPUNGE of those
    /// UIDs only (UIDPLUS) — never a bare EXPUNGE.
    async fn move_out(&mut self, uids: &[u32], target: &str) -> Result<(), BackendError> {
        if !self.selected.can_move && !self.selected.uidplus {
            return Err(BackendError::Permanent(
                "server lacks MOVE and UIDPLUS: popgate cannot move exactly the deleted messages".into(),
            ));
        }
        self.check_uidvalidity().await?;
        for set in uid_sets(uids, MAX_SET_LEN) {
            if self.selected.can_move {
                self.conn.run(&format!("UID MOVE {set} {target}"), |_| {}).await?.ok_or_refused("UID MOVE")?;
            } else {
                self.conn.run(&format!("UID COPY {set} {target}"), |_| {}).await?.ok_or_refused("UID COPY")?;
                self.conn
                    .run(&format!("UID STORE {set} +FLAGS.SILENT (\\Deleted)"), |_| {})
                    .await?
                    .ok_or_refused("flagging messages \\Deleted")?;
                self.conn.run(&format!("UID EXPUNGE {set}"), |_| {}).await?.ok_or_refused("UID EXPUNGE")?;
            }
        }
        self.verify_gone(uids).await
    }

    /// `on_delete = "flag"`: the keyword on exactly `uids`; nothing leaves.
    async fn flag(&mut self, uids: &[u32], keyword: &str) -> Result<(), BackendError> {
        let keyword = imap_keyword(keyword)?;
        self.check_uidvalidity().await?;
        for set in uid_sets(uids, MAX_SET_LEN) {
            self.conn
                .run(&format!("UID STORE {set} +FLAGS.SILENT ({keyword})"), |_| {})
                .await?
                .ok_or_refused("setting the keyword")?;
        }
        Ok(())
    }
}

/// The mailbox LIST marks with `wanted`, else the one named (see
/// `choose_trash`).
fn choose_special_use(listed: &[ListedMailbox], wanted: SpecialUse, named: Option<&str>) -> Option<String> {
    let marked = |m: &&ListedMailbox| match wanted {
        SpecialUse::Trash => m.trash,
        SpecialUse::Archive => m.archive,
    };
    // A folder named in the policy wins over the special use: the operator
    // chose it.
    if let Some(named) = named {
        let unmarked: Vec<ListedMailbox> = listed.iter().map(|m| ListedMailbox { trash: false, ..m.clone() }).collect();
        return choose_trash(&unmarked, Some(named));
    }
    listed.iter().find(|m| marked(m) && m.selectable).map(|m| m.name.clone())
}

/// A keyword as an IMAP flag atom (RFC 3501 `flag-keyword`): no system
/// flags (`\Deleted` must never be set this way), no atom-specials.
pub fn imap_keyword(keyword: &str) -> Result<&str, BackendError> {
    let valid = !keyword.is_empty()
        && keyword.len() <= 64
        && keyword.bytes().all(|b| b.is_ascii_graphic() && !b"(){%*\"\\]".contains(&b));
    if valid { Ok(keyword) } else { Err(BackendError::Permanent(format!("{keyword:?} is not an IMAP keyword"))) }
}

/// A mailbox as LIST shows it.
#[derive(Debug, Clone)]
struct ListedMailbox {
    /// As on the wire (modified UTF-7).
    name: String,
    delimiter: Option<String>,
    /// RFC 6154 `\Trash`.
    trash: bool,
    /// RFC 6154 `\Archive`.
    archive: bool,
    selectable: bool,
}

/// Mailboxes kept from one LIST: enough to find the trash and to tell an
/// operator what is there, bounded for accounts with thousands.
const MAX_LISTED: usize = 1000;

/// Every mailbox, with special-use attributes (the RFC 6154 return option
/// where the server announces SPECIAL-USE; servers that do not may still
/// show them in a plain LIST).
async fn list_mailboxes(conn: &mut Conn, special_use: bool) -> Result<Vec<ListedMailbox>, BackendError> {
    let command = if special_use { "LIST \"\" \"*\" RETURN (SPECIAL-USE)" } else { "LIST \"\" \"*\"" };
    let mut listed = Vec::new();
    conn.run(command, |response| {
        if let Response::MailboxData(MailboxDatum::List(data)) = response
            && listed.len() < MAX_LISTED
        {
            listed.push(ListedMailbox {
                name: data.name.to_string(),
                delimiter: data.delimiter.as_ref().map(|d| d.to_string()),
                trash: data.name_attributes.iter().any(|a| matches!(a, NameAttribute::Trash)),
                archive: data.name_attributes.iter().any(|a| matches!(a, NameAttribute::Archive)),
                selectable: !data.name_attributes.iter().any(|a| matches!(a, NameAttribute::NoSelect)),
            });
        }
    })
    .await?
    .ok_or_refused("listing mailboxes")?;
    Ok(listed)
}

/// The mailboxes for a log line: names (as on the wire), `\Trash` marked,
/// the hierarchy delimiter once, at most 50.
fn describe_mailboxes(listed: &[ListedMailbox]) -> String {
    if listed.is_empty() {
        return "no mailboxes".into();
    }
    let mut names: Vec<String> = listed
        .iter()
        .take(50)
        .map(|m| if m.trash { format!("{} (\\Trash)", m.name) } else { m.name.clone() })
        .collect();
    if listed.len() > 50 {
        names.push(format!("… {} more", listed.len() - 50));
    }
    let delimiter = listed.iter().find_map(|m| m.delimiter.clone()).unwrap_or_else(|| "none".into());
    format!("{} (hierarchy delimiter {delimiter:?})", names.join(", "))
}

/// The trash mailbox (its wire name), in this order: the server's own
/// special-use `\Trash` (RFC 6154); the configured name as given; the
/// configured name inside the personal namespace, which on servers that
/// keep every folder under INBOX (Cyrus without altnamespace, Courier) is
/// `INBOX` plus the hierarchy delimiter. A configured `/` stands for the
/// server's delimiter. `None`: nothing fits.
///
/// (The personal namespace is read from the LIST, not from RFC 2342
/// NAMESPACE: async-imap's parser, imap-proto 0.17, does not parse a
/// NAMESPACE response, and an unparsable response poisons the connection.)
fn choose_trash(listed: &[ListedMailbox], configured: Option<&str>) -> Option<String> {
    if let Some(special) = listed.iter().find(|m| m.trash && m.selectable) {
        return Some(special.name.clone());
    }
    let configured = encode_mailbox_name(configured?);
    let exists = |name: &str| listed.iter().any(|m| m.selectable && m.name == name);
    if exists(&configured) {
        return Some(configured);
    }
    let inbox = listed.iter().find(|m| m.name.eq_ignore_ascii_case("INBOX"))?;
    let delimiter = inbox.delimiter.as_deref()?;
    let inside = format!("{}{delimiter}{}", inbox.name, configured.replace('/', delimiter));
    exists(&inside).then_some(inside)
}

fn capability_name(c: &async_imap::imap_proto::Capability<'_>) -> String {
    use async_imap::imap_proto::Capability;
    match c {
        Capability::Imap4rev1 => "IMAP4REV1".into(),
        Capability::Auth(a) => format!("AUTH={}", a.to_ascii_uppercase()),
        Capability::Atom(a) => a.to_ascii_uppercase(),
    }
}

fn uid_of(id: &StoreId) -> Result<u32, BackendError> {
    // An id this backend did not issue names no message here.
    id.0.parse().ok().filter(|&uid| uid > 0).ok_or(BackendError::MessageGone)
}

/// The UID and `BODY[]` (or `BODY[]<origin>`) data of a FETCH response, if
/// it is one. The data is `None` for NIL.
fn fetched_body<'r>(response: &'r Response<'_>, origin: Option<u32>) -> Option<(u32, Option<&'r [u8]>)> {
    let Response::Fetch(_, attributes) = response else {
        return None;
    };
    let uid = attributes.iter().find_map(|a| match a {
        AttributeValue::Uid(uid) => Some(*uid),
        _ => None,
    })?;
    let data = attributes.iter().find_map(|a| match a {
        AttributeValue::BodySection { section: None, index, data } if *index == origin => Some(data.as_deref()),
        _ => None,
    })?;
    Some((uid, data))
}

/// What one partial FETCH (`UID FETCH uid (UID BODY.PEEK[]<offset.chunk>)`)
/// got back, from the untagged responses its command drew: only a FETCH of
/// that UID with the section at that origin counts (the first one), and it
/// may not be longer than asked for.
struct PartialFetch {
    uid: u32,
    offset: u32,
    chunk: u32,
    /// `None`: no matching FETCH yet; `Some(None)`: NIL.
    body: Option<Option<Bytes>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PartialFetchError {
    /// No FETCH of the message, or NIL where it should start.
    Gone,
    /// More octets than the command asked for: the server (or the stream)
    /// is not what we think, and the connection must go.
    TooLong,
}

impl PartialFetch {
    fn new(uid: u32, offset: u32, chunk: u32) -> PartialFetch {
        PartialFetch { uid, offset, chunk, body: None }
    }

    fn see(&mut self, response: &Response<'_>) {
        if let Some((got, data)) = fetched_body(response, Some(self.offset))
            && got == self.uid
            && self.body.is_none()
        {
            self.body = Some(data.map(Bytes::copy_from_slice));
        }
    }

    fn body(self) -> Result<Bytes, PartialFetchError> {
        let body = match self.body {
            None => return Err(PartialFetchError::Gone),
            Some(None) if self.offset == 0 => return Err(PartialFetchError::Gone),
            Some(data) => data.unwrap_or_default(),
        };
        if body.len() > self.chunk as usize {
            return Err(PartialFetchError::TooLong);
        }
        Ok(body)
    }
}

/// What the backend reads from an IMAP server, with the connection taken
/// away: the fuzz target `imap_replies` drives these. Not API.
#[doc(hidden)]
pub mod fuzzing {
    use async_imap::imap_proto::Response;

    pub use super::literal8::Literal8;
    pub use super::wire::{
        MAX_BACKOFF, Meaning, UidlFormat, classify_login_refusal, classify_refusal, read_refusal, suggested_backoff,
        truncate, uid_sets,
    };
    use super::{PartialFetch, PartialFetchError};

    /// What a partial FETCH of `uid` at `offset` for `chunk` octets makes
    /// of `server` (the untagged responses, as they come off the wire,
    /// through `Literal8` as the transport passes them): the chunk, or
    /// `Err(true)` for "gone", `Err(false)` for "too long". Parsing stops
    /// at the first response async-imap's parser cannot read (the real
    /// connection is poisoned there).
    pub fn partial_fetch(server: &[u8], uid: u32, offset: u32, chunk: u32) -> Result<Vec<u8>, bool> {
        let mut rewritten = Vec::new();
        let mut literal8 = Literal8::default();
        literal8.feed(server, &mut rewritten);
        literal8.finish(&mut rewritten);
        let mut part = PartialFetch::new(uid, offset, chunk);
        let mut rest = &rewritten[..];
        while let Ok((left, response)) = Response::parse(rest) {
            part.see(&response);
            if left.len() == rest.len() {
                break;
            }
            rest = left;
        }
        part.body().map(|b| b.to_vec()).map_err(|e| e == PartialFetchError::Gone)
    }

    /// Whether BODY[]'s chunk may hold a NUL's 0x80 stand-in, and whether
    /// BINARY[]'s octets may replace it.
    pub fn nul_checks(body: &[u8], binary: &[u8]) -> (bool, bool) {
        (super::stray_0x80(body), super::only_nuls_differ(body, binary))
    }
}

/// One message read as a series of partial FETCHes, each a complete command
/// whose reply is drained before its chunk is handed out, so the reader may
/// stop between chunks at no cost (and mid-chunk at the cost of `Conn`
/// draining the rest). No chunk is prefetched: see `conn` on pipelining.
struct Chunks<'a> {
    conn: &'a mut Conn,
    uid: u32,
    item: &'static str,
    /// The server offers RFC 3516 BINARY (for NUL octets).
    binary: bool,
    chunk: u32,
    /// Where the next partial FETCH starts.
    offset: u64,
    /// The end of the message was seen, or an error was returned.
    finished: bool,
}

impl Chunks<'_> {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, BackendError> {
        if self.finished {
            return Ok(None);
        }
        let result = self.read_next().await;
        if result.is_err() {
            self.finished = true;
        }
        result
    }

    async fn read_next(&mut self) -> Result<Option<Bytes>, BackendError> {
        let offset = u32::try_from(self.offset)
            .map_err(|_| BackendError::Permanent("message too large for IMAP partial FETCH".into()))?;
        let uid = self.uid;
        let command = format!("UID FETCH {uid} (UID {}<{offset}.{}>)", self.item, self.chunk);
        let mut part = PartialFetch::new(uid, offset, self.chunk);
        self.conn.run(&command, |response| part.see(response)).await?.ok_or_refused("fetching a message")?;
        let body = match part.body() {
            Ok(body) => body,
            Err(PartialFetchError::Gone) => return Err(BackendError::MessageGone),
            Err(PartialFetchError::TooLong) => {
                return Err(self.conn.poison("server sent more octets than a partial FETCH asked for"));
            }
        };
        let body = if self.binary && stray_0x80(&body) { self.restore_nuls(offset, body).await? } else { body };
        // A short chunk is the last one; a full one may be too, in which
        // case the next FETCH comes back empty.
        self.finished = body.len() < self.chunk as usize;
        self.offset += body.len() as u64;
        Ok((!body.is_empty()).then_some(body))
    }
}

impl Chunks<'_> {
    /// The stored octets of a chunk `BODY[]` gave with 0x80 octets in it.
    ///
    /// IMAP literals cannot carry NUL, so Dovecot's `BODY[]` sends 0x80 in
    /// place of each NUL (its own POP3 sends the NUL). `BINARY[]` (RFC 3516)
    /// carries NULs, but it also decodes every MIME part's base64 or
    /// quoted-printable and rewrites its Content-Transfer-Encoding header:
    /// it equals the stored message only up to the first such part. So the
    /// `BINARY[]` octets at the same offset replace the chunk only if they
    /// differ from it in nothing but NULs where the chunk has 0x80 — then
    /// they are the stored octets. Otherwise (a decoded part before or in
    /// this chunk, or the server refused) the chunk stays as `BODY[]` gave
    /// it. Either way the length is the same, so sizes measured with
    /// `BODY[]` stay exact. `BINARY.PEEK`: it never marks a message read.
    async fn restore_nuls(&mut self, offset: u32, body: Bytes) -> Result<Bytes, BackendError> {
        let uid = self.uid;
        let command = format!("UID FETCH {uid} (UID BINARY.PEEK[]<{offset}.{}>)", body.len());
        let mut binary: Option<Bytes> = None;
        let reply = self
            .conn
            .run(&command, |response| {
                // `literal8` renamed the reply's BINARY[] to BODY[].
                if let Some((got, Some(data))) = fetched_body(response, Some(offset))
                    && got == uid
                    && binary.is_none()
                {
                    binary = Some(Bytes::copy_from_slice(data));
                }
            })
            .await?;
        if reply.outcome != Outcome::Ok {
            tracing::debug!(uid, reply = %reply.text, "BINARY refused; NUL octets stay 0x80");
            return Ok(body);
        }
        match binary {
            Some(binary) if only_nuls_differ(&body, &binary) => Ok(binary),
            _ => {
                tracing::debug!(uid, offset, "BINARY differs from BODY beyond NULs; octets kept as BODY[] gave them");
                Ok(body)
            }
        }
    }
}

/// Octets handed on per chunk of a streamed message.
const STREAM_CHUNK: usize = 256 * 1024;
/// Most messages in one prefetch batch (its UID set stays short).
const MAX_PREFETCH: usize = 1000;

/// One message read as it arrives: the literal of one `UID FETCH uid
/// (UID BODY.PEEK[])`, in chunks of at most `STREAM_CHUNK` octets, each
/// handed on before the next is read (the POP3 client's pace is the
/// server's). Dropped early (TOP), it leaves the rest of the literal to
/// `Conn`: read away before the next command (within the command timeout,
/// else the connection is given up).
///
/// NUL octets: where the server offers BINARY and a chunk holds a 0x80
/// that may stand for a NUL, the literal is read to its end unused and the
/// rest of the message is fetched from that chunk on in partial FETCHes
/// (`Chunks`), which restore them.
struct Body<'a> {
    conn: &'a mut Conn,
    uid: u32,
    binary: bool,
    /// Partial FETCH size, for `Chunks`.
    chunk: u32,
    /// Octets handed on so far.
    offset: u64,
    /// The start of a UTF-8 sequence a chunk ended in, held for the next
    /// one, so that a cut sequence's 0x80 is not taken for a NUL.
    held: Vec<u8>,
    state: BodyState,
}

enum BodyState {
    /// Reading the literal.
    Literal,
    /// The whole body came in the reply (a quoted string).
    Inline(Bytes),
    /// In partial FETCHes from `offset` (NULs to restore).
    Partial,
    /// Everything was handed on, or an error returned.
    Done,
}

impl Body<'_> {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, BackendError> {
        let result = self.read_next().await;
        if result.is_err() {
            self.state = BodyState::Done;
        }
        result
    }

    async fn read_next(&mut self) -> Result<Option<Bytes>, BackendError> {
        loop {
            let chunk = match &mut self.state {
                BodyState::Done => return Ok(None),
                BodyState::Inline(data) => {
                    let data = std::mem::take(data);
                    self.state = BodyState::Done;
                    self.offset += data.len() as u64;
                    return Ok((!data.is_empty()).then_some(data));
                }
                BodyState::Partial => {
                    let mut chunks = Chunks {
                        conn: &mut *self.conn,
                        uid: self.uid,
                        item: "BODY.PEEK[]",
                        binary: self.binary,
                        chunk: self.chunk,
                        offset: self.offset,
                        finished: false,
                    };
                    let chunk = chunks.next_chunk().await?;
                    self.offset = chunks.offset;
                    if chunks.finished {
                        self.state = BodyState::Done;
                    }
                    return Ok(chunk);
                }
                BodyState::Literal => match self.conn.literal_chunk(STREAM_CHUNK, STREAM_CHUNK).await? {
                    Some(read) => {
                        let mut chunk = if self.held.is_empty() {
                            read
                        } else {
                            let mut joined = std::mem::take(&mut self.held);
                            joined.extend_from_slice(&read);
                            Bytes::from(joined)
                        };
                        if self.binary {
                            let cut = incomplete_utf8_tail(&chunk);
                            self.held = chunk.split_off(chunk.len() - cut).to_vec();
                        }
                        chunk
                    }
                    None => {
                        self.conn.end_literal().await?.ok_or_refused("fetching a message")?;
                        self.state = BodyState::Done;
                        Bytes::from(std::mem::take(&mut self.held))
                    }
                },
            };
            if chunk.is_empty() {
                continue;
            }
            if self.binary && stray_0x80(&chunk) {
                if matches!(self.state, BodyState::Literal) {
                    while self.conn.literal_chunk(STREAM_CHUNK, STREAM_CHUNK).await?.is_some() {}
                    self.conn.end_literal().await?.ok_or_refused("fetching a message")?;
                }
                self.held.clear();
                self.state = BodyState::Partial;
                continue;
            }
            self.offset += chunk.len() as u64;
            return Ok(Some(chunk));
        }
    }
}

/// How many octets at the end of `chunk` start a UTF-8 sequence that does
/// not end in it.
fn incomplete_utf8_tail(chunk: &[u8]) -> usize {
    for back in 1..=chunk.len().min(3) {
        let octet = chunk[chunk.len() - back];
        if octet & 0xC0 == 0x80 {
            continue;
        }
        let length = match octet {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => return 0,
        };
        return if length > back { back } else { 0 };
    }
    0
}

/// Whether a 0x80 octet in `chunk` stands outside well-formed UTF-8, where
/// BODY[]'s stand-in for a NUL would be. A 0x80 inside well-formed UTF-8
/// (the middle of `—` or `’`, common in 8-bit mail) is the text's own: not
/// fetching those chunks again keeps most 8-bit mail at one FETCH per
/// chunk. Missed: a NUL right after a lone UTF-8 lead octet (such octets
/// are not text) stays 0x80.
fn stray_0x80(chunk: &[u8]) -> bool {
    let mut rest = chunk;
    while memchr::memchr(0x80, rest).is_some() {
        match std::str::from_utf8(rest) {
            Ok(_) => return false,
            Err(e) => {
                let start = e.valid_up_to();
                let end = start + e.error_len().unwrap_or(rest.len() - start);
                if rest[start..end].contains(&0x80) {
                    return true;
                }
                rest = &rest[end..];
            }
        }
    }
    false
}

/// `binary` is `body` with some of its 0x80 octets NUL (and at least one).
fn only_nuls_differ(body: &[u8], binary: &[u8]) -> bool {
    body.len() == binary.len()
        && body.iter().zip(binary).all(|(&b, &n)| b == n || (b == 0x80 && n == 0))
        && binary.contains(&0)
}

#[async_trait]
impl Mailbox for ImapMailbox {
    /// A fresh view for a reused session: SELECT again, which re-reads
    /// UIDVALIDITY and EXISTS and proves the connection is alive.
    async fn reset(&mut self) -> Result<(), BackendError> {
        self.backoff.check(&self.user)?;
        let before = self.selected.uidvalidity;
        if self.config.reuse_check == ReuseCheck::Noop && self.noop_keeps_view().await? {
            self.sizes.clear();
            self.listed.clear();
            return Ok(());
        }
        let capabilities = Some(self.selected.capabilities.clone());
        self.selected = Self::select(&mut self.conn, &self.config, capabilities).await?;
        self.sizes.clear();
        self.listed.clear();
        if self.selected.uidvalidity != before {
            self.prefetch.clear();
        }
        Ok(())
    }

    fn validity(&self) -> Option<u64> {
        Some(u64::from(self.selected.uidvalidity))
    }

    async fn list(&mut self) -> Result<Vec<ListedMessage>, BackendError> {
        let mut found = BTreeMap::new();
        // `1:*` on an empty mailbox is an error on some servers.
        if self.conn.exists > 0 {
            self.conn
                .run("UID FETCH 1:* (UID RFC822.SIZE)", |response| {
                    if let Response::Fetch(_, attributes) = response {
                        let uid = attributes.iter().find_map(|a| match a {
                            AttributeValue::Uid(uid) => Some(*uid),
                            _ => None,
                        });
                        let size = attributes.iter().find_map(|a| match a {
                            AttributeValue::Rfc822Size(size) => Some(*size),
                            _ => None,
                        });
                        // Unsolicited FETCHes (flag changes) carry no size.
                        if let (Some(uid), Some(size)) = (uid, size) {
                            found.insert(uid, size);
                        }
                    }
                })
                .await?
                .ok_or_refused("listing messages")?;
        }
        self.sizes = found.iter().map(|(&uid, &size)| (uid, size)).collect();
        self.listed = found.keys().copied().collect();
        let uidvalidity = self.selected.uidvalidity;
        Ok(found
            .into_iter()
            .map(|(uid, size)| ListedMessage {
                id: StoreId(uid.to_string()),
                uidl: self.config.uidl_format.render(uid, uidvalidity),
                size: match self.sizes_policy {
                    SizePolicy::Measure => ReportedSize::Claimed(u64::from(size)),
                    SizePolicy::Trust => ReportedSize::Exact(u64::from(size)),
                },
            })
            .collect())
    }

    async fn fetch(&mut self, id: &StoreId) -> Result<MessageStream<'_>, BackendError> {
        let uid = uid_of(id)?;
        if let Some(body) = self.prefetched(uid).await? {
            let chunks = (0..body.len())
                .step_by(STREAM_CHUNK)
                .map(move |at| Ok(body.slice(at..body.len().min(at + STREAM_CHUNK))));
            return Ok(futures::stream::iter(chunks.collect::<Vec<_>>()).boxed());
        }
        // Always PEEK: a TOP must not mark the message read; RETR marks it
        // afterwards (`retrieved`), as Dovecot's own POP3 does.
        let mut body = self.body(uid).await?;
        // The first chunk is read now, so that a missing message is an error
        // of `fetch` itself.
        let first = body.next_chunk().await?;
        let rest = futures::stream::unfold(body, |mut body| async move {
            match body.next_chunk().await {
                Ok(Some(chunk)) => Some((Ok(chunk), body)),
                Ok(None) => None,
                Err(e) => Some((Err(e), body)),
            }
        });
        Ok(futures::stream::iter(first.map(Ok)).chain(rest).boxed())
    }

    async fn canonical_sizes(&mut self, ids: &[StoreId]) -> Result<Vec<Option<u64>>, BackendError> {
        let uids = ids.iter().map(uid_of).collect::<Result<Vec<_>, _>>()?;
        let mut sizes: HashMap<u32, u64> = HashMap::new();

        // Small messages: greedy batches of at most BATCH_BYTES.
        let mut batch = Vec::new();
        let mut batch_bytes = 0u64;
        let mut large = Vec::new();
        for &uid in &uids {
            match self.sizes.get(&uid).map(|&s| u64::from(s)) {
                Some(size) if size <= BATCH_BYTES => {
                    if batch_bytes + size > BATCH_BYTES && !batch.is_empty() {
                        sizes.extend(self.measure_batch(&batch).await?);
                        batch.clear();
                        batch_bytes = 0;
                    }
                    batch.push(uid);
                    batch_bytes += size;
                }
                _ => large.push(uid),
            }
        }
        if !batch.is_empty() {
            sizes.extend(self.measure_batch(&batch).await?);
        }

        // Large (or unlisted) messages: streamed, never held whole. Always
        // PEEK: measuring is not reading.
        for uid in large {
            if sizes.contains_key(&uid) {
                continue;
            }
            let mut counter = CanonicalSize::new();
            let mut body = match self.body(uid).await {
                Ok(body) => body,
                Err(BackendError::MessageGone) => continue,
                Err(e) => return Err(e),
            };
            loop {
                match body.next_chunk().await {
                    Ok(Some(chunk)) => counter.feed(&chunk),
                    Ok(None) => {
                        sizes.insert(uid, counter.finish());
                        break;
                    }
                    // Expunged since the listing: left out, not an error.
                    Err(BackendError::MessageGone) => break,
                    Err(e) => return Err(e),
                }
            }
        }

        Ok(uids.iter().map(|uid| sizes.get(uid).copied()).collect())
    }

    /// Every header in batches, one round trip per `MAX_SET_LEN` UIDs, each
    /// cut at `limit` by the server (a partial fetch), never `\Seen`.
    async fn headers(&mut self, ids: &[StoreId], limit: usize) -> Result<Vec<Option<Bytes>>, BackendError> {
        let uids = ids.iter().map(uid_of).collect::<Result<Vec<_>, _>>()?;
        let wanted: HashSet<u32> = uids.iter().copied().collect();
        let mut headers: HashMap<u32, Bytes> = HashMap::new();
        for set in uid_sets(&uids, MAX_SET_LEN) {
            self.conn
                .run(&format!("UID FETCH {set} (UID BODY.PEEK[HEADER]<0.{limit}>)"), |response| {
                    let Response::Fetch(_, attributes) = response else { return };
                    let uid = attributes.iter().find_map(|a| match a {
                        AttributeValue::Uid(uid) => Some(*uid),
                        _ => None,
                    });
                    let header = attributes.iter().find_map(|a| match a {
                        AttributeValue::BodySection { section: Some(_), data, .. } => Some(data.as_deref()),
                        _ => None,
                    });
                    if let (Some(uid), Some(header)) = (uid, header)
                        && wanted.contains(&uid)
                    {
                        let header = header.unwrap_or_default();
                        headers.insert(uid, Bytes::copy_from_slice(&header[..header.len().min(limit)]));
                    }
                })
                .await?
                .ok_or_refused("fetching headers")?;
        }
        // A message expunged since the listing has no FETCH reply: gone.
        Ok(uids.iter().map(|uid| headers.remove(uid)).collect())
    }

    fn dispose_as(&mut self, disposal: &Disposal) -> Result<(), BackendError> {
        if let Disposal::Flag { keyword } = disposal {
            imap_keyword(keyword)?;
        }
        self.disposal = disposal.clone();
        Ok(())
    }

    async fn carrying(&mut self, ids: &[StoreId], keyword: &str) -> Result<Vec<bool>, BackendError> {
        let keyword = imap_keyword(keyword)?;
        let uids = ids.iter().map(uid_of).collect::<Result<Vec<_>, _>>()?;
        let mut flagged = HashSet::new();
        for set in uid_sets(&uids, MAX_SET_LEN) {
            self.conn
                .run(&format!("UID SEARCH UID {set} KEYWORD {keyword}"), |response| {
                    if let Response::MailboxData(MailboxDatum::Search(found)) = response {
                        flagged.extend(found.iter().copied());
                    }
                })
                .await?
                .ok_or_refused("searching for the keyword")?;
        }
        Ok(uids.iter().map(|uid| flagged.contains(uid)).collect())
    }

    /// `UID SEARCH UID … SEEN`: the server says which carry `\Seen`.
    async fn seen(&mut self, ids: &[StoreId]) -> Result<Vec<bool>, BackendError> {
        let uids = ids.iter().map(uid_of).collect::<Result<Vec<_>, _>>()?;
        let mut seen = HashSet::new();
        for set in uid_sets(&uids, MAX_SET_LEN) {
            self.conn
                .run(&format!("UID SEARCH UID {set} SEEN"), |response| {
                    if let Response::MailboxData(MailboxDatum::Search(found)) = response {
                        seen.extend(found.iter().copied());
                    }
                })
                .await?
                .ok_or_refused("searching for read messages")?;
        }
        Ok(uids.iter().map(|uid| seen.contains(uid)).collect())
    }

    async fn retrieved(&mut self, id: &StoreId) -> Result<(), BackendError> {
        if !self.mark_seen || self.selected.read_only {
            return Ok(());
        }
        let uid = uid_of(id)?;
        self.conn
            .run(&format!("UID STORE {uid} +FLAGS.SILENT (\\Seen)"), |_| {})
            .await?
            .ok_or_refused("flagging a message \\Seen")?;
        Ok(())
    }

    async fn remove(&mut self, ids: &[StoreId]) -> Result<(), BackendError> {
        if ids.is_empty() {
            return Ok(());
        }
        let uids = ids.iter().map(uid_of).collect::<Result<Vec<_>, _>>()?;
        if self.selected.read_only {
            return Err(BackendError::Permanent("the mailbox is read-only".into()));
        }
        let trash = match self.disposal.clone() {
            Disposal::AsConfigured if self.selected.uidplus => None,
            Disposal::AsConfigured if self.selected.can_move => Some(self.trash_mailbox().await?),
            Disposal::AsConfigured => {
                return Err(BackendError::Permanent(
                    "server lacks UIDPLUS and MOVE: popgate cannot remove exactly the deleted messages".into(),
                ));
            }
            Disposal::Expunge if self.selected.uidplus => None,
            Disposal::Expunge => {
                return Err(BackendError::Permanent(
                    "on_delete = \"expunge\" needs UIDPLUS (UID EXPUNGE), which the server lacks".into(),
                ));
            }
            Disposal::Trash => {
                let trash = self.special_use_mailbox(SpecialUse::Trash, self.trash.clone()).await?;
                return self.move_out(&uids, &trash).await;
            }
            Disposal::Archive { folder } => {
                let archive = self.special_use_mailbox(SpecialUse::Archive, folder).await?;
                return self.move_out(&uids, &archive).await;
            }
            Disposal::Flag { keyword } => return self.flag(&uids, &keyword).await,
        };
        self.check_uidvalidity().await?;
        if self.selected.uidplus {
            // Only the named UIDs are flagged and expunged; a bare EXPUNGE
            // would also remove what other clients flagged \Deleted.
            for set in uid_sets(&uids, MAX_SET_LEN) {
                self.conn
                    .run(&format!("UID STORE {set} +FLAGS.SILENT (\\Deleted)"), |_| {})
                    .await?
                    .ok_or_refused("flagging messages \\Deleted")?;
                // The untagged EXPUNGEs carry sequence numbers: not used.
                self.conn.run(&format!("UID EXPUNGE {set}"), |_| {}).await?.ok_or_refused("UID EXPUNGE")?;
            }
        } else if let Some(trash) = trash {
            for set in uid_sets(&uids, MAX_SET_LEN) {
                self.conn
                    .run(&format!("UID MOVE {set} {trash}"), |_| {})
                    .await?
                    .ok_or_refused("moving messages to the trash mailbox")?;
            }
        }
        self.verify_gone(&uids).await
    }

    async fn close(self: Box<Self>) {
        let limit = self.conn.limit().min(LOGOUT_LIMIT);
        self.conn.logout(limit).await;
    }
}
