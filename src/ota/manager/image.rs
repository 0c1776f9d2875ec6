//! The image lifecycle: fetch (HTTPS) or push (MQTT), verified and ready, failed, evicted.
//!
//! Owns the per-image state machine of [`super::super::state::ImageState`] as the manager
//! drives it (the diagram is in the `ota` module header), the set of images being fetched,
//! the pushed chunks received so far, and the [`super::super::serve::Catalog`] the HTTP and
//! MQTT paths serve from.
//!
//! Invariants:
//! - one download or install per image at a time (`fetching`); a `Ready` image is never
//!   fetched;
//! - an image enters the catalog only with a file the driver verified and opened, and leaves
//!   it when evicted (the [`super::Out::Catalog`] follows every change, before the metadata
//!   that names it);
//! - eviction takes least recently used `Ready` images that no active rollout needs, and only
//!   as many as the new image needs; when even that is not enough the image fails to fetch;
//! - a failed fetch answers `fetch_failed` to every device waiting for that image, and
//!   nothing but a new cloud command fetches it again;
//! - a pushed chunk counts only once it is written, and only chunks of the right index and
//!   size for an image announced as pushed and still fetching.

use std::sync::Arc;

use serde_json::json;
use tracing::{error, info, warn};

use super::super::cache::{self, Expect, Opened};
use super::super::fetch;
use super::super::serve::ReadyImage;
use super::super::state::ImageState;
use super::{chunks_of, FetchEvent, Manager, Out};

impl Manager {
    /// `key` is verified as `<sha>.bin` and `opened` by the driver: serve it, and send the
    /// metadata to the devices that waited for it. A file that could not be opened leaves
    /// the image `Failed`.
    pub(super) fn make_ready(&mut self, key: &str, sha: String, opened: Opened) {
        let Some(img) = self.state.images.get_mut(key) else {
            return;
        };
        let Opened { path, file } = opened;
        let file = match file {
            Ok(f) => f,
            Err(e) => {
                error!(image = %key, error = %e, "cannot open a verified image");
                img.state = ImageState::Failed;
                img.last_error = Some(e);
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
        self.publish_catalog();
        self.mark_dirty();
        // Devices that asked while it was being fetched get their metadata now.
        for dev in self.waiting_devices() {
            let r = self.assignment(&dev).map(|r| r.image.clone());
            if r.as_deref() == Some(key) {
                self.send_metadata(&dev);
            }
        }
    }

    /// Evicts least-recently-used images no active rollout needs until `need` more bytes
    /// fit. False if they cannot.
    pub(super) fn make_room(&mut self, key: &str, need: u64) -> bool {
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
        let changed = !evict.is_empty();
        for k in evict {
            if let Some(i) = self.state.images.get_mut(&k) {
                if let Some(sha) = i.ready_sha256.take() {
                    info!(image = %k, "evicting a cached image no rollout needs");
                    self.out.push(Out::Evict {
                        sha256: sha.clone(),
                    });
                    self.catalog.by_sha.remove(&sha);
                    self.catalog
                        .by_name
                        .remove(&format!("{}/{}", i.name, i.version));
                }
                i.state = ImageState::Evicted;
            }
        }
        // (An unchanged catalog is not sent again: the HTTP side only reads it.)
        if changed {
            self.publish_catalog();
        }
        self.mark_dirty();
        true
    }

    /// Starts the download of `key` unless it is ready or under way (a pushed image waits
    /// for its chunks).
    pub(super) fn ensure_fetch(&mut self, key: &str) {
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
            self.fetch_failed(key, why);
            return;
        }
        let Some(url) = img.url.clone() else {
            // Pushed by the cloud: chunks arrive on cmd/ota/image/<key>/<index>.
            return;
        };
        let url = match fetch::Url::parse(&url) {
            Ok(u) => u,
            Err(e) => return self.fetch_failed(key, e.to_string()),
        };
        self.fetching.insert(key.to_string());
        info!(image = %key, "fetching image");
        self.out.push(Out::StartFetch {
            key: key.to_string(),
            url,
            expect: Expect {
                size: img.size,
                sha256: img.sha256.clone(),
                md5: img.md5.clone(),
            },
        });
    }

    pub(super) fn fetch_failed(&mut self, key: &str, why: String) {
        self.metrics.fetch("failed");
        self.fetching.remove(key);
        self.received.remove(key);
        let (name, version) = match self.state.images.get_mut(key) {
            Some(i) => {
                i.state = ImageState::Failed;
                i.last_error = Some(why.clone());
                (i.name.clone(), i.version.clone())
            }
            None => return,
        };
        self.mark_dirty();
        self.report(
            "fetch",
            json!({"image": key, "name": name, "version": version, "result": "failed", "error": why}),
        );
        for dev in self.waiting_devices() {
            if self.assignment(&dev).map(|r| r.image.as_str()) == Some(key) {
                self.reply_error(
                    &dev,
                    "request",
                    "fetch_failed",
                    format!("the gateway could not fetch the image: {why}"),
                    None,
                );
            }
        }
    }

    pub(super) fn fetch_event(&mut self, f: FetchEvent) {
        match f {
            FetchEvent::Progress {
                key,
                attempt,
                received,
                bytes_per_sec,
            } => {
                let Some(i) = self.state.images.get(&key) else {
                    return;
                };
                self.received.insert(key.clone(), received);
                let v = json!({"image": key, "name": i.name, "version": i.version,
                               "attempt": attempt, "received": received, "total": i.size,
                               "bytes_per_sec": bytes_per_sec});
                self.report("fetch_progress", v);
            }
            FetchEvent::Attempt { key, result, error } => {
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
                );
            }
            FetchEvent::Done {
                key,
                result: Err(why),
            } => self.fetch_failed(&key, why),
            FetchEvent::Done {
                key,
                result: Ok(done),
            } => {
                self.fetching.remove(&key);
                self.pushed.remove(&key);
                self.received.remove(&key);
                let (name, version) = match self.state.images.get_mut(&key) {
                    Some(i) => {
                        i.fetches += 1;
                        (i.name.clone(), i.version.clone())
                    }
                    None => return,
                };
                let d = done.digests;
                info!(image = %key, sha256 = %d.sha256, size = d.size, "image verified and cached");
                self.make_ready(&key, d.sha256.clone(), done.opened);
                self.report(
                    "fetch",
                    json!({"image": key, "name": name, "version": version, "result": "ok",
                           "sha256": d.sha256, "size": d.size}),
                );
                self.persist();
                self.update_gauges();
            }
        }
    }

    /// `cmd/ota/image/<key>/<index>`: checked here, written by the driver.
    pub(super) fn pushed_chunk(&mut self, rest: &str, data: &[u8]) {
        let Some((key, idx)) = rest.rsplit_once('/') else {
            return;
        };
        let bad = |m: &crate::ota::metrics::OtaMetrics| m.error("push_invalid");
        let Ok(idx) = idx.parse::<u64>() else {
            return bad(&self.metrics);
        };
        let Some(img) = self.state.images.get(key) else {
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
        self.out.push(Out::WritePart {
            key: key.to_string(),
            index: idx,
            offset: off,
            data: data.to_vec(),
        });
    }

    /// A pushed chunk was written (or not); the last one starts the install.
    pub(super) fn part_written(
        &mut self,
        key: &str,
        idx: u64,
        len: u64,
        result: Result<(), String>,
    ) {
        if let Err(e) = result {
            warn!(error = %e, "cannot store a pushed chunk");
            return self.metrics.error("push_io");
        }
        self.metrics.fetch_bytes.inc_by(len);
        let Some(img) = self.state.images.get(key) else {
            return;
        };
        let Some(cs) = img.push_chunk_size else {
            return;
        };
        let total = chunks_of(img.size, cs);
        let got = self.pushed.entry(key.to_string()).or_default();
        got.insert(idx);
        if got.len() as u64 == total && !self.fetching.contains(key) {
            let expect = Expect {
                size: img.size,
                sha256: img.sha256.clone(),
                md5: img.md5.clone(),
            };
            self.fetching.insert(key.to_string());
            self.out.push(Out::InstallPushed {
                key: key.to_string(),
                expect,
            });
        }
    }
}
