//! The on-disk format of one commit batch: every record appended by one group commit, in one
//! sled value, each record with its own checksum.
//!
//! # Value format (version 2)
//! ```text
//! header (29 bytes):
//!   magic  "FGQ2"            4 bytes
//!   first  u64 BE            sequence number of the first record
//!   count  u32 BE            records in the batch (>= 1)
//!   ts_last u64 BE           accept time (ms since the epoch) of the last record
//!   len    u32 BE            bytes of the record area that follows
//!   crc    u32 BE            CRC-32 of the 24 bytes before it (first..len)
//! record area: `count` times
//!   rlen   u32 BE            bytes of the record body
//!   rcrc   u32 BE            CRC-32 of the body
//!   body:  [flags u8][ts_ms u64 BE][topic_len u16 BE][topic][extra][payload]
//!   flags: bit 0 retain, bit 1 an expiry follows the topic, bit 2 properties follow it
//!   extra: [expiry u32 BE] if bit 1, then [props_len u32 BE][props] if bit 2
//! ```
//! Version 2 records without an MQTT 5 publisher's properties have neither bit, so the
//! records written before the bits existed read the same.
//! Records of one batch carry consecutive sequence numbers `first .. first + count`.
//!
//! # Invariants
//! - A batch whose header checksum fails is unusable as a whole; a record whose checksum
//!   fails is skipped alone, and the records after it are still read (their lengths are
//!   covered by their own checksums only, so a damaged length stops the walk: the rest of
//!   that batch counts as damaged).
//! - Decoding never panics and never allocates more than the value's own size, whatever
//!   the bytes: salvage runs it over arbitrary file contents.

use bytes::Bytes;

use super::{Extra, Record};

/// First bytes of every batch value.
pub const MAGIC: &[u8; 4] = b"FGQ2";
/// Header bytes.
pub const HEADER: usize = 4 + 8 + 4 + 8 + 4 + 4;
/// Per-record framing bytes (length + checksum).
pub const FRAME: usize = 8;
/// Record body bytes besides topic and payload.
pub const BODY_FIXED: usize = 1 + 8 + 2;

/// Header of a batch, readable without decoding its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Sequence number of the first record.
    pub first: u64,
    /// Records in the batch.
    pub count: u32,
    /// Accept time of the newest record.
    pub ts_last: u64,
    /// Length of the record area.
    pub len: u32,
}

impl Header {
    /// Sequence number after the last record.
    pub fn end(&self) -> u64 {
        self.first + self.count as u64
    }

    /// Reads and checks a header at the start of `v`.
    pub fn read(v: &[u8]) -> Option<Header> {
        if v.len() < HEADER || &v[..4] != MAGIC {
            return None;
        }
        let crc = u32::from_be_bytes(v[28..32].try_into().ok()?);
        if crc32fast::hash(&v[4..28]) != crc {
            return None;
        }
        let h = Header {
            first: u64::from_be_bytes(v[4..12].try_into().ok()?),
            count: u32::from_be_bytes(v[12..16].try_into().ok()?),
            ts_last: u64::from_be_bytes(v[16..24].try_into().ok()?),
            len: u32::from_be_bytes(v[24..28].try_into().ok()?),
        };
        (h.count > 0).then_some(h)
    }
}

/// Bytes one record takes inside a batch.
pub fn record_size(r: &Record) -> usize {
    FRAME + BODY_FIXED + r.topic.len() + r.extra.size() + r.payload.len()
}

/// Encodes `records` (non-empty) as one batch whose first sequence number is `first`.
pub fn encode(first: u64, records: &[Record]) -> Vec<u8> {
    let area: usize = records.iter().map(record_size).sum();
    let mut v = Vec::with_capacity(HEADER + area);
    v.extend_from_slice(MAGIC);
    v.extend_from_slice(&first.to_be_bytes());
    v.extend_from_slice(&(records.len() as u32).to_be_bytes());
    let ts_last = records.last().map_or(0, |r| r.ts_ms);
    v.extend_from_slice(&ts_last.to_be_bytes());
    v.extend_from_slice(&(area as u32).to_be_bytes());
    let crc = crc32fast::hash(&v[4..28]);
    v.extend_from_slice(&crc.to_be_bytes());
    for r in records {
        let topic = r.topic.as_bytes();
        let body_len = BODY_FIXED + topic.len() + r.extra.size() + r.payload.len();
        v.extend_from_slice(&(body_len as u32).to_be_bytes());
        let crc_at = v.len();
        v.extend_from_slice(&[0; 4]);
        let body_at = v.len();
        let has_props = !r.extra.props.is_empty();
        v.push(
            u8::from(r.retain) | u8::from(r.extra.expiry.is_some()) << 1 | u8::from(has_props) << 2,
        );
        v.extend_from_slice(&r.ts_ms.to_be_bytes());
        v.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        v.extend_from_slice(topic);
        if let Some(e) = r.extra.expiry {
            v.extend_from_slice(&e.to_be_bytes());
        }
        if has_props {
            v.extend_from_slice(&(r.extra.props.len() as u32).to_be_bytes());
            v.extend_from_slice(&r.extra.props);
        }
        v.extend_from_slice(&r.payload);
        let crc = crc32fast::hash(&v[body_at..]);
        v[crc_at..crc_at + 4].copy_from_slice(&crc.to_be_bytes());
    }
    v
}

/// What decoding one batch gave.
#[derive(Debug, Default)]
pub struct Decoded {
    /// Intact records with their sequence numbers, in order.
    pub records: Vec<(u64, Record)>,
    /// Records of the batch that failed their checksum or could not be framed.
    pub damaged: u64,
}

/// Decodes the records of a batch with sequence number `>= from`. `None` when the header is
/// unusable.
pub fn decode(v: &[u8], from: u64) -> Option<Decoded> {
    let h = Header::read(v)?;
    let mut out = Decoded::default();
    let area = v.get(HEADER..)?;
    let mut at = 0usize;
    for i in 0..h.count as u64 {
        let seq = h.first + i;
        let Some((body, next)) = frame(area, at) else {
            // A damaged length: nothing after it can be framed.
            out.damaged += h.count as u64 - i;
            break;
        };
        at = next;
        if seq < from {
            continue;
        }
        match body.and_then(decode_body) {
            Some(r) => out.records.push((seq, r)),
            None => out.damaged += 1,
        }
    }
    Some(out)
}

/// Frames the record at `at`: `Some((Some(body), next))` when its checksum holds,
/// `Some((None, next))` when the length is plausible but the checksum fails, `None` when the
/// length runs past the area.
fn frame(area: &[u8], at: usize) -> Option<(Option<&[u8]>, usize)> {
    let len = u32::from_be_bytes(area.get(at..at + 4)?.try_into().ok()?) as usize;
    let crc = u32::from_be_bytes(area.get(at + 4..at + 8)?.try_into().ok()?);
    let body = area.get(at + 8..(at + 8).checked_add(len)?)?;
    let ok = crc32fast::hash(body) == crc;
    Some((ok.then_some(body), at + 8 + len))
}

fn decode_body(b: &[u8]) -> Option<Record> {
    if b.len() < BODY_FIXED {
        return None;
    }
    let retain = b[0] & 1 == 1;
    let ts_ms = u64::from_be_bytes(b[1..9].try_into().ok()?);
    let tlen = u16::from_be_bytes(b[9..11].try_into().ok()?) as usize;
    let topic = std::str::from_utf8(b.get(BODY_FIXED..BODY_FIXED + tlen)?).ok()?;
    let mut at = BODY_FIXED + tlen;
    let mut extra = Extra::default();
    if b[0] & 2 != 0 {
        extra.expiry = Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?));
        at += 4;
    }
    if b[0] & 4 != 0 {
        let len = u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize;
        let props = b.get(at + 4..(at + 4).checked_add(len)?)?;
        extra.props = Bytes::copy_from_slice(props);
        at += 4 + len;
    }
    Some(Record {
        topic: topic.to_string(),
        payload: Bytes::copy_from_slice(b.get(at..)?),
        retain,
        ts_ms,
        extra,
    })
}

/// Topics of the records of a batch with sequence number in `[from, to)`, without copying
/// payloads.
pub fn topics(v: &[u8], from: u64, to: u64, mut f: impl FnMut(&str)) {
    let Some(h) = Header::read(v) else { return };
    let Some(area) = v.get(HEADER..) else { return };
    let mut at = 0usize;
    for i in 0..h.count as u64 {
        let Some((body, next)) = frame(area, at) else {
            return;
        };
        at = next;
        let seq = h.first + i;
        if seq < from || seq >= to {
            continue;
        }
        if let Some(b) = body.filter(|b| b.len() >= BODY_FIXED) {
            let tlen = u16::from_be_bytes([b[9], b[10]]) as usize;
            if let Some(t) = b
                .get(BODY_FIXED..BODY_FIXED + tlen)
                .and_then(|t| std::str::from_utf8(t).ok())
            {
                f(t);
            }
        }
    }
}

/// Finds every intact batch in arbitrary bytes (a damaged store's files): each place where
/// the magic is followed by a header whose checksum holds, decoded as far as it goes.
pub fn salvage(bytes: &[u8]) -> Vec<(Header, Decoded)> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while let Some(pos) = find(&bytes[at..], MAGIC) {
        let start = at + pos;
        let rest = &bytes[start..];
        match Header::read(rest) {
            Some(h) => {
                let end = (HEADER + h.len as usize).min(rest.len());
                if let Some(d) = decode(&rest[..end], 0) {
                    out.push((h, d));
                }
                at = start + HEADER;
            }
            None => at = start + 1,
        }
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: u64) -> Record {
        Record {
            topic: format!("dev/{i}/t"),
            payload: Bytes::from(format!("payload-{i}")),
            retain: i.is_multiple_of(3),
            ts_ms: 1000 + i,
            extra: Default::default(),
        }
    }

    #[test]
    fn round_trip_and_from() {
        let recs: Vec<_> = (0..5).map(rec).collect();
        let v = encode(10, &recs);
        assert_eq!(
            v.len(),
            HEADER + recs.iter().map(record_size).sum::<usize>()
        );
        let h = Header::read(&v).unwrap();
        assert_eq!((h.first, h.count, h.end(), h.ts_last), (10, 5, 15, 1004));
        let d = decode(&v, 0).unwrap();
        assert_eq!(d.damaged, 0);
        assert_eq!(d.records.len(), 5);
        assert_eq!(d.records[2], (12, rec(2)));
        let d = decode(&v, 13).unwrap();
        assert_eq!(d.records.iter().map(|r| r.0).collect::<Vec<_>>(), [13, 14]);
        let mut ts = Vec::new();
        topics(&v, 11, 13, |t| ts.push(t.to_string()));
        assert_eq!(ts, ["dev/1/t", "dev/2/t"]);
    }

    #[test]
    fn an_mqtt5_publishers_expiry_and_properties_travel_with_the_record() {
        let mut with = rec(1);
        with.extra = Extra {
            expiry: Some(30),
            props: Bytes::from_static(&[0x03, 0, 4, b't', b'e', b'x', b't']),
        };
        let mut only_expiry = rec(2);
        only_expiry.extra.expiry = Some(7);
        let recs = vec![rec(0), with.clone(), only_expiry.clone(), rec(3)];
        let v = encode(1, &recs);
        assert_eq!(
            v.len(),
            HEADER + recs.iter().map(record_size).sum::<usize>()
        );
        let d = decode(&v, 0).unwrap();
        assert_eq!(d.damaged, 0);
        let got: Vec<Record> = d.records.into_iter().map(|(_, r)| r).collect();
        assert_eq!(got, recs);
        let mut ts = Vec::new();
        topics(&v, 0, 10, |t| ts.push(t.to_string()));
        assert_eq!(ts, ["dev/0/t", "dev/1/t", "dev/2/t", "dev/3/t"]);
        // A record without them is written as before the bits existed: flags, time, topic,
        // payload.
        let plain = encode(1, &[rec(4)]);
        let body = &plain[HEADER + FRAME..];
        assert_eq!(body[0], 0);
        assert_eq!(&body[BODY_FIXED + "dev/4/t".len()..], b"payload-4");
    }

    #[test]
    fn a_flipped_bit_costs_one_record_or_the_header() {
        let recs: Vec<_> = (0..4).map(rec).collect();
        let v = encode(1, &recs);
        // Inside the payload of record 2.
        let mut bad = v.clone();
        let at = HEADER + record_size(&recs[0]) + record_size(&recs[1]) + FRAME + 12;
        bad[at] ^= 0x10;
        let d = decode(&bad, 0).unwrap();
        assert_eq!(d.damaged, 1);
        assert_eq!(d.records.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 2, 4]);
        // Inside the header.
        let mut bad = v.clone();
        bad[13] ^= 1;
        assert!(decode(&bad, 0).is_none());
        // Truncated: the records that are whole survive.
        let cut = &v[..v.len() - 3];
        let d = decode(cut, 0).unwrap();
        assert_eq!((d.records.len(), d.damaged), (3, 1));
    }

    #[test]
    fn salvage_finds_batches_in_noise() {
        let a = encode(1, &(0..3).map(rec).collect::<Vec<_>>());
        let b = encode(4, &(3..5).map(rec).collect::<Vec<_>>());
        let mut file = vec![0u8; 100];
        file.extend_from_slice(b"FGQ2 not a header at all");
        file.extend_from_slice(&a);
        file.extend_from_slice(&[7u8; 33]);
        file.extend_from_slice(&b);
        let found = salvage(&file);
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].0.first, 1);
        assert_eq!(found[1].1.records.len(), 2);
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for n in 0..2000 {
            let mut v = encode(n, &[rec(n)]);
            for _ in 0..(n % 7) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let i = (seed as usize) % v.len();
                v[i] = seed as u8;
            }
            v.truncate((seed as usize % (v.len() + 1)).max(1));
            let _ = decode(&v, 0);
            let _ = salvage(&v);
            topics(&v, 0, u64::MAX, |_| {});
        }
    }
}
