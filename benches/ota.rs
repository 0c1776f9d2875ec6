//! OTA serving load: 100 devices pull a 1 MiB image from the gateway at once.
//!
//! Run: `cargo bench --bench ota`. Knobs (environment): `FIELDGATE_BENCH_DEVICES` (100),
//! `FIELDGATE_BENCH_IMAGE_KIB` (1024), `FIELDGATE_BENCH_CHUNK` (16384).
//!
//! Layout, per scenario (MQTT chunks, HTTP `Range`, half and half), each on a fresh gateway:
//! a TLS cloud broker (test harness `Cloud`) carries the `ota_upgrade` command down through the
//! bridge; the release `fieldgate` binary fetches the image once from an HTTPS firmware store
//! in this process; then N simulated devices (plain rumqttc clients, the same simulator as
//! `tests/ota.rs`) run the whole protocol concurrently: request -> metadata -> 16 chunks per
//! `chunk/get` (MQTT) or one chunk-sized range per GET (HTTP) -> progress -> verify -> done.
//!
//! Printed: wall time from the first request to the last `success`, aggregate image MB/s
//! delivered to devices, p50/p99 of the per-chunk latency (request sent -> chunk received;
//! for HTTP request -> range body complete), the gateway's RSS after the download and at
//! peak (VmHWM), bytes fetched from the firmware store vs bytes served to devices. Every
//! device checks the sha256 of what it reassembled. Every wait is bounded.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::ota_sim::*;
use common::*;
use rumqttc::QoS;
use serde_json::json;

fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            let (n, v) = l.rsplit_once(' ')?;
            (n == sample).then(|| v.parse().ok())?
        })
        .unwrap_or(0.0)
}

async fn scenario(name: &str, devices: usize, img: &[u8], chunk: u64, http_share: usize) {
    let pki = Pki::new();
    let cloud = Cloud::start(&pki, &pki.server);
    let fw = FirmwareServer::start(&pki, img.to_vec()).await;
    let ports = GatewayPorts::new();
    let data = tempfile::tempdir().expect("tempdir");
    // Every simulated device dials from 127.0.0.1: lift the per-address connection limit
    // (64 by default) above the device count.
    let extra = format!(
        "\n[broker]\nmax_connections_per_ip = {}\n[ota]\nchunk_size = {chunk}\nmax_concurrent_downloads = {}\n",
        devices + 16,
        devices + 8
    );
    let config = gateway_config(&pki, &ports, data.path(), cloud.port, &extra, "");
    let g = Gateway::start(&config, &ports).await;
    let c = Collector::start(&pki, cloud.port, "fieldgate/gw1/ota/_gateway/#").await;
    let ids: Vec<String> = (0..devices).map(|i| format!("b{i:03}")).collect();
    let cmd = json!({"name": "fw", "version": "2.0", "size": img.len(), "sha256": sha256_hex(img),
                     "url": fw.url(), "devices": ids, "rollout": "bench"});
    c.client
        .publish(
            "fieldgate/gw1/cmd/ota/upgrade",
            QoS::AtLeastOnce,
            false,
            cmd.to_string().into_bytes(),
        )
        .await
        .expect("command");
    let fetched = eventually(Duration::from_secs(60), || {
        c.on_topic("fieldgate/gw1/ota/_gateway/fetch")
            .iter()
            .any(|p| String::from_utf8_lossy(p).contains("\"ok\""))
    })
    .await;
    if !fetched {
        println!(
            "{name}: the gateway did not fetch the image\n{}",
            g.log_text()
        );
        return;
    }
    let rss_before = proc_kib(g.pid(), "VmRSS").unwrap_or(0);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let via = if i % 100 < http_share {
            Via::Http
        } else {
            Via::Mqtt
        };
        let mut o = DeviceOpts::new(id, g.mqtt, via);
        if via == Via::Http {
            o.window = chunk;
        }
        o.deadline = Duration::from_secs(300);
        tasks.push(tokio::spawn(run_device(o)));
    }
    let mut lat = Vec::new();
    let (mut ok, mut failed) = (0, 0);
    let sha = sha256_hex(img);
    for t in tasks {
        match t.await {
            Ok(Ok(r)) if r.sha256 == sha => {
                ok += 1;
                lat.extend(r.latencies);
            }
            Ok(Ok(r)) => {
                failed += 1;
                println!("  {}: wrong image", r.id);
            }
            Ok(Err(e)) => {
                failed += 1;
                println!("  {e}");
            }
            Err(e) => {
                failed += 1;
                println!("  device task: {e}");
            }
        }
    }
    let wall = t0.elapsed();
    let text = g.get("/metrics").unwrap_or_default();
    let served = metric(&text, "fieldgate_ota_served_bytes_total{via=\"mqtt\"}")
        + metric(&text, "fieldgate_ota_served_bytes_total{via=\"http\"}");
    let from_cloud = fw.body_bytes.load(Ordering::SeqCst);
    let delivered = (ok * img.len()) as f64;
    println!(
        "{name:<10} devices {ok}/{devices} ok ({failed} failed) | wall {:>6.2} s | {:>7.1} MB/s to devices | \
         chunk latency p50 {:>7.2} ms p99 {:>7.2} ms | RSS {} -> {} KiB, peak {} KiB | \
         fetched {} B from the store, served {} B ({:.0}x)",
        wall.as_secs_f64(),
        delivered / wall.as_secs_f64() / 1e6,
        percentile(&mut lat, 50.0).as_secs_f64() * 1e3,
        percentile(&mut lat, 99.0).as_secs_f64() * 1e3,
        rss_before,
        proc_kib(g.pid(), "VmRSS").unwrap_or(0),
        proc_kib(g.pid(), "VmHWM").unwrap_or(0),
        from_cloud,
        served as u64,
        served / (from_cloud.max(1) as f64),
    );
    let _ = g.terminate();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo test --all-targets` runs benches without --bench: do not run a load as a test.
    if !args.iter().any(|a| a == "--bench") {
        println!("ota benchmark: run it with `cargo bench --bench ota`");
        return;
    }
    let devices: usize = env_or("FIELDGATE_BENCH_DEVICES", 100);
    let kib: usize = env_or("FIELDGATE_BENCH_IMAGE_KIB", 1024);
    let chunk: u64 = env_or("FIELDGATE_BENCH_CHUNK", 16384);
    let img = image(kib * 1024, 42);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "fieldgate OTA: {devices} devices x {kib} KiB image, chunk {chunk} B, on {} CPU(s) shared \
         with the devices, the cloud broker and the firmware store",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    rt.block_on(async {
        scenario("mqtt", devices, &img, chunk, 0).await;
        scenario("http", devices, &img, chunk, 100).await;
        scenario("mixed", devices, &img, chunk, 50).await;
    });
}
