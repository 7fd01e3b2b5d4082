//! SASL.

use super::*;

/// A TLS session (STLS) on a listener that refuses cleartext logins.
fn secured(gateway: &Gateway, ca: &TestCa) -> Client<support::tls::TlsStream> {
    Client::connect(gateway.addr).stls(ca.client_config(), NAME_A)
}

#[test]
fn sasl_plain_and_login_with_and_without_initial_response_and_cancel() {
    let ca = TestCa::new();
    let a = ca.issue("a", "cert-a", &[NAME_A]);
    let store = store();
    let gateway = start(config(ListenerTls::Starttls, &[&a]), &store);
    let b64 = |s: &str| STANDARD.encode(s);

    // The mechanism list, in CAPA and in AUTH without arguments.
    let mut c = secured(&gateway, &ca);
    let capa = c.capa();
    assert_eq!(sasl_mechanisms(&capa), ["PLAIN", "LOGIN"], "{capa:?}");
    c.ok("AUTH");
    assert_eq!(c.body_lines(), ["PLAIN", "LOGIN"]);
    // No OAuth where the backend takes no bearer tokens.
    let xoauth2 = b64(&format!("user={USER}\x01auth=Bearer ya29.token\x01\x01"));
    for command in [format!("AUTH XOAUTH2 {xoauth2}"), "AUTH XOAUTH2".into(), "AUTH OAUTHBEARER".into()] {
        let reply = c.err(&command);
        assert!(reply.contains("unsupported"), "{command} → {reply}");
    }
    c.err("AUTH CRAM-MD5");
    // PLAIN with an initial response.
    assert!(c.cmd(&format!("AUTH PLAIN {}", plain_response(USER.as_bytes(), PASS.as_bytes()))).starts_with("+OK"));
    assert_eq!(c.stat().0, 2);
    c.quit();

    // PLAIN without: an empty challenge, then the response.
    let mut c = secured(&gateway, &ca);
    assert_eq!(c.cmd("AUTH PLAIN"), "+ ");
    assert!(c.cmd(&plain_response(USER.as_bytes(), PASS.as_bytes())).starts_with("+OK"));
    c.quit();

    // PLAIN with authzid = authcid is fine; another authzid is not.
    let mut c = secured(&gateway, &ca);
    let other = STANDARD.encode(format!("bob\0{USER}\0{PASS}"));
    assert!(c.cmd(&format!("AUTH PLAIN {other}")).starts_with("-ERR [AUTH]"));
    let same = STANDARD.encode(format!("{USER}\0{USER}\0{PASS}"));
    assert!(c.cmd(&format!("AUTH PLAIN {same}")).starts_with("+OK"));
    c.quit();

    // LOGIN without initial response: Username:, Password:.
    let mut c = secured(&gateway, &ca);
    assert_eq!(c.cmd("AUTH LOGIN"), format!("+ {}", b64("Username:")));
    assert_eq!(c.cmd(&b64(USER)), format!("+ {}", b64("Password:")));
    assert!(c.cmd(&b64(PASS)).starts_with("+OK"));
    assert_eq!(c.stat().0, 2);
    c.quit();

    // LOGIN with the user name as initial response.
    let mut c = secured(&gateway, &ca);
    assert_eq!(c.cmd(&format!("AUTH LOGIN {}", b64(USER))), format!("+ {}", b64("Password:")));
    assert!(c.cmd(&b64(PASS)).starts_with("+OK"));
    c.quit();

    // "*" cancels at every step; cancelling is not a failed login and the
    // session can log in afterwards.
    let mut c = secured(&gateway, &ca);
    for _ in 0..3 {
        assert_eq!(c.cmd("AUTH PLAIN"), "+ ");
        let reply = c.cmd("*");
        assert!(reply.starts_with("-ERR") && reply.contains("cancel"), "{reply}");
        assert!(c.cmd("AUTH LOGIN").starts_with("+ "));
        assert!(c.cmd("*").starts_with("-ERR"));
        assert!(c.cmd(&format!("AUTH LOGIN {}", b64(USER))).starts_with("+ "));
        assert!(c.cmd("*").starts_with("-ERR"));
    }
    // A wrong password over LOGIN fails with [AUTH]; the third failure closes.
    for n in 1..=3 {
        assert!(c.cmd("AUTH LOGIN").starts_with("+ "));
        assert!(c.cmd(&b64(USER)).starts_with("+ "));
        let reply = c.cmd(&b64("wrong"));
        assert!(reply.starts_with("-ERR [AUTH]"), "failure {n}: {reply}");
    }
    c.expect_closed();
}
