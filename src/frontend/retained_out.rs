//! The retained messages the front end itself sends a device's new subscriptions.
//!
//! rumqttd 0.20 sends a new QoS 1/2 subscription at most as many retained messages as it
//! has free in-flight slots (100 per connection, hard-coded) and drops the rest, and sends
//! none when the same filter is subscribed again. So the front end sends them instead: after
//! the SUBACK it takes every matching kept message from the ingest's retained set
//! ([`crate::ingest::Ingest::retained_matching`]) and delivers them here, under packet ids of
//! its own, and it answers rumqttd's own retained deliveries upstream without passing them
//! on (see `session`).
//!
//! Pure bookkeeping, no I/O. Invariants:
//! - an own packet id is above [`FIRST_OWN_PKID`] (rumqttd numbers its deliveries 1..=100)
//!   and is not reused while it is outstanding;
//! - at most `window` own QoS 1/2 deliveries are unanswered at a time; the rest wait, in
//!   order (topic order within one SUBSCRIBE);
//! - a waiting retained message is dropped when a live message on its topic was delivered
//!   first (that one is newer), so a device never sees an older value after a newer one;
//! - a retained message from an MQTT 5 publisher goes with its properties, and with what is
//!   left of its message expiry; one that expired while it waited is not sent;
//! - what is outstanding or waiting ends with the connection (a resumed session gets the
//!   retained messages again by subscribing again).

use std::collections::{HashMap, VecDeque};

use rumqttc::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5;

use super::upstream::q5;
use crate::clock::now_ms;
use crate::ingest::Kept;

/// The first packet id the front end uses for its own deliveries. rumqttd 0.20 numbers its
/// deliveries to one connection 1..=100 (`MAX_INFLIGHT`); ids from here on never meet them.
pub const FIRST_OWN_PKID: u16 = 1024;

/// Where an own QoS 1/2 delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Sent at this QoS; waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Sent(QoS),
    /// QoS 2: PUBREL sent, waiting for PUBCOMP.
    Released,
}

/// What answers the device sends for an own delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    PubAck,
    PubRec,
    PubComp,
}

/// One connection's own retained deliveries.
#[derive(Debug)]
pub struct RetainedOut {
    waiting: VecDeque<(QoS, Kept)>,
    /// Topics in `waiting`, with how many entries each.
    waiting_topics: HashMap<String, usize>,
    outstanding: HashMap<u16, Stage>,
    next_pkid: u16,
    window: usize,
}

impl RetainedOut {
    /// At most `window` (at least 1) own QoS 1/2 deliveries unanswered at a time.
    pub fn new(window: usize) -> RetainedOut {
        RetainedOut {
            waiting: VecDeque::new(),
            waiting_topics: HashMap::new(),
            outstanding: HashMap::new(),
            next_pkid: FIRST_OWN_PKID,
            window: window.max(1),
        }
    }

    /// Queues retained messages (topic, QoS to deliver at, payload) for sending.
    pub fn queue(&mut self, msgs: impl IntoIterator<Item = (QoS, Kept)>) {
        for (qos, kept) in msgs {
            *self.waiting_topics.entry(kept.topic.clone()).or_default() += 1;
            self.waiting.push_back((qos, kept));
        }
    }

    /// A live message on `topic` went to the device: waiting retained ones of it are older.
    pub fn superseded(&mut self, topic: &str) {
        // The usual case, on every live delivery: nothing waits.
        if self.waiting.is_empty() {
            return;
        }
        if self.waiting_topics.remove(topic).is_some() {
            self.waiting.retain(|(_, k)| k.topic != topic);
        }
    }

    /// Own QoS 1/2 deliveries sent and not answered yet.
    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    /// Whether [`RetainedOut::take`] would return something now.
    pub fn ready(&self) -> bool {
        match self.waiting.front() {
            None => false,
            Some((QoS::AtMostOnce, _)) => true,
            Some(_) => self.outstanding.len() < self.window,
        }
    }

    /// Up to `max` publishes that may go to the device now, in order, and how many waiting
    /// ones expired instead.
    pub fn take(&mut self, max: usize) -> (Vec<v5::Publish>, usize) {
        let mut out = Vec::new();
        let mut expired = 0;
        let now = now_ms();
        while out.len() < max && self.ready() {
            let Some((qos, kept)) = self.waiting.pop_front() else {
                break;
            };
            if let Some(n) = self.waiting_topics.get_mut(&kept.topic) {
                *n -= 1;
                if *n == 0 {
                    self.waiting_topics.remove(&kept.topic);
                }
            }
            let mut properties = None;
            if let Some(k) = &kept.props {
                let mut props = k.properties.clone();
                match k.expiry_left(now) {
                    Some(0) => {
                        expired += 1;
                        continue;
                    }
                    Some(left) => props.message_expiry_interval = Some(left),
                    None => {}
                }
                properties = Some(props);
            }
            let mut p = v5::Publish {
                dup: false,
                qos: q5(qos),
                retain: true,
                topic: kept.topic.into_bytes().into(),
                pkid: 0,
                payload: kept.payload,
                properties,
            };
            if qos != QoS::AtMostOnce {
                p.pkid = self.pkid();
                self.outstanding.insert(p.pkid, Stage::Sent(qos));
            }
            out.push(p);
        }
        (out, expired)
    }

    /// A free own packet id (there are always some: the window is far below the range).
    fn pkid(&mut self) -> u16 {
        loop {
            let p = self.next_pkid;
            self.next_pkid = if p == u16::MAX { FIRST_OWN_PKID } else { p + 1 };
            if !self.outstanding.contains_key(&p) {
                return p;
            }
        }
    }

    /// The device answered `pkid`. `None`: not an own delivery (it answers rumqttd's).
    /// `Some(true)`: a PUBREL is due (QoS 2, PUBREC taken). `Some(false)`: nothing to send.
    pub fn answered(&mut self, pkid: u16, answer: Answer) -> Option<bool> {
        let stage = *self.outstanding.get(&pkid)?;
        match (stage, answer) {
            (Stage::Sent(QoS::ExactlyOnce), Answer::PubRec) => {
                self.outstanding.insert(pkid, Stage::Released);
                Some(true)
            }
            // A repeated PUBREC: PUBREL again (MQTT-4.3.3).
            (Stage::Released, Answer::PubRec) => Some(true),
            (Stage::Sent(QoS::AtLeastOnce), Answer::PubAck)
            | (Stage::Released, Answer::PubComp) => {
                self.outstanding.remove(&pkid);
                Some(false)
            }
            // An answer that does not fit the stage: the device's error; the id stays busy.
            _ => Some(false),
        }
    }

    /// Own deliveries unanswered, and retained messages waiting.
    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        (self.outstanding.len(), self.waiting.len())
    }
}

/// Merges the retained messages of several granted filters of one SUBSCRIBE: each topic
/// once, at the highest QoS any of them grants it (min(publisher's, granted) per filter).
pub fn merge(per_filter: impl IntoIterator<Item = (QoS, Vec<Kept>)>) -> Vec<(QoS, Kept)> {
    let mut best: HashMap<String, (QoS, Kept)> = HashMap::new();
    let mut order: Vec<String> = Vec::new();
    for (granted, msgs) in per_filter {
        for kept in msgs {
            // The kept QoS is at most 2 (the ingest's retained set clamps it).
            let q =
                rumqttc::mqttbytes::qos(kept.qos.min(granted as u8)).unwrap_or(QoS::ExactlyOnce);
            match best.get_mut(&kept.topic) {
                Some(slot) => {
                    if slot.0 < q {
                        slot.0 = q;
                    }
                }
                None => {
                    order.push(kept.topic.clone());
                    best.insert(kept.topic.clone(), (q, kept));
                }
            }
        }
    }
    order.into_iter().filter_map(|t| best.remove(&t)).collect()
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn kept(t: &str, q: u8) -> Kept {
        Kept {
            topic: t.to_string(),
            qos: q,
            payload: Bytes::from_static(b"v"),
            props: None,
        }
    }

    fn msg(t: &str, q: QoS) -> (QoS, Kept) {
        (q, kept(t, q as u8))
    }

    fn topic(p: &v5::Publish) -> &str {
        std::str::from_utf8(&p.topic).unwrap()
    }

    #[test]
    fn the_window_bounds_what_is_unanswered_and_qos0_does_not_count() {
        let mut r = RetainedOut::new(2);
        r.queue((0..5).map(|i| msg(&format!("a/{i}"), QoS::AtLeastOnce)));
        r.queue([msg("z", QoS::AtMostOnce)]);
        let first = r.take(64).0;
        assert_eq!(first.len(), 2);
        assert!(first.iter().all(|p| p.retain && p.pkid >= FIRST_OWN_PKID));
        assert_ne!(first[0].pkid, first[1].pkid);
        assert!(!r.ready());
        assert_eq!(r.answered(first[0].pkid, Answer::PubAck), Some(false));
        let next = r.take(64).0;
        assert_eq!(next.len(), 1);
        assert_eq!(topic(&next[0]), "a/2");
        // Not an own id: it answers rumqttd.
        assert_eq!(r.answered(7, Answer::PubAck), None);
        for p in [first[1].pkid, next[0].pkid] {
            r.answered(p, Answer::PubAck);
        }
        // The last two, and the QoS 0 one behind them with no window to wait for.
        let rest = r.take(64).0;
        let topics: Vec<&str> = rest.iter().map(topic).collect();
        assert_eq!(topics, ["a/3", "a/4", "z"]);
        assert_eq!((rest[2].qos, rest[2].pkid), (q5(QoS::AtMostOnce), 0));
        for p in &rest[..2] {
            r.answered(p.pkid, Answer::PubAck);
        }
        assert_eq!(r.counts(), (0, 0));
    }

    #[test]
    fn qos2_needs_pubrec_then_pubcomp() {
        let mut r = RetainedOut::new(1);
        r.queue([msg("a", QoS::ExactlyOnce), msg("b", QoS::ExactlyOnce)]);
        let p = r.take(8).0;
        assert_eq!(p.len(), 1);
        let id = p[0].pkid;
        assert_eq!(r.answered(id, Answer::PubAck), Some(false));
        assert_eq!(r.answered(id, Answer::PubRec), Some(true));
        assert_eq!(r.answered(id, Answer::PubRec), Some(true));
        assert!(!r.ready());
        assert_eq!(r.answered(id, Answer::PubComp), Some(false));
        assert_eq!(r.take(8).0.len(), 1);
    }

    #[test]
    fn a_live_message_drops_the_older_retained_one_waiting() {
        let mut r = RetainedOut::new(1);
        r.queue([
            msg("a", QoS::AtLeastOnce),
            msg("b", QoS::AtLeastOnce),
            msg("c", QoS::AtLeastOnce),
        ]);
        let a = r.take(8).0;
        r.superseded("b");
        r.superseded("nothing");
        r.answered(a[0].pkid, Answer::PubAck);
        let next = r.take(8).0;
        assert_eq!(topic(&next[0]), "c");
        assert_eq!(r.counts(), (1, 0));
    }

    #[test]
    fn packet_ids_wrap_within_the_own_range_and_skip_busy_ones() {
        let mut r = RetainedOut::new(4);
        r.next_pkid = u16::MAX;
        r.queue([msg("a", QoS::AtLeastOnce), msg("b", QoS::AtLeastOnce)]);
        let p = r.take(8).0;
        assert_eq!([p[0].pkid, p[1].pkid], [u16::MAX, FIRST_OWN_PKID]);
        r.next_pkid = u16::MAX;
        r.queue([msg("c", QoS::AtLeastOnce)]);
        assert_eq!(r.take(8).0[0].pkid, FIRST_OWN_PKID + 1);
    }

    #[test]
    fn a_retained_message_goes_with_its_properties_and_not_once_it_expired() {
        use std::sync::Arc;

        use crate::ingest::KeptProps;
        let mut r = RetainedOut::new(4);
        let props = |expiry: u32, at_ms: u64| {
            Some(Arc::new(KeptProps {
                properties: v5::PublishProperties {
                    message_expiry_interval: Some(expiry),
                    content_type: Some("text/plain".into()),
                    ..Default::default()
                },
                at_ms,
            }))
        };
        let mut fresh = kept("fresh", 1);
        fresh.props = props(60, now_ms() - 10_500);
        let mut stale = kept("stale", 1);
        stale.props = props(5, now_ms() - 10_000);
        r.queue([(QoS::AtLeastOnce, stale), (QoS::AtLeastOnce, fresh)]);
        let out = r.take(8).0;
        assert_eq!(out.len(), 1);
        let p = out[0].properties.as_ref().unwrap();
        assert_eq!(topic(&out[0]), "fresh");
        assert_eq!(p.content_type.as_deref(), Some("text/plain"));
        assert_eq!(p.message_expiry_interval, Some(50));
    }

    #[test]
    fn merge_keeps_each_topic_once_at_the_best_granted_qos() {
        let m = merge([
            (QoS::AtMostOnce, vec![kept("a", 2), kept("b", 1)]),
            (QoS::ExactlyOnce, vec![kept("a", 2), kept("c", 1)]),
        ]);
        let got: Vec<(String, QoS)> = m.into_iter().map(|(q, k)| (k.topic, q)).collect();
        assert_eq!(
            got,
            [
                ("a".to_string(), QoS::ExactlyOnce),
                ("b".to_string(), QoS::AtMostOnce),
                ("c".to_string(), QoS::AtLeastOnce)
            ]
        );
    }
}
