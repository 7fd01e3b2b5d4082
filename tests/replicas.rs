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
//!   refresh and service resumes; the stored refresh token is the live one.

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
use support::oauth_server::{CLIENT_SECRET, OAuthServer, http_get};
use support::pop3::Dialogue as _;
use support::pop3::Pop3;
use support::redis::Redis;
use support::{IO_TIMEOUT, wait_for};

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
retry_after_failure_secs = 1
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
