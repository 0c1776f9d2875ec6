//! Local publish throughput and latency through the broker: fieldgate's front end (with and
//! without auth + ACL), a bare rumqttd 0.20 listener, and mosquitto with an equivalent ACL.
//!
//! Run: `cargo bench --bench broker` (`BENCH_MSGS=50000` to change the count).
//!
//! One publisher (rumqttc, QoS 1, inflight 100, 100-byte payloads carrying the send time)
//! and one subscriber (QoS 1 on `field/#`) per system, the systems one after the other.
//! Throughput = messages / (first send .. last arrival); latency = arrival - send, one clock.
//! Every wait is bounded: a stall prints what arrived and the run moves on.

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::TcpStream as StdStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

struct Run {
    name: &'static str,
    port: u16,
    publisher: Option<(&'static str, &'static str)>,
    subscriber: Option<(&'static str, &'static str)>,
}

/// Runs one system; its throughput in msg/s (None if the run failed).
async fn measure(r: &Run, n: usize, epoch: Instant) -> Option<f64> {
    let opts = |id: &str, login: Option<(&str, &str)>| {
        let mut o = MqttOptions::new(id, "127.0.0.1", r.port);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_inflight(100);
        if let Some((u, p)) = login {
            o.set_credentials(u, p);
        }
        o
    };
    let (sub, mut sel) = AsyncClient::new(opts("bench-sub", r.subscriber), 1000);
    sub.subscribe("field/#", QoS::AtLeastOnce).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), sel.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
            Ok(Ok(_)) => {}
            other => {
                println!("{:<28} subscriber failed: {other:?}", r.name);
                return None;
            }
        }
    }
    let collector = tokio::spawn(async move {
        let mut lat = Vec::with_capacity(n);
        let mut last = Instant::now();
        while lat.len() < n {
            match tokio::time::timeout(Duration::from_secs(10), sel.poll()).await {
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    let now = epoch.elapsed().as_nanos() as u64;
                    let sent: u64 = std::str::from_utf8(&p.payload[..20])
                        .ok()
                        .and_then(|s| s.trim().parse().ok())
                        .unwrap_or(now);
                    lat.push(now.saturating_sub(sent));
                    last = Instant::now();
                }
                Ok(Ok(_)) => {}
                _ => break,
            }
        }
        (lat, last)
    });
    let (publ, mut pel) = AsyncClient::new(opts("bench-pub", r.publisher), 1000);
    let start = Instant::now();
    let sender = tokio::spawn(async move {
        for _ in 0..n {
            let mut payload = format!("{:>20}", epoch.elapsed().as_nanos() as u64).into_bytes();
            payload.resize(100, b'.');
            if publ
                .publish("field/dev1/data", QoS::AtLeastOnce, false, payload)
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let mut acked = 0;
    while acked < n {
        match tokio::time::timeout(Duration::from_secs(10), pel.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            _ => break,
        }
    }
    sender.abort();
    let (mut lat, last) = collector.await.unwrap();
    let secs = last.duration_since(start).as_secs_f64();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(f64::NAN, |v| *v as f64 / 1e6)
    };
    println!(
        "{:<28} {:>7} / {n} delivered  {:>9.0} msg/s  p50 {:>7.2} ms  p99 {:>7.2} ms  (acked {acked})",
        r.name,
        lat.len(),
        lat.len() as f64 / secs,
        pct(0.5),
        pct(0.99),
    );
    (lat.len() == n).then(|| n as f64 / secs)
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while StdStream::connect(("127.0.0.1", port)).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn gateway(dir: &std::path::Path, port: u16, http: u16, secure: bool) -> Child {
    let extra = if secure {
        "[[broker.users]]\nusername = \"dev1\"\npassword_hash = \"HASH1\"\n\
         [[broker.users]]\nusername = \"admin\"\npassword_hash = \"HASH2\"\n\
         [broker.acl.default]\npublish = [\"field/%u/#\"]\nsubscribe = [\"cmd/%u/#\"]\n\
         [broker.acl.users.admin]\npublish = [\"#\"]\nsubscribe = [\"#\"]\n"
            .replace("HASH1", &hash("pw1"))
            .replace("HASH2", &hash("pwa"))
    } else {
        String::new()
    };
    let conf = dir.join("g.toml");
    std::fs::write(
        &conf,
        format!(
            "[gateway]\ndata_dir = \"{}\"\n[broker.listeners.default]\nlisten = \"127.0.0.1:{port}\"\n\
             allow_anonymous = {}\n[http]\nlisten = \"127.0.0.1:{http}\"\n{extra}",
            dir.join("data").display(),
            !secure
        ),
    )
    .unwrap();
    let c = fieldgate_command()
        .args(["run", "-c"])
        .arg(&conf)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_port(port);
    c
}

fn hash(p: &str) -> String {
    fieldgate::password::hash_password(p).unwrap()
}

fn plain_rumqttd(port: u16) {
    spawn_plain_rumqttd(port);
    wait_port(port);
}

fn mosquitto(dir: &std::path::Path, port: u16) -> Child {
    let pw = dir.join("passwd");
    for (u, p) in [("dev1", "pw1"), ("admin", "pwa")] {
        let mut c = Command::new("mosquitto_passwd");
        if !pw.exists() {
            c.arg("-c");
        }
        c.args(["-b"]).arg(&pw).args([u, p]).status().unwrap();
    }
    std::fs::write(
        dir.join("acl"),
        "pattern write field/%u/#\npattern read cmd/%u/#\nuser admin\ntopic readwrite #\n",
    )
    .unwrap();
    let conf = dir.join("m.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\nacl_file {}\n\
             persistence false\nmax_queued_messages 0\nmax_inflight_messages 100\n",
            pw.display(),
            dir.join("acl").display()
        ),
    )
    .unwrap();
    let c = Command::new(mosquitto_bin())
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_port(port);
    c
}

fn main() {
    let n: usize = std::env::var("BENCH_MSGS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let epoch = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    println!("{n} QoS 1 messages of 100 B, one publisher, one subscriber");
    rt.block_on(async {
        let port = free_port();
        plain_rumqttd(port);
        let r = Run {
            name: "rumqttd 0.20 direct",
            port,
            publisher: None,
            subscriber: None,
        };
        let direct = measure(&r, n, epoch).await;
        let mut ours = Vec::new();

        for (secure, name) in [(false, "fieldgate front end"), (true, "fieldgate auth+ACL")] {
            let d = dir.path().join(name.replace(' ', "_"));
            std::fs::create_dir_all(&d).unwrap();
            let (port, http) = (free_port(), free_port());
            let mut g = gateway(&d, port, http, secure);
            let r = Run {
                name,
                port,
                publisher: secure.then_some(("dev1", "pw1")),
                subscriber: secure.then_some(("admin", "pwa")),
            };
            ours.push(measure(&r, n, epoch).await);
            let peak = proc_kib(g.id(), "VmHWM").unwrap_or(0);
            println!("{:<28} gateway peak RSS {:.1} MiB", "", peak as f64 / 1024.0);
            let _ = g.kill();
            let _ = g.wait();
        }

        let d = dir.path().join("mosq");
        std::fs::create_dir_all(&d).unwrap();
        let port = free_port();
        let mut m = mosquitto(&d, port);
        let r = Run {
            name: "mosquitto auth+ACL",
            port,
            publisher: Some(("dev1", "pw1")),
            subscriber: Some(("admin", "pwa")),
        };
        let mosq = measure(&r, n, epoch).await;
        let _ = m.kill();
        let _ = m.wait();
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => format!("{:.2}x", a / b),
            _ => "n/a".into(),
        };
        println!(
            "ratio fieldgate auth+ACL / mosquitto auth+ACL: {}",
            ratio(ours[1], mosq)
        );
        println!(
            "ratio fieldgate front end / rumqttd direct: {} (fieldgate also queues every message on disk)",
            ratio(ours[0], direct)
        );
        println!(
            "ratio fieldgate auth+ACL / fieldgate open: {}",
            ratio(ours[1], ours[0])
        );
    });
}
