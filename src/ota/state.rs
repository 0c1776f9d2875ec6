//! The OTA state that survives restarts: images, rollouts, and each device's progress.
//!
//! Owns the in-memory [`State`] and its JSON encoding; the manager persists it as
//! `<cache_dir>/state.json` (atomic replace, see [`super::cache::Cache::write_atomic`]) when
//! a rollout or an image changes at once, and device progress at most every half second, so a
//! kill -9 costs at most that much progress (a device resumes from its own last chunk anyway).
//! Device progress is only what the device confirmed (`progress.received`): the resume hint
//! derived from it can lag after a kill -9, never lead.
//!
//! Invariants:
//! - `images[key].ready_sha256` is `Some` only while `<sha256>.bin` exists and was verified;
//! - a device has at most one assignment (`devices[id].rollout`); a newer rollout addressed
//!   to the device replaces the older one;
//! - a rollout is *active* while it is the assignment of a device that is not `done`, or while
//!   it is the newest rollout for its tag; images of active rollouts are never evicted.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::protocol::Target;

/// Where an image is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ImageState {
    /// Not on disk yet; a download or push is under way or will be started.
    Fetching,
    /// Verified and on disk.
    Ready,
    /// Every attempt failed; only a new `ota_upgrade` command starts again (devices asking
    /// are answered `fetch_failed`).
    Failed,
    /// Evicted from the cache (no active rollout needs it).
    Evicted,
}

/// One firmware image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Image {
    /// Name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Size in bytes.
    pub size: u64,
    /// Expected sha256, if the cloud gave one.
    pub sha256: Option<String>,
    /// Expected md5 (legacy).
    pub md5: Option<String>,
    /// HTTPS source; `None`: pushed by the cloud over MQTT.
    pub url: Option<String>,
    /// Chunk size of the cloud's MQTT push.
    pub push_chunk_size: Option<u64>,
    /// Where it is.
    pub state: ImageState,
    /// sha256 of the verified file on disk.
    pub ready_sha256: Option<String>,
    /// Last time a device was served from it, ms since the epoch (LRU).
    pub last_used_ms: u64,
    /// Completed downloads from the cloud (a second one means a refetch).
    pub fetches: u32,
    /// Last fetch or verification problem.
    pub last_error: Option<String>,
}

/// One rollout: an image assigned to devices.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Rollout {
    /// Rollout id.
    pub id: String,
    /// Image key.
    pub image: String,
    /// Whom it addresses.
    pub target: Target,
    /// When the command arrived, ms since the epoch.
    pub created_ms: u64,
}

/// One device's view.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Device {
    /// Assigned rollout.
    pub rollout: Option<String>,
    /// `assigned`, `waiting` (asked, image not ready), `downloading`, `verifying`,
    /// `installing`, `done`, `failed`, `retry`.
    pub state: String,
    /// Bytes received, as last reported by the device: the resume hint (`received`,
    /// `next_chunk = received / chunk_size` in the metadata) is derived from this alone.
    pub received: u64,
    /// Image size.
    pub total: u64,
    /// Version the device last reported running or installing.
    pub version: Option<String>,
    /// Last error.
    pub error: Option<String>,
    /// Tags the device announced.
    pub tags: Vec<String>,
    /// Last change, ms since the epoch.
    pub updated_ms: u64,
    /// Image bytes served to it over MQTT for its current rollout (retries included).
    #[serde(default)]
    pub served_mqtt: u64,
    /// Image bytes served to it over HTTP (requests naming it with `?device=`).
    #[serde(default)]
    pub served_http: u64,
}

/// Everything persisted.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct State {
    /// By image key.
    pub images: BTreeMap<String, Image>,
    /// By rollout id.
    pub rollouts: BTreeMap<String, Rollout>,
    /// By device id.
    pub devices: BTreeMap<String, Device>,
}

impl State {
    /// Decodes a saved state.
    pub fn decode(bytes: &[u8]) -> Result<State, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// Encodes the state.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The newest rollout addressed to `tag`.
    fn newest_for_tag(&self, tag: &str) -> Option<&Rollout> {
        self.rollouts
            .values()
            .filter(|r| r.target == Target::Tag(tag.to_string()))
            .max_by_key(|r| r.created_ms)
    }

    /// The rollout a device gets: its explicit assignment, else the newest rollout for one of
    /// its tags (`config_tags` from `[ota.devices]`, plus those it announced).
    pub fn assignment(&self, dev: &str, config_tags: &[String]) -> Option<&Rollout> {
        if let Some(r) = self
            .devices
            .get(dev)
            .and_then(|d| d.rollout.as_ref())
            .and_then(|id| self.rollouts.get(id))
        {
            return Some(r);
        }
        let announced = self
            .devices
            .get(dev)
            .map(|d| d.tags.as_slice())
            .unwrap_or(&[]);
        config_tags
            .iter()
            .chain(announced)
            .filter_map(|t| self.newest_for_tag(t))
            .max_by_key(|r| r.created_ms)
    }

    /// Image keys no active rollout needs.
    pub fn needed_images(&self) -> BTreeSet<String> {
        let mut need = BTreeSet::new();
        for d in self.devices.values() {
            if d.state != "done" {
                if let Some(r) = d.rollout.as_ref().and_then(|id| self.rollouts.get(id)) {
                    need.insert(r.image.clone());
                }
            }
        }
        let tags: BTreeSet<&str> = self
            .rollouts
            .values()
            .filter_map(|r| match &r.target {
                Target::Tag(t) => Some(t.as_str()),
                Target::Devices(_) => None,
            })
            .collect();
        for t in tags {
            if let Some(r) = self.newest_for_tag(t) {
                need.insert(r.image.clone());
            }
        }
        need
    }

    /// Whether a rollout is active (see the module header).
    pub fn rollout_active(&self, id: &str) -> bool {
        let Some(r) = self.rollouts.get(id) else {
            return false;
        };
        if let Target::Tag(t) = &r.target {
            if self.newest_for_tag(t).map(|n| n.id.as_str()) == Some(id) {
                return true;
            }
        }
        self.devices
            .values()
            .any(|d| d.rollout.as_deref() == Some(id) && d.state != "done")
    }

    /// Status of one device as JSON.
    pub fn device_json(&self, id: &str) -> Option<serde_json::Value> {
        self.devices.get(id).map(|d| {
            serde_json::json!({
                "device": id,
                "rollout": d.rollout,
                "state": d.state,
                "received": d.received,
                "total": d.total,
                "version": d.version,
                "error": d.error,
                "updated_ms": d.updated_ms,
                "served": d.served_mqtt + d.served_http,
                "served_mqtt": d.served_mqtt,
                "served_http": d.served_http,
            })
        })
    }

    /// Status of one rollout as JSON: image state and device counts by state.
    pub fn rollout_json(&self, id: &str) -> Option<serde_json::Value> {
        let r = self.rollouts.get(id)?;
        let img = self.images.get(&r.image);
        let mut states: BTreeMap<String, u64> = BTreeMap::new();
        let mut devices = BTreeMap::new();
        for (dev, d) in &self.devices {
            if d.rollout.as_deref() == Some(id) {
                *states.entry(d.state.clone()).or_default() += 1;
                devices.insert(dev.clone(), d.state.clone());
            }
        }
        Some(serde_json::json!({
            "rollout": id,
            "target": r.target,
            "name": img.map(|i| i.name.clone()),
            "version": img.map(|i| i.version.clone()),
            "image": r.image,
            "image_state": img.map(|i| i.state),
            "image_error": img.and_then(|i| i.last_error.clone()),
            "active": self.rollout_active(id),
            "states": states,
            "devices": devices,
        }))
    }

    /// Everything, as JSON.
    pub fn all_json(&self) -> serde_json::Value {
        let rollouts: Vec<_> = self
            .rollouts
            .keys()
            .filter_map(|id| self.rollout_json(id))
            .collect();
        let devices: Vec<_> = self
            .devices
            .keys()
            .filter_map(|id| self.device_json(id))
            .collect();
        serde_json::json!({ "rollouts": rollouts, "devices": devices })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(id: &str, image: &str, target: Target, t: u64) -> Rollout {
        Rollout {
            id: id.into(),
            image: image.into(),
            target,
            created_ms: t,
        }
    }

    #[test]
    fn tags_and_explicit_assignments() {
        let mut s = State::default();
        s.rollouts.insert(
            "a".into(),
            rollout("a", "img1", Target::Tag("pumps".into()), 1),
        );
        s.rollouts.insert(
            "b".into(),
            rollout("b", "img2", Target::Tag("pumps".into()), 2),
        );
        s.rollouts.insert(
            "c".into(),
            rollout("c", "img3", Target::Devices(vec!["x".into()]), 3),
        );
        assert_eq!(
            s.assignment("p1", &["pumps".into()]).map(|r| r.id.as_str()),
            Some("b")
        );
        assert!(s.assignment("p1", &[]).is_none());
        s.devices.insert(
            "x".into(),
            Device {
                rollout: Some("c".into()),
                state: "assigned".into(),
                ..Default::default()
            },
        );
        assert_eq!(
            s.assignment("x", &["pumps".into()]).map(|r| r.id.as_str()),
            Some("c")
        );
        let need = s.needed_images();
        assert!(need.contains("img2") && need.contains("img3") && !need.contains("img1"));
        assert!(!s.rollout_active("a"));
        s.devices.get_mut("x").unwrap().state = "done".into();
        assert!(!s.needed_images().contains("img3"));
        let back = State::decode(&s.encode()).unwrap();
        assert_eq!(back, s);
    }
}
