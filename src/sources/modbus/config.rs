//! `[[modbus]]`: Modbus TCP and RTU devices and their `[[modbus.tags]]`.
//!
//! Owns the config types and their semantic checks ([`validate`]). Invariants after
//! [`validate`] returned no problem (the rest of the module relies on them):
//! - device names are unique, non-empty and usable as a topic level;
//! - every tag fits one read request (`registers <= max_read_registers`) and the 16-bit
//!   address space after `address_base` is applied;
//! - every tag's kind and type agree (bool on coils/discrete inputs, the rest on registers);
//! - RTU devices naming the same `serial_port` agree on its line settings and use distinct
//!   unit ids, so they can share one bus task; RTU-over-TCP devices naming the same `host`
//!   (one converter, one serial line) use distinct unit ids and one request at a time;
//! - topics (tag, status and batch topics) expand to valid, distinct MQTT topic names;
//! - `area` and `line` (the device's own ISA-95 levels) are single topic levels. The
//!   namespace placeholders (`{enterprise}` ...) are filled into the topic templates when the
//!   configuration is loaded ([`crate::config`], with [`ModbusDeviceConfig::templates`]), so
//!   the templates here carry only `{gateway_id}`, `{device}` and `{tag}`;
//! - with `publish = "batch"`: the payload is `json`, no tag has `on_change` or `deadband`
//!   (every batch holds every tag), the batch topic has no `{tag}`; `publish_interval` is
//!   only set in batch mode.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::codec::{DataType, Format, Order};
use crate::problem::{problem, Problem};
use crate::topic;

/// How the gateway reaches a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// Modbus TCP (`host = "10.0.0.5:502"`).
    #[default]
    Tcp,
    /// Modbus RTU on a serial line (`serial_port = "/dev/ttyUSB0"`).
    Rtu,
    /// Modbus RTU frames over TCP, through a serial-to-Ethernet converter in transparent
    /// mode (`host = "10.0.0.7:4001"`). Devices with the same `host` share one bus.
    RtuOverTcp,
}

/// Serial parity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Parity {
    /// No parity bit (8N1, what most devices ship with).
    #[default]
    None,
    /// Even parity (the Modbus specification's default, 8E1).
    Even,
    /// Odd parity.
    Odd,
}

/// What is published per tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PayloadFormat {
    /// `{"value":..,"ts":<ms>,"quality":"good"}` (plus `unit`, and `error` when not good).
    #[default]
    Json,
    /// The value alone as text (`21.5`, `true`, `"text"` unquoted). Bad readings are not
    /// published; the status topic carries the error.
    Raw,
}

/// How a device's readings are published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PublishMode {
    /// One message per tag reading, on the tag topic.
    #[default]
    PerTag,
    /// One message per `publish_interval` on `batch_topic`, holding the latest reading of
    /// every tag of the device.
    Batch,
}

/// Register kind of a tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegisterKind {
    /// Read/write bits (function 1, written with 5/15).
    #[serde(alias = "coils")]
    Coil,
    /// Read-only bits (function 2).
    #[serde(alias = "discrete")]
    DiscreteInput,
    /// Read-only registers (function 4).
    #[serde(alias = "input")]
    InputRegister,
    /// Read/write registers (function 3, written with 6/16).
    #[serde(alias = "holding")]
    HoldingRegister,
}

impl RegisterKind {
    /// Config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RegisterKind::Coil => "coil",
            RegisterKind::DiscreteInput => "discrete_input",
            RegisterKind::InputRegister => "input_register",
            RegisterKind::HoldingRegister => "holding_register",
        }
    }

    /// Coils and discrete inputs are bits; the others 16-bit registers.
    pub fn is_bit(self) -> bool {
        matches!(self, RegisterKind::Coil | RegisterKind::DiscreteInput)
    }

    /// Whether Modbus can write this kind at all.
    pub fn is_writable(self) -> bool {
        matches!(self, RegisterKind::Coil | RegisterKind::HoldingRegister)
    }
}

/// `[[modbus]]`: one Modbus device (one unit id).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModbusDeviceConfig {
    /// Device name: `{device}` in topics and the `device` label of metrics. Unique; letters,
    /// digits, `-`, `_`, `.`.
    pub name: String,
    /// `tcp`, `rtu` or `rtu_over_tcp`.
    pub transport: Transport,
    /// TCP: `host:port` of the device or Modbus gateway, e.g. `"10.0.0.5:502"`. RTU over
    /// TCP: `host:port` of the serial-to-Ethernet converter.
    pub host: String,
    /// RTU: serial port path, e.g. `"/dev/ttyUSB0"`. Devices with the same path share one
    /// bus (one task owns the port and serialises every request on it).
    pub serial_port: String,
    /// RTU: baud rate.
    pub baud: u32,
    /// RTU: `none`, `even` or `odd`.
    pub parity: Parity,
    /// RTU: data bits, 5..=8.
    pub data_bits: u8,
    /// RTU: stop bits, 1 or 2.
    pub stop_bits: u8,
    /// Modbus unit (slave) id: 1..=247 on RTU and RTU over TCP, 0..=255 on TCP (often 1 or
    /// 255).
    pub unit_id: u8,
    /// Longest wait for one answer (and for a TCP connect). A request never waits longer.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Further attempts of a read after a timeout or a bad frame (writes are never repeated).
    pub retries: u32,
    /// Pause before each request to this device, for devices that need rest between
    /// requests.
    #[serde(with = "humantime_serde")]
    pub request_delay: Duration,
    /// RTU: silence kept on the line between a response and the next request. Default
    /// (absent): 3.5 character times at `baud`, at least 1.75 ms as the specification says.
    /// RTU over TCP: none unless set (the converter keeps the serial line's timing).
    #[serde(
        with = "humantime_serde",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub inter_frame_gap: Option<Duration>,
    /// TCP: requests in flight at once, each on its own connection. Keep 1 unless the device
    /// accepts several connections.
    pub max_in_flight: u16,
    /// Coalescing: most unused registers (or coils) read to join two tags into one request.
    /// 0 joins only adjacent tags; raise it where the device answers reads across unmapped
    /// addresses.
    pub max_gap: u16,
    /// Most registers per read request (the protocol allows 125; some devices want fewer).
    pub max_read_registers: u16,
    /// Most coils or discrete inputs per read request (the protocol allows 2000).
    pub max_read_coils: u16,
    /// `0`: tag addresses are protocol addresses (0-based, as on the wire). `1`: addresses as
    /// in manuals that count from 1 (register 40001 style without the 4); 1 is subtracted.
    pub address_base: u8,
    /// Default poll interval of this device's tags.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// ISA-95 area of this device, in place of `gateway.namespace.area` in its topics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub area: Option<String>,
    /// ISA-95 line of this device, in place of `gateway.namespace.line` in its topics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<String>,
    /// Tag topic template: `{device}`, `{tag}` and `{gateway_id}` are replaced, and the
    /// namespace's `{enterprise}`, `{site}`, `{area}`, `{line}`. Default:
    /// `<root>/{device}/{tag}`, the root from `[gateway.namespace]` (`field` unless set).
    pub topic: String,
    /// Retained device status topic (`{"state":"online"|"offline",...}`). Default:
    /// `<root>/{device}/status`.
    pub status_topic: String,
    /// Writes are accepted on `<tag topic>/set` and on `<command_prefix><tag topic>/set`
    /// (where the cloud downlink puts `fieldgate/<id>/cmd/...` by default). Empty: local
    /// set topics only.
    pub command_prefix: String,
    /// `json` or `raw`.
    pub payload: PayloadFormat,
    /// `per_tag`: one message per tag reading on its tag topic. `batch`: one message per
    /// `publish_interval` on `batch_topic` with the latest value and quality of every tag.
    pub publish: PublishMode,
    /// `publish = "batch"`: the batch topic; `{device}` and `{gateway_id}` are replaced (and
    /// the namespace levels). Default: `<root>/{device}/batch`.
    pub batch_topic: String,
    /// `publish = "batch"`: how often the batch is published. Default (absent): the
    /// device's `poll_interval`.
    #[serde(
        with = "humantime_serde",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub publish_interval: Option<Duration>,
    /// Publish tag values (in batch mode: the batch) retained (a new subscriber gets the
    /// last value at once).
    pub retain: bool,
    /// Without `retain`: a tag that stays bad publishes its bad reading again at most this
    /// often (a subscriber that came after the first failure sees it). `"0s"`: only when
    /// the quality changes.
    #[serde(with = "humantime_serde")]
    pub bad_repeat: Duration,
    /// First reconnect (and dead-device re-probe) delay; doubles per failure.
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Longest reconnect (and re-probe) delay.
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// The device's tags.
    pub tags: Vec<TagConfig>,
}

impl Default for ModbusDeviceConfig {
    fn default() -> Self {
        ModbusDeviceConfig {
            name: String::new(),
            transport: Transport::Tcp,
            host: String::new(),
            serial_port: String::new(),
            baud: 9600,
            parity: Parity::None,
            data_bits: 8,
            stop_bits: 1,
            unit_id: 1,
            timeout: Duration::from_secs(1),
            retries: 1,
            request_delay: Duration::ZERO,
            inter_frame_gap: None,
            max_in_flight: 1,
            max_gap: 0,
            max_read_registers: 125,
            max_read_coils: 2000,
            address_base: 0,
            poll_interval: Duration::from_secs(1),
            area: None,
            line: None,
            topic: format!("{}/{TAG_TAIL}", topic::DEFAULT_ROOT),
            status_topic: format!("{}/{STATUS_TAIL}", topic::DEFAULT_ROOT),
            command_prefix: "cmd/".into(),
            payload: PayloadFormat::Json,
            publish: PublishMode::PerTag,
            batch_topic: format!("{}/{BATCH_TAIL}", topic::DEFAULT_ROOT),
            publish_interval: None,
            retain: false,
            bad_repeat: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            tags: Vec::new(),
        }
    }
}

/// The default tag topic after its root.
const TAG_TAIL: &str = "{device}/{tag}";
/// The default status topic after its root.
const STATUS_TAIL: &str = "{device}/status";
/// The default batch topic after its root.
const BATCH_TAIL: &str = "{device}/batch";

/// `[[modbus.tags]]`: one value of a device.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TagConfig {
    /// Tag name: `{tag}` in the topic. Unique per device.
    pub name: String,
    /// `coil`, `discrete_input`, `input_register` or `holding_register`.
    pub kind: RegisterKind,
    /// First register (or coil) of the value, counted from `address_base`.
    pub address: u32,
    /// `bool`, `bit`, `u16`, `i16`, `u32`, `i32`, `u64`, `i64`, `f32`, `f64`, `string`.
    /// Default: `bool` on coils and discrete inputs, `u16` on registers.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub data_type: Option<DataType>,
    /// `type = "bit"`: which bit of the register, 0 (least significant) ..= 15.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bit: Option<u8>,
    /// `type = "string"`: length in bytes (two per register).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<u16>,
    /// Coils and discrete inputs: consecutive bits from `address` on, published as an array
    /// `[true,false,..]` (lowest address first); a writable coil tag is written whole with
    /// function 15 from an array of as many values. Default 1: a single `bool` (function 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u16>,
    /// Byte/word order: `ABCD` (big endian), `DCBA`, `BADC`, `CDAB`; 64-bit spellings
    /// `ABCDEFGH`, `HGFEDCBA`, `BADCFEHG`, `GHEFCDAB` name the same four rules.
    pub order: Order,
    /// Published value = raw x scale + offset (writes apply the inverse).
    pub scale: f64,
    /// See `scale`.
    pub offset: f64,
    /// Decimals of the published value of a float or scaled tag (0..=15). Default: f32 as
    /// the shortest decimal that reads back as the same f32, scaled values at the decimals
    /// the scale implies (raw 3 x scale 0.1 = 0.3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decimals: Option<u8>,
    /// Engineering unit, copied into the JSON payload (`"unit":"degC"`). Empty: left out.
    pub unit: String,
    /// Poll interval of this tag. Default: the device's `poll_interval`.
    #[serde(
        with = "humantime_serde",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub poll_interval: Option<Duration>,
    /// Publish only when the value (or its quality) changed.
    pub on_change: bool,
    /// With `on_change`: a numeric change must exceed this to be published.
    pub deadband: f64,
    /// Accept writes on `<tag topic>/set` (holding registers and coils only).
    pub writable: bool,
}

impl Default for TagConfig {
    fn default() -> Self {
        TagConfig {
            name: String::new(),
            kind: RegisterKind::HoldingRegister,
            address: 0,
            data_type: None,
            bit: None,
            length: None,
            count: None,
            order: Order::Abcd,
            scale: 1.0,
            offset: 0.0,
            decimals: None,
            unit: String::new(),
            poll_interval: None,
            on_change: false,
            deadband: 0.0,
            writable: false,
        }
    }
}

impl TagConfig {
    /// The effective data type.
    pub fn data_type(&self) -> DataType {
        self.data_type.unwrap_or(if self.kind.is_bit() {
            DataType::Bool
        } else {
            DataType::U16
        })
    }

    /// The codec format.
    pub fn format(&self) -> Format {
        Format {
            ty: self.data_type(),
            order: self.order,
            bit: self.bit.unwrap_or(0),
            length: self.length.unwrap_or(0),
            scale: self.scale,
            offset: self.offset,
            decimals: self.decimals,
            count: self.count.unwrap_or(1),
        }
    }

    /// Protocol address (0-based), or `None` if it does not exist.
    pub fn wire_address(&self, base: u8) -> Option<u16> {
        self.address
            .checked_sub(u32::from(base))
            .and_then(|a| u16::try_from(a).ok())
    }
}

impl ModbusDeviceConfig {
    /// The topic templates the namespace is filled into when the configuration is loaded.
    pub fn templates(&mut self) -> [topic::DeviceTemplate<'_>; 3] {
        const DEVICE: &[&str] = &["gateway_id", "device"];
        [
            topic::DeviceTemplate {
                key: "topic",
                template: &mut self.topic,
                default_tail: TAG_TAIL,
                keep: &["gateway_id", "device", "tag"],
            },
            topic::DeviceTemplate {
                key: "status_topic",
                template: &mut self.status_topic,
                default_tail: STATUS_TAIL,
                keep: DEVICE,
            },
            topic::DeviceTemplate {
                key: "batch_topic",
                template: &mut self.batch_topic,
                default_tail: BATCH_TAIL,
                keep: DEVICE,
            },
        ]
    }

    /// Expands a topic template for `tag`.
    pub fn tag_topic(&self, gateway_id: &str, tag: &str) -> String {
        crate::topic::with_gateway_id(&self.topic, gateway_id)
            .replace("{device}", &self.name)
            .replace("{tag}", tag)
    }

    /// The expanded batch topic.
    pub fn batch_topic(&self, gateway_id: &str) -> String {
        crate::topic::with_gateway_id(&self.batch_topic, gateway_id).replace("{device}", &self.name)
    }

    /// How often the batch is published (`publish = "batch"`).
    pub fn publish_interval(&self) -> Duration {
        self.publish_interval.unwrap_or(self.poll_interval)
    }

    /// The expanded status topic.
    pub fn status_topic(&self, gateway_id: &str) -> String {
        crate::topic::with_gateway_id(&self.status_topic, gateway_id)
            .replace("{device}", &self.name)
    }

    /// Inter-frame gap in force: configured, or 3.5 character times (11 bits each), at least
    /// 1.75 ms.
    pub fn frame_gap(&self) -> Duration {
        self.inter_frame_gap.unwrap_or_else(|| {
            let bits = 11.0 * 3.5;
            let t = Duration::from_secs_f64(bits / f64::from(self.baud.max(1)));
            t.max(Duration::from_micros(1750))
        })
    }

    fn line_settings(&self) -> (u32, Parity, u8, u8) {
        (self.baud, self.parity, self.data_bits, self.stop_bits)
    }
}

fn usable_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Checks every device and tag; returns every problem, keys like `modbus[2].tags[5].address`.
pub fn validate(devices: &[ModbusDeviceConfig], gateway_id: &str) -> Vec<Problem> {
    let mut p = Vec::new();
    let mut names = HashSet::new();
    let mut topics: HashMap<String, String> = HashMap::new();
    // serial_port -> (first device key, line settings, unit ids seen)
    type Line = (String, (u32, Parity, u8, u8), HashSet<u8>);
    let mut ports: BTreeMap<&str, Line> = BTreeMap::new();
    // RTU-over-TCP converter host -> unit ids seen
    let mut converters: BTreeMap<&str, HashSet<u8>> = BTreeMap::new();
    for (i, d) in devices.iter().enumerate() {
        let k = format!("modbus[{i}]");
        if !usable_name(&d.name) {
            p.push(problem(
                format!("{k}.name"),
                format!(
                    "{:?} is not a usable device name; use 1-64 letters, digits, '-', '_' or '.'",
                    d.name
                ),
            ));
        } else if !names.insert(d.name.clone()) {
            p.push(problem(
                format!("{k}.name"),
                format!(
                    "{:?} is used by another [[modbus]] device; names must be unique",
                    d.name
                ),
            ));
        }
        if matches!(d.transport, Transport::Tcp | Transport::RtuOverTcp) {
            let ok = d
                .host
                .rsplit_once(':')
                .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
            if !ok {
                p.push(problem(
                    format!("{k}.host"),
                    format!("{:?} is not host:port; e.g. \"10.0.0.5:502\"", d.host),
                ));
            }
        }
        match d.transport {
            Transport::RtuOverTcp => {
                if d.unit_id == 0 || d.unit_id > 247 {
                    p.push(problem(
                        format!("{k}.unit_id"),
                        "must be 1..=247 on RTU over TCP (0 is broadcast, which never answers)",
                    ));
                }
                if d.max_in_flight != 1 {
                    p.push(problem(
                        format!("{k}.max_in_flight"),
                        "RTU over TCP reaches one serial line, one request at a time; remove it \
                         (or set 1)",
                    ));
                }
                if !converters
                    .entry(d.host.as_str())
                    .or_default()
                    .insert(d.unit_id)
                {
                    p.push(problem(
                        format!("{k}.unit_id"),
                        format!(
                            "unit {} is already used behind converter {:?}; each unit id once per bus",
                            d.unit_id, d.host
                        ),
                    ));
                }
            }
            Transport::Tcp => {
                if d.max_in_flight == 0 || d.max_in_flight > 16 {
                    p.push(problem(
                        format!("{k}.max_in_flight"),
                        "must be 1..=16 (each is a connection to the device); e.g. 1",
                    ));
                }
            }
            Transport::Rtu => {
                if d.serial_port.is_empty() {
                    p.push(problem(
                        format!("{k}.serial_port"),
                        "empty; set the serial port path, e.g. \"/dev/ttyUSB0\"",
                    ));
                }
                if d.baud == 0 {
                    p.push(problem(format!("{k}.baud"), "must be above 0; e.g. 9600"));
                }
                if !(5..=8).contains(&d.data_bits) {
                    p.push(problem(
                        format!("{k}.data_bits"),
                        "must be 5..=8; Modbus RTU uses 8",
                    ));
                }
                if !(1..=2).contains(&d.stop_bits) {
                    p.push(problem(format!("{k}.stop_bits"), "must be 1 or 2"));
                }
                if d.unit_id == 0 || d.unit_id > 247 {
                    p.push(problem(
                        format!("{k}.unit_id"),
                        "must be 1..=247 on RTU (0 is broadcast, which never answers)",
                    ));
                }
                if !d.serial_port.is_empty() {
                    let entry = ports
                        .entry(d.serial_port.as_str())
                        .or_insert_with(|| (k.clone(), d.line_settings(), HashSet::new()));
                    if entry.1 != d.line_settings() {
                        p.push(problem(
                            format!("{k}.baud"),
                            format!(
                                "{} shares serial port {:?} with {} but not its baud, parity, \
                                 data_bits and stop_bits; one line has one setting, make them equal",
                                d.name, d.serial_port, entry.0
                            ),
                        ));
                    }
                    if !entry.2.insert(d.unit_id) {
                        p.push(problem(
                            format!("{k}.unit_id"),
                            format!(
                                "unit {} is already used on serial port {:?}; each unit id once per bus",
                                d.unit_id, d.serial_port
                            ),
                        ));
                    }
                }
            }
        }
        if d.timeout < Duration::from_millis(1) || d.timeout > Duration::from_secs(60) {
            p.push(problem(
                format!("{k}.timeout"),
                "must be between 1ms and 60s; e.g. \"1s\"",
            ));
        }
        if d.retries > 10 {
            p.push(problem(format!("{k}.retries"), "at most 10; e.g. 1"));
        }
        if d.max_read_registers == 0 || d.max_read_registers > 125 {
            p.push(problem(
                format!("{k}.max_read_registers"),
                "must be 1..=125 (the protocol's limit)",
            ));
        }
        if d.max_read_coils == 0 || d.max_read_coils > 2000 {
            p.push(problem(
                format!("{k}.max_read_coils"),
                "must be 1..=2000 (the protocol's limit)",
            ));
        }
        if d.address_base > 1 {
            p.push(problem(format!("{k}.address_base"), "must be 0 or 1"));
        }
        if d.poll_interval < Duration::from_millis(10) {
            p.push(problem(
                format!("{k}.poll_interval"),
                "must be at least 10ms; e.g. \"1s\"",
            ));
        }
        if !d.bad_repeat.is_zero() && d.bad_repeat < Duration::from_millis(100) {
            p.push(problem(
                format!("{k}.bad_repeat"),
                "must be \"0s\" (only on a change of quality) or at least 100ms; e.g. \"10s\"",
            ));
        }
        if d.reconnect_max > Duration::from_secs(3600) {
            p.push(problem(
                format!("{k}.reconnect_max"),
                "at most 1h, or a device that comes back would wait too long; e.g. \"30s\"",
            ));
        }
        if d.reconnect_min.is_zero() || d.reconnect_min > d.reconnect_max {
            p.push(problem(
                format!("{k}.reconnect_min"),
                "must be above 0 and not above reconnect_max",
            ));
        }
        if !d.topic.contains("{tag}") {
            p.push(problem(
                format!("{k}.topic"),
                "must contain {tag}, or every tag would publish on one topic; e.g. \"field/{device}/{tag}\"",
            ));
        }
        for (level, value) in [("area", &d.area), ("line", &d.line)] {
            let Some(v) = value else { continue };
            if let Err(e) = topic::validate_level(v) {
                p.push(problem(format!("{k}.{level}"), format!("{v:?}: {e}")));
            }
        }
        if d.command_prefix.contains(['+', '#']) {
            p.push(problem(
                format!("{k}.command_prefix"),
                "must not contain '+' or '#'",
            ));
        }
        let status = d.status_topic(gateway_id);
        match topic::validate_topic(&status) {
            Err(e) => p.push(problem(
                format!("{k}.status_topic"),
                format!("{status:?}: {e}"),
            )),
            Ok(()) => {
                if let Some(other) = topics.insert(status.clone(), format!("{k}.status_topic")) {
                    p.push(problem(
                        format!("{k}.status_topic"),
                        format!("{status:?} is also the topic of {other}; give each its own"),
                    ));
                }
            }
        }
        validate_publish(&mut p, &k, d, gateway_id, &mut topics);
        if d.tags.is_empty() {
            p.push(problem(
                format!("{k}.tags"),
                "no tags; add [[modbus.tags]] with name, kind, address and type",
            ));
        }
        let mut tag_names = HashSet::new();
        for (j, t) in d.tags.iter().enumerate() {
            validate_tag(&mut p, &format!("{k}.tags[{j}]"), d, t, &mut tag_names);
            let tt = d.tag_topic(gateway_id, &t.name);
            match topic::validate_topic(&tt) {
                Err(e) => p.push(problem(
                    format!("{k}.tags[{j}].name"),
                    format!("topic {tt:?}: {e}"),
                )),
                Ok(()) => {
                    if let Some(other) = topics.insert(tt.clone(), format!("{k}.tags[{j}]")) {
                        p.push(problem(
                            format!("{k}.tags[{j}].name"),
                            format!("topic {tt:?} is also the topic of {other}; rename one"),
                        ));
                    }
                }
            }
        }
    }
    p
}

/// `publish`, `batch_topic`, `publish_interval`, and the keys that mean nothing in batch mode.
fn validate_publish(
    p: &mut Vec<Problem>,
    k: &str,
    d: &ModbusDeviceConfig,
    gateway_id: &str,
    topics: &mut HashMap<String, String>,
) {
    if d.publish == PublishMode::PerTag {
        if d.publish_interval.is_some() {
            p.push(problem(
                format!("{k}.publish_interval"),
                "only with publish = \"batch\" (per tag, readings are published as they are \
                 polled); remove it or set publish = \"batch\"",
            ));
        }
        return;
    }
    if let Some(i) = d.publish_interval {
        if i < Duration::from_millis(10) {
            p.push(problem(
                format!("{k}.publish_interval"),
                "must be at least 10ms; e.g. \"10s\"",
            ));
        }
    }
    if d.payload == PayloadFormat::Raw {
        p.push(problem(
            format!("{k}.payload"),
            "a batch is a JSON object; remove payload = \"raw\" or use publish = \"per_tag\"",
        ));
    }
    if d.batch_topic.contains("{tag}") {
        p.push(problem(
            format!("{k}.batch_topic"),
            "one topic for the whole device: no {tag}; e.g. \"field/{device}/batch\"",
        ));
        return;
    }
    let bt = d.batch_topic(gateway_id);
    match topic::validate_topic(&bt) {
        Err(e) => p.push(problem(format!("{k}.batch_topic"), format!("{bt:?}: {e}"))),
        Ok(()) => {
            if let Some(other) = topics.insert(bt.clone(), format!("{k}.batch_topic")) {
                p.push(problem(
                    format!("{k}.batch_topic"),
                    format!("{bt:?} is also the topic of {other}; give each its own"),
                ));
            }
        }
    }
    for (j, t) in d.tags.iter().enumerate() {
        if t.on_change || t.deadband != 0.0 {
            p.push(problem(
                format!("{k}.tags[{j}].on_change"),
                "publish = \"batch\" sends every tag in each batch, every publish_interval; \
                 remove on_change and deadband, or use publish = \"per_tag\"",
            ));
        }
    }
}

fn validate_tag(
    p: &mut Vec<Problem>,
    k: &str,
    d: &ModbusDeviceConfig,
    t: &TagConfig,
    names: &mut HashSet<String>,
) {
    if !usable_name(&t.name) {
        p.push(problem(
            format!("{k}.name"),
            format!(
                "{:?} is not a usable tag name; use 1-64 letters, digits, '-', '_' or '.'",
                t.name
            ),
        ));
    } else if !names.insert(t.name.clone()) {
        p.push(problem(
            format!("{k}.name"),
            format!(
                "{:?} is used twice in this device; tag names must be unique",
                t.name
            ),
        ));
    }
    let ty = t.data_type();
    match (t.kind.is_bit(), ty) {
        (true, DataType::Bool) | (false, DataType::Bit) => {}
        (true, _) => p.push(problem(
            format!("{k}.type"),
            format!("a {} holds one bit; use type = \"bool\"", t.kind.as_str()),
        )),
        (false, DataType::Bool) => p.push(problem(
            format!("{k}.type"),
            format!(
                "\"bool\" is for coils and discrete inputs; for one bit of a {} use type = \"bit\" with bit = 0..15",
                t.kind.as_str()
            ),
        )),
        (false, _) => {}
    }
    match (ty, t.bit) {
        (DataType::Bit, None) => p.push(problem(
            format!("{k}.bit"),
            "type \"bit\" needs bit = 0..15",
        )),
        (DataType::Bit, Some(b)) if b > 15 => p.push(problem(
            format!("{k}.bit"),
            format!("{b} is not a bit of a 16-bit register; use 0..15"),
        )),
        (DataType::Bit, _) | (_, None) => {}
        (_, Some(_)) => p.push(problem(
            format!("{k}.bit"),
            "only for type = \"bit\"; remove it",
        )),
    }
    match (ty, t.length) {
        (DataType::String, None) | (DataType::String, Some(0)) => p.push(problem(
            format!("{k}.length"),
            "type \"string\" needs length = bytes (1..=250)",
        )),
        (DataType::String, Some(n)) if n > 250 => p.push(problem(
            format!("{k}.length"),
            "at most 250 bytes (125 registers)",
        )),
        (DataType::String, _) | (_, None) => {}
        (_, Some(_)) => p.push(problem(
            format!("{k}.length"),
            "only for type = \"string\"; remove it",
        )),
    }
    match t.count {
        Some(0) => p.push(problem(format!("{k}.count"), "must be at least 1; e.g. 8")),
        Some(_) if !t.kind.is_bit() => p.push(problem(
            format!("{k}.count"),
            "only for coils and discrete inputs; for registers use a wider type; remove it",
        )),
        Some(n) if t.writable && n > 1968 => p.push(problem(
            format!("{k}.count"),
            format!("{n} coils cannot be written in one request (function 15 takes at most 1968); lower count or split the tag"),
        )),
        _ => {}
    }
    let regs = u32::from(t.format().registers());
    match t.wire_address(d.address_base) {
        None => p.push(problem(
            format!("{k}.address"),
            if d.address_base == 1 && t.address == 0 {
                "0 does not exist with address_base = 1 (addresses count from 1)".to_string()
            } else {
                format!(
                    "{} is beyond the 16-bit address space (0..=65535 on the wire)",
                    t.address
                )
            },
        )),
        Some(a) if u32::from(a) + regs.max(1) - 1 > 65535 => p.push(problem(
            format!("{k}.address"),
            format!("a {ty} at {} runs past address 65535", t.address),
        )),
        Some(_) => {}
    }
    let limit = if t.kind.is_bit() {
        d.max_read_coils
    } else {
        d.max_read_registers
    };
    if regs > u32::from(limit) && limit > 0 {
        p.push(if t.kind.is_bit() {
            problem(
                format!("{k}.count"),
                format!("needs {regs} coils, more than max_read_coils = {limit}; lower count"),
            )
        } else {
            problem(
                format!("{k}.length"),
                format!("needs {regs} registers, more than max_read_registers = {limit}"),
            )
        });
    }
    if !t.scale.is_finite() || t.scale == 0.0 {
        p.push(problem(
            format!("{k}.scale"),
            "must be a finite number other than 0; e.g. 0.1",
        ));
    }
    if !t.offset.is_finite() {
        p.push(problem(format!("{k}.offset"), "must be a finite number"));
    }
    if (t.scale != 1.0 || t.offset != 0.0)
        && matches!(ty, DataType::Bool | DataType::Bit | DataType::String)
    {
        p.push(problem(
            format!("{k}.scale"),
            format!("scale and offset do not apply to type \"{ty}\"; remove them"),
        ));
    }
    if let Some(n) = t.decimals {
        if n > 15 {
            p.push(problem(
                format!("{k}.decimals"),
                format!("{n} is more than an f64 holds; use 0..=15"),
            ));
        }
        if matches!(ty, DataType::Bool | DataType::Bit | DataType::String) {
            p.push(problem(
                format!("{k}.decimals"),
                format!("decimals do not apply to type \"{ty}\"; remove it"),
            ));
        }
    }
    if !t.deadband.is_finite() || t.deadband < 0.0 {
        p.push(problem(format!("{k}.deadband"), "must be 0 or more"));
    }
    if let Some(i) = t.poll_interval {
        if i < Duration::from_millis(10) {
            p.push(problem(
                format!("{k}.poll_interval"),
                "must be at least 10ms; e.g. \"1s\"",
            ));
        }
    }
    if t.writable && !t.kind.is_writable() {
        p.push(problem(
            format!("{k}.writable"),
            format!(
                "a {} is read-only in Modbus; use a holding_register or coil, or writable = false",
                t.kind.as_str()
            ),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(toml: &str) -> Vec<ModbusDeviceConfig> {
        #[derive(Deserialize)]
        struct W {
            modbus: Vec<ModbusDeviceConfig>,
        }
        toml::from_str::<W>(toml).expect("parses").modbus
    }

    #[test]
    fn good_config_has_no_problem() {
        let d = dev(r#"
            [[modbus]]
            name = "meter"
            host = "127.0.0.1:502"
            [[modbus.tags]]
            name = "power"
            kind = "holding"
            address = 10
            type = "f32"
            order = "CDAB"
            writable = true
            [[modbus.tags]]
            name = "alarm"
            kind = "input_register"
            address = 3
            type = "bit"
            bit = 4
            [[modbus]]
            name = "a"
            transport = "rtu"
            serial_port = "/dev/ttyX"
            unit_id = 1
            [[modbus.tags]]
            name = "run"
            kind = "coil"
            address = 0
            [[modbus]]
            name = "b"
            transport = "rtu"
            serial_port = "/dev/ttyX"
            unit_id = 2
            [[modbus.tags]]
            name = "serial"
            kind = "input"
            address = 0
            type = "string"
            length = 12
        "#);
        assert_eq!(validate(&d, "gw"), vec![]);
        assert_eq!(d[0].tags[0].format().registers(), 2);
        assert_eq!(d[0].tag_topic("gw", "power"), "field/meter/power");
    }

    #[test]
    fn every_problem_names_its_key() {
        let d = dev(r#"
            [[modbus]]
            name = "m/1"
            host = "nohost"
            max_read_registers = 200
            [[modbus.tags]]
            name = "x"
            kind = "input_register"
            address = 65535
            type = "u32"
            writable = true
            [[modbus.tags]]
            name = "x"
            kind = "coil"
            type = "u16"
            [[modbus.tags]]
            name = "s"
            type = "string"
            decimals = 2
            [[modbus.tags]]
            name = "b"
            type = "bit"
            bit = 16
            [[modbus.tags]]
            name = "z"
            address = 0
            scale = 0
            [[modbus]]
            name = "r1"
            transport = "rtu"
            serial_port = "/dev/ttyX"
            address_base = 1
            [[modbus.tags]]
            name = "t"
            address = 0
            [[modbus]]
            name = "r2"
            transport = "rtu"
            serial_port = "/dev/ttyX"
            baud = 19200
            [[modbus.tags]]
            name = "t"
            address = 1
        "#);
        let p = validate(&d, "gw");
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        for want in [
            "modbus[0].name",
            "modbus[0].host",
            "modbus[0].max_read_registers",
            "modbus[0].tags[0].address",
            "modbus[0].tags[0].writable",
            "modbus[0].tags[1].name",
            "modbus[0].tags[1].type",
            "modbus[0].tags[2].length",
            "modbus[0].tags[2].decimals",
            "modbus[0].tags[3].bit",
            "modbus[0].tags[4].scale",
            "modbus[1].tags[0].address",
            "modbus[2].baud",
            "modbus[2].unit_id",
        ] {
            assert!(keys.contains(&want), "{want} missing from {p:#?}");
        }
        // Every message says what to do.
        assert!(p.iter().all(|p| p.message.len() > 10), "{p:#?}");
    }

    #[test]
    fn rtu_over_tcp_and_coil_counts_are_checked() {
        let d = dev(r#"
            [[modbus]]
            name = "a"
            transport = "rtu_over_tcp"
            host = "127.0.0.1:4001"
            unit_id = 3
            [[modbus.tags]]
            name = "out"
            kind = "coil"
            count = 8
            writable = true
            [[modbus]]
            name = "b"
            transport = "rtu_over_tcp"
            host = "127.0.0.1:4001"
            unit_id = 4
            [[modbus.tags]]
            name = "in"
            kind = "discrete_input"
            count = 2000
        "#);
        assert_eq!(validate(&d, "gw"), vec![]);
        assert_eq!(crate::sources::modbus::buses(&d).len(), 1);
        assert_eq!(
            crate::sources::modbus::buses(&d)[0].0,
            "rtu_over_tcp:127.0.0.1:4001"
        );
        let d = dev(r#"
            [[modbus]]
            name = "a"
            transport = "rtu_over_tcp"
            host = "nohost"
            unit_id = 0
            max_in_flight = 2
            [[modbus.tags]]
            name = "reg"
            count = 2
            [[modbus.tags]]
            name = "zero"
            kind = "coil"
            count = 0
            [[modbus.tags]]
            name = "wide"
            kind = "coil"
            count = 2000
            writable = true
            [[modbus]]
            name = "b"
            transport = "rtu_over_tcp"
            host = "nohost"
            [[modbus]]
            name = "c"
            transport = "rtu_over_tcp"
            host = "nohost"
            max_read_coils = 10
            unit_id = 9
            [[modbus.tags]]
            name = "many"
            kind = "coil"
            count = 11
        "#);
        let p = validate(&d, "gw");
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        for want in [
            "modbus[0].host",
            "modbus[0].unit_id",
            "modbus[0].max_in_flight",
            "modbus[0].tags[0].count",
            "modbus[0].tags[1].count",
            "modbus[0].tags[2].count",
            "modbus[2].tags[0].count",
        ] {
            assert!(keys.contains(&want), "{want} missing from {p:#?}");
        }
    }

    #[test]
    fn batch_mode_keys_are_checked() {
        let d = dev(r#"
            [[modbus]]
            name = "a"
            host = "127.0.0.1:502"
            publish = "batch"
            [[modbus.tags]]
            name = "x"
        "#);
        assert_eq!(validate(&d, "gw"), vec![]);
        assert_eq!(d[0].batch_topic("gw"), "field/a/batch");
        assert_eq!(d[0].publish_interval(), d[0].poll_interval);
        let d = dev(r#"
            [[modbus]]
            name = "a"
            host = "127.0.0.1:502"
            publish = "batch"
            publish_interval = "1ms"
            payload = "raw"
            [[modbus.tags]]
            name = "batch"
            [[modbus.tags]]
            name = "y"
            on_change = true
            [[modbus]]
            name = "b"
            host = "127.0.0.1:503"
            publish = "batch"
            batch_topic = "field/{tag}"
            [[modbus.tags]]
            name = "x"
            [[modbus]]
            name = "c"
            host = "127.0.0.1:504"
            publish_interval = "10s"
            [[modbus.tags]]
            name = "x"
        "#);
        let p = validate(&d, "gw");
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        for want in [
            "modbus[0].publish_interval",
            "modbus[0].payload",
            "modbus[0].tags[0].name",
            "modbus[0].tags[1].on_change",
            "modbus[1].batch_topic",
            "modbus[2].publish_interval",
        ] {
            assert!(keys.contains(&want), "{want} missing from {p:#?}");
        }
        assert_eq!(p.len(), 6, "{p:#?}");
    }

    #[test]
    fn area_and_line_are_single_topic_levels_and_the_templates_are_listed() {
        let mut d = dev(r#"
            [[modbus]]
            name = "m"
            host = "127.0.0.1:502"
            area = "hall/2"
            line = "l+"
            [[modbus.tags]]
            name = "t"
        "#);
        let keys: Vec<String> = validate(&d, "gw").into_iter().map(|p| p.key).collect();
        assert_eq!(keys, ["modbus[0].area", "modbus[0].line"]);
        let t = d[0].templates();
        let listed: Vec<(&str, &str)> = t.iter().map(|t| (t.key, t.default_tail)).collect();
        assert_eq!(
            listed,
            [
                ("topic", "{device}/{tag}"),
                ("status_topic", "{device}/status"),
                ("batch_topic", "{device}/batch")
            ]
        );
        // Without [gateway.namespace] the defaults are today's.
        assert_eq!(*t[0].template, format!("field/{}", t[0].default_tail));
    }

    #[test]
    fn frame_gap_follows_baud() {
        let mut d = ModbusDeviceConfig {
            baud: 9600,
            ..Default::default()
        };
        assert!(d.frame_gap() > Duration::from_millis(4));
        d.baud = 115_200;
        assert_eq!(d.frame_gap(), Duration::from_micros(1750));
        d.inter_frame_gap = Some(Duration::from_millis(10));
        assert_eq!(d.frame_gap(), Duration::from_millis(10));
    }

    #[test]
    fn one_based_addresses() {
        let t = TagConfig {
            address: 1,
            ..Default::default()
        };
        assert_eq!(t.wire_address(1), Some(0));
        assert_eq!(t.wire_address(0), Some(1));
        let t = TagConfig {
            address: 65536,
            ..Default::default()
        };
        assert_eq!(t.wire_address(1), Some(65535));
        assert_eq!(t.wire_address(0), None);
    }
}
