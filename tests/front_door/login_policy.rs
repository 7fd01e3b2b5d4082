//! Who may log in how.

use super::*;

#[test]
fn starttls_listener_refuses_cleartext_login_and_advertises_only_what_works() {
    let (ca, a, _b) = two_certificates();
    let store = store();
    let gateway = start(config(ListenerTls::Starttls, &[&a]), &store);

    let mut c = Client::connect(gateway.addr);
    let capa = c.capa();
    assert!(has_capability(&capa, "STLS"), "{capa:?}");
    assert!(!has_capability(&capa, "USER"), "{capa:?}");
    assert!(sasl_mechanisms(&capa).is_empty(), "{capa:?}");
    let plain = format!("AUTH PLAIN {}", plain_response(USER.as_bytes(), PASS.as_bytes()));
    for command in [&format!("USER {USER}"), &format!("PASS {PASS}"), &plain, "AUTH LOGIN", "AUTH"] {
        let reply = c.err(command);
        assert!(reply.starts_with("-ERR [AUTH]"), "{command:?} → {reply}");
        assert!(reply.contains("use STLS"), "{command:?} → {reply}");
    }
    // Refusals are not failed logins: the connection stays, STLS works.
    let mut c = c.stls(ca.client_config(), NAME_A);
    let capa = c.capa();
    assert!(has_capability(&capa, "USER"), "{capa:?}");
    assert_eq!(sasl_mechanisms(&capa), ["PLAIN", "LOGIN"], "{capa:?}");
    assert!(!has_capability(&capa, "STLS"), "{capa:?}");
    c.err("STLS");
    c.user_pass(USER, PASS);
    let reply = c.err("STLS");
    assert!(!reply.starts_with("-ERR [AUTH]"), "{reply}");
    assert_eq!(c.stat().0, 2);
    let capa = c.capa();
    assert!(!has_capability(&capa, "STLS") && !has_capability(&capa, "USER"), "{capa:?}");
    assert!(c.quit().starts_with("+OK"));
}

#[test]
fn plain_listener_refuses_cleartext_login_off_loopback_and_offers_nothing() {
    let store = store();
    let gateway = start(config(ListenerTls::None, &[]), &store);
    let mut c = Client::connect(gateway.addr);
    let capa = c.capa();
    for hidden in ["USER", "SASL", "STLS"] {
        assert!(!has_capability(&capa, hidden), "{hidden} in {capa:?}");
    }
    for command in [format!("USER {USER}"), format!("AUTH PLAIN {}", plain_response(USER.as_bytes(), PASS.as_bytes()))]
    {
        let reply = c.err(&command);
        // RFC 3206: [AUTH] covers "an attempt to authenticate in violation
        // of policy". There is no STLS here, so it must not be suggested.
        assert!(reply.starts_with("-ERR [AUTH]"), "{command:?} → {reply}");
        assert!(!reply.contains("STLS"), "{command:?} → {reply}");
    }
    let reply = c.err("STLS");
    assert!(reply.contains("not available"), "{reply}");
    assert!(c.quit().starts_with("+OK"));
}

#[test]
fn loopback_counts_as_secure_by_default() {
    let store = store();
    let mut config = config(ListenerTls::None, &[]);
    config.listener[0].loopback_is_secure = true;
    let gateway = start(config, &store);
    let mut c = Client::connect_from(ip(9), gateway.addr);
    let capa = c.capa();
    assert!(has_capability(&capa, "USER") && !has_capability(&capa, "STLS"), "{capa:?}");
    c.user_pass(USER, PASS);
    c.quit();
}

#[test]
fn cleartext_login_is_allowed_only_from_the_configured_networks() {
    let store = store();
    let mut config = config(ListenerTls::None, &[]);
    config.listener[0].allow_cleartext_login = true;
    config.listener[0].cleartext_networks = vec!["127.0.0.2/32".parse().unwrap()];
    // Every login opens the store (none is served warm), to count them.
    config.backend_pool.enabled = false;
    let gateway = start(config, &store);

    let mut allowed = Client::connect_from(ip(2), gateway.addr);
    let capa = allowed.capa();
    assert!(has_capability(&capa, "USER"), "{capa:?}");
    assert_eq!(sasl_mechanisms(&capa), ["PLAIN", "LOGIN"], "{capa:?}");
    allowed.user_pass(USER, PASS);
    assert_eq!(allowed.stat().0, 2);
    allowed.quit();
    let mut allowed = Client::connect_from(ip(2), gateway.addr);
    assert!(
        allowed.cmd(&format!("AUTH PLAIN {}", plain_response(USER.as_bytes(), PASS.as_bytes()))).starts_with("+OK")
    );
    allowed.quit();

    for outsider in [ip(3), ip(1)] {
        let mut c = Client::connect_from(outsider, gateway.addr);
        let capa = c.capa();
        assert!(!has_capability(&capa, "USER") && sasl_mechanisms(&capa).is_empty(), "{outsider}: {capa:?}");
        let reply = c.err(&format!("USER {USER}"));
        assert!(reply.starts_with("-ERR [AUTH]"), "{outsider}: {reply}");
        let reply = c.err(&format!("AUTH PLAIN {}", plain_response(USER.as_bytes(), PASS.as_bytes())));
        assert!(reply.starts_with("-ERR [AUTH]"), "{outsider}: {reply}");
        c.quit();
    }
    assert_eq!(store.logins(), 2, "only 127.0.0.2's logins reached the store");
}

/// RFC 2595 section 4 and the classic STARTTLS injection (CVE-2011-0411 and
/// its POP3 kin): commands a man in the middle appends to STLS in the same
/// packet are cleartext and must be thrown away, never run under TLS.
#[test]
fn cleartext_pipelined_after_stls_is_discarded_and_logged() {
    let ca = TestCa::new();
    let a = ca.issue("a", "cert-a", &[NAME_A]);
    // The real binary (for its log), over the demo store, where any user
    // name and password log in: an executed `USER evil` would make the
    // next PASS a login as evil.
    let server = GatewayProcess::start_with_config(1, &[("RUST_LOG", "popgate=debug")], |addrs| {
        format!(
            "[[listener]]\naddress = \"{}\"\ntls = \"starttls\"\nloopback_is_secure = false\n\n\
             [tls]\ncertificates = [{{ cert = {:?}, key = {:?} }}]\n\n[backend]\nkind = \"demo\"\n",
            addrs[0],
            a.cert.display().to_string(),
            a.key.display().to_string()
        )
    });

    for injected in ["USER evil\r\n", "USER evil\r\nPASS evil\r\n", "USER evil\r\nPASS evil\r\nSTAT\r\nQUIT\r\nUSER ev"]
    {
        let mut c = Client::connect(server.addr);
        c.send_raw(format!("STLS\r\n{injected}").as_bytes());
        let reply = c.line();
        assert!(reply.starts_with("+OK"), "STLS → {reply}");
        // Fails if popgate answered any injected command in cleartext.
        let mut c = c.start_tls(ca.client_config(), NAME_A).expect("handshake after STLS");
        let reply = c.cmd("PASS x");
        assert!(
            reply.starts_with("-ERR") && reply.contains("USER first"),
            "after STLS + {injected:?}, PASS was taken as following an injected USER: {reply}"
        );
        let capa = c.capa();
        assert!(has_capability(&capa, "USER") && !has_capability(&capa, "STLS"), "{capa:?}");
        c.user_pass("alice", "alice's password");
        assert_eq!(c.stat().0, 3);
        assert!(c.quit().starts_with("+OK"));
    }
    let log = wait_for("the discard in popgate's log", Duration::from_secs(5), || {
        let log = server.log();
        (log.matches("discarding plaintext pipelined after STLS").count() >= 3).then_some(log)
    });
    assert!(!log.contains("evil"), "the injected user name reached a login:\n{log}");
    assert!(log.contains("logged in"), "{log}");
}

/// What the client said before TLS is not carried over either: a USER given
/// in cleartext (where cleartext login is allowed, e.g. from loopback) must
/// not make a PASS after STLS a login as that user (RFC 2595 section 4: the
/// server restarts in the AUTHORIZATION state; cf. RFC 3207 section 4.2,
/// "discard any knowledge obtained from the client").
#[test]
fn a_user_name_given_before_stls_does_not_survive_it() {
    let ca = TestCa::new();
    let a = ca.issue("a", "cert-a", &[NAME_A]);
    let store = store();
    let mut config = config(ListenerTls::Starttls, &[&a]);
    config.listener[0].loopback_is_secure = true;
    let gateway = start(config, &store);

    let mut c = Client::connect(gateway.addr);
    // A man in the middle inserts USER before the client's own STLS and
    // swallows its +OK.
    c.send_raw(format!("USER {USER}\r\nSTLS\r\n").as_bytes());
    assert!(c.line().starts_with("+OK"), "USER in cleartext from loopback is allowed");
    assert!(c.line().starts_with("+OK"), "STLS");
    let mut c = c.start_tls(ca.client_config(), NAME_A).expect("handshake");
    let reply = c.cmd(&format!("PASS {PASS}"));
    // A USER received in cleartext must not survive STLS: this PASS (sent
    // under TLS, with no USER under TLS) must not log in as the user the
    // cleartext side named.
    assert!(reply.starts_with("-ERR"), "PASS after STLS used the USER sent before it: {reply}");
}
