//! Local passwords of mapped device users (Argon2id PHC hashes), and the
//! secrets popgate holds for backend accounts, read from an environment
//! variable or a file — never from the configuration itself.
//!
//! Never logs or formats a password or a secret's content; errors name the
//! variable or file, not what it holds.

use std::path::PathBuf;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
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

    /// Constant-time check of `password` (CPU-heavy: call it off the async
    /// threads).
    pub fn verify(&self, password: &str) -> bool {
        let Ok(parsed) = PasswordHash::new(&self.phc) else { return false };
        // The parameters come from the PHC string; `hasher()` only supplies
        // the algorithm.
        hasher().verify_password(password.as_bytes(), &parsed).is_ok()
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
