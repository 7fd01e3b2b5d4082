//! Pure helpers for the IMAP backend: how things are written on the wire
//! (UID sets, quoted mailbox names, UIDLs) and how server refusals map to
//! `BackendError`. No I/O here, so everything is unit-tested below.

use base64::Engine as _;
use base64::alphabet::IMAP_MUTF7;
use base64::engine::GeneralPurpose;
use base64::engine::general_purpose::NO_PAD;

use std::time::Duration;

use crate::mail::BackendError;

/// How the IMAP backend writes a message's POP3 UIDL from its UID and the
/// mailbox's UIDVALIDITY (`uidl_format`). Users moving to popgate from a
/// server's own POP3 keep their UIDLs only if popgate writes them the same
/// way, or their clients download everything again.
///
/// A preset name or a template in Dovecot's `pop3_uidl_format` syntax, so a
/// Dovecot setting can be copied as it is: `%u` the UID, `%v` the
/// UIDVALIDITY, in decimal, or `%X`/`%x` before the letter for hex
/// (lowercase either way, as Dovecot 2.3 writes it), with an optional
/// zero-padded width (`%08Xu`); `%%` is a `%`. Anything else is copied.
///
/// - `dovecot` = `%08Xu%08Xv`, Dovecot's default (and popgate's).
/// - `cyrus` = `%v.%u`, Cyrus pop3d's default (`uidl_format: cyrus`).
///
/// Every UIDL it can produce is 1–70 printable ASCII characters (RFC 1939)
/// and names the UID, so it is unique within the mailbox.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UidlFormat {
    /// As configured: a preset name or the template.
    spelled: String,
    parts: Vec<UidlPart>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum UidlPart {
    Text(String),
    Number { uidvalidity: bool, hex: bool, width: usize },
}

/// The presets, by name.
pub const UIDL_PRESETS: &[(&str, &str)] = &[("dovecot", "%08Xu%08Xv"), ("cyrus", "%v.%u")];

/// The longest template accepted (its UIDLs are bounded separately).
const MAX_TEMPLATE: usize = 70;
/// The widest zero padding a number may ask for.
const MAX_WIDTH: usize = 20;
/// RFC 1939: a unique-id is 1 to 70 characters in 0x21..=0x7E.
const MAX_UIDL: usize = 70;

impl UidlFormat {
    pub fn parse(spelled: &str) -> Result<UidlFormat, String> {
        let template = UIDL_PRESETS.iter().find(|(name, _)| *name == spelled).map_or(spelled, |(_, t)| t);
        if template.is_empty() || template.len() > MAX_TEMPLATE {
            return Err(format!("must be a preset (dovecot, cyrus) or a template of 1 to {MAX_TEMPLATE} characters"));
        }
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut chars = template.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '%' {
                if !(c.is_ascii_graphic()) {
                    return Err(format!("{c:?} cannot appear in a UIDL (printable ASCII only, no spaces)"));
                }
                text.push(c);
                continue;
            }
            if chars.peek() == Some(&'%') {
                chars.next();
                text.push('%');
                continue;
            }
            let mut digits = String::new();
            while let Some(d) = chars.peek().copied().filter(char::is_ascii_digit) {
                digits.push(d);
                chars.next();
            }
            let width: usize = if digits.is_empty() { 0 } else { digits.parse().map_err(|_| "bad width")? };
            if width > MAX_WIDTH {
                return Err(format!("a width of at most {MAX_WIDTH}"));
            }
            let hex = matches!(chars.peek(), Some('X' | 'x'));
            if hex {
                chars.next();
            }
            let uidvalidity = match chars.next() {
                Some('u') => false,
                Some('v') => true,
                other => {
                    return Err(format!(
                        "only %u (UID) and %v (UIDVALIDITY) are known over IMAP, not %{}",
                        other.map(String::from).unwrap_or_default()
                    ));
                }
            };
            if !text.is_empty() {
                parts.push(UidlPart::Text(std::mem::take(&mut text)));
            }
            parts.push(UidlPart::Number { uidvalidity, hex, width });
        }
        if !text.is_empty() {
            parts.push(UidlPart::Text(text));
        }
        if !parts.iter().any(|p| matches!(p, UidlPart::Number { uidvalidity: false, .. })) {
            return Err("must contain %u: without the UID, UIDLs are not unique".into());
        }
        let format = UidlFormat { spelled: spelled.to_string(), parts };
        let longest = format.render(u32::MAX, u32::MAX).len();
        if longest > MAX_UIDL {
            return Err(format!("makes UIDLs of up to {longest} characters; POP3 allows {MAX_UIDL}"));
        }
        Ok(format)
    }

    /// The UIDL of the message with this UID in a mailbox with this
    /// UIDVALIDITY.
    pub fn render(&self, uid: u32, uidvalidity: u32) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                UidlPart::Text(text) => out.push_str(text),
                UidlPart::Number { uidvalidity: v, hex, width } => {
                    let n = if *v { uidvalidity } else { uid };
                    if *hex {
                        out.push_str(&format!("{n:0width$x}"));
                    } else {
                        out.push_str(&format!("{n:0width$}"));
                    }
                }
            }
        }
        out
    }

    pub fn as_str(&self) -> &str {
        &self.spelled
    }
}

impl Default for UidlFormat {
    fn default() -> Self {
        UidlFormat::parse("dovecot").expect("the dovecot preset parses")
    }
}

impl TryFrom<String> for UidlFormat {
    type Error = String;

    fn try_from(spelled: String) -> Result<Self, String> {
        UidlFormat::parse(&spelled)
    }
}

impl From<UidlFormat> for String {
    fn from(format: UidlFormat) -> String {
        format.spelled
    }
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
    quote_encoded_mailbox(&modified_utf7(name))
}

/// A mailbox name already in its wire form (modified UTF-7, as LIST
/// returns it) as an IMAP quoted string.
pub fn quote_encoded_mailbox(encoded: &str) -> Result<String, BackendError> {
    if encoded.chars().any(|c| c.is_control()) {
        return Err(BackendError::Permanent(format!("mailbox name {encoded:?} contains a control character")));
    }
    Ok(format!("\"{}\"", encoded.replace('\\', "\\\\").replace('"', "\\\"")))
}

/// A mailbox name as it is written on the wire (modified UTF-7).
pub fn encode_mailbox_name(name: &str) -> String {
    modified_utf7(name)
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

/// What a server's refusal means, whatever words it used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meaning {
    /// The credentials were refused: the only meaning that is the user's
    /// fault, and the only one the login throttle counts.
    WrongPassword,
    /// Too many sessions of this account (or from this address) are open.
    TooManyConnections,
    /// Overloaded, throttled or down for a while: try again later.
    Busy,
    /// The server will not take credentials on this connection without TLS.
    TlsRequired,
    /// A configuration problem at the server, with the fix to tell the
    /// operator.
    Misconfigured(&'static str),
    /// Retrying will not help (and it is not about the password).
    Permanent,
    /// Nothing says what it is: treated as temporary, never as a wrong
    /// password.
    Unsure,
}

/// One server's way of saying something without (or beyond) an RFC 5530
/// code: `text` is matched as a case-insensitive substring of the whole
/// refusal, `example` is a whole refusal line as the server sends it, and
/// `source` says where the wording comes from.
pub struct Wording {
    pub server: &'static str,
    pub text: &'static str,
    pub meaning: Meaning,
    /// Read by the tests only: each example must mean `meaning`.
    #[allow(dead_code)]
    pub example: &'static str,
    pub source: &'static str,
}

/// What Exchange Online answers when an app-only (client-credentials)
/// token is valid but the app may not open the mailbox.
pub const EXCHANGE_APP_ONLY_FIX: &str = "Exchange Online accepted the app's token but the app may not open this \
     mailbox: register the app's service principal in Exchange (New-ServicePrincipal) and grant it FullAccess \
     on the mailbox (Add-MailboxPermission)";

/// Known server wordings, in one place. Consulted after the RFC 5530
/// codes; the first entry whose text the refusal contains wins. Every
/// entry's `example` is checked by a test to mean what the entry says.
pub const KNOWN_WORDINGS: &[Wording] = &[
    Wording {
        server: "Dovecot",
        text: "Maximum number of connections",
        meaning: Meaning::TooManyConnections,
        example: "NO [UNAVAILABLE] Maximum number of connections from user+IP exceeded \
                  (mail_max_userip_connections=10)",
        source: "Dovecot 2.3 imap-login, mail_max_userip_connections (tests/imap_dovecot.rs)",
    },
    Wording {
        server: "Cyrus",
        text: "Too many open connections",
        meaning: Meaning::TooManyConnections,
        example: "NO Too many open connections (2 of 2 for alice)",
        source: "Cyrus IMAP 3.6.1 imapd, maxlogins_per_user (tests/imap_cyrus.rs)",
    },
    Wording {
        server: "Gmail",
        text: "Too many simultaneous connections",
        meaning: Meaning::TooManyConnections,
        example: "NO [ALERT] Too many simultaneous connections. (Failure)",
        source: "Gmail IMAP, 15 connections per account (Google Workspace Admin Help \"Gmail bandwidth limits\"; \
                 widely reported by IMAP clients)",
    },
    Wording {
        server: "Gmail",
        text: "Account exceeded command or bandwidth limits",
        meaning: Meaning::Busy,
        example: "NO [ALERT] Account exceeded command or bandwidth limits. (Failure)",
        source: "Gmail IMAP bandwidth limits (Google Workspace Admin Help \"Gmail bandwidth limits\")",
    },
    Wording {
        server: "Exchange Online",
        text: "Request is throttled",
        meaning: Meaning::Busy,
        example: "BAD Request is throttled. Suggested Backoff Time: 2000 milliseconds",
        source: "Exchange Online IMAP throttling (Microsoft Q&A reports of IMAP clients of Microsoft 365)",
    },
    Wording {
        server: "Exchange Online",
        text: "Server Unavailable",
        meaning: Meaning::Busy,
        example: "NO Server Unavailable. 15",
        source: "Exchange Online IMAP when the mailbox server is busy (Microsoft Q&A reports)",
    },
    Wording {
        server: "Exchange Online",
        text: "User is authenticated but not connected",
        meaning: Meaning::Misconfigured(EXCHANGE_APP_ONLY_FIX),
        example: "BAD User is authenticated but not connected.",
        source: "Exchange Online app-only IMAP without a service principal or mailbox permission \
                 (Microsoft Learn \"Authenticate an IMAP, POP or SMTP connection using OAuth\")",
    },
    Wording {
        server: "Cyrus",
        text: "Login only available under a layer",
        meaning: Meaning::TlsRequired,
        example: "NO Login only available under a layer",
        source: "Cyrus IMAP 3.6.1 with allowplaintext: no (tests/imap_cyrus.rs)",
    },
    Wording {
        server: "Cyrus",
        text: "encryption needed to use mechanism",
        meaning: Meaning::TlsRequired,
        example: "NO encryption needed to use mechanism",
        source: "Cyrus IMAP 3.6.1 AUTHENTICATE PLAIN with allowplaintext: no",
    },
    Wording {
        server: "Dovecot",
        text: "Plaintext authentication disallowed",
        meaning: Meaning::TlsRequired,
        example: "NO Plaintext authentication disallowed on non-secure (SSL/TLS) connections.",
        source: "Dovecot 2.3 with disable_plaintext_auth = yes (also sent with [PRIVACYREQUIRED])",
    },
    Wording {
        server: "Dovecot",
        text: "Temporary authentication failure",
        meaning: Meaning::Busy,
        example: "NO [UNAVAILABLE] Temporary authentication failure. [mail:2024-01-01 12:00:00]",
        source: "Dovecot 2.3 when its auth backend fails (before the Cyrus wording below, which it contains)",
    },
    Wording {
        server: "Cyrus",
        text: "authentication failure",
        meaning: Meaning::WrongPassword,
        example: "NO Login failed: authentication failure",
        source: "Cyrus IMAP 3.6.1, wrong password (LOGIN; AUTHENTICATE says \"NO authentication failure\")",
    },
    Wording {
        server: "Exchange Online",
        text: "LOGIN failed",
        meaning: Meaning::WrongPassword,
        example: "NO LOGIN failed.",
        source: "Exchange / Exchange Online IMAP, wrong password",
    },
    Wording {
        server: "Exchange Online",
        text: "AUTHENTICATE failed",
        meaning: Meaning::WrongPassword,
        example: "NO AUTHENTICATE failed.",
        source: "Exchange Online IMAP, refused OAuth token or password",
    },
    Wording {
        server: "many",
        text: "Invalid credentials",
        meaning: Meaning::WrongPassword,
        example: "NO Invalid credentials",
        source: "Gmail and Yahoo word it so (with [AUTHENTICATIONFAILED]); some servers without the code",
    },
    Wording {
        server: "many",
        text: "Authentication failed",
        meaning: Meaning::WrongPassword,
        example: "NO Authentication failed.",
        source: "Dovecot's wording (with [AUTHENTICATIONFAILED]); servers without RFC 5530 codes",
    },
];

/// A refusal read: what it means, and how long the server asked us to wait
/// before the next try (Exchange's "Suggested Backoff Time").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub meaning: Meaning,
    pub backoff: Option<Duration>,
}

/// The longest backoff a server's text can impose: a bigger number is
/// taken as this, so a garbled reply cannot lock an account out for days.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// The response code of a refusal, upper-cased: the first `[CODE]` or
/// `[CODE args]` in it. Refusals reach here as `conn::describe` writes
/// them (`NO [CODE] text`) or as async-imap formats a failed login
/// (`code: None, info: Some("[CODE] text")`); either way the code comes
/// first.
fn response_code(text: &str) -> Option<String> {
    let inner = &text[text.find('[')? + 1..];
    let end = inner.find([']', ' '])?;
    Some(inner[..end].to_ascii_uppercase())
}

/// The first known wording `text` contains.
pub fn known_wording(text: &str) -> Option<&'static Wording> {
    let upper = text.to_ascii_uppercase();
    KNOWN_WORDINGS.iter().find(|w| upper.contains(&w.text.to_ascii_uppercase()))
}

/// "Suggested Backoff Time: N milliseconds" (Exchange Online), capped at
/// `MAX_BACKOFF`.
pub fn suggested_backoff(text: &str) -> Option<Duration> {
    let upper = text.to_ascii_uppercase();
    let at = upper.find("SUGGESTED BACKOFF TIME:")? + "SUGGESTED BACKOFF TIME:".len();
    let rest = upper[at..].trim_start();
    let digits: String = rest.chars().take_while(char::is_ascii_digit).take(12).collect();
    let number: u64 = digits.parse().ok()?;
    let unit = rest[digits.len()..].trim_start();
    let wait = if unit.starts_with("MILLISECOND") || unit.starts_with("MS") {
        Duration::from_millis(number)
    } else if unit.starts_with("SECOND") {
        Duration::from_secs(number)
    } else {
        // Exchange writes milliseconds; a bare number is read as such.
        Duration::from_millis(number)
    };
    Some(wait.min(MAX_BACKOFF))
}

/// What a refusal means: RFC 5530 codes first, then `KNOWN_WORDINGS`.
/// A code for "temporary" is only refined by a wording for "too many
/// connections" (Dovecot says `[UNAVAILABLE] Maximum number of
/// connections`, and `[UNAVAILABLE] Temporary authentication failure` must
/// not read as a wrong password).
pub fn read_refusal(text: &str) -> Refusal {
    let backoff = suggested_backoff(text);
    let wording = known_wording(text).map(|w| w.meaning);
    let meaning = match response_code(text).as_deref() {
        Some("AUTHENTICATIONFAILED" | "AUTHORIZATIONFAILED" | "EXPIRED") => Meaning::WrongPassword,
        Some("PRIVACYREQUIRED") => Meaning::TlsRequired,
        Some("INUSE") => Meaning::TooManyConnections,
        Some("UNAVAILABLE" | "SERVERBUG" | "LIMIT") => match wording {
            Some(Meaning::TooManyConnections) => Meaning::TooManyConnections,
            _ => Meaning::Busy,
        },
        Some("CONTACTADMIN" | "NOPERM" | "CANNOT") => Meaning::Permanent,
        _ => wording.unwrap_or(Meaning::Unsure),
    };
    Refusal { meaning, backoff }
}

/// The sentence logged when a server wants TLS before credentials.
pub const TLS_REQUIRED: &str = "the server requires TLS: use imap+starttls:// or imaps://";

/// What a refused LOGIN/AUTHENTICATE (or a BYE instead of a greeting)
/// means for the session. `text` is the whole refusal (status, response
/// code and text). Only a refusal about the password is `AuthFailed`:
/// anything unsure is temporary, so that a busy or oddly worded server
/// never costs the user a throttle penalty or a "wrong password".
pub fn classify_login_refusal(text: &str) -> BackendError {
    let reason = truncate(text, 200);
    if let Some(wording) = known_wording(text) {
        tracing::debug!(server = wording.server, source = wording.source, "login refusal in a known server wording");
    }
    match read_refusal(text).meaning {
        Meaning::WrongPassword => BackendError::AuthFailed,
        Meaning::TooManyConnections => BackendError::InUse(reason),
        Meaning::Busy | Meaning::Unsure => BackendError::Unavailable(format!("login: {reason}")),
        Meaning::TlsRequired => BackendError::Permanent(format!("{TLS_REQUIRED} ({reason})")),
        Meaning::Misconfigured(fix) => BackendError::Permanent(format!("{fix} ({reason})")),
        Meaning::Permanent => BackendError::Permanent(format!("login: {reason}")),
    }
}

/// What a NO or BAD to a command in the authenticated or selected state
/// means.
pub fn classify_refusal(bad: bool, text: &str, what: &str) -> BackendError {
    let reason = format!("{what}: {}", truncate(text, 200));
    match response_code(text).as_deref() {
        Some("EXPUNGEISSUED") => return BackendError::MessageGone,
        Some("READ-ONLY" | "OVERQUOTA" | "NONEXISTENT" | "TRYCREATE") => return BackendError::Permanent(reason),
        _ => {}
    }
    match read_refusal(text).meaning {
        Meaning::TooManyConnections => BackendError::InUse(reason),
        Meaning::Busy => BackendError::Unavailable(reason),
        Meaning::Misconfigured(fix) => BackendError::Permanent(format!("{fix} ({reason})")),
        Meaning::TlsRequired | Meaning::Permanent => BackendError::Permanent(reason),
        // BAD: the server did not understand us; retrying will not help.
        Meaning::WrongPassword | Meaning::Unsure if bad => BackendError::Permanent(reason),
        // A plain NO: assume transient.
        Meaning::WrongPassword | Meaning::Unsure => BackendError::Unavailable(reason),
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

    fn uidl(uid: u32, uidvalidity: u32) -> String {
        UidlFormat::default().render(uid, uidvalidity)
    }

    #[test]
    fn uidl_matches_dovecot_default_format() {
        assert_eq!(uidl(1, 1), "0000000100000001");
        // Dovecot 2.3.19's own POP3 UIDL for UID 1 in a mailbox with
        // UIDVALIDITY 1795751073.
        assert_eq!(uidl(1, 1_795_751_073), "000000016b08fca1");
        assert_eq!(uidl(0x1A2B, 1_700_000_000), "00001a2b6553f100");
        assert_eq!(uidl(u32::MAX, u32::MAX), "ffffffffffffffff");
        assert!(uidl(7, 9).bytes().all(|b| (0x21..=0x7E).contains(&b)));
        assert_eq!(UidlFormat::parse("%08Xu%08Xv").unwrap().render(1, 1_795_751_073), "000000016b08fca1");
    }

    #[test]
    fn uidl_presets_and_templates() {
        let render = |spelled: &str, uid, uidvalidity| UidlFormat::parse(spelled).unwrap().render(uid, uidvalidity);
        // Cyrus 3.6.1's pop3d: "1796306087.1" for UID 1.
        assert_eq!(render("cyrus", 1, 1_796_306_087), "1796306087.1");
        assert_eq!(render("%u", 42, 7), "42");
        assert_eq!(render("%v-%u", 42, 7), "7-42");
        assert_eq!(render("%xv.%06u", 42, 255), "ff.000042");
        assert_eq!(render("a%%b%Xu", 255, 1), "a%bff");
        assert_eq!(UidlFormat::parse("cyrus").unwrap().as_str(), "cyrus");
        assert_eq!(String::from(UidlFormat::parse("%u").unwrap()), "%u");
    }

    #[test]
    fn uidl_templates_are_bounded() {
        for bad in ["", "%v", "plain", "%m", "%g%u", "a b%u", "%u\u{e9}", "%21u", "%%u", "%u%"] {
            assert!(UidlFormat::parse(bad).is_err(), "{bad:?} was accepted");
        }
        // 70 characters at most, for the largest UID and UIDVALIDITY.
        assert!(UidlFormat::parse(&format!("{}%u", "x".repeat(60))).is_ok());
        assert!(UidlFormat::parse(&format!("{}%u", "x".repeat(61))).is_err());
        assert!(UidlFormat::parse("%20u%20v%20u%20v").is_err());
        assert!(UidlFormat::parse(&"%u".repeat(36)).is_err());
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
    fn every_known_wording_means_what_its_entry_says() {
        for wording in KNOWN_WORDINGS {
            assert_eq!(
                read_refusal(wording.example).meaning,
                wording.meaning,
                "{}: {}",
                wording.server,
                wording.example
            );
            // And as async-imap formats a refused login.
            let (status, rest) = wording.example.split_once(' ').unwrap();
            let formatted = format!("code: None, info: Some({rest:?})");
            assert!(matches!(status, "NO" | "BAD"));
            assert_eq!(read_refusal(&formatted).meaning, wording.meaning, "{formatted}");
            assert!(!wording.source.is_empty());
        }
    }

    #[test]
    fn login_refusals_are_classified() {
        let c = classify_login_refusal;
        assert!(matches!(c("NO [AUTHENTICATIONFAILED] Authentication failed."), BackendError::AuthFailed));
        assert!(matches!(c("NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)"), BackendError::AuthFailed));
        assert!(matches!(c("NO Login failed: authentication failure"), BackendError::AuthFailed));
        // Not about the password: never AuthFailed.
        assert!(matches!(c("BAD Error in IMAP command"), BackendError::Unavailable(_)));
        assert!(matches!(c("NO Something nobody has seen before"), BackendError::Unavailable(_)));
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
        assert!(matches!(c("NO Too many open connections (2 of 2 for alice)"), BackendError::InUse(_)));
        assert!(matches!(
            c("code: Some(Alert), info: Some(\"Too many simultaneous connections. (Failure)\")"),
            BackendError::InUse(_)
        ));
        assert!(matches!(
            c("NO [ALERT] Account exceeded command or bandwidth limits. (Failure)"),
            BackendError::Unavailable(_)
        ));
        assert!(matches!(
            c("BAD Request is throttled. Suggested Backoff Time: 2000 milliseconds"),
            BackendError::Unavailable(_)
        ));
        assert!(matches!(c("NO Server Unavailable. 15"), BackendError::Unavailable(_)));
        assert!(matches!(
            c("NO [PRIVACYREQUIRED] Plaintext authentication disallowed"),
            BackendError::Permanent(why) if why.contains(TLS_REQUIRED)
        ));
        assert!(matches!(
            c("NO Login only available under a layer"),
            BackendError::Permanent(why) if why.contains(TLS_REQUIRED)
        ));
        assert!(matches!(
            c("BAD User is authenticated but not connected."),
            BackendError::Permanent(why) if why.contains("Add-MailboxPermission")
        ));
    }

    #[test]
    fn suggested_backoff_is_read_and_capped() {
        let s = suggested_backoff;
        assert_eq!(
            s("BAD Request is throttled. Suggested Backoff Time: 2000 milliseconds"),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            s("code: None, info: Some(\"Request is throttled. Suggested Backoff Time: 250 milliseconds\")"),
            Some(Duration::from_millis(250))
        );
        assert_eq!(s("NO Suggested Backoff Time: 3 seconds"), Some(Duration::from_secs(3)));
        assert_eq!(s("BAD Request is throttled. Suggested Backoff Time: 99999999999 milliseconds"), Some(MAX_BACKOFF));
        assert_eq!(s("NO Server Unavailable. 15"), None);
        assert_eq!(s("BAD Request is throttled. Suggested Backoff Time: soon"), None);
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
        // Exchange's throttle is a BAD, but temporary.
        assert!(matches!(
            c(true, "BAD Request is throttled. Suggested Backoff Time: 2000 milliseconds"),
            BackendError::Unavailable(_)
        ));
        assert!(matches!(
            c(true, "BAD User is authenticated but not connected."),
            BackendError::Permanent(why) if why.contains("New-ServicePrincipal")
        ));
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("short", 10), "short");
        assert_eq!(truncate("ééé", 3), "é…");
        assert_eq!(truncate("abcdef", 3), "abc…");
    }
}
