//! Cloud commands: `ota_upgrade` (a rollout) and the status query.
//!
//! Owns how a rollout comes to be: the image it names is recorded (or given a new source if
//! it failed or was evicted), the rollout replaces the older assignment of every device it
//! addresses (by id, or by tag: `[ota.devices]` tags and those the devices announced), each
//! such device starts over (`assigned`, nothing received or served, its download slot freed),
//! the acceptance is reported on `<prefix>/_gateway/rollout`, the state is saved at once, and
//! the image's fetch is started if it is not ready.
//!
//! Invariants:
//! - a refused command changes nothing; its error goes to `<prefix>/_gateway/error`;
//! - re-sending a rollout a device already has does not reset that device's progress;
//! - a command is the only thing that takes a `Failed` image back to `Fetching`.

use std::collections::BTreeSet;

use serde_json::json;
use tracing::{info, warn};

use super::super::protocol::{ErrorReply, StatusQuery, Target, Upgrade};
use super::super::state::{Image, ImageState, Rollout};
use super::{Manager, CMD_UPGRADE, GATEWAY_LEVEL};

impl Manager {
    pub(super) fn upgrade(&mut self, payload: &[u8]) {
        let u = match Upgrade::parse(payload) {
            Ok(u) => u,
            Err(e) => {
                warn!(error = %e, "ota_upgrade refused");
                self.metrics.error(e.code());
                let t = self.topic(GATEWAY_LEVEL, "error");
                let reply = ErrorReply {
                    code: e.code().into(),
                    reason: e.to_string(),
                    request: CMD_UPGRADE.into(),
                    index: None,
                    retry_after: None,
                    position: None,
                };
                self.publish(t, serde_json::to_vec(&reply).unwrap_or_default());
                return;
            }
        };
        let key = u.image_key();
        let rid = u.rollout_id();
        let target = match u.target() {
            Ok(t) => t,
            Err(_) => return, // checked by parse
        };
        let now_ms = self.now.ms;
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
                last_used_ms: now_ms,
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
        img.last_used_ms = now_ms;
        self.state.rollouts.insert(
            rid.clone(),
            Rollout {
                id: rid.clone(),
                image: key.clone(),
                target: target.clone(),
                created_ms: now_ms,
            },
        );
        let devices = self.addressed(&target);
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
        );
        self.persist();
        self.ensure_fetch(&key);
    }

    /// The devices a rollout addresses now: its list, or every device known with the tag.
    fn addressed(&self, target: &Target) -> Vec<String> {
        match target {
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
        }
    }

    pub(super) fn status_query(&mut self, payload: &[u8]) {
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
                self.metrics.error(e.code());
                json!({"error": e.to_string(), "code": e.code()})
            }
        };
        self.report("status", v);
    }
}
