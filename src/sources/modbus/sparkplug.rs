//! Modbus devices as Sparkplug devices: which Sparkplug datatype each tag type becomes, and
//! the [`DeviceSpec`] of every `[[modbus]]` device (its metrics, where its readings and its
//! status arrive, where a write goes). Pure; docs/sparkplug.md prints the same table.
//!
//! | tag                                   | Sparkplug |
//! |---------------------------------------|-----------|
//! | `bool` (coil, discrete input), `bit`  | Boolean   |
//! | `u16` / `i16`                         | UInt16 / Int16 |
//! | `u32` / `i32`                         | UInt32 / Int32 |
//! | `u64` / `i64`                         | UInt64 / Int64 |
//! | `f32` / `f64`                         | Float / Double |
//! | `string`                              | String    |
//! | any integer with `scale` or `offset`  | Double (the engineering value) |
//! | `count` > 1 (several coils)           | String (the JSON array, e.g. `[true,false]`) |

use super::codec::DataType as TagType;
use super::config::{ModbusDeviceConfig, TagConfig};
use crate::sparkplug::payload::{DataType, PropertyValue};
use crate::sparkplug::{Batch, BatchShape, DeviceSpec, MetricSpec};

/// The Sparkplug datatype of a tag's published value.
pub fn datatype(tag: &TagConfig) -> DataType {
    if tag.count.unwrap_or(1) > 1 {
        return DataType::String;
    }
    let scaled = tag.scale != 1.0 || tag.offset != 0.0;
    match tag.data_type() {
        TagType::Bool | TagType::Bit => DataType::Boolean,
        TagType::F32 => DataType::Float,
        TagType::F64 => DataType::Double,
        TagType::String => DataType::String,
        _ if scaled => DataType::Double,
        TagType::U16 => DataType::UInt16,
        TagType::I16 => DataType::Int16,
        TagType::U32 => DataType::UInt32,
        TagType::I32 => DataType::Int32,
        TagType::U64 => DataType::UInt64,
        TagType::I64 => DataType::Int64,
    }
}

/// The Sparkplug devices of these Modbus devices (one each, named as in the config).
pub fn devices(devices: &[ModbusDeviceConfig], gateway_id: &str) -> Vec<DeviceSpec> {
    devices
        .iter()
        .map(|d| {
            let batch = d.publish == super::config::PublishMode::Batch;
            DeviceSpec {
                id: d.name.clone(),
                status_topic: Some(d.status_topic(gateway_id)),
                batch: batch.then(|| Batch {
                    topic: d.batch_topic(gateway_id),
                    shape: BatchShape::Values,
                }),
                metrics: d
                    .tags
                    .iter()
                    .map(|t| {
                        let topic = d.tag_topic(gateway_id, &t.name);
                        let mut properties = vec![(
                            "modbusRegister".to_string(),
                            PropertyValue::text(&format!("{}:{}", t.kind.as_str(), t.address)),
                        )];
                        if t.scale != 1.0 {
                            properties.push(("engScale".into(), PropertyValue::double(t.scale)));
                        }
                        if t.offset != 0.0 {
                            properties.push(("engOffset".into(), PropertyValue::double(t.offset)));
                        }
                        MetricSpec {
                            name: t.name.clone(),
                            datatype: datatype(t),
                            unit: t.unit.clone(),
                            write_topic: (t.writable && t.kind.is_writable())
                                .then(|| format!("{topic}/set")),
                            write_raw: false,
                            topic: (!batch).then_some(topic),
                            properties,
                        }
                    })
                    .collect(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::modbus::codec::Value as TagValue;
    use crate::sources::modbus::config::PayloadFormat;
    use crate::sources::modbus::publish::{self, Quality};
    use crate::sparkplug::payload::Value;
    use crate::sparkplug::reading;

    fn tags(toml_text: &str) -> Vec<ModbusDeviceConfig> {
        #[derive(serde::Deserialize)]
        struct F {
            modbus: Vec<ModbusDeviceConfig>,
        }
        toml::from_str::<F>(toml_text).expect("config").modbus
    }

    #[test]
    fn every_tag_type_has_its_sparkplug_type() {
        let d = tags(
            r#"
            [[modbus]]
            name = "m"
            host = "127.0.0.1:502"
            tags = [
              { name = "c", kind = "coil", address = 1, writable = true },
              { name = "b", kind = "holding", address = 1, type = "bit", bit = 3 },
              { name = "u16", kind = "holding", address = 2 },
              { name = "i16", kind = "holding", address = 3, type = "i16" },
              { name = "u32", kind = "holding", address = 4, type = "u32" },
              { name = "i32", kind = "input", address = 6, type = "i32" },
              { name = "u64", kind = "input", address = 8, type = "u64" },
              { name = "i64", kind = "input", address = 12, type = "i64" },
              { name = "f32", kind = "input", address = 16, type = "f32", unit = "degC" },
              { name = "f64", kind = "input", address = 18, type = "f64" },
              { name = "s", kind = "input", address = 22, type = "string", length = 8 },
              { name = "scaled", kind = "input", address = 30, scale = 0.1 },
              { name = "coils", kind = "coil", address = 40, count = 4 },
            ]
            "#,
        );
        let spec = devices(&d, "gw");
        let types: Vec<&str> = spec[0].metrics.iter().map(|m| m.datatype.name()).collect();
        assert_eq!(
            types,
            [
                "Boolean", "Boolean", "UInt16", "Int16", "UInt32", "Int32", "UInt64", "Int64",
                "Float", "Double", "String", "Double", "String"
            ]
        );
        let m = &spec[0].metrics;
        assert_eq!(m[0].write_topic.as_deref(), Some("field/m/c/set"));
        assert_eq!(m[2].write_topic, None, "not writable");
        assert_eq!(m[5].write_topic, None, "input registers cannot be written");
        assert_eq!(m[8].unit, "degC");
        assert_eq!(m[0].topic.as_deref(), Some("field/m/c"));
        assert_eq!(spec[0].status_topic.as_deref(), Some("field/m/status"));
    }

    /// What the Modbus source publishes reads back as the value of its metric's type.
    #[test]
    fn published_readings_read_back_as_their_metric_type() {
        let cases = [
            (TagValue::I64(-7), DataType::Int16, Value::Int(-7)),
            (
                TagValue::U64(4_000_000_000),
                DataType::UInt32,
                Value::Int(4_000_000_000),
            ),
            (TagValue::F64(21.5), DataType::Float, Value::Float(21.5)),
            (TagValue::Bool(true), DataType::Boolean, Value::Bool(true)),
            (
                TagValue::Str("ok".into()),
                DataType::String,
                Value::Text("ok".into()),
            ),
            (
                TagValue::Bools(vec![true, false]),
                DataType::String,
                Value::Text("[true,false]".into()),
            ),
        ];
        let published = |format, v: &TagValue| {
            publish::reading(format, Some(v), Quality::Good, None, "", 42).unwrap()
        };
        for (v, ty, want) in cases {
            let r = reading::tag(&published(PayloadFormat::Json, &v), ty).unwrap();
            assert_eq!(r.value, Some(want.clone()), "{v:?}");
            assert_eq!(r.ts, Some(42));
            let raw = reading::tag(&published(PayloadFormat::Raw, &v), ty).unwrap();
            assert_eq!(raw.value, Some(want), "raw {v:?}");
        }
    }
}
