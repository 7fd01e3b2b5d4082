//! `[[account]]`: pass-through routes and mapped accounts with their device
//! users, and the checks that tie them to the configured backends and the
//! token store. The `AccountRouter` (`router.rs`) is built from these.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::policy::PolicyConfig;
use crate::auth::oauth::OAuthConfig;
use crate::auth::passwords::{DeviceHash, SecretSource};
use crate::auth::tokens::TokenStoreConfig;
use crate::backend::select::BackendConfig;
use crate::mail::InvalidSetting;

/// The name of the `[backend]` table among the named backends.
pub const DEFAULT_BACKEND: &str = "default";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountMode {
    /// Clients log in with the backend's own credentials.
    Passthrough,
    /// Device users with local passwords; popgate holds the backend's.
    Mapped,
}

/// `[[account]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountConfig {
    /// Letters, digits, `.`, `_`, `-`; unique. Used by `popgate oauth login
    /// NAME`, in logs and in metrics.
    pub name: String,
    pub mode: AccountMode,
    /// A backend: "default" (the `[backend]` table) or a `[backends.NAME]`.
    #[serde(default = "default_backend")]
    pub backend: String,
    /// passthrough: the user names routed here — exact names, `*@domain`,
    /// or `*` for every user no other account takes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<String>,
    /// mapped: the user name popgate logs in to the backend with (the
    /// mailbox address for OAuth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login: Option<String>,
    /// mapped, with a password or app password: from this environment
    /// variable…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// …or this file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// mapped, with OAuth 2.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth: Option<OAuthConfig>,
    /// mapped: the device users.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device: Vec<DeviceConfig>,
    /// How this account's devices send mail through a `protocol =
    /// "submission"` listener (scan to email).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submission: Option<SubmissionConfig>,
    /// `[account.policy]`: which messages the account's POP3 users see and
    /// what DELE does (see `policy.rs`); a device may override each key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyConfig>,
}

/// What a sender or From outside the account's addresses gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ForeignSender {
    /// 550 with a clear text.
    #[default]
    Refuse,
    /// Replaced by the account's address (scanners that put their own name
    /// in From).
    Rewrite,
}

/// `[account.submission]`: the upstream a device's message is relayed to
/// (synchronously, with the account's credentials), and the envelope rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SubmissionConfig {
    /// `smtp+starttls://host[:587]`, `smtps://host[:465]`, or
    /// `smtp://host[:25]` (no TLS: loopback hosts only). Unset: derived from
    /// the backend (IMAP at Gmail: smtp.gmail.com:587; at Microsoft 365:
    /// smtp.office365.com:587), or — for the Gmail API and Microsoft Graph
    /// backends — sent through the API itself (`users.messages.send`,
    /// `sendMail`) with the account's API token, which SMTP would refuse.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
    /// PEM CA certificates trusted for the relay instead of the public roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay_ca_file: Option<PathBuf>,
    /// Seconds the upstream has to accept a message (the device waits).
    pub relay_timeout_secs: u64,
    /// The address devices send as. Unset: the account's `login` (mapped) or
    /// the user name (passthrough).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Other addresses the upstream lets this account send as.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    pub foreign_sender: ForeignSender,
    /// Recipient domains allowed; empty: any.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub recipient_domains: Vec<String>,
    /// Per device user and rolling hour.
    pub max_messages_per_hour: u32,
    pub max_recipients_per_hour: u32,
}

impl Default for SubmissionConfig {
    fn default() -> Self {
        SubmissionConfig {
            relay: None,
            relay_ca_file: None,
            relay_timeout_secs: 60,
            address: None,
            aliases: Vec::new(),
            foreign_sender: ForeignSender::Refuse,
            recipient_domains: Vec::new(),
            max_messages_per_hour: 100,
            max_recipients_per_hour: 500,
        }
    }
}

/// Where a relay URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayUrl {
    pub host: String,
    pub port: u16,
    pub tls: RelayTls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayTls {
    StartTls,
    Implicit,
    /// Cleartext: loopback only.
    None,
}

impl RelayUrl {
    pub fn parse(text: &str) -> Result<RelayUrl, String> {
        let url = url::Url::parse(text).map_err(|e| format!("`{text}`: {e}"))?;
        let (tls, default_port) = match url.scheme() {
            "smtp+starttls" => (RelayTls::StartTls, 587),
            "smtps" => (RelayTls::Implicit, 465),
            "smtp" => (RelayTls::None, 25),
            other => return Err(format!("`{text}`: scheme `{other}`; use smtp+starttls, smtps or smtp")),
        };
        if !url.username().is_empty() || url.password().is_some() || !matches!(url.path(), "" | "/") {
            return Err(format!("`{text}`: only scheme://host:port (credentials come from the account)"));
        }
        let host = url.host_str().filter(|h| !h.is_empty()).ok_or_else(|| format!("`{text}`: no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if tls == RelayTls::None && !loopback {
            return Err(format!(
                "`{text}`: smtp:// sends the account's credentials in the clear; only to a loopback host"
            ));
        }
        Ok(RelayUrl { host, port: url.port().unwrap_or(default_port), tls })
    }
}

impl SubmissionConfig {
    /// Messages go through the backend's mail API, not SMTP: no `relay`
    /// and an API backend (its tokens carry API scopes, not SMTP's).
    pub fn sends_through_api(&self, backend: &BackendConfig) -> bool {
        self.relay.is_none() && matches!(backend, BackendConfig::Gmail(_) | BackendConfig::Graph(_))
    }

    /// The relay: configured, or derived from the backend (never for an
    /// account that `sends_through_api`).
    pub fn relay_url(&self, backend: &BackendConfig) -> Result<RelayUrl, String> {
        if let Some(relay) = &self.relay {
            return RelayUrl::parse(relay);
        }
        let host = match backend {
            BackendConfig::Imap(imap) if imap.host.eq_ignore_ascii_case("imap.gmail.com") => Some("smtp.gmail.com"),
            BackendConfig::Imap(imap)
                if ["outlook.office365.com", "outlook.office.com"]
                    .iter()
                    .any(|h| imap.host.eq_ignore_ascii_case(h)) =>
            {
                Some("smtp.office365.com")
            }
            _ => None,
        };
        match host {
            Some(host) => Ok(RelayUrl { host: host.into(), port: 587, tls: RelayTls::StartTls }),
            None => Err("no `relay` set, and none can be derived from this backend".into()),
        }
    }

    fn check(&self, backend: &BackendConfig) -> Result<(), String> {
        if !self.sends_through_api(backend) {
            self.relay_url(backend).map_err(|e| format!("submission.relay: {e}"))?;
        }
        let bounded = |key: &str, value: u64, bounds: std::ops::RangeInclusive<u64>| {
            InvalidSetting::bounded(key, value, bounds).map_err(|e| format!("submission.{}: {}", e.key, e.why))
        };
        bounded("relay_timeout_secs", self.relay_timeout_secs, 1..=600)?;
        bounded("max_messages_per_hour", self.max_messages_per_hour.into(), 1..=100_000)?;
        bounded("max_recipients_per_hour", self.max_recipients_per_hour.into(), 1..=1_000_000)?;
        for address in self.address.iter().chain(&self.aliases) {
            if !address.contains('@') || !valid_user_name(address) {
                return Err(format!("submission: `{address}` is not an address"));
            }
        }
        if self.aliases.len() > 100 || self.recipient_domains.len() > 1000 {
            return Err("submission: at most 100 aliases and 1000 recipient_domains".into());
        }
        for domain in &self.recipient_domains {
            if domain.is_empty() || domain.contains(['@', '*']) || !valid_user_name(domain) {
                return Err(format!("submission.recipient_domains: `{domain}` is not a domain"));
            }
        }
        Ok(())
    }
}

fn default_backend() -> String {
    DEFAULT_BACKEND.into()
}

/// `[[account.device]]`: one POP3 user of a mapped account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// The POP3 user name (unique across accounts).
    pub user: String,
    /// Argon2id PHC string, from `popgate passwd`.
    pub password_hash: String,
    /// `false` refuses this device's logins; the others are not affected.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// `[account.device.policy]`: keys set here replace the account's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyConfig>,
}

impl AccountConfig {
    /// The policy `device` (a device user of this account, or `None` for a
    /// pass-through login) is served with.
    pub fn policy_for(&self, device: Option<&DeviceConfig>) -> PolicyConfig {
        let account = self.policy.clone().unwrap_or_default();
        match device.and_then(|d| d.policy.as_ref()) {
            Some(own) => own.over(&account),
            None => account,
        }
    }
}

fn yes() -> bool {
    true
}

fn valid_user_name(user: &str) -> bool {
    !user.is_empty() && user.len() <= 255 && !user.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// The accounts with what they refer to: the `[backend]` table, the named
/// `[backends.NAME]` and the `[token_store]`.
#[derive(Debug, Clone, Copy)]
pub struct AccountsSetup<'a> {
    pub accounts: &'a [AccountConfig],
    pub backend: &'a BackendConfig,
    pub backends: &'a BTreeMap<String, BackendConfig>,
    pub token_store: Option<&'a TokenStoreConfig>,
    /// `[state]`: with a `url`, tokens live in the shared store.
    pub state: Option<&'a crate::state::StateConfig>,
}

impl<'a> AccountsSetup<'a> {
    /// The backend an account names: "default" or a `[backends.NAME]`.
    pub fn backend_named(&self, name: &str) -> Option<&'a BackendConfig> {
        match name {
            DEFAULT_BACKEND => Some(self.backend),
            other => self.backends.get(other),
        }
    }

    /// Checks the accounts against each other, the backends they name and
    /// the token store.
    pub fn check(&self) -> Result<(), InvalidSetting> {
        check_accounts(self.accounts, |name| self.backend_named(name), self.token_store)
            .and_then(|()| {
                let shared = self.state.is_some_and(|s| s.url.is_some());
                check_sharing(self.accounts, self.token_store.is_some() || shared)
            })
            .map_err(|why| InvalidSetting::new("account", why))
    }
}

/// `sharing` (docs/POLICIES.md): set per account, only on mapped accounts
/// (a pass-through user is an account of its own), and with somewhere to
/// keep the records (`records_file`, beside the token store, or `[state]`).
fn check_sharing(accounts: &[AccountConfig], records_have_a_home: bool) -> Result<(), String> {
    use super::policy::Sharing;
    for account in accounts {
        let name = &account.name;
        for device in &account.device {
            if let Some(own) = &device.policy {
                own.check_device_override()
                    .map_err(|why| format!("account `{name}`: device `{}`: policy: {why}", device.user))?;
            }
        }
        let policy = account.policy_for(None);
        if policy.sharing != Some(Sharing::EachDeviceOnce) {
            continue;
        }
        if account.mode != AccountMode::Mapped {
            return Err(format!(
                "account `{name}`: sharing = \"each_device_once\" needs a mapped account with devices"
            ));
        }
        if policy.records_file.is_none() && !records_have_a_home {
            return Err(format!(
                "account `{name}`: sharing = \"each_device_once\" needs somewhere to keep the device records: \
                 policy.records_file, a [token_store] (the file goes beside it) or a [state] url"
            ));
        }
    }
    Ok(())
}

/// `Err(why)`, naming the account.
fn check_accounts<'a>(
    accounts: &[AccountConfig],
    backend: impl Fn(&str) -> Option<&'a BackendConfig>,
    token_store: Option<&TokenStoreConfig>,
) -> Result<(), String> {
    let mut names = HashSet::new();
    let mut device_users: HashMap<&str, &str> = HashMap::new();
    let mut patterns: HashMap<String, &str> = HashMap::new();
    for account in accounts {
        let name = &account.name;
        let fail = |why: String| Err(format!("account `{name}`: {why}"));
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
            return Err(format!("account name `{name}`: use letters, digits, `.`, `_` and `-`"));
        }
        if !names.insert(name.as_str()) {
            return Err(format!("account `{name}` is defined twice"));
        }
        let Some(backend_config) = backend(&account.backend) else {
            return fail(format!("backend `{}` is not configured ([backends.{}])", account.backend, account.backend));
        };
        if let Some(submission) = &account.submission {
            submission.check(backend_config).map_err(|why| format!("account `{name}`: {why}"))?;
            if submission.sends_through_api(backend_config) && account.mode == AccountMode::Passthrough {
                return fail(
                    "submission through the mail API needs the account's mapped token: pass-through users need \
                     a `relay`"
                        .into(),
                );
            }
            if submission.address.is_none()
                && account.mode == AccountMode::Mapped
                && !account.login.as_deref().is_some_and(|l| l.contains('@'))
            {
                return fail("submission needs `address`: `login` is not an address".into());
            }
        }
        account.policy_for(None).check(backend_config).map_err(|why| format!("account `{name}`: policy.{why}"))?;
        for device in &account.device {
            account
                .policy_for(Some(device))
                .check(backend_config)
                .map_err(|why| format!("account `{name}`: device `{}`: policy.{why}", device.user))?;
        }
        match account.mode {
            AccountMode::Passthrough => {
                if account.users.is_empty() {
                    return fail("a passthrough account needs `users` (names, `*@domain` or `*`)".into());
                }
                if account.login.is_some()
                    || account.password_env.is_some()
                    || account.password_file.is_some()
                    || account.oauth.is_some()
                    || !account.device.is_empty()
                {
                    return fail("login, password_*, oauth and device are for mapped accounts".into());
                }
                for pattern in &account.users {
                    let key = match Pattern::parse(pattern) {
                        Some(p) => p.key(),
                        None => return fail(format!("`{pattern}` is not a user name, `*@domain` or `*`")),
                    };
                    if let Some(other) = patterns.insert(key, name) {
                        return fail(format!("`{pattern}` is also routed by account `{other}`"));
                    }
                }
            }
            AccountMode::Mapped => {
                if !account.users.is_empty() {
                    return fail("`users` is for passthrough accounts; mapped accounts list [[account.device]]".into());
                }
                match &account.login {
                    Some(login) if valid_user_name(login) => {}
                    _ => return fail("a mapped account needs `login`, the backend user name".into()),
                }
                let password = SecretSource::from_keys(account.password_env.as_ref(), account.password_file.as_ref())
                    .map_err(|why| format!("account `{name}`: password: {why}"))?;
                match (&password, &account.oauth) {
                    (Some(_), Some(_)) => return fail("set a password or oauth, not both".into()),
                    (None, None) => {
                        return fail("a mapped account needs password_env, password_file or [account.oauth]".into());
                    }
                    _ => {}
                }
                if let Some(oauth) = &account.oauth {
                    oauth.check().map_err(|(key, why)| format!("account `{name}`: oauth.{key}: {why}"))?;
                    if token_store.is_none() {
                        return fail("OAuth accounts need a [token_store]".into());
                    }
                    // IMAP sends the token with XOAUTH2/OAUTHBEARER; HTTP
                    // backends as a Bearer header.
                    match &backend_config {
                        BackendConfig::Jmap(jmap) if jmap.auth != crate::backend::jmap::JmapAuth::Bearer => {
                            return fail("an OAuth account on JMAP needs auth = \"bearer\"".into());
                        }
                        BackendConfig::Demo(_) => {
                            return fail("the demo backend takes passwords, not OAuth tokens".into());
                        }
                        // Graph answers 400 "/me request is only valid with
                        // delegated authentication flow" to an app-only token.
                        BackendConfig::Graph(graph)
                            if oauth.grant == crate::auth::oauth::Grant::ClientCredentials
                                && graph.user.eq_ignore_ascii_case("me") =>
                        {
                            return fail(format!(
                                "grant = \"client_credentials\" (app-only) cannot use Graph's /me, which needs a \
                                 signed-in user: set user = \"{}\" (the mailbox's address) in [backend{}]",
                                account.login.as_deref().unwrap_or("mailbox@example.com"),
                                if account.backend == DEFAULT_BACKEND {
                                    String::new()
                                } else {
                                    format!("s.{}", account.backend)
                                }
                            ));
                        }
                        _ => {}
                    }
                }
                if account.device.is_empty() {
                    return fail("a mapped account needs at least one [[account.device]]".into());
                }
                for device in &account.device {
                    if !valid_user_name(&device.user) {
                        return fail(format!("device user `{}` is not a valid user name", device.user));
                    }
                    if let Some(other) = device_users.insert(&device.user, name) {
                        return fail(format!("device user `{}` is also in account `{other}`", device.user));
                    }
                    DeviceHash::parse(&device.password_hash)
                        .map_err(|e| format!("account `{name}`: device `{}`: password_hash: {e}", device.user))?;
                }
            }
        }
    }
    for (user, account) in &device_users {
        if let Some(other) = patterns.get(&Pattern::Exact(user.to_string()).key()) {
            return Err(format!("device user `{user}` (account `{account}`) is also a passthrough user of `{other}`"));
        }
    }
    Ok(())
}

/// A passthrough `users` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Pattern {
    Exact(String),
    /// Lower-cased.
    Domain(String),
    Any,
}

impl Pattern {
    pub(super) fn parse(text: &str) -> Option<Pattern> {
        if text == "*" {
            return Some(Pattern::Any);
        }
        if let Some(domain) = text.strip_prefix("*@") {
            let ok = !domain.is_empty() && !domain.contains(['@', '*']) && valid_user_name(domain);
            return ok.then(|| Pattern::Domain(domain.to_ascii_lowercase()));
        }
        (valid_user_name(text) && !text.contains('*')).then(|| Pattern::Exact(text.to_string()))
    }

    fn key(&self) -> String {
        match self {
            Pattern::Exact(u) => format!("user:{u}"),
            Pattern::Domain(d) => format!("domain:{d}"),
            Pattern::Any => "*".into(),
        }
    }
}
