//! SASL decoding, alone and through the session: never a panic, and no
//! credential with NUL, CR or LF (or a token with ^A) ever reaches a login,
//! whichever of PLAIN, LOGIN, XOAUTH2 and OAUTHBEARER carried it.
#![no_main]

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use libfuzzer_sys::fuzz_target;
use popgate::mail::{Credentials, Proof};
use popgate::pop3::sasl::{self, Mechanism};
use popgate::pop3::{Line, Session, SessionConfig, Step};

fn forbidden(s: &str) -> bool {
    s.bytes().any(|b| matches!(b, 0 | b'\r' | b'\n'))
}

fn assert_clean(c: &Credentials) {
    assert!(!c.user.is_empty() && !forbidden(&c.user), "user name {:?} reached a login", c.user);
    match &c.proof {
        Proof::Password(p) => assert!(!forbidden(p.expose()), "a password with NUL, CR or LF reached a login"),
        Proof::Bearer(t) => {
            assert!(!forbidden(t.expose()) && !t.expose().contains('\x01'), "a bad token reached a login")
        }
    }
}

/// The step a session gives for these lines; the login's credentials if any.
fn login_of(lines: &[Vec<u8>]) -> Option<Credentials> {
    let config = SessionConfig { mechanisms: Mechanism::ALL.to_vec(), ..SessionConfig::default() };
    let mut session = Session::new(config);
    for line in lines {
        match session.on_line(Line::Complete(line.clone())) {
            Step::Login(c) => return Some(c),
            Step::Reply(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    None
}

fuzz_target!(|input: (u8, &[u8], &[u8])| {
    let (which, first, second) = input;
    // The decoders alone: whatever they accept is what validation sees.
    let _ = std::str::from_utf8(first).map(sasl::decode_response);
    if let Ok(c) = sasl::plain(first)
        && c.validate().is_ok()
    {
        assert_clean(&c);
    }
    for token in [sasl::xoauth2(first), sasl::oauthbearer(first)].into_iter().flatten() {
        let c = Credentials { user: token.user, proof: Proof::Bearer(token.token) };
        if c.validate().is_ok() {
            assert_clean(&c);
        }
    }
    // Through the session, with and without an initial response.
    let (b1, b2) = (STANDARD.encode(first), STANDARD.encode(second));
    let mechanism = Mechanism::ALL[usize::from(which) % 4];
    let name = mechanism.name();
    let scripts: Vec<Vec<Vec<u8>>> = match mechanism {
        Mechanism::Login => vec![
            vec![format!("AUTH LOGIN {b1}").into_bytes(), b2.clone().into_bytes()],
            vec![b"AUTH LOGIN".to_vec(), b1.clone().into_bytes(), b2.clone().into_bytes()],
        ],
        _ => vec![
            vec![format!("AUTH {name} {b1}").into_bytes()],
            vec![format!("AUTH {name}").into_bytes(), b1.clone().into_bytes()],
        ],
    };
    for script in scripts {
        if let Some(c) = login_of(&script) {
            assert_clean(&c);
        }
    }
    // USER/PASS with the raw octets (a line carries no CR or LF, but NUL).
    if let (Ok(user), Ok(pass)) = (std::str::from_utf8(first), std::str::from_utf8(second))
        && !user.contains(['\r', '\n'])
        && !pass.contains(['\r', '\n'])
        && let Some(c) = login_of(&[format!("USER {user}").into_bytes(), format!("PASS {pass}").into_bytes()])
    {
        assert_clean(&c);
    }
});
