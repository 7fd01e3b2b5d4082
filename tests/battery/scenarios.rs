//! The scenarios: whole POP3 sessions through popgate in-process, each
//! generic over the store behind it, checked against what RFC 1939 says a
//! client must see and against what the store holds afterwards.
//!
//! Written once for every store: what a client must receive comes from the
//! fixture (what the store holds), never from one store's ids or quirks.
//! Messages are distinct within a scenario (some stores name messages by
//! their content). Every scenario is a `pub fn name<F: Fixture>()`; `main.rs`
//! runs each against every fixture.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use popgate::auth::accounts::policy::{OnDelete, PolicyConfig};
use popgate::config::Config;
use popgate::server::config::Limits;

use crate::fixture::{Capability, Fixture, Folder, Login, MessageId, without_bare_lf};
use crate::gateway::Popgate;
use crate::memory_use;
use crate::support::IO_TIMEOUT;
use crate::support::messages::{self, Sample, canonical, simple};
use crate::support::pop3::{Dialogue as _, Pop3, parse_stat};

/// The big message, and how much popgate's heap may grow while it sends it:
/// half the message, so it cannot have been held whole even once (popgate
/// streams in chunks; the stores measured here grow it by 4 MiB at most).
const BIG_MESSAGE_MIB: usize = 30;
const MAX_GROWTH: u64 = (BIG_MESSAGE_MIB as u64 / 2) << 20;

/// popgate in front of `store`, default settings.
fn serve<F: Fixture>(store: &F) -> Popgate {
    serve_with(store, |_| {})
}

fn serve_with<F: Fixture>(store: &F, limits: impl FnOnce(&mut Limits)) -> Popgate {
    let mut config = Config { backend: store.backend_config(), ..Config::default() };
    limits(&mut config.limits);
    crate::gateway::start(config, store.router())
}

/// A fresh store holding `messages`, and popgate in front of it.
fn setup<F: Fixture>(messages: &[Vec<u8>]) -> (F, Popgate, Vec<MessageId>) {
    let store = F::start();
    let ids = messages.iter().map(|m| store.append(m)).collect();
    let gateway = serve(&store);
    (store, gateway, ids)
}

fn login<F: Fixture>(store: &F, gateway: &Popgate) -> Pop3 {
    let Login { user, password } = store.login();
    gateway.login(user, password)
}

/// `count` small messages whose subjects are "`tag` 1", "`tag` 2", …
fn distinct(tag: &str, count: usize) -> Vec<Vec<u8>> {
    (1..=count).map(|i| simple(&format!("{tag} {i}"))).collect()
}

fn expected<F: Fixture>(store: &F, ids: &[MessageId]) -> Vec<Vec<u8>> {
    ids.iter().map(|id| store.expected_retr(id)).collect()
}

fn octets<'a>(messages: impl IntoIterator<Item = &'a Vec<u8>>) -> u64 {
    messages.into_iter().map(|m| m.len() as u64).sum()
}

/// LIST of these messages under these numbers.
fn listing<'a>(numbered: impl IntoIterator<Item = (u32, &'a Vec<u8>)>) -> Vec<(u32, u64)> {
    numbered.into_iter().map(|(n, m)| (n, m.len() as u64)).collect()
}

fn pick<T: Clone>(items: &[T], indexes: &[usize]) -> Vec<T> {
    indexes.iter().map(|&i| items[i].clone()).collect()
}

fn unique_ids(uidl: &[(u32, String)]) -> Vec<String> {
    uidl.iter().map(|(_, u)| u.clone()).collect()
}

/// The store holds exactly `ids`, in this order, none of them flagged
/// deleted or seen.
fn assert_holds<F: Fixture>(store: &F, ids: &[MessageId], when: &str) {
    let remaining = store.remaining();
    let held: Vec<&MessageId> = remaining.iter().map(|r| &r.id).collect();
    assert_eq!(held, ids.iter().collect::<Vec<_>>(), "what the store holds {when}");
    assert!(remaining.iter().all(|r| !r.flagged_deleted && !r.seen), "popgate left flags behind {when}: {remaining:?}");
}

fn assert_reply(reply: &str, prefix: &str, what: &str) {
    assert!(reply.starts_with(prefix), "{what}: expected {prefix:?}, got {reply:?}");
}

/// Which message number carries which subject (by TOP n 0).
fn numbers_by_subject(c: &mut Pop3) -> HashMap<String, u32> {
    let (count, _) = c.stat();
    (1..=count as u32)
        .map(|n| {
            let header = String::from_utf8(c.top(n, 0)).expect("ASCII header");
            let subject = header.lines().find_map(|l| l.strip_prefix("Subject: ")).expect("a Subject").to_string();
            (subject, n)
        })
        .collect()
}

/// RETR n, compared with `want` line by line as it arrives and kept nowhere.
fn retr_streamed(c: &mut Pop3, n: u32, want: &[u8]) {
    c.ok(&format!("RETR {n}"));
    let mut at = 0;
    let mut first_difference = None;
    c.body_each_line(|line| {
        let end = at + line.len();
        if first_difference.is_none() && (want.get(at..end) != Some(line) || want.get(end..end + 2) != Some(b"\r\n")) {
            first_difference = Some(at);
        }
        at = end + 2;
    });
    assert_eq!(first_difference, None, "RETR {n} differs from the message from this octet on");
    assert_eq!(at, want.len(), "RETR {n}: octets received");
}

/// The hard messages of `messages::hard`, plus bare CRs in a body only (a
/// store that refuses a bare CR in a header may take them there).
fn hard_samples() -> Vec<Sample> {
    let mut samples = messages::hard();
    samples.push(Sample {
        name: "bare CR in the body",
        raw: b"From: a@example.com\r\nSubject: bare CR in the body\r\n\r\none\rtwo\r\r\nthree\r".to_vec(),
    });
    samples
}

// ---------------------------------------------------------------------------

/// USER/PASS and AUTH PLAIN with the right password log in; a wrong password
/// or an unknown user is `-ERR [AUTH]`, and the connection goes on.
pub fn login_needs_the_right_password<F: Fixture>() {
    let (store, gateway, ids) = setup::<F>(&distinct("login", 1));
    let Login { user, password } = store.login();

    let mut c = gateway.connect();
    c.ok(&format!("USER {user}"));
    let reply = c.cmd("PASS not-the-password");
    assert_reply(&reply, "-ERR [AUTH]", "a wrong password");
    assert!(!reply.contains("not-the-password"), "the reply must not echo a password: {reply}");
    c.ok("USER nobody-here");
    assert_reply(&c.cmd(&format!("PASS {password}")), "-ERR [AUTH]", "an unknown user");
    c.user_pass(user, password);
    assert_eq!(c.stat().0, 1);
    assert_reply(&c.quit(), "+OK", "QUIT");

    let mut c = gateway.connect();
    assert_reply(&c.auth_plain(user, "not-the-password"), "-ERR [AUTH]", "AUTH PLAIN, wrong password");
    assert_reply(&c.auth_plain(user, password), "+OK", "AUTH PLAIN");
    assert_eq!(c.stat().0, 1);
    assert_reply(&c.quit(), "+OK", "QUIT");

    assert_holds(&store, &ids, "after logging in and out");
}

/// STAT, LIST, UIDL, TOP and RETR describe the maildrop exactly, and reading
/// changes nothing in the store (nothing removed, flagged or marked seen).
pub fn stat_list_uidl_top_and_retr_show_the_maildrop<F: Fixture>() {
    let (store, gateway, ids) = setup::<F>(&distinct("read", 3));
    let want = expected(&store, &ids);

    let mut c = login(&store, &gateway);
    assert_eq!(c.stat(), (3, octets(&want)));
    let list = c.list();
    assert_eq!(list, listing((1..).zip(&want)));
    assert_eq!(c.list_one(2), want[1].len() as u64);
    let uidl = c.uidl();
    assert_eq!(uidl.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(unique_ids(&uidl).iter().collect::<HashSet<_>>().len(), 3, "unique ids must differ: {uidl:?}");
    assert_eq!(c.uidl_one(3), uidl[2].1);
    for (n, m) in (1..).zip(&want) {
        assert_eq!(&c.retr(n), m, "RETR {n}");
    }
    assert_eq!(c.top(2, 0), store.expected_top(&ids[1], 0), "TOP 2 0");
    assert_eq!(c.top(2, 1), store.expected_top(&ids[1], 1), "TOP 2 1");
    assert_eq!(c.top(2, 1000), want[1], "TOP 2 1000");
    c.ok("NOOP");
    assert_reply(&c.quit(), "+OK", "QUIT");

    assert_holds(&store, &ids, "after reading every message");
}

/// LIST and STAT announce exactly the octets RETR sends for the messages
/// that are hard to get right (bare LF, bare CR, lines starting with ".",
/// no final line end, 8-bit text, lines of tens of kilobytes) — those the
/// store can hold — in the first session and in the next, which may use
/// sizes remembered from the first.
pub fn hard_messages_have_exact_sizes<F: Fixture>() {
    let store = F::start();
    let samples: Vec<Sample> = hard_samples()
        .into_iter()
        .filter_map(|s| {
            let raw = if store.supports(Capability::BareLf) { s.raw } else { without_bare_lf(&s.raw) };
            store.storable(&raw).then_some(Sample { name: s.name, raw })
        })
        .collect();
    for name in [
        "leading dots",
        "no final line end",
        "ends with a dot line, no line end",
        "8-bit",
        "long lines",
        "mixed line ends",
        "header only",
        "bare CR in the body",
    ] {
        assert!(samples.iter().any(|s| s.name == name), "the sample {name:?} must be among those stored");
    }
    let ids: Vec<MessageId> = samples.iter().map(|s| store.append(&s.raw)).collect();
    let stored: Vec<Vec<u8>> = ids.iter().map(|id| store.stored(id)).collect();
    assert!(
        stored.iter().any(|s| canonical(s).len() != s.len()),
        "some stored messages must differ from their POP3 form, or this proves little"
    );
    let want: Vec<Vec<u8>> = stored.iter().map(|s| canonical(s)).collect();
    let gateway = serve(&store);

    for session in 1..=2 {
        let mut c = login(&store, &gateway);
        assert_eq!(c.stat(), (samples.len(), octets(&want)), "STAT, session {session}");
        let list = c.list();
        for (i, sample) in samples.iter().enumerate() {
            let n = i as u32 + 1;
            let context = format!("{}, session {session}", sample.name);
            assert_eq!(list[i], (n, want[i].len() as u64), "LIST, {context}");
            assert_eq!(c.list_one(n), want[i].len() as u64, "LIST {n}, {context}");
            let got = c.retr(n);
            assert_eq!(got.len(), want[i].len(), "RETR {n} octets, {context}");
            assert!(got == want[i], "RETR {n} content, {context}");
            assert_eq!(c.top(n, 0), messages::top(&stored[i], 0), "TOP {n} 0, {context}");
            assert_eq!(c.top(n, 1), messages::top(&stored[i], 1), "TOP {n} 1, {context}");
        }
        assert_reply(&c.quit(), "+OK", "QUIT");
    }
    assert_holds(&store, &ids, "after reading every message");
}

/// UIDL: 1 to 70 printable characters (the client checks), distinct, the
/// same in every session, kept by the others when one message is deleted,
/// and new for new mail.
pub fn uidl_is_unique_printable_and_stable_across_sessions<F: Fixture>() {
    let (store, gateway, _ids) = setup::<F>(&distinct("uidl", 4));

    let mut c = login(&store, &gateway);
    let first = c.uidl();
    assert_eq!(first.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert_eq!(unique_ids(&first).iter().collect::<HashSet<_>>().len(), 4, "unique ids must differ: {first:?}");
    for (n, uid) in &first {
        assert_eq!(&c.uidl_one(*n), uid, "UIDL {n}");
    }
    assert_reply(&c.quit(), "+OK", "QUIT");

    let mut c = login(&store, &gateway);
    assert_eq!(c.uidl(), first, "UIDL changed between sessions");
    c.ok("DELE 2");
    assert_reply(&c.quit(), "+OK", "QUIT");

    store.append(&simple("uidl 5"));
    let mut c = login(&store, &gateway);
    let after = c.uidl();
    assert_reply(&c.quit(), "+OK", "QUIT");
    assert_eq!(after.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert_eq!(unique_ids(&after[..3]), pick(&unique_ids(&first), &[0, 2, 3]), "the others keep their ids");
    assert!(!unique_ids(&first).contains(&after[3].1), "new mail got an id already used: {after:?} {first:?}");
}

/// DELE marks; QUIT removes exactly the marked messages, and the others keep
/// their contents and unique ids under new numbers.
pub fn dele_then_quit_removes_exactly_those<F: Fixture>() {
    let (store, gateway, ids) = setup::<F>(&distinct("dele", 5));
    let want = expected(&store, &ids);

    let mut c = login(&store, &gateway);
    let uidl = c.uidl();
    c.ok("DELE 2");
    c.ok("DELE 4");
    assert_eq!(c.stat(), (3, octets(pick(&want, &[0, 2, 4]).iter())));
    assert_eq!(c.list(), listing([(1, &want[0]), (3, &want[2]), (5, &want[4])]));
    for cmd in ["DELE 2", "RETR 4", "LIST 2", "UIDL 4", "TOP 2 0"] {
        c.err(cmd);
    }
    assert_reply(&c.quit(), "+OK", "QUIT");
    assert_holds(&store, &pick(&ids, &[0, 2, 4]), "after DELE 2, DELE 4, QUIT");

    let mut c = login(&store, &gateway);
    assert_eq!(c.stat(), (3, octets(pick(&want, &[0, 2, 4]).iter())));
    assert_eq!(unique_ids(&c.uidl()), pick(&unique_ids(&uidl), &[0, 2, 4]));
    assert_eq!(c.retr(2), want[2]);
    assert_reply(&c.quit(), "+OK", "QUIT");
}

/// A connection that ends without QUIT removes nothing it marked.
pub fn dele_then_dropped_connection_removes_nothing<F: Fixture>() {
    let (store, gateway, ids) = setup::<F>(&distinct("dropped", 3));
    let mut c = login(&store, &gateway);
    c.ok("DELE 1");
    c.ok("DELE 3");
    c.drop_connection();
    // Returns once every session has ended.
    gateway.shutdown(IO_TIMEOUT);
    assert_holds(&store, &ids, "after DELE and a dropped connection");
}

/// RSET unmarks everything; what is marked after it is removed as usual.
pub fn rset_undoes_dele<F: Fixture>() {
    let (store, gateway, ids) = setup::<F>(&distinct("rset", 3));
    let want = expected(&store, &ids);

    let mut c = login(&store, &gateway);
    let list = c.list();
    let uidl = c.uidl();
    c.ok("DELE 1");
    c.ok("DELE 2");
    assert_eq!(c.stat(), (1, want[2].len() as u64));
    assert_eq!(c.list(), [list[2]]);
    assert_eq!(c.uidl(), [uidl[2].clone()]);
    c.err("RETR 1");
    c.ok("RSET");
    assert_eq!(c.stat(), (3, octets(&want)));
    assert_eq!(c.list(), list);
    assert_eq!(c.uidl(), uidl);
    assert_eq!(c.retr(1), want[0]);
    c.ok("DELE 2");
    assert_reply(&c.quit(), "+OK", "QUIT");
    assert_holds(&store, &pick(&ids, &[0, 2]), "after DELE 1, DELE 2, RSET, DELE 2, QUIT");
}

/// The maildrop is what the store held at login: mail that arrives during
/// the session is not shown, and a message another session removes keeps
/// the numbers of the others where they were.
pub fn new_mail_during_a_session_is_not_shown<F: Fixture>() {
    let (store, gateway, ids) = setup::<F>(&distinct("snapshot", 3));
    let want = expected(&store, &ids);

    let mut c = login(&store, &gateway);
    let list = c.list();
    let uidl = c.uidl();
    let late = store.append(&simple("snapshot late"));
    assert_eq!(c.stat(), (3, octets(&want)));
    assert_eq!(c.list(), list);
    assert_eq!(c.uidl(), uidl);
    for cmd in ["RETR 4", "LIST 4", "UIDL 4", "TOP 4 0", "DELE 4"] {
        c.err(cmd);
    }
    assert_eq!(c.retr(3), want[2]);

    let mut other = login(&store, &gateway);
    assert_eq!(other.stat().0, 4, "a new session sees the new mail");
    other.ok("DELE 1");
    assert_reply(&other.quit(), "+OK", "the other session's QUIT");

    assert_eq!(c.retr(2), want[1], "message 2 keeps its number");
    // Message 1 left the maildrop; a store may still serve its octets.
    let reply = c.cmd("RETR 1");
    if reply.starts_with("+OK") {
        assert_eq!(c.body(), want[0], "RETR 1 after another session removed it");
    } else {
        assert!(reply.starts_with("-ERR") && !reply.contains("[SYS/"), "RETR 1 after it was removed: {reply}");
    }
    c.ok("DELE 3");
    assert_reply(&c.quit(), "+OK", "QUIT");
    assert_holds(&store, &[ids[1].clone(), late.clone()], "after both sessions");

    let mut c = login(&store, &gateway);
    assert_eq!(c.stat(), (2, octets([&want[1], &store.expected_retr(&late)])));
    assert_reply(&c.quit(), "+OK", "QUIT");
}

/// Every command of a session in one write (RFC 2449 PIPELINING): the
/// replies come in order, and the session does what the commands say.
pub fn pipelined_commands_get_replies_in_order<F: Fixture>() {
    let (store, gateway, ids) = setup::<F>(&distinct("pipelined", 3));
    let want = expected(&store, &ids);
    let top = store.expected_top(&ids[1], 0);
    let Login { user, password } = store.login();

    let mut c = gateway.connect();
    c.send_raw(
        format!(
            "CAPA\r\nUSER {user}\r\nPASS {password}\r\nSTAT\r\nLIST\r\nUIDL\r\nRETR 1\r\nTOP 2 0\r\nLIST 9\r\n\
             RETR 9\r\nDELE 1\r\nSTAT\r\nRSET\r\nDELE 3\r\nNOOP\r\nQUIT\r\n"
        )
        .as_bytes(),
    );
    assert_reply(&c.line(), "+OK", "CAPA");
    assert!(c.body_text().iter().any(|l| l == "PIPELINING"), "CAPA without PIPELINING");
    assert_reply(&c.line(), "+OK", "USER");
    assert_reply(&c.line(), "+OK", "PASS");
    assert_eq!(parse_stat(&c.line()), (3, octets(&want)), "STAT");
    assert_reply(&c.line(), "+OK", "LIST");
    assert_eq!(c.body_lines().len(), 3, "LIST lines");
    assert_reply(&c.line(), "+OK", "UIDL");
    assert_eq!(c.body_lines().len(), 3, "UIDL lines");
    assert_reply(&c.line(), "+OK", "RETR 1");
    assert_eq!(c.body(), want[0], "RETR 1");
    assert_reply(&c.line(), "+OK", "TOP 2 0");
    assert_eq!(c.body(), top, "TOP 2 0");
    assert_reply(&c.line(), "-ERR", "LIST 9");
    assert_reply(&c.line(), "-ERR", "RETR 9");
    assert_reply(&c.line(), "+OK", "DELE 1");
    assert_eq!(parse_stat(&c.line()), (2, octets(&want[1..])), "STAT after DELE 1");
    assert_reply(&c.line(), "+OK", "RSET");
    assert_reply(&c.line(), "+OK", "DELE 3");
    assert_reply(&c.line(), "+OK", "NOOP");
    assert_reply(&c.line(), "+OK", "QUIT");
    c.expect_closed();
    assert_holds(&store, &ids[..2], "after the pipelined session");
}

/// A 30 MB message (with bare LFs where the store takes them, lines starting
/// with ".", 8-bit text and long lines) arrives exactly, with the size LIST
/// announced, while popgate's heap grows by less than half of it (it is
/// streamed, never held whole); a TOP that stops reading early leaves the
/// session usable.
pub fn a_30_mb_message_is_streamed_in_bounded_memory<F: Fixture>() {
    let store = F::start();
    let big = messages::big(BIG_MESSAGE_MIB);
    let big = if store.supports(Capability::BareLf) { big } else { without_bare_lf(&big) };
    let ids = [store.append(&simple("big before")), store.append(&big), store.append(&simple("big after"))];
    drop(big);
    let want = store.expected_retr(&ids[1]);
    assert!(want.len() >= BIG_MESSAGE_MIB << 20, "the message is {} octets", want.len());
    let want_top = store.expected_top(&ids[1], 3);
    let want_after = store.expected_retr(&ids[2]);
    let gateway = serve(&store);

    let mut c = login(&store, &gateway);
    assert_eq!(c.list_one(2), want.len() as u64, "LIST 2");
    assert_eq!(c.top(2, 3), want_top, "TOP 2 3");
    assert_eq!(c.retr(3), want_after, "RETR 3 after a TOP of the big message");
    let started = Instant::now();
    let (growth, ()) = memory_use::alone(|| retr_streamed(&mut c, 2, &want));
    eprintln!(
        "{}: RETR of {} octets in {:?}; popgate's heap grew by {} KiB at most (the process's resident set by {} KiB)",
        std::any::type_name::<F>(),
        want.len(),
        started.elapsed(),
        growth.heap >> 10,
        growth.resident >> 10,
    );
    assert!(
        growth.heap < MAX_GROWTH,
        "RETR of a {} MiB message grew popgate's heap by {} MiB (limit {} MiB)",
        want.len() >> 20,
        growth.heap >> 20,
        MAX_GROWTH >> 20
    );
    c.ok("DELE 2");
    assert_reply(&c.quit(), "+OK", "QUIT");
    assert_holds(&store, &[ids[0].clone(), ids[2].clone()], "after DELE 2, QUIT");
}

/// The store going down mid-session: what needs it is `-ERR [SYS/TEMP]`,
/// what the maildrop listed at login still answers, QUIT commits nothing,
/// and logins meanwhile fail temporarily without counting as failed logins.
pub fn backend_down_is_sys_temp_and_deletes_nothing<F: Fixture>() {
    let mut store = F::start();
    let ids: Vec<MessageId> = distinct("down", 3).iter().map(|m| store.append(m)).collect();
    let want = expected(&store, &ids);
    let gateway = serve_with(&store, |limits| limits.max_failed_logins = 2);
    let Login { user, password } = store.login();

    let mut c = login(&store, &gateway);
    assert_eq!(c.retr(1), want[0]);
    c.ok("DELE 1");
    c.ok("DELE 2");
    store.stop();
    assert_reply(&c.cmd("RETR 3"), "-ERR [SYS/TEMP]", "RETR with the store down");
    assert_reply(&c.cmd("TOP 3 0"), "-ERR [SYS/TEMP]", "TOP with the store down");
    assert_eq!(c.stat(), (1, want[2].len() as u64), "STAT from the maildrop listed at login");
    assert_reply(&c.cmd("QUIT"), "-ERR [SYS/TEMP]", "QUIT with the store down");
    c.expect_closed();

    let mut c = gateway.connect();
    for attempt in 1..=3 {
        c.ok(&format!("USER {user}"));
        assert_reply(&c.cmd(&format!("PASS {password}")), "-ERR [SYS/TEMP]", &format!("login {attempt}, store down"));
    }
    assert_reply(&c.auth_plain(user, password), "-ERR [SYS/TEMP]", "AUTH PLAIN with the store down");
    assert_reply(&c.quit(), "+OK", "QUIT before login");

    store.start_again();
    assert_holds(&store, &ids, "after the store came back");
}

/// Another client's "deleted but not removed" mark (IMAP `\Deleted` without
/// EXPUNGE) is neither acted on nor cleared by popgate's QUIT, which removes
/// only what its own session marked. On a store without such a mark, the
/// same session runs without it.
pub fn a_message_another_client_flagged_deleted_is_left_alone<F: Fixture>() {
    let (store, gateway, ids) = setup::<F>(&distinct("flagged", 4));
    let flagged = store.flag_deleted_by_other_client(&ids[1]).is_ok();
    assert_eq!(flagged, store.supports(Capability::DeletedFlag));

    let mut c = login(&store, &gateway);
    let numbers = numbers_by_subject(&mut c);
    c.ok(&format!("DELE {}", numbers["flagged 1"]));
    c.ok(&format!("DELE {}", numbers["flagged 3"]));
    assert_reply(&c.quit(), "+OK", "QUIT");

    let remaining = store.remaining();
    let held: Vec<MessageId> = remaining.iter().map(|r| r.id.clone()).collect();
    assert_eq!(held, pick(&ids, &[1, 3]), "what the store holds after DELE of messages 1 and 3");
    assert_eq!(remaining[0].flagged_deleted, flagged, "the other client's mark stays as it was: {remaining:?}");
    assert!(!remaining[1].flagged_deleted, "{remaining:?}");
}

/// Real third-party clients, as devices' stacks are: curl lists and
/// retrieves every message exactly, then Python's poplib retrieves and
/// deletes them all (STAT, UIDL, RETR octets, QUIT) — and the store is left
/// empty.
pub fn real_clients_list_retrieve_and_delete<F: Fixture>() {
    let (store, gateway, ids) = setup::<F>(&distinct("client", 3));
    let want = expected(&store, &ids);
    let Login { user, password } = store.login();
    let credentials = format!("{user}:{password}");
    let auth = ["--user", credentials.as_str()];
    crate::support::program::curl_lists(gateway.addr, &auth, &want.iter().collect::<Vec<_>>());
    crate::support::program::curl_retrieves_each(gateway.addr, &auth, &want);
    let uidls: Vec<String> = {
        let mut c = login(&store, &gateway);
        let uidls = c.uidl().into_iter().map(|(_, uid)| uid).collect();
        assert_reply(&c.quit(), "+OK", "QUIT");
        uidls
    };
    crate::support::program::poplib_retrieves_and_deletes(gateway.addr, (user, password), &want, &uidls);
    assert_holds(&store, &[], "after poplib retrieved and deleted everything");
}

// --- Device policies (docs/POLICIES.md) ------------------------------------

/// popgate in front of `store` with every login served under `policy`;
/// `None` when check-config refuses it for this store's backend, which must
/// then say why (the policy × backend table, pinned in policy.rs's tests).
fn serve_with_policy<F: Fixture>(store: &F, policy: PolicyConfig) -> Option<Popgate> {
    let backend = store.backend_config();
    if let Err(why) = policy.check(&backend) {
        assert!(why.contains("is not supported by the") && why.contains("not built"), "{why}");
        return None;
    }
    let config = Config { backend, ..Config::default() };
    let router = std::sync::Arc::new(crate::gateway::WithPolicy { inner: store.router(), policy: policy.resolve() });
    Some(crate::gateway::start(config, router))
}

fn on_delete(on_delete: OnDelete) -> PolicyConfig {
    PolicyConfig { on_delete: Some(on_delete), ..Default::default() }
}

/// DELE 1 and DELE 3 of three messages, then QUIT.
fn dele_first_and_last<F: Fixture>(store: &F, gateway: &Popgate) {
    let mut c = login(store, gateway);
    assert_eq!(c.stat().0, 3);
    c.ok("DELE 1");
    c.ok("DELE 3");
    assert_reply(&c.quit(), "+OK", "QUIT");
}

/// `on_delete = "keep"`: DELE + QUIT answer +OK and nothing changes.
pub fn on_delete_keep_removes_nothing<F: Fixture>() {
    let store = F::start();
    let ids: Vec<MessageId> = distinct("keep", 3).iter().map(|m| store.append(m)).collect();
    let gateway = serve_with_policy(&store, on_delete(OnDelete::Keep)).expect("keep is supported everywhere");
    dele_first_and_last(&store, &gateway);
    assert_holds(&store, &ids, "after DELE with on_delete = keep");
    assert_eq!(login(&store, &gateway).stat().0, 3, "keep hides nothing");
}

/// `on_delete = "expunge"`: exactly the marked messages are gone, from the
/// trash too.
pub fn on_delete_expunge_removes_exactly_those<F: Fixture>() {
    let store = F::start();
    let ids: Vec<MessageId> = distinct("expunge", 3).iter().map(|m| store.append(m)).collect();
    let gateway = serve_with_policy(&store, on_delete(OnDelete::Expunge)).expect("expunge is supported everywhere");
    dele_first_and_last(&store, &gateway);
    assert_holds(&store, &pick(&ids, &[1]), "after DELE 1, DELE 3 with on_delete = expunge");
    if let Ok(n) = store.held_in(Folder::Trash) {
        assert_eq!(n, 0, "expunged messages went to the trash");
    }
}

/// `on_delete = "trash"`: exactly the marked messages leave the mailbox for
/// the store's trash.
pub fn on_delete_trash_moves_exactly_those_to_the_trash<F: Fixture>() {
    let store = F::start();
    let ids: Vec<MessageId> = distinct("trash", 3).iter().map(|m| store.append(m)).collect();
    let gateway = serve_with_policy(&store, on_delete(OnDelete::Trash)).expect("trash is supported everywhere");
    dele_first_and_last(&store, &gateway);
    assert_holds(&store, &pick(&ids, &[1]), "after DELE 1, DELE 3 with on_delete = trash");
    if let Ok(n) = store.held_in(Folder::Trash) {
        assert_eq!(n, 2, "messages in the trash");
    }
}

/// `on_delete = "archive"`: exactly the marked messages leave the mailbox
/// for the store's archive; nothing goes to the trash.
pub fn on_delete_archive_moves_exactly_those_to_the_archive<F: Fixture>() {
    let store = F::start();
    let ids: Vec<MessageId> = distinct("archive", 3).iter().map(|m| store.append(m)).collect();
    let Some(gateway) = serve_with_policy(&store, on_delete(OnDelete::Archive)) else { return };
    dele_first_and_last(&store, &gateway);
    assert_holds(&store, &pick(&ids, &[1]), "after DELE 1, DELE 3 with on_delete = archive");
    if let Ok(n) = store.held_in(Folder::Archive) {
        assert_eq!(n, 2, "messages in the archive");
    }
    if let Ok(n) = store.held_in(Folder::Trash) {
        assert_eq!(n, 0, "archived messages went to the trash");
    }
}

/// `on_delete = "flag"`: the marked messages stay, carry the keyword, and
/// this device never sees them again; the others are untouched.
pub fn on_delete_flag_keeps_marks_and_hides_them<F: Fixture>() {
    let store = F::start();
    let ids: Vec<MessageId> = distinct("flag", 3).iter().map(|m| store.append(m)).collect();
    let policy = PolicyConfig { flag_keyword: Some("$Printed".into()), ..on_delete(OnDelete::Flag) };
    let Some(gateway) = serve_with_policy(&store, policy) else { return };
    let want = expected(&store, &ids);
    dele_first_and_last(&store, &gateway);
    let remaining = store.remaining();
    assert_eq!(
        remaining.iter().map(|r| &r.id).collect::<Vec<_>>(),
        ids.iter().collect::<Vec<_>>(),
        "flag removes nothing"
    );
    assert!(remaining.iter().all(|r| !r.flagged_deleted), "flag must not set \\Deleted: {remaining:?}");
    let carried: Vec<bool> =
        ids.iter().map(|id| store.carries(id, "$Printed").expect("flag is supported here")).collect();
    assert_eq!(carried, [true, false, true], "the keyword is on exactly the marked messages");
    let mut c = login(&store, &gateway);
    assert_eq!(c.stat(), (1, want[1].len() as u64), "flagged messages are hidden from the device");
    assert_eq!(c.retr(1), want[1]);
    assert_reply(&c.quit(), "+OK", "QUIT");
}

// --- Several devices on one mailbox: sharing = "each_device_once" -----------

/// Two device users of the fixture's one account, each routed with its own
/// seat among the two (records in a file of the test's own), as a mapped
/// account with `sharing = "each_device_once"` gives them.
struct TwoDevices {
    inner: std::sync::Arc<dyn popgate::auth::accounts::Router>,
    login: crate::fixture::Login,
    seats: HashMap<String, popgate::auth::accounts::policy::DevicePolicy>,
    _records: TempRecords,
}

/// A directory removed when the scenario ends.
struct TempRecords(std::path::PathBuf);

impl Drop for TempRecords {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const DEVICE_PASSWORD: &str = "device-pw";

impl TwoDevices {
    fn new<F: Fixture>(store: &F, policy: PolicyConfig) -> TwoDevices {
        use popgate::auth::accounts::seen::{Seat, SeenStore};
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("popgate-battery-seen-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let records = SeenStore::file(dir.join("device-records.json"));
        let devices = ["printer-a".to_string(), "printer-b".to_string()];
        let seats = devices
            .iter()
            .map(|d| (d.clone(), policy.resolve().seated(Seat::new(records.clone(), d.clone(), &devices))))
            .collect();
        TwoDevices { inner: store.router(), login: store.login(), seats, _records: TempRecords(dir) }
    }
}

#[async_trait::async_trait]
impl popgate::auth::accounts::Router for TwoDevices {
    async fn route(
        &self,
        client: &popgate::mail::Credentials,
    ) -> Result<popgate::auth::accounts::Route, popgate::mail::BackendError> {
        let (Some(policy), popgate::mail::Proof::Password(password)) = (self.seats.get(&client.user), &client.proof)
        else {
            return Err(popgate::mail::BackendError::AuthFailed);
        };
        if password.expose() != DEVICE_PASSWORD {
            return Err(popgate::mail::BackendError::AuthFailed);
        }
        let held = popgate::mail::Credentials::password(self.login.user, self.login.password);
        let mut route = self.inner.route(&held).await?;
        route.policy = policy.clone();
        Ok(route)
    }

    async fn refresh(
        &self,
        route: &popgate::auth::accounts::Route,
    ) -> Result<Option<popgate::mail::Credentials>, popgate::mail::BackendError> {
        self.inner.refresh(route).await
    }

    fn accepts_bearer_tokens(&self) -> bool {
        false
    }

    fn primary_backend(&self) -> popgate::backend::SharedBackend {
        self.inner.primary_backend()
    }
}

fn serve_two_devices<F: Fixture>(store: &F, policy: PolicyConfig) -> Popgate {
    let config = Config { backend: store.backend_config(), ..Config::default() };
    crate::gateway::start(config, std::sync::Arc::new(TwoDevices::new(store, policy)))
}

/// Each message's content by message number, all retrieved.
fn retrieve_all(c: &mut Pop3) -> Vec<Vec<u8>> {
    let (count, _) = c.stat();
    (1..=count as u32).map(|n| c.retr(n)).collect()
}

fn sorted(mut messages: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    messages.sort();
    messages
}

/// `sharing = "each_device_once"`: two devices of one account each get
/// every message exactly once across reconnects — retrieved or DELE'd, a
/// message is never shown to that device again; a dropped session records
/// nothing (the device gets it again); a DELE'd message stays in the store
/// until the other device has had it too, and leaves it when the last
/// device DELEs it.
pub fn each_device_once_two_devices_get_each_message_once<F: Fixture>() {
    let store = F::start();
    let mut ids: Vec<MessageId> = distinct("once", 3).iter().map(|m| store.append(m)).collect();
    let gateway = serve_two_devices(&store, PolicyConfig::default());
    let want = expected(&store, &ids);

    // Device A: RETR 1 and 3, DELE 2 without retrieving it, QUIT.
    let mut a = gateway.login("printer-a", DEVICE_PASSWORD);
    assert_eq!(a.stat(), (3, octets(&want)));
    let by_subject = numbers_by_subject(&mut a);
    let first = by_subject["once 1"];
    let third = by_subject["once 3"];
    assert_eq!(a.retr(first), want[0]);
    assert_eq!(a.retr(third), want[2]);
    a.ok(&format!("DELE {}", by_subject["once 2"]));
    assert_reply(&a.quit(), "+OK", "QUIT of device A");
    assert_holds(&store, &ids, "after device A's DELE: device B has not had it");

    // A again: nothing left for it, DELE'd or retrieved.
    let mut a = gateway.login("printer-a", DEVICE_PASSWORD);
    assert_eq!(a.stat(), (0, 0), "device A is shown what it already had");
    assert_reply(&a.quit(), "+OK", "QUIT");

    // New mail: A gets only that.
    ids.push(store.append(&simple("once 4")));
    let want = expected(&store, &ids);
    let mut a = gateway.login("printer-a", DEVICE_PASSWORD);
    assert_eq!(retrieve_all(&mut a), vec![want[3].clone()], "device A gets the new message alone");
    assert_reply(&a.quit(), "+OK", "QUIT");

    // Device B: drops its first session after a RETR: nothing recorded.
    let mut b = gateway.login("printer-b", DEVICE_PASSWORD);
    assert_eq!(b.stat().0, 4);
    b.retr(1);
    b.drop_connection();
    let mut b = gateway.login("printer-b", DEVICE_PASSWORD);
    assert_eq!(sorted(retrieve_all(&mut b)), sorted(want.clone()), "device B gets every message, once each");
    for n in 1..=4 {
        b.ok(&format!("DELE {n}"));
    }
    assert_reply(&b.quit(), "+OK", "QUIT of device B");
    assert_holds(&store, &[], "after the last device DELE'd what every device had");

    for device in ["printer-a", "printer-b"] {
        let mut c = gateway.login(device, DEVICE_PASSWORD);
        assert_eq!(c.stat(), (0, 0), "{device} after both had everything");
        assert_reply(&c.quit(), "+OK", "QUIT");
    }
}

/// `each_device_once` with `on_delete = "keep"`: both devices get each
/// message once and nothing ever leaves the store.
pub fn each_device_once_with_keep_removes_nothing<F: Fixture>() {
    let store = F::start();
    let ids: Vec<MessageId> = distinct("once-keep", 2).iter().map(|m| store.append(m)).collect();
    let gateway = serve_two_devices(&store, on_delete(OnDelete::Keep));
    let want = expected(&store, &ids);
    for device in ["printer-a", "printer-b"] {
        let mut c = gateway.login(device, DEVICE_PASSWORD);
        assert_eq!(sorted(retrieve_all(&mut c)), sorted(want.clone()), "{device}");
        c.ok("DELE 1");
        c.ok("DELE 2");
        assert_reply(&c.quit(), "+OK", "QUIT");
        let mut c = gateway.login(device, DEVICE_PASSWORD);
        assert_eq!(c.stat(), (0, 0), "{device} again");
        assert_reply(&c.quit(), "+OK", "QUIT");
    }
    assert_holds(&store, &ids, "with on_delete = keep");
}

// --- Device filters: only_unseen, attachment_types (docs/POLICIES.md) -------

/// A message with one attachment part of `media_type` (or none: `None`),
/// distinct by `subject`.
fn with_attachment(subject: &str, media_type: Option<&str>) -> Vec<u8> {
    let head = format!(
        "From: Scanner <scanner@office.example>\r\nTo: printer@example.com\r\nSubject: {subject}\r\n\
         Message-ID: <{}@office.example>\r\nMIME-Version: 1.0\r\n",
        subject.replace(' ', "-")
    );
    let body = match media_type {
        None => format!("Content-Type: text/plain\r\n\r\nNo attachment: {subject}.\r\n"),
        Some(media_type) => format!(
            "Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n\
             --b1\r\nContent-Type: text/plain\r\n\r\nSee the attachment: {subject}.\r\n\
             --b1\r\nContent-Type: {media_type}; name=\"scan\"\r\nContent-Disposition: attachment; filename=\"scan\"\r\n\
             Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQKJcOkw7zDtsOf\r\n--b1--\r\n"
        ),
    };
    format!("{head}{body}").into_bytes()
}

/// `only_unseen = true`: a message another client marked read is not in
/// the maildrop; the others are, and nothing in the store changes.
pub fn only_unseen_hides_messages_marked_read<F: Fixture>() {
    let store = F::start();
    let ids: Vec<MessageId> = distinct("unseen", 3).iter().map(|m| store.append(m)).collect();
    store.mark_seen(&ids[1]);
    let policy = PolicyConfig { only_unseen: Some(true), ..Default::default() };
    let gateway = serve_with_policy(&store, policy).expect("only_unseen is supported everywhere");
    let want = expected(&store, &pick(&ids, &[0, 2]));
    let mut c = login(&store, &gateway);
    assert_eq!(c.stat(), (2, octets(&want)), "the read message is hidden");
    assert_eq!(c.list(), listing([(1, &want[0]), (2, &want[1])]));
    assert_eq!(c.retr(1), want[0]);
    assert_eq!(c.retr(2), want[1]);
    assert_reply(&c.quit(), "+OK", "QUIT");
    let remaining = store.remaining();
    assert_eq!(remaining.iter().map(|r| &r.id).collect::<Vec<_>>(), ids.iter().collect::<Vec<_>>());
    assert_eq!(remaining.iter().map(|r| r.seen).collect::<Vec<_>>(), [false, true, false], "read states");
}

/// `attachment_types = ["application/pdf", "image/*"]`: only the messages
/// with such an attachment are shown; DELE of one removes exactly it, the
/// hidden ones stay in the store.
pub fn attachment_types_show_only_listed_attachments<F: Fixture>() {
    let store = F::start();
    let messages = [
        with_attachment("plain", None),
        with_attachment("pdf", Some("application/pdf")),
        with_attachment("zip", Some("application/zip")),
        with_attachment("png", Some("image/png")),
    ];
    let ids: Vec<MessageId> = messages.iter().map(|m| store.append(m)).collect();
    let policy =
        PolicyConfig { attachment_types: Some(vec!["application/pdf".into(), "image/*".into()]), ..Default::default() };
    let gateway = serve_with_policy(&store, policy).expect("attachment_types is supported everywhere");
    let want = expected(&store, &pick(&ids, &[1, 3]));
    let mut c = login(&store, &gateway);
    assert_eq!(c.stat(), (2, octets(&want)), "only the PDF and the PNG are shown");
    assert_eq!(c.retr(1), want[0]);
    assert_eq!(c.retr(2), want[1]);
    c.ok("DELE 1");
    assert_reply(&c.quit(), "+OK", "QUIT");
    assert_holds(&store, &pick(&ids, &[0, 2, 3]), "after DELE of the PDF");
    let mut c = login(&store, &gateway);
    assert_eq!(c.stat(), (1, want[1].len() as u64), "the PNG is still shown, once");
    assert_reply(&c.quit(), "+OK", "QUIT");
}

// --- Oversize notices: oversize = "notice" (docs/POLICIES.md) ---------------

/// A message of at least `octets`, distinct by `subject`.
fn large(subject: &str, octets: usize) -> Vec<u8> {
    let mut message = format!(
        "From: Big Sender <big@example.com>\r\nTo: rcpt@example.com\r\nSubject: {subject}\r\n\
         Message-ID: <{}@example.com>\r\n\r\n",
        subject.replace(' ', "-")
    )
    .into_bytes();
    while message.len() < octets {
        message.extend_from_slice(b"A line of a message too large for the device, repeated to fill it.\r\n");
    }
    message
}

/// `max_size_bytes` with `oversize = "notice"`: the large message is
/// replaced by a notice whose LIST size is what RETR sends, whose UIDL is
/// its own and stable, which TOP serves too, and whose DELE removes the
/// original at UPDATE (and only then: RSET and a dropped connection remove
/// nothing).
pub fn oversize_notice_replaces_and_dele_removes_the_original<F: Fixture>() {
    use popgate::auth::accounts::policy::Oversize;
    let store = F::start();
    let ids = vec![store.append(&simple("notice small")), store.append(&large("notice big", 20_000))];
    let want_small = store.expected_retr(&ids[0]);
    let policy = PolicyConfig { max_size_bytes: Some(10_000), oversize: Some(Oversize::Notice), ..Default::default() };
    let serve_notices = || serve_with_policy(&store, policy.clone()).expect("notices are supported everywhere");
    let gateway = serve_notices();

    let mut c = login(&store, &gateway);
    let list = c.list();
    assert_eq!(list.len(), 2, "the small message and the notice: {list:?}");
    assert_eq!(list[0], (1, want_small.len() as u64));
    assert_eq!(c.retr(1), want_small);
    let notice = c.retr(2);
    assert_eq!(list[1], (2, notice.len() as u64), "the notice's LIST size is the octets RETR sends");
    assert_eq!(c.stat(), (2, want_small.len() as u64 + notice.len() as u64));
    let text = String::from_utf8(notice.clone()).expect("a notice is text");
    for part in [
        "From: popgate <MAILER-DAEMON@",
        "\r\nSubject: Message too large for this device: notice big\r\n",
        "\r\nMessage-ID: <",
        "Big Sender <big@example.com>",
        "It stays in the mailbox",
    ] {
        assert!(text.contains(part), "the notice lacks {part:?}:\n{text}");
    }
    assert!(notice.len() < 10_000, "a notice is short");
    let top = c.top(2, 0);
    assert!(top.ends_with(b"\r\n\r\n") && notice.starts_with(&top), "TOP 2 0 is the notice's header section");
    assert_eq!(c.top(2, 1), notice[..top.len() + text[top.len()..].find("\r\n").unwrap() + 2].to_vec());
    let uidl = c.uidl();
    crate::support::pop3::check_uidl(&uidl[1].1);
    c.ok("DELE 2");
    assert_eq!(c.stat(), (1, want_small.len() as u64));
    c.ok("RSET");
    assert_reply(&c.quit(), "+OK", "QUIT");
    assert_holds(&store, &ids, "after DELE of the notice and RSET");

    let mut c = login(&store, &gateway);
    assert_eq!(c.uidl(), uidl, "the notice's UIDL is the same in the next session");
    let again = c.list();
    assert_eq!(again[1], (2, c.retr(2).len() as u64), "LIST size == RETR octets in the next session too");
    c.ok("DELE 2");
    c.drop_connection();
    gateway.shutdown(IO_TIMEOUT);
    assert_holds(&store, &ids, "after DELE of the notice and a dropped connection");

    // The original under its own UIDL, seen without the policy.
    let plain = serve(&store);
    let mut c = login(&store, &plain);
    let original = c.uidl();
    assert_eq!(original.len(), 2);
    assert_ne!(original[1].1, uidl[1].1, "the notice's UIDL is not the original's");
    assert_eq!(original[0], uidl[0]);
    assert_reply(&c.quit(), "+OK", "QUIT");

    let gateway = serve_notices();
    let mut c = login(&store, &gateway);
    assert_eq!(c.uidl(), uidl, "the notice's UIDL is stable across sessions (and gateways)");
    c.ok("DELE 2");
    assert_reply(&c.quit(), "+OK", "QUIT");
    assert_holds(&store, &ids[..1], "after DELE of the notice and QUIT: the original is gone");
    let mut c = login(&store, &gateway);
    assert_eq!(c.list(), [list[0]], "no notice for a message no longer there");
    assert_reply(&c.quit(), "+OK", "QUIT");
}
