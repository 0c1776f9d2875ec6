//! Where a message enters the durable path: the one decision "does this go to the cloud?"
//! and the hand-over to the [`journal`](crate::store::journal).
//!
//! Every publish that may be meant for the cloud passes here before the local broker sees
//! it: device publishes in the front end ([`crate::frontend::session`]), and what the
//! gateway's own sources and OTA manager publish ([`crate::sources::LocalTx`]). Nothing
//! taps the broker afterwards, so nothing can skip ahead of the queue.
//!
//! Invariants:
//! - a message is queued iff its topic matches `uplink.forward`, matches no
//!   `uplink.exclude`, and its cloud topic matches no downlink subscription (the loop guard:
//!   forwarding it would come straight back down); loop-guarded messages are counted as
//!   `dropped{reason="loop"}`;
//! - a retained publish is also kept (the store's retained tree, for restarts); an empty
//!   publish without the retain flag deletes the kept copy too, as rumqttd 0.20 drops its own;
//! - kept retained messages stay within `broker.max_retained_messages` and
//!   `max_retained_bytes` (topic + payload): [`Ingest::admit_retain`] decides before the
//!   publish goes anywhere, and one over the budget is delivered as a plain publish (not kept
//!   by rumqttd, the store or the cloud) and counted as `limited{what="retained"}`. The kept
//!   messages are also held here (within that budget), for the front end to send new
//!   subscriptions ([`Ingest::retained_matching`]);
//! - one publish is one journal entry, so its ticket covers both;
//! - [`Ingest::offer`] never waits: a full journal hands the entry back, and the caller
//!   decides (a device session waits with [`Journal::append`], which withholds the PUBACK;
//!   QoS 0 and sources count it as `dropped{reason="refused"}`).
//! - [`Audience`] knows every topic filter a local client may receive on (device sessions,
//!   persistent ones while they are away, and the gateway's own links). It only ever
//!   over-approximates: a filter goes when its client unsubscribes or its session is
//!   cleaned, never sooner. A non-retained publish that matches none of them has no local
//!   reader, and the front end answers it itself instead of handing it to rumqttd.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use serde::{Deserialize, Serialize};

use prometheus_client::metrics::counter::Counter;

use crate::problem::{problem, Problem};
use crate::store::journal::{Entry, Journal};
use crate::store::metrics::{DropReason, StoreMetrics};
use crate::topic::{self, FilterSet};

/// Which local messages go up, and the loop guard.
#[derive(Debug, Clone)]
pub struct Routing {
    /// `uplink.forward`.
    pub forward: FilterSet,
    /// `uplink.exclude` (plus the OTA chunk topics).
    pub exclude: FilterSet,
    /// Expanded `uplink.cloud_prefix`.
    pub cloud_prefix: String,
    /// Expanded `downlink.subscribe` (cloud-side filters).
    pub downlink: FilterSet,
}

impl Routing {
    /// The routing of `[uplink]`, with `downlink` (`downlink.subscribe`, the cloud filters
    /// whose topics would loop); `exclude` adds the topics other components keep on the LAN
    /// (OTA's chunk topics); `expand` fills in `{gateway_id}`.
    pub fn new(
        uplink: &UplinkConfig,
        downlink: &[String],
        exclude: Vec<String>,
        expand: &dyn Fn(&str) -> String,
    ) -> Routing {
        Routing {
            forward: FilterSet::new(uplink.forward.clone()),
            exclude: FilterSet::new(uplink.exclude.iter().cloned().chain(exclude)),
            cloud_prefix: expand(&uplink.cloud_prefix),
            downlink: FilterSet::new(downlink.iter().map(|f| expand(f))),
        }
    }
}

/// What happens to one local message.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Queue it.
    Forward,
    /// Not meant for the cloud.
    Skip,
    /// Would loop back through the downlink.
    Loop,
}

impl Routing {
    /// Decides for one topic.
    pub fn verdict(&self, topic: &str) -> Verdict {
        if !self.forward.matches(topic) || self.exclude.matches(topic) {
            return Verdict::Skip;
        }
        if self
            .downlink
            .matches(&format!("{}{}", self.cloud_prefix, topic))
        {
            return Verdict::Loop;
        }
        Verdict::Forward
    }
}

/// The outcome of [`Ingest::offer`].
#[derive(Debug)]
pub enum Offer {
    /// Nothing to make durable: the local broker is the whole path.
    Local,
    /// In the journal: durable once the journal's watch reaches this ticket.
    Queued(u64),
    /// The journal is full; the entry comes back to be appended by waiting.
    Full(Entry),
}

/// The topic filters local clients are subscribed to, by client (see the module header).
#[derive(Default)]
pub struct Audience {
    inner: RwLock<AudienceInner>,
}

#[derive(Default)]
struct AudienceInner {
    by_client: HashMap<String, HashSet<String>>,
    /// Filter -> clients subscribed to it.
    filters: HashMap<String, usize>,
}

impl Audience {
    /// `client` subscribed to `filter`.
    pub fn add(&self, client: &str, filter: &str) {
        let mut g = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let new = g
            .by_client
            .entry(client.to_string())
            .or_default()
            .insert(filter.to_string());
        if new {
            *g.filters.entry(filter.to_string()).or_default() += 1;
        }
    }

    /// Whether `client` holds `filter`.
    pub fn has(&self, client: &str, filter: &str) -> bool {
        let g = self.inner.read().unwrap_or_else(|e| e.into_inner());
        g.by_client.get(client).is_some_and(|s| s.contains(filter))
    }

    /// How many filters `client` holds.
    pub fn count(&self, client: &str) -> usize {
        let g = self.inner.read().unwrap_or_else(|e| e.into_inner());
        g.by_client.get(client).map_or(0, |s| s.len())
    }

    /// `client` unsubscribed from `filter`.
    pub fn remove(&self, client: &str, filter: &str) {
        let mut g = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let gone = g
            .by_client
            .get_mut(client)
            .is_some_and(|set| set.remove(filter));
        if gone {
            forget(&mut g.filters, filter);
        }
    }

    /// `client`'s session is gone from the broker (cleaned): all its filters go.
    pub fn clear(&self, client: &str) {
        let mut g = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if let Some(set) = g.by_client.remove(client) {
            for f in set {
                forget(&mut g.filters, &f);
            }
        }
    }

    /// Whether `client` holds a filter that matches `topic`.
    pub fn client_reaches(&self, client: &str, topic: &str) -> bool {
        let g = self.inner.read().unwrap_or_else(|e| e.into_inner());
        g.by_client
            .get(client)
            .is_some_and(|s| s.iter().any(|f| crate::topic::matches(f, topic)))
    }

    /// Whether any local client may receive a publish on `topic`.
    pub fn reaches(&self, topic: &str) -> bool {
        let g = self.inner.read().unwrap_or_else(|e| e.into_inner());
        g.filters.keys().any(|f| crate::topic::matches(f, topic))
    }
}

fn forget(filters: &mut HashMap<String, usize>, filter: &str) {
    if let Some(n) = filters.get_mut(filter) {
        *n -= 1;
        if *n == 0 {
            filters.remove(filter);
        }
    }
}

/// A kept retained message, as [`Ingest::retained_matching`] gives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Kept {
    /// Its topic.
    pub topic: String,
    /// The publisher's QoS.
    pub qos: u8,
    /// Its payload.
    pub payload: Bytes,
    /// What an MQTT 5 publisher sent with it (in memory only: a restart keeps the message,
    /// not its properties).
    pub props: Option<Arc<KeptProps>>,
}

/// The MQTT 5 properties of a kept retained message, and when it was accepted (ms since the
/// Unix epoch; its message expiry counts from there).
#[derive(Debug, Clone, PartialEq)]
pub struct KeptProps {
    /// The publisher's properties (topic alias and subscription ids removed).
    pub properties: PublishProperties,
    /// When it was accepted.
    pub at_ms: u64,
}

impl KeptProps {
    /// Seconds of message expiry left at `now_ms`: None without an expiry, Some(0) once it
    /// passed.
    pub fn expiry_left(&self, now_ms: u64) -> Option<u32> {
        self.properties.message_expiry_interval.map(|e| {
            let waited = (now_ms.saturating_sub(self.at_ms) / 1000).min(u32::MAX as u64) as u32;
            e.saturating_sub(waited)
        })
    }

    /// Bytes the properties add to the retained budget.
    fn size(&self) -> u64 {
        let p = &self.properties;
        let user: usize = p
            .user_properties
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum();
        (user
            + p.content_type.as_ref().map_or(0, String::len)
            + p.response_topic.as_ref().map_or(0, String::len)
            + p.correlation_data.as_ref().map_or(0, Bytes::len)) as u64
    }
}

/// One kept retained message in the set: QoS, payload, properties, and its size in the
/// budget.
type KeptEntry = (u8, Bytes, Option<Arc<KeptProps>>, u64);

/// The kept retained messages by topic, against the limits; their size is topic + payload +
/// properties bytes.
#[derive(Debug)]
struct RetainedSet {
    kept: HashMap<String, KeptEntry>,
    bytes: u64,
    max_messages: usize,
    max_bytes: u64,
    /// When a refusal was last logged (at most one WARN per 10 s).
    warned: Option<Instant>,
}

impl RetainedSet {
    fn unlimited() -> RetainedSet {
        RetainedSet {
            kept: HashMap::new(),
            bytes: 0,
            max_messages: usize::MAX,
            max_bytes: u64::MAX,
            warned: None,
        }
    }

    fn size(topic: &str, payload: &Bytes) -> u64 {
        (topic.len() + payload.len()) as u64
    }

    fn remove(&mut self, topic: &str) {
        if let Some((_, _, _, size)) = self.kept.remove(topic) {
            self.bytes -= size;
        }
    }

    /// Keeps `payload` as `topic`'s retained message if it fits; false: it does not.
    fn keep(&mut self, topic: &str, qos: u8, payload: &Bytes, props: Option<KeptProps>) -> bool {
        let old = self.kept.get(topic).map(|k| k.3);
        let size = Self::size(topic, payload) + props.as_ref().map_or(0, KeptProps::size);
        let bytes = self.bytes - old.unwrap_or(0) + size;
        if bytes > self.max_bytes || (old.is_none() && self.kept.len() >= self.max_messages) {
            return false;
        }
        // A copy: the payload may be a slice of a connection's read buffer.
        let payload = Bytes::copy_from_slice(payload);
        let props = props.map(Arc::new);
        self.kept
            .insert(topic.to_string(), (qos.min(2), payload, props, size));
        self.bytes = bytes;
        true
    }
}

/// `[uplink]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UplinkConfig {
    /// Local topic filters whose messages are queued for the cloud. Empty: nothing is
    /// queued (a local-only gateway).
    pub forward: Vec<String>,
    /// Local topic filters never queued (checked after `forward`).
    pub exclude: Vec<String>,
    /// Cloud topic = this prefix + local topic. `{gateway_id}` is replaced.
    pub cloud_prefix: String,
}

impl Default for UplinkConfig {
    fn default() -> Self {
        UplinkConfig {
            forward: vec!["#".into()],
            exclude: vec!["cmd/#".into(), "$SYS/#".into()],
            cloud_prefix: "fieldgate/{gateway_id}/".into(),
        }
    }
}

impl UplinkConfig {
    /// Every problem of `[uplink]`; `expand` fills in `{gateway_id}`.
    pub fn validate(&self, expand: &dyn Fn(&str) -> String) -> Vec<Problem> {
        let mut p = Vec::new();
        for (i, f) in self.forward.iter().enumerate() {
            if let Err(e) = topic::validate_filter(f) {
                p.push(problem(
                    format!("uplink.forward[{i}]"),
                    format!("{f:?}: {e}"),
                ));
            }
        }
        for (i, f) in self.exclude.iter().enumerate() {
            if let Err(e) = topic::validate_filter(f) {
                p.push(problem(
                    format!("uplink.exclude[{i}]"),
                    format!("{f:?}: {e}"),
                ));
            }
        }
        let prefix = expand(&self.cloud_prefix);
        if prefix.contains(['+', '#']) {
            p.push(problem(
                "uplink.cloud_prefix",
                "must not contain '+' or '#'; it is put in front of every topic",
            ));
        }
        p
    }
}

/// The entry point; cheap to clone (one per session and source).
#[derive(Clone)]
pub struct Ingest {
    routing: Arc<Routing>,
    journal: Option<Journal>,
    metrics: Arc<StoreMetrics>,
    /// `fieldgate_broker_limited_total{what="retained"}`: the front end's family, handed
    /// in as a plain counter.
    retained_refused: Counter,
    audience: Arc<Audience>,
    retained: Arc<Mutex<RetainedSet>>,
}

impl Ingest {
    /// Routes with `routing` into `journal`; drops are counted in the queue's `metrics`,
    /// retained messages not kept over the budget in `retained_refused`.
    pub fn new(
        routing: Routing,
        journal: Journal,
        metrics: Arc<StoreMetrics>,
        retained_refused: Counter,
    ) -> Ingest {
        Ingest {
            routing: Arc::new(routing),
            journal: Some(journal),
            metrics,
            retained_refused,
            audience: Arc::default(),
            retained: Arc::new(Mutex::new(RetainedSet::unlimited())),
        }
    }

    /// Sets the retained budget (`broker.max_retained_messages`, `max_retained_bytes`) and
    /// what is kept already (topic, QoS, payload): at start, before any publish.
    pub fn set_retained(&self, max_messages: usize, max_bytes: u64, kept: &[(String, u8, Bytes)]) {
        let mut b = self.retained_set();
        b.max_messages = max_messages;
        b.max_bytes = max_bytes;
        b.kept.clear();
        b.bytes = 0;
        for (topic, qos, payload) in kept {
            let size = RetainedSet::size(topic, payload);
            b.bytes += size;
            b.kept
                .insert(topic.clone(), (*qos, payload.clone(), None, size));
        }
    }

    fn retained_set(&self) -> std::sync::MutexGuard<'_, RetainedSet> {
        self.retained.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decides whether a publish keeps its retain flag: false when it is not retained, or
    /// when keeping it would pass the retained budget (then it is counted and goes on as a
    /// plain publish). An empty payload always passes: it deletes the kept message. A kept
    /// message is remembered here too, for [`Ingest::retained_matching`].
    pub fn admit_retain(&self, topic: &str, payload: &Bytes, qos: u8, retain: bool) -> bool {
        self.admit_retain_with(topic, payload, qos, retain, None)
    }

    /// [`Ingest::admit_retain`] for a publish with MQTT 5 properties, kept with it.
    pub fn admit_retain_with(
        &self,
        topic: &str,
        payload: &Bytes,
        qos: u8,
        retain: bool,
        props: Option<KeptProps>,
    ) -> bool {
        if !retain && !payload.is_empty() {
            // The ordinary publish: nothing to keep or delete, no lock.
            return false;
        }
        let mut b = self.retained_set();
        if payload.is_empty() {
            b.remove(topic);
            return retain;
        }
        if b.keep(topic, qos, payload, props) {
            return true;
        }
        self.retained_refused.inc();
        if b.warned.is_none_or(|t| t.elapsed().as_secs() >= 10) {
            b.warned = Some(Instant::now());
            tracing::warn!(
                topic,
                kept = b.kept.len(),
                bytes = b.bytes,
                max_messages = b.max_messages,
                max_bytes = b.max_bytes,
                "retained message not kept: broker.max_retained_messages or max_retained_bytes \
                 reached (delivered as a plain publish)"
            );
        }
        false
    }

    /// The kept retained messages whose topic `filter` matches, in topic order, but those
    /// whose message expiry passed at `now_ms`. What the front end sends a subscription
    /// (rumqttd 0.20 sends at most its in-flight limit of them, and none on a repeated
    /// SUBSCRIBE).
    pub fn retained_matching(&self, filter: &str, now_ms: u64) -> Vec<Kept> {
        let b = self.retained_set();
        let mut v: Vec<Kept> = b
            .kept
            .iter()
            .filter(|(t, _)| crate::topic::matches(filter, t))
            .filter(|(_, k)| {
                k.2.as_ref()
                    .and_then(|p| p.expiry_left(now_ms))
                    .is_none_or(|left| left > 0)
            })
            .map(|(t, (q, p, props, _))| Kept {
                topic: t.clone(),
                qos: *q,
                payload: p.clone(),
                props: props.clone(),
            })
            .collect();
        drop(b);
        v.sort_by(|a, b| a.topic.cmp(&b.topic));
        v
    }

    /// An ingest that queues nothing (unit tests of the broker and sources).
    pub fn local_only() -> Ingest {
        Ingest {
            routing: Arc::new(Routing {
                forward: FilterSet::new(Vec::<String>::new()),
                exclude: FilterSet::new(Vec::<String>::new()),
                cloud_prefix: String::new(),
                downlink: FilterSet::new(Vec::<String>::new()),
            }),
            journal: None,
            metrics: StoreMetrics::new(),
            retained_refused: Counter::default(),
            audience: Arc::default(),
            retained: Arc::new(Mutex::new(RetainedSet::unlimited())),
        }
    }

    /// Who may receive local publishes.
    pub fn audience(&self) -> &Audience {
        &self.audience
    }

    /// Whether a publish on `topic` must go through the local broker: it is retained (the
    /// broker keeps it), a local client may receive it, or nothing queues it (no journal:
    /// the broker is the whole path).
    pub fn needs_broker(&self, topic: &str, retain: bool) -> bool {
        retain || self.journal.is_none() || self.audience.reaches(topic)
    }

    /// The journal, when there is one.
    pub fn journal(&self) -> Option<&Journal> {
        self.journal.as_ref()
    }

    /// Offers one publish: decides, and appends without waiting.
    pub fn offer(&self, topic: &str, payload: &Bytes, qos: u8, retain: bool) -> Offer {
        let Some(journal) = &self.journal else {
            return Offer::Local;
        };
        let queue = match self.routing.verdict(topic) {
            Verdict::Forward => true,
            Verdict::Loop => {
                self.metrics.count_drop(DropReason::Loop, 1);
                false
            }
            Verdict::Skip => false,
        };
        let keep = (retain || payload.is_empty()).then_some(qos.min(2));
        if !queue && keep.is_none() {
            return Offer::Local;
        }
        let entry = Entry {
            topic: topic.to_string(),
            payload: payload.clone(),
            retain,
            keep,
            queue,
            ts_ms: 0,
        };
        match journal.try_append(entry) {
            Ok(t) => Offer::Queued(t),
            Err(e) => Offer::Full(e),
        }
    }

    /// Offers a publish that no one waits for (QoS 0, a source's reading, a will): a full
    /// journal costs the message, counted as `refused`. Returns whether it was taken.
    pub fn offer_or_count(&self, topic: &str, payload: &Bytes, qos: u8, retain: bool) -> bool {
        match self.offer(topic, payload, qos, retain) {
            Offer::Full(e) => {
                if e.queue {
                    self.metrics.count_drop(DropReason::Refused, 1);
                }
                false
            }
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        let r = Routing {
            forward: FilterSet::new(["#".to_string()]),
            exclude: FilterSet::new(["cmd/#".to_string()]),
            cloud_prefix: "fieldgate/gw/".into(),
            downlink: FilterSet::new(["fieldgate/gw/cmd/#".to_string(), "fieldgate/gw/x/#".into()]),
        };
        assert_eq!(r.verdict("dev/1/temp"), Verdict::Forward);
        assert_eq!(r.verdict("cmd/dev1/set"), Verdict::Skip);
        assert_eq!(r.verdict("x/1"), Verdict::Loop);
    }

    #[test]
    fn audience_keeps_a_filter_while_any_client_holds_it() {
        let a = Audience::default();
        assert!(!a.reaches("dev/1/t"));
        a.add("c1", "dev/+/t");
        a.add("c2", "dev/+/t");
        a.add("c2", "dev/+/t");
        assert!(a.reaches("dev/1/t"));
        a.remove("c1", "dev/+/t");
        assert!(a.reaches("dev/1/t"), "c2 still holds it");
        a.clear("c2");
        assert!(!a.reaches("dev/1/t"));
        a.add("c3", "#");
        assert!(a.reaches("anything/at/all"));
        assert!(!a.reaches("$SYS/x"), "# does not match $ topics");
        a.remove("c3", "#");
        assert!(!a.reaches("anything/at/all"));
    }
}
