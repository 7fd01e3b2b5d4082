//! Line framing for the text protocols (POP3 commands, SMTP commands and
//! the DATA section): `LineReader` cuts a byte stream into lines with a
//! hard length limit. A line longer than the limit is reported once as
//! `Line::TooLong` and its bytes are dropped as they arrive, so memory stays
//! bounded whatever the client sends; bytes after a complete line stay
//! buffered, which is what makes pipelining work. No I/O here, and nothing
//! of either protocol: each names its own limit (RFC 2449's 255 octets for
//! POP3 commands, RFC 5321 4.5.3.1's for SMTP).

/// One framed line, without its line end.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    Complete(Vec<u8>),
    /// The line exceeded the limit; its content was discarded.
    TooLong,
}

#[derive(Debug)]
pub struct LineReader {
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for LF.
    scanned: usize,
    /// Inside an over-long line: drop everything up to the next LF.
    discarding: bool,
}

impl Default for LineReader {
    fn default() -> Self {
        Self::new()
    }
}

impl LineReader {
    pub fn new() -> Self {
        LineReader { buf: Vec::with_capacity(64), scanned: 0, discarding: false }
    }

    /// Appends received bytes. The caller then calls `next_line` until it
    /// returns `None`.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet framed into a line.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Forgets everything buffered (after STLS or STARTTLS: plaintext sent
    /// before the TLS handshake must never be read as commands).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.scanned = 0;
        self.discarding = false;
    }

    /// The next complete line, if any. `limit` counts the line's octets
    /// including its CRLF, as RFC 2449 and RFC 5321 do; a bare LF counts as
    /// the CRLF it stands for, so a line's content may never exceed
    /// `limit - 2` octets whichever line end the client used.
    pub fn next_line(&mut self, limit: usize) -> Option<Line> {
        let Some(i) = memchr::memchr(b'\n', &self.buf[self.scanned..]) else {
            if self.discarding || self.buf.len() > limit {
                // Keep nothing of an over-long line; wait for its end.
                self.discarding = true;
                self.buf.clear();
            }
            self.scanned = self.buf.len();
            return None;
        };
        let end = self.scanned + i + 1;
        let mut line: Vec<u8> = self.buf.drain(..end).collect();
        self.scanned = 0;
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if std::mem::take(&mut self.discarding) || line.len() + 2 > limit {
            return Some(Line::TooLong);
        }
        Some(Line::Complete(line))
    }
}
