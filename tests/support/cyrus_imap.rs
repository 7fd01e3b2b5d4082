//! A private Cyrus IMAP 3.6 with its own imapd and pop3d, for the IMAP
//! backend's tests against a second real server: its own directory, IMAP
//! and POP3 ports on 127.0.0.1 chosen at run time, users in its own sasldb,
//! every process it started killed on drop.
//!
//! imapd and pop3d come from the `cyrus-imapd` and `cyrus-pop3d` .debs,
//! unpacked (not installed: cyrus-imapd conflicts with dovecot-imapd) by
//! scripts/install-cyrus into `$POPGATE_CYRUS_IMAPD_DIR` (default
//! /var/lib/popgate-test/cyrus-imapd), and run under the installed
//! cyrus-common's `master` with a configuration under the temp dir. A
//! missing binary fails loudly, never a skip.
//!
//! Mail is seeded and inspected with the raw client of `support::imap`
//! (never popgate's code). Cyrus's own pop3d serves the same mailboxes, the
//! reference for popgate's UIDLs (`pop3_uidl`).
//!
//! Options a test may add (`start_with`): `allowplaintext: no` (the server
//! announces LOGINDISABLED), `maxlogins_per_user: N`, `altnamespace: no`
//! (folders under INBOX), `xlist-trash: Trash` (RFC 6154 \Trash),
//! `suppress_capabilities: UIDPLUS`, `uidl_format: …` (pop3d). A key the
//! base configuration already sets is fatal to Cyrus.

use std::collections::HashMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::IO_TIMEOUT;
use super::cyrus::{
    CYRUS_BIN, SERVERNAME, chown_to_cyrus, lint, saslpasswd2, spawn_master, stop_master, two_free_ports,
};
use super::imap::{Imap, Stored};
use super::pop3::Pop3;

/// Where scripts/install-cyrus unpacks imapd and pop3d (the same variable
/// moves both).
pub fn unpacked_bin() -> PathBuf {
    let root =
        std::env::var_os("POPGATE_CYRUS_IMAPD_DIR").unwrap_or_else(|| "/var/lib/popgate-test/cyrus-imapd".into());
    Path::new(&root).join("usr/lib/cyrus/bin")
}

pub struct CyrusImap {
    dir: tempfile::TempDir,
    master: Option<Child>,
    pub imap: SocketAddr,
    pub pop3: SocketAddr,
    passwords: Mutex<HashMap<String, String>>,
}

impl CyrusImap {
    pub fn start() -> CyrusImap {
        CyrusImap::start_with("")
    }

    /// Like `start`, with more imapd.conf lines.
    pub fn start_with(extra_imapd_conf: &str) -> CyrusImap {
        let bin = unpacked_bin();
        for program in ["imapd", "pop3d"] {
            assert!(
                bin.join(program).is_file(),
                "Cyrus's {program} is not unpacked at {}: run scripts/install-cyrus (as root)",
                bin.display()
            );
        }
        assert!(
            Path::new(CYRUS_BIN).join("master").is_file() && Path::new("/usr/sbin/saslpasswd2").is_file(),
            "Cyrus is not installed: run scripts/install-cyrus (as root)"
        );
        let mut dir = tempfile::Builder::new().prefix("popgate-cyrus-imap-").tempdir().expect("tempdir");
        for sub in ["conf", "spool", "sock", "run/proc", "run/lock"] {
            fs::create_dir_all(dir.path().join(sub)).expect("create Cyrus directories");
        }
        let mut last_failure = String::new();
        for _attempt in 0..5 {
            let (imap, pop3) = two_free_ports();
            write_config(dir.path(), &bin, imap, pop3, extra_imapd_conf);
            lint(dir.path());
            chown_to_cyrus(dir.path());
            let master = spawn_master(dir.path());
            let mut cyrus = CyrusImap { dir, master: Some(master), imap, pop3, passwords: Mutex::new(HashMap::new()) };
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
        panic!("Cyrus IMAP did not start after 5 attempts: {last_failure}");
    }

    /// Both ports greet as Cyrus.
    fn wait_until_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + IO_TIMEOUT;
        let mut ready = [false, false];
        loop {
            if let Some(status) = self.master.as_mut().expect("running").try_wait().expect("try_wait") {
                return Err(format!("master exited ({status}); Cyrus logs to syslog only:\n{}", self.log()));
            }
            for (i, (addr, marker)) in [(self.imap, "Cyrus IMAP"), (self.pop3, "Cyrus POP3")].into_iter().enumerate() {
                if !ready[i]
                    && let Some(greeting) = greeting_of(addr)
                {
                    if !greeting.contains(marker) {
                        return Err(format!("{addr} is not our Cyrus: {greeting:?}"));
                    }
                    ready[i] = true;
                }
            }
            if ready == [true, true] {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("no answer on {} and {} within {IO_TIMEOUT:?}", self.imap, self.pop3));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Stops master and everything it started, then starts it again on the
    /// same directory and ports: the mail is as it was.
    pub fn restart(&mut self) {
        self.stop();
        self.master = Some(spawn_master(self.dir.path()));
        if let Err(why) = self.wait_until_ready() {
            self.stop();
            panic!("Cyrus IMAP did not restart: {why}");
        }
    }

    /// `imap://127.0.0.1:PORT`, for popgate's `--backend`.
    pub fn imap_url(&self) -> String {
        format!("imap://{}", self.imap)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What master wrote (Cyrus logs to syslog: usually nothing here).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("master.log")).unwrap_or_default()
    }

    /// Creates a user in the sasldb. Its INBOX (and the folders of
    /// `autocreate_inbox_folders`) appear at its first login.
    pub fn add_user(&self, user: &str, password: &str) {
        self.saslpasswd2(user, password, true);
        self.passwords.lock().unwrap().insert(user.to_string(), password.to_string());
    }

    /// Changes a user's password (sessions already logged in stay so).
    pub fn set_password(&self, user: &str, password: &str) {
        self.saslpasswd2(user, password, false);
        self.passwords.lock().unwrap().insert(user.to_string(), password.to_string());
    }

    fn saslpasswd2(&self, user: &str, password: &str, create: bool) {
        saslpasswd2(self.dir.path(), user, password, create);
    }

    pub fn password(&self, user: &str) -> String {
        self.passwords.lock().unwrap().get(user).cloned().unwrap_or_else(|| panic!("no user {user} (add_user first)"))
    }

    /// An IMAP session of `user` (logged in, nothing selected).
    pub fn login(&self, user: &str) -> Imap {
        Imap::login(self.imap, user, &self.password(user))
    }

    /// An IMAP session of `user` with `mailbox` selected.
    pub fn imap_in(&self, user: &str, mailbox: &str) -> Imap {
        let mut imap = self.login(user);
        imap.select(mailbox);
        imap
    }

    /// Appends messages to `user`'s INBOX; returns their UIDs.
    pub fn append_all<M: AsRef<[u8]>>(&self, user: &str, messages: &[M]) -> Vec<u32> {
        self.append_all_to(user, "INBOX", messages)
    }

    pub fn append_all_to<M: AsRef<[u8]>>(&self, user: &str, mailbox: &str, messages: &[M]) -> Vec<u32> {
        let mut imap = self.login(user);
        let uids = messages.iter().map(|m| imap.append(mailbox, "", m.as_ref())).collect();
        imap.logout();
        uids
    }

    pub fn append(&self, user: &str, message: &[u8]) -> u32 {
        self.append_all(user, &[message])[0]
    }

    /// What a mailbox of `user` holds now (UIDs and flags).
    pub fn messages_in(&self, user: &str, mailbox: &str) -> Vec<Stored> {
        let mut imap = self.imap_in(user, mailbox);
        let messages = imap.messages();
        imap.logout();
        messages
    }

    pub fn messages(&self, user: &str) -> Vec<Stored> {
        self.messages_in(user, "INBOX")
    }

    pub fn uids(&self, user: &str) -> Vec<u32> {
        self.messages(user).iter().map(|m| m.uid).collect()
    }

    pub fn uidvalidity(&self, user: &str) -> u32 {
        let mut imap = self.login(user);
        let uidvalidity = imap.select("INBOX");
        imap.logout();
        uidvalidity
    }

    /// As another client: flag a message \Deleted, log out without
    /// expunging.
    pub fn flag_deleted(&self, user: &str, uid: u32) {
        let mut imap = self.imap_in(user, "INBOX");
        imap.flag_deleted(uid);
        imap.logout();
    }

    /// A message's stored octets as Cyrus's IMAP gives them.
    pub fn fetch(&self, user: &str, uid: u32) -> Vec<u8> {
        let mut imap = self.imap_in(user, "INBOX");
        let content = imap.fetch(uid);
        imap.logout();
        content
    }

    /// The mailboxes of `user` as LIST shows them (name, attributes).
    pub fn mailboxes(&self, user: &str) -> Vec<(String, String)> {
        let mut imap = self.login(user);
        let reply = imap.ok("LIST \"\" \"*\"");
        imap.logout();
        reply
            .untagged
            .iter()
            .filter_map(|r| {
                let rest = r.text.strip_prefix("* LIST (")?;
                let (attributes, rest) = rest.split_once(')')?;
                let name = rest.trim().split_once(' ')?.1.trim_matches('"');
                Some((name.to_string(), attributes.to_string()))
            })
            .collect()
    }

    /// UIDL as Cyrus's own pop3d lists it (USER/PASS: needs
    /// `allowplaintext: yes`, the default here).
    pub fn pop3_uidl(&self, user: &str) -> Vec<(u32, String)> {
        let mut pop3 = Pop3::login(self.pop3, user, &self.password(user));
        let uidl = pop3.uidl();
        pop3.quit();
        uidl
    }

    /// Ends master and everything it started, and reaps master.
    pub fn stop(&mut self) {
        stop_master(self.master.take());
    }
}

impl Drop for CyrusImap {
    fn drop(&mut self) {
        self.stop();
    }
}

fn write_config(dir: &Path, bin: &Path, imap: SocketAddr, pop3: SocketAddr, extra: &str) {
    let d = dir.display();
    // No key twice: Cyrus treats a duplicate key as fatal. `allowplaintext`
    // and `altnamespace` are left to their defaults unless a test sets them
    // (no, yes) — except allowplaintext, which the seeding client needs.
    let allowplaintext = if extra.contains("allowplaintext:") { "" } else { "allowplaintext: yes\n" };
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
         {allowplaintext}\
         autocreate_quota: 0\n\
         autocreate_inbox_folders: Trash\n\
         syslog_prefix: popgate-test-cyrus-imap\n\
         {extra}\n"
    );
    fs::write(dir.join("imapd.conf"), imapd).expect("write imapd.conf");
    let c = dir.join("imapd.conf");
    let c = c.display();
    let b = bin.display();
    let cyrus = format!(
        "START {{\n  recover cmd=\"ctl_cyrusdb -C {c} -r\"\n}}\n\
         SERVICES {{\n  imap cmd=\"{b}/imapd -C {c}\" listen=\"{imap}\" prefork=0\n  \
         pop3 cmd=\"{b}/pop3d -C {c}\" listen=\"{pop3}\" prefork=0\n}}\n\
         EVENTS {{\n  checkpoint cmd=\"ctl_cyrusdb -C {c} -c\" period=30\n}}\n"
    );
    fs::write(dir.join("cyrus.conf"), cyrus).expect("write cyrus.conf");
}

/// The first line a server at `addr` sends, if it sends one soon.
fn greeting_of(addr: SocketAddr) -> Option<String> {
    use std::io::{BufRead, BufReader};
    let stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    Some(line)
}
