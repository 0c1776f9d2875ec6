//! Firmware updates: fetch an image once from the cloud, verify it, serve it to many devices.
//!
//! The wiring of the OTA component: its error, the handle the HTTP server holds, and the
//! parts, each in its own file:
//! - [`manager`]: the decisions, without I/O (inputs: device messages, cloud commands, fetch
//!   events, served bytes, ticks; outputs: publishes, chunk jobs, fetch starts, saves), with
//!   rollouts, the image lifecycle and device handling in their own files;
//! - [`driver`]: the task that owns the links, the fetch tasks, the state file and the timer,
//!   and carries out what the manager decides ([`Ota::build`], [`Ota::start`]);
//! - [`serve`] (MQTT chunks, download slots, pacing) and [`http`] (the image and status
//!   routes of the operator endpoint): serving verified images;
//! - [`fetch`] (HTTPS download), [`cache`] (files on disk), [`state`] (what survives a
//!   restart), [`protocol`] (wire formats), [`contract`] (the topics and sizes the rest of the
//!   gateway must know: ACL entries, uplink exclusions, packet sizes).
//!
//! The task talks to the embedded broker through two in-process links (like the Modbus and
//! serial sources): one for requests, commands and small replies, one for the chunk-serving
//! task ([`serve`]). Everything it publishes on an uplinked topic (device replies,
//! `<prefix>/_gateway/...` reports) reaches the cloud through the uplink tap and the durable
//! queue, never directly.
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
//! chunk bytes and chunk requests never reach the cloud. Devices may not publish the
//! gateway's answers (see [`contract`]).
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
pub mod config;
pub mod contract;
pub mod driver;
pub mod fetch;
pub mod http;
pub mod manager;
pub mod metrics;
pub mod protocol;
pub mod serve;
pub mod state;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::broker::BrokerError;
use cache::CacheError;
use serve::{Catalog, Pacer, Served, ServedTally, Slots};

pub use contract::uplink_exclude;
pub use driver::Ota;

/// Local topic of the `ota_upgrade` command (cloud: `fieldgate/<gw>/cmd/ota/upgrade`).
pub const CMD_UPGRADE: &str = "cmd/ota/upgrade";
/// Local topic of the status query (cloud: `fieldgate/<gw>/cmd/ota/status`).
pub const CMD_STATUS: &str = "cmd/ota/status";
/// Local topic prefix of MQTT-pushed image chunks: `cmd/ota/image/<key>/<index>`.
pub const CMD_IMAGE: &str = "cmd/ota/image/";
/// The gateway's own id level under the prefix.
pub const GATEWAY_LEVEL: &str = "_gateway";

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
    /// OTA's metric families (HTTP image requests are counted there too).
    pub metrics: Arc<metrics::OtaMetrics>,
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
