//! popgate's configuration: a TOML file (every key documented in
//! config/popgate.toml), command-line overrides and backend URLs.
//!
//! Unknown keys are errors, so a typo never silently falls back to a default.
//! `check` validates what serde cannot (ranges, combinations).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::auth::routing::{AccountConfig, DEFAULT_BACKEND, check_accounts};
use crate::auth::tokens::TokenStoreConfig;
use crate::backend::gmail::GmailConfig;
use crate::backend::graph::GraphConfig;
use crate::backend::imap::{ImapConfig, ImapTls};
use crate::backend::jmap::JmapConfig;
use crate::backend::demo::DemoConfig;
use crate::backend::pool::PoolConfig;
use crate::server::policy::{ListenerTls, LoginPolicy};
use crate::server::throttle::ThrottleConfig;
use crate::server::tls::CertificateConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid value for `{key}`: {why}")]
    Invalid { key: &'static str, why: String },
    #[error("invalid value for `{key}`: {why}")]
    InvalidAt { key: String, why: String },
    #[error("invalid [[account]]: {0}")]
    Account(String),
    #[error("invalid backend URL `{url}`: {why}")]
    BackendUrl { url: String, why: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where POP3 clients connect.
    #[serde(default = "default_listeners")]
    pub listener: Vec<ListenerConfig>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub throttle: ThrottleConfig,
    #[serde(default)]
    pub backend: BackendConfig,
    #[serde(default)]
    pub backend_pool: PoolConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    /// More backends by name (`[backends.NAME]`, same keys as `[backend]`),
    /// for accounts to route to; `[backend]` is the one named "default".
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub backends: BTreeMap<String, BackendConfig>,
    /// Accounts: pass-through routes by user name or domain, and mapped
    /// device users. None: every login passes through to `[backend]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub account: Vec<AccountConfig>,
    /// Where OAuth tokens of mapped accounts are kept (encrypted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_store: Option<TokenStoreConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listener: default_listeners(),
            limits: Limits::default(),
            tls: TlsConfig::default(),
            throttle: ThrottleConfig::default(),
            backend: BackendConfig::default(),
            backend_pool: PoolConfig::default(),
            log: LogConfig::default(),
            admin: AdminConfig::default(),
            backends: BTreeMap::new(),
            account: Vec::new(),
            token_store: None,
        }
    }
}

fn default_listeners() -> Vec<ListenerConfig> {
    vec![ListenerConfig::plain("127.0.0.1:1110".parse().expect("valid address"))]
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub address: SocketAddr,
    /// "none" (cleartext), "starttls" (cleartext + STLS) or "implicit" (995).
    #[serde(default)]
    pub tls: ListenerTls,
    /// Accept USER/PASS and AUTH without TLS (devices that cannot do TLS).
    #[serde(default)]
    pub allow_cleartext_login: bool,
    /// With `allow_cleartext_login`: only from these networks (CIDR).
    #[serde(default)]
    pub cleartext_networks: Vec<ipnet::IpNet>,
    /// Loopback clients count as secure without TLS.
    #[serde(default = "yes")]
    pub loopback_is_secure: bool,
}

impl ListenerConfig {
    /// A cleartext listener with the default policy (`--listen ADDR`).
    pub fn plain(address: SocketAddr) -> Self {
        ListenerConfig {
            address,
            tls: ListenerTls::None,
            allow_cleartext_login: false,
            cleartext_networks: Vec::new(),
            loopback_is_secure: true,
        }
    }

    pub fn policy(&self) -> LoginPolicy {
        LoginPolicy {
            tls: self.tls,
            allow_cleartext_login: self.allow_cleartext_login,
            cleartext_networks: self.cleartext_networks.clone(),
            loopback_is_secure: self.loopback_is_secure,
        }
    }
}

/// Certificates for the TLS listeners (implicit TLS and STLS).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// The first is the default; others are chosen by SNI.
    pub certificates: Vec<CertificateConfig>,
    /// Seconds between checks of the files for changes (0: only on SIGHUP).
    pub reload_check_secs: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig { certificates: Vec::new(), reload_check_secs: 60 }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Longest command line in octets, CRLF included (RFC 2449: at least 255).
    pub command_line: usize,
    /// Longest SASL response line (OAuth tokens need a few KiB).
    pub auth_line: usize,
    /// Failed logins on one connection before it is closed.
    pub max_failed_logins: u32,
    /// Seconds a client has from connecting to finish logging in.
    pub login_timeout_secs: u64,
    /// Seconds of silence after login before autologout (RFC 1939: ≥ 600).
    pub idle_timeout_secs: u64,
    /// Connections served at once; more get `-ERR [SYS/TEMP]` and are closed.
    pub max_connections: usize,
    /// Connections from one client address at once.
    pub max_connections_per_address: usize,
    /// On SIGTERM/SIGINT, seconds sessions may take to finish.
    pub shutdown_grace_secs: u64,
    /// Exact message sizes remembered across sessions (entries).
    pub size_cache_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            command_line: 255,
            auth_line: 8192,
            max_failed_logins: 3,
            login_timeout_secs: 60,
            idle_timeout_secs: 600,
            max_connections: 1000,
            max_connections_per_address: 100,
            shutdown_grace_secs: 30,
            size_cache_entries: 1_000_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum BackendConfig {
    /// The built-in demo store (any user, any password).
    Demo(DemoConfig),
    Imap(ImapConfig),
    /// A JMAP server (RFC 8620/8621).
    Jmap(JmapConfig),
    /// The Gmail API (OAuth2 bearer tokens).
    Gmail(GmailConfig),
    /// Microsoft Graph mail (OAuth2 bearer tokens).
    Graph(GraphConfig),
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig::Demo(DemoConfig::default())
    }
}

/// The admin HTTP listener: /metrics, /healthz, /readyz.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub enabled: bool,
    /// Keep it on loopback or a management network: it is not authenticated.
    pub address: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig { enabled: true, address: "127.0.0.1:9110".parse().expect("valid address") }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter: "info", "popgate=debug", … (RUST_LOG overrides it).
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { level: "info".into(), format: LogFormat::Text }
    }
}

impl Config {
    pub fn from_toml(text: &str, path: &str) -> Result<Config, ConfigError> {
        let config: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.to_string(), message: e.to_string() })?;
        config.check()?;
        Ok(config)
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: shown.clone(), source })?;
        Config::from_toml(&text, &shown)
    }

    /// Checks what the types alone cannot.
    pub fn check(&self) -> Result<(), ConfigError> {
        let invalid = |key, why: &str| Err(ConfigError::Invalid { key, why: why.to_string() });
        let l = &self.limits;
        if self.listener.is_empty() {
            return invalid("listener", "at least one listener is needed");
        }
        if !(255..=65536).contains(&l.command_line) {
            return invalid("limits.command_line", "must be between 255 (RFC 2449) and 65536");
        }
        if !(255..=1_048_576).contains(&l.auth_line) {
            return invalid("limits.auth_line", "must be between 255 and 1048576");
        }
        if l.max_failed_logins == 0 {
            return invalid("limits.max_failed_logins", "must be at least 1");
        }
        if l.login_timeout_secs == 0 {
            return invalid("limits.login_timeout_secs", "must be at least 1");
        }
        if l.idle_timeout_secs < 600 {
            return invalid("limits.idle_timeout_secs", "RFC 1939 requires at least 600 seconds");
        }
        if l.max_connections == 0 {
            return invalid("limits.max_connections", "must be at least 1");
        }
        if l.max_connections_per_address == 0 {
            return invalid("limits.max_connections_per_address", "must be at least 1");
        }
        if self.listener.iter().any(|l| l.tls != ListenerTls::None) && self.tls.certificates.is_empty() {
            return invalid("tls.certificates", "a listener uses TLS but no certificate is configured");
        }
        if self.throttle.max_delay_ms < self.throttle.base_delay_ms {
            return invalid("throttle.max_delay_ms", "must be at least throttle.base_delay_ms");
        }
        check_backend("backend", &self.backend)?;
        for (name, backend) in &self.backends {
            if name == DEFAULT_BACKEND
                || name.is_empty()
                || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return Err(ConfigError::InvalidAt {
                    key: format!("backends.{name}"),
                    why: "names use letters, digits, `.`, `_`, `-`; \"default\" is [backend]".into(),
                });
            }
            check_backend(&format!("backends.{name}"), backend)?;
        }
        let lookup = |name: &str| match name {
            DEFAULT_BACKEND => Some(self.backend.clone()),
            other => self.backends.get(other).cloned(),
        };
        check_accounts(&self.account, lookup, self.token_store.as_ref()).map_err(ConfigError::Account)?;
        if let Some(store) = &self.token_store {
            store.key_source().map_err(|why| invalid_at("token_store.key_env", why.to_string()))?;
        }
        Ok(())
    }
}

fn invalid_at(key: impl Into<String>, why: impl Into<String>) -> ConfigError {
    ConfigError::InvalidAt { key: key.into(), why: why.into() }
}

/// What serde cannot check in one backend table (`prefix`: where it is).
fn check_backend(prefix: &str, backend: &BackendConfig) -> Result<(), ConfigError> {
    match backend {
        BackendConfig::Jmap(jmap) => jmap.check().map_err(|(key, why)| match prefix {
            "backend" => ConfigError::Invalid { key, why },
            _ => invalid_at(key.replacen("backend", prefix, 1), why),
        }),
        BackendConfig::Imap(imap) => {
            if imap.host.is_empty() {
                return Err(invalid_at(format!("{prefix}.host"), "must not be empty"));
            }
            if imap.timeout_secs == 0 {
                return Err(invalid_at(format!("{prefix}.timeout_secs"), "must be at least 1"));
            }
            if imap.fetch_chunk_bytes < 1024 {
                return Err(invalid_at(format!("{prefix}.fetch_chunk_bytes"), "must be at least 1024"));
            }
            Ok(())
        }
        BackendConfig::Gmail(gmail) => gmail.check().map_err(|(key, why)| match prefix {
            "backend" => ConfigError::Invalid { key, why },
            _ => invalid_at(key.replacen("backend", prefix, 1), why),
        }),
        BackendConfig::Graph(graph) => graph.check().map_err(|(key, why)| match prefix {
            "backend" => ConfigError::Invalid { key, why },
            _ => invalid_at(key.replacen("backend", prefix, 1), why),
        }),
        BackendConfig::Demo(_) => Ok(()),
    }
}

impl BackendConfig {
    /// Parses a backend URL: `imap://host[:port][/mailbox]`,
    /// `imap+starttls://…`, `imaps://…`, `jmap+https://…`, `demo:` or
    /// `demo:DIR`, `gmail:` or `gmail:LABEL`, `graph:` or `graph:FOLDER`.
    pub fn from_url(url: &str) -> Result<BackendConfig, ConfigError> {
        let bad = |why: &str| ConfigError::BackendUrl { url: url.to_string(), why: why.to_string() };
        if let Some(dir) = url.strip_prefix("demo:") {
            let dir = dir.trim_start_matches("//");
            return Ok(BackendConfig::Demo(DemoConfig { messages_dir: (!dir.is_empty()).then(|| dir.into()) }));
        }
        // `gmail:LABEL` / `graph:FOLDER`: the name, %-escaped; the API is
        // the provider's own (set `api_base` in a file to change it).
        let named = |prefix: &str| -> Result<Option<Option<String>>, ConfigError> {
            let Some(rest) =
                url.get(..prefix.len()).filter(|p| p.eq_ignore_ascii_case(prefix)).map(|_| &url[prefix.len()..])
            else {
                return Ok(None);
            };
            if rest.starts_with('/') {
                return Err(bad("no host here: `gmail:` or `gmail:LABEL`, `graph:` or `graph:FOLDER`"));
            }
            let name = percent_decode(rest).map_err(bad)?;
            Ok(Some((!name.trim().is_empty()).then_some(name)))
        };
        if let Some(label) = named("gmail:")? {
            return Ok(BackendConfig::Gmail(GmailConfig::with_label(label)));
        }
        if let Some(folder) = named("graph:")? {
            return Ok(BackendConfig::Graph(GraphConfig::with_folder(folder)));
        }
        let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("expected scheme://host"))?;
        let lowercase = scheme.to_ascii_lowercase();
        if let Some(http) = lowercase.strip_prefix("jmap+").filter(|s| matches!(*s, "http" | "https")) {
            let config = JmapConfig::new(format!("{http}://{rest}"));
            config.session_url().map_err(|why| bad(&why))?;
            return Ok(BackendConfig::Jmap(config));
        }
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "imap" => ImapTls::None,
            "imap+starttls" => ImapTls::Starttls,
            "imaps" => ImapTls::Implicit,
            _ => return Err(bad("scheme must be imap, imap+starttls, imaps, jmap+http, jmap+https or demo")),
        };
        let (authority, mailbox) = match rest.split_once('/') {
            Some((a, m)) => (a, Some(m)),
            None => (rest, None),
        };
        if authority.contains('@') {
            return Err(bad("credentials do not belong in the URL; clients log in with their own"));
        }
        let (host, port) = split_host_port(authority).map_err(bad)?;
        let mut config = ImapConfig::new(host, port, tls);
        if let Some(mailbox) = mailbox.filter(|m| !m.is_empty()) {
            config.mailbox = percent_decode(mailbox).map_err(bad)?;
        }
        Ok(BackendConfig::Imap(config))
    }

    pub fn describe(&self) -> String {
        match self {
            BackendConfig::Demo(_) => "demo".into(),
            BackendConfig::Imap(c) => format!("imap {}:{} ({:?}) {}", c.host, c.port(), c.tls, c.mailbox),
            BackendConfig::Jmap(c) => format!("jmap {} {}", c.url, c.mailbox.as_deref().unwrap_or("(inbox)")),
            BackendConfig::Gmail(c) => format!(
                "gmail {} label {} query {}",
                c.api_base,
                c.label.as_deref().unwrap_or(if c.query.is_some() { "(none)" } else { "INBOX" }),
                c.query.as_deref().unwrap_or("(none)")
            ),
            BackendConfig::Graph(c) => format!("graph {} user {} folder {}", c.api_base, c.user, c.folder),
        }
    }
}

fn split_host_port(authority: &str) -> Result<(String, Option<u16>), &'static str> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("unclosed [ in host")?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("missing host");
    }
    let port = port.map(|p| p.parse::<u16>().map_err(|_| "invalid port")).transpose()?;
    Ok((host.to_string(), port))
}

fn percent_decode(s: &str) -> Result<String, &'static str> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or("bad % escape in mailbox")?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| "bad % escape in mailbox")?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "mailbox is not UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_urls() {
        let imap = |url| match BackendConfig::from_url(url).unwrap() {
            BackendConfig::Imap(c) => c,
            other => panic!("{other:?}"),
        };
        let c = imap("imap://127.0.0.1:143");
        assert_eq!((c.host.as_str(), c.port(), c.tls, c.mailbox.as_str()), ("127.0.0.1", 143, ImapTls::None, "INBOX"));
        let c = imap("imaps://imap.gmail.com");
        assert_eq!((c.port(), c.tls), (993, ImapTls::Implicit));
        let c = imap("imap+starttls://mail.example.com:1143/Print%20Queue");
        assert_eq!((c.port(), c.tls, c.mailbox.as_str()), (1143, ImapTls::Starttls, "Print Queue"));
        let c = imap("imap://[::1]:143/Archive");
        assert_eq!((c.host.as_str(), c.mailbox.as_str()), ("::1", "Archive"));
        assert_eq!(BackendConfig::from_url("demo:").unwrap(), BackendConfig::Demo(DemoConfig::default()));
        assert_eq!(
            BackendConfig::from_url("demo:/srv/mail").unwrap(),
            BackendConfig::Demo(DemoConfig { messages_dir: Some("/srv/mail".into()) })
        );
        for bad in ["pop3://x", "imap://", "imap://h:99999", "imap://u:p@h", "nothing", "imap://h/%zz"] {
            assert!(BackendConfig::from_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn jmap_backend_urls() {
        let jmap = |url| match BackendConfig::from_url(url).unwrap() {
            BackendConfig::Jmap(c) => c,
            other => panic!("{other:?}"),
        };
        assert_eq!(jmap("jmap+http://127.0.0.1:8080").url, "http://127.0.0.1:8080");
        assert_eq!(jmap("JMAP+HTTPS://api.fastmail.com/jmap/session").url, "https://api.fastmail.com/jmap/session");
        let c = jmap("jmap+https://mail.example.com/");
        assert_eq!(c.session_url().unwrap().as_str(), "https://mail.example.com/.well-known/jmap");
        assert_eq!(c, crate::backend::jmap::JmapConfig::new("https://mail.example.com/"));
        for bad in ["jmap+ftp://h", "jmap://h", "jmap+https://u:p@h/", "jmap+http://", "jmap+http://h:99999"] {
            assert!(BackendConfig::from_url(bad).is_err(), "{bad}");
        }
        let e = Config::from_toml("[backend]\nkind = \"jmap\"\nurl = \"https://h\"\ntimeout_secs = 0\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("backend.timeout_secs"), "{e}");
        let e = Config::from_toml("[backend]\nkind = \"jmap\"\nurl = \"https://h\"\nmailbx = \"x\"\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("mailbx"), "{e}");
    }

    #[test]
    fn gmail_and_graph_backend_urls() {
        use crate::backend::gmail::GmailDeletePolicy;
        match BackendConfig::from_url("gmail:").unwrap() {
            BackendConfig::Gmail(c) => assert_eq!(c, GmailConfig::default()),
            other => panic!("{other:?}"),
        }
        match BackendConfig::from_url("GMAIL:Printers%2FScans").unwrap() {
            BackendConfig::Gmail(c) => assert_eq!(c.label.as_deref(), Some("Printers/Scans")),
            other => panic!("{other:?}"),
        }
        match BackendConfig::from_url("graph:").unwrap() {
            BackendConfig::Graph(c) => assert_eq!(c, GraphConfig::default()),
            other => panic!("{other:?}"),
        }
        match BackendConfig::from_url("graph:archive").unwrap() {
            BackendConfig::Graph(c) => assert_eq!((c.folder.as_str(), c.user.as_str()), ("archive", "me")),
            other => panic!("{other:?}"),
        }
        for bad in ["gmail://host", "graph:%zz", "gmailx:"] {
            assert!(BackendConfig::from_url(bad).is_err(), "{bad}");
        }
        let config =
            Config::from_toml("[backend]\nkind = \"gmail\"\nlabel = \"Scans\"\ndelete_policy = \"delete\"\n", "t.toml")
                .unwrap();
        assert!(matches!(&config.backend, BackendConfig::Gmail(c) if c.delete_policy == GmailDeletePolicy::Delete));
        let e = Config::from_toml("[backend]\nkind = \"graph\"\nmax_concurrent_requests = 9\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("backend.max_concurrent_requests"), "{e}");
        let e = Config::from_toml("[backend]\nkind = \"gmail\"\nlabels = \"x\"\n", "t.toml").unwrap_err().to_string();
        assert!(e.contains("labels"), "{e}");
    }

    #[test]
    fn unknown_and_invalid_keys_are_named() {
        let e = Config::from_toml("[limits]\ncommand_lines = 300\n", "t.toml").unwrap_err().to_string();
        assert!(e.contains("command_lines"), "{e}");
        let e = Config::from_toml("[limits]\nidle_timeout_secs = 5\n", "t.toml").unwrap_err().to_string();
        assert!(e.contains("limits.idle_timeout_secs"), "{e}");
        let e = Config::from_toml("[backend]\nkind = \"imap\"\nhots = \"x\"\n", "t.toml").unwrap_err().to_string();
        assert!(e.contains("hots"), "{e}");
        assert_eq!(Config::from_toml("", "t.toml").unwrap(), Config::default());
    }

    #[test]
    fn accounts_backends_and_token_store_are_checked() {
        let named = "[backends.corp]\nkind = \"imap\"\nhost = \"mail.example.com\"\n";
        let route = "[[account]]\nname = \"staff\"\nmode = \"passthrough\"\nusers = [\"*@example.com\"]\n";
        let config = Config::from_toml(&format!("{named}{route}backend = \"corp\"\n"), "t.toml").unwrap();
        assert_eq!(config.account[0].backend, "corp");
        let e = Config::from_toml(&format!("{route}backend = \"nope\"\n"), "t.toml").unwrap_err().to_string();
        assert!(e.contains("account `staff`") && e.contains("nope"), "{e}");
        let e = Config::from_toml("[backends.default]\nkind = \"demo\"\n", "t.toml").unwrap_err().to_string();
        assert!(e.contains("backends.default"), "{e}");
        let e = Config::from_toml("[backends.x]\nkind = \"imap\"\nhost = \"\"\n", "t.toml").unwrap_err().to_string();
        assert!(e.contains("backends.x.host"), "{e}");
        let e = Config::from_toml("[token_store]\npath = \"/t\"\n", "t.toml").unwrap_err().to_string();
        assert!(e.contains("token_store.key_env"), "{e}");
        let e = Config::from_toml("[[account]]\nname = \"a\"\nmode = \"mapped\"\npassword = \"inline\"\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `password`"), "a secret inline is refused: {e}");
    }

    /// Every example under config/ parses and passes `check`.
    #[test]
    fn every_example_config_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
                seen += 1;
            }
        }
        assert!(seen >= 2, "expected example configs in {}", dir.display());
    }
}
