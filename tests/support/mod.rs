//! The integration-test harness: real servers on loopback, real sockets.
//!
//! - `pop3`: a small blocking POP3 client that checks framing (CRLF, dot
//!   stuffing) and never waits longer than `IO_TIMEOUT` for a reply.
//! - `imap`: a raw IMAP client to seed mail (exact bytes, via literals) and
//!   to look at what a mailbox holds, as "another client" would.
//! - `dovecot`: a private Dovecot per test (own directory, ports chosen at
//!   run time), killed with all its children on drop.
//! - `gateway`: popgate in-process on a port chosen by the kernel, or the
//!   real binary as a child process.
//! - `messages`: messages that are hard to get right, and the canonical
//!   (CRLF) form they must reach a POP3 client in — computed here, not by
//!   popgate's own code, so the tests do not share its bugs.
//! - `cyrus`, `cyrus_imap`: a private Cyrus per test, over JMAP, or over IMAP
//!   with its own pop3d (imapd and pop3d unpacked by scripts/install-cyrus).
//! - `fake_imap`: a minimal IMAP server that answers instantly, for load,
//!   and scripted refusals in wordings no free server produces.
//! - `proxy`: a recording TCP proxy, to see what popgate sends its backend.
//! - `fault_proxy`: a TCP proxy that stalls, resets or truncates one backend
//!   connection at a chosen octet or after a chosen command.
//! - `program`: real client programs run to completion with a time limit,
//!   and the ways the tests drive them (openssl s_client, curl, poplib).
//! - `gmail_api`, `graph_api`: stand-ins for the Gmail API and Microsoft
//!   Graph mail on run-time ports, with messages in memory.
//! - `bearer`: the token-refresh scenarios shared by the bearer backends.
//! - `stand_in`: throttling and the request record both API stand-ins use.
//! - `token_router`: a router handing out OAuth bearer tokens (and fresh
//!   ones on refresh), and popgate in-process with it.
//! - `redis`: a private redis-server per test (shared state between
//!   replicas).
//! - `haproxy`: a private haproxy per test, round-robin over replicas.
//! - `tls`: a test CA and server certificates made at run time, and a POP3
//!   client for cleartext, STLS and implicit TLS from any 127.0.0.0/8 address.
//!
//! Everything is per test (no fixed ports, no shared directories), so tests
//! run in parallel. Nothing here skips: a missing Dovecot or client program
//! fails the test that needs it, loudly.

#![allow(dead_code)] // each test crate uses a different part of the harness

pub mod bearer;
pub mod cyrus;
pub mod cyrus_imap;
pub mod dovecot;
pub mod fake_imap;
pub mod fault_proxy;
pub mod gateway;
pub mod gmail_api;
pub mod graph_api;
pub mod haproxy;
pub mod imap;
pub mod messages;
pub mod oauth_server;
pub mod pop3;
pub mod postfix;
pub mod program;
pub mod proxy;
pub mod redis;
pub mod stand_in;
pub mod tls;
pub mod token_router;

use std::net::TcpListener;
use std::time::{Duration, Instant};

/// The longest any single read, connect or wait in a test may take.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// A port that was free a moment ago on 127.0.0.1. Whoever uses it must
/// retry with another if binding it fails: another test may have taken it.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0").local_addr().expect("local_addr").port()
}

/// Polls `check` until it returns `Some`, or panics after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The absolute path of a program the tests need, or a panic that says how
/// to install it. Never a skip.
pub fn require_program(name: &str) -> std::path::PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(["/usr/sbin".into(), "/usr/bin".into(), "/sbin".into()]);
    for dir in dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("`{name}` is not installed: run scripts/install-test-deps (as root), or scripts/test which runs it");
}

/// Sends a signal to a process (any process: Dovecot's children are not ours).
pub fn send_signal(pid: u32, signal: Signal) -> bool {
    unsafe extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    let number = match signal {
        Signal::Term => 15,
        Signal::Kill => 9,
        Signal::Stop => 19,
    };
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe { kill(pid as i32, number) == 0 }
}

#[derive(Debug, Clone, Copy)]
pub enum Signal {
    Term,
    Kill,
    Stop,
}
