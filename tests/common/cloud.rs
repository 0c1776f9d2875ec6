//! The cloud: a real MQTT broker with a TLS listener that requires client certificates,
//! either an in-process rumqttd on a thread of its own (default) or Debian's mosquitto as a
//! child process when `FIELDGATE_TEST_CLOUD=mosquitto`. Only that setting needs mosquitto.
//!
//! [`Cloud::start_with`] picks the kind explicitly and takes a fleet's settings
//! ([`CloudOpts`]): more connections, an MQTT 5 listener for rumqttd, and for mosquitto an
//! ACL file with the certificate's CN as the user name (`use_identity_as_username`), the
//! per-gateway ACL of docs/fleet.md. rumqttd can also run as a child process of a bench
//! ([`serve_if_cloud_child`]) so its CPU and memory can be measured.

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

/// What [`Cloud::start_with`] starts.
#[derive(Clone, Debug)]
pub struct CloudOpts {
    /// `rumqttd` (in-process), `rumqttd-process` (this binary re-executed, see
    /// [`serve_if_cloud_child`]) or `mosquitto` (child process).
    pub kind: String,
    /// Most client connections at once (rumqttd's `max_connections`; mosquitto: unlimited).
    pub max_connections: usize,
    /// rumqttd's listener speaks MQTT 5 (mosquitto speaks both).
    pub v5: bool,
    /// mosquitto only: the text of an ACL file (`acl_file`), with `use_identity_as_username`
    /// so `%u` is the client certificate's CN. rumqttd has no ACLs.
    pub acl: Option<String>,
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

    /// Starts the broker `opts.kind` presenting `server` and trusting `pki.ca`.
    pub fn start_with(pki: &Pki, server: &CertFiles, opts: &CloudOpts) -> Cloud {
        let port = free_port();
        let max = opts.max_connections;
        let cloud = match opts.kind.as_str() {
            "mosquitto" => {
                let dir = tempfile::tempdir().unwrap();
                // After the `listener` line: `use_identity_as_username` is a listener setting.
                let extra = match &opts.acl {
                    Some(acl) => {
                        let file = dir.path().join("acl");
                        std::fs::write(&file, acl).unwrap();
                        format!(
                            "use_identity_as_username true\nacl_file {}\n",
                            file.display()
                        )
                    }
                    None => String::new(),
                };
                Self::mosquitto_in(dir, pki, server, port, &extra)
            }
            "rumqttd" => {
                let config = rumqttd_config(&pki.ca, server, port, max, opts.v5);
                std::thread::spawn(move || {
                    let _ = rumqttd::Broker::new(config).start();
                });
                Cloud {
                    port,
                    child: None,
                    _dir: None,
                }
            }
            "rumqttd-process" => Self::rumqttd_process(pki, server, port, max, opts.v5),
            other => panic!("cloud kind {other:?}: use rumqttd, rumqttd-process or mosquitto"),
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

    /// Process id of the broker when it is a child process (mosquitto, rumqttd-process);
    /// None in-process.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// rumqttd in a child process: this executable again, with [`CLOUD_CHILD_ENV`] set, so
    /// its CPU and memory can be read from `/proc` apart from the harness's. Only for
    /// binaries whose `main` calls [`serve_if_cloud_child`] first (the fleet bench).
    fn rumqttd_process(
        pki: &Pki,
        server: &CertFiles,
        port: u16,
        max_connections: usize,
        v5: bool,
    ) -> Cloud {
        let spec = format!(
            "{port}|{}|{}|{}|{max_connections}|{}",
            pki.ca.display(),
            server.cert.display(),
            server.key.display(),
            if v5 { "5" } else { "4" }
        );
        let child = Command::new(std::env::current_exe().unwrap())
            .env(CLOUD_CHILD_ENV, spec)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot re-execute this binary as the rumqttd cloud");
        Cloud {
            port,
            child: Some(child),
            _dir: None,
        }
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
        let config = rumqttd_config(&pki.ca, server, port, 100, v5);
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

/// What a re-executed binary serves as the cloud:
/// `<port>|<ca>|<cert>|<key>|<max_connections>|<4 or 5>`.
pub const CLOUD_CHILD_ENV: &str = "FIELDGATE_CLOUD_CHILD";

/// In a process started for the cloud kind `rumqttd-process`: serves rumqttd until killed and
/// never returns. Anywhere else it returns at once. A bench's `main` calls it first.
pub fn serve_if_cloud_child() {
    let Ok(spec) = std::env::var(CLOUD_CHILD_ENV) else {
        return;
    };
    let f: Vec<&str> = spec.split('|').collect();
    assert_eq!(
        f.len(),
        6,
        "{CLOUD_CHILD_ENV}={spec}: want port|ca|cert|key|max|4-or-5"
    );
    let server = CertFiles {
        cert: f[2].into(),
        key: f[3].into(),
    };
    let port = f[0].parse().expect("port");
    let max = f[4].parse().expect("max_connections");
    let config = rumqttd_config(Path::new(f[1]), &server, port, max, f[5] == "5");
    let _ = rumqttd::Broker::new(config).start();
    std::process::exit(0);
}

/// The rumqttd cloud's settings: one TLS listener on 127.0.0.1:`port` requiring client
/// certificates from `ca`, MQTT 5 if `v5`, else MQTT 3.1.1.
fn rumqttd_config(
    ca: &Path,
    server: &CertFiles,
    port: u16,
    max_connections: usize,
    v5: bool,
) -> rumqttd::Config {
    use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings, TlsConfig};
    let mut listeners = std::collections::HashMap::new();
    listeners.insert(
        "tls".to_string(),
        ServerSettings {
            name: "cloud-tls".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            tls: Some(TlsConfig::Rustls {
                capath: Some(ca.display().to_string()),
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
            max_connections,
            max_outgoing_packet_count: 1000,
            max_segment_size: 100 * 1024 * 1024,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        ..Default::default()
    };
    if v5 {
        Config {
            v5: Some(listeners),
            ..config
        }
    } else {
        Config {
            v4: Some(listeners),
            ..config
        }
    }
}
