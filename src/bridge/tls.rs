//! TLS client configuration for the cloud link (rustls with the ring provider only).
//!
//! Owns turning `[cloud]` file paths into a `rustls::ClientConfig`: the CA roots, the optional
//! client certificate for mutual TLS, and the name the server certificate must carry. There is
//! no plaintext mode and no "insecure" switch: a certificate that does not verify ends the
//! connection attempt.
//!
//! rumqttc uses the dialled host as the TLS server name. When `cloud.server_name` differs, a
//! verifier wrapper checks the certificate against `server_name` instead (full WebPKI
//! verification, only the name differs).

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::config::CloudConfig;

/// Why the TLS configuration cannot be built. Start-up fails; the message names the key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file is missing, unreadable or holds nothing usable.
    #[error("{key}: {path}: {why}")]
    File {
        /// Config key.
        key: &'static str,
        /// File path.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// rustls refused the material (e.g. key does not match certificate).
    #[error("{key}: {source}")]
    Rustls {
        /// Config key.
        key: &'static str,
        /// rustls error.
        source: rustls::Error,
    },
    /// `cloud.server_name` is not a valid DNS name or IP address.
    #[error("cloud.server_name: {0:?} is not a valid DNS name or IP address")]
    ServerName(String),
}

fn file_err(key: &'static str, path: &Path, why: impl ToString) -> TlsError {
    TlsError::File {
        key,
        path: path.display().to_string(),
        why: why.to_string(),
    }
}

/// The ring crypto provider; the only one compiled in.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the client config from `[cloud]`.
pub fn client_config(c: &CloudConfig) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(&c.ca_file)
        .map_err(|e| file_err("cloud.ca_file", &c.ca_file, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err("cloud.ca_file", &c.ca_file, e))?;
    if certs.is_empty() {
        return Err(file_err(
            "cloud.ca_file",
            &c.ca_file,
            "no CERTIFICATE in it",
        ));
    }
    for cert in certs {
        roots.add(cert).map_err(|e| TlsError::Rustls {
            key: "cloud.ca_file",
            source: e,
        })?;
    }
    let roots = Arc::new(roots);
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls {
            key: "cloud",
            source: e,
        })?;
    let builder = if c.server_name.is_empty() || c.server_name == c.host {
        builder.with_root_certificates(roots)
    } else {
        let name = ServerName::try_from(c.server_name.clone())
            .map_err(|_| TlsError::ServerName(c.server_name.clone()))?;
        let inner = WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| file_err("cloud.ca_file", &c.ca_file, e))?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(FixedName { inner, name }))
    };
    let config = if c.client_cert_file.as_os_str().is_empty() {
        builder.with_no_client_auth()
    } else {
        let chain = CertificateDer::pem_file_iter(&c.client_cert_file)
            .map_err(|e| file_err("cloud.client_cert_file", &c.client_cert_file, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| file_err("cloud.client_cert_file", &c.client_cert_file, e))?;
        if chain.is_empty() {
            return Err(file_err(
                "cloud.client_cert_file",
                &c.client_cert_file,
                "no CERTIFICATE in it",
            ));
        }
        let key = PrivateKeyDer::from_pem_file(&c.client_key_file)
            .map_err(|e| file_err("cloud.client_key_file", &c.client_key_file, e))?;
        builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| TlsError::Rustls {
                key: "cloud.client_key_file",
                source: e,
            })?
    };
    Ok(Arc::new(config))
}

/// Verifies the server certificate against a fixed name instead of the dialled host.
#[derive(Debug)]
struct FixedName {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for FixedName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
