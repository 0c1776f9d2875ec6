//! The metrics registry: every component's counters and gauges, exposed in Prometheus text
//! format (`GET /metrics`).
//!
//! A leaf: it imports nothing from the crate. Each component owns its metric families in its
//! own folder (`store::metrics`, `bridge::metrics`, `frontend::metrics`,
//! `sources::serial::metrics`, ...) and the gateway adds them here once at start-up
//! ([`Registry::add`]); components then update plain atomic handles from any thread without
//! locks, and only a scrape takes the registry's lock. Names all start with `fieldgate_`.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

/// The label set of a metric family: `(name, value)` pairs.
pub type Labels = Vec<(String, String)>;

/// One label.
pub fn label(name: &str, value: &str) -> Labels {
    vec![(name.into(), value.into())]
}

/// A component's metric families, added to the [`Registry`] once.
pub trait Register {
    /// Registers every family (under the registry's `fieldgate` prefix) and materialises
    /// the labels a scrape should show as zeros rather than absent.
    fn register(&self, r: &mut prometheus_client::registry::Registry);
}

/// The process's registry.
pub struct Registry {
    inner: Mutex<prometheus_client::registry::Registry>,
    started: Instant,
}

impl Registry {
    /// An empty registry; its names start with `fieldgate_`.
    pub fn new() -> Arc<Registry> {
        Arc::new(Registry {
            inner: Mutex::new(prometheus_client::registry::Registry::with_prefix(
                "fieldgate",
            )),
            started: Instant::now(),
        })
    }

    /// Adds a component's families.
    pub fn add(&self, part: &dyn Register) {
        let mut r = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        part.register(&mut r);
    }

    /// Seconds since the registry (the gateway) started.
    pub fn uptime_secs(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let r = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        if encode(&mut out, &r).is_err() {
            out.clear();
        }
        out
    }
}

/// The OTA and Modbus families, until those components own theirs like the others do
/// (issue 14 moves them into `ota/` and `sources/modbus/`).
pub struct Metrics {
    /// Modbus sources, by device and bus.
    pub modbus: ModbusMetrics,
    /// Firmware cache and OTA serving.
    pub ota: OtaMetrics,
}

impl Metrics {
    /// Fresh families (add them to a [`Registry`] to expose them).
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics {
            modbus: ModbusMetrics::default(),
            ota: OtaMetrics::default(),
        })
    }
}

impl Register for Metrics {
    fn register(&self, r: &mut prometheus_client::registry::Registry) {
        self.modbus.register(r);
        self.ota.register(r);
    }
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
    /// Registers the families under `fieldgate_ota_`.
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
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
    /// Registers the families under `fieldgate_modbus_`.
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
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
