//! Whom popgate trusts when it connects out — IMAP, JMAP, the Gmail API,
//! Microsoft Graph and the OAuth providers alike: the system's trust store
//! (where a corporate TLS-inspection CA is installed), plus the CA
//! certificates of a `ca_file`. Only without any system store (a bare
//! container) are the bundled Mozilla roots used instead.

use std::path::Path;
use std::sync::OnceLock;

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// The roots for one outgoing TLS client: the system's, plus `ca_file`'s.
pub fn roots(ca_file: Option<&Path>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    match system_roots() {
        Some(certs) => {
            roots.add_parsable_certificates(certs.iter().cloned());
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    if let Some(path) = ca_file {
        let bad = |why: String| format!("ca_file {}: {why}", path.display());
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| bad(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(e.to_string()))?;
        if certs.is_empty() {
            return Err(bad("no certificates in it".into()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| bad(e.to_string()))?;
        }
    }
    Ok(roots)
}

/// The system's trust store (SSL_CERT_FILE / SSL_CERT_DIR are honoured),
/// read once; `None` when it has no certificate.
fn system_roots() -> Option<&'static [CertificateDer<'static>]> {
    static SYSTEM: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    let certs = SYSTEM.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        if found.certs.is_empty() {
            tracing::warn!(
                errors = found.errors.len(),
                "no system trust store found (install ca-certificates); using the bundled Mozilla roots"
            );
        }
        found.certs
    });
    (!certs.is_empty()).then_some(certs.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_adds_to_the_system_store() {
        let system = roots(None).unwrap().len();
        assert!(system > 0, "some roots are always trusted");
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".to_string()]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, ca.cert.pem()).unwrap();
        assert_eq!(roots(Some(&path)).unwrap().len(), system + 1);
        std::fs::write(&path, "").unwrap();
        let e = roots(Some(&path)).unwrap_err();
        assert!(e.contains("ca_file") && e.contains("ca.pem"), "{e}");
    }
}
