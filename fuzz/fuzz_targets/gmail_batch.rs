//! The Gmail batch (multipart/mixed) parser and error bodies
//! (src/backend/gmail/wire.rs): never a panic on
//! anything a server sends, and a response built from parts parses back to
//! exactly those parts.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use popgate::backend::gmail::wire;
use wire::{BatchPart, boundary_of, parse_batch};

#[derive(Arbitrary, Debug)]
struct Part<'a> {
    item: u16,
    status: u16,
    retry_after: Option<u32>,
    body: &'a [u8],
    lf_only: bool,
}

#[derive(Arbitrary, Debug)]
enum Input<'a> {
    Bytes { content_type: &'a str, boundary: &'a str, body: &'a [u8], status: u16 },
    Built { boundary: u32, parts: Vec<Part<'a>>, preamble: &'a [u8] },
}

fuzz_target!(|input: Input| match input {
    Input::Bytes { content_type, boundary, body, status } => {
        let _ = boundary_of(content_type);
        let _ = parse_batch(boundary, body);
        if let Ok(status) = reqwest::StatusCode::from_u16(status.max(100)) {
            let _ = wire::judge("fuzz", status, body);
        }
    }
    Input::Built { boundary, parts, preamble } => {
        let boundary = format!("batch_{boundary:08x}");
        let delimiter = format!("--{boundary}");
        let contains = |hay: &[u8]| hay.windows(delimiter.len()).any(|w| w == delimiter.as_bytes());
        if contains(preamble) || parts.iter().any(|p| contains(p.body)) {
            return;
        }
        assert_eq!(boundary_of(&format!("multipart/mixed; boundary={boundary}")).as_deref(), Some(&*boundary));
        let mut body = preamble.to_vec();
        let mut want = Vec::new();
        for p in &parts {
            let status = 100 + p.status % 500;
            let nl = if p.lf_only { "\n" } else { "\r\n" };
            let mut head = format!(
                "{nl}{delimiter}{nl}Content-Type: application/http{nl}Content-ID: <response-item-{}>{nl}{nl}\
                 HTTP/1.1 {status} Whatever{nl}Content-Type: application/json{nl}",
                p.item
            );
            if let Some(after) = p.retry_after {
                head.push_str(&format!("Retry-After: {after}{nl}"));
            }
            head.push_str(nl);
            body.extend_from_slice(head.as_bytes());
            body.extend_from_slice(p.body);
            want.push(BatchPart {
                item: usize::from(p.item),
                status,
                retry_after: p.retry_after.map(u64::from),
                body: p.body.to_vec(),
            });
        }
        body.extend_from_slice(format!("\r\n{delimiter}--\r\n").as_bytes());
        let got = parse_batch(&boundary, &body);
        if parts.is_empty() {
            assert!(got.is_ok_and(|p| p.is_empty()));
            return;
        }
        let got = got.unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&body)));
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!((g.item, g.status, g.retry_after), (w.item, w.status, w.retry_after));
            // The line end before a delimiter belongs to it: a body ending in
            // CR followed by an LF-only delimiter line is read without its CR.
            let lf_next = parts.get(i + 1).is_some_and(|p| p.lf_only);
            let body = match w.body.strip_suffix(b"\r") {
                Some(trimmed) if lf_next => trimmed,
                _ => &w.body[..],
            };
            assert!(g.body == body, "part {i}: body {:?}, want {:?}", g.body, body);
        }
    }
});
