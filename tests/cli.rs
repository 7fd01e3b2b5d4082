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

fn text_of(output: &Output) -> String {
    text(output)
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

/// An example configuration made runnable here: every file it names
/// (certificates, keys, secrets) created under `dir`, every address on
/// 127.0.0.1 with a port chosen by the system. Returns the text, the files
/// created and the environment its `*_env` keys need.
fn materialize(example: &Path, dir: &Path) -> (String, Vec<PathBuf>, Vec<(String, String)>) {
    let original_text = std::fs::read_to_string(example).unwrap();
    let mut files = Vec::new();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let mut rewritten = Vec::new();
    for line in original_text.lines() {
        let mut line = line.to_string();
        // Paths in comments are not read.
        let comment = line.trim_start().starts_with('#');
        for prefix in ["\"/etc/popgate/", "\"/var/lib/popgate/", "\"/run/secrets/"] {
            while let Some(start) = line.find(prefix).filter(|_| !comment) {
                let end = start + 1 + line[start + 1..].find('"').unwrap();
                let original = line[start + 1..end].to_string();
                let name = Path::new(&original).file_name().unwrap().to_str().unwrap().to_string();
                let path = dir.join(&name);
                if name == "tokens.enc" {
                    // Written by `oauth login`; its directory must exist.
                } else if path.exists() {
                    // Named twice.
                } else if name == "token.key" {
                    write_key(&path);
                    files.push(path.clone());
                } else if name.ends_with(".pem") && name.contains("key") {
                    std::fs::write(&path, certified.signing_key.serialize_pem()).unwrap();
                    files.push(path.clone());
                } else if name.ends_with(".pem") {
                    std::fs::write(&path, certified.cert.pem()).unwrap();
                    files.push(path.clone());
                } else {
                    std::fs::write(&path, "a secret\n").unwrap();
                    files.push(path.clone());
                }
                line.replace_range(start + 1..end, path.to_str().unwrap());
            }
        }
        rewritten.push(line);
    }
    let text = rewritten.join("\n");
    let mut lines: Vec<String> = Vec::new();
    for line in text.lines() {
        match line.trim_start().strip_prefix("address = \"") {
            Some(_) => lines.push("address = \"127.0.0.1:0\"".to_string()),
            None => lines.push(line.to_string()),
        }
    }
    let mut env = Vec::new();
    for line in &lines {
        if let Some(rest) = line
            .trim_start()
            .strip_prefix("client_secret_env = \"")
            .or(line.trim_start().strip_prefix("password_env = \""))
            .or(line.trim_start().strip_prefix("key_env = \""))
        {
            env.push((rest.trim_end_matches('"').to_string(), "a secret".to_string()));
        }
    }
    (lines.join("\n"), files, env)
}

fn write_key(path: &Path) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).unwrap();
    std::io::Write::write_all(&mut file, b"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n").unwrap();
}

fn popgate_env(args: &[&str], env: &[(String, String)]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_popgate"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
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

/// `serve -c FILE` starts ("popgate ready"), then SIGTERM; or its output if
/// it exits first.
fn serve_starts(config: &Path, env: &[(String, String)]) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_popgate"))
        .args(["serve", "-c", config.to_str().unwrap()])
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("RUST_LOG", "popgate=info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + support::IO_TIMEOUT;
    let result = loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if text.contains("popgate ready") {
            break Ok(());
        }
        if child.try_wait().unwrap().is_some() {
            break Err(std::fs::read_to_string(&log_path).unwrap_or_default());
        }
        if Instant::now() > deadline {
            break Err(format!("not ready within {:?}:\n{text}", support::IO_TIMEOUT));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// Whatever check-config accepts, serve starts: every example, with the
/// files it names in place, passes both; with any one of them missing (or a
/// secret's variable unset) both fail, naming the key, the file and the
/// fix.
#[test]
fn check_config_accepts_exactly_what_serve_starts_with() {
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(repo_path("config")).expect("config/") {
        let example = entry.unwrap().path();
        if example.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let dir = tempfile::tempdir().unwrap();
        let (text, files, env) = materialize(&example, dir.path());
        let config = write_config(dir.path(), "popgate.toml", &text);
        let config_arg = config.to_str().unwrap();
        let output = popgate_env(&["check-config", config_arg], &env);
        assert!(output.status.success(), "check-config {}: {}\n{text}", example.display(), text_of(&output));
        serve_starts(&config, &env).unwrap_or_else(|log| panic!("serve {} did not start:\n{log}", example.display()));

        for file in &files {
            let kept = std::fs::read(file).unwrap();
            std::fs::remove_file(file).unwrap();
            let output = popgate_env(&["check-config", config_arg], &env);
            let said = text_of(&output);
            assert!(
                !output.status.success(),
                "{}: {} missing must fail check-config",
                example.display(),
                file.display()
            );
            let name = file.to_str().unwrap();
            assert!(said.contains(name), "the error names the file: {said}");
            let key = [
                "tls.certificates[0].cert",
                "tls.certificates[0].key",
                "token_store.key_file",
                "oauth.client_secret_file",
                "password_file",
            ];
            assert!(key.iter().any(|k| said.contains(k)), "the error names the key: {said}");
            assert!(
                said.contains("popgate oauth keygen") || said.contains("point it at") || said.contains("write "),
                "the error says the fix: {said}"
            );
            let served = serve_starts(&config, &env).expect_err("serve must fail where check-config does");
            assert!(served.contains(name), "serve names the file too: {served}");
            std::fs::write(file, kept).unwrap();
            if file.ends_with("token.key") {
                std::fs::set_permissions(file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
            }
        }
        for (variable, _) in &env {
            let without: Vec<(String, String)> = env.iter().filter(|(k, _)| k != variable).cloned().collect();
            let output = popgate_env(&["check-config", config_arg], &without);
            let said = text_of(&output);
            assert!(!output.status.success() && said.contains(variable.as_str()) && said.contains("set "), "{said}");
            assert!(serve_starts(&config, &without).is_err(), "serve must fail without {variable}");
        }
        checked.push(example);
    }
    assert!(checked.len() >= 10, "the examples in config/: {checked:?}");
}

/// A missing configuration file: one line, the OS error once.
#[test]
fn a_missing_configuration_file_is_reported_once() {
    for args in [
        &["check-config", "/nonexistent/popgate.toml"][..],
        &["-c", "/nonexistent/popgate.toml"],
        &["serve", "-c", "/nonexistent/popgate.toml"],
    ] {
        let output = popgate(args);
        assert!(!output.status.success());
        let said = String::from_utf8_lossy(&output.stderr);
        assert_eq!(said.matches("No such file or directory").count(), 1, "{args:?}: {said}");
        assert!(said.contains("/nonexistent/popgate.toml"), "{said}");
    }
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
