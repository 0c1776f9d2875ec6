//! MQTT 5 devices on the front end, next to 3.1.1 ones, against the real gateway binary.
//!
//! The MQTT 5 side is driven by [`C5`], a raw client over loopback (rumqttc's MQTT 5 codec,
//! no event loop), so each test sees every packet and every reason code the front end
//! sends; 3.1.1 clients are rumqttc's. Each test waits with bounded deadlines and asserts
//! what arrived, never how fast.

mod common;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::*;
use rumqttc::v5::mqttbytes::v5::{
    self, ConnAck, ConnectProperties, ConnectReturnCode, DisconnectReasonCode, Filter, Packet,
    PubAckReason, PubRecReason, Publish, PublishProperties, RetainForwardRule, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use toml::{toml, Table};

const WAIT: Duration = Duration::from_secs(10);

/// A gateway without cloud whose `[broker]` section has the keys and tables of `broker`,
/// with an anonymous default listener.
async fn gateway(broker: Table) -> (Gateway, tempfile::TempDir) {
    let data = tempfile::tempdir().unwrap();
    let ports = GatewayPorts::new();
    let config = GatewayConfig::local(&ports, data.path())
        .listener("default", ports.mqtt, Listener::new().anonymous())
        .set("gateway.shutdown_grace", "1s")
        .with("broker", broker);
    (Gateway::start(&config.to_toml(), &ports).await, data)
}

/// A raw MQTT 5 client: one socket, rumqttc's v5 codec.
struct C5 {
    s: TcpStream,
    buf: BytesMut,
    next_pkid: u16,
}

/// CONNECT options of a [`C5`].
#[derive(Default)]
struct Hello {
    clean: bool,
    props: Option<ConnectProperties>,
    login: Option<(&'static str, &'static str)>,
    will: Option<v5::LastWill>,
}

fn props() -> ConnectProperties {
    ConnectProperties::new()
}

impl C5 {
    async fn connect(port: u16, client_id: &str, h: Hello) -> (C5, ConnAck) {
        let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut c = C5 {
            s,
            buf: BytesMut::new(),
            next_pkid: 1,
        };
        let connect = v5::Connect {
            keep_alive: 60,
            client_id: client_id.to_string(),
            clean_start: h.clean,
            properties: h.props,
        };
        let login = h.login.map(|(u, p)| v5::Login::new(u, p));
        c.send(Packet::Connect(connect, h.will, login)).await;
        match c.recv().await {
            Some(Packet::ConnAck(a)) => (c, a),
            other => panic!("{client_id}: no CONNACK: {other:?}"),
        }
    }

    /// A clean session with no properties.
    async fn clean(port: u16, client_id: &str) -> C5 {
        let (c, a) = C5::connect(
            port,
            client_id,
            Hello {
                clean: true,
                ..Hello::default()
            },
        )
        .await;
        assert_eq!(a.code, ConnectReturnCode::Success, "{client_id}: {a:?}");
        c
    }

    async fn send(&mut self, p: Packet) {
        let mut out = BytesMut::new();
        p.write(&mut out, None).unwrap();
        self.s.write_all(&out).await.unwrap();
    }

    fn pkid(&mut self) -> u16 {
        let p = self.next_pkid;
        self.next_pkid = self.next_pkid % 60_000 + 1;
        p
    }

    /// The next packet within `within`; None on timeout or a closed socket.
    async fn recv_within(&mut self, within: Duration) -> Option<Packet> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match Packet::read(&mut self.buf, None) {
                Ok(p) => return Some(p),
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("malformed packet from the gateway: {e}"),
            }
            let read = tokio::time::timeout_at(deadline, self.s.read_buf(&mut self.buf));
            match read.await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        }
    }

    async fn recv(&mut self) -> Option<Packet> {
        self.recv_within(WAIT).await
    }

    /// Packets until the socket closes: the reason of the DISCONNECT among them, if any.
    async fn closed(&mut self) -> Option<DisconnectReasonCode> {
        let mut reason = None;
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::time::Instant::now() < deadline {
            match self.recv_within(WAIT).await {
                Some(Packet::Disconnect(d)) => reason = Some(d.reason_code),
                Some(_) => {}
                None => return reason,
            }
        }
        panic!("the gateway left the connection open");
    }

    /// Subscribes to `filters` and returns the SUBACK's codes.
    async fn subscribe(&mut self, filters: Vec<Filter>) -> Vec<SubscribeReasonCode> {
        let pkid = self.pkid();
        self.send(Packet::Subscribe(v5::Subscribe {
            pkid,
            filters,
            properties: None,
        }))
        .await;
        loop {
            match self.recv().await {
                Some(Packet::SubAck(a)) if a.pkid == pkid => return a.return_codes,
                Some(_) => {}
                None => panic!("no SUBACK"),
            }
        }
    }

    async fn sub(&mut self, filter: &str, qos: QoS) {
        let codes = self.subscribe(vec![Filter::new(filter, qos)]).await;
        assert!(
            matches!(codes[..], [SubscribeReasonCode::Success(_)]),
            "{filter}: {codes:?}"
        );
    }

    /// Publishes and returns the packet id used (0 at QoS 0).
    async fn publish(
        &mut self,
        topic: &str,
        qos: QoS,
        payload: &str,
        props: Option<PublishProperties>,
    ) -> u16 {
        let mut p = Publish::new(topic, qos, payload.to_string(), props);
        if qos != QoS::AtMostOnce {
            p.pkid = self.pkid();
        }
        let pkid = p.pkid;
        self.send(Packet::Publish(p)).await;
        pkid
    }

    /// The PUBACK's reason for a QoS 1 publish.
    async fn publish1(&mut self, topic: &str, payload: &str) -> PubAckReason {
        let pkid = self.publish(topic, QoS::AtLeastOnce, payload, None).await;
        self.puback(pkid).await
    }

    async fn puback(&mut self, pkid: u16) -> PubAckReason {
        loop {
            match self.recv().await {
                Some(Packet::PubAck(a)) if a.pkid == pkid => return a.reason,
                Some(_) => {}
                None => panic!("no PUBACK for {pkid}"),
            }
        }
    }

    /// The PUBLISHes that arrive within `within` of each other, each QoS 1 one answered.
    async fn messages(&mut self, within: Duration) -> Vec<Publish> {
        let mut got = Vec::new();
        while let Some(p) = self.recv_within(within).await {
            if let Packet::Publish(p) = p {
                if p.qos == QoS::AtLeastOnce {
                    self.send(Packet::PubAck(v5::PubAck::new(p.pkid, None)))
                        .await;
                }
                got.push(p);
            }
        }
        got
    }
}

fn topic(p: &Publish) -> &str {
    std::str::from_utf8(&p.topic).unwrap()
}

fn user_props(p: &Publish) -> Vec<(String, String)> {
    p.properties
        .as_ref()
        .map(|pr| pr.user_properties.clone())
        .unwrap_or_default()
}

/// MQTT 5 and 3.1.1 devices on one broker: the CONNACK tells an MQTT 5 device the server's
/// limits and assigns an empty client id one; user properties, content type, payload format,
/// response topic and correlation data reach an MQTT 5 subscriber untouched (none of the
/// front end's marks among them), a 3.1.1 subscriber gets the same message without them, and
/// a 3.1.1 publisher's message reaches the MQTT 5 subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_and_3_1_1_devices_share_the_broker_and_properties_pass_through() {
    let (gw, _d) = gateway(toml! { max_inflight = 20 }).await;
    let (anon5, ack) = C5::connect(
        gw.mqtt,
        "",
        Hello {
            clean: true,
            ..Hello::default()
        },
    )
    .await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    let p = ack.properties.expect("CONNACK properties");
    assert!(p
        .assigned_client_identifier
        .as_deref()
        .is_some_and(|id| !id.is_empty()));
    assert_eq!(p.receive_max, Some(20));
    assert_eq!(p.topic_alias_max, Some(64));
    assert_eq!(p.shared_subscription_available, Some(1));
    assert!(p.max_packet_size.is_some_and(|m| m > 256 * 1024));
    drop(anon5);

    let mut sub5 = C5::clean(gw.mqtt, "sub5").await;
    sub5.sub("mix/#", QoS::AtLeastOnce).await;
    let mut sub4 = Sub311::start(gw.mqtt, "sub4", "mix/#").await;
    let mut pub5 = C5::clean(gw.mqtt, "pub5").await;
    let props = PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        response_topic: Some("mix/reply".into()),
        correlation_data: Some(Bytes::from_static(b"corr-7")),
        user_properties: vec![("site".into(), "north".into()), ("a".into(), "1".into())],
        ..Default::default()
    };
    let pkid = pub5
        .publish(
            "mix/five",
            QoS::AtLeastOnce,
            "{\"v\":5}",
            Some(props.clone()),
        )
        .await;
    assert_eq!(pub5.puback(pkid).await, PubAckReason::Success);
    let got = sub5.messages(Duration::from_millis(700)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    let p = got[0].properties.as_ref().expect("properties");
    assert_eq!(p.user_properties, props.user_properties);
    assert_eq!(p.content_type, props.content_type);
    assert_eq!(p.payload_format_indicator, Some(1));
    assert_eq!(p.response_topic, props.response_topic);
    assert_eq!(p.correlation_data, props.correlation_data);
    assert_eq!(
        sub4.payloads(1).await,
        ["{\"v\":5}".to_string()],
        "the 3.1.1 subscriber"
    );
    // A 3.1.1 publisher's message: no properties at all.
    sub4.publish("mix/four", "from 3.1.1").await;
    let got = sub5.messages(Duration::from_millis(700)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(topic(&got[0]), "mix/four");
    assert!(user_props(&got[0]).is_empty(), "{got:?}");
}

/// The ACL and the limits hold for MQTT 5 devices as for 3.1.1 ones, and an MQTT 5 device is
/// told why: PUBACK and PUBREC 0x87 outside the ACL (and nothing delivered), SUBACK 0x87 and
/// 0x8F, PUBACK 0x99 for a payload its format indicator calls UTF-8 and is not, PUBACK 0x97
/// over the `drop` publish rate, CONNACK 0x86 for a wrong password, DISCONNECT 0x95 for a
/// packet over `max_payload_size`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reason_codes_tell_an_mqtt5_device_what_was_refused() {
    let broker = toml! {
        max_payload_size = 1024
        max_publish_rate = 5
        rate_limit_policy = "drop"
        [acl.default]
        publish = ["field/%c/#"]
        subscribe = ["field/#", "cmd/%c/#"]
    };
    let (gw, _d) = gateway(broker).await;
    let mut watch = C5::clean(gw.mqtt, "watch").await;
    watch.sub("field/#", QoS::AtLeastOnce).await;
    let mut dev = C5::clean(gw.mqtt, "dev5").await;
    assert_eq!(
        dev.publish1("field/dev5/t", "ok").await,
        PubAckReason::Success
    );
    assert_eq!(
        dev.publish1("field/other/t", "denied").await,
        PubAckReason::NotAuthorized
    );
    let pkid = dev
        .publish("field/other/q2", QoS::ExactlyOnce, "denied", None)
        .await;
    match dev.recv().await {
        Some(Packet::PubRec(r)) => {
            assert_eq!((r.pkid, r.reason), (pkid, PubRecReason::NotAuthorized))
        }
        other => panic!("PUBREC expected: {other:?}"),
    }
    let codes = dev
        .subscribe(vec![
            Filter::new("cmd/dev5/#", QoS::AtLeastOnce),
            Filter::new("secret/#", QoS::AtLeastOnce),
            Filter::new("bad/#/x", QoS::AtLeastOnce),
            Filter::new("$share/g/secret/#", QoS::AtLeastOnce),
        ])
        .await;
    assert_eq!(
        codes,
        [
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::NotAuthorized,
            SubscribeReasonCode::TopicFilterInvalid,
            SubscribeReasonCode::NotAuthorized,
        ]
    );
    let utf8 = PublishProperties {
        payload_format_indicator: Some(1),
        ..Default::default()
    };
    let mut bad = Publish::new("field/dev5/fmt", QoS::AtLeastOnce, vec![0xffu8, 0xfe], None);
    bad.properties = Some(utf8);
    bad.pkid = dev.pkid();
    let pkid = bad.pkid;
    dev.send(Packet::Publish(bad)).await;
    assert_eq!(dev.puback(pkid).await, PubAckReason::PayloadFormatInvalid);
    // Only the allowed one reached the subscriber.
    let seen = watch.messages(Duration::from_millis(700)).await;
    let topics: Vec<&str> = seen.iter().map(topic).collect();
    assert_eq!(topics, ["field/dev5/t"]);

    // Over the rate (5/s, `drop`): the answers say quota exceeded.
    let mut reasons = Vec::new();
    for i in 0..20 {
        reasons.push(dev.publish1("field/dev5/r", &i.to_string()).await);
    }
    assert!(
        reasons.contains(&PubAckReason::QuotaExceeded),
        "{reasons:?}"
    );
    assert!(reasons
        .iter()
        .all(|r| matches!(r, PubAckReason::Success | PubAckReason::QuotaExceeded)));

    // Too large a packet: DISCONNECT 0x95, then closed.
    dev.publish("field/dev5/big", QoS::AtMostOnce, &"x".repeat(4096), None)
        .await;
    assert_eq!(
        dev.closed().await,
        Some(DisconnectReasonCode::PacketTooLarge)
    );
    assert_eq!(
        gw.metric("fieldgate_broker_closed_total{reason=\"too_large\"}"),
        1.0
    );
}

/// An MQTT 5 device logs in like a 3.1.1 one: a wrong password gets CONNACK 0x86, none on a
/// listener without anonymous access 0x87, the right one gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_logins_are_checked_like_3_1_1_ones() {
    let broker = toml! {
        [[users]]
        username = "dev"
        password = "right"
    };
    let data = tempfile::tempdir().unwrap();
    let ports = GatewayPorts::new();
    let config = GatewayConfig::local(&ports, data.path())
        .listener("default", ports.mqtt, Listener::new())
        .with("broker", broker);
    let gw = Gateway::start(&config.to_toml(), &ports).await;
    let (_c, ack) = C5::connect(
        gw.mqtt,
        "dev",
        Hello {
            clean: true,
            login: Some(("dev", "wrong")),
            ..Hello::default()
        },
    )
    .await;
    assert_eq!(ack.code, ConnectReturnCode::BadUserNamePassword);
    let (_c, ack) = C5::connect(
        gw.mqtt,
        "dev",
        Hello {
            clean: true,
            ..Hello::default()
        },
    )
    .await;
    assert_eq!(ack.code, ConnectReturnCode::NotAuthorized);
    let (_c, ack) = C5::connect(
        gw.mqtt,
        "dev",
        Hello {
            clean: true,
            login: Some(("dev", "right")),
            ..Hello::default()
        },
    )
    .await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
}

/// Limits both ways: the device's receive maximum (2) holds the third delivery until it
/// answers one; its maximum packet size keeps a large message from it while the small one
/// after it arrives; topic aliases set and then used reach the subscriber as the full topic;
/// alias 0 ends the session with 0x94; more unanswered QoS 1 PUBLISHes than the receive
/// maximum announced ends it with 0x93.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_maximum_packet_size_and_topic_aliases_hold_both_ways() {
    let (gw, _d) = gateway(toml! { max_inflight = 3 }).await;
    let mut small = props();
    small.receive_maximum = Some(2);
    small.max_packet_size = Some(300);
    let (mut slow, _) = C5::connect(
        gw.mqtt,
        "slow",
        Hello {
            clean: true,
            props: Some(small),
            ..Hello::default()
        },
    )
    .await;
    slow.sub("lim/#", QoS::AtLeastOnce).await;
    let mut publ = C5::clean(gw.mqtt, "publ").await;
    publ.publish1("lim/big", &"x".repeat(1000)).await;
    for i in 0..4 {
        publ.publish1("lim/n", &i.to_string()).await;
    }
    // Without answering: two arrive, the rest wait.
    let mut first = Vec::new();
    while let Some(p) = slow.recv_within(Duration::from_millis(700)).await {
        if let Packet::Publish(p) = p {
            first.push(p);
        }
    }
    let payloads = |v: &[Publish]| -> Vec<String> {
        v.iter()
            .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
            .collect()
    };
    assert_eq!(payloads(&first), ["0", "1"], "the big one is never sent");
    slow.send(Packet::PubAck(v5::PubAck::new(first[0].pkid, None)))
        .await;
    let mut next = Vec::new();
    while let Some(p) = slow.recv_within(Duration::from_millis(700)).await {
        if let Packet::Publish(p) = p {
            next.push(p);
        }
    }
    assert_eq!(payloads(&next), ["2"]);
    for p in first[1..].iter().chain(&next) {
        slow.send(Packet::PubAck(v5::PubAck::new(p.pkid, None)))
            .await;
    }
    let rest = slow.messages(Duration::from_millis(700)).await;
    assert_eq!(payloads(&rest), ["3"]);
    assert_eq!(
        gw.metric("fieldgate_broker_too_large_for_device_total"),
        1.0
    );

    // Topic aliases from the device.
    let mut watch = C5::clean(gw.mqtt, "watch-alias").await;
    watch.sub("alias/#", QoS::AtMostOnce).await;
    let alias = |n: u16| {
        Some(PublishProperties {
            topic_alias: Some(n),
            ..Default::default()
        })
    };
    let pkid = publ
        .publish("alias/long/topic", QoS::AtLeastOnce, "one", alias(1))
        .await;
    assert_eq!(publ.puback(pkid).await, PubAckReason::Success);
    let pkid = publ.publish("", QoS::AtLeastOnce, "two", alias(1)).await;
    assert_eq!(publ.puback(pkid).await, PubAckReason::Success);
    let got = watch.messages(Duration::from_millis(700)).await;
    let seen: Vec<(&str, String)> = got
        .iter()
        .map(|p| (topic(p), String::from_utf8_lossy(&p.payload).into_owned()))
        .collect();
    assert_eq!(
        seen,
        [
            ("alias/long/topic", "one".to_string()),
            ("alias/long/topic", "two".to_string())
        ]
    );
    publ.publish("alias/x", QoS::AtMostOnce, "bad", alias(0))
        .await;
    assert_eq!(
        publ.closed().await,
        Some(DisconnectReasonCode::TopicAliasInvalid)
    );

    // Four unanswered QoS 1 PUBLISHes in one write, against a receive maximum of 3.
    let mut greedy = C5::clean(gw.mqtt, "greedy").await;
    let mut out = BytesMut::new();
    for i in 1..=4u16 {
        let mut p = Publish::new("lim/greedy", QoS::AtLeastOnce, "g", None);
        p.pkid = i;
        Packet::Publish(p).write(&mut out, None).unwrap();
    }
    greedy.s.write_all(&out).await.unwrap();
    assert_eq!(
        greedy.closed().await,
        Some(DisconnectReasonCode::ReceiveMaximumExceeded)
    );
}

/// Session expiry: 0 ends the session with the connection, 60 s keeps it (and its queued
/// QoS 1 message) through a reconnect, 1 s lets it expire. Message expiry: a message that
/// waited past its expiry for an offline session is not delivered, one that did not is, with
/// what is left of its expiry; a retained message past its expiry is not sent a new
/// subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_and_message_expiry_are_honoured() {
    let (gw, _d) = gateway(Table::new()).await;
    let with_expiry = |secs: u32, clean: bool| {
        let mut p = props();
        p.session_expiry_interval = Some(secs);
        Hello {
            clean,
            props: Some(p),
            ..Hello::default()
        }
    };
    // Expiry 0 (the default).
    let (mut c, a) = C5::connect(gw.mqtt, "exp0", with_expiry(0, true)).await;
    assert!(!a.session_present);
    c.sub("exp/#", QoS::AtLeastOnce).await;
    drop(c);
    let (_c, a) = C5::connect(gw.mqtt, "exp0", with_expiry(0, false)).await;
    assert!(!a.session_present, "expiry 0 kept the session");

    // Expiry 60 s: resumed, and gets what was published meanwhile.
    let (mut c, _) = C5::connect(gw.mqtt, "exp60", with_expiry(60, true)).await;
    c.sub("exp/#", QoS::AtLeastOnce).await;
    c.send(Packet::Disconnect(v5::Disconnect::new(
        DisconnectReasonCode::NormalDisconnection,
    )))
    .await;
    assert_eq!(c.closed().await, None);
    let mut publ = C5::clean(gw.mqtt, "exp-pub").await;
    let short = PublishProperties {
        message_expiry_interval: Some(1),
        ..Default::default()
    };
    let long = PublishProperties {
        message_expiry_interval: Some(3600),
        ..Default::default()
    };
    for (t, p) in [("exp/short", short.clone()), ("exp/long", long)] {
        let pkid = publ.publish(t, QoS::AtLeastOnce, t, Some(p)).await;
        assert_eq!(publ.puback(pkid).await, PubAckReason::Success);
    }
    // A retained message with a short expiry.
    let mut r = Publish::new("exp/retained", QoS::AtLeastOnce, "r", Some(short));
    r.retain = true;
    r.pkid = publ.pkid();
    let pkid = r.pkid;
    publ.send(Packet::Publish(r)).await;
    assert_eq!(publ.puback(pkid).await, PubAckReason::Success);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (mut c, a) = C5::connect(gw.mqtt, "exp60", with_expiry(60, false)).await;
    assert!(a.session_present, "expiry 60 lost the session");
    let got = c.messages(Duration::from_millis(1000)).await;
    let topics: Vec<&str> = got.iter().map(topic).collect();
    assert_eq!(topics, ["exp/long"], "the expired message was delivered");
    let left = got[0]
        .properties
        .as_ref()
        .and_then(|p| p.message_expiry_interval);
    assert!(left.is_some_and(|l| l < 3600 && l > 3500), "{left:?}");
    // The expired retained message is not sent to a new subscription.
    let mut fresh = C5::clean(gw.mqtt, "exp-fresh").await;
    fresh.sub("exp/#", QoS::AtLeastOnce).await;
    assert!(fresh.messages(Duration::from_millis(700)).await.is_empty());

    // Expiry 1 s: gone after 2.5 s.
    let (c, _) = C5::connect(gw.mqtt, "exp1", with_expiry(1, true)).await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_c, a) = C5::connect(gw.mqtt, "exp1", with_expiry(60, false)).await;
    assert!(!a.session_present, "an expired session was resumed");
}

/// Subscription options and shared subscriptions: no local keeps a device's own publishes
/// from it (another device's still arrive); retain as published keeps the flag on a live
/// delivery of a retained publish (without it the flag is cleared); retain handling 2 sends
/// no retained message, 1 sends them only to a new subscription; `$share/<group>/<filter>`
/// splits the messages between the group's members, each once; a delivery carries the
/// subscription identifiers of the filters it matched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_options_and_shared_subscriptions_work() {
    let (gw, _d) = gateway(Table::new()).await;
    let mut me = C5::clean(gw.mqtt, "me").await;
    let mut nl = Filter::new("opt/nl/#", QoS::AtLeastOnce);
    nl.nolocal = true;
    let mut rap = Filter::new("opt/rap/#", QoS::AtLeastOnce);
    rap.preserve_retain = true;
    let plain = Filter::new("opt/plain/#", QoS::AtLeastOnce);
    let codes = me.subscribe(vec![nl, rap, plain]).await;
    assert_eq!(codes.len(), 3);
    let mut other = C5::clean(gw.mqtt, "other").await;
    me.publish1("opt/nl/mine", "mine").await;
    other.publish1("opt/nl/theirs", "theirs").await;
    for t in ["opt/rap/x", "opt/plain/x"] {
        let mut p = Publish::new(t, QoS::AtLeastOnce, "kept", None);
        p.retain = true;
        p.pkid = other.pkid();
        let pkid = p.pkid;
        other.send(Packet::Publish(p)).await;
        assert_eq!(other.puback(pkid).await, PubAckReason::Success);
    }
    let got = me.messages(Duration::from_millis(700)).await;
    let seen: Vec<(&str, bool)> = got.iter().map(|p| (topic(p), p.retain)).collect();
    assert_eq!(
        seen,
        [
            ("opt/nl/theirs", false),
            ("opt/rap/x", true),
            ("opt/plain/x", false)
        ]
    );

    // Subscription identifiers: the matching filter's. (rumqttd sends overlapping
    // subscriptions one copy each; docs/broker.md says what they carry.)
    for (filter, id) in [("opt/id/#", 7), ("opt/other/+", 9)] {
        let pkid = me.pkid();
        me.send(Packet::Subscribe(v5::Subscribe {
            pkid,
            filters: vec![Filter::new(filter, QoS::AtLeastOnce)],
            properties: Some(v5::SubscribeProperties {
                id: Some(id),
                user_properties: Vec::new(),
            }),
        }))
        .await;
    }
    assert_eq!(me.messages(Duration::from_millis(500)).await.len(), 0);
    other.publish1("opt/id/x", "ids").await;
    other.publish1("opt/other/y", "ids").await;
    let got = me.messages(Duration::from_millis(700)).await;
    let ids: Vec<(&str, Vec<usize>)> = got
        .iter()
        .map(|p| {
            let ids = p
                .properties
                .as_ref()
                .unwrap()
                .subscription_identifiers
                .clone();
            (topic(p), ids)
        })
        .collect();
    assert_eq!(ids, [("opt/id/x", vec![7]), ("opt/other/y", vec![9])]);

    // Retain handling.
    let mut never = Filter::new("opt/plain/#", QoS::AtLeastOnce);
    never.retain_forward_rule = RetainForwardRule::Never;
    let mut late = C5::clean(gw.mqtt, "late").await;
    late.subscribe(vec![never]).await;
    assert!(late.messages(Duration::from_millis(500)).await.is_empty());
    let mut on_new = Filter::new("opt/rap/#", QoS::AtLeastOnce);
    on_new.retain_forward_rule = RetainForwardRule::OnNewSubscribe;
    late.subscribe(vec![on_new.clone()]).await;
    let got = late.messages(Duration::from_millis(500)).await;
    assert_eq!(got.iter().map(topic).collect::<Vec<_>>(), ["opt/rap/x"]);
    late.subscribe(vec![on_new]).await;
    assert!(late.messages(Duration::from_millis(500)).await.is_empty());

    // A shared subscription of two members.
    let mut a = C5::clean(gw.mqtt, "share-a").await;
    let mut b = C5::clean(gw.mqtt, "share-b").await;
    a.sub("$share/grp/sh/#", QoS::AtLeastOnce).await;
    b.sub("$share/grp/sh/#", QoS::AtLeastOnce).await;
    for i in 0..20 {
        other.publish1("sh/t", &i.to_string()).await;
    }
    let (ga, gb) = tokio::join!(
        a.messages(Duration::from_millis(700)),
        b.messages(Duration::from_millis(700))
    );
    let mut all: Vec<u32> = ga
        .iter()
        .chain(&gb)
        .map(|p| String::from_utf8_lossy(&p.payload).parse().unwrap())
        .collect();
    all.sort();
    assert_eq!(all, (0..20).collect::<Vec<_>>(), "each message once");
    assert!(
        !ga.is_empty() && !gb.is_empty(),
        "{} / {}",
        ga.len(),
        gb.len()
    );
}

/// DISCONNECT with reason 0x04 publishes the will; a normal DISCONNECT does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_with_will_message_publishes_the_will() {
    let (gw, _d) = gateway(Table::new()).await;
    let mut watch = C5::clean(gw.mqtt, "will-watch").await;
    watch.sub("will/#", QoS::AtLeastOnce).await;
    for (id, reason) in [
        ("w-normal", DisconnectReasonCode::NormalDisconnection),
        ("w-will", DisconnectReasonCode::DisconnectWithWillMessage),
    ] {
        let will = v5::LastWill::new(format!("will/{id}"), "gone", QoS::AtLeastOnce, false, None);
        let (mut c, _) = C5::connect(
            gw.mqtt,
            id,
            Hello {
                clean: true,
                will: Some(will),
                ..Hello::default()
            },
        )
        .await;
        c.send(Packet::Disconnect(v5::Disconnect::new(reason)))
            .await;
        assert_eq!(c.closed().await, None);
    }
    let got = watch.messages(Duration::from_millis(1500)).await;
    assert_eq!(got.iter().map(topic).collect::<Vec<_>>(), ["will/w-will"]);
}

/// A 3.1.1 subscriber (rumqttc's client).
struct Sub311 {
    client: rumqttc::AsyncClient,
    rx: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl Sub311 {
    async fn start(port: u16, id: &str, filter: &str) -> Sub311 {
        let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut el) = rumqttc::AsyncClient::new(o, 100);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (subbed_tx, subbed) = tokio::sync::oneshot::channel();
        let mut subbed_tx = Some(subbed_tx);
        tokio::spawn(async move {
            while let Ok(ev) = el.poll().await {
                match ev {
                    rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
                        let _ = tx.send(String::from_utf8_lossy(&p.payload).into_owned());
                    }
                    rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) => {
                        if let Some(t) = subbed_tx.take() {
                            let _ = t.send(());
                        }
                    }
                    _ => {}
                }
            }
        });
        client
            .subscribe(filter, rumqttc::QoS::AtLeastOnce)
            .await
            .unwrap();
        tokio::time::timeout(WAIT, subbed).await.unwrap().unwrap();
        Sub311 { client, rx }
    }

    async fn payloads(&mut self, n: usize) -> Vec<String> {
        let mut v = Vec::new();
        while v.len() < n {
            match tokio::time::timeout(WAIT, self.rx.recv()).await {
                Ok(Some(p)) => v.push(p),
                _ => break,
            }
        }
        v
    }

    async fn publish(&self, topic: &str, payload: &str) {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload.to_string())
            .await
            .unwrap();
    }
}

/// Will delay: the will of a connection that ended without DISCONNECT waits out its delay
/// (not there before it, there after it), and a reconnection of the client id within the
/// delay cancels it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_will_waits_and_a_reconnection_cancels_it() {
    let (gw, _d) = gateway(Table::new()).await;
    let mut watch = C5::clean(gw.mqtt, "delay-watch").await;
    watch.sub("delayed/#", QoS::AtLeastOnce).await;
    let hello = |id: &str, clean: bool| {
        let mut p = props();
        p.session_expiry_interval = Some(30);
        let will_props = v5::LastWillProperties {
            delay_interval: Some(3),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        };
        let will = v5::LastWill::new(
            format!("delayed/{id}"),
            "gone",
            QoS::AtLeastOnce,
            false,
            Some(will_props),
        );
        Hello {
            clean,
            props: Some(p),
            will: Some(will),
            ..Hello::default()
        }
    };
    let (gone, _) = C5::connect(gw.mqtt, "d-gone", hello("d-gone", true)).await;
    let (back, _) = C5::connect(gw.mqtt, "d-back", hello("d-back", true)).await;
    drop(gone);
    drop(back);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_back, a) = C5::connect(gw.mqtt, "d-back", hello("d-back", false)).await;
    assert!(a.session_present);
    assert!(
        watch.messages(Duration::from_millis(1500)).await.is_empty(),
        "a will came before its delay"
    );
    let got = watch.messages(Duration::from_secs(6)).await;
    assert_eq!(
        got.iter().map(topic).collect::<Vec<_>>(),
        ["delayed/d-gone"]
    );
}
