//! popgate's Microsoft Graph backend against the stand-in API
//! (tests/support/graph_api.rs): POP3 sessions through popgate in-process —
//! mostly with a router that maps a device login to OAuth access tokens
//! and refreshes them, as mapped accounts do — and real clients (curl with
//! a bearer token, Python's poplib). Each test then checks in the stand-in
//! exactly what is left in which folder.
//!
//! Every test has its own stand-in and gateway on ports chosen at run time,
//! so they run in parallel; every wait is bounded by the harness timeouts.

mod support;

use support::bearer::Routed;
use support::program::{curl_pop3, curl_retrieves_each, describe, poplib_retrieves_and_deletes};

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use popgate::backend::graph::{GraphBackend, GraphConfig, GraphDeletePolicy};
use popgate::backend::select::BackendConfig;
use popgate::config::Config;
use support::IO_TIMEOUT;
use support::gateway::Gateway;
use support::graph_api::{GraphApi, Throttle, TokenKind, UPN, uidl};
use support::messages::{self, canonical};
use support::pop3::Dialogue as _;
use support::stand_in::gap_after;
use support::token_router::TokenRouter;

const DEVICE: (&str, &str) = ("scanner", "device-secret");

type Setup = Routed<GraphApi>;

fn config_for(api: &GraphApi) -> GraphConfig {
    GraphConfig { api_base: api.base_url.clone(), max_retry_wait_secs: 5, ..GraphConfig::default() }
}

fn setup_with(kind: TokenKind, change: impl FnOnce(&mut GraphConfig)) -> Setup {
    let api = GraphApi::start();
    let mut config = config_for(&api);
    change(&mut config);
    let backend = Arc::new(GraphBackend::new(config).unwrap_or_else(|e| panic!("{e}")));
    let (token, issuer) = (api.issue_token(kind), api.issuer(kind));
    Routed::start(api, backend, DEVICE, UPN, token, issuer)
}

fn setup() -> Setup {
    setup_with(TokenKind::Delegated, |_| {})
}

fn numbered(ids: &[String]) -> Vec<(u32, String)> {
    ids.iter().enumerate().map(|(i, id)| (i as u32 + 1, uidl(id))).collect()
}

#[test]
fn every_message_arrives_exactly_with_exact_sizes() {
    let s = setup();
    let samples = messages::hard();
    let ids: Vec<String> = samples.iter().map(|x| s.api.add(&x.raw)).collect();
    assert!(ids.iter().all(|id| id.len() > 70), "Graph ids are too long to be UIDLs");
    let want: Vec<Vec<u8>> = samples.iter().map(|x| canonical(&x.raw)).collect();

    let mut pop = s.login();
    let total: u64 = want.iter().map(|m| m.len() as u64).sum();
    assert_eq!(pop.stat(), (want.len(), total));
    let sizes: Vec<(u32, u64)> = want.iter().enumerate().map(|(i, m)| (i as u32 + 1, m.len() as u64)).collect();
    assert_eq!(pop.list(), sizes);
    assert_eq!(pop.uidl(), numbered(&ids), "UIDL: hex SHA-256 of the immutable id, oldest first");
    for (i, sample) in samples.iter().enumerate() {
        let n = i as u32 + 1;
        let body = pop.retr(n);
        assert_eq!(String::from_utf8_lossy(&body), String::from_utf8_lossy(&want[i]), "RETR {n} ({})", sample.name);
        assert_eq!(pop.list_one(n), body.len() as u64, "LIST {n} == RETR octets ({})", sample.name);
        assert_eq!(pop.top(n, 0), messages::top(&sample.raw, 0), "TOP {n} 0 ({})", sample.name);
        assert_eq!(pop.top(n, 2), messages::top(&sample.raw, 2), "TOP {n} 2 ({})", sample.name);
    }
    assert!(pop.quit().starts_with("+OK"));
    assert_eq!(s.api.ids_in("inbox"), ids, "reading moves nothing");
}

#[test]
fn every_request_prefers_immutable_ids() {
    let s = setup();
    for i in 1..=3 {
        s.api.add(&messages::simple(&format!("immutable {i}")));
    }
    let mut pop = s.login();
    pop.retr(1);
    pop.ok("DELE 2");
    assert!(pop.quit().starts_with("+OK"));
    let seen = s.api.seen();
    assert!(seen.iter().any(|r| r.in_batch), "the move went through $batch");
    let without: Vec<_> = seen.iter().filter(|r| !r.immutable_ids).collect();
    assert!(without.is_empty(), "requests without Prefer: IdType=\"ImmutableId\": {without:?}");
}

#[test]
fn uidls_are_stable_across_sessions_and_moves() {
    let s = setup();
    let ids = [s.api.add(&messages::simple("one")), s.api.add(&messages::simple("two"))];
    let mut pop = s.login();
    let before = pop.uidl();
    pop.quit();
    assert_eq!(before, numbered(&ids));
    // Another client files message 1 away and back: same immutable id.
    s.api.move_message(&ids[0], "archive");
    s.api.move_message(&ids[0], "inbox");
    let third = s.api.add(&messages::simple("three"));
    let mut pop = s.login();
    let after = pop.uidl();
    pop.quit();
    assert_eq!(after[..2], before[..], "old messages keep their UIDL");
    assert_eq!(after[2], (3, uidl(&third)));
}

/// The documented limit of immutable ids: a message moved to the archive
/// *mailbox* (Online Archive) and back has a new id, so a new UIDL, and a
/// POP3 client downloads it again (docs/BACKENDS.md, "Ids, content and
/// their stability"). This pins that behaviour down; nothing dedups it.
#[test]
fn a_round_trip_through_the_archive_mailbox_is_a_new_uidl() {
    let s = setup();
    let ids = [s.api.add(&messages::simple("one")), s.api.add(&messages::simple("two"))];
    let mut pop = s.login();
    assert_eq!(pop.uidl(), numbered(&ids));
    pop.quit();
    let renamed = s.api.round_trip_through_archive_mailbox(&ids[0]);
    let mut pop = s.login();
    assert_eq!(pop.uidl(), numbered(&[renamed.clone(), ids[1].clone()]));
    assert_ne!(uidl(&renamed), uidl(&ids[0]));
    pop.quit();
}

#[test]
fn the_listing_follows_every_next_link() {
    let s = setup();
    s.api.set_page_cap(3);
    let raws: Vec<Vec<u8>> = (1..=8).map(|i| messages::simple(&format!("paged {i}"))).collect();
    let ids: Vec<String> = raws.iter().map(|r| s.api.add(r)).collect();
    let mut pop = s.login();
    assert_eq!(pop.uidl(), numbered(&ids), "every page, once, oldest first");
    assert_eq!(pop.retr(8), canonical(&raws[7]));
    pop.quit();
    // A delta query from scratch (the link it ends with starts the next
    // poll: tests/incremental_listing.rs).
    let lists: Vec<_> = s.api.seen().into_iter().filter(|r| r.path.ends_with("/messages/delta")).collect();
    assert_eq!(lists.len(), 3, "8 messages at 3 a page");
    assert!(lists[0].query.contains("select=id") && lists[2].query.contains("skiptoken="), "{lists:?}");
}

#[test]
fn dele_and_quit_move_exactly_those_to_deleted_items_in_one_batch() {
    let s = setup();
    let ids: Vec<String> = (1..=4).map(|i| s.api.add(&messages::simple(&format!("move me {i}")))).collect();
    let mut pop = s.login();
    pop.ok("DELE 2");
    pop.ok("DELE 4");
    let reply = pop.quit();
    assert!(reply.starts_with("+OK"), "{reply}");
    assert_eq!(s.api.ids_in("inbox"), [ids[0].clone(), ids[2].clone()]);
    assert_eq!(s.api.ids_in("deleteditems"), [ids[1].clone(), ids[3].clone()]);
    assert_eq!(s.api.batches(), [2], "one $batch for both moves");
    let mut pop = s.login();
    assert_eq!(pop.uidl(), numbered(&[ids[0].clone(), ids[2].clone()]));
    pop.quit();
}

#[test]
fn many_deletions_go_twenty_to_a_batch() {
    let s = setup();
    let ids: Vec<String> = (1..=25).map(|i| s.api.add(&messages::simple(&format!("bulk {i}")))).collect();
    let mut pop = s.login();
    for n in 1..=25 {
        pop.ok(&format!("DELE {n}"));
    }
    assert!(pop.quit().starts_with("+OK"));
    assert_eq!(s.api.batches(), [20, 5]);
    assert!(s.api.ids_in("inbox").is_empty());
    assert_eq!(s.api.ids_in("deleteditems"), ids);
}

#[test]
fn the_permanent_delete_policy_deletes() {
    let s = setup_with(TokenKind::Delegated, |c| c.delete_policy = GraphDeletePolicy::PermanentDelete);
    let ids: Vec<String> = (1..=3).map(|i| s.api.add(&messages::simple(&format!("delete me {i}")))).collect();
    let mut pop = s.login();
    pop.ok("DELE 1");
    pop.ok("DELE 3");
    assert!(pop.quit().starts_with("+OK"));
    assert_eq!(s.api.all_ids(), [ids[1].clone()]);
    assert!(s.api.ids_in("deleteditems").is_empty());
    assert!(s.api.seen().iter().any(|r| r.in_batch && r.path.ends_with("/permanentDelete") && r.status == 204));
}

#[test]
fn a_move_graph_refuses_is_reported_and_the_others_are_done() {
    let s = setup();
    let ids: Vec<String> = (1..=3).map(|i| s.api.add(&messages::simple(&format!("refused {i}")))).collect();
    s.api.refuse_moving(&ids[1]);
    let mut pop = s.login();
    for n in 1..=3 {
        pop.ok(&format!("DELE {n}"));
    }
    let reply = pop.quit();
    assert!(reply.starts_with("-ERR [SYS/TEMP]"), "a refused move is never hidden: {reply}");
    assert_eq!(s.api.ids_in("inbox"), [ids[1].clone()]);
    assert_eq!(s.api.ids_in("deleteditems"), [ids[0].clone(), ids[2].clone()]);
}

#[test]
fn dele_then_a_dropped_connection_changes_nothing() {
    let s = setup();
    let ids: Vec<String> = (1..=3).map(|i| s.api.add(&messages::simple(&format!("stay {i}")))).collect();
    let mut pop = s.login();
    pop.ok("DELE 1");
    pop.ok("DELE 3");
    pop.drop_connection();
    let mut pop = s.login();
    pop.ok("DELE 2");
    pop.ok("RSET");
    assert!(pop.quit().starts_with("+OK"));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(s.api.ids_in("inbox"), ids);
    assert!(s.api.batches().is_empty(), "no $batch, no move");
}

// The scenarios every bearer backend runs (token refresh, a big message, a
// message deleted meanwhile).
support::bearer::bearer_scenarios!(setup);

#[test]
fn throttling_is_retried_after_retry_after() {
    let s = setup();
    let raws = [messages::simple("throttled one"), messages::simple("throttled two")];
    for raw in &raws {
        s.api.add(raw);
    }
    s.api.throttle(Throttle { path_contains: "/delta?".into(), status: 429, retry_after: Some(1), in_batch: false });
    let mut pop = s.login();
    assert_eq!(pop.stat().0, 2);
    let gap = gap_after(&s.api.seen(), 429, "/delta?");
    assert!(gap >= Duration::from_millis(1000), "retried after {gap:?}, before Retry-After");

    s.api.forget_seen();
    s.api.throttle(Throttle { path_contains: "$value".into(), status: 503, retry_after: Some(1), in_batch: false });
    assert_eq!(pop.retr(2), canonical(&raws[1]));
    let gap = gap_after(&s.api.seen(), 503, "$value");
    assert!(gap >= Duration::from_millis(1000), "retried after {gap:?}");

    // A move throttled inside the $batch goes again, after its Retry-After.
    s.api.forget_seen();
    s.api.throttle(Throttle { path_contains: "/move".into(), status: 429, retry_after: Some(1), in_batch: true });
    pop.ok("DELE 1");
    assert!(pop.quit().starts_with("+OK"));
    assert_eq!(s.api.batches(), [1, 1]);
    let gap = gap_after(&s.api.seen(), 429, "/move");
    assert!(gap >= Duration::from_millis(1000), "retried after {gap:?}");
    assert_eq!(s.api.ids_in("deleteditems").len(), 1);
}

#[test]
fn at_most_four_requests_are_in_flight_per_mailbox() {
    let s = setup();
    for i in 0..24 {
        s.api.add(&messages::simple(&format!("concurrent {i}")));
    }
    s.api.set_value_delay(Duration::from_millis(40));
    // Two devices log in to the same mailbox at once, both cold.
    let logins: Vec<_> = (0..2)
        .map(|_| {
            let addr = s.gateway.addr;
            std::thread::spawn(move || {
                let mut pop = support::pop3::Pop3::login(addr, DEVICE.0, DEVICE.1);
                let stat = pop.stat();
                pop.quit();
                stat
            })
        })
        .collect();
    for login in logins {
        assert_eq!(login.join().expect("login thread").0, 24);
    }
    let peak = s.api.max_in_flight();
    assert!((2..=4).contains(&peak), "peak of {peak} requests in flight (measuring runs 4 at a time, never more)");
    assert!(s.api.seen().iter().all(|r| r.status != 429), "never over Outlook's limit");
}

#[test]
fn app_only_access_names_the_user() {
    let s = setup_with(TokenKind::AppOnly, |c| c.user = UPN.into());
    let id = s.api.add(&messages::simple("for an app"));
    let mut pop = s.login();
    assert_eq!(pop.uidl(), numbered(&[id]));
    pop.ok("DELE 1");
    assert!(pop.quit().starts_with("+OK"));
    assert!(
        s.api
            .seen()
            .iter()
            .filter(|r| !r.path.ends_with("$batch"))
            .all(|r| r.path.starts_with(&format!("/v1.0/users/{UPN}/")))
    );
    assert_eq!(s.api.ids_in("deleteditems").len(), 1);

    // An app-only token cannot use /me: a configuration error, said so.
    let s = setup_with(TokenKind::AppOnly, |_| {});
    let mut pop = s.gateway.connect();
    pop.ok(&format!("USER {}", DEVICE.0));
    let reply = pop.cmd(&format!("PASS {}", DEVICE.1));
    assert!(reply.starts_with("-ERR [SYS/PERM]"), "{reply}");
}

#[test]
fn a_folder_by_well_known_name_or_id_is_the_maildrop() {
    let s = setup_with(TokenKind::Delegated, |c| c.folder = "archive".into());
    let inbox = s.api.add(&messages::simple("stays in the inbox"));
    let archived = s.api.add_to("archive", &messages::simple("archived"), 1_710_000_000);
    let mut pop = s.login();
    assert_eq!(pop.uidl(), numbered(std::slice::from_ref(&archived)));
    pop.ok("DELE 1");
    assert!(pop.quit().starts_with("+OK"));
    assert_eq!(s.api.ids_in("deleteditems"), [archived]);
    assert_eq!(s.api.ids_in("inbox"), [inbox]);

    let api = GraphApi::start();
    let folder = api.create_folder("Scans");
    let scans: Vec<String> =
        (1..=2).map(|i| api.add_to(&folder, &messages::simple(&format!("scan {i}")), 1_720_000_000 + i)).collect();
    let backend = Arc::new(GraphBackend::new(GraphConfig { folder: folder.clone(), ..config_for(&api) }).unwrap());
    let kind = TokenKind::Delegated;
    let router = TokenRouter::new(backend, DEVICE, UPN, api.issue_token(kind), api.issuer(kind));
    let gateway = Gateway::routed(Config::default(), router);
    let mut pop = gateway.login(DEVICE.0, DEVICE.1);
    assert_eq!(pop.uidl(), numbered(&scans));
    pop.quit();

    let missing = setup_with(TokenKind::Delegated, |c| c.folder = "AQMkADAwATM0MDAAMS1uo-such-folder".into());
    let mut pop = missing.gateway.connect();
    pop.ok(&format!("USER {}", DEVICE.0));
    let reply = pop.cmd(&format!("PASS {}", DEVICE.1));
    assert!(reply.starts_with("-ERR [SYS/PERM]"), "{reply}");
}

#[test]
fn a_cold_mailbox_of_1000_messages() {
    let s = setup();
    let cold = support::bearer::cold_login(&s, 1000);
    let seen = s.api.seen();
    let downloads = seen.iter().filter(|r| r.path.ends_with("$value")).count();
    let lists = seen.iter().filter(|r| r.path.ends_with("/messages/delta")).count();
    assert_eq!((downloads, lists), (1000, 2), "1000 downloads, 2 delta pages of 500");
    assert!(s.api.max_in_flight() <= 4);

    s.api.forget_seen();
    let started = Instant::now();
    let mut pop = s.login();
    let warm = started.elapsed();
    assert_eq!(pop.stat().0, 1000);
    pop.quit();
    assert!(s.api.seen().iter().all(|r| !r.path.ends_with("$value")), "warm: nothing downloaded");
    eprintln!(
        "graph cold 1000-message login: {cold:?} ({downloads} downloads, {lists} list pages); warm login: {warm:?}"
    );
}

/// Pass-through: the client's own token (SASL XOAUTH2), no router.
fn pass_through(api: &GraphApi) -> Gateway {
    Gateway::from_config(Config { backend: BackendConfig::Graph(config_for(api)), ..Config::default() })
}

#[test]
fn pass_through_takes_bearer_tokens_and_refuses_passwords() {
    let api = GraphApi::start();
    let id = api.add(&messages::simple("by token"));
    let token = api.issue_token(TokenKind::Delegated);
    let gateway = pass_through(&api);
    let mut pop = gateway.connect();
    pop.ok(&format!("USER {UPN}"));
    let reply = pop.cmd("PASS a-password");
    assert!(reply.starts_with("-ERR [SYS/PERM]"), "{reply}");
    let xoauth2 =
        base64::engine::general_purpose::STANDARD.encode(format!("user={UPN}\x01auth=Bearer {token}\x01\x01"));
    let mut pop = gateway.connect();
    pop.ok(&format!("AUTH XOAUTH2 {xoauth2}"));
    assert_eq!(pop.uidl(), numbered(&[id]));
    pop.quit();
}

#[test]
fn curl_retrieves_and_deletes_with_a_bearer_token() {
    let api = GraphApi::start();
    let raws = [
        messages::simple("for curl one"),
        b"Subject: dots and a bare LF for curl\n\n.\n..two\ndots\nend".to_vec(),
        messages::simple("for curl three"),
    ];
    let ids: Vec<String> = raws.iter().map(|r| api.add(r)).collect();
    let token = api.issue_token(TokenKind::Delegated);
    let gateway = pass_through(&api);
    let user = format!("{UPN}:");
    let auth = ["--user", user.as_str(), "--oauth2-bearer", token.as_str()];
    let addr = gateway.addr;
    let listing = curl_pop3(addr, "", &auth, &["--request", "UIDL"]);
    assert!(listing.status.success(), "curl UIDL: {}", describe(&listing));
    let expected: String = numbered(&ids).iter().map(|(n, u)| format!("{n} {u}\r\n")).collect();
    assert_eq!(String::from_utf8_lossy(&listing.stdout), expected);
    curl_retrieves_each(addr, &auth, &raws);
    let dele = curl_pop3(addr, "2", &auth, &["--request", "DELE", "--head"]);
    assert!(dele.status.success(), "curl DELE: {}", describe(&dele));
    support::wait_for("message 2 to reach Deleted Items", IO_TIMEOUT, || {
        (api.ids_in("deleteditems") == [ids[1].clone()]).then_some(())
    });
    assert_eq!(api.ids_in("inbox"), [ids[0].clone(), ids[2].clone()]);
}

#[test]
fn python_poplib_retrieves_and_deletes_everything() {
    let s = setup();
    let raws = [
        messages::simple("for poplib one"),
        b"Subject: poplib and no final CRLF\r\n\r\n.starts with a dot\r\nend".to_vec(),
        "Subject: 8-bit for poplib\n\ngr\u{fc}\u{df}e\n".as_bytes().to_vec(),
    ];
    let ids: Vec<String> = raws.iter().map(|r| s.api.add(r)).collect();
    let uidls: Vec<String> = ids.iter().map(|id| uidl(id)).collect::<Vec<_>>();
    poplib_retrieves_and_deletes(s.gateway.addr, (DEVICE.0, DEVICE.1), &raws, &uidls);
    assert!(s.api.ids_in("inbox").is_empty(), "poplib's DELE + QUIT must empty the inbox");
    assert_eq!(s.api.ids_in("deleteditems"), ids);
}

/// Issue #19 item 2: Outlook runs up to 4 of a `$batch`'s requests at once,
/// each counted against the mailbox's 4 concurrent requests. A batch of 20
/// moves sent while another device of the same mailbox is downloading must
/// wait for 4 permits: otherwise its moves are refused (MailboxConcurrency)
/// round after round, and nothing is deleted.
#[test]
fn a_batch_waits_for_the_mailboxs_whole_concurrency() {
    let s = setup();
    let ids: Vec<String> = (1..=20).map(|i| s.api.add(&messages::simple(&format!("delete me {i}")))).collect();
    let mut pop = s.login();
    for n in 1..=20 {
        pop.ok(&format!("DELE {n}"));
    }
    // Another device's cold login measures 80 new messages, slowly.
    for i in 0..80 {
        s.api.add(&messages::simple(&format!("new {i}")));
    }
    let ms = Duration::from_millis;
    s.api.set_value_delays(&[ms(200), ms(350), ms(275), ms(425), ms(300)]);
    s.api.forget_seen();
    let addr = s.gateway.addr;
    let other = std::thread::spawn(move || {
        let mut pop = support::pop3::Pop3::login(addr, DEVICE.0, DEVICE.1);
        let stat = pop.stat();
        pop.quit();
        stat
    });
    support::wait_for("the other device measuring", IO_TIMEOUT, || {
        (s.api.seen().iter().filter(|r| r.path.ends_with("/$value")).count() >= 4).then_some(())
    });
    let reply = pop.quit();
    assert!(reply.starts_with("+OK"), "{reply}");
    assert_eq!(s.api.ids_in("deleteditems"), ids, "every message moved");
    assert_eq!(other.join().unwrap().0, 100, "listed before the moves");
    let refused: Vec<String> = s.api.seen().iter().filter(|r| r.status == 429).map(|r| r.path.clone()).collect();
    assert!(refused.is_empty(), "nothing refused for concurrency: {refused:?}");
    assert!(s.api.max_in_flight() <= 4, "{}", s.api.max_in_flight());
}

/// Issue #19 item 7: an app-only token (client credentials) cannot use
/// Graph's `/me` (400 "/me request is only valid with delegated
/// authentication flow", as the stand-in answers): check-config refuses the
/// combination and says which user to set.
#[test]
fn client_credentials_with_user_me_is_refused_by_check_config() {
    let config = |user: &str| {
        format!(
            r#"
[backend]
kind = "graph"
user = "{user}"

[token_store]
path = "/tmp/popgate-test-tokens.enc"
key_file = "/tmp/popgate-test-token.key"

[[account]]
name = "invoices"
mode = "mapped"
login = "{UPN}"

[account.oauth]
provider = "microsoft"
grant = "client_credentials"
client_id = "11111111-1111-1111-1111-111111111111"
tenant = "contoso.onmicrosoft.com"
client_secret_env = "POPGATE_TEST_UNUSED"

[[account.device]]
user = "invoice-scanner"
password_hash = "$argon2id$v=19$m=19456,t=2,p=1$dLybk+DCjPMqdEZMmKmc1g$ef2ohS1J+moDzc2CVjP8ysMdN9UUofaaC7bl978xGBI"
"#
        )
    };
    let refused = Config::from_toml(&config("me"), "test.toml").expect_err("refused");
    let text = refused.to_string();
    assert!(text.contains("client_credentials") && text.contains(&format!("user = \"{UPN}\"")), "{text}");
    Config::from_toml(&config(UPN), "test.toml").unwrap_or_else(|e| panic!("{e}"));
}

/// Graph's `$value` is a MIME conversion ("Outlook does not save messages
/// in MIME format"): a download may differ from the one LIST's size was
/// measured from. RETR never completes a message whose length disagrees
/// with LIST — no terminator, the connection closed, nothing deleted — and
/// the next session lists the size RETR now sends.
#[test]
fn a_message_converted_differently_is_never_sent_with_the_wrong_size() {
    let s = setup();
    let raw = messages::simple("converted twice");
    let id = s.api.add(&raw);
    let other = s.api.add(&messages::simple("unchanged"));
    s.api.reconvert_after_next_download(&id);
    let mut pop = s.login();
    let listed = pop.list_one(1);
    assert_eq!(listed, canonical(&raw).len() as u64, "measured from the first conversion");
    pop.ok("DELE 2");
    pop.send("RETR 1");
    let mut lines = Vec::new();
    while let Some(line) = pop.try_line_bytes() {
        lines.push(String::from_utf8_lossy(&line).into_owned());
    }
    assert!(!lines.iter().any(|l| l == "."), "no terminator after octets LIST did not promise: {lines:?}");
    assert_eq!(s.api.ids_in("inbox").len(), 2, "nothing deleted: the session never reached QUIT");

    let converted = [b"X-MS-Exchange-Converted: again\r\n".as_slice(), &raw].concat();
    let mut pop = s.login();
    assert_eq!(pop.list_one(1), canonical(&converted).len() as u64, "the size RETR sends now");
    assert_eq!(pop.retr(1), canonical(&converted));
    assert_eq!(pop.uidl_one(2), uidl(&other));
    assert!(pop.quit().starts_with("+OK"));
}

/// Graph's gateway answers 504 when converting a big message takes it
/// beyond ~30 s; `$value` cannot be resumed (no range requests are
/// documented). The policy: retried `max_retries` times, then that RETR is
/// `-ERR [SYS/TEMP]` and the session goes on.
#[test]
fn a_download_graph_keeps_timing_out_fails_that_retr_alone() {
    let s = setup_with(TokenKind::Delegated, |c| c.max_retries = 1);
    let raws = [messages::simple("huge, in spirit"), messages::simple("small")];
    for raw in &raws {
        s.api.add(raw);
    }
    let mut pop = s.login();
    for _ in 0..2 {
        s.api.throttle(Throttle { path_contains: "$value".into(), status: 504, retry_after: Some(1), in_batch: false });
    }
    let reply = pop.cmd("RETR 1");
    assert!(reply.starts_with("-ERR [SYS/TEMP]"), "{reply}");
    let statuses: Vec<u16> = s.api.seen().iter().filter(|r| r.path.ends_with("/$value")).map(|r| r.status).collect();
    assert_eq!(statuses[statuses.len() - 2..], [504, 504], "tried, then retried once");
    assert_eq!(pop.retr(2), canonical(&raws[1]), "the session goes on");
    assert!(pop.quit().starts_with("+OK"));
}

/// `sharing = "each_device_once"` knows a message by its Message-ID too
/// (Graph's `internetMessageId`): one that comes back from the archive
/// mailbox under a new immutable id — so a new UIDL — is not served again
/// to a device that already had it, while a device that never had it gets
/// it (docs/BACKENDS.md, docs/POLICIES.md).
#[test]
fn each_device_once_knows_a_message_back_from_the_archive_mailbox_by_its_message_id() {
    use popgate::auth::accounts::policy::{DevicePolicy, PolicyConfig};
    use popgate::auth::accounts::seen::{Seat, SeenStore};
    use popgate::auth::accounts::{Route, Router};
    use popgate::mail::{BackendError, Credentials};

    struct Seated {
        inner: Arc<TokenRouter>,
        policies: Vec<(String, DevicePolicy)>,
    }

    #[async_trait::async_trait]
    impl Router for Seated {
        async fn route(&self, client: &Credentials) -> Result<Route, BackendError> {
            let policy = self.policies.iter().find(|(d, _)| *d == client.user).ok_or(BackendError::AuthFailed)?;
            let device = Credentials::password(DEVICE.0, DEVICE.1);
            let mut route = self.inner.route(&Credentials { user: device.user, proof: client.proof.clone() }).await?;
            route.policy = policy.1.clone();
            Ok(route)
        }
        async fn refresh(&self, route: &Route) -> Result<Option<Credentials>, BackendError> {
            self.inner.refresh(route).await
        }
        fn accepts_bearer_tokens(&self) -> bool {
            false
        }
        fn primary_backend(&self) -> popgate::backend::SharedBackend {
            self.inner.primary_backend()
        }
    }

    let api = GraphApi::start();
    let backend = Arc::new(GraphBackend::new(config_for(&api)).unwrap_or_else(|e| panic!("{e}")));
    let (token, issuer) = (api.issue_token(TokenKind::Delegated), api.issuer(TokenKind::Delegated));
    let inner = TokenRouter::new(backend, DEVICE, UPN, token, issuer);
    let dir = tempfile::tempdir().unwrap();
    let records = SeenStore::file(dir.path().join("device-records.json"));
    let devices = ["printer".to_string(), "copier".to_string()];
    let policies = devices
        .iter()
        .map(|d| (d.clone(), PolicyConfig::default().resolve().seated(Seat::new(records.clone(), d.clone(), &devices))))
        .collect();
    let gateway = Gateway::routed(Config::default(), Arc::new(Seated { inner, policies }));

    let raws = [messages::simple("archived one"), messages::simple("two")];
    let ids: Vec<String> = raws.iter().map(|r| api.add(r)).collect();
    let mut pop = gateway.login("printer", DEVICE.1);
    assert_eq!(pop.stat().0, 2);
    assert_eq!(pop.retr(1), canonical(&raws[0]));
    assert_eq!(pop.retr(2), canonical(&raws[1]));
    assert!(pop.quit().starts_with("+OK"));

    let renamed = api.round_trip_through_archive_mailbox(&ids[0]);
    assert_ne!(uidl(&renamed), uidl(&ids[0]), "a new UIDL");
    let third = messages::simple("three");
    api.add(&third);
    let mut pop = gateway.login("printer", DEVICE.1);
    assert_eq!(pop.stat(), (1, canonical(&third).len() as u64), "only the new message: the renamed one was had");
    assert_eq!(pop.retr(1), canonical(&third));
    assert!(pop.quit().starts_with("+OK"));
    let mut pop = gateway.login("printer", DEVICE.1);
    assert_eq!(pop.stat().0, 0, "nothing again");
    assert!(pop.quit().starts_with("+OK"));

    let mut pop = gateway.login("copier", DEVICE.1);
    assert_eq!(pop.stat().0, 3, "the other device never had any of them");
    assert!(pop.quit().starts_with("+OK"));
    assert_eq!(api.ids_in("inbox").len(), 3, "nothing removed");
}
