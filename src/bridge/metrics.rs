//! The cloud link's metric families: the session state, reconnects, what each lane sent,
//! what was sent again after a session ended, the replay rate and the downlink
//! (`fieldgate_cloud_*`, `fieldgate_sent_*`, `fieldgate_resent_total`, `fieldgate_replay_rate`,
//! `fieldgate_downlink_messages_total`), the MQTT 5 refusals that are retried
//! (`fieldgate_bridge_refused_for_now_total{reason}`), and the Sparkplug edge node's
//! (`fieldgate_sparkplug_*`, zero without `[sparkplug]`).
//!
//! Owned here and added to the gateway's registry when the bridge is built. What the cloud
//! acknowledged (`fieldgate_messages_out_total`) and the records the bridge gives up on are
//! the queue's to count ([`crate::store::metrics`]).
//!
//! Beside the families, [`LinkState`] keeps what the operator page shows of the link (since
//! when it is up, the last error). The bridge writes it only when a session starts or ends,
//! never per message.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::metrics::{label, Labels, Register};

/// The cloud link's metrics.
#[derive(Default)]
pub struct CloudMetrics {
    /// PUBLISHes sent to the cloud by the live lane.
    pub sent_live: Counter,
    /// PUBLISHes sent to the cloud by the replay lane.
    pub sent_replay: Counter,
    /// Records in flight when a cloud session ended: they are sent again (the at-least-once
    /// duplicates).
    pub resent: Counter,
    /// Connection attempts to the cloud that failed or connections that dropped.
    pub cloud_reconnects: Counter,
    /// 1 while the cloud session is up.
    pub cloud_connected: Gauge,
    /// Messages from the cloud published into the local broker.
    pub downlink_messages: Counter,
    /// Replay lane send rate over the last second, msgs/s.
    pub replay_rate: Gauge<f64, AtomicU64>,
    /// Since when the link is up and why it last went down (for the operator page).
    pub link: LinkState,
    /// Sparkplug messages made, by type (`NBIRTH`, `DBIRTH`, `DDATA`, `DDEATH`, `NDEATH`).
    pub sparkplug_messages: Family<Labels, Counter>,
    /// Sparkplug commands from the host, by result (`rebirth`, `write`, `refused`).
    pub sparkplug_commands: Family<Labels, Counter>,
    /// 1 while a Sparkplug session waits for its primary host's STATE (sending nothing).
    pub sparkplug_waiting_for_host: Gauge,
    /// MQTT 5 PUBACKs that refused a record for now (0x97 quota exceeded, ...), by reason:
    /// each ended its session, and the record was sent again after a backoff.
    pub refused_for_now: Family<Labels, Counter>,
}

/// The Sparkplug message types a [`CloudMetrics::sparkplug_messages`] label takes.
pub const SPARKPLUG_KINDS: [&str; 5] = ["NBIRTH", "DBIRTH", "DDATA", "DDEATH", "NDEATH"];
/// The results a [`CloudMetrics::sparkplug_commands`] label takes.
pub const SPARKPLUG_RESULTS: [&str; 3] = ["rebirth", "write", "refused"];

/// What the operator page shows of the cloud link.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LinkInfo {
    /// When the current session started (CONNACK), Unix ms; `None` while down.
    pub connected_since_ms: Option<u64>,
    /// Why the last session ended or the last attempt failed; kept after a reconnect.
    pub last_error: Option<String>,
}

/// [`LinkInfo`] behind a lock taken only when a session starts or ends, and by the page.
#[derive(Debug, Default)]
pub struct LinkState(Mutex<LinkInfo>);

impl LinkState {
    /// A session is up since `now_ms`.
    pub fn connected(&self, now_ms: u64) {
        self.lock().connected_since_ms = Some(now_ms);
    }

    /// The link is down; `error` says why (`None`: an orderly stop, the last error stays).
    pub fn down(&self, error: Option<String>) {
        let mut l = self.lock();
        l.connected_since_ms = None;
        if error.is_some() {
            l.last_error = error;
        }
    }

    /// A copy of the state.
    pub fn get(&self) -> LinkInfo {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LinkInfo> {
        // A writer cannot panic between its two assignments; a poisoned lock is still whole.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl CloudMetrics {
    /// Fresh families (add them to a registry to expose them).
    pub fn new() -> Arc<CloudMetrics> {
        Arc::new(CloudMetrics::default())
    }
}

impl Register for CloudMetrics {
    fn register(&self, r: &mut Registry) {
        let m = self;
        r.register(
            "sent_live",
            "PUBLISHes sent by the live lane",
            m.sent_live.clone(),
        );
        r.register(
            "sent_replay",
            "PUBLISHes sent by the replay lane",
            m.sent_replay.clone(),
        );
        r.register(
            "resent",
            "Records sent again after a reconnect",
            m.resent.clone(),
        );
        r.register(
            "cloud_reconnects",
            "Failed or lost cloud connections",
            m.cloud_reconnects.clone(),
        );
        r.register(
            "cloud_connected",
            "1 while the cloud session is up",
            m.cloud_connected.clone(),
        );
        r.register(
            "downlink_messages",
            "Cloud messages published locally",
            m.downlink_messages.clone(),
        );
        r.register(
            "replay_rate",
            "Replay lane msgs/s over the last second",
            m.replay_rate.clone(),
        );
        for k in SPARKPLUG_KINDS {
            let _ = m.sparkplug_messages.get_or_create(&label("type", k));
        }
        for k in SPARKPLUG_RESULTS {
            let _ = m.sparkplug_commands.get_or_create(&label("result", k));
        }
        r.register(
            "sparkplug_messages",
            "Sparkplug B messages made, by type",
            m.sparkplug_messages.clone(),
        );
        r.register(
            "sparkplug_commands",
            "Sparkplug B commands from the host, by result",
            m.sparkplug_commands.clone(),
        );
        for code in [0x80u8, 0x91, 0x97] {
            let _ = m
                .refused_for_now
                .get_or_create(&label("reason", crate::store::dead::reason_name(code)));
        }
        r.register(
            "bridge_refused_for_now",
            "MQTT 5 PUBACKs that refused a record for now, by reason (the record is sent again)",
            m.refused_for_now.clone(),
        );
        r.register(
            "sparkplug_waiting_for_host",
            "1 while the Sparkplug session waits for the primary host's STATE",
            m.sparkplug_waiting_for_host.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_link_state_keeps_the_last_error_across_a_reconnect() {
        let l = LinkState::default();
        assert_eq!(l.get(), LinkInfo::default());
        l.connected(5);
        assert_eq!(l.get().connected_since_ms, Some(5));
        l.down(Some("connection reset".into()));
        assert_eq!(l.get().connected_since_ms, None);
        l.connected(9);
        l.down(None);
        let info = l.get();
        assert_eq!(info.connected_since_ms, None);
        assert_eq!(info.last_error.as_deref(), Some("connection reset"));
    }
}
