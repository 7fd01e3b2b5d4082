//! RFC 3516 BINARY fetch replies, made readable for async-imap's parser.
//!
//! imap-proto 0.17 (async-imap's parser) knows neither the `BINARY[…]`
//! fetch item nor the `~{n}` literal8 that carries it: a BINARY reply fails
//! to parse, which poisons the connection. `Literal8` sits in the byte
//! stream below async-imap (in `Transport`) and, in untagged FETCH
//! responses only, renames `BINARY[` to `BODY[` and `~{n}` to `{n}`; the
//! literal's octets pass through untouched, everything else unchanged. The
//! backend knows which item it asked for, so the renaming loses nothing.
//! (The alternative, a patched copy of imap-proto, would vendor a whole
//! parser for two tokens.)
//!
//! It follows the stream's framing from the first octet — lines, and the
//! literal a line announces at its end with `{n}` or `~{n}` — so a
//! literal's content is never taken for a line, and a FETCH response's
//! segments after its literals are still known to be that response. It
//! never makes the stream longer, and holds at most one line segment (up to
//! `HOLD` octets; a longer one is passed on as it is).

use memchr::memchr;

/// Longest line segment held back to be looked at whole. The FETCH lines
/// that need renaming are a few dozen octets.
const HOLD: usize = 8 * 1024;

#[derive(Debug)]
pub struct Literal8 {
    /// The current line segment, not yet passed on (unless `passed`).
    line: Vec<u8>,
    /// The current segment outgrew `HOLD` and is being passed on as it
    /// comes; `line` then keeps only its last octets (for the announcement).
    passed: bool,
    /// Octets of a literal still to pass through untouched.
    literal: u64,
    /// The current segment is the first of its response.
    first_segment: bool,
    /// The response being read is an untagged FETCH.
    fetch: bool,
    /// Where in `out` responses ended during the last `feed`/`finish`
    /// (lengths of `out` right after each response's last octet): lets the
    /// transport hand async-imap one response at a time.
    pub ends: Vec<usize>,
}

impl Default for Literal8 {
    fn default() -> Self {
        Literal8 { line: Vec::new(), passed: false, literal: 0, first_segment: true, fetch: false, ends: Vec::new() }
    }
}

impl Literal8 {
    /// Feeds octets read from the server; what async-imap may see of them
    /// (so far) is appended to `out`.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() {
            if self.literal > 0 {
                let n = usize::try_from(self.literal).unwrap_or(usize::MAX).min(input.len());
                out.extend_from_slice(&input[..n]);
                self.literal -= n as u64;
                input = &input[n..];
                continue;
            }
            let (segment, ends) = match memchr(b'\n', input) {
                Some(i) => (&input[..=i], true),
                None => (input, false),
            };
            input = &input[segment.len()..];
            self.take(segment, ends, out);
        }
    }

    /// The stream ended: whatever is held goes out as it is.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.passed {
            out.append(&mut self.line);
        }
        self.line.clear();
    }

    fn take(&mut self, bytes: &[u8], ends: bool, out: &mut Vec<u8>) {
        if self.passed {
            out.extend_from_slice(bytes);
            self.line.extend_from_slice(bytes);
            let excess = self.line.len().saturating_sub(32);
            self.line.drain(..excess);
        } else {
            self.line.extend_from_slice(bytes);
            // Whether or not its line end came with it: what a segment
            // becomes must not depend on how the reads split it.
            if self.line.len() > HOLD {
                out.extend_from_slice(&self.line);
                let excess = self.line.len().saturating_sub(32);
                self.line.drain(..excess);
                self.passed = true;
                if self.first_segment {
                    self.fetch = false;
                }
            }
        }
        if ends {
            self.end_segment(out);
        }
    }

    fn end_segment(&mut self, out: &mut Vec<u8>) {
        if self.first_segment && !self.passed {
            self.fetch = is_untagged_fetch(&self.line);
        }
        let announced = announcement(&self.line);
        if !self.passed {
            if self.fetch {
                rename(&self.line, announced.and_then(|a| a.tilde), out);
            } else {
                out.extend_from_slice(&self.line);
            }
        }
        self.line.clear();
        self.passed = false;
        match announced {
            Some(a) => {
                self.literal = a.length;
                self.first_segment = false;
            }
            None => {
                self.first_segment = true;
                self.fetch = false;
                self.ends.push(out.len());
            }
        }
    }
}

/// A literal announced at the end of a line segment: `{n}` or `~{n}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Announcement {
    length: u64,
    /// Where the `~` of a literal8 is, to be dropped.
    tilde: Option<usize>,
}

fn announcement(segment: &[u8]) -> Option<Announcement> {
    let body = segment.strip_suffix(b"\n")?;
    let body = body.strip_suffix(b"\r").unwrap_or(body);
    let body = body.strip_suffix(b"}")?;
    let open = body.iter().rposition(|&b| b == b'{')?;
    let digits = &body[open + 1..];
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let length = std::str::from_utf8(digits).ok()?.parse().ok()?;
    let tilde = (open > 0 && body[open - 1] == b'~').then(|| open - 1);
    Some(Announcement { length, tilde })
}

/// `* <number> FETCH ` at the start of a response.
fn is_untagged_fetch(line: &[u8]) -> bool {
    let Some(rest) = line.strip_prefix(b"* ") else { return false };
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    digits > 0 && rest.len() >= digits + 7 && rest[digits..digits + 7].eq_ignore_ascii_case(b" FETCH ")
}

/// Copies a FETCH segment to `out`, `BINARY[` renamed `BODY[` outside quoted
/// strings and the literal8's `~` (at `tilde`) dropped.
fn rename(segment: &[u8], tilde: Option<usize>, out: &mut Vec<u8>) {
    const BINARY: &[u8] = b"BINARY[";
    let mut quoted = false;
    let mut i = 0;
    while i < segment.len() {
        let b = segment[i];
        if quoted {
            out.push(b);
            if b == b'\\' && i + 1 < segment.len() {
                out.push(segment[i + 1]);
                i += 2;
                continue;
            }
            quoted = b != b'"';
            i += 1;
            continue;
        }
        if Some(i) == tilde {
            i += 1;
            continue;
        }
        if b == b'"' {
            quoted = true;
        }
        let rest = &segment[i + 1..];
        if (b == b' ' || b == b'(') && rest.len() >= BINARY.len() && rest[..BINARY.len()].eq_ignore_ascii_case(BINARY) {
            out.push(b);
            out.extend_from_slice(b"BODY[");
            i += 1 + BINARY.len();
            continue;
        }
        out.push(b);
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn through(chunks: &[&[u8]]) -> Vec<u8> {
        let mut rewriter = Literal8::default();
        let mut out = Vec::new();
        for chunk in chunks {
            rewriter.feed(chunk, &mut out);
        }
        rewriter.finish(&mut out);
        out
    }

    /// Every way of cutting `input` in two gives the same output.
    fn at_every_cut(input: &[u8]) -> Vec<u8> {
        let whole = through(&[input]);
        for cut in 0..=input.len() {
            assert_eq!(through(&[&input[..cut], &input[cut..]]), whole, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(through(&bytes), whole, "one octet at a time");
        whole
    }

    #[test]
    fn a_binary_fetch_becomes_a_body_fetch_with_the_literal_untouched() {
        let input = b"* 1 FETCH (UID 7 BINARY[]<0> ~{12}\r\nab\0c\r\n~{3}\r\n)\r\nT1 OK done\r\n";
        let want = b"* 1 FETCH (UID 7 BODY[]<0> {12}\r\nab\0c\r\n~{3}\r\n)\r\nT1 OK done\r\n";
        assert_eq!(at_every_cut(input), want);
    }

    #[test]
    fn the_parser_reads_the_renamed_reply() {
        use async_imap::imap_proto::{AttributeValue, Response};
        let out = through(&[b"* 3 FETCH (UID 9 BINARY[]<1024> ~{5}\r\na\0b\x80c)\r\n"]);
        let (rest, response) = Response::parse(&out).expect("parses");
        assert!(rest.is_empty());
        let Response::Fetch(3, attributes) = response else { panic!("{response:?}") };
        assert!(attributes.contains(&AttributeValue::Uid(9)));
        assert!(attributes.iter().any(|a| matches!(a,
            AttributeValue::BodySection { section: None, index: Some(1024), data: Some(d) } if d.as_ref() == b"a\0b\x80c")));
    }

    #[test]
    fn everything_else_passes_unchanged() {
        let inputs: [&[u8]; 6] = [
            b"* OK [CAPABILITY IMAP4rev1 BINARY] ready\r\n",
            // A BODY literal whose content looks like a BINARY FETCH line.
            b"* 2 FETCH (UID 4 BODY[] {38}\r\n* 1 FETCH (UID 7 BINARY[]<0> ~{1}\r\n)\r\n",
            b"* SEARCH 1 2 3\r\nT2 OK BINARY[ stays in text ~{3}\r\nabc",
            // A quoted string in a FETCH response is left alone.
            b"* 5 FETCH (FLAGS (\\Seen) X \" BINARY[ \\\" BINARY[\")\r\n",
            b"* 1 EXISTS\r\n* 1 FETCH (FLAGS ())\r\n",
            b"",
        ];
        for input in inputs {
            assert_eq!(at_every_cut(input), input, "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn literals_after_the_first_segment_stay_framed() {
        // A second item after the first literal is renamed too; a third
        // literal's content is not.
        let input = b"* 1 FETCH (BINARY[1] ~{2}\r\nxy BINARY[2] ~{4}\r\n* 9 \r\n)\r\n";
        let want = b"* 1 FETCH (BODY[1] {2}\r\nxy BODY[2] {4}\r\n* 9 \r\n)\r\n";
        assert_eq!(at_every_cut(input), want);
    }

    #[test]
    fn a_very_long_line_passes_as_it_is_and_keeps_the_framing() {
        let mut input = b"* SEARCH".to_vec();
        for i in 0..5000 {
            input.extend_from_slice(format!(" {i}").as_bytes());
        }
        input.extend_from_slice(b" {3}\r\nabc\r\n* 1 FETCH (BINARY[] ~{1}\r\nx)\r\n");
        let mut want = input.clone();
        let tail = want.len() - b"* 1 FETCH (BINARY[] ~{1}\r\nx)\r\n".len();
        want.truncate(tail);
        want.extend_from_slice(b"* 1 FETCH (BODY[] {1}\r\nx)\r\n");
        assert_eq!(through(&[&input]), want);
        let pieces: Vec<&[u8]> = input.chunks(1000).collect();
        assert_eq!(through(&pieces), want);
    }

    #[test]
    fn a_long_fetch_line_comes_out_the_same_however_it_was_read() {
        // Found writing the imap_replies fuzz target: a FETCH line longer than
        // HOLD was renamed when it arrived in one read and passed as it is
        // when split, so the same reply could parse or poison.
        let mut input = b"* 1 FETCH (UID 5 X".to_vec();
        input.extend(std::iter::repeat_n(b'y', HOLD));
        input.extend_from_slice(b" BINARY[] ~{1}\r\nx)\r\n");
        let whole = through(&[&input]);
        assert_eq!(whole, input, "longer than HOLD: passed as it is");
        for size in [1, 7, 4096, HOLD, HOLD + 20] {
            let pieces: Vec<&[u8]> = input.chunks(size).collect();
            assert_eq!(through(&pieces), whole, "read {size} octets at a time");
        }
    }

    #[test]
    fn announcements_are_recognised_exactly() {
        assert_eq!(announcement(b"x {12}\r\n"), Some(Announcement { length: 12, tilde: None }));
        assert_eq!(announcement(b"x ~{0}\r\n"), Some(Announcement { length: 0, tilde: Some(2) }));
        assert_eq!(announcement(b"x {}\r\n"), None);
        assert_eq!(announcement(b"x {1a}\r\n"), None);
        assert_eq!(announcement(b"x {99999999999999999999}\r\n"), None);
        assert_eq!(announcement(b"x {12} \r\n"), None);
    }
}
