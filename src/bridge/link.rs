//! The connection to the cloud broker, MQTT 3.1.1 or MQTT 5 (`cloud.protocol`): one TLS
//! stream, owned by the bridge's pump.
//!
//! Control packets are encoded and decoded with rumqttc's codecs (`rumqttc::mqttbytes::v4`,
//! `rumqttc::v5::mqttbytes::v5`); the hot packets (PUBLISH, the acks owed to the broker)
//! are encoded by hand, MQTT 5 PUBACK and DISCONNECT decoded by hand (the codec refuses
//! reason codes it does not know), and the connection itself is ours. rumqttc's `EventLoop`
//! writes and flushes every request on its own, so each publish cost one TLS record and one
//! `writev`, and every publish and PUBACK crossed two channels and a second task: at
//! saturation that was about half the gateway's CPU. Here the pump encodes everything its
//! window allows into one buffer and writes it with a single [`Link::flush`].
//!
//! The protocol is a switch at the codec seam, not a second link: [`Link::handshake`]
//! decides it from [`LinkOptions::protocol`], and every method below encodes and decodes
//! for it. What MQTT 5 adds:
//! - CONNECT carries `session_expiry_interval` ([`LinkOptions::session_expiry`]),
//!   `maximum_packet_size` (ours) and `clean_start` as the bridge asks
//!   ([`LinkOptions::clean_start`]); the CONNACK's `receive_maximum`,
//!   `maximum_packet_size`, `server_keep_alive` and `session_present` are kept
//!   ([`Link::server`]); `topic_alias_maximum` is ignored (we never alias).
//! - A PUBLISH may carry [`Props`] (message expiry, user properties); one larger than the
//!   smaller of `cloud.max_packet_size` and the server's maximum is not queued.
//! - A PUBACK carries its reason code ([`Incoming::PubAck`]); the bridge decides what an
//!   error code means. A DISCONNECT from the broker carries one too
//!   ([`LinkError::Disconnected`]); ours may ([`Link::disconnect`]).
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
//! - MQTT 3.1.1 sessions are always clean (`clean_session = 1`). MQTT 5 sessions may be
//!   resumed, but only for the downlink's subscriptions: the queue, not the broker, holds
//!   what was not acknowledged, and every session sends it again from the queue head.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, LastWill, Login, Packet, Subscribe, SubscribeFilter,
};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use rumqttc::v5::mqttbytes::v5 as m5;
use rumqttc::v5::mqttbytes::{Error as Codec5Error, QoS as QoS5};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// The MQTT version spoken to the cloud (`cloud.protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// `"3.1.1"` (the default).
    #[default]
    V311,
    /// `"5"`.
    V5,
}

impl Protocol {
    /// The values `cloud.protocol` takes.
    pub const NAMES: [&'static str; 2] = ["3.1.1", "5"];

    /// The protocol a `cloud.protocol` value names, if any.
    pub fn from_config(s: &str) -> Option<Protocol> {
        match s {
            "3.1.1" => Some(Protocol::V311),
            "5" => Some(Protocol::V5),
            _ => None,
        }
    }
}

/// Why the broker refused the CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// An MQTT 3.1.1 CONNACK return code.
    V311(ConnectReturnCode),
    /// An MQTT 5 CONNACK reason code.
    V5(m5::ConnectReturnCode),
}

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
    Refused(Refusal),
    /// `cloud.host` cannot be a TLS server name.
    #[error("cloud.host {0:?} is not a valid DNS name or IP address")]
    ServerName(String),
    /// The broker sent something that is not MQTT of the configured version, or too large a
    /// packet.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The broker sent DISCONNECT (MQTT 3.1.1, or MQTT 5 with reason 0) or closed the
    /// connection.
    #[error("broker closed the connection")]
    Closed,
    /// The broker sent an MQTT 5 DISCONNECT with this error reason code (e.g. 0x95: a packet
    /// of ours was too large for it).
    #[error("broker disconnected with reason 0x{0:02x}")]
    Disconnected(u8),
    /// No PINGRESP within a keepalive period.
    #[error("no PINGRESP within the keepalive")]
    PingTimeout,
}

impl From<CodecError> for LinkError {
    fn from(e: CodecError) -> Self {
        LinkError::Protocol(e.to_string())
    }
}

impl From<Codec5Error> for LinkError {
    fn from(e: Codec5Error) -> Self {
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
    /// MQTT version.
    pub protocol: Protocol,
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
    /// MQTT 5: how long the broker keeps the session (the downlink's subscriptions) after
    /// the connection ends. Zero: not at all.
    pub session_expiry: Duration,
    /// MQTT 5: start a new session rather than resume the broker's (MQTT 3.1.1 always does).
    pub clean_start: bool,
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

/// MQTT 5 properties of one PUBLISH (ignored under MQTT 3.1.1).
#[derive(Debug, Clone, Copy, Default)]
pub struct Props<'a> {
    /// `message_expiry_interval`, seconds.
    pub expiry: Option<u32>,
    /// User properties, in order.
    pub user: &'a [(&'a str, &'a str)],
}

impl Props<'_> {
    /// Bytes of the property list (without its length).
    fn len(&self) -> usize {
        self.expiry.map_or(0, |_| 5)
            + self
                .user
                .iter()
                .map(|(k, v)| 1 + 2 + k.len() + 2 + v.len())
                .sum::<usize>()
    }

    fn put(&self, buf: &mut BytesMut) {
        put_varint(buf, self.len());
        if let Some(e) = self.expiry {
            buf.put_u8(0x02);
            buf.put_u32(e);
        }
        for (k, v) in self.user {
            buf.put_u8(0x26);
            buf.put_u16(k.len() as u16);
            buf.put_slice(k.as_bytes());
            buf.put_u16(v.len() as u16);
            buf.put_slice(v.as_bytes());
        }
    }

    fn fits(&self) -> bool {
        self.user
            .iter()
            .all(|(k, v)| k.len() <= u16::MAX as usize && v.len() <= u16::MAX as usize)
    }
}

/// What an MQTT 5 broker said of itself in its CONNACK (all `None` under MQTT 3.1.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Server {
    /// `receive_maximum`: most QoS 1 publishes it takes unacknowledged.
    pub receive_max: Option<u16>,
    /// `maximum_packet_size`: the largest packet it accepts.
    pub max_packet: Option<u32>,
    /// `server_keep_alive`: the keepalive it wants instead of ours.
    pub keepalive: Option<Duration>,
    /// It resumed a session of ours (its subscriptions are still there).
    pub session_present: bool,
}

/// A message from the broker on one of our subscriptions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Its topic.
    pub topic: String,
    /// Its payload.
    pub payload: Bytes,
}

/// What the broker sent that the pump acts on.
#[derive(Debug)]
pub enum Incoming {
    /// A publish of ours was acknowledged, with this reason code (MQTT 3.1.1: always 0;
    /// MQTT 5: 0x80 and above is a refusal).
    PubAck(u16, u8),
    /// A message on one of our subscriptions (its PUBACK or PUBREC is already queued).
    Publish(Message),
    /// A SUBACK; the codes of refused filters (0x80 and above) are in it.
    SubAck(Vec<bool>),
    /// Handled here (PINGRESP, PUBREL, ...).
    Other,
}

/// One connected, CONNACKed session.
pub struct Link<S> {
    io: S,
    proto: Protocol,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// Largest packet read (`cloud.max_packet_size`).
    max_packet: usize,
    /// Largest packet written: `max_packet`, or the server's maximum if smaller.
    send_max: usize,
    server: Server,
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
    /// Wraps a connected stream; nothing is sent yet. It speaks MQTT 3.1.1 until
    /// [`Link::handshake`] says otherwise.
    pub fn new(io: S, max_packet: usize, timeout: Duration) -> Self {
        Link {
            io,
            proto: Protocol::V311,
            rbuf: BytesMut::with_capacity(16 * 1024),
            wbuf: BytesMut::with_capacity(64 * 1024),
            max_packet,
            send_max: max_packet,
            server: Server::default(),
            timeout,
            in_use: Box::new([0; 1024]),
            in_use_count: 0,
            last_pkid: 0,
            ping_outstanding: false,
        }
    }

    /// The protocol the session speaks.
    pub fn protocol(&self) -> Protocol {
        self.proto
    }

    /// What the broker's CONNACK said of itself.
    pub fn server(&self) -> Server {
        self.server
    }

    /// The largest packet [`Link::publish`] queues.
    pub fn send_max(&self) -> usize {
        self.send_max
    }

    /// Sends CONNECT in `opts.protocol` and waits for an accepting CONNACK.
    pub async fn handshake(&mut self, opts: &LinkOptions) -> Result<(), LinkError> {
        self.proto = opts.protocol;
        let keep_alive = opts.keepalive.as_secs().min(u16::MAX as u64) as u16;
        match self.proto {
            Protocol::V311 => {
                let mut c = Connect::new(opts.client_id.clone());
                c.keep_alive = keep_alive;
                c.clean_session = true;
                c.login = opts.login.as_ref().map(|(u, p)| Login::new(u, p));
                c.last_will = opts.will.as_ref().map(|w| {
                    LastWill::new(&w.topic, w.payload.clone(), QoS::AtLeastOnce, w.retain)
                });
                Packet::Connect(c).write(&mut self.wbuf, self.max_packet)?;
                self.flush().await?;
                loop {
                    if let Some(p) = self.parse_v4()? {
                        return match p {
                            Packet::ConnAck(ConnAck {
                                code: ConnectReturnCode::Success,
                                ..
                            }) => Ok(()),
                            Packet::ConnAck(ConnAck { code, .. }) => {
                                Err(LinkError::Refused(Refusal::V311(code)))
                            }
                            other => Err(LinkError::Protocol(format!(
                                "expected CONNACK, got {other:?}"
                            ))),
                        };
                    }
                    self.fill().await?;
                }
            }
            Protocol::V5 => {
                let expiry = opts.session_expiry.as_secs().min(u32::MAX as u64) as u32;
                let mut props = m5::ConnectProperties::new();
                props.session_expiry_interval = (expiry > 0).then_some(expiry);
                props.max_packet_size = Some(self.max_packet.min(u32::MAX as usize) as u32);
                let c = m5::Connect {
                    keep_alive,
                    client_id: opts.client_id.clone(),
                    clean_start: opts.clean_start,
                    properties: Some(props),
                };
                let will = opts.will.as_ref().map(|w| {
                    m5::LastWill::new(
                        &w.topic,
                        w.payload.clone(),
                        QoS5::AtLeastOnce,
                        w.retain,
                        None,
                    )
                });
                let login = opts.login.as_ref().map(|(u, p)| m5::Login::new(u, p));
                m5::Packet::Connect(c, will, login).write(&mut self.wbuf, None)?;
                self.flush().await?;
                loop {
                    if let Some(p) = self.parse_v5()? {
                        return match p {
                            Raw5::Packet(p) => match *p {
                                m5::Packet::ConnAck(a) => self.connack(a),
                                other => Err(LinkError::Protocol(format!(
                                    "expected CONNACK, got {other:?}"
                                ))),
                            },
                            Raw5::Disconnect(r) => Err(LinkError::Disconnected(r)),
                            other => Err(LinkError::Protocol(format!(
                                "expected CONNACK, got {other:?}"
                            ))),
                        };
                    }
                    self.fill().await?;
                }
            }
        }
    }

    fn connack(&mut self, a: m5::ConnAck) -> Result<(), LinkError> {
        if a.code != m5::ConnectReturnCode::Success {
            return Err(LinkError::Refused(Refusal::V5(a.code)));
        }
        let p = a.properties.as_ref();
        self.server = Server {
            receive_max: p.and_then(|p| p.receive_max),
            max_packet: p.and_then(|p| p.max_packet_size),
            keepalive: p
                .and_then(|p| p.server_keep_alive)
                .map(|s| Duration::from_secs(s as u64)),
            session_present: a.session_present,
        };
        if let Some(m) = self.server.max_packet {
            self.send_max = self.max_packet.min(m as usize);
        }
        Ok(())
    }

    /// Queues a QoS 1 PUBLISH of `prefix` + `topic` without properties; returns its packet
    /// id, or `None` when the packet would exceed the largest the link sends (the caller
    /// decides what becomes of it).
    pub fn publish(
        &mut self,
        prefix: &str,
        topic: &str,
        payload: &[u8],
        retain: bool,
    ) -> Option<u16> {
        self.publish_with(prefix, topic, payload, retain, &Props::default())
    }

    /// As [`Link::publish`], with MQTT 5 properties (ignored under MQTT 3.1.1).
    pub fn publish_with(
        &mut self,
        prefix: &str,
        topic: &str,
        payload: &[u8],
        retain: bool,
        props: &Props,
    ) -> Option<u16> {
        let v5 = self.proto == Protocol::V5;
        let topic_len = prefix.len() + topic.len();
        let props_len = if v5 { props.len() } else { 0 };
        let props_block = if v5 {
            varint_len(props_len) + props_len
        } else {
            0
        };
        let remaining = 2 + topic_len + 2 + props_block + payload.len();
        if topic_len > u16::MAX as usize
            || !props.fits()
            || 1 + varint_len(remaining) + remaining > self.send_max
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
        if v5 {
            props.put(&mut self.wbuf);
        }
        self.wbuf.put_slice(payload);
        Some(pkid)
    }

    /// Queues a QoS 0 PUBLISH (no packet id, nothing to acknowledge); false when it would
    /// exceed the largest the link sends.
    pub fn publish_qos0(&mut self, topic: &str, payload: &[u8], retain: bool) -> bool {
        let v5 = self.proto == Protocol::V5;
        let remaining = 2 + topic.len() + v5 as usize + payload.len();
        if topic.len() > u16::MAX as usize || 1 + varint_len(remaining) + remaining > self.send_max
        {
            return false;
        }
        self.wbuf.reserve(5 + remaining);
        self.wbuf.put_u8(0x30 | retain as u8);
        put_varint(&mut self.wbuf, remaining);
        self.wbuf.put_u16(topic.len() as u16);
        self.wbuf.put_slice(topic.as_bytes());
        if v5 {
            // No properties.
            self.wbuf.put_u8(0);
        }
        self.wbuf.put_slice(payload);
        true
    }

    /// Queues a SUBSCRIBE of `filters` at QoS 1.
    pub fn subscribe(&mut self, filters: &[String]) -> Result<(), LinkError> {
        // The SUBACK frees the id.
        let pkid = self.take_pkid();
        match self.proto {
            Protocol::V311 => {
                let mut s = Subscribe::new_many(
                    filters
                        .iter()
                        .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)),
                );
                s.pkid = pkid;
                Packet::Subscribe(s).write(&mut self.wbuf, self.send_max)?;
            }
            Protocol::V5 => {
                let mut s = m5::Subscribe::new_many(
                    filters
                        .iter()
                        .map(|f| m5::Filter::new(f.clone(), QoS5::AtLeastOnce)),
                    None,
                );
                s.pkid = pkid;
                m5::Packet::Subscribe(s).write(&mut self.wbuf, Some(self.send_max as u32))?;
            }
        }
        Ok(())
    }

    /// Queues a PINGREQ; fails if the previous one is still unanswered.
    pub fn ping(&mut self) -> Result<(), LinkError> {
        if self.ping_outstanding {
            return Err(LinkError::PingTimeout);
        }
        self.ping_outstanding = true;
        // The same two bytes in both versions.
        self.wbuf.put_slice(&[0xC0, 0x00]);
        Ok(())
    }

    /// Queues a DISCONNECT (the caller flushes and drops the link). Under MQTT 5 it carries
    /// `reason` (0: normal, no will; 0x04: the broker publishes the will); MQTT 3.1.1 has no
    /// reason (a DISCONNECT always discards the will).
    pub fn disconnect(&mut self, reason: u8) {
        if self.proto == Protocol::V5 && reason != 0 {
            self.wbuf.put_slice(&[0xE0, 0x01, reason]);
        } else {
            self.wbuf.put_slice(&[0xE0, 0x00]);
        }
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
        loop {
            let handled = match self.proto {
                Protocol::V311 => match self.parse_v4()? {
                    Some(p) => self.handle_v4(p)?,
                    None => return Ok(None),
                },
                Protocol::V5 => match self.parse_v5()? {
                    Some(p) => self.handle_v5(p)?,
                    None => return Ok(None),
                },
            };
            if let Some(i) = handled {
                return Ok(Some(i));
            }
        }
    }

    /// A message from the broker at `qos` with `pkid`: its acknowledgement is queued (the
    /// same bytes in both versions: success needs no reason code).
    fn owe_ack(&mut self, qos: u8, pkid: u16) {
        match qos {
            1 => self.put_ack(0x40, pkid),
            2 => self.put_ack(0x50, pkid),
            _ => {}
        }
    }

    fn put_ack(&mut self, first: u8, pkid: u16) {
        self.wbuf.put_slice(&[first, 0x02]);
        self.wbuf.put_u16(pkid);
    }

    fn handle_v4(&mut self, p: Packet) -> Result<Option<Incoming>, LinkError> {
        Ok(Some(match p {
            Packet::PubAck(a) => {
                self.release(a.pkid);
                Incoming::PubAck(a.pkid, 0)
            }
            Packet::Publish(p) => {
                self.owe_ack(p.qos as u8, p.pkid);
                Incoming::Publish(Message {
                    topic: p.topic,
                    payload: p.payload,
                })
            }
            Packet::PubRel(r) => {
                self.put_ack(0x70, r.pkid);
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

    fn handle_v5(&mut self, p: Raw5) -> Result<Option<Incoming>, LinkError> {
        let p = match p {
            Raw5::PubAck(pkid, reason) => {
                self.release(pkid);
                return Ok(Some(Incoming::PubAck(pkid, reason)));
            }
            Raw5::Disconnect(0) => return Err(LinkError::Closed),
            Raw5::Disconnect(r) => return Err(LinkError::Disconnected(r)),
            Raw5::Packet(p) => *p,
        };
        Ok(Some(match p {
            m5::Packet::Publish(p) => {
                self.owe_ack(p.qos as u8, p.pkid);
                let Ok(topic) = String::from_utf8(p.topic.to_vec()) else {
                    return Err(LinkError::Protocol("PUBLISH topic is not UTF-8".into()));
                };
                Incoming::Publish(Message {
                    topic,
                    payload: p.payload,
                })
            }
            m5::Packet::PubRel(r) => {
                self.put_ack(0x70, r.pkid);
                Incoming::Other
            }
            m5::Packet::SubAck(s) => {
                self.release(s.pkid);
                Incoming::SubAck(
                    s.return_codes
                        .iter()
                        .map(|c| matches!(c, m5::SubscribeReasonCode::Success(_)))
                        .collect(),
                )
            }
            m5::Packet::PingResp(_) => {
                self.ping_outstanding = false;
                return Ok(None);
            }
            m5::Packet::PubRec(_) | m5::Packet::PubComp(_) | m5::Packet::UnsubAck(_) => {
                Incoming::Other
            }
            other => {
                return Err(LinkError::Protocol(format!(
                    "a broker does not send {other:?}"
                )))
            }
        }))
    }

    fn parse_v4(&mut self) -> Result<Option<Packet>, LinkError> {
        match Packet::read(&mut self.rbuf, self.max_packet) {
            Ok(p) => Ok(Some(p)),
            Err(CodecError::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// PUBACK and DISCONNECT are read here (rumqttc's codec refuses reason codes it does not
    /// know, and a DISCONNECT without a body); everything else by the codec.
    fn parse_v5(&mut self) -> Result<Option<Raw5>, LinkError> {
        let Some((head, rem)) = frame(&self.rbuf, self.max_packet)? else {
            return Ok(None);
        };
        match self.rbuf[0] {
            0x40 => {
                if rem < 2 {
                    return Err(LinkError::Protocol("PUBACK without a packet id".into()));
                }
                let mut f = self.rbuf.split_to(head + rem);
                f.advance(head);
                let pkid = f.get_u16();
                let reason = if rem >= 3 { f.get_u8() } else { 0 };
                Ok(Some(Raw5::PubAck(pkid, reason)))
            }
            0xE0 => {
                let f = self.rbuf.split_to(head + rem);
                Ok(Some(Raw5::Disconnect(if rem >= 1 { f[head] } else { 0 })))
            }
            _ => match m5::Packet::read(&mut self.rbuf, Some(self.max_packet as u32)) {
                Ok(p) => Ok(Some(Raw5::Packet(Box::new(p)))),
                Err(Codec5Error::InsufficientBytes(_)) => Ok(None),
                Err(e) => Err(e.into()),
            },
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

/// An MQTT 5 packet as [`Link::parse_v5`] reads it.
#[derive(Debug)]
enum Raw5 {
    /// PUBACK: packet id, reason code.
    PubAck(u16, u8),
    /// DISCONNECT: reason code.
    Disconnect(u8),
    /// Anything else, decoded by rumqttc (boxed: CONNACK properties are large, PUBACKs are
    /// the common case).
    Packet(Box<m5::Packet>),
}

/// The fixed header of the packet at the front of `buf`: (its length, the remaining length),
/// or `None` while it is incomplete or its body is not all there.
fn frame(buf: &[u8], max: usize) -> Result<Option<(usize, usize)>, LinkError> {
    let mut rem = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        rem |= ((b & 0x7F) as usize) << (7 * i);
        if b & 0x80 == 0 {
            let head = 2 + i;
            if head + rem > max {
                return Err(LinkError::Protocol(format!(
                    "packet of {} bytes exceeds cloud.max_packet_size {max}",
                    head + rem
                )));
            }
            return Ok((buf.len() >= head + rem).then_some((head, rem)));
        }
    }
    Err(LinkError::Protocol("malformed remaining length".into()))
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
    use rumqttc::mqttbytes::v4::{PubAck, Publish, SubAck, SubscribeReasonCode};
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
            protocol: Protocol::V311,
            session_expiry: Duration::ZERO,
            clean_start: true,
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
            matches!(
                err,
                LinkError::Refused(Refusal::V311(ConnectReturnCode::NotAuthorized))
            ),
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
        assert!(matches!(link.next().await.unwrap(), Incoming::PubAck(p, 0) if p == b));
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
        assert!(matches!(link.next().await.unwrap(), Incoming::PubAck(1, 0)));
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

    /// A link that did an MQTT 5 handshake with a peer answering `connack`; the peer's end
    /// and the CONNECT it read.
    async fn v5_pair(connack: m5::ConnAck) -> (Link<DuplexStream>, DuplexStream, m5::Packet) {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut link = Link::new(a, 1024 * 1024, Duration::from_secs(5));
        let broker = tokio::spawn(async move {
            let mut buf = BytesMut::new();
            let connect = loop {
                match m5::Packet::read(&mut buf, None) {
                    Ok(p) => break p,
                    Err(Codec5Error::InsufficientBytes(_)) => {
                        assert!(b.read_buf(&mut buf).await.unwrap() > 0, "closed");
                    }
                    Err(e) => panic!("peer decode: {e}"),
                }
            };
            let mut out = BytesMut::new();
            m5::Packet::ConnAck(connack).write(&mut out, None).unwrap();
            b.write_all(&out).await.unwrap();
            (b, connect)
        });
        let mut o = opts();
        o.protocol = Protocol::V5;
        o.session_expiry = Duration::from_secs(300);
        o.clean_start = false;
        link.handshake(&o).await.unwrap();
        let (b, connect) = broker.await.unwrap();
        (link, b, connect)
    }

    fn connack5(receive_max: Option<u16>, max_packet: Option<u32>) -> m5::ConnAck {
        let mut a = m5::ConnAck {
            session_present: true,
            code: m5::ConnectReturnCode::Success,
            properties: None,
        };
        if receive_max.is_some() || max_packet.is_some() {
            let mut b = BytesMut::new();
            // Properties built through the codec's own reader: receive max (0x21), max packet
            // size (0x27), server keep alive (0x13).
            let mut props = Vec::new();
            if let Some(r) = receive_max {
                props.push(0x21);
                props.extend_from_slice(&r.to_be_bytes());
            }
            if let Some(m) = max_packet {
                props.push(0x27);
                props.extend_from_slice(&m.to_be_bytes());
            }
            props.push(0x13);
            props.extend_from_slice(&7u16.to_be_bytes());
            b.put_u8(0x20);
            put_varint(&mut b, 2 + 1 + props.len());
            b.put_u8(1);
            b.put_u8(0);
            put_varint(&mut b, props.len());
            b.put_slice(&props);
            let m5::Packet::ConnAck(parsed) = m5::Packet::read(&mut b, None).unwrap() else {
                panic!("not a CONNACK")
            };
            a = parsed;
        }
        a
    }

    #[tokio::test]
    async fn a_v5_handshake_resumes_with_session_expiry_and_keeps_the_servers_limits() {
        let (link, _peer, connect) = v5_pair(connack5(Some(10), Some(2000))).await;
        let m5::Packet::Connect(c, will, login) = connect else {
            panic!("not a CONNECT")
        };
        assert!(!c.clean_start);
        let props = c.properties.unwrap();
        assert_eq!(props.session_expiry_interval, Some(300));
        assert_eq!(props.max_packet_size, Some(1024 * 1024));
        assert_eq!(&will.unwrap().topic[..], b"gw/status");
        assert_eq!(login.unwrap().username, "user");
        assert_eq!(
            link.server(),
            Server {
                receive_max: Some(10),
                max_packet: Some(2000),
                keepalive: Some(Duration::from_secs(7)),
                session_present: true,
            }
        );
        assert_eq!(link.send_max(), 2000);
        assert_eq!(link.protocol(), Protocol::V5);
    }

    #[tokio::test]
    async fn a_v5_publish_encodes_as_rumqttc_does_and_respects_the_servers_maximum() {
        let (mut link, _peer, _) = v5_pair(connack5(None, Some(4000))).await;
        let user = [
            ("gateway", "gw-1"),
            ("accepted_at", "2026-12-03T10:00:00.000Z"),
        ];
        let props = Props {
            expiry: Some(3600),
            user: &user,
        };
        for len in [0, 100, 3000] {
            let payload = vec![7u8; len];
            let pkid = link
                .publish_with("cloud/", "a/b", &payload, true, &props)
                .unwrap();
            let mut want = BytesMut::new();
            let mut p = m5::Publish::new(
                "cloud/a/b",
                QoS5::AtLeastOnce,
                payload,
                Some(m5::PublishProperties {
                    message_expiry_interval: Some(3600),
                    user_properties: user
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    payload_format_indicator: None,
                    topic_alias: None,
                    response_topic: None,
                    correlation_data: None,
                    subscription_identifiers: Vec::new(),
                    content_type: None,
                }),
            );
            p.pkid = pkid;
            p.retain = true;
            m5::Packet::Publish(p).write(&mut want, None).unwrap();
            assert_eq!(&link.wbuf[..], &want[..], "len {len}");
            link.wbuf.clear();
        }
        // Without properties: an empty property list.
        let pkid = link.publish("", "t", b"x", false).unwrap();
        let mut want = BytesMut::new();
        let mut p = m5::Publish::new("t", QoS5::AtLeastOnce, &b"x"[..], None);
        p.pkid = pkid;
        m5::Packet::Publish(p).write(&mut want, None).unwrap();
        assert_eq!(&link.wbuf[..], &want[..]);
        link.wbuf.clear();
        assert!(link.publish("", "t", &[0; 4000], false).is_none());
        assert!(!link.publish_qos0("t", &[0; 4000], false));
        assert!(link.wbuf.is_empty());
    }

    #[tokio::test]
    async fn v5_pubacks_carry_their_reason_and_a_disconnect_its_code() {
        let (mut link, mut peer, _) = v5_pair(connack5(None, None)).await;
        let a = link.publish("", "t/1", b"one", false).unwrap();
        let b = link.publish("", "t/2", b"two", false).unwrap();
        let c = link.publish("", "t/3", b"three", false).unwrap();
        // Short form (success), reason only, reason + empty properties.
        let mut bytes = vec![0x40, 0x02];
        bytes.extend_from_slice(&a.to_be_bytes());
        bytes.extend_from_slice(&[0x40, 0x03]);
        bytes.extend_from_slice(&b.to_be_bytes());
        bytes.push(0x87);
        bytes.extend_from_slice(&[0x40, 0x04]);
        bytes.extend_from_slice(&c.to_be_bytes());
        bytes.extend_from_slice(&[0x97, 0x00]);
        bytes.extend_from_slice(&[0xE0, 0x01, 0x95]);
        peer.write_all(&bytes).await.unwrap();
        for (pkid, code) in [(a, 0), (b, 0x87), (c, 0x97)] {
            match link.next().await.unwrap() {
                Incoming::PubAck(p, r) => assert_eq!((p, r), (pkid, code)),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(link.in_use_count, 0);
        assert!(matches!(
            link.next().await,
            Err(LinkError::Disconnected(0x95))
        ));
        // A DISCONNECT without a body is a normal close.
        let (mut link, mut peer, _) = v5_pair(connack5(None, None)).await;
        peer.write_all(&[0xE0, 0x00]).await.unwrap();
        assert!(matches!(link.next().await, Err(LinkError::Closed)));
    }

    #[tokio::test]
    async fn a_v5_disconnect_carries_its_reason() {
        let (mut link, mut peer, _) = v5_pair(connack5(None, None)).await;
        link.disconnect(0x04);
        link.disconnect(0);
        link.flush().await.unwrap();
        let mut got = [0u8; 5];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [0xE0, 0x01, 0x04, 0xE0, 0x00]);
    }
}
