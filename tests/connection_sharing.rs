//! Backend connections shared across the POP3 sessions of an account
//! (src/backend/pool.rs), against a real Dovecot: a session holds an IMAP
//! connection only during a backend call, an account never has more open
//! than its cap, and sharing never touches a message the session did not
//! mark, nor one under another UIDVALIDITY. Everything is asserted by
//! counting (connections seen by a proxy, replies, messages left), never by
//! timing.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use popgate::backend::pool::PoolConfig;
use popgate::backend::select::BackendConfig;
use popgate::config::Config;
use support::dovecot::{ALICE, BOB, CAROL, DAVE, Dovecot};
use support::gateway::Gateway;
use support::messages::simple;
use support::pop3::Dialogue as _;
use support::pop3::Pop3;

/// A TCP proxy that counts the connections open through it at each moment
/// and the most ever open at once.
struct CountingProxy {
    addr: SocketAddr,
    counts: Arc<Counts>,
}

#[derive(Default)]
struct Counts {
    open: AtomicUsize,
    peak: AtomicUsize,
    total: AtomicUsize,
    stopping: AtomicBool,
}

impl CountingProxy {
    fn start(upstream: SocketAddr) -> CountingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let counts = Arc::new(Counts::default());
        let shared = counts.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if shared.stopping.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                // Counted from the moment popgate's connect is accepted
                // until both directions are closed.
                let now = shared.open.fetch_add(1, Ordering::SeqCst) + 1;
                shared.peak.fetch_max(now, Ordering::SeqCst);
                shared.total.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = TcpStream::connect(upstream) else {
                    shared.open.fetch_sub(1, Ordering::SeqCst);
                    continue;
                };
                let (client_in, server_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let done = Arc::new(AtomicUsize::new(0));
                for (from, to) in [(client_in, server_out), (server, client)] {
                    let (counts, done) = (shared.clone(), done.clone());
                    std::thread::spawn(move || {
                        pump(from, to);
                        if done.fetch_add(1, Ordering::SeqCst) == 1 {
                            counts.open.fetch_sub(1, Ordering::SeqCst);
                        }
                    });
                }
            }
        });
        CountingProxy { addr, counts }
    }

    fn open(&self) -> usize {
        self.counts.open.load(Ordering::SeqCst)
    }

    fn peak(&self) -> usize {
        self.counts.peak.load(Ordering::SeqCst)
    }

    fn total(&self) -> usize {
        self.counts.total.load(Ordering::SeqCst)
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.counts.stopping.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

/// popgate in front of `backend` (an IMAP address) with this pool.
fn gateway(backend: SocketAddr, pool: PoolConfig) -> Gateway {
    let mut config = Config {
        backend: BackendConfig::from_url(&format!("imap://{backend}")).unwrap_or_else(|e| panic!("{e}")),
        backend_pool: pool,
        ..Config::default()
    };
    // Hundreds of sessions from one test address.
    config.limits.max_connections_per_address = 10_000;
    Gateway::from_config(config)
}

/// Waits (bounded) until `done` holds.
fn eventually(what: &str, limit: Duration, done: impl Fn() -> bool) {
    let until = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < until, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn doveadm(dovecot: &Dovecot, args: &[&str]) {
    let config = dovecot.dir().join("dovecot.conf");
    let out =
        Command::new("doveadm").arg("-c").arg(&config).args(args).output().unwrap_or_else(|e| panic!("doveadm: {e}"));
    assert!(out.status.success(), "doveadm {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Target 4 of issue 14: 50 sessions of one account at once against a
/// Dovecot that allows 10 connections per user and address. Every session
/// is served (STAT, RETR of every message, QUIT), none gets `[IN-USE]`,
/// and the proxy never sees more than 10 connections open at once.
#[test]
fn fifty_sessions_of_one_account_share_at_most_ten_connections() {
    const SESSIONS: usize = 50;
    const MESSAGES: usize = 3;
    let dovecot = Dovecot::start_with_userip_limit(&[ALICE], 10);
    let messages: Vec<Vec<u8>> = (1..=MESSAGES).map(|i| simple(&format!("shared-{i}"))).collect();
    dovecot.append_all(ALICE.0, &messages);
    let proxy = CountingProxy::start(dovecot.imap_addr());
    let gateway = gateway(proxy.addr, PoolConfig::default());
    let addr = gateway.addr;
    let start = Arc::new(Barrier::new(SESSIONS));
    let sessions: Vec<_> = (0..SESSIONS)
        .map(|_| {
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                let mut c = Pop3::connect(addr);
                let reply = c.cmd(&format!("USER {}", ALICE.0));
                assert!(reply.starts_with("+OK"), "{reply}");
                let reply = c.cmd(&format!("PASS {}", ALICE.1));
                if !reply.starts_with("+OK") {
                    return Err(reply);
                }
                let (count, _) = c.stat();
                let mut retrieved = 0;
                for n in 1..=count as u32 {
                    let reply = c.cmd(&format!("RETR {n}"));
                    if !reply.starts_with("+OK") {
                        return Err(reply);
                    }
                    let body = c.body();
                    assert!(String::from_utf8_lossy(&body).contains(&format!("shared-{n}")));
                    retrieved += 1;
                }
                let reply = c.quit();
                assert!(reply.starts_with("+OK"), "{reply}");
                Ok(retrieved)
            })
        })
        .collect();
    let results: Vec<Result<usize, String>> = sessions.into_iter().map(|t| t.join().expect("session thread")).collect();
    let refused: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(refused.is_empty(), "{} of {SESSIONS} sessions refused: {refused:?}", refused.len());
    let served = results.iter().filter(|r| matches!(r, Ok(n) if *n == MESSAGES)).count();
    assert_eq!(served, SESSIONS, "every session retrieved every message");
    assert!(proxy.peak() <= 10, "{} connections open at once to a Dovecot allowing 10", proxy.peak());
    assert!(proxy.peak() <= PoolConfig::default().max_connections_per_account);
    assert!(!dovecot.log().contains("Maximum number of connections"), "Dovecot refused a connection");
    // Shared, not one per session: far fewer backend logins than sessions.
    assert!(proxy.total() < SESSIONS, "{} backend connections for {SESSIONS} sessions", proxy.total());
}

/// Target 4: idle authenticated sessions hold no backend connection; what
/// stays open is the idle pool, at most `max_per_account` per account.
#[test]
fn idle_authenticated_sessions_hold_no_backend_connection() {
    const SESSIONS: usize = 500;
    let users = [ALICE, BOB, CAROL, DAVE];
    let dovecot = Dovecot::start_with_users(&users);
    for (user, _) in users {
        dovecot.append(user, &simple(&format!("for {user}")));
    }
    let proxy = CountingProxy::start(dovecot.imap_addr());
    let pool = PoolConfig::default();
    let gateway = gateway(proxy.addr, pool.clone());
    let mut idle = Vec::new();
    for i in 0..SESSIONS {
        let (user, password) = users[i % users.len()];
        let mut c = Pop3::login(gateway.addr, user, password);
        assert_eq!(c.stat().0, 1);
        idle.push(c);
        assert!(proxy.open() <= users.len() * pool.max_connections_per_account);
    }
    // Connections given back beyond `max_per_account` close as soon as no
    // session of the account waits: what stays is the idle pool.
    let kept = users.len() * pool.max_per_account;
    eventually("idle pool settles", Duration::from_secs(30), || proxy.open() <= kept);
    assert!(proxy.peak() <= users.len() * pool.max_connections_per_account, "peak {}", proxy.peak());
    // And every one of those sessions still works.
    for mut c in idle.drain(..).step_by(50) {
        assert!(String::from_utf8_lossy(&c.retr(1)).contains("for "));
        c.quit();
    }
    assert!(proxy.open() <= kept, "{} open after the retrievals", proxy.open());
}

/// Two sessions of one account deleting different messages, interleaved on
/// shared connections: each QUIT removes exactly its own marked UIDs.
#[test]
fn two_sessions_delete_exactly_their_own_marked_messages() {
    let dovecot = Dovecot::start_with_users(&[ALICE]);
    let messages: Vec<Vec<u8>> = (1..=5).map(|i| simple(&format!("mark-{i}"))).collect();
    let uids = dovecot.append_all(ALICE.0, &messages);
    // Another client's \Deleted flag must survive both UPDATEs.
    dovecot.flag_deleted(ALICE.0, uids[4]);
    let proxy = CountingProxy::start(dovecot.imap_addr());
    let gateway = gateway(proxy.addr, PoolConfig { max_connections_per_account: 1, ..PoolConfig::default() });
    let mut first = gateway.login(ALICE.0, ALICE.1);
    let mut second = gateway.login(ALICE.0, ALICE.1);
    assert_eq!(first.stat().0, 5);
    assert_eq!(second.stat().0, 5);
    first.ok("DELE 1");
    second.ok("DELE 2");
    first.ok("DELE 3");
    assert!(String::from_utf8_lossy(&second.retr(4)).contains("mark-4"));
    let reply = first.quit();
    assert!(reply.contains("2 messages deleted"), "{reply}");
    assert_eq!(dovecot.uids(ALICE.0), vec![uids[1], uids[3], uids[4]]);
    let reply = second.quit();
    assert!(reply.contains("1 messages deleted"), "{reply}");
    assert_eq!(dovecot.uids(ALICE.0), vec![uids[3], uids[4]], "only the marked UIDs are gone");
    assert_eq!(proxy.peak(), 1, "both sessions on the account's one connection");
    assert_eq!(proxy.total(), 1);
}

/// A UIDVALIDITY change between login and RETR: the RETR fails with a
/// temporary error and QUIT deletes nothing, whichever connection the
/// session is given.
#[test]
fn a_uidvalidity_change_fails_retrieval_cleanly_and_deletes_nothing() {
    let dovecot = Dovecot::start_with_users(&[ALICE]);
    let messages: Vec<Vec<u8>> = (1..=3).map(|i| simple(&format!("valid-{i}"))).collect();
    dovecot.append_all(ALICE.0, &messages);
    let before = dovecot.uidvalidity(ALICE.0);
    let gateway = gateway(dovecot.imap_addr(), PoolConfig::default());
    let mut c = gateway.login(ALICE.0, ALICE.1);
    assert_eq!(c.stat().0, 3);
    c.ok("DELE 1");
    // Recreate the view: a new UIDVALIDITY for the same mailbox, as after
    // the mailbox was deleted and created again.
    let changed = (before + 1000).to_string();
    doveadm(&dovecot, &["mailbox", "update", "-u", ALICE.0, "--uid-validity", &changed, "INBOX"]);
    assert_ne!(dovecot.uidvalidity(ALICE.0), before);
    let left = dovecot.uids(ALICE.0);
    let reply = c.cmd("RETR 2");
    assert!(reply.starts_with("-ERR"), "RETR under another UIDVALIDITY: {reply}");
    let reply = c.quit();
    assert!(reply.starts_with("-ERR"), "UPDATE under another UIDVALIDITY: {reply}");
    assert_eq!(dovecot.uids(ALICE.0), left, "nothing deleted");
    assert_eq!(left.len(), 3);
    // The next session lists afresh and works.
    let mut c = gateway.login(ALICE.0, ALICE.1);
    assert_eq!(c.stat().0, 3);
    assert!(String::from_utf8_lossy(&c.retr(2)).contains("valid-2"));
    c.quit();
}

/// `reuse_check = "noop"` (issue 14, target 3: a cheaper refresh of a warm
/// connection): a login that reuses the account's idle connection sends
/// NOOP instead of SELECT, and still sees every change another client made
/// in between — a new message, an expunged one, and a new UIDVALIDITY
/// (Dovecot ends the session with BYE, so the login opens a fresh
/// connection and lists under the new UIDVALIDITY). Counted in what a
/// recording proxy saw popgate send.
#[test]
fn a_noop_refreshed_connection_sees_every_change_made_meanwhile() {
    let dovecot = Dovecot::start_with_users(&[ALICE]);
    let uids = dovecot.append_all(ALICE.0, &[simple("noop-1"), simple("noop-2")]);
    let proxy = support::proxy::RecordingProxy::start(dovecot.imap_addr());
    let mut config = Config {
        backend: BackendConfig::from_url(&format!("imap://{}", proxy.addr)).unwrap_or_else(|e| panic!("{e}")),
        ..Config::default()
    };
    let BackendConfig::Imap(imap) = &mut config.backend else { unreachable!() };
    imap.reuse_check = popgate::backend::imap::ReuseCheck::Noop;
    let gateway = Gateway::from_config(config);
    let commands = |word: &str| {
        let sent = String::from_utf8_lossy(&proxy.sent()).into_owned();
        sent.lines().filter(|line| line.split(' ').nth(1) == Some(word)).count()
    };

    let mut c = gateway.login(ALICE.0, ALICE.1);
    assert_eq!(c.stat().0, 2);
    c.quit();
    assert_eq!((commands("SELECT"), commands("NOOP")), (1, 0), "the first login SELECTs");

    // A new message, delivered by another client while the connection idles.
    dovecot.append(ALICE.0, &simple("noop-3"));
    let mut c = gateway.login(ALICE.0, ALICE.1);
    assert_eq!(c.stat().0, 3, "the NOOP reported the new message");
    assert!(String::from_utf8_lossy(&c.retr(3)).contains("noop-3"));
    c.quit();
    assert_eq!((commands("SELECT"), commands("NOOP")), (1, 1), "reused with a NOOP, not a SELECT");
    assert_eq!(proxy.connections(), 1);

    // A message expunged by another client.
    doveadm(&dovecot, &["expunge", "-u", ALICE.0, "mailbox", "INBOX", "uid", &uids[0].to_string()]);
    let mut c = gateway.login(ALICE.0, ALICE.1);
    assert_eq!(c.stat().0, 2, "the NOOP reported the expunge");
    assert!(String::from_utf8_lossy(&c.retr(1)).contains("noop-2"));
    c.quit();
    assert_eq!(commands("NOOP"), 2);

    // A new UIDVALIDITY: never listed under the old one.
    let before = dovecot.uidvalidity(ALICE.0);
    let changed = before + 1000;
    doveadm(&dovecot, &["mailbox", "update", "-u", ALICE.0, "--uid-validity", &changed.to_string(), "INBOX"]);
    let mut c = gateway.login(ALICE.0, ALICE.1);
    let uidls = c.uidl();
    assert_eq!(uidls.len(), 2);
    for (_, uidl) in &uidls {
        assert!(uidl.ends_with(&format!("{changed:08x}")), "listed under the new UIDVALIDITY: {uidl}");
    }
    assert!(String::from_utf8_lossy(&c.retr(2)).contains("noop-3"));
    c.ok("DELE 1");
    let reply = c.quit();
    assert!(reply.starts_with("+OK"), "{reply}");
    assert_eq!(dovecot.uids(ALICE.0).len(), 1, "exactly the marked message removed");
    // Dovecot answered the NOOP with `BYE IMAP session state is
    // inconsistent, please relogin`: the connection was discarded and the
    // login made on a new one (its SELECT; the UPDATE SELECTs again).
    assert_eq!(proxy.connections(), 2, "a fresh connection after the BYE");
    assert_eq!((commands("NOOP"), commands("SELECT")), (3, 3));
}
