//! Certificates replaced while sessions stay open.

use super::*;

#[test]
fn reloaded_certificates_serve_new_connections_and_spare_open_sessions() {
    let ca = TestCa::new();
    let a = ca.issue("a", "cert-a", &[NAME_A]);
    let store = store();
    let gateway = start(config(ListenerTls::Implicit, &[&a]), &store);

    let mut old = Client::implicit(home(), gateway.addr, ca.client_config(), NAME_A);
    assert_eq!(old.peer_certificate(), a.der);
    old.user_pass(USER, PASS);

    let a2 = ca.replace(&a, "cert-a-2");
    // Not re-read before a reload (reload_check_secs = 0).
    let c = Client::implicit(home(), gateway.addr, ca.client_config(), NAME_A);
    assert_eq!(c.peer_certificate(), a.der);
    drop(c);
    gateway.reload_certificates().expect("reload");
    let mut new = Client::implicit(home(), gateway.addr, ca.client_config(), NAME_A);
    assert_eq!(new.peer_certificate(), a2.der, "a new connection after the reload gets the new certificate");
    new.user_pass(USER, PASS);

    // The session opened before the reload goes on.
    assert_eq!(old.retr(1), canonical(&simple("first")));
    old.ok("DELE 2");
    assert!(old.quit().starts_with("+OK"));
    assert_eq!(store.contents(USER).len(), 1);
    new.quit();

    // A broken replacement keeps what is in use.
    std::fs::write(&a.cert, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
    let error = gateway.reload_certificates().expect_err("a broken certificate must not load");
    assert!(error.contains("a.crt"), "the error names the file: {error}");
    let c = Client::implicit(home(), gateway.addr, ca.client_config(), NAME_A);
    assert_eq!(c.peer_certificate(), a2.der);
    let mut old = Client::implicit(home(), gateway.addr, ca.client_config(), NAME_A);
    old.user_pass(USER, PASS);
    old.quit();
}

/// An unreadable key file must be named as such: the operator fixing a
/// failed reload (or start) goes to the file the error names.
#[test]
fn a_broken_key_file_is_named_in_the_reload_error() {
    let ca = TestCa::new();
    let a = ca.issue("a", "cert-a", &[NAME_A]);
    let store = store();
    let gateway = start(config(ListenerTls::Implicit, &[&a]), &store);
    // Well-formed PEM, but not a key.
    std::fs::write(&a.key, "-----BEGIN PRIVATE KEY-----\nAAAAAAAA\n-----END PRIVATE KEY-----\n").unwrap();
    let error = gateway.reload_certificates().expect_err("a broken key must not load");
    let c = Client::implicit(home(), gateway.addr, ca.client_config(), NAME_A);
    assert_eq!(c.peer_certificate(), a.der, "the old certificate stays");
    // A key the provider cannot load is the key file's fault, not a
    // mismatch with the (intact) certificate.
    assert!(error.contains("a.key"), "the error must name the broken key file: {error}");
}

#[test]
fn changed_certificate_files_are_picked_up_by_the_watcher() {
    let ca = TestCa::new();
    let a = ca.issue("a", "cert-a", &[NAME_A]);
    let store = store();
    let mut config = config(ListenerTls::Starttls, &[&a]);
    config.tls.reload_check_secs = 1;
    let gateway = start(config, &store);

    let mut old = Client::connect(gateway.addr).stls(ca.client_config(), NAME_A);
    assert_eq!(old.peer_certificate(), a.der);
    old.user_pass(USER, PASS);
    // File times must differ from the loaded ones even on coarse clocks.
    std::thread::sleep(Duration::from_millis(50));
    let a2 = ca.replace(&a, "cert-a-2");
    let started = Instant::now();
    wait_for("the watcher to load the new certificate", Duration::from_secs(10), || {
        let c = Client::connect(gateway.addr).stls(ca.client_config(), NAME_A);
        (c.peer_certificate() == a2.der).then_some(())
    });
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?} with reload_check_secs = 1", started.elapsed());
    assert_eq!(old.retr(2), canonical(&simple("second")));
    assert!(old.quit().starts_with("+OK"));
}

#[test]
fn sighup_reloads_the_binarys_certificates_and_spares_open_sessions() {
    let ca = TestCa::new();
    let a = ca.issue("a", "cert-a", &[NAME_A]);
    let server = GatewayProcess::start_with_config(2, &[], |addrs| {
        format!(
            "[[listener]]\naddress = \"{}\"\ntls = \"implicit\"\nloopback_is_secure = false\n\n\
             [[listener]]\naddress = \"{}\"\ntls = \"starttls\"\nloopback_is_secure = false\n\n\
             [tls]\ncertificates = [{{ cert = {:?}, key = {:?} }}]\nreload_check_secs = 0\n\n\
             [backend]\nkind = \"demo\"\n",
            addrs[0],
            addrs[1],
            a.cert.display().to_string(),
            a.key.display().to_string()
        )
    });
    let (implicit, starttls) = (server.addrs[0], server.addrs[1]);
    let mut old_implicit = Client::implicit(home(), implicit, ca.client_config(), NAME_A);
    assert_eq!(old_implicit.peer_certificate(), a.der);
    old_implicit.user_pass("printer", "any");
    let mut old_stls = Client::connect(starttls).stls(ca.client_config(), NAME_A);
    assert_eq!(old_stls.peer_certificate(), a.der);
    old_stls.user_pass("scanner", "any");

    let a2 = ca.replace(&a, "cert-a-2");
    server.hangup();
    wait_for("SIGHUP to reload the certificates", Duration::from_secs(10), || {
        let c = Client::implicit(home(), implicit, ca.client_config(), NAME_A);
        (c.peer_certificate() == a2.der).then_some(())
    });
    let c = Client::connect(starttls).stls(ca.client_config(), NAME_A);
    assert_eq!(c.peer_certificate(), a2.der, "STLS after SIGHUP");
    wait_for("the reload in the log", Duration::from_secs(5), || {
        server.log().contains("certificates re-read").then_some(())
    });

    let demo = |name: &str| {
        canonical(
            &std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo").join(name)).unwrap(),
        )
    };
    assert_eq!(old_implicit.retr(1), demo("01-welcome.eml"));
    assert!(old_implicit.quit().starts_with("+OK"));
    assert_eq!(old_stls.retr(3), demo("03-scan.eml"));
    assert!(old_stls.quit().starts_with("+OK"));
}
