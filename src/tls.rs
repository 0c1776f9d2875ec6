//! TLS material shared by every part that speaks TLS: the crypto provider, PEM files, and the
//! server side every listener shares.
//!
//! A leaf: it imports nothing from the crate but the [`crate::problem`] leaf. The cloud link
//! ([`crate::bridge::tls`]) and OTA downloads build their client configs from what is loaded
//! here; the device listeners (`[broker.listeners.NAME.tls]`) and the HTTP endpoint
//! (`[http.tls]`) take one [`ServerTlsConfig`] and get their rustls server config from
//! [`server_config`], checked by [`check_server`]. So a certificate, key or CA file is read,
//! checked and reported the same way everywhere: every error names the config key and the
//! file.
//!
//! With `client_cert = "optional"` or `"required"` the handshake *accepts* a client without a
//! certificate (rustls `allow_unauthenticated`), so that the listener can answer such a client
//! in its own protocol (a CONNACK refusal, a login page) instead of a bare TLS alert; a
//! certificate that is sent is always fully verified against `client_ca_file`, and a bad one
//! fails the handshake.
//!
//! ring is the only provider compiled in. [`install_default_provider`] makes it the process
//! default once at start-up (rumqttc builds configs through the default when not handed one,
//! and two compiled-in providers would make it panic); configs built here take it
//! explicitly.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use serde::{Deserialize, Serialize};

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

/// A listener's TLS: `[broker.listeners.NAME.tls]` and `[http.tls]` have these keys.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    /// PEM server certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `cert_file`.
    pub key_file: PathBuf,
    /// PEM CA certificate(s) that sign client certificates (mutual TLS).
    #[serde(default)]
    pub client_ca_file: PathBuf,
    /// `none`, `optional` (a certificate, when sent, identifies the client) or `required`.
    #[serde(default)]
    pub client_cert: ClientCertMode,
}

/// Whether a TLS listener asks clients for a certificate.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ClientCertMode {
    /// Never asked; clients authenticate with a password (or are anonymous).
    #[default]
    None,
    /// Asked; a verified certificate's CN is the identity, without one a password is needed.
    Optional,
    /// Every client must present a certificate signed by `client_ca_file`; its CN is the
    /// identity. Without one the listener refuses the client (a device gets CONNACK 5).
    Required,
}

impl<'de> Deserialize<'de> for ClientCertMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match String::deserialize(d)?.as_str() {
            "none" => Ok(ClientCertMode::None),
            "optional" => Ok(ClientCertMode::Optional),
            "required" => Ok(ClientCertMode::Required),
            other => Err(serde::de::Error::custom(format!(
                "`{other}` is not a client certificate mode; use one of: none, optional, required"
            ))),
        }
    }
}

/// The rustls server config of the listener whose TLS section is `prefix` (a config key such
/// as `http.tls`, named by every error).
pub fn server_config(prefix: &str, t: &ServerTlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let invalid = |k: &str, e: String| TlsError::invalid(format!("{prefix}.{k}"), e);
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("cert_file", e.to_string()))?;
    let builder = match t.client_cert {
        ClientCertMode::None => builder.with_no_client_auth(),
        ClientCertMode::Optional | ClientCertMode::Required => {
            let roots = roots(&format!("{prefix}.client_ca_file"), &t.client_ca_file)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| invalid("client_ca_file", e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let chain = certs(&format!("{prefix}.cert_file"), &t.cert_file)?;
    let key = private_key(&format!("{prefix}.key_file"), &t.key_file)?;
    let cfg = builder
        .with_single_cert(chain, key)
        .map_err(|e| invalid("key_file", e.to_string()))?;
    Ok(Arc::new(cfg))
}

/// What `check-config` says about the TLS section `prefix`: files readable and PEM, the key
/// the certificate's, a CA when client certificates are asked for.
pub fn check_server(p: &mut Vec<Problem>, prefix: &str, t: &ServerTlsConfig) {
    let before = p.len();
    check_pem(
        p,
        &format!("{prefix}.cert_file"),
        &t.cert_file,
        "CERTIFICATE",
    );
    check_pem(p, &format!("{prefix}.key_file"), &t.key_file, "PRIVATE KEY");
    if p.len() == before {
        // Both files read: the key must be the certificate's (run would fail on it).
        let only_pair = ServerTlsConfig {
            client_cert: ClientCertMode::None,
            ..t.clone()
        };
        if let Err(TlsError::Invalid { why, .. }) = server_config(prefix, &only_pair) {
            p.push(problem(
                format!("{prefix}.key_file"),
                format!("is not the key of cert_file (rustls: {why}); use the key the certificate was issued for"),
            ));
        }
    }
    let ca = !t.client_ca_file.as_os_str().is_empty();
    if t.client_cert != ClientCertMode::None && !ca {
        p.push(problem(
            format!("{prefix}.client_ca_file"),
            "client certificates are asked for but no CA is given; set client_ca_file to the clients' CA PEM",
        ));
    }
    if ca {
        check_pem(
            p,
            &format!("{prefix}.client_ca_file"),
            &t.client_ca_file,
            "CERTIFICATE",
        );
    }
}

/// The subject common name of a (verified) DER certificate, if it has one that is UTF-8.
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
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
