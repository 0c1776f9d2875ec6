//! The cloud: a real MQTT broker with a TLS listener that requires client certificates,
//! either an in-process rumqttd on a thread of its own (default) or Debian's mosquitto as a
//! child process when `FIELDGATE_TEST_CLOUD=mosquitto`. Only that setting needs mosquitto.

use std::net::{SocketAddr, TcpStream as StdStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::pki::{CertFiles, Pki};
use super::util::free_port;

/// Which broker plays the cloud.
pub fn cloud_kind() -> String {
    std::env::var("FIELDGATE_TEST_CLOUD").unwrap_or_else(|_| "rumqttd".into())
}

/// A cloud MQTT broker with a TLS listener that requires client certificates.
pub struct Cloud {
    pub port: u16,
    child: Option<Child>,
    _dir: Option<TempDir>,
}

impl Cloud {
    /// Starts a cloud broker presenting `server` and trusting `pki.ca` for client certs.
    pub fn start(pki: &Pki, server: &CertFiles) -> Cloud {
        let port = free_port();
        let cloud = if cloud_kind() == "mosquitto" {
            Self::mosquitto(pki, server, port)
        } else {
            Self::rumqttd(pki, server, port)
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while StdStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "cloud broker did not start on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        cloud
    }

    /// An in-process rumqttd whose TLS listener speaks MQTT 5 (whatever
    /// `FIELDGATE_TEST_CLOUD` says).
    pub fn rumqttd_v5(pki: &Pki, server: &CertFiles) -> Cloud {
        let port = free_port();
        let cloud = Self::rumqttd_with(pki, server, port, true);
        let deadline = Instant::now() + Duration::from_secs(10);
        while StdStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "rumqttd did not start on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        cloud
    }

    fn rumqttd(pki: &Pki, server: &CertFiles, port: u16) -> Cloud {
        Self::rumqttd_with(pki, server, port, false)
    }

    /// rumqttd with one TLS listener on `port`, MQTT 5 if `v5`, else MQTT 3.1.1.
    fn rumqttd_with(pki: &Pki, server: &CertFiles, port: u16, v5: bool) -> Cloud {
        use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings, TlsConfig};
        let mut v4 = std::collections::HashMap::new();
        v4.insert(
            "tls".to_string(),
            ServerSettings {
                name: "cloud-tls".into(),
                listen: SocketAddr::from(([127, 0, 0, 1], port)),
                tls: Some(TlsConfig::Rustls {
                    capath: Some(pki.ca.display().to_string()),
                    certpath: server.cert.display().to_string(),
                    keypath: server.key.display().to_string(),
                }),
                next_connection_delay_ms: 0,
                connections: ConnectionSettings {
                    connection_timeout_ms: 10_000,
                    max_payload_size: 1024 * 1024,
                    max_inflight_count: 1000,
                    auth: None,
                    external_auth: None,
                    dynamic_filters: true,
                },
            },
        );
        let config = Config {
            id: 0,
            router: RouterConfig {
                max_connections: 100,
                max_outgoing_packet_count: 1000,
                max_segment_size: 100 * 1024 * 1024,
                max_segment_count: 10,
                custom_segment: None,
                initialized_filters: None,
                shared_subscriptions_strategy: Default::default(),
            },
            ..Default::default()
        };
        let config = if v5 {
            Config {
                v5: Some(v4),
                ..config
            }
        } else {
            Config {
                v4: Some(v4),
                ..config
            }
        };
        std::thread::spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            let _ = broker.start();
        });
        Cloud {
            port,
            child: None,
            _dir: None,
        }
    }

    /// A mosquitto cloud (whatever `FIELDGATE_TEST_CLOUD` says: MQTT 5 tests need it)
    /// whose anonymous clients get the ACL `acl` (mosquitto's `acl_file` syntax), e.g.
    /// `topic readwrite #` and `topic deny some/topic/#`.
    pub fn mosquitto_with_acl(pki: &Pki, server: &CertFiles, acl: &str) -> Cloud {
        Self::mosquitto_with(pki, server, acl, "")
    }

    /// [`Cloud::mosquitto_with_acl`] with `conf` (mosquitto.conf lines, e.g.
    /// `max_packet_size 2048\n`) added to its configuration.
    pub fn mosquitto_with(pki: &Pki, server: &CertFiles, acl: &str, conf: &str) -> Cloud {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let acl_file = dir.path().join("acl");
        std::fs::write(&acl_file, acl).unwrap();
        let extra = format!("acl_file {}\n{conf}", acl_file.display());
        let cloud = Self::mosquitto_in(dir, pki, server, port, &extra);
        let deadline = Instant::now() + Duration::from_secs(10);
        while StdStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not start on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        cloud
    }

    fn mosquitto(pki: &Pki, server: &CertFiles, port: u16) -> Cloud {
        Self::mosquitto_in(tempfile::tempdir().unwrap(), pki, server, port, "")
    }

    /// mosquitto with its config in `dir`, `extra` appended to it.
    fn mosquitto_in(dir: TempDir, pki: &Pki, server: &CertFiles, port: u16, extra: &str) -> Cloud {
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\n\
                 cafile {}\ncertfile {}\nkeyfile {}\n\
                 require_certificate true\nallow_anonymous true\n\
                 persistence false\nmax_queued_messages 0\nmax_inflight_messages 0\n\
                 log_dest stderr\nlog_type error\nlog_type warning\n{extra}",
                pki.ca.display(),
                server.cert.display(),
                server.key.display()
            ),
        )
        .unwrap();
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("FIELDGATE_TEST_CLOUD=mosquitto but mosquitto cannot be started (apt-get install mosquitto)");
        Cloud {
            port,
            child: Some(child),
            _dir: Some(dir),
        }
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Path of Debian's mosquitto (it lives in /usr/sbin, often not on a user's PATH).
pub fn mosquitto_bin() -> String {
    for p in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    "mosquitto".into()
}
