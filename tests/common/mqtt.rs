//! Plain MQTT peers: devices that publish sequence numbers to the gateway's broker
//! ([`publish_seq`], [`flood`]), a subscriber of the gateway's broker ([`LocalSub`]), a
//! cloud-side subscriber over TLS with a client certificate ([`Collector`]), and a bare
//! rumqttd listener to compare the gateway's broker with ([`spawn_plain_rumqttd`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, Transport};
use tokio_util::sync::CancellationToken;

use super::pki::Pki;
use super::report::{check, Report};
use super::util::free_port;

/// Payload for message `seq` of source `src`, padded to `size` bytes.
pub fn payload(src: &str, seq: u64, size: usize) -> Vec<u8> {
    let mut p = format!("{src}:{seq}:").into_bytes();
    p.resize(size.max(p.len()), b'.');
    p
}

/// A plain MQTT device: publishes `seqs` on `dev/<src>/data` at QoS 1 to the gateway's
/// broker and returns once every PUBLISH was PUBACKed.
pub async fn publish_seq(mqtt_port: u16, src: &str, seqs: std::ops::Range<u64>, size: usize) {
    let mut o = MqttOptions::new(format!("device-{src}"), "127.0.0.1", mqtt_port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(100);
    let (client, mut el) = AsyncClient::new(o, 200);
    let want = seqs.end - seqs.start;
    let topic = format!("dev/{src}/data");
    let src2 = src.to_string();
    let publisher = tokio::spawn(async move {
        for s in seqs {
            client
                .publish(
                    topic.clone(),
                    QoS::AtLeastOnce,
                    false,
                    payload(&src2, s, size),
                )
                .await
                .unwrap();
        }
        client
    });
    let mut acked = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked < want {
        assert!(
            Instant::now() < deadline,
            "device {src}: only {acked}/{want} acked"
        );
        match tokio::time::timeout(Duration::from_secs(10), el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("device {src}: {e}"),
            Err(_) => panic!("device {src}: no progress for 10s at {acked}/{want}"),
        }
    }
    let client = publisher.await.unwrap();
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), el.poll()).await;
}

/// A device that publishes `dev/<src>/data` at QoS 1 as fast as the broker takes it, from
/// seq 0 up to `max`, and stops at the first connection error. Returns the sequence numbers
/// the broker acknowledged (PUBACK): exactly the messages the gateway accepted.
pub async fn flood(mqtt_port: u16, src: &str, max: u64, size: usize) -> Vec<u64> {
    let mut o = MqttOptions::new(format!("flood-{src}"), "127.0.0.1", mqtt_port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(100);
    let (client, mut el) = AsyncClient::new(o, 200);
    let topic = format!("dev/{src}/data");
    let src2 = src.to_string();
    let publisher = tokio::spawn(async move {
        for s in 0..max {
            let p = payload(&src2, s, size);
            if client
                .publish(topic.clone(), QoS::AtLeastOnce, false, p)
                .await
                .is_err()
            {
                return;
            }
        }
    });
    // One connection, never resumed: the n-th outgoing PUBLISH carries seq n, so its packet
    // id maps an acknowledgement back to its sequence number.
    let mut next_out = 0u64;
    let mut by_pkid = std::collections::HashMap::new();
    let mut acked = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline && (acked.len() as u64) < max {
        match tokio::time::timeout(Duration::from_secs(10), el.poll()).await {
            Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid)))) => {
                by_pkid.insert(pkid, next_out);
                next_out += 1;
            }
            Ok(Ok(Event::Incoming(Packet::PubAck(a)))) => {
                if let Some(seq) = by_pkid.remove(&a.pkid) {
                    acked.push(seq);
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => break,
        }
    }
    publisher.abort();
    acked.sort_unstable();
    acked
}

/// One message a [`LocalSub`] received.
#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

/// A plain MQTT client of the gateway's local broker that records everything on `filter`
/// (in arrival order) until dropped. `start` returns once the broker granted the subscription.
pub struct LocalSub {
    pub received: Arc<Mutex<Vec<Msg>>>,
    pub client: AsyncClient,
    stop: CancellationToken,
}

impl LocalSub {
    pub async fn start(port: u16, filter: &str, qos: QoS) -> LocalSub {
        let mut o = MqttOptions::new(format!("local-sub-{}", free_port()), "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut el) = AsyncClient::new(o, 100);
        client.subscribe(filter, qos).await.unwrap();
        let received: Arc<Mutex<Vec<Msg>>> = Arc::default();
        let stop = CancellationToken::new();
        let (r2, s2) = (received.clone(), stop.clone());
        let (ack_tx, ack_rx) = tokio::sync::oneshot::channel();
        let mut ack_tx = Some(ack_tx);
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    _ = s2.cancelled() => return,
                    ev = el.poll() => ev,
                };
                match ev {
                    Ok(Event::Incoming(Packet::Publish(p))) => r2.lock().unwrap().push(Msg {
                        topic: p.topic.clone(),
                        payload: p.payload.to_vec(),
                        retain: p.retain,
                    }),
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(t) = ack_tx.take() {
                            let _ = t.send(());
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ack_rx)
            .await
            .expect("no SUBACK from the gateway's broker")
            .unwrap();
        LocalSub {
            received,
            client,
            stop,
        }
    }

    /// Payloads received on `topic`, in order.
    pub fn on(&self, topic: &str) -> Vec<Vec<u8>> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.topic == topic)
            .map(|m| m.payload.clone())
            .collect()
    }
}

impl Drop for LocalSub {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Everything a collector received: `(topic, payload)` in arrival order.
pub type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A cloud-side subscriber (TLS + client certificate) that records every message.
pub struct Collector {
    pub received: Received,
    pub client: AsyncClient,
    stop: CancellationToken,
}

impl Collector {
    /// Waits (at most `within`) until the gateway has said `online` on `fieldgate/gw1/status`;
    /// panics otherwise.
    pub async fn wait_online(&self, within: Duration) {
        let online = super::util::eventually(within, || {
            self.on_topic("fieldgate/gw1/status")
                .last()
                .is_some_and(|p| p == b"online")
        })
        .await;
        assert!(online, "the gateway never said online to the cloud");
    }

    pub async fn start(pki: &Pki, cloud_port: u16, filter: &str) -> Collector {
        let mut o = MqttOptions::new(
            format!("collector-{}", free_port()),
            "127.0.0.1",
            cloud_port,
        );
        o.set_keep_alive(Duration::from_secs(30));
        o.set_transport(Transport::tls_with_config(pki.client_tls()));
        o.set_max_packet_size(2 * 1024 * 1024, 2 * 1024 * 1024);
        let (client, mut el) = AsyncClient::new(o, 100);
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (r2, s2) = (received.clone(), stop.clone());
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
                    Ok(Event::Incoming(Packet::Publish(p))) => r2
                        .lock()
                        .unwrap()
                        .push((p.topic.clone(), p.payload.to_vec())),
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
            .expect("collector: no SUBACK from the cloud")
            .unwrap();
        Collector {
            received,
            client,
            stop,
        }
    }

    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// Waits until `pred` holds on the sequence report, or the deadline passes.
    pub async fn wait_for(&self, within: Duration, pred: impl Fn(&Report) -> bool) -> Report {
        let deadline = Instant::now() + within;
        loop {
            let r = check(&self.received.lock().unwrap());
            if pred(&r) || Instant::now() > deadline {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Messages on one exact topic.
    pub fn on_topic(&self, topic: &str) -> Vec<Vec<u8>> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| t == topic)
            .map(|(_, p)| p.clone())
            .collect()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Starts a bare rumqttd 0.20 with one plain MQTT 3.1.1 listener on `127.0.0.1:port`, on a
/// thread of its own (what fieldgate's front end is compared with, in tests and benches).
pub fn spawn_plain_rumqttd(port: u16) {
    use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};
    let mut v4 = std::collections::HashMap::new();
    v4.insert(
        "plain".to_string(),
        ServerSettings {
            name: "plain".into(),
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            tls: None,
            next_connection_delay_ms: 0,
            connections: ConnectionSettings {
                connection_timeout_ms: 10_000,
                max_payload_size: 1 << 20,
                max_inflight_count: 100,
                auth: None,
                external_auth: None,
                dynamic_filters: false,
            },
        },
    );
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 1024,
            max_outgoing_packet_count: 1024,
            max_segment_size: 1 << 20,
            max_segment_count: 4,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(v4),
        ..Default::default()
    };
    std::thread::spawn(move || {
        let _ = rumqttd::Broker::new(config).start();
    });
}
