//! Hardening (issue #12): the login throttle keyed on a case-folded user
//! name and by (address, user) so one user's guessing does not slow other
//! users of the same address; IPv4 clients of a dual-stack listener; warm
//! sessions past their maximum age; lowering `max_connections` by reload;
//! and a bounded Argon2 verifier under a burst of bad logins.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use popgate::backend::demo::{DemoBackend, DemoStore};
use popgate::config::Config;
use support::gateway::Gateway;
use support::pop3::Dialogue as _;
use support::tls::Client;

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// USER then PASS with a wrong password; how long PASS took and the reply.
fn failed_attempt_from(local: IpAddr, addr: SocketAddr, user: &str) -> (Duration, String) {
    let mut c = Client::connect_from(local, addr);
    c.ok(&format!("USER {user}"));
    let started = Instant::now();
    let reply = c.cmd("PASS wrong-password");
    (started.elapsed(), reply)
}

/// Logs in with the right password from `local`; how long PASS took.
fn good_login_from(local: IpAddr, addr: SocketAddr, user: &str, password: &str) -> Duration {
    let mut c = Client::connect_from(local, addr);
    c.ok(&format!("USER {user}"));
    let started = Instant::now();
    let reply = c.cmd(&format!("PASS {password}"));
    let took = started.elapsed();
    assert!(reply.starts_with("+OK"), "{user}: {reply}");
    c.quit();
    took
}

fn throttled_gateway(store: &DemoStore, free_failures: u32, base_delay_ms: u64) -> Gateway {
    let mut config = Config::default();
    config.throttle.free_failures = free_failures;
    config.throttle.base_delay_ms = base_delay_ms;
    config.throttle.max_delay_ms = base_delay_ms;
    config.throttle.release_after_secs = 60;
    Gateway::start(config, Arc::new(DemoBackend::new(store.clone())))
}

/// Issue #12, finding 3: `Victim`, `VICTIM` and `victim` are one user name
/// for the throttle, whatever address each guess comes from.
#[test]
fn the_user_throttle_is_not_bypassed_by_changing_case() {
    let store = DemoStore::new();
    store.add_user("victim", "victim-pass");
    let gateway = throttled_gateway(&store, 2, 3000);
    for (n, user) in ["Victim", "VICTIM", "victim"].into_iter().enumerate() {
        let (took, reply) = failed_attempt_from(ip(10 + n as u8), gateway.addr, user);
        assert!(reply.starts_with("-ERR [AUTH]"), "{reply}");
        assert!(took < Duration::from_secs(2), "free failure {n} waited {took:?}");
    }
    // The fourth guess, from a fourth address and in a fourth spelling, is
    // past the free failures of the user name.
    let (took, reply) = failed_attempt_from(ip(13), gateway.addr, "vIcTiM");
    assert!(reply.starts_with("-ERR [AUTH]"), "{reply}");
    assert!(took >= Duration::from_millis(2500), "the fourth guess at victim waited only {took:?}");
}

/// Issue #12, finding 14: mallory's failures from 127.0.0.1 slow mallory,
/// not bob and alice logging in correctly from the same address.
#[test]
fn one_users_failures_do_not_slow_other_users_of_the_same_address() {
    let store = DemoStore::new();
    store.add_user("alice", "alice-pass");
    store.add_user("bob", "bob-pass");
    store.add_user("mallory", "mallory-pass");
    let gateway = throttled_gateway(&store, 0, 3000);
    let addr = gateway.addr;
    // Three failures of mallory at once (no throttle delay yet).
    let barrier = Arc::new(Barrier::new(3));
    let guesses: Vec<_> = (0..3)
        .map(|_| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect_from(ip(1), addr);
                c.ok("USER mallory");
                barrier.wait();
                c.cmd("PASS wrong-password")
            })
        })
        .collect();
    for guess in guesses {
        let reply = guess.join().unwrap();
        assert!(reply.starts_with("-ERR [AUTH]"), "{reply}");
    }
    // Mallory's next guess is throttled, meanwhile bob and alice get in at once.
    let mallory = std::thread::spawn(move || failed_attempt_from(ip(1), addr, "mallory"));
    std::thread::sleep(Duration::from_millis(100));
    for (user, password) in [("bob", "bob-pass"), ("alice", "alice-pass")] {
        let took = good_login_from(ip(1), addr, user, password);
        assert!(took < Duration::from_millis(1500), "{user} with the right password waited {took:?}");
    }
    let (took, reply) = mallory.join().unwrap();
    assert!(reply.starts_with("-ERR [AUTH]"), "{reply}");
    assert!(took >= Duration::from_millis(2500), "mallory's fourth guess waited only {took:?}");
}

/// popgate in this process with its `RunningServer` at hand (to reload it),
/// on its own runtime; the test thread stays blocking.
struct InProcess {
    runtime: tokio::runtime::Runtime,
    server: Option<popgate::server::RunningServer>,
}

impl InProcess {
    fn start(config: Config, store: &DemoStore) -> InProcess {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let backend: popgate::backend::SharedBackend = Arc::new(DemoBackend::new(store.clone()));
        let router = Arc::new(popgate::auth::accounts::PassThrough::new(backend));
        let server = runtime.block_on(async {
            tokio::time::timeout(
                support::IO_TIMEOUT,
                popgate::server::Server::start(&config, router, Arc::new(popgate::telemetry::Metrics::new())),
            )
            .await
            .expect("started in time")
        });
        InProcess { runtime, server: Some(server.unwrap_or_else(|e| panic!("popgate did not start: {e}"))) }
    }

    fn server(&mut self) -> &mut popgate::server::RunningServer {
        self.server.as_mut().unwrap()
    }

    fn port(&self) -> u16 {
        self.server.as_ref().unwrap().local_addrs()[0].port()
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        let _guard = self.runtime.enter();
        drop(self.server.take());
    }
}

/// Issue #12, finding 6: an IPv4 client of a dual-stack `[::]` listener is
/// in `cleartext_networks = ["127.0.0.0/8"]` (it arrives as
/// `::ffff:127.0.0.1`).
#[test]
fn ipv4_clients_of_a_dual_stack_listener_match_ipv4_networks() {
    let store = DemoStore::new();
    store.add_user("printer", "printer-pass");
    let mut config = Config::default();
    let listener = config.listener.first_mut().expect("a default listener");
    listener.address = "[::]:0".parse().unwrap();
    listener.allow_cleartext_login = true;
    listener.cleartext_networks = vec!["127.0.0.0/8".parse().unwrap()];
    listener.loopback_is_secure = false;
    config.listener.truncate(1);
    let gateway = InProcess::start(config, &store);
    let addr = SocketAddr::from(([127, 0, 0, 1], gateway.port()));
    let mut c = Client::connect_from(ip(1), addr);
    let reply = c.cmd("USER printer");
    assert!(reply.starts_with("+OK"), "USER from 127.0.0.1 on [::]: {reply}");
    c.ok("PASS printer-pass");
    c.quit();
    // The unit: the address every check sees.
    let mapped: SocketAddr = "[::ffff:192.0.2.7]:110".parse().unwrap();
    assert_eq!(popgate::server::canonical_peer(mapped), "192.0.2.7:110".parse().unwrap());
}

/// Issue #12, finding 2: a warm backend session is not reused past
/// `max_age_secs`, so a password changed at the backend stops working
/// through popgate within that time.
#[test]
fn a_warm_session_past_its_maximum_age_is_not_reused() {
    use support::dovecot::{ALICE, Dovecot};
    let dovecot = Dovecot::start_with_users(&[ALICE]);
    let mut config = Config {
        backend: popgate::backend::select::BackendConfig::from_url(&dovecot.imap_url()).unwrap(),
        ..Config::default()
    };
    config.backend_pool.max_age_secs = 2;
    config.backend_pool.idle_secs = 600;
    let gateway = Gateway::from_config(config);
    let mut c = gateway.login(ALICE.0, ALICE.1);
    c.quit();
    // The warm session is reused within max_age (this is what it is for).
    let mut c = gateway.login(ALICE.0, ALICE.1);
    c.quit();
    // The password changes at the backend.
    let passwd = dovecot.dir().join("passwd");
    let text = std::fs::read_to_string(&passwd).unwrap();
    let old = format!("{}:{{PLAIN}}{}:", ALICE.0, ALICE.1);
    assert!(text.contains(&old), "{text}");
    std::fs::write(&passwd, text.replace(&old, &format!("{}:{{PLAIN}}changed-secret:", ALICE.0))).unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let mut c = gateway.connect();
    c.ok(&format!("USER {}", ALICE.0));
    let reply = c.cmd(&format!("PASS {}", ALICE.1));
    assert!(reply.starts_with("-ERR"), "the old password still logs in past max_age_secs: {reply}");
    drop(c);
    let mut c = gateway.login(ALICE.0, "changed-secret");
    c.quit();
}

/// Issue #12, finding 4: lowering `max_connections` by reload (6 -> 2)
/// holds once the connections above it have ended (they used to hand their
/// permits back, restoring the old limit).
#[test]
fn a_lowered_connection_limit_holds_after_the_excess_connections_end() {
    let store = DemoStore::new();
    let mut config = Config::default();
    config.limits.max_connections = 6;
    config.limits.max_connections_per_address = 100;
    let mut gateway = InProcess::start(config.clone(), &store);
    let addr = SocketAddr::from(([127, 0, 0, 1], gateway.port()));
    let open: Vec<Client<std::net::TcpStream>> = (0..6).map(|_| Client::connect(addr)).collect();
    config.limits.max_connections = 2;
    let changes = gateway.server().reload(&config);
    assert!(changes.iter().any(|c| c.contains("max_connections")), "{changes:?}");
    for mut c in open {
        c.quit();
    }
    let metrics = gateway.server().metrics();
    let labels = popgate::telemetry::ListenerLabels { listener: gateway.server().local_addrs()[0].to_string() };
    support::wait_for("the six sessions to end", support::IO_TIMEOUT, || {
        (metrics.sessions_active.get_or_create(&labels).get() == 0).then_some(())
    });
    // (The slot is given back just after the session's gauge goes down.)
    std::thread::sleep(Duration::from_millis(200));
    let mut held = Vec::new();
    for n in 0..4 {
        let mut c = Client::raw(support::tls::tcp(addr));
        let greeting = c.line();
        if n < 2 {
            assert!(greeting.starts_with("+OK"), "connection {n}: {greeting}");
        } else {
            assert!(greeting.starts_with("-ERR"), "connection {n} above the lowered limit of 2: {greeting}");
        }
        held.push(c);
    }
}

/// Issue #12, finding 1: 1 000 parallel bad logins (unknown users and a
/// device's wrong password, every one an Argon2 check) neither grow the
/// gateway by more than 64 MiB, during the burst or after it, nor keep
/// another device (one that polled before) out: it is let in within 2 s of
/// the burst starting (retrying, as a device does, if told `[SYS/TEMP]`).
#[test]
fn a_burst_of_bad_logins_is_bounded_in_memory_and_does_not_lock_devices_out() {
    use popgate::auth::passwords::hash_password;
    use support::gateway::GatewayProcess;
    const BURST: usize = 1000;
    const LIMIT_KIB: u64 = 64 * 1024;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("held"), "held-password\n").unwrap();
    let config = dir.path().join("popgate.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[backend]
kind = "demo"

[limits]
max_connections = 4000
max_connections_per_address = 4000

[[account]]
name = "office"
mode = "mapped"
login = "office"
password_file = "{dir}/held"

[[account.device]]
user = "printer-1"
password_hash = "{h1}"

[[account.device]]
user = "printer-2"
password_hash = "{h2}"
"#,
            dir = dir.path().display(),
            h1 = hash_password("printer-1-pass").unwrap(),
            h2 = hash_password("printer-2-pass").unwrap(),
        ),
    )
    .unwrap();
    let gateway = GatewayProcess::start(&["--config", config.to_str().unwrap()]);
    let addr = gateway.addr;
    let good_login = move |deadline: Instant| -> Result<(), String> {
        loop {
            let mut c = Client::connect_from(ip(2), addr);
            c.ok("USER printer-1");
            let reply = c.cmd("PASS printer-1-pass");
            if reply.starts_with("+OK") {
                c.quit();
                return Ok(());
            }
            if !reply.starts_with("-ERR [SYS/TEMP]") || Instant::now() >= deadline {
                return Err(reply);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // Warm: the verifier exists and a device has logged in once.
    good_login(Instant::now() + support::IO_TIMEOUT).expect("a first device login");
    let baseline = gateway.rss_kib();

    let barrier = Arc::new(Barrier::new(BURST + 1));
    let attackers: Vec<_> = (0..BURST)
        .map(|n| {
            let barrier = barrier.clone();
            std::thread::Builder::new()
                .stack_size(128 * 1024)
                .spawn(move || {
                    let mut c = Client::connect_from(ip(1), addr);
                    c.ok(&if n % 2 == 0 { format!("USER intruder-{n}") } else { "USER printer-2".to_string() });
                    barrier.wait();
                    c.cmd(&format!("PASS guess-{n}"))
                })
                .expect("spawn an attacker")
        })
        .collect();
    barrier.wait();
    let started = Instant::now();
    let good = std::thread::spawn(move || {
        let result = good_login(started + Duration::from_secs(2));
        (result, started.elapsed())
    });
    let mut peak = baseline;
    while !attackers.iter().all(|a| a.is_finished()) {
        peak = peak.max(gateway.rss_kib());
        assert!(
            peak < baseline + LIMIT_KIB,
            "popgate grew from {baseline} KiB to {peak} KiB during the burst ({:?} in)",
            started.elapsed()
        );
        assert!(started.elapsed() < Duration::from_secs(120), "the burst did not end within 2 minutes");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut refused = 0;
    for attacker in attackers {
        let reply = attacker.join().unwrap();
        assert!(reply.starts_with("-ERR [AUTH]") || reply.starts_with("-ERR [SYS/TEMP]"), "{reply}");
        refused += reply.starts_with("-ERR [SYS/TEMP]") as usize;
    }
    let (result, took) = good.join().unwrap();
    assert!(result.is_ok(), "the device was not let in within 2 s of the burst ({took:?}): {result:?}");
    std::thread::sleep(Duration::from_millis(500));
    let after = gateway.rss_kib();
    assert!(after < baseline + LIMIT_KIB, "popgate kept {after} KiB after the burst (from {baseline} KiB)");
    eprintln!(
        "burst of {BURST}: {refused} told to try later; RSS {baseline} -> peak {peak} -> {after} KiB; device in after {took:?}"
    );
}
