//! The MQTT 3.1.1 connection to the cloud broker: one TLS stream, owned by the bridge's pump.
//!
//! Packets are encoded and decoded with rumqttc's codec (`rumqttc::mqttbytes::v4`); the
//! connection itself is ours. rumqttc's `EventLoop` writes and flushes every request on its
//! own, so each publish cost one TLS record and one `writev`, and every publish and PUBACK
//! crossed two channels and a second task: at saturation that was about half the gateway's
//! CPU. Here the pump encodes everything its window allows into one buffer and writes it
//! with a single [`Link::flush`].
//!
//! # Invariants
//! - Nothing reaches the socket before [`Link::flush`]; PUBACKs and PUBCOMPs owed to the
//!   broker are queued in the same buffer, so the caller flushes after reading too.
//! - Packet ids are assigned here, never 0, and one is reused only after its PUBACK came back
//!   (a bitmap of the ids in use; the pump's window keeps it far from full).
//! - [`Link::next`] is cancel-safe: bytes stay in the read buffer until a whole packet is
//!   there, so it can sit in a `select!` beside the pump's other branches.
//! - Keepalive: [`Link::ping`] is called once per keepalive period; a PINGREQ still
//!   unanswered at the next call ends the connection.
//! - Every session is clean (`clean_session = 1`): the queue, not the broker, holds what was
//!   not acknowledged.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, LastWill, Login, Packet, PubAck, PubComp, PubRec, Publish,
    Subscribe, SubscribeFilter,
};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Why the connection failed or ended. The bridge counts it, backs off and reconnects.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// TCP or TLS failure (including a certificate that does not verify).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Dial, handshake, CONNACK or a write took longer than `cloud.connect_timeout`.
    #[error("{0} timed out")]
    Timeout(&'static str),
    /// The broker refused the CONNECT.
    #[error("broker refused the connection: {0:?}")]
    Refused(ConnectReturnCode),
    /// `cloud.host` cannot be a TLS server name.
    #[error("cloud.host {0:?} is not a valid DNS name or IP address")]
    ServerName(String),
    /// The broker sent something that is not MQTT 3.1.1, or too large a packet.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The broker sent DISCONNECT or closed the connection.
    #[error("broker closed the connection")]
    Closed,
    /// No PINGRESP within a keepalive period.
    #[error("no PINGRESP within the keepalive")]
    PingTimeout,
}

impl From<CodecError> for LinkError {
    fn from(e: CodecError) -> Self {
        LinkError::Protocol(e.to_string())
    }
}

/// What the CONNECT says and how long each step may take.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    /// Host to dial; also the TLS server name (see [`super::tls`] for `cloud.server_name`).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// MQTT client id.
    pub client_id: String,
    /// Keepalive announced in the CONNECT.
    pub keepalive: Duration,
    /// Username and password, if any.
    pub login: Option<(String, String)>,
    /// Last will, QoS 1.
    pub will: Option<Will>,
    /// Largest packet read or written.
    pub max_packet_size: usize,
    /// Bound on dial + TLS + CONNACK, and on each flush.
    pub timeout: Duration,
}

/// The last will of a connection.
#[derive(Debug, Clone, PartialEq)]
pub struct Will {
    /// Its topic.
    pub topic: String,
    /// Its payload.
    pub payload: Vec<u8>,
    /// Whether the broker keeps it as the topic's retained message.
    pub retain: bool,
}

/// What the broker sent that the pump acts on.
#[derive(Debug)]
pub enum Incoming {
    /// A publish of ours was acknowledged.
    PubAck(u16),
    /// A message on one of our subscriptions (its PUBACK or PUBREC is already queued).
    Publish(Publish),
    /// A SUBACK; the codes of refused filters (0x80) are in it.
    SubAck(Vec<bool>),
    /// Handled here (PINGRESP, PUBREL, ...).
    Other,
}

/// One connected, CONNACKed session.
pub struct Link<S> {
    io: S,
    rbuf: BytesMut,
    wbuf: BytesMut,
    max_packet: usize,
    timeout: Duration,
    /// Packet ids in use, one bit each.
    in_use: Box<[u64; 1024]>,
    in_use_count: usize,
    last_pkid: u16,
    ping_outstanding: bool,
}

/// Dials `host:port`, handshakes TLS and MQTT, and returns the session.
pub async fn connect(
    opts: &LinkOptions,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Link<TlsStream<TcpStream>>, LinkError> {
    let name = ServerName::try_from(opts.host.clone())
        .map_err(|_| LinkError::ServerName(opts.host.clone()))?;
    let dial = async {
        let tcp = TcpStream::connect((opts.host.as_str(), opts.port)).await?;
        // Writes are already coalesced; Nagle would only add latency.
        tcp.set_nodelay(true)?;
        let stream = TlsConnector::from(tls).connect(name, tcp).await?;
        let mut link = Link::new(stream, opts.max_packet_size, opts.timeout);
        link.handshake(opts).await?;
        Ok::<_, LinkError>(link)
    };
    tokio::time::timeout(opts.timeout, dial)
        .await
        .map_err(|_| LinkError::Timeout("connect"))?
}

impl<S: AsyncRead + AsyncWrite + Unpin> Link<S> {
    /// Wraps a connected stream; nothing is sent yet.
    pub fn new(io: S, max_packet: usize, timeout: Duration) -> Self {
        Link {
            io,
            rbuf: BytesMut::with_capacity(16 * 1024),
            wbuf: BytesMut::with_capacity(64 * 1024),
            max_packet,
            timeout,
            in_use: Box::new([0; 1024]),
            in_use_count: 0,
            last_pkid: 0,
            ping_outstanding: false,
        }
    }

    /// Sends CONNECT (clean session) and waits for an accepting CONNACK.
    pub async fn handshake(&mut self, opts: &LinkOptions) -> Result<(), LinkError> {
        let mut c = Connect::new(opts.client_id.clone());
        c.keep_alive = opts.keepalive.as_secs().min(u16::MAX as u64) as u16;
        c.clean_session = true;
        c.login = opts.login.as_ref().map(|(u, p)| Login::new(u, p));
        c.last_will = opts
            .will
            .as_ref()
            .map(|w| LastWill::new(&w.topic, w.payload.clone(), QoS::AtLeastOnce, w.retain));
        Packet::Connect(c).write(&mut self.wbuf, self.max_packet)?;
        self.flush().await?;
        match self.read_packet().await? {
            Packet::ConnAck(ConnAck {
                code: ConnectReturnCode::Success,
                ..
            }) => Ok(()),
            Packet::ConnAck(ConnAck { code, .. }) => Err(LinkError::Refused(code)),
            other => Err(LinkError::Protocol(format!(
                "expected CONNACK, got {other:?}"
            ))),
        }
    }

    /// Queues a QoS 1 PUBLISH of `prefix` + `topic`; returns its packet id, or `None` when
    /// the packet would exceed `max_packet_size` (the caller decides what becomes of it).
    pub fn publish(
        &mut self,
        prefix: &str,
        topic: &str,
        payload: &[u8],
        retain: bool,
    ) -> Option<u16> {
        let topic_len = prefix.len() + topic.len();
        let remaining = 2 + topic_len + 2 + payload.len();
        if topic_len > u16::MAX as usize || 1 + varint_len(remaining) + remaining > self.max_packet
        {
            return None;
        }
        let pkid = self.take_pkid();
        self.wbuf.reserve(5 + remaining);
        self.wbuf.put_u8(0x32 | retain as u8);
        put_varint(&mut self.wbuf, remaining);
        self.wbuf.put_u16(topic_len as u16);
        self.wbuf.put_slice(prefix.as_bytes());
        self.wbuf.put_slice(topic.as_bytes());
        self.wbuf.put_u16(pkid);
        self.wbuf.put_slice(payload);
        Some(pkid)
    }

    /// Queues a QoS 0 PUBLISH (no packet id, nothing to acknowledge); false when it would
    /// exceed `max_packet_size`.
    pub fn publish_qos0(&mut self, topic: &str, payload: &[u8], retain: bool) -> bool {
        let remaining = 2 + topic.len() + payload.len();
        if topic.len() > u16::MAX as usize
            || 1 + varint_len(remaining) + remaining > self.max_packet
        {
            return false;
        }
        self.wbuf.reserve(5 + remaining);
        self.wbuf.put_u8(0x30 | retain as u8);
        put_varint(&mut self.wbuf, remaining);
        self.wbuf.put_u16(topic.len() as u16);
        self.wbuf.put_slice(topic.as_bytes());
        self.wbuf.put_slice(payload);
        true
    }

    /// Queues a SUBSCRIBE of `filters` at QoS 1.
    pub fn subscribe(&mut self, filters: &[String]) -> Result<(), LinkError> {
        let mut s = Subscribe::new_many(
            filters
                .iter()
                .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)),
        );
        s.pkid = self.take_pkid();
        // The SUBACK frees the id.
        Packet::Subscribe(s).write(&mut self.wbuf, self.max_packet)?;
        Ok(())
    }

    /// Queues a PINGREQ; fails if the previous one is still unanswered.
    pub fn ping(&mut self) -> Result<(), LinkError> {
        if self.ping_outstanding {
            return Err(LinkError::PingTimeout);
        }
        self.ping_outstanding = true;
        Packet::PingReq.write(&mut self.wbuf, self.max_packet)?;
        Ok(())
    }

    /// Queues a DISCONNECT (the caller flushes and drops the link).
    pub fn disconnect(&mut self) {
        self.wbuf.put_slice(&[0xE0, 0x00]);
    }

    /// Writes everything queued, within the timeout.
    pub async fn flush(&mut self) -> Result<(), LinkError> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let write = async {
            self.io.write_all(&self.wbuf).await?;
            self.io.flush().await
        };
        tokio::time::timeout(self.timeout, write)
            .await
            .map_err(|_| LinkError::Timeout("write"))??;
        self.wbuf.clear();
        Ok(())
    }

    /// Closes the TLS session (close_notify) after a flush.
    pub async fn close(&mut self) {
        let _ = tokio::time::timeout(self.timeout, self.io.shutdown()).await;
    }

    /// The next packet the pump acts on. Cancel-safe.
    pub async fn next(&mut self) -> Result<Incoming, LinkError> {
        loop {
            if let Some(i) = self.try_next()? {
                return Ok(i);
            }
            self.fill().await?;
        }
    }

    /// The next packet already read, if a whole one is buffered.
    pub fn try_next(&mut self) -> Result<Option<Incoming>, LinkError> {
        while let Some(p) = self.parse()? {
            if let Some(i) = self.handle(p)? {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }

    fn handle(&mut self, p: Packet) -> Result<Option<Incoming>, LinkError> {
        Ok(Some(match p {
            Packet::PubAck(a) => {
                self.release(a.pkid);
                Incoming::PubAck(a.pkid)
            }
            Packet::Publish(p) => {
                match p.qos {
                    QoS::AtMostOnce => {}
                    QoS::AtLeastOnce => {
                        Packet::PubAck(PubAck::new(p.pkid)).write(&mut self.wbuf, usize::MAX)?;
                    }
                    QoS::ExactlyOnce => {
                        Packet::PubRec(PubRec::new(p.pkid)).write(&mut self.wbuf, usize::MAX)?;
                    }
                }
                Incoming::Publish(p)
            }
            Packet::PubRel(r) => {
                Packet::PubComp(PubComp::new(r.pkid)).write(&mut self.wbuf, usize::MAX)?;
                Incoming::Other
            }
            Packet::SubAck(s) => {
                self.release(s.pkid);
                Incoming::SubAck(
                    s.return_codes
                        .iter()
                        .map(|c| !matches!(c, rumqttc::mqttbytes::v4::SubscribeReasonCode::Failure))
                        .collect(),
                )
            }
            Packet::PingResp => {
                self.ping_outstanding = false;
                return Ok(None);
            }
            Packet::Disconnect => return Err(LinkError::Closed),
            Packet::PubRec(_) | Packet::PubComp(_) | Packet::UnsubAck(_) => Incoming::Other,
            other => {
                return Err(LinkError::Protocol(format!(
                    "a broker does not send {other:?}"
                )))
            }
        }))
    }

    async fn read_packet(&mut self) -> Result<Packet, LinkError> {
        loop {
            if let Some(p) = self.parse()? {
                return Ok(p);
            }
            self.fill().await?;
        }
    }

    fn parse(&mut self) -> Result<Option<Packet>, LinkError> {
        match Packet::read(&mut self.rbuf, self.max_packet) {
            Ok(p) => Ok(Some(p)),
            Err(CodecError::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn fill(&mut self) -> Result<(), LinkError> {
        self.rbuf.reserve(16 * 1024);
        if self.io.read_buf(&mut self.rbuf).await? == 0 {
            return Err(LinkError::Closed);
        }
        Ok(())
    }

    fn take_pkid(&mut self) -> u16 {
        // The pump's window (≤ 65535) keeps at least one id free.
        debug_assert!(self.in_use_count < u16::MAX as usize);
        loop {
            self.last_pkid = self.last_pkid.wrapping_add(1).max(1);
            let (w, b) = (self.last_pkid as usize / 64, self.last_pkid % 64);
            if self.in_use[w] & (1 << b) == 0 {
                self.in_use[w] |= 1 << b;
                self.in_use_count += 1;
                return self.last_pkid;
            }
        }
    }

    fn release(&mut self, pkid: u16) {
        let (w, b) = (pkid as usize / 64, pkid % 64);
        if self.in_use[w] & (1 << b) != 0 {
            self.in_use[w] &= !(1 << b);
            self.in_use_count -= 1;
        }
    }
}

fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn put_varint(buf: &mut BytesMut, mut n: usize) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if n == 0 {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::mqttbytes::v4::{SubAck, SubscribeReasonCode};
    use tokio::io::DuplexStream;

    fn opts() -> LinkOptions {
        LinkOptions {
            host: "localhost".into(),
            port: 8883,
            client_id: "gw-1".into(),
            keepalive: Duration::from_secs(30),
            login: Some(("user".into(), "pw".into())),
            will: Some(Will {
                topic: "gw/status".into(),
                payload: b"offline".to_vec(),
                retain: true,
            }),
            max_packet_size: 1024 * 1024,
            timeout: Duration::from_secs(5),
        }
    }

    /// The broker's end of a duplex pipe, speaking through rumqttc's codec.
    struct Peer {
        io: DuplexStream,
        buf: BytesMut,
    }

    impl Peer {
        async fn read(&mut self) -> Packet {
            loop {
                match Packet::read(&mut self.buf, usize::MAX) {
                    Ok(p) => return p,
                    Err(CodecError::InsufficientBytes(_)) => {
                        assert!(self.io.read_buf(&mut self.buf).await.unwrap() > 0, "closed");
                    }
                    Err(e) => panic!("peer decode: {e}"),
                }
            }
        }
        async fn send(&mut self, p: Packet) {
            let mut b = BytesMut::new();
            p.write(&mut b, usize::MAX).unwrap();
            self.io.write_all(&b).await.unwrap();
        }
    }

    fn pair() -> (Link<DuplexStream>, Peer) {
        let (a, b) = tokio::io::duplex(1 << 20);
        (
            Link::new(a, 1024 * 1024, Duration::from_secs(5)),
            Peer {
                io: b,
                buf: BytesMut::new(),
            },
        )
    }

    #[tokio::test]
    async fn handshake_sends_a_clean_connect_with_will_and_login() {
        let (mut link, mut peer) = pair();
        let broker = tokio::spawn(async move {
            let Packet::Connect(c) = peer.read().await else {
                panic!("not a CONNECT")
            };
            peer.send(Packet::ConnAck(ConnAck::new(
                ConnectReturnCode::Success,
                false,
            )))
            .await;
            (c, peer)
        });
        link.handshake(&opts()).await.unwrap();
        let (c, _peer) = broker.await.unwrap();
        assert_eq!(c.client_id, "gw-1");
        assert!(c.clean_session);
        assert_eq!(c.keep_alive, 30);
        let will = c.last_will.unwrap();
        assert_eq!(
            (will.topic.as_str(), &will.message[..]),
            ("gw/status", &b"offline"[..])
        );
        assert!(will.retain);
        assert_eq!(will.qos, QoS::AtLeastOnce);
        assert_eq!(c.login.unwrap().username, "user");
    }

    #[tokio::test]
    async fn a_refused_connect_is_an_error_with_the_code() {
        let (mut link, mut peer) = pair();
        tokio::spawn(async move {
            peer.read().await;
            peer.send(Packet::ConnAck(ConnAck::new(
                ConnectReturnCode::NotAuthorized,
                false,
            )))
            .await;
            peer
        });
        let err = link.handshake(&opts()).await.unwrap_err();
        assert!(
            matches!(err, LinkError::Refused(ConnectReturnCode::NotAuthorized)),
            "{err}"
        );
    }

    #[test]
    fn publish_encodes_as_rumqttc_does_at_every_length_boundary() {
        let (mut link, _peer) = pair();
        for len in [0, 100, 110, 111, 16_370, 16_371, 16_400, 300_000] {
            for retain in [false, true] {
                let payload = vec![7u8; len];
                let pkid = link.publish("cloud/", "a/b", &payload, retain).unwrap();
                let mut want = BytesMut::new();
                let mut p = Publish::new("cloud/a/b", QoS::AtLeastOnce, payload);
                p.pkid = pkid;
                p.retain = retain;
                p.write(&mut want).unwrap();
                assert_eq!(&link.wbuf[..], &want[..], "len {len} retain {retain}");
                link.wbuf.clear();
            }
        }
    }

    #[test]
    fn too_large_a_publish_is_not_queued() {
        let (a, _b) = tokio::io::duplex(64);
        let mut link = Link::new(a, 1024, Duration::from_secs(1));
        assert!(link.publish("p/", "t", &[0; 1000], false).is_some());
        link.wbuf.clear();
        assert!(link.publish("p/", "t", &[0; 1020], false).is_none());
        assert!(link.wbuf.is_empty());
    }

    #[test]
    fn packet_ids_skip_those_in_use_wrap_and_are_never_zero() {
        let (mut link, _peer) = pair();
        let first: Vec<u16> = (0..3).map(|_| link.take_pkid()).collect();
        assert_eq!(first, [1, 2, 3]);
        link.release(2);
        link.last_pkid = u16::MAX - 1;
        assert_eq!(link.take_pkid(), u16::MAX);
        // Wraps past 0 and past 1 (still in use) to 2 (released).
        assert_eq!(link.take_pkid(), 2);
        assert_eq!(link.take_pkid(), 4);
        assert_eq!(link.in_use_count, 5);
        link.release(4);
        link.release(4);
        assert_eq!(link.in_use_count, 4);
    }

    #[tokio::test]
    async fn writes_wait_for_flush_and_go_out_together() {
        let (mut link, mut peer) = pair();
        let a = link.publish("", "t/1", b"one", false).unwrap();
        let b = link.publish("", "t/2", b"two", true).unwrap();
        assert!(!link.wbuf.is_empty());
        link.flush().await.unwrap();
        assert!(link.wbuf.is_empty());
        for (pkid, topic) in [(a, "t/1"), (b, "t/2")] {
            let Packet::Publish(p) = peer.read().await else {
                panic!("not a PUBLISH")
            };
            assert_eq!(
                (p.pkid, p.topic.as_str(), p.qos),
                (pkid, topic, QoS::AtLeastOnce)
            );
        }
        peer.send(Packet::PubAck(PubAck::new(b))).await;
        assert!(matches!(link.next().await.unwrap(), Incoming::PubAck(p) if p == b));
        assert_eq!(link.in_use_count, 1);
    }

    #[tokio::test]
    async fn incoming_messages_are_acknowledged_and_packets_split_across_reads_are_whole() {
        let (mut link, mut peer) = pair();
        let mut p = Publish::new("cmd/x", QoS::AtLeastOnce, b"go".to_vec());
        p.pkid = 9;
        let mut bytes = BytesMut::new();
        Packet::Publish(p).write(&mut bytes, usize::MAX).unwrap();
        let (head, tail) = bytes.split_at(3);
        peer.io.write_all(head).await.unwrap();
        // Half a packet: nothing yet, and nothing consumed.
        let early = tokio::time::timeout(Duration::from_millis(50), link.next()).await;
        assert!(early.is_err());
        peer.io.write_all(tail).await.unwrap();
        let Incoming::Publish(got) = link.next().await.unwrap() else {
            panic!("not a publish")
        };
        assert_eq!(
            (got.topic.as_str(), &got.payload[..]),
            ("cmd/x", &b"go"[..])
        );
        link.flush().await.unwrap();
        assert_eq!(peer.read().await, Packet::PubAck(PubAck::new(9)));
    }

    #[tokio::test]
    async fn suback_reports_refused_filters_and_frees_its_id() {
        let (mut link, mut peer) = pair();
        link.subscribe(&["a/#".into(), "b/#".into()]).unwrap();
        link.flush().await.unwrap();
        let Packet::Subscribe(s) = peer.read().await else {
            panic!("not a SUBSCRIBE")
        };
        assert_eq!(s.filters.len(), 2);
        peer.send(Packet::SubAck(SubAck::new(
            s.pkid,
            vec![
                SubscribeReasonCode::Success(QoS::AtLeastOnce),
                SubscribeReasonCode::Failure,
            ],
        )))
        .await;
        let Incoming::SubAck(ok) = link.next().await.unwrap() else {
            panic!("not a SUBACK")
        };
        assert_eq!(ok, [true, false]);
        assert_eq!(link.in_use_count, 0);
    }

    #[tokio::test]
    async fn an_unanswered_ping_ends_the_link_and_an_answered_one_does_not() {
        let (mut link, mut peer) = pair();
        link.ping().unwrap();
        link.flush().await.unwrap();
        assert_eq!(peer.read().await, Packet::PingReq);
        peer.send(Packet::PingResp).await;
        peer.send(Packet::PubAck(PubAck::new(1))).await;
        // The PINGRESP is handled inside; the PUBACK behind it comes out.
        assert!(matches!(link.next().await.unwrap(), Incoming::PubAck(1)));
        link.ping().unwrap();
        assert!(matches!(link.ping(), Err(LinkError::PingTimeout)));
    }

    #[tokio::test]
    async fn disconnect_and_eof_end_the_link() {
        let (mut link, mut peer) = pair();
        peer.send(Packet::Disconnect).await;
        assert!(matches!(link.next().await, Err(LinkError::Closed)));
        let (mut link, peer) = pair();
        drop(peer);
        assert!(matches!(link.next().await, Err(LinkError::Closed)));
    }
}
