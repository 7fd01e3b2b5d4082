//! Refusals of IMAP servers that cannot run here — Gmail's and Exchange
//! Online's exact wordings, played by the scripted peer in
//! tests/support/fake_imap.rs (each line quoted there with its source) —
//! reach POP3 clients as what they mean: never `[AUTH]` for a refusal that
//! is not about the password, and a backoff the server asks for is kept.

mod support;

use std::sync::atomic::Ordering;

use support::fake_imap::{
    EXCHANGE_NOT_CONNECTED, EXCHANGE_THROTTLED, EXCHANGE_UNAVAILABLE, FakeImap, GMAIL_BANDWIDTH,
    GMAIL_TOO_MANY_CONNECTIONS, Script,
};
use support::gateway::{Gateway, GatewayProcess};
use support::pop3::Dialogue as _;
use support::pop3::Pop3;

fn pass_reply(gateway_addr: std::net::SocketAddr) -> String {
    let mut c = Pop3::connect(gateway_addr);
    c.ok("USER alice");
    c.cmd("PASS secret")
}

#[test]
fn provider_login_refusals_get_the_reply_they_mean() {
    for (refusal, expected) in [
        (GMAIL_TOO_MANY_CONNECTIONS, "-ERR [IN-USE]"),
        (GMAIL_BANDWIDTH, "-ERR [SYS/TEMP]"),
        (EXCHANGE_UNAVAILABLE, "-ERR [SYS/TEMP]"),
        (EXCHANGE_THROTTLED, "-ERR [SYS/TEMP]"),
    ] {
        let imap = FakeImap::refusing(refusal);
        let gateway = Gateway::url(&format!("imap://{}", imap.addr));
        let reply = pass_reply(gateway.addr);
        assert!(reply.starts_with(expected), "{refusal:?} → {reply}");
        assert_eq!(imap.refused.load(Ordering::Relaxed), 1, "{refusal:?}");
    }
}

/// Exchange's "Suggested Backoff Time": until it has passed, popgate does
/// not call the server again for that account.
#[test]
fn exchanges_suggested_backoff_is_honoured() {
    let imap = FakeImap::refusing(EXCHANGE_THROTTLED);
    let gateway = Gateway::url(&format!("imap://{}", imap.addr));
    for _ in 0..3 {
        assert!(pass_reply(gateway.addr).starts_with("-ERR [SYS/TEMP]"));
    }
    assert_eq!(imap.refused.load(Ordering::Relaxed), 1, "the server was called again within its backoff");
}

/// Exchange app-only IMAP: AUTHENTICATE succeeds, then every command is
/// `BAD User is authenticated but not connected.` — a configuration
/// problem, reported with its fix.
#[test]
fn exchange_app_only_without_mailbox_permission_is_a_configuration_problem_with_the_fix() {
    let imap = FakeImap::scripted(Script {
        password: "secret",
        login_refusal: None,
        select_refusal: Some(EXCHANGE_NOT_CONNECTED),
    });
    let server = GatewayProcess::start(&["--backend", &format!("imap://{}", imap.addr)]);
    let reply = pass_reply(server.addr);
    assert!(reply.starts_with("-ERR [SYS/PERM]"), "{reply}");
    support::wait_for("the fix in the log", support::IO_TIMEOUT, || {
        let log = server.log();
        (log.contains("New-ServicePrincipal") && log.contains("Add-MailboxPermission")).then_some(())
    });
}
