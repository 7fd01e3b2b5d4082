//! Device mailbox policies (`[account.policy]`, `[account.device.policy]`):
//! which messages a device sees and what its DELE means, in one vocabulary
//! for every backend. Owns the configuration keys, the merge of a device's
//! override over its account's setting, and the pure decisions (is this
//! message's sender allowed?), and `apply`, which the login calls once: it
//! tells the backend session what DELE means (`Mailbox::dispose_as`) and
//! leaves out of the maildrop what the device must not see, decided on the
//! listing and on headers read once through the `Mailbox` trait.
//!
//! Trust model of `require_dmarc_pass`: a From header is trivially forged,
//! and so is an `Authentication-Results` header written by the sender. Only
//! the topmost `Authentication-Results` header, and only when it carries the
//! configured `authserv_id` (the provider's own name, RFC 8601), counts: the
//! receiving provider stamps it last, above everything the sender wrote,
//! and removes forged ones bearing its name.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::mime_filter::{self, AttachmentTypes};
use crate::backend::select::BackendConfig;
use crate::backend::{Disposal, ListedMessage, Mailbox};
use crate::mail::{BackendError, StoreId};

use super::seen;

/// The most header octets read per message to decide on its sender.
pub const HEADER_LIMIT: usize = 64 * 1024;
/// Bounds the configured list (it is searched per message at login).
const MAX_ALLOWED_SENDERS: usize = 1000;

/// What a device's DELE does once the session commits (the UPDATE state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDelete {
    /// Removed from the mailbox (IMAP: UID EXPUNGE).
    Expunge,
    /// Moved to the trash.
    Trash,
    /// Moved to the archive.
    Archive,
    /// Marked with a keyword or label and hidden from this device.
    Flag,
    /// Nothing is removed; the log says what would have been (a dry run).
    Keep,
}

/// `[account.policy]` or `[account.device.policy]`: every key optional; a
/// device's key, when set, replaces its account's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Unset: the backend's own delete settings apply (IMAP `trash_mailbox`,
    /// Gmail/Graph/JMAP `delete`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_delete: Option<OnDelete>,
    /// Addresses (`alice@example.com`) and domains (`example.com` or
    /// `@example.com`) whose mail the device sees; others are hidden from its
    /// maildrop, never deleted. Unset: every sender. An empty list hides
    /// everything.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_senders: Option<Vec<String>>,
    /// `on_delete = "archive"`: this folder instead of the store's archive
    /// (IMAP: the `\Archive` special-use mailbox).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archive_folder: Option<String>,
    /// `on_delete = "flag"`: the keyword set (default `$Printed`); messages
    /// carrying it are hidden from the device from then on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flag_keyword: Option<String>,
    /// Larger messages (as the store lists them) are hidden.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_size_bytes: Option<u64>,
    /// Messages whose Date header is older are hidden (no readable Date:
    /// shown).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_age_days: Option<u32>,
    /// Only messages whose topmost `Authentication-Results` header, stamped
    /// by `authserv_id`, says `dmarc=pass` for the From domain are shown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub require_dmarc_pass: Option<bool>,
    /// The provider's authserv-id (`mx.google.com`, the MX host name): the
    /// only `Authentication-Results` stamp trusted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authserv_id: Option<String>,

    // --- Several devices on one mailbox, and RFC 2449 CAPA (docs/POLICIES.md) ---
    /// How the account's devices share its mailbox (account only: a device
    /// may not override it). Unset: `first_come`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sharing: Option<Sharing>,
    /// `each_device_once`: the file keeping the devices' records (account
    /// only). Unset: `device-records.json` beside the token store; with a
    /// `[state] url` the records live in the shared store instead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub records_file: Option<std::path::PathBuf>,
    /// The least time between two logins of a device (RFC 2449
    /// LOGIN-DELAY, shown in CAPA and enforced: a login sooner is
    /// refused with `-ERR [LOGIN-DELAY]`). 0 to 86400 seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub login_delay_secs: Option<u64>,
    /// Only messages not marked read (IMAP `\Seen`, JMAP `$seen`, Gmail
    /// `UNREAD`, Graph `isRead`) are shown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub only_unseen: Option<bool>,
    /// Only messages with at least one attachment part of one of these
    /// media types (`application/pdf`, `image/*`) are shown, decided on the
    /// message's MIME structure (`mime_filter`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attachment_types: Option<Vec<String>>,
    /// `attachment_types`: at most this many octets of a message are read
    /// to evaluate it (default 10 MiB, 64 KiB to 50 MiB); a larger message
    /// is hidden.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attachment_scan_limit_bytes: Option<u64>,
    /// What the device gets for a message over `max_size_bytes`: nothing
    /// (`hide`, the default) or a short text notice in its place
    /// (`notice`), whose DELE removes the original.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oversize: Option<Oversize>,
}

/// `oversize`: what stands in the maildrop for a message over
/// `max_size_bytes`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Oversize {
    /// Nothing: the message is hidden from the device.
    #[default]
    Hide,
    /// A short text/plain notice (sender, subject, date, size, and that it
    /// stays in the mailbox); its DELE applies `on_delete` to the original.
    Notice,
}

/// `sharing`: how the devices of one account share its mailbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sharing {
    /// A work queue: a message retrieved and deleted by one device is gone
    /// for all (what a shared mailbox always did).
    #[default]
    FirstCome,
    /// Every device gets every message once: each keeps a record of what it
    /// had; a DELE'd message leaves the store when every device has had it.
    EachDeviceOnce,
}

/// Bounds `login_delay_secs` (a day).
pub const MAX_LOGIN_DELAY_SECS: u64 = 86_400;

/// The keyword `on_delete = "flag"` sets unless `flag_keyword` says.
pub const DEFAULT_FLAG_KEYWORD: &str = "$Printed";
/// Bounds `max_age_days` (100 years).
const MAX_AGE_DAYS: u32 = 36_500;

impl PolicyConfig {
    /// This (a device's) policy over `account`'s: each key set here wins.
    pub fn over(&self, account: &PolicyConfig) -> PolicyConfig {
        PolicyConfig {
            on_delete: self.on_delete.or(account.on_delete),
            allowed_senders: self.allowed_senders.clone().or_else(|| account.allowed_senders.clone()),
            archive_folder: self.archive_folder.clone().or_else(|| account.archive_folder.clone()),
            flag_keyword: self.flag_keyword.clone().or_else(|| account.flag_keyword.clone()),
            max_size_bytes: self.max_size_bytes.or(account.max_size_bytes),
            max_age_days: self.max_age_days.or(account.max_age_days),
            require_dmarc_pass: self.require_dmarc_pass.or(account.require_dmarc_pass),
            authserv_id: self.authserv_id.clone().or_else(|| account.authserv_id.clone()),
            // Sharing is the account's: `check_device_override` refuses it here.
            sharing: account.sharing,
            records_file: account.records_file.clone(),
            login_delay_secs: self.login_delay_secs.or(account.login_delay_secs),
            only_unseen: self.only_unseen.or(account.only_unseen),
            attachment_types: self.attachment_types.clone().or_else(|| account.attachment_types.clone()),
            attachment_scan_limit_bytes: self.attachment_scan_limit_bytes.or(account.attachment_scan_limit_bytes),
            oversize: self.oversize.or(account.oversize),
        }
    }

    /// A device's own `[account.device.policy]`: the keys only an account
    /// may set (how its devices share the mailbox) are refused.
    pub fn check_device_override(&self) -> Result<(), String> {
        if self.sharing.is_some() || self.records_file.is_some() {
            return Err(
                "sharing and records_file are set per account: they say how its devices share the mailbox".into()
            );
        }
        Ok(())
    }

    /// `Err(why)` for a malformed entry or a policy `backend` cannot carry
    /// out.
    pub fn check(&self, backend: &BackendConfig) -> Result<(), String> {
        if let Some(on_delete) = self.on_delete
            && let Err(why) = unsupported(backend_kind(backend), on_delete, self.archive_folder.is_some())
        {
            return Err(format!(
                "on_delete = \"{}\" is not supported by the {} backend: {why}",
                serde_plain_word(on_delete),
                backend_kind(backend)
            ));
        }
        if let Some(folder) = &self.archive_folder
            && (folder.trim().is_empty() || folder.len() > 255 || folder.chars().any(char::is_control))
        {
            return Err("archive_folder: 1 to 255 characters, no control characters".into());
        }
        if let Some(keyword) = &self.flag_keyword
            && crate::backend::imap::imap_keyword(keyword).is_err()
        {
            return Err(format!("flag_keyword: `{keyword}` is not a keyword (an atom such as $Printed)"));
        }
        if self.max_size_bytes == Some(0) {
            return Err("max_size_bytes: at least 1".into());
        }
        if self.oversize == Some(Oversize::Notice) && self.max_size_bytes.is_none() {
            return Err("oversize = \"notice\" needs max_size_bytes: it says which messages are too large".into());
        }
        if let Some(days) = self.max_age_days
            && !(1..=MAX_AGE_DAYS).contains(&days)
        {
            return Err(format!("max_age_days: 1 to {MAX_AGE_DAYS}"));
        }
        if self.require_dmarc_pass == Some(true) {
            match self.authserv_id.as_deref().map(str::trim) {
                Some(id) if Sender::parse(id).is_some_and(|s| matches!(s, Sender::Domain(_))) => {}
                _ => {
                    return Err("require_dmarc_pass needs `authserv_id`: the provider's host name, whose \
                                Authentication-Results stamp alone is trusted"
                        .into());
                }
            }
        }
        if let Some(list) = &self.allowed_senders {
            if list.len() > MAX_ALLOWED_SENDERS {
                return Err(format!("allowed_senders: at most {MAX_ALLOWED_SENDERS} entries"));
            }
            for entry in list {
                Sender::parse(entry)
                    .ok_or_else(|| format!("allowed_senders: `{entry}` is not an address or domain"))?;
            }
        }
        if let Some(secs) = self.login_delay_secs
            && secs > MAX_LOGIN_DELAY_SECS
        {
            return Err(format!("login_delay_secs: 0 to {MAX_LOGIN_DELAY_SECS}"));
        }
        if let Some(path) = &self.records_file
            && (path.as_os_str().is_empty() || path.file_name().is_none())
        {
            return Err("records_file: a file path".into());
        }
        if self.attachment_types.is_some() || self.attachment_scan_limit_bytes.is_some() {
            mime_filter::check(self.attachment_types.as_deref().unwrap_or_default(), self.attachment_scan_limit_bytes)?;
        }
        Ok(())
    }

    /// The policy in force, once checked.
    pub fn resolve(&self) -> DevicePolicy {
        let keyword = || self.flag_keyword.clone().unwrap_or_else(|| DEFAULT_FLAG_KEYWORD.to_string());
        DevicePolicy {
            keep: self.on_delete == Some(OnDelete::Keep),
            disposal: match self.on_delete {
                None | Some(OnDelete::Keep) => Disposal::AsConfigured,
                Some(OnDelete::Expunge) => Disposal::Expunge,
                Some(OnDelete::Trash) => Disposal::Trash,
                Some(OnDelete::Archive) => Disposal::Archive { folder: self.archive_folder.clone() },
                Some(OnDelete::Flag) => Disposal::Flag { keyword: keyword() },
            },
            hidden_keyword: (self.on_delete == Some(OnDelete::Flag)).then(keyword),
            max_size_bytes: self.max_size_bytes,
            oversize_notice: self.oversize == Some(Oversize::Notice),
            max_age: self.max_age_days.map(|d| Duration::from_secs(u64::from(d) * 86_400)),
            dmarc_stamped_by: match self.require_dmarc_pass {
                Some(true) => self.authserv_id.as_ref().map(|id| id.trim().to_lowercase()),
                _ => None,
            },
            allowed_senders: self
                .allowed_senders
                .as_ref()
                .map(|list| AllowedSenders(list.iter().filter_map(|e| Sender::parse(e)).collect())),
            sharing: self.sharing.unwrap_or_default(),
            seat: None,
            login_delay: self.login_delay_secs.filter(|s| *s > 0).map(Duration::from_secs),
            only_unseen: self.only_unseen == Some(true),
            attachment_types: self
                .attachment_types
                .as_ref()
                .map(|types| AttachmentTypes::new(types, self.attachment_scan_limit_bytes)),
        }
    }
}

fn serde_plain_word(on_delete: OnDelete) -> &'static str {
    match on_delete {
        OnDelete::Expunge => "expunge",
        OnDelete::Trash => "trash",
        OnDelete::Archive => "archive",
        OnDelete::Flag => "flag",
        OnDelete::Keep => "keep",
    }
}

/// The policy × backend table (docs/POLICIES.md): `Err(why)` where a
/// backend cannot carry out `on_delete`.
pub fn unsupported(kind: &str, on_delete: OnDelete, named_folder: bool) -> Result<(), &'static str> {
    match (kind, on_delete) {
        (_, OnDelete::Keep | OnDelete::Expunge | OnDelete::Trash) => Ok(()),
        ("imap" | "demo", _) => Ok(()),
        ("jmap" | "gmail" | "graph", OnDelete::Archive) if named_folder => Err(
            "archive_folder is not built here: archive means JMAP's mailbox with role archive, Gmail's \"remove the \
             INBOX label\" or Graph's archive folder",
        ),
        // JMAP: the mailbox with role archive (created if missing), the
        // keyword set with Email/set; Gmail: a user label (created if
        // missing); Graph: a category.
        ("jmap" | "gmail" | "graph", OnDelete::Archive | OnDelete::Flag) => Ok(()),
        _ => Err("unknown backend"),
    }
}

fn backend_kind(backend: &BackendConfig) -> &'static str {
    match backend {
        BackendConfig::Imap(_) => "imap",
        BackendConfig::Jmap(_) => "jmap",
        BackendConfig::Gmail(_) => "gmail",
        BackendConfig::Graph(_) => "graph",
        BackendConfig::Demo(_) => "demo",
    }
}

/// The policy one login is served with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DevicePolicy {
    /// DELE is a dry run: the UPDATE state removes nothing.
    pub keep: bool,
    /// `None`: every message is shown.
    pub allowed_senders: Option<AllowedSenders>,
    /// What DELE does in the UPDATE state (unless `keep`).
    pub disposal: Disposal,
    /// `on_delete = "flag"`: messages with this keyword are hidden.
    pub hidden_keyword: Option<String>,
    pub max_size_bytes: Option<u64>,
    /// `oversize = "notice"`: a message over `max_size_bytes` is replaced
    /// by a notice instead of hidden.
    pub oversize_notice: bool,
    pub max_age: Option<Duration>,
    /// `require_dmarc_pass`: the authserv-id (lower case) whose stamp counts.
    pub dmarc_stamped_by: Option<String>,

    // --- Sharing and CAPA ---
    pub sharing: Sharing,
    /// `each_device_once`: this device's place among its account's devices
    /// (the router attaches it; `None` otherwise, or for a pass-through
    /// login).
    pub seat: Option<seen::Seat>,
    /// `login_delay_secs` (none when 0).
    pub login_delay: Option<Duration>,
    /// `only_unseen`: messages marked read are hidden.
    pub only_unseen: bool,
    /// `attachment_types`: messages without such an attachment are hidden.
    pub attachment_types: Option<AttachmentTypes>,
}

impl DevicePolicy {
    /// With `each_device_once`'s seat (the router's, or a test's).
    pub fn seated(mut self, seat: seen::Seat) -> DevicePolicy {
        self.sharing = Sharing::EachDeviceOnce;
        self.seat = Some(seat);
        self
    }

    /// RFC 2449 EXPIRE for this device, in days (`None`: NEVER). A device
    /// that gets each message once never sees a retrieved message again,
    /// DELE'd or not: to it, the server keeps nothing after retrieval
    /// (`EXPIRE 0`). Every other policy removes only what the device
    /// DELE'd (or nothing: keep, flag), and popgate deletes nothing on its
    /// own: `EXPIRE NEVER`.
    pub fn expire_days(&self) -> Option<u32> {
        match self.sharing {
            Sharing::EachDeviceOnce => Some(0),
            Sharing::FirstCome => None,
        }
    }
}

impl DevicePolicy {
    fn needs_headers(&self) -> bool {
        self.allowed_senders.is_some()
            || self.max_age.is_some()
            || self.dmarc_stamped_by.is_some()
            || self.attachment_types.is_some()
    }

    /// The header-based decisions, at `now`: `Err(reason)` hides.
    pub fn shows(&self, header: &[u8], now: SystemTime) -> Result<(), &'static str> {
        if let Some(allowed) = &self.allowed_senders
            && !allowed.allows(header)
        {
            return Err("sender not allowed for this device");
        }
        if let Some(authserv_id) = &self.dmarc_stamped_by
            && !dmarc_passed(header, authserv_id)
        {
            return Err("no DMARC pass stamped by the provider");
        }
        if let Some(max_age) = self.max_age
            && let Some(date) = mail_parser::MessageParser::new().parse_headers(header).and_then(|m| m.date().cloned())
        {
            let sent = SystemTime::UNIX_EPOCH + Duration::from_secs(date.to_timestamp().max(0) as u64);
            if now.duration_since(sent).is_ok_and(|age| age > max_age) {
                return Err("older than max_age_days");
            }
        }
        Ok(())
    }
}

/// Called once per login, on the fresh listing: tells the backend session
/// what DELE means for this device, and returns the messages the device
/// sees (the others stay in the mailbox, out of the maildrop). A message
/// gone since the listing is left out too. Notices (`oversize = "notice"`)
/// are left out here: see `apply_with_notices`.
pub async fn apply(
    mailbox: &mut dyn Mailbox,
    policy: &DevicePolicy,
    listed: Vec<ListedMessage>,
) -> Result<Vec<ListedMessage>, BackendError> {
    let shown = apply_with_notices(mailbox, policy, listed).await?;
    Ok(shown
        .into_iter()
        .filter_map(|entry| match entry {
            Shown::Message(message) => Some(message),
            Shown::Notice(_) => None,
        })
        .collect())
}

/// One entry of the device's maildrop, in listing order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shown {
    /// A stored message, as listed.
    Message(ListedMessage),
    /// `oversize = "notice"`: the notice standing for a message over
    /// `max_size_bytes`.
    Notice(Notice),
}

/// `apply`, with each message over `max_size_bytes` replaced by its notice
/// where the policy says `oversize = "notice"` (in the original's place).
/// An oversize message passes every other filter first: a device gets a
/// notice only for what it would otherwise have seen.
pub async fn apply_with_notices(
    mailbox: &mut dyn Mailbox,
    policy: &DevicePolicy,
    listed: Vec<ListedMessage>,
) -> Result<Vec<Shown>, BackendError> {
    mailbox.dispose_as(if policy.keep { &Disposal::AsConfigured } else { &policy.disposal })?;
    let before = listed.len();
    let mut shown: Vec<ListedMessage> = match policy.max_size_bytes {
        Some(max) if !policy.oversize_notice => listed.into_iter().filter(|m| m.size.value() <= max).collect(),
        _ => listed,
    };
    if policy.only_unseen && !shown.is_empty() {
        let ids: Vec<StoreId> = shown.iter().map(|m| m.id.clone()).collect();
        let seen = mailbox.seen(&ids).await?;
        if seen.len() != shown.len() {
            return Err(BackendError::unavailable("the backend answered for a different number of messages"));
        }
        shown = shown.into_iter().zip(seen).filter(|(_, seen)| !seen).map(|(message, _)| message).collect();
    }
    if let Some(keyword) = &policy.hidden_keyword
        && !shown.is_empty()
    {
        let ids: Vec<StoreId> = shown.iter().map(|m| m.id.clone()).collect();
        let flagged = mailbox.carrying(&ids, keyword).await?;
        if flagged.len() != shown.len() {
            return Err(BackendError::unavailable("the backend answered for a different number of messages"));
        }
        let flagged: HashSet<StoreId> = ids.into_iter().zip(flagged).filter(|(_, f)| *f).map(|(id, _)| id).collect();
        shown.retain(|m| !flagged.contains(&m.id));
    }
    if policy.needs_headers() && !shown.is_empty() {
        let ids: Vec<StoreId> = shown.iter().map(|m| m.id.clone()).collect();
        let headers = mailbox.headers(&ids, HEADER_LIMIT).await?;
        if headers.len() != shown.len() {
            return Err(BackendError::unavailable("the backend answered for a different number of messages"));
        }
        let now = SystemTime::now();
        let with_headers: Vec<(ListedMessage, bytes::Bytes)> = shown
            .into_iter()
            .zip(headers)
            .filter_map(|(message, header)| {
                let verdict = match header.as_deref() {
                    Some(header) => policy.shows(header, now),
                    None => Err("gone since the listing"),
                };
                if let Err(reason) = verdict {
                    tracing::debug!(uidl = %message.uidl, reason, "hidden from this device");
                }
                Some((message, header?)).filter(|_| verdict.is_ok())
            })
            .collect();
        shown = match &policy.attachment_types {
            Some(types) => with_attachments(mailbox, types, with_headers).await?,
            None => with_headers.into_iter().map(|(message, _)| message).collect(),
        };
    }
    if shown.len() < before {
        tracing::info!(hidden = before - shown.len(), shown = shown.len(), "messages hidden by the device policy");
    }
    match policy.max_size_bytes.filter(|_| policy.oversize_notice) {
        Some(max) => with_notices(mailbox, max, shown).await,
        None => Ok(shown.into_iter().map(Shown::Message).collect()),
    }
}

/// `oversize = "notice"`: each message over `max` replaced by its notice,
/// built from its header section (read once, bounded at `HEADER_LIMIT`).
/// One gone since the listing is left out.
async fn with_notices(
    mailbox: &mut dyn Mailbox,
    max: u64,
    shown: Vec<ListedMessage>,
) -> Result<Vec<Shown>, BackendError> {
    let large: Vec<StoreId> = shown.iter().filter(|m| m.size.value() > max).map(|m| m.id.clone()).collect();
    if large.is_empty() {
        return Ok(shown.into_iter().map(Shown::Message).collect());
    }
    let headers = mailbox.headers(&large, HEADER_LIMIT).await?;
    if headers.len() != large.len() {
        return Err(BackendError::unavailable("the backend answered for a different number of messages"));
    }
    let mut headers: std::collections::HashMap<StoreId, Option<bytes::Bytes>> =
        large.into_iter().zip(headers).collect();
    let now = SystemTime::now();
    let mut replaced = 0usize;
    let entries: Vec<Shown> = shown
        .into_iter()
        .filter_map(|message| {
            if message.size.value() <= max {
                return Some(Shown::Message(message));
            }
            match headers.remove(&message.id).flatten() {
                Some(header) => {
                    replaced += 1;
                    Some(Shown::Notice(Notice::build(&message, &header, max, now)))
                }
                None => {
                    tracing::debug!(uidl = %message.uidl, "gone since the listing");
                    None
                }
            }
        })
        .collect();
    if replaced > 0 {
        tracing::info!(replaced, limit = max, "messages over max_size_bytes offered as notices");
    }
    Ok(entries)
}

/// The domain of a notice's From and Message-ID: reserved (RFC 2606),
/// never a real host's.
const NOTICE_DOMAIN: &str = "popgate.invalid";
/// Bounds the original's subject and sender quoted in a notice (characters).
const NOTICE_FIELD_CHARS: usize = 120;

/// `oversize = "notice"`: a short text/plain message standing in a
/// device's maildrop for a message over `max_size_bytes`. Generated by
/// popgate at login and served from memory: its size is exactly what RETR
/// sends; DELE of it applies `on_delete` to `original` in the UPDATE state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// The message it stands for.
    pub original: StoreId,
    pub original_uidl: String,
    /// Stable across sessions (derived from the original's UIDL), distinct
    /// from it, 1–70 printable characters.
    pub uidl: String,
    /// The notice in canonical CRLF form (`canonical::canonicalize`): what
    /// RETR sends, before dot-stuffing.
    pub bytes: bytes::Bytes,
}

impl Notice {
    /// The notice for `original`, from its header section, at `now`.
    pub fn build(original: &ListedMessage, header: &[u8], limit: u64, now: SystemTime) -> Notice {
        let parsed = mail_parser::MessageParser::new().parse_headers(header);
        let parsed = parsed.as_ref();
        let subject = bounded_text(parsed.and_then(|m| m.subject()).unwrap_or("(no subject)"));
        let sender = parsed
            .and_then(|m| m.from())
            .and_then(|f| f.first())
            .map(|a| match (a.name(), a.address()) {
                (Some(name), Some(address)) => format!("{name} <{address}>"),
                (None, Some(address)) => address.to_string(),
                (Some(name), None) => name.to_string(),
                (None, None) => String::new(),
            })
            .map(|s| bounded_text(&s))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "(unknown)".into());
        let sent = parsed.and_then(|m| m.date()).map_or_else(|| "(unknown)".into(), |d| d.to_rfc822());
        let to = parsed
            .and_then(|m| m.to())
            .and_then(|t| t.first())
            .and_then(|a| a.address())
            .filter(|a| a.len() <= 254 && a.bytes().all(|b| b.is_ascii_graphic() && !b"<>\"(),;:[]".contains(&b)))
            .map_or_else(|| "undisclosed-recipients:;".to_string(), |a| format!("<{a}>"));
        let digest = uidl_digest(&original.uidl);
        // The original's date, so that the notice (its octets, its size) is
        // the same in every session, as a message under one UIDL must be;
        // the login's time only when the original has no readable Date.
        let date = parsed.and_then(|m| m.date()).map_or_else(
            || {
                mail_parser::DateTime::from_timestamp(
                    now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64),
                )
                .to_rfc822()
            },
            |d| d.to_rfc822(),
        );
        let size = original.size.value();
        let text = format!(
            "From: popgate <MAILER-DAEMON@{NOTICE_DOMAIN}>\r\n\
             To: {to}\r\n\
             Subject: {}\r\n\
             Date: {date}\r\n\
             Message-ID: <{digest}.notice@{NOTICE_DOMAIN}>\r\n\
             Auto-Submitted: auto-generated\r\n\
             MIME-Version: 1.0\r\n\
             Content-Type: text/plain; charset=utf-8\r\n\
             Content-Transfer-Encoding: 8bit\r\n\
             \r\n\
             A message is too large for this device ({size} octets; the limit is {limit}).\r\n\
             It was not delivered here. It stays in the mailbox: read it with another\r\n\
             mail client. Deleting this notice on this device deletes the original\r\n\
             message as this device's delete setting says.\r\n\
             \r\n\
             From:    {sender}\r\n\
             Subject: {subject}\r\n\
             Date:    {sent}\r\n\
             Size:    {size} octets\r\n",
            header_words(&format!("Message too large for this device: {subject}")),
        );
        Notice {
            original: original.id.clone(),
            original_uidl: original.uidl.clone(),
            uidl: notice_uidl(&original.uidl),
            bytes: bytes::Bytes::from(crate::canonical::canonicalize(text.as_bytes())),
        }
    }

    /// The notice's id in a maildrop: never a store's id (no store names a
    /// message with a NUL).
    pub fn id(&self) -> StoreId {
        StoreId(format!("\0notice\0{}", self.original.0))
    }

    /// Its octets as RETR sends them (unstuffed): LIST's size.
    pub fn size(&self) -> u64 {
        self.bytes.len() as u64
    }
}

/// The first 16 hex digits of the SHA-256 of a UIDL.
fn uidl_digest(uidl: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(uidl.as_bytes()).iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// The notice's UIDL for an original's: a digest prefix and `-notice`
/// (23 printable characters), the same in every session.
pub fn notice_uidl(original_uidl: &str) -> String {
    format!("{}-notice", uidl_digest(original_uidl))
}

/// One line of text from a header value: control characters and runs of
/// white space become one space; at most `NOTICE_FIELD_CHARS` characters.
fn bounded_text(value: &str) -> String {
    let words: Vec<&str> =
        value.split(|c: char| c.is_whitespace() || c.is_control()).filter(|w| !w.is_empty()).collect();
    let line = words.join(" ");
    match line.char_indices().nth(NOTICE_FIELD_CHARS) {
        Some((cut, _)) => format!("{}...", &line[..cut]),
        None => line,
    }
}

/// A header value: as is when printable ASCII, else RFC 2047 encoded
/// words (UTF-8, base64) of at most 75 characters, folded.
fn header_words(value: &str) -> String {
    use base64::Engine;
    if value.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
        return value.to_string();
    }
    let mut words = Vec::new();
    let mut chunk = String::new();
    for c in value.chars() {
        // 42 octets of UTF-8 are 56 of base64: "=?UTF-8?B?" + 56 + "?=" = 68,
        // so that even "Subject: " and the first word fit in 78.
        if chunk.len() + c.len_utf8() > 42 {
            words.push(std::mem::take(&mut chunk));
        }
        chunk.push(c);
    }
    words.push(chunk);
    words
        .iter()
        .map(|w| format!("=?UTF-8?B?{}?=", base64::engine::general_purpose::STANDARD.encode(w)))
        .collect::<Vec<_>>()
        .join("\r\n ")
}

/// `attachment_types`: the messages with an attachment of a listed type,
/// each evaluated on its MIME structure, read at most once per process
/// (`mime_filter`); the others are hidden.
async fn with_attachments(
    mailbox: &mut dyn Mailbox,
    types: &AttachmentTypes,
    messages: Vec<(ListedMessage, bytes::Bytes)>,
) -> Result<Vec<ListedMessage>, BackendError> {
    let mut shown = Vec::with_capacity(messages.len());
    for (message, header) in messages {
        let verdict = match types.structure_of(mailbox, &message.id, &message.uidl, &header).await? {
            Some(structure) => types.admits(&structure),
            None => Err("gone since the listing"),
        };
        match verdict {
            Ok(()) => shown.push(message),
            Err(reason) => tracing::debug!(uidl = %message.uidl, reason, "hidden from this device"),
        }
    }
    Ok(shown)
}

/// Whether the topmost `Authentication-Results` header is stamped by
/// `authserv_id` and says `dmarc=pass` (for the From domain, when it names
/// one with `header.from`). See the module's trust model.
pub fn dmarc_passed(header: &[u8], authserv_id: &str) -> bool {
    let Some(results) = unfolded_fields(header)
        .into_iter()
        .find_map(|(name, value)| name.eq_ignore_ascii_case("Authentication-Results").then_some(value))
    else {
        return false;
    };
    let results = without_comments(&results);
    let mut parts = results.split(';');
    let stamp = parts.next().unwrap_or("").split_whitespace().next().unwrap_or("");
    if !stamp.eq_ignore_ascii_case(authserv_id) {
        return false;
    }
    let from_domain = mail_parser::MessageParser::new()
        .parse_headers(header)
        .and_then(|m| m.from().and_then(|f| f.first()).and_then(|a| a.address()).map(str::to_lowercase))
        .and_then(|a| a.rsplit_once('@').map(|(_, d)| d.to_string()));
    parts.any(|result| {
        let mut words = result.split_whitespace();
        let passed = words.next().is_some_and(|w| w.eq_ignore_ascii_case("dmarc=pass"));
        let aligned = words.all(|w| match w.split_once('=') {
            Some((property, domain)) if property.eq_ignore_ascii_case("header.from") => {
                from_domain.as_deref().is_some_and(|d| d.eq_ignore_ascii_case(domain.trim_matches('"')))
            }
            _ => true,
        });
        passed && aligned && from_domain.is_some()
    })
}

/// Header fields in order, continuation lines joined, bounded by the
/// header section given (`HEADER_LIMIT`).
fn unfolded_fields(header: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(header);
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = fields.last_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
        } else if let Some((name, value)) = line.split_once(':') {
            fields.push((name.trim().to_string(), value.trim().to_string()));
        }
    }
    fields
}

/// RFC 5322 comments (nested parentheses) removed.
fn without_comments(value: &str) -> String {
    let mut depth = 0usize;
    value
        .chars()
        .filter(|&c| match c {
            '(' => {
                depth += 1;
                false
            }
            ')' => {
                depth = depth.saturating_sub(1);
                false
            }
            _ => depth == 0,
        })
        .collect()
}

/// One `allowed_senders` entry, lower-cased.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Sender {
    Address(String),
    Domain(String),
}

impl Sender {
    fn parse(text: &str) -> Option<Sender> {
        let text = text.trim();
        let valid_domain = |d: &str| {
            !d.is_empty()
                && d.len() <= 253
                && !d.starts_with('.')
                && !d.ends_with('.')
                && d.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b) || b >= 0x80)
        };
        match text.rsplit_once('@') {
            Some(("", domain)) => valid_domain(domain).then(|| Sender::Domain(domain.to_lowercase())),
            Some((local, domain)) => (valid_domain(domain)
                && local.len() <= 64
                && !local.chars().any(|c| c.is_whitespace() || c.is_control() || c == '@'))
            .then(|| Sender::Address(text.to_lowercase())),
            None => valid_domain(text).then(|| Sender::Domain(text.to_lowercase())),
        }
    }
}

/// The addresses and domains whose mail a device sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedSenders(Vec<Sender>);

impl AllowedSenders {
    /// The decision on a message's header section (as stored; it may be cut
    /// short at `HEADER_LIMIT`): shown only if it has a From header whose
    /// every mailbox is allowed. No From, an unparsable one, or a group
    /// without addresses: hidden — a printer prints nothing it cannot vouch
    /// for.
    pub fn allows(&self, header: &[u8]) -> bool {
        let Some(message) = mail_parser::MessageParser::new().parse_headers(header) else { return false };
        let Some(from) = message.from() else { return false };
        let mut addresses = from.iter().peekable();
        if addresses.peek().is_none() {
            return false;
        }
        addresses.all(|addr| addr.address().is_some_and(|a| self.allows_address(a)))
    }

    fn allows_address(&self, address: &str) -> bool {
        let address = address.trim().to_lowercase();
        let Some((_, domain)) = address.rsplit_once('@') else { return false };
        self.0.iter().any(|entry| match entry {
            Sender::Address(a) => *a == address,
            Sender::Domain(d) => d == domain,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(list: &[&str]) -> AllowedSenders {
        let config =
            PolicyConfig { allowed_senders: Some(list.iter().map(|s| s.to_string()).collect()), ..Default::default() };
        config.resolve().allowed_senders.unwrap()
    }

    #[test]
    fn senders_decided_on_the_from_header() {
        let list = allowed(&["boss@example.com", "@office.example", "print.example.org"]);
        let table: &[(&str, bool)] = &[
            ("From: boss@example.com\r\nSubject: x\r\n\r\n", true),
            ("From: \"The Boss\" <BOSS@Example.COM>\r\n\r\n", true),
            ("From: Someone <other@example.com>\r\n\r\n", false),
            ("From: a@office.example\r\n\r\n", true),
            ("From: a@sub.office.example\r\n\r\n", false),
            ("From: x@print.example.org\r\n\r\n", true),
            // Every mailbox must be allowed.
            ("From: boss@example.com, evil@spam.example\r\n\r\n", false),
            ("From: boss@example.com, a@office.example\r\n\r\n", true),
            // A display name that looks like an allowed address decides nothing.
            ("From: \"boss@example.com\" <evil@spam.example>\r\n\r\n", false),
            ("Subject: no from\r\n\r\n", false),
            ("From: \r\n\r\n", false),
            ("From: undisclosed:;\r\n\r\n", false),
            ("", false),
            // Folded header, LF line ends.
            ("Subject: x\nFrom: The Boss\n <boss@example.com>\n\n", true),
            // Sender and Reply-To are not From.
            ("Sender: boss@example.com\r\nFrom: evil@spam.example\r\n\r\n", false),
        ];
        for (header, expected) in table {
            assert_eq!(list.allows(header.as_bytes()), *expected, "{header:?}");
        }
    }

    #[test]
    fn an_empty_list_hides_everything() {
        assert!(!allowed(&[]).allows(b"From: a@b.example\r\n\r\n"));
    }

    #[test]
    fn a_device_key_overrides_its_account_key() {
        let account = PolicyConfig {
            on_delete: Some(OnDelete::Keep),
            allowed_senders: Some(vec!["a.example".into()]),
            ..Default::default()
        };
        let device =
            PolicyConfig { on_delete: None, allowed_senders: Some(vec!["b.example".into()]), ..Default::default() };
        let merged = device.over(&account);
        assert_eq!(merged.on_delete, Some(OnDelete::Keep));
        assert_eq!(merged.allowed_senders, Some(vec!["b.example".to_string()]));
        assert_eq!(PolicyConfig::default().over(&account), account);
        // An explicitly empty device list is an override too.
        let none = PolicyConfig { allowed_senders: Some(vec![]), ..Default::default() };
        assert_eq!(none.over(&account).allowed_senders, Some(vec![]));
    }

    #[test]
    fn check_refuses_malformed_entries_and_unsupported_delete_policies() {
        let demo = BackendConfig::Demo(Default::default());
        let bad = |list: &[&str]| PolicyConfig {
            allowed_senders: Some(list.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        };
        for entry in ["", "@", "a@", "a b@example.com", "exa mple.com", ".example.com", "@@example.com"] {
            assert!(bad(&[entry]).check(&demo).is_err(), "{entry:?}");
        }
        assert!(bad(&["a@example.com", "example.com", "@example.org"]).check(&demo).is_ok());
        let every = [OnDelete::Keep, OnDelete::Expunge, OnDelete::Trash, OnDelete::Archive, OnDelete::Flag];
        for on_delete in every {
            assert!(PolicyConfig { on_delete: Some(on_delete), ..Default::default() }.check(&demo).is_ok());
        }
    }

    #[test]
    fn the_policy_backend_table_says_why() {
        use OnDelete::*;
        let table: &[(&str, [bool; 5])] = &[
            // keep, expunge, trash, archive, flag
            ("demo", [true, true, true, true, true]),
            ("imap", [true, true, true, true, true]),
            ("jmap", [true, true, true, true, true]),
            ("gmail", [true, true, true, true, true]),
            ("graph", [true, true, true, true, true]),
        ];
        for (kind, supported) in table {
            for (on_delete, expected) in [Keep, Expunge, Trash, Archive, Flag].into_iter().zip(supported) {
                let verdict = unsupported(kind, on_delete, false);
                assert_eq!(verdict.is_ok(), *expected, "{kind} {on_delete:?}");
                if let Err(why) = verdict {
                    assert!(why.contains("not built"), "{why}");
                }
            }
        }
        assert!(unsupported("gmail", Archive, true).is_err());
        assert!(unsupported("jmap", Archive, true).is_err());
        assert!(unsupported("imap", Archive, true).is_ok());
    }

    #[test]
    fn check_refuses_bad_filter_settings() {
        let demo = BackendConfig::Demo(Default::default());
        let with = |edit: fn(&mut PolicyConfig)| {
            let mut config = PolicyConfig::default();
            edit(&mut config);
            config.check(&demo)
        };
        assert!(with(|c| c.max_size_bytes = Some(0)).is_err());
        assert!(with(|c| c.max_age_days = Some(0)).is_err());
        assert!(with(|c| c.max_age_days = Some(36_501)).is_err());
        assert!(with(|c| c.flag_keyword = Some("\\Deleted".into())).is_err());
        assert!(with(|c| c.flag_keyword = Some("two words".into())).is_err());
        assert!(with(|c| c.flag_keyword = Some("$Printed".into())).is_ok());
        assert!(with(|c| c.archive_folder = Some(" ".into())).is_err());
        assert!(with(|c| c.require_dmarc_pass = Some(true)).unwrap_err().contains("authserv_id"));
        assert!(
            with(|c| {
                c.require_dmarc_pass = Some(true);
                c.authserv_id = Some("mx.example.net".into());
            })
            .is_ok()
        );
    }

    #[test]
    fn dmarc_pass_counts_only_in_the_providers_topmost_stamp() {
        let stamped = |results: &str, from: &str| {
            format!("Authentication-Results: {results}\r\nFrom: {from}\r\nSubject: x\r\n\r\n").into_bytes()
        };
        let mx = "mx.example.net";
        let table: &[(&str, &str, bool)] = &[
            ("mx.example.net; dmarc=pass (p=REJECT) header.from=office.example", "a@office.example", true),
            (
                "MX.Example.NET;\r\n spf=pass smtp.mailfrom=office.example;\r\n dmarc=pass header.from=office.example",
                "a@office.example",
                true,
            ),
            ("mx.example.net 1; dmarc=pass", "a@office.example", true),
            // A pass for another domain than From's.
            ("mx.example.net; dmarc=pass header.from=evil.example", "a@office.example", false),
            ("mx.example.net; dmarc=fail header.from=office.example", "a@office.example", false),
            ("mx.example.net; dmarc=none; spf=pass", "a@office.example", false),
            // Stamped by someone else (the sender's own server, or a forger).
            ("evil.example; dmarc=pass header.from=office.example", "a@office.example", false),
            // "dmarc=pass" inside a comment is not a result.
            ("mx.example.net; dmarc=fail (was dmarc=pass) header.from=office.example", "a@office.example", false),
        ];
        for (results, from, expected) in table {
            assert_eq!(dmarc_passed(&stamped(results, from), mx), *expected, "{results}");
        }
        // A forged pass below the provider's fail: only the topmost counts.
        let forged = b"Authentication-Results: mx.example.net; dmarc=fail header.from=office.example\r\n\
            Authentication-Results: mx.example.net; dmarc=pass header.from=office.example\r\n\
            From: a@office.example\r\n\r\n";
        assert!(!dmarc_passed(forged, mx));
        assert!(!dmarc_passed(b"From: a@office.example\r\n\r\n", mx));
    }

    #[test]
    fn a_notice_is_canonical_bounded_and_stable() {
        use crate::backend::ReportedSize;
        let original =
            ListedMessage { id: StoreId("42".into()), uidl: "orig-42".into(), size: ReportedSize::Exact(1_000_000) };
        let long = "é".repeat(300);
        let header = format!(
            "From: \"The Boss\" <boss@office.example>\r\nTo: printer@example.com\r\nSubject: {long}\r\n\
             Date: Tue, 30 Dec 2025 10:00:00 +0000\r\n\r\n"
        );
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600);
        let notice = Notice::build(&original, header.as_bytes(), 5000, now);
        assert_eq!(notice.size(), crate::canonical::canonical_size(&notice.bytes));
        assert_eq!(notice.bytes.as_ref(), crate::canonical::canonicalize(&notice.bytes).as_slice());
        assert_eq!(notice.original, original.id);
        assert_ne!(notice.uidl, original.uidl);
        assert!((1..=70).contains(&notice.uidl.len()) && notice.uidl.bytes().all(|b| (0x21..=0x7e).contains(&b)));
        assert_eq!(notice.uidl, Notice::build(&original, b"", 5000, now + Duration::from_secs(9)).uidl);
        let text = String::from_utf8(notice.bytes.to_vec()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.is_ascii(), "{head}");
        assert!(head.lines().all(|l| l.len() <= 78), "{head}");
        assert!(head.starts_with("From: popgate <MAILER-DAEMON@popgate.invalid>\r\nTo: <printer@example.com>\r\n"));
        assert!(head.contains("\r\nSubject: =?UTF-8?B?"), "{head}");
        // The original's date, not the login's: the same octets every session.
        assert!(head.contains("\r\nDate: Tue, 30 Dec 2025 10:00:00 +0000\r\n"), "{head}");
        assert_eq!(
            notice.bytes,
            Notice::build(&original, header.as_bytes(), 5000, now + Duration::from_secs(86_400)).bytes
        );
        assert!(head.contains(&format!("\r\nMessage-ID: <{}.notice@popgate.invalid>", uidl_digest("orig-42"))));
        assert!(body.contains("From:    The Boss <boss@office.example>\r\n"), "{body}");
        assert!(body.contains(&format!("Subject: {}...\r\n", "é".repeat(NOTICE_FIELD_CHARS))), "{body}");
        assert!(body.contains("Size:    1000000 octets\r\n"), "{body}");
        assert!(body.contains("It stays in the mailbox"), "{body}");
        // Nothing readable: still a notice.
        let bare = Notice::build(&original, b"", 5000, now);
        assert!(
            String::from_utf8_lossy(&bare.bytes)
                .contains("Subject: Message too large for this device: (no subject)\r\n")
        );
    }

    #[test]
    fn oversize_merges_and_notice_needs_a_size_limit() {
        let demo = BackendConfig::Demo(Default::default());
        let account =
            PolicyConfig { max_size_bytes: Some(1000), oversize: Some(Oversize::Notice), ..Default::default() };
        let device = PolicyConfig { oversize: Some(Oversize::Hide), ..Default::default() };
        assert_eq!(device.over(&account).oversize, Some(Oversize::Hide));
        assert_eq!(PolicyConfig::default().over(&account).oversize, Some(Oversize::Notice));
        assert!(account.check(&demo).is_ok());
        assert!(account.resolve().oversize_notice);
        assert!(!device.over(&account).resolve().oversize_notice);
        let alone = PolicyConfig { oversize: Some(Oversize::Notice), ..Default::default() };
        assert!(alone.check(&demo).unwrap_err().contains("max_size_bytes"));
    }

    #[test]
    fn age_is_decided_on_the_date_header() {
        let policy = PolicyConfig { max_age_days: Some(7), ..Default::default() }.resolve();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600); // 2026-01-01
        let dated = |date: &str| format!("From: a@b.example\r\nDate: {date}\r\n\r\n").into_bytes();
        assert!(policy.shows(&dated("Tue, 30 Dec 2025 10:00:00 +0000"), now).is_ok());
        assert!(policy.shows(&dated("Mon, 01 Dec 2025 10:00:00 +0000"), now).is_err());
        // No readable Date: age unknown, shown.
        assert!(policy.shows(b"From: a@b.example\r\n\r\n", now).is_ok());
    }
}
