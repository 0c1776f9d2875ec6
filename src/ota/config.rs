//! `[ota]`: the firmware cache and the local OTA service (see docs/ota.md); the section's
//! types, their validation, and [`OtaPaths`], what OTA takes from other sections.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::contract::MAX_CHUNK;
use crate::problem::{problem, Problem};
use crate::tls::check_pem;

/// `[ota]`: the firmware cache and the local OTA service (see docs/ota.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OtaConfig {
    /// Run the OTA manager. It only acts on `cmd/ota/...` commands and `<prefix>/...` topics.
    pub enabled: bool,
    /// First level of every device-facing topic: `<prefix>/<device_id>/request` etc.
    pub prefix: String,
    /// Where verified images live (`<sha256>.bin`). Default: `<gateway.data_dir>/ota`.
    pub cache_dir: PathBuf,
    /// Most bytes of images kept; least recently used images no rollout needs are evicted.
    pub cache_max_bytes: u64,
    /// Bytes per MQTT chunk served to devices (the last chunk may be shorter).
    pub chunk_size: usize,
    /// Most devices downloading at once (MQTT and HTTP together); others get `busy`.
    pub max_concurrent_downloads: usize,
    /// Most HTTP image downloads from one IP address at once; past it: 503 `busy`.
    pub max_downloads_per_ip: usize,
    /// An HTTP image transfer whose client reads nothing for this long is cut, and its
    /// download slot freed.
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
    /// Serving rate limit over all devices, bytes per second. 0: unlimited.
    pub max_bytes_per_sec: u64,
    /// Base of the `url` in metadata, e.g. `http://192.168.1.2:9183`. Default: from
    /// `http.listen`.
    pub http_base_url: String,
    /// PEM CA file trusted for HTTPS image downloads. Default: `cloud.ca_file`.
    pub fetch_ca_file: PathBuf,
    /// A download with no byte received for this long is cut and resumed.
    #[serde(with = "humantime_serde")]
    pub fetch_timeout: Duration,
    /// Attempts per download (with backoff) before the image is reported failed.
    pub fetch_attempts: u32,
    /// How often, at most, the gateway reports a running image download
    /// (`<prefix>/_gateway/fetch_progress`) and the bytes served to each device
    /// (`<prefix>/_gateway/served`).
    #[serde(with = "humantime_serde")]
    pub progress_interval: Duration,
    /// Devices known in advance, by id, with their tags: `[ota.devices.pump7] tags = [..]`.
    pub devices: BTreeMap<String, OtaDeviceConfig>,
    /// Broker identities (usernames or certificate names) whose *local* publishes on the OTA
    /// command topics (`cmd/ota/#`) are obeyed. Empty (the default): only commands that
    /// arrive from the cloud through the bridge are; a local publish there is dropped and
    /// counted, whatever the ACL grants (`cmd/#` included).
    pub local_commands: Vec<String>,
}

/// `[ota.devices.<id>]`
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OtaDeviceConfig {
    /// Tags a rollout can address (`"tag": "..."` in `ota_upgrade`).
    pub tags: Vec<String>,
}

impl Default for OtaConfig {
    fn default() -> Self {
        OtaConfig {
            enabled: true,
            prefix: "ota".into(),
            cache_dir: PathBuf::new(),
            cache_max_bytes: 512 * 1024 * 1024,
            chunk_size: 16 * 1024,
            max_concurrent_downloads: 32,
            max_downloads_per_ip: 2,
            stall_timeout: Duration::from_secs(10),
            max_bytes_per_sec: 0,
            http_base_url: String::new(),
            fetch_ca_file: PathBuf::new(),
            fetch_timeout: Duration::from_secs(30),
            fetch_attempts: 6,
            progress_interval: Duration::from_secs(1),
            devices: BTreeMap::new(),
            local_commands: Vec::new(),
        }
    }
}

/// What the OTA manager takes from other sections, computed once by the config
/// (`Settings::ota_paths`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtaPaths {
    /// The image cache (`ota.cache_dir`, else `<gateway.data_dir>/ota`).
    pub cache_dir: PathBuf,
    /// The CA of image downloads (`ota.fetch_ca_file`, else `cloud.ca_file`).
    pub fetch_ca_file: PathBuf,
    /// The base of the metadata `url` devices download from over HTTP.
    pub http_base_url: String,
}

impl OtaConfig {
    /// Every problem of `[ota]`; nothing is checked while OTA is disabled.
    pub fn validate(&self) -> Vec<Problem> {
        let mut p = Vec::new();
        let o = self;
        if !o.enabled {
            return p;
        }
        if o.prefix.is_empty() || o.prefix.contains(['+', '#', '/']) || o.prefix.starts_with('$') {
            p.push(problem(
                "ota.prefix",
                format!("{:?}: use one topic level without '/', '+', '#' or a leading '$'; e.g. \"ota\"", o.prefix),
            ));
        }
        if o.chunk_size < 256 || o.chunk_size > MAX_CHUNK {
            p.push(problem(
                "ota.chunk_size",
                format!("must be 256..={MAX_CHUNK} bytes; e.g. 16384 (broker.segment_bytes and cloud.max_packet_size are raised to fit it)"),
            ));
        }
        if o.cache_max_bytes < 1024 * 1024 {
            p.push(problem(
                "ota.cache_max_bytes",
                "must be at least 1048576 (1 MiB); it must hold the largest image",
            ));
        }
        if o.max_concurrent_downloads == 0 {
            p.push(problem(
                "ota.max_concurrent_downloads",
                "must be at least 1; e.g. 32",
            ));
        }
        if o.fetch_timeout < Duration::from_secs(1) {
            p.push(problem(
                "ota.fetch_timeout",
                "must be at least 1s; e.g. \"30s\"",
            ));
        }
        if o.max_downloads_per_ip == 0 {
            p.push(problem(
                "ota.max_downloads_per_ip",
                "must be at least 1; e.g. 2",
            ));
        }
        if o.stall_timeout < Duration::from_secs(1) {
            p.push(problem(
                "ota.stall_timeout",
                "must be at least 1s; e.g. \"10s\"",
            ));
        }
        if o.fetch_attempts == 0 {
            p.push(problem("ota.fetch_attempts", "must be at least 1; e.g. 6"));
        }
        if o.progress_interval < Duration::from_millis(100) {
            p.push(problem(
                "ota.progress_interval",
                "must be at least 100ms; e.g. \"1s\"",
            ));
        }
        let u = &o.http_base_url;
        if !(u.is_empty() || u.starts_with("http://") || u.starts_with("https://")) {
            p.push(problem(
                "ota.http_base_url",
                "must start with http:// (the gateway's own endpoint), e.g. \"http://192.168.1.2:9183\"",
            ));
        }
        if !o.fetch_ca_file.as_os_str().is_empty() {
            check_pem(&mut p, "ota.fetch_ca_file", &o.fetch_ca_file, "CERTIFICATE");
        }
        for (i, who) in o.local_commands.iter().enumerate() {
            if who.is_empty() || who.contains(['+', '#', '/', '\0']) {
                p.push(problem(
                    format!("ota.local_commands[{i}]"),
                    format!("{who:?} is not an identity: a broker username or certificate name, e.g. \"scada\""),
                ));
            }
        }
        for id in o.devices.keys() {
            if !super::protocol::valid_device_id(id) {
                p.push(problem(
                    format!("ota.devices.{id}"),
                    "not a usable device id: 1-128 characters without '/', '+', '#', not starting with '_' or '$'",
                ));
            }
        }
        p
    }
}
