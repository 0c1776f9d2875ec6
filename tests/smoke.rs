//! Smoke run of a whole gateway: start, accept local MQTT publishes, persist them, stop
//! cleanly on SIGTERM, start again with the queue intact, and deliver everything to a TLS cloud
//! broker once it is reachable.
//!
//! Runs on the host with every `cargo test`, and in CI a second time against the aarch64 and
//! armv7 release images under qemu-user (`FIELDGATE_TEST_BIN` + `FIELDGATE_TEST_RUNNER`, see
//! `cross/smoke.sh`): the same checks prove the cross-compiled binaries work, TLS included.

mod common;

use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_persist_stop_restart_deliver() {
    let pki = Pki::new();
    let cloud = Cloud::start(&pki, &pki.server);
    let proxy = Proxy::start(cloud.port).await;
    let ports = GatewayPorts::new();
    let data = tempfile::tempdir().unwrap();
    let config = GatewayConfig::bridged(&pki, &ports, data.path(), proxy.port).to_toml();
    let n = 300;

    // Cloud unreachable: publishes are acknowledged locally and persisted.
    proxy.cut();
    let gw = Gateway::start(&config, &ports).await;
    publish_seq(ports.mqtt, "smoke", 0..n, 64).await;
    let all = n as f64;
    assert!(eventually(WAIT, || gw.metric("fieldgate_queue_records") == all).await);
    assert!(eventually(WAIT, || gw.metric("fieldgate_store_durable_seq") == all).await);
    let (status, log) = gw.terminate();
    assert!(status.success(), "exit {status}\n{log}");
    assert!(log.contains("queue committed"), "{log}");

    // Restart: the queue is still there; the cloud comes back; everything arrives in order.
    let gw = Gateway::start(&config, &ports).await;
    assert_eq!(
        gw.metric("fieldgate_queue_records"),
        all,
        "{}",
        gw.log_text()
    );
    let col = Collector::start(&pki, cloud.port, "fieldgate/gw1/#").await;
    proxy.restore();
    let r = col
        .wait_for(WAIT, |r| r.unique("smoke") == n as usize)
        .await;
    assert!(
        r.missing("smoke", 0..n).is_empty(),
        "missing {:?}\n{}",
        r.missing("smoke", 0..n),
        gw.log_text()
    );
    assert_eq!(r.reordered(), 0);
    assert!(eventually(WAIT, || gw.metric("fieldgate_queue_records") == 0.0).await);
    let (status, log) = gw.terminate();
    assert!(status.success(), "exit {status}\n{log}");
}
