//! Serial-line devices as Sparkplug devices: the [`DeviceSpec`] of every `[[serial]]`
//! device. Pure; docs/sparkplug.md has the same rules.
//!
//! - `raw`, `hex` and `json` devices have one String metric, `data`: the frame as
//!   published (the text, the hex, the JSON text; the envelope's `ts` is its timestamp);
//! - `regex` devices have one metric per named capture, each a String unless
//!   `decode.metric_types` says `double`, `int64` or `boolean`; one frame is one DDATA with
//!   every capture;
//! - a device with a write topic has a writable String metric, `write`: a DCMD's text is
//!   written to the port as it is (the write line ending appended, as for any write).

use super::config::{DecodeMode, MetricType, SerialDeviceConfig};
use crate::sparkplug::payload::DataType;
use crate::sparkplug::{Batch, BatchShape, DeviceSpec, MetricSpec};

fn metric(name: &str, datatype: DataType) -> MetricSpec {
    MetricSpec {
        name: name.to_string(),
        datatype,
        unit: String::new(),
        topic: None,
        write_topic: None,
        write_raw: false,
        properties: Vec::new(),
    }
}

/// The Sparkplug devices of these serial devices (one each, named as in the config).
pub fn devices(devices: &[SerialDeviceConfig], gateway_id: &str) -> Vec<DeviceSpec> {
    devices
        .iter()
        .map(|d| {
            let data = d.expand(&d.topic, gateway_id);
            let mut metrics = Vec::new();
            let mut batch = None;
            if d.decode.mode == DecodeMode::Regex {
                // The pattern compiled in validation; a config that did not is never run.
                let names: Vec<String> = regex::Regex::new(&d.decode.pattern)
                    .map(|re| re.capture_names().flatten().map(String::from).collect())
                    .unwrap_or_default();
                for n in names {
                    let ty = match d.decode.metric_types.get(&n) {
                        Some(MetricType::Double) => DataType::Double,
                        Some(MetricType::Int64) => DataType::Int64,
                        Some(MetricType::Boolean) => DataType::Boolean,
                        Some(MetricType::String) | None => DataType::String,
                    };
                    metrics.push(metric(&n, ty));
                }
                batch = Some(Batch {
                    topic: data,
                    shape: if d.envelope {
                        BatchShape::Envelope
                    } else {
                        BatchShape::Object
                    },
                });
            } else {
                let mut m = metric("data", DataType::String);
                m.topic = Some(data);
                metrics.push(m);
            }
            if !d.write_topic.is_empty() {
                let mut w = metric("write", DataType::String);
                w.write_topic = Some(d.expand(&d.write_topic, gateway_id));
                w.write_raw = true;
                metrics.push(w);
            }
            DeviceSpec {
                id: d.name.clone(),
                status_topic: Some(d.expand(&d.status_topic, gateway_id)),
                batch,
                metrics,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(mode: DecodeMode, pattern: &str) -> SerialDeviceConfig {
        let mut d = SerialDeviceConfig {
            name: "scale".into(),
            ..Default::default()
        };
        d.decode.mode = mode;
        d.decode.pattern = pattern.into();
        d
    }

    #[test]
    fn a_line_device_has_a_data_and_a_write_metric() {
        let spec = &devices(&[device(DecodeMode::Raw, "")], "gw")[0];
        let names: Vec<(&str, &str)> = spec
            .metrics
            .iter()
            .map(|m| (m.name.as_str(), m.datatype.name()))
            .collect();
        assert_eq!(names, [("data", "String"), ("write", "String")]);
        assert_eq!(spec.metrics[0].topic.as_deref(), Some("field/scale/data"));
        assert_eq!(
            spec.metrics[1].write_topic.as_deref(),
            Some("field/scale/write")
        );
        assert!(spec.metrics[1].write_raw);
        assert_eq!(spec.status_topic.as_deref(), Some("field/scale/status"));
        assert!(spec.batch.is_none());
    }

    #[test]
    fn regex_captures_are_metrics_typed_by_metric_types() {
        let mut d = device(DecodeMode::Regex, r"^(?P<weight>[-\d.]+) (?P<unit>\w+)$");
        d.decode
            .metric_types
            .insert("weight".into(), MetricType::Double);
        d.write_topic = String::new();
        d.envelope = true;
        let spec = &devices(&[d], "gw")[0];
        let names: Vec<(&str, &str)> = spec
            .metrics
            .iter()
            .map(|m| (m.name.as_str(), m.datatype.name()))
            .collect();
        assert_eq!(names, [("weight", "Double"), ("unit", "String")]);
        let b = spec.batch.as_ref().unwrap();
        assert_eq!(
            (b.topic.as_str(), b.shape),
            ("field/scale/data", BatchShape::Envelope)
        );
    }
}
