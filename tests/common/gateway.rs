//! The gateway under test: the real `fieldgate` binary as a child process (started with a
//! config file in a temp dir, stopped with SIGTERM or SIGKILL, restarted on the same data
//! dir), its ports, its `/health` and `/metrics` endpoints, and the configs tests give it.

use std::io::{Read, Write};
use std::net::TcpStream as StdStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::pki::Pki;
use super::util::free_port;

/// What a test needs to write a gateway config.
pub struct GatewayPorts {
    pub mqtt: u16,
    pub http: u16,
}

impl GatewayPorts {
    pub fn new() -> GatewayPorts {
        GatewayPorts {
            mqtt: free_port(),
            http: free_port(),
        }
    }
}

/// Config for a gateway bridging to `cloud_port` (usually a proxy) with mutual TLS.
pub fn gateway_config(
    pki: &Pki,
    ports: &GatewayPorts,
    data_dir: &Path,
    cloud_port: u16,
    extra: &str,
    store_extra: &str,
) -> String {
    format!(
        r#"
[gateway]
id = "gw1"
data_dir = "{data}"
shutdown_grace = "3s"

[broker.listeners.default]
listen = "127.0.0.1:{mqtt}"
allow_anonymous = true

[metrics]
listen = "127.0.0.1:{http}"

[store]
commit_interval = "20ms"
{store_extra}

[cloud]
enabled = true
host = "127.0.0.1"
port = {cloud_port}
ca_file = "{ca}"
client_cert_file = "{cert}"
client_key_file = "{key}"
keepalive = "5s"
connect_timeout = "3s"
reconnect_min = "50ms"
reconnect_max = "500ms"
{extra}
"#,
        data = data_dir.display(),
        mqtt = ports.mqtt,
        http = ports.http,
        ca = pki.ca.display(),
        cert = pki.client.cert.display(),
        key = pki.client.key.display(),
    )
}

/// The real gateway binary, as a child process.
pub struct Gateway {
    child: Child,
    pub http: u16,
    pub mqtt: u16,
    pub log: PathBuf,
    _conf_dir: TempDir,
}

impl Gateway {
    /// Starts `fieldgate run -c <config>` and waits until `/health` answers.
    pub async fn start(config: &str, ports: &GatewayPorts) -> Gateway {
        Self::start_env(config, ports, &[]).await
    }

    /// As [`Gateway::start`], with extra environment variables.
    pub async fn start_env(config: &str, ports: &GatewayPorts, env: &[(&str, &str)]) -> Gateway {
        let conf_dir = tempfile::tempdir().unwrap();
        let conf = conf_dir.path().join("fieldgate.toml");
        std::fs::write(&conf, config).unwrap();
        let log = conf_dir.path().join("gateway.log");
        let child = fieldgate_command()
            .args(["run", "-c"])
            .arg(&conf)
            .env("RUST_LOG", "info,rumqttd=warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut g = Gateway {
            child,
            http: ports.http,
            mqtt: ports.mqtt,
            log,
            _conf_dir: conf_dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if g.get("/health").is_some() {
                break;
            }
            if let Ok(Some(status)) = g.child.try_wait() {
                panic!("gateway exited early ({status}):\n{}", g.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "gateway not healthy:\n{}",
                g.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        g
    }

    /// Process id of the gateway.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET path` on the metrics endpoint; the body, or None.
    pub fn get(&self, path: &str) -> Option<String> {
        let mut s = StdStream::connect(("127.0.0.1", self.http)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let (_, body) = out.split_once("\r\n\r\n")?;
        Some(body.to_string())
    }

    /// The value of one Prometheus sample, e.g. `fieldgate_queue_records` or
    /// `fieldgate_dropped_total{reason="queue_full"}`.
    pub fn metric(&self, sample: &str) -> f64 {
        let text = self.get("/metrics").unwrap_or_default();
        text.lines()
            .find_map(|l| {
                let (name, v) = l.rsplit_once(' ')?;
                (name == sample).then(|| v.parse().ok())?
            })
            .unwrap_or(f64::NAN)
    }

    /// SIGKILL, no goodbye.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait (bounded) for the exit status; also returns the log.
    pub fn terminate(mut self) -> (ExitStatus, String) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return (s, self.log_text());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("gateway ignored SIGTERM:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The `fieldgate` binary under test, as a command ready for arguments.
///
/// By default the binary cargo built for these tests. `FIELDGATE_TEST_BIN` points at another
/// build (e.g. a cross-compiled release), and `FIELDGATE_TEST_RUNNER` is a whitespace-separated
/// command prefix that runs it (e.g. `qemu-aarch64-static -L /usr/aarch64-linux-gnu`): CI runs
/// the smoke tests against the ARM images this way.
pub fn fieldgate_command() -> Command {
    let bin = std::env::var("FIELDGATE_TEST_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_fieldgate").to_string());
    let runner = std::env::var("FIELDGATE_TEST_RUNNER").unwrap_or_default();
    let mut prefix = runner.split_whitespace();
    match prefix.next() {
        Some(program) => {
            let mut c = Command::new(program);
            c.args(prefix).arg(bin);
            c
        }
        None => Command::new(bin),
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
