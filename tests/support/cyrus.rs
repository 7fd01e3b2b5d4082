//! A private Cyrus IMAP 3.6 with its JMAP module, for the JMAP backend's
//! tests: its own directory, its own ports chosen at run time, users in its
//! own sasldb, killed with every process it started on drop.
//!
//! It seeds mail (`append`: JMAP upload + `Email/import`, the exact octets)
//! and looks at what an account holds (`emails`, `ids_in`) as another
//! client would, with its own small HTTP/1.0 client — never through
//! popgate's code, so the tests do not share its bugs.
//!
//! master runs in the foreground (no `-d`) as our child, in its own process
//! group: an early exit (a bad config exits 78, silently) is seen at once,
//! it is reaped when stopped (a daemonized master is re-parented to a PID 1
//! that may never reap it), and the group reaches every service it forked.
//!
//! Self-contained (nothing from `super`): a test crate may include it with
//! `#[path]` or through `support`. `cyrus_imap` (Cyrus's imapd and pop3d)
//! shares its helpers. It never touches the system Cyrus
//! (/etc/imapd.conf, /var/lib/cyrus) and never skips: without the packages
//! (scripts/install-cyrus) it fails loudly. It must run as root: master
//! switches to the `cyrus` user, which must own the directory.

#![allow(dead_code)] // each test crate uses a different part of the harness

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

/// Where Debian's cyrus-common puts master, httpd, lmtpd and the tools.
pub const CYRUS_BIN: &str = "/usr/lib/cyrus/bin";
/// The longest any start, request or wait here may take.
const TIMEOUT: Duration = Duration::from_secs(20);
/// Cyrus's `servername`, which is also the SASL realm users are created in
/// (Cyrus looks users up as user@servername in the sasldb).
pub const SERVERNAME: &str = "localhost";
const USING: [&str; 2] = ["urn:ietf:params:jmap:core", "urn:ietf:params:jmap:mail"];

/// An Email as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEmail {
    pub id: String,
    pub blob_id: String,
    pub size: u64,
    /// The names of the mailboxes it is in ("Inbox", "Trash"), sorted.
    pub mailboxes: Vec<String>,
}

pub struct Cyrus {
    dir: tempfile::TempDir,
    master: Option<Child>,
    pub http: SocketAddr,
    pub lmtp: SocketAddr,
    passwords: Mutex<HashMap<String, String>>,
    /// Seconds after the base time for the next appended message: distinct,
    /// increasing `receivedAt`s keep the maildrop in append order.
    next_received: AtomicU64,
}

impl Cyrus {
    /// Starts a Cyrus on 127.0.0.1 and returns once HTTP and LMTP answer.
    pub fn start() -> Cyrus {
        Cyrus::start_with("")
    }

    /// Like `start`, with more imapd.conf lines (e.g. smaller JMAP limits:
    /// `jmap_max_objects_in_get: 2`). A key already set here is fatal.
    pub fn start_with(extra_imapd_conf: &str) -> Cyrus {
        let master_bin = Path::new(CYRUS_BIN).join("master");
        assert!(
            master_bin.is_file() && Path::new("/usr/sbin/saslpasswd2").is_file(),
            "Cyrus is not installed: run scripts/install-cyrus (as root)"
        );
        let mut dir = tempfile::Builder::new().prefix("popgate-cyrus-").tempdir().expect("tempdir");
        for sub in ["conf", "spool", "sock", "run/proc", "run/lock"] {
            fs::create_dir_all(dir.path().join(sub)).expect("create Cyrus directories");
        }
        let mut last_failure = String::new();
        for _attempt in 0..5 {
            let (http, lmtp) = two_free_ports();
            write_config(dir.path(), http, lmtp, extra_imapd_conf);
            lint(dir.path());
            chown_to_cyrus(dir.path());
            let child = spawn_master(dir.path());
            let mut cyrus = Cyrus {
                dir,
                master: Some(child),
                http,
                lmtp,
                passwords: Mutex::new(HashMap::new()),
                next_received: AtomicU64::new(0),
            };
            match cyrus.wait_until_ready() {
                Ok(()) => return cyrus,
                Err(why) => {
                    // Most likely another test took a port between our
                    // probe and master's bind: try other ports.
                    last_failure = why;
                    cyrus.stop();
                    dir = std::mem::replace(&mut cyrus.dir, tempfile::tempdir().expect("tempdir"));
                }
            }
        }
        panic!("Cyrus did not start after 5 attempts: {last_failure}");
    }

    /// Starts master again after `stop`, on the same directory and ports:
    /// the accounts and their mail are as they were.
    pub fn restart(&mut self) {
        self.stop();
        self.master = Some(spawn_master(self.dir.path()));
        if let Err(why) = self.wait_until_ready() {
            self.stop();
            panic!("Cyrus did not restart: {why}");
        }
    }

    fn wait_until_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + TIMEOUT;
        let expected_location = format!("http://{}/jmap", self.http);
        loop {
            if let Some(status) = self.master.as_mut().expect("running").try_wait().expect("try_wait") {
                return Err(format!("master exited ({status}); Cyrus logs to syslog only:\n{}", self.log()));
            }
            if Instant::now() > deadline {
                return Err(format!("no answer on {} and {} within {TIMEOUT:?}", self.http, self.lmtp));
            }
            if let Ok(response) = http_request(self.http, "GET", "/.well-known/jmap", None, None, b"") {
                let location = response.header("location").unwrap_or_default();
                if response.status != 301 || location != expected_location {
                    return Err(format!(
                        "{} is not our Cyrus: HTTP {} Location {location:?}",
                        self.http, response.status
                    ));
                }
                match lmtp_greeting(self.lmtp) {
                    Ok(greeting) if greeting.contains("LMTP") => return Ok(()),
                    Ok(greeting) => return Err(format!("{} is not our Cyrus: {greeting:?}", self.lmtp)),
                    Err(_) => {}
                }
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// `jmap+http://127.0.0.1:PORT`: the server base, so popgate finds the
    /// session through `/.well-known/jmap` and its redirect.
    pub fn backend_url(&self) -> String {
        format!("jmap+http://{}", self.http)
    }

    /// The session resource itself.
    pub fn session_url(&self) -> String {
        format!("http://{}/jmap", self.http)
    }

    /// master's pid, which is also its process group.
    pub fn master_pid(&self) -> Option<u32> {
        self.master.as_ref().map(Child::id)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What master wrote (Cyrus logs to syslog: usually nothing here).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("master.log")).unwrap_or_default()
    }

    /// Creates a user with an INBOX and a Trash (role `trash`).
    pub fn add_user(&self, user: &str, password: &str) {
        self.saslpasswd2(user, password, true);
        // A JMAP login does not create the account; a delivery attempt does
        // (autocreate_post), together with autocreate_inbox_folders.
        create_inbox(self.lmtp, user).unwrap_or_else(|e| panic!("creating {user}'s INBOX over LMTP: {e}"));
        self.passwords.lock().unwrap().insert(user.to_string(), password.to_string());
    }

    /// Changes a user's password (the harness's own requests use the new one).
    pub fn set_password(&self, user: &str, password: &str) {
        self.saslpasswd2(user, password, false);
        self.passwords.lock().unwrap().insert(user.to_string(), password.to_string());
    }

    fn saslpasswd2(&self, user: &str, password: &str, create: bool) {
        saslpasswd2(self.dir.path(), user, password, create);
    }

    fn password(&self, user: &str) -> String {
        self.passwords.lock().unwrap().get(user).cloned().unwrap_or_else(|| panic!("no user {user} (add_user first)"))
    }

    /// One JMAP API request as `user`; returns `methodResponses`. Panics on
    /// an HTTP failure or a method-level error.
    pub fn jmap(&self, user: &str, calls: Value) -> Vec<Value> {
        let body = serde_json::to_vec(&json!({ "using": USING, "methodCalls": calls })).expect("JSON");
        let password = self.password(user);
        let response =
            http_request(self.http, "POST", "/jmap/", Some((user, &password)), Some("application/json"), &body)
                .unwrap_or_else(|e| panic!("JMAP request to {}: {e}", self.http));
        assert_eq!(response.status, 200, "JMAP request: {}", String::from_utf8_lossy(&response.body));
        let value: Value = serde_json::from_slice(&response.body).expect("JMAP response is JSON");
        let responses = value["methodResponses"].as_array().expect("methodResponses").clone();
        for r in &responses {
            assert_ne!(r[0], "error", "JMAP method error: {r}");
        }
        responses
    }

    /// A mailbox's id, by name.
    pub fn mailbox_id(&self, user: &str, name: &str) -> String {
        self.mailboxes(user)
            .into_iter()
            .find(|(_, n)| n == name)
            .map(|(id, _)| id)
            .unwrap_or_else(|| panic!("{user} has no mailbox {name}"))
    }

    /// Every mailbox of `user` as (id, name).
    pub fn mailboxes(&self, user: &str) -> Vec<(String, String)> {
        let responses = self.jmap(user, json!([["Mailbox/get", { "accountId": user, "ids": null }, "m"]]));
        responses[0][1]["list"]
            .as_array()
            .expect("list")
            .iter()
            .map(|m| (m["id"].as_str().expect("id").to_string(), m["name"].as_str().expect("name").to_string()))
            .collect()
    }

    /// Creates a top-level mailbox; returns its id.
    pub fn create_mailbox(&self, user: &str, name: &str) -> String {
        let responses =
            self.jmap(user, json!([["Mailbox/set", { "accountId": user, "create": { "n": { "name": name } } }, "c"]]));
        responses[0][1]["created"]["n"]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("creating mailbox {name}: {}", responses[0]))
            .to_string()
    }

    /// Puts exactly these octets in the user's Inbox; returns the Email id.
    /// Cyrus refuses bare LF, and gives identical content the same id: make
    /// every message of a test unique.
    pub fn append(&self, user: &str, raw: &[u8]) -> String {
        self.append_to(user, "Inbox", raw)
    }

    pub fn append_to(&self, user: &str, mailbox: &str, raw: &[u8]) -> String {
        self.try_append_to(user, mailbox, raw).unwrap_or_else(|e| panic!("appending to {user}/{mailbox}: {e}"))
    }

    /// Like `append_to`, but a refusal (e.g. `invalidEmail`) is returned.
    pub fn try_append_to(&self, user: &str, mailbox: &str, raw: &[u8]) -> Result<String, String> {
        let password = self.password(user);
        let upload = http_request(
            self.http,
            "POST",
            &format!("/jmap/upload/{user}/"),
            Some((user, &password)),
            Some("message/rfc822"),
            raw,
        )
        .map_err(|e| format!("upload: {e}"))?;
        if upload.status != 201 && upload.status != 200 {
            return Err(format!("upload: HTTP {} {}", upload.status, String::from_utf8_lossy(&upload.body)));
        }
        let blob: Value = serde_json::from_slice(&upload.body).map_err(|e| format!("upload reply: {e}"))?;
        let blob_id = blob["blobId"].as_str().ok_or("upload reply without blobId")?;
        let mailbox_id = self.mailbox_id(user, mailbox);
        let received = self.next_received.fetch_add(1, Ordering::Relaxed);
        let responses = self.jmap(
            user,
            json!([["Email/import", {
                "accountId": user,
                "emails": { "e": { "blobId": blob_id, "mailboxIds": { mailbox_id: true },
                                   "receivedAt": received_at(received) } }
            }, "i"]]),
        );
        let reply = &responses[0][1];
        match reply["created"]["e"]["id"].as_str() {
            Some(id) => Ok(id.to_string()),
            None => Err(format!("Email/import refused: {}", reply["notCreated"]["e"])),
        }
    }

    /// Every Email of the account, oldest first.
    pub fn emails(&self, user: &str) -> Vec<StoredEmail> {
        let names: HashMap<String, String> = self.mailboxes(user).into_iter().collect();
        let query = json!([["Email/query", { "accountId": user,
            "sort": [{ "property": "receivedAt", "isAscending": true }] }, "q"]]);
        let ids: Vec<String> = serde_json::from_value(self.jmap(user, query)[0][1]["ids"].clone()).expect("ids");
        let mut emails = Vec::with_capacity(ids.len());
        // Gets within the server's maxObjectsInGet (tests may lower it).
        for chunk in ids.chunks(self.max_objects_in_get(user)) {
            let get = json!([["Email/get", { "accountId": user, "ids": chunk,
                "properties": ["id", "blobId", "size", "mailboxIds"] }, "g"]]);
            let responses = self.jmap(user, get);
            let mut by_id: HashMap<String, StoredEmail> = responses[0][1]["list"]
                .as_array()
                .expect("list")
                .iter()
                .map(|e| {
                    let mut mailboxes: Vec<String> = e["mailboxIds"]
                        .as_object()
                        .expect("mailboxIds")
                        .keys()
                        .map(|id| names.get(id).cloned().unwrap_or_else(|| id.clone()))
                        .collect();
                    mailboxes.sort();
                    let email = StoredEmail {
                        id: e["id"].as_str().expect("id").to_string(),
                        blob_id: e["blobId"].as_str().expect("blobId").to_string(),
                        size: e["size"].as_u64().expect("size"),
                        mailboxes,
                    };
                    (email.id.clone(), email)
                })
                .collect();
            emails.extend(chunk.iter().filter_map(|id| by_id.remove(id)));
        }
        emails
    }

    /// `maxObjectsInGet` from the session resource.
    fn max_objects_in_get(&self, user: &str) -> usize {
        let password = self.password(user);
        let response = http_request(self.http, "GET", "/jmap", Some((user, &password)), None, b"")
            .unwrap_or_else(|e| panic!("session: {e}"));
        assert_eq!(response.status, 200, "session: {}", String::from_utf8_lossy(&response.body));
        let session: Value = serde_json::from_slice(&response.body).expect("session JSON");
        session["capabilities"]["urn:ietf:params:jmap:core"]["maxObjectsInGet"].as_u64().expect("maxObjectsInGet")
            as usize
    }

    /// Destroys Emails, as another client would.
    pub fn destroy_emails(&self, user: &str, ids: &[String]) {
        let responses = self.jmap(user, json!([["Email/set", { "accountId": user, "destroy": ids }, "d"]]));
        assert_eq!(responses[0][1]["destroyed"].as_array().map(Vec::len), Some(ids.len()), "{}", responses[0]);
    }

    /// Destroys an (empty) mailbox, as another client would.
    pub fn destroy_mailbox(&self, user: &str, name: &str) {
        let id = self.mailbox_id(user, name);
        let responses = self.jmap(user, json!([["Mailbox/set", { "accountId": user, "destroy": [id] }, "d"]]));
        assert_eq!(responses[0][1]["destroyed"].as_array().map(Vec::len), Some(1), "{}", responses[0]);
    }

    /// The ids of the Emails in a mailbox (by name), oldest first.
    pub fn ids_in(&self, user: &str, mailbox: &str) -> Vec<String> {
        self.emails(user).into_iter().filter(|e| e.mailboxes.iter().any(|m| m == mailbox)).map(|e| e.id).collect()
    }

    /// A blob's octets, downloaded directly.
    pub fn download(&self, user: &str, blob_id: &str) -> Vec<u8> {
        let password = self.password(user);
        let path = format!("/jmap/download/{user}/{blob_id}/m.eml?accept=application%2Foctet-stream");
        let response = http_request(self.http, "GET", &path, Some((user, &password)), None, b"")
            .unwrap_or_else(|e| panic!("download: {e}"));
        assert_eq!(response.status, 200, "download {blob_id}");
        response.body
    }

    /// Ends master and everything it started, and reaps master.
    pub fn stop(&mut self) {
        stop_master(self.master.take());
    }
}

impl Drop for Cyrus {
    fn drop(&mut self) {
        self.stop();
    }
}

fn write_config(dir: &Path, http: SocketAddr, lmtp: SocketAddr, extra: &str) {
    let d = dir.display();
    // No key twice: Cyrus treats a duplicate key as fatal.
    let imapd = format!(
        "configdirectory: {d}/conf\n\
         partition-default: {d}/spool\n\
         proc_path: {d}/run/proc\n\
         mboxname_lockpath: {d}/run/lock\n\
         lmtpsocket: {d}/sock/lmtp\n\
         idlesocket: {d}/sock/idle\n\
         notifysocket: {d}/sock/notify\n\
         sasl_sasldb_path: {d}/sasldb2\n\
         sasl_pwcheck_method: auxprop\n\
         sasl_auxprop_plugin: sasldb\n\
         sasl_mech_list: PLAIN\n\
         servername: {SERVERNAME}\n\
         allowplaintext: yes\n\
         httpmodules: jmap\n\
         conversations: 1\n\
         conversations_db: twoskip\n\
         autocreate_post: 1\n\
         autocreate_quota: 0\n\
         autocreate_inbox_folders: Trash\n\
         xlist-trash: Trash\n\
         syslog_prefix: popgate-test-cyrus\n\
         {extra}\n"
    );
    fs::write(dir.join("imapd.conf"), imapd).expect("write imapd.conf");
    // master passes no -C to what it starts: every command names the file.
    let conf = dir.join("imapd.conf");
    let c = conf.display();
    let cyrus = format!(
        "START {{\n  recover cmd=\"ctl_cyrusdb -C {c} -r\"\n}}\n\
         SERVICES {{\n  http cmd=\"httpd -C {c}\" listen=\"{http}\" prefork=0\n  \
         lmtp cmd=\"lmtpd -C {c} -a\" listen=\"{lmtp}\" prefork=0\n}}\n\
         EVENTS {{\n  checkpoint cmd=\"ctl_cyrusdb -C {c} -c\" period=30\n}}\n"
    );
    fs::write(dir.join("cyrus.conf"), cyrus).expect("write cyrus.conf");
}

/// master in the foreground on the configuration in `dir`, logging to
/// `dir/master.log` (appended to, so a restart keeps what came before).
pub fn spawn_master(dir: &Path) -> Child {
    let log = fs::OpenOptions::new().create(true).append(true).open(dir.join("master.log")).expect("log file");
    Command::new(Path::new(CYRUS_BIN).join("master"))
        .arg("-C")
        .arg(dir.join("imapd.conf"))
        .arg("-M")
        .arg(dir.join("cyrus.conf"))
        .arg("-p")
        .arg(dir.join("master.pid"))
        // Its own process group, so that stopping it can reach every service
        // process it forked, whatever master does.
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup"))
        .stderr(log)
        .spawn()
        .expect("run Cyrus master")
}

/// Ends a master started by `spawn_master` and everything it started, and
/// reaps it.
pub fn stop_master(master: Option<Child>) {
    let Some(mut master) = master else { return };
    let pid = master.id() as i32;
    // SIGTERM first: master then ends its services itself.
    signal(pid, SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = master.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Whatever is left in its process group (a stuck httpd or imapd serving
    // a client, or master itself) is ours alone: kill it.
    signal(-pid, SIGKILL);
    let _ = master.kill();
    let _ = master.wait();
}

/// Creates (`create`) or changes a user in the sasldb of the Cyrus in
/// `dir`, in the realm `SERVERNAME`.
pub fn saslpasswd2(dir: &Path, user: &str, password: &str, create: bool) {
    let sasldb = dir.join("sasldb2");
    let mut child = Command::new("/usr/sbin/saslpasswd2")
        .arg("-f")
        .arg(&sasldb)
        .args(["-p", "-u", SERVERNAME])
        .args(create.then_some("-c"))
        .arg(user)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run saslpasswd2");
    child.stdin.take().expect("stdin").write_all(password.as_bytes()).expect("password to saslpasswd2");
    let output = child.wait_with_output().expect("saslpasswd2");
    assert!(output.status.success(), "saslpasswd2 {user}: {}", String::from_utf8_lossy(&output.stderr));
    chown_to_cyrus(&sasldb);
}

/// A bad imapd.conf makes master exit 78 with nothing said: check it first.
pub fn lint(dir: &Path) {
    let output = Command::new(Path::new(CYRUS_BIN).join("cyr_info"))
        .arg("-C")
        .arg(dir.join("imapd.conf"))
        .arg("conf-lint")
        .output()
        .expect("run cyr_info");
    let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success() && said.trim().is_empty(), "cyr_info conf-lint: {said}");
}

pub fn two_free_ports() -> (SocketAddr, SocketAddr) {
    // Both bound at once, so they differ.
    let a = TcpListener::bind("127.0.0.1:0").expect("bind");
    let b = TcpListener::bind("127.0.0.1:0").expect("bind");
    (a.local_addr().expect("addr"), b.local_addr().expect("addr"))
}

/// The `cyrus` user's uid and gid, from /etc/passwd.
pub fn cyrus_ids() -> (u32, u32) {
    let passwd = fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            match fields.as_slice() {
                ["cyrus", _, uid, gid, ..] => Some((uid.parse().ok()?, gid.parse().ok()?)),
                _ => None,
            }
        })
        .expect("no `cyrus` user: run scripts/install-cyrus")
}

pub fn chown_to_cyrus(path: &Path) {
    let (uid, gid) = cyrus_ids();
    let mut pending: Vec<PathBuf> = vec![path.to_path_buf()];
    while let Some(path) = pending.pop() {
        std::os::unix::fs::chown(&path, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {} to cyrus (are the tests running as root?): {e}", path.display()));
        if path.is_dir() {
            for entry in fs::read_dir(&path).expect("read_dir") {
                pending.push(entry.expect("entry").path());
            }
        }
    }
}

/// An increasing RFC 3339 time: base + `n` seconds (within January 2020).
fn received_at(n: u64) -> String {
    assert!(n < 30 * 86_400, "too many messages for one Cyrus");
    let (day, rest) = (n / 86_400, n % 86_400);
    format!("2020-01-{:02}T{:02}:{:02}:{:02}Z", day + 1, rest / 3600, rest % 3600 / 60, rest % 60)
}

pub const SIGKILL: i32 = 9;
pub const SIGTERM: i32 = 15;

/// kill(2): a pid, or a process group as `-pgid`.
pub fn signal(pid: i32, signal: i32) -> bool {
    unsafe extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe { kill(pid, signal) == 0 }
}

fn lmtp_connect(addr: SocketAddr) -> std::io::Result<BufReader<TcpStream>> {
    let stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    Ok(BufReader::new(stream))
}

/// One SMTP-style reply (multi-line `250-…` joined); errors on a timeout.
fn lmtp_reply(reader: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    let mut reply = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "LMTP server closed"));
        }
        reply.push_str(&line);
        if line.len() < 4 || line.as_bytes()[3] != b'-' {
            return Ok(reply);
        }
    }
}

fn lmtp_greeting(addr: SocketAddr) -> std::io::Result<String> {
    let mut reader = lmtp_connect(addr)?;
    let greeting = lmtp_reply(&mut reader)?;
    let _ = reader.get_mut().write_all(b"QUIT\r\n");
    Ok(greeting)
}

/// `RCPT TO:<user>` creates the INBOX (autocreate_post); RSET delivers
/// nothing.
fn create_inbox(addr: SocketAddr, user: &str) -> Result<(), String> {
    let mut reader = lmtp_connect(addr).map_err(|e| e.to_string())?;
    let mut exchange = |command: &str, expect: &str| -> Result<(), String> {
        if !command.is_empty() {
            reader.get_mut().write_all(format!("{command}\r\n").as_bytes()).map_err(|e| e.to_string())?;
        }
        let reply = lmtp_reply(&mut reader).map_err(|e| format!("{command}: {e}"))?;
        if reply.starts_with(expect) { Ok(()) } else { Err(format!("{command:?} → {reply:?}")) }
    };
    exchange("", "220")?;
    exchange("LHLO localhost", "250")?;
    exchange("MAIL FROM:<>", "250")?;
    exchange(&format!("RCPT TO:<{user}>"), "250")?;
    exchange("RSET", "250")?;
    exchange("QUIT", "221")
}

pub struct HttpResponse {
    pub status: u16,
    headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone())
    }
}

/// A minimal HTTP/1.0 exchange (one request per connection, the body read
/// to the end), with `TIMEOUT` on every read and write.
fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    auth: Option<(&str, &str)>,
    content_type: Option<&str>,
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    let mut head = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n", body.len());
    if let Some((user, password)) = auth {
        head.push_str(&format!("Authorization: Basic {}\r\n", STANDARD.encode(format!("{user}:{password}"))));
    }
    if let Some(content_type) = content_type {
        head.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let invalid = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string());
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| invalid("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid("bad status line"))?;
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(n, v)| (n.trim().to_string(), v.trim().to_string())).collect();
    let mut response = HttpResponse { status, headers, body: raw[split + 4..].to_vec() };
    if response.header("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        response.body = dechunk(&response.body).ok_or_else(|| invalid("bad chunked body"))?;
    }
    Ok(response)
}

fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let end = raw.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&raw[..end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        raw = &raw[end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(raw.get(..size)?);
        raw = raw.get(size + 2..)?;
    }
}
