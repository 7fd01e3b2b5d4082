//! Secrets never reach the logs, at any level and in either format.
//!
//! The real binary runs at `trace` (through `RUST_LOG`, or `[log] level`
//! with the JSON format), over the demo store and over a real Dovecot IMAP
//! backend, and serves full sessions in cleartext (loopback) and after STLS:
//! USER/PASS, AUTH PLAIN and AUTH LOGIN with and without initial responses,
//! failed logins of every kind, an XOAUTH2 attempt. Then everything it wrote
//! is searched for the passwords and the token, in clear, in every base64
//! alignment (an AUTH payload, an IMAP AUTHENTICATE line), and for the
//! exact AUTH lines the client sent. None may appear.

mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use support::dovecot::Dovecot;
use support::gateway::GatewayProcess;
use support::pop3::Dialogue as _;
use support::tls::{Client, TestCa};

const NAME: &str = "pop.secret.test";
/// ASCII: reaches an IMAP server in a LOGIN command.
const USER: &str = "alice";
const SECRET: &str = "Kumquat-7Zx-Lattice9";
/// Non-ASCII: reaches an IMAP server base64-encoded in AUTHENTICATE PLAIN.
const USER_UTF8: &str = "bruno";
const SECRET_UTF8: &str = "Grüße-Ωmega-Zephyr77";
/// What failed logins send (the second goes to IMAP in AUTHENTICATE).
const WRONG: &str = "Wrong-Quince-3141";
const WRONG_UTF8: &str = "Falsch-Ärger-Mispel";
const TOKEN: &str = "ya29.Quasar-Token-991xyz";

fn b64(s: &str) -> String {
    STANDARD.encode(s)
}

fn plain(authzid: &str, user: &str, password: &str) -> String {
    b64(&format!("{authzid}\0{user}\0{password}"))
}

/// Every base64 rendering of `secret` wherever it sits in a longer payload:
/// for each of the three byte alignments, the characters that depend on
/// the secret alone.
fn base64_fragments(secret: &str) -> Vec<String> {
    let len = secret.len();
    (0..3)
        .map(|k| {
            let mut bytes = vec![0u8; k];
            bytes.extend_from_slice(secret.as_bytes());
            let encoded = STANDARD.encode(&bytes);
            let start = (8 * k).div_ceil(6);
            let end = (8 * (k + len)) / 6;
            encoded[start..end].to_string()
        })
        .collect()
}

/// What must never be in a log: each secret, distinctive parts of it, its
/// base64 forms, and the AUTH lines sent.
fn forbidden(auth_lines: &[String]) -> Vec<String> {
    let mut needles: Vec<String> = Vec::new();
    for secret in [SECRET, SECRET_UTF8, WRONG, WRONG_UTF8, TOKEN] {
        needles.push(secret.to_string());
        needles.extend(base64_fragments(secret));
    }
    needles.extend(
        ["Kumquat", "Lattice9", "Zephyr77", "Ωmega", "Quince-3141", "Ärger-Mispel", "Quasar-Token"].map(String::from),
    );
    needles.extend(auth_lines.iter().cloned());
    for needle in &needles {
        assert!(needle.len() >= 6, "needle too short to mean anything: {needle:?}");
    }
    needles
}

fn assert_no_secrets(log: &str, auth_lines: &[String], what: &str) {
    for needle in forbidden(auth_lines) {
        if let Some(at) = log.find(&needle) {
            let line_start = log[..at].rfind('\n').map_or(0, |i| i + 1);
            let line_end = log[at..].find('\n').map_or(log.len(), |i| at + i);
            panic!("{what}: the log contains {needle:?}:\n{}", &log[line_start..line_end]);
        }
    }
}

/// A login the store refuses (Dovecot: each costs seconds of its failure
/// penalty, so there are few).
#[derive(Clone, Copy)]
enum Refused {
    None,
    /// USER and PASS with this password.
    UserPass(&'static str),
    /// AUTH PLAIN with this password.
    Plain(&'static str),
}

/// The sessions every configuration serves, then `refused`. Returns the
/// AUTH lines sent that carry a secret.
fn sessions<S: Read + Write>(
    connect: &dyn Fn() -> Client<S>,
    user: &str,
    secret: &str,
    refused: Refused,
) -> Vec<String> {
    let mut sent = Vec::new();

    // USER/PASS, a retrieval, QUIT.
    let mut c = connect();
    c.user_pass(user, secret);
    let (count, _) = c.stat();
    if count > 0 {
        c.retr(1);
    }
    c.quit();

    // AUTH PLAIN with an initial response, and without.
    let ir = plain("", user, secret);
    let mut c = connect();
    assert!(c.cmd(&format!("AUTH PLAIN {ir}")).starts_with("+OK"));
    c.quit();
    let mut c = connect();
    assert_eq!(c.cmd("AUTH PLAIN"), "+ ");
    let same = plain(user, user, secret);
    assert!(c.cmd(&same).starts_with("+OK"));
    c.quit();
    sent.extend([ir, same]);

    // AUTH LOGIN without and with an initial response.
    let mut c = connect();
    assert!(c.cmd("AUTH LOGIN").starts_with("+ "));
    assert!(c.cmd(&b64(user)).starts_with("+ "));
    assert!(c.cmd(&b64(secret)).starts_with("+OK"));
    c.quit();
    let mut c = connect();
    assert!(c.cmd(&format!("AUTH LOGIN {}", b64(user))).starts_with("+ "));
    assert!(c.cmd(&b64(secret)).starts_with("+OK"));
    c.quit();
    sent.push(b64(secret));

    // Failures that never reach the store: PASS without USER, a PLAIN
    // payload naming someone else, a payload that is not base64, a line too
    // long, an OAuth mechanism the backend does not take.
    let mut c = connect();
    assert!(c.cmd(&format!("PASS {secret}")).starts_with("-ERR"));
    let other = plain("mallory", user, secret);
    assert!(c.cmd(&format!("AUTH PLAIN {other}")).starts_with("-ERR"));
    assert!(c.cmd(&format!("AUTH PLAIN {secret}!")).starts_with("-ERR"));
    sent.push(other);
    c.quit();
    let mut c = connect();
    assert!(c.cmd(&format!("PASS {secret}{}", "x".repeat(300))).starts_with("-ERR"));
    let xoauth2 = b64(&format!("user={user}\x01auth=Bearer {TOKEN}\x01\x01"));
    assert!(c.cmd(&format!("AUTH XOAUTH2 {xoauth2}")).starts_with("-ERR"));
    assert!(c.cmd("AUTH XOAUTH2").starts_with("-ERR"));
    sent.push(xoauth2);
    c.quit();

    // A wrong password the store refuses.
    match refused {
        Refused::None => {}
        Refused::UserPass(wrong) => {
            let mut c = connect();
            c.ok(&format!("USER {user}"));
            let reply = c.cmd(&format!("PASS {wrong}"));
            assert!(reply.starts_with("-ERR [AUTH]"), "{reply}");
            c.quit();
        }
        Refused::Plain(wrong) => {
            let mut c = connect();
            let payload = plain("", user, wrong);
            let reply = c.cmd(&format!("AUTH PLAIN {payload}"));
            assert!(reply.starts_with("-ERR [AUTH]"), "{reply}");
            c.quit();
            sent.push(payload);
        }
    }
    sent
}

/// The binary with a cleartext listener (loopback counts as secure) and a
/// STLS listener, over `backend` (TOML table body), logging as `log` says
/// (TOML table body) and with `env`.
fn start(ca: &TestCa, backend: &str, log: &str, env: &[(&str, &str)]) -> GatewayProcess {
    let cert = ca.issue("server", "secret-test", &[NAME]);
    GatewayProcess::start_with_config(2, env, |addrs| {
        format!(
            "[[listener]]\naddress = \"{}\"\n\n[[listener]]\naddress = \"{}\"\ntls = \"starttls\"\n\
             loopback_is_secure = false\n\n[tls]\ncertificates = [{{ cert = {:?}, key = {:?} }}]\n\n\
             [throttle]\nbase_delay_ms = 1\nmax_delay_ms = 2\n\n[log]\n{log}\n\n[backend]\n{backend}\n",
            addrs[0],
            addrs[1],
            cert.cert.display().to_string(),
            cert.key.display().to_string()
        )
    })
}

/// Runs every session in cleartext and after STLS for both users, stops
/// the process and returns its whole log and the AUTH lines sent.
/// `refusing_store`: the store checks passwords, so a wrong one is refused
/// (once per user, in cleartext: ASCII, then non-ASCII).
fn exercise(mut server: GatewayProcess, ca: &TestCa, refusing_store: bool) -> (String, Vec<String>) {
    let (clear, stls): (SocketAddr, SocketAddr) = (server.addrs[0], server.addrs[1]);
    let mut sent = Vec::new();
    let (first, second) = if refusing_store {
        (Refused::UserPass(WRONG), Refused::Plain(WRONG_UTF8))
    } else {
        (Refused::None, Refused::None)
    };
    for (user, secret, refused) in [(USER, SECRET, first), (USER_UTF8, SECRET_UTF8, second)] {
        sent.extend(sessions(&|| Client::connect(clear), user, secret, refused));
        let config = ca.client_config();
        sent.extend(sessions(&|| Client::connect(stls).stls(config.clone(), NAME), user, secret, Refused::None));
    }
    server.terminate();
    let status = server.wait(Duration::from_secs(40));
    let log = server.log();
    assert!(status.success(), "popgate exited with {status}:\n{log}");
    (log, sent)
}

fn demo_backend() -> &'static str {
    "kind = \"demo\""
}

fn imap_backend(dovecot: &Dovecot) -> String {
    format!("kind = \"imap\"\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"", dovecot.imap_port)
}

/// The log really is verbose: popgate's own debug events are in it.
fn assert_verbose(log: &str, json: bool) {
    let marker = if json { "\"level\":\"DEBUG\"" } else { "DEBUG" };
    assert!(log.contains(marker), "no debug events: the level was not applied:\n{log}");
    assert!(log.contains("STLS negotiated"), "{log}");
    assert!(log.matches("logged in").count() >= 10, "{log}");
}

#[test]
fn demo_backend_at_trace_through_rust_log() {
    let ca = TestCa::new();
    let server = start(&ca, demo_backend(), "level = \"info\"", &[("RUST_LOG", "trace")]);
    let (log, sent) = exercise(server, &ca, false);
    assert_verbose(&log, false);
    assert_no_secrets(&log, &sent, "demo, text, RUST_LOG=trace");
}

#[test]
fn demo_backend_at_trace_in_json_through_the_configuration() {
    let ca = TestCa::new();
    let server = start(&ca, demo_backend(), "level = \"trace\"\nformat = \"json\"", &[]);
    let (log, sent) = exercise(server, &ca, false);
    assert_verbose(&log, true);
    assert!(log.lines().all(|l| l.is_empty() || l.starts_with('{')), "not all JSON:\n{log}");
    assert_no_secrets(&log, &sent, "demo, json, [log] level = trace");
}

#[test]
fn imap_backend_at_trace_through_rust_log() {
    let dovecot = Dovecot::start_with_users(&[(USER, SECRET), (USER_UTF8, SECRET_UTF8)]);
    dovecot.append(USER, b"Subject: hello\r\n\r\nbody\r\n");
    let ca = TestCa::new();
    let server = start(&ca, &imap_backend(&dovecot), "level = \"info\"", &[("RUST_LOG", "trace")]);
    let (log, sent) = exercise(server, &ca, true);
    assert_verbose(&log, false);
    assert!(log.contains("login failed"), "{log}");
    assert_no_secrets(&log, &sent, "imap, text, RUST_LOG=trace");
}

#[test]
fn imap_backend_at_trace_in_json_through_the_configuration() {
    let dovecot = Dovecot::start_with_users(&[(USER, SECRET), (USER_UTF8, SECRET_UTF8)]);
    let ca = TestCa::new();
    let server = start(&ca, &imap_backend(&dovecot), "level = \"trace\"\nformat = \"json\"", &[]);
    let (log, sent) = exercise(server, &ca, true);
    assert_verbose(&log, true);
    assert_no_secrets(&log, &sent, "imap, json, [log] level = trace");
}

/// An operator chasing a backend problem asks for the IMAP library's own
/// trace output by name: its raw protocol lines (LOGIN, AUTHENTICATE)
/// still must not be logged.
#[test]
fn imap_backend_with_the_wire_crates_asked_for_by_name() {
    let dovecot = Dovecot::start_with_users(&[(USER, SECRET), (USER_UTF8, SECRET_UTF8)]);
    let ca = TestCa::new();
    let filter = "trace,async_imap=trace,imap_proto=trace";
    let server = start(&ca, &imap_backend(&dovecot), "level = \"info\"", &[("RUST_LOG", filter)]);
    let (log, sent) = exercise(server, &ca, true);
    assert_verbose(&log, false);
    assert_no_secrets(&log, &sent, &format!("imap, RUST_LOG={filter}"));
}

/// The same, naming the module that logs the protocol lines (the target
/// printed in async-imap's own debug output): "never logged at any level"
/// must hold for any filter.
#[test]
fn imap_backend_with_the_wire_module_asked_for_by_name() {
    let dovecot = Dovecot::start_with_users(&[(USER, SECRET), (USER_UTF8, SECRET_UTF8)]);
    let ca = TestCa::new();
    let filter = "info,async_imap::imap_stream=trace";
    let server = start(&ca, &imap_backend(&dovecot), "level = \"info\"", &[("RUST_LOG", filter)]);
    let (log, sent) = exercise(server, &ca, true);
    // A filter naming async-imap's module (more specific than any cap in an
    // EnvFilter) must still not turn its `encode: input` trace back on: that
    // would log every IMAP command line, LOGIN passwords included.
    assert_no_secrets(&log, &sent, &format!("imap, RUST_LOG={filter}"));
}
