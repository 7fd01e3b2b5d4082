//! The `AccountRouter`: picks the account for each POP3 login.
//!
//! Two modes share one routing table, over any backend kind:
//! - `passthrough`: user names matched exactly, by `*@domain`, or by `*`
//!   go to a backend with the client's own credentials.
//! - `mapped`: local device users (each with an Argon2id password hash, each
//!   enabled or not on its own) log in to one backend account whose
//!   credentials popgate holds: a password / app password (environment
//!   variable or file) or OAuth tokens (`tokens::TokenSource`).
//!
//! A device user name always wins over a pass-through pattern; an exact
//! pattern over a domain; a domain over `*`. A login that matches nothing is
//! refused like a wrong password. Never logs a password or a token, and a
//! failed device login changes nothing: not the stored token, not the other
//! devices of the account.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use async_trait::async_trait;

use super::config::{AccountMode, AccountsSetup, DEFAULT_BACKEND, Pattern};
use super::policy::DevicePolicy;
use super::{Route, Router};
use crate::auth::oauth::client::OAuthClient;
use crate::auth::passwords::{DeviceHash, SecretSource, Verifier};
use crate::auth::tokens::{TokenSource, TokenSourceSettings, TokenStore, open_store};
use crate::backend::SharedBackend;
use crate::backend::select::BackendConfig;
use crate::mail::{BackendError, Credentials, Proof, Secret};
use crate::telemetry::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("account `{account}`: {why}")]
    Account { account: String, why: String },
    #[error("backend `{name}`: {source}")]
    Backend { name: String, source: BackendError },
    #[error("{0}")]
    Config(String),
}

enum Held {
    /// Re-read from its source when the backend refuses it (a rotated app
    /// password in a mounted Secret is picked up without a restart).
    Password {
        source: SecretSource,
        current: RwLock<Secret>,
    },
    OAuth(Arc<TokenSource>),
}

enum AccountKind {
    PassThrough,
    Mapped { login: String, held: Held },
}

struct Account {
    name: String,
    backend: SharedBackend,
    kind: AccountKind,
    /// For pass-through logins (devices have their own, merged).
    policy: DevicePolicy,
}

struct Device {
    account: usize,
    hash: DeviceHash,
    enabled: bool,
    policy: DevicePolicy,
}

/// Routes logins to accounts (see the module documentation).
pub struct AccountRouter {
    accounts: Vec<Account>,
    by_name: HashMap<String, usize>,
    devices: HashMap<String, Device>,
    exact: HashMap<String, usize>,
    domains: HashMap<String, usize>,
    any: Option<usize>,
    primary: SharedBackend,
}

impl AccountRouter {
    /// Builds every backend the accounts name (once each, with `build`),
    /// reads the held passwords and client secrets, and opens the token
    /// store. Fails on anything missing, so a bad setup stops at startup
    /// rather than at a device's first poll.
    pub fn new(
        setup: AccountsSetup<'_>,
        metrics: Arc<Metrics>,
        build: impl Fn(&BackendConfig) -> Result<SharedBackend, BackendError>,
    ) -> Result<Arc<AccountRouter>, RouterError> {
        let AccountsSetup { accounts, token_store, state, .. } = setup;
        let lookup = |name: &str| setup.backend_named(name);
        setup.check().map_err(|e| RouterError::Config(e.why))?;
        if accounts.is_empty() {
            return Err(RouterError::Config("no accounts configured".into()));
        }
        let store: Option<Arc<dyn TokenStore>> = match token_store {
            Some(config) if accounts.iter().any(|a| a.oauth.is_some()) => {
                Some(open_store(config, state).map_err(|e| RouterError::Config(e.to_string()))?)
            }
            _ => None,
        };
        let mut built: HashMap<String, SharedBackend> = HashMap::new();
        let mut list = Vec::new();
        let mut by_name = HashMap::new();
        let mut devices = HashMap::new();
        let mut exact = HashMap::new();
        let mut domains = HashMap::new();
        let mut any = None;
        let shared_state = state.map(|s| s.open()).transpose().map_err(RouterError::Config)?.flatten();
        let mut seats = super::seen::Seats::new(token_store.map(|t| t.path.as_path()), shared_state);
        for (index, config) in accounts.iter().enumerate() {
            let backend = match built.get(&config.backend) {
                Some(b) => b.clone(),
                None => {
                    let backend_config = lookup(&config.backend).expect("checked");
                    let backend = build(backend_config)
                        .map_err(|source| RouterError::Backend { name: config.backend.clone(), source })?;
                    built.insert(config.backend.clone(), backend.clone());
                    backend
                }
            };
            let bad = |why: String| RouterError::Account { account: config.name.clone(), why };
            let kind = match config.mode {
                AccountMode::Passthrough => {
                    for pattern in &config.users {
                        match Pattern::parse(pattern).expect("checked") {
                            Pattern::Exact(user) => exact.insert(user, index),
                            Pattern::Domain(domain) => domains.insert(domain, index),
                            Pattern::Any => any.replace(index),
                        };
                    }
                    AccountKind::PassThrough
                }
                AccountMode::Mapped => {
                    let held = match &config.oauth {
                        Some(oauth) => {
                            let backend_config = lookup(&config.backend).expect("checked");
                            let oauth = &oauth.for_api(backend_config.mail_api()).trusting(backend_config.ca_file());
                            let client = OAuthClient::new(oauth).map_err(|e| bad(e.to_string()))?;
                            let settings = TokenSourceSettings {
                                may_refresh: token_store.is_none_or(|s| s.refresh),
                                margin: Duration::from_secs(oauth.refresh_margin_secs),
                                retry_after: Duration::from_secs(oauth.retry_after_failure_secs),
                            };
                            let store = store.clone().expect("checked: OAuth accounts have a token store");
                            Held::OAuth(Arc::new(TokenSource::new(
                                config.name.clone(),
                                client,
                                store,
                                settings,
                                metrics.clone(),
                            )))
                        }
                        None => {
                            let source =
                                SecretSource::from_keys(config.password_env.as_ref(), config.password_file.as_ref())
                                    .map_err(|e| bad(e.to_string()))?
                                    .expect("checked");
                            let current = source.read().map_err(|e| bad(format!("password: {e}")))?;
                            Held::Password { source, current: RwLock::new(current) }
                        }
                    };
                    for device in &config.device {
                        let hash = DeviceHash::parse(&device.password_hash).expect("checked");
                        let mut policy = config.policy_for(Some(device)).resolve();
                        if policy.sharing == super::policy::Sharing::EachDeviceOnce {
                            let enabled: Vec<String> =
                                config.device.iter().filter(|d| d.enabled).map(|d| d.user.clone()).collect();
                            let records = config.policy.as_ref().and_then(|p| p.records_file.as_deref());
                            let configured: Vec<String> = config.device.iter().map(|d| d.user.clone()).collect();
                            let seat = seats.seat(records, &device.user, &enabled).map_err(bad)?;
                            policy = policy.seated(seat.keeping(&configured));
                        }
                        devices.insert(
                            device.user.clone(),
                            Device { account: index, hash, enabled: device.enabled, policy },
                        );
                    }
                    AccountKind::Mapped { login: config.login.clone().expect("checked"), held }
                }
            };
            by_name.insert(config.name.clone(), index);
            list.push(Account { name: config.name.clone(), backend, kind, policy: config.policy_for(None).resolve() });
        }
        // Readiness probes the [backend] if an account uses it, else the
        // first account's.
        let primary = built.get(DEFAULT_BACKEND).cloned().unwrap_or_else(|| list[0].backend.clone());
        Ok(Arc::new(AccountRouter { accounts: list, by_name, devices, exact, domains, any, primary }))
    }

    fn token_sources(&self) -> impl Iterator<Item = &Arc<TokenSource>> {
        self.accounts.iter().filter_map(|a| match &a.kind {
            AccountKind::Mapped { held: Held::OAuth(source), .. } => Some(source),
            _ => None,
        })
    }

    /// Keeps OAuth tokens fresh in the background (and lets a replica with
    /// `refresh = false` pick up what the refreshing one stored), every
    /// `every`, until the router is dropped.
    pub fn spawn_token_upkeep(self: &Arc<Self>, every: Duration) -> Option<tokio::task::JoinHandle<()>> {
        self.token_sources().next()?;
        let weak: Weak<AccountRouter> = Arc::downgrade(self);
        Some(tokio::spawn(async move {
            // Devices' logins refresh on demand; this only catches tokens
            // no device asked for in a while.
            loop {
                tokio::time::sleep(every).await;
                let Some(router) = weak.upgrade() else { return };
                for source in router.token_sources() {
                    source.maintain().await;
                }
            }
        }))
    }

    /// Which account `user` would reach, without checking a password (for
    /// tests and diagnostics).
    pub fn account_for(&self, user: &str) -> Option<&str> {
        self.lookup(user).map(|(index, _)| self.accounts[index].name.as_str())
    }

    fn lookup(&self, user: &str) -> Option<(usize, Option<&Device>)> {
        if let Some(device) = self.devices.get(user) {
            return Some((device.account, Some(device)));
        }
        if let Some(&index) = self.exact.get(user) {
            return Some((index, None));
        }
        if let Some((_, domain)) = user.rsplit_once('@')
            && let Some(&index) = self.domains.get(&domain.to_ascii_lowercase())
        {
            return Some((index, None));
        }
        self.any.map(|index| (index, None))
    }

    /// Through the process's bounded `Verifier`: when it is saturated the
    /// login is refused as a temporary failure (`-ERR [SYS/TEMP]`), known
    /// user or not.
    async fn verify(hash: &DeviceHash, password: Option<Secret>) -> Result<bool, BackendError> {
        Verifier::shared().verify(hash, password).await.map_err(|busy| {
            tracing::warn!("device password checks saturated; refusing a login for now");
            BackendError::Unavailable(busy.to_string())
        })
    }
}

#[async_trait]
impl Router for AccountRouter {
    async fn route(&self, client: &Credentials) -> Result<Route, BackendError> {
        let Some((index, device)) = self.lookup(&client.user) else {
            // As slow as a wrong password, so user names cannot be probed.
            Self::verify(DeviceHash::decoy(), None).await?;
            tracing::debug!(user = %client.user, "no account routes this user");
            return Err(BackendError::AuthFailed);
        };
        let account = &self.accounts[index];
        let AccountKind::Mapped { login, held } = &account.kind else {
            return Ok(Route {
                backend: account.backend.clone(),
                credentials: client.clone(),
                account: format!("{}:{}", account.name, client.user),
                label: account.name.clone(),
                policy: account.policy.clone(),
            });
        };
        let device = device.expect("a mapped account is reached through its devices");
        let password = match &client.proof {
            Proof::Password(p) => Some(p.clone()),
            // Devices log in with their local password.
            Proof::Bearer(_) => None,
        };
        let matches = Self::verify(&device.hash, password).await?;
        if !matches || !device.enabled {
            if matches {
                tracing::info!(user = %client.user, account = %account.name, "device login refused: the device is disabled");
            }
            return Err(BackendError::AuthFailed);
        }
        let proof = match held {
            Held::Password { current, .. } => {
                Proof::Password(current.read().unwrap_or_else(|p| p.into_inner()).clone())
            }
            Held::OAuth(source) => {
                let token = source.access_token().await.map_err(|e| BackendError::Unavailable(e.to_string()))?;
                Proof::Bearer(token)
            }
        };
        Ok(Route {
            backend: account.backend.clone(),
            credentials: Credentials { user: login.clone(), proof },
            account: account.name.clone(),
            label: account.name.clone(),
            policy: device.policy.clone(),
        })
    }

    async fn refresh(&self, route: &Route) -> Result<Option<Credentials>, BackendError> {
        let Some(&index) = self.by_name.get(&route.account) else { return Ok(None) };
        let account = &self.accounts[index];
        let AccountKind::Mapped { login, held } = &account.kind else { return Ok(None) };
        match (held, &route.credentials.proof) {
            (Held::OAuth(source), Proof::Bearer(refused)) => {
                let token =
                    source.after_refusal(refused).await.map_err(|e| BackendError::Unavailable(e.to_string()))?;
                Ok(Some(Credentials { user: login.clone(), proof: Proof::Bearer(token) }))
            }
            (Held::Password { source, current }, Proof::Password(refused)) => {
                let reread = source.read().map_err(|e| {
                    BackendError::Unavailable(format!("account {}: cannot re-read the password: {e}", account.name))
                })?;
                if &reread == refused {
                    tracing::error!(
                        account = %account.name,
                        "the backend refuses the password popgate holds for this account ({}); devices get -ERR [SYS/TEMP]",
                        source.describe()
                    );
                    return Err(BackendError::Unavailable(format!(
                        "the backend refuses the password held for account {}",
                        account.name
                    )));
                }
                tracing::info!(account = %account.name, "the held password changed at its source; retrying with it");
                *current.write().unwrap_or_else(|p| p.into_inner()) = reread.clone();
                Ok(Some(Credentials { user: login.clone(), proof: Proof::Password(reread) }))
            }
            _ => Ok(None),
        }
    }

    fn accepts_bearer_tokens(&self) -> bool {
        self.accounts.iter().any(|a| matches!(a.kind, AccountKind::PassThrough) && a.backend.accepts_bearer_tokens())
    }

    fn primary_backend(&self) -> SharedBackend {
        self.primary.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::*;
    use crate::auth::accounts::config::AccountConfig;
    use crate::backend::demo::{DemoBackend, DemoConfig, DemoStore};

    fn hash(password: &str) -> String {
        crate::auth::passwords::hash_password(password).unwrap()
    }

    fn accounts(toml_text: &str) -> Vec<AccountConfig> {
        #[derive(Deserialize)]
        struct Wrapper {
            account: Vec<AccountConfig>,
        }
        toml::from_str::<Wrapper>(toml_text).unwrap().account
    }

    fn demo() -> BackendConfig {
        BackendConfig::Demo(DemoConfig::default())
    }

    fn router(toml_text: &str) -> Arc<AccountRouter> {
        let store = DemoStore::from_config(&DemoConfig::default()).unwrap();
        let (accounts, demo, none) = (accounts(toml_text), demo(), BTreeMap::new());
        let setup =
            AccountsSetup { accounts: &accounts, backend: &demo, backends: &none, token_store: None, state: None };
        AccountRouter::new(setup, Arc::new(Metrics::new()), |_| {
            Ok(Arc::new(DemoBackend::new(store.clone())) as SharedBackend)
        })
        .unwrap()
    }

    fn setup() -> (tempfile::TempDir, Arc<AccountRouter>) {
        let dir = tempfile::tempdir().unwrap();
        let password = dir.path().join("pw");
        std::fs::write(&password, "held-password\n").unwrap();
        let text = format!(
            r#"
[[account]]
name = "scans"
mode = "mapped"
login = "scans@example.com"
password_file = "{}"
[[account.device]]
user = "printer-1"
password_hash = "{}"
[[account.device]]
user = "printer-2"
password_hash = "{}"
enabled = false

[[account]]
name = "staff"
mode = "passthrough"
users = ["*@example.com", "boss"]

[[account]]
name = "rest"
mode = "passthrough"
users = ["*"]
"#,
            password.display(),
            hash("one"),
            hash("two")
        );
        let r = router(&text);
        (dir, r)
    }

    #[tokio::test]
    async fn routes_devices_domains_and_the_rest() {
        let (_dir, r) = setup();
        assert_eq!(r.account_for("printer-1"), Some("scans"));
        assert_eq!(r.account_for("alice@Example.COM"), Some("staff"));
        assert_eq!(r.account_for("boss"), Some("staff"));
        assert_eq!(r.account_for("someone@else.org"), Some("rest"));

        let route = r.route(&Credentials::password("printer-1", "one")).await.unwrap();
        assert_eq!(route.account, "scans");
        assert_eq!(route.credentials, Credentials::password("scans@example.com", "held-password"));

        let route = r.route(&Credentials::password("alice@example.com", "hers")).await.unwrap();
        assert_eq!(route.account, "staff:alice@example.com");
        assert_eq!(route.credentials, Credentials::password("alice@example.com", "hers"));

        for (user, password) in [("printer-1", "two"), ("printer-1", ""), ("printer-2", "two")] {
            let e = r.route(&Credentials::password(user, password)).await.err().unwrap();
            assert!(matches!(e, BackendError::AuthFailed), "{user}: {e}");
        }
        let bearer = Credentials { user: "printer-1".into(), proof: Proof::Bearer(Secret::new("one")) };
        assert!(matches!(r.route(&bearer).await.err().unwrap(), BackendError::AuthFailed));
    }

    #[tokio::test]
    async fn unmatched_users_are_refused() {
        let r = router(&format!(
            "[[account]]\nname = \"a\"\nmode = \"passthrough\"\nusers = [\"*@example.com\"]\n\n[[account]]\nname = \"m\"\nmode = \"mapped\"\nlogin = \"x\"\npassword_env = \"PATH\"\n[[account.device]]\nuser = \"d\"\npassword_hash = \"{}\"\n",
            hash("p")
        ));
        assert_eq!(r.account_for("bob@other.org"), None);
        assert!(matches!(
            r.route(&Credentials::password("bob@other.org", "x")).await.err().unwrap(),
            BackendError::AuthFailed
        ));
    }

    #[tokio::test]
    async fn a_refused_held_password_is_reread_once() {
        let (dir, r) = setup();
        let route = r.route(&Credentials::password("printer-1", "one")).await.unwrap();
        // Unchanged at its source: a temporary failure for the device, not
        // its fault.
        assert!(matches!(r.refresh(&route).await, Err(BackendError::Unavailable(_))));
        std::fs::write(dir.path().join("pw"), "rotated\n").unwrap();
        let fresh = r.refresh(&route).await.unwrap().unwrap();
        assert_eq!(fresh, Credentials::password("scans@example.com", "rotated"));
        let route = r.route(&Credentials::password("printer-1", "one")).await.unwrap();
        assert_eq!(route.credentials, Credentials::password("scans@example.com", "rotated"));
        let passthrough = r.route(&Credentials::password("a@example.com", "x")).await.unwrap();
        assert!(r.refresh(&passthrough).await.unwrap().is_none());
    }

    #[test]
    fn configuration_mistakes_are_named() {
        let check = |text: &str| {
            let (accounts, demo, none) = (accounts(text), demo(), BTreeMap::new());
            let setup =
                AccountsSetup { accounts: &accounts, backend: &demo, backends: &none, token_store: None, state: None };
            setup.check().err().map(|e| e.why).unwrap_or_default()
        };
        let h = hash("x");
        let device = format!("[[account.device]]\nuser = \"d\"\npassword_hash = \"{h}\"\n");
        let mapped = |extra: &str| format!("[[account]]\nname = \"m\"\nmode = \"mapped\"\n{extra}\n{device}");
        assert!(check(&mapped("login = \"x\"\npassword_env = \"P\"")).is_empty());
        assert!(check(&mapped("password_env = \"P\"")).contains("login"));
        assert!(check(&mapped("login = \"x\"")).contains("password_env"));
        assert!(check(&mapped("login = \"x\"\npassword_env = \"P\"\npassword_file = \"/f\"")).contains("not both"));
        assert!(check(&mapped("login = \"x\"\npassword_env = \"P\"\nbackend = \"nope\"")).contains("nope"));
        assert!(
            check(&mapped("login = \"x\"\n[account.oauth]\nprovider = \"google\"\nclient_id = \"c\""))
                .contains("token_store")
        );
        let bad_hash = "[[account]]\nname = \"m\"\nmode = \"mapped\"\nlogin = \"x\"\npassword_env = \"P\"\n[[account.device]]\nuser = \"d\"\npassword_hash = \"plain\"\n";
        assert!(check(bad_hash).contains("password_hash"));
        let twice = format!(
            "{}\n{}",
            mapped("login = \"x\"\npassword_env = \"P\""),
            mapped("login = \"y\"\npassword_env = \"P\"")
        );
        assert!(check(&twice).contains("twice"));
        let pt = |users: &str| format!("[[account]]\nname = \"p\"\nmode = \"passthrough\"\nusers = {users}\n");
        assert!(check(&pt("[\"*@example.com\", \"*\", \"bob\"]")).is_empty());
        assert!(check(&pt("[]")).contains("users"));
        assert!(check(&pt("[\"*@\"]")).contains("*@"));
        assert!(check(&pt("[\"a*b\"]")).contains("a*b"));
        assert!(check(&pt("[\"*@A.com\", \"*@a.COM\"]")).contains("also routed"));
        let shadow = format!("{}\n{}", mapped("login = \"x\"\npassword_env = \"P\""), pt("[\"d\"]"));
        assert!(check(&shadow).contains("also a passthrough user"));
    }
}
