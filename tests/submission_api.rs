//! Scan to email for accounts whose backend is a mail API: a real SMTP
//! client (Python smtplib) sends through popgate's submission listener as a
//! device user, and popgate sends the message with the account's API token
//! through Microsoft Graph `sendMail` (MIME, base64, `text/plain`) or the
//! Gmail API `users.messages.send` (`raw`, base64url) — here the stand-ins,
//! which record what they were sent. DATA is answered 250 only once the API
//! accepted the message; an API refusal becomes the matching 4xx/5xx and
//! nothing is recorded as sent.

mod support;

use std::net::SocketAddr;
use std::path::Path;

use popgate::auth::passwords::{SecretSource, hash_password};
use popgate::auth::tokens::{EncryptedFileStore, StoreKey, StoredToken, TokenStore, unix_now};
use popgate::mail::Secret;
use support::gateway::GatewayProcess;
use support::gmail_api::{GmailApi, Refusal, Scope};
use support::graph_api::{GraphApi, TokenKind, UPN};
use support::program::{describe, run};

const SCANNER: (&str, &str) = ("scanner", "scan-pw");
const GMAIL_ADDRESS: &str = "alice@example.com";

/// A POP3 listener and a submission listener, on the two run-time addresses.
fn pop3_and_submission(addrs: &[SocketAddr]) -> String {
    format!(
        "[[listener]]\naddress = \"{}\"\n\n[[listener]]\naddress = \"{}\"\nprotocol = \"submission\"\n",
        addrs[0], addrs[1]
    )
}

/// A gateway with a submission listener for one mapped account on
/// `backend` (a TOML `[backend]` table), holding `token` in its store.
fn gateway(dir: &Path, backend: &str, login: &str, token: &str) -> GatewayProcess {
    gateway_with(dir, backend, login, token, 2, pop3_and_submission, "", None)
}

/// `gateway` with `listeners` (TOML for `count` run-time addresses; more
/// tables may follow them, e.g. `[tls]`) and extra `[account.submission]`
/// keys. With `token_url`, the stored token has a refresh token, refreshed
/// there; without, nothing can refresh it.
#[allow(clippy::too_many_arguments)]
fn gateway_with(
    dir: &Path,
    backend: &str,
    login: &str,
    token: &str,
    count: usize,
    listeners: impl Fn(&[SocketAddr]) -> String,
    submission: &str,
    token_url: Option<&str>,
) -> GatewayProcess {
    let key = dir.join("token.key");
    std::fs::write(&key, format!("{}\n", StoreKey::generate_text())).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let store_path = dir.join("tokens.enc");
    let stored = StoredToken {
        access_token: Secret::new(token),
        refresh_token: token_url.map(|_| Secret::new("stand-in-refresh-token")),
        expires_at: Some(unix_now() + 3600),
        // Obtained a while ago: a token refused moments after it was issued
        // is not refreshed again at once (src/auth/tokens/source.rs).
        obtained_at: unix_now() - if token_url.is_some() { 3000 } else { 0 },
        scope: None,
    };
    let store_key = StoreKey::read(&SecretSource::File(key.clone())).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(EncryptedFileStore::new(store_path.clone(), store_key).save("office", &stored)).unwrap();
    let hash = hash_password(SCANNER.1).unwrap();
    GatewayProcess::start_with_config(count, &[("RUST_LOG", "popgate=debug")], |addrs| {
        format!(
            r#"
{listeners}

{backend}

[token_store]
path = "{store}"
key_file = "{key}"

[[account]]
name = "office"
mode = "mapped"
login = "{login}"

[account.oauth]
provider = "generic"
client_id = "popgate-test-client"
authorization_url = "http://127.0.0.1:9/authorize"
token_url = "{token_url}"
scopes = ["mail"]
redirect_uri = "http://127.0.0.1/callback"

[account.submission]
{submission}

[[account.device]]
user = "{scanner}"
password_hash = "{hash}"
"#,
            listeners = listeners(addrs),
            store = store_path.display(),
            key = key.display(),
            scanner = SCANNER.0,
            token_url = token_url.unwrap_or("http://127.0.0.1:9/token"),
        )
    })
}

/// A scan as a scanner sends it: CRLF lines, a dot-led line, 8-bit text
/// and a long base64 line.
fn scan(tag: &str, from: &str) -> Vec<u8> {
    format!(
        "From: \"Scanner 3F\" <{from}>\r\n\
         To: {from}\r\n\
         Subject: scan {tag}\r\n\
         Message-ID: <{tag}@scanner.popgate.test>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         Content-Transfer-Encoding: 8bit\r\n\
         \r\n\
         page 1 of {tag} — numérisé\r\n\
         .a line that starts with a dot\r\n\
         {}\r\n",
        "QUJD".repeat(300)
    )
    .into_bytes()
}

const SMTPLIB: &str = r#"
import smtplib, sys
host, port, user, password, sender, path, source = sys.argv[1:8]
msg = open(path, 'rb').read()
s = smtplib.SMTP(host, int(port), timeout=60, source_address=(source, 0))
s.ehlo('scanner.local')
try:
    s.login(user, password)
except smtplib.SMTPException as e:
    print('LOGIN REFUSED', e)
    sys.exit(0)
try:
    s.sendmail(sender, [sender], msg)
    print('SENT')
except smtplib.SMTPResponseException as e:
    print('REFUSED', e.smtp_code, e.smtp_error.decode())
s.quit()
"#;

/// Sends `message` as `sender` with smtplib; "SENT" or "REFUSED code text".
fn send(gateway: &GatewayProcess, dir: &Path, sender: &str, message: &[u8]) -> String {
    send_from(gateway.addrs[1], "127.0.0.1", dir, sender, message)
}

/// `send` to `addr` from the local address `source`.
fn send_from(addr: SocketAddr, source: &str, dir: &Path, sender: &str, message: &[u8]) -> String {
    let path = dir.join("scan.eml");
    std::fs::write(&path, message).unwrap();
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
            path.to_str().unwrap(),
            source,
        ],
    );
    assert!(out.status.success(), "smtplib: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn graph_send_mail_receives_the_scan_byte_identical_and_its_refusals_map_to_smtp_replies() {
    let api = GraphApi::start();
    let token = api.issue_token(TokenKind::Delegated);
    let dir = tempfile::tempdir().unwrap();
    let backend = format!("[backend]\nkind = \"graph\"\napi_base = \"{}\"", api.base_url);
    let gateway = gateway(dir.path(), &backend, UPN, &token);

    let message = scan("graph-1", UPN);
    assert_eq!(send(&gateway, dir.path(), UPN, &message), "SENT", "{}", gateway.log());
    let sent = api.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(String::from_utf8_lossy(&sent[0]), String::from_utf8_lossy(&message));
    assert_eq!(sent[0], message);
    assert!(api.seen().iter().any(|r| r.method == "POST" && r.path == "/v1.0/me/sendMail" && r.status == 202));

    // Refusals: each reply, and nothing more sent.
    for (status, code, reply) in [
        (429, "ApplicationThrottled", "REFUSED 451 4.7.0"),
        (503, "ServiceUnavailable", "REFUSED 451 4.3.0"),
        (403, "ErrorSendAsDenied", "REFUSED 550 5.7.1"),
        (400, "ErrorMimeContentInvalid", "REFUSED 554 5.6.0"),
        (413, "ErrorMessageSizeExceeded", "REFUSED 552 5.3.4"),
    ] {
        api.refuse_next_send(status, code);
        let answer = send(&gateway, dir.path(), UPN, &scan(&format!("graph-{status}"), UPN));
        assert!(answer.starts_with(reply), "{status} {code}: {answer}");
        if status != 429 && status != 503 {
            assert!(answer.contains(code), "{answer}");
        }
    }
    assert_eq!(api.sent().len(), 1, "a refused send was recorded");

    // A 401 with no way to refresh: temporary, the scanner keeps it.
    support::bearer::BearerApi::expire(&api, &token);
    let answer = send(&gateway, dir.path(), UPN, &scan("graph-401", UPN));
    assert!(answer.starts_with("REFUSED 451 4.7.0"), "{answer}");
    assert_eq!(api.sent().len(), 1);
    assert!(!gateway.log().contains(&token), "the token was logged");

    // Per-device metrics: sent and refused by reason, the last error's time.
    let (status, _, metrics) = support::oauth_server::http_get(&format!("http://{}/metrics", gateway.admin_addr));
    assert_eq!(status, 200);
    for (result, count) in [("sent", 1), ("upstream_temporary", 2), ("upstream_permanent", 3), ("credentials", 1)] {
        let line = format!(
            "popgate_submission_messages_total{{account=\"office\",device=\"scanner\",result=\"{result}\"}} {count}"
        );
        assert!(metrics.contains(&line), "{line} not in:\n{metrics}");
    }
    assert!(
        metrics.contains(
            "popgate_submission_last_error_timestamp_seconds{account=\"office\",device=\"scanner\",result=\"credentials\"}"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("popgate_submission_last_sent_timestamp_seconds{account=\"office\",device=\"scanner\"}"),
        "{metrics}"
    );
    assert!(!metrics.contains(&token), "the token is in the metrics");
}

#[test]
fn gmail_messages_send_receives_the_scan_byte_identical_and_its_refusals_map_to_smtp_replies() {
    let api = GmailApi::start();
    let token = api.issue_token(Scope::Modify);
    let dir = tempfile::tempdir().unwrap();
    let backend = format!("[backend]\nkind = \"gmail\"\napi_base = \"{}\"", api.base_url);
    let gateway = gateway(dir.path(), &backend, GMAIL_ADDRESS, &token);

    let message = scan("gmail-1", GMAIL_ADDRESS);
    assert_eq!(send(&gateway, dir.path(), GMAIL_ADDRESS, &message), "SENT", "{}", gateway.log());
    let sent = api.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0], message);
    assert!(
        api.seen()
            .iter()
            .any(|r| r.method == "POST" && r.path == "/gmail/v1/users/me/messages/send" && r.status == 200)
    );

    for (status, reason, reply) in [
        (429, "rateLimitExceeded", "REFUSED 451 4.7.0"),
        (500, "backendError", "REFUSED 451 4.3.0"),
        (403, "domainPolicy", "REFUSED 550 5.7.1"),
        (400, "invalidArgument", "REFUSED 554 5.6.0"),
    ] {
        api.refuse(Refusal {
            path_contains: "messages/send".into(),
            status,
            reason: reason.into(),
            message: "refused by the test".into(),
        });
        let answer = send(&gateway, dir.path(), GMAIL_ADDRESS, &scan(&format!("gmail-{status}"), GMAIL_ADDRESS));
        assert!(answer.starts_with(reply), "{status} {reason}: {answer}");
        assert!(answer.contains(reason), "{answer}");
    }
    // The API sends by the headers: a Bcc the envelope does not name (an
    // outside address past any recipient rule) is refused, nothing sent.
    let mut sneaky = scan("gmail-bcc", GMAIL_ADDRESS);
    sneaky.splice(0..0, b"Bcc: someone@elsewhere.test\r\n".iter().copied());
    let answer = send(&gateway, dir.path(), GMAIL_ADDRESS, &sneaky);
    assert!(answer.starts_with("REFUSED 554 5.6.0"), "{answer}");
    assert_eq!(api.sent().len(), 1, "a refused send was recorded");
    assert!(!gateway.log().contains(&token), "the token was logged");
}

/// The per-device hourly allowances: the message over the limit is refused
/// with 450 4.7.1 and never reaches the API; so is one whose recipients
/// would go over the recipient allowance.
#[test]
fn the_hourly_limits_per_device_refuse_with_4xx_and_send_nothing() {
    let api = GraphApi::start();
    let token = api.issue_token(TokenKind::Delegated);
    let dir = tempfile::tempdir().unwrap();
    let backend = format!("[backend]\nkind = \"graph\"\napi_base = \"{}\"", api.base_url);
    let gateway = gateway_with(
        dir.path(),
        &backend,
        UPN,
        &token,
        2,
        pop3_and_submission,
        "max_messages_per_hour = 2\nmax_recipients_per_hour = 5",
        None,
    );
    for n in 0..2 {
        assert_eq!(send(&gateway, dir.path(), UPN, &scan(&format!("limit-{n}"), UPN)), "SENT", "{}", gateway.log());
    }
    let answer = send(&gateway, dir.path(), UPN, &scan("limit-3", UPN));
    assert!(answer.starts_with("REFUSED 450 4.7.1 hourly sending limit"), "{answer}");
    assert_eq!(api.sent().len(), 2);
}

/// TLS on the submission port: STARTTLS (curl `smtp://` with
/// `--ssl-reqd`, swaks `--tls`) and implicit TLS (curl `smtps://`, swaks
/// `--tlsc`), certificates checked against the test CA; AUTH without TLS
/// refused on a network listener, and allowed from `cleartext_networks`
/// only.
#[test]
fn tls_and_cleartext_rules_on_the_submission_port() {
    let api = GraphApi::start();
    let token = api.issue_token(TokenKind::Delegated);
    let dir = tempfile::tempdir().unwrap();
    let ca = support::tls::TestCa::new();
    let cert = ca.issue("smtp", "smtp.popgate.test", &["localhost", "127.0.0.1"]);
    let backend = format!("[backend]\nkind = \"graph\"\napi_base = \"{}\"", api.base_url);
    let listeners = |addrs: &[SocketAddr]| {
        format!(
            "[[listener]]\naddress = \"{}\"\n\n\
             [[listener]]\naddress = \"{}\"\nprotocol = \"submission\"\ntls = \"starttls\"\nloopback_is_secure = false\n\n\
             [[listener]]\naddress = \"{}\"\nprotocol = \"submission\"\ntls = \"implicit\"\nloopback_is_secure = false\n\n\
             [[listener]]\naddress = \"{}\"\nprotocol = \"submission\"\nloopback_is_secure = false\n\
             allow_cleartext_login = true\ncleartext_networks = [\"127.0.0.2/32\"]\n\n\
             [tls]\n[[tls.certificates]]\ncert = \"{}\"\nkey = \"{}\"\n",
            addrs[0],
            addrs[1],
            addrs[2],
            addrs[3],
            cert.cert.display(),
            cert.key.display()
        )
    };
    let gateway = gateway_with(dir.path(), &backend, UPN, &token, 4, listeners, "", None);
    let (starttls, implicit, cleartext) = (gateway.addrs[1], gateway.addrs[2], gateway.addrs[3]);
    let message = scan("tls", UPN);
    let path = dir.path().join("tls.eml");
    std::fs::write(&path, &message).unwrap();
    let ca_file = ca.ca_file.to_str().unwrap().to_string();
    let curl = |url: String, extra: &[&str]| {
        let mut args = vec![
            "--silent",
            "--show-error",
            "--max-time",
            "60",
            "--cacert",
            &ca_file,
            "--user",
            "scanner:scan-pw",
            "--mail-from",
            UPN,
            "--mail-rcpt",
            UPN,
            "--upload-file",
            path.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        args.push(&url);
        let out = run("curl", &args);
        assert!(out.status.success(), "curl {url}: {}\n{}", describe(&out), gateway.log());
    };
    curl(format!("smtp://127.0.0.1:{}", starttls.port()), &["--ssl-reqd"]);
    curl(format!("smtps://127.0.0.1:{}", implicit.port()), &[]);
    let sent = api.sent();
    assert_eq!(sent.len(), 2);
    assert!(sent.iter().all(|m| *m == message), "a TLS send changed the message");

    let data = format!("@{}", path.display());
    let swaks = |port: u16, tls: &str| {
        let out = run(
            "swaks",
            &[
                "--server",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                tls,
                "--tls-verify",
                "--tls-ca-path",
                &ca_file,
                "--auth",
                "PLAIN",
                "--auth-user",
                SCANNER.0,
                "--auth-password",
                SCANNER.1,
                "--from",
                UPN,
                "--to",
                UPN,
                "--data",
                &data,
                "--timeout",
                "60",
            ],
        );
        assert!(out.status.success(), "swaks {tls}: {}\n{}", describe(&out), gateway.log());
    };
    swaks(starttls.port(), "--tls");
    swaks(implicit.port(), "--tlsc");
    assert_eq!(api.sent().len(), 4);

    // No AUTH in the clear on the STARTTLS listener (loopback counts as a
    // network here)...
    let answer = send_from(starttls, "127.0.0.1", dir.path(), UPN, &message);
    assert!(answer.starts_with("LOGIN REFUSED"), "{answer}");
    // ...nor on the cleartext listener from outside cleartext_networks...
    let answer = send_from(cleartext, "127.0.0.3", dir.path(), UPN, &message);
    assert!(answer.starts_with("LOGIN REFUSED"), "{answer}");
    assert_eq!(api.sent().len(), 4);
    // ...but from them, yes.
    assert_eq!(send_from(cleartext, "127.0.0.2", dir.path(), UPN, &message), "SENT", "{}", gateway.log());
    assert_eq!(api.sent().len(), 5);
}

/// check-config: an API backend with no `relay` sends through its API (its
/// tokens are not valid for SMTP); pass-through users there have no token
/// popgate could send with, so that is refused by name; a backend no relay
/// can be derived from needs `relay`.
#[test]
fn check_config_knows_which_accounts_can_send() {
    use popgate::config::Config;
    let config = |backend: &str, account: &str| {
        format!(
            r#"
[[listener]]
address = "127.0.0.1:0"
protocol = "submission"

[backend]
{backend}

[token_store]
path = "/tmp/popgate-test-tokens.enc"
key_file = "/tmp/popgate-test-token.key"

[[account]]
name = "office"
{account}

[account.submission]
"#
        )
    };
    let mapped = format!(
        "mode = \"mapped\"\nlogin = \"{UPN}\"\n\n[account.oauth]\nprovider = \"microsoft\"\n\
         client_id = \"11111111-1111-1111-1111-111111111111\"\ntenant = \"contoso.onmicrosoft.com\"\n\n\
         [[account.device]]\nuser = \"scanner\"\npassword_hash = \"$argon2id$v=19$m=19456,t=2,p=1$dLybk+DCjPMqdEZMmKmc1g$ef2ohS1J+moDzc2CVjP8ysMdN9UUofaaC7bl978xGBI\"\n"
    );
    for backend in ["kind = \"graph\"", "kind = \"gmail\""] {
        Config::from_toml(&config(backend, &mapped), "test.toml").unwrap_or_else(|e| panic!("{backend}: {e}"));
        let refused =
            Config::from_toml(&config(backend, "mode = \"passthrough\"\nusers = [\"*@contoso.com\"]"), "t.toml")
                .expect_err("pass-through through the API");
        assert!(refused.to_string().contains("pass-through users need a `relay`"), "{refused}");
    }
    let imap = "kind = \"imap\"\nhost = \"mail.example.com\"";
    let refused = Config::from_toml(&config(imap, "mode = \"passthrough\"\nusers = [\"*@example.com\"]"), "t.toml")
        .expect_err("no relay for this backend");
    assert!(refused.to_string().contains("no `relay` set"), "{refused}");
}

/// A token endpoint that answers every refresh with a token `issue` makes
/// (the mail API stand-in's own), counting the requests.
struct TokenEndpoint {
    url: String,
    requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl TokenEndpoint {
    fn start(issue: std::sync::Arc<dyn Fn() -> Result<String, String> + Send + Sync>) -> TokenEndpoint {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                stream.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
                let mut reader = BufReader::new(stream);
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = value.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; length.min(1 << 16)];
                let _ = reader.read_exact(&mut body);
                assert!(String::from_utf8_lossy(&body).contains("grant_type=refresh_token"));
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let answer = match issue() {
                    Ok(token) => {
                        (200, format!(r#"{{"access_token":"{token}","token_type":"Bearer","expires_in":3600}}"#))
                    }
                    Err(why) => (400, format!(r#"{{"error":"invalid_grant","error_description":"{why}"}}"#)),
                };
                let mut stream = reader.into_inner();
                let _ = write!(
                    stream,
                    "HTTP/1.1 {} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                    answer.0,
                    answer.1.len(),
                    answer.1
                );
            }
        });
        TokenEndpoint { url, requests }
    }

    fn requests(&self) -> usize {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Issue #18's "token expired → one refresh, then success" on the mail API
/// path: Graph refuses the held token with a 401, popgate refreshes it once
/// at the token endpoint and sends again with the new one; the scanner gets
/// 250 and the message is sent exactly once.
#[test]
fn an_expired_api_token_is_refreshed_once_and_the_scan_goes_through() {
    let api = GraphApi::start();
    let token = api.issue_token(TokenKind::Delegated);
    let endpoint = TokenEndpoint::start(api.issuer(TokenKind::Delegated));
    let dir = tempfile::tempdir().unwrap();
    let backend = format!("[backend]\nkind = \"graph\"\napi_base = \"{}\"", api.base_url);
    let gateway = gateway_with(dir.path(), &backend, UPN, &token, 2, pop3_and_submission, "", Some(&endpoint.url));

    support::bearer::BearerApi::expire(&api, &token);
    let message = scan("graph-refreshed", UPN);
    assert_eq!(send(&gateway, dir.path(), UPN, &message), "SENT", "{}", gateway.log());
    assert_eq!(endpoint.requests(), 1, "one refresh");
    assert_eq!(api.sent(), std::slice::from_ref(&message), "sent once, byte-identical");
    let sends: Vec<u16> = api.seen().iter().filter(|r| r.path == "/v1.0/me/sendMail").map(|r| r.status).collect();
    assert_eq!(sends, [401, 202], "refused with the old token, accepted with the new one");
    assert!(gateway.log().contains("refreshed, retrying once"), "{}", gateway.log());

    // The refreshed token is kept: the next scan needs no refresh.
    assert_eq!(send(&gateway, dir.path(), UPN, &scan("graph-after", UPN)), "SENT");
    assert_eq!(endpoint.requests(), 1);
    assert!(!gateway.log().contains(&token), "the token was logged");
}
