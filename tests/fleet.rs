//! A small fleet against one cloud broker, with both brokers (rumqttd in-process, Debian's
//! mosquitto with the per-gateway ACL of docs/fleet.md): five real gateways, each with its own
//! certificate, data dir and prefix, two numbered QoS 1 devices each, behind one relay to the
//! cloud (see tests/common/fleet.rs for what the harness owns).
//!
//! Per broker, one fleet runs these scenarios in turn:
//! - a command on one gateway's prefix reaches that gateway's local broker only (a marker on
//!   every prefix proves the other paths work; then a bounded grace);
//! - mosquitto only (rumqttd has no ACLs): a client with gateway 0's certificate can neither
//!   read gateway 1's commands nor publish on gateway 1's prefix, while its own prefix works
//!   both ways (`MOSQUITTO_ACL`, the example of docs/fleet.md);
//! - a rollout addressed to a tag reaches exactly the devices with the tag;
//! - the relay is cut for `FIELDGATE_FLEET_OUTAGE_S` (5) seconds while the devices publish:
//!   every gateway reconnects, nothing a gateway acknowledged is lost, first arrivals are in
//!   order per device (duplicates are allowed and reported).
//!
//! No timing is asserted; every wait is bounded. The figures are printed (`--nocapture`);
//! benches/fleet.rs runs the same with 50 gateways and a 60 s outage.
//!
//! The mosquitto fleet runs with the bridges on MQTT 3.1.1 and on MQTT 5.
//!
//! Knobs: `FIELDGATE_FLEET_N` (5), `FIELDGATE_FLEET_OUTAGE_S` (5), `FIELDGATE_FLEET_PROTOCOL`
//! (overrides each test's protocol; `5` with rumqttd is refused: its cloud subscriber speaks
//! 3.1.1). Run: `cargo test --test fleet` (about 10 s;
//! needs Debian's mosquitto, which `.ci/run` installs first).

mod common;

use std::time::Duration;

use common::fleet::*;
use common::*;

async fn fleet_behaves(cloud: &str, protocol: &str) {
    let enforces_acl = cloud == "mosquitto";
    let mut opts = FleetOpts::new(env_or("FIELDGATE_FLEET_N", 5usize), cloud);
    opts.protocol = env_or("FIELDGATE_FLEET_PROTOCOL", protocol.to_string());
    let outage = Duration::from_secs(env_or("FIELDGATE_FLEET_OUTAGE_S", 5u64));
    let mut fleet = Fleet::start(opts).await;

    // Commands: one gateway's prefix reaches that gateway only.
    let target = 1 % fleet.members.len();
    let iso = fleet
        .command_isolation(target, Duration::from_secs(1))
        .await;
    assert!(iso.markers_arrived, "a marker never came down: {iso:?}");
    for (id, got) in &iso.got {
        let mut want = vec![("cmd/fleet/marker".to_string(), id.clone())];
        if *id == iso.target {
            want.insert(0, ("cmd/fleet/only".into(), format!("only {id}")));
        }
        assert_eq!(got, &want, "what came down to {id}'s devices");
    }

    // The cloud's per-gateway ACL (mosquitto; rumqttd has none): gateway 0's certificate
    // gets nothing from gateway 1's prefix and cannot publish on it.
    if enforces_acl {
        let acl = fleet.acl_check(Duration::from_secs(1)).await;
        assert!(acl.own_paths_work, "{acl:?}");
        assert!(acl.foreign_received.is_empty(), "{acl:?}");
        assert!(!acl.forged_arrived, "{acl:?}");
    }

    // A rollout by tag: exactly the tagged devices are assigned it.
    let seen = fleet.rollout_by_tag("fleet-r1").await;
    assert_eq!(seen.len(), 2 * fleet.members.len());
    assert!(seen.iter().any(|s| s.has_tag) && seen.iter().any(|s| !s.has_tag));
    for s in &seen {
        let want = s.has_tag.then(|| "fleet-r1".to_string());
        assert_eq!(s.assigned, want, "{}/{}: {}", s.gateway, s.device, s.answer);
        let tagged_here: Vec<String> = seen
            .iter()
            .filter(|o| o.gateway == s.gateway && o.has_tag)
            .map(|o| o.device.clone())
            .collect();
        assert_eq!(s.accepted_devices, tagged_here, "{} accepted", s.gateway);
    }

    // The outage: everyone back, nothing acknowledged lost, in order per device.
    let o = fleet.outage(outage, Duration::from_secs(1)).await;
    let table = o.table();
    println!("{table}");
    assert!(o.exited.is_empty(), "{table}");
    assert!(o.not_reconnected().is_empty(), "{table}");
    assert!(o.online_at_cloud.iter().all(|g| g.1.is_some()), "{table}");
    assert!(o.drain_time.is_some(), "the backlog never arrived\n{table}");
    assert!(o.all_in, "not every acknowledged message arrived\n{table}");
    assert_eq!(o.lost(), 0, "{table}");
    assert_eq!(o.reordered(), 0, "{table}");
    let left: f64 = o.queue_records.iter().map(|q| q.1).sum();
    assert_eq!(
        left, 0.0,
        "records left in the queues: {:?}",
        o.queue_records
    );
    assert!(
        o.per_device.iter().all(|d| d.acked > 0 && d.backlog > 0),
        "{table}"
    );
    // The relay saw the gateways try during the outage, and come back after it.
    let refused = o.attempts.iter().filter(|a| !a.1).count();
    let through = o.attempts.iter().filter(|a| a.1).count();
    assert!(refused > 0 && through >= fleet.members.len(), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_against_rumqttd() {
    fleet_behaves("rumqttd", "3.1.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_against_mosquitto() {
    fleet_behaves("mosquitto", "3.1.1").await;
}

/// The same fleet with the bridges speaking MQTT 5 to mosquitto.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_against_mosquitto_over_mqtt5() {
    fleet_behaves("mosquitto", "5").await;
}
