//! The cloud link's metric families: the session state, reconnects, what each lane sent,
//! what was sent again after a session ended, the replay rate and the downlink
//! (`fieldgate_cloud_*`, `fieldgate_sent_*`, `fieldgate_resent_total`, `fieldgate_replay_rate`,
//! `fieldgate_downlink_messages_total`).
//!
//! Owned here and added to the gateway's registry when the bridge is built. What the cloud
//! acknowledged (`fieldgate_messages_out_total`) and the records the bridge gives up on are
//! the queue's to count ([`crate::store::metrics`]).

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::metrics::Register;

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
    }
}
