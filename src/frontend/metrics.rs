//! The front end's metric families, `fieldgate_broker_*`: device connections, refusals and
//! why, ACL denials, rate limits, lowered deliveries, the retained and subscription limits.
//!
//! Owned here and added to the gateway's [`crate::metrics::Registry`] by the gateway before
//! the broker is built (the ingest takes one of its counters). Every label a scrape should show is materialised at registration, so an operator
//! sees zeros rather than absent series.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::auth::Action;
use crate::metrics::{label, Labels, Register};

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
    /// end without the local broker (see `ingest::Audience`).
    pub bypassed: Counter,
    /// Deliveries lowered to the publisher's QoS.
    pub downgraded: Counter,
    /// MQTT 5 deliveries whose message expiry passed before they could go.
    pub expired: Counter,
    /// MQTT 5 deliveries larger than the device's maximum packet size, not sent.
    pub too_large_for_device: Counter,
    /// PUBLISHes over `broker.max_publish_rate`, by the policy applied.
    rate_limited: Family<Labels, Counter>,
    /// Login attempts held back after failed logins from the same address.
    pub login_delayed: Counter,
    /// Subscriptions refused and retained messages not kept over their limits, by what.
    limited: Family<Labels, Counter>,
}

impl Register for BrokerMetrics {
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
            "expired",
            "MQTT 5 deliveries dropped because their message expiry passed",
            self.expired.clone(),
        );
        r.register(
            "too_large_for_device",
            "MQTT 5 deliveries over the device's maximum packet size, not sent",
            self.too_large_for_device.clone(),
        );
        r.register(
            "rate_limited",
            "Device publishes over broker.max_publish_rate, by the policy applied",
            self.rate_limited.clone(),
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
            self.limited.get_or_create(&label("what", w)).inc_by(0);
        }
        for a in ["publish", "subscribe", "deliver"] {
            self.denied.get_or_create(&label("action", a)).inc_by(0);
        }
    }
}

impl BrokerMetrics {
    /// Counts a refused connection.
    pub fn refuse(&self, reason: &str) {
        self.refused.get_or_create(&label("reason", reason)).inc();
    }

    /// The counter of subscriptions refused (`what = "subscriptions"`) or retained messages
    /// not kept (`"retained"`) over a limit, as a handle for whoever decides it.
    pub fn limit_counter(&self, what: &str) -> Counter {
        self.limited.get_or_create(&label("what", what)).clone()
    }

    /// Counts a subscription refused or a retained message not kept over a limit.
    pub fn limit(&self, what: &str) {
        self.limited.get_or_create(&label("what", what)).inc();
    }

    /// Counts an ACL denial.
    pub fn deny(&self, action: Action) {
        self.denied
            .get_or_create(&label("action", action.as_str()))
            .inc();
    }

    /// Counts a publish over the rate limit.
    pub fn rate_limit(&self, policy: &str) {
        self.rate_limited
            .get_or_create(&label("policy", policy))
            .inc();
    }

    /// Counts an ended session.
    pub fn closed(&self, reason: &str) {
        self.closed_by.get_or_create(&label("reason", reason)).inc();
    }
}
