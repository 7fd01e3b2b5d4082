//! One account's requests to an HTTP mail API (Gmail, Graph, JMAP): its
//! Authorization header, its share of the account's request permits, the
//! backend's judgement of failed answers, JSON replies and downloads; and
//! what the bearer-token backends share around it (the API root with its
//! client and permits, the defaults of their configs, the login check, what
//! a refused token means mid-session, measuring by downloading).
//!
//! Each backend keeps its own config struct and its own URLs; only the
//! plumbing is here, so that a fix to it (a timeout, a retry, a permit held
//! too long) reaches every backend at once.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, HeaderValue};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use url::Url;

use super::{AccountPermits, Budgets, Holds, RequestBudget, Requester, RetryPolicy, Verdict};
use crate::backend::MessageStream;
use crate::mail::{BackendError, Credentials, InvalidSetting, Proof, Secret, StoreId};

// The defaults of the settings every API backend's config has, by the names
// its serde attributes use.

/// `timeout_secs`.
pub fn default_timeout() -> u64 {
    30
}

/// `max_concurrent_requests`: what Outlook allows per mailbox, and well
/// within Google's limits.
pub fn default_concurrency() -> usize {
    4
}

/// `max_retries`.
pub fn default_retries() -> u32 {
    3
}

/// `max_retry_wait_secs`.
pub fn default_max_wait() -> u64 {
    30
}

/// A config's `check()` error as the error a constructor returns.
pub fn config_error(invalid: InvalidSetting) -> BackendError {
    BackendError::Permanent(invalid.to_string())
}

/// What a backend makes of a failed answer: `(what, status, body)`.
pub type Judge = fn(&str, StatusCode, &[u8]) -> Verdict;

/// A bearer-token API as a backend reaches it: its root, one client, and
/// the request permits of every account it serves.
pub struct Endpoint {
    pub base: Url,
    pub requester: Requester,
    permits: AccountPermits,
    /// Accounts the provider asked to wait longer than a retry may.
    holds: Holds,
    /// The provider's request budget per account, if it has one.
    budgets: Option<Budgets>,
    /// Whether an account's concurrency limit holds across replicas
    /// (`SharedSlots`), as Outlook's per-mailbox 4 does.
    shared_concurrency: bool,
}

impl Endpoint {
    /// Redirects are not followed: the token must go nowhere but `api_base`.
    pub fn new(
        api_base: &str,
        ca_file: Option<&Path>,
        timeout_secs: u64,
        retry: RetryPolicy,
    ) -> Result<Endpoint, BackendError> {
        let base = super::api_base(api_base).map_err(BackendError::Permanent)?;
        let timeout = Duration::from_secs(timeout_secs);
        let requester = Requester::new(ca_file, timeout, retry, reqwest::redirect::Policy::none())?;
        Ok(Endpoint {
            base,
            requester,
            permits: AccountPermits::new(),
            holds: Holds::new(),
            budgets: None,
            shared_concurrency: false,
        })
    }

    /// Counts every account's requests against `budget` (shared with the
    /// other replicas when a shared state store is configured): once it is
    /// spent, requests fail with `Unavailable` instead of being sent.
    pub fn with_budget(mut self, budget: RequestBudget) -> Endpoint {
        self.budgets = Some(Budgets::new(budget));
        self
    }

    /// An account's `limit` concurrent requests count across replicas when
    /// a shared state store is configured (`share_slots`): the provider
    /// limits the account, not each replica.
    pub fn with_shared_concurrency(mut self) -> Endpoint {
        self.shared_concurrency = true;
        self
    }

    /// Readiness: the API answers at all.
    pub async fn probe(&self) -> Result<(), BackendError> {
        super::probe(&self.requester, &self.base).await
    }

    /// Requests for one account with `token`, sharing `limit` permits with
    /// every other session of `account` (whatever the provider counts
    /// concurrent requests by).
    pub fn account(&self, account: &str, limit: usize, token: &Secret, judge: Judge) -> AccountApi {
        let permits = self.permits.for_account(account, limit);
        AccountApi {
            requester: self.requester.clone(),
            authorization: super::bearer_header(token),
            permits,
            limit: limit.max(1),
            judge,
            account: account.to_string(),
            holds: Some(self.holds.clone()),
            budgets: self.budgets.clone(),
            shared_concurrency: self.shared_concurrency,
        }
    }
}

/// The bearer token of a login, checked to fit a header; a password is
/// refused, naming `backend` ("the Gmail API backend").
pub fn bearer_only(credentials: &Credentials, backend: &str) -> Result<Secret, BackendError> {
    match &credentials.proof {
        Proof::Bearer(token) => super::bearer_token(token),
        Proof::Password(_) => Err(BackendError::Permanent(format!(
            "{backend} needs OAuth2: log in with SASL XOAUTH2 or OAUTHBEARER, or map accounts to tokens"
        ))),
    }
}

/// After login a refused token means it expired meanwhile: a temporary
/// failure, not a wrong password.
pub fn in_session(error: BackendError) -> BackendError {
    match error {
        BackendError::AuthFailed => BackendError::unavailable("the access token was refused mid-session (expired?)"),
        other => other,
    }
}

/// Canonical sizes by downloading, `concurrency` messages at a time
/// (`super::measure_all`); `None` for a message deleted meanwhile.
pub async fn measure_downloads<'a, F, Fut>(
    ids: &'a [StoreId],
    concurrency: usize,
    download: F,
) -> Result<Vec<Option<u64>>, BackendError>
where
    F: Fn(&'a StoreId) -> Fut,
    Fut: Future<Output = Result<MessageStream<'static>, BackendError>> + 'a,
{
    super::measure_all(ids, concurrency, download).await.map_err(in_session)
}

/// What `Mailbox::remove` says when `failed` of `requested` messages are
/// still there: temporary, so the client keeps its copies and tries again,
/// with the first cause seen.
pub fn not_removed(failed: usize, requested: usize, verb: &str, first_error: Option<BackendError>) -> BackendError {
    let cause = first_error.map(|e| format!(" ({e})")).unwrap_or_default();
    BackendError::Unavailable(format!("{failed} of {requested} messages could not be {verb}{cause}"))
}

/// HTTP to one account: every request carries its Authorization, and all
/// but bare `send`s hold one of its permits while they run.
pub struct AccountApi {
    pub requester: Requester,
    /// Marked sensitive: never in debug output.
    authorization: HeaderValue,
    permits: Arc<Semaphore>,
    /// How many permits the account has in all.
    limit: usize,
    judge: Judge,
    /// The account as the provider counts it (holds are per account).
    account: String,
    /// `None`: the server's waits are not remembered (JMAP).
    holds: Option<Holds>,
    /// `None`: no request budget (all but Graph).
    budgets: Option<Budgets>,
    /// The account's `limit` holds across replicas (Graph).
    shared_concurrency: bool,
}

/// A request's share of its account's concurrency: the process's permits
/// and, where the limit holds across replicas, the places taken in the
/// shared store, given back when dropped.
pub struct Permit {
    _local: OwnedSemaphorePermit,
    shared: Vec<Box<dyn super::SlotLease>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.shared.is_empty() {
            return;
        }
        let shared = std::mem::take(&mut self.shared);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                for lease in shared {
                    lease.give_back().await;
                }
            });
        }
        // Without a runtime the places expire with their leases.
    }
}

impl AccountApi {
    /// Requests under `permits`, one permit each, remembering no holds.
    pub fn new(requester: Requester, authorization: HeaderValue, permits: Arc<Semaphore>, judge: Judge) -> AccountApi {
        AccountApi {
            requester,
            authorization,
            permits,
            limit: 1,
            judge,
            account: String::new(),
            holds: None,
            budgets: None,
            shared_concurrency: false,
        }
    }

    pub fn get(&self, url: &Url) -> reqwest::RequestBuilder {
        self.requester.client.get(url.clone()).header(AUTHORIZATION, self.authorization.clone())
    }

    pub fn post(&self, url: &Url) -> reqwest::RequestBuilder {
        self.requester.client.post(url.clone()).header(AUTHORIZATION, self.authorization.clone())
    }

    /// One of the account's permits, for a request the caller sends itself.
    pub async fn permit(&self) -> Result<Permit, BackendError> {
        self.permits(1).await
    }

    /// `requests` permits, at most all the account has: for a batch whose
    /// inner requests the provider runs concurrently (Outlook runs up to 4
    /// of a `$batch` at once, and counts each against the mailbox's limit).
    /// The semaphore is fair, so single requests queued later wait behind
    /// the batch instead of starving it. Where the limit holds across
    /// replicas, as many places are also taken in the shared store.
    pub async fn permits(&self, requests: usize) -> Result<Permit, BackendError> {
        let n = requests.clamp(1, self.limit);
        let local = self
            .permits
            .clone()
            .acquire_many_owned(u32::try_from(n).unwrap_or(1))
            .await
            .map_err(|_| BackendError::unavailable("request limiter closed"))?;
        let mut permit = Permit { _local: local, shared: Vec::new() };
        if self.shared_concurrency
            && let Some(slots) = super::shared_slots()
        {
            self.take_shared(slots.as_ref(), n, &mut permit).await?;
        }
        Ok(permit)
    }

    /// Takes `n` of the account's places in the shared store, waiting (with
    /// backoff, at most the request timeout) while other replicas hold
    /// them. All or none: a partial set is given back before waiting, so
    /// two replicas can never each hold half of what both need. The store
    /// unreachable: this replica's own limit alone, as before.
    async fn take_shared(
        &self,
        slots: &dyn super::SharedSlots,
        n: usize,
        permit: &mut Permit,
    ) -> Result<(), BackendError> {
        let key = format!("slots:{}:{}", self.account.len(), self.account);
        // A place outlives the longest request a little; a dead replica's
        // places come back by then.
        let ttl = self.requester.timeout * 2 + Duration::from_secs(30);
        let deadline = tokio::time::Instant::now() + self.requester.timeout;
        let mut pause = Duration::from_millis(10);
        loop {
            while permit.shared.len() < n {
                match slots.take(&key, self.limit, ttl).await {
                    Ok(Some(lease)) => permit.shared.push(lease),
                    Ok(None) => break,
                    Err(()) => {
                        for lease in permit.shared.drain(..) {
                            lease.give_back().await;
                        }
                        return Ok(());
                    }
                }
            }
            if permit.shared.len() == n {
                return Ok(());
            }
            for lease in permit.shared.drain(..) {
                lease.give_back().await;
            }
            if tokio::time::Instant::now() + pause > deadline {
                tracing::warn!(
                    account = %self.account,
                    limit = self.limit,
                    "the account's concurrent requests are all taken by other replicas; nothing sent"
                );
                return Err(BackendError::Unavailable(format!(
                    "the mailbox's {} concurrent requests stayed taken by other replicas for {}s; nothing sent",
                    self.limit,
                    self.requester.timeout.as_secs()
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    /// `Unavailable` while the provider asked this account to wait.
    async fn check_hold(&self, what: &str) -> Result<(), BackendError> {
        let left = match &self.holds {
            Some(holds) => holds.remaining_shared(&self.account).await,
            None => None,
        };
        match left {
            None => Ok(()),
            Some(left) => Err(BackendError::Unavailable(format!(
                "{what}: not sent; the provider asked this account to wait {}s more before calling again",
                left.as_secs().max(1)
            ))),
        }
    }

    /// `Requester::send` with this account's judge; the caller holds a
    /// permit and bounds the body. Nothing is sent while the account is on
    /// hold; a wait asked for beyond `max_retry_wait_secs` puts it on hold.
    pub async fn send(
        &self,
        what: &str,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, BackendError> {
        self.send_counting(what, 1, build).await
    }

    /// `send` for a request the provider counts as `requests` (a batch).
    async fn send_counting(
        &self,
        what: &str,
        requests: usize,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, BackendError> {
        self.check_hold(what).await?;
        self.spend_budget(what, requests).await?;
        let judge = self.judge;
        let hold = |wait: Duration| self.hold(what, wait);
        self.requester.send_noting_holds(what, build, |status, body| judge(what, status, body), hold).await
    }

    /// Takes `requests` from the account's budget, or `Unavailable` without
    /// sending once it is spent for this window.
    async fn spend_budget(&self, what: &str, requests: usize) -> Result<(), BackendError> {
        let Some(budgets) = &self.budgets else { return Ok(()) };
        match budgets.spend(&self.account, requests.max(1) as u64).await {
            Ok(()) => Ok(()),
            Err(wait) => {
                let budget = budgets.budget();
                tracing::warn!(
                    what,
                    account = %self.account,
                    requests = budget.requests,
                    window_secs = budget.window.as_secs(),
                    wait_secs = wait.as_secs(),
                    "the account's request budget is spent (counted across replicas with shared state): nothing sent until the window ends; its devices get -ERR [SYS/TEMP]"
                );
                Err(BackendError::Unavailable(format!(
                    "{what}: not sent; this mailbox's budget of {} requests per {}s is spent, {}s left in the window",
                    budget.requests,
                    budget.window.as_secs(),
                    wait.as_secs().max(1)
                )))
            }
        }
    }

    fn hold(&self, what: &str, wait: Duration) {
        tracing::warn!(
            what,
            account = %self.account,
            wait_secs = wait.as_secs(),
            "the provider asked to wait longer than max_retry_wait_secs: no request for this account until then; its devices get -ERR [SYS/TEMP]"
        );
        if let Some(holds) = &self.holds {
            holds.hold(&self.account, wait);
        }
    }

    /// `Requester::wait_before_retry` for an inner request of a batch,
    /// putting the account on hold as `send` does.
    pub fn wait_before_retry(
        &self,
        what: &str,
        status: u16,
        attempt: u32,
        asked: Option<Duration>,
    ) -> Result<Duration, BackendError> {
        if let Some(asked) = asked
            && asked > self.requester.retry.max_wait
        {
            self.hold(what, asked);
        }
        self.requester.wait_before_retry(what, status, attempt, asked)
    }

    /// A JSON reply of at most `limit` octets, the whole exchange within the
    /// request timeout, under a permit.
    pub async fn json<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        limit: usize,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<T, BackendError> {
        self.json_of_batch(what, limit, 1, build).await
    }

    /// `json` for a batch of `requests` the provider runs concurrently:
    /// under as many permits (at most the account's limit, `permits`).
    pub async fn json_of_batch<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        limit: usize,
        requests: usize,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<T, BackendError> {
        let _permit = self.permits(requests).await?;
        let response = self.send_counting(what, requests, || build().timeout(self.requester.timeout)).await?;
        self.requester.json(what, response, limit).await
    }

    /// A body as it arrives, however large (each read is bounded, not the
    /// whole). The permit is held until the body ends or is dropped.
    pub async fn download(
        &self,
        what: &str,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<MessageStream<'static>, BackendError> {
        let permit = self.permit().await?;
        let response = self.send(what, build).await?;
        Ok(hold_until_end(body_stream(what, response), permit))
    }
}

/// A response body as a `MessageStream`, transport failures named `what`.
pub fn body_stream(what: &str, response: reqwest::Response) -> MessageStream<'static> {
    let what = what.to_string();
    response.bytes_stream().map_err(move |e| super::transport_error(&what, &e)).boxed()
}

/// `stream`, keeping `permit` until its last chunk (not until the consumer
/// drops it: a POP3 client may be slow to send its next command).
fn hold_until_end(stream: MessageStream<'static>, permit: Permit) -> MessageStream<'static> {
    futures::stream::try_unfold((stream, permit), |(mut stream, permit)| async move {
        match stream.next().await {
            Some(chunk) => Ok(Some((chunk?, (stream, permit)))),
            None => Ok(None),
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_refused_by_name() {
        let e = bearer_only(&Credentials::password("alice", "hunter2"), "the X backend").unwrap_err();
        assert!(matches!(&e, BackendError::Permanent(m) if m.starts_with("the X backend needs OAuth2")), "{e:?}");
        assert!(!e.to_string().contains("hunter2"));
        let token = Credentials { user: "alice".into(), proof: Proof::Bearer(Secret::new("ya29.x")) };
        assert_eq!(bearer_only(&token, "the X backend").unwrap().expose(), "ya29.x");
    }

    #[test]
    fn refused_tokens_mid_session_are_temporary() {
        assert!(matches!(in_session(BackendError::AuthFailed), BackendError::Unavailable(_)));
        assert!(matches!(in_session(BackendError::MessageGone), BackendError::MessageGone));
    }

    #[tokio::test]
    async fn downloads_release_their_permit_at_the_end() {
        let permits = Arc::new(Semaphore::new(1));
        let permit = Permit { _local: permits.clone().acquire_owned().await.unwrap(), shared: Vec::new() };
        let mut stream = hold_until_end(super::super::once(bytes::Bytes::from_static(b"x")), permit);
        assert_eq!(stream.next().await.unwrap().unwrap(), "x");
        assert_eq!(permits.available_permits(), 0, "held while the body lasts");
        assert!(stream.next().await.is_none());
        assert_eq!(permits.available_permits(), 1, "released at its end, before the stream is dropped");
    }
}
