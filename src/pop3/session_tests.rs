//! Session transcripts: `C:` lines are fed to the session, `S:` lines are
//! the exact bytes expected back. A synchronous stand-in driver performs the
//! steps against an in-memory maildrop.

use super::*;
use crate::pop3::command::LineReader;
use crate::pop3::maildrop::Message;

const MESSAGES: &[&[u8]] = &[
    b"From: a\r\nSubject: one\r\n\r\nbody one\r\n",
    b"From: b\nSubject: two\n\n.dot line\nsecond\n",
    b"Subject: three\r\n\r\nx",
];

struct Harness {
    session: Session,
    removed: Vec<StoreId>,
    closed: bool,
    backend_down: bool,
    greeted: bool,
}

impl Harness {
    fn new(config: SessionConfig) -> Self {
        Harness {
            session: Session::new(config),
            removed: Vec::new(),
            closed: false,
            backend_down: false,
            greeted: false,
        }
    }

    fn maildrop() -> Maildrop {
        Maildrop::new(
            MESSAGES
                .iter()
                .enumerate()
                .map(|(i, m)| Message {
                    id: StoreId(i.to_string()),
                    uidl: format!("uid-{}", i + 1),
                    size: crate::canonical::canonical_size(m),
                })
                .collect(),
        )
    }

    fn perform(&mut self, step: Step, out: &mut Vec<u8>) {
        match step {
            Step::Reply(r) => r.write_to(out),
            Step::Close(r) => {
                r.write_to(out);
                self.closed = true;
            }
            Step::Login(c) => {
                let step = if self.backend_down {
                    self.session.login_failed(&BackendError::unavailable("down"))
                } else if c.user == "printer" {
                    // A device with each_device_once and a login delay.
                    let retention = Retention { expire_days: Some(0), login_delay_secs: 300 };
                    self.session.login_succeeded_with(Self::maildrop(), retention)
                } else if c.user == "too-soon" {
                    self.session.login_delayed()
                } else if c.user == "alice"
                    && (c.proof == crate::mail::Proof::Password(crate::mail::Secret::new("s3cr3t"))
                        || c.proof == crate::mail::Proof::Bearer(crate::mail::Secret::new("good-token")))
                {
                    self.session.login_succeeded(Self::maildrop())
                } else {
                    self.session.login_failed(&BackendError::AuthFailed)
                };
                self.perform(step, out);
            }
            Step::Send { id, ok, mut encoder, .. } => {
                if self.backend_down {
                    let step = self.session.fetch_failed(&BackendError::unavailable("down"));
                    return self.perform(step, out);
                }
                ok.write_to(out);
                let i: usize = id.0.parse().unwrap();
                encoder.push(MESSAGES[i], out);
                encoder.finish(out);
            }
            Step::Update(ids) => {
                let result = if self.backend_down {
                    Err(BackendError::unavailable("down"))
                } else {
                    self.removed.extend(ids.iter().cloned());
                    Ok(ids.len())
                };
                let reply = self.session.update_finished(result);
                reply.write_to(out);
                self.closed = true;
            }
            Step::StartTls(r) => r.write_to(out),
        }
    }

    /// Runs a transcript; `C:` lines may be grouped (pipelined) by `|`.
    fn run(&mut self, script: &str) {
        let mut expected = Vec::new();
        let mut sent = Vec::new();
        let mut out = Vec::new();
        if !std::mem::replace(&mut self.greeted, true) {
            self.session.greeting().write_to(&mut out);
        }
        let mut reader = LineReader::new();
        for line in script.lines().map(str::trim_start).filter(|l| !l.is_empty()) {
            if let Some(c) = line.strip_prefix("C: ") {
                sent.push(c.to_string());
                reader.push(c.as_bytes());
                reader.push(b"\r\n");
                while let Some(l) = reader.next_line(self.session.line_limit()) {
                    assert!(!self.closed, "command after close: {c}");
                    let step = self.session.on_line(l);
                    self.perform(step, &mut out);
                }
            } else if let Some(s) = line.strip_prefix("S: ") {
                expected.extend_from_slice(s.as_bytes());
                expected.extend_from_slice(b"\r\n");
            } else {
                panic!("bad transcript line {line:?}");
            }
        }
        assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(&expected), "after sending {sent:#?}");
    }
}

fn run(script: &str) -> Harness {
    let mut h = Harness::new(SessionConfig::default());
    h.run(script);
    h
}

#[test]
fn full_session() {
    let h = run("
        S: +OK popgate ready
        C: user alice
        S: +OK send PASS
        C: PASS s3cr3t
        S: +OK maildrop has 3 messages (100 octets)
        C: STAT
        S: +OK 3 100
        C: LIST
        S: +OK 3 messages (100 octets)
        S: 1 35
        S: 2 44
        S: 3 21
        S: .
        C: LIST 2
        S: +OK 2 44
        C: UIDL
        S: +OK unique-id listing follows
        S: 1 uid-1
        S: 2 uid-2
        S: 3 uid-3
        S: .
        C: UIDL 3
        S: +OK 3 uid-3
        C: RETR 2
        S: +OK 44 octets
        S: From: b
        S: Subject: two
        S: 
        S: ..dot line
        S: second
        S: .
        C: TOP 3 0
        S: +OK top of message follows
        S: Subject: three
        S: 
        S: .
        C: TOP 2 1
        S: +OK top of message follows
        S: From: b
        S: Subject: two
        S: 
        S: ..dot line
        S: .
        C: DELE 1
        S: +OK message 1 deleted
        C: STAT
        S: +OK 2 65
        C: LIST
        S: +OK 2 messages (65 octets)
        S: 2 44
        S: 3 21
        S: .
        C: NOOP
        S: +OK
        C: QUIT
        S: +OK popgate signing off (1 messages deleted)
    ");
    assert_eq!(h.removed, vec![StoreId("0".into())]);
    assert!(h.closed);
}

#[test]
fn every_argument_is_validated() {
    let h = run("
        S: +OK popgate ready
        C: STAT
        S: -ERR not allowed before login
        C: RETR 1
        S: -ERR not allowed before login
        C: PASS x
        S: -ERR USER first
        C: USER alice
        S: +OK send PASS
        C: PASS s3cr3t
        S: +OK maildrop has 3 messages (100 octets)
        C: USER bob
        S: -ERR not allowed after login
        C: RETR
        S: -ERR a message number is required
        C: RETR one
        S: -ERR invalid message number
        C: RETR 0
        S: -ERR no such message
        C: RETR 4
        S: -ERR no such message
        C: RETR 4294967296
        S: -ERR no such message
        C: LIST -1
        S: -ERR invalid message number
        C: TOP 1
        S: -ERR TOP needs a message number and a line count
        C: TOP 1 -1
        S: -ERR invalid line count
        C: DELE 2
        S: +OK message 2 deleted
        C: DELE 2
        S: -ERR message already deleted
        C: RETR 2
        S: -ERR message already deleted
        C: TOP 2 1
        S: -ERR message already deleted
        C: LIST 2
        S: -ERR message already deleted
        C: UIDL 2
        S: -ERR message already deleted
        C: RSET
        S: +OK maildrop has 3 messages (100 octets)
        C: LIST 2
        S: +OK 2 44
        C: STLS
        S: -ERR STLS is only allowed before login
        C: XYZZY
        S: -ERR unknown command
        C: QUIT
        S: +OK popgate signing off
    ");
    assert!(h.removed.is_empty(), "RSET must have unmarked everything");
}

#[test]
fn capa_tells_the_truth_in_each_state() {
    run("
        S: +OK popgate ready
        C: CAPA
        S: +OK capability list follows
        S: TOP
        S: UIDL
        S: RESP-CODES
        S: AUTH-RESP-CODE
        S: PIPELINING
        S: EXPIRE NEVER USER
        S: LOGIN-DELAY 0 USER
        S: USER
        S: SASL PLAIN LOGIN
        S: IMPLEMENTATION popgate 0.1.0
        S: .
        C: USER alice
        S: +OK send PASS
        C: PASS s3cr3t
        S: +OK maildrop has 3 messages (100 octets)
        C: CAPA
        S: +OK capability list follows
        S: TOP
        S: UIDL
        S: RESP-CODES
        S: AUTH-RESP-CODE
        S: PIPELINING
        S: EXPIRE NEVER
        S: LOGIN-DELAY 0
        S: IMPLEMENTATION popgate 0.1.0
        S: .
    ");
    let mut h = Harness::new(SessionConfig { login_permitted: false, stls_offered: true, ..SessionConfig::default() });
    h.run(
        "
        S: +OK popgate ready
        C: CAPA
        S: +OK capability list follows
        S: TOP
        S: UIDL
        S: RESP-CODES
        S: AUTH-RESP-CODE
        S: PIPELINING
        S: EXPIRE NEVER USER
        S: LOGIN-DELAY 0 USER
        S: STLS
        S: IMPLEMENTATION popgate 0.1.0
        S: .
        C: USER alice
        S: -ERR [AUTH] cleartext login is not allowed on this connection; use STLS first
        C: AUTH PLAIN AGFsaWNlAHMzY3IzdA==
        S: -ERR [AUTH] cleartext login is not allowed on this connection; use STLS first
        C: STLS
        S: +OK begin TLS negotiation
    ",
    );
}

#[test]
fn auth_plain_with_and_without_initial_response() {
    // "\0alice\0s3cr3t"
    run("
        S: +OK popgate ready
        C: AUTH
        S: +OK SASL mechanisms follow
        S: PLAIN
        S: LOGIN
        S: .
        C: AUTH CRAM-MD5
        S: -ERR unsupported SASL mechanism
        C: AUTH PLAIN
        S: + 
        C: *
        S: -ERR AUTH cancelled
        C: AUTH PLAIN
        S: + 
        C: AGFsaWNlAHMzY3IzdA==
        S: +OK maildrop has 3 messages (100 octets)
        C: QUIT
        S: +OK popgate signing off
    ");
    run("
        S: +OK popgate ready
        C: auth plain AGFsaWNlAHMzY3IzdA==
        S: +OK maildrop has 3 messages (100 octets)
    ");
}

#[test]
fn failed_logins_are_counted_then_the_connection_closes() {
    // AGFsaWNlAHgNeQ== is "\0alice\0x\ry": a CR in the password is refused
    // before any backend call, and counts as a failure like bad base64.
    let h = run("
        S: +OK popgate ready
        C: USER alice
        S: +OK send PASS
        C: PASS wrong
        S: -ERR [AUTH] invalid user name or password
        C: AUTH PLAIN AGFsaWNlAHgNeQ==
        S: -ERR [AUTH] NUL, CR or LF in the password
        C: AUTH PLAIN !!!
        S: -ERR [AUTH] too many failed logins; closing
    ");
    assert!(h.closed);
}

#[test]
fn backend_failures_are_temporary_and_delete_nothing() {
    let mut h = Harness::new(SessionConfig::default());
    h.backend_down = true;
    h.run(
        "
        S: +OK popgate ready
        C: USER alice
        S: +OK send PASS
        C: PASS s3cr3t
        S: -ERR [SYS/TEMP] mail store unavailable; try again later
    ",
    );
    h.backend_down = false;
    h.run(
        "
        C: USER alice
        S: +OK send PASS
        C: PASS s3cr3t
        S: +OK maildrop has 3 messages (100 octets)
        C: DELE 1
        S: +OK message 1 deleted
    ",
    );
    h.backend_down = true;
    h.run(
        "
        C: RETR 2
        S: -ERR [SYS/TEMP] mail store unavailable; try again later
        C: QUIT
        S: -ERR [SYS/TEMP] some deleted messages not removed: mail store unavailable; try again later
    ",
    );
    assert!(h.removed.is_empty());
}

#[test]
fn pipelined_commands_are_answered_in_order() {
    let mut h = Harness::new(SessionConfig::default());
    let mut out = Vec::new();
    let mut reader = LineReader::new();
    reader.push(b"USER alice\r\nPASS s3cr3t\r\nSTAT\r\nDELE 3\r\nLIST 3\r\nUIDL 1\r\nQUIT\r\n");
    while let Some(line) = reader.next_line(255) {
        let step = h.session.on_line(line);
        h.perform(step, &mut out);
    }
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "+OK send PASS\r\n+OK maildrop has 3 messages (100 octets)\r\n+OK 3 100\r\n+OK message 3 deleted\r\n\
-ERR message already deleted\r\n+OK 1 uid-1\r\n+OK popgate signing off (1 messages deleted)\r\n"
    );
    assert_eq!(h.removed, vec![StoreId("2".into())]);
}

#[test]
fn timeouts_and_shutdown_never_update() {
    let mut h = Harness::new(SessionConfig::default());
    h.run(
        "
        S: +OK popgate ready
        C: USER alice
        S: +OK send PASS
        C: PASS s3cr3t
        S: +OK maildrop has 3 messages (100 octets)
        C: DELE 1
        S: +OK message 1 deleted
    ",
    );
    assert_eq!(h.session.shutting_down().status, crate::pop3::response::Status::Err(Some(ResponseCode::SysTemp)));
    // After the session ended, nothing more is accepted and nothing removed.
    let step = h.session.on_line(Line::Complete(b"QUIT".to_vec()));
    assert!(matches!(step, Step::Reply(r) if !r.is_ok()));
    assert!(h.removed.is_empty());
}

#[test]
fn long_lines_get_an_error_and_the_session_goes_on() {
    let mut h = Harness::new(SessionConfig::default());
    let long = format!("C: USER {}", "a".repeat(300));
    h.run(&format!(
        "
        S: +OK popgate ready
        {long}
        S: -ERR command line too long
        C: USER alice
        S: +OK send PASS
    "
    ));
}

#[test]
fn auth_login_prompts_for_user_then_password() {
    // YWxpY2U= "alice", czNjcjN0 "s3cr3t"
    run("
        S: +OK popgate ready
        C: AUTH LOGIN
        S: + VXNlcm5hbWU6
        C: YWxpY2U=
        S: + UGFzc3dvcmQ6
        C: czNjcjN0
        S: +OK maildrop has 3 messages (100 octets)
    ");
    run("
        S: +OK popgate ready
        C: AUTH LOGIN YWxpY2U=
        S: + UGFzc3dvcmQ6
        C: *
        S: -ERR AUTH cancelled
        C: AUTH LOGIN
        S: + VXNlcm5hbWU6
        C: YWxpY2U=
        S: + UGFzc3dvcmQ6
        C: d3Jvbmc=
        S: -ERR [AUTH] invalid user name or password
    ");
}

fn oauth_config() -> SessionConfig {
    SessionConfig {
        mechanisms: vec![Mechanism::Plain, Mechanism::XOAuth2, Mechanism::OAuthBearer],
        ..SessionConfig::default()
    }
}

#[test]
fn oauth_mechanisms_pass_the_token_and_answer_errors_per_rfc_7628() {
    let b64 = |s: &str| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, s);
    let good = b64("user=alice\x01auth=Bearer good-token\x01\x01");
    let bad = b64("n,a=alice,\x01host=x\x01auth=Bearer expired\x01\x01");
    let challenge = b64(r#"{"status":"invalid_token","schemes":"bearer"}"#);
    let mut h = Harness::new(oauth_config());
    h.run(&format!(
        "
        S: +OK popgate ready
        C: CAPA
        S: +OK capability list follows
        S: TOP
        S: UIDL
        S: RESP-CODES
        S: AUTH-RESP-CODE
        S: PIPELINING
        S: EXPIRE NEVER USER
        S: LOGIN-DELAY 0 USER
        S: USER
        S: SASL PLAIN XOAUTH2 OAUTHBEARER
        S: IMPLEMENTATION popgate 0.1.0
        S: .
        C: AUTH LOGIN
        S: -ERR unsupported SASL mechanism
        C: AUTH OAUTHBEARER {bad}
        S: + {challenge}
        C: AQ==
        S: -ERR [AUTH] invalid user name or password
        C: AUTH XOAUTH2
        S: + 
        C: {good}
        S: +OK maildrop has 3 messages (100 octets)
    "
    ));
}

#[test]
fn noise_after_arguments_is_refused() {
    // RFC 1939 3: one space separates keyword and arguments. Dovecot answers
    // "LIST 1 " with "-ERR Noise after message number"; `USER  alice` must
    // not log in as `alice`.
    let h = run("
        S: +OK popgate ready
        C: USER  alice
        S: -ERR noise after the arguments: separate them by one space
        C: PASS s3cr3t
        S: -ERR USER first
        C: USER alice
        S: +OK send PASS
        C: PASS s3cr3t
        S: +OK maildrop has 3 messages (100 octets)
        C: LIST 1 
        S: -ERR noise after the arguments: separate them by one space
        C: RETR 1 
        S: -ERR noise after the arguments: separate them by one space
        C: DELE 1 
        S: -ERR noise after the arguments: separate them by one space
        C: QUIT
        S: +OK popgate signing off
    ");
    assert!(h.removed.is_empty());
}

#[test]
fn an_unsupported_mechanism_is_no_credentials_problem() {
    // RFC 5034 4: an unsupported mechanism gets a negative response; RFC 3206
    // 5-6 reserve [AUTH] for problems with the user's credentials, so no
    // [AUTH] here, and it is not counted as a failed login.
    let h = run("
        S: +OK popgate ready
        C: AUTH CRAM-MD5
        S: -ERR unsupported SASL mechanism
        C: AUTH CRAM-MD5
        S: -ERR unsupported SASL mechanism
        C: AUTH CRAM-MD5
        S: -ERR unsupported SASL mechanism
        C: USER alice
        S: +OK send PASS
        C: PASS s3cr3t
        S: +OK maildrop has 3 messages (100 octets)
    ");
    assert!(!h.closed);
}

/// RFC 2449: before login CAPA gives the server-wide EXPIRE and LOGIN-DELAY
/// marked `USER` (they vary per user); after login, this user's, without
/// `USER`. A login refused for LOGIN-DELAY is `-ERR [LOGIN-DELAY]` and not
/// a failed password (the connection stays open for another try).
#[test]
fn capa_tells_each_users_expire_and_login_delay() {
    run("
        S: +OK popgate ready
        C: USER too-soon
        S: +OK send PASS
        C: PASS s3cr3t
        S: -ERR [LOGIN-DELAY] logged in too recently; try again later
        C: USER too-soon
        S: +OK send PASS
        C: PASS s3cr3t
        S: -ERR [LOGIN-DELAY] logged in too recently; try again later
        C: USER too-soon
        S: +OK send PASS
        C: PASS s3cr3t
        S: -ERR [LOGIN-DELAY] logged in too recently; try again later
        C: USER printer
        S: +OK send PASS
        C: PASS s3cr3t
        S: +OK maildrop has 3 messages (100 octets)
        C: CAPA
        S: +OK capability list follows
        S: TOP
        S: UIDL
        S: RESP-CODES
        S: AUTH-RESP-CODE
        S: PIPELINING
        S: EXPIRE 0
        S: LOGIN-DELAY 300
        S: IMPLEMENTATION popgate 0.1.0
        S: .
    ");
}
