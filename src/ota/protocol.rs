//! The OTA wire formats: what devices and the cloud send, what the gateway answers.
//!
//! Owns parsing and the error replies. Every parser takes untrusted bytes and returns a
//! [`ProtocolError`] naming what is wrong; nothing here panics on input. The topic layout
//! (`<prefix>/<device_id>/<kind>`) is parsed by [`parse_device_topic`].
//!
//! Invariants:
//! - a device id is 1-128 characters without `/`, `+`, `#`, and does not start with `_` or
//!   `$` (ids starting with `_` are the gateway's own, e.g. `ota/_gateway/status`);
//! - an image is identified by its `sha256` when the cloud gives one; with only a legacy
//!   `md5` it is identified by `md5:<hex>` until it is downloaded and its sha256 is known.

use serde::{Deserialize, Serialize};

/// Why a message could not be used. The manager answers the device with [`ErrorReply`] and
/// counts it under [`ProtocolError::code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The payload is not the JSON the topic expects.
    #[error("malformed JSON: {0}")]
    Malformed(String),
    /// The JSON parsed but a field is missing or out of its range.
    #[error("invalid request: {0}")]
    Invalid(String),
}

impl ProtocolError {
    /// The `code` in the error reply and the `kind` label of the error counter.
    pub fn code(&self) -> &'static str {
        match self {
            ProtocolError::Malformed(_) => "malformed",
            ProtocolError::Invalid(_) => "invalid",
        }
    }
}

/// Whether `id` is usable as a device id (see the module header).
pub fn valid_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.contains(['/', '+', '#'])
        && !id.starts_with('_')
        && !id.starts_with('$')
}

/// What a device published on, from `<prefix>/<device_id>/<kind>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceTopic {
    /// `request`
    Request,
    /// `chunk/get`
    ChunkGet,
    /// `progress`
    Progress,
    /// `verify`
    Verify,
}

/// Splits a device topic into device id and kind; `None` for anything else (including the
/// gateway's own replies on the same prefix).
pub fn parse_device_topic<'a>(prefix: &str, topic: &'a str) -> Option<(&'a str, DeviceTopic)> {
    let rest = topic.strip_prefix(prefix)?.strip_prefix('/')?;
    let (dev, kind) = rest.split_once('/')?;
    if !valid_device_id(dev) {
        return None;
    }
    let kind = match kind {
        "request" => DeviceTopic::Request,
        "chunk/get" => DeviceTopic::ChunkGet,
        "progress" => DeviceTopic::Progress,
        "verify" => DeviceTopic::Verify,
        _ => return None,
    };
    Some((dev, kind))
}

/// Not JSON at all: `Malformed`; JSON of the wrong shape: `Invalid`.
fn parse<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> Result<T, ProtocolError> {
    let v: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    serde_json::from_value(v).map_err(|e| ProtocolError::Invalid(e.to_string()))
}

/// `<prefix>/<id>/request`: "is there an update for me?"
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct Request {
    /// The version the device runs (informational; equal to the assigned one: up to date).
    #[serde(default)]
    pub version: Option<String>,
    /// Tags the device announces; a rollout addressed to a tag then reaches it.
    #[serde(default)]
    pub tags: Vec<String>,
}

impl Request {
    /// Parses a request; an empty payload is a request without fields.
    pub fn parse(payload: &[u8]) -> Result<Request, ProtocolError> {
        if payload.iter().all(u8::is_ascii_whitespace) {
            return Ok(Request::default());
        }
        parse(payload)
    }
}

/// `<prefix>/<id>/chunk/get`: one index, a list, or a range `from..=to`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ChunkGet {
    /// The version the chunks belong to (must be the assigned one).
    pub version: String,
    /// One chunk.
    #[serde(default)]
    pub index: Option<u64>,
    /// Several chunks.
    #[serde(default)]
    pub indexes: Option<Vec<u64>>,
    /// First chunk of a range (with `to`, inclusive).
    #[serde(default)]
    pub from: Option<u64>,
    /// Last chunk of a range, inclusive.
    #[serde(default)]
    pub to: Option<u64>,
}

/// Most chunks one `chunk/get` may ask for.
pub const MAX_CHUNKS_PER_GET: u64 = 64;

impl ChunkGet {
    /// Parses a chunk request.
    pub fn parse(payload: &[u8]) -> Result<ChunkGet, ProtocolError> {
        parse(payload)
    }

    /// The requested indexes, in order, at most [`MAX_CHUNKS_PER_GET`].
    pub fn indexes(&self) -> Result<Vec<u64>, ProtocolError> {
        let v = match (&self.index, &self.indexes, self.from, self.to) {
            (Some(i), None, None, None) => vec![*i],
            (None, Some(l), None, None) if !l.is_empty() => l.clone(),
            (None, None, Some(a), Some(b)) if a <= b => (a..=b.min(a + MAX_CHUNKS_PER_GET)).collect(),
            _ => {
                return Err(ProtocolError::Invalid(
                    "give exactly one of \"index\", a non-empty \"indexes\" list, or \"from\" <= \"to\""
                        .into(),
                ))
            }
        };
        if v.len() as u64 > MAX_CHUNKS_PER_GET {
            return Err(ProtocolError::Invalid(format!(
                "at most {MAX_CHUNKS_PER_GET} chunks per request"
            )));
        }
        Ok(v)
    }
}

/// `<prefix>/<id>/progress`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct Progress {
    /// Version being installed.
    #[serde(default)]
    pub version: Option<String>,
    /// Bytes received so far.
    #[serde(default)]
    pub received: Option<u64>,
    /// Image size.
    #[serde(default)]
    pub total: Option<u64>,
    /// `downloading`, `verifying`, `installing`, `done` or `failed`.
    pub state: String,
    /// Why it failed (with `state = failed`).
    #[serde(default)]
    pub error: Option<String>,
}

/// The states a device may report.
pub const PROGRESS_STATES: &[&str] = &["downloading", "verifying", "installing", "done", "failed"];

impl Progress {
    /// Parses a progress report; the state must be one of [`PROGRESS_STATES`].
    pub fn parse(payload: &[u8]) -> Result<Progress, ProtocolError> {
        let p: Progress = parse(payload)?;
        if !PROGRESS_STATES.contains(&p.state.as_str()) {
            return Err(ProtocolError::Invalid(format!(
                "state {:?} is not one of {}",
                p.state,
                PROGRESS_STATES.join(", ")
            )));
        }
        Ok(p)
    }
}

/// `<prefix>/<id>/verify`
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Verify {
    /// Version the device assembled.
    pub version: String,
    /// sha256 (hex) of what the device assembled.
    pub sha256: String,
}

impl Verify {
    /// Parses a verify request.
    pub fn parse(payload: &[u8]) -> Result<Verify, ProtocolError> {
        parse(payload)
    }
}

/// `<prefix>/<id>/metadata`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Metadata {
    /// Image name.
    pub name: String,
    /// Image version.
    pub version: String,
    /// Size in bytes.
    pub size: u64,
    /// sha256 of the whole image, hex.
    pub sha256: String,
    /// Bytes per chunk (the last one may be shorter).
    pub chunk_size: u64,
    /// Number of chunks.
    pub chunks: u64,
    /// HTTP URL of the image on the gateway (supports `Range`).
    pub url: String,
    /// Rollout id.
    pub rollout: String,
}

/// `<prefix>/<id>/error`: why a request was refused.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorReply {
    /// Machine-readable code: `malformed`, `invalid`, `not_assigned`, `unknown_version`,
    /// `out_of_range`, `not_ready`, `busy`, `fetch_failed`.
    pub code: String,
    /// What was wrong, for a human.
    pub reason: String,
    /// The topic suffix of the request: `request`, `chunk/get`, `progress`, `verify`.
    pub request: String,
    /// The chunk index concerned, for `out_of_range` (and `busy` for a full chunk queue).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub index: Option<u64>,
    /// `busy`: seconds to wait before asking again (an estimate, 1..=30).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub retry_after: Option<u64>,
    /// `busy`: the device's 1-based place in the queue of devices waiting for a slot.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub position: Option<usize>,
}

/// How a rollout addresses devices.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Explicit device ids.
    Devices(Vec<String>),
    /// Every device carrying the tag (from config or announced in its request).
    Tag(String),
}

/// `cmd/ota/upgrade` (cloud: `fieldgate/<gw>/cmd/ota/upgrade`): the `ota_upgrade` command.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Upgrade {
    /// Optional `"ota_upgrade"`, for clouds that put the command name in the payload.
    #[serde(default)]
    pub command: Option<String>,
    /// Image name.
    pub name: String,
    /// Image version.
    pub version: String,
    /// Image size in bytes.
    pub size: u64,
    /// sha256 hex (preferred).
    #[serde(default)]
    pub sha256: Option<String>,
    /// md5 hex (legacy, when no sha256).
    #[serde(default)]
    pub md5: Option<String>,
    /// HTTPS URL to fetch the image from; absent: the cloud pushes chunks over MQTT.
    #[serde(default)]
    pub url: Option<String>,
    /// With MQTT push: bytes per pushed chunk (the last may be shorter).
    #[serde(default)]
    pub chunk_size: Option<u64>,
    /// One device.
    #[serde(default)]
    pub device: Option<String>,
    /// Several devices.
    #[serde(default)]
    pub devices: Option<Vec<String>>,
    /// Devices with this tag.
    #[serde(default)]
    pub tag: Option<String>,
    /// Rollout id; default `<name>-<version>`.
    #[serde(default)]
    pub rollout: Option<String>,
}

/// Largest image accepted (4 GiB).
pub const MAX_IMAGE: u64 = 4 << 30;

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Upgrade {
    /// Parses and checks an `ota_upgrade` command.
    pub fn parse(payload: &[u8]) -> Result<Upgrade, ProtocolError> {
        let mut u: Upgrade = parse(payload)?;
        let bad = |m: String| Err(ProtocolError::Invalid(m));
        if let Some(c) = &u.command {
            if c != "ota_upgrade" {
                return bad(format!("command {c:?} is not \"ota_upgrade\""));
            }
        }
        for (k, v) in [("name", &u.name), ("version", &u.version)] {
            if v.is_empty() || v.len() > 128 || v.contains(['/', '+', '#']) || v.starts_with('.') {
                return bad(format!("{k} {v:?}: 1-128 characters without '/', '+', '#'"));
            }
        }
        if u.size == 0 || u.size > MAX_IMAGE {
            return bad(format!("size {} must be 1..={MAX_IMAGE}", u.size));
        }
        u.sha256 = u.sha256.map(|s| s.to_ascii_lowercase());
        u.md5 = u.md5.map(|s| s.to_ascii_lowercase());
        match (&u.sha256, &u.md5) {
            (Some(s), _) if !is_hex(s, 64) => return bad("sha256 must be 64 hex digits".into()),
            (None, Some(m)) if !is_hex(m, 32) => return bad("md5 must be 32 hex digits".into()),
            (None, None) => return bad("give sha256 (or the legacy md5)".into()),
            _ => {}
        }
        match &u.url {
            Some(url) if !url.starts_with("https://") => {
                return bad(format!("url {url:?} must be https://"))
            }
            Some(_) => {}
            None => match u.chunk_size {
                Some(c) if (1..=super::contract::MAX_CHUNK as u64).contains(&c) => {}
                _ => {
                    return bad(
                        "without url the cloud pushes chunks: give chunk_size (1..=1048576)".into(),
                    )
                }
            },
        }
        if let Some(r) = &u.rollout {
            if r.is_empty() || r.len() > 128 || r.contains(['/', '+', '#']) {
                return bad(format!(
                    "rollout {r:?}: 1-128 characters without '/', '+', '#'"
                ));
            }
        }
        u.target()?;
        Ok(u)
    }

    /// Who the rollout is for.
    pub fn target(&self) -> Result<Target, ProtocolError> {
        let t = match (&self.device, &self.devices, &self.tag) {
            (Some(d), None, None) => Target::Devices(vec![d.clone()]),
            (None, Some(l), None) if !l.is_empty() => Target::Devices(l.clone()),
            (None, None, Some(t)) if !t.is_empty() => Target::Tag(t.clone()),
            _ => {
                return Err(ProtocolError::Invalid(
                    "address exactly one of \"device\", \"devices\" (non-empty) or \"tag\"".into(),
                ))
            }
        };
        if let Target::Devices(l) = &t {
            if let Some(d) = l.iter().find(|d| !valid_device_id(d)) {
                return Err(ProtocolError::Invalid(format!(
                    "device id {d:?} is not usable"
                )));
            }
        }
        Ok(t)
    }

    /// The image key: `sha256`, or `md5:<hex>` for legacy images.
    pub fn image_key(&self) -> String {
        match (&self.sha256, &self.md5) {
            (Some(s), _) => s.clone(),
            (None, Some(m)) => format!("md5:{m}"),
            (None, None) => String::new(),
        }
    }

    /// The rollout id.
    pub fn rollout_id(&self) -> String {
        self.rollout
            .clone()
            .unwrap_or_else(|| format!("{}-{}", self.name, self.version))
    }
}

/// `cmd/ota/status`: what the cloud asks about.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StatusQuery {
    /// One device.
    #[serde(default)]
    pub device: Option<String>,
    /// One rollout.
    #[serde(default)]
    pub rollout: Option<String>,
    /// Echoed in the answer so the cloud can match it.
    #[serde(default)]
    pub id: Option<serde_json::Value>,
}

impl StatusQuery {
    /// Parses a status query; an empty payload asks for everything.
    pub fn parse(payload: &[u8]) -> Result<StatusQuery, ProtocolError> {
        if payload.iter().all(u8::is_ascii_whitespace) {
            return Ok(StatusQuery::default());
        }
        parse(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_topics() {
        assert_eq!(
            parse_device_topic("ota", "ota/d1/chunk/get"),
            Some(("d1", DeviceTopic::ChunkGet))
        );
        assert_eq!(
            parse_device_topic("ota", "ota/d1/request").map(|x| x.1),
            Some(DeviceTopic::Request)
        );
        assert_eq!(parse_device_topic("ota", "ota/d1/chunk/3"), None);
        assert_eq!(parse_device_topic("ota", "ota/_gateway/request"), None);
        assert_eq!(parse_device_topic("ota", "otax/d1/request"), None);
        assert_eq!(parse_device_topic("ota", "ota/d1"), None);
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        for p in [
            &b"{"[..],
            b"null",
            b"[]",
            b"\xff\xfe",
            b"{\"version\":1}",
            b"42",
        ] {
            assert!(ChunkGet::parse(p).is_err(), "{p:?}");
            assert!(Verify::parse(p).is_err(), "{p:?}");
            assert!(Upgrade::parse(p).is_err(), "{p:?}");
            assert!(Progress::parse(p).is_err(), "{p:?}");
        }
        assert_eq!(ChunkGet::parse(b"{").unwrap_err().code(), "malformed");
        assert_eq!(ChunkGet::parse(b"[1,2").unwrap_err().code(), "malformed");
        assert_eq!(ChunkGet::parse(b"[1,2]").unwrap_err().code(), "invalid");
        assert_eq!(
            ChunkGet::parse(b"{\"index\":1}").unwrap_err().code(),
            "invalid"
        );
        assert!(Request::parse(b"").is_ok());
        assert!(Request::parse(b"{").is_err());
        assert!(Progress::parse(br#"{"state":"dancing"}"#).is_err());
    }

    #[test]
    fn chunk_get_forms() {
        let g = ChunkGet::parse(br#"{"version":"1","index":3}"#).unwrap();
        assert_eq!(g.indexes().unwrap(), vec![3]);
        let g = ChunkGet::parse(br#"{"version":"1","indexes":[1,5]}"#).unwrap();
        assert_eq!(g.indexes().unwrap(), vec![1, 5]);
        let g = ChunkGet::parse(br#"{"version":"1","from":2,"to":4}"#).unwrap();
        assert_eq!(g.indexes().unwrap(), vec![2, 3, 4]);
        let g = ChunkGet::parse(br#"{"version":"1","from":4,"to":2}"#).unwrap();
        assert!(g.indexes().is_err());
        let g = ChunkGet::parse(br#"{"version":"1"}"#).unwrap();
        assert!(g.indexes().is_err());
    }

    #[test]
    fn upgrade_checks() {
        let sha = "a".repeat(64);
        let ok = format!(
            r#"{{"name":"fw","version":"2","size":10,"sha256":"{sha}","url":"https://x/fw","devices":["a","b"]}}"#
        );
        let u = Upgrade::parse(ok.as_bytes()).unwrap();
        assert_eq!(
            u.target().unwrap(),
            Target::Devices(vec!["a".into(), "b".into()])
        );
        assert_eq!(u.rollout_id(), "fw-2");
        assert_eq!(u.image_key(), sha);
        let md5 = r#"{"name":"fw","version":"2","size":10,"md5":"0123456789abcdef0123456789ABCDEF","url":"https://x","tag":"pumps"}"#;
        assert_eq!(
            Upgrade::parse(md5.as_bytes()).unwrap().image_key(),
            "md5:0123456789abcdef0123456789abcdef"
        );
        for bad in [
            r#"{"name":"fw","version":"2","size":10,"url":"https://x","device":"a"}"#,
            r#"{"name":"fw","version":"2","size":10,"sha256":"zz","url":"https://x","device":"a"}"#,
            r#"{"name":"fw","version":"2","size":10,"md5":"0123456789abcdef0123456789abcdef","url":"http://x","device":"a"}"#,
            r#"{"name":"fw","version":"2","size":10,"md5":"0123456789abcdef0123456789abcdef","device":"a"}"#,
            r#"{"name":"fw","version":"2","size":10,"md5":"0123456789abcdef0123456789abcdef","url":"https://x"}"#,
            r#"{"name":"fw","version":"2","size":10,"md5":"0123456789abcdef0123456789abcdef","url":"https://x","device":"a/b"}"#,
            r#"{"name":"f/w","version":"2","size":10,"md5":"0123456789abcdef0123456789abcdef","url":"https://x","device":"a"}"#,
        ] {
            assert!(Upgrade::parse(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
