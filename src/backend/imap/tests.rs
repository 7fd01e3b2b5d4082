//! The IMAP backend against a scripted server: exact command lines, and the
//! failure cases a real Dovecot will not produce on demand (stalls, dropped
//! streams, refusals with particular response codes).

use std::time::Duration;

use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::wire;
use super::*;
use crate::mail::Credentials;

/// One exchange: the server waits for a line containing `expect`, waits
/// `delay`, then writes `reply` with `{tag}` replaced by the line's tag.
/// `reply: None` stalls forever.
struct Step {
    expect: &'static str,
    delay: Duration,
    reply: Option<Vec<u8>>,
    /// The reply is written in these pieces (lengths; the rest after
    /// them), each flushed, 2 ms apart: how the reads split it.
    pieces: Vec<usize>,
    /// The connection is closed after the reply.
    close: bool,
}

fn step(expect: &'static str, reply: &str) -> Step {
    bytes_step(expect, reply.as_bytes())
}

fn bytes_step(expect: &'static str, reply: &[u8]) -> Step {
    Step { expect, delay: Duration::ZERO, reply: Some(reply.to_vec()), pieces: Vec::new(), close: false }
}

fn delayed(expect: &'static str, millis: u64, reply: &str) -> Step {
    Step { delay: Duration::from_millis(millis), ..step(expect, reply) }
}

fn stall(expect: &'static str) -> Step {
    Step { reply: None, ..step(expect, "") }
}

/// `{tag}` in `reply` replaced by `tag`.
fn tagged(reply: &[u8], tag: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(reply.len());
    let mut rest = reply;
    while !rest.is_empty() {
        if rest.starts_with(b"{tag}") {
            out.extend_from_slice(tag.as_bytes());
            rest = &rest[5..];
        } else {
            out.push(rest[0]);
            rest = &rest[1..];
        }
    }
    out
}

const GREETING: &str = "* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready\r\n";
const LOGIN_OK: &str = "{tag} OK [CAPABILITY IMAP4rev1 UIDPLUS MOVE] Logged in\r\n";
const SELECT_OK: &str = "* 2 EXISTS\r\n* OK [UIDVALIDITY 42] UIDs valid\r\n{tag} OK [READ-WRITE] Select completed\r\n";
const LIST_OK: &str =
    "* 1 FETCH (UID 3 RFC822.SIZE 6)\r\n* 2 FETCH (UID 9 RFC822.SIZE 3)\r\n{tag} OK Fetch completed\r\n";

/// Serves `steps` to one client; afterwards answers LOGOUT and refuses the
/// rest. Returns every line the client sent.
async fn mock(greeting: &'static str, steps: Vec<Step>) -> (u16, JoinHandle<Vec<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        let (read, mut write) = socket.into_split();
        let mut lines = BufReader::new(read).lines();
        let mut seen = Vec::new();
        write.write_all(greeting.as_bytes()).await.unwrap();
        for step in steps {
            let Ok(Some(line)) = lines.next_line().await else { return seen };
            seen.push(line.clone());
            assert!(line.contains(step.expect), "expected {:?}, got {line:?}", step.expect);
            let tag = line.split(' ').next().unwrap_or("").to_string();
            tokio::time::sleep(step.delay).await;
            match step.reply {
                Some(reply) => {
                    let reply = tagged(&reply, &tag);
                    let mut reply = &reply[..];
                    for &piece in &step.pieces {
                        let (now, later) = reply.split_at(piece.min(reply.len()));
                        if write.write_all(now).await.is_err() || write.flush().await.is_err() {
                            return seen;
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        reply = later;
                    }
                    if write.write_all(reply).await.is_err() {
                        return seen;
                    }
                    if step.close {
                        return seen;
                    }
                }
                None => std::future::pending::<()>().await,
            }
        }
        while let Ok(Some(line)) = lines.next_line().await {
            seen.push(line.clone());
            let tag = line.split(' ').next().unwrap_or("").to_string();
            let reply = if line.contains("LOGOUT") {
                format!("* BYE bye\r\n{tag} OK Logout completed\r\n")
            } else {
                format!("{tag} BAD unexpected\r\n")
            };
            if write.write_all(reply.as_bytes()).await.is_err() {
                break;
            }
        }
        seen
    });
    (port, server)
}

fn config(port: u16) -> ImapConfig {
    let mut config = ImapConfig::new("127.0.0.1", Some(port), ImapTls::None);
    config.fetch_chunk_bytes = 4;
    config.timeout_secs = 2;
    // Streamed one message at a time unless a test says otherwise.
    config.prefetch_bytes = 0;
    config
}

async fn open(config: ImapConfig, user: &str, password: &str) -> Result<Box<dyn Mailbox>, BackendError> {
    ImapBackend::new(config).unwrap().open(&Credentials::password(user, password)).await
}

fn opening(mut rest: Vec<Step>) -> Vec<Step> {
    let mut steps = vec![step("LOGIN \"alice\" \"a\\\"b\\\\c\"", LOGIN_OK), step("SELECT \"INBOX\"", SELECT_OK)];
    steps.append(&mut rest);
    steps
}

async fn collect(stream: MessageStream<'_>) -> Result<Vec<Bytes>, BackendError> {
    stream.collect::<Vec<_>>().await.into_iter().collect()
}

#[tokio::test]
async fn lists_and_streams_one_literal_per_message() {
    let (port, server) = mock(
        GREETING,
        opening(vec![
            step("UID FETCH 1:* (UID RFC822.SIZE)", LIST_OK),
            // An unsolicited flag change before and after is ignored.
            step(
                "UID FETCH 3 (UID BODY.PEEK[])",
                "* 2 FETCH (UID 9 FLAGS (\\Seen))\r\n* 1 FETCH (UID 3 BODY[] {6}\r\nab\r\ncd)\r\n\
                 * 2 FETCH (FLAGS (\\Seen))\r\n{tag} OK\r\n",
            ),
            // The UID may come after the literal.
            step("UID FETCH 9 (UID BODY.PEEK[])", "* 2 FETCH (BODY[] {4}\r\nwxyz UID 9)\r\n{tag} OK\r\n"),
            // A body as a quoted string.
            step("UID FETCH 9 (UID BODY.PEEK[])", "* 2 FETCH (UID 9 BODY[] \"xy\")\r\n{tag} OK\r\n"),
        ]),
    )
    .await;
    let mut mailbox = open(config(port), "alice", "a\"b\\c").await.unwrap();
    let listed = mailbox.list().await.unwrap();
    assert_eq!(
        listed,
        vec![
            ListedMessage { id: StoreId("3".into()), uidl: "000000030000002a".into(), size: ReportedSize::Claimed(6) },
            ListedMessage { id: StoreId("9".into()), uidl: "000000090000002a".into(), size: ReportedSize::Claimed(3) },
        ]
    );
    let chunks = collect(mailbox.fetch(&StoreId("3".into())).await.unwrap()).await.unwrap();
    assert_eq!(chunks.concat(), b"ab\r\ncd");
    let chunks = collect(mailbox.fetch(&StoreId("9".into())).await.unwrap()).await.unwrap();
    assert_eq!(chunks.concat(), b"wxyz");
    let chunks = collect(mailbox.fetch(&StoreId("9".into())).await.unwrap()).await.unwrap();
    assert_eq!(chunks.concat(), b"xy");
    mailbox.close().await;
    let seen = server.await.unwrap();
    assert!(seen.last().unwrap().ends_with("LOGOUT"), "{seen:?}");
}

/// The body of a FETCH names another message: the connection is given up.
#[tokio::test]
async fn another_messages_body_is_refused() {
    for reply in
        ["* 2 FETCH (UID 9 BODY[] {4}\r\nwxyz)\r\n{tag} OK\r\n", "* 2 FETCH (BODY[] {4}\r\nwxyz UID 9)\r\n{tag} OK\r\n"]
    {
        let (port, _server) = mock(GREETING, opening(vec![step("UID FETCH 3 (UID BODY.PEEK[])", reply)])).await;
        let mut mailbox = open(config(port), "alice", "a\"b\\c").await.unwrap();
        let result = match mailbox.fetch(&StoreId("3".into())).await {
            Ok(stream) => collect(stream).await,
            Err(e) => Err(e),
        };
        assert!(matches!(result, Err(BackendError::Unavailable(_))), "{reply:?}: {result:?}");
    }
}

/// A reply whose literal holds what looks like IMAP (a FETCH line, a
/// literal announcement, a tagged OK) and 8-bit text.
fn tricky_body() -> Vec<u8> {
    let mut body = b"Subject: x\r\n\r\n* 1 FETCH (UID 3 BODY[] {4}\r\nab)\r\nT9 OK done\r\n".to_vec();
    body.extend_from_slice("\u{2014}caf\u{e9} {2}\r\n)\r\n".as_bytes());
    body
}

fn tricky_reply(body: &[u8]) -> Vec<u8> {
    let mut reply = b"* 3 EXISTS\r\n* 1 FETCH (UID 3 BODY[] {".to_vec();
    reply.extend_from_slice(format!("{}}}\r\n", body.len()).as_bytes());
    reply.extend_from_slice(body);
    reply.extend_from_slice(b")\r\n* 2 FETCH (UID 9 FLAGS (\\Seen))\r\n{tag} OK Fetch completed\r\n");
    reply
}

/// However the server's reply is split into reads — at every octet, or in
/// pieces of any size — the streamed message is the literal's octets and
/// the connection goes on with the next command's reply.
#[tokio::test]
async fn the_literal_reader_is_exact_at_every_split_point_and_piece_size() {
    let body = tricky_body();
    let length = tagged(&tricky_reply(&body), "A0001").len();
    let mut splits: Vec<Vec<usize>> = (0..=length).map(|cut| vec![cut]).collect();
    for size in [1, 2, 3, 5, 7, 16, 64] {
        splits.push(vec![size; length / size + 1]);
    }
    for pieces in splits {
        let mut fetch = bytes_step("UID FETCH 3 (UID BODY.PEEK[])", &tricky_reply(&body));
        fetch.pieces = pieces.clone();
        let (port, server) =
            mock(GREETING, opening(vec![fetch, step("UID FETCH 1:* (UID RFC822.SIZE)", LIST_OK)])).await;
        let mut mailbox = open(config(port), "alice", "a\"b\\c").await.unwrap();
        let chunks = collect(mailbox.fetch(&StoreId("3".into())).await.unwrap()).await.unwrap();
        let shown = &pieces[..pieces.len().min(2)];
        assert_eq!(chunks.concat(), body, "pieces {shown:?}");
        assert_eq!(mailbox.list().await.unwrap().len(), 2, "pieces {shown:?}");
        mailbox.close().await;
        server.await.unwrap();
    }
}

/// A literal announced shorter or longer than the octets the server sends:
/// the stream ends in an error (never a clean end the POP3 side would
/// close with the terminating dot) and the connection is not used again.
#[tokio::test]
async fn a_literal_whose_announced_size_disagrees_ends_in_an_error() {
    // Shorter: the rest of the body is taken for the rest of the response.
    let short = "* 1 FETCH (UID 3 BODY[] {4}\r\nabcdef)\r\n{tag} OK\r\n";
    // Longer: the reader waits for octets that never come.
    let long = "* 1 FETCH (UID 3 BODY[] {40}\r\nabcdef)\r\n{tag} OK\r\n";
    for reply in [short, long] {
        let (port, _server) = mock(GREETING, opening(vec![step("UID FETCH 3 (UID BODY.PEEK[])", reply)])).await;
        let mut config = config(port);
        config.timeout_secs = 1;
        let mut mailbox = open(config, "alice", "a\"b\\c").await.unwrap();
        let result = match mailbox.fetch(&StoreId("3".into())).await {
            Ok(stream) => collect(stream).await,
            Err(e) => Err(e),
        };
        assert!(matches!(result, Err(BackendError::Unavailable(_))), "{reply:?}: {result:?}");
        assert!(matches!(mailbox.list().await, Err(BackendError::Unavailable(_))), "{reply:?}");
    }
}

/// The server goes away in the middle of a literal: an error, not a short
/// message.
#[tokio::test]
async fn a_connection_dropped_mid_literal_is_an_error() {
    let mut fetch = step("UID FETCH 3 (UID BODY.PEEK[])", "* 1 FETCH (UID 3 BODY[] {10}\r\nabcd");
    fetch.close = true;
    let (port, _server) = mock(GREETING, opening(vec![fetch])).await;
    let mut mailbox = open(config(port), "alice", "a\"b\\c").await.unwrap();
    let result = match mailbox.fetch(&StoreId("3".into())).await {
        Ok(stream) => collect(stream).await,
        Err(e) => Err(e),
    };
    assert!(matches!(result, Err(BackendError::Unavailable(_))), "{result:?}");
    assert!(matches!(mailbox.list().await, Err(BackendError::Unavailable(_))));
}

fn big_reply(uid: u32, size: usize) -> (Vec<u8>, Vec<u8>) {
    let body: Vec<u8> = (0..size).map(|i| b"abcdefghij\r\n"[i % 12]).collect();
    let mut reply = format!("* 1 FETCH (UID {uid} BODY[] {{{size}}}\r\n").into_bytes();
    reply.extend_from_slice(&body);
    reply.extend_from_slice(b")\r\n{tag} OK\r\n");
    (body, reply)
}

/// TOP stops reading mid-literal: the rest is read away before the next
/// command, whose reply is then its own.
#[tokio::test]
async fn a_top_that_drops_the_stream_leaves_the_connection_usable() {
    let (body, reply) = big_reply(3, 1 << 20);
    let (port, server) = mock(
        GREETING,
        opening(vec![
            bytes_step("UID FETCH 3 (UID BODY.PEEK[])", &reply),
            step("UID FETCH 1:* (UID RFC822.SIZE)", LIST_OK),
        ]),
    )
    .await;
    let mut mailbox = open(config(port), "alice", "a\"b\\c").await.unwrap();
    {
        let mut stream = mailbox.fetch(&StoreId("3".into())).await.unwrap();
        let first = stream.next().await.unwrap().unwrap();
        assert!(first.len() < body.len() && body.starts_with(&first));
    }
    let listed = mailbox.list().await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].size, ReportedSize::Claimed(6));
    mailbox.close().await;
    server.await.unwrap();
}

/// A literal abandoned midway whose rest does not come within the command
/// timeout: the connection is given up (the next call is `Unavailable`),
/// never read on from the middle.
#[tokio::test]
async fn an_abandoned_literal_that_stalls_discards_the_connection() {
    let (_, reply) = big_reply(3, 1 << 20);
    // 400 000 of the literal's octets, then nothing.
    let fetch = bytes_step("UID FETCH 3 (UID BODY.PEEK[])", &reply[..400_000]);
    let (port, _server) = mock(GREETING, opening(vec![fetch, stall("UID FETCH 1:*")])).await;
    let mut config = config(port);
    config.timeout_secs = 1;
    let mut mailbox = open(config, "alice", "a\"b\\c").await.unwrap();
    {
        let mut stream = mailbox.fetch(&StoreId("3".into())).await.unwrap();
        stream.next().await.unwrap().unwrap();
    }
    let started = std::time::Instant::now();
    assert!(matches!(mailbox.list().await, Err(BackendError::Unavailable(_))));
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// A server gone away is not served from what was fetched ahead.
#[tokio::test]
async fn prefetched_messages_are_not_served_once_the_server_closed_the_connection() {
    let mut batch = step(
        "UID FETCH 3,9 (UID BODY.PEEK[])",
        "* 1 FETCH (UID 3 BODY[] {6}\r\nab\r\ncd)\r\n* 2 FETCH (UID 9 BODY[] {3}\r\nxyz)\r\n{tag} OK\r\n\
         * BYE shutting down\r\n",
    );
    batch.close = true;
    let (port, _server) = mock(GREETING, opening(vec![step("UID FETCH 1:* (UID RFC822.SIZE)", LIST_OK), batch])).await;
    let mut config = config(port);
    config.prefetch_bytes = 8192;
    let mut mailbox = open(config, "alice", "a\"b\\c").await.unwrap();
    mailbox.list().await.unwrap();
    assert_eq!(fetched(&mut mailbox, "3").await, b"ab\r\ncd");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(matches!(mailbox.fetch(&StoreId("9".into())).await.err(), Some(BackendError::Unavailable(_))));
}

/// A fetch abandoned before its literal started (its reply would be read
/// away whole, in memory): the connection is given up.
#[tokio::test]
async fn a_fetch_abandoned_before_its_literal_came_discards_the_connection() {
    let (_, reply) = big_reply(3, 600_000);
    let reply = String::from_utf8(reply).unwrap();
    let (port, server) = mock(
        GREETING,
        opening(vec![
            // The reader gives up before this reply arrives.
            delayed("UID FETCH 3 (UID BODY.PEEK[])", 300, &reply),
            step("UID FETCH 1:* (UID RFC822.SIZE)", LIST_OK),
        ]),
    )
    .await;
    let mut mailbox = open(config(port), "alice", "a\"b\\c").await.unwrap();
    assert!(tokio::time::timeout(Duration::from_millis(50), mailbox.fetch(&StoreId("3".into()))).await.is_err());
    assert!(matches!(mailbox.list().await, Err(BackendError::Unavailable(_))));
    drop(mailbox);
    server.await.unwrap();
}

/// A chunk whose 0x80 may stand for a NUL, on a server with BINARY: the
/// literal is read away and the message fetched again in partial FETCHes
/// from that chunk on, where BINARY[] restores the NUL.
#[tokio::test]
async fn a_nul_in_a_streamed_message_is_restored_with_binary() {
    const LOGIN_BINARY: &str = "{tag} OK [CAPABILITY IMAP4rev1 UIDPLUS MOVE BINARY] Logged in\r\n";
    let (port, server) = mock(
        GREETING,
        vec![
            step("LOGIN", LOGIN_BINARY),
            step("SELECT \"INBOX\"", SELECT_OK),
            bytes_step("UID FETCH 3 (UID BODY.PEEK[])", b"* 1 FETCH (UID 3 BODY[] {6}\r\nab\x80cd\n)\r\n{tag} OK\r\n"),
            bytes_step(
                "UID FETCH 3 (UID BODY.PEEK[]<0.4>)",
                b"* 1 FETCH (UID 3 BODY[]<0> {4}\r\nab\x80c)\r\n{tag} OK\r\n",
            ),
            bytes_step(
                "UID FETCH 3 (UID BINARY.PEEK[]<0.4>)",
                b"* 1 FETCH (UID 3 BINARY[]<0> ~{4}\r\nab\0c)\r\n{tag} OK\r\n",
            ),
            bytes_step("UID FETCH 3 (UID BODY.PEEK[]<4.4>)", b"* 1 FETCH (UID 3 BODY[]<4> {2}\r\nd\n)\r\n{tag} OK\r\n"),
            // Still in step: the next command gets its own reply.
            step("UID FETCH 1:* (UID RFC822.SIZE)", LIST_OK),
        ],
    )
    .await;
    let mut mailbox = open(config(port), "alice", "x").await.unwrap();
    let chunks = collect(mailbox.fetch(&StoreId("3".into())).await.unwrap()).await.unwrap();
    assert_eq!(chunks.concat(), b"ab\0cd\n");
    assert_eq!(mailbox.list().await.unwrap().len(), 2);
    mailbox.close().await;
    server.await.unwrap();
}

async fn fetched(mailbox: &mut Box<dyn Mailbox>, uid: &str) -> Vec<u8> {
    collect(mailbox.fetch(&StoreId(uid.into())).await.unwrap()).await.unwrap().concat()
}

/// With prefetch on, the first RETR fetches the next small messages in the
/// same command (PEEK: nothing marked read); the next RETR is served from
/// them without a command, byte for byte, and a message not in the batch
/// is streamed as usual.
#[tokio::test]
async fn small_messages_are_fetched_ahead_in_one_command() {
    let list = "* 1 FETCH (UID 3 RFC822.SIZE 6)\r\n* 2 FETCH (UID 9 RFC822.SIZE 3)\r\n\
                * 3 FETCH (UID 12 RFC822.SIZE 5000)\r\n{tag} OK\r\n";
    let (port, server) = mock(
        GREETING,
        opening(vec![
            step("UID FETCH 1:* (UID RFC822.SIZE)", list),
            step(
                "UID FETCH 3,9 (UID BODY.PEEK[])",
                "* 1 FETCH (UID 3 BODY[] {6}\r\nab\r\ncd)\r\n* 2 FETCH (UID 9 BODY[] {3}\r\nxyz)\r\n{tag} OK\r\n",
            ),
            step("UID FETCH 12 (UID BODY.PEEK[])", "* 3 FETCH (UID 12 BODY[] {2}\r\nok)\r\n{tag} OK\r\n"),
        ]),
    )
    .await;
    let mut config = config(port);
    config.prefetch_bytes = 8192;
    let mut mailbox = open(config, "alice", "a\"b\\c").await.unwrap();
    mailbox.list().await.unwrap();
    assert_eq!(fetched(&mut mailbox, "3").await, b"ab\r\ncd");
    assert_eq!(fetched(&mut mailbox, "9").await, b"xyz");
    assert_eq!(fetched(&mut mailbox, "3").await, b"ab\r\ncd");
    // Over a quarter of the bound: alone.
    assert_eq!(fetched(&mut mailbox, "12").await, b"ok");
    mailbox.close().await;
    let seen = server.await.unwrap();
    assert_eq!(seen.iter().filter(|l| l.contains("UID FETCH")).count(), 3, "{seen:?}");
    assert!(seen.iter().all(|l| !l.contains("BODY[") || l.contains("BODY.PEEK[")), "{seen:?}");
}

/// A refused batch (a message of it expunged meanwhile, say) is not used:
/// the message asked for is fetched alone.
#[tokio::test]
async fn a_refused_prefetch_falls_back_to_the_message_alone() {
    let (port, server) = mock(
        GREETING,
        opening(vec![
            step("UID FETCH 1:* (UID RFC822.SIZE)", LIST_OK),
            step(
                "UID FETCH 3,9 (UID BODY.PEEK[])",
                "* 1 FETCH (UID 3 BODY[] {6}\r\nab\r\ncd)\r\n{tag} NO [EXPUNGEISSUED] Some messages are gone\r\n",
            ),
            step("UID FETCH 3 (UID BODY.PEEK[])", "* 1 FETCH (UID 3 BODY[] {6}\r\nab\r\ncd)\r\n{tag} OK\r\n"),
        ]),
    )
    .await;
    let mut config = config(port);
    config.prefetch_bytes = 8192;
    let mut mailbox = open(config, "alice", "a\"b\\c").await.unwrap();
    mailbox.list().await.unwrap();
    assert_eq!(fetched(&mut mailbox, "3").await, b"ab\r\ncd");
    mailbox.close().await;
    server.await.unwrap();
}

#[test]
fn prefetch_bytes_is_bounded() {
    let mut config = ImapConfig::new("h", None, ImapTls::None);
    for ok in [0, 4 << 20, 64 << 20] {
        config.prefetch_bytes = ok;
        assert!(config.check().is_ok(), "{ok}");
    }
    config.prefetch_bytes = (64 << 20) + 1;
    assert!(config.check().is_err());
}

#[test]
fn an_incomplete_utf8_sequence_at_a_chunk_end_is_held() {
    assert_eq!(incomplete_utf8_tail(b"ab"), 0);
    assert_eq!(incomplete_utf8_tail("a\u{2014}".as_bytes()), 0);
    assert_eq!(incomplete_utf8_tail(&"a\u{2014}".as_bytes()[..3]), 2);
    assert_eq!(incomplete_utf8_tail(&"a\u{2014}".as_bytes()[..2]), 1);
    assert_eq!(incomplete_utf8_tail(&"\u{1F600}".as_bytes()[..3]), 3);
    assert_eq!(incomplete_utf8_tail(b"a\x80"), 0);
}

#[tokio::test]
async fn a_timeout_poisons_the_connection() {
    let (port, _server) = mock(GREETING, opening(vec![stall("UID FETCH 1:*")])).await;
    let mut config = config(port);
    config.timeout_secs = 1;
    let mut mailbox = open(config, "alice", "a\"b\\c").await.unwrap();
    let started = std::time::Instant::now();
    assert!(matches!(mailbox.list().await, Err(BackendError::Unavailable(_))));
    assert!(started.elapsed() < Duration::from_secs(3));
    // Later calls fail at once, without touching the connection.
    let started = std::time::Instant::now();
    assert!(matches!(mailbox.fetch(&StoreId("3".into())).await, Err(BackendError::Unavailable(_))));
    assert!(matches!(mailbox.remove(&[StoreId("3".into())]).await, Err(BackendError::Unavailable(_))));
    assert!(started.elapsed() < Duration::from_millis(100));
    mailbox.close().await;
}

#[tokio::test]
async fn opening_times_out() {
    let (port, _server) = mock(GREETING, vec![stall("LOGIN")]).await;
    let mut config = config(port);
    config.timeout_secs = 1;
    let started = std::time::Instant::now();
    assert!(matches!(open(config, "alice", "x").await, Err(BackendError::Unavailable(_))));
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn vanished_messages_are_gone() {
    let (port, _server) = mock(
        GREETING,
        opening(vec![
            step("UID FETCH 3 (UID BODY.PEEK[])", "{tag} OK Fetch completed\r\n"),
            step(
                "UID FETCH 9 (UID BODY.PEEK[])",
                "{tag} NO [EXPUNGEISSUED] Some of the requested messages no longer exist\r\n",
            ),
            step("UID FETCH 1:* (UID RFC822.SIZE)", LIST_OK),
        ]),
    )
    .await;
    let mut mailbox = open(config(port), "alice", "a\"b\\c").await.unwrap();
    assert!(matches!(mailbox.fetch(&StoreId("3".into())).await.err(), Some(BackendError::MessageGone)));
    assert!(matches!(mailbox.fetch(&StoreId("9".into())).await.err(), Some(BackendError::MessageGone)));
    assert!(matches!(mailbox.fetch(&StoreId("x".into())).await.err(), Some(BackendError::MessageGone)));
    // Still usable.
    assert_eq!(mailbox.list().await.unwrap().len(), 2);
}

#[tokio::test]
async fn login_refusals_map_to_backend_errors() {
    type Expected = fn(&BackendError) -> bool;
    let cases: [(&str, Expected); 4] = [
        ("{tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n", |e| matches!(e, BackendError::AuthFailed)),
        ("{tag} NO [UNAVAILABLE] Temporary authentication failure.\r\n", |e| matches!(e, BackendError::Unavailable(_))),
        (
            "{tag} NO [LIMIT] Maximum number of connections from user+IP exceeded (mail_max_userip_connections=10)\r\n",
            |e| matches!(e, BackendError::InUse(_)),
        ),
        ("* BYE going away\r\n", |e| matches!(e, BackendError::Unavailable(_))),
    ];
    for (reply, expected) in cases {
        let (port, _server) = mock(GREETING, vec![step("LOGIN", reply)]).await;
        let error = open(config(port), "alice", "secret").await.err().unwrap();
        assert!(expected(&error), "{reply:?} gave {error:?}");
    }
}

#[tokio::test]
async fn bad_credentials_never_reach_the_server() {
    let (port, server) = mock(GREETING, vec![]).await;
    let error = open(config(port), "alice", "pass\r\nA1 DELETE INBOX").await.err().unwrap();
    assert!(matches!(error, BackendError::BadCredentials(_)), "{error:?}");
    // Refused before even connecting.
    assert!(tokio::time::timeout(Duration::from_millis(100), server).await.is_err());
}

#[tokio::test]
async fn non_ascii_credentials_use_authenticate_plain() {
    use base64::Engine as _;
    let expected = base64::engine::general_purpose::STANDARD.encode("\0jürgen\0pässwörd€");
    let expected: &'static str = Box::leak(expected.into_boxed_str());
    let (port, server) = mock(
        GREETING,
        vec![
            step("AUTHENTICATE PLAIN", "+ \r\n"),
            // The SASL response line has no tag: AUTHENTICATE was the first
            // command, A0001.
            step(expected, "A0001 OK Logged in\r\n"),
            step("CAPABILITY", "* CAPABILITY IMAP4rev1 UIDPLUS\r\n{tag} OK done\r\n"),
            step("SELECT \"INBOX\"", SELECT_OK),
        ],
    )
    .await;
    let mailbox = open(config(port), "jürgen", "pässwörd€").await.unwrap();
    mailbox.close().await;
    let seen = server.await.unwrap();
    assert!(!seen.iter().any(|l| l.contains("LOGIN")), "{seen:?}");
}

#[tokio::test]
async fn preauth_and_bye_greetings_are_refused() {
    let (port, _server) = mock("* PREAUTH [CAPABILITY IMAP4rev1] logged in as someone\r\n", vec![]).await;
    assert!(matches!(open(config(port), "alice", "x").await.err(), Some(BackendError::Permanent(_))));
    let (port, _server) = mock("* BYE Too many connections\r\n", vec![]).await;
    assert!(matches!(open(config(port), "alice", "x").await.err(), Some(BackendError::Unavailable(_))));
}

#[tokio::test]
async fn starttls_refused_is_unavailable() {
    let (port, server) = mock(GREETING, vec![step("STARTTLS", "{tag} BAD STARTTLS not supported\r\n")]).await;
    let mut config = config(port);
    config.tls = ImapTls::Starttls;
    let error = open(config, "alice", "secret").await.err().unwrap();
    assert!(matches!(error, BackendError::Unavailable(_)), "{error:?}");
    // No credentials went out in clear text.
    assert!(!server.await.unwrap().iter().any(|l| l.contains("LOGIN") || l.contains("AUTHENTICATE")));
}

#[tokio::test]
async fn missing_mailbox_is_permanent() {
    let (port, _server) = mock(
        GREETING,
        vec![
            step("LOGIN", LOGIN_OK),
            step("SELECT \"Print Queue\"", "{tag} NO [NONEXISTENT] Mailbox doesn't exist\r\n"),
        ],
    )
    .await;
    let mut config = config(port);
    config.mailbox = "Print Queue".into();
    assert!(matches!(open(config, "alice", "x").await.err(), Some(BackendError::Permanent(_))));
}

#[tokio::test]
async fn remove_expunges_exactly_the_given_uids_and_verifies() {
    let (port, server) = mock(
        GREETING,
        opening(vec![
            // UIDVALIDITY is checked again before anything is flagged.
            step("SELECT \"INBOX\"", SELECT_OK),
            step("UID STORE 1:3,7 +FLAGS.SILENT (\\Deleted)", "{tag} OK Store completed\r\n"),
            step(
                "UID EXPUNGE 1:3,7",
                "* 3 EXPUNGE\r\n* 2 EXPUNGE\r\n* 1 EXPUNGE\r\n* 1 EXPUNGE\r\n{tag} OK Expunge completed\r\n",
            ),
            step("UID SEARCH UID 1:3,7", "* SEARCH\r\n{tag} OK Search completed\r\n"),
            step("SELECT \"INBOX\"", SELECT_OK),
            step("UID STORE 5 +FLAGS.SILENT (\\Deleted)", "{tag} OK Store completed\r\n"),
            step("UID EXPUNGE 5", "{tag} OK Expunge completed\r\n"),
            // Another client's EXPUNGE response does not fool the check.
            step("UID SEARCH UID 5", "* SEARCH 5\r\n{tag} OK Search completed\r\n"),
        ]),
    )
    .await;
    let mut mailbox = open(config(port), "alice", "a\"b\\c").await.unwrap();
    let ids: Vec<StoreId> = ["7", "2", "1", "3"].iter().map(|s| StoreId(s.to_string())).collect();
    mailbox.remove(&ids).await.unwrap();
    assert!(matches!(mailbox.remove(&[StoreId("5".into())]).await, Err(BackendError::Unavailable(_))));
    mailbox.close().await;
    let seen = server.await.unwrap();
    assert!(!seen.iter().any(|l| l.ends_with(" EXPUNGE")), "bare EXPUNGE sent: {seen:?}");
}

/// A UIDVALIDITY that changed since the listing means the marked UIDs may
/// name other messages: nothing is flagged, and the error is temporary.
#[tokio::test]
async fn remove_refuses_when_uidvalidity_changed() {
    let (port, server) = mock(
        GREETING,
        opening(vec![step(
            "SELECT \"INBOX\"",
            "* 2 EXISTS\r\n* OK [UIDVALIDITY 43] UIDs valid\r\n{tag} OK [READ-WRITE] Select completed\r\n",
        )]),
    )
    .await;
    let mut mailbox = open(config(port), "alice", "a\"b\\c").await.unwrap();
    let error = mailbox.remove(&[StoreId("3".into())]).await.err();
    assert!(matches!(&error, Some(BackendError::Unavailable(why)) if why.contains("UIDVALIDITY")), "{error:?}");
    mailbox.close().await;
    let seen = server.await.unwrap();
    assert!(!seen.iter().any(|l| l.contains("STORE") || l.contains("EXPUNGE") || l.contains("MOVE")), "{seen:?}");
}

#[tokio::test]
async fn remove_without_uidplus_moves_to_trash_or_refuses() {
    let login = "{tag} OK [CAPABILITY IMAP4rev1 MOVE] Logged in\r\n";
    // With a trash mailbox configured and listed: UID MOVE there.
    let (port, _server) = mock(
        GREETING,
        vec![
            step("LOGIN", login),
            step("SELECT", SELECT_OK),
            step(
                "LIST \"\" \"*\"",
                "* LIST (\\HasNoChildren) \"/\" INBOX\r\n* LIST (\\HasNoChildren) \"/\" \"Deleted Items\"\r\n{tag} OK\r\n",
            ),
            step("SELECT", SELECT_OK),
            step("UID MOVE 4 \"Deleted Items\"", "{tag} OK Move completed\r\n"),
            step("UID SEARCH UID 4", "* SEARCH\r\n{tag} OK\r\n"),
        ],
    )
    .await;
    let mut with_trash = config(port);
    with_trash.trash_mailbox = Some("Deleted Items".into());
    let mut mailbox = open(with_trash, "alice", "x").await.unwrap();
    mailbox.remove(&[StoreId("4".into())]).await.unwrap();
    mailbox.close().await;

    // Without one, and none the server names: refused, and nothing moved.
    let (port, server) = mock(
        GREETING,
        vec![
            step("LOGIN", login),
            step("SELECT", SELECT_OK),
            step("LIST \"\" \"*\"", "* LIST (\\HasNoChildren) \"/\" INBOX\r\n{tag} OK\r\n"),
        ],
    )
    .await;
    let mut mailbox = open(config(port), "alice", "x").await.unwrap();
    let error = mailbox.remove(&[StoreId("4".into())]).await.err().unwrap();
    assert!(
        matches!(&error, BackendError::Permanent(why) if why.contains("UIDPLUS") && why.contains("INBOX")),
        "{error:?}"
    );
    mailbox.close().await;
    let seen = server.await.unwrap();
    assert_eq!(seen.len(), 4, "{seen:?}"); // LOGIN, SELECT, LIST, LOGOUT
}

#[tokio::test]
async fn the_servers_special_use_trash_comes_before_the_configured_name() {
    let login = "{tag} OK [CAPABILITY IMAP4rev1 MOVE SPECIAL-USE] Logged in\r\n";
    let (port, _server) = mock(
        GREETING,
        vec![
            step("LOGIN", login),
            step("SELECT", SELECT_OK),
            step(
                "LIST \"\" \"*\" RETURN (SPECIAL-USE)",
                "* LIST (\\HasChildren) \".\" INBOX\r\n* LIST (\\HasNoChildren) \".\" Trash\r\n\
                 * LIST (\\HasNoChildren \\Trash) \".\" \"INBOX.Gel&APY-scht\"\r\n{tag} OK\r\n",
            ),
            step("SELECT", SELECT_OK),
            step("UID MOVE 4 \"INBOX.Gel&APY-scht\"", "{tag} OK Move completed\r\n"),
            step("UID SEARCH UID 4", "* SEARCH\r\n{tag} OK\r\n"),
        ],
    )
    .await;
    let mut config = config(port);
    config.trash_mailbox = Some("Trash".into());
    let mut mailbox = open(config, "alice", "x").await.unwrap();
    mailbox.remove(&[StoreId("4".into())]).await.unwrap();
    mailbox.close().await;
}

#[test]
fn a_configured_trash_is_found_as_given_or_inside_the_personal_namespace() {
    let listed = |entries: &[(&str, bool)], delimiter: &str| -> Vec<ListedMailbox> {
        entries
            .iter()
            .map(|(name, trash)| ListedMailbox {
                name: name.to_string(),
                delimiter: Some(delimiter.to_string()),
                trash: *trash,
                archive: false,
                selectable: true,
            })
            .collect()
    };
    // Cyrus without altnamespace: everything under INBOX.
    let cyrus = listed(&[("INBOX", false), ("INBOX.Trash", false), ("INBOX.Sent", false)], ".");
    assert_eq!(choose_trash(&cyrus, Some("Trash")).as_deref(), Some("INBOX.Trash"));
    assert_eq!(choose_trash(&cyrus, Some("Junk")), None);
    assert_eq!(choose_trash(&cyrus, None), None);
    // Nested, with `/` in the configuration and `.` on the server.
    let nested = listed(&[("INBOX", false), ("INBOX.Old.Trash", false)], ".");
    assert_eq!(choose_trash(&nested, Some("Old/Trash")).as_deref(), Some("INBOX.Old.Trash"));
    // As given first; non-ASCII names compared in modified UTF-7.
    let dovecot = listed(&[("INBOX", false), ("Papierkorb", false), ("Gel&APY-scht", false)], "/");
    assert_eq!(choose_trash(&dovecot, Some("Gelöscht")).as_deref(), Some("Gel&APY-scht"));
    // The server's \Trash wins over any configured name.
    let marked = listed(&[("INBOX", false), ("Trash", false), ("Deleted Items", true)], "/");
    assert_eq!(choose_trash(&marked, Some("Trash")).as_deref(), Some("Deleted Items"));
}

#[tokio::test]
async fn canonical_sizes_batch_small_messages() {
    let (port, server) = mock(
        GREETING,
        opening(vec![
            step("UID FETCH 1:* (UID RFC822.SIZE)", LIST_OK),
            // Bare LF and a missing final line end: canonical sizes differ
            // from the stored octets.
            step(
                "UID FETCH 3,9 (UID BODY.PEEK[])",
                "* 1 FETCH (UID 3 BODY[] {6}\r\na\nb\ncd)\r\n* 2 FETCH (UID 9 BODY[] {3}\r\nxyz)\r\n{tag} OK\r\n",
            ),
        ]),
    )
    .await;
    let mut mailbox = open(config(port), "alice", "a\"b\\c").await.unwrap();
    mailbox.list().await.unwrap();
    let sizes = mailbox.canonical_sizes(&[StoreId("9".into()), StoreId("3".into())]).await.unwrap();
    assert_eq!(sizes, [Some(5), Some(10)]);
    mailbox.close().await;
    server.await.unwrap();
}

/// A message expunged by another client between the listing and the
/// measuring is left out (`None`), not a failed login.
#[tokio::test]
async fn a_message_expunged_before_measuring_is_left_out() {
    let (port, server) = mock(
        GREETING,
        opening(vec![
            step("UID FETCH 1:* (UID RFC822.SIZE)", LIST_OK),
            step("UID FETCH 3,9 (UID BODY.PEEK[])", "* 1 FETCH (UID 3 BODY[] {6}\r\na\nb\ncd)\r\n{tag} OK\r\n"),
        ]),
    )
    .await;
    let mut mailbox = open(config(port), "alice", "a\"b\\c").await.unwrap();
    mailbox.list().await.unwrap();
    let sizes = mailbox.canonical_sizes(&[StoreId("9".into()), StoreId("3".into())]).await.unwrap();
    assert_eq!(sizes, [None, Some(10)]);
    mailbox.close().await;
    server.await.unwrap();
}

#[tokio::test]
async fn unreadable_ca_file_is_permanent() {
    let mut config = ImapConfig::new("imap.example.com", None, ImapTls::Implicit);
    config.ca_file = Some("/nonexistent/ca.pem".into());
    assert!(matches!(ImapBackend::new(config).err(), Some(BackendError::Permanent(_))));
    assert!(ImapBackend::new(ImapConfig::new("imap.example.com", None, ImapTls::Implicit)).is_ok());
}

#[tokio::test]
async fn logindisabled_in_clear_text_sends_no_credentials() {
    // Cyrus 3.6.1 with `allowplaintext: no` greets so.
    const CYRUS: &str = "* OK [CAPABILITY IMAP4rev1 LITERAL+ ID ENABLE LOGINDISABLED] localhost Cyrus IMAP ready\r\n";
    for password in ["secret", "sécret"] {
        let (port, server) = mock(CYRUS, vec![]).await;
        let error = open(config(port), "alice", password).await.err().unwrap();
        assert!(
            matches!(&error, BackendError::Permanent(why) if why.contains(wire::TLS_REQUIRED)),
            "{password}: {error:?}"
        );
        let seen = server.await.unwrap();
        assert!(seen.is_empty(), "{seen:?}");
    }
    // A greeting without capabilities: asked for before any credential.
    let (port, server) =
        mock("* OK ready\r\n", vec![step("C0 CAPABILITY", "* CAPABILITY IMAP4rev1 LOGINDISABLED\r\nC0 OK done\r\n")])
            .await;
    let error = open(config(port), "alice", "secret").await.err().unwrap();
    assert!(matches!(&error, BackendError::Permanent(why) if why.contains(wire::TLS_REQUIRED)), "{error:?}");
    assert_eq!(server.await.unwrap(), ["C0 CAPABILITY"]);
}

#[tokio::test]
async fn a_suggested_backoff_keeps_the_account_away_from_the_server() {
    // Exchange Online's wording (issue #19).
    let (port, server) = mock(
        GREETING,
        vec![step("LOGIN", "{tag} BAD Request is throttled. Suggested Backoff Time: 60000 milliseconds\r\n")],
    )
    .await;
    let backend = ImapBackend::new(config(port)).unwrap();
    let alice = Credentials::password("alice", "secret");
    let error = backend.open(&alice).await.err().unwrap();
    assert!(matches!(error, BackendError::Unavailable(_)), "{error:?}");
    // Within the minute: refused at once, without a connection.
    let error = backend.open(&alice).await.err().unwrap();
    assert!(matches!(&error, BackendError::Unavailable(why) if why.contains("backoff")), "{error:?}");
    assert_eq!(server.await.unwrap().len(), 1, "the server was called again");
    // Another account of the same server is not held back (it connects,
    // and finds nobody listening).
    let error = backend.open(&Credentials::password("bob", "secret")).await.err().unwrap();
    assert!(matches!(&error, BackendError::Unavailable(why) if !why.contains("backoff")), "{error:?}");
}

#[test]
fn only_0x80_outside_well_formed_utf8_may_stand_for_a_nul() {
    assert!(!stray_0x80(b"plain ASCII"));
    assert!(!stray_0x80("em dash \u{2014}, quote \u{2019}, \u{0440}".as_bytes()));
    assert!(stray_0x80(b"before\x80after"));
    assert!(stray_0x80(b"\xe2\x80\x94 valid, then \x80"));
    assert!(stray_0x80(b"latin-1 \xe9\x80"));
    // A chunk cut inside a character may start or end with 0x80.
    assert!(stray_0x80(b"\x80\x94 rest"));
    assert!(!stray_0x80(b"\xff no 0x80 at all"));
}

#[test]
fn binary_replaces_body_only_where_it_differs_by_nuls() {
    assert!(only_nuls_differ(b"a\x80b\x80", b"a\0b\x80"));
    assert!(!only_nuls_differ(b"a\x80b", b"a\x80b"), "no NUL: nothing to gain");
    assert!(!only_nuls_differ(b"a\x80b", b"a\0c"));
    assert!(!only_nuls_differ(b"a\x80b", b"a\0"));
    assert!(!only_nuls_differ(b"abc", b"a\0c"), "NUL where BODY[] had no 0x80");
}

/// `reuse_check = "noop"`: a reset is one NOOP while the server announces
/// nothing; a UIDVALIDITY the server announces in the NOOP's responses is
/// adopted only through a SELECT, and the default reset is a SELECT.
#[tokio::test]
async fn a_noop_reset_selects_again_when_the_server_announces_another_uidvalidity() {
    let (port, server) = mock(
        GREETING,
        opening(vec![
            step("NOOP", "* 3 EXISTS\r\n{tag} OK NOOP completed\r\n"),
            step("NOOP", "* OK [UIDVALIDITY 43] UIDs renumbered\r\n{tag} OK NOOP completed\r\n"),
            step("SELECT \"INBOX\"", "* 1 EXISTS\r\n* OK [UIDVALIDITY 43] UIDs valid\r\n{tag} OK Select completed\r\n"),
        ]),
    )
    .await;
    let mut noop = config(port);
    noop.reuse_check = ReuseCheck::Noop;
    let mut mailbox = open(noop, "alice", "a\"b\\c").await.unwrap();
    assert_eq!(mailbox.validity(), Some(42));
    mailbox.reset().await.unwrap();
    assert_eq!(mailbox.validity(), Some(42), "nothing announced: the view is kept");
    mailbox.reset().await.unwrap();
    assert_eq!(mailbox.validity(), Some(43), "the announced UIDVALIDITY adopted by a SELECT");
    drop(mailbox);
    let sent = server.await.unwrap();
    let commands: Vec<&str> = sent.iter().filter_map(|line| line.split(' ').nth(1)).collect();
    assert_eq!(commands[..5], ["LOGIN", "SELECT", "NOOP", "NOOP", "SELECT"]);

    // The default: a SELECT every time.
    let (port, server) = mock(GREETING, opening(vec![step("SELECT \"INBOX\"", SELECT_OK)])).await;
    let mut mailbox = open(config(port), "alice", "a\"b\\c").await.unwrap();
    mailbox.reset().await.unwrap();
    drop(mailbox);
    let sent = server.await.unwrap();
    assert_eq!(sent.iter().filter(|line| line.contains(" SELECT ")).count(), 2);
    assert!(!sent.iter().any(|line| line.contains("NOOP")));
}
