//! Which queued record the bridge sends next: a live lane and a replay lane over one queue,
//! keeping per-topic FIFO order.
//!
//! At every (re)connect the queue splits at `live_start` (the next sequence number at that
//! moment): records below it are the backlog (replay lane, paced), records from it on are live.
//! A live record goes out at once unless its topic still has unsent backlog; then it is
//! deferred and the replay lane sends it in its turn. So a source that was cut off keeps its
//! order, and a source with no backlog is not held behind someone else's long drain. When the
//! replay lane reaches the live lane's position the two merge into one unpaced lane.
//!
//! Pure bookkeeping: no I/O. The bridge reads records and asks `live_take`/`replay_take`.
//!
//! Invariants:
//! - every record from the queue head on is offered to exactly one lane's `take` that returns
//!   true, unless it was removed from the queue first (acknowledged, dropped);
//! - for one topic, sends happen in sequence order.

use std::collections::{BTreeSet, HashMap};

/// Lane state for one cloud session.
#[derive(Debug)]
pub struct Lanes {
    replay_next: u64,
    live_next: u64,
    merged: bool,
    /// Topic -> records of that topic the replay lane still has to send.
    backlog: HashMap<String, u64>,
    /// Sequence numbers at or above `replay_next` that the live lane already sent.
    sent_live: BTreeSet<u64>,
}

impl Lanes {
    /// `head`: first queued sequence number; `live_start`: next to be appended; `backlog`: per
    /// topic record counts in `[head, live_start)`.
    pub fn new(head: u64, live_start: u64, backlog: HashMap<String, u64>) -> Lanes {
        let merged = head >= live_start || backlog.is_empty();
        Lanes {
            replay_next: if merged { live_start } else { head },
            live_next: if merged {
                head.min(live_start)
            } else {
                live_start
            },
            merged,
            backlog,
            sent_live: BTreeSet::new(),
        }
    }

    /// True once the replay lane has caught up.
    pub fn merged(&self) -> bool {
        self.merged
    }

    /// Next sequence number the live lane looks at.
    pub fn live_next(&self) -> u64 {
        self.live_next
    }

    /// The range the replay lane reads next, `[from, to)`, or `None` once merged.
    pub fn replay_range(&self) -> Option<(u64, u64)> {
        (!self.merged).then_some((self.replay_next, self.live_next))
    }

    /// The live lane reached record `seq` of `topic`: true to send it now, false when it is
    /// deferred to the replay lane.
    pub fn live_take(&mut self, seq: u64, topic: &str) -> bool {
        self.live_next = self.live_next.max(seq + 1);
        if self.merged {
            return true;
        }
        match self.backlog.get_mut(topic) {
            Some(n) => {
                *n += 1;
                false
            }
            None => {
                self.sent_live.insert(seq);
                true
            }
        }
    }

    /// The replay lane reached record `seq` of `topic`: true to send it.
    pub fn replay_take(&mut self, seq: u64, topic: &str) -> bool {
        self.replay_next = self.replay_next.max(seq + 1);
        if self.sent_live.remove(&seq) {
            return false;
        }
        if let Some(n) = self.backlog.get_mut(topic) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.backlog.remove(topic);
            }
        }
        true
    }

    /// The replay lane found nothing more below `to` (the end of its last `replay_range`):
    /// it has caught up, and the lanes merge.
    pub fn replay_exhausted(&mut self, to: u64) {
        self.replay_next = self.replay_next.max(to);
        if self.replay_next >= self.live_next {
            self.merged = true;
            self.backlog.clear();
            self.sent_live.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives both lanes over a list of (seq, topic) like the bridge does, live first.
    fn drive(
        lanes: &mut Lanes,
        records: &[(u64, &str)],
        appended_live: &[(u64, &str)],
    ) -> Vec<u64> {
        let mut sent = Vec::new();
        for (s, t) in appended_live {
            if lanes.live_take(*s, t) {
                sent.push(*s);
            }
        }
        while let Some((from, to)) = lanes.replay_range() {
            let batch: Vec<_> = records
                .iter()
                .chain(appended_live.iter())
                .filter(|(s, _)| *s >= from && *s < to)
                .collect();
            if batch.is_empty() {
                lanes.replay_exhausted(to);
                continue;
            }
            for (s, t) in batch {
                if lanes.replay_take(*s, t) {
                    sent.push(*s);
                }
            }
        }
        sent
    }

    #[test]
    fn empty_backlog_is_merged() {
        let l = Lanes::new(5, 5, HashMap::new());
        assert!(l.merged());
        assert_eq!(l.live_next(), 5);
    }

    #[test]
    fn topic_without_backlog_goes_live_and_order_holds_per_topic() {
        let backlog = [(1, "a"), (2, "a"), (3, "b")];
        let counts = HashMap::from([("a".to_string(), 2), ("b".to_string(), 1)]);
        let mut l = Lanes::new(1, 4, counts);
        let live = [(4, "c"), (5, "a"), (6, "c")];
        let sent = drive(&mut l, &backlog, &live);
        // c went first (live), a's live record waited behind a's backlog.
        assert_eq!(&sent[..2], &[4, 6]);
        let pos = |x| sent.iter().position(|s| *s == x).unwrap();
        assert!(pos(1) < pos(2) && pos(2) < pos(5));
        let mut all = sent.clone();
        all.sort();
        assert_eq!(all, vec![1, 2, 3, 4, 5, 6], "each record exactly once");
        assert!(l.merged());
    }

    #[test]
    fn gap_in_queue_still_merges() {
        // Backlog counted 2 records of "a" but one was evicted before replay read it.
        let counts = HashMap::from([("a".to_string(), 2)]);
        let mut l = Lanes::new(1, 3, counts);
        let sent = drive(&mut l, &[(2, "a")], &[(3, "a")]);
        assert_eq!(sent, vec![2, 3]);
        assert!(l.merged());
        assert!(l.live_take(4, "a"));
    }
}
