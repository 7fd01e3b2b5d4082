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

use fantoccini::{Client, ClientBuilder, Locator};
use popgate::auth::accounts::reloadable::ReloadableRouter;
use popgate::auth::accounts::router::AccountRouter;
use popgate::auth::passwords::hash_password;
use popgate::backend::select::BackendConfig;
use popgate::config::Config;
use popgate::server::Server;
use popgate::server::admin::AdminServer;
use popgate::server::admin::guard::Guard;
use popgate::server::admin::page::{LiveFleet, Page};
use popgate::telemetry::Metrics;
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
