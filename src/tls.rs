//! TLS material shared by every part that speaks TLS: the crypto provider and PEM files.
//!
//! A leaf: it imports nothing from the crate but the [`crate::problem`] leaf. The cloud link ([`crate::bridge::tls`]), the
//! device listeners ([`crate::frontend::tls`]) and OTA downloads build their rustls configs
//! from what is loaded here, so a certificate, key or CA file is read, checked and reported
//! the same way everywhere: every error names the config key and the file.
//!
//! ring is the only provider compiled in. [`install_default_provider`] makes it the process
//! default once at start-up (rumqttc builds configs through the default when not handed one,
//! and two compiled-in providers would make it panic); configs built here take it
//! explicitly.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

use crate::problem::{problem, Problem};

/// Why TLS material cannot be used. Start-up fails (or the one download does); the message
/// names the key, so the operator fixes that key or the file it points to.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file is missing, unreadable or holds nothing usable: fix the file or the path.
    #[error("{key}: {path}: {why}")]
    File {
        /// Config key.
        key: String,
        /// File path.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// rustls refused the material (the key does not match the certificate, a CA is not a
    /// CA) or a value (a server name): fix the value of `key`.
    #[error("{key}: {why}")]
    Invalid {
        /// Config key.
        key: String,
        /// rustls' (or the parser's) reason.
        why: String,
    },
}

impl TlsError {
    /// An error about the value of `key`.
    pub fn invalid(key: impl Into<String>, why: impl ToString) -> TlsError {
        TlsError::Invalid {
            key: key.into(),
            why: why.to_string(),
        }
    }

    fn file(key: &str, path: &Path, why: impl ToString) -> TlsError {
        TlsError::File {
            key: key.to_string(),
            path: path.display().to_string(),
            why: why.to_string(),
        }
    }
}

/// The ring crypto provider; the only one compiled in.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs the ring provider as the process default (idempotent).
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Every certificate in the PEM file `path` (config key `key`); none is an error.
pub fn certs(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let v = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::file(key, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::file(key, path, e))?;
    if v.is_empty() {
        return Err(TlsError::file(key, path, "no CERTIFICATE in it"));
    }
    Ok(v)
}

/// The certificates of the PEM file `path` as trust anchors.
pub fn roots(key: &str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs(key, path)? {
        roots.add(cert).map_err(|e| TlsError::invalid(key, e))?;
    }
    Ok(roots)
}

/// The first private key in the PEM file `path`.
pub fn private_key(key: &str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::file(key, path, e))
}

/// Adds a problem to `p` unless `path` (config key `key`) is readable and holds a PEM `what`
/// block (`CERTIFICATE`, `PRIVATE KEY`): what `check-config` says before rustls is asked.
pub fn check_pem(p: &mut Vec<Problem>, key: &str, path: &Path, what: &str) {
    match std::fs::read_to_string(path) {
        Err(e) => p.push(problem(
            key,
            format!(
                "cannot read {}: {e}; check the path and its permissions",
                path.display()
            ),
        )),
        Ok(text) if !text.contains("-----BEGIN ") || !text.contains(what) => p.push(problem(
            key,
            format!("{} holds no PEM {what} block", path.display()),
        )),
        Ok(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_key_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let e = certs("cloud.ca_file", &missing).unwrap_err().to_string();
        assert!(e.starts_with("cloud.ca_file: "), "{e}");
        assert!(e.contains("nope.pem"), "{e}");

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not pem at all\n").unwrap();
        let e = roots("broker.listeners.tls.tls.client_ca_file", &empty)
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("no CERTIFICATE in it"), "{e}");
        let e = private_key("cloud.client_key_file", &empty)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("cloud.client_key_file: "), "{e}");
    }
}
