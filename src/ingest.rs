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
//! - one publish is one journal entry, so its ticket covers both;
//! - [`Ingest::offer`] never waits: a full journal hands the entry back, and the caller
//!   decides (a device session waits with [`Journal::append`], which withholds the PUBACK;
//!   QoS 0 and sources count it as `dropped{reason="refused"}`).

use std::sync::Arc;

use bytes::Bytes;

use crate::metrics::{DropReason, Metrics};
use crate::store::journal::{Entry, Journal};
use crate::topic::FilterSet;

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

/// The entry point; cheap to clone (one per session and source).
#[derive(Clone)]
pub struct Ingest {
    routing: Arc<Routing>,
    journal: Option<Journal>,
    metrics: Arc<Metrics>,
}

impl Ingest {
    /// Routes with `routing` into `journal`.
    pub fn new(routing: Routing, journal: Journal, metrics: Arc<Metrics>) -> Ingest {
        Ingest {
            routing: Arc::new(routing),
            journal: Some(journal),
            metrics,
        }
    }

    /// An ingest that queues nothing (unit tests of the broker and sources).
    pub fn local_only(metrics: Arc<Metrics>) -> Ingest {
        Ingest {
            routing: Arc::new(Routing {
                forward: FilterSet::new(Vec::<String>::new()),
                exclude: FilterSet::new(Vec::<String>::new()),
                cloud_prefix: String::new(),
                downlink: FilterSet::new(Vec::<String>::new()),
            }),
            journal: None,
            metrics,
        }
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
}
