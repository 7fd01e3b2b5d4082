//! popgate over a second real IMAP server: a private Cyrus IMAP 3.6 per test
//! (tests/support/cyrus_imap.rs) — what differs from Dovecot: a missing
//! mailbox said without RFC 5530 codes, trash under INBOX or by special-use,
//! its per-user login limit and its wording, LOGINDISABLED, and its own
//! pop3d's UIDLs. The POP3 behaviour every store shares is in the battery,
//! which runs on Cyrus over IMAP too.

mod support;

use popgate::backend::imap::{ImapConfig, UidlFormat};
use popgate::backend::select::BackendConfig;
use popgate::config::Config;
use support::cyrus_imap::CyrusImap;
use support::gateway::{Gateway, GatewayProcess};
use support::imap::Imap;
use support::messages::simple;
use support::pop3::Dialogue as _;
use support::proxy::RecordingProxy;

const ALICE: (&str, &str) = ("alice", "alice-secret");

/// Cyrus with `extra` in imapd.conf and alice holding `count` messages.
fn cyrus_with(extra: &str, count: usize) -> CyrusImap {
    let cyrus = CyrusImap::start_with(extra);
    cyrus.add_user(ALICE.0, ALICE.1);
    let messages: Vec<Vec<u8>> = (1..=count).map(|i| simple(&format!("cyrus-{i}"))).collect();
    // (The first login creates INBOX and the autocreate folders.)
    if count > 0 {
        cyrus.append_all(ALICE.0, &messages);
    }
    cyrus
}

/// popgate in-process over `url`, its IMAP settings adjusted.
fn gateway(url: &str, adjust: impl FnOnce(&mut ImapConfig, &mut Config)) -> Gateway {
    let mut config = Config::default();
    let mut imap = match BackendConfig::from_url(url).unwrap_or_else(|e| panic!("{e}")) {
        BackendConfig::Imap(imap) => imap,
        other => panic!("not IMAP: {other:?}"),
    };
    adjust(&mut imap, &mut config);
    config.backend = BackendConfig::Imap(imap);
    Gateway::from_config(config)
}

/// `USER`/`PASS` on a new connection; the PASS reply.
fn try_login(gateway: &Gateway, user: &str, password: &str) -> (support::pop3::Pop3, String) {
    let mut c = gateway.connect();
    c.ok(&format!("USER {user}"));
    let reply = c.cmd(&format!("PASS {password}"));
    (c, reply)
}

fn flags_of(cyrus: &CyrusImap) -> Vec<(u32, bool)> {
    cyrus
        .messages(ALICE.0)
        .into_iter()
        .map(|m| (m.uid, m.flags.iter().any(|f| f.eq_ignore_ascii_case("\\Seen"))))
        .collect()
}

/// Cyrus answers `NO Mailbox does not exist` with no RFC 5530 code: that
/// is a configuration error, not "try again later", and the log names the
/// mailbox and what the server has.
#[test]
fn a_mailbox_cyrus_will_not_select_is_a_configuration_error_naming_its_mailboxes() {
    let cyrus = cyrus_with("", 1);
    let server = GatewayProcess::start(&["--backend", &format!("{}/NoSuchBox", cyrus.imap_url())]);
    let mut c = support::pop3::Pop3::connect(server.addr);
    c.ok(&format!("USER {}", ALICE.0));
    let reply = c.cmd(&format!("PASS {}", ALICE.1));
    assert!(reply.starts_with("-ERR [SYS/PERM]"), "{reply}");
    let log = support::wait_for("the configuration error in the log", support::IO_TIMEOUT, || {
        let log = server.log();
        log.contains("refused to select the configured mailbox").then_some(log)
    });
    let line = log.lines().find(|l| l.contains("refused to select the configured mailbox")).unwrap();
    assert!(line.contains("NoSuchBox") && line.contains("INBOX") && line.contains("Trash"), "{line}");
    assert!(line.contains("Mailbox does not exist"), "{line}");
}

/// Without UIDPLUS, deleted mail moves to the trash Cyrus marks `\Trash`
/// (RFC 6154), with nothing configured.
#[test]
fn without_uidplus_deleted_mail_goes_to_the_special_use_trash() {
    let cyrus = cyrus_with("suppress_capabilities: UIDPLUS\nxlist-trash: Trash", 3);
    assert!(
        cyrus
            .mailboxes(ALICE.0)
            .iter()
            .any(|(name, attributes)| name == "Trash" && attributes.to_ascii_lowercase().contains("\\trash"))
    );
    let uids = cyrus.uids(ALICE.0);
    let gateway = gateway(&cyrus.imap_url(), |_, _| {});
    let mut c = gateway.login(ALICE.0, ALICE.1);
    c.ok("DELE 2");
    assert!(c.quit().starts_with("+OK"));
    assert_eq!(cyrus.uids(ALICE.0), [uids[0], uids[2]]);
    assert_eq!(cyrus.messages_in(ALICE.0, "Trash").len(), 1);
}

/// Cyrus without altnamespace keeps folders under INBOX: the configured
/// `trash_mailbox = "Trash"` (config/popgate.toml's example) is found as
/// `INBOX/Trash`, where it used to fail every DELE+QUIT as "temporary".
#[test]
fn a_configured_trash_is_found_inside_the_personal_namespace() {
    let cyrus = cyrus_with("suppress_capabilities: UIDPLUS\naltnamespace: no", 2);
    let names: Vec<String> = cyrus.mailboxes(ALICE.0).into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"INBOX/Trash".to_string()) && !names.contains(&"Trash".to_string()), "{names:?}");
    let gateway = gateway(&cyrus.imap_url(), |imap, _| imap.trash_mailbox = Some("Trash".into()));
    let mut c = gateway.login(ALICE.0, ALICE.1);
    c.ok("DELE 1");
    assert!(c.quit().starts_with("+OK"));
    assert_eq!(cyrus.messages(ALICE.0).len(), 1);
    assert_eq!(cyrus.messages_in(ALICE.0, "INBOX/Trash").len(), 1);

    // With no such folder at all: a configuration error, nothing removed.
    let gateway = self::gateway(&cyrus.imap_url(), |imap, _| imap.trash_mailbox = Some("Papierkorb".into()));
    let mut c = gateway.login(ALICE.0, ALICE.1);
    c.ok("DELE 1");
    let reply = c.quit();
    assert!(reply.starts_with("-ERR [SYS/PERM]"), "{reply}");
    assert_eq!(cyrus.messages(ALICE.0).len(), 1);
}

/// `NO Too many open connections (2 of 2 for alice)` is Cyrus's per-user
/// limit, not a wrong password: `[IN-USE]`, and no throttle penalty.
#[test]
fn cyrus_login_limit_is_in_use_not_a_wrong_password() {
    let cyrus = cyrus_with("maxlogins_per_user: 2", 1);
    let held: Vec<Imap> = (0..2).map(|_| cyrus.login(ALICE.0)).collect();
    let gateway = gateway(&cyrus.imap_url(), |_, config| config.backend_pool.enabled = false);
    for _ in 0..6 {
        let (_c, reply) = try_login(&gateway, ALICE.0, ALICE.1);
        assert!(reply.starts_with("-ERR [IN-USE]"), "{reply}");
    }
    for imap in held {
        imap.logout();
    }
    // Six refusals later the right password still logs in at once: none
    // counted as a failed login (the throttle would hold it for seconds).
    let started = std::time::Instant::now();
    let mut c = support::wait_for("a free login slot", support::IO_TIMEOUT, || {
        let (c, reply) = try_login(&gateway, ALICE.0, ALICE.1);
        reply.starts_with("+OK").then_some(c)
    });
    assert_eq!(c.stat().0, 1);
    c.quit();
    assert!(started.elapsed() < std::time::Duration::from_secs(1), "throttled: {:?}", started.elapsed());
}

/// Warm sessions take at most one of the user's login slots by default; and
/// when the server refuses a login for its limit, popgate gives back the
/// account's idle sessions (here, one logged in with the old password) and
/// tries once more.
#[test]
fn warm_sessions_leave_the_users_own_slot_and_give_way_at_the_limit() {
    let cyrus = cyrus_with("maxlogins_per_user: 2", 1);
    let gateway = gateway(&cyrus.imap_url(), |_, _| {});
    let mut first = gateway.login(ALICE.0, ALICE.1);
    let mut second = gateway.login(ALICE.0, ALICE.1);
    first.quit();
    second.quit();
    // One warm session is kept, not two: the user's own client gets in.
    let mut own_client = Imap::connect(cyrus.imap);
    let reply = own_client.command(&format!("LOGIN {} {}", ALICE.0, ALICE.1));
    assert!(reply.is_ok(), "the user's own client was refused: {}", reply.status);

    // The password changes; the warm session (old password) still holds a
    // slot, the user's client the other.
    cyrus.set_password(ALICE.0, "new-secret");
    let (mut c, reply) = try_login(&gateway, ALICE.0, "new-secret");
    assert!(reply.starts_with("+OK"), "{reply}");
    assert_eq!(c.stat().0, 1);
    c.quit();
    own_client.logout();
}

/// `allowplaintext: no`: Cyrus announces LOGINDISABLED (and no AUTH=PLAIN)
/// on a cleartext connection. popgate sends no credentials at all, answers
/// `[SYS/PERM]` and says what to configure.
#[test]
fn logindisabled_means_no_credentials_are_sent() {
    let cyrus = cyrus_with("allowplaintext: no", 0);
    let proxy = RecordingProxy::start(cyrus.imap);
    let server = GatewayProcess::start(&["--backend", &format!("imap://{}", proxy.addr)]);
    for (user, password) in [ALICE, (ALICE.0, "pässwörd")] {
        let mut c = support::pop3::Pop3::connect(server.addr);
        c.ok(&format!("USER {user}"));
        let reply = c.cmd(&format!("PASS {password}"));
        assert!(reply.starts_with("-ERR [SYS/PERM]"), "{reply}");
    }
    let sent = String::from_utf8_lossy(&proxy.sent()).to_ascii_uppercase();
    assert!(!sent.contains("LOGIN") && !sent.contains("AUTHENTICATE"), "credentials went out: {sent}");
    assert!(!sent.contains("SECRET"), "{sent}");
    support::wait_for("the TLS advice in the log", support::IO_TIMEOUT, || {
        server.log().contains("the server requires TLS: use imap+starttls:// or imaps://").then_some(())
    });
}

/// TOP never marks a message read, even with `mark_seen`; RETR does.
#[test]
fn top_with_mark_seen_leaves_messages_unseen_and_retr_marks_them() {
    let cyrus = cyrus_with("", 3);
    let uids = cyrus.uids(ALICE.0);
    let gateway = gateway(&cyrus.imap_url(), |imap, _| imap.mark_seen = true);
    let mut c = gateway.login(ALICE.0, ALICE.1);
    c.top(1, 0);
    c.top(2, 5);
    c.retr(3);
    c.quit();
    assert_eq!(flags_of(&cyrus), [(uids[0], false), (uids[1], false), (uids[2], true)]);
}

/// Each UIDL preset equals what Cyrus's own pop3d lists for the same
/// mailbox with the matching `uidl_format`, so users moving from Cyrus's
/// POP3 to popgate are not served their mail again.
#[test]
fn uidl_presets_equal_cyrus_pop3d() {
    // (Cyrus pop3d's uidl_format, popgate's uidl_format)
    for (cyrus_format, ours) in [("cyrus", "cyrus"), ("dovecot", "dovecot"), ("uidonly", "%u")] {
        let cyrus = cyrus_with(&format!("uidl_format: {cyrus_format}"), 3);
        let theirs = cyrus.pop3_uidl(ALICE.0);
        let gateway = gateway(&cyrus.imap_url(), |imap, _| {
            imap.uidl_format = UidlFormat::parse(ours).unwrap();
        });
        let mut c = gateway.login(ALICE.0, ALICE.1);
        assert_eq!(c.uidl(), theirs, "popgate's {ours} against Cyrus pop3d's {cyrus_format}");
        c.quit();
    }
}
