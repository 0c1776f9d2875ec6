//! Turning one frame into the payload that is published.
//!
//! Owns the decoding modes (pure code, no I/O) and the optional envelope:
//! - `raw`: the frame as UTF-8 text; invalid sequences become U+FFFD (never dropped);
//! - `hex`: lowercase hexadecimal of the bytes, for binary frames (`"02a103"`);
//! - `json`: the frame must parse as JSON (else [`DecodeError::Invalid`]) and is published
//!   byte for byte as it came;
//! - `regex`: the named captures of the first match become a JSON object; a capture that is a
//!   JSON number (`-3`, `12.5`, `1e3`; not `007`, `+5` or an integer beyond 64 bits)
//!   becomes a number, any other a
//!   string, a named group that did not take part in the match `null`. A frame that does not
//!   match is [`DecodeError::NoMatch`].
//!
//! With the envelope the payload is `{"ts":<ms since the Unix epoch>,"value":<decoded>}`
//! where `<decoded>` is the text (raw, hex) as a JSON string, or the JSON value / object.

use bytes::Bytes;
use serde_json::{Map, Value};

use super::config::{DecodeConfig, DecodeMode};

/// Why a frame was not published. The port task counts it under the matching reason and
/// goes on with the next frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// `json` mode and the frame is not JSON: counted as `decode_error`, logged.
    #[error("not JSON: {0}")]
    Invalid(String),
    /// `regex` mode and the pattern does not match: counted as `no_match`.
    #[error("the pattern does not match")]
    NoMatch,
}

/// A decoded frame, before rendering.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    /// Text (raw or hex).
    Text(String),
    /// A validated JSON frame: its original bytes and the parsed value.
    Json(Bytes, Value),
    /// Regex captures.
    Object(Map<String, Value>),
}

/// One device's decoder.
#[derive(Debug, Clone)]
pub enum Decoder {
    /// Lossy UTF-8 text.
    Raw,
    /// Lowercase hex.
    Hex,
    /// JSON passthrough.
    Json,
    /// Named captures.
    Regex(regex::Regex),
}

impl Decoder {
    /// Builds the decoder; `Err` is a pattern that does not compile (caught by validation).
    pub fn new(cfg: &DecodeConfig) -> Result<Decoder, regex::Error> {
        Ok(match cfg.mode {
            DecodeMode::Raw => Decoder::Raw,
            DecodeMode::Hex => Decoder::Hex,
            DecodeMode::Json => Decoder::Json,
            DecodeMode::Regex => Decoder::Regex(regex::Regex::new(&cfg.pattern)?),
        })
    }

    /// Decodes one frame.
    pub fn decode(&self, frame: &Bytes) -> Result<Decoded, DecodeError> {
        match self {
            Decoder::Raw => Ok(Decoded::Text(String::from_utf8_lossy(frame).into_owned())),
            Decoder::Hex => {
                use std::fmt::Write;
                let mut s = String::with_capacity(frame.len() * 2);
                for b in frame.iter() {
                    let _ = write!(s, "{b:02x}");
                }
                Ok(Decoded::Text(s))
            }
            Decoder::Json => serde_json::from_slice::<Value>(frame)
                .map(|v| Decoded::Json(frame.clone(), v))
                .map_err(|e| DecodeError::Invalid(e.to_string())),
            Decoder::Regex(re) => {
                let text = String::from_utf8_lossy(frame);
                let caps = re.captures(&text).ok_or(DecodeError::NoMatch)?;
                let mut obj = Map::new();
                for name in re.capture_names().flatten() {
                    let v = match caps.name(name) {
                        None => Value::Null,
                        Some(m) => number(m.as_str())
                            .unwrap_or_else(|| Value::String(m.as_str().to_string())),
                    };
                    obj.insert(name.to_string(), v);
                }
                Ok(Decoded::Object(obj))
            }
        }
    }
}

/// The capture as a JSON number if it is written as one (JSON's own number grammar). An
/// integer too large for 64 bits stays a string (as a float it would lose digits: think of
/// long numeric barcodes).
fn number(s: &str) -> Option<Value> {
    let n: serde_json::Number = serde_json::from_str(s).ok()?;
    if n.is_f64() && !s.contains(['.', 'e', 'E']) {
        return None;
    }
    Some(Value::Number(n))
}

/// The bytes to publish: the decoded frame alone, or inside `{"ts":..,"value":..}`.
pub fn render(decoded: Decoded, envelope: Option<u64>) -> Bytes {
    match (decoded, envelope) {
        (Decoded::Text(s), None) => Bytes::from(s),
        (Decoded::Json(raw, _), None) => raw,
        (Decoded::Object(o), None) => Bytes::from(Value::Object(o).to_string()),
        (d, Some(ts)) => {
            let value = match d {
                Decoded::Text(s) => Value::String(s),
                Decoded::Json(_, v) => v,
                Decoded::Object(o) => Value::Object(o),
            };
            Bytes::from(serde_json::json!({ "ts": ts, "value": value }).to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dec(mode: DecodeMode, pattern: &str) -> Decoder {
        Decoder::new(&DecodeConfig {
            mode,
            pattern: pattern.into(),
            ..Default::default()
        })
        .unwrap()
    }

    fn b(s: &[u8]) -> Bytes {
        Bytes::copy_from_slice(s)
    }

    #[test]
    fn raw_is_lossy_text_and_hex_is_lowercase() {
        let d = dec(DecodeMode::Raw, "").decode(&b(b"ok \xff")).unwrap();
        assert_eq!(render(d, None), b("ok \u{fffd}".as_bytes()));
        let d = dec(DecodeMode::Hex, "")
            .decode(&b(b"\x02\xA1\x03"))
            .unwrap();
        assert_eq!(render(d.clone(), None), b(b"02a103"));
        assert_eq!(
            serde_json::from_slice::<Value>(&render(d, Some(7))).unwrap(),
            json!({"ts": 7, "value": "02a103"})
        );
    }

    #[test]
    fn json_passes_through_unchanged_or_is_refused() {
        let j = dec(DecodeMode::Json, "");
        let frame = b(br#"{"t": 21.5,  "ok":true}"#);
        assert_eq!(render(j.decode(&frame).unwrap(), None), frame);
        assert_eq!(
            serde_json::from_slice::<Value>(&render(j.decode(&frame).unwrap(), Some(1))).unwrap(),
            json!({"ts": 1, "value": {"t": 21.5, "ok": true}})
        );
        assert!(matches!(
            j.decode(&b(b"{\"t\": 21.")),
            Err(DecodeError::Invalid(_))
        ));
    }

    #[test]
    fn regex_captures_become_typed_fields() {
        let r = dec(
            DecodeMode::Regex,
            r"^(?P<id>\w+) (?P<w>\S+) (?P<unit>[a-z]+)(?: (?P<flag>!))?$",
        );
        let out = render(r.decode(&b(b"007 -12.50 kg")).unwrap(), None);
        assert_eq!(
            serde_json::from_slice::<Value>(&out).unwrap(),
            json!({"id": "007", "w": -12.5, "unit": "kg", "flag": null})
        );
        assert_eq!(r.decode(&b(b"nonsense")), Err(DecodeError::NoMatch));
        let big = render(
            r.decode(&b(b"x 123456789012345678901234 kg")).unwrap(),
            None,
        );
        assert_eq!(
            serde_json::from_slice::<Value>(&big).unwrap()["w"],
            json!("123456789012345678901234")
        );
    }
}
