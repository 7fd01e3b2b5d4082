//! POP3 command lines: parsing (`Command::parse`); the framing is the
//! shared bounded `LineReader` (`crate::lines`), with RFC 2449's limit. No
//! I/O here.

use crate::mail::Secret;

pub use crate::lines::{Line, LineReader};

/// A message number as the client wrote it (validated against the maildrop
/// by the session, not here).
pub type MessageNumber = u32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    User(String),
    Pass(Secret),
    Auth { mechanism: Option<String>, initial_response: Option<Secret> },
    Capa,
    Stls,
    Quit,
    Stat,
    List(Option<MessageNumber>),
    Retr(MessageNumber),
    Dele(MessageNumber),
    Noop,
    Rset,
    Top(MessageNumber, u64),
    Uidl(Option<MessageNumber>),
    Apop,
}

impl Command {
    /// The command's keyword, for logs and metrics (never its arguments).
    pub fn name(&self) -> &'static str {
        match self {
            Command::User(_) => "USER",
            Command::Pass(_) => "PASS",
            Command::Auth { .. } => "AUTH",
            Command::Capa => "CAPA",
            Command::Stls => "STLS",
            Command::Quit => "QUIT",
            Command::Stat => "STAT",
            Command::List(_) => "LIST",
            Command::Retr(_) => "RETR",
            Command::Dele(_) => "DELE",
            Command::Noop => "NOOP",
            Command::Rset => "RSET",
            Command::Top(..) => "TOP",
            Command::Uidl(_) => "UIDL",
            Command::Apop => "APOP",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("empty command")]
    Empty,
    #[error("unknown command")]
    Unknown,
    #[error("{0}")]
    Syntax(&'static str),
    #[error("command line too long")]
    TooLong,
}

impl Command {
    pub fn parse(line: &[u8]) -> Result<Command, ParseError> {
        let line = std::str::from_utf8(line).map_err(|_| ParseError::Syntax("command is not UTF-8"))?;
        // PASS keeps everything after the first space: passwords may contain
        // spaces (RFC 1939 allows servers to accept them).
        let (keyword, rest) = match line.split_once(' ') {
            Some((k, r)) => (k, Some(r)),
            None => (line, None),
        };
        if keyword.is_empty() {
            return Err(ParseError::Empty);
        }
        if keyword.len() > 4 {
            return Err(ParseError::Unknown);
        }
        let keyword = keyword.to_ascii_uppercase();
        if keyword == "PASS" {
            return match rest {
                Some(p) if !p.is_empty() => Ok(Command::Pass(Secret::new(p))),
                _ => Err(ParseError::Syntax("PASS needs a password")),
            };
        }
        // RFC 1939 3: keywords and arguments are each separated by a single
        // space. Trailing spaces after a bare keyword are tolerated; an empty
        // argument (two spaces, or a space after the last argument) is noise,
        // which Dovecot refuses too ("LIST 1 ": "Noise after message number").
        // `USER  alice` is thus refused rather than read as `alice` (or as
        // " alice": arguments are printable ASCII and a space separates them).
        let args: Vec<&str> = match rest {
            None => Vec::new(),
            Some(r) if r.bytes().all(|b| b == b' ') => Vec::new(),
            Some(r) => r.split(' ').collect(),
        };
        if args.iter().any(|a| a.is_empty()) {
            return Err(ParseError::Syntax("noise after the arguments: separate them by one space"));
        }
        let none = |cmd: Command| {
            if args.is_empty() { Ok(cmd) } else { Err(ParseError::Syntax("no arguments expected")) }
        };
        match keyword.as_str() {
            "USER" => match args.as_slice() {
                [name] => Ok(Command::User((*name).to_string())),
                [] => Err(ParseError::Syntax("USER needs a name")),
                _ => Err(ParseError::Syntax("USER takes one name")),
            },
            "AUTH" => match args.as_slice() {
                [] => Ok(Command::Auth { mechanism: None, initial_response: None }),
                [m] => Ok(Command::Auth { mechanism: Some(m.to_ascii_uppercase()), initial_response: None }),
                [m, ir] => Ok(Command::Auth {
                    mechanism: Some(m.to_ascii_uppercase()),
                    initial_response: Some(Secret::new(*ir)),
                }),
                _ => Err(ParseError::Syntax("AUTH takes a mechanism and an optional initial response")),
            },
            "CAPA" => none(Command::Capa),
            "STLS" => none(Command::Stls),
            "QUIT" => none(Command::Quit),
            "STAT" => none(Command::Stat),
            "NOOP" => none(Command::Noop),
            "RSET" => none(Command::Rset),
            "APOP" => Ok(Command::Apop),
            "LIST" => optional_number(&args).map(Command::List),
            "UIDL" => optional_number(&args).map(Command::Uidl),
            "RETR" => one_number(&args).map(Command::Retr),
            "DELE" => one_number(&args).map(Command::Dele),
            "TOP" => match args.as_slice() {
                [m, n] => Ok(Command::Top(number(m)?, lines(n)?)),
                _ => Err(ParseError::Syntax("TOP needs a message number and a line count")),
            },
            _ => Err(ParseError::Unknown),
        }
    }
}

fn number(arg: &str) -> Result<MessageNumber, ParseError> {
    if arg.is_empty() || !arg.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseError::Syntax("invalid message number"));
    }
    // Numbers too large for u32 cannot name a message: treat as out of range.
    Ok(arg.parse().unwrap_or(MessageNumber::MAX))
}

fn lines(arg: &str) -> Result<u64, ParseError> {
    if arg.is_empty() || !arg.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseError::Syntax("invalid line count"));
    }
    Ok(arg.parse().unwrap_or(u64::MAX))
}

fn optional_number(args: &[&str]) -> Result<Option<MessageNumber>, ParseError> {
    match args {
        [] => Ok(None),
        [m] => number(m).map(Some),
        _ => Err(ParseError::Syntax("too many arguments")),
    }
}

fn one_number(args: &[&str]) -> Result<MessageNumber, ParseError> {
    match args {
        [m] => number(m),
        [] => Err(ParseError::Syntax("a message number is required")),
        _ => Err(ParseError::Syntax("too many arguments")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let ok: &[(&str, Command)] = &[
            ("USER alice", Command::User("alice".into())),
            ("user alice", Command::User("alice".into())),
            ("PASS a b \"c\\", Command::Pass(Secret::new("a b \"c\\"))),
            ("STAT", Command::Stat),
            ("sTaT", Command::Stat),
            ("LIST", Command::List(None)),
            ("LIST 3", Command::List(Some(3))),
            ("LIST ", Command::List(None)),
            ("STAT  ", Command::Stat),
            ("LIST 0", Command::List(Some(0))),
            ("LIST 99999999999", Command::List(Some(u32::MAX))),
            ("RETR 1", Command::Retr(1)),
            ("DELE 2", Command::Dele(2)),
            ("TOP 1 0", Command::Top(1, 0)),
            ("TOP 1 10", Command::Top(1, 10)),
            ("UIDL", Command::Uidl(None)),
            ("UIDL 7", Command::Uidl(Some(7))),
            ("NOOP", Command::Noop),
            ("RSET", Command::Rset),
            ("QUIT", Command::Quit),
            ("CAPA", Command::Capa),
            ("STLS", Command::Stls),
            ("AUTH", Command::Auth { mechanism: None, initial_response: None }),
            ("AUTH plain", Command::Auth { mechanism: Some("PLAIN".into()), initial_response: None }),
            (
                "AUTH PLAIN AGFsaWNlAHg=",
                Command::Auth { mechanism: Some("PLAIN".into()), initial_response: Some(Secret::new("AGFsaWNlAHg=")) },
            ),
        ];
        for (line, want) in ok {
            assert_eq!(Command::parse(line.as_bytes()).as_ref(), Ok(want), "{line}");
        }
        let bad: &[(&str, ParseError)] = &[
            ("", ParseError::Empty),
            ("FOO", ParseError::Unknown),
            ("RETRIEVE 1", ParseError::Unknown),
            ("RETR", ParseError::Syntax("a message number is required")),
            ("RETR x", ParseError::Syntax("invalid message number")),
            ("RETR -1", ParseError::Syntax("invalid message number")),
            ("RETR +1", ParseError::Syntax("invalid message number")),
            ("RETR 1 2", ParseError::Syntax("too many arguments")),
            ("TOP 1", ParseError::Syntax("TOP needs a message number and a line count")),
            ("TOP 1 x", ParseError::Syntax("invalid line count")),
            ("STAT 1", ParseError::Syntax("no arguments expected")),
            ("PASS", ParseError::Syntax("PASS needs a password")),
            ("USER", ParseError::Syntax("USER needs a name")),
            ("USER a b", ParseError::Syntax("USER takes one name")),
            ("LIST 1 ", ParseError::Syntax("noise after the arguments: separate them by one space")),
            ("RETR 1 ", ParseError::Syntax("noise after the arguments: separate them by one space")),
            ("TOP 1  2", ParseError::Syntax("noise after the arguments: separate them by one space")),
            ("USER  alice", ParseError::Syntax("noise after the arguments: separate them by one space")),
            ("USER alice ", ParseError::Syntax("noise after the arguments: separate them by one space")),
            ("AUTH PLAIN  AGFsaWNlAHg=", ParseError::Syntax("noise after the arguments: separate them by one space")),
        ];
        for (line, want) in bad {
            assert_eq!(Command::parse(line.as_bytes()).as_ref(), Err(want), "{line:?}");
        }
        assert!(Command::parse(b"USER \xff").is_err());
    }

    fn frame_all(input: &[u8], chunk: usize, limit: usize) -> Vec<Line> {
        let mut reader = LineReader::new();
        let mut out = Vec::new();
        for piece in input.chunks(chunk) {
            reader.push(piece);
            while let Some(line) = reader.next_line(limit) {
                out.push(line);
            }
            assert!(reader.buffered() <= limit + chunk, "buffer grew past the limit");
        }
        out
    }

    /// Every command, pipelined in one stream, parses the same at every
    /// chunk size from 1 to 512.
    #[test]
    fn every_chunk_size_gives_the_same_commands() {
        let script = b"CAPA\r\nUSER alice\r\nPASS s3cr et\r\nSTAT\r\nLIST\r\nLIST 1\r\nUIDL\r\nUIDL 2\r\n\
TOP 1 5\r\nRETR 1\r\nDELE 1\r\nRSET\r\nNOOP\r\nAUTH PLAIN AGFsaWNlAHg=\r\nSTLS\r\nlist 2\nQUIT\r\n";
        let want: Vec<Line> = frame_all(script, script.len(), 255);
        assert_eq!(want.len(), 17);
        let parsed: Vec<_> = want
            .iter()
            .map(|l| match l {
                Line::Complete(b) => Command::parse(b).expect("parses"),
                Line::TooLong => panic!("too long"),
            })
            .collect();
        assert_eq!(parsed[16], Command::Quit);
        assert_eq!(parsed[15], Command::List(Some(2)));
        for chunk in 1..=512 {
            assert_eq!(frame_all(script, chunk, 255), want, "chunk size {chunk}");
        }
    }

    #[test]
    fn long_lines_are_dropped_without_buffering() {
        let mut input = vec![b'A'; 100_000];
        input.extend_from_slice(b"\r\nNOOP\r\n");
        for chunk in [1, 7, 255, 256, 4096, 100_008] {
            let lines = frame_all(&input, chunk, 255);
            assert_eq!(lines, vec![Line::TooLong, Line::Complete(b"NOOP".to_vec())], "chunk {chunk}");
        }
        // Exactly at the limit (253 octets + CRLF = 255) is fine; one more is not.
        let at = [vec![b'x'; 253], b"\r\n".to_vec()].concat();
        assert!(matches!(frame_all(&at, 1000, 255)[0], Line::Complete(_)));
        let over = [vec![b'x'; 254], b"\r\n".to_vec()].concat();
        assert_eq!(frame_all(&over, 1000, 255)[0], Line::TooLong);
        // A bare LF stands for CRLF: 253 octets + LF is fine, 254 + LF (255
        // octets sent, 256 as CRLF) is not, at every chunk size.
        for chunk in [1, 2, 253, 254, 255, 1000] {
            let at = [vec![b'x'; 253], b"\n".to_vec()].concat();
            assert_eq!(frame_all(&at, chunk, 255), vec![Line::Complete(vec![b'x'; 253])], "chunk {chunk}");
            let over = [vec![b'x'; 254], b"\nNOOP\n".to_vec()].concat();
            assert_eq!(frame_all(&over, chunk, 255), vec![Line::TooLong, Line::Complete(b"NOOP".to_vec())]);
        }
    }

    #[test]
    fn clear_drops_pipelined_plaintext() {
        let mut reader = LineReader::new();
        reader.push(b"STLS\r\nUSER evil\r\n");
        assert_eq!(reader.next_line(255), Some(Line::Complete(b"STLS".to_vec())));
        reader.clear();
        assert_eq!(reader.next_line(255), None);
    }
}
