//! The `popgate` binary: `check-config`, `serve`, and what SIGTERM does to
//! open sessions.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::dovecot::{ALICE, Dovecot};
use support::gateway::GatewayProcess;
use support::messages::{canonical, simple};
use support::pop3::Dialogue as _;
use support::pop3::Pop3;

fn popgate(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_popgate"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run popgate");
    let deadline = Instant::now() + support::IO_TIMEOUT;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("popgate {args:?} did not exit within {:?}", support::IO_TIMEOUT);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn write_config(dir: &Path, name: &str, content: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).expect("write config");
    path
}

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

#[test]
fn check_config_names_an_unknown_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "typo.toml", "[limits]\ncommand_lines = 300\n");
    let output = popgate(&["check-config", path.to_str().unwrap()]);
    assert!(!output.status.success(), "a typo must fail: {}", text(&output));
    assert!(String::from_utf8_lossy(&output.stderr).contains("command_lines"), "{}", text(&output));

    let path = write_config(dir.path(), "backend.toml", "[backend]\nkind = \"imap\"\nhots = \"x\"\n");
    let output = popgate(&["check-config", path.to_str().unwrap()]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("hots"), "{}", text(&output));
}

#[test]
fn check_config_names_an_invalid_value() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "idle.toml", "[limits]\nidle_timeout_secs = 5\n");
    let output = popgate(&["check-config", path.to_str().unwrap()]);
    assert!(!output.status.success(), "{}", text(&output));
    assert!(String::from_utf8_lossy(&output.stderr).contains("idle_timeout_secs"), "{}", text(&output));

    let output = popgate(&["check-config", dir.path().join("missing.toml").to_str().unwrap()]);
    assert!(!output.status.success(), "a missing file must fail: {}", text(&output));
}

#[test]
fn check_config_accepts_every_example_config() {
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(repo_path("config")).expect("config/") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let output = popgate(&["check-config", path.to_str().unwrap()]);
            assert!(output.status.success(), "check-config {}: {}", path.display(), text(&output));
            checked.push(path);
        }
    }
    assert!(!checked.is_empty(), "no example configs (*.toml) in config/");
}

#[test]
fn serve_with_the_demo_backend_serves_the_demo_messages() {
    let mut demo: Vec<PathBuf> = std::fs::read_dir(repo_path("config/demo"))
        .expect("config/demo")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "eml"))
        .collect();
    demo.sort();
    assert!(!demo.is_empty());

    let mut server = GatewayProcess::start(&["--backend", "demo:"]);
    let mut c = Pop3::login(server.addr, "anyone", "any password");
    let (count, octets) = c.stat();
    assert_eq!(count, demo.len());
    let mut total = 0;
    for (i, path) in demo.iter().enumerate() {
        let want = canonical(&std::fs::read(path).unwrap());
        total += want.len() as u64;
        assert_eq!(c.retr(i as u32 + 1), want, "RETR {} ({})", i + 1, path.display());
    }
    assert_eq!(octets, total);
    c.quit();

    // Without sessions, SIGTERM ends it at once, successfully.
    let started = Instant::now();
    server.terminate();
    let status = server.wait(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}:\n{}", server.log());
    assert!(started.elapsed() < Duration::from_secs(5), "idle shutdown took {:?}", started.elapsed());
}

#[test]
fn serve_refuses_a_bad_backend_url_and_a_taken_port() {
    let output = popgate(&["serve", "--no-admin", "--listen", "127.0.0.1:0", "--backend", "pop3://example.com"]);
    assert!(!output.status.success(), "{}", text(&output));
    assert!(text(&output).contains("pop3://example.com"), "{}", text(&output));

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = popgate(&["serve", "--no-admin", "--listen", &addr, "--backend", "demo:"]);
    assert!(!output.status.success(), "listening on a taken port must fail: {}", text(&output));
    assert!(text(&output).contains(&addr), "{}", text(&output));
}

/// SIGTERM with a session that did DELE but no QUIT: at the end of the grace
/// period the session gets `-ERR [SYS/TEMP]`, the connection closes, and
/// nothing is deleted.
#[test]
fn sigterm_ends_an_open_session_with_sys_temp_and_deletes_nothing() {
    let dovecot = Dovecot::start();
    let uids = dovecot.append_all(ALICE.0, &[simple("one"), simple("two"), simple("three")]);
    let config = write_config(dovecot.dir(), "popgate.toml", "[limits]\nshutdown_grace_secs = 1\n");
    let mut server = GatewayProcess::start(&["--config", config.to_str().unwrap(), "--backend", &dovecot.imap_url()]);

    let mut c = Pop3::login(server.addr, ALICE.0, ALICE.1);
    assert_eq!(c.stat().0, 3);
    c.ok("DELE 1");
    c.ok("DELE 2");

    let started = Instant::now();
    server.terminate();
    let reply = c.line();
    let waited = started.elapsed();
    assert!(reply.starts_with("-ERR [SYS/TEMP]"), "{reply}");
    c.expect_closed();
    assert!(waited >= Duration::from_millis(800), "ended before the grace period: {waited:?}");
    assert!(waited < Duration::from_secs(6), "ended long after the 1 s grace period: {waited:?}");

    let status = server.wait(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}:\n{}", server.log());

    let stored = dovecot.messages(ALICE.0);
    assert_eq!(stored.iter().map(|m| m.uid).collect::<Vec<_>>(), uids);
    assert!(stored.iter().all(|m| !m.is_deleted()), "{stored:?}");
}

/// A session that finishes within the grace period is served to the end:
/// its QUIT commits, and the process exits without waiting out the grace.
#[test]
fn sigterm_lets_a_session_finish_within_the_grace_period() {
    let dovecot = Dovecot::start();
    let uids = dovecot.append_all(ALICE.0, &[simple("one"), simple("two")]);
    let config = write_config(dovecot.dir(), "popgate.toml", "[limits]\nshutdown_grace_secs = 20\n");
    let mut server = GatewayProcess::start(&["--config", config.to_str().unwrap(), "--backend", &dovecot.imap_url()]);

    let mut c = Pop3::login(server.addr, ALICE.0, ALICE.1);
    server.terminate();
    // It stops accepting connections (the session already open goes on).
    support::wait_for("popgate to stop accepting after SIGTERM", Duration::from_secs(5), || {
        std::net::TcpStream::connect_timeout(&server.addr, Duration::from_secs(1)).is_err().then_some(())
    });
    c.ok("DELE 1");
    let started = Instant::now();
    assert!(c.quit().starts_with("+OK"));
    let status = server.wait(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}:\n{}", server.log());
    assert!(started.elapsed() < Duration::from_secs(5), "waited out the grace period: {:?}", started.elapsed());
    assert_eq!(dovecot.uids(ALICE.0), vec![uids[1]]);
}
