//! OTA end to end with real parts on loopback: the real gateway binary, a real TLS cloud broker
//! carrying the `ota_upgrade` command down through the bridge, a real HTTPS firmware store
//! (test CA) that counts its downloads, and plain MQTT/HTTP clients as field devices. Every
//! assertion is on counts and hashes; deadlines only bound the waiting.

mod common;

use std::time::Duration;

use common::ota_sim::*;
use common::*;
use rumqttc::QoS;
use serde_json::{json, Value as Json};

const WAIT: Duration = Duration::from_secs(90);
const CHUNK: u64 = 4096;

struct Setup {
    pki: Pki,
    cloud: Cloud,
    ports: GatewayPorts,
    data: tempfile::TempDir,
}

async fn setup() -> Setup {
    let pki = Pki::new();
    let cloud = Cloud::start(&pki, &pki.server);
    Setup {
        pki,
        cloud,
        ports: GatewayPorts::new(),
        data: tempfile::tempdir().unwrap(),
    }
}

impl Setup {
    fn config(&self, ota: &str) -> String {
        let extra = format!(
            "\n[ota]\nchunk_size = {CHUNK}\nmax_concurrent_downloads = 64\nfetch_timeout = \"3s\"\n{ota}\n"
        );
        gateway_config(
            &self.pki,
            &self.ports,
            self.data.path(),
            self.cloud.port,
            &extra,
            "",
        )
    }

    async fn gateway(&self, ota: &str) -> Gateway {
        Gateway::start(&self.config(ota), &self.ports).await
    }

    async fn collector(&self) -> Collector {
        Collector::start(&self.pki, self.cloud.port, "fieldgate/gw1/#").await
    }
}

/// Publishes a cloud command on `fieldgate/gw1/<topic>` (it reaches the gateway through the
/// bridge's downlink).
async fn command(c: &Collector, topic: &str, v: &Json) {
    c.client
        .publish(
            format!("fieldgate/gw1/{topic}"),
            QoS::AtLeastOnce,
            false,
            v.to_string().into_bytes(),
        )
        .await
        .unwrap();
}

fn upgrade(img: &[u8], url: &str, devices: &[String]) -> Json {
    json!({"command": "ota_upgrade", "name": "pumpfw", "version": "2.0", "size": img.len(),
           "sha256": sha256_hex(img), "url": url, "devices": devices, "rollout": "r1"})
}

/// JSON messages the cloud received on `fieldgate/gw1/<topic>`.
fn cloud_json(c: &Collector, topic: &str) -> Vec<Json> {
    c.on_topic(&format!("fieldgate/gw1/{topic}"))
        .iter()
        .map(|p| serde_json::from_slice(p).unwrap_or(Json::Null))
        .collect()
}

async fn wait_cloud(c: &Collector, g: &Gateway, topic: &str, pred: impl Fn(&Json) -> bool) -> Json {
    let mut found = None;
    let ok = eventually(WAIT, || {
        found = cloud_json(c, topic).into_iter().find(|v| pred(v));
        found.is_some()
    })
    .await;
    assert!(
        ok,
        "cloud never saw the expected message on {topic}; saw {:?}\n--- gateway log ---\n{}",
        cloud_json(c, topic),
        g.log_text()
    );
    found.unwrap_or(Json::Null)
}

fn metric_or_zero(g: &Gateway, sample: &str) -> f64 {
    let v = g.metric(sample);
    if v.is_nan() {
        0.0
    } else {
        v
    }
}

/// Asserts that nothing chunk-like reached the cloud: no chunk topic, no payload as long as a
/// chunk, and less payload in total than one image.
fn assert_no_chunks_in_cloud(c: &Collector, img_len: usize) {
    let got = c.received.lock().unwrap().clone();
    for (t, p) in &got {
        assert!(
            !t.contains("/chunk/"),
            "chunk traffic reached the cloud: {t}"
        );
        assert!(
            (p.len() as u64) < CHUNK,
            "a payload of {} bytes on {t} reached the cloud",
            p.len()
        );
    }
    let total: usize = got.iter().map(|(_, p)| p.len()).sum();
    assert!(total < img_len, "{total} payload bytes reached the cloud");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_devices_update_from_one_download() {
    let s = setup().await;
    let img = image(200 * 1024 + 123, 7);
    let sha = sha256_hex(&img);
    let fw = FirmwareServer::start(&s.pki, img.clone()).await;
    let g = s.gateway("").await;
    let c = s.collector().await;
    let ids: Vec<String> = (0..50).map(|i| format!("dev{i:02}")).collect();
    command(&c, "cmd/ota/upgrade", &upgrade(&img, &fw.url(), &ids)).await;
    wait_cloud(&c, &g, "ota/_gateway/fetch", |v| v["result"] == "ok").await;

    let mut tasks = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let via = if i % 2 == 0 { Via::Mqtt } else { Via::Http };
        let mut o = DeviceOpts::new(id, g.mqtt, via);
        if i == 0 {
            // Restarts (new session) after 20 chunks and resumes from its last chunk.
            o.restart_after = Some(20);
        }
        tasks.push(tokio::spawn(run_device(o)));
    }
    let mut results = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => results.push(r),
            Err(e) => panic!("{e}\n--- gateway log ---\n{}", g.log_text()),
        }
    }
    for r in &results {
        assert_eq!(r.sha256, sha, "{} reassembled a different image", r.id);
        assert!(r.success, "{} got no success", r.id);
        assert_eq!(r.metadata["sha256"], sha.as_str());
    }
    let restarted = &results[0];
    let from = restarted.resumed_from.expect("device 0 restarted");
    assert!(from >= 20, "restarted at chunk {from}");
    assert!(
        restarted.resumed_next_chunk.unwrap_or(0) >= from,
        "the gateway kept the restarted device's place: {:?}",
        restarted.resumed_next_chunk
    );
    let chunks = (img.len() as u64).div_ceil(CHUNK);
    assert_eq!(
        restarted.pieces, chunks,
        "the restarted device downloaded every chunk once (resumed, not restarted from 0)"
    );

    // One download from the firmware store, whole.
    let reqs = fw.requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!(
        fw.body_bytes.load(std::sync::atomic::Ordering::SeqCst),
        img.len() as u64
    );

    // The cloud saw every device's progress and its final result, through the queue.
    for id in &ids {
        wait_cloud(&c, &g, &format!("ota/{id}/progress"), |v| {
            v["state"] == "done"
        })
        .await;
        wait_cloud(&c, &g, &format!("ota/{id}/success"), |v| {
            v["sha256"] == sha.as_str()
        })
        .await;
    }
    // Status via a cloud command and via the local HTTP API.
    command(&c, "cmd/ota/status", &json!({"rollout": "r1", "id": 7})).await;
    let st = wait_cloud(&c, &g, "ota/_gateway/status", |v| v["id"] == 7).await;
    assert_eq!(st["states"]["done"], 50, "{st}");
    let dev = g.get("/ota/status/device/dev03").unwrap();
    let dev: Json = serde_json::from_str(&dev).unwrap();
    assert_eq!(dev["state"], "done");
    assert_eq!(dev["received"], img.len());

    let served = metric_or_zero(&g, "fieldgate_ota_served_bytes_total{via=\"mqtt\"}")
        + metric_or_zero(&g, "fieldgate_ota_served_bytes_total{via=\"http\"}");
    assert!(served >= 50.0 * img.len() as f64, "served {served}");
    assert_eq!(
        g.metric("fieldgate_ota_fetch_bytes_total"),
        img.len() as f64
    );
    assert_no_chunks_in_cloud(&c, img.len());
}
