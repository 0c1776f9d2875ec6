//! End-to-end delivery tests: devices publish sequence numbers to the real gateway binary,
//! which bridges over mutual TLS (through a cuttable loopback proxy) to a real cloud broker
//! (rumqttd by default, mosquitto with FIELDGATE_TEST_CLOUD=mosquitto). A cloud subscriber
//! counts what arrives. Nothing here asserts a timing: deadlines only bound the waiting.

mod common;

use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(90);

struct Setup {
    pki: Pki,
    cloud: Cloud,
    proxy: Proxy,
    ports: GatewayPorts,
    data: tempfile::TempDir,
}

async fn setup() -> Setup {
    let pki = Pki::new();
    let cloud = Cloud::start(&pki, &pki.server);
    let proxy = Proxy::start(cloud.port).await;
    Setup {
        pki,
        cloud,
        proxy,
        ports: GatewayPorts::new(),
        data: tempfile::tempdir().unwrap(),
    }
}

impl Setup {
    /// The gateway's config: bridged to the proxy, every other key at its default.
    fn config(&self) -> GatewayConfig {
        GatewayConfig::bridged(&self.pki, &self.ports, self.data.path(), self.proxy.port)
    }
    async fn gateway(&self, config: GatewayConfig) -> Gateway {
        Gateway::start(&config.to_toml(), &self.ports).await
    }
    async fn collector(&self) -> Collector {
        Collector::start(&self.pki, self.cloud.port, "fieldgate/gw1/#").await
    }
}

fn assert_complete(r: &Report, sources: &[&str], range: std::ops::Range<u64>, log: &str) {
    for s in sources {
        let missing = r.missing(s, range.clone());
        assert!(
            missing.is_empty(),
            "source {s}: {} missing, first {:?}\n{log}",
            missing.len(),
            &missing[..missing.len().min(10)]
        );
    }
    assert_eq!(r.reordered(), 0, "first deliveries out of order: {r:?}");
}

/// (a) Steady flow: everything arrives once, in order per source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_flow_arrives_complete_and_in_order() {
    let s = setup().await;
    let col = s.collector().await;
    let gw = s.gateway(s.config()).await;
    assert!(
        eventually(WAIT, || gw.metric("fieldgate_cloud_connected") == 1.0).await,
        "{}",
        gw.log_text()
    );
    let n = 2000;
    let srcs = ["a", "b", "c"];
    let pubs: Vec<_> = srcs
        .iter()
        .map(|src| tokio::spawn(publish_seq(s.ports.mqtt, src, 0..n, 64)))
        .collect();
    for p in pubs {
        p.await.unwrap();
    }
    let r = col
        .wait_for(WAIT, |r| r.total_unique() == 3 * n as usize)
        .await;
    assert_complete(&r, &srcs, 0..n, &gw.log_text());
    assert_eq!(r.duplicates(), 0, "no link cut, so no duplicates expected");
    // Acknowledged records leave the queue.
    assert!(eventually(WAIT, || gw.metric("fieldgate_queue_records") == 0.0).await);
    assert_eq!(gw.metric("fieldgate_messages_out_total"), (3 * n) as f64);
    // Gateway status is retained `online` on the cloud.
    assert_eq!(
        col.on_topic("fieldgate/gw1/status")
            .last()
            .map(|p| p.as_slice()),
        Some(&b"online"[..])
    );
}

/// (b) Cloud unreachable for the whole publish run, then back: all delivered, FIFO per source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_down_during_run_then_back() {
    let s = setup().await;
    s.proxy.cut();
    let col = s.collector().await;
    let gw = s.gateway(s.config()).await;
    let n = 1500;
    let srcs = ["a", "b", "c"];
    let pubs: Vec<_> = srcs
        .iter()
        .map(|src| tokio::spawn(publish_seq(s.ports.mqtt, src, 0..n, 100)))
        .collect();
    for p in pubs {
        p.await.unwrap();
    }
    assert!(
        eventually(WAIT, || gw.metric("fieldgate_queue_records")
            == (3 * n) as f64)
        .await,
        "queue depth {}",
        gw.metric("fieldgate_queue_records")
    );
    assert_eq!(col.count(), 0, "nothing can arrive while the link is cut");
    assert_eq!(gw.metric("fieldgate_cloud_connected"), 0.0);
    s.proxy.restore();
    let r = col
        .wait_for(WAIT, |r| r.total_unique() == 3 * n as usize)
        .await;
    assert_complete(&r, &srcs, 0..n, &gw.log_text());
    assert!(eventually(WAIT, || gw.metric("fieldgate_queue_records") == 0.0).await);
}

/// (c) SIGKILL while the cloud is down: after restart everything committed is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_while_cloud_down_loses_nothing_committed() {
    let s = setup().await;
    s.proxy.cut();
    let col = s.collector().await;
    let gw = s.gateway(s.config()).await;
    let n = 1500;
    let srcs = ["a", "b"];
    let pubs: Vec<_> = srcs
        .iter()
        .map(|src| tokio::spawn(publish_seq(s.ports.mqtt, src, 0..n, 100)))
        .collect();
    for p in pubs {
        p.await.unwrap();
    }
    assert!(
        eventually(WAIT, || gw.metric("fieldgate_queue_records")
            == (2 * n) as f64)
        .await
    );
    // Wait until a completed fsync covers every appended record (sequence numbers start at 1).
    let all = (2 * n) as f64;
    assert!(eventually(WAIT, || gw.metric("fieldgate_store_durable_seq") == all).await);
    gw.kill9();

    let gw = s.gateway(s.config()).await;
    assert_eq!(
        gw.metric("fieldgate_queue_records"),
        (2 * n) as f64,
        "{}",
        gw.log_text()
    );
    s.proxy.restore();
    let r = col
        .wait_for(WAIT, |r| r.total_unique() == 2 * n as usize)
        .await;
    assert_complete(&r, &srcs, 0..n, &gw.log_text());
}

/// (d) The link is cut and restored repeatedly during a run: nothing lost, first deliveries
/// in order, duplicates bounded by what can be in flight at each cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_link_loses_nothing() {
    let s = setup().await;
    let col = s.collector().await;
    let inflight = 64;
    let gw = s
        .gateway(s.config().set("cloud.max_inflight", inflight as i64))
        .await;
    let n = 4000;
    let srcs = ["a", "b", "c"];
    let pubs: Vec<_> = srcs
        .iter()
        .map(|src| tokio::spawn(publish_seq(s.ports.mqtt, src, 0..n, 64)))
        .collect();
    let mut cuts = 0u64;
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        s.proxy.cut();
        cuts += 1;
        tokio::time::sleep(Duration::from_millis(150)).await;
        s.proxy.restore();
    }
    for p in pubs {
        p.await.unwrap();
    }
    let r = col
        .wait_for(WAIT, |r| r.total_unique() == 3 * n as usize)
        .await;
    assert_complete(&r, &srcs, 0..n, &gw.log_text());
    let dups = r.duplicates();
    // Each cut can make at most the in-flight window (plus the status message) be resent.
    assert!(
        dups <= cuts * (inflight + 1),
        "duplicates {dups} above bound {}",
        cuts * (inflight + 1)
    );
    let resent = gw.metric("fieldgate_resent_total");
    assert!(
        dups as f64 <= resent,
        "every duplicate must be a counted resend: dups {dups}, resent {resent}\n{}",
        gw.log_text()
    );
    assert!(gw.metric("fieldgate_cloud_reconnects_total") >= 1.0);
    println!("flapping: cuts={cuts} duplicates={dups} resent={resent}");
}

/// Queue-full cases: cloud cut, a 1 MiB queue, and [`FULL_N`] messages of [`FULL_SIZE`]
/// bytes to come (300 more than it holds).
const FULL_SIZE: usize = 1000;
const FULL_N: u64 = 1024 * 1024 / FULL_SIZE as u64 + 300;

async fn full_queue(policy: &str) -> (Setup, Collector, Gateway) {
    let s = setup().await;
    s.proxy.cut();
    let col = s.collector().await;
    let gw = s
        .gateway(
            s.config()
                .set("store.max_bytes", 1_048_576)
                .set("store.full_policy", policy),
        )
        .await;
    (s, col, gw)
}

/// (e) Queue full, drop_oldest: whole batches are evicted from the head; every eviction is
/// counted, and what arrives is exactly the newest records, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_full_drop_oldest_counts_exactly() {
    let (s, col, gw) = full_queue("drop_oldest").await;
    let n = FULL_N;
    publish_seq(s.ports.mqtt, "a", 0..FULL_N, FULL_SIZE).await;
    let dropped = || gw.metric("fieldgate_dropped_total{reason=\"queue_full\"}");
    let queued = || gw.metric("fieldgate_queue_records");
    assert!(
        eventually(WAIT, || queued() + dropped() == n as f64).await,
        "queued {} + dropped {} != {n}",
        queued(),
        dropped()
    );
    assert!(dropped() >= 300.0, "dropped {}", dropped());
    let kept = queued() as usize;
    s.proxy.restore();
    let r = col.wait_for(WAIT, |r| r.total_unique() == kept).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // let any excess show up
    let r2 = check(&col.received.lock().unwrap());
    assert_eq!(r2.total_unique(), kept, "more than the queue held arrived");
    let src = &r.sources["a"];
    let first = *src.unique.iter().next().unwrap();
    assert_eq!(first as f64, dropped(), "the oldest were dropped");
    assert_eq!(*src.unique.iter().last().unwrap(), n - 1);
    assert_eq!(src.unique.len() as u64 + first, n);
    assert_eq!(r.reordered(), 0);
}

/// (e) Queue full, reject_new: the device gets no PUBACK while the queue is full (it is
/// held back, not dropped); once the cloud drains the queue the device carries on, and
/// every acknowledged message arrives, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_full_reject_new_holds_acks_back_and_loses_nothing() {
    let (s, col, gw) = full_queue("reject_new").await;
    let n = FULL_N;
    let port = s.ports.mqtt;
    let dev = tokio::spawn(async move { flood(port, "a", FULL_N, FULL_SIZE).await });
    let refusals = || gw.metric("fieldgate_store_refusals_total{cause=\"queue_full\"}");
    assert!(
        eventually(WAIT, || refusals() >= 1.0).await,
        "the queue never refused:\n{}",
        gw.log_text()
    );
    let health = gw.get("/health").unwrap_or_default();
    assert!(
        health.contains("\"refusing\"") && health.contains("queue_full"),
        "{health}"
    );
    let held = gw.metric("fieldgate_queue_records");
    assert!(held < n as f64, "queue holds {held} of {n}");
    s.proxy.restore();
    let acked = dev.await.unwrap();
    assert_eq!(
        acked.len() as u64,
        n,
        "every message acknowledged in the end"
    );
    let r = col.wait_for(WAIT, |r| r.total_unique() == n as usize).await;
    assert_eq!(r.missing("a", 0..n), Vec::<u64>::new());
    assert_eq!(r.reordered(), 0);
    assert_eq!(
        gw.metric("fieldgate_dropped_total{reason=\"queue_full\"}"),
        0.0
    );
}

/// Downlink: a cloud command reaches a local subscriber under the mapped topic, and is not
/// forwarded back up (loop guard).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downlink_reaches_local_device_without_looping() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let s = setup().await;
    let col = s.collector().await;
    let gw = s.gateway(s.config()).await;
    assert!(eventually(WAIT, || gw.metric("fieldgate_cloud_connected") == 1.0).await);

    let mut o = MqttOptions::new("local-device", "127.0.0.1", s.ports.mqtt);
    o.set_keep_alive(Duration::from_secs(30));
    let (dev, mut el) = AsyncClient::new(o, 10);
    dev.subscribe("cmd/dev1/#", QoS::AtLeastOnce).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(10);
    tokio::spawn(async move {
        while let Ok(ev) = el.poll().await {
            let _ = tx.send(ev).await;
        }
    });
    // Wait for the local SUBACK, then the cloud (after the bridge subscribed) sends commands
    // until one arrives: the bridge's SUBSCRIBE may land just after CONNACK.
    loop {
        if let Some(Event::Incoming(Packet::SubAck(_))) = rx.recv().await {
            break;
        }
    }
    let mut got = None;
    for _ in 0..100 {
        col.client
            .publish(
                "fieldgate/gw1/cmd/dev1/reboot",
                QoS::AtLeastOnce,
                false,
                "now",
            )
            .await
            .unwrap();
        let wait = tokio::time::timeout(Duration::from_millis(300), async {
            loop {
                if let Some(Event::Incoming(Packet::Publish(p))) = rx.recv().await {
                    return p;
                }
            }
        })
        .await;
        if let Ok(p) = wait {
            got = Some(p);
            break;
        }
    }
    let p = got.expect("command never reached the local device");
    assert_eq!(p.topic, "cmd/dev1/reboot");
    assert_eq!(&p.payload[..], b"now");
    assert!(gw.metric("fieldgate_downlink_messages_total") >= 1.0);
    // It was not queued for the cloud: nothing of it is in the queue or counted in.
    assert_eq!(gw.metric("fieldgate_messages_in_total"), 0.0);
}

/// Loop guard when the operator forwards everything, including the command topics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loop_guard_counts_what_would_bounce() {
    let s = setup().await;
    let gw = s
        .gateway(
            s.config()
                .set("uplink.forward", vec!["#"])
                .set("uplink.exclude", Vec::<String>::new()),
        )
        .await;
    // A local app publishes on a topic whose cloud topic the downlink subscribes to.
    let mut o = rumqttc::MqttOptions::new("local-app", "127.0.0.1", s.ports.mqtt);
    o.set_keep_alive(Duration::from_secs(30));
    let (c, mut el) = rumqttc::AsyncClient::new(o, 10);
    c.publish("cmd/dev1/x", rumqttc::QoS::AtLeastOnce, false, "y")
        .await
        .unwrap();
    c.publish("dev/z/data", rumqttc::QoS::AtLeastOnce, false, "z:0:")
        .await
        .unwrap();
    let mut acks = 0;
    while acks < 2 {
        if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) = el.poll().await {
            acks += 1;
        }
    }
    assert!(
        eventually(WAIT, || gw
            .metric("fieldgate_dropped_total{reason=\"loop\"}")
            == 1.0)
        .await
    );
    assert!(eventually(WAIT, || gw.metric("fieldgate_messages_in_total") == 1.0).await);
}

/// SIGTERM while the cloud is down: clean exit 0, the queue survives the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_commits_and_exits_cleanly() {
    let s = setup().await;
    s.proxy.cut();
    let gw = s.gateway(s.config()).await;
    publish_seq(s.ports.mqtt, "a", 0..500, 50).await;
    assert!(eventually(WAIT, || gw.metric("fieldgate_queue_records") == 500.0).await);
    let (status, log) = gw.terminate();
    assert!(status.success(), "exit {status}\n{log}");
    assert!(log.contains("queue committed"), "{log}");
    let gw = s.gateway(s.config()).await;
    assert_eq!(gw.metric("fieldgate_queue_records"), 500.0);
    let col = s.collector().await;
    s.proxy.restore();
    let r = col.wait_for(WAIT, |r| r.total_unique() == 500).await;
    assert_complete(&r, &["a"], 0..500, &gw.log_text());
}

/// SIGTERM in the middle of a flood: every message the broker acknowledged to a device before
/// the gateway stopped is in the queue after the restart and reaches the cloud.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_nothing_acknowledged() {
    let s = setup().await;
    s.proxy.cut();
    let gw = s.gateway(s.config()).await;
    let srcs = ["f1", "f2", "f3"];
    let floods: Vec<_> = srcs
        .iter()
        .map(|src| tokio::spawn(flood(s.ports.mqtt, src, 1_000_000, 100)))
        .collect();
    // Stop while the devices are still pushing as fast as they can.
    assert!(eventually(WAIT, || gw.metric("fieldgate_queue_records") >= 6000.0).await);
    let (status, log) = gw.terminate();
    assert!(status.success(), "exit {status}\n{log}");
    let mut acked = Vec::new();
    for f in floods {
        acked.push(f.await.unwrap());
    }
    let total: usize = acked.iter().map(|a| a.len()).sum();
    assert!(total >= 6000, "only {total} acknowledged");

    let gw = s.gateway(s.config()).await;
    let col = s.collector().await;
    s.proxy.restore();
    let r = col
        .wait_for(WAIT, |r| {
            srcs.iter().zip(&acked).all(|(src, a)| {
                a.iter()
                    .all(|q| r.sources.get(*src).is_some_and(|x| x.unique.contains(q)))
            })
        })
        .await;
    for (src, a) in srcs.iter().zip(&acked) {
        let missing: Vec<u64> = a
            .iter()
            .copied()
            .filter(|q| !r.sources.get(*src).is_some_and(|x| x.unique.contains(q)))
            .collect();
        assert!(
            missing.is_empty(),
            "source {src}: {} of {} acknowledged messages lost, first {:?}\n{log}\n--- after restart ---\n{}",
            missing.len(),
            a.len(),
            &missing[..missing.len().min(10)],
            gw.log_text()
        );
    }
    assert_eq!(r.reordered(), 0, "first deliveries out of order: {r:?}");
}

/// Replay pacing holds the configured rate while a topic without backlog still goes live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_replay_does_not_starve_live_topics() {
    let s = setup().await;
    s.proxy.cut();
    let col = s.collector().await;
    let gw = s
        .gateway(s.config().set("cloud.replay_msgs_per_sec", 200))
        .await;
    publish_seq(s.ports.mqtt, "old", 0..1000, 50).await;
    assert!(eventually(WAIT, || gw.metric("fieldgate_queue_records") == 1000.0).await);
    s.proxy.restore();
    assert!(eventually(WAIT, || gw.metric("fieldgate_cloud_connected") == 1.0).await);
    // A new source publishes while the paced backlog drains (1000 at 200/s: ~5 s).
    publish_seq(s.ports.mqtt, "new", 0..50, 50).await;
    let r = col.wait_for(WAIT, |r| r.unique("new") == 50).await;
    assert_eq!(r.unique("new"), 50);
    assert!(
        r.unique("old") < 1000,
        "live source finished only after the whole backlog: the live lane was starved"
    );
    let r = col.wait_for(WAIT, |r| r.unique("old") == 1000).await;
    assert_complete(&r, &["old", "new"], 0..50, &gw.log_text());
    assert!(r.missing("old", 0..1000).is_empty());
    assert!(gw.metric("fieldgate_sent_live_total") >= 50.0);
}

/// A queue directory that sled cannot open is moved aside with a loud error; the gateway
/// starts with what can be salvaged instead of crash-looping (here sled's log is garbage,
/// but the write-ahead file still holds the 10 records, which were never checkpointed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_queue_is_moved_aside_not_crash_looped() {
    let s = setup().await;
    s.proxy.cut();
    let gw = s.gateway(s.config()).await;
    publish_seq(s.ports.mqtt, "a", 0..10, 10).await;
    assert!(eventually(WAIT, || gw.metric("fieldgate_store_durable_seq") == 10.0).await);
    gw.kill9();
    let q = s.data.path().join("queue");
    std::fs::write(q.join("conf"), b"garbage, not a sled config").unwrap();
    std::fs::write(q.join("db"), vec![0xA5u8; 64 * 1024]).unwrap();

    let gw = s.gateway(s.config()).await;
    let log = gw.log_text();
    assert_eq!(gw.metric("fieldgate_store_quarantined"), 1.0, "{log}");
    assert!(log.contains("moved aside"), "{log}");
    assert_eq!(gw.metric("fieldgate_queue_records"), 10.0, "{log}");
    let moved = std::fs::read_dir(s.data.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("queue.damaged-")
        });
    assert!(moved, "damaged queue not kept for inspection");
    // And it works: new messages are queued.
    publish_seq(s.ports.mqtt, "b", 0..5, 10).await;
    assert!(eventually(WAIT, || gw.metric("fieldgate_queue_records") == 15.0).await);
}

/// Accounting is exact whatever the broker's in-memory logs: the queue is fed before the
/// router sees a message, so with almost no router memory every message a device got a
/// PUBACK for is in the queue (there is no "broker overrun" loss any more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_message_is_queued_or_counted() {
    let s = setup().await;
    s.proxy.cut();
    let ports = &s.ports;
    let config = s.config().with(
        "broker",
        toml::toml! {
            segment_bytes = 65536
            max_payload_size = 65536
            segment_count = 2
        },
    );
    let gw = s.gateway(config).await;
    let n = 20_000u64;
    let pubs: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|src| tokio::spawn(publish_seq(ports.mqtt, src, 0..n, 200)))
        .collect();
    for p in pubs {
        p.await.unwrap();
    }
    // Acknowledged means durable: the count is complete the moment the devices are done.
    assert_eq!(gw.metric("fieldgate_messages_in_total"), (3 * n) as f64);
    assert_eq!(gw.metric("fieldgate_queue_records"), (3 * n) as f64);
}
