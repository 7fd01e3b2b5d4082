//! Any stored message, at two chunk sizes: RETR's octets equal those of the
//! independent byte-at-a-time reference (`canonical::reference`), their
//! count is the size LIST announced (counted by the reference too), and a
//! client decodes the canonical form; TOP n equals the reference's TOP n and
//! is a prefix of RETR.
#![no_main]

use libfuzzer_sys::fuzz_target;
use popgate::canonical::reference::{NaiveEncoder, naive_size};
use popgate::canonical::{canonical_size, canonicalize};
use popgate::pop3::BodyEncoder;

/// As the server streams: stops reading once a TOP has all it needs.
fn encode(mut encoder: BodyEncoder, message: &[u8], chunk: usize) -> (Vec<u8>, u64) {
    let mut wire = Vec::new();
    for piece in message.chunks(chunk.max(1)) {
        encoder.push(piece, &mut wire);
        if encoder.is_done() {
            break;
        }
    }
    encoder.finish(&mut wire);
    (wire, encoder.octets())
}

fn reference(mut encoder: NaiveEncoder, message: &[u8]) -> Vec<u8> {
    let mut wire = Vec::new();
    encoder.push(message, &mut wire);
    encoder.finish(&mut wire);
    wire
}

fuzz_target!(|input: (u8, u8, u8, &[u8])| {
    let (chunk_a, chunk_b, top_lines, message) = input;
    let size = naive_size(message);
    assert_eq!(canonical_size(message), size);
    let want = reference(NaiveEncoder::whole(), message);
    let canonical = canonicalize(message);
    assert_eq!(popgate::canonical::reference::client_decode(&want), canonical);
    assert_eq!(canonical.len() as u64, size);
    let top_lines = u64::from(top_lines % 8);
    let want_top = reference(NaiveEncoder::top(top_lines), message);
    for chunk in [usize::from(chunk_a), usize::from(chunk_b) * 37 + 1] {
        let (wire, octets) = encode(BodyEncoder::whole(), message, chunk);
        assert!(wire == want, "RETR differs from the reference at chunk size {chunk}");
        assert_eq!(octets, size);
        let (top, _) = encode(BodyEncoder::top(top_lines), message, chunk);
        assert!(top == want_top, "TOP {top_lines} differs from the reference at chunk size {chunk}");
        assert!(canonical.starts_with(&popgate::canonical::reference::client_decode(&top)));
    }
});
