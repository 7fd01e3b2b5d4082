//! A private Dovecot per test: its own directory, config, users, maildirs,
//! log, and IMAP + POP3 ports on 127.0.0.1 chosen at run time.
//!
//! Dropping it (or `stop`) kills the master and every process it started:
//! SIGTERM to the master leaves running imap processes serving their
//! clients, which would keep a "dead" backend alive in a fault test.
//!
//! With `Dovecot::start_oauth` its users log in with a password or with an
//! OAuth bearer token that Dovecot's oauth2 passdb checks against the
//! stand-in authorization server's introspection endpoint — so a test
//! proves a token really reached and satisfied an IMAP server. Passdbs:
//! passwd-file first (passwords), then oauth2 (`introspection_mode =
//! post`). The auth penalty for failed logins is then switched off (the
//! auth process cannot reach anvil's penalty socket), so a test of refused
//! tokens is not slowed by seconds per attempt.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::imap::{Imap, Stored};
use super::pop3::Pop3;
use super::{IO_TIMEOUT, Signal, free_port, require_program, send_signal};

/// Debian's `mail` user and group: mail is stored as them.
const MAIL_UID: u32 = 8;
const MAIL_GID: u32 = 8;

/// Users every `Dovecot::start()` has.
pub const ALICE: (&str, &str) = ("alice", "alice-secret");
pub const BOB: (&str, &str) = ("bob", "bob-secret");
/// A password with double quotes, backslashes and spaces: every way to get
/// IMAP quoting wrong (`:` cannot appear in a passwd-file field).
pub const CAROL: (&str, &str) = ("carol", r#"p"a\ss w\\o"rd \"#);
pub const DAVE: (&str, &str) = ("dave", "dave-secret");

pub struct Dovecot {
    dir: tempfile::TempDir,
    master: Option<Child>,
    pub imap_port: u16,
    pub pop3_port: u16,
    users: HashMap<String, String>,
    /// The greeting of this instance, to be sure a port is really ours.
    token: String,
    oauth: Option<OAuth>,
    /// Dovecot's `mail_max_userip_connections`.
    max_userip_connections: u32,
}

/// Bearer tokens checked by Dovecot's oauth2 passdb.
struct OAuth {
    /// The RFC 7662 introspection endpoint.
    introspection_url: String,
    /// Dovecot's `auth_mechanisms`, e.g. "plain login xoauth2 oauthbearer".
    mechanisms: String,
}

impl Dovecot {
    /// Starts a Dovecot with the users ALICE, BOB, CAROL and DAVE.
    pub fn start() -> Dovecot {
        Dovecot::start_with_users(&[ALICE, BOB, CAROL, DAVE])
    }

    pub fn start_with_users(users: &[(&str, &str)]) -> Dovecot {
        Dovecot::start_with(users, None)
    }

    /// A Dovecot whose users may also log in with bearer tokens that the
    /// authorization server at `introspection_url` vouches for, offering
    /// `mechanisms` (Dovecot's `auth_mechanisms`, e.g.
    /// "plain login xoauth2 oauthbearer").
    pub fn start_oauth(introspection_url: &str, users: &[(&str, &str)], mechanisms: &str) -> Dovecot {
        let oauth = OAuth { introspection_url: introspection_url.to_string(), mechanisms: mechanisms.to_string() };
        Dovecot::start_with(users, Some(oauth))
    }

    /// A Dovecot allowing each user at most `limit` IMAP connections from
    /// one address (`mail_max_userip_connections`; Dovecot's default is 10).
    pub fn start_with_userip_limit(users: &[(&str, &str)], limit: u32) -> Dovecot {
        Dovecot::start_configured(users, None, limit)
    }

    fn start_with(users: &[(&str, &str)], oauth: Option<OAuth>) -> Dovecot {
        Dovecot::start_configured(users, oauth, 1000)
    }

    fn start_configured(users: &[(&str, &str)], oauth: Option<OAuth>, max_userip_connections: u32) -> Dovecot {
        let binary = require_program("dovecot");
        let dir = tempfile::Builder::new().prefix("popgate-dovecot-").tempdir().expect("tempdir");
        // The auth process (user dovecot) and mail processes (uid 8) must
        // reach files inside.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        for sub in ["run", "state", "home"] {
            fs::create_dir(dir.path().join(sub)).expect("mkdir");
        }
        std::os::unix::fs::chown(dir.path().join("home"), Some(MAIL_UID), Some(MAIL_GID)).expect("chown home");
        let token = format!(
            "popgate-test-{}-{}",
            std::process::id(),
            dir.path().file_name().unwrap().to_string_lossy().rsplit('-').next().unwrap()
        );
        let mut dovecot = Dovecot {
            dir,
            master: None,
            imap_port: 0,
            pop3_port: 0,
            users: users.iter().map(|(u, p)| (u.to_string(), p.to_string())).collect(),
            token,
            oauth,
            max_userip_connections,
        };
        dovecot.write_passwd();
        dovecot.write_oauth2_conf();
        dovecot.launch(&binary);
        dovecot
    }

    pub fn imap_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.imap_port))
    }

    pub fn pop3_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.pop3_port))
    }

    /// The popgate backend URL of this Dovecot's IMAP service.
    pub fn imap_url(&self) -> String {
        format!("imap://127.0.0.1:{}", self.imap_port)
    }

    pub fn password(&self, user: &str) -> &str {
        self.users.get(user).unwrap_or_else(|| panic!("no Dovecot user {user}"))
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// An IMAP session of `user` with INBOX selected.
    pub fn imap(&self, user: &str) -> Imap {
        let mut imap = Imap::login(self.imap_addr(), user, self.password(user));
        imap.select("INBOX");
        imap
    }

    /// Appends messages to `user`'s INBOX; returns their UIDs.
    pub fn append_all<M: AsRef<[u8]>>(&self, user: &str, messages: &[M]) -> Vec<u32> {
        let mut imap = self.imap(user);
        let uids = messages.iter().map(|m| imap.append("INBOX", "", m.as_ref())).collect();
        imap.logout();
        uids
    }

    pub fn append(&self, user: &str, message: &[u8]) -> u32 {
        self.append_all(user, &[message])[0]
    }

    /// What `user`'s INBOX holds now (UIDs and flags).
    pub fn messages(&self, user: &str) -> Vec<Stored> {
        let mut imap = self.imap(user);
        let messages = imap.messages();
        imap.logout();
        messages
    }

    pub fn uids(&self, user: &str) -> Vec<u32> {
        self.messages(user).iter().map(|m| m.uid).collect()
    }

    pub fn uidvalidity(&self, user: &str) -> u32 {
        let mut imap = Imap::login(self.imap_addr(), user, self.password(user));
        let uidvalidity = imap.select("INBOX");
        imap.logout();
        uidvalidity
    }

    /// As another IMAP client: flag a message \Deleted and log out without
    /// expunging.
    pub fn flag_deleted(&self, user: &str, uid: u32) {
        let mut imap = self.imap(user);
        imap.flag_deleted(uid);
        imap.logout();
    }

    /// The message's stored octets as Dovecot's IMAP gives them.
    pub fn fetch(&self, user: &str, uid: u32) -> Vec<u8> {
        let mut imap = self.imap(user);
        let content = imap.fetch(uid);
        imap.logout();
        content
    }

    /// UIDL as Dovecot's own POP3 server lists it (the reference for
    /// popgate's unique ids).
    pub fn pop3_uidl(&self, user: &str) -> Vec<(u32, String)> {
        let mut pop3 = Pop3::login(self.pop3_addr(), user, self.password(user));
        let uidl = pop3.uidl();
        pop3.quit();
        uidl
    }

    /// Dovecot's log so far.
    pub fn log(&self) -> String {
        let mut log = fs::read_to_string(self.dir.path().join("dovecot.log")).unwrap_or_default();
        if let Ok(out) = fs::read_to_string(self.dir.path().join("master.out")) {
            log.push_str(&out);
        }
        log
    }

    /// Successful IMAP logins of `user` with `method` (e.g. "XOAUTH2") so far.
    pub fn logins(&self, user: &str, method: &str) -> usize {
        let needle = format!("Login: user=<{user}>, method={method},");
        self.log().matches(&needle).count()
    }

    /// Takes the server down hard: the master and every process it started.
    /// Connections popgate holds to it are reset.
    pub fn stop(&mut self) {
        if let Some(master) = self.master.take() {
            kill_tree(master);
        }
    }

    /// Starts it again on the same mail (ports may change).
    pub fn restart(&mut self) {
        self.stop();
        self.launch(&require_program("dovecot"));
    }

    fn write_passwd(&self) {
        let mut passwd = String::new();
        for (user, password) in &self.users {
            assert!(!password.contains([':', '\n', '\0']), "passwd-file cannot hold {password:?}");
            let home = self.dir.path().join("home").join(user);
            if !home.exists() {
                fs::create_dir(&home).expect("mkdir home");
                std::os::unix::fs::chown(&home, Some(MAIL_UID), Some(MAIL_GID)).expect("chown home");
            }
            writeln!(passwd, "{user}:{{PLAIN}}{password}:{MAIL_UID}:{MAIL_GID}::{}::", home.display()).unwrap();
        }
        let path = self.dir.path().join("passwd");
        fs::write(&path, passwd).expect("write passwd");
        // Read by the auth process, which runs as the dovecot user.
        std::os::unix::fs::chown(&path, Some(0), Some(group_id("dovecot"))).expect("chown passwd");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).expect("chmod passwd");
    }

    fn write_oauth2_conf(&self) {
        let Some(oauth) = &self.oauth else { return };
        let conf = format!(
            "# Dovecot 2.3 oauth2 passdb: validate bearer tokens by RFC 7662 introspection.\n\
             introspection_mode = post\n\
             introspection_url = {}\n\
             username_attribute = username\n\
             active_attribute = active\n\
             active_value = true\n",
            oauth.introspection_url
        );
        let path = self.dir.path().join("dovecot-oauth2.conf.ext");
        fs::write(&path, conf).expect("write oauth2 conf");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod oauth2 conf");
    }

    fn write_config(&self) -> PathBuf {
        let dir = self.dir.path().display();
        let (mechanisms, oauth_passdb, no_penalty) = match &self.oauth {
            None => ("plain login", String::new(), ""),
            Some(oauth) => (
                oauth.mechanisms.as_str(),
                format!(
                    "passdb {{\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n  \
                     args = {dir}/dovecot-oauth2.conf.ext\n}}\n"
                ),
                "# No login penalty: the auth process (user dovecot) cannot connect here.\n\
                 service anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n}\n",
            ),
        };
        let config = format!(
            r#"# Written by popgate's test harness (tests/support/dovecot.rs).
instance_name = {token}
base_dir = {dir}/run
state_dir = {dir}/state
log_path = {dir}/dovecot.log
info_log_path = {dir}/dovecot.log
protocols = imap pop3
listen = 127.0.0.1
login_greeting = {token}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = {mechanisms}
auth_verbose = yes
auth_failure_delay = 0
first_valid_uid = {MAIL_UID}
first_valid_gid = {MAIL_GID}
mail_location = maildir:~/Maildir
# Special-use mailboxes (RFC 6154) for the delete policies; not created
# unless a test creates them, so other tests see only INBOX.
namespace inbox {{
  inbox = yes
  mailbox Trash {{
    special_use = \Trash
  }}
  mailbox Archive {{
    special_use = \Archive
  }}
}}
mail_fsync = never
mail_max_userip_connections = {max_userip}
pop3_uidl_format = %08Xu%08Xv
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {dir}/passwd
}}
{oauth_passdb}userdb {{
  driver = passwd-file
  args = username_format=%u {dir}/passwd
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {pop3}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
# For a test Postfix's smtpd (smtpd_sasl_type = dovecot, tests/support/postfix.rs).
service auth {{
  unix_listener auth-postfix {{
    mode = 0666
  }}
}}
{no_penalty}"#,
            token = self.token,
            imap = self.imap_port,
            pop3 = self.pop3_port,
            max_userip = self.max_userip_connections,
        );
        let path = self.dir.path().join("dovecot.conf");
        fs::write(&path, config).expect("write dovecot.conf");
        path
    }

    fn launch(&mut self, binary: &Path) {
        for _attempt in 0..5 {
            self.imap_port = free_port();
            self.pop3_port = free_port();
            if self.imap_port == self.pop3_port {
                continue;
            }
            let config = self.write_config();
            let out = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.path().join("master.out"))
                .expect("master.out");
            // Foreground (-F), so the master is our child; every stream to a
            // file, so it holds none of the test's pipes.
            let master = Command::new(binary)
                .arg("-F")
                .arg("-c")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(out.try_clone().expect("dup"))
                .stderr(out)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
            self.master = Some(master);
            match self.wait_until_ready() {
                Ok(()) => return,
                Err(log) if log.contains("Address already in use") => {
                    self.stop();
                    continue;
                }
                Err(log) => {
                    self.stop();
                    panic!("Dovecot did not start:\n{log}");
                }
            }
        }
        panic!("Dovecot: no free ports after 5 attempts:\n{}", self.log());
    }

    /// Both ports answer with this instance's greeting. `Err(log)` if the
    /// master exited.
    fn wait_until_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + IO_TIMEOUT;
        let mut ready = [false, false];
        while Instant::now() < deadline {
            if let Some(status) = self.master.as_mut().unwrap().try_wait().expect("try_wait") {
                // Give the log process a moment to write the reason.
                std::thread::sleep(Duration::from_millis(100));
                return Err(format!("master exited ({status}):\n{}", self.log()));
            }
            for (i, port) in [self.imap_port, self.pop3_port].into_iter().enumerate() {
                if !ready[i] {
                    ready[i] = greeting_of(port).is_some_and(|g| g.contains(&self.token));
                }
            }
            if ready == [true, true] {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = self.log();
        self.stop();
        panic!("Dovecot did not answer within {IO_TIMEOUT:?}:\n{log}");
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The first line a server on `port` sends, if it sends one soon.
fn greeting_of(port: u16) -> Option<String> {
    use std::io::{BufRead, BufReader};
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    Some(line)
}

/// Stops the master (so it starts nothing new), kills everything below it,
/// then the master, and reaps it.
fn kill_tree(mut master: Child) {
    let pid = master.id();
    send_signal(pid, Signal::Stop);
    for _ in 0..3 {
        let descendants = descendants_of(pid);
        if descendants.is_empty() {
            break;
        }
        for child in descendants {
            send_signal(child, Signal::Kill);
        }
    }
    let _ = master.kill();
    let _ = master.wait();
}

/// Every living process below `root`, from /proc.
fn descendants_of(root: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    for entry in fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else { continue };
        // "pid (comm) state ppid …": comm may hold spaces and parentheses.
        let Some(after) = stat.rsplit_once(')').map(|(_, rest)| rest) else { continue };
        let mut fields = after.split_whitespace();
        let state = fields.next();
        let ppid = fields.next().and_then(|p| p.parse::<u32>().ok());
        if let (Some(state), Some(ppid)) = (state, ppid)
            && state != "Z"
        {
            parent_of.push((pid, ppid));
        }
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(parent_of.iter().filter(|(_, ppid)| *ppid == parent).map(|(pid, _)| *pid));
        i += 1;
    }
    found.remove(0);
    found
}

fn group_id(name: &str) -> u32 {
    let groups = fs::read_to_string("/etc/group").expect("/etc/group");
    groups
        .lines()
        .find_map(|line| {
            let mut fields = line.split(':');
            (fields.next() == Some(name)).then(|| fields.nth(1)?.parse().ok()).flatten()
        })
        .unwrap_or_else(|| panic!("no group `{name}`: is dovecot-core installed? (scripts/install-test-deps)"))
}
