//! Running real client programs (curl, openssl, python3, fetchmail) to
//! completion, with a hard time limit and their output captured.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{IO_TIMEOUT, require_program};

/// Runs `program` with `args` and `env`, feeding it `input` on stdin (none:
/// no stdin), killing it after twice the harness timeout. Pipes are read on
/// threads, so a chatty child cannot block on them.
pub fn run_with(program: &str, args: &[&str], env: &[(&str, &OsStr)], input: Option<&[u8]>) -> Output {
    let path = require_program(program);
    let mut child = Command::new(&path)
        .args(args)
        .envs(env.iter().copied())
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {}: {e}", path.display()));
    let feeder = input.map(|input| {
        let mut stdin = child.stdin.take().unwrap();
        let input = input.to_vec();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        })
    });
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + IO_TIMEOUT * 2;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{program} {args:?} did not finish within {:?}", IO_TIMEOUT * 2);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if let Some(feeder) = feeder {
        let _ = feeder.join();
    }
    Output { status, stdout: out.join().unwrap(), stderr: err.join().unwrap() }
}

/// Runs `program` with no stdin (see `run_with`).
pub fn run(program: &str, args: &[&str]) -> Output {
    run_with(program, args, &[], None)
}

/// Exit status and both outputs, for assertion messages.
pub fn describe(output: &Output) -> String {
    format!(
        "exit {}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

// ---------------------------------------------------------------------------
// The real clients, driven the way the tests need them

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `openssl s_client` to `addr` with SNI `name` (None: no SNI), verifying
/// against the test CA (and the host name, when there is one), sending
/// `commands` once TLS is up and reading until the server closes.
pub fn s_client(ca_file: &Path, addr: SocketAddr, name: Option<&str>, extra: &[&str], commands: &str) -> Output {
    let connect = addr.to_string();
    let ca_file = ca_file.display().to_string();
    let mut args = vec![
        "s_client",
        "-connect",
        &connect,
        "-CAfile",
        &ca_file,
        "-verify_return_error",
        "-crlf",
        "-ign_eof",
        "-showcerts",
    ];
    if let Some(name) = name {
        args.extend(["-servername", name, "-verify_hostname", name]);
    }
    args.extend_from_slice(extra);
    run_with("openssl", &args, &[], Some(commands.as_bytes()))
}

/// The subject line openssl prints for the server certificate.
pub fn s_client_subject(output: &Output) -> String {
    let text = stdout(output);
    text.lines()
        .find_map(|l| l.strip_prefix("subject="))
        .unwrap_or_else(|| panic!("no subject= in s_client output:\n{}", describe(output)))
        .to_string()
}

/// The protocol s_client reports ("TLSv1.2", "TLSv1.3").
pub fn s_client_protocol(output: &Output) -> String {
    let text = stdout(output);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Protocol  :").or_else(|| l.trim().strip_prefix("Protocol :")))
        .map(|p| p.trim().to_string())
        .or_else(|| {
            // "New, TLSv1.3, Cipher is TLS_AES_256_GCM_SHA384"
            text.lines().find_map(|l| l.strip_prefix("New, ").and_then(|r| r.split(',').next()).map(str::to_string))
        })
        .unwrap_or_else(|| panic!("no protocol in s_client output:\n{}", describe(output)))
}

/// Python's poplib against popgate. `name` is what the client believes it
/// connects to (SNI and host name check); every name resolves to 127.0.0.1
/// (as curl's --resolve does). `mode` is "implicit" or "stls"; `extra`
/// "max=TLSv1_2" and the like pins the TLS version. The script's JSON
/// result is returned.
pub fn poplib_tls(
    ca_file: &Path,
    addr: SocketAddr,
    name: &str,
    mode: &str,
    (user, password): (&str, &str),
    extra: &str,
) -> serde_json::Value {
    let port = addr.port().to_string();
    let ca_file = ca_file.display().to_string();
    let output =
        run_with("python3", &["-c", POPLIB_TLS, &ca_file, &port, name, mode, user, password, extra], &[], Some(b""));
    assert!(output.status.success(), "poplib: {}", describe(&output));
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("poplib output ({e}): {}", describe(&output)))
}

/// curl against popgate, `name` resolved to 127.0.0.1.
pub fn curl_tls(
    ca_file: &Path,
    url: &str,
    name: &str,
    port: u16,
    (user, password): (&str, &str),
    extra: &[&str],
) -> Output {
    let resolve = format!("{name}:{port}:127.0.0.1");
    let credentials = format!("{user}:{password}");
    let ca_file = ca_file.display().to_string();
    let mut args = vec![
        "--silent",
        "--show-error",
        "--max-time",
        "20",
        "--cacert",
        &ca_file,
        "--resolve",
        &resolve,
        "--user",
        &credentials,
    ];
    args.extend_from_slice(extra);
    args.push(url);
    run_with("curl", &args, &[], Some(b""))
}

/// Python's poplib over TLS (implicit, or STLS): connects, checks the
/// certificate, logs in as `user`/`password`, STAT, RETR 1, QUIT; prints
/// what it saw as JSON (or `ssl_error` where the handshake fails).
/// Arguments: CA file, port, name, mode, user, password, extra.
pub const POPLIB_TLS: &str = r#"
import json, poplib, socket, ssl, sys
ca, port, name, mode, user, password, extra = sys.argv[1:8]
port = int(port)
real = socket.create_connection
socket.create_connection = lambda addr, *a, **kw: real(("127.0.0.1", addr[1]), *a, **kw)
ctx = ssl.create_default_context(cafile=ca)
if extra.startswith("max="):
    version = getattr(ssl.TLSVersion, extra[4:])
    ctx.minimum_version = version
    ctx.maximum_version = version
    # Let the client really offer old versions (OpenSSL 3 hides them at
    # security level 1): a refusal must then come from the server.
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
out = {}
try:
    if mode == "implicit":
        pop = poplib.POP3_SSL(name, port, context=ctx, timeout=20)
    else:
        pop = poplib.POP3(name, port, timeout=20)
        out["capa_before"] = sorted(pop.capa().keys())
        out["stls"] = pop.stls(context=ctx).decode()
    out["version"] = pop.sock.version()
    cert = pop.sock.getpeercert()
    out["subject_cn"] = [v for rdn in cert["subject"] for (k, v) in rdn if k == "commonName"]
    out["san"] = [v for (k, v) in cert.get("subjectAltName", ()) if k == "DNS"]
    out["capa_after"] = sorted(pop.capa().keys())
    pop.user(user)
    out["pass"] = pop.pass_(password).decode()
    out["stat"] = list(pop.stat())
    out["retr1"] = b"\r\n".join(pop.retr(1)[1]).decode() + "\r\n"
    out["quit"] = pop.quit().decode()
except ssl.SSLError as e:
    out["ssl_error"] = e.reason or str(e)
print(json.dumps(out))
"#;

/// Python's poplib, cleartext: a whole retrieve-and-delete cycle (CAPA,
/// USER/PASS, STAT, LIST, UIDL, RETR of every message, TOP 1 0, DELE of
/// every message, QUIT), printed as JSON. Arguments: host, port, user,
/// password.
pub const POPLIB_CYCLE: &str = r#"
import json, poplib, sys
host, port, user, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
p = poplib.POP3(host, port, timeout=20)
out = {"welcome": p.getwelcome().decode()}
out["capa"] = sorted(p.capa().keys())
p.user(user)
p.pass_(password)
out["stat"] = list(p.stat())
out["list"] = [l.decode() for l in p.list()[1]]
out["uidl"] = [l.decode() for l in p.uidl()[1]]
retrieved = []
for n in range(1, out["stat"][0] + 1):
    resp, lines, octets = p.retr(n)
    retrieved.append({"lines": [l.decode("latin-1") for l in lines], "octets": octets})
out["retr"] = retrieved
out["top"] = [l.decode("latin-1") for l in p.top(1, 0)[1]]
for n in range(1, out["stat"][0] + 1):
    p.dele(n)
out["quit"] = p.quit().decode()
print(json.dumps(out))
"#;

/// Python's poplib, cleartext: USER/PASS, STAT, UIDL, then RETR and DELE of
/// every message, QUIT; printed as JSON. Arguments: host, port, user,
/// password.
pub const POPLIB_RETRIEVE_DELETE: &str = r#"
import json, poplib, sys
host, port, user, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
p = poplib.POP3(host, port, timeout=20)
p.user(user)
p.pass_(password)
out = {"stat": list(p.stat()), "uidl": [l.decode() for l in p.uidl()[1]], "retr": []}
for n in range(1, out["stat"][0] + 1):
    resp, lines, octets = p.retr(n)
    out["retr"].append({"text": b"".join(l + b"\r\n" for l in lines).decode("latin-1"), "octets": octets})
    p.dele(n)
out["quit"] = p.quit().decode()
print(json.dumps(out))
"#;

/// `POPLIB_RETRIEVE_DELETE` against `addr` as `user`: every message of
/// `raws` must arrive exactly in its canonical form (text and octet count),
/// with the UIDLs `uidls`, in a STAT total that adds up, and QUIT must
/// succeed. What is left in the store is for the caller to check.
pub fn poplib_retrieves_and_deletes(
    addr: SocketAddr,
    (user, password): (&str, &str),
    raws: &[Vec<u8>],
    uidls: &[String],
) {
    let port = addr.port().to_string();
    let output = run("python3", &["-c", POPLIB_RETRIEVE_DELETE, "127.0.0.1", &port, user, password]);
    assert!(output.status.success(), "poplib: {}", describe(&output));
    let out: serde_json::Value =
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {}", describe(&output)));
    let want: Vec<Vec<u8>> = raws.iter().map(|r| super::messages::canonical(r)).collect();
    let total: usize = want.iter().map(Vec::len).sum();
    assert_eq!(out["stat"], serde_json::json!([raws.len(), total]));
    for (i, m) in want.iter().enumerate() {
        let latin1: String = m.iter().map(|&b| b as char).collect();
        assert_eq!(out["retr"][i]["text"], latin1, "RETR {}", i + 1);
        assert_eq!(out["retr"][i]["octets"], m.len(), "RETR {} octets", i + 1);
        assert_eq!(out["uidl"][i], format!("{} {}", i + 1, uidls[i]));
    }
    assert!(out["quit"].as_str().is_some_and(|q| q.starts_with("+OK")), "{out}");
}

/// curl against popgate's cleartext POP3 at `addr`: `pop3://addr/path`,
/// with `auth` (e.g. `["--user", "u:p"]`, or a user and
/// `--oauth2-bearer`) and `extra` arguments.
pub fn curl_pop3(addr: SocketAddr, path: &str, auth: &[&str], extra: &[&str]) -> Output {
    let url = format!("pop3://{addr}/{path}");
    let mut args = vec!["--silent", "--show-error", "--max-time", "20"];
    args.extend_from_slice(auth);
    args.extend_from_slice(extra);
    args.push(&url);
    run("curl", &args)
}

/// curl RETR of each of `raws` in turn (`auth` as for `curl_pop3`): each
/// must arrive in its canonical form.
pub fn curl_retrieves_each(addr: SocketAddr, auth: &[&str], raws: &[Vec<u8>]) {
    for (i, raw) in raws.iter().enumerate() {
        let retr = curl_pop3(addr, &(i + 1).to_string(), auth, &[]);
        assert!(retr.status.success(), "curl RETR {}: {}", i + 1, describe(&retr));
        assert_eq!(
            String::from_utf8_lossy(&retr.stdout),
            String::from_utf8_lossy(&super::messages::canonical(raw)),
            "RETR {}",
            i + 1
        );
    }
}

/// curl's LIST (`auth` as for `curl_pop3`) must be exactly `raws`, numbered
/// from 1, with their canonical sizes.
pub fn curl_lists(addr: SocketAddr, auth: &[&str], raws: &[&Vec<u8>]) {
    let list = curl_pop3(addr, "", auth, &[]);
    assert!(list.status.success(), "{}", describe(&list));
    let expected: String = raws
        .iter()
        .enumerate()
        .map(|(i, r)| format!("{} {}\r\n", i + 1, super::messages::canonical(r).len()))
        .collect();
    assert_eq!(String::from_utf8_lossy(&list.stdout), expected);
}
