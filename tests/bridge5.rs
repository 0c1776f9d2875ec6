//! The bridge speaking MQTT 5 to the cloud (`cloud.protocol = "5"`), end to end: the real
//! gateway binary, devices publishing sequence numbers to its broker, and over mutual TLS a
//! real MQTT 5 cloud: Debian's mosquitto (through a cuttable proxy where a test cuts the
//! link), or a scripted MQTT 5 broker over TLS for the refusal mosquitto does not make on
//! demand (quota exceeded). Cloud subscribers are MQTT 5 clients and read the properties.
//! Nothing here asserts a timing: deadlines only bound the waiting.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::cloud5::{Collector5, ScriptedCloud};
use common::*;
use rumqttc::v5::mqttbytes::QoS as QoS5;

const WAIT: Duration = Duration::from_secs(90);
/// `store.max_age` at its default (7 days), in seconds.
const MAX_AGE: u32 = 7 * 24 * 3600;

/// mosquitto playing the cloud with `acl`, a proxy in front of it, a data dir and ports.
struct Setup {
    pki: Pki,
    cloud: Cloud,
    proxy: Proxy,
    ports: GatewayPorts,
    data: tempfile::TempDir,
}

async fn setup(acl: &str) -> Setup {
    let pki = Pki::new();
    let cloud = Cloud::mosquitto_with_acl(&pki, &pki.server, acl);
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
    /// Bridged to the proxy over MQTT 5, every other key at its default.
    fn config(&self) -> GatewayConfig {
        GatewayConfig::bridged(&self.pki, &self.ports, self.data.path(), self.proxy.port)
            .set("cloud.protocol", "5")
    }
    async fn gateway(&self) -> Gateway {
        let gw = Gateway::start(&self.config().to_toml(), &self.ports).await;
        assert!(
            eventually(WAIT, || gw.metric("fieldgate_cloud_connected") == 1.0).await,
            "{}",
            gw.log_text()
        );
        gw
    }
    async fn collector(&self) -> Collector5 {
        Collector5::start(&self.pki, self.cloud.port, "fieldgate/gw1/#").await
    }
}

/// Telemetry arrives over MQTT 5 with its message expiry and user properties; commands come
/// down, including one sent while the link was cut (the broker kept the session).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_telemetry_carries_expiry_and_user_properties_and_commands_come_down() {
    let s = setup("topic readwrite #\n").await;
    let col = s.collector().await;
    let gw = s.gateway().await;
    let n = 200;
    tokio::join!(
        publish_seq(s.ports.mqtt, "a", 0..n, 32),
        publish_seq(s.ports.mqtt, "b", 0..n, 32)
    );
    let r = col
        .wait_for(WAIT, |r| r.total_unique() == 2 * n as usize)
        .await;
    for src in ["a", "b"] {
        let missing = r.missing(src, 0..n);
        assert!(
            missing.is_empty(),
            "{src}: missing {missing:?}\n{}",
            gw.log_text()
        );
    }
    assert_eq!(r.reordered(), 0, "{r:?}");
    let msgs = col.on_topic("fieldgate/gw1/dev/a/data");
    assert_eq!(msgs.len(), n as usize);
    for m in &msgs {
        assert_eq!(m.user("gateway"), Some("gw1"), "{m:?}");
        let at = m.user("accepted_at").expect("accepted_at user property");
        let accepted = humantime::parse_rfc3339(at).expect("accepted_at is RFC 3339");
        // Accepted before it was read, and the same clock stamped it.
        let age = std::time::SystemTime::now()
            .duration_since(accepted)
            .expect("accepted_at is not in the future");
        let expiry = m.expiry.expect("message_expiry_interval");
        // What is left of store.max_age: at most all of it, and no less than what its age
        // (queue and broker together) leaves, rounded up.
        assert!(expiry <= MAX_AGE, "expiry {expiry}");
        assert!(
            expiry as u64 + age.as_secs() + 1 >= MAX_AGE as u64,
            "expiry {expiry} for a record {age:?} old"
        );
    }
    assert!(eventually(WAIT, || gw.metric("fieldgate_queue_records") == 0.0).await);
    assert_eq!(gw.metric("fieldgate_messages_out_total"), (2 * n) as f64);

    // Downlink: a command over MQTT 5.
    let local = LocalSub::start(s.ports.mqtt, "cmd/#", rumqttc::QoS::AtLeastOnce).await;
    col.client
        .publish("fieldgate/gw1/cmd/first", QoS5::AtLeastOnce, false, "go")
        .await
        .unwrap();
    assert!(
        eventually(WAIT, || local.on("cmd/first") == [b"go".to_vec()]).await,
        "{}",
        gw.log_text()
    );
    // Cut the link; a command sent meanwhile waits in the broker's session for the gateway.
    s.proxy.cut();
    assert!(eventually(WAIT, || gw.metric("fieldgate_cloud_connected") == 0.0).await);
    col.client
        .publish(
            "fieldgate/gw1/cmd/while-down",
            QoS5::AtLeastOnce,
            false,
            "later",
        )
        .await
        .unwrap();
    // The broker has it (the collector, subscribed to fieldgate/gw1/#, got it back) before
    // the gateway can reconnect.
    assert!(
        eventually(WAIT, || col.on_topic("fieldgate/gw1/cmd/while-down").len()
            == 1)
        .await
    );
    s.proxy.restore();
    assert!(
        eventually(WAIT, || local.on("cmd/while-down") == [b"later".to_vec()]).await,
        "the command sent during the outage never came down\n{}",
        gw.log_text()
    );
    assert_eq!(gw.metric("fieldgate_bridge_dead_letters_kept"), 0.0);
}

/// The same over rumqttd's MQTT 5 listener (in process): everything arrives, in order, with
/// the gateway's user properties.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_telemetry_arrives_through_rumqttd() {
    let pki = Pki::new();
    let cloud = Cloud::rumqttd_v5(&pki, &pki.server);
    let ports = GatewayPorts::new();
    let data = tempfile::tempdir().unwrap();
    let config =
        GatewayConfig::bridged(&pki, &ports, data.path(), cloud.port).set("cloud.protocol", "5");
    let col = Collector5::start(&pki, cloud.port, "fieldgate/gw1/#").await;
    let gw = Gateway::start(&config.to_toml(), &ports).await;
    let n = 300;
    tokio::join!(
        publish_seq(ports.mqtt, "a", 0..n, 32),
        publish_seq(ports.mqtt, "b", 0..n, 32)
    );
    let r = col
        .wait_for(WAIT, |r| r.total_unique() == 2 * n as usize)
        .await;
    for src in ["a", "b"] {
        let missing = r.missing(src, 0..n);
        assert!(
            missing.is_empty(),
            "{src}: missing {missing:?}\n{}",
            gw.log_text()
        );
    }
    assert_eq!(r.reordered(), 0, "{r:?}");
    let msgs = col.on_topic("fieldgate/gw1/dev/a/data");
    assert!(
        msgs.iter().all(|m| m.user("gateway") == Some("gw1")),
        "{:?}",
        msgs.first()
    );
    assert!(eventually(WAIT, || gw.metric("fieldgate_queue_records") == 0.0).await);
}

/// A topic the cloud denies (mosquitto's ACL: PUBACK 0x87 to an MQTT 5 client) ends in dead
/// letters, listed and counted; the records of other topics around them arrive, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_topic_ends_in_dead_letters_and_the_rest_flows_in_order() {
    let s = setup("topic readwrite #\ntopic deny fieldgate/gw1/dev/denied/#\n").await;
    let col = s.collector().await;
    let gw = s.gateway().await;
    let (n, d) = (300, 10);
    tokio::join!(
        publish_seq(s.ports.mqtt, "ok", 0..n, 32),
        publish_seq(s.ports.mqtt, "denied", 0..d, 32),
        publish_seq(s.ports.mqtt, "ok2", 0..n, 32),
    );
    let r = col
        .wait_for(WAIT, |r| r.total_unique() == 2 * n as usize)
        .await;
    for src in ["ok", "ok2"] {
        let missing = r.missing(src, 0..n);
        assert!(
            missing.is_empty(),
            "{src}: missing {missing:?}\n{}",
            gw.log_text()
        );
    }
    assert_eq!(r.reordered(), 0, "{r:?}");
    assert_eq!(r.unique("denied"), 0);
    let dead = r#"fieldgate_bridge_dead_letters_total{reason="not_authorized"}"#;
    assert!(
        eventually(WAIT, || gw.metric(dead) == d as f64).await,
        "dead letters {}\n{}",
        gw.metric(dead),
        gw.log_text()
    );
    assert_eq!(gw.metric("fieldgate_bridge_dead_letters_kept"), d as f64);
    // Off the queue, not counted as delivered.
    assert!(eventually(WAIT, || gw.metric("fieldgate_queue_records") == 0.0).await);
    assert_eq!(gw.metric("fieldgate_messages_out_total"), (2 * n) as f64);

    // Listed, a page at a time, oldest first.
    let page: serde_json::Value =
        serde_json::from_str(&gw.get("/api/v1/dead-letters?limit=4").unwrap()).unwrap();
    assert_eq!(page["kept"], d);
    let items = page["dead_letters"].as_array().unwrap();
    assert_eq!(items.len(), 4);
    for it in items {
        assert_eq!(it["topic"], "dev/denied/data");
        assert_eq!(it["reason"], "not_authorized");
        assert_eq!(it["reason_code"], 0x87);
        assert_eq!(it["size"], 32);
        assert!(it["accepted_at"].as_str().unwrap().ends_with('Z'));
        assert!(it["refused_ms"].as_u64().unwrap() >= it["accepted_ms"].as_u64().unwrap());
    }
    let next = page["next_after"].as_u64().unwrap();
    let rest: serde_json::Value = serde_json::from_str(
        &gw.get(&format!("/api/v1/dead-letters?after={next}&limit=1000"))
            .unwrap(),
    )
    .unwrap();
    let rest = rest["dead_letters"].as_array().unwrap().clone();
    assert_eq!(rest.len(), d as usize - 4);
    let seqs: Vec<u64> = items
        .iter()
        .chain(&rest)
        .map(|i| i["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    // A bad page request names the parameter and the fix.
    let bad = gw.get("/api/v1/dead-letters?limit=0").unwrap();
    assert!(bad.contains("limit") && bad.contains("1 to 1000"), "{bad}");

    // The operator drops one: it is gone from the list and the gauge.
    let body = format!("{{\"seq\": {}}}", seqs[0]);
    let (status, answer) = gw
        .post("/api/v1/dead-letters/drop", "application/json", &body)
        .unwrap();
    assert!(status.contains("200"), "{status} {answer}");
    assert_eq!(
        gw.metric("fieldgate_bridge_dead_letters_kept"),
        (d - 1) as f64
    );
    let (status, _) = gw
        .post("/api/v1/dead-letters/drop", "application/json", &body)
        .unwrap();
    assert!(status.contains("404"), "dropped once: {status}");
    // Only JSON: a form of another origin cannot drop anything.
    let (status, _) = gw
        .post(
            "/api/v1/dead-letters/drop",
            "application/x-www-form-urlencoded",
            "seq=1",
        )
        .unwrap();
    assert!(status.contains("415"), "{status}");
    let left: serde_json::Value =
        serde_json::from_str(&gw.get("/api/v1/dead-letters").unwrap()).unwrap();
    assert_eq!(left["kept"], d - 1);
    assert!(left["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i["seq"] != seqs[0]));
}

/// A record larger than the broker's maximum packet size (its CONNACK says it) is never
/// sent: it becomes a dead letter (0x95), and the records around it arrive in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_above_the_brokers_maximum_packet_size_is_a_dead_letter() {
    let pki = Pki::new();
    let cloud = Cloud::mosquitto_with(
        &pki,
        &pki.server,
        "topic readwrite #\n",
        "max_packet_size 1024\n",
    );
    let ports = GatewayPorts::new();
    let data = tempfile::tempdir().unwrap();
    let config =
        GatewayConfig::bridged(&pki, &ports, data.path(), cloud.port).set("cloud.protocol", "5");
    let col = Collector5::start(&pki, cloud.port, "fieldgate/gw1/#").await;
    let gw = Gateway::start(&config.to_toml(), &ports).await;
    let n = 100;
    tokio::join!(
        publish_seq(ports.mqtt, "small", 0..n, 64),
        publish_seq(ports.mqtt, "big", 0..3, 1500),
    );
    let r = col
        .wait_for(WAIT, |r| r.unique("small") == n as usize)
        .await;
    assert!(
        r.missing("small", 0..n).is_empty(),
        "{r:?}\n{}",
        gw.log_text()
    );
    assert_eq!(r.reordered(), 0, "{r:?}");
    let dead = r#"fieldgate_bridge_dead_letters_total{reason="packet_too_large"}"#;
    assert!(
        eventually(WAIT, || gw.metric(dead) == 3.0).await,
        "{}\n{}",
        gw.metric(dead),
        gw.log_text()
    );
    assert_eq!(r.unique("big"), 0);
    let page: serde_json::Value =
        serde_json::from_str(&gw.get("/api/v1/dead-letters").unwrap()).unwrap();
    let items = page["dead_letters"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert!(items
        .iter()
        .all(|i| i["reason_code"] == 0x95 && i["size"] == 1500));
    assert!(eventually(WAIT, || gw.metric("fieldgate_queue_records") == 0.0).await);
}

/// The cloud answers PUBACK 0x97 (quota exceeded) to the first records: the gateway backs
/// off, sends them again, and they arrive; the last copy of every record is in queue order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_exceeded_is_retried_and_arrives() {
    let pki = Pki::new();
    let cloud = ScriptedCloud::start(&pki, "/dev/", 0x97, 3).await;
    let ports = GatewayPorts::new();
    let data = tempfile::tempdir().unwrap();
    let config =
        GatewayConfig::bridged(&pki, &ports, data.path(), cloud.port).set("cloud.protocol", "5");
    let gw = Gateway::start(&config.to_toml(), &ports).await;
    let n = 50;
    publish_seq(ports.mqtt, "q", 0..n, 32).await;
    assert!(
        eventually(WAIT, || cloud.report().unique("q") == n as usize).await,
        "{:?}\n{}",
        cloud.report(),
        gw.log_text()
    );
    assert!(cloud.report().missing("q", 0..n).is_empty());
    assert_eq!(cloud.refused.load(Ordering::SeqCst), 3);
    // A refusal ends the session (several in flight may be refused in one): the gateway
    // came back and sent them again.
    assert!(cloud.connects.load(Ordering::SeqCst) >= 2);
    // Records the cloud took beside a refused one are sent again after it: the last copy
    // of each record arrived in queue order.
    let accepted = cloud.accepted.lock().unwrap().clone();
    let mut last: Vec<(usize, u64)> = Vec::new();
    for (i, (_, p)) in accepted
        .iter()
        .filter(|(t, _)| t.contains("/dev/"))
        .enumerate()
    {
        let seq: u64 = String::from_utf8_lossy(p)
            .split(':')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        last.retain(|(_, s)| *s != seq);
        last.push((i, seq));
    }
    let order: Vec<u64> = last.iter().map(|(_, s)| *s).collect();
    assert_eq!(order, (0..n).collect::<Vec<_>>(), "{accepted:?}");
    assert!(eventually(WAIT, || gw.metric("fieldgate_queue_records") == 0.0).await);
    assert_eq!(gw.metric("fieldgate_bridge_dead_letters_kept"), 0.0);
    assert!(gw.log_text().contains("0x97"), "the refusal is logged");
    assert!(gw.metric(r#"fieldgate_bridge_refused_for_now_total{reason="quota_exceeded"}"#) >= 1.0);
}

/// kill -9 with a queue under MQTT 5: everything acknowledged to the device still arrives
/// after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_loses_nothing_under_v5() {
    let s = setup("topic readwrite #\n").await;
    let col = s.collector().await;
    let gw = s.gateway().await;
    s.proxy.cut();
    assert!(eventually(WAIT, || gw.metric("fieldgate_cloud_connected") == 0.0).await);
    let n = 300;
    publish_seq(s.ports.mqtt, "k", 0..n, 64).await;
    gw.kill9();
    s.proxy.restore();
    let gw = s.gateway().await;
    let r = col.wait_for(WAIT, |r| r.unique("k") == n as usize).await;
    let missing = r.missing("k", 0..n);
    assert!(missing.is_empty(), "missing {missing:?}\n{}", gw.log_text());
    assert_eq!(r.reordered(), 0, "{r:?}");
}

/// `check-config` (the same validation as `run`) refuses an unknown `cloud.protocol`, naming
/// the key and the values it takes, and takes "5" with a session expiry.
#[test]
fn check_config_names_cloud_protocol_and_its_values() {
    let pki = Pki::new();
    let ports = GatewayPorts::new();
    let data = tempfile::tempdir().unwrap();
    let check = |protocol: &str| {
        let config = GatewayConfig::bridged(&pki, &ports, data.path(), 8883)
            .set("cloud.protocol", protocol)
            .set("cloud.session_expiry", "10m");
        let path = data.path().join("check.toml");
        std::fs::write(&path, config.to_toml()).unwrap();
        let out = fieldgate_command()
            .args(["check-config", "-c", path.to_str().unwrap()])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = check("4");
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains(r#"cloud.protocol: "4" is not supported; use one of "3.1.1", "5""#),
        "{err}"
    );
    let (code, err) = check("5");
    assert_eq!(code, Some(0), "{err}");
}
