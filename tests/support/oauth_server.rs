//! A stand-in OAuth 2.0 authorization server on 127.0.0.1 (a port chosen at
//! run time), written from the RFCs rather than from popgate's client, so
//! the tests judge popgate against the wire formats:
//!
//! - `GET /authorize` (RFC 6749 §4.1.1 + RFC 7636): approves at once as the
//!   configured user and redirects (302) to `redirect_uri` with `code` and
//!   `state`.
//! - `POST /token`: `authorization_code` (the S256 PKCE verifier, the
//!   client and the redirect URI are checked; a code works once),
//!   `refresh_token` (rotation: the old refresh token dies), the RFC 8628
//!   `device_code` grant (`authorization_pending` until approved,
//!   `slow_down` when polled too fast), `client_credentials`; errors as
//!   RFC 6749 §5.2 JSON; injected faults (`invalid_grant`, HTTP 500), a
//!   delay, and a gate that holds refresh requests open until released.
//! - `POST /device` (RFC 8628 §3.1); `POST /device/approve` (`user_code`):
//!   the user typed the code and allowed it.
//! - With `require_consent()`, `GET /authorize` renders a consent page
//!   instead (an "Allow" and a "Deny" button, posting to
//!   `/authorize/decide`), which redirects with `code` and `state`, or with
//!   `error=access_denied`.
//! - `POST /introspect` (RFC 7662, as Dovecot's oauth2 passdb calls it with
//!   `introspection_mode = post`): `{"active":true,"username":…}` for live
//!   access tokens.
//!
//! Plain HTTP/1.1, one thread per connection, `Connection: close`.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::IO_TIMEOUT;

pub const CLIENT_ID: &str = "popgate-test-client";
pub const CLIENT_SECRET: &str = "stand-in-client-secret";

/// What the next token request gets instead of a normal answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// 400 `{"error":"invalid_grant"}`.
    InvalidGrant,
    /// 500 with an HTML body.
    ServerError,
    /// 400 (401 for `invalid_client`, as RFC 6749 §5.2 allows) with this
    /// RFC 6749 / OpenID Connect error and a provider-like description:
    /// `interaction_required`, `consent_required`, `invalid_client`,
    /// `unauthorized_client`, `invalid_scope`.
    Refused(&'static str),
}

/// What Microsoft's token endpoint writes for each refusal (AADSTS codes).
fn description(error: &str) -> &'static str {
    match error {
        "interaction_required" => {
            "AADSTS50076: Due to a configuration change made by your administrator, or because you moved to a new location, you must use multi-factor authentication to access '00000003-0000-0000-c000-000000000000'."
        }
        "consent_required" => {
            "AADSTS65001: The user or administrator has not consented to use the application with ID '11111111-1111-1111-1111-111111111111'."
        }
        "invalid_client" => {
            "AADSTS7000222: The provided client secret keys for app '11111111-1111-1111-1111-111111111111' are expired."
        }
        "unauthorized_client" => {
            "AADSTS700016: Application with identifier '11111111-1111-1111-1111-111111111111' was not found in the directory."
        }
        "invalid_scope" => "AADSTS70011: The provided value for the input parameter 'scope' is not valid.",
        _ => "refused by the stand-in",
    }
}

#[derive(Debug, Clone)]
struct Code {
    user: String,
    redirect_uri: String,
    challenge: String,
}

#[derive(Debug, Clone)]
struct Device {
    user_code: String,
    approved_as: Option<String>,
    last_poll: Option<Instant>,
    used: bool,
}

#[derive(Default)]
struct State {
    /// Whom /authorize signs in.
    user: String,
    /// Whom client credentials act as.
    app_user: String,
    access_ttl: u64,
    rotate: bool,
    delay: Duration,
    codes: HashMap<String, Code>,
    /// token → (user, active)
    access: HashMap<String, (String, bool)>,
    refresh: HashMap<String, (String, bool)>,
    devices: HashMap<String, Device>,
    faults: VecDeque<Fault>,
    counter: u64,
    /// grant_type of every /token request, in order.
    grants: Vec<String>,
    introspections: u64,
    /// While set, refresh requests are held open (after being counted)
    /// until the test releases them; `held` is how many wait now.
    gate_closed: bool,
    held: usize,
    /// /authorize asks (a page with Allow and Deny) instead of approving.
    consent: bool,
}

pub struct OAuthServer {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stopping: Arc<AtomicBool>,
}

impl OAuthServer {
    /// Signs in `user` at /authorize and in the device flow; client
    /// credentials act as `user` too. Access tokens live an hour; refresh
    /// tokens rotate.
    pub fn start(user: &str) -> OAuthServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the OAuth stand-in");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            user: user.to_string(),
            app_user: user.to_string(),
            access_ttl: 3600,
            rotate: true,
            ..State::default()
        }));
        let stopping = Arc::new(AtomicBool::new(false));
        let (shared, stop) = (state.clone(), stopping.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let shared = shared.clone();
                std::thread::spawn(move || serve(stream, &shared));
            }
        });
        OAuthServer { addr, state, stopping }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Issues an access and a refresh token for `user` directly (as if a
    /// sign-in had happened earlier): for seeding popgate's token store.
    pub fn issue(&self, user: &str) -> (String, String) {
        let mut state = self.lock();
        let (access, refresh, _) = issue(&mut state, user, true);
        (access, refresh.unwrap())
    }

    pub fn set_access_ttl(&self, secs: u64) {
        self.lock().access_ttl = secs;
    }

    pub fn set_rotation(&self, rotate: bool) {
        self.lock().rotate = rotate;
    }

    /// Every /token answer waits this long first (to widen races).
    pub fn set_delay(&self, delay: Duration) {
        self.lock().delay = delay;
    }

    /// The next token requests get these faults, one each.
    pub fn inject(&self, faults: &[Fault]) {
        self.lock().faults.extend(faults);
    }

    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// Every access token stops being accepted (as after a revocation or
    /// expiry on the provider's side); refresh tokens still work.
    pub fn expire_all_access_tokens(&self) {
        for (_, active) in self.lock().access.values_mut() {
            *active = false;
        }
    }

    pub fn access_active(&self, token: &str) -> bool {
        self.lock().access.get(token).is_some_and(|(_, active)| *active)
    }

    pub fn refresh_active(&self, token: &str) -> bool {
        self.lock().refresh.get(token).is_some_and(|(_, active)| *active)
    }

    /// The grant types of the token requests so far.
    pub fn grants(&self) -> Vec<String> {
        self.lock().grants.clone()
    }

    pub fn refreshes(&self) -> usize {
        self.grants().iter().filter(|g| *g == "refresh_token").count()
    }

    pub fn introspections(&self) -> u64 {
        self.lock().introspections
    }

    /// From now on a `refresh_token` request is counted and then held open
    /// (no answer) until `release_refreshes`: a refresh caught in flight.
    pub fn hold_refreshes(&self) {
        self.lock().gate_closed = true;
    }

    /// How many refresh requests are held open right now.
    pub fn refreshes_held(&self) -> usize {
        self.lock().held
    }

    /// Lets the held refresh requests (and later ones) be answered.
    pub fn release_refreshes(&self) {
        self.lock().gate_closed = false;
    }

    /// /authorize shows a consent page (Allow / Deny) from now on.
    pub fn require_consent(&self) {
        self.lock().consent = true;
    }

    /// Approves a pending device authorization (the user typed the code).
    pub fn approve_device(&self, user_code: &str) {
        let mut state = self.lock();
        let user = state.user.clone();
        let device = state
            .devices
            .values_mut()
            .find(|d| d.user_code == user_code)
            .unwrap_or_else(|| panic!("no device authorization with user code {user_code}"));
        device.approved_as = Some(user);
    }

    /// Every token this server ever issued (to look for them where they
    /// must not be).
    pub fn all_tokens(&self) -> Vec<String> {
        let state = self.lock();
        state.access.keys().chain(state.refresh.keys()).cloned().collect()
    }
}

impl Drop for OAuthServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

fn issue(state: &mut State, user: &str, with_refresh: bool) -> (String, Option<String>, u64) {
    state.counter += 1;
    let n = state.counter;
    let access = format!("at-{n}-{}", random_text());
    state.access.insert(access.clone(), (user.to_string(), true));
    let refresh = with_refresh.then(|| {
        let refresh = format!("rt-{n}-{}", random_text());
        state.refresh.insert(refresh.clone(), (user.to_string(), true));
        refresh
    });
    (access, refresh, state.access_ttl)
}

fn random_text() -> String {
    let mut bytes = [0u8; 12];
    for (i, b) in bytes.iter_mut().enumerate() {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        *b = (nanos >> (i % 8 * 8)) as u8 ^ (i as u8).wrapping_mul(37) ^ std::process::id() as u8;
    }
    // Unique enough together with the counter; not meant to be unguessable.
    URL_SAFE_NO_PAD.encode(bytes)
}

struct Request {
    method: String,
    path: String,
    query: HashMap<String, String>,
    form: HashMap<String, String>,
    authorization: Option<String>,
}

fn parse_pairs(text: &str) -> HashMap<String, String> {
    url::form_urlencoded::parse(text.as_bytes()).into_owned().collect()
}

fn read_request(stream: &TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut length = 0usize;
    let mut authorization = None;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).ok()?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':')?;
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse().ok()?,
            "authorization" => authorization = Some(value.trim().to_string()),
            _ => {}
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).ok()?;
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), parse_pairs(q)),
        None => (target, HashMap::new()),
    };
    Some(Request { method, path, query, form: parse_pairs(&String::from_utf8_lossy(&body)), authorization })
}

fn respond(mut stream: &TcpStream, status: &str, headers: &[(&str, String)], body: &str) {
    let mut head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body.as_bytes());
    let _ = stream.flush();
}

fn json(stream: &TcpStream, status: &str, value: serde_json::Value) {
    respond(
        stream,
        status,
        &[("Content-Type", "application/json".into()), ("Cache-Control", "no-store".into())],
        &value.to_string(),
    );
}

fn oauth_error(stream: &TcpStream, error: &str, description: &str) {
    json(stream, "400 Bad Request", serde_json::json!({"error": error, "error_description": description}));
}

fn serve(stream: TcpStream, state: &Mutex<State>) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let Some(request) = read_request(&stream) else { return };
    match (request.method.as_str(), request.path.as_str()) {
        ("GET", "/authorize") => authorize(&stream, &request, state),
        ("POST", "/token") => token(&stream, &request, state),
        ("POST", "/device") => device(&stream, &request, state),
        ("POST", "/device/approve") => approve_device_request(&stream, &request, state),
        ("POST", "/authorize/decide") => decide(&stream, &request, state),
        ("POST", "/introspect") => introspect(&stream, &request, state),
        _ => respond(&stream, "404 Not Found", &[], "not found"),
    }
}

fn authorize(stream: &TcpStream, request: &Request, state: &Mutex<State>) {
    let q = &request.query;
    let get = |k: &str| q.get(k).cloned().unwrap_or_default();
    if get("client_id") != CLIENT_ID || get("response_type") != "code" || get("redirect_uri").is_empty() {
        return respond(stream, "400 Bad Request", &[], "bad authorization request");
    }
    if get("code_challenge_method") != "S256" || get("code_challenge").len() != 43 {
        return respond(stream, "400 Bad Request", &[], "PKCE S256 required");
    }
    if state.lock().unwrap().consent {
        return consent_page(stream, q);
    }
    let mut state = state.lock().unwrap();
    state.counter += 1;
    let code = format!("code-{}-{}", state.counter, random_text());
    let user = state.user.clone();
    state
        .codes
        .insert(code.clone(), Code { user, redirect_uri: get("redirect_uri"), challenge: get("code_challenge") });
    let mut location = url::Url::parse(&get("redirect_uri")).expect("redirect_uri is a URL");
    location.query_pairs_mut().append_pair("code", &code).append_pair("state", &get("state"));
    respond(stream, "302 Found", &[("Location", location.to_string())], "");
}

/// The client authenticates in the body (client_secret_post) or with HTTP
/// Basic (RFC 6749 §2.3.1); a secret, if sent, must be right.
fn client_ok(request: &Request) -> bool {
    if let Some(basic) = request.authorization.as_deref().and_then(|a| a.strip_prefix("Basic ")) {
        let decoded = base64::engine::general_purpose::STANDARD.decode(basic).unwrap_or_default();
        return decoded == format!("{CLIENT_ID}:{CLIENT_SECRET}").as_bytes();
    }
    request.form.get("client_id").map(String::as_str) == Some(CLIENT_ID)
        && request.form.get("client_secret").is_none_or(|s| s == CLIENT_SECRET)
}

fn token(stream: &TcpStream, request: &Request, shared: &Mutex<State>) {
    let delay = shared.lock().unwrap().delay;
    std::thread::sleep(delay);
    let mut state = shared.lock().unwrap();
    let form = &request.form;
    let grant = form.get("grant_type").cloned().unwrap_or_default();
    state.grants.push(grant.clone());
    if grant == "refresh_token" && state.gate_closed {
        state = hold_at_gate(shared, state);
    }
    if let Some(fault) = state.faults.pop_front() {
        drop(state);
        return match fault {
            Fault::InvalidGrant => oauth_error(stream, "invalid_grant", "injected by the test"),
            Fault::ServerError => respond(stream, "500 Internal Server Error", &[], "<html>oops</html>"),
            Fault::Refused(error) => {
                let status = if error == "invalid_client" { "401 Unauthorized" } else { "400 Bad Request" };
                json(stream, status, serde_json::json!({ "error": error, "error_description": description(error) }))
            }
        };
    }
    if !client_ok(request) {
        return json(stream, "401 Unauthorized", serde_json::json!({"error": "invalid_client"}));
    }
    let get = |k: &str| form.get(k).cloned().unwrap_or_default();
    let user = match grant.as_str() {
        "authorization_code" => {
            let Some(code) = state.codes.remove(&get("code")) else {
                return oauth_error(stream, "invalid_grant", "unknown or used code");
            };
            if code.redirect_uri != get("redirect_uri") {
                return oauth_error(stream, "invalid_grant", "redirect_uri differs");
            }
            let digest = sha256(get("code_verifier").as_bytes());
            if URL_SAFE_NO_PAD.encode(digest) != code.challenge {
                return oauth_error(stream, "invalid_grant", "PKCE verification failed");
            }
            code.user
        }
        "refresh_token" => {
            let presented = get("refresh_token");
            let user = match state.refresh.get(&presented) {
                Some((user, true)) => user.clone(),
                _ => return oauth_error(stream, "invalid_grant", "refresh token revoked or unknown"),
            };
            if state.rotate {
                state.refresh.insert(presented, (user.clone(), false));
            } else {
                let (access, _, ttl) = issue(&mut state, &user, false);
                return json(
                    stream,
                    "200 OK",
                    serde_json::json!({"access_token": access, "token_type": "Bearer", "expires_in": ttl}),
                );
            }
            user
        }
        "urn:ietf:params:oauth:grant-type:device_code" => {
            let Some(device) = state.devices.get_mut(&get("device_code")) else {
                return oauth_error(stream, "invalid_grant", "unknown device code");
            };
            let now = Instant::now();
            let too_fast = device.last_poll.is_some_and(|at| now - at < Duration::from_millis(900));
            device.last_poll = Some(now);
            if device.used {
                return oauth_error(stream, "invalid_grant", "device code used");
            }
            if too_fast {
                return oauth_error(stream, "slow_down", "polling too fast");
            }
            match device.approved_as.clone() {
                None => return oauth_error(stream, "authorization_pending", "waiting for the user"),
                Some(user) => {
                    device.used = true;
                    user
                }
            }
        }
        "client_credentials" => {
            if form.get("client_secret").is_none() && request.authorization.is_none() {
                return json(stream, "401 Unauthorized", serde_json::json!({"error": "invalid_client"}));
            }
            let user = state.app_user.clone();
            let (access, _, ttl) = issue(&mut state, &user, false);
            return json(
                stream,
                "200 OK",
                serde_json::json!({"access_token": access, "token_type": "Bearer", "expires_in": ttl}),
            );
        }
        _ => return oauth_error(stream, "unsupported_grant_type", "unknown grant"),
    };
    let (access, refresh, ttl) = issue(&mut state, &user, true);
    json(
        stream,
        "200 OK",
        serde_json::json!({
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": ttl,
            "refresh_token": refresh,
            "scope": "mail",
        }),
    );
}

/// Waits (polling, bounded by `IO_TIMEOUT`) until the gate opens.
fn hold_at_gate<'a>(
    shared: &'a Mutex<State>,
    mut state: std::sync::MutexGuard<'a, State>,
) -> std::sync::MutexGuard<'a, State> {
    state.held += 1;
    let deadline = Instant::now() + IO_TIMEOUT;
    while state.gate_closed && Instant::now() < deadline {
        drop(state);
        std::thread::sleep(Duration::from_millis(10));
        state = shared.lock().unwrap();
    }
    state.held -= 1;
    state
}

fn device(stream: &TcpStream, request: &Request, state: &Mutex<State>) {
    if request.form.get("client_id").map(String::as_str) != Some(CLIENT_ID) {
        return json(stream, "401 Unauthorized", serde_json::json!({"error": "invalid_client"}));
    }
    let mut state = state.lock().unwrap();
    state.counter += 1;
    let n = state.counter;
    let device_code = format!("dc-{n}-{}", random_text());
    let user_code = format!("WDJB-{n:04}");
    state.devices.insert(
        device_code.clone(),
        Device { user_code: user_code.clone(), approved_as: None, last_poll: None, used: false },
    );
    json(
        stream,
        "200 OK",
        serde_json::json!({
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": "https://idp.invalid/device",
            "expires_in": 120,
            "interval": 1,
        }),
    );
}

/// The consent page: what the client asks for, and two buttons.
fn consent_page(stream: &TcpStream, q: &HashMap<String, String>) {
    let escape = |s: &str| s.replace('&', "&amp;").replace('"', "&quot;").replace('<', "&lt;").replace('>', "&gt;");
    let hidden: String = ["client_id", "redirect_uri", "state", "code_challenge", "scope"]
        .iter()
        .map(|k| {
            format!(
                "<input type=\"hidden\" name=\"{k}\" value=\"{}\">",
                escape(q.get(*k).map(String::as_str).unwrap_or_default())
            )
        })
        .collect();
    let body = format!(
        "<!DOCTYPE html><html><head><title>Stand-in sign-in</title></head><body>\
         <h1>Allow {client} to read your mail?</h1><p>Scopes: {scope}</p>\
         <form method=\"post\" action=\"/authorize/decide\">{hidden}\
         <button type=\"submit\" name=\"decision\" value=\"allow\" id=\"allow\">Allow</button>\
         <button type=\"submit\" name=\"decision\" value=\"deny\" id=\"deny\">Deny</button>\
         </form></body></html>",
        client = escape(q.get("client_id").map(String::as_str).unwrap_or_default()),
        scope = escape(q.get("scope").map(String::as_str).unwrap_or_default()),
    );
    respond(stream, "200 OK", &[("Content-Type", "text/html; charset=utf-8".into())], &body);
}

/// The consent page's answer: a code, or `error=access_denied`.
fn decide(stream: &TcpStream, request: &Request, state: &Mutex<State>) {
    let form = &request.form;
    let get = |k: &str| form.get(k).cloned().unwrap_or_default();
    let Ok(mut location) = url::Url::parse(&get("redirect_uri")) else {
        return respond(stream, "400 Bad Request", &[], "bad redirect_uri");
    };
    if get("decision") == "allow" {
        let mut state = state.lock().unwrap();
        state.counter += 1;
        let code = format!("code-{}-{}", state.counter, random_text());
        let user = state.user.clone();
        state
            .codes
            .insert(code.clone(), Code { user, redirect_uri: get("redirect_uri"), challenge: get("code_challenge") });
        location.query_pairs_mut().append_pair("code", &code).append_pair("state", &get("state"));
    } else {
        location
            .query_pairs_mut()
            .append_pair("error", "access_denied")
            .append_pair("error_description", "The user declined")
            .append_pair("state", &get("state"));
    }
    respond(stream, "302 Found", &[("Location", location.to_string())], "");
}

/// `POST /device/approve` with `user_code`: 200, or 404 for an unknown code.
fn approve_device_request(stream: &TcpStream, request: &Request, state: &Mutex<State>) {
    let user_code = request.form.get("user_code").cloned().unwrap_or_default();
    let mut state = state.lock().unwrap();
    let user = state.user.clone();
    match state.devices.values_mut().find(|d| d.user_code == user_code) {
        Some(device) => {
            device.approved_as = Some(user);
            respond(stream, "200 OK", &[], "approved")
        }
        None => respond(stream, "404 Not Found", &[], "no such user code"),
    }
}

fn introspect(stream: &TcpStream, request: &Request, state: &Mutex<State>) {
    let mut state = state.lock().unwrap();
    state.introspections += 1;
    let token = request.form.get("token").cloned().unwrap_or_default();
    let answer = match state.access.get(&token) {
        Some((user, true)) => serde_json::json!({"active": true, "username": user}),
        _ => serde_json::json!({"active": false}),
    };
    json(stream, "200 OK", answer);
}

fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

/// A minimal blocking HTTP GET (a "browser"): status, Location, body.
pub fn http_get(url: &str) -> (u16, Option<String>, String) {
    let url = url::Url::parse(url).expect("URL");
    let addr = (url.host_str().unwrap(), url.port_or_known_default().unwrap());
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("GET {url}: {e}"));
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let target = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    };
    write!(stream, "GET {target} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", url.authority()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let location = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(n, _)| n.eq_ignore_ascii_case("location")).map(|(_, v)| v.trim()))
        .map(String::from);
    (status, location, body.to_string())
}
