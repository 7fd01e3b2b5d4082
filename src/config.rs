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
use crate::auth::passwords::SecretSource;
use crate::auth::tokens::TokenStoreConfig;
use crate::backend::pool::PoolConfig;
use crate::backend::select::{BackendConfig, BadBackendUrl};
use crate::mail::InvalidSetting;
use crate::server::config::{AdminConfig, ListenerConfig, TlsConfig};
use crate::server::throttle::ThrottleConfig;
use crate::state::StateConfig;
use crate::telemetry::LogConfig;

pub use crate::server::config::Limits;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The OS error is part of the message, not a `source`: printed with
    /// its chain (`{:#}`) it would appear twice.
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error(transparent)]
    Invalid(#[from] InvalidSetting),
    #[error(transparent)]
    BackendUrl(#[from] BadBackendUrl),
    /// A setting from the environment (`POPGATE_SECTION__KEY`) that cannot
    /// be placed in the configuration.
    #[error("environment variable {name}: {why}")]
    Env { name: String, why: String },
    /// A file or environment variable a setting names cannot be used:
    /// `serve` would fail on it.
    #[error("{key}: {why}")]
    Unusable { key: String, why: String },
}

impl ConfigError {
    fn unusable(key: impl Into<String>, why: impl Into<String>) -> Self {
        ConfigError::Unusable { key: key.into(), why: why.into() }
    }
}

/// Environment variables `POPGATE_SECTION__KEY` (a double underscore
/// between the parts of a key's path, e.g. `POPGATE_LIMITS__MAX_CONNECTIONS`
/// or `POPGATE_LISTENER__0__ADDRESS`) set any key of the file; they win over
/// the file, and command-line flags win over both. Names with a single
/// underscore (`POPGATE_CONFIG`, `POPGATE_LISTEN`, …) belong to the flags.
pub const ENV_PREFIX: &str = "POPGATE_";

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
    /// State shared between replicas (Redis); embedded without a url.
    #[serde(default)]
    pub state: StateConfig,
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
            state: StateConfig::default(),
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
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read { path: shown.clone(), error })?;
        Config::from_toml(&text, &shown)
    }

    /// The file (or, without one, the defaults) with the settings of the
    /// environment variables in `vars` on top (see [`ENV_PREFIX`]). Returns
    /// the names of the variables used, for the log.
    pub fn load_layered(
        path: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Config, Vec<String>), ConfigError> {
        let (text, shown) = match path {
            Some(path) => {
                let shown = path.display().to_string();
                let text =
                    std::fs::read_to_string(path).map_err(|error| ConfigError::Read { path: shown.clone(), error })?;
                (text, shown)
            }
            None => (String::new(), "(no configuration file)".to_string()),
        };
        let mut settings: Vec<(String, String)> =
            vars.into_iter().filter(|(name, _)| is_setting_variable(name)).collect();
        if settings.is_empty() {
            return Ok((Config::from_toml(&text, &shown)?, Vec::new()));
        }
        settings.sort();
        let mut table: toml::Table =
            toml::from_str(&text).map_err(|e| ConfigError::Parse { path: shown.clone(), message: e.to_string() })?;
        for (name, value) in &settings {
            set_from_env(&mut table, name, value)?;
        }
        let names: Vec<String> = settings.into_iter().map(|(name, _)| name).collect();
        let config: Config = toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| ConfigError::Parse {
            path: format!("{shown} with {}", names.join(", ")),
            message: e.message().to_string(),
        })?;
        config.check()?;
        Ok((config, names))
    }

    /// The admin page's state file (`[admin] state_file`, or beside the
    /// token store), if there is one.
    pub fn admin_state_path(&self) -> Option<std::path::PathBuf> {
        crate::auth::accounts::ui_state::state_path(self.admin.state_file.as_deref(), self.token_store.as_ref())
    }

    /// The configuration with the admin page's changes to device users laid
    /// over it (at start, on SIGHUP, in check-config), checked again.
    pub fn with_admin_state(mut self) -> Result<Config, ConfigError> {
        let Some(path) = self.admin_state_path() else { return Ok(self) };
        let invalid = |why: String| ConfigError::unusable("admin.state_file", why);
        let state = crate::auth::accounts::ui_state::UiState::load(&path).map_err(invalid)?;
        state.merge_into(&mut self.account).map_err(|why| invalid(format!("{}: {why}", path.display())))?;
        self.check()?;
        Ok(self)
    }

    /// The accounts with the backends and token store they refer to.
    pub fn accounts(&self) -> AccountsSetup<'_> {
        AccountsSetup {
            accounts: &self.account,
            backend: &self.backend,
            backends: &self.backends,
            token_store: self.token_store.as_ref(),
            state: Some(&self.state),
        }
    }

    /// Checks what the types alone cannot: each part its own tables, then
    /// what ties them together.
    pub fn check(&self) -> Result<(), InvalidSetting> {
        crate::server::config::check(&self.listener, &self.tls, &self.limits)?;
        self.throttle.check().map_err(|e| e.within("throttle"))?;
        self.state.check().map_err(|e| e.within("state"))?;
        self.admin.check().map_err(|e| e.within("admin"))?;
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

impl Config {
    /// Checks what `serve` will read besides this file — certificates,
    /// keys, secrets in files and environment variables, the token store
    /// and its key — as the user running this, so that what `check-config`
    /// accepts, `serve` starts with. Each error names the key, the file or
    /// variable, and the fix.
    pub fn check_usable(&self) -> Result<(), ConfigError> {
        for (i, certificate) in self.tls.certificates.iter().enumerate() {
            let key = format!("tls.certificates[{i}]");
            readable(
                &format!("{key}.cert"),
                &certificate.cert,
                "the certificate chain (PEM, leaf first), e.g. fullchain.pem",
            )?;
            readable(&format!("{key}.key"), &certificate.key, "its private key (PEM), e.g. privkey.pem")?;
        }
        if !self.tls.certificates.is_empty() {
            crate::server::tls::CertificateStore::load(self.tls.certificates.clone())
                .map_err(|e| ConfigError::unusable("tls.certificates", e.to_string()))?;
        }
        for account in &self.account {
            let name = &account.name;
            let source = SecretSource::from_keys(account.password_env.as_ref(), account.password_file.as_ref());
            if let Ok(Some(source)) = source {
                let key = match source {
                    SecretSource::Env(_) => "password_env",
                    SecretSource::File(_) => "password_file",
                };
                secret(&format!("account `{name}`: {key}"), &source, "the backend account's password or app password")?;
            }
            if let Some(oauth) = &account.oauth
                && let Ok(Some(source)) = oauth.client_secret_source()
            {
                let key = match source {
                    SecretSource::Env(_) => "oauth.client_secret_env",
                    SecretSource::File(_) => "oauth.client_secret_file",
                };
                secret(
                    &format!("account `{name}`: {key}"),
                    &source,
                    "the OAuth client secret from the provider's console",
                )?;
            }
        }
        if let Err(why) = self.state.password() {
            let key = if self.state.password_env.is_some() { "state.password_env" } else { "state.password_file" };
            return Err(ConfigError::unusable(key, format!("{why}; it must hold the Redis password")));
        }
        if let Some(store) = &self.token_store
            && self.account.iter().any(|a| a.oauth.is_some())
        {
            self.check_token_store(store)?;
        }
        Ok(())
    }

    fn check_token_store(&self, store: &TokenStoreConfig) -> Result<(), ConfigError> {
        let source = store.key_source().map_err(|why| ConfigError::unusable("token_store.key_env", why))?;
        match &source {
            SecretSource::File(path) => {
                if let Err(e) = std::fs::metadata(path) {
                    return Err(ConfigError::unusable(
                        "token_store.key_file",
                        format!(
                            "cannot read {}: {e}; create it with `popgate oauth keygen {} --owner USER` \
                             (USER: the user popgate runs as, e.g. popgate)",
                            path.display(),
                            path.display()
                        ),
                    ));
                }
            }
            SecretSource::Env(var) if std::env::var_os(var).is_none() => {
                return Err(ConfigError::unusable(
                    "token_store.key_env",
                    format!(
                        "environment variable {var} is not set; put a key in it (`popgate oauth keygen FILE` \
                         writes one), or use key_file"
                    ),
                ));
            }
            SecretSource::Env(_) => {}
        }
        let key_name = match source {
            SecretSource::Env(_) => "token_store.key_env",
            SecretSource::File(_) => "token_store.key_file",
        };
        let opened = store.open().map_err(|e| ConfigError::unusable(key_name, e.to_string()))?;
        let directory = match store.path.parent() {
            Some(d) if d.as_os_str().is_empty() => Path::new("."),
            Some(d) => d,
            None => Path::new("/"),
        };
        if !directory.is_dir() {
            return Err(ConfigError::unusable(
                "token_store.path",
                format!(
                    "directory {} does not exist; create it, owned by the user popgate runs as \
                     (systemd's StateDirectory=popgate makes /var/lib/popgate)",
                    directory.display()
                ),
            ));
        }
        opened.check_readable().map_err(|e| ConfigError::unusable("token_store.path", e.to_string()))?;
        Ok(())
    }
}

fn readable(key: &str, path: &Path, what: &str) -> Result<(), ConfigError> {
    std::fs::File::open(path).map(drop).map_err(|e| {
        ConfigError::unusable(
            key,
            format!("cannot read {}: {e}; point it at {what}, readable by the user popgate runs as", path.display()),
        )
    })
}

fn secret(key: &str, source: &SecretSource, what: &str) -> Result<(), ConfigError> {
    source.read().map(drop).map_err(|e| {
        let fix = match source {
            SecretSource::Env(var) => format!("set {var} to {what} in popgate's environment"),
            SecretSource::File(path) => {
                format!("write {what} into {}, readable by the user popgate runs as", path.display())
            }
        };
        ConfigError::unusable(key, format!("{e}; {fix}"))
    })
}

fn is_setting_variable(name: &str) -> bool {
    name.strip_prefix(ENV_PREFIX).is_some_and(|rest| rest.contains("__"))
}

/// Sets the key `name` spells (`POPGATE_A__B__0__C`: `a.b[0].c`) to
/// `value`, read as a TOML value (`true`, `600`, `["10.0.0.0/8"]`) or, if
/// it is none, as a string.
fn set_from_env(root: &mut toml::Table, name: &str, value: &str) -> Result<(), ConfigError> {
    let bad = |why: String| ConfigError::Env { name: name.to_string(), why };
    let rest = name.strip_prefix(ENV_PREFIX).unwrap_or(name);
    let parts: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(bad("empty part in the key (parts are separated by one double underscore)".into()));
    }
    let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .filter(|t| t.len() == 1)
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    let (last, path) = parts.split_last().expect("split never yields nothing");
    let mut here = root;
    let mut walked = String::new();
    let mut iter = path.iter().peekable();
    while let Some(part) = iter.next() {
        let next_is_index = iter.peek().is_some_and(|p| p.parse::<usize>().is_ok());
        let entry = here.entry(part.clone()).or_insert_with(|| {
            if next_is_index { toml::Value::Array(Vec::new()) } else { toml::Value::Table(toml::Table::new()) }
        });
        walked = if walked.is_empty() { part.clone() } else { format!("{walked}.{part}") };
        let table = match entry {
            toml::Value::Table(table) => table,
            toml::Value::Array(items) => {
                let index_part = iter.next().ok_or_else(|| bad(format!("`{walked}` is a list: name an index")))?;
                let index: usize =
                    index_part.parse().map_err(|_| bad(format!("`{walked}` is a list: `{index_part}` is no index")))?;
                if index == items.len() {
                    items.push(toml::Value::Table(toml::Table::new()));
                }
                let len = items.len();
                walked = format!("{walked}[{index}]");
                match items.get_mut(index) {
                    Some(toml::Value::Table(table)) => table,
                    Some(_) => return Err(bad(format!("`{walked}` is not a table"))),
                    None => {
                        return Err(bad(format!("`{walked}`: the list has {len} entries; the next index is {len}")));
                    }
                }
            }
            _ => return Err(bad(format!("`{walked}` is not a table"))),
        };
        here = table;
    }
    here.insert(last.clone(), parsed);
    Ok(())
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

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// `POPGATE_A__B` sets `a.b` over the file; names without a double
    /// underscore (the flags', secrets') are not settings.
    #[test]
    fn environment_settings_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(
            &path,
            "[limits]\nmax_connections = 10\nmax_failed_logins = 5\n[[listener]]\naddress = \"127.0.0.1:1110\"\n",
        )
        .unwrap();
        let (config, used) = Config::load_layered(
            Some(&path),
            vars(&[
                ("POPGATE_LIMITS__MAX_CONNECTIONS", "20"),
                ("POPGATE_LISTENER__0__ALLOW_CLEARTEXT_LOGIN", "true"),
                ("POPGATE_LISTENER__0__CLEARTEXT_NETWORKS", "[\"192.168.1.0/24\"]"),
                ("POPGATE_LISTENER__1__ADDRESS", "0.0.0.0:995"),
                ("POPGATE_LISTENER__1__TLS", "implicit"),
                ("POPGATE_TLS__CERTIFICATES", "[{ cert = \"/c.pem\", key = \"/k.pem\" }]"),
                ("POPGATE_LOG__LEVEL", "debug"),
                ("POPGATE_M365_CLIENT_SECRET", "not a setting"),
                ("POPGATE_CONFIG", "/elsewhere.toml"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(config.limits.max_connections, 20, "the environment wins over the file");
        assert_eq!(config.limits.max_failed_logins, 5, "the file's other keys stay");
        assert!(config.listener[0].allow_cleartext_login);
        assert_eq!(config.listener[0].cleartext_networks, vec!["192.168.1.0/24".parse::<ipnet::IpNet>().unwrap()]);
        assert_eq!(config.listener[1].address.to_string(), "0.0.0.0:995");
        assert_eq!(config.log.level, "debug");
        assert_eq!(used.len(), 7, "{used:?}");

        // Without a file: the defaults, with the environment on top.
        let (config, _) = Config::load_layered(None, vars(&[("POPGATE_ADMIN__ENABLED", "false")])).unwrap();
        assert!(!config.admin.enabled);
        assert_eq!(config.listener, Config::default().listener);

        // Errors name the variable, or the key it set.
        let e = Config::load_layered(None, vars(&[("POPGATE_LIMITS__COMMAND_LINES", "300")])).unwrap_err().to_string();
        assert!(e.contains("POPGATE_LIMITS__COMMAND_LINES") && e.contains("command_lines"), "{e}");
        let e =
            Config::load_layered(None, vars(&[("POPGATE_LIMITS__IDLE_TIMEOUT_SECS", "5")])).unwrap_err().to_string();
        assert!(e.contains("limits.idle_timeout_secs"), "{e}");
        let e =
            Config::load_layered(None, vars(&[("POPGATE_LISTENER__3__ADDRESS", "0.0.0.0:1")])).unwrap_err().to_string();
        assert!(e.contains("POPGATE_LISTENER__3__ADDRESS") && e.contains("next index is 0"), "{e}");
        let e = Config::load_layered(None, vars(&[("POPGATE_LIMITS____X", "1")])).unwrap_err().to_string();
        assert!(e.contains("POPGATE_LIMITS____X"), "{e}");
    }

    /// What `serve` would fail on is an error here, naming the key, the
    /// file or variable, and the fix.
    #[test]
    fn files_and_secrets_the_configuration_names_are_checked() {
        const HASH: &str =
            "$argon2id$v=19$m=19456,t=2,p=1$wxrOHId/C+dIBYXb2JB3fQ$yaYqWUlTYLcForHs501471xKMPAnl4rO3/KunVncaj4";
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let cert = format!("[tls]\ncertificates = [{{ cert = \"{d}/fullchain.pem\", key = \"{d}/privkey.pem\" }}]\n");
        let e = Config::from_toml(&cert, "t.toml").unwrap().check_usable().unwrap_err().to_string();
        assert!(
            e.contains("tls.certificates[0].cert") && e.contains("fullchain.pem") && e.contains("point it at"),
            "{e}"
        );

        let oauth = format!(
            "[backend]\nkind = \"imap\"\nhost = \"imap.gmail.com\"\n[token_store]\npath = \"{d}/tokens.enc\"\nkey_file = \"{d}/token.key\"\n\
             [[account]]\nname = \"scans\"\nmode = \"mapped\"\nlogin = \"s@example.com\"\n\
             [account.oauth]\nprovider = \"google\"\nclient_id = \"id\"\nclient_secret_file = \"{d}/secret\"\n\
             [[account.device]]\nuser = \"printer\"\npassword_hash = \"{HASH}\"\n"
        );
        let config = Config::from_toml(&oauth, "t.toml").unwrap();
        let e = config.check_usable().unwrap_err().to_string();
        assert!(e.contains("oauth.client_secret_file") && e.contains("/secret") && e.contains("write"), "{e}");
        std::fs::write(dir.path().join("secret"), "s3cret\n").unwrap();
        let e = config.check_usable().unwrap_err().to_string();
        assert!(
            e.contains("token_store.key_file") && e.contains("token.key") && e.contains("popgate oauth keygen"),
            "{e}"
        );
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(dir.path().join("token.key"))
                .unwrap();
            writeln!(f, "{}", crate::auth::tokens::StoreKey::generate_text()).unwrap();
        }
        config.check_usable().unwrap();
        assert!(!e.contains("s3cret"));

        let env = oauth.replace(
            &format!("client_secret_file = \"{d}/secret\""),
            "client_secret_env = \"POPGATE_TEST_UNSET_SECRET_VAR\"",
        );
        let e = Config::from_toml(&env, "t.toml").unwrap().check_usable().unwrap_err().to_string();
        assert!(
            e.contains("oauth.client_secret_env") && e.contains("POPGATE_TEST_UNSET_SECRET_VAR") && e.contains("set "),
            "{e}"
        );

        let nodir = oauth.replace(&format!("{d}/tokens.enc"), &format!("{d}/missing/tokens.enc"));
        let e = Config::from_toml(&nodir, "t.toml").unwrap().check_usable().unwrap_err().to_string();
        assert!(e.contains("token_store.path") && e.contains("missing") && e.contains("StateDirectory"), "{e}");
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
