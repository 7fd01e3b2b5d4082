//! Test messages and the oracle for what a POP3 client must receive.
//!
//! `canonical` is written independently of `popgate::canonical` on purpose:
//! the rule (RFC 1939 sends CRLF-terminated lines) is restated here so a bug
//! there cannot hide itself.

/// A named message, stored as exactly these octets.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: &'static str,
    pub raw: Vec<u8>,
}

/// What RETR must deliver (after un-stuffing): CRLF, a bare LF and a bare CR
/// each end a line and become CRLF; a last line without a line end gets one;
/// an empty message stays empty.
pub fn canonical(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 32 + 2);
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'\r' => {
                out.extend_from_slice(b"\r\n");
                if raw.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b'\n' => out.extend_from_slice(b"\r\n"),
            b => out.push(b),
        }
        i += 1;
    }
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// What `TOP n lines` must deliver: the header, the blank line after it and
/// at most `lines` lines of the body (the whole message if it has no blank
/// line).
pub fn top(raw: &[u8], lines: usize) -> Vec<u8> {
    let canonical = canonical(raw);
    let mut out = Vec::new();
    let mut in_body = false;
    let mut body_lines = 0;
    for line in canonical.split_inclusive(|&b| b == b'\n') {
        if in_body {
            if body_lines == lines {
                break;
            }
            body_lines += 1;
        }
        out.extend_from_slice(line);
        if line == b"\r\n" && !in_body {
            in_body = true;
        }
    }
    out
}

/// An ordinary small message.
pub fn simple(subject: &str) -> Vec<u8> {
    format!(
        "From: Sender <sender@example.com>\r\nTo: rcpt@example.com\r\nSubject: {subject}\r\n\
         Message-ID: <{}@example.com>\r\n\r\nHello,\r\nthis is \"{subject}\".\r\n",
        subject.replace(' ', "-")
    )
    .into_bytes()
}

/// Messages whose POP3 form differs from their stored form, or that need
/// dot-stuffing. Every one of them is accepted by Dovecot's APPEND.
pub fn hard() -> Vec<Sample> {
    let mut long_line = b"From: a@example.com\r\nSubject: long lines\r\n\r\n".to_vec();
    long_line.extend(std::iter::repeat_n(b'x', 20_000));
    long_line.extend_from_slice(b"\r\n");
    long_line.extend(std::iter::repeat_n(b'.', 12_345));
    long_line.extend_from_slice(b"\r\nshort\r\n");
    long_line.extend(std::iter::repeat_n(b'y', 70_000));
    long_line.extend_from_slice(b"\n");

    let mut eight_bit = "From: a@example.com\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n\
        Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\
        Grüße, naïve café — 日本語 ✉\r\n.ünïcode after a dot\r\n"
        .as_bytes()
        .to_vec();
    eight_bit.extend_from_slice(b"latin-1: \xe9t\xe9 \xff\xfe\r\n");

    vec![
        Sample { name: "bare LF", raw: b"From: a@example.com\nSubject: bare LF\n\nline one\nline two\n".to_vec() },
        Sample { name: "bare CR", raw: b"From: a@example.com\rSubject: bare CR\r\rline one\rline two\r".to_vec() },
        Sample {
            name: "leading dots",
            raw: b"From: a@example.com\r\nSubject: dots\r\n\r\n.\r\n..\r\n.leading dot\r\n...\r\n. \r\n.\r\nend\r\n"
                .to_vec(),
        },
        Sample {
            name: "no final line end",
            raw: b"From: a@example.com\r\nSubject: no final line end\r\n\r\nlast line has no end".to_vec(),
        },
        Sample { name: "ends with a dot line, no line end", raw: b"Subject: dot end\r\n\r\nx\r\n.".to_vec() },
        Sample { name: "8-bit", raw: eight_bit },
        Sample { name: "long lines", raw: long_line },
        Sample { name: "mixed line ends", raw: b"Subject: mixed\r\n\nA\rB\r\nC\n\r.\n.\r\r\n\r\n..\rend".to_vec() },
        Sample { name: "header only", raw: b"Subject: header only\r\nX-Empty:\r\n".to_vec() },
        Sample { name: "plain", raw: simple("plain") },
    ]
}

/// About `megabytes` MiB of mail with every difficulty mixed in: lines
/// starting with ".", bare LF, 8-bit text, a few long lines.
pub fn big(megabytes: usize) -> Vec<u8> {
    let target = megabytes * 1024 * 1024;
    let mut raw = b"From: big@example.com\r\nSubject: a big one\r\n\r\n".to_vec();
    let mut i = 0u64;
    while raw.len() < target {
        match i % 7 {
            0 => raw.extend_from_slice(format!(".line {i} starts with a dot\r\n").as_bytes()),
            1 => raw.extend_from_slice(format!("line {i} ends with a bare LF\n").as_bytes()),
            2 => raw.extend_from_slice("8-bit: grüße — 日本語\r\n".as_bytes()),
            3 => raw.extend_from_slice(b".\r\n"),
            4 if i % 1000 == 4 => {
                raw.extend(std::iter::repeat_n(b'z', 5000));
                raw.extend_from_slice(b"\r\n");
            }
            _ => raw.extend_from_slice(format!("{i:08} The quick brown fox jumps over the lazy dog.\r\n").as_bytes()),
        }
        i += 1;
    }
    raw
}
