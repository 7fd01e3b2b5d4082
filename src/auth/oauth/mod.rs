//! OAuth 2.0 for mapped accounts: provider presets (Google, Microsoft) and
//! generic endpoints (`OAuthConfig`), the token endpoint client (`client`,
//! RFC 6749 requests over reqwest), and the interactive acquisition flows
//! behind `popgate oauth login` (`flows`: authorization code with PKCE,
//! RFC 7636; device authorization, RFC 8628).
//!
//! Never logs or formats a token, a code, a PKCE verifier or a client
//! secret; provider error texts are logged, they carry none of these.

pub mod client;
pub mod commands;
pub mod connect;
pub mod flows;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use url::Url;

use super::passwords::SecretSource;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// Gmail / Google Workspace: IMAP scope `https://mail.google.com/`.
    Google,
    /// Microsoft 365 / Outlook.com (Entra ID v2.0 endpoints).
    Microsoft,
    /// Any RFC 6749 server, by URL.
    Generic,
}

impl Provider {
    pub fn name(self) -> &'static str {
        match self {
            Provider::Google => "google",
            Provider::Microsoft => "microsoft",
            Provider::Generic => "generic",
        }
    }
}

/// How the account's tokens are obtained.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Grant {
    /// A person signs in once (`popgate oauth login`); popgate keeps the
    /// refresh token and refreshes.
    #[default]
    AuthorizationCode,
    /// App-only (Microsoft 365 with an application permission): popgate
    /// requests tokens with its client secret; there is no refresh token.
    ClientCredentials,
}

pub const GOOGLE_SCOPES: &[&str] = &["https://mail.google.com/"];
pub const MICROSOFT_SCOPES: &[&str] = &["https://outlook.office.com/IMAP.AccessAsUser.All", "offline_access"];
/// Microsoft 365 app-only IMAP (client credentials).
pub const MICROSOFT_APP_SCOPES: &[&str] = &["https://outlook.office365.com/.default"];
/// Microsoft Graph mail (the `graph` backend), delegated.
pub const GRAPH_SCOPES: &[&str] = &["https://graph.microsoft.com/Mail.ReadWrite", "offline_access"];
/// Microsoft Graph mail, app-only (client credentials).
pub const GRAPH_APP_SCOPES: &[&str] = &["https://graph.microsoft.com/.default"];

pub use crate::backend::select::MailApi;

/// `[account.oauth]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthConfig {
    pub provider: Provider,
    /// The OAuth client (application) id registered at the provider.
    pub client_id: String,
    /// The client secret, if the client has one (Google "Desktop app"
    /// clients do; Microsoft public clients do not; client credentials
    /// needs one): from this environment variable…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_env: Option<String>,
    /// …or this file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_file: Option<PathBuf>,
    /// Microsoft: the tenant ("common", "organizations", a domain or id);
    /// default "common", and a real tenant for client credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default)]
    pub grant: Grant,
    /// Default: the provider's IMAP scopes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    /// Where the provider sends the browser after sign-in; must be
    /// registered at the provider. `popgate oauth login --listen` listens on
    /// its port on 127.0.0.1 (any free port if it has none).
    #[serde(default = "default_redirect_uri")]
    pub redirect_uri: String,
    /// CA certificates (PEM) trusted for the provider besides the system's
    /// trust store; by default the account backend's `ca_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Endpoints: required for `generic`; for a preset they replace its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_authorization_url: Option<String>,
    /// Refresh an access token this many seconds before it expires.
    #[serde(default = "default_margin")]
    pub refresh_margin_secs: u64,
    /// After a failed refresh, wait this long before asking the provider
    /// again (devices meanwhile get `-ERR [SYS/TEMP]` unless the old token
    /// is still valid).
    #[serde(default = "default_retry")]
    pub retry_after_failure_secs: u64,
    /// Limit on each request to the provider.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

fn default_redirect_uri() -> String {
    "http://localhost".into()
}
fn default_margin() -> u64 {
    300
}
fn default_retry() -> u64 {
    30
}
fn default_timeout() -> u64 {
    30
}

/// The provider's URLs and what to ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    pub authorization: Option<Url>,
    pub token: Url,
    pub device_authorization: Option<Url>,
    pub scopes: Vec<String>,
    /// Extra authorization request parameters (Google issues a refresh
    /// token only with `access_type=offline`, and again only with
    /// `prompt=consent`).
    pub extra_authorization_params: Vec<(&'static str, &'static str)>,
}

impl OAuthConfig {
    pub fn client_secret_source(&self) -> Result<Option<SecretSource>, &'static str> {
        SecretSource::from_keys(self.client_secret_env.as_ref(), self.client_secret_file.as_ref())
    }

    /// Checks what serde cannot; `(key, why)` on error (key relative to the
    /// account's `oauth` table).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.client_id.is_empty() {
            return Err(("client_id", "must not be empty".into()));
        }
        for (key, value, bounds) in [
            ("refresh_margin_secs", self.refresh_margin_secs, 0..=86_400),
            ("retry_after_failure_secs", self.retry_after_failure_secs, 1..=86_400),
            ("timeout_secs", self.timeout_secs, 1..=3_600),
        ] {
            crate::mail::InvalidSetting::bounded(key, value, bounds).map_err(|e| (key, e.why))?;
        }
        let secret = self.client_secret_source().map_err(|why| ("client_secret_env", why.to_string()))?;
        if self.grant == Grant::ClientCredentials {
            if secret.is_none() {
                return Err(("client_secret_env", "client credentials need a client secret".into()));
            }
            match self.provider {
                Provider::Google => {
                    return Err(("grant", "Google has no client-credentials grant for Gmail".into()));
                }
                Provider::Microsoft => {
                    let tenant = self.tenant.as_deref().unwrap_or("common");
                    if matches!(tenant, "common" | "organizations" | "consumers") {
                        return Err(("tenant", "client credentials need your tenant's id or domain".into()));
                    }
                }
                Provider::Generic => {}
            }
        }
        if let Some(tenant) = &self.tenant {
            if self.provider != Provider::Microsoft {
                return Err(("tenant", "only for provider = \"microsoft\"".into()));
            }
            if tenant.is_empty() || !tenant.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)) {
                return Err(("tenant", "must be a tenant id or domain".into()));
            }
        }
        if self.scopes.as_ref().is_some_and(|s| s.is_empty() || s.iter().any(|s| s.is_empty() || s.contains(' '))) {
            return Err(("scopes", "each scope must be non-empty and without spaces".into()));
        }
        if self.provider == Provider::Generic {
            if self.token_url.is_none() {
                return Err(("token_url", "required for provider = \"generic\"".into()));
            }
            if self.scopes.is_none() {
                return Err(("scopes", "required for provider = \"generic\"".into()));
            }
        }
        for (key, url) in [
            ("authorization_url", &self.authorization_url),
            ("token_url", &self.token_url),
            ("device_authorization_url", &self.device_authorization_url),
        ] {
            if let Some(url) = url {
                check_endpoint(url).map_err(|why| (key, why))?;
            }
        }
        let redirect = Url::parse(&self.redirect_uri).map_err(|e| ("redirect_uri", e.to_string()))?;
        if !matches!(redirect.scheme(), "http" | "https") || redirect.host_str().is_none() {
            return Err(("redirect_uri", "must be an http(s) URL".into()));
        }
        if self.refresh_margin_secs > 3000 {
            return Err(("refresh_margin_secs", "at most 3000 (access tokens usually live one hour)".into()));
        }
        if self.timeout_secs == 0 {
            return Err(("timeout_secs", "must be at least 1".into()));
        }
        Ok(())
    }

    /// This configuration with the preset scopes for `api` when none are
    /// configured (Microsoft Graph needs other scopes than IMAP).
    pub fn for_api(&self, api: MailApi) -> OAuthConfig {
        let mut config = self.clone();

        if config.scopes.is_none() && self.provider == Provider::Microsoft && api == MailApi::Graph {
            let scopes = if self.grant == Grant::ClientCredentials { GRAPH_APP_SCOPES } else { GRAPH_SCOPES };
            config.scopes = Some(scopes.iter().map(|s| s.to_string()).collect());
        }
        config
    }

    /// This configuration trusting the backend's `ca_file` too, unless it
    /// names its own.
    pub fn trusting(mut self, backend_ca_file: Option<&std::path::Path>) -> OAuthConfig {
        if self.ca_file.is_none() {
            self.ca_file = backend_ca_file.map(|p| p.to_path_buf());
        }
        self
    }

    pub fn endpoints(&self) -> Result<Endpoints, String> {
        let parse = |what: &str, url: &str| Url::parse(url).map_err(|e| format!("{what} `{url}`: {e}"));
        let tenant = self.tenant.as_deref().unwrap_or("common");
        let microsoft = |path: &str| format!("https://login.microsoftonline.com/{tenant}/oauth2/v2.0/{path}");
        let (authorization, token, device, scopes, extra): (Option<String>, String, Option<String>, &[&str], _) =
            match self.provider {
                Provider::Google => (
                    Some("https://accounts.google.com/o/oauth2/v2/auth".into()),
                    "https://oauth2.googleapis.com/token".into(),
                    // Google's device flow does not allow the Gmail scope.
                    None,
                    GOOGLE_SCOPES,
                    vec![("access_type", "offline"), ("prompt", "consent")],
                ),
                Provider::Microsoft => (
                    Some(microsoft("authorize")),
                    microsoft("token"),
                    Some(microsoft("devicecode")),
                    if self.grant == Grant::ClientCredentials { MICROSOFT_APP_SCOPES } else { MICROSOFT_SCOPES },
                    Vec::new(),
                ),
                Provider::Generic => (None, String::new(), None, &[], Vec::new()),
            };
        let authorization = self.authorization_url.clone().or(authorization);
        let token = self.token_url.clone().unwrap_or(token);
        let device = self.device_authorization_url.clone().or(device);
        Ok(Endpoints {
            authorization: authorization.map(|u| parse("authorization_url", &u)).transpose()?,
            token: parse("token_url", &token)?,
            device_authorization: device.map(|u| parse("device_authorization_url", &u)).transpose()?,
            scopes: match &self.scopes {
                Some(s) => s.clone(),
                None => scopes.iter().map(|s| s.to_string()).collect(),
            },
            extra_authorization_params: extra,
        })
    }
}

/// Endpoints must be https, except on loopback (tests, local proxies):
/// tokens and secrets cross them.
fn check_endpoint(url: &str) -> Result<(), String> {
    let parsed = Url::parse(url).map_err(|e| e.to_string())?;
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if is_loopback(&parsed) => Ok(()),
        _ => Err("must be https (http only to 127.0.0.1, ::1 or localhost)".into()),
    }
}

pub(crate) fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(provider: &str, extra: &str) -> OAuthConfig {
        toml::from_str(&format!("provider = \"{provider}\"\nclient_id = \"id\"\n{extra}")).unwrap()
    }

    #[test]
    fn presets() {
        let google = config("google", "").endpoints().unwrap();
        assert_eq!(google.token.as_str(), "https://oauth2.googleapis.com/token");
        assert_eq!(google.scopes, ["https://mail.google.com/"]);
        assert!(google.device_authorization.is_none());
        let microsoft = config("microsoft", "tenant = \"contoso.onmicrosoft.com\"").endpoints().unwrap();
        assert_eq!(
            microsoft.token.as_str(),
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
        assert_eq!(microsoft.scopes, ["https://outlook.office.com/IMAP.AccessAsUser.All", "offline_access"]);
        assert!(
            microsoft
                .device_authorization
                .unwrap()
                .as_str()
                .ends_with("/contoso.onmicrosoft.com/oauth2/v2.0/devicecode")
        );
        let app = config(
            "microsoft",
            "tenant = \"contoso.onmicrosoft.com\"\ngrant = \"client_credentials\"\nclient_secret_env = \"S\"",
        );
        app.check().unwrap();
        assert_eq!(app.endpoints().unwrap().scopes, ["https://outlook.office365.com/.default"]);
        // The Graph backend gets Graph's scopes; IMAP keeps IMAP's; an
        // explicit list always wins; Google's scope covers the Gmail API.
        let microsoft = config("microsoft", "");
        let graph = microsoft.for_api(MailApi::Graph).endpoints().unwrap();
        assert_eq!(graph.scopes, ["https://graph.microsoft.com/Mail.ReadWrite", "offline_access"]);
        assert_eq!(app.for_api(MailApi::Graph).endpoints().unwrap().scopes, ["https://graph.microsoft.com/.default"]);
        assert_eq!(microsoft.for_api(MailApi::Imap), microsoft);
        let explicit = config("microsoft", "scopes = [\"x\"]");
        assert_eq!(explicit.for_api(MailApi::Graph), explicit);
        let google = config("google", "");
        assert_eq!(google.for_api(MailApi::GmailApi).endpoints().unwrap().scopes, ["https://mail.google.com/"]);
    }

    #[test]
    fn checks() {
        assert!(config("generic", "").check().is_err());
        assert!(config("generic", "token_url = \"https://idp/token\"\nscopes = [\"mail\"]").check().is_ok());
        assert!(config("generic", "token_url = \"http://idp.example/token\"\nscopes = [\"mail\"]").check().is_err());
        assert!(config("generic", "token_url = \"http://127.0.0.1:9/token\"\nscopes = [\"mail\"]").check().is_ok());
        assert!(config("google", "grant = \"client_credentials\"\nclient_secret_env = \"S\"").check().is_err());
        assert!(config("microsoft", "grant = \"client_credentials\"\nclient_secret_env = \"S\"").check().is_err());
        assert!(config("microsoft", "tenant = \"a/b\"").check().is_err());
        assert!(config("google", "tenant = \"x\"").check().is_err());
        assert!(config("google", "client_secret_env = \"A\"\nclient_secret_file = \"/b\"").check().is_err());
        assert!(config("google", "scopes = [\"a b\"]").check().is_err());
        assert!(
            toml::from_str::<OAuthConfig>("provider = \"google\"\nclient_id = \"x\"\nclient_secret = \"inline\"")
                .is_err()
        );
    }
}
