//! Firmware updates: fetch an image once from the cloud, verify it, serve it to many devices.
//!
//! Owns the OTA manager task and its wiring. The manager talks to the embedded broker through
//! two in-process links (like the Modbus and serial sources): one for requests, commands and
//! small replies, one for the chunk-serving task ([`serve`]). Everything it publishes on an
//! uplinked topic (device replies, `<prefix>/_gateway/...` reports) reaches the cloud through
//! the uplink tap and the durable queue, never directly.
//!
//! Topics (local; the cloud sees uplinked ones under `fieldgate/<gateway_id>/`):
//! - device -> `<prefix>/<id>/request | chunk/get | progress | verify`;
//! - gateway -> `<prefix>/<id>/metadata | chunk/<index> | success | retry | error`;
//! - cloud -> `cmd/ota/upgrade` (`ota_upgrade`), `cmd/ota/status`, `cmd/ota/image/<key>/<i>`
//!   (MQTT-pushed image chunks);
//! - gateway -> `<prefix>/_gateway/fetch | fetch_progress | served | rollout | status | error`
//!   (reports for the cloud). `fetch_progress` (bytes and rate of a running HTTPS download)
//!   and `served` (bytes served to one device, MQTT and HTTP) are sent at most once per
//!   `ota.progress_interval`: `fetch_progress` every interval while a download runs (rate 0
//!   when the store sends nothing), `served` per device only when its count moved.
//!
//! `<prefix>/+/chunk/#` is excluded from the uplink by the gateway (see [`uplink_exclude`]):
//! chunk bytes and chunk requests never reach the cloud.
//!
//! Image lifecycle (per image key, see [`state::ImageState`]):
//! `Fetching -> Ready` (size + hash verified, installed as `<sha256>.bin`), `Fetching ->
//! Failed` (all `ota.fetch_attempts` failed), `Failed -> Fetching` (only when the cloud sends
//! the `ota_upgrade` command again; a device asking meanwhile is answered `fetch_failed` and
//! causes no download), `Ready -> Evicted` (LRU, only when no active rollout needs it),
//! `Evicted -> Fetching` (a command or a device request needs it again), `Ready -> Fetching`
//! (the file was found corrupted at start: reported up, fetched again).
//!
//! Invariants:
//! - nothing is served before this process verified the file ([`serve::ReadyImage`]);
//! - one download per image at a time; devices never cause a download of their own;
//! - the manager never waits on a device: replies are small publishes, chunk jobs go to a
//!   bounded queue and overflow is answered `busy`;
//! - the resume hint in the metadata (`received`, `next_chunk`) comes only from what the
//!   device confirmed in its `progress` (never from what was served to it), so the saved hint
//!   a restart reads, even after kill -9, is never ahead of the device.

pub mod cache;
pub mod fetch;
pub mod protocol;
pub mod serve;
pub mod state;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::bridge::pacing::Backoff;
use crate::broker::{Broker, BrokerError};
use crate::config::{OtaConfig, Settings};
use crate::metrics::Metrics;
use crate::sources::{Inbound, LocalClient, LocalTx};
use crate::store::now_ms;
use cache::{Cache, CacheError, Digests, Expect};
use protocol::{
    parse_device_topic, ChunkGet, DeviceTopic, ErrorReply, Metadata, Progress, Request,
    StatusQuery, Target, Upgrade, Verify,
};
use serve::{Catalog, ChunkJob, Pacer, ReadyImage, Served, ServedTally, Slots, Via};
use state::{Device, Image, ImageState, Rollout, State};

/// Local topic of the `ota_upgrade` command (cloud: `fieldgate/<gw>/cmd/ota/upgrade`).
pub const CMD_UPGRADE: &str = "cmd/ota/upgrade";
/// Local topic of the status query (cloud: `fieldgate/<gw>/cmd/ota/status`).
pub const CMD_STATUS: &str = "cmd/ota/status";
/// Local topic prefix of MQTT-pushed image chunks: `cmd/ota/image/<key>/<index>`.
pub const CMD_IMAGE: &str = "cmd/ota/image/";
/// The gateway's own id level under the prefix.
pub const GATEWAY_LEVEL: &str = "_gateway";
/// How often dirty device progress is saved.
const PERSIST_EVERY: Duration = Duration::from_millis(500);
const STATE_FILE: &str = "state.json";

/// Uplink filters the gateway adds to `[uplink] exclude` while OTA is enabled.
pub fn uplink_exclude(prefix: &str) -> Vec<String> {
    vec![format!("{prefix}/+/chunk/#")]
}

/// Why the OTA manager could not start. The gateway does not start.
#[derive(Debug, thiserror::Error)]
pub enum OtaError {
    /// A broker link could not be made (raise `broker.max_connections`).
    #[error(transparent)]
    Broker(#[from] Box<BrokerError>),
    /// Subscribing on the link failed.
    #[error("ota: subscribe {filter}: {why}")]
    Subscribe {
        /// Filter.
        filter: String,
        /// Why.
        why: String,
    },
    /// The cache directory is unusable: fix `ota.cache_dir`.
    #[error("ota.cache_dir: {0}")]
    Cache(#[from] CacheError),
}

/// A status question from the HTTP API.
pub enum Query {
    /// Everything.
    All,
    /// One device.
    Device(String),
    /// One rollout.
    Rollout(String),
}

/// What the HTTP server needs from the OTA manager.
#[derive(Clone)]
pub struct OtaHandle {
    /// Verified images.
    pub catalog: watch::Receiver<Arc<Catalog>>,
    queries: mpsc::Sender<(Query, oneshot::Sender<Option<serde_json::Value>>)>,
    /// Download slots shared with MQTT serving.
    pub slots: Slots,
    /// Bytes/s limit shared with MQTT serving.
    pub pacer: Pacer,
    /// `ota.stall_timeout`: an HTTP transfer whose client reads nothing this long is cut.
    pub stall_timeout: Duration,
    served: mpsc::Sender<Served>,
}

impl OtaHandle {
    /// Asks the manager; `None` if unknown or the manager is gone.
    pub async fn query(&self, q: Query) -> Option<serde_json::Value> {
        let (tx, rx) = oneshot::channel();
        self.queries.try_send((q, tx)).ok()?;
        tokio::time::timeout(Duration::from_secs(2), rx)
            .await
            .ok()?
            .ok()?
    }

    /// A tally for one transfer's served bytes (see [`serve`]).
    pub fn served_tally(&self) -> ServedTally {
        ServedTally::new(self.served.clone())
    }
}

enum FetchMsg {
    /// An attempt failed (reported up; the task goes on unless it was the last).
    Attempt {
        key: String,
        result: &'static str,
        error: String,
    },
    /// A download is running: bytes in the partial file, and the rate over the last
    /// interval. Sent with `try_send`: dropped when the manager is behind (the next one
    /// follows an interval later).
    Progress {
        key: String,
        attempt: u32,
        received: u64,
        bytes_per_sec: u64,
    },
    /// The download ended.
    Done {
        key: String,
        result: Result<Digests, String>,
    },
}

/// The OTA manager, built before the broker listens.
pub struct Ota {
    cfg: OtaConfig,
    base_url: String,
    cache: Cache,
    ca_file: std::path::PathBuf,
    link: LocalClient,
    serve_link: LocalClient,
    metrics: Arc<Metrics>,
    catalog_tx: watch::Sender<Arc<Catalog>>,
    queries_rx: mpsc::Receiver<(Query, oneshot::Sender<Option<serde_json::Value>>)>,
    slots: Slots,
    pacer: Pacer,
    served_tx: mpsc::Sender<Served>,
    served_rx: mpsc::Receiver<Served>,
}

impl Ota {
    /// Makes the links and subscriptions (before the listeners start) and the handle for the
    /// HTTP server.
    pub fn build(
        settings: &Settings,
        broker: &Broker,
        metrics: Arc<Metrics>,
    ) -> Result<(Ota, OtaHandle), OtaError> {
        let cfg = settings.ota.clone();
        let cache = Cache::open(&settings.ota_cache_dir())?;
        let mut link = broker.client("fieldgate-ota").map_err(Box::new)?;
        let serve_link = broker.client("fieldgate-ota-serve").map_err(Box::new)?;
        let p = &cfg.prefix;
        for filter in [
            format!("{p}/+/request"),
            format!("{p}/+/chunk/get"),
            format!("{p}/+/progress"),
            format!("{p}/+/verify"),
            "cmd/ota/#".to_string(),
        ] {
            link.subscribe(&filter).map_err(|e| OtaError::Subscribe {
                filter: filter.clone(),
                why: e.to_string(),
            })?;
        }
        let (catalog_tx, catalog) = watch::channel(Arc::new(Catalog::default()));
        let (queries, queries_rx) = mpsc::channel(64);
        let slots = Slots::new(cfg.max_concurrent_downloads, cfg.max_downloads_per_ip);
        let pacer = Pacer::new(cfg.max_bytes_per_sec);
        let (served_tx, served_rx) = mpsc::channel(serve::SERVED_QUEUE);
        let handle = OtaHandle {
            catalog,
            queries,
            slots: slots.clone(),
            pacer: pacer.clone(),
            stall_timeout: cfg.stall_timeout,
            served: served_tx.clone(),
        };
        Ok((
            Ota {
                base_url: settings.ota_http_base_url(),
                ca_file: settings.ota_fetch_ca_file(),
                cfg,
                cache,
                link,
                serve_link,
                metrics,
                catalog_tx,
                queries_rx,
                slots,
                pacer,
                served_tx,
                served_rx,
            },
            handle,
        ))
    }

    /// Runs until `stop` is cancelled or the broker goes away; saves the state on the way out.
    pub async fn run(self, stop: CancellationToken) {
        let Ota {
            cfg,
            base_url,
            cache,
            ca_file,
            link,
            serve_link,
            metrics,
            catalog_tx,
            mut queries_rx,
            slots,
            pacer,
            served_tx,
            mut served_rx,
        } = self;
        let (tx, mut rx) = link.split();
        // The serving link only publishes (QoS 0, nothing comes back); its receiving half is
        // kept alive until the end so the router keeps the link.
        let (serve_tx, _serve_rx) = serve_link.split();
        let (jobs_tx, jobs_rx) = mpsc::channel(serve::JOB_QUEUE);
        let serve_stop = stop.child_token();
        let server = tokio::spawn(serve::run_mqtt(
            serve_tx,
            jobs_rx,
            pacer,
            slots.clone(),
            metrics.clone(),
            ServedTally::new(served_tx),
            serve_stop.clone(),
        ));
        let (fetch_tx, mut fetch_rx) = mpsc::channel(64);
        let mut m = Manager {
            cfg,
            base_url,
            cache,
            ca_file,
            tx,
            metrics,
            catalog: Catalog::default(),
            catalog_tx,
            slots,
            jobs: jobs_tx,
            fetch_tx,
            fetches: JoinSet::new(),
            fetching: HashSet::new(),
            pushed: HashMap::new(),
            state: State::default(),
            dirty: false,
            served_moved: BTreeSet::new(),
        };
        m.load().await;
        let mut tick = tokio::time::interval(PERSIST_EVERY);
        let mut progress = tokio::time::interval(m.cfg.progress_interval);
        progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                msg = rx.next() => match msg {
                    Ok(msg) => m.inbound(msg).await,
                    Err(_) => { debug!("broker gone; OTA manager stops"); break; }
                },
                Some(f) = fetch_rx.recv() => m.fetch_msg(f).await,
                Some(s) = served_rx.recv() => m.served(s),
                Some(_) = m.fetches.join_next(), if !m.fetches.is_empty() => {}
                Some((q, reply)) = queries_rx.recv() => {
                    let _ = reply.send(m.answer(&q));
                }
                _ = tick.tick() => m.tick().await,
                _ = progress.tick() => m.report_served().await,
            }
        }
        serve_stop.cancel();
        m.fetches.abort_all();
        while m.fetches.join_next().await.is_some() {}
        let _ = server.await;
        m.persist().await;
        info!("OTA manager stopped");
    }
}

struct Manager {
    cfg: OtaConfig,
    base_url: String,
    cache: Cache,
    ca_file: std::path::PathBuf,
    tx: LocalTx,
    metrics: Arc<Metrics>,
    catalog: Catalog,
    catalog_tx: watch::Sender<Arc<Catalog>>,
    slots: Slots,
    jobs: mpsc::Sender<ChunkJob>,
    fetch_tx: mpsc::Sender<FetchMsg>,
    fetches: JoinSet<()>,
    fetching: HashSet<String>,
    /// MQTT-pushed chunks received so far, per image key (not persisted: after a restart the
    /// cloud pushes again).
    pushed: HashMap<String, BTreeSet<u64>>,
    state: State,
    dirty: bool,
    /// Devices whose served bytes changed since the last `served` report.
    served_moved: BTreeSet<String>,
}

fn chunks_of(size: u64, chunk: u64) -> u64 {
    size.div_ceil(chunk.max(1))
}

impl Manager {
    fn topic(&self, dev: &str, kind: &str) -> String {
        format!("{}/{dev}/{kind}", self.cfg.prefix)
    }

    async fn publish(&mut self, topic: String, payload: Vec<u8>) {
        if let Err(e) = self.tx.publish(&topic, payload, false).await {
            debug!(%topic, error = %e, "OTA publish failed (broker stopping)");
        }
    }

    async fn publish_json(&mut self, topic: String, v: serde_json::Value) {
        self.publish(topic, v.to_string().into_bytes()).await;
    }

    async fn report(&mut self, kind: &str, v: serde_json::Value) {
        let t = self.topic(GATEWAY_LEVEL, kind);
        self.publish_json(t, v).await;
    }

    async fn reply_error(
        &mut self,
        dev: &str,
        request: &str,
        code: &str,
        reason: String,
        index: Option<u64>,
    ) {
        self.metrics.ota.error(code);
        debug!(device = dev, request, code, %reason, "OTA request refused");
        let e = ErrorReply {
            code: code.into(),
            reason,
            request: request.into(),
            index,
            retry_after: None,
            position: None,
        };
        self.send_error(dev, e).await;
    }

    /// `busy` with when to come back (`retry_after`, seconds) and, when queued, the place.
    async fn reply_busy(&mut self, dev: &str, w: serve::Wait, reason: String, index: Option<u64>) {
        self.metrics.ota.error("busy");
        debug!(device = dev, retry_after = w.retry_after, position = ?w.position, "OTA chunk request must wait");
        let e = ErrorReply {
            code: "busy".into(),
            reason,
            request: "chunk/get".into(),
            index,
            retry_after: Some(w.retry_after),
            position: w.position,
        };
        self.send_error(dev, e).await;
    }

    async fn send_error(&mut self, dev: &str, e: ErrorReply) {
        let t = self.topic(dev, "error");
        self.publish(t, serde_json::to_vec(&e).unwrap_or_default())
            .await;
    }

    // ---- start-up ---------------------------------------------------------------------

    async fn load(&mut self) {
        let cache = self.cache.clone();
        let loaded = tokio::task::spawn_blocking(move || cache.read(STATE_FILE)).await;
        match loaded {
            Ok(Ok(Some(bytes))) => match State::decode(&bytes) {
                Ok(s) => self.state = s,
                Err(e) => {
                    error!(error = %e, "OTA state file unreadable; starting with no rollouts");
                    self.metrics.ota.error("state_corrupt");
                }
            },
            Ok(Ok(None)) => {}
            Ok(Err(e)) => warn!(error = %e, "cannot read the OTA state"),
            Err(_) => {}
        }
        // Re-verify every cached image before serving it.
        let keys: Vec<String> = self.state.images.keys().cloned().collect();
        for key in keys {
            let Some(img) = self.state.images.get(&key).cloned() else {
                continue;
            };
            match (&img.state, &img.ready_sha256) {
                (ImageState::Ready, Some(sha)) => {
                    let (cache, sha2, size) = (self.cache.clone(), sha.clone(), img.size);
                    let r = tokio::task::spawn_blocking(move || cache.reverify(&sha2, size)).await;
                    match r {
                        Ok(Ok(())) => self.make_ready(&key, sha.clone()).await,
                        other => {
                            let why = match other {
                                Ok(Err(e)) => e.to_string(),
                                _ => "verification task failed".into(),
                            };
                            error!(image = %key, error = %why, "cached image corrupted; fetching it again");
                            self.metrics.ota.error("cache_corrupt");
                            if let Some(i) = self.state.images.get_mut(&key) {
                                i.state = ImageState::Fetching;
                                i.ready_sha256 = None;
                                i.last_error = Some(format!("cache file corrupted: {why}"));
                            }
                            self.report(
                                "fetch",
                                json!({"image": key, "name": img.name, "version": img.version,
                                       "result": "cache_corrupt", "error": why}),
                            )
                            .await;
                            self.dirty = true;
                        }
                    }
                }
                (ImageState::Fetching, _) => {}
                _ => continue,
            }
        }
        let need = self.state.needed_images();
        for key in need {
            if self.state.images.get(&key).map(|i| i.state) == Some(ImageState::Fetching) {
                self.ensure_fetch(&key).await;
            }
        }
        self.update_gauges();
        info!(
            images = self.state.images.len(),
            rollouts = self.state.rollouts.len(),
            devices = self.state.devices.len(),
            "OTA manager ready"
        );
    }

    async fn make_ready(&mut self, key: &str, sha: String) {
        let Some(img) = self.state.images.get_mut(key) else {
            return;
        };
        let path = self.cache.bin(&sha);
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                error!(image = %key, error = %e, "cannot open a verified image");
                img.state = ImageState::Failed;
                img.last_error = Some(e.to_string());
                return;
            }
        };
        img.state = ImageState::Ready;
        img.ready_sha256 = Some(sha.clone());
        img.last_error = None;
        let ready = Arc::new(ReadyImage {
            sha256: sha.clone(),
            name: img.name.clone(),
            version: img.version.clone(),
            size: img.size,
            path,
            file,
        });
        self.catalog
            .by_name
            .insert(format!("{}/{}", img.name, img.version), sha.clone());
        self.catalog.by_sha.insert(sha, ready);
        self.catalog_tx.send_replace(Arc::new(self.catalog.clone()));
        self.dirty = true;
        // Devices that asked while it was being fetched get their metadata now.
        let waiting: Vec<String> = self
            .state
            .devices
            .iter()
            .filter(|(_, d)| d.state == "waiting")
            .map(|(id, _)| id.clone())
            .collect();
        for dev in waiting {
            let r = self.assignment(&dev).map(|r| r.image.clone());
            if r.as_deref() == Some(key) {
                self.send_metadata(&dev).await;
            }
        }
    }

    // ---- persistence and housekeeping -------------------------------------------------

    async fn persist(&mut self) {
        let bytes = self.state.encode();
        let cache = self.cache.clone();
        match tokio::task::spawn_blocking(move || cache.write_atomic(STATE_FILE, &bytes)).await {
            Ok(Ok(())) => self.dirty = false,
            Ok(Err(e)) => warn!(error = %e, "cannot save the OTA state"),
            Err(_) => {}
        }
    }

    async fn tick(&mut self) {
        self.slots.expire();
        self.update_gauges();
        if self.dirty {
            self.persist().await;
        }
    }

    fn update_gauges(&self) {
        let o = &self.metrics.ota;
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

    fn answer(&self, q: &Query) -> Option<serde_json::Value> {
        match q {
            Query::All => Some(self.state.all_json()),
            Query::Device(d) => self.state.device_json(d),
            Query::Rollout(r) => self.state.rollout_json(r),
        }
    }

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
        self.dirty = true;
        let d = self.state.devices.entry(dev.to_string()).or_default();
        d.updated_ms = now_ms();
        d
    }

    // ---- inbound ----------------------------------------------------------------------

    async fn inbound(&mut self, msg: Inbound) {
        let Inbound { topic, payload } = msg;
        if topic == CMD_UPGRADE {
            return self.upgrade(&payload).await;
        }
        if topic == CMD_STATUS {
            return self.status_query(&payload).await;
        }
        if let Some(rest) = topic.strip_prefix(CMD_IMAGE) {
            return self.pushed_chunk(rest, &payload).await;
        }
        let Some((dev, kind)) = parse_device_topic(&self.cfg.prefix, &topic) else {
            return;
        };
        let dev = dev.to_string();
        match kind {
            DeviceTopic::Request => self.request(&dev, &payload).await,
            DeviceTopic::ChunkGet => self.chunk_get(&dev, &payload).await,
            DeviceTopic::Progress => self.progress(&dev, &payload).await,
            DeviceTopic::Verify => self.verify(&dev, &payload).await,
        }
    }

    async fn upgrade(&mut self, payload: &[u8]) {
        let u = match Upgrade::parse(payload) {
            Ok(u) => u,
            Err(e) => {
                warn!(error = %e, "ota_upgrade refused");
                self.metrics.ota.error(e.code());
                let t = self.topic(GATEWAY_LEVEL, "error");
                let reply = ErrorReply {
                    code: e.code().into(),
                    reason: e.to_string(),
                    request: CMD_UPGRADE.into(),
                    index: None,
                    retry_after: None,
                    position: None,
                };
                self.publish(t, serde_json::to_vec(&reply).unwrap_or_default())
                    .await;
                return;
            }
        };
        let key = u.image_key();
        let rid = u.rollout_id();
        let target = match u.target() {
            Ok(t) => t,
            Err(_) => return, // checked by parse
        };
        let img = self
            .state
            .images
            .entry(key.clone())
            .or_insert_with(|| Image {
                name: u.name.clone(),
                version: u.version.clone(),
                size: u.size,
                sha256: u.sha256.clone(),
                md5: u.md5.clone(),
                url: u.url.clone(),
                push_chunk_size: u.chunk_size,
                state: ImageState::Fetching,
                ready_sha256: None,
                last_used_ms: now_ms(),
                fetches: 0,
                last_error: None,
            });
        // A new command may bring a new source for an image that failed or was evicted.
        if img.state != ImageState::Ready {
            img.url = u.url.clone();
            img.push_chunk_size = u.chunk_size;
            if img.state != ImageState::Fetching {
                img.state = ImageState::Fetching;
            }
        }
        img.last_used_ms = now_ms();
        self.state.rollouts.insert(
            rid.clone(),
            Rollout {
                id: rid.clone(),
                image: key.clone(),
                target: target.clone(),
                created_ms: now_ms(),
            },
        );
        let devices: Vec<String> = match &target {
            Target::Devices(l) => l.clone(),
            Target::Tag(t) => {
                let mut v: BTreeSet<String> = self
                    .cfg
                    .devices
                    .iter()
                    .filter(|(_, d)| d.tags.contains(t))
                    .map(|(id, _)| id.clone())
                    .collect();
                v.extend(
                    self.state
                        .devices
                        .iter()
                        .filter(|(_, d)| d.tags.contains(t))
                        .map(|(id, _)| id.clone()),
                );
                v.into_iter().collect()
            }
        };
        for dev in &devices {
            let d = self.device_mut(dev);
            if d.rollout.as_deref() != Some(rid.as_str()) {
                d.rollout = Some(rid.clone());
                d.state = "assigned".into();
                d.received = 0;
                d.total = u.size;
                d.error = None;
                d.served_mqtt = 0;
                d.served_http = 0;
                // Its old rollout ended for it: so does the slot it held for that download.
                self.slots.release(dev);
            }
        }
        info!(rollout = %rid, image = %key, name = %u.name, version = %u.version, devices = devices.len(), "rollout accepted");
        self.report(
            "rollout",
            json!({"rollout": rid, "image": key, "name": u.name, "version": u.version,
                   "state": "accepted", "devices": devices}),
        )
        .await;
        self.persist().await;
        self.ensure_fetch(&key).await;
    }

    async fn status_query(&mut self, payload: &[u8]) {
        let v = match StatusQuery::parse(payload) {
            Ok(q) => {
                let mut v = match (&q.device, &q.rollout) {
                    (Some(d), _) => self
                        .state
                        .device_json(d)
                        .unwrap_or_else(|| json!({"device": d, "error": "unknown device"})),
                    (None, Some(r)) => self
                        .state
                        .rollout_json(r)
                        .unwrap_or_else(|| json!({"rollout": r, "error": "unknown rollout"})),
                    (None, None) => self.state.all_json(),
                };
                if let (Some(id), Some(o)) = (q.id, v.as_object_mut()) {
                    o.insert("id".into(), id);
                }
                v
            }
            Err(e) => {
                self.metrics.ota.error(e.code());
                json!({"error": e.to_string(), "code": e.code()})
            }
        };
        self.report("status", v).await;
    }

    async fn request(&mut self, dev: &str, payload: &[u8]) {
        let r = match Request::parse(payload) {
            Ok(r) => r,
            Err(e) => {
                return self
                    .reply_error(dev, "request", e.code(), e.to_string(), None)
                    .await
            }
        };
        if !r.tags.is_empty() || r.version.is_some() {
            let d = self.device_mut(dev);
            for t in r.tags {
                if !d.tags.contains(&t) {
                    d.tags.push(t);
                }
            }
            if r.version.is_some() {
                d.version = r.version;
            }
        }
        let Some(rollout) = self.assignment(dev).cloned() else {
            return self
                .reply_error(
                    dev,
                    "request",
                    "not_assigned",
                    format!("no update is assigned to device {dev}"),
                    None,
                )
                .await;
        };
        let img_state = self
            .state
            .images
            .get(&rollout.image)
            .map(|i| (i.state, i.size));
        let d = self.device_mut(dev);
        if d.rollout.as_deref() != Some(rollout.id.as_str()) {
            d.rollout = Some(rollout.id.clone());
            d.state = "assigned".into();
            d.received = 0;
            d.served_mqtt = 0;
            d.served_http = 0;
            self.slots.release(dev);
        }
        match img_state {
            Some((ImageState::Ready, _)) => self.send_metadata(dev).await,
            // Given up after ota.fetch_attempts: only the cloud's new command fetches again.
            Some((ImageState::Failed, _)) => {
                let why = self
                    .state
                    .images
                    .get(&rollout.image)
                    .and_then(|i| i.last_error.clone())
                    .unwrap_or_default();
                self.reply_error(
                    dev,
                    "request",
                    "fetch_failed",
                    format!(
                        "the gateway could not fetch the image and will not try again until the cloud issues rollout {} again: {why}",
                        rollout.id
                    ),
                    None,
                )
                .await;
            }
            Some((st, size)) => {
                let d = self.device_mut(dev);
                d.state = "waiting".into();
                d.total = size;
                if st != ImageState::Fetching {
                    if let Some(i) = self.state.images.get_mut(&rollout.image) {
                        i.state = ImageState::Fetching;
                    }
                }
                self.ensure_fetch(&rollout.image).await;
            }
            None => {}
        }
    }

    async fn send_metadata(&mut self, dev: &str) {
        let Some(r) = self.assignment(dev).cloned() else {
            return;
        };
        let Some(img) = self.state.images.get_mut(&r.image) else {
            return;
        };
        let Some(sha) = img.ready_sha256.clone() else {
            return;
        };
        img.last_used_ms = now_ms();
        let chunk = self.cfg.chunk_size as u64;
        let md = Metadata {
            name: img.name.clone(),
            version: img.version.clone(),
            size: img.size,
            sha256: sha.clone(),
            chunk_size: chunk,
            chunks: chunks_of(img.size, chunk),
            // The device id lets the gateway count what it downloads over HTTP.
            url: format!(
                "{}/ota/image/{sha}?device={}",
                self.base_url,
                protocol::encode_query_value(dev)
            ),
            rollout: r.id.clone(),
        };
        let size = img.size;
        let d = self.device_mut(dev);
        if d.state == "waiting" || d.state.is_empty() {
            d.state = "assigned".into();
        }
        d.total = size;
        let mut v = serde_json::to_value(&md).unwrap_or_default();
        // Where the device last confirmed it was: a device that lost its place resumes here.
        // Only confirmed bytes count (not chunks served, which may never have been stored),
        // so the hint cannot run ahead of the device, whatever a restart lost.
        let received = d.received.min(size);
        if let Some(o) = v.as_object_mut() {
            o.insert("received".into(), json!(received));
            o.insert("next_chunk".into(), json!(received / chunk.max(1)));
        }
        let t = self.topic(dev, "metadata");
        self.publish_json(t, v).await;
    }

    /// The assigned, ready image for a device request naming `version`, or the error reply.
    fn ready_for(
        &self,
        dev: &str,
        version: &str,
    ) -> Result<Arc<ReadyImage>, (&'static str, String)> {
        let r = self.assignment(dev).ok_or((
            "not_assigned",
            format!("no update is assigned to device {dev}"),
        ))?;
        let img = self
            .state
            .images
            .get(&r.image)
            .ok_or(("not_assigned", format!("rollout {} has no image", r.id)))?;
        if img.version != version {
            return Err((
                "unknown_version",
                format!(
                    "version {version:?} is not assigned to {dev}; the assigned version is {:?}",
                    img.version
                ),
            ));
        }
        img.ready_sha256
            .as_ref()
            .and_then(|s| self.catalog.by_sha.get(s))
            .cloned()
            .ok_or((
                "not_ready",
                "the image is still being fetched; metadata follows".into(),
            ))
    }

    async fn chunk_get(&mut self, dev: &str, payload: &[u8]) {
        let g = match ChunkGet::parse(payload) {
            Ok(g) => g,
            Err(e) => {
                return self
                    .reply_error(dev, "chunk/get", e.code(), e.to_string(), None)
                    .await
            }
        };
        let idx = match g.indexes() {
            Ok(i) => i,
            Err(e) => {
                return self
                    .reply_error(dev, "chunk/get", e.code(), e.to_string(), None)
                    .await
            }
        };
        let img = match self.ready_for(dev, &g.version) {
            Ok(i) => i,
            Err((code, why)) => return self.reply_error(dev, "chunk/get", code, why, None).await,
        };
        // The device keeps its slot across its requests; without one it waits its turn.
        if let Err(w) = self.slots.for_device(dev, img.size) {
            let why = match w.position {
                Some(p) => format!(
                    "all {} download slots are taken (ota.max_concurrent_downloads); you are number {p} in line: ask again in {} s",
                    self.cfg.max_concurrent_downloads, w.retry_after
                ),
                None => format!("ask again in {} s", w.retry_after),
            };
            return self.reply_busy(dev, w, why, None).await;
        }
        let chunk = self.cfg.chunk_size as u64;
        let total = chunks_of(img.size, chunk);
        let mut queued = false;
        for i in idx {
            self.metrics.ota.chunk_requests.inc();
            if i >= total {
                let why = format!(
                    "chunk {i} does not exist; the image has {total} chunks (0..={})",
                    total.saturating_sub(1)
                );
                self.reply_error(dev, "chunk/get", "out_of_range", why, Some(i))
                    .await;
                continue;
            }
            let offset = i * chunk;
            let len = chunk.min(img.size - offset) as usize;
            let job = ChunkJob {
                device: dev.to_string(),
                topic: self.topic(dev, &format!("chunk/{i}")),
                image: img.clone(),
                offset,
                len,
                queued: Instant::now(),
            };
            if self.jobs.try_send(job).is_err() {
                // The device keeps its slot; only this request is refused.
                let w = serve::Wait {
                    why: serve::Busy::All,
                    retry_after: serve::RETRY_AFTER_MIN,
                    position: None,
                };
                let why =
                    "the chunk queue is full; ask again for this chunk and the rest in a second"
                        .to_string();
                self.reply_busy(dev, w, why, Some(i)).await;
                break;
            }
            queued = true;
        }
        if queued {
            if let Some(i) = self.state.images.get_mut(
                &self
                    .assignment(dev)
                    .map(|r| r.image.clone())
                    .unwrap_or_default(),
            ) {
                i.last_used_ms = now_ms();
            }
            let d = self.device_mut(dev);
            if matches!(d.state.as_str(), "assigned" | "waiting" | "retry" | "") {
                d.state = "downloading".into();
            }
        }
    }

    async fn progress(&mut self, dev: &str, payload: &[u8]) {
        let p = match Progress::parse(payload) {
            Ok(p) => p,
            Err(e) => {
                return self
                    .reply_error(dev, "progress", e.code(), e.to_string(), None)
                    .await
            }
        };
        if self.assignment(dev).is_none() {
            return self
                .reply_error(
                    dev,
                    "progress",
                    "not_assigned",
                    format!("no update is assigned to device {dev}"),
                    None,
                )
                .await;
        }
        let finished = matches!(p.state.as_str(), "done" | "failed");
        let d = self.device_mut(dev);
        d.state = p.state;
        if let Some(r) = p.received {
            d.received = r;
        }
        if let Some(t) = p.total {
            d.total = t;
        }
        if p.version.is_some() {
            d.version = p.version;
        }
        d.error = p.error;
        if finished {
            self.slots.release(dev);
        }
    }

    async fn verify(&mut self, dev: &str, payload: &[u8]) {
        let v = match Verify::parse(payload) {
            Ok(v) => v,
            Err(e) => {
                return self
                    .reply_error(dev, "verify", e.code(), e.to_string(), None)
                    .await
            }
        };
        let img = match self.ready_for(dev, &v.version) {
            Ok(i) => i,
            Err((code, why)) => return self.reply_error(dev, "verify", code, why, None).await,
        };
        self.slots.release(dev);
        let ok = v.sha256.eq_ignore_ascii_case(&img.sha256);
        let d = self.device_mut(dev);
        if ok {
            d.state = "verified".into();
            d.received = img.size;
            d.error = None;
            let t = self.topic(dev, "success");
            self.publish_json(t, json!({"version": v.version, "sha256": img.sha256}))
                .await;
        } else {
            d.state = "retry".into();
            d.error = Some("sha256 mismatch".into());
            d.received = 0;
            self.metrics.ota.error("verify_mismatch");
            let t = self.topic(dev, "retry");
            self.publish_json(
                t,
                json!({"version": v.version, "code": "sha256_mismatch",
                       "reason": format!("the image's sha256 is {}, the device assembled {}; download it again", img.sha256, v.sha256),
                       "sha256": img.sha256}),
            )
            .await;
        }
    }

    // ---- fetching ---------------------------------------------------------------------

    /// Evicts least-recently-used images no active rollout needs until `need` more bytes
    /// fit. False if they cannot.
    fn make_room(&mut self, key: &str, need: u64) -> bool {
        let needed = self.state.needed_images();
        let ready: Vec<(String, u64, u64)> = self
            .state
            .images
            .iter()
            .filter(|(_, i)| i.state == ImageState::Ready)
            .map(|(k, i)| (k.clone(), i.size, i.last_used_ms))
            .collect();
        let used: u64 = ready.iter().map(|r| r.1).sum();
        let candidates: Vec<_> = ready
            .into_iter()
            .filter(|(k, _, _)| k != key && !needed.contains(k))
            .collect();
        let Some(evict) = cache::plan_eviction(&candidates, used, need, self.cfg.cache_max_bytes)
        else {
            return false;
        };
        for k in evict {
            if let Some(i) = self.state.images.get_mut(&k) {
                if let Some(sha) = i.ready_sha256.take() {
                    info!(image = %k, "evicting a cached image no rollout needs");
                    self.cache.remove(&sha);
                    self.catalog.by_sha.remove(&sha);
                    self.catalog
                        .by_name
                        .remove(&format!("{}/{}", i.name, i.version));
                }
                i.state = ImageState::Evicted;
            }
        }
        self.catalog_tx.send_replace(Arc::new(self.catalog.clone()));
        self.dirty = true;
        true
    }

    async fn ensure_fetch(&mut self, key: &str) {
        let Some(img) = self.state.images.get(key).cloned() else {
            return;
        };
        if img.state == ImageState::Ready || self.fetching.contains(key) {
            return;
        }
        if !self.make_room(key, img.size) {
            let why = format!(
                "the image ({} bytes) does not fit ota.cache_max_bytes ({}) next to images active rollouts need",
                img.size, self.cfg.cache_max_bytes
            );
            error!(image = %key, "{why}");
            self.fetch_failed(key, why).await;
            return;
        }
        let Some(url) = img.url.clone() else {
            // Pushed by the cloud: chunks arrive on cmd/ota/image/<key>/<index>.
            return;
        };
        let url = match fetch::Url::parse(&url) {
            Ok(u) => u,
            Err(e) => return self.fetch_failed(key, e.to_string()).await,
        };
        let tls = match fetch::tls_config(&self.ca_file) {
            Ok(t) => t,
            Err(e) => return self.fetch_failed(key, e.to_string()).await,
        };
        self.fetching.insert(key.to_string());
        let job = FetchJob {
            key: key.to_string(),
            url,
            tls,
            expect: Expect {
                size: img.size,
                sha256: img.sha256.clone(),
                md5: img.md5.clone(),
            },
            cache: self.cache.clone(),
            timeout: self.cfg.fetch_timeout,
            attempts: self.cfg.fetch_attempts,
            progress_every: self.cfg.progress_interval,
            metrics: self.metrics.clone(),
            tx: self.fetch_tx.clone(),
        };
        info!(image = %key, "fetching image");
        self.fetches.spawn(job.run());
    }

    async fn fetch_failed(&mut self, key: &str, why: String) {
        self.metrics.ota.fetch("failed");
        self.fetching.remove(key);
        let (name, version) = match self.state.images.get_mut(key) {
            Some(i) => {
                i.state = ImageState::Failed;
                i.last_error = Some(why.clone());
                (i.name.clone(), i.version.clone())
            }
            None => return,
        };
        self.dirty = true;
        self.report(
            "fetch",
            json!({"image": key, "name": name, "version": version, "result": "failed", "error": why}),
        )
        .await;
        let waiting: Vec<String> = self
            .state
            .devices
            .iter()
            .filter(|(_, d)| d.state == "waiting")
            .map(|(id, _)| id.clone())
            .collect();
        for dev in waiting {
            if self.assignment(&dev).map(|r| r.image.as_str()) == Some(key) {
                self.reply_error(
                    &dev,
                    "request",
                    "fetch_failed",
                    format!("the gateway could not fetch the image: {why}"),
                    None,
                )
                .await;
            }
        }
    }

    /// Counts bytes served to a device, if that device is assigned that image (the HTTP
    /// path's device id comes from the client).
    fn served(&mut self, s: Served) {
        let assigned = self
            .assignment(&s.device)
            .and_then(|r| self.state.images.get(&r.image))
            .and_then(|i| i.ready_sha256.as_deref())
            == Some(s.sha256.as_str());
        if !assigned || !self.state.devices.contains_key(&s.device) {
            debug!(device = %s.device, "served bytes for a device not assigned that image; not counted per device");
            return;
        }
        let d = self.device_mut(&s.device);
        match s.via {
            Via::Mqtt => d.served_mqtt += s.bytes,
            Via::Http => d.served_http += s.bytes,
        }
        self.served_moved.insert(s.device);
    }

    /// One `served` report per device whose served bytes moved since the last one.
    async fn report_served(&mut self) {
        for dev in std::mem::take(&mut self.served_moved) {
            let Some(d) = self.state.devices.get(&dev) else {
                continue;
            };
            let image = d
                .rollout
                .as_ref()
                .and_then(|r| self.state.rollouts.get(r))
                .map(|r| r.image.clone());
            let v = json!({"device": dev, "rollout": d.rollout, "image": image,
                           "served": d.served_mqtt + d.served_http, "mqtt": d.served_mqtt,
                           "http": d.served_http, "total": d.total});
            self.report("served", v).await;
        }
    }

    async fn fetch_msg(&mut self, f: FetchMsg) {
        match f {
            FetchMsg::Progress {
                key,
                attempt,
                received,
                bytes_per_sec,
            } => {
                let Some(i) = self.state.images.get(&key) else {
                    return;
                };
                let v = json!({"image": key, "name": i.name, "version": i.version,
                               "attempt": attempt, "received": received, "total": i.size,
                               "bytes_per_sec": bytes_per_sec});
                self.report("fetch_progress", v).await;
            }
            FetchMsg::Attempt { key, result, error } => {
                let (name, version) = self
                    .state
                    .images
                    .get_mut(&key)
                    .map(|i| {
                        i.last_error = Some(error.clone());
                        (i.name.clone(), i.version.clone())
                    })
                    .unwrap_or_default();
                self.report(
                    "fetch",
                    json!({"image": key, "name": name, "version": version, "result": result, "error": error}),
                )
                .await;
            }
            FetchMsg::Done {
                key,
                result: Err(why),
            } => self.fetch_failed(&key, why).await,
            FetchMsg::Done { key, result: Ok(d) } => {
                self.fetching.remove(&key);
                self.pushed.remove(&key);
                let (name, version) = match self.state.images.get_mut(&key) {
                    Some(i) => {
                        i.fetches += 1;
                        (i.name.clone(), i.version.clone())
                    }
                    None => return,
                };
                info!(image = %key, sha256 = %d.sha256, size = d.size, "image verified and cached");
                self.make_ready(&key, d.sha256.clone()).await;
                self.report(
                    "fetch",
                    json!({"image": key, "name": name, "version": version, "result": "ok",
                           "sha256": d.sha256, "size": d.size}),
                )
                .await;
                self.persist().await;
                self.update_gauges();
            }
        }
    }

    async fn pushed_chunk(&mut self, rest: &str, data: &[u8]) {
        let Some((key, idx)) = rest.rsplit_once('/') else {
            return;
        };
        let bad = |m: &Metrics| m.ota.error("push_invalid");
        let Ok(idx) = idx.parse::<u64>() else {
            return bad(&self.metrics);
        };
        let Some(img) = self.state.images.get(key).cloned() else {
            warn!(image = %key, "pushed chunk for an image no rollout announced; ignored");
            return bad(&self.metrics);
        };
        let Some(cs) = img.push_chunk_size else {
            return bad(&self.metrics);
        };
        if img.state != ImageState::Fetching || img.url.is_some() {
            return;
        }
        let total = chunks_of(img.size, cs);
        let off = idx * cs;
        let want = if idx + 1 == total { img.size - off } else { cs };
        if idx >= total || data.len() as u64 != want {
            warn!(image = %key, index = idx, len = data.len(), "pushed chunk out of range or of the wrong size");
            return bad(&self.metrics);
        }
        let (cache, k, bytes) = (self.cache.clone(), key.to_string(), data.to_vec());
        match tokio::task::spawn_blocking(move || cache.write_part_at(&k, off, &bytes)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(error = %e, "cannot store a pushed chunk");
                return self.metrics.ota.error("push_io");
            }
            Err(_) => return,
        }
        self.metrics.ota.fetch_bytes.inc_by(data.len() as u64);
        let got = self.pushed.entry(key.to_string()).or_default();
        got.insert(idx);
        if got.len() as u64 == total && !self.fetching.contains(key) {
            self.fetching.insert(key.to_string());
            let expect = Expect {
                size: img.size,
                sha256: img.sha256.clone(),
                md5: img.md5.clone(),
            };
            let (cache, k, tx, metrics) = (
                self.cache.clone(),
                key.to_string(),
                self.fetch_tx.clone(),
                self.metrics.clone(),
            );
            self.fetches.spawn(async move {
                let k2 = k.clone();
                let r = tokio::task::spawn_blocking(move || cache.install(&k2, &expect)).await;
                let result = match r {
                    Ok(Ok(d)) => {
                        metrics.ota.fetch("ok");
                        Ok(d)
                    }
                    Ok(Err(e)) => {
                        metrics.ota.fetch("hash_mismatch");
                        Err(format!("pushed image: {e}; the cloud must push it again"))
                    }
                    Err(e) => Err(e.to_string()),
                };
                let _ = tx.send(FetchMsg::Done { key: k, result }).await;
            });
        }
    }
}

/// One image download with its retries; runs as a task of the manager's `JoinSet`.
struct FetchJob {
    key: String,
    url: fetch::Url,
    tls: Arc<rustls::ClientConfig>,
    expect: Expect,
    cache: Cache,
    timeout: Duration,
    attempts: u32,
    progress_every: Duration,
    metrics: Arc<Metrics>,
    tx: mpsc::Sender<FetchMsg>,
}

impl FetchJob {
    /// Runs one attempt's download `dl`, reporting progress every `progress_every` while it
    /// runs; `moved` counts the bytes it received.
    async fn with_progress<T>(
        &self,
        attempt: u32,
        moved: &std::sync::atomic::AtomicU64,
        dl: impl std::future::Future<Output = T>,
    ) -> T {
        use std::sync::atomic::Ordering::Relaxed;
        tokio::pin!(dl);
        let every = self.progress_every;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut at, mut before) = (Instant::now(), 0u64);
        let part = self.cache.part(&self.key);
        loop {
            tokio::select! {
                r = &mut dl => return r,
                _ = tick.tick() => {
                    let now = Instant::now();
                    let m = moved.load(Relaxed);
                    let secs = now.duration_since(at).as_secs_f64().max(1e-3);
                    let bytes_per_sec = ((m - before) as f64 / secs) as u64;
                    (at, before) = (now, m);
                    // What is in the partial file: resumed bytes included.
                    let received = tokio::fs::metadata(&part).await.map(|x| x.len()).unwrap_or(0);
                    let _ = self.tx.try_send(FetchMsg::Progress {
                        key: self.key.clone(),
                        attempt,
                        received,
                        bytes_per_sec,
                    });
                }
            }
        }
    }

    async fn run(self) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        let mut last = String::new();
        for attempt in 1..=self.attempts {
            let part = self.cache.part(&self.key);
            let have = self.cache.part_len(&self.key);
            let downloaded = if have == self.expect.size {
                Ok(())
            } else {
                let m = self.metrics.clone();
                let moved = std::sync::atomic::AtomicU64::new(0);
                let dl = fetch::download(
                    &self.url,
                    self.tls.clone(),
                    &part,
                    self.expect.size,
                    self.timeout,
                    |n| {
                        m.ota.fetch_bytes.inc_by(n);
                        moved.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    },
                );
                self.with_progress(attempt, &moved, dl).await.map(|_| ())
            };
            let (result, why) = match downloaded {
                Ok(()) => {
                    let (cache, key, expect) =
                        (self.cache.clone(), self.key.clone(), self.expect.clone());
                    match tokio::task::spawn_blocking(move || cache.install(&key, &expect)).await {
                        Ok(Ok(d)) => {
                            self.metrics.ota.fetch("ok");
                            let _ = self
                                .tx
                                .send(FetchMsg::Done {
                                    key: self.key.clone(),
                                    result: Ok(d),
                                })
                                .await;
                            return;
                        }
                        Ok(Err(e @ CacheError::Mismatch(_))) => ("hash_mismatch", e.to_string()),
                        Ok(Err(e)) => ("error", e.to_string()),
                        Err(e) => ("error", e.to_string()),
                    }
                }
                Err(e) => ("error", e.to_string()),
            };
            warn!(image = %self.key, attempt, result, error = %why, "image download attempt failed");
            self.metrics.ota.fetch(result);
            let _ = self
                .tx
                .send(FetchMsg::Attempt {
                    key: self.key.clone(),
                    result,
                    error: format!("attempt {attempt}: {why}"),
                })
                .await;
            last = why;
            if attempt < self.attempts {
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
        let _ = self
            .tx
            .send(FetchMsg::Done {
                key: self.key.clone(),
                result: Err(format!("{} attempts failed; last: {last}", self.attempts)),
            })
            .await;
    }
}
