//! What an IMAP server sends, read by the IMAP backend's own code
//! (src/backend/imap: `Literal8`, the partial-FETCH reader, the refusal
//! classification, UIDL formats and UID sets), at every way of splitting
//! the octets into reads.
//!
//! - `Literal8` (the BINARY[] rewriter under async-imap) gives the same
//!   octets however the stream is split, never more than it was given, and
//!   changes nothing in a stream without `BINARY[`.
//! - A partial FETCH hands out at most the octets it asked for, only for
//!   its UID, and a reply that is whole parses the same when split.
//! - A refusal is never read as a wrong password unless it says so; the
//!   backoff it imposes is capped; the reason logged is bounded.
//! - A UIDL template that is accepted gives 1–70 printable octets and
//!   different UIDLs for different UIDs; UID sets cover exactly the UIDs.
#![no_main]

use std::collections::BTreeSet;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use popgate::backend::imap::fuzzing::{
    Literal8, MAX_BACKOFF, Meaning, UidlFormat, classify_login_refusal, classify_refusal, nul_checks,
    partial_fetch, read_refusal, suggested_backoff, truncate, uid_sets,
};
use popgate::mail::BackendError;

#[derive(Arbitrary, Debug)]
enum Input<'a> {
    /// Server octets, and where to split them into reads.
    Stream { octets: &'a [u8], cuts: Vec<u16>, uid: u32, offset: u32, chunk: u16 },
    /// A FETCH reply built around a literal (so the parser gets past the
    /// framing), in a BODY[] or BINARY[] form.
    Fetch { uid: u32, other_uid: u32, offset: u32, chunk: u16, data: &'a [u8], binary: bool, noise: &'a [u8] },
    Refusal { text: &'a str, bad: bool },
    Uidl { template: &'a str, uids: (u32, u32), uidvalidity: u32 },
    UidSets { uids: Vec<u32>, max_len: u8 },
    Nuls { body: &'a [u8], binary: &'a [u8] },
}

fn rewrite(pieces: &[&[u8]]) -> Vec<u8> {
    let mut literal8 = Literal8::default();
    let mut out = Vec::new();
    for piece in pieces {
        literal8.feed(piece, &mut out);
    }
    literal8.finish(&mut out);
    out
}

fn split<'a>(octets: &'a [u8], cuts: &[u16]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = cuts.iter().map(|&c| usize::from(c) % (octets.len() + 1)).collect();
    at.sort_unstable();
    let mut pieces = Vec::new();
    let mut from = 0;
    for cut in at {
        pieces.push(&octets[from..cut]);
        from = cut;
    }
    pieces.push(&octets[from..]);
    pieces
}

fuzz_target!(|input: Input| match input {
    Input::Stream { octets, cuts, uid, offset, chunk } => {
        let whole = rewrite(&[octets]);
        assert!(whole.len() <= octets.len(), "Literal8 made the stream longer");
        if !octets.windows(7).any(|w| w.eq_ignore_ascii_case(b"BINARY[")) {
            assert_eq!(whole, octets, "changed a stream without BINARY[");
        }
        assert_eq!(rewrite(&split(octets, &cuts)), whole, "depends on how the stream was split");
        for size in [1, 2, 3, 7, 64] {
            let pieces: Vec<&[u8]> = octets.chunks(size).collect();
            assert_eq!(rewrite(&pieces), whole, "read {size} at a time");
        }
        let chunk = u32::from(chunk).max(1);
        if let Ok(body) = partial_fetch(octets, uid, offset, chunk) {
            assert!(body.len() <= chunk as usize);
        }
    }
    Input::Fetch { uid, other_uid, offset, chunk, data, binary, noise } => {
        let chunk = u32::from(chunk).max(1);
        let (item, tilde) = if binary { ("BINARY[]", "~") } else { ("BODY[]", "") };
        let reply = |uid: u32| {
            let mut r = format!("* 1 FETCH (UID {uid} {item}<{offset}> {tilde}{{{}}}\r\n", data.len()).into_bytes();
            r.extend_from_slice(data);
            r.extend_from_slice(b")\r\n");
            r
        };
        // Another message's FETCH first, and noise the server may add.
        let mut server = if other_uid != uid { reply(other_uid) } else { Vec::new() };
        server.extend_from_slice(&reply(uid));
        if !noise.contains(&b'\n') {
            server.extend_from_slice(noise);
        }
        match partial_fetch(&server, uid, offset, chunk) {
            Ok(body) => assert_eq!(body, data, "a FETCH of UID {uid} at {offset}"),
            Err(gone) => {
                if data.len() > chunk as usize {
                    assert!(!gone, "too long must be said, not taken for gone");
                } else {
                    // NIL-free literal of the right UID and origin: only a
                    // parse failure of the other UID's reply can hide it.
                    assert!(other_uid != uid, "a well-formed FETCH of {uid} was missed: {server:?}");
                }
            }
        }
    }
    Input::Refusal { text, bad } => {
        let refusal = read_refusal(text);
        if let Some(wait) = refusal.backoff {
            assert!(wait <= MAX_BACKOFF);
        }
        assert_eq!(suggested_backoff(text), refusal.backoff);
        let login = classify_login_refusal(text);
        if matches!(login, BackendError::AuthFailed) {
            assert_eq!(refusal.meaning, Meaning::WrongPassword, "{text:?}");
        }
        for error in [login, classify_refusal(bad, text, "fetching")] {
            let reason = error.to_string();
            assert!(reason.len() <= 1024, "unbounded reason: {} octets", reason.len());
        }
        let cut = truncate(text, 40);
        assert!(cut.len() <= 40 + '…'.len_utf8());
    }
    Input::Uidl { template, uids: (a, b), uidvalidity } => {
        let Ok(format) = UidlFormat::parse(template) else { return };
        for uid in [a, b, 0, 1, u32::MAX] {
            let uidl = format.render(uid, uidvalidity);
            assert!((1..=70).contains(&uidl.len()), "{template:?} gives {uidl:?}");
            assert!(uidl.bytes().all(|c| (0x21..=0x7e).contains(&c)), "{template:?} gives {uidl:?}");
        }
        if a != b {
            assert_ne!(format.render(a, uidvalidity), format.render(b, uidvalidity), "{template:?}: {a} and {b}");
        }
    }
    Input::UidSets { uids, max_len } => {
        let max_len = usize::from(max_len).max(21);
        let mut covered = BTreeSet::new();
        for set in uid_sets(&uids, max_len) {
            assert!(!set.is_empty() && set.len() <= max_len, "{set:?}");
            for item in set.split(',') {
                let (start, end) = item.split_once(':').unwrap_or((item, item));
                let (start, end): (u32, u32) = (start.parse().unwrap(), end.parse().unwrap());
                assert!(start <= end);
                for uid in start..=end.min(start.saturating_add(10_000)) {
                    assert!(covered.insert(uid), "{uid} twice");
                }
            }
        }
        let wanted: BTreeSet<u32> = uids.into_iter().collect();
        if covered.len() < 10_000 {
            assert_eq!(covered, wanted);
        }
    }
    Input::Nuls { body, binary } => {
        let (_, replace) = nul_checks(body, binary);
        if replace {
            assert_eq!(body.len(), binary.len(), "a replacement must keep the size LIST announced");
        }
    }
});
