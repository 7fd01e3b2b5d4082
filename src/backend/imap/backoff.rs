//! The backoffs IMAP servers ask for, per account: shared by the login
//! (`connect`) and the commands of a session (`conn`), which both read
//! refusals that may carry one.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use super::wire::suggested_backoff;
use crate::mail::BackendError;

/// When each account may call the server again, after a server asked us to
/// back off (Exchange Online: "Suggested Backoff Time: N milliseconds").
/// Until then logins and warm sessions of that account fail at once with a
/// temporary error, without touching the server. Bounded: expired entries
/// are dropped, and past `MAX_ACCOUNTS` the oldest deadline goes first.
#[derive(Default)]
pub struct Backoff {
    until: Mutex<HashMap<String, Instant>>,
}

/// Accounts remembered at most (a few bytes each).
const MAX_ACCOUNTS: usize = 100_000;

impl Backoff {
    /// `Unavailable` while `user` must wait.
    pub fn check(&self, user: &str) -> Result<(), BackendError> {
        let until = self.until.lock().unwrap_or_else(|p| p.into_inner()).get(user).copied();
        match until {
            Some(until) if until > Instant::now() => Err(BackendError::Unavailable(format!(
                "the server asked for a backoff; {} ms left",
                until.saturating_duration_since(Instant::now()).as_millis()
            ))),
            _ => Ok(()),
        }
    }

    /// Records a backoff the server asked for in `text`, if it asked.
    pub fn record_from(&self, user: &str, text: &str) {
        let Some(wait) = suggested_backoff(text) else { return };
        tracing::info!(user, backoff_ms = wait.as_millis() as u64, "IMAP server asked for a backoff; honouring it");
        let now = Instant::now();
        let mut until = self.until.lock().unwrap_or_else(|p| p.into_inner());
        until.retain(|_, t| *t > now);
        if until.len() >= MAX_ACCOUNTS
            && let Some(oldest) = until.iter().min_by_key(|(_, t)| **t).map(|(u, _)| u.clone())
        {
            until.remove(&oldest);
        }
        let entry = until.entry(user.to_string()).or_insert(now);
        *entry = (*entry).max(now + wait);
    }
}
