//! Requests to the provider's token and device authorization endpoints
//! (RFC 6749 §4.1.3, §4.4, §5, §6; RFC 8628 §3.1, §3.4), form-encoded, with
//! the client authenticated by `client_id` (+ `client_secret`) in the body.
//!
//! Answers are classified once: `Refused` is the provider's considered
//! "no" (RFC 6749 §5.2 error JSON, e.g. `invalid_grant`); `Unavailable` is
//! anything a later retry may fix (network, timeout, 5xx, 429). Never puts a
//! token, code or secret in an error or a log line.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::{Endpoints, Grant, OAuthConfig};
use crate::auth::tokens::{StoredToken, unix_now};
use crate::mail::Secret;

/// The longest answer read from a provider.
const MAX_BODY: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// An RFC 6749 §5.2 error response.
    #[error("the provider refused: {error}{}", description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Refused { error: String, description: Option<String> },
    /// Network, timeout, 5xx, rate limiting: try again later.
    #[error("the provider is unavailable: {0}")]
    Unavailable(String),
    /// An answer that is not what RFC 6749 says.
    #[error("unexpected answer from the provider: {0}")]
    Invalid(String),
    #[error("{0}")]
    Config(String),
}

impl TokenError {
    /// The refresh token (or code) is dead: only a new sign-in helps.
    pub fn is_invalid_grant(&self) -> bool {
        matches!(self, TokenError::Refused { error, .. } if error == "invalid_grant")
    }

    /// A refusal only an operator can end, with what they must do; `None`
    /// for anything retrying may cure. (`invalid_grant` has its own words,
    /// `TokenSource` says them.)
    pub fn operator_action(&self) -> Option<(&'static str, &'static str)> {
        let TokenError::Refused { error, .. } = self else { return None };
        OPERATOR_ACTIONS.iter().find(|(name, _)| name == error).copied()
    }

    /// A short word for the refreshes metric.
    pub fn metric_result(&self) -> &'static str {
        if let Some((name, _)) = self.operator_action() {
            return name;
        }
        match self {
            TokenError::Refused { error, .. } if error == "invalid_grant" => "invalid_grant",
            TokenError::Refused { .. } => "refused",
            TokenError::Unavailable(_) => "unavailable",
            TokenError::Invalid(_) => "invalid_response",
            TokenError::Config(_) => "config",
        }
    }
}

/// RFC 6749 §5.2 and OpenID Connect errors that no retry cures, and what
/// the operator must do (Microsoft's AADSTS texts and Google's answers name
/// the same causes: consent withdrawn or never given, a client secret
/// expired, a client not allowed this grant, a scope not granted).
const OPERATOR_ACTIONS: &[(&str, &str)] = &[
    (
        "interaction_required",
        "the provider wants the user to sign in interactively (MFA or a Conditional Access policy): run `popgate oauth login ACCOUNT`, or exempt the app from the policy",
    ),
    (
        "consent_required",
        "the user or an administrator must consent to the app's permissions: grant consent (Entra admin center → Enterprise applications → Permissions, or the Google consent screen) and run `popgate oauth login ACCOUNT`",
    ),
    (
        "invalid_client",
        "the provider does not accept the client id or secret (an expired or rotated client secret?): renew the secret, update client_secret_env / client_secret_file, and restart popgate",
    ),
    (
        "unauthorized_client",
        "the OAuth client may not use this grant (public client flows or client credentials not enabled, or the app disabled): fix the app registration",
    ),
    (
        "invalid_scope",
        "the provider refuses the requested scopes: fix `scopes` in [account.oauth] or the permissions of the app registration",
    ),
];

/// A successful token response.
pub struct TokenResponse {
    pub access_token: Secret,
    pub refresh_token: Option<Secret>,
    pub expires_in: Option<u64>,
    pub scope: Option<String>,
}

impl TokenResponse {
    /// What to store. A response without a refresh token keeps the one the
    /// account had (RFC 6749 §6: the server MAY issue a new one).
    pub fn into_stored(self, previous_refresh: Option<&Secret>) -> StoredToken {
        let now = unix_now();
        StoredToken {
            access_token: self.access_token,
            refresh_token: self.refresh_token.or_else(|| previous_refresh.cloned()),
            expires_at: self.expires_in.map(|s| now + s),
            obtained_at: now,
            scope: self.scope,
        }
    }
}

/// The wire form; never Debug-printed (it holds tokens).
#[derive(Deserialize)]
struct RawTokenResponse {
    access_token: String,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<NumberOrString>,
    #[serde(default)]
    refresh_token: Option<String>,
    #[serde(default)]
    scope: Option<String>,
}

/// Some servers send numbers as strings.
#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrString {
    Number(u64),
    String(String),
}

impl NumberOrString {
    fn value(&self) -> Option<u64> {
        match self {
            NumberOrString::Number(n) => Some(*n),
            NumberOrString::String(s) => s.trim().parse().ok(),
        }
    }
}

#[derive(Deserialize)]
struct RawError {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

/// RFC 8628 §3.2.
#[derive(Debug, Clone)]
pub struct DeviceAuthorization {
    /// Secret-ish: whoever has it can poll for the token. Not printed.
    pub device_code: Secret,
    pub user_code: String,
    pub verification_uri: String,
    pub verification_uri_complete: Option<String>,
    pub expires_in: u64,
    pub interval: u64,
    /// Microsoft's ready-made sentence for the user, if any.
    pub message: Option<String>,
}

#[derive(Deserialize)]
struct RawDeviceAuthorization {
    device_code: String,
    user_code: String,
    #[serde(alias = "verification_url")]
    verification_uri: String,
    #[serde(default)]
    verification_uri_complete: Option<String>,
    expires_in: NumberOrString,
    #[serde(default)]
    interval: Option<NumberOrString>,
    #[serde(default)]
    message: Option<String>,
}

/// One account's OAuth client.
#[derive(Clone)]
pub struct OAuthClient {
    http: reqwest::Client,
    pub endpoints: Arc<Endpoints>,
    client_id: String,
    client_secret: Option<Secret>,
    pub grant: Grant,
}

impl OAuthClient {
    /// Builds the client; reads the client secret now.
    pub fn new(config: &OAuthConfig) -> Result<OAuthClient, TokenError> {
        let endpoints = config.endpoints().map_err(TokenError::Config)?;
        let client_secret = match config.client_secret_source().map_err(|e| TokenError::Config(e.to_string()))? {
            Some(source) => Some(source.read().map_err(|e| TokenError::Config(format!("client secret: {e}")))?),
            None => None,
        };
        let timeout = Duration::from_secs(config.timeout_secs);
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls_config(config.ca_file.as_deref()).map_err(TokenError::Config)?)
            .http1_only()
            .connect_timeout(timeout)
            .timeout(timeout)
            // A token endpoint that redirects is misconfigured; following
            // it could send the secret elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("popgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| TokenError::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(OAuthClient {
            http,
            endpoints: Arc::new(endpoints),
            client_id: config.client_id.clone(),
            client_secret,
            grant: config.grant,
        })
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// RFC 6749 §4.1.3 with the RFC 7636 verifier.
    pub async fn exchange_code(
        &self,
        code: &Secret,
        verifier: &Secret,
        redirect_uri: &str,
    ) -> Result<TokenResponse, TokenError> {
        self.token_request(&[
            ("grant_type", "authorization_code"),
            ("code", code.expose()),
            ("redirect_uri", redirect_uri),
            ("code_verifier", verifier.expose()),
        ])
        .await
    }

    /// RFC 6749 §6.
    pub async fn refresh(&self, refresh_token: &Secret) -> Result<TokenResponse, TokenError> {
        let scope = self.endpoints.scopes.join(" ");
        self.token_request(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token.expose()),
            ("scope", &scope),
        ])
        .await
    }

    /// RFC 6749 §4.4.
    pub async fn client_credentials(&self) -> Result<TokenResponse, TokenError> {
        let scope = self.endpoints.scopes.join(" ");
        self.token_request(&[("grant_type", "client_credentials"), ("scope", &scope)]).await
    }

    /// RFC 8628 §3.4 (one poll).
    pub async fn poll_device(&self, device_code: &Secret) -> Result<TokenResponse, TokenError> {
        self.token_request(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
            ("device_code", device_code.expose()),
        ])
        .await
    }

    /// RFC 8628 §3.1.
    pub async fn device_authorization(&self) -> Result<DeviceAuthorization, TokenError> {
        let url = self.endpoints.device_authorization.clone().ok_or_else(|| {
            TokenError::Config("this provider has no device authorization endpoint for mail scopes".into())
        })?;
        let scope = self.endpoints.scopes.join(" ");
        let mut form = vec![("client_id", self.client_id.as_str()), ("scope", scope.as_str())];
        if let Some(secret) = &self.client_secret {
            form.push(("client_secret", secret.expose()));
        }
        let body = self.post(url, &form).await?;
        let raw: RawDeviceAuthorization = serde_json::from_slice(&body).map_err(|e| {
            TokenError::Invalid(format!("device authorization: {}", crate::auth::tokens::json_error(&e)))
        })?;
        Ok(DeviceAuthorization {
            device_code: Secret::new(raw.device_code),
            user_code: raw.user_code,
            verification_uri: raw.verification_uri,
            verification_uri_complete: raw.verification_uri_complete,
            expires_in: raw.expires_in.value().unwrap_or(900),
            // RFC 8628 §3.2: 5 seconds when absent.
            interval: raw.interval.and_then(|i| i.value()).unwrap_or(5),
            message: raw.message,
        })
    }

    async fn token_request(&self, params: &[(&str, &str)]) -> Result<TokenResponse, TokenError> {
        let mut form: Vec<(&str, &str)> = params.to_vec();
        form.push(("client_id", &self.client_id));
        if let Some(secret) = &self.client_secret {
            form.push(("client_secret", secret.expose()));
        }
        let body = self.post(self.endpoints.token.clone(), &form).await?;
        let raw: RawTokenResponse = serde_json::from_slice(&body)
            .map_err(|e| TokenError::Invalid(format!("token response: {}", crate::auth::tokens::json_error(&e))))?;
        if let Some(kind) = &raw.token_type
            && !kind.eq_ignore_ascii_case("bearer")
        {
            return Err(TokenError::Invalid(format!("token_type {kind:?}, expected Bearer")));
        }
        if raw.access_token.is_empty() || raw.access_token.bytes().any(|b| b.is_ascii_control()) {
            return Err(TokenError::Invalid("empty or malformed access_token".into()));
        }
        Ok(TokenResponse {
            access_token: Secret::new(raw.access_token),
            refresh_token: raw.refresh_token.filter(|r| !r.is_empty()).map(Secret::new),
            expires_in: raw.expires_in.and_then(|e| e.value()),
            scope: raw.scope,
        })
    }

    /// POSTs the form; the body of a 2xx answer, or the classified error.
    async fn post(&self, url: url::Url, form: &[(&str, &str)]) -> Result<Vec<u8>, TokenError> {
        let shown = format!("{}{}", url.origin().ascii_serialization(), url.path());
        let response = self
            .http
            .post(url)
            .header(reqwest::header::ACCEPT, "application/json")
            .form(form)
            .send()
            .await
            .map_err(|e| TokenError::Unavailable(format!("{shown}: {}", describe(&e))))?;
        let status = response.status();
        let body = read_limited(response).await.map_err(|e| TokenError::Unavailable(format!("{shown}: {e}")))?;
        if status.is_success() {
            return Ok(body);
        }
        if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            return Err(TokenError::Unavailable(format!("{shown} answered HTTP {status}")));
        }
        match serde_json::from_slice::<RawError>(&body) {
            Ok(error) => Err(TokenError::Refused {
                error: printable(&error.error, 64),
                description: error.error_description.map(|d| printable(&d, 300)),
            }),
            Err(_) => Err(TokenError::Unavailable(format!("{shown} answered HTTP {status} without an OAuth error"))),
        }
    }
}

async fn read_limited(mut response: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| describe(&e))? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(format!("answer longer than {MAX_BODY} octets"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A reqwest error and its causes. (Its URL is the endpoint's: our requests
/// carry everything secret in the body, none in the URL.)
fn describe(error: &reqwest::Error) -> String {
    let mut text = if error.is_timeout() { "timed out".to_string() } else { format!("{error}") };
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Provider text made safe for a log line.
fn printable(text: &str, max: usize) -> String {
    text.chars().filter(|c| !c.is_control()).take(max).collect()
}

/// TLS to providers: ring, the system's trust store plus `ca_file`, like
/// the backends (`backend::trust`).
fn tls_config(ca_file: Option<&std::path::Path>) -> Result<rustls::ClientConfig, String> {
    let roots = crate::backend::trust::roots(ca_file)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified() {
        let e = TokenError::Refused { error: "invalid_grant".into(), description: Some("AADSTS70000".into()) };
        assert!(e.is_invalid_grant());
        assert_eq!(e.metric_result(), "invalid_grant");
        assert_eq!(e.to_string(), "the provider refused: invalid_grant (AADSTS70000)");
        assert!(e.operator_action().is_none(), "invalid_grant has its own words");
        for error in
            ["interaction_required", "consent_required", "invalid_client", "unauthorized_client", "invalid_scope"]
        {
            let e = TokenError::Refused { error: error.into(), description: None };
            assert_eq!(e.operator_action().map(|(name, _)| name), Some(error));
            assert_eq!(e.metric_result(), error);
        }
        assert!(TokenError::Unavailable("x".into()).operator_action().is_none());
        let other = TokenError::Refused { error: "temporarily_unavailable".into(), description: None };
        assert_eq!((other.operator_action(), other.metric_result()), (None, "refused"));
        assert_eq!(TokenError::Unavailable("x".into()).metric_result(), "unavailable");
        assert_eq!(printable("a\nb\u{7}c", 10), "abc");
    }

    #[test]
    fn numbers_as_strings() {
        let raw: RawTokenResponse =
            serde_json::from_str(r#"{"access_token":"a","token_type":"Bearer","expires_in":"3599"}"#).unwrap();
        assert_eq!(raw.expires_in.unwrap().value(), Some(3599));
    }
}
