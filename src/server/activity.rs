//! What each device did last, for the admin page: its last POP3 poll (when,
//! from where, messages retrieved and deleted), its last error, its last
//! send through a submission listener, and the polls and failures of the
//! last 24 hours in five-minute buckets.
//!
//! Fed by one call at each point of the POP3 and submission drivers (login,
//! a whole RETR, UPDATE, the end of a session, a relayed message); a
//! session's calls are tied together by the tokio task serving it. Every
//! map is bounded, and a flood of failed logins under made-up names can
//! never push out a device that has polled. Holds no secret: user names,
//! addresses, counts and error texts (the same texts the log carries).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use crate::auth::tokens::unix_now;
use crate::mail::BackendError;
use crate::smtp::RelayFailure;

/// Device users remembered (devices that logged in at least once).
const MAX_DEVICES: usize = 10_000;
/// Failed logins of names that never logged in, remembered by name.
const MAX_STRANGERS: usize = 1_000;
/// Sessions being served right now (well above any `max_connections` a
/// fleet of printers needs; past it the oldest session's counts are lost).
const MAX_LIVE: usize = 100_000;
/// Width of one chart bucket.
pub const BUCKET_SECS: u64 = 300;
/// 24 hours of buckets.
pub const BUCKETS: usize = (86_400 / BUCKET_SECS) as usize;
/// Error texts are cut to this many characters.
const MAX_ERROR_CHARS: usize = 300;

/// One POP3 session of a device, as the page shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Poll {
    /// Unix seconds of the login.
    pub at: u64,
    pub address: IpAddr,
    pub account: String,
    pub retrieved: u32,
    pub deleted: u32,
}

/// Something that went wrong, and when (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub at: u64,
    pub what: String,
}

/// A message a device sent through a submission listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Send {
    pub at: u64,
    /// `None`: relayed; otherwise why not.
    pub refused: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceActivity {
    pub last_poll: Option<Poll>,
    pub last_error: Option<Failure>,
    pub last_send: Option<Send>,
    /// Unix seconds of the last thing recorded (eviction order).
    seen: u64,
}

/// Polls and failures in one five-minute bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bucket {
    /// Unix seconds / `BUCKET_SECS`.
    pub index: u64,
    pub polls: u32,
    pub failures: u32,
}

struct Live {
    user: String,
    account: String,
    started: u64,
}

#[derive(Default)]
struct Inner {
    devices: HashMap<String, DeviceActivity>,
    strangers: HashMap<String, Failure>,
    live: HashMap<tokio::task::Id, Live>,
    ring: Vec<Bucket>,
}

/// The registry (see the module documentation).
pub struct Activity {
    inner: Mutex<Inner>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity::new()
    }
}

fn cut(text: String) -> String {
    if text.chars().count() <= MAX_ERROR_CHARS {
        return text;
    }
    text.chars().take(MAX_ERROR_CHARS).chain(std::iter::once('…')).collect()
}

/// Removes the entry with the smallest key, once a map is full.
fn make_room<K: Clone + Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>, max: usize, age: impl Fn(&V) -> u64) {
    if map.len() >= max
        && let Some(oldest) = map.iter().min_by_key(|(_, v)| age(v)).map(|(k, _)| k.clone())
    {
        map.remove(&oldest);
    }
}

impl Activity {
    pub fn new() -> Self {
        Activity { inner: Mutex::new(Inner { ring: vec![Bucket::default(); BUCKETS], ..Inner::default() }) }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A POP3 login of `user` from `peer` ended: `Ok(account)` or why not.
    pub fn login(&self, peer: IpAddr, user: &str, outcome: Result<&str, &BackendError>) {
        self.login_at(unix_now(), tokio::task::try_id(), peer, user, outcome)
    }

    fn login_at(
        &self,
        now: u64,
        task: Option<tokio::task::Id>,
        peer: IpAddr,
        user: &str,
        outcome: Result<&str, &BackendError>,
    ) {
        let mut inner = self.inner();
        inner.count(now, outcome.is_ok());
        match outcome {
            Ok(account) => {
                if !inner.devices.contains_key(user) {
                    make_room(&mut inner.devices, MAX_DEVICES, |d| d.seen);
                }
                inner.strangers.remove(user);
                let device = inner.devices.entry(user.to_string()).or_default();
                device.seen = now;
                device.last_poll =
                    Some(Poll { at: now, address: peer, account: account.to_string(), retrieved: 0, deleted: 0 });
                if let Some(task) = task {
                    if !inner.live.contains_key(&task) {
                        make_room(&mut inner.live, MAX_LIVE, |l| l.started);
                    }
                    inner
                        .live
                        .insert(task, Live { user: user.to_string(), account: account.to_string(), started: now });
                }
            }
            Err(e) => {
                let failure = Failure { at: now, what: cut(format!("login from {peer}: {e}")) };
                match inner.devices.get_mut(user) {
                    Some(device) => {
                        device.seen = now;
                        device.last_error = Some(failure);
                    }
                    None => {
                        if !inner.strangers.contains_key(user) {
                            make_room(&mut inner.strangers, MAX_STRANGERS, |f| f.at);
                        }
                        inner.strangers.insert(user.to_string(), failure);
                    }
                }
            }
        }
    }

    /// The current session sent a message whole (`whole`: RETR, not TOP).
    pub fn sent_message(&self, whole: bool) {
        if !whole {
            return;
        }
        let Some(task) = tokio::task::try_id() else { return };
        self.with_live_poll(task, |poll| poll.retrieved = poll.retrieved.saturating_add(1));
    }

    /// The current session's UPDATE: messages removed, or why not.
    pub fn committed(&self, result: &Result<usize, BackendError>) {
        let Some(task) = tokio::task::try_id() else { return };
        self.committed_in(unix_now(), task, result)
    }

    fn committed_in(&self, now: u64, task: tokio::task::Id, result: &Result<usize, BackendError>) {
        match result {
            Ok(n) => {
                let n = u32::try_from(*n).unwrap_or(u32::MAX);
                self.with_live_poll(task, |poll| poll.deleted = poll.deleted.saturating_add(n));
            }
            Err(e) => {
                let mut inner = self.inner();
                inner.count_failure(now);
                let Some(user) = inner.live.get(&task).map(|l| l.user.clone()) else { return };
                if let Some(device) = inner.devices.get_mut(&user) {
                    device.last_error = Some(Failure { at: now, what: cut(format!("deleting: {e}")) });
                }
            }
        }
    }

    /// The current session ended (whatever way).
    pub fn session_ended(&self) {
        if let Some(task) = tokio::task::try_id() {
            self.inner().live.remove(&task);
        }
    }

    fn with_live_poll(&self, task: tokio::task::Id, change: impl FnOnce(&mut Poll)) {
        let mut inner = self.inner();
        let Some(user) = inner.live.get(&task).map(|l| l.user.clone()) else { return };
        if let Some(poll) = inner.devices.get_mut(&user).and_then(|d| d.last_poll.as_mut()) {
            change(poll);
        }
    }

    /// A device's message through a submission listener: relayed or not.
    pub fn relayed(&self, device: Option<&str>, result: &Result<(), RelayFailure>) {
        let Some(device) = device else { return };
        let now = unix_now();
        let refused = result.as_ref().err().map(|e| {
            cut(match e {
                RelayFailure::Upstream { code, text } => format!("upstream answered {code} {text}"),
                RelayFailure::Unavailable => "upstream unavailable".into(),
                RelayFailure::Credentials => "upstream refused the account's credentials".into(),
                RelayFailure::RateLimited => "hourly allowance spent".into(),
            })
        });
        let mut inner = self.inner();
        if !inner.devices.contains_key(device) {
            make_room(&mut inner.devices, MAX_DEVICES, |d| d.seen);
        }
        let entry = inner.devices.entry(device.to_string()).or_default();
        entry.seen = now;
        if let Some(why) = &refused {
            entry.last_error = Some(Failure { at: now, what: format!("sending: {why}") });
        }
        entry.last_send = Some(Send { at: now, refused });
    }

    /// What `user` did last, if anything (a failed login of a name that
    /// never logged in shows as its last error).
    pub fn device(&self, user: &str) -> DeviceActivity {
        let inner = self.inner();
        match inner.devices.get(user) {
            Some(device) => device.clone(),
            None => DeviceActivity { last_error: inner.strangers.get(user).cloned(), ..DeviceActivity::default() },
        }
    }

    /// POP3 sessions logged in now, by account.
    pub fn sessions_by_account(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for live in self.inner().live.values() {
            *counts.entry(live.account.clone()).or_default() += 1;
        }
        counts
    }

    /// The last error of any device of `account` (the account's last
    /// error as its devices saw it).
    pub fn last_account_error(&self, users: &[&str]) -> Option<Failure> {
        let inner = self.inner();
        users.iter().filter_map(|u| inner.devices.get(*u)?.last_error.clone()).max_by_key(|f| f.at)
    }

    /// The last 24 hours, oldest bucket first, ending with the current one.
    pub fn chart(&self) -> Vec<Bucket> {
        self.chart_at(unix_now())
    }

    fn chart_at(&self, now: u64) -> Vec<Bucket> {
        let inner = self.inner();
        let current = now / BUCKET_SECS;
        (0..BUCKETS as u64)
            .rev()
            .map(|ago| {
                let index = current.saturating_sub(ago);
                let slot = inner.ring[(index % BUCKETS as u64) as usize];
                if slot.index == index { slot } else { Bucket { index, ..Bucket::default() } }
            })
            .collect()
    }
}

impl Inner {
    fn bucket(&mut self, now: u64) -> &mut Bucket {
        let index = now / BUCKET_SECS;
        let slot = &mut self.ring[(index % BUCKETS as u64) as usize];
        if slot.index != index {
            *slot = Bucket { index, ..Bucket::default() };
        }
        slot
    }

    fn count(&mut self, now: u64, ok: bool) {
        if ok {
            let bucket = self.bucket(now);
            bucket.polls = bucket.polls.saturating_add(1);
        } else {
            self.count_failure(now);
        }
    }

    fn count_failure(&mut self, now: u64) {
        let bucket = self.bucket(now);
        bucket.failures = bucket.failures.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 7));

    async fn task_id() -> tokio::task::Id {
        tokio::spawn(async { tokio::task::id() }).await.unwrap()
    }

    #[tokio::test]
    async fn a_session_records_its_poll_counts_and_ends() {
        let activity = Activity::new();
        let task = task_id().await;
        activity.login_at(1_000, Some(task), PEER, "printer", Ok("office"));
        activity.with_live_poll(task, |p| p.retrieved += 2);
        activity.committed_in(1_001, task, &Ok(2));
        assert_eq!(activity.sessions_by_account().get("office"), Some(&1));
        activity.inner().live.remove(&task);
        let poll = activity.device("printer").last_poll.unwrap();
        assert_eq!((poll.at, poll.address, poll.retrieved, poll.deleted), (1_000, PEER, 2, 2));
        assert!(activity.sessions_by_account().is_empty());
    }

    #[test]
    fn failed_logins_of_strangers_never_push_out_a_device() {
        let activity = Activity::new();
        activity.login_at(1, None, PEER, "printer", Ok("office"));
        for n in 0..(MAX_STRANGERS * 2) {
            activity.login_at(2 + n as u64, None, PEER, &format!("guess{n}"), Err(&BackendError::AuthFailed));
        }
        assert!(activity.device("printer").last_poll.is_some());
        assert_eq!(activity.inner().strangers.len(), MAX_STRANGERS - 1 + 1);
        assert!(activity.device(&format!("guess{}", MAX_STRANGERS * 2 - 1)).last_error.is_some());
    }

    #[test]
    fn the_chart_keeps_24_hours_of_buckets_and_forgets_older_ones() {
        let activity = Activity::new();
        let start = 1_700_000_000 / BUCKET_SECS * BUCKET_SECS;
        activity.login_at(start, None, PEER, "a", Ok("x"));
        activity.login_at(start + 1, None, PEER, "a", Err(&BackendError::AuthFailed));
        let chart = activity.chart_at(start + 10);
        assert_eq!(chart.len(), BUCKETS);
        assert_eq!((chart[BUCKETS - 1].polls, chart[BUCKETS - 1].failures), (1, 1));
        // A day later the same slot holds the new bucket, not the old counts.
        let later = start + 86_400;
        activity.login_at(later, None, PEER, "a", Ok("x"));
        let chart = activity.chart_at(later);
        assert_eq!((chart[BUCKETS - 1].polls, chart[BUCKETS - 1].failures), (1, 0));
        assert_eq!(chart.iter().map(|b| b.polls).sum::<u32>(), 1);
    }

    #[test]
    fn a_refused_send_is_the_devices_last_error() {
        let activity = Activity::new();
        activity.relayed(Some("scanner"), &Err(RelayFailure::RateLimited));
        let device = activity.device("scanner");
        assert!(device.last_send.unwrap().refused.is_some());
        assert!(device.last_error.unwrap().what.contains("allowance"));
    }
}
