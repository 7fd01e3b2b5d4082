//! JMAP over HTTP (RFC 8620): the session resource, API requests, blob
//! downloads, and the translation of every HTTP and JMAP failure into a
//! `BackendError`. The requests themselves go through the shared HTTP layer
//! (`http::Requester`, `http::api::AccountApi`): its time limits, its
//! retries of 429/503 after `Retry-After`, its request permits.
//!
//! It knows nothing of mailboxes or POP3: `mod.rs` builds the method calls.
//! It never puts a credential in a log line or an error message: the
//! Authorization header is built from the `Secret` at the last moment and is
//! marked sensitive, and URLs never carry credentials (config refuses them).

use std::fmt::Write as _;
use std::sync::Arc;

use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use url::Url;

use crate::backend::MessageStream;
use crate::backend::http::api::AccountApi;
use crate::backend::http::{self, Requester, Verdict};
use crate::mail::{BackendError, Secret};

/// The capabilities every request declares.
pub const USING: [&str; 2] = ["urn:ietf:params:jmap:core", "urn:ietf:params:jmap:mail"];
const CORE: &str = "urn:ietf:params:jmap:core";
const MAIL: &str = "urn:ietf:params:jmap:mail";

/// How requests prove who they are for.
pub enum Auth {
    /// RFC 7617 Basic with the POP3 user name and password.
    Basic { user: String, password: Secret },
    /// RFC 6750 Bearer with the POP3 password as the token.
    Bearer(Secret),
}

impl Auth {
    /// The `Authorization` header, marked sensitive.
    fn header(&self) -> HeaderValue {
        match self {
            Auth::Basic { user, password } => http::basic_header(user, password),
            Auth::Bearer(token) => http::bearer_header(token),
        }
    }
}

/// A session resource is a small JSON object; one this large is not one.
const SESSION_LIMIT: usize = 4 * 1024 * 1024;
/// API responses are read only this far: a listing request carries up to
/// `maxCallsInRequest / 2` pages of up to 4096 emails' ids, blob ids and
/// sizes, a few MB at most.
const RESPONSE_LIMIT: usize = 64 * 1024 * 1024;

/// The limits from the session's core capability that shape our requests.
/// Defaults are used only when a server leaves one out (RFC 8620 makes them
/// mandatory), and are small enough for any server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    pub max_objects_in_get: usize,
    pub max_objects_in_set: usize,
    pub max_calls_in_request: usize,
    pub max_concurrent_requests: usize,
    pub max_size_request: usize,
}

impl ServerLimits {
    fn from_core(core: Option<&Value>) -> Self {
        let get = |key: &str, default: usize| {
            core.and_then(|c| c.get(key))
                .and_then(Value::as_u64)
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX).max(1))
                .unwrap_or(default)
        };
        ServerLimits {
            max_objects_in_get: get("maxObjectsInGet", 500),
            max_objects_in_set: get("maxObjectsInSet", 500),
            max_calls_in_request: get("maxCallsInRequest", 16),
            max_concurrent_requests: get("maxConcurrentRequests", 4),
            max_size_request: get("maxSizeRequest", 10_000_000),
        }
    }
}

/// What a session resource tells us, with its URLs made absolute.
#[derive(Debug, Clone)]
pub struct Session {
    pub api_url: Url,
    /// The downloadUrl template, unexpanded: resolved only after expansion,
    /// because resolving would percent-encode its braces.
    pub download_template: String,
    /// Where the session resource was finally found (after redirects): the
    /// base relative URLs are resolved against.
    pub session_url: Url,
    pub account_id: String,
    pub limits: ServerLimits,
}

impl Session {
    /// Reads a session resource (RFC 8620 §2) fetched from `session_url`.
    pub fn parse(session_url: Url, body: &Value) -> Result<Session, String> {
        let string = |key: &str| body.get(key).and_then(Value::as_str).ok_or_else(|| format!("no `{key}`"));
        let capabilities = body.get("capabilities").ok_or("no `capabilities`")?;
        if capabilities.get(MAIL).is_none() {
            return Err(format!("the server does not offer {MAIL}"));
        }
        let api_url = session_url.join(string("apiUrl")?).map_err(|e| format!("bad apiUrl: {e}"))?;
        let download_template = string("downloadUrl")?.to_string();
        for variable in ["{accountId}", "{blobId}"] {
            if !download_template.contains(variable) {
                return Err(format!("downloadUrl lacks {variable}"));
            }
        }
        let account_id = body
            .get("primaryAccounts")
            .and_then(|p| p.get(MAIL))
            .and_then(Value::as_str)
            .ok_or("no primary account for mail")?
            .to_string();
        let session = Session {
            api_url,
            download_template,
            limits: ServerLimits::from_core(capabilities.get(CORE)),
            session_url,
            account_id,
        };
        // Only HTTP(S) is ever fetched: anything else in these URLs would
        // fail later, at the first download, looking like an outage.
        let sample = session.download_url("G1").map_err(|e| e.to_string())?;
        for (what, url) in [("apiUrl", &session.api_url), ("downloadUrl", &sample)] {
            if !matches!(url.scheme(), "http" | "https") {
                return Err(format!("{what} is not an http(s) URL: scheme {:?}", url.scheme()));
            }
        }
        // The blob id goes into the path or query, never the host: else a
        // blob id would choose where popgate sends its credentials.
        let other = session.download_url("G2").map_err(|e| e.to_string())?;
        if other.origin() != sample.origin() {
            return Err("downloadUrl puts {blobId} in the host or port".into());
        }
        Ok(session)
    }

    /// The absolute URL of a blob, as `application/octet-stream` named
    /// `message.eml` (RFC 8620 §6.2; a level-1 URI template).
    pub fn download_url(&self, blob_id: &str) -> Result<Url, BackendError> {
        let expanded = expand_template(
            &self.download_template,
            &[
                ("accountId", &self.account_id),
                ("blobId", blob_id),
                ("type", "application/octet-stream"),
                ("name", "message.eml"),
            ],
        );
        self.session_url
            .join(&expanded)
            .map_err(|e| BackendError::Permanent(format!("downloadUrl does not expand to a URL: {e}")))
    }
}

/// RFC 6570 simple string expansion: every value is percent-encoded except
/// the unreserved characters. Unknown variables expand to nothing.
pub fn expand_template(template: &str, values: &[(&str, &str)]) -> String {
    use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
    const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');
    let mut out = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else { break };
        out.push_str(&rest[..open]);
        let name = &rest[open + 1..open + close];
        if let Some((_, value)) = values.iter().find(|(n, _)| *n == name) {
            let _ = write!(out, "{}", utf8_percent_encode(value, UNRESERVED));
        }
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    out
}

/// GETs and parses the session resource. `requester` follows redirects
/// (session discovery through `/.well-known/jmap`).
pub async fn session(requester: &Requester, url: &Url, auth: &Auth) -> Result<Session, BackendError> {
    let what = "session";
    let build = || requester.client.get(url.clone()).header(AUTHORIZATION, auth.header()).timeout(requester.timeout);
    let response = requester.send(what, build, |status, body| judge(what, status, body)).await?;
    let session_url = response.url().clone();
    let body = http::read_limited(response, SESSION_LIMIT, requester.timeout).await?;
    let body: Value = serde_json::from_slice(&body).map_err(|_| {
        tracing::warn!(url = %session_url, "the JMAP session resource is not JSON");
        BackendError::Permanent(format!("session resource at {session_url} is not JSON"))
    })?;
    Session::parse(session_url.clone(), &body).map_err(|why| {
        tracing::warn!(url = %session_url, why, "unusable JMAP session resource");
        BackendError::Permanent(format!("unusable JMAP session resource: {why}"))
    })
}

/// An authenticated JMAP session: API calls and downloads for one account.
pub struct Api {
    /// Its permits are shared by every POP3 session of this user, so that
    /// together they never exceed the server's `maxConcurrentRequests`.
    account: AccountApi,
    pub session: Session,
}

/// One method call: name, arguments, call id.
pub type Invocation = (&'static str, Value, String);

/// The method responses of one request, in order.
#[derive(Debug)]
pub struct Responses(Vec<(String, Value, String)>);

impl Api {
    pub fn new(requester: Requester, auth: &Auth, session: Session, permits: Arc<Semaphore>) -> Api {
        Api { account: AccountApi::new(requester, auth.header(), permits, judge), session }
    }

    pub fn account_id(&self) -> &str {
        &self.session.account_id
    }

    pub fn limits(&self) -> ServerLimits {
        self.session.limits
    }

    /// Sends one API request (RFC 8620 §3.3) and returns its responses.
    pub async fn call(&self, calls: Vec<Invocation>) -> Result<Responses, BackendError> {
        let body = json!({ "using": USING, "methodCalls": calls });
        let body = serde_json::to_vec(&body).map_err(|e| BackendError::Permanent(format!("JSON: {e}")))?;
        if body.len() > self.session.limits.max_size_request {
            // Callers size their batches; reaching this is a bug, not the
            // server's fault.
            return Err(BackendError::Permanent(format!(
                "request of {} octets exceeds the server's maxSizeRequest ({})",
                body.len(),
                self.session.limits.max_size_request
            )));
        }
        let body = bytes::Bytes::from(body);
        let build =
            || self.account.post(&self.session.api_url).header(CONTENT_TYPE, "application/json").body(body.clone());
        let value: Value = self.account.json("API request", RESPONSE_LIMIT, build).await?;
        Responses::from_reply(value)
    }

    /// Streams a blob's octets. Memory stays bounded whatever its size: the
    /// body is passed on chunk by chunk as it arrives.
    /// Downloads take no request permit: `maxConcurrentRequests` counts
    /// API requests, and a slow POP3 client must not hold one up.
    pub async fn download(&self, blob_id: &str) -> Result<MessageStream<'static>, BackendError> {
        let what = "download";
        let url = self.session.download_url(blob_id)?;
        // Only the wait for the headers is bounded as a whole; the body's
        // reads are bounded one by one (`read_timeout`), however large it is.
        let judge_download = |status, body: &[u8]| match status {
            StatusCode::NOT_FOUND | StatusCode::GONE => Verdict::Fail(BackendError::MessageGone),
            status => judge(what, status, body),
        };
        let response = self.account.requester.send(what, || self.account.get(&url), judge_download).await?;
        Ok(http::api::body_stream(what, response))
    }
}

impl Responses {
    /// The method responses of an API reply (RFC 8620 §3.4): anything
    /// without a well-formed `methodResponses` is the server's trouble.
    pub fn from_reply(mut reply: Value) -> Result<Responses, BackendError> {
        reply
            .get_mut("methodResponses")
            .map(Value::take)
            .and_then(|r| serde_json::from_value::<Vec<(String, Value, String)>>(r).ok())
            .map(Responses)
            .ok_or_else(|| BackendError::unavailable("API response without methodResponses"))
    }

    /// The type of the method-level error answering `call_id`, if it is one
    /// (e.g. `cannotCalculateChanges`, which is no failure but a request to
    /// start over).
    pub fn error_type(&self, call_id: &str) -> Option<&str> {
        let (name, arguments, _) = self.0.iter().find(|(_, _, id)| id == call_id)?;
        (name == "error").then(|| arguments.get("type").and_then(Value::as_str).unwrap_or("(no type)"))
    }

    /// The arguments of the response to `call_id`; a method-level error
    /// (`["error", {"type": …}, id]`) becomes a `BackendError`.
    pub fn get(&self, call_id: &str, method: &str) -> Result<&Value, BackendError> {
        let (name, arguments, _) = self
            .0
            .iter()
            .find(|(_, _, id)| id == call_id)
            .ok_or_else(|| BackendError::unavailable(format!("{method}: no response to call {call_id}")))?;
        if name == "error" {
            return Err(method_error(method, arguments));
        }
        if name != method {
            return Err(BackendError::unavailable(format!("{method}: unexpected response {name}")));
        }
        Ok(arguments)
    }
}

/// Maps a JMAP method-level error (RFC 8620 §3.6.2) and logs its type.
pub fn method_error(method: &str, error: &Value) -> BackendError {
    let kind = error.get("type").and_then(Value::as_str).unwrap_or("(no type)");
    let description = error.get("description").and_then(Value::as_str).unwrap_or("");
    tracing::warn!(method, jmap_error = kind, description, "JMAP method failed");
    match kind {
        // The server's own trouble: worth trying again later.
        "serverUnavailable" | "serverFail" | "serverPartialFail" | "rateLimit" => {
            BackendError::Unavailable(format!("{method}: {kind}"))
        }
        // accountNotFound, forbidden, invalidArguments, unknownMethod, …:
        // the same request would fail the same way.
        _ => BackendError::Permanent(format!("{method}: {kind}")),
    }
}

/// What a failed answer means: throttling (429) and a server briefly down
/// (503) are retried by the shared requester, after `Retry-After` when the
/// server says; anything else is mapped by `status_error`. A request-level
/// error (RFC 8620 §3.6.1) is a problem-details JSON object, read for its
/// type.
fn judge(what: &str, status: StatusCode, body: &[u8]) -> Verdict {
    match status {
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => Verdict::Retry,
        StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => {
            let problem = serde_json::from_slice::<Value>(body).ok();
            Verdict::Fail(status_error(what, status, problem.as_ref()))
        }
        status => Verdict::Fail(status_error(what, status, None)),
    }
}

/// Maps an HTTP status that is not success.
fn status_error(what: &str, status: StatusCode, problem: Option<&Value>) -> BackendError {
    match status {
        StatusCode::UNAUTHORIZED => BackendError::AuthFailed,
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
            tracing::warn!(what, status = status.as_u16(), "JMAP server is throttling or down");
            BackendError::Unavailable(format!("{what}: HTTP {status}"))
        }
        _ => {
            if let Some(problem) = problem {
                let kind = problem.get("type").and_then(Value::as_str).unwrap_or("(no type)");
                let detail = problem.get("detail").and_then(Value::as_str).unwrap_or("");
                let limit = problem.get("limit").and_then(Value::as_str).unwrap_or("");
                tracing::warn!(
                    what,
                    status = status.as_u16(),
                    jmap_error = kind,
                    detail,
                    limit,
                    "JMAP request refused"
                );
                // A limit (e.g. too many concurrent requests) passes; the
                // other request-level errors would recur.
                if kind.ends_with(":limit") {
                    return BackendError::Unavailable(format!("{what}: {kind} {limit}"));
                }
                return BackendError::Permanent(format!("{what}: {kind}"));
            }
            if status.is_server_error() {
                BackendError::Unavailable(format!("{what}: HTTP {status}"))
            } else {
                tracing::warn!(what, status = status.as_u16(), "JMAP server refused the request");
                BackendError::Permanent(format!("{what}: HTTP {status}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_expand_percent_encoded() {
        let template = "/jmap/download/{accountId}/{blobId}/{name}?accept={type}";
        let values = [("accountId", "a b"), ("blobId", "G1/2"), ("name", "message.eml"), ("type", "application/x")];
        assert_eq!(
            expand_template(template, &values),
            "/jmap/download/a%20b/G1%2F2/message.eml?accept=application%2Fx"
        );
        assert_eq!(expand_template("x{unknown}y{", &values), "xy{");
    }

    #[test]
    fn cyrus_session_resolves_against_the_session_url() {
        let body = json!({
            "apiUrl": "/jmap/",
            "downloadUrl": "/jmap/download/{accountId}/{blobId}/{name}?accept={type}",
            "capabilities": {
                "urn:ietf:params:jmap:core": { "maxObjectsInGet": 4096, "maxCallsInRequest": 50,
                    "maxConcurrentRequests": 5, "maxSizeRequest": 10485760, "maxObjectsInSet": 4096 },
                "urn:ietf:params:jmap:mail": {}
            },
            "primaryAccounts": { "urn:ietf:params:jmap:mail": "alice" }
        });
        let session = Session::parse(Url::parse("http://127.0.0.1:8080/jmap").unwrap(), &body).unwrap();
        assert_eq!(session.api_url.as_str(), "http://127.0.0.1:8080/jmap/");
        assert_eq!(session.account_id, "alice");
        assert_eq!(session.limits.max_objects_in_get, 4096);
        assert_eq!(session.limits.max_concurrent_requests, 5);
        assert_eq!(
            session.download_url("Gabc").unwrap().as_str(),
            "http://127.0.0.1:8080/jmap/download/alice/Gabc/message.eml?accept=application%2Foctet-stream"
        );
    }

    #[test]
    fn unusable_sessions_are_explained() {
        let url = Url::parse("https://example.com/jmap").unwrap();
        let no_mail = json!({ "apiUrl": "/a", "downloadUrl": "/d/{accountId}/{blobId}", "capabilities": {} });
        assert!(Session::parse(url.clone(), &no_mail).unwrap_err().contains("jmap:mail"));
        let no_account = json!({ "apiUrl": "/a", "downloadUrl": "/d/{accountId}/{blobId}",
            "capabilities": { "urn:ietf:params:jmap:mail": {} }, "primaryAccounts": {} });
        assert!(Session::parse(url.clone(), &no_account).unwrap_err().contains("primary account"));
        let bad_template = json!({ "apiUrl": "/a", "downloadUrl": "/d/{accountId}",
            "capabilities": { "urn:ietf:params:jmap:mail": {} }, "primaryAccounts": { "urn:ietf:params:jmap:mail": "x" } });
        assert!(Session::parse(url.clone(), &bad_template).unwrap_err().contains("blobId"));
        // Found by the jmap_replies fuzz target: a download URL popgate
        // could never fetch was accepted, to fail at the first RETR.
        let not_http = json!({ "apiUrl": "/a", "downloadUrl": "h4tps://example.com/d/{accountId}/{blobId}",
            "capabilities": { "urn:ietf:params:jmap:mail": {} }, "primaryAccounts": { "urn:ietf:params:jmap:mail": "x" } });
        assert!(Session::parse(url.clone(), &not_http).unwrap_err().contains("downloadUrl is not an http(s) URL"));
        // Found by the jmap_replies fuzz target: {blobId} in the host let a
        // blob id choose where the download (and its credentials) went.
        let blob_host = json!({ "apiUrl": "/a", "downloadUrl": "https://d{blobId}.example.com/{accountId}",
            "capabilities": { "urn:ietf:params:jmap:mail": {} }, "primaryAccounts": { "urn:ietf:params:jmap:mail": "x" } });
        assert!(Session::parse(url, &blob_host).unwrap_err().contains("{blobId} in the host"));
    }

    #[test]
    fn missing_limits_get_safe_defaults() {
        let limits = ServerLimits::from_core(Some(&json!({ "maxObjectsInGet": 0, "maxCallsInRequest": 2 })));
        assert_eq!(limits.max_objects_in_get, 1);
        assert_eq!(limits.max_calls_in_request, 2);
        assert_eq!(limits.max_objects_in_set, 500);
    }

    #[test]
    fn errors_map_to_pop3_meaning() {
        let transient = method_error("Email/get", &json!({ "type": "serverUnavailable" }));
        assert!(matches!(transient, BackendError::Unavailable(_)), "{transient:?}");
        let permanent = method_error("Email/get", &json!({ "type": "accountNotFound" }));
        assert!(matches!(permanent, BackendError::Permanent(ref m) if m.contains("accountNotFound")), "{permanent:?}");
        assert!(matches!(status_error("x", StatusCode::UNAUTHORIZED, None), BackendError::AuthFailed));
        for status in [StatusCode::TOO_MANY_REQUESTS, StatusCode::SERVICE_UNAVAILABLE, StatusCode::BAD_GATEWAY] {
            assert!(matches!(status_error("x", status, None), BackendError::Unavailable(_)), "{status}");
        }
        assert!(matches!(status_error("x", StatusCode::FORBIDDEN, None), BackendError::Permanent(_)));
        let limit = json!({ "type": "urn:ietf:params:jmap:error:limit", "limit": "maxConcurrentRequests" });
        let e = status_error("x", StatusCode::BAD_REQUEST, Some(&limit));
        assert!(matches!(e, BackendError::Unavailable(ref m) if m.contains("maxConcurrentRequests")), "{e:?}");
        let not_json = json!({ "type": "urn:ietf:params:jmap:error:notJSON" });
        let e = status_error("x", StatusCode::BAD_REQUEST, Some(&not_json));
        assert!(matches!(e, BackendError::Permanent(_)), "{e:?}");
    }
}
