//! Every octet popgate sends to a POP3 client is produced here.
//!
//! `Response` is a status line (`+OK`/`-ERR`, an optional RFC 2449 response
//! code, text) with an optional multi-line body; `BodyEncoder` streams a
//! message's octets as a multi-line body: CRLF line ends (via
//! `canonical::LineEnds`), dot-stuffing, the TOP line limit and the final
//! `.` line. Nothing else in popgate writes protocol bytes.

use crate::canonical::{LineEnds, Piece};

/// RFC 2449 / RFC 3206 extended response codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseCode {
    /// RFC 3206: the failure is about the credentials.
    Auth,
    /// RFC 3206: a temporary system problem; try again later.
    SysTemp,
    /// RFC 3206: a permanent system problem.
    SysPerm,
    /// RFC 2449: the maildrop is in use.
    InUse,
    /// RFC 2449: logging in again this soon is refused.
    LoginDelay,
}

impl ResponseCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseCode::Auth => "AUTH",
            ResponseCode::SysTemp => "SYS/TEMP",
            ResponseCode::SysPerm => "SYS/PERM",
            ResponseCode::InUse => "IN-USE",
            ResponseCode::LoginDelay => "LOGIN-DELAY",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Ok,
    Err(Option<ResponseCode>),
    /// A SASL continuation (`+ base64`), RFC 5034.
    Continue,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: Status,
    pub text: String,
    /// Lines of a multi-line body (CAPA, LIST, UIDL); dot-stuffed on output.
    pub body: Option<Vec<String>>,
}

impl Response {
    pub fn ok(text: impl Into<String>) -> Self {
        Response { status: Status::Ok, text: text.into(), body: None }
    }

    pub fn err(text: impl Into<String>) -> Self {
        Response { status: Status::Err(None), text: text.into(), body: None }
    }

    pub fn err_code(code: ResponseCode, text: impl Into<String>) -> Self {
        Response { status: Status::Err(Some(code)), text: text.into(), body: None }
    }

    pub fn continuation(text: impl Into<String>) -> Self {
        Response { status: Status::Continue, text: text.into(), body: None }
    }

    pub fn with_body(mut self, lines: Vec<String>) -> Self {
        self.body = Some(lines);
        self
    }

    pub fn is_ok(&self) -> bool {
        self.status == Status::Ok
    }

    /// Appends the wire form of this response to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        match self.status {
            Status::Ok => out.extend_from_slice(b"+OK"),
            Status::Err(None) => out.extend_from_slice(b"-ERR"),
            Status::Err(Some(code)) => {
                out.extend_from_slice(b"-ERR [");
                out.extend_from_slice(code.as_str().as_bytes());
                out.push(b']');
            }
            Status::Continue => out.push(b'+'),
        }
        if !self.text.is_empty() || self.status == Status::Continue {
            out.push(b' ');
            out.extend_from_slice(sanitize(&self.text).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        if let Some(lines) = &self.body {
            for line in lines {
                let line = sanitize(line);
                if line.starts_with('.') {
                    out.push(b'.');
                }
                out.extend_from_slice(line.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b".\r\n");
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        self.write_to(&mut out);
        out
    }
}

/// A line of our own text must never carry a line end (it would let
/// backend-provided text forge protocol lines).
fn sanitize(text: &str) -> std::borrow::Cow<'_, str> {
    if text.bytes().any(|b| b == b'\r' || b == b'\n') {
        std::borrow::Cow::Owned(text.replace(['\r', '\n'], " "))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

/// Where a TOP command is in the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Header,
    /// In the body, with this many body lines still to send.
    Body(u64),
    /// Everything is sent (RETR never gets here).
    Done,
}

/// Streams one message as a POP3 multi-line body.
#[derive(Debug)]
pub struct BodyEncoder {
    ends: LineEnds,
    /// `None` for RETR; `Some(part)` for TOP.
    top: Option<Part>,
    top_lines: u64,
    /// The current line has content (to find the header's end).
    line_has_text: bool,
    /// Canonical octets sent, excluding stuffing and the terminator.
    octets: u64,
}

impl BodyEncoder {
    /// For RETR: the whole message.
    pub fn whole() -> Self {
        BodyEncoder { ends: LineEnds::new(), top: None, top_lines: 0, line_has_text: false, octets: 0 }
    }

    /// For TOP: the header, the blank line and `lines` body lines.
    pub fn top(lines: u64) -> Self {
        BodyEncoder { top: Some(Part::Header), top_lines: lines, ..Self::whole() }
    }

    /// True once a TOP has all it needs; the rest of the message may be
    /// left unread.
    pub fn is_done(&self) -> bool {
        self.top == Some(Part::Done)
    }

    /// Canonical octets written so far (what LIST must have announced).
    pub fn octets(&self) -> u64 {
        self.octets
    }

    /// Encodes a chunk of stored message octets onto `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        out.reserve(chunk.len() + chunk.len() / 16 + 8);
        let BodyEncoder { ends, top, top_lines, line_has_text, octets } = self;
        ends.feed(chunk, |piece, at_start| Self::emit(piece, at_start, top, *top_lines, line_has_text, octets, out));
    }

    fn emit(
        piece: Piece<'_>,
        at_start: bool,
        top: &mut Option<Part>,
        top_lines: u64,
        line_has_text: &mut bool,
        octets: &mut u64,
        out: &mut Vec<u8>,
    ) -> bool {
        if *top == Some(Part::Done) {
            return false;
        }
        match piece {
            Piece::Text(t) => {
                if at_start && t[0] == b'.' {
                    out.push(b'.');
                }
                out.extend_from_slice(t);
                *octets += t.len() as u64;
                *line_has_text = true;
            }
            Piece::LineEnd => {
                out.extend_from_slice(b"\r\n");
                *octets += 2;
                let blank = !*line_has_text;
                *line_has_text = false;
                match *top {
                    Some(Part::Header) if blank => {
                        *top = Some(if top_lines == 0 { Part::Done } else { Part::Body(top_lines) })
                    }
                    Some(Part::Body(n)) => *top = Some(if n <= 1 { Part::Done } else { Part::Body(n - 1) }),
                    _ => {}
                }
            }
        }
        true
    }

    /// Ends the body: a final line end where the message lacked one, then the
    /// terminating `.` line.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.is_done() {
            let BodyEncoder { ends, top, top_lines, line_has_text, octets } = self;
            ends.finish(|piece, at_start| {
                Self::emit(piece, at_start, top, *top_lines, line_has_text, octets, out);
            });
        }
        out.extend_from_slice(b".\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canonical::canonical_size;
    use proptest::prelude::*;

    fn encode(msg: &[u8], enc: BodyEncoder, chunk: usize) -> (Vec<u8>, u64) {
        let mut enc = enc;
        let mut out = Vec::new();
        for piece in msg.chunks(chunk.max(1)) {
            enc.push(piece, &mut out);
            if enc.is_done() {
                break;
            }
        }
        enc.finish(&mut out);
        (out, enc.octets())
    }

    /// What a client does: split at CRLF, stop at ".", un-stuff.
    fn client_decode(wire: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = wire;
        loop {
            let i = rest.windows(2).position(|w| w == b"\r\n").expect("CRLF-terminated lines");
            let line = &rest[..i];
            rest = &rest[i + 2..];
            if line == b"." {
                assert!(rest.is_empty(), "bytes after the terminator");
                return out;
            }
            out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
            out.extend_from_slice(b"\r\n");
        }
    }

    #[test]
    fn status_lines() {
        assert_eq!(Response::ok("2 320").to_bytes(), b"+OK 2 320\r\n");
        assert_eq!(Response::err("no such message").to_bytes(), b"-ERR no such message\r\n");
        assert_eq!(Response::err_code(ResponseCode::SysTemp, "try later").to_bytes(), b"-ERR [SYS/TEMP] try later\r\n");
        assert_eq!(Response::continuation("").to_bytes(), b"+ \r\n");
        assert_eq!(Response::err("a\r\nb").to_bytes(), b"-ERR a  b\r\n");
        assert_eq!(
            Response::ok("list").with_body(vec!["1 20".into(), ".x".into()]).to_bytes(),
            b"+OK list\r\n1 20\r\n..x\r\n.\r\n"
        );
    }

    #[test]
    fn retr_table() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"", b".\r\n"),
            (b"a", b"a\r\n.\r\n"),
            (b".", b"..\r\n.\r\n"),
            (b"Subject: x\n\n.\n..\nend", b"Subject: x\r\n\r\n..\r\n...\r\nend\r\n.\r\n"),
            (b"a\rb\r\n.c", b"a\r\nb\r\n..c\r\n.\r\n"),
        ];
        for &(msg, want) in cases {
            for chunk in 1..6 {
                let (wire, octets) = encode(msg, BodyEncoder::whole(), chunk);
                assert_eq!(wire, want, "{msg:?} chunk {chunk}");
                assert_eq!(octets, canonical_size(msg));
            }
        }
    }

    #[test]
    fn top_sends_header_blank_line_and_n_lines() {
        let msg = b"From: a\r\nSubject: b\r\n\r\none\r\n.two\r\nthree\r\n";
        let want = |body: &[u8]| [b"From: a\r\nSubject: b\r\n\r\n".as_slice(), body, b".\r\n"].concat();
        for chunk in [1, 2, 3, 5, 100] {
            assert_eq!(encode(msg, BodyEncoder::top(0), chunk).0, want(b""), "chunk {chunk}");
            assert_eq!(encode(msg, BodyEncoder::top(1), chunk).0, want(b"one\r\n"));
            assert_eq!(encode(msg, BodyEncoder::top(2), chunk).0, want(b"one\r\n..two\r\n"));
            assert_eq!(encode(msg, BodyEncoder::top(3), chunk).0, want(b"one\r\n..two\r\nthree\r\n"));
            assert_eq!(encode(msg, BodyEncoder::top(99), chunk).0, want(b"one\r\n..two\r\nthree\r\n"));
        }
        // A message with no body and no blank line: TOP gives the header.
        assert_eq!(encode(b"From: a", BodyEncoder::top(5), 1).0, b"From: a\r\n.\r\n");
        // Bare LF message.
        assert_eq!(encode(b"A: b\n\nx\ny\n", BodyEncoder::top(1), 4).0, b"A: b\r\n\r\nx\r\n.\r\n");
    }

    proptest! {
        /// The client gets back exactly the canonical message, whose length is
        /// the size LIST announces, at any chunking.
        #[test]
        fn round_trip(
            raw in proptest::collection::vec(prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'.'), any::<u8>()], 0..400),
            chunk in 1usize..40,
        ) {
            let (wire, octets) = encode(&raw, BodyEncoder::whole(), chunk);
            let decoded = client_decode(&wire);
            prop_assert_eq!(decoded.len() as u64, canonical_size(&raw));
            prop_assert_eq!(octets, canonical_size(&raw));
            prop_assert_eq!(decoded, crate::canonical::canonicalize(&raw));
        }
    }
}
