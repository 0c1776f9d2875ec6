//! `[[serial]]`: the configuration of one serial-line device, and its validation.
//!
//! Owns the typed form of a device's settings and the checks that run before anything starts
//! ([`validate`]). Invariants once [`validate`] returned no problem:
//! - every device has a unique, topic-safe `name` and a unique `port` (one owner per port);
//! - the delimiter and the write line ending parse ([`unescape`]), the frame limits are in
//!   `1..=MAX_FRAME`, and a `regex` pattern compiles and has at least one named capture;
//! - the expanded data, write and status topics are valid MQTT topic names and distinct, so a
//!   device can never read its own writes back as data;
//! - `area` and `line` (the device's own ISA-95 levels) are single topic levels. The
//!   namespace placeholders (`{enterprise}` ...) are filled into the topic templates when the
//!   configuration is loaded ([`crate::config`], with [`SerialDeviceConfig::templates`]), so
//!   the templates here carry only `{gateway_id}` and `{device}`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::problem::{problem, Problem};
use crate::topic;

/// Largest frame (delimited `max_length` or `fixed` `length`) a device may be given, bytes.
pub const MAX_FRAME: usize = 1024 * 1024;

/// `[[serial]]`: one device on one serial port.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SerialDeviceConfig {
    /// Device name: `{device}` in topics, the `device` label of metrics, the log span.
    /// 1-64 characters without `/`, `+`, `#`; unique among `[[serial]]` devices.
    pub name: String,
    /// Serial port path, e.g. `/dev/ttyUSB0`; prefer a stable `/dev/serial/by-id/...` link.
    pub port: PathBuf,
    /// Line speed in bits per second.
    pub baud: u32,
    /// `none`, `odd` or `even`.
    pub parity: Parity,
    /// Data bits per character: 5, 6, 7 or 8.
    pub data_bits: u8,
    /// Stop bits: 1 or 2.
    pub stop_bits: u8,
    /// `none`, `software` (XON/XOFF) or `hardware` (RTS/CTS).
    pub flow_control: FlowControl,
    /// How the byte stream is cut into frames.
    pub framing: FramingConfig,
    /// How a frame becomes a payload.
    pub decode: DecodeConfig,
    /// ISA-95 area of this device, in place of `gateway.namespace.area` in its topics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub area: Option<String>,
    /// ISA-95 line of this device, in place of `gateway.namespace.line` in its topics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<String>,
    /// Topic each decoded frame is published to. `{device}` and `{gateway_id}` are replaced,
    /// and the namespace's `{enterprise}`, `{site}`, `{area}`, `{line}`. Default:
    /// `<root>/{device}/data`, the root from `[gateway.namespace]` (`field` unless set).
    pub topic: String,
    /// Wrap each payload as `{"ts": <ms since epoch>, "value": <decoded>}`.
    pub envelope: bool,
    /// Payloads published here are written to the port as they are. `{device}` and
    /// `{gateway_id}` are replaced (and the namespace levels). Empty: the device is
    /// read-only. Default: `<root>/{device}/write`.
    pub write_topic: String,
    /// Appended to every write, e.g. `"\r\n"`. Escapes as in `framing.delimiter`. Empty: none.
    pub write_line_ending: String,
    /// Longest a write may wait for the port to take its bytes; after that it is dropped.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Retained `{"state": "online"|"offline", "error": ..., "ts": ...}` for this device.
    /// Default: `<root>/{device}/status`.
    pub status_topic: String,
    /// First delay before reopening a port that failed; doubles per failure.
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Longest delay between attempts to reopen the port.
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
}

impl Default for SerialDeviceConfig {
    fn default() -> Self {
        SerialDeviceConfig {
            name: String::new(),
            port: PathBuf::new(),
            baud: 9600,
            parity: Parity::None,
            data_bits: 8,
            stop_bits: 1,
            flow_control: FlowControl::None,
            framing: FramingConfig::default(),
            decode: DecodeConfig::default(),
            area: None,
            line: None,
            topic: format!("{}/{DATA_TAIL}", topic::DEFAULT_ROOT),
            envelope: false,
            write_topic: format!("{}/{WRITE_TAIL}", topic::DEFAULT_ROOT),
            write_line_ending: String::new(),
            write_timeout: Duration::from_secs(2),
            status_topic: format!("{}/{STATUS_TAIL}", topic::DEFAULT_ROOT),
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
        }
    }
}

/// The default data topic after its root.
const DATA_TAIL: &str = "{device}/data";
/// The default write topic after its root.
const WRITE_TAIL: &str = "{device}/write";
/// The default status topic after its root.
const STATUS_TAIL: &str = "{device}/status";

/// Parity bit.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Parity {
    /// No parity bit.
    None,
    /// Odd parity.
    Odd,
    /// Even parity.
    Even,
}

/// Flow control.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FlowControl {
    /// None.
    None,
    /// XON/XOFF characters.
    Software,
    /// RTS/CTS lines.
    Hardware,
}

/// `[serial.framing]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FramingConfig {
    /// `delimiter` (frames end with `delimiter`) or `fixed` (every `length` bytes is a frame).
    pub mode: FramingMode,
    /// Delimiter mode: the byte string that ends a frame, not part of the frame. Besides TOML's
    /// own escapes, `\xNN` (any byte), `\n`, `\r`, `\t`, `\0` and `\\` are understood, so
    /// `'\x03'` is ETX. With the default `"\n"` a `\r` before it is removed too.
    pub delimiter: String,
    /// Delimiter mode: longest frame, bytes. A longer one is dropped, counted as `too_long`,
    /// and reading resumes after the next delimiter.
    pub max_length: usize,
    /// Fixed mode: frame length in bytes.
    pub length: usize,
}

impl Default for FramingConfig {
    fn default() -> Self {
        FramingConfig {
            mode: FramingMode::Delimiter,
            delimiter: "\n".into(),
            max_length: 4096,
            length: 0,
        }
    }
}

/// How frames are cut.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FramingMode {
    /// A delimiter ends each frame.
    Delimiter,
    /// Every frame has the same length.
    Fixed,
}

/// `[serial.decode]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DecodeConfig {
    /// `raw` (text, invalid UTF-8 replaced by U+FFFD), `hex` (lowercase hex of the bytes, for
    /// binary frames), `json` (must parse; published unchanged) or `regex`.
    pub mode: DecodeMode,
    /// Regex mode: a pattern (Rust `regex` syntax) with named captures, e.g.
    /// `'^(?P<weight>-?\d+\.\d+) (?P<unit>\w+)$'`. Each capture becomes a key of a JSON object;
    /// a capture that is a JSON number becomes a number.
    pub pattern: String,
    /// Regex mode with `[sparkplug]`: the Sparkplug type of a capture's metric (`double`,
    /// `int64`, `boolean` or `string`), e.g. `{ weight = "double" }`. A capture not named
    /// here is a String metric.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metric_types: BTreeMap<String, MetricType>,
}

/// The Sparkplug type of a regex capture (`decode.metric_types`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MetricType {
    /// Double.
    Double,
    /// Int64.
    Int64,
    /// Boolean.
    Boolean,
    /// String.
    String,
}

impl Default for DecodeConfig {
    fn default() -> Self {
        DecodeConfig {
            mode: DecodeMode::Raw,
            pattern: String::new(),
            metric_types: BTreeMap::new(),
        }
    }
}

/// How a frame becomes a payload.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DecodeMode {
    /// Lossy UTF-8 text.
    Raw,
    /// Lowercase hexadecimal of the bytes.
    Hex,
    /// JSON, validated, passed through.
    Json,
    /// Named captures of a regex, as a JSON object.
    Regex,
}

impl SerialDeviceConfig {
    /// The topic templates the namespace is filled into when the configuration is loaded.
    pub fn templates(&mut self) -> [topic::DeviceTemplate<'_>; 3] {
        const KEEP: &[&str] = &["gateway_id", "device"];
        [
            topic::DeviceTemplate {
                key: "topic",
                template: &mut self.topic,
                default_tail: DATA_TAIL,
                keep: KEEP,
            },
            topic::DeviceTemplate {
                key: "write_topic",
                template: &mut self.write_topic,
                default_tail: WRITE_TAIL,
                keep: KEEP,
            },
            topic::DeviceTemplate {
                key: "status_topic",
                template: &mut self.status_topic,
                default_tail: STATUS_TAIL,
                keep: KEEP,
            },
        ]
    }

    /// Replaces `{device}` and `{gateway_id}` in a topic template.
    pub fn expand(&self, template: &str, gateway_id: &str) -> String {
        crate::topic::with_gateway_id(template, gateway_id).replace("{device}", &self.name)
    }
}

/// Turns a delimiter or line-ending setting into bytes: the string's UTF-8 bytes, with `\xNN`,
/// `\n`, `\r`, `\t`, `\0` and `\\` replaced. `Err` names the bad escape.
pub fn unescape(s: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        match b.get(i + 1) {
            Some(b'n') => out.push(b'\n'),
            Some(b'r') => out.push(b'\r'),
            Some(b't') => out.push(b'\t'),
            Some(b'0') => out.push(0),
            Some(b'\\') => out.push(b'\\'),
            Some(b'x') => {
                let hex = s
                    .get(i + 2..i + 4)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad escape at byte {i}: \\x needs two hex digits"))?;
                out.push(hex);
                i += 4;
                continue;
            }
            _ => {
                return Err(format!(
                    "unknown escape at byte {i}; use \\xNN, \\n, \\r, \\t, \\0 or \\\\"
                ))
            }
        }
        i += 2;
    }
    Ok(out)
}

/// Checks every `[[serial]]` device; returns every problem, keyed `serial[i].path`.
pub fn validate(devices: &[SerialDeviceConfig], gateway_id: &str) -> Vec<Problem> {
    let mut p = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        let key = |k: &str| format!("serial[{i}].{k}");
        if d.name.is_empty() || d.name.contains(['/', '+', '#']) || d.name.len() > 64 {
            p.push(problem(
                key("name"),
                format!(
                    "{:?} is not a usable device name; use 1-64 characters without '/', '+' or '#'",
                    d.name
                ),
            ));
        }
        if let Some(j) = devices[..i].iter().position(|o| o.name == d.name) {
            p.push(problem(
                key("name"),
                format!(
                    "{:?} is also the name of serial[{j}]; give each device its own name",
                    d.name
                ),
            ));
        }
        for (level, value) in [("area", &d.area), ("line", &d.line)] {
            let Some(v) = value else { continue };
            if let Err(e) = topic::validate_level(v) {
                p.push(problem(key(level), format!("{v:?}: {e}")));
            }
        }
        if d.port.as_os_str().is_empty() {
            p.push(problem(
                key("port"),
                "empty; set the serial port's path, e.g. \"/dev/ttyUSB0\"",
            ));
        } else if let Some(j) = devices[..i].iter().position(|o| o.port == d.port) {
            p.push(problem(
                key("port"),
                format!(
                    "{} is also the port of serial[{j}]; one port belongs to one device",
                    d.port.display()
                ),
            ));
        }
        if d.baud == 0 {
            p.push(problem(key("baud"), "must be above 0; e.g. 9600 or 115200"));
        }
        if !(5..=8).contains(&d.data_bits) {
            p.push(problem(key("data_bits"), "must be 5, 6, 7 or 8"));
        }
        if !(1..=2).contains(&d.stop_bits) {
            p.push(problem(key("stop_bits"), "must be 1 or 2"));
        }

        let f = &d.framing;
        match f.mode {
            FramingMode::Delimiter => {
                match unescape(&f.delimiter) {
                    Ok(b) if b.is_empty() => p.push(problem(
                        key("framing.delimiter"),
                        "empty; use e.g. \"\\n\", \"\\r\\n\" or '\\x03', or mode = \"fixed\"",
                    )),
                    Ok(b) if b.len() > 16 => p.push(problem(
                        key("framing.delimiter"),
                        "longer than 16 bytes; use the shortest byte string that ends a frame",
                    )),
                    Ok(_) => {}
                    Err(e) => p.push(problem(key("framing.delimiter"), e)),
                }
                if f.max_length == 0 || f.max_length > MAX_FRAME {
                    p.push(problem(
                        key("framing.max_length"),
                        format!("must be 1..={MAX_FRAME} bytes; e.g. 4096"),
                    ));
                }
                if f.length != 0 {
                    p.push(problem(
                        key("framing.length"),
                        "only used with mode = \"fixed\"; remove it or set framing.mode = \"fixed\"",
                    ));
                }
            }
            FramingMode::Fixed => {
                if f.length == 0 || f.length > MAX_FRAME {
                    p.push(problem(
                        key("framing.length"),
                        format!("fixed framing needs a frame length of 1..={MAX_FRAME} bytes"),
                    ));
                }
            }
        }

        match d.decode.mode {
            DecodeMode::Regex => match regex::Regex::new(&d.decode.pattern) {
                Err(e) => p.push(problem(
                    key("decode.pattern"),
                    format!("does not compile: {e}"),
                )),
                Ok(_) if d.decode.pattern.is_empty() => p.push(problem(
                    key("decode.pattern"),
                    "empty; regex decoding needs a pattern with named captures like (?P<temp>\\d+)",
                )),
                Ok(re) if re.capture_names().flatten().next().is_none() => p.push(problem(
                    key("decode.pattern"),
                    "has no named capture; name the parts to publish, e.g. (?P<temp>\\d+)",
                )),
                Ok(re) => {
                    let names: Vec<&str> = re.capture_names().flatten().collect();
                    for k in d.decode.metric_types.keys() {
                        if !names.contains(&k.as_str()) {
                            p.push(problem(
                                key(&format!("decode.metric_types.{k}")),
                                format!("the pattern has no capture {k:?}; name one of {names:?}"),
                            ));
                        }
                    }
                }
            },
            _ if !d.decode.pattern.is_empty() => p.push(problem(
                key("decode.pattern"),
                "only used with mode = \"regex\"; remove it or set decode.mode = \"regex\"",
            )),
            _ => {}
        }
        if d.decode.mode != DecodeMode::Regex && !d.decode.metric_types.is_empty() {
            p.push(problem(
                key("decode.metric_types"),
                "only used with mode = \"regex\" (it types the captures); remove it",
            ));
        }

        let data = d.expand(&d.topic, gateway_id);
        if let Err(e) = topic::validate_topic(&data) {
            p.push(problem(key("topic"), format!("{data:?}: {e}")));
        }
        let status = d.expand(&d.status_topic, gateway_id);
        if let Err(e) = topic::validate_topic(&status) {
            p.push(problem(key("status_topic"), format!("{status:?}: {e}")));
        }
        if status == data {
            p.push(problem(
                key("status_topic"),
                "is the data topic; give status its own topic, e.g. \"field/{device}/status\"",
            ));
        }
        if !d.write_topic.is_empty() {
            let write = d.expand(&d.write_topic, gateway_id);
            if let Err(e) = topic::validate_topic(&write) {
                p.push(problem(key("write_topic"), format!("{write:?}: {e}")));
            }
            if write == data || write == status {
                p.push(problem(
                    key("write_topic"),
                    "is the data or status topic, so the device would write its own readings \
                     back; use e.g. \"field/{device}/write\"",
                ));
            }
        }
        if let Err(e) = unescape(&d.write_line_ending) {
            p.push(problem(key("write_line_ending"), e));
        }
        if d.write_timeout.is_zero() {
            p.push(problem(
                key("write_timeout"),
                "must be above 0; e.g. \"2s\"",
            ));
        }
        if d.reconnect_min.is_zero() || d.reconnect_min > d.reconnect_max {
            p.push(problem(
                key("reconnect_min"),
                "must be above 0 and not above reconnect_max; e.g. \"500ms\" and \"30s\"",
            ));
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescape_understands_hex_and_c_escapes() {
        assert_eq!(unescape("\n").unwrap(), b"\n");
        assert_eq!(unescape(r"\r\n").unwrap(), b"\r\n");
        assert_eq!(unescape(r"\x03\xFFa\\").unwrap(), b"\x03\xffa\\");
        assert!(unescape(r"\x3").is_err());
        assert!(unescape(r"\q").is_err());
    }

    fn dev(name: &str, port: &str) -> SerialDeviceConfig {
        SerialDeviceConfig {
            name: name.into(),
            port: port.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_plain_device_is_valid() {
        assert_eq!(validate(&[dev("scale", "/dev/ttyUSB0")], "gw"), vec![]);
    }

    #[test]
    fn area_and_line_are_single_topic_levels_and_the_templates_are_listed() {
        let mut d = dev("scale", "/dev/ttyUSB0");
        d.area = Some(String::new());
        d.line = Some("#".into());
        let keys: Vec<String> = validate(&[d.clone()], "gw")
            .into_iter()
            .map(|p| p.key)
            .collect();
        assert_eq!(keys, ["serial[0].area", "serial[0].line"]);
        let t = d.templates();
        let listed: Vec<(&str, &str)> = t.iter().map(|t| (t.key, t.default_tail)).collect();
        assert_eq!(
            listed,
            [
                ("topic", "{device}/data"),
                ("write_topic", "{device}/write"),
                ("status_topic", "{device}/status")
            ]
        );
        assert_eq!(*t[2].template, "field/{device}/status");
    }

    #[test]
    fn every_problem_is_named_with_its_index() {
        let mut a = dev("a", "/dev/x");
        a.framing.delimiter = String::new();
        let mut b = dev("a", "/dev/x");
        b.decode.mode = DecodeMode::Regex;
        b.decode.pattern = r"(\d+)".into();
        b.framing.mode = FramingMode::Fixed;
        b.write_topic = "field/{device}/data".into();
        b.data_bits = 9;
        let keys: Vec<String> = validate(&[a, b], "gw").into_iter().map(|p| p.key).collect();
        for want in [
            "serial[0].framing.delimiter",
            "serial[1].name",
            "serial[1].port",
            "serial[1].framing.length",
            "serial[1].decode.pattern",
            "serial[1].write_topic",
            "serial[1].data_bits",
        ] {
            assert!(
                keys.iter().any(|k| k == want),
                "{want} missing from {keys:?}"
            );
        }
    }
}
