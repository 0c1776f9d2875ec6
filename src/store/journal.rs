//! The journal: where a message becomes durable.
//!
//! Publishers (device sessions in [`crate::frontend`], the gateway's own sources through
//! [`crate::ingest`]) hand entries to [`Journal::append`] and get a ticket; one thread takes
//! everything that arrived, writes it to the [`Store`] as one commit, fsyncs, and then
//! announces the highest durable ticket on a watch. A device's PUBACK waits for that watch
//! to pass its ticket.
//!
//! # Group commit
//! The thread blocks for the first entry, takes whatever else is already waiting (up to
//! [`MAX_BATCH`] entries or [`MAX_BATCH_BYTES`]), writes and fsyncs it, and starts over at
//! once: the next fsync starts as soon as the previous one finished and something waits.
//! There is no timer between an append and its fsync.
//!
//! # Invariants
//! - Tickets are handed out in channel order under one lock, so the thread sees them in
//!   ticket order and "durable up to ticket t" covers every entry with a smaller ticket.
//! - The channel is bounded twice: [`CAPACITY`] entries and [`MAX_PENDING_BYTES`] of
//!   payload. When it is full, [`Journal::append`] waits (a device session stops reading its
//!   socket: TCP back-pressure) and [`Journal::try_append`] refuses (QoS 0, sources).
//! - When the store cannot take a batch (disk full, I/O error, `reject_new` at `max_bytes`)
//!   the thread keeps the batch, marks the store refusing (metrics, `/health`, an ERROR log
//!   at most every [`LOG_EVERY`]), and tries again with a backoff; after a write error it
//!   reopens sled first. Nothing it took is dropped and nothing is announced durable until
//!   a commit covering it completed. It recovers by itself when the cause goes away.
//! - Live window: while the cloud link is up and more than `store.live_window` durable
//!   records wait to be sent live, the durable ticket is announced only once the bridge
//!   caught up below it, or after [`LIVE_HOLD`]: devices that publish faster than the cloud
//!   link drains are slowed by their own in-flight windows instead of growing the delay of
//!   everything behind them. The records are durable and visible to the bridge meanwhile;
//!   only the acknowledgements wait. It never applies without a cloud session (an outage),
//!   and a replayed backlog does not count (the live lane defers behind it, not waits).
//! - A test-only fault hook: with `FIELDGATE_FAULT_FILE=<path>` set, the file is read
//!   before every commit; `fsync_delay_ms=<n>` delays the commit, `fsync_fail` fails it as
//!   an I/O error, `enospc` as a full disk.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::metrics::StoreMetrics;
use super::{Extra, Record, Store, StoreError};
use crate::clock::now_ms;
use crate::watchdog::Heartbeat;

/// Entries the channel holds.
pub const CAPACITY: usize = 8192;
/// Payload bytes the channel holds (one larger entry is let in when it is empty).
pub const MAX_PENDING_BYTES: u64 = 8 * 1024 * 1024;
/// Most entries in one batch.
pub const MAX_BATCH: usize = 4096;
/// Most payload bytes in one batch.
pub const MAX_BATCH_BYTES: u64 = 1024 * 1024;
/// Refusal log interval.
pub const LOG_EVERY: Duration = Duration::from_secs(10);
/// Longest time the live window holds a durable ticket back.
pub const LIVE_HOLD: Duration = Duration::from_secs(1);
/// A commit or checkpoint that takes this long is counted and logged (at most every
/// [`LOG_EVERY`]): acknowledgements waited for the disk.
pub const SLOW_WRITE: Duration = Duration::from_millis(250);

/// One publish to make durable: queued for the cloud, kept as retained, or both.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Local topic.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// Published retained (the record carries the flag to the cloud).
    pub retain: bool,
    /// Keep it in the retained tree with this QoS (an empty payload deletes the kept one).
    pub keep: Option<u8>,
    /// Queue it for the cloud.
    pub queue: bool,
    /// Accept time; 0: when the journal takes it.
    pub ts_ms: u64,
    /// What an MQTT 5 publisher sent with it, for the cloud.
    pub extra: Extra,
}

impl Entry {
    fn size(&self) -> u64 {
        (self.topic.len() + self.payload.len() + self.extra.size() + 16) as u64
    }

    /// The record this entry queues, if it is queued (`ts_ms` when it has no time yet).
    fn record(&self, ts_ms: u64) -> Option<Record> {
        self.queue.then(|| Record {
            topic: self.topic.clone(),
            payload: self.payload.clone(),
            retain: self.retain,
            ts_ms: if self.ts_ms == 0 { ts_ms } else { self.ts_ms },
            extra: self.extra.clone(),
        })
    }
}

/// The journal thread is gone (the gateway is stopping).
#[derive(Debug, thiserror::Error)]
#[error("the queue journal has stopped")]
pub struct Closed;

/// The last ticket handed out, and the channel's sender (None once closed).
type Tickets = (u64, Option<flume::Sender<(u64, Entry)>>);

struct Shared {
    /// One lock for both: ticket order = channel order.
    tx: Mutex<Tickets>,
    pending_bytes: AtomicU64,
    space: Notify,
    durable: watch::Receiver<u64>,
    /// The store refuses writes now (disk full, I/O error): what is appended waits.
    refusing: std::sync::atomic::AtomicBool,
}

/// Handle for appending; cheap to clone.
#[derive(Clone)]
pub struct Journal {
    shared: Arc<Shared>,
}

impl Journal {
    /// Whether the store refuses writes now (disk full, I/O error): an entry appended now
    /// waits until it takes them again (an MQTT 5 publisher can be told so instead).
    pub fn refusing(&self) -> bool {
        self.shared.refusing.load(Ordering::Acquire)
    }

    /// Appends without waiting: the ticket, or the entry back when the channel is full.
    pub fn try_append(&self, e: Entry) -> Result<u64, Entry> {
        let size = e.size();
        let mut g = self.shared.tx.lock().unwrap_or_else(|p| p.into_inner());
        let pending = self.shared.pending_bytes.load(Ordering::Acquire);
        if pending > 0 && pending + size > MAX_PENDING_BYTES {
            return Err(e);
        }
        let ticket = g.0 + 1;
        let Some(tx) = g.1.as_ref() else {
            return Err(e);
        };
        match tx.try_send((ticket, e)) {
            Ok(()) => {
                g.0 = ticket;
                self.shared.pending_bytes.fetch_add(size, Ordering::AcqRel);
                Ok(ticket)
            }
            Err(flume::TrySendError::Full((_, e)) | flume::TrySendError::Disconnected((_, e))) => {
                Err(e)
            }
        }
    }

    /// Appends, waiting while the channel is full. `Err` once the journal stopped.
    pub async fn append(&self, mut e: Entry) -> Result<u64, Closed> {
        loop {
            let notified = self.shared.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.try_append(e) {
                Ok(t) => return Ok(t),
                Err(back) => e = back,
            }
            if self.is_closed() {
                return Err(Closed);
            }
            // The thread notifies after each take; the timeout covers a missed wake-up.
            let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
        }
    }

    fn is_closed(&self) -> bool {
        let g = self.shared.tx.lock().unwrap_or_else(|p| p.into_inner());
        g.1.as_ref().is_none_or(|t| t.is_disconnected())
    }

    /// Watch of the highest durable ticket.
    pub fn durable(&self) -> watch::Receiver<u64> {
        self.shared.durable.clone()
    }
}

/// Test fault injection (see the module header).
struct Faults {
    file: Option<PathBuf>,
}

impl Faults {
    fn from_env() -> Faults {
        Faults {
            file: std::env::var_os("FIELDGATE_FAULT_FILE").map(PathBuf::from),
        }
    }

    /// Applies the faults asked for now: sleeps, or returns the error to fail with.
    fn before_commit(&self) -> Result<(), StoreError> {
        let Some(f) = &self.file else { return Ok(()) };
        let Ok(text) = std::fs::read_to_string(f) else {
            return Ok(());
        };
        for line in text.lines().map(str::trim) {
            if let Some(ms) = line.strip_prefix("fsync_delay_ms=") {
                if let Ok(ms) = ms.parse::<u64>() {
                    std::thread::sleep(Duration::from_millis(ms));
                }
            } else if line == "fsync_fail" {
                return Err(StoreError::Io(std::io::Error::from_raw_os_error(5)));
            } else if line == "enospc" {
                return Err(StoreError::NoSpace);
            }
        }
        Ok(())
    }
}

/// Starts the journal thread over `store`. It stops when `stop` is cancelled, after writing
/// and committing whatever is still in the channel.
pub fn spawn(
    store: Arc<Store>,
    metrics: Arc<StoreMetrics>,
    stop: CancellationToken,
    heartbeat: Heartbeat,
) -> std::io::Result<(Journal, std::thread::JoinHandle<()>)> {
    let (tx, rx) = flume::bounded(CAPACITY);
    let (durable_tx, durable) = watch::channel(0u64);
    let shared = Arc::new(Shared {
        tx: Mutex::new((0, Some(tx))),
        pending_bytes: AtomicU64::new(0),
        space: Notify::new(),
        durable,
        refusing: std::sync::atomic::AtomicBool::new(false),
    });
    let journal = Journal {
        shared: shared.clone(),
    };
    let handle = std::thread::Builder::new()
        .name("fieldgate-journal".into())
        .spawn(move || {
            let span = tracing::info_span!("store");
            let _g = span.enter();
            let live_window = store.live_window();
            let mut w = Writer {
                live_window,
                held: None,
                store,
                metrics,
                shared,
                durable: durable_tx,
                faults: Faults::from_env(),
                refusing: None,
                last_slow: Instant::now(),
                last_log: None,
                last_slow_log: std::cell::Cell::new(None),
            };
            w.run(rx, &stop, &heartbeat);
        })?;
    Ok((journal, handle))
}

struct Writer {
    /// `store.live_window` (0: off).
    live_window: u64,
    /// A durable ticket not announced yet (the live window), and since when it is held.
    held: Option<(u64, Instant)>,
    store: Arc<Store>,
    metrics: Arc<StoreMetrics>,
    shared: Arc<Shared>,
    durable: watch::Sender<u64>,
    faults: Faults,
    /// Cause of the current refusal.
    refusing: Option<&'static str>,
    last_slow: Instant,
    last_log: Option<Instant>,
    /// When a slow write was last logged.
    last_slow_log: std::cell::Cell<Option<Instant>>,
}

impl Writer {
    fn run(
        &mut self,
        rx: flume::Receiver<(u64, Entry)>,
        stop: &CancellationToken,
        beat: &Heartbeat,
    ) {
        let mut batch: Vec<(u64, Entry)> = Vec::with_capacity(MAX_BATCH);
        loop {
            beat.beat();
            let stopping = stop.is_cancelled();
            // The sender lives in `shared`, so the channel never disconnects: only time out.
            // A held ticket is looked at again every millisecond.
            let wait = if self.held.is_some() { 1 } else { 50 };
            if let Ok(e) = rx.recv_timeout(Duration::from_millis(wait)) {
                batch.push(e);
            }
            let mut bytes = batch.first().map_or(0, |(_, e)| e.size());
            while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(e) => {
                        bytes += e.1.size();
                        batch.push(e);
                    }
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                self.shared.pending_bytes.fetch_sub(bytes, Ordering::AcqRel);
                self.shared.space.notify_waiters();
                if !self.write(&batch, stop) {
                    let held = batch.len();
                    error!(
                        held,
                        "stopping while the queue refuses writes: these messages were never \
                         acknowledged to their publishers and are not queued"
                    );
                }
                batch.clear();
            }
            self.announce(None, stopping);
            self.maintain();
            if stopping && rx.is_empty() {
                // Close the channel so late appenders get an error, not a silent wait.
                self.shared
                    .tx
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .1
                    .take();
                let _ = self.commit().and_then(|()| self.store.checkpoint());
                self.store.save_mark();
                info!(queued = self.store.records(), "queue committed");
                return;
            }
        }
    }

    /// Writes and commits one batch, retrying until it is durable. Returns false when the
    /// gateway stops before that.
    fn write(&mut self, batch: &[(u64, Entry)], stop: &CancellationToken) -> bool {
        let last_ticket = batch.last().map_or(0, |(t, _)| *t);
        let ts = now_ms();
        let records: Vec<Record> = batch.iter().filter_map(|(_, e)| e.record(ts)).collect();
        let mut backoff = Duration::from_millis(20);
        loop {
            let res = (|| {
                for (_, e) in batch {
                    if let Some(qos) = e.keep {
                        self.store.retain(&e.topic, qos, &e.payload)?;
                    }
                }
                self.store.append(&records)?;
                self.commit()
            })();
            match res {
                Ok(()) => {
                    self.metrics.messages_in.inc_by(records.len() as u64);
                    self.announce(Some(last_ticket), false);
                    self.recovered();
                    return true;
                }
                Err(e) => {
                    self.refuse(&e, batch.len() as u64);
                    if stop.is_cancelled() {
                        return false;
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    match e {
                        StoreError::Full => {
                            // Room comes from the bridge's acknowledgements.
                            if let Err(e) =
                                self.store.compact().and_then(|_| self.store.checkpoint())
                            {
                                warn!(error = %e, "compacting the queue failed");
                            }
                        }
                        _ => {
                            if let Err(e) = self.store.reopen() {
                                self.refuse(&e, 0);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Announces the durable ticket (`ticket`, or the one held), unless the live window
    /// holds it back (see the module header); `force` announces whatever is held.
    fn announce(&mut self, ticket: Option<u64>, force: bool) {
        if let Some(t) = ticket {
            let since = self.held.map_or_else(Instant::now, |(_, since)| since);
            self.held = Some((t, since));
        }
        let Some((t, since)) = self.held else { return };
        let over = self.live_window > 0
            && self
                .store
                .live_lag()
                .is_some_and(|lag| lag > self.live_window);
        if force || !over || since.elapsed() >= LIVE_HOLD {
            self.durable.send_replace(t);
            self.held = None;
        }
    }

    fn commit(&self) -> Result<(), StoreError> {
        self.timed("commit", || {
            self.faults.before_commit().inspect_err(|_| {
                self.metrics.store_commit_errors.inc();
            })?;
            self.store.commit()
        })
    }

    /// Runs one disk write of the journal, counting and logging it when it is slow.
    fn timed(
        &self,
        what: &'static str,
        f: impl FnOnce() -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let t0 = Instant::now();
        let res = f();
        let took = t0.elapsed();
        if took >= SLOW_WRITE {
            self.metrics.store_slow_writes.inc();
            let last = self.last_slow_log.get();
            if last.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
                self.last_slow_log.set(Some(Instant::now()));
                warn!(
                    what,
                    took_ms = took.as_millis() as u64,
                    "the queue's disk is slow: acknowledgements waited for this write"
                );
            }
        }
        res
    }

    /// Removes acknowledged batches; about once a second expires old ones, checkpoints
    /// (sled flushed with the cursor and removals, the write-ahead file started over),
    /// refreshes the slow gauges and writes the mark; checkpoints sooner when half the
    /// write-ahead file is used. Acknowledgements never need their own fsync: a cursor lost
    /// to a crash only means records sent again.
    fn maintain(&mut self) {
        if let Err(e) = self.store.compact() {
            warn!(error = %e, "compacting the queue failed");
        }
        let slow = self.last_slow.elapsed() >= Duration::from_secs(1);
        if slow {
            if let Err(e) = self.store.expire() {
                warn!(error = %e, "expiring old records failed");
            }
        }
        if (slow && self.store.has_unsaved()) || self.store.wal_used() >= super::wal::PREALLOC / 2 {
            if let Err(e) = self.timed("checkpoint", || self.store.checkpoint()) {
                warn!(error = %e, "queue checkpoint failed; retried later");
            }
        }
        if slow {
            self.last_slow = Instant::now();
            self.store.publish_slow_gauges();
            if self.refusing.is_none() {
                self.store.save_mark();
            }
        }
    }

    /// Counts a refusal of the batch of `entries` (0: a failed reopen) and logs it at most
    /// every [`LOG_EVERY`].
    fn refuse(&mut self, e: &StoreError, entries: u64) {
        // While sled is being reopened the cause is still the one that made it necessary.
        let cause = match (e, self.refusing) {
            (StoreError::Reopening, Some(c)) => c,
            _ => e.cause(),
        };
        self.metrics.store_refusals(cause).inc();
        if self.refusing != Some(cause) {
            if let Some(old) = self.refusing {
                self.metrics.set_store_refusing(old, false);
            }
            self.metrics.set_store_refusing(cause, true);
            self.refusing = Some(cause);
            self.shared.refusing.store(true, Ordering::Release);
            self.last_log = None;
        }
        if self.last_log.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            error!(
                cause,
                error = %e,
                held = entries,
                "the queue cannot take messages: publishers get no acknowledgement until it \
                 can (nothing acknowledged is lost); retrying"
            );
            self.last_log = Some(Instant::now());
        }
    }

    fn recovered(&mut self) {
        if let Some(cause) = self.refusing.take() {
            self.shared.refusing.store(false, Ordering::Release);
            self.metrics.set_store_refusing(cause, false);
            info!(cause, "the queue takes messages again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::config::StoreConfig;

    fn entry(i: u32) -> Entry {
        Entry {
            topic: format!("dev/{}/t", i % 3),
            payload: Bytes::from(format!("{i}")),
            retain: false,
            keep: None,
            queue: true,
            ts_ms: 0,
            extra: Default::default(),
        }
    }

    async fn until(mut f: impl FnMut() -> bool) -> bool {
        for _ in 0..2000 {
            if f() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        false
    }

    /// The live window never loses an acknowledgement: held while the bridge is behind, it
    /// is announced once the live lane catches up, and without a cloud session at once.
    #[tokio::test]
    async fn live_window_announces_once_the_live_lane_catches_up() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StoreConfig {
            live_window: 10,
            ..StoreConfig::default()
        };
        let m = StoreMetrics::new();
        let store = Arc::new(Store::open(&dir.path().join("q"), &cfg, m.clone()).unwrap());
        // A cloud session whose live lane has sent nothing yet.
        store.set_live(Some(1));
        let stop = CancellationToken::new();
        let (j, thread) = spawn(store.clone(), m, stop.clone(), Heartbeat::new("test")).unwrap();
        let mut last = 0;
        for i in 0..50 {
            last = j.append(entry(i)).await.unwrap();
        }
        // Durable, and visible to the bridge, whatever the window does with the tickets.
        assert!(until(|| store.next_seq() == 51).await);
        assert_eq!(store.live_lag(), Some(50));
        // The live lane catches up: every ticket is announced.
        store.set_live(Some(51));
        let durable = j.durable();
        assert!(until(|| *durable.borrow() == last).await);
        // No cloud session: no window at all.
        store.set_live(None);
        assert_eq!(store.live_lag(), None);
        for i in 50..60 {
            last = j.append(entry(i)).await.unwrap();
        }
        assert!(until(|| *durable.borrow() == last).await);
        stop.cancel();
        thread.join().unwrap();
    }
}
