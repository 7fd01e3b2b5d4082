//! A private haproxy per test: a TCP (layer 4) round-robin balancer on
//! 127.0.0.1 and a port chosen at run time, in front of the given servers,
//! with its config, PID file and log under a temp dir (never the system
//! instance), killed on drop.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};

use super::{IO_TIMEOUT, free_port, require_program, wait_for};

pub struct Haproxy {
    child: Option<Child>,
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Haproxy {
    /// Round-robin over `servers`, one connection to each in turn.
    pub fn round_robin(servers: &[SocketAddr]) -> Haproxy {
        let program = require_program("haproxy");
        for _attempt in 0..5 {
            let dir = tempfile::Builder::new().prefix("popgate-haproxy-").tempdir().expect("tempdir");
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let backends: String =
                servers.iter().enumerate().map(|(i, server)| format!("    server replica{i} {server}\n")).collect();
            // No health checks: every replica is up for the whole test, and
            // a check would count as a session on it.
            let config = format!(
                "global\n    maxconn 1000\n    pidfile {dir}/haproxy.pid\n\
                 defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n\
                 frontend pop3\n    bind {addr}\n    default_backend replicas\n\
                 backend replicas\n    balance roundrobin\n{backends}",
                dir = dir.path().display(),
            );
            let path = dir.path().join("haproxy.cfg");
            fs::write(&path, config).expect("write haproxy.cfg");
            let check = Command::new(&program).arg("-c").arg("-f").arg(&path).output().expect("run haproxy -c");
            assert!(check.status.success(), "haproxy -c: {}", String::from_utf8_lossy(&check.stderr));
            let log = fs::File::create(dir.path().join("haproxy.log")).expect("log file");
            let child = Command::new(&program)
                .arg("-db")
                .arg("-f")
                .arg(&path)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("dup"))
                .stderr(log)
                .spawn()
                .expect("run haproxy");
            let mut proxy = Haproxy { child: Some(child), addr, dir };
            let up = wait_for("haproxy to listen", IO_TIMEOUT, || {
                if let Some(Ok(Some(_))) = proxy.child.as_mut().map(|c| c.try_wait()) {
                    return Some(false);
                }
                // This probe reaches one replica as a connection closed
                // before any command: not a login, so no test counts it.
                TcpStream::connect(addr).ok().map(|_| true)
            });
            if up {
                return proxy;
            }
            proxy.child = None;
        }
        panic!("haproxy did not start after 5 attempts");
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("haproxy.log")).unwrap_or_default()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
