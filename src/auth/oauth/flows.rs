//! Getting an account's first token, interactively (`popgate oauth login`):
//!
//! - authorization code with PKCE (RFC 7636, S256): the user opens the
//!   authorization URL anywhere, signs in, and the provider redirects the
//!   browser to `redirect_uri` with a code. Headless (over SSH, `kubectl
//!   exec`): the user pastes that redirected address back
//!   (`code_from_redirect`); with a local browser a loopback listener
//!   receives it (`receive_redirect`).
//! - device authorization (RFC 8628): the user enters a short code on
//!   another device while popgate polls (`poll_device_flow`).
//!
//! Never prints the code, the verifier or a token; the `state` parameter is
//! checked so a redirect from another sign-in is refused.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use url::Url;

use super::Endpoints;
use super::client::{DeviceAuthorization, OAuthClient, TokenError, TokenResponse};
use crate::mail::Secret;

#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    #[error("the provider returned an error: {0}")]
    Denied(String),
    #[error("{0}")]
    BadRedirect(String),
    #[error("the state parameter does not match this sign-in (an old or foreign redirect); start again")]
    StateMismatch,
    #[error("timed out waiting for the sign-in")]
    TimedOut,
    #[error("the device code expired before the sign-in was completed; start again")]
    Expired,
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn random_text(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    SystemRandom::new().fill(&mut buf).expect("system randomness");
    URL_SAFE_NO_PAD.encode(buf)
}

/// An RFC 7636 verifier and its S256 challenge.
pub struct Pkce {
    pub verifier: Secret,
    pub challenge: String,
}

impl Pkce {
    pub fn new() -> Pkce {
        // 32 random octets: a 43-character verifier (§4.1: 43..=128).
        Pkce::from_verifier(random_text(32))
    }

    pub fn from_verifier(verifier: String) -> Pkce {
        let digest = ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes());
        Pkce { challenge: URL_SAFE_NO_PAD.encode(digest.as_ref()), verifier: Secret::new(verifier) }
    }
}

impl Default for Pkce {
    fn default() -> Self {
        Pkce::new()
    }
}

/// A fresh `state` value.
pub fn new_state() -> String {
    random_text(18)
}

/// RFC 6749 §4.1.1 with RFC 7636 §4.3.
pub fn authorization_url(
    endpoints: &Endpoints,
    client_id: &str,
    redirect_uri: &str,
    state: &str,
    pkce: &Pkce,
    login_hint: Option<&str>,
) -> Result<Url, FlowError> {
    let mut url = endpoints.authorization.clone().ok_or_else(|| {
        FlowError::BadRedirect("this provider has no authorization endpoint configured (authorization_url)".into())
    })?;
    {
        let mut query = url.query_pairs_mut();
        query
            .append_pair("response_type", "code")
            .append_pair("client_id", client_id)
            .append_pair("redirect_uri", redirect_uri)
            .append_pair("scope", &endpoints.scopes.join(" "))
            .append_pair("state", state)
            .append_pair("code_challenge", &pkce.challenge)
            .append_pair("code_challenge_method", "S256");
        for (key, value) in &endpoints.extra_authorization_params {
            query.append_pair(key, value);
        }
        if let Some(hint) = login_hint {
            query.append_pair("login_hint", hint);
        }
    }
    Ok(url)
}

/// The code from the address the browser was redirected to, as pasted by
/// the user (the whole URL, or just its query).
pub fn code_from_redirect(pasted: &str, expected_state: &str) -> Result<Secret, FlowError> {
    let pasted = pasted.trim();
    if pasted.is_empty() {
        return Err(FlowError::BadRedirect("nothing was pasted".into()));
    }
    let query = match Url::parse(pasted) {
        Ok(url) => url.query().unwrap_or_default().to_string(),
        Err(_) => pasted.trim_start_matches('?').to_string(),
    };
    code_from_query(&query, expected_state)
}

fn code_from_query(query: &str, expected_state: &str) -> Result<Secret, FlowError> {
    let mut code = None;
    let mut state = None;
    let mut error = None;
    let mut description = None;
    for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
        match key.as_ref() {
            "code" => code = Some(value.into_owned()),
            "state" => state = Some(value.into_owned()),
            "error" => error = Some(value.into_owned()),
            "error_description" => description = Some(value.into_owned()),
            _ => {}
        }
    }
    if let Some(error) = error {
        let text: String = match description {
            Some(d) => format!("{error}: {d}"),
            None => error,
        };
        return Err(FlowError::Denied(text.chars().filter(|c| !c.is_control()).take(300).collect()));
    }
    if state.as_deref() != Some(expected_state) {
        return Err(FlowError::StateMismatch);
    }
    match code {
        Some(code) if !code.is_empty() => Ok(Secret::new(code)),
        _ => Err(FlowError::BadRedirect("the address has no code= parameter; paste the whole address".into())),
    }
}

/// The redirect URI a loopback listener on `port` answers to: the
/// configured one with that port.
pub fn loopback_redirect_uri(configured: &str, port: u16) -> Result<String, FlowError> {
    let mut url = Url::parse(configured).map_err(|e| FlowError::BadRedirect(format!("redirect_uri: {e}")))?;
    if url.scheme() != "http" || !super::is_loopback(&url) {
        return Err(FlowError::BadRedirect(
            "--listen needs an http://localhost or http://127.0.0.1 redirect_uri (registered at the provider)".into(),
        ));
    }
    url.set_port(Some(port)).map_err(|_| FlowError::BadRedirect("redirect_uri cannot have a port".into()))?;
    Ok(url.to_string())
}

/// Serves the loopback redirect: waits (at most `timeout`) for the browser's
/// request carrying `state`, answers it with a short page and returns the
/// code. Other requests (a favicon, a stray probe) get 404 and are ignored.
pub async fn receive_redirect(
    listener: TcpListener,
    expected_state: &str,
    timeout: Duration,
) -> Result<Secret, FlowError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let (mut socket, _) =
            tokio::time::timeout_at(deadline, listener.accept()).await.map_err(|_| FlowError::TimedOut)??;
        let Ok(Ok(target)) = tokio::time::timeout(Duration::from_secs(10), read_request_target(&mut socket)).await
        else {
            continue;
        };
        let query = target.split_once('?').map(|(_, q)| q).unwrap_or_default();
        let has_params = url::form_urlencoded::parse(query.as_bytes()).any(|(k, _)| k == "state" || k == "error");
        if !has_params {
            let _ = respond(&mut socket, "404 Not Found", "Not found.").await;
            continue;
        }
        let result = code_from_query(query, expected_state);
        let page = match &result {
            Ok(_) => "popgate received the sign-in. You can close this window.",
            Err(_) => "popgate could not use this sign-in; see the terminal.",
        };
        let _ = respond(&mut socket, "200 OK", page).await;
        return result;
    }
}

/// The request target of an HTTP/1 request line; the rest of the head is
/// read and ignored (bounded).
async fn read_request_target(socket: &mut tokio::net::TcpStream) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = socket.read(&mut buf).await?;
        if n == 0 || head.len() > 16 * 1024 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some("GET"), Some(target)) => Ok(target.to_string()),
        _ => Err(std::io::Error::other("not a GET request")),
    }
}

async fn respond(socket: &mut tokio::net::TcpStream, status: &str, text: &str) -> std::io::Result<()> {
    let body = format!("<!doctype html><title>popgate</title><p>{text}</p>\n");
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    socket.write_all(head.as_bytes()).await?;
    socket.write_all(body.as_bytes()).await?;
    socket.shutdown().await
}

/// Polls the token endpoint for a device authorization until the user has
/// signed in (RFC 8628 §3.5): `authorization_pending` waits `interval`,
/// `slow_down` adds 5 seconds to it, `expired_token` and `access_denied`
/// end the flow.
pub async fn poll_device_flow(
    client: &OAuthClient,
    authorization: &DeviceAuthorization,
) -> Result<TokenResponse, FlowError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(authorization.expires_in);
    let mut interval = Duration::from_secs(authorization.interval.max(1));
    loop {
        if tokio::time::Instant::now() + interval > deadline {
            return Err(FlowError::Expired);
        }
        tokio::time::sleep(interval).await;
        match client.poll_device(&authorization.device_code).await {
            Ok(token) => return Ok(token),
            Err(TokenError::Refused { error, .. }) if error == "authorization_pending" => {}
            Err(TokenError::Refused { error, .. }) if error == "slow_down" => interval += Duration::from_secs(5),
            Err(TokenError::Refused { error, .. }) if error == "expired_token" => return Err(FlowError::Expired),
            // A transient failure: keep polling until the code expires.
            Err(TokenError::Unavailable(why)) => tracing::warn!(%why, "device flow poll failed; retrying"),
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_s256_matches_rfc7636_appendix_b() {
        let pkce = Pkce::from_verifier("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk".into());
        assert_eq!(pkce.challenge, "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM");
        let fresh = Pkce::new();
        assert_eq!(fresh.verifier.expose().len(), 43);
        assert!(fresh.verifier.expose().bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    }

    fn endpoints() -> Endpoints {
        Endpoints {
            authorization: Some(Url::parse("https://idp.example/authorize?tenant=x").unwrap()),
            token: Url::parse("https://idp.example/token").unwrap(),
            device_authorization: None,
            scopes: vec!["https://mail.google.com/".into(), "offline_access".into()],
            extra_authorization_params: vec![("access_type", "offline")],
        }
    }

    #[test]
    fn authorization_url_carries_everything() {
        let pkce = Pkce::new();
        let url = authorization_url(&endpoints(), "cid", "http://localhost", "st", &pkce, Some("a@b.c")).unwrap();
        let pairs: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
        assert_eq!(pairs["tenant"], "x");
        assert_eq!(pairs["response_type"], "code");
        assert_eq!(pairs["client_id"], "cid");
        assert_eq!(pairs["redirect_uri"], "http://localhost");
        assert_eq!(pairs["scope"], "https://mail.google.com/ offline_access");
        assert_eq!(pairs["state"], "st");
        assert_eq!(pairs["code_challenge"], pkce.challenge);
        assert_eq!(pairs["code_challenge_method"], "S256");
        assert_eq!(pairs["access_type"], "offline");
        assert_eq!(pairs["login_hint"], "a@b.c");
        assert!(!url.as_str().contains(pkce.verifier.expose()));
    }

    #[test]
    fn pasted_redirects() {
        let code = code_from_redirect("http://localhost/?code=4%2F0Ab&state=st&scope=x\n", "st").unwrap();
        assert_eq!(code.expose(), "4/0Ab");
        assert_eq!(code_from_redirect("code=abc&state=st", "st").unwrap().expose(), "abc");
        assert!(matches!(
            code_from_redirect("http://localhost/?code=abc&state=zz", "st"),
            Err(FlowError::StateMismatch)
        ));
        assert!(matches!(code_from_redirect("http://localhost/?code=abc", "st"), Err(FlowError::StateMismatch)));
        let denied = code_from_redirect("http://localhost/?error=access_denied&error_description=no&state=st", "st");
        assert!(matches!(denied, Err(FlowError::Denied(ref d)) if d == "access_denied: no"));
        assert!(code_from_redirect("", "st").is_err());
        assert!(code_from_redirect("http://localhost/?state=st", "st").is_err());
    }

    #[test]
    fn loopback_redirect_uris() {
        assert_eq!(loopback_redirect_uri("http://localhost", 8123).unwrap(), "http://localhost:8123/");
        assert_eq!(loopback_redirect_uri("http://127.0.0.1/cb", 9).unwrap(), "http://127.0.0.1:9/cb");
        assert!(loopback_redirect_uri("https://app.example/cb", 9).is_err());
    }

    #[tokio::test]
    async fn the_loopback_listener_takes_the_code() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let browser = tokio::spawn(async move {
            let get = |target: &'static str| async move {
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                s.write_all(format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
                let mut out = String::new();
                s.read_to_string(&mut out).await.unwrap();
                out
            };
            let favicon = get("/favicon.ico").await;
            let page = get("/?code=the-code&state=st").await;
            (favicon, page)
        });
        let code = receive_redirect(listener, "st", Duration::from_secs(10)).await.unwrap();
        assert_eq!(code.expose(), "the-code");
        let (favicon, page) = browser.await.unwrap();
        assert!(favicon.starts_with("HTTP/1.1 404"), "{favicon}");
        assert!(page.starts_with("HTTP/1.1 200") && page.contains("close this window"), "{page}");
    }
}
