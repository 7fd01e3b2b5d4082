//! A small blocking POP3 client for tests.
//!
//! It is strict where a real client would be: every server line must end in
//! CRLF, multi-line bodies are un-stuffed exactly as RFC 1939 says, and no
//! read waits longer than `IO_TIMEOUT` (a hang is a failure, not a stuck
//! test run).

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use super::IO_TIMEOUT;

/// Command and status line, the part of a POP3 dialogue every test client
/// (this one, and `support::tls::Client` over TLS) has in common.
pub trait Dialogue {
    /// Writes a command line (CRLF appended).
    fn send(&mut self, line: &str);
    /// The next line, CRLF removed.
    fn line(&mut self) -> String;

    /// Sends a command and returns its status line.
    fn cmd(&mut self, line: &str) -> String {
        self.send(line);
        self.line()
    }

    /// Sends a command that must succeed; returns the status line.
    fn ok(&mut self, line: &str) -> String {
        let reply = self.cmd(line);
        assert!(reply.starts_with("+OK"), "{line:?} → {reply:?}");
        reply
    }

    /// Sends a command that must fail; returns the status line.
    fn err(&mut self, line: &str) -> String {
        let reply = self.cmd(line);
        assert!(reply.starts_with("-ERR"), "{line:?} → {reply:?} (expected -ERR)");
        reply
    }
}

impl Dialogue for Pop3 {
    fn send(&mut self, line: &str) {
        Pop3::send(self, line)
    }

    fn line(&mut self) -> String {
        Pop3::line(self)
    }
}

pub struct Pop3 {
    reader: BufReader<TcpStream>,
    pub greeting: String,
}

impl Pop3 {
    /// Connects and checks the `+OK` greeting.
    pub fn connect(addr: SocketAddr) -> Pop3 {
        let mut client = Pop3::connect_raw(addr);
        let greeting = client.line();
        assert!(greeting.starts_with("+OK"), "greeting from {addr}: {greeting:?}");
        client.greeting = greeting;
        client
    }

    /// Connects without reading anything.
    pub fn connect_raw(addr: SocketAddr) -> Pop3 {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        stream.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
        stream.set_write_timeout(Some(IO_TIMEOUT)).expect("write timeout");
        Pop3 { reader: BufReader::with_capacity(64 * 1024, stream), greeting: String::new() }
    }

    /// Connects and logs in with USER/PASS.
    pub fn login(addr: SocketAddr, user: &str, password: &str) -> Pop3 {
        let mut client = Pop3::connect(addr);
        client.user_pass(user, password);
        client
    }

    pub fn user_pass(&mut self, user: &str, password: &str) -> String {
        self.ok(&format!("USER {user}"));
        self.ok(&format!("PASS {password}"))
    }

    /// AUTH PLAIN with an initial response.
    pub fn auth_plain(&mut self, user: &str, password: &str) -> String {
        self.cmd(&format!("AUTH PLAIN {}", plain_response(user.as_bytes(), password.as_bytes())))
    }

    /// Writes a command line (CRLF appended).
    pub fn send(&mut self, line: &str) {
        self.send_raw(format!("{line}\r\n").as_bytes());
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.reader.get_mut().write_all(bytes).unwrap_or_else(|e| panic!("write: {e}"));
    }

    /// The next line, CRLF removed; `None` when the server closed the
    /// connection. Panics on a timeout or a line not ended by CRLF.
    pub fn try_line_bytes(&mut self) -> Option<Vec<u8>> {
        let mut line = Vec::new();
        match self.reader.read_until(b'\n', &mut line) {
            Ok(0) => return None,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!(
                    "no complete line from the server within {IO_TIMEOUT:?} (got {:?})",
                    String::from_utf8_lossy(&line)
                )
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset && line.is_empty() => return None,
            Err(e) => panic!("read: {e}"),
        }
        assert!(
            line.ends_with(b"\r\n"),
            "server line not ended by CRLF (or connection closed mid-line): {:?}",
            String::from_utf8_lossy(&line[line.len().saturating_sub(200)..])
        );
        line.truncate(line.len() - 2);
        Some(line)
    }

    pub fn line_bytes(&mut self) -> Vec<u8> {
        self.try_line_bytes().expect("the server closed the connection while a line was expected")
    }

    pub fn line(&mut self) -> String {
        String::from_utf8_lossy(&self.line_bytes()).into_owned()
    }

    /// Reads a multi-line body up to the "." line; each line un-stuffed,
    /// without its CRLF.
    pub fn body_lines(&mut self) -> Vec<Vec<u8>> {
        let mut lines = Vec::new();
        self.body_each_line(|line| lines.push(line.to_vec()));
        lines
    }

    /// Reads a multi-line body up to the "." line, handing each line
    /// (un-stuffed, without its CRLF) to `each` and keeping none: for
    /// messages too big to hold while measuring memory.
    pub fn body_each_line(&mut self, mut each: impl FnMut(&[u8])) {
        loop {
            let line = self.line_bytes();
            if line == b"." {
                return;
            }
            match line.strip_prefix(b".") {
                Some(rest) => {
                    assert!(!rest.is_empty(), "unreachable: '.' alone ends the body");
                    each(rest)
                }
                None => each(&line),
            }
        }
    }

    /// A multi-line body as the octets of the message it carries (every line
    /// with its CRLF, un-stuffed, without the terminator).
    pub fn body(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        for line in self.body_lines() {
            out.extend_from_slice(&line);
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    pub fn body_text(&mut self) -> Vec<String> {
        self.body_lines().into_iter().map(|l| String::from_utf8_lossy(&l).into_owned()).collect()
    }

    /// STAT as (count, octets), checking the reply's exact form.
    pub fn stat(&mut self) -> (usize, u64) {
        let reply = self.ok("STAT");
        parse_stat(&reply)
    }

    /// LIST as (number, size) pairs.
    pub fn list(&mut self) -> Vec<(u32, u64)> {
        self.ok("LIST");
        self.body_text().iter().map(|l| parse_pair(l)).map(|(n, s)| (n, s.parse().expect("size"))).collect()
    }

    /// LIST n: the size.
    pub fn list_one(&mut self, n: u32) -> u64 {
        let reply = self.ok(&format!("LIST {n}"));
        let (number, size) = parse_pair(reply.strip_prefix("+OK ").expect("+OK n size"));
        assert_eq!(number, n, "{reply}");
        size.parse().unwrap_or_else(|_| panic!("size in {reply:?}"))
    }

    /// UIDL as (number, unique id) pairs, checking RFC 1939's syntax.
    pub fn uidl(&mut self) -> Vec<(u32, String)> {
        self.ok("UIDL");
        let pairs: Vec<_> = self.body_text().iter().map(|l| parse_pair(l)).collect();
        for (_, uid) in &pairs {
            check_uidl(uid);
        }
        pairs
    }

    pub fn uidl_one(&mut self, n: u32) -> String {
        let reply = self.ok(&format!("UIDL {n}"));
        let (number, uid) = parse_pair(reply.strip_prefix("+OK ").expect("+OK n uid"));
        assert_eq!(number, n, "{reply}");
        check_uidl(&uid);
        uid
    }

    /// RETR n: the message octets.
    pub fn retr(&mut self, n: u32) -> Vec<u8> {
        self.ok(&format!("RETR {n}"));
        self.body()
    }

    pub fn top(&mut self, n: u32, lines: u64) -> Vec<u8> {
        self.ok(&format!("TOP {n} {lines}"));
        self.body()
    }

    /// CAPA as a list of capability lines.
    pub fn capa(&mut self) -> Vec<String> {
        self.ok("CAPA");
        self.body_text()
    }

    /// QUIT; returns the reply and checks that the server then closes.
    pub fn quit(&mut self) -> String {
        let reply = self.cmd("QUIT");
        self.expect_closed();
        reply
    }

    /// The server must close the connection now (no more lines).
    pub fn expect_closed(&mut self) {
        if let Some(line) = self.try_line_bytes() {
            panic!("expected the server to close the connection; got {:?}", String::from_utf8_lossy(&line));
        }
    }

    /// Closes the connection abruptly, without QUIT.
    pub fn drop_connection(self) {
        let _ = self.reader.get_ref().shutdown(std::net::Shutdown::Both);
    }
}

/// The base64 of an RFC 4616 PLAIN response with an empty authzid.
pub fn plain_response(user: &[u8], password: &[u8]) -> String {
    STANDARD.encode([b"\0".as_slice(), user, b"\0", password].concat())
}

/// "+OK nn mm" exactly (RFC 1939 STAT).
pub fn parse_stat(reply: &str) -> (usize, u64) {
    let rest = reply.strip_prefix("+OK ").unwrap_or_else(|| panic!("STAT reply {reply:?}"));
    let mut parts = rest.split(' ');
    let count = parts.next().and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("STAT reply {reply:?}"));
    let octets = parts.next().and_then(|o| o.parse().ok()).unwrap_or_else(|| panic!("STAT reply {reply:?}"));
    (count, octets)
}

fn parse_pair(line: &str) -> (u32, String) {
    let (n, rest) = line.split_once(' ').unwrap_or_else(|| panic!("expected `n value`, got {line:?}"));
    (n.parse().unwrap_or_else(|_| panic!("message number in {line:?}")), rest.to_string())
}

/// RFC 1939: 1 to 70 characters in 0x21..=0x7E.
pub fn check_uidl(uid: &str) {
    assert!((1..=70).contains(&uid.len()), "UIDL length: {uid:?}");
    assert!(uid.bytes().all(|b| (0x21..=0x7e).contains(&b)), "UIDL characters: {uid:?}");
}
