//! The uplink tap: an in-process broker link on `#` that appends every message meant for the
//! cloud to the durable queue.
//!
//! Runs on its own OS thread because its work is blocking disk I/O (sled) and it must keep up
//! with the broker: rumqttd silently skips a subscriber that falls more than its filter log
//! behind, so the tap does nothing but filter, batch and append.
//!
//! Invariants:
//! - messages are appended in the order the broker's `#` log holds them, which is arrival
//!   order per publisher;
//! - a message is queued iff its topic matches `uplink.forward`, matches no `uplink.exclude`,
//!   and its cloud topic matches no downlink subscription (the loop guard: forwarding it would
//!   come straight back down); loop-guarded messages are counted as `dropped{reason="loop"}`;
//! - retained publishes (marked, see [`crate::retained`]) are written to the store's
//!   retained tree in broker order and queued with the retain flag; deliveries that arrive
//!   with the retain flag set are replays of kept messages and are neither kept nor queued;
//! - on `Unschedule` the link is woken at once, or the router would park it for good;
//! - stopping is exact, not timed: when the token is cancelled (after the broker closed every
//!   device connection) the tap publishes a drain marker on its own link and keeps appending
//!   until the marker comes back through the `#` log. The router appends in the order it
//!   receives events, and a device only gets its PUBACK after the router took the message, so
//!   every message the broker acknowledged is appended before the tap returns. The marker
//!   itself is never queued. If it does not come back within [`DRAIN_LIMIT`] the tap says so
//!   at ERROR and returns.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttd::local::{LinkError, LinkRx, LinkTx};
use rumqttd::Notification;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info_span, warn};

use crate::broker::TAP_FILTER;
use crate::metrics::{DropReason, Metrics};
use crate::retained;
use crate::store::{now_ms, Record, Store};
use crate::topic::FilterSet;
use crate::watchdog::Heartbeat;

/// Most records collected before they are appended.
const MAX_BATCH: usize = 1024;

/// How long the tap waits for its drain marker when stopping.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// Topic prefix of the drain marker; a per-process nonce follows.
const DRAIN_MARKER_PREFIX: &str = "fieldgate-internal/tap-drain/";

/// Which local messages go up, and the loop guard.
#[derive(Debug, Clone)]
pub struct Routing {
    /// `uplink.forward`.
    pub forward: FilterSet,
    /// `uplink.exclude`.
    pub exclude: FilterSet,
    /// Expanded `uplink.cloud_prefix`.
    pub cloud_prefix: String,
    /// Expanded `downlink.subscribe` (cloud-side filters).
    pub downlink: FilterSet,
}

/// What the tap does with one local message.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Queue it.
    Forward,
    /// Not meant for the cloud.
    Skip,
    /// Would loop back through the downlink.
    Loop,
}

impl Routing {
    /// Decides for one topic.
    pub fn verdict(&self, topic: &str) -> Verdict {
        if !self.forward.matches(topic) || self.exclude.matches(topic) {
            return Verdict::Skip;
        }
        if self
            .downlink
            .matches(&format!("{}{}", self.cloud_prefix, topic))
        {
            return Verdict::Loop;
        }
        Verdict::Forward
    }
}

/// Starts the tap thread. If the tap fails (its broker link breaks), it cancels `failed`: a
/// gateway that no longer queues must stop and be restarted, not run on silently.
pub fn spawn(
    link: (LinkTx, LinkRx),
    store: Arc<Store>,
    routing: Routing,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    failed: CancellationToken,
    heartbeat: Heartbeat,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("fieldgate-tap".into())
        .spawn(move || {
            let span = info_span!("uplink_tap");
            let _g = span.enter();
            if let Err(e) = run(link, &store, &routing, &metrics, &stop, &heartbeat) {
                error!(error = %e, "uplink tap failed: local messages are no longer queued; stopping");
                failed.cancel();
            }
        })
}

fn run(
    (mut tx, mut rx): (LinkTx, LinkRx),
    store: &Store,
    routing: &Routing,
    metrics: &Metrics,
    stop: &CancellationToken,
    heartbeat: &Heartbeat,
) -> Result<(), Box<LinkError>> {
    tx.subscribe(TAP_FILTER)?;
    let marker = format!(
        "{DRAIN_MARKER_PREFIX}{}-{}",
        std::process::id(),
        rand::random::<u64>()
    );
    // Set once the marker is published: the tap returns when it sees it, or at this deadline.
    let mut draining: Option<Instant> = None;
    let mut drained = false;
    let mut batch: Vec<Record> = Vec::with_capacity(MAX_BATCH);
    // The broker's log offset of the last message seen: offsets are consecutive, so a gap
    // means the broker skipped messages because the tap fell behind.
    let mut last_offset: Option<u64> = None;
    loop {
        // Block for the first notification (bounded, to notice `stop`), then drain whatever
        // is already there without waiting so appends are batched.
        let mut wait = Instant::now() + Duration::from_millis(50);
        loop {
            match rx.recv_deadline(wait) {
                Ok(Some(Notification::Forward(f))) => {
                    if let Some((_, off)) = f.cursor {
                        if let Some(last) = last_offset.filter(|l| off > l + 1) {
                            let lost = off - last - 1;
                            metrics.count_drop(DropReason::BrokerOverrun, lost);
                            error!(
                                lost,
                                "uplink tap fell behind the broker's log; messages lost \
                                   (raise broker.tap_segment_count or use faster storage)"
                            );
                        }
                        last_offset = Some(off);
                    }
                    let p = f.publish;
                    let Ok(topic) = std::str::from_utf8(&p.topic) else {
                        warn!("skipping a message whose topic is not UTF-8");
                        continue;
                    };
                    if topic == marker {
                        drained = true;
                        break;
                    }
                    if p.retain {
                        // rumqttd clears the flag on live deliveries: this is a kept message
                        // replayed to the tap's subscription, queued in the run that took it.
                        continue;
                    }
                    let retained = retained::is_marked(f.properties.as_ref());
                    // rumqttd 0.20 also drops a topic's retained message on an empty
                    // publish without the retain flag; the kept copy follows it.
                    if retained || p.payload.is_empty() {
                        let qos = retained::marked_qos(f.properties.as_ref()).unwrap_or(2);
                        if let Err(e) = store.retain(topic, qos, &p.payload) {
                            error!(error = %e, %topic, "cannot keep a retained message on disk");
                        }
                    }
                    match routing.verdict(topic) {
                        Verdict::Forward => batch.push(Record {
                            topic: topic.to_string(),
                            payload: p.payload,
                            retain: retained,
                            ts_ms: now_ms(),
                        }),
                        Verdict::Loop => metrics.count_drop(DropReason::Loop, 1),
                        Verdict::Skip => {}
                    }
                }
                Ok(Some(Notification::Unschedule)) => rx.ready()?,
                Ok(Some(other)) => debug!(?other, "tap notification"),
                Ok(None) => {}
                Err(LinkError::RecvTimeout(flume::RecvTimeoutError::Timeout)) => break,
                Err(e) => return Err(Box::new(e)),
            }
            if batch.len() >= MAX_BATCH {
                break;
            }
            wait = Instant::now();
        }
        if !batch.is_empty() {
            if let Err(e) = store.append(&batch) {
                // The disk refused (full, I/O error): these records are lost; say so loudly.
                metrics.count_drop(DropReason::StoreError, batch.len() as u64);
                error!(error = %e, lost = batch.len(), "queue append failed; messages dropped");
            }
            batch.clear();
        }
        heartbeat.beat();
        if drained {
            debug!("drain marker seen: every message the broker accepted is queued");
            return Ok(());
        }
        match draining {
            None if stop.is_cancelled() => {
                tx.publish(marker.clone(), "drain")?;
                draining = Some(Instant::now() + DRAIN_LIMIT);
            }
            Some(deadline) if Instant::now() > deadline => {
                error!(
                    limit = ?DRAIN_LIMIT,
                    "the tap's drain marker did not come back from the broker; messages \
                     the broker accepted last may not be queued"
                );
                return Ok(());
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        let r = Routing {
            forward: FilterSet::new(["#".to_string()]),
            exclude: FilterSet::new(["cmd/#".to_string()]),
            cloud_prefix: "fieldgate/gw/".into(),
            downlink: FilterSet::new(["fieldgate/gw/cmd/#".to_string(), "fieldgate/gw/x/#".into()]),
        };
        assert_eq!(r.verdict("dev/1/temp"), Verdict::Forward);
        assert_eq!(r.verdict("cmd/dev1/set"), Verdict::Skip);
        assert_eq!(r.verdict("x/1"), Verdict::Loop);
    }
}
