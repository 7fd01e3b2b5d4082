//! A stand-in for Microsoft Graph v1.0 mail on 127.0.0.1 and a run-time
//! port, written from Microsoft's reference documentation: one mailbox
//! reachable as `/me` (delegated tokens) or `/users/{upn or id}` (app-only
//! tokens; `/me` with one is a 400), `mailFolders/{id or well-known name}`,
//! `mailFolders/{id}/messages` with `$select`, `$orderby=receivedDateTime`
//! (ascending; descending by default), `$top` ≤ 1000 and `@odata.nextLink`
//! paging by `$skip`, `messages/{id}/$value` (the MIME octets),
//! `messages/{id}/move` (201 with the moved message) and
//! `messages/{id}/permanentDelete` (204), JSON `$batch` (≤ 20 requests,
//! answered in any order), `Prefer: IdType="ImmutableId"` (without it, ids
//! are the REST ids, which change when a message moves), and Graph's error
//! bodies (`{"error":{"code","message","innerError"}}`): 401
//! `InvalidAuthenticationToken` for an unknown or expired token, 404
//! `ErrorItemNotFound`, 429 `ApplicationThrottled` with `Retry-After` when
//! more than 4 requests are in flight for the mailbox (Outlook's
//! concurrency limit) or when a test asks, 503 on demand. A `$batch` runs
//! its requests up to 4 at once, each counted against the mailbox's 4: an
//! inner request beyond them is answered 429 inside the batch.
//!
//! On demand, a message comes back from the archive mailbox with a new
//! immutable id (`round_trip_through_archive_mailbox`), and a message's
//! MIME conversion changes between two downloads
//! (`reconvert_after_next_download`): `$value` is a conversion, Outlook
//! stores no MIME.
//!
//! Delta queries on a folder (`mailFolders/{id}/messages/delta`): pages of
//! `Prefer: odata.maxpagesize` (default 10) by `@odata.nextLink`
//! (`$skiptoken`), the last with an `@odata.deltaLink` (`$deltatoken`) that
//! later answers the messages that came into the folder and, as
//! `{"id", "@removed": {"reason": "deleted"}}`, those that left it; after
//! `expire_delta_links` every earlier link is 410 `SyncStateNotFound`.
//! Every top-level HTTP request is counted (`requests`).
//!
//! What it does not reproduce: the other Outlook limits (10 000 requests
//! per 10 minutes, upload volume), `dependsOn`, `$filter`,
//! `$search`, `$count`, `$expand`, changes to properties in a delta,
//! folder hierarchies (every folder is top-level), message properties other
//! than `id`, `receivedDateTime` and `parentFolderId`, gzip and HTTP/2.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use base64::Engine;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// How a token was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// A user signed in: `/me` works.
    Delegated,
    /// Client credentials: only `/users/{id}`.
    AppOnly,
}

use super::bearer::BearerApi;
use super::stand_in::HttpServer;
pub use super::stand_in::{Seen, Throttle};

#[derive(Debug, Clone)]
struct Folder {
    id: String,
    well_known: Option<&'static str>,
    name: String,
}

#[derive(Debug, Clone)]
struct Message {
    immutable_id: String,
    /// Bumped on every move: the REST id changes with the folder.
    moves: u32,
    folder: String,
    /// Seconds since the epoch.
    received: i64,
    mime: Vec<u8>,
    /// `isRead`.
    read: bool,
    /// Outlook categories (by display name).
    categories: Vec<String>,
}

impl Message {
    fn rest_id(&self) -> String {
        format!("AAMkADRest{}{}", self.moves, &self.immutable_id[40..])
    }

    fn id(&self, immutable: bool) -> String {
        if immutable { self.immutable_id.clone() } else { self.rest_id() }
    }
}

#[derive(Default)]
struct StandIn {
    folders: Vec<Folder>,
    messages: Vec<Message>,
    tokens: HashMap<String, TokenKind>,
    page_cap: usize,
    next: u64,
    next_received: i64,
    throttles: VecDeque<Throttle>,
    refuse_moves: HashSet<String>,
    /// Messages whose MIME conversion changes after their next `$value`.
    reconvert: HashSet<String>,
    seen: Vec<Seen>,
    in_flight: usize,
    max_in_flight: usize,
    value_delay: Duration,
    /// If set, the n-th `$value` waits `value_delays[n % len]` instead.
    value_delays: Vec<Duration>,
    values_served: usize,
    batches: Vec<usize>,
    refusing_refresh: bool,
    /// `sendMail`: the MIME octets of every message accepted, in order.
    sent: Vec<Vec<u8>>,
    /// `sendMail`: the next sends answered with these (status, code).
    send_refusals: VecDeque<(u16, String)>,
    /// The Content-Type of the request being handled (sendMail's MIME form
    /// is `text/plain`; JSON is the other form, not reproduced).
    content_type: String,
    /// `Prefer: odata.maxpagesize` of the request being handled.
    max_page_size: Option<usize>,
    /// `http://{Host}/v1.0` of the request being handled: links lead back
    /// the way the request came (through a proxy, when there is one).
    request_base: Option<String>,
    /// Delta token → (folder id, the folder's message ids then).
    delta_tokens: HashMap<String, (String, HashSet<String>)>,
    /// Skip token → (folder id, the items still to send, the ids the delta
    /// link at the end will stand for).
    skip_tokens: HashMap<String, (String, Vec<Value>, HashSet<String>)>,
    next_token: u64,
    /// Top-level HTTP requests answered.
    requests: usize,
}

pub const UPN: &str = "alice@contoso.com";
pub const USER_ID: &str = "6e7b768e-07e2-4810-8459-485f84f8f204";

pub struct GraphApi {
    /// `http://127.0.0.1:PORT/v1.0`, the `api_base` to configure.
    pub base_url: String,
    shared: Arc<Shared>,
    /// Serving until dropped.
    _server: HttpServer,
}

struct Shared {
    state: Mutex<StandIn>,
    base_url: Mutex<String>,
}

impl GraphApi {
    pub fn start() -> GraphApi {
        let mut stand_in = StandIn { page_cap: 1000, next_received: 1_700_000_000, ..StandIn::default() };
        for (well_known, name) in [("inbox", "Inbox"), ("deleteditems", "Deleted Items"), ("archive", "Archive")] {
            let id = long_id("AQMkADAwATM0MDAAMS1iNWUwLWE3", &mut stand_in.next);
            stand_in.folders.push(Folder { id, well_known: Some(well_known), name: name.into() });
        }
        let shared = Arc::new(Shared { state: Mutex::new(stand_in), base_url: Mutex::new(String::new()) });
        let app = axum::Router::new().fallback(serve).with_state(shared.clone());
        let server = HttpServer::start("graph", app);
        let base_url = format!("http://{}/v1.0", server.addr);
        // Before any request: nobody knows the address yet.
        *shared.base_url.lock().unwrap() = base_url.clone();
        GraphApi { base_url, shared, _server: server }
    }

    fn with<T>(&self, f: impl FnOnce(&mut StandIn) -> T) -> T {
        let mut state = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut state)
    }

    pub fn issue_token(&self, kind: TokenKind) -> String {
        self.with(|s| {
            let token = format!("eyJ0eXAiOiJKV1Qi.stand-in-{}.{}", s.tokens.len() + 1, std::process::id());
            s.tokens.insert(token.clone(), kind);
            token
        })
    }

    /// A token source for a router's refresh: each call issues a fresh
    /// token, until `refuse_refresh`.
    pub fn issuer(&self, kind: TokenKind) -> Arc<dyn Fn() -> Result<String, String> + Send + Sync> {
        let shared = self.shared.clone();
        Arc::new(move || {
            let mut state = shared.state.lock().unwrap_or_else(|p| p.into_inner());
            if state.refusing_refresh {
                return Err("AADSTS700082: The refresh token has expired due to inactivity.".into());
            }
            let token = format!("eyJ0eXAiOiJKV1Qi.refreshed-{}.{}", state.tokens.len() + 1, std::process::id());
            state.tokens.insert(token.clone(), kind);
            Ok(token)
        })
    }

    /// Stores a message in the inbox, received a minute after the previous.
    pub fn add(&self, mime: &[u8]) -> String {
        let received = self.with(|s| {
            s.next_received += 60;
            s.next_received
        });
        self.add_to("inbox", mime, received)
    }

    /// Stores a message in a folder (well-known name or id), received at
    /// `received` (seconds since the epoch). Returns its immutable id.
    pub fn add_to(&self, folder: &str, mime: &[u8], received: i64) -> String {
        self.with(|s| {
            let folder = s.folder(folder).expect("folder exists").id.clone();
            let immutable_id = long_id("AAkALgAAAAAAHYQDEapmEc2byACqAC-EWg0A", &mut s.next);
            s.messages.push(Message {
                immutable_id: immutable_id.clone(),
                moves: 0,
                folder,
                received,
                mime: mime.to_vec(),
                read: false,
                categories: Vec::new(),
            });
            immutable_id
        })
    }

    /// Someone else reads a message (`isRead`).
    pub fn mark_read(&self, id: &str) {
        self.with(|s| s.messages.iter_mut().find(|m| m.immutable_id == id).expect("message exists").read = true)
    }

    /// Whether a message is read, and its categories.
    pub fn read_and_categories(&self, id: &str) -> (bool, Vec<String>) {
        self.with(|s| {
            let message = s.messages.iter().find(|m| m.immutable_id == id).expect("message exists");
            (message.read, message.categories.clone())
        })
    }

    /// A new top-level folder; returns its id.
    pub fn create_folder(&self, name: &str) -> String {
        self.with(|s| {
            let id = long_id("AQMkADAwATM0MDAAMS1iNWUwLWE3", &mut s.next);
            s.folders.push(Folder { id: id.clone(), well_known: None, name: name.into() });
            id
        })
    }

    /// Immutable ids of the messages in a folder, oldest first.
    pub fn ids_in(&self, folder: &str) -> Vec<String> {
        self.with(|s| {
            let folder = s.folder(folder).expect("folder exists").id.clone();
            let mut found: Vec<&Message> = s.messages.iter().filter(|m| m.folder == folder).collect();
            found.sort_by_key(|m| (m.received, m.immutable_id.clone()));
            found.into_iter().map(|m| m.immutable_id.clone()).collect()
        })
    }

    pub fn all_ids(&self) -> Vec<String> {
        self.with(|s| s.messages.iter().map(|m| m.immutable_id.clone()).collect())
    }

    /// Someone else moves a message (its immutable id stays).
    pub fn move_message(&self, id: &str, folder: &str) {
        self.with(|s| {
            let folder = s.folder(folder).expect("folder exists").id.clone();
            let message = s.messages.iter_mut().find(|m| m.immutable_id == id).expect("message exists");
            message.folder = folder;
            message.moves += 1;
        })
    }

    /// The message goes to the user's archive mailbox (Online Archive) and
    /// comes back: "the immutable ID changes if the item is moved to an
    /// archive mailbox". Returns its new immutable id.
    pub fn round_trip_through_archive_mailbox(&self, id: &str) -> String {
        self.with(|s| {
            let fresh = long_id("AAkALgAAAAAAHYQDEapmEc2byACqAC-EWg0A", &mut s.next);
            let message = s.messages.iter_mut().find(|m| m.immutable_id == id).expect("message exists");
            message.immutable_id = fresh.clone();
            message.moves += 1;
            fresh
        })
    }

    /// After its next `$value`, the message converts to other MIME octets
    /// (a header more), as Outlook's conversion may: it stores no MIME, and
    /// nothing promises two downloads are byte-identical.
    pub fn reconvert_after_next_download(&self, id: &str) {
        self.with(|s| s.reconvert.insert(id.to_string()));
    }

    /// Moves of this message are refused (403 `ErrorAccessDenied`).
    pub fn refuse_moving(&self, id: &str) {
        self.with(|s| s.refuse_moves.insert(id.to_string()));
    }

    pub fn set_page_cap(&self, n: usize) {
        self.with(|s| s.page_cap = n);
    }

    /// Every `$value` answer waits this long first (to build concurrency).
    pub fn set_value_delay(&self, delay: Duration) {
        self.with(|s| s.value_delay = delay);
    }

    /// The n-th `$value` answer waits `delays[n % len]` first: downloads
    /// that overlap without ending together.
    pub fn set_value_delays(&self, delays: &[Duration]) {
        self.with(|s| s.value_delays = delays.to_vec());
    }

    pub fn throttle(&self, throttle: Throttle) {
        self.with(|s| s.throttles.push_back(throttle));
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.with(|s| s.seen.clone())
    }

    pub fn forget_seen(&self) {
        self.with(|s| {
            s.seen.clear();
            s.batches.clear();
            s.max_in_flight = 0;
        });
    }

    /// The most requests that were in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.with(|s| s.max_in_flight)
    }

    /// The messages `sendMail` accepted (decoded from base64), in order.
    pub fn sent(&self) -> Vec<Vec<u8>> {
        self.with(|s| s.sent.clone())
    }

    /// The next `sendMail` is answered with `status` and Graph's error
    /// `code` (e.g. 403 `ErrorSendAsDenied`, 400
    /// `ErrorMimeContentInvalidBase64String`, 429 `ApplicationThrottled`,
    /// 503 `ServiceUnavailable`), and nothing is sent.
    pub fn refuse_next_send(&self, status: u16, code: &str) {
        self.with(|s| s.send_refusals.push_back((status, code.to_string())));
    }

    /// Requests per `$batch` so far.
    pub fn batches(&self) -> Vec<usize> {
        self.with(|s| s.batches.clone())
    }

    /// Graph no longer has the sync state of any delta link handed out.
    pub fn expire_delta_links(&self) {
        self.with(|s| {
            s.delta_tokens.clear();
            s.skip_tokens.clear();
        });
    }

    /// Top-level HTTP requests answered so far (a `$batch` is one).
    pub fn requests(&self) -> usize {
        self.with(|s| s.requests)
    }
}

impl BearerApi for GraphApi {
    fn add(&self, raw: &[u8]) -> String {
        GraphApi::add(self, raw)
    }

    fn expire(&self, token: &str) {
        self.with(|s| s.tokens.remove(token));
    }

    fn refuse_refresh(&self) {
        self.with(|s| s.refusing_refresh = true);
    }

    fn statuses(&self) -> Vec<u16> {
        self.with(|s| s.seen.iter().map(|r| r.status).collect())
    }

    fn maildrop(&self) -> Vec<String> {
        self.ids_in("inbox")
    }

    fn removed(&self) -> Vec<String> {
        self.ids_in("deleteditems")
    }

    fn delete(&self, id: &str) {
        self.with(|s| s.messages.retain(|m| m.immutable_id != id));
    }

    fn uidl(&self, id: &str) -> String {
        uidl(id)
    }
}

/// The documented UIDL of a Graph immutable id: hex SHA-256, computed here
/// independently of popgate.
pub fn uidl(id: &str) -> String {
    Sha256::digest(id.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// A Graph-looking id: base64url, ~150 characters, unique.
fn long_id(prefix: &str, counter: &mut u64) -> String {
    *counter += 1;
    let mut seed = Vec::new();
    for i in 0..12u64 {
        seed.extend_from_slice(
            &(counter.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(i as u32 * 5) ^ i).to_be_bytes(),
        );
    }
    format!("{prefix}{}AAA=", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(seed))
}

impl StandIn {
    fn folder(&self, id_or_name: &str) -> Option<&Folder> {
        self.folders
            .iter()
            .find(|f| f.id == id_or_name || f.well_known.is_some_and(|w| w.eq_ignore_ascii_case(id_or_name)))
    }

    fn message_index(&self, id: &str) -> Option<usize> {
        self.messages.iter().position(|m| m.immutable_id == id || m.rest_id() == id)
    }
}

struct Answer {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Option<Value>,
    raw: Option<Vec<u8>>,
}

impl Answer {
    fn json(status: u16, body: Value) -> Answer {
        Answer {
            status,
            headers: vec![("Content-Type", "application/json; odata.metadata=minimal".into())],
            body: Some(body),
            raw: None,
        }
    }

    fn no_content() -> Answer {
        Answer { status: 204, headers: Vec::new(), body: None, raw: None }
    }

    fn error(status: u16, code: &str, message: &str) -> Answer {
        Answer::json(
            status,
            json!({ "error": {
                "code": code,
                "message": message,
                "innerError": {
                    "date": "2024-05-01T10:00:00",
                    "request-id": "a4e0b0b2-8f3c-4f6e-9d31-2f0f0c6a7e11",
                    "client-request-id": "a4e0b0b2-8f3c-4f6e-9d31-2f0f0c6a7e11"
                }
            }}),
        )
    }

    fn unauthenticated() -> Answer {
        let mut answer =
            Answer::error(401, "InvalidAuthenticationToken", "Access token has expired or is not yet valid.");
        answer.headers.push((
            "WWW-Authenticate",
            "Bearer realm=\"\", authorization_uri=\"https://login.microsoftonline.com/common/oauth2/authorize\", \
             client_id=\"00000003-0000-0000-c000-000000000000\""
                .into(),
        ));
        answer
    }

    fn not_found() -> Answer {
        Answer::error(404, "ErrorItemNotFound", "The specified object was not found in the store.")
    }

    fn throttled(status: u16, retry_after: Option<u64>) -> Answer {
        let mut answer = if status == 503 {
            Answer::error(503, "ServiceUnavailable", "The service is temporarily unavailable.")
        } else if status == 504 {
            // What Graph's gateway answers when a slow MIME conversion (a
            // message with large attachments) takes it beyond ~30 s.
            Answer::error(504, "UnknownError", "")
        } else {
            Answer::error(429, "ApplicationThrottled", "Application is over its MailboxConcurrency limit.")
        };
        if let Some(secs) = retry_after {
            answer.headers.push(("Retry-After", secs.to_string()));
        }
        answer
    }

    fn into_response(self) -> Response {
        let mut response = Response::builder().status(StatusCode::from_u16(self.status).expect("status"));
        for (name, value) in &self.headers {
            response = response.header(*name, value);
        }
        let body = match (self.raw, self.body) {
            (Some(raw), _) => Body::from(raw),
            (None, Some(json)) => Body::from(serde_json::to_vec(&json).expect("JSON")),
            (None, None) => Body::empty(),
        };
        response.body(body).expect("response")
    }
}

async fn serve(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 16 * 1024 * 1024).await.unwrap_or_default();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().unwrap_or("").to_string();
    let token = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let immutable = prefers_immutable(&parts.headers);
    {
        let mut state = shared.state.lock().unwrap();
        state.content_type = parts.headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        state.max_page_size = parts
            .headers
            .get_all("prefer")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .find_map(|p| p.trim().strip_prefix("odata.maxpagesize=").and_then(|n| n.trim().parse().ok()));
        state.requests += 1;
        state.request_base =
            parts.headers.get("host").and_then(|v| v.to_str().ok()).map(|host| format!("http://{host}/v1.0"));
    }
    // Outlook's concurrency limit, per mailbox (there is one).
    let over_limit = {
        let mut state = shared.state.lock().unwrap();
        state.in_flight += 1;
        state.max_in_flight = state.max_in_flight.max(state.in_flight);
        state.in_flight > 4
    };
    let delay = if path.ends_with("/$value") {
        let mut state = shared.state.lock().unwrap();
        state.values_served += 1;
        match state.value_delays.len() {
            0 => state.value_delay,
            n => state.value_delays[state.values_served % n],
        }
    } else {
        Duration::ZERO
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let answer = if over_limit {
        record(&shared, &parts.method, &path, &query, 429, immutable, false);
        Answer::throttled(429, Some(1))
    } else if parts.method == Method::POST && path == "/v1.0/$batch" {
        batch(&shared, token.as_deref(), immutable, &body)
    } else {
        handle(&shared, token.as_deref(), &parts.method, &path, &query, immutable, &body, false)
    };
    shared.state.lock().unwrap().in_flight -= 1;
    answer.into_response()
}

fn prefers_immutable(headers: &HeaderMap) -> bool {
    headers.get_all("prefer").iter().filter_map(|v| v.to_str().ok()).any(|v| v.contains("IdType=\"ImmutableId\""))
}

fn record(shared: &Shared, method: &Method, path: &str, query: &str, status: u16, immutable: bool, in_batch: bool) {
    shared.state.lock().unwrap().seen.push(Seen {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        at: Instant::now(),
        status,
        immutable_ids: immutable,
        in_batch,
    });
}

#[allow(clippy::too_many_arguments)]
fn handle(
    shared: &Shared,
    token: Option<&str>,
    method: &Method,
    path: &str,
    query: &str,
    immutable: bool,
    body: &[u8],
    in_batch: bool,
) -> Answer {
    let base_url = shared.base_url.lock().unwrap().clone();
    let answer = {
        let mut state = shared.state.lock().unwrap();
        route(&mut state, &base_url, token, method, path, query, immutable, body, in_batch)
    };
    record(shared, method, path, query, answer.status, immutable, in_batch);
    answer
}

#[allow(clippy::too_many_arguments)]
fn route(
    state: &mut StandIn,
    base_url: &str,
    token: Option<&str>,
    method: &Method,
    path: &str,
    query: &str,
    immutable: bool,
    body: &[u8],
    in_batch: bool,
) -> Answer {
    let Some(kind) = token.and_then(|t| state.tokens.get(t).copied()) else {
        return Answer::unauthenticated();
    };
    let target = format!("{path}?{query}");
    if let Some(at) = state.throttles.iter().position(|t| t.in_batch == in_batch && target.contains(&t.path_contains)) {
        let throttle = state.throttles.remove(at).expect("present");
        return Answer::throttled(throttle.status, throttle.retry_after);
    }
    let Some(rest) = path.strip_prefix("/v1.0/") else {
        return Answer::error(400, "BadRequest", "Invalid version.");
    };
    let segments: Vec<String> =
        rest.split('/').map(|s| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()).collect();
    let (mailbox, rest): (String, &[String]) = match segments.as_slice() {
        [me, rest @ ..] if me == "me" => {
            if kind == TokenKind::AppOnly {
                return Answer::error(
                    400,
                    "BadRequest",
                    "/me request is only valid with delegated authentication flow.",
                );
            }
            (format!("{base_url}/me"), rest)
        }
        [users, user, rest @ ..] if users == "users" => {
            if !(user.eq_ignore_ascii_case(UPN) || user == USER_ID) {
                return Answer::error(404, "ErrorInvalidUser", &format!("The requested user '{user}' is invalid."));
            }
            (format!("{base_url}/users/{user}"), rest)
        }
        _ => return Answer::error(400, "BadRequest", "Resource not found for the segment."),
    };
    let params: HashMap<String, String> = url::form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
    match (method.as_str(), rest.as_slice()) {
        ("GET", ["mailFolders", folder]) => match state.folder(folder) {
            Some(f) => Answer::json(
                200,
                json!({
                    "@odata.context": format!("{base_url}/$metadata#users('{USER_ID}')/mailFolders/$entity"),
                    "id": f.id, "displayName": f.name, "parentFolderId": "AQMkADAwATM0MDAAMS1root",
                    "childFolderCount": 0, "unreadItemCount": 0,
                    "totalItemCount": state.messages.iter().filter(|m| m.folder == f.id).count(),
                    "isHidden": false
                }),
            ),
            None => Answer::not_found(),
        },
        ("GET", ["mailFolders", folder, "messages"]) => {
            let Some(folder) = state.folder(folder).map(|f| f.id.clone()) else {
                return Answer::not_found();
            };
            let order = params.get("$orderby").map(String::as_str).unwrap_or("receivedDateTime desc");
            let ascending = match order.trim() {
                "receivedDateTime" | "receivedDateTime asc" => true,
                "receivedDateTime desc" => false,
                other => {
                    return Answer::error(400, "BadRequest", &format!("The stand-in does not order by {other:?}."));
                }
            };
            let top = params
                .get("$top")
                .and_then(|t| t.parse::<usize>().ok())
                .unwrap_or(10)
                .clamp(1, 1000)
                .min(state.page_cap);
            let skip = params.get("$skip").and_then(|t| t.parse::<usize>().ok()).unwrap_or(0);
            let mut found: Vec<&Message> = state.messages.iter().filter(|m| m.folder == folder).collect();
            found.sort_by_key(|m| (m.received, m.immutable_id.clone()));
            if !ascending {
                found.reverse();
            }
            let value: Vec<Value> = found
                .iter()
                .skip(skip)
                .take(top)
                .map(|m| {
                    json!({ "@odata.etag": "W/\"CQAAABYAAAAiIsqMbYjsT5e/T7KzowPTAAAm8Ssq\"", "id": m.id(immutable),
                            "receivedDateTime": iso8601(m.received) })
                })
                .collect();
            let mut page = json!({
                "@odata.context": format!("{base_url}/$metadata#users('{USER_ID}')/mailFolders('{folder}')/messages(id,receivedDateTime)"),
                "value": value,
            });
            if skip + top < found.len() {
                let mut next = url::Url::parse(&format!("{base_url}{}", &path["/v1.0".len()..])).expect("URL");
                {
                    let mut pairs = next.query_pairs_mut();
                    for key in ["$select", "$orderby"] {
                        if let Some(value) = params.get(key) {
                            pairs.append_pair(key, value);
                        }
                    }
                    pairs.append_pair("$top", &top.to_string()).append_pair("$skip", &(skip + top).to_string());
                }
                page["@odata.nextLink"] = json!(next.as_str());
            }
            Answer::json(200, page)
        }
        ("GET", ["mailFolders", folder, "messages", "delta"]) => {
            let Some(folder) = state.folder(folder).map(|f| f.id.clone()) else {
                return Answer::not_found();
            };
            let now: HashSet<String> =
                state.messages.iter().filter(|m| m.folder == folder).map(|m| m.id(immutable)).collect();
            let item = |m: &Message| {
                json!({ "@odata.etag": "W/\"CQAAABYAAAAiIsqMbYjsT5e\"", "id": m.id(immutable),
                                             "receivedDateTime": iso8601(m.received) })
            };
            let gone =
                || Answer::error(410, "SyncStateNotFound", "The sync state generation is not found or has expired.");
            let (items, snapshot) = if let Some(token) = params.get("$skiptoken") {
                match state.skip_tokens.get(token) {
                    Some((f, items, snapshot)) if *f == folder => (items.clone(), snapshot.clone()),
                    _ => return gone(),
                }
            } else if let Some(token) = params.get("$deltatoken") {
                let Some((f, before)) = state.delta_tokens.get(token) else {
                    return gone();
                };
                if *f != folder {
                    return gone();
                }
                let mut items: Vec<Value> = state
                    .messages
                    .iter()
                    .filter(|m| m.folder == folder && !before.contains(&m.id(immutable)))
                    .map(item)
                    .collect();
                items.extend(
                    before
                        .iter()
                        .filter(|id| !now.contains(*id))
                        .map(|id| json!({ "id": id, "@removed": { "reason": "deleted" } })),
                );
                (items, now)
            } else {
                (state.messages.iter().filter(|m| m.folder == folder).map(item).collect(), now)
            };
            let size = state.max_page_size.unwrap_or(10).clamp(1, 1000).min(state.page_cap);
            let page: Vec<Value> = items.iter().take(size).cloned().collect();
            let rest: Vec<Value> = items.into_iter().skip(size).collect();
            state.next_token += 1;
            let token = format!("tok{}x{}", state.next_token, std::process::id());
            let base = state.request_base.clone().unwrap_or_else(|| base_url.to_string());
            let link = |key: &str| format!("{base}{}?{key}={token}", &path["/v1.0".len()..]);
            let mut answer = json!({
                "@odata.context": format!("{base_url}/$metadata#Collection(message)"),
                "value": page,
            });
            if rest.is_empty() {
                answer["@odata.deltaLink"] = json!(link("$deltatoken"));
                state.delta_tokens.insert(token, (folder, snapshot));
            } else {
                answer["@odata.nextLink"] = json!(link("$skiptoken"));
                state.skip_tokens.insert(token, (folder, rest, snapshot));
            }
            Answer::json(200, answer)
        }
        // A message's properties (only those popgate selects).
        ("GET", ["messages", id]) => match state.message_index(id) {
            Some(i) => {
                let message = &state.messages[i];
                Answer::json(
                    200,
                    json!({ "@odata.context": format!("{mailbox}/$metadata#messages(id,isRead,categories)/$entity"),
                            "id": message.id(immutable), "isRead": message.read, "categories": message.categories }),
                )
            }
            None => Answer::not_found(),
        },
        // `isRead` and `categories` are the properties the stand-in updates.
        ("PATCH", ["messages", id]) => {
            let Some(i) = state.message_index(id) else {
                return Answer::not_found();
            };
            let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let message = &mut state.messages[i];
            if let Some(read) = request["isRead"].as_bool() {
                message.read = read;
            }
            if let Some(categories) = request["categories"].as_array() {
                message.categories = categories.iter().filter_map(Value::as_str).map(str::to_string).collect();
            }
            Answer::json(
                200,
                json!({ "id": message.id(immutable), "isRead": message.read, "categories": message.categories }),
            )
        }
        ("GET", ["messages", id, "$value"]) => match state.message_index(id) {
            Some(i) => {
                let mime = state.messages[i].mime.clone();
                let immutable_id = state.messages[i].immutable_id.clone();
                if state.reconvert.remove(&immutable_id) {
                    let mut converted = b"X-MS-Exchange-Converted: again\r\n".to_vec();
                    converted.extend_from_slice(&mime);
                    state.messages[i].mime = converted;
                }
                Answer {
                    status: 200,
                    headers: vec![("Content-Type", "text/plain".into())],
                    body: None,
                    raw: Some(mime),
                }
            }
            None => Answer::not_found(),
        },
        ("POST", ["messages", id, "move"]) => {
            let Some(i) = state.message_index(id) else {
                return Answer::not_found();
            };
            let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let Some(destination) =
                request["destinationId"].as_str().and_then(|d| state.folder(d)).map(|f| f.id.clone())
            else {
                return Answer::error(400, "ErrorInvalidIdMalformed", "Id is malformed.");
            };
            if state.refuse_moves.contains(&state.messages[i].immutable_id) {
                return Answer::error(403, "ErrorAccessDenied", "Access is denied. Check credentials and try again.");
            }
            let message = &mut state.messages[i];
            message.folder = destination.clone();
            message.moves += 1;
            Answer::json(
                201,
                json!({ "@odata.context": format!("{mailbox}/$metadata#messages/$entity"), "id": message.id(immutable),
                        "parentFolderId": destination, "receivedDateTime": iso8601(message.received) }),
            )
        }
        // "Send Outlook messages in MIME format": the MIME, base64, as a
        // text/plain body; 202 Accepted with no body.
        ("POST", ["sendMail"]) => {
            if !state.content_type.to_ascii_lowercase().starts_with("text/plain") {
                return Answer::error(
                    400,
                    "ErrorInvalidRequest",
                    "The stand-in reproduces only the MIME form of sendMail (Content-Type: text/plain).",
                );
            }
            let text: Vec<u8> = body.iter().copied().filter(|b| !b.is_ascii_whitespace()).collect();
            let Ok(mime) = base64::engine::general_purpose::STANDARD.decode(&text) else {
                return Answer::error(
                    400,
                    "ErrorMimeContentInvalidBase64String",
                    "Invalid base64 string for MIME content.",
                );
            };
            if let Some((status, code)) = state.send_refusals.pop_front() {
                return match status {
                    429 | 503 | 504 => Answer::throttled(status, Some(1)),
                    _ => Answer::error(status, &code, "The stand-in was told to refuse this send."),
                };
            }
            if mime.is_empty() {
                return Answer::error(400, "ErrorMimeContentInvalid", "The MIME content is empty.");
            }
            state.sent.push(mime);
            Answer { status: 202, headers: Vec::new(), body: None, raw: None }
        }
        ("POST", ["messages", id, "permanentDelete"]) => match state.message_index(id) {
            Some(i) => {
                state.messages.remove(i);
                Answer::no_content()
            }
            None => Answer::not_found(),
        },
        _ => Answer::error(400, "BadRequest", &format!("The stand-in does not reproduce {method} {path}.")),
    }
}

/// `2023-11-14T22:13:20Z`, as Graph writes dates.
fn iso8601(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

/// `POST /v1.0/$batch`: each request handled as if sent alone (with its own
/// headers), the answers in reverse order, paired by id.
fn batch(shared: &Shared, token: Option<&str>, outer_immutable: bool, body: &[u8]) -> Answer {
    if token.is_none_or(|t| !shared.state.lock().unwrap().tokens.contains_key(t)) {
        record(shared, &Method::POST, "/v1.0/$batch", "", 401, outer_immutable, false);
        return Answer::unauthenticated();
    }
    let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let Some(requests) = request["requests"].as_array() else {
        return Answer::error(400, "BadRequest", "Invalid batch payload format.");
    };
    if requests.is_empty() || requests.len() > 20 {
        return Answer::error(400, "BadRequest", "Number of requests in the batch must be between 1 and 20.");
    }
    // Outlook runs up to 4 of the batch's requests at once, each counted
    // towards the mailbox's 4 (the batch itself is counted already): the
    // requests of each wave beyond what the others in flight leave get 429.
    let wave = requests.len().min(4);
    let others = {
        let mut state = shared.state.lock().unwrap();
        state.batches.push(requests.len());
        let others = state.in_flight - 1;
        state.in_flight += wave - 1;
        state.max_in_flight = state.max_in_flight.max(state.in_flight);
        others
    };
    record(shared, &Method::POST, "/v1.0/$batch", "", 200, outer_immutable, false);
    let mut responses = Vec::new();
    for (index, inner) in requests.iter().enumerate().rev() {
        let id = inner["id"].as_str().unwrap_or("").to_string();
        let method = Method::from_bytes(inner["method"].as_str().unwrap_or("GET").as_bytes()).unwrap_or(Method::GET);
        let url = inner["url"].as_str().unwrap_or("");
        let (path, query) = url.split_once('?').unwrap_or((url, ""));
        let immutable = inner["headers"]["Prefer"]
            .as_str()
            .or_else(|| inner["headers"]["prefer"].as_str())
            .is_some_and(|p| p.contains("IdType=\"ImmutableId\""));
        let body = inner.get("body").map(|b| serde_json::to_vec(b).unwrap_or_default()).unwrap_or_default();
        let answer = if others + index % wave + 1 > 4 {
            record(shared, &method, &format!("/v1.0{path}"), query, 429, immutable, true);
            Answer::throttled(429, Some(1))
        } else {
            handle(shared, token, &method, &format!("/v1.0{path}"), query, immutable, &body, true)
        };
        let mut headers = serde_json::Map::new();
        for (name, value) in &answer.headers {
            headers.insert(name.to_string(), json!(value));
        }
        let mut response = json!({ "id": id, "status": answer.status, "headers": headers });
        if let Some(body) = answer.body {
            response["body"] = body;
        }
        responses.push(response);
    }
    shared.state.lock().unwrap().in_flight -= wave - 1;
    Answer::json(200, json!({ "responses": responses }))
}
