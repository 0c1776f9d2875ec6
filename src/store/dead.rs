//! Dead letters: queued records an MQTT 5 cloud refused for good (a PUBACK reason code the
//! bridge counts as permanent, see [`crate::bridge::Refusal`], or a record larger than the
//! server's maximum packet size). They leave the queue, so the records behind them flow on,
//! but they are kept on disk for an operator to read (`GET /api/v1/dead-letters`) and drop.
//!
//! # Layout
//! sled tree `dead_letters`: key = the record's queue sequence number, `u64` big-endian (so
//! key order is queue order, and a record refused twice, e.g. after a crash, is kept once);
//! value = `[version 1][reason u8][retain u8][accepted ms u64 BE][refused ms u64 BE]
//! [topic length u16 BE][topic][payload]`.
//!
//! # Invariants
//! - A record becomes a dead letter before it is acknowledged in the queue: the entry is
//!   flushed and fsynced first, so a crash between the two sends the record again (and it is
//!   refused and kept again under the same key), never loses it. The same holds after any
//!   restart for a dead letter above the persisted cursor (an earlier record was still
//!   unacknowledged): it is sent again, and one dropped meanwhile is kept again.
//! - At most `store.max_dead_letters` are kept: a new one pushes out the oldest, counted as
//!   `dropped{reason="dead_letters_full"}`. They are outside the queue's counters and byte
//!   budget; the bound is theirs.
//! - Written by the bridge and the HTTP API, never by the journal (the tree holds no batch,
//!   so the journal's order is not concerned). Dead letters are not salvaged from a damaged
//!   store.

use std::sync::atomic::Ordering;

use bytes::{Buf, BufMut, Bytes};
use tracing::warn;

use super::metrics::DropReason;
use super::{Record, Store, StoreError};
use crate::clock::now_ms;

/// The PUBACK reason codes that make a dead letter (the `reason` labels shown as zeros).
pub const PERMANENT_CODES: [u8; 5] = [0x83, 0x87, 0x90, 0x95, 0x99];

/// The name of an MQTT 5 reason code, as the metric label and the API show it.
pub fn reason_name(code: u8) -> &'static str {
    match code {
        0x80 => "unspecified_error",
        0x83 => "implementation_specific_error",
        0x87 => "not_authorized",
        0x90 => "topic_name_invalid",
        0x91 => "packet_identifier_in_use",
        0x95 => "packet_too_large",
        0x97 => "quota_exceeded",
        0x99 => "payload_format_invalid",
        _ => "other",
    }
}

/// One kept dead letter, as listed (the payload stays on disk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The record's queue sequence number: the dead letter's id.
    pub seq: u64,
    /// Local topic (the cloud topic is `uplink.cloud_prefix` + this).
    pub topic: String,
    /// Payload bytes.
    pub size: usize,
    /// Retain flag.
    pub retain: bool,
    /// When the gateway accepted the record, ms since the Unix epoch.
    pub accepted_ms: u64,
    /// When the cloud refused it, ms since the Unix epoch.
    pub refused_ms: u64,
    /// The PUBACK reason code.
    pub reason: u8,
}

const VERSION: u8 = 1;
const HEAD: usize = 1 + 1 + 1 + 8 + 8 + 2;

fn encode(rec: &Record, reason: u8, refused_ms: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEAD + rec.topic.len() + rec.payload.len());
    v.put_u8(VERSION);
    v.put_u8(reason);
    v.put_u8(rec.retain as u8);
    v.put_u64(rec.ts_ms);
    v.put_u64(refused_ms);
    v.put_u16(rec.topic.len().min(u16::MAX as usize) as u16);
    v.put_slice(&rec.topic.as_bytes()[..rec.topic.len().min(u16::MAX as usize)]);
    v.put_slice(&rec.payload);
    v
}

/// The listing of a stored value and its payload; `None` if it cannot be decoded.
fn decode(seq: u64, v: &[u8]) -> Option<(DeadLetter, Bytes)> {
    if v.len() < HEAD || v[0] != VERSION {
        return None;
    }
    let mut b = &v[1..];
    let reason = b.get_u8();
    let retain = b.get_u8() != 0;
    let accepted_ms = b.get_u64();
    let refused_ms = b.get_u64();
    let tlen = b.get_u16() as usize;
    if b.len() < tlen {
        return None;
    }
    let topic = std::str::from_utf8(&b[..tlen]).ok()?.to_string();
    let payload = Bytes::copy_from_slice(&b[tlen..]);
    Some((
        DeadLetter {
            seq,
            topic,
            size: payload.len(),
            retain,
            accepted_ms,
            refused_ms,
            reason,
        },
        payload,
    ))
}

impl Store {
    /// Record `seq`, refused by the cloud with PUBACK reason `code`, becomes a dead letter:
    /// kept (durably) and then acknowledged in the queue. `None` when the record is no longer
    /// queued (acknowledged or dropped meanwhile). Blocking: call it off the runtime threads.
    pub fn dead_letter(&self, seq: u64, code: u8) -> Result<Option<DeadLetter>, StoreError> {
        Ok(self.dead_letter_all(&[(seq, code)])?.pop())
    }

    /// [`Store::dead_letter`] for each `(seq, code)`, with one flush and fsync for all of
    /// them: the dead letters made (records no longer queued make none), in order.
    pub fn dead_letter_all(&self, refused: &[(u64, u8)]) -> Result<Vec<DeadLetter>, StoreError> {
        let mut found = Vec::with_capacity(refused.len());
        for &(seq, code) in refused {
            if let Some((_, rec)) = self.read_from(seq, 1)?.into_iter().find(|(s, _)| *s == seq) {
                found.push((seq, code, rec));
            }
        }
        if found.is_empty() {
            return Ok(Vec::new());
        }
        let max = self.cfg.max_dead_letters;
        let mut kept = Vec::with_capacity(found.len());
        if max == 0 {
            self.metrics
                .count_drop(DropReason::DeadLettersFull, found.len() as u64);
            warn!(
                count = found.len(),
                "store.max_dead_letters = 0: records the cloud refused for good are dropped"
            );
        } else {
            let now = now_ms();
            let values: Vec<(u64, Vec<u8>)> = found
                .iter()
                .map(|(seq, code, rec)| (*seq, encode(rec, *code, now)))
                .collect();
            self.with_trees(|t| {
                let mut evicted = 0;
                for (seq, value) in &values {
                    let again = t.dead.contains_key(seq.to_be_bytes())?;
                    while !again && t.dead.len() as u64 >= max {
                        match t.dead.pop_min()? {
                            Some(_) => evicted += 1,
                            None => break,
                        }
                    }
                    t.dead.insert(seq.to_be_bytes(), value.as_slice())?;
                }
                t.db.flush()?;
                if evicted > 0 {
                    self.metrics
                        .count_drop(DropReason::DeadLettersFull, evicted);
                    warn!(
                        evicted,
                        max, "store.max_dead_letters reached: the oldest dead letters dropped"
                    );
                }
                Ok(())
            })
            .and_then(|()| self.sync_files())
            .map_err(StoreError::classify)?;
            kept.extend(
                values
                    .iter()
                    .filter_map(|(seq, v)| decode(*seq, v).map(|(d, _)| d)),
            );
        }
        // Off the queue, yet not delivered: `messages_out` is for the cloud's PUBACKs only.
        let seqs: Vec<u64> = found.iter().map(|(s, _, _)| *s).collect();
        self.ack_inner(&seqs, false);
        for (_, code, _) in &found {
            self.metrics.count_dead_letter(*code);
        }
        self.refresh_dead_count();
        Ok(kept)
    }

    /// Up to `limit` dead letters with sequence numbers above `after`, oldest first.
    pub fn dead_letters(&self, after: u64, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        self.with_trees(|t| {
            let mut out = Vec::new();
            let from = after.saturating_add(1).to_be_bytes();
            for kv in t.dead.range(from..) {
                if out.len() >= limit {
                    break;
                }
                let (k, v) = kv?;
                let Some(seq) = super::key_seq(&k) else {
                    continue;
                };
                match decode(seq, &v) {
                    Some((d, _)) => out.push(d),
                    None => warn!(seq, "skipping an undecodable dead letter"),
                }
            }
            Ok(out)
        })
    }

    /// Dead letter `seq` with its payload, if kept.
    pub fn dead_letter_payload(&self, seq: u64) -> Result<Option<(DeadLetter, Bytes)>, StoreError> {
        self.with_trees(|t| Ok(t.dead.get(seq.to_be_bytes())?.and_then(|v| decode(seq, &v))))
    }

    /// Deletes dead letter `seq`; false if there was none.
    pub fn drop_dead_letter(&self, seq: u64) -> Result<bool, StoreError> {
        let found = self.with_trees(|t| {
            let found = t.dead.remove(seq.to_be_bytes())?.is_some();
            t.db.flush()?;
            Ok(found)
        })?;
        self.refresh_dead_count();
        Ok(found)
    }

    /// Dead letters kept.
    pub fn dead_letter_count(&self) -> u64 {
        self.dead_n.load(Ordering::Relaxed)
    }

    /// Recounts the dead letters (at open and after every change) and sets the gauge.
    pub(super) fn refresh_dead_count(&self) {
        let n = self.with_trees(|t| Ok(t.dead.len() as u64)).unwrap_or(0);
        self.dead_n.store(n, Ordering::Relaxed);
        self.metrics.dead_letters_kept.set(n as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_decodes_to_what_was_encoded() {
        let rec = Record {
            topic: "plant/line1/temp".into(),
            payload: Bytes::from_static(b"21.5"),
            retain: true,
            ts_ms: 1_700_000_000_123,
        };
        let v = encode(&rec, 0x87, 1_700_000_009_000);
        let (d, payload) = decode(42, &v).unwrap();
        assert_eq!(
            d,
            DeadLetter {
                seq: 42,
                topic: rec.topic.clone(),
                size: 4,
                retain: true,
                accepted_ms: rec.ts_ms,
                refused_ms: 1_700_000_009_000,
                reason: 0x87,
            }
        );
        assert_eq!(payload, rec.payload);
        assert!(decode(42, &v[..HEAD - 1]).is_none());
        let mut other = v.clone();
        other[0] = 9;
        assert!(decode(42, &other).is_none(), "unknown version");
    }
}
