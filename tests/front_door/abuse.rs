//! Abuse protection.

use super::*;
use crate::support::fake_imap::FakeImap;

/// How long one failed PASS takes to be answered (USER first).
fn failed_attempt(c: &mut Pop3, user: &str) -> (Duration, String) {
    c.ok(&format!("USER {user}"));
    let started = Instant::now();
    let reply = c.cmd("PASS wrong-password");
    (started.elapsed(), reply)
}

/// A cleartext client from `local`, greeting read.
fn pop3_from(local: IpAddr, addr: SocketAddr) -> Client<TcpStream> {
    Client::connect_from(local, addr)
}

/// `failed_attempt` for a client from another address.
fn failed_attempt_from(c: &mut Client<TcpStream>, user: &str) -> (Duration, String) {
    c.ok(&format!("USER {user}"));
    let started = Instant::now();
    let reply = c.cmd("PASS wrong-password");
    (started.elapsed(), reply)
}

#[test]
fn failed_logins_are_throttled_growing_capped_per_session_and_released() {
    let store = store();
    store.add_user("victim", "victim-pass");
    let mut config = Config::default();
    config.throttle.free_failures = 2;
    config.throttle.base_delay_ms = 200;
    config.throttle.max_delay_ms = 800;
    config.throttle.release_after_secs = 2;
    let gateway = Gateway::start(config, Arc::new(DemoBackend::new(store.clone())));
    let addr = gateway.addr;

    // 127.0.0.1 guesses victim's password: three connections of three.
    let mut delays = Vec::new();
    for _ in 0..2 {
        let mut c = Pop3::connect(addr);
        for n in 0..3 {
            let (took, reply) = failed_attempt(&mut c, "victim");
            assert!(reply.starts_with("-ERR [AUTH]"), "{reply}");
            delays.push(took);
            if n == 2 {
                c.expect_closed();
            }
        }
    }
    let expected = [0, 0, 0, 200, 400, 800];
    for (i, (took, want)) in delays.iter().zip(expected).enumerate() {
        let want = Duration::from_millis(want);
        assert!(
            *took + Duration::from_millis(20) >= want && *took < want + Duration::from_millis(400),
            "attempt {}: took {took:?}, expected about {want:?} (all: {delays:?})",
            i + 1
        );
    }

    // The seventh waits the cap (800 ms). Meanwhile other addresses with
    // other users are not slowed at all, and a login of another user from
    // elsewhere succeeds at once.
    let attacker = std::thread::spawn(move || {
        let mut c = Pop3::connect(addr);
        failed_attempt(&mut c, "victim")
    });
    std::thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    let mut other = pop3_from(ip(2), addr);
    other.user_pass("bob", "bob-pass");
    assert_eq!(other.stat().0, 0);
    other.quit();
    let mut guesser = pop3_from(ip(3), addr);
    let (fresh, _) = failed_attempt_from(&mut guesser, "nobody");
    let others = started.elapsed();
    let (capped, reply) = attacker.join().unwrap();
    assert!(reply.starts_with("-ERR [AUTH]"), "{reply}");
    assert!(capped >= Duration::from_millis(780) && capped < Duration::from_millis(1500), "capped delay {capped:?}");
    assert!(fresh < Duration::from_millis(300), "a first failure from another address waited {fresh:?}");
    assert!(others < Duration::from_millis(600), "other clients took {others:?} while 127.0.0.1 was throttled");

    // The user name is throttled wherever it is tried from.
    let mut elsewhere = pop3_from(ip(4), addr);
    let (took, _) = failed_attempt_from(&mut elsewhere, "victim");
    assert!(took >= Duration::from_millis(780), "victim from another address waited only {took:?}");
    drop(elsewhere);

    // Released after release_after_secs without failures: no wait, for the
    // address and for the user.
    std::thread::sleep(Duration::from_millis(2300));
    let mut c = Pop3::connect(addr);
    let (took, _) = failed_attempt(&mut c, "victim");
    assert!(took < Duration::from_millis(300), "still throttled after the release time: {took:?}");
    c.user_pass("victim", "victim-pass");
    c.quit();
}

/// GET /metrics from the admin listener.
fn metrics(admin: SocketAddr) -> String {
    let mut stream = tcp(admin);
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: popgate\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read /metrics");
    response
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// 10 000 failed logins from 127.0.0.1 (50 connections at a time, three
/// attempts each) against the real binary, while 127.0.0.2 logs in and runs
/// STAT over and over: its latency stays low and popgate's memory bounded.
#[test]
fn a_burst_of_ten_thousand_failed_logins_does_not_slow_others_or_grow_memory() {
    const FAILURES: u64 = 10_000;
    const CONCURRENCY: usize = 50;
    const GOOD: &str = "good-pass-1234";
    let imap = FakeImap::start(GOOD);
    let server = GatewayProcess::start_with_config(1, &[("RUST_LOG", "warn")], |addrs| {
        format!(
            "[[listener]]\naddress = \"{}\"\n\n[limits]\nmax_failed_logins = 3\n\n\
             [throttle]\nfree_failures = 2\nbase_delay_ms = 1\nmax_delay_ms = 5\n\n\
             [backend]\nkind = \"imap\"\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\nsizes = \"trust\"\n",
            addrs[0],
            imap.addr.port()
        )
    });
    let addr = server.addr;

    // Warm up (allocator arenas, the backend pool), then take the baseline.
    for _ in 0..20 {
        let mut c = pop3_from(ip(2), addr);
        c.user_pass("printer", GOOD);
        c.quit();
    }
    let rss_before = server.rss_kib();

    let failures = Arc::new(AtomicU64::new(0));
    let burst_started = Instant::now();
    let attackers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let failures = failures.clone();
            std::thread::spawn(move || {
                let mut connections = 0u64;
                while failures.load(Ordering::Relaxed) < FAILURES {
                    let mut c = Pop3::connect(addr);
                    connections += 1;
                    for n in 0..3 {
                        c.ok("USER mallory");
                        let reply = c.cmd("PASS guess");
                        assert!(reply.starts_with("-ERR [AUTH]"), "{reply}");
                        failures.fetch_add(1, Ordering::Relaxed);
                        if n == 2 {
                            c.expect_closed();
                        }
                    }
                }
                connections
            })
        })
        .collect();

    // The other client, from another address, for as long as the burst lasts.
    let mut stat_latency = Vec::new();
    let mut session_latency = Vec::new();
    while failures.load(Ordering::Relaxed) < FAILURES {
        assert!(burst_started.elapsed() < Duration::from_secs(120), "the burst takes too long");
        let started = Instant::now();
        let mut c = pop3_from(ip(2), addr);
        c.user_pass("printer", GOOD);
        for _ in 0..5 {
            let t = Instant::now();
            assert_eq!(c.stat(), (0, 0));
            stat_latency.push(t.elapsed());
        }
        c.quit();
        session_latency.push(started.elapsed());
    }
    let connections: u64 = attackers.into_iter().map(|t| t.join().expect("attacker thread")).sum();
    let burst = burst_started.elapsed();
    let rss_after = server.rss_kib();

    stat_latency.sort();
    session_latency.sort();
    let report = format!(
        "burst: {} failed logins over {connections} connections in {burst:?}; other client: {} sessions \
         (connect+login+5 STAT+QUIT) median {:?} p99 {:?} max {:?}, STAT median {:?} p99 {:?} max {:?}; \
         RSS {rss_before} KiB -> {rss_after} KiB",
        failures.load(Ordering::Relaxed),
        session_latency.len(),
        percentile(&session_latency, 0.5),
        percentile(&session_latency, 0.99),
        session_latency.last().unwrap(),
        percentile(&stat_latency, 0.5),
        percentile(&stat_latency, 0.99),
        stat_latency.last().unwrap(),
    );
    eprintln!("{report}");
    assert!(session_latency.len() >= 5, "too few sessions to measure: {report}");
    assert!(percentile(&session_latency, 0.99) < Duration::from_secs(1), "{report}");
    assert!(percentile(&stat_latency, 0.99) < Duration::from_millis(500), "{report}");
    assert!(rss_after.saturating_sub(rss_before) < 50 * 1024, "{report}");

    // Every failure was a real backend refusal (so the throttle saw it).
    let text = metrics(server.admin_addr);
    let refused = metric(&text, "popgate_logins_total{result=\"failure\",reason=\"auth\"}");
    assert!(refused >= FAILURES as f64, "{refused} failures counted\n{report}");
    assert!(imap.refused.load(Ordering::Relaxed) >= FAILURES, "{report}");
    assert!(imap.logins.load(Ordering::Relaxed) > 0);
    drop(imap);
}

#[test]
fn connections_per_address_are_limited_and_other_addresses_still_served() {
    let store = store();
    let gateway = Gateway::memory_with(&store, |limits| limits.max_connections_per_address = 2);
    let addr = gateway.addr;

    let first = Pop3::connect(addr);
    let second = Pop3::connect(addr);
    let mut third = Pop3::connect_raw(addr);
    let reply = third.line();
    assert!(reply.starts_with("-ERR [SYS/TEMP]"), "third connection from 127.0.0.1: {reply}");
    third.expect_closed();

    // Another address is served meanwhile, up to its own limit.
    let mut other = pop3_from(ip(2), addr);
    other.user_pass(USER, PASS);
    let _other2 = pop3_from(ip(2), addr);
    let mut refused = Client::raw(tcp_from(ip(2), addr));
    assert!(refused.line().starts_with("-ERR [SYS/TEMP]"));
    refused.expect_closed();
    assert_eq!(other.stat().0, 2);
    other.quit();

    // A slot comes back when its connection ends.
    drop(first);
    wait_for("a slot for 127.0.0.1 to come back", Duration::from_secs(5), || {
        let mut c = Pop3::connect_raw(addr);
        let line = c.line();
        line.starts_with("+OK").then_some(())
    });
    drop(second);
}

#[test]
fn implicit_tls_connections_over_a_limit_are_closed_without_cleartext() {
    let ca = TestCa::new();
    let a = ca.issue("a", "cert-a", &[NAME_A]);
    let store = store();
    let mut config = config(ListenerTls::Implicit, &[&a]);
    config.limits.max_connections_per_address = 1;
    let gateway = start(config, &store);
    let _first = Client::implicit(home(), gateway.addr, ca.client_config(), NAME_A);
    let mut raw = tcp(gateway.addr);
    let mut buf = Vec::new();
    let n = raw.read_to_end(&mut buf).expect("closed, not left waiting");
    assert_eq!(n, 0, "a TLS client was sent cleartext: {:?}", String::from_utf8_lossy(&buf));
    assert!(Client::try_implicit(home(), gateway.addr, ca.client_config(), NAME_A).is_err());
    let _second = Client::implicit(ip(2), gateway.addr, ca.client_config(), NAME_A);
}

#[test]
fn connections_overall_are_limited() {
    let store = store();
    let gateway = Gateway::memory_with(&store, |limits| limits.max_connections = 3);
    let addr = gateway.addr;
    let open: Vec<_> = (2..=4).map(|n| pop3_from(ip(n), addr)).collect();
    let mut refused = Client::raw(tcp_from(ip(5), addr));
    let reply = refused.line();
    assert!(reply.starts_with("-ERR [SYS/TEMP]"), "{reply}");
    assert!(!reply.contains("your address"), "the overall limit, not the per-address one: {reply}");
    refused.expect_closed();
    drop(open);
    wait_for("a connection slot to come back", Duration::from_secs(5), || {
        let mut c = Client::raw(tcp_from(ip(5), addr));
        c.line().starts_with("+OK").then_some(())
    });
}

#[test]
fn the_login_timeout_closes_silent_and_dawdling_connections_but_not_sessions() {
    let ca = TestCa::new();
    let a = ca.issue("a", "cert-a", &[NAME_A]);
    let store = store();
    let gateway = Gateway::memory_with(&store, |limits| limits.login_timeout_secs = 1);

    // Silent after the greeting.
    let started = Instant::now();
    let mut silent = Pop3::connect(gateway.addr);
    let reply = silent.line();
    assert!(reply.starts_with("-ERR"), "{reply}");
    silent.expect_closed();
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(4), "closed after {took:?}");

    // Busy but never logging in: the deadline counts from the connection,
    // not from the last command.
    let started = Instant::now();
    let mut dawdler = Pop3::connect(gateway.addr);
    let closed = loop {
        assert!(started.elapsed() < Duration::from_secs(5), "a dawdling client is still connected");
        dawdler.send("NOOP");
        let line = dawdler.line();
        if !line.contains("not allowed") {
            assert!(line.starts_with("-ERR"), "{line}");
            dawdler.expect_closed();
            break started.elapsed();
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(closed < Duration::from_secs(3), "closed after {closed:?}");

    // A logged-in session is past the login deadline.
    let mut session = Pop3::login(gateway.addr, USER, PASS);
    std::thread::sleep(Duration::from_millis(1600));
    assert_eq!(session.stat().0, 2);
    session.quit();

    // TLS: a client that never starts the handshake, and one that sends
    // STLS but no handshake.
    let mut implicit_config = config(ListenerTls::Implicit, &[&a]);
    implicit_config.limits.login_timeout_secs = 1;
    let implicit = start(implicit_config, &store);
    let started = Instant::now();
    let mut raw = tcp(implicit.addr);
    let mut buf = Vec::new();
    let n = raw.read_to_end(&mut buf).expect("closed, not timed out");
    assert_eq!(n, 0);
    assert!(started.elapsed() < Duration::from_secs(4), "handshake wait {:?}", started.elapsed());

    let mut starttls_config = config(ListenerTls::Starttls, &[&a]);
    starttls_config.limits.login_timeout_secs = 1;
    let starttls = start(starttls_config, &store);
    let started = Instant::now();
    let mut c = Client::connect(starttls.addr);
    c.ok("STLS");
    let mut raw = c.into_stream();
    let n = raw.read_to_end(&mut buf).expect("closed, not timed out");
    assert_eq!(n, 0);
    assert!(started.elapsed() < Duration::from_secs(4), "STLS handshake wait {:?}", started.elapsed());
}
