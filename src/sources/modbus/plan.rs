//! Read planner: which requests read a set of due tags of one unit. Pure, no I/O.
//!
//! Tags are grouped by register kind, sorted by address, and merged greedily into ranges:
//! a tag joins the current range when the hole between them is at most `max_gap` and the
//! range stays within the per-request limit (`max_read_registers`, at most 125, for
//! registers; `max_read_coils`, at most 2000, for coils and discrete inputs). Overlapping
//! tags (e.g. two bits of one register) share registers.
//!
//! Invariants: every input tag is in exactly one [`Read`]; every read covers each of its
//! tags entirely; no read exceeds its limit; greedy merging over sorted starts gives the
//! fewest reads for a contiguous or gap-bounded layout.

use super::config::RegisterKind;

/// One tag to read: where its value lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Caller's tag index.
    pub tag: usize,
    /// Register kind.
    pub kind: RegisterKind,
    /// Protocol address of the first register or coil.
    pub start: u16,
    /// Registers (or coils) it occupies, at least 1.
    pub count: u16,
}

/// One read request and the tags it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    /// Register kind (function code).
    pub kind: RegisterKind,
    /// First address.
    pub start: u16,
    /// Registers or coils to read.
    pub count: u16,
    /// `(tag index, offset of the tag's first register within this read)`.
    pub tags: Vec<(usize, u16)>,
}

/// Request limits of one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most unused addresses read to join two tags.
    pub max_gap: u16,
    /// Most registers per request.
    pub max_registers: u16,
    /// Most coils per request.
    pub max_coils: u16,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_gap: 0,
            max_registers: 125,
            max_coils: 2000,
        }
    }
}

/// Plans the fewest reads for `spans` under `limits`.
pub fn plan(spans: &[Span], limits: Limits) -> Vec<Read> {
    let mut sorted: Vec<Span> = spans.to_vec();
    sorted.sort_by_key(|s| (s.kind, s.start, s.count));
    let mut reads: Vec<Read> = Vec::new();
    // End (exclusive) of the current read, as u32 so address 65535 + count never wraps.
    let mut end: u32 = 0;
    for s in sorted {
        let limit = u32::from(if s.kind.is_bit() {
            limits.max_coils
        } else {
            limits.max_registers
        });
        let s_end = u32::from(s.start) + u32::from(s.count.max(1));
        if let Some(r) = reads.last_mut() {
            let joins = r.kind == s.kind
                && u32::from(s.start) <= end + u32::from(limits.max_gap)
                && s_end.max(end) - u32::from(r.start) <= limit;
            if joins {
                end = end.max(s_end);
                r.count = (end - u32::from(r.start)) as u16;
                r.tags.push((s.tag, s.start - r.start));
                continue;
            }
        }
        end = s_end;
        reads.push(Read {
            kind: s.kind,
            start: s.start,
            count: s.count.max(1),
            tags: vec![(s.tag, 0)],
        });
    }
    reads
}

#[cfg(test)]
mod tests {
    use super::*;
    use RegisterKind::*;

    fn span(tag: usize, kind: RegisterKind, start: u16, count: u16) -> Span {
        Span {
            tag,
            kind,
            start,
            count,
        }
    }

    #[test]
    fn contiguous_tags_make_one_read() {
        let s = [
            span(0, HoldingRegister, 0, 2),
            span(1, HoldingRegister, 2, 1),
            span(2, HoldingRegister, 3, 4),
        ];
        let r = plan(&s, Limits::default());
        assert_eq!(
            r,
            vec![Read {
                kind: HoldingRegister,
                start: 0,
                count: 7,
                tags: vec![(0, 0), (1, 2), (2, 3)]
            }]
        );
    }

    #[test]
    fn gaps_split_unless_allowed() {
        let s = [
            span(0, HoldingRegister, 0, 1),
            span(1, HoldingRegister, 5, 1),
        ];
        assert_eq!(plan(&s, Limits::default()).len(), 2);
        let l = Limits {
            max_gap: 4,
            ..Limits::default()
        };
        let r = plan(&s, l);
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].start, r[0].count), (0, 6));
        let l = Limits {
            max_gap: 3,
            ..Limits::default()
        };
        assert_eq!(plan(&s, l).len(), 2);
    }

    #[test]
    fn kinds_never_mix_and_order_does_not_matter() {
        let s = [
            span(0, InputRegister, 1, 1),
            span(1, HoldingRegister, 0, 1),
            span(2, Coil, 0, 1),
            span(3, DiscreteInput, 0, 1),
            span(4, HoldingRegister, 1, 1),
            span(5, InputRegister, 0, 1),
        ];
        let r = plan(&s, Limits::default());
        assert_eq!(r.len(), 4);
        let hold = r
            .iter()
            .find(|r| r.kind == HoldingRegister)
            .expect("holding");
        assert_eq!(hold.tags, vec![(1, 0), (4, 1)]);
        let input = r.iter().find(|r| r.kind == InputRegister).expect("input");
        assert_eq!(input.tags, vec![(5, 0), (0, 1)]);
    }

    #[test]
    fn limits_split_long_runs() {
        // 300 contiguous u16 registers: 125 + 125 + 50.
        let s: Vec<Span> = (0..300)
            .map(|i| span(i, HoldingRegister, i as u16, 1))
            .collect();
        let r = plan(&s, Limits::default());
        assert_eq!(
            r.iter().map(|r| r.count).collect::<Vec<_>>(),
            vec![125, 125, 50]
        );
        // A 2-register value never straddles two reads.
        let s: Vec<Span> = (0..100)
            .map(|i| span(i, HoldingRegister, i as u16 * 2, 2))
            .collect();
        let r = plan(&s, Limits::default());
        assert_eq!(r.iter().map(|r| r.count).collect::<Vec<_>>(), vec![124, 76]);
        // 2500 coils: 2000 + 500.
        let s: Vec<Span> = (0..2500).map(|i| span(i, Coil, i as u16, 1)).collect();
        let r = plan(&s, Limits::default());
        assert_eq!(
            r.iter().map(|r| r.count).collect::<Vec<_>>(),
            vec![2000, 500]
        );
        // A device limit below the protocol's.
        let l = Limits {
            max_registers: 10,
            ..Limits::default()
        };
        let s: Vec<Span> = (0..25)
            .map(|i| span(i, InputRegister, i as u16, 1))
            .collect();
        assert_eq!(plan(&s, l).len(), 3);
    }

    #[test]
    fn overlapping_tags_share_registers() {
        // Bits 0 and 3 of register 7, and a u32 over 7..9.
        let s = [
            span(0, HoldingRegister, 7, 1),
            span(1, HoldingRegister, 7, 1),
            span(2, HoldingRegister, 7, 2),
        ];
        let r = plan(&s, Limits::default());
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].start, r[0].count), (7, 2));
        assert_eq!(r[0].tags.len(), 3);
    }

    #[test]
    fn top_of_address_space_does_not_wrap() {
        let s = [
            span(0, HoldingRegister, 65534, 2),
            span(1, HoldingRegister, 0, 1),
        ];
        let r = plan(&s, Limits::default());
        assert_eq!(r.len(), 2);
        assert_eq!((r[1].start, r[1].count), (65534, 2));
    }

    #[test]
    fn every_tag_exactly_once_and_covered() {
        // Pseudo-random layouts; checks the invariants of the module header.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..200 {
            let mut spans = Vec::new();
            for t in 0..60 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let kind = [Coil, DiscreteInput, InputRegister, HoldingRegister][(x % 4) as usize];
                let count = if kind.is_bit() {
                    1
                } else {
                    [1, 2, 4][(x >> 8) as usize % 3]
                };
                spans.push(span(t, kind, (x >> 16) as u16 % 400, count));
            }
            let l = Limits {
                max_gap: (x % 10) as u16,
                max_registers: 125,
                max_coils: 2000,
            };
            let reads = plan(&spans, l);
            let mut seen = vec![0; spans.len()];
            for r in &reads {
                let limit = if r.kind.is_bit() { 2000 } else { 125 };
                assert!(r.count <= limit);
                for (t, off) in &r.tags {
                    seen[*t] += 1;
                    let s = spans[*t];
                    assert_eq!(s.kind, r.kind);
                    assert_eq!(r.start + off, s.start);
                    assert!(off + s.count <= r.count);
                }
            }
            assert!(seen.iter().all(|n| *n == 1));
        }
    }
}
