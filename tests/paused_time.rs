//! The session timers on tokio's paused clock: RFC 1939's ten-minute
//! autologout and the login timeout, proven in virtual time (the runtime
//! jumps to the next timer whenever every task waits), against a real
//! in-process server on loopback.

use std::sync::Arc;
use std::time::Duration;

use popgate::auth::accounts::PassThrough;
use popgate::backend::demo::{DemoBackend, DemoStore};
use popgate::config::Config;
use popgate::server::{RunningServer, Server};
use popgate::telemetry::Metrics;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::Instant;

async fn start(store: &DemoStore) -> RunningServer {
    let mut config = Config::default();
    config.listener[0].address = "127.0.0.1:0".parse().unwrap();
    let router = Arc::new(PassThrough::new(Arc::new(DemoBackend::new(store.clone()))));
    Server::start(&config, router, Arc::new(Metrics::new())).await.unwrap()
}

struct Client {
    lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    write: OwnedWriteHalf,
}

impl Client {
    async fn connect(server: &RunningServer) -> Client {
        let (read, write) = TcpStream::connect(server.local_addrs()[0]).await.unwrap().into_split();
        let mut client = Client { lines: BufReader::new(read).lines(), write };
        assert!(client.line().await.starts_with("+OK"));
        client
    }

    /// The next line; a virtual day is the hard limit.
    async fn line(&mut self) -> String {
        tokio::time::timeout(Duration::from_secs(86_400), self.lines.next_line())
            .await
            .expect("a reply within a virtual day")
            .unwrap()
            .unwrap_or_default()
    }

    async fn ok(&mut self, command: &str) {
        self.write.write_all(format!("{command}\r\n").as_bytes()).await.unwrap();
        let reply = self.line().await;
        assert!(reply.starts_with("+OK"), "{command}: {reply}");
    }
}

#[tokio::test(start_paused = true)]
async fn an_idle_session_is_logged_out_after_ten_minutes_and_deletes_nothing() {
    let store = DemoStore::new();
    store.add_user("alice", "pw");
    store.append("alice", &b"Subject: one\r\n\r\nfirst\r\n"[..]);
    store.append("alice", &b"Subject: two\r\n\r\nsecond\r\n"[..]);
    let server = start(&store).await;
    let mut client = Client::connect(&server).await;
    client.ok("USER alice").await;
    client.ok("PASS pw").await;
    client.ok("DELE 1").await;
    let idle_since = Instant::now();
    let reply = client.line().await;
    let idle = idle_since.elapsed();
    assert!(reply.starts_with("-ERR") && reply.contains("autologout"), "{reply}");
    assert!(idle >= Duration::from_secs(600), "logged out after {idle:?}, before RFC 1939's ten minutes");
    assert!(idle < Duration::from_secs(602), "logged out after {idle:?}");
    assert_eq!(client.line().await, "", "the connection is closed");
    assert_eq!(store.contents("alice").len(), 2, "an autologout never deletes");
    server.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn the_login_timeout_counts_from_the_connection_not_from_the_last_command() {
    let store = DemoStore::new();
    let server = start(&store).await;
    let connected = Instant::now();
    let mut client = Client::connect(&server).await;
    tokio::time::sleep(Duration::from_secs(50)).await;
    client.ok("USER alice").await;
    let reply = client.line().await;
    let waited = connected.elapsed();
    assert!(reply.starts_with("-ERR"), "{reply}");
    assert!((Duration::from_secs(60)..Duration::from_secs(62)).contains(&waited), "closed after {waited:?}");
    server.shutdown().await;
}
