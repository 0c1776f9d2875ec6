//! The Sparkplug B payload (Eclipse Sparkplug 3.0, chapter 6.4) as `prost` messages, and the
//! metric datatypes.
//!
//! The message definitions are written here from the specification's field tables, with the
//! field numbers it gives; only what an edge node of this gateway sends or reads is
//! declared: payload, metric, property set and property value. DataSet, Template, MetaData
//! and the extension fields are left out: a decoder skips fields it does not know, and this
//! edge node never sends them (a command that carries one is refused by value type).
//!
//! Value encoding (spec 6.4.16), as Eclipse Tahu reads it:
//! - Int8, Int16, Int32, UInt8, UInt16 in `int_value` (uint32); signed values as their
//!   32-bit two's complement;
//! - UInt32, Int64, UInt64, DateTime in `long_value` (uint64); Int64 as two's complement;
//! - Float, Double, Boolean, String in their own fields.

use prost::Message;

/// A Sparkplug payload: every NBIRTH, NDATA, DBIRTH, DDATA, DDEATH, NCMD and DCMD.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Payload {
    /// Milliseconds since the epoch, when the message was made.
    #[prost(uint64, optional, tag = "1")]
    pub timestamp: Option<u64>,
    /// The metrics.
    #[prost(message, repeated, tag = "2")]
    pub metrics: Vec<Metric>,
    /// Message sequence number, 0-255 (absent in NDEATH and commands).
    #[prost(uint64, optional, tag = "3")]
    pub seq: Option<u64>,
    /// Optional identifier of the payload's schema.
    #[prost(string, optional, tag = "4")]
    pub uuid: Option<String>,
    /// Opaque bytes.
    #[prost(bytes = "vec", optional, tag = "5")]
    pub body: Option<Vec<u8>>,
}

/// One metric: a name (or its alias) and a typed value.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Metric {
    /// The metric's name; births always carry it.
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    /// The alias the birth gave the name; data messages may carry only this.
    #[prost(uint64, optional, tag = "2")]
    pub alias: Option<u64>,
    /// When the value was read, milliseconds since the epoch.
    #[prost(uint64, optional, tag = "3")]
    pub timestamp: Option<u64>,
    /// A [`DataType`] code.
    #[prost(uint32, optional, tag = "4")]
    pub datatype: Option<u32>,
    /// A value from the past (a replayed backlog), not the current one.
    #[prost(bool, optional, tag = "5")]
    pub is_historical: Option<bool>,
    /// Not to be stored by the host.
    #[prost(bool, optional, tag = "6")]
    pub is_transient: Option<bool>,
    /// No value (a failed reading).
    #[prost(bool, optional, tag = "7")]
    pub is_null: Option<bool>,
    /// Properties: engineering units, quality, ...
    #[prost(message, optional, tag = "9")]
    pub properties: Option<PropertySet>,
    /// The value.
    #[prost(oneof = "MetricValue", tags = "10, 11, 12, 13, 14, 15, 16")]
    pub value: Option<MetricValue>,
}

/// The value fields of a metric.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum MetricValue {
    /// Int8, Int16, Int32, UInt8, UInt16.
    #[prost(uint32, tag = "10")]
    IntValue(u32),
    /// UInt32, Int64, UInt64, DateTime.
    #[prost(uint64, tag = "11")]
    LongValue(u64),
    /// Float.
    #[prost(float, tag = "12")]
    FloatValue(f32),
    /// Double.
    #[prost(double, tag = "13")]
    DoubleValue(f64),
    /// Boolean.
    #[prost(bool, tag = "14")]
    BooleanValue(bool),
    /// String, Text, UUID.
    #[prost(string, tag = "15")]
    StringValue(String),
    /// Bytes, File.
    #[prost(bytes = "vec", tag = "16")]
    BytesValue(Vec<u8>),
}

/// Named properties of a metric, `keys[i]` naming `values[i]`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PropertySet {
    /// Property names.
    #[prost(string, repeated, tag = "1")]
    pub keys: Vec<String>,
    /// Their values.
    #[prost(message, repeated, tag = "2")]
    pub values: Vec<PropertyValue>,
}

/// One property's value.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PropertyValue {
    /// A [`DataType`] code.
    #[prost(uint32, optional, tag = "1")]
    pub r#type: Option<u32>,
    /// No value.
    #[prost(bool, optional, tag = "2")]
    pub is_null: Option<bool>,
    /// The value.
    #[prost(oneof = "PropertyValueKind", tags = "3, 4, 5, 6, 7, 8")]
    pub value: Option<PropertyValueKind>,
}

/// The value fields of a property.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum PropertyValueKind {
    /// As in a metric.
    #[prost(uint32, tag = "3")]
    IntValue(u32),
    /// As in a metric.
    #[prost(uint64, tag = "4")]
    LongValue(u64),
    /// As in a metric.
    #[prost(float, tag = "5")]
    FloatValue(f32),
    /// As in a metric.
    #[prost(double, tag = "6")]
    DoubleValue(f64),
    /// As in a metric.
    #[prost(bool, tag = "7")]
    BooleanValue(bool),
    /// As in a metric.
    #[prost(string, tag = "8")]
    StringValue(String),
}

/// Sparkplug metric datatypes this edge node uses (spec 6.4.16 gives the codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    /// 8-bit signed.
    Int8,
    /// 16-bit signed.
    Int16,
    /// 32-bit signed.
    Int32,
    /// 64-bit signed.
    Int64,
    /// 8-bit unsigned.
    UInt8,
    /// 16-bit unsigned.
    UInt16,
    /// 32-bit unsigned.
    UInt32,
    /// 64-bit unsigned.
    UInt64,
    /// IEEE 754 single.
    Float,
    /// IEEE 754 double.
    Double,
    /// true/false.
    Boolean,
    /// UTF-8 text.
    String,
    /// Milliseconds since the epoch.
    DateTime,
}

impl DataType {
    /// The code on the wire.
    pub fn code(self) -> u32 {
        match self {
            DataType::Int8 => 1,
            DataType::Int16 => 2,
            DataType::Int32 => 3,
            DataType::Int64 => 4,
            DataType::UInt8 => 5,
            DataType::UInt16 => 6,
            DataType::UInt32 => 7,
            DataType::UInt64 => 8,
            DataType::Float => 9,
            DataType::Double => 10,
            DataType::Boolean => 11,
            DataType::String => 12,
            DataType::DateTime => 13,
        }
    }

    /// The type of a code, if this edge node knows it.
    pub fn from_code(code: u32) -> Option<DataType> {
        Some(match code {
            1 => DataType::Int8,
            2 => DataType::Int16,
            3 => DataType::Int32,
            4 => DataType::Int64,
            5 => DataType::UInt8,
            6 => DataType::UInt16,
            7 => DataType::UInt32,
            8 => DataType::UInt64,
            9 => DataType::Float,
            10 => DataType::Double,
            11 => DataType::Boolean,
            12 => DataType::String,
            13 => DataType::DateTime,
            _ => return None,
        })
    }

    /// The specification's name (as Tahu spells it).
    pub fn name(self) -> &'static str {
        match self {
            DataType::Int8 => "Int8",
            DataType::Int16 => "Int16",
            DataType::Int32 => "Int32",
            DataType::Int64 => "Int64",
            DataType::UInt8 => "UInt8",
            DataType::UInt16 => "UInt16",
            DataType::UInt32 => "UInt32",
            DataType::UInt64 => "UInt64",
            DataType::Float => "Float",
            DataType::Double => "Double",
            DataType::Boolean => "Boolean",
            DataType::String => "String",
            DataType::DateTime => "DateTime",
        }
    }
}

/// A metric value, typed by the metric's [`DataType`].
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Any integer type; the datatype says the width and signedness.
    Int(i128),
    /// Float or Double.
    Float(f64),
    /// Boolean.
    Bool(bool),
    /// String.
    Text(String),
}

/// Why a value does not fit a datatype.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// Wrong kind of value (text for a number, ...).
    #[error("a {got} value for a {want} metric")]
    Kind {
        /// The metric's type.
        want: &'static str,
        /// What the value was.
        got: &'static str,
    },
    /// An integer outside the type's range.
    #[error("{value} is out of range for {want}")]
    Range {
        /// The metric's type.
        want: &'static str,
        /// The value.
        value: i128,
    },
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::Int(_) => "integer",
            Value::Float(_) => "floating point",
            Value::Bool(_) => "boolean",
            Value::Text(_) => "text",
        }
    }

    /// Encodes `self` as a value of type `ty`. Integers must be in range; an integer is
    /// taken for a Float or Double metric, and a float with no fraction for an integer one.
    pub fn encode(&self, ty: DataType) -> Result<MetricValue, ValueError> {
        let kind = || ValueError::Kind {
            want: ty.name(),
            got: self.kind(),
        };
        let int = |v: i128, lo: i128, hi: i128| {
            if (lo..=hi).contains(&v) {
                Ok(v)
            } else {
                Err(ValueError::Range {
                    want: ty.name(),
                    value: v,
                })
            }
        };
        let as_int = || match self {
            Value::Int(v) => Ok(*v),
            Value::Float(f) if f.fract() == 0.0 && f.is_finite() => Ok(*f as i128),
            _ => Err(kind()),
        };
        Ok(match ty {
            DataType::Int8 => MetricValue::IntValue(int(as_int()?, -128, 127)? as i32 as u32),
            DataType::Int16 => MetricValue::IntValue(int(as_int()?, -32768, 32767)? as i32 as u32),
            DataType::Int32 => {
                MetricValue::IntValue(
                    int(as_int()?, i32::MIN.into(), i32::MAX.into())? as i32 as u32
                )
            }
            DataType::UInt8 => MetricValue::IntValue(int(as_int()?, 0, 255)? as u32),
            DataType::UInt16 => MetricValue::IntValue(int(as_int()?, 0, 65535)? as u32),
            DataType::UInt32 => MetricValue::LongValue(int(as_int()?, 0, u32::MAX.into())? as u64),
            DataType::Int64 => {
                MetricValue::LongValue(
                    int(as_int()?, i64::MIN.into(), i64::MAX.into())? as i64 as u64
                )
            }
            DataType::UInt64 | DataType::DateTime => {
                MetricValue::LongValue(int(as_int()?, 0, u64::MAX.into())? as u64)
            }
            DataType::Float | DataType::Double => {
                let f = match self {
                    Value::Float(f) => *f,
                    Value::Int(v) => *v as f64,
                    _ => return Err(kind()),
                };
                if ty == DataType::Float {
                    MetricValue::FloatValue(f as f32)
                } else {
                    MetricValue::DoubleValue(f)
                }
            }
            DataType::Boolean => match self {
                Value::Bool(b) => MetricValue::BooleanValue(*b),
                _ => return Err(kind()),
            },
            DataType::String => match self {
                Value::Text(s) => MetricValue::StringValue(s.clone()),
                _ => return Err(kind()),
            },
        })
    }

    /// Reads a metric value of type `ty` (a command's), undoing [`Value::encode`]. `None`
    /// when the field does not belong to the type.
    pub fn decode(ty: DataType, v: &MetricValue) -> Option<Value> {
        Some(match (ty, v) {
            (DataType::Int8, MetricValue::IntValue(x)) => Value::Int((*x as i32 as i8).into()),
            (DataType::Int16, MetricValue::IntValue(x)) => Value::Int((*x as i32 as i16).into()),
            (DataType::Int32, MetricValue::IntValue(x)) => Value::Int((*x as i32).into()),
            (DataType::UInt8 | DataType::UInt16, MetricValue::IntValue(x)) => {
                Value::Int((*x).into())
            }
            // Some hosts put a UInt32 in int_value; both are read.
            (DataType::UInt32, MetricValue::IntValue(x)) => Value::Int((*x).into()),
            (
                DataType::UInt32 | DataType::UInt64 | DataType::DateTime,
                MetricValue::LongValue(x),
            ) => Value::Int((*x).into()),
            (DataType::Int64, MetricValue::LongValue(x)) => Value::Int((*x as i64).into()),
            (DataType::Float, MetricValue::FloatValue(f)) => Value::Float((*f).into()),
            (DataType::Double, MetricValue::DoubleValue(f)) => Value::Float(*f),
            (DataType::Boolean, MetricValue::BooleanValue(b)) => Value::Bool(*b),
            (DataType::String, MetricValue::StringValue(s)) => Value::Text(s.clone()),
            _ => return None,
        })
    }
}

impl PropertyValue {
    /// A String property.
    pub fn text(s: &str) -> PropertyValue {
        PropertyValue {
            r#type: Some(DataType::String.code()),
            is_null: None,
            value: Some(PropertyValueKind::StringValue(s.to_string())),
        }
    }

    /// A Boolean property.
    pub fn boolean(b: bool) -> PropertyValue {
        PropertyValue {
            r#type: Some(DataType::Boolean.code()),
            is_null: None,
            value: Some(PropertyValueKind::BooleanValue(b)),
        }
    }

    /// A Double property.
    pub fn double(v: f64) -> PropertyValue {
        PropertyValue {
            r#type: Some(DataType::Double.code()),
            is_null: None,
            value: Some(PropertyValueKind::DoubleValue(v)),
        }
    }
}

impl Payload {
    /// The protobuf bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode_to_vec()
    }

    /// Parses protobuf bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Payload, prost::DecodeError> {
        Payload::decode(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_integers_travel_as_twos_complement_and_come_back() {
        let v = Value::Int(-2).encode(DataType::Int16).unwrap();
        assert_eq!(v, MetricValue::IntValue(0xFFFF_FFFE));
        assert_eq!(Value::decode(DataType::Int16, &v), Some(Value::Int(-2)));
        let v = Value::Int(-5).encode(DataType::Int64).unwrap();
        assert_eq!(v, MetricValue::LongValue(u64::MAX - 4));
        assert_eq!(Value::decode(DataType::Int64, &v), Some(Value::Int(-5)));
        let v = Value::Int(4_000_000_000).encode(DataType::UInt32).unwrap();
        assert_eq!(v, MetricValue::LongValue(4_000_000_000));
    }

    #[test]
    fn out_of_range_and_wrong_kinds_are_refused() {
        assert!(matches!(
            Value::Int(70000).encode(DataType::UInt16),
            Err(ValueError::Range { .. })
        ));
        assert!(matches!(
            Value::Int(-1).encode(DataType::UInt64),
            Err(ValueError::Range { .. })
        ));
        assert!(matches!(
            Value::Text("x".into()).encode(DataType::Double),
            Err(ValueError::Kind { .. })
        ));
        assert!(matches!(
            Value::Float(1.5).encode(DataType::Int32),
            Err(ValueError::Kind { .. })
        ));
        assert_eq!(
            Value::Float(3.0).encode(DataType::Int32),
            Ok(MetricValue::IntValue(3))
        );
    }

    #[test]
    fn a_payload_round_trips_through_protobuf() {
        let p = Payload {
            timestamp: Some(1_700_000_000_000),
            seq: Some(7),
            metrics: vec![Metric {
                name: Some("power".into()),
                alias: Some(3),
                datatype: Some(DataType::Float.code()),
                value: Some(MetricValue::FloatValue(21.5)),
                properties: Some(PropertySet {
                    keys: vec!["engUnit".into()],
                    values: vec![PropertyValue::text("W")],
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let bytes = p.to_bytes();
        assert_eq!(Payload::from_bytes(&bytes).unwrap(), p);
        assert!(Payload::from_bytes(&[0xFF, 0xFF]).is_err());
    }

    #[test]
    fn every_code_maps_back_to_its_type() {
        for code in 1..=13 {
            assert_eq!(DataType::from_code(code).unwrap().code(), code);
        }
        assert_eq!(DataType::from_code(16), None);
    }
}
