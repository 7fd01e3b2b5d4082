//! Every octet popgate sends to an SMTP client is produced here: a reply
//! code, an optional RFC 3463 enhanced status code (RFC 2034), and one or
//! more text lines (`250-…` continuation lines, `250 …` last).

/// An RFC 3463 enhanced status code, `class.subject.detail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enhanced(pub u8, pub u16, pub u16);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced: Option<Enhanced>,
    /// At least one line; each without a line end.
    pub lines: Vec<String>,
}

impl Reply {
    pub fn new(code: u16, enhanced: Option<Enhanced>, text: impl Into<String>) -> Self {
        Reply { code, enhanced, lines: vec![text.into()] }
    }

    /// A reply with an enhanced code.
    pub fn with(code: u16, (class, subject, detail): (u8, u16, u16), text: impl Into<String>) -> Self {
        Reply::new(code, Some(Enhanced(class, subject, detail)), text)
    }

    pub fn lines(code: u16, lines: Vec<String>) -> Self {
        debug_assert!(!lines.is_empty());
        Reply { code, enhanced: None, lines }
    }

    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    /// Appends the wire form of this reply to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let last = self.lines.len().saturating_sub(1);
        for (i, line) in self.lines.iter().enumerate() {
            out.extend_from_slice(self.code.to_string().as_bytes());
            out.push(if i == last { b' ' } else { b'-' });
            if let Some(Enhanced(c, s, d)) = self.enhanced {
                out.extend_from_slice(format!("{c}.{s}.{d} ").as_bytes());
            }
            // Our own text (or an upstream's, relayed) must never carry a
            // line end: it would forge reply lines.
            out.extend(line.bytes().map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }));
            out.extend_from_slice(b"\r\n");
        }
        if self.lines.is_empty() {
            out.extend_from_slice(format!("{} \r\n", self.code).as_bytes());
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        self.write_to(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_forms() {
        assert_eq!(Reply::with(250, (2, 1, 0), "Ok").to_bytes(), b"250 2.1.0 Ok\r\n");
        assert_eq!(Reply::new(354, None, "go").to_bytes(), b"354 go\r\n");
        assert_eq!(Reply::lines(250, vec!["host".into(), "SIZE 10".into()]).to_bytes(), b"250-host\r\n250 SIZE 10\r\n");
        assert_eq!(Reply::with(550, (5, 7, 1), "a\r\n250 forged").to_bytes(), b"550 5.7.1 a  250 forged\r\n");
    }
}
