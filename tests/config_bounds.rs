//! Whatever `check-config` accepts, `serve` runs: generated configurations
//! with every numeric setting drawn from its edges (0, 1, the bounds, one
//! past them, the largest TOML integer) either fail `Config::from_toml`
//! naming the key, or start a real server, serve a whole POP3 session,
//! survive a reload (what SIGHUP does) and shut down.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use popgate::auth::accounts::PassThrough;
use popgate::config::Config;
use popgate::server::Server;
use popgate::telemetry::Metrics;
use proptest::prelude::*;

/// Every numeric key that `Config` has outside the backend tables (those
/// are checked by their own unit tests), with a value in its bounds.
/// Every numeric key that `Config` has outside the backend tables (those
/// are checked by their own unit tests): a value in its bounds, and the
/// bounds themselves (config/popgate.toml documents them).
const KEYS: &[(&str, &str, i64, (i64, i64))] = &[
    ("limits", "command_line", 255, (255, 65_536)),
    ("limits", "auth_line", 8192, (255, 1_048_576)),
    ("limits", "max_failed_logins", 3, (1, 100)),
    ("limits", "login_timeout_secs", 60, (1, 3_600)),
    ("limits", "idle_timeout_secs", 600, (600, 86_400)),
    ("limits", "max_connections", 1000, (1, 1_000_000)),
    ("limits", "max_connections_per_address", 100, (1, 1_000_000)),
    ("limits", "shutdown_grace_secs", 1, (0, 3_600)),
    ("limits", "size_cache_entries", 1000, (0, 100_000_000)),
    ("limits", "submission_max_message_size", 1_048_576, (1_024, 157_286_400)),
    ("limits", "submission_max_recipients", 50, (1, 1_000)),
    ("tls", "reload_check_secs", 60, (0, 86_400)),
    ("throttle", "free_failures", 2, (0, 1_000)),
    ("throttle", "base_delay_ms", 0, (0, 60_000)),
    ("throttle", "max_delay_ms", 60_000, (0, 600_000)),
    ("throttle", "release_after_secs", 900, (1, 604_800)),
    ("throttle", "max_entries", 1000, (1, 10_000_000)),
    ("throttle", "address_free_failures", 20, (1, 100_000)),
    ("throttle", "address_max_delay_ms", 1000, (0, 60_000)),
    ("backend_pool", "idle_secs", 240, (1, 86_400)),
    ("backend_pool", "max_age_secs", 900, (1, 86_400)),
    ("backend_pool", "max_per_account", 1, (0, 100)),
    ("backend_pool", "max_total", 1000, (0, 1_000_000)),
    ("backend_pool", "max_connections_per_account", 8, (1, 100)),
    ("backend_pool", "wait_secs", 30, (1, 600)),
    ("backend_pool", "max_concurrent_logins", 64, (1, 10_000)),
    ("state", "connect_timeout_ms", 2_000, (10, 60_000)),
    ("state", "command_timeout_ms", 500, (10, 60_000)),
    ("state", "retry_after_secs", 5, (0, 3_600)),
    ("state", "size_ttl_secs", 604_800, (60, 7_776_000)),
    ("state", "token_lock_secs", 60, (5, 3_600)),
    ("state", "token_wait_ms", 10_000, (100, 120_000)),
    ("admin", "session_secs", 28_800, (60, 604_800)),
];

fn edge_value() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(0i64),
        Just(1),
        Just(254),
        Just(255),
        Just(599),
        Just(600),
        Just(3_600),
        Just(3_601),
        Just(86_400),
        Just(86_401),
        Just(1_000_000),
        Just(1_000_001),
        Just(i64::MAX),
        0i64..=200_000,
    ]
}

fn config_text(overrides: &[(usize, i64)]) -> String {
    let mut values: Vec<i64> = KEYS.iter().map(|k| k.2).collect();
    for &(index, value) in overrides {
        values[index % KEYS.len()] = value;
    }
    let mut text = String::from("[[listener]]\naddress = \"127.0.0.1:0\"\n\n[backend]\nkind = \"demo\"\n");
    let mut table = "";
    for ((section, key, _, _), value) in KEYS.iter().zip(values) {
        if *section != table {
            text.push_str(&format!("\n[{section}]\n"));
            table = section;
        }
        text.push_str(&format!("{key} = {value}\n"));
    }
    text
}

/// A whole session against the demo store: greeting, login, STAT, QUIT —
/// every reply within a generous time limit. A connection over a limit of
/// one (the previous session's slot not yet given back) is tried again.
fn session(addr: SocketAddr) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (mut reader, mut writer) = loop {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        let mut greeting = String::new();
        reader.read_line(&mut greeting).expect("a greeting in time");
        if greeting.starts_with("+OK") {
            break (reader, writer);
        }
        assert!(greeting.starts_with("-ERR [SYS/TEMP]"), "{greeting:?}");
        assert!(std::time::Instant::now() < deadline, "refused for 20 s: {greeting:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    for command in ["USER demo", "PASS demo", "STAT", "QUIT"] {
        writer.write_all(format!("{command}\r\n").as_bytes()).unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).expect("a reply in time");
        assert!(line.starts_with("+OK"), "{command}: {line:?}");
    }
    let mut rest = String::new();
    assert_eq!(reader.read_line(&mut rest).expect("the server closes after QUIT"), 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn accepted_configs_serve_and_rejected_ones_name_the_key(
        overrides in proptest::collection::vec((0usize..KEYS.len(), edge_value()), 1..4)
    ) {
        let text = config_text(&overrides);
        let config = match Config::from_toml(&text, "generated.toml") {
            Ok(config) => config,
            Err(e) => {
                let message = e.to_string();
                let named = overrides.iter().any(|&(i, _)| {
                    // Our checks name `table.key`; serde's type errors (a
                    // value beyond u32) quote the offending line.
                    let (section, key, _, _) = KEYS[i % KEYS.len()];
                    message.contains(&format!("{section}.{key}")) || message.contains(&format!("{key} = "))
                });
                prop_assert!(named, "the error names none of the changed keys: {message}\n{text}");
                return Ok(());
            }
        };
        serve_and_reload(&config, &text);
    }
}

/// Starts a real server with `config`, serves a session, reloads with the
/// same file (what SIGHUP does), serves again and shuts down.
fn serve_and_reload(config: &Config, text: &str) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let backend = config.backend.build().expect("demo backend");
    let mut server = runtime
        .block_on(Server::start(config, Arc::new(PassThrough::new(backend)), Arc::new(Metrics::new())))
        .unwrap_or_else(|e| panic!("check-config accepted it but serve failed: {e}\n{text}"));
    let addr = server.local_addrs()[0];
    session(addr);
    let _ = runtime.block_on(async { server.reload(config) });
    session(addr);
    runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(30), server.shutdown()).await })
        .expect("shutdown in time");
}

/// Each key at each of its bounds is accepted and served; one past each
/// bound is refused by name.
#[test]
fn every_bound_is_served_and_one_past_it_refused() {
    for (index, (section, key, _, (low, high))) in KEYS.iter().enumerate() {
        for value in [*low, *high] {
            let text = config_text(&[(index, value)]);
            let config =
                Config::from_toml(&text, "t.toml").unwrap_or_else(|e| panic!("{section}.{key} = {value}: {e}"));
            serve_and_reload(&config, &text);
        }
        for value in [low - 1, high + 1] {
            if value < 0 {
                continue;
            }
            let text = config_text(&[(index, value)]);
            let e = Config::from_toml(&text, "t.toml").map(|_| ()).unwrap_err().to_string();
            assert!(e.contains(&format!("{section}.{key}")), "{section}.{key} = {value}: {e}");
        }
    }
}

/// The property above meets the largest values; this pins the two that
/// crashed the server before the bounds existed.
#[test]
fn values_that_used_to_crash_are_refused_by_name() {
    for (table, key) in [("limits", "login_timeout_secs"), ("throttle", "release_after_secs")] {
        let text = format!("[{table}]\n{key} = 9223372036854775807\n");
        let e = Config::from_toml(&text, "t.toml").unwrap_err().to_string();
        assert!(e.contains(&format!("{table}.{key}")) && e.contains("must be between"), "{e}");
    }
}

/// The IMAP backend's prefetch bound (issue #14): 0 (off) to 64 MiB;
/// anything above is refused naming the key (values that are no u32 are
/// refused by the TOML reader, as for every backend key).
#[test]
fn imap_prefetch_bytes_is_bounded_by_name() {
    let config = |value: i64| format!("[backend]\nkind = \"imap\"\nhost = \"127.0.0.1\"\nprefetch_bytes = {value}\n");
    for value in [0, 1, 4 << 20, 64 << 20] {
        Config::from_toml(&config(value), "t.toml").unwrap_or_else(|e| panic!("prefetch_bytes = {value}: {e}"));
    }
    for value in [(64 << 20) + 1, 4_294_967_295] {
        let e = Config::from_toml(&config(value), "t.toml").map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("prefetch_bytes"), "prefetch_bytes = {value}: {e}");
    }
}

/// The HTTP backends' listing-state bounds (issue 14): each bound is
/// accepted, one past it is refused naming the key.
#[test]
fn listing_state_bounds_of_the_http_backends() {
    let tables = ["kind = \"gmail\"", "kind = \"graph\"", "kind = \"jmap\"\nurl = \"https://mail.example.com\""];
    let keys = [("listing_state_messages", 0, 10_000_000), ("listing_state_idle_secs", 60, 2_592_000)];
    for table in tables {
        for (key, low, high) in keys {
            for value in [low, high] {
                let text = format!("[backend]\n{table}\n{key} = {value}\n");
                Config::from_toml(&text, "t.toml").unwrap_or_else(|e| panic!("{text}: {e}"));
            }
            for value in [low - 1, high + 1].into_iter().filter(|v: &i64| *v >= 0) {
                let text = format!("[backend]\n{table}\n{key} = {value}\n");
                let e = Config::from_toml(&text, "t.toml").map(|_| ()).unwrap_err().to_string();
                assert!(e.contains(key), "{text}: {e}");
            }
        }
    }
}
