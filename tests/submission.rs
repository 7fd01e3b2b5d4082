//! Scan to email end to end: real SMTP clients (Python smtplib, curl,
//! swaks, msmtp) send through popgate's submission listener as a device
//! user; popgate relays synchronously, with the password it holds for the
//! account, to a real Postfix that authenticates it through Dovecot's auth
//! and delivers into that Dovecot — and the same device fetches each message
//! back through popgate's POP3 listener, byte-identical apart from the trace
//! headers the upstream added. Faults: a spoofed From is refused with 550
//! and nothing is delivered; the upstream down gives 4xx (the client keeps
//! the message) and the same message goes through once it is back; an
//! OAuth account's revoked token is refreshed once and the scan goes
//! through (XOAUTH2 at Postfix, checked by Dovecot's oauth2 passdb).

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use popgate::auth::passwords::SecretSource;
use popgate::auth::passwords::hash_password;
use popgate::auth::tokens::{EncryptedFileStore, StoreKey, StoredToken, TokenStore, unix_now};
use popgate::mail::Secret;
use support::dovecot::{ALICE, BOB, Dovecot};
use support::gateway::GatewayProcess;
use support::oauth_server::{CLIENT_SECRET, OAuthServer};
use support::pop3::Pop3;
use support::postfix::{DOMAIN, Postfix};
use support::program::{describe, run, run_with};

const SCANNER: (&str, &str) = ("scanner", "scan-pw");

struct World {
    dovecot: Dovecot,
    postfix: Postfix,
    gateway: GatewayProcess,
    dir: tempfile::TempDir,
    /// The authorization server of an OAuth account.
    idp: Option<OAuthServer>,
}

impl World {
    /// The account holds an OAuth token (seeded valid by its time) instead
    /// of a password; Dovecot's oauth2 passdb checks it at the stand-in
    /// authorization server, for Postfix's AUTH XOAUTH2 as for IMAP.
    fn oauth() -> World {
        let idp = OAuthServer::start(ALICE.0);
        let dovecot = Dovecot::start_oauth(&idp.url("/introspect"), &[ALICE], "plain login xoauth2 oauthbearer");
        let postfix = Postfix::start(&dovecot, &["alice"]);
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("token.key");
        std::fs::write(&key, format!("{}\n", StoreKey::generate_text())).unwrap();
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let secret = dir.path().join("client-secret");
        std::fs::write(&secret, format!("{CLIENT_SECRET}\n")).unwrap();
        let store_path = dir.path().join("tokens.enc");
        let (access, refresh) = idp.issue(ALICE.0);
        let token = StoredToken {
            access_token: Secret::new(&access),
            refresh_token: Some(Secret::new(&refresh)),
            expires_at: Some(unix_now() + 3600),
            obtained_at: unix_now().saturating_sub(3600),
            scope: None,
        };
        let store_key = StoreKey::read(&SecretSource::File(key.clone())).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(EncryptedFileStore::new(store_path.clone(), store_key).save("office", &token)).unwrap();
        let hash = hash_password(SCANNER.1).unwrap();
        let (imap, relay, idp_url) = (dovecot.imap_port, postfix.relay_url(), format!("http://{}", idp.addr));
        let gateway = GatewayProcess::start_with_config(2, &[("RUST_LOG", "popgate=debug")], |addrs| {
            format!(
                r#"
[[listener]]
address = "{pop3}"

[[listener]]
address = "{smtp}"
protocol = "submission"

[backend]
kind = "imap"
host = "127.0.0.1"
port = {imap}
tls = "none"

[token_store]
path = "{store}"
key_file = "{key}"

[[account]]
name = "office"
mode = "mapped"
login = "alice"

[account.oauth]
provider = "generic"
client_id = "popgate-test-client"
client_secret_file = "{secret}"
authorization_url = "{idp_url}/authorize"
token_url = "{idp_url}/token"
scopes = ["mail"]
redirect_uri = "http://127.0.0.1/callback"
retry_after_failure_secs = 1

[account.submission]
relay = "{relay}"
address = "alice@{DOMAIN}"

[[account.device]]
user = "{scanner}"
password_hash = "{hash}"
"#,
                pop3 = addrs[0],
                smtp = addrs[1],
                store = store_path.display(),
                key = key.display(),
                secret = secret.display(),
                scanner = SCANNER.0,
            )
        });
        World { dovecot, postfix, gateway, dir, idp: Some(idp) }
    }

    fn new() -> World {
        let dovecot = Dovecot::start_with_users(&[ALICE, BOB]);
        let postfix = Postfix::start(&dovecot, &["alice", "bob"]);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("office-password"), format!("{}\n", ALICE.1)).unwrap();
        let hash = hash_password(SCANNER.1).unwrap();
        let imap = dovecot.imap_port;
        let relay = postfix.relay_url();
        let password_file = dir.path().join("office-password");
        let gateway = GatewayProcess::start_with_config(2, &[("RUST_LOG", "popgate=debug")], |addrs| {
            format!(
                r#"
[[listener]]
address = "{pop3}"

[[listener]]
address = "{smtp}"
protocol = "submission"

[backend]
kind = "imap"
host = "127.0.0.1"
port = {imap}
tls = "none"

[[account]]
name = "office"
mode = "mapped"
login = "alice"
password_file = "{password_file}"

[account.submission]
relay = "{relay}"
address = "alice@{DOMAIN}"
aliases = ["office@{DOMAIN}"]
max_messages_per_hour = 20

[[account.device]]
user = "{scanner}"
password_hash = "{hash}"
"#,
                pop3 = addrs[0],
                smtp = addrs[1],
                password_file = password_file.display(),
                scanner = SCANNER.0,
            )
        });
        World { dovecot, postfix, gateway, dir, idp: None }
    }

    fn smtp_addr(&self) -> SocketAddr {
        self.gateway.addrs[1]
    }

    /// Every message in alice's mailbox, fetched through popgate's POP3 by
    /// the scanner's device user.
    fn fetch_all(&self) -> Vec<Vec<u8>> {
        let mut pop = Pop3::login(self.gateway.addr, SCANNER.0, SCANNER.1);
        let list = pop.list();
        let messages = list.iter().map(|(n, _)| pop.retr(*n)).collect();
        pop.send("QUIT");
        pop.line();
        messages
    }

    /// Waits until Postfix delivered `count` messages into alice's mailbox.
    fn wait_delivered(&self, count: usize) -> Vec<Vec<u8>> {
        support::wait_for("delivery into Dovecot", Duration::from_secs(30), || {
            let all = self.fetch_all();
            (all.len() >= count).then_some(all)
        })
    }
}

/// A scan as a scanner sends it: CRLF lines, a line starting with a dot, an
/// 8-bit body, a long base64 attachment line.
fn scan(tag: &str, from: &str) -> Vec<u8> {
    format!(
        "From: \"Scanner 3F\" <{from}>\r\n\
         To: alice@{DOMAIN}\r\n\
         Subject: scan {tag}\r\n\
         Date: Thu, 03 Dec 2026 10:00:00 +0000\r\n\
         Message-ID: <{tag}@scanner.popgate.test>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         Content-Transfer-Encoding: 8bit\r\n\
         \r\n\
         page 1 of {tag} — numérisé\r\n\
         .a line that starts with a dot\r\n\
         ..and two\r\n\
         {}\r\n",
        "QUJD".repeat(19)
    )
    .into_bytes()
}

/// The message without the trace headers the upstream put in front
/// (Return-Path, X-Original-To, Delivered-To, Received).
fn without_trace(message: &[u8]) -> Vec<u8> {
    let mut rest = message;
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n").map(|i| i + 2).unwrap_or(rest.len());
        let line = &rest[..line_end];
        let lower = String::from_utf8_lossy(line).to_ascii_lowercase();
        if ["return-path:", "x-original-to:", "delivered-to:", "received:"].iter().any(|h| lower.starts_with(h)) {
            rest = &rest[line_end..];
            // Folded continuation lines of the trace header.
            while rest.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
                let end = rest.windows(2).position(|w| w == b"\r\n").map(|i| i + 2).unwrap_or(rest.len());
                rest = &rest[end..];
            }
        } else {
            return rest.to_vec();
        }
    }
}

fn find<'a>(messages: &'a [Vec<u8>], tag: &str) -> Option<&'a Vec<u8>> {
    let needle = format!("Message-ID: <{tag}@");
    messages.iter().find(|m| String::from_utf8_lossy(m).contains(&needle))
}

const SMTPLIB: &str = r#"
import smtplib, sys
host, port, user, password, sender, rcpt, path = sys.argv[1:8]
msg = open(path, 'rb').read()
s = smtplib.SMTP(host, int(port), timeout=60)
s.ehlo('scanner.local')
s.login(user, password)
try:
    s.sendmail(sender, [rcpt], msg)
    print('SENT')
except smtplib.SMTPResponseException as e:
    print('REFUSED', e.smtp_code, e.smtp_error.decode())
except smtplib.SMTPRecipientsRefused as e:
    print('REFUSED', e.recipients)
s.quit()
"#;

fn smtplib(world: &World, sender: &str, path: &Path) -> String {
    let addr = world.smtp_addr();
    let out = run(
        "python3",
        &[
            "-c",
            SMTPLIB,
            &addr.ip().to_string(),
            &addr.port().to_string(),
            SCANNER.0,
            SCANNER.1,
            sender,
            &format!("alice@{DOMAIN}"),
            path.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "smtplib: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn write_scan(world: &World, tag: &str, from: &str) -> (std::path::PathBuf, Vec<u8>) {
    let bytes = scan(tag, from);
    let path = world.dir.path().join(format!("{tag}.eml"));
    std::fs::write(&path, &bytes).unwrap();
    (path, bytes)
}

#[test]
fn real_clients_send_and_the_device_fetches_each_scan_back_unchanged() {
    let world = World::new();
    let from = format!("alice@{DOMAIN}");
    let addr = world.smtp_addr();
    let mut sent = Vec::new();

    let (path, bytes) = write_scan(&world, "smtplib", &from);
    assert_eq!(smtplib(&world, &from, &path), "SENT");
    sent.push(("smtplib", bytes));

    let (path, bytes) = write_scan(&world, "curl", &format!("office@{DOMAIN}"));
    let out = run(
        "curl",
        &[
            "-sS",
            "--max-time",
            "60",
            &format!("smtp://{addr}"),
            "--user",
            &format!("{}:{}", SCANNER.0, SCANNER.1),
            "--mail-from",
            &format!("office@{DOMAIN}"),
            "--mail-rcpt",
            &format!("alice@{DOMAIN}"),
            "--upload-file",
            path.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "curl: {}", describe(&out));
    sent.push(("curl", bytes));

    let (path, bytes) = write_scan(&world, "swaks", &from);
    let out = run(
        "swaks",
        &[
            "--server",
            &addr.ip().to_string(),
            "--port",
            &addr.port().to_string(),
            "--auth",
            "LOGIN",
            "--auth-user",
            SCANNER.0,
            "--auth-password",
            SCANNER.1,
            "--from",
            &from,
            "--to",
            &format!("alice@{DOMAIN}"),
            "--data",
            path.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "swaks: {}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("250 2.0.0 Ok"), "swaks: {}", describe(&out));
    // swaks ends its DATA with `data . "\r\n."`: after a file that ends
    // with a line end, the message it sends has one empty line more.
    let mut swaks_sent = bytes;
    swaks_sent.extend_from_slice(b"\r\n");
    sent.push(("swaks", swaks_sent));

    let (_path, bytes) = write_scan(&world, "msmtp", &from);
    let conf = world.dir.path().join("msmtprc");
    std::fs::write(
        &conf,
        format!(
            "account scanner\nhost {}\nport {}\nauth plain\nuser {}\npassword {}\ntls off\nfrom {from}\n\
             account default : scanner\n",
            addr.ip(),
            addr.port(),
            SCANNER.0,
            SCANNER.1
        ),
    )
    .unwrap();
    std::fs::set_permissions(&conf, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let out = run_with("msmtp", &["-C", conf.to_str().unwrap(), &format!("alice@{DOMAIN}")], &[], Some(&bytes));
    assert!(out.status.success(), "msmtp: {}", describe(&out));
    sent.push(("msmtp", bytes));

    let fetched = world.wait_delivered(sent.len());
    for (tag, bytes) in &sent {
        let message =
            find(&fetched, tag).unwrap_or_else(|| panic!("{tag}'s scan not delivered:\n{}", world.postfix.log()));
        assert_eq!(
            String::from_utf8_lossy(&without_trace(message)),
            String::from_utf8_lossy(bytes),
            "{tag}: the message fetched over POP3 differs from the one sent"
        );
    }
    let log = world.gateway.log();
    assert!(!log.contains(SCANNER.1) && !log.contains(ALICE.1), "a password in popgate's log");
    // Postfix saw popgate authenticate as the account, not as the device.
    assert!(world.postfix.log().contains("sasl_username=alice"), "{}", world.postfix.log());
}

#[test]
fn a_spoofed_from_is_refused_and_nothing_is_delivered() {
    let world = World::new();
    let (path, _) = write_scan(&world, "spoofed", &format!("ceo@{DOMAIN}"));
    let reply = smtplib(&world, &format!("alice@{DOMAIN}"), &path);
    assert!(
        reply.starts_with("REFUSED 550 5.7.1 From: ceo@popgate.test refused: send as alice@popgate.test"),
        "{reply}"
    );
    // Nor a spoofed envelope sender.
    let (path, _) = write_scan(&world, "spoofed-envelope", &format!("alice@{DOMAIN}"));
    let reply = smtplib(&world, &format!("bob@{DOMAIN}"), &path);
    assert!(reply.starts_with("REFUSED 550 5.7.1 sender bob@popgate.test refused"), "{reply}");
    // A good one afterwards is the only one delivered.
    let (path, bytes) = write_scan(&world, "good", &format!("alice@{DOMAIN}"));
    assert_eq!(smtplib(&world, &format!("alice@{DOMAIN}"), &path), "SENT");
    let fetched = world.wait_delivered(1);
    assert_eq!(fetched.len(), 1);
    assert_eq!(String::from_utf8_lossy(&without_trace(&fetched[0])), String::from_utf8_lossy(&bytes));
    assert!(!world.postfix.log().contains("ceo@popgate.test"), "the spoofed message reached the upstream");
    // Each refusal counted for the device, by the rule that refused it.
    let (status, _, metrics) = support::oauth_server::http_get(&format!("http://{}/metrics", world.gateway.admin_addr));
    assert_eq!(status, 200);
    for (result, count) in [("from_header", 1), ("sender", 1), ("sent", 1)] {
        let line = format!(
            "popgate_submission_messages_total{{account=\"office\",device=\"{}\",result=\"{result}\"}} {count}",
            SCANNER.0
        );
        assert!(metrics.contains(&line), "{line} not in:\n{metrics}");
    }
    // The admin page (loopback, no admin password configured) shows the
    // scanner's last send: the good one, relayed.
    let (status, _, page) = support::oauth_server::http_get(&format!("http://{}/devices", world.gateway.admin_addr));
    assert_eq!(status, 200, "{page}");
    let row =
        page.split("<tr").find(|row| row.contains(&format!(">{}<", SCANNER.0))).unwrap_or_else(|| panic!("{page}"));
    let cell = row.split("last-send").nth(1).unwrap_or_else(|| panic!("{row}"));
    let cell = &cell[..cell.find("</td>").unwrap()];
    assert!(cell.contains("relayed"), "{cell}");
    assert!(!page.contains(ALICE.1) && !page.contains(SCANNER.1), "a password on the page");
}

#[test]
fn upstream_down_is_a_temporary_failure_and_nothing_is_lost() {
    let mut world = World::new();
    let from = format!("alice@{DOMAIN}");
    let (path, bytes) = write_scan(&world, "retry", &from);
    world.postfix.stop();
    let reply = smtplib(&world, &from, &path);
    assert!(reply.starts_with("REFUSED 451 4.4.1 upstream unavailable"), "{reply}");
    assert!(world.fetch_all().is_empty());
    // The client kept it (a 4xx) and sends it again once the upstream is back.
    world.postfix.restart();
    assert_eq!(smtplib(&world, &from, &path), "SENT");
    let fetched = world.wait_delivered(1);
    assert_eq!(fetched.len(), 1);
    assert_eq!(String::from_utf8_lossy(&without_trace(&fetched[0])), String::from_utf8_lossy(&bytes));
    let _ = &world.dovecot;
}

#[test]
fn an_expired_token_is_refreshed_once_and_the_scan_goes_through() {
    let world = World::oauth();
    let idp = world.idp.as_ref().unwrap();
    // The provider revokes the access token popgate holds (valid by its
    // time): Postfix's AUTH XOAUTH2, checked by Dovecot at the stand-in,
    // refuses it; popgate refreshes once and sends again.
    idp.expire_all_access_tokens();
    let from = format!("alice@{DOMAIN}");
    let (path, bytes) = write_scan(&world, "oauth", &from);
    assert_eq!(smtplib(&world, &from, &path), "SENT", "{}", world.gateway.log());
    assert_eq!(idp.refreshes(), 1);
    let fetched = world.wait_delivered(1);
    assert_eq!(String::from_utf8_lossy(&without_trace(&fetched[0])), String::from_utf8_lossy(&bytes));
    assert!(world.postfix.log().contains("sasl_method=XOAUTH2"), "{}", world.postfix.log());
    assert!(world.gateway.log().contains("refreshed, retrying once"));
}

/// A pass-through user: popgate holds no credentials; the user's own
/// password is checked by the upstream at login (a wrong one is refused
/// with 535 and nothing is sent) and used for the relay; the scan comes
/// back through POP3 as the same user, unchanged.
#[test]
fn a_pass_through_user_sends_with_their_own_password() {
    let dovecot = Dovecot::start_with_users(&[ALICE, BOB]);
    let postfix = Postfix::start(&dovecot, &["alice", "bob"]);
    let dir = tempfile::tempdir().unwrap();
    let imap = dovecot.imap_port;
    let relay = postfix.relay_url();
    let gateway = GatewayProcess::start_with_config(2, &[("RUST_LOG", "popgate=debug")], |addrs| {
        format!(
            r#"
[[listener]]
address = "{pop3}"

[[listener]]
address = "{smtp}"
protocol = "submission"

[backend]
kind = "imap"
host = "127.0.0.1"
port = {imap}
tls = "none"

[[account]]
name = "staff"
mode = "passthrough"
users = ["alice"]

[account.submission]
relay = "{relay}"
address = "alice@{DOMAIN}"
"#,
            pop3 = addrs[0],
            smtp = addrs[1],
        )
    });
    let from = format!("alice@{DOMAIN}");
    let bytes = scan("passthrough", &from);
    let path = dir.path().join("passthrough.eml");
    std::fs::write(&path, &bytes).unwrap();
    let addr = gateway.addrs[1];
    let smtplib_as = |user: &str, password: &str| {
        let out = run(
            "python3",
            &[
                "-c",
                SMTPLIB,
                &addr.ip().to_string(),
                &addr.port().to_string(),
                user,
                password,
                &from,
                &from,
                path.to_str().unwrap(),
            ],
        );
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string() + &describe(&out))
    };
    // A wrong password: smtplib raises at login (535).
    let (ok, out) = smtplib_as(ALICE.0, "not-her-password");
    assert!(!ok && out.contains("535"), "{out}");
    let (ok, out) = smtplib_as(ALICE.0, ALICE.1);
    assert!(ok && out.starts_with("SENT"), "{out}\n{}", gateway.log());
    let fetched = support::wait_for("delivery into Dovecot", Duration::from_secs(30), || {
        let mut pop = Pop3::login(gateway.addr, ALICE.0, ALICE.1);
        let list = pop.list();
        let messages: Vec<Vec<u8>> = list.iter().map(|(n, _)| pop.retr(*n)).collect();
        pop.send("QUIT");
        pop.line();
        (!messages.is_empty()).then_some(messages)
    });
    assert_eq!(fetched.len(), 1);
    assert_eq!(String::from_utf8_lossy(&without_trace(&fetched[0])), String::from_utf8_lossy(&bytes));
}
