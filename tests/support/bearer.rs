//! Scenarios every backend that logs in with OAuth bearer tokens from a
//! router (`support::token_router`) must pass — the Gmail API and
//! Microsoft Graph today: an expired token is refreshed once and the login
//! retried, a failed refresh is a temporary error, a token expiring in the
//! middle of a session fails that session and removes nothing; and a big
//! message streams, a message deleted meanwhile spoils nothing else.
//!
//! A test file implements `BearerApi` for its stand-in, sets up a
//! `Routed` and has `bearer_scenarios!` make the `#[test]`s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use popgate::backend::SharedBackend;
use popgate::config::Config;

use super::gateway::Gateway;
use super::messages;
use super::pop3::{Dialogue as _, Pop3};
use super::token_router::{TokenRouter, TokenSource};

/// What the scenarios need of a stand-in API.
pub trait BearerApi {
    /// Adds a message to the maildrop; its id.
    fn add(&self, raw: &[u8]) -> String;
    /// From now on `token` is refused as expired.
    fn expire(&self, token: &str);
    /// From now on fresh tokens are refused.
    fn refuse_refresh(&self);
    /// The HTTP status of every request seen so far.
    fn statuses(&self) -> Vec<u16>;
    /// The ids in the maildrop, oldest first.
    fn maildrop(&self) -> Vec<String>;
    /// The ids popgate removed (Gmail's TRASH, Graph's Deleted Items).
    fn removed(&self) -> Vec<String>;
    /// Another client deletes the message for good.
    fn delete(&self, id: &str);
    /// The UIDL popgate gives the message with this id.
    fn uidl(&self, id: &str) -> String;
}

/// A stand-in, popgate in front of it routing one device login to one
/// account with bearer tokens from the stand-in, and that device login.
pub struct Routed<A> {
    pub api: A,
    pub gateway: Gateway,
    pub router: Arc<TokenRouter>,
    pub device: (&'static str, &'static str),
}

impl<A> Routed<A> {
    /// popgate (in-process) routing `device` to `account` on `backend`,
    /// starting with `token` and refreshing from `issuer`.
    pub fn start(
        api: A,
        backend: SharedBackend,
        device: (&'static str, &'static str),
        account: &str,
        token: String,
        issuer: Arc<TokenSource>,
    ) -> Routed<A> {
        let router = TokenRouter::new(backend, device, account, token, issuer);
        let gateway = Gateway::routed(Config::default(), router.clone());
        Routed { api, gateway, router, device }
    }

    /// A POP3 session logged in as the device.
    pub fn login(&self) -> Pop3 {
        self.gateway.login(self.device.0, self.device.1)
    }
}

pub fn an_expired_token_is_refreshed_once_and_the_login_retried<A: BearerApi>(s: &Routed<A>) {
    let id = s.api.add(&messages::simple("behind an expired token"));
    let mut pop = s.login();
    assert_eq!(pop.stat().0, 1);
    pop.quit();
    // The router's token expires between two polls.
    s.api.expire(&s.router.current_token());
    let mut pop = s.login();
    assert_eq!(pop.uidl(), [(1, s.api.uidl(&id))]);
    pop.quit();
    assert_eq!(s.router.refreshes(), 1, "one refresh");
    assert!(s.api.statuses().contains(&401), "the expired token was refused");
}

pub fn a_failed_refresh_is_a_temporary_error<A: BearerApi>(s: &Routed<A>) {
    s.api.add(&messages::simple("unreachable"));
    s.api.expire(&s.router.current_token());
    s.api.refuse_refresh();
    let mut pop = s.gateway.connect();
    pop.ok(&format!("USER {}", s.device.0));
    let reply = pop.cmd(&format!("PASS {}", s.device.1));
    assert!(reply.starts_with("-ERR [SYS/TEMP]"), "{reply}");
    assert_eq!(s.router.refreshes(), 1);
}

pub fn a_token_expiring_mid_session_is_a_temporary_error_and_removes_nothing<A: BearerApi>(s: &Routed<A>) {
    let ids = [s.api.add(&messages::simple("first")), s.api.add(&messages::simple("second"))];
    let mut pop = s.login();
    assert_eq!(pop.stat().0, 2);
    s.api.expire(&s.router.current_token());
    let reply = pop.cmd("RETR 1");
    assert!(reply.starts_with("-ERR [SYS/TEMP]"), "{reply}");
    pop.ok("DELE 2");
    let reply = pop.quit();
    assert!(reply.starts_with("-ERR [SYS/TEMP]"), "{reply}");
    assert_eq!(s.api.maildrop(), ids);
}

/// A message deleted by another client during a session: its RETR is an
/// error but not a temporary one, the others are still served, and DELE of
/// both at QUIT is no failure.
pub fn a_message_deleted_meanwhile_spoils_nothing_else<A: BearerApi>(s: &Routed<A>) {
    let ids = [s.api.add(&messages::simple("gone soon")), s.api.add(&messages::simple("still here"))];
    let mut pop = s.login();
    s.api.delete(&ids[0]);
    let reply = pop.cmd("RETR 1");
    assert!(reply.starts_with("-ERR") && !reply.contains("[SYS/"), "{reply}");
    assert_eq!(pop.retr(2), messages::canonical(&messages::simple("still here")));
    assert_eq!(pop.retr(2), messages::canonical(&messages::simple("still here")));
    pop.ok("DELE 1");
    pop.ok("DELE 2");
    assert!(pop.quit().starts_with("+OK"), "removing what is already gone is no failure");
    assert!(s.api.maildrop().is_empty());
    assert_eq!(s.api.removed(), [ids[1].clone()]);
}

/// Fills the maildrop with `count` typical small messages (fifty short
/// lines each) and logs in cold: how long that took (STAT shows them all).
pub fn cold_login<A: BearerApi>(s: &Routed<A>, count: usize) -> Duration {
    for i in 0..count {
        let mut raw = messages::simple(&format!("message {i}"));
        raw.extend(std::iter::repeat_n(b"a line of a typical small message body\r\n".as_slice(), 50).flatten());
        s.api.add(&raw);
    }
    let started = Instant::now();
    let mut pop = s.login();
    let cold = started.elapsed();
    assert_eq!(pop.stat().0, count);
    pop.quit();
    cold
}

/// Not about tokens, but the same for every bearer backend: an 8 MiB
/// message is listed, TOPped and retrieved exactly, and the session goes on.
pub fn a_big_message_streams_and_top_leaves_the_session_usable<A: BearerApi>(s: &Routed<A>) {
    let raw = messages::big(8);
    let small = messages::simple("after the big one");
    s.api.add(&raw);
    s.api.add(&small);
    let mut pop = s.login();
    let want = messages::canonical(&raw);
    assert_eq!(pop.list_one(1), want.len() as u64);
    assert_eq!(pop.top(1, 3), messages::top(&raw, 3));
    assert_eq!(pop.retr(2), messages::canonical(&small));
    let body = pop.retr(1);
    assert!(body == want, "RETR 1: {} octets, expected {}", body.len(), want.len());
    pop.quit();
}

/// `bearer_scenarios!(setup)`: each scenario above as a `#[test]`
/// of the calling file, run on `setup().bearer()` (a fresh stand-in and
/// gateway per test).
#[allow(unused_macros)]
macro_rules! bearer_scenarios {
    ($setup:expr) => {
        #[test]
        fn an_expired_token_is_refreshed_once_and_the_login_retried() {
            support::bearer::an_expired_token_is_refreshed_once_and_the_login_retried(&$setup());
        }

        #[test]
        fn a_failed_refresh_is_a_temporary_error() {
            support::bearer::a_failed_refresh_is_a_temporary_error(&$setup());
        }

        #[test]
        fn a_token_expiring_mid_session_is_a_temporary_error_and_removes_nothing() {
            support::bearer::a_token_expiring_mid_session_is_a_temporary_error_and_removes_nothing(&$setup());
        }

        #[test]
        fn a_message_deleted_meanwhile_spoils_nothing_else() {
            support::bearer::a_message_deleted_meanwhile_spoils_nothing_else(&$setup());
        }

        #[test]
        fn a_big_message_streams_and_top_leaves_the_session_usable() {
            support::bearer::a_big_message_streams_and_top_leaves_the_session_usable(&$setup());
        }
    };
}
#[allow(unused_imports)]
pub(crate) use bearer_scenarios;
