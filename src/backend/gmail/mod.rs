//! The Gmail API backend (REST v1): a POP3 maildrop over one Gmail label or
//! search, with its `GmailConfig` beside it.
//!
//! A login checks the OAuth access token with `users.labels.list` (1 quota
//! unit; a 401 there is `AuthFailed`, so a router can refresh the token and
//! retry) and resolves the configured label. `list` pages through
//! `users.messages.list` (newest first, 500 ids a page) and orders the
//! snapshot oldest first by `internalDate`, which it gets with
//! `messages.get?format=minimal` through the batch endpoint, 50 messages a
//! request, and keeps per message id (ids and dates never change), so only
//! messages new to this process cost anything. Once an account was listed
//! so, its next polls ask `users.history.list` what changed since the
//! listing's `historyId` and only the messages it names, for their labels
//! (`listing` below): one request when nothing changed. `fetch` streams
//! `messages.get?format=raw`, decoding the base64url as it arrives. Sizes are
//! `Claimed` (`sizeEstimate` is an estimate); `canonical_sizes` measures by
//! downloading, `max_concurrent_requests` at a time.
//!
//! It never changes anything except in `remove`, and there only the labels
//! (or, with `delete_policy = "delete"`, the existence) of exactly the
//! messages it is given. Throttling (429, or 403 `rateLimitExceeded` /
//! `userRateLimitExceeded`) is retried after `Retry-After` or a backoff,
//! `max_retries` times. A 401 after login is `Unavailable`: the token expired
//! mid-session, and the client should simply come back.

/// The Gmail wire formats (raw-message extraction, batch responses), public
/// only for the fuzz targets.
#[doc(hidden)]
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use reqwest::header::CONTENT_TYPE;
use serde::{Deserialize, Serialize};
use serde_json::json;
use url::Url;

use self::wire::{BatchPart, RawExtractor};
use super::http::api::{
    AccountApi, Endpoint, default_concurrency, default_max_wait, default_retries, default_timeout, in_session,
};
use super::http::listing::{self as states, ListingStates, Remembered, TokenSeal};
use super::http::{self, RetryPolicy, Verdict};
use super::{Backend, Disposal, ListedMessage, Mailbox, MessageStream, ReportedSize};
use crate::mail::{BackendError, Credentials, InvalidSetting, StoreId};

/// What "delete" means when a POP3 client deletes a message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GmailDeletePolicy {
    /// Add the TRASH label and remove the maildrop's label (INBOX by
    /// default): Gmail empties its trash after 30 days.
    #[default]
    Trash,
    /// Only remove the maildrop's label (INBOX by default): the message
    /// stays in All Mail.
    Archive,
    /// `messages.batchDelete`: gone at once, not recoverable. Needs the
    /// full `https://mail.google.com/` scope.
    Delete,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GmailConfig {
    /// Where the API is; tests point this at a stand-in.
    #[serde(default = "default_api_base")]
    pub api_base: String,
    /// The label POP3 shows, by id (`INBOX`, `Label_12`) or name
    /// (`Printers/Scans`). Unset: INBOX, unless `query` is set.
    #[serde(default)]
    pub label: Option<String>,
    /// A Gmail search (`q`, as in the search box): POP3 shows what matches
    /// (and carries `label`, when both are set).
    #[serde(default)]
    pub query: Option<String>,
    /// `trash` (default), `archive` or `delete`.
    #[serde(default)]
    pub delete_policy: GmailDeletePolicy,
    /// Leave out messages labelled SENT (`-in:sent`). Gmail puts the
    /// account's own replies to a thread in INBOX too (`["SENT","INBOX"]`):
    /// a printer would print what its owner sent. On by default; off to
    /// serve them.
    #[serde(default = "yes")]
    pub exclude_sent: bool,
    /// Time limit in seconds for each HTTP request (for a download: for the
    /// response to start, then for each read of its body).
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Requests in flight at once per account, across its POP3 sessions;
    /// also how many messages are measured at once at a first login.
    #[serde(default = "default_concurrency")]
    pub max_concurrent_requests: usize,
    /// Retries of a throttled request (429, rateLimitExceeded, 5xx).
    #[serde(default = "default_retries")]
    pub max_retries: u32,
    /// The longest wait before a retry; a longer `Retry-After` ends the
    /// attempt with `-ERR [SYS/TEMP]` instead.
    #[serde(default = "default_max_wait")]
    pub max_retry_wait_secs: u64,
    /// PEM file of CA certificates to trust instead of the webpki roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Messages remembered across accounts so that a poll asks only what
    /// changed (`users.history.list`); 0 lists every mailbox in full every
    /// time. A `query` always lists in full (a search cannot be followed by
    /// its history).
    #[serde(default = "states::default_state_messages")]
    pub listing_state_messages: u64,
    /// Seconds an account's remembered listing is kept unused.
    #[serde(default = "states::default_state_idle_secs")]
    pub listing_state_idle_secs: u64,
}

fn default_api_base() -> String {
    "https://gmail.googleapis.com".into()
}

fn yes() -> bool {
    true
}

impl Default for GmailConfig {
    fn default() -> Self {
        GmailConfig {
            api_base: default_api_base(),
            label: None,
            query: None,
            delete_policy: GmailDeletePolicy::default(),
            exclude_sent: true,
            timeout_secs: default_timeout(),
            max_concurrent_requests: default_concurrency(),
            max_retries: default_retries(),
            max_retry_wait_secs: default_max_wait(),
            ca_file: None,
            listing_state_messages: states::default_state_messages(),
            listing_state_idle_secs: states::default_state_idle_secs(),
        }
    }
}

impl GmailConfig {
    /// `gmail:` (INBOX) or `gmail:LABEL`.
    pub fn with_label(label: Option<String>) -> Self {
        GmailConfig { label, ..GmailConfig::default() }
    }

    /// Checks what serde cannot; the error names the key at fault.
    pub fn check(&self) -> Result<(), InvalidSetting> {
        http::api_base(&self.api_base).map_err(|why| InvalidSetting::new("api_base", why))?;
        InvalidSetting::bounded("timeout_secs", self.timeout_secs, 1..=3_600)?;
        if !(1..=16).contains(&self.max_concurrent_requests) {
            return Err(InvalidSetting::new("max_concurrent_requests", "must be between 1 and 16"));
        }
        InvalidSetting::bounded("max_retry_wait_secs", self.max_retry_wait_secs, 1..=3_600)?;
        InvalidSetting::bounded("max_retries", self.max_retries, 0..=10)?;
        states::check_settings(self.listing_state_messages, self.listing_state_idle_secs)?;
        if self.label.as_deref().is_some_and(|l| l.trim().is_empty()) {
            return Err(InvalidSetting::new("label", "must not be empty (leave it out for INBOX)"));
        }
        if self.query.as_deref().is_some_and(|q| q.trim().is_empty()) {
            return Err(InvalidSetting::new("query", "must not be empty (leave it out)"));
        }
        // A search covers All Mail (but Spam and Trash): archiving, which
        // only removes INBOX, would leave every served message in it, to be
        // served again at every poll.
        if self.query.is_some() && self.label.is_none() && self.delete_policy == GmailDeletePolicy::Archive {
            return Err(InvalidSetting::new(
                "delete_policy",
                "\"archive\" with a query and no label would serve every archived message again (a Gmail search \
                 covers All Mail): set label = \"INBOX\" too (archiving removes it), or use \"trash\"",
            ));
        }
        Ok(())
    }
}

/// Message ids per `users.messages.list` page (the API's maximum).
const LIST_PAGE: usize = 500;
/// Requests per batch: Google allows 100 and advises at most 50, but runs a
/// batch's requests concurrently and answers 429 "Too many concurrent
/// requests for user" well below 100 (reported at 100 and at 50, never at
/// 25).
const BATCH: usize = 25;
/// Ids per `batchModify` / `batchDelete` (the API's limit).
const MODIFY_BATCH: usize = 1000;
/// Listing bodies are read only this far (a page of 500 ids is ~30 KB).
const JSON_LIMIT: usize = 8 * 1024 * 1024;
/// Orders remembered (message id → internalDate), across accounts.
const ORDER_CACHE: u64 = 1_000_000;
/// History entries per `users.history.list` page (the API's maximum).
const HISTORY_PAGE: usize = 500;
/// History pages read before listing in full is the cheaper way.
const HISTORY_PAGES: usize = 4;
/// Messages changed since the last poll beyond which the mailbox is
/// listed in full instead (their labels cost a request per 25).
const HISTORY_TOUCHED: usize = 250;
/// Tokens remembered per listing as seen to reach its mailbox.
const SEALS: usize = 4;

/// What the listing needs of a message and keeps: it never changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Arrival {
    /// Milliseconds since the epoch, Gmail's `internalDate`.
    internal_date: i64,
    size_estimate: u64,
}

pub struct GmailBackend {
    config: GmailConfig,
    endpoint: Endpoint,
    /// (account, message id) → arrival, so that a warm mailbox is listed
    /// with `messages.list` alone.
    arrivals: moka::sync::Cache<(String, String), Arrival>,
    listings: ListingStates<GmailListing>,
}

/// An account's maildrop at one `historyId`: where the next poll's
/// `users.history.list` starts.
#[derive(Clone)]
struct GmailListing {
    /// The mailbox's address (`users.getProfile`): a token is trusted to
    /// continue this listing only once it was seen to reach this address.
    email: String,
    seals: Vec<TokenSeal>,
    history_id: u64,
    members: HashMap<String, Arrival>,
}

impl Remembered for GmailListing {
    fn messages(&self) -> usize {
        self.members.len()
    }
}

impl GmailBackend {
    pub fn new(config: GmailConfig) -> Result<Self, BackendError> {
        config.check().map_err(http::api::config_error)?;
        let retry =
            RetryPolicy { retries: config.max_retries, max_wait: Duration::from_secs(config.max_retry_wait_secs) };
        let endpoint = Endpoint::new(&config.api_base, config.ca_file.as_deref(), config.timeout_secs, retry)?;
        let arrivals = moka::sync::Cache::builder()
            .max_capacity(ORDER_CACHE)
            .time_to_idle(Duration::from_secs(7 * 24 * 3600))
            .build();
        let listings = ListingStates::new(config.listing_state_messages, config.listing_state_idle_secs);
        Ok(GmailBackend { config, endpoint, arrivals, listings })
    }
}

#[async_trait]
impl Backend for GmailBackend {
    fn kind(&self) -> &'static str {
        "gmail"
    }

    fn accepts_bearer_tokens(&self) -> bool {
        true
    }

    async fn probe(&self) -> Result<(), BackendError> {
        self.endpoint.probe().await
    }

    async fn open(&self, credentials: &Credentials) -> Result<Box<dyn Mailbox>, BackendError> {
        let token = http::api::bearer_only(credentials, "the Gmail API backend")?;
        let account =
            self.endpoint.account(&credentials.user, self.config.max_concurrent_requests, &token, wire::judge);
        let api = Api { account, base: self.endpoint.base.clone() };
        let labels = api.labels().await?;
        let label = match (&self.config.label, &self.config.query) {
            (Some(wanted), _) => Some(find_label(&labels, wanted)?),
            (None, Some(_)) => None,
            (None, None) => Some("INBOX".to_string()),
        };
        let exclude_sent = self.config.exclude_sent && label.as_deref() != Some("SENT");
        // Membership of a label (and of `-in:sent`) can be read from a
        // message's labels; that of a search cannot.
        let membership = match (&label, &self.config.query) {
            (Some(label), None) => Some(Membership { label: label.clone(), exclude_sent }),
            _ => None,
        };
        Ok(Box::new(GmailMailbox {
            api,
            account: credentials.user.clone(),
            label,
            query: search(self.config.query.as_deref(), exclude_sent),
            policy: self.config.delete_policy,
            configured_policy: self.config.delete_policy,
            arrivals: self.arrivals.clone(),
            concurrency: self.config.max_concurrent_requests,
            listings: self.listings.clone(),
            membership: membership.filter(|_| self.listings.enabled()),
            seal: TokenSeal::of(&token),
            prefetched: None,
            flag_label: None,
        }))
    }
}

#[derive(Debug, Clone, Deserialize)]
struct Label {
    id: String,
    name: String,
}

/// A label by id, or else by name (Gmail's names are unique, compared
/// without case as Gmail does).
fn find_label(labels: &[Label], wanted: &str) -> Result<String, BackendError> {
    let wanted = wanted.trim();
    if let Some(label) = labels.iter().find(|l| l.id == wanted) {
        return Ok(label.id.clone());
    }
    if let Some(label) = labels.iter().find(|l| l.name.eq_ignore_ascii_case(wanted)) {
        return Ok(label.id.clone());
    }
    tracing::warn!(label = wanted, "configured Gmail label not found");
    Err(BackendError::Permanent(format!("no Gmail label {wanted:?} in this account")))
}

/// HTTP to one account's mailbox.
struct Api {
    account: AccountApi,
    base: Url,
}

impl Api {
    /// `{base}/gmail/v1/users/me/{segments…}`.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("http(s) URLs have paths")
            .pop_if_empty()
            .extend(["gmail", "v1", "users", "me"])
            .extend(segments);
        url
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, what: &str, url: Url) -> Result<T, BackendError> {
        self.account.json(what, JSON_LIMIT, || self.account.get(&url)).await
    }

    /// The id of the user label named `name` (compared without case, as
    /// Gmail does), created when the account has none (`users.labels.create`).
    async fn label_id_or_create(&self, name: &str) -> Result<String, BackendError> {
        if let Some(label) = self.labels().await?.into_iter().find(|l| l.name.eq_ignore_ascii_case(name)) {
            return Ok(label.id);
        }
        let url = self.url(&["labels"]);
        let body = serde_json::to_vec(&json!({ "name": name, "labelListVisibility": "labelShow",
                                               "messageListVisibility": "show" }))
        .map_err(|e| BackendError::Permanent(format!("JSON: {e}")))?;
        let label: Label = self
            .account
            .json("users.labels.create", JSON_LIMIT, || {
                self.account.post(&url).header(CONTENT_TYPE, "application/json").body(body.clone())
            })
            .await
            .map_err(not_a_message)?;
        tracing::info!(label = name, "created the Gmail label for on_delete = \"flag\"");
        Ok(label.id)
    }

    async fn labels(&self) -> Result<Vec<Label>, BackendError> {
        #[derive(Deserialize)]
        struct Labels {
            #[serde(default)]
            labels: Vec<Label>,
        }
        let labels: Labels = self.get_json("users.labels.list", self.url(&["labels"])).await.map_err(not_a_message)?;
        Ok(labels.labels)
    }

    /// One page of ids, newest first, and the token of the next.
    async fn list_page(
        &self,
        label: Option<&str>,
        query: Option<&str>,
        page: Option<&str>,
    ) -> Result<(Vec<String>, Option<String>), BackendError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Page {
            #[serde(default)]
            messages: Vec<Id>,
            next_page_token: Option<String>,
        }
        #[derive(Deserialize)]
        struct Id {
            id: String,
        }
        let mut url = self.url(&["messages"]);
        {
            let mut pairs = url.query_pairs_mut();
            pairs.append_pair("maxResults", &LIST_PAGE.to_string());
            if let Some(label) = label {
                pairs.append_pair("labelIds", label);
                if matches!(label, "TRASH" | "SPAM") {
                    pairs.append_pair("includeSpamTrash", "true");
                }
            }
            if let Some(query) = query {
                pairs.append_pair("q", query);
            }
            if let Some(page) = page {
                pairs.append_pair("pageToken", page);
            }
        }
        let page: Page = self.get_json("users.messages.list", url).await.map_err(not_a_message)?;
        Ok((page.messages.into_iter().map(|m| m.id).collect(), page.next_page_token.filter(|t| !t.is_empty())))
    }

    /// Arrival dates and size estimates of `ids` (`format=minimal`), 25 per
    /// batch request. A message deleted meanwhile is simply absent.
    async fn arrivals(&self, ids: &[String]) -> Result<HashMap<String, Arrival>, BackendError> {
        Ok(self.minimal(ids).await?.into_iter().map(|(id, (arrival, _))| (id, arrival)).collect())
    }

    /// `users.getProfile`: the mailbox's address and current `historyId`.
    async fn profile(&self) -> Result<(String, u64), BackendError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Profile {
            email_address: String,
            history_id: serde_json::Value,
        }
        let profile: Profile =
            self.get_json("users.getProfile", self.url(&["profile"])).await.map_err(not_a_message)?;
        let history_id = google_u64(&profile.history_id)
            .ok_or_else(|| BackendError::unavailable("users.getProfile: no historyId"))?;
        Ok((profile.email_address, history_id))
    }

    /// What changed since `start`: the ids of every message a history
    /// record names, which of them were deleted, and the `historyId` this
    /// goes up to. `None` when Gmail no longer has history that old (404)
    /// or there is too much of it: then the mailbox is listed in full.
    async fn history(&self, start: u64) -> Result<Option<History>, BackendError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Page {
            #[serde(default)]
            history: Vec<Record>,
            next_page_token: Option<String>,
            history_id: Option<serde_json::Value>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Record {
            #[serde(default)]
            messages: Vec<Named>,
            #[serde(default)]
            messages_added: Vec<Change>,
            #[serde(default)]
            messages_deleted: Vec<Change>,
            #[serde(default)]
            labels_added: Vec<Change>,
            #[serde(default)]
            labels_removed: Vec<Change>,
        }
        #[derive(Deserialize)]
        struct Change {
            message: Named,
        }
        #[derive(Deserialize)]
        struct Named {
            id: String,
        }
        let mut touched = HashSet::new();
        let mut deleted = HashSet::new();
        let mut page_token: Option<String> = None;
        for _ in 0..HISTORY_PAGES {
            let mut url = self.url(&["history"]);
            {
                let mut pairs = url.query_pairs_mut();
                pairs.append_pair("startHistoryId", &start.to_string());
                pairs.append_pair("maxResults", &HISTORY_PAGE.to_string());
                if let Some(token) = &page_token {
                    pairs.append_pair("pageToken", token);
                }
            }
            let page: Page = match self.get_json("users.history.list", url).await {
                Ok(page) => page,
                // "A historyId is typically valid for at least a week":
                // older, or otherwise unknown, is 404.
                Err(BackendError::MessageGone) => return Ok(None),
                Err(e) => return Err(e),
            };
            for record in page.history {
                let changes = [record.messages_added, record.labels_added, record.labels_removed];
                for named in record.messages.into_iter().chain(changes.into_iter().flatten().map(|c| c.message)) {
                    touched.insert(named.id);
                }
                for change in record.messages_deleted {
                    deleted.insert(change.message.id);
                }
            }
            if touched.len() + deleted.len() > HISTORY_TOUCHED {
                return Ok(None);
            }
            match page.next_page_token.filter(|t| !t.is_empty()) {
                Some(next) => page_token = Some(next),
                None => {
                    let Some(history_id) = page.history_id.as_ref().and_then(google_u64) else {
                        return Ok(None);
                    };
                    touched.retain(|id| !deleted.contains(id));
                    return Ok(Some(History { touched, deleted, history_id }));
                }
            }
        }
        Ok(None)
    }

    /// Arrivals and labels of `ids` (`format=minimal`), 25 per batch
    /// request. A message deleted meanwhile is simply absent.
    async fn minimal(&self, ids: &[String]) -> Result<HashMap<String, (Arrival, Vec<String>)>, BackendError> {
        let mut found = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(BATCH) {
            let mut pending: Vec<&String> = chunk.iter().collect();
            let mut attempt = 0;
            while !pending.is_empty() {
                let paths: Vec<String> = pending
                    .iter()
                    .map(|id| {
                        let mut url = self.url(&["messages", id]);
                        url.query_pairs_mut()
                            .append_pair("format", "minimal")
                            .append_pair("fields", "id,labelIds,internalDate,sizeEstimate");
                        inner_path(&url)
                    })
                    .collect();
                let parts = self.batch(&paths).await?;
                let mut retry = Vec::new();
                let mut asked = None;
                for part in parts {
                    let Some(&id) = pending.get(part.item) else { continue };
                    match part.status {
                        200 => {
                            let arrival = parse_arrival(&part.body)
                                .map_err(|e| BackendError::unavailable(format!("messages.get {id}: {e}")))?;
                            found.insert(id.clone(), arrival);
                        }
                        404 => tracing::debug!(id, "message deleted while listing"),
                        status => {
                            let what = "messages.get (batched)";
                            let code = reqwest::StatusCode::from_u16(status)
                                .unwrap_or(reqwest::StatusCode::INTERNAL_SERVER_ERROR);
                            match wire::judge(what, code, &part.body) {
                                Verdict::Retry => {
                                    retry.push(id);
                                    asked = asked.max(part.retry_after.map(Duration::from_secs));
                                }
                                Verdict::RetryAfter(wait) => {
                                    retry.push(id);
                                    asked = asked.max(Some(wait));
                                }
                                Verdict::Fail(e) => return Err(e),
                            }
                        }
                    }
                }
                if !retry.is_empty() {
                    // Parts refused for concurrency come without Retry-After:
                    // the next round waits a step longer than a lone request
                    // would (2 s, 4 s, 8 s …), so the user's other requests
                    // in flight can end first.
                    let asked = asked.or_else(|| Some(self.account.requester.retry.backoff(attempt + 1)));
                    let wait = self.account.wait_before_retry("messages.get (batched)", 429, attempt, asked)?;
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                pending = retry;
            }
        }
        Ok(found)
    }

    /// One request to the batch endpoint; its parts, each checked to answer
    /// one of `paths`.
    async fn batch(&self, paths: &[String]) -> Result<Vec<BatchPart>, BackendError> {
        let what = "batch";
        let boundary = format!("popgate_batch_{}", http::random_hex(12));
        let body = wire::batch_body(&boundary, paths);
        let mut url = self.base.clone();
        url.path_segments_mut().expect("http(s) URLs have paths").pop_if_empty().extend(["batch", "gmail", "v1"]);
        let _permit = self.account.permit().await?;
        let build = || {
            self.account
                .post(&url)
                .header(CONTENT_TYPE, format!("multipart/mixed; boundary={boundary}"))
                .timeout(self.account.requester.timeout)
                .body(body.clone())
        };
        let response = self.account.send(what, build).await?;
        let content_type = response.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let reply_boundary = wire::boundary_of(&content_type)
            .ok_or_else(|| BackendError::unavailable(format!("batch: unexpected content type {content_type:?}")))?;
        let body = http::read_limited(response, JSON_LIMIT, self.account.requester.timeout).await?;
        let parts =
            wire::parse_batch(&reply_boundary, &body).map_err(|e| BackendError::unavailable(format!("batch: {e}")))?;
        let mut seen = HashSet::new();
        if parts.len() != paths.len() || !parts.iter().all(|p| p.item < paths.len() && seen.insert(p.item)) {
            return Err(BackendError::unavailable("batch: the response does not answer each request once"));
        }
        Ok(parts)
    }

    /// The message's RFC 5322 octets, decoded from `format=raw` as they
    /// arrive. The permit is held until the stream ends or is dropped.
    async fn raw(&self, id: &str) -> Result<MessageStream<'static>, BackendError> {
        let what = "messages.get raw";
        let mut url = self.url(&["messages", id]);
        url.query_pairs_mut().append_pair("format", "raw").append_pair("fields", "raw");
        let body = self.account.download(what, || self.account.get(&url)).await?;
        let state = (body, RawExtractor::new(), false);
        let stream = futures::stream::try_unfold(state, move |(mut body, mut extractor, mut ended)| async move {
            loop {
                if extractor.is_done() || ended {
                    return Ok(None);
                }
                match body.next().await {
                    Some(chunk) => {
                        let decoded =
                            extractor.feed(&chunk?).map_err(|e| BackendError::unavailable(format!("{what}: {e}")))?;
                        if !decoded.is_empty() {
                            return Ok(Some((decoded, (body, extractor, ended))));
                        }
                    }
                    None => {
                        extractor.finish().map_err(|e| BackendError::unavailable(format!("{what}: {e}")))?;
                        ended = true;
                    }
                }
            }
        });
        Ok(stream.boxed())
    }

    /// `batchModify` or `batchDelete` of at most 1000 ids.
    async fn modify(&self, ids: &[&str], change: &Change) -> Result<(), BackendError> {
        let (what, url, body) = match change {
            Change::Labels { add, remove } => (
                "messages.batchModify",
                self.url(&["messages", "batchModify"]),
                json!({ "ids": ids, "addLabelIds": add, "removeLabelIds": remove }),
            ),
            Change::Delete => ("messages.batchDelete", self.url(&["messages", "batchDelete"]), json!({ "ids": ids })),
        };
        let body = serde_json::to_vec(&body).map_err(|e| BackendError::Permanent(format!("JSON: {e}")))?;
        let _permit = self.account.permit().await?;
        let build = || {
            self.account
                .post(&url)
                .header(CONTENT_TYPE, "application/json")
                .timeout(self.account.requester.timeout)
                .body(body.clone())
        };
        self.account.send(what, build).await?;
        Ok(())
    }
}

/// The `q` of the listing: the configured search, and `-in:sent` unless the
/// account's own messages are wanted.
fn search(query: Option<&str>, exclude_sent: bool) -> Option<String> {
    match (query.map(str::trim), exclude_sent) {
        (Some(query), true) => Some(format!("({query}) -in:sent")),
        (Some(query), false) => Some(query.to_string()),
        (None, true) => Some("-in:sent".into()),
        (None, false) => None,
    }
}

/// A 404 from a call that names no message: the account or label is gone.
fn not_a_message(error: BackendError) -> BackendError {
    match error {
        BackendError::MessageGone => {
            BackendError::Permanent("the Gmail API answered 404 (no such user or label)".into())
        }
        other => other,
    }
}

/// The path and query of a URL, as an inner batch request names it.
fn inner_path(url: &Url) -> String {
    match url.query() {
        Some(query) => format!("{}?{query}", url.path()),
        None => url.path().to_string(),
    }
}

fn parse_arrival(body: &[u8]) -> Result<(Arrival, Vec<String>), String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Minimal {
        internal_date: serde_json::Value,
        #[serde(default)]
        size_estimate: u64,
        #[serde(default)]
        label_ids: Vec<String>,
    }
    let minimal: Minimal = serde_json::from_slice(body).map_err(|e| format!("unexpected reply: {e}"))?;
    // int64 travels as a JSON string in Google's APIs; accept a number too.
    let internal_date = match &minimal.internal_date {
        serde_json::Value::String(s) => s.parse().ok(),
        serde_json::Value::Number(n) => n.as_i64(),
        _ => None,
    }
    .ok_or("no internalDate")?;
    Ok((Arrival { internal_date, size_estimate: minimal.size_estimate }, minimal.label_ids))
}

/// A uint64 as Google writes it (a JSON string), or as a number.
fn google_u64(value: &serde_json::Value) -> Option<u64> {
    match value {
        serde_json::Value::String(s) => s.parse().ok(),
        serde_json::Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

/// What `users.history.list` reported since a listing.
struct History {
    /// Named by a record and not deleted: their labels decide.
    touched: HashSet<String>,
    deleted: HashSet<String>,
    history_id: u64,
}

/// Which messages the maildrop holds, decided on their labels exactly as
/// `users.messages.list` decides with `labelIds` (and `q=-in:sent`):
/// Spam and Trash only when they are the label itself.
#[derive(Debug, Clone)]
struct Membership {
    label: String,
    exclude_sent: bool,
}

impl Membership {
    fn holds(&self, labels: &[String]) -> bool {
        let has = |wanted: &str| labels.iter().any(|l| l == wanted);
        let spam_or_trash_wanted = matches!(self.label.as_str(), "TRASH" | "SPAM");
        has(&self.label)
            && (spam_or_trash_wanted || !(has("TRASH") || has("SPAM")))
            && !(self.exclude_sent && has("SENT"))
    }
}

enum Change {
    Labels { add: Vec<String>, remove: Vec<String> },
    Delete,
}

struct GmailMailbox {
    api: Api,
    account: String,
    /// The label listed (`None`: the query alone selects).
    label: Option<String>,
    query: Option<String>,
    policy: GmailDeletePolicy,
    /// `delete_policy` as configured, for a login whose device policy
    /// leaves `on_delete` unset (a warm session may have served another).
    configured_policy: GmailDeletePolicy,
    arrivals: moka::sync::Cache<(String, String), Arrival>,
    concurrency: usize,
    listings: ListingStates<GmailListing>,
    /// Set when the maildrop can be followed by its history.
    membership: Option<Membership>,
    /// This session's token, sealed.
    seal: TokenSeal,
    /// A listing `reset` already made, for the `list` that follows it.
    prefetched: Option<Vec<ListedMessage>>,
    /// A device policy's `on_delete = "flag"`: the user label (by name)
    /// `remove` adds instead of removing; created if missing.
    flag_label: Option<String>,
}

impl GmailMailbox {
    async fn list_ids(&self) -> Result<Vec<String>, BackendError> {
        let mut ids = Vec::new();
        let mut seen = HashSet::new();
        let mut page: Option<String> = None;
        loop {
            let (page_ids, next) =
                self.api.list_page(self.label.as_deref(), self.query.as_deref(), page.as_deref()).await?;
            let fresh = page_ids.len();
            // A message that arrives while paging shifts the pages: the same
            // id can come twice.
            ids.extend(page_ids.into_iter().filter(|id| seen.insert(id.clone())));
            match next {
                Some(next) if fresh > 0 && Some(&next) != page.as_ref() => page = Some(next),
                _ => return Ok(ids),
            }
        }
    }

    /// The maildrop: from the remembered listing and the history since it
    /// when there is one, else in full.
    async fn listing(&mut self) -> Result<Vec<ListedMessage>, BackendError> {
        if let Some(membership) = self.membership.clone() {
            if let Some(known) = self.listings.get(&self.account)
                && let Some(next) = self.follow_history(&known, &membership).await?
            {
                let listed = listed_in_order(&next.members);
                self.listings.put(&self.account, next);
                return Ok(listed);
            }
            // Read before the listing: whatever changes while it is read is
            // in the history after it, and replayed at the next poll.
            let (email, history_id) = self.api.profile().await?;
            let members = self.members_in_full().await?;
            let listed = listed_in_order(&members);
            self.listings.put(&self.account, GmailListing { email, seals: vec![self.seal], history_id, members });
            return Ok(listed);
        }
        Ok(listed_in_order(&self.members_in_full().await?))
    }

    /// `known` brought up to date from the history since it; `None` to list
    /// in full (history too old or too long, or another mailbox).
    async fn follow_history(
        &self,
        known: &GmailListing,
        membership: &Membership,
    ) -> Result<Option<GmailListing>, BackendError> {
        let mut seals = known.seals.clone();
        if !seals.contains(&self.seal) {
            // A token not seen before (a refreshed one): the listing is
            // continued only for the mailbox it was made of.
            let (email, _) = self.api.profile().await?;
            if email != known.email {
                return Ok(None);
            }
            if seals.len() >= SEALS {
                seals.remove(0);
            }
            seals.push(self.seal);
        }
        let Some(history) = self.api.history(known.history_id).await? else {
            tracing::debug!("Gmail history unavailable since the last listing; listing in full");
            return Ok(None);
        };
        let mut members = known.members.clone();
        for id in &history.deleted {
            members.remove(id);
        }
        let touched: Vec<String> = history.touched.into_iter().collect();
        let now = if touched.is_empty() { HashMap::new() } else { self.api.minimal(&touched).await? };
        for id in touched {
            match now.get(&id) {
                Some((arrival, labels)) if membership.holds(labels) => {
                    self.arrivals.insert((self.account.clone(), id.clone()), *arrival);
                    members.insert(id, *arrival);
                }
                // Left the maildrop, or deleted since the history was read.
                _ => {
                    members.remove(&id);
                }
            }
        }
        Ok(Some(GmailListing { email: known.email.clone(), seals, history_id: history.history_id, members }))
    }

    /// After `remove`: what it removed leaves the remembered listing; after
    /// a failure nothing is assumed, and the next poll lists in full.
    fn after_removal(&self, ids: &[StoreId], all_removed: bool) {
        if !all_removed {
            self.listings.forget(&self.account);
            return;
        }
        self.listings.drop_messages(&self.account, |known| {
            let mut next = known.clone();
            for id in ids {
                next.members.remove(&id.0);
            }
            next
        });
    }

    /// Every message in the maildrop with its arrival, by `messages.list`
    /// and, for messages new to this process, `format=minimal`.
    async fn members_in_full(&self) -> Result<HashMap<String, Arrival>, BackendError> {
        let ids = self.list_ids().await?;
        let key = |id: &String| (self.account.clone(), id.clone());
        let unknown: Vec<String> = ids.iter().filter(|id| !self.arrivals.contains_key(&key(id))).cloned().collect();
        let mut fetched = HashMap::new();
        if !unknown.is_empty() {
            tracing::debug!(messages = unknown.len(), "asking Gmail for arrival dates");
            fetched = self.api.arrivals(&unknown).await?;
            for (id, arrival) in &fetched {
                self.arrivals.insert((self.account.clone(), id.clone()), *arrival);
            }
        }
        // From what was fetched first: the cache may already have evicted it.
        Ok(ids
            .into_iter()
            .filter_map(|id| {
                let arrival = fetched.get(&id).copied().or_else(|| self.arrivals.get(&key(&id)))?;
                Some((id, arrival))
            })
            .collect())
    }

    fn change(&self) -> Change {
        let label = self.label.clone().unwrap_or_else(|| "INBOX".into());
        match self.policy {
            GmailDeletePolicy::Trash => {
                let remove = if label == "TRASH" { Vec::new() } else { vec![label] };
                Change::Labels { add: vec!["TRASH".into()], remove }
            }
            GmailDeletePolicy::Archive => Change::Labels { add: Vec::new(), remove: vec![label] },
            GmailDeletePolicy::Delete => Change::Delete,
        }
    }
}

#[async_trait]
impl Mailbox for GmailMailbox {
    /// A warm session checks that its token still works, so an expired one
    /// is discarded and the login refreshes it. When the listing can follow
    /// the history, that request is the check (a 401 there is `AuthFailed`
    /// too), and its listing is kept for the `list` that follows.
    async fn reset(&mut self) -> Result<(), BackendError> {
        self.prefetched = None;
        if self.membership.is_some() && self.listings.get(&self.account).is_some() {
            let listed = self.listing().await?;
            self.prefetched = Some(listed);
            return Ok(());
        }
        self.api.labels().await.map(|_| ())
    }

    async fn list(&mut self) -> Result<Vec<ListedMessage>, BackendError> {
        if let Some(listed) = self.prefetched.take() {
            return Ok(listed);
        }
        self.listing().await.map_err(in_session)
    }

    async fn fetch(&mut self, id: &StoreId) -> Result<MessageStream<'_>, BackendError> {
        self.api.raw(&id.0).await.map_err(in_session)
    }

    /// Downloads `max_concurrent_requests` messages at a time.
    async fn canonical_sizes(&mut self, ids: &[StoreId]) -> Result<Vec<Option<u64>>, BackendError> {
        let api = &self.api;
        http::api::measure_downloads(ids, self.concurrency, |id| api.raw(&id.0)).await
    }

    /// The device policy's `on_delete` in `delete_policy` terms; flag adds
    /// a user label (`flag_label`) instead of removing.
    fn dispose_as(&mut self, disposal: &Disposal) -> Result<(), BackendError> {
        self.policy = match disposal {
            Disposal::AsConfigured => self.configured_policy,
            Disposal::Expunge => GmailDeletePolicy::Delete,
            Disposal::Trash => GmailDeletePolicy::Trash,
            Disposal::Archive { folder: None } => GmailDeletePolicy::Archive,
            Disposal::Flag { .. } => self.configured_policy,
            other => {
                return Err(BackendError::Permanent(format!(
                    "on_delete = \"{}\" (with these settings) is not supported by the gmail backend yet",
                    other.word()
                )));
            }
        };
        self.flag_label = match disposal {
            Disposal::Flag { keyword } => Some(keyword.clone()),
            _ => None,
        };
        Ok(())
    }

    /// Read: without the `UNREAD` label (`format=minimal`, batched).
    async fn seen(&mut self, ids: &[StoreId]) -> Result<Vec<bool>, BackendError> {
        let wanted: Vec<String> = ids.iter().map(|id| id.0.clone()).collect();
        let found = self.api.minimal(&wanted).await.map_err(in_session)?;
        Ok(wanted
            .iter()
            .map(|id| found.get(id).is_some_and(|(_, labels)| !labels.iter().any(|l| l == "UNREAD")))
            .collect())
    }

    /// The user label named `keyword` among each message's labels; no such
    /// label in the account: none carries it.
    async fn carrying(&mut self, ids: &[StoreId], keyword: &str) -> Result<Vec<bool>, BackendError> {
        let labels = self.api.labels().await.map_err(in_session)?;
        let Some(label) = labels.into_iter().find(|l| l.name.eq_ignore_ascii_case(keyword)) else {
            return Ok(vec![false; ids.len()]);
        };
        let wanted: Vec<String> = ids.iter().map(|id| id.0.clone()).collect();
        let found = self.api.minimal(&wanted).await.map_err(in_session)?;
        Ok(wanted.iter().map(|id| found.get(id).is_some_and(|(_, labels)| labels.contains(&label.id))).collect())
    }

    async fn remove(&mut self, ids: &[StoreId]) -> Result<(), BackendError> {
        let flagging = self.flag_label.is_some();
        let change = match &self.flag_label {
            Some(name) => Change::Labels {
                add: vec![self.api.label_id_or_create(name).await.map_err(in_session)?],
                remove: Vec::new(),
            },
            None => self.change(),
        };
        let verb = match self.policy {
            _ if flagging => "flagged",
            GmailDeletePolicy::Trash => "moved to the trash",
            GmailDeletePolicy::Archive => "archived",
            GmailDeletePolicy::Delete => "deleted",
        };
        // (messages not removed, why) per failed call.
        let mut failures: Vec<(usize, BackendError)> = Vec::new();
        for (n, chunk) in ids.chunks(MODIFY_BATCH).enumerate() {
            let chunk: Vec<&str> = chunk.iter().map(|id| id.0.as_str()).collect();
            match self.api.modify(&chunk, &change).await {
                Ok(()) => {}
                // Gmail documents no 404 here ("no guarantees that messages
                // were not already deleted or even existed": ids it does not
                // know are skipped). Should it refuse the whole call for one
                // id all the same: one by one, where a message already gone
                // is done.
                Err(BackendError::MessageGone) => {
                    for id in &chunk {
                        match self.api.modify(&[id], &change).await {
                            Ok(()) | Err(BackendError::MessageGone) => {}
                            Err(e) => failures.push((1, e)),
                        }
                    }
                }
                Err(e) => failures.push((chunk.len(), e)),
            }
            // E.g. no scope for `delete`: the same request would fail again.
            // Said as such ([SYS/PERM]), never hidden.
            if let Some((_, BackendError::Permanent(why))) = failures.last() {
                let untried = ids.len().saturating_sub((n + 1) * MODIFY_BATCH);
                let failed = failures.iter().map(|(count, _)| count).sum::<usize>() + untried;
                tracing::warn!(failed, why, "Gmail refused to remove messages");
                return Err(BackendError::Permanent(format!(
                    "{failed} of {} messages could not be {verb}: {why}",
                    ids.len()
                )));
            }
        }
        let failed: usize = failures.iter().map(|(n, _)| n).sum();
        let first_error = failures.into_iter().next().map(|(_, e)| e);
        // Flagged messages stay in the maildrop's label: not dropped from
        // the remembered listing (the next poll lists afresh).
        self.after_removal(ids, failed == 0 && !flagging);
        if failed == 0 {
            return Ok(());
        }
        Err(http::api::not_removed(failed, ids.len(), verb, first_error.map(in_session)))
    }

    async fn close(self: Box<Self>) {
        // Stateless over HTTP: nothing to log out of.
    }
}

/// The maildrop oldest first (by `internalDate`, then id).
fn listed_in_order(members: &HashMap<String, Arrival>) -> Vec<ListedMessage> {
    let mut listed: Vec<(&String, &Arrival)> = members.iter().collect();
    listed.sort_by(|(a_id, a), (b_id, b)| a.internal_date.cmp(&b.internal_date).then_with(|| a_id.cmp(b_id)));
    listed
        .into_iter()
        .map(|(id, arrival)| ListedMessage {
            uidl: uidl_for(id),
            id: StoreId(id.clone()),
            size: ReportedSize::Claimed(arrival.size_estimate),
        })
        .collect()
}

/// Gmail message ids are short hex strings and used as they are; anything
/// that is no valid UIDL (none is known) is hashed (`http::hashed_uidl`).
pub fn uidl_for(id: &str) -> String {
    if http::is_valid_uidl(id) { id.to_string() } else { http::hashed_uidl(id) }
}

#[cfg(test)]
mod tests;

impl GmailBackend {
    /// Sends a finished MIME message as the account (`users.messages.send`
    /// with the message base64url-encoded in `raw`). `Ok` only once Gmail
    /// answered 200; Gmail puts it in SENT. Never retried (see
    /// `super::send`).
    pub async fn send_mime(&self, token: &crate::mail::Secret, mime: &[u8]) -> Result<(), super::send::SendRefusal> {
        use base64::Engine;
        let authorization = super::send::authorization(token)?;
        let mut url = self.endpoint.base.clone();
        url.path_segments_mut()
            .expect("http(s) URLs have paths")
            .pop_if_empty()
            .extend(["gmail", "v1", "users", "me", "messages", "send"]);
        let raw = base64::engine::general_purpose::URL_SAFE.encode(mime);
        let body = serde_json::to_vec(&json!({ "raw": raw }))
            .map_err(|e| super::send::SendRefusal::Permanent { status: 0, reason: format!("JSON: {e}") })?;
        let request = self
            .endpoint
            .requester
            .client
            .post(url)
            .header(reqwest::header::AUTHORIZATION, authorization)
            .header(CONTENT_TYPE, "application/json")
            .body(body);
        let timeout = Duration::from_secs(self.config.timeout_secs);
        let reason = |body: &[u8]| {
            let error = wire::GoogleError::parse(body);
            error.reason().to_string()
        };
        super::send::post_once("messages.send", request, timeout, reqwest::StatusCode::OK, reason).await
    }
}
