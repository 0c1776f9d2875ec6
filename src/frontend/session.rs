//! One device connection through the front end: CONNECT, authentication, then the relay.
//!
//! Owns both sockets of one device: the device's (plain or TLS) and the loopback connection
//! to rumqttd opened for it, both framed by [`super::framed`]. One task runs the whole
//! session; it reads whichever side has a packet and writes to the other, so a device that
//! stops reading slows only its own session (TCP back-pressure up to rumqttd, which buffers
//! per connection).
//!
//! MQTT 3.1 clients (`MQIsdp`, level 3: the same packets) are served as 3.1.1.
//! CONNECT is refused (with a CONNACK) for another protocol level, an empty client id
//! without clean session, a client id rumqttd cannot route (`/ + # $`) or holding a NUL,
//! a client id outside `broker.client_id_pattern` or whose session belongs to another
//! identity (see `sessions`), failed authentication, or rumqttd refusing it.
//!
//! Session state machine: `AwaitConnect -(CONNECT ok)-> Relaying -(DISCONNECT | error |
//! violation | keepalive expired)-> Closed`. Here: CONNECT and authentication, the claim of
//! the client id and its release, the upstream connection's opening and closing, and the
//! device's will: a device whose connection ends without DISCONNECT has its will queued
//! here (rumqttd publishes it locally). While relaying, every decision is the sans-I/O
//! [`super::relay::Relay`]'s (its header lists the rules); this module is its driver: it
//! waits on both sockets, the journal's durable ticket, the relay's deadline and the stop,
//! feeds the relay, and writes what it decided, rumqttd's side first.
//!
//! Driver invariants: between two writes, the packet waited for and at most [`BATCH`]
//! rounds of packets already buffered (one from each side) are handled; both sides are
//! written before anything more is read; a throttled session, or one whose PUBLISH waits for
//! room in the journal, parses nothing more from the device until that is over.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use bytes::BytesMut;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5::{self, ConnectReturnCode as R5, Packet as P5};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::auth::{Action, Verdict};
use super::clients::Client;
use super::framed::{BrokerCodec, DeviceCodec, Framed, READ_RESERVE};
use super::relay::{
    Goodbye, Identity, Next, Peer, Relay, BATCH, TOPIC_ALIAS_MAX, UPSTREAM_KEEPALIVE,
};
use super::sessions::{Filters, NEVER_EXPIRES};
use super::{upstream, Context};
use crate::tls::ClientCertMode;
use crate::topic;

/// Why a session ended; the label of `fieldgate_broker_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The device sent DISCONNECT.
    Disconnect,
    /// MQTT 5: the device sent DISCONNECT asking for its will (0x04).
    DisconnectWithWill,
    /// The device's socket closed or failed.
    DeviceGone,
    /// rumqttd closed its side (e.g. the client id was taken over).
    BrokerGone,
    /// No CONNECT within `connect_timeout`.
    ConnectTimeout,
    /// CONNECT refused (credentials, certificate, protocol); CONNACK was sent.
    Refused,
    /// Keepalive expired.
    KeepaliveTimeout,
    /// A packet larger than `max_payload_size`.
    TooLarge,
    /// A malformed packet or a protocol violation.
    ProtocolViolation,
    /// Over `broker.max_publish_rate` with `rate_limit_policy = "disconnect"`.
    RateLimited,
    /// A newer connection with the same client id took over.
    TakenOver,
    /// MQTT 5: more unanswered QoS 1/2 PUBLISHes than the receive maximum announced.
    ReceiveMaximum,
    /// MQTT 5: a topic alias of 0, above the maximum announced, or unknown.
    TopicAlias,
}

impl End {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            End::Disconnect => "disconnect",
            End::DisconnectWithWill => "disconnect_with_will",
            End::DeviceGone => "device_gone",
            End::BrokerGone => "broker_gone",
            End::ConnectTimeout => "connect_timeout",
            End::Refused => "refused",
            End::KeepaliveTimeout => "keepalive_timeout",
            End::TooLarge => "too_large",
            End::ProtocolViolation => "protocol_violation",
            End::RateLimited => "rate_limited",
            End::TakenOver => "taken_over",
            End::ReceiveMaximum => "receive_maximum",
            End::TopicAlias => "topic_alias",
        }
    }
}

/// The device's socket: MQTT 5 packets (3.1.1 on the wire for a 3.1.1 device).
type DeviceIo<S> = Framed<ReadHalf<S>, WriteHalf<S>, DeviceCodec>;

/// The loopback socket to rumqttd: v5 packets.
type BrokerIo = Framed<OwnedReadHalf, OwnedWriteHalf, BrokerCodec>;

/// The protocol a device connected with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// MQTT 3.1 (`MQIsdp`, level 3): served as 3.1.1.
    V31,
    /// MQTT 3.1.1.
    V311,
    /// MQTT 5.
    V5,
}

/// A device's CONNECT, in MQTT 5 terms whatever its level.
#[derive(Debug, Clone)]
pub struct Hello {
    /// The protocol level.
    pub level: Level,
    /// Client id, keepalive, clean start and (MQTT 5) the properties.
    pub connect: v5::Connect,
    /// The will.
    pub will: Option<v5::LastWill>,
    /// Username and password.
    pub login: Option<v5::Login>,
}

impl Hello {
    fn from_v4(c: v4::Connect, level: Level) -> Hello {
        let will = c.last_will.map(|w| v5::LastWill {
            topic: Bytes::from(w.topic.into_bytes()),
            message: w.message,
            qos: upstream::q5(w.qos),
            retain: w.retain,
            properties: None,
        });
        let login = c.login.map(|l| v5::Login {
            username: l.username,
            password: l.password,
        });
        Hello {
            level,
            connect: v5::Connect {
                keep_alive: c.keep_alive,
                client_id: c.client_id,
                clean_start: c.clean_session,
                properties: None,
            },
            will,
            login,
        }
    }

    /// The device speaks MQTT 5.
    pub fn v5(&self) -> bool {
        self.level == Level::V5
    }

    /// The client id.
    pub fn client_id(&self) -> &str {
        &self.connect.client_id
    }

    /// How long the session outlives its connection, in seconds ([`NEVER_EXPIRES`]: for
    /// ever). 3.1.1: 0 for a clean session, else for ever; MQTT 5: the CONNECT's session
    /// expiry interval (0 when absent).
    pub fn session_expiry(&self) -> u32 {
        match self.level {
            Level::V5 => self
                .connect
                .properties
                .as_ref()
                .and_then(|p| p.session_expiry_interval)
                .unwrap_or(0),
            _ if self.connect.clean_start => 0,
            _ => NEVER_EXPIRES,
        }
    }

    /// MQTT 5: seconds the will waits after the connection ended, at most the session's
    /// `expiry` (MQTT-3.1.3-9: it goes when the session ends, if that is sooner).
    fn will_delay(&self, expiry: u32) -> u32 {
        self.will
            .as_ref()
            .and_then(|w| w.properties.as_ref())
            .and_then(|p| p.delay_interval)
            .unwrap_or(0)
            .min(expiry)
    }

    /// The will's topic (checked to be UTF-8 by [`read_connect`]).
    fn will_topic(&self) -> Option<&str> {
        self.will
            .as_ref()
            .and_then(|w| std::str::from_utf8(&w.topic).ok())
    }

    /// What the device asked of its deliveries (MQTT 5; defaults for 3.1.1).
    fn peer(&self) -> Peer {
        let props = self.connect.properties.as_ref();
        Peer {
            v5: self.v5(),
            receive_max: props
                .and_then(|p| p.receive_maximum)
                .filter(|m| *m > 0)
                .unwrap_or(u16::MAX),
            max_packet: props.and_then(|p| p.max_packet_size).filter(|m| *m > 0),
        }
    }
}

/// The device's first packet, which must be a CONNECT: of MQTT 5, of MQTT 3.1.1, or of MQTT
/// 3.1 (`MQIsdp`, level 3), whose packet is the same and is read as 3.1.1. `max`:
/// `broker.max_payload_size`. An MQTT 5 CONNECT switches the device's codec to MQTT 5.
/// `Err(None)`: a CONNECT of another protocol level, to be answered with CONNACK 1.
async fn read_connect<S: AsyncRead + AsyncWrite>(
    dev: &mut DeviceIo<S>,
    max: usize,
) -> Result<Hello, Option<End>> {
    let frame = loop {
        match rumqttc::mqttbytes::check(dev.buffer().iter(), max) {
            Ok(h) => break h.frame_length(),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(n)) => {
                dev.buffer().reserve(n.min(READ_RESERVE));
                dev.read_more().await.map_err(Some)?;
            }
            Err(rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(_)) => {
                return Err(Some(End::TooLarge))
            }
            Err(_) => return Err(Some(End::ProtocolViolation)),
        }
    };
    let buf = dev.buffer();
    if buf[0] != 0x10 {
        return Err(Some(End::ProtocolViolation));
    }
    // Fixed header: the type byte, then the remaining length (1-4 bytes).
    let head = 1
        + buf[1..]
            .iter()
            .take(4)
            .take_while(|b| *b & 0x80 != 0)
            .count()
        + 1;
    let vh = &buf[head..frame];
    let name_len = match vh {
        [a, b, ..] => u16::from_be_bytes([*a, *b]) as usize,
        _ => return Err(Some(End::ProtocolViolation)),
    };
    let (Some(name), Some(&level)) = (vh.get(2..2 + name_len), vh.get(2 + name_len)) else {
        return Err(Some(End::ProtocolViolation));
    };
    let level = match (name, level) {
        (b"MQTT", 4) => Level::V311,
        (b"MQTT", 5) => Level::V5,
        (b"MQIsdp", 3) => Level::V31,
        (b"MQTT" | b"MQIsdp", _) => return Err(None),
        _ => return Err(Some(End::ProtocolViolation)),
    };
    let frame = buf.split_to(frame);
    match level {
        Level::V5 => {
            dev.codec_mut().v5 = true;
            let h =
                rumqttc::v5::mqttbytes::v5::FixedHeader::new(0x10, head - 1, frame.len() - head);
            let (connect, will, login) =
                v5::Connect::read(h, frame.freeze()).map_err(|_| Some(End::ProtocolViolation))?;
            if will
                .as_ref()
                .is_some_and(|w| std::str::from_utf8(&w.topic).is_err())
            {
                return Err(Some(End::ProtocolViolation));
            }
            let hello = Hello {
                level,
                connect,
                will,
                login,
            };
            dev.codec_mut().out_max = hello.peer().max_packet;
            Ok(hello)
        }
        Level::V311 => {
            let h = rumqttc::mqttbytes::FixedHeader::new(0x10, head - 1, frame.len() - head);
            v4::Connect::read(h, frame.freeze())
                .map(|c| Hello::from_v4(c, level))
                .map_err(|_| Some(End::ProtocolViolation))
        }
        Level::V31 => {
            // The same CONNECT as 3.1.1 with the 3.1 name and level: read it as 3.1.1 (the
            // type byte, then the 3.1.1 variable header and the rest of the packet).
            let mut body = BytesMut::with_capacity(frame.len());
            body.extend_from_slice(&[0x10, 0, 4, b'M', b'Q', b'T', b'T', 4]);
            body.extend_from_slice(&frame[head + 2 + name_len + 1..]);
            let h = rumqttc::mqttbytes::FixedHeader::new(0x10, 0, body.len() - 1);
            v4::Connect::read(h, body.freeze())
                .map(|c| Hello::from_v4(c, level))
                .map_err(|_| Some(End::ProtocolViolation))
        }
    }
}

/// A CONNACK refusing with `code` (a v5 code; a 3.1.1 device gets the nearest 3.1.1 one).
fn refusal(code: R5) -> P5 {
    P5::ConnAck(v5::ConnAck {
        session_present: false,
        code,
        properties: None,
    })
}

/// Runs one device session to its end. `cert_cn` is the CN of a verified client
/// certificate, if the device sent one.
pub async fn run<S>(stream: S, peer: SocketAddr, cert_cn: Option<String>, ctx: Arc<Context>) -> End
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
    let mut dev: DeviceIo<S> = Framed::new(rd, wr, DeviceCodec::new(ctx.max_packet));
    let connect = read_connect(&mut dev, ctx.max_packet);
    let hello = match tokio::time::timeout(ctx.connect_timeout, connect).await {
        Err(_) => return End::ConnectTimeout,
        Ok(Ok(c)) => c,
        Ok(Err(Some(End::TooLarge))) if dev.codec_mut().v5 => {
            let _ = dev.send(refusal(R5::PacketTooLarge)).await;
            return End::TooLarge;
        }
        Ok(Err(Some(e))) => return e,
        Ok(Err(None)) => {
            // Another protocol level: CONNACK 1 (3.1.1's form), then close (MQTT-3.1.2-2).
            ctx.metrics.refuse("protocol_version");
            let _ = dev.send(refusal(R5::UnsupportedProtocolVersion)).await;
            return End::Refused;
        }
    };
    let (mut hello, mut id) = match admit(&ctx, &mut dev, hello, cert_cn, peer).await {
        Ok(admitted) => admitted,
        Err(end) => return end,
    };
    // An MQTT 5 device with no client id gets one assigned (told in the CONNACK).
    let assigned = (hello.v5() && hello.client_id().is_empty()).then(|| {
        let id = format!("fieldgate-{:016x}", rand::random::<u64>());
        hello.connect.client_id = id.clone();
        id
    });
    if let Some(a) = &assigned {
        id.client_id = a.clone();
        let _ = ctx.sessions.bind(a, id.name.as_deref());
    }
    let client_id = hello.client_id().to_string();
    // One live upstream connection per client id (see `sessions`); rumqttd names an empty
    // one itself, uniquely.
    let claim = if client_id.is_empty() {
        None
    } else {
        Some(ctx.sessions.claim(&client_id).await)
    };
    let stop = claim.as_ref().map(|c| c.stop.clone()).unwrap_or_default();
    // Whose subscriptions these are in the ingest's audience (rumqttd names an empty client
    // id itself; `$` cannot start a device's client id).
    let audience_key = if client_id.is_empty() {
        static ANON: AtomicU64 = AtomicU64::new(0);
        format!("$anon/{}", ANON.fetch_add(1, Ordering::Relaxed))
    } else {
        client_id.clone()
    };
    // A session starts clean when the device asks, or when nothing of its last one is left
    // (ended, or expired). rumqttd's clean flag is 3.1.1's (see `sessions`): a session that
    // is resumed connects without it, one that ends with its connection with it, and one
    // that starts clean and outlives its connection without it, after a purge of what
    // rumqttd still holds.
    let resume =
        !hello.connect.clean_start && !client_id.is_empty() && ctx.sessions.resumable(&client_id);
    let persistent = resume || hello.session_expiry() != 0;
    if !resume {
        ctx.ingest.audience().clear(&audience_key);
    }
    let opened = async {
        if !resume && persistent && ctx.sessions.rumqttd_holds(&client_id) {
            purge_upstream(&ctx, &hello).await?;
        }
        open_upstream(&ctx, &hello, !persistent).await
    };
    let mut up = match opened.await {
        Ok(up) => {
            if !persistent && !client_id.is_empty() {
                ctx.sessions.purged(&client_id);
            }
            up
        }
        Err(code) => {
            if !client_id.is_empty() {
                ctx.sessions.release(&client_id, 0, false);
            }
            ctx.metrics.refuse("broker_unavailable");
            let _ = dev.send(refusal(code)).await;
            return End::Refused;
        }
    };
    let (end, filters, goodbye) = relay_session(
        &ctx,
        &mut dev,
        &mut up,
        &hello,
        (id, audience_key.clone(), assigned),
        peer,
        stop,
    )
    .await;
    // MQTT 5: DISCONNECT may change the session expiry, except from 0 (MQTT-3.14.2-2).
    let mut expiry = hello.session_expiry();
    if let Some(e) = goodbye.session_expiry.filter(|_| expiry != 0) {
        expiry = e;
    }
    if expiry != 0 && !client_id.is_empty() {
        // For the session's next connection (before the binding may go).
        ctx.sessions.keep_filters(&client_id, filters);
    }
    if end != End::Disconnect {
        if let (Some(w), Some(topic)) = (&hello.will, hello.will_topic()) {
            // rumqttd publishes it locally once the upstream socket closes (after the will
            // delay, unless the client id connects again); the cloud's copy is queued here
            // (nobody waits for it), after the same delay and unless the same happens.
            let (topic, message) = (topic.to_string(), w.message.clone());
            let (q, retain) = (w.qos as u8, w.retain);
            let delay = hello.will_delay(expiry);
            let ingest = ctx.ingest.clone();
            let queue = move || {
                let retain = ingest.admit_retain(&topic, &message, q, retain);
                ingest.offer_or_count(&topic, &message, q, retain);
            };
            if delay == 0 || client_id.is_empty() {
                queue();
            } else {
                let token = ctx.sessions.defer_will(&client_id);
                let (sessions, id) = (ctx.sessions.clone(), client_id.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(delay as u64)).await;
                    if sessions.take_will(&id, token) {
                        queue();
                    }
                });
            }
        }
    }
    if hello.v5() {
        if let Some(code) = disconnect_reason(end) {
            // Best effort: tell an MQTT 5 device why the server closes.
            let bye = P5::Disconnect(farewell(code, end));
            let _ = tokio::time::timeout(Duration::from_secs(1), dev.send(bye)).await;
        }
    }
    close_upstream(&mut up, end == End::Disconnect).await;
    if expiry == 0 {
        // Before the claim goes: the next session of this client id registers after this.
        ctx.ingest.audience().clear(&audience_key);
    }
    if !client_id.is_empty() {
        ctx.sessions.release(&client_id, expiry, persistent);
    }
    drop(claim);
    end
}

/// The DISCONNECT for `end`, with a reason string. (rumqttc 0.25 writes a DISCONNECT with a
/// reason code but no properties one byte longer than its remaining length says; one with
/// properties is written right.)
fn farewell(code: v5::DisconnectReasonCode, end: End) -> v5::Disconnect {
    v5::Disconnect {
        reason_code: code,
        properties: Some(v5::DisconnectProperties {
            session_expiry_interval: None,
            reason_string: Some(end.as_str().replace('_', " ")),
            user_properties: Vec::new(),
            server_reference: None,
        }),
    }
}

/// The reason an MQTT 5 device is told when the server ends its session (None: the device
/// ended it, or its socket is gone).
fn disconnect_reason(end: End) -> Option<v5::DisconnectReasonCode> {
    use v5::DisconnectReasonCode as D;
    Some(match end {
        End::KeepaliveTimeout => D::KeepAliveTimeout,
        End::TooLarge => D::PacketTooLarge,
        End::ProtocolViolation => D::ProtocolError,
        End::RateLimited => D::MessageRateTooHigh,
        End::TakenOver => D::SessionTakenOver,
        End::ReceiveMaximum => D::ReceiveMaximumExceeded,
        End::TopicAlias => D::TopicAliasInvalid,
        End::BrokerGone => D::ServerShuttingDown,
        End::Disconnect
        | End::DisconnectWithWill
        | End::DeviceGone
        | End::ConnectTimeout
        | End::Refused => return None,
    })
}

/// Decides whether a CONNECT is let in: the client id rumqttd can route, the will's topic, the
/// identity (see [`authenticate`]), the client id against `broker.client_id_pattern` and the
/// session's owner (see `sessions`), and the will against the ACL (a will outside it is
/// dropped). Err: how the session ends, the refusing CONNACK already sent.
async fn admit<S: AsyncRead + AsyncWrite>(
    ctx: &Context,
    dev: &mut DeviceIo<S>,
    mut hello: Hello,
    cert_cn: Option<String>,
    peer: SocketAddr,
) -> Result<(Hello, Identity), End> {
    let bad_id = R5::ClientIdentifierNotValid;
    // rumqttd's router drops a connection whose client id holds one of these without an
    // answer, and the second such CONNECT with the same id poisons the broker's listener
    // (every later connection panics). Refuse them here, as 3.1.1 allows (MQTT-3.1.3-5);
    // a NUL is not allowed in any MQTT string (MQTT-1.5.3-2).
    if hello.client_id().contains(['/', '+', '#', '$', '\0']) {
        return refused(ctx, dev, "client_id", bad_id).await;
    }
    // MQTT 5 assigns an empty client id one (see `run`); 3.1.1 only for a clean session.
    if hello.client_id().is_empty() && !hello.connect.clean_start && !hello.v5() {
        return refused(ctx, dev, "client_id", bad_id).await;
    }
    if let Some(w) = &hello.will {
        let topic = std::str::from_utf8(&w.topic).unwrap_or("");
        if topic::validate_topic(topic).is_err() {
            return Err(End::ProtocolViolation);
        }
    }
    let name = match authenticate(ctx, &hello, cert_cn, peer).await {
        Ok(name) => name,
        Err((code, reason)) => {
            info!(listener = %ctx.listener, %peer, client_id = %hello.client_id(), reason, "connection refused");
            return refused(ctx, dev, reason, code).await;
        }
    };
    // The client id must fit the identity, and must not be another identity's session.
    if let Some(pattern) = &ctx.client_id_pattern {
        if !super::auth::client_id_fits(pattern, name.as_deref(), hello.client_id()) {
            info!(listener = %ctx.listener, %peer, client_id = %hello.client_id(), identity = ?name, "connection refused: client id does not fit broker.client_id_pattern");
            return refused(ctx, dev, "client_id_pattern", bad_id).await;
        }
    }
    if !hello.client_id().is_empty() && !ctx.sessions.bind(hello.client_id(), name.as_deref()) {
        info!(listener = %ctx.listener, %peer, client_id = %hello.client_id(), identity = ?name, "connection refused: the client id's session belongs to another identity");
        return refused(ctx, dev, "client_id_owned", bad_id).await;
    }
    let id = Identity {
        name,
        client_id: hello.client_id().to_string(),
    };
    if let Some(topic) = hello.will_topic() {
        if !ctx
            .acl
            .allows(id.name.as_deref(), &id.client_id, Action::Publish, topic)
        {
            // A will outside the ACL would be a publish the device may not make: drop it.
            ctx.metrics.deny(Action::Publish);
            hello.will = None;
        }
    }
    Ok((hello, id))
}

/// Refuses a CONNECT: counts `reason`, sends CONNACK `code` (best effort) and ends the session.
async fn refused<S: AsyncRead + AsyncWrite, T>(
    ctx: &Context,
    dev: &mut DeviceIo<S>,
    reason: &'static str,
    code: R5,
) -> Result<T, End> {
    ctx.metrics.refuse(reason);
    let _ = dev.send(refusal(code)).await;
    Err(End::Refused)
}

/// rumqttd's CONNACK refusal as a code the device may be sent (rumqttc cannot write the
/// 3.1.1-style codes of its v5 enum).
fn device_code(c: R5) -> R5 {
    match c {
        R5::RefusedProtocolVersion | R5::UnsupportedProtocolVersion => {
            R5::UnsupportedProtocolVersion
        }
        R5::BadClientId | R5::ClientIdentifierNotValid => R5::ClientIdentifierNotValid,
        R5::BadUserNamePassword => R5::BadUserNamePassword,
        R5::NotAuthorized | R5::Banned => R5::NotAuthorized,
        _ => R5::ServerUnavailable,
    }
}

/// The CONNACK properties an MQTT 5 device is told: what the front end takes from it and
/// what it supports.
fn connack_properties(ctx: &Context, assigned: Option<String>) -> v5::ConnAckProperties {
    v5::ConnAckProperties {
        session_expiry_interval: None,
        receive_max: Some(ctx.max_inflight.min(u16::MAX as usize) as u16),
        max_qos: None,
        retain_available: Some(1),
        // The largest packet: `broker.max_payload_size` of remaining length, plus the fixed
        // header.
        max_packet_size: Some(u32::try_from(ctx.max_packet + 5).unwrap_or(u32::MAX)),
        assigned_client_identifier: assigned,
        topic_alias_max: Some(TOPIC_ALIAS_MAX),
        reason_string: None,
        user_properties: Vec::new(),
        wildcard_subscription_available: Some(1),
        subscription_identifiers_available: Some(1),
        shared_subscription_available: Some(1),
        server_keep_alive: None,
        response_information: None,
        server_reference: None,
        authentication_method: None,
        authentication_data: None,
    }
}

/// From rumqttd's CONNACK to the end of the session: how it ended, the session's filters,
/// and what the device's DISCONNECT asked.
async fn relay_session<S: AsyncRead + AsyncWrite>(
    ctx: &Arc<Context>,
    dev: &mut DeviceIo<S>,
    up: &mut BrokerIo,
    hello: &Hello,
    (id, audience_key, assigned): (Identity, String, Option<String>),
    peer: SocketAddr,
    stop: CancellationToken,
) -> (End, Filters, Goodbye) {
    let resumed = match up.next().await {
        Ok(P5::ConnAck(a)) if a.code == R5::Success => a.session_present,
        Ok(P5::ConnAck(a)) => {
            ctx.metrics.refuse("broker_refused");
            let _ = dev.send(refusal(device_code(a.code))).await;
            return (End::Refused, Filters::new(), Goodbye::default());
        }
        _ => {
            ctx.metrics.refuse("broker_unavailable");
            let _ = dev.send(refusal(R5::ServerUnavailable)).await;
            return (End::Refused, Filters::new(), Goodbye::default());
        }
    };
    // What rumqttd holds for a resumed session, as its last connection left it.
    let filters = if resumed {
        ctx.sessions.take_filters(&id.client_id)
    } else {
        Filters::new()
    };
    let ack = v5::ConnAck {
        // MQTT 3.1 has no session-present flag (the byte is reserved).
        session_present: resumed && hello.level != Level::V31,
        code: R5::Success,
        properties: hello.v5().then(|| connack_properties(ctx, assigned)),
    };
    if dev.send(P5::ConnAck(ack)).await.is_err() {
        return (End::DeviceGone, filters, Goodbye::default());
    }
    debug!(listener = %ctx.listener, %peer, client_id = %id.client_id, identity = ?id.name, "device connected");
    // Listed on the operator page until the session ends (the guard drops the row).
    let row = ctx
        .clients
        .register(&id.client_id, id.name.as_deref(), &ctx.listener, peer);
    let durable = ctx.ingest.journal().map(|j| j.durable());
    let mut relay = Relay::new(
        ctx.clone(),
        id,
        audience_key,
        resumed.then_some(filters),
        (hello.connect.keep_alive, hello.peer()),
        durable_now(&durable),
        Instant::now(),
    );
    // On DISCONNECT the queued upstream DISCONNECT (so rumqttd drops the will) is sent by
    // `close_upstream`.
    let end = drive(ctx, &mut relay, dev, up, durable, stop, &row.client).await;
    let goodbye = relay.goodbye();
    (end, relay.into_filters(), goodbye)
}

/// The relay loop: do what the relay asks first (a throttle, a wait for the journal), then
/// wait for a packet from either side, handle it and everything else already buffered (at
/// most [`BATCH`] packets), then write rumqttd's side and the device's.
async fn drive<S: AsyncRead + AsyncWrite>(
    ctx: &Context,
    relay: &mut Relay,
    dev: &mut DeviceIo<S>,
    up: &mut BrokerIo,
    mut durable: Option<watch::Receiver<u64>>,
    stop: CancellationToken,
    row: &Client,
) -> End {
    loop {
        loop {
            match relay.next_action() {
                Next::Read => break,
                Next::Throttle(wait) => {
                    // Over the publish rate: read nothing until the device is back under it.
                    tokio::time::sleep(wait).await;
                    relay.throttle_over(Instant::now());
                }
                Next::Append(entry) => {
                    // Wait for room in the journal before reading more from the device.
                    // Nothing is pending on either side (both were flushed), and rumqttd
                    // cannot have answered this PUBLISH yet: it was sent in that flush and
                    // not read since.
                    let Some(journal) = ctx.ingest.journal() else {
                        return End::BrokerGone;
                    };
                    let t = tokio::select! {
                        t = journal.append(entry) => t,
                        _ = stop.cancelled() => return relay.stopped(),
                    };
                    match t {
                        Ok(t) => relay.appended(t),
                        Err(_) => return End::BrokerGone,
                    }
                }
            }
        }
        let deadline = relay.deadline();
        let waiting = relay.awaits_durable();
        let retained = relay.retained_ready();
        let step = tokio::select! {
            _ = std::future::ready(()), if retained => Ok(()),
            p = dev.next() => p.and_then(|p| {
                count_in(row, &p);
                relay.on_device(p, Instant::now())
            }),
            _ = changed(&mut durable), if waiting => {
                relay.durable(durable_now(&durable));
                Ok(())
            }
            p = up.next() => p.and_then(|p| relay.on_broker(p)),
            _ = tokio::time::sleep_until(deadline) => relay.tick(Instant::now()),
            _ = stop.cancelled() => Err(relay.stopped()),
        };
        if let Err(end) = pass(step, relay, dev, up, row) {
            return end;
        }
        if let Err(end) = drain(relay, dev, up, row) {
            return end;
        }
        if relay.awaits_durable() {
            relay.durable(durable_now(&durable));
        }
        relay.send_retained();
        if let Err(end) = pass(Ok(()), relay, dev, up, row) {
            return end;
        }
        row.subscriptions(relay.subscriptions());
        if let Err(end) = up.flush().await {
            return end;
        }
        if let Err(end) = dev.flush().await {
            return end;
        }
    }
}

/// Handles packets already read from either side, without reading more.
fn drain<S: AsyncRead + AsyncWrite>(
    relay: &mut Relay,
    dev: &mut DeviceIo<S>,
    up: &mut BrokerIo,
    row: &Client,
) -> Result<(), End> {
    for _ in 0..BATCH {
        let mut more = false;
        // Slowed down, or waiting for the journal: the device's buffered packets wait for
        // the next round.
        if relay.reads_device() {
            if let Some(p) = dev.parse()? {
                count_in(row, &p);
                let r = relay.on_device(p, Instant::now());
                pass(r, relay, dev, up, row)?;
                more = true;
            }
        }
        if let Some(p) = up.parse()? {
            let r = relay.on_broker(p);
            pass(r, relay, dev, up, row)?;
            more = true;
        }
        if !more {
            break;
        }
    }
    Ok(())
}

/// Encodes what the relay decided into the two write buffers, after an input that gave
/// `r`. When `r` ends the session, rumqttd's packets are still queued (`close_upstream`
/// writes them: a DISCONNECT among them) and the device's are dropped.
fn pass<S: AsyncRead + AsyncWrite>(
    r: Result<(), End>,
    relay: &mut Relay,
    dev: &mut DeviceIo<S>,
    up: &mut BrokerIo,
    row: &Client,
) -> Result<(), End> {
    relay.out.broker.drain(..).try_for_each(|p| up.queue(p))?;
    r?;
    relay.out.device.drain(..).try_for_each(|p| {
        if matches!(p, P5::Publish(_)) {
            row.message_out();
        }
        dev.queue(p)
    })
}

/// Counts a PUBLISH from the device on its client row (one relaxed atomic add).
fn count_in(row: &Client, p: &P5) {
    if matches!(p, P5::Publish(_)) {
        row.message_in();
    }
}

/// The journal's durable ticket now (u64::MAX without a journal: nothing to wait for).
fn durable_now(d: &Option<watch::Receiver<u64>>) -> u64 {
    d.as_ref().map_or(u64::MAX, |d| *d.borrow())
}

/// Resolves when the durable ticket changes (never without a journal, or once it is gone).
async fn changed(d: &mut Option<watch::Receiver<u64>>) {
    match d {
        Some(rx) => {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// Most time rumqttd gets to close its side after the front end closed its own.
const UPSTREAM_CLOSE: Duration = Duration::from_secs(3);

/// Sends what is queued, closes the upstream socket and waits until rumqttd closed its side:
/// by then rumqttd's router has taken the connection's disconnect (see `sessions`).
///
/// `disconnected`: a DISCONNECT is queued. Then rumqttd's router ends the connection itself
/// when it reads the DISCONNECT, and the front end closes its side only after rumqttd closed
/// its own. Closing first would end the connection twice: rumqttd 0.20's connection task, on
/// seeing the socket close before it learnt that the router dropped the connection, sends the
/// router a second `Disconnect` for the same connection id; the router reuses a freed id for
/// the very next CONNECT (whatever its client id), so that late event drops another device's
/// new connection ("router-drop", or a CONNECT that gets no answer and leaves its will
/// handler behind). With nothing more to read, the task learns of the router's drop first
/// and sends nothing.
async fn close_upstream(up: &mut BrokerIo, disconnected: bool) {
    let _ = up.flush().await;
    let (rd, wr) = up.halves();
    let mut sink = [0u8; 4096];
    let rumqttd_closed = async {
        while let Ok(n) = rd.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    if disconnected {
        let _ = tokio::time::timeout(UPSTREAM_CLOSE, rumqttd_closed).await;
        let _ = wr.shutdown().await;
        return;
    }
    let _ = wr.shutdown().await;
    let _ = tokio::time::timeout(UPSTREAM_CLOSE, rumqttd_closed).await;
}

/// Decides who the device is. Err: the CONNACK code and the metric reason.
async fn authenticate(
    ctx: &Context,
    c: &Hello,
    cert_cn: Option<String>,
    peer: SocketAddr,
) -> Result<Option<String>, (R5, &'static str)> {
    use R5 as R;
    if let Some(cn) = cert_cn {
        // A verified client certificate is the identity; username/password are not used.
        return Ok(Some(cn));
    }
    if ctx.cert_mode == ClientCertMode::Required {
        return Err((R::NotAuthorized, "no_certificate"));
    }
    let Some(login) = &c.login else {
        return if ctx.allow_anonymous {
            Ok(None)
        } else {
            Err((R::NotAuthorized, "anonymous"))
        };
    };
    // Guessing from one address is slowed down (the connection waits; the slot it holds
    // counts against broker.max_connections_per_ip).
    let wait = ctx.logins.delay(peer.ip());
    if !wait.is_zero() {
        ctx.metrics.login_delayed.inc();
        tokio::time::sleep(wait).await;
    }
    // argon2 is slow on purpose: run it off the async workers, a few at a time, so a burst
    // of logins cannot starve the relays.
    let Ok(_permit) = ctx.verify_slots.acquire().await else {
        return Err((R::ServerUnavailable, "broker_unavailable"));
    };
    let users = ctx.users.clone();
    let (u, p) = (login.username.clone(), login.password.clone());
    let verdict = tokio::task::spawn_blocking(move || users.verify(&u, p.as_bytes()))
        .await
        .unwrap_or(Verdict::WrongPassword);
    if verdict == Verdict::Ok {
        ctx.logins.succeeded(peer.ip());
    } else {
        ctx.logins.failed(peer.ip());
    }
    match verdict {
        Verdict::Ok => Ok(Some(login.username.clone())),
        Verdict::UnknownUser => Err((R::BadUserNamePassword, "unknown_user")),
        Verdict::WrongPassword => Err((R::BadUserNamePassword, "bad_password")),
    }
}

/// Drops what rumqttd holds for the device's client id: a clean upstream connection (without
/// the will) that ends at once.
async fn purge_upstream(ctx: &Context, c: &Hello) -> Result<(), R5> {
    let mut bare = c.clone();
    bare.will = None;
    let mut up = open_upstream(ctx, &bare, true).await?;
    match up.next().await {
        Ok(P5::ConnAck(a)) if a.code == R5::Success => {}
        _ => return Err(R5::ServerUnavailable),
    }
    up.queue(P5::Disconnect(v5::Disconnect::new(
        v5::DisconnectReasonCode::NormalDisconnection,
    )))
    .map_err(|_| R5::ServerUnavailable)?;
    close_upstream(&mut up, true).await;
    ctx.sessions.purged(c.client_id());
    Ok(())
}

async fn open_upstream(ctx: &Context, c: &Hello, clean_start: bool) -> Result<BrokerIo, R5> {
    let unavailable = R5::ServerUnavailable;
    let s = TcpStream::connect(ctx.upstream.addr)
        .await
        .map_err(|_| unavailable)?;
    let _ = s.set_nodelay(true);
    let (rd, wr) = s.into_split();
    let mut up: BrokerIo = Framed::new(rd, wr, BrokerCodec);
    let p = upstream::connect(
        &c.connect,
        c.will.as_ref(),
        clean_start,
        UPSTREAM_KEEPALIVE,
        &ctx.upstream.username,
        &ctx.upstream.password,
    );
    up.send(p).await.map_err(|_| unavailable)?;
    Ok(up)
}
