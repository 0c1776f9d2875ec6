//! Counting what arrived: payloads are `src:seq:...` (see [`super::mqtt::payload`]), and a
//! [`Report`] says per source which sequence numbers arrived, how many were duplicates and
//! how many came out of order. Loss is what [`Report::missing`] returns.

use std::collections::BTreeMap;

/// What arrived, per source.
#[derive(Debug, Default, Clone)]
pub struct SourceReport {
    /// Distinct sequence numbers seen.
    pub unique: std::collections::BTreeSet<u64>,
    /// Messages that repeated an already seen sequence number.
    pub duplicates: u64,
    /// First sightings that were not above every earlier first sighting.
    pub reordered: u64,
}

/// Per-source report over everything received on `.../dev/<src>/data`.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub sources: BTreeMap<String, SourceReport>,
}

impl Report {
    pub fn unique(&self, src: &str) -> usize {
        self.sources.get(src).map(|s| s.unique.len()).unwrap_or(0)
    }
    pub fn total_unique(&self) -> usize {
        self.sources.values().map(|s| s.unique.len()).sum()
    }
    pub fn duplicates(&self) -> u64 {
        self.sources.values().map(|s| s.duplicates).sum()
    }
    pub fn reordered(&self) -> u64 {
        self.sources.values().map(|s| s.reordered).sum()
    }
    /// Sequence numbers of `range` that never arrived for `src`.
    pub fn missing(&self, src: &str, range: std::ops::Range<u64>) -> Vec<u64> {
        let seen = self.sources.get(src).map(|s| &s.unique);
        range
            .filter(|s| !seen.is_some_and(|u| u.contains(s)))
            .collect()
    }
}

/// Builds the report from `(topic, payload)` pairs whose payload is `src:seq:...`.
pub fn check(received: &[(String, Vec<u8>)]) -> Report {
    let mut r = Report::default();
    let mut max_first: BTreeMap<String, u64> = BTreeMap::new();
    for (topic, p) in received {
        if !topic.ends_with("/data") {
            continue;
        }
        let text = String::from_utf8_lossy(p);
        let mut it = text.splitn(3, ':');
        let (Some(src), Some(seq)) = (it.next(), it.next().and_then(|s| s.parse::<u64>().ok()))
        else {
            continue;
        };
        let s = r.sources.entry(src.to_string()).or_default();
        if !s.unique.insert(seq) {
            s.duplicates += 1;
            continue;
        }
        let m = max_first.entry(src.to_string()).or_insert(0);
        if seq < *m {
            s.reordered += 1;
        }
        *m = (*m).max(seq);
    }
    r
}
