//! `attachment_types`: which MIME types of attachment a device wants
//! (`application/pdf`, `image/*`), and the evaluation of a message's MIME
//! structure against them. Owns the bounded read of a message, its parse
//! (the `mail-parser` crate, already used for headers: a MIME parser is
//! not something to hand-write) and a process-wide cache of what was found,
//! so that each message is read once per process however many devices and
//! logins look at it. Never changes a message.
//!
//! Larger than the read bound: not evaluated, and hidden (a printer prints
//! nothing it could not check). The cache key is the message's UIDL and a
//! digest of its header section: two accounts whose messages share a UIDL
//! (IMAP UIDs often do) cannot share a verdict unless the messages' whole
//! headers, `Message-ID` and `Received` lines included, are the same.

use std::sync::{Arc, LazyLock};

use futures::StreamExt;
use sha2::{Digest, Sha256};

use crate::backend::Mailbox;
use crate::mail::{BackendError, StoreId};

/// Default bound of the read per message (`attachment_scan_limit_bytes`).
pub const DEFAULT_SCAN_LIMIT: u64 = 10 << 20;
/// Bounds of `attachment_scan_limit_bytes`.
pub const MIN_SCAN_LIMIT: u64 = 64 << 10;
pub const MAX_SCAN_LIMIT: u64 = 50 << 20;
/// Bounds the configured list (it is searched per attachment at login).
pub const MAX_TYPES: usize = 100;
/// Messages whose structure is remembered (a few hundred octets each).
const CACHE_ENTRIES: u64 = 100_000;

/// One `attachment_types` entry: `type/subtype` or `type/*`, lower case.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MediaRange {
    kind: String,
    /// `None`: any subtype (`image/*`).
    subtype: Option<String>,
}

impl MediaRange {
    fn parse(text: &str) -> Option<MediaRange> {
        let (kind, subtype) = text.trim().split_once('/')?;
        // RFC 6838 restricted-name: 1–127 characters.
        let token = |t: &str| {
            (1..=127).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
        };
        if !token(kind) || !(subtype == "*" || token(subtype)) {
            return None;
        }
        Some(MediaRange {
            kind: kind.to_ascii_lowercase(),
            subtype: (subtype != "*").then(|| subtype.to_ascii_lowercase()),
        })
    }

    fn matches(&self, media_type: &str) -> bool {
        let Some((kind, subtype)) = media_type.split_once('/') else { return false };
        kind.eq_ignore_ascii_case(&self.kind) && self.subtype.as_deref().is_none_or(|s| s.eq_ignore_ascii_case(subtype))
    }
}

/// The media ranges a device's attachments must match (one is enough).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentTypes {
    ranges: Vec<MediaRange>,
    /// At most this many octets of a message are read to evaluate it.
    scan_limit: u64,
}

/// `Err(why)` for a malformed list or bound.
pub fn check(types: &[String], scan_limit: Option<u64>) -> Result<(), String> {
    if types.len() > MAX_TYPES {
        return Err(format!("attachment_types: at most {MAX_TYPES} entries"));
    }
    for entry in types {
        MediaRange::parse(entry)
            .ok_or_else(|| format!("attachment_types: `{entry}` is not a media type (type/subtype or type/*)"))?;
    }
    if let Some(limit) = scan_limit
        && !(MIN_SCAN_LIMIT..=MAX_SCAN_LIMIT).contains(&limit)
    {
        return Err(format!("attachment_scan_limit_bytes: {MIN_SCAN_LIMIT} to {MAX_SCAN_LIMIT}"));
    }
    Ok(())
}

impl AttachmentTypes {
    /// From checked configuration (malformed entries are left out).
    pub fn new(types: &[String], scan_limit: Option<u64>) -> AttachmentTypes {
        AttachmentTypes {
            ranges: types.iter().filter_map(|t| MediaRange::parse(t)).collect(),
            scan_limit: scan_limit.unwrap_or(DEFAULT_SCAN_LIMIT).clamp(MIN_SCAN_LIMIT, MAX_SCAN_LIMIT),
        }
    }

    /// Whether a message with these attachments (`Structure`) is shown.
    pub fn admits(&self, structure: &Structure) -> Result<(), &'static str> {
        match structure {
            Structure::TooLarge => Err("larger than attachment_scan_limit_bytes: not evaluated"),
            Structure::Attachments(types) if types.iter().any(|t| self.ranges.iter().any(|r| r.matches(t))) => Ok(()),
            Structure::Attachments(_) => Err("no attachment of a listed type"),
        }
    }

    /// The structure of message `id` (its UIDL and header section name it
    /// in the cache); `None` when it is gone.
    pub async fn structure_of(
        &self,
        mailbox: &mut dyn Mailbox,
        id: &StoreId,
        uidl: &str,
        header: &[u8],
    ) -> Result<Option<Arc<Structure>>, BackendError> {
        let key = cache_key(uidl, header, self.scan_limit);
        if let Some(known) = CACHE.get(&key) {
            return Ok(Some(known));
        }
        let mut stream = match mailbox.fetch(id).await {
            Err(BackendError::MessageGone) => return Ok(None),
            other => other?,
        };
        let limit = usize::try_from(self.scan_limit).unwrap_or(usize::MAX);
        let mut message = Vec::new();
        let mut too_large = false;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            if message.len() + chunk.len() > limit {
                too_large = true;
                break;
            }
            message.extend_from_slice(&chunk);
        }
        drop(stream);
        let structure = Arc::new(if too_large { Structure::TooLarge } else { Structure::of(&message) });
        CACHE.insert(key, structure.clone());
        Ok(Some(structure))
    }
}

/// What the evaluation of one message found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Structure {
    /// The media types (lower case) of its attachment parts.
    Attachments(Vec<String>),
    /// Larger than the read bound.
    TooLarge,
}

impl Structure {
    /// The attachment parts of a whole message (`mail-parser`'s notion: every
    /// part that is not the message's text or HTML body, nested messages'
    /// parts included).
    pub fn of(message: &[u8]) -> Structure {
        let Some(parsed) = mail_parser::MessageParser::new().parse(message) else {
            return Structure::Attachments(Vec::new());
        };
        let mut types = Vec::new();
        collect(&parsed, &mut types, 0);
        Structure::Attachments(types)
    }
}

/// Nested `message/rfc822` parts are looked into, to a bounded depth.
fn collect(message: &mail_parser::Message<'_>, types: &mut Vec<String>, depth: usize) {
    use mail_parser::MimeHeaders;
    for part in message.attachments() {
        let media_type = match part.content_type() {
            Some(ct) => format!("{}/{}", ct.ctype(), ct.subtype().unwrap_or("")).to_ascii_lowercase(),
            None => "text/plain".into(),
        };
        if !types.contains(&media_type) {
            types.push(media_type);
        }
        if depth < 4
            && let Some(inner) = part.message()
        {
            collect(inner, types, depth + 1);
        }
    }
}

static CACHE: LazyLock<moka::sync::Cache<[u8; 32], Arc<Structure>>> =
    LazyLock::new(|| moka::sync::Cache::new(CACHE_ENTRIES));

fn cache_key(uidl: &str, header: &[u8], scan_limit: u64) -> [u8; 32] {
    let mut digest = Sha256::new();
    digest.update((uidl.len() as u64).to_be_bytes());
    digest.update(uidl.as_bytes());
    digest.update(scan_limit.to_be_bytes());
    digest.update(header);
    digest.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_attachment(media_type: &str) -> Vec<u8> {
        format!(
            "From: a@office.example\r\nSubject: scan\r\nMIME-Version: 1.0\r\n\
             Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n\
             --b1\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n\
             --b1\r\nContent-Type: {media_type}; name=\"file\"\r\nContent-Disposition: attachment; filename=\"file\"\r\n\
             Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--b1--\r\n"
        )
        .into_bytes()
    }

    #[test]
    fn media_ranges_match_type_and_wildcard_subtype() {
        let types = AttachmentTypes::new(&["application/pdf".into(), "image/*".into()], None);
        let table: &[(&str, bool)] = &[
            ("application/pdf", true),
            ("Application/PDF", true),
            ("image/png", true),
            ("image/jpeg", true),
            ("application/zip", false),
            ("text/plain", false),
        ];
        for (media_type, shown) in table {
            let structure = Structure::of(&with_attachment(media_type));
            assert_eq!(types.admits(&structure).is_ok(), *shown, "{media_type}: {structure:?}");
        }
        // No attachment at all: a plain text message.
        let plain = Structure::of(b"From: a@b.example\r\nSubject: x\r\n\r\nhello\r\n");
        assert_eq!(plain, Structure::Attachments(vec![]));
        assert!(types.admits(&plain).is_err());
        assert!(types.admits(&Structure::TooLarge).is_err());
        // Not a MIME message: no attachment.
        assert!(types.admits(&Structure::of(b"")).is_err());
    }

    #[test]
    fn an_attached_message_is_looked_into() {
        let inner = String::from_utf8(with_attachment("application/pdf")).unwrap();
        let outer = format!(
            "From: a@b.example\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"o\"\r\n\r\n\
             --o\r\nContent-Type: text/plain\r\n\r\nfwd\r\n--o\r\nContent-Type: message/rfc822\r\n\r\n{inner}\r\n--o--\r\n"
        );
        let Structure::Attachments(types) = Structure::of(outer.as_bytes()) else { panic!() };
        assert!(types.contains(&"application/pdf".to_string()), "{types:?}");
    }

    /// A store of whole messages that counts its reads.
    struct Counting {
        messages: Vec<bytes::Bytes>,
        reads: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    #[async_trait::async_trait]
    impl Mailbox for Counting {
        async fn list(&mut self) -> Result<Vec<crate::backend::ListedMessage>, BackendError> {
            Ok(self
                .messages
                .iter()
                .enumerate()
                .map(|(i, m)| crate::backend::ListedMessage {
                    id: StoreId(i.to_string()),
                    uidl: format!("counting-{i}"),
                    size: crate::backend::ReportedSize::Exact(m.len() as u64),
                })
                .collect())
        }

        async fn fetch(&mut self, id: &StoreId) -> Result<crate::backend::MessageStream<'_>, BackendError> {
            self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let message = self.messages[id.0.parse::<usize>().unwrap()].clone();
            // In chunks, as stores stream.
            let chunks: Vec<Result<bytes::Bytes, BackendError>> = (0..message.len())
                .step_by(1000)
                .map(|at| Ok(message.slice(at..(at + 1000).min(message.len()))))
                .collect();
            Ok(Box::pin(futures::stream::iter(chunks)))
        }

        async fn remove(&mut self, _ids: &[StoreId]) -> Result<(), BackendError> {
            Ok(())
        }

        async fn close(self: Box<Self>) {}
    }

    /// Through `policy::apply`, twice (two logins): the listed types are
    /// shown, the rest and the message over the read bound hidden, and the
    /// second login reads each message's header only, never its body again.
    #[tokio::test]
    async fn each_message_is_read_once_per_process_and_a_too_large_one_is_hidden() {
        use crate::auth::accounts::policy::{PolicyConfig, apply};
        let mut big = with_attachment("application/pdf");
        big.extend(std::iter::repeat_n(b'x', MIN_SCAN_LIMIT as usize));
        let messages: Vec<bytes::Bytes> = [
            with_attachment("application/pdf"),
            b"From: a@b.example\r\nSubject: plain\r\n\r\nhello\r\n".to_vec(),
            with_attachment("image/png"),
            big,
        ]
        .into_iter()
        .map(bytes::Bytes::from)
        .collect();
        let reads = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut mailbox = Counting { messages, reads: reads.clone() };
        let policy = PolicyConfig {
            attachment_types: Some(vec!["application/pdf".into(), "image/*".into()]),
            attachment_scan_limit_bytes: Some(MIN_SCAN_LIMIT),
            ..Default::default()
        }
        .resolve();
        let count = || reads.load(std::sync::atomic::Ordering::SeqCst);
        let listed = mailbox.list().await.unwrap();
        let shown = apply(&mut mailbox, &policy, listed.clone()).await.unwrap();
        assert_eq!(shown.iter().map(|m| m.uidl.as_str()).collect::<Vec<_>>(), ["counting-0", "counting-2"]);
        assert_eq!(count(), 8, "first login: each header, then each message");
        let again = apply(&mut mailbox, &policy, listed).await.unwrap();
        assert_eq!(again, shown);
        assert_eq!(count(), 12, "second login: the headers only");
    }

    #[test]
    fn check_refuses_bad_types_and_bounds() {
        for bad in ["pdf", "application/", "/pdf", "*/*", "application/p df", "image/*x"] {
            assert!(check(&[bad.into()], None).is_err(), "{bad}");
        }
        assert!(check(&["application/pdf".into(), "image/*".into()], None).is_ok());
        assert!(check(&vec!["image/*".to_string(); MAX_TYPES + 1], None).is_err());
        assert!(check(&[], Some(MIN_SCAN_LIMIT - 1)).is_err());
        assert!(check(&[], Some(MAX_SCAN_LIMIT + 1)).is_err());
        assert!(check(&[], Some(MIN_SCAN_LIMIT)).is_ok());
        assert!(check(&[], Some(MAX_SCAN_LIMIT)).is_ok());
    }
}
