//! Incremental listing on the HTTP backends (issue 14, target 5): a poll of
//! an unchanged mailbox costs one request, a poll after one new message at
//! most three, and every incremental listing is exactly what a full listing
//! gives (same ids, UIDLs, order, sizes) — after random sequences of
//! changes made elsewhere and by the gateway itself, and after the
//! provider forgot the cursor (the fallback to a full listing).
//!
//! Gmail and Graph run against the stand-ins (tests/support/gmail_api.rs,
//! graph_api.rs), which count every HTTP request; JMAP's `Email/changes`
//! against a real Cyrus, counted by a recording proxy.
//! A "poll" is what the gateway does with a warm backend session: `reset`,
//! then `list`. The full listing to compare with comes from a second
//! backend with `listing_state_messages = 0`, which never remembers.

mod support;

use popgate::backend::gmail::{GmailBackend, GmailConfig};
use popgate::backend::graph::{GraphBackend, GraphConfig};
use popgate::backend::{Backend, ListedMessage, Mailbox};
use popgate::mail::{Credentials, Proof, Secret, StoreId};
use proptest::prelude::*;
use support::bearer::BearerApi;
use support::gmail_api::{GmailApi, Scope};
use support::graph_api::{GraphApi, TokenKind};
use support::messages;

const ACCOUNT: &str = "alice@example.com";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn bearer(token: &str) -> Credentials {
    Credentials { user: ACCOUNT.into(), proof: Proof::Bearer(Secret::new(token)) }
}

/// What the gateway does with a warm session at a POP3 login.
async fn poll(mailbox: &mut Box<dyn Mailbox>) -> Vec<ListedMessage> {
    tokio::time::timeout(support::IO_TIMEOUT, async {
        mailbox.reset().await.expect("reset");
        mailbox.list().await.expect("list")
    })
    .await
    .expect("a poll in time")
}

/// What a warm poll costs a backend that remembers no listing state (the
/// behaviour before incremental listing): requests to the stand-in.
async fn full_poll_cost(backend: &dyn Backend, credentials: &Credentials, requests: impl Fn() -> usize) -> usize {
    let mut mailbox = backend.open(credentials).await.expect("open");
    mailbox.list().await.expect("list");
    let before = requests();
    poll(&mut mailbox).await;
    requests() - before
}

/// The figures `scripts/bench` reports (its `requests` phase runs these
/// tests and reads this line): requests per poll against the stand-in.
fn report(backend: &str, messages: usize, full: usize, unchanged: usize, one_new: usize) {
    println!(
        "requests-per-poll backend={backend} messages={messages} full={full} unchanged={unchanged} one_new={one_new}"
    );
}

/// A listing from scratch, by a backend that remembers nothing.
async fn full_listing(backend: &dyn Backend, credentials: &Credentials) -> Vec<ListedMessage> {
    tokio::time::timeout(support::IO_TIMEOUT, async {
        let mut mailbox = backend.open(credentials).await.expect("open");
        mailbox.list().await.expect("list")
    })
    .await
    .expect("a full listing in time")
}

// ---- Gmail ----------------------------------------------------------------

fn gmail(api: &GmailApi, remembered: u64) -> GmailBackend {
    GmailBackend::new(GmailConfig {
        api_base: api.base_url.clone(),
        max_retry_wait_secs: 5,
        listing_state_messages: remembered,
        ..GmailConfig::default()
    })
    .unwrap()
}

#[test]
fn gmail_an_unchanged_poll_of_5000_messages_costs_one_request() {
    let api = GmailApi::start();
    let token = api.issue_token(Scope::Full);
    let credentials = bearer(&token);
    for i in 0..5000 {
        api.add_with(b"Subject: x\r\n\r\nbody\r\n", 1_700_000_000_000 + i * 1000, &["INBOX"]);
    }
    let (incremental, full) = (gmail(&api, 1_000_000), gmail(&api, 0));
    runtime().block_on(async {
        let mut mailbox = incremental.open(&credentials).await.unwrap();
        let first = mailbox.list().await.unwrap();
        assert_eq!(first.len(), 5000);

        let before = api.requests();
        let again = poll(&mut mailbox).await;
        assert_eq!(api.requests() - before, 1, "an unchanged poll: users.history.list alone");
        assert_eq!(again, first);

        let new = api.add_with(&messages::simple("new"), 1_800_000_000_000, &["INBOX", "UNREAD"]);
        let before = api.requests();
        let listed = poll(&mut mailbox).await;
        let cost = api.requests() - before;
        assert!(cost <= 3, "a poll after one new message cost {cost} requests");
        assert_eq!(cost, 2, "users.history.list and one batch of format=minimal");
        assert_eq!(listed.last().map(|m| m.id.0.clone()), Some(new));
        assert_eq!(listed, full_listing(&full, &credentials).await);
        let before_state = full_poll_cost(&full, &credentials, || api.requests()).await;
        assert!(before_state > 3, "without state a poll lists every page: {before_state}");
        report("gmail", 5000, before_state, 1, cost);

        // Deleted elsewhere, archived elsewhere, and Gmail's history gone.
        api.delete(&first[10].id.0);
        api.relabel(&first[20].id.0, &[], &["INBOX"]);
        assert_eq!(poll(&mut mailbox).await, full_listing(&full, &credentials).await);
        api.expire_history();
        api.add(&messages::simple("after the history expired"));
        let before = api.requests();
        let listed = poll(&mut mailbox).await;
        assert!(api.requests() - before > 3, "a full listing (10 pages), not the history");
        assert_eq!(listed.len(), 5000);
        assert_eq!(listed, full_listing(&full, &credentials).await);
        let before = api.requests();
        poll(&mut mailbox).await;
        assert_eq!(api.requests() - before, 1, "and incremental again after it");
    });
}

/// Changes other Gmail clients (or the gateway) make between polls.
#[derive(Debug, Clone)]
enum Change {
    /// A message arrives, at this many seconds after the last (0: the same
    /// internalDate: the order then falls to the id).
    Arrive(u8),
    /// These labels instead of INBOX.
    ArriveElsewhere(&'static [&'static str]),
    /// Another client deletes the n-th listed message for good.
    Delete(usize),
    /// Another client archives it (removes INBOX).
    Archive(usize),
    /// Another client moves a message from elsewhere into INBOX.
    Unarchive(usize),
    /// Another client labels it SENT (it leaves the maildrop: -in:sent).
    MarkSent(usize),
    /// The gateway's own UPDATE removes the n-th listed message.
    RemoveHere(usize),
    /// Another client marks it read (a change that leaves it listed).
    Read(usize),
    /// The provider forgets the cursor.
    Expire,
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        3 => (0u8..3).prop_map(Change::Arrive),
        1 => prop_oneof![Just(&["SENT"][..]), Just(&["INBOX", "SENT"][..]), Just(&["INBOX", "TRASH"][..])]
            .prop_map(Change::ArriveElsewhere),
        1 => any::<usize>().prop_map(Change::Delete),
        1 => any::<usize>().prop_map(Change::Archive),
        1 => any::<usize>().prop_map(Change::Unarchive),
        1 => any::<usize>().prop_map(Change::MarkSent),
        1 => any::<usize>().prop_map(Change::RemoveHere),
        1 => any::<usize>().prop_map(Change::Read),
        1 => Just(Change::Expire),
    ]
}

fn pick(listed: &[ListedMessage], n: usize) -> Option<String> {
    (!listed.is_empty()).then(|| listed[n % listed.len()].id.0.clone())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    /// After any sequence of changes, each poll lists exactly what a full
    /// listing lists.
    #[test]
    fn gmail_incremental_listings_equal_full_listings(
        rounds in proptest::collection::vec(proptest::collection::vec(change(), 0..4), 1..8)
    ) {
        let api = GmailApi::start();
        let credentials = bearer(&api.issue_token(Scope::Full));
        let (incremental, full) = (gmail(&api, 1_000_000), gmail(&api, 0));
        let mut date = 1_700_000_000_000i64;
        for i in 0..5 {
            date += 1000;
            api.add_with(&messages::simple(&format!("start {i}")), date, &["INBOX"]);
        }
        runtime().block_on(async {
            let mut mailbox = incremental.open(&credentials).await.unwrap();
            let mut listed = mailbox.list().await.unwrap();
            for round in rounds {
                for change in round {
                    match change {
                        Change::Arrive(gap) => {
                            date += i64::from(gap) * 1000;
                            api.add_with(&messages::simple("arrived"), date, &["INBOX", "UNREAD"]);
                        }
                        Change::ArriveElsewhere(labels) => {
                            date += 1000;
                            api.add_with(&messages::simple("elsewhere"), date, labels);
                        }
                        Change::Delete(n) => {
                            if let Some(id) = pick(&listed, n) {
                                api.delete(&id);
                            }
                        }
                        Change::Archive(n) => {
                            if let Some(id) = pick(&listed, n) {
                                api.relabel(&id, &[], &["INBOX"]);
                            }
                        }
                        Change::Unarchive(n) => {
                            let all = api.all_ids();
                            if !all.is_empty() {
                                api.relabel(&all[n % all.len()], &["INBOX"], &["TRASH", "SENT"]);
                            }
                        }
                        Change::MarkSent(n) => {
                            if let Some(id) = pick(&listed, n) {
                                api.relabel(&id, &["SENT"], &[]);
                            }
                        }
                        Change::RemoveHere(n) => {
                            if let Some(id) = pick(&listed, n) {
                                mailbox.remove(&[StoreId(id)]).await.unwrap();
                            }
                        }
                        Change::Read(n) => {
                            if let Some(id) = pick(&listed, n) {
                                api.relabel(&id, &[], &["UNREAD"]);
                            }
                        }
                        Change::Expire => api.expire_history(),
                    }
                }
                listed = poll(&mut mailbox).await;
                let truth = full_listing(&full, &credentials).await;
                assert_eq!(listed, truth);
                assert_eq!(
                    listed.iter().map(|m| m.id.0.clone()).collect::<Vec<_>>(),
                    api.ids_with("INBOX").into_iter().filter(|id| {
                        let labels = api.labels_of(id).unwrap();
                        !labels.contains("SENT") && !labels.contains("TRASH") && !labels.contains("SPAM")
                    }).collect::<Vec<_>>(),
                    "the stand-in's own view"
                );
            }
        });
    }
}

#[test]
fn gmail_a_token_not_seen_before_is_checked_against_the_mailbox_first() {
    let api = GmailApi::start();
    for i in 0..3 {
        api.add(&messages::simple(&format!("m{i}")));
    }
    let backend = gmail(&api, 1_000_000);
    runtime().block_on(async {
        let mut first = backend.open(&bearer(&api.issue_token(Scope::Full))).await.unwrap();
        let listed = first.list().await.unwrap();
        // A refreshed token: one getProfile to see it reaches the same
        // mailbox, then the history as before.
        let mut second = backend.open(&bearer(&api.issue_token(Scope::Full))).await.unwrap();
        api.forget_seen();
        assert_eq!(second.list().await.unwrap(), listed);
        let paths: Vec<String> = api.seen().into_iter().map(|r| r.path).collect();
        assert_eq!(paths, ["/gmail/v1/users/me/profile", "/gmail/v1/users/me/history"]);
        api.forget_seen();
        assert_eq!(second.list().await.unwrap(), listed);
        let paths: Vec<String> = api.seen().into_iter().map(|r| r.path).collect();
        assert_eq!(paths, ["/gmail/v1/users/me/history"], "known now");
    });
}

#[test]
fn gmail_a_search_is_always_listed_in_full() {
    let api = GmailApi::start();
    api.add(&messages::simple("invoice 1"));
    let backend = GmailBackend::new(GmailConfig {
        api_base: api.base_url.clone(),
        query: Some("subject:invoice".into()),
        ..GmailConfig::default()
    })
    .unwrap();
    runtime().block_on(async {
        let mut mailbox = backend.open(&bearer(&api.issue_token(Scope::Full))).await.unwrap();
        assert_eq!(mailbox.list().await.unwrap().len(), 1);
        api.forget_seen();
        assert_eq!(poll(&mut mailbox).await.len(), 1);
        assert!(api.seen().iter().all(|r| !r.path.ends_with("/history")), "no history for a search");
        assert!(api.seen().iter().any(|r| r.path.ends_with("/messages")));
    });
}

// ---- Microsoft Graph --------------------------------------------------------

fn graph(api: &GraphApi, remembered: u64) -> GraphBackend {
    GraphBackend::new(GraphConfig {
        api_base: api.base_url.clone(),
        max_retry_wait_secs: 5,
        listing_state_messages: remembered,
        ..GraphConfig::default()
    })
    .unwrap()
}

#[test]
fn graph_an_unchanged_poll_of_5000_messages_costs_one_request() {
    let api = GraphApi::start();
    let credentials = bearer(&api.issue_token(TokenKind::Delegated));
    for i in 0..5000 {
        api.add_to("inbox", b"Subject: x\r\n\r\nbody\r\n", 1_700_000_000 + i);
    }
    let (incremental, full) = (graph(&api, 1_000_000), graph(&api, 0));
    runtime().block_on(async {
        let mut mailbox = incremental.open(&credentials).await.unwrap();
        let first = mailbox.list().await.unwrap();
        assert_eq!(first.len(), 5000);
        assert_eq!(first, full_listing(&full, &credentials).await, "a delta from scratch lists what $orderby does");

        let before = api.requests();
        let again = poll(&mut mailbox).await;
        assert_eq!(api.requests() - before, 1, "an unchanged poll: the delta link alone");
        assert_eq!(again, first);

        let new = api.add_to("inbox", &messages::simple("new"), 1_800_000_000);
        let before = api.requests();
        let listed = poll(&mut mailbox).await;
        assert_eq!(api.requests() - before, 1, "a poll after one new message: the delta link alone");
        assert_eq!(listed.last().map(|m| m.id.0.clone()), Some(new));
        assert_eq!(listed, full_listing(&full, &credentials).await);
        let before_state = full_poll_cost(&full, &credentials, || api.requests()).await;
        assert!(before_state > 3, "without state a poll lists every page: {before_state}");
        report("graph", 5000, before_state, 1, 1);

        api.delete(&first[10].id.0);
        api.move_message(&first[20].id.0, "archive");
        assert_eq!(poll(&mut mailbox).await, full_listing(&full, &credentials).await);
        api.expire_delta_links();
        api.add_to("inbox", &messages::simple("after the links expired"), 1_800_000_100);
        let before = api.requests();
        let listed = poll(&mut mailbox).await;
        assert!(api.requests() - before > 3, "410, then a delta from scratch (10 pages)");
        assert_eq!(listed.len(), 5000);
        assert_eq!(listed, full_listing(&full, &credentials).await);
        let before = api.requests();
        poll(&mut mailbox).await;
        assert_eq!(api.requests() - before, 1, "and incremental again after it");
    });
}

#[derive(Debug, Clone)]
enum FolderChange {
    /// A message arrives this many seconds after the last (0: a tie).
    Arrive(u8),
    Delete(usize),
    /// Another client moves the n-th listed message to the archive.
    MoveOut(usize),
    /// Another client moves a message from the archive into the inbox.
    MoveIn(usize),
    /// The message comes back from the archive mailbox with a new id.
    NewId(usize),
    /// The gateway's own UPDATE moves it to Deleted Items.
    RemoveHere(usize),
    Expire,
}

fn folder_change() -> impl Strategy<Value = FolderChange> {
    prop_oneof![
        3 => (0u8..3).prop_map(FolderChange::Arrive),
        1 => any::<usize>().prop_map(FolderChange::Delete),
        1 => any::<usize>().prop_map(FolderChange::MoveOut),
        1 => any::<usize>().prop_map(FolderChange::MoveIn),
        1 => any::<usize>().prop_map(FolderChange::NewId),
        1 => any::<usize>().prop_map(FolderChange::RemoveHere),
        1 => Just(FolderChange::Expire),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn graph_incremental_listings_equal_full_listings(
        rounds in proptest::collection::vec(proptest::collection::vec(folder_change(), 0..4), 1..8)
    ) {
        let api = GraphApi::start();
        let credentials = bearer(&api.issue_token(TokenKind::Delegated));
        let (incremental, full) = (graph(&api, 1_000_000), graph(&api, 0));
        let mut received = 1_700_000_000i64;
        for i in 0..5 {
            received += 60;
            api.add_to("inbox", &messages::simple(&format!("start {i}")), received);
            api.add_to("archive", &messages::simple(&format!("archived {i}")), received);
        }
        runtime().block_on(async {
            let mut mailbox = incremental.open(&credentials).await.unwrap();
            let mut listed = mailbox.list().await.unwrap();
            for round in rounds {
                for change in round {
                    match change {
                        FolderChange::Arrive(gap) => {
                            received += i64::from(gap);
                            api.add_to("inbox", &messages::simple("arrived"), received);
                        }
                        FolderChange::Delete(n) => {
                            if let Some(id) = pick(&listed, n).filter(|id| api.all_ids().contains(id)) {
                                api.delete(&id);
                            }
                        }
                        FolderChange::MoveOut(n) => {
                            if let Some(id) = pick(&listed, n).filter(|id| api.all_ids().contains(id)) {
                                api.move_message(&id, "archive");
                            }
                        }
                        FolderChange::MoveIn(n) => {
                            let archived = api.ids_in("archive");
                            if !archived.is_empty() {
                                api.move_message(&archived[n % archived.len()], "inbox");
                            }
                        }
                        FolderChange::NewId(n) => {
                            if let Some(id) = pick(&listed, n).filter(|id| api.all_ids().contains(id)) {
                                api.round_trip_through_archive_mailbox(&id);
                            }
                        }
                        FolderChange::RemoveHere(n) => {
                            if let Some(id) = pick(&listed, n).filter(|id| api.ids_in("inbox").contains(id)) {
                                mailbox.remove(&[StoreId(id)]).await.unwrap();
                            }
                        }
                        FolderChange::Expire => api.expire_delta_links(),
                    }
                }
                listed = poll(&mut mailbox).await;
                assert_eq!(listed, full_listing(&full, &credentials).await);
                let ids: Vec<String> = listed.iter().map(|m| m.id.0.clone()).collect();
                assert_eq!(ids, api.ids_in("inbox"), "the stand-in's own view");
            }
        });
    }
}

// ---- JMAP against Cyrus -----------------------------------------------------

/// HTTP requests popgate sent through `proxy`: one request line each
/// (a JSON body never holds a raw CRLF, and the next request follows its
/// body directly on the kept-alive connection).
fn http_requests(proxy: &support::proxy::RecordingProxy) -> usize {
    String::from_utf8_lossy(&proxy.sent()).matches(" HTTP/1.1\r\n").count()
}

/// The same target against a real Cyrus 3.6 JMAP server, its requests
/// counted by a recording proxy between popgate and Cyrus: a warm poll of
/// an unchanged mailbox is one request (`Email/changes` with the mailbox
/// check in the same request), a poll after one new message at most three,
/// and every listing equals a full one — also after a message destroyed
/// elsewhere. Cyrus is given small limits (20 objects per `Email/get`, 4
/// calls per request, as a large mailbox meets its defaults) so that a
/// full listing of 120 messages takes several requests.
#[test]
fn jmap_cyrus_an_unchanged_poll_of_120_messages_costs_one_request() {
    use popgate::backend::jmap::{JmapBackend, JmapConfig};
    use support::cyrus::Cyrus;
    const USER: &str = "alice";
    const PASSWORD: &str = "cyrus-alice-pw";
    let cyrus = Cyrus::start_with("jmap_max_objects_in_get: 20\njmap_max_calls_in_request: 4");
    cyrus.add_user(USER, PASSWORD);
    let ids: Vec<String> =
        (0..120).map(|i| cyrus.append(USER, &messages::simple(&format!("cyrus listing {i}")))).collect();
    let upstream = cyrus.backend_url().trim_start_matches("jmap+http://").parse().expect("Cyrus address");
    let proxy = support::proxy::RecordingProxy::start(upstream);
    let backend = |remembered: u64| {
        let mut config = JmapConfig::new(format!("http://{}", proxy.addr));
        config.listing_state_messages = remembered;
        JmapBackend::new(config).expect("JMAP backend")
    };
    let (incremental, full) = (backend(1_000_000), backend(0));
    let credentials = Credentials::password(USER, PASSWORD);
    runtime().block_on(async {
        let mut mailbox = incremental.open(&credentials).await.unwrap();
        let first = mailbox.list().await.unwrap();
        assert_eq!(first.len(), 120);

        let before = http_requests(&proxy);
        let again = poll(&mut mailbox).await;
        assert_eq!(http_requests(&proxy) - before, 1, "an unchanged poll: one request");
        assert_eq!(again, first);

        let new = cyrus.append(USER, &messages::simple("cyrus listing, new"));
        let before = http_requests(&proxy);
        let listed = poll(&mut mailbox).await;
        let cost = http_requests(&proxy) - before;
        assert!(cost <= 3, "a poll after one new message cost {cost} requests");
        assert_eq!(listed.len(), 121);
        assert!(listed.iter().any(|m| m.id.0 == new), "the new message is listed");
        assert_eq!(listed, full_listing(&full, &credentials).await);
        let before_state = full_poll_cost(&full, &credentials, || http_requests(&proxy)).await;
        assert!(before_state > 1, "without state a poll lists every page: {before_state}");
        report("jmap-cyrus", 120, before_state, 1, cost);

        // Destroyed by another client.
        cyrus.jmap(USER, serde_json::json!([["Email/set", {"accountId": USER, "destroy": [ids[7]]}, "0"]]));
        let listed = poll(&mut mailbox).await;
        assert_eq!(listed.len(), 120);
        assert!(!listed.iter().any(|m| m.id.0 == ids[7]));
        assert_eq!(listed, full_listing(&full, &credentials).await);
    });
}
