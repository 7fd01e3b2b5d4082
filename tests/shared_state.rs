//! Replicas sharing state through a real Redis (`[state] url`, `--state`):
//! popgate processes against one private `redis-server` and one Dovecot,
//! all on loopback ports chosen at run time.
//!
//! - failed logins counted on one replica throttle the same user on another
//!   (and an embedded replica, as a control, counts only its own);
//! - sizes measured by one replica are listed by another without fetching
//!   a single body;
//! - Redis down (at start-up, and again after it came back): logins go on
//!   with each replica's local state, failures are answered as always, the
//!   outage is logged once, and counting resumes when Redis is back;
//! - a provider's hold and Outlook's per-mailbox request budget are one for
//!   all replicas (counted by the stand-ins).

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::dovecot::{ALICE, BOB, Dovecot};
use support::gateway::GatewayProcess;
use support::messages::simple;
use support::pop3::Dialogue as _;
use support::pop3::Pop3;
use support::proxy::RecordingProxy;
use support::redis::Redis;
use support::wait_for;

const REDIS_PASSWORD: &str = "redis-pw-4f2a9c";

fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).expect("write file");
    path
}

/// `[state]` for `redis`, its password in a file under `dir`.
fn state_section(dir: &Path, redis: &Redis) -> String {
    let password = write(dir, "redis.password", &format!("{REDIS_PASSWORD}\n"));
    format!("[state]\nurl = \"{}\"\npassword_file = \"{}\"\n", redis.url(), password.display())
}

/// A wrong password; returns the reply and how long it took.
fn fail_login(addr: std::net::SocketAddr, user: &str) -> (String, Duration) {
    let mut c = Pop3::connect(addr);
    c.ok(&format!("USER {user}"));
    let started = Instant::now();
    let reply = c.cmd("PASS not-the-password");
    (reply, started.elapsed())
}

fn occurrences(haystack: &[u8], needle: &[u8]) -> usize {
    haystack.windows(needle.len()).filter(|w| *w == needle).count()
}

#[test]
fn failures_on_one_replica_throttle_the_same_user_on_another() {
    let dovecot = Dovecot::start();
    let redis = Redis::start_with_password(REDIS_PASSWORD);
    let dir = tempfile::tempdir().expect("tempdir");
    let throttle = "[throttle]\nfree_failures = 1\nbase_delay_ms = 1500\nmax_delay_ms = 1500\n";
    let shared = write(dir.path(), "shared.toml", &format!("{throttle}{}", state_section(dir.path(), &redis)));
    let embedded = write(dir.path(), "embedded.toml", throttle);
    let backend = dovecot.imap_url();
    let start = |config: &Path| GatewayProcess::start(&["--config", config.to_str().unwrap(), "--backend", &backend]);
    let (a, b, alone) = (start(&shared), start(&shared), start(&embedded));

    // Two failures on A: the second is the last free one.
    for _ in 0..2 {
        let (reply, _) = fail_login(a.addr, "Alice");
        assert!(reply.starts_with("-ERR [AUTH]"), "{reply}");
    }
    assert_eq!(redis.command(&["GET", "popgate:throttle:user:alice"]), "2");
    assert_eq!(redis.command(&["GET", "popgate:throttle:pair:127.0.0.1:alice"]), "2");
    let ttl: i64 = redis.command(&["PTTL", "popgate:throttle:user:alice"]).parse().unwrap();
    assert!((1..=900_000).contains(&ttl), "every counter expires (release_after_secs): {ttl}");

    // The embedded replica has seen none of them: no wait.
    let (reply, _) = fail_login(alone.addr, ALICE.0);
    assert!(reply.starts_with("-ERR [AUTH]"), "{reply}");
    assert!(!alone.log().contains("throttling login after failures"), "{}", alone.log());

    // B, which has seen no failure itself, waits for A's.
    let (reply, waited) = fail_login(b.addr, ALICE.0);
    assert!(reply.starts_with("-ERR [AUTH]"), "{reply}");
    assert!(b.log().contains("throttling login after failures"), "{}", b.log());
    assert!(waited >= Duration::from_millis(1400), "B did not wait for A's failures: {waited:?}");
    assert_eq!(redis.command(&["GET", "popgate:throttle:user:alice"]), "3", "B's failure counts for all");

    // The right password still gets in on B; success forgives the user name
    // everywhere, not the address.
    let mut c = Pop3::login(b.addr, ALICE.0, ALICE.1);
    c.stat();
    c.quit();
    assert_eq!(redis.command(&["EXISTS", "popgate:throttle:user:alice"]), "0");
    assert_eq!(redis.command(&["EXISTS", "popgate:throttle:pair:127.0.0.1:alice"]), "0");
    assert_eq!(redis.command(&["GET", "popgate:throttle:addr:127.0.0.1"]), "3");

    for replica in [&a, &b] {
        let log = replica.log();
        assert!(log.contains(&redis.url().replace("/0", "").replace("redis://", "")), "target logged: {log}");
        assert!(!log.contains(REDIS_PASSWORD), "the Redis password leaked into the log:\n{log}");
    }
}

#[test]
fn a_second_replica_lists_sizes_the_first_measured_without_fetching() {
    let dovecot = Dovecot::start();
    dovecot.append_all(BOB.0, &[simple("one"), simple("two"), simple("three")]);
    let redis = Redis::start_with_password(REDIS_PASSWORD);
    let dir = tempfile::tempdir().expect("tempdir");
    let shared = write(dir.path(), "shared.toml", &state_section(dir.path(), &redis));
    let (to_a, to_b) = (RecordingProxy::start(dovecot.imap_addr()), RecordingProxy::start(dovecot.imap_addr()));
    let start = |proxy: &RecordingProxy| {
        GatewayProcess::start(&["--config", shared.to_str().unwrap(), "--backend", &format!("imap://{}", proxy.addr)])
    };
    let a = start(&to_a);
    let mut c = Pop3::login(a.addr, BOB.0, BOB.1);
    let listed_by_a = c.list();
    c.quit();
    assert_eq!(listed_by_a.len(), 3);
    assert!(occurrences(&to_a.sent(), b"PEEK[") > 0, "A measures the claimed sizes (the control)");
    let keys = redis.command(&["KEYS", "popgate:size:*"]);
    assert_eq!(keys.lines().count(), 3, "{keys}");
    let ttl: i64 = redis.command(&["TTL", keys.lines().next().unwrap()]).parse().unwrap();
    assert!(ttl > 0, "shared sizes expire (size_ttl_secs): {ttl}");

    // A second replica (or A after a restart): the sizes come from Redis.
    let b = start(&to_b);
    let mut c = Pop3::login(b.addr, BOB.0, BOB.1);
    assert_eq!(c.list(), listed_by_a);
    let sent = to_b.sent();
    assert_eq!(occurrences(&sent, b"PEEK["), 0, "B fetched a body to list:\n{}", String::from_utf8_lossy(&sent));
    // The shared sizes are the octets RETR sends.
    for (n, size) in &listed_by_a {
        assert_eq!(c.retr(*n).len() as u64, *size, "message {n}");
    }
    c.quit();
}

#[test]
fn with_redis_down_logins_go_on_with_local_state_and_sharing_resumes() {
    let dovecot = Dovecot::start();
    let mut redis = Redis::start();
    let url = redis.url();
    redis.stop();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write(
        dir.path(),
        "popgate.toml",
        "[throttle]\nfree_failures = 100\n[state]\nretry_after_secs = 0\ncommand_timeout_ms = 2000\n",
    );
    // It starts while Redis is down (the store connects on first use).
    let a = GatewayProcess::start(&[
        "--config",
        config.to_str().unwrap(),
        "--backend",
        &dovecot.imap_url(),
        "--state",
        &url,
    ]);
    let login = || {
        let mut c = Pop3::login(a.addr, ALICE.0, ALICE.1);
        c.stat();
        c.quit();
    };
    login();
    for _ in 0..3 {
        let (reply, _) = fail_login(a.addr, ALICE.0);
        assert!(reply.starts_with("-ERR [AUTH]"), "a wrong password is still just that: {reply}");
    }
    login();
    let unavailable = "shared state store unavailable";
    assert_eq!(a.log().matches(unavailable).count(), 1, "logged once per outage:\n{}", a.log());

    // Back: failures are counted in Redis again.
    redis.restart();
    wait_for("failures counted in Redis again", Duration::from_secs(20), || {
        fail_login(a.addr, ALICE.0);
        (redis.command(&["EXISTS", "popgate:throttle:user:alice"]) == "1").then_some(())
    });
    assert!(a.log().contains("shared state store reachable again"), "{}", a.log());

    // Down again, this time with a live connection: still served.
    redis.stop();
    login();
    let (reply, _) = fail_login(a.addr, ALICE.0);
    assert!(reply.starts_with("-ERR [AUTH]"), "{reply}");
    login();
    assert_eq!(a.log().matches(unavailable).count(), 2, "{}", a.log());
    assert!(!a.log().contains("panicked"), "{}", a.log());
}

/// A provider's long hold (Gmail: "Retry after <an hour>"; Graph's per-app
/// limits go the same way) seen by one replica holds off the others: the
/// second replica answers `-ERR [SYS/TEMP]` without calling the provider.
/// Two gateways in this process, each with its own Gmail backend, sharing
/// one Redis.
#[test]
fn a_providers_hold_seen_by_one_replica_holds_off_the_others() {
    use std::sync::Arc;

    use popgate::backend::gmail::{GmailBackend, GmailConfig};
    use popgate::config::Config;
    use support::gateway::Gateway;
    use support::gmail_api::{GmailApi, Refusal, Scope};
    use support::token_router::TokenRouter;

    const DEVICE: (&str, &str) = ("printer", "device-secret");
    const ACCOUNT: &str = "alice@example.com";
    let redis = Redis::start();
    let api = GmailApi::start();
    api.add(&simple("later"));
    let replica = || {
        let config = GmailConfig { api_base: api.base_url.clone(), max_retry_wait_secs: 5, ..GmailConfig::default() };
        let backend = Arc::new(GmailBackend::new(config).unwrap_or_else(|e| panic!("{e}")));
        let router = TokenRouter::new(backend, DEVICE, ACCOUNT, api.issue_token(Scope::Full), api.issuer(Scope::Full));
        let mut config = Config::default();
        config.state.url = Some(redis.url());
        // The hold is published in the background, once: on a loaded test
        // machine the default 500 ms command timeout can lose it (a
        // production replica then just behaves as a lone one).
        config.state.command_timeout_ms = 10_000;
        config.state.connect_timeout_ms = 10_000;
        Gateway::routed(config, router)
    };
    let (a, b) = (replica(), replica());
    let login_reply = |gateway: &Gateway| {
        let mut pop = gateway.connect();
        pop.ok(&format!("USER {}", DEVICE.0));
        pop.cmd(&format!("PASS {}", DEVICE.1))
    };

    let later = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    let stamp = later.format(&time::format_description::well_known::Rfc3339).unwrap();
    api.refuse(Refusal {
        path_contains: "/labels".into(),
        status: 403,
        reason: "userRateLimitExceeded".into(),
        message: format!("User-rate limit exceeded.  Retry after {stamp}"),
    });
    let reply = login_reply(&a);
    assert!(reply.starts_with("-ERR [SYS/TEMP]"), "{reply}");
    assert_eq!(api.seen().len(), 1, "A asked Gmail once");
    let key = format!("popgate:hold:{}:{ACCOUNT}", ACCOUNT.len());
    wait_for("the hold in Redis", Duration::from_secs(10), || (redis.command(&["EXISTS", &key]) == "1").then_some(()));
    let ttl: i64 = redis.command(&["PTTL", &key]).parse().unwrap();
    assert!((3_000_000..=3_600_000).contains(&ttl), "the hold expires with the provider's: {ttl} ms");

    let reply = login_reply(&b);
    assert!(reply.starts_with("-ERR [SYS/TEMP]"), "{reply}");
    assert_eq!(api.seen().len(), 1, "B did not call Gmail: A's hold holds it off");
}

/// Outlook's per-app-and-mailbox budget (`mailbox_requests_per_window`)
/// is one budget for all replicas: two gateways sharing Redis, polling in
/// turn, send the Graph stand-in at most the budget between them, and once
/// it is spent neither sends anything more (the devices get
/// `-ERR [SYS/TEMP]`). Lone replicas would each send the whole budget.
#[test]
fn graphs_mailbox_request_budget_is_spent_once_across_replicas() {
    use std::sync::Arc;

    use popgate::backend::graph::{GraphBackend, GraphConfig};
    use popgate::config::Config;
    use support::gateway::Gateway;
    use support::graph_api::{GraphApi, TokenKind, UPN};
    use support::token_router::TokenRouter;

    const DEVICE: (&str, &str) = ("scanner", "device-secret");
    const BUDGET: usize = 10;
    let redis = Redis::start();
    let api = GraphApi::start();
    api.add(&simple("budgeted"));
    let replica = || {
        let config = GraphConfig {
            api_base: api.base_url.clone(),
            max_retry_wait_secs: 5,
            mailbox_requests_per_window: BUDGET as u64,
            // A day: no window ends during the test.
            mailbox_window_secs: 86_400,
            ..GraphConfig::default()
        };
        let backend = Arc::new(GraphBackend::new(config).unwrap_or_else(|e| panic!("{e}")));
        let kind = TokenKind::Delegated;
        let router = TokenRouter::new(backend, DEVICE, UPN, api.issue_token(kind), api.issuer(kind));
        let mut config = Config::default();
        config.state.url = Some(redis.url());
        config.state.command_timeout_ms = 10_000;
        config.state.connect_timeout_ms = 10_000;
        Gateway::routed(config, router)
    };
    let replicas = [replica(), replica()];
    // One poll; whether it was served in full.
    let poll = |gateway: &Gateway| -> bool {
        let mut pop = gateway.connect();
        pop.ok(&format!("USER {}", DEVICE.0));
        let reply = pop.cmd(&format!("PASS {}", DEVICE.1));
        if !reply.starts_with("+OK") {
            assert!(reply.starts_with("-ERR [SYS/TEMP]"), "{reply}");
            return false;
        }
        let reply = pop.cmd("RETR 1");
        if !reply.starts_with("+OK") {
            assert!(reply.starts_with("-ERR [SYS/TEMP]"), "{reply}");
            pop.cmd("QUIT");
            return false;
        }
        let body = pop.body_text();
        assert!(body.iter().any(|l| l.contains("budgeted")), "{body:?}");
        pop.ok("QUIT");
        true
    };

    let mut served = [0usize; 2];
    let mut turn = 0;
    while poll(&replicas[turn % 2]) {
        served[turn % 2] += 1;
        turn += 1;
        assert!(turn <= BUDGET, "still serving after {turn} polls: the budget is not enforced");
    }
    assert!(served[0] >= 1 && served[1] >= 1, "both replicas served before the budget ran out: {served:?}");
    let sent = api.requests();
    assert!(sent <= BUDGET, "{sent} requests reached Graph, more than the shared budget of {BUDGET}");
    // Spent: neither replica sends anything more.
    for gateway in &replicas {
        for _ in 0..2 {
            assert!(!poll(gateway));
        }
    }
    assert_eq!(api.requests(), sent, "nothing sent once the budget is spent");
    let keys = redis.command(&["KEYS", "popgate:requests:*"]);
    assert!(keys.contains(UPN), "the budget is counted in Redis: {keys}");
}

/// Outlook's 4 concurrent requests per app and mailbox hold across
/// replicas: two replicas whose devices log in to one cold mailbox at the
/// same moment (each measures its 24 messages 4 downloads at a time) never
/// have more than 4 requests in flight at the Graph stand-in together, and
/// none is refused with 429. The same load without shared state, as a
/// control, goes over 4 (each replica counts only its own).
#[test]
fn graphs_four_concurrent_requests_per_mailbox_hold_across_replicas() {
    use std::sync::Arc;

    use popgate::backend::graph::{GraphBackend, GraphConfig};
    use popgate::config::Config;
    use support::gateway::Gateway;
    use support::graph_api::{GraphApi, TokenKind, UPN};
    use support::token_router::TokenRouter;

    const DEVICE: (&str, &str) = ("scanner", "device-secret");
    let redis = Redis::start();
    let api = GraphApi::start();
    for i in 0..24 {
        api.add(&simple(&format!("concurrent {i}")));
    }
    api.set_value_delay(Duration::from_millis(150));
    let replica = |state: Option<String>| {
        let config = GraphConfig { api_base: api.base_url.clone(), max_retry_wait_secs: 5, ..GraphConfig::default() };
        let backend = Arc::new(GraphBackend::new(config).unwrap_or_else(|e| panic!("{e}")));
        let kind = TokenKind::Delegated;
        let router = TokenRouter::new(backend, DEVICE, UPN, api.issue_token(kind), api.issuer(kind));
        let mut config = Config::default();
        config.state.url = state;
        config.state.command_timeout_ms = 10_000;
        config.state.connect_timeout_ms = 10_000;
        Gateway::routed(config, router)
    };
    // Both replicas' devices log in at once; each login lists and measures.
    let logins_at_once = |replicas: &[Gateway; 2]| {
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let threads: Vec<_> = replicas
            .iter()
            .map(|gateway| {
                let (addr, barrier) = (gateway.addr, barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let mut pop = Pop3::login(addr, DEVICE.0, DEVICE.1);
                    let stat = pop.stat();
                    pop.quit();
                    stat.0
                })
            })
            .collect();
        for thread in threads {
            assert_eq!(thread.join().expect("login thread"), 24);
        }
    };

    // The control: each replica counts its own 4.
    {
        let replicas = [replica(None), replica(None)];
        logins_at_once(&replicas);
    }
    let alone = api.max_in_flight();
    assert!(alone > 4, "without shared state the load goes over Outlook's 4 (peak {alone})");

    api.forget_seen();
    let replicas = [replica(Some(redis.url())), replica(Some(redis.url()))];
    logins_at_once(&replicas);
    let peak = api.max_in_flight();
    assert!((2..=4).contains(&peak), "peak of {peak} requests in flight across both replicas");
    assert!(api.seen().iter().all(|r| r.status != 429), "never over Outlook's limit");
    let keys = redis.command(&["KEYS", "popgate:slots:*"]);
    assert!(keys.contains(UPN), "the places are taken in Redis: {keys}");
}
