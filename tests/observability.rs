//! What an operator lives with (issue #13 item 5), against the real binary:
//! readiness that means "can take POP3 connections" whatever the backend
//! does, backend health in a metric and in /healthz, the SIGTERM drain
//! delay, systemd's notify protocol, logs without colour codes in a file,
//! bounded metric labels, the new metric families — and the alert rules
//! and Grafana dashboard in deploy/monitoring asking only for metric names
//! a running gateway exports.

mod support;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use popgate::auth::passwords::{SecretSource, hash_password};
use popgate::auth::tokens::{EncryptedFileStore, StoreKey, StoredToken, TokenStore, unix_now};
use popgate::mail::Secret;
use support::IO_TIMEOUT;
use support::gateway::GatewayProcess;
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

fn metrics(server: &GatewayProcess) -> String {
    let (status, text) = get(server.admin_addr, "/metrics");
    assert_eq!(status, 200);
    text
}

/// A loopback port nothing listens on (a backend that is down).
fn closed_port() -> u16 {
    support::free_port()
}

/// A backend that is down keeps the pod in the Service: /readyz 200 (and
/// "popgate ready" logged with it), POP3 clients get `-ERR [SYS/TEMP]`
/// rather than "connection refused"; the outage shows in
/// `popgate_backend_up`, `popgate_backend_errors_total` and /healthz.
#[test]
fn a_backend_outage_leaves_readiness_alone_and_shows_in_healthz_and_metrics() {
    let backend = format!("imap://127.0.0.1:{}", closed_port());
    let server = GatewayProcess::start(&["--backend", &backend]);
    support::wait_for("popgate ready in the log", IO_TIMEOUT, || server.log().contains("popgate ready").then_some(()));
    let (status, body) = get(server.admin_addr, "/readyz");
    assert_eq!((status, body.as_str()), (200, "ready\n"), "{}", server.log());

    let health = support::wait_for("the backend probe in /healthz", IO_TIMEOUT, || {
        let (status, body) = get(server.admin_addr, "/healthz");
        assert_eq!(status, 200, "liveness must not depend on the backend");
        body.contains("backend imap: UNREACHABLE").then_some(body)
    });
    assert!(health.starts_with("ok\nready\n"), "{health}");
    let text = metrics(&server);
    assert!(text.contains("popgate_backend_up{backend=\"imap\"} 0\n"), "{text}");
    assert!(text.contains("popgate_backend_errors_total{backend=\"imap\",class=\"unavailable\"} "), "{text}");

    let mut client = Pop3::connect(server.addr);
    client.ok("USER alice");
    let reply = client.cmd("PASS secret");
    assert!(reply.starts_with("-ERR [SYS/TEMP]"), "{reply}");
    assert_eq!(get(server.admin_addr, "/readyz").0, 200);
}

/// SIGTERM with `drain_delay_secs`: /readyz says 503 at once, yet new
/// clients are still served until the delay is over (a load balancer that
/// has not noticed yet refuses nobody); then accepting stops, and the
/// process exits 0. systemd hears STOPPING=1 when it begins.
#[test]
fn sigterm_keeps_accepting_through_the_drain_delay_while_not_ready() {
    let mut server = GatewayProcess::start_with_config(1, &[], |addrs| {
        format!(
            "[[listener]]\naddress = \"{}\"\n[limits]\ndrain_delay_secs = 4\nshutdown_grace_secs = 1\n[backend]\nkind = \"demo\"\n",
            addrs[0]
        )
    });
    // The signal handlers are in place, and the admin listener bound, once
    // popgate says it is ready (the POP3 port answering is not enough: on a
    // loaded machine the admin listener may not be bound yet).
    support::wait_for("popgate ready", IO_TIMEOUT, || server.log().contains("popgate ready").then_some(()));
    assert_eq!(get(server.admin_addr, "/readyz").0, 200);
    std::thread::sleep(Duration::from_millis(200));
    let terminated = Instant::now();
    server.terminate();
    support::wait_for("/readyz to say draining", Duration::from_secs(5), || {
        let (status, body) = get(server.admin_addr, "/readyz");
        (status == 503 && body.contains("draining")).then_some(())
    });
    // A new client, after readiness went 503: served in full.
    let mut late = Pop3::login(server.addr, "late", "pw");
    late.ok("STAT");
    assert!(late.quit().starts_with("+OK"));
    assert!(
        terminated.elapsed() < Duration::from_secs(4),
        "the check ran after the drain delay; the test proves nothing (machine too slow?)"
    );
    let status = server.wait(Duration::from_secs(20));
    assert!(status.success(), "exit status {status}:\n{}", server.log());
    assert!(terminated.elapsed() >= Duration::from_secs(4), "exited before drain_delay_secs was over");
    assert!(TcpStream::connect_timeout(&server.addr, Duration::from_secs(2)).is_err(), "still accepting after exit");
    let log = server.log();
    let ready = log.find("popgate ready").expect("popgate ready logged");
    let draining = log.find("accepting until drain_delay_secs is over").expect("the drain delay logged");
    assert!(ready < draining, "{log}");
}

/// `[limits] drain_delay_secs` is bounded: a long one would only postpone
/// the drain.
#[test]
fn the_drain_delay_is_bounded() {
    for (value, ok) in [(0, true), (30, true), (31, false)] {
        let text = format!("[limits]\ndrain_delay_secs = {value}\n");
        let result = popgate::config::Config::from_toml(&text, "t.toml");
        assert_eq!(result.is_ok(), ok, "drain_delay_secs = {value}: {result:?}");
        if let Err(e) = result {
            assert!(e.to_string().contains("limits.drain_delay_secs"), "{e}");
        }
    }
}

/// `Type=notify`: READY=1 arrives on NOTIFY_SOCKET only once the POP3
/// listener accepts; with WATCHDOG_USEC the watchdog is pinged; SIGTERM
/// sends STOPPING=1.
#[test]
fn systemd_hears_ready_after_the_listener_is_bound_then_watchdog_pings_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    socket.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], support::free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], support::free_port()));
    let log = std::fs::File::create(dir.path().join("popgate.log")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_popgate"))
        .args(["serve", "--backend", "demo:", "--listen", &addr.to_string(), "--admin", &admin.to_string()])
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "400000")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("run popgate");
    let show_log = || std::fs::read_to_string(dir.path().join("popgate.log")).unwrap_or_default();
    let mut buf = [0u8; 512];
    let receive = |buf: &mut [u8]| -> String {
        let n = socket.recv(buf).unwrap_or_else(|e| panic!("no notification within {IO_TIMEOUT:?}: {e}"));
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = receive(&mut buf);
    assert_eq!(first, "READY=1\n", "{}", show_log());
    // Bound before READY=1: the listener answers at once, and so does /readyz.
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("listening when READY=1 came");
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut greeting = String::new();
    BufReader::new(stream).read_line(&mut greeting).unwrap();
    assert!(greeting.starts_with("+OK"), "{greeting}");
    assert_eq!(get(admin, "/readyz").0, 200);

    let pings = (0..3).map(|_| receive(&mut buf)).collect::<Vec<_>>();
    assert!(pings.iter().all(|p| p == "WATCHDOG=1\n"), "{pings:?}");

    assert!(support::send_signal(child.id(), support::Signal::Term));
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        let message = receive(&mut buf);
        if message == "STOPPING=1\n" {
            break;
        }
        assert_eq!(message, "WATCHDOG=1\n");
        assert!(Instant::now() < deadline, "no STOPPING=1");
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}: {}", show_log());
}

/// Text logs written to a file (journald, `2>file`) carry no ANSI colour
/// codes.
#[test]
fn text_logs_to_a_file_have_no_colour_codes() {
    let server = GatewayProcess::start(&["--backend", "demo:"]);
    let mut c = Pop3::login(server.addr, "someone", "pw");
    assert!(c.quit().starts_with("+OK"));
    support::wait_for("a session in the log", IO_TIMEOUT, || server.log().contains("logged in").then_some(()));
    let log = server.log();
    assert!(!log.contains('\u{1b}'), "escape codes in a log file:\n{log:?}");
}

/// Pass-through logins are one `account` label value, never the login name
/// (unbounded, and often an e-mail address) — unless the operator opts in.
#[test]
fn pass_through_logins_are_one_label_value_unless_opted_in() {
    for opt_in in [false, true] {
        let server = GatewayProcess::start_with_config(1, &[], |addrs| {
            format!(
                "[[listener]]\naddress = \"{}\"\n[admin]\nmetrics_login_names = {opt_in}\n[backend]\nkind = \"demo\"\n",
                addrs[0]
            )
        });
        for user in ["alice@example.com", "bob@example.com"] {
            let mut c = Pop3::login(server.addr, user, "pw");
            assert!(c.quit().starts_with("+OK"));
        }
        let text = metrics(&server);
        let labelled = |value: &str| {
            text.contains(&format!("popgate_account_last_success_timestamp_seconds{{account=\"{value}\"}}"))
        };
        if opt_in {
            assert!(labelled("alice@example.com") && labelled("bob@example.com"), "{text}");
        } else {
            assert!(labelled("pass-through"), "{text}");
            assert!(!text.contains("example.com"), "a login name in the metrics:\n{text}");
        }
    }
}

/// Connections refused by a limit are counted by reason.
#[test]
fn refused_connections_are_counted_by_reason() {
    let server = GatewayProcess::start_with_config(1, &[], |addrs| {
        format!("[[listener]]\naddress = \"{}\"\n[limits]\nmax_connections = 1\n[backend]\nkind = \"demo\"\n", addrs[0])
    });
    let refusals = |text: &str| -> u64 {
        let prefix = "popgate_connections_refused_total{reason=\"max_connections\"} ";
        text.lines().find_map(|l| l.strip_prefix(prefix)).and_then(|v| v.parse().ok()).expect("the counter")
    };
    // The slot of the start-up check's connection may not be free yet.
    let mut holder = support::wait_for("the one connection slot", IO_TIMEOUT, || {
        let mut c = Pop3::connect_raw(server.addr);
        c.line().starts_with("+OK").then_some(c)
    });
    holder.ok("USER holder");
    let before = refusals(&metrics(&server));
    let mut refused = Pop3::connect_raw(server.addr);
    let reply = refused.line();
    assert!(reply.starts_with("-ERR [SYS/TEMP]"), "{reply}");
    let text = metrics(&server);
    assert_eq!(refusals(&text), before + 1, "{text}");
    assert!(text.contains("popgate_connections_refused_total{reason=\"max_connections_per_address\"} 0\n"), "{text}");
}

// ---- the monitoring files against a real scrape ------------------------------

/// A gateway that exports every family: TLS (certificate expiry), an OAuth
/// account with a stored token (token expiry, refresh counters), a
/// pass-through account (sessions, commands, deletions, last success), a
/// failed login and a refused connection.
/// A scrape of a gateway that did a bit of everything, taken once it
/// exports every family in `wanted` (some are recorded just after the reply
/// a client waits for) or the harness timeout passed.
fn scrape_everything(wanted: &BTreeSet<String>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("token.key");
    std::fs::write(&key, format!("{}\n", StoreKey::generate_text())).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let secret = dir.path().join("client-secret");
    std::fs::write(&secret, "not-used\n").unwrap();
    let store = dir.path().join("tokens.enc");
    let expires = unix_now() + 30 * 86_400;
    let token = StoredToken {
        access_token: Secret::new("access-token-for-the-test"),
        refresh_token: Some(Secret::new("refresh-token-for-the-test")),
        expires_at: Some(expires),
        obtained_at: unix_now(),
        scope: None,
    };
    let key_read = StoreKey::read(&SecretSource::File(key.clone())).unwrap();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(EncryptedFileStore::new(store.clone(), key_read).save("scans", &token))
        .expect("seed the token store");
    let ca = support::tls::TestCa::new();
    let issued = ca.issue("pop", "pop.example", &["pop.example"]);
    let (cert, cert_key) = (issued.cert.clone(), issued.key.clone());
    let idp = format!("http://127.0.0.1:{}", closed_port());
    let hash = hash_password("printer password").unwrap();
    let server = GatewayProcess::start_with_config(2, &[], |addrs| {
        format!(
            r#"
[[listener]]
address = "{plain}"
[[listener]]
address = "{tls}"
tls = "implicit"
[tls]
[[tls.certificates]]
cert = "{cert}"
key = "{cert_key}"
[backend]
kind = "demo"
[token_store]
path = "{store}"
key_file = "{key}"
[[account]]
name = "office"
mode = "passthrough"
users = ["*@example.com"]
# OAuth needs a backend that takes bearer tokens: an IMAP server that is
# down (the token's metrics need no backend).
[backends.mail]
kind = "imap"
host = "127.0.0.1"
port = {imap_port}
tls = "none"
[[account]]
name = "scans"
mode = "mapped"
backend = "mail"
login = "scans@example.com"
[account.oauth]
provider = "generic"
client_id = "popgate-test-client"
client_secret_file = "{secret}"
authorization_url = "{idp}/authorize"
token_url = "{idp}/token"
scopes = ["mail"]
redirect_uri = "http://127.0.0.1/callback"
[[account.device]]
user = "printer-1"
password_hash = "{hash}"
"#,
            plain = addrs[0],
            tls = addrs[1],
            cert = cert.display(),
            cert_key = cert_key.display(),
            store = store.display(),
            key = key.display(),
            secret = secret.display(),
            imap_port = closed_port(),
        )
    });
    let mut c = Pop3::login(server.addr, "alice@example.com", "pw");
    c.retr(1);
    c.ok("DELE 1");
    assert!(c.quit().starts_with("+OK"));
    let mut bad = Pop3::connect(server.addr);
    bad.ok("USER nobody");
    let _ = bad.cmd("PASS wrong");
    // A device of the OAuth account: its token is loaded (and its expiry
    // exported); the IMAP server behind it is down.
    let mut device = Pop3::connect(server.addr);
    device.ok("USER printer-1");
    let reply = device.cmd("PASS printer password");
    assert!(reply.starts_with("-ERR [SYS/TEMP]"), "{reply}");
    // Not TLS on the implicit-TLS port: a refused handshake.
    let mut not_tls = TcpStream::connect_timeout(&server.addrs[1], IO_TIMEOUT).unwrap();
    not_tls.write_all(b"USER x\r\n").unwrap();
    let families = wanted;
    let wanted = format!("popgate_oauth_token_expiry_timestamp_seconds{{account=\"scans\"}} {expires}");
    let deadline = Instant::now() + IO_TIMEOUT;
    let text = loop {
        let text = metrics(&server);
        let exported = exported_names(&text);
        if text.contains(&wanted) && families.iter().all(|family| exported.contains(family)) {
            break text;
        }
        let missing: Vec<_> = families.iter().filter(|family| !exported.contains(*family)).collect();
        assert!(
            Instant::now() < deadline,
            "no {wanted}, or not exported: {missing:?}, in\n{text}\nlog:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        text.contains(&format!(
            "popgate_tls_certificate_expiry_timestamp_seconds{{certificate=\"{}\"}}",
            cert.display()
        )),
        "{text}"
    );
    text
}

/// Sample names (`name{…} value` / `name value`) of a scrape.
fn exported_names(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect()
}

/// Every `popgate_…` / `process_…` identifier in a text (a PromQL
/// expression, a rule file).
fn metric_names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if !text.is_char_boundary(i) {
            i += 1;
            continue;
        }
        let rest = &text[i..];
        if boundary && (rest.starts_with("popgate_") || rest.starts_with("process_")) {
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
            names.insert(rest[..end].to_string());
            i += end;
        } else {
            i += 1;
        }
    }
    names
}

/// Every query of a Grafana dashboard: panels' `expr`, variables'
/// `definition`.
fn dashboard_queries(dashboard: &serde_json::Value, out: &mut Vec<String>) {
    match dashboard {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    // Panel queries, and query variables' definitions.
                    ("expr" | "definition", serde_json::Value::String(q)) => out.push(q.clone()),
                    _ => dashboard_queries(value, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| dashboard_queries(v, out)),
        _ => {}
    }
}

/// The shipped alert rules and Grafana dashboard ask only for metrics a
/// running popgate exports (a renamed metric would leave an alert silent
/// forever), and the dashboard is valid JSON with queries in it.
#[test]
fn alert_rules_and_dashboard_ask_only_for_exported_metrics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rules_file = root.join("deploy/monitoring/popgate.rules.yaml");
    let rules = std::fs::read_to_string(&rules_file).expect("deploy/monitoring/popgate.rules.yaml");
    let dashboard_file = root.join("deploy/monitoring/grafana-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&dashboard_file).expect("the dashboard"))
            .expect("the dashboard is JSON");
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);
    assert!(queries.len() >= 8, "the dashboard has {} queries", queries.len());

    let mut wanted = metric_names_in(&rules);
    for query in &queries {
        let names = metric_names_in(query);
        assert!(!names.is_empty(), "a dashboard query names no popgate metric: {query}");
        wanted.extend(names);
    }
    let exported = exported_names(&scrape_everything(&wanted));
    for family in
        ["process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds", "process_start_time_seconds"]
    {
        assert!(exported.contains(family), "{family} not exported: {exported:?}");
    }
    let missing: Vec<_> = wanted.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(missing.is_empty(), "asked for but not exported: {missing:?}\nexported: {exported:?}");
    // Each alert the issue asks for is there.
    for alert in [
        "PopgateAccountStoppedPolling",
        "PopgateOAuthRefreshFailing",
        "PopgateOAuthInvalidGrant",
        "PopgateBackendErrors",
        "PopgateCertificateExpiringSoon",
    ] {
        assert!(rules.contains(&format!("alert: {alert}")), "no {alert} in {}", rules_file.display());
    }
}

#[test]
fn metric_names_are_found_in_promql() {
    let names = metric_names_in(
        "sum by (account) (rate(popgate_oauth_refreshes_total{result!=\"ok\"}[15m])) > 0 and on() process_open_fds",
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        vec!["popgate_oauth_refreshes_total".to_string(), "process_open_fds".to_string()]
    );
    assert!(metric_names_in("PopgateBackendErrors x_popgate_y").is_empty());
}
