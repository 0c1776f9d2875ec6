//! The durable store-and-forward queue: every message meant for the cloud, on disk (sled),
//! in arrival order, until the cloud has PUBACKed it.
//!
//! The path of a message: [`crate::ingest`] decides it goes up and hands it to the
//! [`journal`], whose thread appends it here in one batch with everything else that arrived
//! during the previous fsync and makes the batch durable (group commit); only then is the
//! publisher acknowledged. The bridge reads records (recent ones from memory, a backlog from
//! disk) and acknowledges them with [`Store::ack`]; the journal thread removes whole batches
//! once every record in them is acknowledged.
//!
//! # Layout (sled trees)
//! - default tree: batch values (format in [`batch`]; a commit is cut into values of at
//!   most `VALUE_BYTES`, 8 KiB, of records, so that sled's cache can evict them), key = the
//!   batch's first sequence number, `u64` big-endian, so sled's key order is queue order.
//!   Sequence numbers start at 1, grow by one per record, and are never reused (at open the
//!   next one is the larger of the last batch's end and the [`mark`] file's).
//! - `meta`: `cursor` -> `u64` BE: every record below it has been acknowledged (or dropped).
//! - `retained`: key = topic, value = `[qos u8][payload]`: the broker's retained messages
//!   (see [`crate::retained`]), outside the queue's counters and byte budget.
//! - `dead_letters`: records the cloud refused for good, key = their sequence number (format
//!   and invariants in [`dead`]), outside the queue's counters and byte budget.
//!
//! # Durability
//! A commit makes everything the journal inserted since the previous one durable with one
//! frame of the write-ahead file ([`wal`]) and its `fdatasync`; sled's own files are flushed
//! and fsynced only at a [`Store::checkpoint`] (about once a second), which also persists the
//! cursor and removals and records the last write-ahead lsn it covers in `meta` (`wal_lsn`).
//! A commit's frame also carries the cursor when it moved since the checkpoint, so after a
//! crash only what the cloud acknowledged since the last commit is sent again. Opening (and
//! reopening after a write error) replays the frames above that lsn into sled, cursor
//! included, and checkpoints what it recovered.
//!
//! # Invariants
//! - Only the journal thread mutates the trees (append, commit, compact, evict, expire,
//!   retain), so batches are written in sequence order; the one exception is
//!   `dead_letters`, which holds no batch (the bridge and the HTTP API write it). Reads and [`Store::ack`] may come from
//!   any thread; acknowledgements only change memory, the journal persists the cursor.
//! - A record is visible to readers ([`Store::next_seq`], [`Store::read_from`]) only once a
//!   completed fsync covers it.
//! - `head <= cursor <= durable_end <= end`: `head` is the first record of the first stored
//!   batch, `cursor` the first record not known to be acknowledged, `durable_end` the first
//!   record not yet covered by an fsync, `end` the next sequence number to assign.
//! - A record leaves the queue only when the cloud acknowledged it, by the full policy
//!   (`drop_oldest`), by the age limit, because it is damaged, or as a dead letter (the
//!   cloud refused it for good; kept in `dead_letters` first); the full policy, the age limit
//!   and damage are counted in `fieldgate_dropped_total{reason}`, dead letters in
//!   `fieldgate_bridge_dead_letters_total{reason}`, and each is logged.
//! - `max_bytes` counts the stored batch values and their keys; `reject_new` holds new records
//!   back (the journal waits, publishers get no acknowledgement) instead of dropping them.
//! - A store that cannot be opened is salvaged (see [`Store::open`]): every intact batch in
//!   its files is copied into a fresh store, the damaged directory is kept aside, what was
//!   lost is counted. The gateway never crash-loops on a bad disk image. "No space left" at
//!   open is not damage: [`Store::open_waiting`] waits and tries again.

pub mod batch;
pub mod config;
pub mod dead;
pub mod journal;
mod mark;
pub mod metrics;
pub mod wal;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::clock::now_ms;
use config::{FullPolicy, StoreConfig};
use metrics::{DropReason, StoreMetrics};

/// Key bytes counted per batch in the byte budget.
const KEY_BYTES: u64 = 8;
/// Key of the acknowledged-up-to cursor in the `meta` tree.
const CURSOR_KEY: &[u8] = b"cursor";
/// Key of the last write-ahead lsn a checkpoint covers, in the `meta` tree.
const WAL_LSN_KEY: &[u8] = b"wal_lsn";
/// Most bytes of durable records kept in memory for the bridge (the live lane reads there).
const TAIL_BYTES: usize = 4 * 1024 * 1024;

/// Errors from the store. The journal holds its records back and tries again; readers end
/// their cloud session and retry after a backoff.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled reported an error (I/O error, corruption).
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    /// File-system error around the store (fsync, rename, create).
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The file system is full: free space and the gateway carries on by itself.
    #[error("no space left on the device holding the queue")]
    NoSpace,
    /// `max_bytes` is reached and `full_policy = "reject_new"`: records wait for room.
    #[error("queue full (store.max_bytes with full_policy = \"reject_new\")")]
    Full,
    /// The store is being reopened after a write error; try again shortly.
    #[error("queue store is being reopened")]
    Reopening,
}

impl StoreError {
    /// The `cause` label of a refusal: `disk_full`, `queue_full` or `io`.
    pub fn cause(&self) -> &'static str {
        match self {
            StoreError::NoSpace => "disk_full",
            StoreError::Full => "queue_full",
            _ => "io",
        }
    }

    /// Maps "no space left" from either error kind to [`StoreError::NoSpace`].
    fn classify(self) -> StoreError {
        let enospc = match &self {
            StoreError::Io(e) => is_enospc(e),
            StoreError::Sled(sled::Error::Io(e)) => is_enospc(e),
            _ => false,
        };
        if enospc {
            StoreError::NoSpace
        } else {
            self
        }
    }
}

fn is_enospc(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(28) || e.kind() == std::io::ErrorKind::StorageFull
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
    /// Bytes this record takes inside a batch value.
    pub fn cost(&self) -> u64 {
        batch::record_size(self) as u64
    }
}

/// Result of an append.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// First sequence number given to the batch.
    pub first: u64,
    /// Records written.
    pub accepted: u64,
    /// Old records evicted to make room (`drop_oldest`).
    pub evicted: u64,
}

/// The sled trees; swapped as a whole when the store is reopened after a write error.
struct Trees {
    db: sled::Db,
    meta: sled::Tree,
    retained: sled::Tree,
    dead: sled::Tree,
}

/// Queue positions and the in-memory parts; one mutex, never held across disk I/O that
/// readers wait on for long (reads copy what they need and release it).
#[derive(Default)]
struct State {
    head: u64,
    /// End of the first stored batch (compaction can start when the cursor passes it).
    first_end: u64,
    cursor: u64,
    durable_end: u64,
    end: u64,
    /// Acknowledged records at or above `cursor`.
    acked: BTreeSet<u64>,
    /// Stored records not acknowledged (the queue depth).
    unacked: u64,
    /// Bytes of stored batch values and keys.
    bytes: u64,
    /// Stored records (acknowledged or not) in stored batches.
    stored: u64,
    /// Records appended but not yet covered by an fsync.
    pending: Vec<(u64, Record)>,
    /// The most recent durable records, contiguous in sequence.
    tail: VecDeque<(u64, Record)>,
    tail_bytes: usize,
    /// Cursor value last written to `meta`.
    cursor_saved: u64,
    /// Batches were removed since the last commit.
    removed: bool,
}

impl State {
    /// Unacknowledged records in the queue (durable or not).
    fn records(&self) -> u64 {
        self.unacked
    }

    /// Marks one record acknowledged (or given up as damaged); false if it already was.
    fn mark_acked(&mut self, s: u64) -> bool {
        if s >= self.cursor && s < self.durable_end && self.acked.insert(s) {
            self.unacked = self.unacked.saturating_sub(1);
            return true;
        }
        false
    }

    fn advance_cursor(&mut self) {
        if self.cursor < self.head {
            self.cursor = self.head;
            self.acked = self.acked.split_off(&self.head);
        }
        while self.cursor < self.durable_end && self.acked.remove(&self.cursor) {
            self.cursor += 1;
        }
        while self.tail.front().is_some_and(|(s, _)| *s < self.cursor) {
            if let Some((_, r)) = self.tail.pop_front() {
                self.tail_bytes -= r.cost() as usize;
            }
        }
    }
}

/// Handle to the queue. Cheap to share behind an `Arc`.
pub struct Store {
    trees: RwLock<Option<Trees>>,
    retained_n: AtomicU64,
    /// Dead letters kept (see [`dead`]).
    dead_n: AtomicU64,
    dir: PathBuf,
    cfg: StoreConfig,
    metrics: Arc<StoreMetrics>,
    state: Mutex<State>,
    /// Carries the durable end after each commit so the bridge wakes up.
    appended: watch::Sender<u64>,
    /// The write-ahead file commits go to (sled itself is flushed at checkpoints).
    wal: Mutex<wal::Wal>,
    /// The next record the bridge's live lane sends; 0 while there is no cloud session.
    live_next: AtomicU64,
}

impl Store {
    /// Opens (or creates) the queue in `dir`. A store sled cannot open is moved aside to
    /// `<dir>.damaged-<unix seconds>`, its intact batches are salvaged into a fresh one, and
    /// the loss is counted and logged; `Err(NoSpace)` means the disk is full (not damage).
    pub fn open(
        dir: &Path,
        cfg: &StoreConfig,
        metrics: Arc<StoreMetrics>,
    ) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir.parent().unwrap_or(Path::new(".")))?;
        let mark = mark::Mark::load(dir);
        let (trees, salvaged) = match open_trees_waiting(dir, cfg, LOCK_WAIT) {
            Ok(t) => (t, None),
            Err(OpenError::NoSpace) => return Err(StoreError::NoSpace),
            Err(e @ OpenError::Locked) => return Err(e.into()),
            Err(why) => {
                let aside = PathBuf::from(format!("{}.damaged-{}", dir.display(), now_ms() / 1000));
                std::fs::rename(dir, &aside)?;
                metrics.store_quarantined.set(1);
                let found = salvage::scan(&aside);
                error!(
                    store = %dir.display(),
                    moved_to = %aside.display(),
                    error = %why,
                    salvaged_batches = found.len(),
                    "queue store cannot be opened; moved aside, salvaging every intact batch \
                     into a fresh store"
                );
                (open_trees(dir, cfg)?, Some(found))
            }
        };
        let floor = wal_floor(&trees)?;
        let (wal, frames) = wal::Wal::open(dir, floor).map_err(|e| StoreError::Io(e).classify())?;
        let store = Store {
            retained_n: AtomicU64::new(trees.retained.len() as u64),
            dead_n: AtomicU64::new(0),
            trees: RwLock::new(Some(trees)),
            dir: dir.to_path_buf(),
            cfg: cfg.clone(),
            metrics,
            state: Mutex::new(State::default()),
            appended: watch::channel(0).0,
            wal: Mutex::new(wal),
            live_next: AtomicU64::new(0),
        };
        if let Some(found) = salvaged {
            store.restore_salvage(found, mark)?;
        }
        let replayed = store.replay(frames, floor)?;
        store.scan(mark)?;
        // After the scan, so the checkpoint saves the recovered cursor, not a blank one.
        if replayed > 0 {
            store.checkpoint()?;
        }
        store.metrics.retained.set(store.retained_count() as i64);
        store.refresh_dead_count();
        Ok(store)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wal(&self) -> MutexGuard<'_, wal::Wal> {
        self.wal.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies the write-ahead frames above `floor` (the last checkpoint's lsn) to sled, in
    /// lsn order. Returns how many frames it applied; they are durable in sled only after
    /// the next [`Store::checkpoint`].
    fn replay(
        &self,
        mut frames: Vec<(u64, Vec<wal::Op>)>,
        floor: u64,
    ) -> Result<usize, StoreError> {
        frames.retain(|(lsn, _)| *lsn > floor);
        frames.sort_by_key(|(lsn, _)| *lsn);
        frames.dedup_by_key(|(lsn, _)| *lsn);
        let (mut records, mut retained) = (0u64, 0u64);
        let mut cursor = None;
        self.with_trees(|t| {
            for (_, ops) in &frames {
                for op in ops {
                    match op {
                        wal::Op::Batch(v) => {
                            if let Some(h) = batch::Header::read(v) {
                                t.db.insert(h.first.to_be_bytes(), v.as_slice())?;
                                records += h.count as u64;
                            }
                        }
                        wal::Op::Retain {
                            topic,
                            qos,
                            payload,
                        } => {
                            self.apply_retain(t, topic, *qos, payload)?;
                            retained += 1;
                        }
                        wal::Op::Cursor(c) => cursor = Some(*c),
                    }
                }
            }
            if let Some(c) = cursor {
                let saved = t
                    .meta
                    .get(CURSOR_KEY)?
                    .and_then(|v| key_seq(&v))
                    .unwrap_or(0);
                if c > saved {
                    t.meta.insert(CURSOR_KEY, &c.to_be_bytes())?;
                }
            }
            Ok(())
        })?;
        if !frames.is_empty() {
            info!(
                frames = frames.len(),
                records, retained, "queue: replayed the commits made since the last checkpoint"
            );
        }
        Ok(frames.len())
    }

    fn with_trees<T>(
        &self,
        f: impl FnOnce(&Trees) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let g = self.trees.read().unwrap_or_else(|e| e.into_inner());
        match g.as_ref() {
            Some(t) => f(t),
            None => Err(StoreError::Reopening),
        }
    }

    /// Writes the salvaged batches of a damaged store into the fresh one.
    fn restore_salvage(
        &self,
        found: Vec<(batch::Header, batch::Decoded)>,
        mark: mark::Mark,
    ) -> Result<(), StoreError> {
        // The cursor of the damaged store is its mark's (its meta tree is gone with it).
        let cursor = mark.cursor;
        let mut by_seq: std::collections::BTreeMap<u64, Record> = Default::default();
        let mut damaged = 0;
        for (_, d) in found {
            damaged += d.damaged;
            for (seq, r) in d.records {
                if seq >= cursor {
                    by_seq.insert(seq, r);
                }
            }
        }
        // Rebuild batches of consecutive sequence numbers.
        let mut run: Vec<Record> = Vec::new();
        let mut run_first = 0;
        let mut n = 0u64;
        self.with_trees(|t| {
            let flush = |first: u64, run: &mut Vec<Record>| -> Result<(), StoreError> {
                if !run.is_empty() {
                    t.db.insert(first.to_be_bytes(), batch::encode(first, run))?;
                    run.clear();
                }
                Ok(())
            };
            for (seq, r) in by_seq {
                if run.is_empty() || run_first + run.len() as u64 != seq || run.len() >= 1024 {
                    flush(run_first, &mut run)?;
                    run_first = seq;
                }
                run.push(r);
                n += 1;
            }
            flush(run_first, &mut run)?;
            t.meta.insert(CURSOR_KEY, &cursor.to_be_bytes())?;
            t.db.flush()?;
            Ok(())
        })?;
        let expected = mark.end.saturating_sub(cursor);
        let lost = expected.saturating_sub(n).max(damaged);
        if lost > 0 {
            self.metrics.count_drop(DropReason::Corrupt, lost);
        }
        error!(
            salvaged = n,
            lost, "queue salvage done: the salvaged records are delivered, the lost ones are not"
        );
        self.sync_files()?;
        Ok(())
    }

    /// Establishes the queue positions from what is on disk. Runs once at open.
    fn scan(&self, mark: mark::Mark) -> Result<(), StoreError> {
        let (survey, cursor) = self.with_trees(|t| {
            let cursor = t
                .meta
                .get(CURSOR_KEY)?
                .and_then(|v| key_seq(&v))
                .unwrap_or(0);
            Ok((survey(t, u64::MAX, cursor, &BTreeSet::new())?, cursor))
        })?;
        let missing = survey.missing();
        let holes = survey.holes.clone();
        let Survey {
            first,
            last_end,
            stored,
            bytes,
            unacked,
            dropped: bad,
            ..
        } = survey;
        if !bad.is_empty() {
            warn!(
                batches = bad.len(),
                "dropping queue batches whose header is damaged"
            );
        }
        let end = last_end.max(mark.end).max(cursor).max(1);
        let head = first.map_or(end, |h| h.first);
        // Records the mark says were durable but that the store no longer has: a damaged
        // tail that sled's recovery cut off.
        let lost_tail = mark.end.saturating_sub(last_end.max(cursor).max(head));
        if lost_tail > 0 {
            self.metrics.count_drop(DropReason::Corrupt, lost_tail);
            error!(
                lost = lost_tail,
                last_kept = last_end.saturating_sub(1),
                last_durable = mark.end.saturating_sub(1),
                "queue records that were durable are missing after recovery (damaged store \
                 files); they are lost"
            );
        }
        if missing > 0 {
            self.metrics.count_drop(DropReason::Corrupt, missing);
            error!(
                lost = missing,
                ranges = ?holes,
                "queue records that were durable are missing in the middle of the queue \
                 (damaged store files); they are lost, the records around them are delivered"
            );
        }
        let mut st = self.lock();
        st.head = head;
        st.first_end = first.map_or(end, |h| h.end());
        st.cursor = cursor.max(head);
        st.cursor_saved = cursor;
        st.durable_end = end;
        st.end = end;
        st.stored = stored;
        st.bytes = bytes;
        st.unacked = unacked;
        let records = st.records();
        drop(st);
        self.appended.send_replace(end);
        self.metrics.store_durable_seq.set(end as i64 - 1);
        self.publish_gauges();
        info!(
            records,
            bytes,
            next_seq = end,
            lost_corrupt = lost_tail + missing,
            "queue opened"
        );
        Ok(())
    }

    /// Opens the queue off the runtime threads. A full disk is not damage: this waits (ERROR
    /// every 30 s) and tries again every second until space is freed. Other errors return.
    pub async fn open_waiting(
        dir: &Path,
        cfg: &StoreConfig,
        metrics: Arc<StoreMetrics>,
    ) -> Result<Store, StoreError> {
        let mut last_log: Option<std::time::Instant> = None;
        loop {
            let (d, c, m) = (dir.to_path_buf(), cfg.clone(), metrics.clone());
            let opened = tokio::task::spawn_blocking(move || Store::open(&d, &c, m))
                .await
                .map_err(|e| StoreError::Io(std::io::Error::other(e)))?;
            match opened {
                Err(StoreError::NoSpace) => {
                    if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
                        error!(
                            store = %dir.display(),
                            "no space left on the device holding the queue; waiting for space \
                             (free some and the gateway starts by itself)"
                        );
                        last_log = Some(std::time::Instant::now());
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                other => return other,
            }
        }
    }

    /// Persists the cloud's last acknowledgements once the journal and the bridge have
    /// stopped (no other writer is left): compact, checkpoint, save the mark. On failure
    /// those records are sent again (WARN).
    pub async fn persist_final(self: Arc<Self>) {
        let done = tokio::task::spawn_blocking(move || {
            self.compact()?;
            self.checkpoint()?;
            self.save_mark();
            Ok::<_, StoreError>(())
        })
        .await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(error = %e, "persisting the last cloud acknowledgements failed; those records are sent again")
            }
            Err(e) => error!(error = %e, "final queue task failed"),
        }
    }

    /// Keeps `payload` as the retained message of `topic`; an empty payload deletes it
    /// (MQTT's rule for retained messages). Journal thread only; durable at the next commit.
    pub fn retain(&self, topic: &str, qos: u8, payload: &[u8]) -> Result<(), StoreError> {
        self.with_trees(|t| self.apply_retain(t, topic, qos, payload))
            .map_err(StoreError::classify)?;
        self.wal().stage_retain(topic, qos, payload);
        self.metrics.retained.set(self.retained_count() as i64);
        Ok(())
    }

    fn apply_retain(
        &self,
        t: &Trees,
        topic: &str,
        qos: u8,
        payload: &[u8],
    ) -> Result<(), StoreError> {
        if payload.is_empty() {
            if t.retained.remove(topic.as_bytes())?.is_some() {
                self.retained_n.fetch_sub(1, Ordering::Relaxed);
            }
        } else {
            let mut v = Vec::with_capacity(1 + payload.len());
            v.push(qos.min(2));
            v.extend_from_slice(payload);
            if t.retained.insert(topic.as_bytes(), v)?.is_none() {
                self.retained_n.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Every kept retained message as (topic, qos, payload), in topic order. Entries that
    /// cannot be decoded (not UTF-8, no payload) are skipped.
    pub fn retained(&self) -> Result<Vec<(String, u8, Bytes)>, StoreError> {
        self.with_trees(|t| {
            let mut out = Vec::new();
            for kv in t.retained.iter() {
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
        })
    }

    /// Number of kept retained messages.
    pub fn retained_count(&self) -> usize {
        self.retained_n.load(Ordering::Relaxed) as usize
    }

    /// Appends `records` as one commit (journal thread only; stored as consecutive batch
    /// values of at most `VALUE_BYTES` (8 KiB) of records), applying the full policy
    /// first: `drop_oldest` evicts whole batches from the head, `reject_new` returns
    /// [`StoreError::Full`] and nothing is written. Not durable until [`Store::commit`].
    pub fn append(&self, records: &[Record]) -> Result<Appended, StoreError> {
        if records.is_empty() {
            return Ok(Appended::default());
        }
        let chunks = value_chunks(records);
        let cost = chunks.len() as u64 * (KEY_BYTES + batch::HEADER as u64)
            + records.iter().map(Record::cost).sum::<u64>();
        let mut out = Appended::default();
        loop {
            let bytes = self.lock().bytes;
            if bytes + cost <= self.cfg.max_bytes {
                break;
            }
            match self.cfg.full_policy {
                FullPolicy::RejectNew => return Err(StoreError::Full),
                FullPolicy::DropOldest => match self.evict_head(DropReason::QueueFull)? {
                    Some(n) => out.evicted += n,
                    // Nothing left to evict: the batch alone is over the budget.
                    None => return Err(StoreError::Full),
                },
            }
        }
        let first = self.lock().end;
        let mut at = first;
        for chunk in &chunks {
            let value = batch::encode(at, chunk);
            self.with_trees(|t| Ok(t.db.insert(at.to_be_bytes(), value.as_slice())?))
                .map_err(StoreError::classify)?;
            self.wal().stage_batch(&value);
            at += chunk.len() as u64;
        }
        let mut st = self.lock();
        let n = records.len() as u64;
        if st.stored == 0 {
            st.head = first;
            st.first_end = first + chunks[0].len() as u64;
        }
        st.end = first + n;
        st.stored += n;
        st.unacked += n;
        st.bytes += cost;
        st.pending.extend(
            records
                .iter()
                .enumerate()
                .map(|(i, r)| (first + i as u64, r.clone())),
        );
        drop(st);
        out.first = first;
        out.accepted = n;
        if out.evicted > 0 {
            warn!(
                evicted = out.evicted,
                "queue full (store.max_bytes): oldest records dropped (full_policy = drop_oldest)"
            );
        }
        Ok(out)
    }

    /// Removes the head batch, counting its unacknowledged records as dropped for `reason`.
    /// `None` when the queue is empty.
    fn evict_head(&self, reason: DropReason) -> Result<Option<u64>, StoreError> {
        let Some((k, v)) = self
            .with_trees(|t| Ok(t.db.pop_min()?))
            .map_err(StoreError::classify)?
        else {
            return Ok(None);
        };
        let h = batch::Header::read(&v);
        let (count, end) = match h {
            Some(h) => (h.count as u64, h.end()),
            None => (0, key_seq(&k).unwrap_or(0) + 1),
        };
        let mut st = self.lock();
        let unacked = (st.cursor.max(end.saturating_sub(count))..end)
            .filter(|s| !st.acked.contains(s))
            .count() as u64;
        st.removed = true;
        st.stored = st.stored.saturating_sub(count);
        st.unacked = st.unacked.saturating_sub(unacked);
        st.bytes = st.bytes.saturating_sub(KEY_BYTES + v.len() as u64);
        st.head = end;
        self.refresh_first(&mut st)?;
        st.advance_cursor();
        drop(st);
        if unacked > 0 {
            self.metrics.count_drop(reason, unacked);
        }
        Ok(Some(unacked))
    }

    /// Re-reads where the first stored batch ends.
    fn refresh_first(&self, st: &mut State) -> Result<(), StoreError> {
        match self.with_trees(|t| Ok(t.db.first()?))? {
            Some((_, v)) => {
                if let Some(h) = batch::Header::read(&v) {
                    st.head = h.first;
                    st.first_end = h.end();
                }
            }
            None => {
                st.head = st.end;
                st.first_end = st.end;
            }
        }
        Ok(())
    }

    /// Makes everything appended since the last commit durable: one write-ahead frame and
    /// its `fdatasync` (a checkpoint instead when the frame does not fit in the file); then
    /// makes the appended records visible to readers. Journal thread only.
    pub fn commit(&self) -> Result<(), StoreError> {
        let (cursor, saved) = {
            let st = self.lock();
            (st.cursor, st.cursor_saved)
        };
        let wrote = {
            let mut w = self.wal();
            if w.staged() && cursor > saved {
                w.stage_cursor(cursor);
            }
            if !w.staged() {
                Ok(true)
            } else if w.fits() {
                w.write().map(|()| true).map_err(|e| {
                    self.metrics.store_commit_errors.inc();
                    StoreError::Io(e).classify()
                })
            } else {
                Ok(false)
            }
        };
        match wrote {
            Ok(true) => {}
            Ok(false) => self.checkpoint()?,
            Err(e) => return Err(e),
        }
        self.metrics.store_commits.inc();
        let mut st = self.lock();
        let pending = std::mem::take(&mut st.pending);
        for (seq, r) in pending {
            st.tail_bytes += r.cost() as usize;
            st.tail.push_back((seq, r));
        }
        while st.tail_bytes > TAIL_BYTES {
            match st.tail.pop_front() {
                Some((_, r)) => st.tail_bytes -= r.cost() as usize,
                None => break,
            }
        }
        st.durable_end = st.end;
        let end = st.end;
        drop(st);
        self.metrics.store_durable_seq.set(end as i64 - 1);
        self.appended.send_replace(end);
        self.publish_gauges();
        Ok(())
    }

    /// Flushes and fsyncs sled's files with the cursor and the last write-ahead lsn, then
    /// starts the write-ahead file over. Covers every insert and removal made so far (what
    /// is staged for the next frame too). Journal thread only.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        let cursor = self.lock().cursor;
        let mut w = self.wal();
        let lsn = w.last_lsn();
        let res = self
            .with_trees(|t| {
                t.meta.insert(CURSOR_KEY, &cursor.to_be_bytes())?;
                t.meta.insert(WAL_LSN_KEY, &lsn.to_be_bytes())?;
                t.db.flush()?;
                Ok(())
            })
            .and_then(|()| self.sync_files());
        if let Err(e) = res {
            w.clear();
            self.metrics.store_commit_errors.inc();
            return Err(e.classify());
        }
        w.rewind();
        drop(w);
        self.metrics.store_checkpoints.inc();
        let mut st = self.lock();
        st.cursor_saved = cursor;
        st.removed = false;
        Ok(())
    }

    /// `Db::flush` is only `sync_file_range` on Linux: fsync sled's files for real.
    fn sync_files(&self) -> Result<(), StoreError> {
        File::open(self.dir.join("db"))?.sync_all()?;
        // Values too large for a log segment live in blob files, which sled writes
        // without fsync; sync them too.
        if let Ok(entries) = std::fs::read_dir(self.dir.join("blobs")) {
            for e in entries.flatten() {
                File::open(e.path())?.sync_all()?;
            }
        }
        Ok(())
    }

    /// Drops what a failed commit left unconfirmed and reopens sled (a write error leaves
    /// sled refusing every later write). Journal thread only; the journal appends the held
    /// records again afterwards, under the same sequence numbers.
    pub fn reopen(&self) -> Result<(), StoreError> {
        let mut g = self.trees.write().unwrap_or_else(|e| e.into_inner());
        drop(g.take());
        // The dropped instance's background writes may hold sled's lock a little longer.
        let trees = open_trees_waiting(&self.dir, &self.cfg, Duration::from_secs(2))?;
        let floor = wal_floor(&trees)?;
        *g = Some(trees);
        drop(g);
        // The commits since the last checkpoint are in the write-ahead file only.
        let (wal, frames) =
            wal::Wal::open(&self.dir, floor).map_err(|e| StoreError::Io(e).classify())?;
        *self.wal() = wal;
        self.replay(frames, floor)?;
        // Positions as the disk has them now. Batches past the durable end were never
        // confirmed: they go, and the journal appends them again under the same numbers.
        let (durable_end, cursor, acked) = {
            let st = self.lock();
            (st.durable_end, st.cursor, st.acked.clone())
        };
        let sv = self.with_trees(|t| survey(t, durable_end, cursor, &acked))?;
        let (stored, bytes, unacked) = (sv.stored, sv.bytes, sv.unacked);
        let mut st = self.lock();
        st.pending.clear();
        st.end = durable_end;
        st.stored = stored;
        st.bytes = bytes;
        st.unacked = unacked;
        self.refresh_first(&mut st)?;
        st.advance_cursor();
        drop(st);
        self.refresh_dead_count();
        self.checkpoint()
    }

    /// The bridge's live lane: the next record it sends, or `None` when there is no cloud
    /// session.
    pub fn set_live(&self, next: Option<u64>) {
        self.live_next.store(next.unwrap_or(0), Ordering::Relaxed);
    }

    /// Durable records the live lane has not sent yet; `None` without a cloud session.
    pub fn live_lag(&self) -> Option<u64> {
        match self.live_next.load(Ordering::Relaxed) {
            0 => None,
            next => Some(self.lock().durable_end.saturating_sub(next)),
        }
    }

    /// The next sequence number the journal will assign.
    pub fn end(&self) -> u64 {
        self.lock().end
    }

    /// Removes batches every record of which is acknowledged (nothing unacknowledged is
    /// counted as dropped). Journal thread only. Returns whether it removed any; the
    /// removal and the cursor become durable with the next commit.
    pub fn compact(&self) -> Result<bool, StoreError> {
        let mut changed = false;
        loop {
            let (first_end, cursor, stored) = {
                let st = self.lock();
                (st.first_end, st.cursor, st.stored)
            };
            if stored == 0 || first_end > cursor {
                break;
            }
            self.evict_head(DropReason::Corrupt)?;
            changed = true;
        }
        Ok(changed)
    }

    /// Whether the cursor moved or batches went since the last commit.
    pub fn has_unsaved(&self) -> bool {
        let wal_used = self.wal_used() > 0;
        let st = self.lock();
        wal_used || st.removed || st.cursor != st.cursor_saved
    }

    /// Bytes of write-ahead frames since the last checkpoint.
    pub fn wal_used(&self) -> u64 {
        self.wal().used()
    }

    /// Drops head batches whose newest record is older than `store.max_age`. Returns how
    /// many records were dropped.
    pub fn expire(&self) -> Result<u64, StoreError> {
        if self.cfg.max_age.is_zero() {
            return Ok(0);
        }
        let limit = now_ms().saturating_sub(self.cfg.max_age.as_millis() as u64);
        let mut n = 0;
        loop {
            let Some((_, v)) = self.with_trees(|t| Ok(t.db.first()?))? else {
                break;
            };
            match batch::Header::read(&v) {
                Some(h) if h.ts_last >= limit => break,
                _ => {}
            }
            match self.evict_head(DropReason::Expired)? {
                Some(k) => n += k,
                None => break,
            }
        }
        if n > 0 {
            warn!(count = n, max_age = ?self.cfg.max_age, "expired queued records");
        }
        self.publish_gauges();
        Ok(n)
    }

    /// Marks records as delivered (the cloud PUBACKed them). Only memory changes here; the
    /// journal persists the cursor and removes whole batches.
    pub fn ack(&self, seqs: &[u64]) {
        self.ack_inner(seqs, true);
    }

    /// [`Store::ack`]; `delivered`: count them in `messages_out` (false for dead letters).
    fn ack_inner(&self, seqs: &[u64], delivered: bool) {
        let mut st = self.lock();
        let mut n = 0;
        for &s in seqs {
            if st.mark_acked(s) {
                n += 1;
            }
        }
        st.advance_cursor();
        drop(st);
        if delivered {
            self.metrics.messages_out.inc_by(n);
        }
        self.publish_gauges();
    }

    /// Up to `max` durable records from the in-memory tail with sequence number `>= from`,
    /// or `None` when `from` is older than the tail (read the disk then).
    pub fn read_tail(&self, from: u64, max: usize) -> Option<Vec<(u64, Record)>> {
        let st = self.lock();
        let from = from.max(st.cursor);
        let front = st.tail.front().map_or(st.durable_end, |(s, _)| *s);
        if from < front {
            return None;
        }
        let skip = (from - front) as usize;
        Some(
            st.tail
                .iter()
                .skip(skip)
                .take(max)
                .filter(|(s, _)| !st.acked.contains(s))
                .cloned()
                .collect(),
        )
    }

    /// Up to `max` durable records with sequence number `>= from`, in order: from memory
    /// when recent, else from disk. Damaged records are skipped, counted once, and treated
    /// as delivered so they never hold the cursor back.
    pub fn read_from(&self, from: u64, max: usize) -> Result<Vec<(u64, Record)>, StoreError> {
        if let Some(v) = self.read_tail(from, max) {
            return Ok(v);
        }
        let (cursor, durable_end) = {
            let st = self.lock();
            (st.cursor, st.durable_end)
        };
        let from = from.max(cursor);
        let mut out = Vec::with_capacity(max.min(1024));
        let mut damaged = Vec::new();
        self.with_trees(|t| {
            let iter = batches(t, from, u64::MAX)?;
            for kv in iter {
                if out.len() >= max {
                    break;
                }
                let (_, v) = kv?;
                let Some(h) = batch::Header::read(&v) else {
                    continue;
                };
                if h.first >= durable_end {
                    break;
                }
                if h.end() <= from {
                    continue;
                }
                let Some(d) = batch::decode(&v, from) else {
                    continue;
                };
                let mut expect = h.first.max(from);
                for (seq, r) in d.records {
                    damaged.extend(expect..seq);
                    expect = seq + 1;
                    if out.len() < max {
                        out.push((seq, r));
                    }
                }
                if out.len() < max {
                    damaged.extend(expect..h.end());
                }
            }
            Ok(())
        })?;
        {
            let st = self.lock();
            out.retain(|(s, _)| !st.acked.contains(s));
        }
        if !damaged.is_empty() {
            let mut st = self.lock();
            let fresh: Vec<u64> = damaged.into_iter().filter(|s| st.mark_acked(*s)).collect();
            st.advance_cursor();
            drop(st);
            if !fresh.is_empty() {
                self.metrics
                    .count_drop(DropReason::Corrupt, fresh.len() as u64);
                warn!(
                    lost = fresh.len(),
                    first = fresh[0],
                    "damaged queue records skipped (checksum mismatch)"
                );
            }
        }
        Ok(out)
    }

    /// Per-topic counts of unacknowledged records with sequence numbers in `[from, to)`.
    /// Reads only topics (no payload copy): it runs over the whole backlog at every reconnect.
    pub fn topic_counts(&self, from: u64, to: u64) -> Result<HashMap<String, u64>, StoreError> {
        let acked = self.lock().acked.clone();
        let mut counts: HashMap<String, u64> = HashMap::new();
        self.with_trees(|t| {
            let iter = batches(t, from, to)?;
            for kv in iter {
                let (_, v) = kv?;
                let mut seq_of = batch::Header::read(&v).map_or(0, |h| h.first.max(from));
                batch::topics(&v, from, to, |topic| {
                    let seq = seq_of;
                    seq_of += 1;
                    if acked.contains(&seq) {
                        return;
                    }
                    match counts.get_mut(topic) {
                        Some(n) => *n += 1,
                        None => {
                            counts.insert(topic.to_string(), 1);
                        }
                    }
                });
            }
            Ok(())
        })?;
        Ok(counts)
    }

    /// Refreshes the depth gauges.
    pub fn publish_gauges(&self) {
        let m = &self.metrics;
        m.queue_records.set(self.records() as i64);
        m.queue_bytes.set(self.bytes() as i64);
    }

    /// Refreshes the slower gauges (disk size, oldest age). Called from the journal.
    pub fn publish_slow_gauges(&self) {
        self.metrics
            .queue_oldest_age_seconds
            .set(self.oldest_age().map(|d| d.as_secs_f64()).unwrap_or(0.0));
        self.metrics
            .store_disk_bytes
            .set(self.bytes_on_disk() as i64);
    }

    /// Bytes sled uses on disk.
    pub fn bytes_on_disk(&self) -> u64 {
        self.with_trees(|t| Ok(t.db.size_on_disk()?)).unwrap_or(0)
    }

    /// Writes the mark file (positions for damage detection at the next open).
    pub fn save_mark(&self) {
        let (end, cursor) = {
            let st = self.lock();
            (st.durable_end, st.cursor_saved)
        };
        mark::Mark { end, cursor }.save(&self.dir);
    }

    /// `store.max_age`: records older than it are dropped (zero: never).
    pub fn max_age(&self) -> Duration {
        self.cfg.max_age
    }

    /// `store.live_window` (see [`journal`]).
    pub fn live_window(&self) -> u64 {
        self.cfg.live_window
    }

    /// The queue's metrics (the ingest and the bridge count their drops here).
    pub fn metrics(&self) -> &Arc<StoreMetrics> {
        &self.metrics
    }

    /// Unacknowledged records in the queue.
    pub fn records(&self) -> u64 {
        self.lock().records()
    }

    /// Bytes of the stored batches.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// The first sequence number not yet durable: readers see records below it.
    pub fn next_seq(&self) -> u64 {
        self.lock().durable_end
    }

    /// The first record not known to be acknowledged (where a replay starts).
    pub fn head(&self) -> Option<u64> {
        let st = self.lock();
        (st.cursor < st.durable_end).then_some(st.cursor)
    }

    /// Age of the oldest unacknowledged record (of its batch's newest record, at worst).
    pub fn oldest_age(&self) -> Option<Duration> {
        let cursor = self.head()?;
        let recs = self.read_from(cursor, 1).ok()?;
        let (_, r) = recs.first()?;
        Some(Duration::from_millis(now_ms().saturating_sub(r.ts_ms)))
    }

    /// Watch that changes after every commit (value: next durable sequence number).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.appended.subscribe()
    }
}

/// What the stored batches add up to.
struct Survey {
    /// Header of the first batch.
    first: Option<batch::Header>,
    /// End of the last batch.
    last_end: u64,
    /// Records in the batches.
    stored: u64,
    /// Bytes of values and keys.
    bytes: u64,
    /// Records at or above `cursor` not in `acked`.
    unacked: u64,
    /// Keys removed: a damaged header, or a batch at or past `keep_below` (never confirmed).
    dropped: Vec<sled::IVec>,
    /// Ranges `[from, to)` missing between two stored batches. Batches only ever leave from
    /// the head (acknowledged, evicted, expired) or past the durable end, so a hole in the
    /// middle is damage: sled lost a batch that had been durable.
    holes: Vec<(u64, u64)>,
}

impl Survey {
    /// Records missing between stored batches.
    fn missing(&self) -> u64 {
        self.holes.iter().map(|(a, b)| b - a).sum()
    }
}

/// Walks every batch (at open, and after a reopen), removing those that cannot be kept.
fn survey(
    t: &Trees,
    keep_below: u64,
    cursor: u64,
    acked: &BTreeSet<u64>,
) -> Result<Survey, StoreError> {
    let mut sv = Survey {
        first: None,
        last_end: 0,
        stored: 0,
        bytes: 0,
        unacked: 0,
        dropped: Vec::new(),
        holes: Vec::new(),
    };
    for kv in t.db.iter() {
        let (k, v) = kv?;
        match (key_seq(&k), batch::Header::read(&v)) {
            (Some(seq), Some(h)) if h.first == seq && h.first < keep_below => {
                if sv.first.is_some() && h.first > sv.last_end {
                    sv.holes.push((sv.last_end, h.first));
                }
                sv.first.get_or_insert(h);
                sv.last_end = h.end();
                sv.stored += h.count as u64;
                sv.bytes += KEY_BYTES + v.len() as u64;
                sv.unacked += (h.first.max(cursor)..h.end())
                    .filter(|s| !acked.contains(s))
                    .count() as u64;
            }
            _ => sv.dropped.push(k),
        }
    }
    for k in &sv.dropped {
        t.db.remove(k)?;
    }
    Ok(sv)
}

/// The batches that may hold records in `[from, to)`: the one holding `from` starts at or
/// before it.
fn batches(t: &Trees, from: u64, to: u64) -> Result<sled::Iter, StoreError> {
    let start =
        t.db.range(..=from.to_be_bytes())
            .next_back()
            .transpose()?
            .map_or(from, |(k, _)| key_seq(&k).unwrap_or(from));
    Ok(t.db.range(start.to_be_bytes()..to.to_be_bytes()))
}

/// Most record bytes in one sled value: a commit is stored as consecutive batch values of
/// about this size. sled 0.34's cache evicts a page only after its LRU shard (one of 256)
/// saw 64 accesses, so a few thousand large values are never evicted and a backlog stayed
/// in memory whatever `cache_bytes` said (165 MiB holding 1M records with a 32 MiB cache);
/// with small values the cache bound takes effect.
const VALUE_BYTES: u64 = 8 * 1024;

/// `records` cut into runs of at most `VALUE_BYTES` (8 KiB) (at least one record each).
fn value_chunks(records: &[Record]) -> Vec<&[Record]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, r) in records.iter().enumerate() {
        let c = r.cost();
        if i > start && bytes + c > VALUE_BYTES {
            out.push(&records[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += c;
    }
    out.push(&records[start..]);
    out
}

/// The last write-ahead lsn the store's last checkpoint covered (0: none).
fn wal_floor(t: &Trees) -> Result<u64, StoreError> {
    Ok(t.meta
        .get(WAL_LSN_KEY)?
        .and_then(|v| key_seq(&v))
        .unwrap_or(0))
}

fn key_seq(k: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(k.try_into().ok()?))
}

/// Why sled could not open a store.
#[derive(Debug)]
enum OpenError {
    NoSpace,
    /// Another process (or a store still shutting down in this one) holds sled's lock:
    /// the store is in use, not damaged.
    Locked,
    Other(String),
}

/// How long [`Store::open`] waits for sled's lock (a gateway restarting while the old
/// process still exits); shorter in unit tests, which open a store in use on purpose.
const LOCK_WAIT: Duration = Duration::from_secs(if cfg!(test) { 1 } else { 10 });

impl From<OpenError> for StoreError {
    fn from(e: OpenError) -> StoreError {
        match e {
            OpenError::NoSpace => StoreError::NoSpace,
            e @ OpenError::Locked => StoreError::Io(std::io::Error::other(e.to_string())),
            OpenError::Other(e) => StoreError::Io(std::io::Error::other(e)),
        }
    }
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::NoSpace => f.write_str("no space left on device"),
            OpenError::Locked => f.write_str(
                "the queue store is in use by another process (is a second fieldgate running \
                 with the same data_dir?)",
            ),
            OpenError::Other(s) => f.write_str(s),
        }
    }
}

/// [`open_trees`], trying again for up to `wait` while the store is locked.
fn open_trees_waiting(dir: &Path, cfg: &StoreConfig, wait: Duration) -> Result<Trees, OpenError> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        match open_trees(dir, cfg) {
            Err(OpenError::Locked) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

fn open_trees(dir: &Path, cfg: &StoreConfig) -> Result<Trees, OpenError> {
    let config = sled::Config::new()
        .path(dir)
        .cache_capacity(cfg.cache_bytes)
        // The journal does the flush + fsync; no second background flusher.
        .flush_every_ms(None)
        // 4 MiB segments keep values up to ~1 MiB inline in the log (not in blob files).
        .segment_size(4 * 1024 * 1024);
    // sled 0.34 can panic on some damaged images instead of returning an error (the release
    // profile unwinds so that this catches it).
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let db = config.open()?;
        let meta = db.open_tree("meta")?;
        let retained = db.open_tree("retained")?;
        let dead = db.open_tree("dead_letters")?;
        Ok::<_, sled::Error>(Trees {
            db,
            meta,
            retained,
            dead,
        })
    }));
    match opened {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(sled::Error::Io(e))) if is_enospc(&e) => Err(OpenError::NoSpace),
        // sled 0.34 reports a held lock as an `Other` error with this text.
        Ok(Err(sled::Error::Io(e))) if e.to_string().starts_with("could not acquire lock") => {
            Err(OpenError::Locked)
        }
        Ok(Err(e)) => Err(OpenError::Other(e.to_string())),
        Err(_) => Err(OpenError::Other("sled panicked while opening".into())),
    }
}

mod salvage {
    //! Reading intact batches out of a damaged store's files, whatever sled thinks of them.
    use std::path::Path;

    use super::batch;

    /// Every intact batch in the files under `dir` (sled's log and blob files).
    pub fn scan(dir: &Path) -> Vec<(batch::Header, batch::Decoded)> {
        let mut out = Vec::new();
        // The write-ahead file holds the same batch values as sled's log.
        let mut files = vec![dir.join("db"), dir.join(super::wal::FILE)];
        if let Ok(entries) = std::fs::read_dir(dir.join("blobs")) {
            files.extend(entries.flatten().map(|e| e.path()));
        }
        for f in files {
            if let Ok(bytes) = std::fs::read(&f) {
                out.extend(batch::salvage(&bytes));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;
