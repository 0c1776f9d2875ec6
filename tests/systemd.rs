//! The systemd notify protocol against a real `NOTIFY_SOCKET` datagram socket: READY=1 once
//! the gateway runs, WATCHDOG=1 pings at half the watchdog interval while the pipeline is
//! alive, STOPPING=1 when SIGTERM starts the orderly stop.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::*;

fn next_message(sock: &UnixDatagram, deadline: Instant) -> Option<String> {
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            return Some(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_watchdog_and_stopping_reach_the_notify_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let ports = GatewayPorts::new();
    // No gateway id: the built-in default.
    let config = GatewayConfig::local(&ports, &dir.path().join("data"))
        .remove("gateway.id")
        .to_toml();
    let gw = Gateway::start_env(
        &config,
        &ports,
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    )
    .await;

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while !seen.iter().any(|m: &String| m.contains("READY=1")) {
        let m = next_message(&sock, deadline).expect("no READY=1");
        seen.push(m);
    }
    let mut pings = 0;
    while pings < 3 {
        let m = next_message(&sock, deadline).unwrap_or_else(|| {
            panic!(
                "only {pings} WATCHDOG=1 pings; saw {seen:?}\n{}",
                gw.log_text()
            )
        });
        if m.contains("WATCHDOG=1") {
            pings += 1;
        }
        seen.push(m);
    }
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
    let mut stopping = false;
    while let Some(m) = next_message(&sock, Instant::now() + Duration::from_secs(2)) {
        stopping |= m.contains("STOPPING=1");
    }
    assert!(stopping, "no STOPPING=1 after SIGTERM; saw {seen:?}");
}
