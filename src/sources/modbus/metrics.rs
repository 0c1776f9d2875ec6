//! The Modbus sources' metric families, `fieldgate_modbus_*`, labelled by `device` (config
//! name) or `bus`: reads, failed attempts by kind, tag readings of bad quality, round trips,
//! writes, online devices, poll cycles, overruns and requests per cycle.
//!
//! Owned here; [`super::Modbus::build`] adds them to the gateway's registry.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::metrics::{Labels, Register};

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

impl Register for ModbusMetrics {
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

impl ModbusMetrics {
    /// Fresh families (add them to a registry to expose them).
    pub fn new() -> Arc<ModbusMetrics> {
        Arc::new(ModbusMetrics::default())
    }
}
