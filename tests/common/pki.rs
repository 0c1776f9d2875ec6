//! The test PKI: a CA and the certificates the tests need, made with rcgen and written as PEM
//! files into a temp dir that lives as long as the [`Pki`]: server, client, expired, wrong
//! name, and a server certificate from a second, unrelated CA; more client certificates on
//! demand ([`Pki::issue_client`], one per gateway of a fleet).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use rumqttc::TlsConfiguration;
use tempfile::TempDir;

/// PEM files for one certificate and its key.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A test CA and the certificates the tests need, as files in a temp dir.
pub struct Pki {
    pub dir: TempDir,
    pub ca: PathBuf,
    pub other_ca: PathBuf,
    pub server: CertFiles,
    pub client: CertFiles,
    pub expired_server: CertFiles,
    pub wrong_name_server: CertFiles,
    /// A server certificate signed by `other_ca`.
    pub foreign_server: CertFiles,
    /// The CA's signing key, kept for [`Pki::issue_client`].
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let cert = p.self_signed(&key).unwrap();
    (cert.pem(), Issuer::new(p, key))
}

fn leaf(
    dir: &Path,
    name: &str,
    sans: &[&str],
    client: bool,
    expired: bool,
    issuer: &Issuer<'static, KeyPair>,
) -> CertFiles {
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.extended_key_usages = vec![if client {
        ExtendedKeyUsagePurpose::ClientAuth
    } else {
        ExtendedKeyUsagePurpose::ServerAuth
    }];
    if expired {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let cert = p.signed_by(&key, issuer).unwrap();
    let files = CertFiles {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    files
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (ca_pem, issuer) = ca("fieldgate test CA");
        let (other_pem, other) = ca("some other CA");
        std::fs::write(d.join("ca.pem"), &ca_pem).unwrap();
        std::fs::write(d.join("other-ca.pem"), &other_pem).unwrap();
        let sans = ["localhost", "127.0.0.1"];
        Pki {
            ca: d.join("ca.pem"),
            other_ca: d.join("other-ca.pem"),
            server: leaf(d, "server", &sans, false, false, &issuer),
            client: leaf(d, "client", &["gateway"], true, false, &issuer),
            expired_server: leaf(d, "expired", &sans, false, true, &issuer),
            wrong_name_server: leaf(
                d,
                "wrongname",
                &["cloud.example.com"],
                false,
                false,
                &issuer,
            ),
            foreign_server: leaf(d, "foreign", &sans, false, false, &other),
            issuer,
            dir,
        }
    }

    /// A client certificate signed by the test CA with CN (and DNS name) `name`, written as
    /// `<name>.pem` / `<name>.key` next to the others: one per gateway of a fleet, so the
    /// cloud can tell them apart by certificate (mosquitto's `use_identity_as_username`).
    pub fn issue_client(&self, name: &str) -> CertFiles {
        leaf(self.dir.path(), name, &[name], true, false, &self.issuer)
    }

    /// rumqttc TLS settings for a test client of the cloud (with a client certificate).
    pub fn client_tls(&self) -> TlsConfiguration {
        TlsConfiguration::Simple {
            ca: std::fs::read(&self.ca).unwrap(),
            alpn: None,
            client_auth: Some((
                std::fs::read(&self.client.cert).unwrap(),
                std::fs::read(&self.client.key).unwrap(),
            )),
        }
    }
}
