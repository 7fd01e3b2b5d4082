//! Scenarios every backend that logs in with OAuth bearer tokens from a
//! router (`support::token_router`) must pass — the Gmail API and
//! Microsoft Graph today: an expired token is refreshed once and the login
//! retried, a failed refresh is a temporary error, a token expiring in the
//! middle of a session fails that session and removes nothing.
//!
//! A test file implements `BearerApi` for its stand-in and calls each
//! scenario from a `#[test]` of its own.

use super::gateway::Gateway;
use super::messages;
use super::pop3::Dialogue as _;
use super::token_router::TokenRouter;

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
    /// The UIDL popgate gives the message with this id.
    fn uidl(&self, id: &str) -> String;
}

/// A stand-in, popgate routed in front of it, and the device login.
pub struct Bearer<'a, A: BearerApi> {
    pub api: &'a A,
    pub gateway: &'a Gateway,
    pub router: &'a TokenRouter,
    pub device: (&'a str, &'a str),
}

impl<A: BearerApi> Bearer<'_, A> {
    fn login(&self) -> super::pop3::Pop3 {
        self.gateway.login(self.device.0, self.device.1)
    }
}

pub fn an_expired_token_is_refreshed_once_and_the_login_retried<A: BearerApi>(s: &Bearer<A>) {
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

pub fn a_failed_refresh_is_a_temporary_error<A: BearerApi>(s: &Bearer<A>) {
    s.api.add(&messages::simple("unreachable"));
    s.api.expire(&s.router.current_token());
    s.api.refuse_refresh();
    let mut pop = s.gateway.connect();
    pop.ok(&format!("USER {}", s.device.0));
    let reply = pop.cmd(&format!("PASS {}", s.device.1));
    assert!(reply.starts_with("-ERR [SYS/TEMP]"), "{reply}");
    assert_eq!(s.router.refreshes(), 1);
}

pub fn a_token_expiring_mid_session_is_a_temporary_error_and_removes_nothing<A: BearerApi>(s: &Bearer<A>) {
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

/// `token_refresh_scenarios!(setup)`: each scenario above as a `#[test]`
/// of the calling file, run on `setup().bearer()` (a fresh stand-in and
/// gateway per test).
#[allow(unused_macros)]
macro_rules! token_refresh_scenarios {
    ($setup:expr) => {
        #[test]
        fn an_expired_token_is_refreshed_once_and_the_login_retried() {
            support::bearer::an_expired_token_is_refreshed_once_and_the_login_retried(&$setup().bearer());
        }

        #[test]
        fn a_failed_refresh_is_a_temporary_error() {
            support::bearer::a_failed_refresh_is_a_temporary_error(&$setup().bearer());
        }

        #[test]
        fn a_token_expiring_mid_session_is_a_temporary_error_and_removes_nothing() {
            support::bearer::a_token_expiring_mid_session_is_a_temporary_error_and_removes_nothing(&$setup().bearer());
        }
    };
}
#[allow(unused_imports)]
pub(crate) use token_refresh_scenarios;
