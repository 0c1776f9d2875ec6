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
