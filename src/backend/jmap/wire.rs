//! What the JMAP backend reads from a server, as pure functions over the
//! octets it received — the same code the backend runs, with the HTTP taken
//! away. The fuzz target `jmap_replies` drives these; they are not API.
//!
//! Every reply is read whole (bounded by the backend's size limits) before
//! it is parsed, so unlike the Gmail and IMAP readers nothing here depends
//! on how the octets arrived.

use serde_json::Value;
use url::Url;

pub use super::api::{Responses, ServerLimits, Session};
use super::{Folders, JmapMailbox};
use crate::mail::BackendError;

/// A session resource as fetched from `session_url`.
pub fn session(session_url: Url, body: &[u8]) -> Result<Session, String> {
    let body: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    Session::parse(session_url, &body)
}

/// The method responses of an API reply.
pub fn responses(body: &[u8]) -> Result<Responses, BackendError> {
    let reply: Value = serde_json::from_slice(body).map_err(|_| BackendError::unavailable("API reply is not JSON"))?;
    Responses::from_reply(reply)
}

/// One listing page (`Email/query` `q{tag}` joined with `Email/get`
/// `g{tag}`), as the backend reads it.
#[derive(Debug)]
pub struct Page {
    /// (id, blobId, size) in query order.
    pub emails: Vec<(String, String, u64)>,
    /// The ids the query returned.
    pub ids: Vec<String>,
    pub position: usize,
    pub total: Option<usize>,
    pub limit: Option<usize>,
}

pub fn page(responses: &Responses, tag: usize) -> Result<Page, BackendError> {
    let page = JmapMailbox::page(responses, tag)?;
    let ids = responses
        .get(&format!("q{tag}"), "Email/query")?
        .get("ids")
        .cloned()
        .and_then(|ids| serde_json::from_value(ids).ok())
        .unwrap_or_default();
    Ok(Page {
        emails: page.emails.into_iter().map(|e| (e.id, e.blob_id, e.size)).collect(),
        ids,
        position: page.position,
        total: page.total,
        limit: page.limit,
    })
}

/// The mailbox a `Mailbox/get` reply (call id `m`) leads to for the
/// configured name (`None`: the inbox), with every mailbox id listed.
pub fn mailbox(responses: &Responses, wanted: Option<&str>) -> Result<(String, Vec<String>), BackendError> {
    let folders = Folders::from_list(responses.get("m", "Mailbox/get")?.get("list").cloned().unwrap_or(Value::Null))?;
    let found = folders.find(wanted)?;
    Ok((found, folders.0.iter().map(|f| f.id.clone()).collect()))
}

/// How many of `ids` an `Email/set` reply (call id `s`) leaves unremoved.
pub fn not_removed(responses: &Responses, ids: &[&str], moved: bool) -> Result<usize, BackendError> {
    Ok(super::not_removed(responses.get("s", "Email/set")?, ids, moved))
}
