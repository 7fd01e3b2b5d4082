//! Scan to email for accounts whose backend is a mail API: a real SMTP
//! client (Python smtplib) sends through popgate's submission listener as a
//! device user, and popgate sends the message with the account's API token
//! through Microsoft Graph `sendMail` (MIME, base64, `text/plain`) or the
//! Gmail API `users.messages.send` (`raw`, base64url) — here the stand-ins,
//! which record what they were sent. DATA is answered 250 only once the API
//! accepted the message; an API refusal becomes the matching 4xx/5xx and
//! nothing is recorded as sent.

mod support;

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

/// A gateway with a submission listener for one mapped account on
/// `backend` (a TOML `[backend]` table), holding `token` in its store.
fn gateway(dir: &Path, backend: &str, login: &str, token: &str) -> GatewayProcess {
    let key = dir.join("token.key");
    std::fs::write(&key, format!("{}\n", StoreKey::generate_text())).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let store_path = dir.join("tokens.enc");
    let stored = StoredToken {
        access_token: Secret::new(token),
        refresh_token: None,
        expires_at: Some(unix_now() + 3600),
        obtained_at: unix_now(),
        scope: None,
    };
    let store_key = StoreKey::read(&SecretSource::File(key.clone())).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(EncryptedFileStore::new(store_path.clone(), store_key).save("office", &stored)).unwrap();
    let hash = hash_password(SCANNER.1).unwrap();
    GatewayProcess::start_with_config(2, &[("RUST_LOG", "popgate=debug")], |addrs| {
        format!(
            r#"
[[listener]]
address = "{pop3}"

[[listener]]
address = "{smtp}"
protocol = "submission"

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
token_url = "http://127.0.0.1:9/token"
scopes = ["mail"]
redirect_uri = "http://127.0.0.1/callback"

[account.submission]

[[account.device]]
user = "{scanner}"
password_hash = "{hash}"
"#,
            pop3 = addrs[0],
            smtp = addrs[1],
            store = store_path.display(),
            key = key.display(),
            scanner = SCANNER.0,
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
host, port, user, password, sender, path = sys.argv[1:7]
msg = open(path, 'rb').read()
s = smtplib.SMTP(host, int(port), timeout=60)
s.ehlo('scanner.local')
s.login(user, password)
try:
    s.sendmail(sender, [sender], msg)
    print('SENT')
except smtplib.SMTPResponseException as e:
    print('REFUSED', e.smtp_code, e.smtp_error.decode())
s.quit()
"#;

/// Sends `message` as `sender` with smtplib; "SENT" or "REFUSED code text".
fn send(gateway: &GatewayProcess, dir: &Path, sender: &str, message: &[u8]) -> String {
    let path = dir.join("scan.eml");
    std::fs::write(&path, message).unwrap();
    let addr = gateway.addrs[1];
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
    assert_eq!(api.sent().len(), 1, "a refused send was recorded");
    assert!(!gateway.log().contains(&token), "the token was logged");
}
