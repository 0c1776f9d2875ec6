//! Modbus polling load: 1,000 tags on 10 Modbus TCP devices at 1 s and 100 ms intervals,
//! each published per tag and batched (`publish = "batch"`, one message per device and
//! poll interval).
//!
//! Run: `cargo bench --bench modbus`. Knobs (environment): `FIELDGATE_BENCH_DEVICES` (10),
//! `FIELDGATE_BENCH_TAGS` (1000, spread evenly), `FIELDGATE_BENCH_SECS` (10, per run).
//!
//! Layout: the devices are tokio-modbus TCP servers in this process, each with a contiguous
//! register map; per device the tags cycle through u16, i16, u32 (CDAB), f32, f64, i.e. 10
//! registers per 5 tags. The release `fieldgate` binary (test harness) polls them, publishes
//! every reading into its broker (and, as in production, through the uplink tap into its disk
//! queue; no cloud is configured), and a plain MQTT subscriber here counts what arrives.
//!
//! Printed per run, over a window after a warm-up: read requests answered per second,
//! cloud-bound messages per second (records accepted into the disk queue,
//! `fieldgate_messages_in_total`; with a cloud each is one PUBLISH to it) and, for a batched
//! run, the ratio to the per-tag run of the same interval; messages received per second by
//! the subscriber, coalesced requests per poll cycle,
//! overruns, the gateway's CPU (utime + stime from /proc/<pid>/stat) and its RSS now and
//! at peak (VmHWM). Every wait is bounded.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::modbus_sim::{serve_tcp, Served, Sim};
use common::{cpu_secs, env_or, proc_kib, Gateway, GatewayPorts};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// Sum of every sample of a metric family, e.g. `fieldgate_modbus_reads_total`.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// One device's register map and its tag config.
fn device(sim: &Sim, name: &str, port: u16, tags: usize, interval: &str, mode: &str) -> String {
    let mut cfg = format!(
        "[[modbus]]\nname = \"{name}\"\nhost = \"127.0.0.1:{port}\"\npoll_interval = \"{interval}\"\n\
         timeout = \"1s\"\npublish = \"{mode}\"\n"
    );
    let mut addr: u16 = 0;
    for i in 0..tags {
        let (ty, regs, order) = match i % 5 {
            0 => ("u16", 1, "ABCD"),
            1 => ("i16", 1, "ABCD"),
            2 => ("u32", 2, "CDAB"),
            3 => ("f32", 2, "ABCD"),
            _ => ("f64", 4, "ABCD"),
        };
        let words: Vec<u16> = (0..regs).map(|k| addr + k + 1).collect();
        sim.set_holding(1, addr, &words);
        cfg.push_str(&format!(
            "[[modbus.tags]]\nname = \"t{i}\"\naddress = {addr}\ntype = \"{ty}\"\norder = \"{order}\"\n"
        ));
        addr += regs;
    }
    cfg
}

struct Counter {
    n: Arc<AtomicU64>,
    _client: AsyncClient,
}

async fn subscriber(port: u16) -> Counter {
    let mut o = MqttOptions::new("bench-sub", "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = AsyncClient::new(o, 1000);
    let _ = client.subscribe("field/+/+", QoS::AtMostOnce).await;
    let n = Arc::new(AtomicU64::new(0));
    let n2 = n.clone();
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if !p.topic.ends_with("/status") {
                        n2.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    Counter { n, _client: client }
}

struct Sample {
    t: Instant,
    cpu: f64,
    reads: f64,
    queued: f64,
    cycles: f64,
    overruns: f64,
    received: u64,
    served: u64,
}

fn sample(g: &Gateway, c: &Counter, sims: &[Sim]) -> Sample {
    let text = g.get("/metrics").unwrap_or_default();
    Sample {
        t: Instant::now(),
        cpu: cpu_secs(g.pid()).unwrap_or(f64::NAN),
        reads: metric_sum(&text, "fieldgate_modbus_reads_total"),
        queued: metric_sum(&text, "fieldgate_messages_in_total"),
        cycles: metric_sum(&text, "fieldgate_modbus_cycles_total"),
        overruns: metric_sum(&text, "fieldgate_modbus_overruns_total"),
        received: c.n.load(Ordering::Relaxed),
        served: sims
            .iter()
            .map(|s| s.requests.load(Ordering::Relaxed))
            .sum(),
    }
}

/// One run; returns the cloud-bound messages per second.
async fn scenario(devices: usize, tags: usize, interval: &str, mode: &str, secs: f64) -> f64 {
    let per = tags / devices.max(1);
    let mut sims = Vec::new();
    let mut servers: Vec<Served> = Vec::new();
    let mut modbus = String::new();
    for d in 0..devices {
        let sim = Sim::new();
        let srv = serve_tcp(sim.clone()).await;
        modbus.push_str(&device(
            &sim,
            &format!("d{d}"),
            srv.port,
            per,
            interval,
            mode,
        ));
        sims.push(sim);
        servers.push(srv);
    }
    let ports = GatewayPorts::new();
    let data = tempfile::tempdir().unwrap();
    let cfg = format!(
        "[gateway]\nid = \"bench\"\ndata_dir = \"{}\"\n[broker.listeners.default]\n\
         listen = \"127.0.0.1:{}\"\nallow_anonymous = true\n[http]\nlisten = \"127.0.0.1:{}\"\n[log]\nlevel = \"warn\"\n{modbus}",
        data.path().display(),
        ports.mqtt,
        ports.http
    );
    let g = Gateway::start_env(&cfg, &ports, &[("RUST_LOG", "warn")]).await;
    let counter = subscriber(g.mqtt).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let a = sample(&g, &counter, &sims);
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let b = sample(&g, &counter, &sims);
    let wall = (b.t - a.t).as_secs_f64();
    let text = g.get("/metrics").unwrap_or_default();
    let per_cycle = metric_sum(&text, "fieldgate_modbus_cycle_requests");
    let cycles_per_dev = (b.cycles - a.cycles) / devices as f64;
    let rss = proc_kib(g.pid(), "VmRSS").unwrap_or(0) as f64 / 1024.0;
    let hwm = proc_kib(g.pid(), "VmHWM").unwrap_or(0) as f64 / 1024.0;
    let cloud = (b.queued - a.queued) / wall;
    let per_sec = humantime::parse_duration(interval).map_or(1.0, |d| d.as_secs_f64());
    let ideal = match mode {
        "batch" => devices as f64 / per_sec,
        _ => (per * devices) as f64 / per_sec,
    };
    println!(
        "interval {interval:>5}, publish {mode:>7}: {devices} devices x {per} tags = {} tags, window {wall:.1} s",
        per * devices
    );
    println!(
        "  reads/s answered {:>8.0}  (simulators served {:.0}/s)   messages received/s {:>8.0}  \
         (ideal {ideal:.0})",
        (b.reads - a.reads) / wall,
        (b.served - a.served) as f64 / wall,
        (b.received - a.received) as f64 / wall,
    );
    println!("  cloud-bound messages/s (queued records) {cloud:>8.1}");
    println!(
        "  coalesced requests per cycle (all devices) {per_cycle:.0} for {} tags; cycles per device {cycles_per_dev:.1}; overruns {:.0}",
        per * devices,
        b.overruns - a.overruns
    );
    println!(
        "  gateway CPU {:.1}% of one core; RSS {rss:.1} MiB now, {hwm:.1} MiB peak",
        100.0 * (b.cpu - a.cpu) / wall
    );
    let (status, log) = g.terminate();
    if !status.success() {
        println!(
            "  gateway exit {status}; log tail:\n{}",
            log.lines().rev().take(20).collect::<Vec<_>>().join("\n")
        );
    }
    drop(servers);
    cloud
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo test --all-targets` runs benches without --bench: do not run a load as a test.
    if !args.iter().any(|a| a == "--bench") {
        println!("modbus benchmark: run it with `cargo bench --bench modbus`");
        return;
    }
    let devices: usize = env_or("FIELDGATE_BENCH_DEVICES", 10);
    let tags: usize = env_or("FIELDGATE_BENCH_TAGS", 1000);
    let secs: f64 = env_or("FIELDGATE_BENCH_SECS", 10.0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "fieldgate Modbus TCP polling on {} CPU(s); simulators and subscriber share the machine",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    rt.block_on(async {
        for interval in ["1s", "100ms"] {
            let per_tag = scenario(devices, tags, interval, "per_tag", secs).await;
            let batch = scenario(devices, tags, interval, "batch", secs).await;
            println!(
                "interval {interval:>5}: cloud-bound messages/s per tag {per_tag:.1}, batched \
                 {batch:.1}: {:.0} times fewer\n",
                per_tag / batch.max(f64::MIN_POSITIVE)
            );
        }
    });
}
