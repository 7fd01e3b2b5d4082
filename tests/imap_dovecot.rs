//! popgate over a real IMAP server: a private Dovecot per test.
//!
//! What a POP3 client must get is computed from what Dovecot holds (its
//! BODY[]), not from what was appended: Dovecot rewrites some bare CRs.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::dovecot::{ALICE, CAROL, DAVE, Dovecot};
use support::gateway::Gateway;
use support::messages::{self, canonical, simple, top};
use support::pop3::{Pop3, parse_stat, plain_response};
use support::proxy::RecordingProxy;

/// A Dovecot where alice has these messages, and popgate in front of it.
fn setup(messages: &[Vec<u8>]) -> (Dovecot, Gateway, Vec<u32>) {
    let dovecot = Dovecot::start();
    let uids = dovecot.append_all(ALICE.0, messages);
    let gateway = Gateway::url(&dovecot.imap_url());
    (dovecot, gateway, uids)
}

fn login(gateway: &Gateway) -> Pop3 {
    gateway.login(ALICE.0, ALICE.1)
}

/// Messages whose Subject names their position: "marker-1", "marker-2", …
fn marked(count: usize) -> Vec<Vec<u8>> {
    (1..=count).map(|i| simple(&format!("marker-{i}"))).collect()
}

/// Which POP3 message number carries which "marker-N" subject (by TOP).
fn numbers_by_marker(c: &mut Pop3) -> HashMap<String, u32> {
    let (count, _) = c.stat();
    (1..=count as u32)
        .map(|n| {
            let header = String::from_utf8(c.top(n, 0)).expect("ASCII header");
            let subject = header.lines().find_map(|l| l.strip_prefix("Subject: ")).expect("Subject").to_string();
            (subject, n)
        })
        .collect()
}

/// The canonical form of what Dovecot stores for each UID.
fn expected(dovecot: &Dovecot, uids: &[u32]) -> Vec<Vec<u8>> {
    uids.iter().map(|&uid| canonical(&dovecot.fetch(ALICE.0, uid))).collect()
}

fn assert_untouched(dovecot: &Dovecot, uids: &[u32]) {
    let stored = dovecot.messages(ALICE.0);
    assert_eq!(stored.iter().map(|m| m.uid).collect::<Vec<_>>(), uids, "messages in Dovecot");
    assert!(stored.iter().all(|m| !m.is_deleted()), "popgate left \\Deleted flags behind: {stored:?}");
}

#[test]
fn full_session() {
    let msgs = marked(3);
    let (dovecot, gateway, uids) = setup(&msgs);
    let want = expected(&dovecot, &uids);
    let total: u64 = want.iter().map(|m| m.len() as u64).sum();

    let mut c = gateway.connect();
    c.user_pass(ALICE.0, ALICE.1);
    assert_eq!(c.stat(), (3, total));
    assert_eq!(c.list(), want.iter().enumerate().map(|(i, m)| (i as u32 + 1, m.len() as u64)).collect::<Vec<_>>());
    assert_eq!(c.uidl().len(), 3);
    for (i, m) in want.iter().enumerate() {
        assert_eq!(&c.retr(i as u32 + 1), m, "RETR {}", i + 1);
        assert_eq!(c.top(i as u32 + 1, 0), top(&msgs[i], 0));
    }
    c.ok("NOOP");
    c.ok("DELE 2");
    assert_eq!(c.stat(), (2, total - want[1].len() as u64));
    c.err("RETR 2");
    let bye = c.quit();
    assert!(bye.starts_with("+OK"), "{bye}");
    assert_untouched(&dovecot, &[uids[0], uids[2]]);

    // Retrieval did not mark anything \Seen either (BODY.PEEK by default).
    let mut c = login(&gateway);
    assert_eq!(c.stat().0, 2);
    assert_eq!(c.retr(2), want[2]);
    c.quit();
    let stored = dovecot.messages(ALICE.0);
    assert!(stored.iter().all(|m| m.flags.iter().all(|f| f == "\\Recent")), "flags changed: {stored:?}");
}

#[test]
fn uidl_is_stable_and_equals_dovecots_own_pop3_uidl() {
    let (mut dovecot, gateway, _uids) = setup(&marked(4));
    let first = login(&gateway).uidl();
    let mut c = login(&gateway);
    assert_eq!(c.uidl(), first, "UIDL changed between sessions");
    assert_eq!(c.uidl_one(3), first[2].1);
    c.quit();
    assert_eq!(first, dovecot.pop3_uidl(ALICE.0), "popgate's UIDL differs from Dovecot's POP3 UIDL");

    // After a deletion the others keep their ids.
    let mut c = login(&gateway);
    c.ok("DELE 2");
    c.quit();
    let after: Vec<String> = login(&gateway).uidl().into_iter().map(|(_, u)| u).collect();
    assert_eq!(after, vec![first[0].1.clone(), first[2].1.clone(), first[3].1.clone()]);

    // And across a restart of the IMAP server.
    drop(gateway);
    dovecot.restart();
    let gateway = Gateway::url(&dovecot.imap_url());
    let again = login(&gateway).uidl();
    assert_eq!(again.into_iter().map(|(_, u)| u).collect::<Vec<_>>(), after);
    assert_eq!(login(&gateway).uidl(), dovecot.pop3_uidl(ALICE.0));
}

#[test]
fn quit_removes_exactly_the_deleted_messages_and_not_what_another_client_flagged() {
    let (dovecot, gateway, uids) = setup(&marked(5));
    // Another client flags marker-2 \Deleted and leaves without expunging.
    dovecot.flag_deleted(ALICE.0, uids[1]);

    let mut c = login(&gateway);
    let numbers = numbers_by_marker(&mut c);
    c.ok(&format!("DELE {}", numbers["marker-1"]));
    c.ok(&format!("DELE {}", numbers["marker-3"]));
    let bye = c.quit();
    assert!(bye.starts_with("+OK"), "{bye}");

    let stored = dovecot.messages(ALICE.0);
    assert_eq!(stored.iter().map(|m| m.uid).collect::<Vec<_>>(), vec![uids[1], uids[3], uids[4]]);
    assert!(stored[0].is_deleted(), "the other client's \\Deleted flag must stay: {stored:?}");
    assert!(!stored[1].is_deleted() && !stored[2].is_deleted(), "{stored:?}");
}

#[test]
fn dele_then_dropped_connection_deletes_nothing() {
    let (dovecot, gateway, uids) = setup(&marked(3));
    let mut c = login(&gateway);
    c.ok("DELE 1");
    c.ok("DELE 3");
    c.drop_connection();
    gateway.shutdown(Duration::from_secs(15));
    assert_untouched(&dovecot, &uids);
}

#[test]
fn rset_undoes_dele() {
    let (dovecot, gateway, uids) = setup(&marked(3));
    let mut c = login(&gateway);
    c.ok("DELE 1");
    c.ok("DELE 2");
    assert_eq!(c.stat().0, 1);
    c.ok("RSET");
    assert_eq!(c.stat().0, 3);
    assert!(c.quit().starts_with("+OK"));
    assert_untouched(&dovecot, &uids);
}

#[test]
fn pipelined_commands() {
    let msgs = marked(3);
    let (dovecot, gateway, uids) = setup(&msgs);
    let want = expected(&dovecot, &uids);
    let mut c = gateway.connect();
    c.send_raw(
        format!(
            "USER {}\r\nPASS {}\r\nSTAT\r\nLIST\r\nUIDL\r\nRETR 1\r\nTOP 2 0\r\nRETR 9\r\nDELE 1\r\nNOOP\r\nQUIT\r\n",
            ALICE.0, ALICE.1
        )
        .as_bytes(),
    );
    assert!(c.line().starts_with("+OK")); // USER
    assert!(c.line().starts_with("+OK")); // PASS
    let total = want.iter().map(|m| m.len() as u64).sum();
    assert_eq!(parse_stat(&c.line()), (3, total));
    assert!(c.line().starts_with("+OK"));
    assert_eq!(c.body_lines().len(), 3);
    assert!(c.line().starts_with("+OK"));
    assert_eq!(c.body_lines().len(), 3);
    assert!(c.line().starts_with("+OK"));
    assert_eq!(c.body(), want[0]);
    assert!(c.line().starts_with("+OK"));
    assert_eq!(c.body(), top(&msgs[1], 0));
    assert!(c.line().starts_with("-ERR")); // RETR 9
    assert!(c.line().starts_with("+OK")); // DELE 1
    assert!(c.line().starts_with("+OK")); // NOOP
    assert!(c.line().starts_with("+OK")); // QUIT
    c.expect_closed();
    assert_untouched(&dovecot, &uids[1..]);
}

/// LIST/STAT sizes equal the octets RETR sends, though Dovecot's
/// RFC822.SIZE is wrong for some of these (bare CR, no final line end).
#[test]
fn sizes_equal_retr_octets_for_hard_messages() {
    let samples = messages::hard();
    let raws: Vec<Vec<u8>> = samples.iter().map(|s| s.raw.clone()).collect();
    let (dovecot, gateway, uids) = setup(&raws);
    let stored: Vec<Vec<u8>> = uids.iter().map(|&u| dovecot.fetch(ALICE.0, u)).collect();
    assert!(
        stored.iter().any(|s| canonical(s).len() != s.len()),
        "some stored messages must differ from their POP3 form, or this test proves little"
    );
    // Two sessions: the second uses the sizes remembered from the first.
    for session in 1..=2 {
        let mut c = login(&gateway);
        let total = stored.iter().map(|s| canonical(s).len() as u64).sum();
        assert_eq!(c.stat(), (samples.len(), total), "session {session}");
        let list = c.list();
        for (i, sample) in samples.iter().enumerate() {
            let n = i as u32 + 1;
            let want = canonical(&stored[i]);
            assert_eq!(list[i], (n, want.len() as u64), "LIST, {}, session {session}", sample.name);
            assert_eq!(c.list_one(n), want.len() as u64);
            let got = c.retr(n);
            assert_eq!(got.len(), want.len(), "RETR octets, {}, session {session}", sample.name);
            assert!(got == want, "RETR content, {}, session {session}", sample.name);
            assert_eq!(c.top(n, 1), top(&stored[i], 1), "TOP {n} 1, {}", sample.name);
        }
        c.quit();
    }
}

#[test]
fn a_30_mb_message() {
    let big = messages::big(30);
    let (dovecot, gateway, uids) = setup(&[simple("small"), big.clone()]);
    let want = canonical(&dovecot.fetch(ALICE.0, uids[1]));
    assert_eq!(want, canonical(&big));
    let mut c = login(&gateway);
    assert_eq!(c.list_one(2), want.len() as u64);
    let got = c.retr(2);
    assert_eq!(got.len(), want.len());
    assert!(got == want, "RETR of the 30 MB message differs");
    assert_eq!(c.top(2, 3), top(&big, 3));
    c.ok("DELE 2");
    assert!(c.quit().starts_with("+OK"));
    assert_untouched(&dovecot, &uids[..1]);
}

#[test]
fn dovecot_dying_mid_session_is_sys_temp_and_deletes_nothing() {
    let (mut dovecot, gateway, uids) = setup(&marked(3));
    let mut c = login(&gateway);
    c.retr(1);
    c.ok("DELE 1");
    c.ok("DELE 2");
    dovecot.stop();

    let retr = c.cmd("RETR 3");
    assert!(retr.starts_with("-ERR [SYS/TEMP]"), "RETR with Dovecot down: {retr}");
    let quit = c.cmd("QUIT");
    assert!(quit.starts_with("-ERR [SYS/TEMP]"), "QUIT with Dovecot down: {quit}");
    c.expect_closed();

    // A new login meanwhile is a temporary failure, not a wrong password.
    let mut c = gateway.connect();
    c.ok(&format!("USER {}", ALICE.0));
    let reply = c.cmd(&format!("PASS {}", ALICE.1));
    assert!(reply.starts_with("-ERR [SYS/TEMP]"), "login with Dovecot down: {reply}");

    dovecot.restart();
    assert_untouched(&dovecot, &uids);
}

#[test]
fn a_password_with_quotes_and_backslashes_logs_in() {
    let dovecot = Dovecot::start();
    dovecot.append_all(CAROL.0, &marked(2));
    let gateway = Gateway::url(&dovecot.imap_url());

    let mut c = gateway.login(CAROL.0, CAROL.1);
    assert_eq!(c.stat().0, 2);
    c.quit();

    let mut c = gateway.connect();
    let reply = c.auth_plain(CAROL.0, CAROL.1);
    assert!(reply.starts_with("+OK"), "AUTH PLAIN as carol: {reply}");
    assert_eq!(c.stat().0, 2);
    c.quit();

    // A near miss is refused as bad credentials.
    let mut c = gateway.connect();
    c.ok(&format!("USER {}", CAROL.0));
    let reply = c.cmd(&format!("PASS {}", CAROL.1.replace('\\', "")));
    assert!(reply.starts_with("-ERR [AUTH]"), "{reply}");
}

#[test]
fn a_wrong_password_is_an_auth_error() {
    let (_dovecot, gateway, _) = setup(&marked(1));
    let mut c = gateway.connect();
    c.ok(&format!("USER {}", ALICE.0));
    let reply = c.cmd("PASS not-the-password");
    assert!(reply.starts_with("-ERR [AUTH]"), "{reply}");
    c.user_pass(ALICE.0, ALICE.1);
    assert_eq!(c.stat().0, 1);
    c.quit();
}

/// NUL in a password is refused by popgate itself: no connection to the
/// IMAP server is even opened (seen through a recording proxy).
#[test]
fn nul_in_a_password_is_refused_without_reaching_dovecot() {
    let dovecot = Dovecot::start();
    let proxy = RecordingProxy::start(dovecot.imap_addr());
    let gateway = Gateway::url(&format!("imap://{}", proxy.addr));
    let (user, password) = DAVE;

    let mut c = gateway.connect();
    // AUTH PLAIN whose password holds a NUL after the real password.
    let sneaky = plain_response(user.as_bytes(), format!("{password}\0x").as_bytes());
    let reply = c.cmd(&format!("AUTH PLAIN {sneaky}"));
    assert!(reply.starts_with("-ERR [AUTH]"), "{reply}");
    // The same in a PASS line.
    c.ok(&format!("USER {user}"));
    c.send_raw(format!("PASS {password}\0x\r\n").as_bytes());
    let reply = c.line();
    assert!(reply.starts_with("-ERR [AUTH]"), "{reply}");
    c.quit();
    // And a NUL in the user name.
    let mut c = gateway.connect();
    let reply = c.auth_plain(&format!("{user}\0"), password);
    assert!(reply.starts_with("-ERR"), "{reply}");
    c.quit();
    assert_eq!(
        proxy.connections(),
        0,
        "popgate connected to the backend: {:?}",
        String::from_utf8_lossy(&proxy.sent())
    );

    // The proxy does see a real login, so the check above means something.
    let mut ok = gateway.login(user, password);
    assert_eq!(ok.stat().0, 0);
    ok.quit();
    assert_eq!(proxy.connections(), 1);
    assert!(!proxy.sent().contains(&0), "a raw NUL went to the backend");
}
