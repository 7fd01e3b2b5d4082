//! Arbitrary command lines fed to a session whose logins succeed against a
//! small maildrop: never a panic, every reply a well-formed POP3 line, and
//! an Update step only ever names messages that were DELE'd.
#![no_main]

use libfuzzer_sys::fuzz_target;
use popgate::mail::StoreId;
use popgate::pop3::{Line, Maildrop, Message, Session, SessionConfig, Step};

fn maildrop() -> Maildrop {
    Maildrop::new(
        (1..=5).map(|i| Message { id: StoreId(i.to_string()), uidl: format!("u{i}"), size: 100 * i }).collect(),
    )
}

fuzz_target!(|lines: Vec<Vec<u8>>| {
    let mut session = Session::new(SessionConfig::default());
    let mut deleted_any = false;
    for line in lines {
        if line.contains(&b'\n') {
            continue;
        }
        deleted_any |= line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"DELE");
        let mut step = session.on_line(Line::Complete(line));
        loop {
            step = match step {
                Step::Reply(r) => {
                    let bytes = r.to_bytes();
                    assert!(bytes.starts_with(b"+") || bytes.starts_with(b"-ERR"));
                    assert!(bytes.ends_with(b"\r\n"));
                    break;
                }
                Step::Close(_) => return,
                Step::Login(_) => session.login_succeeded(maildrop()),
                Step::Send { .. } | Step::StartTls(_) => break,
                Step::Update(ids) => {
                    assert!(deleted_any && !ids.is_empty());
                    session.update_finished(Ok(ids.len()));
                    return;
                }
            }
        }
    }
});
