//! The fault matrix (issue #12): popgate in front of a real Dovecot (IMAP)
//! and a real Cyrus (JMAP), with a fault proxy (tests/support/fault_proxy.rs)
//! between popgate and the store that stalls, resets or truncates one
//! backend connection in one phase of a POP3 session:
//!
//! | phase | IMAP (Dovecot) | JMAP (Cyrus) |
//! |---|---|---|
//! | login | the tagged reply to LOGIN | the session resource (`GET /jmap`) |
//! | listing | `UID FETCH 1:* (UID RFC822.SIZE)` | `Email/query` + `Email/get` |
//! | exact sizing | `UID FETCH … (UID BODY.PEEK[])`, in a literal | the first blob download |
//! | RETR start, middle, end (5 MiB) | the RETR's one streamed `BODY.PEEK[]` literal: 1 000 octets in, 2 MiB + 500 000 octets in, 40 octets before its end | the RETR's download: 1 000 octets in, half, 40 octets before the end |
//! | UPDATE between STORE and EXPUNGE | the reply to `UID STORE … \Deleted` | does not apply: one `Email/set` moves the messages, there is no step between |
//! | UPDATE, EXPUNGE sent, reply lost | the reply to `UID EXPUNGE` | the reply to `Email/set` |
//!
//! × stall past popgate's backend timeout (5 s here), reset (RST), truncate
//! (a clean FIN at that octet). The command that triggers a fault always
//! reaches the server and completes there: only its reply is lost.
//!
//! Every cell checks: every command gets a well-formed status line (a
//! close without one fails the cell: before any of a reply is sent, popgate
//! can always still say -ERR); a RETR whose +OK went out either ends with
//! the terminating dot and is the whole message, or the connection is
//! closed cleanly (a FIN) without the dot; nothing that was not marked is gone from the
//! store (looked at directly, not through popgate); an `+OK` to QUIT means
//! the marked messages are really gone; and a fresh session afterwards,
//! through the same popgate without a fault, lists exactly what the store
//! holds (for Dovecot: exactly what Dovecot's own POP3 lists).
//!
//! A `-ERR` to QUIT while the marked messages are in fact gone (the EXPUNGE
//! or Email/set completed, its reply was lost) is accepted: RFC 1939's
//! `-ERR` to QUIT says "some deleted messages not removed", a warning, not a
//! promise that none were; the next session shows the truth. The reverse,
//! `+OK` with a marked message still there, fails the cell.
//!
//! One test per store runs its cells, six at a time (one user, proxy and
//! popgate per cell, one server), prints the table of outcomes (run with
//! `--no-capture` to see it; docs/RELIABILITY.md has it) and fails naming
//! every failing cell. `FAULT_CELLS=retr-middle` runs only the cells whose
//! name contains that text.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::panic::AssertUnwindSafe;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use popgate::backend::select::BackendConfig;
use popgate::config::Config;
use support::cyrus::Cyrus;
use support::dovecot::Dovecot;
use support::fault_proxy::{Fault, FaultProxy, Plan, Trigger};
use support::gateway::Gateway;
use support::messages::{big, canonical, simple};
use support::pop3::Pop3;

/// popgate's backend timeout in every cell: a stall lasts longer. Generous
/// enough for a loaded Dovecot's greeting (2 s was not, with the whole
/// suite running on two cores).
const BACKEND_TIMEOUT_SECS: u64 = 5;
/// Cells run at the same time.
const PARALLEL_CELLS: usize = 6;
/// The longest the POP3 client waits for any reply (a generous bound over
/// the backend timeout: waiting longer is a hang).
const CLIENT_WAIT: Duration = Duration::from_secs(30);
/// 1 MiB (the RETR-middle fault lands 2 MiB + 500 000 octets into the
/// message, where it did when RETR was read in 1 MiB partial FETCHes).
const CHUNK: u64 = 1 << 20;
const PASSWORD: &str = "matrix-pw";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    Dovecot,
    Cyrus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Login,
    Listing,
    Sizing,
    RetrStart,
    RetrMiddle,
    RetrEnd,
    UpdateStore,
    UpdateExpunge,
}

const PHASES: [Phase; 8] = [
    Phase::Login,
    Phase::Listing,
    Phase::Sizing,
    Phase::RetrStart,
    Phase::RetrMiddle,
    Phase::RetrEnd,
    Phase::UpdateStore,
    Phase::UpdateExpunge,
];
/// The delay stays well under the gateway's 5 s backend timeout: a slow
/// backend must make no difference at all.
const FAULTS: [Fault; 4] = [Fault::Stall, Fault::Reset, Fault::Truncate, Fault::Delay(Duration::from_secs(1))];

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Login => "login",
            Phase::Listing => "listing",
            Phase::Sizing => "sizing",
            Phase::RetrStart => "retr-start",
            Phase::RetrMiddle => "retr-middle",
            Phase::RetrEnd => "retr-end",
            Phase::UpdateStore => "update-store",
            Phase::UpdateExpunge => "update-expunge",
        }
    }

    fn retr(self) -> bool {
        matches!(self, Phase::RetrStart | Phase::RetrMiddle | Phase::RetrEnd)
    }

    fn update(self) -> bool {
        matches!(self, Phase::UpdateStore | Phase::UpdateExpunge)
    }
}

fn fault_name(fault: Fault) -> &'static str {
    match fault {
        Fault::Stall => "stall",
        Fault::Reset => "reset",
        Fault::Truncate => "truncate",
        Fault::Delay(_) => "delay",
    }
}

/// The server of one matrix, shared by its cells (one user each).
enum Server {
    Dovecot(Dovecot),
    Cyrus(Cyrus),
}

impl Server {
    fn addr(&self) -> SocketAddr {
        match self {
            Server::Dovecot(d) => d.imap_addr(),
            Server::Cyrus(c) => c.http,
        }
    }

    /// Stores the messages for `user`; their ids (UID or Email id), in order.
    fn seed(&self, user: &str, messages: &[Vec<u8>]) -> Vec<String> {
        match self {
            Server::Dovecot(d) => d.append_all(user, messages).iter().map(u32::to_string).collect(),
            Server::Cyrus(c) => {
                c.add_user(user, PASSWORD);
                messages.iter().map(|m| c.append(user, m)).collect()
            }
        }
    }

    /// The ids in the maildrop now, seen directly.
    fn present(&self, user: &str) -> Vec<String> {
        match self {
            Server::Dovecot(d) => d.uids(user).iter().map(u32::to_string).collect(),
            Server::Cyrus(c) => c.ids_in(user, "Inbox"),
        }
    }

    /// Messages anywhere in the account (the trash policy destroys nothing).
    fn total(&self, user: &str) -> usize {
        match self {
            Server::Dovecot(d) => d.uids(user).len(),
            Server::Cyrus(c) => c.emails(user).len(),
        }
    }

    /// What a correct POP3 UIDL lists: Dovecot's own POP3 UIDL; for JMAP
    /// the Email ids.
    fn uidl_truth(&self, user: &str) -> Vec<String> {
        match self {
            Server::Dovecot(d) => d.pop3_uidl(user).into_iter().map(|(_, u)| u).collect(),
            Server::Cyrus(c) => c.ids_in(user, "Inbox"),
        }
    }

    fn blob_of(&self, user: &str, id: &str) -> String {
        match self {
            Server::Cyrus(c) => c.emails(user).into_iter().find(|e| e.id == id).expect("seeded email").blob_id,
            Server::Dovecot(_) => unreachable!("IMAP has no blobs"),
        }
    }

    fn gateway(&self, proxy: SocketAddr) -> Gateway {
        let mut backend = match self {
            Server::Dovecot(_) => BackendConfig::from_url(&format!("imap://{proxy}")),
            Server::Cyrus(_) => BackendConfig::from_url(&format!("jmap+http://{proxy}")),
        }
        .expect("backend URL");
        match &mut backend {
            BackendConfig::Imap(imap) => imap.timeout_secs = BACKEND_TIMEOUT_SECS,
            BackendConfig::Jmap(jmap) => jmap.timeout_secs = BACKEND_TIMEOUT_SECS,
            _ => unreachable!(),
        }
        Gateway::from_config(Config { backend, ..Config::default() })
    }
}

/// Where the fault hits, or why the phase does not apply to the store.
fn trigger_for(store: Store, phase: Phase, big: &[u8], big_blob: Option<&str>) -> Result<Trigger, &'static str> {
    let size = big.len() as u64;
    Ok(match (store, phase) {
        // The tagged reply to LOGIN, 5 octets in.
        (Store::Dovecot, Phase::Login) => Trigger::after_client(b" LOGIN ", 1, 5),
        (Store::Dovecot, Phase::Listing) => Trigger::after_client(b"UID FETCH 1:* (UID RFC822.SIZE)", 1, 20),
        (Store::Dovecot, Phase::Sizing) => Trigger::after_client(b"(UID BODY.PEEK[])", 1, 10).then_server(b"}\r\n"),
        // At login, the small messages were measured in one FETCH and the
        // big one in a second (streamed); the third is the RETR, one
        // literal, faulted that many octets after its announcement.
        (Store::Dovecot, Phase::RetrStart) => {
            Trigger::after_client(b"(UID BODY.PEEK[])", 3, 1000).then_server(b"}\r\n")
        }
        (Store::Dovecot, Phase::RetrMiddle) => {
            Trigger::after_client(b"(UID BODY.PEEK[])", 3, 2 * CHUNK + 500_000).then_server(b"}\r\n")
        }
        (Store::Dovecot, Phase::RetrEnd) => {
            Trigger::after_client(b"(UID BODY.PEEK[])", 3, size - 40).then_server(b"}\r\n")
        }
        (Store::Dovecot, Phase::UpdateStore) => Trigger::after_client(b"UID STORE", 1, 0),
        (Store::Dovecot, Phase::UpdateExpunge) => Trigger::after_client(b"UID EXPUNGE", 1, 0),
        (Store::Cyrus, Phase::Login) => Trigger::after_client(b"GET /jmap HTTP", 1, 20),
        (Store::Cyrus, Phase::Listing) => Trigger::after_client(b"Email/query", 1, 30),
        (Store::Cyrus, Phase::Sizing) => Trigger::after_client(b"GET /jmap/download/", 1, 10).then_server(b"\r\n\r\n"),
        (Store::Cyrus, Phase::RetrStart | Phase::RetrMiddle | Phase::RetrEnd) => {
            let octets = match phase {
                Phase::RetrStart => 1000,
                Phase::RetrMiddle => size / 2,
                _ => size - 40,
            };
            // The blob's first download measured it at login.
            Trigger::after_client(big_blob.expect("blob id").as_bytes(), 2, octets).then_server(b"\r\n\r\n")
        }
        (Store::Cyrus, Phase::UpdateStore) => {
            return Err("JMAP has no STORE/EXPUNGE split: one Email/set moves the messages");
        }
        (Store::Cyrus, Phase::UpdateExpunge) => Trigger::after_client(b"Email/set", 1, 0),
    })
}

/// What one cell saw.
struct Outcome {
    name: String,
    /// How the fault hit (`None`: not applicable, with the reason in `client`).
    fired: Option<String>,
    /// What the POP3 client saw.
    client: Vec<String>,
    /// What the store held afterwards.
    store: String,
    problems: Vec<String>,
}

#[test]
fn dovecot_imap_fault_matrix() {
    let users: Vec<(String, String)> =
        (0..PHASES.len() * FAULTS.len()).map(|i| (format!("cell{i:02}"), PASSWORD.to_string())).collect();
    let refs: Vec<(&str, &str)> = users.iter().map(|(u, p)| (u.as_str(), p.as_str())).collect();
    run_matrix(Store::Dovecot, Server::Dovecot(Dovecot::start_with_users(&refs)));
}

#[test]
fn cyrus_jmap_fault_matrix() {
    run_matrix(Store::Cyrus, Server::Cyrus(Cyrus::start()));
}

/// One cell of the matrix, its user's mail stored.
struct Cell {
    name: String,
    user: String,
    phase: Phase,
    fault: Fault,
    /// What was stored (CRLF), in order, and the ids the store gave it.
    messages: Vec<Vec<u8>>,
    ids: Vec<String>,
}

fn run_matrix(store: Store, server: Server) {
    let big = canonical(&big(5));
    let filter = std::env::var("FAULT_CELLS").unwrap_or_default();
    let started = Instant::now();
    // Seeded one after the other: Cyrus creates accounts (and their sasldb
    // entries) badly in parallel.
    let mut cells = Vec::new();
    for (p, &phase) in PHASES.iter().enumerate() {
        for (f, &fault) in FAULTS.iter().enumerate() {
            let store_name = if store == Store::Dovecot { "imap" } else { "jmap" };
            let name = format!("{store_name}/{}/{}", phase.name(), fault_name(fault));
            if !name.contains(&filter) {
                continue;
            }
            let user = format!("cell{:02}", p * FAULTS.len() + f);
            let mut messages: Vec<Vec<u8>> =
                (1..=3).map(|i| canonical(&simple(&format!("{user} message {i}")))).collect();
            if phase.retr() {
                messages.push(big.clone());
            }
            let ids = match trigger_for(store, phase, &big, Some("")) {
                Ok(_) => server.seed(&user, &messages),
                Err(_) => Vec::new(),
            };
            cells.push(Cell { name, user, phase, fault, messages, ids });
        }
    }
    let seeded = started.elapsed();
    // A few cells at a time: all at once, on a 2-core machine running the
    // rest of the suite, make the servers slower than any sane timeout.
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Outcome>>> = Mutex::new(cells.iter().map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..PARALLEL_CELLS {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(cell) = cells.get(i) else { return };
                    let ran = std::panic::catch_unwind(AssertUnwindSafe(|| run_cell(store, &server, cell, &big)));
                    let outcome = ran.unwrap_or_else(|panic| {
                        let why = panic
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default();
                        Outcome {
                            name: String::new(),
                            fired: None,
                            client: vec![],
                            store: String::new(),
                            problems: vec![format!("panicked: {why}")],
                        }
                    });
                    results.lock().unwrap()[i] = Some(outcome);
                }
            });
        }
    });
    let outcomes: Vec<Outcome> = results
        .into_inner()
        .unwrap()
        .into_iter()
        .zip(&cells)
        .map(|(outcome, cell)| Outcome { name: cell.name.clone(), ..outcome.expect("every cell ran") })
        .collect();
    assert!(!outcomes.is_empty(), "FAULT_CELLS={filter:?} matches no cell");

    println!(
        "\n{} cells in {:.1} s (mail stored in {:.1} s)\n",
        outcomes.len(),
        started.elapsed().as_secs_f64(),
        seeded.as_secs_f64()
    );
    println!("| cell | fault | POP3 client saw | store afterwards | verdict |");
    println!("|---|---|---|---|---|");
    for o in &outcomes {
        let verdict = if o.problems.is_empty() { "ok".to_string() } else { format!("FAIL: {}", o.problems.join("; ")) };
        println!(
            "| {} | {} | {} | {} | {} |",
            o.name,
            o.fired.as_deref().unwrap_or("-"),
            o.client.join(" → "),
            o.store,
            verdict
        );
    }
    let failed: Vec<String> = outcomes
        .iter()
        .filter(|o| !o.problems.is_empty())
        .map(|o| format!("{}: {}", o.name, o.problems.join("; ")))
        .collect();
    assert!(failed.is_empty(), "{} of {} cells failed:\n{}", failed.len(), outcomes.len(), failed.join("\n"));
}

fn run_cell(store: Store, server: &Server, cell: &Cell, big: &[u8]) -> Outcome {
    let Cell { user, phase, fault, messages, ids, .. } = cell;
    let (user, phase, fault) = (user.as_str(), *phase, *fault);
    let mut outcome =
        Outcome { name: String::new(), fired: None, client: Vec::new(), store: String::new(), problems: Vec::new() };
    let blob = (store == Store::Cyrus && phase.retr()).then(|| server.blob_of(user, &ids[3]));
    let trigger = match trigger_for(store, phase, big, blob.as_deref()) {
        Err(why) => {
            outcome.client.push(format!("does not apply: {why}"));
            outcome.store = "-".into();
            return outcome;
        }
        Ok(trigger) => trigger,
    };
    let proxy = FaultProxy::start(server.addr(), Some(Plan { trigger, fault }));
    let gateway = server.gateway(proxy.addr);

    // Messages 1 and 3 are marked in the UPDATE cells.
    let mut marked: Vec<usize> = Vec::new();
    let mut quit_said_ok = None;
    let mut pop = Client::connect(gateway.addr);
    match pop.status(&format!("USER {user}")) {
        Reply::Ok(_) => {}
        other => outcome.problems.push(format!("USER: {}", other.describe())),
    }
    let pass = pop.status(&format!("PASS {PASSWORD}"));
    match (&pass, phase) {
        (Reply::Ok(_), Phase::Login | Phase::Listing | Phase::Sizing) => {
            // The fault did not stop the login: what it says must be true.
            outcome.client.push("PASS +OK".into());
            let want = (messages.len(), messages.iter().map(|m| m.len() as u64).sum::<u64>());
            match pop.status("STAT") {
                Reply::Ok(line) if line == format!("+OK {} {}", want.0, want.1) => {}
                other => outcome.problems.push(format!("STAT after +OK login: {}", other.describe())),
            }
        }
        (Reply::Ok(_), _) => {}
        (Reply::Err(line), _) => {
            outcome.client.push(format!("PASS {line}"));
            if line.contains("[AUTH]") {
                outcome.problems.push("a backend fault answered as wrong credentials ([AUTH])".into());
            }
            if !matches!(phase, Phase::Login | Phase::Listing | Phase::Sizing) {
                outcome.problems.push("the login failed before the fault's phase".into());
            }
        }
        (other, _) => {
            outcome.client.push(format!("PASS: {}", other.describe()));
            no_reply(&mut outcome, other);
        }
    }
    if pass.is_ok() && phase.retr() {
        match pop.status("RETR 4") {
            Reply::Ok(_) => {
                let body = pop.body();
                match (&body.ending, body.octets == big) {
                    (None, true) => outcome.client.push("RETR +OK, the whole message".into()),
                    (None, false) => {
                        outcome.client.push(format!("RETR +OK, {} octets and the terminating dot", body.octets.len()));
                        outcome.problems.push(format!(
                            "RETR ended with the terminating dot after {} of {} octets (or other octets)",
                            body.octets.len(),
                            big.len()
                        ));
                    }
                    (Some(ending), _) => {
                        outcome.client.push(format!("RETR +OK, {} octets, then {ending:?}", body.octets.len()));
                        if *ending != Ending::Closed {
                            outcome.problems.push(format!("RETR's connection ended by {ending:?}, not closed"));
                        }
                    }
                }
            }
            Reply::Err(line) => outcome.client.push(format!("RETR {line}")),
            other => {
                outcome.client.push(format!("RETR: {}", other.describe()));
                no_reply(&mut outcome, &other);
            }
        }
    }
    if pass.is_ok() && phase.update() {
        for n in [1, 3] {
            match pop.status(&format!("DELE {n}")) {
                Reply::Ok(_) => marked.push(n - 1),
                other => outcome.problems.push(format!("DELE {n}: {}", other.describe())),
            }
        }
    }
    if pop.open() {
        match pop.status("QUIT") {
            Reply::Ok(line) => {
                quit_said_ok = Some(true);
                if phase.update() {
                    outcome.client.push(format!("QUIT {line}"));
                }
            }
            Reply::Err(line) => {
                quit_said_ok = Some(false);
                outcome.client.push(format!("QUIT {line}"));
            }
            other => {
                outcome.client.push(format!("QUIT: {}", other.describe()));
                no_reply(&mut outcome, &other);
            }
        }
        if pop.open() && !pop.closes() {
            outcome.problems.push("the connection stayed open after the reply to QUIT".into());
        }
    }
    outcome.fired = proxy.fired();
    if outcome.fired.is_none() {
        outcome.problems.push("the fault never fired: its trigger is wrong".into());
    }

    // The store, seen directly: nothing unmarked lost, +OK QUIT was true.
    let present = server.present(user);
    let gone: Vec<usize> = (0..ids.len()).filter(|&i| !present.contains(&ids[i])).collect();
    for &i in &gone {
        if !marked.contains(&i) {
            outcome.problems.push(format!("message {} was lost (it was not marked)", i + 1));
        }
    }
    if store == Store::Cyrus && server.total(user) != ids.len() {
        outcome.problems.push("the account holds a different number of messages than was stored".into());
    }
    if let Fault::Delay(_) = fault {
        // Slow, not broken: the session must go as if nothing happened.
        if let Some(error) = outcome.client.iter().find(|line| line.contains("-ERR") || line.contains(": ")) {
            outcome.problems.push(format!("a delay within the timeout failed the session: {error}"));
        }
        if phase.retr() && !outcome.client.iter().any(|line| line == "RETR +OK, the whole message") {
            outcome.problems.push("a delay within the timeout cut RETR short".into());
        }
        if quit_said_ok != Some(true) || gone != marked {
            outcome.problems.push(format!("a delay within the timeout: QUIT {quit_said_ok:?}, gone {gone:?}"));
        }
    }
    if phase.update() && quit_said_ok == Some(true) && gone != marked {
        outcome.problems.push(format!("+OK to QUIT, yet messages {gone:?} (0-based) are gone instead of {marked:?}"));
    }
    outcome.store = if gone.is_empty() {
        "all there".into()
    } else {
        format!("{} gone", gone.iter().map(|i| format!("#{}", i + 1)).collect::<Vec<_>>().join(", "))
    };

    // A fresh session through the same popgate (the proxy passes now) sees
    // the truth.
    let truth = server.uidl_truth(user);
    let mut fresh = Pop3::login(gateway.addr, user, PASSWORD);
    let uidl: Vec<String> = fresh.uidl().into_iter().map(|(_, u)| u).collect();
    if uidl != truth {
        outcome.problems.push(format!("the next session lists {uidl:?}, the store holds {truth:?}"));
    }
    let want_sizes: Vec<u64> = (0..ids.len()).filter(|i| !gone.contains(i)).map(|i| messages[i].len() as u64).collect();
    let sizes: Vec<u64> = fresh.list().into_iter().map(|(_, s)| s).collect();
    if sizes != want_sizes {
        outcome.problems.push(format!("the next session's LIST {sizes:?}, want {want_sizes:?}"));
    }
    let small: Vec<usize> = (0..3).filter(|i| !gone.contains(i)).collect();
    for (n, &i) in small.iter().enumerate() {
        if fresh.retr(n as u32 + 1) != messages[i] {
            outcome.problems.push(format!("the next session's RETR {} differs from message {}", n + 1, i + 1));
        }
    }
    let bye = fresh.quit();
    if !bye.starts_with("+OK") {
        outcome.problems.push(format!("the next session's QUIT: {bye}"));
    }
    drop(gateway);
    outcome
}

/// Every command gets a status line: before popgate has sent any of a
/// reply it can always still answer -ERR (only a RETR whose +OK and octets
/// went out may end by a close, without the terminating dot).
fn no_reply(outcome: &mut Outcome, reply: &Reply) {
    outcome.problems.push(format!("no well-formed reply: {}", reply.describe()));
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// A FIN.
    Closed,
    /// An RST (or another error).
    Reset,
    /// Nothing within `CLIENT_WAIT`.
    Hung,
}

#[derive(Debug)]
enum Reply {
    Ok(String),
    Err(String),
    /// A line that is neither (or not ended by CRLF before the close).
    Malformed(String),
    Gone(Ending),
}

impl Reply {
    fn is_ok(&self) -> bool {
        matches!(self, Reply::Ok(_))
    }

    fn describe(&self) -> String {
        match self {
            Reply::Ok(line) | Reply::Err(line) => line.clone(),
            Reply::Malformed(line) => format!("malformed {line:?}"),
            Reply::Gone(ending) => format!("no reply ({ending:?})"),
        }
    }
}

struct Body {
    /// The message octets (un-stuffed, CRLF line ends), as far as they came.
    octets: Vec<u8>,
    /// `None`: the terminating dot came.
    ending: Option<Ending>,
}

/// A POP3 client that reports how a connection ended instead of panicking
/// (the support client treats every surprise as a test failure).
struct Client {
    stream: TcpStream,
    buffer: Vec<u8>,
    /// Where the unread part of `buffer` starts.
    start: usize,
    ended: Option<Ending>,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect to popgate");
        stream.set_read_timeout(Some(CLIENT_WAIT)).expect("read timeout");
        let mut client = Client { stream, buffer: Vec::new(), start: 0, ended: None };
        let greeting = client.line();
        assert!(matches!(&greeting, Ok(g) if g.starts_with(b"+OK")), "greeting: {greeting:?}");
        client
    }

    fn open(&self) -> bool {
        self.ended.is_none()
    }

    /// Sends a command and reads its status line.
    fn status(&mut self, command: &str) -> Reply {
        if let Some(ending) = self.ended {
            return Reply::Gone(ending);
        }
        if self.stream.write_all(format!("{command}\r\n").as_bytes()).is_err() {
            self.ended = Some(Ending::Reset);
            return Reply::Gone(Ending::Reset);
        }
        match self.line() {
            Ok(line) => {
                let text = String::from_utf8_lossy(&line).into_owned();
                if line.len() > 512 {
                    Reply::Malformed(text)
                } else if text == "+OK" || text.starts_with("+OK ") {
                    Reply::Ok(text)
                } else if text == "-ERR" || text.starts_with("-ERR ") {
                    Reply::Err(text)
                } else {
                    Reply::Malformed(text)
                }
            }
            Err((partial, _)) if !partial.is_empty() => Reply::Malformed(String::from_utf8_lossy(&partial).into()),
            Err((_, ending)) => Reply::Gone(ending),
        }
    }

    /// The rest of a multi-line reply, up to the terminating dot or the end
    /// of the connection.
    fn body(&mut self) -> Body {
        let mut octets = Vec::new();
        loop {
            match self.line() {
                Ok(line) if line == b"." => return Body { octets, ending: None },
                Ok(line) => {
                    octets.extend_from_slice(line.strip_prefix(b".").unwrap_or(&line));
                    octets.extend_from_slice(b"\r\n");
                }
                Err((partial, ending)) => {
                    octets.extend_from_slice(&partial);
                    return Body { octets, ending: Some(ending) };
                }
            }
        }
    }

    /// The server closes the connection now (after QUIT's reply).
    fn closes(&mut self) -> bool {
        matches!(self.line(), Err((partial, Ending::Closed)) if partial.is_empty())
    }

    /// One line without its CRLF, or what came of it before the end.
    fn line(&mut self) -> Result<Vec<u8>, (Vec<u8>, Ending)> {
        loop {
            let unread = &self.buffer[self.start..];
            if let Some(end) = unread.windows(2).position(|w| w == b"\r\n") {
                let line = unread[..end].to_vec();
                self.start += end + 2;
                if self.start > 1 << 20 {
                    self.buffer.drain(..self.start);
                    self.start = 0;
                }
                return Ok(line);
            }
            if let Some(ending) = self.ended {
                let rest = self.buffer.split_off(self.start);
                self.buffer.clear();
                self.start = 0;
                return Err((rest, ending));
            }
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => self.ended = Some(Ending::Closed),
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    self.ended = Some(Ending::Hung)
                }
                Err(_) => self.ended = Some(Ending::Reset),
            }
        }
    }
}
