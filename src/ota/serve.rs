//! Serving verified images to devices, bounded: MQTT chunks and HTTP `Range` downloads.
//!
//! Owns the serving limits shared by both paths:
//! - [`Slots`]: at most `ota.max_concurrent_downloads` devices download at once. An MQTT
//!   device holds a slot from its first `chunk/get` until it verifies, reports `done`/`failed`,
//!   or stays silent for [`DOWNLOAD_IDLE`]; an HTTP request holds one while it streams, and
//!   one source address holds at most `ota.max_downloads_per_ip` of them ([`HttpSlot`]), so a
//!   client that opens downloads and never reads cannot take them all (its transfers are cut
//!   after `ota.stall_timeout` without progress, and the slot is free when the transfer
//!   ends). A device that finds no free slot is answered `busy` (MQTT error reply, or HTTP
//!   503) and retries.
//! - [`Pacer`]: one token bucket of `ota.max_bytes_per_sec` over everything served.
//!
//! The MQTT path is one task owning its own broker link: the manager queues [`ChunkJob`]s on
//! a bounded channel ([`JOB_QUEUE`]; when it is full the manager answers `busy` instead of
//! waiting), the task paces, reads the chunk from the verified file (`pread` off the runtime)
//! and publishes it raw on `<prefix>/<device>/chunk/<index>`.
//!
//! Both paths tell the manager the bytes they served to a device ([`Served`], through a
//! [`ServedTally`]) so it can report them per device; the HTTP path knows the device from the
//! `?device=<id>` of the metadata `url`. The channel is bounded ([`SERVED_QUEUE`]); when it is
//! full the tally keeps the bytes and sends them with the next ones, and a transfer's last
//! bytes wait at most [`SERVED_FINAL_WAIT`] before they are left out of the per-device report
//! (the `fieldgate_ota_served_bytes_total` metric counts them regardless). Serving never waits
//! on the manager otherwise.
//!
//! Invariant: both paths only ever read a [`ReadyImage`], which exists only for a file this
//! process verified (see [`super::cache`]).

use std::collections::HashMap;
use std::fs::File;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Mutex, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::bridge::pacing::TokenBucket;
use crate::metrics::Metrics;
use crate::sources::LocalTx;

/// Chunk jobs queued for the MQTT serving task.
pub const JOB_QUEUE: usize = 4096;
/// An MQTT download with no request for this long gives its slot back.
pub const DOWNLOAD_IDLE: Duration = Duration::from_secs(60);
/// [`Served`] messages queued for the manager.
pub const SERVED_QUEUE: usize = 1024;
/// How long the end of a transfer waits to hand its last served bytes to the manager.
pub const SERVED_FINAL_WAIT: Duration = Duration::from_secs(1);

/// How image bytes reached a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Via {
    /// MQTT chunks.
    Mqtt,
    /// HTTP (`Range`) transfers.
    Http,
}

/// Bytes of image `sha256` served to `device`; the manager checks the device is assigned that
/// image before it counts them (the HTTP device id comes from the client).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    /// Device id.
    pub device: String,
    /// Image served.
    pub sha256: String,
    /// Path.
    pub via: Via,
    /// Bytes.
    pub bytes: u64,
}

/// Collects served bytes and hands them to the manager without waiting on it (see the module
/// header for the policy when the channel is full).
pub struct ServedTally {
    tx: mpsc::Sender<Served>,
    pending: HashMap<(String, String, Via), u64>,
}

impl ServedTally {
    /// A tally sending on `tx`.
    pub fn new(tx: mpsc::Sender<Served>) -> ServedTally {
        ServedTally {
            tx,
            pending: HashMap::new(),
        }
    }

    /// Counts `bytes` of `sha256` served to `device` and sends what it can.
    pub fn add(&mut self, device: &str, sha256: &str, via: Via, bytes: u64) {
        *self
            .pending
            .entry((device.to_string(), sha256.to_string(), via))
            .or_default() += bytes;
        let tx = &self.tx;
        self.pending.retain(|(device, sha256, via), bytes| {
            let s = Served {
                device: device.clone(),
                sha256: sha256.clone(),
                via: *via,
                bytes: *bytes,
            };
            matches!(tx.try_send(s), Err(mpsc::error::TrySendError::Full(_)))
        });
    }

    /// Sends what is left, waiting at most [`SERVED_FINAL_WAIT`] in all.
    pub async fn finish(self) {
        let deadline = tokio::time::Instant::now() + SERVED_FINAL_WAIT;
        for ((device, sha256, via), bytes) in self.pending {
            let s = Served {
                device,
                sha256,
                via,
                bytes,
            };
            if tokio::time::timeout_at(deadline, self.tx.send(s))
                .await
                .is_err()
            {
                debug!("served bytes left out of the per-device report: the manager is busy");
                return;
            }
        }
    }
}

/// A verified image on disk, open for reading.
#[derive(Debug)]
pub struct ReadyImage {
    /// sha256 hex.
    pub sha256: String,
    /// Name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Size in bytes.
    pub size: u64,
    /// The `.bin` file.
    pub path: PathBuf,
    /// Open handle (pread; survives the file being evicted while a transfer runs).
    pub file: File,
}

/// What the HTTP server can serve: verified images by sha256 and by name/version.
#[derive(Debug, Default, Clone)]
pub struct Catalog {
    /// By sha256.
    pub by_sha: HashMap<String, Arc<ReadyImage>>,
    /// `name/version` -> sha256.
    pub by_name: HashMap<String, String>,
}

impl Catalog {
    /// Looks up `<sha256>` or `<name>/<version>`.
    pub fn find(&self, what: &str) -> Option<Arc<ReadyImage>> {
        if let Some(i) = self.by_sha.get(what) {
            return Some(i.clone());
        }
        self.by_name
            .get(what)
            .and_then(|s| self.by_sha.get(s))
            .cloned()
    }
}

/// The shared bytes/s limit.
#[derive(Clone)]
pub struct Pacer {
    bucket: Option<Arc<Mutex<TokenBucket>>>,
}

impl Pacer {
    /// `rate` bytes per second; 0: unlimited.
    pub fn new(rate: u64) -> Pacer {
        Pacer {
            bucket: (rate > 0)
                .then(|| Arc::new(Mutex::new(TokenBucket::new(rate, Instant::now())))),
        }
    }

    /// Waits until `n` bytes may be sent, and takes them.
    pub async fn take(&self, n: u64) {
        let Some(b) = &self.bucket else { return };
        loop {
            let wait = {
                let mut b = b.lock().await;
                let w = b.wait_for(n, Instant::now());
                if w.is_zero() {
                    b.take(n);
                }
                w
            };
            if wait.is_zero() {
                return;
            }
            tokio::time::sleep(wait).await;
        }
    }
}

/// The download slots.
#[derive(Clone)]
pub struct Slots {
    sem: Arc<Semaphore>,
    max: usize,
    /// HTTP slots held per source address (entries only while held: at most `max`).
    per_ip: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
    max_per_ip: usize,
}

/// Why no HTTP slot was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// Every slot is taken.
    All,
    /// This address holds `ota.max_downloads_per_ip` already.
    Address,
}

/// An HTTP transfer's slot; dropping it frees the slot and the address's share.
pub struct HttpSlot {
    _permit: OwnedSemaphorePermit,
    ip: IpAddr,
    per_ip: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for HttpSlot {
    fn drop(&mut self) {
        let mut m = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

impl Slots {
    /// `max` concurrent downloads, of which `max_per_ip` over HTTP from one address.
    pub fn new(max: usize, max_per_ip: usize) -> Slots {
        Slots {
            sem: Arc::new(Semaphore::new(max)),
            max,
            per_ip: Arc::default(),
            max_per_ip,
        }
    }

    /// A slot for an HTTP transfer to `ip`, if one is free and `ip` holds fewer than its
    /// share.
    pub fn try_take_for(&self, ip: IpAddr) -> Result<HttpSlot, Busy> {
        let mut m = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if m.get(&ip).copied().unwrap_or(0) >= self.max_per_ip {
            return Err(Busy::Address);
        }
        let permit = self.try_take().ok_or(Busy::All)?;
        *m.entry(ip).or_default() += 1;
        Ok(HttpSlot {
            _permit: permit,
            ip,
            per_ip: self.per_ip.clone(),
        })
    }

    /// A slot if one is free.
    pub fn try_take(&self) -> Option<OwnedSemaphorePermit> {
        self.sem.clone().try_acquire_owned().ok()
    }

    /// Slots in use.
    pub fn in_use(&self) -> usize {
        self.max - self.sem.available_permits()
    }
}

/// One chunk to publish.
#[derive(Debug)]
pub struct ChunkJob {
    /// The device asking.
    pub device: String,
    /// `<prefix>/<device>/chunk/<index>`.
    pub topic: String,
    /// The image.
    pub image: Arc<ReadyImage>,
    /// Byte offset.
    pub offset: u64,
    /// Length.
    pub len: usize,
    /// When the manager took the request (latency histogram).
    pub queued: Instant,
}

/// The MQTT serving task: runs until `jobs` closes or `stop` is cancelled.
pub async fn run_mqtt(
    mut tx: LocalTx,
    mut jobs: mpsc::Receiver<ChunkJob>,
    pacer: Pacer,
    metrics: Arc<Metrics>,
    mut served: ServedTally,
    stop: CancellationToken,
) {
    loop {
        let job = tokio::select! {
            _ = stop.cancelled() => return,
            j = jobs.recv() => match j { Some(j) => j, None => return },
        };
        pacer.take(job.len as u64).await;
        let img = job.image.clone();
        let (off, len) = (job.offset, job.len);
        let data = match tokio::task::spawn_blocking(move || {
            super::cache::read_at(&img.file, off, len)
        })
        .await
        {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                warn!(image = %job.image.sha256, error = %e, "cannot read a cached image chunk");
                metrics.ota.error("read");
                continue;
            }
            Err(_) => return,
        };
        if tx.publish(&job.topic, data, false).await.is_err() {
            debug!("broker gone; chunk serving stops");
            return;
        }
        metrics.ota.served("mqtt", len as u64);
        served.add(&job.device, &job.image.sha256, Via::Mqtt, len as u64);
        metrics
            .ota
            .chunk_latency
            .observe(job.queued.elapsed().as_secs_f64());
    }
}

/// A byte range of an image, inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// Last byte (inclusive).
    pub end: u64,
}

/// A `Range` header that cannot be served: answered 416.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("range not satisfiable")]
pub struct Unsatisfiable;

/// Parses a `Range` header value against an image of `size` bytes. `Ok(None)`: serve the
/// whole image (no header, or several ranges, which this server does not combine).
pub fn parse_range(value: Option<&str>, size: u64) -> Result<Option<ByteRange>, Unsatisfiable> {
    let Some(v) = value else { return Ok(None) };
    let spec = v.trim().strip_prefix("bytes=").ok_or(Unsatisfiable)?;
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(Unsatisfiable)?;
    let (a, b) = (a.trim(), b.trim());
    let r = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| Unsatisfiable)?;
        if n == 0 || size == 0 {
            return Err(Unsatisfiable);
        }
        ByteRange {
            start: size.saturating_sub(n),
            end: size - 1,
        }
    } else {
        let start: u64 = a.parse().map_err(|_| Unsatisfiable)?;
        let end = if b.is_empty() {
            size.saturating_sub(1)
        } else {
            b.parse::<u64>()
                .map_err(|_| Unsatisfiable)?
                .min(size.saturating_sub(1))
        };
        if start >= size || start > end {
            return Err(Unsatisfiable);
        }
        ByteRange { start, end }
    };
    Ok(Some(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), Ok(None));
        assert_eq!(
            parse_range(Some("bytes=0-3"), 10),
            Ok(Some(ByteRange { start: 0, end: 3 }))
        );
        assert_eq!(
            parse_range(Some("bytes=4-"), 10),
            Ok(Some(ByteRange { start: 4, end: 9 }))
        );
        assert_eq!(
            parse_range(Some("bytes=-3"), 10),
            Ok(Some(ByteRange { start: 7, end: 9 }))
        );
        assert_eq!(
            parse_range(Some("bytes=5-100"), 10),
            Ok(Some(ByteRange { start: 5, end: 9 }))
        );
        assert_eq!(parse_range(Some("bytes=0-1,3-4"), 10), Ok(None));
        assert_eq!(parse_range(Some("bytes=10-"), 10), Err(Unsatisfiable));
        assert_eq!(parse_range(Some("bytes=5-2"), 10), Err(Unsatisfiable));
        assert_eq!(parse_range(Some("items=0-1"), 10), Err(Unsatisfiable));
        assert_eq!(parse_range(Some("bytes=x-1"), 10), Err(Unsatisfiable));
    }

    #[test]
    fn http_slots_are_shared_out_per_address() {
        let s = Slots::new(3, 2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a1 = s.try_take_for(a).unwrap();
        let _a2 = s.try_take_for(a).unwrap();
        assert_eq!(s.try_take_for(a).err(), Some(Busy::Address));
        let _b1 = s.try_take_for(b).unwrap();
        assert_eq!(s.try_take_for(b).err(), Some(Busy::All));
        drop(a1);
        assert_eq!(s.in_use(), 2);
        let _a3 = s.try_take_for(a).unwrap();
        assert_eq!(s.try_take_for(a).err(), Some(Busy::Address));
    }

    #[test]
    fn served_bytes_wait_in_the_tally_while_the_manager_is_behind() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut t = ServedTally::new(tx);
        t.add("d1", "aa", Via::Http, 10);
        t.add("d1", "aa", Via::Http, 5);
        t.add("d1", "aa", Via::Http, 7);
        assert_eq!(rx.try_recv().map(|s| s.bytes), Ok(10));
        t.add("d1", "aa", Via::Http, 1);
        assert_eq!(rx.try_recv().map(|s| s.bytes), Ok(13));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn slots_are_bounded() {
        let s = Slots::new(2, 2);
        let a = s.try_take().unwrap();
        let _b = s.try_take().unwrap();
        assert!(s.try_take().is_none());
        assert_eq!(s.in_use(), 2);
        drop(a);
        assert!(s.try_take().is_some());
    }
}
