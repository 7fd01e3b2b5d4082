//! What the HTTP API stand-ins (`gmail_api`, `graph_api`) share: injected
//! throttling, and the record of every request they saw.

use std::time::{Duration, Instant};

/// An injected failure for the next request whose path and query contain
/// `path_contains`.
#[derive(Debug, Clone)]
pub struct Throttle {
    pub path_contains: String,
    /// Gmail: 429 (`rateLimitExceeded`) or 403 (`userRateLimitExceeded`);
    /// Graph: 429 (`ApplicationThrottled`) or 503 (`ServiceUnavailable`).
    pub status: u16,
    pub retry_after: Option<u64>,
    /// Applies to an inner request of a batch instead of a top-level one.
    pub in_batch: bool,
}

/// A request as the stand-in saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: String,
    pub at: Instant,
    pub status: u16,
    /// It carried `Prefer: IdType="ImmutableId"` (Graph; false for Gmail).
    pub immutable_ids: bool,
    /// An inner request of a batch.
    pub in_batch: bool,
}

/// The gap between the first request answered `status` and the next one
/// whose path and query contain `path_part` (its retry).
pub fn gap_after(seen: &[Seen], status: u16, path_part: &str) -> Duration {
    let at = seen.iter().position(|r| r.status == status).expect("a throttled request");
    let retry = seen[at + 1..]
        .iter()
        .find(|r| format!("{}?{}", r.path, r.query).contains(path_part))
        .expect("a retry after the throttled request");
    retry.at.duration_since(seen[at].at)
}
