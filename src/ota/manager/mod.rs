//! The OTA manager's decisions, without I/O: state in, outputs out.
//!
//! Owns the OTA [`State`] (images, rollouts, devices), the [`Catalog`] of verified images,
//! the set of images being fetched, the MQTT-pushed chunks received so far, and when the next
//! persist and the next `served` report are due. It takes one [`Input`] at a time with the
//! clock reading [`Now`] and returns the [`Out`]puts in the order the driver must carry them
//! out ([`super::driver`]): publishes, chunk jobs, catalog updates, fetch and install starts,
//! pushed-chunk writes, evictions, state saves.
//!
//! No tokio, no channels, no filesystem here. What a decision needs from the outside comes
//! in with the input, and the driver does the file work:
//! - the state file's bytes ([`Manager::restore`]), and at start whether every cached image
//!   still hashes right and could be opened ([`Reverified`]);
//! - a finished fetch or push install arrives with its file already opened
//!   ([`FetchEvent::Done`]); a pushed chunk is validated here, written by the driver
//!   ([`Out::WritePart`]) and counted once the write is reported back ([`Input::PartWritten`]);
//! - the room left in the chunk queue comes with each message ([`Input::Message`]), so a
//!   chunk request beyond it is answered `busy` here, as before, and every [`Out::Chunk`]
//!   fits;
//! - loading the TLS roots of a download is the driver's: when it fails the driver answers
//!   with [`FetchEvent::Done`] `Err` at once, before it carries out the next output.
//!
//! Two shared pieces are used directly because they are not I/O: the download [`Slots`]
//! (one small table shared with the HTTP transfers; the manager passes its own `now`) and
//! the metric families (counters and gauges).
//!
//! Persistence: every change to the state counts a generation; [`Out::Persist`] carries the
//! encoded state and its generation, and the state is clean again only once the driver
//! reports that generation saved ([`Input::Persisted`]): a save that fails is retried on the
//! next housekeeping tick, and a change made after a save was asked for is never lost.
//!
//! Timers: the manager says when it next wants a [`Input::Tick`] ([`Manager::next_deadline`]).
//! Housekeeping (expire idle slots, gauges, save if dirty) runs every [`PERSIST_EVERY`]; the
//! per-device `served` reports at most every `ota.progress_interval`.
//!
//! The work is split by subject: cloud commands in [`rollout`], the image lifecycle (fetch,
//! push, ready, evict) in [`image`], device requests and served bytes in [`device`]; this
//! file holds the types, the dispatch, start-up and housekeeping. The invariants are those of
//! [`super`] (the module header of `ota`).

mod device;
mod image;
mod rollout;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tracing::{debug, error, info};

use super::cache::{Digests, Expect, Opened};
use super::fetch;
use super::protocol::{parse_device_topic, DeviceTopic, ErrorReply};
use super::serve::{self, Catalog, ChunkJob, Served, Slots};
use super::state::{Device, ImageState, Rollout, State};
use super::{Query, CMD_IMAGE, CMD_STATUS, CMD_UPGRADE, GATEWAY_LEVEL};
use crate::ota::config::OtaConfig;
use crate::ota::metrics::OtaMetrics;

/// How often housekeeping runs: idle slots expire, gauges, dirty state saved.
pub const PERSIST_EVERY: Duration = Duration::from_millis(500);

/// A clock reading: monotonic for deadlines and slots, wall clock (ms since the epoch) for
/// what is stored and reported.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// Monotonic.
    pub at: Instant,
    /// Milliseconds since the Unix epoch.
    pub ms: u64,
}

impl Now {
    /// The system clocks.
    pub fn system() -> Now {
        Now {
            at: Instant::now(),
            ms: crate::clock::now_ms(),
        }
    }
}

/// What a fetch or install task reports.
#[derive(Debug)]
pub enum FetchEvent {
    /// An attempt failed (reported up; the task goes on unless it was the last).
    Attempt {
        /// Image key.
        key: String,
        /// `error` or `hash_mismatch`.
        result: &'static str,
        /// Why.
        error: String,
    },
    /// A download is running: bytes in the partial file, and the rate over the last interval.
    Progress {
        /// Image key.
        key: String,
        /// 1-based attempt.
        attempt: u32,
        /// Bytes in the partial file.
        received: u64,
        /// Rate over the last interval.
        bytes_per_sec: u64,
    },
    /// The download or push install ended: verified, installed and opened, or why not.
    Done {
        /// Image key.
        key: String,
        /// The verified file, or why there is none.
        result: Result<Installed, String>,
    },
}

/// A verified, installed image file.
#[derive(Debug)]
pub struct Installed {
    /// Its digests.
    pub digests: Digests,
    /// `<sha256>.bin`, opened for serving.
    pub opened: Opened,
}

/// The start-up check of one cached image ([`Manager::restore`] lists them).
#[derive(Debug)]
pub struct Reverified {
    /// Image key.
    pub key: String,
    /// The sha256 it was saved under.
    pub sha256: String,
    /// Re-hashed and opened, or why it is unusable (the file is deleted then).
    pub result: Result<Opened, String>,
}

/// A cached image to re-hash at start: key, sha256, size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToReverify {
    /// Image key.
    pub key: String,
    /// sha256 of the `.bin` file.
    pub sha256: String,
    /// Expected size.
    pub size: u64,
}

/// One input.
#[derive(Debug)]
pub enum Input {
    /// A message on a subscribed topic: a device's request, a cloud command, a pushed chunk.
    Message {
        /// Local topic.
        topic: String,
        /// Payload.
        payload: bytes::Bytes,
        /// Free places in the MQTT chunk queue.
        chunk_room: usize,
    },
    /// A fetch or install task reported.
    Fetch(FetchEvent),
    /// A pushed chunk asked for by [`Out::WritePart`] was written, or not.
    PartWritten {
        /// Image key.
        key: String,
        /// Chunk index.
        index: u64,
        /// Bytes written.
        len: u64,
        /// Why not.
        result: Result<(), String>,
    },
    /// Bytes served to a device (MQTT or HTTP).
    Served(Served),
    /// The save asked for by [`Out::Persist`] of this generation succeeded.
    Persisted {
        /// Its generation.
        generation: u64,
    },
    /// The deadline of [`Manager::next_deadline`] passed.
    Tick,
    /// The gateway stops: save the state.
    Stop,
}

/// One thing for the driver to do, in order.
#[derive(Debug)]
pub enum Out {
    /// Publish on the local broker, QoS 0, not retained.
    Publish {
        /// Topic.
        topic: String,
        /// Payload.
        payload: Vec<u8>,
    },
    /// Queue a chunk for the MQTT serving task (it fits the room the input gave).
    Chunk(ChunkJob),
    /// The verified images changed: the HTTP server serves these from now on.
    Catalog(Arc<Catalog>),
    /// Download image `key` from `url` (the driver loads the TLS roots; see the header).
    StartFetch {
        /// Image key.
        key: String,
        /// Source.
        url: fetch::Url,
        /// What it must be.
        expect: Expect,
    },
    /// Every pushed chunk of `key` is written: verify and install the partial file.
    InstallPushed {
        /// Image key.
        key: String,
        /// What it must be.
        expect: Expect,
    },
    /// Write a pushed chunk at `offset` of the partial file of `key`; report back with
    /// [`Input::PartWritten`].
    WritePart {
        /// Image key.
        key: String,
        /// Chunk index.
        index: u64,
        /// Byte offset.
        offset: u64,
        /// Bytes.
        data: Vec<u8>,
    },
    /// Delete the cached image file `<sha256>.bin` (evicted).
    Evict {
        /// sha256.
        sha256: String,
    },
    /// Save the encoded state (atomically); report back with [`Input::Persisted`].
    Persist {
        /// [`State::encode`].
        bytes: Vec<u8>,
        /// Which change it covers.
        generation: u64,
    },
}

pub(crate) fn chunks_of(size: u64, chunk: u64) -> u64 {
    size.div_ceil(chunk.max(1))
}

/// The OTA decisions (see the module header).
pub struct Manager {
    cfg: OtaConfig,
    /// Base of the metadata `url`.
    base_url: String,
    metrics: Arc<OtaMetrics>,
    slots: Slots,
    catalog: Catalog,
    /// Images with a download or an install under way.
    fetching: HashSet<String>,
    /// MQTT-pushed chunks received so far, per image key (not persisted: after a restart the
    /// cloud pushes again).
    pushed: HashMap<String, BTreeSet<u64>>,
    /// Bytes downloaded so far, per image key with an HTTPS fetch under way (for the status;
    /// not persisted).
    received: HashMap<String, u64>,
    state: State,
    /// Changes to the state so far, and the last generation saved.
    changes: u64,
    saved: u64,
    /// Devices whose served bytes changed since the last `served` report.
    served_moved: BTreeSet<String>,
    /// Next housekeeping and next `served` report (`None` until [`Manager::start`]).
    next_housekeeping: Option<Instant>,
    next_served: Option<Instant>,
    /// The reading of the input being handled.
    now: Now,
    /// Free places in the chunk queue for the message being handled.
    chunk_room: usize,
    out: Vec<Out>,
}

impl Manager {
    /// A manager with no state yet; `slots` is shared with the HTTP transfers.
    pub fn new(
        cfg: OtaConfig,
        base_url: String,
        metrics: Arc<OtaMetrics>,
        slots: Slots,
    ) -> Manager {
        Manager {
            cfg,
            base_url,
            metrics,
            slots,
            catalog: Catalog::default(),
            fetching: HashSet::new(),
            pushed: HashMap::new(),
            received: HashMap::new(),
            state: State::default(),
            changes: 0,
            saved: 0,
            served_moved: BTreeSet::new(),
            next_housekeeping: None,
            next_served: None,
            now: Now::system(),
            chunk_room: 0,
            out: Vec::new(),
        }
    }

    // ---- start-up ---------------------------------------------------------------------

    /// Takes the saved state (`None`: no file, or it could not be read) and lists the cached
    /// images to re-hash before any is served.
    pub fn restore(&mut self, saved: Option<&[u8]>) -> Vec<ToReverify> {
        if let Some(bytes) = saved {
            match State::decode(bytes) {
                Ok(s) => self.state = s,
                Err(e) => {
                    error!(error = %e, "OTA state file unreadable; starting with no rollouts");
                    self.metrics.error("state_corrupt");
                }
            }
        }
        self.state
            .images
            .iter()
            .filter(|(_, i)| i.state == ImageState::Ready)
            .filter_map(|(k, i)| {
                i.ready_sha256.as_ref().map(|sha| ToReverify {
                    key: k.clone(),
                    sha256: sha.clone(),
                    size: i.size,
                })
            })
            .collect()
    }

    /// Takes the start-up checks (in the order [`Manager::restore`] listed them), serves what
    /// passed, refetches what did not and what was being fetched, and starts the timers.
    pub fn start(&mut self, now: Now, checks: Vec<Reverified>) -> Vec<Out> {
        self.now = now;
        for c in checks {
            self.reverified(c);
        }
        let need = self.state.needed_images();
        for key in need {
            if self.state.images.get(&key).map(|i| i.state) == Some(ImageState::Fetching) {
                self.ensure_fetch(&key);
            }
        }
        self.update_gauges();
        info!(
            images = self.state.images.len(),
            rollouts = self.state.rollouts.len(),
            devices = self.state.devices.len(),
            "OTA manager ready"
        );
        // Both timers are due at once, as the intervals they replace were.
        self.next_housekeeping = Some(now.at);
        self.next_served = Some(now.at);
        std::mem::take(&mut self.out)
    }

    fn reverified(&mut self, c: Reverified) {
        let Reverified {
            key,
            sha256,
            result,
        } = c;
        let Some(img) = self.state.images.get(&key).cloned() else {
            return;
        };
        match result {
            Ok(opened) => self.make_ready(&key, sha256, opened),
            Err(why) => {
                error!(image = %key, error = %why, "cached image corrupted; fetching it again");
                self.metrics.error("cache_corrupt");
                if let Some(i) = self.state.images.get_mut(&key) {
                    i.state = ImageState::Fetching;
                    i.ready_sha256 = None;
                    i.last_error = Some(format!("cache file corrupted: {why}"));
                }
                self.report(
                    "fetch",
                    json!({"image": key, "name": img.name, "version": img.version,
                           "result": "cache_corrupt", "error": why}),
                );
                self.mark_dirty();
            }
        }
    }

    // ---- the one entry point ----------------------------------------------------------

    /// Handles one input; returns what to do, in order.
    pub fn handle(&mut self, now: Now, input: Input) -> Vec<Out> {
        self.now = now;
        match input {
            Input::Message {
                topic,
                payload,
                chunk_room,
            } => {
                self.chunk_room = chunk_room;
                self.message(&topic, &payload);
            }
            Input::Fetch(f) => self.fetch_event(f),
            Input::PartWritten {
                key,
                index,
                len,
                result,
            } => self.part_written(&key, index, len, result),
            Input::Served(s) => self.served(s),
            Input::Persisted { generation } => self.saved = self.saved.max(generation),
            Input::Tick => self.tick(),
            Input::Stop => self.persist(),
        }
        std::mem::take(&mut self.out)
    }

    /// When the next [`Input::Tick`] is due (`None` before [`Manager::start`]).
    pub fn next_deadline(&self) -> Option<Instant> {
        match (self.next_housekeeping, self.next_served) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The answer to a status question from the HTTP API.
    pub fn answer(&self, q: &Query) -> Option<serde_json::Value> {
        match q {
            Query::All => {
                let mut all = self.state.all_json();
                all["images"] = self.images_json();
                Some(all)
            }
            Query::Device(d) => self.state.device_json(d),
            Query::Rollout(r) => self.state.rollout_json(r),
        }
    }

    /// Every image the state knows, with what has been fetched of it so far.
    fn images_json(&self) -> serde_json::Value {
        let images: Vec<serde_json::Value> = self
            .state
            .images
            .iter()
            .map(|(key, i)| {
                let fetched = match i.state {
                    ImageState::Ready => i.size,
                    _ => match (self.received.get(key), self.pushed.get(key)) {
                        (Some(n), _) => *n,
                        (None, Some(chunks)) => (chunks.len() as u64)
                            .saturating_mul(i.push_chunk_size.unwrap_or(0))
                            .min(i.size),
                        (None, None) => 0,
                    },
                };
                serde_json::json!({
                    "image": key,
                    "name": i.name,
                    "version": i.version,
                    "size": i.size,
                    "sha256": i.ready_sha256.as_ref().or(i.sha256.as_ref()),
                    "state": i.state,
                    "fetched": fetched,
                    "last_served_ms": (i.last_used_ms > 0).then_some(i.last_used_ms),
                    "error": i.last_error,
                })
            })
            .collect();
        serde_json::Value::Array(images)
    }

    fn message(&mut self, topic: &str, payload: &[u8]) {
        if topic == CMD_UPGRADE {
            return self.upgrade(payload);
        }
        if topic == CMD_STATUS {
            return self.status_query(payload);
        }
        if let Some(rest) = topic.strip_prefix(CMD_IMAGE) {
            return self.pushed_chunk(rest, payload);
        }
        let Some((dev, kind)) = parse_device_topic(&self.cfg.prefix, topic) else {
            return;
        };
        let dev = dev.to_string();
        match kind {
            DeviceTopic::Request => self.request(&dev, payload),
            DeviceTopic::ChunkGet => self.chunk_get(&dev, payload),
            DeviceTopic::Progress => self.progress(&dev, payload),
            DeviceTopic::Verify => self.verify(&dev, payload),
        }
    }

    // ---- outputs ----------------------------------------------------------------------

    fn topic(&self, dev: &str, kind: &str) -> String {
        format!("{}/{dev}/{kind}", self.cfg.prefix)
    }

    fn publish(&mut self, topic: String, payload: Vec<u8>) {
        self.out.push(Out::Publish { topic, payload });
    }

    fn publish_json(&mut self, topic: String, v: serde_json::Value) {
        self.publish(topic, v.to_string().into_bytes());
    }

    /// A report for the cloud on `<prefix>/_gateway/<kind>`.
    fn report(&mut self, kind: &str, v: serde_json::Value) {
        let t = self.topic(GATEWAY_LEVEL, kind);
        self.publish_json(t, v);
    }

    fn reply_error(
        &mut self,
        dev: &str,
        request: &str,
        code: &str,
        reason: String,
        index: Option<u64>,
    ) {
        self.metrics.error(code);
        debug!(device = dev, request, code, %reason, "OTA request refused");
        let e = ErrorReply {
            code: code.into(),
            reason,
            request: request.into(),
            index,
            retry_after: None,
            position: None,
        };
        self.send_error(dev, e);
    }

    /// `busy` with when to come back (`retry_after`, seconds) and, when queued, the place.
    fn reply_busy(&mut self, dev: &str, w: serve::Wait, reason: String, index: Option<u64>) {
        self.metrics.error("busy");
        debug!(device = dev, retry_after = w.retry_after, position = ?w.position, "OTA chunk request must wait");
        let e = ErrorReply {
            code: "busy".into(),
            reason,
            request: "chunk/get".into(),
            index,
            retry_after: Some(w.retry_after),
            position: w.position,
        };
        self.send_error(dev, e);
    }

    fn send_error(&mut self, dev: &str, e: ErrorReply) {
        let t = self.topic(dev, "error");
        self.publish(t, serde_json::to_vec(&e).unwrap_or_default());
    }

    fn publish_catalog(&mut self) {
        self.out.push(Out::Catalog(Arc::new(self.catalog.clone())));
    }

    // ---- persistence and housekeeping -------------------------------------------------

    fn mark_dirty(&mut self) {
        self.changes += 1;
    }

    fn dirty(&self) -> bool {
        self.changes != self.saved
    }

    fn persist(&mut self) {
        self.out.push(Out::Persist {
            bytes: self.state.encode(),
            generation: self.changes,
        });
    }

    fn tick(&mut self) {
        let now = self.now.at;
        if self.next_housekeeping.is_some_and(|t| t <= now) {
            // Like a tokio interval: every period, catching up when late.
            self.next_housekeeping = self.next_housekeeping.map(|t| t + PERSIST_EVERY);
            self.slots.expire(now);
            self.update_gauges();
            if self.dirty() {
                self.persist();
            }
        }
        if self.next_served.is_some_and(|t| t <= now) {
            // At most once per interval, counted from the last report.
            self.next_served = Some(now + self.cfg.progress_interval);
            self.report_served();
        }
    }

    fn update_gauges(&self) {
        let o = &self.metrics;
        o.active_downloads.set(self.slots.in_use() as i64);
        o.waiting_devices.set(self.slots.waiting() as i64);
        let bytes: u64 = self
            .state
            .images
            .values()
            .filter(|i| i.state == ImageState::Ready)
            .map(|i| i.size)
            .sum();
        o.cache_bytes.set(bytes as i64);
        let mut by_state: HashMap<&str, i64> = HashMap::new();
        for s in [
            "assigned",
            "waiting",
            "downloading",
            "verifying",
            "installing",
            "verified",
            "done",
            "failed",
            "retry",
        ] {
            by_state.insert(s, 0);
        }
        for d in self.state.devices.values() {
            *by_state.entry(d.state.as_str()).or_default() += 1;
        }
        for (s, n) in by_state {
            o.devices
                .get_or_create(&vec![("state".into(), s.into())])
                .set(n);
        }
    }

    // ---- lookups ----------------------------------------------------------------------

    fn assignment(&self, dev: &str) -> Option<&Rollout> {
        let tags = self
            .cfg
            .devices
            .get(dev)
            .map(|d| d.tags.as_slice())
            .unwrap_or(&[]);
        self.state.assignment(dev, tags)
    }

    fn device_mut(&mut self, dev: &str) -> &mut Device {
        self.mark_dirty();
        let ms = self.now.ms;
        let d = self.state.devices.entry(dev.to_string()).or_default();
        d.updated_ms = ms;
        d
    }

    /// Devices that asked while their image was not ready.
    fn waiting_devices(&self) -> Vec<String> {
        self.state
            .devices
            .iter()
            .filter(|(_, d)| d.state == "waiting")
            .map(|(id, _)| id.clone())
            .collect()
    }
}
