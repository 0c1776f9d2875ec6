//! A fleet of gateways against one cloud broker, shared by `tests/fleet.rs` and
//! `benches/fleet.rs`.
//!
//! What a [`Fleet`] owns:
//! - one PKI (one CA); the cloud's server certificate and one client certificate per gateway
//!   with CN = the gateway id ([`Pki::issue_client`]);
//! - one cloud broker with TLS and client certificates required ([`Cloud::start_with`]:
//!   rumqttd or mosquitto; mosquitto gets [`MOSQUITTO_ACL`], the per-gateway ACL of
//!   docs/fleet.md, so that example is exercised by every mosquitto run);
//! - one relay ([`Proxy`]) between every gateway and the cloud, which logs each connection
//!   attempt and cuts all of them for an outage. A cut refuses at the TCP level (accept, then
//!   close) while the broker keeps running, as a cloud load balancer with no healthy node
//!   does: that is the outage a fleet meets most (a network partition or a broker cluster
//!   being replaced behind its address), and it leaves the broker's other clients (the tap)
//!   connected, so the cloud side keeps observing. Restarting the broker instead would also
//!   drop the observers and, with rumqttd in-process, cannot be done at all;
//! - N members, each a real `fieldgate` process ([`Gateway`]) with its own data dir, gateway id
//!   `gw-NNN` (= MQTT client id = cloud topic prefix `fieldgate/gw-NNN/`), its own certificate,
//!   and `devices_per_gateway` simulated devices ([`Device`]: QoS 1, numbered, paced; each
//!   logs the sequence numbers the gateway PUBACKed);
//! - the tap ([`Tap`]): a cloud-side subscriber of `fieldgate/#` that timestamps what arrives
//!   and counts, per device, first arrivals, duplicates and first arrivals out of order.
//!
//! Invariants the scenarios check (they return figures; the test asserts, the bench prints):
//! every seq a device was PUBACKed reaches the tap at least once, first arrivals in seq order
//! ([`Outage`]); a tag rollout assigns exactly the devices with the tag ([`RolloutSeen`]); a
//! command on one gateway's prefix reaches only that gateway's local broker ([`Isolation`]);
//! a client with one gateway's certificate gets nothing of another's prefix ([`AclCheck`],
//! mosquitto's ACL).
//! Nothing here asserts a timing: every wait is a bounded loop with a deadline.
//!
//! Where figures come from: connection attempts from the relay's log; a gateway's reconnect
//! from its own log (its first `cloud connected` after the restore, RFC 3339 timestamps), and
//! separately the arrival of its `online` at the tap (later when the broker is slow to hand a
//! drain to a consumer); links lost again after reconnecting from `cloud link down` lines;
//! delivery, duplicates and order from the tap; queue depth from `/metrics`; CPU and peak RSS
//! from `/proc` ([`Usage`]).
//!
//! The bridge's MQTT protocol is a parameter ([`FleetOpts::protocol`], `cloud.protocol`):
//! `3.1.1` by default, or `5` with the mosquitto cloud (mosquitto speaks both on one listener;
//! a rumqttd listener speaks one, and the tap is an MQTT 3.1.1 client).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, Transport};
use serde_json::{json, Value as Json};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

use super::cloud::{Cloud, CloudOpts};
use super::devices::{Device, DeviceConfig, DeviceReport};
use super::gateway::{path, Gateway, GatewayConfig, GatewayPorts};
use super::measure::{cpu_secs, proc_kib};
use super::mqtt::LocalSub;
use super::ota_sim::{image, sha256_hex, Session};
use super::pki::{CertFiles, Pki};
use super::proxy::Proxy;
use super::util::{eventually, free_port};

/// The per-gateway ACL the mosquitto cloud enforces (docs/fleet.md quotes it). `%u` is the
/// client certificate's CN (`use_identity_as_username`); the cloud application's certificate
/// (CN `client`, the tap) may use every topic.
pub const MOSQUITTO_ACL: &str = "\
# The cloud application (certificate CN \"client\"): every topic.
user client
topic readwrite #

# Every gateway (certificate CN = gateway id): its own prefix only.
pattern readwrite fieldgate/%u/#
";

/// How a fleet is made.
#[derive(Clone, Debug)]
pub struct FleetOpts {
    /// Number of gateways.
    pub gateways: usize,
    /// Simulated devices per gateway.
    pub devices_per_gateway: usize,
    /// Cloud broker kind (see [`CloudOpts::kind`]).
    pub cloud: String,
    /// `cloud.protocol` of every gateway.
    pub protocol: String,
    /// `cloud.reconnect_min` / `cloud.reconnect_max`.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Each device publishes one new message per interval.
    pub publish_every: Duration,
    /// Payload bytes per message.
    pub payload: usize,
    /// Every `tag_every`-th gateway (0, k, 2k, ...) has a device with [`FLEET_TAG`].
    pub tag_every: usize,
}

/// The OTA tag some gateways' devices carry.
pub const FLEET_TAG: &str = "pumps";

impl FleetOpts {
    /// `gateways` gateways of 2 devices each against `cloud`, protocol 3.1.1, the bridge's
    /// quick test backoff (50 ms .. 500 ms), 20 messages/s per device, every other gateway
    /// tagged.
    pub fn new(gateways: usize, cloud: &str) -> FleetOpts {
        FleetOpts {
            gateways,
            devices_per_gateway: 2,
            cloud: cloud.to_string(),
            protocol: "3.1.1".into(),
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_millis(500),
            publish_every: Duration::from_millis(50),
            payload: 100,
            tag_every: 2,
        }
    }
}

/// One gateway of the fleet.
pub struct Member {
    /// Gateway id, MQTT client id and cloud prefix `fieldgate/<id>/`.
    pub id: String,
    pub gateway: Gateway,
    /// Whether its OTA device `<id>-a` carries [`FLEET_TAG`] (else the tag `other`).
    pub tagged: bool,
    pub devices: Vec<Device>,
    pub cert: CertFiles,
    _data: TempDir,
}

impl Member {
    /// The OTA device ids it knows of: `<id>-a` (configured with a tag) and `<id>-b` (none).
    pub fn ota_devices(&self) -> [String; 2] {
        [format!("{}-a", self.id), format!("{}-b", self.id)]
    }
}

/// The running fleet.
pub struct Fleet {
    pub opts: FleetOpts,
    pub pki: Pki,
    pub cloud: Cloud,
    pub relay: Proxy,
    pub tap: Tap,
    pub members: Vec<Member>,
}

/// Most gateways started at once (each start waits for its `/health`).
const START_BATCH: usize = 10;

/// Bound of every wait for the fleet to get somewhere.
pub const FLEET_WAIT: Duration = Duration::from_secs(180);

impl Fleet {
    /// Starts the cloud, the relay, the tap, then the gateways (in batches) and waits until
    /// every gateway said `online` to the cloud; then starts the devices.
    pub async fn start(opts: FleetOpts) -> Fleet {
        // mosquitto speaks 3.1.1 and 5 on one listener; a rumqttd listener speaks one of them,
        // and the tap is an MQTT 3.1.1 client.
        assert!(
            opts.protocol != "5" || opts.cloud == "mosquitto",
            "cloud.protocol = \"5\" needs the mosquitto cloud here (the tap speaks 3.1.1 and a \
             rumqttd listener only one protocol)"
        );
        let pki = Pki::new();
        let cloud = Cloud::start_with(
            &pki,
            &pki.server,
            &CloudOpts {
                kind: opts.cloud.clone(),
                max_connections: 1024.max(opts.gateways * 2 + 16),
                v5: false,
                acl: Some(MOSQUITTO_ACL.to_string()),
            },
        );
        let relay = Proxy::start(cloud.port).await;
        let tap = Tap::start(&pki, cloud.port, "fieldgate/#").await;
        let mut members = Vec::with_capacity(opts.gateways);
        let ids: Vec<usize> = (0..opts.gateways).collect();
        for batch in ids.chunks(START_BATCH) {
            let starts = batch
                .iter()
                .map(|&i| start_member(&opts, &pki, relay.port, i));
            members.extend(futures_util::future::join_all(starts).await);
        }
        let mut fleet = Fleet {
            opts,
            pki,
            cloud,
            relay,
            tap,
            members,
        };
        let online = eventually(FLEET_WAIT, || {
            fleet
                .members
                .iter()
                .all(|m| fleet.tap.status_since(&m.id, None).is_some())
        })
        .await;
        assert!(online, "not every gateway said online: {}", fleet.offline());
        for m in &mut fleet.members {
            for j in 0..fleet.opts.devices_per_gateway {
                let src = format!("{}-d{j}", m.id);
                let cfg = DeviceConfig::new(m.gateway.mqtt, &src, u64::MAX / 2)
                    .size(fleet.opts.payload)
                    .inflight(20)
                    .interval(fleet.opts.publish_every);
                m.devices.push(Device::spawn(cfg));
            }
        }
        fleet
    }

    /// Ids of the gateways the tap has not seen `online` from (for failure messages).
    fn offline(&self) -> String {
        let ids: Vec<&str> = self
            .members
            .iter()
            .filter(|m| self.tap.status_since(&m.id, None).is_none())
            .map(|m| m.id.as_str())
            .collect();
        format!("{ids:?}")
    }

    /// Process ids of the gateways.
    pub fn pids(&self) -> Vec<u32> {
        self.members.iter().map(|m| m.gateway.pid()).collect()
    }

    /// CPU seconds and peak RSS (kB) of every gateway, and of the broker: `broker_pid` is the
    /// cloud's process (mosquitto, rumqttd-process) or None (in-process: not measurable).
    pub fn usage(&self) -> Usage {
        let gateways = self
            .pids()
            .into_iter()
            .map(|p| {
                (
                    cpu_secs(p).unwrap_or(0.0),
                    proc_kib(p, "VmHWM").unwrap_or(0),
                )
            })
            .collect();
        let broker = self.cloud.pid().map(|p| {
            (
                cpu_secs(p).unwrap_or(0.0),
                proc_kib(p, "VmHWM").unwrap_or(0),
            )
        });
        Usage { gateways, broker }
    }

    /// The outage scenario: waits until every device got a PUBACK and the cloud has something
    /// from each, cuts the relay for `down` while the devices keep publishing, restores it,
    /// waits until every gateway is back online and the backlog (what was acknowledged up to
    /// the restore) arrived, lets the devices run `after`, then stops them (each finishes
    /// what it has in flight) and waits until the cloud holds every acknowledged seq. Every
    /// wait is bounded by [`FLEET_WAIT`]; what did not get there shows in the figures.
    /// The devices are consumed.
    pub async fn outage(&mut self, down: Duration, after: Duration) -> Outage {
        let srcs: Vec<(String, String)> = self
            .members
            .iter()
            .flat_map(|m| m.devices.iter().map(|d| (m.id.clone(), d.src.clone())))
            .collect();
        let warm = eventually(FLEET_WAIT, || {
            self.members
                .iter()
                .flat_map(|m| &m.devices)
                .all(|d| d.acked_count() > 0 && self.tap.first_arrivals(&d.src) > 0)
        })
        .await;
        assert!(warm, "not every device reached the cloud before the outage");
        let usage_before = self.usage();

        let cut_at = Instant::now();
        self.relay.cut();
        tokio::time::sleep(down).await;
        let backlog: HashMap<String, BTreeSet<u64>> = self
            .members
            .iter()
            .flat_map(|m| &m.devices)
            .map(|d| (d.src.clone(), d.acked()))
            .collect();
        let restore_at = Instant::now();
        let restore_wall = SystemTime::now();
        self.relay.restore();

        let ids: Vec<String> = self.members.iter().map(|m| m.id.clone()).collect();
        let tap = &self.tap;
        // Back: every gateway logged `cloud connected` after the restore (its own view; the
        // tap's view of its `online` can lag behind the drain the broker delivers first).
        let deadline = Instant::now() + FLEET_WAIT;
        while Instant::now() < deadline
            && !self
                .members
                .iter()
                .all(|m| connected_after(&m.gateway.log_text(), restore_wall).is_some())
        {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        eventually(FLEET_WAIT, || {
            backlog.iter().all(|(src, want)| tap.has_all(src, want))
        })
        .await;
        tokio::time::sleep(after).await;

        let devices: Vec<Device> = self
            .members
            .iter_mut()
            .flat_map(|m| std::mem::take(&mut m.devices))
            .collect();
        let finishing = devices
            .into_iter()
            .map(|d| d.finish(Duration::from_secs(60)));
        let reports: Vec<DeviceReport> = futures_util::future::join_all(finishing).await;
        let all_in = eventually(FLEET_WAIT, || {
            reports.iter().all(|r| tap.has_all(&r.src, &r.acked))
        })
        .await;
        let usage_after = self.usage();
        // The cloud has everything; the gateways delete a record once its PUBACK is in, a
        // moment later: wait (bounded) for every queue to be empty.
        let queue_deadline = Instant::now() + Duration::from_secs(30);
        let queue_records = loop {
            let mut q = Vec::new();
            for m in &self.members {
                let v = super::devices::metric(m.gateway.http, "fieldgate_queue_records").await;
                q.push((m.id.clone(), v));
            }
            if q.iter().all(|(_, v)| *v == 0.0) || Instant::now() > queue_deadline {
                break q;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };

        let reconnect = self
            .members
            .iter()
            .map(|m| {
                let at = connected_after(&m.gateway.log_text(), restore_wall);
                let after = at.and_then(|t| t.duration_since(restore_wall).ok());
                (m.id.clone(), after)
            })
            .collect();
        // Links lost again after the restore, by reason (from the gateways' logs).
        let mut relinks: BTreeMap<String, usize> = BTreeMap::new();
        for m in &self.members {
            for reason in link_losses_after(&m.gateway.log_text(), restore_wall) {
                *relinks.entry(reason).or_default() += 1;
            }
        }
        let online_at_cloud = ids
            .iter()
            .map(|id| {
                let at = tap.status_since(id, Some(restore_at));
                (id.clone(), at.map(|t| t - restore_at))
            })
            .collect();
        // Whenever it got there (the waits above are bounded, the arrival times are kept).
        let drain_time = backlog
            .iter()
            .map(|(src, want)| tap.last_first_arrival(src, want))
            .collect::<Option<Vec<_>>>()
            .map(|ts| {
                ts.into_iter()
                    .max()
                    .map_or(Duration::ZERO, |t| t.saturating_duration_since(restore_at))
            });
        let gw_of: HashMap<&str, &str> =
            srcs.iter().map(|(g, s)| (s.as_str(), g.as_str())).collect();
        let per_device = reports
            .iter()
            .map(|r| {
                let seen = tap.device(&r.src);
                let lost: Vec<u64> = r
                    .acked
                    .iter()
                    .filter(|s| !seen.first.contains_key(s))
                    .copied()
                    .collect();
                DeviceOutcome {
                    gateway: gw_of.get(r.src.as_str()).unwrap_or(&"?").to_string(),
                    src: r.src.clone(),
                    acked: r.acked.len(),
                    backlog: backlog.get(&r.src).map_or(0, |b| b.len()),
                    received: seen.first.len(),
                    lost,
                    duplicates: seen.duplicates,
                    reordered: seen.reordered,
                    unacked_received: seen.first.keys().filter(|s| !r.acked.contains(s)).count(),
                    drained: r.drained(),
                }
            })
            .collect();
        let exited = self
            .members
            .iter()
            .filter(|m| !running(m.gateway.pid()))
            .map(|m| m.id.clone())
            .collect();
        Outage {
            exited,
            cloud: self.opts.cloud.clone(),
            gateways: self.members.len(),
            down,
            attempts: self
                .relay
                .attempts()
                .into_iter()
                .filter(|a| a.at >= cut_at)
                .map(|a| (a.at - cut_at, a.through))
                .collect(),
            restore_after_cut: restore_at - cut_at,
            reconnect,
            online_at_cloud,
            relinks,
            drain_time,
            all_in,
            per_device,
            queue_records,
            usage: usage_after.minus(&usage_before),
        }
    }

    /// A rollout addressed to [`FLEET_TAG`], sent by the cloud to every gateway's
    /// `cmd/ota/upgrade` (a fleet-wide rollout is one command per gateway prefix: each
    /// gateway subscribes to its own commands only), with the image pushed over MQTT. Then
    /// every OTA device of every gateway asks for its update. Returns what each device got.
    pub async fn rollout_by_tag(&self, rollout: &str) -> Vec<RolloutSeen> {
        let img = image(3 * 1024 + 17, 99);
        let sha = sha256_hex(&img);
        let chunk = 1024usize;
        let cmd = json!({"name": "pumpfw", "version": "3.0", "size": img.len(), "sha256": sha,
                         "chunk_size": chunk, "tag": FLEET_TAG, "rollout": rollout});
        for m in &self.members {
            self.tap
                .publish(
                    &format!("fieldgate/{}/cmd/ota/upgrade", m.id),
                    cmd.to_string().into_bytes(),
                )
                .await;
        }
        let accepted = eventually(FLEET_WAIT, || {
            self.members
                .iter()
                .all(|m| self.accepted(&m.id, rollout).is_some())
        })
        .await;
        assert!(accepted, "not every gateway accepted rollout {rollout}");
        for m in &self.members {
            for (i, c) in img.chunks(chunk).enumerate() {
                let topic = format!("fieldgate/{}/cmd/ota/image/{sha}/{i}", m.id);
                self.tap.publish(&topic, c.to_vec()).await;
            }
        }
        let fetched = eventually(FLEET_WAIT, || {
            self.members.iter().all(|m| {
                self.tap
                    .json_on(&format!("fieldgate/{}/ota/_gateway/fetch", m.id))
                    .iter()
                    .any(|v| v["result"] == "ok" && v["sha256"] == sha.as_str())
            })
        })
        .await;
        assert!(fetched, "not every gateway verified the pushed image");

        let mut out = Vec::new();
        for m in &self.members {
            let accepted = self.accepted(&m.id, rollout).unwrap_or(Json::Null);
            for dev in m.ota_devices() {
                let mut s = Session::connect(m.gateway.mqtt, &dev).await;
                s.send(&dev, "request", json!({})).await;
                let answer = s
                    .expect(&dev, &["metadata", "error"], Duration::from_secs(60))
                    .await;
                s.close().await;
                let (kind, body) = answer.unwrap_or_default();
                let body: Json = serde_json::from_slice(&body).unwrap_or(Json::Null);
                out.push(RolloutSeen {
                    gateway: m.id.clone(),
                    device: dev.clone(),
                    has_tag: m.tagged && dev.ends_with("-a"),
                    assigned: (kind == "metadata")
                        .then(|| body["rollout"].as_str().unwrap_or("?").to_string()),
                    answer: format!("{kind} {body}"),
                    accepted_devices: accepted["devices"]
                        .as_array()
                        .map(|a| a.iter().filter_map(|d| d.as_str()).map(String::from))
                        .into_iter()
                        .flatten()
                        .collect(),
                });
            }
        }
        out
    }

    /// The gateway's `rollout accepted` message for `rollout`, if the cloud got it.
    fn accepted(&self, id: &str, rollout: &str) -> Option<Json> {
        self.tap
            .json_on(&format!("fieldgate/{id}/ota/_gateway/rollout"))
            .into_iter()
            .find(|v| v["rollout"] == rollout && v["state"] == "accepted")
    }

    /// A command on gateway `target`'s prefix (`fieldgate/<target>/cmd/fleet/only`), then a
    /// marker on every gateway's prefix; a subscriber of `cmd/fleet/#` on every gateway's
    /// local broker records what came down. Waits until every marker arrived, then `grace`
    /// more, and returns what each gateway's devices got.
    pub async fn command_isolation(&self, target: usize, grace: Duration) -> Isolation {
        let mut subs = Vec::new();
        for m in &self.members {
            subs.push(LocalSub::start(m.gateway.mqtt, "cmd/fleet/#", QoS::AtLeastOnce).await);
        }
        let target_id = self.members[target].id.clone();
        self.tap
            .publish(
                &format!("fieldgate/{target_id}/cmd/fleet/only"),
                format!("only {target_id}").into_bytes(),
            )
            .await;
        for m in &self.members {
            self.tap
                .publish(
                    &format!("fieldgate/{}/cmd/fleet/marker", m.id),
                    m.id.clone().into_bytes(),
                )
                .await;
        }
        let markers = eventually(FLEET_WAIT, || {
            subs.iter().all(|s| !s.on("cmd/fleet/marker").is_empty())
        })
        .await;
        tokio::time::sleep(grace).await;
        let got = self
            .members
            .iter()
            .zip(&subs)
            .map(|(m, s)| {
                let msgs = s.received.lock().unwrap();
                let list = msgs
                    .iter()
                    .map(|x| (x.topic.clone(), String::from_utf8_lossy(&x.payload).into()))
                    .collect();
                (m.id.clone(), list)
            })
            .collect();
        Isolation {
            target: target_id,
            markers_arrived: markers,
            got,
        }
    }
}

/// What a client holding gateway 0's certificate could do on gateway 1's prefix.
#[derive(Clone, Debug)]
pub struct AclCheck {
    /// The intruder's own prefix worked both ways (its publish reached the tap, the tap's
    /// command reached it): the checks below are not vacuous.
    pub own_paths_work: bool,
    /// SUBACK return codes for [own filter, foreign filter].
    pub suback: Vec<String>,
    /// Topics the intruder received from the foreign prefix.
    pub foreign_received: Vec<String>,
    /// The tap received the intruder's publish on the foreign prefix.
    pub forged_arrived: bool,
    /// CONNACKs the intruder got: 2 when the broker closed its connection for the forged
    /// publish (mosquitto 2.0 does) and the client reconnected.
    pub connections: usize,
}

impl Fleet {
    /// The cloud's per-gateway ACL ([`MOSQUITTO_ACL`]), from the side of a thief: a client
    /// with gateway 0's certificate subscribes to its own and to gateway 1's commands and
    /// publishes on both prefixes; the tap publishes a command on both. Waits until both own
    /// paths worked, then `grace` more. Needs two gateways.
    pub async fn acl_check(&self, grace: Duration) -> AclCheck {
        let (own, other) = (&self.members[0], &self.members[1]);
        let tls = rumqttc::TlsConfiguration::Simple {
            ca: std::fs::read(&self.pki.ca).unwrap(),
            alpn: None,
            client_auth: Some((
                std::fs::read(&own.cert.cert).unwrap(),
                std::fs::read(&own.cert.key).unwrap(),
            )),
        };
        let mut o = MqttOptions::new(format!("{}-intruder", own.id), "127.0.0.1", self.cloud.port);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_transport(Transport::tls_with_config(tls));
        let (client, mut el) = AsyncClient::new(o, 100);
        let got: Arc<Mutex<Vec<String>>> = Arc::default();
        let subacks: Arc<Mutex<Vec<String>>> = Arc::default();
        let (g2, s2) = (got.clone(), subacks.clone());
        let stop = CancellationToken::new();
        let stop2 = stop.clone();
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    _ = stop2.cancelled() => return,
                    ev = el.poll() => ev,
                };
                match ev {
                    Ok(Event::Incoming(Packet::Publish(p))) => g2.lock().unwrap().push(p.topic),
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        g2.lock().unwrap().push("connack".into())
                    }
                    Ok(Event::Incoming(Packet::SubAck(a))) => s2
                        .lock()
                        .unwrap()
                        .extend(a.return_codes.iter().map(|c| format!("{c:?}"))),
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        let own_cmd = format!("fieldgate/{}/cmd/acl/probe", own.id);
        let foreign_cmd = format!("fieldgate/{}/cmd/acl/probe", other.id);
        for filter in [
            format!("fieldgate/{}/cmd/acl/#", own.id),
            format!("fieldgate/{}/cmd/#", other.id),
        ] {
            client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        }
        let subscribed = eventually(FLEET_WAIT, || subacks.lock().unwrap().len() == 2).await;
        let own_pub = format!("fieldgate/{}/acl/own", own.id);
        let forged = format!("fieldgate/{}/acl/forged", other.id);
        client
            .publish(own_pub.as_str(), QoS::AtLeastOnce, false, b"own".to_vec())
            .await
            .unwrap();
        self.tap.publish(&foreign_cmd, b"probe".to_vec()).await;
        self.tap.publish(&own_cmd, b"probe".to_vec()).await;
        let works = subscribed
            && eventually(Duration::from_secs(30), || {
                !self.tap.json_on(&own_pub).is_empty() && got.lock().unwrap().contains(&own_cmd)
            })
            .await;
        // The forged publish last: a broker may close the connection of a client that
        // publishes where it must not.
        client
            .publish(forged.as_str(), QoS::AtLeastOnce, false, b"forged".to_vec())
            .await
            .unwrap();
        tokio::time::sleep(grace).await;
        stop.cancel();
        let foreign_prefix = format!("fieldgate/{}/", other.id);
        let foreign_received = got
            .lock()
            .unwrap()
            .iter()
            .filter(|t| t.starts_with(&foreign_prefix))
            .cloned()
            .collect();
        let connections = got
            .lock()
            .unwrap()
            .iter()
            .filter(|t| *t == "connack")
            .count();
        let suback = subacks.lock().unwrap().clone();
        AclCheck {
            own_paths_work: works,
            suback,
            foreign_received,
            forged_arrived: !self.tap.json_on(&forged).is_empty(),
            connections,
        }
    }
}

/// Starts member `i`: its certificate, data dir, config and process.
async fn start_member(opts: &FleetOpts, pki: &Pki, relay_port: u16, i: usize) -> Member {
    let id = format!("gw-{i:03}");
    let cert = pki.issue_client(&id);
    let data = tempfile::tempdir().unwrap();
    let ports = GatewayPorts::new();
    let tagged = opts.tag_every > 0 && i.is_multiple_of(opts.tag_every);
    let tag = if tagged { FLEET_TAG } else { "other" };
    let config = GatewayConfig::bridged(pki, &ports, data.path(), relay_port)
        .set("gateway.id", id.clone())
        .set("cloud.client_cert_file", path(&cert.cert))
        .set("cloud.client_key_file", path(&cert.key))
        .set("cloud.protocol", opts.protocol.clone())
        .set(
            "cloud.reconnect_min",
            humantime::format_duration(opts.reconnect_min).to_string(),
        )
        .set(
            "cloud.reconnect_max",
            humantime::format_duration(opts.reconnect_max).to_string(),
        )
        .set(&format!("ota.devices.{id}-a.tags"), vec![tag]);
    let gateway = Gateway::start(&config.to_toml(), &ports).await;
    Member {
        id,
        gateway,
        tagged,
        devices: Vec::new(),
        cert,
        _data: data,
    }
}

/// The time of the first `cloud connected` line of a gateway log at or after `since` (the
/// log's lines start with tracing's RFC 3339 UTC timestamp; the harness's logs have no
/// colour codes).
pub fn connected_after(log: &str, since: SystemTime) -> Option<SystemTime> {
    log.lines()
        .filter(|l| l.contains("cloud connected"))
        .filter_map(|l| humantime::parse_rfc3339(l.split_whitespace().next()?).ok())
        .find(|t| *t >= since)
}

/// The reasons of the `cloud link down` lines of a gateway log that follow its first `cloud
/// connected` at or after `since` (the error text up to its first number-bearing field).
pub fn link_losses_after(log: &str, since: SystemTime) -> Vec<String> {
    let stamp = |l: &str| humantime::parse_rfc3339(l.split_whitespace().next()?).ok();
    let mut connected = false;
    let mut out = Vec::new();
    for l in log.lines() {
        if stamp(l).is_none_or(|t| t < since) {
            continue;
        }
        if l.contains("cloud connected") {
            connected = true;
        } else if connected && l.contains("cloud link down") {
            let reason = l.split_once("error=").map_or("?", |(_, e)| e);
            let reason: String = reason
                .split_whitespace()
                .take_while(|w| !w.contains('='))
                .collect::<Vec<_>>()
                .join(" ");
            out.push(reason.chars().filter(|c| !c.is_ascii_digit()).collect());
        }
    }
    out
}

/// Whether process `pid` still runs (not gone, not a zombie), from `/proc/<pid>/stat`.
pub fn running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    !matches!(state, Some("Z") | Some("X") | None)
}

/// CPU seconds and peak RSS (kB) per gateway, and of the broker when it is a process.
#[derive(Clone, Debug, Default)]
pub struct Usage {
    pub gateways: Vec<(f64, u64)>,
    pub broker: Option<(f64, u64)>,
}

impl Usage {
    /// CPU used since `before`; peak RSS as of now.
    fn minus(&self, before: &Usage) -> Usage {
        let gateways = self
            .gateways
            .iter()
            .zip(&before.gateways)
            .map(|(a, b)| (a.0 - b.0, a.1))
            .collect();
        let broker = match (self.broker, before.broker) {
            (Some(a), Some(b)) => Some((a.0 - b.0, a.1)),
            _ => None,
        };
        Usage { gateways, broker }
    }
}

/// What one device's acknowledged messages became at the cloud.
#[derive(Clone, Debug)]
pub struct DeviceOutcome {
    pub gateway: String,
    pub src: String,
    /// Distinct seqs the gateway PUBACKed.
    pub acked: usize,
    /// Of those, acknowledged by the time the outage ended.
    pub backlog: usize,
    /// Distinct seqs the cloud got.
    pub received: usize,
    /// Acknowledged and never received: a broken promise.
    pub lost: Vec<u64>,
    /// Arrivals of a seq already received (at least once allows them).
    pub duplicates: u64,
    /// First arrivals below an earlier first arrival (out of order).
    pub reordered: u64,
    /// Received but never acknowledged (sent, the PUBACK still on its way at the stop).
    pub unacked_received: usize,
    /// The device got a PUBACK for everything it sent before it stopped.
    pub drained: bool,
}

/// The figures of one outage.
#[derive(Clone, Debug)]
pub struct Outage {
    pub cloud: String,
    pub gateways: usize,
    pub down: Duration,
    /// Every connection attempt at the relay from the cut on: (time since the cut, let
    /// through).
    pub attempts: Vec<(Duration, bool)>,
    pub restore_after_cut: Duration,
    /// Per gateway: its first `cloud connected` (its log) after the restore, from the restore.
    pub reconnect: Vec<(String, Option<Duration>)>,
    /// Per gateway: its first `online` at the tap after the restore, from the restore: the
    /// reconnect plus the broker's delivery to a consumer of the whole fleet.
    pub online_at_cloud: Vec<(String, Option<Duration>)>,
    /// Links that went down after a gateway's first reconnect following the restore, by
    /// reason (the error of `cloud link down`, numbers dropped), summed over the fleet.
    pub relinks: BTreeMap<String, usize>,
    /// From the restore until the cloud had everything acknowledged before it (None: never).
    pub drain_time: Option<Duration>,
    /// The cloud got every acknowledged seq of every device.
    pub all_in: bool,
    pub per_device: Vec<DeviceOutcome>,
    /// `fieldgate_queue_records` of each gateway at the end (once all are 0, or 30 s on).
    pub queue_records: Vec<(String, f64)>,
    /// CPU over the scenario and peak RSS.
    pub usage: Usage,
    /// Gateways whose process was no longer running at the end (their logs say why).
    pub exited: Vec<String>,
}

impl Outage {
    /// Gateways that never came back.
    pub fn not_reconnected(&self) -> Vec<&str> {
        self.reconnect
            .iter()
            .filter(|(_, t)| t.is_none())
            .map(|(id, _)| id.as_str())
            .collect()
    }

    /// Time until every gateway was back (None: some never came back).
    pub fn all_reconnected(&self) -> Option<Duration> {
        self.reconnect
            .iter()
            .map(|(_, t)| *t)
            .collect::<Option<Vec<_>>>()?
            .into_iter()
            .max()
    }

    pub fn lost(&self) -> usize {
        self.per_device.iter().map(|d| d.lost.len()).sum()
    }
    pub fn acked(&self) -> usize {
        self.per_device.iter().map(|d| d.acked).sum()
    }
    pub fn received(&self) -> usize {
        self.per_device.iter().map(|d| d.received).sum()
    }
    pub fn duplicates(&self) -> u64 {
        self.per_device.iter().map(|d| d.duplicates).sum()
    }
    pub fn reordered(&self) -> u64 {
        self.per_device.iter().map(|d| d.reordered).sum()
    }

    /// Connection attempts per whole second since the cut: (second, refused, let through).
    pub fn attempts_per_second(&self) -> Vec<(u64, u32, u32)> {
        let mut by: BTreeMap<u64, (u32, u32)> = BTreeMap::new();
        for (t, through) in &self.attempts {
            let e = by.entry(t.as_secs()).or_default();
            if *through {
                e.1 += 1;
            } else {
                e.0 += 1;
            }
        }
        let last = by.keys().next_back().copied().unwrap_or(0);
        (0..=last)
            .map(|s| {
                let (r, t) = by.get(&s).copied().unwrap_or_default();
                (s, r, t)
            })
            .collect()
    }

    /// The report, as the bench prints it and the test shows on failure.
    pub fn table(&self) -> String {
        let mut o = String::new();
        let secs = |d: Duration| format!("{:.2} s", d.as_secs_f64());
        o += &format!(
            "outage against {} with {} gateways: relay cut {}, restored at +{}\n",
            self.cloud,
            self.gateways,
            secs(self.down),
            secs(self.restore_after_cut)
        );
        o += "connection attempts at the cloud relay per second since the cut \
              (refused/let through):\n";
        let restore_s = self.restore_after_cut.as_secs();
        for row in self.attempts_per_second().chunks(10) {
            let cells: Vec<String> = row
                .iter()
                .map(|(s, r, t)| {
                    let mark = if *s == restore_s { "*" } else { " " };
                    format!("{mark}{s:>3}s {r:>3}/{t:<3}")
                })
                .collect();
            o += &format!("  {}\n", cells.join(" "));
        }
        o += "  (* = the second the relay was restored)\n";
        for (what, list) in [
            (
                "first reconnect after the restore (gateway logs)",
                &self.reconnect,
            ),
            (
                "first `online` at the cloud application",
                &self.online_at_cloud,
            ),
        ] {
            let mut back: Vec<Duration> = list.iter().filter_map(|(_, t)| *t).collect();
            back.sort();
            if back.is_empty() {
                continue;
            }
            let pct = |p: f64| back[((back.len() - 1) as f64 * p).round() as usize];
            o += &format!(
                "{what}: min {} p50 {} p90 {} p99 {} max {} ({} of {})\n",
                secs(back[0]),
                secs(pct(0.5)),
                secs(pct(0.9)),
                secs(pct(0.99)),
                secs(back[back.len() - 1]),
                back.len(),
                list.len()
            );
        }
        o += &format!(
            "all reconnected: {}; not back: {:?}; gateway processes gone: {:?}\n",
            self.all_reconnected().map_or("never".into(), secs),
            self.not_reconnected(),
            self.exited
        );
        o += &format!(
            "links lost again after reconnecting (gateway logs, by reason): {:?}\n",
            self.relinks
        );
        o += &format!(
            "backlog drained (everything acked before the restore at the cloud): {}\n",
            self.drain_time.map_or("never".into(), secs)
        );
        o += &format!(
            "messages: acked {} received {} lost {} duplicated {} reordered {} \
             (received unacked {}); all acked in: {}\n",
            self.acked(),
            self.received(),
            self.lost(),
            self.duplicates(),
            self.reordered(),
            self.per_device
                .iter()
                .map(|d| d.unacked_received)
                .sum::<usize>(),
            self.all_in
        );
        let left: f64 = self.queue_records.iter().map(|(_, v)| *v).sum();
        o += &format!(
            "queue records left in the gateways at the end (waited up to 30 s for 0): {left}\n"
        );
        let g = &self.usage.gateways;
        if !g.is_empty() {
            let cpu: f64 = g.iter().map(|x| x.0).sum();
            let cpu_max = g.iter().map(|x| x.0).fold(0.0, f64::max);
            let rss: u64 = g.iter().map(|x| x.1).sum();
            let rss_max = g.iter().map(|x| x.1).max().unwrap_or(0);
            o += &format!(
                "gateways: CPU {cpu:.2} s total, {cpu_max:.2} s max; peak RSS {:.1} MiB total, \
                 {:.1} MiB max\n",
                rss as f64 / 1024.0,
                rss_max as f64 / 1024.0
            );
        }
        match self.usage.broker {
            Some((cpu, rss)) => {
                o += &format!(
                    "broker ({}): CPU {cpu:.2} s, peak RSS {:.1} MiB\n",
                    self.cloud,
                    rss as f64 / 1024.0
                )
            }
            None => o += "broker: in-process, not measured apart from the harness\n",
        }
        o += "per device (gateway device: acked backlog received lost dup reordered):\n";
        for d in &self.per_device {
            if !d.lost.is_empty() || d.reordered > 0 || d.duplicates > 0 || !d.drained {
                o += &format!(
                    "  {} {}: {} {} {} {} {} {}{}\n",
                    d.gateway,
                    d.src,
                    d.acked,
                    d.backlog,
                    d.received,
                    d.lost.len(),
                    d.duplicates,
                    d.reordered,
                    if d.drained { "" } else { " (not drained)" }
                );
            }
        }
        o += "  (devices with nothing to note are left out)\n";
        o
    }
}

/// What one OTA device got from a tag rollout.
#[derive(Clone, Debug)]
pub struct RolloutSeen {
    pub gateway: String,
    pub device: String,
    /// The device carries the rollout's tag.
    pub has_tag: bool,
    /// The rollout its metadata named, if it was assigned one.
    pub assigned: Option<String>,
    /// The answer, for failure messages.
    pub answer: String,
    /// The devices the gateway's `rollout accepted` listed.
    pub accepted_devices: Vec<String>,
}

/// What every gateway's local subscriber of `cmd/fleet/#` got.
#[derive(Clone, Debug)]
pub struct Isolation {
    pub target: String,
    pub markers_arrived: bool,
    /// Per gateway: (local topic, payload) in arrival order.
    pub got: Vec<(String, Vec<(String, String)>)>,
}

// ---------------------------------------------------------------------------------------------
// The tap

/// What the tap saw of one device.
#[derive(Clone, Debug, Default)]
pub struct DeviceSeen {
    /// seq -> first arrival.
    pub first: BTreeMap<u64, Instant>,
    pub duplicates: u64,
    pub reordered: u64,
    max_first: u64,
}

#[derive(Default)]
struct TapState {
    devices: HashMap<String, DeviceSeen>,
    /// Non-data messages: (arrival, topic, payload).
    other: Vec<(Instant, String, Vec<u8>)>,
}

/// Most non-data messages the tap keeps (status, OTA replies).
const TAP_OTHER_KEPT: usize = 100_000;

/// A cloud-side subscriber (TLS, the `client` certificate) that timestamps what arrives.
/// Data (`.../dev/<src>/data`, payload `src:seq:...`) is counted per device as it arrives;
/// everything else is kept (the first [`TAP_OTHER_KEPT`] messages).
pub struct Tap {
    state: Arc<Mutex<TapState>>,
    pub client: AsyncClient,
    stop: CancellationToken,
}

impl Tap {
    pub async fn start(pki: &Pki, cloud_port: u16, filter: &str) -> Tap {
        let mut o = MqttOptions::new(format!("tap-{}", free_port()), "127.0.0.1", cloud_port);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_transport(Transport::tls_with_config(pki.client_tls()));
        o.set_max_packet_size(2 * 1024 * 1024, 2 * 1024 * 1024);
        o.set_inflight(1000);
        let (client, mut el) = AsyncClient::new(o, 1000);
        let state: Arc<Mutex<TapState>> = Arc::default();
        let stop = CancellationToken::new();
        let (st, s2) = (state.clone(), stop.clone());
        let (sub_tx, sub_rx) = tokio::sync::oneshot::channel();
        let mut sub_tx = Some(sub_tx);
        client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    _ = s2.cancelled() => return,
                    ev = el.poll() => ev,
                };
                match ev {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        st.lock()
                            .unwrap()
                            .record(Instant::now(), &p.topic, &p.payload)
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = sub_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), sub_rx)
            .await
            .expect("tap: no SUBACK from the cloud")
            .unwrap();
        Tap {
            state,
            client,
            stop,
        }
    }

    /// Publishes at QoS 1 as the cloud application.
    pub async fn publish(&self, topic: &str, payload: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }

    /// The first `online` on `fieldgate/<id>/status` at or after `since` (None: any time).
    pub fn status_since(&self, id: &str, since: Option<Instant>) -> Option<Instant> {
        let topic = format!("fieldgate/{id}/status");
        let s = self.state.lock().unwrap();
        s.other
            .iter()
            .find(|(at, t, p)| {
                *t == topic && p == b"online" && since.is_none_or(|since| *at >= since)
            })
            .map(|(at, _, _)| *at)
    }

    /// JSON messages on one exact topic.
    pub fn json_on(&self, topic: &str) -> Vec<Json> {
        let s = self.state.lock().unwrap();
        s.other
            .iter()
            .filter(|(_, t, _)| t == topic)
            .map(|(_, _, p)| serde_json::from_slice(p).unwrap_or(Json::Null))
            .collect()
    }

    /// Distinct seqs of `src` received.
    pub fn first_arrivals(&self, src: &str) -> usize {
        let s = self.state.lock().unwrap();
        s.devices.get(src).map_or(0, |d| d.first.len())
    }

    /// Whether every seq of `want` of `src` arrived.
    pub fn has_all(&self, src: &str, want: &BTreeSet<u64>) -> bool {
        let s = self.state.lock().unwrap();
        let Some(d) = s.devices.get(src) else {
            return want.is_empty();
        };
        want.iter().all(|q| d.first.contains_key(q))
    }

    /// The latest first arrival among the seqs `want` of `src` (None if one is missing).
    pub fn last_first_arrival(&self, src: &str, want: &BTreeSet<u64>) -> Option<Instant> {
        let s = self.state.lock().unwrap();
        let d = s.devices.get(src)?;
        want.iter()
            .map(|q| d.first.get(q).copied())
            .collect::<Option<Vec<_>>>()?
            .into_iter()
            .max()
    }

    /// A copy of what the tap saw of `src`.
    pub fn device(&self, src: &str) -> DeviceSeen {
        let s = self.state.lock().unwrap();
        s.devices.get(src).cloned().unwrap_or_default()
    }
}

impl TapState {
    fn record(&mut self, at: Instant, topic: &str, payload: &[u8]) {
        if topic.ends_with("/data") {
            let text = String::from_utf8_lossy(payload);
            let mut it = text.splitn(3, ':');
            if let (Some(src), Some(seq)) =
                (it.next(), it.next().and_then(|s| s.parse::<u64>().ok()))
            {
                let d = self.devices.entry(src.to_string()).or_default();
                if d.first.contains_key(&seq) {
                    d.duplicates += 1;
                } else {
                    if !d.first.is_empty() && seq < d.max_first {
                        d.reordered += 1;
                    }
                    d.max_first = d.max_first.max(seq);
                    d.first.insert(seq, at);
                }
                return;
            }
        }
        if self.other.len() < TAP_OTHER_KEPT {
            self.other.push((at, topic.to_string(), payload.to_vec()));
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
