//! Whole POP3 sessions against popgate in-process over the `DemoStore`:
//! the protocol (RFC 1939, RFC 2449 CAPA, RFC 5034 AUTH), limits, and the
//! store's own knobs (chunk sizes, wrong claimed sizes). The sessions every
//! store must serve alike (DELE/QUIT/RSET, snapshots, pipelining, hard
//! messages, a store going down) are in the battery (tests/battery/), which
//! runs them against the memory store too.

mod support;

use std::time::{Duration, Instant};

use popgate::backend::demo::DemoStore;
use support::gateway::Gateway;
use support::messages::{self, canonical, simple, top};
use support::pop3::Dialogue as _;
use support::pop3::{Pop3, plain_response};

const USER: &str = "alice";
const PASS: &str = "alice secret \"quoted\" \\";

/// A store where alice (password `PASS`) has these messages.
fn store_with(messages: &[Vec<u8>]) -> DemoStore {
    let store = DemoStore::new();
    store.add_user(USER, PASS);
    for m in messages {
        store.append(USER, m.clone());
    }
    store
}

fn three() -> Vec<Vec<u8>> {
    vec![simple("first"), simple("second"), simple("third")]
}

fn contents(store: &DemoStore) -> Vec<Vec<u8>> {
    store.contents(USER).iter().map(|m| m.to_vec()).collect()
}

fn octets(messages: &[Vec<u8>]) -> u64 {
    messages.iter().map(|m| canonical(m).len() as u64).sum()
}

#[test]
fn every_bad_argument_and_wrong_state_gets_err_and_the_session_goes_on() {
    let msgs = three();
    let store = store_with(&msgs);
    let gateway = Gateway::memory(&store);
    let mut c = gateway.connect();

    // AUTHORIZATION state: nothing but login commands.
    for cmd in ["STAT", "LIST", "LIST 1", "UIDL", "RETR 1", "DELE 1", "TOP 1 1", "RSET", "NOOP"] {
        c.err(cmd);
    }
    c.err("PASS without-user");
    c.err("FOO");
    c.err("RETRIEVE 1");
    c.err("");
    c.err("USER");
    c.user_pass(USER, PASS);

    // TRANSACTION state: login commands are refused.
    c.err("USER bob");
    c.err("PASS x");
    c.err("AUTH PLAIN");
    c.err("APOP alice 0123456789abcdef0123456789abcdef");

    let bad_numbers =
        ["x", "-1", "+1", "1x", "0x1", "0", "4", "99", "4294967295", "4294967296", "99999999999999999999"];
    for n in bad_numbers {
        for cmd in ["RETR", "DELE", "LIST", "UIDL"] {
            c.err(&format!("{cmd} {n}"));
        }
        c.err(&format!("TOP {n} 0"));
    }
    for cmd in
        ["RETR", "DELE", "TOP", "TOP 1", "TOP 1 x", "TOP 1 -1", "RETR 1 2", "DELE 1 1", "LIST 1 2", "STAT 1", "NOOP x"]
    {
        c.err(cmd);
    }

    c.ok("DELE 2");
    for cmd in ["RETR 2", "DELE 2", "LIST 2", "UIDL 2", "TOP 2 0"] {
        c.err(cmd);
    }
    // Still a working session with message 2 hidden.
    assert_eq!(c.stat(), (2, octets(&[msgs[0].clone(), msgs[2].clone()])));
    assert_eq!(c.retr(3), canonical(&msgs[2]));
    c.quit();
    assert_eq!(contents(&store), vec![msgs[0].clone(), msgs[2].clone()]);
}

#[test]
fn capa_lists_what_popgate_supports() {
    let store = store_with(&three());
    let gateway = Gateway::memory(&store);
    let mut c = gateway.connect();
    let caps = c.capa();
    for want in ["TOP", "USER", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"] {
        assert!(caps.iter().any(|c| c == want), "CAPA lacks {want}: {caps:?}");
    }
    assert!(caps.iter().any(|c| c.starts_with("IMPLEMENTATION ")), "{caps:?}");
    let sasl = caps.iter().find(|c| c.starts_with("SASL ")).unwrap_or_else(|| panic!("no SASL in {caps:?}"));
    assert!(sasl.split(' ').any(|m| m == "PLAIN"), "{sasl}");

    c.user_pass(USER, PASS);
    let caps = c.capa();
    for want in ["TOP", "UIDL", "PIPELINING", "RESP-CODES"] {
        assert!(caps.iter().any(|c| c == want), "CAPA after login lacks {want}: {caps:?}");
    }
    c.quit();
}

#[test]
fn auth_plain_with_initial_response() {
    let store = store_with(&three());
    let gateway = Gateway::memory(&store);
    let mut c = gateway.connect();
    let reply = c.auth_plain(USER, PASS);
    assert!(reply.starts_with("+OK"), "{reply}");
    assert_eq!(c.stat().0, 3);
    c.quit();
}

#[test]
fn auth_plain_without_initial_response() {
    let store = store_with(&three());
    let gateway = Gateway::memory(&store);
    let mut c = gateway.connect();
    let go_ahead = c.cmd("AUTH PLAIN");
    assert!(go_ahead.starts_with("+ ") || go_ahead == "+", "{go_ahead:?}");
    let reply = c.cmd(&plain_response(USER.as_bytes(), PASS.as_bytes()));
    assert!(reply.starts_with("+OK"), "{reply}");
    assert_eq!(c.stat().0, 3);
    c.quit();
}

#[test]
fn auth_cancel_wrong_password_and_bad_base64() {
    let store = store_with(&three());
    let gateway = Gateway::memory_with(&store, |l| l.max_failed_logins = 5);
    let mut c = gateway.connect();

    // AUTH alone lists the mechanisms.
    c.ok("AUTH");
    let mechanisms = c.body_text();
    assert!(mechanisms.iter().any(|m| m == "PLAIN"), "{mechanisms:?}");

    let go_ahead = c.cmd("AUTH PLAIN");
    assert!(go_ahead.starts_with('+') && !go_ahead.starts_with("+OK"), "{go_ahead:?}");
    let cancelled = c.cmd("*");
    assert!(cancelled.starts_with("-ERR"), "{cancelled}");

    let wrong = c.auth_plain(USER, "not the password");
    assert!(wrong.starts_with("-ERR [AUTH]"), "{wrong}");
    let bad = c.cmd("AUTH PLAIN !!!not-base64!!!");
    assert!(bad.starts_with("-ERR"), "{bad}");
    c.err("AUTH NO-SUCH-MECHANISM");

    // After all that, a normal login still works on the same connection.
    c.user_pass(USER, PASS);
    assert_eq!(c.stat().0, 3);
    c.quit();
    assert_eq!(store.contents(USER).len(), 3);
}

#[test]
fn over_long_lines_get_err_and_the_session_goes_on() {
    let store = store_with(&three());
    let gateway = Gateway::memory(&store);
    let mut c = gateway.connect();

    // RFC 2449: 255 octets, CRLF included, must be accepted; more may not be.
    let at_limit = format!("USER {}", "a".repeat(255 - 2 - 5));
    assert_eq!(at_limit.len() + 2, 255);
    c.ok(&at_limit);
    c.err(&format!("USER {}", "a".repeat(255 - 2 - 5 + 1)));
    c.err(&format!("USER {}", "b".repeat(100_000)));

    c.user_pass(USER, PASS);
    c.err(&format!("NOOP {}", "x".repeat(1000)));
    // A huge line sent in pieces, then a normal command in the same write.
    let mut huge = vec![b'Z'; 3 * 1024 * 1024];
    huge.extend_from_slice(b"\r\nNOOP\r\n");
    c.send_raw(&huge);
    assert!(c.line().starts_with("-ERR"));
    assert!(c.line().starts_with("+OK"));
    assert_eq!(c.stat().0, 3);
    c.quit();
}

#[test]
fn too_many_failed_logins_close_the_connection() {
    let store = store_with(&three());
    let gateway = Gateway::memory_with(&store, |l| l.max_failed_logins = 3);
    let mut c = gateway.connect();
    for attempt in 1..=3 {
        c.ok(&format!("USER {USER}"));
        let reply = c.cmd("PASS wrong");
        assert!(reply.starts_with("-ERR [AUTH]"), "attempt {attempt}: {reply}");
    }
    c.expect_closed();
    assert_eq!(store.logins(), 0);

    // Another connection starts from zero.
    let mut c = gateway.connect();
    c.ok(&format!("USER {USER}"));
    assert!(c.cmd("PASS wrong").starts_with("-ERR [AUTH]"));
    c.user_pass(USER, PASS);
    c.quit();
}

#[test]
fn connection_limit_answers_sys_temp_then_closes() {
    let store = store_with(&three());
    let gateway = Gateway::memory_with(&store, |l| l.max_connections = 2);
    let mut first = gateway.connect();
    let _second = gateway.connect();

    let mut third = Pop3::connect_raw(gateway.addr);
    let refusal = third.line();
    assert!(refusal.starts_with("-ERR [SYS/TEMP]"), "{refusal}");
    third.expect_closed();

    // A freed slot is usable again.
    first.quit();
    let mut fourth = support::wait_for("a free connection slot", Duration::from_secs(10), || {
        let mut c = Pop3::connect_raw(gateway.addr);
        c.line().starts_with("+OK").then_some(c)
    });
    fourth.user_pass(USER, PASS);
    fourth.quit();
}

#[test]
fn login_timeout_closes_an_idle_unauthenticated_connection() {
    let store = store_with(&three());
    let gateway = Gateway::memory_with(&store, |l| l.login_timeout_secs = 1);
    let started = Instant::now();
    let mut c = gateway.connect();
    // Commands do not extend the time allowed for logging in.
    std::thread::sleep(Duration::from_millis(300));
    c.ok("CAPA");
    c.body_lines();
    c.ok(&format!("USER {USER}"));
    let last = c.try_line_bytes();
    if let Some(line) = &last {
        assert!(line.starts_with(b"-ERR"), "{:?}", String::from_utf8_lossy(line));
        c.expect_closed();
    }
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(900), "closed too early: {waited:?}");
    assert!(waited < Duration::from_secs(5), "closed too late: {waited:?}");
}

#[test]
fn login_timeout_does_not_apply_after_login() {
    let store = store_with(&three());
    let gateway = Gateway::memory_with(&store, |l| l.login_timeout_secs = 1);
    let mut c = gateway.login(USER, PASS);
    std::thread::sleep(Duration::from_millis(1600));
    c.ok("NOOP");
    assert_eq!(c.stat().0, 3);
    c.quit();
}

#[test]
fn quit_before_login_deletes_nothing() {
    let msgs = three();
    let store = store_with(&msgs);
    let gateway = Gateway::memory(&store);
    let mut c = gateway.connect();
    assert!(c.quit().starts_with("+OK"));
    assert_eq!(contents(&store), msgs);
}

#[test]
fn backend_down_at_login_is_sys_temp_and_not_a_failed_login() {
    let msgs = three();
    let store = store_with(&msgs);
    let gateway = Gateway::memory_with(&store, |l| l.max_failed_logins = 2);
    store.set_unavailable(true);
    let mut c = gateway.connect();
    for _ in 0..4 {
        c.ok(&format!("USER {USER}"));
        let reply = c.cmd(&format!("PASS {PASS}"));
        assert!(reply.starts_with("-ERR [SYS/TEMP]"), "{reply}");
    }
    let reply = c.auth_plain(USER, PASS);
    assert!(reply.starts_with("-ERR [SYS/TEMP]"), "{reply}");
    store.set_unavailable(false);
    c.user_pass(USER, PASS);
    assert_eq!(c.stat().0, 3);
    c.quit();
}

/// LIST and STAT announce exactly the octets RETR sends, whatever the stored
/// line ends, with sizes the store gets right or wrong, at any chunking.
#[test]
fn sizes_equal_retr_octets_for_hard_messages() {
    let mut samples = messages::hard();
    samples.push(messages::Sample { name: "empty", raw: Vec::new() });
    samples.push(messages::Sample { name: "a lone dot", raw: b".".to_vec() });
    samples.push(messages::Sample { name: "a lone CR", raw: b"\r".to_vec() });
    let raws: Vec<Vec<u8>> = samples.iter().map(|s| s.raw.clone()).collect();
    assert!(
        raws.iter().any(|r| canonical(r).len() != r.len()),
        "the samples must include messages whose stored size is not their POP3 size"
    );

    for claim_raw_sizes in [false, true] {
        for chunk in [64 * 1024, 1, 2, 3, 7, 4096] {
            let store = store_with(&raws);
            store.claim_raw_sizes(claim_raw_sizes);
            store.set_chunk_size(chunk);
            let gateway = Gateway::memory(&store);
            let mut c = gateway.login(USER, PASS);
            let context = format!("claim_raw_sizes={claim_raw_sizes} chunk={chunk}");
            assert_eq!(c.stat(), (samples.len(), octets(&raws)), "{context}");
            let list = c.list();
            for (i, sample) in samples.iter().enumerate() {
                let n = i as u32 + 1;
                let want = canonical(&sample.raw);
                assert_eq!(list[i], (n, want.len() as u64), "LIST, {}, {context}", sample.name);
                let got = c.retr(n);
                assert_eq!(got.len(), want.len(), "RETR octets, {}, {context}", sample.name);
                assert!(got == want, "RETR content, {}, {context}", sample.name);
                assert_eq!(c.top(n, 0), top(&sample.raw, 0), "TOP {n} 0, {}, {context}", sample.name);
            }
            c.quit();
        }
    }
}

#[test]
fn top_sends_the_header_and_n_body_lines() {
    let msg = b"From: a@example.com\r\nSubject: top\r\n\r\none\r\n.two\r\nthree\r\n\r\nfive\r\n".to_vec();
    let store = store_with(std::slice::from_ref(&msg));
    let gateway = Gateway::memory(&store);
    let mut c = gateway.login(USER, PASS);
    for lines in [0, 1, 2, 3, 4, 5, 6, 1000, u64::MAX] {
        let want = top(&msg, usize::try_from(lines).unwrap_or(usize::MAX));
        assert_eq!(c.top(1, lines), want, "TOP 1 {lines}");
    }
    assert_eq!(c.top(1, 0), b"From: a@example.com\r\nSubject: top\r\n\r\n");
    // TOP never marks or alters anything.
    assert_eq!(c.retr(1), canonical(&msg));
    c.quit();
    assert_eq!(contents(&store), vec![msg]);
}

#[test]
fn users_see_only_their_own_mail() {
    let store = store_with(&three());
    store.add_user("bob", "bob-pw");
    store.append("bob", simple("for bob"));
    let gateway = Gateway::memory(&store);
    let mut bob = gateway.login("bob", "bob-pw");
    assert_eq!(bob.stat(), (1, canonical(&simple("for bob")).len() as u64));
    bob.quit();
    let mut c = gateway.connect();
    c.ok("USER bob");
    assert!(c.cmd(&format!("PASS {PASS}")).starts_with("-ERR [AUTH]"));
    c.ok("USER nobody");
    assert!(c.cmd("PASS x").starts_with("-ERR [AUTH]"));
}

#[test]
fn test_oracle_examples() {
    assert_eq!(canonical(b""), b"");
    assert_eq!(canonical(b"a"), b"a\r\n");
    assert_eq!(canonical(b"a\rb\nc\r\n"), b"a\r\nb\r\nc\r\n");
    assert_eq!(canonical(b"\r\r\n"), b"\r\n\r\n");
    assert_eq!(canonical(b"\n\r"), b"\r\n\r\n");
    let msg = b"A: 1\nB: 2\n\none\ntwo\nthree";
    assert_eq!(top(msg, 0), b"A: 1\r\nB: 2\r\n\r\n");
    assert_eq!(top(msg, 2), b"A: 1\r\nB: 2\r\n\r\none\r\ntwo\r\n");
    assert_eq!(top(msg, 9), canonical(msg));
    assert_eq!(top(b"A: 1\r\nB: 2", 3), b"A: 1\r\nB: 2\r\n");
}
