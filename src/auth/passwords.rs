//! Local passwords of mapped device users (Argon2id PHC hashes), and the
//! secrets popgate holds for backend accounts, read from an environment
//! variable or a file — never from the configuration itself.
//!
//! Never logs or formats a password or a secret's content; errors name the
//! variable or file, not what it holds.

use std::path::PathBuf;

use argon2::password_hash::{self, PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use serde::{Deserialize, Serialize};

use crate::mail::Secret;

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("not an Argon2id PHC string (`popgate passwd` prints one): {0}")]
    BadHash(String),
    #[error("hashing failed: {0}")]
    Hashing(String),
}

/// Hashes a password as an Argon2id PHC string with a random salt and the
/// parameters RFC 9106 / OWASP recommend for interactive logins.
pub fn hash_password(password: &str) -> Result<String, PasswordError> {
    let mut salt = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
        .map_err(|_| PasswordError::Hashing("no system randomness".into()))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| PasswordError::Hashing(e.to_string()))?;
    let hash = hasher().hash_password(password.as_bytes(), &salt).map_err(|e| PasswordError::Hashing(e.to_string()))?;
    Ok(hash.to_string())
}

fn hasher() -> Argon2<'static> {
    // 19 MiB, 2 passes, 1 lane: the OWASP minimum for Argon2id; tens of
    // milliseconds per login, which the login throttle bounds.
    let params = Params::new(19 * 1024, 2, 1, None).expect("valid Argon2 parameters");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// A parsed, checked device password hash.
#[derive(Clone)]
pub struct DeviceHash {
    phc: String,
}

impl DeviceHash {
    /// Accepts only Argon2id PHC strings: a hash of another kind (or a
    /// password pasted by mistake) is a configuration error.
    pub fn parse(phc: &str) -> Result<DeviceHash, PasswordError> {
        let parsed = PasswordHash::new(phc).map_err(|e| PasswordError::BadHash(e.to_string()))?;
        if parsed.algorithm.as_str() != "argon2id" {
            return Err(PasswordError::BadHash(format!("algorithm is {}, expected argon2id", parsed.algorithm)));
        }
        if parsed.hash.is_none() || parsed.salt.is_none() {
            return Err(PasswordError::BadHash("salt or hash missing".into()));
        }
        Ok(DeviceHash { phc: phc.to_string() })
    }

    /// Constant-time check of `password` (CPU-heavy and 19 MiB: call it
    /// off the async threads; logins go through `Verifier`, which bounds
    /// both).
    pub fn verify(&self, password: &str) -> bool {
        self.verify_with(password, &mut Vec::new())
    }

    /// `verify`, with Argon2's working memory in `memory` (grown to what
    /// the hash's parameters need, and kept there for the next call).
    pub fn verify_with(&self, password: &str, memory: &mut Vec<Block>) -> bool {
        let Ok(parsed) = PasswordHash::new(&self.phc) else { return false };
        // The parameters come from the PHC string.
        let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else { return false };
        let Ok(params) = Params::try_from(&parsed) else { return false };
        let version = parsed.version.map_or(Ok(Version::V0x13), Version::try_from);
        let Ok(version) = version else { return false };
        let mut salt_bytes = [0u8; 64];
        let Ok(salt) = salt.decode_b64(&mut salt_bytes) else { return false };
        if memory.len() < params.block_count() {
            memory.resize(params.block_count(), Block::default());
        }
        let mut out = vec![0u8; expected.len()];
        let argon2 = Argon2::new(Algorithm::Argon2id, version, params);
        if argon2.hash_password_into_with_memory(password.as_bytes(), salt, &mut out, &mut memory[..]).is_err() {
            return false;
        }
        // `Output`'s equality is constant-time.
        password_hash::Output::new(&out).is_ok_and(|computed| computed == expected)
    }

    /// A hash no password matches, to spend the same time on unknown user
    /// names as on known ones.
    pub fn decoy() -> &'static DeviceHash {
        static DECOY: std::sync::OnceLock<DeviceHash> = std::sync::OnceLock::new();
        DECOY.get_or_init(|| {
            let phc = hash_password("popgate decoy: no device has this password").expect("hashing works");
            DeviceHash { phc }
        })
    }
}

impl std::fmt::Debug for DeviceHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceHash(argon2id)")
    }
}

/// The device-password checks of all logins: a fixed set of worker threads
/// (as many as cores, at most `MAX_WORKERS`), each with its own Argon2
/// memory allocated once and reused, fed by a bounded queue. A check that
/// finds the queue full is refused at once (`Busy`: the client is told to
/// try again later) instead of queueing more hashing, so a burst of bad
/// logins costs neither unbounded memory nor minutes of queued CPU.
///
/// A password that matched is remembered for `REMEMBER_FOR` as an HMAC
/// (per-process random key) of the hash and the password — never the
/// password — so a device polling with its right password is let in
/// without hashing, burst or not. Wrong passwords are always hashed.
pub struct Verifier {
    jobs: std::sync::mpsc::SyncSender<Job>,
    workers: usize,
    key: ring::hmac::Key,
    matched: moka::sync::Cache<Vec<u8>, ()>,
}

/// How long a matched password is let in without hashing.
pub const REMEMBER_FOR: std::time::Duration = std::time::Duration::from_secs(600);

struct Job {
    hash: DeviceHash,
    /// `None`: spend the time, match nothing.
    password: Option<Secret>,
    reply: tokio::sync::oneshot::Sender<bool>,
}

/// The verifier's queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many logins are being checked; try again later")]
pub struct Busy;

/// Workers at most (each holds 19 MiB of Argon2 memory for good).
pub const MAX_WORKERS: usize = 4;
/// Checks waiting per worker at most (a few tens of ms each).
pub const QUEUE_PER_WORKER: usize = 32;

impl Verifier {
    /// `workers` threads, each with the memory of the default parameters
    /// allocated now; at most `queue` checks waiting for one.
    pub fn new(workers: usize, queue: usize) -> Verifier {
        let workers = workers.max(1);
        let (jobs, receiver) = std::sync::mpsc::sync_channel::<Job>(queue);
        let receiver = std::sync::Arc::new(std::sync::Mutex::new(receiver));
        let blocks = hasher().params().block_count();
        for n in 0..workers {
            let receiver = receiver.clone();
            std::thread::Builder::new()
                .name(format!("popgate-argon2-{n}"))
                .spawn(move || {
                    let mut memory = vec![Block::default(); blocks];
                    loop {
                        let job = receiver.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        // Every sender gone: the verifier was dropped.
                        let Ok(job) = job else { return };
                        let matched = match &job.password {
                            Some(password) => job.hash.verify_with(password.expose(), &mut memory),
                            None => {
                                job.hash.verify_with("", &mut memory);
                                false
                            }
                        };
                        let _ = job.reply.send(matched);
                    }
                })
                .expect("spawn an Argon2 worker thread");
        }
        let key = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &ring::rand::SystemRandom::new())
            .expect("system randomness");
        let matched = moka::sync::Cache::builder().max_capacity(10_000).time_to_live(REMEMBER_FOR).build();
        Verifier { jobs, workers, key, matched }
    }

    fn fingerprint(&self, hash: &DeviceHash, password: &Secret) -> Vec<u8> {
        let mut ctx = ring::hmac::Context::with_key(&self.key);
        for part in [hash.phc.as_bytes(), password.expose().as_bytes()] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        ctx.sign().as_ref().to_vec()
    }

    /// The process's verifier: one worker per core (at most `MAX_WORKERS`),
    /// a queue of `QUEUE_PER_WORKER` checks per worker (a fleet polling at
    /// the same minute queues; a burst beyond that is refused).
    pub fn shared() -> &'static Verifier {
        static SHARED: std::sync::OnceLock<Verifier> = std::sync::OnceLock::new();
        SHARED.get_or_init(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let workers = cores.clamp(1, MAX_WORKERS);
            Verifier::new(workers, QUEUE_PER_WORKER * workers)
        })
    }

    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Checks `password` against `hash` (`None`: the time of a check, and
    /// no match), or `Busy` at once when the queue is full.
    pub async fn verify(&self, hash: &DeviceHash, password: Option<Secret>) -> Result<bool, Busy> {
        let fingerprint = password.as_ref().map(|p| self.fingerprint(hash, p));
        if let Some(fingerprint) = &fingerprint
            && self.matched.contains_key(fingerprint)
        {
            return Ok(true);
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        match self.jobs.try_send(Job { hash: hash.clone(), password, reply }) {
            Ok(()) => {
                let matched = answer.await.unwrap_or(false);
                if let (true, Some(fingerprint)) = (matched, fingerprint) {
                    self.matched.insert(fingerprint, ());
                }
                Ok(matched)
            }
            Err(std::sync::mpsc::TrySendError::Full(_)) => Err(Busy),
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => Ok(false),
        }
    }
}

/// Where a secret popgate holds comes from: exactly one of an environment
/// variable or a file (e.g. a mounted Kubernetes Secret). Used flattened in
/// the configuration as `PREFIX_env` / `PREFIX_file`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SecretSource {
    Env(String),
    File(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("environment variable {0} is not set (or not UTF-8)")]
    MissingEnv(String),
    #[error("environment variable {0} is empty")]
    EmptyEnv(String),
    #[error("cannot read {path}: {source}")]
    File { path: String, source: std::io::Error },
    #[error("{0} is empty")]
    EmptyFile(String),
    #[error("{0} is not UTF-8")]
    NotUtf8(String),
}

impl SecretSource {
    /// From the `*_env` and `*_file` keys of one secret: at most one may be
    /// set. `Ok(None)` when neither is.
    pub fn from_keys(env: Option<&String>, file: Option<&PathBuf>) -> Result<Option<SecretSource>, &'static str> {
        match (env, file) {
            (Some(_), Some(_)) => Err("set either the _env or the _file key, not both"),
            (Some(var), None) if var.is_empty() => Err("the environment variable name is empty"),
            (Some(var), None) => Ok(Some(SecretSource::Env(var.clone()))),
            (None, Some(path)) => Ok(Some(SecretSource::File(path.clone()))),
            (None, None) => Ok(None),
        }
    }

    /// Reads the secret now. A file's trailing line end is not part of it.
    pub fn read(&self) -> Result<Secret, SecretError> {
        match self {
            SecretSource::Env(var) => {
                let value = std::env::var(var).map_err(|_| SecretError::MissingEnv(var.clone()))?;
                if value.is_empty() {
                    return Err(SecretError::EmptyEnv(var.clone()));
                }
                Ok(Secret::new(value))
            }
            SecretSource::File(path) => {
                let shown = path.display().to_string();
                let bytes = std::fs::read(path).map_err(|source| SecretError::File { path: shown.clone(), source })?;
                let text = String::from_utf8(bytes).map_err(|_| SecretError::NotUtf8(shown.clone()))?;
                let value = text.strip_suffix('\n').unwrap_or(&text);
                let value = value.strip_suffix('\r').unwrap_or(value);
                if value.is_empty() {
                    return Err(SecretError::EmptyFile(shown));
                }
                Ok(Secret::new(value))
            }
        }
    }

    /// Where it comes from, for messages (never its content).
    pub fn describe(&self) -> String {
        match self {
            SecretSource::Env(var) => format!("environment variable {var}"),
            SecretSource::File(path) => format!("file {}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_and_are_argon2id() {
        let phc = hash_password("s3cret printer").unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        let hash = DeviceHash::parse(&phc).unwrap();
        assert!(hash.verify("s3cret printer"));
        assert!(!hash.verify("s3cret printer "));
        assert!(!hash.verify(""));
        assert_ne!(hash_password("x").unwrap(), hash_password("x").unwrap(), "salts differ");
        assert!(!DeviceHash::decoy().verify(""));
        assert!(!format!("{hash:?}").contains(&phc));
    }

    #[tokio::test]
    async fn the_verifier_refuses_beyond_its_queue_and_reuses_its_memory() {
        let hash = DeviceHash::parse(&hash_password("right").unwrap()).unwrap();
        let verifier = Verifier::new(1, 1);
        assert_eq!(verifier.verify(&hash, Some(Secret::new("right"))).await, Ok(true));
        assert_eq!(verifier.verify(&hash, Some(Secret::new("wrong"))).await, Ok(false));
        assert_eq!(verifier.verify(&hash, None).await, Ok(false));
        // One at work, one queued: the others are refused at once.
        let checks: Vec<_> = (0..8).map(|_| verifier.verify(&hash, Some(Secret::new("wrong")))).collect();
        let results = futures::future::join_all(checks).await;
        assert!(results.contains(&Err(Busy)), "{results:?}");
        assert!(results.contains(&Ok(false)), "{results:?}");
        // The right password, matched before, is let in without a check.
        let busy: Vec<_> = (0..4).map(|_| verifier.verify(&hash, Some(Secret::new("wrong")))).collect();
        let (results, right) =
            futures::future::join(futures::future::join_all(busy), verifier.verify(&hash, Some(Secret::new("right"))))
                .await;
        assert_eq!(right, Ok(true));
        assert!(results.contains(&Err(Busy)), "{results:?}");
    }

    #[test]
    fn other_hashes_are_refused() {
        for bad in [
            "hunter2",
            "$argon2i$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$iWh06vD8Fy27wf9npn6FXWiCX4K6pW6Ue1Bnzz07Z8A",
            "$2b$12$abcdefghijklmnopqrstuu9mGq2J0pC1Jz8lW7Q1t3Yw0e1oF5xW",
            "$argon2id$v=19$m=19456,t=2,p=1",
        ] {
            assert!(DeviceHash::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn secrets_come_from_files_without_their_line_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app-password");
        std::fs::write(&path, "abcd efgh ijkl mnop\n").unwrap();
        let source = SecretSource::from_keys(None, Some(&path)).unwrap().unwrap();
        assert_eq!(source.read().unwrap().expose(), "abcd efgh ijkl mnop");
        std::fs::write(&path, "\n").unwrap();
        let e = source.read().unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
        let missing = SecretSource::Env("POPGATE_TEST_SURELY_UNSET_VARIABLE".into());
        assert!(missing.read().unwrap_err().to_string().contains("POPGATE_TEST_SURELY_UNSET_VARIABLE"));
        assert!(SecretSource::from_keys(Some(&"A".into()), Some(&path)).is_err());
        assert_eq!(SecretSource::from_keys(None, None).unwrap(), None);
    }
}
