//! Accounts end to end, with passwords (OAuth accounts: tests/oauth.rs):
//! mapped device users reaching one Dovecot mailbox with the password
//! popgate holds, a wrong or disabled device refused with `-ERR [AUTH]`
//! without anything reaching the backend, two devices on one mailbox,
//! pass-through by domain, a demo backend in the same routing table, a held
//! password rotated at its source, and `popgate passwd`.

mod support;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use popgate::auth::passwords::{DeviceHash, hash_password};
use popgate::config::Config;
use support::dovecot::{ALICE, BOB, Dovecot};
use support::gateway::GatewayProcess;
use support::messages::simple;
use support::pop3::Dialogue as _;
use support::pop3::Pop3;

const ERIN: (&str, &str) = ("erin@example.com", "erin-secret");
const PRINTER_1: (&str, &str) = ("printer-1", "pw-one");
const PRINTER_2: (&str, &str) = ("printer-2", "pw-two");
const PRINTER_3: (&str, &str) = ("printer-3", "pw-three");
const SCANNER: (&str, &str) = ("scanner", "pw-scanner");

struct World {
    dovecot: Dovecot,
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl World {
    fn new() -> World {
        let dovecot = Dovecot::start_with_users(&[ALICE, BOB, ERIN]);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("office-password"), format!("{}\n", ALICE.1)).unwrap();
        std::fs::write(dir.path().join("scanner-password"), "anything\n").unwrap();
        let config = dir.path().join("popgate.toml");
        let text = format!(
            r#"
# The [backend] (named "default") is the demo store; Dovecot is a named one.
[backend]
kind = "demo"

[backends.dovecot]
kind = "imap"
host = "127.0.0.1"
port = {port}
tls = "none"

[[account]]
name = "office"
mode = "mapped"
backend = "dovecot"
login = "alice"
password_file = "{dir}/office-password"

[[account.device]]
user = "{p1}"
password_hash = "{h1}"

[[account.device]]
user = "{p2}"
password_hash = "{h2}"

[[account.device]]
user = "{p3}"
password_hash = "{h3}"
enabled = false

[[account]]
name = "staff"
mode = "passthrough"
backend = "dovecot"
users = ["*@example.com"]

[[account]]
name = "lobby-scanner"
mode = "mapped"
login = "scanner"
password_file = "{dir}/scanner-password"

[[account.device]]
user = "{s}"
password_hash = "{hs}"
"#,
            port = dovecot.imap_port,
            dir = dir.path().display(),
            p1 = PRINTER_1.0,
            h1 = hash_password(PRINTER_1.1).unwrap(),
            p2 = PRINTER_2.0,
            h2 = hash_password(PRINTER_2.1).unwrap(),
            p3 = PRINTER_3.0,
            h3 = hash_password(PRINTER_3.1).unwrap(),
            s = SCANNER.0,
            hs = hash_password(SCANNER.1).unwrap(),
        );
        std::fs::write(&config, text).unwrap();
        Config::load(&config).unwrap_or_else(|e| panic!("test configuration: {e}"));
        World { dovecot, dir, config }
    }

    fn gateway(&self) -> GatewayProcess {
        GatewayProcess::start(&["--config", self.config.to_str().unwrap()])
    }

    /// Dovecot's successful logins of `user` so far.
    fn backend_logins(&self, user: &str) -> usize {
        self.dovecot.log().matches(&format!("Login: user=<{user}>")).count()
    }
}

/// USER/PASS that must fail; returns the PASS reply.
fn refused(gateway: &GatewayProcess, user: &str, password: &str) -> String {
    let mut pop = Pop3::connect(gateway.addr);
    pop.ok(&format!("USER {user}"));
    pop.cmd(&format!("PASS {password}"))
}

#[test]
fn the_right_device_password_opens_the_mapped_mailbox() {
    let world = World::new();
    let uids = world.dovecot.append_all(ALICE.0, &[simple("scan one"), simple("scan two")]);
    let gateway = world.gateway();
    let mut pop = Pop3::login(gateway.addr, PRINTER_1.0, PRINTER_1.1);
    assert!(pop.ok("STAT").starts_with("+OK 2 "));
    pop.ok("RETR 1");
    let body = pop.body_text();
    assert!(body.iter().any(|l| l.contains("scan one")), "{body:?}");
    pop.ok("QUIT");
    assert_eq!(world.dovecot.uids(ALICE.0), uids);
    assert!(world.backend_logins(ALICE.0) >= 1);
    assert!(!gateway.log().contains(ALICE.1), "the held password in the log");
    assert!(!gateway.log().contains(PRINTER_1.1), "a device password in the log");
}

#[test]
fn a_wrong_disabled_or_unknown_login_is_auth_and_changes_nothing() {
    let world = World::new();
    let uids = world.dovecot.append_all(ALICE.0, &[simple("untouched")]);
    let gateway = world.gateway();
    let logins_before = world.backend_logins(ALICE.0);

    for (user, password) in [
        (PRINTER_1.0, PRINTER_2.1), // another device's password
        (PRINTER_1.0, ALICE.1),     // the mailbox's own password
        (PRINTER_3.0, PRINTER_3.1), // disabled
        ("printer-9", "anything"),  // unknown
        (BOB.0, BOB.1),             // no account routes bob
    ] {
        let reply = refused(&gateway, user, password);
        assert!(reply.starts_with("-ERR [AUTH]"), "{user}: {reply}");
    }
    // Nothing reached Dovecot, nothing changed in the mailbox...
    assert_eq!(world.backend_logins(ALICE.0), logins_before);
    assert_eq!(world.dovecot.uids(ALICE.0), uids);
    // ...and the other devices, the enabled ones, still log in.
    for (user, password) in [PRINTER_2, PRINTER_1] {
        let mut pop = Pop3::login(gateway.addr, user, password);
        assert!(pop.ok("STAT").starts_with("+OK 1 "));
        pop.ok("QUIT");
    }
    let log = gateway.log();
    assert!(log.contains("device login refused: the device is disabled"), "{log}");
    for secret in [PRINTER_1.1, PRINTER_2.1, PRINTER_3.1, ALICE.1] {
        assert!(!log.contains(secret), "a password in the log");
    }
}

#[test]
fn two_devices_share_one_mailbox() {
    let world = World::new();
    let uids = world.dovecot.append_all(ALICE.0, &[simple("a"), simple("b"), simple("c")]);
    let gateway = world.gateway();
    let mut first = Pop3::login(gateway.addr, PRINTER_1.0, PRINTER_1.1);
    let mut second = Pop3::login(gateway.addr, PRINTER_2.0, PRINTER_2.1);
    let stat = first.ok("STAT");
    assert!(stat.starts_with("+OK 3 "));
    assert_eq!(second.ok("STAT"), stat);
    assert_eq!(first.uidl(), second.uidl());
    first.ok("DELE 1");
    first.ok("QUIT");
    second.ok("QUIT");
    assert_eq!(world.dovecot.uids(ALICE.0), uids[1..]);
    let mut again = Pop3::login(gateway.addr, PRINTER_2.0, PRINTER_2.1);
    assert!(again.ok("STAT").starts_with("+OK 2 "));
    again.ok("QUIT");
}

#[test]
fn one_routing_table_for_pass_through_by_domain_and_a_demo_backend() {
    let world = World::new();
    world.dovecot.append_all(ERIN.0, &[simple("for erin")]);
    let gateway = world.gateway();

    // *@example.com passes through to Dovecot with the client's own
    // credentials.
    let mut pop = Pop3::login(gateway.addr, ERIN.0, ERIN.1);
    assert!(pop.ok("STAT").starts_with("+OK 1 "));
    pop.ok("QUIT");
    let reply = refused(&gateway, ERIN.0, "wrong");
    assert!(reply.starts_with("-ERR [AUTH]"), "{reply}");

    // The scanner is mapped to the demo store (the [backend] table).
    let mut pop = Pop3::login(gateway.addr, SCANNER.0, SCANNER.1);
    assert!(pop.ok("STAT").starts_with("+OK 3 "), "the demo store's three samples");
    pop.ok("QUIT");
}

#[test]
fn a_held_password_rotated_at_its_source_is_picked_up() {
    let world = World::new();
    world.dovecot.append_all(ALICE.0, &[simple("x")]);
    let held = world.dir.path().join("office-password");
    std::fs::write(&held, "an old app password\n").unwrap();
    let gateway = world.gateway();
    // The backend refuses what popgate holds: not the device's fault.
    let reply = refused(&gateway, PRINTER_1.0, PRINTER_1.1);
    assert!(reply.starts_with("-ERR [SYS/TEMP]"), "{reply}");
    // The operator updates the file (a rotated Kubernetes Secret): the next
    // poll re-reads it after the refusal, without a restart.
    std::fs::write(&held, format!("{}\n", ALICE.1)).unwrap();
    let mut pop = Pop3::login(gateway.addr, PRINTER_1.0, PRINTER_1.1);
    assert!(pop.ok("STAT").starts_with("+OK 1 "));
    pop.ok("QUIT");
}

#[test]
fn passwd_prints_an_argon2id_hash_of_standard_input() {
    let run = |input: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_popgate"))
            .arg("passwd")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run popgate passwd");
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let deadline = Instant::now() + support::IO_TIMEOUT;
        while child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "popgate passwd did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().unwrap()
    };
    let output = run("printer password 1\n");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let phc = String::from_utf8(output.stdout).unwrap();
    let phc = phc.trim();
    assert!(phc.starts_with("$argon2id$"), "{phc}");
    let hash = DeviceHash::parse(phc).unwrap();
    assert!(hash.verify("printer password 1"));
    assert!(!hash.verify("printer password 1\n"));
    assert!(!phc.contains("printer password"));

    let output = run("\n");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("empty password"));
}
