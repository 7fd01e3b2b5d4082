//! The Microsoft Graph backend (v1.0 mail API): a POP3 maildrop over one
//! Outlook mail folder, with its `GraphConfig` beside it.
//!
//! Every request says `Prefer: IdType="ImmutableId"`, so a message keeps its
//! id when it is moved and the UIDL (a hash of the id) stays stable. A login
//! checks the OAuth access token by reading the folder (a 401 there is
//! `AuthFailed`, so a router can refresh the token and retry); `list` is
//! a delta query on the folder (`mailFolders/{id}/messages/delta`): in full
//! the first time, by `@odata.nextLink`, and from then on one request to the
//! remembered `@odata.deltaLink`, which answers only what changed (`listing`
//! below; a 410 or any doubt lists in full again). Without remembered
//! state it pages through `mailFolders/{id}/messages?$orderby=
//! receivedDateTime`. Either way the maildrop is ordered by
//! `receivedDateTime`, then id. `fetch` streams `$value` (the MIME octets). Graph reports no sizes, so every size is `Claimed(0)` and
//! measured once by downloading. `remove` moves to Deleted Items or deletes
//! permanently with JSON `$batch` requests of 20.
//!
//! Outlook allows 4 concurrent requests per mailbox and app: the requests of
//! all POP3 sessions reaching one mailbox share `max_concurrent_requests`
//! (at most 4) permits. 429/503 are retried after `Retry-After`. It never
//! changes anything except in `remove`, and there exactly the messages it is
//! given; a message it could not remove is reported, never hidden.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::StatusCode;
use reqwest::header::CONTENT_TYPE;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use url::Url;

use super::http::api::{
    AccountApi, Endpoint, default_concurrency, default_max_wait, default_retries, default_timeout, in_session,
};
use super::http::listing::{self as states, ListingStates, Remembered};
use super::http::{self, RetryPolicy, Verdict};
use super::{Backend, Disposal, ListedMessage, Mailbox, MessageStream, ReportedSize};
use crate::mail::{BackendError, Credentials, InvalidSetting, StoreId};

/// What "delete" means when a POP3 client deletes a message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GraphDeletePolicy {
    /// `POST /messages/{id}/move` to the well-known folder `deleteditems`.
    #[default]
    Move,
    /// `POST /messages/{id}/permanentDelete`: gone, not recoverable by the
    /// user (Exchange may keep it for retention).
    PermanentDelete,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphConfig {
    /// Where the API is (the version root); tests point this at a stand-in.
    #[serde(default = "default_api_base")]
    pub api_base: String,
    /// `me` (delegated tokens: the signed-in user's mailbox) or a user
    /// principal name / object id (app-only tokens: `/users/{user}`).
    #[serde(default = "default_user")]
    pub user: String,
    /// The folder POP3 shows: a well-known name (`inbox`, `archive`, …) or
    /// a folder id.
    #[serde(default = "default_folder")]
    pub folder: String,
    /// `move` (to Deleted Items, default) or `permanent_delete`.
    #[serde(default)]
    pub delete_policy: GraphDeletePolicy,
    /// Time limit in seconds for each HTTP request (for a download: for the
    /// response to start, then for each read of its body).
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Requests in flight at once per mailbox, across its POP3 sessions
    /// (Outlook allows 4); also how many messages are measured at once.
    #[serde(default = "default_concurrency")]
    pub max_concurrent_requests: usize,
    /// Retries of a throttled request (429, 503, 5xx).
    #[serde(default = "default_retries")]
    pub max_retries: u32,
    /// The longest wait before a retry; a longer `Retry-After` ends the
    /// attempt with `-ERR [SYS/TEMP]` instead.
    #[serde(default = "default_max_wait")]
    pub max_retry_wait_secs: u64,
    /// PEM file of CA certificates to trust instead of the webpki roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Messages remembered across mailboxes so that a poll asks only what
    /// changed (the folder's delta link); 0 lists every folder in full every
    /// time.
    #[serde(default = "states::default_state_messages")]
    pub listing_state_messages: u64,
    /// Seconds a mailbox's remembered listing is kept unused.
    #[serde(default = "states::default_state_idle_secs")]
    pub listing_state_idle_secs: u64,
    /// Requests per mailbox in each `mailbox_window_secs` (Outlook allows an
    /// app 10 000 per mailbox per 10 minutes), counted across replicas when
    /// `[state] url` is set; once spent, devices get `-ERR [SYS/TEMP]`
    /// instead of requests being sent.
    #[serde(default = "default_mailbox_requests")]
    pub mailbox_requests_per_window: u64,
    #[serde(default = "default_mailbox_window")]
    pub mailbox_window_secs: u64,
}

fn default_mailbox_requests() -> u64 {
    10_000
}

fn default_mailbox_window() -> u64 {
    600
}

fn default_api_base() -> String {
    "https://graph.microsoft.com/v1.0".into()
}

fn default_user() -> String {
    "me".into()
}

fn default_folder() -> String {
    "inbox".into()
}

impl Default for GraphConfig {
    fn default() -> Self {
        GraphConfig {
            api_base: default_api_base(),
            user: default_user(),
            folder: default_folder(),
            delete_policy: GraphDeletePolicy::default(),
            timeout_secs: default_timeout(),
            max_concurrent_requests: default_concurrency(),
            max_retries: default_retries(),
            max_retry_wait_secs: default_max_wait(),
            ca_file: None,
            listing_state_messages: states::default_state_messages(),
            listing_state_idle_secs: states::default_state_idle_secs(),
            mailbox_requests_per_window: default_mailbox_requests(),
            mailbox_window_secs: default_mailbox_window(),
        }
    }
}

impl GraphConfig {
    /// `graph:` (the inbox) or `graph:FOLDER`.
    pub fn with_folder(folder: Option<String>) -> Self {
        GraphConfig { folder: folder.unwrap_or_else(default_folder), ..GraphConfig::default() }
    }

    /// Checks what serde cannot; the error names the key at fault.
    pub fn check(&self) -> Result<(), InvalidSetting> {
        http::api_base(&self.api_base).map_err(|why| InvalidSetting::new("api_base", why))?;
        if self.user.trim().is_empty() {
            return Err(InvalidSetting::new("user", "must not be empty (\"me\" for delegated tokens)"));
        }
        if self.folder.trim().is_empty() {
            return Err(InvalidSetting::new("folder", "must not be empty (leave it out for the inbox)"));
        }
        InvalidSetting::bounded("timeout_secs", self.timeout_secs, 1..=3_600)?;
        if !(1..=4).contains(&self.max_concurrent_requests) {
            return Err(InvalidSetting::new("max_concurrent_requests", "must be between 1 and 4 (Outlook's limit)"));
        }
        InvalidSetting::bounded("max_retry_wait_secs", self.max_retry_wait_secs, 1..=3_600)?;
        InvalidSetting::bounded("max_retries", self.max_retries, 0..=10)?;
        states::check_settings(self.listing_state_messages, self.listing_state_idle_secs)?;
        InvalidSetting::bounded("mailbox_requests_per_window", self.mailbox_requests_per_window, 1..=1_000_000)?;
        InvalidSetting::bounded("mailbox_window_secs", self.mailbox_window_secs, 1..=86_400)?;
        if self.delete_policy == GraphDeletePolicy::PermanentDelete
            && let Some(cloud) = national_cloud(&self.api_base)
        {
            return Err(InvalidSetting::new(
                "delete_policy",
                format!("Graph has no permanentDelete in {cloud} (global service only): use \"move\""),
            ));
        }
        if self.delete_policy == GraphDeletePolicy::Move && self.folder.eq_ignore_ascii_case("deleteditems") {
            return Err(InvalidSetting::new(
                "delete_policy",
                "moving out of deleteditems into deleteditems removes nothing: use \"permanent_delete\"",
            ));
        }
        Ok(())
    }
}

/// The national cloud `api_base` points into, if any: Microsoft's reference
/// marks `message: permanentDelete` "Global service only" (not in US
/// Government L4 and L5 (DOD), nor China operated by 21Vianet).
fn national_cloud(api_base: &str) -> Option<&'static str> {
    let host = Url::parse(api_base).ok()?.host_str()?.to_ascii_lowercase();
    [
        ("graph.microsoft.us", "US Government L4 (graph.microsoft.us)"),
        ("dod-graph.microsoft.us", "US Government L5 / DOD (dod-graph.microsoft.us)"),
        ("microsoftgraph.chinacloudapi.cn", "China operated by 21Vianet (microsoftgraph.chinacloudapi.cn)"),
    ]
    .into_iter()
    .find(|(cloud, _)| host == *cloud)
    .map(|(_, name)| name)
}

/// Messages per listing page.
const PAGE: usize = 500;
/// Requests per `$batch` (Graph's limit).
const BATCH: usize = 20;
/// Listing and batch bodies are read only this far.
const JSON_LIMIT: usize = 16 * 1024 * 1024;
const PREFER_IMMUTABLE: &str = "IdType=\"ImmutableId\"";
/// Messages per delta page (Graph's default is 10).
const DELTA_PAGE_SIZE: &str = "odata.maxpagesize=500";
/// Delta pages followed from a delta link before listing in full is the
/// cheaper way.
const DELTA_PAGES: usize = 8;

pub struct GraphBackend {
    config: GraphConfig,
    endpoint: Endpoint,
    listings: ListingStates<GraphListing>,
}

/// A folder's messages at one delta link: where the next poll starts.
struct GraphListing {
    delta_link: Url,
    /// Message id → `receivedDateTime`.
    members: HashMap<String, String>,
}

impl Remembered for GraphListing {
    fn messages(&self) -> usize {
        self.members.len()
    }
}

impl GraphBackend {
    pub fn new(config: GraphConfig) -> Result<Self, BackendError> {
        config.check().map_err(http::api::config_error)?;
        let retry =
            RetryPolicy { retries: config.max_retries, max_wait: Duration::from_secs(config.max_retry_wait_secs) };
        let budget = http::RequestBudget {
            requests: config.mailbox_requests_per_window,
            window: Duration::from_secs(config.mailbox_window_secs),
        };
        // Outlook's limits are per app and mailbox, whichever replica sends:
        // the budget and the 4 concurrent requests count across replicas.
        let endpoint = Endpoint::new(&config.api_base, config.ca_file.as_deref(), config.timeout_secs, retry)?
            .with_budget(budget)
            .with_shared_concurrency();
        let listings = ListingStates::new(config.listing_state_messages, config.listing_state_idle_secs);
        Ok(GraphBackend { config, endpoint, listings })
    }
}

#[async_trait]
impl Backend for GraphBackend {
    fn kind(&self) -> &'static str {
        "graph"
    }

    fn accepts_bearer_tokens(&self) -> bool {
        true
    }

    async fn probe(&self) -> Result<(), BackendError> {
        self.endpoint.probe().await
    }

    async fn open(&self, credentials: &Credentials) -> Result<Box<dyn Mailbox>, BackendError> {
        let token = http::api::bearer_only(credentials, "the Microsoft Graph backend")?;
        // Outlook counts concurrent requests per mailbox: with app-only
        // access many logins may reach the same one.
        let mailbox_key = if self.config.user == "me" { credentials.user.as_str() } else { self.config.user.as_str() };
        let account = self.endpoint.account(mailbox_key, self.config.max_concurrent_requests, &token, judge);
        let api = Api { account, base: self.endpoint.base.clone(), user: self.config.user.clone() };
        let folder_id = api.folder_id(&self.config.folder).await?;
        // The folder id was just read with this token: a listing is only
        // ever continued for the folder it describes.
        let listing_key = format!("{mailbox_key}\n{folder_id}");
        Ok(Box::new(GraphMailbox {
            api,
            folder: self.config.folder.clone(),
            folder_id,
            policy: self.config.delete_policy,
            configured_policy: self.config.delete_policy,
            move_to: DELETED_ITEMS,
            concurrency: self.config.max_concurrent_requests,
            listings: self.listings.clone(),
            listing_key,
            prefetched: None,
            flag_category: None,
        }))
    }
}

/// `{"error":{"code":"InvalidAuthenticationToken","message":…}}`.
fn error_code(body: &[u8]) -> (String, String) {
    let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let field = |key: &str| value["error"][key].as_str().unwrap_or("").to_string();
    (field("code"), field("message"))
}

/// What an error answer from Graph means for POP3.
fn judge(what: &str, status: StatusCode, body: &[u8]) -> Verdict {
    let (code, message) = error_code(body);
    match status.as_u16() {
        401 => Verdict::Fail(BackendError::AuthFailed),
        429 | 500 | 502 | 503 | 504 => Verdict::Retry,
        // 410: a delta link whose sync state Graph no longer has.
        404 | 410 => Verdict::Fail(BackendError::MessageGone),
        status => {
            tracing::warn!(what, status, code, message, "Microsoft Graph refused the request");
            let code = if code.is_empty() { "(no code)" } else { code.as_str() };
            Verdict::Fail(BackendError::Permanent(format!("{what}: HTTP {status} {code}")))
        }
    }
}

/// HTTP to one mailbox.
struct Api {
    account: AccountApi,
    base: Url,
    /// `me`, or the user of `/users/{user}`.
    user: String,
}

impl Api {
    /// `{base}/me/{segments…}` or `{base}/users/{user}/{segments…}`.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        {
            let mut path = url.path_segments_mut().expect("http(s) URLs have paths");
            path.pop_if_empty();
            if self.user == "me" {
                path.push("me");
            } else {
                path.extend(["users", self.user.as_str()]);
            }
            path.extend(segments);
        }
        url
    }

    /// A URL as a `$batch` request names it: relative to the version root.
    fn relative(&self, url: &Url) -> String {
        let root = self.base.path().trim_end_matches('/');
        let path = url.path().strip_prefix(root).unwrap_or(url.path());
        match url.query() {
            Some(query) => format!("{path}?{query}"),
            None => path.to_string(),
        }
    }

    fn get(&self, url: &Url) -> reqwest::RequestBuilder {
        self.account.get(url).header("Prefer", PREFER_IMMUTABLE)
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, what: &str, url: &Url) -> Result<T, BackendError> {
        self.account.json(what, JSON_LIMIT, || self.get(url)).await
    }

    async fn folder_id(&self, folder: &str) -> Result<String, BackendError> {
        #[derive(Deserialize)]
        struct Folder {
            id: String,
        }
        let mut url = self.url(&["mailFolders", folder]);
        url.query_pairs_mut().append_pair("$select", "id,displayName");
        match self.get_json::<Folder>("mailFolders get", &url).await {
            Ok(found) => Ok(found.id),
            Err(BackendError::MessageGone) => {
                tracing::warn!(folder, user = %self.user, "configured Graph mail folder (or user) not found");
                Err(BackendError::Permanent(format!("no mail folder {folder:?} for user {:?}", self.user)))
            }
            Err(e) => Err(e),
        }
    }

    /// A next link is followed only back to the API itself: the token must
    /// not go anywhere else.
    fn check_next_link(&self, link: &str) -> Result<Url, BackendError> {
        let url = Url::parse(link).map_err(|e| BackendError::unavailable(format!("bad @odata.nextLink: {e}")))?;
        let same_origin = url.scheme() == self.base.scheme()
            && url.host_str() == self.base.host_str()
            && url.port_or_known_default() == self.base.port_or_known_default()
            && url.path().starts_with(self.base.path().trim_end_matches('/'));
        if !same_origin {
            tracing::warn!(next = %url.origin().ascii_serialization(), "@odata.nextLink leaves the API; not followed");
            return Err(BackendError::unavailable("@odata.nextLink points outside the API"));
        }
        Ok(url)
    }

    /// Every message of the folder: id → `receivedDateTime`.
    async fn message_ids(&self, folder_id: &str) -> Result<HashMap<String, String>, BackendError> {
        #[derive(Deserialize)]
        struct Page {
            #[serde(default)]
            value: Vec<Listed>,
            #[serde(rename = "@odata.nextLink")]
            next_link: Option<String>,
        }
        #[derive(Deserialize)]
        struct Listed {
            id: String,
            #[serde(rename = "receivedDateTime", default)]
            received: String,
        }
        let mut url = self.url(&["mailFolders", folder_id, "messages"]);
        url.query_pairs_mut()
            .append_pair("$select", "id,receivedDateTime")
            .append_pair("$orderby", "receivedDateTime")
            .append_pair("$top", &PAGE.to_string());
        let mut ids = HashMap::new();
        loop {
            let page: Page = self.get_json("messages list", &url).await.map_err(|e| match e {
                BackendError::MessageGone => BackendError::Permanent("the mail folder is gone".into()),
                other => other,
            })?;
            let fresh = page.value.len();
            // A message arriving while paging shifts $skip: repeats are one.
            ids.extend(page.value.into_iter().map(|m| (m.id, m.received)));
            match page.next_link {
                Some(next) if fresh > 0 => url = self.check_next_link(&next)?,
                _ => return Ok(ids),
            }
        }
    }

    /// Follows a delta query from `url` (the folder's delta, or a delta
    /// link) page by page to its new delta link, applying each page to
    /// `members`; `pages` bounds the pages followed (`None` beyond).
    async fn delta(
        &self,
        mut url: Url,
        members: &mut HashMap<String, String>,
        pages: Option<usize>,
    ) -> Result<Option<Url>, BackendError> {
        #[derive(Deserialize)]
        struct Page {
            #[serde(default)]
            value: Vec<Item>,
            #[serde(rename = "@odata.nextLink")]
            next_link: Option<String>,
            #[serde(rename = "@odata.deltaLink")]
            delta_link: Option<String>,
        }
        #[derive(Deserialize)]
        struct Item {
            id: String,
            #[serde(rename = "receivedDateTime")]
            received: Option<String>,
            #[serde(rename = "@removed")]
            removed: Option<Value>,
        }
        let mut followed = 0;
        loop {
            if pages.is_some_and(|most| followed >= most) {
                return Ok(None);
            }
            followed += 1;
            let page: Page = self
                .account
                .json("messages delta", JSON_LIMIT, || self.get(&url).header("Prefer", DELTA_PAGE_SIZE))
                .await?;
            for item in page.value {
                match (item.removed, item.received) {
                    // Deleted, or moved out of the folder.
                    (Some(_), _) => {
                        members.remove(&item.id);
                    }
                    (None, Some(received)) => {
                        members.insert(item.id, received);
                    }
                    (None, None) => {
                        return Err(BackendError::unavailable("messages delta: an item without receivedDateTime"));
                    }
                }
            }
            match (page.next_link, page.delta_link) {
                (Some(next), _) => url = self.check_next_link(&next)?,
                (None, Some(delta)) => return Ok(Some(self.check_next_link(&delta)?)),
                (None, None) => {
                    return Err(BackendError::unavailable("messages delta: neither a next nor a delta link"));
                }
            }
        }
    }

    /// The MIME octets (`$value`) as they arrive; the permit is held until
    /// the stream ends or is dropped.
    async fn content(&self, id: &str) -> Result<MessageStream<'static>, BackendError> {
        let what = "message $value";
        let url = self.url(&["messages", id, "$value"]);
        self.account.download(what, || self.get(&url)).await
    }

    /// One `$batch` of at most 20 POSTs; the answers by request index.
    async fn batch(&self, requests: &[Value]) -> Result<Vec<(usize, u16, Option<u64>, Value)>, BackendError> {
        #[derive(Deserialize)]
        struct Answers {
            responses: Vec<Answer>,
        }
        #[derive(Deserialize)]
        struct Answer {
            id: String,
            status: u16,
            #[serde(default)]
            headers: serde_json::Map<String, Value>,
            #[serde(default)]
            body: Value,
        }
        let what = "$batch";
        let mut url = self.base.clone();
        url.path_segments_mut().expect("http(s) URLs have paths").pop_if_empty().push("$batch");
        let body = serde_json::to_vec(&json!({ "requests": requests }))
            .map_err(|e| BackendError::Permanent(format!("JSON: {e}")))?;
        let build = || {
            self.account
                .post(&url)
                .header("Prefer", PREFER_IMMUTABLE)
                .header(CONTENT_TYPE, "application/json")
                .body(body.clone())
        };
        // Outlook runs up to 4 of a batch's requests at once, each counted
        // against the mailbox's 4 concurrent requests: the batch holds as
        // many permits, or its moves would be refused (MailboxConcurrency).
        let answers: Answers = self.account.json_of_batch(what, JSON_LIMIT, requests.len(), build).await?;
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(answers.responses.len());
        for answer in answers.responses {
            let index: usize =
                answer.id.parse().ok().filter(|&i| i < requests.len() && seen.insert(i)).ok_or_else(|| {
                    BackendError::unavailable(format!("$batch: unexpected response id {:?}", answer.id))
                })?;
            let retry_after = answer
                .headers
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case("retry-after"))
                .and_then(|(_, v)| v.as_str().and_then(|s| s.trim().parse().ok()).or_else(|| v.as_u64()));
            out.push((index, answer.status, retry_after, answer.body));
        }
        if out.len() != requests.len() {
            return Err(BackendError::unavailable("$batch: not every request was answered"));
        }
        Ok(out)
    }
}

struct GraphMailbox {
    api: Api,
    /// As configured (for messages), and as Graph names it.
    folder: String,
    folder_id: String,
    policy: GraphDeletePolicy,
    /// `delete_policy` as configured, for a login whose device policy
    /// leaves `on_delete` unset (a warm session may have served another).
    configured_policy: GraphDeletePolicy,
    /// The well-known folder `GraphDeletePolicy::Move` moves to.
    move_to: &'static str,
    concurrency: usize,
    listings: ListingStates<GraphListing>,
    listing_key: String,
    /// A listing `reset` already made, for the `list` that follows it.
    prefetched: Option<Vec<ListedMessage>>,
    /// A device policy's `on_delete = "flag"`: the category `remove` adds
    /// instead of removing.
    flag_category: Option<String>,
}

const DELETED_ITEMS: &str = "deleteditems";

impl GraphMailbox {
    /// The maildrop: from the remembered delta link when there is one, else
    /// in full (a delta query from scratch when listings are remembered).
    async fn listing(&mut self) -> Result<Vec<ListedMessage>, BackendError> {
        if !self.listings.enabled() {
            return Ok(listed_in_order(&self.api.message_ids(&self.folder_id).await?));
        }
        if let Some(known) = self.listings.get(&self.listing_key) {
            let mut members = known.members.clone();
            match self.api.delta(known.delta_link.clone(), &mut members, Some(DELTA_PAGES)).await {
                Ok(Some(delta_link)) => {
                    let listed = listed_in_order(&members);
                    self.listings.put(&self.listing_key, GraphListing { delta_link, members });
                    return Ok(listed);
                }
                Ok(None) => tracing::debug!("too many changes since the last poll; listing in full"),
                // 410 (the sync state is gone), a refusal of the link: start
                // over. A failure of the service itself is the poll's.
                Err(BackendError::MessageGone | BackendError::Permanent(_)) => {
                    tracing::debug!("the delta link is no longer valid; listing in full");
                }
                Err(e) => return Err(e),
            }
        }
        let mut url = self.api.url(&["mailFolders", &self.folder_id, "messages", "delta"]);
        url.query_pairs_mut().append_pair("$select", "id,receivedDateTime");
        let mut members = HashMap::new();
        let delta_link = self.api.delta(url, &mut members, None).await.map_err(|e| match e {
            BackendError::MessageGone => BackendError::Permanent("the mail folder is gone".into()),
            other => other,
        })?;
        let listed = listed_in_order(&members);
        match delta_link {
            Some(delta_link) => self.listings.put(&self.listing_key, GraphListing { delta_link, members }),
            None => self.listings.forget(&self.listing_key),
        }
        Ok(listed)
    }

    /// After `remove`: what it removed leaves the remembered listing; after
    /// a failure nothing is assumed, and the next poll lists in full.
    fn after_removal(&self, ids: &[StoreId], all_removed: bool) {
        if !all_removed {
            self.listings.forget(&self.listing_key);
            return;
        }
        self.listings.drop_messages(&self.listing_key, |known| {
            let mut members = known.members.clone();
            for id in ids {
                members.remove(&id.0);
            }
            GraphListing { delta_link: known.delta_link.clone(), members }
        });
    }

    fn removal(&self, id: &str, index: usize) -> Value {
        let headers = json!({ "Content-Type": "application/json", "Prefer": PREFER_IMMUTABLE });
        match self.policy {
            GraphDeletePolicy::Move => json!({
                "id": index.to_string(),
                "method": "POST",
                "url": self.api.relative(&self.api.url(&["messages", id, "move"])),
                "headers": headers,
                "body": { "destinationId": self.move_to },
            }),
            GraphDeletePolicy::PermanentDelete => json!({
                "id": index.to_string(),
                "method": "POST",
                "url": self.api.relative(&self.api.url(&["messages", id, "permanentDelete"])),
                "headers": { "Prefer": PREFER_IMMUTABLE },
            }),
        }
    }

    /// `isRead` and `categories` of each of `ids` (`$batch`ed GETs); a
    /// message not found is absent. Throttled items are asked again as
    /// `remove_batch` does; any other failure fails the whole call (the
    /// login is refused as temporary, never half-filtered).
    async fn read_states(&self, ids: &[StoreId]) -> Result<HashMap<String, (bool, Vec<String>)>, BackendError> {
        let mut found = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(BATCH) {
            let mut pending: Vec<&str> = chunk.iter().map(|id| id.0.as_str()).collect();
            let mut attempt = 0;
            while !pending.is_empty() {
                let requests: Vec<Value> = pending
                    .iter()
                    .enumerate()
                    .map(|(i, id)| {
                        let mut url = self.api.url(&["messages", id]);
                        url.query_pairs_mut().append_pair("$select", "id,isRead,categories");
                        json!({ "id": i.to_string(), "method": "GET", "url": self.api.relative(&url),
                                "headers": { "Prefer": PREFER_IMMUTABLE } })
                    })
                    .collect();
                let mut retry = Vec::new();
                let mut asked: Option<u64> = None;
                for (index, status, retry_after, body) in self.api.batch(&requests).await? {
                    let id = pending[index];
                    match status {
                        200 => {
                            let read = body.get("isRead").and_then(Value::as_bool).unwrap_or(false);
                            let categories = body
                                .get("categories")
                                .and_then(Value::as_array)
                                .map(|c| c.iter().filter_map(Value::as_str).map(str::to_string).collect())
                                .unwrap_or_default();
                            found.insert(id.to_string(), (read, categories));
                        }
                        404 => {}
                        429 | 500 | 502 | 503 | 504 => {
                            retry.push(id);
                            asked = asked.max(retry_after);
                        }
                        status => {
                            return Err(BackendError::Unavailable(format!("reading message states: HTTP {status}")));
                        }
                    }
                }
                if !retry.is_empty() {
                    let wait = self.api.account.wait_before_retry(
                        "$batch item",
                        429,
                        attempt,
                        asked.map(Duration::from_secs),
                    )?;
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                pending = retry;
            }
        }
        Ok(found)
    }

    /// `on_delete = "flag"`: adds `category` to each of `ids` (a PATCH of
    /// its categories, the ones it had kept); they stay in the folder.
    async fn flag(&self, ids: &[StoreId], category: &str) -> Result<(), BackendError> {
        let states = self.read_states(ids).await?;
        let mut failed = 0;
        let mut first_error = None;
        for chunk in ids.chunks(BATCH) {
            let requests: Vec<Value> = chunk
                .iter()
                .enumerate()
                .map(|(i, id)| {
                    let mut categories = states.get(&id.0).map(|(_, c)| c.clone()).unwrap_or_default();
                    if !categories.iter().any(|c| c.eq_ignore_ascii_case(category)) {
                        categories.push(category.to_string());
                    }
                    json!({ "id": i.to_string(), "method": "PATCH",
                            "url": self.api.relative(&self.api.url(&["messages", &id.0])),
                            "headers": { "Content-Type": "application/json", "Prefer": PREFER_IMMUTABLE },
                            "body": { "categories": categories } })
                })
                .collect();
            match self.api.batch(&requests).await {
                Ok(answers) => {
                    for (_, status, _, _) in answers {
                        if !(200..=299).contains(&status) {
                            failed += 1;
                            first_error.get_or_insert_with(|| BackendError::Unavailable(format!("HTTP {status}")));
                        }
                    }
                }
                Err(e) => {
                    failed += chunk.len();
                    first_error.get_or_insert(in_session(e));
                }
            }
        }
        // The flagged messages stay in the folder: the remembered listing
        // is not theirs to drop; the next poll lists afresh.
        self.after_removal(ids, false);
        if failed == 0 {
            return Ok(());
        }
        Err(http::api::not_removed(failed, ids.len(), "flagged", first_error))
    }

    /// Removes one batch' worth, retrying throttled items; returns how many
    /// could not be removed and why.
    async fn remove_batch(&self, ids: &[&str]) -> (usize, Option<BackendError>) {
        let mut pending: Vec<&str> = ids.to_vec();
        let mut failed = 0;
        let mut why = None;
        let mut attempt = 0;
        while !pending.is_empty() {
            let requests: Vec<Value> = pending.iter().enumerate().map(|(i, id)| self.removal(id, i)).collect();
            let answers = match self.api.batch(&requests).await {
                Ok(answers) => answers,
                Err(e) => return (failed + pending.len(), Some(in_session(e))),
            };
            let mut retry = Vec::new();
            let mut asked: Option<u64> = None;
            for (index, status, retry_after, body) in answers {
                let id = pending[index];
                match status {
                    200..=299 => {}
                    // Already gone (deleted by someone else): done, as asked.
                    404 => tracing::debug!(id, "message to remove was already gone"),
                    429 | 500 | 502 | 503 | 504 => {
                        retry.push(id);
                        asked = asked.max(retry_after);
                    }
                    status => {
                        let (code, message) = error_code(&serde_json::to_vec(&body).unwrap_or_default());
                        tracing::warn!(status, code, message, "Graph did not remove a message");
                        failed += 1;
                        why.get_or_insert_with(|| BackendError::Unavailable(format!("HTTP {status} {code}")));
                    }
                }
            }
            if !retry.is_empty() {
                let wait =
                    self.api.account.wait_before_retry("$batch item", 429, attempt, asked.map(Duration::from_secs));
                match wait {
                    Ok(wait) => tokio::time::sleep(wait).await,
                    Err(e) => return (failed + retry.len(), Some(e)),
                }
                attempt += 1;
            }
            pending = retry;
        }
        (failed, why)
    }
}

#[async_trait]
impl Mailbox for GraphMailbox {
    /// A warm session checks that its token still works, so an expired one
    /// is discarded and the login refreshes it. With a remembered delta
    /// link, that request is the check (a 401 there is `AuthFailed` too),
    /// and its listing is kept for the `list` that follows.
    async fn reset(&mut self) -> Result<(), BackendError> {
        self.prefetched = None;
        if self.listings.get(&self.listing_key).is_some() {
            let listed = self.listing().await?;
            self.prefetched = Some(listed);
            return Ok(());
        }
        self.api.folder_id(&self.folder).await.map(|_| ())
    }

    async fn list(&mut self) -> Result<Vec<ListedMessage>, BackendError> {
        if let Some(listed) = self.prefetched.take() {
            return Ok(listed);
        }
        self.listing().await.map_err(in_session)
    }

    async fn fetch(&mut self, id: &StoreId) -> Result<MessageStream<'_>, BackendError> {
        self.api.content(&id.0).await.map_err(in_session)
    }

    /// Downloads `max_concurrent_requests` messages at a time.
    async fn canonical_sizes(&mut self, ids: &[StoreId]) -> Result<Vec<Option<u64>>, BackendError> {
        let api = &self.api;
        http::api::measure_downloads(ids, self.concurrency, |id| api.content(&id.0)).await
    }

    /// The device policy's `on_delete` in `delete_policy` terms (archive:
    /// a move to the well-known `archive` folder); flag adds a category
    /// (`flag_category`) instead of removing.
    fn dispose_as(&mut self, disposal: &Disposal) -> Result<(), BackendError> {
        (self.policy, self.move_to) = match disposal {
            Disposal::AsConfigured => (self.configured_policy, DELETED_ITEMS),
            Disposal::Expunge => (GraphDeletePolicy::PermanentDelete, DELETED_ITEMS),
            Disposal::Trash => (GraphDeletePolicy::Move, DELETED_ITEMS),
            Disposal::Archive { folder: None } => (GraphDeletePolicy::Move, "archive"),
            Disposal::Flag { .. } => (self.configured_policy, DELETED_ITEMS),
            other => {
                return Err(BackendError::Permanent(format!(
                    "on_delete = \"{}\" (with these settings) is not supported by the graph backend yet",
                    other.word()
                )));
            }
        };
        self.flag_category = match disposal {
            Disposal::Flag { keyword } => Some(keyword.clone()),
            _ => None,
        };
        Ok(())
    }

    /// Read: `isRead`.
    async fn seen(&mut self, ids: &[StoreId]) -> Result<Vec<bool>, BackendError> {
        let states = self.read_states(ids).await.map_err(in_session)?;
        Ok(ids.iter().map(|id| states.get(&id.0).is_some_and(|(read, _)| *read)).collect())
    }

    /// The category named `keyword` (compared without case, as Outlook
    /// does) among each message's categories.
    async fn carrying(&mut self, ids: &[StoreId], keyword: &str) -> Result<Vec<bool>, BackendError> {
        let states = self.read_states(ids).await.map_err(in_session)?;
        Ok(ids
            .iter()
            .map(|id| states.get(&id.0).is_some_and(|(_, c)| c.iter().any(|c| c.eq_ignore_ascii_case(keyword))))
            .collect())
    }

    async fn remove(&mut self, ids: &[StoreId]) -> Result<(), BackendError> {
        if let Some(category) = self.flag_category.clone() {
            return self.flag(ids, &category).await;
        }
        let mut failed = 0;
        let mut first_error = None;
        for chunk in ids.chunks(BATCH) {
            let chunk: Vec<&str> = chunk.iter().map(|id| id.0.as_str()).collect();
            let (n, why) = self.remove_batch(&chunk).await;
            failed += n;
            if let Some(why) = why {
                first_error.get_or_insert(why);
            }
        }
        self.after_removal(ids, failed == 0);
        if failed == 0 {
            return Ok(());
        }
        let verb = match self.policy {
            GraphDeletePolicy::Move if self.move_to == DELETED_ITEMS => "moved to Deleted Items",
            GraphDeletePolicy::Move => "moved to the Archive folder",
            GraphDeletePolicy::PermanentDelete => "deleted",
        };
        tracing::warn!(failed, requested = ids.len(), "Graph removal incomplete");
        Err(http::api::not_removed(failed, ids.len(), verb, first_error))
    }

    async fn close(self: Box<Self>) {
        // Stateless over HTTP: nothing to log out of.
    }
}

/// The maildrop in `receivedDateTime` order, then by id (Graph's own order
/// of equal dates cannot be reproduced from a delta).
fn listed_in_order(members: &HashMap<String, String>) -> Vec<ListedMessage> {
    let at = |received: &str| {
        time::OffsetDateTime::parse(received, &time::format_description::well_known::Rfc3339)
            .map_or(i128::MIN, time::OffsetDateTime::unix_timestamp_nanos)
    };
    let mut listed: Vec<(i128, &String)> = members.iter().map(|(id, received)| (at(received), id)).collect();
    listed.sort();
    listed
        .into_iter()
        .map(|(_, id)| ListedMessage { uidl: uidl_for(id), id: StoreId(id.clone()), size: ReportedSize::Claimed(0) })
        .collect()
}

/// Graph's immutable ids are ~150 characters, longer than a UIDL may be:
/// the UIDL is the lowercase hex SHA-256 of the id (64 characters,
/// `http::hashed_uidl`). The same id always gives the same UIDL.
pub fn uidl_for(id: &str) -> String {
    http::hashed_uidl(id)
}

#[cfg(test)]
mod tests;

impl GraphBackend {
    /// Sends a finished MIME message as the mailbox's user (Microsoft Graph
    /// "Send Outlook messages in MIME format": `POST /me/sendMail` or
    /// `/users/{user}/sendMail`, the MIME base64-encoded, `Content-Type:
    /// text/plain`). `Ok` only once Graph answered 202 Accepted; saved to
    /// Sent Items as Outlook does. Never retried (see `super::send`).
    pub async fn send_mime(&self, token: &crate::mail::Secret, mime: &[u8]) -> Result<(), super::send::SendRefusal> {
        use base64::Engine;
        let authorization = super::send::authorization(token)?;
        let mut url = self.endpoint.base.clone();
        {
            let mut path = url.path_segments_mut().expect("http(s) URLs have paths");
            path.pop_if_empty();
            if self.config.user == "me" {
                path.push("me");
            } else {
                path.extend(["users", self.config.user.as_str()]);
            }
            path.push("sendMail");
        }
        let body = base64::engine::general_purpose::STANDARD.encode(mime);
        let request = self
            .endpoint
            .requester
            .client
            .post(url)
            .header(reqwest::header::AUTHORIZATION, authorization)
            .header(CONTENT_TYPE, "text/plain")
            .body(body);
        let timeout = Duration::from_secs(self.config.timeout_secs);
        super::send::post_once("sendMail", request, timeout, StatusCode::ACCEPTED, |body| error_code(body).0).await
    }
}
