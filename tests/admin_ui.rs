//! The admin page in a real browser: Debian's chromium, headless, driven
//! over WebDriver (chromium-driver) by fantoccini. popgate runs in-process
//! with a mapped account over the demo backend; POP3 logins are made by
//! curl through popgate's listener.
//!
//! Screenshots go to docs/ only with `POPGATE_SCREENSHOTS=1`, so ordinary
//! runs leave the tree as it was.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use std::os::unix::fs::PermissionsExt;

use fantoccini::{Client, ClientBuilder, Locator};
use popgate::auth::accounts::reloadable::ReloadableRouter;
use popgate::auth::accounts::router::AccountRouter;
use popgate::auth::passwords::hash_password;
use popgate::auth::tokens::StoreKey;
use popgate::backend::select::BackendConfig;
use popgate::config::Config;
use popgate::server::Server;
use popgate::server::admin::AdminServer;
use popgate::server::admin::guard::Guard;
use popgate::server::admin::page::{LiveFleet, Page};
use popgate::telemetry::Metrics;
use support::dovecot::Dovecot;
use support::messages::simple;
use support::oauth_server::{CLIENT_SECRET, Fault, OAuthServer};
use support::{IO_TIMEOUT, free_port, wait_for};
use tokio::sync::oneshot;

const ADMIN_PASSWORD: &str = "admin-Pa55word-for-the-test";
const OFFICE_PASSWORD: &str = "office-backend-secret-xyz";
const PRINTER_PASSWORD: &str = "printer-one-password";
/// The whole browser scenario; every wait inside is shorter.
const SCENARIO_LIMIT: Duration = Duration::from_secs(240);

/// popgate in-process (its own runtime on its own thread) with the admin
/// page, as `popgate serve` wires it.
struct AdminGateway {
    pop3: SocketAddr,
    admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AdminGateway {
    fn start(config: Config) -> AdminGateway {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            runtime.block_on(async move {
                let metrics = Arc::new(Metrics::new());
                let config = config.with_admin_state().expect("configuration with the admin state");
                let accounts = AccountRouter::new(config.accounts(), metrics.clone(), BackendConfig::build).unwrap();
                let router = Arc::new(ReloadableRouter::new(accounts));
                let server = Server::start(&config, router.clone(), metrics.clone()).await.unwrap();
                let guard = Guard::new(&config.admin, config.throttle.clone()).unwrap();
                let file_config = config.clone();
                let fleet =
                    LiveFleet { router, metrics: metrics.clone(), load: Box::new(move || Ok(file_config.clone())) };
                let page =
                    Arc::new(Page::new(guard, Arc::new(fleet), server.activity(), server.metrics(), server.health()));
                let admin = AdminServer::start_with_page(
                    "127.0.0.1:0".parse().unwrap(),
                    server.metrics(),
                    server.health(),
                    Some(page),
                )
                .await
                .unwrap();
                addr_tx.send((server.local_addrs()[0], admin.address)).unwrap();
                let _ = stop_rx.await;
                admin.stop();
                drop(server);
            });
            runtime.shutdown_timeout(Duration::from_secs(2));
        });
        let (pop3, admin) = addr_rx.recv_timeout(IO_TIMEOUT).expect("popgate started");
        AdminGateway { pop3, admin, stop: Some(stop_tx), thread: Some(thread) }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }
}

impl Drop for AdminGateway {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A mapped account over the demo backend, one configured device, the
/// admin password set and the state file in `dir`.
fn configuration(dir: &Path) -> Config {
    let office_password = dir.join("office-password");
    std::fs::write(&office_password, OFFICE_PASSWORD).unwrap();
    let text = format!(
        r#"
[[listener]]
address = "127.0.0.1:0"

[admin]
password_hash = "{admin_hash}"
state_file = "{state}"

[backend]
kind = "demo"

[[account]]
name = "office"
mode = "mapped"
login = "office@example.com"
password_file = "{office_password}"

[[account.device]]
user = "printer1"
password_hash = "{printer_hash}"
"#,
        admin_hash = hash_password(ADMIN_PASSWORD).unwrap(),
        printer_hash = hash_password(PRINTER_PASSWORD).unwrap(),
        state = dir.join("admin-state.toml").display(),
        office_password = office_password.display(),
    );
    Config::from_toml(&text, "admin test").unwrap_or_else(|e| panic!("{e}"))
}

/// chromedriver on a run-time port, ended on drop.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start() -> Driver {
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian chromium-driver; scripts/install-test-deps installs it)");
        wait_for("chromedriver to listen", IO_TIMEOUT, || std::net::TcpStream::connect(("127.0.0.1", port)).ok());
        Driver { child, port }
    }

    async fn browser(&self) -> Client {
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": "/usr/bin/chromium",
                // Root in a container: no sandbox; no display: headless.
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1200,800"],
            }),
        );
        let connect = async {
            ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                .capabilities(capabilities)
                .connect(&format!("http://127.0.0.1:{}", self.port))
                .await
                .expect("a chromium session")
        };
        tokio::time::timeout(IO_TIMEOUT * 2, connect).await.expect("chromium started in time")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The element `css` once it is there (bounded).
async fn find(browser: &Client, css: &str) -> fantoccini::elements::Element {
    match browser.wait().at_most(IO_TIMEOUT).for_element(Locator::Css(css)).await {
        Ok(element) => element,
        Err(e) => panic!("no `{css}` on {:?}: {e}", browser.current_url().await.ok()),
    }
}

async fn text(browser: &Client, css: &str) -> String {
    find(browser, css).await.text().await.unwrap()
}

fn screenshots() -> Option<PathBuf> {
    (std::env::var("POPGATE_SCREENSHOTS").as_deref() == Ok("1"))
        .then(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("docs"))
}

async fn screenshot(browser: &Client, name: &str) {
    if let Some(dir) = screenshots() {
        let png = browser.screenshot().await.unwrap();
        std::fs::write(dir.join(name), png).unwrap();
    }
}

/// `curl pop3://` as `user`: `Ok(listing)` or `Err(curl's exit code and
/// message)`.
fn curl_pop3(pop3: SocketAddr, user: &str, password: &str) -> Result<String, String> {
    curl_pop3_with(pop3, user, password, "", &[])
}

/// `curl pop3://ADDR/PATH` with `extra` arguments (`-X DELE -I` for DELE).
fn curl_pop3_with(pop3: SocketAddr, user: &str, password: &str, path: &str, extra: &[&str]) -> Result<String, String> {
    let output = Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "20", "--user", &format!("{user}:{password}")])
        .args(extra)
        .arg(format!("pop3://{pop3}/{path}"))
        .output()
        .expect("curl");
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!("{:?}: {}", output.status.code(), String::from_utf8_lossy(&output.stderr)))
    }
}

/// What no page may ever contain.
fn assert_no_secrets(source: &str, also: &[&str]) {
    for secret in [ADMIN_PASSWORD, OFFICE_PASSWORD, PRINTER_PASSWORD, "$argon2"].iter().chain(also) {
        assert!(!source.contains(secret), "a page shows a secret ({}…)", &secret[..4]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_administrator_signs_in_adds_a_device_sees_its_poll_and_disables_it() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = AdminGateway::start(configuration(dir.path()));
    let driver = Driver::start();
    let browser = driver.browser().await;
    let scenario = async {
        // Signed out, every page leads to the sign-in form.
        browser.goto(&gateway.url("/devices")).await.unwrap();
        find(&browser, "input[name=password]").await.send_keys("wrong").await.unwrap();
        find(&browser, "#sign-in").await.click().await.unwrap();
        find(&browser, "#sign-in-failed").await;
        find(&browser, "input[name=password]").await.send_keys(ADMIN_PASSWORD).await.unwrap();
        find(&browser, "#sign-in").await.click().await.unwrap();

        // The overview, with its chart.
        find(&browser, "svg#activity-chart").await;
        assert!(text(&browser, "#backend-health").await.contains("demo"));
        screenshot(&browser, "admin-overview.png").await;

        // Add a device; its password is shown once.
        browser.goto(&gateway.url("/devices")).await.unwrap();
        find(&browser, "#device-printer1").await;
        find(&browser, "#add-device input[name=user]").await.send_keys("scanner7").await.unwrap();
        find(&browser, "#add-device button").await.click().await.unwrap();
        let password = text(&browser, "#new-password").await;
        assert_eq!(password.len(), 20, "a generated password");
        assert!(
            std::fs::read_to_string(dir.path().join("admin-state.toml")).unwrap().contains("scanner7"),
            "the new device is kept in the state file"
        );

        // The device logs in over POP3 through popgate at once (no
        // restart), and its poll shows on the page.
        curl_pop3_blocking(&gateway, "scanner7", &password)
            .await
            .unwrap_or_else(|e| panic!("the new device's POP3 login: {e}"));
        browser.goto(&gateway.url("/devices")).await.unwrap();
        let poll = text(&browser, "#device-scanner7 td.last-poll").await;
        assert!(poll.contains("from 127.0.0.1, 0 retrieved, 0 deleted"), "last poll shown: {poll}");
        // A session that retrieves message 1, then one that deletes it:
        // each is the device's last poll, with its counts.
        let (pop3, pw) = (gateway.pop3, password.clone());
        let retrieved = tokio::task::spawn_blocking(move || curl_pop3_with(pop3, "scanner7", &pw, "1", &[]));
        retrieved.await.unwrap().unwrap_or_else(|e| panic!("RETR 1: {e}"));
        browser.goto(&gateway.url("/devices")).await.unwrap();
        let poll = text(&browser, "#device-scanner7 td.last-poll").await;
        assert!(poll.contains("1 retrieved, 0 deleted"), "after RETR: {poll}");
        let (pop3, pw) = (gateway.pop3, password.clone());
        let deleted =
            tokio::task::spawn_blocking(move || curl_pop3_with(pop3, "scanner7", &pw, "1", &["-X", "DELE", "-I"]));
        deleted.await.unwrap().unwrap_or_else(|e| panic!("DELE 1: {e}"));
        browser.goto(&gateway.url("/devices")).await.unwrap();
        let poll = text(&browser, "#device-scanner7 td.last-poll").await;
        assert!(poll.contains("0 retrieved, 1 deleted"), "after DELE and QUIT: {poll}");
        let source = browser.source().await.unwrap();
        assert_no_secrets(&source, &[&password]);
        screenshot(&browser, "admin-devices.png").await;

        // Disable it: its next POP3 login is refused.
        find(&browser, "#device-scanner7 button.toggle").await.click().await.unwrap();
        wait_for_text(&browser, &gateway.url("/devices"), "#device-scanner7 td.enabled", "no").await;
        let refused = curl_pop3_blocking(&gateway, "scanner7", &password).await;
        assert!(refused.is_err(), "a disabled device's login is refused: {refused:?}");

        // The other pages show no secret either.
        for path in ["/", "/accounts", "/devices"] {
            browser.goto(&gateway.url(path)).await.unwrap();
            find(&browser, "main h1").await;
            assert_no_secrets(&browser.source().await.unwrap(), &[&password]);
        }
        browser.goto(&gateway.url("/accounts")).await.unwrap();
        let accounts = text(&browser, "#account-office").await;
        assert!(accounts.contains("office") && accounts.contains("demo"), "{accounts}");
    };
    let outcome = tokio::time::timeout(SCENARIO_LIMIT, scenario).await;
    let _ = browser.close().await;
    outcome.expect("the browser scenario finished in time");
}

/// Reloads `url` until `css` reads `expected` (bounded).
async fn wait_for_text(browser: &Client, url: &str, css: &str, expected: &str) {
    let deadline = tokio::time::Instant::now() + IO_TIMEOUT;
    loop {
        browser.goto(url).await.unwrap();
        let now = text(browser, css).await;
        if now.trim() == expected {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "`{css}` still reads {now:?}, not {expected:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An HTTP client that shows redirects and cookies as they are.
fn http() -> reqwest::Client {
    // popgate's reqwest comes without a TLS provider of its own.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).timeout(IO_TIMEOUT).build().unwrap()
}

fn session_cookie(response: &reqwest::Response) -> String {
    let header = response.headers().get(reqwest::header::SET_COOKIE).expect("a session cookie").to_str().unwrap();
    assert!(header.contains("HttpOnly") && header.contains("SameSite=Strict"), "{header}");
    header.split(';').next().unwrap().to_string()
}

fn csrf_in(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").expect("a CSRF field") + "name=\"csrf\" value=\"".len();
    html[at..].split('"').next().unwrap().to_string()
}

#[tokio::test]
async fn a_post_without_the_csrf_token_is_refused_even_when_signed_in() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = AdminGateway::start(configuration(dir.path()));
    let http = http();
    let form = http.get(gateway.url("/login")).send().await.unwrap();
    let csp = form.headers().get("content-security-policy").expect("a CSP").to_str().unwrap().to_string();
    assert!(csp.contains("default-src 'none'") && csp.contains("form-action 'self'"), "{csp}");
    let cookie = session_cookie(&form);
    let csrf = csrf_in(&form.text().await.unwrap());
    // Sign-in itself needs the token.
    let no_token = http
        .post(gateway.url("/login"))
        .header("cookie", &cookie)
        .form(&[("password", ADMIN_PASSWORD)])
        .send()
        .await
        .unwrap();
    assert_eq!(no_token.status(), 403);
    let signed_in = http
        .post(gateway.url("/login"))
        .header("cookie", &cookie)
        .form(&[("password", ADMIN_PASSWORD), ("csrf", &csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(signed_in.status(), 303);
    let cookie = session_cookie(&signed_in);
    let devices = http.get(gateway.url("/devices")).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(devices.status(), 200);
    let csrf = csrf_in(&devices.text().await.unwrap());
    for form in [vec![("user", "printer1")], vec![("user", "printer1"), ("csrf", "0123")]] {
        let refused =
            http.post(gateway.url("/devices/disable")).header("cookie", &cookie).form(&form).send().await.unwrap();
        assert_eq!(refused.status(), 403, "{form:?}");
    }
    assert!(curl_pop3_blocking(&gateway, "printer1", PRINTER_PASSWORD).await.is_ok(), "nothing changed");
    // With the token the same request works.
    let done = http
        .post(gateway.url("/devices/disable"))
        .header("cookie", &cookie)
        .form(&[("user", "printer1"), ("csrf", &csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), 303);
    assert!(curl_pop3_blocking(&gateway, "printer1", PRINTER_PASSWORD).await.is_err(), "disabled at once");
    // Signed out (no cookie), a page leads to the sign-in form.
    let anonymous = http.get(gateway.url("/devices")).send().await.unwrap();
    assert_eq!(anonymous.status(), 303);
    assert_eq!(anonymous.headers().get("location").unwrap(), "/login");
    // The probes stay unauthenticated.
    assert_eq!(http.get(gateway.url("/readyz")).send().await.unwrap().status(), 200);
}

async fn curl_pop3_blocking(gateway: &AdminGateway, user: &str, password: &str) -> Result<String, String> {
    let (pop3, user, password) = (gateway.pop3, user.to_string(), password.to_string());
    tokio::task::spawn_blocking(move || curl_pop3(pop3, &user, &password)).await.unwrap()
}

/// What start, SIGHUP and check-config read: the configuration with the
/// state file laid over it, or an error naming the file.
#[test]
fn the_state_file_is_laid_over_the_configuration_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("admin-state.toml");
    std::fs::write(&state, "[[device]]\naccount = \"office\"\nuser = \"printer1\"\nenabled = false\n").unwrap();
    let config = configuration(dir.path()).with_admin_state().unwrap();
    assert!(!config.account[0].device[0].enabled, "disabled by the page");
    std::fs::write(&state, "[[device]]\naccount = \"gone\"\nuser = \"printer1\"\nenabled = false\n").unwrap();
    let error = configuration(dir.path()).with_admin_state().unwrap_err().to_string();
    assert!(error.contains("admin.state_file") && error.contains("gone"), "{error}");
    std::fs::write(&state, "[[device]]\naccount = \"office\"\nuser = \"x\"\npassword_hash = \"not a hash\"\n").unwrap();
    let error = configuration(dir.path()).with_admin_state().unwrap_err().to_string();
    assert!(error.contains("password_hash"), "{error}");
}

// ---------------------------------------------------------------------
// Connect a mailbox: OAuth sign-ins from the page, against the stand-in
// authorization server and a Dovecot that checks its tokens.

const ALICE: (&str, &str) = ("alice", "alice-imap-password");
const SCANNER_PASSWORD: &str = "scanner-device-password";

/// The stand-in (asking for consent), a Dovecot trusting it with one
/// message for alice, and popgate with the OAuth account "scans" (no token
/// yet) and its device "scanner-1".
struct OAuthWorld {
    idp: OAuthServer,
    dovecot: Dovecot,
    dir: tempfile::TempDir,
    gateway: AdminGateway,
}

impl OAuthWorld {
    fn start() -> OAuthWorld {
        let idp = OAuthServer::start(ALICE.0);
        idp.require_consent();
        let dovecot = Dovecot::start_oauth(&idp.url("/introspect"), &[ALICE], "plain login xoauth2 oauthbearer");
        dovecot.append(ALICE.0, &simple("scan 1"));
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("token.key");
        std::fs::write(&key, format!("{}\n", StoreKey::generate_text())).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let secret = dir.path().join("client-secret");
        std::fs::write(&secret, format!("{CLIENT_SECRET}\n")).unwrap();
        let text = format!(
            r#"
[[listener]]
address = "127.0.0.1:0"

[admin]
password_hash = "{admin_hash}"

[backend]
kind = "imap"
host = "127.0.0.1"
port = {port}
tls = "none"
timeout_secs = 10

[token_store]
path = "{store}"
key_file = "{key}"

[[account]]
name = "scans"
mode = "mapped"
login = "{alice}"

[account.oauth]
provider = "generic"
client_id = "popgate-test-client"
client_secret_file = "{secret}"
authorization_url = "{idp}/authorize"
token_url = "{idp}/token"
device_authorization_url = "{idp}/device"
scopes = ["mail"]
retry_after_failure_secs = 1
timeout_secs = 10

[[account.device]]
user = "scanner-1"
password_hash = "{scanner_hash}"
"#,
            admin_hash = hash_password(ADMIN_PASSWORD).unwrap(),
            port = dovecot.imap_port,
            store = dir.path().join("tokens.enc").display(),
            key = key.display(),
            secret = secret.display(),
            alice = ALICE.0,
            idp = format!("http://{}", idp.addr),
            scanner_hash = hash_password(SCANNER_PASSWORD).unwrap(),
        );
        let config = Config::from_toml(&text, "admin OAuth test").unwrap_or_else(|e| panic!("{e}"));
        let gateway = AdminGateway::start(config);
        OAuthWorld { idp, dovecot, dir, gateway }
    }

    /// Every secret the pages must never show: the stand-in's tokens, the
    /// client secret, the passwords.
    fn assert_no_secrets(&self, source: &str) {
        let tokens = self.idp.all_tokens();
        let mut also: Vec<&str> = tokens.iter().map(String::as_str).collect();
        also.extend([CLIENT_SECRET, SCANNER_PASSWORD, ALICE.1]);
        assert_no_secrets(source, &also);
        assert!(!source.contains("code-"), "an authorization code on a page");
        assert!(!source.contains("dc-"), "a device code on a page");
    }
}

async fn sign_in(browser: &Client, gateway: &AdminGateway) {
    browser.goto(&gateway.url("/login")).await.unwrap();
    find(browser, "input[name=password]").await.send_keys(ADMIN_PASSWORD).await.unwrap();
    find(browser, "#sign-in").await.click().await.unwrap();
    find(browser, "svg#activity-chart").await;
}

/// Reloads `url` until `css`'s text contains `expected` (bounded).
async fn wait_for_text_containing(browser: &Client, url: &str, css: &str, expected: &str) -> String {
    let deadline = tokio::time::Instant::now() + IO_TIMEOUT;
    loop {
        browser.goto(url).await.unwrap();
        let now = text(browser, css).await;
        if now.contains(expected) {
            return now;
        }
        assert!(tokio::time::Instant::now() < deadline, "`{css}` still reads {now:?}, without {expected:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_administrator_connects_an_oauth_account_through_the_consent_page_and_its_device_reads_mail() {
    let world = OAuthWorld::start();
    // Access tokens live exactly the refresh margin (300 s): each login
    // refreshes first, so the page has refreshes to show.
    world.idp.set_access_ttl(300);
    let gateway = &world.gateway;
    let driver = Driver::start();
    let browser = driver.browser().await;
    let scenario = async {
        sign_in(&browser, gateway).await;
        browser.goto(&gateway.url("/accounts")).await.unwrap();
        let state = text(&browser, "#account-scans td.token-state").await;
        assert!(state.contains("needs sign-in") && state.contains("no token stored"), "{state}");
        find(&browser, "#account-scans a.needs-sign-in[href='#connect-scans']").await;
        assert_eq!(text(&browser, "#redirect-uri").await, gateway.url("/oauth/callback"));
        // The device cannot log in yet.
        let refused = curl_pop3_blocking(gateway, "scanner-1", SCANNER_PASSWORD).await;
        assert!(refused.is_err(), "no token yet: {refused:?}");

        // "Sign in with your provider": the stand-in's consent page, Allow,
        // and back on popgate's callback with the token stored.
        find(&browser, "#connect-scans button.sign-in-code").await.click().await.unwrap();
        find(&browser, "#allow").await.click().await.unwrap();
        let connected = text(&browser, "#connected").await;
        assert!(connected.contains("scans") && connected.contains("valid, expires in"), "{connected}");
        assert!(connected.contains("refresh token held"), "{connected}");
        world.assert_no_secrets(&browser.source().await.unwrap());
        let callback = browser.current_url().await.unwrap();
        assert_eq!(callback.path(), "/oauth/callback");

        // The accounts page shows the token valid; the device reads alice's
        // mailbox through Dovecot's oauth2 passdb with it.
        find(&browser, "a[href='/accounts']").await.click().await.unwrap();
        let state = text(&browser, "#account-scans td.token-state").await;
        assert!(state.contains("valid until") && state.contains("refresh token: held"), "{state}");
        assert!(!state.contains("needs sign-in"), "{state}");
        world.assert_no_secrets(&browser.source().await.unwrap());
        screenshot(&browser, "admin-accounts.png").await;
        let listing = curl_pop3_blocking(gateway, "scanner-1", SCANNER_PASSWORD)
            .await
            .unwrap_or_else(|e| panic!("the device's POP3 login after connecting: {e}"));
        assert_eq!(listing.lines().count(), 1, "one message: {listing}");
        assert!(world.dovecot.logins(ALICE.0, "XOAUTH2") >= 1, "{}", world.dovecot.log());
        assert_eq!(
            world.idp.grants(),
            ["authorization_code", "refresh_token"],
            "the code exchanged once, then a refresh"
        );
        browser.goto(&gateway.url("/accounts")).await.unwrap();
        let state = text(&browser, "#account-scans td.token-state").await;
        assert!(state.contains("last refresh: ") && !state.contains("invalid_grant"), "{state}");

        // The provider refuses the refresh token: the next login's refresh
        // gets invalid_grant (the login itself may still use the access
        // token that has not expired), and the page shows it, with "needs
        // sign-in".
        world.idp.inject(&[Fault::InvalidGrant]);
        let _ = curl_pop3_blocking(gateway, "scanner-1", SCANNER_PASSWORD).await;
        assert_eq!(world.idp.grants().len(), 3, "the login asked for a refresh");
        browser.goto(&gateway.url("/accounts")).await.unwrap();
        let state = text(&browser, "#account-scans td.token-state").await;
        assert!(state.contains("last invalid_grant: ") && state.contains("needs sign-in"), "{state}");

        // Deny at the consent page: the error says so; nothing changes.
        find(&browser, "#connect-scans button.sign-in-code").await.click().await.unwrap();
        find(&browser, "#deny").await.click().await.unwrap();
        let error = text(&browser, "#sign-in-error").await;
        assert!(error.contains("scans") && error.contains("access_denied"), "{error}");
        world.assert_no_secrets(&browser.source().await.unwrap());

        // Signing in again ends it: valid, no "needs sign-in", and the
        // device logs in again.
        browser.goto(&gateway.url("/accounts")).await.unwrap();
        find(&browser, "#connect-scans button.sign-in-code").await.click().await.unwrap();
        find(&browser, "#allow").await.click().await.unwrap();
        find(&browser, "#connected").await;
        browser.goto(&gateway.url("/accounts")).await.unwrap();
        let state = text(&browser, "#account-scans td.token-state").await;
        assert!(state.contains("valid until") && !state.contains("needs sign-in"), "{state}");
        assert!(state.contains("last invalid_grant"), "the last invalid_grant stays on record: {state}");
        curl_pop3_blocking(gateway, "scanner-1", SCANNER_PASSWORD)
            .await
            .unwrap_or_else(|e| panic!("the device's POP3 login after signing in again: {e}"));
        let log_dir = world.dir.path().to_path_buf();
        assert!(log_dir.join("tokens.enc").exists(), "the token went to the token store");
    };
    let outcome = tokio::time::timeout(SCENARIO_LIMIT, scenario).await;
    let _ = browser.close().await;
    outcome.expect("the browser scenario finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_administrator_connects_an_oauth_account_with_a_device_code() {
    let world = OAuthWorld::start();
    let gateway = &world.gateway;
    let driver = Driver::start();
    let browser = driver.browser().await;
    let scenario = async {
        sign_in(&browser, gateway).await;
        // A user who refuses on the other device: the provider's poll
        // answer is access_denied, and the page says so.
        browser.goto(&gateway.url("/accounts")).await.unwrap();
        find(&browser, "#connect-scans button.sign-in-device").await.click().await.unwrap();
        find(&browser, "#user-code").await;
        world.idp.inject(&[Fault::Refused("access_denied")]);
        let refused_page = browser.current_url().await.unwrap().to_string();
        let status = wait_for_text_containing(&browser, &refused_page, "#device-status", "failed").await;
        assert!(status.contains("access_denied"), "{status}");

        browser.goto(&gateway.url("/accounts")).await.unwrap();
        find(&browser, "#connect-scans button.sign-in-device").await.click().await.unwrap();
        let user_code = text(&browser, "#user-code").await;
        assert!(user_code.starts_with("WDJB-"), "{user_code}");
        assert_eq!(text(&browser, "#verification-uri").await, "https://idp.invalid/device");
        assert!(text(&browser, "#device-status").await.contains("Waiting"));
        let device_page = browser.current_url().await.unwrap().to_string();
        world.assert_no_secrets(&browser.source().await.unwrap());

        // The user approves on "another device" (an HTTP call to the
        // stand-in); popgate's poller stores the token; the page says so.
        let approved = http()
            .post(world.idp.url("/device/approve"))
            .form(&[("user_code", user_code.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(approved.status(), 200);
        let status = wait_for_text_containing(&browser, &device_page, "#device-status", "Connected").await;
        assert!(status.contains("valid, expires in"), "{status}");
        world.assert_no_secrets(&browser.source().await.unwrap());
        browser.goto(&gateway.url("/accounts")).await.unwrap();
        let state = text(&browser, "#account-scans td.token-state").await;
        assert!(state.contains("valid until") && !state.contains("needs sign-in"), "{state}");
        assert!(world.idp.grants().contains(&"urn:ietf:params:oauth:grant-type:device_code".to_string()));
        let listing = curl_pop3_blocking(gateway, "scanner-1", SCANNER_PASSWORD)
            .await
            .unwrap_or_else(|e| panic!("the device's POP3 login after the device-code sign-in: {e}"));
        assert_eq!(listing.lines().count(), 1, "{listing}");
    };
    let outcome = tokio::time::timeout(SCENARIO_LIMIT, scenario).await;
    let _ = browser.close().await;
    outcome.expect("the browser scenario finished in time");
}

/// Signs in over HTTP; the session cookie and a CSRF token.
async fn http_sign_in(http: &reqwest::Client, gateway: &AdminGateway) -> (String, String) {
    let form = http.get(gateway.url("/login")).send().await.unwrap();
    let cookie = session_cookie(&form);
    let csrf = csrf_in(&form.text().await.unwrap());
    let signed_in = http
        .post(gateway.url("/login"))
        .header("cookie", &cookie)
        .form(&[("password", ADMIN_PASSWORD), ("csrf", &csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(signed_in.status(), 303);
    let cookie = session_cookie(&signed_in);
    let page = http.get(gateway.url("/accounts")).header("cookie", &cookie).send().await.unwrap();
    (cookie, csrf_in(&page.text().await.unwrap()))
}

#[tokio::test]
async fn a_callback_with_a_wrong_or_replayed_state_or_from_another_browser_is_refused() {
    let world = OAuthWorld::start();
    let http = http();
    let gateway = &world.gateway;
    let (cookie, csrf) = http_sign_in(&http, gateway).await;

    // The stand-in asks for consent: "Allow" is posted as its page would.
    let decide = |authorize_location: String| async move {
        let url = url::Url::parse(&authorize_location).unwrap();
        let mut form: Vec<(String, String)> = url.query_pairs().into_owned().collect();
        form.push(("decision".into(), "allow".into()));
        let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
        let answer = client
            .post(format!("{}/authorize/decide", url.origin().ascii_serialization()))
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 302);
        answer.headers().get("location").unwrap().to_str().unwrap().to_string()
    };
    let start = |cookie: String, csrf: String| {
        let http = http.clone();
        async move {
            let started = http
                .post(gateway.url("/accounts/connect"))
                .header("cookie", &cookie)
                .form(&[("csrf", csrf.as_str()), ("account", "scans"), ("method", "code")])
                .send()
                .await
                .unwrap();
            assert_eq!(started.status(), 303);
            let authorize = started.headers().get("location").unwrap().to_str().unwrap().to_string();
            let flow = started
                .headers()
                .get_all(reqwest::header::SET_COOKIE)
                .iter()
                .map(|v| v.to_str().unwrap().to_string())
                .find(|c| c.starts_with("popgate_oauth_flow="))
                .expect("the flow cookie");
            assert!(flow.contains("SameSite=Lax") && flow.contains("HttpOnly"), "{flow}");
            let redirect: String = url::Url::parse(&authorize)
                .unwrap()
                .query_pairs()
                .find(|(k, _)| k == "redirect_uri")
                .unwrap()
                .1
                .into_owned();
            assert_eq!(redirect, gateway.url("/oauth/callback"));
            (authorize, flow.split(';').next().unwrap().to_string())
        }
    };
    let both = |a: &str, b: &str| format!("{a}; {b}");

    // A wrong state: refused, nothing stored.
    let (authorize, flow) = start(cookie.clone(), csrf.clone()).await;
    let callback = decide(authorize).await;
    let mut wrong = url::Url::parse(&callback).unwrap();
    let pairs: Vec<(String, String)> = wrong.query_pairs().into_owned().collect();
    wrong.query_pairs_mut().clear();
    for (k, v) in &pairs {
        wrong.query_pairs_mut().append_pair(k, if k == "state" { "forged-state" } else { v });
    }
    let refused = http.get(wrong.as_str()).header("cookie", both(&cookie, &flow)).send().await.unwrap();
    assert_eq!(refused.status(), 400);
    assert!(refused.text().await.unwrap().contains("unknown, was used already or has expired"));

    // The right state: connected; the same callback again: refused.
    let done = http.get(&callback).header("cookie", both(&cookie, &flow)).send().await.unwrap();
    assert_eq!(done.status(), 200);
    let page = done.text().await.unwrap();
    assert!(page.contains("id=\"connected\""), "{page}");
    world.assert_no_secrets(&page);
    let replayed = http.get(&callback).header("cookie", both(&cookie, &flow)).send().await.unwrap();
    assert_eq!(replayed.status(), 400, "a state works once");
    assert_eq!(world.idp.grants(), ["authorization_code"], "the replayed code never reached the provider");

    // A callback brought by another browser (no or another flow cookie):
    // refused, and the sign-in is spent.
    let (authorize, _flow) = start(cookie.clone(), csrf.clone()).await;
    let callback = decide(authorize).await;
    let foreign = http.get(&callback).header("cookie", "popgate_oauth_flow=someone-elses").send().await.unwrap();
    assert_eq!(foreign.status(), 403);
    assert_eq!(world.idp.grants(), ["authorization_code"], "no exchange for a foreign callback");

    // Starting a sign-in needs the CSRF token.
    let no_csrf = http
        .post(gateway.url("/accounts/connect"))
        .header("cookie", &cookie)
        .form(&[("account", "scans"), ("method", "code")])
        .send()
        .await
        .unwrap();
    assert_eq!(no_csrf.status(), 403);
}
