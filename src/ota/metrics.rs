//! OTA's metric families, `fieldgate_ota_*`: downloads from the cloud and their results,
//! bytes fetched and served (MQTT and HTTP), chunk requests and their latency, refusals by
//! kind, download slots in use and devices waiting, the cache's size, devices by state.
//!
//! Owned here; [`super::Ota::build`] adds them to the gateway's registry.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::metrics::{label, Labels, Register};

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

impl Register for OtaMetrics {
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
}

impl OtaMetrics {
    /// Counts a fetch result.
    pub fn fetch(&self, result: &str) {
        self.fetches.get_or_create(&label("result", result)).inc();
    }

    /// Counts bytes served.
    pub fn served(&self, via: &str, n: u64) {
        self.served_bytes
            .get_or_create(&label("via", via))
            .inc_by(n);
    }

    /// Counts an error.
    pub fn error(&self, kind: &str) {
        self.errors.get_or_create(&label("kind", kind)).inc();
    }

    /// Errors of one kind so far.
    pub fn errors_of(&self, kind: &str) -> u64 {
        self.errors.get_or_create(&label("kind", kind)).get()
    }
}

impl OtaMetrics {
    /// Fresh families (add them to a registry to expose them).
    pub fn new() -> Arc<OtaMetrics> {
        Arc::new(OtaMetrics::default())
    }
}
