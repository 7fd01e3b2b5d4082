//! The Gmail `format=raw` extractor (src/backend/gmail/wire.rs), fed what a hostile or odd server might send, at two chunk
//! sizes and whole:
//! - the result (message octets, or an error) never depends on chunking;
//! - a built response (a message, base64url padded or not, JSON escapes
//!   such as `\u003d` and `\/` at random, decoy keys and strings) decodes to
//!   exactly the message;
//! - any document serde_json accepts gives what serde_json's value of the
//!   first top-level `raw` decodes to.
#![no_main]

use popgate::backend::gmail::wire;

use std::fmt;

use arbitrary::Arbitrary;
use base64::Engine as _;
use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use libfuzzer_sys::fuzz_target;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use wire::RawExtractor;

#[derive(Arbitrary, Debug)]
enum Input<'a> {
    Built { message: &'a [u8], padded: bool, escapes: &'a [u8], decoys: u8, cuts: (u16, u16) },
    Bytes { json: &'a [u8], cuts: (u16, u16) },
}

fn extract(json: &[u8], chunk: usize) -> Result<Vec<u8>, String> {
    let mut extractor = RawExtractor::new();
    let mut out = Vec::new();
    for piece in json.chunks(chunk.max(1)) {
        out.extend_from_slice(&extractor.feed(piece)?);
        if extractor.is_done() {
            break;
        }
    }
    extractor.finish()?;
    Ok(out)
}

/// Whole, and at two chunk sizes: the same answer.
fn extract_everywhere(json: &[u8], cuts: (u16, u16)) -> Result<Vec<u8>, String> {
    let whole = extract(json, json.len());
    for chunk in [usize::from(cuts.0 % 64), usize::from(cuts.1)] {
        let cut = extract(json, chunk);
        assert_eq!(whole.is_ok(), cut.is_ok(), "chunk {chunk}: {whole:?} whole, {cut:?} cut");
        if let (Ok(a), Ok(b)) = (&whole, &cut) {
            assert!(a == b, "chunk {chunk} decodes differently");
        }
    }
    whole
}

/// JSON-escapes one character of a string's content in one of the forms
/// Google (and JSON) allow.
fn escape(c: char, how: u8, out: &mut String) {
    match (c, how % 4) {
        (_, 0) => out.push(c),
        ('/', 1) => out.push_str("\\/"),
        (_, 1 | 2) => out.push_str(&format!("\\u{:04x}", c as u32)),
        (_, _) => out.push_str(&format!("\\u{:04X}", c as u32)),
    }
}

/// The first top-level `raw` string, as serde_json reads the document.
struct FirstRaw(Option<String>);

impl<'de> serde::Deserialize<'de> for FirstRaw {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FirstRaw;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FirstRaw, A::Error> {
                let mut raw: Option<String> = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key == "raw" && raw.is_none() {
                        match map.next_value::<serde_json::Value>()? {
                            serde_json::Value::String(s) => raw = Some(s),
                            _ => return Err(de::Error::custom("raw is no string")),
                        }
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(FirstRaw(raw))
            }
        }
        d.deserialize_map(V)
    }
}

const BASE64URL: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

fuzz_target!(|input: Input| match input {
    Input::Built { message, padded, escapes, decoys, cuts } => {
        let raw = if padded { URL_SAFE.encode(message) } else { URL_SAFE_NO_PAD.encode(message) };
        let mut value = String::new();
        for (i, c) in raw.chars().enumerate() {
            escape(c, escapes.get(i % escapes.len().max(1)).copied().unwrap_or(0), &mut value);
        }
        let mut key = String::new();
        for (i, c) in "raw".chars().enumerate() {
            escape(c, escapes.get(i).copied().unwrap_or(0) >> 4, &mut key);
        }
        let mut json = String::from("{");
        if decoys & 1 == 1 {
            json.push_str(r#""snippet":"he wrote \"raw\":\"AAAA\" \\","#);
        }
        if decoys & 2 == 2 {
            json.push_str(r#""payload":{"raw":"QUJD","parts":[{"raw":"QUJD"}]},"labelIds":["raw","\u003c\/b\u003e"],"#);
        }
        if decoys & 4 == 4 {
            json.push_str(r#""sizeEstimate" : 123 , "rawr":"QUJD", "ra":"QUJD","#);
        }
        json.push_str(&format!("\"{key}\" :\t\"{value}\""));
        if decoys & 8 == 8 {
            json.push_str(r#","raw":"QUJD","internalDate":"1700000000000""#);
        }
        json.push('}');
        let got = extract_everywhere(json.as_bytes(), cuts);
        assert!(got.as_deref() == Ok(message), "{json}: {got:?}");
    }
    Input::Bytes { json, cuts } => {
        let got = extract_everywhere(json, cuts);
        if let Ok(FirstRaw(Some(raw))) = serde_json::from_slice::<FirstRaw>(json) {
            let want = BASE64URL.decode(raw.as_bytes()).map_err(|e| e.to_string());
            assert_eq!(got.is_ok(), want.is_ok(), "{got:?} but serde_json + base64 give {want:?}");
            if let (Ok(a), Ok(b)) = (&got, &want) {
                assert!(a == b, "decodes differently from serde_json + base64");
            }
        }
    }
});
