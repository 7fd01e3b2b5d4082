//! The front door: what a POP3 client meets before it reaches a mailbox.
//!
//! - TLS towards clients, with real clients (openssl s_client, curl, Python's
//!   poplib) and a rustls client of our own, all trusting only a CA made at
//!   run time: implicit TLS and STLS, TLS 1.2 and 1.3 only, a certificate
//!   per SNI name, and certificates replaced while sessions stay open
//!   (explicit reload, the file watcher, SIGHUP to the binary).
//! - Who may log in how: cleartext logins refused off loopback unless the
//!   listener allows them (optionally per network); CAPA advertises only
//!   what works; cleartext pipelined after STLS is never executed.
//! - SASL PLAIN and LOGIN (with and without initial response, cancelled),
//!   and no OAuth mechanisms where the backend takes no bearer tokens.
//! - Abuse protection: failed-login throttling (growth, cap, release, per
//!   session), a 10 000-failure burst that must not slow another client or
//!   grow memory, connection limits overall and per address, the login
//!   timeout.
//!
//! Client addresses: 127.0.0.0/8 is all loopback, so a test plays several
//! hosts by binding its client sockets to 127.0.0.2, 127.0.0.3, …; listeners
//! set `loopback_is_secure = false` wherever loopback must not be trusted.

mod support;

use support::program::describe;

/// Runs a program to completion with `input` on stdin, killing it after the
/// harness time limit.
fn run(program: &str, args: &[&str], input: &[u8]) -> Output {
    support::program::run_with(program, args, &[], Some(input))
}

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use popgate::backend::demo::{DemoBackend, DemoStore};
use popgate::config::Config;
use popgate::server::config::ListenerConfig;
use popgate::server::policy::ListenerTls;
use support::gateway::{Gateway, GatewayProcess};
use support::messages::{canonical, simple};
use support::pop3::{Pop3, plain_response};
use support::tls::{Client, ServerCert, TestCa, has_capability, sasl_mechanisms, tcp, tcp_from};
use support::wait_for;

const USER: &str = "alice";
const PASS: &str = "door-Pass-4711";
const NAME_A: &str = "pop.a.test";
const NAME_B: &str = "pop.b.test";

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// 127.0.0.1, the default client address.
fn home() -> IpAddr {
    ip(1)
}

/// A store where alice (password `PASS`) has two messages.
fn store() -> DemoStore {
    let store = DemoStore::new();
    store.add_user(USER, PASS);
    store.add_user("bob", "bob-pass");
    store.append(USER, simple("first"));
    store.append(USER, simple("second"));
    store
}

/// One listener with `tls`, loopback NOT trusted, and these certificates.
fn config(tls: ListenerTls, certs: &[&ServerCert]) -> Config {
    let listener =
        ListenerConfig { tls, loopback_is_secure: false, ..ListenerConfig::plain("127.0.0.1:0".parse().unwrap()) };
    let mut config = Config { listener: vec![listener], ..Config::default() };
    config.tls.certificates = certs.iter().map(|c| c.config()).collect();
    config.tls.reload_check_secs = 0;
    config
}

fn start(config: Config, store: &DemoStore) -> Gateway {
    Gateway::start(config, Arc::new(DemoBackend::new(store.clone())))
}

/// A CA, a certificate for pop.a.test (the default) and one for pop.b.test.
fn two_certificates() -> (TestCa, ServerCert, ServerCert) {
    let ca = TestCa::new();
    let a = ca.issue("a", "cert-a", &[NAME_A]);
    let b = ca.issue("b", "cert-b", &[NAME_B]);
    (ca, a, b)
}

// ---------------------------------------------------------------------------
// Running real clients

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `openssl s_client` to `addr` with SNI `name` (None: no SNI), verifying
/// against the test CA (and the host name, when there is one), sending
/// `commands` once TLS is up and reading until the server closes.
fn s_client(ca: &TestCa, addr: SocketAddr, name: Option<&str>, extra: &[&str], commands: &str) -> Output {
    let connect = addr.to_string();
    let ca_file = ca.ca_file.display().to_string();
    let mut args = vec![
        "s_client",
        "-connect",
        &connect,
        "-CAfile",
        &ca_file,
        "-verify_return_error",
        "-crlf",
        "-ign_eof",
        "-showcerts",
    ];
    if let Some(name) = name {
        args.extend(["-servername", name, "-verify_hostname", name]);
    }
    args.extend_from_slice(extra);
    run("openssl", &args, commands.as_bytes())
}

/// The subject line openssl prints for the server certificate.
fn s_client_subject(output: &Output) -> String {
    let text = stdout(output);
    text.lines()
        .find_map(|l| l.strip_prefix("subject="))
        .unwrap_or_else(|| panic!("no subject= in s_client output:\n{}", describe(output)))
        .to_string()
}

/// The protocol s_client reports ("TLSv1.2", "TLSv1.3").
fn s_client_protocol(output: &Output) -> String {
    let text = stdout(output);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Protocol  :").or_else(|| l.trim().strip_prefix("Protocol :")))
        .map(|p| p.trim().to_string())
        .or_else(|| {
            // "New, TLSv1.3, Cipher is TLS_AES_256_GCM_SHA384"
            text.lines().find_map(|l| l.strip_prefix("New, ").and_then(|r| r.split(',').next()).map(str::to_string))
        })
        .unwrap_or_else(|| panic!("no protocol in s_client output:\n{}", describe(output)))
}

/// Python's poplib against popgate. `name` is what the client believes it
/// connects to (SNI and host name check); every name resolves to 127.0.0.1
/// (as curl's --resolve does). The script's JSON result is returned.
fn poplib(ca: &TestCa, addr: SocketAddr, name: &str, mode: &str, extra: &str) -> serde_json::Value {
    const SCRIPT: &str = r#"
import json, poplib, socket, ssl, sys
ca, port, name, mode, user, password, extra = sys.argv[1:8]
port = int(port)
real = socket.create_connection
socket.create_connection = lambda addr, *a, **kw: real(("127.0.0.1", addr[1]), *a, **kw)
ctx = ssl.create_default_context(cafile=ca)
if extra.startswith("max="):
    version = getattr(ssl.TLSVersion, extra[4:])
    ctx.minimum_version = version
    ctx.maximum_version = version
    # Let the client really offer old versions (OpenSSL 3 hides them at
    # security level 1): a refusal must then come from the server.
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
out = {}
try:
    if mode == "implicit":
        pop = poplib.POP3_SSL(name, port, context=ctx, timeout=20)
    else:
        pop = poplib.POP3(name, port, timeout=20)
        out["capa_before"] = sorted(pop.capa().keys())
        out["stls"] = pop.stls(context=ctx).decode()
    out["version"] = pop.sock.version()
    cert = pop.sock.getpeercert()
    out["subject_cn"] = [v for rdn in cert["subject"] for (k, v) in rdn if k == "commonName"]
    out["san"] = [v for (k, v) in cert.get("subjectAltName", ()) if k == "DNS"]
    out["capa_after"] = sorted(pop.capa().keys())
    pop.user(user)
    out["pass"] = pop.pass_(password).decode()
    out["stat"] = list(pop.stat())
    out["retr1"] = b"\r\n".join(pop.retr(1)[1]).decode() + "\r\n"
    out["quit"] = pop.quit().decode()
except ssl.SSLError as e:
    out["ssl_error"] = e.reason or str(e)
print(json.dumps(out))
"#;
    let port = addr.port().to_string();
    let ca_file = ca.ca_file.display().to_string();
    let output = run("python3", &["-c", SCRIPT, &ca_file, &port, name, mode, USER, PASS, extra], b"");
    assert!(output.status.success(), "poplib: {}", describe(&output));
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("poplib output ({e}): {}", describe(&output)))
}

/// curl against popgate, `name` resolved to 127.0.0.1.
fn curl(ca: &TestCa, url: &str, name: &str, port: u16, extra: &[&str]) -> Output {
    let resolve = format!("{name}:{port}:127.0.0.1");
    let credentials = format!("{USER}:{PASS}");
    let ca_file = ca.ca_file.display().to_string();
    let mut args = vec![
        "--silent",
        "--show-error",
        "--max-time",
        "20",
        "--cacert",
        &ca_file,
        "--resolve",
        &resolve,
        "--user",
        &credentials,
    ];
    args.extend_from_slice(extra);
    args.push(url);
    run("curl", &args, b"")
}

fn subject_of(cert: &ServerCert) -> String {
    format!("CN = {}", cert.common_name)
}

// ---------------------------------------------------------------------------
// TLS with real clients

#[test]
fn implicit_tls_serves_openssl_curl_and_poplib() {
    let (ca, a, b) = two_certificates();
    let store = store();
    let gateway = start(config(ListenerTls::Implicit, &[&a, &b]), &store);
    let addr = gateway.addr;

    let output = s_client(&ca, addr, Some(NAME_A), &[], &format!("USER {USER}\nPASS {PASS}\nSTAT\nQUIT\n"));
    let text = stdout(&output);
    assert!(output.status.success(), "{}", describe(&output));
    assert!(text.contains("Verify return code: 0 (ok)"), "{}", describe(&output));
    assert_eq!(s_client_subject(&output), subject_of(&a));
    assert!(text.contains("+OK popgate ready"), "{text}");
    let stat = format!("+OK 2 {}", canonical(&simple("first")).len() + canonical(&simple("second")).len());
    assert!(text.contains(&stat), "expected {stat:?} in\n{text}");
    assert!(text.contains("+OK popgate signing off"), "{text}");

    let url = format!("pop3s://{NAME_A}:{}/1", addr.port());
    let output = curl(&ca, &url, NAME_A, addr.port(), &[]);
    assert!(output.status.success(), "{}", describe(&output));
    assert_eq!(output.stdout, canonical(&simple("first")), "{}", describe(&output));

    let result = poplib(&ca, addr, NAME_B, "implicit", "");
    assert_eq!(result["subject_cn"], serde_json::json!(["cert-b"]), "{result}");
    assert_eq!(result["san"], serde_json::json!([NAME_B]), "{result}");
    assert!(result["pass"].as_str().unwrap().starts_with("+OK"), "{result}");
    assert_eq!(result["stat"][0], 2, "{result}");
    assert_eq!(result["retr1"].as_str().unwrap().as_bytes(), canonical(&simple("first")), "{result}");
    assert!(result["quit"].as_str().unwrap().starts_with("+OK"), "{result}");
    // Logged in over TLS from loopback with loopback_is_secure = false:
    // USER and SASL are offered under TLS.
    let capa: Vec<String> = serde_json::from_value(result["capa_after"].clone()).unwrap();
    assert!(capa.contains(&"USER".to_string()) && capa.contains(&"SASL".to_string()), "{capa:?}");
    assert!(!capa.contains(&"STLS".to_string()), "{capa:?}");
}

#[test]
fn starttls_serves_openssl_curl_and_poplib_and_cleartext_curl_is_refused() {
    let (ca, a, b) = two_certificates();
    let store = store();
    let gateway = start(config(ListenerTls::Starttls, &[&a, &b]), &store);
    let addr = gateway.addr;

    let output =
        s_client(&ca, addr, Some(NAME_B), &["-starttls", "pop3"], &format!("CAPA\nUSER {USER}\nPASS {PASS}\nQUIT\n"));
    let text = stdout(&output);
    assert!(output.status.success(), "{}", describe(&output));
    assert!(text.contains("Verify return code: 0 (ok)"), "{}", describe(&output));
    assert_eq!(s_client_subject(&output), subject_of(&b));
    assert!(text.contains("+OK maildrop has 2 messages"), "{text}");
    assert!(text.contains("\nUSER\r\n") || text.contains("\nUSER\n"), "CAPA after STLS lists USER:\n{text}");
    assert!(!text.contains("\nSTLS\r\n") && !text.contains("\nSTLS\n"), "CAPA after STLS lists STLS:\n{text}");

    // curl with --ssl-reqd uses STLS; the login then works.
    let url = format!("pop3://{NAME_A}:{}/2", addr.port());
    let output = curl(&ca, &url, NAME_A, addr.port(), &["--ssl-reqd"]);
    assert!(output.status.success(), "{}", describe(&output));
    assert_eq!(output.stdout, canonical(&simple("second")), "{}", describe(&output));

    // Without it curl stays in cleartext, and its login is refused.
    let output = curl(&ca, &url, NAME_A, addr.port(), &[]);
    assert!(!output.status.success(), "a cleartext login from a non-secure address worked:\n{}", describe(&output));
    assert!(output.stdout.is_empty(), "{}", describe(&output));

    let result = poplib(&ca, addr, NAME_A, "stls", "");
    let before: Vec<String> = serde_json::from_value(result["capa_before"].clone()).unwrap();
    assert!(before.contains(&"STLS".to_string()), "{result}");
    assert!(!before.contains(&"USER".to_string()) && !before.contains(&"SASL".to_string()), "{result}");
    let after: Vec<String> = serde_json::from_value(result["capa_after"].clone()).unwrap();
    assert!(after.contains(&"USER".to_string()) && after.contains(&"SASL".to_string()), "{result}");
    assert!(!after.contains(&"STLS".to_string()), "{result}");
    assert_eq!(result["subject_cn"], serde_json::json!(["cert-a"]), "{result}");
    assert!(result["pass"].as_str().unwrap().starts_with("+OK"), "{result}");
    assert_eq!(result["retr1"].as_str().unwrap().as_bytes(), canonical(&simple("first")), "{result}");
    assert!(result["quit"].as_str().unwrap().starts_with("+OK"), "{result}");
}

#[test]
fn only_tls_1_2_and_1_3_are_accepted() {
    let (ca, a, b) = two_certificates();
    let store = store();
    let implicit = start(config(ListenerTls::Implicit, &[&a, &b]), &store);
    let starttls = start(config(ListenerTls::Starttls, &[&a, &b]), &store);

    for (gateway, extra) in [(&implicit, &[][..]), (&starttls, &["-starttls", "pop3"][..])] {
        for (flag, want) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
            let args: Vec<&str> = extra.iter().copied().chain([flag]).collect();
            let output = s_client(&ca, gateway.addr, Some(NAME_A), &args, "QUIT\n");
            assert!(output.status.success(), "{flag} {extra:?}: {}", describe(&output));
            assert_eq!(s_client_protocol(&output), want, "{}", describe(&output));
            assert!(stdout(&output).contains("+OK popgate signing off"), "{}", describe(&output));
        }
        // TLS 1.1, really offered (security level 0 lets OpenSSL 3 send it):
        // the server answers with a fatal alert. (rustls sends
        // handshake_failure, as a TLS 1.1 ClientHello lacks the
        // signature_algorithms extension, rather than RFC 8996's
        // protocol_version; either way nothing is negotiated.)
        let args: Vec<&str> = extra.iter().copied().chain(["-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"]).collect();
        let output = s_client(&ca, gateway.addr, Some(NAME_A), &args, "QUIT\n");
        let all = describe(&output);
        assert!(!output.status.success(), "TLS 1.1 handshake succeeded ({extra:?}):\n{all}");
        assert!(!all.contains("no protocols available"), "the client did not offer TLS 1.1 at all:\n{all}");
        assert!(stdout(&output).contains("Protocol  : TLSv1.1"), "the client offered TLS 1.1:\n{all}");
        assert!(
            all.contains("alert handshake failure") || all.contains("alert protocol version"),
            "expected a fatal alert from the server:\n{all}"
        );
        assert!(stdout(&output).contains("no peer certificate available"), "{all}");
        assert!(!stdout(&output).contains("+OK"), "{all}");
    }

    // Python's ssl, the same way round.
    for (gateway, mode) in [(&implicit, "implicit"), (&starttls, "stls")] {
        let refused = poplib(&ca, gateway.addr, NAME_A, mode, "max=TLSv1_1");
        let reason = refused["ssl_error"].as_str().unwrap_or_else(|| panic!("TLS 1.1 was accepted: {refused}"));
        // An alert received from the server, not a local refusal to offer
        // TLS 1.1 (NO_PROTOCOLS_AVAILABLE).
        assert!(reason.contains("ALERT"), "{mode}: {refused}");
    }
    for version in ["TLSv1_2", "TLSv1_3"] {
        let result = poplib(&ca, implicit.addr, NAME_A, "implicit", &format!("max={version}"));
        assert_eq!(result["version"], version.replace('_', "."), "{result}");
        assert!(result["quit"].as_str().unwrap().starts_with("+OK"), "{result}");
    }

    // Our own rustls client, pinned to each version.
    for (version, want) in [
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let mut c = Client::implicit(home(), implicit.addr, ca.client_config_for(&[version]), NAME_A);
        assert_eq!(c.protocol_version(), want);
        c.user_pass(USER, PASS);
        c.quit();
    }
}

#[test]
fn sni_chooses_the_certificate_for_each_name() {
    let ca = TestCa::new();
    let a = ca.issue("a", "cert-a", &[NAME_A]);
    let b = ca.issue("b", "cert-b", &[NAME_B, "*.wild.test"]);
    let store = store();
    let implicit = start(config(ListenerTls::Implicit, &[&a, &b]), &store);
    let starttls = start(config(ListenerTls::Starttls, &[&a, &b]), &store);

    for (gateway, extra) in [(&implicit, &[][..]), (&starttls, &["-starttls", "pop3"][..])] {
        for (name, want) in [(NAME_A, &a), (NAME_B, &b), ("mail.wild.test", &b)] {
            let output = s_client(&ca, gateway.addr, Some(name), extra, "QUIT\n");
            assert!(output.status.success(), "{name}: {}", describe(&output));
            assert_eq!(s_client_subject(&output), subject_of(want), "SNI {name} ({extra:?})");
        }
        // No SNI, or a name no certificate has: the first (default)
        // certificate. (The client's host name check would fail for the
        // unknown name; openssl is told not to check it.)
        let no_sni: Vec<&str> = extra.iter().copied().chain(["-noservername"]).collect();
        let output = s_client(&ca, gateway.addr, None, &no_sni, "QUIT\n");
        assert!(output.status.success(), "{}", describe(&output));
        assert_eq!(s_client_subject(&output), subject_of(&a));
        let unknown: Vec<&str> = extra.iter().copied().chain(["-servername", "other.test"]).collect();
        let output = s_client(&ca, gateway.addr, None, &unknown, "QUIT\n");
        assert_eq!(s_client_subject(&output), subject_of(&a), "{}", describe(&output));
    }

    // poplib and our own client see the same.
    for (name, want) in [(NAME_A, "cert-a"), (NAME_B, "cert-b")] {
        let result = poplib(&ca, implicit.addr, name, "implicit", "");
        assert_eq!(result["subject_cn"], serde_json::json!([want]), "{result}");
        let result = poplib(&ca, starttls.addr, name, "stls", "");
        assert_eq!(result["subject_cn"], serde_json::json!([want]), "{result}");
    }
    for (name, want) in [(NAME_A, &a), (NAME_B, &b)] {
        let c = Client::implicit(home(), implicit.addr, ca.client_config(), name);
        assert_eq!(c.peer_certificate(), want.der, "{name}");
        let c = Client::connect(starttls.addr).stls(ca.client_config(), name);
        assert_eq!(c.peer_certificate(), want.der, "{name} (STLS)");
    }
}

// ---------------------------------------------------------------------------
// Who may log in how

#[test]
fn starttls_listener_refuses_cleartext_login_and_advertises_only_what_works() {
    let (ca, a, _b) = two_certificates();
    let store = store();
    let gateway = start(config(ListenerTls::Starttls, &[&a]), &store);

    let mut c = Client::connect(gateway.addr);
    let capa = c.capa();
    assert!(has_capability(&capa, "STLS"), "{capa:?}");
    assert!(!has_capability(&capa, "USER"), "{capa:?}");
    assert!(sasl_mechanisms(&capa).is_empty(), "{capa:?}");
    let plain = format!("AUTH PLAIN {}", plain_response(USER.as_bytes(), PASS.as_bytes()));
    for command in [&format!("USER {USER}"), &format!("PASS {PASS}"), &plain, "AUTH LOGIN", "AUTH"] {
        let reply = c.err(command);
        assert!(reply.starts_with("-ERR [AUTH]"), "{command:?} → {reply}");
        assert!(reply.contains("use STLS"), "{command:?} → {reply}");
    }
    // Refusals are not failed logins: the connection stays, STLS works.
    let mut c = c.stls(ca.client_config(), NAME_A);
    let capa = c.capa();
    assert!(has_capability(&capa, "USER"), "{capa:?}");
    assert_eq!(sasl_mechanisms(&capa), ["PLAIN", "LOGIN"], "{capa:?}");
    assert!(!has_capability(&capa, "STLS"), "{capa:?}");
    c.err("STLS");
    c.user_pass(USER, PASS);
    let reply = c.err("STLS");
    assert!(!reply.starts_with("-ERR [AUTH]"), "{reply}");
    assert_eq!(c.stat().0, 2);
    let capa = c.capa();
    assert!(!has_capability(&capa, "STLS") && !has_capability(&capa, "USER"), "{capa:?}");
    assert!(c.quit().starts_with("+OK"));
}

#[test]
fn plain_listener_refuses_cleartext_login_off_loopback_and_offers_nothing() {
    let store = store();
    let gateway = start(config(ListenerTls::None, &[]), &store);
    let mut c = Client::connect(gateway.addr);
    let capa = c.capa();
    for hidden in ["USER", "SASL", "STLS"] {
        assert!(!has_capability(&capa, hidden), "{hidden} in {capa:?}");
    }
    for command in [format!("USER {USER}"), format!("AUTH PLAIN {}", plain_response(USER.as_bytes(), PASS.as_bytes()))]
    {
        let reply = c.err(&command);
        // RFC 3206: [AUTH] covers "an attempt to authenticate in violation
        // of policy". There is no STLS here, so it must not be suggested.
        assert!(reply.starts_with("-ERR [AUTH]"), "{command:?} → {reply}");
        assert!(!reply.contains("STLS"), "{command:?} → {reply}");
    }
    let reply = c.err("STLS");
    assert!(reply.contains("not available"), "{reply}");
    assert!(c.quit().starts_with("+OK"));
}

#[test]
fn loopback_counts_as_secure_by_default() {
    let store = store();
    let mut config = config(ListenerTls::None, &[]);
    config.listener[0].loopback_is_secure = true;
    let gateway = start(config, &store);
    let mut c = Client::connect_from(ip(9), gateway.addr);
    let capa = c.capa();
    assert!(has_capability(&capa, "USER") && !has_capability(&capa, "STLS"), "{capa:?}");
    c.user_pass(USER, PASS);
    c.quit();
}

#[test]
fn cleartext_login_is_allowed_only_from_the_configured_networks() {
    let store = store();
    let mut config = config(ListenerTls::None, &[]);
    config.listener[0].allow_cleartext_login = true;
    config.listener[0].cleartext_networks = vec!["127.0.0.2/32".parse().unwrap()];
    // Every login opens the store (none is served warm), to count them.
    config.backend_pool.enabled = false;
    let gateway = start(config, &store);

    let mut allowed = Client::connect_from(ip(2), gateway.addr);
    let capa = allowed.capa();
    assert!(has_capability(&capa, "USER"), "{capa:?}");
    assert_eq!(sasl_mechanisms(&capa), ["PLAIN", "LOGIN"], "{capa:?}");
    allowed.user_pass(USER, PASS);
    assert_eq!(allowed.stat().0, 2);
    allowed.quit();
    let mut allowed = Client::connect_from(ip(2), gateway.addr);
    assert!(
        allowed.cmd(&format!("AUTH PLAIN {}", plain_response(USER.as_bytes(), PASS.as_bytes()))).starts_with("+OK")
    );
    allowed.quit();

    for outsider in [ip(3), ip(1)] {
        let mut c = Client::connect_from(outsider, gateway.addr);
        let capa = c.capa();
        assert!(!has_capability(&capa, "USER") && sasl_mechanisms(&capa).is_empty(), "{outsider}: {capa:?}");
        let reply = c.err(&format!("USER {USER}"));
        assert!(reply.starts_with("-ERR [AUTH]"), "{outsider}: {reply}");
        let reply = c.err(&format!("AUTH PLAIN {}", plain_response(USER.as_bytes(), PASS.as_bytes())));
        assert!(reply.starts_with("-ERR [AUTH]"), "{outsider}: {reply}");
        c.quit();
    }
    assert_eq!(store.logins(), 2, "only 127.0.0.2's logins reached the store");
}

/// RFC 2595 section 4 and the classic STARTTLS injection (CVE-2011-0411 and
/// its POP3 kin): commands a man in the middle appends to STLS in the same
/// packet are cleartext and must be thrown away, never run under TLS.
#[test]
fn cleartext_pipelined_after_stls_is_discarded_and_logged() {
    let ca = TestCa::new();
    let a = ca.issue("a", "cert-a", &[NAME_A]);
    // The real binary (for its log), over the demo store, where any user
    // name and password log in: an executed `USER evil` would make the
    // next PASS a login as evil.
    let server = GatewayProcess::start_with_config(1, &[("RUST_LOG", "popgate=debug")], |addrs| {
        format!(
            "[[listener]]\naddress = \"{}\"\ntls = \"starttls\"\nloopback_is_secure = false\n\n\
             [tls]\ncertificates = [{{ cert = {:?}, key = {:?} }}]\n\n[backend]\nkind = \"demo\"\n",
            addrs[0],
            a.cert.display().to_string(),
            a.key.display().to_string()
        )
    });

    for injected in ["USER evil\r\n", "USER evil\r\nPASS evil\r\n", "USER evil\r\nPASS evil\r\nSTAT\r\nQUIT\r\nUSER ev"]
    {
        let mut c = Client::connect(server.addr);
        c.send_raw(format!("STLS\r\n{injected}").as_bytes());
        let reply = c.line();
        assert!(reply.starts_with("+OK"), "STLS → {reply}");
        // Fails if popgate answered any injected command in cleartext.
        let mut c = c.start_tls(ca.client_config(), NAME_A).expect("handshake after STLS");
        let reply = c.cmd("PASS x");
        assert!(
            reply.starts_with("-ERR") && reply.contains("USER first"),
            "after STLS + {injected:?}, PASS was taken as following an injected USER: {reply}"
        );
        let capa = c.capa();
        assert!(has_capability(&capa, "USER") && !has_capability(&capa, "STLS"), "{capa:?}");
        c.user_pass("alice", "alice's password");
        assert_eq!(c.stat().0, 3);
        assert!(c.quit().starts_with("+OK"));
    }
    let log = wait_for("the discard in popgate's log", Duration::from_secs(5), || {
        let log = server.log();
        (log.matches("discarding plaintext pipelined after STLS").count() >= 3).then_some(log)
    });
    assert!(!log.contains("evil"), "the injected user name reached a login:\n{log}");
    assert!(log.contains("logged in"), "{log}");
}

/// What the client said before TLS is not carried over either: a USER given
/// in cleartext (where cleartext login is allowed, e.g. from loopback) must
/// not make a PASS after STLS a login as that user (RFC 2595 section 4: the
/// server restarts in the AUTHORIZATION state; cf. RFC 3207 section 4.2,
/// "discard any knowledge obtained from the client").
#[test]
fn a_user_name_given_before_stls_does_not_survive_it() {
    let ca = TestCa::new();
    let a = ca.issue("a", "cert-a", &[NAME_A]);
    let store = store();
    let mut config = config(ListenerTls::Starttls, &[&a]);
    config.listener[0].loopback_is_secure = true;
    let gateway = start(config, &store);

    let mut c = Client::connect(gateway.addr);
    // A man in the middle inserts USER before the client's own STLS and
    // swallows its +OK.
    c.send_raw(format!("USER {USER}\r\nSTLS\r\n").as_bytes());
    assert!(c.line().starts_with("+OK"), "USER in cleartext from loopback is allowed");
    assert!(c.line().starts_with("+OK"), "STLS");
    let mut c = c.start_tls(ca.client_config(), NAME_A).expect("handshake");
    let reply = c.cmd(&format!("PASS {PASS}"));
    // A USER received in cleartext must not survive STLS: this PASS (sent
    // under TLS, with no USER under TLS) must not log in as the user the
    // cleartext side named.
    assert!(reply.starts_with("-ERR"), "PASS after STLS used the USER sent before it: {reply}");
}

// ---------------------------------------------------------------------------
// Certificates replaced while sessions stay open

#[test]
fn reloaded_certificates_serve_new_connections_and_spare_open_sessions() {
    let ca = TestCa::new();
    let a = ca.issue("a", "cert-a", &[NAME_A]);
    let store = store();
    let gateway = start(config(ListenerTls::Implicit, &[&a]), &store);

    let mut old = Client::implicit(home(), gateway.addr, ca.client_config(), NAME_A);
    assert_eq!(old.peer_certificate(), a.der);
    old.user_pass(USER, PASS);

    let a2 = ca.replace(&a, "cert-a-2");
    // Not re-read before a reload (reload_check_secs = 0).
    let c = Client::implicit(home(), gateway.addr, ca.client_config(), NAME_A);
    assert_eq!(c.peer_certificate(), a.der);
    drop(c);
    gateway.reload_certificates().expect("reload");
    let mut new = Client::implicit(home(), gateway.addr, ca.client_config(), NAME_A);
    assert_eq!(new.peer_certificate(), a2.der, "a new connection after the reload gets the new certificate");
    new.user_pass(USER, PASS);

    // The session opened before the reload goes on.
    assert_eq!(old.retr(1), canonical(&simple("first")));
    old.ok("DELE 2");
    assert!(old.quit().starts_with("+OK"));
    assert_eq!(store.contents(USER).len(), 1);
    new.quit();

    // A broken replacement keeps what is in use.
    std::fs::write(&a.cert, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
    let error = gateway.reload_certificates().expect_err("a broken certificate must not load");
    assert!(error.contains("a.crt"), "the error names the file: {error}");
    let c = Client::implicit(home(), gateway.addr, ca.client_config(), NAME_A);
    assert_eq!(c.peer_certificate(), a2.der);
    let mut old = Client::implicit(home(), gateway.addr, ca.client_config(), NAME_A);
    old.user_pass(USER, PASS);
    old.quit();
}

/// An unreadable key file must be named as such: the operator fixing a
/// failed reload (or start) goes to the file the error names.
#[test]
fn a_broken_key_file_is_named_in_the_reload_error() {
    let ca = TestCa::new();
    let a = ca.issue("a", "cert-a", &[NAME_A]);
    let store = store();
    let gateway = start(config(ListenerTls::Implicit, &[&a]), &store);
    // Well-formed PEM, but not a key.
    std::fs::write(&a.key, "-----BEGIN PRIVATE KEY-----\nAAAAAAAA\n-----END PRIVATE KEY-----\n").unwrap();
    let error = gateway.reload_certificates().expect_err("a broken key must not load");
    let c = Client::implicit(home(), gateway.addr, ca.client_config(), NAME_A);
    assert_eq!(c.peer_certificate(), a.der, "the old certificate stays");
    // A key the provider cannot load is the key file's fault, not a
    // mismatch with the (intact) certificate.
    assert!(error.contains("a.key"), "the error must name the broken key file: {error}");
}

#[test]
fn changed_certificate_files_are_picked_up_by_the_watcher() {
    let ca = TestCa::new();
    let a = ca.issue("a", "cert-a", &[NAME_A]);
    let store = store();
    let mut config = config(ListenerTls::Starttls, &[&a]);
    config.tls.reload_check_secs = 1;
    let gateway = start(config, &store);

    let mut old = Client::connect(gateway.addr).stls(ca.client_config(), NAME_A);
    assert_eq!(old.peer_certificate(), a.der);
    old.user_pass(USER, PASS);
    // File times must differ from the loaded ones even on coarse clocks.
    std::thread::sleep(Duration::from_millis(50));
    let a2 = ca.replace(&a, "cert-a-2");
    let started = Instant::now();
    wait_for("the watcher to load the new certificate", Duration::from_secs(10), || {
        let c = Client::connect(gateway.addr).stls(ca.client_config(), NAME_A);
        (c.peer_certificate() == a2.der).then_some(())
    });
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?} with reload_check_secs = 1", started.elapsed());
    assert_eq!(old.retr(2), canonical(&simple("second")));
    assert!(old.quit().starts_with("+OK"));
}

#[test]
fn sighup_reloads_the_binarys_certificates_and_spares_open_sessions() {
    let ca = TestCa::new();
    let a = ca.issue("a", "cert-a", &[NAME_A]);
    let server = GatewayProcess::start_with_config(2, &[], |addrs| {
        format!(
            "[[listener]]\naddress = \"{}\"\ntls = \"implicit\"\nloopback_is_secure = false\n\n\
             [[listener]]\naddress = \"{}\"\ntls = \"starttls\"\nloopback_is_secure = false\n\n\
             [tls]\ncertificates = [{{ cert = {:?}, key = {:?} }}]\nreload_check_secs = 0\n\n\
             [backend]\nkind = \"demo\"\n",
            addrs[0],
            addrs[1],
            a.cert.display().to_string(),
            a.key.display().to_string()
        )
    });
    let (implicit, starttls) = (server.addrs[0], server.addrs[1]);
    let mut old_implicit = Client::implicit(home(), implicit, ca.client_config(), NAME_A);
    assert_eq!(old_implicit.peer_certificate(), a.der);
    old_implicit.user_pass("printer", "any");
    let mut old_stls = Client::connect(starttls).stls(ca.client_config(), NAME_A);
    assert_eq!(old_stls.peer_certificate(), a.der);
    old_stls.user_pass("scanner", "any");

    let a2 = ca.replace(&a, "cert-a-2");
    server.hangup();
    wait_for("SIGHUP to reload the certificates", Duration::from_secs(10), || {
        let c = Client::implicit(home(), implicit, ca.client_config(), NAME_A);
        (c.peer_certificate() == a2.der).then_some(())
    });
    let c = Client::connect(starttls).stls(ca.client_config(), NAME_A);
    assert_eq!(c.peer_certificate(), a2.der, "STLS after SIGHUP");
    wait_for("the reload in the log", Duration::from_secs(5), || {
        server.log().contains("certificates re-read").then_some(())
    });

    let demo = |name: &str| {
        canonical(
            &std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo").join(name)).unwrap(),
        )
    };
    assert_eq!(old_implicit.retr(1), demo("01-welcome.eml"));
    assert!(old_implicit.quit().starts_with("+OK"));
    assert_eq!(old_stls.retr(3), demo("03-scan.eml"));
    assert!(old_stls.quit().starts_with("+OK"));
}

// ---------------------------------------------------------------------------
// SASL

/// A TLS session (STLS) on a listener that refuses cleartext logins.
fn secured(gateway: &Gateway, ca: &TestCa) -> Client<support::tls::TlsStream> {
    Client::connect(gateway.addr).stls(ca.client_config(), NAME_A)
}

#[test]
fn sasl_plain_and_login_with_and_without_initial_response_and_cancel() {
    let ca = TestCa::new();
    let a = ca.issue("a", "cert-a", &[NAME_A]);
    let store = store();
    let gateway = start(config(ListenerTls::Starttls, &[&a]), &store);
    let b64 = |s: &str| STANDARD.encode(s);

    // The mechanism list, in CAPA and in AUTH without arguments.
    let mut c = secured(&gateway, &ca);
    let capa = c.capa();
    assert_eq!(sasl_mechanisms(&capa), ["PLAIN", "LOGIN"], "{capa:?}");
    c.ok("AUTH");
    assert_eq!(c.body_lines(), ["PLAIN", "LOGIN"]);
    // No OAuth where the backend takes no bearer tokens.
    let xoauth2 = b64(&format!("user={USER}\x01auth=Bearer ya29.token\x01\x01"));
    for command in [format!("AUTH XOAUTH2 {xoauth2}"), "AUTH XOAUTH2".into(), "AUTH OAUTHBEARER".into()] {
        let reply = c.err(&command);
        assert!(reply.contains("unsupported"), "{command} → {reply}");
    }
    c.err("AUTH CRAM-MD5");
    // PLAIN with an initial response.
    assert!(c.cmd(&format!("AUTH PLAIN {}", plain_response(USER.as_bytes(), PASS.as_bytes()))).starts_with("+OK"));
    assert_eq!(c.stat().0, 2);
    c.quit();

    // PLAIN without: an empty challenge, then the response.
    let mut c = secured(&gateway, &ca);
    assert_eq!(c.cmd("AUTH PLAIN"), "+ ");
    assert!(c.cmd(&plain_response(USER.as_bytes(), PASS.as_bytes())).starts_with("+OK"));
    c.quit();

    // PLAIN with authzid = authcid is fine; another authzid is not.
    let mut c = secured(&gateway, &ca);
    let other = STANDARD.encode(format!("bob\0{USER}\0{PASS}"));
    assert!(c.cmd(&format!("AUTH PLAIN {other}")).starts_with("-ERR [AUTH]"));
    let same = STANDARD.encode(format!("{USER}\0{USER}\0{PASS}"));
    assert!(c.cmd(&format!("AUTH PLAIN {same}")).starts_with("+OK"));
    c.quit();

    // LOGIN without initial response: Username:, Password:.
    let mut c = secured(&gateway, &ca);
    assert_eq!(c.cmd("AUTH LOGIN"), format!("+ {}", b64("Username:")));
    assert_eq!(c.cmd(&b64(USER)), format!("+ {}", b64("Password:")));
    assert!(c.cmd(&b64(PASS)).starts_with("+OK"));
    assert_eq!(c.stat().0, 2);
    c.quit();

    // LOGIN with the user name as initial response.
    let mut c = secured(&gateway, &ca);
    assert_eq!(c.cmd(&format!("AUTH LOGIN {}", b64(USER))), format!("+ {}", b64("Password:")));
    assert!(c.cmd(&b64(PASS)).starts_with("+OK"));
    c.quit();

    // "*" cancels at every step; cancelling is not a failed login and the
    // session can log in afterwards.
    let mut c = secured(&gateway, &ca);
    for _ in 0..3 {
        assert_eq!(c.cmd("AUTH PLAIN"), "+ ");
        let reply = c.cmd("*");
        assert!(reply.starts_with("-ERR") && reply.contains("cancel"), "{reply}");
        assert!(c.cmd("AUTH LOGIN").starts_with("+ "));
        assert!(c.cmd("*").starts_with("-ERR"));
        assert!(c.cmd(&format!("AUTH LOGIN {}", b64(USER))).starts_with("+ "));
        assert!(c.cmd("*").starts_with("-ERR"));
    }
    // A wrong password over LOGIN fails with [AUTH]; the third failure closes.
    for n in 1..=3 {
        assert!(c.cmd("AUTH LOGIN").starts_with("+ "));
        assert!(c.cmd(&b64(USER)).starts_with("+ "));
        let reply = c.cmd(&b64("wrong"));
        assert!(reply.starts_with("-ERR [AUTH]"), "failure {n}: {reply}");
    }
    c.expect_closed();
}

// ---------------------------------------------------------------------------
// Abuse protection

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

/// A minimal IMAP server for the burst: LOGIN succeeds only with
/// `password`, instantly either way; the mailbox is empty.
struct FakeImap {
    addr: SocketAddr,
    logins: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl FakeImap {
    fn start(password: &'static str) -> FakeImap {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().unwrap();
        let logins = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, r, s) = (logins.clone(), refused.clone(), stop.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                listener.set_nonblocking(true).unwrap();
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                while !s.load(Ordering::Relaxed) {
                    let Ok(Ok((socket, _))) = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await
                    else {
                        continue;
                    };
                    tokio::spawn(serve_fake_imap(socket, password, l.clone(), r.clone()));
                }
            });
        });
        FakeImap { addr, logins, refused, stop }
    }
}

impl Drop for FakeImap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

async fn serve_fake_imap(
    socket: tokio::net::TcpStream,
    password: &str,
    logins: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let (read, mut write) = socket.into_split();
    let mut lines = BufReader::new(read).lines();
    let _ = write.write_all(b"* OK [CAPABILITY IMAP4rev1 UIDPLUS AUTH=PLAIN] fake ready\r\n").await;
    while let Ok(Ok(Some(line))) = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await {
        let mut words = line.splitn(3, ' ');
        let (tag, command) = (words.next().unwrap_or("*"), words.next().unwrap_or("").to_ascii_uppercase());
        let reply = match command.as_str() {
            "LOGIN" if line.contains(password) => {
                logins.fetch_add(1, Ordering::Relaxed);
                format!("{tag} OK [CAPABILITY IMAP4rev1 UIDPLUS] Logged in\r\n")
            }
            "LOGIN" => {
                refused.fetch_add(1, Ordering::Relaxed);
                format!("{tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
            }
            "CAPABILITY" => format!("* CAPABILITY IMAP4rev1 UIDPLUS\r\n{tag} OK done\r\n"),
            "SELECT" | "EXAMINE" => format!(
                "* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n* 0 EXISTS\r\n* 0 RECENT\r\n\
                 * OK [UIDVALIDITY 1700000000] UIDs valid\r\n* OK [UIDNEXT 1] Predicted next UID\r\n\
                 {tag} OK [READ-WRITE] Select completed.\r\n"
            ),
            "LOGOUT" => {
                let _ = write.write_all(format!("* BYE bye\r\n{tag} OK Logout completed.\r\n").as_bytes()).await;
                return;
            }
            _ => format!("{tag} OK done\r\n"),
        };
        if write.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
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
