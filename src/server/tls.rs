//! TLS towards POP3 clients: certificates, SNI and reload.
//!
//! Owns the rustls `ServerConfig` shared by every TLS listener (implicit TLS
//! and STLS): TLS 1.2 and 1.3 only, the ring provider (the one crypto
//! provider of the whole binary). Certificates come from PEM files; the first
//! is the default and each is also chosen by the DNS names in its
//! subjectAltName (or names given in the config). `reload` re-reads every file
//! and swaps the set atomically: handshakes in progress and sessions already
//! established keep what they had, and a broken file leaves the old set in
//! place. Never logs key material.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

/// One certificate chain and its key, as configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    /// PEM file: the leaf certificate first, then intermediates.
    pub cert: PathBuf,
    /// PEM file: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// SNI names this certificate answers for; by default the DNS names in
    /// its subjectAltName.
    #[serde(default)]
    pub names: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no certificate configured")]
    NoCertificate,
    #[error("{path}: {why}")]
    File { path: String, why: String },
    #[error("certificate {path} does not match its key: {why}")]
    KeyMismatch { path: String, why: String },
}

fn file_error(path: &Path, why: impl std::fmt::Display) -> TlsError {
    TlsError::File { path: path.display().to_string(), why: why.to_string() }
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

struct Loaded {
    default: Arc<CertifiedKey>,
    by_name: HashMap<String, Arc<CertifiedKey>>,
    /// Modification times of the files, to notice changes.
    stamps: Vec<Option<SystemTime>>,
    /// Each configured certificate file and its leaf's notAfter (Unix time).
    expiries: Vec<(String, i64)>,
}

/// Chooses a certificate by SNI from a set that can be replaced at run time.
pub struct CertificateStore {
    configs: Vec<CertificateConfig>,
    current: RwLock<Arc<Loaded>>,
}

impl std::fmt::Debug for CertificateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateStore").field("configs", &self.configs).finish_non_exhaustive()
    }
}

impl CertificateStore {
    /// Loads every certificate; fails (naming the file) if any is unusable.
    pub fn load(configs: Vec<CertificateConfig>) -> Result<Arc<Self>, TlsError> {
        let loaded = load_all(&configs)?;
        Ok(Arc::new(CertificateStore { configs, current: RwLock::new(Arc::new(loaded)) }))
    }

    /// Re-reads every file. On error the previous certificates stay in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let loaded = load_all(&self.configs)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(loaded);
        Ok(())
    }

    /// Reloads if any file's modification time changed; `Ok(true)` if it did.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let stamps = stamps(&self.configs);
        if stamps == self.snapshot().stamps {
            return Ok(false);
        }
        self.reload().map(|()| true)
    }

    /// Each configured certificate file with the Unix time its leaf
    /// certificate expires (notAfter), as loaded now.
    pub fn expiries(&self) -> Vec<(String, i64)> {
        self.snapshot().expiries.clone()
    }

    fn snapshot(&self) -> Arc<Loaded> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A rustls server configuration that resolves through this store.
    pub fn server_config(self: &Arc<Self>) -> Arc<rustls::ServerConfig> {
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("ring supports TLS 1.2 and 1.3")
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        Arc::new(config)
    }
}

impl ResolvesServerCert for CertificateStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let loaded = self.snapshot();
        let Some(name) = hello.server_name() else {
            return Some(loaded.default.clone());
        };
        let name = name.to_ascii_lowercase();
        if let Some(key) = loaded.by_name.get(&name) {
            return Some(key.clone());
        }
        // One wildcard level: "*.example.com" covers "mail.example.com".
        if let Some((_, parent)) = name.split_once('.')
            && let Some(key) = loaded.by_name.get(&format!("*.{parent}"))
        {
            return Some(key.clone());
        }
        Some(loaded.default.clone())
    }
}

fn stamps(configs: &[CertificateConfig]) -> Vec<Option<SystemTime>> {
    configs
        .iter()
        .flat_map(|c| [&c.cert, &c.key])
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

fn load_all(configs: &[CertificateConfig]) -> Result<Loaded, TlsError> {
    let stamps = stamps(configs);
    let provider = provider();
    let mut default = None;
    let mut by_name = HashMap::new();
    let mut expiries = Vec::new();
    for config in configs {
        let (key, names) = load_one(config, &provider)?;
        expiries.push((config.cert.display().to_string(), not_after(&config.cert, &key.cert[0])?));
        let key = Arc::new(key);
        for name in names {
            by_name.entry(name.to_ascii_lowercase()).or_insert_with(|| key.clone());
        }
        default.get_or_insert(key);
    }
    let default = default.ok_or(TlsError::NoCertificate)?;
    Ok(Loaded { default, by_name, stamps, expiries })
}

/// The leaf's notAfter, for the expiry metric and alert.
fn not_after(path: &Path, leaf: &CertificateDer<'_>) -> Result<i64, TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf).map_err(|e| file_error(path, e))?;
    Ok(parsed.validity().not_after.timestamp())
}

fn load_one(config: &CertificateConfig, provider: &CryptoProvider) -> Result<(CertifiedKey, Vec<String>), TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&config.cert)
        .map_err(|e| file_error(&config.cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(&config.cert, e))?;
    if chain.is_empty() {
        return Err(file_error(&config.cert, "no CERTIFICATE block"));
    }
    let key = PrivateKeyDer::from_pem_file(&config.key).map_err(|e| file_error(&config.key, e))?;
    let names = if config.names.is_empty() {
        let leaf =
            webpki::EndEntityCert::try_from(&chain[0]).map_err(|e| file_error(&config.cert, format!("{e:?}")))?;
        leaf.valid_dns_names().map(str::to_string).collect()
    } else {
        config.names.clone()
    };
    // A key that cannot be used at all is the key file's fault; a usable key
    // that belongs to another certificate is a mismatch.
    let signing_key = provider.key_provider.load_private_key(key).map_err(|e| file_error(&config.key, e))?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        // Unknown: the key type does not expose its public half; accept.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(e) => return Err(TlsError::KeyMismatch { path: config.cert.display().to_string(), why: e.to_string() }),
    }
    Ok((certified, names))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_cert(dir: &Path, stem: &str, names: &[&str]) -> CertificateConfig {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let config = CertificateConfig {
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
            names: Vec::new(),
        };
        std::fs::write(&config.cert, cert.pem()).unwrap();
        std::fs::write(&config.key, key.serialize_pem()).unwrap();
        config
    }

    fn leaf_of(store: &CertificateStore, sni: Option<&str>) -> Vec<u8> {
        let loaded = store.snapshot();
        let key = match sni {
            None => loaded.default.clone(),
            Some(name) => loaded.by_name.get(name).cloned().unwrap_or_else(|| loaded.default.clone()),
        };
        key.cert[0].to_vec()
    }

    #[test]
    fn names_come_from_subject_alt_names_and_reload_swaps() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_cert(dir.path(), "a", &["mail.a.example"]);
        let b = write_cert(dir.path(), "b", &["pop.b.example", "*.c.example"]);
        let store = CertificateStore::load(vec![a.clone(), b.clone()]).unwrap();
        let a_leaf = leaf_of(&store, None);
        assert_eq!(leaf_of(&store, Some("mail.a.example")), a_leaf);
        let b_leaf = leaf_of(&store, Some("pop.b.example"));
        assert_ne!(a_leaf, b_leaf);
        assert_eq!(leaf_of(&store, Some("*.c.example")), b_leaf);
        assert!(!store.reload_if_changed().unwrap());

        // Replace a's certificate on disk: a reload serves the new one.
        std::thread::sleep(std::time::Duration::from_millis(20));
        write_cert(dir.path(), "a", &["mail.a.example"]);
        assert!(store.reload_if_changed().unwrap());
        assert_ne!(leaf_of(&store, None), a_leaf);

        // A broken file keeps the previous set.
        let before = leaf_of(&store, None);
        std::fs::write(&a.key, "not a key").unwrap();
        assert!(store.reload().is_err());
        assert_eq!(leaf_of(&store, None), before);
    }

    #[test]
    fn expiry_is_the_leaf_not_after() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["x.example".to_string()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2031, 5, 17);
        let cert = params.self_signed(&key).unwrap();
        let config = CertificateConfig { cert: dir.path().join("x.crt"), key: dir.path().join("x.key"), names: vec![] };
        std::fs::write(&config.cert, cert.pem()).unwrap();
        std::fs::write(&config.key, key.serialize_pem()).unwrap();
        let store = CertificateStore::load(vec![config.clone()]).unwrap();
        // 2031-05-17T00:00:00Z
        assert_eq!(store.expiries(), vec![(config.cert.display().to_string(), 1_936_742_400)]);
    }

    #[test]
    fn unusable_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_cert(dir.path(), "a", &["x.example"]);
        let b = write_cert(dir.path(), "b", &["y.example"]);
        let mismatched = CertificateConfig { cert: a.cert.clone(), key: b.key.clone(), names: vec![] };
        let e = CertificateStore::load(vec![mismatched]).unwrap_err().to_string();
        assert!(e.contains("a.crt"), "{e}");
        let missing = CertificateConfig { cert: dir.path().join("nope.crt"), key: a.key, names: vec![] };
        let e = CertificateStore::load(vec![missing]).unwrap_err().to_string();
        assert!(e.contains("nope.crt"), "{e}");
        assert!(matches!(CertificateStore::load(vec![]), Err(TlsError::NoCertificate)));
    }
}
