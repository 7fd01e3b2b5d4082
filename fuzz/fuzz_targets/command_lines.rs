//! Arbitrary bytes, cut at an arbitrary chunk size, through the line reader
//! and the parser: never a panic, never a buffer past the limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use popgate::pop3::{Command, Line, LineReader};

fuzz_target!(|input: (u8, &[u8])| {
    let (chunk, bytes) = input;
    let chunk = usize::from(chunk).max(1);
    let mut reader = LineReader::new();
    for piece in bytes.chunks(chunk) {
        reader.push(piece);
        while let Some(line) = reader.next_line(255) {
            if let Line::Complete(line) = line {
                assert!(line.len() <= 253);
                let _ = Command::parse(&line);
            }
        }
        assert!(reader.buffered() <= 255 + chunk);
    }
});
