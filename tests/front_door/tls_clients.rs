//! TLS with real clients.

use super::*;

#[test]
fn implicit_tls_serves_openssl_curl_and_poplib() {
    let (ca, a, b) = two_certificates();
    let store = store();
    let gateway = start(config(ListenerTls::Implicit, &[&a, &b]), &store);
    let addr = gateway.addr;

    let output = s_client(&ca.ca_file, addr, Some(NAME_A), &[], &format!("USER {USER}\nPASS {PASS}\nSTAT\nQUIT\n"));
    let text = stdout(&output);
    assert!(output.status.success(), "{}", describe(&output));
    assert!(text.contains("Verify return code: 0 (ok)"), "{}", describe(&output));
    assert_eq!(s_client_subject(&output), subject_of(&a));
    assert!(text.contains("+OK popgate ready"), "{text}");
    let stat = format!("+OK 2 {}", canonical(&simple("first")).len() + canonical(&simple("second")).len());
    assert!(text.contains(&stat), "expected {stat:?} in\n{text}");
    assert!(text.contains("+OK popgate signing off"), "{text}");

    let url = format!("pop3s://{NAME_A}:{}/1", addr.port());
    let output = curl(&ca, &url, NAME_A, addr.port(), &[]);
    assert!(output.status.success(), "{}", describe(&output));
    assert_eq!(output.stdout, canonical(&simple("first")), "{}", describe(&output));

    let result = poplib(&ca, addr, NAME_B, "implicit", "");
    assert_eq!(result["subject_cn"], serde_json::json!(["cert-b"]), "{result}");
    assert_eq!(result["san"], serde_json::json!([NAME_B]), "{result}");
    assert!(result["pass"].as_str().unwrap().starts_with("+OK"), "{result}");
    assert_eq!(result["stat"][0], 2, "{result}");
    assert_eq!(result["retr1"].as_str().unwrap().as_bytes(), canonical(&simple("first")), "{result}");
    assert!(result["quit"].as_str().unwrap().starts_with("+OK"), "{result}");
    // Logged in over TLS from loopback with loopback_is_secure = false:
    // USER and SASL are offered under TLS.
    let capa: Vec<String> = serde_json::from_value(result["capa_after"].clone()).unwrap();
    assert!(capa.contains(&"USER".to_string()) && capa.contains(&"SASL".to_string()), "{capa:?}");
    assert!(!capa.contains(&"STLS".to_string()), "{capa:?}");
}

#[test]
fn starttls_serves_openssl_curl_and_poplib_and_cleartext_curl_is_refused() {
    let (ca, a, b) = two_certificates();
    let store = store();
    let gateway = start(config(ListenerTls::Starttls, &[&a, &b]), &store);
    let addr = gateway.addr;

    let output = s_client(
        &ca.ca_file,
        addr,
        Some(NAME_B),
        &["-starttls", "pop3"],
        &format!("CAPA\nUSER {USER}\nPASS {PASS}\nQUIT\n"),
    );
    let text = stdout(&output);
    assert!(output.status.success(), "{}", describe(&output));
    assert!(text.contains("Verify return code: 0 (ok)"), "{}", describe(&output));
    assert_eq!(s_client_subject(&output), subject_of(&b));
    assert!(text.contains("+OK maildrop has 2 messages"), "{text}");
    assert!(text.contains("\nUSER\r\n") || text.contains("\nUSER\n"), "CAPA after STLS lists USER:\n{text}");
    assert!(!text.contains("\nSTLS\r\n") && !text.contains("\nSTLS\n"), "CAPA after STLS lists STLS:\n{text}");

    // curl with --ssl-reqd uses STLS; the login then works.
    let url = format!("pop3://{NAME_A}:{}/2", addr.port());
    let output = curl(&ca, &url, NAME_A, addr.port(), &["--ssl-reqd"]);
    assert!(output.status.success(), "{}", describe(&output));
    assert_eq!(output.stdout, canonical(&simple("second")), "{}", describe(&output));

    // Without it curl stays in cleartext, and its login is refused.
    let output = curl(&ca, &url, NAME_A, addr.port(), &[]);
    assert!(!output.status.success(), "a cleartext login from a non-secure address worked:\n{}", describe(&output));
    assert!(output.stdout.is_empty(), "{}", describe(&output));

    let result = poplib(&ca, addr, NAME_A, "stls", "");
    let before: Vec<String> = serde_json::from_value(result["capa_before"].clone()).unwrap();
    assert!(before.contains(&"STLS".to_string()), "{result}");
    assert!(!before.contains(&"USER".to_string()) && !before.contains(&"SASL".to_string()), "{result}");
    let after: Vec<String> = serde_json::from_value(result["capa_after"].clone()).unwrap();
    assert!(after.contains(&"USER".to_string()) && after.contains(&"SASL".to_string()), "{result}");
    assert!(!after.contains(&"STLS".to_string()), "{result}");
    assert_eq!(result["subject_cn"], serde_json::json!(["cert-a"]), "{result}");
    assert!(result["pass"].as_str().unwrap().starts_with("+OK"), "{result}");
    assert_eq!(result["retr1"].as_str().unwrap().as_bytes(), canonical(&simple("first")), "{result}");
    assert!(result["quit"].as_str().unwrap().starts_with("+OK"), "{result}");
}

#[test]
fn only_tls_1_2_and_1_3_are_accepted() {
    let (ca, a, b) = two_certificates();
    let store = store();
    let implicit = start(config(ListenerTls::Implicit, &[&a, &b]), &store);
    let starttls = start(config(ListenerTls::Starttls, &[&a, &b]), &store);

    for (gateway, extra) in [(&implicit, &[][..]), (&starttls, &["-starttls", "pop3"][..])] {
        for (flag, want) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
            let args: Vec<&str> = extra.iter().copied().chain([flag]).collect();
            let output = s_client(&ca.ca_file, gateway.addr, Some(NAME_A), &args, "QUIT\n");
            assert!(output.status.success(), "{flag} {extra:?}: {}", describe(&output));
            assert_eq!(s_client_protocol(&output), want, "{}", describe(&output));
            assert!(stdout(&output).contains("+OK popgate signing off"), "{}", describe(&output));
        }
        // TLS 1.1, really offered (security level 0 lets OpenSSL 3 send it):
        // the server answers with a fatal alert. (rustls sends
        // handshake_failure, as a TLS 1.1 ClientHello lacks the
        // signature_algorithms extension, rather than RFC 8996's
        // protocol_version; either way nothing is negotiated.)
        let args: Vec<&str> = extra.iter().copied().chain(["-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"]).collect();
        let output = s_client(&ca.ca_file, gateway.addr, Some(NAME_A), &args, "QUIT\n");
        let all = describe(&output);
        assert!(!output.status.success(), "TLS 1.1 handshake succeeded ({extra:?}):\n{all}");
        assert!(!all.contains("no protocols available"), "the client did not offer TLS 1.1 at all:\n{all}");
        assert!(stdout(&output).contains("Protocol  : TLSv1.1"), "the client offered TLS 1.1:\n{all}");
        assert!(
            all.contains("alert handshake failure") || all.contains("alert protocol version"),
            "expected a fatal alert from the server:\n{all}"
        );
        assert!(stdout(&output).contains("no peer certificate available"), "{all}");
        assert!(!stdout(&output).contains("+OK"), "{all}");
    }

    // Python's ssl, the same way round.
    for (gateway, mode) in [(&implicit, "implicit"), (&starttls, "stls")] {
        let refused = poplib(&ca, gateway.addr, NAME_A, mode, "max=TLSv1_1");
        let reason = refused["ssl_error"].as_str().unwrap_or_else(|| panic!("TLS 1.1 was accepted: {refused}"));
        // An alert received from the server, not a local refusal to offer
        // TLS 1.1 (NO_PROTOCOLS_AVAILABLE).
        assert!(reason.contains("ALERT"), "{mode}: {refused}");
    }
    for version in ["TLSv1_2", "TLSv1_3"] {
        let result = poplib(&ca, implicit.addr, NAME_A, "implicit", &format!("max={version}"));
        assert_eq!(result["version"], version.replace('_', "."), "{result}");
        assert!(result["quit"].as_str().unwrap().starts_with("+OK"), "{result}");
    }

    // Our own rustls client, pinned to each version.
    for (version, want) in [
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let mut c = Client::implicit(home(), implicit.addr, ca.client_config_for(&[version]), NAME_A);
        assert_eq!(c.protocol_version(), want);
        c.user_pass(USER, PASS);
        c.quit();
    }
}

#[test]
fn sni_chooses_the_certificate_for_each_name() {
    let ca = TestCa::new();
    let a = ca.issue("a", "cert-a", &[NAME_A]);
    let b = ca.issue("b", "cert-b", &[NAME_B, "*.wild.test"]);
    let store = store();
    let implicit = start(config(ListenerTls::Implicit, &[&a, &b]), &store);
    let starttls = start(config(ListenerTls::Starttls, &[&a, &b]), &store);

    for (gateway, extra) in [(&implicit, &[][..]), (&starttls, &["-starttls", "pop3"][..])] {
        for (name, want) in [(NAME_A, &a), (NAME_B, &b), ("mail.wild.test", &b)] {
            let output = s_client(&ca.ca_file, gateway.addr, Some(name), extra, "QUIT\n");
            assert!(output.status.success(), "{name}: {}", describe(&output));
            assert_eq!(s_client_subject(&output), subject_of(want), "SNI {name} ({extra:?})");
        }
        // No SNI, or a name no certificate has: the first (default)
        // certificate. (The client's host name check would fail for the
        // unknown name; openssl is told not to check it.)
        let no_sni: Vec<&str> = extra.iter().copied().chain(["-noservername"]).collect();
        let output = s_client(&ca.ca_file, gateway.addr, None, &no_sni, "QUIT\n");
        assert!(output.status.success(), "{}", describe(&output));
        assert_eq!(s_client_subject(&output), subject_of(&a));
        let unknown: Vec<&str> = extra.iter().copied().chain(["-servername", "other.test"]).collect();
        let output = s_client(&ca.ca_file, gateway.addr, None, &unknown, "QUIT\n");
        assert_eq!(s_client_subject(&output), subject_of(&a), "{}", describe(&output));
    }

    // poplib and our own client see the same.
    for (name, want) in [(NAME_A, "cert-a"), (NAME_B, "cert-b")] {
        let result = poplib(&ca, implicit.addr, name, "implicit", "");
        assert_eq!(result["subject_cn"], serde_json::json!([want]), "{result}");
        let result = poplib(&ca, starttls.addr, name, "stls", "");
        assert_eq!(result["subject_cn"], serde_json::json!([want]), "{result}");
    }
    for (name, want) in [(NAME_A, &a), (NAME_B, &b)] {
        let c = Client::implicit(home(), implicit.addr, ca.client_config(), name);
        assert_eq!(c.peer_certificate(), want.der, "{name}");
        let c = Client::connect(starttls.addr).stls(ca.client_config(), name);
        assert_eq!(c.peer_certificate(), want.der, "{name} (STLS)");
    }
}
