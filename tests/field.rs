//! The first real deployments, as README.md tells them: a printer on the
//! office network (the recipe's exact command line, from a client in a
//! network namespace of the test's own), device users added and disabled
//! with SIGHUP, settings from the environment, the token store key made for
//! the service user, and the standard proxy variables.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::dovecot::{ALICE, Dovecot};
use support::messages::simple;
use support::{IO_TIMEOUT, free_port};

fn popgate_bin() -> &'static str {
    env!("CARGO_BIN_EXE_popgate")
}

/// A `popgate` process with its output in a file.
struct Running {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Running {
    /// Runs `popgate ARGS` with `env` and waits until `probe` accepts a
    /// connection.
    fn start(args: &[&str], env: &[(&str, &str)], probe: SocketAddr) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("popgate.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(popgate_bin())
            .args(args)
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("run popgate");
        let mut running = Running { child, log, _dir: dir };
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            if let Some(status) = running.child.try_wait().unwrap() {
                panic!("popgate {args:?} exited ({status}):\n{}", running.log());
            }
            if std::net::TcpStream::connect_timeout(&probe, Duration::from_secs(1)).is_ok() {
                return running;
            }
            assert!(Instant::now() < deadline, "popgate {args:?} did not listen on {probe}:\n{}", running.log());
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The output, without terminal colour codes.
    fn log(&self) -> String {
        let raw = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut plain = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                plain.push(c);
            }
        }
        plain
    }

    fn wait_for_log(&self, text: &str) {
        let deadline = Instant::now() + IO_TIMEOUT;
        while !self.log().contains(text) {
            assert!(Instant::now() < deadline, "no `{text}` in the log within {IO_TIMEOUT:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn hangup(&self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(program: &str, args: &[&str]) -> Output {
    let output = Command::new(program).args(args).stdin(Stdio::null()).output().expect(program);
    assert!(
        output.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A network namespace with one veth pair to this one: `host` on this side,
/// `client` inside, both /32 with a route to each other only, so nothing
/// but the two addresses is reachable through it.
struct Namespace {
    name: String,
}

impl Namespace {
    fn create(host: Ipv4Addr, client: Ipv4Addr) -> Namespace {
        assert_eq!(
            nix::unistd::geteuid().as_raw(),
            0,
            "this test creates a network namespace (ip netns): run it as root, as scripts/test does"
        );
        support::require_program("ip");
        let id = std::process::id() % 100_000;
        let name = format!("popgate-t{id}");
        let (outside, inside) = (format!("pgt{id}h"), format!("pgt{id}c"));
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run("ip", &["netns", "add", &name]);
        let namespace = Namespace { name: name.clone() };
        run("ip", &["link", "add", &outside, "type", "veth", "peer", "name", &inside]);
        run("ip", &["link", "set", &inside, "netns", &name]);
        run("ip", &["addr", "add", &format!("{host}/32"), "dev", &outside]);
        run("ip", &["link", "set", &outside, "up"]);
        run("ip", &["route", "add", &format!("{client}/32"), "dev", &outside]);
        let inside_ns = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &name, "ip"];
            all.extend_from_slice(args);
            run("ip", &all);
        };
        inside_ns(&["addr", "add", &format!("{client}/32"), "dev", &inside]);
        inside_ns(&["link", "set", &inside, "up"]);
        inside_ns(&["link", "set", "lo", "up"]);
        inside_ns(&["route", "add", &format!("{host}/32"), "dev", &inside]);
        namespace
    }

    /// Runs a command inside the namespace.
    fn exec(&self, args: &[&str]) -> Output {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        Command::new("ip").args(&all).stdin(Stdio::null()).output().expect("ip netns exec")
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth end, and with it the pair.
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// The command line of README.md's "A printer on the office network".
fn readme_printer_command() -> Vec<String> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme.split("## A printer on the office network").nth(1).expect("the README has the recipe");
    let line = section
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("popgate serve ") && l.contains("--allow-cleartext-from"))
        .expect("the recipe's command line");
    line.split_whitespace().skip(1).map(str::to_string).collect()
}

fn curl_list(namespace: &Namespace, server: SocketAddr, user: &str, password: &str) -> Output {
    namespace.exec(&[
        "curl",
        "--silent",
        "--show-error",
        "--max-time",
        "20",
        &format!("pop3://{server}/"),
        "--user",
        &format!("{user}:{password}"),
    ])
}

/// README's printer recipe, verbatim but for the port and the backend URL,
/// lets a client on the named network (not loopback) list and retrieve;
/// the same line without `--allow-cleartext-from` warns at start, refuses
/// the login, and logs the refusal with the client's address and reason.
#[test]
fn the_readme_printer_recipe_works_from_the_office_network() {
    let args = readme_printer_command();
    let cidr_at = args.iter().position(|a| a == "--allow-cleartext-from").unwrap() + 1;
    let office: ipnet::Ipv4Net = args[cidr_at].parse().expect("the recipe names an IPv4 network");
    // Two addresses at the top of the recipe's network stand for this
    // machine and the printer.
    let top = u32::from(office.broadcast());
    let (host, printer) = (Ipv4Addr::from(top - 5), Ipv4Addr::from(top - 4));
    let namespace = Namespace::create(host, printer);

    let dovecot = Dovecot::start();
    dovecot.append_all(ALICE.0, &[simple("scan one"), simple("scan two")]);
    let port = free_port();
    let args: Vec<String> = args
        .iter()
        .map(|a| match a.as_str() {
            "0.0.0.0:1110" => format!("0.0.0.0:{port}"),
            a if a.starts_with("imaps://") => dovecot.imap_url(),
            a => a.to_string(),
        })
        .collect();
    assert!(args.iter().any(|a| a == &format!("0.0.0.0:{port}")), "the recipe listens on 0.0.0.0:1110: {args:?}");
    let admin = format!("127.0.0.1:{}", free_port());
    let env = [("POPGATE_ADMIN", admin.as_str()), ("RUST_LOG", "popgate=info")];
    let local = SocketAddr::from(([127, 0, 0, 1], port));
    let server = SocketAddr::from((host, port));

    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let gateway = Running::start(&arg_refs, &env, local);
    let listed = curl_list(&namespace, server, ALICE.0, ALICE.1);
    assert!(
        listed.status.success(),
        "LIST from {printer}: {}\n{}",
        String::from_utf8_lossy(&listed.stderr),
        gateway.log()
    );
    assert_eq!(String::from_utf8_lossy(&listed.stdout).lines().count(), 2, "two messages listed");
    let retrieved = namespace.exec(&[
        "curl",
        "--silent",
        "--max-time",
        "20",
        &format!("pop3://{server}/2"),
        "--user",
        &format!("{}:{}", ALICE.0, ALICE.1),
    ]);
    assert!(String::from_utf8_lossy(&retrieved.stdout).contains("scan two"), "RETR 2:\n{}", gateway.log());
    assert!(!gateway.log().contains("will refuse every login"), "no warning for the recipe:\n{}", gateway.log());
    drop(gateway);

    // The line before this fix: the printer is refused — and told why.
    let without: Vec<&str> =
        arg_refs.iter().enumerate().filter(|(i, _)| *i != cidr_at && *i != cidr_at - 1).map(|(_, a)| *a).collect();
    let gateway = Running::start(&without, &env, local);
    // curl reads CAPA, sees no login offered, and gives up.
    let refused = curl_list(&namespace, server, ALICE.0, ALICE.1);
    assert!(!refused.status.success(), "a cleartext login from {printer} must be refused");
    gateway.wait_for_log("the client left without trying");
    // A device that sends USER and PASS at once.
    let script = format!(
        "import poplib\np = poplib.POP3('{host}', {port}, timeout=20)\n\
         try:\n    p.user('{}'); p.pass_('{}'); print('LOGGED IN')\nexcept poplib.error_proto as e:\n    print(e)",
        ALICE.0, ALICE.1
    );
    let said = namespace.exec(&["python3", "-c", &script]);
    let said = String::from_utf8_lossy(&said.stdout);
    assert!(said.contains("[AUTH]") && !said.contains("LOGGED IN"), "{said}");
    gateway.wait_for_log("login refused: cleartext login not allowed peer");
    let log = gateway.log();
    assert!(
        log.contains("will refuse every login")
            && log.contains("--allow-cleartext-from")
            && log.contains("cleartext_networks"),
        "the start warns, naming the flag and the keys:\n{log}"
    );
    let refusals: Vec<&str> = log.lines().filter(|l| l.contains("login refused")).collect();
    assert_eq!(refusals.len(), 2, "one line per refused client:\n{log}");
    for refusal in refusals {
        assert!(refusal.contains("INFO"), "logged at info: {refusal}");
        assert!(refusal.contains(&format!("peer={printer}")), "with the client's address: {refusal}");
        assert!(refusal.contains("reason=\"no TLS on this listener"), "with the reason: {refusal}");
    }
    assert!(!log.contains(ALICE.1), "never the password:\n{log}");
}

fn hash(password: &str) -> String {
    popgate::auth::passwords::hash_password(password).unwrap()
}

fn curl_local(server: SocketAddr, user: &str, password: &str) -> bool {
    Command::new("curl")
        .args(["--silent", "--max-time", "20", &format!("pop3://{server}/"), "--user", &format!("{user}:{password}")])
        .stdin(Stdio::null())
        .status()
        .expect("curl")
        .success()
}

/// SIGHUP adds a device user and disables another, without a restart; a
/// broken change keeps the devices that work.
#[test]
fn sighup_adds_and_disables_device_users() {
    let dovecot = Dovecot::start();
    dovecot.append_all(ALICE.0, &[simple("one")]);
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("alice-password");
    std::fs::write(&secret, ALICE.1).unwrap();
    let port = free_port();
    let imap = dovecot.imap_addr();
    let devices = |entries: &[(&str, &str, bool)]| {
        let mut text = format!(
            "[[listener]]\naddress = \"127.0.0.1:{port}\"\n[admin]\nenabled = false\n\
             [backend]\nkind = \"imap\"\nhost = \"{}\"\nport = {}\ntls = \"none\"\n\
             [[account]]\nname = \"scans\"\nmode = \"mapped\"\nlogin = \"{}\"\npassword_file = \"{}\"\n",
            imap.ip(),
            imap.port(),
            ALICE.0,
            secret.display()
        );
        for (user, password, enabled) in entries {
            text.push_str(&format!(
                "[[account.device]]\nuser = \"{user}\"\npassword_hash = \"{}\"\nenabled = {enabled}\n",
                hash(password)
            ));
        }
        text
    };
    let config = dir.path().join("popgate.toml");
    std::fs::write(&config, devices(&[("printer-a", "pa", true)])).unwrap();
    let server = SocketAddr::from(([127, 0, 0, 1], port));
    let gateway = Running::start(&["-c", config.to_str().unwrap()], &[], server);
    assert!(curl_local(server, "printer-a", "pa"), "{}", gateway.log());
    assert!(!curl_local(server, "printer-b", "pb"));

    std::fs::write(&config, devices(&[("printer-a", "pa", false), ("printer-b", "pb", true)])).unwrap();
    gateway.hangup();
    gateway.wait_for_log("accounts reloaded");
    assert!(curl_local(server, "printer-b", "pb"), "an added printer logs in after SIGHUP:\n{}", gateway.log());
    assert!(!curl_local(server, "printer-a", "pa"), "a disabled printer is refused after SIGHUP");

    // A password file that went missing: nothing changes.
    std::fs::write(&config, devices(&[("printer-c", "pc", true)]).replace("alice-password", "gone")).unwrap();
    gateway.hangup();
    gateway.wait_for_log("accounts NOT reloaded");
    assert!(curl_local(server, "printer-b", "pb"), "the working accounts stay:\n{}", gateway.log());
    assert!(!curl_local(server, "printer-c", "pc"));
}

/// `popgate -c FILE` serves; POPGATE_SECTION__KEY overrides the file, and
/// a flag overrides both.
#[test]
fn settings_come_from_flags_then_environment_then_file() {
    let dir = tempfile::tempdir().unwrap();
    let (file_port, env_port, flag_port) = (free_port(), free_port(), free_port());
    let config = dir.path().join("popgate.toml");
    std::fs::write(
        &config,
        format!(
            "[[listener]]\naddress = \"127.0.0.1:{file_port}\"\n[backend]\nkind = \"demo\"\n[admin]\nenabled = true\n"
        ),
    )
    .unwrap();
    let path = config.to_str().unwrap();
    let at = |port| SocketAddr::from(([127, 0, 0, 1], port));

    // The file alone (the admin listener off from the environment).
    let off = [("POPGATE_ADMIN__ENABLED", "false")];
    let served = Running::start(&["-c", path], &off, at(file_port));
    assert!(curl_local(at(file_port), "demo", "demo"), "{}", served.log());
    drop(served);

    let env_address = format!("127.0.0.1:{env_port}");
    let env = [("POPGATE_ADMIN__ENABLED", "false"), ("POPGATE_LISTENER__0__ADDRESS", env_address.as_str())];
    let served = Running::start(&["-c", path], &env, at(env_port));
    assert!(std::net::TcpStream::connect(at(file_port)).is_err(), "the environment wins over the file");
    drop(served);

    let flag_address = format!("127.0.0.1:{flag_port}");
    let served = Running::start(&["-c", path, "--listen", &flag_address], &env, at(flag_port));
    assert!(std::net::TcpStream::connect(at(env_port)).is_err(), "the flag wins over the environment");
    assert!(curl_local(at(flag_port), "demo", "demo"), "{}", served.log());
    drop(served);

    // The flags' own variables, and the config file from POPGATE_CONFIG.
    let env =
        [("POPGATE_CONFIG", path), ("POPGATE_LISTEN", flag_address.as_str()), ("POPGATE_ADMIN__ENABLED", "false")];
    let served = Running::start(&[], &env, at(flag_port));
    assert!(curl_local(at(flag_port), "demo", "demo"), "{}", served.log());
}

/// As root, `oauth keygen` refuses to make a key the service cannot read,
/// naming the command to run; `--owner popgate` gives it to that user, who
/// can then use it (`check-config` as popgate, as the unit runs it).
#[test]
fn oauth_keygen_makes_the_key_for_the_service_user() {
    assert_eq!(
        nix::unistd::geteuid().as_raw(),
        0,
        "this test runs commands as the popgate user: run it as root, as scripts/test does"
    );
    let user = nix::unistd::User::from_name("popgate")
        .unwrap()
        .expect("no popgate user: scripts/install-test-deps creates it (useradd --system popgate)");
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let key = dir.path().join("token.key");
    let key_arg = key.to_str().unwrap();

    let refused = Command::new(popgate_bin()).args(["oauth", "keygen", key_arg]).output().unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{said}");
    assert!(said.contains(&format!("popgate oauth keygen {key_arg} --owner popgate")), "names the command: {said}");
    assert!(!key.exists(), "nothing written");

    let made = Command::new(popgate_bin()).args(["oauth", "keygen", key_arg, "--owner", "popgate"]).output().unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let meta = std::fs::metadata(&key).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), user.uid.as_raw());
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777, 0o600);

    // The service user reads it: check-config as popgate accepts an OAuth
    // configuration that names it (and the token store directory it owns).
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    nix::unistd::chown(&state, Some(user.uid), Some(user.gid)).unwrap();
    let secret = dir.path().join("client-secret");
    std::fs::write(&secret, "s").unwrap();
    nix::unistd::chown(&secret, Some(user.uid), Some(user.gid)).unwrap();
    let config = dir.path().join("popgate.toml");
    std::fs::write(
        &config,
        format!(
            "[backend]\nkind = \"imap\"\nhost = \"imap.gmail.com\"\n[token_store]\npath = \"{}/tokens.enc\"\nkey_file = \"{key_arg}\"\n\
             [[account]]\nname = \"scans\"\nmode = \"mapped\"\nlogin = \"s@example.com\"\n\
             [account.oauth]\nprovider = \"google\"\nclient_id = \"id\"\nclient_secret_file = \"{}\"\n\
             [[account.device]]\nuser = \"printer\"\npassword_hash = \"{}\"\n",
            state.display(),
            secret.display(),
            hash("p")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    // The binary may sit where popgate cannot read it: a copy it can.
    let binary = dir.path().join("popgate");
    std::fs::copy(popgate_bin(), &binary).unwrap();
    let checked = Command::new("runuser")
        .args(["-u", "popgate", "--", binary.to_str().unwrap(), "check-config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(checked.status.success(), "as popgate: {}", String::from_utf8_lossy(&checked.stderr));

    // A key made by root without --owner is what the issue saw: popgate
    // cannot read it, and check-config says so, naming the key and the fix.
    let root_key = dir.path().join("root.key");
    std::fs::write(&root_key, std::fs::read(&key).unwrap()).unwrap();
    std::fs::set_permissions(&root_key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    std::fs::write(&config, std::fs::read_to_string(&config).unwrap().replace(key_arg, root_key.to_str().unwrap()))
        .unwrap();
    let checked = Command::new("runuser")
        .args(["-u", "popgate", "--", binary.to_str().unwrap(), "check-config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&checked.stderr);
    assert!(!checked.status.success(), "{said}");
    assert!(said.contains("token_store.key_file") && said.contains("root.key"), "{said}");
}

/// A CONNECT proxy on loopback that records request lines and answers 502.
struct ConnectProxy {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
}

impl ConnectProxy {
    fn start() -> ConnectProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut first = String::new();
                let _ = reader.read_line(&mut first);
                seen.lock().unwrap().push(first.trim_end().to_string());
                let _ = stream.write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n");
            }
        });
        ConnectProxy { addr, requests }
    }
}

/// The OAuth client goes through HTTPS_PROXY, and around it for NO_PROXY.
#[test]
fn oauth_requests_honour_https_proxy_and_no_proxy() {
    let proxy = ConnectProxy::start();
    let direct = TcpListener::bind("127.0.0.1:0").unwrap();
    let direct_addr = direct.local_addr().unwrap();
    direct.set_nonblocking(true).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("token.key");
    let me = nix::unistd::User::from_uid(nix::unistd::geteuid()).unwrap().unwrap().name;
    let made =
        Command::new(popgate_bin()).args(["oauth", "keygen", key.to_str().unwrap(), "--owner", &me]).output().unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let config = dir.path().join("popgate.toml");
    std::fs::write(
        &config,
        format!(
            "[backend]\nkind = \"graph\"\nuser = \"m@contoso.example\"\n[token_store]\npath = \"{}/tokens.enc\"\nkey_file = \"{}\"\n\
             [[account]]\nname = \"mail\"\nmode = \"mapped\"\nlogin = \"m@contoso.example\"\n\
             [account.oauth]\nprovider = \"microsoft\"\ntenant = \"contoso.example\"\nclient_id = \"id\"\n\
             grant = \"client_credentials\"\ntimeout_secs = 3\nclient_secret_env = \"TEST_CLIENT_SECRET\"\n\
             token_url = \"https://{direct_addr}/token\"\n\
             [[account.device]]\nuser = \"printer\"\npassword_hash = \"{}\"\n",
            dir.path().display(),
            key.display(),
            hash("p")
        ),
    )
    .unwrap();
    let login = |env: &[(&str, &str)]| {
        Command::new(popgate_bin())
            .args(["oauth", "login", "mail", "-c", config.to_str().unwrap(), "--owner", &me])
            .env("TEST_CLIENT_SECRET", "s")
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .env_remove("ALL_PROXY")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let proxy_url = format!("http://{}", proxy.addr);
    let output = login(&[("HTTPS_PROXY", &proxy_url)]);
    assert!(!output.status.success(), "the proxy refused the tunnel");
    let requests = proxy.requests.lock().unwrap().clone();
    assert_eq!(
        requests,
        vec![format!("CONNECT {direct_addr} HTTP/1.1")],
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(direct.accept().is_err(), "nothing went around the proxy");

    let output = login(&[("HTTPS_PROXY", &proxy_url), ("NO_PROXY", "127.0.0.1")]);
    assert!(!output.status.success());
    assert_eq!(proxy.requests.lock().unwrap().len(), 1, "NO_PROXY: not through the proxy");
    direct.set_nonblocking(false).unwrap();
    // The direct connection was made (it is still queued on the listener).
    let accepted = direct.accept();
    assert!(accepted.is_ok(), "NO_PROXY: straight to the token endpoint");
}
