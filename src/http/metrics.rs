//! The endpoint's metric families, `fieldgate_http_*`: sign-ins by result and requests
//! refused by why (no session, a wrong `/metrics` token, too many connections).
//!
//! Owned here and added to the gateway's registry when the endpoint is built; both
//! families show every label as zero from the start. A refused sign-in is also logged, at
//! most once per [`LOG_EVERY`] with the number refused since the last line, so a guessing
//! client cannot flood the journal.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tracing::warn;

use crate::metrics::{label, Labels, Register};

/// Shortest time between two log lines about refused sign-ins.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// Metrics of the HTTP endpoint.
#[derive(Debug, Default)]
pub struct HttpMetrics {
    logins: Family<Labels, Counter>,
    refused: Family<Labels, Counter>,
    unlogged: AtomicU64,
    logged_at: Mutex<Option<Instant>>,
}

impl Register for HttpMetrics {
    fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("http");
        r.register(
            "logins",
            "Sign-ins to the operator page, by result",
            self.logins.clone(),
        );
        r.register(
            "refused",
            "Requests refused, by reason: login_required, metrics_token, busy",
            self.refused.clone(),
        );
        for res in ["ok", "refused"] {
            self.logins.get_or_create(&label("result", res)).inc_by(0);
        }
        for why in ["login_required", "metrics_token", "busy"] {
            self.refused.get_or_create(&label("reason", why)).inc_by(0);
        }
    }
}

impl HttpMetrics {
    /// Counts a sign-in (`ok` or `refused`); a refused one is logged, rate-limited.
    pub fn login(&self, ok: bool, peer: std::net::IpAddr) {
        let result = if ok { "ok" } else { "refused" };
        self.logins.get_or_create(&label("result", result)).inc();
        if ok {
            return;
        }
        let n = self.unlogged.fetch_add(1, Ordering::Relaxed) + 1;
        let mut at = self.logged_at.lock().unwrap_or_else(|e| e.into_inner());
        if at.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            *at = Some(Instant::now());
            self.unlogged.fetch_sub(n, Ordering::Relaxed);
            warn!(%peer, refused = n, "http: wrong user or password for the operator page");
        }
    }

    /// Counts a refused request.
    pub fn refuse(&self, reason: &str) {
        self.refused.get_or_create(&label("reason", reason)).inc();
    }
}
