//! Device requests: `request`, `chunk/get`, `progress`, `verify`, and the bytes served.
//!
//! Owns what each device is told and what is recorded of it: its assignment (the rollout it
//! has, or the newest one for one of its tags), its state (`assigned`, `waiting`,
//! `downloading`, ..., `verified`, `done`, `failed`, `retry`), the bytes it confirmed, the
//! bytes served to it by either path, and its download slot (taken with its first chunk
//! request, freed when it verifies, reports `done`/`failed`, or gets another rollout).
//!
//! Invariants:
//! - a device never causes a download: asking for an image that failed is answered
//!   `fetch_failed`; asking for one that is not ready leaves it `waiting` for the metadata,
//!   and only an evicted image (no fetch under way) is fetched again for it;
//! - the resume hint (`received`, `next_chunk`) is only what the device confirmed in its
//!   `progress`, never what was served to it;
//! - a device without a slot gets `busy` with `retry_after` (and its place in line), never a
//!   chunk; a device with one is never refused for want of one, only when the chunk queue is
//!   full (that request alone, and its later indexes);
//! - served bytes count for a device only while it is assigned the image they came from.

use std::sync::Arc;

use serde_json::json;
use tracing::debug;

use super::super::protocol::{ChunkGet, Metadata, Progress, Request, Verify};
use super::super::serve::{self, ChunkJob, ReadyImage, Served, Via};
use super::super::state::ImageState;
use super::{chunks_of, Manager, Out};

impl Manager {
    pub(super) fn request(&mut self, dev: &str, payload: &[u8]) {
        let r = match Request::parse(payload) {
            Ok(r) => r,
            Err(e) => return self.reply_error(dev, "request", e.code(), e.to_string(), None),
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
            return self.reply_error(
                dev,
                "request",
                "not_assigned",
                format!("no update is assigned to device {dev}"),
                None,
            );
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
            Some((ImageState::Ready, _)) => self.send_metadata(dev),
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
                );
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
                self.ensure_fetch(&rollout.image);
            }
            None => {}
        }
    }

    pub(super) fn send_metadata(&mut self, dev: &str) {
        let Some(r) = self.assignment(dev).cloned() else {
            return;
        };
        let now_ms = self.now.ms;
        let Some(img) = self.state.images.get_mut(&r.image) else {
            return;
        };
        let Some(sha) = img.ready_sha256.clone() else {
            return;
        };
        img.last_used_ms = now_ms;
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
                crate::form::encode_query_value(dev)
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
        self.publish_json(t, v);
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

    pub(super) fn chunk_get(&mut self, dev: &str, payload: &[u8]) {
        let g = match ChunkGet::parse(payload) {
            Ok(g) => g,
            Err(e) => return self.reply_error(dev, "chunk/get", e.code(), e.to_string(), None),
        };
        let idx = match g.indexes() {
            Ok(i) => i,
            Err(e) => return self.reply_error(dev, "chunk/get", e.code(), e.to_string(), None),
        };
        let img = match self.ready_for(dev, &g.version) {
            Ok(i) => i,
            Err((code, why)) => return self.reply_error(dev, "chunk/get", code, why, None),
        };
        // The device keeps its slot across its requests; without one it waits its turn.
        if let Err(w) = self.slots.for_device(dev, img.size, self.now.at) {
            let why = match w.position {
                Some(p) => format!(
                    "all {} download slots are taken (ota.max_concurrent_downloads); you are number {p} in line: ask again in {} s",
                    self.cfg.max_concurrent_downloads, w.retry_after
                ),
                None => format!("ask again in {} s", w.retry_after),
            };
            return self.reply_busy(dev, w, why, None);
        }
        let chunk = self.cfg.chunk_size as u64;
        let total = chunks_of(img.size, chunk);
        let mut queued = false;
        for i in idx {
            self.metrics.chunk_requests.inc();
            if i >= total {
                let why = format!(
                    "chunk {i} does not exist; the image has {total} chunks (0..={})",
                    total.saturating_sub(1)
                );
                self.reply_error(dev, "chunk/get", "out_of_range", why, Some(i));
                continue;
            }
            if self.chunk_room == 0 {
                // The device keeps its slot; only this request is refused.
                let w = serve::Wait {
                    why: serve::Busy::All,
                    retry_after: serve::RETRY_AFTER_MIN,
                    position: None,
                };
                let why =
                    "the chunk queue is full; ask again for this chunk and the rest in a second"
                        .to_string();
                self.reply_busy(dev, w, why, Some(i));
                break;
            }
            let offset = i * chunk;
            let len = chunk.min(img.size - offset) as usize;
            self.chunk_room -= 1;
            self.out.push(Out::Chunk(ChunkJob {
                device: dev.to_string(),
                topic: self.topic(dev, &format!("chunk/{i}")),
                image: img.clone(),
                offset,
                len,
                queued: self.now.at,
            }));
            queued = true;
        }
        if queued {
            let now_ms = self.now.ms;
            if let Some(i) = self.state.images.get_mut(
                &self
                    .assignment(dev)
                    .map(|r| r.image.clone())
                    .unwrap_or_default(),
            ) {
                i.last_used_ms = now_ms;
            }
            let d = self.device_mut(dev);
            if matches!(d.state.as_str(), "assigned" | "waiting" | "retry" | "") {
                d.state = "downloading".into();
            }
        }
    }

    pub(super) fn progress(&mut self, dev: &str, payload: &[u8]) {
        let p = match Progress::parse(payload) {
            Ok(p) => p,
            Err(e) => return self.reply_error(dev, "progress", e.code(), e.to_string(), None),
        };
        if self.assignment(dev).is_none() {
            return self.reply_error(
                dev,
                "progress",
                "not_assigned",
                format!("no update is assigned to device {dev}"),
                None,
            );
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

    pub(super) fn verify(&mut self, dev: &str, payload: &[u8]) {
        let v = match Verify::parse(payload) {
            Ok(v) => v,
            Err(e) => return self.reply_error(dev, "verify", e.code(), e.to_string(), None),
        };
        let img = match self.ready_for(dev, &v.version) {
            Ok(i) => i,
            Err((code, why)) => return self.reply_error(dev, "verify", code, why, None),
        };
        self.slots.release(dev);
        let ok = v.sha256.eq_ignore_ascii_case(&img.sha256);
        let d = self.device_mut(dev);
        if ok {
            d.state = "verified".into();
            d.received = img.size;
            d.error = None;
            let t = self.topic(dev, "success");
            self.publish_json(t, json!({"version": v.version, "sha256": img.sha256}));
        } else {
            d.state = "retry".into();
            d.error = Some("sha256 mismatch".into());
            d.received = 0;
            self.metrics.error("verify_mismatch");
            let t = self.topic(dev, "retry");
            self.publish_json(
                t,
                json!({"version": v.version, "code": "sha256_mismatch",
                       "reason": format!("the image's sha256 is {}, the device assembled {}; download it again", img.sha256, v.sha256),
                       "sha256": img.sha256}),
            );
        }
    }

    /// Counts bytes served to a device, if that device is assigned that image (the HTTP
    /// path's device id comes from the client).
    pub(super) fn served(&mut self, s: Served) {
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
    pub(super) fn report_served(&mut self) {
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
            self.report("served", v);
        }
    }
}
