//! TLS for device listeners: the rustls server configuration (ring provider only).
//!
//! Owns turning `[broker.listeners.NAME.tls]` into a `rustls::ServerConfig` and reading the
//! identity (subject CN) out of a verified client certificate. With `client_cert =
//! "optional"` or `"required"` the handshake *accepts* a client without a certificate
//! (rustls `allow_unauthenticated`), so that the front end can answer such a client with a
//! proper CONNACK refusal instead of a bare TLS alert; a certificate that is sent is always
//! fully verified against `client_ca_file`, and a bad one fails the handshake.

use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;

use super::config::{ClientCertMode, ListenerTlsConfig};
use crate::tls::{certs, private_key, provider, roots, TlsError};

/// Builds the server config of listener `name`.
pub fn server_config(name: &str, t: &ListenerTlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let prefix = format!("broker.listeners.{name}.tls");
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

/// The subject common name of a (verified) DER certificate, if it has one that is UTF-8.
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}
