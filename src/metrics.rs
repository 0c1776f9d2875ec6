//! Process-wide counters and gauges, exposed in Prometheus text format.
//!
//! Owns the registry. Every metric is an atomic: components update them from any thread
//! without locks, and the HTTP endpoint only reads. Names all start with `fieldgate_`.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

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
        }
    }
}

type Labels = Vec<(String, String)>;

/// The `cause` labels of the store's refusals (see [`crate::store::StoreError::cause`]).
pub const REFUSAL_CAUSES: [&str; 3] = ["disk_full", "io", "queue_full"];

/// All gateway metrics.
pub struct Metrics {
    registry: Registry,
    started: Instant,
    /// Local messages accepted into the queue.
    pub messages_in: Counter,
    /// Records the cloud PUBACKed (and so left the queue).
    pub messages_out: Counter,
    /// PUBLISHes sent to the cloud by the live lane.
    pub sent_live: Counter,
    /// PUBLISHes sent to the cloud by the replay lane.
    pub sent_replay: Counter,
    /// Records in flight when a cloud session ended: they are sent again (the at-least-once
    /// duplicates).
    pub resent: Counter,
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
    /// Connection attempts to the cloud that failed or connections that dropped.
    pub cloud_reconnects: Counter,
    /// 1 while the cloud session is up.
    pub cloud_connected: Gauge,
    /// Messages from the cloud published into the local broker.
    pub downlink_messages: Counter,
    /// Replay lane send rate over the last second, msgs/s.
    pub replay_rate: Gauge<f64, AtomicU64>,
    /// Serial-line devices, per device.
    pub serial: crate::sources::serial::metrics::SerialMetrics,
    /// The broker's front end (device connections).
    pub broker: BrokerMetrics,
    /// Modbus sources, by device and bus.
    pub modbus: ModbusMetrics,
    /// Firmware cache and OTA serving.
    pub ota: OtaMetrics,
}

/// OTA metrics (`fieldgate_ota_*`).
pub struct OtaMetrics {
    /// Download attempts from the cloud, by result (`ok`, `error`, `hash_mismatch`, `failed`).
    pub fetches: Family<Labels, Counter>,
    /// Image bytes received from the cloud (HTTPS or MQTT push).
    pub fetch_bytes: Counter,
    /// Image bytes served to devices, by path (`mqtt`, `http`).
    pub served_bytes: Family<Labels, Counter>,
    /// Chunks devices asked for over MQTT.
    pub chunk_requests: Counter,
    /// Refused requests and failures, by kind (the error reply `code`, `cache_corrupt`, ...).
    pub errors: Family<Labels, Counter>,
    /// Devices downloading now (slots in use).
    pub active_downloads: Gauge,
    /// Devices waiting in line for a download slot.
    pub waiting_devices: Gauge,
    /// Bytes of verified images in the cache.
    pub cache_bytes: Gauge,
    /// Devices by state.
    pub devices: Family<Labels, Gauge>,
    /// From a chunk request to its chunk being published (MQTT), seconds.
    pub chunk_latency: Histogram,
}

impl Default for OtaMetrics {
    fn default() -> Self {
        OtaMetrics {
            fetches: Family::default(),
            fetch_bytes: Counter::default(),
            served_bytes: Family::default(),
            chunk_requests: Counter::default(),
            errors: Family::default(),
            active_downloads: Gauge::default(),
            waiting_devices: Gauge::default(),
            cache_bytes: Gauge::default(),
            devices: Family::default(),
            chunk_latency: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
        }
    }
}

impl OtaMetrics {
    fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("ota");
        r.register(
            "fetches",
            "Image downloads from the cloud, by result",
            self.fetches.clone(),
        );
        r.register(
            "fetch_bytes",
            "Image bytes received from the cloud",
            self.fetch_bytes.clone(),
        );
        r.register(
            "served_bytes",
            "Image bytes served to devices, by path",
            self.served_bytes.clone(),
        );
        r.register(
            "chunk_requests",
            "Chunks devices asked for over MQTT",
            self.chunk_requests.clone(),
        );
        r.register(
            "errors",
            "Refused OTA requests and failures, by kind",
            self.errors.clone(),
        );
        r.register(
            "active_downloads",
            "Devices downloading now",
            self.active_downloads.clone(),
        );
        r.register(
            "waiting_devices",
            "Devices waiting in line for a download slot",
            self.waiting_devices.clone(),
        );
        r.register(
            "cache_bytes",
            "Bytes of verified images in the cache",
            self.cache_bytes.clone(),
        );
        r.register("devices", "OTA devices by state", self.devices.clone());
        r.register(
            "chunk_seconds",
            "From an MQTT chunk request to the chunk being published",
            self.chunk_latency.clone(),
        );
    }

    /// Counts a fetch result.
    pub fn fetch(&self, result: &str) {
        self.fetches
            .get_or_create(&vec![("result".into(), result.into())])
            .inc();
    }

    /// Counts bytes served.
    pub fn served(&self, via: &str, n: u64) {
        self.served_bytes
            .get_or_create(&vec![("via".into(), via.into())])
            .inc_by(n);
    }

    /// Counts an error.
    pub fn error(&self, kind: &str) {
        self.errors
            .get_or_create(&vec![("kind".into(), kind.into())])
            .inc();
    }

    /// Errors of one kind so far.
    pub fn errors_of(&self, kind: &str) -> u64 {
        self.errors
            .get_or_create(&vec![("kind".into(), kind.into())])
            .get()
    }
}

/// Metrics of the broker front end.
#[derive(Debug, Default)]
pub struct BrokerMetrics {
    /// Device connections open now.
    pub connections: Gauge,
    /// Connections refused, by reason (bad credentials, limits, TLS, ...).
    refused: Family<Labels, Counter>,
    /// PUBLISHes dropped and SUBSCRIBE filters refused by the ACL, by action.
    denied: Family<Labels, Counter>,
    /// Device sessions ended, by reason.
    closed_by: Family<Labels, Counter>,
    /// QoS 2 retries (DUP before PUBREL) not forwarded again.
    pub qos2_duplicates: Counter,
    /// Queued, non-retained PUBLISHes no local client could receive, answered by the front
    /// end without the local broker (see [`crate::ingest::Audience`]).
    pub bypassed: Counter,
    /// Deliveries lowered to the publisher's QoS.
    pub downgraded: Counter,
    /// PUBLISHes over `broker.max_publish_rate`, by the policy applied.
    rate_limited: Family<Labels, Counter>,
    /// Retained messages kept in the store.
    pub retained: Gauge,
    /// Login attempts held back after failed logins from the same address.
    pub login_delayed: Counter,
    /// Subscriptions refused and retained messages not kept over their limits, by what.
    limited: Family<Labels, Counter>,
}

impl BrokerMetrics {
    fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("broker");
        r.register(
            "connections",
            "Device connections open now",
            self.connections.clone(),
        );
        r.register(
            "refused",
            "Device connections refused, by reason",
            self.refused.clone(),
        );
        r.register(
            "denied",
            "Publishes dropped and subscriptions refused by the ACL",
            self.denied.clone(),
        );
        r.register(
            "closed",
            "Device sessions ended, by reason",
            self.closed_by.clone(),
        );
        r.register(
            "qos2_duplicates",
            "QoS 2 retries not delivered twice",
            self.qos2_duplicates.clone(),
        );
        r.register(
            "bypassed",
            "Queued publishes no local client could receive, answered without the local broker",
            self.bypassed.clone(),
        );
        r.register(
            "downgraded",
            "Deliveries lowered to min(published, granted) QoS",
            self.downgraded.clone(),
        );
        r.register(
            "rate_limited",
            "Device publishes over broker.max_publish_rate, by the policy applied",
            self.rate_limited.clone(),
        );
        r.register(
            "retained",
            "Retained messages kept in the store across restarts",
            self.retained.clone(),
        );
        r.register(
            "login_delayed",
            "Login attempts held back after failed logins from the same address",
            self.login_delayed.clone(),
        );
        r.register(
            "limited",
            "Subscriptions refused and retained messages not kept over the broker's limits",
            self.limited.clone(),
        );
        for w in ["subscriptions", "retained"] {
            self.limited
                .get_or_create(&vec![("what".into(), w.into())])
                .inc_by(0);
        }
        for a in ["publish", "subscribe", "deliver"] {
            self.denied
                .get_or_create(&vec![("action".into(), a.into())])
                .inc_by(0);
        }
    }

    /// Counts a refused connection.
    pub fn refuse(&self, reason: &str) {
        self.refused
            .get_or_create(&vec![("reason".into(), reason.into())])
            .inc();
    }

    /// Counts a subscription refused or a retained message not kept over a limit.
    pub fn limit(&self, what: &str) {
        self.limited
            .get_or_create(&vec![("what".into(), what.into())])
            .inc();
    }

    /// Counts an ACL denial.
    pub fn deny(&self, action: crate::frontend::auth::Action) {
        self.denied
            .get_or_create(&vec![("action".into(), action.as_str().into())])
            .inc();
    }

    /// Counts a publish over the rate limit.
    pub fn rate_limit(&self, policy: &str) {
        self.rate_limited
            .get_or_create(&vec![("policy".into(), policy.into())])
            .inc();
    }

    /// Counts an ended session.
    pub fn closed(&self, reason: &str) {
        self.closed_by
            .get_or_create(&vec![("reason".into(), reason.into())])
            .inc();
    }
}

/// Modbus histogram constructor: request round trip, 100 µs .. ~3.3 s.
fn rtt_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// Modbus metrics, labelled by `device` (config name) or `bus` (TCP device name, or
/// `rtu:<serial port>`).
pub struct ModbusMetrics {
    /// Read requests answered with data, by device.
    pub reads: Family<Labels, Counter>,
    /// Failed request attempts, by device and kind (`timeout`, `exception`, `bad_frame`,
    /// `io`, `connect`).
    pub errors: Family<Labels, Counter>,
    /// Readings published with a quality other than good, by device and tag.
    pub tag_errors: Family<Labels, Counter>,
    /// Round trip of answered requests, by device.
    pub rtt: Family<Labels, Histogram, fn() -> Histogram>,
    /// Writes by device and result (`ok`, `error`).
    pub writes: Family<Labels, Counter>,
    /// 1 while the device answers, by device.
    pub online: Family<Labels, Gauge>,
    /// Poll cycles run, by bus.
    pub cycles: Family<Labels, Counter>,
    /// Poll cycles that did not finish before the next one was due, by bus.
    pub overruns: Family<Labels, Counter>,
    /// Requests (after coalescing) of the last poll cycle, by bus.
    pub cycle_requests: Family<Labels, Gauge>,
}

impl Default for ModbusMetrics {
    fn default() -> Self {
        ModbusMetrics {
            reads: Family::default(),
            errors: Family::default(),
            tag_errors: Family::default(),
            rtt: Family::new_with_constructor(rtt_histogram),
            writes: Family::default(),
            online: Family::default(),
            cycles: Family::default(),
            overruns: Family::default(),
            cycle_requests: Family::default(),
        }
    }
}

impl ModbusMetrics {
    fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("modbus");
        r.register(
            "reads",
            "Modbus read requests answered with data",
            self.reads.clone(),
        );
        r.register(
            "errors",
            "Failed Modbus request attempts, by kind",
            self.errors.clone(),
        );
        r.register(
            "tag_errors",
            "Modbus readings published with a quality other than good",
            self.tag_errors.clone(),
        );
        r.register(
            "request_seconds",
            "Round trip of answered Modbus requests",
            self.rtt.clone(),
        );
        r.register("writes", "Modbus writes, by result", self.writes.clone());
        r.register(
            "online",
            "1 while the Modbus device answers",
            self.online.clone(),
        );
        r.register("cycles", "Modbus poll cycles run", self.cycles.clone());
        r.register(
            "overruns",
            "Modbus poll cycles that did not fit their interval",
            self.overruns.clone(),
        );
        r.register(
            "cycle_requests",
            "Requests of the last Modbus poll cycle, after coalescing",
            self.cycle_requests.clone(),
        );
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Arc<Metrics> {
        let mut r = Registry::with_prefix("fieldgate");
        let m = Metrics {
            registry: Registry::default(),
            started: Instant::now(),
            messages_in: Counter::default(),
            messages_out: Counter::default(),
            sent_live: Counter::default(),
            sent_replay: Counter::default(),
            resent: Counter::default(),
            dropped: Family::default(),
            queue_records: Gauge::default(),
            queue_bytes: Gauge::default(),
            store_disk_bytes: Gauge::default(),
            queue_oldest_age_seconds: Gauge::default(),
            store_commits: Counter::default(),
            store_checkpoints: Counter::default(),
            store_slow_writes: Counter::default(),
            store_commit_errors: Counter::default(),
            store_durable_seq: Gauge::default(),
            store_refusals: Family::default(),
            store_refusing: Family::default(),
            store_quarantined: Gauge::default(),
            cloud_reconnects: Counter::default(),
            cloud_connected: Gauge::default(),
            downlink_messages: Counter::default(),
            replay_rate: Gauge::default(),
            modbus: ModbusMetrics::default(),
            serial: Default::default(),
            ota: OtaMetrics::default(),
            broker: Default::default(),
        };
        m.modbus.register(&mut r);
        m.ota.register(&mut r);
        m.serial.register(&mut r);
        m.broker.register(&mut r);
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
        for reason in [
            DropReason::QueueFull,
            DropReason::Refused,
            DropReason::Expired,
            DropReason::Loop,
            DropReason::Corrupt,
            DropReason::TooLarge,
        ] {
            // Materialise every label so a scrape shows zeros, not absence.
            m.count_drop(reason, 0);
        }
        for cause in REFUSAL_CAUSES {
            m.store_refusals(cause).inc_by(0);
            m.set_store_refusing(cause, false);
        }
        Arc::new(Metrics { registry: r, ..m })
    }

    /// Counts `n` records dropped for `reason`.
    pub fn count_drop(&self, reason: DropReason, n: u64) {
        self.dropped
            .get_or_create(&vec![("reason".into(), reason.as_str().into())])
            .inc_by(n);
    }

    /// The refusal counter of `cause`.
    pub fn store_refusals(&self, cause: &str) -> Counter {
        self.store_refusals
            .get_or_create(&vec![("cause".into(), cause.into())])
            .clone()
    }

    /// Sets whether the queue refuses writes for `cause`.
    pub fn set_store_refusing(&self, cause: &str, on: bool) {
        self.store_refusing
            .get_or_create(&vec![("cause".into(), cause.into())])
            .set(i64::from(on));
    }

    /// The cause the queue refuses writes for, if it does.
    pub fn store_refusing_cause(&self) -> Option<&'static str> {
        REFUSAL_CAUSES.into_iter().find(|c| {
            self.store_refusing
                .get_or_create(&vec![("cause".into(), (*c).into())])
                .get()
                == 1
        })
    }

    /// Records dropped so far for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped
            .get_or_create(&vec![("reason".into(), reason.as_str().into())])
            .get()
    }

    /// Seconds since start.
    pub fn uptime_secs(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
