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

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};

use super::config::CloudConfig;
use crate::tls::{certs, private_key, provider, roots, TlsError};

/// Builds the client config from `[cloud]`.
pub fn client_config(c: &CloudConfig) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = Arc::new(roots("cloud.ca_file", &c.ca_file)?);
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::invalid("cloud", e))?;
    let builder = if c.server_name.is_empty() || c.server_name == c.host {
        builder.with_root_certificates(roots)
    } else {
        let name = ServerName::try_from(c.server_name.clone()).map_err(|_| {
            TlsError::invalid(
                "cloud.server_name",
                format!("{:?} is not a valid DNS name or IP address", c.server_name),
            )
        })?;
        let inner = WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| TlsError::invalid("cloud.ca_file", e))?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(FixedName { inner, name }))
    };
    let config = if c.client_cert_file.as_os_str().is_empty() {
        builder.with_no_client_auth()
    } else {
        let chain = certs("cloud.client_cert_file", &c.client_cert_file)?;
        let key = private_key("cloud.client_key_file", &c.client_key_file)?;
        builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| TlsError::invalid("cloud.client_key_file", e))?
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
