//! Session transcripts: `C:` lines are fed to the session, `S:` lines are
//! the exact bytes expected back. A synchronous stand-in driver performs the
//! steps: alice/s3cr3t logs in as alice@example.com (alias
//! office@example.com), and relayed messages are recorded.

use super::*;
use crate::smtp::command::LineReader;

struct Harness {
    session: Session,
    relayed: Vec<(Envelope, Vec<u8>)>,
    /// What the next relay answers.
    upstream: Option<RelayFailure>,
    rules: SenderRules,
    /// The envelope rules that refused something, in order.
    refused: Vec<Rule>,
    closed: bool,
    tls: bool,
    greeted: bool,
}

fn rules() -> SenderRules {
    SenderRules {
        addresses: vec!["alice@example.com".into(), "office@example.com".into()],
        rewrite: false,
        recipient_domains: Vec::new(),
    }
}

impl Harness {
    fn new(config: SessionConfig) -> Self {
        Harness {
            session: Session::new(config),
            relayed: Vec::new(),
            upstream: None,
            rules: rules(),
            refused: Vec::new(),
            closed: false,
            tls: false,
            greeted: false,
        }
    }

    fn perform(&mut self, step: Step, out: &mut Vec<u8>) {
        match step {
            Step::Read => {}
            Step::Reply(r) => r.write_to(out),
            Step::Refused { reply, rule } => {
                reply.write_to(out);
                self.refused.push(rule);
            }
            Step::Close(r) => {
                r.write_to(out);
                self.closed = true;
            }
            Step::StartTls(r) => {
                r.write_to(out);
                self.tls = true;
                self.session.tls_started(true);
            }
            Step::Login(c) => {
                let step = if c.user == "down" {
                    self.session.login_failed(&BackendError::unavailable("down"))
                } else if c == Credentials::password("alice", "s3cr3t") {
                    self.session.login_succeeded(self.rules.clone())
                } else {
                    self.session.login_failed(&BackendError::AuthFailed)
                };
                self.perform(step, out);
            }
            Step::Relay { envelope, message } => {
                let result = match self.upstream.take() {
                    Some(failure) => Err(failure),
                    None => {
                        self.relayed.push((envelope, message));
                        Ok(())
                    }
                };
                let step = self.session.relay_finished(result);
                self.perform(step, out);
            }
        }
    }

    /// Runs a transcript; several `C:` lines before an `S:` are pipelined.
    fn run(&mut self, script: &str) {
        let mut expected = Vec::new();
        let mut out = Vec::new();
        if !std::mem::replace(&mut self.greeted, true) {
            self.session.greeting().write_to(&mut out);
        }
        let mut reader = LineReader::new();
        for line in script.lines().map(str::trim_start).filter(|l| !l.is_empty()) {
            if let Some(c) = line.strip_prefix("C: ") {
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
        assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(&expected));
    }
}

fn run(script: &str) -> Harness {
    let mut h = Harness::new(SessionConfig::default());
    h.run(script);
    h
}

const EHLO: &str = "
    S: 220 popgate ESMTP popgate
    C: EHLO scanner.local
    S: 250-popgate
    S: 250-PIPELINING
    S: 250-SIZE 26214400
    S: 250-8BITMIME
    S: 250-SMTPUTF8
    S: 250-ENHANCEDSTATUSCODES
    S: 250 AUTH PLAIN LOGIN
";

#[test]
fn scan_sent_with_auth_plain() {
    let mut h = run(EHLO);
    h.run(
        "
        C: AUTH PLAIN AGFsaWNlAHMzY3IzdA==
        S: 235 2.7.0 Authentication successful
        C: MAIL FROM:<Alice@Example.com> SIZE=100 BODY=8BITMIME
        S: 250 2.1.0 Ok
        C: RCPT TO:<bob@example.net>
        S: 250 2.1.5 Ok
        C: RCPT TO:<carol@example.org>
        S: 250 2.1.5 Ok
        C: DATA
        S: 354 End data with <CR><LF>.<CR><LF>
        C: From: Scanner <alice@example.com>
        C: Subject: scan
        C: 
        C: ..leading dot
        C: .
        S: 250 2.0.0 Ok: accepted by the upstream
        C: QUIT
        S: 221 2.0.0 Bye
    ",
    );
    assert!(h.closed);
    let (envelope, message) = &h.relayed[0];
    assert_eq!(
        *envelope,
        Envelope {
            sender: "Alice@Example.com".into(),
            recipients: vec!["bob@example.net".into(), "carol@example.org".into()],
            eight_bit: true,
            smtputf8: false,
        }
    );
    assert_eq!(message, b"From: Scanner <alice@example.com>\r\nSubject: scan\r\n\r\n.leading dot\r\n");
}

#[test]
fn auth_login_pipelined_transaction_and_rset() {
    let mut h = run(EHLO);
    h.run(
        "
        C: AUTH LOGIN
        S: 334 VXNlcm5hbWU6
        C: YWxpY2U=
        S: 334 UGFzc3dvcmQ6
        C: czNjcjN0
        S: 235 2.7.0 Authentication successful
        C: MAIL FROM:<office@example.com>
        C: RCPT TO:<bob@example.net>
        C: DATA
        C: From: office@example.com (the office)
        C: 
        C: hi
        C: .
        C: MAIL FROM:<alice@example.com>
        C: RSET
        C: RCPT TO:<bob@example.net>
        C: NOOP
        S: 250 2.1.0 Ok
        S: 250 2.1.5 Ok
        S: 354 End data with <CR><LF>.<CR><LF>
        S: 250 2.0.0 Ok: accepted by the upstream
        S: 250 2.1.0 Ok
        S: 250 2.0.0 Ok
        S: 503 5.5.1 need MAIL command
        S: 250 2.0.0 Ok
        C: AUTH PLAIN AGFsaWNlAHMzY3IzdA==
        S: 503 5.5.1 already authenticated
    ",
    );
    assert_eq!(h.relayed.len(), 1);
    assert_eq!(h.relayed[0].1, b"From: office@example.com (the office)\r\n\r\nhi\r\n");
}

#[test]
fn nothing_before_login_and_ehlo() {
    let mut h = run("
        S: 220 popgate ESMTP popgate
        C: MAIL FROM:<alice@example.com>
        S: 503 5.5.1 send EHLO first
        C: HELO scanner
        S: 250 popgate
        C: MAIL FROM:<alice@example.com>
        S: 530 5.7.0 authentication required
        C: RCPT TO:<bob@example.net>
        S: 503 5.5.1 need MAIL command
        C: DATA
        S: 530 5.7.0 authentication required
        C: VRFY bob
        S: 252 2.5.2 cannot VRFY; send the message and see
    ");
    assert!(h.relayed.is_empty());
    h.run(
        "
        C: AUTH PLAIN AGFsaWNlAHdyb25n
        S: 535 5.7.8 authentication credentials invalid
        C: AUTH PLAIN
        S: 334 
        C: *
        S: 501 5.0.0 authentication cancelled
        C: AUTH CRAM-MD5
        S: 504 5.5.4 unsupported mechanism; use PLAIN or LOGIN
        C: AUTH PLAIN !!!
        S: 501 5.5.2 invalid base64 in the authentication exchange
        C: AUTH PLAIN AGFsaWNlAHdyb25n
        S: 421 4.7.0 too many failed authentications; closing
    ",
    );
    assert!(h.closed);
}

#[test]
fn temporary_login_failure_is_454_and_not_counted() {
    let mut h = run(EHLO);
    // "\0down\0x"
    h.run(
        "
        C: AUTH PLAIN AGRvd24AeA==
        S: 454 4.7.0 temporary authentication failure; try again later
        C: AUTH PLAIN AGRvd24AeA==
        S: 454 4.7.0 temporary authentication failure; try again later
        C: AUTH PLAIN AGRvd24AeA==
        S: 454 4.7.0 temporary authentication failure; try again later
        C: AUTH PLAIN AGFsaWNlAHMzY3IzdA==
        S: 235 2.7.0 Authentication successful
    ",
    );
}

#[test]
fn spoofed_sender_and_from_are_refused() {
    let mut h = run(EHLO);
    h.run(
        "
        C: AUTH PLAIN AGFsaWNlAHMzY3IzdA==
        S: 235 2.7.0 Authentication successful
        C: MAIL FROM:<ceo@example.com>
        S: 550 5.7.1 sender ceo@example.com refused: send as alice@example.com or one of its aliases
        C: MAIL FROM:<>
        S: 550 5.7.1 sender <> refused: send as alice@example.com or one of its aliases
        C: MAIL FROM:<alice@example.com>
        S: 250 2.1.0 Ok
        C: RCPT TO:<bob@example.net>
        S: 250 2.1.5 Ok
        C: DATA
        S: 354 End data with <CR><LF>.<CR><LF>
        C: Subject: x
        C: from: \"The CEO\"
        C:   <ceo@example.com>
        C: 
        C: wire the money
        C: .
        S: 550 5.7.1 From: ceo@example.com refused: send as alice@example.com or one of its aliases
        C: MAIL FROM:<alice@example.com>
        S: 250 2.1.0 Ok
        C: RCPT TO:<bob@example.net>
        S: 250 2.1.5 Ok
        C: DATA
        S: 354 End data with <CR><LF>.<CR><LF>
        C: Subject: no from
        C: 
        C: From: alice@example.com is in the body, not the header
        C: .
        S: 550 5.7.1 the message has no From: header; send as alice@example.com
    ",
    );
    assert!(h.relayed.is_empty());
    assert_eq!(h.refused, [Rule::Sender, Rule::Sender, Rule::FromHeader, Rule::FromHeader]);
}

#[test]
fn sender_and_from_rewritten_when_configured() {
    let mut h = Harness::new(SessionConfig::default());
    h.rules.rewrite = true;
    h.run(EHLO);
    h.run(
        "
        C: AUTH PLAIN AGFsaWNlAHMzY3IzdA==
        S: 235 2.7.0 Authentication successful
        C: MAIL FROM:<scanner@printer.local>
        S: 250 2.1.0 Ok
        C: RCPT TO:<bob@example.net>
        S: 250 2.1.5 Ok
        C: DATA
        S: 354 End data with <CR><LF>.<CR><LF>
        C: Subject: scan
        C: From: \"Scanner 3F\" <scanner@printer.local>
        C: To: bob@example.net
        C: 
        C: body
        C: .
        S: 250 2.0.0 Ok: accepted by the upstream
    ",
    );
    let (envelope, message) = &h.relayed[0];
    assert_eq!(envelope.sender, "alice@example.com");
    assert_eq!(
        String::from_utf8_lossy(message),
        "Subject: scan\r\nFrom: \"Scanner 3F\" <alice@example.com>\r\nTo: bob@example.net\r\n\r\nbody\r\n"
    );
}

#[test]
fn recipients_limited_by_count_and_domain() {
    let mut h = Harness::new(SessionConfig { max_recipients: 2, ..SessionConfig::default() });
    h.rules.recipient_domains = vec!["example.com".into()];
    h.run(EHLO);
    h.run(
        "
        C: AUTH PLAIN AGFsaWNlAHMzY3IzdA==
        S: 235 2.7.0 Authentication successful
        C: MAIL FROM:<alice@example.com>
        S: 250 2.1.0 Ok
        C: RCPT TO:<bob@example.net>
        S: 550 5.7.1 recipient bob@example.net refused: its domain is not allowed
        C: DATA
        S: 554 5.5.1 no valid recipients
        C: RCPT TO:<a@EXAMPLE.com>
        S: 250 2.1.5 Ok
        C: RCPT TO:<b@example.com>
        S: 250 2.1.5 Ok
        C: RCPT TO:<c@example.com>
        S: 452 4.5.3 too many recipients
    ",
    );
    // Too many recipients is a limit, not a rule: counted once, the domain.
    assert_eq!(h.refused, [Rule::Recipient]);
}

#[test]
fn message_size_and_line_length_bounded() {
    let mut h = Harness::new(SessionConfig { max_message_size: 40, data_line_limit: 30, ..SessionConfig::default() });
    h.run(
        "
        S: 220 popgate ESMTP popgate
        C: EHLO x
        S: 250-popgate
        S: 250-PIPELINING
        S: 250-SIZE 40
        S: 250-8BITMIME
        S: 250-SMTPUTF8
        S: 250-ENHANCEDSTATUSCODES
        S: 250 AUTH PLAIN LOGIN
        C: AUTH PLAIN AGFsaWNlAHMzY3IzdA==
        S: 235 2.7.0 Authentication successful
        C: MAIL FROM:<alice@example.com> SIZE=41
        S: 552 5.3.4 message size exceeds fixed maximum message size
        C: MAIL FROM:<alice@example.com> SIZE=40
        S: 250 2.1.0 Ok
        C: RCPT TO:<bob@example.net>
        S: 250 2.1.5 Ok
        C: DATA
        S: 354 End data with <CR><LF>.<CR><LF>
        C: From: alice@example.com
        C: 
        C: 0123456789
        C: 0123456789
        C: .
        S: 552 5.3.4 message size exceeds fixed maximum message size
        C: MAIL FROM:<alice@example.com>
        S: 250 2.1.0 Ok
        C: RCPT TO:<bob@example.net>
        S: 250 2.1.5 Ok
        C: DATA
        S: 354 End data with <CR><LF>.<CR><LF>
        C: From: alice@example.com
        C: 0123456789012345678901234567890123456789
        C: .
        S: 500 5.5.2 message has a line longer than 30 octets
        C: MAIL FROM:<alice@example.com>
        S: 250 2.1.0 Ok
    ",
    );
    assert!(h.relayed.is_empty());
}

#[test]
fn upstream_failures_keep_their_class() {
    let mut h = run(EHLO);
    h.run(
        "
        C: AUTH PLAIN AGFsaWNlAHMzY3IzdA==
        S: 235 2.7.0 Authentication successful
    ",
    );
    let send = |h: &mut Harness, failure: RelayFailure, reply: &str| {
        h.upstream = Some(failure);
        h.run(&format!(
            "
            C: MAIL FROM:<alice@example.com>
            C: RCPT TO:<bob@example.net>
            C: DATA
            C: From: alice@example.com
            C: 
            C: x
            C: .
            S: 250 2.1.0 Ok
            S: 250 2.1.5 Ok
            S: 354 End data with <CR><LF>.<CR><LF>
            S: {reply}
            "
        ));
    };
    send(&mut h, RelayFailure::Unavailable, "451 4.4.1 upstream unavailable; message not sent, try again later");
    send(
        &mut h,
        RelayFailure::Upstream { code: 550, text: "5.7.60 SMTP; Client does not have permissions".into() },
        "550 5.7.60 upstream: SMTP; Client does not have permissions",
    );
    send(
        &mut h,
        RelayFailure::Upstream { code: 452, text: "mailbox full\r\n250 ok".into() },
        "452 4.0.0 upstream: mailbox full  250 ok",
    );
    send(&mut h, RelayFailure::RateLimited, "450 4.7.1 hourly sending limit reached for this device; try again later");
    send(
        &mut h,
        RelayFailure::Credentials,
        "451 4.7.0 upstream refused the account's credentials; message not sent, try again later",
    );
    assert!(h.relayed.is_empty());
}

#[test]
fn starttls_required_for_auth_and_starts_over() {
    let mut h =
        Harness::new(SessionConfig { login_permitted: false, starttls_offered: true, ..SessionConfig::default() });
    h.run(
        "
        S: 220 popgate ESMTP popgate
        C: EHLO x
        S: 250-popgate
        S: 250-PIPELINING
        S: 250-SIZE 26214400
        S: 250-8BITMIME
        S: 250-SMTPUTF8
        S: 250-ENHANCEDSTATUSCODES
        S: 250 STARTTLS
        C: AUTH PLAIN AGFsaWNlAHMzY3IzdA==
        S: 530 5.7.0 login is not allowed without TLS here; issue STARTTLS first
        C: STARTTLS
        S: 220 2.0.0 Ready to start TLS
        C: MAIL FROM:<alice@example.com>
        S: 503 5.5.1 send EHLO first
        C: EHLO x
        S: 250-popgate
        S: 250-PIPELINING
        S: 250-SIZE 26214400
        S: 250-8BITMIME
        S: 250-SMTPUTF8
        S: 250-ENHANCEDSTATUSCODES
        S: 250 AUTH PLAIN LOGIN
        C: STARTTLS
        S: 502 5.5.1 STARTTLS not available here
    ",
    );
    assert!(h.tls);
}

#[test]
fn bad_commands_are_limited() {
    let mut h = Harness::new(SessionConfig { max_bad_commands: 3, ..SessionConfig::default() });
    h.run(
        "
        S: 220 popgate ESMTP popgate
        C: GET / HTTP/1.1
        S: 500 5.5.2 command not recognized
        C: MAIL FROM:<x@y> FOO=BAR
        S: 555 5.5.4 unsupported parameter FOO
        C: EHLO
        S: 421 4.7.0 too many errors; closing
    ",
    );
    assert!(h.closed);
}

#[test]
fn smtputf8_addresses_need_the_parameter() {
    let mut h = Harness::new(SessionConfig::default());
    h.rules.addresses = vec!["stéphane@example.com".into()];
    h.run(EHLO);
    h.run(
        "
        C: AUTH PLAIN AGFsaWNlAHMzY3IzdA==
        S: 235 2.7.0 Authentication successful
        C: MAIL FROM:<stéphane@example.com>
        S: 553 5.6.7 non-ASCII address needs the SMTPUTF8 parameter
        C: MAIL FROM:<stéphane@example.com> SMTPUTF8
        S: 250 2.1.0 Ok
        C: RCPT TO:<zoë@example.net>
        S: 250 2.1.5 Ok
    ",
    );
}

#[test]
fn timeouts_and_shutdown_close_with_421() {
    let mut h = run(EHLO);
    assert_eq!(h.session.timed_out().to_bytes(), b"421 4.4.2 idle for too long; closing\r\n");
    h = run(EHLO);
    assert_eq!(h.session.shutting_down().to_bytes(), b"421 4.3.2 server shutting down; try again later\r\n");
}

#[test]
fn header_recipients_are_every_to_cc_and_bcc_address() {
    let message =
        b"From: a@x.test\r\nTo: \"Doe, Jo\" <Jo@X.test>,\r\n\tb@y.test (B, \\) c)\r\nCc: Team: c@z.test, d@z.test;\r\n\
                    Bcc: undisclosed-recipients:;\r\nSubject: To: e@no.test\r\nto: f@x.test\r\n\r\nTo: g@body.test\r\n";
    assert_eq!(
        super::header_recipients(message),
        ["jo@x.test", "b@y.test", "c@z.test", "d@z.test", "f@x.test"].map(String::from).to_vec()
    );
}
