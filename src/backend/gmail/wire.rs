//! The Gmail API's wire formats that need more than serde: Google's error
//! body and what each error means for POP3, the `multipart/mixed` batch
//! endpoint (many GETs in one HTTP request), and the `format=raw` message
//! resource, whose base64url `raw` field is decoded as it arrives.
//!
//! No I/O here, and never a credential: these functions see bodies only.

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use bytes::Bytes;
use reqwest::StatusCode;
use serde::Deserialize;

use crate::backend::http::Verdict;
use crate::mail::BackendError;

/// `{"error":{"code":403,"message":…,"status":"PERMISSION_DENIED",
/// "errors":[{"reason":"insufficientPermissions","domain":"global",…}]}}`.
#[derive(Debug, Default, Deserialize)]
pub struct GoogleError {
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub errors: Vec<ErrorItem>,
}

#[derive(Debug, Default, Deserialize)]
pub struct ErrorItem {
    #[serde(default)]
    pub reason: String,
}

impl GoogleError {
    pub fn parse(body: &[u8]) -> GoogleError {
        #[derive(Deserialize)]
        struct Envelope {
            error: GoogleError,
        }
        serde_json::from_slice::<Envelope>(body).map(|e| e.error).unwrap_or_default()
    }

    fn has_reason(&self, reasons: &[&str]) -> bool {
        self.errors.iter().any(|e| reasons.contains(&e.reason.as_str()))
    }

    /// The first reason, or the status, for logs and error texts.
    pub fn reason(&self) -> &str {
        self.errors.first().map(|e| e.reason.as_str()).filter(|r| !r.is_empty()).unwrap_or(if self.status.is_empty() {
            "(no reason)"
        } else {
            &self.status
        })
    }
}

/// The time in Gmail's long throttles, written into the message: "User-rate
/// limit exceeded.  Retry after 2024-01-01T00:00:01.000Z" (bandwidth and
/// sending limits last up to hours, with no `Retry-After` header). The wait
/// from `now` until then; `None` if there is no such time, or it is past.
pub fn retry_after_in_message(message: &str, now: std::time::SystemTime) -> Option<std::time::Duration> {
    let (_, rest) = message.split_once("Retry after ")?;
    let stamp = rest.split_whitespace().next()?.trim_end_matches(['.', ',', ';', ')']);
    let at = time::OffsetDateTime::parse(stamp, &time::format_description::well_known::Rfc3339).ok()?;
    let at = std::time::SystemTime::from(at);
    at.duration_since(now).ok().filter(|wait| !wait.is_zero())
}

/// What an error answer from the Gmail API means for POP3.
pub fn judge(what: &str, status: StatusCode, body: &[u8]) -> Verdict {
    let error = GoogleError::parse(body);
    let reason = error.reason();
    let throttled = error.has_reason(&["rateLimitExceeded", "userRateLimitExceeded", "concurrentLimitExceeded"]);
    let asked = || retry_after_in_message(&error.message, std::time::SystemTime::now());
    match status.as_u16() {
        401 => Verdict::Fail(BackendError::AuthFailed),
        429 | 403 if (status == 429 || throttled) && asked().is_some() => {
            Verdict::RetryAfter(asked().unwrap_or_default())
        }
        429 => Verdict::Retry,
        403 if throttled => Verdict::Retry,
        // The Cloud project's daily quota: retrying today is pointless.
        403 if error.has_reason(&["dailyLimitExceeded"]) => {
            tracing::error!(
                what, reason, message = %error.message,
                "the Google Cloud project's daily Gmail API quota is used up: it resets at midnight Pacific time; \
                 raise it in the Cloud console (APIs & Services → Gmail API → Quotas)"
            );
            Verdict::Fail(BackendError::Unavailable(format!(
                "{what}: the Google Cloud project's daily Gmail API quota is used up (dailyLimitExceeded)"
            )))
        }
        // A Workspace administrator does not let this OAuth client in.
        403 if error.has_reason(&["domainPolicy"]) => {
            tracing::error!(
                what, reason, message = %error.message,
                "the Google Workspace domain's policy forbids this app the Gmail API: an administrator must \
                 allow (trust) its OAuth client id in the Admin console (Security → Access and data control → \
                 API controls) or enable the API for the users"
            );
            Verdict::Fail(BackendError::Permanent(format!(
                "{what}: the Workspace domain's policy forbids this app the Gmail API (domainPolicy)"
            )))
        }
        // Google asks clients to retry these with backoff.
        500 | 502 | 503 | 504 => Verdict::Retry,
        404 => Verdict::Fail(BackendError::MessageGone),
        403 if error.has_reason(&["insufficientPermissions"])
            || error.message.contains("insufficient authentication scopes") =>
        {
            tracing::warn!(what, reason, message = %error.message, "the access token lacks the OAuth scope this needs");
            Verdict::Fail(BackendError::Permanent(format!(
                "{what}: the access token lacks the OAuth scope this needs ({reason})"
            )))
        }
        code => {
            tracing::warn!(what, status = code, reason, message = %error.message, "Gmail API refused the request");
            Verdict::Fail(BackendError::Permanent(format!("{what}: HTTP {code} {reason}")))
        }
    }
}

/// One inner request of a batch: a GET of a path (with query) on the API's
/// host, named by `Content-ID: <item-N>`.
pub fn batch_body(boundary: &str, paths: &[String]) -> Vec<u8> {
    let mut body = String::with_capacity(paths.len() * 160);
    for (i, path) in paths.iter().enumerate() {
        body.push_str(&format!(
            "--{boundary}\r\nContent-Type: application/http\r\nContent-ID: <item-{i}>\r\n\r\nGET {path} HTTP/1.1\r\n\r\n"
        ));
    }
    body.push_str(&format!("--{boundary}--\r\n"));
    body.into_bytes()
}

/// One inner response of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchPart {
    /// The index of the request it answers (`<response-item-N>`).
    pub item: usize,
    pub status: u16,
    /// The inner `Retry-After`, in seconds, if any.
    pub retry_after: Option<u64>,
    pub body: Vec<u8>,
}

/// The boundary of a `multipart/mixed; boundary=…` content type.
pub fn boundary_of(content_type: &str) -> Option<String> {
    let (kind, params) = content_type.split_once(';')?;
    if !kind.trim().eq_ignore_ascii_case("multipart/mixed") {
        return None;
    }
    params.split(';').find_map(|param| {
        let (name, value) = param.split_once('=')?;
        (name.trim().eq_ignore_ascii_case("boundary")).then(|| value.trim().trim_matches('"').to_string())
    })
}

/// Splits a batch response into its parts. Google may answer in any order:
/// the Content-ID pairs each part with its request. Parts without one, or
/// that are no HTTP response, are an error.
pub fn parse_batch(boundary: &str, body: &[u8]) -> Result<Vec<BatchPart>, String> {
    let delimiter = format!("--{boundary}");
    let text = body;
    let mut parts = Vec::new();
    let mut rest = text;
    // Skip the preamble up to the first delimiter.
    let Some(first) = find(rest, delimiter.as_bytes()) else {
        return Err("no boundary in the batch response".into());
    };
    rest = &rest[first + delimiter.len()..];
    loop {
        if rest.starts_with(b"--") {
            break; // the close delimiter
        }
        let next = find(rest, delimiter.as_bytes()).ok_or("batch response ends without its close delimiter")?;
        let part = trim_line_end(&rest[..next]);
        parts.push(parse_part(skip_line_end(part))?);
        rest = &rest[next + delimiter.len()..];
    }
    Ok(parts)
}

fn parse_part(part: &[u8]) -> Result<BatchPart, String> {
    let (headers, http) = split_head(part).ok_or("a batch part without headers")?;
    let headers = String::from_utf8_lossy(headers);
    let content_id = header(&headers, "content-id").ok_or("a batch part without Content-ID")?;
    let item = content_id
        .trim_matches(|c| c == '<' || c == '>')
        .rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("unexpected Content-ID {content_id:?}"))?;
    let (head, body) = split_head(http).unwrap_or((http, b""));
    let head = String::from_utf8_lossy(head);
    let status_line = head.lines().next().unwrap_or("");
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("a batch part without an HTTP status line: {status_line:?}"))?;
    let retry_after = header(&head, "retry-after").and_then(|v| v.trim().parse().ok());
    Ok(BatchPart { item, status, retry_after, body: body.to_vec() })
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
}

/// Headers and the rest, split at the first empty line (CRLF or LF): the
/// earlier of the two, so that a CRLF CRLF in the body of an LF-only part is
/// not taken for the end of its headers.
fn split_head(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let crlf = find(bytes, b"\r\n\r\n").map(|at| (at, 4));
    let lf = find(bytes, b"\n\n").map(|at| (at, 2));
    let (at, len) = match (crlf, lf) {
        (Some(c), Some(l)) => c.min(l),
        (c, l) => c.or(l)?,
    };
    Some((&bytes[..at], &bytes[at + len..]))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(haystack, needle)
}

fn skip_line_end(bytes: &[u8]) -> &[u8] {
    bytes.strip_prefix(b"\r\n").or_else(|| bytes.strip_prefix(b"\n")).unwrap_or(bytes)
}

fn trim_line_end(bytes: &[u8]) -> &[u8] {
    bytes.strip_suffix(b"\r\n").or_else(|| bytes.strip_suffix(b"\n")).unwrap_or(bytes)
}

/// Base64url with or without padding, as Google writes it.
const BASE64URL: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Pulls the decoded `raw` field out of a `users.messages.get?format=raw`
/// response as its bytes arrive: a small JSON tokenizer finds the top-level
/// key `raw` (a string inside another value cannot fool it), every string's
/// escapes are decoded as JSON defines them (Google writes `=` as `\u003d`,
/// `/` as `\/`), and the value's base64url is decoded four characters at a
/// time. Memory stays bounded by the chunks fed, whatever the message size,
/// and the result never depends on where the chunks were cut.
#[derive(Debug, Default)]
pub struct RawExtractor {
    depth: u32,
    /// Inside a string: its decoder.
    string: Option<JsonString>,
    /// The string being read at depth 1 (a key candidate), if short.
    current: Option<Vec<u8>>,
    /// The last string closed at depth 1.
    last_string: Option<Vec<u8>>,
    /// A `:` followed `"raw"`: the next value is the message.
    value_is_raw: bool,
    state: RawState,
    raw: Base64Stream,
}

#[derive(Debug, Default, PartialEq, Eq)]
enum RawState {
    #[default]
    Searching,
    Decoding,
    Done,
}

/// Longest key kept for comparison with `raw`.
const KEY_LIMIT: usize = 16;

impl RawExtractor {
    pub fn new() -> Self {
        RawExtractor::default()
    }

    /// True once the whole `raw` value has been decoded.
    pub fn is_done(&self) -> bool {
        self.state == RawState::Done
    }

    /// Feeds response bytes; returns the message octets they complete.
    pub fn feed(&mut self, input: &[u8]) -> Result<Bytes, String> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < input.len() {
            match self.state {
                RawState::Done => break,
                RawState::Decoding => {
                    let string = self.string.get_or_insert_with(JsonString::default);
                    let raw = &mut self.raw;
                    let (used, closed) = string.feed(&input[i..], &mut |text| raw.push(text, &mut out))?;
                    i += used;
                    if closed {
                        self.string = None;
                        self.raw.finish(&mut out)?;
                        self.state = RawState::Done;
                    }
                }
                RawState::Searching => match &mut self.string {
                    Some(string) => {
                        let current = &mut self.current;
                        let (used, closed) = string.feed(&input[i..], &mut |text| {
                            if current.as_ref().is_some_and(|c| c.len() + text.len() > KEY_LIMIT) {
                                *current = None;
                            }
                            if let Some(c) = current {
                                c.extend_from_slice(text);
                            }
                            Ok(())
                        })?;
                        i += used;
                        if closed {
                            self.string = None;
                            self.last_string = self.current.take();
                        }
                    }
                    None => {
                        self.scan(input[i])?;
                        i += 1;
                    }
                },
            }
        }
        Ok(Bytes::from(out))
    }

    /// The end of the response: an error if no complete `raw` was in it.
    pub fn finish(&self) -> Result<(), String> {
        match self.state {
            RawState::Done => Ok(()),
            RawState::Decoding => Err("the response ended inside `raw`".into()),
            RawState::Searching => Err("the message resource has no `raw` field".into()),
        }
    }

    /// One byte outside any string.
    fn scan(&mut self, byte: u8) -> Result<(), String> {
        match byte {
            b'"' if self.depth == 1 && self.value_is_raw => {
                self.value_is_raw = false;
                self.state = RawState::Decoding;
            }
            b'"' => {
                self.string = Some(JsonString::default());
                self.current = (self.depth == 1).then(Vec::new);
            }
            b':' if self.depth == 1 => {
                self.value_is_raw = self.last_string.take().as_deref() == Some(b"raw".as_slice());
            }
            b'{' | b'[' => {
                self.depth += 1;
                self.value_is_raw = false;
            }
            b'}' | b']' => {
                self.depth = self.depth.checked_sub(1).ok_or("unbalanced JSON")?;
            }
            b' ' | b'\t' | b'\r' | b'\n' => {}
            _ => {
                self.value_is_raw = false;
                self.last_string = None;
            }
        }
        Ok(())
    }
}

/// Streaming decoder of one JSON string's content (RFC 8259 7), fed from
/// just after its opening quote: runs without escapes pass through as they
/// are, escapes (`\"`, `\\`, `\/`, `\b`, `\f`, `\n`, `\r`, `\t`, `\uXXXX`
/// with surrogate pairs) become the octets they stand for, in UTF-8. An
/// escape may be cut anywhere between two chunks.
#[derive(Debug, Default, Clone)]
pub struct JsonString {
    escape: Escape,
    /// A high surrogate waiting for its low half.
    high: Option<u16>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Escape {
    #[default]
    None,
    /// After a backslash.
    Backslash,
    /// Inside `\u`: this many hex digits read so far, and their value.
    Hex(u8, u16),
}

impl JsonString {
    /// Decodes from `input`, handing decoded octets to `sink`. Returns how
    /// many bytes of `input` were used, and whether the closing quote was
    /// among them (then the string is complete and nothing after it used).
    pub fn feed(
        &mut self,
        input: &[u8],
        sink: &mut impl FnMut(&[u8]) -> Result<(), String>,
    ) -> Result<(usize, bool), String> {
        const LONE: &str = "a lone UTF-16 surrogate in a JSON string";
        let mut i = 0;
        while i < input.len() {
            match self.escape {
                Escape::None if self.high.is_some() => {
                    // Only the `\u` of a low surrogate may follow a high one.
                    if input[i] != b'\\' {
                        return Err(LONE.into());
                    }
                    self.escape = Escape::Backslash;
                    i += 1;
                }
                Escape::None => {
                    let run = input[i..].iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20);
                    let end = run.map_or(input.len(), |n| i + n);
                    if end > i {
                        sink(&input[i..end])?;
                    }
                    i = end;
                    match input.get(i) {
                        None => {}
                        Some(b'"') => return Ok((i + 1, true)),
                        Some(b'\\') => {
                            self.escape = Escape::Backslash;
                            i += 1;
                        }
                        Some(_) => return Err("a control character in a JSON string".into()),
                    }
                }
                Escape::Backslash => {
                    let byte = input[i];
                    i += 1;
                    let decoded = match byte {
                        b'u' => {
                            self.escape = Escape::Hex(0, 0);
                            continue;
                        }
                        b'"' | b'\\' | b'/' => byte,
                        b'b' => 0x08,
                        b'f' => 0x0c,
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        _ => return Err("an invalid escape in a JSON string".into()),
                    };
                    if self.high.is_some() {
                        return Err(LONE.into());
                    }
                    self.escape = Escape::None;
                    sink(&[decoded])?;
                }
                Escape::Hex(digits, value) => {
                    let digit = char::from(input[i]).to_digit(16).ok_or("an invalid \\u escape in a JSON string")?;
                    i += 1;
                    let value = value << 4 | digit as u16;
                    if digits < 3 {
                        self.escape = Escape::Hex(digits + 1, value);
                        continue;
                    }
                    self.escape = Escape::None;
                    let c = match (self.high.take(), value) {
                        (None, 0xD800..=0xDBFF) => {
                            self.high = Some(value);
                            continue;
                        }
                        (Some(high), 0xDC00..=0xDFFF) => {
                            char::from_u32(0x10000 + ((u32::from(high) - 0xD800) << 10) + (u32::from(value) - 0xDC00))
                        }
                        (None, unit) => char::from_u32(u32::from(unit)),
                        (Some(_), _) => None,
                    };
                    let c = c.ok_or(LONE)?;
                    sink(c.encode_utf8(&mut [0; 4]).as_bytes())?;
                }
            }
        }
        Ok((input.len(), false))
    }
}

/// Base64url decoded as it arrives, whole quads at a time. Padding ends the
/// data: anything after a padded quad is an error however the text was cut
/// (decoding `AA==` and `AAAA` separately would otherwise accept what
/// `AA==AAAA` in one piece refuses).
#[derive(Debug, Default)]
struct Base64Stream {
    /// Characters not yet decoded (an incomplete quad, or one waiting for the
    /// rest of its padding).
    carry: Vec<u8>,
    /// A padded quad was decoded: the data has ended.
    padded: bool,
}

impl Base64Stream {
    fn push(&mut self, text: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        if text.is_empty() {
            return Ok(());
        }
        if self.padded {
            return Err("`raw` is not base64url: data after the padding".into());
        }
        self.carry.extend_from_slice(text);
        let whole = match memchr::memchr(b'=', &self.carry) {
            Some(at) => {
                let quad_end = (at / 4 + 1) * 4;
                if self.carry.len() > quad_end {
                    return Err("`raw` is not base64url: data after the padding".into());
                }
                if self.carry.len() < quad_end {
                    return Ok(()); // the rest of the padded quad is to come
                }
                self.padded = true;
                quad_end
            }
            None => self.carry.len() - self.carry.len() % 4,
        };
        if whole > 0 {
            BASE64URL.decode_vec(&self.carry[..whole], out).map_err(|e| format!("`raw` is not base64url: {e}"))?;
            self.carry.drain(..whole);
        }
        Ok(())
    }

    fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), String> {
        if !self.carry.is_empty() {
            BASE64URL.decode_vec(&self.carry, out).map_err(|e| format!("`raw` is not base64url: {e}"))?;
            self.carry.clear();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn extract(json: &[u8], chunk: usize) -> Result<Vec<u8>, String> {
        let mut extractor = RawExtractor::new();
        let mut out = Vec::new();
        for piece in json.chunks(chunk) {
            out.extend_from_slice(&extractor.feed(piece)?);
        }
        extractor.finish()?;
        Ok(out)
    }

    #[test]
    fn raw_is_decoded_at_every_chunk_size() {
        let message = b"From: a@example.com\r\nSubject: x\r\n\r\nbody \xff\xfe with 8-bit\nand a bare LF".to_vec();
        for engine in [&base64::engine::general_purpose::URL_SAFE, &base64::engine::general_purpose::URL_SAFE_NO_PAD] {
            let raw = engine.encode(&message);
            // A decoy: the text `"raw":"…"` inside another string.
            let json = format!(
                "{{\"id\":\"18c\",\"snippet\":\"he wrote \\\"raw\\\":\\\"AAAA\\\" \\\\\",\"labelIds\":[\"INBOX\",\"raw\"],\
                 \"payload\":{{\"raw\":\"QUJD\"}},\"sizeEstimate\":123,\"raw\" : \"{raw}\",\"internalDate\":\"1700000000000\"}}"
            );
            for chunk in 1..=json.len().min(80) {
                assert_eq!(extract(json.as_bytes(), chunk).unwrap(), message, "chunk size {chunk}");
            }
        }
    }

    #[test]
    fn missing_or_broken_raw_is_an_error() {
        assert!(extract(br#"{"id":"1","sizeEstimate":3}"#, 7).unwrap_err().contains("no `raw`"));
        assert!(extract(br#"{"raw":"QUJD"#, 7).unwrap_err().contains("ended inside"));
        assert!(extract(br#"{"raw":"QU!D"}"#, 7).unwrap_err().contains("base64url"));
        assert!(extract(br#"{"raw":"QU\x44"}"#, 7).unwrap_err().contains("escape"));
        assert!(extract(br#"{"raw":"QU\uD800"}"#, 7).unwrap_err().contains("surrogate"));
        assert!(extract(br#"{"raw":"QU\u00e9"}"#, 7).unwrap_err().contains("base64url"));
        assert_eq!(extract(br#"{"raw":""}"#, 3).unwrap(), b"");
        // Padding ends the data, whether the text arrives whole or cut after it.
        for chunk in 1..=16 {
            let err = extract(br#"{"raw":"AA==AAAA"}"#, chunk).unwrap_err();
            assert!(err.contains("after the padding"), "chunk {chunk}: {err}");
            assert!(extract(br#"{"raw":"AA\u003d\u003dAAAA"}"#, chunk).is_err(), "chunk {chunk}");
            assert_eq!(extract(br#"{"raw":"AA=="}"#, chunk).unwrap(), b"\0", "chunk {chunk}");
        }
    }

    /// Real Gmail responses escape `=`, `<`, `>` and `/` in JSON strings.
    #[test]
    fn json_escapes_are_decoded_at_every_chunk_size() {
        let message = b"<html>a/b</html> ~~~ \xff?>!".to_vec();
        let raw = base64::engine::general_purpose::URL_SAFE.encode(&message);
        assert!(raw.ends_with("==") && raw.contains('-') && raw.contains('_'), "{raw}");
        let escaped = raw.replace('=', "\\u003d").replace('-', "\\u002D").replace('_', "\\u005f");
        let json = format!(
            "{{\"snippet\":\"\\u003chtml\\u003e a\\/b \\\"\\\\\",\"r\\u0061w\":\"{escaped}\",\"raw\":\"QUJD\"}}"
        );
        for chunk in 1..=json.len() {
            assert_eq!(extract(json.as_bytes(), chunk).unwrap(), message, "chunk size {chunk}");
        }
        // Every escape form, decoded by the string decoder alone.
        let text = br#"a\"b\\c\/d\b\f\n\r\t\u0041\u00e9\u20ac\ud83d\ude00" tail"#;
        for chunk in 1..=text.len() {
            let mut decoder = JsonString::default();
            let mut decoded = Vec::new();
            let mut used_total = 0;
            for piece in text.chunks(chunk) {
                let (used, closed) = decoder
                    .feed(piece, &mut |t| {
                        decoded.extend_from_slice(t);
                        Ok(())
                    })
                    .unwrap();
                used_total += used;
                if closed {
                    break;
                }
            }
            assert_eq!(String::from_utf8(decoded).unwrap(), "a\"b\\c/d\u{8}\u{c}\n\r\tAé€😀", "chunk {chunk}");
            assert_eq!(used_total, text.len() - " tail".len(), "chunk {chunk}");
        }
        for bad in [&br#"\ud800x""#[..], br#"\udc00""#, br#"\ud800\n""#, br#"\q""#, br#"\u12G4""#, b"a\x01b\""] {
            let result = JsonString::default().feed(bad, &mut |_| Ok(()));
            assert!(result.is_err(), "{:?} decoded", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn batch_requests_and_responses() {
        let body = batch_body("b0", &["/gmail/v1/users/me/messages/a?format=minimal".into(), "/x".into()]);
        let text = String::from_utf8(body).unwrap();
        assert!(text.starts_with("--b0\r\nContent-Type: application/http\r\nContent-ID: <item-0>\r\n\r\nGET /gmail/v1/users/me/messages/a?format=minimal HTTP/1.1\r\n\r\n--b0\r\n"), "{text}");
        assert!(text.ends_with("--b0--\r\n"));

        assert_eq!(boundary_of("multipart/mixed; boundary=batch_X-y"), Some("batch_X-y".into()));
        assert_eq!(boundary_of("multipart/mixed; charset=x; boundary=\"q\""), Some("q".into()));
        assert_eq!(boundary_of("application/json"), None);

        let response = "--batch_z\r\nContent-Type: application/http\r\nContent-ID: <response-item-1>\r\n\r\n\
            HTTP/1.1 404 Not Found\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{\"error\":{\"code\":404}}\r\n\
            --batch_z\r\nContent-Type: application/http\r\nContent-ID: <response-item-0>\r\n\r\n\
            HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"id\":\"a\",\"internalDate\":\"5\"}\r\n\
            --batch_z\r\nContent-Type: application/http\r\nContent-ID: <response-item-2>\r\n\r\n\
            HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\n\r\n\r\n--batch_z--\r\n";
        let parts = parse_batch("batch_z", response.as_bytes()).unwrap();
        assert_eq!(parts.len(), 3);
        assert_eq!((parts[0].item, parts[0].status), (1, 404));
        assert_eq!((parts[1].item, parts[1].status), (0, 200));
        assert_eq!(parts[1].body, b"{\"id\":\"a\",\"internalDate\":\"5\"}");
        assert_eq!((parts[2].item, parts[2].status, parts[2].retry_after), (2, 429, Some(3)));
        assert!(parse_batch("other", response.as_bytes()).is_err());
        // An LF-only part whose body holds a CRLF CRLF: its headers end at
        // the first empty line, not inside the body.
        let lf = "--b\nContent-ID: <response-item-4>\n\nHTTP/1.1 200 OK\n\nbody\r\n\r\nmore\r\n--b--\r\n";
        let parts = parse_batch("b", lf.as_bytes()).unwrap();
        assert_eq!((parts[0].item, parts[0].status), (4, 200));
        assert_eq!(parts[0].body, b"body\r\n\r\nmore");
        assert!(
            parse_batch(
                "batch_z",
                b"--batch_z\r\nContent-Type: application/http\r\n\r\nHTTP/1.1 200 OK\r\n\r\n{}\r\n--batch_z--"
            )
            .is_err()
        );
    }

    #[test]
    fn errors_map_to_pop3_meanings() {
        let body = |status: &str, reason: &str| {
            format!(
                r#"{{"error":{{"code":0,"message":"m","status":"{status}","errors":[{{"reason":"{reason}","domain":"global"}}]}}}}"#
            )
        };
        let v = |code: u16, b: String| judge("t", StatusCode::from_u16(code).unwrap(), b.as_bytes());
        assert!(matches!(v(401, body("UNAUTHENTICATED", "authError")), Verdict::Fail(BackendError::AuthFailed)));
        assert!(matches!(v(429, body("RESOURCE_EXHAUSTED", "rateLimitExceeded")), Verdict::Retry));
        assert!(matches!(v(403, body("PERMISSION_DENIED", "userRateLimitExceeded")), Verdict::Retry));
        assert!(matches!(v(403, body("PERMISSION_DENIED", "rateLimitExceeded")), Verdict::Retry));
        assert!(matches!(v(503, String::new()), Verdict::Retry));
        assert!(matches!(v(404, body("NOT_FOUND", "notFound")), Verdict::Fail(BackendError::MessageGone)));
        let scope = v(403, body("PERMISSION_DENIED", "insufficientPermissions"));
        assert!(matches!(&scope, Verdict::Fail(BackendError::Permanent(m)) if m.contains("scope")), "{scope:?}");
        let bad = v(400, body("INVALID_ARGUMENT", "invalidArgument"));
        assert!(matches!(&bad, Verdict::Fail(BackendError::Permanent(m)) if m.contains("invalidArgument")), "{bad:?}");
        assert!(matches!(v(403, "not json".into()), Verdict::Fail(BackendError::Permanent(_))));
        let daily = v(403, body("PERMISSION_DENIED", "dailyLimitExceeded"));
        assert!(matches!(&daily, Verdict::Fail(BackendError::Unavailable(m)) if m.contains("daily")), "{daily:?}");
        let domain = v(403, body("PERMISSION_DENIED", "domainPolicy"));
        assert!(
            matches!(&domain, Verdict::Fail(BackendError::Permanent(m)) if m.contains("domainPolicy")),
            "{domain:?}"
        );
        // A long throttle names its end in the message: that wait, not a backoff.
        let later = time::OffsetDateTime::now_utc() + time::Duration::hours(2);
        let stamp = later.format(&time::format_description::well_known::Rfc3339).unwrap();
        let long = format!(
            r#"{{"error":{{"code":403,"message":"User-rate limit exceeded.  Retry after {stamp}","errors":[{{"reason":"userRateLimitExceeded"}}]}}}}"#
        );
        match v(403, long.clone()) {
            Verdict::RetryAfter(wait) => assert!(wait > Duration::from_secs(7100) && wait <= Duration::from_secs(7200)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(v(429, long.replace("403", "429")), Verdict::RetryAfter(_)));
        // A time already past, or none: the usual backoff.
        assert!(matches!(v(403, long.replace(&stamp, "2024-01-01T00:00:01.000Z")), Verdict::Retry));
        assert!(matches!(v(403, long.replace(&stamp, "soon")), Verdict::Retry));
    }

    #[test]
    fn retry_times_in_messages() {
        use std::time::UNIX_EPOCH;
        let now = UNIX_EPOCH + Duration::from_secs(1_704_067_200); // 2024-01-01T00:00:00Z
        let wait = |m: &str| retry_after_in_message(m, now);
        assert_eq!(wait("Retry after 2024-01-01T01:00:00.000Z"), Some(Duration::from_secs(3600)));
        assert_eq!(wait("User-rate limit exceeded.  Retry after 2024-01-01T00:00:30Z."), Some(Duration::from_secs(30)));
        assert_eq!(wait("Retry after 2024-01-01T02:00:00+01:00 (sending limit)"), Some(Duration::from_secs(3600)));
        assert_eq!(wait("Retry after 2023-12-31T23:00:00Z"), None, "past");
        assert_eq!(wait("Retry after tomorrow"), None);
        assert_eq!(wait("Too many concurrent requests for user"), None);
    }
}
