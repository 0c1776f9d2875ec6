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
//! - once loaded, the sources' topic templates carry no namespace placeholder: loading fills
//!   `[gateway.namespace]` (`{enterprise}`, `{site}`, `{area}`, `{line}`, the default topic
//!   root) into every `[[modbus]]` and `[[serial]]` device's templates (the namespace step,
//!   before [`Settings::validate`]), so components only fill `{gateway_id}`, `{device}`,
//!   `{tag}`. A device that does not set a topic key gets `<root>/<its default tail>`; which
//!   keys a device sets is read from the file's table, not from the typed value.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::bridge::config::{CloudConfig, DownlinkConfig};
use crate::frontend::config::BrokerConfig;
use crate::http::HttpConfig;
use crate::ingest::UplinkConfig;
use crate::ota::config::{OtaConfig, OtaPaths};
use crate::problem::{problem, Problem};
use crate::sources::modbus::config::ModbusDeviceConfig;
use crate::sources::serial::config::SerialDeviceConfig;
use crate::store::config::StoreConfig;
use crate::topic::{self, DeviceTemplate, FillError, Namespace};

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
    /// The HTTP endpoint: `/metrics`, `/health`, OTA routes, the operator page and its API.
    /// Loads from the old name `[metrics]` too (with a warning).
    pub http: HttpConfig,
    /// Logging.
    pub log: LogConfig,
    /// `[[modbus]]`: Modbus TCP and RTU devices polled into the local broker.
    pub modbus: Vec<ModbusDeviceConfig>,
    /// Serial-line devices, one `[[serial]]` table each (see docs/serial.md).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub serial: Vec<SerialDeviceConfig>,
    /// Firmware updates: fetch once from the cloud, serve to local devices (see docs/ota.md).
    pub ota: OtaConfig,
    /// The uplink as a Sparkplug B edge node (see docs/sparkplug.md). Off by default.
    pub sparkplug: crate::sparkplug::SparkplugConfig,
    /// What loading found that still works but should change (an old section name); the
    /// gateway logs each once as a warning when it starts. Not part of the configuration.
    #[serde(skip)]
    pub notices: Vec<String>,
}

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
    /// `[gateway.namespace]`: the plant's ISA-95 levels and the root of the sources' default
    /// topics. Nothing set: the default topics are `field/{device}/...`, as always.
    #[serde(skip_serializing_if = "NamespaceConfig::is_unset")]
    pub namespace: NamespaceConfig,
}

/// `[gateway.namespace]`: where this gateway sits in the plant (ISA-95 levels, each one topic
/// level) and the root of every source device's default topics. The levels are the
/// placeholders `{enterprise}`, `{site}`, `{area}`, `{line}` of every `[[modbus]]` and
/// `[[serial]]` topic key and of `topic_root`; a device may set its own `area` and `line`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NamespaceConfig {
    /// ISA-95 enterprise, e.g. `"acme"`. No `/`, `+`, `#`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enterprise: Option<String>,
    /// ISA-95 site, e.g. `"plant1"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// ISA-95 area, e.g. `"packaging"`; a device's `area` overrides it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub area: Option<String>,
    /// ISA-95 line (work center), e.g. `"line3"`; a device's `line` overrides it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<String>,
    /// Root of the sources' default topics (`<root>/{device}/{tag}`, `<root>/{device}/status`,
    /// ...): the levels and `{gateway_id}` may be used. Default (absent):
    /// `{enterprise}/{site}/{area}/{line}` for a device whose four levels are all set, else
    /// `field`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic_root: Option<String>,
}

impl NamespaceConfig {
    /// The levels, as the topic templates are filled with them.
    pub fn levels(&self) -> Namespace {
        Namespace {
            enterprise: self.enterprise.clone(),
            site: self.site.clone(),
            area: self.area.clone(),
            line: self.line.clone(),
        }
    }

    /// Nothing set (the printed configuration leaves the table out).
    pub fn is_unset(&self) -> bool {
        *self == NamespaceConfig::default()
    }

    /// Every problem of the keys on their own: the levels and the root's spelling.
    fn validate(&self) -> Vec<Problem> {
        let mut p = Vec::new();
        let levels = [
            ("enterprise", &self.enterprise),
            ("site", &self.site),
            ("area", &self.area),
            ("line", &self.line),
        ];
        for (name, value) in levels {
            let Some(v) = value else { continue };
            if let Err(e) = topic::validate_level(v) {
                p.push(problem(
                    format!("gateway.namespace.{name}"),
                    format!("{v:?}: {e}"),
                ));
            }
        }
        if let Some(root) = &self.topic_root {
            if let Err(e) = root_spelling(root) {
                p.push(problem(
                    "gateway.namespace.topic_root",
                    format!("{root:?}: {e}"),
                ));
            }
        }
        p
    }
}

/// A topic root is the first levels of a topic name: no wildcards, no empty level at either
/// end (the default topics append `/{device}/...`).
fn root_spelling(root: &str) -> Result<(), &'static str> {
    if root.is_empty() {
        return Err(
            "empty; e.g. \"field\" or \"{enterprise}/{site}/{area}/{line}\", or remove the key",
        );
    }
    if root.starts_with('/') || root.ends_with('/') {
        return Err("must not start or end with '/'; the default topics add \"/{device}/...\"");
    }
    topic::validate_topic(root)
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
            namespace: NamespaceConfig::default(),
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

/// What a secret reads as in [`Settings::redacted`].
pub const REDACTED: &str = "<redacted>";

const SECTIONS: &[&str] = &[
    "gateway",
    "broker",
    "store",
    "uplink",
    "downlink",
    "cloud",
    "http",
    "metrics",
    "log",
    "modbus",
    "serial",
    "ota",
    "sparkplug",
];

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
        // Which topic keys each device sets itself, before the devices are typed values.
        let modbus_keys = device_keys(&table, "modbus");
        let serial_keys = device_keys(&table, "serial");
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
        http_section(&mut table, &mut s, &mut problems);
        section(&mut table, "log", &mut s.log, &mut problems);
        section(&mut table, "modbus", &mut s.modbus, &mut problems);
        serial_section(&mut table, &mut s.serial, &mut problems);
        section(&mut table, "ota", &mut s.ota, &mut problems);
        section(&mut table, "sparkplug", &mut s.sparkplug, &mut problems);
        problems.extend(s.fill_namespace(&modbus_keys, &serial_keys));
        problems.extend(s.validate());
        if problems.is_empty() {
            Ok(s)
        } else {
            Err(ConfigError { problems })
        }
    }

    /// Semantic checks across all sections. Returns every problem.
    pub fn validate(&self) -> Vec<Problem> {
        let expand = |t: &str| self.expand(t);
        let mut p = self.validate_gateway();
        p.extend(self.broker.validate());
        self.check_ports(&mut p);
        p.extend(self.store.validate());
        p.extend(self.uplink.validate(&expand));
        p.extend(self.downlink.validate(&expand));
        p.extend(self.cloud.validate(&expand));
        if self.cloud.enabled {
            self.check_cloud_packet(&mut p);
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
        p.extend(self.ota.validate());
        p.extend(self.http.validate());
        p.extend(self.sparkplug.validate(self.cloud.enabled));
        if self.sparkplug.enabled {
            for (i, s) in self.serial.iter().enumerate() {
                if self.modbus.iter().any(|m| m.name == s.name) {
                    p.push(problem(
                        format!("serial[{i}].name"),
                        format!(
                            "{:?} is also a [[modbus]] device; Sparkplug device ids must differ, rename one",
                            s.name
                        ),
                    ));
                }
            }
        }
        p
    }

    /// The Sparkplug devices of `[sparkplug]`: every Modbus device, then every serial one.
    pub fn sparkplug_devices(&self) -> Vec<crate::sparkplug::DeviceSpec> {
        let id = &self.gateway.id;
        let mut d = crate::sources::modbus::sparkplug::devices(&self.modbus, id);
        d.extend(crate::sources::serial::sparkplug::devices(&self.serial, id));
        d
    }

    /// The namespace step of loading: fills `[gateway.namespace]` into the topic templates of
    /// every `[[modbus]]` and `[[serial]]` device. `modbus_keys[i]` / `serial_keys[i]` are the
    /// keys device `i` sets: a topic key it sets keeps its template (levels filled in); one
    /// it does not set becomes `<root>/<default tail>`. Returns the placeholders that cannot
    /// be filled (unknown, or a level not set), each under the key that uses it. While a
    /// level or the root is misspelt it only checks and leaves the templates as they are:
    /// [`Settings::validate`] reports those, and filling them in would only repeat the
    /// problem in every topic.
    fn fill_namespace(
        &mut self,
        modbus_keys: &[BTreeSet<String>],
        serial_keys: &[BTreeSet<String>],
    ) -> Vec<Problem> {
        let mut p = Vec::new();
        let cfg = self.gateway.namespace.clone();
        let devices_ok = self
            .modbus
            .iter()
            .map(|d| [&d.area, &d.line])
            .chain(self.serial.iter().map(|d| [&d.area, &d.line]))
            .flatten()
            .flatten()
            .all(|v| topic::validate_level(v).is_ok());
        let write = cfg.validate().is_empty() && devices_ok;
        let ns = cfg.levels();
        let root = cfg.topic_root.as_deref();
        // The root's own problems (an unknown placeholder, a gateway-wide level not set) are
        // named once, under its key; area and line may still come from each device.
        let mut root_ok = true;
        if let Some(r) = root {
            let any_device = ns.for_device(Some("area"), Some("line"));
            if let Err(e) = any_device.fill(r, ROOT_KEEP) {
                root_ok = false;
                p.push(problem(
                    "gateway.namespace.topic_root",
                    fill_fix(&e, "gateway.namespace.topic_root", ROOT_KEEP),
                ));
            }
        }
        let mut stay_under_field = Vec::new();
        let empty = BTreeSet::new();
        for (i, d) in self.modbus.iter_mut().enumerate() {
            let device = Device {
                key: format!("modbus[{i}]"),
                levels: ns.for_device(d.area.as_deref(), d.line.as_deref()),
                sets: modbus_keys.get(i).unwrap_or(&empty),
                write,
            };
            device.fill(root, root_ok, d.templates(), &mut p, &mut stay_under_field);
        }
        for (i, d) in self.serial.iter_mut().enumerate() {
            let device = Device {
                key: format!("serial[{i}]"),
                levels: ns.for_device(d.area.as_deref(), d.line.as_deref()),
                sets: serial_keys.get(i).unwrap_or(&empty),
                write,
            };
            device.fill(root, root_ok, d.templates(), &mut p, &mut stay_under_field);
        }
        if !stay_under_field.is_empty() {
            self.notices.push(format!(
                "[gateway.namespace] sets ISA-95 levels, but not all four for {}, so their \
                 default topics stay under {}/; set the missing enterprise, site, area or line \
                 (area and line may be set per device), or set gateway.namespace.topic_root",
                stay_under_field.join(", "),
                topic::DEFAULT_ROOT
            ));
        }
        p
    }

    /// `[gateway]`.
    fn validate_gateway(&self) -> Vec<Problem> {
        let mut p = self.gateway.namespace.validate();
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
        p
    }

    /// No two listeners (device listeners, the HTTP endpoint) on one port.
    fn check_ports(&self, p: &mut Vec<Problem>) {
        let b = &self.broker;
        let mut addrs: Vec<(String, SocketAddr)> = b
            .listeners
            .iter()
            .map(|(n, l)| (format!("broker.listeners.{n}.listen"), l.listen))
            .collect();
        if self.http.enabled {
            addrs.push(("http.listen".into(), self.http.listen));
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
    }

    /// Every publish a device may send must fit the cloud packet it becomes.
    fn check_cloud_packet(&self, p: &mut Vec<Problem>) {
        let c = &self.cloud;
        // Every publish a device may send must fit the cloud packet it becomes, or it
        // could never be delivered after it was acknowledged.
        let fits = self.broker.max_payload_size + self.expand(&self.uplink.cloud_prefix).len() + 5;
        if c.max_packet_size < fits {
            p.push(problem(
                "cloud.max_packet_size",
                format!("must be at least broker.max_payload_size + the cloud prefix + 5 ({fits}) so every accepted publish fits its cloud packet; raise it or lower broker.max_payload_size"),
            ));
        }
    }

    /// What the OTA manager needs from other sections, computed once: the cache directory
    /// (`ota.cache_dir`, else `<data_dir>/ota`), the CA for downloads (`ota.fetch_ca_file`,
    /// else `cloud.ca_file`) and the base of the metadata `url` (`ota.http_base_url`, else
    /// the HTTP endpoint's address, `http.listen`, as `https://` with `[http.tls]`).
    pub fn ota_paths(&self) -> OtaPaths {
        let cache_dir = if self.ota.cache_dir.as_os_str().is_empty() {
            self.gateway.data_dir.join("ota")
        } else {
            self.ota.cache_dir.clone()
        };
        let fetch_ca_file = if self.ota.fetch_ca_file.as_os_str().is_empty() {
            self.cloud.ca_file.clone()
        } else {
            self.ota.fetch_ca_file.clone()
        };
        let http_base_url = if !self.ota.http_base_url.is_empty() {
            self.ota.http_base_url.trim_end_matches('/').to_string()
        } else {
            let a = self.http.listen;
            let host = if a.ip().is_unspecified() {
                "127.0.0.1".to_string()
            } else {
                match a.ip() {
                    std::net::IpAddr::V6(v6) => format!("[{v6}]"),
                    ip => ip.to_string(),
                }
            };
            let scheme = if self.http.tls.is_some() {
                "https"
            } else {
                "http"
            };
            format!("{scheme}://{host}:{}", a.port())
        };
        OtaPaths {
            cache_dir,
            fetch_ca_file,
            http_base_url,
        }
    }

    /// The broker settings the gateway runs with: `segment_bytes` raised so an OTA chunk
    /// fits the router's log. `max_payload_size` stays: it limits what *devices* send, and
    /// chunks only flow from the gateway to devices (the front end writes them unlimited).
    pub fn effective_broker(&self) -> BrokerConfig {
        let mut b = self.broker.clone();
        crate::ota::contract::internal_topics(&self.ota, &mut b.acl.internal);
        if let Some(need) = crate::ota::contract::max_packet(&self.ota) {
            b.segment_bytes = b.segment_bytes.max(need);
        }
        b
    }

    /// The cloud settings the bridge runs with: `max_packet_size` raised so a chunk the cloud
    /// pushes (same size as `ota.chunk_size` or smaller) fits.
    pub fn effective_cloud(&self) -> CloudConfig {
        let mut c = self.cloud.clone();
        if let Some(need) = crate::ota::contract::max_packet(&self.ota) {
            c.max_packet_size = c.max_packet_size.max(need);
        }
        c
    }

    /// Replaces `{gateway_id}` in a template.
    pub fn expand(&self, template: &str) -> String {
        crate::topic::with_gateway_id(template, &self.gateway.id)
    }

    /// The effective configuration as TOML (defaults filled in).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    /// A copy with every secret that is set replaced by [`REDACTED`], for the operator page:
    /// the broker users' `password` and `password_hash`, `cloud.password`, the page
    /// accounts' `password_hash` and `http.metrics_token`. Paths of key files stay (the files' contents are never in the configuration).
    pub fn redacted(&self) -> Settings {
        let mut s = self.clone();
        let hide = |v: &mut String| {
            if !v.is_empty() {
                *v = REDACTED.into();
            }
        };
        for u in &mut s.http.admin.users {
            hide(&mut u.password_hash);
        }
        hide(&mut s.http.metrics_token);
        for u in &mut s.broker.users {
            hide(&mut u.password);
            hide(&mut u.password_hash);
        }
        hide(&mut s.cloud.password);
        s
    }
}

/// What `gateway.namespace.topic_root` may name besides the levels: the default topics'
/// root is filled later with the rest of the template.
const ROOT_KEEP: &[&str] = &["gateway_id"];

/// One source device in the namespace step: its key (`modbus[2]`), its levels (the gateway's
/// with its own `area` and `line`), the keys it sets itself, and whether its templates are
/// rewritten (false: only checked).
struct Device<'a> {
    key: String,
    levels: Namespace,
    sets: &'a BTreeSet<String>,
    write: bool,
}

impl Device<'_> {
    /// Rewrites `templates` (see [`Settings::fill_namespace`]). A device whose defaults stay
    /// under `field` although some level is set is added to `stay_under_field`.
    fn fill(
        &self,
        root: Option<&str>,
        root_ok: bool,
        templates: [DeviceTemplate<'_>; 3],
        p: &mut Vec<Problem>,
        stay_under_field: &mut Vec<String>,
    ) {
        let mut root_filled: Option<Option<String>> = None;
        for t in templates {
            let key = format!("{}.{}", self.key, t.key);
            if self.sets.contains(t.key) {
                match self.levels.fill(t.template, t.keep) {
                    Ok(filled) if self.write => *t.template = filled,
                    Ok(_) => {}
                    Err(e) => p.push(problem(&key, self.fix(&e, &key, t.keep))),
                }
                continue;
            }
            // The default: `<root>/<tail>`, the root worked out once per device.
            let filled =
                root_filled.get_or_insert_with(|| self.root(root, root_ok, p, stay_under_field));
            if let (Some(r), true) = (filled, self.write) {
                *t.template = format!("{r}/{}", t.default_tail);
            }
        }
    }

    /// This device's default topic root, or `None` when it cannot be filled (the problem is
    /// pushed here for a missing area or line, under `gateway.namespace.topic_root` else).
    fn root(
        &self,
        root: Option<&str>,
        root_ok: bool,
        p: &mut Vec<Problem>,
        stay_under_field: &mut Vec<String>,
    ) -> Option<String> {
        let template = match root {
            Some(_) if !root_ok => return None,
            Some(r) => r,
            None if self.levels.is_complete() => topic::ISA95_ROOT,
            None => {
                if !self.levels.is_empty() {
                    stay_under_field.push(self.key.clone());
                }
                topic::DEFAULT_ROOT
            }
        };
        match self.levels.fill(template, ROOT_KEEP) {
            Ok(r) => Some(r),
            Err(FillError::Unset(level)) => {
                p.push(problem(
                    format!("{}.{level}", self.key),
                    format!(
                        "gateway.namespace.topic_root uses {{{level}}} for this device's default \
                         topics, but neither gateway.namespace.{level} nor this device sets \
                         {level}; set {level} here or in [gateway.namespace]"
                    ),
                ));
                None
            }
            Err(_) => None,
        }
    }

    fn fix(&self, e: &FillError, key: &str, keep: &[&str]) -> String {
        match e {
            FillError::Unset(level @ ("area" | "line")) => format!(
                "uses {{{level}}}, but neither gateway.namespace.{level} nor {}.{level} is set; \
                 set one of them or remove {{{level}}}",
                self.key
            ),
            _ => fill_fix(e, key, keep),
        }
    }
}

/// The message of a template's fill error, with the fix.
fn fill_fix(e: &FillError, key: &str, keep: &[&str]) -> String {
    match e {
        FillError::Unknown(name) => {
            let known: Vec<String> = keep
                .iter()
                .chain(topic::LEVELS.iter())
                .map(|n| format!("{{{n}}}"))
                .collect();
            format!(
                "{{{name}}} is not a placeholder of {key}; use {} or remove it",
                known.join(", ")
            )
        }
        FillError::Unset(level) => format!(
            "uses {{{level}}}, but gateway.namespace.{level} is not set; set it or remove \
             {{{level}}}"
        ),
        FillError::Unclosed => "has a '{' without its '}'; close the placeholder".to_string(),
    }
}

/// The keys each device of the array of tables `section` (`[[modbus]]`, `[[serial]]`) sets,
/// in order: what the namespace step needs to tell a topic key that was written from one
/// left at its default. Whatever is not an array of tables is left to the section's own
/// deserialization to report.
fn device_keys(table: &BTreeMap<String, config::Value>, section: &str) -> Vec<BTreeSet<String>> {
    let Some(Ok(items)) = table.get(section).map(|v| v.clone().into_array()) else {
        return Vec::new();
    };
    items
        .into_iter()
        .map(|item| {
            item.into_table()
                .map(|t| t.keys().cloned().collect())
                .unwrap_or_default()
        })
        .collect()
}

/// `[http]`, or its old name `[metrics]` (same keys) with a notice naming the new one. Both
/// at once (in the file or from `FIELDGATE__METRICS__*` / `FIELDGATE__HTTP__*` variables)
/// is a problem: which one would win is not obvious to whoever reads the file.
fn http_section(
    table: &mut BTreeMap<String, config::Value>,
    s: &mut Settings,
    problems: &mut Vec<Problem>,
) {
    let new = table.remove("http");
    let old = table.remove("metrics");
    let (name, value) = match (new, old) {
        (Some(_), Some(_)) => {
            problems.push(problem(
                "metrics",
                "[metrics] is the old name of [http] and both are set; move its keys into \
                 [http] (metrics.listen becomes http.listen) and delete [metrics]",
            ));
            return;
        }
        (Some(v), None) => ("http", v),
        (None, Some(v)) => {
            s.notices.push(
                "[metrics] is now called [http]: rename the section (metrics.listen is \
                 http.listen, FIELDGATE__METRICS__LISTEN is FIELDGATE__HTTP__LISTEN); the old \
                 name still works"
                    .into(),
            );
            ("metrics", v)
        }
        (None, None) => return,
    };
    match value.try_deserialize::<HttpConfig>() {
        Ok(h) => {
            s.notices.extend(h.page_off_notice());
            s.http = h;
        }
        Err(e) => problems.push(problem(
            name,
            format!("{e}; see configs/fieldgate.toml for the keys and types"),
        )),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::config::RateLimitPolicy;
    use crate::ota::contract::PACKET_OVERHEAD as OTA_PACKET_OVERHEAD;

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
    fn sparkplug_needs_a_group_the_cloud_and_distinct_device_ids() {
        let text = r#"
            [sparkplug]
            enabled = true
            [[modbus]]
            name = "meter"
            host = "127.0.0.1:502"
            [[modbus.tags]]
            name = "t"
            address = 1
            [[serial]]
            name = "meter"
            port = "/dev/ttyUSB0"
        "#;
        let keys: Vec<String> = load(text, &[])
            .unwrap_err()
            .problems
            .into_iter()
            .map(|p| p.key)
            .collect();
        for k in ["sparkplug.group_id", "sparkplug.enabled", "serial[0].name"] {
            assert!(keys.contains(&k.to_string()), "{k} in {keys:?}");
        }
        let env = [("FIELDGATE__SPARKPLUG__GROUP_ID", "plant")];
        let s = load("[sparkplug]\nenabled = false\n", &env).unwrap();
        assert_eq!(s.sparkplug.group_id, "plant");
        assert_eq!(s.sparkplug.edge_node(&s.gateway.id), "fieldgate");
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
            "http.listen",
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
        assert_eq!(s.ota_paths().http_base_url, "http://127.0.0.1:9183");
        let mut tls = s.clone();
        tls.http.tls = Some(crate::tls::ServerTlsConfig {
            cert_file: "c.pem".into(),
            key_file: "k.pem".into(),
            client_ca_file: Default::default(),
            client_cert: Default::default(),
        });
        assert_eq!(tls.ota_paths().http_base_url, "https://127.0.0.1:9183");
    }

    #[test]
    fn the_old_metrics_section_still_loads_and_says_its_new_name() {
        let new = load("[http]\nlisten = \"127.0.0.1:9999\"\npage = false\n", &[]).unwrap();
        assert_eq!(new.http.listen, "127.0.0.1:9999".parse().unwrap());
        assert!(!new.http.serves_page());
        assert!(new.notices.is_empty());
        let old = load("[metrics]\nlisten = \"127.0.0.1:9999\"\n", &[]).unwrap();
        assert_eq!(old.http.listen, new.http.listen);
        assert!(
            old.http.serves_page(),
            "keys [metrics] does not set keep their defaults"
        );
        assert_eq!(old.notices.len(), 1);
        assert!(old.notices[0].contains("http.listen"), "{:?}", old.notices);
        // The old environment name still works; the new one too.
        let env = load("", &[("FIELDGATE__METRICS__LISTEN", "127.0.0.1:9998")]).unwrap();
        assert_eq!(env.http.listen, "127.0.0.1:9998".parse().unwrap());
        let env = load("", &[("FIELDGATE__HTTP__LISTEN", "127.0.0.1:9997")]).unwrap();
        assert_eq!(env.http.listen, "127.0.0.1:9997".parse().unwrap());
        assert!(env.notices.is_empty());
        // Both: a problem naming both and the fix.
        let err = load(
            "[metrics]\nlisten = \"127.0.0.1:1\"\n[http]\nlisten = \"127.0.0.1:2\"\n",
            &[],
        )
        .unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        let text = err.to_string();
        assert!(
            text.contains("[metrics]") && text.contains("[http]"),
            "{text}"
        );
        assert!(text.contains("delete [metrics]"), "{text}");
        // A wrong key is named under the section it was written in.
        let err = load("[metrics]\nlisten = 5\n", &[]).unwrap_err();
        assert_eq!(err.problems[0].key, "metrics", "{err}");
    }

    #[test]
    fn the_page_is_never_open_beyond_loopback_without_a_login() {
        let open = "[http]\nlisten = \"0.0.0.0:9183\"\n";
        let s = load(open, &[]).unwrap();
        assert!(!s.http.serves_page(), "unset page beyond loopback: off");
        assert_eq!(s.notices.len(), 1, "{:?}", s.notices);
        assert!(
            s.notices[0].contains("[[http.admin.users]]"),
            "{:?}",
            s.notices
        );
        let err = load(&format!("{open}page = true\n"), &[]).unwrap_err();
        assert_eq!(err.problems[0].key, "http.page", "{err}");
        assert!(
            err.problems[0].message.contains("fieldgate passwd"),
            "{err}"
        );
        let hash = crate::password::hash_password("pw").unwrap();
        let with_login = format!(
            "{open}page = true\n[[http.admin.users]]\nusername = \"op\"\npassword_hash = \"{hash}\"\n"
        );
        let s = load(&with_login, &[]).unwrap();
        assert!(s.http.serves_page() && s.http.login_required());
        assert!(s.notices.is_empty(), "{:?}", s.notices);
        // Loopback, no accounts: open, as before.
        assert!(Settings::default().http.serves_page());
        assert!(!Settings::default().http.login_required());
    }

    #[test]
    fn bad_http_access_keys_are_named() {
        let text = r#"
            [http]
            metrics_token = "short"
            [http.admin]
            session_ttl = "5s"
            [[http.admin.users]]
            username = "op"
            password_hash = "hunter2"
            [http.tls]
            cert_file = "/nonexistent/cert.pem"
            key_file = "/nonexistent/key.pem"
            client_cert = "required"
        "#;
        let err = load(text, &[]).unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        for k in [
            "http.metrics_token",
            "http.admin.session_ttl",
            "http.admin.users[0].password_hash",
            "http.tls.cert_file",
            "http.tls.key_file",
            "http.tls.client_ca_file",
        ] {
            assert!(keys.contains(&k), "{k} not in {keys:?}");
        }
        let err = load(
            "[http.tls]\ncert_file = \"a\"\nkey_file = \"b\"\nclient_cert = \"maybe\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("none, optional, required"), "{err}");
    }

    #[test]
    fn redacted_config_hides_every_password_and_hash() {
        let hash = crate::password::hash_password("pw2").unwrap();
        let s = load(
            &format!(
                r#"
                [[broker.users]]
                username = "dev1"
                password = "plain-secret-1"
                [[broker.users]]
                username = "dev2"
                password_hash = "{hash}"
                [cloud]
                host = "c"
                username = "gw"
                password = "cloud-secret-2"
                client_key_file = "/etc/fieldgate/key.pem"
                [http]
                metrics_token = "metrics-secret-3-long"
                [[http.admin.users]]
                username = "op"
                password_hash = "{hash}"
                "#
            ),
            &[],
        )
        .unwrap();
        let text = s.redacted().to_toml();
        for secret in [
            "plain-secret-1",
            "$argon2id",
            "cloud-secret-2",
            "metrics-secret-3",
        ] {
            assert!(!text.contains(secret), "{secret} in:\n{text}");
        }
        assert_eq!(text.matches(REDACTED).count(), 5, "{text}");
        assert!(text.contains("/etc/fieldgate/key.pem"), "paths stay");
        assert!(text.contains("username = \"gw\""), "{text}");
        // Nothing set, nothing to redact.
        assert!(!Settings::default().redacted().to_toml().contains(REDACTED));
    }

    const PLANT: &str = r#"
        [gateway]
        id = "gw"
        [gateway.namespace]
        enterprise = "acme"
        site = "plant1"
        area = "packaging"
        line = "line3"
    "#;

    /// A `[[modbus]]` device `meter` with a tag `power` and the keys `extra`.
    fn meter(extra: &str) -> String {
        format!(
            "[[modbus]]\nname = \"meter\"\nhost = \"127.0.0.1:502\"\n{extra}\n\
             [[modbus.tags]]\nname = \"power\"\n"
        )
    }

    const SCALE: &str = r#"
        [[serial]]
        name = "scale"
        port = "/dev/ttyUSB0"
    "#;

    fn keys(err: &ConfigError) -> Vec<&str> {
        err.problems.iter().map(|p| p.key.as_str()).collect()
    }

    #[test]
    fn without_a_namespace_the_default_topics_are_unchanged() {
        let s = load(&format!("{}{SCALE}", meter("")), &[]).unwrap();
        let (m, d) = (&s.modbus[0], &s.serial[0]);
        assert_eq!(m.tag_topic("fieldgate", "power"), "field/meter/power");
        assert_eq!(m.status_topic("fieldgate"), "field/meter/status");
        assert_eq!(m.batch_topic("fieldgate"), "field/meter/batch");
        assert_eq!(d.expand(&d.topic, "fieldgate"), "field/scale/data");
        assert_eq!(d.expand(&d.write_topic, "fieldgate"), "field/scale/write");
        assert_eq!(d.expand(&d.status_topic, "fieldgate"), "field/scale/status");
        assert_eq!(m.topic, ModbusDeviceConfig::default().topic);
        assert!(s.notices.is_empty(), "{:?}", s.notices);
        assert!(!s.to_toml().contains("namespace"), "{}", s.to_toml());
    }

    #[test]
    fn all_four_levels_make_the_default_topics_isa95() {
        let s = load(&format!("{PLANT}{}{SCALE}", meter("")), &[]).unwrap();
        let (m, d) = (&s.modbus[0], &s.serial[0]);
        let root = "acme/plant1/packaging/line3";
        assert_eq!(m.tag_topic("gw", "power"), format!("{root}/meter/power"));
        assert_eq!(m.status_topic("gw"), format!("{root}/meter/status"));
        assert_eq!(m.batch_topic("gw"), format!("{root}/meter/batch"));
        assert_eq!(d.expand(&d.topic, "gw"), format!("{root}/scale/data"));
        assert_eq!(
            d.expand(&d.write_topic, "gw"),
            format!("{root}/scale/write")
        );
        assert_eq!(
            d.expand(&d.status_topic, "gw"),
            format!("{root}/scale/status")
        );
        // What is stored carries only the placeholders the sources fill.
        assert_eq!(m.topic, format!("{root}/{{device}}/{{tag}}"));
        // The printed configuration loads back to the same thing.
        assert_eq!(load(&s.to_toml(), &[]).unwrap(), s);
        // Levels come from the environment too.
        let env = load(
            &format!("{PLANT}{}", meter("")),
            &[("FIELDGATE__GATEWAY__NAMESPACE__SITE", "plant2")],
        )
        .unwrap();
        assert_eq!(
            env.modbus[0].tag_topic("gw", "power"),
            "acme/plant2/packaging/line3/meter/power"
        );
    }

    #[test]
    fn a_device_overrides_area_and_line_and_keeps_the_topics_it_sets() {
        let text = r#"
            [gateway.namespace]
            enterprise = "acme"
            site = "plant1"
            area = "packaging"
            [[modbus]]
            name = "filler"
            host = "127.0.0.1:502"
            line = "line3"
            [[modbus.tags]]
            name = "speed"
            [[modbus]]
            name = "capper"
            host = "127.0.0.1:503"
            area = "bottling"
            line = "line7"
            topic = "{site}/{area}/{line}/custom/{device}/{tag}"
            [[modbus.tags]]
            name = "torque"
            [[modbus]]
            name = "old"
            host = "127.0.0.1:504"
            topic = "field/{device}/{tag}"
            [[modbus.tags]]
            name = "t"
            [[serial]]
            name = "scale"
            port = "/dev/ttyUSB0"
            line = "line3"
            write_topic = ""
            "#;
        let s = load(text, &[]).unwrap();
        let m = &s.modbus;
        assert_eq!(
            m[0].tag_topic("gw", "speed"),
            "acme/plant1/packaging/line3/filler/speed"
        );
        assert_eq!(
            m[1].tag_topic("gw", "torque"),
            "plant1/bottling/line7/custom/capper/torque"
        );
        assert_eq!(
            m[1].status_topic("gw"),
            "acme/plant1/bottling/line7/capper/status",
            "keys it does not set take the default with its own area and line"
        );
        assert_eq!(m[2].tag_topic("gw", "t"), "field/old/t", "set: kept");
        // `old` has no line, so its defaults stay under field/ (with a warning).
        assert_eq!(m[2].status_topic("gw"), "field/old/status");
        assert_eq!(s.notices.len(), 1, "{:?}", s.notices);
        assert!(s.notices[0].contains("modbus[2]"), "{:?}", s.notices);
        let d = &s.serial[0];
        assert_eq!(
            d.expand(&d.topic, "gw"),
            "acme/plant1/packaging/line3/scale/data"
        );
        assert_eq!(d.write_topic, "", "read-only stays read-only");
    }

    #[test]
    fn a_topic_root_may_name_levels_and_the_gateway_id() {
        let text = format!(
            "{PLANT}topic_root = \"{{enterprise}}/{{site}}/{{gateway_id}}\"\n{}{SCALE}",
            meter("")
        );
        let s = load(&text, &[]).unwrap();
        assert_eq!(
            s.modbus[0].tag_topic("gw", "power"),
            "acme/plant1/gw/meter/power"
        );
        let d = &s.serial[0];
        assert_eq!(
            d.expand(&d.status_topic, "gw"),
            "acme/plant1/gw/scale/status"
        );
        // A root without levels works with no level set.
        let s = load(
            &format!("[gateway.namespace]\ntopic_root = \"plant\"\n{}", meter("")),
            &[],
        )
        .unwrap();
        assert_eq!(s.modbus[0].tag_topic("gw", "power"), "plant/meter/power");
    }

    #[test]
    fn namespace_problems_name_the_key_and_the_fix() {
        // A level used but not set, in a device's own topic and in the root.
        let err = load(
            &format!(
                "[gateway.namespace]\ntopic_root = \"{{enterprise}}/{{area}}\"\n\
                 {}{SCALE}write_topic = \"{{line}}/w\"\n",
                meter("topic = \"{site}/{device}/{tag}\"")
            ),
            &[],
        )
        .unwrap_err();
        assert_eq!(
            keys(&err),
            [
                "gateway.namespace.topic_root",
                "modbus[0].topic",
                "serial[0].write_topic"
            ],
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.contains("gateway.namespace.enterprise is not set"),
            "{text}"
        );
        assert!(text.contains("gateway.namespace.site is not set"), "{text}");
        assert!(
            text.contains("neither gateway.namespace.line nor serial[0].line"),
            "{text}"
        );
        // The root names {area}: a device without an area (here or in the gateway) is told.
        let err = load(
            &format!(
                "[gateway.namespace]\nenterprise = \"acme\"\ntopic_root = \"{{enterprise}}/{{area}}\"\n\
                 {}{SCALE}area = \"hall\"\n",
                meter("")
            ),
            &[],
        )
        .unwrap_err();
        assert_eq!(keys(&err), ["modbus[0].area"], "{err}");
        // Unknown placeholders, with the ones that exist.
        let err = load(
            &format!(
                "{PLANT}topic_root = \"{{plant}}\"\n{}",
                meter("status_topic = \"{tag}/s\"")
            ),
            &[],
        )
        .unwrap_err();
        assert_eq!(
            keys(&err),
            ["gateway.namespace.topic_root", "modbus[0].status_topic"],
            "{err}"
        );
        assert!(
            err.problems[1]
                .message
                .contains("{gateway_id}, {device}, {enterprise}"),
            "{err}"
        );
        // Levels that are not one topic level, at the gateway and per device.
        let err = load(
            &format!(
                "[gateway.namespace]\nsite = \"a/b\"\nline = \"\"\nenterprise = \"#\"\n\
                 topic_root = \"x/+\"\n{}{SCALE}line = \"l/2\"\n",
                meter("area = \"x+y\"")
            ),
            &[],
        )
        .unwrap_err();
        let mut got = keys(&err);
        got.sort();
        assert_eq!(
            got,
            [
                "gateway.namespace.enterprise",
                "gateway.namespace.line",
                "gateway.namespace.site",
                "gateway.namespace.topic_root",
                "modbus[0].area",
                "serial[0].line"
            ],
            "{err}"
        );
        // A misspelt level hides no placeholder problem.
        let err = load(
            "[gateway.namespace]\narea = \"a/b\"\ntopic_root = \"{site}\"\n",
            &[],
        )
        .unwrap_err();
        assert_eq!(
            keys(&err),
            ["gateway.namespace.topic_root", "gateway.namespace.area"],
            "{err}"
        );
        let err = load("[gateway.namespace]\ncell = \"c1\"\n", &[]).unwrap_err();
        assert!(err.to_string().contains("cell"), "{err}");
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
