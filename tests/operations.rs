//! Running popgate in production: the admin listener (/metrics, /healthz,
//! /readyz), readiness during a SIGTERM drain, JSON logs, SIGHUP reloads and
//! failing fast at startup. Each test runs the real binary.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::IO_TIMEOUT;
use support::dovecot::{ALICE, Dovecot};
use support::gateway::GatewayProcess;
use support::messages::simple;
use support::pop3::Dialogue as _;
use support::pop3::Pop3;

/// A plain HTTP/1.1 GET: (status, body).
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect to the admin listener");
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read the HTTP response");
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("HTTP status line");
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// SIGTERM: /readyz turns 503 at once (a load balancer stops sending
/// clients), /healthz stays 200 while sessions drain, a session that QUITs
/// within the grace period commits, one that does not commits nothing.
#[test]
fn sigterm_flips_readiness_first_and_deletes_only_what_was_quit_for() {
    let dovecot = Dovecot::start();
    let uids = dovecot.append_all(ALICE.0, &[simple("one"), simple("two"), simple("three")]);
    let backend = dovecot.imap_url();
    let mut server = GatewayProcess::start_with_config(1, &[], |addrs| {
        format!(
            "[[listener]]\naddress = \"{}\"\n[limits]\nshutdown_grace_secs = 2\n[backend_pool]\nenabled = false\n",
            addrs[0]
        ) + &backend_table(&backend)
    });
    assert_eq!(get(server.admin_addr, "/readyz").0, 200);
    assert_eq!(get(server.admin_addr, "/healthz").0, 200);

    let mut quitter = Pop3::login(server.addr, ALICE.0, ALICE.1);
    quitter.ok("DELE 1");
    let mut lingerer = Pop3::login(server.addr, ALICE.0, ALICE.1);
    lingerer.ok("DELE 2");

    server.terminate();
    support::wait_for("/readyz to report draining", Duration::from_secs(5), || {
        let (status, body) = get(server.admin_addr, "/readyz");
        (status == 503 && body.contains("draining")).then_some(())
    });
    assert_eq!(get(server.admin_addr, "/healthz").0, 200, "still alive while draining");

    assert!(quitter.quit().starts_with("+OK"));
    let reply = lingerer.line();
    assert!(reply.starts_with("-ERR [SYS/TEMP]"), "{reply}");
    lingerer.expect_closed();
    let status = server.wait(Duration::from_secs(15));
    assert!(status.success(), "exit status {status}:\n{}", server.log());

    // Only the message the quitting client deleted is gone.
    assert_eq!(dovecot.uids(ALICE.0), vec![uids[1], uids[2]]);
}

fn backend_table(imap_url: &str) -> String {
    let port = imap_url.rsplit(':').next().unwrap();
    format!("[backend]\nkind = \"imap\"\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"none\"\n")
}

/// /metrics speaks Prometheus text with the families operators alert on,
/// counting what actually happened.
#[test]
fn metrics_count_sessions_commands_logins_and_last_success() {
    let server = GatewayProcess::start(&["--backend", "demo:"]);
    let mut c = Pop3::login(server.addr, "printer-3", "pw");
    c.retr(1);
    c.ok("DELE 1");
    assert!(c.quit().starts_with("+OK"));
    let (status, text) = get(server.admin_addr, "/metrics");
    assert_eq!(status, 200);
    for needle in [
        "popgate_sessions_total{listener=",
        "popgate_commands_total{command=\"RETR\",result=\"ok\"} 1",
        "popgate_commands_total{command=\"DELE\",result=\"ok\"} 1",
        // Each command's service time, from its read to its reply written.
        "popgate_command_service_seconds_count{command=\"PASS\"} 1",
        "popgate_command_service_seconds_count{command=\"RETR\"} 1",
        "popgate_command_service_seconds_count{command=\"DELE\"} 1",
        "popgate_logins_total{result=\"success\",reason=\"ok\"} 1",
        "popgate_backend_operation_duration_seconds_count{backend=\"demo\",operation=\"fetch\"} 1",
        "popgate_deletions_total{result=\"committed\"} 1",
        "popgate_account_last_success_timestamp_seconds{account=\"pass-through\"}",
        "popgate_backend_logins_total 1",
        "popgate_build_info{version=",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    // A failed login is counted with its reason.
    let mut bad = Pop3::connect(server.addr);
    bad.ok("USER nobody");
    let _ = bad.cmd("PASS");
    assert!(
        get(server.admin_addr, "/metrics").1.contains("popgate_commands_total{command=\"INVALID\",result=\"err\"} 1")
    );
}

/// Warm sessions: a second poll of the same account needs no backend login.
#[test]
fn a_second_poll_reuses_the_warm_backend_session() {
    let dovecot = Dovecot::start();
    dovecot.append_all(ALICE.0, &[simple("one")]);
    let server = GatewayProcess::start(&["--backend", &dovecot.imap_url()]);
    for _ in 0..3 {
        let mut c = Pop3::login(server.addr, ALICE.0, ALICE.1);
        assert_eq!(c.stat().0, 1);
        assert!(c.quit().starts_with("+OK"));
    }
    // New mail arriving between polls is seen by the reused session.
    dovecot.append(ALICE.0, &simple("two"));
    let mut c = Pop3::login(server.addr, ALICE.0, ALICE.1);
    assert_eq!(c.stat().0, 2);
    assert!(c.quit().starts_with("+OK"));
    let text = get(server.admin_addr, "/metrics").1;
    assert!(text.contains("popgate_backend_logins_total 1\n"), "{text}");
    assert!(text.contains("popgate_backend_sessions_reused_total 3\n"), "{text}");
    // A wrong password never gets the warm session.
    let mut c = Pop3::connect(server.addr);
    c.ok(&format!("USER {}", ALICE.0));
    assert!(c.cmd("PASS not-the-password").starts_with("-ERR [AUTH]"));
}

/// JSON logs: one object per line, with the session span's fields.
#[test]
fn json_logs_are_one_object_per_line_with_session_fields() {
    let server = GatewayProcess::start_with_config(1, &[], |addrs| {
        format!(
            "[[listener]]\naddress = \"{}\"\n[log]\nformat = \"json\"\nlevel = \"debug\"\n[backend]\nkind = \"demo\"\n",
            addrs[0]
        )
    });
    let mut c = Pop3::login(server.addr, "json-user", "pw");
    assert!(c.quit().starts_with("+OK"));
    let log = support::wait_for("the login to be logged", Duration::from_secs(5), || {
        let log = server.log();
        log.contains("logged in").then_some(log)
    });
    let mut saw_login = false;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let value: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if value["message"] == "logged in" {
            saw_login = true;
            assert_eq!(value["span"]["user"], "json-user", "{line}");
            assert!(value["span"]["peer"].as_str().is_some_and(|p| p.starts_with("127.0.0.1:")), "{line}");
            assert!(value["span"]["session"].is_number(), "{line}");
        }
    }
    assert!(saw_login, "{log}");
}

/// SIGHUP re-reads the file: a new limit applies to new connections and the
/// log says what changed.
#[test]
fn sighup_applies_new_limits_and_logs_the_change() {
    let server = GatewayProcess::start_with_config(1, &[], |addrs| {
        format!(
            "[[listener]]\naddress = \"{}\"\n[limits]\nmax_failed_logins = 3\n[backend]\nkind = \"demo\"\n",
            addrs[0]
        )
    });
    let config = server.dir().join("popgate.toml");
    let text = std::fs::read_to_string(&config).unwrap().replace("max_failed_logins = 3", "max_failed_logins = 1");
    std::fs::write(&config, text).unwrap();
    server.hangup();
    support::wait_for("the reload to be logged", Duration::from_secs(5), || {
        server.log().contains("limits.max_failed_logins: 3 -> 1").then_some(())
    });
    // One failure now closes the connection.
    let mut c = Pop3::connect(server.addr);
    let reply = c.cmd("AUTH PLAIN !!!");
    assert!(reply.starts_with("-ERR [AUTH] too many failed logins"), "{reply}");
    c.expect_closed();
}

/// Startup fails fast, with the culprit named: an unreadable certificate.
#[test]
fn startup_fails_fast_on_an_unreadable_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("popgate.toml");
    std::fs::write(
        &config,
        "[[listener]]\naddress = \"127.0.0.1:0\"\ntls = \"implicit\"\n\
         [tls]\ncertificates = [{ cert = \"/nonexistent/cert.pem\", key = \"/nonexistent/key.pem\" }]\n",
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_popgate"))
        .args(["serve", "--no-admin", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .expect("run popgate");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent/cert.pem"), "{stderr}");
}
