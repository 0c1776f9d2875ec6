//! TLS for device listeners: the rustls server configuration (ring provider only).
//!
//! Owns turning `[broker.listeners.NAME.tls]` into a `rustls::ServerConfig` and reading the
//! identity (subject CN) out of a verified client certificate. With `client_cert =
//! "optional"` or `"required"` the handshake *accepts* a client without a certificate
//! (rustls `allow_unauthenticated`), so that the front end can answer such a client with a
//! proper CONNACK refusal instead of a bare TLS alert; a certificate that is sent is always
//! fully verified against `client_ca_file`, and a bad one fails the handshake.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::config::{ClientCertMode, ListenerTlsConfig};

/// Why a listener's TLS configuration cannot be built. The gateway does not start; the
/// message names the key and the file.
#[derive(Debug, thiserror::Error)]
pub enum ListenerTlsError {
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
    /// rustls refused the material (e.g. the key does not match the certificate).
    #[error("{key}: {why}")]
    Rustls {
        /// Config key.
        key: String,
        /// rustls' reason.
        why: String,
    },
}

fn certs(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, ListenerTlsError> {
    let err = |why: String| ListenerTlsError::File {
        key: key.to_string(),
        path: path.display().to_string(),
        why,
    };
    let v = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if v.is_empty() {
        return Err(err("no CERTIFICATE in it".into()));
    }
    Ok(v)
}

/// Builds the server config of listener `name`.
pub fn server_config(
    name: &str,
    t: &ListenerTlsConfig,
) -> Result<Arc<ServerConfig>, ListenerTlsError> {
    let prefix = format!("broker.listeners.{name}.tls");
    let rustls_err = |k: &str, e: String| ListenerTlsError::Rustls {
        key: format!("{prefix}.{k}"),
        why: e,
    };
    let provider = crate::bridge::tls::provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| rustls_err("cert_file", e.to_string()))?;
    let builder = match t.client_cert {
        ClientCertMode::None => builder.with_no_client_auth(),
        ClientCertMode::Optional | ClientCertMode::Required => {
            let mut roots = RootCertStore::empty();
            for c in certs(&format!("{prefix}.client_ca_file"), &t.client_ca_file)? {
                roots
                    .add(c)
                    .map_err(|e| rustls_err("client_ca_file", e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| rustls_err("client_ca_file", e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let chain = certs(&format!("{prefix}.cert_file"), &t.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&t.key_file).map_err(|e| ListenerTlsError::File {
        key: format!("{prefix}.key_file"),
        path: t.key_file.display().to_string(),
        why: e.to_string(),
    })?;
    let cfg = builder
        .with_single_cert(chain, key)
        .map_err(|e| rustls_err("key_file", e.to_string()))?;
    Ok(Arc::new(cfg))
}

/// The subject common name of a (verified) DER certificate, if it has one that is UTF-8.
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}
