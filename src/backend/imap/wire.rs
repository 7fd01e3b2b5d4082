//! Pure helpers for the IMAP backend: how things are written on the wire
//! (UID sets, quoted mailbox names, UIDLs) and how server refusals map to
//! `BackendError`. No I/O here, so everything is unit-tested below.

use base64::Engine as _;
use base64::alphabet::IMAP_MUTF7;
use base64::engine::GeneralPurpose;
use base64::engine::general_purpose::NO_PAD;

use crate::mail::BackendError;

/// The POP3 UIDL of an IMAP message: byte-identical to Dovecot's POP3 default
/// `pop3_uidl_format = %08Xu%08Xv`, so clients that switch between Dovecot's
/// own POP3 and popgate do not download everything again. Despite the
/// capital X, Dovecot's `%X` writes lowercase hex (checked against Dovecot
/// 2.3.19's own POP3 UIDL), and POP3 clients compare UIDLs case-sensitively.
pub fn uidl(uid: u32, uidvalidity: u32) -> String {
    format!("{uid:08x}{uidvalidity:08x}")
}

/// Sorted, de-duplicated inclusive ranges covering `uids`.
pub fn uid_ranges(uids: &[u32]) -> Vec<(u32, u32)> {
    let mut sorted = uids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut ranges: Vec<(u32, u32)> = Vec::new();
    for uid in sorted {
        match ranges.last_mut() {
            Some((_, end)) if end.checked_add(1) == Some(uid) => *end = uid,
            _ => ranges.push((uid, uid)),
        }
    }
    ranges
}

/// `uids` as compact IMAP sequence sets (`1:5,7`), split so that no set is
/// longer than `max_len` characters: servers cap the command line length
/// (Dovecot at 64 KiB), and a POP3 session may delete thousands of messages.
/// Never uses `*`, whose meaning depends on the mailbox's current state.
pub fn uid_sets(uids: &[u32], max_len: usize) -> Vec<String> {
    let mut sets = Vec::new();
    let mut current = String::new();
    for (start, end) in uid_ranges(uids) {
        let item = if start == end { start.to_string() } else { format!("{start}:{end}") };
        if !current.is_empty() && current.len() + 1 + item.len() > max_len {
            sets.push(std::mem::take(&mut current));
        }
        if !current.is_empty() {
            current.push(',');
        }
        current.push_str(&item);
    }
    if !current.is_empty() {
        sets.push(current);
    }
    sets
}

/// A mailbox name as an IMAP quoted string, in modified UTF-7 (RFC 3501
/// 5.1.3) so that non-ASCII names reach servers without UTF8=ACCEPT intact.
/// Refuses control characters, which no quoted string may carry.
pub fn quote_mailbox(name: &str) -> Result<String, BackendError> {
    if name.chars().any(|c| c.is_control()) {
        return Err(BackendError::Permanent(format!("mailbox name {name:?} contains a control character")));
    }
    let encoded = modified_utf7(name);
    Ok(format!("\"{}\"", encoded.replace('\\', "\\\\").replace('"', "\\\"")))
}

/// RFC 3501 modified UTF-7: printable ASCII stands for itself (`&` as `&-`),
/// runs of anything else are UTF-16BE in base64 with `,` for `/`, unpadded,
/// between `&` and `-`.
fn modified_utf7(name: &str) -> String {
    const ENGINE: GeneralPurpose = GeneralPurpose::new(&IMAP_MUTF7, NO_PAD);
    let mut out = String::with_capacity(name.len());
    let mut run: Vec<u8> = Vec::new();
    let flush = |run: &mut Vec<u8>, out: &mut String| {
        if !run.is_empty() {
            out.push('&');
            out.push_str(&ENGINE.encode(&run));
            out.push('-');
            run.clear();
        }
    };
    for c in name.chars() {
        if (' '..='~').contains(&c) {
            flush(&mut run, &mut out);
            if c == '&' {
                out.push_str("&-");
            } else {
                out.push(c);
            }
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                run.extend_from_slice(&unit.to_be_bytes());
            }
        }
    }
    flush(&mut run, &mut out);
    out
}

/// Whether `text` (a server's reply text, response code included) carries
/// one of these response codes or phrases, ignoring case.
fn mentions(text: &str, needles: &[&str]) -> bool {
    let upper = text.to_ascii_uppercase();
    needles.iter().any(|n| upper.contains(n))
}

/// Phrases that mean "too many sessions for this account" rather than a
/// refusal: RFC 5530's INUSE and Dovecot's per-user connection limit
/// (`mail_max_userip_connections`), which it reports without INUSE.
const IN_USE: &[&str] = &["[INUSE]", "MAXIMUM NUMBER OF CONNECTIONS"];
/// RFC 5530 codes for transient server trouble.
const TRANSIENT: &[&str] = &["[UNAVAILABLE]", "[SERVERBUG]", "[LIMIT]"];

/// What a refused LOGIN/AUTHENTICATE means. `text` is the whole refusal
/// (status, response code and text), `bad` whether it was BAD rather than NO.
/// Checked in this order because Dovecot words its connection limit as
/// `NO [UNAVAILABLE] Maximum number of connections…`: that is "in use", not
/// "down".
pub fn classify_login_refusal(text: &str) -> BackendError {
    let reason = truncate(text, 200);
    if mentions(text, IN_USE) {
        BackendError::InUse(reason)
    } else if mentions(text, TRANSIENT) {
        BackendError::Unavailable(format!("login: {reason}"))
    } else if mentions(text, &["[PRIVACYREQUIRED]", "LOGINDISABLED"]) {
        // The server wants TLS for logins: a configuration problem, and
        // calling it a wrong password would send the user on a chase.
        BackendError::Permanent(format!("server refuses logins without TLS: {reason}"))
    } else {
        BackendError::AuthFailed
    }
}

/// What a NO or BAD to a command in the selected state means.
pub fn classify_refusal(bad: bool, text: &str, what: &str) -> BackendError {
    let reason = format!("{what}: {}", truncate(text, 200));
    if mentions(text, IN_USE) {
        BackendError::InUse(reason)
    } else if mentions(text, &["[EXPUNGEISSUED]"]) {
        BackendError::MessageGone
    } else if bad
        || mentions(text, &["[NOPERM]", "[READ-ONLY]", "[CANNOT]", "[OVERQUOTA]", "[NONEXISTENT]", "[TRYCREATE]"])
    {
        // BAD: the server did not understand us; retrying will not help.
        BackendError::Permanent(reason)
    } else {
        // A plain NO (or UNAVAILABLE, SERVERBUG, LIMIT): assume transient.
        BackendError::Unavailable(reason)
    }
}

/// At most `max` bytes of `text` (on a char boundary), marked when cut:
/// server texts and parse errors can quote whole responses.
pub fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uidl_matches_dovecot_default_format() {
        assert_eq!(uidl(1, 1), "0000000100000001");
        // Dovecot 2.3.19's own POP3 UIDL for UID 1 in a mailbox with
        // UIDVALIDITY 1795751073.
        assert_eq!(uidl(1, 1_795_751_073), "000000016b08fca1");
        assert_eq!(uidl(0x1A2B, 1_700_000_000), "00001a2b6553f100");
        assert_eq!(uidl(u32::MAX, u32::MAX), "ffffffffffffffff");
        assert!(uidl(7, 9).bytes().all(|b| (0x21..=0x7E).contains(&b)));
    }

    #[test]
    fn uid_sets_are_compact_sorted_and_unique() {
        assert_eq!(uid_sets(&[], 100), Vec::<String>::new());
        assert_eq!(uid_sets(&[5], 100), ["5"]);
        assert_eq!(uid_sets(&[3, 1, 2, 4, 5, 7], 100), ["1:5,7"]);
        assert_eq!(uid_sets(&[9, 7, 7, 8, 1, 3], 100), ["1,3,7:9"]);
        assert_eq!(uid_sets(&[u32::MAX, u32::MAX - 1, 1], 100), ["1,4294967294:4294967295"]);
    }

    #[test]
    fn long_uid_sets_are_split_without_losing_any() {
        let uids: Vec<u32> = (1..=2000).map(|i| i * 2).collect();
        let sets = uid_sets(&uids, 100);
        assert!(sets.len() > 1);
        assert!(sets.iter().all(|s| s.len() <= 100 && !s.starts_with(',') && !s.ends_with(',')));
        let back: Vec<u32> = sets.iter().flat_map(|s| s.split(',')).map(|n| n.parse().unwrap()).collect();
        assert_eq!(back, uids);
    }

    #[test]
    fn mailbox_names_are_quoted_and_utf7_encoded() {
        assert_eq!(quote_mailbox("INBOX").unwrap(), "\"INBOX\"");
        assert_eq!(quote_mailbox("Print Queue").unwrap(), "\"Print Queue\"");
        assert_eq!(quote_mailbox("a\"b\\c").unwrap(), "\"a\\\"b\\\\c\"");
        assert_eq!(quote_mailbox("R&D").unwrap(), "\"R&-D\"");
        // Examples from RFC 3501 5.1.3 and common folder names.
        assert_eq!(quote_mailbox("~peter/mail/台北/日本語").unwrap(), "\"~peter/mail/&U,BTFw-/&ZeVnLIqe-\"");
        assert_eq!(quote_mailbox("Entwürfe").unwrap(), "\"Entw&APw-rfe\"");
        assert_eq!(quote_mailbox("📬").unwrap(), "\"&2D3c7A-\"");
        assert!(quote_mailbox("a\r\nb").is_err());
        assert!(quote_mailbox("a\0b").is_err());
    }

    #[test]
    fn login_refusals_are_classified() {
        let c = classify_login_refusal;
        assert!(matches!(c("NO [AUTHENTICATIONFAILED] Authentication failed."), BackendError::AuthFailed));
        assert!(matches!(c("NO Invalid credentials"), BackendError::AuthFailed));
        assert!(matches!(c("BAD Error in IMAP command"), BackendError::AuthFailed));
        assert!(matches!(c("NO [UNAVAILABLE] Temporary authentication failure."), BackendError::Unavailable(_)));
        assert!(matches!(c("NO [SERVERBUG] oops"), BackendError::Unavailable(_)));
        assert!(matches!(c("NO [INUSE] Mailbox is locked"), BackendError::InUse(_)));
        assert!(matches!(
            c("NO [UNAVAILABLE] Maximum number of connections from user+IP exceeded (mail_max_userip_connections=10)"),
            BackendError::InUse(_)
        ));
        assert!(matches!(
            c("BYE Maximum number of connections from user+IP exceeded (mail_max_userip_connections=10)"),
            BackendError::InUse(_)
        ));
        assert!(matches!(c("NO [PRIVACYREQUIRED] Plaintext authentication disallowed"), BackendError::Permanent(_)));
    }

    #[test]
    fn command_refusals_are_classified() {
        let c = |bad, text| classify_refusal(bad, text, "test");
        assert!(matches!(c(false, "NO [EXPUNGEISSUED] Some messages were expunged"), BackendError::MessageGone));
        assert!(matches!(c(false, "NO [TRYCREATE] Mailbox doesn't exist: Trash"), BackendError::Permanent(_)));
        assert!(matches!(c(false, "NO [INUSE] locked"), BackendError::InUse(_)));
        assert!(matches!(c(false, "NO [READ-ONLY] Mailbox is read-only"), BackendError::Permanent(_)));
        assert!(matches!(c(false, "NO [NOPERM] Permission denied"), BackendError::Permanent(_)));
        assert!(matches!(c(true, "BAD Error in IMAP command UID: Invalid arguments"), BackendError::Permanent(_)));
        assert!(matches!(c(false, "NO [UNAVAILABLE] try later"), BackendError::Unavailable(_)));
        assert!(matches!(c(false, "NO Internal error occurred"), BackendError::Unavailable(_)));
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("short", 10), "short");
        assert_eq!(truncate("ééé", 3), "é…");
        assert_eq!(truncate("abcdef", 3), "abc…");
    }
}
