//! SMTP command lines: framing (`LineReader`) and parsing (`Command::parse`,
//! RFC 5321 4.1 with the RFC 1870, 6152, 6531 and 4954 parameters).
//!
//! The framing is the shared bounded `LineReader` (`crate::lines`); it
//! frames the DATA section too, with the session's data line limit. No I/O
//! here.

use crate::mail::Secret;

pub use crate::lines::{Line, LineReader};

/// MAIL FROM parameters (RFC 1870 SIZE, RFC 6152 BODY, RFC 6531 SMTPUTF8).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailParameters {
    pub size: Option<u64>,
    pub eight_bit: bool,
    pub smtputf8: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    StartTls,
    Auth {
        mechanism: String,
        initial_response: Option<Secret>,
    },
    /// The reverse-path, `""` for the null path `<>`.
    Mail {
        from: String,
        parameters: MailParameters,
    },
    Rcpt {
        to: String,
    },
    Data,
    Rset,
    Noop,
    Quit,
    Vrfy,
    Help,
}

impl Command {
    /// The command's keyword, for logs and metrics (never its arguments).
    pub fn name(&self) -> &'static str {
        match self {
            Command::Ehlo(_) => "EHLO",
            Command::Helo(_) => "HELO",
            Command::StartTls => "STARTTLS",
            Command::Auth { .. } => "AUTH",
            Command::Mail { .. } => "MAIL",
            Command::Rcpt { .. } => "RCPT",
            Command::Data => "DATA",
            Command::Rset => "RSET",
            Command::Noop => "NOOP",
            Command::Quit => "QUIT",
            Command::Vrfy => "VRFY",
            Command::Help => "HELP",
        }
    }
}

/// Why a command line was refused; each maps to one reply in the session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("unknown command")]
    Unknown,
    #[error("{0}")]
    Syntax(&'static str),
    /// A MAIL parameter this server does not know (RFC 5321 555).
    #[error("unsupported parameter {0}")]
    Parameter(String),
    /// A non-ASCII address without SMTPUTF8 (RFC 6531 553 5.6.7).
    #[error("non-ASCII address without SMTPUTF8")]
    NeedsUtf8,
}

/// The longest path accepted (RFC 5321 4.5.3.1.3: 256 octets).
pub const MAX_PATH: usize = 256;

impl Command {
    pub fn parse(line: &[u8]) -> Result<Command, ParseError> {
        let text = std::str::from_utf8(line).map_err(|_| ParseError::Syntax("command line is not UTF-8"))?;
        if text.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
            return Err(ParseError::Syntax("control characters in the command line"));
        }
        let (verb, rest) = match text.split_once(' ') {
            Some((v, r)) => (v, r),
            None => (text, ""),
        };
        let none =
            |c: Command| if rest.trim().is_empty() { Ok(c) } else { Err(ParseError::Syntax("no arguments allowed")) };
        match verb.to_ascii_uppercase().as_str() {
            "EHLO" | "HELO" => {
                let domain = rest.trim();
                if domain.is_empty() || domain.len() > 255 || domain.contains(' ') {
                    return Err(ParseError::Syntax("a domain or address literal is needed"));
                }
                Ok(if verb.eq_ignore_ascii_case("EHLO") {
                    Command::Ehlo(domain.to_string())
                } else {
                    Command::Helo(domain.to_string())
                })
            }
            "STARTTLS" => none(Command::StartTls),
            "DATA" => none(Command::Data),
            "RSET" => none(Command::Rset),
            "QUIT" => none(Command::Quit),
            // RFC 5321 4.1.1.9: NOOP may carry a string, which is ignored.
            "NOOP" => Ok(Command::Noop),
            "VRFY" => Ok(Command::Vrfy),
            "HELP" => Ok(Command::Help),
            "AUTH" => {
                let mut parts = rest.split(' ').filter(|p| !p.is_empty());
                let mechanism = parts.next().ok_or(ParseError::Syntax("AUTH needs a mechanism"))?.to_ascii_uppercase();
                let initial_response = parts.next().map(Secret::new);
                if parts.next().is_some() {
                    return Err(ParseError::Syntax("too many AUTH arguments"));
                }
                Ok(Command::Auth { mechanism, initial_response })
            }
            "MAIL" => {
                let (from, params) = path_argument(rest, "FROM:")?;
                let mut parameters = MailParameters::default();
                for param in params.split(' ').filter(|p| !p.is_empty()) {
                    let (key, value) = match param.split_once('=') {
                        Some((k, v)) => (k, Some(v)),
                        None => (param, None),
                    };
                    match (key.to_ascii_uppercase().as_str(), value) {
                        ("SIZE", Some(v)) => {
                            let size = v.parse().map_err(|_| ParseError::Syntax("SIZE needs a number"))?;
                            parameters.size = Some(size);
                        }
                        ("BODY", Some(v)) if v.eq_ignore_ascii_case("7BIT") => parameters.eight_bit = false,
                        ("BODY", Some(v)) if v.eq_ignore_ascii_case("8BITMIME") => parameters.eight_bit = true,
                        ("SMTPUTF8", None) => parameters.smtputf8 = true,
                        // RFC 4954 5: the AUTH parameter may be ignored.
                        ("AUTH", Some(_)) => {}
                        _ => return Err(ParseError::Parameter(key.to_string())),
                    }
                }
                if !from.is_ascii() && !parameters.smtputf8 {
                    return Err(ParseError::NeedsUtf8);
                }
                Ok(Command::Mail { from, parameters })
            }
            "RCPT" => {
                let (to, params) = path_argument(rest, "TO:")?;
                if !params.trim().is_empty() {
                    return Err(ParseError::Parameter(params.trim().split(' ').next().unwrap_or("").to_string()));
                }
                if to.is_empty() {
                    return Err(ParseError::Syntax("a recipient address is needed"));
                }
                Ok(Command::Rcpt { to })
            }
            _ => Err(ParseError::Unknown),
        }
    }
}

/// `FROM:<path> params` / `TO:<path> params`: the path without its angle
/// brackets (source routes dropped, RFC 5321 4.1.2) and the rest.
fn path_argument<'a>(rest: &'a str, keyword: &str) -> Result<(String, &'a str), ParseError> {
    let head = rest.get(..keyword.len()).filter(|h| h.eq_ignore_ascii_case(keyword));
    if head.is_none() {
        return Err(ParseError::Syntax(if keyword == "FROM:" {
            "use MAIL FROM:<address>"
        } else {
            "use RCPT TO:<address>"
        }));
    }
    // Some clients put a space after the colon; accept it.
    let rest = rest[keyword.len()..].trim_start();
    let Some(inner) = rest.strip_prefix('<') else {
        return Err(ParseError::Syntax("the address must be in angle brackets"));
    };
    let Some(end) = inner.find('>') else {
        return Err(ParseError::Syntax("the address must be in angle brackets"));
    };
    let mut path = &inner[..end];
    let params = &inner[end + 1..];
    if !params.is_empty() && !params.starts_with(' ') {
        return Err(ParseError::Syntax("a space must follow the address"));
    }
    if path.starts_with('@')
        && let Some((_, mailbox)) = path.split_once(':')
    {
        path = mailbox;
    }
    if path.len() > MAX_PATH {
        return Err(ParseError::Syntax("address too long"));
    }
    if path.contains(['<', ' ', '\t']) {
        return Err(ParseError::Syntax("invalid characters in the address"));
    }
    if !path.is_empty() && !valid_mailbox(path) {
        return Err(ParseError::Syntax("the address must be local-part@domain"));
    }
    Ok((path.to_string(), params))
}

fn valid_mailbox(path: &str) -> bool {
    match path.rsplit_once('@') {
        Some((local, domain)) => !local.is_empty() && !domain.is_empty() && !domain.contains(['"', '\\']),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands() {
        assert_eq!(Command::parse(b"ehlo scanner.local"), Ok(Command::Ehlo("scanner.local".into())));
        assert_eq!(Command::parse(b"HELO [192.0.2.1]"), Ok(Command::Helo("[192.0.2.1]".into())));
        assert!(Command::parse(b"EHLO").is_err());
        assert_eq!(
            Command::parse(b"MAIL FROM:<a@b.example> SIZE=1000 BODY=8BITMIME"),
            Ok(Command::Mail {
                from: "a@b.example".into(),
                parameters: MailParameters { size: Some(1000), eight_bit: true, smtputf8: false }
            })
        );
        assert_eq!(
            Command::parse(b"mail from: <>"),
            Ok(Command::Mail { from: String::new(), parameters: MailParameters::default() })
        );
        assert_eq!(
            Command::parse(b"RCPT TO:<@relay.example:x@y.example>"),
            Ok(Command::Rcpt { to: "x@y.example".into() })
        );
        assert_eq!(Command::parse(b"MAIL FROM:<a@b> FOO=1"), Err(ParseError::Parameter("FOO".into())));
        assert_eq!(Command::parse("MAIL FROM:<é@b>".as_bytes()), Err(ParseError::NeedsUtf8));
        assert!(Command::parse("MAIL FROM:<é@b> SMTPUTF8".as_bytes()).is_ok());
        assert!(matches!(Command::parse(b"MAIL FROM:a@b"), Err(ParseError::Syntax(_))));
        assert!(matches!(Command::parse(b"MAIL FROM:<a@b>x"), Err(ParseError::Syntax(_))));
        assert!(matches!(Command::parse(b"RCPT TO:<nodomain>"), Err(ParseError::Syntax(_))));
        assert!(matches!(Command::parse(b"RCPT TO:<>"), Err(ParseError::Syntax(_))));
        assert!(matches!(Command::parse(b"DATA now"), Err(ParseError::Syntax(_))));
        assert!(matches!(Command::parse(b"MAIL FROM:<a\x00@b>"), Err(ParseError::Syntax(_))));
        assert_eq!(Command::parse(b"XYZZY"), Err(ParseError::Unknown));
        let long = format!("RCPT TO:<{}@b.example>", "a".repeat(300));
        assert!(matches!(Command::parse(long.as_bytes()), Err(ParseError::Syntax(_))));
        assert_eq!(
            Command::parse(b"AUTH plain AGFAYgBj"),
            Ok(Command::Auth { mechanism: "PLAIN".into(), initial_response: Some(Secret::new("AGFAYgBj")) })
        );
    }

    #[test]
    fn reader_bounds_lines_at_every_chunk_size() {
        let input = b"EHLO a\r\nMAIL FROM:<x@y>\nxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\nQUIT\r\n";
        for chunk in 1..input.len() {
            let mut reader = LineReader::new();
            let mut lines = Vec::new();
            for piece in input.chunks(chunk) {
                reader.push(piece);
                while let Some(line) = reader.next_line(20) {
                    lines.push(line);
                }
            }
            assert_eq!(
                lines,
                vec![
                    Line::Complete(b"EHLO a".to_vec()),
                    Line::Complete(b"MAIL FROM:<x@y>".to_vec()),
                    Line::TooLong,
                    Line::Complete(b"QUIT".to_vec())
                ],
                "chunk size {chunk}"
            );
            assert!(reader.buffered() == 0);
        }
    }
}
