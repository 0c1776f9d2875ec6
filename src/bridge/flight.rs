//! The pump's decisions, without I/O: which queued record goes out next
//! (the live lane first, then the paced replay lane, see [`super::lanes`]), the in-flight
//! window, what a PUBACK does, and what a session leaves behind. The pump in
//! [`super::Bridge`] is the driver: it calls [`Schedule::fill`], reads from the store what
//! the schedule asks for ([`Need`]), flushes the link, and feeds PUBACKs to
//! [`Flight::puback`]. Time comes in as an argument, so the unit tests below drive it.
//!
//! The schedule never touches the socket: a [`Sink`] queues each PUBLISH (the driver's
//! sink encodes it into the link's write buffer, which only [`super::link::Link::flush`] writes)
//! and says its packet id. Making a decision copies no record: records move from the read
//! buffers into the sink.
//!
//! # Invariants
//! - At most `window` (`cloud.max_inflight`) publishes are unacknowledged at a time,
//!   the status message included.
//! - A record is acknowledged to the store only after the PUBACK of the PUBLISH that carried
//!   it ([`Flight::acked`]), in the order the PUBACKs came (the store takes any order).
//! - A record still in flight when the session ends stays queued ([`Flight::unacked`] counts
//!   them): the next session starts from the queue head and sends it again, in per-topic
//!   order (at least once).
//! - The order of decisions is the bridge pump's before the split: live record if any (reading more
//!   live records when the store has some), else the next replay record if the pacing
//!   allows it (reading the next replay range when its buffer is empty; an empty range
//!   merges the lanes).

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use super::lanes::Lanes;
use super::TokenBucket;
use crate::store::Record;

/// Acknowledged records are removed from the store in batches of this many (or every tick).
pub const ACK_BATCH: usize = 512;

/// Per-session delivery bookkeeping: what is in flight, what the cloud acknowledged.
#[derive(Debug, Default)]
pub struct Flight {
    /// pkid -> record sequence number, sent and awaiting PUBACK (`None`: not a queued
    /// record, e.g. the status message).
    inflight: HashMap<u16, Option<u64>>,
    /// PUBACKed records not yet removed from the store.
    acked: Vec<u64>,
}

impl Flight {
    /// Publishes awaiting their PUBACK.
    pub fn len(&self) -> usize {
        self.inflight.len()
    }

    /// Nothing awaits a PUBACK.
    pub fn is_empty(&self) -> bool {
        self.inflight.is_empty()
    }

    /// A PUBLISH that carries no queued record (the status message) went out as `pkid`.
    pub fn sent_other(&mut self, pkid: u16) {
        self.inflight.insert(pkid, None);
    }

    /// Record `seq` went out as `pkid`.
    pub fn sent(&mut self, pkid: u16, seq: u64) {
        self.inflight.insert(pkid, Some(seq));
    }

    /// The cloud acknowledged `pkid`: its record (if it carried one and was still in
    /// flight) joins [`Flight::acked`]. True when that batch is full and is to be removed
    /// from the store now.
    pub fn puback(&mut self, pkid: u16) -> bool {
        if let Some(Some(seq)) = self.inflight.remove(&pkid) {
            self.acked.push(seq);
            return self.acked.len() >= ACK_BATCH;
        }
        false
    }

    /// The cloud refused `pkid` (an MQTT 5 PUBACK error reason): it leaves the window, and
    /// its record (if it carried one and was still in flight) is the caller's to dispose of;
    /// it is not acknowledged.
    pub fn refused(&mut self, pkid: u16) -> Option<u64> {
        self.inflight.remove(&pkid).flatten()
    }

    /// Records the cloud acknowledged, not yet removed from the store (the driver removes
    /// them and clears the list).
    pub fn acked(&mut self) -> &mut Vec<u64> {
        &mut self.acked
    }

    /// Records sent and not acknowledged: when the session ends they stay queued and are
    /// sent again.
    pub fn unacked(&self) -> usize {
        self.inflight.values().flatten().count()
    }
}

/// The lane a record goes out on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Appended since the session started.
    Live,
    /// The backlog, paced.
    Replay,
}

/// Where the schedule puts what it sends.
pub trait Sink {
    /// Queues record `seq` as a PUBLISH on `lane`: its packet id, or `None` when it cannot be
    /// sent at all (larger than the cloud accepts; the sink disposed of it).
    fn send(&mut self, lane: Lane, seq: u64, rec: &Record) -> Option<u16>;
    /// The live lane now looks at `next` (the journal's live window follows it).
    fn live_at(&mut self, next: u64);
}

/// What the driver does before the schedule can go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Read the records from this sequence number on into [`Schedule::live_read`].
    Live(u64),
    /// Read the records in `[from, to)` into [`Schedule::replay_read`].
    Replay(u64, u64),
    /// The window is full or nothing is to be sent: flush, and wait for a PUBACK, an
    /// append or a tick.
    Wait,
    /// The replay lane waits for its pacing: as `Wait`, and at the latest until then.
    Pace(Instant),
}

/// The sending side of one cloud session.
#[derive(Debug)]
pub struct Schedule {
    lanes: Lanes,
    window: usize,
    live: VecDeque<(u64, Record)>,
    replay: VecDeque<(u64, Record)>,
    msgs: TokenBucket,
    bytes: TokenBucket,
    /// The read [`Schedule::fill`] asked for last was made since: the next step goes on with
    /// what it brought, without asking the live lane for another read first. (After a live
    /// read that found nothing, asking again at once would loop; after a replay read, its
    /// records go out before the live lane reads again.) An empty replay read clears it.
    just_read: bool,
}

impl Schedule {
    /// A session's schedule: `lanes` as split at its start, at most `window` publishes in
    /// flight, replay paced by the `msgs` (per record) and `bytes` (per payload byte) buckets.
    pub fn new(lanes: Lanes, window: usize, msgs: TokenBucket, bytes: TokenBucket) -> Schedule {
        Schedule {
            lanes,
            window,
            live: VecDeque::new(),
            replay: VecDeque::new(),
            msgs,
            bytes,
            just_read: false,
        }
    }

    /// The lanes (where the live lane stands, whether the replay caught up).
    pub fn lanes(&self) -> &Lanes {
        &self.lanes
    }

    /// Sends into `sink` everything the window and the pacing allow, until a read is needed
    /// or nothing more can go. `now` is asked whenever the pacing is; `next_seq` (the next
    /// sequence number the store will give) whenever the live buffer is empty.
    pub fn fill(
        &mut self,
        flight: &mut Flight,
        now: impl Fn() -> Instant,
        next_seq: impl Fn() -> u64,
        sink: &mut impl Sink,
    ) -> Need {
        while flight.len() < self.window {
            let just_read = std::mem::take(&mut self.just_read);
            // Live lane first.
            if !just_read && self.live.is_empty() && next_seq() > self.lanes.live_next() {
                self.just_read = true;
                return Need::Live(self.lanes.live_next());
            }
            if let Some((seq, rec)) = self.live.pop_front() {
                if self.lanes.live_take(seq, &rec.topic) {
                    if let Some(pkid) = sink.send(Lane::Live, seq, &rec) {
                        flight.sent(pkid, seq);
                    }
                }
                sink.live_at(self.lanes.live_next());
                continue;
            }
            // Then the replay lane, paced.
            let Some((from, to)) = self.lanes.replay_range() else {
                return Need::Wait;
            };
            let Some((seq, rec)) = self.replay.pop_front() else {
                self.just_read = true;
                return Need::Replay(from, to);
            };
            let len = rec.payload.len() as u64;
            let now = now();
            let wait = self
                .msgs
                .wait_for(1, now)
                .max(self.bytes.wait_for(len, now));
            if !wait.is_zero() {
                // Not yet: the record stays first in the replay buffer.
                self.replay.push_front((seq, rec));
                return Need::Pace(now + wait);
            }
            if self.lanes.replay_take(seq, &rec.topic) {
                self.msgs.take(1);
                self.bytes.take(len);
                if let Some(pkid) = sink.send(Lane::Replay, seq, &rec) {
                    flight.sent(pkid, seq);
                }
            }
        }
        Need::Wait
    }

    /// The records [`Need::Live`] asked for.
    pub fn live_read(&mut self, recs: VecDeque<(u64, Record)>) {
        self.live = recs;
    }

    /// The records [`Need::Replay`] asked for, up to `to`. None left: the replay lane caught
    /// up; true when the lanes merged by it.
    pub fn replay_read(&mut self, to: u64, recs: VecDeque<(u64, Record)>) -> bool {
        self.replay = recs;
        if !self.replay.is_empty() {
            return false;
        }
        // Nothing read: the next decision starts from the top, as after any send.
        self.just_read = false;
        self.lanes.replay_exhausted(to);
        self.lanes.merged()
    }
}

#[cfg(test)]
mod tests {
    //! The schedule driven the way the pump drives it, over an in-memory queue and a sink
    //! that hands out packet ids: no store, no link, no runtime.

    use super::*;
    use std::cell::Cell;
    use std::collections::{BTreeMap, HashMap};
    use std::time::Duration;

    use bytes::Bytes;

    /// An in-memory queue: sequence number -> record.
    #[derive(Default)]
    struct Queue(BTreeMap<u64, Record>, u64);

    impl Queue {
        fn append(&mut self, topic: &str) -> u64 {
            self.1 += 1;
            let rec = Record {
                topic: topic.into(),
                payload: Bytes::from(vec![0u8; 10]),
                retain: false,
                ts_ms: 0,
            };
            self.0.insert(self.1, rec);
            self.1
        }

        fn next_seq(&self) -> u64 {
            self.1 + 1
        }

        fn read(&self, from: u64, to: u64) -> VecDeque<(u64, Record)> {
            self.0
                .range(from..to)
                .map(|(s, r)| (*s, r.clone()))
                .collect()
        }

        fn ack(&mut self, seqs: &[u64]) {
            for s in seqs {
                self.0.remove(s);
            }
        }

        /// The lanes of a session starting now, as the pump splits them.
        fn lanes(&self) -> Lanes {
            let live_start = self.next_seq();
            let head = self.0.keys().next().copied().unwrap_or(live_start);
            let mut counts: HashMap<String, u64> = HashMap::new();
            for r in self.0.values() {
                *counts.entry(r.topic.clone()).or_default() += 1;
            }
            Lanes::new(head, live_start, counts)
        }
    }

    /// Hands out packet ids and remembers what was sent.
    #[derive(Default)]
    struct Wire {
        next_pkid: u16,
        /// (lane, seq, pkid)
        sent: Vec<(Lane, u64, u16)>,
        /// Records it refuses (too large).
        refuse: Vec<u64>,
        live_at: Vec<u64>,
    }

    impl Sink for Wire {
        fn send(&mut self, lane: Lane, seq: u64, _rec: &Record) -> Option<u16> {
            if self.refuse.contains(&seq) {
                return None;
            }
            self.next_pkid += 1;
            self.sent.push((lane, seq, self.next_pkid));
            Some(self.next_pkid)
        }

        fn live_at(&mut self, next: u64) {
            self.live_at.push(next);
        }
    }

    impl Wire {
        fn seqs(&self) -> Vec<u64> {
            self.sent.iter().map(|(_, s, _)| *s).collect()
        }

        fn pkid(&self, seq: u64) -> u16 {
            self.sent
                .iter()
                .rev()
                .find(|(_, s, _)| *s == seq)
                .map_or(0, |(_, _, p)| *p)
        }
    }

    fn unpaced() -> (TokenBucket, TokenBucket) {
        let t = Instant::now();
        (TokenBucket::new(0, t), TokenBucket::new(0, t))
    }

    fn schedule(q: &Queue, window: usize) -> Schedule {
        let (m, b) = unpaced();
        Schedule::new(q.lanes(), window, m, b)
    }

    /// One pass of the pump's fill loop at `now`: every read the schedule asks for, until it
    /// waits. Returns why it stopped.
    fn pass(s: &mut Schedule, f: &mut Flight, q: &Queue, w: &mut Wire, now: Instant) -> Need {
        let mut reads = 0;
        loop {
            reads += 1;
            assert!(reads < 1000, "the schedule keeps asking for reads");
            match s.fill(f, || now, || q.next_seq(), w) {
                Need::Live(from) => s.live_read(q.read(from, u64::MAX)),
                Need::Replay(from, to) => {
                    s.replay_read(to, q.read(from, to));
                }
                other => return other,
            }
        }
    }

    #[test]
    fn live_goes_first_and_a_topic_with_backlog_waits_behind_its_replay() {
        let mut q = Queue::default();
        for _ in 0..3 {
            q.append("a");
        }
        let mut s = schedule(&q, 100);
        let (mut f, mut w) = (Flight::default(), Wire::default());
        let b = q.append("b");
        let a = q.append("a");
        assert_eq!(pass(&mut s, &mut f, &q, &mut w, Instant::now()), Need::Wait);
        // b has no backlog: live at once; a's live record goes after a's backlog.
        assert_eq!(w.seqs(), [b, 1, 2, 3, a]);
        assert_eq!(
            w.sent.iter().map(|(l, _, _)| *l).collect::<Vec<_>>(),
            [
                Lane::Live,
                Lane::Replay,
                Lane::Replay,
                Lane::Replay,
                Lane::Replay
            ]
        );
        assert!(s.lanes().merged());
        assert_eq!(w.live_at, [5, 6], "after each live record, deferred or not");
        // Merged: a new record goes live whatever its topic.
        let c = q.append("a");
        assert_eq!(pass(&mut s, &mut f, &q, &mut w, Instant::now()), Need::Wait);
        assert_eq!(w.sent.last(), Some(&(Lane::Live, c, 6)));
        assert_eq!(f.len(), 6);
    }

    #[test]
    fn the_window_bounds_what_is_in_flight() {
        let mut q = Queue::default();
        let mut s = schedule(&q, 2);
        let (mut f, mut w) = (Flight::default(), Wire::default());
        for _ in 0..5 {
            q.append("t");
        }
        let now = Instant::now();
        assert_eq!(pass(&mut s, &mut f, &q, &mut w, now), Need::Wait);
        assert_eq!(w.seqs(), [1, 2], "window full");
        assert_eq!(pass(&mut s, &mut f, &q, &mut w, now), Need::Wait);
        assert_eq!(w.seqs(), [1, 2], "still full: nothing more");
        assert!(!f.puback(w.pkid(1)));
        assert_eq!(pass(&mut s, &mut f, &q, &mut w, now), Need::Wait);
        assert_eq!(w.seqs(), [1, 2, 3], "one PUBACK, one more out");
        // The status message takes a place in the window too.
        let mut f = Flight::default();
        f.sent_other(500);
        let mut s = schedule(&q, 2);
        let mut w = Wire::default();
        assert_eq!(pass(&mut s, &mut f, &q, &mut w, now), Need::Wait);
        assert_eq!(w.seqs().len(), 1);
    }

    #[test]
    fn pubacks_out_of_order_ack_exactly_what_was_acknowledged() {
        let mut q = Queue::default();
        let mut s = schedule(&q, 10);
        let (mut f, mut w) = (Flight::default(), Wire::default());
        f.sent_other(100);
        for _ in 0..3 {
            q.append("t");
        }
        pass(&mut s, &mut f, &q, &mut w, Instant::now());
        assert_eq!(f.len(), 4);
        assert!(!f.puback(w.pkid(3)));
        assert!(!f.puback(w.pkid(1)));
        assert_eq!(f.acked(), &vec![3, 1], "in PUBACK order");
        assert_eq!((f.len(), f.unacked()), (2, 1));
        // A duplicate or unknown PUBACK changes nothing; the status's frees its place only.
        assert!(!f.puback(w.pkid(3)));
        assert!(!f.puback(999));
        assert!(!f.puback(100));
        assert_eq!(f.acked(), &vec![3, 1]);
        assert_eq!((f.len(), f.unacked()), (1, 1));
        f.acked().clear();
        assert!(!f.puback(w.pkid(2)));
        assert!(f.is_empty());
        assert_eq!(f.acked(), &vec![2]);
    }

    #[test]
    fn records_in_flight_when_the_session_ended_are_sent_again_in_order() {
        let mut q = Queue::default();
        let mut s = schedule(&q, 10);
        let (mut f, mut w) = (Flight::default(), Wire::default());
        for t in ["a", "b", "a", "b"] {
            q.append(t);
        }
        pass(&mut s, &mut f, &q, &mut w, Instant::now());
        assert_eq!(w.seqs(), [1, 2, 3, 4]);
        f.puback(w.pkid(1));
        f.puback(w.pkid(2));
        // The link drops: what was acknowledged leaves the queue, the rest stays.
        q.ack(&std::mem::take(f.acked()));
        assert_eq!(f.unacked(), 2);
        // The next session starts from the queue head: 3 and 4 again, as backlog, before a
        // new record of their topics.
        let mut s = schedule(&q, 10);
        let (mut f, mut w) = (Flight::default(), Wire::default());
        let new = q.append("a");
        pass(&mut s, &mut f, &q, &mut w, Instant::now());
        assert_eq!(w.seqs(), [3, 4, new]);
        assert_eq!(w.sent[0].0, Lane::Replay);
    }

    #[test]
    fn replay_is_paced_and_live_topics_are_not_held_behind_it() {
        let mut q = Queue::default();
        for _ in 0..5 {
            q.append("old");
        }
        let t0 = Instant::now();
        // 10 records/s, a burst of one.
        let msgs = TokenBucket::new(10, t0);
        let bytes = TokenBucket::new(0, t0);
        let mut s = Schedule::new(q.lanes(), 100, msgs, bytes);
        let (mut f, mut w) = (Flight::default(), Wire::default());
        let live = q.append("new");
        let need = pass(&mut s, &mut f, &q, &mut w, t0);
        assert_eq!(w.seqs(), [live, 1]);
        assert_eq!(need, Need::Pace(t0 + Duration::from_millis(100)));
        // Before the time: nothing; then one more.
        let clock = Cell::new(t0 + Duration::from_millis(50));
        assert!(matches!(
            s.fill(&mut f, || clock.get(), || q.next_seq(), &mut w),
            Need::Pace(_)
        ));
        assert_eq!(w.seqs().len(), 2);
        clock.set(t0 + Duration::from_millis(100));
        let need = s.fill(&mut f, || clock.get(), || q.next_seq(), &mut w);
        assert_eq!(w.seqs(), [live, 1, 2]);
        assert_eq!(need, Need::Pace(t0 + Duration::from_millis(200)));
        // A live record appended meanwhile is not paced.
        let live2 = q.append("new");
        pass(&mut s, &mut f, &q, &mut w, t0 + Duration::from_millis(150));
        assert_eq!(w.seqs(), [live, 1, 2, live2]);
    }

    #[test]
    fn a_record_the_sink_refuses_takes_no_place_in_the_window() {
        let mut q = Queue::default();
        let mut s = schedule(&q, 2);
        let (mut f, mut w) = (Flight::default(), Wire::default());
        w.refuse = vec![2];
        for _ in 0..3 {
            q.append("t");
        }
        pass(&mut s, &mut f, &q, &mut w, Instant::now());
        assert_eq!(w.seqs(), [1, 3]);
        assert_eq!((f.len(), f.unacked()), (2, 2));
    }

    #[test]
    fn a_refused_publish_leaves_the_window_unacknowledged() {
        let mut f = Flight::default();
        f.sent_other(1);
        f.sent(2, 10);
        f.sent(3, 11);
        assert_eq!(f.refused(2), Some(10));
        assert_eq!(f.refused(2), None, "once");
        assert_eq!(f.refused(1), None, "the status message carries no record");
        assert!(f.acked().is_empty(), "a refusal is no acknowledgement");
        assert_eq!((f.len(), f.unacked()), (1, 1));
        f.puback(3);
        assert_eq!(f.acked(), &vec![11]);
    }

    #[test]
    fn a_full_ack_batch_is_reported_when_it_fills() {
        let mut f = Flight::default();
        for i in 0..ACK_BATCH as u64 {
            f.sent(i as u16 + 1, i);
        }
        let full: Vec<bool> = (0..ACK_BATCH as u16).map(|p| f.puback(p + 1)).collect();
        assert_eq!(full.iter().filter(|x| **x).count(), 1);
        assert!(full[ACK_BATCH - 1]);
    }

    #[test]
    fn an_empty_live_read_goes_on_to_the_replay_lane() {
        // The store says it has more than the live lane saw, but the read finds nothing (the
        // records were acknowledged or dropped meanwhile): no second read in this pass.
        let mut q = Queue::default();
        q.append("a");
        let mut s = schedule(&q, 10);
        let (mut f, mut w) = (Flight::default(), Wire::default());
        let ahead = || q.next_seq() + 5;
        assert_eq!(s.fill(&mut f, Instant::now, ahead, &mut w), Need::Live(2));
        s.live_read(VecDeque::new());
        assert_eq!(
            s.fill(&mut f, Instant::now, ahead, &mut w),
            Need::Replay(1, 2)
        );
        s.replay_read(2, q.read(1, 2));
        // The replay read goes straight to its record, before looking at live again.
        assert_eq!(s.fill(&mut f, Instant::now, ahead, &mut w), Need::Live(2));
        assert_eq!(w.seqs(), [1]);
    }
}
