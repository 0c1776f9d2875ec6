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
//! violation | keepalive expired)-> Closed`. Rules enforced while relaying (MQTT 3.1.1):
//! - a second CONNECT, a PUBLISH to an invalid topic name (empty, wildcards), a packet only a
//!   server may send, or a malformed packet closes the connection at once (no DISCONNECT is
//!   sent upstream, so rumqttd publishes the device's will, as the spec asks);
//! - keepalive: PINGREQ is answered here; with keepalive k > 0 the connection is closed after
//!   1.5 k of silence; with k = 0 there is no limit. Upstream, the front end asks rumqttd for
//!   [`UPSTREAM_KEEPALIVE`] and pings it itself, swallowing the PINGRESPs;
//! - SUBSCRIBE: a malformed filter or one outside the ACL gets 0x80 in SUBACK; only the
//!   others go to rumqttd, and the SUBACK is merged back in the device's order. The granted
//!   QoS of each filter is remembered (across the connections of a persistent session, in
//!   `sessions`). A filter subscribed again replaces its subscription: at a lower QoS the
//!   front end lowers the deliveries, at a higher one it replaces rumqttd's subscription
//!   (rumqttd 0.20 keeps the first). After the SUBACK the front end sends every matching
//!   retained message itself (`retained_out`);
//! - ack after durable: a PUBLISH meant for the cloud (see [`crate::ingest`]) goes into the
//!   queue's journal before it goes to rumqttd, and rumqttd's PUBACK (QoS 1) or PUBREC
//!   (QoS 2) for it is held until the journal's durable ticket covers it. Acknowledgements
//!   leave in the order of the PUBLISHes (MQTT-4.6.0-2): one held answer holds those after
//!   it. When the journal is full the session reads nothing more from the device until the
//!   entry is taken (TCP back-pressure); when the store refuses writes (disk full, I/O
//!   error) the answers stay held, so the device's in-flight window fills and it stops;
//! - no local reader: a queued, non-retained QoS 0/1 PUBLISH that no local client may
//!   receive ([`crate::ingest::Audience`]: live and away sessions, the gateway's own links)
//!   is not handed to rumqttd; the front end answers it itself once durable. Only while no
//!   answer from rumqttd is awaited, so the order of acknowledgements holds. SUBSCRIBE
//!   registers its filters before rumqttd sees it, UNSUBSCRIBE removes them, and a clean
//!   session's filters go when it ends (or when the next clean CONNECT of its id arrives);
//! - a device whose connection ends without DISCONNECT has its will queued here (rumqttd
//!   publishes it locally);
//! - PUBLISH outside the ACL is dropped and counted; QoS 1 still gets PUBACK and QoS 2 the
//!   PUBREC/PUBCOMP handshake (3.1.1 has no negative acknowledgement, and an unanswered
//!   publish would block the device's in-flight window);
//! - QoS 2 exactly once: a QoS 2 PUBLISH whose packet id already awaits PUBREL is answered
//!   with PUBREC here and not forwarded again;
//! - delivered QoS = min(publisher's QoS, granted QoS): rumqttd delivers at the granted QoS,
//!   the front end lowers it using the tag (see `upstream`) and completes the upstream
//!   acknowledgement itself for what it lowered. Every answer to rumqttd's deliveries, its
//!   own or the device's, leaves in rumqttd's order (see `upacks`): rumqttd drops a link
//!   that answers out of order.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{self, Packet as P4};
use rumqttc::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{self, Packet as P5};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::auth::{Action, Verdict};
use super::config::{ClientCertMode, RateLimitPolicy};
use super::framed::{BrokerCodec, DeviceCodec, Framed, READ_RESERVE};
use super::retained_out::{self, Answer, RetainedOut};
use super::sessions::{any_lowered, Filters, Granted};
use super::upacks::{Ack, UpAcks};
use super::{upstream, Context};
use crate::ingest::Offer;
use crate::pacing::TokenBucket;
use crate::store::journal::Entry;
use crate::topic;

/// Keepalive the front end announces to rumqttd (it pings every half of it).
pub const UPSTREAM_KEEPALIVE: u16 = 60;

/// Most packets handled between two writes (bounds the output one batch can queue).
const BATCH: usize = 64;

/// Why a session ended; the label of `fieldgate_broker_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The device sent DISCONNECT.
    Disconnect,
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
}

impl End {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            End::Disconnect => "disconnect",
            End::DeviceGone => "device_gone",
            End::BrokerGone => "broker_gone",
            End::ConnectTimeout => "connect_timeout",
            End::Refused => "refused",
            End::KeepaliveTimeout => "keepalive_timeout",
            End::TooLarge => "too_large",
            End::ProtocolViolation => "protocol_violation",
            End::RateLimited => "rate_limited",
            End::TakenOver => "taken_over",
        }
    }
}

/// The device's socket: v4 packets in, v4 packets out.
type DeviceIo<S> = Framed<ReadHalf<S>, WriteHalf<S>, DeviceCodec>;

/// The loopback socket to rumqttd: v5 packets.
type BrokerIo = Framed<OwnedReadHalf, OwnedWriteHalf, BrokerCodec>;

/// The device's first packet, which must be a CONNECT: of MQTT 3.1.1, or of MQTT 3.1
/// (`MQIsdp`, level 3), whose packet is the same and is read as 3.1.1 (then true). `max`:
/// `broker.max_payload_size`. `Err(None)`: a CONNECT of another protocol level (MQTT 5
/// included), to be answered with CONNACK 1.
async fn read_connect<S: AsyncRead + AsyncWrite>(
    dev: &mut DeviceIo<S>,
    max: usize,
) -> Result<(v4::Connect, bool), Option<End>> {
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
    let v31 = match (name, level) {
        (b"MQTT", 4) => false,
        (b"MQIsdp", 3) => true,
        (b"MQTT" | b"MQIsdp", _) => return Err(None),
        _ => return Err(Some(End::ProtocolViolation)),
    };
    if v31 {
        // The same CONNECT as 3.1.1 with the 3.1 name and level: read it as 3.1.1 (the type
        // byte, then the 3.1.1 variable header and the rest of the packet).
        let frame = buf.split_to(frame);
        let mut body = BytesMut::with_capacity(frame.len());
        body.extend_from_slice(&[0x10, 0, 4, b'M', b'Q', b'T', b'T', 4]);
        body.extend_from_slice(&frame[head + 2 + name_len + 1..]);
        let h = rumqttc::mqttbytes::FixedHeader::new(0x10, 0, body.len() - 1);
        return v4::Connect::read(h, body.freeze())
            .map(|c| (c, true))
            .map_err(|_| Some(End::ProtocolViolation));
    }
    match dev.parse() {
        Ok(Some(P4::Connect(c))) => Ok((c, v31)),
        Ok(_) => Err(Some(End::ProtocolViolation)),
        Err(e) => Err(Some(e)),
    }
}

/// Who the device turned out to be.
struct Identity {
    /// Username or certificate CN; None for anonymous.
    name: Option<String>,
    client_id: String,
}

/// Runs one device session to its end. `cert_cn` is the CN of a verified client
/// certificate, if the device sent one.
pub async fn run<S>(stream: S, peer: SocketAddr, cert_cn: Option<String>, ctx: Arc<Context>) -> End
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
    let mut dev: DeviceIo<S> = Framed::new(
        rd,
        wr,
        DeviceCodec {
            max: ctx.max_packet,
        },
    );
    let refuse = |code| P4::ConnAck(v4::ConnAck::new(code, false));
    let connect = read_connect(&mut dev, ctx.max_packet);
    let (connect, v31) = match tokio::time::timeout(ctx.connect_timeout, connect).await {
        Err(_) => return End::ConnectTimeout,
        Ok(Ok(c)) => c,
        Ok(Err(Some(e))) => return e,
        Ok(Err(None)) => {
            // Another protocol level: CONNACK 1, then close (MQTT-3.1.2-2).
            ctx.metrics.refuse("protocol_version");
            let _ = dev
                .send(refuse(v4::ConnectReturnCode::RefusedProtocolVersion))
                .await;
            return End::Refused;
        }
    };
    // rumqttd's router drops a connection whose client id holds one of these without an
    // answer, and the second such CONNECT with the same id poisons the broker's listener
    // (every later connection panics). Refuse them here, as 3.1.1 allows (MQTT-3.1.3-5);
    // a NUL is not allowed in any MQTT string (MQTT-1.5.3-2).
    if connect.client_id.contains(['/', '+', '#', '$', '\0']) {
        ctx.metrics.refuse("client_id");
        let _ = dev.send(refuse(v4::ConnectReturnCode::BadClientId)).await;
        return End::Refused;
    }
    if connect.client_id.is_empty() && !connect.clean_session {
        ctx.metrics.refuse("client_id");
        let _ = dev.send(refuse(v4::ConnectReturnCode::BadClientId)).await;
        return End::Refused;
    }
    if let Some(w) = &connect.last_will {
        if topic::validate_topic(&w.topic).is_err() {
            return End::ProtocolViolation;
        }
    }
    let name = match authenticate(&ctx, &connect, cert_cn, peer).await {
        Ok(name) => name,
        Err((code, reason)) => {
            ctx.metrics.refuse(reason);
            let _ = dev.send(refuse(code)).await;
            info!(listener = %ctx.listener, %peer, client_id = %connect.client_id, reason, "connection refused");
            return End::Refused;
        }
    };
    // The client id must fit the identity, and must not be another identity's session.
    if let Some(pattern) = &ctx.client_id_pattern {
        if !super::auth::client_id_fits(pattern, name.as_deref(), &connect.client_id) {
            ctx.metrics.refuse("client_id_pattern");
            let _ = dev.send(refuse(v4::ConnectReturnCode::BadClientId)).await;
            info!(listener = %ctx.listener, %peer, client_id = %connect.client_id, identity = ?name, "connection refused: client id does not fit broker.client_id_pattern");
            return End::Refused;
        }
    }
    if !connect.client_id.is_empty() && !ctx.sessions.bind(&connect.client_id, name.as_deref()) {
        ctx.metrics.refuse("client_id_owned");
        let _ = dev.send(refuse(v4::ConnectReturnCode::BadClientId)).await;
        info!(listener = %ctx.listener, %peer, client_id = %connect.client_id, identity = ?name, "connection refused: the client id's session belongs to another identity");
        return End::Refused;
    }
    let id = Identity {
        name,
        client_id: connect.client_id.clone(),
    };
    let mut connect = connect;
    if let Some(w) = &connect.last_will {
        if !ctx
            .acl
            .allows(id.name.as_deref(), &id.client_id, Action::Publish, &w.topic)
        {
            // A will outside the ACL would be a publish the device may not make: drop it.
            ctx.metrics.deny(Action::Publish);
            connect.last_will = None;
        }
    }
    // One live upstream connection per client id (see `sessions`); rumqttd names an empty
    // one itself, uniquely.
    let claim = if connect.client_id.is_empty() {
        None
    } else {
        Some(ctx.sessions.claim(&connect.client_id).await)
    };
    let stop = claim.as_ref().map(|c| c.stop.clone()).unwrap_or_default();
    // Whose subscriptions these are in the ingest's audience (rumqttd names an empty client
    // id itself; `$` cannot start a device's client id).
    let audience_key = if connect.client_id.is_empty() {
        static ANON: AtomicU64 = AtomicU64::new(0);
        format!("$anon/{}", ANON.fetch_add(1, Ordering::Relaxed))
    } else {
        connect.client_id.clone()
    };
    if connect.clean_session {
        // rumqttd discards the previous session of this client id at this CONNECT.
        ctx.ingest.audience().clear(&audience_key);
    }
    let mut up = match open_upstream(&ctx, &connect).await {
        Ok(up) => up,
        Err(code) => {
            if !connect.client_id.is_empty() {
                ctx.sessions
                    .release(&connect.client_id, connect.clean_session);
            }
            ctx.metrics.refuse("broker_unavailable");
            let _ = dev.send(refuse(code)).await;
            return End::Refused;
        }
    };
    let (end, filters) = relay_session(
        &ctx,
        &mut dev,
        &mut up,
        &connect,
        (id, audience_key.clone(), v31),
        peer,
        stop,
    )
    .await;
    if !connect.clean_session && !connect.client_id.is_empty() {
        // For the session's next connection (before the binding may go).
        ctx.sessions.keep_filters(&connect.client_id, filters);
    }
    if end != End::Disconnect {
        if let Some(w) = &connect.last_will {
            // rumqttd publishes it locally once the upstream socket closes; the cloud's copy
            // is queued here (nobody waits for it).
            let q = w.qos as u8;
            let retain = ctx.ingest.admit_retain(&w.topic, &w.message, q, w.retain);
            ctx.ingest.offer_or_count(&w.topic, &w.message, q, retain);
        }
    }
    close_upstream(&mut up, end == End::Disconnect).await;
    if connect.clean_session {
        // Before the claim goes: the next session of this client id registers after this.
        ctx.ingest.audience().clear(&audience_key);
    }
    if !connect.client_id.is_empty() {
        ctx.sessions
            .release(&connect.client_id, connect.clean_session);
    }
    drop(claim);
    end
}

/// From rumqttd's CONNACK to the end of the session.
async fn relay_session<S: AsyncRead + AsyncWrite>(
    ctx: &Arc<Context>,
    dev: &mut DeviceIo<S>,
    up: &mut BrokerIo,
    connect: &v4::Connect,
    (id, audience_key, v31): (Identity, String, bool),
    peer: SocketAddr,
    stop: CancellationToken,
) -> (End, Filters) {
    let refuse = |code| P4::ConnAck(v4::ConnAck::new(code, false));
    let resumed = match up.next().await {
        Ok(P5::ConnAck(a)) if a.code == v5::ConnectReturnCode::Success => a.session_present,
        Ok(P5::ConnAck(a)) => {
            ctx.metrics.refuse("broker_refused");
            let _ = dev.send(refuse(upstream::connack_code(a.code))).await;
            return (End::Refused, Filters::new());
        }
        _ => {
            ctx.metrics.refuse("broker_unavailable");
            let _ = dev
                .send(refuse(v4::ConnectReturnCode::ServiceUnavailable))
                .await;
            return (End::Refused, Filters::new());
        }
    };
    // What rumqttd holds for a resumed session, as its last connection left it.
    let filters = if resumed {
        ctx.sessions.take_filters(&id.client_id)
    } else {
        Filters::new()
    };
    if dev
        .send(P4::ConnAck(v4::ConnAck::new(
            v4::ConnectReturnCode::Success,
            // MQTT 3.1 has no session-present flag (the byte is reserved).
            resumed && !v31,
        )))
        .await
        .is_err()
    {
        return (End::DeviceGone, filters);
    }
    debug!(listener = %ctx.listener, %peer, client_id = %id.client_id, identity = ?id.name, "device connected");
    let mut relay = Relay {
        ctx: ctx.clone(),
        id,
        audience_key,
        lowered: any_lowered(&filters),
        filters,
        internal: HashSet::new(),
        next_internal: 1,
        pending_sub: HashMap::new(),
        qos2_in: HashSet::new(),
        qos2_denied: HashSet::new(),
        down21: HashSet::new(),
        answer_rel: HashSet::new(),
        up_acks: UpAcks::default(),
        retained_out: RetainedOut::new(ctx.max_inflight),
        unsubacked: HashSet::new(),
        check_filters: resumed,
        rate: ctx.rate.map(|(r, b, p)| {
            (
                TokenBucket::with_burst(r as u64, b as u64, StdInstant::now()),
                p,
            )
        }),
        throttle: Duration::ZERO,
        durable: ctx.ingest.journal().map(|j| j.durable()),
        awaiting: HashMap::new(),
        held: VecDeque::new(),
        blocked: None,
    };
    let end = relay.run(dev, up, connect.keep_alive, stop).await;
    (end, relay.filters)
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
    c: &v4::Connect,
    cert_cn: Option<String>,
    peer: SocketAddr,
) -> Result<Option<String>, (v4::ConnectReturnCode, &'static str)> {
    use v4::ConnectReturnCode as R;
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
        return Err((R::ServiceUnavailable, "broker_unavailable"));
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

async fn open_upstream(ctx: &Context, c: &v4::Connect) -> Result<BrokerIo, v4::ConnectReturnCode> {
    let unavailable = v4::ConnectReturnCode::ServiceUnavailable;
    let s = TcpStream::connect(ctx.upstream.addr)
        .await
        .map_err(|_| unavailable)?;
    let _ = s.set_nodelay(true);
    let (rd, wr) = s.into_split();
    let mut up: BrokerIo = Framed::new(rd, wr, BrokerCodec);
    let p = upstream::connect(
        c,
        UPSTREAM_KEEPALIVE,
        &ctx.upstream.username,
        &ctx.upstream.password,
    );
    up.send(p).await.map_err(|_| unavailable)?;
    Ok(up)
}

/// A SUBSCRIBE awaiting rumqttd's SUBACK: the return codes decided here (None: asked
/// rumqttd) in the device's order, and the filters sent upstream with the QoS rumqttd
/// keeps delivering at when it already holds the filter at that QoS or higher (its SUBACK
/// then grants the new QoS, but its subscription stays as it was).
type PendingSub = (
    Vec<Option<v4::SubscribeReasonCode>>,
    Vec<(String, QoS, Option<QoS>)>,
);

/// Per-connection relay state.
struct Relay {
    ctx: Arc<Context>,
    id: Identity,
    /// The session's filters: the QoS rumqttd delivers each at and the QoS the device was
    /// granted.
    filters: Filters,
    /// Some filter's device QoS is below rumqttd's: deliveries are lowered to it.
    lowered: bool,
    /// Packet ids of the front end's own SUBSCRIBE/UNSUBSCRIBE upstream (replacing a
    /// subscription): their SUBACK/UNSUBACK is not passed on.
    internal: HashSet<u16>,
    next_internal: u16,
    /// SUBSCRIBE pkid -> return codes decided here (None: asked rumqttd) and the filters
    /// sent upstream.
    pending_sub: HashMap<u16, PendingSub>,
    /// QoS 2 PUBLISHes of the device forwarded upstream and awaiting the device's PUBREL.
    qos2_in: HashSet<u16>,
    /// QoS 2 PUBLISHes of the device that the ACL dropped (handshake answered here).
    qos2_denied: HashSet<u16>,
    /// Upstream QoS 2 deliveries sent to the device as QoS 1: its PUBACK becomes PUBREC.
    down21: HashSet<u16>,
    /// Upstream PUBRELs the front end answers itself (deliveries it lowered).
    answer_rel: HashSet<u16>,
    /// Answers to rumqttd's deliveries, released in the order rumqttd takes them.
    up_acks: UpAcks,
    /// The retained messages the front end sends this session's subscriptions itself.
    retained_out: RetainedOut,
    /// UNSUBSCRIBEs the front end answered itself; rumqttd's own UNSUBACK, if any, is dropped.
    unsubacked: HashSet<u16>,
    /// rumqttd may deliver on filters the session no longer holds (a resumed session, or
    /// one that unsubscribed): deliveries are checked against the session's filters.
    check_filters: bool,
    /// The device's publish rate limit and its policy.
    rate: Option<(TokenBucket, RateLimitPolicy)>,
    /// `slow_down`: how long to stop reading from the device after this batch.
    throttle: Duration,
    /// The journal's durable ticket (None: nothing is queued, e.g. unit tests).
    durable: Option<tokio::sync::watch::Receiver<u64>>,
    /// Device pkid -> journal ticket of its cloud-bound PUBLISH, until rumqttd answered it.
    awaiting: HashMap<u16, u64>,
    /// Answers to the device waiting for the durable ticket (0: nothing to wait for, only
    /// order), in the order they must leave.
    held: VecDeque<(u64, P4)>,
    /// A cloud-bound PUBLISH the journal had no room for: (pkid, entry). Nothing more is read
    /// from the device until it is appended.
    blocked: Option<(u16, Entry)>,
    /// This session's key in the ingest's [`crate::ingest::Audience`].
    audience_key: String,
}

/// Ticket placeholder of a PUBLISH whose entry waits for room in the journal.
const UNTICKETED: u64 = u64::MAX;

impl Relay {
    async fn run<S: AsyncRead + AsyncWrite>(
        &mut self,
        dev: &mut DeviceIo<S>,
        up: &mut BrokerIo,
        keep_alive: u16,
        stop: CancellationToken,
    ) -> End {
        // On DISCONNECT the queued upstream DISCONNECT (so rumqttd drops the will) is sent
        // by `close_upstream`.
        self.relay(dev, up, keep_alive, stop).await
    }

    /// The relay loop: wait for a packet from either side, handle it and everything else
    /// already buffered (at most [`BATCH`] packets), then write both sides' output.
    async fn relay<S: AsyncRead + AsyncWrite>(
        &mut self,
        dev: &mut DeviceIo<S>,
        up: &mut BrokerIo,
        keep_alive: u16,
        stop: CancellationToken,
    ) -> End {
        let silence = (keep_alive > 0).then(|| Duration::from_millis(keep_alive as u64 * 1500));
        let mut last_in = Instant::now();
        let period = Duration::from_secs(UPSTREAM_KEEPALIVE as u64 / 2);
        let mut ping = tokio::time::interval_at(Instant::now() + period, period);
        loop {
            if let Some((pkid, entry)) = self.blocked.take() {
                // Wait for room in the journal before reading more from the device. Nothing
                // is pending on either side (both were flushed), and rumqttd cannot have
                // answered this PUBLISH yet: it was sent in that flush and not read since.
                let Some(journal) = self.ctx.ingest.journal().cloned() else {
                    return End::BrokerGone;
                };
                let t = tokio::select! {
                    t = journal.append(entry) => t,
                    _ = stop.cancelled() => return End::TakenOver,
                };
                match (t, self.awaiting.get_mut(&pkid)) {
                    (Ok(t), Some(slot)) => *slot = t,
                    (Ok(_), None) => {}
                    (Err(_), _) => return End::BrokerGone,
                }
            }
            let expiry = silence.map(|s| last_in + s);
            let waiting = !self.held.is_empty();
            let retained = self.retained_out.ready();
            let step = tokio::select! {
                _ = std::future::ready(()), if retained => Ok(()),
                p = dev.next() => p.and_then(|p| {
                    last_in = Instant::now();
                    self.on_device(p, dev, up)
                }),
                _ = changed(&mut self.durable), if waiting => self.release(dev),
                p = up.next() => p.and_then(|p| self.on_broker(p, dev, up)),
                _ = ping.tick() => up.queue(P5::PingReq(v5::PingReq)),
                _ = sleep_until_opt(expiry) => Err(End::KeepaliveTimeout),
                _ = stop.cancelled() => Err(End::TakenOver),
            };
            if let Err(end) = step {
                return end;
            }
            if let Err(end) = self.drain(dev, up, &mut last_in) {
                return end;
            }
            if let Err(end) = self.release(dev) {
                return end;
            }
            for p in self.retained_out.take(BATCH) {
                if let Err(end) = dev.queue(P4::Publish(p)) {
                    return end;
                }
            }
            if let Err(end) = up.flush().await {
                return end;
            }
            if let Err(end) = dev.flush().await {
                return end;
            }
            if !self.throttle.is_zero() {
                // Over the publish rate: read nothing until the device is back under it.
                tokio::time::sleep(std::mem::take(&mut self.throttle)).await;
                last_in = Instant::now();
            }
        }
    }

    /// Handles packets already read from either side, without reading more.
    fn drain<S: AsyncRead + AsyncWrite>(
        &mut self,
        dev: &mut DeviceIo<S>,
        up: &mut BrokerIo,
        last_in: &mut Instant,
    ) -> Result<(), End> {
        for _ in 0..BATCH {
            let mut more = false;
            if !self.throttle.is_zero() || self.blocked.is_some() {
                // Slowed down, or waiting for the journal: the device's buffered packets
                // wait for the next round.
            } else if let Some(p) = dev.parse()? {
                *last_in = Instant::now();
                self.on_device(p, dev, up)?;
                more = true;
            }
            if let Some(p) = up.parse()? {
                self.on_broker(p, dev, up)?;
                more = true;
            }
            if !more {
                break;
            }
        }
        Ok(())
    }

    fn on_device<S: AsyncRead + AsyncWrite>(
        &mut self,
        p: P4,
        dev: &mut DeviceIo<S>,
        up: &mut BrokerIo,
    ) -> Result<(), End> {
        // Answers to the front end's own retained deliveries end here.
        let own = match &p {
            P4::PubAck(a) => Some((a.pkid, Answer::PubAck)),
            P4::PubRec(a) => Some((a.pkid, Answer::PubRec)),
            P4::PubComp(a) => Some((a.pkid, Answer::PubComp)),
            _ => None,
        };
        if let Some(release) = own.and_then(|(pkid, a)| self.retained_out.answered(pkid, a)) {
            if let (true, Some((pkid, _))) = (release, own) {
                dev.queue(P4::PubRel(v4::PubRel::new(pkid)))?;
            }
            return Ok(());
        }
        let ctx = self.ctx.clone();
        let m = &ctx.metrics;
        match p {
            P4::Publish(p) => {
                if topic::validate_topic(&p.topic).is_err() {
                    return Err(End::ProtocolViolation);
                }
                let over_rate = self.over_rate()?;
                let name = self.id.name.as_deref();
                let denied =
                    !self
                        .ctx
                        .acl
                        .allows(name, &self.id.client_id, Action::Publish, &p.topic);
                if denied {
                    m.deny(Action::Publish);
                    debug!(client_id = %self.id.client_id, topic = %p.topic, "publish denied");
                }
                if denied || over_rate {
                    return match p.qos {
                        QoS::AtMostOnce => Ok(()),
                        QoS::AtLeastOnce => {
                            self.answer(dev, 0, P4::PubAck(v4::PubAck::new(p.pkid)))
                        }
                        QoS::ExactlyOnce => {
                            self.qos2_denied.insert(p.pkid);
                            self.answer(dev, 0, P4::PubRec(v4::PubRec::new(p.pkid)))
                        }
                    };
                }
                if p.qos == QoS::ExactlyOnce && !self.qos2_in.insert(p.pkid) {
                    // A retry of a message rumqttd already has: do not deliver it twice. Its
                    // first PUBREC may still be held: this one goes behind it.
                    m.qos2_duplicates.inc();
                    let t = self.awaiting.get(&p.pkid).copied().unwrap_or(0);
                    return self.answer(dev, t, P4::PubRec(v4::PubRec::new(p.pkid)));
                }
                let q = p.qos as u8;
                let mut p = p;
                p.retain = self
                    .ctx
                    .ingest
                    .admit_retain(&p.topic, &p.payload, q, p.retain);
                // No local reader and nothing for rumqttd to keep: the queue is the whole
                // path, and the front end answers itself. Only while nothing waits for
                // rumqttd's answer, so that acknowledgements keep the order of the PUBLISHes.
                let bypass = self.awaiting.is_empty()
                    && p.qos != QoS::ExactlyOnce
                    && !self.ctx.ingest.needs_broker(&p.topic, p.retain);
                if p.qos == QoS::AtMostOnce {
                    // Appended, never waited for.
                    let taken = self
                        .ctx
                        .ingest
                        .offer_or_count(&p.topic, &p.payload, q, p.retain);
                    if bypass && taken {
                        m.bypassed.inc();
                        return Ok(());
                    }
                } else {
                    match self.ctx.ingest.offer(&p.topic, &p.payload, q, p.retain) {
                        Offer::Local => {}
                        Offer::Queued(t) if bypass => {
                            m.bypassed.inc();
                            return self.answer(dev, t, P4::PubAck(v4::PubAck::new(p.pkid)));
                        }
                        Offer::Queued(t) => {
                            self.awaiting.insert(p.pkid, t);
                        }
                        Offer::Full(e) => {
                            self.awaiting.insert(p.pkid, UNTICKETED);
                            self.blocked = Some((p.pkid, e));
                        }
                    }
                }
                up.queue(upstream::publish(p))
            }
            P4::PubRel(r) => {
                if self.qos2_denied.remove(&r.pkid) {
                    return self.answer(dev, 0, P4::PubComp(v4::PubComp::new(r.pkid)));
                }
                if !self.qos2_in.remove(&r.pkid) {
                    // Nothing awaits release under this id (a retried PUBREL): answer it,
                    // release nothing (MQTT-4.3.3, PUBREL is handled idempotently).
                    return self.answer(dev, 0, P4::PubComp(v4::PubComp::new(r.pkid)));
                }
                up.queue(P5::PubRel(v5::PubRel::new(r.pkid, None)))
            }
            P4::PubAck(a) => {
                if self.down21.remove(&a.pkid) {
                    // Lowered from QoS 2: the device acknowledged, finish rumqttd's flow.
                    self.answer_rel.insert(a.pkid);
                    return self.ack_up(up, a.pkid, Ack::PubRec);
                }
                self.ack_up(up, a.pkid, Ack::PubAck)
            }
            P4::PubRec(a) => self.ack_up(up, a.pkid, Ack::PubRec),
            P4::PubComp(a) => self.comp_up(up, a.pkid),
            P4::Subscribe(s) => self.subscribe(s, dev, up),
            P4::Unsubscribe(u) => {
                for f in &u.topics {
                    self.filters.remove(f);
                }
                self.lowered = any_lowered(&self.filters);
                for f in &u.topics {
                    self.ctx.ingest.audience().remove(&self.audience_key, f);
                }
                // rumqttd 0.20 answers no UNSUBACK for a filter it does not find under this
                // connection, which is every filter of a resumed persistent session, and goes
                // on delivering on it. The front end answers (MQTT-3.10.4-4) and withholds
                // deliveries the session no longer subscribes to (see `deliver`).
                self.unsubacked.insert(u.pkid);
                self.check_filters = true;
                dev.queue(P4::UnsubAck(v4::UnsubAck::new(u.pkid)))?;
                up.queue(P5::Unsubscribe(v5::Unsubscribe {
                    pkid: u.pkid,
                    filters: u.topics,
                    properties: None,
                }))
            }
            P4::PingReq => dev.queue(P4::PingResp),
            P4::Disconnect => {
                up.queue(P5::Disconnect(v5::Disconnect::new(
                    v5::DisconnectReasonCode::NormalDisconnection,
                )))?;
                Err(End::Disconnect)
            }
            // A second CONNECT, or packets only a server sends.
            P4::Connect(_) | P4::ConnAck(_) | P4::SubAck(_) | P4::UnsubAck(_) | P4::PingResp => {
                Err(End::ProtocolViolation)
            }
        }
    }

    /// Sends an acknowledgement to the device once the journal's durable ticket reaches
    /// `ticket` (0: at once), never ahead of one held before it.
    fn answer<S: AsyncRead + AsyncWrite>(
        &mut self,
        dev: &mut DeviceIo<S>,
        ticket: u64,
        p: P4,
    ) -> Result<(), End> {
        if self.held.is_empty() && ticket <= self.durable_ticket() {
            return dev.queue(p);
        }
        self.held.push_back((ticket, p));
        Ok(())
    }

    fn durable_ticket(&self) -> u64 {
        self.durable.as_ref().map_or(u64::MAX, |d| *d.borrow())
    }

    /// Moves the held answers the durable ticket now covers to the device's output.
    fn release<S: AsyncRead + AsyncWrite>(&mut self, dev: &mut DeviceIo<S>) -> Result<(), End> {
        if self.held.is_empty() {
            return Ok(());
        }
        let durable = self.durable_ticket();
        while self.held.front().is_some_and(|(t, _)| *t <= durable) {
            if let Some((_, p)) = self.held.pop_front() {
                dev.queue(p)?;
            }
        }
        Ok(())
    }

    /// Applies the publish rate limit to one PUBLISH. Ok(true): drop it (policy `drop`);
    /// Err: close (policy `disconnect`); `slow_down` lets it through and sets `throttle`.
    fn over_rate(&mut self) -> Result<bool, End> {
        let Some((bucket, policy)) = &mut self.rate else {
            return Ok(false);
        };
        let wait = bucket.wait_for(1, StdInstant::now());
        if wait.is_zero() {
            bucket.take(1);
            return Ok(false);
        }
        let m = &self.ctx.metrics;
        match policy {
            RateLimitPolicy::SlowDown => {
                m.rate_limit("slow_down");
                // Taken on credit: the bucket goes negative and the wait grows with it.
                bucket.take(1);
                self.throttle = self.throttle.max(wait);
                Ok(false)
            }
            RateLimitPolicy::Drop => {
                m.rate_limit("drop");
                Ok(true)
            }
            RateLimitPolicy::Disconnect => {
                m.rate_limit("disconnect");
                info!(client_id = %self.id.client_id, "publish rate exceeded; closing");
                Err(End::RateLimited)
            }
        }
    }

    fn subscribe<S: AsyncRead + AsyncWrite>(
        &mut self,
        s: v4::Subscribe,
        dev: &mut DeviceIo<S>,
        up: &mut BrokerIo,
    ) -> Result<(), End> {
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut forward = Vec::new();
        for f in s.filters {
            let ok = topic::validate_filter(&f.path).is_ok();
            if !ok {
                codes.push(Some(v4::SubscribeReasonCode::Failure));
                continue;
            }
            let name = self.id.name.as_deref();
            if !self
                .ctx
                .acl
                .allows(name, &self.id.client_id, Action::Subscribe, &f.path)
            {
                self.ctx.metrics.deny(Action::Subscribe);
                codes.push(Some(v4::SubscribeReasonCode::Failure));
                continue;
            }
            let audience = self.ctx.ingest.audience();
            if !audience.has(&self.audience_key, &f.path)
                && audience.count(&self.audience_key) >= self.ctx.max_subscriptions
            {
                self.ctx.metrics.limit("subscriptions");
                debug!(client_id = %self.id.client_id, filter = %f.path, "subscription over broker.max_subscriptions_per_client refused");
                codes.push(Some(v4::SubscribeReasonCode::Failure));
                continue;
            }
            // Known before rumqttd has it: a publish racing the SUBSCRIBE goes to rumqttd.
            audience.add(&self.audience_key, &f.path);
            codes.push(None);
            let held = self.filters.get(&f.path).map(|g| g.upstream);
            let kept = match held {
                Some(q) if (q as u8) < (f.qos as u8) => {
                    // A higher QoS than rumqttd's subscription: rumqttd 0.20 would keep the
                    // old one, so the front end drops it first. The SUBSCRIBE at the old QoS
                    // only re-registers the filter under this connection (a resumed
                    // session's filters are not, and UNSUBSCRIBE would find nothing).
                    let (a, b) = (self.internal_pkid(s.pkid), self.internal_pkid(s.pkid));
                    up.queue(upstream::subscribe(a, &[(f.path.clone(), q)]))?;
                    up.queue(P5::Unsubscribe(v5::Unsubscribe {
                        pkid: b,
                        filters: vec![f.path.clone()],
                        properties: None,
                    }))?;
                    None
                }
                held => held,
            };
            forward.push((f.path, f.qos, kept));
        }
        if forward.is_empty() {
            let codes = codes.into_iter().flatten().collect();
            return dev.queue(P4::SubAck(v4::SubAck::new(s.pkid, codes)));
        }
        let asked: Vec<(String, QoS)> = forward.iter().map(|(f, q, _)| (f.clone(), *q)).collect();
        let packet = upstream::subscribe(s.pkid, &asked);
        self.pending_sub.insert(s.pkid, (codes, forward));
        up.queue(packet)
    }

    /// A packet id for the front end's own SUBSCRIBE/UNSUBSCRIBE upstream: none that a
    /// device's SUBSCRIBE or UNSUBSCRIBE still awaits an answer under, nor `device_pkid`
    /// (rumqttd answers in order, so an own id answered first is told apart).
    fn internal_pkid(&mut self, device_pkid: u16) -> u16 {
        loop {
            let p = self.next_internal;
            self.next_internal = self.next_internal.checked_add(1).unwrap_or(1);
            if p != device_pkid
                && !self.internal.contains(&p)
                && !self.pending_sub.contains_key(&p)
                && !self.unsubacked.contains(&p)
            {
                self.internal.insert(p);
                return p;
            }
        }
    }

    fn on_broker<S: AsyncRead + AsyncWrite>(
        &mut self,
        p: P5,
        dev: &mut DeviceIo<S>,
        up: &mut BrokerIo,
    ) -> Result<(), End> {
        match p {
            P5::Publish(p) => self.deliver(p, dev, up),
            P5::PubAck(a) => {
                let t = self.awaiting.remove(&a.pkid).unwrap_or(0);
                self.answer(dev, t, P4::PubAck(v4::PubAck::new(a.pkid)))
            }
            P5::PubRec(a) => {
                let t = self.awaiting.remove(&a.pkid).unwrap_or(0);
                self.answer(dev, t, P4::PubRec(v4::PubRec::new(a.pkid)))
            }
            P5::PubComp(a) => self.answer(dev, 0, P4::PubComp(v4::PubComp::new(a.pkid))),
            P5::PubRel(r) => {
                if self.answer_rel.remove(&r.pkid) {
                    return self.comp_up(up, r.pkid);
                }
                dev.queue(P4::PubRel(v4::PubRel::new(r.pkid)))
            }
            P5::SubAck(a) if self.internal.remove(&a.pkid) => Ok(()),
            P5::UnsubAck(a) if self.internal.remove(&a.pkid) => Ok(()),
            P5::SubAck(a) => {
                let Some((mut codes, forwarded)) = self.pending_sub.remove(&a.pkid) else {
                    return Ok(());
                };
                let mut theirs = a.return_codes.into_iter();
                let mut retained = Vec::new();
                for ((filter, _, kept), code) in forwarded.into_iter().zip(theirs.by_ref()) {
                    let c = match code {
                        v5::SubscribeReasonCode::Success(q) => {
                            let q = upstream::q4(q);
                            retained.push((q, self.ctx.ingest.retained_matching(&filter)));
                            let g = Granted {
                                upstream: kept.unwrap_or(q),
                                device: q,
                            };
                            self.filters.insert(filter, g);
                            v4::SubscribeReasonCode::Success(q)
                        }
                        _ => v4::SubscribeReasonCode::Failure,
                    };
                    if let Some(slot) = codes.iter_mut().find(|c| c.is_none()) {
                        *slot = Some(c);
                    }
                }
                self.lowered = any_lowered(&self.filters);
                let codes = codes
                    .into_iter()
                    .map(|c| c.unwrap_or(v4::SubscribeReasonCode::Failure))
                    .collect();
                dev.queue(P4::SubAck(v4::SubAck::new(a.pkid, codes)))?;
                // After the SUBACK: every retained message the granted filters match, sent
                // by the front end (rumqttd's own retained deliveries are not passed on).
                let mut msgs = retained_out::merge(retained);
                if self.ctx.acl.filters_deliveries() {
                    msgs.retain(|(t, _, _)| self.may_receive(t));
                }
                self.retained_out.queue(msgs);
                Ok(())
            }
            P5::UnsubAck(a) => {
                if self.unsubacked.remove(&a.pkid) {
                    return Ok(());
                }
                dev.queue(P4::UnsubAck(v4::UnsubAck::new(a.pkid)))
            }
            P5::PingResp(_) => Ok(()),
            P5::Disconnect(_) => Err(End::BrokerGone),
            _ => Ok(()),
        }
    }

    /// Whether the ACL lets this device receive on `topic` (`deny_subscribe`).
    fn may_receive(&self, topic: &str) -> bool {
        self.ctx.acl.allows(
            self.id.name.as_deref(),
            &self.id.client_id,
            Action::Deliver,
            topic,
        )
    }

    /// The answer to rumqttd's delivery `pkid` is known: send what may leave now.
    fn ack_up(&mut self, up: &mut BrokerIo, pkid: u16, ack: Ack) -> Result<(), End> {
        for (p, a) in self.up_acks.ready(pkid, ack) {
            up.queue(match a {
                Ack::PubAck => P5::PubAck(v5::PubAck::new(p, None)),
                Ack::PubRec => P5::PubRec(v5::PubRec::new(p, None)),
            })?;
        }
        Ok(())
    }

    /// The PUBCOMP for rumqttd's PUBREL `pkid` is known: send what may leave now.
    fn comp_up(&mut self, up: &mut BrokerIo, pkid: u16) -> Result<(), End> {
        for p in self.up_acks.completed(pkid) {
            up.queue(P5::PubComp(v5::PubComp::new(p, None)))?;
        }
        Ok(())
    }

    /// Delivers a message from rumqttd at min(publisher's QoS, granted QoS).
    fn deliver<S: AsyncRead + AsyncWrite>(
        &mut self,
        p: v5::Publish,
        dev: &mut DeviceIo<S>,
        up: &mut BrokerIo,
    ) -> Result<(), End> {
        let (mut p, origin) = upstream::delivery(p);
        let delivered = p.qos;
        if delivered != QoS::AtMostOnce {
            self.up_acks.delivered(p.pkid);
        }
        // rumqttd sets the retain flag only on the retained messages it sends a new
        // subscription (live deliveries have it cleared): the front end sends those itself,
        // all of them (see `retained_out`).
        let retained = p.retain;
        let denied = !retained && self.ctx.acl.filters_deliveries() && !self.may_receive(&p.topic);
        if denied {
            self.ctx.metrics.deny(Action::Deliver);
        }
        // Not a topic of the session's filters: rumqttd kept delivering on a filter the
        // session unsubscribed from (see the UNSUBSCRIBE handling).
        let unsubscribed = !denied
            && self.check_filters
            && !self
                .ctx
                .ingest
                .audience()
                .client_reaches(&self.audience_key, &p.topic);
        if retained || denied || unsubscribed {
            // One of rumqttd's retained deliveries, a topic this device may not receive
            // (`deny_subscribe`) that a wider filter matched, or one it no longer subscribes
            // to: answered upstream here, never sent to the device.
            return match delivered {
                QoS::AtMostOnce => Ok(()),
                QoS::AtLeastOnce => self.ack_up(up, p.pkid, Ack::PubAck),
                QoS::ExactlyOnce => {
                    self.answer_rel.insert(p.pkid);
                    self.ack_up(up, p.pkid, Ack::PubRec)
                }
            };
        }
        // A live message is newer than a retained one of its topic still waiting to go.
        self.retained_out.superseded(&p.topic);
        // Untagged messages come from the gateway's own links: rumqttd's QoS stands.
        let mut want = match origin {
            Some(o) if o < delivered => o,
            _ => delivered,
        };
        if self.lowered {
            // Subscribed again at a lower QoS than rumqttd's subscription: the best QoS any
            // of the session's filters matching the topic grants now.
            let granted = self
                .filters
                .iter()
                .filter(|(f, _)| topic::matches(f, &p.topic))
                .map(|(_, g)| g.device)
                .reduce(|a, b| if b > a { b } else { a });
            if let Some(g) = granted.filter(|g| *g < want) {
                want = g;
            }
        }
        if want == delivered {
            return dev.queue(P4::Publish(p));
        }
        self.ctx.metrics.downgraded.inc();
        let pkid = p.pkid;
        match (delivered, want) {
            (QoS::AtLeastOnce, _) => {
                self.ack_up(up, pkid, Ack::PubAck)?;
                p.qos = QoS::AtMostOnce;
                p.pkid = 0;
            }
            (QoS::ExactlyOnce, QoS::AtMostOnce) => {
                self.answer_rel.insert(pkid);
                self.ack_up(up, pkid, Ack::PubRec)?;
                p.qos = QoS::AtMostOnce;
                p.pkid = 0;
            }
            (QoS::ExactlyOnce, _) => {
                // Keep rumqttd's packet id busy until the device acknowledged.
                self.down21.insert(pkid);
                p.qos = QoS::AtLeastOnce;
            }
            _ => {}
        }
        dev.queue(P4::Publish(p))
    }
}

/// Resolves when the durable ticket changes (never without a journal, or once it is gone).
async fn changed(d: &mut Option<tokio::sync::watch::Receiver<u64>>) {
    match d {
        Some(rx) => {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
