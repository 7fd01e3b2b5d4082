//! The canonical (CRLF) form of a stored message, as POP3 sends it.
//!
//! Mail stores keep messages with bare LF, bare CR or no final line end; POP3
//! (RFC 1939) sends every line ended by CRLF. This module owns that one
//! normalization so that the size a backend measures and the octets the
//! response writer sends can never disagree: both run the same `LineEnds`
//! state machine. It does no I/O.
//!
//! The rule: CRLF, a bare LF and a bare CR each end a line and become CRLF; a
//! final line with no line end gets one. An empty message stays empty.

use memchr::memchr2;

/// Streaming CRLF normalizer. Feed raw chunks, then `finish`.
#[derive(Debug, Default, Clone)]
pub struct LineEnds {
    /// The previous chunk ended in a CR whose meaning depends on the next byte.
    pending_cr: bool,
    /// Nothing of the current line has been emitted yet.
    at_line_start: bool,
    /// Any byte at all has been seen.
    started: bool,
}

/// What the normalizer found in a chunk: runs of line content and line ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece<'a> {
    /// Bytes of a line (no CR or LF inside), possibly only part of the line.
    Text(&'a [u8]),
    /// The end of the current line (to be sent as CRLF).
    LineEnd,
}

impl LineEnds {
    pub fn new() -> Self {
        Self { pending_cr: false, at_line_start: true, started: false }
    }

    /// True when the next emitted text starts a new line.
    pub fn at_line_start(&self) -> bool {
        self.at_line_start
    }

    /// Splits `input` into pieces, calling `f` for each; `f` returns `false`
    /// to stop early (the rest of the input is then not consumed).
    pub fn feed(&mut self, input: &[u8], mut f: impl FnMut(Piece<'_>, bool) -> bool) -> bool {
        let mut rest = input;
        if !rest.is_empty() {
            self.started = true;
        }
        if self.pending_cr
            && let Some(&first) = rest.first()
        {
            self.pending_cr = false;
            let was_start = self.at_line_start;
            self.at_line_start = true;
            if first == b'\n' {
                rest = &rest[1..];
            }
            if !f(Piece::LineEnd, was_start) {
                return false;
            }
        }
        while !rest.is_empty() {
            match memchr2(b'\r', b'\n', rest) {
                None => {
                    let was_start = self.at_line_start;
                    self.at_line_start = false;
                    return f(Piece::Text(rest), was_start);
                }
                Some(i) => {
                    if i > 0 {
                        let was_start = self.at_line_start;
                        self.at_line_start = false;
                        if !f(Piece::Text(&rest[..i]), was_start) {
                            return false;
                        }
                    }
                    if rest[i] == b'\r' {
                        match rest.get(i + 1) {
                            None => {
                                self.pending_cr = true;
                                return true;
                            }
                            Some(b'\n') => rest = &rest[i + 2..],
                            Some(_) => rest = &rest[i + 1..],
                        }
                    } else {
                        rest = &rest[i + 1..];
                    }
                    let was_start = self.at_line_start;
                    self.at_line_start = true;
                    if !f(Piece::LineEnd, was_start) {
                        return false;
                    }
                }
            }
        }
        true
    }

    /// Ends the message: a pending CR or an unterminated last line yields a
    /// final line end.
    pub fn finish(&mut self, mut f: impl FnMut(Piece<'_>, bool)) {
        if self.pending_cr || (self.started && !self.at_line_start) {
            let was_start = self.at_line_start;
            self.pending_cr = false;
            self.at_line_start = true;
            f(Piece::LineEnd, was_start);
        }
    }
}

/// Counts the octets of a message's canonical CRLF form, chunk by chunk.
#[derive(Debug, Default, Clone)]
pub struct CanonicalSize {
    ends: LineEnds,
    octets: u64,
}

impl CanonicalSize {
    pub fn new() -> Self {
        Self { ends: LineEnds::new(), octets: 0 }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        let octets = &mut self.octets;
        self.ends.feed(chunk, |piece, _| {
            *octets += match piece {
                Piece::Text(t) => t.len() as u64,
                Piece::LineEnd => 2,
            };
            true
        });
    }

    pub fn finish(mut self) -> u64 {
        let octets = &mut self.octets;
        self.ends.finish(|_, _| *octets += 2);
        self.octets
    }
}

/// The canonical size of a whole message held in memory.
pub fn canonical_size(message: &[u8]) -> u64 {
    let mut counter = CanonicalSize::new();
    counter.feed(message);
    counter.finish()
}

/// The canonical form of a whole message held in memory (for tests and the
/// demo backend; streaming code uses `LineEnds`).
pub fn canonicalize(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + message.len() / 32 + 2);
    let mut ends = LineEnds::new();
    let mut push = |piece: Piece<'_>, _| {
        match piece {
            Piece::Text(t) => out.extend_from_slice(t),
            Piece::LineEnd => out.extend_from_slice(b"\r\n"),
        }
        true
    };
    ends.feed(message, &mut push);
    ends.finish(|p, s| {
        push(p, s);
    });
    out
}

/// REFERENCE, not popgate code: the textbook byte-at-a-time encoder a first
/// implementation would write, independent of `LineEnds` and `BodyEncoder`,
/// against which the benchmarks compare speed and the fuzz targets compare
/// output. Same rules: CRLF, a bare LF and a bare CR each end a line and
/// become CRLF, a missing final line end is added, a line starting with `.`
/// gets another `.`, `.` CRLF ends the body; TOP n sends the header, the
/// blank line and n body lines.
#[doc(hidden)]
pub mod reference {
    /// What a POP3 client does with a multi-line body on the wire: split at
    /// CRLF, stop at ".", un-stuff. Panics on anything but one well-formed
    /// body (a missing terminator, octets after it).
    pub fn client_decode(wire: &[u8]) -> Vec<u8> {
        let mut decoded = Vec::new();
        let mut rest = wire;
        loop {
            let i = rest.windows(2).position(|w| w == b"\r\n").expect("CRLF lines");
            let line = &rest[..i];
            rest = &rest[i + 2..];
            if line == b"." {
                assert!(rest.is_empty(), "octets after the terminator");
                return decoded;
            }
            decoded.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
            decoded.extend_from_slice(b"\r\n");
        }
    }

    /// One byte at a time, one `Vec::push` per byte.
    #[derive(Debug)]
    pub struct NaiveEncoder {
        at_line_start: bool,
        pending_cr: bool,
        started: bool,
        /// TOP: `Some((in_header, body lines still to send))`.
        top: Option<(bool, u64)>,
        done: bool,
    }

    impl NaiveEncoder {
        /// RETR.
        pub fn whole() -> Self {
            NaiveEncoder { at_line_start: true, pending_cr: false, started: false, top: None, done: false }
        }

        /// TOP with this many body lines.
        pub fn top(lines: u64) -> Self {
            NaiveEncoder { top: Some((true, lines)), ..Self::whole() }
        }

        fn line_end(&mut self, out: &mut Vec<u8>) {
            if self.done {
                return;
            }
            out.push(b'\r');
            out.push(b'\n');
            let blank = self.at_line_start;
            self.at_line_start = true;
            match &mut self.top {
                Some((in_header @ true, lines)) if blank => {
                    *in_header = false;
                    self.done = *lines == 0;
                }
                Some((false, lines)) => {
                    *lines -= 1;
                    self.done = *lines == 0;
                }
                _ => {}
            }
        }

        pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
            for &byte in chunk {
                self.started = true;
                if self.pending_cr {
                    self.pending_cr = false;
                    self.line_end(out);
                    if byte == b'\n' {
                        continue;
                    }
                }
                match byte {
                    b'\r' => self.pending_cr = true,
                    b'\n' => self.line_end(out),
                    _ if self.done => {}
                    _ => {
                        if self.at_line_start && byte == b'.' {
                            out.push(b'.');
                        }
                        out.push(byte);
                        self.at_line_start = false;
                    }
                }
            }
        }

        pub fn finish(&mut self, out: &mut Vec<u8>) {
            if self.pending_cr || (self.started && !self.at_line_start) {
                self.pending_cr = false;
                self.line_end(out);
            }
            out.extend_from_slice(b".\r\n");
        }
    }

    /// The canonical (CRLF) size, byte at a time.
    pub fn naive_size(msg: &[u8]) -> u64 {
        let (mut octets, mut pending_cr, mut at_line_start) = (0u64, false, true);
        for &byte in msg {
            if pending_cr {
                pending_cr = false;
                octets += 2;
                at_line_start = true;
                if byte == b'\n' {
                    continue;
                }
            }
            match byte {
                b'\r' => pending_cr = true,
                b'\n' => {
                    octets += 2;
                    at_line_start = true;
                }
                _ => {
                    octets += 1;
                    at_line_start = false;
                }
            }
        }
        if pending_cr || (!msg.is_empty() && !at_line_start) {
            octets += 2;
        }
        octets
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn table() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"", b""),
            (b"a", b"a\r\n"),
            (b"a\n", b"a\r\n"),
            (b"a\r\n", b"a\r\n"),
            (b"a\r", b"a\r\n"),
            (b"a\rb", b"a\r\nb\r\n"),
            (b"a\n\nb", b"a\r\n\r\nb\r\n"),
            (b"\r\r\n\n", b"\r\n\r\n\r\n"),
            (b"\n", b"\r\n"),
            (b"caf\xc3\xa9\n", b"caf\xc3\xa9\r\n"),
        ];
        for (raw, want) in cases {
            assert_eq!(canonicalize(raw), *want, "input {:?}", raw);
            assert_eq!(canonical_size(raw), want.len() as u64, "input {:?}", raw);
        }
    }

    proptest! {
        #[test]
        fn chunking_never_changes_the_result(
            raw in proptest::collection::vec(prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'.'), any::<u8>()], 0..300),
            cut in 1usize..17,
        ) {
            let whole = canonicalize(&raw);
            let mut counter = CanonicalSize::new();
            for chunk in raw.chunks(cut) {
                counter.feed(chunk);
            }
            prop_assert_eq!(counter.finish(), whole.len() as u64);
            prop_assert_eq!(reference::naive_size(&raw), whole.len() as u64);
            // The canonical form is a fixed point: canonical bytes stay as they are.
            prop_assert_eq!(canonicalize(&whole), whole.clone());
            // No bare CR or LF remains.
            for (i, b) in whole.iter().enumerate() {
                if *b == b'\n' { prop_assert!(i > 0 && whole[i - 1] == b'\r'); }
                if *b == b'\r' { prop_assert!(whole.get(i + 1) == Some(&b'\n')); }
            }
        }
    }
}
