//! (g) The cloud link is TLS or nothing: a wrong CA, an expired or mismatched server
//! certificate, or a missing client certificate each end the attempt with a clear error in the
//! log, the link stays down, nothing is sent in plaintext, and the queued messages stay queued.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(30);

/// Starts a gateway against `cloud_port` with its config changed by `edit`, publishes 20
/// messages, and checks that the link never comes up and
/// nothing is lost. Returns the gateway log.
async fn refused(
    pki: &Pki,
    cloud_port: u16,
    edit: impl Fn(GatewayConfig) -> GatewayConfig,
) -> String {
    let ports = GatewayPorts::new();
    let data = tempfile::tempdir().unwrap();
    let config = edit(GatewayConfig::bridged(pki, &ports, data.path(), cloud_port));
    let gw = Gateway::start(&config.to_toml(), &ports).await;
    publish_seq(ports.mqtt, "a", 0..20, 32).await;
    assert!(
        eventually(WAIT, || gw.metric("fieldgate_cloud_reconnects_total")
            >= 3.0)
        .await,
        "expected repeated failed attempts\n{}",
        gw.log_text()
    );
    assert_eq!(
        gw.metric("fieldgate_cloud_connected"),
        0.0,
        "{}",
        gw.log_text()
    );
    assert_eq!(gw.metric("fieldgate_messages_out_total"), 0.0);
    assert!(eventually(WAIT, || gw.metric("fieldgate_queue_records") == 20.0).await);
    let health = gw.get("/health").unwrap();
    assert!(health.contains("\"cloud\":\"disconnected\""), "{health}");
    gw.log_text()
}

fn assert_log_says(log: &str, any_of: &[&str]) {
    let l = log.to_lowercase();
    assert!(
        any_of.iter().any(|w| l.contains(&w.to_lowercase())),
        "log names none of {any_of:?}:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_ca_is_refused() {
    let pki = Pki::new();
    let cloud = Cloud::start(&pki, &pki.server);
    let col = Collector::start(&pki, cloud.port, "#").await;
    let log = refused(&pki, cloud.port, |c| {
        c.set("cloud.ca_file", path(&pki.other_ca))
    })
    .await;
    assert_log_says(&log, &["UnknownIssuer", "unknown issuer"]);
    assert_eq!(col.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_server_certificate_is_refused() {
    let pki = Pki::new();
    let cloud = Cloud::start(&pki, &pki.foreign_server);
    let log = refused(&pki, cloud.port, |c| c).await;
    assert_log_says(&log, &["UnknownIssuer", "unknown issuer", "BadSignature"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_server_certificate_is_refused() {
    let pki = Pki::new();
    let cloud = Cloud::start(&pki, &pki.expired_server);
    let log = refused(&pki, cloud.port, |c| c).await;
    assert_log_says(&log, &["expired"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mismatched_server_name_is_refused() {
    let pki = Pki::new();
    let cloud = Cloud::start(&pki, &pki.wrong_name_server);
    let log = refused(&pki, cloud.port, |c| c).await;
    assert_log_says(&log, &["NotValidForName", "not valid for name"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_name_override_verifies_against_that_name() {
    // The certificate names cloud.example.com; dialling 127.0.0.1 with server_name set to it
    // must connect, because verification is against server_name.
    let pki = Pki::new();
    let cloud = Cloud::start(&pki, &pki.wrong_name_server);
    let ports = GatewayPorts::new();
    let data = tempfile::tempdir().unwrap();
    let config = GatewayConfig::bridged(&pki, &ports, data.path(), cloud.port)
        .set("cloud.server_name", "cloud.example.com");
    let gw = Gateway::start(&config.to_toml(), &ports).await;
    assert!(
        eventually(WAIT, || gw.metric("fieldgate_cloud_connected") == 1.0).await,
        "{}",
        gw.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_client_certificate_is_refused() {
    let pki = Pki::new();
    let cloud = Cloud::start(&pki, &pki.server);
    let log = refused(&pki, cloud.port, |c| {
        c.remove("cloud.client_cert_file")
            .remove("cloud.client_key_file")
    })
    .await;
    assert_log_says(
        &log,
        &[
            "CertificateRequired",
            "HandshakeFailure",
            "alert",
            "reset",
            "eof",
            "closed",
        ],
    );
}

/// A peer that only speaks plaintext MQTT: the gateway must only ever send TLS ClientHellos
/// (first byte 0x16), never an MQTT CONNECT (0x10) in the clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_falls_back_to_plaintext() {
    let pki = Pki::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let first_bytes = Arc::new(Mutex::new(Vec::new()));
    let fb = first_bytes.clone();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let mut b = [0u8; 1];
            if s.read_exact(&mut b).await.is_ok() {
                fb.lock().unwrap().push(b[0]);
            }
            // Answer like a plaintext broker would (a CONNACK), then hang up.
            let _ = s.write_all(&[0x20, 0x02, 0x00, 0x00]).await;
        }
    });
    let log = refused(&pki, port, |c| c).await;
    let seen = first_bytes.lock().unwrap().clone();
    assert!(
        seen.len() >= 3,
        "expected several attempts, saw {seen:?}\n{log}"
    );
    assert!(
        seen.iter().all(|b| *b == 0x16),
        "non-TLS first byte sent: {seen:?}"
    );
}
