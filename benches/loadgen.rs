//! loadgen: the POP3 load client of the benchmark (`scripts/bench`).
//!
//! One tokio client for every server measured (Dovecot's native POP3,
//! Dovecot's POP3 over imapc, popgate), so the figures differ only by the
//! server. It is a `[[bench]]` with `harness = false` so that it is built
//! with the benchmark profile and never shipped; `scripts/bench` builds it
//! with `cargo bench --bench loadgen --no-run` and runs the executable.
//!
//! Modes (`--mode`):
//! - `login`: connect, USER, PASS, STAT, QUIT — `count` times per worker.
//! - `poll`: connect, USER, PASS, STAT, UIDL, QUIT — `count` times per worker.
//! - `retrieve-all`: log in, LIST, RETR every message one at a time (no
//!   pipelining, like a plain client), checking each body's octets against
//!   LIST, QUIT — `count` times per worker.
//! - `retr`: log in, RETR `--msg`, QUIT — `count` times per worker. With
//!   `--wait-stdin` it prints `{"event":"logged_in"}` after STAT and
//!   `{"event":"retrieved"}` after the body, and each time waits for a line
//!   on stdin before going on (so `scripts/bench` can read the server's
//!   memory at those two moments).
//! - `idle-hold`: open `--concurrency` sessions (at most `--ramp` logins in
//!   flight), log each in (USER, PASS, STAT), print
//!   `{"event":"holding",...}`, hold them until a line arrives on stdin (or
//!   `--hold-secs`), then QUIT them all.
//!
//! `--concurrency` workers run at once; each uses the account
//! `--user`, or `{user-prefix}{index % users}` (zero-padded to
//! `--user-width`) with `--users N`. Every wait is bounded by `--io-timeout`
//! and the whole run by `--time-limit`. The last line printed is the result
//! as JSON: counts, rates, and latency percentiles (milliseconds) per phase.
//!
//! Run without `--target` (as `cargo test --all-targets` or `cargo bench`
//! do) it prints a note and exits: it is a tool, not a test.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::watch;

#[derive(Clone, Debug)]
struct Args {
    target: String,
    mode: Mode,
    user: Option<String>,
    user_prefix: Option<String>,
    users: usize,
    user_width: usize,
    pass: String,
    concurrency: usize,
    count: usize,
    msg: usize,
    ramp: usize,
    hold_secs: u64,
    wait_stdin: bool,
    raw: bool,
    interval: Option<Duration>,
    io_timeout: Duration,
    time_limit: Duration,
    threads: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Login,
    Poll,
    RetrieveAll,
    Retr,
    IdleHold,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Login => "login",
            Mode::Poll => "poll",
            Mode::RetrieveAll => "retrieve-all",
            Mode::Retr => "retr",
            Mode::IdleHold => "idle-hold",
        }
    }
}

const USAGE: &str = "usage: loadgen --target HOST:PORT --mode login|poll|retrieve-all|retr|idle-hold \
(--user NAME | --user-prefix P --users N [--user-width W]) --pass PASSWORD \
[--concurrency C] [--count N] [--msg N] [--ramp N] [--hold-secs S] [--wait-stdin] [--raw] \
[--interval-ms MS] [--io-timeout S] [--time-limit S] [--threads N]";

fn parse_args(raw: Vec<String>) -> Result<Args, String> {
    let mut args = Args {
        target: String::new(),
        mode: Mode::Login,
        user: None,
        user_prefix: None,
        users: 1,
        user_width: 4,
        pass: String::new(),
        concurrency: 1,
        count: 1,
        msg: 1,
        ramp: 200,
        hold_secs: 300,
        wait_stdin: false,
        raw: false,
        interval: None,
        io_timeout: Duration::from_secs(60),
        time_limit: Duration::from_secs(300),
        threads: 1,
    };
    let mut it = raw.into_iter();
    while let Some(flag) = it.next() {
        if flag == "--wait-stdin" {
            args.wait_stdin = true;
            continue;
        }
        if flag == "--raw" {
            args.raw = true;
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = |v: &str| v.parse::<u64>().map_err(|_| format!("{flag}: not a number: {v}"));
        match flag.as_str() {
            "--target" => args.target = value,
            "--mode" => {
                args.mode = match value.as_str() {
                    "login" => Mode::Login,
                    "poll" => Mode::Poll,
                    "retrieve-all" => Mode::RetrieveAll,
                    "retr" => Mode::Retr,
                    "idle-hold" => Mode::IdleHold,
                    other => return Err(format!("unknown mode {other}")),
                }
            }
            "--user" => args.user = Some(value),
            "--user-prefix" => args.user_prefix = Some(value),
            "--users" => args.users = number(&value)?.max(1) as usize,
            "--user-width" => args.user_width = number(&value)? as usize,
            "--pass" => args.pass = value,
            "--concurrency" => args.concurrency = number(&value)?.max(1) as usize,
            "--count" => args.count = number(&value)?.max(1) as usize,
            "--msg" => args.msg = number(&value)?.max(1) as usize,
            "--ramp" => args.ramp = number(&value)?.max(1) as usize,
            "--hold-secs" => args.hold_secs = number(&value)?,
            "--io-timeout" => args.io_timeout = Duration::from_secs(number(&value)?.max(1)),
            "--time-limit" => args.time_limit = Duration::from_secs(number(&value)?.max(1)),
            "--threads" => args.threads = number(&value)?.max(1) as usize,
            "--interval-ms" => args.interval = Some(Duration::from_millis(number(&value)?.max(1))),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.target.is_empty() {
        return Err("--target is required".into());
    }
    if args.user.is_none() && args.user_prefix.is_none() {
        return Err("--user or --user-prefix is required".into());
    }
    Ok(args)
}

impl Args {
    fn user_for(&self, index: usize) -> String {
        match (&self.user_prefix, &self.user) {
            (Some(prefix), _) => format!("{prefix}{:0width$}", index % self.users, width = self.user_width),
            (None, Some(user)) => user.clone(),
            (None, None) => unreachable!("checked in parse_args"),
        }
    }
}

fn main() {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    if !raw.iter().any(|a| a == "--target") {
        // `cargo test --all-targets` and `cargo bench` run every bench
        // target; this one is a tool driven by scripts/bench. Asked for its
        // test list (nextest, `-- --list`), it has none.
        if raw.iter().any(|a| a == "--list") {
            return;
        }
        println!("loadgen: the POP3 load client of scripts/bench; nothing to do without --target");
        println!("{USAGE}");
        return;
    }
    let args = match parse_args(raw) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("loadgen: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(args.threads).enable_all().build()
    }
    .expect("tokio runtime");
    let result = runtime.block_on(run(args));
    println!("{result}");
}

// ---------------------------------------------------------------- client --

#[derive(Debug)]
struct Failure(String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(e.to_string())
    }
}

type Res<T> = Result<T, Failure>;

struct Pop3 {
    stream: BufReader<TcpStream>,
    line: Vec<u8>,
    io_timeout: Duration,
}

impl Pop3 {
    async fn connect(target: &str, io_timeout: Duration) -> Res<Pop3> {
        let tcp = tokio::time::timeout(io_timeout, TcpStream::connect(target))
            .await
            .map_err(|_| Failure("connect timed out".into()))??;
        tcp.set_nodelay(true)?;
        let mut pop3 =
            Pop3 { stream: BufReader::with_capacity(64 * 1024, tcp), line: Vec::with_capacity(256), io_timeout };
        pop3.ok("greeting").await?;
        Ok(pop3)
    }

    async fn send(&mut self, command: &str) -> Res<()> {
        let stream = self.stream.get_mut();
        let mut bytes = Vec::with_capacity(command.len() + 2);
        bytes.extend_from_slice(command.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        tokio::time::timeout(self.io_timeout, stream.write_all(&bytes))
            .await
            .map_err(|_| Failure("write timed out".into()))??;
        Ok(())
    }

    /// Reads one line (CRLF included) into `self.line`.
    async fn read_line(&mut self) -> Res<()> {
        self.line.clear();
        let n = tokio::time::timeout(self.io_timeout, self.stream.read_until(b'\n', &mut self.line))
            .await
            .map_err(|_| Failure("read timed out".into()))??;
        if n == 0 {
            return Err(Failure("connection closed by server".into()));
        }
        Ok(())
    }

    /// Reads a status line; `Err` unless it is `+OK`.
    async fn ok(&mut self, what: &str) -> Res<()> {
        self.read_line().await?;
        if self.line.starts_with(b"+OK") {
            Ok(())
        } else {
            let text = String::from_utf8_lossy(&self.line);
            let text: String = text.trim_end().chars().take(80).collect();
            Err(Failure(format!("{what}: {text}")))
        }
    }

    async fn command(&mut self, command: &str, what: &str) -> Res<()> {
        self.send(command).await?;
        self.ok(what).await
    }

    /// Reads a multi-line body up to its `.` line. Returns (octets after
    /// un-stuffing, CRLF included, lines).
    async fn body(&mut self, mut on_line: impl FnMut(&[u8])) -> Res<(u64, u64)> {
        let mut octets = 0u64;
        let mut lines = 0u64;
        loop {
            self.read_line().await?;
            let line = &self.line[..];
            if !line.ends_with(b"\r\n") {
                return Err(Failure("line without CRLF in a multi-line reply".into()));
            }
            if line == b".\r\n" {
                return Ok((octets, lines));
            }
            let unstuffed = if line.starts_with(b".") { &line[1..] } else { line };
            octets += unstuffed.len() as u64;
            lines += 1;
            on_line(unstuffed);
        }
    }

    async fn login(&mut self, user: &str, pass: &str) -> Res<()> {
        self.command(&format!("USER {user}"), "USER").await?;
        self.command(&format!("PASS {pass}"), "PASS").await
    }

    /// QUIT, then wait (bounded) for the server to close, so the
    /// connection's TIME_WAIT stays on the server side.
    async fn quit(mut self) -> Res<()> {
        self.command("QUIT", "QUIT").await?;
        let mut rest = [0u8; 256];
        let _ = tokio::time::timeout(Duration::from_secs(2), self.stream.read(&mut rest)).await;
        Ok(())
    }
}

// ----------------------------------------------------------------- stats --

#[derive(Default)]
struct Stats {
    /// Microseconds, per phase.
    phases: HashMap<&'static str, Vec<u64>>,
    ok: u64,
    failed: u64,
    errors: HashMap<String, u64>,
    bytes: u64,
    messages: u64,
}

impl Stats {
    fn record(&mut self, phase: &'static str, since: Instant) {
        self.phases.entry(phase).or_default().push(since.elapsed().as_micros() as u64);
    }

    fn fail(&mut self, failure: Failure) {
        self.failed += 1;
        *self.errors.entry(failure.0).or_default() += 1;
    }

    fn merge(&mut self, other: Stats) {
        for (phase, mut values) in other.phases {
            self.phases.entry(phase).or_default().append(&mut values);
        }
        self.ok += other.ok;
        self.failed += other.failed;
        for (error, n) in other.errors {
            *self.errors.entry(error).or_default() += n;
        }
        self.bytes += other.bytes;
        self.messages += other.messages;
    }

    fn samples(&self) -> Value {
        let mut out = serde_json::Map::new();
        for (phase, values) in &self.phases {
            out.insert(phase.to_string(), json!(values.iter().map(|&v| v as f64 / 1000.0).collect::<Vec<_>>()));
        }
        Value::Object(out)
    }

    fn latencies(&mut self) -> Value {
        let mut out = serde_json::Map::new();
        let mut phases: Vec<_> = self.phases.iter_mut().collect();
        phases.sort_by_key(|(name, _)| *name);
        for (phase, values) in phases {
            values.sort_unstable();
            let n = values.len();
            let pick = |q: f64| {
                let i = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
                values[i] as f64 / 1000.0
            };
            let mean = values.iter().sum::<u64>() as f64 / n as f64 / 1000.0;
            out.insert(
                phase.to_string(),
                json!({
                    "n": n, "min": values[0] as f64 / 1000.0, "p50": pick(0.50), "p90": pick(0.90),
                    "p99": pick(0.99), "max": values[n - 1] as f64 / 1000.0, "mean": mean,
                }),
            );
        }
        Value::Object(out)
    }

    fn top_errors(&self) -> Value {
        let mut errors: Vec<_> = self.errors.iter().collect();
        errors.sort_by(|a, b| b.1.cmp(a.1));
        Value::Array(errors.into_iter().take(8).map(|(e, n)| json!({"error": e, "count": n})).collect())
    }
}

// ------------------------------------------------------------------ runs --

fn event(value: Value) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{value}");
    let _ = stdout.flush();
}

/// Waits for one line on stdin (the orchestrator's "go on"), or EOF.
async fn wait_for_stdin(limit: Duration) {
    let read = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    });
    let _ = tokio::time::timeout(limit, read).await;
}

async fn run(args: Args) -> Value {
    let started = Instant::now();
    let deadline = started + args.time_limit;
    let mut stats = Stats::default();
    let mut extra = serde_json::Map::new();
    if args.mode == Mode::IdleHold {
        idle_hold(&args, deadline, &mut stats, &mut extra).await;
    } else {
        let mut workers = tokio::task::JoinSet::new();
        for worker in 0..args.concurrency {
            let args = args.clone();
            workers.spawn(async move { worker_loop(&args, worker, deadline).await });
        }
        while let Some(done) = workers.join_next().await {
            match done {
                Ok(s) => stats.merge(s),
                Err(e) => stats.fail(Failure(format!("worker panicked: {e}"))),
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut result = json!({
        "mode": args.mode.name(),
        "target": args.target,
        "concurrency": args.concurrency,
        "count": args.count,
        "sessions_ok": stats.ok,
        "sessions_failed": stats.failed,
        "errors": stats.top_errors(),
        "elapsed_s": elapsed,
        "sessions_per_s": stats.ok as f64 / elapsed,
        "bytes": stats.bytes,
        "messages": stats.messages,
        "timed_out": Instant::now() >= deadline,
        "latency_ms": stats.latencies(),
    });
    if args.raw {
        extra.insert("samples_ms".into(), stats.samples());
    }
    if let Value::Object(map) = &mut result {
        map.extend(extra);
    }
    result
}

async fn worker_loop(args: &Args, worker: usize, deadline: Instant) -> Stats {
    let mut stats = Stats::default();
    let user = args.user_for(worker);
    // Open loop (`--interval-ms`): worker i starts at i/concurrency of an
    // interval, then one session per interval, late or not.
    let first = Instant::now() + args.interval.map_or(Duration::ZERO, |i| i * worker as u32 / args.concurrency as u32);
    for round in 0..args.count {
        if let Some(interval) = args.interval {
            tokio::time::sleep_until((first + interval * round as u32).into()).await;
        }
        if Instant::now() >= deadline {
            break;
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let outcome = tokio::time::timeout(remaining, one_session(args, &user, &mut stats)).await;
        match outcome {
            Ok(Ok(())) => stats.ok += 1,
            Ok(Err(failure)) => stats.fail(failure),
            Err(_) => stats.fail(Failure("time limit reached mid-session".into())),
        }
    }
    stats
}

async fn one_session(args: &Args, user: &str, stats: &mut Stats) -> Res<()> {
    let start = Instant::now();
    let mut pop3 = Pop3::connect(&args.target, args.io_timeout).await?;
    stats.record("connect", start);
    let t = Instant::now();
    pop3.login(user, &args.pass).await?;
    stats.record("login", t);
    let t = Instant::now();
    pop3.command("STAT", "STAT").await?;
    stats.record("stat", t);
    // connect + USER/PASS + STAT: the login latency of the benchmark.
    stats.record("to_stat", start);
    match args.mode {
        Mode::Login => {}
        Mode::Poll => {
            let t = Instant::now();
            pop3.command("UIDL", "UIDL").await?;
            pop3.body(|_| {}).await?;
            stats.record("uidl", t);
        }
        Mode::RetrieveAll => {
            let sizes = list(&mut pop3).await?;
            let t = Instant::now();
            for (number, size) in &sizes {
                retr(&mut pop3, *number, Some(*size), stats).await?;
            }
            stats.record("retrieve", t);
        }
        Mode::Retr => {
            let sizes = list(&mut pop3).await?;
            let size = sizes.iter().find(|(n, _)| *n == args.msg).map(|(_, s)| *s);
            if size.is_none() {
                return Err(Failure(format!("no message {} in LIST", args.msg)));
            }
            if args.wait_stdin {
                event(json!({"event": "logged_in"}));
                wait_for_stdin(args.io_timeout).await;
            }
            let t = Instant::now();
            retr(&mut pop3, args.msg, size, stats).await?;
            stats.record("retrieve", t);
            if args.wait_stdin {
                event(json!({"event": "retrieved", "retrieve_ms": t.elapsed().as_secs_f64() * 1000.0}));
                wait_for_stdin(args.io_timeout).await;
            }
        }
        Mode::IdleHold => unreachable!("idle-hold has its own loop"),
    }
    let t = Instant::now();
    pop3.quit().await?;
    stats.record("quit", t);
    stats.record("session", start);
    Ok(())
}

/// LIST: (message number, size) pairs.
async fn list(pop3: &mut Pop3) -> Res<Vec<(usize, u64)>> {
    pop3.command("LIST", "LIST").await?;
    let mut sizes = Vec::new();
    let mut bad = false;
    pop3.body(|line| {
        let text = std::str::from_utf8(line).unwrap_or("");
        let mut fields = text.split_ascii_whitespace();
        match (fields.next().and_then(|n| n.parse().ok()), fields.next().and_then(|s| s.parse().ok())) {
            (Some(n), Some(s)) => sizes.push((n, s)),
            _ => bad = true,
        }
    })
    .await?;
    if bad {
        return Err(Failure("unparsable LIST line".into()));
    }
    Ok(sizes)
}

async fn retr(pop3: &mut Pop3, number: usize, expected: Option<u64>, stats: &mut Stats) -> Res<()> {
    let t = Instant::now();
    pop3.command(&format!("RETR {number}"), "RETR").await?;
    let (octets, _) = pop3.body(|_| {}).await?;
    stats.record("retr_each", t);
    if let Some(expected) = expected
        && octets != expected
    {
        return Err(Failure(format!("RETR {number}: {octets} octets, LIST said {expected}")));
    }
    stats.bytes += octets;
    stats.messages += 1;
    Ok(())
}

/// Opens `concurrency` sessions, holds them, then QUITs them all.
async fn idle_hold(args: &Args, deadline: Instant, stats: &mut Stats, extra: &mut serde_json::Map<String, Value>) {
    let ramp = std::sync::Arc::new(tokio::sync::Semaphore::new(args.ramp));
    let (release_tx, release_rx) = watch::channel(false);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<bool>(args.concurrency.max(1));
    let mut sessions = tokio::task::JoinSet::new();
    let login_started = Instant::now();
    for index in 0..args.concurrency {
        let args = args.clone();
        let ramp = ramp.clone();
        let mut release = release_rx.clone();
        let ready = ready_tx.clone();
        sessions.spawn(async move {
            let mut stats = Stats::default();
            let user = args.user_for(index);
            let opened = {
                let _permit = ramp.acquire().await;
                let start = Instant::now();
                let opened = async {
                    let mut pop3 = Pop3::connect(&args.target, args.io_timeout).await?;
                    pop3.login(&user, &args.pass).await?;
                    pop3.command("STAT", "STAT").await?;
                    Ok::<_, Failure>(pop3)
                };
                let remaining = deadline.saturating_duration_since(Instant::now());
                let opened = match tokio::time::timeout(remaining, opened).await {
                    Ok(opened) => opened,
                    Err(_) => Err(Failure("time limit reached while logging in".into())),
                };
                stats.record("to_stat", start);
                opened
            };
            let _ = ready.send(opened.is_ok()).await;
            let pop3 = match opened {
                Ok(pop3) => pop3,
                Err(failure) => {
                    stats.fail(failure);
                    return stats;
                }
            };
            let _ = release.wait_for(|r| *r).await;
            let t = Instant::now();
            match pop3.quit().await {
                Ok(()) => {
                    stats.ok += 1;
                    stats.record("quit", t);
                }
                Err(failure) => stats.fail(failure),
            }
            stats
        });
    }
    drop(ready_tx);
    let (mut up, mut down) = (0u64, 0u64);
    while let Some(ok) = ready_rx.recv().await {
        if ok {
            up += 1
        } else {
            down += 1
        }
        if up + down == args.concurrency as u64 {
            break;
        }
    }
    let ramp_s = login_started.elapsed().as_secs_f64();
    event(json!({"event": "holding", "sessions": up, "failed": down, "login_s": ramp_s}));
    extra.insert("held".into(), json!(up));
    extra.insert("ramp_s".into(), json!(ramp_s));
    let hold = Duration::from_secs(args.hold_secs).min(deadline.saturating_duration_since(Instant::now()));
    if args.wait_stdin {
        wait_for_stdin(hold).await;
    } else {
        tokio::time::sleep(hold).await;
    }
    let _ = release_tx.send(true);
    while let Some(done) = sessions.join_next().await {
        match done {
            Ok(s) => stats.merge(s),
            Err(e) => stats.fail(Failure(format!("session task panicked: {e}"))),
        }
    }
}
