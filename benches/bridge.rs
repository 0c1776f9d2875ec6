//! fieldgate vs. mosquitto-with-a-bridge, same machine, same cloud, same load.
//!
//! Run: `cargo bench --bench bridge` (add `-- --help` for the knobs).
//!
//! Layout, for each system in turn (never both at once, so they do not share CPU):
//!
//! ```text
//!  4 publishers ──plain MQTT──▶ system under test ──TLS + client cert──▶ Proxy ──▶ cloud
//!  (rumqttc, QoS 1, inflight 100)                                   (cuttable)   mosquitto
//!                                                   cloud subscriber (TLS + client cert) ◀┘
//! ```
//!
//! - Cloud: one fresh Debian mosquitto per system (identical config: TLS listener that
//!   requires client certificates, `max_queued_messages 0`, `max_inflight_messages 0`), so
//!   neither run inherits sessions, retained messages or queues from the other.
//! - System A: the release `fieldgate` binary via the test harness (`gateway_config`).
//! - System B: a local mosquitto (plain listener on 127.0.0.1, `persistence true`, default
//!   `autosave_interval`, `max_queued_messages 0`) with a `connection` bridge over TLS with the
//!   client certificate. `cleansession false` (also mosquitto's default): with `true`,
//!   `local_cleansession` is also true and mosquitto *discards* messages for the bridge while
//!   it is disconnected, so it could not hold an outage at all.
//! - Reference (first, once): the same publishers talk TLS straight to a cloud broker, to show
//!   what the cloud broker + subscriber carry on this machine.
//! - Scenario "paced": a fixed rate below saturation, for latency without queueing.
//! - Scenario "steady": publishers send as fast as the broker acknowledges; payloads carry
//!   `src:seq:send_ns:` so the subscriber measures end-to-end latency on one clock.
//! - Scenario "outage-then-drain": the proxy is cut, N messages are published and held, the
//!   proxy is restored, and the drain rate is N / (restore .. last arrival).
//! - RSS: VmRSS after start (idle), while holding the outage, after the drain, and VmHWM;
//!   CPU (utime + stime) of the system and of the cloud broker per scenario.
//!
//! Every wait is bounded: a stall is reported (with what arrived) and the run moves on.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{
    check, cpu_secs, eventually, free_port, gateway_config, mosquitto_bin, proc_kib, Gateway,
    GatewayPorts, Pki, Proxy,
};
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------------------------
// Parameters

struct Params {
    /// Total messages in "steady" (split over the publishers).
    msgs: u64,
    /// Total messages published during the outage.
    outage_msgs: u64,
    publishers: u64,
    payload: usize,
    /// Local mosquitto `max_inflight_messages` (its bridge's send window). fieldgate's
    /// `cloud.max_inflight` default is 256, so the same by default.
    mosq_inflight: u32,
    /// No progress for this long = stalled.
    stall: Duration,
    systems: Vec<String>,
    /// Rate and length of the paced (below saturation) latency scenario.
    paced_rate: f64,
    paced_secs: f64,
    /// Measure the cloud + subscriber ceiling first.
    ceiling: bool,
    /// QoS of the cloud subscriber's subscription.
    sink_qos: QoS,
    /// Print each system's log tail at the end.
    verbose: bool,
}

fn env_or<T: FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v.replace('_', "").parse().unwrap_or_else(|_| {
            eprintln!("{name}={v:?} is not a number; using the default");
            default
        }),
        Err(_) => default,
    }
}

impl Params {
    fn from_env() -> Params {
        let publishers = env_or("BENCH_PUBLISHERS", 4u64).max(1);
        Params {
            msgs: env_or("BENCH_MSGS", 50_000u64).max(publishers),
            outage_msgs: env_or("BENCH_OUTAGE_MSGS", 100_000u64).max(publishers),
            publishers,
            payload: env_or("BENCH_PAYLOAD", 100usize).max(48),
            mosq_inflight: env_or("BENCH_MOSQ_INFLIGHT", 256u32),
            stall: Duration::from_secs(env_or("BENCH_STALL_SECS", 15u64).max(2)),
            systems: std::env::var("BENCH_SYSTEMS")
                .unwrap_or_else(|_| "fieldgate,mosquitto".into())
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            paced_rate: env_or("BENCH_PACED_RATE", 5000.0f64).max(0.0),
            paced_secs: env_or("BENCH_PACED_SECS", 5.0f64).max(0.0),
            ceiling: env_or("BENCH_CEILING", 1u8) != 0,
            verbose: env_or("BENCH_VERBOSE", 0u8) != 0,
            sink_qos: if env_or("BENCH_SINK_QOS", 1u8) == 0 {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            },
        }
    }
}

const HELP: &str = "\
fieldgate vs mosquitto bridge benchmark. Environment knobs (defaults in brackets):
  BENCH_MSGS          messages in the steady scenario, all publishers together [50000]
  BENCH_OUTAGE_MSGS   messages published while the cloud link is cut [100000]
  BENCH_PUBLISHERS    concurrent publishers (QoS 1, inflight 100) [4]
  BENCH_PAYLOAD       payload bytes, >= 48 [100]
  BENCH_MOSQ_INFLIGHT local mosquitto max_inflight_messages (bridge window) [256]
  BENCH_STALL_SECS    no progress for this long counts as a stall [15]
  BENCH_SYSTEMS       comma list: fieldgate,mosquitto [both]
  BENCH_PACED_RATE    msg/s of the paced latency scenario, 0 to skip [5000]
  BENCH_PACED_SECS    length of the paced scenario [5]
  BENCH_CEILING       1: first measure the cloud + subscriber alone, 0: skip [1]
  BENCH_SINK_QOS      QoS of the cloud subscriber, 0 or 1 [1]
  BENCH_VERBOSE       1: print each system's log tail (unix time of the restore shown) [0]";

// ---------------------------------------------------------------------------------------------
// Clock: one monotonic base for send stamps and receive stamps (same process, same clock).

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    base().elapsed().as_nanos() as u64
}

/// `src:seq:send_ns:` padded with dots to `size` bytes. Compatible with the harness `check`.
fn stamped_payload(src: &str, seq: u64, size: usize) -> Vec<u8> {
    let mut p = format!("{src}:{seq}:{}:", now_ns()).into_bytes();
    p.resize(size.max(p.len()), b'.');
    p
}

/// `(src, seq, send_ns)` from a stamped payload.
fn parse_payload(p: &[u8]) -> Option<(&str, u64, u64)> {
    let head = &p[..p.len().min(64)];
    let mut it = head.splitn(4, |b| *b == b':');
    let src = std::str::from_utf8(it.next()?).ok()?;
    let seq = std::str::from_utf8(it.next()?).ok()?.parse().ok()?;
    let ts = std::str::from_utf8(it.next()?).ok()?.parse().ok()?;
    it.next()?;
    Some((src, seq, ts))
}

// ---------------------------------------------------------------------------------------------
// /proc

fn mib(kib: Option<u64>) -> Option<f64> {
    kib.map(|k| k as f64 / 1024.0)
}

/// CPU used by the system under test and by the cloud broker over one window.
#[derive(Debug, Default, Clone, Copy)]
struct CpuWindow {
    sut: Option<f64>,
    cloud: Option<f64>,
    wall: f64,
}

struct CpuMark {
    sut: Option<f64>,
    cloud: Option<f64>,
    at: Instant,
}

impl CpuMark {
    fn now(sut: u32, cloud: u32) -> CpuMark {
        CpuMark {
            sut: cpu_secs(sut),
            cloud: cpu_secs(cloud),
            at: Instant::now(),
        }
    }
    fn window(&self, sut: u32, cloud: u32) -> CpuWindow {
        CpuWindow {
            sut: cpu_secs(sut).zip(self.sut).map(|(b, a)| b - a),
            cloud: cpu_secs(cloud).zip(self.cloud).map(|(b, a)| b - a),
            wall: self.at.elapsed().as_secs_f64(),
        }
    }
}

impl CpuWindow {
    /// CPU milliseconds of the system under test per 1000 messages.
    fn sut_ms_per_k(&self, msgs: u64) -> Option<f64> {
        (msgs > 0).then_some(self.sut? * 1e6 / msgs as f64)
    }
    /// Cloud broker CPU as a percentage of one core.
    fn cloud_pct(&self) -> Option<f64> {
        (self.wall > 0.0).then_some(self.cloud? * 100.0 / self.wall)
    }
}

// ---------------------------------------------------------------------------------------------
// mosquitto processes (cloud and local bridge broker)

struct Mosq {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: TempDir,
}

impl Mosq {
    /// Writes `conf` (the listener line is added here) and starts mosquitto on a fresh port.
    fn spawn(what: &str, dir: TempDir, conf: &str) -> Result<Mosq, String> {
        let port = free_port();
        let path = dir.path().join("mosquitto.conf");
        // Started as root, mosquitto switches to user `mosquitto`, which cannot read our
        // 0700 temp dirs (bridge certificates, persistence). As non-root this line is ignored.
        let text = format!("user root\nlistener {port} 127.0.0.1\n{conf}");
        std::fs::write(&path, text).map_err(|e| e.to_string())?;
        let log = dir.path().join("mosquitto.log");
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).map_err(|e| e.to_string())?)
            .spawn()
            .map_err(|e| format!("{what}: cannot start {}: {e}", mosquitto_bin()))?;
        let mut m = Mosq {
            child,
            port,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(st)) = m.child.try_wait() {
                return Err(format!("{what} exited ({st}):\n{}", m.log_tail()));
            }
            if Instant::now() > deadline {
                return Err(format!("{what} not listening on {port}:\n{}", m.log_tail()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(m)
    }

    /// The cloud: TLS, client certificate required, no queue or inflight limits.
    fn cloud(pki: &Pki) -> Result<Mosq, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        Self::spawn(
            "cloud mosquitto",
            dir,
            &format!(
                "cafile {}\ncertfile {}\nkeyfile {}\n\
                 require_certificate true\nallow_anonymous true\n\
                 persistence false\nmax_queued_messages 0\nmax_inflight_messages 0\n\
                 log_dest stderr\nlog_type error\nlog_type warning\n",
                pki.ca.display(),
                pki.server.cert.display(),
                pki.server.key.display()
            ),
        )
    }

    /// System B: local broker with persistence and a TLS bridge to `cloud_port`.
    fn bridge(pki: &Pki, cloud_port: u16, inflight: u32) -> Result<Mosq, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let persist = dir.path().join("persistence");
        std::fs::create_dir(&persist).map_err(|e| e.to_string())?;
        let conf = format!(
            "allow_anonymous true\n\
             persistence true\n\
             persistence_location {persist}/\n\
             max_queued_messages 0\n\
             max_inflight_messages {inflight}\n\
             log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\nlog_timestamp_format %H:%M:%S\n\
             \n\
             connection cloud\n\
             address 127.0.0.1:{cloud_port}\n\
             remote_clientid mosq-bridge\n\
             bridge_protocol_version mqttv311\n\
             bridge_cafile {ca}\n\
             bridge_certfile {cert}\n\
             bridge_keyfile {key}\n\
             bridge_insecure false\n\
             cleansession false\n\
             keepalive_interval 5\n\
             restart_timeout 1\n\
             topic # out 1 \"\" fieldgate/mosq/\n",
            persist = persist.display(),
            ca = pki.ca.display(),
            cert = pki.client.cert.display(),
            key = pki.client.key.display(),
        );
        Self::spawn("local mosquitto", dir, &conf)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Mosq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Cloud-side subscriber with receive timestamps, on its own thread and runtime so that the
// publishers cannot starve it.

struct Arrival {
    t_ns: u64,
    topic: String,
    payload: Bytes,
}

struct Sink {
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    errors: Arc<AtomicU64>,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sink {
    fn start(pki: &Pki, cloud_port: u16, filter: &str, qos: QoS) -> Result<Sink, String> {
        let tls = pki.client_tls();
        let arrivals = Arc::new(Mutex::new(Vec::with_capacity(1 << 18)));
        let errors = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let (a2, e2, s2, filter) = (
            arrivals.clone(),
            errors.clone(),
            stop.clone(),
            filter.to_string(),
        );
        let thread = std::thread::Builder::new()
            .name("cloud-sink".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("sink runtime");
                rt.block_on(async move {
                    let mut o = MqttOptions::new(
                        format!("bench-sink-{}", free_port()),
                        "127.0.0.1",
                        cloud_port,
                    );
                    o.set_keep_alive(Duration::from_secs(30))
                        .set_transport(Transport::tls_with_config(tls))
                        .set_max_packet_size(1 << 20, 1 << 20)
                        .set_inflight(1000);
                    let (client, mut el) = AsyncClient::new(o, 100);
                    let _ = client.subscribe(filter.clone(), qos).await;
                    loop {
                        let ev = tokio::select! {
                            _ = s2.cancelled() => return,
                            ev = el.poll() => ev,
                        };
                        match ev {
                            Ok(Event::Incoming(Packet::Publish(p))) => {
                                let t_ns = now_ns();
                                a2.lock().unwrap().push(Arrival {
                                    t_ns,
                                    topic: p.topic,
                                    payload: p.payload,
                                });
                            }
                            Ok(Event::Incoming(Packet::SubAck(_))) => {
                                let _ = ready_tx.send(());
                            }
                            Ok(_) => {}
                            Err(_) => {
                                // rumqttc reconnects on the next poll; with a clean session
                                // the subscription must be made again.
                                e2.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                let _ = client.try_subscribe(filter.clone(), qos);
                            }
                        }
                    }
                });
            })
            .map_err(|e| e.to_string())?;
        let sink = Sink {
            arrivals,
            errors,
            stop,
            thread: Some(thread),
        };
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| "cloud subscriber: no SUBACK within 10s".to_string())?;
        Ok(sink)
    }

    fn len(&self) -> usize {
        self.arrivals.lock().unwrap().len()
    }

    /// Arrivals from index `from` on whose topic contains `needle`.
    fn count_since(&self, from: usize, needle: &str) -> usize {
        let a = self.arrivals.lock().unwrap();
        a.get(from..)
            .unwrap_or_default()
            .iter()
            .filter(|x| x.topic.contains(needle))
            .count()
    }

    /// Arrivals from `*cursor` on whose topic contains `needle`; moves the cursor to the end.
    fn count_new(&self, cursor: &mut usize, needle: &str) -> usize {
        let a = self.arrivals.lock().unwrap();
        let n = a
            .get(*cursor..)
            .unwrap_or_default()
            .iter()
            .filter(|x| x.topic.contains(needle))
            .count();
        *cursor = a.len();
        n
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Publishers

#[derive(Debug, Default, Clone)]
struct PubResult {
    src: String,
    acked: u64,
    /// When the publishers were released (after all connected).
    start_ns: u64,
    /// When the last PUBACK came back.
    last_ack_ns: u64,
    error: Option<String>,
}

/// Where publishers connect: the system under test (plain) or the cloud itself (TLS).
#[derive(Clone)]
struct Target {
    port: u16,
    tls: Option<TlsConfiguration>,
    /// Put in front of `dev/<src>/data`.
    prefix: String,
}

impl Target {
    fn plain(port: u16) -> Target {
        Target {
            port,
            tls: None,
            prefix: String::new(),
        }
    }
}

/// Connects one publisher and waits for CONNACK.
async fn connect_publisher(t: &Target, src: &str) -> Result<(AsyncClient, EventLoop), String> {
    let mut o = MqttOptions::new(format!("bench-{src}-{}", free_port()), "127.0.0.1", t.port);
    o.set_keep_alive(Duration::from_secs(30))
        .set_inflight(100)
        .set_max_packet_size(1 << 20, 1 << 20);
    if let Some(tls) = &t.tls {
        o.set_transport(Transport::tls_with_config(tls.clone()));
    }
    // A small request channel: the send stamp is taken at most ~10 + inflight messages before
    // the PUBLISH reaches the wire.
    let (client, mut el) = AsyncClient::new(o, 10);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => return Ok((client, el)),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("publisher {src}: connect: {e}")),
            Err(_) => return Err(format!("publisher {src}: no CONNACK within 10s")),
        }
    }
}

/// What one publisher does.
struct Job {
    src: String,
    topic: String,
    count: u64,
    size: usize,
    /// Messages per second for this publisher; `None`: as fast as the broker acknowledges.
    rate: Option<f64>,
    stall: Duration,
}

/// Publishes `job.count` stamped messages, then disconnects. Never waits longer than
/// `job.stall` for progress.
async fn run_publisher(
    client: AsyncClient,
    mut el: EventLoop,
    job: Job,
    go: Arc<tokio::sync::Barrier>,
) -> PubResult {
    go.wait().await;
    let mut r = PubResult {
        src: job.src.clone(),
        start_ns: now_ns(),
        ..Default::default()
    };
    let (c2, src, topic, count, size, rate) = (
        client.clone(),
        job.src.clone(),
        job.topic.clone(),
        job.count,
        job.size,
        job.rate,
    );
    let pusher = tokio::spawn(async move {
        let t0 = tokio::time::Instant::now();
        for seq in 0..count {
            if let Some(rate) = rate {
                tokio::time::sleep_until(t0 + Duration::from_secs_f64(seq as f64 / rate)).await;
            }
            let p = stamped_payload(&src, seq, size);
            if c2
                .publish(topic.clone(), QoS::AtLeastOnce, false, p)
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let hard = Instant::now() + Duration::from_secs(180);
    while r.acked < count {
        if Instant::now() > hard {
            r.error = Some(format!("gave up after 180s at {}/{count} acked", r.acked));
            break;
        }
        match tokio::time::timeout(job.stall, el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                r.acked += 1;
                r.last_ack_ns = now_ns();
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                r.error = Some(format!("connection error at {}/{count}: {e}", r.acked));
                break;
            }
            Err(_) => {
                r.error = Some(format!(
                    "no PUBACK for {}s at {}/{count}",
                    job.stall.as_secs(),
                    r.acked
                ));
                break;
            }
        }
    }
    pusher.abort();
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(500), el.poll()).await;
    r
}

/// Runs the publishers (sources `<tag>0..`) over `total` messages, released together once
/// all are connected. `rate`: total messages per second over all publishers, or flat out.
async fn publish_all(
    t: &Target,
    tag: &str,
    total: u64,
    rate: Option<f64>,
    p: &Params,
) -> Vec<PubResult> {
    let n = p.publishers;
    let go = Arc::new(tokio::sync::Barrier::new(n as usize));
    let mut tasks = Vec::new();
    for i in 0..n {
        let src = format!("{tag}{i}");
        let job = Job {
            topic: format!("{}dev/{src}/data", t.prefix),
            src,
            count: total / n + u64::from(i < total % n),
            size: p.payload,
            rate: rate.map(|r| r / n as f64),
            stall: p.stall,
        };
        let (go, t) = (go.clone(), t.clone());
        tasks.push(tokio::spawn(async move {
            match connect_publisher(&t, &job.src).await {
                Ok((c, el)) => run_publisher(c, el, job, go).await,
                Err(e) => {
                    // Still pass the barrier so the others do not wait forever.
                    go.wait().await;
                    PubResult {
                        src: job.src,
                        error: Some(e),
                        ..Default::default()
                    }
                }
            }
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap_or_else(|e| PubResult {
            error: Some(format!("publisher task: {e}")),
            ..Default::default()
        }));
    }
    out
}

/// Local acceptance rate: PUBACKs per second from release to the last PUBACK.
fn ingest_rate(pubs: &[PubResult]) -> Option<f64> {
    let acked: u64 = pubs.iter().map(|p| p.acked).sum();
    let start = pubs
        .iter()
        .filter(|p| p.acked > 0)
        .map(|p| p.start_ns)
        .min()?;
    let end = pubs.iter().map(|p| p.last_ack_ns).max()?;
    (end > start).then(|| acked as f64 / ((end - start) as f64 / 1e9))
}

// ---------------------------------------------------------------------------------------------
// Delivery analysis

#[derive(Debug, Default, Clone)]
struct Delivery {
    /// Messages PUBACKed by the system under test.
    acked: u64,
    /// Distinct messages of this scenario that reached the cloud subscriber.
    unique: u64,
    duplicates: u64,
    reordered: u64,
    /// Acknowledged by the system but never seen at the cloud.
    lost: u64,
    first_send_ns: Option<u64>,
    first_rx_ns: Option<u64>,
    last_rx_ns: Option<u64>,
    /// End-to-end latencies of first arrivals, sorted.
    lat_ns: Vec<u64>,
}

impl Delivery {
    fn pct_ms(&self, q: f64) -> Option<f64> {
        if self.lat_ns.is_empty() {
            return None;
        }
        let i = ((self.lat_ns.len() as f64 * q).ceil() as usize).clamp(1, self.lat_ns.len()) - 1;
        Some(self.lat_ns[i] as f64 / 1e6)
    }
}

fn analyze(sink: &Sink, from: usize, tag: &str, pubs: &[PubResult]) -> Delivery {
    let arrivals = sink.arrivals.lock().unwrap();
    let mut d = Delivery {
        acked: pubs.iter().map(|p| p.acked).sum(),
        ..Default::default()
    };
    let mut seen: HashSet<(String, u64)> = HashSet::new();
    let mut pairs: Vec<(String, Vec<u8>)> = Vec::new();
    for a in arrivals.get(from..).unwrap_or_default() {
        if !a.topic.ends_with("/data") {
            continue;
        }
        let Some((src, seq, sent)) = parse_payload(&a.payload) else {
            continue;
        };
        if !src.starts_with(tag) {
            continue;
        }
        pairs.push((a.topic.clone(), a.payload.to_vec()));
        if !seen.insert((src.to_string(), seq)) {
            continue;
        }
        d.first_send_ns = Some(d.first_send_ns.map_or(sent, |f| f.min(sent)));
        d.first_rx_ns = Some(d.first_rx_ns.map_or(a.t_ns, |f| f.min(a.t_ns)));
        d.last_rx_ns = Some(d.last_rx_ns.map_or(a.t_ns, |l| l.max(a.t_ns)));
        d.lat_ns.push(a.t_ns.saturating_sub(sent));
    }
    drop(arrivals);
    d.lat_ns.sort_unstable();
    // The harness' report: duplicates, per-source order, and what is missing.
    let report = check(&pairs);
    d.unique = report.total_unique() as u64;
    d.duplicates = report.duplicates();
    d.reordered = report.reordered();
    // PUBACKs come back in send order, so `acked` = sequence numbers 0..acked.
    d.lost = pubs
        .iter()
        .map(|p| report.missing(&p.src, 0..p.acked).len() as u64)
        .sum();
    d
}

/// Waits until `want` distinct messages of `tag` arrived, nothing moved for `stall`, or
/// `cap` passed. Prints a line if it gave up.
async fn await_arrivals(
    sink: &Sink,
    from: usize,
    tag: &str,
    want: u64,
    stall: Duration,
    cap: Duration,
    what: &str,
) {
    let needle = format!("/dev/{tag}");
    let start = Instant::now();
    let mut last = (0usize, Instant::now());
    let (mut cursor, mut n) = (from, 0usize);
    loop {
        n += sink.count_new(&mut cursor, &needle);
        if n as u64 >= want {
            // Raw count includes duplicates: confirm with the distinct count.
            let d = analyze(sink, from, tag, &[]);
            if d.unique >= want {
                return;
            }
        }
        if n != last.0 {
            last = (n, Instant::now());
        }
        if last.1.elapsed() > stall || start.elapsed() > cap {
            let d = analyze(sink, from, tag, &[]);
            println!(
                "  ! {what}: stalled with {}/{want} distinct messages at the cloud ({} raw) after {:.1}s",
                d.unique,
                n,
                start.elapsed().as_secs_f64()
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Systems under test

enum Sut {
    Fieldgate { gw: Gateway, _data: TempDir },
    Mosquitto { mq: Mosq },
}

impl Sut {
    fn mqtt_port(&self) -> u16 {
        match self {
            Sut::Fieldgate { gw, .. } => gw.mqtt,
            Sut::Mosquitto { mq } => mq.port,
        }
    }

    fn pid(&self) -> u32 {
        match self {
            Sut::Fieldgate { gw, .. } => gw.pid(),
            Sut::Mosquitto { mq } => mq.pid(),
        }
    }

    fn metric(&self, name: &str) -> f64 {
        match self {
            Sut::Fieldgate { gw, .. } => gw.metric(name),
            Sut::Mosquitto { .. } => f64::NAN,
        }
    }

    fn log_tail(&self) -> String {
        match self {
            Sut::Fieldgate { gw, .. } => {
                // Without colours and without the reconnect chatter of the outage.
                let s = strip_ansi(&gw.log_text());
                let lines: Vec<&str> = s
                    .lines()
                    .filter(|l| !l.contains("cloud link down"))
                    .collect();
                lines[lines.len().saturating_sub(25)..].join("\n")
            }
            Sut::Mosquitto { mq } => mq.log_tail(),
        }
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ ... final byte in @..~
            for d in it.by_ref() {
                if ('@'..='~').contains(&d) && d != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[derive(Debug, Default, Clone)]
struct SysResult {
    ran: bool,
    paced: Delivery,
    steady: Delivery,
    steady_ingest: Option<f64>,
    steady_cpu: CpuWindow,
    outage: Delivery,
    outage_ingest: Option<f64>,
    drain_cpu: CpuWindow,
    /// Records the system reported holding before the restore (fieldgate: queue gauge).
    held: Option<f64>,
    /// fieldgate: every accepted record covered by an fsync before the restore.
    all_on_disk: Option<bool>,
    /// Outage messages that reached the cloud while the link was cut (must be 0).
    leaked: u64,
    restore_ns: Option<u64>,
    idle_rss_kib: Option<u64>,
    holding_rss_kib: Option<u64>,
    /// fieldgate: rumqttd "Read cursor start jumped" warnings: the uplink tap fell more than
    /// its filter log behind and the broker skipped messages it had already PUBACKed.
    tap_jumps: Option<u64>,
    /// fieldgate: `fieldgate_dropped_total{reason="broker_overrun"}` (if the build has it).
    overrun_dropped: Option<f64>,
    /// 2 s after the drain finished.
    after_rss_kib: Option<u64>,
    peak_rss_kib: Option<u64>,
    notes: Vec<String>,
}

impl SysResult {
    fn steady_throughput(&self) -> Option<f64> {
        self.steady.throughput()
    }
    fn drain_rate(&self) -> Option<f64> {
        let (r, l) = (self.restore_ns?, self.outage.last_rx_ns?);
        (l > r && self.outage.unique > 0)
            .then(|| self.outage.unique as f64 / ((l - r) as f64 / 1e9))
    }
    fn reconnect_ms(&self) -> Option<f64> {
        let (r, f) = (self.restore_ns?, self.outage.first_rx_ns?);
        Some(f.saturating_sub(r) as f64 / 1e6)
    }
    fn drain_rate_after_first(&self) -> Option<f64> {
        let (f, l) = (self.outage.first_rx_ns?, self.outage.last_rx_ns?);
        (l > f).then(|| self.outage.unique as f64 / ((l - f) as f64 / 1e9))
    }
}

impl Delivery {
    /// Distinct arrivals / (first send stamp .. last first arrival).
    fn throughput(&self) -> Option<f64> {
        let (s, l) = (self.first_send_ns?, self.last_rx_ns?);
        (l > s && self.unique > 0).then(|| self.unique as f64 / ((l - s) as f64 / 1e9))
    }
    fn summary(&self) -> String {
        format!(
            "{} acked, {} distinct at cloud, {} lost, {} dup, {} reordered",
            self.acked, self.unique, self.lost, self.duplicates, self.reordered
        )
    }
}

async fn start_sut(kind: &str, pki: &Pki, proxy_port: u16, p: &Params) -> Result<Sut, String> {
    match kind {
        "fieldgate" => {
            let data = tempfile::tempdir().map_err(|e| e.to_string())?;
            let ports = GatewayPorts::new();
            let conf = gateway_config(pki, &ports, data.path(), proxy_port, "", "");
            let gw = Gateway::start(&conf, &ports).await;
            let ok = eventually(Duration::from_secs(30), || {
                gw.metric("fieldgate_cloud_connected") == 1.0
            })
            .await;
            if !ok {
                return Err(format!(
                    "fieldgate did not connect to the cloud:\n{}",
                    gw.log_text()
                ));
            }
            Ok(Sut::Fieldgate { gw, _data: data })
        }
        "mosquitto" => Ok(Sut::Mosquitto {
            mq: Mosq::bridge(pki, proxy_port, p.mosq_inflight)?,
        }),
        other => Err(format!("unknown system {other:?}")),
    }
}

/// Publishes probes until one shows up at the cloud: the whole path is up.
async fn probe(port: u16, sink: &Sink, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let from = sink.len();
    let mut o = MqttOptions::new(format!("bench-probe-{}", free_port()), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = AsyncClient::new(o, 10);
    let mut next = Instant::now();
    while Instant::now() < deadline {
        if Instant::now() >= next {
            let _ = client.try_publish("probe/ping", QoS::AtLeastOnce, false, "ping");
            next = Instant::now() + Duration::from_secs(1);
        }
        let _ = tokio::time::timeout(Duration::from_millis(50), el.poll()).await;
        if sink.count_since(from, "/probe/ping") > 0 {
            let _ = client.try_disconnect();
            let _ = tokio::time::timeout(Duration::from_millis(300), el.poll()).await;
            return true;
        }
    }
    false
}

/// Publishes `total` messages (flat out or at `rate`) and waits for them at the cloud.
async fn scenario(
    t: &Target,
    sink: &Sink,
    tag: &str,
    total: u64,
    rate: Option<f64>,
    p: &Params,
    notes: &mut Vec<String>,
) -> (Delivery, Vec<PubResult>) {
    let from = sink.len();
    let pubs = publish_all(t, tag, total, rate, p).await;
    for e in pubs.iter().filter_map(|x| x.error.as_ref()) {
        println!("  ! {tag}: publisher: {e}");
        notes.push(format!("{tag}: publisher: {e}"));
    }
    let acked: u64 = pubs.iter().map(|x| x.acked).sum();
    await_arrivals(
        sink,
        from,
        tag,
        acked,
        p.stall,
        Duration::from_secs(120),
        tag,
    )
    .await;
    (analyze(sink, from, tag, &pubs), pubs)
}

/// Reference: what the cloud broker and the subscriber can carry on this machine, with the
/// same publishers talking TLS straight to the cloud (no gateway, no proxy).
async fn run_ceiling(pki: &Pki, p: &Params) -> Result<(Delivery, CpuWindow), String> {
    println!("\n=== reference: publishers -> cloud directly (TLS), no bridge ===");
    let cloud = Mosq::cloud(pki)?;
    let sink = Sink::start(pki, cloud.port, "fieldgate/#", p.sink_qos)?;
    let t = Target {
        port: cloud.port,
        tls: Some(pki.client_tls()),
        prefix: "fieldgate/ceiling/".into(),
    };
    let mark = CpuMark::now(0, cloud.pid());
    let mut notes = Vec::new();
    let (d, _) = scenario(&t, &sink, "c", p.msgs, None, p, &mut notes).await;
    let cpu = mark.window(0, cloud.pid());
    println!(
        "  reference: {}; {:.0} msg/s; cloud broker CPU {:.0}% of a core",
        d.summary(),
        d.throughput().unwrap_or(f64::NAN),
        cpu.cloud_pct().unwrap_or(f64::NAN)
    );
    Ok((d, cpu))
}

async fn run_system(kind: &str, pki: &Pki, p: &Params) -> Result<SysResult, String> {
    let mut r = SysResult {
        ran: true,
        ..Default::default()
    };
    println!("\n=== {kind} ===");
    let cloud = Mosq::cloud(pki)?;
    let proxy = Proxy::start(cloud.port).await;
    let sink = Sink::start(pki, cloud.port, "fieldgate/#", p.sink_qos)?;
    let sut = start_sut(kind, pki, proxy.port, p).await?;
    let (pid, cpid) = (sut.pid(), cloud.pid());
    let local = Target::plain(sut.mqtt_port());

    // Idle: started (fieldgate: connected to the cloud), no traffic yet.
    tokio::time::sleep(Duration::from_secs(2)).await;
    r.idle_rss_kib = proc_kib(pid, "VmRSS");
    println!(
        "  idle RSS {:.1} MiB",
        mib(r.idle_rss_kib).unwrap_or(f64::NAN)
    );
    if !probe(local.port, &sink, Duration::from_secs(20)).await {
        return Err(format!(
            "{kind}: a probe message never reached the cloud\n{}",
            sut.log_tail()
        ));
    }

    // --- paced: latency below saturation ---
    if p.paced_rate > 0.0 && p.paced_secs > 0.0 {
        let n = (p.paced_rate * p.paced_secs) as u64;
        let (d, _) = scenario(&local, &sink, "p", n, Some(p.paced_rate), p, &mut r.notes).await;
        println!(
            "  paced {:.0} msg/s: {}; p50 {:.1} ms, p99 {:.1} ms",
            p.paced_rate,
            d.summary(),
            d.pct_ms(0.5).unwrap_or(f64::NAN),
            d.pct_ms(0.99).unwrap_or(f64::NAN)
        );
        r.paced = d;
    }

    // --- steady: flat out ---
    let mark = CpuMark::now(pid, cpid);
    let (d, pubs) = scenario(&local, &sink, "s", p.msgs, None, p, &mut r.notes).await;
    r.steady_cpu = mark.window(pid, cpid);
    r.steady_ingest = ingest_rate(&pubs);
    r.steady = d;
    println!(
        "  steady: {}; {:.0} msg/s end to end, local PUBACKs at {:.0} msg/s",
        r.steady.summary(),
        r.steady_throughput().unwrap_or(f64::NAN),
        r.steady_ingest.unwrap_or(f64::NAN)
    );
    if kind == "fieldgate" {
        let ok = eventually(Duration::from_secs(30), || {
            sut.metric("fieldgate_queue_records") == 0.0
        })
        .await;
        if !ok {
            let msg = format!(
                "queue did not empty after steady: fieldgate_queue_records = {}",
                sut.metric("fieldgate_queue_records")
            );
            println!("  ! {msg}");
            r.notes.push(msg);
        }
    }

    // --- outage, then drain ---
    proxy.cut();
    if kind == "fieldgate" {
        let down = eventually(Duration::from_secs(15), || {
            sut.metric("fieldgate_cloud_connected") == 0.0
        })
        .await;
        if !down {
            r.notes
                .push("fieldgate_cloud_connected stayed 1 after the cut".into());
        }
    } else {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let from = sink.len();
    let pubs = publish_all(&local, "o", p.outage_msgs, None, p).await;
    let acked: u64 = pubs.iter().map(|x| x.acked).sum();
    r.outage_ingest = ingest_rate(&pubs);
    println!(
        "  outage: {acked} acked by {kind} at {:.0} msg/s with the cloud cut",
        r.outage_ingest.unwrap_or(f64::NAN)
    );
    for e in pubs.iter().filter_map(|x| x.error.as_ref()) {
        println!("  ! outage publisher: {e}");
        r.notes.push(format!("outage publisher: {e}"));
    }
    if kind == "fieldgate" {
        let want = acked as f64;
        let t = Instant::now();
        // Until everything is queued, or queued + counted overruns account for everything,
        // or the queue stops growing.
        let overrun = || {
            let o = sut.metric("fieldgate_dropped_total{reason=\"broker_overrun\"}");
            if o.is_finite() {
                o
            } else {
                0.0
            }
        };
        let mut last = (f64::NAN, Instant::now());
        let held = loop {
            let q = sut.metric("fieldgate_queue_records");
            if q == want {
                break true;
            }
            if q + overrun() >= want || t.elapsed() > Duration::from_secs(60) {
                break false;
            }
            if q != last.0 {
                last = (q, Instant::now());
            } else if last.1.elapsed() > p.stall {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        r.held = Some(sut.metric("fieldgate_queue_records"));
        // Every accepted record is covered by a completed fsync (fresh store, seqs from 1).
        let on_disk = eventually(Duration::from_secs(10), || {
            let inn = sut.metric("fieldgate_messages_in_total");
            sut.metric("fieldgate_store_committed_seq") >= inn && inn > 0.0
        })
        .await;
        r.all_on_disk = Some(held && on_disk);
        println!(
            "  outage: fieldgate_queue_records = {} (want {acked}) after {:.2}s; committed_seq {} / messages_in {}",
            r.held.unwrap_or(f64::NAN),
            t.elapsed().as_secs_f64(),
            sut.metric("fieldgate_store_committed_seq"),
            sut.metric("fieldgate_messages_in_total"),
        );
    } else {
        // mosquitto has no queue gauge for the bridge; all PUBACKs are in, let it settle.
        tokio::time::sleep(Duration::from_secs(2)).await;
        r.notes.push(
            "mosquitto holds the outage in memory only: with the default autosave_interval \
             (1800s) none of it was on disk before the restore"
                .into(),
        );
    }
    r.holding_rss_kib = proc_kib(pid, "VmRSS");
    r.leaked = sink.count_since(from, "/dev/o") as u64;
    if r.leaked > 0 {
        r.notes.push(format!(
            "{} outage messages reached the cloud while the link was cut",
            r.leaked
        ));
    }
    let mark = CpuMark::now(pid, cpid);
    let restore = now_ns();
    let restore_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    proxy.restore();
    r.restore_ns = Some(restore);
    // Records the gateway itself reports as lost will not come: do not wait for them.
    let counted_lost = sut.metric("fieldgate_dropped_total{reason=\"broker_overrun\"}");
    let drain_want = if counted_lost.is_finite() {
        acked.saturating_sub(counted_lost as u64)
    } else {
        acked
    };
    await_arrivals(
        &sink,
        from,
        "o",
        drain_want,
        p.stall,
        Duration::from_secs(150),
        "drain",
    )
    .await;
    r.drain_cpu = mark.window(pid, cpid);
    r.outage = analyze(&sink, from, "o", &pubs);
    println!(
        "  drain: {}; {:.0} msg/s from restore (first after {:.0} ms)",
        r.outage.summary(),
        r.drain_rate().unwrap_or(f64::NAN),
        r.reconnect_ms().unwrap_or(f64::NAN),
    );

    tokio::time::sleep(Duration::from_secs(2)).await;
    r.after_rss_kib = proc_kib(pid, "VmRSS");
    r.peak_rss_kib = proc_kib(pid, "VmHWM");
    println!(
        "  RSS: idle {:.1}, holding the outage {:.1}, 2s after the drain {:.1}, peak {:.1} MiB",
        mib(r.idle_rss_kib).unwrap_or(f64::NAN),
        mib(r.holding_rss_kib).unwrap_or(f64::NAN),
        mib(r.after_rss_kib).unwrap_or(f64::NAN),
        mib(r.peak_rss_kib).unwrap_or(f64::NAN)
    );
    if let Sut::Fieldgate { gw, .. } = &sut {
        let log = gw.log_text();
        let jumps = log
            .lines()
            .filter(|l| l.contains("Read cursor start jumped"))
            .count() as u64;
        r.tap_jumps = Some(jumps);
        let counted = gw.metric("fieldgate_dropped_total{reason=\"broker_overrun\"}");
        r.overrun_dropped = counted.is_finite().then_some(counted);
        if jumps > 0 || counted > 0.0 {
            let msg = format!(
                "the uplink tap fell behind the broker's `#` log: rumqttd logged {jumps} \
                 'Read cursor start jumped' warning(s) and skipped messages it had already \
                 PUBACKed to devices (never queued); \
                 fieldgate_dropped_total{{reason=\"broker_overrun\"}} = {counted}"
            );
            println!("  ! {msg}");
            r.notes.push(msg);
        }
        let text = gw.get("/metrics").unwrap_or_default();
        let m: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("fieldgate_") && !l.ends_with(" 0"))
            .collect();
        r.notes
            .push(format!("non-zero metrics at the end: {}", m.join("  ")));
    }
    if proc_kib(pid, "VmRSS").is_none() {
        let msg = format!("the {kind} process (pid {pid}) is gone: it exited during the run");
        println!("  ! {msg}");
        r.notes.push(msg);
        r.notes.push(format!("log tail:\n{}", sut.log_tail()));
    }
    let errs = sink.errors.load(Ordering::Relaxed);
    if errs > 0 {
        r.notes
            .push(format!("cloud subscriber saw {errs} connection error(s)"));
    }
    if p.verbose {
        println!(
            "  log tail ({kind}; proxy restored at unix {restore_unix:.3}):\n{}",
            sut.log_tail()
        );
    }
    if (r.steady.lost > 0 || r.outage.lost > 0 || r.paced.lost > 0)
        && proc_kib(pid, "VmRSS").is_some()
    {
        r.notes.push(format!("log tail:\n{}", sut.log_tail()));
    }
    drop(sut);
    drop(sink);
    drop(proxy);
    drop(cloud);
    Ok(r)
}

// ---------------------------------------------------------------------------------------------
// Report

fn f(v: Option<f64>, dec: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.dec$}"),
        _ => "-".into(),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if a.is_finite() && b.is_finite() && b != 0.0 => {
            format!("{:.2}", a / b)
        }
        _ => "-".into(),
    }
}

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "n/a",
    }
}

struct Row {
    name: String,
    fg: Option<f64>,
    mq: Option<f64>,
    dec: usize,
    target: String,
    met: &'static str,
}

fn row(name: impl Into<String>, fg: Option<f64>, mq: Option<f64>, dec: usize) -> Row {
    Row {
        name: name.into(),
        fg,
        mq,
        dec,
        target: String::new(),
        met: "",
    }
}

impl Row {
    fn target(mut self, target: &str, met: Option<bool>) -> Row {
        self.target = target.into();
        self.met = verdict(met);
        self
    }
}

fn print_table(fg: &SysResult, mq: &SysResult, ceiling: Option<f64>, p: &Params) {
    let fg_tp = fg.steady_throughput();
    let mq_tp = mq.steady_throughput();
    let fg_p99 = fg.steady.pct_ms(0.99);
    let tp_ok = match (fg_tp, mq_tp, fg_p99) {
        (Some(a), Some(b), Some(l)) => Some(a >= 2.0 * b && l < 50.0),
        _ => None,
    };
    let drain_ok = fg
        .drain_rate()
        .map(|d| d >= 70_000.0 && fg.all_on_disk == Some(true) && fg.outage.lost == 0);
    let idle_ok = mib(fg.idle_rss_kib).map(|m| m <= 15.0);
    // Figures of a system that did not run are blank, not zero.
    let a = |v: Option<f64>| if fg.ran { v } else { None };
    let b = |v: Option<f64>| if mq.ran { v } else { None };
    let u = |x: u64| Some(x as f64);
    let paced_name = |what: &str| format!("paced {:.0} msg/s: latency {what}, ms", p.paced_rate);

    let rows = vec![
        row(
            format!("steady throughput, msg/s ({} msgs)", p.msgs),
            a(fg_tp),
            b(mq_tp),
            0,
        )
        .target(">= 2x mosquitto and p99 < 50 ms", tp_ok),
        row(
            "  local ingest (PUBACK rate), msg/s",
            a(fg.steady_ingest),
            b(mq.steady_ingest),
            0,
        ),
        row(
            "steady latency p50, ms",
            a(fg.steady.pct_ms(0.5)),
            b(mq.steady.pct_ms(0.5)),
            1,
        ),
        row(
            "steady latency p99, ms",
            a(fg_p99),
            b(mq.steady.pct_ms(0.99)),
            1,
        )
        .target("< 50 ms", fg_p99.map(|l| l < 50.0)),
        row(
            "steady latency max, ms",
            a(fg.steady.pct_ms(1.0)),
            b(mq.steady.pct_ms(1.0)),
            1,
        ),
        row(
            "steady lost (acked, never at cloud)",
            a(u(fg.steady.lost)),
            b(u(mq.steady.lost)),
            0,
        )
        .target("0", fg.ran.then_some(fg.steady.lost == 0)),
        row(
            "steady duplicates",
            a(u(fg.steady.duplicates)),
            b(u(mq.steady.duplicates)),
            0,
        ),
        row(
            "steady CPU of system, ms per 1k msgs",
            a(fg.steady_cpu.sut_ms_per_k(fg.steady.unique)),
            b(mq.steady_cpu.sut_ms_per_k(mq.steady.unique)),
            1,
        ),
        row(
            "steady cloud broker CPU, % of a core",
            a(fg.steady_cpu.cloud_pct()),
            b(mq.steady_cpu.cloud_pct()),
            0,
        ),
        row(
            paced_name("p50"),
            a(fg.paced.pct_ms(0.5)),
            b(mq.paced.pct_ms(0.5)),
            1,
        ),
        row(
            paced_name("p99"),
            a(fg.paced.pct_ms(0.99)),
            b(mq.paced.pct_ms(0.99)),
            1,
        )
        .target("< 50 ms", a(fg.paced.pct_ms(0.99)).map(|l| l < 50.0)),
        row(
            paced_name("max"),
            a(fg.paced.pct_ms(1.0)),
            b(mq.paced.pct_ms(1.0)),
            1,
        ),
        row(
            "paced lost (acked, never at cloud)",
            a(u(fg.paced.lost)),
            b(u(mq.paced.lost)),
            0,
        )
        .target("0", fg.ran.then_some(fg.paced.lost == 0)),
        row(
            format!("outage drain, msg/s ({} msgs)", p.outage_msgs),
            a(fg.drain_rate()),
            b(mq.drain_rate()),
            0,
        )
        .target(">= 70000, every record on disk", drain_ok),
        row(
            "  restore -> first msg at cloud, ms",
            a(fg.reconnect_ms()),
            b(mq.reconnect_ms()),
            0,
        ),
        row(
            "  drain from first msg, msg/s",
            a(fg.drain_rate_after_first()),
            b(mq.drain_rate_after_first()),
            0,
        ),
        row(
            "  drain CPU of system, ms per 1k msgs",
            a(fg.drain_cpu.sut_ms_per_k(fg.outage.unique)),
            b(mq.drain_cpu.sut_ms_per_k(mq.outage.unique)),
            1,
        ),
        row(
            "  drain cloud broker CPU, % of a core",
            a(fg.drain_cpu.cloud_pct()),
            b(mq.drain_cpu.cloud_pct()),
            0,
        ),
        row(
            "outage ingest (PUBACK rate), msg/s",
            a(fg.outage_ingest),
            b(mq.outage_ingest),
            0,
        ),
        row("outage held before restore (queue)", a(fg.held), None, 0)
            .target("= acked, all fsynced", fg.all_on_disk),
        row(
            "outage lost (acked, never at cloud)",
            a(u(fg.outage.lost)),
            b(u(mq.outage.lost)),
            0,
        )
        .target("0", fg.ran.then_some(fg.outage.lost == 0)),
        row(
            "outage duplicates",
            a(u(fg.outage.duplicates)),
            b(u(mq.outage.duplicates)),
            0,
        ),
        row(
            "reordered first arrivals (all scenarios)",
            a(u(fg.steady.reordered
                + fg.outage.reordered
                + fg.paced.reordered)),
            b(u(mq.steady.reordered
                + mq.outage.reordered
                + mq.paced.reordered)),
            0,
        ),
        row(
            "tap overruns (rumqttd cursor jumps)",
            a(fg.tap_jumps.map(|j| j as f64)),
            None,
            0,
        )
        .target("0", fg.tap_jumps.map(|j| j == 0)),
        row(
            "  dropped{reason=broker_overrun}",
            a(fg.overrun_dropped),
            None,
            0,
        )
        .target("0", fg.overrun_dropped.map(|d| d == 0.0)),
        row(
            "idle RSS, MiB",
            a(mib(fg.idle_rss_kib)),
            b(mib(mq.idle_rss_kib)),
            1,
        )
        .target("<= 15 MiB", idle_ok),
        row(
            "RSS holding the outage, MiB",
            a(mib(fg.holding_rss_kib)),
            b(mib(mq.holding_rss_kib)),
            1,
        ),
        row(
            "RSS 2s after the drain, MiB",
            a(mib(fg.after_rss_kib)),
            b(mib(mq.after_rss_kib)),
            1,
        ),
        row(
            "peak RSS (VmHWM), MiB",
            a(mib(fg.peak_rss_kib)),
            b(mib(mq.peak_rss_kib)),
            1,
        ),
    ];

    println!();
    if let Some(c) = ceiling {
        println!(
            "reference: the same {} publishers talking TLS straight to the cloud broker reached \
             {c:.0} msg/s at the cloud subscriber on this machine (the cloud side, not the \
             bridge, is then the limit; the publishers' own TLS also costs CPU here).",
            p.publishers
        );
    }
    let w = 112;
    println!(
        "{:<42} {:>10} {:>10} {:>7}  {:<32} met",
        "figure", "fieldgate", "mosquitto", "fg/mq", "target (fieldgate)"
    );
    println!("{}", "-".repeat(w));
    for r in rows {
        println!(
            "{:<42} {:>10} {:>10} {:>7}  {:<32} {}",
            r.name,
            f(r.fg, r.dec),
            f(r.mq, r.dec),
            ratio(r.fg, r.mq),
            r.target,
            r.met
        );
    }
    println!("{}", "-".repeat(w));
}

// ---------------------------------------------------------------------------------------------

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{HELP}");
        return;
    }
    // `cargo bench` passes --bench; `cargo test --all-targets` does not: do not run a
    // multi-minute benchmark as a "test".
    if !args.iter().any(|a| a == "--bench") {
        println!("bridge benchmark: run it with `cargo bench --bench bridge`");
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let p = Params::from_env();
    let started = Instant::now();
    base();
    println!(
        "fieldgate vs mosquitto {} bridge on {} CPU(s): {} publishers x QoS 1 x {} B; \
         paced {:.0} msg/s x {:.0}s, steady {} msgs, outage {} msgs",
        mosquitto_version(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        p.publishers,
        p.payload,
        p.paced_rate,
        p.paced_secs,
        p.msgs,
        p.outage_msgs
    );
    println!(
        "cloud: one fresh Debian mosquitto per system (TLS, client cert required, \
         max_queued_messages 0, max_inflight_messages 0), behind a cuttable loopback proxy; \
         cloud subscriber: rumqttc, TLS + client cert, QoS {}",
        p.sink_qos as u8
    );
    println!(
        "fieldgate: release binary, gateway_config() (cloud.max_inflight 256, commit_interval \
         20ms); mosquitto: persistence true (autosave_interval default), max_queued_messages 0, \
         max_inflight_messages {}, bridge cleansession false (true implies \
         local_cleansession true: mosquitto would discard messages while the bridge is down), \
         restart_timeout 1",
        p.mosq_inflight
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut results: BTreeMap<String, SysResult> = BTreeMap::new();
    let mut ceiling = None;
    rt.block_on(async {
        let pki = Pki::new();
        if p.ceiling {
            match run_ceiling(&pki, &p).await {
                Ok((d, _)) => ceiling = d.throughput(),
                Err(e) => println!("  ! ceiling: {e}"),
            }
        }
        for kind in &p.systems {
            match run_system(kind, &pki, &p).await {
                Ok(r) => {
                    results.insert(kind.clone(), r);
                }
                Err(e) => {
                    println!("  ! {kind}: {e}");
                    results.insert(
                        kind.clone(),
                        SysResult {
                            notes: vec![format!("did not complete: {e}")],
                            ..Default::default()
                        },
                    );
                }
            }
        }
    });

    let fg = results.get("fieldgate").cloned().unwrap_or_default();
    let mq = results.get("mosquitto").cloned().unwrap_or_default();
    print_table(&fg, &mq, ceiling, &p);
    for (name, r) in &results {
        for n in &r.notes {
            println!("note [{name}]: {n}");
        }
    }
    println!(
        "definitions: throughput = distinct arrivals / (first send stamp .. last first arrival); \
         latency = arrival - send stamp (taken before the client's 10-slot request queue); \
         drain = distinct arrivals / (proxy restore .. last first arrival); CPU = utime+stime \
         from /proc over the scenario window."
    );
    println!("total bench time: {:.1}s", started.elapsed().as_secs_f64());
    rt.shutdown_timeout(Duration::from_secs(2));
}

fn mosquitto_version() -> String {
    Command::new(mosquitto_bin())
        .arg("-h")
        .output()
        .ok()
        .and_then(|o| {
            let s = String::from_utf8_lossy(&o.stdout).to_string();
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().last().map(str::to_string))
        })
        .unwrap_or_else(|| "?".into())
}
