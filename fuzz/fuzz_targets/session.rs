//! The session state machine, driven like the server drives it, against a
//! small model mailbox.
//!
//! Input: a 32-octet header decoded with `arbitrary` (mechanisms offered,
//! login policy, the maildrop's messages, the outcome of each login, fetch
//! and UPDATE, chunk sizes), then a client script of lines. In the script,
//! `{…}` stands for the base64 of its content, where `%XX` is an octet, so
//! SASL responses (PLAIN, LOGIN, XOAUTH2, OAUTHBEARER) stay readable and
//! mutable: `AUTH PLAIN {%00alice%00s3cr3t}`. The script is cut into chunks
//! of the header's sizes and framed by `LineReader` with the session's limit.
//!
//! Checked, besides "no panic": every reply is a well-formed POP3 line; no
//! credential with NUL, CR or LF reaches a login; STAT and LIST sizes equal
//! the octets RETR sends; TOP sends a prefix of RETR; DELE and RSET change
//! exactly what the model says; the ids of an UPDATE are exactly the marked
//! set, only ever after QUIT in TRANSACTION; nothing is removed otherwise.
#![no_main]

use std::collections::BTreeSet;

use arbitrary::{Arbitrary, Unstructured};
use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use popgate::canonical::{canonical_size, canonicalize};
use popgate::mail::{BackendError, Credentials, Proof, StoreId};
use popgate::pop3::sasl::Mechanism;
use popgate::pop3::{Line, LineReader, Maildrop, Message, Response, Session, SessionConfig, Step};

const HEADER: usize = 32;

/// Messages the maildrop is made of: dot lines, bare LF and CR, no final
/// line end, no body, empty.
const MESSAGES: &[&[u8]] = &[
    b"From: a\r\nSubject: one\r\n\r\nbody one\r\n",
    b"From: b\nSubject: two\n\n.dot line\nsecond\n",
    b"Subject: three\r\n\r\nx",
    b"",
    b"Subject: four\r\rno LF\r.\r..\r",
    b"Only: header",
    b"A: b\r\n\r\n\r\n.\r\n\r\nlast",
];

#[derive(Arbitrary, Debug)]
struct Settings {
    /// Bit i offers `Mechanism::ALL[i]`; none set offers all four.
    mechanisms: u8,
    login_permitted: bool,
    stls_offered: bool,
    tls_login_permitted: bool,
    max_failed_logins: u8,
    /// Indices into `MESSAGES` (modulo), one per maildrop message.
    messages: [u8; 5],
    message_count: u8,
    /// One per login, cycled: 0-3 succeed, then AuthFailed, Unavailable,
    /// InUse, BadCredentials.
    logins: [u8; 4],
    /// Bit i: the i-th fetch (mod 8) fails before anything is sent.
    fetch_failures: u8,
    update_fails: bool,
    /// Chunk sizes for the script, cycled; 0 stands for 1024.
    chunks: [u8; 4],
    /// Chunk size for the message octets fed to the encoder.
    body_chunk: u8,
}

/// `{…}` becomes base64 of its content; `%XX` inside is an octet.
fn expand(script: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(script.len());
    let mut rest = script;
    while let Some(open) = rest.iter().position(|&b| b == b'{') {
        let Some(len) = rest[open..].iter().position(|&b| b == b'}') else { break };
        out.extend_from_slice(&rest[..open]);
        let inner = &rest[open + 1..open + len];
        let mut raw = Vec::new();
        let mut i = 0;
        while i < inner.len() {
            let hex = inner.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            match (inner[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
                (b'%', Some(b)) => {
                    raw.push(b);
                    i += 3;
                }
                (b, _) => {
                    raw.push(b);
                    i += 1;
                }
            }
        }
        out.extend_from_slice(base64::engine::general_purpose::STANDARD.encode(&raw).as_bytes());
        rest = &rest[open + len + 1..];
    }
    out.extend_from_slice(rest);
    out
}

struct Harness {
    session: Session,
    settings: Settings,
    /// The maildrop's contents, by message number - 1.
    contents: Vec<&'static [u8]>,
    /// The model: logged in, and the message numbers marked.
    logged_in: bool,
    marked: BTreeSet<usize>,
    logins: usize,
    fetches: usize,
    removed: Vec<StoreId>,
    closed: bool,
}

fn keyword(line: &[u8]) -> String {
    let end = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    String::from_utf8_lossy(&line[..end]).to_ascii_uppercase()
}

fn check_reply(r: &Response) -> String {
    let bytes = r.to_bytes();
    assert!(bytes.starts_with(b"+OK") || bytes.starts_with(b"-ERR") || bytes.starts_with(b"+ "), "{bytes:?}");
    let first = bytes.windows(2).position(|w| w == b"\r\n").expect("a CRLF");
    assert!(!bytes[..first].contains(&b'\r') && !bytes[..first].contains(&b'\n'));
    if r.body.is_some() {
        assert!(bytes.ends_with(b"\r\n.\r\n"));
    } else {
        assert_eq!(first + 2, bytes.len());
    }
    String::from_utf8(bytes).expect("our replies are UTF-8")
}

impl Harness {
    fn stat(&self) -> (usize, u64) {
        let visible = (0..self.contents.len()).filter(|i| !self.marked.contains(i));
        let octets = visible.clone().map(|i| canonical_size(self.contents[i])).sum();
        (visible.count(), octets)
    }

    fn maildrop(&self) -> Maildrop {
        Maildrop::new(
            self.contents
                .iter()
                .enumerate()
                .map(|(i, m)| Message { id: StoreId(format!("m{i}")), uidl: format!("u{i}"), size: canonical_size(m) })
                .collect(),
        )
    }

    /// Performs one step for the line `line`; false once the session ended.
    fn perform(&mut self, line: &[u8], step: Step) -> bool {
        let kw = keyword(line);
        match step {
            Step::Reply(r) => {
                let text = check_reply(&r);
                if r.is_ok() && self.logged_in {
                    self.check_transaction_reply(&kw, line, &r, &text);
                }
                true
            }
            Step::Close(r) => {
                check_reply(&r);
                if self.logged_in && kw == "QUIT" && r.is_ok() {
                    assert!(self.marked.is_empty(), "QUIT closed without UPDATE while messages were marked");
                }
                self.closed = true;
                false
            }
            Step::Login(credentials) => self.login(line, credentials),
            Step::Send { id, ok, mut encoder, expected_octets } => {
                assert!(self.logged_in && (kw == "RETR" || kw == "TOP"), "a fetch for {kw}");
                let i: usize = id.0[1..].parse().expect("our id");
                assert!(!self.marked.contains(&i), "a marked message was sent");
                let failed = self.settings.fetch_failures >> (self.fetches % 8) & 1 == 1;
                self.fetches += 1;
                if failed {
                    let step = self.session.fetch_failed(&BackendError::unavailable("fuzz"));
                    assert!(matches!(&step, Step::Reply(r) if !r.is_ok()));
                    return self.perform(line, step);
                }
                check_reply(&ok);
                let message = self.contents[i];
                let mut wire = Vec::new();
                for piece in message.chunks(usize::from(self.settings.body_chunk).max(1)) {
                    encoder.push(piece, &mut wire);
                    if encoder.is_done() {
                        break;
                    }
                }
                encoder.finish(&mut wire);
                let decoded = popgate::canonical::reference::client_decode(&wire);
                let whole = canonicalize(message);
                if kw == "RETR" {
                    assert_eq!(expected_octets, Some(canonical_size(message)));
                    assert_eq!(ok.text, format!("{} octets", whole.len()));
                    assert_eq!(encoder.octets(), whole.len() as u64);
                    assert_eq!(decoded, whole);
                } else {
                    assert!(whole.starts_with(&decoded), "TOP is no prefix of RETR");
                }
                true
            }
            Step::Update(ids) => {
                assert!(self.logged_in && kw == "QUIT", "UPDATE after {kw}");
                let want: Vec<StoreId> = self.marked.iter().map(|i| StoreId(format!("m{i}"))).collect();
                assert!(!ids.is_empty());
                assert_eq!(ids, want, "UPDATE ids differ from the marked set");
                let reply = if self.settings.update_fails {
                    self.session.update_finished(Err(BackendError::unavailable("fuzz")))
                } else {
                    self.removed.extend(ids.iter().cloned());
                    self.session.update_finished(Ok(ids.len()))
                };
                check_reply(&reply);
                assert_eq!(reply.is_ok(), !self.settings.update_fails);
                self.closed = true;
                false
            }
            Step::StartTls(r) => {
                assert!(r.is_ok() && kw == "STLS" && !self.logged_in);
                self.session.tls_started(self.settings.tls_login_permitted);
                true
            }
        }
    }

    fn login(&mut self, line: &[u8], credentials: Credentials) -> bool {
        assert!(!self.logged_in);
        let forbidden = |s: &str| s.bytes().any(|b| matches!(b, 0 | b'\r' | b'\n'));
        assert!(!credentials.user.is_empty() && !forbidden(&credentials.user), "a user name got through");
        match &credentials.proof {
            Proof::Password(p) => assert!(!forbidden(p.expose()), "a password got through"),
            Proof::Bearer(t) => assert!(!forbidden(t.expose()) && !t.expose().contains('\x01'), "a token got through"),
        }
        let outcome = self.settings.logins[self.logins % 4] % 8;
        self.logins += 1;
        let step = match outcome {
            0..=3 => {
                self.logged_in = true;
                self.marked.clear();
                let step = self.session.login_succeeded(self.maildrop());
                let (count, octets) = self.stat();
                let Step::Reply(r) = step else { panic!("{step:?} after a login") };
                check_reply(&r);
                assert_eq!(r.text, format!("maildrop has {count} messages ({octets} octets)"));
                return true;
            }
            4 => self.session.login_failed(&BackendError::AuthFailed),
            5 => self.session.login_failed(&BackendError::unavailable("fuzz")),
            6 => self.session.login_failed(&BackendError::InUse("fuzz".into())),
            _ => self.session.login_failed(&BackendError::BadCredentials("fuzz")),
        };
        self.perform(line, step)
    }

    /// A +OK in TRANSACTION agrees with the model.
    fn check_transaction_reply(&mut self, kw: &str, line: &[u8], r: &Response, text: &str) {
        let (count, octets) = self.stat();
        let has_argument = line.len() > kw.len() && line[kw.len()..].iter().any(|&b| b != b' ');
        let size_of = |n: usize| canonical_size(self.contents[n - 1]);
        match kw {
            "STAT" => assert_eq!(r.text, format!("{count} {octets}")),
            "LIST" if !has_argument => {
                assert_eq!(r.text, format!("{count} messages ({octets} octets)"));
                let body = r.body.as_ref().expect("a listing");
                assert_eq!(body.len(), count);
                for entry in body {
                    let (n, size) = entry.split_once(' ').expect("n size");
                    let n: usize = n.parse().expect("a number");
                    assert!(!self.marked.contains(&(n - 1)), "LIST shows a marked message");
                    assert_eq!(size.parse::<u64>().ok(), Some(size_of(n)), "LIST size differs from RETR octets");
                }
            }
            "LIST" => {
                let (n, size) = r.text.split_once(' ').expect("n size");
                let n: usize = n.parse().expect("a number");
                assert!(n >= 1 && n <= self.contents.len() && !self.marked.contains(&(n - 1)));
                assert_eq!(size.parse::<u64>().ok(), Some(size_of(n)), "LIST size differs from RETR octets");
            }
            "DELE" => {
                let n: usize = r
                    .text
                    .strip_prefix("message ")
                    .and_then(|t| t.strip_suffix(" deleted"))
                    .and_then(|n| n.parse().ok())
                    .expect("message N deleted");
                assert!(n >= 1 && n <= self.contents.len(), "DELE of a message that does not exist");
                assert!(self.marked.insert(n - 1), "DELE of a message already marked");
            }
            "RSET" => {
                self.marked.clear();
                let (count, octets) = self.stat();
                assert_eq!(r.text, format!("maildrop has {count} messages ({octets} octets)"));
            }
            "NOOP" | "UIDL" | "CAPA" => {}
            other => panic!("+OK {text:?} to {other}"),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut header = [0u8; HEADER];
    let n = data.len().min(HEADER);
    header[..n].copy_from_slice(&data[..n]);
    let Ok(settings) = Settings::arbitrary(&mut Unstructured::new(&header)) else { return };
    let script = expand(&data[n..]);

    let mechanisms: Vec<Mechanism> =
        Mechanism::ALL.iter().enumerate().filter(|(i, _)| settings.mechanisms >> i & 1 == 1).map(|(_, m)| *m).collect();
    let config = SessionConfig {
        mechanisms: if mechanisms.is_empty() { Mechanism::ALL.to_vec() } else { mechanisms },
        login_permitted: settings.login_permitted,
        stls_offered: settings.stls_offered,
        max_failed_logins: u32::from(settings.max_failed_logins % 5) + 1,
        ..SessionConfig::default()
    };
    let contents: Vec<&'static [u8]> = settings.messages[..usize::from(settings.message_count % 6)]
        .iter()
        .map(|&i| MESSAGES[usize::from(i) % MESSAGES.len()])
        .collect();
    let chunks = settings.chunks;
    let mut h = Harness {
        session: Session::new(config),
        settings,
        contents,
        logged_in: false,
        marked: BTreeSet::new(),
        logins: 0,
        fetches: 0,
        removed: Vec::new(),
        closed: false,
    };
    check_reply(&h.session.greeting());

    let mut reader = LineReader::new();
    let mut rest = &script[..];
    let mut k = 0;
    'feed: while !rest.is_empty() {
        let size = match chunks[k % chunks.len()] {
            0 => 1024,
            c => usize::from(c),
        };
        k += 1;
        let (piece, after) = rest.split_at(size.min(rest.len()));
        rest = after;
        reader.push(piece);
        while let Some(line) = reader.next_line(h.session.line_limit()) {
            let bytes = match &line {
                Line::Complete(l) => l.clone(),
                Line::TooLong => Vec::new(),
            };
            let step = h.session.on_line(line);
            let tls = matches!(step, Step::StartTls(_));
            if !h.perform(&bytes, step) {
                break 'feed;
            }
            if tls {
                // As the server does: plaintext pipelined before the
                // handshake is never read as commands.
                reader.clear();
            }
        }
    }
    if !h.closed {
        // The connection drops: nothing is removed.
        assert!(h.removed.is_empty());
    }
    if h.settings.update_fails {
        assert!(h.removed.is_empty());
    }
});
