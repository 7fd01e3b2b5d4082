//! A raw, blocking IMAP client: seeds mailboxes with exact octets (APPEND
//! with a literal, so bare LF, bare CR and 8-bit text arrive unchanged) and
//! inspects them the way another mail client would. Independent of popgate's
//! IMAP backend, so it can judge it.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use super::IO_TIMEOUT;

/// One server response: its text with every literal cut out (`{n}` stays in
/// the text), and the literals in order.
#[derive(Debug, Default)]
pub struct Response {
    pub text: String,
    pub literals: Vec<Vec<u8>>,
}

/// A tagged command's result.
#[derive(Debug)]
pub struct Reply {
    pub untagged: Vec<Response>,
    /// The tagged status line without the tag: "OK …", "NO …" or "BAD …".
    pub status: String,
}

impl Reply {
    pub fn is_ok(&self) -> bool {
        self.status.starts_with("OK")
    }
}

/// What a mailbox holds, as UID and flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub uid: u32,
    pub flags: Vec<String>,
}

impl Stored {
    pub fn is_deleted(&self) -> bool {
        self.flags.iter().any(|f| f.eq_ignore_ascii_case("\\Deleted"))
    }
}

pub struct Imap {
    reader: BufReader<TcpStream>,
    next_tag: u32,
    pub greeting: String,
}

impl Imap {
    pub fn connect(addr: SocketAddr) -> Imap {
        let stream =
            TcpStream::connect_timeout(&addr, IO_TIMEOUT).unwrap_or_else(|e| panic!("IMAP connect to {addr}: {e}"));
        stream.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
        stream.set_write_timeout(Some(IO_TIMEOUT)).expect("write timeout");
        let mut imap =
            Imap { reader: BufReader::with_capacity(256 * 1024, stream), next_tag: 1, greeting: String::new() };
        let greeting = imap.read_response().expect("IMAP greeting");
        assert!(greeting.text.starts_with("* OK"), "IMAP greeting: {:?}", greeting.text);
        imap.greeting = greeting.text;
        imap
    }

    /// Connects and logs in with AUTHENTICATE PLAIN (base64: no quoting
    /// rules to get wrong whatever the password holds).
    pub fn login(addr: SocketAddr, user: &str, password: &str) -> Imap {
        let mut imap = Imap::connect(addr);
        let response = STANDARD.encode(format!("\0{user}\0{password}"));
        let reply = imap.command(&format!("AUTHENTICATE PLAIN {response}"));
        assert!(reply.is_ok(), "IMAP login of {user}: {}", reply.status);
        imap
    }

    /// Sends a command and reads everything up to its tagged reply.
    pub fn command(&mut self, command: &str) -> Reply {
        let tag = self.tag();
        self.write(format!("{tag} {command}\r\n").as_bytes());
        self.read_reply(&tag)
    }

    /// Like `command`, but the reply must be OK.
    pub fn ok(&mut self, command: &str) -> Reply {
        let reply = self.command(command);
        assert!(reply.is_ok(), "IMAP {command:?} → {}", reply.status);
        reply
    }

    /// SELECT; returns UIDVALIDITY.
    pub fn select(&mut self, mailbox: &str) -> u32 {
        let reply = self.ok(&format!("SELECT {}", quote(mailbox)));
        reply
            .untagged
            .iter()
            .find_map(|r| number_after(&r.text, "[UIDVALIDITY "))
            .expect("UIDVALIDITY in the SELECT reply")
    }

    /// APPENDs exactly these octets; returns the new message's UID.
    pub fn append(&mut self, mailbox: &str, flags: &str, content: &[u8]) -> u32 {
        let tag = self.tag();
        self.write(format!("{tag} APPEND {} ({flags}) {{{}}}\r\n", quote(mailbox), content.len()).as_bytes());
        let go_ahead = self.read_response().expect("APPEND continuation");
        assert!(go_ahead.text.starts_with('+'), "APPEND refused: {:?}", go_ahead.text);
        self.write(content);
        self.write(b"\r\n");
        let reply = self.read_reply(&tag);
        assert!(reply.is_ok(), "APPEND of {} octets → {}", content.len(), reply.status);
        // [APPENDUID uidvalidity uid]
        let appended = reply.status.split("[APPENDUID ").nth(1);
        appended
            .and_then(|rest| rest.split([' ', ']']).nth(1)?.parse().ok())
            .unwrap_or_else(|| panic!("no APPENDUID in {:?}", reply.status))
    }

    /// Every message of the selected mailbox with its flags, by UID.
    pub fn messages(&mut self) -> Vec<Stored> {
        let reply = self.ok("UID FETCH 1:* (UID FLAGS)");
        let mut stored: Vec<Stored> = reply
            .untagged
            .iter()
            .filter(|r| r.text.contains(" FETCH ("))
            .map(|r| {
                let uid = number_after(&r.text, "UID ").unwrap_or_else(|| panic!("UID in {:?}", r.text));
                let flags = r
                    .text
                    .split("FLAGS (")
                    .nth(1)
                    .and_then(|rest| rest.split(')').next())
                    .unwrap_or_else(|| panic!("FLAGS in {:?}", r.text))
                    .split_whitespace()
                    .map(str::to_string)
                    .collect();
                Stored { uid, flags }
            })
            .collect();
        stored.sort_by_key(|s| s.uid);
        stored.dedup_by_key(|s| s.uid);
        stored
    }

    /// The stored octets of a message of the selected mailbox.
    pub fn fetch(&mut self, uid: u32) -> Vec<u8> {
        let reply = self.ok(&format!("UID FETCH {uid} BODY.PEEK[]"));
        let mut bodies = reply.untagged.into_iter().filter(|r| r.text.contains("BODY[]")).map(|r| r.literals);
        let literals = bodies.next().unwrap_or_else(|| panic!("no BODY[] for UID {uid}"));
        literals.into_iter().next().expect("BODY[] literal")
    }

    /// Flags a message \Deleted without expunging it.
    pub fn flag_deleted(&mut self, uid: u32) {
        self.ok(&format!("UID STORE {uid} +FLAGS.SILENT (\\Deleted)"));
    }

    pub fn logout(mut self) {
        let _ = self.command("LOGOUT");
    }

    fn tag(&mut self) -> String {
        let tag = format!("T{}", self.next_tag);
        self.next_tag += 1;
        tag
    }

    fn write(&mut self, bytes: &[u8]) {
        self.reader.get_mut().write_all(bytes).unwrap_or_else(|e| panic!("IMAP write: {e}"));
    }

    fn read_reply(&mut self, tag: &str) -> Reply {
        let mut untagged = Vec::new();
        loop {
            let response = self.read_response().unwrap_or_else(|| panic!("IMAP server closed before {tag} completed"));
            if let Some(status) = response.text.strip_prefix(&format!("{tag} ")) {
                return Reply { untagged, status: status.to_string() };
            }
            untagged.push(response);
        }
    }

    /// One response, literals included; `None` at end of stream.
    fn read_response(&mut self) -> Option<Response> {
        let mut response = Response::default();
        loop {
            let mut line = Vec::new();
            match self.reader.read_until(b'\n', &mut line) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    panic!("no IMAP response within {IO_TIMEOUT:?}")
                }
                Err(e) => panic!("IMAP read: {e}"),
            }
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches(['\r', '\n']);
            response.text.push_str(text);
            // A line ending in {n} announces n octets of literal, after which
            // the same response goes on.
            let literal = text
                .strip_suffix('}')
                .and_then(|t| t.rsplit_once('{'))
                .and_then(|(_, n)| n.trim_end_matches('+').parse::<usize>().ok());
            match literal {
                Some(n) => {
                    let mut bytes = vec![0; n];
                    self.reader.read_exact(&mut bytes).unwrap_or_else(|e| panic!("IMAP literal of {n} octets: {e}"));
                    response.literals.push(bytes);
                }
                None => return Some(response),
            }
        }
    }
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn number_after(text: &str, marker: &str) -> Option<u32> {
    let rest = &text[text.find(marker)? + marker.len()..];
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}
