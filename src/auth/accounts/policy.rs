//! Device mailbox policies (`[account.policy]`, `[account.device.policy]`):
//! which messages a device sees and what its DELE means, in one vocabulary
//! for every backend. Owns the configuration keys, the merge of a device's
//! override over its account's setting, and the pure decisions (is this
//! message's sender allowed?). Performs no I/O: the server fetches the
//! headers through the `Mailbox` trait and asks here.

use serde::{Deserialize, Serialize};

use crate::backend::select::BackendConfig;

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
}

impl PolicyConfig {
    /// This (a device's) policy over `account`'s: each key set here wins.
    pub fn over(&self, account: &PolicyConfig) -> PolicyConfig {
        PolicyConfig {
            on_delete: self.on_delete.or(account.on_delete),
            allowed_senders: self.allowed_senders.clone().or_else(|| account.allowed_senders.clone()),
        }
    }

    /// `Err(why)` for a malformed entry or a policy `backend` cannot carry
    /// out.
    pub fn check(&self, backend: &BackendConfig) -> Result<(), String> {
        match self.on_delete {
            None | Some(OnDelete::Keep) => {}
            Some(other) => {
                let word = serde_plain_word(other);
                return Err(format!(
                    "on_delete = \"{word}\" is not supported by the {} backend yet: use \"keep\", or leave \
                     on_delete unset for the backend's own delete settings",
                    backend_kind(backend)
                ));
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
        Ok(())
    }

    /// The policy in force, once checked.
    pub fn resolve(&self) -> DevicePolicy {
        DevicePolicy {
            keep: self.on_delete == Some(OnDelete::Keep),
            allowed_senders: self
                .allowed_senders
                .as_ref()
                .map(|list| AllowedSenders(list.iter().filter_map(|e| Sender::parse(e)).collect())),
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
        let account = PolicyConfig { on_delete: Some(OnDelete::Keep), allowed_senders: Some(vec!["a.example".into()]) };
        let device = PolicyConfig { on_delete: None, allowed_senders: Some(vec!["b.example".into()]) };
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
        let keep = PolicyConfig { on_delete: Some(OnDelete::Keep), ..Default::default() };
        assert!(keep.check(&demo).is_ok());
        for on_delete in [OnDelete::Expunge, OnDelete::Trash, OnDelete::Archive, OnDelete::Flag] {
            let why = PolicyConfig { on_delete: Some(on_delete), ..Default::default() }.check(&demo).unwrap_err();
            assert!(why.contains("not supported by the demo backend"), "{why}");
        }
    }
}
