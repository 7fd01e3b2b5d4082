//! The Redis implementation of [`SharedState`] (Redis 6+, Valkey, managed
//! Redis), on the `redis` crate's `ConnectionManager`: one multiplexed
//! connection per process that reconnects by itself.
//!
//! It connects on first use, so popgate starts (and serves, on local state)
//! while Redis is down. Every command is bounded by `command_timeout_ms`;
//! after a failure the store is not asked again for `retry_after_secs`, so
//! an outage costs one timeout, not one per login. Going down and coming
//! back are each logged once, with the target but never the password.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, ConnectionAddr, ConnectionInfo, ProtocolVersion, RedisConnectionInfo};

use super::{Lease, SharedState, StateConfig, StateError, Versioned};
use crate::mail::Secret;

/// Where the store is, as parsed from `[state] url` (no password in it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisTarget {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub db: i64,
    pub username: Option<String>,
}

impl RedisTarget {
    /// Parses `redis://[user@]host[:port][/db]` or `rediss://…`. The error
    /// never repeats the URL (it may hold a password).
    pub fn parse(text: &str) -> Result<RedisTarget, String> {
        let url = url::Url::parse(text).map_err(|e| format!("not a URL ({e}); use redis://host:port/0"))?;
        let tls = match url.scheme() {
            "redis" => false,
            "rediss" => true,
            _ => return Err("use redis://host:port/0 or rediss://host:port/0".into()),
        };
        if url.password().is_some() {
            return Err("a password in the URL would be shown wherever the URL is; put it in \
                        state.password_file or state.password_env"
                .into());
        }
        let host = match url.host_str() {
            Some(h) if !h.is_empty() => h.trim_start_matches('[').trim_end_matches(']').to_string(),
            _ => return Err("the URL names no host; use redis://host:port/0".into()),
        };
        let db = match url.path().trim_start_matches('/') {
            "" => 0,
            n => n
                .parse::<i64>()
                .ok()
                .filter(|n| (0..=1_000).contains(n))
                .ok_or("the path must be a database number, e.g. /0")?,
        };
        if url.query().is_some() || url.fragment().is_some() {
            return Err("no query or fragment: options are keys of [state]".into());
        }
        let username = (!url.username().is_empty()).then(|| url.username().to_string());
        Ok(RedisTarget { tls, host, port: url.port().unwrap_or(6379), db, username })
    }
}

impl std::fmt::Display for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "rediss" } else { "redis" };
        let user = self.username.as_deref().map(|u| format!("{u}@")).unwrap_or_default();
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        write!(f, "{scheme}://{user}{host}:{}/{}", self.port, self.db)
    }
}

pub struct RedisState {
    target: RedisTarget,
    client: Client,
    prefix: String,
    connect_timeout: Duration,
    command_timeout: Duration,
    retry_after: Duration,
    connection: tokio::sync::Mutex<Option<ConnectionManager>>,
    resting_until: Mutex<Option<Instant>>,
    down: AtomicBool,
}

impl RedisState {
    pub fn new(url: &str, password: Option<Secret>, config: &StateConfig) -> Result<RedisState, String> {
        let target = RedisTarget::parse(url)?;
        let addr = if target.tls {
            // The redis crate's rustls client takes the process's provider.
            let _ = rustls::crypto::ring::default_provider().install_default();
            ConnectionAddr::TcpTls { host: target.host.clone(), port: target.port, insecure: false, tls_params: None }
        } else {
            ConnectionAddr::Tcp(target.host.clone(), target.port)
        };
        let info = ConnectionInfo {
            addr,
            redis: RedisConnectionInfo {
                db: target.db,
                username: target.username.clone(),
                password: password.map(|p| p.expose().to_string()),
                protocol: ProtocolVersion::RESP2,
            },
        };
        let client = Client::open(info).map_err(|e| format!("state.url: {e}"))?;
        Ok(RedisState {
            target,
            client,
            prefix: config.key_prefix.clone(),
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            command_timeout: config.command_timeout(),
            retry_after: Duration::from_secs(config.retry_after_secs),
            connection: tokio::sync::Mutex::new(None),
            resting_until: Mutex::new(None),
            down: AtomicBool::new(false),
        })
    }

    /// The store, for logs: never with the password.
    pub fn target(&self) -> &RedisTarget {
        &self.target
    }

    /// Whether the last command failed (for health and metrics).
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    async fn connection(&self) -> Result<ConnectionManager, StateError> {
        if let Some(until) = *self.resting_until.lock().unwrap_or_else(|p| p.into_inner())
            && Instant::now() < until
        {
            return Err(StateError::Unavailable("resting after a failure".into()));
        }
        let mut slot = self.connection.lock().await;
        if let Some(connection) = &*slot {
            return Ok(connection.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(self.connect_timeout)
            .set_response_timeout(self.command_timeout)
            // No retries inside a command: a login must not wait for them.
            // A broken connection is reconnected on the next command, and
            // after a failure the store rests `retry_after_secs` anyway.
            .set_number_of_retries(0)
            .set_max_delay(1_000);
        let connection = tokio::time::timeout(
            self.connect_timeout + self.command_timeout,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await
        .map_err(|_| StateError::Unavailable("connect timed out".into()))?
        .map_err(|e| StateError::Unavailable(e.to_string()))?;
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// Runs one pipeline, bounded in time; records outages and recoveries.
    async fn run<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T, StateError> {
        self.run_with(|mut connection| async move { pipe.query_async::<T>(&mut connection).await }).await
    }

    /// Runs one script, like [`Self::run`].
    async fn run_script<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, StateError> {
        self.run_with(|mut connection| async move { invocation.invoke_async::<T>(&mut connection).await }).await
    }

    async fn run_with<T, F, Fut>(&self, command: F) -> Result<T, StateError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let result = async {
            let connection = self.connection().await?;
            tokio::time::timeout(self.command_timeout, command(connection))
                .await
                .map_err(|_| StateError::Unavailable("command timed out".into()))?
                .map_err(|e| StateError::Unavailable(e.to_string()))
        }
        .await;
        match &result {
            Ok(_) => {
                if self.down.swap(false, Ordering::Relaxed) {
                    tracing::info!(store = %self.target, "shared state store reachable again");
                }
            }
            Err(StateError::Unavailable(why)) => {
                if why != "resting after a failure" {
                    *self.resting_until.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(Instant::now() + self.retry_after);
                    if !self.down.swap(true, Ordering::Relaxed) {
                        tracing::warn!(store = %self.target, error = %why,
                            "shared state store unavailable: this replica uses its local state until it is back");
                    }
                }
            }
        }
        result
    }
}

/// Compare-and-set of a versioned record (a hash: `v` version, `b` bytes).
const WRITE_RECORD: &str = r"
local v = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if v ~= tonumber(ARGV[1]) then return -1 end
redis.call('HSET', KEYS[1], 'v', v + 1, 'b', ARGV[2])
return v + 1
";

/// `SET NX PX` with a fencing token from a counter that only grows.
const TAKE_LOCK: &str = r"
local fence = redis.call('INCR', KEYS[2])
if redis.call('SET', KEYS[1], fence, 'NX', 'PX', ARGV[1]) then return fence end
return 0
";

/// Compare-and-delete: only the holder's own lease releases the lock.
const RELEASE_LOCK: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// `prefix` as a SCAN pattern matching only keys that start with it.
fn glob_prefix(prefix: &str) -> String {
    let mut pattern = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('*');
    pattern
}

fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[async_trait]
impl SharedState for RedisState {
    async fn increment(&self, keys: &[String], ttl: Duration) -> Result<Vec<u64>, StateError> {
        let mut pipe = redis::pipe();
        // MULTI/EXEC: every INCR lands with its PEXPIRE, so no counter is
        // ever left without an expiry.
        pipe.atomic();
        for key in keys {
            let key = self.key(key);
            pipe.incr(&key, 1u64).pexpire(&key, millis(ttl) as i64).ignore();
        }
        self.run(&pipe).await
    }

    async fn add(&self, key: &str, n: u64, ttl: Duration) -> Result<u64, StateError> {
        let key = self.key(key);
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.incr(&key, n).pexpire(&key, millis(ttl) as i64).ignore();
        let counts: Vec<u64> = self.run(&pipe).await?;
        Ok(counts.first().copied().unwrap_or(0))
    }

    async fn get(&self, keys: &[String]) -> Result<Vec<Option<u64>>, StateError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.get(self.key(key));
        }
        self.run(&pipe).await
    }

    async fn set(&self, entries: &[(String, u64)], ttl: Duration) -> Result<(), StateError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (key, value) in entries {
            pipe.pset_ex(self.key(key), *value, millis(ttl)).ignore();
        }
        self.run(&pipe).await
    }

    async fn remove(&self, keys: &[String]) -> Result<(), StateError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.del(keys.iter().map(|k| self.key(k)).collect::<Vec<_>>()).ignore();
        self.run(&pipe).await
    }

    async fn read_record(&self, key: &str) -> Result<Option<Versioned>, StateError> {
        let mut pipe = redis::pipe();
        pipe.hget(self.key(key), "v").hget(self.key(key), "b");
        let (version, bytes): (Option<u64>, Option<Vec<u8>>) = self.run(&pipe).await?;
        Ok(version.zip(bytes).map(|(version, bytes)| Versioned { version, bytes }))
    }

    async fn write_record(&self, key: &str, expected: u64, bytes: &[u8]) -> Result<Option<u64>, StateError> {
        let script = redis::Script::new(WRITE_RECORD);
        let mut invocation = script.key(self.key(key));
        invocation.arg(expected).arg(bytes);
        let written: i64 = self.run_script(&invocation).await?;
        Ok(u64::try_from(written).ok())
    }

    async fn record_keys(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StateError> {
        let pattern = glob_prefix(&self.key(prefix));
        let mut keys = Vec::new();
        let mut cursor = 0u64;
        // Bounded: at most `limit` keys, and as many rounds.
        for _round in 0..=limit {
            let mut pipe = redis::pipe();
            pipe.cmd("SCAN").arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(100);
            let ((next, found),): ((u64, Vec<String>),) = self.run(&pipe).await?;
            keys.extend(found.into_iter().filter_map(|k| k.strip_prefix(&self.prefix).map(str::to_string)));
            cursor = next;
            if cursor == 0 || keys.len() >= limit {
                break;
            }
        }
        keys.sort();
        keys.dedup();
        keys.truncate(limit);
        Ok(keys)
    }

    async fn try_lock(&self, key: &str, ttl: Duration) -> Result<Option<Lease>, StateError> {
        let script = redis::Script::new(TAKE_LOCK);
        let mut invocation = script.key(self.key(key));
        invocation.key(self.key(&format!("{key}:fence"))).arg(millis(ttl));
        let fence: u64 = self.run_script(&invocation).await?;
        Ok((fence > 0).then(|| Lease { key: key.to_string(), fence }))
    }

    async fn unlock(&self, lease: &Lease) -> Result<bool, StateError> {
        let script = redis::Script::new(RELEASE_LOCK);
        let mut invocation = script.key(self.key(&lease.key));
        invocation.arg(lease.fence);
        let released: u64 = self.run_script(&invocation).await?;
        Ok(released == 1)
    }

    fn is_up(&self) -> bool {
        !self.is_down()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_patterns_match_only_the_prefix() {
        assert_eq!(glob_prefix("popgate:token:5:a*b?[c]"), "popgate:token:5:a\\*b\\?\\[c\\]*");
    }

    #[test]
    fn targets_print_without_secrets() {
        let t = RedisTarget::parse("rediss://popgate@cache.example:6380/3").unwrap();
        assert_eq!(t.to_string(), "rediss://popgate@cache.example:6380/3");
        assert_eq!(RedisTarget::parse("redis://[::1]").unwrap().to_string(), "redis://[::1]:6379/0");
    }
}
