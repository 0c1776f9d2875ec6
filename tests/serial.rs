//! Serial-line devices end to end: the real gateway binary opens the slave of a pty pair
//! (through a stable symlink), the test plays the device on the master, and a plain MQTT
//! client on the gateway's broker checks the exact topics and payloads. Unplugging closes the
//! master and removes the symlink; plugging back in is a new pair behind the same symlink
//! (see [`common::pty`]).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::pty::PtyPair;
use common::{eventually, path, Gateway, GatewayConfig, GatewayPorts, LocalSub};
use rumqttc::QoS;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use toml::toml;

const WITHIN: Duration = Duration::from_secs(15);

/// A gateway config without a cloud; tests push their `[[serial]]` tables onto it.
fn config(data_dir: &Path, ports: &GatewayPorts) -> GatewayConfig {
    GatewayConfig::local(ports, data_dir)
        .set("gateway.shutdown_grace", "1s")
        .set("store.commit_interval", "20ms")
}

/// A plain MQTT client of the gateway's broker that records everything on `filter`.
struct Sub(LocalSub);

impl Sub {
    async fn start(port: u16, filter: &str) -> Sub {
        Sub(LocalSub::start(port, filter, QoS::AtLeastOnce).await)
    }

    /// Payloads received on `topic`, in order.
    fn on(&self, topic: &str) -> Vec<Vec<u8>> {
        self.0.on(topic)
    }

    /// Waits until `topic` has at least `n` messages; returns them all.
    async fn wait_n(&self, topic: &str, n: usize) -> Vec<Vec<u8>> {
        eventually(WITHIN, || self.on(topic).len() >= n).await;
        let got = self.on(topic);
        assert!(
            got.len() >= n,
            "{topic}: {} of {n} messages arrived: {:?}",
            got.len(),
            got.iter()
                .map(|p| String::from_utf8_lossy(p))
                .collect::<Vec<_>>()
        );
        got
    }

    /// Waits until the last status on `topic` has `state`; returns that status.
    async fn wait_status(&self, topic: &str, state: &str) -> Value {
        let last = || {
            self.on(topic)
                .last()
                .and_then(|p| serde_json::from_slice::<Value>(p).ok())
        };
        eventually(WITHIN, || last().is_some_and(|v| v["state"] == state)).await;
        let v = last().unwrap_or(Value::Null);
        assert_eq!(v["state"], state, "{topic}: last status {v}");
        v
    }

    /// The first status on `topic` with `state` (later ones may carry a newer error, such as
    /// a failed reopen's).
    fn first_status(&self, topic: &str, state: &str) -> Value {
        self.on(topic)
            .iter()
            .map(|p| json_of(p))
            .find(|v| v["state"] == state)
            .unwrap_or_else(|| panic!("{topic}: no {state} status"))
    }
}

fn json_of(p: &[u8]) -> Value {
    serde_json::from_slice(p).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(p)))
}

async fn write(dev: &mut tokio_serial::SerialStream, bytes: &[u8]) {
    tokio::time::timeout(Duration::from_secs(5), dev.write_all(bytes))
        .await
        .expect("write to the device end within 5s")
        .unwrap();
}

/// Waits until the gateway's metric `sample` equals `want`; asserts it.
/// The gateway with serial device `name` on `pty` (reconnecting within 50-200 ms, so an
/// unplug test is quick), and a subscriber to `field/#`.
async fn start_unpluggable(dir: &Path, pty: &PtyPair, name: &str) -> (Gateway, Sub) {
    let ports = GatewayPorts::new();
    let config = config(dir, &ports).push(
        "serial",
        toml! {
            name = name
            port = (path(&pty.gw))
            reconnect_min = "50ms"
            reconnect_max = "200ms"
        },
    );
    let g = Gateway::start(&config.to_toml(), &ports).await;
    let sub = Sub::start(ports.mqtt, "field/#").await;
    (g, sub)
}

async fn metric_is(g: &Gateway, sample: &str, want: f64) {
    eventually(WITHIN, || g.metric(sample) == want).await;
    assert_eq!(g.metric(sample), want, "{sample}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_are_decoded_and_published_in_every_mode() {
    let dir = tempfile::tempdir().unwrap();
    let mut term = PtyPair::start(dir.path(), "term");
    let mut meter = PtyPair::start(dir.path(), "meter");
    let mut scale = PtyPair::start(dir.path(), "scale");
    let mut tag = PtyPair::start(dir.path(), "tag");
    let ports = GatewayPorts::new();
    let config = config(dir.path(), &ports)
        .push(
            "serial",
            toml! {
                name = "term"
                port = (path(&term.gw))
                baud = 115200
                [framing]
                max_length = 16
            },
        )
        .push(
            "serial",
            toml! {
                name = "meter"
                port = (path(&meter.gw))
                [decode]
                mode = "json"
            },
        )
        .push(
            "serial",
            toml! {
                name = "scale"
                port = (path(&scale.gw))
                parity = "even"
                data_bits = 7
                topic = "plant/{gateway_id}/{device}"
                envelope = true
                [framing]
                delimiter = "\r\n"
                [decode]
                mode = "regex"
                pattern = (r"^(?P<net>-?\d+\.\d+)\s*(?P<unit>kg|lb)\s+(?P<id>\w+)$")
            },
        )
        .push(
            "serial",
            toml! {
                name = "tag"
                port = (path(&tag.gw))
                [framing]
                mode = "fixed"
                length = 4
                [decode]
                mode = "hex"
            },
        );
    let g = Gateway::start(&config.to_toml(), &ports).await;
    let sub = Sub::start(ports.mqtt, "#").await;
    for name in ["term", "meter", "scale", "tag"] {
        let status = sub
            .wait_status(&format!("field/{name}/status"), "online")
            .await;
        assert_eq!(status["error"], Value::Null);
        assert!(status["ts"].as_u64().unwrap() > 0);
    }
    let (mut d_term, mut d_meter, mut d_scale, mut d_tag) =
        (term.device(), meter.device(), scale.device(), tag.device());

    // raw: lossy text; CR stripped before the default "\n"; an over-long line is dropped and
    // the next one is intact.
    write(&mut d_term, b"hello world\r\n").await;
    write(&mut d_term, b"bin \xff!\n").await;
    write(&mut d_term, b"0123456789abcdefXYZ\n").await;
    write(&mut d_term, b"after\n").await;
    // json: passed through byte for byte; invalid JSON counted.
    write(&mut d_meter, b"{\"t\": 21.5, \"ok\": true}\n").await;
    write(&mut d_meter, b"{\"t\": 21.\n").await;
    write(&mut d_meter, b"[1,2]\n").await;
    // regex with an envelope, on a templated topic, CRLF delimited; one line does not match.
    write(&mut d_scale, b"12.50 kg A7\r\n").await;
    write(&mut d_scale, b"garbage\r\n").await;
    write(&mut d_scale, b"-0.25 lb 007\r\n").await;
    // fixed length, hex; the last two bytes wait for the rest of their frame.
    write(&mut d_tag, b"\x02\xa1\x00\x03\x02\xa2").await;

    let got = sub.wait_n("field/term/data", 3).await;
    assert_eq!(
        got,
        vec![
            b"hello world".to_vec(),
            "bin \u{fffd}!".as_bytes().to_vec(),
            b"after".to_vec()
        ]
    );
    let got = sub.wait_n("field/meter/data", 2).await;
    assert_eq!(
        got,
        vec![b"{\"t\": 21.5, \"ok\": true}".to_vec(), b"[1,2]".to_vec()]
    );
    let got = sub.wait_n("plant/gw1/scale", 2).await;
    let (a, b) = (json_of(&got[0]), json_of(&got[1]));
    assert_eq!(a["value"], json!({"net": 12.5, "unit": "kg", "id": "A7"}));
    assert_eq!(b["value"], json!({"net": -0.25, "unit": "lb", "id": "007"}));
    assert!(a["ts"].as_u64().unwrap() > 1_600_000_000_000, "{a}");
    assert_eq!(a.as_object().unwrap().len(), 2, "{a}");
    let got = sub.wait_n("field/tag/data", 1).await;
    assert_eq!(got, vec![b"02a10003".to_vec()]);

    // The counters tell the same story.
    let m = |s: &str| g.metric(s);
    assert_eq!(m("fieldgate_serial_frames_in_total{device=\"term\"}"), 4.0);
    assert_eq!(
        m("fieldgate_serial_frames_dropped_total{device=\"term\",reason=\"too_long\"}"),
        1.0
    );
    assert_eq!(
        m("fieldgate_serial_bytes_in_total{device=\"term\"}"),
        (13 + 7 + 20 + 6) as f64
    );
    assert_eq!(
        m("fieldgate_serial_frames_dropped_total{device=\"meter\",reason=\"decode_error\"}"),
        1.0
    );
    assert_eq!(
        m("fieldgate_serial_frames_dropped_total{device=\"scale\",reason=\"no_match\"}"),
        1.0
    );
    assert_eq!(m("fieldgate_serial_frames_in_total{device=\"scale\"}"), 3.0);
    assert_eq!(m("fieldgate_serial_bytes_in_total{device=\"tag\"}"), 6.0);
    assert_eq!(m("fieldgate_serial_online{device=\"tag\"}"), 1.0);
    // Nothing is published for dropped frames, and a data topic carries only data.
    assert_eq!(sub.on("field/term/data").len(), 3);
    assert_eq!(sub.on("field/meter/data").len(), 2);

    let (status, log) = g.terminate();
    assert!(status.success(), "{log}");
    drop((d_term, d_meter, d_scale, d_tag));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_on_the_write_topic_reach_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let mut pty = PtyPair::start(dir.path(), "reader");
    let ports = GatewayPorts::new();
    let config = config(dir.path(), &ports).push(
        "serial",
        toml! {
            name = "reader"
            port = (path(&pty.gw))
            write_line_ending = "\r\n"
        },
    );
    let g = Gateway::start(&config.to_toml(), &ports).await;
    let sub = Sub::start(ports.mqtt, "field/#").await;
    sub.wait_status("field/reader/status", "online").await;
    let mut dev = pty.device();

    for cmd in ["TARE", "BEEP 3"] {
        sub.0
            .client
            .publish("field/reader/write", QoS::AtLeastOnce, false, cmd)
            .await
            .unwrap();
    }
    let want = b"TARE\r\nBEEP 3\r\n";
    let mut got = Vec::new();
    let deadline = Instant::now() + WITHIN;
    let mut buf = [0u8; 256];
    while got.len() < want.len() && Instant::now() < deadline {
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(200), dev.read(&mut buf)).await
        {
            got.extend_from_slice(&buf[..n]);
        }
    }
    assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(want));
    metric_is(&g, "fieldgate_serial_writes_total{device=\"reader\"}", 2.0).await;

    // The device answers; what it says is published, not echoed back to the port.
    write(&mut dev, b"OK\r\n").await;
    assert_eq!(
        sub.wait_n("field/reader/data", 1).await,
        vec![b"OK".to_vec()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unplugged_device_goes_offline_and_comes_back_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    // The device is absent when the gateway starts.
    let mut pty = PtyPair::start(dir.path(), "gps");
    pty.unplug();
    let (g, sub) = start_unpluggable(dir.path(), &pty, "gps").await;
    let status = sub.wait_status("field/gps/status", "offline").await;
    let err = status["error"].as_str().unwrap_or_default().to_string();
    assert!(
        err.contains("cannot open") && err.contains("gps-gw"),
        "{status}"
    );
    assert_eq!(g.metric("fieldgate_serial_online{device=\"gps\"}"), 0.0);
    assert!(g.metric("fieldgate_serial_port_errors_total{device=\"gps\"}") >= 1.0);

    // Plugged in: online without a restart; a first open is not a reconnect.
    pty.plug_in();
    sub.wait_status("field/gps/status", "online").await;
    let mut dev = pty.device();
    write(&mut dev, b"$GPGGA,1\n").await;
    assert_eq!(
        sub.wait_n("field/gps/data", 1).await,
        vec![b"$GPGGA,1".to_vec()]
    );
    assert_eq!(
        g.metric("fieldgate_serial_reconnects_total{device=\"gps\"}"),
        0.0
    );
    // A late subscriber gets the retained status.
    let late = Sub::start(g.mqtt, "field/gps/status").await;
    eventually(WITHIN, || !late.on("field/gps/status").is_empty()).await;
    let retained = late.0.received.lock().unwrap()[0].clone();
    assert!(retained.retain, "status not retained");
    assert_eq!(json_of(&retained.payload)["state"], "online");

    // Unplugged while running.
    let errors_before = g.metric("fieldgate_serial_port_errors_total{device=\"gps\"}");
    drop(dev);
    pty.unplug();
    let status = sub.wait_status("field/gps/status", "offline").await;
    assert!(status["error"].is_string(), "{status}");
    metric_is(&g, "fieldgate_serial_online{device=\"gps\"}", 0.0).await;
    assert!(g.metric("fieldgate_serial_port_errors_total{device=\"gps\"}") > errors_before);
    // A write while unplugged is dropped and counted, not kept for later.
    sub.0
        .client
        .publish("field/gps/write", QoS::AtLeastOnce, false, "RESET")
        .await
        .unwrap();
    metric_is(
        &g,
        "fieldgate_serial_writes_dropped_total{device=\"gps\",reason=\"offline\"}",
        1.0,
    )
    .await;

    // Plugged back in: the gateway reopens the port by itself and lines flow again.
    pty.plug_in();
    sub.wait_status("field/gps/status", "online").await;
    metric_is(&g, "fieldgate_serial_reconnects_total{device=\"gps\"}", 1.0).await;
    assert_eq!(g.metric("fieldgate_serial_online{device=\"gps\"}"), 1.0);
    let mut dev = pty.device();
    write(&mut dev, b"$GPGGA,2\n").await;
    assert_eq!(
        sub.wait_n("field/gps/data", 2).await,
        vec![b"$GPGGA,1".to_vec(), b"$GPGGA,2".to_vec()]
    );
    // The write made while unplugged never reached the new port.
    let mut buf = [0u8; 64];
    let stale = tokio::time::timeout(Duration::from_millis(300), dev.read(&mut buf)).await;
    assert!(stale.is_err(), "unexpected bytes on the port: {stale:?}");

    let (exit, log) = g.terminate();
    assert!(exit.success(), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_present_at_start_goes_offline_when_unplugged_and_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    // The device is there when the gateway starts (the other unplug test starts without it).
    let mut pty = PtyPair::start(dir.path(), "scale");
    let (g, sub) = start_unpluggable(dir.path(), &pty, "scale").await;
    sub.wait_status("field/scale/status", "online").await;
    let mut dev = pty.device();
    write(&mut dev, b"12.50 kg\n").await;
    assert_eq!(
        sub.wait_n("field/scale/data", 1).await,
        vec![b"12.50 kg".to_vec()]
    );
    assert_eq!(g.metric("fieldgate_serial_online{device=\"scale\"}"), 1.0);

    // Unplugged while its first port is open.
    drop(dev);
    pty.unplug();
    metric_is(&g, "fieldgate_serial_online{device=\"scale\"}", 0.0).await;
    sub.wait_status("field/scale/status", "offline").await;
    // Seen through the hung-up line (EOF or EIO on read), as a real unplug is.
    let status = sub.first_status("field/scale/status", "offline");
    let err = status["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("end of file") || err.contains("read failed"),
        "{status}"
    );
    assert!(g.metric("fieldgate_serial_port_errors_total{device=\"scale\"}") >= 1.0);

    // Plugged back in: reopened by itself, lines flow again.
    pty.plug_in();
    sub.wait_status("field/scale/status", "online").await;
    metric_is(
        &g,
        "fieldgate_serial_reconnects_total{device=\"scale\"}",
        1.0,
    )
    .await;
    let mut dev = pty.device();
    write(&mut dev, b"13.00 kg\n").await;
    assert_eq!(
        sub.wait_n("field/scale/data", 2).await,
        vec![b"12.50 kg".to_vec(), b"13.00 kg".to_vec()]
    );

    let (exit, log) = g.terminate();
    assert!(exit.success(), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_whose_path_vanishes_goes_offline_though_its_line_is_not_hung_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut pty = PtyPair::start(dir.path(), "gps");
    let (g, sub) = start_unpluggable(dir.path(), &pty, "gps").await;
    sub.wait_status("field/gps/status", "online").await;
    let mut dev = pty.device();
    write(&mut dev, b"$GPGGA,1\n").await;
    sub.wait_n("field/gps/data", 1).await;

    // The path goes while the line stays up, so the open port reads neither data nor an
    // error: a pty whose master another process still holds, or a by-id link removed under
    // an open port. The device end is held, so the pty is not hung up.
    let slave = std::fs::read_link(&pty.gw).unwrap();
    std::fs::remove_file(&pty.gw).unwrap();
    metric_is(&g, "fieldgate_serial_online{device=\"gps\"}", 0.0).await;
    sub.wait_status("field/gps/status", "offline").await;
    let first_offline = sub.first_status("field/gps/status", "offline");
    let err = first_offline["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("gps-gw") && err.contains("vanished"),
        "{first_offline}"
    );

    // The path back (the same pty): reopened, and the line is read again.
    std::os::unix::fs::symlink(&slave, &pty.gw).unwrap();
    sub.wait_status("field/gps/status", "online").await;
    metric_is(&g, "fieldgate_serial_reconnects_total{device=\"gps\"}", 1.0).await;
    write(&mut dev, b"$GPGGA,2\n").await;
    assert_eq!(
        sub.wait_n("field/gps/data", 2).await,
        vec![b"$GPGGA,1".to_vec(), b"$GPGGA,2".to_vec()]
    );

    let (exit, log) = g.terminate();
    assert!(exit.success(), "{log}");
}
