//! The admin page's routes: overview, accounts, devices, sign-in, and the
//! device changes (add, enable/disable, reset password), which are saved
//! to the admin state file and take effect for the next login at once —
//! the router is rebuilt and replaced as SIGHUP does.
//!
//! Every answer carries a strict Content-Security-Policy and `no-store`;
//! every POST is refused (403) without the session's CSRF token. Never
//! renders or logs a password, token or hash, except the one random
//! password it creates, shown once to the administrator who asked for it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Form, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::Markup;

use super::Health;
use super::connect::{CALLBACK_PATH, CODE_FLOW_LIFETIME, CallbackError, FLOW_COOKIE};
use super::guard::{self, Guard, Session};
use super::views::{self, Frame};
use crate::auth::accounts::config::AccountMode;
use crate::auth::accounts::reloadable::ReloadableRouter;
use crate::auth::accounts::router::AccountRouter;
use crate::auth::accounts::ui_state::UiState;
use crate::auth::oauth::connect::{Connector, effective_oauth};
use crate::auth::oauth::{Grant, Provider};
use crate::auth::tokens::unix_now;
use crate::backend::select::BackendConfig;
use crate::config::Config;
use crate::mail::Secret;
use crate::server::activity::Activity;
use crate::telemetry::Metrics;

const STYLE: &str = include_str!("../../../assets/admin.css");
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
                                       frame-ancestors 'none'; base-uri 'none'";
/// Seconds between reloads of a waiting device-code page.
const DEVICE_PAGE_RELOAD: &str = "3";
/// Length of a generated device password (letters and digits: about 119
/// bits, and nothing a printer's keypad or a POP3 client mangles).
const PASSWORD_CHARS: usize = 20;

/// The configuration the page works on, and how its changes take effect.
pub trait Fleet: Send + Sync {
    /// The configuration as its file says now (without the admin state).
    fn configuration(&self) -> Result<Config, String>;
    /// New logins are routed by `config` (with the admin state laid over).
    fn route_by(&self, config: &Config) -> Result<(), String>;
}

/// The `Fleet` of a running gateway: logins go through `router`, which is
/// replaced by an `AccountRouter` built from the new configuration.
pub struct LiveFleet {
    pub router: Arc<ReloadableRouter>,
    pub metrics: Arc<Metrics>,
    /// Reads the configuration (file, environment, flags) again.
    pub load: Box<dyn Fn() -> Result<Config, String> + Send + Sync>,
}

impl Fleet for LiveFleet {
    fn configuration(&self) -> Result<Config, String> {
        (self.load)()
    }

    fn route_by(&self, config: &Config) -> Result<(), String> {
        let router = AccountRouter::new(config.accounts(), self.metrics.clone(), BackendConfig::build)
            .map_err(|e| e.to_string())?;
        router.spawn_token_upkeep(Duration::from_secs(30));
        self.router.replace(router);
        Ok(())
    }
}

pub struct Page {
    pub guard: Guard,
    pub fleet: Arc<dyn Fleet>,
    pub activity: Arc<Activity>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// One change at a time: read, change, save and apply the state file.
    changing: tokio::sync::Mutex<()>,
    /// Sign-ins to OAuth accounts under way.
    flows: super::connect::Flows,
}

impl Page {
    pub fn new(
        guard: Guard,
        fleet: Arc<dyn Fleet>,
        activity: Arc<Activity>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Self {
        Page {
            guard,
            fleet,
            activity,
            metrics,
            health,
            changing: tokio::sync::Mutex::new(()),
            flows: super::connect::Flows::default(),
        }
    }
}

type Shared = State<Arc<Page>>;

pub fn routes(page: Arc<Page>) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/accounts", get(accounts))
        .route("/devices", get(devices))
        .route("/login", get(sign_in_form).post(sign_in))
        .route("/logout", post(sign_out))
        .route("/devices/add", post(add_device))
        .route("/devices/enable", post(enable_device))
        .route("/devices/disable", post(disable_device))
        .route("/devices/reset", post(reset_password))
        .route("/accounts/connect", post(connect_account))
        .route("/accounts/device", get(device_sign_in))
        .route(CALLBACK_PATH, get(oauth_callback))
        .route("/static/admin.css", get(style))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(page)
}

async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    // A page may widen `form-action` to the providers it signs in with.
    if !headers.contains_key(header::CONTENT_SECURITY_POLICY) {
        headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    }
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn style() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE)
}

const LOOPBACK_HOST_ONLY: &str =
    "Without an admin password the page answers only when addressed as 127.0.0.1, [::1] or localhost.\n";

/// Without a credential, the address check is the only guard: a page
/// reached by another name (a DNS-rebinding site resolving to 127.0.0.1)
/// would otherwise be signed in, and could start an OAuth sign-in whose
/// redirect goes to that name. So loopback-only pages answer loopback
/// names only.
fn host_admitted(page: &Page, headers: &HeaderMap) -> bool {
    if !matches!(page.guard.access(), guard::Access::LoopbackOnly) {
        return true;
    }
    headers.get(header::HOST).and_then(|h| h.to_str().ok()).is_none_or(loopback_host)
}

/// `host[:port]` names the loopback interface.
fn loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The visitor's session (a new one, with its cookie, if they have none),
/// or the refusal for an address the page does not answer.
struct Visitor {
    session: Session,
    set_cookie: Option<String>,
}

// The `Err` is the answer itself, sent at once, once per request: boxing
// it would buy nothing.
#[allow(clippy::result_large_err)]
impl Visitor {
    fn from(page: &Page, peer: SocketAddr, headers: &HeaderMap) -> Result<Visitor, Response> {
        if !page.guard.admits(peer.ip()) {
            let body = "The admin page answers loopback clients only: no [admin] password_hash or token_file is set.\n";
            return Err((StatusCode::FORBIDDEN, body).into_response());
        }
        if !host_admitted(page, headers) {
            return Err((StatusCode::FORBIDDEN, LOOPBACK_HOST_ONLY).into_response());
        }
        let cookie = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|h| guard::cookie_value(h, guard::COOKIE));
        match page.guard.session(cookie) {
            Some(session) => Ok(Visitor { session, set_cookie: None }),
            None => {
                let session = page.guard.open();
                let set_cookie = Some(page.guard.cookie(&session));
                Ok(Visitor { session, set_cookie })
            }
        }
    }

    fn frame<'a>(&'a self, page: &Page, title: &'a str) -> Frame<'a> {
        Frame {
            title,
            csrf: &self.session.csrf,
            loopback_only: matches!(page.guard.access(), guard::Access::LoopbackOnly),
            signed_in: self.session.signed_in,
        }
    }

    fn respond(self, status: StatusCode, page: &Page, title: &str, body: Markup) -> Response {
        let html = views::layout(&self.frame(page, title), body);
        self.with_cookie((status, html).into_response())
    }

    fn with_cookie(self, mut response: Response) -> Response {
        if let Some(cookie) = self.set_cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
            response.headers_mut().append(header::SET_COOKIE, cookie);
        }
        response
    }

    /// A page that needs a signed-in session: the sign-in form otherwise.
    fn signed_in(page: &Page, peer: SocketAddr, headers: &HeaderMap) -> Result<Visitor, Response> {
        let visitor = Visitor::from(page, peer, headers)?;
        if visitor.session.signed_in {
            Ok(visitor)
        } else {
            Err(visitor.with_cookie(Redirect::to("/login").into_response()))
        }
    }

    /// A POST: the CSRF token first (403 without it), then a signed-in
    /// session.
    fn posted(
        page: &Page,
        peer: SocketAddr,
        headers: &HeaderMap,
        form: &HashMap<String, String>,
    ) -> Result<Visitor, Response> {
        let visitor = Visitor::from(page, peer, headers)?;
        if !Guard::csrf_ok(&visitor.session, form.get("csrf").map(String::as_str)) {
            tracing::info!(peer = %peer.ip(), "admin POST without a valid CSRF token refused");
            return Err((StatusCode::FORBIDDEN, "missing or wrong CSRF token\n").into_response());
        }
        if !visitor.session.signed_in {
            return Err(visitor.with_cookie(Redirect::to("/login").into_response()));
        }
        Ok(visitor)
    }
}

async fn sign_in_form(State(page): Shared, ConnectInfo(peer): ConnectInfo<SocketAddr>, headers: HeaderMap) -> Response {
    let visitor = match Visitor::from(&page, peer, &headers) {
        Ok(v) => v,
        Err(refused) => return refused,
    };
    if visitor.session.signed_in {
        return visitor.with_cookie(Redirect::to("/").into_response());
    }
    let body = views::sign_in(&visitor.session.csrf, false);
    visitor.respond(StatusCode::OK, &page, "Sign in", body)
}

async fn sign_in(
    State(page): Shared,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let visitor = match Visitor::from(&page, peer, &headers) {
        Ok(v) => v,
        Err(refused) => return refused,
    };
    if !Guard::csrf_ok(&visitor.session, form.get("csrf").map(String::as_str)) {
        return (StatusCode::FORBIDDEN, "missing or wrong CSRF token\n").into_response();
    }
    let password = Secret::new(form.get("password").cloned().unwrap_or_default());
    match page.guard.sign_in(peer.ip(), &visitor.session, password).await {
        Some(session) => {
            let cookie = page.guard.cookie(&session);
            let mut response = Redirect::to("/").into_response();
            if let Ok(cookie) = HeaderValue::from_str(&cookie) {
                response.headers_mut().append(header::SET_COOKIE, cookie);
            }
            response
        }
        None => {
            let body = views::sign_in(&visitor.session.csrf, true);
            visitor.respond(StatusCode::UNAUTHORIZED, &page, "Sign in", body)
        }
    }
}

async fn sign_out(
    State(page): Shared,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    match Visitor::posted(&page, peer, &headers, &form) {
        Ok(visitor) => {
            page.guard.sign_out(&visitor.session);
            Redirect::to("/login").into_response()
        }
        Err(refused) => refused,
    }
}

/// `popgate_NAME{labels} value` samples of the metrics' text, as (labels,
/// value) — the overview reads its gauges where the metrics keep them.
fn samples(text: &str, name: &str) -> Vec<(HashMap<String, String>, f64)> {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(rest) => {
                    let (labels, value) = rest.split_once("} ")?;
                    (labels, value)
                }
                None => ("", rest.strip_prefix(' ')?),
            };
            let labels = labels
                .split("\",")
                .filter_map(|pair| {
                    let (k, v) = pair.split_once("=\"")?;
                    Some((k.trim().to_string(), v.trim_end_matches('"').to_string()))
                })
                .collect();
            Some((labels, value.split_whitespace().next()?.parse().ok()?))
        })
        .collect()
}

async fn overview(State(page): Shared, ConnectInfo(peer): ConnectInfo<SocketAddr>, headers: HeaderMap) -> Response {
    let visitor = match Visitor::signed_in(&page, peer, &headers) {
        Ok(v) => v,
        Err(refused) => return refused,
    };
    page.health.probe_backend_if_due(&page.metrics).await;
    let metrics = page.metrics.encode();
    let buckets = page.activity.chart();
    let mut certificates: Vec<(String, u64)> = samples(&metrics, "popgate_tls_certificate_expiry_timestamp_seconds")
        .into_iter()
        .map(|(labels, value)| (labels.get("certificate").cloned().unwrap_or_default(), value.max(0.0) as u64))
        .collect();
    certificates.sort();
    let overview = views::Overview {
        sessions_now: samples(&metrics, "popgate_sessions_active").iter().map(|(_, v)| v.max(0.0) as u64).sum(),
        chart: super::chart::polls_and_failures(&buckets),
        polls_24h: buckets.iter().map(|b| b.polls as u64).sum(),
        failures_24h: buckets.iter().map(|b| b.failures as u64).sum(),
        backend: page.health.backend_summary(),
        certificates,
        now: unix_now(),
    };
    visitor.respond(StatusCode::OK, &page, "Overview", views::overview(&overview))
}

/// The configuration with the admin state laid over it, and that state.
fn current(page: &Page) -> Result<(Config, UiState), String> {
    let mut config = page.fleet.configuration()?;
    let state = match config.admin_state_path() {
        Some(path) => UiState::load(&path)?,
        None => UiState::default(),
    };
    state.merge_into(&mut config.account)?;
    Ok((config, state))
}

async fn accounts(State(page): Shared, ConnectInfo(peer): ConnectInfo<SocketAddr>, headers: HeaderMap) -> Response {
    let visitor = match Visitor::signed_in(&page, peer, &headers) {
        Ok(v) => v,
        Err(refused) => return refused,
    };
    let (config, _) = match current(&page) {
        Ok(c) => c,
        Err(e) => return visitor.respond(StatusCode::INTERNAL_SERVER_ERROR, &page, "Accounts", views::message(&e)),
    };
    let metrics = page.metrics.encode();
    let refreshes = samples(&metrics, "popgate_oauth_refreshes_total");
    let operator = samples(&metrics, "popgate_oauth_operator_action_needed");
    let sessions = page.activity.sessions_by_account();
    let store = config.token_store.as_ref().map(|s| crate::auth::tokens::open_store(s, Some(&config.state)));
    let now = unix_now();
    let mut rows = Vec::new();
    let mut provider_origins: Vec<String> = Vec::new();
    for account in &config.account {
        let token = match &account.oauth {
            None => None,
            Some(_) => {
                let mut state = views::TokenState {
                    valid_until: None,
                    stored: false,
                    refresh_token_held: false,
                    obtained_at: None,
                    needs_sign_in: operator.iter().any(|(l, v)| l.get("account") == Some(&account.name) && *v > 0.0),
                    refreshes: refreshes
                        .iter()
                        .filter(|(l, v)| l.get("account") == Some(&account.name) && *v > 0.0)
                        .map(|(l, v)| (l.get("result").cloned().unwrap_or_default(), *v as u64))
                        .collect(),
                    store_error: None,
                    last_refresh: None,
                    last_invalid_grant: None,
                };
                let notes = match &store {
                    Some(Ok(store)) => store.notes(&account.name).await.unwrap_or_default(),
                    _ => Default::default(),
                };
                state.last_refresh = notes.last_refresh;
                state.last_invalid_grant = notes.last_invalid_grant;
                match &store {
                    Some(Ok(store)) => match store.load(&account.name).await {
                        Ok(Some(token)) => {
                            state.stored = true;
                            state.valid_until = token.expires_at;
                            state.refresh_token_held = token.refresh_token.is_some();
                            state.obtained_at = Some(token.obtained_at);
                            state.needs_sign_in |= token.is_expired(now) && token.refresh_token.is_none();
                            state.needs_sign_in |= notes.needs_sign_in(&token);
                        }
                        Ok(None) => state.needs_sign_in = true,
                        Err(e) => state.store_error = Some(e.to_string()),
                    },
                    Some(Err(e)) => state.store_error = Some(e.to_string()),
                    None => state.store_error = Some("no [token_store] configured".into()),
                }
                Some(state)
            }
        };
        let backend =
            config.accounts().backend_named(&account.backend).map(|b| b.describe()).unwrap_or_else(|| "?".into());
        let users: Vec<&str> = account.device.iter().map(|d| d.user.as_str()).collect();
        let connect = effective_oauth(config.accounts(), account)
            .filter(|o| o.grant == Grant::AuthorizationCode && config.token_store.is_some())
            .and_then(|o| o.endpoints().ok().map(|e| (o.provider, e)))
            .inspect(|(_, endpoints)| {
                if let Some(url) = &endpoints.authorization {
                    provider_origins.push(url.origin().ascii_serialization());
                }
            })
            .map(|(provider, endpoints)| views::ConnectOptions {
                provider: provider_label(provider),
                code: endpoints.authorization.is_some(),
                device: endpoints.device_authorization.is_some(),
            });
        rows.push(views::AccountRow {
            connect,
            name: account.name.clone(),
            mode: match account.mode {
                AccountMode::Mapped => "mapped",
                AccountMode::Passthrough => "pass-through",
            },
            backend: format!("{} ({})", backend, account.backend),
            token,
            last_error: page.activity.last_account_error(&users),
            connections: sessions.get(&account.name).copied().unwrap_or(0),
            devices: account.device.len(),
        });
    }
    let redirect_uri = redirect_uri(&page, &headers);
    let body = views::accounts(&rows, now, &visitor.session.csrf, redirect_uri.as_deref());
    let mut response = visitor.respond(StatusCode::OK, &page, "Accounts", body);
    // "Sign in with …" posts here and is redirected to the provider: a
    // browser applies `form-action` to that redirect too.
    provider_origins.sort();
    provider_origins.dedup();
    provider_origins.retain(|o| o.bytes().all(|b| b.is_ascii_graphic() && b != b';' && b != b','));
    if !provider_origins.is_empty() {
        let policy = CONTENT_SECURITY_POLICY
            .replace("form-action 'self'", &format!("form-action 'self' {}", provider_origins.join(" ")));
        if let Ok(policy) = HeaderValue::from_str(&policy) {
            response.headers_mut().insert(header::CONTENT_SECURITY_POLICY, policy);
        }
    }
    response
}

fn provider_label(provider: Provider) -> &'static str {
    match provider {
        Provider::Google => "Google",
        Provider::Microsoft => "Microsoft",
        Provider::Generic => "your provider",
    }
}

/// The callback address the browser reaches this listener by (its `Host`
/// header: the operator's own browser, signed in), `https` when the
/// cookie is `Secure` (TLS in front). This is what must be registered at
/// the provider. `None` for a Host that is not a plain host[:port].
fn redirect_uri(page: &Page, headers: &HeaderMap) -> Option<String> {
    let host = headers.get(header::HOST)?.to_str().ok()?;
    let plain = !host.is_empty()
        && host.len() <= 255
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
    if !plain {
        return None;
    }
    let scheme = if page.guard.cookie_secure { "https" } else { "http" };
    Some(format!("{scheme}://{host}{CALLBACK_PATH}"))
}

/// "Sign in with …" (`method=code`) or "Use a device code"
/// (`method=device`) for the OAuth account `account`.
async fn connect_account(
    State(page): Shared,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let visitor = match Visitor::posted(&page, peer, &headers, &form) {
        Ok(v) => v,
        Err(refused) => return refused,
    };
    let account = form.get("account").cloned().unwrap_or_default();
    let fail = |visitor: Visitor, status: StatusCode, text: &str| {
        visitor.respond(status, &page, "Connect a mailbox", views::message(text))
    };
    let config = match current(&page) {
        Ok((config, _)) => config,
        Err(e) => return fail(visitor, StatusCode::INTERNAL_SERVER_ERROR, &e),
    };
    let connector = match Connector::for_account(config.accounts(), &account) {
        Ok(c) if c.client.grant == Grant::AuthorizationCode => c,
        Ok(_) => {
            let text = format!("account `{account}` uses client credentials: it needs no sign-in");
            return fail(visitor, StatusCode::BAD_REQUEST, &text);
        }
        Err(e) => return fail(visitor, StatusCode::BAD_REQUEST, &e.to_string()),
    };
    match form.get("method").map(String::as_str) {
        Some("device") => match page.flows.start_device(connector, &visitor.session.id).await {
            Ok(id) => visitor.with_cookie(Redirect::to(&format!("/accounts/device?id={id}")).into_response()),
            Err(e) => fail(visitor, StatusCode::BAD_GATEWAY, &e),
        },
        Some("code") => {
            let Some(redirect_uri) = redirect_uri(&page, &headers) else {
                return fail(visitor, StatusCode::BAD_REQUEST, "the request's Host header is not a host name");
            };
            match page.flows.start_code(connector, &visitor.session.id, &redirect_uri) {
                Ok((url, browser)) => {
                    tracing::info!(account = %account, "admin page: sign-in to the provider started");
                    let secure = if page.guard.cookie_secure { "; Secure" } else { "" };
                    let cookie = format!(
                        "{FLOW_COOKIE}={browser}; Path={CALLBACK_PATH}; Max-Age={}; HttpOnly; SameSite=Lax{secure}",
                        CODE_FLOW_LIFETIME.as_secs()
                    );
                    let mut response = Redirect::to(url.as_str()).into_response();
                    if let Ok(cookie) = HeaderValue::from_str(&cookie) {
                        response.headers_mut().append(header::SET_COOKIE, cookie);
                    }
                    visitor.with_cookie(response)
                }
                Err(e) => fail(visitor, StatusCode::BAD_REQUEST, &e.to_string()),
            }
        }
        _ => fail(visitor, StatusCode::BAD_REQUEST, "choose a sign-in method"),
    }
}

/// The provider's redirect back. The session cookie (`SameSite=Strict`)
/// may not come along on it, so no session is opened or replaced here: the
/// flow cookie and the state identify the sign-in, and the page links back.
async fn oauth_callback(
    State(page): Shared,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if !page.guard.admits(peer.ip()) || !host_admitted(&page, &headers) {
        return (StatusCode::FORBIDDEN, LOOPBACK_HOST_ONLY).into_response();
    }
    let browser = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|h| guard::cookie_value(h, FLOW_COOKIE));
    let alive = |id: &str| page.guard.session(Some(id)).is_some_and(|s| s.signed_in);
    let outcome = page.flows.finish_code(&query, browser, alive).await;
    let (status, body) = match &outcome {
        Ok((account, connected)) => (StatusCode::OK, views::connected(account, connected)),
        Err((account, error)) => {
            let status = match error {
                CallbackError::UnknownState => StatusCode::BAD_REQUEST,
                CallbackError::WrongSession => StatusCode::FORBIDDEN,
                CallbackError::Provider(_) => StatusCode::BAD_REQUEST,
                CallbackError::Connect(_) => StatusCode::BAD_GATEWAY,
            };
            let text = match error {
                CallbackError::Connect(e) => super::connect::explain(e),
                other => other.to_string(),
            };
            (status, views::sign_in_failed(account.as_deref(), &text))
        }
    };
    let frame = Frame {
        title: "Connect a mailbox",
        csrf: "",
        loopback_only: matches!(page.guard.access(), guard::Access::LoopbackOnly),
        signed_in: false,
    };
    let mut response = (status, views::layout(&frame, body)).into_response();
    let secure = if page.guard.cookie_secure { "; Secure" } else { "" };
    let clear = format!("{FLOW_COOKIE}=; Path={CALLBACK_PATH}; Max-Age=0; HttpOnly; SameSite=Lax{secure}");
    if let Ok(clear) = HeaderValue::from_str(&clear) {
        response.headers_mut().append(header::SET_COOKIE, clear);
    }
    response
}

/// A device-code sign-in's page: the code to enter, then its outcome;
/// reloads itself while waiting.
async fn device_sign_in(
    State(page): Shared,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let visitor = match Visitor::signed_in(&page, peer, &headers) {
        Ok(v) => v,
        Err(refused) => return refused,
    };
    let id = query.get("id").map(String::as_str).unwrap_or_default();
    match page.flows.device(id, &visitor.session.id) {
        Some(view) => {
            let waiting = matches!(view.status, super::connect::DeviceStatus::Waiting);
            let mut response =
                visitor.respond(StatusCode::OK, &page, "Connect a mailbox", views::device_sign_in(&view));
            if waiting {
                // The HTML standard's Refresh header: the page reloads with
                // no script (the CSP allows none).
                response.headers_mut().insert(header::REFRESH, HeaderValue::from_static(DEVICE_PAGE_RELOAD));
            }
            response
        }
        None => {
            let text = "No such device-code sign-in in this session (finished long ago, or started elsewhere).";
            visitor.respond(StatusCode::NOT_FOUND, &page, "Connect a mailbox", views::message(text))
        }
    }
}

async fn devices(State(page): Shared, ConnectInfo(peer): ConnectInfo<SocketAddr>, headers: HeaderMap) -> Response {
    let visitor = match Visitor::signed_in(&page, peer, &headers) {
        Ok(v) => v,
        Err(refused) => return refused,
    };
    let (config, _) = match current(&page) {
        Ok(c) => c,
        Err(e) => return visitor.respond(StatusCode::INTERNAL_SERVER_ERROR, &page, "Devices", views::message(&e)),
    };
    let rows: Vec<views::DeviceRow> = config
        .account
        .iter()
        .flat_map(|a| a.device.iter().map(move |d| (a, d)))
        .map(|(a, d)| views::DeviceRow {
            user: d.user.clone(),
            account: a.name.clone(),
            enabled: d.enabled,
            activity: page.activity.device(&d.user),
        })
        .collect();
    let mapped: Vec<String> =
        config.account.iter().filter(|a| a.mode == AccountMode::Mapped).map(|a| a.name.clone()).collect();
    let read_only = config.admin_state_path().is_none().then_some(
        "Changes need a place to be kept: set [admin] state_file (or a [token_store], beside which it is kept).",
    );
    let body = views::devices(&rows, &mapped, &visitor.session.csrf, read_only);
    visitor.respond(StatusCode::OK, &page, "Devices", body)
}

/// Letters and digits from the system's randomness.
fn random_password() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnpqrstuvwxyz23456789";
    let rng = ring::rand::SystemRandom::new();
    let mut out = String::with_capacity(PASSWORD_CHARS);
    while out.len() < PASSWORD_CHARS {
        let mut byte = [0u8; 1];
        ring::rand::SecureRandom::fill(&rng, &mut byte).expect("system randomness");
        // Rejection sampling: no letter more likely than another.
        let limit = 256 - 256 % ALPHABET.len();
        if (byte[0] as usize) < limit {
            out.push(ALPHABET[byte[0] as usize % ALPHABET.len()] as char);
        }
    }
    out
}

/// What a device change does to the state; `Some(password)` when it made
/// one.
enum Change {
    Add { account: String },
    Enable(bool),
    ResetPassword,
}

async fn change_device(page: &Page, user: &str, change: Change) -> Result<Option<String>, String> {
    let _one_at_a_time = page.changing.lock().await;
    let (_, mut state) = current(page)?;
    let base = page.fleet.configuration()?;
    let Some(path) = base.admin_state_path() else {
        return Err("no admin state file: set [admin] state_file or a [token_store]".into());
    };
    let owner = base.account.iter().find(|a| a.device.iter().any(|d| d.user == user)).map(|a| a.name.clone());
    let owner = owner.or_else(|| state.devices.iter().find(|d| d.user == user).map(|d| d.account.clone()));
    let mut password = None;
    match change {
        Change::Add { account } => {
            if user.is_empty() || user.len() > 255 || user.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err("a device user name is 1 to 255 characters, no spaces".into());
            }
            if owner.is_some() {
                return Err(format!("device user `{user}` exists already"));
            }
            password = Some(random_password());
            let entry = state.device_mut(&account, user)?;
            entry.password_hash = Some(hash(password.clone().expect("just set")).await?);
            entry.enabled = Some(true);
        }
        Change::Enable(on) => {
            let account = owner.ok_or_else(|| format!("no device user `{user}`"))?;
            state.device_mut(&account, user)?.enabled = Some(on);
        }
        Change::ResetPassword => {
            let account = owner.ok_or_else(|| format!("no device user `{user}`"))?;
            password = Some(random_password());
            state.device_mut(&account, user)?.password_hash = Some(hash(password.clone().expect("just set")).await?);
        }
    }
    let mut merged = base;
    state.merge_into(&mut merged.account)?;
    merged.check().map_err(|e| e.to_string())?;
    merged.accounts().check().map_err(|e| e.to_string())?;
    let previous = UiState::load(&path)?;
    state.save(&path)?;
    if let Err(e) = page.fleet.route_by(&merged) {
        // The routing in force still matches the old file: keep them
        // together.
        let _ = previous.save(&path);
        return Err(e);
    }
    tracing::info!(device = %user, "admin page changed a device user");
    Ok(password)
}

async fn hash(password: String) -> Result<String, String> {
    tokio::task::spawn_blocking(move || crate::auth::passwords::hash_password(&password))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

async fn device_form(
    page: Arc<Page>,
    peer: SocketAddr,
    headers: HeaderMap,
    form: HashMap<String, String>,
    change: Change,
) -> Response {
    let visitor = match Visitor::posted(&page, peer, &headers, &form) {
        Ok(v) => v,
        Err(refused) => return refused,
    };
    let user = form.get("user").map(|u| u.trim().to_string()).unwrap_or_default();
    let added = matches!(change, Change::Add { .. });
    match change_device(&page, &user, change).await {
        Ok(Some(password)) => {
            let body = views::new_password(&user, &password, added);
            visitor.respond(StatusCode::OK, &page, "Device password", body)
        }
        Ok(None) => visitor.with_cookie(Redirect::to("/devices").into_response()),
        Err(e) => visitor.respond(StatusCode::BAD_REQUEST, &page, "Devices", views::message(&e)),
    }
}

async fn add_device(
    State(page): Shared,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let account = form.get("account").cloned().unwrap_or_default();
    device_form(page, peer, headers, form, Change::Add { account }).await
}

async fn enable_device(
    State(page): Shared,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    device_form(page, peer, headers, form, Change::Enable(true)).await
}

async fn disable_device(
    State(page): Shared,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    device_form(page, peer, headers, form, Change::Enable(false)).await
}

async fn reset_password(
    State(page): Shared,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    device_form(page, peer, headers, form, Change::ResetPassword).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_read_from_the_metrics_text() {
        let text = "popgate_sessions_active{listener=\"127.0.0.1:1\"} 2\npopgate_sessions_active{listener=\"b\"} 3\n\
                    popgate_sessions_total{listener=\"b\"} 9\n";
        let found = samples(text, "popgate_sessions_active");
        assert_eq!(found.iter().map(|(_, v)| *v).sum::<f64>(), 5.0);
        assert_eq!(found[0].0.get("listener").map(String::as_str), Some("127.0.0.1:1"));
    }

    #[test]
    fn loopback_hosts() {
        for host in ["127.0.0.1:9110", "127.0.0.1", "localhost:9110", "LOCALHOST", "[::1]:9110", "127.1.2.3:80"] {
            assert!(loopback_host(host), "{host}");
        }
        for host in ["evil.example:9110", "192.0.2.1:9110", "[2001:db8::1]:9110", "localhost.evil.example", ""] {
            assert!(!loopback_host(host), "{host}");
        }
    }

    #[test]
    fn generated_passwords_are_long_and_differ() {
        let (a, b) = (random_password(), random_password());
        assert_eq!(a.len(), PASSWORD_CHARS);
        assert_ne!(a, b);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
    }
}
