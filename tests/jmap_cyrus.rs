//! popgate's JMAP backend against a real Cyrus 3.6 (tests/support/cyrus.rs):
//! POP3 sessions through popgate in-process, real clients (curl, Python's
//! poplib), and each test then checks on the Cyrus side — by its own JMAP
//! requests — exactly what is left where: the Trash or nowhere (delete
//! policies), a named mailbox, paging, messages and mailboxes that vanish.
//! The POP3 behaviour every store shares is in the battery (tests/battery/),
//! which runs against Cyrus too.
//!
//! Every test has its own Cyrus on ports chosen at run time, so they run in
//! parallel; every wait is bounded by the harness timeouts.

mod support;

use support::program::{curl_lists, curl_pop3, curl_retrieves_each, describe, poplib_retrieves_and_deletes};

use std::time::{Duration, Instant};

use popgate::backend::jmap::{DeletePolicy, JmapConfig};
use popgate::backend::select::BackendConfig;
use popgate::config::Config;
use support::IO_TIMEOUT;
use support::cyrus::Cyrus;
use support::gateway::Gateway;
use support::messages::{self, Sample, canonical};
use support::pop3::Dialogue as _;

const USER: &str = "alice";
const PASSWORD: &str = "cyrus-alice-pw";

/// A Cyrus where alice exists (with an Inbox and a Trash).
fn setup() -> Cyrus {
    let cyrus = Cyrus::start();
    cyrus.add_user(USER, PASSWORD);
    cyrus
}

fn gateway_with(config: JmapConfig) -> Gateway {
    Gateway::from_config(Config { backend: BackendConfig::Jmap(config), ..Config::default() })
}

/// `Email/import` refuses bare LF; every other hard case is stored as is.
fn has_bare_lf(raw: &[u8]) -> bool {
    raw.iter().enumerate().any(|(i, &b)| b == b'\n' && (i == 0 || raw[i - 1] != b'\r'))
}

/// The shared hard cases Cyrus can store (no bare LF), plus bare CRs in a
/// body (the shared "bare CR" sample has them in its header too, which
/// Cyrus refuses as an invalid header).
fn cyrus_samples() -> Vec<Sample> {
    let mut samples: Vec<Sample> =
        messages::hard().into_iter().filter(|s| !has_bare_lf(&s.raw) && s.name != "bare CR").collect();
    samples.push(Sample {
        name: "bare CR in the body",
        raw: b"From: a@example.com\r\nSubject: bare CR in the body\r\n\r\none\rtwo\r\r\nthree\r".to_vec(),
    });
    samples
}

fn distinct(subject: &str) -> Vec<u8> {
    messages::simple(subject)
}

/// Cyrus keeps the octets as sent, so its `Email.size` is not the POP3 size
/// of a bare CR or a missing final CRLF: LIST must announce the measured
/// size. UIDL is the JMAP Email id. (RETR and TOP of these messages, and of
/// the others Cyrus can store, are in the battery: tests/battery/.)
#[test]
fn cyrus_keeps_the_octets_list_measures_them_and_uidl_is_the_email_id() {
    let cyrus = setup();
    let samples = cyrus_samples();
    for name in ["bare CR in the body", "no final line end", "leading dots", "8-bit"] {
        assert!(samples.iter().any(|s| s.name == name), "sample {name} must be among those Cyrus stores");
    }
    let ids: Vec<String> = samples.iter().map(|s| cyrus.append(USER, &s.raw)).collect();
    let want: Vec<Vec<u8>> = samples.iter().map(|s| canonical(&s.raw)).collect();

    // Cyrus keeps the octets as sent: its Email.size is not the POP3 size
    // for the bare-CR and unterminated samples, so popgate must measure.
    let stored = cyrus.emails(USER);
    for (sample, email) in samples.iter().zip(&stored) {
        assert_eq!(email.size, sample.raw.len() as u64, "{}: Cyrus stores the exact octets", sample.name);
        assert_eq!(cyrus.download(USER, &email.blob_id), sample.raw, "{}", sample.name);
    }
    assert!(samples.iter().any(|s| canonical(&s.raw).len() != s.raw.len()), "some sizes must differ");

    let gateway = Gateway::url(&cyrus.backend_url());
    let mut pop = gateway.login(USER, PASSWORD);
    let total: u64 = want.iter().map(|m| m.len() as u64).sum();
    assert_eq!(pop.stat(), (want.len(), total));
    let sizes: Vec<(u32, u64)> = want.iter().enumerate().map(|(i, m)| (i as u32 + 1, m.len() as u64)).collect();
    assert_eq!(pop.list(), sizes);
    let uidls: Vec<(u32, String)> = ids.iter().enumerate().map(|(i, id)| (i as u32 + 1, id.clone())).collect();
    assert_eq!(pop.uidl(), uidls, "UIDL is the JMAP Email id");
    for (i, sample) in samples.iter().enumerate() {
        let n = i as u32 + 1;
        assert_eq!(pop.list_one(n), want[i].len() as u64, "LIST {n} ({})", sample.name);
        assert_eq!(pop.uidl_one(n), ids[i], "UIDL {n} ({})", sample.name);
    }
    assert!(pop.quit().starts_with("+OK"));

    assert_eq!(cyrus.ids_in(USER, "Inbox"), ids, "reading changes nothing");
    assert!(cyrus.ids_in(USER, "Trash").is_empty());
}

#[test]
fn dele_and_quit_move_exactly_those_to_the_trash() {
    let cyrus = setup();
    let ids: Vec<String> = (1..=4).map(|i| cyrus.append(USER, &distinct(&format!("trash me {i}")))).collect();
    let gateway = Gateway::url(&cyrus.backend_url());

    let mut pop = gateway.login(USER, PASSWORD);
    pop.ok("DELE 2");
    pop.ok("DELE 4");
    let reply = pop.quit();
    assert!(reply.starts_with("+OK"), "{reply}");

    assert_eq!(cyrus.ids_in(USER, "Inbox"), [ids[0].clone(), ids[2].clone()]);
    assert_eq!(cyrus.ids_in(USER, "Trash"), [ids[1].clone(), ids[3].clone()]);
    let emails = cyrus.emails(USER);
    assert_eq!(emails.len(), 4, "the trash policy destroys nothing");
    for email in &emails {
        assert_eq!(email.mailboxes.len(), 1, "moved, not copied: {email:?}");
    }

    let mut pop = gateway.login(USER, PASSWORD);
    assert_eq!(pop.uidl(), [(1, ids[0].clone()), (2, ids[2].clone())]);
    pop.quit();
}

#[test]
fn destroy_policy_destroys_exactly_those() {
    let cyrus = setup();
    let ids: Vec<String> = (1..=3).map(|i| cyrus.append(USER, &distinct(&format!("destroy me {i}")))).collect();
    // The session URL itself this time, not the server base.
    let gateway =
        gateway_with(JmapConfig { delete_policy: DeletePolicy::Destroy, ..JmapConfig::new(cyrus.session_url()) });

    let mut pop = gateway.login(USER, PASSWORD);
    pop.ok("DELE 1");
    assert!(pop.quit().starts_with("+OK"));

    let left: Vec<String> = cyrus.emails(USER).into_iter().map(|e| e.id).collect();
    assert_eq!(left, ids[1..], "exactly message 1 is gone from the account");
    assert!(cyrus.ids_in(USER, "Trash").is_empty());
}

#[test]
fn nothing_changes_without_quit_or_after_rset() {
    let cyrus = setup();
    let ids: Vec<String> = (1..=3).map(|i| cyrus.append(USER, &distinct(&format!("keep me {i}")))).collect();
    let gateway = Gateway::url(&cyrus.backend_url());

    let mut pop = gateway.login(USER, PASSWORD);
    pop.ok("DELE 1");
    pop.ok("DELE 3");
    pop.drop_connection();

    let mut pop = gateway.login(USER, PASSWORD);
    pop.ok("DELE 2");
    pop.ok("RSET");
    assert!(pop.quit().starts_with("+OK"));

    // Once every session has ended, nothing may have moved.
    gateway.shutdown(IO_TIMEOUT);
    assert_eq!(cyrus.ids_in(USER, "Inbox"), ids);
    assert!(cyrus.ids_in(USER, "Trash").is_empty());
    assert_eq!(cyrus.emails(USER).len(), 3);
}

#[test]
fn a_named_mailbox_is_the_maildrop() {
    let cyrus = setup();
    cyrus.create_mailbox(USER, "Print");
    let inbox = cyrus.append(USER, &distinct("stays in the inbox"));
    let print: Vec<String> =
        (1..=2).map(|i| cyrus.append_to(USER, "Print", &distinct(&format!("print job {i}")))).collect();
    let gateway = gateway_with(JmapConfig {
        mailbox: Some("Print".into()),
        ..JmapConfig::new(cyrus.backend_url().replacen("jmap+", "", 1))
    });

    let mut pop = gateway.login(USER, PASSWORD);
    assert_eq!(pop.uidl(), [(1, print[0].clone()), (2, print[1].clone())]);
    pop.ok("DELE 1");
    assert!(pop.quit().starts_with("+OK"));

    assert_eq!(cyrus.ids_in(USER, "Print"), [print[1].clone()]);
    assert_eq!(cyrus.ids_in(USER, "Trash"), [print[0].clone()]);
    assert_eq!(cyrus.ids_in(USER, "Inbox"), [inbox]);
}

#[test]
fn small_server_limits_page_the_listing_and_batch_the_removal() {
    // 7 messages, 2 per Email/get, 4 calls per request: the listing takes
    // 4 pages in 2 requests, and removing 5 takes 3 Email/set calls.
    let cyrus =
        Cyrus::start_with("jmap_max_objects_in_get: 2\njmap_max_calls_in_request: 4\njmap_max_objects_in_set: 2");
    cyrus.add_user(USER, PASSWORD);
    let raws: Vec<Vec<u8>> = (1..=7).map(|i| distinct(&format!("paged {i}"))).collect();
    let ids: Vec<String> = raws.iter().map(|r| cyrus.append(USER, r)).collect();
    let gateway = Gateway::url(&cyrus.backend_url());

    let mut pop = gateway.login(USER, PASSWORD);
    let uidls: Vec<(u32, String)> = ids.iter().enumerate().map(|(i, id)| (i as u32 + 1, id.clone())).collect();
    assert_eq!(pop.uidl(), uidls, "every page, in order, once");
    assert_eq!(pop.retr(7), canonical(&raws[6]));
    for n in [1, 2, 4, 6, 7] {
        pop.ok(&format!("DELE {n}"));
    }
    assert!(pop.quit().starts_with("+OK"));

    assert_eq!(cyrus.ids_in(USER, "Inbox"), [ids[2].clone(), ids[4].clone()]);
    let trashed: Vec<String> = [0, 1, 3, 5, 6].iter().map(|&i| ids[i].clone()).collect();
    assert_eq!(cyrus.ids_in(USER, "Trash"), trashed);
}

#[test]
fn a_message_destroyed_meanwhile_spoils_nothing_else() {
    let cyrus = setup();
    let gone = distinct("gone soon");
    let ids = [cyrus.append(USER, &gone), cyrus.append(USER, &distinct("still here"))];
    let gateway = Gateway::url(&cyrus.backend_url());

    let mut pop = gateway.login(USER, PASSWORD);
    cyrus.destroy_emails(USER, &ids[..1]);
    // Cyrus 3.6 still serves a destroyed message's blob for a while; a
    // server that answers 404 gets a plain -ERR for this message alone.
    let reply = pop.cmd("RETR 1");
    if reply.starts_with("+OK") {
        assert_eq!(pop.body(), canonical(&gone));
    } else {
        assert!(reply.starts_with("-ERR") && !reply.contains("[SYS/"), "{reply}");
    }
    assert_eq!(pop.retr(2), canonical(&distinct("still here")));
    // Deleting what someone else already destroyed is no failure.
    pop.ok("DELE 1");
    assert!(pop.quit().starts_with("+OK"));
    assert_eq!(cyrus.ids_in(USER, "Inbox"), [ids[1].clone()]);
}

/// An account without a mailbox of role trash (a fresh Cyrus account has
/// only its Inbox; here the Trash is destroyed mid-session): the trash is
/// looked up again at QUIT and created as JMAP clients do, and exactly the
/// marked messages move there. Cyrus would accept a move into the destroyed
/// mailbox and the messages would vanish with it, so it must not be reused.
#[test]
fn a_missing_trash_is_created_at_quit_and_the_messages_moved_there() {
    let cyrus = setup();
    let ids: Vec<String> = (1..=3).map(|i| cyrus.append(USER, &distinct(&format!("to a new trash {i}")))).collect();
    let gateway = Gateway::url(&cyrus.backend_url());

    let mut pop = gateway.login(USER, PASSWORD);
    pop.ok("DELE 1");
    pop.ok("DELE 3");
    cyrus.destroy_mailbox(USER, "Trash");
    let reply = pop.quit();
    assert!(reply.starts_with("+OK"), "{reply}");
    assert_eq!(cyrus.ids_in(USER, "Inbox"), [ids[1].clone()]);
    assert_eq!(cyrus.ids_in(USER, "Trash"), [ids[0].clone(), ids[2].clone()]);
    assert_eq!(cyrus.emails(USER).len(), 3, "nothing destroyed");
}

#[test]
fn a_removal_the_server_refuses_is_a_temporary_error_and_moves_nothing() {
    let cyrus = setup();
    let ids: Vec<String> = (1..=2).map(|i| cyrus.append(USER, &distinct(&format!("refused {i}")))).collect();
    let gateway = Gateway::url(&cyrus.backend_url());

    let mut pop = gateway.login(USER, PASSWORD);
    pop.ok("DELE 2");
    // The password changes mid-session: the Email/set at QUIT gets 401.
    cyrus.set_password(USER, "a-new-password");
    let reply = pop.quit();
    assert!(reply.starts_with("-ERR [SYS/TEMP]"), "{reply}");
    cyrus.set_password(USER, PASSWORD);
    assert_eq!(cyrus.ids_in(USER, "Inbox"), ids);
    assert!(cyrus.ids_in(USER, "Trash").is_empty());
}

#[test]
fn curl_retrieves_and_deletes() {
    let cyrus = setup();
    let raws = [
        distinct("for curl one"),
        b"Subject: dots and a bare CR for curl\r\n\r\n.\r\n..two\rdots\r\nend".to_vec(),
        distinct("for curl three"),
    ];
    let ids: Vec<String> = raws.iter().map(|r| cyrus.append(USER, r)).collect();
    let gateway = Gateway::url(&cyrus.backend_url());
    let credentials = format!("{USER}:{PASSWORD}");
    let auth = ["--user", credentials.as_str()];
    let addr = gateway.addr;

    curl_retrieves_each(addr, &auth, &raws);
    let dele = curl_pop3(addr, "2", &auth, &["--request", "DELE", "--head"]);
    assert!(dele.status.success(), "curl DELE: {}", describe(&dele));
    support::wait_for("message 2 to reach the trash", IO_TIMEOUT, || {
        (cyrus.ids_in(USER, "Trash") == [ids[1].clone()]).then_some(())
    });
    assert_eq!(cyrus.ids_in(USER, "Inbox"), [ids[0].clone(), ids[2].clone()]);

    curl_lists(addr, &auth, &[&raws[0], &raws[2]]);
}

#[test]
fn python_poplib_retrieves_and_deletes_everything() {
    let cyrus = setup();
    let raws = [
        distinct("for poplib one"),
        b"Subject: poplib and no final CRLF\r\n\r\n.starts with a dot\r\nend".to_vec(),
        "Subject: 8-bit for poplib\r\n\r\ngr\u{fc}\u{df}e\r\n".as_bytes().to_vec(),
    ];
    let ids: Vec<String> = raws.iter().map(|r| cyrus.append(USER, r)).collect();
    let gateway = Gateway::url(&cyrus.backend_url());

    poplib_retrieves_and_deletes(gateway.addr, (USER, PASSWORD), &raws, &ids);

    assert!(cyrus.ids_in(USER, "Inbox").is_empty(), "poplib's DELE + QUIT must empty the inbox");
    assert_eq!(cyrus.ids_in(USER, "Trash"), ids);
}

/// The test binary must leave no Cyrus process behind: dropping a `Cyrus`
/// ends master and every process in its group.
#[test]
fn a_dropped_cyrus_leaves_no_process() {
    let cyrus = setup();
    cyrus.append(USER, &distinct("so that httpd has forked"));
    let group = cyrus.master_pid().expect("master running");
    assert!(!processes_in_group(group).is_empty(), "master's group must be visible while it runs");
    drop(cyrus);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = processes_in_group(group);
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "Cyrus processes still running after drop: {left:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Live (not zombie) processes whose process group is `group`.
fn processes_in_group(group: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // pid (comm) state ppid pgrp …; comm may contain spaces: split after ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.first() != Some(&"Z") && fields.get(2).and_then(|g| g.parse::<u32>().ok()) == Some(group) {
            found.push(pid);
        }
    }
    found
}
