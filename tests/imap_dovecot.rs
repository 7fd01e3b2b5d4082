//! popgate over a real IMAP server: a private Dovecot per test — what only
//! an IMAP store has (Dovecot's own POP3 UIDLs, another client's `\Deleted`
//! flag, IMAP quoting, what reaches the server). The POP3 behaviour every
//! store shares is in the battery (tests/battery/), which runs against
//! Dovecot too.

mod support;

use std::collections::HashMap;

use support::dovecot::{ALICE, CAROL, DAVE, Dovecot};
use support::gateway::Gateway;
use support::messages::simple;
use support::pop3::Dialogue as _;
use support::pop3::{Pop3, plain_response};
use support::proxy::RecordingProxy;

/// A Dovecot where alice has these messages, and popgate in front of it.
fn setup(messages: &[Vec<u8>]) -> (Dovecot, Gateway, Vec<u32>) {
    let dovecot = Dovecot::start();
    let uids = dovecot.append_all(ALICE.0, messages);
    let gateway = Gateway::url(&dovecot.imap_url());
    (dovecot, gateway, uids)
}

fn login(gateway: &Gateway) -> Pop3 {
    gateway.login(ALICE.0, ALICE.1)
}

/// Messages whose Subject names their position: "marker-1", "marker-2", …
fn marked(count: usize) -> Vec<Vec<u8>> {
    (1..=count).map(|i| simple(&format!("marker-{i}"))).collect()
}

/// Which POP3 message number carries which "marker-N" subject (by TOP).
fn numbers_by_marker(c: &mut Pop3) -> HashMap<String, u32> {
    let (count, _) = c.stat();
    (1..=count as u32)
        .map(|n| {
            let header = String::from_utf8(c.top(n, 0)).expect("ASCII header");
            let subject = header.lines().find_map(|l| l.strip_prefix("Subject: ")).expect("Subject").to_string();
            (subject, n)
        })
        .collect()
}

#[test]
fn uidl_is_stable_and_equals_dovecots_own_pop3_uidl() {
    let (mut dovecot, gateway, _uids) = setup(&marked(4));
    let first = login(&gateway).uidl();
    let mut c = login(&gateway);
    assert_eq!(c.uidl(), first, "UIDL changed between sessions");
    assert_eq!(c.uidl_one(3), first[2].1);
    c.quit();
    assert_eq!(first, dovecot.pop3_uidl(ALICE.0), "popgate's UIDL differs from Dovecot's POP3 UIDL");

    // After a deletion the others keep their ids.
    let mut c = login(&gateway);
    c.ok("DELE 2");
    c.quit();
    let after: Vec<String> = login(&gateway).uidl().into_iter().map(|(_, u)| u).collect();
    assert_eq!(after, vec![first[0].1.clone(), first[2].1.clone(), first[3].1.clone()]);

    // And across a restart of the IMAP server.
    drop(gateway);
    dovecot.restart();
    let gateway = Gateway::url(&dovecot.imap_url());
    let again = login(&gateway).uidl();
    assert_eq!(again.into_iter().map(|(_, u)| u).collect::<Vec<_>>(), after);
    assert_eq!(login(&gateway).uidl(), dovecot.pop3_uidl(ALICE.0));
}

#[test]
fn quit_removes_exactly_the_deleted_messages_and_not_what_another_client_flagged() {
    let (dovecot, gateway, uids) = setup(&marked(5));
    // Another client flags marker-2 \Deleted and leaves without expunging.
    dovecot.flag_deleted(ALICE.0, uids[1]);

    let mut c = login(&gateway);
    let numbers = numbers_by_marker(&mut c);
    c.ok(&format!("DELE {}", numbers["marker-1"]));
    c.ok(&format!("DELE {}", numbers["marker-3"]));
    let bye = c.quit();
    assert!(bye.starts_with("+OK"), "{bye}");

    let stored = dovecot.messages(ALICE.0);
    assert_eq!(stored.iter().map(|m| m.uid).collect::<Vec<_>>(), vec![uids[1], uids[3], uids[4]]);
    assert!(stored[0].is_deleted(), "the other client's \\Deleted flag must stay: {stored:?}");
    assert!(!stored[1].is_deleted() && !stored[2].is_deleted(), "{stored:?}");
}

#[test]
fn a_password_with_quotes_and_backslashes_logs_in() {
    let dovecot = Dovecot::start();
    dovecot.append_all(CAROL.0, &marked(2));
    let gateway = Gateway::url(&dovecot.imap_url());

    let mut c = gateway.login(CAROL.0, CAROL.1);
    assert_eq!(c.stat().0, 2);
    c.quit();

    let mut c = gateway.connect();
    let reply = c.auth_plain(CAROL.0, CAROL.1);
    assert!(reply.starts_with("+OK"), "AUTH PLAIN as carol: {reply}");
    assert_eq!(c.stat().0, 2);
    c.quit();

    // A near miss is refused as bad credentials.
    let mut c = gateway.connect();
    c.ok(&format!("USER {}", CAROL.0));
    let reply = c.cmd(&format!("PASS {}", CAROL.1.replace('\\', "")));
    assert!(reply.starts_with("-ERR [AUTH]"), "{reply}");
}

/// NUL in a password is refused by popgate itself: no connection to the
/// IMAP server is even opened (seen through a recording proxy).
#[test]
fn nul_in_a_password_is_refused_without_reaching_dovecot() {
    let dovecot = Dovecot::start();
    let proxy = RecordingProxy::start(dovecot.imap_addr());
    let gateway = Gateway::url(&format!("imap://{}", proxy.addr));
    let (user, password) = DAVE;

    let mut c = gateway.connect();
    // AUTH PLAIN whose password holds a NUL after the real password.
    let sneaky = plain_response(user.as_bytes(), format!("{password}\0x").as_bytes());
    let reply = c.cmd(&format!("AUTH PLAIN {sneaky}"));
    assert!(reply.starts_with("-ERR [AUTH]"), "{reply}");
    // The same in a PASS line.
    c.ok(&format!("USER {user}"));
    c.send_raw(format!("PASS {password}\0x\r\n").as_bytes());
    let reply = c.line();
    assert!(reply.starts_with("-ERR [AUTH]"), "{reply}");
    c.quit();
    // And a NUL in the user name.
    let mut c = gateway.connect();
    let reply = c.auth_plain(&format!("{user}\0"), password);
    assert!(reply.starts_with("-ERR"), "{reply}");
    c.quit();
    assert_eq!(
        proxy.connections(),
        0,
        "popgate connected to the backend: {:?}",
        String::from_utf8_lossy(&proxy.sent())
    );

    // The proxy does see a real login, so the check above means something.
    let mut ok = gateway.login(user, password);
    assert_eq!(ok.stat().0, 0);
    ok.quit();
    assert_eq!(proxy.connections(), 1);
    assert!(!proxy.sent().contains(&0), "a raw NUL went to the backend");
}

/// `mark_seen = true` marks a message `\Seen` when RETR sends it whole, as
/// Dovecot's own POP3 does — and never on TOP.
#[test]
fn mark_seen_marks_on_retr_and_never_on_top() {
    let dovecot = Dovecot::start();
    let uids = dovecot.append_all(ALICE.0, &marked(2));
    let mut config = popgate::config::Config {
        backend: popgate::backend::select::BackendConfig::from_url(&dovecot.imap_url()).unwrap(),
        ..popgate::config::Config::default()
    };
    let popgate::backend::select::BackendConfig::Imap(imap) = &mut config.backend else { unreachable!() };
    imap.mark_seen = true;
    let gateway = Gateway::from_config(config);
    let seen = |uid: u32| {
        let stored = dovecot.messages(ALICE.0).into_iter().find(|m| m.uid == uid).expect("still there");
        stored.flags.iter().any(|f| f.eq_ignore_ascii_case("\\Seen"))
    };
    let mut c = login(&gateway);
    c.top(1, 0);
    c.top(2, 3);
    assert!(!seen(uids[0]) && !seen(uids[1]), "TOP marked a message read");
    c.retr(2);
    assert!(seen(uids[1]), "RETR with mark_seen marks the message read");
    assert!(!seen(uids[0]));
    c.ok("QUIT");
}

/// Dovecot's IMAP `BODY[]` sends 0x80 in place of every NUL octet (IMAP
/// literals cannot carry NUL); its own POP3 sends the NUL. popgate fetches
/// the stored octets with RFC 3516 `BINARY[]` where that is proven to give
/// them: RETR and TOP equal Dovecot's own POP3, octet for octet, and LIST
/// equals what RETR sends. `BINARY[]` decodes base64 and quoted-printable
/// parts, so it must not change a message that has them: the one with 0x80
/// octets and a base64 part arrives exactly as stored too. Only a NUL after
/// such a part stays 0x80 (what BODY[] gives; the size is the same). Small
/// chunks, so that NULs fall into several partial FETCHes and some chunks
/// hold 0x80 without any NUL.
#[test]
fn nul_octets_arrive_as_dovecots_own_pop3_sends_them() {
    let dovecot = Dovecot::start();
    let mut with_nuls = b"From: a@example.com\r\nSubject: NUL octets\r\n\r\nbefore\0after\r\n".to_vec();
    for i in 0..120 {
        with_nuls
            .extend_from_slice(format!("line {i:03} \u{0440}\u{0440} with 8-bit text (0x80 octets)\r\n").as_bytes());
    }
    with_nuls.extend_from_slice(b"\0\0 two at the start of a line, one at the end\0\r\nlast\0");
    let mut base64_part = b"From: a@example.com\r\nSubject: 8-bit and base64\r\nMIME-Version: 1.0\r\n\
        Content-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\nContent-Type: text/plain; charset=utf-8\r\n\
        Content-Transfer-Encoding: 8bit\r\n\r\n"
        .to_vec();
    base64_part.extend_from_slice("\u{0440}\u{0440}\u{0440} 0x80 octets, no NUL\r\n".as_bytes());
    base64_part.extend_from_slice(
        b"--XX\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\nAAECAwQF\r\n--XX--\r\n",
    );
    let mut nul_after_base64 = b"From: a@example.com\r\nSubject: NUL after base64\r\nMIME-Version: 1.0\r\n\
        Content-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\nContent-Type: application/octet-stream\r\n\
        Content-Transfer-Encoding: base64\r\n\r\nAAECAwQF\r\n--XX\r\nContent-Type: text/plain\r\n\r\n"
        .to_vec();
    nul_after_base64.extend_from_slice(b"a NUL \0 after a base64 part\r\n--XX--\r\n");
    dovecot.append_all(ALICE.0, &[with_nuls, base64_part, nul_after_base64]);

    let mut config = popgate::config::Config {
        backend: popgate::backend::select::BackendConfig::from_url(&dovecot.imap_url()).unwrap(),
        ..popgate::config::Config::default()
    };
    let popgate::backend::select::BackendConfig::Imap(imap) = &mut config.backend else { unreachable!() };
    imap.fetch_chunk_bytes = 1024;
    let gateway = Gateway::from_config(config);
    let mut c = login(&gateway);
    let sizes = c.list();
    let ours: Vec<(Vec<u8>, Vec<u8>)> = (1..=3).map(|n| (c.retr(n), c.top(n, 3))).collect();
    c.quit();

    let mut reference = Pop3::login(dovecot.pop3_addr(), ALICE.0, ALICE.1);
    let theirs: Vec<(Vec<u8>, Vec<u8>)> = (1..=3).map(|n| (reference.retr(n), reference.top(n, 3))).collect();
    reference.quit();

    for (i, ((retr, top), (their_retr, their_top))) in ours.iter().zip(&theirs).enumerate() {
        let n = i as u32 + 1;
        assert_eq!(sizes[i], (n, retr.len() as u64), "LIST {n} must equal the octets RETR sends");
        assert_eq!(their_retr.len(), retr.len(), "message {n}: same size as Dovecot's POP3 sends");
        if n == 3 {
            // BINARY[] cannot be trusted past the decoded part: 0x80 stays.
            let substituted: Vec<u8> = their_retr.iter().map(|&b| if b == 0 { 0x80 } else { b }).collect();
            assert_eq!(retr, &substituted, "message 3: as BODY[] gives it, nothing decoded");
            assert!(their_retr.contains(&0));
            continue;
        }
        assert!(n != 1 || retr.iter().filter(|&&b| b == 0).count() == 5, "message 1 carries five NULs");
        assert!(
            retr == their_retr,
            "RETR {n} differs from Dovecot's own POP3:\n{:?}\n{:?}",
            String::from_utf8_lossy(retr),
            String::from_utf8_lossy(their_retr)
        );
        assert_eq!(top, their_top, "TOP {n} 3 differs from Dovecot's own POP3");
    }
}
