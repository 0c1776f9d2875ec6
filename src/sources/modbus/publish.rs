//! What Modbus sources publish, and what they accept as a write: the MQTT contract. Pure.
//!
//! - tag value, on the tag topic (`field/{device}/{tag}` by default):
//!   `{"value":21.5,"ts":1712345678901,"quality":"good","unit":"degC"}`; when a reading
//!   failed, `{"value":null,"ts":..,"quality":"exception","error":"illegal data address"}`.
//!   `payload = "raw"`: the value alone as text, nothing when the reading failed.
//! - batch (`publish = "batch"`), on the batch topic (`field/{device}/batch` by default),
//!   every `publish_interval`, instead of the tag values ([`batch`]):
//!   `{"ts":..,"values":{"power":21.5,"broken":null},"quality":{"power":"good","broken":
//!   "exception"},"errors":{"broken":".."},"units":{"power":"W"}}`; every tag read so far,
//!   its value formatted exactly as on its tag topic; `errors` only for tags that are not
//!   good, `units` only for tags with a unit (either key absent when empty).
//! - device status, retained, on the status topic: `{"state":"online","ts":..}`,
//!   `{"state":"degraded","ts":..,"failing":[{"tag":"..","quality":"exception","error":".."}]}`
//!   (the device answers, but some of its tags fail) or
//!   `{"state":"offline","ts":..,"error":"..","kind":"timeout"}`.
//! - write request on `<tag topic>/set` (or `<command_prefix><tag topic>/set`): a JSON value
//!   (`21.5`, `true`, `"text"`) or `{"value":..,"id":..}`; a plain non-JSON payload is taken
//!   as text for string tags.
//! - write result on `<tag topic>/set/result`:
//!   `{"ok":true,"id":..}` or `{"ok":false,"code":"out_of_range","error":"..","id":..}`;
//!   every result carries the request's `id` when the request was an object with one, even
//!   when the request itself was refused.
//!
//! Invariant: a failing tag publishes its bad quality when the quality changes and then at
//! most once per `bad_repeat` while it stays bad ([`repeat_bad`]; never with `retain = true`,
//! where the retained reading already reaches a late subscriber), not every poll, so a dead
//! device does not flood the broker while a subscriber that came late still sees it.

use serde_json::{json, Map, Value as Json};

use super::codec::Value;
use super::config::PayloadFormat;

/// Quality of one reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quality {
    /// Read and decoded.
    Good,
    /// The device answered with a Modbus exception.
    Exception,
    /// No answer within the timeout.
    Timeout,
    /// A corrupt, short or mismatched answer (CRC, framing).
    BadFrame,
    /// The device (or its port or connection) is unreachable.
    Offline,
    /// Read, but not a publishable number (NaN or infinity).
    Invalid,
}

impl Quality {
    /// Payload spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Quality::Good => "good",
            Quality::Exception => "exception",
            Quality::Timeout => "timeout",
            Quality::BadFrame => "bad_frame",
            Quality::Offline => "offline",
            Quality::Invalid => "invalid",
        }
    }
}

/// The payload of one reading, or `None` when nothing is to be published (raw format and a
/// failed reading).
pub fn reading(
    format: PayloadFormat,
    value: Option<&Value>,
    quality: Quality,
    error: Option<&str>,
    unit: &str,
    ts: u64,
) -> Option<Vec<u8>> {
    match format {
        PayloadFormat::Raw => {
            let v = value.filter(|_| quality == Quality::Good)?;
            Some(match v {
                Value::Str(s) => s.clone().into_bytes(),
                other => other.to_json().to_string().into_bytes(),
            })
        }
        PayloadFormat::Json => {
            let mut m = Map::new();
            m.insert(
                "value".into(),
                value.map(Value::to_json).unwrap_or(Json::Null),
            );
            m.insert("ts".into(), ts.into());
            m.insert("quality".into(), quality.as_str().into());
            if !unit.is_empty() {
                m.insert("unit".into(), unit.into());
            }
            if let Some(e) = error {
                m.insert("error".into(), e.into());
            }
            Some(Json::Object(m).to_string().into_bytes())
        }
    }
}

/// The latest reading of one tag, as a batch carries it.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    /// Tag name (the key in `values`, `quality`, ...).
    pub tag: &'a str,
    /// The value; `None` when the reading failed.
    pub value: Option<&'a Value>,
    /// Its quality.
    pub quality: Quality,
    /// Why it is not good.
    pub error: Option<&'a str>,
    /// The tag's unit, empty for none.
    pub unit: &'a str,
}

/// The payload of a batch: the latest reading of every tag given (keys sorted by name).
pub fn batch(entries: &[Entry<'_>], ts: u64) -> Vec<u8> {
    let (mut values, mut quality, mut errors, mut units) =
        (Map::new(), Map::new(), Map::new(), Map::new());
    for e in entries {
        values.insert(
            e.tag.into(),
            e.value.map(Value::to_json).unwrap_or(Json::Null),
        );
        quality.insert(e.tag.into(), e.quality.as_str().into());
        if e.quality != Quality::Good {
            errors.insert(e.tag.into(), e.error.unwrap_or_default().into());
        }
        if !e.unit.is_empty() {
            units.insert(e.tag.into(), e.unit.into());
        }
    }
    let mut m = Map::new();
    m.insert("ts".into(), ts.into());
    m.insert("values".into(), Json::Object(values));
    m.insert("quality".into(), Json::Object(quality));
    if !errors.is_empty() {
        m.insert("errors".into(), Json::Object(errors));
    }
    if !units.is_empty() {
        m.insert("units".into(), Json::Object(units));
    }
    Json::Object(m).to_string().into_bytes()
}

/// Whether a reading is published, given what was published last for the tag.
pub fn changed(
    on_change: bool,
    deadband: f64,
    last: Option<&(Option<Value>, Quality)>,
    value: Option<&Value>,
    quality: Quality,
) -> bool {
    let Some((last_v, last_q)) = last else {
        return true;
    };
    if *last_q != quality {
        return true;
    }
    if quality != Quality::Good {
        // Same bad quality as last time: already reported.
        return false;
    }
    if !on_change {
        return true;
    }
    match (last_v, value) {
        (Some(a), Some(b)) => match (a.as_f64(), b.as_f64()) {
            (Some(x), Some(y)) if deadband > 0.0 => (x - y).abs() > deadband,
            _ => a != b,
        },
        (a, b) => a.as_ref() != b,
    }
}

/// Whether a reading of the same bad quality as last time is published again: only without
/// `retain`, with a non-zero `every`, once `since_last` (the time since it was last
/// published) reached `every`.
pub fn repeat_bad(
    retain: bool,
    every: std::time::Duration,
    since_last: std::time::Duration,
) -> bool {
    !retain && !every.is_zero() && since_last >= every
}

/// One failing tag of a device that answers (status `degraded`).
#[derive(Debug, Clone, PartialEq)]
pub struct Failing {
    /// Tag name.
    pub tag: String,
    /// Its last bad quality.
    pub quality: Quality,
    /// Its last error.
    pub error: String,
}

/// What the retained status says.
#[derive(Debug, Clone, PartialEq)]
pub enum Status<'a> {
    /// Answers, every tag reads.
    Online,
    /// Answers, but these tags fail (exception, undecodable or non-finite value).
    Degraded(&'a [Failing]),
    /// Unreachable: `(kind, error)`.
    Offline(&'a str, &'a str),
}

/// The retained status payload.
pub fn status(s: &Status<'_>, ts: u64) -> Vec<u8> {
    let mut m = Map::new();
    let state = match s {
        Status::Online => "online",
        Status::Degraded(_) => "degraded",
        Status::Offline(..) => "offline",
    };
    m.insert("state".into(), state.into());
    m.insert("ts".into(), ts.into());
    match s {
        Status::Online => {}
        Status::Degraded(f) => {
            let list = f
                .iter()
                .map(|f| json!({"tag": f.tag, "quality": f.quality.as_str(), "error": f.error}))
                .collect();
            m.insert("failing".into(), Json::Array(list));
        }
        Status::Offline(kind, e) => {
            m.insert("error".into(), (*e).into());
            m.insert("kind".into(), (*kind).into());
        }
    }
    Json::Object(m).to_string().into_bytes()
}

/// A parsed write request.
#[derive(Debug, Clone, PartialEq)]
pub struct SetRequest {
    /// The value to write.
    pub value: Json,
    /// Echoed in the result.
    pub id: Option<Json>,
}

/// Parses a write payload. `Err` is the message for the result.
pub fn parse_set(payload: &[u8], text_tag: bool) -> Result<SetRequest, String> {
    match serde_json::from_slice::<Json>(payload) {
        Ok(Json::Object(mut m)) => {
            let id = m.remove("id");
            match m.remove("value") {
                Some(value) => Ok(SetRequest { value, id }),
                None => Err("an object payload needs a \"value\" key: {\"value\":..,\"id\":..}".into()),
            }
        }
        Ok(value) => Ok(SetRequest { value, id: None }),
        Err(e) => match std::str::from_utf8(payload) {
            Ok(s) if text_tag => Ok(SetRequest {
                value: Json::String(s.to_string()),
                id: None,
            }),
            _ => Err(format!(
                "payload is not JSON ({e}); send a value like 21.5, true or {{\"value\":21.5,\"id\":\"x\"}}"
            )),
        },
    }
}

/// The `id` of a write request, read on its own so that a refused request (an object
/// without `value`, an unknown tag) is still answered with it. `None` unless the payload is
/// a JSON object with an `id`.
pub fn request_id(payload: &[u8]) -> Option<Json> {
    match serde_json::from_slice::<Json>(payload) {
        Ok(Json::Object(mut m)) => m.remove("id"),
        _ => None,
    }
}

/// The result payload of a write: `error` is `(code, message)`.
pub fn set_result(error: Option<(&str, &str)>, id: Option<&Json>) -> Vec<u8> {
    let mut v = match error {
        None => json!({"ok": true}),
        Some((code, msg)) => json!({"ok": false, "code": code, "error": msg}),
    };
    if let (Some(id), Json::Object(m)) = (id, &mut v) {
        m.insert("id".into(), id.clone());
    }
    v.to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn j(b: Option<Vec<u8>>) -> Json {
        serde_json::from_slice(&b.expect("payload")).expect("json")
    }

    #[test]
    fn json_and_raw_readings() {
        let v = Value::F64(21.5);
        assert_eq!(
            j(reading(
                PayloadFormat::Json,
                Some(&v),
                Quality::Good,
                None,
                "degC",
                7
            )),
            json!({"value":21.5,"ts":7,"quality":"good","unit":"degC"})
        );
        assert_eq!(
            j(reading(
                PayloadFormat::Json,
                None,
                Quality::Exception,
                Some("illegal data address"),
                "",
                7
            )),
            json!({"value":null,"ts":7,"quality":"exception","error":"illegal data address"})
        );
        assert_eq!(
            reading(PayloadFormat::Raw, Some(&v), Quality::Good, None, "", 7),
            Some(b"21.5".to_vec())
        );
        assert_eq!(
            reading(
                PayloadFormat::Raw,
                Some(&Value::Str("ab".into())),
                Quality::Good,
                None,
                "",
                7
            ),
            Some(b"ab".to_vec())
        );
        assert_eq!(
            reading(PayloadFormat::Raw, None, Quality::Timeout, None, "", 7),
            None
        );
    }

    #[test]
    fn batch_payload_holds_every_tag() {
        let (p, pi) = (Value::U64(5), Value::F64(21.25));
        let e = [
            Entry {
                tag: "power",
                value: Some(&p),
                quality: Quality::Good,
                error: None,
                unit: "W",
            },
            Entry {
                tag: "pi",
                value: Some(&pi),
                quality: Quality::Good,
                error: None,
                unit: "",
            },
            Entry {
                tag: "broken",
                value: None,
                quality: Quality::Exception,
                error: Some("illegal data address (exception 2)"),
                unit: "",
            },
        ];
        let b: Json = serde_json::from_slice(&batch(&e, 7)).expect("json");
        assert_eq!(
            b,
            json!({"ts":7,"values":{"power":5,"pi":21.25,"broken":null},
                "quality":{"power":"good","pi":"good","broken":"exception"},
                "errors":{"broken":"illegal data address (exception 2)"},
                "units":{"power":"W"}})
        );
        let b: Json = serde_json::from_slice(&batch(&e[1..2], 7)).expect("json");
        assert_eq!(
            b,
            json!({"ts":7,"values":{"pi":21.25},"quality":{"pi":"good"}})
        );
    }

    #[test]
    fn change_detection() {
        let last = (Some(Value::F64(10.0)), Quality::Good);
        let v = |x| Some(Value::F64(x));
        assert!(changed(
            false,
            0.0,
            Some(&last),
            v(10.0).as_ref(),
            Quality::Good
        ));
        assert!(!changed(
            true,
            0.0,
            Some(&last),
            v(10.0).as_ref(),
            Quality::Good
        ));
        assert!(changed(
            true,
            0.0,
            Some(&last),
            v(10.1).as_ref(),
            Quality::Good
        ));
        assert!(!changed(
            true,
            0.5,
            Some(&last),
            v(10.4).as_ref(),
            Quality::Good
        ));
        assert!(changed(
            true,
            0.5,
            Some(&last),
            v(10.6).as_ref(),
            Quality::Good
        ));
        assert!(changed(true, 0.5, None, v(10.0).as_ref(), Quality::Good));
        // Bad quality: once per change.
        assert!(changed(false, 0.0, Some(&last), None, Quality::Timeout));
        let bad = (None, Quality::Timeout);
        assert!(!changed(false, 0.0, Some(&bad), None, Quality::Timeout));
        assert!(changed(false, 0.0, Some(&bad), None, Quality::Exception));
        assert!(changed(
            true,
            0.0,
            Some(&bad),
            v(10.0).as_ref(),
            Quality::Good
        ));
    }

    #[test]
    fn set_payloads() {
        assert_eq!(
            parse_set(b"21.5", false),
            Ok(SetRequest {
                value: json!(21.5),
                id: None
            })
        );
        assert_eq!(
            parse_set(br#"{"value":true,"id":"a1"}"#, false),
            Ok(SetRequest {
                value: json!(true),
                id: Some(json!("a1"))
            })
        );
        assert_eq!(
            parse_set(b"hello", true),
            Ok(SetRequest {
                value: json!("hello"),
                id: None
            })
        );
        assert!(parse_set(b"hello", false).is_err());
        assert!(parse_set(br#"{"id":1}"#, false).is_err());
        assert_eq!(request_id(br#"{"id":1}"#), Some(json!(1)));
        assert_eq!(request_id(br#"{"id":"e8","valeu":2}"#), Some(json!("e8")));
        assert_eq!(request_id(b"21.5"), None);
        assert_eq!(request_id(b"not json"), None);
        let r: Json = serde_json::from_slice(&set_result(
            Some(("read_only", "tag x is read-only")),
            Some(&json!(7)),
        ))
        .expect("json");
        assert_eq!(
            r,
            json!({"ok":false,"code":"read_only","error":"tag x is read-only","id":7})
        );
        let r: Json = serde_json::from_slice(&set_result(None, None)).expect("json");
        assert_eq!(r, json!({"ok":true}));
    }

    #[test]
    fn status_payloads() {
        let s: Json = serde_json::from_slice(&status(&Status::Offline("timeout", "no answer"), 5))
            .expect("json");
        assert_eq!(
            s,
            json!({"state":"offline","ts":5,"error":"no answer","kind":"timeout"})
        );
        let s: Json = serde_json::from_slice(&status(&Status::Online, 5)).expect("json");
        assert_eq!(s, json!({"state":"online","ts":5}));
        let f = [Failing {
            tag: "t".into(),
            quality: Quality::Exception,
            error: "illegal data address (exception 2)".into(),
        }];
        let s: Json = serde_json::from_slice(&status(&Status::Degraded(&f), 5)).expect("json");
        assert_eq!(
            s,
            json!({"state":"degraded","ts":5,"failing":[
                {"tag":"t","quality":"exception","error":"illegal data address (exception 2)"}]})
        );
    }

    #[test]
    fn bad_readings_repeat_rate_limited_and_never_when_retained() {
        let ms = std::time::Duration::from_millis;
        assert!(!repeat_bad(false, ms(1000), ms(999)));
        assert!(repeat_bad(false, ms(1000), ms(1000)));
        assert!(!repeat_bad(true, ms(1000), ms(5000)));
        assert!(!repeat_bad(false, ms(0), ms(5000)));
    }
}
