//! The bridge to the cloud broker: queued records up (QoS 1 over TLS, MQTT 3.1.1 or 5),
//! commands down.
//!
//! # States
//! ```text
//!            connect ok (CONNACK)
//! Offline ───────────────────────────▶ Online ──── link error / DISCONNECT ───┐
//!   ▲  │ connect failed                  │                                     │
//!   │  └──── Backoff (exp + jitter) ◀────┴─────────────────────────────────────┘
//!   └──────────────────────────────────────────────── shutdown: drain in-flight, offline status
//! ```
//!
//! # Invariants
//! - The queue is the source of truth. A record is acknowledged to the store only when the
//!   cloud PUBACKed the PUBLISH that carried it. Live records come from the store's memory;
//!   only a backlog is read from disk. The pump owns the connection ([`link`]): it assigns
//!   each PUBLISH its packet id and maps the PUBACK back to the record.
//! - One pass of the pump encodes everything the window and the pacing allow, then writes it
//!   in one flush.
//! - Every session starts from the queue head on a fresh connection: nothing stale from the
//!   previous session is sent ahead of the replay, so the first delivery of each record is in
//!   per-topic order. Records in flight when a link drops are sent again: delivery is at
//!   least once. MQTT 3.1.1 sessions are clean; MQTT 5 ones (`cloud.protocol = "5"`) are
//!   clean on the first connection of the process and resumed after (`cloud.session_expiry`),
//!   for the downlink's subscriptions only: the broker's session never holds the uplink.
//! - At most `cloud.max_inflight` publishes are unacknowledged at a time (MQTT 5: nor more
//!   than the broker's `receive_maximum`).
//! - MQTT 5 PUBACK error reasons ([`Refusal`]): a permanent one makes the record a dead letter
//!   ([`crate::store::dead`], durable before the record leaves the queue) and the records
//!   behind it go on; a transient one (0x97 quota exceeded, ...) ends the session with the
//!   record still queued, and the next session, after a backoff, sends it first again. A
//!   record too large for the link is dropped (`too_large`) under MQTT 3.1.1 and a dead
//!   letter (0x95) under MQTT 5. Dead letters are logged at most every 10 s.
//! - Replay is paced by token buckets; live records of topics with no backlog are not held
//!   behind it (see [`lanes`]).
//! - The pump's decisions (which record next, the window, what a PUBACK does) are made
//!   without I/O by [`flight`]; the pump is its driver (store reads, the link, the clock).
//! - Downlink: messages on the `downlink.subscribe` filters are republished into the local
//!   broker on a link of their own, which does not pass [`crate::ingest`]; ingest also
//!   refuses to queue anything whose cloud topic those filters match, so nothing bounces
//!   between the brokers.
//! - Sparkplug B (`[sparkplug] enabled`, [`sparkplug`]): the same queue, pump and window.
//!   A record becomes Sparkplug only as it is sent, still one QoS 1 PUBLISH per record (or
//!   none, acknowledged at once); a session's own births go first, at QoS 0, and carry no
//!   record; the will is the connection's NDEATH instead of the retained `offline` status;
//!   while a primary host is awaited the pump sends nothing.

pub mod config;
pub mod flight;
pub mod lanes;
pub mod link;
pub mod metrics;
pub mod sparkplug;
pub mod tls;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttd::local::LinkTx;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

use self::config::{CloudConfig, DownlinkConfig};
use crate::component::{Ctx, Running};
use crate::pacing::{Backoff, TokenBucket};
use crate::store::metrics::DropReason;
use crate::store::{Record, Store};
use crate::watchdog::Heartbeat;
use flight::{Flight, Lane, Need, Schedule, Sink};
use lanes::Lanes;
use link::{Incoming, Link, LinkError, LinkOptions, Message, Props, Protocol, Will};
use metrics::CloudMetrics;
use sparkplug::{Encoded, Heard, Uplink};

/// How many records one store read brings in per lane.
const READ_AHEAD: usize = 1024;

/// Why a session ended abnormally. The bridge counts it, backs off and reconnects.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// TCP, TLS or MQTT failure, a refused CONNECT, or the broker closing the connection.
    #[error("cloud connection: {0}")]
    Link(#[from] LinkError),
    /// Reading records failed.
    #[error("queue: {0}")]
    Store(#[from] crate::store::StoreError),
    /// A blocking store task panicked or was cancelled.
    #[error("queue task: {0}")]
    Join(#[from] tokio::task::JoinError),
    /// The Sparkplug primary host said it is offline: the session ends (NDEATH sent) and
    /// the next one waits for it to come back.
    #[error("Sparkplug primary host went offline")]
    HostOffline,
    /// An MQTT 5 PUBACK refused a record for a reason that may pass (0x97 quota exceeded,
    /// 0x80 unspecified, ...): the session ends, the record stays queued and the next session
    /// sends it again first, after a backoff.
    #[error("cloud refused a record for now (PUBACK reason 0x{0:02x}); retrying after a backoff")]
    Refused(u8),
}

/// What an MQTT 5 PUBACK error reason code means for the record it refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The broker will never take this message: it becomes a dead letter.
    Permanent,
    /// It may take it later: the record is sent again after a backoff.
    Transient,
}

impl Refusal {
    /// How a PUBACK reason code `>= 0x80` is treated. Permanent: 0x83 implementation
    /// specific (the broker will not accept this PUBLISH), 0x87 not authorized, 0x90 topic
    /// name invalid, 0x99 payload format invalid, and 0x95 packet too large (set by the
    /// bridge itself for a record above the server's `maximum_packet_size`). Everything
    /// else (0x80 unspecified, 0x91 packet id in use, 0x97 quota exceeded, codes MQTT 5 does
    /// not define) is transient.
    pub fn of(code: u8) -> Refusal {
        match code {
            0x83 | 0x87 | 0x90 | 0x95 | 0x99 => Refusal::Permanent,
            _ => Refusal::Transient,
        }
    }
}

/// The reason code a record too large for the link is dead-lettered with (MQTT 5).
pub const PACKET_TOO_LARGE: u8 = 0x95;

/// What the bridge takes besides `[cloud]`, `[downlink]` and the context: the queue it
/// drains, its handles, and values of other sections computed once.
pub struct BridgeDeps {
    /// The queue.
    pub store: Arc<Store>,
    /// The cloud link's metric families (the gateway shows them with or without a cloud).
    pub metrics: Arc<CloudMetrics>,
    /// The broker link the downlink publishes on.
    pub downlink: LinkTx,
    /// Beaten every time round (the systemd watchdog).
    pub heartbeat: Heartbeat,
    /// Expanded `uplink.cloud_prefix`: cloud topic = this + local topic.
    pub cloud_prefix: String,
    /// `gateway.shutdown_grace`: how long in-flight records may take at shutdown.
    pub shutdown_grace: Duration,
    /// The Sparkplug edge node, when `[sparkplug]` is enabled.
    pub sparkplug: Option<Uplink>,
}

/// Everything the bridge needs, built once: every session borrows it (nothing of `[cloud]`
/// is copied per reconnect).
pub struct Bridge {
    cloud: CloudConfig,
    /// Where every session dials and what its CONNECT says, from `[cloud]`.
    link_options: LinkOptions,
    shutdown_grace: Duration,
    local_prefix: String,
    tls: Arc<rustls::ClientConfig>,
    store: Arc<Store>,
    metrics: Arc<CloudMetrics>,
    downlink: LinkTx,
    heartbeat: Heartbeat,
    cloud_prefix: String,
    status_topic: String,
    downlink_filters: Vec<String>,
    strip_prefix: String,
    /// Taken by each session for its duration.
    sparkplug: Option<Uplink>,
    /// `cloud.protocol`.
    protocol: Protocol,
    /// The gateway id, a user property of every MQTT 5 PUBLISH.
    gateway_id: String,
    /// A session connected since the process started: later ones resume the MQTT 5 session.
    resumable: bool,
    /// The last session ended with a transient refusal: the backoff is reset only once a
    /// record is acknowledged again, so a broker over its quota is retried ever more slowly.
    refused: bool,
    /// When a dead letter was last logged, and how many were made since without a line.
    dead_log: (Option<Instant>, u64),
    /// Records refused for good in the packets just read, made dead letters together (one
    /// fsync) before the pump goes on.
    dead_pending: Vec<(u64, u8)>,
}

/// Dead letters are logged at most once per this (with the count since the last line).
const DEAD_LOG_EVERY: Duration = Duration::from_secs(10);

impl Bridge {
    /// Builds the bridge from `[cloud]` and `[downlink]`; fails if the TLS material is
    /// unusable.
    pub fn build(
        cloud: &CloudConfig,
        downlink: &DownlinkConfig,
        ctx: &Ctx,
        deps: BridgeDeps,
    ) -> Result<Bridge, crate::tls::TlsError> {
        let tls = tls::client_config(cloud)?;
        let status_topic = ctx.expand(&cloud.status_topic);
        let client_id = if cloud.client_id.is_empty() {
            ctx.gateway_id.clone()
        } else {
            cloud.client_id.clone()
        };
        // Validation refused any other value; 3.1.1 is the default.
        let protocol = Protocol::from_config(&cloud.protocol).unwrap_or_default();
        Ok(Bridge {
            protocol,
            gateway_id: ctx.gateway_id.clone(),
            resumable: false,
            refused: false,
            dead_log: (None, 0),
            dead_pending: Vec::new(),
            link_options: LinkOptions {
                host: cloud.host.clone(),
                port: cloud.port,
                client_id,
                keepalive: cloud.keepalive,
                login: (!cloud.username.is_empty())
                    .then(|| (cloud.username.clone(), cloud.password.clone())),
                will: Some(Will {
                    topic: status_topic.clone(),
                    payload: b"offline".to_vec(),
                    retain: true,
                }),
                max_packet_size: cloud.max_packet_size,
                timeout: cloud.connect_timeout.max(Duration::from_secs(1)),
                protocol,
                session_expiry: cloud.session_expiry,
                clean_start: true,
            },
            shutdown_grace: deps.shutdown_grace,
            local_prefix: downlink.local_prefix.clone(),
            tls,
            store: deps.store,
            metrics: deps.metrics,
            downlink: deps.downlink,
            heartbeat: deps.heartbeat,
            cloud_prefix: deps.cloud_prefix,
            status_topic,
            downlink_filters: downlink.subscribe.iter().map(|f| ctx.expand(f)).collect(),
            strip_prefix: ctx.expand(&downlink.strip_prefix),
            sparkplug: deps.sparkplug,
            cloud: cloud.clone(),
        })
    }

    /// Starts the bridge task under `stop`, in a span `cloud`: it ends once `stop` is
    /// cancelled and the last session has drained (within `shutdown_grace`).
    pub fn start(self, stop: CancellationToken) -> Running {
        let task = tokio::spawn(
            self.run(stop.clone())
                .instrument(tracing::info_span!("cloud")),
        );
        Running::tasks("cloud", stop, vec![task])
    }

    /// Runs until `stop` is cancelled and the last session has drained.
    async fn run(mut self, stop: CancellationToken) {
        let c = &self.cloud;
        let mut backoff = Backoff::new(c.reconnect_min, c.reconnect_max);
        loop {
            let started = Instant::now();
            self.heartbeat.beat();
            match self.session(&mut backoff, &stop).await {
                Ok(()) => break,
                Err(e) => {
                    self.metrics.cloud_reconnects.inc();
                    self.metrics.cloud_connected.set(0);
                    self.metrics.link.down(Some(e.to_string()));
                    warn!(error = %e, up_for = ?started.elapsed(), "cloud link down; records stay queued");
                }
            }
            let delay = backoff.next_delay();
            debug!(?delay, "reconnecting after backoff");
            // Waiting out a backoff is alive, not stalled: keep the heartbeat going.
            let until = tokio::time::Instant::now() + delay;
            let mut beat = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => break,
                    _ = beat.tick() => self.heartbeat.beat(),
                    _ = stop.cancelled() => {
                        self.metrics.cloud_connected.set(0);
                        self.metrics.link.down(None);
                        info!("bridge stopped");
                        return;
                    }
                }
            }
        }
        self.metrics.cloud_connected.set(0);
        self.metrics.link.down(None);
        info!("bridge stopped");
    }

    async fn session(
        &mut self,
        backoff: &mut Backoff,
        stop: &CancellationToken,
    ) -> Result<(), BridgeError> {
        // A Sparkplug edge node's will is this connection's NDEATH.
        if let Some(up) = self.sparkplug.as_mut() {
            let ndeath = up.connecting(crate::clock::now_ms());
            self.link_options.will = Some(Will {
                topic: ndeath.topic,
                payload: ndeath.payload,
                retain: false,
            });
        }
        // MQTT 5: a new session only for the first connection of the process (the broker may
        // keep subscriptions of an older configuration); later ones resume it, so commands
        // sent during a short outage are still delivered.
        self.link_options.clean_start = !self.resumable || self.cloud.session_expiry.is_zero();
        // Dial, handshake TLS, CONNECT and wait for CONNACK.
        let opts = &self.link_options;
        let mut link = tokio::select! {
            r = link::connect(opts, self.tls.clone()) => r?,
            _ = stop.cancelled() => return Ok(()),
        };
        self.resumable = true;
        if !self.refused {
            backoff.reset();
        }
        self.metrics.cloud_connected.set(1);
        self.metrics.link.connected(crate::clock::now_ms());
        let server = link.server();
        info!(host = %opts.host, port = opts.port, protocol = ?opts.protocol,
            session_present = server.session_present, receive_max = ?server.receive_max,
            max_packet = ?server.max_packet, "cloud connected");
        let mut sp = self.sparkplug.take();
        let result = self.online(&mut link, sp.as_mut(), stop).await;
        if let Some(up) = sp.as_mut() {
            up.disconnected();
        }
        self.sparkplug = sp;
        self.metrics.cloud_connected.set(0);
        result
    }

    async fn online<S>(
        &mut self,
        link: &mut Link<S>,
        sp: Option<&mut Uplink>,
        stop: &CancellationToken,
    ) -> Result<(), BridgeError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let mut flight = Flight::default();
        // Refusals read in an earlier session: those records are still queued and sent again.
        self.dead_pending.clear();
        let result = self.pump(link, &mut flight, sp, stop).await;
        // Whatever ended the session: remove what was acknowledged, count what was not.
        if let Err(e) = self.remove(flight.acked()).await {
            warn!(error = %e, "removing acknowledged records failed; they will be sent again");
        }
        if result.is_err() {
            self.metrics.resent.inc_by(flight.unacked() as u64);
        }
        result
    }

    async fn pump<S>(
        &mut self,
        link: &mut Link<S>,
        flight: &mut Flight,
        mut sp: Option<&mut Uplink>,
        stop: &CancellationToken,
    ) -> Result<(), BridgeError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let c = &self.cloud;
        let mut filters = self.downlink_filters.clone();
        if let Some(up) = sp.as_deref() {
            filters.extend(up.filters());
        }
        // SUBSCRIBE before the retained `online` (or the births): a cloud application that
        // waits for them knows the gateway takes its commands (a broker handles one
        // connection's packets in order).
        if !filters.is_empty() {
            link.subscribe(&filters)?;
        }
        match sp.as_deref_mut() {
            Some(up) => {
                for m in up.connected(crate::clock::now_ms()) {
                    self.birth(link, &m);
                }
            }
            None => {
                if let Some(pkid) = link.publish("", &self.status_topic, b"online", true) {
                    flight.sent_other(pkid);
                }
            }
        }
        link.flush().await?;

        // Split the queue into backlog and live at this instant.
        let store = self.store.clone();
        let split = Instant::now();
        let lanes = tokio::task::spawn_blocking(move || {
            let live_start = store.next_seq();
            let head = store.head().unwrap_or(live_start);
            let counts = store.topic_counts(head, live_start)?;
            Ok::<_, BridgeError>(Lanes::new(head, live_start, counts))
        })
        .await??;
        let live = LiveLane(self.store.clone());
        live.at(lanes.live_next());
        if !lanes.merged() {
            info!(backlog = self.store.records(), counted_in = ?split.elapsed(), "replaying backlog");
        }
        let now = Instant::now();
        let msg_bucket = TokenBucket::new(c.replay_msgs_per_sec as u64, now);
        let byte_bucket = TokenBucket::new(c.replay_bytes_per_sec, now);
        // MQTT 5: the broker's receive maximum caps the window too.
        let window = link
            .server()
            .receive_max
            .map_or(c.max_inflight, |r| r.min(c.max_inflight))
            .max(1);
        let mut schedule = Schedule::new(lanes, window as usize, msg_bucket, byte_bucket);
        let mut appended = self.store.subscribe();
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        // MQTT 5: a server keep alive replaces ours.
        let period = link
            .server()
            .keepalive
            .unwrap_or(c.keepalive)
            .max(Duration::from_secs(1));
        let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let mut rate_window = (Instant::now(), 0u64);
        let mut pace_until: Option<Instant> = None;
        let mut stopping: Option<Instant> = None;
        // Records the link could not send (MQTT 5: above the server's maximum packet size).
        let mut too_large: Vec<u64> = Vec::new();

        loop {
            // Hand the link as much as the window and the pacing allow.
            // A Sparkplug node waiting for its primary host sends nothing (the queue keeps it).
            let holding = sp.as_deref().is_some_and(Uplink::holding);
            if stopping.is_some() {
                if flight.is_empty() {
                    break;
                }
            } else if !holding {
                loop {
                    let mut wire = Wire {
                        link: &mut *link,
                        bridge: &*self,
                        live: &live,
                        replayed: &mut rate_window.1,
                        sparkplug: sp.as_deref_mut(),
                        too_large: &mut too_large,
                    };
                    let store = &self.store;
                    let need = schedule.fill(flight, Instant::now, || store.next_seq(), &mut wire);
                    self.dead_pending
                        .extend(too_large.drain(..).map(|seq| (seq, PACKET_TOO_LARGE)));
                    self.dead_letters().await?;
                    match need {
                        Need::Live(from) => schedule.live_read(self.read(from, u64::MAX).await?),
                        Need::Replay(from, to) => {
                            if schedule.replay_read(to, self.read(from, to).await?) {
                                info!("backlog replayed; lanes merged");
                            }
                        }
                        Need::Pace(until) => {
                            pace_until = Some(until);
                            break;
                        }
                        Need::Wait => break,
                    }
                }
            }

            // Everything encoded above (and any acks owed to the broker) goes out in one write.
            link.flush().await?;

            let pace = pace_until.take();
            tokio::select! {
                inc = link.next() => {
                    let mut inc = Some(inc?);
                    // Take every packet already read before filling the window again.
                    while let Some(i) = inc {
                        self.incoming(i, flight, &filters, link, sp.as_deref_mut()).await?;
                        inc = link.try_next()?;
                    }
                    self.dead_letters().await?;
                }
                _ = keepalive.tick() => link.ping()?,
                _ = appended.changed(), if stopping.is_none() => {}
                _ = sleep_until(pace), if pace.is_some() => {}
                _ = tick.tick() => {
                    self.heartbeat.beat();
                    if !flight.acked().is_empty() {
                        self.remove(flight.acked()).await?;
                    }
                    let el = rate_window.0.elapsed();
                    if el >= Duration::from_secs(1) {
                        self.metrics.replay_rate.set(rate_window.1 as f64 / el.as_secs_f64());
                        rate_window = (Instant::now(), 0);
                    }
                    if let Some(deadline) = stopping {
                        if Instant::now() >= deadline {
                            warn!(in_flight = flight.len(),
                                "shutdown grace over with records unacknowledged; they stay queued");
                            break;
                        }
                    }
                }
                _ = stop.cancelled(), if stopping.is_none() => {
                    info!(in_flight = flight.len(), "bridge draining in-flight records");
                    stopping = Some(Instant::now() + self.shutdown_grace);
                }
            }
        }
        self.remove(flight.acked()).await?;
        // Orderly goodbye: the retained status says offline, or the NDEATH is sent by hand
        // (the will only fires on abrupt loss).
        match sp.as_deref() {
            Some(up) => {
                let ndeath = up.goodbye(crate::clock::now_ms());
                link.publish("", &ndeath.topic, &ndeath.payload, false);
            }
            None => {
                link.publish("", &self.status_topic, b"offline", true);
            }
        }
        link.disconnect(0);
        if link.flush().await.is_ok() {
            link.close().await;
        }
        Ok(())
    }

    /// Acts on one packet from the broker (`filters`: what the session subscribed to).
    async fn incoming<S>(
        &mut self,
        i: Incoming,
        flight: &mut Flight,
        filters: &[String],
        link: &mut Link<S>,
        sp: Option<&mut Uplink>,
    ) -> Result<(), BridgeError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        match i {
            Incoming::PubAck(pkid, code) if code < 0x80 => {
                self.refused = false;
                if flight.puback(pkid) {
                    self.remove(flight.acked()).await?;
                }
            }
            Incoming::PubAck(pkid, code) => match (flight.refused(pkid), Refusal::of(code)) {
                (Some(seq), Refusal::Permanent) => self.dead_pending.push((seq, code)),
                (Some(seq), Refusal::Transient) => {
                    self.refused = true;
                    self.metrics
                        .refused_for_now
                        .get_or_create(&crate::metrics::label(
                            "reason",
                            crate::store::dead::reason_name(code),
                        ))
                        .inc();
                    warn!(
                        seq,
                        reason = format_args!("0x{code:02x}"),
                        "cloud refused a record for now; it stays queued"
                    );
                    // Refusals for good read before it are kept first.
                    self.dead_letters().await?;
                    // The broker publishes the will: the gateway is away for a backoff.
                    link.disconnect(0x04);
                    let _ = link.flush().await;
                    return Err(BridgeError::Refused(code));
                }
                (None, _) => {
                    warn!(
                        reason = format_args!("0x{code:02x}"),
                        "cloud refused a PUBLISH that carried no record (the status message)"
                    );
                }
            },
            Incoming::Publish(p) => match sp {
                None => self.downlink(p),
                Some(up) => match up.heard(&p.topic, &p.payload, crate::clock::now_ms()) {
                    Heard::NotOurs => self.downlink(p),
                    Heard::Nothing => {}
                    Heard::Births(births) => {
                        for m in &births {
                            self.birth(link, m);
                        }
                    }
                    Heard::Local(writes) => {
                        for (topic, payload) in writes {
                            self.publish_local(topic, payload);
                        }
                    }
                    Heard::HostOffline => {
                        let ndeath = up.goodbye(crate::clock::now_ms());
                        link.publish("", &ndeath.topic, &ndeath.payload, false);
                        link.disconnect(0);
                        let _ = link.flush().await;
                        return Err(BridgeError::HostOffline);
                    }
                },
            },
            Incoming::SubAck(ok) => {
                for (f, _) in filters.iter().zip(ok).filter(|(_, ok)| !ok) {
                    warn!(filter = %f, "cloud broker refused the subscription");
                }
            }
            Incoming::Other => {}
        }
        Ok(())
    }

    /// Queues a birth the session adds of its own, at QoS 0 (it carries no record).
    fn birth<S>(&self, link: &mut Link<S>, m: &crate::sparkplug::Message)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        if !link.publish_qos0(&m.topic, &m.payload, false) {
            error!(topic = %m.topic, bytes = m.payload.len(), max = self.cloud.max_packet_size,
                "Sparkplug birth larger than cloud.max_packet_size not sent; raise it");
        }
    }

    /// Queues one record on the link: its packet id, or `Err(None)` (and the record dropped,
    /// counted and logged) when it is larger than `cloud.max_packet_size`, which the cloud
    /// would refuse on every resend.
    ///
    /// MQTT 5: the PUBLISH carries `message_expiry_interval` (what is left of `store.max_age`
    /// for the record) and the user properties `gateway` (the gateway id) and `accepted_at`
    /// (the record's accept time, RFC 3339 UTC with milliseconds). A record above the
    /// server's maximum packet size is not dropped but left to the caller (`Err(Some(seq))`)
    /// to become a dead letter.
    fn send<S>(&self, link: &mut Link<S>, seq: u64, rec: &Record) -> Result<u16, Option<u64>>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let sent = match self.protocol {
            Protocol::V311 => {
                link.publish(&self.cloud_prefix, &rec.topic, &rec.payload, rec.retain)
            }
            Protocol::V5 => {
                let accepted = humantime::format_rfc3339_millis(
                    std::time::UNIX_EPOCH + Duration::from_millis(rec.ts_ms),
                )
                .to_string();
                let user = [
                    ("gateway", self.gateway_id.as_str()),
                    ("accepted_at", accepted.as_str()),
                ];
                let props = Props {
                    expiry: message_expiry(self.store.max_age(), rec.ts_ms, crate::clock::now_ms()),
                    user: &user,
                };
                link.publish_with(
                    &self.cloud_prefix,
                    &rec.topic,
                    &rec.payload,
                    rec.retain,
                    &props,
                )
            }
        };
        match sent {
            Some(pkid) => Ok(pkid),
            None if self.protocol == Protocol::V5 => Err(Some(seq)),
            None => {
                self.too_large(seq, rec, rec.payload.len());
                Err(None)
            }
        }
    }

    /// The records in `dead_pending` will never be accepted: they move to the store's dead
    /// letters (one fsync for all), off the queue, and the records behind them go on. Logged
    /// at most once per [`DEAD_LOG_EVERY`], with how many were made since.
    async fn dead_letters(&mut self) -> Result<(), BridgeError> {
        if self.dead_pending.is_empty() {
            return Ok(());
        }
        let refused = std::mem::take(&mut self.dead_pending);
        let store = self.store.clone();
        let kept = tokio::task::spawn_blocking(move || store.dead_letter_all(&refused)).await??;
        let Some(d) = kept.last() else {
            return Ok(());
        };
        let (last, since) = &mut self.dead_log;
        *since += kept.len() as u64;
        if last.is_none_or(|t| t.elapsed() >= DEAD_LOG_EVERY) {
            // An operator must look at them: ERROR, but a refused topic cannot flood the log.
            error!(seq = d.seq, topic = %d.topic, bytes = d.size,
                reason = format_args!("0x{:02x}", d.reason), dead_letters = *since,
                "cloud refused records for good; kept as dead letters (GET /api/v1/dead-letters)");
            *last = Some(Instant::now());
            *since = 0;
        }
        Ok(())
    }

    /// Record `seq` cannot be sent: `bytes` on the wire exceed `cloud.max_packet_size`.
    /// It is dropped, counted and logged.
    fn too_large(&self, seq: u64, rec: &Record, bytes: usize) {
        self.store.metrics().count_drop(DropReason::TooLarge, 1);
        self.store.ack(&[seq]);
        error!(seq, topic = %rec.topic, bytes, max = self.cloud.max_packet_size,
            "record larger than cloud.max_packet_size dropped");
    }

    /// Reads up to `READ_AHEAD` records in `[from, to)`: recent ones from the store's memory
    /// at once, a backlog from disk off the runtime threads.
    async fn read(&self, from: u64, to: u64) -> Result<VecDeque<(u64, Record)>, BridgeError> {
        let recs = match self.store.read_tail(from, READ_AHEAD) {
            Some(recs) => recs,
            None => {
                let store = self.store.clone();
                tokio::task::spawn_blocking(move || store.read_from(from, READ_AHEAD)).await??
            }
        };
        Ok(recs.into_iter().filter(|(s, _)| *s < to).collect())
    }

    /// Tells the store what the cloud acknowledged (memory only; the journal persists the
    /// cursor and removes whole batches).
    async fn remove(&self, acked: &mut Vec<u64>) -> Result<(), BridgeError> {
        if acked.is_empty() {
            return Ok(());
        }
        self.store.ack(acked);
        acked.clear();
        Ok(())
    }

    fn downlink(&mut self, p: Message) {
        let topic = p.topic.as_str();
        if !self
            .downlink_filters
            .iter()
            .any(|f| crate::topic::matches(f, topic))
        {
            debug!(topic, "cloud message outside the downlink filters ignored");
            return;
        }
        let rest = topic.strip_prefix(&self.strip_prefix).unwrap_or(topic);
        let local = format!("{}{}", self.local_prefix, rest);
        self.publish_local(local, p.payload.to_vec());
    }

    /// Publishes a cloud message (or a Sparkplug write) on the local broker.
    fn publish_local(&mut self, local: String, payload: Vec<u8>) {
        match self.downlink.try_publish(local.clone(), payload) {
            Ok(_) => {
                self.metrics.downlink_messages.inc();
                debug!(local, "downlink");
            }
            Err(e) => warn!(error = %e, local, "downlink message could not be published locally"),
        }
    }
}

/// The pump's side of [`Sink`]: PUBLISHes into the link's write buffer, counted per lane.
struct Wire<'a, S> {
    link: &'a mut Link<S>,
    bridge: &'a Bridge,
    live: &'a LiveLane,
    /// Replay records sent in the current rate window.
    replayed: &'a mut u64,
    /// The Sparkplug edge node, if the uplink is one.
    sparkplug: Option<&'a mut Uplink>,
    /// Records too large for the link, to become dead letters once the pass is over.
    too_large: &'a mut Vec<u64>,
}

impl<S> Sink for Wire<'_, S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    fn send(&mut self, lane: Lane, seq: u64, rec: &Record) -> Option<u16> {
        let encoded = match self.sparkplug.as_deref_mut() {
            Some(up) => up.encode(rec, lane == Lane::Replay, crate::clock::now_ms()),
            None => Encoded::Plain,
        };
        let pkid = match encoded {
            Encoded::Plain => match self.bridge.send(self.link, seq, rec) {
                Ok(pkid) => pkid,
                Err(dead) => {
                    self.too_large.extend(dead);
                    return None;
                }
            },
            Encoded::Sparkplug(births, carrier) => {
                for m in &births {
                    self.bridge.birth(self.link, m);
                }
                let Some(m) = carrier else {
                    // Nothing to say for it (a status the births told already).
                    self.bridge.store.ack(&[seq]);
                    return None;
                };
                match self.link.publish("", &m.topic, &m.payload, false) {
                    Some(pkid) => pkid,
                    None => {
                        if let Some(up) = self.sparkplug.as_deref_mut() {
                            up.not_sent();
                        }
                        self.bridge.too_large(seq, rec, m.payload.len());
                        return None;
                    }
                }
            }
        };
        match lane {
            Lane::Live => {
                self.bridge.metrics.sent_live.inc();
            }
            Lane::Replay => {
                self.bridge.metrics.sent_replay.inc();
                *self.replayed += 1;
            }
        }
        Some(pkid)
    }

    fn live_at(&mut self, next: u64) {
        self.live.at(next);
    }
}

/// What is left of `max_age` for a record accepted at `ts_ms`, at `now_ms`, in whole seconds
/// rounded up and at least 1 (a record past it is dropped by the store, not here); `None`
/// when `store.max_age` is 0 (records never expire).
fn message_expiry(max_age: Duration, ts_ms: u64, now_ms: u64) -> Option<u32> {
    if max_age.is_zero() {
        return None;
    }
    let left = (max_age.as_millis() as u64).saturating_sub(now_ms.saturating_sub(ts_ms));
    Some(left.div_ceil(1000).clamp(1, u32::MAX as u64) as u32)
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at.into()).await;
    }
}

/// Tells the store where the live lane stands for the journal's live window, and that there
/// is no cloud session any more once the session's pump ends (however it ends).
struct LiveLane(Arc<Store>);

impl LiveLane {
    fn at(&self, next: u64) {
        self.0.set_live(Some(next.max(1)));
    }
}

impl Drop for LiveLane {
    fn drop(&mut self) {
        self.0.set_live(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_expiry_is_what_is_left_of_max_age_rounded_up() {
        let day = Duration::from_secs(86_400);
        assert_eq!(message_expiry(Duration::ZERO, 0, 5_000), None);
        assert_eq!(message_expiry(day, 10_000, 10_000), Some(86_400));
        assert_eq!(message_expiry(day, 10_000, 11_500), Some(86_399));
        // Past max_age (the store drops it soon): still a valid, minimal interval.
        assert_eq!(message_expiry(day, 0, 200_000_000), Some(1));
        // A clock that went back: no more than max_age.
        assert_eq!(message_expiry(day, 20_000, 10_000), Some(86_400));
    }

    #[test]
    fn refusals_that_will_never_pass_are_permanent_and_the_rest_are_retried() {
        for code in [0x83, 0x87, 0x90, 0x95, 0x99] {
            assert_eq!(Refusal::of(code), Refusal::Permanent, "0x{code:02x}");
        }
        for code in [0x80, 0x91, 0x97, 0xA0] {
            assert_eq!(Refusal::of(code), Refusal::Transient, "0x{code:02x}");
        }
    }
}
