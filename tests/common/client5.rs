//! A raw MQTT 5 client for tests: one loopback socket and rumqttc's MQTT 5 codec, no event
//! loop, so a test sees every packet and every reason code the gateway sends.

use std::time::Duration;

use bytes::BytesMut;
use rumqttc::v5::mqttbytes::v5::{
    self, ConnAck, ConnectProperties, ConnectReturnCode, DisconnectReasonCode, Filter, Packet,
    PubAckReason, Publish, PublishProperties, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one wait for the gateway lasts.
const WAIT: Duration = Duration::from_secs(10);

/// A raw MQTT 5 client: one socket, rumqttc's v5 codec.
pub struct C5 {
    pub s: TcpStream,
    buf: BytesMut,
    next_pkid: u16,
}

/// CONNECT options of a [`C5`].
#[derive(Default)]
pub struct Hello {
    pub clean: bool,
    pub props: Option<ConnectProperties>,
    pub login: Option<(&'static str, &'static str)>,
    pub will: Option<v5::LastWill>,
}

/// Empty CONNECT properties.
pub fn props() -> ConnectProperties {
    ConnectProperties::new()
}

impl C5 {
    pub async fn connect(port: u16, client_id: &str, h: Hello) -> (C5, ConnAck) {
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
    pub async fn clean(port: u16, client_id: &str) -> C5 {
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

    pub async fn send(&mut self, p: Packet) {
        let mut out = BytesMut::new();
        p.write(&mut out, None).unwrap();
        self.s.write_all(&out).await.unwrap();
    }

    pub fn pkid(&mut self) -> u16 {
        let p = self.next_pkid;
        self.next_pkid = self.next_pkid % 60_000 + 1;
        p
    }

    /// The next packet within `within`; None on timeout or a closed socket.
    pub async fn recv_within(&mut self, within: Duration) -> Option<Packet> {
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

    pub async fn recv(&mut self) -> Option<Packet> {
        self.recv_within(WAIT).await
    }

    /// Packets until the socket closes: the reason of the DISCONNECT among them, if any.
    pub async fn closed(&mut self) -> Option<DisconnectReasonCode> {
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
    pub async fn subscribe(&mut self, filters: Vec<Filter>) -> Vec<SubscribeReasonCode> {
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

    pub async fn sub(&mut self, filter: &str, qos: QoS) {
        let codes = self.subscribe(vec![Filter::new(filter, qos)]).await;
        assert!(
            matches!(codes[..], [SubscribeReasonCode::Success(_)]),
            "{filter}: {codes:?}"
        );
    }

    /// Publishes and returns the packet id used (0 at QoS 0).
    pub async fn publish(
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
    pub async fn publish1(&mut self, topic: &str, payload: &str) -> PubAckReason {
        let pkid = self.publish(topic, QoS::AtLeastOnce, payload, None).await;
        self.puback(pkid).await
    }

    pub async fn puback(&mut self, pkid: u16) -> PubAckReason {
        loop {
            match self.recv().await {
                Some(Packet::PubAck(a)) if a.pkid == pkid => return a.reason,
                Some(_) => {}
                None => panic!("no PUBACK for {pkid}"),
            }
        }
    }

    /// The PUBLISHes that arrive within `within` of each other, each QoS 1 one answered.
    pub async fn messages(&mut self, within: Duration) -> Vec<Publish> {
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
