//! Any stored message, in any chunking: what a client decodes from RETR is
//! exactly the canonical form, whose length is the size LIST announced.
#![no_main]

use libfuzzer_sys::fuzz_target;
use popgate::canonical::{canonical_size, canonicalize};
use popgate::pop3::BodyEncoder;

fuzz_target!(|input: (u8, &[u8])| {
    let (chunk, message) = input;
    let mut encoder = BodyEncoder::whole();
    let mut wire = Vec::new();
    for piece in message.chunks(usize::from(chunk).max(1)) {
        encoder.push(piece, &mut wire);
    }
    encoder.finish(&mut wire);
    assert_eq!(encoder.octets(), canonical_size(message));
    // Decode as a client: split at CRLF, stop at ".", un-stuff.
    let mut decoded = Vec::new();
    let mut rest = &wire[..];
    loop {
        let i = rest.windows(2).position(|w| w == b"\r\n").expect("CRLF lines");
        let line = &rest[..i];
        rest = &rest[i + 2..];
        if line == b"." {
            assert!(rest.is_empty());
            break;
        }
        decoded.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
        decoded.extend_from_slice(b"\r\n");
    }
    assert_eq!(decoded, canonicalize(message));
});
