//! Real third-party POP3 clients (curl, Python's poplib, fetchmail) complete
//! retrieve-and-delete cycles through popgate over a private Dovecot; each
//! test then checks on the Dovecot side what is left.

mod support;

use support::program::{POPLIB_CYCLE, describe, run_with};

/// Runs a program to completion with no stdin and these environment
/// variables, killing it after the harness time limit.
fn run(program: &str, args: &[&str], env: &[(&str, &Path)]) -> Output {
    let env: Vec<(&str, &std::ffi::OsStr)> = env.iter().map(|(k, v)| (*k, v.as_os_str())).collect();
    run_with(program, args, &env, None)
}

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use support::dovecot::{ALICE, Dovecot};
use support::gateway::Gateway;
use support::messages::{canonical, simple};

/// A Dovecot where alice has these messages, and popgate in front of it.
fn setup(messages: &[Vec<u8>]) -> (Dovecot, Gateway, Vec<u32>) {
    let dovecot = Dovecot::start();
    let uids = dovecot.append_all(ALICE.0, messages);
    let gateway = Gateway::url(&dovecot.imap_url());
    (dovecot, gateway, uids)
}

fn curl(gateway: &Gateway, path: &str, extra: &[&str]) -> Output {
    let url = format!("pop3://{}/{path}", gateway.addr);
    let credentials = format!("{}:{}", ALICE.0, ALICE.1);
    let mut args = vec!["--silent", "--show-error", "--max-time", "20", "--user", &credentials];
    args.extend_from_slice(extra);
    args.push(&url);
    run("curl", &args, &[])
}

#[test]
fn curl_lists_retrieves_and_deletes() {
    let msgs = vec![
        simple("for curl one"),
        b"Subject: dots for curl\r\n\r\n.\r\n..two dots\r\n.one dot\r\nend\r\n".to_vec(),
        simple("for curl three"),
    ];
    let (dovecot, gateway, uids) = setup(&msgs);
    let want: Vec<Vec<u8>> = uids.iter().map(|&u| canonical(&dovecot.fetch(ALICE.0, u))).collect();

    // pop3://host/ is LIST.
    let list = curl(&gateway, "", &[]);
    assert!(list.status.success(), "curl LIST: {}", describe(&list));
    let expected_list: String = want.iter().enumerate().map(|(i, m)| format!("{} {}\r\n", i + 1, m.len())).collect();
    assert_eq!(String::from_utf8_lossy(&list.stdout), expected_list);

    // pop3://host/N is RETR N; curl un-stuffs the dots itself.
    for (i, m) in want.iter().enumerate() {
        let retr = curl(&gateway, &(i + 1).to_string(), &[]);
        assert!(retr.status.success(), "curl RETR {}: {}", i + 1, describe(&retr));
        assert_eq!(String::from_utf8_lossy(&retr.stdout), String::from_utf8_lossy(m), "curl RETR {}", i + 1);
    }

    // A custom command: DELE, then curl's QUIT commits it.
    let dele = curl(&gateway, "2", &["--request", "DELE", "--head"]);
    assert!(dele.status.success(), "curl DELE: {}", describe(&dele));
    support::wait_for("message 2 to leave Dovecot", Duration::from_secs(10), || {
        (dovecot.uids(ALICE.0) == [uids[0], uids[2]]).then_some(())
    });

    let list = curl(&gateway, "", &[]);
    assert!(list.status.success(), "{}", describe(&list));
    assert_eq!(String::from_utf8_lossy(&list.stdout), format!("1 {}\r\n2 {}\r\n", want[0].len(), want[2].len()));
    let retr = curl(&gateway, "2", &[]);
    assert_eq!(retr.stdout, want[2]);

    // A wrong password fails the transfer.
    let url = format!("pop3://{}/1", gateway.addr);
    let wrong = run("curl", &["--silent", "--max-time", "20", "--user", "alice:wrong", &url], &[]);
    assert!(!wrong.status.success(), "curl with a wrong password: {}", describe(&wrong));
}

#[test]
fn python_poplib_retrieves_and_deletes_everything() {
    let msgs = vec![
        simple("for poplib one"),
        b"From: x@example.com\nSubject: bare LF for poplib\n\n.starts with a dot\nend".to_vec(),
        "Subject: 8-bit for poplib\r\n\r\ngrüße\r\n".as_bytes().to_vec(),
    ];
    let (dovecot, gateway, uids) = setup(&msgs);
    let want: Vec<Vec<u8>> = uids.iter().map(|&u| canonical(&dovecot.fetch(ALICE.0, u))).collect();
    let dovecot_uidl = dovecot.pop3_uidl(ALICE.0);

    let port = gateway.addr.port().to_string();
    let output = run("python3", &["-c", POPLIB_CYCLE, "127.0.0.1", &port, ALICE.0, ALICE.1], &[]);
    assert!(output.status.success(), "poplib: {}", describe(&output));
    let text = String::from_utf8_lossy(&output.stdout);
    let json = text.trim();

    // No JSON parser among the dependencies: check the pieces as text.
    let total: usize = want.iter().map(Vec::len).sum();
    assert!(json.contains(&format!("\"stat\": [3, {total}]")), "{json}");
    for (i, m) in want.iter().enumerate() {
        assert!(json.contains(&format!("\"{} {}\"", i + 1, m.len())), "LIST entry {}: {json}", i + 1);
        // poplib's octet count includes each line's CRLF.
        assert!(json.contains(&format!("\"octets\": {}", m.len())), "RETR {} octets: {json}", i + 1);
    }
    for (n, uid) in &dovecot_uidl {
        assert!(json.contains(&format!("\"{n} {uid}\"")), "UIDL {n} {uid}: {json}");
    }
    assert!(json.contains(r#"".starts with a dot""#), "un-stuffed dot line: {json}");
    assert!(json.contains(r#""Subject: for poplib one""#), "{json}");
    assert!(json.contains(r#""quit": "+OK"#), "{json}");

    assert_eq!(dovecot.uids(ALICE.0), Vec::<u32>::new(), "poplib's DELE + QUIT must empty the mailbox");
}

#[test]
fn fetchmail_retrieves_and_deletes_everything() {
    let msgs = vec![simple("fetchmail one"), simple("fetchmail two"), b"Subject: fetchmail three\n\n.dot\n".to_vec()];
    let (dovecot, gateway, _uids) = setup(&msgs);
    let home = tempfile::Builder::new().prefix("popgate-fetchmail-").tempdir().expect("tempdir");
    let delivered = home.path().join("delivered");
    let rc = home.path().join("fetchmailrc");
    std::fs::write(
        &rc,
        format!(
            "set no bouncemail\n\
             poll 127.0.0.1 protocol POP3 port {port} timeout 20 auth password\n  \
             user \"{user}\" there with password \"{password}\" is \"root\" here\n  \
             options nokeep fetchall mda \"cat >> {delivered}\"\n",
            port = gateway.addr.port(),
            user = ALICE.0,
            password = ALICE.1,
            delivered = delivered.display(),
        ),
    )
    .expect("write rc");
    // fetchmail refuses an rc file others can read.
    std::fs::set_permissions(&rc, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");

    let output = run(
        "fetchmail",
        &[
            "--fetchmailrc",
            rc.to_str().unwrap(),
            "--nosyslog",
            "--verbose",
            "--nodetach",
            // fetchmail 6.4 tries STLS even when CAPA does not offer it;
            // an empty protocol list turns that off.
            "--sslproto",
            "",
            "--idfile",
            home.path().join("ids").to_str().unwrap(),
        ],
        // Its lock and id files live in its home: keep parallel runs apart.
        &[("HOME", home.path()), ("FETCHMAILHOME", home.path())],
    );
    assert!(output.status.success(), "fetchmail: {}", describe(&output));

    let mail = std::fs::read(&delivered).unwrap_or_else(|e| panic!("nothing delivered ({e}): {}", describe(&output)));
    let mail = String::from_utf8_lossy(&mail);
    for subject in ["Subject: fetchmail one", "Subject: fetchmail two", "Subject: fetchmail three"] {
        assert!(mail.contains(subject), "{subject} not delivered:\n{mail}");
    }
    assert!(mail.lines().any(|l| l.trim_end() == ".dot"), "dot line not un-stuffed:\n{mail}");
    assert_eq!(dovecot.uids(ALICE.0), Vec::<u32>::new(), "fetchmail --nokeep must empty the mailbox");
}

// --- A filtered device (docs/POLICIES.md) -----------------------------------

/// fetchmail with `nokeep` (it deletes what it retrieved) as `user`; what it
/// delivered.
fn fetchmail_deletes_as(addr: std::net::SocketAddr, user: &str, password: &str) -> String {
    let home = tempfile::Builder::new().prefix("popgate-fetchmail-").tempdir().expect("tempdir");
    let delivered = home.path().join("delivered");
    let rc = home.path().join("fetchmailrc");
    std::fs::write(
        &rc,
        format!(
            "set no bouncemail\n\
             poll 127.0.0.1 protocol POP3 port {port} timeout 20 auth password\n  \
             user \"{user}\" there with password \"{password}\" is \"root\" here\n  \
             options nokeep fetchall mda \"cat >> {delivered}\"\n",
            port = addr.port(),
            delivered = delivered.display(),
        ),
    )
    .expect("write rc");
    std::fs::set_permissions(&rc, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
    let ids = home.path().join("ids");
    let output = run(
        "fetchmail",
        &["--fetchmailrc", rc.to_str().unwrap(), "--nosyslog", "--verbose", "--nodetach", "--sslproto", "", "--idfile"]
            .into_iter()
            .chain([ids.to_str().unwrap()])
            .collect::<Vec<_>>(),
        &[("HOME", home.path()), ("FETCHMAILHOME", home.path())],
    );
    assert!(output.status.success(), "fetchmail: {}", describe(&output));
    String::from_utf8_lossy(&std::fs::read(&delivered).unwrap_or_default()).into_owned()
}

/// A message from `from_address`, with an attachment of `media_type`.
fn with_attachment(subject: &str, from_address: &str, media_type: &str) -> Vec<u8> {
    format!(
        "From: {from_address}\r\nTo: printer@example.com\r\nSubject: {subject}\r\n\
         Message-ID: <{id}@example.com>\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n\
         --b1\r\nContent-Type: text/plain\r\n\r\nPlease print {subject}.\r\n\
         --b1\r\nContent-Type: {media_type}; name=\"doc\"\r\nContent-Disposition: attachment; filename=\"doc\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQKJcOkw7zDtsOf\r\n--b1--\r\n",
        id = subject.replace(' ', "-")
    )
    .into_bytes()
}

/// curl and fetchmail (no --keep) against a device allowed only the
/// office's PDFs, through a real `popgate serve`: both see exactly those,
/// fetchmail's deletes remove exactly those, the hidden ones stay in
/// Dovecot.
#[test]
fn curl_and_fetchmail_see_and_delete_only_a_filtered_devices_mail() {
    let dovecot = Dovecot::start();
    let raws = [
        with_attachment("office pdf one", "clerk@office.example", "application/pdf"),
        with_attachment("office zip", "clerk@office.example", "application/zip"),
        with_attachment("spam pdf", "evil@spam.example", "application/pdf"),
        with_attachment("office pdf two", "boss@office.example", "application/pdf"),
        simple("office plain"),
    ];
    let uids = dovecot.append_all(ALICE.0, &raws);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("alice-password"), format!("{}\n", ALICE.1)).unwrap();
    let config = dir.path().join("popgate.toml");
    std::fs::write(
        &config,
        format!(
            "[backend]\nkind = \"imap\"\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"none\"\n\n\
             [[account]]\nname = \"print\"\nmode = \"mapped\"\nlogin = \"{user}\"\npassword_file = \"{dir}/alice-password\"\n\n\
             [account.policy]\nallowed_senders = [\"office.example\"]\nattachment_types = [\"application/pdf\"]\n\n\
             [[account.device]]\nuser = \"printer\"\npassword_hash = \"{hash}\"\n",
            port = dovecot.imap_port,
            user = ALICE.0,
            dir = dir.path().display(),
            hash = popgate::auth::passwords::hash_password("pw-printer").unwrap(),
        ),
    )
    .unwrap();
    let gateway = support::gateway::GatewayProcess::start(&["--config", config.to_str().unwrap()]);
    let shown: Vec<Vec<u8>> = [0, 3].iter().map(|&i| canonical(&dovecot.fetch(ALICE.0, uids[i]))).collect();

    let auth = ["--user", "printer:pw-printer"];
    support::program::curl_lists(gateway.addr, &auth, &[&shown[0], &shown[1]]);
    support::program::curl_retrieves_each(gateway.addr, &auth, &shown);

    let mail = fetchmail_deletes_as(gateway.addr, "printer", "pw-printer");
    for subject in ["Subject: office pdf one", "Subject: office pdf two"] {
        assert!(mail.contains(subject), "{subject} not delivered:\n{mail}");
    }
    for subject in ["office zip", "spam pdf", "office plain"] {
        assert!(!mail.contains(subject), "{subject} delivered to the filtered device:\n{mail}");
    }
    assert_eq!(dovecot.uids(ALICE.0), vec![uids[1], uids[2], uids[4]], "fetchmail deleted exactly the shown two");
}
