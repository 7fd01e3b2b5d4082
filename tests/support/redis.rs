//! A private `redis-server` per test: its own config, directory, log and
//! PID file under a temp dir, on 127.0.0.1 and a port chosen at run time
//! (never the system instance), killed on drop. Nothing is persisted,
//! unless started with `start_persistent` (an append-only file synced at
//! every write, as a production Redis holding tokens must be configured).

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{IO_TIMEOUT, free_port, require_program, wait_for};

pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    password: Option<String>,
    persistent: bool,
    dir: tempfile::TempDir,
}

impl Redis {
    /// A Redis without a password.
    pub fn start() -> Redis {
        Redis::start_with(None)
    }

    /// A Redis that requires `password` (`requirepass`).
    pub fn start_with_password(password: &str) -> Redis {
        Redis::start_with(Some(password.to_string()))
    }

    /// A Redis that keeps its data over `stop`/`restart` (AOF, `always`).
    pub fn start_persistent() -> Redis {
        Redis::start_with_options(None, true)
    }

    fn start_with(password: Option<String>) -> Redis {
        Redis::start_with_options(password, false)
    }

    fn start_with_options(password: Option<String>, persistent: bool) -> Redis {
        let dir = tempfile::Builder::new().prefix("popgate-redis-").tempdir().expect("tempdir");
        let mut redis = Redis { child: None, port: 0, password, persistent, dir };
        for _attempt in 0..5 {
            redis.port = free_port();
            if redis.launch() {
                return redis;
            }
        }
        panic!("redis-server did not start after 5 attempts:\n{}", redis.log());
    }

    /// Starts the server on `self.port`; false if it exited (port taken).
    fn launch(&mut self) -> bool {
        let server = require_program("redis-server");
        let dir = self.dir.path();
        let mut config = format!(
            "bind 127.0.0.1\nport {port}\nprotected-mode yes\ndaemonize no\ndir {dir}\n\
             logfile {dir}/redis.log\npidfile {dir}/redis.pid\nsave \"\"\n",
            port = self.port,
            dir = dir.display(),
        );
        config.push_str(if self.persistent { "appendonly yes\nappendfsync always\n" } else { "appendonly no\n" });
        if let Some(password) = &self.password {
            config.push_str(&format!("requirepass {password}\n"));
        }
        fs::write(dir.join("redis.conf"), config).expect("write redis.conf");
        let child = Command::new(server)
            .arg(dir.join("redis.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run redis-server");
        self.child = Some(child);
        let ready = wait_for("redis-server to answer PING", IO_TIMEOUT, || {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                return Some(false);
            }
            (self.try_command(&["PING"]).as_deref() == Some("PONG")).then_some(true)
        });
        if !ready {
            self.child = None;
        }
        ready
    }

    /// `redis://127.0.0.1:PORT/0` (the password is configured apart).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    fn try_command(&self, args: &[&str]) -> Option<String> {
        let mut command = Command::new(require_program("redis-cli"));
        command.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        if let Some(password) = &self.password {
            command.env("REDISCLI_AUTH", password);
        }
        let output = command.args(args).stdin(Stdio::null()).output().ok()?;
        let text = String::from_utf8_lossy(&output.stdout).trim_end().to_string();
        (output.status.success() && !text.starts_with("Could not connect") && !text.starts_with("ERR")).then_some(text)
    }

    /// Runs one command with `redis-cli`; its reply as text.
    pub fn command(&self, args: &[&str]) -> String {
        self.try_command(args).unwrap_or_else(|| panic!("redis-cli {args:?} failed:\n{}", self.log()))
    }

    /// Kills the server (SIGKILL; its data is gone unless persistent).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        wait_for("redis-server to stop answering", Duration::from_secs(10), || {
            self.try_command(&["PING"]).is_none().then_some(())
        });
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        assert!(self.launch(), "redis-server did not restart on port {}:\n{}", self.port, self.log());
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
