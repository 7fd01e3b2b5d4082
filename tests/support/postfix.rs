//! A private Postfix per test, as the submission relay's real upstream: its
//! own config directory, queue and log under a temp dir, one smtpd on
//! 127.0.0.1 at a port chosen at run time. Clients authenticate through the
//! given Dovecot's auth service (`smtpd_sasl_type = dovecot`: its
//! passwd-file, or its oauth2 passdb for XOAUTH2), and mail for
//! `USER@popgate.test` is delivered (virtual(8), as the mail user) into that
//! Dovecot's maildirs — where its IMAP, and so popgate's POP3, read it.
//!
//! Postfix logs to its syslog (no tty) unless `maillog_file` is set: it is,
//! to `postfix.log` in the directory, through postlogd. `stop` and Drop end
//! the instance with `postfix stop`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::dovecot::Dovecot;
use super::{IO_TIMEOUT, free_port, require_program};

/// The mail domain Postfix delivers into Dovecot.
pub const DOMAIN: &str = "popgate.test";

pub struct Postfix {
    dir: tempfile::TempDir,
    pub port: u16,
    running: bool,
}

impl Postfix {
    /// Starts a Postfix that authenticates with `dovecot`'s users and
    /// delivers `USER@popgate.test` into `dovecot`'s maildir of USER.
    pub fn start(dovecot: &Dovecot, users: &[&str]) -> Postfix {
        require_program("postfix");
        let dir = tempfile::Builder::new().prefix("popgate-postfix-").tempdir().expect("tempdir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        for sub in ["queue", "data"] {
            fs::create_dir(dir.path().join(sub)).expect("mkdir");
        }
        let postfix_user = user_id("postfix");
        std::os::unix::fs::chown(dir.path().join("data"), Some(postfix_user), None).expect("chown data");
        let mailboxes: String = users.iter().map(|u| format!("{u}@{DOMAIN} {u}/Maildir/\n")).collect();
        fs::write(dir.path().join("vmailbox"), mailboxes).expect("vmailbox");
        let mut postfix = Postfix { dir, port: 0, running: false };
        for _attempt in 0..5 {
            postfix.port = free_port();
            postfix.write_config(dovecot);
            match postfix.launch() {
                Ok(()) => return postfix,
                Err(log) if log.contains("Address already in use") => continue,
                Err(log) => panic!("Postfix did not start:\n{log}"),
            }
        }
        panic!("Postfix: no free port after 5 attempts:\n{}", postfix.log());
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("postfix.log")).unwrap_or_default()
    }

    /// The relay URL popgate is configured with.
    pub fn relay_url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    fn write_config(&self, dovecot: &Dovecot) {
        let dir = self.dir.path().display();
        let main = format!(
            "# Written by popgate's test harness (tests/support/postfix.rs).
compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = upstream.{DOMAIN}
mydomain = {DOMAIN}
myorigin = {DOMAIN}
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
maillog_file_prefixes = /tmp, {dir}
maillog_file = {dir}/postfix.log
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = {auth}
smtpd_relay_restrictions = permit_sasl_authenticated, reject
smtpd_recipient_restrictions = permit_sasl_authenticated, reject
virtual_mailbox_domains = {DOMAIN}
virtual_mailbox_base = {home}
virtual_mailbox_maps = texthash:{dir}/vmailbox
virtual_uid_maps = static:8
virtual_gid_maps = static:8
virtual_minimum_uid = 8
# Remote clients: no header rewriting, nothing added (the test compares bytes).
local_header_rewrite_clients =
",
            auth = dovecot.dir().join("run").join("auth-postfix").display(),
            home = dovecot.dir().join("home").display(),
        );
        fs::write(self.dir.path().join("main.cf"), main).expect("main.cf");
        let master = format!(
            "127.0.0.1:{port} inet n - n - - smtpd
cleanup   unix n - n - 0 cleanup
qmgr      unix n - n 300 1 qmgr
rewrite   unix - - n - - trivial-rewrite
bounce    unix - - n - 0 bounce
defer     unix - - n - 0 bounce
trace     unix - - n - 0 bounce
verify    unix - - n - 1 verify
flush     unix n - n 1000? 0 flush
proxymap  unix - - n - - proxymap
smtp      unix - - n - - smtp
relay     unix - - n - - smtp
error     unix - - n - - error
retry     unix - - n - - error
discard   unix - - n - - discard
virtual   unix - n n - - virtual
anvil     unix - - n - 1 anvil
scache    unix - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
",
            port = self.port
        );
        fs::write(self.dir.path().join("master.cf"), master).expect("master.cf");
    }

    fn postfix(&self, command: &str) -> std::process::Output {
        // Postfix reports only to syslog unless stderr is a terminal:
        // `script` gives it one, so a failure's reason reaches the test.
        let line = format!("postfix -c {} {command}", self.dir.path().display());
        Command::new("script").args(["-qec", &line, "/dev/null"]).stdin(Stdio::null()).output().expect("run postfix")
    }

    fn launch(&mut self) -> Result<(), String> {
        let out = self.postfix("start");
        if !out.status.success() {
            return Err(format!("{}\n{}", String::from_utf8_lossy(&out.stdout), self.log()));
        }
        self.running = true;
        let deadline = Instant::now() + IO_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(mut stream) =
                std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], self.port).into(), Duration::from_secs(1))
            {
                use std::io::Read;
                stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut greeting = [0u8; 64];
                let n = stream.read(&mut greeting).unwrap_or(0);
                if String::from_utf8_lossy(&greeting[..n]).contains(&format!("upstream.{DOMAIN}")) {
                    return Ok(());
                }
            }
            if self.log().contains("fatal") {
                let log = self.log();
                self.stop();
                return Err(log);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = self.log();
        self.stop();
        panic!("Postfix did not answer within {IO_TIMEOUT:?}:\n{log}");
    }

    /// Takes the upstream down (a fault test).
    pub fn stop(&mut self) {
        if std::mem::take(&mut self.running) {
            let _ = self.postfix("stop");
        }
    }

    /// Brings it back on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.launch().unwrap_or_else(|log| panic!("Postfix did not restart:\n{log}"));
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        if self.running {
            let _ = self.postfix("abort");
            self.running = false;
        }
    }
}

fn user_id(name: &str) -> u32 {
    let passwd = fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    passwd
        .lines()
        .find_map(|l| {
            let fields: Vec<&str> = l.split(':').collect();
            (fields.first() == Some(&name)).then(|| fields[2].parse().expect("uid"))
        })
        .unwrap_or_else(|| panic!("no user {name}: install postfix (scripts/install-test-deps)"))
}
