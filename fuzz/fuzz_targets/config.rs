//! The configuration file and backend URLs from arbitrary input: never a
//! panic, and whatever is accepted can be run — the parts a server builds
//! from it at start (throttle, size cache, warm-session pool, timers from
//! every timeout) are built here too, the same way, and must not panic or
//! overflow. A refusal must name a key or the URL.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use popgate::backend::pool::SessionPool;
use popgate::backend::select::BackendConfig;
use popgate::backend::sizes::ExactSizes;
use popgate::config::Config;
use popgate::server::throttle::LoginThrottle;

fn runnable(config: &Config) {
    let l = &config.limits;
    let now = Instant::now();
    for secs in [l.login_timeout_secs, l.idle_timeout_secs, l.shutdown_grace_secs, config.tls.reload_check_secs] {
        let _ = now + Duration::from_secs(secs);
    }
    let _ = LoginThrottle::new(config.throttle.clone());
    let _ = ExactSizes::new(l.size_cache_entries);
    let _ = SessionPool::new(config.backend_pool.clone());
    let _ = now
        + Duration::from_secs(config.backend_pool.max_age_secs)
        + Duration::from_secs(config.backend_pool.idle_secs);
    // Building a backend touches no network (a CA file or demo folder may
    // be missing: an error, never a panic).
    let _ = config.backend.build();
    let _ = config.backend.describe();
}

// Plain text, so that the seeds are configuration files as written
// (fuzz/seeds/config): a text starting with `url:` is a `--backend` URL.
// (The first version took `(bool, &str)` through `arbitrary`, which read
// every seed starting with `#` as a URL: its seeds never reached the file
// parser, as a coverage replay showed.)
fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Some(text) = text.strip_prefix("url:") {
        match BackendConfig::from_url(text) {
            Ok(backend) => {
                let _ = backend.describe();
                if backend.check().is_ok() {
                    let _ = backend.build();
                }
            }
            Err(e) => assert!(e.to_string().contains("backend URL")),
        }
        return;
    }
    match Config::from_toml(text, "fuzz.toml") {
        Ok(config) => {
            runnable(&config);
            // What serde writes back (check-config's output) parses again to the same.
            let printed = toml::to_string_pretty(&config).expect("printable");
            let again = Config::from_toml(&printed, "printed.toml").expect("check-config's output is valid");
            assert_eq!(again, config);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
