//! "Connect a mailbox" on the admin page: the sign-ins under way.
//!
//! Authorization code + PKCE: the page sends the browser to the provider
//! with a fresh `state`; the provider sends it back to `/oauth/callback` on
//! this listener. Each pending sign-in is bound to the admin session that
//! started it and to a nonce in a cookie of its own (`SameSite=Lax`, path
//! `/oauth/callback`: the session cookie is `Strict`, and a browser does
//! not send a `Strict` cookie on the provider's redirect), is used once,
//! and expires after `CODE_FLOW_LIFETIME`; at most `MAX_CODE_FLOWS` are
//! pending. The PKCE verifier never leaves this process.
//!
//! Device code: the page shows the user code and the address; a task polls
//! the provider (at most `MAX_DEVICE_FLOWS` at once, each bounded by the
//! code's life and `connect::MAX_DEVICE_WAIT`) and stores the token.
//!
//! Never renders or logs a code, a verifier, a device code or a token.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::auth::oauth::connect::{CodeFlow, ConnectError, Connected, Connector};
use crate::mail::Secret;

/// The nonce cookie binding a browser to its pending sign-in.
pub const FLOW_COOKIE: &str = "popgate_oauth_flow";
/// The callback's path on the admin listener.
pub const CALLBACK_PATH: &str = "/oauth/callback";
/// How long a person has to sign in at the provider.
pub const CODE_FLOW_LIFETIME: Duration = Duration::from_secs(10 * 60);
/// Authorization-code sign-ins pending at once; past it the oldest goes.
const MAX_CODE_FLOWS: usize = 16;
/// Device-code sign-ins running at once.
pub const MAX_DEVICE_FLOWS: usize = 4;
/// A finished device sign-in's outcome stays readable this long.
const DEVICE_RESULT_KEPT: Duration = Duration::from_secs(15 * 60);

struct PendingCode {
    account: String,
    session_id: String,
    /// The value of `FLOW_COOKIE` in the browser that started it.
    browser: String,
    flow: CodeFlow,
    connector: Arc<Connector>,
    started: Instant,
}

/// Where a device sign-in stands.
#[derive(Debug, Clone)]
pub enum DeviceStatus {
    Waiting,
    Connected(Connected),
    Failed(String),
}

/// What the page shows of a device sign-in.
#[derive(Debug, Clone)]
pub struct DeviceView {
    pub id: String,
    pub account: String,
    pub user_code: String,
    pub verification_uri: String,
    pub verification_uri_complete: Option<String>,
    pub login_hint: Option<String>,
    pub status: DeviceStatus,
}

struct DeviceFlow {
    session_id: String,
    view: DeviceView,
    started: Instant,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DeviceFlow {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Why a callback was not used.
#[derive(Debug, thiserror::Error)]
pub enum CallbackError {
    #[error("this sign-in is unknown, was used already or has expired: start it again from the accounts page")]
    UnknownState,
    #[error("this sign-in was started in another browser or admin session: start it again from the accounts page")]
    WrongSession,
    #[error("{0}")]
    Provider(String),
    #[error("{0}")]
    Connect(#[from] ConnectError),
}

#[derive(Default)]
pub struct Flows {
    code: Mutex<HashMap<String, PendingCode>>,
    device: Arc<Mutex<HashMap<String, DeviceFlow>>>,
}

/// What a provider's `error` means to an administrator.
pub fn explain_provider_error(error: &str, description: Option<&str>) -> String {
    let what = match error {
        "access_denied" => "the sign-in was refused or cancelled at the provider (access_denied)".to_string(),
        "invalid_grant" => {
            "the provider refused the authorization (invalid_grant: the code or device code was used already, \
             expired, or was issued for another redirect address)"
                .to_string()
        }
        "expired_token" => "the device code expired before the sign-in was completed (expired_token)".to_string(),
        other => format!("the provider answered {other}"),
    };
    match description {
        Some(d) if !d.is_empty() => format!("{what}: {}", printable(d)),
        _ => what,
    }
}

fn printable(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(300).collect()
}

/// An error for the page: the provider's refusal in words, the rest as it
/// says itself (none carries a secret).
pub fn explain(error: &ConnectError) -> String {
    if let Some(name) = error.provider_error() {
        let description = match error {
            ConnectError::Token(crate::auth::oauth::client::TokenError::Refused { description, .. })
            | ConnectError::Flow(crate::auth::oauth::flows::FlowError::Token(
                crate::auth::oauth::client::TokenError::Refused { description, .. },
            )) => description.as_deref(),
            _ => None,
        };
        return explain_provider_error(name, description);
    }
    match error {
        ConnectError::Flow(crate::auth::oauth::flows::FlowError::Expired) => {
            "the device code expired before the sign-in was completed: start again".into()
        }
        other => other.to_string(),
    }
}

impl Flows {
    fn codes(&self) -> std::sync::MutexGuard<'_, HashMap<String, PendingCode>> {
        self.code.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn devices(&self) -> std::sync::MutexGuard<'_, HashMap<String, DeviceFlow>> {
        self.device.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps a new pending sign-in; returns the provider's URL and the
    /// browser nonce for `FLOW_COOKIE`.
    pub fn start_code(
        &self,
        connector: Connector,
        session_id: &str,
        redirect_uri: &str,
    ) -> Result<(url::Url, String), ConnectError> {
        let (url, flow) = connector.start_code(redirect_uri)?;
        let browser = super::guard::random_token();
        let mut codes = self.codes();
        codes.retain(|_, p| p.started.elapsed() < CODE_FLOW_LIFETIME);
        if codes.len() >= MAX_CODE_FLOWS
            && let Some(oldest) = codes.iter().min_by_key(|(_, p)| p.started).map(|(k, _)| k.clone())
        {
            codes.remove(&oldest);
        }
        codes.insert(
            flow.state.clone(),
            PendingCode {
                account: connector.account.clone(),
                session_id: session_id.to_string(),
                browser: browser.clone(),
                flow,
                connector: Arc::new(connector),
                started: Instant::now(),
            },
        );
        Ok((url, browser))
    }

    /// Pending code sign-ins.
    pub fn pending_codes(&self) -> usize {
        self.codes().len()
    }

    /// The provider's redirect: `state` is looked up and spent (whatever
    /// happens next, it never works twice), the browser nonce and the admin
    /// session must be the ones that started it; then the provider's error,
    /// or the code exchanged and the token stored. `session_alive` says
    /// whether an admin session id is still signed in.
    pub async fn finish_code(
        &self,
        query: &HashMap<String, String>,
        browser: Option<&str>,
        session_alive: impl Fn(&str) -> bool,
    ) -> Result<(String, Connected), (Option<String>, CallbackError)> {
        let state = query.get("state").map(String::as_str).unwrap_or_default();
        let pending = {
            let mut codes = self.codes();
            codes.retain(|_, p| p.started.elapsed() < CODE_FLOW_LIFETIME);
            codes.remove(state)
        };
        let Some(pending) = pending else { return Err((None, CallbackError::UnknownState)) };
        let account = Some(pending.account.clone());
        let same_browser = browser.is_some_and(|b| super::guard::same(b, &pending.browser));
        if !same_browser || !session_alive(&pending.session_id) {
            tracing::warn!(account = %pending.account, "an OAuth callback from another browser or session was refused");
            return Err((account, CallbackError::WrongSession));
        }
        if let Some(error) = query.get("error") {
            let text = explain_provider_error(error, query.get("error_description").map(String::as_str));
            tracing::info!(account = %pending.account, error = %printable(error), "the provider refused the sign-in");
            return Err((account, CallbackError::Provider(text)));
        }
        let code = match query.get("code") {
            Some(code) if !code.is_empty() => Secret::new(code.clone()),
            _ => return Err((account, CallbackError::Provider("the provider sent no code".into()))),
        };
        match pending.connector.finish_code(&pending.flow, &code).await {
            Ok(connected) => Ok((pending.account, connected)),
            Err(e) => {
                tracing::warn!(account = %pending.account, error = %e, "the sign-in's code exchange failed");
                Err((account, CallbackError::Connect(e)))
            }
        }
    }

    /// Starts a device sign-in for `connector`'s account (replacing one
    /// already running for it): the provider's user code now, the token
    /// stored by a task once the user approved. Returns its id.
    pub async fn start_device(&self, connector: Connector, session_id: &str) -> Result<String, String> {
        {
            let mut devices = self.devices();
            devices.retain(|_, d| {
                matches!(d.view.status, DeviceStatus::Waiting) || d.started.elapsed() < DEVICE_RESULT_KEPT
            });
            devices.retain(|_, d| d.view.account != connector.account);
            let running = devices.values().filter(|d| matches!(d.view.status, DeviceStatus::Waiting)).count();
            if running >= MAX_DEVICE_FLOWS {
                return Err(format!(
                    "{MAX_DEVICE_FLOWS} device-code sign-ins are waiting already: finish or let one expire first"
                ));
            }
        }
        let device = connector.start_device().await.map_err(|e| explain(&e))?;
        let id = super::guard::random_token();
        let view = DeviceView {
            id: id.clone(),
            account: connector.account.clone(),
            user_code: printable(&device.user_code),
            verification_uri: printable(&device.verification_uri),
            verification_uri_complete: device.verification_uri_complete.as_deref().map(printable),
            login_hint: connector.login_hint.clone(),
            status: DeviceStatus::Waiting,
        };
        let table = self.device.clone();
        let task_id = id.clone();
        let account = connector.account.clone();
        let mut devices = self.devices();
        let task = tokio::spawn(async move {
            let outcome = connector.finish_device(&device).await;
            let status = match outcome {
                Ok(connected) => DeviceStatus::Connected(connected),
                Err(e) => {
                    tracing::warn!(account = %account, error = %e, "device-code sign-in failed");
                    DeviceStatus::Failed(explain(&e))
                }
            };
            if let Some(flow) = table.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&task_id) {
                flow.view.status = status;
            }
        });
        devices
            .insert(id.clone(), DeviceFlow { session_id: session_id.to_string(), view, started: Instant::now(), task });
        Ok(id)
    }

    /// The device sign-in `id`, if `session_id` started it.
    pub fn device(&self, id: &str, session_id: &str) -> Option<DeviceView> {
        let devices = self.devices();
        let flow = devices.get(id)?;
        super::guard::same(&flow.session_id, session_id).then(|| flow.view.clone())
    }

    /// Device sign-ins waiting now.
    pub fn waiting_devices(&self) -> usize {
        self.devices().values().filter(|d| matches!(d.view.status, DeviceStatus::Waiting)).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_errors_are_explained_without_control_characters() {
        let text = explain_provider_error("access_denied", Some("The user\ndeclined"));
        assert_eq!(text, "the sign-in was refused or cancelled at the provider (access_denied): The userdeclined");
        assert!(explain_provider_error("invalid_grant", None).contains("invalid_grant"));
        assert!(explain_provider_error("expired_token", None).contains("expired"));
    }

    /// A configuration with the OAuth account "scans" (nothing listens at
    /// its endpoints: these tests never reach them).
    fn connector(dir: &std::path::Path) -> Connector {
        use std::os::unix::fs::PermissionsExt;
        let key = dir.join("token.key");
        std::fs::write(&key, crate::auth::tokens::StoreKey::generate_text()).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let text = format!(
            r#"
[backend]
kind = "imap"
host = "127.0.0.1"
port = 9
tls = "none"

[token_store]
path = "{store}"
key_file = "{key}"

[[account]]
name = "scans"
mode = "mapped"
login = "alice"

[account.oauth]
provider = "generic"
client_id = "id"
authorization_url = "http://127.0.0.1:9/authorize"
token_url = "http://127.0.0.1:9/token"
scopes = ["mail"]

[[account.device]]
user = "scanner"
password_hash = "{hash}"
"#,
            hash = crate::auth::passwords::hash_password("device password").unwrap(),
            store = dir.join("tokens.enc").display(),
            key = key.display(),
        );
        let config = crate::config::Config::from_toml(&text, "test").unwrap();
        Connector::for_account(config.accounts(), "scans").unwrap()
    }

    fn state_of(url: &url::Url) -> HashMap<String, String> {
        let state = url.query_pairs().find(|(k, _)| k == "state").unwrap().1.into_owned();
        [("state".to_string(), state), ("code".to_string(), "c".to_string())].into()
    }

    #[tokio::test]
    async fn pending_sign_ins_are_bounded_and_bound_to_their_browser_and_session() {
        let dir = tempfile::tempdir().unwrap();
        let flows = Flows::default();
        let (first, first_browser) =
            flows.start_code(connector(dir.path()), "session-1", "http://127.0.0.1:1/oauth/callback").unwrap();
        let mut last = None;
        for _ in 0..MAX_CODE_FLOWS + 3 {
            last = Some(flows.start_code(connector(dir.path()), "session-1", "http://127.0.0.1:1/cb").unwrap());
        }
        assert_eq!(flows.pending_codes(), MAX_CODE_FLOWS, "bounded");
        let refused = flows.finish_code(&state_of(&first), Some(&first_browser), |_| true).await.unwrap_err();
        assert!(matches!(refused.1, CallbackError::UnknownState), "the oldest was dropped");

        let (url, browser) = last.unwrap();
        // Another browser's nonce: refused, and the state is spent.
        let refused = flows.finish_code(&state_of(&url), Some("other"), |_| true).await.unwrap_err();
        assert!(matches!(refused.1, CallbackError::WrongSession));
        let again = flows.finish_code(&state_of(&url), Some(&browser), |_| true).await.unwrap_err();
        assert!(matches!(again.1, CallbackError::UnknownState), "a state is used once");

        // The right browser, but its admin session is gone.
        let (url, browser) = flows.start_code(connector(dir.path()), "session-2", "http://127.0.0.1:1/cb").unwrap();
        let refused = flows.finish_code(&state_of(&url), Some(&browser), |id| id != "session-2").await.unwrap_err();
        assert!(matches!(refused.1, CallbackError::WrongSession));

        // The provider's error is said in words.
        let (url, browser) = flows.start_code(connector(dir.path()), "session-3", "http://127.0.0.1:1/cb").unwrap();
        let mut query = state_of(&url);
        query.insert("error".into(), "access_denied".into());
        let refused = flows.finish_code(&query, Some(&browser), |_| true).await.unwrap_err();
        assert!(refused.1.to_string().contains("access_denied"), "{}", refused.1);
        assert_eq!(refused.0.as_deref(), Some("scans"));
    }

    #[tokio::test]
    async fn an_unknown_state_is_refused() {
        let flows = Flows::default();
        let query: HashMap<String, String> = [("state".to_string(), "nope".to_string())].into();
        let refused = flows.finish_code(&query, Some("x"), |_| true).await.unwrap_err();
        assert!(matches!(refused.1, CallbackError::UnknownState));
    }
}
