//! Logging in, outside the socket driver: the throttle's delay, the router
//! (which account, which credentials), one of the account's backend
//! connections (idle or new, see `backend::pool`) with one
//! refresh-and-retry when routed credentials are refused, the listing, and
//! exact sizes. The driver hands over the client's credentials and gets
//! back a ready maildrop, and the session's claim on the account's
//! connections (none held once logged in), or the failure to answer with.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::Context;
use crate::auth::accounts::{policy, seen};
use crate::backend::Disposal;
use crate::backend::pool::SharedMailbox;
use crate::mail::{BackendError, Credentials, StoreId};
use crate::pop3::{Maildrop, Message, Retention};

/// A maildrop opened for one POP3 session.
pub struct LoggedIn {
    /// The account's backend connections, borrowed per call; none is held
    /// now.
    pub backend: SharedMailbox,
    /// The listing ran on an idle connection (no backend login).
    pub reused: bool,
    pub maildrop: Maildrop,
    /// The account's metrics label (bounded: see `Route::label`).
    pub account: String,
    pub backend_kind: &'static str,
    /// `on_delete = "keep"`: the UPDATE state removes nothing.
    pub keep: bool,
    /// What the UPDATE state's removal does (the device's `on_delete`). Set
    /// again on the connection the UPDATE borrows: the account's
    /// connections are shared, and another device's login may have set its
    /// own on that one since.
    pub disposal: Disposal,
    /// `sharing = "each_device_once"`: the device's record, committed at
    /// UPDATE.
    pub visit: Option<seen::Visit>,
    /// This user's EXPIRE and LOGIN-DELAY, for CAPA.
    pub retention: Retention,
    /// `oversize = "notice"`: the notices in the maildrop, by their ids
    /// there (`Notice::id`), served from memory; DELE of one removes its
    /// original.
    pub notices: std::collections::HashMap<StoreId, policy::Notice>,
}

/// Why a login did not open a maildrop.
#[derive(Debug)]
pub enum LoginError {
    Backend(BackendError),
    /// The device logged in less than its `login_delay_secs` ago (RFC 2449
    /// LOGIN-DELAY): refused before the store is asked anything.
    TooSoon,
}

impl From<BackendError> for LoginError {
    fn from(e: BackendError) -> Self {
        LoginError::Backend(e)
    }
}

/// Bounds the table of last logins (entries older than the longest delay
/// are dropped first).
const MAX_LOGIN_TIMES: usize = 100_000;

/// When each user (per account) last logged in, for LOGIN-DELAY:
/// process-local, so each replica enforces it on the logins it serves.
fn last_logins() -> &'static std::sync::Mutex<std::collections::HashMap<String, Instant>> {
    static TABLE: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<String, Instant>>> =
        std::sync::OnceLock::new();
    TABLE.get_or_init(Default::default)
}

/// Takes the login slot of `key` unless its last login is less than
/// `delay` ago (`Err`); `Ok(previous)`, to give back if the login fails.
fn take_login_slot(key: &str, delay: Duration) -> Result<Option<Instant>, ()> {
    let mut table = last_logins().lock().unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    if let Some(last) = table.get(key)
        && now.duration_since(*last) < delay
    {
        return Err(());
    }
    if table.len() >= MAX_LOGIN_TIMES {
        let longest = Duration::from_secs(policy::MAX_LOGIN_DELAY_SECS);
        table.retain(|_, at| now.duration_since(*at) < longest);
        if table.len() >= MAX_LOGIN_TIMES {
            tracing::warn!("too many users with a login delay; forgetting every last login");
            table.clear();
        }
    }
    Ok(table.insert(key.to_string(), now))
}

fn give_back_login_slot(key: &str, previous: Option<Instant>) {
    let mut table = last_logins().lock().unwrap_or_else(|p| p.into_inner());
    match previous {
        Some(at) => table.insert(key.to_string(), at),
        None => table.remove(key),
    };
}

/// Logs `credentials` in, after the throttle's delay for this address and
/// user. `None`: the server is shutting down and the login was abandoned.
pub async fn log_in(
    context: &Context,
    peer: IpAddr,
    credentials: &Credentials,
) -> Option<Result<LoggedIn, LoginError>> {
    let throttle = &context.throttle;
    let opened = tokio::select! {
        _ = context.stopped() => return None,
        opened = async {
            // The wait before: this address's failures with this user name
            // (and, capped small, the address's failures with any name),
            // counted by every replica sharing the state store.
            let delay = throttle.delay_shared(peer, &credentials.user).await;
            if !delay.is_zero() {
                tracing::debug!(delay_ms = delay.as_millis() as u64, "throttling login after failures");
                tokio::time::sleep(delay).await;
            }
            let opened = open_maildrop(context, credentials).await;
            if let Err(LoginError::Backend(BackendError::AuthFailed | BackendError::BadCredentials(_))) = &opened {
                // The wait after: the user name's failures from every
                // address hold up only a failed guess, never the right
                // password.
                let more = throttle.failure_delay_shared(&credentials.user, delay).await;
                throttle.record_failure_shared(peer, &credentials.user).await;
                if !more.is_zero() {
                    tracing::debug!(delay_ms = more.as_millis() as u64, "throttling a failed login of a guessed user");
                    tokio::time::sleep(more).await;
                }
            }
            opened
        } => opened,
    };
    if opened.is_ok() {
        throttle.record_success_shared(peer, &credentials.user).await;
    }
    let too_soon = BackendError::InUse("login delay".into());
    let outcome = opened.as_ref().map(|l| l.account.as_str()).map_err(|e| match e {
        LoginError::Backend(e) => e,
        LoginError::TooSoon => &too_soon,
    });
    context.activity.login(peer, &credentials.user, outcome);
    let metrics = &context.metrics;
    match &opened {
        Ok(logged_in) => {
            metrics.login("success", "ok");
            if logged_in.reused {
                metrics.backend_sessions_reused.inc();
            } else {
                metrics.backend_logins.inc();
            }
            tracing::Span::current().record("user", credentials.user.as_str());
            tracing::info!(messages = logged_in.maildrop.stat().0, "logged in");
        }
        Err(LoginError::Backend(e)) => {
            metrics.login("failure", error_class(e));
            tracing::info!(user = %credentials.user, error = %e, "login failed");
        }
        Err(LoginError::TooSoon) => {
            metrics.login("failure", "login_delay");
            tracing::info!(user = %credentials.user, "login refused: sooner than the device's login_delay_secs");
        }
    }
    Some(opened)
}

/// Routes the login, waits for the pool's admission
/// (`popgate_backend_operation_duration_seconds{operation="login_queue"}`),
/// borrows one of the account's backend connections (idle, made current,
/// or a new login), lists the mailbox, makes every size exact and gives
/// the connection back.
async fn open_maildrop(context: &Context, credentials: &Credentials) -> Result<LoggedIn, LoginError> {
    let route = context.router.route(credentials).await?;
    // LOGIN-DELAY: checked once the password is known right, before the
    // store is asked anything; the slot is given back if the login fails.
    let slot = match route.policy.login_delay {
        None => None,
        Some(delay) => {
            let key = format!("{}\0{}", route.account, credentials.user);
            let previous = take_login_slot(&key, delay).map_err(|()| LoginError::TooSoon)?;
            Some((key, previous))
        }
    };
    let opened = open_routed(context, route).await;
    if opened.is_err()
        && let Some((key, previous)) = slot
    {
        give_back_login_slot(&key, previous);
    }
    opened.map_err(LoginError::Backend)
}

async fn open_routed(context: &Context, route: crate::auth::accounts::Route) -> Result<LoggedIn, BackendError> {
    let kind = route.backend.kind();
    // Admission for the backend work only, after routing: a burst of wrong
    // passwords (refused by the router) never queues ahead of a device.
    // The time queued is recorded apart, so that a latency figure under
    // overload says how much of it was waiting.
    let queued = Instant::now();
    let admitted = context.pool.admit_login().await;
    context.metrics.backend_op(kind, "login_queue", queued.elapsed());
    let _admitted = admitted?;
    let timed = |operation: &'static str, started: Instant| {
        context.metrics.backend_op(kind, operation, started.elapsed());
    };
    let started = Instant::now();
    let mut backend = context.pool.session(&route.backend, route.credentials.clone());
    let mut opened = backend.borrow_fresh().await;
    if let Err(BackendError::AuthFailed) = opened {
        // Credentials the router holds (an access token) were refused: one
        // refresh and one retry. A refusal after that is the router's
        // problem, not the client's: a temporary failure.
        if let Some(fresh) = context.router.refresh(&route).await? {
            backend = context.pool.session(&route.backend, fresh);
            opened = match backend.borrow_fresh().await {
                Err(BackendError::AuthFailed) => {
                    Err(BackendError::unavailable("backend refused refreshed credentials"))
                }
                other => other,
            };
        }
    }
    timed("open", started);
    let counted = |e: BackendError| {
        // A wrong password is the client's failure (popgate_logins_total),
        // not the backend's.
        if !matches!(e, BackendError::AuthFailed | BackendError::BadCredentials(_)) {
            context.metrics.backend_error(kind, error_class(&e));
        }
        e
    };
    let mut lent = opened.map_err(counted)?;
    let reused = lent.reused();
    let mailbox = lent.mailbox();
    let started = Instant::now();
    let listed_at =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let listed = mailbox.list().await;
    timed("list", started);
    // each_device_once: what this device already had is left out, decided
    // on the complete listing (before any filter hides part of it).
    let mut visit = None;
    let listed = match (listed, &route.policy.seat) {
        (Ok(listed), Some(seat)) => {
            let started = Instant::now();
            let shown = seat.hide_had(&route.account, &mut *mailbox, listed, listed_at).await;
            timed("device_records", started);
            shown.map(|(shown, v)| {
                visit = Some(v);
                shown
            })
        }
        (listed, _) => listed,
    };
    // max_size_bytes decides on exact sizes: a store that lists none
    // (Graph) or only claims them is measured first (cached as always);
    // the measuring below then finds nothing left to do.
    let listed = match listed {
        Ok(listed) if route.policy.max_size_bytes.is_some() => {
            let started = Instant::now();
            let exact = context.sizes.resolve(&route.account, &mut *mailbox, listed).await;
            timed("measure_sizes", started);
            exact
        }
        other => other,
    };
    let shown = match listed {
        Ok(listed) => {
            let started = Instant::now();
            let shown = policy::apply_with_notices(&mut *mailbox, &route.policy, listed).await;
            timed("device_policy", started);
            shown
        }
        Err(e) => Err(e),
    };
    // Only stored messages are measured: a notice is popgate's own, its
    // size known exactly since it was built.
    let listed = match shown {
        Ok(shown) => {
            let started = Instant::now();
            let stored = shown
                .iter()
                .filter_map(|entry| match entry {
                    policy::Shown::Message(message) => Some(message.clone()),
                    policy::Shown::Notice(_) => None,
                })
                .collect();
            let exact = context.sizes.resolve(&route.account, &mut *mailbox, stored).await;
            timed("measure_sizes", started);
            exact.map(|exact| (shown, exact))
        }
        Err(e) => Err(e),
    };
    backend.give_back(lent, listed.is_ok()).await;
    match listed {
        Ok((shown, exact)) => {
            let mut exact: std::collections::HashMap<_, _> = exact.into_iter().map(|m| (m.id.clone(), m)).collect();
            let mut notices = std::collections::HashMap::new();
            let messages = shown
                .into_iter()
                .filter_map(|entry| match entry {
                    policy::Shown::Message(message) => {
                        exact.remove(&message.id).map(|m| Message { id: m.id, uidl: m.uidl, size: m.size.value() })
                    }
                    policy::Shown::Notice(notice) => {
                        let entry = Message { id: notice.id(), uidl: notice.uidl.clone(), size: notice.size() };
                        notices.insert(notice.id(), notice);
                        Some(entry)
                    }
                })
                .collect();
            Ok(LoggedIn {
                backend,
                reused,
                maildrop: Maildrop::new(messages),
                notices,
                account: route.label,
                backend_kind: kind,
                keep: route.policy.keep,
                disposal: route.policy.disposal.clone(),
                visit,
                retention: Retention {
                    expire_days: route.policy.expire_days(),
                    login_delay_secs: route.policy.login_delay.map_or(0, |d| d.as_secs()),
                },
            })
        }
        Err(e) => {
            backend.end().await;
            Err(counted(e))
        }
    }
}

/// A short, bounded word for the logins and backend error metrics.
pub fn error_class(e: &BackendError) -> &'static str {
    match e {
        BackendError::AuthFailed => "auth",
        BackendError::BadCredentials(_) => "bad_credentials",
        BackendError::InUse(_) => "in_use",
        BackendError::Unavailable(_) => "unavailable",
        BackendError::Permanent(_) => "permanent",
        BackendError::MessageGone => "message_gone",
    }
}
