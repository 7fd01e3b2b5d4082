//! JMAP backend (RFC 8620 core, RFC 8621 mail): a POP3 maildrop over one
//! JMAP mailbox, with its `JmapConfig` beside it.
//!
//! A login fetches the session resource with the client's own credentials
//! (pass-through Basic, or the password as a Bearer token) and finds the
//! mailbox; `list` is one `Email/query` + `Email/get` round trip per page,
//! or, once the account's `Email` state is known from an earlier poll, one
//! `Email/changes` request (`listing` below); `fetch` streams the blob from the download URL; `remove` moves the
//! messages to the `trash` mailbox or destroys them, per `delete_policy`.
//! `api` owns HTTP and the mapping of HTTP/JMAP failures to `BackendError`.
//!
//! It never changes anything except in `remove`, and there only the
//! mailbox membership (or existence) of exactly the messages it is given:
//! no keywords, no other mailbox. Sizes are reported as `Claimed`, because
//! `Email.size` counts the stored octets, not the CRLF form POP3 sends.

mod api;
#[doc(hidden)]
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use url::Url;

use self::api::{Api, Auth, Invocation};
use super::http::api::{config_error, default_retries, default_timeout};
use super::http::listing::{self as states, ListingStates, Remembered};
use super::http::{self, AccountPermits, Requester, RetryPolicy};
use super::{Backend, Disposal, ListedMessage, Mailbox, MessageStream, ReportedSize};
use crate::mail::{BackendError, Credentials, InvalidSetting, Proof, StoreId};

/// How popgate authenticates to the JMAP server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JmapAuth {
    /// HTTP Basic with the POP3 user name and password, passed through.
    #[default]
    Basic,
    /// The POP3 password is an OAuth access token, sent as `Bearer`; the
    /// POP3 user name only labels the session (and its request limiter).
    Bearer,
}

/// What "delete" means when a POP3 client deletes a message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeletePolicy {
    /// Move it to the mailbox with role `trash` (it leaves only the POP3
    /// mailbox; other mailboxes it is in keep it). When the POP3 mailbox is
    /// the trash itself, the message is destroyed: there is nowhere further.
    #[default]
    Trash,
    /// Destroy the Email (`Email/set` destroy): gone from every mailbox.
    Destroy,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JmapConfig {
    /// The JMAP session resource (`https://mail.example.com/jmap/session`),
    /// or the server's base URL (`https://mail.example.com`), in which case
    /// `/.well-known/jmap` is asked and its redirects followed.
    pub url: String,
    /// The mailbox POP3 shows: unset, the one with role `inbox`; otherwise
    /// its name, or its path with `/` between names (`Archive/2024`).
    #[serde(default)]
    pub mailbox: Option<String>,
    /// `basic` (pass the POP3 credentials through) or `bearer` (the POP3
    /// password is an access token).
    #[serde(default)]
    pub auth: JmapAuth,
    /// Time limit in seconds for each HTTP request (for a download: for the
    /// response to start, then for each read of its body).
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// `trash` (move to the `trash` mailbox) or `destroy`.
    #[serde(default)]
    pub delete_policy: DeletePolicy,
    /// PEM file of CA certificates to trust instead of the webpki roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Messages remembered across accounts so that a poll asks only what
    /// changed (`Email/changes`); 0 lists every mailbox in full every time.
    #[serde(default = "states::default_state_messages")]
    pub listing_state_messages: u64,
    /// Seconds an account's remembered listing is kept unused.
    #[serde(default = "states::default_state_idle_secs")]
    pub listing_state_idle_secs: u64,
}

impl JmapConfig {
    pub fn new(url: impl Into<String>) -> Self {
        JmapConfig {
            url: url.into(),
            mailbox: None,
            auth: JmapAuth::default(),
            timeout_secs: default_timeout(),
            delete_policy: DeletePolicy::default(),
            ca_file: None,
            listing_state_messages: states::default_state_messages(),
            listing_state_idle_secs: states::default_state_idle_secs(),
        }
    }

    /// The URL of the session resource: `url` itself, or the well-known
    /// location when `url` has no path.
    pub fn session_url(&self) -> Result<Url, String> {
        let url = http::server_url(&self.url)?;
        if url.path().is_empty() || url.path() == "/" {
            return url.join("/.well-known/jmap").map_err(|e| e.to_string());
        }
        Ok(url)
    }

    /// Checks what serde cannot; the error names the key at fault.
    pub fn check(&self) -> Result<(), InvalidSetting> {
        self.session_url().map_err(|why| InvalidSetting::new("url", why))?;
        InvalidSetting::bounded("timeout_secs", self.timeout_secs, 1..=3_600)?;
        states::check_settings(self.listing_state_messages, self.listing_state_idle_secs)?;
        if self.mailbox.as_deref().is_some_and(|m| m.trim_matches('/').is_empty()) {
            return Err(InvalidSetting::new("mailbox", "must not be empty (leave it out for the inbox)"));
        }
        Ok(())
    }
}

/// Messages per `Email/query` page: bounds one response's size whatever
/// the server's `maxObjectsInGet`.
const PAGE_CAP: usize = 4096;
/// Listings restarted because the mailbox changed between pages.
const LIST_ATTEMPTS: usize = 3;
/// Changes asked for at once; more than this since the last poll, and the
/// mailbox is listed in full instead.
const CHANGES_CAP: usize = 1024;

pub struct JmapBackend {
    config: JmapConfig,
    session_url: Url,
    /// Follows redirects (session discovery), unlike the bearer-token APIs'.
    requester: Requester,
    /// Request permits per user name, shared by that user's concurrent POP3
    /// sessions so that together they respect `maxConcurrentRequests`.
    permits: AccountPermits,
    listings: ListingStates<JmapListing>,
}

impl JmapBackend {
    pub fn new(config: JmapConfig) -> Result<Self, BackendError> {
        config.check().map_err(config_error)?;
        let session_url = config.session_url().map_err(BackendError::Permanent)?;
        let timeout = Duration::from_secs(config.timeout_secs);
        // The config has no retry settings: a throttled request is retried
        // as often as the other APIs' by default, waiting at most as long as
        // a request may take.
        let retry = RetryPolicy { retries: default_retries(), max_wait: timeout };
        let redirects = reqwest::redirect::Policy::limited(5);
        let requester = Requester::new(config.ca_file.as_deref(), timeout, retry, redirects)?;
        let listings = ListingStates::new(config.listing_state_messages, config.listing_state_idle_secs);
        Ok(JmapBackend { config, session_url, requester, permits: AccountPermits::new(), listings })
    }

    fn permits_for(&self, user: &str, limit: usize) -> Arc<Semaphore> {
        self.permits.for_account(user, limit)
    }

    fn auth(&self, credentials: &Credentials) -> Result<Auth, BackendError> {
        let token = match (&credentials.proof, self.config.auth) {
            (Proof::Password(password), JmapAuth::Basic) => {
                // RFC 7617: the user-id ends at the first colon.
                if credentials.user.contains(':') {
                    return Err(BackendError::BadCredentials("a user name with ':' cannot be sent with HTTP Basic"));
                }
                return Ok(Auth::Basic { user: credentials.user.clone(), password: password.clone() });
            }
            (Proof::Bearer(_), JmapAuth::Basic) => {
                return Err(BackendError::BadCredentials("this server takes passwords, not bearer tokens"));
            }
            (Proof::Password(token) | Proof::Bearer(token), JmapAuth::Bearer) => token,
        };
        Ok(Auth::Bearer(http::bearer_token(token)?))
    }
}

#[async_trait]
impl Backend for JmapBackend {
    fn kind(&self) -> &'static str {
        "jmap"
    }

    /// With `auth = "bearer"`, a token from SASL XOAUTH2/OAUTHBEARER is sent
    /// on just like a password used as one.
    fn accepts_bearer_tokens(&self) -> bool {
        self.config.auth == JmapAuth::Bearer
    }

    async fn open(&self, credentials: &Credentials) -> Result<Box<dyn Mailbox>, BackendError> {
        let auth = self.auth(credentials)?;
        let session = api::session(&self.requester, &self.session_url, &auth).await?;
        let limits = session.limits;
        if limits.max_calls_in_request < 2 {
            return Err(BackendError::Permanent(
                "the server allows 1 method call per request; listing needs 2 (query + get)".into(),
            ));
        }
        let permits = self.permits_for(&credentials.user, limits.max_concurrent_requests);
        let api = Api::new(self.requester.clone(), &auth, session, permits);
        let folders = Folders::fetch(&api).await?;
        let mailbox_id = folders.find(self.config.mailbox.as_deref())?;
        if self.config.delete_policy == DeletePolicy::Trash && folders.with_role("trash").is_none() {
            tracing::info!("no mailbox has role trash yet: the first deletion creates one (\"Trash\")");
        }
        // The account and mailbox ids come from the server, answering these
        // credentials: a state is only ever continued for the mailbox it
        // describes.
        let listing_key = format!("{}\n{}\n{}", credentials.user, api.account_id(), mailbox_id);
        Ok(Box::new(JmapMailbox {
            api,
            mailbox_id,
            policy: self.config.delete_policy,
            configured_policy: self.config.delete_policy,
            blobs: HashMap::new(),
            listings: self.listings.clone(),
            listing_key,
            special: None,
        }))
    }
}

/// The account's mailboxes, to find ours and the trash by name or role.
struct Folders(Vec<Folder>);

#[derive(Debug, Deserialize)]
struct Folder {
    id: String,
    name: String,
    #[serde(rename = "parentId")]
    parent_id: Option<String>,
    role: Option<String>,
}

impl Folders {
    async fn fetch(api: &Api) -> Result<Folders, BackendError> {
        let call = (
            "Mailbox/get",
            json!({ "accountId": api.account_id(), "ids": null, "properties": ["id", "name", "parentId", "role"] }),
            "m".to_string(),
        );
        let responses = api.call(vec![call]).await?;
        Folders::from_list(responses.get("m", "Mailbox/get")?.get("list").cloned().unwrap_or(Value::Null))
    }

    /// The `list` of a `Mailbox/get` reply.
    fn from_list(list: Value) -> Result<Folders, BackendError> {
        let folders: Vec<Folder> = serde_json::from_value(list)
            .map_err(|e| BackendError::unavailable(format!("Mailbox/get: unexpected reply: {e}")))?;
        Ok(Folders(folders))
    }

    fn with_role(&self, role: &str) -> Option<String> {
        self.0.iter().find(|f| f.role.as_deref() == Some(role)).map(|f| f.id.clone())
    }

    fn path(&self, folder: &Folder) -> String {
        let mut names = vec![folder.name.as_str()];
        let mut parent = folder.parent_id.as_deref();
        // Bounded: a server reporting a parent cycle must not hang us.
        while let Some(id) = parent.filter(|_| names.len() <= self.0.len()) {
            let Some(up) = self.0.iter().find(|f| f.id == id) else { break };
            names.push(&up.name);
            parent = up.parent_id.as_deref();
        }
        names.reverse();
        names.join("/")
    }

    /// `None`: the inbox (by role). A name: the mailbox with that path, or
    /// else the only one with that name; "INBOX" in any case is the inbox.
    fn find(&self, wanted: Option<&str>) -> Result<String, BackendError> {
        let not_found = |what: String| {
            tracing::warn!(mailbox = %what, "configured JMAP mailbox not found");
            BackendError::Permanent(format!("no mailbox {what} in this account"))
        };
        let Some(wanted) = wanted.map(|w| w.trim_matches('/')) else {
            return self.with_role("inbox").ok_or_else(|| not_found("with role inbox".into()));
        };
        if let Some(folder) = self.0.iter().find(|f| self.path(f) == wanted) {
            return Ok(folder.id.clone());
        }
        let named: Vec<_> = self.0.iter().filter(|f| f.name == wanted).collect();
        match named.as_slice() {
            [one] => Ok(one.id.clone()),
            [] if wanted.eq_ignore_ascii_case("inbox") => {
                self.with_role("inbox").ok_or_else(|| not_found("with role inbox".into()))
            }
            [] => Err(not_found(format!("named {wanted:?}"))),
            _ => Err(BackendError::Permanent(format!("several mailboxes are named {wanted:?}: give its path"))),
        }
    }
}

struct JmapMailbox {
    api: Api,
    mailbox_id: String,
    policy: DeletePolicy,
    /// `delete_policy` as configured, for a login whose device policy
    /// leaves `on_delete` unset (a warm session may have served another).
    configured_policy: DeletePolicy,
    /// Email id → blob id, from the last listing (downloads need the blob).
    blobs: HashMap<String, String>,
    listings: ListingStates<JmapListing>,
    listing_key: String,
    /// A device policy's `flag` or `archive`, which `delete_policy` has no
    /// word for; `None`: `policy` decides.
    special: Option<Disposal>,
}

#[derive(Debug, Clone, Deserialize)]
struct ListedEmail {
    id: String,
    #[serde(rename = "blobId")]
    blob_id: String,
    size: u64,
    #[serde(rename = "receivedAt", default)]
    received_at: Option<String>,
}

impl ListedEmail {
    /// The maildrop's order, the same whichever way it was listed:
    /// `receivedAt`, then the id (the server's own order of equal dates
    /// cannot be reproduced from changes).
    fn order(&self) -> (i128, &str) {
        let at = self
            .received_at
            .as_deref()
            .and_then(|at| time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).ok());
        (at.map_or(i128::MIN, time::OffsetDateTime::unix_timestamp_nanos), &self.id)
    }
}

/// A listing of one mailbox at one `Email` state of its account: where the
/// next poll's `Email/changes` starts.
struct JmapListing {
    state: String,
    /// In maildrop order.
    emails: Vec<ListedEmail>,
}

impl Remembered for JmapListing {
    fn messages(&self) -> usize {
        self.emails.len()
    }
}

/// A server that leaves `receivedAt` out keeps its query's order (and is
/// never followed by its changes: `changes_since`).
fn in_maildrop_order(mut emails: Vec<ListedEmail>) -> Vec<ListedEmail> {
    if emails.iter().all(|e| e.received_at.is_some()) {
        emails.sort_by(|a, b| a.order().cmp(&b.order()));
    }
    emails
}

/// The properties a listing needs of an email.
const LISTED: [&str; 4] = ["id", "blobId", "size", "receivedAt"];

/// One page of a listing: the query's answer joined with the get's.
struct Page {
    /// In query order.
    emails: Vec<ListedEmail>,
    /// How many ids the query returned (some may have vanished before the get).
    ids: usize,
    position: usize,
    total: Option<usize>,
    query_state: Option<String>,
    /// The server's cap on `limit`, when it applied one.
    limit: Option<usize>,
}

struct Listing {
    emails: Vec<ListedEmail>,
    /// The query state was the same for every page.
    consistent: bool,
    /// The account's `Email` state before the first page was read.
    state: Option<String>,
}

impl JmapMailbox {
    fn query_calls(&self, tag: usize, position: usize, limit: usize) -> [Invocation; 2] {
        let account = self.api.account_id();
        let query_id = format!("q{tag}");
        [
            (
                "Email/query",
                json!({
                    "accountId": account,
                    "filter": { "inMailbox": self.mailbox_id },
                    "sort": [{ "property": "receivedAt", "isAscending": true }],
                    "position": position,
                    "limit": limit,
                    "calculateTotal": true,
                }),
                query_id.clone(),
            ),
            (
                "Email/get",
                json!({
                    "accountId": account,
                    "#ids": { "resultOf": query_id, "name": "Email/query", "path": "/ids" },
                    "properties": LISTED,
                }),
                format!("g{tag}"),
            ),
        ]
    }

    fn page(responses: &api::Responses, tag: usize) -> Result<Page, BackendError> {
        let query = responses.get(&format!("q{tag}"), "Email/query")?;
        let got = responses.get(&format!("g{tag}"), "Email/get")?;
        let unexpected =
            |what: &str| BackendError::unavailable(format!("unexpected Email/query or Email/get reply: {what}"));
        let ids: Vec<String> = query
            .get("ids")
            .cloned()
            .and_then(|ids| serde_json::from_value(ids).ok())
            .ok_or_else(|| unexpected("no ids"))?;
        let count = |key: &str| query.get(key).and_then(Value::as_u64).map(|n| n as usize);
        let list: Vec<ListedEmail> = got
            .get("list")
            .cloned()
            .and_then(|list| serde_json::from_value(list).ok())
            .ok_or_else(|| unexpected("no list of emails"))?;
        // Email/get may answer in any order; the query's order is the
        // maildrop's.
        let mut by_id: HashMap<String, ListedEmail> = list.into_iter().map(|e| (e.id.clone(), e)).collect();
        let emails = ids.iter().filter_map(|id| by_id.remove(id)).collect();
        Ok(Page {
            emails,
            ids: ids.len(),
            position: count("position").unwrap_or(0),
            total: count("total"),
            query_state: query.get("queryState").and_then(Value::as_str).map(str::to_string),
            limit: count("limit"),
        })
    }

    /// One pass over the mailbox, page by page, as many pages per HTTP
    /// request as `maxCallsInRequest` allows once the total is known.
    async fn list_once(&self) -> Result<Listing, BackendError> {
        let limits = self.api.limits();
        let mut page_size = limits.max_objects_in_get.min(PAGE_CAP);
        let pages_per_request = limits.max_calls_in_request / 2;
        let mut emails = Vec::new();
        let mut seen = HashSet::new();
        let mut position = 0;
        let mut total: Option<usize> = None;
        let mut first_state: Option<String> = None;
        let mut consistent = true;
        // The `Email` state read before anything else: every change after
        // it is reported by `Email/changes` from it, so the next poll can
        // start there (needs a third call in the first request).
        let mut email_state = None;
        let ask_state = self.listings.enabled() && limits.max_calls_in_request >= 3;
        loop {
            let pages = match total {
                None => 1,
                Some(total) => total.saturating_sub(position).div_ceil(page_size).clamp(1, pages_per_request),
            };
            let mut calls: Vec<Invocation> = Vec::new();
            let first_request = total.is_none() && position == 0;
            if ask_state && first_request {
                let arguments = json!({ "accountId": self.api.account_id(), "ids": [], "properties": ["id"] });
                calls.push(("Email/get", arguments, "st".to_string()));
            }
            calls.extend((0..pages).flat_map(|tag| self.query_calls(tag, position + tag * page_size, page_size)));
            let responses = self.api.call(calls).await?;
            if ask_state && first_request {
                email_state =
                    responses.get("st", "Email/get")?.get("state").and_then(Value::as_str).map(str::to_string);
            }
            let mut advanced = 0;
            for tag in 0..pages {
                let page = Self::page(&responses, tag)?;
                if page.position != position + advanced {
                    return Err(BackendError::unavailable("Email/query ignored the requested position"));
                }
                if let Some(state) = page.query_state {
                    match &first_state {
                        None => first_state = Some(state),
                        Some(first) if *first != state => consistent = false,
                        Some(_) => {}
                    }
                }
                total = page.total.or(total);
                advanced += page.ids;
                for email in page.emails {
                    // A message moved between pages can be seen twice.
                    if seen.insert(email.id.clone()) {
                        emails.push(email);
                    }
                }
                let capped = page.limit.filter(|&limit| limit > 0 && limit < page_size);
                if let Some(limit) = capped {
                    page_size = limit;
                }
                // The later pages of this request assumed a full page here:
                // their positions are wrong; ask again from where this ended.
                if capped.is_some() || page.ids < page_size {
                    break;
                }
            }
            position += advanced;
            let done = match total {
                Some(total) => position >= total,
                None => false,
            };
            if advanced == 0 || done {
                return Ok(Listing { emails, consistent, state: email_state });
            }
        }
    }

    fn keep_listing(&mut self, emails: &[ListedEmail]) -> Vec<ListedMessage> {
        self.blobs = emails.iter().map(|e| (e.id.clone(), e.blob_id.clone())).collect();
        emails
            .iter()
            .map(|e| ListedMessage {
                uidl: uidl_for(&e.id),
                id: StoreId(e.id.clone()),
                size: ReportedSize::Claimed(e.size),
            })
            .collect()
    }

    /// Every email in the mailbox, page by page; remembered with the state
    /// it was read at when every page saw the same query state.
    async fn list_in_full(&mut self) -> Result<Vec<ListedMessage>, BackendError> {
        let mut last = Vec::new();
        for attempt in 1..=LIST_ATTEMPTS {
            let listing = self.list_once().await?;
            if listing.consistent {
                let emails = in_maildrop_order(listing.emails);
                let listed = self.keep_listing(&emails);
                match listing.state.filter(|_| emails.iter().all(|e| e.received_at.is_some())) {
                    Some(state) => self.listings.put(&self.listing_key, JmapListing { state, emails }),
                    None => self.listings.forget(&self.listing_key),
                }
                return Ok(listed);
            }
            tracing::debug!(attempt, "mailbox changed while it was listed; listing again");
            last = listing.emails;
        }
        // Still changing: what we have is deduplicated and each message in
        // it existed; at worst one that arrived meanwhile is missing. Not
        // remembered: the next poll lists in full again.
        self.listings.forget(&self.listing_key);
        Ok(self.keep_listing(&in_maildrop_order(last)))
    }

    /// The listing after what changed since `known`, in one request
    /// (`Email/changes` and an `Email/get` of what it names); `None` when
    /// the server cannot say (`cannotCalculateChanges`: the state is too
    /// old) or anything does not add up: then the mailbox is listed in full.
    async fn changes_since(&self, known: &JmapListing) -> Result<Option<JmapListing>, BackendError> {
        let account = self.api.account_id();
        let get = |path: &str| {
            json!({
                "accountId": account,
                "#ids": { "resultOf": "c", "name": "Email/changes", "path": path },
                "properties": ["id", "blobId", "size", "receivedAt", "mailboxIds"],
            })
        };
        let cap = CHANGES_CAP.min(self.api.limits().max_objects_in_get);
        let calls = vec![
            (
                "Email/changes",
                json!({ "accountId": account, "sinceState": known.state, "maxChanges": cap }),
                "c".into(),
            ),
            ("Email/get", get("/created"), "n".into()),
            ("Email/get", get("/updated"), "u".into()),
        ];
        let responses = self.api.call(calls).await?;
        if let Some(kind) = responses.error_type("c") {
            tracing::debug!(jmap_error = kind, "Email/changes cannot continue the listing; listing in full");
            return Ok(None);
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Changes {
            old_state: String,
            new_state: String,
            has_more_changes: bool,
            destroyed: Vec<String>,
        }
        #[derive(Deserialize)]
        struct Changed {
            #[serde(flatten)]
            email: ListedEmail,
            #[serde(rename = "mailboxIds", default)]
            mailbox_ids: HashMap<String, bool>,
        }
        let Ok(changes) = serde_json::from_value::<Changes>(responses.get("c", "Email/changes")?.clone()) else {
            return Ok(None);
        };
        if changes.old_state != known.state || changes.has_more_changes {
            return Ok(None);
        }
        let mut emails: HashMap<String, ListedEmail> = known.emails.iter().map(|e| (e.id.clone(), e.clone())).collect();
        for id in &changes.destroyed {
            emails.remove(id);
        }
        for call in ["n", "u"] {
            if responses.error_type(call).is_some() {
                return Ok(None);
            }
            let got = responses.get(call, "Email/get")?;
            let Some(list) = got.get("list").cloned().and_then(|l| serde_json::from_value::<Vec<Changed>>(l).ok())
            else {
                return Ok(None);
            };
            // Named as changed but not found: gone since.
            for id in got.get("notFound").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str) {
                emails.remove(id);
            }
            for changed in list {
                if changed.email.received_at.is_none() {
                    return Ok(None);
                }
                if changed.mailbox_ids.get(&self.mailbox_id) == Some(&true) {
                    emails.insert(changed.email.id.clone(), changed.email);
                } else {
                    emails.remove(&changed.email.id);
                }
            }
        }
        let emails = in_maildrop_order(emails.into_values().collect());
        Ok(Some(JmapListing { state: changes.new_state, emails }))
    }

    /// After `remove`: what it removed leaves the remembered listing; after
    /// a failure nothing is assumed, and the next poll lists in full.
    fn after_removal(&self, ids: &[StoreId], all_removed: bool) {
        if !all_removed {
            self.listings.forget(&self.listing_key);
            return;
        }
        let gone: HashSet<&str> = ids.iter().map(|id| id.0.as_str()).collect();
        self.listings.drop_messages(&self.listing_key, |known| JmapListing {
            state: known.state.clone(),
            emails: known.emails.iter().filter(|e| !gone.contains(e.id.as_str())).cloned().collect(),
        });
    }

    /// The blob of a message that was not in the listing.
    async fn blob_of(&self, id: &str) -> Result<String, BackendError> {
        let call = (
            "Email/get",
            json!({ "accountId": self.api.account_id(), "ids": [id], "properties": ["id", "blobId", "size"] }),
            "b".to_string(),
        );
        let responses = self.api.call(vec![call]).await?;
        let list = responses.get("b", "Email/get")?.get("list").cloned().unwrap_or(Value::Null);
        let emails: Vec<ListedEmail> = serde_json::from_value(list).unwrap_or_default();
        emails.into_iter().find(|e| e.id == id).map(|e| e.blob_id).ok_or(BackendError::MessageGone)
    }

    /// Where `remove` moves messages, or `None` to destroy them. The trash
    /// is looked up now, not at login: Cyrus 3.6 accepts a move into a
    /// mailbox destroyed meanwhile, and the messages vanish with it.
    async fn move_target(&self) -> Result<Option<String>, BackendError> {
        if self.policy == DeletePolicy::Destroy {
            return Ok(None);
        }
        let trash = match Folders::fetch(&self.api).await?.with_role("trash") {
            Some(trash) => trash,
            None => self.create_trash().await?,
        };
        // Deleting from the trash itself: there is nowhere further to move.
        Ok((trash != self.mailbox_id).then_some(trash))
    }

    /// Creates the mailbox with role `trash`, as JMAP clients do for an
    /// account that has none (a fresh Cyrus account has only its Inbox). A
    /// refusal is permanent: retrying cannot make the server accept it.
    async fn create_trash(&self) -> Result<String, BackendError> {
        let create = json!({
            "accountId": self.api.account_id(),
            "create": { "trash": { "name": "Trash", "role": "trash", "parentId": null } },
        });
        let responses = self.api.call(vec![("Mailbox/set", create, "t".to_string())]).await?;
        let set = responses.get("t", "Mailbox/set")?;
        if let Some(id) = set.pointer("/created/trash/id").and_then(Value::as_str) {
            tracing::info!(mailbox = id, "created the trash mailbox (role trash) for delete_policy = \"trash\"");
            return Ok(id.to_string());
        }
        let why = set
            .pointer("/notCreated/trash")
            .map(|e| {
                let kind = e.get("type").and_then(Value::as_str).unwrap_or("refused");
                let description = e.get("description").and_then(Value::as_str).unwrap_or("");
                format!("{kind} {description}")
            })
            .unwrap_or_else(|| "no answer".into());
        Err(BackendError::Permanent(format!(
            "delete_policy is trash, no mailbox has role trash and the server refused to create one ({}); \
             create it or set delete_policy = \"destroy\"",
            why.chars().filter(|c| !c.is_control()).take(200).collect::<String>().trim()
        )))
    }

    /// Each email's keywords (`Email/get`, `maxObjectsInGet` at a time);
    /// an email not found is absent.
    async fn keywords_of(&self, ids: &[StoreId]) -> Result<HashMap<String, Vec<String>>, BackendError> {
        let mut found = HashMap::with_capacity(ids.len());
        let per_call = self.api.limits().max_objects_in_get.clamp(1, PAGE_CAP);
        for chunk in ids.chunks(per_call) {
            let chunk: Vec<&str> = chunk.iter().map(|id| id.0.as_str()).collect();
            let call = (
                "Email/get",
                json!({ "accountId": self.api.account_id(), "ids": chunk, "properties": ["id", "keywords"] }),
                "k".to_string(),
            );
            let responses = self.api.call(vec![call]).await?;
            let list = responses.get("k", "Email/get")?.get("list").and_then(Value::as_array).cloned();
            for email in list.into_iter().flatten() {
                let Some(id) = email.get("id").and_then(Value::as_str) else { continue };
                let keywords = email
                    .get("keywords")
                    .and_then(Value::as_object)
                    .map(|k| k.iter().filter(|(_, set)| **set == json!(true)).map(|(k, _)| k.clone()).collect())
                    .unwrap_or_default();
                found.insert(id.to_string(), keywords);
            }
        }
        Ok(found)
    }

    /// `on_delete = "flag"`: sets `keyword` on exactly `ids` (`Email/set`,
    /// patching that one keyword); they stay in the mailbox.
    async fn flag(&mut self, ids: &[StoreId], keyword: &str) -> Result<(), BackendError> {
        let account = self.api.account_id().to_string();
        let path = format!("keywords/{}", pointer_escape(keyword));
        let per_call = self.api.limits().max_objects_in_set.max(1);
        let mut failed = 0;
        let mut first_error = None;
        for chunk in ids.chunks(per_call) {
            let chunk: Vec<&str> = chunk.iter().map(|id| id.0.as_str()).collect();
            let update: serde_json::Map<String, Value> =
                chunk.iter().map(|id| (id.to_string(), json!({ path.as_str(): true }))).collect();
            let call = ("Email/set", json!({ "accountId": account, "update": update }), "f".to_string());
            match self.api.call(vec![call]).await.and_then(|r| r.get("f", "Email/set").cloned()) {
                Ok(set) => failed += not_removed(&set, &chunk, true),
                Err(e) => {
                    tracing::warn!(error = %e, messages = chunk.len(), "Email/set (keyword) failed");
                    failed += chunk.len();
                    first_error.get_or_insert(e);
                }
            }
        }
        // The flagged messages stay: the remembered listing is not theirs
        // to drop; the next poll lists afresh.
        self.after_removal(ids, false);
        if failed == 0 {
            return Ok(());
        }
        Err(http::api::not_removed(failed, ids.len(), "flagged", first_error))
    }

    /// The mailbox with role `archive`, created (as "Archive") when the
    /// account has none.
    async fn archive_target(&self) -> Result<String, BackendError> {
        if let Some(archive) = Folders::fetch(&self.api).await?.with_role("archive") {
            return Ok(archive);
        }
        let create = json!({
            "accountId": self.api.account_id(),
            "create": { "archive": { "name": "Archive", "role": "archive", "parentId": null } },
        });
        let responses = self.api.call(vec![("Mailbox/set", create, "a".to_string())]).await?;
        let set = responses.get("a", "Mailbox/set")?;
        match set.pointer("/created/archive/id").and_then(Value::as_str) {
            Some(id) => {
                tracing::info!(mailbox = id, "created the archive mailbox (role archive) for on_delete = \"archive\"");
                Ok(id.to_string())
            }
            None => Err(BackendError::Permanent(
                "on_delete is archive, no mailbox has role archive and the server refused to create one".into(),
            )),
        }
    }

    /// One `Email/set` over `ids`; returns how many were not removed.
    async fn remove_batch(&self, ids: &[&str], trash: Option<&str>) -> Result<usize, BackendError> {
        let account = self.api.account_id();
        let arguments = match trash {
            Some(trash) => {
                // Patch only the two memberships: other mailboxes the
                // message is in keep it.
                let patch = json!({
                    format!("mailboxIds/{}", pointer_escape(&self.mailbox_id)): null,
                    format!("mailboxIds/{}", pointer_escape(trash)): true,
                });
                let update: serde_json::Map<String, Value> =
                    ids.iter().map(|id| (id.to_string(), patch.clone())).collect();
                json!({ "accountId": account, "update": update })
            }
            None => json!({ "accountId": account, "destroy": ids }),
        };
        let responses = self.api.call(vec![("Email/set", arguments, "s".to_string())]).await?;
        Ok(not_removed(responses.get("s", "Email/set")?, ids, trash.is_some()))
    }

    /// Splits ids into batches that fit `maxObjectsInSet` and, with room to
    /// spare, `maxSizeRequest`.
    fn batches<'a>(&self, ids: &'a [StoreId], trash: Option<&str>) -> Vec<Vec<&'a str>> {
        let limits = self.api.limits();
        let budget = limits.max_size_request.saturating_sub(1024).max(1);
        // Per id: the id twice over (quoted, plus the patch keys) and the
        // mailbox ids, with JSON punctuation.
        let per_id_overhead = 2 * (self.mailbox_id.len() + trash.map_or(0, str::len)) + 64;
        let mut batches = vec![Vec::new()];
        let mut size = 0;
        for id in ids {
            let cost = id.0.len() + per_id_overhead;
            let current = batches.last_mut().expect("never empty");
            if !current.is_empty() && (current.len() >= limits.max_objects_in_set || size + cost > budget) {
                batches.push(Vec::new());
                size = 0;
            }
            batches.last_mut().expect("never empty").push(id.0.as_str());
            size += cost;
        }
        batches.retain(|b| !b.is_empty());
        batches
    }
}

#[async_trait]
impl Mailbox for JmapMailbox {
    async fn list(&mut self) -> Result<Vec<ListedMessage>, BackendError> {
        if let Some(known) = self.listings.get(&self.listing_key)
            && let Some(next) = self.changes_since(&known).await?
        {
            let listed = self.keep_listing(&next.emails);
            self.listings.put(&self.listing_key, next);
            return Ok(listed);
        }
        self.list_in_full().await
    }

    async fn fetch(&mut self, id: &StoreId) -> Result<MessageStream<'_>, BackendError> {
        let blob = match self.blobs.get(&id.0) {
            Some(blob) => blob.clone(),
            None => self.blob_of(&id.0).await?,
        };
        self.api.download(&blob).await
    }

    /// The device policy's `on_delete` in `delete_policy` terms; archive
    /// (the mailbox with role archive) and flag (a keyword) in `special`.
    fn dispose_as(&mut self, disposal: &Disposal) -> Result<(), BackendError> {
        self.policy = match disposal {
            Disposal::AsConfigured => self.configured_policy,
            Disposal::Expunge => DeletePolicy::Destroy,
            Disposal::Trash => DeletePolicy::Trash,
            Disposal::Archive { folder: None } | Disposal::Flag { .. } => self.configured_policy,
            other => {
                return Err(BackendError::Permanent(format!(
                    "on_delete = \"{}\" (with these settings) is not supported by the jmap backend yet",
                    other.word()
                )));
            }
        };
        self.special = match disposal {
            Disposal::Archive { folder: None } | Disposal::Flag { .. } => Some(disposal.clone()),
            _ => None,
        };
        Ok(())
    }

    /// `$seen` among each email's keywords.
    async fn seen(&mut self, ids: &[StoreId]) -> Result<Vec<bool>, BackendError> {
        self.carrying(ids, "$seen").await
    }

    /// The keyword among each email's keywords (compared without case, as
    /// RFC 8621 says); an email not found counts as not carrying it.
    async fn carrying(&mut self, ids: &[StoreId], keyword: &str) -> Result<Vec<bool>, BackendError> {
        let keywords = self.keywords_of(ids).await?;
        Ok(ids
            .iter()
            .map(|id| keywords.get(&id.0).is_some_and(|k| k.iter().any(|k| k.eq_ignore_ascii_case(keyword))))
            .collect())
    }

    async fn remove(&mut self, ids: &[StoreId]) -> Result<(), BackendError> {
        if let Some(Disposal::Flag { keyword }) = self.special.clone() {
            return self.flag(ids, &keyword).await;
        }
        // Every failure is reported as temporary, naming how many messages
        // stayed: the client keeps its copy and can try again later.
        let archive = matches!(self.special, Some(Disposal::Archive { .. }));
        let target = if archive { self.archive_target().await.map(Some) } else { self.move_target().await };
        let trash = target.map_err(|e| {
            tracing::warn!(error = %e, requested = ids.len(), "cannot remove messages");
            match e {
                // A configuration the server will never accept: said as
                // such, so a device does not retry forever.
                BackendError::Permanent(why) => BackendError::Permanent(why),
                e => BackendError::Unavailable(format!("{0} of {0} messages could not be removed ({e})", ids.len())),
            }
        })?;
        let trash = trash.as_deref();
        let mut failed = 0;
        let mut first_error = None;
        for batch in self.batches(ids, trash) {
            match self.remove_batch(&batch, trash).await {
                Ok(n) => failed += n,
                Err(e) => {
                    tracing::warn!(error = %e, messages = batch.len(), "Email/set failed");
                    failed += batch.len();
                    first_error.get_or_insert(e);
                }
            }
        }
        self.after_removal(ids, failed == 0);
        if failed == 0 {
            return Ok(());
        }
        let verb = match trash {
            Some(_) if archive => "moved to the archive",
            Some(_) => "moved to the trash",
            None => "destroyed",
        };
        Err(http::api::not_removed(failed, ids.len(), verb, first_error))
    }

    async fn close(self: Box<Self>) {
        // JMAP is stateless over HTTP: there is no session to log out of.
    }
}

/// How many of `ids` an `Email/set` reply did not remove (`moved`: the
/// request updated mailbox memberships; otherwise it destroyed). An id
/// the reply does not mention counts as not removed; `notFound` counts as
/// removed (someone else already destroyed it).
fn not_removed(set: &Value, ids: &[&str], moved: bool) -> usize {
    let done: HashSet<&str> = if moved {
        set.get("updated").and_then(Value::as_object).map(|m| m.keys().map(String::as_str).collect())
    } else {
        set.get("destroyed").and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_str).collect())
    }
    .unwrap_or_default();
    let refused = set.get(if moved { "notUpdated" } else { "notDestroyed" }).and_then(Value::as_object);
    let mut failed = 0;
    for id in ids {
        if done.contains(id) {
            continue;
        }
        let error = refused.and_then(|r| r.get(*id));
        let kind = error.and_then(|e| e.get("type")).and_then(Value::as_str).unwrap_or("(not in the reply)");
        if kind == "notFound" {
            // Already destroyed by someone else: it is gone, as asked.
            tracing::debug!(id, "message to remove was already gone");
            continue;
        }
        let description = error.and_then(|e| e.get("description")).and_then(Value::as_str).unwrap_or("");
        tracing::warn!(id, jmap_error = kind, description, "Email/set did not remove a message");
        failed += 1;
    }
    failed
}

/// RFC 1939 wants a UIDL of 1–70 characters in 0x21..=0x7E. A JMAP id
/// (RFC 8620: 1–255 of A-Za-z0-9-_) usually is one and is used as it is; a
/// longer or odder one becomes `h` + the hex SHA-256 of the id
/// (`http::hashed_uidl`, 65 characters) — stable, since the id is. The `h`
/// stays: UIDLs handed out before must not change. (A server whose ids
/// themselves look like `h` + 64 hex digits could collide with that; none
/// is known.)
pub fn uidl_for(id: &str) -> String {
    if http::is_valid_uidl(id) { id.to_string() } else { format!("h{}", http::hashed_uidl(id)) }
}

/// RFC 6901 escaping for a path segment of a JMAP patch.
fn pointer_escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests;
