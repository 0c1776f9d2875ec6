//! The durable store-and-forward queue: every message meant for the cloud, on disk (sled),
//! in arrival order, until the cloud has PUBACKed it.
//!
//! # Key format
//! One sled tree. Key: the record's sequence number, a `u64` big-endian (so sled's byte order
//! is queue order). Sequence numbers start at 1, grow by one per appended record, and are never
//! reused: at open the next one is `last key + 1` (or 1 for an empty queue).
//!
//! # Value format (version 1)
//! `[1u8 version][flags u8 (bit 0 = retain)][ts_ms u64 BE][topic_len u16 BE][topic][payload]`.
//! `ts_ms` is the wall-clock time the gateway accepted the message (for age limits and for
//! latency measurement).
//!
//! # Invariants
//! - A record leaves the queue only by [`Store::remove`] (the bridge, after the cloud's
//!   PUBACK), by the full policy, by the age limit, or because it cannot be decoded; each of
//!   the last three is counted in `fieldgate_dropped_total{reason}`.
//! - Only one thread appends (the uplink tap), so sequence numbers are assigned in arrival
//!   order. Removal may come from any thread; sled's `remove` returns the old value exactly
//!   once, which keeps the byte and record counters exact.
//! - Durability: appends land in sled's log at once (process-crash safe once flushed);
//!   [`Store::commit`] makes them power-cut safe: `Db::flush` (which on Linux is only
//!   `sync_file_range`) followed by a real `fsync` of sled's data file and blob files. The
//!   committer thread calls it every `store.commit_interval`, so a power cut loses at most that
//!   window. Recovery yields a prefix of the writes.
//! - Retained messages live in a second tree, `retained` (key: topic; value: `[qos u8]
//!   [payload]`), written by the uplink tap in broker order and made durable by the same
//!   commit. They are not part of the queue's counters or byte budget.
//! - A store that cannot be opened (sled error or panic) is moved aside to
//!   `<dir>.damaged-<unix seconds>` with an ERROR log and a fresh one is opened: the gateway
//!   never crash-loops on a bad disk image.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::{FullPolicy, StoreConfig};
use crate::metrics::{DropReason, Metrics};

const VERSION: u8 = 1;
const HEADER: usize = 1 + 1 + 8 + 2;
/// Key bytes counted per record in the byte budget.
const KEY_BYTES: u64 = 8;

/// Errors from the store. The caller counts the affected records as dropped with reason
/// `store_error` and goes on; the next commit or append tries again.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled reported an error (disk full, I/O error, corruption).
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    /// File-system error around the store (fsync, rename, create).
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// One queued message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Local topic.
    pub topic: String,
    /// Payload bytes.
    pub payload: Bytes,
    /// Retain flag as published locally.
    pub retain: bool,
    /// Accept time, ms since the Unix epoch.
    pub ts_ms: u64,
}

impl Record {
    /// Encodes to the version-1 value format.
    pub fn encode(&self) -> Vec<u8> {
        let topic = self.topic.as_bytes();
        let mut v = Vec::with_capacity(HEADER + topic.len() + self.payload.len());
        v.push(VERSION);
        v.push(u8::from(self.retain));
        v.extend_from_slice(&self.ts_ms.to_be_bytes());
        v.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        v.extend_from_slice(topic);
        v.extend_from_slice(&self.payload);
        v
    }

    /// Decodes a value; `None` when it is not a valid version-1 record.
    pub fn decode(v: &[u8]) -> Option<Record> {
        if v.len() < HEADER || v[0] != VERSION {
            return None;
        }
        let retain = v[1] & 1 == 1;
        let ts_ms = u64::from_be_bytes(v[2..10].try_into().ok()?);
        let tlen = u16::from_be_bytes(v[10..12].try_into().ok()?) as usize;
        let topic = std::str::from_utf8(v.get(HEADER..HEADER + tlen)?).ok()?;
        Some(Record {
            topic: topic.to_string(),
            payload: Bytes::copy_from_slice(&v[HEADER + tlen..]),
            retain,
            ts_ms,
        })
    }

    /// The topic of an encoded record, without decoding the rest.
    pub fn decode_topic(v: &[u8]) -> Option<&str> {
        if v.len() < HEADER || v[0] != VERSION {
            return None;
        }
        let tlen = u16::from_be_bytes(v[10..12].try_into().ok()?) as usize;
        std::str::from_utf8(v.get(HEADER..HEADER + tlen)?).ok()
    }

    /// Bytes this record counts against `store.max_bytes`.
    pub fn cost(&self) -> u64 {
        KEY_BYTES + (HEADER + self.topic.len() + self.payload.len()) as u64
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Result of an append.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Records written.
    pub accepted: u64,
    /// Old records evicted to make room (`drop_oldest`).
    pub evicted: u64,
    /// New records refused (`reject_new`, or a record larger than the whole budget).
    pub rejected: u64,
}

/// Handle to the queue. Cheap to share behind an `Arc`.
pub struct Store {
    db: sled::Db,
    retained: sled::Tree,
    /// Entries in `retained` (sled's `len` walks the tree).
    retained_n: AtomicU64,
    dir: PathBuf,
    cfg: StoreConfig,
    metrics: Arc<Metrics>,
    next_seq: AtomicU64,
    bytes: AtomicU64,
    records: AtomicU64,
    dirty: AtomicBool,
    /// Carries `next_seq` after each append so the bridge wakes up.
    appended: watch::Sender<u64>,
}

impl Store {
    /// Opens (or creates) the queue in `dir`, moving a damaged one aside.
    pub fn open(dir: &Path, cfg: &StoreConfig, metrics: Arc<Metrics>) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir.parent().unwrap_or(Path::new(".")))?;
        let db = match open_sled(dir, cfg) {
            Ok(db) => db,
            Err(why) => {
                let aside = PathBuf::from(format!("{}.damaged-{}", dir.display(), now_ms() / 1000));
                error!(
                    store = %dir.display(),
                    moved_to = %aside.display(),
                    error = %why,
                    "queue store cannot be opened; moved aside and starting an empty one. \
                     Records in it are not forwarded: inspect or delete the moved directory"
                );
                std::fs::rename(dir, &aside)?;
                metrics.store_quarantined.set(1);
                open_sled(dir, cfg).map_err(std::io::Error::other)?
            }
        };
        let retained = db.open_tree("retained")?;
        let store = Store {
            db,
            retained_n: AtomicU64::new(retained.len() as u64),
            retained,
            dir: dir.to_path_buf(),
            cfg: cfg.clone(),
            metrics,
            next_seq: AtomicU64::new(1),
            bytes: AtomicU64::new(0),
            records: AtomicU64::new(0),
            dirty: AtomicBool::new(false),
            appended: watch::channel(0).0,
        };
        store.scan()?;
        store
            .metrics
            .broker
            .retained
            .set(store.retained_count() as i64);
        Ok(store)
    }

    /// Keeps `payload` as the retained message of `topic`; an empty payload deletes it
    /// (MQTT's rule for retained messages). Durable at the next [`Store::commit`].
    pub fn retain(&self, topic: &str, qos: u8, payload: &[u8]) -> Result<(), StoreError> {
        if payload.is_empty() {
            if self.retained.remove(topic.as_bytes())?.is_some() {
                self.retained_n.fetch_sub(1, Ordering::Relaxed);
            }
        } else {
            let mut v = Vec::with_capacity(1 + payload.len());
            v.push(qos.min(2));
            v.extend_from_slice(payload);
            if self.retained.insert(topic.as_bytes(), v)?.is_none() {
                self.retained_n.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.dirty.store(true, Ordering::SeqCst);
        self.metrics
            .broker
            .retained
            .set(self.retained_count() as i64);
        Ok(())
    }

    /// Every kept retained message as (topic, qos, payload), in topic order. Entries that
    /// cannot be decoded (not UTF-8, no payload) are skipped.
    pub fn retained(&self) -> Result<Vec<(String, u8, Bytes)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.retained.iter() {
            let (k, v) = kv?;
            let (Ok(topic), Some((&qos, payload))) = (std::str::from_utf8(&k), v.split_first())
            else {
                warn!("skipping an undecodable retained message");
                continue;
            };
            if payload.is_empty() {
                continue;
            }
            out.push((
                topic.to_string(),
                qos.min(2),
                Bytes::copy_from_slice(payload),
            ));
        }
        Ok(out)
    }

    /// Number of kept retained messages.
    pub fn retained_count(&self) -> usize {
        self.retained_n.load(Ordering::Relaxed) as usize
    }

    /// Counts what is on disk and drops undecodable records. Runs once at open.
    fn scan(&self) -> Result<(), StoreError> {
        let (mut n, mut bytes, mut last, mut corrupt) = (0u64, 0u64, 0u64, Vec::new());
        for kv in self.db.iter() {
            let (k, v) = kv?;
            let Some(seq) = key_seq(&k) else {
                corrupt.push(k);
                continue;
            };
            last = seq;
            if Record::decode(&v).is_none() {
                corrupt.push(k);
                continue;
            }
            n += 1;
            bytes += KEY_BYTES + v.len() as u64;
        }
        if !corrupt.is_empty() {
            warn!(count = corrupt.len(), "dropping undecodable queue records");
            self.metrics
                .count_drop(DropReason::Corrupt, corrupt.len() as u64);
            for k in corrupt {
                self.db.remove(k)?;
            }
        }
        self.next_seq.store(last + 1, Ordering::SeqCst);
        self.records.store(n, Ordering::SeqCst);
        self.bytes.store(bytes, Ordering::SeqCst);
        self.appended.send_replace(last + 1);
        self.publish_gauges();
        info!(
            records = n,
            bytes,
            recovered = self.db.was_recovered(),
            "queue opened"
        );
        Ok(())
    }

    /// Appends records in order. Applies the full policy first. Only the tap calls this.
    ///
    /// Records are inserted one by one, not with `apply_batch`: sled 0.34's batches held on
    /// to memory in proportion to the batch size under sustained load (measured: 4096-record
    /// batches took the gateway to 1.2 GB RSS after 300k messages, single inserts ~150 MB,
    /// most of it the broker's own in-memory log). Single inserts still give a prefix on
    /// recovery, which is all the queue needs.
    pub fn append(&self, records: &[Record]) -> Result<Appended, StoreError> {
        let mut out = Appended::default();
        let result = records.iter().try_for_each(|r| {
            let cost = r.cost();
            if cost > self.cfg.max_bytes {
                out.rejected += 1;
                return Ok(());
            }
            if self.bytes.load(Ordering::SeqCst) + cost > self.cfg.max_bytes {
                match self.cfg.full_policy {
                    FullPolicy::RejectNew => {
                        out.rejected += 1;
                        return Ok(());
                    }
                    FullPolicy::DropOldest => {
                        while self.bytes.load(Ordering::SeqCst) + cost > self.cfg.max_bytes {
                            if self.pop_oldest()?.is_none() {
                                break;
                            }
                            out.evicted += 1;
                        }
                    }
                }
            }
            let seq = self.next_seq.load(Ordering::SeqCst);
            self.db.insert(seq.to_be_bytes(), r.encode())?;
            self.next_seq.store(seq + 1, Ordering::SeqCst);
            self.records.fetch_add(1, Ordering::SeqCst);
            self.bytes.fetch_add(cost, Ordering::SeqCst);
            self.dirty.store(true, Ordering::SeqCst);
            out.accepted += 1;
            Ok::<_, StoreError>(())
        });
        if out.accepted > 0 {
            self.appended.send_replace(self.next_seq());
        }
        if out.evicted > 0 {
            self.metrics.count_drop(DropReason::QueueFull, out.evicted);
        }
        if out.rejected > 0 {
            self.metrics.count_drop(DropReason::Rejected, out.rejected);
        }
        self.metrics.messages_in.inc_by(out.accepted);
        self.publish_gauges();
        result.map(|()| out)
    }

    fn pop_oldest(&self) -> Result<Option<u64>, StoreError> {
        match self.db.pop_min()? {
            Some((k, v)) => {
                self.account_removed(v.len());
                Ok(key_seq(&k))
            }
            None => Ok(None),
        }
    }

    fn account_removed(&self, value_len: usize) {
        self.records.fetch_sub(1, Ordering::SeqCst);
        self.bytes
            .fetch_sub(KEY_BYTES + value_len as u64, Ordering::SeqCst);
        self.dirty.store(true, Ordering::SeqCst);
    }

    /// Removes acknowledged records. Returns how many were still there (a record evicted or
    /// expired meanwhile is simply gone).
    pub fn remove(&self, seqs: &[u64]) -> Result<u64, StoreError> {
        let mut n = 0;
        for s in seqs {
            if let Some(v) = self.db.remove(s.to_be_bytes())? {
                self.account_removed(v.len());
                n += 1;
            }
        }
        self.publish_gauges();
        Ok(n)
    }

    /// Up to `max` records with sequence number `>= from`, in order. Undecodable records are
    /// removed and counted.
    pub fn read_from(&self, from: u64, max: usize) -> Result<Vec<(u64, Record)>, StoreError> {
        let mut out = Vec::with_capacity(max.min(1024));
        for kv in self.db.range(from.to_be_bytes()..) {
            if out.len() >= max {
                break;
            }
            let (k, v) = kv?;
            let seq = key_seq(&k);
            match (seq, Record::decode(&v)) {
                (Some(seq), Some(r)) => out.push((seq, r)),
                _ => {
                    if self.db.remove(&k)?.is_some() {
                        self.account_removed(v.len());
                        self.metrics.count_drop(DropReason::Corrupt, 1);
                        warn!(key = ?k, "dropped an undecodable queue record");
                    }
                }
            }
        }
        Ok(out)
    }

    /// Per-topic record counts for sequence numbers in `[from, to)`. Reads only the topic of
    /// each record (no payload copy): it runs over the whole backlog at every reconnect.
    pub fn topic_counts(
        &self,
        from: u64,
        to: u64,
    ) -> Result<std::collections::HashMap<String, u64>, StoreError> {
        let mut counts: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
        for kv in self.db.range(from.to_be_bytes()..to.to_be_bytes()) {
            let (_, v) = kv?;
            if let Some(topic) = Record::decode_topic(&v) {
                match counts.get_mut(topic) {
                    Some(n) => *n += 1,
                    None => {
                        counts.insert(topic.to_string(), 1);
                    }
                }
            }
        }
        Ok(counts)
    }

    /// Drops records older than `store.max_age` from the head. Returns how many.
    pub fn expire(&self) -> Result<u64, StoreError> {
        if self.cfg.max_age.is_zero() {
            return Ok(0);
        }
        let limit = now_ms().saturating_sub(self.cfg.max_age.as_millis() as u64);
        let mut n = 0;
        while let Some((k, v)) = self.db.first()? {
            match Record::decode(&v) {
                Some(r) if r.ts_ms >= limit => break,
                _ => {}
            }
            if self.db.remove(&k)?.is_some() {
                self.account_removed(v.len());
                n += 1;
            }
        }
        if n > 0 {
            self.metrics.count_drop(DropReason::Expired, n);
            warn!(count = n, max_age = ?self.cfg.max_age, "expired queued records");
        }
        self.publish_gauges();
        Ok(n)
    }

    /// Flushes and fsyncs everything appended or removed since the last commit.
    pub fn commit(&self) -> Result<bool, StoreError> {
        if !self.dirty.swap(false, Ordering::SeqCst) {
            return Ok(false);
        }
        // Everything appended before this point is covered once the fsync returns.
        let covered = self.next_seq().saturating_sub(1);
        let res = (|| -> Result<(), StoreError> {
            self.db.flush()?;
            File::open(self.dir.join("db"))?.sync_all()?;
            // Values too large for a log segment live in blob files, which sled writes
            // without fsync; sync them too.
            if let Ok(entries) = std::fs::read_dir(self.dir.join("blobs")) {
                for e in entries.flatten() {
                    File::open(e.path())?.sync_all()?;
                }
            }
            Ok(())
        })();
        match res {
            Ok(()) => {
                self.metrics.store_commits.inc();
                self.metrics.store_committed_seq.set(covered as i64);
                Ok(true)
            }
            Err(e) => {
                self.dirty.store(true, Ordering::SeqCst);
                self.metrics.store_commit_errors.inc();
                Err(e)
            }
        }
    }

    /// Refreshes the depth and age gauges.
    pub fn publish_gauges(&self) {
        let m = &self.metrics;
        m.queue_records.set(self.records() as i64);
        m.queue_bytes.set(self.bytes() as i64);
    }

    /// Refreshes the slower gauges (disk size, oldest age). Called from the committer.
    pub fn publish_slow_gauges(&self) {
        self.metrics
            .queue_oldest_age_seconds
            .set(self.oldest_age().map(|d| d.as_secs_f64()).unwrap_or(0.0));
        if let Ok(n) = self.db.size_on_disk() {
            self.metrics.store_disk_bytes.set(n as i64);
        }
    }

    /// Records in the queue.
    pub fn records(&self) -> u64 {
        self.records.load(Ordering::SeqCst)
    }

    /// Bytes in the queue.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }

    /// The sequence number the next append gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq.load(Ordering::SeqCst)
    }

    /// Sequence number of the oldest record.
    pub fn head(&self) -> Option<u64> {
        self.db
            .first()
            .ok()
            .flatten()
            .and_then(|(k, _)| key_seq(&k))
    }

    /// Age of the oldest record.
    pub fn oldest_age(&self) -> Option<Duration> {
        let (_, v) = self.db.first().ok().flatten()?;
        let r = Record::decode(&v)?;
        Some(Duration::from_millis(now_ms().saturating_sub(r.ts_ms)))
    }

    /// Watch that changes after every append (value: next sequence number).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.appended.subscribe()
    }
}

/// Sends batches of acknowledged sequence numbers to the remover thread.
pub type RemoveTx = tokio::sync::mpsc::Sender<Vec<u64>>;

/// Starts the thread that deletes acknowledged records, so the bridge never waits on disk
/// work between PUBACKs. Channel policy: at most 64 pending batches; when full the bridge's
/// send waits (back-pressure on the sender, nothing is dropped). The thread ends when every
/// sender is gone, after removing what was sent; join it before the final commit.
pub fn spawn_remover(
    store: Arc<Store>,
) -> std::io::Result<(RemoveTx, std::thread::JoinHandle<()>)> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u64>>(64);
    let handle = std::thread::Builder::new()
        .name("fieldgate-remove".into())
        .spawn(move || {
            while let Some(batch) = rx.blocking_recv() {
                store.metrics.messages_out.inc_by(batch.len() as u64);
                if let Err(e) = store.remove(&batch) {
                    warn!(error = %e, records = batch.len(),
                        "removing acknowledged records failed; they will be sent again");
                }
            }
        })?;
    Ok((tx, handle))
}

fn key_seq(k: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(k.try_into().ok()?))
}

fn open_sled(dir: &Path, cfg: &StoreConfig) -> Result<sled::Db, String> {
    let config = sled::Config::new()
        .path(dir)
        .cache_capacity(cfg.cache_bytes)
        // Our committer does the flush + fsync; no second background flusher.
        .flush_every_ms(None)
        // 4 MiB segments keep values up to ~1 MiB inline in the log (not in blob files).
        .segment_size(4 * 1024 * 1024);
    // sled 0.34 can panic on some damaged images instead of returning an error.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open())) {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("sled panicked while opening".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(max_bytes: u64, policy: FullPolicy) -> StoreConfig {
        StoreConfig {
            max_bytes,
            full_policy: policy,
            ..StoreConfig::default()
        }
    }

    fn rec(topic: &str, n: u32) -> Record {
        Record {
            topic: topic.into(),
            payload: Bytes::from(n.to_string()),
            retain: false,
            ts_ms: now_ms(),
        }
    }

    #[test]
    fn encode_roundtrip() {
        let r = Record {
            topic: "a/b".into(),
            payload: Bytes::from_static(b"\x00\x01xyz"),
            retain: true,
            ts_ms: 42,
        };
        assert_eq!(Record::decode(&r.encode()), Some(r));
        assert_eq!(Record::decode(b"\x02garbage-garbage"), None);
        assert_eq!(Record::decode(b""), None);
    }

    #[test]
    fn append_read_remove_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q");
        let m = Metrics::new();
        {
            let s = Store::open(&path, &StoreConfig::default(), m.clone()).unwrap();
            let recs: Vec<_> = (0..10).map(|i| rec("t", i)).collect();
            assert_eq!(s.append(&recs).unwrap().accepted, 10);
            let got = s.read_from(0, 100).unwrap();
            assert_eq!(got.len(), 10);
            assert_eq!(got[0].0, 1);
            assert_eq!(s.remove(&[1, 2, 3]).unwrap(), 3);
            assert_eq!(s.remove(&[3]).unwrap(), 0);
            assert_eq!(s.records(), 7);
            assert!(s.commit().unwrap());
        }
        let s = Store::open(&path, &StoreConfig::default(), m).unwrap();
        assert_eq!(s.records(), 7);
        assert_eq!(s.head(), Some(4));
        assert_eq!(s.next_seq(), 11);
        let got = s.read_from(0, 100).unwrap();
        assert_eq!(got[0].1.payload, Bytes::from("3"));
    }

    #[test]
    fn retained_messages_survive_reopen_and_stay_out_of_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q");
        let m = Metrics::new();
        {
            let s = Store::open(&path, &StoreConfig::default(), m.clone()).unwrap();
            s.retain("dev/1/status", 1, b"online").unwrap();
            s.retain("dev/2/status", 2, b"offline").unwrap();
            s.retain("dev/1/status", 0, b"online again").unwrap();
            s.retain("dev/3/status", 1, b"x").unwrap();
            s.retain("dev/3/status", 1, b"").unwrap();
            assert!(s.commit().unwrap());
            assert_eq!(s.records(), 0);
        }
        let s = Store::open(&path, &StoreConfig::default(), m).unwrap();
        assert_eq!(s.records(), 0);
        assert_eq!(s.retained_count(), 2);
        let got = s.retained().unwrap();
        assert_eq!(
            got,
            vec![
                ("dev/1/status".to_string(), 0, Bytes::from("online again")),
                ("dev/2/status".to_string(), 2, Bytes::from("offline")),
            ]
        );
    }

    #[test]
    fn drop_oldest_counts_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let m = Metrics::new();
        let one = rec("t", 0).cost();
        let s = Store::open(
            &dir.path().join("q"),
            &cfg(one * 5, FullPolicy::DropOldest),
            m.clone(),
        )
        .unwrap();
        let recs: Vec<_> = (0..8).map(|i| rec("t", i)).collect();
        let a = s.append(&recs).unwrap();
        assert_eq!((a.accepted, a.evicted, a.rejected), (8, 3, 0));
        assert_eq!(s.records(), 5);
        assert_eq!(m.dropped(DropReason::QueueFull), 3);
        let got = s.read_from(0, 100).unwrap();
        assert_eq!(got.first().unwrap().1.payload, Bytes::from("3"));
    }

    #[test]
    fn reject_new_counts_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let m = Metrics::new();
        let one = rec("t", 0).cost();
        let s = Store::open(
            &dir.path().join("q"),
            &cfg(one * 5, FullPolicy::RejectNew),
            m.clone(),
        )
        .unwrap();
        let recs: Vec<_> = (0..8).map(|i| rec("t", i)).collect();
        let a = s.append(&recs).unwrap();
        assert_eq!((a.accepted, a.evicted, a.rejected), (5, 0, 3));
        assert_eq!(m.dropped(DropReason::Rejected), 3);
        let got = s.read_from(0, 100).unwrap();
        assert_eq!(got.last().unwrap().1.payload, Bytes::from("4"));
    }

    #[test]
    fn expire_drops_old_head() {
        let dir = tempfile::tempdir().unwrap();
        let m = Metrics::new();
        let c = StoreConfig {
            max_age: Duration::from_secs(60),
            ..StoreConfig::default()
        };
        let s = Store::open(&dir.path().join("q"), &c, m.clone()).unwrap();
        let mut old = rec("t", 0);
        old.ts_ms -= 120_000;
        s.append(&[old, rec("t", 1)]).unwrap();
        assert_eq!(s.expire().unwrap(), 1);
        assert_eq!(s.records(), 1);
        assert_eq!(m.dropped(DropReason::Expired), 1);
    }

    #[test]
    fn damaged_store_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q");
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(path.join("conf"), b"this is not a sled config").unwrap();
        std::fs::write(path.join("db"), vec![0xffu8; 4096]).unwrap();
        let m = Metrics::new();
        let s = Store::open(&path, &StoreConfig::default(), m.clone()).unwrap();
        assert_eq!(s.records(), 0);
        assert_eq!(m.store_quarantined.get(), 1);
        let moved = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().starts_with("q.damaged-"));
        assert!(moved);
    }
}
