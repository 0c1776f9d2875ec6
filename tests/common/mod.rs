//! Test harness: real parts on loopback.
//!
//! - [`Pki`]: a test CA and certificates made with rcgen (server, client, expired, wrong name,
//!   a second unrelated CA);
//! - [`Cloud`]: a real cloud MQTT broker with TLS and client certificates required, either an
//!   in-process rumqttd (default) or Debian's mosquitto when `FIELDGATE_TEST_CLOUD=mosquitto`;
//! - [`Proxy`]: a TCP proxy between the gateway and the cloud that a test can cut and restore;
//! - [`Gateway`]: the real `fieldgate` binary as a child process (SIGKILL, SIGTERM, restart);
//! - [`publish_seq`] and [`Collector`]/[`check`]: a plain MQTT device that publishes sequence
//!   numbers and a cloud subscriber that counts them;
//! - [`modbus_sim`]: Modbus TCP/RTU servers with known register maps;
//! - [`pty`]: in-process pseudo-terminal pairs that stand in for serial ports.
#![allow(dead_code)]

pub mod devices;
pub mod modbus_sim;
pub mod ota_sim;
pub mod pty;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use tempfile::TempDir;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A free TCP port on 127.0.0.1, never the same twice in one test process.
///
/// Ports come from a per-process counter below the kernel's ephemeral range (32768+), so
/// tests running in parallel cannot be handed the same port, and outgoing connections cannot
/// take it meanwhile.
pub fn free_port() -> u16 {
    use std::sync::atomic::AtomicU16;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        12_000 + (std::process::id() % 600) as u16 * 30,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let p = NEXT.fetch_add(1, Ordering::SeqCst);
        assert!(p < 32_000, "ran out of test ports");
        if StdListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

/// Polls `f` until it returns true or `within` passes. Returns the last answer.
pub async fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// PKI

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
            dir,
        }
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

// ---------------------------------------------------------------------------------------------
// Cloud broker

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

    fn rumqttd(pki: &Pki, server: &CertFiles, port: u16) -> Cloud {
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
            v4: Some(v4),
            ..Default::default()
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

    fn mosquitto(pki: &Pki, server: &CertFiles, port: u16) -> Cloud {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\n\
                 cafile {}\ncertfile {}\nkeyfile {}\n\
                 require_certificate true\nallow_anonymous true\n\
                 persistence false\nmax_queued_messages 0\nmax_inflight_messages 0\n\
                 log_dest stderr\nlog_type error\nlog_type warning\n",
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

// ---------------------------------------------------------------------------------------------
// Proxy

/// A TCP proxy on loopback in front of the cloud. `cut()` closes every proxied connection
/// and refuses new ones until `restore()`.
///
/// A cut drops the gateway's side at once, as a broken link would. The cloud's side is
/// closed gracefully instead: FIN, then whatever the cloud still sends is read and discarded
/// until it closes too (bounded). Dropping it outright sends the cloud a reset whenever its
/// data sits unread in the proxy, and rumqttd 0.20 (the default cloud) cannot take a reset
/// between a CONNECT and its CONNACK: the failed CONNACK write ("Remote link error ...
/// Broken pipe") leaves that client id's will handler behind, the client's next CONNECT
/// panics on it (rumqttd src/server/broker.rs:544) and poisons the lock every later
/// connection takes, so the cloud refuses everyone for the rest of the test. The gateway
/// sees the same cut either way; only the cloud is spared a failure of its own.
pub struct Proxy {
    pub port: u16,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<CancellationToken>>,
    stop: CancellationToken,
}

impl Proxy {
    pub async fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let conns = Arc::new(Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let (up2, conns2, stop2) = (up.clone(), conns.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    _ = stop2.cancelled() => return,
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                };
                // The token first: a cut between the two checks then still reaches this
                // connection (checked the other way round it could take the new token and
                // outlive the cut).
                let token = conns2.lock().unwrap().clone();
                if !up2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await else {
                        return;
                    };
                    // A relay of small MQTT packets: with Nagle on, each write waits for the
                    // peer's (delayed) ACK, which capped the bridge bench at ~15-25k msg/s.
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let cut = tokio::select! {
                        _ = token.cancelled() => true,
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => false,
                    };
                    drop(inbound);
                    if cut {
                        close_gracefully(outbound).await;
                    }
                });
            }
        });
        Proxy {
            port,
            up,
            conns,
            stop,
        }
    }

    /// Cuts the link: open connections are closed, new ones refused.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        let mut t = self.conns.lock().unwrap();
        t.cancel();
        *t = CancellationToken::new();
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// Most time a cut waits for the cloud to close its side.
const CLOUD_CLOSE: Duration = Duration::from_secs(5);

/// Sends FIN on `s` and reads (discarding) until the peer closes, within [`CLOUD_CLOSE`].
async fn close_gracefully(mut s: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = s.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(CLOUD_CLOSE, async {
        while let Ok(n) = s.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.conns.lock().unwrap().cancel();
    }
}

// ---------------------------------------------------------------------------------------------
// Gateway process

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

// ---------------------------------------------------------------------------------------------
// Devices and the cloud-side subscriber

/// Payload for message `seq` of source `src`, padded to `size` bytes.
pub fn payload(src: &str, seq: u64, size: usize) -> Vec<u8> {
    let mut p = format!("{src}:{seq}:").into_bytes();
    p.resize(size.max(p.len()), b'.');
    p
}

/// A plain MQTT device: publishes `seqs` on `dev/<src>/data` at QoS 1 to the gateway's
/// broker and returns once every PUBLISH was PUBACKed.
pub async fn publish_seq(mqtt_port: u16, src: &str, seqs: std::ops::Range<u64>, size: usize) {
    let mut o = MqttOptions::new(format!("device-{src}"), "127.0.0.1", mqtt_port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(100);
    let (client, mut el) = AsyncClient::new(o, 200);
    let want = seqs.end - seqs.start;
    let topic = format!("dev/{src}/data");
    let src2 = src.to_string();
    let publisher = tokio::spawn(async move {
        for s in seqs {
            client
                .publish(
                    topic.clone(),
                    QoS::AtLeastOnce,
                    false,
                    payload(&src2, s, size),
                )
                .await
                .unwrap();
        }
        client
    });
    let mut acked = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked < want {
        assert!(
            Instant::now() < deadline,
            "device {src}: only {acked}/{want} acked"
        );
        match tokio::time::timeout(Duration::from_secs(10), el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("device {src}: {e}"),
            Err(_) => panic!("device {src}: no progress for 10s at {acked}/{want}"),
        }
    }
    let client = publisher.await.unwrap();
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), el.poll()).await;
}

/// A device that publishes `dev/<src>/data` at QoS 1 as fast as the broker takes it, from
/// seq 0 up to `max`, and stops at the first connection error. Returns the sequence numbers
/// the broker acknowledged (PUBACK): exactly the messages the gateway accepted.
pub async fn flood(mqtt_port: u16, src: &str, max: u64, size: usize) -> Vec<u64> {
    let mut o = MqttOptions::new(format!("flood-{src}"), "127.0.0.1", mqtt_port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(100);
    let (client, mut el) = AsyncClient::new(o, 200);
    let topic = format!("dev/{src}/data");
    let src2 = src.to_string();
    let publisher = tokio::spawn(async move {
        for s in 0..max {
            let p = payload(&src2, s, size);
            if client
                .publish(topic.clone(), QoS::AtLeastOnce, false, p)
                .await
                .is_err()
            {
                return;
            }
        }
    });
    // One connection, never resumed: the n-th outgoing PUBLISH carries seq n, so its packet
    // id maps an acknowledgement back to its sequence number.
    let mut next_out = 0u64;
    let mut by_pkid = std::collections::HashMap::new();
    let mut acked = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline && (acked.len() as u64) < max {
        match tokio::time::timeout(Duration::from_secs(10), el.poll()).await {
            Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid)))) => {
                by_pkid.insert(pkid, next_out);
                next_out += 1;
            }
            Ok(Ok(Event::Incoming(Packet::PubAck(a)))) => {
                if let Some(seq) = by_pkid.remove(&a.pkid) {
                    acked.push(seq);
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => break,
        }
    }
    publisher.abort();
    acked.sort_unstable();
    acked
}

/// One message a [`LocalSub`] received.
#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

/// A plain MQTT client of the gateway's local broker that records everything on `filter`
/// (in arrival order) until dropped. `start` returns once the broker granted the subscription.
pub struct LocalSub {
    pub received: Arc<Mutex<Vec<Msg>>>,
    pub client: AsyncClient,
    stop: CancellationToken,
}

impl LocalSub {
    pub async fn start(port: u16, filter: &str, qos: QoS) -> LocalSub {
        let mut o = MqttOptions::new(format!("local-sub-{}", free_port()), "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut el) = AsyncClient::new(o, 100);
        client.subscribe(filter, qos).await.unwrap();
        let received: Arc<Mutex<Vec<Msg>>> = Arc::default();
        let stop = CancellationToken::new();
        let (r2, s2) = (received.clone(), stop.clone());
        let (ack_tx, ack_rx) = tokio::sync::oneshot::channel();
        let mut ack_tx = Some(ack_tx);
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    _ = s2.cancelled() => return,
                    ev = el.poll() => ev,
                };
                match ev {
                    Ok(Event::Incoming(Packet::Publish(p))) => r2.lock().unwrap().push(Msg {
                        topic: p.topic.clone(),
                        payload: p.payload.to_vec(),
                        retain: p.retain,
                    }),
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(t) = ack_tx.take() {
                            let _ = t.send(());
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ack_rx)
            .await
            .expect("no SUBACK from the gateway's broker")
            .unwrap();
        LocalSub {
            received,
            client,
            stop,
        }
    }

    /// Payloads received on `topic`, in order.
    pub fn on(&self, topic: &str) -> Vec<Vec<u8>> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.topic == topic)
            .map(|m| m.payload.clone())
            .collect()
    }
}

impl Drop for LocalSub {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Everything a collector received: `(topic, payload)` in arrival order.
pub type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A cloud-side subscriber (TLS + client certificate) that records every message.
pub struct Collector {
    pub received: Received,
    pub client: AsyncClient,
    stop: CancellationToken,
}

impl Collector {
    pub async fn start(pki: &Pki, cloud_port: u16, filter: &str) -> Collector {
        let mut o = MqttOptions::new(
            format!("collector-{}", free_port()),
            "127.0.0.1",
            cloud_port,
        );
        o.set_keep_alive(Duration::from_secs(30));
        o.set_transport(Transport::tls_with_config(pki.client_tls()));
        o.set_max_packet_size(2 * 1024 * 1024, 2 * 1024 * 1024);
        let (client, mut el) = AsyncClient::new(o, 100);
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (r2, s2) = (received.clone(), stop.clone());
        let (sub_tx, sub_rx) = tokio::sync::oneshot::channel();
        let mut sub_tx = Some(sub_tx);
        client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    _ = s2.cancelled() => return,
                    ev = el.poll() => ev,
                };
                match ev {
                    Ok(Event::Incoming(Packet::Publish(p))) => r2
                        .lock()
                        .unwrap()
                        .push((p.topic.clone(), p.payload.to_vec())),
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = sub_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), sub_rx)
            .await
            .expect("collector: no SUBACK from the cloud")
            .unwrap();
        Collector {
            received,
            client,
            stop,
        }
    }

    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// Waits until `pred` holds on the sequence report, or the deadline passes.
    pub async fn wait_for(&self, within: Duration, pred: impl Fn(&Report) -> bool) -> Report {
        let deadline = Instant::now() + within;
        loop {
            let r = check(&self.received.lock().unwrap());
            if pred(&r) || Instant::now() > deadline {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Messages on one exact topic.
    pub fn on_topic(&self, topic: &str) -> Vec<Vec<u8>> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| t == topic)
            .map(|(_, p)| p.clone())
            .collect()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// What arrived, per source.
#[derive(Debug, Default, Clone)]
pub struct SourceReport {
    /// Distinct sequence numbers seen.
    pub unique: std::collections::BTreeSet<u64>,
    /// Messages that repeated an already seen sequence number.
    pub duplicates: u64,
    /// First sightings that were not above every earlier first sighting.
    pub reordered: u64,
}

/// Per-source report over everything received on `.../dev/<src>/data`.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub sources: BTreeMap<String, SourceReport>,
}

impl Report {
    pub fn unique(&self, src: &str) -> usize {
        self.sources.get(src).map(|s| s.unique.len()).unwrap_or(0)
    }
    pub fn total_unique(&self) -> usize {
        self.sources.values().map(|s| s.unique.len()).sum()
    }
    pub fn duplicates(&self) -> u64 {
        self.sources.values().map(|s| s.duplicates).sum()
    }
    pub fn reordered(&self) -> u64 {
        self.sources.values().map(|s| s.reordered).sum()
    }
    /// Sequence numbers of `range` that never arrived for `src`.
    pub fn missing(&self, src: &str, range: std::ops::Range<u64>) -> Vec<u64> {
        let seen = self.sources.get(src).map(|s| &s.unique);
        range
            .filter(|s| !seen.is_some_and(|u| u.contains(s)))
            .collect()
    }
}

/// Builds the report from `(topic, payload)` pairs whose payload is `src:seq:...`.
pub fn check(received: &[(String, Vec<u8>)]) -> Report {
    let mut r = Report::default();
    let mut max_first: BTreeMap<String, u64> = BTreeMap::new();
    for (topic, p) in received {
        if !topic.ends_with("/data") {
            continue;
        }
        let text = String::from_utf8_lossy(p);
        let mut it = text.splitn(3, ':');
        let (Some(src), Some(seq)) = (it.next(), it.next().and_then(|s| s.parse::<u64>().ok()))
        else {
            continue;
        };
        let s = r.sources.entry(src.to_string()).or_default();
        if !s.unique.insert(seq) {
            s.duplicates += 1;
            continue;
        }
        let m = max_first.entry(src.to_string()).or_insert(0);
        if seq < *m {
            s.reordered += 1;
        }
        *m = (*m).max(seq);
    }
    r
}

// ---------------------------------------------------------------------------------------------
// Process measurements for the benchmarks (Linux /proc)

/// A `kB` field of `/proc/<pid>/status`, e.g. `VmRSS` or `VmHWM`.
pub fn proc_kib(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| {
        l.strip_prefix(key)?
            .strip_prefix(':')?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    })
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`), 100 if unknown.
pub fn clk_tck() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// User + system CPU seconds a process has used so far (all its threads).
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.get(s.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / clk_tck())
}

/// Starts a bare rumqttd 0.20 with one plain MQTT 3.1.1 listener on `127.0.0.1:port`, on a
/// thread of its own (what fieldgate's front end is compared with, in tests and benches).
pub fn spawn_plain_rumqttd(port: u16) {
    use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};
    let mut v4 = std::collections::HashMap::new();
    v4.insert(
        "plain".to_string(),
        ServerSettings {
            name: "plain".into(),
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            tls: None,
            next_connection_delay_ms: 0,
            connections: ConnectionSettings {
                connection_timeout_ms: 10_000,
                max_payload_size: 1 << 20,
                max_inflight_count: 100,
                auth: None,
                external_auth: None,
                dynamic_filters: false,
            },
        },
    );
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 1024,
            max_outgoing_packet_count: 1024,
            max_segment_size: 1 << 20,
            max_segment_count: 4,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(v4),
        ..Default::default()
    };
    std::thread::spawn(move || {
        let _ = rumqttd::Broker::new(config).start();
    });
}
