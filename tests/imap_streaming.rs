//! IMAP retrieval at the backend's speed, held to the same octets (issue
//! #14, targets 1 and 2) against a real Dovecot: a 100 MiB RETR is one
//! streamed `BODY.PEEK[]` literal, byte-identical to Dovecot's own POP3 and
//! in bounded memory; small messages fetched ahead in batches come out in
//! the order asked, byte-identical, and nothing is marked \Seen by it.
//! Correctness only: the speed is measured by scripts/bench.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};
use support::dovecot::{ALICE, Dovecot};
use support::gateway::{Gateway, GatewayProcess};
use support::messages::{big, simple};
use support::pop3::Pop3;

/// What a RETR sends, hashed line by line (un-stuffed, CRLF restored), and
/// its length: 100 MiB is not held to be compared.
fn retr_digest(c: &mut Pop3, n: u32) -> (Vec<u8>, u64) {
    c.send(&format!("RETR {n}"));
    let status = c.line();
    assert!(status.starts_with("+OK"), "RETR {n}: {status}");
    let mut hash = Sha256::new();
    let mut octets = 0u64;
    c.body_each_line(|line| {
        hash.update(line);
        hash.update(b"\r\n");
        octets += line.len() as u64 + 2;
    });
    (hash.finalize().to_vec(), octets)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Samples a process's resident memory until dropped; `peak` is the most
/// seen. (A bound on memory, counted in KiB: no timing is asserted.)
struct RssWatch {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssWatch {
    fn start(pid: u32) -> RssWatch {
        let peak = Arc::new(AtomicU64::new(rss_kib(pid)));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss_kib(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        RssWatch { peak, stop, thread: Some(thread) }
    }

    fn peak(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("sampler");
        }
        self.peak.load(Ordering::Relaxed)
    }
}

#[test]
fn a_100_mib_retr_is_dovecots_own_octets_in_bounded_memory() {
    let dovecot = Dovecot::start();
    dovecot.append_all(ALICE.0, &[simple("small one"), big(100)]);
    let gateway = GatewayProcess::start(&["--backend", &dovecot.imap_url()]);
    // Warm: a first session (its login measures the big message, streamed
    // too) and a small RETR, so the baseline has the runtime's own growth.
    let mut c = Pop3::login(gateway.addr, ALICE.0, ALICE.1);
    let sizes = c.list();
    c.retr(1);
    c.quit();
    let baseline = gateway.rss_kib();

    let watch = RssWatch::start(gateway.pid());
    let mut c = Pop3::login(gateway.addr, ALICE.0, ALICE.1);
    let (ours, octets) = retr_digest(&mut c, 2);
    // The same connection serves on after the big literal.
    let small = c.retr(1);
    c.quit();
    let peak = watch.peak();

    assert_eq!(octets, sizes[1].1, "LIST 2 must equal the octets RETR 2 sends");
    let mut reference = Pop3::login(dovecot.pop3_addr(), ALICE.0, ALICE.1);
    let (theirs, their_octets) = retr_digest(&mut reference, 2);
    let their_small = reference.retr(1);
    reference.quit();
    assert_eq!(octets, their_octets, "RETR 2: as many octets as Dovecot's own POP3 sends");
    assert!(ours == theirs, "RETR 2 differs from Dovecot's own POP3");
    assert_eq!(small, their_small);
    let growth = peak.saturating_sub(baseline);
    assert!(
        growth <= 16 * 1024,
        "resident memory grew by {growth} KiB during a 100 MiB RETR (baseline {baseline} KiB)"
    );
}

/// 500 messages of about 20 KiB (one of 2 MiB among them, streamed alone)
/// retrieved through prefetch batches: every RETR is Dovecot's own octets
/// for that message — in order, out of order, after a TOP — and no message
/// is \Seen afterwards (PEEK; `mark_seen` is off).
#[test]
fn prefetched_messages_keep_their_octets_and_order_and_are_not_marked_seen() {
    let dovecot = Dovecot::start();
    let messages: Vec<Vec<u8>> = (1..=500)
        .map(|i| {
            if i == 250 {
                return big(2);
            }
            let mut m = simple(&format!("message {i}"));
            let filler = format!("line {i} of a 20 KiB message\r\n");
            while m.len() < 20 * 1024 + i {
                m.extend_from_slice(filler.as_bytes());
            }
            m
        })
        .collect();
    dovecot.append_all(ALICE.0, &messages);
    let gateway = Gateway::url(&dovecot.imap_url());

    let mut c = gateway.login(ALICE.0, ALICE.1);
    let (count, _) = c.stat();
    assert_eq!(count, 500);
    // In order, then a few out of order and after TOPs.
    let mut order: Vec<u32> = (1..=500).collect();
    order.extend([17, 3, 499, 250, 251, 1]);
    let mut ours = Vec::new();
    for &n in &order {
        if n == 251 {
            c.top(300, 0);
        }
        ours.push((n, c.retr(n)));
    }
    c.quit();

    let stored = dovecot.messages(ALICE.0);
    assert_eq!(stored.len(), 500);
    for m in &stored {
        assert!(!m.flags.iter().any(|f| f.eq_ignore_ascii_case("\\Seen")), "UID {} was marked \\Seen", m.uid);
    }

    let mut reference = Pop3::login(dovecot.pop3_addr(), ALICE.0, ALICE.1);
    for (n, body) in &ours {
        let theirs = reference.retr(*n);
        assert!(body == &theirs, "RETR {n} differs from Dovecot's own POP3");
    }
    reference.quit();
}
