//! popgate's configuration file: assembles the tables each part owns
//! (listeners and limits: `server::config`; backends: `backend::select`;
//! accounts: `auth::accounts::config`; logs: `telemetry`) into one TOML
//! document, every key documented in config/popgate.toml, and checks what
//! ties the tables together. `popgate check-config` prints the result.
//!
//! Unknown keys are errors, so a typo never silently falls back to a default.
//! Every problem is reported once, as an `InvalidSetting` whose key is the
//! full path in the file.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::auth::accounts::config::{AccountConfig, AccountsSetup, DEFAULT_BACKEND};
use crate::auth::tokens::TokenStoreConfig;
use crate::backend::pool::PoolConfig;
use crate::backend::select::{BackendConfig, BadBackendUrl};
use crate::mail::InvalidSetting;
use crate::server::config::{AdminConfig, ListenerConfig, TlsConfig};
use crate::server::throttle::ThrottleConfig;
use crate::telemetry::LogConfig;

pub use crate::server::config::Limits;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error(transparent)]
    Invalid(#[from] InvalidSetting),
    #[error(transparent)]
    BackendUrl(#[from] BadBackendUrl),
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

    /// The accounts with the backends and token store they refer to.
    pub fn accounts(&self) -> AccountsSetup<'_> {
        AccountsSetup {
            accounts: &self.account,
            backend: &self.backend,
            backends: &self.backends,
            token_store: self.token_store.as_ref(),
        }
    }

    /// Checks what the types alone cannot: each part its own tables, then
    /// what ties them together.
    pub fn check(&self) -> Result<(), InvalidSetting> {
        crate::server::config::check(&self.listener, &self.tls, &self.limits)?;
        self.throttle.check().map_err(|e| e.within("throttle"))?;
        self.backend_pool.check().map_err(|e| e.within("backend_pool"))?;
        self.backend.check().map_err(|e| e.within("backend"))?;
        for (name, backend) in &self.backends {
            let key = format!("backends.{name}");
            if name == DEFAULT_BACKEND
                || name.is_empty()
                || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return Err(InvalidSetting::new(
                    key,
                    "names use letters, digits, `.`, `_`, `-`; \"default\" is [backend]",
                ));
            }
            backend.check().map_err(|e| e.within(&key))?;
        }
        self.accounts().check()?;
        if let Some(store) = &self.token_store {
            store.key_source().map_err(|why| InvalidSetting::new("token_store.key_env", why.to_string()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys of a backend table are named with the table's path.
    #[test]
    fn backend_keys_are_named_with_their_table() {
        use crate::backend::gmail::GmailDeletePolicy;
        let e = Config::from_toml("[backend]\nkind = \"jmap\"\nurl = \"https://h\"\ntimeout_secs = 0\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("backend.timeout_secs"), "{e}");
        let e = Config::from_toml("[backend]\nkind = \"jmap\"\nurl = \"https://h\"\nmailbx = \"x\"\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("mailbx"), "{e}");
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
