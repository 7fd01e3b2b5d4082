//! A stand-in for the Gmail API (REST v1) on 127.0.0.1 and a run-time port,
//! written from Google's reference documentation: `users.labels.list`,
//! `users.messages.list` (newest first, `labelIds`, a small `q`,
//! `maxResults` ≤ 500, opaque `pageToken`, no `messages` key when empty),
//! `users.messages.get` (`format=minimal|metadata|raw`, `internalDate` as a
//! string, base64url `raw` with padding), `batchModify` / `batchDelete`
//! (≤ 1000 ids, empty 204 answers), the `multipart/mixed` batch endpoint
//! (`/batch/gmail/v1`, ≤ 100 parts, `Content-ID: <response-…>`), and
//! Google's error bodies (`{"error":{"code","message","errors":[{reason,
//! domain}],"status"}}`): 401 `UNAUTHENTICATED` for an unknown or revoked
//! token, 403 `insufficientPermissions` for `batchDelete` without the full
//! mail scope, 404 `notFound`, and — on demand — 429 `rateLimitExceeded` or
//! 403 `userRateLimitExceeded` with `Retry-After`, or any Google error a
//! test names (`refuse`: `dailyLimitExceeded`, `domainPolicy`, a long
//! throttle whose end is only in the message, "Retry after <RFC 3339>").
//!
//! As Gmail does: a search (`q`) covers All Mail except Spam and Trash (a
//! message without INBOX still matches); `batchModify` and `batchDelete`
//! skip ids they do not know ("no guarantees that messages were not already
//! deleted or even existed") and answer 204; the requests inside a batch
//! run concurrently, and those beyond 25 in flight for the user at once
//! (the batch's and any other request's) get 429 `rateLimitExceeded` "Too
//! many concurrent requests for user", with no `Retry-After` (reported by
//! Gmail users at 50 and 100 parts, never at 25).
//!
//! `users.history.list` (`startHistoryId`, `maxResults` ≤ 500, opaque
//! `pageToken`): every change to a message (added, deleted, labels added or
//! removed) is a history record with the next `historyId`; records before
//! `expire_history` are gone, and a start before them is 404, as Gmail
//! answers a start it has no history for. `users.getProfile` and
//! `messages.get` carry the current `historyId`. Every top-level HTTP
//! request is counted (`requests`).
//!
//! What it does not reproduce: quota accounting (throttling happens only
//! when a test asks for it), threads (each message is its own thread),
//! `historyTypes` and `labelId` filters of the history, the `fields` partial-response parameter (ignored:
//! whole resources are sent), `q` beyond `label:`, `in:`, `subject:`, their
//! negation (`-in:sent`) and parentheses, `metadata` headers, HTTP/2, gzip.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use base64::Engine;
use serde_json::{Value, json};

/// What an access token lets its bearer do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// `https://mail.google.com/`: everything, `batchDelete` included.
    Full,
    /// `https://www.googleapis.com/auth/gmail.modify`: no permanent delete.
    Modify,
}

use super::bearer::BearerApi;
use super::stand_in::HttpServer;
pub use super::stand_in::{Seen, Throttle};

#[derive(Debug, Clone)]
struct Message {
    id: String,
    raw: Vec<u8>,
    internal_date: i64,
    labels: BTreeSet<String>,
}

#[derive(Default)]
struct StandIn {
    messages: Vec<Message>,
    /// User labels: (id, name).
    user_labels: Vec<(String, String)>,
    tokens: HashMap<String, Scope>,
    page_cap: usize,
    next_id: u64,
    next_date: i64,
    throttles: VecDeque<Throttle>,
    seen: Vec<Seen>,
    /// Parts per batch request.
    batches: Vec<usize>,
    refusing_refresh: bool,
    /// Top-level requests being answered now.
    in_flight: usize,
    refusals: VecDeque<Refusal>,
    /// `users.messages.send`: the raw octets of every message accepted.
    sent: Vec<Vec<u8>>,
    /// The current `historyId`.
    history_id: u64,
    /// (historyId, kind, message id, labels of the message, labels changed).
    history: Vec<HistoryRecord>,
    /// Starts before this have no history left (404).
    history_floor: u64,
    /// Top-level HTTP requests answered.
    requests: usize,
}

/// (historyId, kind, message id, labels of the message, labels changed).
type HistoryRecord = (u64, &'static str, String, Vec<String>, Vec<String>);

impl StandIn {
    /// A history record of a change to `id`.
    fn record(&mut self, kind: &'static str, id: &str, changed: Vec<String>) {
        self.history_id += 1;
        let labels = self.messages.iter().find(|m| m.id == id).map(|m| m.labels.iter().cloned().collect());
        self.history.push((self.history_id, kind, id.to_string(), labels.unwrap_or_default(), changed));
    }
}

/// A Google error for the next top-level request whose path and query
/// contain `path_contains`.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub path_contains: String,
    pub status: u16,
    pub reason: String,
    pub message: String,
}

/// Requests Gmail runs at once for a user before it answers 429 "Too many
/// concurrent requests for user".
pub const CONCURRENCY_CAP: usize = 25;

const SYSTEM_LABELS: [&str; 10] =
    ["INBOX", "SENT", "TRASH", "SPAM", "DRAFT", "UNREAD", "STARRED", "IMPORTANT", "CATEGORY_PERSONAL", "CHAT"];

pub struct GmailApi {
    /// `http://127.0.0.1:PORT`, the `api_base` to configure.
    pub base_url: String,
    state: Arc<Mutex<StandIn>>,
    /// Serving until dropped.
    _server: HttpServer,
}

impl GmailApi {
    pub fn start() -> GmailApi {
        let state = Arc::new(Mutex::new(StandIn {
            page_cap: 500,
            next_id: 0x18c2_f0a1_0000_0000,
            next_date: 1_700_000_000_000,
            history_id: 90_000,
            ..StandIn::default()
        }));
        let app = axum::Router::new().fallback(serve).with_state(state.clone());
        let server = HttpServer::start("gmail", app);
        GmailApi { base_url: format!("http://{}", server.addr), state, _server: server }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StandIn> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new valid access token.
    pub fn issue_token(&self, scope: Scope) -> String {
        let mut state = self.lock();
        let token = format!("ya29.stand-in-{}-{}", state.tokens.len() + 1, std::process::id());
        state.tokens.insert(token.clone(), scope);
        token
    }

    /// A token source for a router's refresh: each call issues a fresh token,
    /// until `refuse_refresh`.
    pub fn issuer(&self, scope: Scope) -> Arc<dyn Fn() -> Result<String, String> + Send + Sync> {
        let state = self.state.clone();
        Arc::new(move || {
            let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
            if state.refusing_refresh {
                return Err("invalid_grant: Token has been expired or revoked.".into());
            }
            let token = format!("ya29.refreshed-{}-{}", state.tokens.len() + 1, std::process::id());
            state.tokens.insert(token.clone(), scope);
            Ok(token)
        })
    }

    /// Stores a message in INBOX, received a minute after the previous one.
    pub fn add(&self, raw: &[u8]) -> String {
        let date = {
            let mut state = self.lock();
            state.next_date += 60_000;
            state.next_date
        };
        self.add_with(raw, date, &["INBOX", "UNREAD"])
    }

    /// Stores a message with this `internalDate` (ms) and these label ids.
    pub fn add_with(&self, raw: &[u8], internal_date: i64, labels: &[&str]) -> String {
        let mut state = self.lock();
        state.next_id += 0x1_2345;
        let id = format!("{:016x}", state.next_id);
        let labels = labels.iter().map(|l| l.to_string()).collect();
        state.messages.push(Message { id: id.clone(), raw: raw.to_vec(), internal_date, labels });
        state.record("messagesAdded", &id, Vec::new());
        id
    }

    /// Someone else changes a message's labels (none if it is gone).
    pub fn relabel(&self, id: &str, add: &[&str], remove: &[&str]) {
        let mut state = self.lock();
        let Some(message) = state.messages.iter_mut().find(|m| m.id == id) else { return };
        message.labels.extend(add.iter().map(|l| l.to_string()));
        for label in remove {
            message.labels.remove(*label);
        }
        let (add, remove): (Vec<String>, Vec<String>) =
            (add.iter().map(|l| l.to_string()).collect(), remove.iter().map(|l| l.to_string()).collect());
        if !add.is_empty() {
            state.record("labelsAdded", id, add);
        }
        if !remove.is_empty() {
            state.record("labelsRemoved", id, remove);
        }
    }

    /// Gmail no longer has the history so far: a start before now is 404.
    pub fn expire_history(&self) {
        let mut state = self.lock();
        state.history_floor = state.history_id + 1;
        state.history.clear();
    }

    /// Top-level HTTP requests answered so far (a batch is one).
    pub fn requests(&self) -> usize {
        self.lock().requests
    }

    /// Creates a user label; returns its id (`Label_N`).
    pub fn create_label(&self, name: &str) -> String {
        let mut state = self.lock();
        let id = format!("Label_{}", state.user_labels.len() + 1);
        state.user_labels.push((id.clone(), name.to_string()));
        id
    }

    /// The id of the user label named `name` (any case), if there is one.
    pub fn user_label(&self, name: &str) -> Option<String> {
        self.lock().user_labels.iter().find(|(_, n)| n.eq_ignore_ascii_case(name)).map(|(id, _)| id.clone())
    }

    /// The labels of a message, or `None` once it is deleted.
    pub fn labels_of(&self, id: &str) -> Option<BTreeSet<String>> {
        self.lock().messages.iter().find(|m| m.id == id).map(|m| m.labels.clone())
    }

    /// Ids of messages with this label, oldest first.
    pub fn ids_with(&self, label: &str) -> Vec<String> {
        let state = self.lock();
        let mut found: Vec<&Message> = state.messages.iter().filter(|m| m.labels.contains(label)).collect();
        found.sort_by_key(|m| (m.internal_date, m.id.clone()));
        found.into_iter().map(|m| m.id.clone()).collect()
    }

    /// Ids of every message that exists.
    pub fn all_ids(&self) -> Vec<String> {
        self.lock().messages.iter().map(|m| m.id.clone()).collect()
    }

    /// At most `n` ids per list page, whatever `maxResults` asks.
    pub fn set_page_cap(&self, n: usize) {
        self.lock().page_cap = n;
    }

    pub fn throttle(&self, throttle: Throttle) {
        self.lock().throttles.push_back(throttle);
    }

    /// The next request matching answers this Google error instead.
    pub fn refuse(&self, refusal: Refusal) {
        self.lock().refusals.push_back(refusal);
    }

    /// The messages `users.messages.send` accepted (decoded from
    /// base64url), in order. (Refuse one with `refuse` and a
    /// `path_contains` of "messages/send".)
    pub fn sent(&self) -> Vec<Vec<u8>> {
        self.lock().sent.clone()
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }

    /// Parts of each batch request so far.
    pub fn batches(&self) -> Vec<usize> {
        self.lock().batches.clone()
    }

    pub fn forget_seen(&self) {
        let mut state = self.lock();
        state.seen.clear();
        state.batches.clear();
    }
}

impl BearerApi for GmailApi {
    fn add(&self, raw: &[u8]) -> String {
        GmailApi::add(self, raw)
    }

    fn expire(&self, token: &str) {
        self.lock().tokens.remove(token);
    }

    /// From now on `issuer` fails, as with a revoked refresh token.
    fn refuse_refresh(&self) {
        self.lock().refusing_refresh = true;
    }

    fn statuses(&self) -> Vec<u16> {
        self.lock().seen.iter().map(|r| r.status).collect()
    }

    fn maildrop(&self) -> Vec<String> {
        self.ids_with("INBOX")
    }

    fn removed(&self) -> Vec<String> {
        self.ids_with("TRASH")
    }

    fn delete(&self, id: &str) {
        let mut state = self.lock();
        if state.messages.iter().any(|m| m.id == id) {
            state.record("messagesDeleted", id, Vec::new());
            state.messages.retain(|m| m.id != id);
        }
    }

    /// Gmail message ids are the UIDLs.
    fn uidl(&self, id: &str) -> String {
        id.to_string()
    }
}

/// An HTTP answer before it becomes a `Response` (batch parts need it too).
struct Answer {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn json(status: u16, value: Value) -> Answer {
        Answer {
            status,
            headers: vec![("Content-Type", "application/json; charset=UTF-8".into())],
            body: serde_json::to_vec(&value).expect("JSON"),
        }
    }

    fn empty() -> Answer {
        Answer { status: 204, headers: Vec::new(), body: Vec::new() }
    }

    fn error(status: u16, google_status: &str, reason: &str, domain: &str, message: &str) -> Answer {
        Answer::json(
            status,
            json!({ "error": {
                "code": status,
                "message": message,
                "errors": [{ "message": message, "domain": domain, "reason": reason }],
                "status": google_status,
            }}),
        )
    }

    fn unauthenticated() -> Answer {
        let mut answer = Answer::error(
            401,
            "UNAUTHENTICATED",
            "authError",
            "global",
            "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other \
             valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.",
        );
        answer.headers.push((
            "WWW-Authenticate",
            "Bearer realm=\"https://accounts.google.com/\", error=\"invalid_token\"".into(),
        ));
        answer
    }

    fn not_found() -> Answer {
        Answer::error(404, "NOT_FOUND", "notFound", "global", "Requested entity was not found.")
    }

    fn bad_request(message: &str) -> Answer {
        Answer::error(400, "INVALID_ARGUMENT", "invalidArgument", "global", message)
    }

    fn throttled(throttle: &Throttle) -> Answer {
        let mut answer = if throttle.status == 429 {
            Answer::error(
                429,
                "RESOURCE_EXHAUSTED",
                "rateLimitExceeded",
                "global",
                "Too many concurrent requests for user",
            )
        } else {
            Answer::error(
                403,
                "PERMISSION_DENIED",
                "userRateLimitExceeded",
                "usageLimits",
                "User-rate limit exceeded. Retry after 2024-01-01T00:00:01.000Z",
            )
        };
        if let Some(secs) = throttle.retry_after {
            answer.headers.push(("Retry-After", secs.to_string()));
        }
        answer
    }

    fn into_response(self) -> Response {
        let mut response = Response::builder().status(StatusCode::from_u16(self.status).expect("status"));
        for (name, value) in self.headers {
            response = response.header(name, value);
        }
        response.body(Body::from(self.body)).expect("response")
    }

    /// As the HTTP/1.1 text inside a batch part.
    fn to_http(&self) -> Vec<u8> {
        let reason = StatusCode::from_u16(self.status).ok().and_then(|s| s.canonical_reason()).unwrap_or("");
        let mut text = format!("HTTP/1.1 {} {reason}\r\n", self.status);
        for (name, value) in &self.headers {
            text.push_str(&format!("{name}: {value}\r\n"));
        }
        text.push_str(&format!("Content-Length: {}\r\n\r\n", self.body.len()));
        let mut out = text.into_bytes();
        out.extend_from_slice(&self.body);
        out
    }
}

type Shared = Arc<Mutex<StandIn>>;

async fn serve(State(state): State<Shared>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 64 * 1024 * 1024).await.unwrap_or_default();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().unwrap_or("").to_string();
    let token = bearer(&parts.headers);
    {
        let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
        state.in_flight += 1;
        state.requests += 1;
    }
    let answer = if parts.method == Method::POST && path == "/batch/gmail/v1" {
        batch(&state, token.as_deref(), &parts.headers, &body)
    } else {
        handle(&state, token.as_deref(), &parts.method, &path, &query, &body, false)
    };
    state.lock().unwrap_or_else(|p| p.into_inner()).in_flight -= 1;
    answer.into_response()
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get("authorization")?.to_str().ok()?;
    value.strip_prefix("Bearer ").map(str::to_string)
}

fn handle(
    state: &Shared,
    token: Option<&str>,
    method: &Method,
    path: &str,
    query: &str,
    body: &[u8],
    in_batch: bool,
) -> Answer {
    let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
    let answer = route(&mut state, token, method, path, query, body, in_batch);
    state.seen.push(Seen {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        at: Instant::now(),
        status: answer.status,
        immutable_ids: false,
        in_batch,
    });
    answer
}

fn route(
    state: &mut StandIn,
    token: Option<&str>,
    method: &Method,
    path: &str,
    query: &str,
    body: &[u8],
    in_batch: bool,
) -> Answer {
    let Some(scope) = token.and_then(|t| state.tokens.get(t).copied()) else {
        return Answer::unauthenticated();
    };
    let target = format!("{path}?{query}");
    if let Some(at) = state.throttles.iter().position(|t| t.in_batch == in_batch && target.contains(&t.path_contains)) {
        let throttle = state.throttles.remove(at).expect("present");
        return Answer::throttled(&throttle);
    }
    if let Some(at) = state.refusals.iter().position(|r| !in_batch && target.contains(&r.path_contains)) {
        let refusal = state.refusals.remove(at).expect("present");
        let google_status = match refusal.status {
            429 => "RESOURCE_EXHAUSTED",
            400 => "FAILED_PRECONDITION",
            _ => "PERMISSION_DENIED",
        };
        return Answer::error(refusal.status, google_status, &refusal.reason, "usageLimits", &refusal.message);
    }
    let params: HashMap<String, Vec<String>> =
        url::form_urlencoded::parse(query.as_bytes()).into_owned().fold(HashMap::new(), |mut map, (k, v)| {
            map.entry(k).or_default().push(v);
            map
        });
    let param = |name: &str| params.get(name).and_then(|v| v.first()).map(String::as_str);
    let Some(rest) = path.strip_prefix("/gmail/v1/users/me/") else {
        return Answer::not_found();
    };
    let segments: Vec<&str> = rest.split('/').collect();
    match (method.as_str(), segments.as_slice()) {
        // `users.messages.send` with a `raw` message (base64url, padded or
        // not): 200 with the sent message's id, thread and labels.
        ("POST", ["messages", "send"]) => {
            let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let Some(raw) = request["raw"].as_str() else {
                return Answer::bad_request(
                    "'raw' RFC822 payload message string or uploading message via /upload/* URL required",
                );
            };
            let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(raw.trim_end_matches('='))
                .ok()
                .filter(|m| !m.is_empty());
            let Some(mime) = decoded else {
                return Answer::bad_request("Invalid value for ByteString");
            };
            state.sent.push(mime);
            state.next_id += 1;
            let id = format!("18c{:013x}", state.next_id);
            Answer::json(200, json!({ "id": id, "threadId": id, "labelIds": ["SENT"] }))
        }
        ("GET", ["labels"]) => {
            let mut labels: Vec<Value> =
                SYSTEM_LABELS.iter().map(|l| json!({ "id": l, "name": l, "type": "system" })).collect();
            labels.extend(state.user_labels.iter().map(|(id, name)| {
                json!({ "id": id, "name": name, "type": "user", "messageListVisibility": "show",
                        "labelListVisibility": "labelShow" })
            }));
            Answer::json(200, json!({ "labels": labels }))
        }
        // `users.labels.create`: a user label; a name already taken (any
        // case, as Gmail compares) is 409.
        ("POST", ["labels"]) => {
            let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let Some(name) = request["name"].as_str().filter(|n| !n.trim().is_empty()) else {
                return Answer::bad_request("Invalid label name");
            };
            let taken = SYSTEM_LABELS.iter().any(|l| l.eq_ignore_ascii_case(name))
                || state.user_labels.iter().any(|(_, n)| n.eq_ignore_ascii_case(name));
            if taken {
                return Answer::error(
                    409,
                    "ALREADY_EXISTS",
                    "alreadyExists",
                    "global",
                    "Label name exists or conflicts",
                );
            }
            let id = format!("Label_{}", state.user_labels.len() + 1);
            state.user_labels.push((id.clone(), name.to_string()));
            Answer::json(200, json!({ "id": id, "name": name, "type": "user" }))
        }
        ("GET", ["profile"]) => Answer::json(
            200,
            json!({ "emailAddress": "alice@example.com", "messagesTotal": state.messages.len(),
                    "threadsTotal": state.messages.len(), "historyId": state.history_id.to_string() }),
        ),
        ("GET", ["history"]) => history(state, &params),
        ("GET", ["messages"]) => list(state, &params),
        ("GET", ["messages", id]) => {
            let Some(message) = state.messages.iter().find(|m| m.id == *id) else {
                return Answer::not_found();
            };
            let mut resource = json!({
                "id": message.id,
                "threadId": message.id,
                "labelIds": message.labels,
                "snippet": "Hello, this is a \"snippet\" with \"raw\":\"AAAA\" in it",
                // An estimate, as Gmail's: not the POP3 size.
                "sizeEstimate": message.raw.len() + 17,
                "historyId": state.history_id.to_string(),
                "internalDate": message.internal_date.to_string(),
            });
            match param("format").unwrap_or("full") {
                "minimal" | "metadata" => {}
                "raw" => {
                    resource["raw"] = json!(base64::engine::general_purpose::URL_SAFE.encode(&message.raw));
                    // Google escapes `=`, `<`, `>` and `/` in JSON strings: so
                    // is every other message served (they occur only inside
                    // strings, where a backslash always starts a whole escape).
                    if state.messages.iter().position(|m| m.id == *id).is_some_and(|i| i % 2 == 1) {
                        let mut answer = Answer::json(200, resource);
                        let text = String::from_utf8(answer.body).expect("JSON is UTF-8");
                        let escaped = text.replace('=', "\\u003d").replace('<', "\\u003c").replace('>', "\\u003e");
                        answer.body = escaped.replace('/', "\\/").into_bytes();
                        return answer;
                    }
                }
                other => return Answer::bad_request(&format!("format {other} is not reproduced by the stand-in")),
            }
            Answer::json(200, resource)
        }
        ("POST", ["messages", "batchModify"]) => {
            let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let ids = strings(&request["ids"]);
            if ids.is_empty() || ids.len() > 1000 {
                return Answer::bad_request("ids must hold 1 to 1000 ids");
            }
            // Unknown ids are skipped, as Gmail documents.
            let (add, remove) = (strings(&request["addLabelIds"]), strings(&request["removeLabelIds"]));
            let mut changes = Vec::new();
            for message in state.messages.iter_mut().filter(|m| ids.contains(&m.id)) {
                let added: Vec<String> = add.iter().filter(|l| message.labels.insert(l.to_string())).cloned().collect();
                let removed: Vec<String> = remove.iter().filter(|l| message.labels.remove(*l)).cloned().collect();
                changes.push((message.id.clone(), added, removed));
            }
            for (id, added, removed) in changes {
                if !added.is_empty() {
                    state.record("labelsAdded", &id, added);
                }
                if !removed.is_empty() {
                    state.record("labelsRemoved", &id, removed);
                }
            }
            Answer::empty()
        }
        ("POST", ["messages", "batchDelete"]) => {
            if scope != Scope::Full {
                return Answer::error(
                    403,
                    "PERMISSION_DENIED",
                    "insufficientPermissions",
                    "global",
                    "Request had insufficient authentication scopes.",
                );
            }
            let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let ids = strings(&request["ids"]);
            if ids.is_empty() || ids.len() > 1000 {
                return Answer::bad_request("ids must hold 1 to 1000 ids");
            }
            let known: Vec<String> =
                state.messages.iter().filter(|m| ids.contains(&m.id)).map(|m| m.id.clone()).collect();
            for id in known {
                state.record("messagesDeleted", &id, Vec::new());
            }
            state.messages.retain(|m| !ids.contains(&m.id));
            Answer::empty()
        }
        _ => Answer::not_found(),
    }
}

/// `users.history.list`: the records after `startHistoryId`, oldest
/// first, each naming the message (with its labels as they were then).
fn history(state: &StandIn, params: &HashMap<String, Vec<String>>) -> Answer {
    let param = |name: &str| params.get(name).and_then(|v| v.first()).map(String::as_str);
    let Some(start) = param("startHistoryId").and_then(|s| s.parse::<u64>().ok()) else {
        return Answer::bad_request("Missing or invalid startHistoryId");
    };
    if start < state.history_floor || start > state.history_id {
        return Answer::not_found();
    }
    let max = param("maxResults").and_then(|v| v.parse::<usize>().ok()).unwrap_or(100).clamp(1, 500);
    let offset = match param("pageToken") {
        None => 0,
        Some(token) => match token.strip_prefix("Hs").and_then(|t| t.parse().ok()) {
            Some(offset) => offset,
            None => return Answer::bad_request("Invalid pageToken"),
        },
    };
    let after: Vec<_> = state.history.iter().filter(|(id, ..)| *id > start).collect();
    let records: Vec<Value> = after
        .iter()
        .skip(offset)
        .take(max)
        .map(|(history_id, kind, id, labels, changed)| {
            let message = json!({ "id": id, "threadId": id, "labelIds": labels });
            let mut record = json!({ "id": history_id.to_string(), "messages": [{ "id": id, "threadId": id }] });
            record[*kind] = match *kind {
                "labelsAdded" | "labelsRemoved" => json!([{ "message": message, "labelIds": changed }]),
                _ => json!([{ "message": message }]),
            };
            record
        })
        .collect();
    let mut answer = json!({ "historyId": state.history_id.to_string() });
    if !records.is_empty() {
        answer["history"] = json!(records);
    }
    if offset + max < after.len() {
        answer["nextPageToken"] = json!(format!("Hs{}", offset + max));
    }
    Answer::json(200, answer)
}

fn strings(value: &Value) -> Vec<String> {
    value.as_array().map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect()).unwrap_or_default()
}

/// `users.messages.list`: newest first (internalDate, then id).
fn list(state: &StandIn, params: &HashMap<String, Vec<String>>) -> Answer {
    let label_ids = params.get("labelIds").cloned().unwrap_or_default();
    let include_spam_trash = params.get("includeSpamTrash").and_then(|v| v.first()).is_some_and(|v| v == "true");
    let query = params.get("q").and_then(|v| v.first()).cloned().unwrap_or_default();
    let mut terms = Vec::new();
    for term in query.split_whitespace() {
        // Parentheses only group: every term here is ANDed anyway.
        let term = term.trim_matches(|c| c == '(' || c == ')');
        let (negated, term) = match term.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, term),
        };
        let Some((key, value)) = term.split_once(':') else {
            return Answer::bad_request(&format!("the stand-in does not reproduce the query term {term:?}"));
        };
        match key {
            "label" | "in" => {
                let id = state
                    .user_labels
                    .iter()
                    .find(|(_, name)| name.eq_ignore_ascii_case(value))
                    .map(|(id, _)| id.clone())
                    .unwrap_or_else(|| value.to_ascii_uppercase());
                terms.push((negated, true, id));
            }
            "subject" => terms.push((negated, false, value.to_ascii_lowercase())),
            _ => return Answer::bad_request(&format!("the stand-in does not reproduce the query term {term:?}")),
        }
    }
    let max = params
        .get("maxResults")
        .and_then(|v| v.first())
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(100)
        .clamp(1, 500)
        .min(state.page_cap);
    let offset = match params.get("pageToken").and_then(|v| v.first()) {
        None => 0,
        Some(token) => match token.strip_prefix("CgP").and_then(|t| usize::from_str_radix(t, 16).ok()) {
            Some(offset) => offset,
            None => return Answer::bad_request("Invalid pageToken"),
        },
    };
    let mut matching: Vec<&Message> = state
        .messages
        .iter()
        .filter(|m| include_spam_trash || !(m.labels.contains("TRASH") || m.labels.contains("SPAM")))
        .filter(|m| label_ids.iter().all(|l| m.labels.contains(l)))
        .filter(|m| {
            terms.iter().all(|(negated, is_label, value)| {
                let matches = if *is_label {
                    m.labels.contains(value)
                } else {
                    subject(&m.raw).to_ascii_lowercase().contains(value.as_str())
                };
                matches != *negated
            })
        })
        .collect();
    matching.sort_by(|a, b| b.internal_date.cmp(&a.internal_date).then_with(|| b.id.cmp(&a.id)));
    let page: Vec<Value> =
        matching.iter().skip(offset).take(max).map(|m| json!({ "id": m.id, "threadId": m.id })).collect();
    let mut answer = json!({ "resultSizeEstimate": matching.len() });
    if !page.is_empty() {
        answer["messages"] = json!(page);
    }
    if offset + max < matching.len() {
        answer["nextPageToken"] = json!(format!("CgP{:x}", offset + max));
    }
    Answer::json(200, answer)
}

fn subject(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw)
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .find_map(|l| l.strip_prefix("Subject:").map(|s| s.trim().to_string()))
        .unwrap_or_default()
}

/// `POST /batch/gmail/v1`: each part an HTTP request, answered in a part
/// named after its Content-ID.
fn batch(state: &Shared, token: Option<&str>, headers: &HeaderMap, body: &[u8]) -> Answer {
    if token.is_none_or(|t| !state.lock().unwrap_or_else(|p| p.into_inner()).tokens.contains_key(t)) {
        return Answer::unauthenticated();
    }
    let content_type = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
    let Some(boundary) = content_type.split("boundary=").nth(1).map(|b| b.trim_matches('"').to_string()) else {
        return Answer::bad_request("a batch request must be multipart/mixed with a boundary");
    };
    let text = String::from_utf8_lossy(body).to_string();
    let delimiter = format!("--{boundary}");
    let mut requests = Vec::new();
    for part in text.split(&delimiter).skip(1) {
        if part.starts_with("--") {
            break;
        }
        let Some((part_headers, http)) = part.trim_start_matches("\r\n").split_once("\r\n\r\n") else {
            return Answer::bad_request("a batch part without headers");
        };
        let content_id = part_headers
            .lines()
            .find_map(|l| l.strip_prefix("Content-ID:").or_else(|| l.strip_prefix("Content-Id:")))
            .map(|v| v.trim().trim_matches(|c| c == '<' || c == '>').to_string())
            .unwrap_or_else(|| format!("generated-{}", requests.len()));
        let request_line = http.lines().next().unwrap_or("");
        let mut words = request_line.split_whitespace();
        let (Some(method), Some(target)) = (words.next(), words.next()) else {
            return Answer::bad_request("a batch part without a request line");
        };
        requests.push((content_id, method.to_string(), target.to_string()));
    }
    if requests.is_empty() || requests.len() > 100 {
        return Answer::bad_request("a batch holds 1 to 100 requests");
    }
    // The batch's parts run at once, beside every other request in flight
    // (this batch counted once already): those beyond the cap are refused.
    let room = {
        let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
        state.batches.push(requests.len());
        CONCURRENCY_CAP.saturating_sub(state.in_flight - 1)
    };
    let reply_boundary = "batch_Zx9bYAhcQ6kAAEAc7ERnGU";
    let mut out = Vec::new();
    // Google answers in any order: answer in reverse, the Content-IDs pair them.
    for (index, (content_id, method, target)) in requests.iter().enumerate().rev() {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let method = Method::from_bytes(method.as_bytes()).unwrap_or(Method::GET);
        let answer = if index >= room {
            let answer = Answer::error(
                429,
                "RESOURCE_EXHAUSTED",
                "rateLimitExceeded",
                "global",
                "Too many concurrent requests for user",
            );
            let mut seen = state.lock().unwrap_or_else(|p| p.into_inner());
            seen.seen.push(Seen {
                method: method.to_string(),
                path: path.to_string(),
                query: query.to_string(),
                at: Instant::now(),
                status: 429,
                immutable_ids: false,
                in_batch: true,
            });
            answer
        } else {
            handle(state, token, &method, path, query, b"", true)
        };
        out.extend_from_slice(
            format!(
                "--{reply_boundary}\r\nContent-Type: application/http\r\nContent-ID: <response-{content_id}>\r\n\r\n"
            )
            .as_bytes(),
        );
        out.extend_from_slice(&answer.to_http());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{reply_boundary}--\r\n").as_bytes());
    Answer {
        status: 200,
        headers: vec![("Content-Type", format!("multipart/mixed; boundary={reply_boundary}"))],
        body: out,
    }
}
