//! Sparkplug B end to end: the real gateway polls a tokio-modbus server and speaks Sparkplug
//! to a real TLS cloud broker (rumqttd in-process, or mosquitto with
//! `FIELDGATE_TEST_CLOUD=mosquitto`); a cloud-side client plays the host application, and
//! everything it receives is decoded by Eclipse Tahu's JavaScript codec
//! ([`common::tahu`]), never by the code under test. Commands are encoded by Tahu too.
//!
//! What is checked, per the Sparkplug 3.0 rules: NBIRTH first with `seq` 0 and the
//! connection's `bdSeq`, `seq` continuous modulo 256 within a session, no DDATA before its
//! device's DBIRTH, the NDEATH will on kill -9 with the same `bdSeq`, the next connection's
//! `bdSeq` one higher, a rebirth on NCMD, a DCMD write reaching the Modbus server and its
//! result in the next DDATA, and the primary host's STATE holding the edge node back.
//! Deadlines only bound the waiting.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::modbus_sim::{layout, serve_tcp, Served, Sim};
use common::*;
use rumqttc::QoS;
use serde_json::{json, Value as Json};
use toml::toml;

const WAIT: Duration = Duration::from_secs(40);
const COUNT_REG: u16 = 20;

/// The device's registers: every metric has a known value.
fn meter_sim() -> Sim {
    let sim = Sim::new();
    sim.set_holding(1, 0, &layout(&21.5f32.to_be_bytes(), "ABCD"));
    sim.set_holding(1, 2, &[(-3i16) as u16]);
    sim.set_holding(1, 4, &layout(&4_000_000_000u32.to_be_bytes(), "ABCD"));
    sim.set_holding(1, 6, &[123]);
    sim.set_holding(1, 10, &[u16::from_be_bytes(*b"OK"), 0]);
    sim.set_holding(1, COUNT_REG, &[0]);
    sim.with(1, |u| {
        u.coils.insert(0, true);
    });
    sim
}

fn meter(port: u16) -> ModbusDevice {
    ModbusDevice::tcp("meter", port)
        .with(toml! { poll_interval = "100ms" })
        .tag_with("power", 0, toml! { type = "f32" unit = "W" })
        .tag_with("setpoint", 2, toml! { type = "i16" writable = true })
        .tag_with("total", 4, toml! { type = "u32" })
        .tag_with("scaled", 6, toml! { scale = 0.1 })
        .tag_with("label", 10, toml! { type = "string" length = 4 })
        .tag("count", COUNT_REG as u32)
        .tag_with("run", 0, toml! { kind = "coil" writable = true })
}

/// The Sparkplug type Tahu must report for each metric.
const TYPES: [(&str, &str); 7] = [
    ("power", "Float"),
    ("setpoint", "Int16"),
    ("total", "UInt32"),
    ("scaled", "Double"),
    ("label", "String"),
    ("count", "UInt16"),
    ("run", "Boolean"),
];

/// The parts of one test: the Modbus server, the cloud (behind a proxy the test can cut,
/// if asked), the host application, and the gateway's config with `[sparkplug]` plus
/// `sparkplug` keys.
struct Rig {
    sim: Sim,
    _srv: Served,
    _pki: Pki,
    _cloud: Cloud,
    proxy: Option<Proxy>,
    host: Host,
    ports: GatewayPorts,
    _data: tempfile::TempDir,
    cfg: String,
}

impl Rig {
    async fn start(sparkplug: toml::Table, through_proxy: bool) -> Rig {
        let sim = meter_sim();
        let srv = serve_tcp(sim.clone()).await;
        let pki = Pki::new();
        let cloud = Cloud::start(&pki, &pki.server);
        let proxy = match through_proxy {
            true => Some(Proxy::start(cloud.port).await),
            false => None,
        };
        let host = Host::start(&pki, cloud.port).await;
        let ports = GatewayPorts::new();
        let data = tempfile::tempdir().unwrap();
        let mut sp = toml! { enabled = true group_id = "plant" };
        sp.extend(sparkplug);
        let gateway_to = proxy.as_ref().map_or(cloud.port, |p| p.port);
        let cfg = GatewayConfig::bridged(&pki, &ports, data.path(), gateway_to)
            .with("sparkplug", sp)
            .modbus(meter(srv.port))
            .to_toml();
        Rig {
            sim,
            _srv: srv,
            _pki: pki,
            _cloud: cloud,
            proxy,
            host,
            ports,
            _data: data,
            cfg,
        }
    }

    /// Starts (or restarts) the gateway on the rig's config and data dir.
    async fn gateway(&self) -> Gateway {
        Gateway::start(&self.cfg, &self.ports).await
    }
}

/// A cloud-side Sparkplug host application: every message under `spBv1.0/`, decoded by
/// Tahu in arrival order (STATE messages, which are JSON, are kept out).
struct Host {
    collector: Collector,
    decoded: Mutex<Vec<Json>>,
}

impl Host {
    async fn start(pki: &Pki, cloud_port: u16) -> Host {
        Host {
            collector: Collector::start(pki, cloud_port, "spBv1.0/plant/#").await,
            decoded: Mutex::new(Vec::new()),
        }
    }

    /// Everything received so far, decoded.
    fn messages(&self) -> Vec<Json> {
        let raw = self.collector.received.lock().unwrap().clone();
        let mut done = self.decoded.lock().unwrap();
        if raw.len() > done.len() {
            let fresh = tahu::decode(&raw[done.len()..]);
            for d in &fresh {
                assert!(d.get("error").is_none(), "Tahu could not decode {d}");
            }
            done.extend(fresh);
        }
        done.clone()
    }

    /// Waits until `pred` holds on the decoded messages; returns them.
    async fn wait(&self, g: &Gateway, what: &str, pred: impl Fn(&[Json]) -> bool) -> Vec<Json> {
        let deadline = Instant::now() + WAIT;
        loop {
            let m = self.messages();
            if pred(&m) {
                return m;
            }
            if Instant::now() > deadline {
                panic!(
                    "{what}: not seen; got {} messages: {:#?}\n--- gateway log ---\n{}",
                    m.len(),
                    m.iter().map(kind).collect::<Vec<_>>(),
                    g.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn publish(&self, topic: &str, payload: Vec<u8>, retain: bool) {
        self.collector
            .client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .unwrap();
    }
}

/// `NBIRTH`, `DDATA`, ... of a decoded message.
fn kind(m: &Json) -> String {
    m["topic"]
        .as_str()
        .unwrap()
        .split('/')
        .nth(2)
        .unwrap_or("")
        .to_string()
}

fn seq(m: &Json) -> Option<u64> {
    m["payload"]["seq"].as_u64()
}

fn metric<'a>(m: &'a Json, name: &str) -> Option<&'a Json> {
    m["payload"]["metrics"]
        .as_array()?
        .iter()
        .find(|x| x["name"] == name)
}

fn bd_seq(m: &Json) -> u64 {
    metric(m, "bdSeq").expect("bdSeq metric")["value"]
        .as_u64()
        .expect("bdSeq value")
}

/// The messages split into sessions: each starts at an NBIRTH (NDEATHs end up in the
/// session they close).
fn sessions(msgs: &[Json]) -> Vec<Vec<Json>> {
    let mut out: Vec<Vec<Json>> = Vec::new();
    for m in msgs {
        if kind(m) == "NBIRTH" || out.is_empty() {
            out.push(Vec::new());
        }
        out.last_mut().unwrap().push(m.clone());
    }
    out
}

/// The Sparkplug session rules hold over `msgs`: each session opens with NBIRTH `seq` 0,
/// `seq` goes up by one (mod 256) on every message but NDEATH, and no DDATA comes before
/// its device's DBIRTH or after its DDEATH without a new DBIRTH.
fn check_rules(msgs: &[Json]) {
    assert_eq!(kind(&msgs[0]), "NBIRTH", "the first message is an NBIRTH");
    for s in sessions(msgs) {
        assert_eq!(seq(&s[0]), Some(0), "NBIRTH has seq 0: {}", s[0]);
        let mut last = 0;
        let mut born = BTreeSet::new();
        for m in &s[1..] {
            let k = kind(m);
            if k == "NCMD" || k == "DCMD" {
                continue; // the host's
            }
            let device = m["topic"]
                .as_str()
                .unwrap()
                .split('/')
                .nth(4)
                .map(String::from);
            match k.as_str() {
                "NDEATH" => {
                    assert_eq!(seq(m), None, "NDEATH has no seq");
                    continue;
                }
                "DBIRTH" => {
                    born.insert(device.clone().unwrap());
                }
                "DDEATH" => {
                    born.remove(device.as_deref().unwrap());
                }
                "DDATA" => assert!(
                    born.contains(device.as_deref().unwrap()),
                    "DDATA before its DBIRTH: {m}"
                ),
                _ => {}
            }
            let s = seq(m).unwrap_or_else(|| panic!("no seq: {m}"));
            assert_eq!(s, (last + 1) % 256, "seq continuity at {m}");
            last = s;
        }
    }
}

/// Alias -> metric name, from every DBIRTH seen.
fn aliases(msgs: &[Json]) -> HashMap<u64, String> {
    let mut a = HashMap::new();
    for m in msgs.iter().filter(|m| kind(m) == "DBIRTH") {
        for x in m["payload"]["metrics"].as_array().unwrap() {
            a.insert(
                x["alias"].as_u64().unwrap(),
                x["name"].as_str().unwrap().to_string(),
            );
        }
    }
    a
}

/// Every (name, metric) of every DDATA, names resolved through the births' aliases.
fn data_points(msgs: &[Json]) -> Vec<(String, Json)> {
    let a = aliases(msgs);
    msgs.iter()
        .filter(|m| kind(m) == "DDATA")
        .flat_map(|m| m["payload"]["metrics"].as_array().unwrap().clone())
        .map(|x| {
            let name = match x["name"].as_str() {
                Some(n) => n.to_string(),
                None => a
                    .get(&x["alias"].as_u64().unwrap())
                    .cloned()
                    .unwrap_or_default(),
            };
            (name, x)
        })
        .collect()
}

fn has_value(msgs: &[Json], name: &str, value: &Json) -> bool {
    data_points(msgs)
        .iter()
        .any(|(n, x)| n == name && &x["value"] == value)
}

#[tokio::test]
async fn births_data_and_the_will_decode_with_tahu() {
    let rig = Rig::start(toml::Table::new(), false).await;
    let host = &rig.host;
    let g = rig.gateway().await;

    let msgs = host
        .wait(&g, "a DDATA of every metric", |m| {
            let names: BTreeSet<String> = data_points(m).into_iter().map(|(n, _)| n).collect();
            TYPES.iter().all(|(n, _)| names.contains(*n))
        })
        .await;
    check_rules(&msgs);

    let nbirth = &msgs[0];
    assert_eq!(nbirth["topic"], "spBv1.0/plant/NBIRTH/gw1");
    let b = bd_seq(nbirth);
    assert_eq!(metric(nbirth, "bdSeq").unwrap()["type"], "Int64");
    let rebirth = metric(nbirth, "Node Control/Rebirth").expect("rebirth metric");
    assert_eq!(
        (&rebirth["type"], &rebirth["value"]),
        (&json!("Boolean"), &json!(false))
    );

    let dbirth = msgs.iter().find(|m| kind(m) == "DBIRTH").expect("DBIRTH");
    assert_eq!(dbirth["topic"], "spBv1.0/plant/DBIRTH/gw1/meter");
    for (name, ty) in TYPES {
        let m = metric(dbirth, name).unwrap_or_else(|| panic!("{name} in the DBIRTH"));
        assert_eq!(m["type"], ty, "{name}");
        assert!(m["alias"].is_u64(), "{name} has an alias");
    }
    let power = metric(dbirth, "power").unwrap();
    assert_eq!(power["properties"]["engUnit"]["value"], "W");
    assert_eq!(power["properties"]["writable"]["value"], false);
    assert_eq!(
        metric(dbirth, "setpoint").unwrap()["properties"]["writable"]["value"],
        true
    );

    // The values, as Tahu reads them.
    for (name, want) in [
        ("power", json!(21.5)),
        ("setpoint", json!(-3)),
        ("total", json!(4_000_000_000u64)),
        ("label", json!("OK")),
        ("count", json!(0)),
        ("run", json!(true)),
    ] {
        assert!(has_value(&msgs, name, &want), "{name} = {want} in a DDATA");
    }
    let scaled = data_points(&msgs)
        .into_iter()
        .find(|(n, _)| n == "scaled")
        .unwrap()
        .1;
    assert!(
        (scaled["value"].as_f64().unwrap() - 12.3).abs() < 1e-9,
        "{scaled}"
    );
    let ts = scaled["timestamp"].as_u64().unwrap();
    assert!(
        ts > 1_600_000_000_000,
        "metric timestamps are ms since the epoch: {ts}"
    );

    // kill -9: the broker publishes the will, the NDEATH of this connection.
    g.kill9_in_place();
    let msgs = host
        .wait(&g, "the NDEATH will", |m| {
            m.iter().any(|x| kind(x) == "NDEATH")
        })
        .await;
    let ndeath = msgs.iter().find(|m| kind(m) == "NDEATH").unwrap();
    assert_eq!(ndeath["topic"], "spBv1.0/plant/NDEATH/gw1");
    assert_eq!(bd_seq(ndeath), b, "the will carries the NBIRTH's bdSeq");
    assert_eq!(seq(ndeath), None);

    // The next run's connection counts on from the one that died.
    drop(g);
    let g = rig.gateway().await;
    let msgs = host
        .wait(&g, "a second NBIRTH", |m| {
            m.iter().filter(|x| kind(x) == "NBIRTH").count() >= 2
        })
        .await;
    let second = msgs.iter().filter(|x| kind(x) == "NBIRTH").nth(1).unwrap();
    assert_eq!(bd_seq(second), (b + 1) % 256);
    check_rules(&msgs);
    g.terminate();
}

/// The `count` values a local subscriber saw the Modbus source publish (each was queued
/// before the broker delivered it).
fn local_counts(sub: &LocalSub) -> BTreeSet<u64> {
    sub.on("field/meter/count")
        .iter()
        .filter_map(|p| serde_json::from_slice::<Json>(p).ok())
        .filter_map(|v| v["value"].as_u64())
        .collect()
}

#[tokio::test]
async fn a_cloud_outage_loses_no_reading_and_the_next_session_is_born_again() {
    let rig = Rig::start(toml::Table::new(), true).await;
    let (sim, host) = (&rig.sim, &rig.host);
    let proxy = rig.proxy.as_ref().unwrap();
    let g = rig.gateway().await;
    let local = LocalSub::start(g.mqtt, "field/meter/count", QoS::AtMostOnce).await;
    host.wait(&g, "a first DDATA", |m| {
        m.iter().any(|x| kind(x) == "DDATA")
    })
    .await;

    // The counter moves on while the uplink is cut; every value read is queued.
    for v in 1..=30u16 {
        if v == 8 {
            proxy.cut();
        }
        if v == 24 {
            proxy.restore();
        }
        sim.set_holding(1, COUNT_REG, &[v]);
        let seen = eventually(WAIT, || local_counts(&local).contains(&u64::from(v))).await;
        assert!(seen, "the gateway read count = {v}\n{}", g.log_text());
    }
    assert!(
        g.metric("fieldgate_cloud_reconnects_total") >= 1.0,
        "the cut was noticed"
    );
    let msgs = host
        .wait(&g, "count = 30 in a DDATA", |m| {
            has_value(m, "count", &json!(30))
        })
        .await;
    check_rules(&msgs);

    let cloud_counts: BTreeSet<u64> = data_points(&msgs)
        .into_iter()
        .filter(|(n, _)| n == "count")
        .filter_map(|(_, x)| x["value"].as_u64())
        .collect();
    let missing: Vec<u64> = local_counts(&local)
        .difference(&cloud_counts)
        .copied()
        .collect();
    assert!(
        missing.is_empty(),
        "read but never reached the cloud: {missing:?}"
    );

    // The cut connection's will, then a new session with the next bdSeq, born again, whose
    // replayed backlog is marked historical.
    let s = sessions(&msgs);
    assert!(s.len() >= 2, "a second session");
    let b0 = bd_seq(&s[0][0]);
    let ndeath = s[0].iter().find(|m| kind(m) == "NDEATH").expect("the will");
    assert_eq!(bd_seq(ndeath), b0);
    assert_eq!(bd_seq(&s[1][0]), (b0 + 1) % 256);
    assert_eq!(
        kind(&s[1][1]),
        "DBIRTH",
        "the devices are born right after the NBIRTH"
    );
    let historical = s[1..]
        .iter()
        .flatten()
        .filter(|m| kind(m) == "DDATA")
        .flat_map(|m| m["payload"]["metrics"].as_array().unwrap().clone())
        .any(|x| x["isHistorical"] == true);
    assert!(historical, "the replayed backlog is flagged isHistorical");
    g.terminate();
}

#[tokio::test]
async fn ncmd_rebirth_and_a_dcmd_write_reaching_the_modbus_server() {
    let rig = Rig::start(toml::Table::new(), false).await;
    let (sim, host) = (&rig.sim, &rig.host);
    let g = rig.gateway().await;
    let msgs = host
        .wait(&g, "a first DDATA", |m| {
            m.iter().any(|x| kind(x) == "DDATA")
        })
        .await;
    let b = bd_seq(&msgs[0]);

    // Rebirth: the gateway subscribes after CONNACK, so ask until a second NBIRTH comes.
    let ncmd = tahu::encode(json!({
        "timestamp": 1,
        "metrics": [{"name": "Node Control/Rebirth", "type": "Boolean", "value": true}]
    }));
    let deadline = Instant::now() + WAIT;
    while host
        .messages()
        .iter()
        .filter(|m| kind(m) == "NBIRTH")
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "no rebirth\n{}", g.log_text());
        host.publish("spBv1.0/plant/NCMD/gw1", ncmd.clone(), false)
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let msgs = host
        .wait(&g, "the DBIRTH after the rebirth", |m| {
            sessions(m)
                .get(1)
                .is_some_and(|s| s.iter().any(|x| kind(x) == "DBIRTH"))
        })
        .await;
    let second = &sessions(&msgs)[1];
    assert_eq!(
        bd_seq(&second[0]),
        b,
        "a rebirth keeps the connection's bdSeq"
    );
    check_rules(&msgs);

    // A DCMD to a read-only metric is refused: nothing is written.
    let writes_before = sim.writes.lock().unwrap().len();
    let dcmd = |name: &str, ty: &str, value: Json| {
        tahu::encode(json!({
            "timestamp": 2,
            "metrics": [{"name": name, "type": ty, "value": value}]
        }))
    };
    host.publish(
        "spBv1.0/plant/DCMD/gw1/meter",
        dcmd("power", "Float", json!(1.0)),
        false,
    )
    .await;
    // A DCMD to a writable one goes through the `/set` path to the device ...
    host.publish(
        "spBv1.0/plant/DCMD/gw1/meter",
        dcmd("setpoint", "Int16", json!(-42)),
        false,
    )
    .await;
    let written = eventually(WAIT, || sim.holding(1, 2, 1) == [Some((-42i16) as u16)]).await;
    assert!(
        written,
        "the DCMD reached the Modbus server\n{}",
        g.log_text()
    );
    assert_eq!(
        sim.writes.lock().unwrap().len(),
        writes_before + 1,
        "only the writable metric was written"
    );
    assert!(
        g.log_text().contains("not writable"),
        "the refused DCMD is logged"
    );
    // ... and the next DDATA shows the result.
    host.wait(&g, "setpoint = -42 in a DDATA", |m| {
        has_value(m, "setpoint", &json!(-42))
    })
    .await;
    g.terminate();
}

#[tokio::test]
async fn with_a_primary_host_the_node_waits_for_its_state_and_leaves_when_it_goes() {
    let rig = Rig::start(toml! { primary_host_id = "scada" }, false).await;
    let host = &rig.host;
    let g = rig.gateway().await;
    let local = LocalSub::start(g.mqtt, "field/meter/count", QoS::AtMostOnce).await;
    // Connected, readings queued, and nothing sent: the host has not said it is online.
    let up = eventually(WAIT, || g.metric("fieldgate_cloud_connected") == 1.0).await;
    assert!(up, "connected\n{}", g.log_text());
    assert!(eventually(WAIT, || local.on("field/meter/count").len() >= 5).await);
    assert!(
        g.metric("fieldgate_queue_records") >= 5.0,
        "readings wait in the queue"
    );
    assert!(
        host.messages().is_empty(),
        "nothing before the host's STATE: {:?}",
        host.messages()
    );

    // Sparkplug 3.0 STATE: JSON, retained, stamped (a node ignores one older than the last).
    let state = |online: bool| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        json!({"online": online, "timestamp": now})
            .to_string()
            .into_bytes()
    };
    host.publish("spBv1.0/STATE/scada", state(true), true).await;
    // The live lane may send a fresh reading before the replay lane's first backlog record:
    // wait for the backlog itself (flagged historical), not for any DDATA.
    let msgs = host
        .wait(&g, "births and the backlog, flagged historical", |m| {
            data_points(m)
                .iter()
                .any(|(_, x)| x["isHistorical"] == true)
        })
        .await;
    check_rules(&msgs);
    let b = bd_seq(&msgs[0]);
    let historical = data_points(&msgs)
        .iter()
        .any(|(_, x)| x["isHistorical"] == true);
    assert!(historical, "what waited is sent as history");

    // The host goes away: the node says NDEATH and waits for it again.
    let reconnects = g.metric("fieldgate_cloud_reconnects_total");
    host.publish("spBv1.0/STATE/scada", state(false), true)
        .await;
    let msgs = host
        .wait(&g, "the NDEATH", |m| m.iter().any(|x| kind(x) == "NDEATH"))
        .await;
    let ndeath = msgs.iter().find(|x| kind(x) == "NDEATH").unwrap();
    assert_eq!(bd_seq(ndeath), b);
    assert!(
        eventually(WAIT, || g.metric("fieldgate_cloud_reconnects_total")
            > reconnects)
        .await
    );
    assert!(eventually(WAIT, || g.metric("fieldgate_cloud_connected") == 1.0).await);
    let births = |m: &[Json]| m.iter().filter(|x| kind(x) == "NBIRTH").count();
    assert_eq!(
        births(&host.messages()),
        1,
        "no birth while the host is offline"
    );

    host.publish("spBv1.0/STATE/scada", state(true), true).await;
    let msgs = host.wait(&g, "a new NBIRTH", |m| births(m) == 2).await;
    let second = msgs.iter().filter(|x| kind(x) == "NBIRTH").nth(1).unwrap();
    assert!(bd_seq(second) != b, "a new connection, a new bdSeq");
    check_rules(&msgs);
    g.terminate();
}

#[tokio::test]
async fn a_serial_scale_is_a_sparkplug_device_and_a_dcmd_writes_its_line() {
    use common::pty::PtyPair;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let pki = Pki::new();
    let cloud = Cloud::start(&pki, &pki.server);
    let host = Host::start(&pki, cloud.port).await;
    let ports = GatewayPorts::new();
    let data = tempfile::tempdir().unwrap();
    let mut pty = PtyPair::start(data.path(), "scale");
    let cfg = GatewayConfig::bridged(&pki, &ports, data.path(), cloud.port)
        .with("sparkplug", toml! { enabled = true group_id = "plant" })
        .push(
            "serial",
            toml! {
                name = "scale"
                port = (path(&pty.gw))
                envelope = true
                write_line_ending = "\r\n"
                [framing]
                delimiter = "\r\n"
                [decode]
                mode = "regex"
                pattern = (r"^(?P<net>-?\d+\.\d+)\s*(?P<unit>kg|lb)$")
                metric_types = { net = "double" }
            },
        )
        .to_toml();
    let g = Gateway::start(&cfg, &ports).await;
    let mut device = pty.device();
    let msgs = host
        .wait(&g, "the scale's DBIRTH", |m| {
            m.iter().any(|x| kind(x) == "DBIRTH")
        })
        .await;
    let dbirth = msgs.iter().find(|m| kind(m) == "DBIRTH").unwrap();
    assert_eq!(dbirth["topic"], "spBv1.0/plant/DBIRTH/gw1/scale");
    for (name, ty) in [("net", "Double"), ("unit", "String"), ("write", "String")] {
        assert_eq!(metric(dbirth, name).unwrap()["type"], ty, "{name}");
    }

    // One frame is one DDATA with every capture, typed.
    device.write_all(b"12.50 kg\r\n").await.unwrap();
    let msgs = host
        .wait(&g, "net = 12.5", |m| has_value(m, "net", &json!(12.5)))
        .await;
    assert!(has_value(&msgs, "unit", &json!("kg")));
    check_rules(&msgs);

    // A DCMD's text is written to the line as it is, with the line ending.
    let dcmd = tahu::encode(json!({
        "timestamp": 3,
        "metrics": [{"name": "write", "type": "String", "value": "TARE"}]
    }));
    let mut got = Vec::new();
    let deadline = Instant::now() + WAIT;
    while !got.ends_with(b"TARE\r\n") {
        assert!(
            Instant::now() < deadline,
            "no TARE on the line: {got:?}\n{}",
            g.log_text()
        );
        host.publish("spBv1.0/plant/DCMD/gw1/scale", dcmd.clone(), false)
            .await;
        let mut buf = [0u8; 64];
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(500), device.read(&mut buf)).await
        {
            got.extend_from_slice(&buf[..n]);
        }
    }
    g.terminate();
}
