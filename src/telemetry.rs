//! Logging setup. Everything popgate logs goes through `tracing`; one span
//! per connection carries peer, session id, user and backend. Secrets are
//! never a field: they are `auth::Secret`, which prints as `<redacted>`.

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Libraries that log raw protocol bytes (an IMAP LOGIN line, an HTTP
/// Authorization header) at trace level: capped whatever the filter says.
const WIRE_LOGGERS: &[&str] = &["async_imap", "imap_proto", "hyper", "hyper_util", "h2", "reqwest", "rustls"];

/// The filter actually used: the configured (or RUST_LOG) one with the wire
/// loggers capped at `info`, so no level ever shows credentials.
pub fn filter(level: &str) -> EnvFilter {
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    for target in WIRE_LOGGERS {
        filter = filter.add_directive(format!("{target}=info").parse().expect("valid directive"));
    }
    filter
}

/// Installs the global subscriber; `RUST_LOG` overrides the configured level.
pub fn init(config: &LogConfig) {
    let filter = filter(&config.level);
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // A second init (tests) keeps the first subscriber.
    let _ = result;
}
