//! Modbus sources end to end: the real gateway binary polls tokio-modbus servers (TCP on
//! loopback, RTU across an in-process pty pair) and a plain MQTT client on the local broker checks
//! the exact topics and the decoded values. Register contents are laid out by the test's own
//! spec-spelled [`layout`], never by the codec under test. Deadlines only bound the waiting;
//! nothing asserts a timing.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::modbus_sim::{layout, serve_converter, serve_rtu, serve_tcp, Sim};
use common::pty::PtyPair;
use common::*;
use rumqttc::QoS;
use serde_json::{json, Value as Json};
use toml::toml;

const WAIT: Duration = Duration::from_secs(30);

/// A plain MQTT client of the gateway's local broker (QoS 0 subscription).
struct Sub(LocalSub);

impl Sub {
    async fn start(port: u16, filter: &str) -> Sub {
        Sub(LocalSub::start(port, filter, QoS::AtMostOnce).await)
    }

    /// JSON payloads seen on `topic`.
    fn on(&self, topic: &str) -> Vec<Json> {
        self.0
            .on(topic)
            .iter()
            .map(|p| serde_json::from_slice(p).unwrap_or(Json::Null))
            .collect()
    }

    fn last(&self, topic: &str) -> Option<Json> {
        self.on(topic).pop()
    }

    fn topics(&self) -> std::collections::BTreeSet<String> {
        self.0
            .received
            .lock()
            .unwrap()
            .iter()
            .map(|m| m.topic.clone())
            .collect()
    }

    /// Waits until the last JSON on `topic` satisfies `pred`; returns it (or panics with
    /// what was seen and the gateway log).
    async fn wait_last(&self, g: &Gateway, topic: &str, pred: impl Fn(&Json) -> bool) -> Json {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(v) = self.last(topic) {
                if pred(&v) {
                    return v;
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "{topic}: no matching message; seen {:?}\n--- gateway log ---\n{}",
                    self.on(topic),
                    g.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn publish(&self, topic: &str, payload: &str) {
        self.0
            .client
            .publish(topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec())
            .await
            .unwrap();
    }
}

/// A gateway without a cloud, stopping within 2 s.
fn local(ports: &GatewayPorts, data: &Path) -> GatewayConfig {
    GatewayConfig::local(ports, data).set("gateway.shutdown_grace", "2s")
}

/// [`local`] with these `[[modbus]]` devices.
fn config(
    ports: &GatewayPorts,
    data: &Path,
    devices: impl IntoIterator<Item = ModbusDevice>,
) -> String {
    devices
        .into_iter()
        .fold(local(ports, data), GatewayConfig::modbus)
        .to_toml()
}

fn good(v: &Json) -> bool {
    v["quality"] == "good"
}

fn be32(x: u32) -> Vec<u8> {
    x.to_be_bytes().to_vec()
}

fn be64(x: u64) -> Vec<u8> {
    x.to_be_bytes().to_vec()
}

#[tokio::test]
async fn tcp_every_type_and_order_decodes_onto_exact_topics() {
    let sim = Sim::new();
    // Known contents, laid out by spelled order.
    sim.set_holding(1, 0, &[0x1234]);
    sim.set_holding(1, 1, &layout(&(-123i16).to_be_bytes(), "AB"));
    sim.set_holding(1, 2, &layout(&(-123i16).to_be_bytes(), "BA"));
    let o32 = ["ABCD", "DCBA", "BADC", "CDAB"];
    let o64 = ["ABCDEFGH", "HGFEDCBA", "BADCFEHG", "GHEFCDAB"];
    for (i, o) in o32.iter().enumerate() {
        let a = i as u16 * 2;
        sim.set_holding(1, 10 + a, &layout(&be32(0x1122_3344), o));
        sim.set_holding(1, 20 + a, &layout(&(-2_000_000_000i32).to_be_bytes(), o));
        sim.set_holding(1, 30 + a, &layout(&25.5f32.to_be_bytes(), o));
    }
    for (i, o) in o64.iter().enumerate() {
        let a = i as u16 * 4;
        sim.set_holding(1, 40 + a, &layout(&be64(0x1122_3344_5566_7788), o));
        sim.set_holding(
            1,
            60 + a,
            &layout(&(-1_234_567_890_123_456_789i64).to_be_bytes(), o),
        );
        sim.set_holding(1, 80 + a, &layout(&(-1234.5678f64).to_be_bytes(), o));
    }
    sim.set_holding(1, 100, &[0x4142, 0x2d31, 0x3200]); // "AB-12"
    sim.set_holding(1, 110, &[0b1000, 615]);
    sim.with(1, |u| {
        u.input.insert(0, 777);
        u.coils.insert(5, true);
        u.discrete.insert(7, false);
        u.discrete.insert(8, true);
    });
    let server = serve_tcp(sim.clone()).await;

    // (tag, address, its other keys) and the value it must read.
    let mut tags: Vec<(String, u32, toml::Table)> = Vec::new();
    let mut expect: Vec<(String, Json)> = Vec::new();
    let mut tag = |name: &str, address: u32, keys: toml::Table, want: Json| {
        tags.push((name.to_string(), address, keys));
        expect.push((name.to_string(), want));
    };
    tag("u16", 0, toml! { type = "u16" }, json!(0x1234));
    tag("i16", 1, toml! { type = "i16" }, json!(-123));
    tag(
        "i16_ba",
        2,
        toml! { type = "i16" order = "BA" },
        json!(-123),
    );
    for (i, o) in o32.iter().enumerate() {
        let a = i as u32 * 2;
        tag(
            &format!("u32_{o}"),
            10 + a,
            toml! { type = "u32" order = (*o) },
            json!(0x1122_3344u32),
        );
        tag(
            &format!("i32_{o}"),
            20 + a,
            toml! { type = "i32" order = (*o) },
            json!(-2_000_000_000),
        );
        tag(
            &format!("f32_{o}"),
            30 + a,
            toml! { type = "f32" order = (*o) },
            json!(25.5),
        );
    }
    for (i, o) in o64.iter().enumerate() {
        let a = i as u32 * 4;
        tag(
            &format!("u64_{o}"),
            40 + a,
            toml! { type = "u64" order = (*o) },
            json!(0x1122_3344_5566_7788u64),
        );
        tag(
            &format!("i64_{o}"),
            60 + a,
            toml! { type = "i64" order = (*o) },
            json!(-1_234_567_890_123_456_789i64),
        );
        tag(
            &format!("f64_{o}"),
            80 + a,
            toml! { type = "f64" order = (*o) },
            json!(-1234.5678),
        );
    }
    tag(
        "text",
        100,
        toml! { type = "string" length = 6 },
        json!("AB-12"),
    );
    tag("bit3", 110, toml! { type = "bit" bit = 3 }, json!(true));
    tag("bit2", 110, toml! { type = "bit" bit = 2 }, json!(false));
    tag(
        "temp",
        111,
        toml! { type = "i16" scale = 0.1 offset = -40.0 unit = "degC" },
        json!(21.5),
    );
    tag("in", 0, toml! { kind = "input_register" }, json!(777));
    tag("run", 5, toml! { kind = "coil" }, json!(true));
    tag("door", 7, toml! { kind = "discrete_input" }, json!(false));
    tag("door2", 8, toml! { kind = "discrete_input" }, json!(true));

    let ports = GatewayPorts::new();
    let data = tempfile::tempdir().unwrap();
    let device = ModbusDevice::tcp("dev1", server.port).with(toml! {
        poll_interval = "200ms"
        max_in_flight = 3
        timeout = "5s"
    });
    let device = tags.into_iter().fold(device, |d, (name, address, keys)| {
        d.tag_with(&name, address, keys)
    });
    let cfg = config(&ports, data.path(), [device]);
    let g = Gateway::start(&cfg, &ports).await;
    let sub = Sub::start(g.mqtt, "field/#").await;

    for (name, want) in &expect {
        let topic = format!("field/dev1/{name}");
        let v = sub.wait_last(&g, &topic, good).await;
        match want {
            Json::Number(n) if n.is_f64() => {
                let got = v["value"].as_f64().unwrap_or(f64::NAN);
                let w = n.as_f64().unwrap();
                assert!(
                    (got - w).abs() < 1e-9 * w.abs().max(1.0),
                    "{topic}: {v} want {want}"
                );
            }
            _ => assert_eq!(&v["value"], want, "{topic}: {v}"),
        }
        assert!(
            v["ts"].as_u64().unwrap_or(0) > 1_600_000_000_000,
            "{topic}: {v}"
        );
    }
    let temp = sub.last("field/dev1/temp").unwrap();
    assert_eq!(temp["unit"], "degC");

    let status = sub
        .wait_last(&g, "field/dev1/status", |v| v["state"] == "online")
        .await;
    assert_eq!(status["state"], "online");
    // Exactly the configured topics, nothing else.
    let mut want: std::collections::BTreeSet<String> = expect
        .iter()
        .map(|(n, _)| format!("field/dev1/{n}"))
        .collect();
    want.insert("field/dev1/status".into());
    assert_eq!(sub.topics(), want);

    // 32 tags coalesce into 12 requests: 9 holding ranges, input, coil, discrete.
    assert_eq!(
        g.metric("fieldgate_modbus_cycle_requests{bus=\"dev1\"}"),
        12.0
    );
    assert!(g.metric("fieldgate_modbus_reads_total{device=\"dev1\"}") >= 12.0);
    assert_eq!(
        g.metric("fieldgate_modbus_errors_total{device=\"dev1\",kind=\"timeout\"}"),
        0.0
    );
    let (status, log) = g.terminate();
    assert!(status.success(), "{log}");
    // Stopping publishes the device offline (retained) before the broker closes.
    assert!(log.contains("modbus bus stopped"), "{log}");
}

#[tokio::test]
async fn rtu_two_units_share_one_pty_bus_and_a_dead_unit_stops_neither() {
    let mut pty = PtyPair::new();
    let sim = Sim::new();
    sim.set_holding(1, 0, &[111]);
    sim.set_holding(1, 1, &layout(&(-7.25f32).to_be_bytes(), "CDAB"));
    sim.set_holding(2, 0, &[222]);
    sim.with(2, |u| {
        u.coils.insert(3, true);
    });
    let _server = serve_rtu(sim.clone(), pty.device());

    let port = pty.gw.display();
    // The three units on the one line.
    let unit = |name: &str, unit_id: u8, timeout: &str| {
        ModbusDevice::rtu(name, &pty.gw).with(toml! {
            unit_id = (unit_id)
            timeout = (timeout)
            retries = 0
            poll_interval = "100ms"
            reconnect_min = "200ms"
            reconnect_max = "400ms"
        })
    };
    let modbus = [
        unit("unit1", 1, "5s").tag("count", 0).tag_with(
            "flow",
            1,
            toml! { type = "f32" order = "CDAB" },
        ),
        unit("unit2", 2, "5s")
            .tag("level", 0)
            .tag_with("pump", 3, toml! { kind = "coil" }),
        unit("ghost", 3, "300ms").tag("x", 0),
    ];
    let ports = GatewayPorts::new();
    let data = tempfile::tempdir().unwrap();
    let g = Gateway::start(&config(&ports, data.path(), modbus), &ports).await;
    let sub = Sub::start(g.mqtt, "field/#").await;

    assert_eq!(
        sub.wait_last(&g, "field/unit1/count", good).await["value"],
        111
    );
    assert_eq!(
        sub.wait_last(&g, "field/unit1/flow", good).await["value"],
        -7.25
    );
    assert_eq!(
        sub.wait_last(&g, "field/unit2/level", good).await["value"],
        222
    );
    assert_eq!(
        sub.wait_last(&g, "field/unit2/pump", good).await["value"],
        true
    );

    // Unit 3 never answers: offline with the reason, retained.
    let ghost = sub
        .wait_last(&g, "field/ghost/status", |v| v["state"] == "offline")
        .await;
    assert_eq!(ghost["kind"], "timeout", "{ghost}");
    assert!(
        ghost["error"].as_str().unwrap_or("").contains("no answer"),
        "{ghost}"
    );
    let x = sub
        .wait_last(&g, "field/ghost/x", |v| v["quality"] == "timeout")
        .await;
    assert_eq!(x["value"], Json::Null);

    // The bus goes on for the others: new values arrive after the ghost went offline.
    sim.set_holding(2, 0, &[333]);
    sim.set_holding(1, 0, &[112]);
    sub.wait_last(&g, "field/unit2/level", |v| v["value"] == 333)
        .await;
    sub.wait_last(&g, "field/unit1/count", |v| v["value"] == 112)
        .await;
    assert_eq!(sub.last("field/unit1/status").unwrap()["state"], "online");

    // One bus, one task, for the three units.
    let bus = format!("fieldgate_modbus_cycles_total{{bus=\"rtu:{port}\"}}");
    assert!(
        g.metric(&bus) > 0.0,
        "{}",
        g.get("/metrics").unwrap_or_default()
    );
    // A cycle that waits 300 ms for the ghost cannot fit a 100 ms interval: reported.
    let overruns = format!("fieldgate_modbus_overruns_total{{bus=\"rtu:{port}\"}}");
    assert!(g.metric(&overruns) >= 1.0);
    assert!(g.log_text().contains("did not fit its interval"));
    assert!(g.metric("fieldgate_modbus_errors_total{device=\"ghost\",kind=\"timeout\"}") >= 1.0);
    assert_eq!(
        g.metric("fieldgate_modbus_errors_total{device=\"unit1\",kind=\"timeout\"}"),
        0.0
    );
    assert_eq!(
        g.metric("fieldgate_modbus_errors_total{device=\"unit2\",kind=\"bad_frame\"}"),
        0.0
    );
}

#[tokio::test]
async fn tcp_device_stops_answering_then_returns_and_the_other_is_unaffected() {
    let (sim_a, sim_b) = (Sim::new(), Sim::new());
    sim_a.set_holding(1, 0, &[10]);
    sim_b.set_holding(1, 0, &[20]);
    let (srv_a, srv_b) = (
        serve_tcp(sim_a.clone()).await,
        serve_tcp(sim_b.clone()).await,
    );
    // Only the device that is made to die has a short timeout: a loaded machine must not
    // turn a slow answer of the other into a timeout.
    let dev = |name: &str, port: u16, timeout: &str| {
        ModbusDevice::tcp(name, port)
            .with(toml! {
                timeout = (timeout)
                retries = 1
                poll_interval = "100ms"
                reconnect_min = "100ms"
                reconnect_max = "300ms"
            })
            .tag("v", 0)
    };
    let modbus = [dev("a", srv_a.port, "200ms"), dev("b", srv_b.port, "5s")];
    let ports = GatewayPorts::new();
    let data = tempfile::tempdir().unwrap();
    let g = Gateway::start(&config(&ports, data.path(), modbus), &ports).await;
    let sub = Sub::start(g.mqtt, "field/#").await;
    sub.wait_last(&g, "field/a/v", |v| v["value"] == 10).await;
    sub.wait_last(&g, "field/b/v", |v| v["value"] == 20).await;
    sub.wait_last(&g, "field/a/status", |v| v["state"] == "online")
        .await;

    sim_a.set_silent(1, true);
    let st = sub
        .wait_last(&g, "field/a/status", |v| v["state"] == "offline")
        .await;
    assert_eq!(st["kind"], "timeout", "{st}");
    sub.wait_last(&g, "field/a/v", |v| v["quality"] == "timeout")
        .await;

    // b keeps being polled while a is dead.
    sim_b.set_holding(1, 0, &[21]);
    sub.wait_last(&g, "field/b/v", |v| v["value"] == 21).await;
    assert_eq!(sub.last("field/b/status").unwrap()["state"], "online");

    // a comes back by itself.
    sim_a.set_holding(1, 0, &[11]);
    sim_a.set_silent(1, false);
    sub.wait_last(&g, "field/a/status", |v| v["state"] == "online")
        .await;
    let v = sub.wait_last(&g, "field/a/v", |v| v["value"] == 11).await;
    assert!(good(&v), "{v}");

    assert!(g.metric("fieldgate_modbus_errors_total{device=\"a\",kind=\"timeout\"}") >= 1.0);
    assert_eq!(
        g.metric("fieldgate_modbus_errors_total{device=\"b\",kind=\"timeout\"}"),
        0.0
    );
    assert_eq!(g.metric("fieldgate_modbus_online{device=\"a\"}"), 1.0);
    // The retained status reaches a subscriber that comes later.
    let late = Sub::start(g.mqtt, "field/a/status").await;
    let s = late
        .wait_last(&g, "field/a/status", |v| v["state"] == "online")
        .await;
    assert_eq!(s["state"], "online");
    assert!(late.0.received.lock().unwrap().iter().any(|m| m.retain));
}

#[tokio::test]
async fn exception_answers_are_counted_and_published_with_their_quality() {
    let sim = Sim::new();
    sim.set_holding(1, 0, &[5]);
    let srv = serve_tcp(sim.clone()).await;
    let modbus = ModbusDevice::tcp("ex", srv.port)
        .with(toml! { poll_interval = "100ms" retain = true timeout = "5s" })
        .tag("ok", 0)
        .tag("missing", 500);
    let ports = GatewayPorts::new();
    let data = tempfile::tempdir().unwrap();
    let g = Gateway::start(&config(&ports, data.path(), [modbus]), &ports).await;
    let sub = Sub::start(g.mqtt, "field/#").await;
    let m = sub
        .wait_last(&g, "field/ex/missing", |v| v["quality"] == "exception")
        .await;
    assert_eq!(m["value"], Json::Null);
    assert_eq!(m["error"], "illegal data address (exception 2)");
    assert_eq!(sub.wait_last(&g, "field/ex/ok", good).await["value"], 5);
    // The device answered, so it is not offline; a tag fails, so it is degraded.
    let st = sub
        .wait_last(&g, "field/ex/status", |v| v["state"] == "degraded")
        .await;
    assert_eq!(st["failing"][0]["tag"], "missing", "{st}");
    assert_eq!(g.metric("fieldgate_modbus_online{device=\"ex\"}"), 1.0);
    let ok = eventually(WAIT, || {
        g.metric("fieldgate_modbus_errors_total{device=\"ex\",kind=\"exception\"}") >= 2.0
    })
    .await;
    assert!(ok, "{}", g.get("/metrics").unwrap_or_default());
    assert!(g.metric("fieldgate_modbus_tag_errors_total{device=\"ex\",tag=\"missing\"}") >= 2.0);
    assert!(g
        .metric("fieldgate_modbus_tag_errors_total{device=\"ex\",tag=\"ok\"}")
        .is_nan());
    // A repeated exception is published once (here: retained, so a subscriber that came
    // after the first poll still got it), not every poll.
    assert_eq!(sub.on("field/ex/missing").len(), 1);
}

/// A device with a writable tag of every kind (and one read-only, one unmapped).
fn writes_device(port: u16) -> ModbusDevice {
    ModbusDevice::tcp("w", port)
        .with(toml! { poll_interval = "100ms" })
        .tag_with("sp", 0, toml! { writable = true })
        .tag_with(
            "temp",
            2,
            toml! { type = "f32" order = "CDAB" scale = 0.1 writable = true },
        )
        .tag_with("run", 0, toml! { kind = "coil" writable = true })
        .tag_with("flag", 10, toml! { type = "bit" bit = 3 writable = true })
        .tag_with(
            "label",
            20,
            toml! { type = "string" length = 4 writable = true },
        )
        .tag("ro", 30)
        .tag_with(
            "total",
            40,
            toml! { type = "u64" order = "DCBA" writable = true },
        )
        .tag_with("gone", 60, toml! { writable = true })
        .tag_with(
            "level",
            50,
            toml! { type = "i16" scale = 0.1 writable = true },
        )
}

fn write_sim() -> Sim {
    let sim = Sim::new();
    sim.set_holding(1, 0, &[0]);
    sim.set_holding(1, 2, &[0, 0]);
    sim.set_holding(1, 10, &[0b0001]);
    sim.set_holding(1, 20, &[0x2020, 0x2020]);
    sim.set_holding(1, 30, &[3]);
    sim.set_holding(1, 40, &[0, 0, 0, 0]);
    sim.set_holding(1, 50, &[0]);
    sim.with(1, |u| {
        u.coils.insert(0, false);
    });
    sim
}

#[tokio::test]
async fn writes_round_trip_with_echoed_ids_and_precise_errors() {
    let sim = write_sim();
    let srv = serve_tcp(sim.clone()).await;
    let ports = GatewayPorts::new();
    let data = tempfile::tempdir().unwrap();
    let g = Gateway::start(
        &config(&ports, data.path(), [writes_device(srv.port)]),
        &ports,
    )
    .await;
    let sub = Sub::start(g.mqtt, "field/#").await;
    // "gone" has no register in the device: degraded, not offline.
    sub.wait_last(&g, "field/w/status", |v| v["state"] == "degraded")
        .await;

    async fn set(sub: &Sub, g: &Gateway, tag: &str, payload: &str) -> Json {
        let topic = format!("field/w/{tag}/set/result");
        let before = sub.on(&topic).len();
        sub.publish(&format!("field/w/{tag}/set"), payload).await;
        let deadline = Instant::now() + WAIT;
        loop {
            let all = sub.on(&topic);
            if all.len() > before {
                return all[before].clone();
            }
            assert!(Instant::now() < deadline, "no {topic}\n{}", g.log_text());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    assert_eq!(
        set(&sub, &g, "sp", r#"{"value":1234,"id":"w1"}"#).await,
        json!({"ok":true,"id":"w1"})
    );
    assert_eq!(sim.holding(1, 0, 1), [Some(1234)]);
    // The new value is read back and published.
    sub.wait_last(&g, "field/w/sp", |v| v["value"] == 1234)
        .await;

    assert_eq!(set(&sub, &g, "temp", "21.5").await, json!({"ok":true}));
    let want: Vec<Option<u16>> = layout(&215.0f32.to_be_bytes(), "CDAB")
        .into_iter()
        .map(Some)
        .collect();
    assert_eq!(sim.holding(1, 2, 2), want);

    assert_eq!(set(&sub, &g, "run", "true").await, json!({"ok":true}));
    assert!(sim.with(1, |u| u.coils[&0]));

    assert_eq!(
        set(&sub, &g, "flag", r#"{"value":true,"id":7}"#).await,
        json!({"ok":true,"id":7})
    );
    assert_eq!(sim.holding(1, 10, 1), [Some(0b1001)]);

    assert_eq!(set(&sub, &g, "label", r#""OK""#).await, json!({"ok":true}));
    assert_eq!(sim.holding(1, 20, 2), [Some(0x4f4b), Some(0)]);

    assert_eq!(
        set(&sub, &g, "total", "1234605616436508552").await,
        json!({"ok":true})
    );
    let want: Vec<Option<u16>> = layout(&be64(0x1122_3344_5566_7788), "HGFEDCBA")
        .into_iter()
        .map(Some)
        .collect();
    assert_eq!(sim.holding(1, 40, 4), want);

    // Errors: nothing is written, the reason is precise, the id comes back.
    let r = set(&sub, &g, "ro", r#"{"value":5,"id":"r"}"#).await;
    assert_eq!(
        (r["ok"].clone(), r["code"].clone(), r["id"].clone()),
        (json!(false), json!("read_only"), json!("r"))
    );
    assert_eq!(sim.holding(1, 30, 1), [Some(3)]);

    let r = set(&sub, &g, "sp", r#"{"value":70000,"id":"big"}"#).await;
    assert_eq!(r["code"], "out_of_range", "{r}");
    assert_eq!(r["error"], "out of range: 70000 is outside u16 [0, 65535]");
    assert_eq!(r["id"], "big");
    assert_eq!(sim.holding(1, 0, 1), [Some(1234)]);

    let r = set(&sub, &g, "level", "21.55").await;
    assert_eq!(r["code"], "out_of_range", "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .starts_with("not representable"),
        "{r}"
    );

    let r = set(&sub, &g, "sp", r#""abc""#).await;
    assert_eq!(r["code"], "bad_request", "{r}");

    let r = set(&sub, &g, "gone", "1").await;
    assert_eq!(r["code"], "exception", "{r}");
    assert_eq!(r["error"], "illegal data address (exception 2)");

    let r = set(&sub, &g, "nosuch", r#"{"value":1,"id":"n"}"#).await;
    assert_eq!(r["code"], "unknown_tag", "{r}");
    assert_eq!(r["id"], "n");

    assert_eq!(
        g.metric("fieldgate_modbus_writes_total{device=\"w\",result=\"ok\"}"),
        6.0
    );
    assert_eq!(
        g.metric("fieldgate_modbus_writes_total{device=\"w\",result=\"error\"}"),
        5.0
    );
}

#[tokio::test]
async fn a_cloud_command_reaches_a_tag_through_the_downlink() {
    let sim = write_sim();
    let srv = serve_tcp(sim.clone()).await;
    let pki = Pki::new();
    let cloud = Cloud::start(&pki, &pki.server);
    let ports = GatewayPorts::new();
    let data = tempfile::tempdir().unwrap();
    let cfg = GatewayConfig::bridged(&pki, &ports, data.path(), cloud.port)
        .modbus(writes_device(srv.port))
        .to_toml();
    let g = Gateway::start(&cfg, &ports).await;
    let collector = Collector::start(&pki, cloud.port, "fieldgate/gw1/field/w/#").await;
    assert!(eventually(WAIT, || g.metric("fieldgate_cloud_connected") == 1.0).await);

    // The bridge subscribes to the downlink after connecting: repeat until answered.
    let result = "fieldgate/gw1/field/w/sp/set/result";
    let deadline = Instant::now() + WAIT;
    while collector.on_topic(result).is_empty() {
        assert!(Instant::now() < deadline, "no {result}\n{}", g.log_text());
        collector
            .client
            .publish(
                "fieldgate/gw1/cmd/field/w/sp/set",
                QoS::AtLeastOnce,
                false,
                br#"{"value":42,"id":"cloud-1"}"#.to_vec(),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let r: Json = serde_json::from_slice(&collector.on_topic(result)[0]).unwrap();
    assert_eq!(r, json!({"ok":true,"id":"cloud-1"}));
    assert_eq!(sim.holding(1, 0, 1), [Some(42)]);
    // And the reading itself goes up too.
    assert!(
        eventually(WAIT, || collector
            .on_topic("fieldgate/gw1/field/w/sp")
            .iter()
            .any(
                |p| serde_json::from_slice::<Json>(p).is_ok_and(|v| v["value"] == 42)
            ))
        .await
    );
}

fn fieldgate(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_fieldgate"))
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test]
async fn probe_prints_every_type_and_order() {
    let sim = Sim::new();
    sim.set_holding(1, 100, &layout(&25.5f32.to_be_bytes(), "CDAB"));
    sim.set_holding(1, 102, &[0x4142]);
    let srv = serve_tcp(sim).await;
    let host = format!("127.0.0.1:{}", srv.port);
    let h2 = host.clone();
    let out = tokio::task::spawn_blocking(move || {
        fieldgate(&[
            "modbus",
            "probe",
            "--tcp",
            &h2,
            "--unit",
            "1",
            "--kind",
            "holding",
            "--address",
            "100",
            "--count",
            "3",
        ])
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}"); // shown with --nocapture; docs/modbus.md quotes it
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The f32 row at 100 shows 25.5 in the CDAB column (the second of ABCD CDAB BADC DCBA).
    let header = text
        .lines()
        .find(|l| l.starts_with("32-bit"))
        .expect("32-bit header");
    let cols: Vec<&str> = header.split_whitespace().collect();
    assert_eq!(cols[1..], ["ABCD", "CDAB", "BADC", "DCBA"], "{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with("  100 f32"))
        .expect("f32 row");
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[3], "25.5", "{text}");
    assert!(text.contains("  102    0x4142"), "{text}");

    // An exception is reported, with a non-zero exit.
    let out = tokio::task::spawn_blocking(move || {
        fieldgate(&[
            "modbus",
            "probe",
            "--tcp",
            &host,
            "--address",
            "7000",
            "--count",
            "2",
        ])
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(69));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("illegal data address"),
        "{out:?}"
    );
}

#[test]
fn check_config_names_modbus_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"
[[modbus]]
name = "m1"
host = "127.0.0.1:502"
[[modbus.tags]]
name = "a"
address = 1
[[modbus.tags]]
name = "b"
address = 65535
type = "f32"
[[modbus]]
name = "r"
transport = "rtu"
[[modbus.tags]]
name = "c"
kind = "input_register"
writable = true
"#,
    )
    .unwrap();
    let out = fieldgate(&["check-config", "-c", path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    for key in [
        "modbus[0].tags[1].address",
        "modbus[1].serial_port",
        "modbus[1].tags[0].writable",
    ] {
        assert!(err.contains(key), "{key} missing:\n{err}");
    }
}

/// The commented example in configs/fieldgate.toml is valid once uncommented.
#[test]
fn shipped_modbus_example_validates() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("configs/fieldgate.toml")).unwrap();
    let (_, rest) = text
        .split_once("# modbus-example-begin\n")
        .expect("begin marker");
    let (block, _) = rest.split_once("# modbus-example-end").expect("end marker");
    let toml: String = block
        .lines()
        .map(|l| l.strip_prefix("# ").unwrap_or(l.trim_start_matches('#')))
        .collect::<Vec<_>>()
        .join("\n");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("example.toml");
    std::fs::write(&path, &toml).unwrap();
    let out = fieldgate(&["check-config", "-c", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}\n{toml}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = fieldgate(&["print-config", "-c", path.to_str().unwrap()]);
    let printed = String::from_utf8_lossy(&printed.stdout);
    assert!(printed.contains("[[modbus.tags]]"), "{printed}");
    // The effective configuration loads back as it was printed.
    let again = dir.path().join("printed.toml");
    std::fs::write(&again, printed.as_bytes()).unwrap();
    let out = fieldgate(&["print-config", "-c", again.to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), printed);
}

/// Modbus RTU CRC-16 (poly 0xA001, init 0xFFFF), for the hand-made frames below.
fn crc16(data: &[u8]) -> u16 {
    let mut crc = 0xffffu16;
    for b in data {
        crc ^= u16::from(*b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xa001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// How the hand-made RTU device answers.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Wire {
    Good,
    BadCrc,
    WrongUnit,
}

#[tokio::test]
async fn rtu_bad_frames_are_counted_and_never_desynchronise_the_line() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut pty = PtyPair::new();
    let mode = Arc::new(Mutex::new(Wire::Good));
    let value = Arc::new(Mutex::new(7u16));
    // A raw device on the other end: answers "read holding registers" of unit 1 by hand.
    let mut port = pty.device();
    let (m2, v2) = (mode.clone(), value.clone());
    tokio::spawn(async move {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 64];
        loop {
            let Ok(n) = port.read(&mut chunk).await else {
                return;
            };
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..n]);
            while buf.len() >= 8 {
                let req: Vec<u8> = buf.drain(..8).collect();
                if req[1] != 3 || crc16(&req[..6]).to_le_bytes() != [req[6], req[7]] {
                    buf.clear();
                    continue;
                }
                let mode = *m2.lock().unwrap();
                let v = *v2.lock().unwrap();
                let unit = if mode == Wire::WrongUnit { 9 } else { req[0] };
                let mut resp = vec![unit, 3, 2, (v >> 8) as u8, v as u8];
                let mut crc = crc16(&resp).to_le_bytes();
                if mode == Wire::BadCrc {
                    crc[0] ^= 0xff;
                }
                resp.extend_from_slice(&crc);
                let _ = port.write_all(&resp).await;
            }
        }
    });
    let modbus = ModbusDevice::rtu("raw", &pty.gw)
        .with(toml! {
            timeout = "200ms"
            retries = 0
            poll_interval = "100ms"
            reconnect_min = "100ms"
            reconnect_max = "200ms"
        })
        .tag("v", 0);
    let ports = GatewayPorts::new();
    let data = tempfile::tempdir().unwrap();
    let g = Gateway::start(&config(&ports, data.path(), [modbus]), &ports).await;
    let sub = Sub::start(g.mqtt, "field/#").await;
    sub.wait_last(&g, "field/raw/v", |v| v["value"] == 7).await;

    // A corrupt CRC: the frame is dropped, so the request gets no answer.
    *mode.lock().unwrap() = Wire::BadCrc;
    sub.wait_last(&g, "field/raw/status", |v| v["state"] == "offline")
        .await;
    let st = sub.last("field/raw/status").unwrap();
    assert!(
        ["timeout", "bad_frame"].contains(&st["kind"].as_str().unwrap_or("")),
        "{st}"
    );

    // An answer from the wrong unit: a bad frame.
    *mode.lock().unwrap() = Wire::WrongUnit;
    assert!(
        eventually(WAIT, || g.metric(
            "fieldgate_modbus_errors_total{device=\"raw\",kind=\"bad_frame\"}"
        ) >= 1.0)
        .await,
        "{}",
        g.log_text()
    );

    // Good answers again: online, and the value is the new one, not a stale frame.
    *value.lock().unwrap() = 8;
    *mode.lock().unwrap() = Wire::Good;
    sub.wait_last(&g, "field/raw/status", |v| v["state"] == "online")
        .await;
    let v = sub.wait_last(&g, "field/raw/v", |v| v["value"] == 8).await;
    assert!(good(&v), "{v}");
    // From here on every reading is the device's current value.
    let n = sub.on("field/raw/v").len();
    assert!(
        eventually(WAIT, || sub.on("field/raw/v").len() >= n + 5).await,
        "polling stopped"
    );
    assert!(sub.on("field/raw/v")[n..]
        .iter()
        .all(|v| v["value"] == 8 && good(v)));
}

#[tokio::test]
async fn per_tag_intervals_and_publish_on_change_with_deadband() {
    let sim = Sim::new();
    sim.set_holding(1, 0, &[1, 100, 50, 7]);
    let srv = serve_tcp(sim.clone()).await;
    let modbus = ModbusDevice::tcp("pc", srv.port)
        .with(toml! {
            timeout = "5s"
            poll_interval = "100ms"
            retain = true
            max_gap = 2
        })
        .tag("fast", 0)
        .tag_with("slow", 3, toml! { poll_interval = "1h" })
        .tag_with("steady", 1, toml! { on_change = true })
        .tag_with("banded", 2, toml! { on_change = true deadband = 5.0 });
    let ports = GatewayPorts::new();
    let data = tempfile::tempdir().unwrap();
    let g = Gateway::start(&config(&ports, data.path(), [modbus]), &ports).await;
    let sub = Sub::start(g.mqtt, "field/#").await;
    sub.wait_last(&g, "field/pc/slow", |v| v["value"] == 7)
        .await;
    sub.wait_last(&g, "field/pc/steady", |v| v["value"] == 100)
        .await;
    sub.wait_last(&g, "field/pc/banded", |v| v["value"] == 50)
        .await;

    // Changes below the deadband, and a change of the hour-interval tag, are not published
    // while the 100 ms tag goes on.
    sim.set_holding(1, 2, &[53]);
    sim.set_holding(1, 3, &[8]);
    let mark = sub.on("field/pc/fast").len();
    assert!(eventually(WAIT, || sub.on("field/pc/fast").len() >= mark + 5).await);
    assert_eq!(sub.on("field/pc/slow").len(), 1);
    assert_eq!(sub.on("field/pc/slow")[0]["value"], 7);
    assert_eq!(sub.on("field/pc/steady").len(), 1);
    assert_eq!(sub.on("field/pc/banded").len(), 1);

    // Past the deadband (from the last published 50), and a change: published once each.
    sim.set_holding(1, 2, &[56]);
    sim.set_holding(1, 1, &[101]);
    sub.wait_last(&g, "field/pc/banded", |v| v["value"] == 56)
        .await;
    sub.wait_last(&g, "field/pc/steady", |v| v["value"] == 101)
        .await;
    let mark = sub.on("field/pc/fast").len();
    assert!(eventually(WAIT, || sub.on("field/pc/fast").len() >= mark + 3).await);
    assert_eq!(sub.on("field/pc/banded").len(), 2);
    assert_eq!(sub.on("field/pc/steady").len(), 2);
    assert_eq!(sub.on("field/pc/slow").len(), 1);
}

/// Issue 13, item 1: a tag that fails from the start (exception 2) is not invisible with the
/// default `retain = false`: the retained status says `degraded` with the failing tag and its
/// error, and the bad reading is published again while it stays bad, so a subscriber that
/// came after the first poll sees it.
#[tokio::test]
async fn a_tag_broken_from_the_start_degrades_the_device_and_is_seen_by_a_late_subscriber() {
    let sim = Sim::new();
    sim.set_holding(1, 0, &[5]);
    let srv = serve_tcp(sim.clone()).await;
    let modbus = ModbusDevice::tcp("dg", srv.port)
        .with(toml! { poll_interval = "100ms" timeout = "5s" bad_repeat = "200ms" })
        .tag("ok", 0)
        .tag("broken", 500);
    let ports = GatewayPorts::new();
    let data = tempfile::tempdir().unwrap();
    let g = Gateway::start(&config(&ports, data.path(), [modbus]), &ports).await;
    // Subscribes after the first poll (the gateway is ready, the readings went out).
    let sub = Sub::start(g.mqtt, "field/#").await;
    let st = sub
        .wait_last(&g, "field/dg/status", |v| v["state"] == "degraded")
        .await;
    assert_eq!(
        st["failing"],
        json!([{"tag":"broken","quality":"exception","error":"illegal data address (exception 2)"}]),
        "{st}"
    );
    assert!(
        sub.0
            .received
            .lock()
            .unwrap()
            .iter()
            .any(|m| m.topic == "field/dg/status" && m.retain),
        "the status is retained"
    );
    let m = sub
        .wait_last(&g, "field/dg/broken", |v| v["quality"] == "exception")
        .await;
    assert_eq!(m["error"], "illegal data address (exception 2)");
    assert_eq!(sub.wait_last(&g, "field/dg/ok", good).await["value"], 5);

    // The tag is mapped: good again, and the device is online with nothing failing.
    sim.set_holding(1, 500, &[9]);
    sub.wait_last(&g, "field/dg/broken", |v| v["value"] == 9 && good(v))
        .await;
    let st = sub
        .wait_last(&g, "field/dg/status", |v| v["state"] == "online")
        .await;
    assert!(st.get("failing").is_none(), "{st}");
    assert_eq!(g.metric("fieldgate_modbus_online{device=\"dg\"}"), 1.0);
}

/// Issue 13, item 2: every answer on `/set/result` carries the request's id when it had one,
/// refusals of malformed requests included.
#[tokio::test]
async fn a_refused_write_keeps_its_id() {
    let sim = write_sim();
    let srv = serve_tcp(sim.clone()).await;
    let ports = GatewayPorts::new();
    let data = tempfile::tempdir().unwrap();
    let g = Gateway::start(
        &config(&ports, data.path(), [writes_device(srv.port)]),
        &ports,
    )
    .await;
    let sub = Sub::start(g.mqtt, "field/#").await;
    sub.wait_last(&g, "field/w/status", |v| v["state"] != Json::Null)
        .await;
    for (tag, payload) in [
        ("sp", r#"{"id":"e8"}"#),
        ("sp", r#"{"id":"e9","valeu":3}"#),
        ("nosuch", r#"{"id":"e10"}"#),
    ] {
        let id = serde_json::from_str::<Json>(payload).unwrap()["id"].clone();
        let topic = format!("field/w/{tag}/set/result");
        let before = sub.on(&topic).len();
        sub.publish(&format!("field/w/{tag}/set"), payload).await;
        let deadline = Instant::now() + WAIT;
        while sub.on(&topic).len() == before {
            assert!(Instant::now() < deadline, "no {topic}\n{}", g.log_text());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let r = sub.on(&topic)[before].clone();
        assert_eq!(r["id"], id, "{payload}: {r}");
        assert_eq!(r["ok"], false, "{r}");
        let code = if tag == "nosuch" {
            "unknown_tag"
        } else {
            "bad_request"
        };
        assert_eq!(r["code"], code, "{r}");
    }
    assert_eq!(sim.holding(1, 0, 1), [Some(0)], "nothing was written");
}

/// Issue 13, item 3: f32 values are published as the shortest decimal that round-trips the
/// f32, scaled values at the precision the scale implies (or `decimals`), and the probe
/// prints the same numbers as MQTT.
#[tokio::test]
async fn floats_are_published_without_binary_noise_and_the_probe_agrees() {
    let sim = Sim::new();
    sim.set_holding(1, 0, &layout(&std::f32::consts::PI.to_be_bytes(), "ABCD"));
    sim.set_holding(1, 2, &[0, 0]);
    sim.set_holding(1, 10, &[3]);
    sim.set_holding(1, 11, &[2155]);
    sim.set_holding(1, 20, &layout(&(-1234.5678f32).to_be_bytes(), "ABCD"));
    sim.set_holding(1, 30, &layout(&21.456f32.to_be_bytes(), "ABCD"));
    let srv = serve_tcp(sim.clone()).await;
    let modbus = ModbusDevice::tcp("fl", srv.port)
        .with(toml! { timeout = "5s" poll_interval = "100ms" })
        .tag_with("pi", 0, toml! { type = "f32" })
        .tag_with("sp", 2, toml! { type = "f32" writable = true })
        .tag_with("tenths", 10, toml! { type = "i16" scale = 0.1 })
        .tag_with("hundredths", 11, toml! { scale = 0.01 })
        .tag_with("neg", 20, toml! { type = "f32" })
        .tag_with("rounded", 30, toml! { type = "f32" decimals = 1 });
    let ports = GatewayPorts::new();
    let data = tempfile::tempdir().unwrap();
    let g = Gateway::start(&config(&ports, data.path(), [modbus]), &ports).await;
    let sub = Sub::start(g.mqtt, "field/#").await;
    // The exact text of the value in the last payload on `topic`.
    let text = |topic: &str| -> String {
        let p = sub.0.on(topic).pop().unwrap_or_default();
        let s = String::from_utf8_lossy(&p).into_owned();
        s.split_once("\"value\":")
            .and_then(|(_, r)| r.split([',', '}']).next())
            .unwrap_or("")
            .to_string()
    };
    for (tag, want) in [
        ("pi", "3.1415927"),
        ("tenths", "0.3"),
        ("hundredths", "21.55"),
        ("neg", "-1234.5677"),
        ("rounded", "21.5"),
    ] {
        let topic = format!("field/fl/{tag}");
        sub.wait_last(&g, &topic, good).await;
        assert_eq!(text(&topic), want, "{topic}: {:?}", sub.on(&topic));
    }

    // A written 0.1 reads back as 0.1.
    sub.publish("field/fl/sp/set", "0.1").await;
    sub.wait_last(&g, "field/fl/sp/set/result", |r| r["ok"] == true)
        .await;
    // (As f64: the value is published as the float 0.0, which `!= 0` (an integer) would
    // take as changed already.)
    sub.wait_last(&g, "field/fl/sp", |v| v["value"].as_f64() != Some(0.0))
        .await;
    assert_eq!(text("field/fl/sp"), "0.1", "{:?}", sub.on("field/fl/sp"));

    // The probe shows the f32 at 20 as MQTT does.
    let host = format!("127.0.0.1:{}", srv.port);
    let out = tokio::task::spawn_blocking(move || {
        fieldgate(&[
            "modbus",
            "probe",
            "--tcp",
            &host,
            "--address",
            "20",
            "--count",
            "2",
        ])
    })
    .await
    .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with("   20 f32"))
        .unwrap_or_else(|| panic!("f32 row:\n{table}"));
    assert_eq!(row.split_whitespace().nth(2), Some("-1234.5677"), "{table}");
}

/// Issue 13, item 10: RTU frames over TCP. A serial-to-Ethernet converter (a TCP listener
/// piping bytes to a pty) in front of tokio-modbus's RTU server with two units: both units
/// are polled and written over the one connection, as one bus.
#[tokio::test]
async fn rtu_over_tcp_reaches_two_units_behind_one_converter() {
    let mut pty = PtyPair::new();
    let sim = Sim::new();
    sim.set_holding(1, 0, &[101]);
    sim.set_holding(2, 0, &[202, 0]);
    let _rtu = serve_rtu(sim.clone(), pty.device());
    let conv = serve_converter(&pty.gw).await;
    let dev = |name: &str, unit: u8| {
        ModbusDevice::rtu_over_tcp(name, conv.port)
            .with(toml! { unit_id = (unit) timeout = "5s" poll_interval = "100ms" })
            .tag_with("v", 0, toml! { writable = true })
    };
    // The probe reads through the converter too (before the gateway takes its one
    // connection): 202 = 0x00ca at 0 of unit 2.
    let host = format!("127.0.0.1:{}", conv.port);
    let out = tokio::task::spawn_blocking(move || {
        fieldgate(&[
            "modbus",
            "probe",
            "--rtu-over-tcp",
            &host,
            "--unit",
            "2",
            "--address",
            "0",
            "--count",
            "1",
        ])
    })
    .await
    .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(table.contains("    0    0x00ca"), "{table}");

    let modbus = [dev("u1", 1), dev("u2", 2)];
    let ports = GatewayPorts::new();
    let data = tempfile::tempdir().unwrap();
    let g = Gateway::start(&config(&ports, data.path(), modbus), &ports).await;
    let sub = Sub::start(g.mqtt, "field/#").await;
    sub.wait_last(&g, "field/u1/v", |v| v["value"] == 101 && good(v))
        .await;
    sub.wait_last(&g, "field/u2/v", |v| v["value"] == 202 && good(v))
        .await;
    sub.wait_last(&g, "field/u2/status", |v| v["state"] == "online")
        .await;

    sub.publish("field/u2/v/set", r#"{"value":7,"id":"rt"}"#)
        .await;
    let r = sub
        .wait_last(&g, "field/u2/v/set/result", |r| r["id"] == "rt")
        .await;
    assert_eq!(r, json!({"ok":true,"id":"rt"}));
    assert_eq!(sim.holding(2, 0, 1), [Some(7)]);
    assert_eq!(sim.holding(1, 0, 1), [Some(101)], "unit 1 untouched");
    sub.wait_last(&g, "field/u2/v", |v| v["value"] == 7).await;
    // One bus for the converter, named after it.
    let bus = format!(
        "fieldgate_modbus_cycles_total{{bus=\"rtu_over_tcp:127.0.0.1:{}\"}}",
        conv.port
    );
    assert!(
        g.metric(&bus) >= 1.0,
        "{}",
        g.get("/metrics").unwrap_or_default()
    );
}

/// Issue 13, item 10: a coil tag of `count` coils reads as an array and is written whole
/// with function 15 (write multiple coils); a wrong number of values writes nothing.
#[tokio::test]
async fn a_multi_coil_tag_reads_as_an_array_and_writes_with_function_15() {
    let sim = Sim::new();
    sim.with(1, |u| {
        for (a, b) in [false, true, false, false].into_iter().enumerate() {
            u.coils.insert(a as u16, b);
        }
        u.discrete.insert(0, true);
        u.discrete.insert(1, false);
    });
    let srv = serve_tcp(sim.clone()).await;
    let modbus = ModbusDevice::tcp("mc", srv.port)
        .with(toml! { timeout = "5s" poll_interval = "100ms" })
        .tag_with(
            "relays",
            0,
            toml! { kind = "coil" count = 4 writable = true },
        )
        .tag_with("inputs", 0, toml! { kind = "discrete_input" count = 2 });
    let ports = GatewayPorts::new();
    let data = tempfile::tempdir().unwrap();
    let g = Gateway::start(&config(&ports, data.path(), [modbus]), &ports).await;
    let sub = Sub::start(g.mqtt, "field/#").await;
    sub.wait_last(&g, "field/mc/relays", |v| {
        v["value"] == json!([false, true, false, false])
    })
    .await;
    sub.wait_last(&g, "field/mc/inputs", |v| {
        v["value"] == json!([true, false])
    })
    .await;

    sub.publish(
        "field/mc/relays/set",
        r#"{"value":[true,true,false,1],"id":"c15"}"#,
    )
    .await;
    let r = sub
        .wait_last(&g, "field/mc/relays/set/result", |r| r["id"] == "c15")
        .await;
    assert_eq!(r, json!({"ok":true,"id":"c15"}));
    assert_eq!(
        sim.with(1, |u| (0..4).map(|a| u.coils[&a]).collect::<Vec<_>>()),
        [true, true, false, true]
    );
    let writes = sim.writes.lock().unwrap().clone();
    assert_eq!(
        writes,
        [tokio_modbus::Request::WriteMultipleCoils(
            0,
            vec![true, true, false, true].into()
        )]
    );
    sub.wait_last(&g, "field/mc/relays", |v| {
        v["value"] == json!([true, true, false, true])
    })
    .await;

    sub.publish("field/mc/relays/set", r#"{"value":[false],"id":"short"}"#)
        .await;
    let r = sub
        .wait_last(&g, "field/mc/relays/set/result", |r| r["id"] == "short")
        .await;
    assert_eq!(r["code"], "bad_request", "{r}");
    assert_eq!(
        r["error"],
        "wrong number of values: 1 for a tag of count 4; send an array of 4 booleans"
    );
    assert_eq!(
        sim.writes.lock().unwrap().len(),
        1,
        "nothing more was written"
    );
}

/// Issue 13, item 11: `publish = "batch"` sends one message per `publish_interval` holding
/// every tag of the device (value, quality, error of a failing tag, unit), no per-tag
/// messages; writes on `<tag topic>/set` still work, the status topic is unchanged, and the
/// batches are what reaches the cloud path (queued records).
#[tokio::test]
async fn batch_mode_publishes_every_tag_in_one_message_and_queues_it() {
    let sim = Sim::new();
    sim.set_holding(1, 0, &[5]);
    sim.set_holding(1, 10, &[215]);
    sim.set_holding(1, 20, &layout(&std::f32::consts::PI.to_be_bytes(), "ABCD"));
    let srv = serve_tcp(sim.clone()).await;
    // Only batches are forwarded, so every queued record is one.
    let modbus = ModbusDevice::tcp("b", srv.port)
        .with(toml! {
            poll_interval = "100ms"
            timeout = "5s"
            publish = "batch"
            publish_interval = "200ms"
        })
        .tag_with("power", 0, toml! { unit = "W" })
        .tag_with(
            "setpoint",
            10,
            toml! { type = "i16" scale = 0.1 unit = "degC" writable = true },
        )
        .tag_with("pi", 20, toml! { type = "f32" })
        .tag("broken", 500);
    let ports = GatewayPorts::new();
    let data = tempfile::tempdir().unwrap();
    let cfg = local(&ports, data.path())
        .set("uplink.forward", vec!["field/+/batch"])
        .modbus(modbus)
        .to_toml();
    let g = Gateway::start(&cfg, &ports).await;
    let sub = Sub::start(g.mqtt, "field/#").await;
    let b = sub
        .wait_last(&g, "field/b/batch", |v| v["values"].is_object())
        .await;
    // The f32 as on its tag topic: the shortest decimal that reads back as the same f32.
    assert_eq!(b["values"]["pi"].to_string(), "3.1415927", "{b}");
    let mut values = b["values"].clone();
    values.as_object_mut().map(|m| m.remove("pi"));
    assert_eq!(
        values,
        json!({"power":5,"setpoint":21.5,"broken":null}),
        "{b}"
    );
    assert_eq!(
        b["quality"],
        json!({"power":"good","setpoint":"good","pi":"good","broken":"exception"}),
        "{b}"
    );
    assert_eq!(
        b["errors"],
        json!({"broken":"illegal data address (exception 2)"}),
        "{b}"
    );
    assert_eq!(b["units"], json!({"power":"W","setpoint":"degC"}), "{b}");
    assert!(b["ts"].as_u64().is_some_and(|t| t > 0), "{b}");
    // The status topic is as in per-tag mode.
    let st = sub
        .wait_last(&g, "field/b/status", |v| v["state"] == "degraded")
        .await;
    assert_eq!(st["failing"][0]["tag"], "broken", "{st}");

    // Writes on the tag's set topic work; the next batches carry the new value.
    sub.publish("field/b/setpoint/set", r#"{"value":22.5,"id":"w1"}"#)
        .await;
    let r = sub
        .wait_last(&g, "field/b/setpoint/set/result", |v| v["id"] == "w1")
        .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(sim.holding(1, 10, 1), [Some(225)]);
    sub.wait_last(&g, "field/b/batch", |v| v["values"]["setpoint"] == 22.5)
        .await;

    // Several batches, and never a per-tag message.
    let deadline = Instant::now() + WAIT;
    while sub.on("field/b/batch").len() < 3 {
        assert!(
            Instant::now() < deadline,
            "fewer than 3 batches\n{}",
            g.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for tag in ["power", "setpoint", "pi", "broken"] {
        assert!(
            sub.on(&format!("field/b/{tag}")).is_empty(),
            "per-tag message on field/b/{tag} in batch mode"
        );
    }
    // Each batch is a record on the cloud path: at least as many as the subscriber saw.
    let seen = sub.on("field/b/batch").len() as f64;
    let ok = eventually(WAIT, || {
        g.metric("fieldgate_messages_in_total") >= seen
            && g.metric("fieldgate_queue_records") >= seen
    })
    .await;
    assert!(
        ok,
        "{seen} batches seen\n{}",
        g.get("/metrics").unwrap_or_default()
    );
}

/// Issue 13, item 12: the tags `fieldgate modbus import` makes from a vendor's CSV read a
/// real device as the list says (classic numbering, a vendor type name, word order, a
/// decimal comma, a coil and an input register).
#[tokio::test]
async fn imported_tags_read_the_device_as_the_vendor_list_says() {
    let sim = Sim::new();
    sim.set_holding(1, 0, &layout(&230.5f32.to_be_bytes(), "CDAB"));
    sim.with(1, |u| {
        u.input.insert(10, 2155);
        u.coils.insert(0, true);
    });
    let srv = serve_tcp(sim.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("meter.csv");
    std::fs::write(
        &csv,
        "Tag Name;Register;Data Type;Byte Order;Scale Factor;Units;Description\n\
         voltage;40001;FLOAT32;CDAB;;V;\"L1; RMS\"\n\
         temp;30011;UINT16;;0,01;degC;\n\
         pump;00001;;;;;\n",
    )
    .unwrap();
    let out = fieldgate(&["modbus", "import", csv.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The `[[modbus.tags]]` tables the import printed, as they are (tests/cli.rs checks that
    // the text pastes under a device).
    let printed = String::from_utf8(out.stdout).unwrap();
    let printed: toml::Table = toml::from_str(&printed)
        .unwrap_or_else(|e| panic!("import output is not TOML: {e}\n{printed}"));
    let tags = printed
        .get("modbus")
        .and_then(|m| m.get("tags"))
        .and_then(|t| t.as_array())
        .unwrap_or_else(|| panic!("no [[modbus.tags]] in the import output: {printed}"))
        .iter()
        .map(|t| t.as_table().cloned().expect("a tag table"));
    let modbus = ModbusDevice::tcp("imp", srv.port)
        .with(toml! { timeout = "5s" poll_interval = "100ms" })
        .tags(tags);
    let ports = GatewayPorts::new();
    let data = tempfile::tempdir().unwrap();
    let g = Gateway::start(&config(&ports, data.path(), [modbus]), &ports).await;
    let sub = Sub::start(g.mqtt, "field/#").await;
    let good = |v: &Json| v["quality"] == "good";
    let v = sub.wait_last(&g, "field/imp/voltage", good).await;
    assert_eq!(v["value"].as_f64(), Some(230.5), "{v}");
    assert_eq!(v["unit"], "V", "{v}");
    let t = sub.wait_last(&g, "field/imp/temp", good).await;
    assert_eq!(t["value"].as_f64(), Some(21.55), "{t}");
    let p = sub.wait_last(&g, "field/imp/pump", good).await;
    assert_eq!(p["value"], true, "{p}");
}

/// `[gateway.namespace]` with the four ISA-95 levels: readings and status arrive under
/// `<enterprise>/<site>/<area>/<line>/<device>/...`, a device's own `line` moves its topics,
/// and nothing is published under the old `field/` root.
#[tokio::test]
async fn an_isa95_namespace_puts_the_default_topics_under_the_plant_levels() {
    let (sim_a, sim_b) = (Sim::new(), Sim::new());
    sim_a.set_holding(1, 0, &[42]);
    sim_b.set_holding(1, 0, &[7]);
    let (srv_a, srv_b) = (
        serve_tcp(sim_a.clone()).await,
        serve_tcp(sim_b.clone()).await,
    );
    let filler = ModbusDevice::tcp("filler", srv_a.port)
        .with(toml! { poll_interval = "100ms" timeout = "5s" })
        .tag("speed", 0);
    let capper = ModbusDevice::tcp("capper", srv_b.port)
        .with(toml! { poll_interval = "100ms" timeout = "5s" line = "line4" })
        .tag("torque", 0);
    let ports = GatewayPorts::new();
    let data = tempfile::tempdir().unwrap();
    let cfg = local(&ports, data.path())
        .with(
            "gateway.namespace",
            toml! {
                enterprise = "acme"
                site = "plant1"
                area = "packaging"
                line = "line3"
            },
        )
        .modbus(filler)
        .modbus(capper)
        .to_toml();
    let g = Gateway::start(&cfg, &ports).await;
    let sub = Sub::start(g.mqtt, "#").await;
    let m = sub
        .wait_last(&g, "acme/plant1/packaging/line3/filler/speed", good)
        .await;
    assert_eq!(m["value"], 42, "{m}");
    let m = sub
        .wait_last(&g, "acme/plant1/packaging/line4/capper/torque", good)
        .await;
    assert_eq!(m["value"], 7, "{m}");
    sub.wait_last(&g, "acme/plant1/packaging/line3/filler/status", |v| {
        v["state"] == "online"
    })
    .await;
    let old: Vec<String> = sub
        .topics()
        .into_iter()
        .filter(|t| t.starts_with("field/"))
        .collect();
    assert!(old.is_empty(), "published under field/: {old:?}");
}
