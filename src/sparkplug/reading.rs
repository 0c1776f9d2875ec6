//! The sources' JSON payloads read back as metric values: the contract written by
//! [`crate::sources::modbus::publish`] (`{"value":..,"ts":..,"quality":..}` per tag, the
//! batch `{"ts":..,"values":{..}}`, and the status `{"state":..}`). Pure.
//!
//! A payload that is not JSON is the `payload = "raw"` format: the value alone as text.
//! What cannot be read is `None`, and the caller sends it on unchanged rather than lose it.

use serde_json::Value as Json;

use super::node::BatchShape;
use super::payload::{DataType, Value};

/// One reading: its value (`None` when the reading failed) and when it was made.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// The value as the metric's type takes it.
    pub value: Option<Value>,
    /// ms since the epoch; `None` when the payload says no time (raw payloads).
    pub ts: Option<u64>,
}

/// The value of a JSON value for a metric of type `ty`: numbers as integers for integer
/// types (exactly, from u64/i64) and as floats otherwise; arrays and objects as their JSON
/// text for String metrics. `None` for null or a value of another kind.
pub fn value_of(json: &Json, ty: DataType) -> Option<Value> {
    use DataType as T;
    match (json, ty) {
        (Json::Null, _) => None,
        (Json::Bool(b), T::Boolean) => Some(Value::Bool(*b)),
        (Json::Number(n), T::Float | T::Double) => n.as_f64().map(Value::Float),
        (Json::Number(n), _) if ty != T::Boolean && ty != T::String => n
            .as_u64()
            .map(|v| Value::Int(v.into()))
            .or_else(|| n.as_i64().map(|v| Value::Int(v.into())))
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0)
                    .map(|f| Value::Int(f as i128))
            }),
        (Json::String(s), T::String) => Some(Value::Text(s.clone())),
        (other, T::String) => Some(Value::Text(other.to_string())),
        _ => None,
    }
}

/// A tag reading.
pub fn tag(payload: &[u8], ty: DataType) -> Option<Reading> {
    match serde_json::from_slice::<Json>(payload) {
        Ok(Json::Object(m)) if m.contains_key("value") && m.contains_key("ts") => Some(Reading {
            value: m.get("value").and_then(|v| value_of(v, ty)),
            ts: m.get("ts").and_then(Json::as_u64),
        }),
        Ok(scalar @ (Json::Number(_) | Json::Bool(_))) => Some(Reading {
            value: value_of(&scalar, ty),
            ts: None,
        }),
        Ok(_) if ty == DataType::String => raw_text(payload),
        Ok(_) => None,
        Err(_) if ty == DataType::String => raw_text(payload),
        Err(_) => None,
    }
}

fn raw_text(payload: &[u8]) -> Option<Reading> {
    std::str::from_utf8(payload).ok().map(|s| Reading {
        value: Some(Value::Text(s.to_string())),
        ts: None,
    })
}

/// A batch read back: its time (`None` when the shape carries none, a bare object) and
/// `(metric name, value)` pairs.
pub type BatchReading = (Option<u64>, Vec<(String, Json)>);

/// A batch of `shape`.
pub fn batch(payload: &[u8], shape: BatchShape) -> Option<BatchReading> {
    let Json::Object(mut m) = serde_json::from_slice::<Json>(payload).ok()? else {
        return None;
    };
    let key = match shape {
        BatchShape::Object => return Some((None, m.into_iter().collect())),
        BatchShape::Values => "values",
        BatchShape::Envelope => "value",
    };
    let ts = m.get("ts").and_then(Json::as_u64)?;
    let Some(Json::Object(values)) = m.remove(key) else {
        return None;
    };
    Some((Some(ts), values.into_iter().collect()))
}

/// A device status: `Some(true)` online (or degraded: it answers), `Some(false)` offline.
pub fn status(payload: &[u8]) -> Option<(bool, Option<u64>)> {
    let m: Json = serde_json::from_slice(payload).ok()?;
    let online = match m.get("state")?.as_str()? {
        "online" | "degraded" => true,
        "offline" => false,
        _ => return None,
    };
    Some((online, m.get("ts").and_then(Json::as_u64)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_readings_are_typed_by_their_metric() {
        let r = tag(
            br#"{"value":21.5,"ts":17,"quality":"good","unit":"W"}"#,
            DataType::Float,
        )
        .unwrap();
        assert_eq!(
            r,
            Reading {
                value: Some(Value::Float(21.5)),
                ts: Some(17)
            }
        );
        let r = tag(br#"{"value":-4,"ts":1,"quality":"good"}"#, DataType::Int16).unwrap();
        assert_eq!(r.value, Some(Value::Int(-4)));
        let r = tag(
            br#"{"value":18446744073709551615,"ts":1}"#,
            DataType::UInt64,
        )
        .unwrap();
        assert_eq!(r.value, Some(Value::Int(u64::MAX.into())));
        let r = tag(
            br#"{"value":null,"ts":3,"quality":"timeout"}"#,
            DataType::Float,
        )
        .unwrap();
        assert_eq!(
            r,
            Reading {
                value: None,
                ts: Some(3)
            }
        );
        let r = tag(br#"{"value":[true,false],"ts":3}"#, DataType::String).unwrap();
        assert_eq!(r.value, Some(Value::Text("[true,false]".into())));
    }

    #[test]
    fn raw_payloads_are_the_value_alone() {
        assert_eq!(
            tag(b"12", DataType::UInt16).unwrap().value,
            Some(Value::Int(12))
        );
        assert_eq!(
            tag(b"true", DataType::Boolean).unwrap().value,
            Some(Value::Bool(true))
        );
        assert_eq!(
            tag(b"hello there", DataType::String).unwrap().value,
            Some(Value::Text("hello there".into()))
        );
        assert_eq!(tag(b"hello", DataType::UInt16), None);
        assert_eq!(tag(br#"{"other":1}"#, DataType::UInt16), None);
    }

    #[test]
    fn batches_and_statuses_are_read() {
        let (ts, v) = batch(
            br#"{"ts":9,"values":{"a":1,"b":null},"quality":{}}"#,
            BatchShape::Values,
        )
        .unwrap();
        assert_eq!(ts, Some(9));
        assert_eq!(v.len(), 2);
        let (ts, v) = batch(br#"{"weight":1.5,"unit":"kg"}"#, BatchShape::Object).unwrap();
        assert_eq!((ts, v.len()), (None, 2));
        let (ts, v) = batch(br#"{"ts":4,"value":{"weight":1.5}}"#, BatchShape::Envelope).unwrap();
        assert_eq!((ts, v.len()), (Some(4), 1));
        assert!(batch(br#"{"weight":1.5}"#, BatchShape::Envelope).is_none());
        assert_eq!(
            status(br#"{"state":"offline","ts":4,"error":"x"}"#),
            Some((false, Some(4)))
        );
        assert_eq!(
            status(br#"{"state":"degraded","ts":4}"#),
            Some((true, Some(4)))
        );
        assert_eq!(status(b"nonsense"), None);
    }
}
