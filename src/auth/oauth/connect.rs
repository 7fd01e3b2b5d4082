//! Connecting an account: the part of getting its first token that
//! `popgate oauth login` and the admin page share — the account's client
//! and token store, the authorization request (state + PKCE), the code
//! exchange, the device-code wait, and storing the answer (keeping a
//! refresh token the provider did not re-issue).
//!
//! The callers own the conversation (a terminal, a web page); nothing here
//! prints. Never formats a token, a code or a verifier.

use std::sync::Arc;
use std::time::Duration;

use url::Url;

use super::client::{DeviceAuthorization, OAuthClient, TokenError, TokenResponse};
use super::flows::{self, FlowError, Pkce};
use super::{Grant, MailApi, OAuthConfig};
use crate::auth::accounts::config::{AccountConfig, AccountMode, AccountsSetup};
use crate::auth::tokens::{StoreError, StoredToken, TokenStore, open_store};
use crate::mail::Secret;
use crate::state::StateConfig;
use crate::state::redis::RedisTarget;

/// The longest a device-code sign-in is waited for, whatever the provider
/// says its code lives.
pub const MAX_DEVICE_WAIT: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no account `{name}` in the configuration (OAuth accounts: {known})")]
    UnknownAccount { name: String, known: String },
    #[error("account `{0}` does not use OAuth (it needs mode = \"mapped\" and an [account.oauth] table)")]
    NotOAuth(String),
    #[error("no [token_store] in the configuration")]
    NoTokenStore,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Flow(#[from] FlowError),
}

impl ConnectError {
    /// The provider's RFC 6749 error name, when it refused.
    pub fn provider_error(&self) -> Option<&str> {
        match self {
            ConnectError::Token(TokenError::Refused { error, .. })
            | ConnectError::Flow(FlowError::Token(TokenError::Refused { error, .. })) => Some(error),
            _ => None,
        }
    }
}

/// One OAuth account, ready to be signed in.
pub struct Connector {
    pub account: String,
    /// Whom to sign in as (`login`), as a hint to the provider.
    pub login_hint: Option<String>,
    pub client: OAuthClient,
    store: Arc<dyn TokenStore>,
    /// Where tokens are stored, for people (never with a password).
    pub store_name: String,
}

/// An authorization-code sign-in under way: what the redirect is checked
/// against and the code exchanged with. Never printed (it holds the PKCE
/// verifier).
pub struct CodeFlow {
    pub state: String,
    pub pkce: Pkce,
    pub redirect_uri: String,
}

/// What was stored.
#[derive(Debug, Clone)]
pub struct Connected {
    pub expires_at: Option<u64>,
    pub refresh_token_held: bool,
    /// The provider sent no refresh token (popgate cannot renew this one).
    pub no_refresh_issued: bool,
    /// "valid, expires in 52 min (…); refresh token held".
    pub summary: String,
}

/// The account `name`, if it is a mapped OAuth account.
pub fn oauth_account<'a>(config: AccountsSetup<'a>, name: &str) -> Result<&'a AccountConfig, ConnectError> {
    let account = config.accounts.iter().find(|a| a.name == name).ok_or_else(|| {
        let names: Vec<_> = config.accounts.iter().filter(|a| a.oauth.is_some()).map(|a| a.name.as_str()).collect();
        ConnectError::UnknownAccount { name: name.to_string(), known: names.join(", ") }
    })?;
    if account.mode != AccountMode::Mapped || account.oauth.is_none() {
        return Err(ConnectError::NotOAuth(name.to_string()));
    }
    Ok(account)
}

/// The account's OAuth settings as its backend uses them (Graph scopes for
/// the Graph backend, the backend's CA file).
pub fn effective_oauth(config: AccountsSetup<'_>, account: &AccountConfig) -> Option<OAuthConfig> {
    let oauth = account.oauth.as_ref()?;
    let backend = config.backend_named(&account.backend);
    let api = backend.map_or(MailApi::Imap, |b| b.mail_api());
    Some(oauth.for_api(api).trusting(backend.and_then(|b| b.ca_file())))
}

/// Where tokens are stored, for people: the file, or the shared store
/// (never with a password).
pub fn store_description(store: &crate::auth::tokens::TokenStoreConfig, state: Option<&StateConfig>) -> String {
    match state.and_then(|s| s.url.as_deref()).and_then(|url| RedisTarget::parse(url).ok()) {
        Some(target) => format!("the shared state store {target} (encrypted)"),
        None => store.path.display().to_string(),
    }
}

impl Connector {
    /// The account's client (reading its client secret now) and token store.
    pub fn for_account(config: AccountsSetup<'_>, name: &str) -> Result<Connector, ConnectError> {
        let account = oauth_account(config, name)?;
        let oauth = effective_oauth(config, account).expect("an OAuth account");
        let store_config = config.token_store.ok_or(ConnectError::NoTokenStore)?;
        let store = open_store(store_config, config.state)?;
        Ok(Connector {
            account: name.to_string(),
            login_hint: account.login.clone(),
            client: OAuthClient::new(&oauth)?,
            store,
            store_name: store_description(store_config, config.state),
        })
    }

    /// The authorization URL to send the browser to, and the flow to
    /// finish when it comes back to `redirect_uri`.
    pub fn start_code(&self, redirect_uri: &str) -> Result<(Url, CodeFlow), FlowError> {
        let flow = CodeFlow { state: flows::new_state(), pkce: Pkce::new(), redirect_uri: redirect_uri.to_string() };
        let url = flows::authorization_url(
            &self.client.endpoints,
            self.client.client_id(),
            redirect_uri,
            &flow.state,
            &flow.pkce,
            self.login_hint.as_deref(),
        )?;
        Ok((url, flow))
    }

    /// Exchanges the code the browser brought back and stores the token.
    pub async fn finish_code(&self, flow: &CodeFlow, code: &Secret) -> Result<Connected, ConnectError> {
        let response = self.client.exchange_code(code, &flow.pkce.verifier, &flow.redirect_uri).await?;
        self.store(response).await
    }

    /// RFC 8628 §3.1: the user code and address to show.
    pub async fn start_device(&self) -> Result<DeviceAuthorization, ConnectError> {
        Ok(self.client.device_authorization().await?)
    }

    /// Polls until the user approved (at most the code's life, and at most
    /// `MAX_DEVICE_WAIT`), then stores the token.
    pub async fn finish_device(&self, device: &DeviceAuthorization) -> Result<Connected, ConnectError> {
        let wait = Duration::from_secs(device.expires_in).min(MAX_DEVICE_WAIT);
        let response = tokio::time::timeout(wait, flows::poll_device_flow(&self.client, device))
            .await
            .map_err(|_| FlowError::Expired)??;
        self.store(response).await
    }

    /// App-only (client credentials): requests and stores a token.
    pub async fn client_credentials(&self) -> Result<Connected, ConnectError> {
        let response = self.client.client_credentials().await?;
        self.store(response).await
    }

    /// Stores `response` as the account's token, keeping the refresh token
    /// the account had when the provider issued none (not for client
    /// credentials, which have none).
    pub async fn store(&self, response: TokenResponse) -> Result<Connected, ConnectError> {
        let previous = self.store.load(&self.account).await.ok().flatten();
        let kept_refresh = previous.as_ref().and_then(|p| p.refresh_token.as_ref());
        let had_refresh = response.refresh_token.is_some();
        let code_grant = self.client.grant == Grant::AuthorizationCode;
        let token = response.into_stored(if code_grant { kept_refresh } else { None });
        self.store.save(&self.account, &token).await?;
        tracing::info!(account = %self.account, "stored a new token for the account");
        Ok(Connected {
            expires_at: token.expires_at,
            refresh_token_held: token.refresh_token.is_some(),
            no_refresh_issued: code_grant && !had_refresh,
            summary: describe(&token, crate::auth::tokens::unix_now()),
        })
    }
}

/// "valid, expires in 52 min (…)", without anything secret.
pub fn describe(token: &StoredToken, now: u64) -> String {
    let expiry = match (token.expires_at, token.remaining_secs(now)) {
        (Some(at), Some(left)) if left > 0 => {
            format!("valid, expires in {} ({})", duration(left as u64), format_utc(at))
        }
        (Some(at), Some(left)) => {
            format!("expired {} ago ({})", duration((-left) as u64), format_utc(at))
        }
        _ => "valid until refused (no expiry given)".into(),
    };
    let refresh = if token.refresh_token.is_some() { "refresh token held" } else { "no refresh token" };
    format!("{expiry}; {refresh}")
}

/// `YYYY-MM-DD HH:MM:SS UTC` (no time zone database needed).
pub fn format_utc(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC", secs / 3600, secs / 60 % 60, secs % 60)
}

fn duration(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs} s"),
        120..=7199 => format!("{} min", secs / 60),
        7200..=172_799 => format!("{} h", secs / 3600),
        _ => format!("{} days", secs / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptions_hide_the_token() {
        let token = StoredToken {
            access_token: Secret::new("SECRET-A"),
            refresh_token: Some(Secret::new("SECRET-R")),
            expires_at: Some(1_000 + 3_120),
            obtained_at: 1_000,
            scope: None,
        };
        let text = describe(&token, 1_000);
        assert_eq!(text, "valid, expires in 52 min (1970-01-01 01:08:40 UTC); refresh token held");
        assert!(describe(&token, 10_000).starts_with("expired 98 min ago"), "{}", describe(&token, 10_000));
    }

    #[test]
    fn a_refusal_names_the_provider_error() {
        let refused = ConnectError::Flow(FlowError::Token(TokenError::Refused {
            error: "invalid_grant".into(),
            description: None,
        }));
        assert_eq!(refused.provider_error(), Some("invalid_grant"));
        assert_eq!(ConnectError::NoTokenStore.provider_error(), None);
    }
}
