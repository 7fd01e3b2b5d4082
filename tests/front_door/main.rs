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

#[path = "../support/mod.rs"]
mod support;

mod abuse;
mod login_policy;
mod reload;
mod sasl;
mod tls_clients;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use popgate::backend::demo::{DemoBackend, DemoStore};
use popgate::config::Config;
use popgate::server::config::ListenerConfig;
use popgate::server::policy::ListenerTls;
use support::gateway::{Gateway, GatewayProcess};
use support::messages::{canonical, simple};
use support::pop3::Dialogue as _;
use support::pop3::{Pop3, plain_response};
use support::program::{describe, s_client, s_client_protocol, s_client_subject, stdout};
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

/// Python's poplib as alice over TLS (see `support::program::poplib_tls`).
fn poplib(ca: &TestCa, addr: SocketAddr, name: &str, mode: &str, extra: &str) -> serde_json::Value {
    support::program::poplib_tls(&ca.ca_file, addr, name, mode, (USER, PASS), extra)
}

/// curl as alice against popgate, `name` resolved to 127.0.0.1.
fn curl(ca: &TestCa, url: &str, name: &str, port: u16, extra: &[&str]) -> Output {
    support::program::curl_tls(&ca.ca_file, url, name, port, (USER, PASS), extra)
}

fn subject_of(cert: &ServerCert) -> String {
    format!("CN = {}", cert.common_name)
}
