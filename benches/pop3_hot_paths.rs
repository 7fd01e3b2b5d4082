//! Hot paths of a POP3 session: command parsing and the response writer
//! (dot-stuffing and CRLF normalization). Throughput is reported in bytes, so
//! criterion prints GB/s. Run: `cargo bench --bench pop3_hot_paths`.
//!
//! `retr_encode/reference_naive_*` is a same-run reference, not popgate code:
//! the textbook byte-at-a-time encoder (`popgate::canonical::reference`,
//! shared with the fuzz targets) doing the same job — CRLF line ends, dot-stuffing, the final `.` line — so the
//! figures of popgate's `BodyEncoder` are read side by side with it.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use popgate::canonical::CanonicalSize;
use popgate::canonical::reference::{NaiveEncoder, naive_size as reference_naive_size};
use popgate::pop3::{BodyEncoder, Command, LineReader};
use std::hint::black_box;

/// A realistic message: headers, a text part and a base64 attachment, with
/// CRLF or bare-LF line ends and a few lines that need dot-stuffing.
fn message(size: usize, line_end: &str) -> Vec<u8> {
    let mut m = String::new();
    for (k, v) in [
        ("Return-Path", "<scanner3@office.example>"),
        ("From", "Scanner 3rd floor <scanner3@office.example>"),
        ("To", "printer@office.example"),
        ("Subject", "Scan to print: 12 pages"),
        ("Date", "Fri, 27 Nov 2026 09:10:00 +0000"),
        ("Message-ID", "<scan-0042@office.example>"),
        ("MIME-Version", "1.0"),
        ("Content-Type", "multipart/mixed; boundary=\"scan\""),
    ] {
        m.push_str(&format!("{k}: {v}{line_end}"));
    }
    m.push_str(line_end);
    m.push_str(&format!("--scan{line_end}Content-Type: text/plain{line_end}{line_end}"));
    m.push_str(&format!(".This line starts with a dot.{line_end}Scanned document attached.{line_end}"));
    m.push_str(&format!("--scan{line_end}Content-Transfer-Encoding: base64{line_end}{line_end}"));
    let b64 = "JVBERi0xLjQKMSAwIG9iago8PCAvVHlwZSAvQ2F0YWxvZyAvUGFnZXMgMiAwIFIgPj4KZW5kb2Jq";
    while m.len() < size {
        m.push_str(b64);
        m.push_str(line_end);
    }
    m.push_str(&format!("--scan--{line_end}"));
    m.into_bytes()
}

fn reference_naive_encode(msg: &[u8], out: &mut Vec<u8>) {
    let mut encoder = NaiveEncoder::whole();
    for chunk in msg.chunks(256 * 1024) {
        encoder.push(chunk, out);
    }
    encoder.finish(out);
}

fn popgate_encode(msg: &[u8], out: &mut Vec<u8>) {
    let mut encoder = BodyEncoder::whole();
    // 256 KiB chunks, as the IMAP backend delivers them.
    for chunk in msg.chunks(256 * 1024) {
        encoder.push(chunk, out);
    }
    encoder.finish(out);
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("retr_encode");
    for (name, line_end) in [("crlf", "\r\n"), ("bare_lf", "\n")] {
        for size in [20 * 1024, 1024 * 1024] {
            let msg = message(size, line_end);
            // The reference must do exactly popgate's job to be a reference.
            let (mut ours, mut naive) = (Vec::new(), Vec::new());
            popgate_encode(&msg, &mut ours);
            reference_naive_encode(&msg, &mut naive);
            assert!(ours == naive, "the naive reference encodes {name}/{size} differently from BodyEncoder");
            group.throughput(Throughput::Bytes(msg.len() as u64));
            group.bench_with_input(BenchmarkId::new(name, size), &msg, |b, msg| {
                let mut out = Vec::with_capacity(msg.len() * 2);
                b.iter(|| {
                    out.clear();
                    popgate_encode(black_box(msg), &mut out);
                    black_box(out.len())
                })
            });
            group.bench_with_input(BenchmarkId::new(format!("reference_naive_{name}"), size), &msg, |b, msg| {
                let mut out = Vec::with_capacity(msg.len() * 2);
                b.iter(|| {
                    out.clear();
                    reference_naive_encode(black_box(msg), &mut out);
                    black_box(out.len())
                })
            });
        }
    }
    group.finish();

    let mut group = c.benchmark_group("canonical_size");
    let msg = message(1024 * 1024, "\n");
    group.throughput(Throughput::Bytes(msg.len() as u64));
    group.bench_function("bare_lf_1MiB", |b| {
        b.iter(|| {
            let mut counter = CanonicalSize::new();
            counter.feed(black_box(&msg));
            counter.finish()
        })
    });
    // REFERENCE, not popgate code: the same count, byte at a time.
    let mut counter = CanonicalSize::new();
    counter.feed(&msg);
    assert_eq!(counter.finish(), reference_naive_size(&msg), "the naive size reference disagrees");
    group.bench_function("reference_naive_bare_lf_1MiB", |b| b.iter(|| reference_naive_size(black_box(&msg))));
    group.finish();
}

fn parse(c: &mut Criterion) {
    let script: &[u8] =
        b"USER printer-3\r\nPASS correct horse\r\nSTAT\r\nUIDL\r\nLIST\r\nRETR 1\r\nDELE 1\r\nTOP 2 10\r\nQUIT\r\n";
    let mut group = c.benchmark_group("command_parse");
    group.throughput(Throughput::Bytes(script.len() as u64));
    group.bench_function("pipelined_session", |b| {
        b.iter(|| {
            let mut reader = LineReader::new();
            reader.push(black_box(script));
            let mut n = 0;
            while let Some(popgate::pop3::Line::Complete(line)) = reader.next_line(255) {
                n += Command::parse(&line).is_ok() as usize;
            }
            n
        })
    });
    group.finish();
}

criterion_group!(benches, encode, parse);
criterion_main!(benches);
