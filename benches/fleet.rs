//! A fleet of gateways against one cloud broker: a cloud outage and the reconnect storm after
//! it, with the figures docs/fleet.md quotes.
//!
//! Run: `cargo bench --bench fleet` (minutes: it starts N release gateways per broker).
//! Knobs (environment): `FIELDGATE_FLEET_N` (50 gateways), `FIELDGATE_FLEET_OUTAGE_S` (60),
//! `FIELDGATE_FLEET_CLOUDS` (`mosquitto,rumqttd-process`: the brokers, one after the other),
//! `FIELDGATE_FLEET_PROTOCOL` (`3.1.1`; `5` with `FIELDGATE_FLEET_CLOUDS=mosquitto`),
//! `FIELDGATE_FLEET_RECONNECT_MIN_MS` / `FIELDGATE_FLEET_RECONNECT_MAX_MS` (500 / 60000, the
//! gateway's defaults), `FIELDGATE_FLEET_DEVICES` (2 per gateway), `FIELDGATE_FLEET_EVERY_MS`
//! (100: each device publishes 10 messages/s), `FIELDGATE_FLEET_AFTER_S` (5 s of traffic
//! after the backlog drained).
//!
//! Layout (tests/common/fleet.rs owns it):
//!
//! ```text
//!  2 devices ─QoS 1─▶ fieldgate gw-000 ─┐
//!  2 devices ─QoS 1─▶ fieldgate gw-001 ─┼─TLS + own client cert─▶ relay ──▶ cloud broker
//!     ...                 ...           │   (counts attempts,      (mosquitto + ACL, or
//!  2 devices ─QoS 1─▶ fieldgate gw-NNN ─┘    cuts = the outage)     rumqttd in a process)
//!                                                        tap (fieldgate/#) ◀──┘
//! ```
//!
//! Per broker: start the fleet, send one command to one gateway (isolation) and one tag
//! rollout to all, then cut the relay for the outage while the devices keep publishing,
//! restore it and wait until everyone is back and everything acknowledged arrived. Printed:
//! connection attempts per second at the relay since the cut, first-reconnect percentiles
//! (from the gateways' logs, and as their `online` reached the cloud application), time until
//! all reconnected, links lost again after reconnecting (by reason), drain time, messages acked/received/lost/duplicated, CPU over
//! the scenario and peak RSS of the gateways (sum, max) and of the broker (mosquitto's and
//! rumqttd's own process: the bench re-executes itself as the broker, so the harness's CPU is
//! not counted as the broker's). Nothing is asserted: a loss is printed as such. The figures
//! of the runs so far are in docs/fleet.md.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::fleet::{Fleet, FleetOpts};
use common::{cloud::serve_if_cloud_child, cpu_secs, env_or};

fn main() {
    // When re-executed as the rumqttd cloud, serve it and never return.
    serve_if_cloud_child();
    let args: Vec<String> = std::env::args().collect();
    // `cargo test --all-targets` runs benches without --bench: do not run a load as a test.
    if !args.iter().any(|a| a == "--bench") {
        println!("fleet benchmark: run it with `cargo bench --bench fleet`");
        return;
    }
    let clouds = std::env::var("FIELDGATE_FLEET_CLOUDS")
        .unwrap_or_else(|_| "mosquitto,rumqttd-process".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for kind in clouds.split(',').map(str::trim).filter(|k| !k.is_empty()) {
        rt.block_on(run(kind));
    }
}

async fn run(kind: &str) {
    let n = env_or("FIELDGATE_FLEET_N", 50usize);
    let down = Duration::from_secs(env_or("FIELDGATE_FLEET_OUTAGE_S", 60u64));
    let after = Duration::from_secs(env_or("FIELDGATE_FLEET_AFTER_S", 5u64));
    let mut opts = FleetOpts::new(n, kind);
    opts.protocol = env_or("FIELDGATE_FLEET_PROTOCOL", "3.1.1".to_string());
    opts.reconnect_min = Duration::from_millis(env_or("FIELDGATE_FLEET_RECONNECT_MIN_MS", 500));
    opts.reconnect_max = Duration::from_millis(env_or("FIELDGATE_FLEET_RECONNECT_MAX_MS", 60_000));
    opts.devices_per_gateway = env_or("FIELDGATE_FLEET_DEVICES", 2usize);
    opts.publish_every = Duration::from_millis(env_or("FIELDGATE_FLEET_EVERY_MS", 100));
    println!(
        "\n=== fleet: {n} gateways x {} devices ({} msg/s each), cloud {kind}, protocol {}, \
         reconnect {:?}..{:?}, outage {down:?}",
        opts.devices_per_gateway,
        1000 / opts.publish_every.as_millis().max(1),
        opts.protocol,
        opts.reconnect_min,
        opts.reconnect_max
    );
    let me = std::process::id();
    let cpu0 = cpu_secs(me).unwrap_or(0.0);
    let t0 = Instant::now();
    let mut fleet = Fleet::start(opts).await;
    println!("started and online: {:.1} s", t0.elapsed().as_secs_f64());

    let iso = fleet.command_isolation(1 % n, Duration::from_secs(1)).await;
    let stray = iso
        .got
        .iter()
        .filter(|(id, _)| *id != iso.target)
        .map(|(_, got)| got.iter().filter(|(t, _)| t != "cmd/fleet/marker").count())
        .sum::<usize>();
    println!(
        "command to {}: markers arrived {}, messages on other gateways besides their marker: \
         {stray}",
        iso.target, iso.markers_arrived
    );

    let seen = fleet.rollout_by_tag("bench-r1").await;
    let right = seen
        .iter()
        .filter(|s| s.assigned.is_some() == s.has_tag)
        .count();
    println!(
        "tag rollout: {} devices with the tag, {} without; {right} of {} answered as they \
         should",
        seen.iter().filter(|s| s.has_tag).count(),
        seen.iter().filter(|s| !s.has_tag).count(),
        seen.len()
    );

    let o = fleet.outage(down, after).await;
    print!("{}", o.table());
    println!(
        "harness process (devices, tap, relay): CPU {:.1} s over the whole run",
        cpu_secs(me).unwrap_or(0.0) - cpu0
    );
}
