//! What the HTTP mail backends (JMAP, the Gmail API, Microsoft Graph) share:
//! the TLS setup (ring as the one crypto provider), the client's timeouts,
//! the mapping of transport failures, per-account request limits, retries
//! of throttled requests that honour `Retry-After`, bounded body reads and
//! measuring many messages with bounded concurrency.
//!
//! Nothing here knows a provider's URLs or error bodies: each backend judges
//! its own failures (`Verdict`). Nothing here ever formats a credential: the
//! Authorization header is built from a `Secret` at the last moment and
//! marked sensitive, and URLs never carry credentials. `api` holds what one
//! account's requests share (Authorization, permits, JSON, downloads).

pub mod api;
pub mod listing;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use tokio::sync::Semaphore;
use url::Url;

use super::MessageStream;
use crate::mail::{BackendError, Secret};

/// TLS for HTTPS: ring as the one crypto provider; the system's trust
/// store plus the configured CA file (`trust`).
pub fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, BackendError> {
    let roots = super::trust::roots(ca_file).map_err(BackendError::Permanent)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| BackendError::Permanent(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// An HTTP/1.1 client over `tls_config`. `timeout` bounds connecting and
/// every single read, so a stalled download ends even though a message body
/// as a whole may take longer.
pub fn client(
    ca_file: Option<&Path>,
    timeout: Duration,
    redirects: reqwest::redirect::Policy,
) -> Result<reqwest::Client, BackendError> {
    reqwest::Client::builder()
        .use_preconfigured_tls(tls_config(ca_file)?)
        .http1_only()
        .connect_timeout(timeout)
        .read_timeout(timeout)
        .redirect(redirects)
        .user_agent(concat!("popgate/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| BackendError::Permanent(format!("cannot build the HTTP client: {}", chain(&e))))
}

/// A URL a backend may send credentials to: http(s), a host, and no
/// credentials of its own (every client logs in with its own).
pub fn server_url(text: &str) -> Result<Url, String> {
    let url = Url::parse(text).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("the scheme must be http or https".into());
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("missing host".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("credentials do not belong in the URL; clients log in with their own".into());
    }
    Ok(url)
}

/// An API base URL: a `server_url` that paths are appended to, so without
/// query or fragment.
pub fn api_base(text: &str) -> Result<Url, String> {
    let url = server_url(text)?;
    if url.query().is_some() || url.fragment().is_some() {
        return Err("no query or fragment, please".into());
    }
    Ok(url)
}

/// Network trouble and timeouts: transient.
pub fn transport_error(what: &str, error: &reqwest::Error) -> BackendError {
    if error.is_timeout() {
        return BackendError::Unavailable(format!("{what}: timed out"));
    }
    BackendError::Unavailable(format!("{what}: {}", chain(error)))
}

/// An error with its causes ("error sending request: connection refused"):
/// reqwest's own message alone rarely says what went wrong.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

/// Checks an OAuth access token can go in an `Authorization: Bearer` header
/// (RFC 6750 b64token: visible ASCII only).
pub fn bearer_token(token: &Secret) -> Result<Secret, BackendError> {
    let value = token.expose();
    if value.is_empty() || !value.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(BackendError::BadCredentials("the access token has characters a header cannot carry"));
    }
    Ok(token.clone())
}

/// The `Authorization` header for a bearer token, marked sensitive (never
/// shown by reqwest's or hyper's debug output).
pub fn bearer_header(token: &Secret) -> reqwest::header::HeaderValue {
    let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", token.expose()))
        .unwrap_or_else(|_| reqwest::header::HeaderValue::from_static("Bearer -"));
    value.set_sensitive(true);
    value
}

/// The `Authorization` header for RFC 7617 Basic, marked sensitive like
/// `bearer_header`.
pub fn basic_header(user: &str, password: &Secret) -> reqwest::header::HeaderValue {
    use base64::Engine as _;
    let pair = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{}", password.expose()));
    let mut value = reqwest::header::HeaderValue::from_str(&format!("Basic {pair}"))
        .unwrap_or_else(|_| reqwest::header::HeaderValue::from_static("Basic -"));
    value.set_sensitive(true);
    value
}

/// Readiness: the API answers at all (any HTTP status will do; no
/// credentials are sent).
pub async fn probe(requester: &Requester, url: &Url) -> Result<(), BackendError> {
    let request = requester.client.get(url.clone()).timeout(requester.timeout.min(Duration::from_secs(5)));
    request.send().await.map(|_| ()).map_err(|e| transport_error("probe", &e))
}

/// Request permits per account, shared by all of that account's POP3
/// sessions, so that together they stay under a provider's concurrency
/// limit. An entry lives as long as some session holds it.
#[derive(Default)]
pub struct AccountPermits {
    by_account: Mutex<HashMap<String, Weak<Semaphore>>>,
}

impl AccountPermits {
    pub fn new() -> Self {
        AccountPermits::default()
    }

    pub fn for_account(&self, account: &str, limit: usize) -> Arc<Semaphore> {
        let mut map = self.by_account.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(shared) = map.get(account).and_then(Weak::upgrade) {
            return shared;
        }
        map.retain(|_, weak| weak.strong_count() > 0);
        let shared = Arc::new(Semaphore::new(limit.max(1)));
        map.insert(account.to_string(), Arc::downgrade(&shared));
        shared
    }
}

/// How throttled requests are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub retries: u32,
    /// The longest single wait. A server asking for more (`Retry-After`)
    /// gets no retry: the POP3 client is told to come back later instead.
    pub max_wait: Duration,
}

impl RetryPolicy {
    /// The wait before retry number `attempt` (0-based) when the server did
    /// not say: 1 s, 2 s, 4 s, … plus up to 50 % jitter, at most `max_wait`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let base = Duration::from_millis(1000u64.saturating_mul(1 << attempt.min(10)));
        let jitter = base.mul_f64(f64::from(random_u32() % 500) / 1000.0);
        (base + jitter).min(self.max_wait)
    }
}

fn random_u32() -> u32 {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 4];
    // Jitter only: a failure of the system RNG just means no jitter.
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    u32::from_le_bytes(bytes)
}

/// `bytes` random octets in lowercase hex (multipart boundaries).
pub fn random_hex(bytes: usize) -> String {
    use ring::rand::SecureRandom;
    let mut random = vec![0u8; bytes];
    // Uniqueness, not secrecy: on an RNG failure the zeros still work for
    // boundaries, which must only differ from the content they enclose.
    let _ = ring::rand::SystemRandom::new().fill(&mut random);
    random.iter().fold(String::with_capacity(2 * bytes), |mut hex, byte| {
        let _ = write!(hex, "{byte:02x}");
        hex
    })
}

/// `Retry-After` in delta-seconds (RFC 9110 §10.2.3; both Google and
/// Microsoft send seconds). An HTTP-date is not understood and yields
/// `None`: the exponential backoff applies instead.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    value.parse::<u64>().ok().map(Duration::from_secs)
}

/// What a backend makes of a failed response.
#[derive(Debug)]
pub enum Verdict {
    /// Throttled or briefly down: wait (`Retry-After`, else backoff) and retry.
    Retry,
    /// Throttled, and the body says how long (Gmail writes "Retry after
    /// <RFC 3339 time>" in its message): that wait, whatever `Retry-After`.
    RetryAfter(Duration),
    /// Give up with this error.
    Fail(BackendError),
}

/// Where holds are shared with other replicas: the server plugs the shared
/// state store in (`share_holds`), so that a refusal seen by one replica
/// holds off all; the backends never see the store itself.
#[async_trait::async_trait]
pub trait SharedHolds: Send + Sync {
    async fn publish(&self, account: &str, until: std::time::SystemTime);
    async fn until(&self, account: &str) -> Option<std::time::SystemTime>;
}

static SHARED_HOLDS: std::sync::OnceLock<Arc<dyn SharedHolds>> = std::sync::OnceLock::new();

/// Shares every process's holds through `shared` (set once, at start-up).
pub fn share_holds(shared: Arc<dyn SharedHolds>) {
    let _ = SHARED_HOLDS.set(shared);
}

/// Accounts a provider asked not to hear from for longer than a retry may
/// wait (`max_retry_wait_secs`): until then every request of that account
/// fails at once with `Unavailable` instead of reaching the provider, which
/// would only lengthen the penalty. Shared with the other replicas when a
/// shared state store is configured (`share_holds`).
#[derive(Clone)]
pub struct Holds {
    until: moka::sync::Cache<String, std::time::SystemTime>,
}

impl Default for Holds {
    fn default() -> Self {
        // A day at most: Gmail's longest throttles (sending and bandwidth
        // limits) last hours.
        Holds {
            until: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(24 * 3600))
                .build(),
        }
    }
}

impl Holds {
    pub fn new() -> Self {
        Holds::default()
    }

    /// Remembers that `account` may not call before `wait` has passed.
    pub fn hold(&self, account: &str, wait: Duration) {
        let until = std::time::SystemTime::now() + wait.min(Duration::from_secs(24 * 3600));
        let later = self.until.get(account).is_none_or(|known| known < until);
        if later {
            self.until.insert(account.to_string(), until);
            if let (Some(shared), Ok(runtime)) = (SHARED_HOLDS.get(), tokio::runtime::Handle::try_current()) {
                let (shared, account) = (shared.clone(), account.to_string());
                runtime.spawn(async move { shared.publish(&account, until).await });
            }
        }
    }

    /// Like `remaining`, and asks the other replicas when this one knows of
    /// no hold.
    pub async fn remaining_shared(&self, account: &str) -> Option<Duration> {
        if let Some(left) = self.remaining(account) {
            return Some(left);
        }
        let until = SHARED_HOLDS.get()?.until(account).await?;
        let left = until.duration_since(std::time::SystemTime::now()).ok().filter(|l| !l.is_zero())?;
        self.until.insert(account.to_string(), until);
        Some(left)
    }

    /// How long `account` must still wait, if at all.
    pub fn remaining(&self, account: &str) -> Option<Duration> {
        let until = self.until.get(account)?;
        match until.duration_since(std::time::SystemTime::now()) {
            Ok(left) if !left.is_zero() => Some(left),
            _ => {
                self.until.invalidate(account);
                None
            }
        }
    }
}

/// One of an account's concurrent-request places, held across replicas
/// (`SharedSlots`); given back when the request ends.
#[async_trait::async_trait]
pub trait SlotLease: Send + Sync {
    async fn give_back(self: Box<Self>);
}

/// Where an account's concurrent requests are counted with the other
/// replicas (Outlook allows 4 per app and mailbox, whichever replica sends
/// them): the server plugs the shared state store in (`share_slots`); the
/// backends never see the store itself.
#[async_trait::async_trait]
pub trait SharedSlots: Send + Sync {
    /// One of `slots` places under `key`, held at most `ttl` (a replica that
    /// dies gives its places back by expiry): `Ok(None)` while all are
    /// taken, `Err(())` when the store cannot say.
    async fn take(&self, key: &str, slots: usize, ttl: Duration) -> Result<Option<Box<dyn SlotLease>>, ()>;
}

static SHARED_SLOTS: std::sync::OnceLock<Arc<dyn SharedSlots>> = std::sync::OnceLock::new();

/// Counts every process's concurrent requests through `shared` (set once,
/// at start-up).
pub fn share_slots(shared: Arc<dyn SharedSlots>) {
    let _ = SHARED_SLOTS.set(shared);
}

/// The shared concurrency places, if a store is plugged in.
pub fn shared_slots() -> Option<&'static Arc<dyn SharedSlots>> {
    SHARED_SLOTS.get()
}

/// A provider's request budget per account: at most `requests` in each
/// `window` (Outlook: 10 000 requests per 10 minutes per app and mailbox).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestBudget {
    pub requests: u64,
    pub window: Duration,
}

/// Where request budgets are counted with other replicas: the server plugs
/// the shared state store in (`share_budgets`); the backends never see the
/// store itself.
#[async_trait::async_trait]
pub trait SharedBudgets: Send + Sync {
    /// Adds `n` to the count under `key`, which expires after `ttl`; the
    /// total, or `None` when the store cannot count now.
    async fn spend(&self, key: &str, n: u64, ttl: Duration) -> Option<u64>;
}

static SHARED_BUDGETS: std::sync::OnceLock<Arc<dyn SharedBudgets>> = std::sync::OnceLock::new();

/// Counts every process's request budgets through `shared` (set once, at
/// start-up).
pub fn share_budgets(shared: Arc<dyn SharedBudgets>) {
    let _ = SHARED_BUDGETS.set(shared);
}

/// Requests spent per account in fixed windows of `budget.window`: across
/// replicas when a shared state store is configured (`share_budgets`), in
/// this process alone otherwise or while the store is unreachable.
#[derive(Clone)]
pub struct Budgets {
    budget: RequestBudget,
    local: moka::sync::Cache<String, Arc<std::sync::atomic::AtomicU64>>,
}

impl Budgets {
    pub fn new(budget: RequestBudget) -> Budgets {
        let window = budget.window.max(Duration::from_secs(1));
        let local = moka::sync::Cache::builder().max_capacity(100_000).time_to_live(window * 2).build();
        Budgets { budget: RequestBudget { window, ..budget }, local }
    }

    /// Takes `n` requests from `account`'s budget in the current window;
    /// `Err(wait)` until the window ends once it is spent (then nothing may
    /// be sent).
    pub async fn spend(&self, account: &str, n: u64) -> Result<(), Duration> {
        let window = self.budget.window.as_secs().max(1);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
        let index = now / window;
        let ends_in = Duration::from_secs((index + 1) * window - now);
        let key = format!("requests:{}:{account}:{index}", account.len());
        let shared = match SHARED_BUDGETS.get() {
            Some(shared) => shared.spend(&key, n, Duration::from_secs(window) + Duration::from_secs(60)).await,
            None => None,
        };
        let total = match shared {
            Some(total) => total,
            None => {
                let counter = self.local.get_with(key, Default::default);
                counter.fetch_add(n, std::sync::atomic::Ordering::SeqCst) + n
            }
        };
        if total > self.budget.requests { Err(ends_in) } else { Ok(()) }
    }

    pub fn budget(&self) -> RequestBudget {
        self.budget
    }
}

/// Error bodies are read only this far (they are small JSON objects).
const ERROR_BODY_LIMIT: usize = 64 * 1024;

/// One HTTP client with its per-request timeout and retry policy.
#[derive(Clone)]
pub struct Requester {
    pub client: reqwest::Client,
    pub timeout: Duration,
    pub retry: RetryPolicy,
}

impl Requester {
    /// A `client` with `timeout` for every request and `retry` for throttled
    /// ones.
    pub fn new(
        ca_file: Option<&Path>,
        timeout: Duration,
        retry: RetryPolicy,
        redirects: reqwest::redirect::Policy,
    ) -> Result<Requester, BackendError> {
        Ok(Requester { client: client(ca_file, timeout, redirects)?, timeout, retry })
    }

    /// Sends the request `build` makes until it succeeds, retrying answers
    /// `judge` calls `Verdict::Retry` within `retry`. Only the wait for the
    /// response head is bounded here; the caller bounds the body (a JSON
    /// body by `timeout` on the builder, a download read by read).
    pub async fn send(
        &self,
        what: &str,
        build: impl Fn() -> reqwest::RequestBuilder,
        judge: impl Fn(StatusCode, &[u8]) -> Verdict,
    ) -> Result<reqwest::Response, BackendError> {
        self.send_noting_holds(what, build, judge, |_| {}).await
    }

    /// `send`, telling `hold` about a wait the server asked for that is too
    /// long to retry after.
    pub async fn send_noting_holds(
        &self,
        what: &str,
        build: impl Fn() -> reqwest::RequestBuilder,
        judge: impl Fn(StatusCode, &[u8]) -> Verdict,
        hold: impl Fn(Duration),
    ) -> Result<reqwest::Response, BackendError> {
        let mut attempt = 0;
        loop {
            let response = match tokio::time::timeout(self.timeout, build().send()).await {
                Err(_) => return Err(BackendError::Unavailable(format!("{what}: timed out waiting for the server"))),
                Ok(sent) => sent.map_err(|e| transport_error(what, &e))?,
            };
            let status = response.status();
            if status.is_success() {
                return Ok(response);
            }
            let mut asked = retry_after(response.headers());
            let body = read_limited(response, ERROR_BODY_LIMIT, self.timeout).await.unwrap_or_default();
            match judge(status, &body) {
                Verdict::Fail(e) => return Err(e),
                Verdict::RetryAfter(wait) => asked = Some(wait),
                Verdict::Retry => {}
            }
            if let Some(asked) = asked
                && asked > self.retry.max_wait
            {
                hold(asked);
            }
            let wait = self.wait_before_retry(what, status.as_u16(), attempt, asked)?;
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// How long to wait before retry `attempt` (0-based) after a throttled
    /// answer, or the error that ends the retries.
    pub fn wait_before_retry(
        &self,
        what: &str,
        status: u16,
        attempt: u32,
        asked: Option<Duration>,
    ) -> Result<Duration, BackendError> {
        let wait = asked.unwrap_or_else(|| self.retry.backoff(attempt));
        let asked_secs = asked.map(|d| d.as_secs());
        if attempt >= self.retry.retries || wait > self.retry.max_wait {
            tracing::warn!(what, status, attempt, retry_after_secs = asked_secs, "throttled; giving up");
            let mut message = match status {
                429 | 403 => format!("{what}: throttled (HTTP {status})"),
                // Graph's gateway gives up on a slow MIME conversion (large
                // attachments) after ~30 s with 504, every time alike.
                504 => format!("{what}: the server timed out producing the answer (HTTP 504) {} times", attempt + 1),
                _ => format!("{what}: the server failed (HTTP {status}) {} times", attempt + 1),
            };
            if let Some(secs) = asked_secs {
                let _ = write!(message, " (Retry-After: {secs})");
            }
            return Err(BackendError::Unavailable(message));
        }
        tracing::info!(what, status, attempt, wait_ms = wait.as_millis() as u64, "throttled; waiting to retry");
        Ok(wait)
    }

    /// A JSON body, read within `timeout` and at most `limit` octets.
    pub async fn json<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        response: reqwest::Response,
        limit: usize,
    ) -> Result<T, BackendError> {
        let body = read_limited(response, limit, self.timeout).await.map_err(|e| match e {
            BackendError::Unavailable(why) => BackendError::Unavailable(format!("{what}: {why}")),
            other => other,
        })?;
        serde_json::from_slice(&body).map_err(|e| BackendError::Unavailable(format!("{what}: unexpected reply: {e}")))
    }
}

/// Reads a whole body of at most `limit` octets within `timeout`.
pub async fn read_limited(
    response: reqwest::Response,
    limit: usize,
    timeout: Duration,
) -> Result<Vec<u8>, BackendError> {
    let read = async {
        let mut body = Vec::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| transport_error("response body", &e))?;
            if body.len() + chunk.len() > limit {
                return Err(BackendError::Unavailable(format!("response larger than {limit} octets")));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or_else(|_| Err(BackendError::Unavailable("response body: timed out".into())))
}

/// Canonical (CRLF) sizes of many messages, `concurrency` downloads at a
/// time, in the order of `ids`. Each message is streamed through
/// `CanonicalSize`: nothing is kept but the count.
pub async fn measure_all<'a, I, F, Fut>(
    ids: &'a [I],
    concurrency: usize,
    fetch: F,
) -> Result<Vec<Option<u64>>, BackendError>
where
    F: Fn(&'a I) -> Fut,
    Fut: Future<Output = Result<MessageStream<'static>, BackendError>> + 'a,
{
    let mut sizes = vec![None; ids.len()];
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let mut next = 0;
    loop {
        while in_flight.len() < concurrency.max(1) && next < ids.len() {
            in_flight.push(measure_one(next, fetch(&ids[next])));
            next += 1;
        }
        match in_flight.next().await {
            None => return Ok(sizes),
            // A message gone since the listing is left out (never measured
            // as 0, which LIST would then promise); the first other failure
            // ends it: the other downloads are dropped.
            Some((_, Err(BackendError::MessageGone))) => {}
            Some((index, size)) => sizes[index] = Some(size?),
        }
    }
}

async fn measure_one(
    index: usize,
    opened: impl Future<Output = Result<MessageStream<'static>, BackendError>>,
) -> (usize, Result<u64, BackendError>) {
    let measured = async {
        let mut counter = crate::canonical::CanonicalSize::new();
        let mut stream = opened.await?;
        while let Some(chunk) = stream.next().await {
            counter.feed(&chunk?);
        }
        Ok(counter.finish())
    };
    (index, measured.await)
}

/// A UIDL for an id that is no valid UIDL as it is (too long, or with
/// characters RFC 1939 does not allow): the lowercase hex SHA-256 of the id,
/// 64 characters. The same id always gives the same UIDL; two ids giving
/// the same one would need a SHA-256 collision.
pub fn hashed_uidl(id: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(id.as_bytes());
    let mut uidl = String::with_capacity(64);
    for byte in digest {
        let _ = write!(uidl, "{byte:02x}");
    }
    uidl
}

/// True for a string RFC 1939 accepts as a UIDL: 1–70 of 0x21..=0x7E.
pub fn is_valid_uidl(id: &str) -> bool {
    (1..=70).contains(&id.len()) && id.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

/// A stream of one chunk (tests and small bodies).
pub fn once(bytes: Bytes) -> MessageStream<'static> {
    futures::stream::once(async move { Ok(bytes) }).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_uses_ring_and_reads_ca_files() {
        assert!(tls_config(None).is_ok());
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        assert!(matches!(tls_config(Some(&empty)), Err(BackendError::Permanent(m)) if m.contains("no certificates")));
        assert!(tls_config(Some(&dir.path().join("missing.pem"))).is_err());
    }

    #[test]
    fn retry_after_is_seconds() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        headers.insert(RETRY_AFTER, "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap());
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let policy = RetryPolicy { retries: 5, max_wait: Duration::from_secs(5) };
        let first = policy.backoff(0);
        assert!(first >= Duration::from_secs(1) && first < Duration::from_millis(1500), "{first:?}");
        let third = policy.backoff(2);
        assert!(third >= Duration::from_secs(4) && third <= Duration::from_secs(5), "{third:?}");
        assert_eq!(policy.backoff(30), Duration::from_secs(5));
    }

    #[test]
    fn waits_longer_than_allowed_end_the_retries() {
        let requester = Requester {
            client: client(None, Duration::from_secs(1), reqwest::redirect::Policy::none()).unwrap(),
            timeout: Duration::from_secs(1),
            retry: RetryPolicy { retries: 2, max_wait: Duration::from_secs(10) },
        };
        assert_eq!(requester.wait_before_retry("x", 429, 0, Some(Duration::from_secs(3))).unwrap().as_secs(), 3);
        let e = requester.wait_before_retry("x", 429, 0, Some(Duration::from_secs(60))).unwrap_err();
        assert!(matches!(&e, BackendError::Unavailable(m) if m.contains("Retry-After: 60")), "{e:?}");
        assert!(requester.wait_before_retry("x", 503, 2, None).is_err(), "retries exhausted");
    }

    #[test]
    fn uidls_from_ids() {
        assert!(is_valid_uidl("18c2f0a1b2c3d4e5"));
        assert!(!is_valid_uidl(""));
        assert!(!is_valid_uidl(&"x".repeat(71)));
        assert!(!is_valid_uidl("a b"));
        let id = "AAMkAGI2TG93AAA=".repeat(10);
        let uidl = hashed_uidl(&id);
        assert_eq!(uidl.len(), 64);
        assert!(is_valid_uidl(&uidl));
        assert_eq!(uidl, hashed_uidl(&id));
        assert_ne!(uidl, hashed_uidl(&id[1..]));
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        assert_eq!(hashed_uidl("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn permits_are_shared_per_account() {
        let permits = AccountPermits::new();
        let a = permits.for_account("alice", 4);
        let again = permits.for_account("alice", 4);
        assert!(Arc::ptr_eq(&a, &again));
        let b = permits.for_account("bob", 4);
        assert!(!Arc::ptr_eq(&a, &b));
        drop((a, again));
        assert_eq!(permits.for_account("alice", 2).available_permits(), 2, "a fresh one once unused");
    }

    #[test]
    fn bearer_tokens_must_fit_a_header() {
        assert!(bearer_token(&Secret::new("ya29.a0AfH6")).is_ok());
        assert!(matches!(bearer_token(&Secret::new("two words")), Err(BackendError::BadCredentials(_))));
        assert!(bearer_token(&Secret::new("")).is_err());
    }

    #[tokio::test]
    async fn a_probe_needs_an_answer_not_a_success() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let requester = Requester {
            client: client(None, Duration::from_secs(2), reqwest::redirect::Policy::none()).unwrap(),
            timeout: Duration::from_secs(2),
            retry: RetryPolicy { retries: 0, max_wait: Duration::from_secs(1) },
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = Url::parse(&format!("http://{}/", listener.local_addr().unwrap())).unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = socket.read(&mut buf).await;
            let _ = socket.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n").await;
        });
        probe(&requester, &url).await.unwrap();
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let url = Url::parse(&format!("http://{closed}/")).unwrap();
        assert!(matches!(probe(&requester, &url).await, Err(BackendError::Unavailable(_))));
    }

    #[tokio::test]
    async fn measuring_keeps_order_and_bounds_concurrency() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let active = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let ids: Vec<usize> = (1..=12).collect();
        let sizes = measure_all(&ids, 3, |&n| {
            let (active, peak) = (active.clone(), peak.clone());
            async move {
                let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10 * (13 - n as u64))).await;
                active.fetch_sub(1, Ordering::SeqCst);
                // n lines of "x\n": canonical size 3n.
                Ok(once(Bytes::from("x\n".repeat(n))))
            }
        })
        .await
        .unwrap();
        assert_eq!(sizes, ids.iter().map(|&n| Some(3 * n as u64)).collect::<Vec<_>>());
        assert!(peak.load(Ordering::SeqCst) <= 3, "peak {}", peak.load(Ordering::SeqCst));
    }
}
