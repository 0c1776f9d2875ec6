//! The bridge to the cloud broker: queued records up (QoS 1 over TLS), commands down.
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
//!   only a backlog is read from disk. rumqttc has no per-message completion, so the bridge keeps the
//!   order in which it handed publishes to rumqttc, maps each `Outgoing::Publish(pkid)` event
//!   (emitted in that order) to its record, and each `PubAck(pkid)` back to the record.
//! - Every session starts from the queue head with a fresh rumqttc client and event loop (clean
//!   session): nothing stale from the previous session is sent ahead of the replay, so the
//!   first delivery of each record is in per-topic order. Records in flight when a link drops
//!   are sent again: delivery is at least once.
//! - At most `cloud.max_inflight` publishes are unacknowledged at a time.
//! - Replay is paced by token buckets; live records of topics with no backlog are not held
//!   behind it (see [`lanes`]).
//! - Downlink: messages on the `downlink.subscribe` filters are republished into the local
//!   broker on a link of their own, which does not pass [`crate::ingest`]; ingest also
//!   refuses to queue anything whose cloud topic those filters match, so nothing bounces
//!   between the brokers.

pub mod lanes;
pub mod pacing;
pub mod tls;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS,
    TlsConfiguration, Transport,
};
use rumqttd::local::LinkTx;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::Settings;
use crate::metrics::Metrics;
use crate::store::{Record, Store};
use crate::watchdog::Heartbeat;
use lanes::Lanes;
use pacing::{Backoff, TokenBucket};

/// How many records one store read brings in per lane.
const READ_AHEAD: usize = 1024;
/// Acknowledged records are removed from the store in batches of this many (or every tick).
const ACK_BATCH: usize = 512;

/// Why a session ended abnormally. The bridge counts it, backs off and reconnects.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// TCP, TLS or MQTT failure, including a refused CONNECT.
    #[error("cloud connection: {0}")]
    Connection(Box<ConnectionError>),
    /// The broker sent DISCONNECT.
    #[error("cloud broker sent DISCONNECT")]
    Disconnected,
    /// rumqttc's request channel refused a request (event loop gone).
    #[error("cloud client: {0}")]
    Client(#[from] rumqttc::ClientError),
    /// Reading records failed.
    #[error("queue: {0}")]
    Store(#[from] crate::store::StoreError),
    /// A blocking store task panicked or was cancelled.
    #[error("queue task: {0}")]
    Join(#[from] tokio::task::JoinError),
}

impl From<ConnectionError> for BridgeError {
    fn from(e: ConnectionError) -> Self {
        BridgeError::Connection(Box::new(e))
    }
}

/// Everything the bridge needs, built once.
pub struct Bridge {
    settings: Settings,
    tls: Arc<rustls::ClientConfig>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    downlink: LinkTx,
    stop: CancellationToken,
    heartbeat: Heartbeat,
    cloud_prefix: String,
    status_topic: String,
    downlink_filters: Vec<String>,
    strip_prefix: String,
}

/// A record handed to the cloud, waiting for its PUBACK.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    seq: u64,
}

/// Per-session delivery bookkeeping.
#[derive(Default)]
struct Flight {
    /// Publishes handed to rumqttc, in call order, not yet given a pkid (`None`: not a
    /// queued record, e.g. the status message).
    handed: VecDeque<Option<InFlight>>,
    /// pkid -> record, sent and awaiting PUBACK.
    inflight: HashMap<u16, InFlight>,
    /// PUBACKed records not yet removed from the store.
    acked: Vec<u64>,
}

impl Flight {
    fn len(&self) -> usize {
        self.handed.len() + self.inflight.len()
    }
}

impl Bridge {
    /// Builds the bridge; fails if the TLS material is unusable.
    pub fn build(
        settings: &Settings,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        downlink: LinkTx,
        stop: CancellationToken,
        heartbeat: Heartbeat,
    ) -> Result<Bridge, tls::TlsError> {
        let tls = tls::client_config(&settings.cloud)?;
        Ok(Bridge {
            tls,
            store,
            metrics,
            downlink,
            stop,
            heartbeat,
            cloud_prefix: settings.expand(&settings.uplink.cloud_prefix),
            status_topic: settings.expand(&settings.cloud.status_topic),
            downlink_filters: settings
                .downlink
                .subscribe
                .iter()
                .map(|f| settings.expand(f))
                .collect(),
            strip_prefix: settings.expand(&settings.downlink.strip_prefix),
            settings: settings.clone(),
        })
    }

    /// Runs until the stop token is cancelled and the last session has drained.
    pub async fn run(mut self) {
        let c = &self.settings.cloud;
        let mut backoff = Backoff::new(c.reconnect_min, c.reconnect_max);
        loop {
            let started = Instant::now();
            self.heartbeat.beat();
            match self.session(&mut backoff).await {
                Ok(()) => break,
                Err(e) => {
                    self.metrics.cloud_reconnects.inc();
                    self.metrics.cloud_connected.set(0);
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
                    _ = self.stop.cancelled() => {
                        self.metrics.cloud_connected.set(0);
                        info!("bridge stopped");
                        return;
                    }
                }
            }
        }
        self.metrics.cloud_connected.set(0);
        info!("bridge stopped");
    }

    fn options(&self) -> MqttOptions {
        let c = &self.settings.cloud;
        let mut o = MqttOptions::new(self.settings.cloud_client_id(), c.host.clone(), c.port);
        o.set_keep_alive(c.keepalive)
            .set_clean_session(true)
            .set_max_packet_size(c.max_packet_size, c.max_packet_size)
            .set_inflight(c.max_inflight)
            .set_last_will(LastWill::new(
                self.status_topic.clone(),
                "offline",
                QoS::AtLeastOnce,
                true,
            ))
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                self.tls.clone(),
            )));
        if !c.username.is_empty() {
            o.set_credentials(c.username.clone(), c.password.clone());
        }
        o
    }

    async fn session(&mut self, backoff: &mut Backoff) -> Result<(), BridgeError> {
        let c = self.settings.cloud.clone();
        let cap = c.max_inflight as usize + 16;
        let (client, mut eventloop) = AsyncClient::new(self.options(), cap);
        let mut net = eventloop.network_options();
        net.set_connection_timeout(c.connect_timeout.as_secs().max(1));
        eventloop.set_network_options(net);

        // Connect: the first poll dials, handshakes TLS and waits for CONNACK.
        let connect = async {
            loop {
                match eventloop.poll().await? {
                    Event::Incoming(Packet::ConnAck(_)) => return Ok::<_, BridgeError>(()),
                    other => debug!(?other, "before CONNACK"),
                }
            }
        };
        tokio::select! {
            r = connect => r?,
            _ = self.stop.cancelled() => return Ok(()),
        }
        backoff.reset();
        self.metrics.cloud_connected.set(1);
        info!(host = %c.host, port = c.port, "cloud connected");

        // The event loop gets its own task; events reach us through a bounded channel (the
        // poller waits when it is full, which back-pressures the socket, not memory).
        let (ev_tx, mut events) = mpsc::channel::<Result<Event, ConnectionError>>(1024);
        let poller = tokio::spawn(poll_events(eventloop, ev_tx));
        let result = self.online(&client, &mut events).await;
        poller.abort();
        self.metrics.cloud_connected.set(0);
        result
    }

    async fn online(
        &mut self,
        client: &AsyncClient,
        events: &mut mpsc::Receiver<Result<Event, ConnectionError>>,
    ) -> Result<(), BridgeError> {
        let mut flight = Flight::default();
        let result = self.pump(client, events, &mut flight).await;
        // Whatever ended the session: remove what was acknowledged, count what was not.
        if let Err(e) = self.remove(&mut flight.acked).await {
            warn!(error = %e, "removing acknowledged records failed; they will be sent again");
        }
        if result.is_err() {
            let unacked = flight.handed.iter().flatten().count() + flight.inflight.len();
            self.metrics.resent.inc_by(unacked as u64);
        }
        result
    }

    async fn pump(
        &mut self,
        client: &AsyncClient,
        events: &mut mpsc::Receiver<Result<Event, ConnectionError>>,
        flight: &mut Flight,
    ) -> Result<(), BridgeError> {
        let c = self.settings.cloud.clone();
        client.try_publish(self.status_topic.clone(), QoS::AtLeastOnce, true, "online")?;
        flight.handed.push_back(None);
        if !self.downlink_filters.is_empty() {
            client.try_subscribe_many(
                self.downlink_filters
                    .iter()
                    .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)),
            )?;
        }

        // Split the queue into backlog and live at this instant.
        let store = self.store.clone();
        let lanes = tokio::task::spawn_blocking(move || {
            let live_start = store.next_seq();
            let head = store.head().unwrap_or(live_start);
            let counts = store.topic_counts(head, live_start)?;
            Ok::<_, BridgeError>(Lanes::new(head, live_start, counts))
        })
        .await??;
        let mut lanes = lanes;
        let live = LiveLane(self.store.clone());
        live.at(lanes.live_next());
        if !lanes.merged() {
            info!(backlog = self.store.records(), "replaying backlog");
        }
        let now = Instant::now();
        let mut msg_bucket = TokenBucket::new(c.replay_msgs_per_sec as u64, now);
        let mut byte_bucket = TokenBucket::new(c.replay_bytes_per_sec, now);
        let mut live_buf: VecDeque<(u64, Record)> = VecDeque::new();
        let mut replay_buf: VecDeque<(u64, Record)> = VecDeque::new();
        let mut appended = self.store.subscribe();
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let mut rate_window = (Instant::now(), 0u64);
        let mut pace_until: Option<Instant> = None;
        let mut stopping: Option<Instant> = None;

        loop {
            // Hand rumqttc as much as the window and the pacing allow.
            if stopping.is_none() {
                let window = c.max_inflight as usize;
                'fill: while flight.len() < window {
                    // Live lane first.
                    if live_buf.is_empty() && self.store.next_seq() > lanes.live_next() {
                        live_buf = self.read(lanes.live_next(), u64::MAX).await?;
                    }
                    if let Some((seq, rec)) = live_buf.pop_front() {
                        if lanes.live_take(seq, &rec.topic) {
                            self.send(client, &rec)?;
                            flight.handed.push_back(Some(InFlight { seq }));
                            self.metrics.sent_live.inc();
                        }
                        live.at(lanes.live_next());
                        continue 'fill;
                    }
                    // Then the replay lane, paced.
                    let Some((from, to)) = lanes.replay_range() else {
                        break 'fill;
                    };
                    if replay_buf.is_empty() {
                        replay_buf = self.read(from, to).await?;
                        if replay_buf.is_empty() {
                            lanes.replay_exhausted(to);
                            if lanes.merged() {
                                info!("backlog replayed; lanes merged");
                            }
                            continue 'fill;
                        }
                    }
                    let Some((seq, rec)) = replay_buf.front() else {
                        break 'fill;
                    };
                    let now = Instant::now();
                    let wait = msg_bucket
                        .wait_for(1, now)
                        .max(byte_bucket.wait_for(rec.payload.len() as u64, now));
                    if !wait.is_zero() {
                        pace_until = Some(now + wait);
                        break 'fill;
                    }
                    let (seq, rec) = (*seq, rec.clone());
                    replay_buf.pop_front();
                    if lanes.replay_take(seq, &rec.topic) {
                        msg_bucket.take(1);
                        byte_bucket.take(rec.payload.len() as u64);
                        self.send(client, &rec)?;
                        flight.handed.push_back(Some(InFlight { seq }));
                        self.metrics.sent_replay.inc();
                        rate_window.1 += 1;
                    }
                }
            } else if flight.len() == 0 {
                break;
            }

            let pace = pace_until.take();
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                        if let Some(Some(f)) = flight.handed.pop_front() {
                            flight.inflight.insert(pkid, f);
                        }
                    }
                    Some(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                        if let Some(f) = flight.inflight.remove(&ack.pkid) {
                            flight.acked.push(f.seq);
                            if flight.acked.len() >= ACK_BATCH {
                                self.remove(&mut flight.acked).await?;
                            }
                        }
                    }
                    Some(Ok(Event::Incoming(Packet::Publish(p)))) => self.downlink(p),
                    Some(Ok(Event::Incoming(Packet::Disconnect))) | None => {
                        return Err(BridgeError::Disconnected);
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e.into()),
                },
                _ = appended.changed(), if stopping.is_none() => {}
                _ = sleep_until(pace), if pace.is_some() => {}
                _ = tick.tick() => {
                    self.heartbeat.beat();
                    if !flight.acked.is_empty() {
                        self.remove(&mut flight.acked).await?;
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
                _ = self.stop.cancelled(), if stopping.is_none() => {
                    info!(in_flight = flight.len(), "bridge draining in-flight records");
                    stopping = Some(Instant::now() + self.settings.gateway.shutdown_grace);
                }
            }
        }
        self.remove(&mut flight.acked).await?;
        // Orderly goodbye: the retained status says offline (the will only fires on abrupt loss).
        let _ = client.try_publish(self.status_topic.clone(), QoS::AtLeastOnce, true, "offline");
        let _ = client.try_disconnect();
        let bye = async {
            while let Some(ev) = events.recv().await {
                match ev {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    _ => {}
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), bye).await;
        Ok(())
    }

    fn send(&self, client: &AsyncClient, rec: &Record) -> Result<(), BridgeError> {
        let topic = format!("{}{}", self.cloud_prefix, rec.topic);
        client.try_publish(topic, QoS::AtLeastOnce, rec.retain, rec.payload.to_vec())?;
        Ok(())
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

    fn downlink(&mut self, p: rumqttc::Publish) {
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
        let local = format!("{}{}", self.settings.downlink.local_prefix, rest);
        match self.downlink.try_publish(local.clone(), p.payload.to_vec()) {
            Ok(_) => {
                self.metrics.downlink_messages.inc();
                debug!(cloud = topic, local, "downlink");
            }
            Err(e) => warn!(error = %e, local, "downlink message could not be published locally"),
        }
    }
}

async fn poll_events(mut el: EventLoop, tx: mpsc::Sender<Result<Event, ConnectionError>>) {
    loop {
        let ev = el.poll().await;
        let fatal = ev.is_err();
        if tx.send(ev).await.is_err() || fatal {
            return;
        }
    }
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
