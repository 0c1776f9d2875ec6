//! The relay's decisions, without I/O: what one device session does with
//! every packet from the device and from rumqttd once both are connected, when the device's
//! acknowledgements may leave, the keepalive, the upstream ping and the publish rate limit.
//! [`super::session`] is the driver: it reads both sockets ([`super::framed`]), feeds each
//! packet to [`Relay::on_device`] or [`Relay::on_broker`], moves what the relay put in
//! [`Relay::out`] into the two framed writers, and waits as the relay says. Time and the
//! journal's durable ticket come in as arguments, so the unit tests below drive them.
//!
//! Driver protocol, one round:
//! 1. [`Relay::next_action`] until it says [`Next::Read`]: [`Next::Throttle`] (read nothing
//!    for that long, then [`Relay::throttle_over`]) and [`Next::Append`] (wait for room in
//!    the journal for the entry, then [`Relay::appended`] with its ticket);
//! 2. wait for one of: a device packet, a rumqttd packet, the durable ticket moving while
//!    [`Relay::awaits_durable`] ([`Relay::durable`]), [`Relay::deadline`] ([`Relay::tick`]),
//!    the stop ([`Relay::stopped`]), or nothing when [`Relay::retained_ready`];
//! 3. handle the packets already buffered on either side, at most [`BATCH`] rounds, the
//!    device's only while [`Relay::reads_device`];
//! 4. while [`Relay::awaits_durable`], [`Relay::durable`] with the journal's ticket; then
//!    [`Relay::send_retained`]; then write rumqttd's side, then the device's.
//!
//! The relay compares tickets with the durable ticket it was last told: an answer whose
//! ticket became durable since is held until step 4 of its round releases it, so it leaves
//! in the same write as it would have.
//!
//! An `Err` from any input ends the session: what [`Out::broker`] holds still goes to rumqttd
//! (the upstream DISCONNECT of a device's DISCONNECT among it, see `session::close_upstream`),
//! what [`Out::device`] holds is dropped.
//!
//! Every device's packets are MQTT 5 ones here: a 3.1.1 device's are converted by its codec
//! (`v311`), and what 3.1.1 cannot say is decided by [`Peer::v5`]. Rules enforced while
//! relaying:
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
//! - PUBLISH outside the ACL is dropped and counted; QoS 1 still gets PUBACK and QoS 2 the
//!   PUBREC/PUBCOMP handshake (3.1.1 has no negative acknowledgement, and an unanswered
//!   publish would block the device's in-flight window). An MQTT 5 device is told: PUBACK or
//!   PUBREC 0x87 (not authorized), 0x97 (quota exceeded) over the `drop` rate or while the
//!   queue refuses writes (disk full, I/O error: the message is not taken, and the PUBACKs
//!   already held for the durable ticket go as 0x97 too, where a 3.1.1 device's answers stay
//!   held), 0x99 for a payload that its payload format indicator calls UTF-8 and is not;
//! - MQTT 5 limits, both ways: more unanswered QoS 1/2 PUBLISHes than the receive maximum
//!   announced (`broker.max_inflight`) ends the session (0x93); a topic alias of 0, above
//!   [`TOPIC_ALIAS_MAX`] or unknown ends it (0x94). Aliases are resolved here, before the ACL.
//!   Deliveries beyond the device's own receive maximum wait here, in order, until it
//!   answers; one larger than its maximum packet size is not sent (counted, answered
//!   upstream as if delivered, as MQTT-3.1.2-25 asks);
//! - MQTT 5 message expiry: rumqttd drops what expired while it held it and sends the rest
//!   with what is left; the retained messages the front end sends itself are checked here
//!   (an expired one is not sent, counted);
//! - MQTT 5 subscription options: no local (the session's own publishes, marked with its
//!   client id while it holds such a filter, are not delivered on it), retain as published
//!   (the retain mark restores the flag), retain handling (retained messages on every
//!   subscribe, only on a new one, or never), subscription identifiers (each delivery
//!   carries those of the filters it matches). `$share/<group>/<filter>` is handed to
//!   rumqttd, which shares it; the ACL and the audience see the inner filter, and a shared
//!   subscription gets no retained messages (MQTT-4.8.2-6);
//! - publish rate (`broker.max_publish_rate`): above it a PUBLISH is dropped and answered as
//!   an ACL denial (`drop`), closes the connection (`disconnect`), or is let through and the
//!   session reads nothing more from the device until it is back under the rate
//!   (`slow_down`);
//! - QoS 2 exactly once: a QoS 2 PUBLISH whose packet id already awaits PUBREL is answered
//!   with PUBREC here and not forwarded again;
//! - delivered QoS = min(publisher's QoS, granted QoS): rumqttd delivers at the granted QoS,
//!   the front end lowers it using the tag (see `upstream`) and completes the upstream
//!   acknowledgement itself for what it lowered. Every answer to rumqttd's deliveries, its
//!   own or the device's, leaves in rumqttd's order (see `upacks`): rumqttd drops a link
//!   that answers out of order.
//!
//! Making a decision copies no payload: packets move from the read buffers through
//! [`Relay::out`] (whose vectors keep their capacity) into the write buffers.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{self, Packet as P5};
use tokio::time::Instant;
use tracing::{debug, info};

use super::auth::Action;
use super::config::RateLimitPolicy;
use super::retained_out::{self, Answer, RetainedOut};
use super::session::End;
use super::sessions::{any_lowered, Filters, Granted};
use super::upacks::{Ack, UpAcks};
use super::upstream::{q4, q5};
use super::{upstream, Context};
use crate::ingest::{KeptProps, Offer};
use crate::pacing::TokenBucket;
use crate::store::journal::Entry;
use crate::store::Extra;
use crate::topic;

/// Keepalive the front end announces to rumqttd (it pings every half of it).
pub const UPSTREAM_KEEPALIVE: u16 = 60;

/// How often the front end pings rumqttd.
const PING_EVERY: Duration = Duration::from_secs(UPSTREAM_KEEPALIVE as u64 / 2);

/// Most packets handled between two writes (bounds the output one batch can queue).
pub const BATCH: usize = 64;

/// Ticket placeholder of a PUBLISH whose entry waits for room in the journal.
const UNTICKETED: u64 = u64::MAX;

/// How often an MQTT 5 session with held answers looks whether the queue refuses writes.
const REFUSAL_CHECK: Duration = Duration::from_millis(500);

/// Most topic aliases an MQTT 5 device may set (announced in its CONNACK).
pub const TOPIC_ALIAS_MAX: u16 = 64;

/// What the device's CONNECT asked of the session (MQTT 5; a 3.1.1 device has no limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// The device speaks MQTT 5: it is told reason codes.
    pub v5: bool,
    /// Most unanswered QoS 1/2 deliveries the device takes (its receive maximum).
    pub receive_max: u16,
    /// The largest packet the device takes (None: no limit).
    pub max_packet: Option<u32>,
}

impl Peer {
    /// A 3.1.1 device.
    pub const V311: Peer = Peer {
        v5: false,
        receive_max: u16::MAX,
        max_packet: None,
    };
}

/// What an MQTT 5 device's DISCONNECT asked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Goodbye {
    /// A new session expiry interval.
    pub session_expiry: Option<u32>,
}

/// A filter a SUBSCRIBE sent upstream: its QoS, the QoS rumqttd keeps delivering at when it
/// already holds the filter at that QoS or higher, the subscription options, and whether its
/// retained messages follow the SUBACK.
#[derive(Debug)]
struct Asked {
    filter: String,
    qos: QoS,
    kept: Option<QoS>,
    no_local: bool,
    retain_as_published: bool,
    id: Option<u32>,
    retained: bool,
}

/// Who the device turned out to be.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Username or certificate CN; None for anonymous.
    pub name: Option<String>,
    /// The CONNECT's client id (empty: rumqttd names the connection).
    pub client_id: String,
}

/// A SUBSCRIBE awaiting rumqttd's SUBACK: the return codes decided here (None: asked
/// rumqttd) in the device's order, and the filters sent upstream (rumqttd's SUBACK grants a
/// filter it held the new QoS, but its subscription stays as it was: `Asked::kept`).
type PendingSub = (Vec<Option<v5::SubscribeReasonCode>>, Vec<Asked>);

/// The packets the relay decided to send, in order, until the driver takes them.
#[derive(Debug, Default)]
pub struct Out {
    /// For the device.
    pub device: Vec<P5>,
    /// For rumqttd.
    pub broker: Vec<P5>,
}

/// What the driver does before it reads again.
#[derive(Debug)]
pub enum Next {
    /// Read from either side.
    Read,
    /// `slow_down`: read nothing for this long, then [`Relay::throttle_over`].
    Throttle(Duration),
    /// The journal had no room for a cloud-bound PUBLISH: append this entry, waiting for
    /// room (reading nothing else), then [`Relay::appended`] with its ticket.
    Append(Entry),
}

/// Per-connection relay state.
pub struct Relay {
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
    /// The journal's durable ticket as last told ([`Relay::durable`]; u64::MAX: no journal,
    /// nothing to wait for).
    durable: u64,
    /// Device pkid -> journal ticket of its cloud-bound PUBLISH, until rumqttd answered it.
    awaiting: HashMap<u16, u64>,
    /// Answers to the device waiting for the durable ticket (0: nothing to wait for, only
    /// order), in the order they must leave.
    held: VecDeque<(u64, P5)>,
    /// The pkid of a cloud-bound PUBLISH the journal had no room for. Nothing more is read
    /// from the device until its entry is appended.
    blocked: Option<u16>,
    /// That PUBLISH's entry, until the driver takes it ([`Next::Append`]).
    entry: Option<Entry>,
    /// This session's key in the ingest's [`crate::ingest::Audience`].
    audience_key: String,
    /// 1.5 x the device's keepalive (None: keepalive 0, no limit).
    silence: Option<Duration>,
    /// When the device's last packet was taken.
    last_in: Instant,
    /// When the front end pings rumqttd next.
    next_ping: Instant,
    /// What the device's CONNECT asked.
    peer: Peer,
    /// MQTT 5 topic aliases the device set.
    aliases: HashMap<u16, Bytes>,
    /// The device's QoS 1/2 PUBLISHes not answered yet (MQTT 5 receive maximum).
    inflight_in: usize,
    /// rumqttd's QoS 1/2 deliveries sent to the device and not answered yet.
    live_out: HashSet<u16>,
    /// Deliveries waiting for room in the device's receive maximum, in order.
    parked: VecDeque<v5::Publish>,
    /// Some filter has a subscription option the deliveries must look at.
    options: bool,
    /// What the device's DISCONNECT asked.
    goodbye: Goodbye,
    /// When the front end last looked whether the queue refuses writes (MQTT 5).
    last_check: Instant,
    /// What is to be sent; the driver drains it.
    pub out: Out,
}

impl Relay {
    /// The relay of a session that rumqttd accepted at `now`. `resumed`: rumqttd resumed the
    /// session, whose filters are these (as its last connection left them); `keep_alive`
    /// and `peer`: the device's CONNECT's; `durable`: the journal's durable ticket now
    /// (u64::MAX without a journal).
    pub fn new(
        ctx: Arc<Context>,
        id: Identity,
        audience_key: String,
        resumed: Option<Filters>,
        (keep_alive, peer): (u16, Peer),
        durable: u64,
        now: Instant,
    ) -> Relay {
        let check_filters = resumed.is_some();
        let filters = resumed.unwrap_or_default();
        Relay {
            options: any_options(&filters),
            peer,
            aliases: HashMap::new(),
            inflight_in: 0,
            live_out: HashSet::new(),
            parked: VecDeque::new(),
            goodbye: Goodbye::default(),
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
            retained_out: RetainedOut::new(ctx.max_inflight.min(peer.receive_max as usize)),
            unsubacked: HashSet::new(),
            check_filters,
            rate: ctx.rate.map(|(r, b, p)| {
                (
                    TokenBucket::with_burst(r as u64, b as u64, now.into_std()),
                    p,
                )
            }),
            throttle: Duration::ZERO,
            durable,
            awaiting: HashMap::new(),
            held: VecDeque::new(),
            blocked: None,
            entry: None,
            silence: (keep_alive > 0).then(|| Duration::from_millis(keep_alive as u64 * 1500)),
            last_in: now,
            next_ping: now + PING_EVERY,
            last_check: now,
            out: Out::default(),
            ctx,
        }
    }

    /// How many filters the session holds now (the operator page's subscription count).
    pub fn subscriptions(&self) -> usize {
        self.filters.len()
    }

    /// The session's filters, for its next connection.
    pub fn into_filters(self) -> Filters {
        self.filters
    }

    /// What the device's DISCONNECT asked (MQTT 5).
    pub fn goodbye(&self) -> Goodbye {
        self.goodbye
    }

    /// What the driver does before it reads again: the throttle first, then the journal.
    pub fn next_action(&mut self) -> Next {
        if !self.throttle.is_zero() {
            return Next::Throttle(std::mem::take(&mut self.throttle));
        }
        match self.entry.take() {
            Some(e) => Next::Append(e),
            None => Next::Read,
        }
    }

    /// Whether the driver may take a packet from the device: not while a `slow_down`
    /// throttle is due or a PUBLISH waits for room in the journal (the device's buffered
    /// packets wait for the next round).
    pub fn reads_device(&self) -> bool {
        self.throttle.is_zero() && self.blocked.is_none()
    }

    /// The throttle ([`Next::Throttle`]) is over at `now`: the device's silence counts from
    /// here.
    pub fn throttle_over(&mut self, now: Instant) {
        self.last_in = now;
    }

    /// The journal took the blocked PUBLISH's entry ([`Next::Append`]) as `ticket`: its
    /// acknowledgement waits for that ticket. (rumqttd cannot have answered the PUBLISH yet:
    /// it was sent in the write before the wait, and nothing was read since.)
    pub fn appended(&mut self, ticket: u64) {
        if let Some(pkid) = self.blocked.take() {
            if let Some(slot) = self.awaiting.get_mut(&pkid) {
                *slot = ticket;
            }
        }
    }

    /// Whether some answer to the device waits for the durable ticket to move.
    pub fn awaits_durable(&self) -> bool {
        !self.held.is_empty()
    }

    /// The journal's durable ticket is `ticket`: the held answers it covers go to the device.
    pub fn durable(&mut self, ticket: u64) {
        self.durable = self.durable.max(ticket);
        while self.held.front().is_some_and(|(t, _)| *t <= self.durable) {
            if let Some((_, p)) = self.held.pop_front() {
                self.out.device.push(p);
            }
        }
    }

    /// Room for QoS 1/2 deliveries in the device's receive maximum.
    fn room(&self) -> usize {
        (self.peer.receive_max as usize)
            .saturating_sub(self.live_out.len() + self.retained_out.outstanding())
    }

    /// When [`Relay::tick`] has something to do: the next upstream ping, or the device's
    /// keepalive expiring, whichever is first.
    pub fn deadline(&self) -> Instant {
        let d = match self.silence {
            Some(s) => self.next_ping.min(self.last_in + s),
            None => self.next_ping,
        };
        if self.peer.v5 && !self.held.is_empty() {
            // An MQTT 5 device's held answers: is the queue refusing writes?
            return d.min(self.last_check + REFUSAL_CHECK);
        }
        d
    }

    /// Time passed to `now`: the device's keepalive may have expired (1.5 x its keepalive
    /// without a packet), or rumqttd is due a PINGREQ (one per call; one that fell behind
    /// catches up at once).
    pub fn tick(&mut self, now: Instant) -> Result<(), End> {
        if self.silence.is_some_and(|s| now >= self.last_in + s) {
            return Err(End::KeepaliveTimeout);
        }
        if self.peer.v5 && now >= self.last_check + REFUSAL_CHECK {
            self.last_check = now;
            if self.ctx.ingest.journal().is_some_and(|j| j.refusing()) {
                self.refuse_held();
            }
        }
        if now >= self.next_ping {
            self.next_ping += PING_EVERY;
            self.out.broker.push(P5::PingReq(v5::PingReq));
        }
        Ok(())
    }

    /// A newer connection with the same client id takes over: the session ends without an
    /// upstream DISCONNECT.
    pub fn stopped(&self) -> End {
        End::TakenOver
    }

    /// Whether [`Relay::send_retained`] has something to send now.
    pub fn retained_ready(&self) -> bool {
        self.retained_out.ready() && self.room() > 0
    }

    /// The retained messages the front end's window lets go to the device now (at most
    /// [`BATCH`]).
    pub fn send_retained(&mut self) {
        let max = self.room().min(BATCH);
        let (msgs, expired) = self.retained_out.take(max);
        self.ctx.metrics.expired.inc_by(expired as u64);
        for mut p in msgs {
            if self.options {
                self.identify(&mut p);
            }
            if self.fits(&p) {
                self.out.device.push(P5::Publish(p));
            } else {
                // Never sent: the front end's own delivery is over.
                self.ctx.metrics.too_large_for_device.inc();
                let pkid = p.pkid;
                match q4(p.qos) {
                    QoS::AtMostOnce => {}
                    QoS::AtLeastOnce => {
                        self.retained_out.answered(pkid, Answer::PubAck);
                    }
                    QoS::ExactlyOnce => {
                        self.retained_out.answered(pkid, Answer::PubRec);
                        self.retained_out.answered(pkid, Answer::PubComp);
                    }
                }
            }
        }
    }

    /// A packet from the device, taken at `now`.
    pub fn on_device(&mut self, p: P5, now: Instant) -> Result<(), End> {
        self.last_in = now;
        // Answers to the front end's own retained deliveries end here.
        let own = match &p {
            P5::PubAck(a) => Some((a.pkid, Answer::PubAck)),
            P5::PubRec(a) => Some((a.pkid, Answer::PubRec)),
            P5::PubComp(a) => Some((a.pkid, Answer::PubComp)),
            _ => None,
        };
        if let Some(release) = own.and_then(|(pkid, a)| self.retained_out.answered(pkid, a)) {
            if let (true, Some((pkid, _))) = (release, own) {
                self.out
                    .device
                    .push(P5::PubRel(v5::PubRel::new(pkid, None)));
            }
            // An own delivery answered for good frees room for parked live ones too.
            if !self.parked.is_empty() {
                self.unpark();
            }
            return Ok(());
        }
        match p {
            P5::Publish(p) => self.publish(p, now),
            P5::PubRel(r) => {
                if self.qos2_denied.remove(&r.pkid) {
                    self.answer(0, P5::PubComp(v5::PubComp::new(r.pkid, None)));
                } else if !self.qos2_in.remove(&r.pkid) {
                    // Nothing awaits release under this id (a retried PUBREL): answer it,
                    // release nothing (MQTT-4.3.3, PUBREL is handled idempotently).
                    self.answer(0, P5::PubComp(v5::PubComp::new(r.pkid, None)));
                } else {
                    self.out
                        .broker
                        .push(P5::PubRel(v5::PubRel::new(r.pkid, None)));
                }
                Ok(())
            }
            P5::PubAck(a) => {
                self.answered_out(a.pkid);
                if self.down21.remove(&a.pkid) {
                    // Lowered from QoS 2: the device acknowledged, finish rumqttd's flow.
                    self.answer_rel.insert(a.pkid);
                    self.ack_up(a.pkid, Ack::PubRec);
                } else {
                    self.ack_up(a.pkid, Ack::PubAck);
                }
                Ok(())
            }
            P5::PubRec(a) => {
                if pubrec_refuses(&a) {
                    // An MQTT 5 device refused the message: its flow ends here.
                    self.answered_out(a.pkid);
                    self.answer_rel.insert(a.pkid);
                }
                self.ack_up(a.pkid, Ack::PubRec);
                Ok(())
            }
            P5::PubComp(a) => {
                self.answered_out(a.pkid);
                self.comp_up(a.pkid);
                Ok(())
            }
            P5::Subscribe(s) => {
                self.subscribe(s);
                Ok(())
            }
            P5::Unsubscribe(u) => {
                self.unsubscribe(u);
                Ok(())
            }
            P5::PingReq(_) => {
                self.out.device.push(P5::PingResp(v5::PingResp));
                Ok(())
            }
            P5::Disconnect(d) => {
                self.goodbye.session_expiry = d
                    .properties
                    .as_ref()
                    .and_then(|p| p.session_expiry_interval);
                if d.reason_code == v5::DisconnectReasonCode::DisconnectWithWillMessage {
                    // No DISCONNECT upstream: rumqttd publishes the will.
                    return Err(End::DisconnectWithWill);
                }
                self.out.broker.push(P5::Disconnect(v5::Disconnect::new(
                    v5::DisconnectReasonCode::NormalDisconnection,
                )));
                Err(End::Disconnect)
            }
            // A second CONNECT, packets only a server sends, or AUTH (no enhanced
            // authentication was offered).
            P5::Connect(..)
            | P5::ConnAck(_)
            | P5::SubAck(_)
            | P5::UnsubAck(_)
            | P5::PingResp(_)
            | P5::Auth(_) => Err(End::ProtocolViolation),
        }
    }

    /// A PUBLISH from the device.
    fn publish(&mut self, mut p: v5::Publish, now: Instant) -> Result<(), End> {
        if let Some(alias) = p.properties.as_mut().and_then(|pr| pr.topic_alias.take()) {
            if !self.peer.v5 || alias == 0 || alias > TOPIC_ALIAS_MAX {
                return Err(End::TopicAlias);
            }
            if p.topic.is_empty() {
                match self.aliases.get(&alias) {
                    Some(t) => p.topic = t.clone(),
                    None => return Err(End::TopicAlias),
                }
            } else {
                self.aliases.insert(alias, p.topic.clone());
            }
        }
        // A handle on the topic's bytes (no copy): `p` moves on upstream.
        let bytes = p.topic.clone();
        let Ok(topic) = std::str::from_utf8(&bytes) else {
            return Err(End::ProtocolViolation);
        };
        if topic::validate_topic(topic).is_err() {
            return Err(End::ProtocolViolation);
        }
        let qos = q4(p.qos);
        if qos != QoS::AtMostOnce && !(qos == QoS::ExactlyOnce && self.qos2_in.contains(&p.pkid)) {
            if self.peer.v5 && self.inflight_in >= self.ctx.max_inflight {
                return Err(End::ReceiveMaximum);
            }
            self.inflight_in += 1;
        }
        let over_rate = self.over_rate(now)?;
        let ctx = self.ctx.clone();
        let m = &ctx.metrics;
        let name = self.id.name.as_deref();
        let denied = !ctx
            .acl
            .allows(name, &self.id.client_id, Action::Publish, topic);
        if denied {
            m.deny(Action::Publish);
            debug!(client_id = %self.id.client_id, topic = %topic, "publish denied");
        }
        // The queue cannot take it now (disk full, I/O error): a 3.1.1 device waits for its
        // answer; an MQTT 5 one is told quota exceeded, and the message is not taken.
        let quota = self.peer.v5
            && qos != QoS::AtMostOnce
            && !denied
            && ctx.ingest.refuses(topic, p.retain, &p.payload);
        if quota {
            m.refused_by_queue.inc();
            self.refuse_held();
        }
        let bad_format = self.peer.v5
            && p.properties
                .as_ref()
                .is_some_and(|pr| pr.payload_format_indicator == Some(1))
            && std::str::from_utf8(&p.payload).is_err();
        if denied || over_rate || quota || bad_format {
            if self.peer.v5 {
                // Told, and the flow ends with this answer (no PUBREL follows a refusing
                // PUBREC).
                let (ack, rec) = if denied {
                    (
                        v5::PubAckReason::NotAuthorized,
                        v5::PubRecReason::NotAuthorized,
                    )
                } else if over_rate || quota {
                    (
                        v5::PubAckReason::QuotaExceeded,
                        v5::PubRecReason::QuotaExceeded,
                    )
                } else {
                    (
                        v5::PubAckReason::PayloadFormatInvalid,
                        v5::PubRecReason::PayloadFormatInvalid,
                    )
                };
                match qos {
                    QoS::AtMostOnce => {}
                    QoS::AtLeastOnce => self.answer(0, puback_with(p.pkid, ack)),
                    QoS::ExactlyOnce => self.answer(0, pubrec_with(p.pkid, rec)),
                }
                return Ok(());
            }
            match qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => self.answer(0, P5::PubAck(v5::PubAck::new(p.pkid, None))),
                QoS::ExactlyOnce => {
                    self.qos2_denied.insert(p.pkid);
                    self.answer(0, P5::PubRec(v5::PubRec::new(p.pkid, None)));
                }
            }
            return Ok(());
        }
        if qos == QoS::ExactlyOnce && !self.qos2_in.insert(p.pkid) {
            // A retry of a message rumqttd already has: do not deliver it twice. Its
            // first PUBREC may still be held: this one goes behind it.
            m.qos2_duplicates.inc();
            let t = self.awaiting.get(&p.pkid).copied().unwrap_or(0);
            self.answer(t, P5::PubRec(v5::PubRec::new(p.pkid, None)));
            return Ok(());
        }
        let q = qos as u8;
        let kept = p.retain.then(|| self.kept_props(&p)).flatten();
        p.retain = ctx
            .ingest
            .admit_retain_with(topic, &p.payload, q, p.retain, kept);
        // No local reader and nothing for rumqttd to keep: the queue is the whole path, and
        // the front end answers itself. Only while nothing waits for rumqttd's answer, so
        // that acknowledgements keep the order of the PUBLISHes.
        let bypass = self.awaiting.is_empty()
            && qos != QoS::ExactlyOnce
            && !ctx.ingest.needs_broker(topic, p.retain);
        // What an MQTT 5 publisher sent with it goes to the cloud with its record.
        let extra = || p.properties.as_ref().map(cloud_extra).unwrap_or_default();
        if qos == QoS::AtMostOnce {
            // Appended, never waited for.
            let offer = ctx
                .ingest
                .offer_with(topic, &p.payload, q, p.retain, extra());
            let taken = ctx.ingest.taken(offer);
            if bypass && taken {
                m.bypassed.inc();
                return Ok(());
            }
        } else {
            match ctx
                .ingest
                .offer_with(topic, &p.payload, q, p.retain, extra())
            {
                Offer::Local => {}
                Offer::Queued(t) if bypass => {
                    m.bypassed.inc();
                    self.answer(t, P5::PubAck(v5::PubAck::new(p.pkid, None)));
                    return Ok(());
                }
                Offer::Queued(t) => {
                    self.awaiting.insert(p.pkid, t);
                }
                Offer::Full(e) => {
                    self.awaiting.insert(p.pkid, UNTICKETED);
                    self.blocked = Some(p.pkid);
                    self.entry = Some(e);
                }
            }
        }
        // Marked with the client id while a no-local filter of this session matches it.
        let own = self.options
            && self
                .filters
                .iter()
                .any(|(f, g)| g.no_local && topic::matches(topic::inner_filter(f), topic));
        let origin = own.then_some(self.id.client_id.as_str());
        self.out.broker.push(upstream::publish(p, origin));
        Ok(())
    }

    /// The queue refuses writes (MQTT 5): the held PUBACKs still waiting for the durable
    /// ticket go now as quota exceeded, in order, so the device learns at once instead of
    /// when the disk has room again. Their messages may still reach the cloud once the queue
    /// takes writes again: a negative answer promises nothing, and breaks no promise. A held
    /// PUBREC (QoS 2, whose flow rumqttd is in) and everything behind it stay held.
    fn refuse_held(&mut self) {
        let mut kept = VecDeque::new();
        while let Some((t, p)) = self.held.pop_front() {
            if !kept.is_empty() {
                kept.push_back((t, p));
                continue;
            }
            match p {
                P5::PubAck(a) if t > self.durable && a.reason == v5::PubAckReason::Success => {
                    self.ctx.metrics.refused_by_queue.inc();
                    self.out
                        .device
                        .push(puback_with(a.pkid, v5::PubAckReason::QuotaExceeded));
                }
                p if t <= self.durable => self.out.device.push(p),
                p => kept.push_back((t, p)),
            }
        }
        self.held = kept;
    }

    /// What an MQTT 5 retained publish keeps with it for later subscribers: its properties
    /// (topic alias already resolved) and the accept time.
    fn kept_props(&self, p: &v5::Publish) -> Option<KeptProps> {
        let mut properties = p.properties.clone()?;
        properties.topic_alias = None;
        properties.subscription_identifiers.clear();
        Some(KeptProps {
            properties,
            at_ms: crate::clock::now_ms(),
        })
    }

    /// Sends an acknowledgement to the device once the durable ticket reaches `ticket` (0: at
    /// once), never ahead of one held before it. The last answer of a device's QoS 1/2 flow
    /// frees its place in the receive maximum.
    fn answer(&mut self, ticket: u64, p: P5) {
        let last = match &p {
            P5::PubAck(_) | P5::PubComp(_) => true,
            P5::PubRec(r) => pubrec_refuses(r),
            _ => false,
        };
        if last {
            self.inflight_in = self.inflight_in.saturating_sub(1);
        }
        if self.held.is_empty() && ticket <= self.durable {
            self.out.device.push(p);
        } else {
            self.held.push_back((ticket, p));
        }
    }

    /// Applies the publish rate limit to one PUBLISH taken at `now`. Ok(true): drop it
    /// (policy `drop`); Err: close (policy `disconnect`); `slow_down` lets it through and
    /// sets `throttle`.
    fn over_rate(&mut self, now: Instant) -> Result<bool, End> {
        let Some((bucket, policy)) = &mut self.rate else {
            return Ok(false);
        };
        let wait = bucket.wait_for(1, now.into_std());
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

    fn subscribe(&mut self, s: v5::Subscribe) {
        let id = s
            .properties
            .as_ref()
            .and_then(|p| p.id)
            .and_then(|i| u32::try_from(i).ok());
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut forward = Vec::new();
        for f in s.filters {
            let shared = f.path.starts_with(topic::SHARE_PREFIX);
            let inner = topic::inner_filter(&f.path);
            // A shared filter must name a group; no local on one is a protocol error
            // (MQTT-3.8.3-4): refused like a malformed filter.
            let ok = topic::validate_filter(inner).is_ok()
                && (!shared || (inner.len() < f.path.len() && !f.nolocal));
            if !ok {
                codes.push(Some(v5::SubscribeReasonCode::TopicFilterInvalid));
                continue;
            }
            let name = self.id.name.as_deref();
            if !self
                .ctx
                .acl
                .allows(name, &self.id.client_id, Action::Subscribe, inner)
            {
                self.ctx.metrics.deny(Action::Subscribe);
                codes.push(Some(v5::SubscribeReasonCode::NotAuthorized));
                continue;
            }
            let audience = self.ctx.ingest.audience();
            if !audience.has(&self.audience_key, inner)
                && audience.count(&self.audience_key) >= self.ctx.max_subscriptions
            {
                self.ctx.metrics.limit("subscriptions");
                debug!(client_id = %self.id.client_id, filter = %f.path, "subscription over broker.max_subscriptions_per_client refused");
                codes.push(Some(v5::SubscribeReasonCode::QuotaExceeded));
                continue;
            }
            // Known before rumqttd has it: a publish racing the SUBSCRIBE goes to rumqttd.
            audience.add(&self.audience_key, inner);
            codes.push(None);
            let held = self.filters.get(&f.path).map(|g| g.upstream);
            let retained = !shared
                && match f.retain_forward_rule {
                    v5::RetainForwardRule::OnEverySubscribe => true,
                    v5::RetainForwardRule::OnNewSubscribe => held.is_none(),
                    v5::RetainForwardRule::Never => false,
                };
            let qos = q4(f.qos);
            let kept = match held {
                Some(q) if (q as u8) < (qos as u8) => {
                    // A higher QoS than rumqttd's subscription: rumqttd 0.20 would keep the
                    // old one, so the front end drops it first. The SUBSCRIBE at the old QoS
                    // only re-registers the filter under this connection (a resumed
                    // session's filters are not, and UNSUBSCRIBE would find nothing).
                    let (a, b) = (self.internal_pkid(s.pkid), self.internal_pkid(s.pkid));
                    self.out
                        .broker
                        .push(upstream::subscribe(a, &[(f.path.clone(), q)]));
                    self.out.broker.push(P5::Unsubscribe(v5::Unsubscribe {
                        pkid: b,
                        filters: vec![f.path.clone()],
                        properties: None,
                    }));
                    None
                }
                held => held,
            };
            forward.push(Asked {
                filter: f.path,
                qos,
                kept,
                no_local: f.nolocal,
                retain_as_published: f.preserve_retain,
                id,
                retained,
            });
        }
        if forward.is_empty() {
            let codes = codes.into_iter().flatten().collect();
            self.out.device.push(P5::SubAck(v5::SubAck {
                pkid: s.pkid,
                return_codes: codes,
                properties: None,
            }));
            return;
        }
        let asked: Vec<(String, QoS)> = forward.iter().map(|a| (a.filter.clone(), a.qos)).collect();
        let packet = upstream::subscribe(s.pkid, &asked);
        self.pending_sub.insert(s.pkid, (codes, forward));
        self.out.broker.push(packet);
    }

    fn unsubscribe(&mut self, u: v5::Unsubscribe) {
        let reasons = u
            .filters
            .iter()
            .map(|f| match self.filters.remove(f) {
                Some(_) => v5::UnsubAckReason::Success,
                None => v5::UnsubAckReason::NoSubscriptionExisted,
            })
            .collect();
        self.lowered = any_lowered(&self.filters);
        self.options = any_options(&self.filters);
        for f in &u.filters {
            self.ctx
                .ingest
                .audience()
                .remove(&self.audience_key, topic::inner_filter(f));
        }
        // rumqttd 0.20 answers no UNSUBACK for a filter it does not find under this
        // connection, which is every filter of a resumed persistent session, and goes on
        // delivering on it. The front end answers (MQTT-3.10.4-4) and withholds deliveries
        // the session no longer subscribes to (see `deliver`).
        self.unsubacked.insert(u.pkid);
        self.check_filters = true;
        self.out.device.push(P5::UnsubAck(v5::UnsubAck {
            pkid: u.pkid,
            reasons,
            properties: None,
        }));
        self.out.broker.push(P5::Unsubscribe(v5::Unsubscribe {
            pkid: u.pkid,
            filters: u.filters,
            properties: None,
        }));
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

    /// A packet from rumqttd.
    pub fn on_broker(&mut self, p: P5) -> Result<(), End> {
        match p {
            P5::Publish(p) => self.deliver(p),
            P5::PubAck(a) => {
                let t = self.awaiting.remove(&a.pkid).unwrap_or(0);
                self.answer(t, P5::PubAck(v5::PubAck::new(a.pkid, None)));
            }
            P5::PubRec(a) => {
                let t = self.awaiting.remove(&a.pkid).unwrap_or(0);
                self.answer(t, P5::PubRec(v5::PubRec::new(a.pkid, None)));
            }
            P5::PubComp(a) => self.answer(0, P5::PubComp(v5::PubComp::new(a.pkid, None))),
            P5::PubRel(r) => {
                if self.answer_rel.remove(&r.pkid) {
                    self.comp_up(r.pkid);
                } else {
                    self.out
                        .device
                        .push(P5::PubRel(v5::PubRel::new(r.pkid, None)));
                }
            }
            P5::SubAck(a) if self.internal.remove(&a.pkid) => {}
            P5::UnsubAck(a) if self.internal.remove(&a.pkid) => {}
            P5::SubAck(a) => self.suback(a),
            // Every UNSUBSCRIBE was answered already (see `unsubscribe`).
            P5::UnsubAck(a) => {
                self.unsubacked.remove(&a.pkid);
            }
            P5::PingResp(_) => {}
            P5::Disconnect(_) => return Err(End::BrokerGone),
            _ => {}
        }
        Ok(())
    }

    /// rumqttd's SUBACK for a device's SUBSCRIBE: merged with the codes decided here, then
    /// the retained messages of what was granted.
    fn suback(&mut self, a: v5::SubAck) {
        let Some((mut codes, forwarded)) = self.pending_sub.remove(&a.pkid) else {
            return;
        };
        let mut theirs = a.return_codes.into_iter();
        let mut retained = Vec::new();
        for (asked, code) in forwarded.into_iter().zip(theirs.by_ref()) {
            if let v5::SubscribeReasonCode::Success(q) = code {
                let q = q4(q);
                if asked.retained {
                    let kept = self
                        .ctx
                        .ingest
                        .retained_matching(&asked.filter, crate::clock::now_ms());
                    retained.push((q, kept));
                }
                let g = Granted {
                    upstream: asked.kept.unwrap_or(q),
                    device: q,
                    no_local: asked.no_local,
                    retain_as_published: asked.retain_as_published,
                    id: asked.id,
                };
                self.filters.insert(asked.filter, g);
            }
            if let Some(slot) = codes.iter_mut().find(|c| c.is_none()) {
                *slot = Some(code);
            }
        }
        self.lowered = any_lowered(&self.filters);
        self.options = any_options(&self.filters);
        let codes = codes
            .into_iter()
            .map(|c| c.unwrap_or(v5::SubscribeReasonCode::Unspecified))
            .collect();
        self.out.device.push(P5::SubAck(v5::SubAck {
            pkid: a.pkid,
            return_codes: codes,
            properties: None,
        }));
        // After the SUBACK: every retained message the granted filters match, sent by the
        // front end (rumqttd's own retained deliveries are not passed on).
        let mut msgs = retained_out::merge(retained);
        if self.ctx.acl.filters_deliveries() {
            msgs.retain(|(_, k)| self.may_receive(&k.topic));
        }
        self.retained_out.queue(msgs);
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
    fn ack_up(&mut self, pkid: u16, ack: Ack) {
        for (p, a) in self.up_acks.ready(pkid, ack) {
            self.out.broker.push(match a {
                Ack::PubAck => P5::PubAck(v5::PubAck::new(p, None)),
                Ack::PubRec => P5::PubRec(v5::PubRec::new(p, None)),
            });
        }
    }

    /// The PUBCOMP for rumqttd's PUBREL `pkid` is known: send what may leave now.
    fn comp_up(&mut self, pkid: u16) {
        for p in self.up_acks.completed(pkid) {
            self.out.broker.push(P5::PubComp(v5::PubComp::new(p, None)));
        }
    }

    /// The device answered rumqttd's delivery `pkid` for good: its place in the device's
    /// receive maximum is free, and a parked delivery may go.
    fn answered_out(&mut self, pkid: u16) {
        if self.live_out.remove(&pkid) {
            self.unpark();
        }
    }

    /// Sends the parked deliveries the device's receive maximum has room for, in order.
    fn unpark(&mut self) {
        while let Some(p) = self.parked.front() {
            if p.qos != q5(QoS::AtMostOnce) && self.room() == 0 {
                break;
            }
            if let Some(p) = self.parked.pop_front() {
                self.emit(p);
            }
        }
    }

    /// Puts the subscription identifiers of the session's filters that match `p`'s topic on
    /// it (MQTT-3.3.4-3), when the device gave any.
    fn identify(&self, p: &mut v5::Publish) {
        let topic = String::from_utf8_lossy(&p.topic);
        let mut ids: Vec<usize> = self
            .filters
            .iter()
            .filter(|(f, _)| topic::matches(topic::inner_filter(f), &topic))
            .filter_map(|(_, g)| g.id.map(|i| i as usize))
            .collect();
        if ids.is_empty() {
            return;
        }
        ids.sort_unstable();
        p.properties
            .get_or_insert_with(Default::default)
            .subscription_identifiers = ids;
    }

    /// Whether `p` fits in the device's maximum packet size.
    fn fits(&self, p: &v5::Publish) -> bool {
        match self.peer.max_packet {
            None => true,
            Some(max) => {
                let len = p.size();
                // The fixed header: the type byte and 1-4 bytes of remaining length.
                let head = 1 + match len {
                    0..=127 => 1,
                    128..=16_383 => 2,
                    16_384..=2_097_151 => 3,
                    _ => 4,
                };
                len + head <= max as usize
            }
        }
    }

    /// A delivery to the device, or parked behind those already parked, or while the
    /// device's receive maximum is full.
    fn send(&mut self, p: v5::Publish) {
        if !self.parked.is_empty() || (p.qos != q5(QoS::AtMostOnce) && self.room() == 0) {
            self.parked.push_back(p);
            return;
        }
        self.emit(p);
    }

    /// Sends a delivery now.
    fn emit(&mut self, p: v5::Publish) {
        if p.qos != q5(QoS::AtMostOnce) {
            self.live_out.insert(p.pkid);
        }
        self.out.device.push(P5::Publish(p));
    }

    /// Delivers a message from rumqttd at min(publisher's QoS, granted QoS).
    fn deliver(&mut self, p: v5::Publish) {
        let (mut p, marks) = upstream::delivery(p);
        let delivered = q4(p.qos);
        if delivered != QoS::AtMostOnce {
            self.up_acks.delivered(p.pkid);
        }
        let topic = String::from_utf8_lossy(&p.topic).into_owned();
        // rumqttd sets the retain flag only on the retained messages it sends a new
        // subscription (live deliveries have it cleared): the front end sends those itself,
        // all of them (see `retained_out`).
        let retained = p.retain;
        let denied = !retained && self.ctx.acl.filters_deliveries() && !self.may_receive(&topic);
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
                .client_reaches(&self.audience_key, &topic);
        // No local: the session's own publish, and every filter of it that matches says so.
        let matching = |f: &(&String, &Granted)| topic::matches(topic::inner_filter(f.0), &topic);
        let not_local = self.options
            && marks.origin.as_deref() == Some(self.id.client_id.as_str())
            && self
                .filters
                .iter()
                .filter(matching)
                .all(|(_, g)| g.no_local);
        let too_large = !self.fits(&p);
        if too_large {
            self.ctx.metrics.too_large_for_device.inc();
        }
        if retained || denied || unsubscribed || not_local || too_large {
            // One of rumqttd's retained deliveries, a topic this device may not receive
            // (`deny_subscribe`) that a wider filter matched, one it no longer subscribes
            // to, its own on a no-local filter, or one it cannot take:
            // answered upstream here, never sent to the device.
            match delivered {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => self.ack_up(p.pkid, Ack::PubAck),
                QoS::ExactlyOnce => {
                    self.answer_rel.insert(p.pkid);
                    self.ack_up(p.pkid, Ack::PubRec);
                }
            }
            return;
        }
        // A live message is newer than a retained one of its topic still waiting to go.
        self.retained_out.superseded(&topic);
        if self.options && marks.retained {
            // Retain as published, on a filter that asked for it.
            p.retain = self
                .filters
                .iter()
                .filter(matching)
                .any(|(_, g)| g.retain_as_published);
        }
        if self.options {
            self.identify(&mut p);
        }
        // Untagged messages come from the gateway's own links: rumqttd's QoS stands.
        let mut want = match marks.origin_qos {
            Some(o) if o < delivered => o,
            _ => delivered,
        };
        if self.lowered {
            // Subscribed again at a lower QoS than rumqttd's subscription: the best QoS any
            // of the session's filters matching the topic grants now.
            let granted = self
                .filters
                .iter()
                .filter(matching)
                .map(|(_, g)| g.device)
                .reduce(|a, b| if b > a { b } else { a });
            if let Some(g) = granted.filter(|g| *g < want) {
                want = g;
            }
        }
        if want != delivered {
            self.ctx.metrics.downgraded.inc();
            let pkid = p.pkid;
            match (delivered, want) {
                (QoS::AtLeastOnce, _) => {
                    self.ack_up(pkid, Ack::PubAck);
                    p.qos = q5(QoS::AtMostOnce);
                    p.pkid = 0;
                }
                (QoS::ExactlyOnce, QoS::AtMostOnce) => {
                    self.answer_rel.insert(pkid);
                    self.ack_up(pkid, Ack::PubRec);
                    p.qos = q5(QoS::AtMostOnce);
                    p.pkid = 0;
                }
                (QoS::ExactlyOnce, _) => {
                    // Keep rumqttd's packet id busy until the device acknowledged.
                    self.down21.insert(pkid);
                    p.qos = q5(QoS::AtLeastOnce);
                }
                _ => {}
            }
        }
        self.send(p);
    }
}

/// What of an MQTT 5 PUBLISH's properties its record keeps for the cloud: the message expiry,
/// and the rest as a property list (topic alias and subscription identifiers are the
/// connection's, not the message's).
fn cloud_extra(props: &v5::PublishProperties) -> Extra {
    let mut rest = props.clone();
    rest.topic_alias = None;
    rest.subscription_identifiers.clear();
    let expiry = rest.message_expiry_interval.take();
    if rest == v5::PublishProperties::default() {
        return Extra {
            expiry,
            props: Bytes::new(),
        };
    }
    let mut b = BytesMut::new();
    if rest.write(&mut b).is_err() {
        return Extra {
            expiry,
            props: Bytes::new(),
        };
    }
    // `write` puts the list's length (a variable byte integer) first.
    let head = (b.iter().take_while(|x| **x & 0x80 != 0).count() + 1).min(b.len());
    Extra {
        expiry,
        props: b.freeze().slice(head..),
    }
}

/// Whether some filter has a subscription option deliveries must look at.
fn any_options(filters: &Filters) -> bool {
    filters
        .values()
        .any(|g| g.no_local || g.retain_as_published || g.id.is_some())
}

/// Whether an MQTT 5 PUBREC refuses the message (its flow ends there).
fn pubrec_refuses(r: &v5::PubRec) -> bool {
    !matches!(
        r.reason,
        v5::PubRecReason::Success | v5::PubRecReason::NoMatchingSubscribers
    )
}

/// A PUBACK with a reason code.
fn puback_with(pkid: u16, reason: v5::PubAckReason) -> P5 {
    P5::PubAck(v5::PubAck {
        pkid,
        reason,
        properties: None,
    })
}

/// A PUBREC with a reason code.
fn pubrec_with(pkid: u16, reason: v5::PubRecReason) -> P5 {
    P5::PubRec(v5::PubRec {
        pkid,
        reason,
        properties: None,
    })
}

#[cfg(test)]
mod tests {
    use std::thread::JoinHandle;

    use prometheus_client::metrics::counter::Counter;
    use rumqttc::mqttbytes::v4::{self, Packet as P4};
    use rumqttc::v5::mqttbytes::QoS as Q5;
    use tokio::sync::Semaphore;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::frontend::auth::{Acl, Users};
    use crate::frontend::config::{AclConfig, AclRules};
    use crate::frontend::metrics::BrokerMetrics;
    use crate::frontend::{v311, Upstream};
    use crate::ingest::{Ingest, Routing};
    use crate::metrics::Registry;
    use crate::password::LoginGuard;
    use crate::store::config::StoreConfig;
    use crate::store::metrics::StoreMetrics;
    use crate::store::{journal, Store};
    use crate::tls::ClientCertMode;
    use crate::topic::FilterSet;
    use crate::watchdog::Heartbeat;

    /// A real queue in a temporary directory: the store, its journal thread, and an ingest
    /// that queues every topic but `local/#` for the cloud. The tests tell the relay the
    /// durable ticket themselves; the journal only hands out the tickets (1, 2, ...).
    struct Queue {
        ingest: Ingest,
        stop: CancellationToken,
        thread: Option<JoinHandle<()>>,
        _dir: tempfile::TempDir,
    }

    impl Queue {
        fn new() -> Queue {
            let dir = tempfile::tempdir().unwrap();
            let m = StoreMetrics::new();
            let store = Store::open(&dir.path().join("q"), &StoreConfig::default(), m.clone());
            let store = Arc::new(store.unwrap());
            let stop = CancellationToken::new();
            let (j, thread) =
                journal::spawn(store, m.clone(), stop.clone(), Heartbeat::new("test")).unwrap();
            let routing = Routing {
                forward: FilterSet::new(["#".to_string()]),
                exclude: FilterSet::new(["local/#".to_string()]),
                cloud_prefix: String::new(),
                downlink: FilterSet::new(Vec::<String>::new()),
            };
            Queue {
                ingest: Ingest::new(routing, j, m, Counter::default()),
                stop,
                thread: Some(thread),
                _dir: dir,
            }
        }

        /// A queue whose journal thread has stopped: the journal hands every entry back, as
        /// a full one does ([`Offer::Full`]).
        fn full() -> Queue {
            let mut q = Queue::new();
            q.stop.cancel();
            q.thread.take().unwrap().join().unwrap();
            q
        }

        /// Some local client may receive on `filter`: what is published there goes to
        /// rumqttd (no bypass).
        fn reader(&self, filter: &str) {
            self.ingest.audience().add("reader", filter);
        }
    }

    impl Drop for Queue {
        fn drop(&mut self) {
            self.stop.cancel();
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn acl(publish: &[&str], subscribe: &[&str]) -> AclConfig {
        AclConfig {
            default: AclRules {
                publish: publish.iter().map(|s| s.to_string()).collect(),
                subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
                ..AclRules::default()
            },
            ..AclConfig::default()
        }
    }

    fn context(
        q: &Queue,
        acl: AclConfig,
        rate: Option<(u32, u32, RateLimitPolicy)>,
    ) -> Arc<Context> {
        Arc::new(Context {
            listener: "test".into(),
            allow_anonymous: true,
            cert_mode: ClientCertMode::None,
            users: Arc::new(Users::new(&[])),
            acl: Arc::new(Acl::new(&acl)),
            upstream: Arc::new(Upstream {
                addr: "127.0.0.1:1".parse().unwrap(),
                username: "internal".into(),
                password: "secret".into(),
            }),
            metrics: Arc::new(BrokerMetrics::default()),
            max_packet: 1 << 20,
            connect_timeout: Duration::from_secs(10),
            verify_slots: Arc::new(Semaphore::new(1)),
            sessions: Arc::default(),
            client_id_pattern: None,
            logins: Arc::new(LoginGuard::new(Duration::ZERO)),
            max_subscriptions: 100,
            max_inflight: 100,
            rate,
            ingest: q.ingest.clone(),
            clients: Arc::default(),
        })
    }

    /// Device `dev1` (username `dev1`), fresh session, keepalive `keep_alive` s; the journal
    /// has made nothing durable yet.
    fn relay(ctx: &Arc<Context>, keep_alive: u16, now: Instant) -> Relay {
        let id = Identity {
            name: Some("dev1".into()),
            client_id: "dev1".into(),
        };
        Relay::new(
            ctx.clone(),
            id,
            "dev1".into(),
            None,
            (keep_alive, Peer::V311),
            0,
            now,
        )
    }

    /// The relay fed a 3.1.1 device's packets (as its codec converts them).
    trait Dev4 {
        fn dev4(&mut self, p: P4, now: Instant) -> Result<(), End>;
    }

    impl Dev4 for Relay {
        fn dev4(&mut self, p: P4, now: Instant) -> Result<(), End> {
            self.on_device(v311::to_v5(p), now)
        }
    }

    /// What the relay queued for the device and for rumqttd since the last call.
    fn out(r: &mut Relay) -> (Vec<P4>, Vec<P5>) {
        (
            r.out.device.drain(..).filter_map(v311::to_v4).collect(),
            std::mem::take(&mut r.out.broker),
        )
    }

    fn publish(topic: &str, qos: QoS, pkid: u16) -> P4 {
        let mut p = v4::Publish::new(topic, qos, "v");
        p.pkid = pkid;
        P4::Publish(p)
    }

    /// rumqttd's delivery of a device publish of QoS `origin`, at QoS `qos` (its
    /// subscription's).
    fn delivery(topic: &str, origin: QoS, qos: Q5, pkid: u16) -> P5 {
        let mut p = v4::Publish::new(topic, origin, "v");
        p.pkid = pkid;
        let P5::Publish(mut p) = upstream::publish(v311::publish_v5(p), None) else {
            unreachable!()
        };
        p.qos = qos;
        P5::Publish(p)
    }

    /// The packet ids and QoS of the PUBLISHes in `packets` (to rumqttd).
    fn published(packets: &[P5]) -> Vec<(u16, Q5)> {
        packets
            .iter()
            .filter_map(|p| match p {
                P5::Publish(p) => Some((p.pkid, p.qos)),
                _ => None,
            })
            .collect()
    }

    fn puback(pkid: u16) -> P4 {
        P4::PubAck(v4::PubAck::new(pkid))
    }

    fn pubrec(pkid: u16) -> P4 {
        P4::PubRec(v4::PubRec::new(pkid))
    }

    fn up_puback(pkid: u16) -> P5 {
        P5::PubAck(v5::PubAck::new(pkid, None))
    }

    fn up_pubrec(pkid: u16) -> P5 {
        P5::PubRec(v5::PubRec::new(pkid, None))
    }

    /// The value of the front end's metric `name` (e.g. `denied_total{action="publish"}`).
    fn metric(ctx: &Context, name: &str) -> u64 {
        let r = Registry::new();
        r.add(ctx.metrics.as_ref());
        let text = r.render();
        let line = format!("fieldgate_broker_{name} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&line))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {line} in {text}"))
    }

    #[test]
    fn acknowledgements_wait_for_durable_and_keep_the_order_of_the_publishes() {
        let q = Queue::new();
        q.reader("#");
        let ctx = context(&q, AclConfig::default(), None);
        let t0 = Instant::now();
        let mut r = relay(&ctx, 0, t0);
        // Cloud-bound QoS 1 and 2 (journal tickets 1 and 2), then a local one (no ticket).
        r.dev4(publish("up/a", QoS::AtLeastOnce, 1), t0).unwrap();
        r.dev4(publish("up/b", QoS::ExactlyOnce, 2), t0).unwrap();
        r.dev4(publish("local/c", QoS::AtLeastOnce, 3), t0).unwrap();
        let (dev, up) = out(&mut r);
        assert!(dev.is_empty());
        assert_eq!(
            published(&up),
            [
                (1, Q5::AtLeastOnce),
                (2, Q5::ExactlyOnce),
                (3, Q5::AtLeastOnce)
            ]
        );
        // rumqttd answers all three: nothing may leave before ticket 1 is durable, and the
        // local one's answer, which waits for nothing, waits behind the held ones.
        for p in [up_puback(1), up_pubrec(2), up_puback(3)] {
            r.on_broker(p).unwrap();
        }
        assert!(out(&mut r).0.is_empty());
        assert!(r.awaits_durable());
        // Each leaves once its ticket is durable, in the order of the PUBLISHes.
        r.durable(1);
        assert_eq!(out(&mut r).0, [puback(1)]);
        r.durable(2);
        assert_eq!(out(&mut r).0, [pubrec(2), puback(3)]);
        assert!(!r.awaits_durable());
        // Nothing held: an answer whose ticket is durable leaves at once.
        r.dev4(publish("up/d", QoS::AtLeastOnce, 4), t0).unwrap();
        r.durable(3);
        r.on_broker(up_puback(4)).unwrap();
        assert_eq!(out(&mut r).0, [puback(4)]);
    }

    #[test]
    fn a_publish_without_a_local_reader_is_answered_here_once_durable_and_not_sent_to_rumqttd() {
        let q = Queue::new();
        q.reader("up/seen");
        let ctx = context(&q, AclConfig::default(), None);
        let t0 = Instant::now();
        let mut r = relay(&ctx, 0, t0);
        r.dev4(publish("up/a", QoS::AtLeastOnce, 1), t0).unwrap();
        r.dev4(publish("up/a", QoS::AtMostOnce, 0), t0).unwrap();
        let (dev, up) = out(&mut r);
        assert!(up.is_empty(), "{up:?}");
        // The PUBACK waits for ticket 1, as rumqttd's would have.
        assert!(dev.is_empty());
        r.durable(1);
        assert_eq!(out(&mut r).0, [puback(1)]);
        assert_eq!(metric(&ctx, "bypassed_total"), 2);
        // While rumqttd's answer to an earlier PUBLISH is awaited, the front end may not
        // answer ahead of it: the next one without a reader goes through rumqttd too.
        r.dev4(publish("up/seen", QoS::AtLeastOnce, 2), t0).unwrap();
        r.dev4(publish("up/a", QoS::AtLeastOnce, 3), t0).unwrap();
        let (_, up) = out(&mut r);
        assert_eq!(published(&up), [(2, Q5::AtLeastOnce), (3, Q5::AtLeastOnce)]);
        assert_eq!(metric(&ctx, "bypassed_total"), 2);
        // Retained publishes are rumqttd's to keep, even without a reader.
        r.on_broker(up_puback(2)).unwrap();
        r.on_broker(up_puback(3)).unwrap();
        let mut kept = v4::Publish::new("up/a", QoS::AtLeastOnce, "v");
        (kept.pkid, kept.retain) = (5, true);
        r.dev4(P4::Publish(kept), t0).unwrap();
        assert_eq!(published(&out(&mut r).1), [(5, Q5::AtLeastOnce)]);
    }

    #[test]
    fn a_qos2_retry_is_answered_with_pubrec_and_not_forwarded_again() {
        let q = Queue::new();
        q.reader("#");
        let ctx = context(&q, AclConfig::default(), None);
        let t0 = Instant::now();
        let mut r = relay(&ctx, 0, t0);
        r.dev4(publish("local/x", QoS::ExactlyOnce, 5), t0).unwrap();
        assert_eq!(published(&out(&mut r).1), [(5, Q5::ExactlyOnce)]);
        r.on_broker(up_pubrec(5)).unwrap();
        assert_eq!(out(&mut r).0, [pubrec(5)]);
        // The device did not get (or lost) the PUBREC and sends the PUBLISH again.
        let P4::Publish(mut again) = publish("local/x", QoS::ExactlyOnce, 5) else {
            unreachable!()
        };
        again.dup = true;
        r.dev4(P4::Publish(again), t0).unwrap();
        let (dev, up) = out(&mut r);
        assert_eq!(dev, [pubrec(5)]);
        assert!(up.is_empty(), "forwarded twice: {up:?}");
        assert_eq!(metric(&ctx, "qos2_duplicates_total"), 1);
        // A retry of a cloud-bound one whose first PUBREC is still held goes behind it.
        r.dev4(publish("up/y", QoS::ExactlyOnce, 6), t0).unwrap();
        r.on_broker(up_pubrec(6)).unwrap();
        r.dev4(publish("up/y", QoS::ExactlyOnce, 6), t0).unwrap();
        let (dev, up) = out(&mut r);
        assert!(dev.is_empty());
        assert_eq!(published(&up), [(6, Q5::ExactlyOnce)]);
        r.durable(1);
        assert_eq!(out(&mut r).0, [pubrec(6), pubrec(6)]);
        // The PUBREL releases the message upstream once.
        r.dev4(P4::PubRel(v4::PubRel::new(5)), t0).unwrap();
        assert_eq!(out(&mut r).1, [P5::PubRel(v5::PubRel::new(5, None))]);
    }

    #[test]
    fn a_publish_the_acl_denies_is_still_acknowledged_and_counted() {
        let q = Queue::new();
        q.reader("#");
        let ctx = context(&q, acl(&["field/%u/#"], &["#"]), None);
        let t0 = Instant::now();
        let mut r = relay(&ctx, 0, t0);
        r.dev4(publish("field/dev2/t", QoS::AtMostOnce, 0), t0)
            .unwrap();
        r.dev4(publish("field/dev2/t", QoS::AtLeastOnce, 1), t0)
            .unwrap();
        r.dev4(publish("field/dev2/t", QoS::ExactlyOnce, 2), t0)
            .unwrap();
        r.dev4(P4::PubRel(v4::PubRel::new(2)), t0).unwrap();
        let (dev, up) = out(&mut r);
        assert_eq!(
            dev,
            [puback(1), pubrec(2), P4::PubComp(v4::PubComp::new(2))]
        );
        assert!(up.is_empty(), "a denied publish went to rumqttd: {up:?}");
        assert_eq!(metric(&ctx, r#"denied_total{action="publish"}"#), 3);
        // Its own subtree is allowed.
        r.dev4(publish("field/dev1/t", QoS::AtLeastOnce, 3), t0)
            .unwrap();
        assert_eq!(published(&out(&mut r).1), [(3, Q5::AtLeastOnce)]);
    }

    #[test]
    fn subscribe_sends_rumqttd_only_allowed_filters_and_merges_its_suback_in_the_devices_order() {
        let q = Queue::new();
        let ctx = context(&q, acl(&["#"], &["allowed/#"]), None);
        let t0 = Instant::now();
        let mut r = relay(&ctx, 0, t0);
        let s = v4::Subscribe {
            pkid: 7,
            filters: vec![
                v4::SubscribeFilter::new("allowed/a".into(), QoS::AtLeastOnce),
                v4::SubscribeFilter::new("secret/#".into(), QoS::AtLeastOnce),
                v4::SubscribeFilter::new("allowed/b".into(), QoS::ExactlyOnce),
            ],
        };
        r.dev4(P4::Subscribe(s), t0).unwrap();
        let (dev, up) = out(&mut r);
        assert!(dev.is_empty());
        let [P5::Subscribe(s)] = &up[..] else {
            panic!("{up:?}")
        };
        let asked: Vec<(&str, Q5)> = s.filters.iter().map(|f| (&f.path[..], f.qos)).collect();
        assert_eq!(
            (s.pkid, asked),
            (
                7,
                vec![
                    ("allowed/a", Q5::AtLeastOnce),
                    ("allowed/b", Q5::ExactlyOnce)
                ]
            )
        );
        assert_eq!(metric(&ctx, r#"denied_total{action="subscribe"}"#), 1);
        // rumqttd grants what was asked; the device hears about all three, in its order.
        r.on_broker(P5::SubAck(v5::SubAck {
            pkid: 7,
            return_codes: vec![
                v5::SubscribeReasonCode::Success(Q5::AtLeastOnce),
                v5::SubscribeReasonCode::Success(Q5::ExactlyOnce),
            ],
            properties: None,
        }))
        .unwrap();
        use v4::SubscribeReasonCode as C;
        assert_eq!(
            out(&mut r).0,
            [P4::SubAck(v4::SubAck::new(
                7,
                vec![
                    C::Success(QoS::AtLeastOnce),
                    C::Failure,
                    C::Success(QoS::ExactlyOnce)
                ]
            ))]
        );
        // Registered in the audience before rumqttd had it; the refused one is not.
        assert!(q.ingest.audience().has("dev1", "allowed/b"));
        assert!(!q.ingest.audience().has("dev1", "secret/#"));
    }

    #[test]
    fn a_delivery_is_lowered_to_the_granted_qos_and_upstream_answers_leave_in_rumqttds_order() {
        let q = Queue::new();
        let ctx = context(&q, AclConfig::default(), None);
        let t0 = Instant::now();
        let mut r = relay(&ctx, 0, t0);
        // Subscribed at QoS 2, then again at QoS 1: rumqttd keeps delivering at 2.
        for (pkid, qos) in [(1, QoS::ExactlyOnce), (2, QoS::AtLeastOnce)] {
            let s = v4::Subscribe::new("t/#", qos);
            r.dev4(P4::Subscribe(v4::Subscribe { pkid, ..s }), t0)
                .unwrap();
            r.on_broker(P5::SubAck(v5::SubAck {
                pkid,
                return_codes: vec![v5::SubscribeReasonCode::Success(upstream::q5(qos))],
                properties: None,
            }))
            .unwrap();
        }
        out(&mut r);
        // A QoS 2 message delivered at QoS 2 goes to the device at the granted QoS 1; a QoS
        // 0 one delivered at 2 goes at QoS 0 and the front end answers it upstream itself.
        r.on_broker(delivery("t/a", QoS::ExactlyOnce, Q5::ExactlyOnce, 1))
            .unwrap();
        r.on_broker(delivery("t/b", QoS::AtMostOnce, Q5::ExactlyOnce, 2))
            .unwrap();
        let (dev, up) = out(&mut r);
        let sent: Vec<(u16, QoS)> = dev
            .iter()
            .map(|p| match p {
                P4::Publish(p) => (p.pkid, p.qos),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(sent, [(1, QoS::AtLeastOnce), (0, QoS::AtMostOnce)]);
        // The answer to 2 is ready, but rumqttd sent 1 first: it waits.
        assert!(up.is_empty(), "answered out of rumqttd's order: {up:?}");
        assert_eq!(metric(&ctx, "downgraded_total"), 2);
        // The device's PUBACK for 1 becomes PUBREC upstream, and 2's follows it.
        r.dev4(puback(1), t0).unwrap();
        assert_eq!(out(&mut r).1, [up_pubrec(1), up_pubrec(2)]);
        // rumqttd's PUBRELs are the front end's to complete, again in order.
        r.on_broker(P5::PubRel(v5::PubRel::new(2, None))).unwrap();
        assert!(out(&mut r).1.is_empty());
        r.on_broker(P5::PubRel(v5::PubRel::new(1, None))).unwrap();
        let (dev, up) = out(&mut r);
        assert!(
            dev.is_empty(),
            "the device's QoS 1 flow has no PUBREL: {dev:?}"
        );
        assert_eq!(
            up,
            [
                P5::PubComp(v5::PubComp::new(1, None)),
                P5::PubComp(v5::PubComp::new(2, None))
            ]
        );
    }

    #[test]
    fn unsubscribe_is_answered_here_and_rumqttds_own_unsuback_is_dropped() {
        let q = Queue::new();
        let ctx = context(&q, AclConfig::default(), None);
        let t0 = Instant::now();
        let mut r = relay(&ctx, 0, t0);
        r.dev4(
            P4::Subscribe(v4::Subscribe::new("t/#", QoS::AtLeastOnce)),
            t0,
        )
        .unwrap();
        out(&mut r);
        let u = v4::Unsubscribe {
            pkid: 9,
            topics: vec!["t/#".into()],
        };
        r.dev4(P4::Unsubscribe(u), t0).unwrap();
        let (dev, up) = out(&mut r);
        assert_eq!(dev, [P4::UnsubAck(v4::UnsubAck::new(9))]);
        assert!(matches!(&up[..], [P5::Unsubscribe(u)] if u.pkid == 9 && u.filters == ["t/#"]));
        assert!(!q.ingest.audience().has("dev1", "t/#"));
        r.on_broker(P5::UnsubAck(v5::UnsubAck {
            pkid: 9,
            reasons: vec![v5::UnsubAckReason::Success],
            properties: None,
        }))
        .unwrap();
        assert!(out(&mut r).0.is_empty(), "UNSUBACK sent twice");
        // rumqttd may go on delivering on the filter: answered upstream, not passed on.
        r.on_broker(delivery("t/a", QoS::AtLeastOnce, Q5::AtLeastOnce, 3))
            .unwrap();
        let (dev, up) = out(&mut r);
        assert!(dev.is_empty(), "{dev:?}");
        assert_eq!(up, [up_puback(3)]);
    }

    #[tokio::test(start_paused = true)]
    async fn keepalive_closes_after_one_and_a_half_keepalives_of_silence() {
        let q = Queue::new();
        let ctx = context(&q, AclConfig::default(), None);
        let t0 = Instant::now();
        let mut r = relay(&ctx, 10, t0);
        // Driven as the session drives it: sleep until the deadline, then tick.
        tokio::time::sleep(Duration::from_secs(9)).await;
        r.dev4(P4::PingReq, Instant::now()).unwrap();
        assert_eq!(out(&mut r).0, [P4::PingResp]);
        tokio::time::sleep_until(r.deadline()).await;
        assert_eq!(Instant::now() - t0, Duration::from_secs(9 + 15));
        assert_eq!(r.tick(Instant::now()), Err(End::KeepaliveTimeout));
        // Just before it, nothing happens.
        let mut r = relay(&ctx, 10, t0);
        r.dev4(P4::PingReq, t0).unwrap();
        assert_eq!(r.tick(t0 + Duration::from_millis(14_999)), Ok(()));
        assert!(out(&mut r).1.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn keepalive_zero_never_closes_and_rumqttd_is_pinged_every_30_s() {
        let q = Queue::new();
        let ctx = context(&q, AclConfig::default(), None);
        let t0 = Instant::now();
        let mut r = relay(&ctx, 0, t0);
        let mut pings = 0;
        for _ in 0..4 {
            tokio::time::sleep_until(r.deadline()).await;
            assert_eq!(r.tick(Instant::now()), Ok(()));
            let (_, up) = out(&mut r);
            assert_eq!(up, [P5::PingReq(v5::PingReq)]);
            pings += 1;
        }
        assert_eq!((pings, Instant::now() - t0), (4, Duration::from_secs(120)));
        // An hour of silence later, still open.
        assert_eq!(r.tick(t0 + Duration::from_secs(3600)), Ok(()));
    }

    #[test]
    fn over_the_rate_a_publish_is_dropped_or_closes_or_slows_the_device_down() {
        let q = Queue::new();
        q.reader("#");
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(500);
        let one_per_s = |p| Some((1, 1, p));
        // drop: answered as if taken, never forwarded, counted.
        let ctx = context(&q, AclConfig::default(), one_per_s(RateLimitPolicy::Drop));
        let mut r = relay(&ctx, 0, t0);
        r.dev4(publish("local/a", QoS::AtLeastOnce, 1), t0).unwrap();
        r.dev4(publish("local/a", QoS::AtLeastOnce, 2), t1).unwrap();
        let (dev, up) = out(&mut r);
        assert_eq!(published(&up), [(1, Q5::AtLeastOnce)]);
        assert_eq!(dev, [puback(2)]);
        assert_eq!(metric(&ctx, r#"rate_limited_total{policy="drop"}"#), 1);
        // A second later the bucket has a token again.
        r.dev4(
            publish("local/a", QoS::AtLeastOnce, 3),
            t0 + Duration::from_secs(2),
        )
        .unwrap();
        assert_eq!(published(&out(&mut r).1), [(3, Q5::AtLeastOnce)]);
        // disconnect: the session ends.
        let ctx = context(
            &q,
            AclConfig::default(),
            one_per_s(RateLimitPolicy::Disconnect),
        );
        let mut r = relay(&ctx, 0, t0);
        r.dev4(publish("local/a", QoS::AtMostOnce, 0), t0).unwrap();
        assert_eq!(
            r.dev4(publish("local/a", QoS::AtMostOnce, 0), t1),
            Err(End::RateLimited)
        );
        // slow_down: forwarded, then the device is not read until it is under the rate.
        let ctx = context(
            &q,
            AclConfig::default(),
            one_per_s(RateLimitPolicy::SlowDown),
        );
        let mut r = relay(&ctx, 0, t0);
        r.dev4(publish("local/a", QoS::AtMostOnce, 0), t0).unwrap();
        assert!(r.reads_device());
        r.dev4(publish("local/a", QoS::AtMostOnce, 0), t1).unwrap();
        assert_eq!(published(&out(&mut r).1).len(), 2);
        assert!(!r.reads_device());
        let Next::Throttle(wait) = r.next_action() else {
            panic!("no throttle")
        };
        assert_eq!(wait, Duration::from_millis(500));
        assert!(matches!(r.next_action(), Next::Read));
        assert!(r.reads_device());
        assert_eq!(metric(&ctx, r#"rate_limited_total{policy="slow_down"}"#), 1);
        // The throttle is not silence: keepalive counts from its end.
        let mut r = relay(&ctx, 1, t0);
        r.throttle_over(t0 + Duration::from_secs(10));
        assert_eq!(r.deadline(), t0 + Duration::from_millis(11_500));
    }

    #[test]
    fn a_second_connect_or_a_packet_only_a_server_sends_is_a_protocol_violation() {
        let q = Queue::new();
        let ctx = context(&q, AclConfig::default(), None);
        let t0 = Instant::now();
        let mut r = relay(&ctx, 0, t0);
        let bad = [
            P4::Connect(v4::Connect::new("dev1")),
            P4::ConnAck(v4::ConnAck::new(v4::ConnectReturnCode::Success, false)),
            P4::SubAck(v4::SubAck::new(1, vec![])),
            P4::UnsubAck(v4::UnsubAck::new(1)),
            P4::PingResp,
            publish("a/+/b", QoS::AtMostOnce, 0),
            publish("", QoS::AtMostOnce, 0),
        ];
        for p in bad {
            let what = format!("{p:?}");
            assert_eq!(r.dev4(p, t0), Err(End::ProtocolViolation), "{what}");
        }
        // Nothing goes upstream, so rumqttd publishes the will.
        assert!(out(&mut r).1.is_empty());
        // DISCONNECT ends the session too, and goes upstream (rumqttd drops the will).
        assert_eq!(r.dev4(P4::Disconnect, t0), Err(End::Disconnect));
        assert!(matches!(&out(&mut r).1[..], [P5::Disconnect(_)]));
        // rumqttd closing its side ends it as well.
        let d = P5::Disconnect(v5::Disconnect::new(
            v5::DisconnectReasonCode::NormalDisconnection,
        ));
        assert_eq!(r.on_broker(d), Err(End::BrokerGone));
    }

    /// An MQTT 5 device with a receive maximum of 1: a live delivery waits while the front
    /// end's own retained delivery is unanswered, and goes when the device answers it.
    #[test]
    fn a_parked_delivery_goes_when_the_retained_delivery_ahead_of_it_is_answered() {
        let q = Queue::new();
        let ctx = context(&q, acl(&["#"], &["#"]), None);
        let t0 = Instant::now();
        let id = Identity {
            name: Some("dev1".into()),
            client_id: "dev1".into(),
        };
        let peer = Peer {
            v5: true,
            receive_max: 1,
            max_packet: None,
        };
        let mut r = Relay::new(ctx.clone(), id, "dev1".into(), None, (0, peer), 0, t0);
        assert!(ctx
            .ingest
            .admit_retain("local/r", &bytes::Bytes::from_static(b"kept"), 1, true));
        r.dev4(
            P4::Subscribe(v4::Subscribe::new("local/#", QoS::AtLeastOnce)),
            t0,
        )
        .unwrap();
        let pkid = match &out(&mut r).1[..] {
            [P5::Subscribe(s)] => s.pkid,
            up => panic!("{up:?}"),
        };
        r.on_broker(P5::SubAck(v5::SubAck {
            pkid,
            return_codes: vec![v5::SubscribeReasonCode::Success(Q5::AtLeastOnce)],
            properties: None,
        }))
        .unwrap();
        r.send_retained();
        let own = match &r.out.device[..] {
            [P5::SubAck(_), P5::Publish(p)] => p.pkid,
            dev => panic!("{dev:?}"),
        };
        r.out.device.clear();
        // A live delivery: no room while the retained one is unanswered.
        r.on_broker(delivery("local/live", QoS::AtLeastOnce, Q5::AtLeastOnce, 1))
            .unwrap();
        assert!(r.out.device.is_empty(), "{:?}", r.out.device);
        r.on_device(P5::PubAck(v5::PubAck::new(own, None)), t0)
            .unwrap();
        match &r.out.device[..] {
            [P5::Publish(p)] => assert_eq!((&p.topic[..], p.pkid), (&b"local/live"[..], 1)),
            dev => panic!("the parked delivery did not go: {dev:?}"),
        }
    }

    #[test]
    fn a_full_journal_stops_the_device_until_the_entry_is_appended_then_its_ticket_counts() {
        let q = Queue::full();
        q.reader("#");
        let ctx = context(&q, AclConfig::default(), None);
        let t0 = Instant::now();
        let mut r = relay(&ctx, 0, t0);
        assert!(r.reads_device());
        r.dev4(publish("up/a", QoS::AtLeastOnce, 1), t0).unwrap();
        // Still forwarded (rumqttd's answer is held anyway), but nothing more is read.
        assert_eq!(published(&out(&mut r).1), [(1, Q5::AtLeastOnce)]);
        assert!(!r.reads_device());
        let Next::Append(entry) = r.next_action() else {
            panic!("no entry to append")
        };
        assert_eq!((entry.topic.as_str(), entry.queue), ("up/a", true));
        // While the driver waits for room, still nothing is read.
        assert!(matches!(r.next_action(), Next::Read));
        assert!(!r.reads_device());
        r.appended(7);
        assert!(r.reads_device());
        // rumqttd's PUBACK waits for that ticket.
        r.on_broker(up_puback(1)).unwrap();
        r.durable(6);
        assert!(out(&mut r).0.is_empty());
        r.durable(7);
        assert_eq!(out(&mut r).0, [puback(1)]);
    }
}
