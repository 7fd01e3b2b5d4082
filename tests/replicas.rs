//! Three popgate replicas (separate `popgate serve` processes) behind a real
//! haproxy (round-robin, TCP), sharing one Redis (`[state] url`), in front
//! of the OAuth stand-in and a Dovecot whose oauth2 passdb asks it about
//! every token — all on loopback ports chosen at run time.
//!
//! Proven by counting, never by timing:
//! - many devices' sessions, spread over all three replicas, across several
//!   token expiries: exactly one refresh per expiry (the stand-in counts
//!   them, and rotates refresh tokens, so a second refresher would get
//!   `invalid_grant`), every refresh succeeded, every session was served;
//! - Redis killed while sessions run, then restarted: every session served
//!   on the token each replica holds, the token record intact (same
//!   version), and the next expiry again refreshed exactly once;
//! - Redis down when a token expires: nobody refreshes (no lock, no
//!   refresh), the devices get `-ERR [SYS/TEMP]`; once Redis is back, one
//!   refresh and service resumes; the stored refresh token is the live one;
//! - Redis killed while a refresh is in flight (the stand-in holds the
//!   token request open): the refresher keeps the rotated token unused until
//!   Redis is back, stores it then; exactly one refresh, no `invalid_grant`,
//!   every replica reads the same record, nothing deleted;
//! - a refresh failing on one replica (the token endpoint answers 500):
//!   the others wait out the same `retry_after_failure_secs` instead of
//!   calling the endpoint themselves (one call in all, counted by the
//!   stand-in), then one refresh serves everybody;
//! - a replica killed (SIGKILL) after DELEs and before or during QUIT: only
//!   messages the session marked may be gone, and another replica's session
//!   sees what Dovecot holds.

mod support;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use popgate::auth::passwords::{SecretSource, hash_password};
use popgate::auth::tokens::{EncryptedFileStore, SharedTokenStore, StoreKey, StoredToken, TokenStore, unix_now};
use popgate::mail::Secret;
use popgate::state::StateConfig;
use support::dovecot::Dovecot;
use support::gateway::GatewayProcess;
use support::haproxy::Haproxy;
use support::messages::simple;
use support::oauth_server::{CLIENT_SECRET, Fault, OAuthServer, http_get};
use support::pop3::Dialogue as _;
use support::pop3::Pop3;
use support::redis::Redis;
use support::{IO_TIMEOUT, Signal, send_signal, wait_for};

const ALICE: (&str, &str) = ("alice", "alice-imap-password");
const DEVICES: usize = 6;
/// Sessions at once: within Dovecot's 10 connections per user and address.
const PARALLEL: usize = 6;
const RECORD: &str = "popgate:token:5:scans";

fn device(i: usize) -> (String, String) {
    (format!("printer-{i}"), format!("password of printer {i}"))
}

fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(future)
}

struct World {
    idp: OAuthServer,
    dovecot: Dovecot,
    redis: Redis,
    dir: tempfile::TempDir,
    replicas: Vec<GatewayProcess>,
    balancer: Haproxy,
}

impl World {
    fn start() -> World {
        World::start_with(1)
    }

    /// With `retry_after_failure_secs` for the account's refreshes.
    fn start_with(retry_after_failure_secs: u64) -> World {
        let idp = OAuthServer::start(ALICE.0);
        let dovecot = Dovecot::start_oauth(&idp.url("/introspect"), &[ALICE], "plain login xoauth2 oauthbearer");
        dovecot.append(ALICE.0, &simple("scan 1"));
        dovecot.append(ALICE.0, &simple("scan 2"));
        let redis = Redis::start_persistent();
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("token.key");
        std::fs::write(&key, format!("{}\n", StoreKey::generate_text())).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let secret = dir.path().join("client-secret");
        std::fs::write(&secret, format!("{CLIENT_SECRET}\n")).unwrap();

        // The token the deployment starts from, already expired: it is in
        // the token file, which seeds the shared store on first use.
        let (access, refresh) = idp.issue(ALICE.0);
        let seeded = StoredToken {
            access_token: Secret::new(&access),
            refresh_token: Some(Secret::new(&refresh)),
            expires_at: Some(unix_now() - 5),
            obtained_at: unix_now() - 3600,
            scope: None,
        };
        let file_key = StoreKey::read(&SecretSource::File(key.clone())).unwrap();
        block_on(EncryptedFileStore::new(dir.path().join("tokens.enc"), file_key).save("scans", &seeded)).unwrap();

        let devices: String = (0..DEVICES)
            .map(|i| {
                let (user, password) = device(i);
                format!(
                    "[[account.device]]\nuser = \"{user}\"\npassword_hash = \"{}\"\n",
                    hash_password(&password).unwrap()
                )
            })
            .collect();
        let config = format!(
            r#"
[backend]
kind = "imap"
host = "127.0.0.1"
port = {port}
tls = "none"
timeout_secs = 10

# Every session logs in at Dovecot with the token (no warm sessions), so
# every session tests the token.
[backend_pool]
enabled = false

[state]
url = "{redis}"
retry_after_secs = 1
command_timeout_ms = 1000
token_lock_secs = 30
token_wait_ms = 5000

[token_store]
path = "{store}"
key_file = "{key}"

[[account]]
name = "scans"
mode = "mapped"
login = "{alice}"

[account.oauth]
provider = "generic"
client_id = "popgate-test-client"
client_secret_file = "{secret}"
authorization_url = "{idp}/authorize"
token_url = "{idp}/token"
scopes = ["mail"]
redirect_uri = "http://127.0.0.1/callback"
retry_after_failure_secs = {retry_after_failure_secs}
timeout_secs = 10

{devices}
"#,
            port = dovecot.imap_port,
            redis = redis.url(),
            store = dir.path().join("tokens.enc").display(),
            key = key.display(),
            secret = secret.display(),
            alice = ALICE.0,
            idp = format!("http://{}", idp.addr),
        );
        let path = dir.path().join("popgate.toml");
        std::fs::write(&path, config).unwrap();
        // Refreshes take a while, so that replicas really overlap.
        idp.set_delay(Duration::from_millis(300));
        let replicas: Vec<GatewayProcess> =
            (0..3).map(|_| GatewayProcess::start(&["--config", path.to_str().unwrap()])).collect();
        let addrs: Vec<SocketAddr> = replicas.iter().map(|r| r.addr).collect();
        let balancer = Haproxy::round_robin(&addrs);
        World { idp, dovecot, redis, dir, replicas, balancer }
    }

    /// What the shared store holds, decrypted with the token store's key.
    fn stored(&self) -> StoredToken {
        let config = StateConfig { url: Some(self.redis.url()), ..Default::default() };
        let shared = config.open().unwrap().unwrap();
        let key = StoreKey::read(&SecretSource::File(self.dir.path().join("token.key"))).unwrap();
        let store = SharedTokenStore::new(shared, key, &config, None);
        block_on(store.load("scans")).unwrap().expect("a token in the shared store")
    }

    fn version(&self) -> String {
        self.redis.command(&["HGET", RECORD, "v"])
    }

    /// Successful refreshes, over all replicas' metrics; panics on any
    /// refresh that failed (an `invalid_grant` would show here).
    fn refreshes_ok(&self) -> usize {
        let mut ok = 0;
        for replica in &self.replicas {
            let (status, _, body) = http_get(&format!("http://{}/metrics", replica.admin_addr));
            assert_eq!(status, 200, "{body}");
            for line in body.lines().filter(|l| l.starts_with("popgate_oauth_refreshes_total{")) {
                let count: usize = line.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as usize;
                if line.contains("result=\"ok\"") {
                    ok += count;
                } else {
                    assert_eq!(count, 0, "a refresh that did not succeed: {line}\n{}", replica.log());
                }
            }
        }
        ok
    }

    /// Refreshes by result (`ok`, `invalid_grant`, `store_failed`, …),
    /// summed over all replicas' metrics.
    fn refresh_results(&self) -> std::collections::BTreeMap<String, usize> {
        let mut results = std::collections::BTreeMap::new();
        for replica in &self.replicas {
            let (status, _, body) = http_get(&format!("http://{}/metrics", replica.admin_addr));
            assert_eq!(status, 200, "{body}");
            for line in body.lines().filter(|l| l.starts_with("popgate_oauth_refreshes_total{")) {
                let count = line.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as usize;
                let result = line.split("result=\"").nth(1).and_then(|r| r.split('"').next()).unwrap();
                *results.entry(result.to_string()).or_insert(0) += count;
            }
        }
        results.retain(|_, count| *count > 0);
        results
    }

    /// POP3 sessions served by `replica`, from its metrics.
    fn sessions_on(&self, replica: usize) -> usize {
        let (_, _, body) = http_get(&format!("http://{}/metrics", self.replicas[replica].admin_addr));
        body.lines()
            .filter(|l| l.starts_with("popgate_logins_total{") && l.contains("result=\"success\""))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as usize)
            .sum()
    }
}

/// One device's poll: login, STAT, UIDL, RETR, QUIT.
fn poll(addr: SocketAddr, device_number: usize) {
    let (user, password) = device(device_number);
    let mut pop = Pop3::login(addr, &user, &password);
    let stat = pop.ok("STAT");
    assert!(stat.starts_with("+OK 2 "), "{user}: {stat}");
    pop.ok("UIDL");
    let _ = pop.body_text();
    pop.ok("RETR 1");
    let body = pop.body_text();
    assert!(body.iter().any(|l| l.contains("scan 1")), "{user}: {body:?}");
    pop.ok("QUIT");
}

/// `poll`, but a refusal is returned instead of panicking: `Err(reply)`.
fn try_poll(addr: SocketAddr, device_number: usize) -> Result<(), String> {
    let (user, password) = device(device_number);
    let mut pop = Pop3::connect(addr);
    pop.ok(&format!("USER {user}"));
    let reply = pop.cmd(&format!("PASS {password}"));
    if !reply.starts_with("+OK") {
        return Err(reply);
    }
    let stat = pop.ok("STAT");
    assert!(stat.starts_with("+OK 2 "), "{user}: {stat}");
    pop.ok("RETR 1");
    let body = pop.body_text();
    assert!(body.iter().any(|l| l.contains("scan 1")), "{user}: {body:?}");
    pop.ok("QUIT");
    Ok(())
}

/// `try_poll` where only `-ERR [SYS/TEMP]` may refuse; whether it served.
fn poll_or_come_back_later(addr: SocketAddr, device_number: usize) -> bool {
    match try_poll(addr, device_number) {
        Ok(()) => true,
        Err(reply) => {
            assert!(reply.starts_with("-ERR [SYS/TEMP]"), "a refusal other than come-back-later: {reply}");
            false
        }
    }
}

/// `sessions` polls through `addr`, `PARALLEL` at a time; panics (with the
/// device's reply) unless every one was served.
fn round(addr: SocketAddr, sessions: usize) {
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..PARALLEL)
        .map(|_| {
            let next = next.clone();
            std::thread::spawn(move || {
                loop {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    if n >= sessions {
                        return;
                    }
                    poll(addr, n % DEVICES);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().expect("a session was not served");
    }
}

/// The stand-in refuses a freshly refreshed token's refusal for
/// `retry_after_failure_secs` (1 s): let that pass before the next expiry.
fn next_expiry(world: &World) {
    std::thread::sleep(Duration::from_millis(1_500));
    world.idp.expire_all_access_tokens();
}

fn assert_no_token_in(text: &str, world: &World, what: &str) {
    for token in world.idp.all_tokens() {
        assert!(!text.contains(&token), "a token in {what}");
    }
}

#[test]
fn replicas_behind_haproxy_refresh_once_per_expiry_and_survive_redis_going_away() {
    let mut world = World::start();
    let front = world.balancer.addr;

    // Three expiries (the seeded token was already expired), each met by
    // 18 sessions of six devices through the balancer.
    for expiry in 1..=3 {
        if expiry > 1 {
            next_expiry(&world);
        }
        round(front, 18);
        assert_eq!(world.idp.refreshes(), expiry, "grants: {:?}", world.idp.grants());
        assert_eq!(world.refreshes_ok(), expiry);
    }
    for replica in 0..3 {
        assert!(world.sessions_on(replica) >= 3, "replica {replica} served too few sessions");
    }
    let rotated = world.stored();
    assert!(world.idp.refresh_active(rotated.refresh_token.as_ref().unwrap().expose()));
    let record = world.redis.command(&["HGET", RECORD, "b"]);
    assert_no_token_in(&record, &world, "the shared store");
    // Every replica holds the current token (each served sessions since).
    for replica in &world.replicas {
        poll(replica.addr, 0);
    }

    // Redis killed while sessions run, then restarted: nothing is lost.
    let version = world.version();
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..3)
        .map(|w| {
            let (stop, served) = (stop.clone(), served.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    poll(front, w);
                    served.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    wait_for("sessions before the kill", IO_TIMEOUT, || (served.load(Ordering::SeqCst) >= 6).then_some(()));
    world.redis.stop();
    let before_restart = served.load(Ordering::SeqCst);
    wait_for("sessions while Redis is down", IO_TIMEOUT, || {
        (served.load(Ordering::SeqCst) >= before_restart + 9).then_some(())
    });
    world.redis.restart();
    let after_restart = served.load(Ordering::SeqCst);
    wait_for("sessions after the restart", IO_TIMEOUT, || {
        (served.load(Ordering::SeqCst) >= after_restart + 6).then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    for worker in workers {
        worker.join().expect("a session failed while Redis was down or restarting");
    }
    assert_eq!(world.version(), version, "the token record survived the restart unchanged");
    assert_eq!(world.stored(), rotated);
    assert_eq!(world.idp.refreshes(), 3, "no refresh without need");

    // The next expiry after the restart: one refresh again.
    next_expiry(&world);
    round(front, 12);
    assert_eq!(world.idp.refreshes(), 4, "grants: {:?}", world.idp.grants());
    assert_eq!(world.refreshes_ok(), 4);

    // Redis down when the token expires: nobody may refresh (nobody can
    // take the lock), so the device is told to come back later.
    for replica in &world.replicas {
        poll(replica.addr, 1);
    }
    world.redis.stop();
    next_expiry(&world);
    for replica in &world.replicas {
        let (user, password) = device(2);
        let mut pop = Pop3::connect(replica.addr);
        pop.ok(&format!("USER {user}"));
        let reply = pop.cmd(&format!("PASS {password}"));
        assert!(reply.starts_with("-ERR [SYS/TEMP]"), "{reply}");
    }
    assert_eq!(world.idp.refreshes(), 4, "no refresh while Redis is down");
    world.redis.restart();
    // `retry_after_secs`: the replicas ask the store again a second later.
    std::thread::sleep(Duration::from_millis(1_500));
    round(front, 12);
    assert_eq!(world.idp.refreshes(), 5, "grants: {:?}", world.idp.grants());
    assert_eq!(world.refreshes_ok(), 5);
    let last = world.stored();
    assert!(world.idp.refresh_active(last.refresh_token.as_ref().unwrap().expose()));
    assert!(world.idp.access_active(last.access_token.expose()));
    assert_eq!(world.dovecot.messages(ALICE.0).len(), 2, "nothing deleted");

    for replica in &world.replicas {
        let log = replica.log();
        assert_no_token_in(&log, &world, "a replica's log");
        let outages = log.matches("shared state store unavailable: this replica").count();
        assert!((1..=2).contains(&outages), "one line per outage (two outages), not one per login:\n{log}");
    }
}

#[test]
fn redis_killed_during_a_refresh_loses_no_rotation_and_refreshes_once() {
    let mut world = World::start();
    let front = world.balancer.addr;
    // The seeded token is expired: one refresh, then every replica holds
    // the refreshed token.
    round(front, 6);
    assert_eq!(world.idp.refreshes(), 1, "grants: {:?}", world.idp.grants());
    for replica in &world.replicas {
        poll(replica.addr, 0);
    }
    let version_before: u64 = world.version().parse().unwrap();

    // The token expires; replica 0's next login refreshes, and the stand-in
    // holds that refresh open while Redis is killed.
    next_expiry(&world);
    world.idp.hold_refreshes();
    let refresher = world.replicas[0].addr;
    let first = std::thread::spawn(move || try_poll(refresher, 1));
    wait_for("a refresh held open by the stand-in", IO_TIMEOUT, || (world.idp.refreshes_held() == 1).then_some(()));
    world.redis.stop();
    world.idp.release_refreshes();
    // The rotated token cannot be stored: the device is told to come back,
    // the new token is not used (the old refresh token is already dead).
    if let Err(reply) = first.join().expect("the first session") {
        assert!(reply.starts_with("-ERR [SYS/TEMP]"), "{reply}");
    }
    assert_eq!(world.idp.refreshes(), 2);
    // Meanwhile the other replicas cannot take the lock: nobody refreshes.
    for replica in &world.replicas[1..] {
        assert!(!poll_or_come_back_later(replica.addr, 2), "served on a token Dovecot refuses?");
    }
    assert_eq!(world.idp.refreshes(), 2, "no refresh while Redis is down");

    world.redis.restart();
    // `retry_after_secs`: the replicas ask the store again a second later.
    std::thread::sleep(Duration::from_millis(1_500));
    // Service resumes: the refresher stores the token it kept, the others
    // read it (any of them may first answer "come back later" while the
    // refresher has not yet been asked for a login).
    let mut served = [false; 3];
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while served.iter().any(|s| !s) {
        assert!(std::time::Instant::now() < deadline, "service did not resume: {served:?}");
        for (i, replica) in world.replicas.iter().enumerate() {
            served[i] |= poll_or_come_back_later(replica.addr, i);
        }
    }
    round(front, 9);

    assert_eq!(world.idp.refreshes(), 2, "exactly one refresh for the expiry: {:?}", world.idp.grants());
    let results = world.refresh_results();
    assert_eq!(results.get("ok"), Some(&1), "{results:?}");
    assert_eq!(results.get("invalid_grant"), None, "{results:?}");
    assert!(results.keys().all(|r| r == "ok" || r == "store_failed"), "{results:?}");
    let version_after: u64 = world.version().parse().unwrap();
    assert_eq!(version_after, version_before + 1, "one write: the refreshed token");
    let stored = world.stored();
    assert!(world.idp.refresh_active(stored.refresh_token.as_ref().unwrap().expose()), "the live refresh token");
    assert!(world.idp.access_active(stored.access_token.expose()));
    // Every replica reads the same record (each serves on it, directly).
    for replica in &world.replicas {
        poll(replica.addr, 3);
    }
    assert_eq!(world.idp.refreshes(), 2);
    assert_eq!(world.dovecot.messages(ALICE.0).len(), 2, "nothing deleted");
    for replica in &world.replicas {
        assert_no_token_in(&replica.log(), &world, "a replica's log");
    }
}

#[test]
fn a_replica_killed_mid_session_deletes_nothing_unmarked() {
    let world = World::start();
    let front = world.balancer.addr;
    round(front, 3);
    let (user, password) = device(0);
    let before = world.dovecot.uids(ALICE.0);
    assert_eq!(before.len(), 2);

    // DELE both, then the replica dies before QUIT: nothing was committed.
    let mut pop = Pop3::login(world.replicas[0].addr, &user, &password);
    let uidls = pop.uidl();
    pop.ok("DELE 1");
    pop.ok("DELE 2");
    assert!(send_signal(world.replicas[0].pid(), Signal::Kill));
    pop.expect_closed();
    let after = world.dovecot.messages(ALICE.0);
    assert_eq!(after.iter().map(|m| m.uid).collect::<Vec<_>>(), before, "nothing deleted");
    assert!(after.iter().all(|m| !m.is_deleted()), "no \\Deleted flag without QUIT: {after:?}");
    // Another replica's session sees both, under the same UIDLs.
    let mut pop = Pop3::login(world.replicas[1].addr, &user, &password);
    assert_eq!(pop.stat().0, 2);
    assert_eq!(pop.uidl(), uidls);
    pop.ok("QUIT");

    // DELE 1 only, QUIT sent and the replica killed at once: message 1 may
    // be gone (if the UPDATE ran) or not, message 2 must stay.
    let mut pop = Pop3::login(world.replicas[1].addr, &user, &password);
    pop.ok("DELE 1");
    pop.send("QUIT");
    assert!(send_signal(world.replicas[1].pid(), Signal::Kill));
    drop(pop);
    let after = world.dovecot.messages(ALICE.0);
    let live: Vec<u32> = after.iter().filter(|m| !m.is_deleted()).map(|m| m.uid).collect();
    assert!(live.contains(&before[1]), "the unmarked message survived: {after:?}");
    assert!(after.iter().all(|m| m.uid == before[1] || m.uid == before[0]), "{after:?}");
    // The surviving replica's session sees what Dovecot holds, message 2
    // always, under its UIDL.
    let mut pop = Pop3::login(world.replicas[2].addr, &user, &password);
    let seen = pop.uidl();
    // (A message the dying UPDATE flagged but did not expunge may or may
    // not be listed; it was marked, so its loss would be no violation.)
    assert!(seen.len() == live.len() || seen.len() == after.len(), "{seen:?} vs {after:?}");
    assert!(seen.iter().any(|(_, uidl)| *uidl == uidls[1].1), "{seen:?}");
    pop.ok("QUIT");
    assert_eq!(world.dovecot.uids(ALICE.0).len(), after.len(), "the last session deleted nothing");
}

#[test]
fn a_failed_refresh_holds_off_every_replica_for_the_same_backoff() {
    const BACKOFF_SECS: u64 = 8;
    let world = World::start_with(BACKOFF_SECS);
    let front = world.balancer.addr;
    // The seeded token is expired; the token endpoint is down.
    world.idp.inject(&[Fault::ServerError; 6]);
    for i in 0..9 {
        assert!(!poll_or_come_back_later(front, i % DEVICES), "served without a token?");
    }
    for replica in &world.replicas {
        assert!(!poll_or_come_back_later(replica.addr, 0));
    }
    assert_eq!(world.idp.refreshes(), 1, "one call for all replicas: {:?}", world.idp.grants());
    let results = world.refresh_results();
    assert_eq!(results.values().sum::<usize>(), 1, "{results:?}");
    assert_eq!(results.get("unavailable"), Some(&1), "{results:?}");

    // Once the backoff is over: one refresh, and every replica serves.
    world.idp.clear_faults();
    std::thread::sleep(Duration::from_secs(BACKOFF_SECS) + Duration::from_millis(700));
    round(front, 9);
    for replica in &world.replicas {
        poll(replica.addr, 1);
    }
    assert_eq!(world.idp.refreshes(), 2, "grants: {:?}", world.idp.grants());
    assert_eq!(world.refresh_results().get("ok"), Some(&1));
}
