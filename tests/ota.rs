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
    /// The gateway's configuration: bridged to the cloud, with the `[ota]` keys these tests
    /// share (64 download slots; a test sets `ota.max_concurrent_downloads` to change that).
    fn config(&self) -> GatewayConfig {
        GatewayConfig::bridged(&self.pki, &self.ports, self.data.path(), self.cloud.port).with(
            "ota",
            toml::toml! {
                chunk_size = (CHUNK as i64)
                max_concurrent_downloads = 64
                fetch_timeout = "3s"
            },
        )
    }

    async fn gateway(&self, config: GatewayConfig) -> Gateway {
        Gateway::start(&config.to_toml(), &self.ports).await
    }

    /// The cloud side, once the gateway says `online` (it subscribes to its commands first).
    async fn collector(&self) -> Collector {
        let c = Collector::start(&self.pki, self.cloud.port, "fieldgate/gw1/#").await;
        c.wait_online(WAIT).await;
        c
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

/// Sends the cloud's `ota_upgrade` command `up` and waits until the gateway fetched and
/// verified the image.
async fn roll_out(c: &Collector, g: &Gateway, up: &Json) {
    command(c, "cmd/ota/upgrade", up).await;
    wait_cloud(c, g, "ota/_gateway/fetch", |v| v["result"] == "ok").await;
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
        "cloud never saw the expected message on {topic}; saw {:?}\nsessions closed: {}\n\
         --- gateway log ---\n{}",
        cloud_json(c, topic),
        session_counters(g),
        g.log_text()
    );
    found.unwrap_or(Json::Null)
}

/// The gateway's session and queue counters, for a failure message: tells a loss in the
/// gateway from one at the test's cloud.
fn session_counters(g: &Gateway) -> String {
    const SHOWN: [&str; 4] = [
        "fieldgate_broker_closed_total",
        "fieldgate_messages_",
        "fieldgate_queue_records",
        "fieldgate_dropped_total",
    ];
    g.get("/metrics")
        .unwrap_or_default()
        .lines()
        .filter(|l| SHOWN.iter().any(|p| l.starts_with(p)))
        .collect::<Vec<_>>()
        .join(", ")
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
    let g = s.gateway(s.config()).await;
    let c = s.collector().await;
    let ids: Vec<String> = (0..50).map(|i| format!("dev{i:02}")).collect();
    roll_out(&c, &g, &upgrade(&img, &fw.url(), &ids)).await;

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
        match t.await {
            Ok(Ok(r)) => results.push(r),
            Ok(Err(e)) => panic!("{e}\n--- gateway log ---\n{}", g.log_text()),
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
    // Status via the local HTTP API and via a cloud command.
    let mut local = Json::Null;
    let all_done = eventually(WAIT, || {
        local = g
            .get("/ota/status/rollout/r1")
            .and_then(|b| serde_json::from_str(&b).ok())
            .unwrap_or(Json::Null);
        local["states"]["done"] == 50
    })
    .await;
    assert!(all_done, "{local}");
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

/// The image the store serves first is corrupted: the gateway reports the mismatch up, serves
/// nothing, fetches again and then serves the right bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_download_is_reported_and_fetched_again() {
    let s = setup().await;
    let img = image(64 * 1024 + 5, 11);
    let sha = sha256_hex(&img);
    let fw = FirmwareServer::start(&s.pki, img.clone()).await;
    fw.corrupt_next(1);
    let g = s.gateway(s.config()).await;
    let c = s.collector().await;
    // The device asks before the image is there: it gets its metadata only once verified.
    let mut early = Session::connect(g.mqtt, "d1").await;
    command(
        &c,
        "cmd/ota/upgrade",
        &upgrade(&img, &fw.url(), &["d1".into()]),
    )
    .await;
    wait_cloud(&c, &g, "ota/_gateway/rollout", |v| v["state"] == "accepted").await;
    early.send("d1", "request", json!({"version": "1.0"})).await;
    let bad = wait_cloud(&c, &g, "ota/_gateway/fetch", |v| {
        v["result"] == "hash_mismatch"
    })
    .await;
    assert!(
        bad["error"].as_str().unwrap_or("").contains("sha256"),
        "{bad}"
    );
    wait_cloud(&c, &g, "ota/_gateway/fetch", |v| v["result"] == "ok").await;
    let (_, md) = early
        .expect("d1", &["metadata"], WAIT)
        .await
        .expect("metadata once the image is verified");
    let md: Json = serde_json::from_slice(&md).unwrap();
    assert_eq!(md["sha256"], sha.as_str());
    early.close().await;

    let r = run_device(DeviceOpts::new("d1", g.mqtt, Via::Mqtt))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", g.log_text()));
    assert_eq!(r.sha256, sha);
    assert_eq!(fw.requests().len(), 2, "{:?}", fw.requests());
    assert_eq!(
        g.metric("fieldgate_ota_fetches_total{result=\"hash_mismatch\"}"),
        1.0
    );
    assert_eq!(g.metric("fieldgate_ota_fetches_total{result=\"ok\"}"), 1.0);
}

/// The store's connection is cut mid-body: the gateway resumes with `Range: bytes=N-`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_download_resumes_with_range() {
    let s = setup().await;
    let img = image(300 * 1024 + 77, 12);
    let sha = sha256_hex(&img);
    let fw = FirmwareServer::start(&s.pki, img.clone()).await;
    let cut = 100_000u64;
    fw.cut_next_after(cut);
    let g = s.gateway(s.config()).await;
    let c = s.collector().await;
    roll_out(&c, &g, &upgrade(&img, &fw.url(), &["d1".into()])).await;
    let reqs = fw.requests();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(reqs[0].range, None);
    assert_eq!(
        reqs[1].range.as_deref(),
        Some(format!("bytes={cut}-").as_str())
    );
    assert_eq!(
        fw.body_bytes.load(std::sync::atomic::Ordering::SeqCst),
        img.len() as u64,
        "every byte crossed the uplink once"
    );
    let r = run_device(DeviceOpts::new("d1", g.mqtt, Via::Http))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", g.log_text()));
    assert_eq!(r.sha256, sha);
    // The cut is logged as what happened, not as a TLS library's message.
    let log = g.log_text();
    let said = format!("connection closed after {cut} of {} bytes", img.len());
    assert!(log.contains(&said), "want {said:?} in the log:\n{log}");
    assert!(
        !log.contains("docs.rs"),
        "a library's help link in the log:\n{log}"
    );
}

/// Bad requests get a clear error reply on the device's topic and are counted; another
/// device keeps being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_error_replies_and_others_keep_going() {
    let s = setup().await;
    let img = image(40 * 1024, 13);
    let sha = sha256_hex(&img);
    let fw = FirmwareServer::start(&s.pki, img.clone()).await;
    let g = s.gateway(s.config()).await;
    let c = s.collector().await;
    // A malformed command is refused with a reason for the cloud.
    c.client
        .publish(
            "fieldgate/gw1/cmd/ota/upgrade",
            QoS::AtLeastOnce,
            false,
            b"{not json".to_vec(),
        )
        .await
        .unwrap();
    let e = wait_cloud(&c, &g, "ota/_gateway/error", |v| v["code"] == "malformed").await;
    assert_eq!(e["request"], "cmd/ota/upgrade");
    roll_out(
        &c,
        &g,
        &upgrade(&img, &fw.url(), &["d1".into(), "d2".into()]),
    )
    .await;

    let mut stranger = Session::connect(g.mqtt, "stranger").await;
    stranger
        .send("stranger", "request", json!({"version": "1.0"}))
        .await;
    let (_, p) = stranger
        .expect("stranger", &["error"], WAIT)
        .await
        .expect("error reply");
    let e: Json = serde_json::from_slice(&p).unwrap();
    assert_eq!(
        (e["code"].as_str(), e["request"].as_str()),
        (Some("not_assigned"), Some("request"))
    );
    stranger
        .send(
            "stranger",
            "chunk/get",
            json!({"version": "2.0", "index": 0}),
        )
        .await;
    let (_, p) = stranger
        .expect("stranger", &["error", "chunk/0"], WAIT)
        .await
        .expect("error reply");
    let e: Json = serde_json::from_slice(&p).unwrap();
    assert_eq!(
        e["code"], "not_assigned",
        "an unassigned device gets no chunk"
    );

    let mut d1 = Session::connect(g.mqtt, "d1").await;
    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (
            json!({"version": "2.0", "index": 9999})
                .to_string()
                .into_bytes(),
            "chunk/get",
            "out_of_range",
        ),
        (
            json!({"version": "9.9", "index": 0})
                .to_string()
                .into_bytes(),
            "chunk/get",
            "unknown_version",
        ),
        (b"{oops".to_vec(), "chunk/get", "malformed"),
        (
            json!({"index": 0}).to_string().into_bytes(),
            "chunk/get",
            "invalid",
        ),
        (
            json!({"version": "9.9", "sha256": sha})
                .to_string()
                .into_bytes(),
            "verify",
            "unknown_version",
        ),
        (
            json!({"state": "dancing"}).to_string().into_bytes(),
            "progress",
            "invalid",
        ),
        (b"[1,2".to_vec(), "request", "malformed"),
    ];
    for (payload, kind, code) in &cases {
        d1.send_raw("d1", kind, payload.clone()).await;
        let (_, p) = d1
            .expect("d1", &["error"], WAIT)
            .await
            .unwrap_or_else(|| panic!("no error reply to {kind}"));
        let e: Json = serde_json::from_slice(&p).unwrap();
        assert_eq!(e["code"], *code, "{kind}: {e}");
        assert_eq!(e["request"], *kind, "{e}");
        assert!(!e["reason"].as_str().unwrap_or("").is_empty(), "{e}");
        if *code == "out_of_range" {
            assert_eq!(e["index"], 9999);
        }
    }
    d1.close().await;
    // Both devices are still served.
    for id in ["d1", "d2"] {
        let r = run_device(DeviceOpts::new(id, g.mqtt, Via::Mqtt))
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", g.log_text()));
        assert_eq!(r.sha256, sha);
    }
    for (kind, n) in [
        ("not_assigned", 2.0),
        ("out_of_range", 1.0),
        ("unknown_version", 2.0),
        ("malformed", 3.0),
        ("invalid", 2.0),
    ] {
        assert_eq!(
            g.metric(&format!("fieldgate_ota_errors_total{{kind=\"{kind}\"}}")),
            n,
            "{kind}"
        );
    }
    // The error replies went up too (small JSON, through the queue).
    wait_cloud(&c, &g, "ota/d1/error", |v| v["code"] == "out_of_range").await;
    assert_no_chunks_in_cloud(&c, img.len());
}

/// A gateway restart mid-rollout keeps the cache, the assignment and the device's place; the
/// store is not asked again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_restart_keeps_cache_assignments_and_progress() {
    let s = setup().await;
    let img = image(100 * 1024 + 1, 14);
    let sha = sha256_hex(&img);
    let fw = FirmwareServer::start(&s.pki, img.clone()).await;
    let g = s.gateway(s.config()).await;
    let c = s.collector().await;
    roll_out(&c, &g, &upgrade(&img, &fw.url(), &["d1".into()])).await;

    // The device takes chunks 0..=9 and reports them.
    let mut d = Session::connect(g.mqtt, "d1").await;
    d.send("d1", "request", json!({"version": "1.0"})).await;
    d.expect("d1", &["metadata"], WAIT).await.expect("metadata");
    d.send(
        "d1",
        "chunk/get",
        json!({"version": "2.0", "from": 0, "to": 9}),
    )
    .await;
    let mut got = 0;
    while got < 10 {
        d.expect(
            "d1",
            &[
                "chunk/0", "chunk/1", "chunk/2", "chunk/3", "chunk/4", "chunk/5", "chunk/6",
                "chunk/7", "chunk/8", "chunk/9",
            ],
            WAIT,
        )
        .await
        .expect("chunks 0..=9");
        got += 1;
    }
    let received = 10 * CHUNK;
    d.send(
        "d1",
        "progress",
        json!({"version": "2.0", "received": received, "total": img.len(), "state": "downloading"}),
    )
    .await;
    assert!(
        eventually(WAIT, || g
            .get("/ota/status/device/d1")
            .and_then(|b| serde_json::from_str::<Json>(&b).ok())
            .is_some_and(|v| v["received"] == received))
        .await
    );
    d.close().await;
    let (status, log) = g.terminate();
    assert!(status.success(), "{log}");

    let g = s.gateway(s.config()).await;
    let mut d = Session::connect(g.mqtt, "d1").await;
    d.send("d1", "request", json!({"version": "1.0"})).await;
    let (_, md) = d
        .expect("d1", &["metadata"], WAIT)
        .await
        .expect("metadata after restart");
    let md: Json = serde_json::from_slice(&md).unwrap();
    assert_eq!(md["sha256"], sha.as_str());
    assert_eq!(md["received"], received, "{md}");
    assert_eq!(md["next_chunk"], 10, "{md}");
    d.close().await;
    let r = run_device(DeviceOpts::new("d1", g.mqtt, Via::Http))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", g.log_text()));
    assert_eq!(r.sha256, sha);
    assert_eq!(fw.requests().len(), 1, "the store was not asked again");
    let mut st = Json::Null;
    let done = eventually(WAIT, || {
        st = g
            .get("/ota/status/rollout/r1")
            .and_then(|b| serde_json::from_str(&b).ok())
            .unwrap_or(Json::Null);
        st["states"]["done"] == 1
    })
    .await;
    assert!(done, "{st}");
    assert_eq!(st["image_state"], "ready", "{st}");
}

/// The saved device state as the next start reads it (`<data>/ota/state.json`).
fn saved_device(s: &Setup, id: &str) -> Json {
    std::fs::read(s.data.path().join("ota").join("state.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Json>(&b).ok())
        .map(|v| v["devices"][id].clone())
        .unwrap_or(Json::Null)
}

/// Issue 13, item 4: after kill -9 the resume hint in the metadata is never ahead of what the
/// device confirmed. The device was served chunks 0..=13 but confirmed only 0..=10; a device
/// trusting `next_chunk` must not skip chunks 11..=13.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_hint_after_kill9_never_runs_ahead_of_confirmed_progress() {
    let s = setup().await;
    let img = image(100 * 1024 + 1, 19);
    let sha = sha256_hex(&img);
    let fw = FirmwareServer::start(&s.pki, img.clone()).await;
    let g = s.gateway(s.config()).await;
    let c = s.collector().await;
    roll_out(&c, &g, &upgrade(&img, &fw.url(), &["d1".into()])).await;

    let mut d = Session::connect(g.mqtt, "d1").await;
    d.send("d1", "request", json!({"version": "1.0"})).await;
    d.expect("d1", &["metadata"], WAIT).await.expect("metadata");
    d.send(
        "d1",
        "chunk/get",
        json!({"version": "2.0", "from": 0, "to": 13}),
    )
    .await;
    let kinds: Vec<String> = (0..14).map(|i| format!("chunk/{i}")).collect();
    let kinds: Vec<&str> = kinds.iter().map(String::as_str).collect();
    for _ in 0..14 {
        d.expect("d1", &kinds, WAIT).await.expect("chunks 0..=13");
    }
    // The device stored only chunks 0..=10 when the gateway died.
    let confirmed = 11 * CHUNK;
    d.send(
        "d1",
        "progress",
        json!({"version": "2.0", "received": confirmed, "total": img.len(), "state": "downloading"}),
    )
    .await;
    let saved = eventually(WAIT, || saved_device(&s, "d1")["received"] == confirmed).await;
    assert!(saved, "progress never saved: {}", saved_device(&s, "d1"));
    d.close().await;
    g.kill9();

    let g = s.gateway(s.config()).await;
    let mut d = Session::connect(g.mqtt, "d1").await;
    d.send("d1", "request", json!({"version": "1.0"})).await;
    let (_, md) = d
        .expect("d1", &["metadata"], WAIT)
        .await
        .expect("metadata after kill -9");
    let md: Json = serde_json::from_slice(&md).unwrap();
    assert_eq!(md["sha256"], sha.as_str());
    assert_eq!(md["received"], confirmed, "{md}");
    assert_eq!(
        md["next_chunk"], 11,
        "the hint must be the first chunk the device did not confirm: {md}"
    );
    d.close().await;
    let r = run_device(DeviceOpts::new("d1", g.mqtt, Via::Mqtt))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", g.log_text()));
    assert_eq!(r.sha256, sha);
}

/// Issue 13, item 5: once `ota.fetch_attempts` attempts failed, the rollout stays failed
/// until the cloud issues it again: devices asking get `fetch_failed` at once, and the store
/// sees no new download; the cloud's new command starts one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_image_is_not_fetched_again_until_the_cloud_reissues_it() {
    let s = setup().await;
    let img = image(64 * 1024 + 3, 20);
    let sha = sha256_hex(&img);
    let fw = FirmwareServer::start(&s.pki, img.clone()).await;
    fw.corrupt_next(3);
    let g = s.gateway(s.config().set("ota.fetch_attempts", 3)).await;
    let c = s.collector().await;
    let up = upgrade(&img, &fw.url(), &["d1".into()]);
    command(&c, "cmd/ota/upgrade", &up).await;
    let failed = wait_cloud(&c, &g, "ota/_gateway/fetch", |v| v["result"] == "failed").await;
    assert!(
        failed["error"]
            .as_str()
            .unwrap_or("")
            .contains("3 attempts"),
        "{failed}"
    );
    assert_eq!(fw.requests().len(), 3, "{:?}", fw.requests());

    let mut d = Session::connect(g.mqtt, "d1").await;
    for _ in 0..2 {
        d.send("d1", "request", json!({"version": "1.0"})).await;
        let (_, p) = d
            .expect("d1", &["error", "metadata"], WAIT)
            .await
            .expect("an answer to the request");
        let e: Json = serde_json::from_slice(&p).unwrap();
        assert_eq!(
            (e["code"].as_str(), e["request"].as_str()),
            (Some("fetch_failed"), Some("request")),
            "{e}"
        );
        assert!(
            e["reason"].as_str().unwrap_or("").contains("attempts"),
            "{e}"
        );
        assert_eq!(
            fw.requests().len(),
            3,
            "a device request started a download: {:?}",
            fw.requests()
        );
    }
    let st: Json = serde_json::from_str(&g.get("/ota/status/rollout/r1").unwrap()).unwrap();
    assert_eq!(st["image_state"], "failed", "{st}");
    assert_eq!(
        cloud_json(&c, "ota/_gateway/fetch")
            .iter()
            .filter(|v| v["result"] == "failed")
            .count(),
        1
    );

    d.close().await;
    // The cloud issues it again: one new download, and the device is served.
    command(&c, "cmd/ota/upgrade", &up).await;
    wait_cloud(&c, &g, "ota/_gateway/fetch", |v| v["result"] == "ok").await;
    assert_eq!(fw.requests().len(), 4, "{:?}", fw.requests());
    let r = run_device(DeviceOpts::new("d1", g.mqtt, Via::Mqtt))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", g.log_text()));
    assert_eq!(r.sha256, sha);
}

/// Issue 13, item 7: the cloud sees the gateway's own download while it runs (bytes and
/// rate, rate-limited), not only at the end of each attempt, and the bytes served to each
/// device, over MQTT and over HTTP alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_reports_fetch_progress_and_bytes_served_per_device() {
    let s = setup().await;
    let img = image(256 * 1024, 22);
    let sha = sha256_hex(&img);
    let fw = FirmwareServer::start(&s.pki, img.clone()).await;
    let held = 100_000u64;
    fw.hold_next_after(held);
    let g = s.gateway(s.config()).await;
    let c = s.collector().await;
    command(
        &c,
        "cmd/ota/upgrade",
        &upgrade(&img, &fw.url(), &["dm".into(), "dh".into()]),
    )
    .await;
    // The store holds the body: whatever the cloud sees now was reported mid-download.
    let p = wait_cloud(&c, &g, "ota/_gateway/fetch_progress", |v| {
        v["received"].as_u64().is_some_and(|r| r >= held)
    })
    .await;
    assert!(
        cloud_json(&c, "ota/_gateway/fetch")
            .iter()
            .all(|v| v["result"] != "ok"),
        "the download cannot have ended while the store holds it"
    );
    assert_eq!(p["image"], sha.as_str(), "{p}");
    assert_eq!(p["total"], img.len(), "{p}");
    assert!(p["received"].as_u64().unwrap() < img.len() as u64, "{p}");
    let reports = cloud_json(&c, "ota/_gateway/fetch_progress");
    let first = reports
        .iter()
        .find(|v| v["received"].as_u64().unwrap_or(0) > 0)
        .expect("a report with bytes");
    assert!(
        first["bytes_per_sec"].as_f64().is_some_and(|r| r > 0.0),
        "the first report with bytes has a rate: {first}"
    );
    fw.release();
    wait_cloud(&c, &g, "ota/_gateway/fetch", |v| v["result"] == "ok").await;

    for (id, via) in [("dm", Via::Mqtt), ("dh", Via::Http)] {
        let r = run_device(DeviceOpts::new(id, g.mqtt, via))
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", g.log_text()));
        assert_eq!(r.sha256, sha);
    }
    let size = img.len() as u64;
    for (id, via) in [("dm", "mqtt"), ("dh", "http")] {
        let v = wait_cloud(&c, &g, "ota/_gateway/served", |v| {
            v["device"] == id && v[via].as_u64().is_some_and(|n| n >= size)
        })
        .await;
        assert_eq!(v["rollout"], "r1", "{v}");
        assert_eq!(v["total"], size, "{v}");
        assert_eq!(v["served"], v[via], "{id} was served by {via} only: {v}");
    }
    let dh: Json = serde_json::from_str(&g.get("/ota/status/device/dh").unwrap()).unwrap();
    assert!(
        dh["served"].as_u64().is_some_and(|n| n >= size),
        "device status shows what was served: {dh}"
    );
    assert_no_chunks_in_cloud(&c, img.len());
}

/// A cached image corrupted on disk while the gateway was down is detected at start,
/// reported up and fetched again before anything is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_cache_file_is_detected_and_refetched() {
    let s = setup().await;
    let img = image(50 * 1024 + 9, 15);
    let sha = sha256_hex(&img);
    let fw = FirmwareServer::start(&s.pki, img.clone()).await;
    let g = s.gateway(s.config()).await;
    let c = s.collector().await;
    roll_out(&c, &g, &upgrade(&img, &fw.url(), &["d1".into()])).await;
    g.kill9();
    let bin = s.data.path().join("ota").join(format!("{sha}.bin"));
    let mut bytes = std::fs::read(&bin).expect("cached image on disk");
    bytes[1000] ^= 0x55;
    std::fs::write(&bin, &bytes).unwrap();

    let g = s.gateway(s.config()).await;
    wait_cloud(&c, &g, "ota/_gateway/fetch", |v| {
        v["result"] == "cache_corrupt"
    })
    .await;
    assert!(
        eventually(WAIT, || fw.requests().len() == 2).await,
        "refetched: {:?}",
        fw.requests()
    );
    let r = run_device(DeviceOpts::new("d1", g.mqtt, Via::Mqtt))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", g.log_text()));
    assert_eq!(r.sha256, sha);
    assert_eq!(std::fs::read(&bin).unwrap(), img);
    assert_eq!(
        g.metric("fieldgate_ota_errors_total{kind=\"cache_corrupt\"}"),
        1.0
    );
}

/// A cloud without HTTPS pushes the image as MQTT chunks through the bridge; a rollout
/// addressed to a tag reaches a device that announces the tag and one configured with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_pushed_image_reaches_tagged_devices() {
    let s = setup().await;
    let img = image(70 * 1024 + 3, 16);
    let sha = sha256_hex(&img);
    let g = s
        .gateway(s.config().set("ota.devices.cfgdev.tags", vec!["pumps"]))
        .await;
    let c = s.collector().await;
    let push_chunk = 8192usize;
    command(
        &c,
        "cmd/ota/upgrade",
        &json!({"name": "pumpfw", "version": "3.0", "size": img.len(), "sha256": sha,
                "chunk_size": push_chunk, "tag": "pumps", "rollout": "tagged"}),
    )
    .await;
    wait_cloud(&c, &g, "ota/_gateway/rollout", |v| v["rollout"] == "tagged").await;
    // Out of order, one repeated.
    let chunks: Vec<&[u8]> = img.chunks(push_chunk).collect();
    let mut order: Vec<usize> = (0..chunks.len()).rev().collect();
    order.push(0);
    for i in order {
        c.client
            .publish(
                format!("fieldgate/gw1/cmd/ota/image/{sha}/{i}"),
                QoS::AtLeastOnce,
                false,
                chunks[i].to_vec(),
            )
            .await
            .unwrap();
    }
    wait_cloud(&c, &g, "ota/_gateway/fetch", |v| v["result"] == "ok").await;

    // "announcer" is unknown until it announces the tag in its request.
    let mut a = Session::connect(g.mqtt, "announcer").await;
    a.send(
        "announcer",
        "request",
        json!({"version": "2.0", "tags": ["pumps"]}),
    )
    .await;
    let (_, md) = a
        .expect("announcer", &["metadata"], WAIT)
        .await
        .expect("metadata");
    let md: Json = serde_json::from_slice(&md).unwrap();
    assert_eq!(md["sha256"], sha.as_str());
    assert_eq!(md["rollout"], "tagged");
    a.close().await;
    for id in ["announcer", "cfgdev"] {
        let r = run_device(DeviceOpts::new(id, g.mqtt, Via::Mqtt))
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", g.log_text()));
        assert_eq!(r.sha256, sha);
    }
    // Untagged devices are not assigned.
    let mut other = Session::connect(g.mqtt, "other").await;
    other.send("other", "request", json!({})).await;
    let (_, p) = other
        .expect("other", &["error", "metadata"], WAIT)
        .await
        .expect("reply");
    assert_eq!(
        serde_json::from_slice::<Json>(&p).unwrap()["code"],
        "not_assigned"
    );
    assert_eq!(
        g.metric("fieldgate_ota_fetch_bytes_total"),
        (img.len() + chunks[0].len()) as f64,
        "pushed bytes counted (one chunk twice)"
    );
}

/// The cache quota evicts the least recently used image that no active rollout needs; an
/// evicted image is no longer served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_quota_evicts_images_no_rollout_needs() {
    let s = setup().await;
    let a = image(600 * 1024, 17);
    let b = image(600 * 1024, 18);
    let (sha_a, sha_b) = (sha256_hex(&a), sha256_hex(&b));
    let fw_a = FirmwareServer::start(&s.pki, a.clone()).await;
    let fw_b = FirmwareServer::start(&s.pki, b.clone()).await;
    let g = s
        .gateway(s.config().set("ota.cache_max_bytes", 1_048_576))
        .await;
    let c = s.collector().await;
    let mut up = upgrade(&a, &fw_a.url(), &["d1".into()]);
    up["rollout"] = json!("ra");
    command(&c, "cmd/ota/upgrade", &up).await;
    wait_cloud(&c, &g, "ota/_gateway/fetch", |v| {
        v["result"] == "ok" && v["sha256"] == sha_a.as_str()
    })
    .await;
    let r = run_device(DeviceOpts::new("d1", g.mqtt, Via::Http))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", g.log_text()));
    assert_eq!(r.sha256, sha_a);
    // d1 is done: rollout "ra" no longer needs image A.
    assert!(
        eventually(WAIT, || g
            .get("/ota/status/rollout/ra")
            .and_then(|b| serde_json::from_str::<Json>(&b).ok())
            .is_some_and(|v| v["active"] == false))
        .await,
        "rollout ra still active: {:?}\ndevice d1: {:?}\nsessions closed: {}\n{}",
        g.get("/ota/status/rollout/ra"),
        g.get("/ota/status/device/d1"),
        session_counters(&g),
        g.log_text()
    );
    let mut up = upgrade(&b, &fw_b.url(), &["d2".into()]);
    up["rollout"] = json!("rb");
    up["version"] = json!("2.1");
    command(&c, "cmd/ota/upgrade", &up).await;
    wait_cloud(&c, &g, "ota/_gateway/fetch", |v| {
        v["result"] == "ok" && v["sha256"] == sha_b.as_str()
    })
    .await;
    let base = format!("http://127.0.0.1:{}/ota/image/", g.http);
    assert_eq!(
        http_get(&format!("{base}{sha_a}"), None).await.unwrap().0,
        404
    );
    let (st, body) = http_get(&format!("{base}{sha_b}"), None).await.unwrap();
    assert_eq!((st, sha256_hex(&body)), (200, sha_b.clone()));
    let (st, body) = http_get(&format!("{base}pumpfw/2.1"), Some("bytes=-10"))
        .await
        .unwrap();
    assert_eq!((st, body.as_slice()), (206, &b[b.len() - 10..]));
    assert_eq!(
        http_get(&format!("{base}{sha_b}"), Some("bytes=999999999-"))
            .await
            .unwrap()
            .0,
        416
    );
    assert!(!s
        .data
        .path()
        .join("ota")
        .join(format!("{sha_a}.bin"))
        .exists());
    assert_eq!(g.metric("fieldgate_ota_cache_bytes"), b.len() as f64);
}

/// Publishes `v` once at QoS 1 as `login` (None: anonymous) and waits for the PUBACK (a
/// denied publish is acknowledged too: MQTT 3.1.1 has no negative ack).
async fn local_publish(port: u16, login: Option<(&str, &str)>, topic: &str, v: &Json) {
    let id = format!("local-{}", free_port());
    let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    if let Some((u, p)) = login {
        o.set_credentials(u, p);
    }
    let (client, mut el) = rumqttc::AsyncClient::new(o, 8);
    client
        .publish(topic, QoS::AtLeastOnce, false, v.to_string().into_bytes())
        .await
        .unwrap();
    let acked = tokio::time::timeout(WAIT, async {
        loop {
            match el.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await;
    assert!(
        matches!(acked, Ok(Ok(()))),
        "{login:?} on {topic}: {acked:?}"
    );
    let _ = client.disconnect().await;
}

/// Rolling out firmware is the cloud's: a local publish on the OTA command topics is not
/// obeyed, whatever the ACL grants (`cmd/#` for `scada`, `#` for anonymous clients under the
/// default ACL), unless `ota.local_commands` names the identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_ota_commands_are_obeyed_only_from_named_identities() {
    let s = setup().await;
    let img = image(8 * 1024 + 1, 5);
    let fw = FirmwareServer::start(&s.pki, img.clone()).await;
    let accounts = s
        .config()
        .set("ota.local_commands", vec!["ops"])
        .push(
            "broker.users",
            toml::toml! { username = "scada" password = "ps" },
        )
        .push(
            "broker.users",
            toml::toml! { username = "ops" password = "po" },
        )
        .set("broker.acl.users.scada.publish", vec!["cmd/#"]);
    let g = s.gateway(accounts).await;
    let c = s.collector().await;
    let rollout = |id: &str| {
        let mut v = upgrade(&img, &fw.url(), &["d1".into()]);
        v["rollout"] = json!(id);
        v
    };
    local_publish(g.mqtt, None, "cmd/ota/upgrade", &rollout("anon")).await;
    local_publish(
        g.mqtt,
        Some(("scada", "ps")),
        "cmd/ota/upgrade",
        &rollout("scada"),
    )
    .await;
    // A forged pushed chunk is refused the same way.
    local_publish(
        g.mqtt,
        Some(("scada", "ps")),
        "cmd/ota/image/abc/0",
        &json!("x"),
    )
    .await;
    assert_eq!(
        g.metric("fieldgate_broker_denied_total{action=\"publish\"}"),
        3.0
    );
    // The named identity is obeyed, and so is the cloud.
    local_publish(
        g.mqtt,
        Some(("ops", "po")),
        "cmd/ota/upgrade",
        &rollout("ops"),
    )
    .await;
    wait_cloud(&c, &g, "ota/_gateway/rollout", |v| {
        v["rollout"] == "ops" && v["state"] == "accepted"
    })
    .await;
    command(&c, "cmd/ota/upgrade", &rollout("cloud")).await;
    wait_cloud(&c, &g, "ota/_gateway/rollout", |v| {
        v["rollout"] == "cloud" && v["state"] == "accepted"
    })
    .await;
    let seen: Vec<Json> = cloud_json(&c, "ota/_gateway/rollout");
    assert!(
        seen.iter()
            .all(|v| v["rollout"] != "anon" && v["rollout"] != "scada"),
        "{seen:?}"
    );
    assert_eq!(
        g.metric("fieldgate_broker_denied_total{action=\"publish\"}"),
        3.0
    );
}

/// Opens `GET path` from source address `from` and reads only the status line, then stops
/// reading (a hostile or broken client); returns the status and the still-open socket.
async fn stalled_get(from: &str, port: u16, path: &str) -> (u16, tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut s = sock
        .connect(format!("127.0.0.1:{port}").parse().unwrap())
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.unwrap();
    let status = std::str::from_utf8(&head[9..12]).unwrap().parse().unwrap();
    (status, s)
}

/// One address opening image downloads and never reading cannot starve the others: it gets
/// at most `ota.max_downloads_per_ip` slots (503 past them), a transfer that stalls for
/// `ota.stall_timeout` is cut, and its slot is free again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_cannot_starve_the_downloads() {
    let s = setup().await;
    // Larger than what the sockets' buffers absorb, so a client that does not read stalls.
    let img = image(24 * 1024 * 1024, 21);
    let sha = sha256_hex(&img);
    let fw = FirmwareServer::start(&s.pki, img.clone()).await;
    let g = s
        .gateway(
            s.config()
                .set("ota.max_downloads_per_ip", 2)
                .set("ota.stall_timeout", "1s"),
        )
        .await;
    let c = s.collector().await;
    roll_out(&c, &g, &upgrade(&img, &fw.url(), &["d1".into()])).await;
    let path = format!("/ota/image/{sha}");
    let (a, _ha) = stalled_get("127.0.0.2", g.http, &path).await;
    let (b, _hb) = stalled_get("127.0.0.2", g.http, &path).await;
    let (c3, _hc) = stalled_get("127.0.0.2", g.http, &path).await;
    assert_eq!((a, b, c3), (200, 200, 503));
    // Another address still downloads the whole image.
    let (st, body) = http_get(&format!("http://127.0.0.1:{}{path}", g.http), None)
        .await
        .unwrap();
    assert_eq!((st, sha256_hex(&body)), (200, sha.clone()));
    // The stalled transfers are cut and counted, their slots free again.
    let cut = eventually(WAIT, || {
        metric_or_zero(&g, "fieldgate_ota_errors_total{kind=\"http_stalled\"}") == 2.0
    })
    .await;
    assert!(cut, "stalled transfers not cut:\n{}", g.log_text());
    for _ in 0..3 {
        let (st, _) = http_get(
            &format!("http://127.0.0.1:{}{path}", g.http),
            Some("bytes=0-9"),
        )
        .await
        .unwrap();
        assert_eq!(st, 206);
    }
    assert_eq!(
        metric_or_zero(&g, "fieldgate_ota_errors_total{kind=\"busy_per_ip\"}"),
        1.0
    );
}

/// A device's metadata over its session.
async fn metadata_of(sess: &mut Session, id: &str) -> Json {
    sess.send(id, "request", json!({})).await;
    let (k, p) = sess
        .expect(id, &["metadata", "error"], WAIT)
        .await
        .expect("no answer to request");
    assert_eq!(k, "metadata", "{}", String::from_utf8_lossy(&p));
    serde_json::from_slice(&p).unwrap()
}

/// `chunk/get` of chunk `i`: `Ok(bytes)` or `Err(busy reply)`.
async fn mqtt_chunk(sess: &mut Session, id: &str, i: u64) -> Result<Vec<u8>, Json> {
    sess.send(id, "chunk/get", json!({"version": "2.0", "index": i}))
        .await;
    let chunk = format!("chunk/{i}");
    let (k, p) = sess
        .expect(id, &[chunk.as_str(), "error"], WAIT)
        .await
        .expect("no chunk and no error");
    if k == "error" {
        let e: Json = serde_json::from_slice(&p).unwrap();
        assert_eq!(e["code"], "busy", "{e}");
        return Err(e);
    }
    Ok(p)
}

/// A `Range` GET of chunk `i` from the metadata `url`: `Ok(bytes)` or `Err(503 JSON body)`,
/// whose `retry_after` equals the `Retry-After` header.
async fn http_chunk(url: &str, i: u64) -> Result<Vec<u8>, Json> {
    let range = format!("bytes={}-{}", i * CHUNK, (i + 1) * CHUNK - 1);
    let (st, head, body) = http_get_head(url, Some(&range)).await.unwrap();
    match st {
        206 => Ok(body),
        503 => {
            let v: Json = serde_json::from_slice(&body)
                .unwrap_or_else(|_| panic!("503 without a JSON body: {head}\r\n\r\n{body:?}"));
            let header: Option<u64> = head_value(&head, "retry-after").and_then(|v| v.parse().ok());
            assert_eq!(v["code"], "busy", "{v}");
            assert_eq!(header, v["retry_after"].as_u64(), "{head}\n{v}");
            Err(v)
        }
        st => panic!("HTTP {st}: {head}"),
    }
}

/// Asserts a chunk request got `want`, with a short message (not 4 KiB of bytes).
fn assert_chunk(got: Result<Vec<u8>, Json>, want: Vec<u8>, what: &str) {
    match got {
        Ok(b) => assert!(b == want, "{what}: wrong bytes"),
        Err(e) => panic!("{what}: refused: {e}"),
    }
}

/// Asserts a chunk request was refused with `busy` and returns the answer.
fn assert_wait(got: Result<Vec<u8>, Json>, what: &str) -> Json {
    match got {
        Ok(_) => panic!("{what}: got a slot"),
        Err(e) => e,
    }
}

/// The gauge `name` reaches `want` (it is refreshed every 0.5 s).
async fn wait_gauge(g: &Gateway, name: &str, want: f64) {
    let ok = eventually(WAIT, || metric_or_zero(g, name) == want).await;
    assert!(
        ok,
        "{name} never {want}:\n{}",
        g.get("/metrics").unwrap_or_default()
    );
}

/// With two download slots: a device that started (over MQTT or HTTP with `?device=`) keeps
/// its slot across its requests until it reports `done`; a device that finds none is told to
/// wait with a bounded `retry_after` and its place in line (MQTT `busy` reply; HTTP 503 with
/// `Retry-After` and a JSON body), and a freed slot goes to the device that asked first, not
/// to the one that happens to ask next. Then six devices at once in many small requests over
/// both paths: none is refused mid-download, all wait when told and verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_keeps_its_slot_until_done_and_the_others_wait_their_turn() {
    let s = setup().await;
    let img = image(256 * 1024 + 77, 31);
    let sha = sha256_hex(&img);
    let fw = FirmwareServer::start(&s.pki, img.clone()).await;
    // Every device comes from 127.0.0.1: the per-address share must not be what limits them.
    let g = s
        .gateway(
            s.config()
                .set("ota.max_concurrent_downloads", 2)
                .set("ota.max_downloads_per_ip", 6),
        )
        .await;
    let c = s.collector().await;
    let ids: Vec<String> = (0..10).map(|i| format!("q{i}")).collect();
    roll_out(&c, &g, &upgrade(&img, &fw.url(), &ids)).await;
    let part = |i: u64| img[(i * CHUNK) as usize..((i + 1) * CHUNK) as usize].to_vec();

    // q0 (MQTT) and q1 (HTTP) take the two slots.
    let mut a = Session::connect(g.mqtt, "q0").await;
    metadata_of(&mut a, "q0").await;
    assert_chunk(
        mqtt_chunk(&mut a, "q0", 0).await,
        part(0),
        "q0 (MQTT) takes a slot",
    );
    let mut b = Session::connect(g.mqtt, "q1").await;
    let b_url = metadata_of(&mut b, "q1").await["url"]
        .as_str()
        .unwrap()
        .to_string();
    assert_chunk(
        http_chunk(&b_url, 0).await,
        part(0),
        "q1 (HTTP) takes a slot",
    );
    // q2 (HTTP) asks first, then q3 (MQTT): both wait, in that order.
    let mut cq = Session::connect(g.mqtt, "q2").await;
    let c_url = metadata_of(&mut cq, "q2").await["url"]
        .as_str()
        .unwrap()
        .to_string();
    let mut d = Session::connect(g.mqtt, "q3").await;
    metadata_of(&mut d, "q3").await;
    let wc = assert_wait(
        http_chunk(&c_url, 0).await,
        "q2 (HTTP) while q0 and q1 hold both slots",
    );
    let wd = assert_wait(
        mqtt_chunk(&mut d, "q3", 0).await,
        "q3 (MQTT) while q0 and q1 hold both slots",
    );
    for w in [&wc, &wd] {
        let ra = w["retry_after"].as_u64().unwrap_or(0);
        assert!((1..=30).contains(&ra), "{w}");
    }
    assert_eq!(
        (wc["position"].as_u64(), wd["position"].as_u64()),
        (Some(1), Some(2))
    );
    // The holders go on, many requests each, never refused.
    for i in 1..8 {
        assert_chunk(
            mqtt_chunk(&mut a, "q0", i).await,
            part(i),
            &format!("q0 chunk {i}"),
        );
        assert_chunk(
            http_chunk(&b_url, i).await,
            part(i),
            &format!("q1 range {i}"),
        );
    }
    // q0 is done: its slot is kept for q2, who asked first, even though q3 asks before it.
    a.send("q0", "progress", json!({"version": "2.0", "state": "done"}))
        .await;
    wait_gauge(&g, "fieldgate_ota_active_downloads", 1.0).await;
    let wd = assert_wait(
        mqtt_chunk(&mut d, "q3", 0).await,
        "q3, second in line, before q2 came back",
    );
    assert_eq!(wd["position"].as_u64(), Some(2), "{wd}");
    assert_chunk(
        http_chunk(&c_url, 0).await,
        part(0),
        "q2, first in line, gets the slot q0 freed",
    );
    // q1 is done (over MQTT, though it downloads by HTTP): q3's turn.
    b.send("q1", "progress", json!({"version": "2.0", "state": "done"}))
        .await;
    wait_gauge(&g, "fieldgate_ota_active_downloads", 1.0).await;
    wait_gauge(&g, "fieldgate_ota_waiting_devices", 1.0).await;
    assert_chunk(
        mqtt_chunk(&mut d, "q3", 0).await,
        part(0),
        "q3 gets the slot q1 freed",
    );
    for (sess, id) in [(&cq, "q2"), (&d, "q3")] {
        sess.send(
            id,
            "progress",
            json!({"version": "2.0", "state": "failed", "error": "test"}),
        )
        .await;
    }
    wait_gauge(&g, "fieldgate_ota_active_downloads", 0.0).await;
    wait_gauge(&g, "fieldgate_ota_waiting_devices", 0.0).await;
    for sess in [a, b, cq, d] {
        sess.close().await;
    }

    // Six devices at once, two slots: 65 ranges of one chunk, or 33 windows of two chunks.
    let mut tasks = Vec::new();
    for (i, id) in ids[4..].iter().enumerate() {
        let via = if i % 2 == 0 { Via::Http } else { Via::Mqtt };
        let mut o = DeviceOpts::new(id, g.mqtt, via);
        o.window = if via == Via::Http { CHUNK } else { 2 };
        o.deadline = Duration::from_secs(240);
        tasks.push((via, tokio::spawn(run_device(o))));
    }
    let mut busy = 0;
    for (via, t) in tasks {
        let r = match t.await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => panic!("{e}\n--- gateway log ---\n{}", g.log_text()),
            Err(e) => panic!("{e}\n--- gateway log ---\n{}", g.log_text()),
        };
        assert_eq!(r.sha256, sha, "{} reassembled a different image", r.id);
        assert!(r.success, "{} got no success", r.id);
        let mid: Vec<_> = r.busy.iter().filter(|b| b.started).collect();
        assert!(mid.is_empty(), "{} was refused mid-download: {mid:?}", r.id);
        for b in &r.busy {
            let ra = b.retry_after.unwrap_or(0);
            assert!((1..=30).contains(&ra), "{}: {}", r.id, b.raw);
            if via == Via::Http {
                assert_eq!(b.header, b.retry_after, "{}: {}", r.id, b.raw);
            }
        }
        busy += r.busy.len();
    }
    assert!(
        metric_or_zero(&g, "fieldgate_ota_errors_total{kind=\"busy\"}") >= 2.0 + busy as f64,
        "every busy answer is counted"
    );
    wait_gauge(&g, "fieldgate_ota_active_downloads", 0.0).await;
    wait_gauge(&g, "fieldgate_ota_waiting_devices", 0.0).await;
    assert_eq!(fw.requests().len(), 1);
}
