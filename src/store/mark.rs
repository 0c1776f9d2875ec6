//! The mark file `<queue dir>.mark`: where the queue stood at the last commit, kept outside
//! sled so that damage inside sled's files can be measured at the next open.
//!
//! One line, `fieldgate-queue-mark 1 end=<seq> cursor=<seq>`: `end` is the first sequence
//! number not covered by a completed fsync, `cursor` the acknowledged-up-to cursor that was
//! durable. It is rewritten (temp file + rename, no fsync) about once a second after a
//! commit, so it may lag behind the store but never runs ahead of what was durable: a store
//! that holds less than `end` lost records to damage. A missing or unreadable mark is all
//! zeros (nothing can be said).

use std::path::{Path, PathBuf};

/// Positions from the mark file.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    /// First sequence number not durable at the time of writing.
    pub end: u64,
    /// Durable acknowledged-up-to cursor at the time of writing.
    pub cursor: u64,
}

fn path(dir: &Path) -> PathBuf {
    let mut p = dir.as_os_str().to_owned();
    p.push(".mark");
    PathBuf::from(p)
}

impl Mark {
    /// Reads the mark of the store in `dir`.
    pub fn load(dir: &Path) -> Mark {
        let Ok(text) = std::fs::read_to_string(path(dir)) else {
            return Mark::default();
        };
        let mut m = Mark::default();
        let mut words = text.split_whitespace();
        if words.next() != Some("fieldgate-queue-mark") || words.next() != Some("1") {
            return Mark::default();
        }
        for w in words {
            match w.split_once('=') {
                Some(("end", v)) => m.end = v.parse().unwrap_or(0),
                Some(("cursor", v)) => m.cursor = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        if m.cursor > m.end {
            return Mark::default();
        }
        m
    }

    /// Writes the mark; failures are ignored (the mark only sharpens damage reports).
    pub fn save(&self, dir: &Path) {
        let p = path(dir);
        let mut tmp = p.clone().into_os_string();
        tmp.push(".tmp");
        let line = format!(
            "fieldgate-queue-mark 1 end={} cursor={}\n",
            self.end, self.cursor
        );
        if std::fs::write(&tmp, line).is_ok() {
            let _ = std::fs::rename(&tmp, &p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("queue");
        assert_eq!(Mark::load(&q), Mark::default());
        let m = Mark { end: 42, cursor: 7 };
        m.save(&q);
        assert_eq!(Mark::load(&q), m);
        std::fs::write(dir.path().join("queue.mark"), "junk end=9").unwrap();
        assert_eq!(Mark::load(&q), Mark::default());
    }
}
