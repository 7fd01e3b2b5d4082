//! A minimal fake IMAP server, for load tests where Dovecot would be the
//! bottleneck: LOGIN succeeds only with one password, instantly either way;
//! the mailbox is empty.

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
                    tokio::spawn(serve_fake_imap(socket, password, l.clone(), r.clone()));
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
    password: &str,
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
            "LOGIN" if line.contains(password) => {
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
