//! What a JMAP server sends (src/backend/jmap/wire.rs: the session resource,
//! API replies for listing pages, Mailbox/get and Email/set), read by the
//! backend's own code: never a panic, and what the backend takes from a
//! reply stays within what it asked for.
//!
//! Input: one selector octet, then the reply body; an optional 0x00 ends
//! the body, and what follows is the "argument" (a blob id, a mailbox
//! name, or ids to remove separated by 0x01). Raw octets rather than an
//! `arbitrary` structure so that seeds are plain JSON (fuzz/seeds/jmap_replies)
//! and libFuzzer's JSON dictionary (fuzz/json.dict) applies.
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use popgate::backend::jmap::{uidl_for, wire};

fn valid_uidl(uidl: &str) -> bool {
    (1..=70).contains(&uidl.len()) && uidl.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let (body, argument) = match rest.iter().position(|&b| b == 0) {
        Some(at) => (&rest[..at], String::from_utf8_lossy(&rest[at + 1..]).into_owned()),
        None => (rest, String::new()),
    };
    match selector % 4 {
        0 => session(body, &argument),
        1 => pages(body),
        2 => mailbox(body, &argument),
        _ => removal(body, &argument, selector & 0x80 != 0),
    }
});

/// A session resource: if accepted, its limits are usable (never 0) and no
/// blob id, however hostile, moves a download to another origin than an
/// ordinary one does (the id is percent-encoded into the template).
fn session(body: &[u8], blob_id: &str) {
    let base = url::Url::parse("https://jmap.example/.well-known/jmap").expect("url");
    let Ok(session) = wire::session(base, body) else { return };
    let limits = session.limits;
    assert!(limits.max_objects_in_get >= 1 && limits.max_objects_in_set >= 1);
    assert!(limits.max_calls_in_request >= 1 && limits.max_concurrent_requests >= 1);
    let (Ok(plain), Ok(hostile)) = (session.download_url("Gplain1"), session.download_url(blob_id)) else { return };
    assert_eq!(plain.origin(), hostile.origin(), "blob id {blob_id:?} moved the download");
}

/// Listing pages 0 and 1: the emails taken are among the ids the query
/// returned, in the query's order, each once, and each gets a valid UIDL.
fn pages(body: &[u8]) {
    let Ok(responses) = wire::responses(body) else { return };
    for tag in 0..2 {
        let Ok(page) = wire::page(&responses, tag) else { continue };
        assert!(page.emails.len() <= page.ids.len());
        let mut seen = HashSet::new();
        let mut from = 0;
        for (id, _, _) in &page.emails {
            assert!(seen.insert(id.clone()), "email {id:?} taken twice");
            let at = page.ids[from..].iter().position(|q| q == id).expect("email not in the query's ids, in order");
            from += at + 1;
            assert!(valid_uidl(&uidl_for(id)), "UIDL of {id:?}");
        }
    }
}

/// Mailbox/get: finding the configured mailbox ends (parent cycles
/// included) and, when it succeeds, names one the server listed.
fn mailbox(body: &[u8], wanted: &str) {
    let Ok(responses) = wire::responses(body) else { return };
    for wanted in [None, Some(wanted)] {
        if let Ok((found, listed)) = wire::mailbox(&responses, wanted) {
            assert!(listed.contains(&found));
        }
    }
}

/// Email/set: never more failures than ids asked for; an id the reply does
/// not mention at all is a failure (never silently "removed").
fn removal(body: &[u8], ids: &str, moved: bool) {
    let Ok(responses) = wire::responses(body) else { return };
    let ids: Vec<&str> = ids.split('\u{1}').filter(|id| !id.is_empty()).collect();
    if let Ok(failed) = wire::not_removed(&responses, &ids, moved) {
        assert!(failed <= ids.len());
        let unmentioned = format!("never-mentioned-{}", body.len());
        if !String::from_utf8_lossy(body).contains(&unmentioned) {
            let mut with = ids.clone();
            with.push(&unmentioned);
            assert_eq!(wire::not_removed(&responses, &with, moved).ok(), Some(failed + 1));
        }
    }
}
