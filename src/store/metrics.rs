//! The queue's metric families: what entered the queue, what the cloud acknowledged, what was
//! dropped and why, the queue's depth and age, and the journal's commits, refusals and slow
//! writes (`fieldgate_messages_*`, `fieldgate_dropped_total`, `fieldgate_queue_*`,
//! `fieldgate_store_*`).
//!
//! Owned here because the store (and its journal) decide every one of them; the ingest and
//! the bridge, which sit on top of the store, count their drops through [`StoreMetrics::count_drop`]
//! so that `fieldgate_dropped_total` is one family with one owner. Every drop reason and
//! refusal cause is materialised at registration, so a scrape shows zeros.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::metrics::{label, Labels, Register};

/// Why a record was dropped instead of reaching the cloud.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// `full_policy = drop_oldest` evicted it.
    QueueFull,
    /// A QoS 0 publish or a source's reading the queue could not take at once (its journal
    /// full, the store refusing writes): never acknowledged to anyone, so nothing promised.
    Refused,
    /// Older than `store.max_age`.
    Expired,
    /// Its cloud topic matches a downlink subscription: forwarding it would loop.
    Loop,
    /// It could not be decoded from disk.
    Corrupt,
    /// Its PUBLISH would exceed `cloud.max_packet_size`: resending it could never succeed.
    TooLarge,
    /// A dead letter pushed out by a newer one (`store.max_dead_letters`), or refused with
    /// `store.max_dead_letters = 0`.
    DeadLettersFull,
}

impl DropReason {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::Refused => "refused",
            DropReason::Expired => "expired",
            DropReason::Loop => "loop",
            DropReason::Corrupt => "corrupt",
            DropReason::TooLarge => "too_large",
            DropReason::DeadLettersFull => "dead_letters_full",
        }
    }
}

/// The `cause` labels of the store's refusals (see [`super::StoreError::cause`]).
pub const REFUSAL_CAUSES: [&str; 3] = ["disk_full", "io", "queue_full"];

const DROP_REASONS: [DropReason; 7] = [
    DropReason::QueueFull,
    DropReason::Refused,
    DropReason::Expired,
    DropReason::Loop,
    DropReason::Corrupt,
    DropReason::TooLarge,
    DropReason::DeadLettersFull,
];

/// The queue's metrics.
#[derive(Default)]
pub struct StoreMetrics {
    /// Local messages accepted into the queue.
    pub messages_in: Counter,
    /// Records the cloud PUBACKed (and so left the queue).
    pub messages_out: Counter,
    /// Drops by reason.
    dropped: Family<Labels, Counter>,
    /// Records in the queue.
    pub queue_records: Gauge,
    /// Bytes in the queue (logical: key + encoded record).
    pub queue_bytes: Gauge,
    /// Bytes sled uses on disk.
    pub store_disk_bytes: Gauge,
    /// Age of the oldest record, seconds.
    pub queue_oldest_age_seconds: Gauge<f64, AtomicU64>,
    /// Group commits (flush + fsync) done.
    pub store_commits: Counter,
    /// Checkpoints: sled's files flushed and fsynced, the write-ahead file started over.
    pub store_checkpoints: Counter,
    /// Commits and checkpoints that took 250 ms or more.
    pub store_slow_writes: Counter,
    /// Group commits that failed.
    pub store_commit_errors: Counter,
    /// Highest sequence number covered by a completed fsync.
    pub store_durable_seq: Gauge,
    /// Times the queue could not take a batch, by cause (`disk_full`, `io`, `queue_full`).
    store_refusals: Family<Labels, Counter>,
    /// 1 for the cause while the queue refuses writes.
    store_refusing: Family<Labels, Gauge>,
    /// Store opened after moving a damaged one aside.
    pub store_quarantined: Gauge,
    /// Retained messages kept in the store (`fieldgate_broker_retained`: the broker's name,
    /// the store's number).
    pub retained: Gauge,
    /// Records the cloud refused for good, by reason (`fieldgate_bridge_dead_letters_total`).
    dead_letters: Family<Labels, Counter>,
    /// Dead letters kept on disk (`fieldgate_bridge_dead_letters_kept`).
    pub dead_letters_kept: Gauge,
}

impl StoreMetrics {
    /// Fresh families with every label materialised (add them to a registry to expose them).
    pub fn new() -> Arc<StoreMetrics> {
        let m = StoreMetrics::default();
        for reason in DROP_REASONS {
            m.count_drop(reason, 0);
        }
        for code in super::dead::PERMANENT_CODES {
            m.dead_letters
                .get_or_create(&label("reason", super::dead::reason_name(code)))
                .inc_by(0);
        }
        for cause in REFUSAL_CAUSES {
            m.store_refusals(cause).inc_by(0);
            m.set_store_refusing(cause, false);
        }
        Arc::new(m)
    }

    /// Counts `n` records dropped for `reason`.
    pub fn count_drop(&self, reason: DropReason, n: u64) {
        self.dropped
            .get_or_create(&label("reason", reason.as_str()))
            .inc_by(n);
    }

    /// Counts one dead letter refused with PUBACK reason `code`.
    pub fn count_dead_letter(&self, code: u8) {
        self.dead_letters
            .get_or_create(&label("reason", super::dead::reason_name(code)))
            .inc();
    }

    /// Dead letters counted so far for reason `code`.
    pub fn dead_letters(&self, code: u8) -> u64 {
        self.dead_letters
            .get_or_create(&label("reason", super::dead::reason_name(code)))
            .get()
    }

    /// Records dropped so far for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped
            .get_or_create(&label("reason", reason.as_str()))
            .get()
    }

    /// The refusal counter of `cause`.
    pub fn store_refusals(&self, cause: &str) -> Counter {
        self.store_refusals
            .get_or_create(&label("cause", cause))
            .clone()
    }

    /// Sets whether the queue refuses writes for `cause`.
    pub fn set_store_refusing(&self, cause: &str, on: bool) {
        self.store_refusing
            .get_or_create(&label("cause", cause))
            .set(i64::from(on));
    }

    /// The cause the queue refuses writes for, if it does.
    pub fn store_refusing_cause(&self) -> Option<&'static str> {
        REFUSAL_CAUSES
            .into_iter()
            .find(|c| self.store_refusing.get_or_create(&label("cause", c)).get() == 1)
    }
}

impl Register for StoreMetrics {
    fn register(&self, r: &mut Registry) {
        let m = self;
        r.register(
            "messages_in",
            "Local messages accepted into the queue",
            m.messages_in.clone(),
        );
        r.register(
            "messages_out",
            "Records acknowledged by the cloud",
            m.messages_out.clone(),
        );
        r.register("dropped", "Records dropped, by reason", m.dropped.clone());
        r.register(
            "queue_records",
            "Records in the queue",
            m.queue_records.clone(),
        );
        r.register("queue_bytes", "Bytes in the queue", m.queue_bytes.clone());
        r.register(
            "store_disk_bytes",
            "Bytes the store uses on disk",
            m.store_disk_bytes.clone(),
        );
        r.register(
            "queue_oldest_age_seconds",
            "Age of the oldest unsent record",
            m.queue_oldest_age_seconds.clone(),
        );
        r.register(
            "store_commits",
            "Group commits (one write-ahead frame + fdatasync)",
            m.store_commits.clone(),
        );
        r.register(
            "store_checkpoints",
            "Checkpoints (sled flushed and fsynced, write-ahead file started over)",
            m.store_checkpoints.clone(),
        );
        r.register(
            "store_slow_writes",
            "Commits and checkpoints that took 250 ms or more (acknowledgements waited for the disk)",
            m.store_slow_writes.clone(),
        );
        r.register(
            "store_commit_errors",
            "Failed group commits and checkpoints",
            m.store_commit_errors.clone(),
        );
        r.register(
            "store_durable_seq",
            "Highest queue sequence number covered by a completed fsync",
            m.store_durable_seq.clone(),
        );
        r.register(
            "store_refusals",
            "Times the queue could not take a batch and held it back, by cause",
            m.store_refusals.clone(),
        );
        r.register(
            "store_refusing",
            "1 while the queue refuses writes, by cause",
            m.store_refusing.clone(),
        );
        r.register(
            "store_quarantined",
            "1 if a damaged store was moved aside at start",
            m.store_quarantined.clone(),
        );
        r.register(
            "bridge_dead_letters",
            "Records the cloud refused for good (MQTT 5 PUBACK reason), kept as dead letters",
            m.dead_letters.clone(),
        );
        r.register(
            "bridge_dead_letters_kept",
            "Dead letters kept on disk",
            m.dead_letters_kept.clone(),
        );
        r.register(
            "broker_retained",
            "Retained messages kept in the store across restarts",
            m.retained.clone(),
        );
    }
}
