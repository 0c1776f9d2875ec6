//! The order in which rumqttd takes the acknowledgements of its deliveries to a device.
//!
//! rumqttd 0.20 keeps, per connection, one queue of the QoS 1/2 deliveries it sent and drops
//! the link when a PUBACK or PUBREC does not answer the head of it ("out of order ack"), and
//! a second queue of the PUBRECs it took, which PUBCOMPs must answer in the same order. The
//! front end answers some deliveries itself (those it lowered to the publisher's QoS, at
//! once) and forwards the device's answers for the others (when the device sends them), so
//! answers become ready out of order. [`UpAcks`] holds each answer until everything rumqttd
//! sent before it is answered, then releases them in rumqttd's order.
//!
//! Pure bookkeeping, no I/O. Invariants: an answer leaves at most once; none leaves before
//! the answers of every delivery rumqttd sent before it; an answer for a packet id it does
//! not know (nothing outstanding under that id) leaves at once, as before this existed.

use std::collections::VecDeque;

/// What answers a delivery upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// QoS 1 done.
    PubAck,
    /// QoS 2, first half.
    PubRec,
}

/// Outstanding deliveries of one connection, in rumqttd's order.
#[derive(Debug, Default)]
pub struct UpAcks {
    /// QoS 1/2 deliveries in the order rumqttd sent them, with their answer once ready.
    acks: VecDeque<(u16, Option<Ack>)>,
    /// PUBRECs sent upstream, in order, and whether their PUBCOMP is ready.
    comps: VecDeque<(u16, bool)>,
}

impl UpAcks {
    /// rumqttd sent a QoS 1 or 2 delivery with `pkid` (a resend of an outstanding one is
    /// not counted twice).
    pub fn delivered(&mut self, pkid: u16) {
        if !self.acks.iter().any(|(p, _)| *p == pkid) {
            self.acks.push_back((pkid, None));
        }
    }

    /// The answer for delivery `pkid` is known: returns the answers that may leave now, in
    /// order.
    pub fn ready(&mut self, pkid: u16, ack: Ack) -> Vec<(u16, Ack)> {
        match self
            .acks
            .iter_mut()
            .find(|(p, a)| *p == pkid && a.is_none())
        {
            Some(slot) => slot.1 = Some(ack),
            None => {
                self.sent(pkid, ack);
                return vec![(pkid, ack)];
            }
        }
        let mut out = Vec::new();
        while let Some((p, Some(a))) = self.acks.front().copied() {
            self.acks.pop_front();
            self.sent(p, a);
            out.push((p, a));
        }
        out
    }

    /// The PUBCOMP for `pkid` is known: returns the PUBCOMPs that may leave now, in order.
    pub fn completed(&mut self, pkid: u16) -> Vec<u16> {
        match self.comps.iter_mut().find(|(p, done)| *p == pkid && !done) {
            Some(slot) => slot.1 = true,
            None => return vec![pkid],
        }
        let mut out = Vec::new();
        while let Some((p, true)) = self.comps.front().copied() {
            self.comps.pop_front();
            out.push(p);
        }
        out
    }

    fn sent(&mut self, pkid: u16, ack: Ack) {
        if ack == Ack::PubRec {
            self.comps.push_back((pkid, false));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_leave_in_delivery_order_whoever_gives_them() {
        let mut u = UpAcks::default();
        for p in 1..=4 {
            u.delivered(p);
        }
        // The front end answers 2 (lowered) at once; it waits for the device's answer to 1.
        assert!(u.ready(2, Ack::PubAck).is_empty());
        assert!(u.ready(4, Ack::PubRec).is_empty());
        assert_eq!(
            u.ready(1, Ack::PubRec),
            [(1, Ack::PubRec), (2, Ack::PubAck)]
        );
        assert_eq!(
            u.ready(3, Ack::PubAck),
            [(3, Ack::PubAck), (4, Ack::PubRec)]
        );
        // PUBCOMPs follow the order of the PUBRECs: 1, then 4.
        assert!(u.completed(4).is_empty());
        assert_eq!(u.completed(1), [1, 4]);
    }

    #[test]
    fn unknown_ids_pass_at_once_and_resends_count_once() {
        let mut u = UpAcks::default();
        assert_eq!(u.ready(9, Ack::PubAck), [(9, Ack::PubAck)]);
        assert_eq!(u.completed(7), [7]);
        u.delivered(5);
        u.delivered(5);
        assert_eq!(u.ready(5, Ack::PubAck), [(5, Ack::PubAck)]);
        assert!(u.acks.is_empty());
        // A packet id reused after it was answered is a new delivery.
        u.delivered(5);
        u.delivered(6);
        assert!(u.ready(6, Ack::PubAck).is_empty());
        assert_eq!(
            u.ready(5, Ack::PubAck),
            [(5, Ack::PubAck), (6, Ack::PubAck)]
        );
    }
}
