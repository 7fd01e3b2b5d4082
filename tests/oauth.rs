//! OAuth accounts end to end: a stand-in authorization server
//! (`support::oauth_server`, RFC 6749/7636/8628 wire formats) and a real
//! Dovecot whose oauth2 passdb validates bearer tokens against that
//! server's introspection endpoint — so each passing login proves the token
//! popgate holds really reached, and satisfied, an IMAP server.
//!
//! Covered: a mapped device reading an OAuth mailbox; refresh before expiry,
//! once for many concurrent sessions; rotation stored before use and still
//! there after a restart; refresh failures (5xx, invalid_grant) answered
//! with -ERR [SYS/TEMP], a log line and a metric, never losing the token;
//! the store file encrypted; `popgate oauth login` (pasted redirect,
//! loopback listener, device code), client credentials, `oauth status`;
//! OAUTHBEARER to a server that offers only it; and a POP3 client's own
//! XOAUTH2 / OAUTHBEARER token passed through to Dovecot.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use popgate::auth::passwords::{SecretSource, hash_password};
use popgate::auth::tokens::{EncryptedFileStore, StoreKey, StoredToken, TokenStore, unix_now};
use popgate::backend::select::BackendConfig;
use popgate::config::Config;
use popgate::mail::Secret;
use support::IO_TIMEOUT;
use support::dovecot::Dovecot;
use support::gateway::{Gateway, GatewayProcess};
use support::messages::simple;
use support::oauth_server::{CLIENT_SECRET, Fault, OAuthServer, http_get};
use support::pop3::Dialogue as _;
use support::pop3::Pop3;

const ALICE: (&str, &str) = ("alice", "alice-imap-password");
const PRINTER_1: (&str, &str) = ("printer-1", "first printer's password");
const PRINTER_2: (&str, &str) = ("printer-2", "second printer's password");
const ALL_MECHANISMS: &str = "plain login xoauth2 oauthbearer";

fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(future)
}

/// An authorization server, a Dovecot trusting it, and a popgate
/// configuration with one OAuth account ("scans", the mailbox of alice)
/// and two devices.
struct World {
    idp: OAuthServer,
    dovecot: Dovecot,
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl World {
    fn new() -> World {
        World::with(ALL_MECHANISMS, "", "")
    }

    /// `oauth_extra`: more keys for the account's [account.oauth] table;
    /// `tables`: more top-level tables.
    fn with(mechanisms: &str, oauth_extra: &str, tables: &str) -> World {
        let idp = OAuthServer::start(ALICE.0);
        let dovecot = Dovecot::start_oauth(&idp.url("/introspect"), &[ALICE], mechanisms);
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("token.key");
        std::fs::write(&key, format!("{}\n", StoreKey::generate_text())).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let secret = dir.path().join("client-secret");
        std::fs::write(&secret, format!("{CLIENT_SECRET}\n")).unwrap();
        let config = dir.path().join("popgate.toml");
        let text = format!(
            r#"
[backend]
kind = "imap"
host = "127.0.0.1"
port = {port}
tls = "none"
timeout_secs = 10

[token_store]
path = "{store}"
key_file = "{key}"

[[account]]
name = "scans"
mode = "mapped"
login = "{alice}"

[account.oauth]
provider = "generic"
client_id = "popgate-test-client"
client_secret_file = "{secret}"
authorization_url = "{idp}/authorize"
token_url = "{idp}/token"
device_authorization_url = "{idp}/device"
scopes = ["mail"]
redirect_uri = "http://127.0.0.1/callback"
retry_after_failure_secs = 1
timeout_secs = 10
{oauth_extra}

[[account.device]]
user = "{p1}"
password_hash = "{h1}"

[[account.device]]
user = "{p2}"
password_hash = "{h2}"

{tables}
"#,
            port = dovecot.imap_port,
            store = dir.path().join("tokens.enc").display(),
            key = key.display(),
            secret = secret.display(),
            alice = ALICE.0,
            idp = format!("http://{}", idp.addr),
            p1 = PRINTER_1.0,
            h1 = hash_password(PRINTER_1.1).unwrap(),
            p2 = PRINTER_2.0,
            h2 = hash_password(PRINTER_2.1).unwrap(),
        );
        std::fs::write(&config, text).unwrap();
        Config::load(&config).unwrap_or_else(|e| panic!("test configuration: {e}"));
        World { idp, dovecot, dir, config }
    }

    fn store_path(&self) -> PathBuf {
        self.dir.path().join("tokens.enc")
    }

    fn store(&self) -> EncryptedFileStore {
        let key = StoreKey::read(&SecretSource::File(self.dir.path().join("token.key"))).unwrap();
        EncryptedFileStore::new(self.store_path(), key)
    }

    fn stored(&self) -> Option<StoredToken> {
        block_on(self.store().load("scans")).unwrap()
    }

    /// Seeds the store with tokens the stand-in issued, the access token
    /// expiring at `expires_at`. Returns (access, refresh).
    fn seed(&self, expires_at: u64) -> (String, String) {
        let (access, refresh) = self.idp.issue(ALICE.0);
        let token = StoredToken {
            access_token: Secret::new(&access),
            refresh_token: Some(Secret::new(&refresh)),
            expires_at: Some(expires_at),
            obtained_at: unix_now().saturating_sub(3600),
            scope: None,
        };
        block_on(self.store().save("scans", &token)).unwrap();
        (access, refresh)
    }

    fn gateway(&self) -> GatewayProcess {
        GatewayProcess::start(&["--config", self.config.to_str().unwrap()])
    }

    fn popgate(&self, args: &[&str]) -> Interactive {
        Interactive::start(args, &self.config)
    }
}

fn stat_of(pop: &mut Pop3) -> String {
    pop.ok("STAT")
}

fn metrics(gateway: &GatewayProcess) -> String {
    let (status, _, body) = http_get(&format!("http://{}/metrics", gateway.admin_addr));
    assert_eq!(status, 200, "{body}");
    body
}

fn metric_line(text: &str, needle: &str) -> Option<String> {
    text.lines().find(|l| l.starts_with(needle)).map(String::from)
}

/// Waits until `check` holds, or panics.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    support::wait_for(what, IO_TIMEOUT, || check().then_some(()));
}

#[test]
fn a_mapped_device_reads_the_oauth_mailbox_through_dovecots_oauth2_passdb() {
    let world = World::new();
    world.dovecot.append(ALICE.0, &simple("scan 1"));
    world.dovecot.append(ALICE.0, &simple("scan 2"));
    let (access, _) = world.seed(unix_now() + 3600);
    let gateway = world.gateway();

    let mut pop = Pop3::login(gateway.addr, PRINTER_1.0, PRINTER_1.1);
    assert!(stat_of(&mut pop).starts_with("+OK 2 "));
    pop.ok("RETR 2");
    let body = pop.body_text();
    assert!(body.iter().any(|l| l.contains("scan 2")), "{body:?}");
    pop.ok("QUIT");

    // The stored, still-valid token was used: no refresh; Dovecot logged
    // alice in with XOAUTH2 after asking the stand-in about the token.
    assert_eq!(world.idp.refreshes(), 0);
    assert!(world.dovecot.logins(ALICE.0, "XOAUTH2") >= 1, "{}", world.dovecot.log());
    assert!(world.idp.introspections() >= 1);
    assert!(world.idp.access_active(&access));
    let log = gateway.log();
    for token in world.idp.all_tokens() {
        assert!(!log.contains(&token), "a token in popgate's log");
    }
}

#[test]
fn a_wrong_device_password_is_auth_and_touches_nothing() {
    let world = World::new();
    world.dovecot.append(ALICE.0, &simple("kept"));
    world.seed(unix_now() - 10);
    let before = std::fs::read(world.store_path()).unwrap();
    let gateway = world.gateway();

    let mut pop = Pop3::connect(gateway.addr);
    pop.ok(&format!("USER {}", PRINTER_1.0));
    let reply = pop.cmd(&format!("PASS {}", PRINTER_2.1));
    assert!(reply.starts_with("-ERR [AUTH]"), "{reply}");
    // Not even an expired token is refreshed for a wrong password.
    assert_eq!(world.idp.grants(), Vec::<String>::new());
    assert_eq!(std::fs::read(world.store_path()).unwrap(), before);
    assert_eq!(world.dovecot.logins(ALICE.0, "XOAUTH2"), 0);

    // The other device still works (and refreshes the expired token).
    let mut pop = Pop3::login(gateway.addr, PRINTER_2.0, PRINTER_2.1);
    assert!(stat_of(&mut pop).starts_with("+OK 1 "));
    pop.ok("QUIT");
}

#[test]
fn fifty_sessions_on_an_expiring_token_cause_one_refresh() {
    let world = World::new();
    world.dovecot.append(ALICE.0, &simple("for everyone"));
    let (old_access, old_refresh) = world.seed(unix_now() + 60); // within the 300 s margin
    world.idp.set_delay(Duration::from_millis(400));
    let gateway = world.gateway();

    let addr = gateway.addr;
    let sessions: Vec<_> = (0..50)
        .map(|i| {
            std::thread::spawn(move || {
                let (user, password) = if i % 2 == 0 { PRINTER_1 } else { PRINTER_2 };
                let mut pop = Pop3::login(addr, user, password);
                let stat = pop.ok("STAT");
                pop.ok("QUIT");
                stat
            })
        })
        .collect();
    for session in sessions {
        let stat = session.join().expect("a session failed");
        assert!(stat.starts_with("+OK 1 "), "{stat}");
    }
    assert_eq!(world.idp.refreshes(), 1, "grants: {:?}", world.idp.grants());
    // Rotated: the old refresh token is dead, the stored one is the new one.
    let stored = world.stored().unwrap();
    assert!(!world.idp.refresh_active(&old_refresh));
    assert!(world.idp.refresh_active(stored.refresh_token.as_ref().unwrap().expose()));
    assert_ne!(stored.access_token.expose(), old_access);
    let metrics = metrics(&gateway);
    assert_eq!(
        metric_line(&metrics, "popgate_oauth_refreshes_total{account=\"scans\",result=\"ok\"}").as_deref(),
        Some("popgate_oauth_refreshes_total{account=\"scans\",result=\"ok\"} 1"),
        "{metrics}"
    );
}

#[test]
fn a_rotated_refresh_token_is_stored_before_use_and_survives_a_restart() {
    let world = World::new();
    world.dovecot.append(ALICE.0, &simple("hello"));
    let (_, first_refresh) = world.seed(unix_now() - 5);

    let gateway = world.gateway();
    let mut pop = Pop3::login(gateway.addr, PRINTER_1.0, PRINTER_1.1);
    pop.ok("QUIT");
    drop(gateway);
    let second = world.stored().unwrap();
    let second_refresh = second.refresh_token.clone().unwrap();
    assert_ne!(second_refresh.expose(), first_refresh);
    assert!(!world.idp.refresh_active(&first_refresh), "the stand-in rotated it");
    assert!(world.idp.refresh_active(second_refresh.expose()));

    // The provider revokes every access token (e.g. a password change with
    // sessions kept): the stored one, valid by its time, is refused by
    // Dovecot; a new process refreshes with the rotated refresh token it
    // finds in the store, and retries.
    // (A token refused within retry_after_failure_secs of being issued is
    // not refreshed again at once: wait that second out.)
    std::thread::sleep(Duration::from_millis(1100));
    world.idp.expire_all_access_tokens();
    let gateway = world.gateway();
    let mut pop = Pop3::login(gateway.addr, PRINTER_2.0, PRINTER_2.1);
    assert!(stat_of(&mut pop).starts_with("+OK 1 "));
    pop.ok("QUIT");
    assert_eq!(world.idp.refreshes(), 2, "grants: {:?}", world.idp.grants());
    let third = world.stored().unwrap();
    assert_ne!(third.refresh_token, Some(second_refresh));
    assert!(world.idp.access_active(third.access_token.expose()));
    // Dovecot saw the refused token (XOAUTH2's error challenge answered)
    // and then the fresh one.
    let log = world.dovecot.log();
    assert!(log.contains("method=XOAUTH2"), "{log}");
}

#[test]
fn a_failed_refresh_is_sys_temp_with_a_log_line_and_a_metric_and_keeps_the_token() {
    let world = World::new();
    world.dovecot.append(ALICE.0, &simple("waiting"));
    let (_, refresh) = world.seed(unix_now() - 5);
    let stored_before = std::fs::read(world.store_path()).unwrap();
    let gateway = world.gateway();

    // The provider has an outage.
    world.idp.inject(&[Fault::ServerError]);
    let mut pop = Pop3::connect(gateway.addr);
    pop.ok(&format!("USER {}", PRINTER_1.0));
    let reply = pop.cmd(&format!("PASS {}", PRINTER_1.1));
    assert!(reply.starts_with("-ERR [SYS/TEMP]"), "{reply}");
    assert_eq!(std::fs::read(world.store_path()).unwrap(), stored_before, "the store is untouched");

    // Then it refuses the refresh token (as after a revocation).
    std::thread::sleep(Duration::from_millis(1100)); // retry_after_failure_secs = 1
    world.idp.inject(&[Fault::InvalidGrant]);
    let mut pop = Pop3::connect(gateway.addr);
    pop.ok(&format!("USER {}", PRINTER_2.0));
    let reply = pop.cmd(&format!("PASS {}", PRINTER_2.1));
    assert!(reply.starts_with("-ERR [SYS/TEMP]"), "{reply}");
    assert_eq!(std::fs::read(world.store_path()).unwrap(), stored_before, "never deleted");
    assert_eq!(world.stored().unwrap().refresh_token.unwrap().expose(), refresh);

    eventually("the log lines", || {
        let log = gateway.log();
        log.contains("token refresh failed") && log.contains("run `popgate oauth login scans`")
    });
    let metrics = metrics(&gateway);
    for result in ["unavailable", "invalid_grant"] {
        let needle = format!("popgate_oauth_refreshes_total{{account=\"scans\",result=\"{result}\"}} 1");
        assert!(metrics.contains(&needle), "{needle} in\n{metrics}");
    }

    // The provider recovers: the kept refresh token works, nothing was lost.
    std::thread::sleep(Duration::from_millis(1100));
    let mut pop = Pop3::login(gateway.addr, PRINTER_1.0, PRINTER_1.1);
    assert!(stat_of(&mut pop).starts_with("+OK 1 "));
    pop.ok("QUIT");
    assert_ne!(std::fs::read(world.store_path()).unwrap(), stored_before);
}

/// Issue #19 item 6: refusals no retry cures — the user must sign in
/// interactively or consent, the client secret expired, the client may not
/// use the grant, the scopes are refused — are "operator action needed":
/// one log line naming the account and what to do, a metric to alert on,
/// the device told -ERR [SYS/TEMP], and the provider left alone for hours
/// (not asked again every `retry_after_failure_secs`) unless a new token is
/// stored.
#[test]
fn refusals_only_an_operator_can_end_are_said_once_and_not_retried() {
    let world = World::new();
    world.dovecot.append(ALICE.0, &simple("waiting"));
    let gateway = world.gateway();
    let device_login = |device: (&str, &str)| {
        let mut pop = Pop3::connect(gateway.addr);
        pop.ok(&format!("USER {}", device.0));
        pop.cmd(&format!("PASS {}", device.1))
    };
    let gauge = "popgate_oauth_operator_action_needed{account=\"scans\"}";
    for error in ["interaction_required", "consent_required", "invalid_client", "unauthorized_client", "invalid_scope"]
    {
        // An expired access token, so the next login refreshes.
        world.seed(unix_now() - 5);
        world.idp.inject(&[Fault::Refused(error)]);
        let asked = world.idp.grants().len();
        let reply = device_login(PRINTER_1);
        assert!(reply.starts_with("-ERR [SYS/TEMP]"), "{error}: {reply}");
        assert_eq!(world.idp.grants().len(), asked + 1, "{error}: asked once");
        eventually("the operator line", || {
            let log = gateway.log();
            log.lines().any(|l| l.contains("operator action needed") && l.contains("scans") && l.contains(error))
        });
        assert_eq!(metric_line(&metrics(&gateway), gauge).as_deref(), Some(&*format!("{gauge} 1")), "{error}");
        let counted = format!("popgate_oauth_refreshes_total{{account=\"scans\",result=\"{error}\"}} 1");
        assert!(metrics(&gateway).contains(&counted), "{counted}");

        // Past retry_after_failure_secs (1 s here): still not asked again.
        std::thread::sleep(Duration::from_millis(1100));
        let reply = device_login(PRINTER_2);
        assert!(reply.starts_with("-ERR [SYS/TEMP]"), "{error}: {reply}");
        assert_eq!(world.idp.grants().len(), asked + 1, "{error}: the provider is left alone");
    }
    let log = gateway.log();
    let lines = log.lines().filter(|l| l.contains("operator action needed:")).count();
    assert_eq!(lines, 5, "one line per refusal, not per device login:\n{log}");
    for advice in ["sign in interactively", "consent", "client secret", "app registration", "scopes"] {
        assert!(log.contains(advice), "{advice} in\n{log}");
    }

    // The operator signs in again: the stored token is used at once.
    world.seed(unix_now() + 3600);
    let mut pop = Pop3::login(gateway.addr, PRINTER_1.0, PRINTER_1.1);
    assert!(stat_of(&mut pop).starts_with("+OK 1 "));
    pop.ok("QUIT");
    assert_eq!(metric_line(&metrics(&gateway), gauge).as_deref(), Some(&*format!("{gauge} 0")));
}

#[test]
fn the_token_store_is_encrypted_and_private() {
    let world = World::new();
    world.seed(unix_now() - 5);
    let gateway = world.gateway();
    let mut pop = Pop3::login(gateway.addr, PRINTER_1.0, PRINTER_1.1);
    pop.ok("QUIT");
    assert_eq!(world.idp.refreshes(), 1);

    let bytes = std::fs::read(world.store_path()).unwrap();
    let tokens = world.idp.all_tokens();
    assert!(tokens.len() >= 4);
    for token in &tokens {
        assert!(!bytes.windows(token.len()).any(|w| w == token.as_bytes()), "a token in clear in the store");
    }
    for clear in ["scans", "access_token", "refresh_token", "alice"] {
        assert!(!bytes.windows(clear.len()).any(|w| w == clear.as_bytes()), "{clear} in clear in the store");
    }
    let mode = std::fs::metadata(world.store_path()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn oauthbearer_is_used_when_the_server_offers_only_it() {
    // No warm sessions: the second login must really log in again.
    let world = World::with("plain login oauthbearer", "", "[backend_pool]\nenabled = false");
    world.dovecot.append(ALICE.0, &simple("bearer"));
    world.seed(unix_now() + 3600);
    let gateway = world.gateway();
    let mut pop = Pop3::login(gateway.addr, PRINTER_1.0, PRINTER_1.1);
    assert!(stat_of(&mut pop).starts_with("+OK 1 "));
    pop.ok("QUIT");
    assert!(world.dovecot.logins(ALICE.0, "OAUTHBEARER") >= 1, "{}", world.dovecot.log());

    // A refused token: OAUTHBEARER's error challenge is answered (%x01), the
    // server ends with NO, popgate refreshes and retries.
    world.idp.expire_all_access_tokens();
    let mut pop = Pop3::login(gateway.addr, PRINTER_2.0, PRINTER_2.1);
    assert!(stat_of(&mut pop).starts_with("+OK 1 "));
    pop.ok("QUIT");
    assert_eq!(world.idp.refreshes(), 1);
}

#[test]
fn client_credentials_get_a_token_without_anyone_signing_in() {
    let world = World::with(ALL_MECHANISMS, "grant = \"client_credentials\"", "");
    world.dovecot.append(ALICE.0, &simple("app-only"));
    let gateway = world.gateway();
    let mut pop = Pop3::login(gateway.addr, PRINTER_1.0, PRINTER_1.1);
    assert!(stat_of(&mut pop).starts_with("+OK 1 "));
    pop.ok("QUIT");
    assert_eq!(world.idp.grants(), ["client_credentials"]);
    let stored = world.stored().expect("stored");
    assert!(stored.refresh_token.is_none());
}

/// `popgate` run with piped standard input and output, read line by line.
struct Interactive {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Interactive {
    fn start(args: &[&str], config: &Path) -> Interactive {
        // The files `oauth login` writes go to the user running the tests
        // (as root, it refuses without --owner).
        let mut args = args.to_vec();
        let me = nix::unistd::User::from_uid(nix::unistd::geteuid()).unwrap().expect("the current user").name;
        if args.get(1) == Some(&"login") && !args.contains(&"--owner") {
            args.extend(["--owner", me.as_str()]);
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_popgate"))
            .args(&args)
            .arg("--config")
            .arg(config)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run popgate");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Interactive { child, lines, seen: Vec::new() }
    }

    /// The first line (from now) that `matches`.
    fn line_matching(&mut self, matches: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if matches(&line) {
                        return line;
                    }
                }
                Err(_) => panic!("no matching line from popgate within {IO_TIMEOUT:?}; got {:?}", self.seen),
            }
        }
    }

    fn type_line(&mut self, text: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{text}").unwrap();
        stdin.flush().unwrap();
    }

    /// Waits for the exit; returns success and everything printed.
    fn finish(mut self) -> (bool, String) {
        let deadline = Instant::now() + IO_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("popgate did not exit within {IO_TIMEOUT:?}; printed {:?}", self.seen);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.seen.push(line);
        }
        (status.success(), self.seen.join("\n"))
    }
}

impl Drop for Interactive {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// After `popgate oauth login`: a token the stand-in issued is stored, and
/// a device reads the mailbox with it.
fn assert_login_worked(world: &World, printed: &str) {
    let stored = world.stored().expect("a token was stored");
    assert!(world.idp.access_active(stored.access_token.expose()));
    assert!(world.idp.refresh_active(stored.refresh_token.as_ref().unwrap().expose()));
    for token in world.idp.all_tokens() {
        assert!(!printed.contains(&token), "a token was printed");
    }
    assert!(printed.contains("Stored a token for `scans`"), "{printed}");
    world.dovecot.append(ALICE.0, &simple("after login"));
    let gateway = world.gateway();
    let mut pop = Pop3::login(gateway.addr, PRINTER_1.0, PRINTER_1.1);
    assert!(stat_of(&mut pop).starts_with("+OK 1 "));
    pop.ok("QUIT");
    assert_eq!(world.idp.refreshes(), 0);
}

#[test]
fn oauth_login_with_the_redirected_address_pasted_back() {
    let world = World::new();
    let mut login = world.popgate(&["oauth", "login", "scans"]);
    let url = login.line_matching(|l| l.starts_with("http://"));
    let query: std::collections::HashMap<_, _> = url::Url::parse(&url).unwrap().query_pairs().into_owned().collect();
    assert_eq!(query["code_challenge_method"], "S256");
    assert_eq!(query["redirect_uri"], "http://127.0.0.1/callback");
    assert_eq!(query["login_hint"], ALICE.0);
    // The user signs in in a browser somewhere; the provider sends the
    // browser to the redirect URI, which does not load — the address is
    // pasted back.
    let (status, location, _) = http_get(&url);
    assert_eq!(status, 302);
    let location = location.unwrap();
    assert!(location.starts_with("http://127.0.0.1/callback?code="), "{location}");

    // A redirect from another sign-in (wrong state) is refused.
    let mut forged = url::Url::parse(&location).unwrap();
    let code = forged.query_pairs().find(|(k, _)| k == "code").unwrap().1.into_owned();
    forged.query_pairs_mut().clear().append_pair("code", &code).append_pair("state", "forged");
    let mut wrong = world.popgate(&["oauth", "login", "scans"]);
    wrong.line_matching(|l| l.starts_with("http://"));
    wrong.type_line(forged.as_str());
    let (ok, printed) = wrong.finish();
    assert!(!ok, "{printed}");
    assert!(world.stored().is_none());

    login.type_line(&location);
    let (ok, printed) = login.finish();
    assert!(ok, "{printed}");
    assert_eq!(world.idp.grants(), ["authorization_code"]);
    assert_login_worked(&world, &printed);
}

#[test]
fn oauth_login_with_a_loopback_listener() {
    let world = World::new();
    let mut login = world.popgate(&["oauth", "login", "scans", "--listen"]);
    let url = login.line_matching(|l| l.starts_with("http://"));
    let (status, location, _) = http_get(&url);
    assert_eq!(status, 302);
    let location = location.unwrap();
    assert!(location.starts_with("http://127.0.0.1:"), "{location}");
    // The browser follows the redirect to popgate's listener.
    let (status, _, page) = http_get(&location);
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("close this window"), "{page}");
    let (ok, printed) = login.finish();
    assert!(ok, "{printed}");
    assert_login_worked(&world, &printed);
}

#[test]
fn oauth_login_with_a_device_code() {
    let world = World::new();
    let mut login = world.popgate(&["oauth", "login", "scans", "--device"]);
    let line = login.line_matching(|l| l.contains("enter the code"));
    let user_code = line.split_whitespace().last().unwrap().to_string();
    // Polled at least once before the user finishes.
    eventually("a device poll", || world.idp.grants().iter().any(|g| g.ends_with("device_code")));
    world.idp.approve_device(&user_code);
    let (ok, printed) = login.finish();
    assert!(ok, "{printed}");
    assert_login_worked(&world, &printed);
}

/// README's systemd step, as root: `oauth login --owner popgate` leaves
/// the token store to the service user (0600), so `serve` as popgate can
/// read and rotate it; the key stays as it was.
#[test]
fn oauth_login_as_root_gives_the_token_store_to_the_owner() {
    assert_eq!(nix::unistd::geteuid().as_raw(), 0, "run as root, as scripts/test does");
    let user = nix::unistd::User::from_name("popgate")
        .unwrap()
        .expect("no popgate user: scripts/install-test-deps creates it (useradd --system popgate)");
    let world = World::new();
    let mut login = world.popgate(&["oauth", "login", "scans", "--device", "--owner", "popgate"]);
    let line = login.line_matching(|l| l.contains("enter the code"));
    let user_code = line.split_whitespace().last().unwrap().to_string();
    eventually("a device poll", || world.idp.grants().iter().any(|g| g.ends_with("device_code")));
    world.idp.approve_device(&user_code);
    let (ok, printed) = login.finish();
    assert!(ok, "{printed}");
    let meta = std::fs::metadata(world.store_path()).expect("tokens.enc written");
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), user.uid.as_raw(), "tokens.enc belongs to popgate");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert!(world.stored().is_some(), "the token is readable with the key");
}

#[test]
fn oauth_status_shows_expiry_but_no_token() {
    let world = World::new();
    let status = world.popgate(&["oauth", "status"]);
    let (ok, printed) = status.finish();
    assert!(ok, "{printed}");
    assert!(printed.contains("scans: generic (authorization code) as alice, 2 enabled device(s): NO TOKEN: run `popgate oauth login scans`"), "{printed}");

    let (access, refresh) = world.seed(unix_now() + 3000);
    let (ok, printed) = world.popgate(&["oauth", "status"]).finish();
    assert!(ok, "{printed}");
    assert!(printed.contains("valid, expires in 49 min") || printed.contains("valid, expires in 50 min"), "{printed}");
    assert!(printed.contains("refresh token held"), "{printed}");
    assert!(!printed.contains(&access) && !printed.contains(&refresh), "{printed}");
}

/// Pass-through (no accounts): the POP3 client's own token, SASL XOAUTH2
/// or OAUTHBEARER, reaches Dovecot's oauth2 passdb.
#[test]
fn a_pop3_clients_own_token_passes_through_to_dovecot() {
    let idp = OAuthServer::start(ALICE.0);
    let dovecot = Dovecot::start_oauth(&idp.url("/introspect"), &[ALICE], ALL_MECHANISMS);
    dovecot.append(ALICE.0, &simple("mine"));
    let mut backend = BackendConfig::from_url(&format!("imap://127.0.0.1:{}", dovecot.imap_port)).unwrap();
    if let BackendConfig::Imap(imap) = &mut backend {
        imap.oauth_passthrough = true;
    }
    let gateway = Gateway::from_config(Config { backend, ..Config::default() });
    let (token, _) = idp.issue(ALICE.0);

    let mut pop = gateway.connect();
    let capa = {
        pop.send("CAPA");
        assert!(pop.line().starts_with("+OK"));
        pop.body_text()
    };
    assert!(
        capa.iter().any(|l| l.starts_with("SASL") && l.contains("XOAUTH2") && l.contains("OAUTHBEARER")),
        "{capa:?}"
    );
    let xoauth2 = STANDARD.encode(format!("user={}\x01auth=Bearer {token}\x01\x01", ALICE.0));
    pop.ok(&format!("AUTH XOAUTH2 {xoauth2}"));
    assert!(pop.ok("STAT").starts_with("+OK 1 "));
    pop.ok("QUIT");

    let mut pop = gateway.connect();
    let bearer = STANDARD.encode(format!("n,a={},\x01auth=Bearer {token}\x01\x01", ALICE.0));
    pop.ok(&format!("AUTH OAUTHBEARER {bearer}"));
    pop.ok("QUIT");

    // A dead token: the RFC 7628 error challenge, a dummy answer, -ERR.
    // (Another token than above: the warm IMAP session of that one would
    // serve it without a new backend login.)
    let (dead, _) = idp.issue(ALICE.0);
    idp.expire_all_access_tokens();
    let dead = STANDARD.encode(format!("user={}\x01auth=Bearer {dead}\x01\x01", ALICE.0));
    let mut pop = gateway.connect();
    let reply = pop.cmd(&format!("AUTH XOAUTH2 {dead}"));
    assert!(reply.starts_with("+ "), "{reply}");
    let reply = pop.cmd("");
    assert!(reply.starts_with("-ERR [AUTH]"), "{reply}");
    assert!(dovecot.logins(ALICE.0, "XOAUTH2") >= 1 && dovecot.logins(ALICE.0, "OAUTHBEARER") == 0);
}

#[test]
fn keygen_writes_a_private_key_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token.key");
    let run = || {
        let me = nix::unistd::User::from_uid(nix::unistd::geteuid()).unwrap().expect("the current user").name;
        let mut child = Command::new(env!("CARGO_BIN_EXE_popgate"))
            .args(["oauth", "keygen"])
            .arg(&path)
            .args(["--owner", &me])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run popgate oauth keygen");
        let deadline = Instant::now() + IO_TIMEOUT;
        while child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "popgate oauth keygen did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().unwrap()
    };
    let output = run();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.stdout.is_empty(), "the key is not printed");
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    StoreKey::read(&SecretSource::File(path.clone())).expect("a usable key");
    let key = std::fs::read(&path).unwrap();
    assert!(!run().status.success(), "an existing key is never overwritten");
    assert_eq!(std::fs::read(&path).unwrap(), key);
}
