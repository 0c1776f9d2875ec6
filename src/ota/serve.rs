//! Serving verified images to devices, bounded: MQTT chunks and HTTP `Range` downloads.
//!
//! Owns the serving limits shared by both paths:
//! - [`Slots`]: at most `ota.max_concurrent_downloads` downloads at once, leased **per
//!   device**, not per request. A device takes a slot with its first `chunk/get` or its first
//!   HTTP request carrying `?device=<id>` (the metadata `url` has it), and keeps it across
//!   all its chunk and `Range` requests, by either path, until it verifies, reports
//!   `done`/`failed`, is assigned another rollout, or makes no request for [`DOWNLOAD_IDLE`]
//!   with no HTTP transfer in flight (so a device that vanishes frees its slot after that).
//!   A device that holds a slot is never answered `busy` for want of one.
//! - The queue: a device that finds no free slot is put in line (first ask, first served)
//!   and told `retry_after`, seconds until a slot is likely free: the remaining bytes of the
//!   active downloads (image size less the bytes served under each lease) at an equal share
//!   of the serving rate measured over the last 2 s or so; with no rate known,
//!   [`RETRY_AFTER_UNKNOWN`] while downloads are starting, else the first idle lease's
//!   expiry; always within [`RETRY_AFTER_MIN`]..=[`RETRY_AFTER_MAX`]. A freed slot is kept for the devices ahead in line: a device gets one
//!   only if fewer devices wait before it than slots are free. A waiting device that does not
//!   ask again within `2 * retry_after +` [`QUEUE_GRACE`] loses its place. The queue holds at
//!   most [`MAX_WAITING`] devices, and at most `ota.max_downloads_per_ip` asking over HTTP
//!   from one address (so made-up `?device=` ids cannot push the real devices back); past
//!   that the answer is the same `busy` with `retry_after`, without a place.
//! - Requests without a device id (HTTP without `?device=`) are served as before, per
//!   request: each transfer holds a slot of its own while it streams, and only a slot that no
//!   waiting device is owed; they are not queued (503 with `retry_after`).
//! - The per-address share: one source address holds at most `ota.max_downloads_per_ip`
//!   slots over HTTP (device leases it used and anonymous transfers), and one device at most
//!   that many transfers at once, so a client that opens downloads and never reads, under
//!   any number of device ids, cannot take them all; its transfers are cut after
//!   `ota.stall_timeout` without progress (an anonymous slot is free at once, a lease after
//!   its idle bound). A per-address refusal is not queued.
//! - [`Pacer`]: one token bucket of `ota.max_bytes_per_sec` over everything served.
//!
//! The slot table is one small map behind a `std` mutex, shared by the manager (MQTT) and
//! every HTTP transfer: it is the admission decision itself, taken and released in a few
//! map operations, never held across an `.await`, so no task ever waits on another for it.
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

use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::local::LocalTx;
use crate::ota::metrics::OtaMetrics;
use crate::pacing::TokenBucket;

/// Chunk jobs queued for the MQTT serving task.
pub const JOB_QUEUE: usize = 4096;
/// A device's slot with no request (and no HTTP transfer in flight) for this long is free.
pub const DOWNLOAD_IDLE: Duration = Duration::from_secs(60);
/// Bounds of the `retry_after` estimate, seconds.
pub const RETRY_AFTER_MIN: u64 = 1;
/// See [`RETRY_AFTER_MIN`].
pub const RETRY_AFTER_MAX: u64 = 30;
/// `retry_after` while downloads are active but no serving rate is known yet (they just
/// started, after a pause).
pub const RETRY_AFTER_UNKNOWN: u64 = 2;
/// A waiting device that does not ask again within twice its `retry_after` plus this loses
/// its place in the queue.
pub const QUEUE_GRACE: Duration = Duration::from_secs(5);
/// At most this many devices wait in line (each address at most `ota.max_downloads_per_ip`).
pub const MAX_WAITING: usize = 1024;
/// The serving rate behind the estimate is measured over windows of about this length.
const RATE_WINDOW: Duration = Duration::from_secs(2);
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

/// The download slots, leased per device (see the module header).
#[derive(Clone)]
pub struct Slots {
    table: Arc<std::sync::Mutex<Table>>,
    max: usize,
    max_per_ip: usize,
}

/// Why no slot was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// Every slot is taken (or kept for the devices waiting before this one).
    All,
    /// This address holds `ota.max_downloads_per_ip` already (or this device that many
    /// transfers at once).
    Address,
}

/// The answer to a device that gets no slot now: come back in `retry_after` seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    /// Why.
    pub why: Busy,
    /// Seconds, [`RETRY_AFTER_MIN`]..=[`RETRY_AFTER_MAX`]: an estimate of when a slot frees.
    pub retry_after: u64,
    /// 1-based place in the queue of waiting devices (`None`: not queued, i.e. a per-address
    /// refusal or a request without a device id).
    pub position: Option<usize>,
}

/// One device's slot.
#[derive(Debug)]
struct Lease {
    /// Last request begun or HTTP transfer ended.
    last: Instant,
    /// HTTP transfers in flight (a lease with one is never idle).
    streams: usize,
    /// Image size, and bytes served under this lease: what is left feeds the estimate.
    size: u64,
    served: u64,
    /// The address it was last used from over HTTP (counts in that address's share).
    ip: Option<IpAddr>,
}

#[derive(Debug)]
struct Waiter {
    device: String,
    /// The address it asked from over HTTP (its share of the queue).
    ip: Option<IpAddr>,
    /// Not asked again by then: the place is given up.
    forget_at: Instant,
}

/// The serving rate over the last [`RATE_WINDOW`] or so.
#[derive(Debug, Default)]
struct Rate {
    start: Option<Instant>,
    bytes: u64,
    last: f64,
}

impl Rate {
    fn add(&mut self, n: u64, now: Instant) {
        let start = *self.start.get_or_insert(now);
        let el = now.saturating_duration_since(start);
        if el >= RATE_WINDOW {
            // After a pause (nothing served for two windows) the old rate says nothing about
            // the transfers starting now: unknown until this window has some bytes.
            self.last = if el >= 2 * RATE_WINDOW {
                0.0
            } else {
                self.bytes as f64 / el.as_secs_f64()
            };
            self.start = Some(now);
            self.bytes = 0;
        }
        self.bytes += n;
    }

    /// Bytes per second: the last whole window's, or the running one's once it is longer
    /// (so the rate falls when serving stops).
    fn per_sec(&self, now: Instant) -> f64 {
        let Some(start) = self.start else { return 0.0 };
        let el = now.saturating_duration_since(start);
        if el < RATE_WINDOW && self.last > 0.0 {
            self.last
        } else {
            self.bytes as f64 / el.as_secs_f64().max(0.1)
        }
    }
}

#[derive(Debug, Default)]
struct Table {
    leases: HashMap<String, Lease>,
    /// Transfers without a device id, per address (entries only while held).
    anon: HashMap<IpAddr, usize>,
    anon_total: usize,
    /// Devices waiting, in the order they first asked.
    queue: std::collections::VecDeque<Waiter>,
    rate: Rate,
}

impl Table {
    fn expire(&mut self, now: Instant) {
        self.leases
            .retain(|_, l| l.streams > 0 || now.saturating_duration_since(l.last) < DOWNLOAD_IDLE);
        self.queue.retain(|w| w.forget_at > now);
    }

    fn in_use(&self) -> usize {
        self.leases.len() + self.anon_total
    }

    /// Slots held by `ip`: device leases it used over HTTP and its anonymous transfers.
    fn held_by(&self, ip: IpAddr) -> usize {
        self.leases.values().filter(|l| l.ip == Some(ip)).count()
            + self.anon.get(&ip).copied().unwrap_or(0)
    }

    /// Seconds until `k` more slots are likely free (of the leases of `ip` only, if given):
    /// every transfer is taken to get an equal share of the recent serving rate, and a lease
    /// to end when its image's remaining bytes are served. With nothing being served, the
    /// first idle lease's expiry. Bounded to [`RETRY_AFTER_MIN`]..=[`RETRY_AFTER_MAX`].
    fn estimate(&self, k: usize, ip: Option<IpAddr>, now: Instant) -> u64 {
        let leases: Vec<&Lease> = self
            .leases
            .values()
            .filter(|l| ip.is_none() || l.ip == ip)
            .collect();
        let rate = self.rate.per_sec(now);
        let secs = if rate > 0.0 && !leases.is_empty() {
            let mut left: Vec<u64> = leases
                .iter()
                .map(|l| l.size.saturating_sub(l.served))
                .collect();
            left.sort_unstable();
            let sharing = self.in_use().max(1);
            let (mut t, mut prev) = (0.0, 0u64);
            for (i, r) in left.iter().enumerate().take(k.max(1)) {
                t += (r - prev) as f64 * sharing.saturating_sub(i).max(1) as f64 / rate;
                prev = *r;
            }
            t.ceil() as u64
        } else if leases
            .iter()
            .any(|l| l.streams > 0 || now.saturating_duration_since(l.last) < RATE_WINDOW)
        {
            // Downloads are starting but no rate is known yet: ask again soon.
            RETRY_AFTER_UNKNOWN
        } else {
            leases
                .iter()
                .filter(|l| l.streams == 0)
                .map(|l| DOWNLOAD_IDLE.saturating_sub(now.saturating_duration_since(l.last)))
                .min()
                .map_or(RETRY_AFTER_MIN, |d| d.as_secs_f64().ceil() as u64)
        };
        secs.clamp(RETRY_AFTER_MIN, RETRY_AFTER_MAX)
    }

    /// The slot of `dev` (kept, or taken if one is free for it); `stream`: an HTTP transfer
    /// begins under it.
    fn take(&mut self, req: Take<'_>, lim: (usize, usize), now: Instant) -> Result<(), Wait> {
        let (max, max_per_ip) = lim;
        self.expire(now);
        if let Some(l) = self.leases.get_mut(req.device) {
            if req.stream {
                if l.streams >= max_per_ip {
                    return Err(Wait {
                        why: Busy::Address,
                        retry_after: RETRY_AFTER_MIN,
                        position: None,
                    });
                }
                l.streams += 1;
            }
            l.last = now;
            if req.ip.is_some() {
                l.ip = req.ip;
            }
            return Ok(());
        }
        if let Some(ip) = req.ip {
            if self.held_by(ip) >= max_per_ip {
                return Err(Wait {
                    why: Busy::Address,
                    retry_after: self.estimate(1, Some(ip), now),
                    position: None,
                });
            }
        }
        let ahead = self
            .queue
            .iter()
            .position(|w| w.device == req.device)
            .unwrap_or(self.queue.len());
        let free = max.saturating_sub(self.in_use());
        if ahead < free {
            self.queue.retain(|w| w.device != req.device);
            self.leases.insert(
                req.device.to_string(),
                Lease {
                    last: now,
                    streams: usize::from(req.stream),
                    size: req.size,
                    served: 0,
                    ip: req.ip,
                },
            );
            return Ok(());
        }
        let queued = ahead < self.queue.len();
        if !queued {
            // Bounded: an address queues at most its share of devices, and the queue
            // [`MAX_WAITING`]; past that the device is told when to come back, unqueued.
            let of_ip = req.ip.map_or(0, |ip| {
                self.queue.iter().filter(|w| w.ip == Some(ip)).count()
            });
            if self.queue.len() >= MAX_WAITING || (req.ip.is_some() && of_ip >= max_per_ip) {
                return Err(Wait {
                    why: if req.ip.is_some() && of_ip >= max_per_ip {
                        Busy::Address
                    } else {
                        Busy::All
                    },
                    retry_after: self.estimate(ahead + 1 - free, None, now),
                    position: None,
                });
            }
        }
        let retry_after = self.estimate(ahead + 1 - free, None, now);
        let forget_at = now + Duration::from_secs(2 * retry_after) + QUEUE_GRACE;
        match self.queue.iter_mut().find(|w| w.device == req.device) {
            Some(w) => w.forget_at = forget_at,
            None => self.queue.push_back(Waiter {
                device: req.device.to_string(),
                ip: req.ip,
                forget_at,
            }),
        }
        Err(Wait {
            why: Busy::All,
            retry_after,
            position: Some(ahead + 1),
        })
    }

    /// A slot for one transfer without a device id: only one no waiting device is owed.
    fn take_anon(&mut self, ip: IpAddr, lim: (usize, usize), now: Instant) -> Result<(), Wait> {
        let (max, max_per_ip) = lim;
        self.expire(now);
        if self.held_by(ip) >= max_per_ip {
            return Err(Wait {
                why: Busy::Address,
                retry_after: self.estimate(1, Some(ip), now),
                position: None,
            });
        }
        let free = max.saturating_sub(self.in_use());
        if free <= self.queue.len() {
            return Err(Wait {
                why: Busy::All,
                retry_after: self.estimate(self.queue.len() + 1 - free, None, now),
                position: None,
            });
        }
        *self.anon.entry(ip).or_default() += 1;
        self.anon_total += 1;
        Ok(())
    }
}

/// What a device asks a slot for.
struct Take<'a> {
    device: &'a str,
    /// Set for HTTP: the address's share applies.
    ip: Option<IpAddr>,
    size: u64,
    /// An HTTP transfer begins.
    stream: bool,
}

/// An HTTP transfer's hold on a slot: a device's lease (kept when the transfer ends, see the
/// module header) or, without a device id, a slot of its own freed when it is dropped.
pub struct HttpSlot {
    slots: Slots,
    held: Held,
}

enum Held {
    Device(String),
    Anon(IpAddr),
}

impl Drop for HttpSlot {
    fn drop(&mut self) {
        let mut t = self.slots.lock();
        match &self.held {
            Held::Device(d) => {
                if let Some(l) = t.leases.get_mut(d) {
                    l.streams = l.streams.saturating_sub(1);
                    l.last = Instant::now();
                }
            }
            Held::Anon(ip) => {
                if let Some(n) = t.anon.get_mut(ip) {
                    *n -= 1;
                    if *n == 0 {
                        t.anon.remove(ip);
                    }
                }
                t.anon_total = t.anon_total.saturating_sub(1);
            }
        }
    }
}

impl Slots {
    /// `max` slots, of which `max_per_ip` held over HTTP from one address.
    pub fn new(max: usize, max_per_ip: usize) -> Slots {
        Slots {
            table: Arc::default(),
            max,
            max_per_ip,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The MQTT path: keeps `device`'s slot (it asked again) or gives it one, or says how
    /// long to wait. `now` is the manager's clock reading.
    pub fn for_device(&self, device: &str, size: u64, now: Instant) -> Result<(), Wait> {
        let req = Take {
            device,
            ip: None,
            size,
            stream: false,
        };
        self.lock().take(req, (self.max, self.max_per_ip), now)
    }

    /// The HTTP path: one transfer to `ip`, under `device`'s slot when the request names one,
    /// else in a slot of its own.
    pub fn for_http(&self, device: Option<&str>, ip: IpAddr, size: u64) -> Result<HttpSlot, Wait> {
        let lim = (self.max, self.max_per_ip);
        let now = Instant::now();
        let held = match device {
            Some(device) => {
                let req = Take {
                    device,
                    ip: Some(ip),
                    size,
                    stream: true,
                };
                self.lock().take(req, lim, now)?;
                Held::Device(device.to_string())
            }
            None => {
                self.lock().take_anon(ip, lim, now)?;
                Held::Anon(ip)
            }
        };
        Ok(HttpSlot {
            slots: self.clone(),
            held,
        })
    }

    /// `device` is done with its download (verified, `done`/`failed`, another rollout): its
    /// slot is free.
    pub fn release(&self, device: &str) {
        self.lock().leases.remove(device);
    }

    /// Counts `n` bytes served (to `device`, if known) for the estimate.
    pub fn served(&self, device: Option<&str>, n: u64) {
        let mut t = self.lock();
        t.rate.add(n, Instant::now());
        if let Some(l) = device.and_then(|d| t.leases.get_mut(d)) {
            l.served += n;
        }
    }

    /// Frees the slots of idle devices and forgets waiters that did not come back, as of
    /// `now`.
    pub fn expire(&self, now: Instant) {
        self.lock().expire(now);
    }

    /// Slots in use.
    pub fn in_use(&self) -> usize {
        self.lock().in_use()
    }

    /// Devices waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.lock().queue.len()
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
    slots: Slots,
    metrics: Arc<OtaMetrics>,
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
                metrics.error("read");
                continue;
            }
            Err(_) => return,
        };
        if tx.publish(&job.topic, data, false).await.is_err() {
            debug!("broker gone; chunk serving stops");
            return;
        }
        metrics.served("mqtt", len as u64);
        slots.served(Some(&job.device), len as u64);
        served.add(&job.device, &job.image.sha256, Via::Mqtt, len as u64);
        metrics
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

    fn dev(device: &str, ip: Option<IpAddr>, stream: bool) -> Take<'_> {
        Take {
            device,
            ip,
            size: 1000,
            stream,
        }
    }

    #[test]
    fn http_slots_are_shared_out_per_address() {
        let s = Slots::new(3, 2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a1 = s.for_http(None, a, 10).unwrap();
        let _a2 = s.for_http(Some("d1"), a, 10).unwrap();
        assert_eq!(
            s.for_http(None, a, 10).err().map(|w| w.why),
            Some(Busy::Address)
        );
        assert_eq!(
            s.for_http(Some("d2"), a, 10).err().map(|w| w.why),
            Some(Busy::Address)
        );
        let _b1 = s.for_http(None, b, 10).unwrap();
        assert_eq!(
            s.for_http(None, b, 10).err().map(|w| w.why),
            Some(Busy::All)
        );
        drop(a1);
        assert_eq!(s.in_use(), 2);
        let _a3 = s.for_http(None, a, 10).unwrap();
        assert_eq!(
            s.for_http(None, a, 10).err().map(|w| w.why),
            Some(Busy::Address)
        );
        // d1's own transfers are bounded by the same share.
        let _d1b = s.for_http(Some("d1"), a, 10).unwrap();
        assert_eq!(
            s.for_http(Some("d1"), a, 10).err().map(|w| w.why),
            Some(Busy::Address)
        );
    }

    #[test]
    fn a_device_keeps_its_slot_across_requests_until_released_or_idle() {
        let s = Slots::new(1, 2);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..3 {
            drop(s.for_http(Some("d1"), ip, 10).unwrap());
            s.for_device("d1", 10, Instant::now()).unwrap();
        }
        assert_eq!(s.in_use(), 1);
        let w = s.for_device("d2", 10, Instant::now()).unwrap_err();
        assert_eq!((w.why, w.position), (Busy::All, Some(1)));
        assert!(
            s.for_http(None, ip, 10).is_err(),
            "an anonymous request waits too"
        );
        s.release("d1");
        s.for_device("d2", 10, Instant::now()).unwrap();
        assert_eq!(s.waiting(), 0);
        // Idle: freed after DOWNLOAD_IDLE, unless a transfer is in flight.
        let mut t = Table::default();
        let t0 = Instant::now();
        t.take(dev("d1", Some(ip), true), (1, 2), t0).unwrap();
        let later = t0 + DOWNLOAD_IDLE * 2;
        assert!(t.take(dev("d2", None, false), (1, 2), later).is_err());
        t.leases.get_mut("d1").unwrap().streams = 0;
        t.take(dev("d2", None, false), (1, 2), later).unwrap();
        assert!(!t.leases.contains_key("d1"));
    }

    #[test]
    fn waiting_devices_get_freed_slots_in_the_order_they_asked() {
        let mut t = Table::default();
        let now = Instant::now();
        let lim = (2, 8);
        t.take(dev("a", None, false), lim, now).unwrap();
        t.take(dev("b", None, false), lim, now).unwrap();
        assert_eq!(
            t.take(dev("c", None, false), lim, now)
                .unwrap_err()
                .position,
            Some(1)
        );
        assert_eq!(
            t.take(dev("d", None, false), lim, now)
                .unwrap_err()
                .position,
            Some(2)
        );
        t.leases.remove("a");
        // d asks first, but the free slot is c's.
        assert_eq!(
            t.take(dev("d", None, false), lim, now)
                .unwrap_err()
                .position,
            Some(2)
        );
        assert!(t.take_anon("10.0.0.9".parse().unwrap(), lim, now).is_err());
        t.take(dev("c", None, false), lim, now).unwrap();
        assert_eq!(
            t.take(dev("d", None, false), lim, now)
                .unwrap_err()
                .position,
            Some(1)
        );
        // One address queues at most its share of devices.
        let ip: IpAddr = "10.0.0.3".parse().unwrap();
        let lim1 = (2, 1);
        assert_eq!(
            t.take(dev("e", Some(ip), true), lim1, now)
                .unwrap_err()
                .position,
            Some(2)
        );
        let w = t.take(dev("f", Some(ip), true), lim1, now).unwrap_err();
        assert_eq!((w.why, w.position), (Busy::Address, None));
        t.queue.retain(|w| w.device != "e");
        // A waiter that does not come back loses its place.
        let w = t.take(dev("d", None, false), lim, now).unwrap_err();
        let gone = now + Duration::from_secs(2 * w.retry_after) + QUEUE_GRACE;
        t.expire(gone);
        assert!(t.queue.is_empty());
    }

    #[test]
    fn retry_after_is_the_remaining_bytes_over_the_serving_rate_bounded() {
        let mut t = Table::default();
        let t0 = Instant::now();
        let lim = (2, 8);
        t.take(dev("a", None, false), lim, t0).unwrap();
        t.take(dev("b", None, false), lim, t0).unwrap();
        t.leases.get_mut("a").unwrap().size = 10_000;
        t.leases.get_mut("b").unwrap().size = 40_000;
        // Nothing served yet: soon while they just started, else the first idle lease's
        // expiry (50 s here), bounded.
        assert_eq!(t.estimate(1, None, t0), RETRY_AFTER_UNKNOWN);
        assert_eq!(
            t.estimate(1, None, t0 + Duration::from_secs(10)),
            RETRY_AFTER_MAX
        );
        // 1000 B/s shared by two: a's 10 kB take 20 s, then b's other 30 kB 30 s more.
        t.rate.add(0, t0);
        t.rate.add(2000, t0 + Duration::from_secs(2));
        t.rate.add(0, t0 + Duration::from_secs(4));
        let now = t0 + Duration::from_secs(4);
        assert_eq!(t.rate.per_sec(now), 1000.0);
        assert_eq!(t.estimate(1, None, now), 20);
        assert_eq!(t.estimate(2, None, now), RETRY_AFTER_MAX);
        t.leases.get_mut("a").unwrap().served = 9_900;
        assert_eq!(t.estimate(1, None, now), RETRY_AFTER_MIN);
        // After a pause the old rate is forgotten: unknown until bytes flow again. 2000 B in
        // the window open when the pause began would read 2000 B / 61 s ~ 33 B/s if it were
        // kept.
        t.rate.add(2000, now + Duration::from_secs(1));
        let resumed = now + Duration::from_secs(61);
        t.rate.add(100, resumed);
        assert_eq!(
            t.rate.per_sec(resumed),
            1000.0,
            "100 B over the 0.1 s floor"
        );
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
}
