//! `[cloud]` and `[downlink]`: the cloud broker the bridge connects to (TLS only), its
//! limits and pacing, and which cloud messages come down to local devices; the sections'
//! types and their validation (PEM files are read here, and a client key is checked against
//! its certificate, so `check-config` reports what `run` would fail on).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::link::Protocol;
use crate::problem::{problem, Problem};
use crate::tls::check_pem;
use crate::topic;

/// `[downlink]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DownlinkConfig {
    /// Cloud topic filters the bridge subscribes to. `{gateway_id}` is replaced.
    pub subscribe: Vec<String>,
    /// Removed from the front of a cloud topic before it is published locally.
    pub strip_prefix: String,
    /// Put in front of the stripped topic.
    pub local_prefix: String,
}

impl Default for DownlinkConfig {
    fn default() -> Self {
        DownlinkConfig {
            subscribe: vec!["fieldgate/{gateway_id}/cmd/#".into()],
            strip_prefix: "fieldgate/{gateway_id}/".into(),
            local_prefix: String::new(),
        }
    }
}

/// `[cloud]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CloudConfig {
    /// Set to true (with `host` and `ca_file`) to bridge to the cloud.
    pub enabled: bool,
    /// Host name or IP address to dial.
    pub host: String,
    /// TCP port (MQTT over TLS is usually 8883).
    pub port: u16,
    /// Name the server certificate must carry. Default: `host`.
    pub server_name: String,
    /// PEM file with the CA certificate(s) that signed the cloud broker's certificate.
    pub ca_file: PathBuf,
    /// PEM client certificate for mutual TLS (with `client_key_file`).
    pub client_cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) for `client_cert_file`.
    pub client_key_file: PathBuf,
    /// MQTT username, if the cloud wants one.
    pub username: String,
    /// MQTT password.
    pub password: String,
    /// MQTT client id. Default: the gateway id.
    pub client_id: String,
    /// MQTT protocol version: `"3.1.1"` (default) or `"5"`.
    pub protocol: String,
    /// MQTT 5 only: how long the cloud broker keeps the gateway's session (its downlink
    /// subscriptions and the commands sent to them) after a connection is lost. `"0s"`:
    /// a new session every time. The queue, not the broker, still holds the uplink.
    #[serde(with = "humantime_serde")]
    pub session_expiry: Duration,
    /// MQTT keepalive.
    #[serde(with = "humantime_serde")]
    pub keepalive: Duration,
    /// TCP + TLS + CONNACK must complete within this.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Most QoS 1 messages sent and not yet PUBACKed.
    pub max_inflight: u16,
    /// Largest MQTT packet sent or received, in bytes; at least `broker.max_payload_size` + the
    /// cloud prefix + 5.
    pub max_packet_size: usize,
    /// First reconnect delay; doubles per failure, with jitter.
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// Replay pacing in messages per second. 0: unlimited.
    pub replay_msgs_per_sec: u32,
    /// Replay pacing in payload bytes per second. 0: unlimited.
    pub replay_bytes_per_sec: u64,
    /// Retained `online` on connect, last will `offline`. `{gateway_id}` is replaced.
    pub status_topic: String,
}

impl Default for CloudConfig {
    fn default() -> Self {
        CloudConfig {
            enabled: false,
            host: String::new(),
            port: 8883,
            server_name: String::new(),
            ca_file: PathBuf::new(),
            client_cert_file: PathBuf::new(),
            client_key_file: PathBuf::new(),
            username: String::new(),
            password: String::new(),
            client_id: String::new(),
            protocol: "3.1.1".into(),
            session_expiry: Duration::from_secs(300),
            keepalive: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            max_inflight: 256,
            max_packet_size: 1024 * 1024,
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(60),
            replay_msgs_per_sec: 0,
            replay_bytes_per_sec: 0,
            status_topic: "fieldgate/{gateway_id}/status".into(),
        }
    }
}

impl CloudConfig {
    /// Every problem of `[cloud]`; `expand` fills in `{gateway_id}`. Nothing is checked when
    /// the cloud is disabled.
    pub fn validate(&self, expand: &dyn Fn(&str) -> String) -> Vec<Problem> {
        let mut p = Vec::new();
        let c = self;
        if c.enabled {
            if c.host.is_empty() {
                p.push(problem(
                    "cloud.host",
                    "empty; set the cloud broker's host name, or cloud.enabled = false",
                ));
            }
            if c.port == 0 {
                p.push(problem(
                    "cloud.port",
                    "must not be 0; MQTT over TLS is usually 8883",
                ));
            }
            if Protocol::from_config(&c.protocol).is_none() {
                p.push(problem(
                    "cloud.protocol",
                    format!(
                        "{:?} is not supported; use one of {}",
                        c.protocol,
                        Protocol::NAMES.map(|n| format!("{n:?}")).join(", ")
                    ),
                ));
            }
            if c.session_expiry > Duration::from_secs(u32::MAX as u64) {
                p.push(problem(
                    "cloud.session_expiry",
                    "must be below 136 years (MQTT 5 counts it in u32 seconds); e.g. \"5m\"",
                ));
            }
            if c.ca_file.as_os_str().is_empty() {
                p.push(problem(
                    "cloud.ca_file",
                    "empty; the bridge never connects without TLS: point it at the CA's PEM file",
                ));
            } else {
                check_pem(&mut p, "cloud.ca_file", &c.ca_file, "CERTIFICATE");
            }
            let cert = !c.client_cert_file.as_os_str().is_empty();
            let key = !c.client_key_file.as_os_str().is_empty();
            if cert != key {
                p.push(problem(
                    if cert { "cloud.client_key_file" } else { "cloud.client_cert_file" },
                    "mutual TLS needs both client_cert_file and client_key_file; set both or neither",
                ));
            }
            let before = p.len();
            if cert {
                check_pem(
                    &mut p,
                    "cloud.client_cert_file",
                    &c.client_cert_file,
                    "CERTIFICATE",
                );
            }
            if key {
                check_pem(
                    &mut p,
                    "cloud.client_key_file",
                    &c.client_key_file,
                    "PRIVATE KEY",
                );
            }
            if cert && key && p.len() == before {
                // Both files read: the key must be the certificate's (run would fail on it).
                match crate::bridge::tls::client_config(c) {
                    Err(crate::tls::TlsError::Invalid { key, why })
                        if key == "cloud.client_key_file" =>
                    {
                        p.push(problem(
                            "cloud.client_key_file",
                            format!(
                                "{why}; the key must be the one client_cert_file was issued for"
                            ),
                        ));
                    }
                    _ => {}
                }
            }
            if c.keepalive < Duration::from_secs(5) || c.keepalive > Duration::from_secs(65535) {
                p.push(problem(
                    "cloud.keepalive",
                    "must be between 5s and 65535s; e.g. \"30s\"",
                ));
            }
            if c.connect_timeout < Duration::from_secs(1) {
                p.push(problem(
                    "cloud.connect_timeout",
                    "must be at least 1s; e.g. \"10s\"",
                ));
            }
            if c.max_inflight == 0 {
                p.push(problem(
                    "cloud.max_inflight",
                    "must be at least 1; e.g. 256",
                ));
            }
            if c.max_packet_size < 1024 {
                p.push(problem("cloud.max_packet_size", "must be at least 1024"));
            }
            if c.reconnect_min.is_zero() || c.reconnect_min > c.reconnect_max {
                p.push(problem(
                    "cloud.reconnect_min",
                    "must be above 0 and not above cloud.reconnect_max",
                ));
            }
            let status = expand(&c.status_topic);
            if let Err(e) = topic::validate_topic(&status) {
                p.push(problem("cloud.status_topic", format!("{status:?}: {e}")));
            }
        }
        p
    }
}

impl DownlinkConfig {
    /// Every problem of `[downlink]`; `expand` fills in `{gateway_id}`.
    pub fn validate(&self, expand: &dyn Fn(&str) -> String) -> Vec<Problem> {
        let mut p = Vec::new();
        for (i, f) in self.subscribe.iter().enumerate() {
            let f = expand(f);
            if let Err(e) = topic::validate_filter(&f) {
                p.push(problem(
                    format!("downlink.subscribe[{i}]"),
                    format!("{f:?}: {e}"),
                ));
            }
        }
        if self.local_prefix.contains(['+', '#']) {
            p.push(problem(
                "downlink.local_prefix",
                "must not contain '+' or '#'",
            ));
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_protocol_names_the_key_and_the_allowed_values() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let base = CloudConfig {
            enabled: true,
            host: "cloud.example.com".into(),
            ca_file: ca,
            ..CloudConfig::default()
        };
        let expand = |s: &str| s.replace("{gateway_id}", "gw1");
        let keys = |c: &CloudConfig| -> Vec<String> {
            c.validate(&expand).iter().map(|p| p.key.clone()).collect()
        };
        for ok in ["3.1.1", "5"] {
            let c = CloudConfig {
                protocol: ok.into(),
                ..base.clone()
            };
            assert!(!keys(&c).contains(&"cloud.protocol".to_string()), "{ok}");
        }
        let bad = CloudConfig {
            protocol: "5.0".into(),
            ..base.clone()
        };
        let p = bad.validate(&expand);
        let p = p
            .iter()
            .find(|p| p.key == "cloud.protocol")
            .expect("a cloud.protocol problem");
        assert!(
            p.message.contains("\"5.0\"") && p.message.contains("\"3.1.1\", \"5\""),
            "{}",
            p.message
        );
    }
}
