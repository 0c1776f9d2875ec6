//! Configuration: the one typed tree every component is built from.
//!
//! Owns loading (built-in defaults -> TOML file -> `FIELDGATE__SECTION__KEY` environment
//! overrides) and validation. Invariants:
//! - every field has a built-in default, so an empty file (or none) is a valid config;
//! - unknown keys are errors (`deny_unknown_fields` on every struct);
//! - [`Settings::load`] reports *every* problem it can find in one run: each section is
//!   deserialized on its own so a type error in `[store]` does not hide one in `[cloud]`, and
//!   the semantic checks ([`Settings::validate`]) run over all sections and list all failures,
//!   each as `key.path: problem; fix`.
//! - `check-config` and `run` go through the same [`Settings::load`].

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::sources::modbus::config::ModbusDeviceConfig;
use crate::sources::serial::config::SerialDeviceConfig;
use crate::topic;

/// One configuration problem: where it is and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `cloud.ca_file`.
    pub key: String,
    /// What is wrong and what to do about it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Every problem found while loading a configuration. The caller prints them all and exits 64.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// All problems, in the order found.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} configuration problem(s):", self.problems.len())?;
        for p in &self.problems {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

/// The whole gateway configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Identity, data directory, shutdown behaviour.
    pub gateway: GatewayConfig,
    /// The embedded MQTT broker that local devices connect to.
    pub broker: BrokerConfig,
    /// The durable store-and-forward queue.
    pub store: StoreConfig,
    /// Which local messages go to the cloud, and under which topic.
    pub uplink: UplinkConfig,
    /// Which cloud messages come down to local devices.
    pub downlink: DownlinkConfig,
    /// The cloud MQTT broker. Absent (or `enabled = false`): the gateway only buffers.
    pub cloud: CloudConfig,
    /// Prometheus `/metrics` and `/health` HTTP endpoint.
    pub metrics: MetricsConfig,
    /// Logging.
    pub log: LogConfig,
    /// `[[modbus]]`: Modbus TCP and RTU devices polled into the local broker.
    pub modbus: Vec<ModbusDeviceConfig>,
    /// Serial-line devices, one `[[serial]]` table each (see docs/serial.md).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub serial: Vec<SerialDeviceConfig>,
    /// Firmware updates: fetch once from the cloud, serve to local devices (see docs/ota.md).
    pub ota: OtaConfig,
}

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
    /// `metrics.listen`.
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

/// Largest `ota.chunk_size`.
pub const OTA_MAX_CHUNK: usize = 1024 * 1024;
/// Room an MQTT packet needs besides the chunk (fixed header, topic, packet id).
pub const OTA_PACKET_OVERHEAD: usize = 1024;

/// `[gateway]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Gateway id: cloud client id and `{gateway_id}` in topic templates. No `/`, `+`, `#`.
    pub id: String,
    /// Where the queue lives. Default: `$STATE_DIRECTORY` (set by systemd), else `./state`.
    pub data_dir: PathBuf,
    /// How long an orderly shutdown may take to finish in-flight cloud deliveries.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        let data_dir = std::env::var_os("STATE_DIRECTORY")
            // systemd may pass several directories separated by ':'; the first is ours.
            .and_then(|v| {
                v.to_str()
                    .and_then(|s| s.split(':').next())
                    .map(PathBuf::from)
            })
            .unwrap_or_else(|| PathBuf::from("state"));
        GatewayConfig {
            id: "fieldgate".into(),
            data_dir,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// `[broker]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// MQTT 3.1.1 listeners (plain TCP or TLS), by name. Served by the gateway's front end.
    pub listeners: BTreeMap<String, ListenerConfig>,
    /// Accounts. A client that sends a username must match one of them.
    pub users: Vec<UserConfig>,
    /// Who may publish and subscribe where.
    pub acl: AclConfig,
    /// Most simultaneous device connections over all listeners.
    pub max_connections: usize,
    /// Most simultaneous device connections from one source IP address.
    pub max_connections_per_ip: usize,
    /// Largest MQTT packet (its remaining length: topic + payload + headers) accepted from a
    /// device, in bytes. A bigger one closes the connection.
    pub max_payload_size: usize,
    /// Most unacknowledged QoS 1/2 messages per client connection.
    pub max_inflight: usize,
    /// Most PUBLISHes per second from one device connection. 0: unlimited.
    pub max_publish_rate: u32,
    /// PUBLISHes a device may send at once above the rate. 0: one second's worth.
    pub publish_burst: u32,
    /// What happens to a device over `max_publish_rate`.
    pub rate_limit_policy: RateLimitPolicy,
    /// How long a new connection may take to send CONNECT (after the TLS handshake).
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// After a failed password login, the next login attempt from the same address waits
    /// this long, doubled per further failure up to 32 times it; a successful login (or ten
    /// minutes without a failure) forgets the failures. `"0s"`: no delay.
    #[serde(with = "humantime_serde")]
    pub failed_login_delay: Duration,
    /// How long a TLS handshake may take before the connection is dropped.
    #[serde(with = "humantime_serde")]
    pub tls_handshake_timeout: Duration,
    /// Most subscription filters one client session holds (rumqttd keeps about 7 KB per
    /// filter); a SUBSCRIBE filter past it gets 0x80 in SUBACK.
    pub max_subscriptions_per_client: usize,
    /// Most retained messages kept (rumqttd keeps several KB each, and all survive a
    /// restart); past it a new retained topic is delivered but not kept.
    pub max_retained_messages: usize,
    /// Most bytes (topic + payload) of retained messages kept; past it a retained publish
    /// is delivered but not kept.
    pub max_retained_bytes: u64,
    /// Size of one in-memory log segment per subscription filter, in bytes.
    pub segment_bytes: usize,
    /// Client ids each identity may use, e.g. `"%u"` (the username or certificate name) or
    /// `"%u-*"` (`*`: any characters). A CONNECT with another client id is refused with
    /// CONNACK 2; with `%u` in it, anonymous clients are refused. Empty: any client id. A
    /// session belongs to the identity that made it either way: another identity may not
    /// take over its client id while it exists.
    pub client_id_pattern: String,
    /// Segments kept per subscription filter (memory per filter <= bytes x count).
    pub segment_count: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        let mut listeners = BTreeMap::new();
        listeners.insert(
            "default".to_string(),
            ListenerConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
                // The built-in listener is on loopback only: local apps need no account.
                allow_anonymous: true,
                tls: None,
            },
        );
        BrokerConfig {
            listeners,
            users: Vec::new(),
            acl: AclConfig::default(),
            max_connections: 1024,
            max_connections_per_ip: 64,
            max_payload_size: 256 * 1024,
            max_inflight: 100,
            max_publish_rate: 0,
            publish_burst: 0,
            rate_limit_policy: RateLimitPolicy::SlowDown,
            connect_timeout: Duration::from_secs(10),
            tls_handshake_timeout: Duration::from_secs(5),
            failed_login_delay: Duration::from_secs(1),
            max_subscriptions_per_client: 256,
            max_retained_messages: 10_000,
            max_retained_bytes: 16 * 1024 * 1024,
            segment_bytes: 1024 * 1024,
            segment_count: 4,
            client_id_pattern: String::new(),
        }
    }
}

/// `[broker.listeners.NAME]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Address to listen on, e.g. `0.0.0.0:1883`.
    pub listen: SocketAddr,
    /// Let clients in without a username (and without a client certificate).
    #[serde(default)]
    pub allow_anonymous: bool,
    /// TLS on this listener. Absent: plain TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenerTlsConfig>,
}

/// `[broker.listeners.NAME.tls]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerTlsConfig {
    /// PEM server certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `cert_file`.
    pub key_file: PathBuf,
    /// PEM CA certificate(s) that sign device client certificates (mutual TLS).
    #[serde(default)]
    pub client_ca_file: PathBuf,
    /// `none`, `optional` (a certificate, when sent, identifies the client) or `required`.
    #[serde(default)]
    pub client_cert: ClientCertMode,
}

/// `broker.rate_limit_policy`: what the front end does with a device that publishes faster
/// than `broker.max_publish_rate`.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitPolicy {
    /// Stop reading from the device until it is back under the rate (TCP back-pressure).
    /// Nothing is lost; the device's sends slow down.
    #[default]
    SlowDown,
    /// Drop the excess PUBLISHes (still acknowledged, as for an ACL denial) and count them.
    Drop,
    /// Close the connection.
    Disconnect,
}

/// Deserializes a unit enum from its snake_case name, naming the allowed values on error
/// (serde's own message through the config crate does not).
macro_rules! named_enum {
    ($ty:ident, $what:literal, { $($name:literal => $v:ident),+ $(,)? }) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                match s.as_str() {
                    $($name => Ok($ty::$v),)+
                    other => Err(serde::de::Error::custom(format!(
                        concat!("`{}` is not ", $what, "; use one of: {}"),
                        other,
                        [$($name),+].join(", ")
                    ))),
                }
            }
        }
    };
}

named_enum!(RateLimitPolicy, "a rate limit policy", {
    "slow_down" => SlowDown,
    "drop" => Drop,
    "disconnect" => Disconnect,
});

named_enum!(ClientCertMode, "a client certificate mode", {
    "none" => None,
    "optional" => Optional,
    "required" => Required,
});

/// Whether a TLS listener asks devices for a client certificate.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ClientCertMode {
    /// Never asked; clients authenticate with a password (or are anonymous).
    #[default]
    None,
    /// Asked; a verified certificate's CN is the identity, without one a password is needed.
    Optional,
    /// Every client must present a certificate signed by `client_ca_file`; its CN is the
    /// identity. Without one the CONNECT is refused (CONNACK 5).
    Required,
}

/// `[[broker.users]]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// MQTT username.
    pub username: String,
    /// argon2id PHC string from `fieldgate passwd` (preferred).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub password_hash: String,
    /// Plain-text password: accepted for compatibility, warned about at start.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub password: String,
}

/// `[broker.acl]`: a client may publish to (subscribe to) a topic when a pattern of the
/// `default` rules or of its own identity's rules allows it. `%u` is the identity (username
/// or certificate CN), `%c` the client id.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AclConfig {
    /// Rules for every client.
    pub default: AclRules,
    /// Extra rules per identity (username or certificate CN).
    pub users: BTreeMap<String, AclRules>,
    /// Topics only the gateway itself publishes to, whatever the rules above say.
    pub internal: InternalTopics,
}

/// `[broker.acl.internal]`: topics the gateway's own components publish on (OTA answers to
/// devices, the tap's drain marker). No device may publish there, not even an identity with
/// `#`: a device could otherwise forge firmware metadata or chunks for another device.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct InternalTopics {
    /// Filters of gateway-only topics.
    pub gateway_only: Vec<String>,
    /// Filters inside `gateway_only` that devices may still publish to.
    pub device_may_publish: Vec<String>,
    /// Command topics the gateway obeys: only the cloud (through the bridge's downlink) may
    /// publish there, and the identities in `ota.local_commands`; no ACL grant opens them.
    pub commands: Vec<String>,
    /// `ota.local_commands`, filled in at start (not a key of this section).
    #[serde(skip)]
    pub command_identities: Vec<String>,
}

impl Default for InternalTopics {
    fn default() -> Self {
        InternalTopics {
            gateway_only: vec![
                "fieldgate-internal/#".into(),
                "ota/+/metadata".into(),
                "ota/+/chunk/+".into(),
                "ota/+/success".into(),
                "ota/+/retry".into(),
                "ota/+/error".into(),
                "ota/_gateway/#".into(),
            ],
            device_may_publish: vec!["ota/+/chunk/get".into()],
            commands: vec!["cmd/ota/#".into()],
            command_identities: Vec::new(),
        }
    }
}

impl Default for AclConfig {
    fn default() -> Self {
        AclConfig {
            default: AclRules {
                publish: vec!["#".into()],
                subscribe: vec!["#".into()],
                ..AclRules::default()
            },
            users: BTreeMap::new(),
            internal: InternalTopics::default(),
        }
    }
}

/// Publish and subscribe patterns (MQTT filters, with `%u` / `%c`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AclRules {
    /// Topics the client may publish to.
    pub publish: Vec<String>,
    /// Filters the client may subscribe to (a filter must lie inside a pattern).
    pub subscribe: Vec<String>,
    /// Topics the client may not publish to, whatever `publish` allows (checked first).
    pub deny_publish: Vec<String>,
    /// Topics the client may not receive, whatever `subscribe` allows (checked first): a
    /// filter inside one of them is refused, and a wider filter (`#`) never delivers them.
    pub deny_subscribe: Vec<String>,
}

/// What the queue does when it is full.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FullPolicy {
    /// Delete the oldest records to make room; each deleted record is counted.
    DropOldest,
    /// Refuse the new record; each refused record is counted.
    RejectNew,
}

/// `[store]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Most bytes of queued records (topic + payload + header).
    pub max_bytes: u64,
    /// Records older than this are dropped (counted as `expired`). `0s`: no age limit.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// `drop_oldest` or `reject_new`.
    pub full_policy: FullPolicy,
    /// No effect (kept so that old configs load): every cloud-bound message is fsynced before
    /// its publisher is acknowledged, in group commits that follow each other back to back.
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// sled page cache, in bytes.
    pub cache_bytes: u64,
    /// While the cloud link is up: device acknowledgements wait (at most [`LIVE_HOLD`]) while
    /// more than this many durable records wait to be sent live. Keeps the delay to the cloud
    /// bounded when devices publish faster than the link drains; never applies during an
    /// outage or to a replayed backlog. 0: off.
    ///
    /// [`LIVE_HOLD`]: crate::store::journal::LIVE_HOLD
    pub live_window: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            max_bytes: 1024 * 1024 * 1024,
            max_age: Duration::from_secs(7 * 24 * 3600),
            full_policy: FullPolicy::DropOldest,
            commit_interval: Duration::from_millis(100),
            cache_bytes: 32 * 1024 * 1024,
            live_window: 4096,
        }
    }
}

/// `[uplink]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UplinkConfig {
    /// Local topic filters whose messages are queued for the cloud. Empty: nothing is
    /// queued (a local-only gateway).
    pub forward: Vec<String>,
    /// Local topic filters never queued (checked after `forward`).
    pub exclude: Vec<String>,
    /// Cloud topic = this prefix + local topic. `{gateway_id}` is replaced.
    pub cloud_prefix: String,
}

impl Default for UplinkConfig {
    fn default() -> Self {
        UplinkConfig {
            forward: vec!["#".into()],
            exclude: vec!["cmd/#".into(), "$SYS/#".into()],
            cloud_prefix: "fieldgate/{gateway_id}/".into(),
        }
    }
}

/// `[downlink]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DownlinkConfig {
    /// Cloud topic filters the bridge subscribes to. `{gateway_id}` is replaced.
    pub subscribe: Vec<String>,
    /// Removed from the front of a cloud topic before it is published locally.
    pub strip_prefix: String,
    /// Put in front of the stripped topic.
    pub local_prefix: String,
}

impl Default for DownlinkConfig {
    fn default() -> Self {
        DownlinkConfig {
            subscribe: vec!["fieldgate/{gateway_id}/cmd/#".into()],
            strip_prefix: "fieldgate/{gateway_id}/".into(),
            local_prefix: String::new(),
        }
    }
}

/// `[cloud]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CloudConfig {
    /// Set to true (with `host` and `ca_file`) to bridge to the cloud.
    pub enabled: bool,
    /// Host name or IP address to dial.
    pub host: String,
    /// TCP port (MQTT over TLS is usually 8883).
    pub port: u16,
    /// Name the server certificate must carry. Default: `host`.
    pub server_name: String,
    /// PEM file with the CA certificate(s) that signed the cloud broker's certificate.
    pub ca_file: PathBuf,
    /// PEM client certificate for mutual TLS (with `client_key_file`).
    pub client_cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) for `client_cert_file`.
    pub client_key_file: PathBuf,
    /// MQTT username, if the cloud wants one.
    pub username: String,
    /// MQTT password.
    pub password: String,
    /// MQTT client id. Default: the gateway id.
    pub client_id: String,
    /// MQTT protocol version: only `3.1.1` today.
    pub protocol: String,
    /// MQTT keepalive.
    #[serde(with = "humantime_serde")]
    pub keepalive: Duration,
    /// TCP + TLS + CONNACK must complete within this.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Most QoS 1 messages sent and not yet PUBACKed.
    pub max_inflight: u16,
    /// Largest MQTT packet sent or received, in bytes; at least `broker.max_payload_size` + the
    /// cloud prefix + 5.
    pub max_packet_size: usize,
    /// First reconnect delay; doubles per failure, with jitter.
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// Replay pacing in messages per second. 0: unlimited.
    pub replay_msgs_per_sec: u32,
    /// Replay pacing in payload bytes per second. 0: unlimited.
    pub replay_bytes_per_sec: u64,
    /// Retained `online` on connect, last will `offline`. `{gateway_id}` is replaced.
    pub status_topic: String,
}

impl Default for CloudConfig {
    fn default() -> Self {
        CloudConfig {
            enabled: false,
            host: String::new(),
            port: 8883,
            server_name: String::new(),
            ca_file: PathBuf::new(),
            client_cert_file: PathBuf::new(),
            client_key_file: PathBuf::new(),
            username: String::new(),
            password: String::new(),
            client_id: String::new(),
            protocol: "3.1.1".into(),
            keepalive: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            max_inflight: 256,
            max_packet_size: 1024 * 1024,
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(60),
            replay_msgs_per_sec: 0,
            replay_bytes_per_sec: 0,
            status_topic: "fieldgate/{gateway_id}/status".into(),
        }
    }
}

/// `[metrics]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve `/metrics` and `/health`.
    pub enabled: bool,
    /// Address of the HTTP endpoint. Keep it on loopback unless a firewall protects it.
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9183)),
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` filter, e.g. `info` or `fieldgate=debug,rumqttd=warn`. `RUST_LOG` wins.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info,rumqttd=warn".into(),
        }
    }
}

const SECTIONS: &[&str] = &[
    "gateway", "broker", "store", "uplink", "downlink", "cloud", "metrics", "log", "modbus",
    "serial", "ota",
];

fn problem(key: impl Into<String>, message: impl Into<String>) -> Problem {
    Problem {
        key: key.into(),
        message: message.into(),
    }
}

impl Settings {
    /// Loads defaults, then `file` (if any), then `FIELDGATE__SECTION__KEY` variables from
    /// `env`, and validates. Returns every problem found.
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError {
                    problems: vec![problem(
                        "--config",
                        format!(
                            "file {} does not exist; pass an existing TOML file or omit -c to run on built-in defaults",
                            path.display()
                        ),
                    )],
                });
            }
            builder = builder.add_source(
                config::File::from(path.to_path_buf()).format(config::FileFormat::Toml),
            );
        }
        let env: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("FIELDGATE__"))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("FIELDGATE")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(env)),
        );
        let raw = builder.build().map_err(|e| ConfigError {
            problems: vec![problem("--config", format!("{e}; fix the TOML syntax"))],
        })?;
        let table = raw
            .try_deserialize::<BTreeMap<String, config::Value>>()
            .map_err(|e| ConfigError {
                problems: vec![problem("(top level)", e.to_string())],
            })?;
        Self::from_table(table)
    }

    /// Loads from a file and the process environment.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    fn from_table(mut table: BTreeMap<String, config::Value>) -> Result<Settings, ConfigError> {
        let mut problems = Vec::new();
        for key in table.keys() {
            if !SECTIONS.contains(&key.as_str()) {
                problems.push(problem(
                    key.clone(),
                    format!(
                        "unknown section; remove it or use one of: {}",
                        SECTIONS.join(", ")
                    ),
                ));
            }
        }
        let mut s = Settings::default();
        fn section<T: serde::de::DeserializeOwned>(
            table: &mut BTreeMap<String, config::Value>,
            name: &str,
            into: &mut T,
            problems: &mut Vec<Problem>,
        ) {
            if let Some(v) = table.remove(name) {
                match v.try_deserialize::<T>() {
                    Ok(t) => *into = t,
                    Err(e) => problems.push(problem(
                        name,
                        format!("{e}; see configs/fieldgate.toml for the keys and types"),
                    )),
                }
            }
        }
        section(&mut table, "gateway", &mut s.gateway, &mut problems);
        section(&mut table, "broker", &mut s.broker, &mut problems);
        section(&mut table, "store", &mut s.store, &mut problems);
        section(&mut table, "uplink", &mut s.uplink, &mut problems);
        section(&mut table, "downlink", &mut s.downlink, &mut problems);
        section(&mut table, "cloud", &mut s.cloud, &mut problems);
        section(&mut table, "metrics", &mut s.metrics, &mut problems);
        section(&mut table, "log", &mut s.log, &mut problems);
        section(&mut table, "modbus", &mut s.modbus, &mut problems);
        serial_section(&mut table, &mut s.serial, &mut problems);
        section(&mut table, "ota", &mut s.ota, &mut problems);
        problems.extend(s.validate());
        if problems.is_empty() {
            Ok(s)
        } else {
            Err(ConfigError { problems })
        }
    }

    /// Semantic checks across all sections. Returns every problem.
    pub fn validate(&self) -> Vec<Problem> {
        let mut p = Vec::new();
        let id = &self.gateway.id;
        if id.is_empty() || id.contains(['/', '+', '#']) || id.len() > 64 {
            p.push(problem(
                "gateway.id",
                format!("{id:?} is not a usable id; use 1-64 characters without '/', '+' or '#'"),
            ));
        }
        if self.gateway.shutdown_grace > Duration::from_secs(300) {
            p.push(problem(
                "gateway.shutdown_grace",
                "longer than 300s; systemd would kill the process first, use e.g. \"5s\"",
            ));
        }

        // Broker.
        let b = &self.broker;
        if b.listeners.is_empty() {
            p.push(problem(
                "broker.listeners",
                "no listener; add [broker.listeners.default] listen = \"127.0.0.1:1883\"",
            ));
        }
        let mut addrs: Vec<(String, SocketAddr)> = b
            .listeners
            .iter()
            .map(|(n, l)| (format!("broker.listeners.{n}.listen"), l.listen))
            .collect();
        if self.metrics.enabled {
            addrs.push(("metrics.listen".into(), self.metrics.listen));
        }
        for (i, (ka, a)) in addrs.iter().enumerate() {
            for (kb, b2) in &addrs[..i] {
                let clash = a.port() == b2.port()
                    && a.port() != 0
                    && (a.ip() == b2.ip() || a.ip().is_unspecified() || b2.ip().is_unspecified());
                if clash {
                    p.push(problem(
                        ka.clone(),
                        format!(
                            "port {} clashes with {kb} ({b2}); give each its own port",
                            a.port()
                        ),
                    ));
                }
            }
        }
        p.extend(validate_broker_auth(b));
        if b.max_connections < 4 {
            p.push(problem(
                "broker.max_connections",
                "must be at least 4; e.g. 1024",
            ));
        }
        if b.max_payload_size < 1024 {
            p.push(problem(
                "broker.max_payload_size",
                "must be at least 1024 bytes",
            ));
        }
        if b.max_inflight == 0 || b.max_inflight > 65535 {
            p.push(problem(
                "broker.max_inflight",
                "must be 1..=65535; e.g. 100",
            ));
        }
        if b.connect_timeout.as_millis() == 0 || b.connect_timeout > Duration::from_secs(300) {
            p.push(problem(
                "broker.connect_timeout",
                "must be between 1ms and 300s; e.g. \"10s\"",
            ));
        }
        if b.tls_handshake_timeout.as_millis() == 0
            || b.tls_handshake_timeout > Duration::from_secs(300)
        {
            p.push(problem(
                "broker.tls_handshake_timeout",
                "must be between 1ms and 300s; e.g. \"5s\"",
            ));
        }
        if b.max_subscriptions_per_client == 0 {
            p.push(problem(
                "broker.max_subscriptions_per_client",
                "must be at least 1; e.g. 256",
            ));
        }
        if b.failed_login_delay > Duration::from_secs(60) {
            p.push(problem(
                "broker.failed_login_delay",
                "must be at most 60s (it doubles per failure up to 32 times); e.g. \"1s\"",
            ));
        }
        if b.client_id_pattern.contains(['/', '+', '#', '$', '\0'])
            || b.client_id_pattern.contains("%c")
        {
            p.push(problem(
                "broker.client_id_pattern",
                "may hold %u, * and the characters of a client id (no / + # $, no %c); e.g. \"%u\" or \"%u-*\"",
            ));
        }
        if b.max_connections_per_ip == 0 {
            p.push(problem(
                "broker.max_connections_per_ip",
                "must be at least 1; e.g. 64",
            ));
        }
        if b.segment_bytes < 64 * 1024 || b.segment_bytes < b.max_payload_size {
            p.push(problem(
                "broker.segment_bytes",
                "must be at least 65536 and at least broker.max_payload_size; e.g. 1048576",
            ));
        }
        if b.segment_count < 2 {
            p.push(problem(
                "broker.segment_count",
                "must be at least 2; e.g. 4",
            ));
        }

        // Store.
        let st = &self.store;
        if st.max_bytes < 1024 * 1024 {
            p.push(problem(
                "store.max_bytes",
                "must be at least 1048576 (1 MiB)",
            ));
        }
        if st.commit_interval < Duration::from_millis(1)
            || st.commit_interval > Duration::from_secs(10)
        {
            p.push(problem(
                "store.commit_interval",
                "must be between 1ms and 10s; the default 100ms bounds what a power cut can cost",
            ));
        }
        if st.cache_bytes < 1024 * 1024 {
            p.push(problem(
                "store.cache_bytes",
                "must be at least 1048576 (1 MiB)",
            ));
        }

        // Topics.
        for (i, f) in self.uplink.forward.iter().enumerate() {
            if let Err(e) = topic::validate_filter(f) {
                p.push(problem(
                    format!("uplink.forward[{i}]"),
                    format!("{f:?}: {e}"),
                ));
            }
        }
        for (i, f) in self.uplink.exclude.iter().enumerate() {
            if let Err(e) = topic::validate_filter(f) {
                p.push(problem(
                    format!("uplink.exclude[{i}]"),
                    format!("{f:?}: {e}"),
                ));
            }
        }
        let prefix = self.expand(&self.uplink.cloud_prefix);
        if prefix.contains(['+', '#']) {
            p.push(problem(
                "uplink.cloud_prefix",
                "must not contain '+' or '#'; it is put in front of every topic",
            ));
        }
        for (i, f) in self.downlink.subscribe.iter().enumerate() {
            let f = self.expand(f);
            if let Err(e) = topic::validate_filter(&f) {
                p.push(problem(
                    format!("downlink.subscribe[{i}]"),
                    format!("{f:?}: {e}"),
                ));
            }
        }
        if self.downlink.local_prefix.contains(['+', '#']) {
            p.push(problem(
                "downlink.local_prefix",
                "must not contain '+' or '#'",
            ));
        }

        // Cloud.
        let c = &self.cloud;
        if c.enabled {
            if c.host.is_empty() {
                p.push(problem(
                    "cloud.host",
                    "empty; set the cloud broker's host name, or cloud.enabled = false",
                ));
            }
            if c.port == 0 {
                p.push(problem(
                    "cloud.port",
                    "must not be 0; MQTT over TLS is usually 8883",
                ));
            }
            if c.protocol != "3.1.1" {
                p.push(problem(
                    "cloud.protocol",
                    format!("{:?} is not supported; use \"3.1.1\"", c.protocol),
                ));
            }
            if c.ca_file.as_os_str().is_empty() {
                p.push(problem(
                    "cloud.ca_file",
                    "empty; the bridge never connects without TLS: point it at the CA's PEM file",
                ));
            } else {
                check_pem(&mut p, "cloud.ca_file", &c.ca_file, "CERTIFICATE");
            }
            let cert = !c.client_cert_file.as_os_str().is_empty();
            let key = !c.client_key_file.as_os_str().is_empty();
            if cert != key {
                p.push(problem(
                    if cert { "cloud.client_key_file" } else { "cloud.client_cert_file" },
                    "mutual TLS needs both client_cert_file and client_key_file; set both or neither",
                ));
            }
            let before = p.len();
            if cert {
                check_pem(
                    &mut p,
                    "cloud.client_cert_file",
                    &c.client_cert_file,
                    "CERTIFICATE",
                );
            }
            if key {
                check_pem(
                    &mut p,
                    "cloud.client_key_file",
                    &c.client_key_file,
                    "PRIVATE KEY",
                );
            }
            if cert && key && p.len() == before {
                // Both files read: the key must be the certificate's (run would fail on it).
                if let Err(crate::bridge::tls::TlsError::Rustls {
                    key: "cloud.client_key_file",
                    source,
                }) = crate::bridge::tls::client_config(c)
                {
                    p.push(problem(
                        "cloud.client_key_file",
                        format!(
                            "{source}; the key must be the one client_cert_file was issued for"
                        ),
                    ));
                }
            }
            if c.keepalive < Duration::from_secs(5) || c.keepalive > Duration::from_secs(65535) {
                p.push(problem(
                    "cloud.keepalive",
                    "must be between 5s and 65535s; e.g. \"30s\"",
                ));
            }
            if c.connect_timeout < Duration::from_secs(1) {
                p.push(problem(
                    "cloud.connect_timeout",
                    "must be at least 1s; e.g. \"10s\"",
                ));
            }
            if c.max_inflight == 0 {
                p.push(problem(
                    "cloud.max_inflight",
                    "must be at least 1; e.g. 256",
                ));
            }
            if c.max_packet_size < 1024 {
                p.push(problem("cloud.max_packet_size", "must be at least 1024"));
            }
            // Every publish a device may send must fit the cloud packet it becomes, or it
            // could never be delivered after it was acknowledged.
            let fits =
                self.broker.max_payload_size + self.expand(&self.uplink.cloud_prefix).len() + 5;
            if c.max_packet_size < fits {
                p.push(problem(
                    "cloud.max_packet_size",
                    format!("must be at least broker.max_payload_size + the cloud prefix + 5 ({fits}) so every accepted publish fits its cloud packet; raise it or lower broker.max_payload_size"),
                ));
            }
            if c.reconnect_min.is_zero() || c.reconnect_min > c.reconnect_max {
                p.push(problem(
                    "cloud.reconnect_min",
                    "must be above 0 and not above cloud.reconnect_max",
                ));
            }
            let status = self.expand(&c.status_topic);
            if let Err(e) = topic::validate_topic(&status) {
                p.push(problem("cloud.status_topic", format!("{status:?}: {e}")));
            }
        }

        p.extend(crate::sources::modbus::config::validate(
            &self.modbus,
            &self.gateway.id,
        ));
        let links = crate::sources::modbus::buses(&self.modbus).len();
        if links + 4 > self.broker.max_connections {
            p.push(problem(
                "broker.max_connections",
                format!(
                    "{links} Modbus buses each take a broker link; raise it to at least {}",
                    links + 4
                ),
            ));
        }
        p.extend(crate::sources::serial::config::validate(
            &self.serial,
            &self.gateway.id,
        ));
        self.validate_ota(&mut p);
        p
    }

    fn validate_ota(&self, p: &mut Vec<Problem>) {
        let o = &self.ota;
        if !o.enabled {
            return;
        }
        if o.prefix.is_empty() || o.prefix.contains(['+', '#', '/']) || o.prefix.starts_with('$') {
            p.push(problem(
                "ota.prefix",
                format!("{:?}: use one topic level without '/', '+', '#' or a leading '$'; e.g. \"ota\"", o.prefix),
            ));
        }
        if o.chunk_size < 256 || o.chunk_size > OTA_MAX_CHUNK {
            p.push(problem(
                "ota.chunk_size",
                format!("must be 256..={OTA_MAX_CHUNK} bytes; e.g. 16384 (broker.segment_bytes and cloud.max_packet_size are raised to fit it)"),
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
            check_pem(p, "ota.fetch_ca_file", &o.fetch_ca_file, "CERTIFICATE");
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
            if !crate::ota::protocol::valid_device_id(id) {
                p.push(problem(
                    format!("ota.devices.{id}"),
                    "not a usable device id: 1-128 characters without '/', '+', '#', not starting with '_' or '$'",
                ));
            }
        }
    }

    /// The effective OTA cache directory.
    pub fn ota_cache_dir(&self) -> PathBuf {
        if self.ota.cache_dir.as_os_str().is_empty() {
            self.gateway.data_dir.join("ota")
        } else {
            self.ota.cache_dir.clone()
        }
    }

    /// The effective CA file for image downloads.
    pub fn ota_fetch_ca_file(&self) -> PathBuf {
        if self.ota.fetch_ca_file.as_os_str().is_empty() {
            self.cloud.ca_file.clone()
        } else {
            self.ota.fetch_ca_file.clone()
        }
    }

    /// The effective base of the metadata `url`.
    pub fn ota_http_base_url(&self) -> String {
        if !self.ota.http_base_url.is_empty() {
            return self.ota.http_base_url.trim_end_matches('/').to_string();
        }
        let a = self.metrics.listen;
        let host = if a.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            match a.ip() {
                std::net::IpAddr::V6(v6) => format!("[{v6}]"),
                ip => ip.to_string(),
            }
        };
        format!("http://{host}:{}", a.port())
    }

    /// The broker settings the gateway runs with: `segment_bytes` raised so an OTA chunk
    /// fits the router's log. `max_payload_size` stays: it limits what *devices* send, and
    /// chunks only flow from the gateway to devices (the front end writes them unlimited).
    pub fn effective_broker(&self) -> BrokerConfig {
        let mut b = self.broker.clone();
        b.acl.internal.command_identities = self.ota.local_commands.clone();
        if self.ota.enabled {
            let need = self.ota.chunk_size + OTA_PACKET_OVERHEAD;
            b.segment_bytes = b.segment_bytes.max(need);
            // The gateway-only OTA topics follow a custom prefix.
            let prefix = &self.ota.prefix;
            if prefix != "ota" {
                let moved = |list: &[String]| -> Vec<String> {
                    list.iter()
                        .filter_map(|f| f.strip_prefix("ota/"))
                        .map(|rest| format!("{prefix}/{rest}"))
                        .collect()
                };
                let internal = &mut b.acl.internal;
                let gw = moved(&internal.gateway_only);
                let dev = moved(&internal.device_may_publish);
                internal.gateway_only.extend(gw);
                internal.device_may_publish.extend(dev);
            }
        }
        b
    }

    /// The cloud settings the bridge runs with: `max_packet_size` raised so a chunk the cloud
    /// pushes (same size as `ota.chunk_size` or smaller) fits.
    pub fn effective_cloud(&self) -> CloudConfig {
        let mut c = self.cloud.clone();
        if self.ota.enabled {
            c.max_packet_size = c
                .max_packet_size
                .max(self.ota.chunk_size + OTA_PACKET_OVERHEAD);
        }
        c
    }

    /// Replaces `{gateway_id}` in a template.
    pub fn expand(&self, template: &str) -> String {
        template.replace("{gateway_id}", &self.gateway.id)
    }

    /// The effective configuration as TOML (defaults filled in).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    /// Cloud client id: `cloud.client_id` or the gateway id.
    pub fn cloud_client_id(&self) -> String {
        if self.cloud.client_id.is_empty() {
            self.gateway.id.clone()
        } else {
            self.cloud.client_id.clone()
        }
    }
}

/// Listeners, accounts and ACL patterns of `[broker]`.
fn validate_broker_auth(b: &BrokerConfig) -> Vec<Problem> {
    let mut p = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (i, u) in b.users.iter().enumerate() {
        let key = format!("broker.users[{i}]");
        if u.username.is_empty() {
            p.push(problem(
                format!("{key}.username"),
                "empty; give the account a name",
            ));
        } else if !seen.insert(u.username.as_str()) {
            p.push(problem(
                format!("{key}.username"),
                format!("{:?} is listed twice; keep one entry", u.username),
            ));
        }
        match (u.password_hash.is_empty(), u.password.is_empty()) {
            (true, true) => p.push(problem(
                format!("{key}.password_hash"),
                "missing; set password_hash to the output of `fieldgate passwd`",
            )),
            (false, false) => p.push(problem(
                format!("{key}.password"),
                "both password and password_hash are set; keep only password_hash",
            )),
            (false, true) => {
                if let Err(e) = crate::frontend::auth::check_hash(&u.password_hash) {
                    p.push(problem(
                        format!("{key}.password_hash"),
                        format!("{e}; paste the whole line `fieldgate passwd` printed"),
                    ));
                }
            }
            (true, false) => {}
        }
    }
    for (name, l) in &b.listeners {
        let key = format!("broker.listeners.{name}");
        let cert_mode = l.tls.as_ref().map(|t| t.client_cert);
        let nobody = !l.allow_anonymous
            && b.users.is_empty()
            && !matches!(
                cert_mode,
                Some(ClientCertMode::Optional | ClientCertMode::Required)
            );
        if nobody {
            p.push(problem(
                format!("{key}.allow_anonymous"),
                "no client could log in: add [[broker.users]], client certificates (tls.client_cert), or allow_anonymous = true",
            ));
        }
        if let Some(t) = &l.tls {
            let before = p.len();
            check_pem(
                &mut p,
                &format!("{key}.tls.cert_file"),
                &t.cert_file,
                "CERTIFICATE",
            );
            check_pem(
                &mut p,
                &format!("{key}.tls.key_file"),
                &t.key_file,
                "PRIVATE KEY",
            );
            if p.len() == before {
                // Both files read: the key must be the certificate's (run would fail on it).
                let only_pair = ListenerTlsConfig {
                    client_cert: ClientCertMode::None,
                    ..t.clone()
                };
                if let Err(crate::frontend::tls::ListenerTlsError::Rustls { why, .. }) =
                    crate::frontend::tls::server_config(name, &only_pair)
                {
                    p.push(problem(
                        format!("{key}.tls.key_file"),
                        format!("is not the key of cert_file (rustls: {why}); use the key the certificate was issued for"),
                    ));
                }
            }
            let ca = !t.client_ca_file.as_os_str().is_empty();
            if t.client_cert != ClientCertMode::None && !ca {
                p.push(problem(
                    format!("{key}.tls.client_ca_file"),
                    "client certificates are asked for but no CA is given; set client_ca_file to the devices' CA PEM",
                ));
            }
            if ca {
                check_pem(
                    &mut p,
                    &format!("{key}.tls.client_ca_file"),
                    &t.client_ca_file,
                    "CERTIFICATE",
                );
            }
        }
    }
    let rules = std::iter::once(("broker.acl.default".to_string(), &b.acl.default)).chain(
        b.acl
            .users
            .iter()
            .map(|(u, r)| (format!("broker.acl.users.{u}"), r)),
    );
    let internal = &b.acl.internal;
    for (what, list) in [
        ("gateway_only", &internal.gateway_only),
        ("device_may_publish", &internal.device_may_publish),
        ("commands", &internal.commands),
    ] {
        for (i, f) in list.iter().enumerate() {
            if let Err(e) = topic::validate_filter(f) {
                p.push(problem(
                    format!("broker.acl.internal.{what}[{i}]"),
                    format!("{f:?}: {e}"),
                ));
            }
        }
    }
    for (key, r) in rules {
        for (what, list) in [
            ("publish", &r.publish),
            ("subscribe", &r.subscribe),
            ("deny_publish", &r.deny_publish),
            ("deny_subscribe", &r.deny_subscribe),
        ] {
            for (i, pat) in list.iter().enumerate() {
                // %u / %c stand for one level; check the shape with a placeholder.
                let probe = pat.replace("%u", "x").replace("%c", "x");
                if let Err(e) = topic::validate_filter(&probe) {
                    p.push(problem(
                        format!("{key}.{what}[{i}]"),
                        format!("{pat:?}: {e}"),
                    ));
                }
            }
        }
    }
    p
}

/// `[[serial]]`: each device is deserialized on its own, so every device with a type error is
/// named (`serial[i]`). The semantic checks of the devices run only once all of them parse,
/// because their keys carry the device's index.
fn serial_section(
    table: &mut BTreeMap<String, config::Value>,
    into: &mut Vec<SerialDeviceConfig>,
    problems: &mut Vec<Problem>,
) {
    let Some(v) = table.remove("serial") else {
        return;
    };
    let Ok(items) = v.into_array() else {
        problems.push(problem(
            "serial",
            "must be an array of tables: start each device with [[serial]]",
        ));
        return;
    };
    let mut devices = Vec::new();
    let mut ok = true;
    for (i, item) in items.into_iter().enumerate() {
        match item.try_deserialize::<SerialDeviceConfig>() {
            Ok(d) => devices.push(d),
            Err(e) => {
                ok = false;
                problems.push(problem(
                    format!("serial[{i}]"),
                    format!("{e}; see docs/serial.md for the keys and types"),
                ));
            }
        }
    }
    if ok {
        *into = devices;
    }
}

fn check_pem(p: &mut Vec<Problem>, key: &str, path: &Path, what: &str) {
    match std::fs::read_to_string(path) {
        Err(e) => p.push(problem(
            key,
            format!(
                "cannot read {}: {e}; check the path and its permissions",
                path.display()
            ),
        )),
        Ok(text) if !text.contains("-----BEGIN ") || !text.contains(what) => p.push(problem(
            key,
            format!("{} holds no PEM {what} block", path.display()),
        )),
        Ok(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.toml");
        std::fs::write(&path, toml).unwrap();
        Settings::load_from(
            Some(&path),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn empty_file_is_the_defaults() {
        let s = load("", &[]).unwrap();
        assert_eq!(s, Settings::default());
        assert!(!s.cloud.enabled);
    }

    #[test]
    fn env_overrides_file() {
        let s = load(
            "[store]\nmax_bytes = 2000000\n",
            &[
                ("FIELDGATE__STORE__MAX_BYTES", "3000000"),
                ("FIELDGATE__GATEWAY__ID", "pi7"),
            ],
        )
        .unwrap();
        assert_eq!(s.store.max_bytes, 3_000_000);
        assert_eq!(s.gateway.id, "pi7");
    }

    #[test]
    fn every_problem_is_listed() {
        let err = load(
            r#"
            bogus = 1
            [gateway]
            id = "a/b"
            [store]
            max_bytes = "lots"
            [broker.listeners.default]
            listen = "127.0.0.1:9183"
            [cloud]
            enabled = true
            ca_file = "/nonexistent/ca.pem"
            client_cert_file = "/nonexistent/c.pem"
            "#,
            &[],
        )
        .unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        for want in [
            "bogus",
            "store",
            "gateway.id",
            "metrics.listen",
            "cloud.host",
            "cloud.ca_file",
            "cloud.client_key_file",
            "cloud.client_cert_file",
        ] {
            assert!(keys.contains(&want), "{want} missing from {keys:?}");
        }
    }

    #[test]
    fn a_device_publish_must_fit_the_cloud_packet() {
        let cloud = "[cloud]\nenabled = true\nhost = \"c\"\nca_file = \"/nonexistent/ca.pem\"\n";
        let keys = |extra: &str| -> Vec<String> {
            let err = load(&format!("{cloud}{extra}"), &[]).unwrap_err();
            err.problems.into_iter().map(|p| p.key).collect()
        };
        let ok = keys("max_packet_size = 1048576\n[broker]\nmax_payload_size = 1048000\n");
        assert!(!ok.contains(&"cloud.max_packet_size".to_string()), "{ok:?}");
        let tight = keys("max_packet_size = 1048576\n[broker]\nmax_payload_size = 1048576\n");
        assert!(
            tight.contains(&"cloud.max_packet_size".to_string()),
            "{tight:?}"
        );
    }

    #[test]
    fn unknown_key_in_section_is_named() {
        let err = load("[store]\nmax_byte = 5\n", &[]).unwrap_err();
        assert_eq!(err.problems.len(), 1);
        assert!(err.problems[0].to_string().contains("max_byte"), "{}", err);
    }

    #[test]
    fn broker_rate_limit_keys_load_and_a_bad_policy_names_the_choices() {
        let s = load(
            "[broker]\nmax_publish_rate = 50\npublish_burst = 10\nrate_limit_policy = \"disconnect\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(s.broker.max_publish_rate, 50);
        assert_eq!(s.broker.publish_burst, 10);
        assert_eq!(s.broker.rate_limit_policy, RateLimitPolicy::Disconnect);
        let err = load("[broker]\nrate_limit_policy = \"slow\"\n", &[]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("rate_limit_policy"), "{text}");
        assert!(text.contains("slow_down, drop, disconnect"), "{text}");
        let err = load(
            "[broker.listeners.x]\nlisten = \"127.0.0.1:1\"\nallow_anonymous = true\n\
             [broker.listeners.x.tls]\ncert_file = \"a\"\nkey_file = \"b\"\nclient_cert = \"maybe\"\n",
            &[],
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("none, optional, required"),
            "{err}"
        );
    }

    #[test]
    fn serial_devices_load_and_print_back() {
        let s = load(
            r#"
            [[serial]]
            name = "scale"
            port = "/dev/ttyUSB0"
            baud = 19200
            parity = "even"
            write_line_ending = "\r\n"
            [serial.framing]
            delimiter = "\r\n"
            max_length = 64
            [serial.decode]
            mode = "regex"
            pattern = '^(?P<Weight>\S+) kg$'
            [[serial]]
            name = "gps"
            port = "/dev/ttyACM0"
            "#,
            &[],
        )
        .unwrap();
        assert_eq!(s.serial.len(), 2);
        let scale = &s.serial[0];
        assert_eq!(scale.framing.delimiter, "\r\n");
        assert_eq!(scale.decode.pattern, r"^(?P<Weight>\S+) kg$");
        assert_eq!(scale.parity, crate::sources::serial::config::Parity::Even);
        assert_eq!(s.serial[1].framing.max_length, 4096);
        let back = load(&s.to_toml(), &[]).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn serial_problems_name_the_device_key() {
        let err = load(
            r#"
            [[serial]]
            name = "a"
            port = "/dev/a"
            [serial.framing]
            delimiter = ""
            [[serial]]
            name = "a"
            port = "/dev/b"
            "#,
            &[],
        )
        .unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["serial[0].framing.delimiter", "serial[1].name"]);
        // Type errors are listed per device.
        let err = load(
            "[[serial]]\nname = \"a\"\nspeed = 9600\n[[serial]]\nbaud = \"fast\"\n",
            &[],
        )
        .unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["serial[0]", "serial[1]"], "{err}");
        assert!(err.problems[0].message.contains("speed"), "{err}");
    }

    #[test]
    fn ota_problems_name_their_keys() {
        let err = load(
            r#"
            [ota]
            prefix = "a/b"
            chunk_size = 10
            max_concurrent_downloads = 0
            http_base_url = "ftp://x"
            fetch_ca_file = "/nonexistent/ca.pem"
            [ota.devices."_bad"]
            tags = ["x"]
            "#,
            &[],
        )
        .unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        for want in [
            "ota.prefix",
            "ota.chunk_size",
            "ota.max_concurrent_downloads",
            "ota.http_base_url",
            "ota.fetch_ca_file",
            "ota.devices._bad",
        ] {
            assert!(keys.contains(&want), "{want} missing from {keys:?}");
        }
        // A big chunk raises the router's segments and the bridge's packet limit, not what
        // devices may send.
        let s = load("[ota]\nchunk_size = 1048576\n", &[]).unwrap();
        assert_eq!(
            s.effective_broker().max_payload_size,
            s.broker.max_payload_size
        );
        assert!(s.effective_broker().segment_bytes >= 1048576 + OTA_PACKET_OVERHEAD);
        // A custom OTA prefix moves the gateway-only topics with it.
        let fw = load("[ota]\nprefix = \"fw\"\n", &[]).unwrap();
        let internal = fw.effective_broker().acl.internal;
        assert!(internal.gateway_only.contains(&"fw/+/metadata".to_string()));
        assert!(internal.gateway_only.contains(&"fw/_gateway/#".to_string()));
        assert!(internal
            .device_may_publish
            .contains(&"fw/+/chunk/get".to_string()));
        assert!(s.effective_cloud().max_packet_size >= 1048576 + OTA_PACKET_OVERHEAD);
        assert_eq!(s.ota_http_base_url(), "http://127.0.0.1:9183");
    }

    #[test]
    fn printed_config_loads_back() {
        let s = Settings::default();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, s.to_toml()).unwrap();
        let back = Settings::load_from(Some(&path), Vec::new()).unwrap();
        assert_eq!(back, s);
    }
}
