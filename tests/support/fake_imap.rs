//! A minimal fake IMAP server, for load tests where Dovecot would be the
//! bottleneck: LOGIN succeeds only with one password, instantly either way;
//! the mailbox is empty.
//!
//! It also plays the refusals of servers that cannot run here (`refusing`):
//! Gmail's and Exchange Online's exact wordings, quoted below with where
//! they come from. Any behaviour a free server produces is tested against
//! that server instead (Dovecot, Cyrus).

/// Gmail IMAP at its 15 simultaneous connections per account (Google
/// Workspace Admin Help, "Gmail bandwidth limits"; the exact line as IMAP
/// clients report it, issue #19).
pub const GMAIL_TOO_MANY_CONNECTIONS: &str = "NO [ALERT] Too many simultaneous connections. (Failure)";
/// Gmail IMAP over its bandwidth limit (same sources).
pub const GMAIL_BANDWIDTH: &str = "NO [ALERT] Account exceeded command or bandwidth limits. (Failure)";
/// Exchange Online IMAP throttling, with the wait it asks for (Microsoft
/// Q&A reports of Microsoft 365 IMAP clients, issue #19).
pub const EXCHANGE_THROTTLED: &str = "BAD Request is throttled. Suggested Backoff Time: 60000 milliseconds";
/// Exchange Online IMAP when the mailbox server is busy (same sources).
pub const EXCHANGE_UNAVAILABLE: &str = "NO Server Unavailable. 15";
/// Exchange Online app-only IMAP after a successful AUTHENTICATE, when the
/// service principal or its mailbox permission is missing (Microsoft Learn,
/// "Authenticate an IMAP, POP or SMTP connection using OAuth"; issue #19).
pub const EXCHANGE_NOT_CONNECTED: &str = "BAD User is authenticated but not connected.";

/// How the fake answers.
#[derive(Debug, Clone, Copy)]
pub struct Script {
    /// LOGIN succeeds with this password only.
    pub password: &'static str,
    /// Every LOGIN is answered with this (status and text, no tag).
    pub login_refusal: Option<&'static str>,
    /// Every SELECT is answered with this.
    pub select_refusal: Option<&'static str>,
}

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// A minimal IMAP server for the burst: LOGIN succeeds only with
/// `password`, instantly either way; the mailbox is empty.
pub struct FakeImap {
    pub addr: SocketAddr,
    pub logins: Arc<AtomicU64>,
    pub refused: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl FakeImap {
    pub fn start(password: &'static str) -> FakeImap {
        FakeImap::scripted(Script { password, login_refusal: None, select_refusal: None })
    }

    /// Every LOGIN refused with `refusal` (e.g. `GMAIL_TOO_MANY_CONNECTIONS`).
    pub fn refusing(refusal: &'static str) -> FakeImap {
        FakeImap::scripted(Script { password: "", login_refusal: Some(refusal), select_refusal: None })
    }

    pub fn scripted(script: Script) -> FakeImap {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().unwrap();
        let logins = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, r, s) = (logins.clone(), refused.clone(), stop.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                listener.set_nonblocking(true).unwrap();
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                while !s.load(Ordering::Relaxed) {
                    let Ok(Ok((socket, _))) = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await
                    else {
                        continue;
                    };
                    tokio::spawn(serve_fake_imap(socket, script, l.clone(), r.clone()));
                }
            });
        });
        FakeImap { addr, logins, refused, stop }
    }
}

impl Drop for FakeImap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

async fn serve_fake_imap(
    socket: tokio::net::TcpStream,
    script: Script,
    logins: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let (read, mut write) = socket.into_split();
    let mut lines = BufReader::new(read).lines();
    let _ = write.write_all(b"* OK [CAPABILITY IMAP4rev1 UIDPLUS AUTH=PLAIN] fake ready\r\n").await;
    while let Ok(Ok(Some(line))) = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await {
        let mut words = line.splitn(3, ' ');
        let (tag, command) = (words.next().unwrap_or("*"), words.next().unwrap_or("").to_ascii_uppercase());
        let reply = match command.as_str() {
            "LOGIN" if script.login_refusal.is_some() => {
                refused.fetch_add(1, Ordering::Relaxed);
                format!("{tag} {}\r\n", script.login_refusal.unwrap_or_default())
            }
            "SELECT" | "EXAMINE" if script.select_refusal.is_some() => {
                format!("{tag} {}\r\n", script.select_refusal.unwrap_or_default())
            }
            "LOGIN" if !script.password.is_empty() && line.contains(script.password) => {
                logins.fetch_add(1, Ordering::Relaxed);
                format!("{tag} OK [CAPABILITY IMAP4rev1 UIDPLUS] Logged in\r\n")
            }
            "LOGIN" => {
                refused.fetch_add(1, Ordering::Relaxed);
                format!("{tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
            }
            "CAPABILITY" => format!("* CAPABILITY IMAP4rev1 UIDPLUS\r\n{tag} OK done\r\n"),
            "SELECT" | "EXAMINE" => format!(
                "* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n* 0 EXISTS\r\n* 0 RECENT\r\n\
                 * OK [UIDVALIDITY 1700000000] UIDs valid\r\n* OK [UIDNEXT 1] Predicted next UID\r\n\
                 {tag} OK [READ-WRITE] Select completed.\r\n"
            ),
            "LOGOUT" => {
                let _ = write.write_all(format!("* BYE bye\r\n{tag} OK Logout completed.\r\n").as_bytes()).await;
                return;
            }
            _ => format!("{tag} OK done\r\n"),
        };
        if write.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}
