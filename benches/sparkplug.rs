//! Cloud bytes per Modbus reading: Sparkplug B against the plain JSON payloads.
//!
//! Run: `cargo bench --bench sparkplug`. Knobs (environment): `FIELDGATE_BENCH_SECS` (15, the
//! measured window per mode), `FIELDGATE_BENCH_WARMUP_SECS` (2, before the window),
//! `FIELDGATE_BENCH_POLL_MS` (100, the device's `poll_interval`), `FIELDGATE_BENCH_MODES`
//! (all: `json-tag,json-batch,sp-tag,sp-names,sp-batch`, comma-separated, in that order),
//! `FIELDGATE_TEST_CLOUD=mosquitto` for Debian's mosquitto as the cloud.
//!
//! Layout, one mode per run (never two gateways at once), one cloud broker for all runs:
//!
//! ```text
//!  tokio-modbus server ◀─poll─ fieldgate ──TLS + client cert──▶ counting proxy ──▶ cloud
//!  (10 tags, values changed     (release binary,                (bytes each way)  rumqttd
//!   from here twice per poll)    a fresh data dir)               cloud subscriber ◀─┘ (#)
//! ```
//!
//! - Modes: `json-tag` (plain uplink, one JSON message per tag and poll), `json-batch`
//!   (`publish = "batch"`: one JSON object per poll), `sp-tag` (Sparkplug, one DDATA per
//!   reading, metrics by alias: the default), `sp-names` (the same with `aliases = false`),
//!   `sp-batch` (Sparkplug with `publish = "batch"`: one DDATA per poll).
//! - Each run has its own gateway id (`gw1`..`gw5`: the same length, so every mode's topics
//!   are as long as they would be with one id) and so its own cloud client id, edge node and
//!   topics; what the cloud still holds retained from an earlier run is told apart by the id.
//! - Readings delivered: tag values that reached the cloud subscriber: one per JSON tag
//!   message, the entries of `values` of a JSON batch, the metrics of every DDATA (decoded
//!   with the crate's own `Payload::from_bytes`: only counted here; tests/sparkplug.rs checks
//!   the encoding with Eclipse Tahu). Births, statuses and deaths carry no reading.
//! - Application bytes: topic + payload of every PUBLISH the cloud delivered for the run's
//!   gateway (births, statuses, NDEATH included), per reading delivered.
//! - Wire bytes: TCP payload the gateway sent towards the cloud through the proxy (TLS records
//!   holding MQTT framing, PUBLISHes, PINGREQs; the PUBACKs flow the other way and are
//!   printed separately as "down"), per reading delivered. IP/TCP headers are not counted.
//! - Two views: the steady window (after the warm-up: no handshake, no births unless the
//!   session restarted) and the whole session (TLS handshake, CONNECT, births, the statuses
//!   and the goodbye at SIGTERM included), whose per-reading figures depend on the run length.
//! - CPU: the gateway's utime + stime (/proc) over the window, per 1000 readings: informational.
//!   The harness' own CPU is printed too: at ~100 readings/s it is nowhere near a bottleneck.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::modbus_sim::{layout, serve_tcp, Sim};
use common::{cpu_secs, env_or, Cloud, Gateway, GatewayConfig, GatewayPorts, ModbusDevice, Pki};
use fieldgate::sparkplug::payload::Payload;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, Transport};
use serde_json::Value as Json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use toml::toml;

const GROUP: &str = "plant";
const DEVICE: &str = "meter";
/// Tags on the device (see [`meter`]).
const TAGS: usize = 10;

/// What the gateway sends the cloud in one run.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    JsonTag,
    JsonBatch,
    SpTag,
    SpNames,
    SpBatch,
}

impl Mode {
    const ALL: [Mode; 5] = [
        Mode::JsonTag,
        Mode::JsonBatch,
        Mode::SpTag,
        Mode::SpNames,
        Mode::SpBatch,
    ];

    fn key(self) -> &'static str {
        match self {
            Mode::JsonTag => "json-tag",
            Mode::JsonBatch => "json-batch",
            Mode::SpTag => "sp-tag",
            Mode::SpNames => "sp-names",
            Mode::SpBatch => "sp-batch",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Mode::JsonTag => "JSON per tag",
            Mode::JsonBatch => "JSON batch",
            Mode::SpTag => "Sparkplug per tag, aliases",
            Mode::SpNames => "Sparkplug per tag, names",
            Mode::SpBatch => "Sparkplug batch, aliases",
        }
    }

    fn batch(self) -> bool {
        matches!(self, Mode::JsonBatch | Mode::SpBatch)
    }

    fn sparkplug(self) -> bool {
        matches!(self, Mode::SpTag | Mode::SpNames | Mode::SpBatch)
    }
}

/// The device's register map for update `k`: every tag's value differs from update to update.
fn set_values(sim: &Sim, k: u32) {
    let power = 1500.0f32 + (k % 4000) as f32 * 0.37;
    let voltage = 229.0f32 + ((k * 7) % 40) as f32 * 0.05;
    let total = 4_000_000u32.wrapping_add(k.wrapping_mul(13));
    let label = format!("st{:06}", k % 1_000_000);
    let mut regs = Vec::with_capacity(16);
    regs.extend(layout(&power.to_be_bytes(), "ABCD")); // 0-1
    regs.extend(layout(&voltage.to_be_bytes(), "ABCD")); // 2-3
    regs.push(((k % 200) as i16 - 100) as u16); // 4
    regs.push((-(((k * 3) % 1000) as i16)) as u16); // 5
    regs.extend(layout(&total.to_be_bytes(), "ABCD")); // 6-7
    regs.extend(layout(&k.to_be_bytes(), "ABCD")); // 8-9
    regs.push(((k * 11) % 1000) as u16); // 10
    regs.push(100 + ((k * 17) % 900) as u16); // 11
    regs.extend(
        label
            .as_bytes()
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]])),
    ); // 12-15
    sim.set_holding(1, 0, &regs);
    sim.with(1, |u| {
        u.coils.insert(0, (k / 2).is_multiple_of(2));
    });
}

/// Ten tags of mixed types: f32 with units, i16, u32, scaled u16 with units, a coil, a string.
fn meter(port: u16, poll: Duration, batch: bool) -> ModbusDevice {
    let interval = format!("{}ms", poll.as_millis());
    let mut d = ModbusDevice::tcp(DEVICE, port).with(toml! { poll_interval = (interval) });
    if batch {
        d = d.with(toml! { publish = "batch" });
    }
    d.tag_with("power", 0, toml! { type = "f32" order = "ABCD" unit = "W" })
        .tag_with(
            "voltage",
            2,
            toml! { type = "f32" order = "ABCD" unit = "V" },
        )
        .tag_with("setpoint", 4, toml! { type = "i16" })
        .tag_with("trim", 5, toml! { type = "i16" })
        .tag_with(
            "total",
            6,
            toml! { type = "u32" order = "ABCD" unit = "Wh" },
        )
        .tag_with("count", 8, toml! { type = "u32" order = "ABCD" })
        .tag_with("level", 10, toml! { scale = 0.1 unit = "%" })
        .tag_with("pressure", 11, toml! { scale = 0.01 unit = "bar" })
        .tag_with("label", 12, toml! { type = "string" length = 8 })
        .tag_with("run", 0, toml! { kind = "coil" })
}

/// A TCP proxy in front of the cloud that counts the bytes of every connection, each way.
struct CountingProxy {
    port: u16,
    /// Gateway -> cloud.
    up: Arc<AtomicU64>,
    /// Cloud -> gateway.
    down: Arc<AtomicU64>,
    /// Connections accepted.
    conns: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl CountingProxy {
    async fn start(target: u16) -> CountingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (up, down, conns) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let stop = CancellationToken::new();
        let (up2, down2, conns2, stop2) = (up.clone(), down.clone(), conns.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let inbound = tokio::select! {
                    _ = stop2.cancelled() => return,
                    r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
                };
                conns2.fetch_add(1, Ordering::Relaxed);
                let (up, down, stop) = (up2.clone(), down2.clone(), stop2.clone());
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(("127.0.0.1", target)).await else {
                        return;
                    };
                    // Small MQTT packets: without NODELAY each write waits for a delayed ACK.
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (gr, gw) = inbound.into_split();
                    let (cr, cw) = outbound.into_split();
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = async { tokio::join!(pipe(gr, cw, up), pipe(cr, gw, down)) } => {}
                    }
                });
            }
        });
        CountingProxy {
            port,
            up,
            down,
            conns,
            stop,
        }
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Copies `from` to `to`, adding every byte to `n`; passes the end of stream on.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    n: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(k) => {
                n.fetch_add(k as u64, Ordering::Relaxed);
                if to.write_all(&buf[..k]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}

/// One PUBLISH the cloud delivered.
struct Got {
    at: Instant,
    topic: String,
    payload: Bytes,
}

/// The cloud-side subscriber: every message (`#`, QoS 1), with its arrival time.
struct CloudTap {
    got: Arc<Mutex<Vec<Got>>>,
    _client: AsyncClient,
    stop: CancellationToken,
}

impl CloudTap {
    async fn start(pki: &Pki, cloud_port: u16, id: &str) -> CloudTap {
        let mut o = MqttOptions::new(format!("bench-tap-{id}"), "127.0.0.1", cloud_port);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_transport(Transport::tls_with_config(pki.client_tls()));
        o.set_max_packet_size(2 * 1024 * 1024, 2 * 1024 * 1024);
        let (client, mut el) = AsyncClient::new(o, 1000);
        client.subscribe("#", QoS::AtLeastOnce).await.unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (got2, stop2) = (got.clone(), stop.clone());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut tx = Some(tx);
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    _ = stop2.cancelled() => return,
                    ev = el.poll() => ev,
                };
                match ev {
                    Ok(Event::Incoming(Packet::Publish(p))) => got2.lock().unwrap().push(Got {
                        at: Instant::now(),
                        topic: p.topic.clone(),
                        payload: p.payload.clone(),
                    }),
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .expect("cloud subscriber: no SUBACK")
            .unwrap();
        CloudTap {
            got,
            _client: client,
            stop,
        }
    }

    fn len(&self) -> usize {
        self.got.lock().unwrap().len()
    }
}

impl Drop for CloudTap {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// What the cloud got from one gateway over a span of time.
#[derive(Default, Debug, Clone, Copy)]
struct Tally {
    readings: u64,
    /// PUBLISHes of this gateway.
    messages: u64,
    /// Topic + payload bytes of those.
    app_bytes: u64,
    /// NBIRTH, DBIRTH.
    births: u64,
    /// Messages carrying no reading (births, statuses, deaths, anything else).
    other: u64,
    /// Payloads that could not be read (JSON or Sparkplug): a bug, not a cost.
    undecodable: u64,
}

/// Readings in one message for gateway `gw`; `None`: not this gateway's. `Err`: undecodable.
fn readings_in(gw: &str, topic: &str, payload: &[u8]) -> Option<Result<(u64, bool), ()>> {
    let levels: Vec<&str> = topic.split('/').collect();
    if levels.first() == Some(&"spBv1.0") {
        if levels.get(3) != Some(&gw) {
            return None;
        }
        let kind = levels.get(2).copied().unwrap_or("");
        let birth = kind.ends_with("BIRTH");
        if kind != "DDATA" {
            return Some(Ok((0, birth)));
        }
        return Some(
            Payload::from_bytes(payload)
                .map(|p| (p.metrics.len() as u64, false))
                .map_err(|_| ()),
        );
    }
    if levels.first() != Some(&"fieldgate") || levels.get(1) != Some(&gw) {
        return None;
    }
    let last = levels.last().copied().unwrap_or("");
    if last == "status" {
        return Some(Ok((0, false)));
    }
    let Ok(json) = serde_json::from_slice::<Json>(payload) else {
        return Some(Err(()));
    };
    if last == "batch" {
        let n = json["values"].as_object().map_or(0, |v| v.len() as u64);
        return Some(Ok((n, false)));
    }
    Some(Ok((u64::from(json.get("value").is_some()), false)))
}

/// Tallies the messages of `gw` that arrived in `[from, to)`.
fn tally(got: &[Got], gw: &str, from: Instant, to: Instant) -> Tally {
    let mut t = Tally::default();
    for g in got.iter().filter(|g| g.at >= from && g.at < to) {
        let Some(r) = readings_in(gw, &g.topic, &g.payload) else {
            continue;
        };
        t.messages += 1;
        t.app_bytes += (g.topic.len() + g.payload.len()) as u64;
        match r {
            Ok((n, birth)) => {
                t.readings += n;
                t.births += u64::from(birth);
                t.other += u64::from(n == 0);
            }
            Err(()) => t.undecodable += 1,
        }
    }
    t
}

/// One mode's figures.
struct Run {
    mode: Mode,
    /// The measured window.
    window: Tally,
    window_secs: f64,
    window_up: u64,
    window_down: u64,
    window_cpu: f64,
    harness_cpu: f64,
    /// The whole session, start to exit.
    session: Tally,
    session_up: u64,
    connections: u64,
    /// Modbus requests the device answered in the window.
    requests: u64,
}

struct Setup {
    pki: Pki,
    cloud_port: u16,
    poll: Duration,
    warmup: Duration,
    window: Duration,
}

async fn run(s: &Setup, mode: Mode, n: usize) -> Run {
    let gw = format!("gw{n}");
    let sim = Sim::new();
    set_values(&sim, 0);
    let srv = serve_tcp(sim.clone()).await;
    // The values change twice per poll, so every poll reads new ones.
    let driver = {
        let sim = sim.clone();
        let every = s.poll / 2;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            let mut k = 0u32;
            loop {
                tick.tick().await;
                k = k.wrapping_add(1);
                set_values(&sim, k);
            }
        })
    };
    let proxy = CountingProxy::start(s.cloud_port).await;
    let tap = CloudTap::start(&s.pki, s.cloud_port, &gw).await;
    let ports = GatewayPorts::new();
    let data = tempfile::tempdir().unwrap();
    let mut cfg = GatewayConfig::bridged(&s.pki, &ports, data.path(), proxy.port)
        .set("gateway.id", gw.as_str())
        .set("log.level", "warn")
        .modbus(meter(srv.port, s.poll, mode.batch()));
    if mode.sparkplug() {
        cfg = cfg.with(
            "sparkplug",
            toml! { enabled = true group_id = (GROUP) aliases = (mode != Mode::SpNames) },
        );
    }
    let start = Instant::now();
    let g = Gateway::start_env(&cfg.to_toml(), &ports, &[("RUST_LOG", "warn")]).await;
    tokio::time::sleep(s.warmup).await;

    // What the window's figures are differences of: time, bytes each way, CPU of the gateway
    // and of the harness, Modbus requests.
    let snapshot = || {
        (
            Instant::now(),
            proxy.up.load(Ordering::Relaxed),
            proxy.down.load(Ordering::Relaxed),
            cpu_secs(g.pid()).unwrap_or(f64::NAN),
            cpu_secs(std::process::id()).unwrap_or(f64::NAN),
            sim.requests.load(Ordering::Relaxed),
        )
    };
    let (t0, up0, down0, cpu0, me0, req0) = snapshot();
    tokio::time::sleep(s.window).await;
    let (t1, up1, down1, cpu1, me1, req1) = snapshot();

    let (status, log) = g.terminate();
    if !status.success() {
        println!(
            "  {}: gateway exit {status}; log tail:\n{}",
            mode.key(),
            log.lines().rev().take(20).collect::<Vec<_>>().join("\n")
        );
    }
    // What the goodbye sent: wait until the cloud has been quiet for 500 ms (at most 3 s).
    let settle = Instant::now() + Duration::from_secs(3);
    let mut seen = tap.len();
    while Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = tap.len();
        if now == seen {
            break;
        }
        seen = now;
    }
    driver.abort();
    let end = Instant::now();
    let got = tap.got.lock().unwrap();
    let run = Run {
        mode,
        window: tally(&got, &gw, t0, t1),
        window_secs: (t1 - t0).as_secs_f64(),
        window_up: up1 - up0,
        window_down: down1 - down0,
        window_cpu: cpu1 - cpu0,
        harness_cpu: me1 - me0,
        session: tally(&got, &gw, start, end),
        session_up: proxy.up.load(Ordering::Relaxed),
        connections: proxy.conns.load(Ordering::Relaxed),
        requests: req1 - req0,
    };
    drop(got);
    drop(srv);
    run
}

fn per(bytes: u64, readings: u64) -> f64 {
    bytes as f64 / (readings.max(1)) as f64
}

fn print_tables(runs: &[Run], s: &Setup) {
    let base = runs.iter().find(|r| r.mode == Mode::JsonTag);
    let ratio = |v: f64, b: Option<f64>| match b {
        Some(b) if b > 0.0 => format!("{:.2}", v / b),
        _ => "-".into(),
    };
    let offered = s.window.as_secs_f64() * 1000.0 / s.poll.as_millis().max(1) as f64 * TAGS as f64;
    println!();
    println!(
        "Steady window: {:.0} s after a {:.0} s warm-up; offered ~{offered:.0} readings per run \
         ({TAGS} tags every {} ms)",
        s.window.as_secs_f64(),
        s.warmup.as_secs_f64(),
        s.poll.as_millis()
    );
    println!(
        "{:<27} {:>8} {:>6} {:>6} {:>9} {:>9} {:>7} {:>7} {:>8} {:>10}",
        "mode",
        "readings",
        "rd/s",
        "msgs",
        "app B/rd",
        "wire B/rd",
        "app x",
        "wire x",
        "down B/rd",
        "CPU s/1k rd"
    );
    let (base_app, base_wire) = (
        base.map(|b| per(b.window.app_bytes, b.window.readings)),
        base.map(|b| per(b.window_up, b.window.readings)),
    );
    for r in runs {
        let w = &r.window;
        let app = per(w.app_bytes, w.readings);
        let wire = per(r.window_up, w.readings);
        println!(
            "{:<27} {:>8} {:>6.1} {:>6} {:>9.1} {:>9.1} {:>7} {:>7} {:>8.1} {:>10.3}",
            r.mode.label(),
            w.readings,
            w.readings as f64 / r.window_secs,
            w.messages,
            app,
            wire,
            ratio(app, base_app),
            ratio(wire, base_wire),
            per(r.window_down, w.readings),
            1000.0 * r.window_cpu / w.readings.max(1) as f64,
        );
    }
    println!();
    println!(
        "Whole session (gateway start to exit: TLS handshake, CONNECT, births, statuses, goodbye)"
    );
    println!(
        "{:<27} {:>8} {:>6} {:>7} {:>9} {:>9} {:>7} {:>9} {:>5}",
        "mode",
        "readings",
        "msgs",
        "no-rd",
        "app B/rd",
        "wire B/rd",
        "wire x",
        "wire up B",
        "conns"
    );
    let base_wire = base.map(|b| per(b.session_up, b.session.readings));
    for r in runs {
        let t = &r.session;
        let wire = per(r.session_up, t.readings);
        println!(
            "{:<27} {:>8} {:>6} {:>7} {:>9.1} {:>9.1} {:>7} {:>9} {:>5}",
            r.mode.label(),
            t.readings,
            t.messages,
            t.other,
            per(t.app_bytes, t.readings),
            wire,
            ratio(wire, base_wire),
            r.session_up,
            r.connections,
        );
    }
    println!();
    for r in runs {
        let odd = [
            (r.window.undecodable + r.session.undecodable > 0).then(|| {
                format!(
                    "{} undecodable payloads",
                    r.window.undecodable.max(r.session.undecodable)
                )
            }),
            (r.connections != 1).then(|| format!("{} connections to the cloud", r.connections)),
            (r.mode.sparkplug() && r.window.births > 0)
                .then(|| format!("{} births inside the window", r.window.births)),
        ];
        let odd: Vec<String> = odd.into_iter().flatten().collect();
        println!(
            "{:<27} Modbus requests/s {:.1}; harness CPU {:.1}% of a core; births in session {}{}",
            r.mode.label(),
            r.requests as f64 / r.window_secs,
            100.0 * r.harness_cpu / r.window_secs,
            r.session.births,
            if odd.is_empty() {
                String::new()
            } else {
                format!("; NOTE: {}", odd.join(", "))
            }
        );
    }
    println!(
        "\napp B/rd: topic + payload per reading at the cloud subscriber; wire B/rd: TCP payload \
         gateway -> cloud (TLS, MQTT framing) per reading; down: cloud -> gateway (PUBACKs, \
         PINGRESP); x: against JSON per tag; CPU: the gateway's, per 1000 readings"
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo test --all-targets` runs benches without --bench: do not run a load as a test.
    if !args.iter().any(|a| a == "--bench") {
        println!("sparkplug benchmark: run it with `cargo bench --bench sparkplug`");
        return;
    }
    let modes: Vec<Mode> = match std::env::var("FIELDGATE_BENCH_MODES") {
        Ok(list) => list
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(|k| {
                *Mode::ALL
                    .iter()
                    .find(|m| m.key() == k)
                    .unwrap_or_else(|| panic!("FIELDGATE_BENCH_MODES: unknown mode {k:?}"))
            })
            .collect(),
        Err(_) => Mode::ALL.to_vec(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let pki = Pki::new();
    let cloud = Cloud::start(&pki, &pki.server);
    let setup = Setup {
        cloud_port: cloud.port,
        pki,
        poll: Duration::from_millis(env_or("FIELDGATE_BENCH_POLL_MS", 100)),
        warmup: Duration::from_secs_f64(env_or("FIELDGATE_BENCH_WARMUP_SECS", 2.0)),
        window: Duration::from_secs_f64(env_or("FIELDGATE_BENCH_SECS", 15.0)),
    };
    println!(
        "fieldgate cloud bytes per reading on {} CPU(s): one Modbus TCP device, {TAGS} tags \
         (f32 x2 with units, i16 x2, u32 x2, scaled u16 x2, string, coil), poll_interval {} ms \
         = {:.0} readings/s, values changed every {} ms; cloud: {} over TLS with client certs",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        setup.poll.as_millis(),
        TAGS as f64 * 1000.0 / setup.poll.as_millis().max(1) as f64,
        (setup.poll / 2).as_millis(),
        common::cloud_kind(),
    );
    let runs = rt.block_on(async {
        let mut runs = Vec::new();
        for (i, mode) in modes.into_iter().enumerate() {
            println!("  running {} ...", mode.key());
            runs.push(run(&setup, mode, i + 1).await);
        }
        runs
    });
    print_tables(&runs, &setup);
    drop(cloud);
}
