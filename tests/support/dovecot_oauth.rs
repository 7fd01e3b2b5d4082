//! A private Dovecot (IMAP only) whose users log in with a password or with
//! an OAuth bearer token that Dovecot's oauth2 passdb checks against the
//! stand-in authorization server's introspection endpoint — so a test
//! proves a token really reached and satisfied an IMAP server.
//!
//! Passdbs: passwd-file first (passwords), then oauth2 (`introspection_mode
//! = post`). The auth penalty for failed logins is switched off (the auth
//! process cannot reach anvil's penalty socket), so a test of refused tokens
//! is not slowed by seconds per attempt. Killed with all its children on
//! drop.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::imap::Imap;
use super::{IO_TIMEOUT, Signal, free_port, require_program, send_signal};

const MAIL_UID: u32 = 8;
const MAIL_GID: u32 = 8;

pub struct OAuthDovecot {
    dir: tempfile::TempDir,
    master: Option<Child>,
    pub imap_port: u16,
    users: HashMap<String, String>,
    greeting: String,
}

impl OAuthDovecot {
    /// `mechanisms`: Dovecot's `auth_mechanisms`, e.g.
    /// "plain login xoauth2 oauthbearer".
    pub fn start(introspection_url: &str, users: &[(&str, &str)], mechanisms: &str) -> OAuthDovecot {
        let binary = require_program("dovecot");
        let dir = tempfile::Builder::new().prefix("popgate-dovecot-oauth-").tempdir().expect("tempdir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        for sub in ["run", "state", "home"] {
            fs::create_dir(dir.path().join(sub)).expect("mkdir");
        }
        std::os::unix::fs::chown(dir.path().join("home"), Some(MAIL_UID), Some(MAIL_GID)).expect("chown home");
        let greeting = format!("popgate-oauth-test-{}", dir.path().file_name().unwrap().to_string_lossy());
        let mut dovecot = OAuthDovecot {
            dir,
            master: None,
            imap_port: 0,
            users: users.iter().map(|(u, p)| (u.to_string(), p.to_string())).collect(),
            greeting,
        };
        dovecot.write_passwd();
        dovecot.write_oauth2_conf(introspection_url);
        dovecot.launch(&binary, mechanisms);
        dovecot
    }

    pub fn imap_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.imap_port))
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn imap(&self, user: &str) -> Imap {
        let mut imap = Imap::login(self.imap_addr(), user, &self.users[user]);
        imap.select("INBOX");
        imap
    }

    pub fn append(&self, user: &str, message: &[u8]) -> u32 {
        let mut imap = self.imap(user);
        let uid = imap.append("INBOX", "", message);
        imap.logout();
        uid
    }

    pub fn uids(&self, user: &str) -> Vec<u32> {
        let mut imap = self.imap(user);
        let uids = imap.messages().iter().map(|m| m.uid).collect();
        imap.logout();
        uids
    }

    pub fn log(&self) -> String {
        let mut log = fs::read_to_string(self.dir.path().join("dovecot.log")).unwrap_or_default();
        log.push_str(&fs::read_to_string(self.dir.path().join("master.out")).unwrap_or_default());
        log
    }

    /// Successful IMAP logins of `user` with `method` (e.g. "XOAUTH2") so far.
    pub fn logins(&self, user: &str, method: &str) -> usize {
        let needle = format!("Login: user=<{user}>, method={method},");
        self.log().matches(&needle).count()
    }

    fn write_passwd(&self) {
        let mut passwd = String::new();
        for (user, password) in &self.users {
            let home = self.dir.path().join("home").join(user);
            fs::create_dir_all(&home).expect("mkdir home");
            std::os::unix::fs::chown(&home, Some(MAIL_UID), Some(MAIL_GID)).expect("chown home");
            writeln!(passwd, "{user}:{{PLAIN}}{password}:{MAIL_UID}:{MAIL_GID}::{}::", home.display()).unwrap();
        }
        let path = self.dir.path().join("passwd");
        fs::write(&path, passwd).expect("write passwd");
        std::os::unix::fs::chown(&path, Some(0), Some(group_id("dovecot"))).expect("chown passwd");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).expect("chmod passwd");
    }

    fn write_oauth2_conf(&self, introspection_url: &str) {
        let conf = format!(
            "# Dovecot 2.3 oauth2 passdb: validate bearer tokens by RFC 7662 introspection.\n\
             introspection_mode = post\n\
             introspection_url = {introspection_url}\n\
             username_attribute = username\n\
             active_attribute = active\n\
             active_value = true\n"
        );
        let path = self.dir.path().join("dovecot-oauth2.conf.ext");
        fs::write(&path, conf).expect("write oauth2 conf");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod oauth2 conf");
    }

    fn write_config(&self, mechanisms: &str) -> PathBuf {
        let dir = self.dir.path().display();
        let config = format!(
            r#"# Written by popgate's test harness (tests/support/dovecot_oauth.rs).
base_dir = {dir}/run
state_dir = {dir}/state
log_path = {dir}/dovecot.log
info_log_path = {dir}/dovecot.log
protocols = imap
listen = 127.0.0.1
login_greeting = {greeting}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = {mechanisms}
auth_verbose = yes
auth_failure_delay = 0
first_valid_uid = {MAIL_UID}
first_valid_gid = {MAIL_GID}
mail_location = maildir:~/Maildir
mail_fsync = never
mail_max_userip_connections = 1000
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {dir}/passwd
}}
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {dir}/dovecot-oauth2.conf.ext
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {dir}/passwd
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
# No login penalty: the auth process (user dovecot) cannot connect here.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
"#,
            greeting = self.greeting,
            port = self.imap_port,
        );
        let path = self.dir.path().join("dovecot.conf");
        fs::write(&path, config).expect("write dovecot.conf");
        path
    }

    fn launch(&mut self, binary: &Path, mechanisms: &str) {
        for _attempt in 0..5 {
            self.imap_port = free_port();
            let config = self.write_config(mechanisms);
            let out = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.path().join("master.out"))
                .expect("master.out");
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
            let deadline = Instant::now() + IO_TIMEOUT;
            loop {
                if let Some(status) = self.master.as_mut().unwrap().try_wait().expect("try_wait") {
                    std::thread::sleep(Duration::from_millis(100));
                    let log = self.log();
                    self.master = None;
                    if log.contains("Address already in use") {
                        break;
                    }
                    panic!("Dovecot (oauth2) exited ({status}):\n{log}");
                }
                if greeting_of(self.imap_port).is_some_and(|g| g.contains(&self.greeting)) {
                    return;
                }
                if Instant::now() > deadline {
                    let log = self.log();
                    self.stop();
                    panic!("Dovecot (oauth2) did not answer within {IO_TIMEOUT:?}:\n{log}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("Dovecot (oauth2): no free port after 5 attempts:\n{}", self.log());
    }

    pub fn stop(&mut self) {
        if let Some(mut master) = self.master.take() {
            let pid = master.id();
            send_signal(pid, Signal::Stop);
            for _ in 0..3 {
                let children = descendants_of(pid);
                if children.is_empty() {
                    break;
                }
                for child in children {
                    send_signal(child, Signal::Kill);
                }
            }
            let _ = master.kill();
            let _ = master.wait();
        }
    }
}

impl Drop for OAuthDovecot {
    fn drop(&mut self) {
        self.stop();
    }
}

fn greeting_of(port: u16) -> Option<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stream), &mut line).ok()?;
    Some(line)
}

/// Every living process below `root` (from /proc).
fn descendants_of(root: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    for entry in fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else { continue };
        let Some((_, after)) = stat.rsplit_once(')') else { continue };
        let mut fields = after.split_whitespace();
        if let (Some(state), Some(ppid)) = (fields.next(), fields.next().and_then(|p| p.parse::<u32>().ok()))
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
    fs::read_to_string("/etc/group")
        .expect("/etc/group")
        .lines()
        .find_map(|line| {
            let mut fields = line.split(':');
            (fields.next() == Some(name)).then(|| fields.nth(1)?.parse().ok()).flatten()
        })
        .unwrap_or_else(|| panic!("no group `{name}`: is dovecot-core installed? (scripts/install-test-deps)"))
}
