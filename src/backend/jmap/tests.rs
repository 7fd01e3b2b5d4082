//! Unit tests of the JMAP backend: pure helpers, and whole flows against a
//! fake JMAP server on loopback that answers what each test scripts —
//! including the failures a real server rarely shows on demand (401, 503,
//! silence, method errors, partial `Email/set` refusals, 404 downloads).

use super::*;
use std::sync::Mutex;

#[test]
fn uidls_are_ids_when_they_fit() {
    assert_eq!(uidl_for("Mf179c835567e0122de78e6a7"), "Mf179c835567e0122de78e6a7");
    let long = "x".repeat(71);
    for odd in [long.as_str(), "", "with space", "caf\u{e9}"] {
        let uidl = uidl_for(odd);
        assert_eq!(uidl.len(), 65, "{odd:?} → {uidl}");
        assert!(uidl.starts_with('h') && uidl[1..].bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(uidl, uidl_for(odd), "stable");
    }
    assert_ne!(uidl_for(&"x".repeat(71)), uidl_for(&"x".repeat(72)));
}

#[test]
fn session_urls() {
    let url = |u: &str| JmapConfig::new(u).session_url();
    assert_eq!(url("http://127.0.0.1:8080").unwrap().as_str(), "http://127.0.0.1:8080/.well-known/jmap");
    assert_eq!(url("https://mail.example.com/").unwrap().as_str(), "https://mail.example.com/.well-known/jmap");
    assert_eq!(url("https://api.fastmail.com/jmap/session").unwrap().as_str(), "https://api.fastmail.com/jmap/session");
    for bad in ["ftp://x/", "http://u:p@host/", "nothing", "http://"] {
        assert!(url(bad).is_err(), "{bad}");
    }
}

#[test]
fn config_defaults_and_checks() {
    let config: JmapConfig = toml::from_str("url = \"https://mail.example.com\"").unwrap();
    assert_eq!(config, JmapConfig::new("https://mail.example.com"));
    assert_eq!((config.auth, config.delete_policy, config.timeout_secs), (JmapAuth::Basic, DeletePolicy::Trash, 30));
    let full: JmapConfig = toml::from_str(
        "url = \"https://h/jmap\"\nmailbox = \"Print\"\nauth = \"bearer\"\ntimeout_secs = 5\n\
         delete_policy = \"destroy\"\nca_file = \"/etc/ca.pem\"",
    )
    .unwrap();
    assert_eq!(
        (full.auth, full.delete_policy, full.mailbox.as_deref()),
        (JmapAuth::Bearer, DeletePolicy::Destroy, Some("Print"))
    );
    assert!(toml::from_str::<JmapConfig>("url = \"https://h\"\ntimeout = 5").is_err());
    let mut zero = JmapConfig::new("https://h");
    zero.timeout_secs = 0;
    assert_eq!(zero.check().unwrap_err().key, "timeout_secs");
    let mut empty = JmapConfig::new("https://h");
    empty.mailbox = Some("/".into());
    assert_eq!(empty.check().unwrap_err().key, "mailbox");
}

fn folders() -> Folders {
    let folder = |id: &str, name: &str, parent: Option<&str>, role: Option<&str>| Folder {
        id: id.into(),
        name: name.into(),
        parent_id: parent.map(Into::into),
        role: role.map(Into::into),
    };
    Folders(vec![
        folder("i", "Inbox", None, Some("inbox")),
        folder("t", "Trash", None, Some("trash")),
        folder("a", "Archive", None, None),
        folder("a1", "2024", Some("a"), None),
        folder("p1", "Print", Some("a"), None),
        folder("p2", "Print", Some("i"), None),
    ])
}

#[test]
fn mailboxes_by_role_name_and_path() {
    let f = folders();
    assert_eq!(f.find(None).unwrap(), "i");
    assert_eq!(f.find(Some("INBOX")).unwrap(), "i");
    assert_eq!(f.find(Some("Inbox")).unwrap(), "i");
    assert_eq!(f.find(Some("2024")).unwrap(), "a1");
    assert_eq!(f.find(Some("Archive/2024")).unwrap(), "a1");
    assert_eq!(f.find(Some("Inbox/Print")).unwrap(), "p2");
    assert!(matches!(f.find(Some("Print")), Err(BackendError::Permanent(m)) if m.contains("path")));
    assert!(matches!(f.find(Some("Nope")), Err(BackendError::Permanent(_))));
    assert_eq!(f.with_role("trash").as_deref(), Some("t"));
}

#[test]
fn patch_paths_are_escaped() {
    assert_eq!(pointer_escape("a/b~c"), "a~1b~0c");
}

/// A request as the fake server saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    authorization: Option<String>,
    body: Vec<u8>,
}

enum Reply {
    Json(u16, Value),
    Raw(u16, Vec<(&'static str, &'static str)>, Vec<u8>),
    /// Accept, read the request, never answer.
    Silence,
}

type Script = dyn Fn(&Seen) -> Reply + Send + Sync;

/// An HTTP/1.1 server on 127.0.0.1 answering each request (one per
/// connection) with `script`; returns its base URL and what it saw.
async fn fake_server(script: Arc<Script>) -> (String, Arc<Mutex<Vec<Seen>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else { return };
            let script = script.clone();
            let record = record.clone();
            tokio::spawn(async move {
                let mut raw = Vec::new();
                let mut buf = [0u8; 8192];
                let request = loop {
                    let Ok(n) = socket.read(&mut buf).await else { return };
                    if n == 0 {
                        return;
                    }
                    raw.extend_from_slice(&buf[..n]);
                    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
                    let head = String::from_utf8_lossy(&raw[..end]).to_string();
                    let header = |name: &str| {
                        head.lines()
                            .filter_map(|l| l.split_once(':'))
                            .find(|(n, _)| n.eq_ignore_ascii_case(name))
                            .map(|(_, v)| v.trim().to_string())
                    };
                    let length: usize = header("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
                    if raw.len() < end + 4 + length {
                        continue;
                    }
                    let mut first = head.split(' ');
                    break Seen {
                        method: first.next().unwrap_or("").to_string(),
                        path: first.next().unwrap_or("").to_string(),
                        authorization: header("authorization"),
                        body: raw[end + 4..end + 4 + length].to_vec(),
                    };
                };
                record.lock().unwrap().push(request.clone());
                let (status, headers, body) = match script(&request) {
                    Reply::Json(status, value) => {
                        (status, vec![("Content-Type", "application/json")], serde_json::to_vec(&value).unwrap())
                    }
                    Reply::Raw(status, headers, body) => (status, headers, body),
                    Reply::Silence => {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        return;
                    }
                };
                let mut response =
                    format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
                for (name, value) in headers {
                    response.push_str(&format!("{name}: {value}\r\n"));
                }
                response.push_str("\r\n");
                let _ = socket.write_all(response.as_bytes()).await;
                let _ = socket.write_all(&body).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    (url, seen)
}

/// The long id is not a valid UIDL, so it must be hashed.
const LONG_ID: &str = "M-an-email-id-far-longer-than-the-seventy-characters-a-pop3-uidl-may-have";

fn session_json() -> Value {
    json!({
        "apiUrl": "/api/",
        "downloadUrl": "/download/{accountId}/{blobId}/{name}?accept={type}",
        "capabilities": {
            "urn:ietf:params:jmap:core": { "maxObjectsInGet": 100, "maxObjectsInSet": 100,
                "maxCallsInRequest": 16, "maxConcurrentRequests": 2, "maxSizeRequest": 1000000 },
            "urn:ietf:params:jmap:mail": {}
        },
        "primaryAccounts": { "urn:ietf:params:jmap:mail": "acc" }
    })
}

/// A small account: an inbox with two messages (one with a long id) and a
/// trash. `Email/set` moves the first and refuses the second; the second's
/// blob is gone (404).
fn mail_server(seen: &Seen) -> Reply {
    match (seen.method.as_str(), seen.path.as_str()) {
        ("GET", "/.well-known/jmap") => Reply::Raw(301, vec![("Location", "/jmap")], Vec::new()),
        ("GET", "/jmap") => Reply::Json(200, session_json()),
        ("GET", "/download/acc/b1/message.eml?accept=application%2Foctet-stream") => {
            Reply::Raw(200, vec![], b"Subject: one\r\n\r\nbody".to_vec())
        }
        ("GET", _) => Reply::Raw(404, vec![], Vec::new()),
        ("POST", "/api/") => {
            let request: Value = serde_json::from_slice(&seen.body).unwrap();
            let responses: Vec<Value> = request["methodCalls"]
                .as_array()
                .unwrap()
                .iter()
                .map(|call| {
                    let (name, args, id) = (call[0].as_str().unwrap(), &call[1], &call[2]);
                    assert_eq!(args["accountId"], "acc");
                    let result = match name {
                        "Mailbox/get" => json!({ "list": [
                            { "id": "mi", "name": "Inbox", "parentId": null, "role": "inbox" },
                            { "id": "mt", "name": "Trash", "parentId": null, "role": "trash" }] }),
                        "Email/query" => {
                            assert_eq!(args["filter"]["inMailbox"], "mi");
                            json!({ "ids": ["e1", LONG_ID], "position": 0, "total": 2, "queryState": "s" })
                        }
                        "Email/get" => json!({ "list": [
                            { "id": LONG_ID, "blobId": "b2", "size": 20 },
                            { "id": "e1", "blobId": "b1", "size": 18 }] }),
                        "Email/set" => {
                            assert_eq!(args["update"]["e1"], json!({ "mailboxIds/mi": null, "mailboxIds/mt": true }));
                            json!({ "updated": { "e1": null },
                                    "notUpdated": { LONG_ID: { "type": "forbidden", "description": "no" } } })
                        }
                        other => panic!("unexpected method {other}"),
                    };
                    json!([name, result, id])
                })
                .collect();
            Reply::Json(200, json!({ "methodResponses": responses, "sessionState": "0" }))
        }
        other => panic!("unexpected request {other:?}"),
    }
}

fn backend(url: &str, change: impl FnOnce(&mut JmapConfig)) -> JmapBackend {
    let mut config = JmapConfig::new(url);
    change(&mut config);
    JmapBackend::new(config).unwrap()
}

async fn drain(mut stream: MessageStream<'_>) -> Result<Vec<u8>, BackendError> {
    use futures::StreamExt;
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

#[tokio::test]
async fn a_whole_session_against_a_scripted_server() {
    let (url, seen) = fake_server(Arc::new(mail_server)).await;
    let backend = backend(&url, |_| {});
    let mut mailbox = backend.open(&Credentials::password("alice", "pw")).await.unwrap();

    let listed = mailbox.list().await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(
        listed[0],
        ListedMessage { id: StoreId("e1".into()), uidl: "e1".into(), size: ReportedSize::Claimed(18) }
    );
    assert_eq!(listed[1].uidl, uidl_for(LONG_ID));
    assert_eq!(listed[1].uidl.len(), 65);

    assert_eq!(drain(mailbox.fetch(&listed[0].id).await.unwrap()).await.unwrap(), b"Subject: one\r\n\r\nbody");
    assert!(matches!(mailbox.fetch(&listed[1].id).await, Err(BackendError::MessageGone)));

    let e = mailbox.remove(&[listed[0].id.clone(), listed[1].id.clone()]).await.unwrap_err();
    assert!(matches!(&e, BackendError::Unavailable(m) if m.starts_with("1 of 2 messages")), "{e:?}");

    let seen = seen.lock().unwrap();
    // Discovery followed the redirect; every request carried Basic auth.
    assert_eq!(seen[0].path, "/.well-known/jmap");
    assert_eq!(seen[1].path, "/jmap");
    let basic = format!("Basic {}", base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "alice:pw"));
    for request in seen.iter().skip(1) {
        assert_eq!(request.authorization.as_deref(), Some(basic.as_str()), "{} {}", request.method, request.path);
    }
    // The listing was one round trip: query and get in one request.
    let lists: Vec<_> = seen.iter().filter(|r| String::from_utf8_lossy(&r.body).contains("Email/query")).collect();
    assert_eq!(lists.len(), 1);
    assert!(String::from_utf8_lossy(&lists[0].body).contains("Email/get"));
}

#[tokio::test]
async fn bearer_tokens_are_sent_as_such() {
    let (url, seen) = fake_server(Arc::new(mail_server)).await;
    let backend = backend(&format!("{url}/jmap"), |c| c.auth = JmapAuth::Bearer);
    assert!(backend.accepts_bearer_tokens());
    backend.open(&Credentials::password("alice", "tok-123")).await.unwrap();
    let bearer = Credentials { user: "alice".into(), proof: Proof::Bearer(crate::mail::Secret::new("tok-456")) };
    backend.open(&bearer).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen[0].authorization.as_deref(), Some("Bearer tok-123"));
    assert!(seen.iter().any(|r| r.authorization.as_deref() == Some("Bearer tok-456")));
    let bad = backend.open(&Credentials::password("alice", "two words")).await;
    assert!(matches!(bad, Err(BackendError::BadCredentials(_))));
}

#[tokio::test]
async fn basic_refuses_a_colon_in_the_user_name_and_bearer_proofs() {
    let backend = backend("http://127.0.0.1:9", |_| {});
    assert!(!backend.accepts_bearer_tokens());
    let colon = backend.open(&Credentials::password("a:b", "pw")).await;
    assert!(matches!(colon, Err(BackendError::BadCredentials(_))));
    let bearer = Credentials { user: "alice".into(), proof: Proof::Bearer(crate::mail::Secret::new("t")) };
    assert!(matches!(backend.open(&bearer).await, Err(BackendError::BadCredentials(_))));
}

async fn open_error(script: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> BackendError {
    let (url, _) = fake_server(Arc::new(script)).await;
    let backend = backend(&format!("{url}/jmap"), |c| c.timeout_secs = 1);
    match backend.open(&Credentials::password("alice", "secret-pw")).await {
        Ok(_) => panic!("open succeeded"),
        Err(e) => {
            assert!(!e.to_string().contains("secret-pw"), "an error shows the password: {e}");
            e
        }
    }
}

#[tokio::test]
async fn http_failures_become_pop3_meanings() {
    let e = open_error(|_| Reply::Raw(401, vec![("WWW-Authenticate", "Basic realm=\"x\"")], Vec::new())).await;
    assert!(matches!(e, BackendError::AuthFailed), "{e:?}");
    let e = open_error(|_| Reply::Raw(503, vec![("Retry-After", "7")], Vec::new())).await;
    assert!(matches!(&e, BackendError::Unavailable(m) if m.contains("Retry-After: 7")), "{e:?}");
    let e = open_error(|_| Reply::Raw(429, vec![], Vec::new())).await;
    assert!(matches!(e, BackendError::Unavailable(_)), "{e:?}");
    let e = open_error(|_| Reply::Raw(200, vec![("Content-Type", "text/html")], b"<html>".to_vec())).await;
    assert!(matches!(e, BackendError::Permanent(_)), "{e:?}");
    let e = open_error(|seen| match seen.method.as_str() {
        "GET" => Reply::Json(200, session_json()),
        _ => Reply::Json(200, json!({ "methodResponses": [["error", { "type": "accountNotFound" }, "m"]] })),
    })
    .await;
    assert!(matches!(&e, BackendError::Permanent(m) if m.contains("accountNotFound")), "{e:?}");
    let e = open_error(|seen| match seen.method.as_str() {
        "GET" => Reply::Json(200, session_json()),
        _ => Reply::Json(400, json!({ "type": "urn:ietf:params:jmap:error:limit", "limit": "maxSizeRequest" })),
    })
    .await;
    assert!(matches!(&e, BackendError::Unavailable(m) if m.contains("maxSizeRequest")), "{e:?}");
}

#[tokio::test]
async fn a_silent_server_times_out() {
    let started = std::time::Instant::now();
    let e = open_error(|_| Reply::Silence).await;
    assert!(matches!(&e, BackendError::Unavailable(m) if m.contains("timed out")), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
}

#[tokio::test]
async fn a_server_that_is_down_is_unavailable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let backend = backend(&format!("http://127.0.0.1:{port}/jmap"), |_| {});
    let e = backend.open(&Credentials::password("alice", "pw")).await.err().unwrap();
    assert!(matches!(e, BackendError::Unavailable(_)), "{e:?}");
}

#[tokio::test]
async fn downloads_stream_in_bounded_chunks() {
    const BIG: usize = 8 * 1024 * 1024;
    let (url, _) = fake_server(Arc::new(|seen: &Seen| match (seen.method.as_str(), seen.path.as_str()) {
        ("GET", "/jmap") => Reply::Json(200, session_json()),
        ("GET", path) if path.starts_with("/download/acc/big/") => Reply::Raw(200, vec![], vec![b'x'; BIG]),
        _ => {
            let request: Value = serde_json::from_slice(&seen.body).unwrap();
            let responses: Vec<Value> = request["methodCalls"]
                .as_array()
                .unwrap()
                .iter()
                .map(|call| {
                    let result = match call[0].as_str().unwrap() {
                        "Mailbox/get" => json!({ "list": [{ "id": "mi", "name": "Inbox", "role": "inbox" }] }),
                        "Email/query" => json!({ "ids": ["eb"], "position": 0, "total": 1 }),
                        _ => json!({ "list": [{ "id": "eb", "blobId": "big", "size": BIG }] }),
                    };
                    json!([call[0], result, call[2]])
                })
                .collect();
            Reply::Json(200, json!({ "methodResponses": responses }))
        }
    }))
    .await;
    let backend = backend(&format!("{url}/jmap"), |_| {});
    let mut mailbox = backend.open(&Credentials::password("alice", "pw")).await.unwrap();
    let listed = mailbox.list().await.unwrap();
    let mut stream = mailbox.fetch(&listed[0].id).await.unwrap();
    let (mut total, mut chunks, mut largest) = (0, 0, 0);
    while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
        let chunk = chunk.unwrap();
        total += chunk.len();
        chunks += 1;
        largest = largest.max(chunk.len());
    }
    assert_eq!(total, BIG);
    // Passed on as it arrives, never gathered whole.
    assert!(chunks > 8 && largest <= 1024 * 1024, "{chunks} chunks, largest {largest}");
}

#[tokio::test]
async fn a_throttled_request_is_retried_after_retry_after() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let throttled = Arc::new(AtomicUsize::new(0));
    let count = throttled.clone();
    let (url, seen) = fake_server(Arc::new(move |seen: &Seen| {
        if seen.method == "POST" && count.fetch_add(1, Ordering::SeqCst) == 0 {
            return Reply::Raw(429, vec![("Retry-After", "1")], Vec::new());
        }
        mail_server(seen)
    }))
    .await;
    let backend = backend(&format!("{url}/jmap"), |_| {});
    let started = std::time::Instant::now();
    backend.open(&Credentials::password("alice", "pw")).await.unwrap();
    assert!(started.elapsed() >= Duration::from_secs(1), "waited as asked");
    let posts = seen.lock().unwrap().iter().filter(|r| r.method == "POST").count();
    assert_eq!((posts, throttled.load(Ordering::SeqCst)), (2, 2), "the same request, sent again once");
}

/// An unchanged or changed poll is one `Email/changes` request; a state the
/// server cannot continue (`cannotCalculateChanges`) lists in full.
#[tokio::test]
async fn polls_follow_email_changes_and_fall_back_to_a_full_listing() {
    fn email(id: &str, at: &str) -> Value {
        json!({ "id": id, "blobId": format!("b-{id}"), "size": 10, "receivedAt": at, "mailboxIds": { "mi": true } })
    }
    let script = |seen: &Seen| -> Reply {
        if seen.method == "GET" {
            return mail_server(seen);
        }
        let request: Value = serde_json::from_slice(&seen.body).unwrap();
        let responses: Vec<Value> = request["methodCalls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|call| {
                let (name, args, id) = (call[0].as_str().unwrap(), &call[1], call[2].clone());
                let (name, result) = match (name, args["sinceState"].as_str()) {
                    ("Mailbox/get", _) => (
                        name,
                        json!({ "list": [
                        { "id": "mi", "name": "Inbox", "parentId": null, "role": "inbox" }] }),
                    ),
                    ("Email/query", _) => {
                        (name, json!({ "ids": ["e1"], "position": 0, "total": 1, "queryState": "q" }))
                    }
                    ("Email/changes", Some("s1")) => (
                        name,
                        json!({ "oldState": "s1", "newState": "s2",
                        "hasMoreChanges": false, "created": ["e2"], "updated": [], "destroyed": [] }),
                    ),
                    ("Email/changes", _) => ("error", json!({ "type": "cannotCalculateChanges" })),
                    ("Email/get", _) if args["ids"] == json!([]) => (name, json!({ "state": "s1", "list": [] })),
                    ("Email/get", _) if args["#ids"]["path"] == "/created" => {
                        (name, json!({ "state": "s2", "list": [email("e2", "2024-01-02T00:00:00Z")] }))
                    }
                    ("Email/get", _) if args["#ids"]["path"] == "/updated" => (name, json!({ "list": [] })),
                    ("Email/get", _) => (name, json!({ "list": [email("e1", "2024-01-01T00:00:00Z")] })),
                    (other, _) => panic!("unexpected method {other}"),
                };
                json!([name, result, id])
            })
            .collect();
        Reply::Json(200, json!({ "methodResponses": responses, "sessionState": "0" }))
    };
    let (url, seen) = fake_server(Arc::new(script)).await;
    let backend = backend(&url, |_| {});
    let mut mailbox = backend.open(&Credentials::password("alice", "pw")).await.unwrap();
    let ids = |listed: Vec<ListedMessage>| listed.into_iter().map(|m| m.id.0).collect::<Vec<_>>();
    assert_eq!(ids(mailbox.list().await.unwrap()), ["e1"]);
    let before = seen.lock().unwrap().len();
    assert_eq!(ids(mailbox.list().await.unwrap()), ["e1", "e2"], "e2 created since s1");
    assert_eq!(seen.lock().unwrap().len() - before, 1, "one request: Email/changes and its gets");
    // s2 cannot be continued: a full listing (state read again first).
    let before = seen.lock().unwrap().len();
    assert_eq!(ids(mailbox.list().await.unwrap()), ["e1"]);
    assert_eq!(seen.lock().unwrap().len() - before, 2, "the refused changes, then the full listing");
}
