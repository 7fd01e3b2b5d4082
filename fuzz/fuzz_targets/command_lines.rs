//! Arbitrary bytes, cut at an arbitrary chunk size, through the line reader
//! and the parser: never a panic, never a buffer past the limit, and no
//! line's content longer than the limit less its CRLF (a bare LF counts as
//! the CRLF it stands for).
#![no_main]

use libfuzzer_sys::fuzz_target;
use popgate::pop3::{Command, Line, LineReader};

fuzz_target!(|input: (u8, &[u8])| {
    let (chunk, bytes) = input;
    let chunk = usize::from(chunk).max(1);
    let mut reader = LineReader::new();
    let mut lines = Vec::new();
    for piece in bytes.chunks(chunk) {
        reader.push(piece);
        while let Some(line) = reader.next_line(255) {
            if let Line::Complete(line) = &line {
                assert!(line.len() <= 253);
                assert!(!line.contains(&b'\n'));
                let _ = Command::parse(line);
            }
            lines.push(line);
        }
        assert!(reader.buffered() <= 255 + chunk);
    }
    // The same lines whatever the chunking.
    let mut whole = LineReader::new();
    whole.push(bytes);
    let mut again = Vec::new();
    while let Some(line) = whole.next_line(255) {
        again.push(line);
    }
    assert_eq!(lines, again);
});
