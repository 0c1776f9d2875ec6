//! One Sparkplug edge node's session state, without I/O: what its births say, the `seq` of
//! every message, which devices are born, and what commands mean. The bridge drives it
//! ([`crate::bridge`]): it hands the node what leaves the queue and publishes what comes
//! back.
//!
//! # Invariants
//! - Every connection has its own `bdSeq` ([`EdgeNode::will`]): its NDEATH (the will) and
//!   every NBIRTH of that connection carry the same value.
//! - [`EdgeNode::births`] starts the sequence: NBIRTH has `seq` 0, every later NBIRTH,
//!   DBIRTH, NDATA, DDATA and DDEATH of the session the next `seq` modulo 256. Nothing else
//!   takes a `seq`, and a message that could not be sent gives its `seq` back
//!   ([`EdgeNode::take_back`]), so the host sees no gap that is not a loss.
//! - No DDATA of a device goes out before that device's DBIRTH in the session, nor after
//!   its DDEATH until a new DBIRTH: [`EdgeNode::data`] puts the birth first when needed.
//! - A birth lists every metric of its device with name, alias, datatype and the last value
//!   this node sent (null if none yet); data messages carry the alias only when
//!   `aliases` is on, and always the datatype (Tahu's decoder needs it).

use std::collections::HashMap;

use super::payload::{DataType, Metric, Payload, PropertySet, PropertyValue, Value};
use super::topic::{CommandTopic, Topics};

/// The metric that asks for a rebirth (spec 6.4.4, NCMD).
pub const REBIRTH: &str = "Node Control/Rebirth";
/// The metric of the birth/death sequence number.
pub const BD_SEQ: &str = "bdSeq";

/// One metric of a device, as its birth describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricSpec {
    /// The metric's name (the tag name).
    pub name: String,
    /// Its Sparkplug type.
    pub datatype: DataType,
    /// Engineering unit (`engUnit` property), empty for none.
    pub unit: String,
    /// Local topic its readings arrive on, if any.
    pub topic: Option<String>,
    /// Local topic a write goes to (`<tag topic>/set`), if the metric is writable.
    pub write_topic: Option<String>,
    /// A write is published as the text itself (a serial line), not as a JSON value.
    pub write_raw: bool,
    /// Further properties for the birth (name, value).
    pub properties: Vec<(String, PropertyValue)>,
}

/// One Sparkplug device: a Modbus device, say.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceSpec {
    /// The device id in its topics.
    pub id: String,
    /// Local topic of its retained status (`{"state":"online"|"offline"..}`), if any.
    pub status_topic: Option<String>,
    /// Local topic of its batch readings (several metrics in one message), if any.
    pub batch: Option<Batch>,
    /// Its metrics.
    pub metrics: Vec<MetricSpec>,
}

/// Where a device publishes several metrics in one message, and in which shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// The local topic.
    pub topic: String,
    /// The payload's shape.
    pub shape: BatchShape,
}

/// The JSON shape of a batch (see [`super::reading`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchShape {
    /// `{"ts":..,"values":{name: value, ..}}` (a Modbus batch).
    Values,
    /// `{name: value, ..}` (a serial regex device's captures).
    Object,
    /// `{"ts":..,"value":{name: value, ..}}` (the same in the serial envelope).
    Envelope,
}

/// What a local topic carries for the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// One metric's reading.
    Metric(usize, usize),
    /// A batch of the device's metrics, in this shape.
    Batch(usize, BatchShape),
    /// The device's status.
    Status(usize),
}

/// A message for the cloud.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Full topic.
    pub topic: String,
    /// Protobuf payload.
    pub payload: Vec<u8>,
}

/// One metric's new value in a data message.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// Metric index in its device.
    pub metric: usize,
    /// The value; `None` when the reading failed (sent with `is_null`).
    pub value: Option<Value>,
    /// When it was read, ms since the epoch.
    pub ts: u64,
}

/// What a command asks.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// NCMD `Node Control/Rebirth` = true: publish every birth again.
    Rebirth,
    /// DCMD: write these values.
    Write(Vec<Write>),
}

/// One write a DCMD asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Write {
    /// The local topic it goes to.
    pub topic: String,
    /// The value.
    pub value: Value,
    /// Publish the text itself, not a JSON value ([`MetricSpec::write_raw`]).
    pub raw: bool,
}

/// Why a command was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// Not protobuf.
    #[error("payload is not a Sparkplug B payload: {0}")]
    Decode(String),
    /// A DCMD for a device this node does not have.
    #[error("no device {0:?} on this edge node")]
    UnknownDevice(String),
    /// A metric the device does not have (by name or alias).
    #[error("device {device:?} has no metric {metric}")]
    UnknownMetric {
        /// The device.
        device: String,
        /// Its name or alias as sent.
        metric: String,
    },
    /// A metric that cannot be written.
    #[error("metric {0:?} is not writable")]
    ReadOnly(String),
    /// No value, or one of another type.
    #[error("metric {metric:?}: {why}")]
    BadValue {
        /// The metric.
        metric: String,
        /// What is wrong with it.
        why: String,
    },
    /// An NCMD that asks nothing this node does.
    #[error("NCMD asks nothing this edge node does (only {REBIRTH:?} = true)")]
    Unsupported,
}

struct Device {
    spec: DeviceSpec,
    /// Alias of metric 0; the rest follow.
    alias_base: u64,
    last: Vec<Option<(Value, u64)>>,
    born: bool,
    /// Last known to answer (its status said so, or it sent a value); births leave out a
    /// device known to be offline.
    online: bool,
}

/// An edge node and its devices.
pub struct EdgeNode {
    topics: Topics,
    devices: Vec<Device>,
    by_id: HashMap<String, usize>,
    routes: HashMap<String, Route>,
    aliases: bool,
    bd_seq: u64,
    /// The `seq` the next message takes.
    seq: u8,
}

impl EdgeNode {
    /// The node `node` of group `group` with these devices. Aliases are numbered from 1 in
    /// device and metric order (0 is left to the node's own metrics).
    pub fn new(group: &str, node: &str, devices: Vec<DeviceSpec>, aliases: bool) -> EdgeNode {
        let mut routes = HashMap::new();
        let mut by_id = HashMap::new();
        let mut next_alias = 1;
        let devices = devices
            .into_iter()
            .enumerate()
            .map(|(d, spec)| {
                by_id.insert(spec.id.clone(), d);
                if let Some(t) = &spec.status_topic {
                    routes.insert(t.clone(), Route::Status(d));
                }
                if let Some(b) = &spec.batch {
                    routes.insert(b.topic.clone(), Route::Batch(d, b.shape));
                }
                for (m, metric) in spec.metrics.iter().enumerate() {
                    if let Some(t) = &metric.topic {
                        routes.insert(t.clone(), Route::Metric(d, m));
                    }
                }
                let alias_base = next_alias;
                next_alias += spec.metrics.len() as u64;
                Device {
                    last: vec![None; spec.metrics.len()],
                    spec,
                    alias_base,
                    born: false,
                    online: true,
                }
            })
            .collect();
        EdgeNode {
            topics: Topics::new(group, node),
            devices,
            by_id,
            routes,
            aliases,
            bd_seq: 0,
            seq: 0,
        }
    }

    /// The node's topics.
    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    /// What a local topic carries, if it is one of the devices'.
    pub fn route(&self, topic: &str) -> Option<Route> {
        self.routes.get(topic).copied()
    }

    /// The spec of device `d`.
    pub fn device(&self, d: usize) -> &DeviceSpec {
        &self.devices[d].spec
    }

    /// The `bdSeq` of the current connection.
    pub fn bd_seq(&self) -> u64 {
        self.bd_seq
    }

    /// Starts a connection with `bd_seq`: its will, the NDEATH. No device is born on it yet.
    pub fn will(&mut self, bd_seq: u64, now: u64) -> Message {
        self.bd_seq = bd_seq;
        for d in &mut self.devices {
            d.born = false;
        }
        self.death_certificate(now)
    }

    /// The NDEATH of the current connection (also sent by hand before an orderly goodbye).
    pub fn death_certificate(&self, now: u64) -> Message {
        let payload = Payload {
            timestamp: Some(now),
            metrics: vec![self.bd_seq_metric()],
            ..Default::default()
        };
        Message {
            topic: self.topics.ndeath(),
            payload: payload.to_bytes(),
        }
    }

    fn bd_seq_metric(&self) -> Metric {
        Metric {
            name: Some(BD_SEQ.into()),
            datatype: Some(DataType::Int64.code()),
            value: Value::Int(self.bd_seq.into()).encode(DataType::Int64).ok(),
            ..Default::default()
        }
    }

    fn take_seq(&mut self) -> u64 {
        let s = self.seq;
        self.seq = self.seq.wrapping_add(1);
        s.into()
    }

    /// Gives back the `seq` of the message made last, which could not be sent.
    pub fn take_back(&mut self) {
        self.seq = self.seq.wrapping_sub(1);
    }

    /// The NBIRTH and every DBIRTH, in that order, `seq` starting from 0: after each
    /// connect, and on a rebirth request.
    pub fn births(&mut self, now: u64) -> Vec<Message> {
        self.seq = 0;
        let mut rebirth = Metric {
            name: Some(REBIRTH.into()),
            datatype: Some(DataType::Boolean.code()),
            value: Value::Bool(false).encode(DataType::Boolean).ok(),
            ..Default::default()
        };
        rebirth.timestamp = Some(now);
        let seq = self.take_seq();
        let nbirth = sequenced(now, seq, vec![self.bd_seq_metric(), rebirth]);
        let mut out = vec![Message {
            topic: self.topics.nbirth(),
            payload: nbirth.to_bytes(),
        }];
        for d in 0..self.devices.len() {
            if self.devices[d].online {
                out.push(self.device_birth(d, now));
            } else {
                self.devices[d].born = false;
            }
        }
        out
    }

    /// The DBIRTH of device `d`; it is born from now on.
    pub fn device_birth(&mut self, d: usize, now: u64) -> Message {
        let seq = self.take_seq();
        let dev = &mut self.devices[d];
        dev.born = true;
        let metrics = dev
            .spec
            .metrics
            .iter()
            .enumerate()
            .map(|(m, spec)| {
                let mut metric = Metric {
                    name: Some(spec.name.clone()),
                    alias: Some(dev.alias_base + m as u64),
                    datatype: Some(spec.datatype.code()),
                    ..Default::default()
                };
                match &dev.last[m] {
                    Some((v, ts)) => {
                        metric.value = v.encode(spec.datatype).ok();
                        metric.timestamp = Some(*ts);
                    }
                    None => {
                        metric.is_null = Some(true);
                        metric.timestamp = Some(now);
                    }
                }
                metric.properties = Some(properties(spec));
                metric
            })
            .collect();
        let payload = sequenced(now, seq, metrics);
        Message {
            topic: self.topics.dbirth(&dev.spec.id),
            payload: payload.to_bytes(),
        }
    }

    /// A DDATA of device `d` with `updates` (`historical`: from a replayed backlog). Its
    /// DBIRTH comes first in the returned list when the device is not born. Values that do
    /// not fit their metric's type go as null. Nothing at all when the device is offline
    /// and no update has a value: its DDEATH already told the host.
    pub fn data(
        &mut self,
        d: usize,
        updates: &[Update],
        historical: bool,
        now: u64,
    ) -> Vec<Message> {
        let mut out = Vec::with_capacity(2);
        if !self.devices[d].online {
            if updates.iter().all(|u| u.value.is_none()) {
                return out;
            }
            self.devices[d].online = true;
        }
        if !self.devices[d].born {
            out.push(self.device_birth(d, now));
        }
        let seq = self.take_seq();
        let aliases = self.aliases;
        let dev = &mut self.devices[d];
        let metrics = updates
            .iter()
            .filter(|u| u.metric < dev.spec.metrics.len())
            .map(|u| {
                let spec = &dev.spec.metrics[u.metric];
                let value = u.value.as_ref().and_then(|v| v.encode(spec.datatype).ok());
                let mut metric = Metric {
                    alias: Some(dev.alias_base + u.metric as u64),
                    name: (!aliases).then(|| spec.name.clone()),
                    datatype: Some(spec.datatype.code()),
                    timestamp: Some(u.ts),
                    is_historical: historical.then_some(true),
                    ..Default::default()
                };
                match value {
                    Some(v) => {
                        metric.value = Some(v);
                        if let Some(v) = &u.value {
                            dev.last[u.metric] = Some((v.clone(), u.ts));
                        }
                    }
                    None => metric.is_null = Some(true),
                }
                metric
            })
            .collect();
        let payload = sequenced(now, seq, metrics);
        out.push(Message {
            topic: self.topics.ddata(&dev.spec.id),
            payload: payload.to_bytes(),
        });
        out
    }

    /// Device `d` answers again: its DBIRTH, or `None` if it is born already.
    pub fn device_online(&mut self, d: usize, now: u64) -> Option<Message> {
        self.devices[d].online = true;
        (!self.devices[d].born).then(|| self.device_birth(d, now))
    }

    /// Device `d` went offline: its DDEATH, or `None` if it is not born (nothing to
    /// retract). It is left out of births until it answers again.
    pub fn device_death(&mut self, d: usize, now: u64) -> Option<Message> {
        self.devices[d].online = false;
        if !self.devices[d].born {
            return None;
        }
        self.devices[d].born = false;
        let payload = sequenced(now, self.take_seq(), Vec::new());
        Some(Message {
            topic: self.topics.ddeath(&self.devices[d].spec.id),
            payload: payload.to_bytes(),
        })
    }

    /// Reads an NCMD or DCMD on `topic`; `None` if the topic is not one of this node's
    /// commands.
    pub fn command(&self, topic: &str, bytes: &[u8]) -> Option<Result<Command, CommandError>> {
        let which = self.topics.command(topic)?;
        let payload = match Payload::from_bytes(bytes) {
            Ok(p) => p,
            Err(e) => return Some(Err(CommandError::Decode(e.to_string()))),
        };
        Some(match which {
            CommandTopic::Node => {
                let rebirth = payload.metrics.iter().any(|m| {
                    m.name.as_deref() == Some(REBIRTH)
                        && m.value
                            .as_ref()
                            .and_then(|v| Value::decode(DataType::Boolean, v))
                            == Some(Value::Bool(true))
                });
                if rebirth {
                    Ok(Command::Rebirth)
                } else {
                    Err(CommandError::Unsupported)
                }
            }
            CommandTopic::Device(id) => self.device_command(id, &payload),
        })
    }

    fn device_command(&self, id: &str, payload: &Payload) -> Result<Command, CommandError> {
        let d = *self
            .by_id
            .get(id)
            .ok_or_else(|| CommandError::UnknownDevice(id.to_string()))?;
        let dev = &self.devices[d];
        let mut writes = Vec::new();
        for m in &payload.metrics {
            let index = match (&m.name, m.alias) {
                (Some(name), _) => dev.spec.metrics.iter().position(|s| &s.name == name),
                (None, Some(alias)) => alias
                    .checked_sub(dev.alias_base)
                    .map(|i| i as usize)
                    .filter(|&i| i < dev.spec.metrics.len()),
                (None, None) => None,
            };
            let spec =
                index
                    .map(|i| &dev.spec.metrics[i])
                    .ok_or_else(|| CommandError::UnknownMetric {
                        device: id.to_string(),
                        metric: m
                            .name
                            .clone()
                            .unwrap_or_else(|| format!("alias {}", m.alias.unwrap_or(0))),
                    })?;
            let topic = spec
                .write_topic
                .clone()
                .ok_or_else(|| CommandError::ReadOnly(spec.name.clone()))?;
            let bad = |why: &str| CommandError::BadValue {
                metric: spec.name.clone(),
                why: why.to_string(),
            };
            // The host may name another (compatible) type; the value is read by its own
            // field, then checked against the metric's type.
            let sent_type = m
                .datatype
                .and_then(DataType::from_code)
                .unwrap_or(spec.datatype);
            let v = m.value.as_ref().ok_or_else(|| bad("no value"))?;
            let value = Value::decode(sent_type, v)
                .ok_or_else(|| bad("the value field does not match its datatype"))?;
            value
                .encode(spec.datatype)
                .map_err(|e| bad(&e.to_string()))?;
            writes.push(Write {
                topic,
                value,
                raw: spec.write_raw,
            });
        }
        if writes.is_empty() {
            return Err(CommandError::BadValue {
                metric: String::new(),
                why: "the DCMD carries no metric".into(),
            });
        }
        Ok(Command::Write(writes))
    }
}

/// A payload of the session's sequence: made `now`, numbered `seq`.
fn sequenced(now: u64, seq: u64, metrics: Vec<Metric>) -> Payload {
    Payload {
        timestamp: Some(now),
        seq: Some(seq),
        metrics,
        ..Default::default()
    }
}

fn properties(spec: &MetricSpec) -> PropertySet {
    let mut set = PropertySet::default();
    if !spec.unit.is_empty() {
        set.keys.push("engUnit".into());
        set.values.push(PropertyValue::text(&spec.unit));
    }
    set.keys.push("writable".into());
    set.values
        .push(PropertyValue::boolean(spec.write_topic.is_some()));
    for (k, v) in &spec.properties {
        set.keys.push(k.clone());
        set.values.push(v.clone());
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sparkplug::payload::MetricValue;

    fn node() -> EdgeNode {
        let metric = |name: &str, datatype, writable: bool| MetricSpec {
            name: name.into(),
            datatype,
            unit: if name == "power" {
                "W".into()
            } else {
                String::new()
            },
            topic: Some(format!("field/meter/{name}")),
            write_topic: writable.then(|| format!("cmd/field/meter/{name}/set")),
            write_raw: false,
            properties: vec![],
        };
        EdgeNode::new(
            "plant",
            "gw1",
            vec![DeviceSpec {
                id: "meter".into(),
                status_topic: Some("field/meter/status".into()),
                batch: None,
                metrics: vec![
                    metric("power", DataType::Float, false),
                    metric("setpoint", DataType::Int16, true),
                ],
            }],
            true,
        )
    }

    fn decode(m: &Message) -> Payload {
        Payload::from_bytes(&m.payload).unwrap()
    }

    #[test]
    fn births_start_the_sequence_and_carry_the_connections_bd_seq() {
        let mut n = node();
        let will = n.will(7, 1000);
        assert_eq!(will.topic, "spBv1.0/plant/NDEATH/gw1");
        let w = decode(&will);
        assert_eq!(w.seq, None);
        assert_eq!(w.metrics[0].name.as_deref(), Some(BD_SEQ));
        assert_eq!(w.metrics[0].value, Some(MetricValue::LongValue(7)));
        let b = n.births(1001);
        assert_eq!(b.len(), 2);
        let nb = decode(&b[0]);
        assert_eq!(nb.seq, Some(0));
        assert_eq!(nb.metrics[0].value, Some(MetricValue::LongValue(7)));
        assert_eq!(nb.metrics[1].name.as_deref(), Some(REBIRTH));
        let db = decode(&b[1]);
        assert_eq!(b[1].topic, "spBv1.0/plant/DBIRTH/gw1/meter");
        assert_eq!(db.seq, Some(1));
        assert_eq!(db.metrics.len(), 2);
        assert_eq!(db.metrics[0].is_null, Some(true));
        assert_eq!(db.metrics[0].datatype, Some(DataType::Float.code()));
        let props = db.metrics[0].properties.as_ref().unwrap();
        assert_eq!(props.keys, ["engUnit", "writable"]);
    }

    #[test]
    fn data_before_a_birth_brings_the_birth_and_deaths_need_a_new_one() {
        let mut n = node();
        n.will(0, 0);
        let up = |v: f64| Update {
            metric: 0,
            value: Some(Value::Float(v)),
            ts: 5,
        };
        let first = n.data(0, &[up(1.0)], false, 10);
        assert_eq!(first.len(), 2, "DBIRTH first");
        assert!(first[0].topic.contains("/DBIRTH/"));
        assert_eq!(decode(&first[1]).seq, Some(1));
        let d = decode(&first[1]);
        assert_eq!(d.metrics[0].alias, Some(1));
        assert_eq!(d.metrics[0].name, None);
        let death = n.device_death(0, 11).unwrap();
        assert_eq!(decode(&death).seq, Some(2));
        assert!(n.device_death(0, 12).is_none());
        let again = n.data(0, &[up(2.0)], true, 13);
        assert_eq!(again.len(), 2);
        let birth = decode(&again[0]);
        assert_eq!(birth.seq, Some(3));
        assert_eq!(birth.metrics[0].value, Some(MetricValue::FloatValue(1.0)));
        assert_eq!(decode(&again[1]).metrics[0].is_historical, Some(true));
    }

    #[test]
    fn an_offline_device_stays_out_of_births_until_it_answers() {
        let mut n = node();
        n.will(1, 0);
        n.births(0);
        assert!(n.device_death(0, 1).is_some());
        assert_eq!(n.births(2).len(), 1, "NBIRTH only");
        let null = Update {
            metric: 0,
            value: None,
            ts: 3,
        };
        assert!(n.data(0, &[null], false, 3).is_empty());
        assert!(n.device_online(0, 4).is_some());
        assert!(n.device_online(0, 5).is_none(), "born already");
        n.device_death(0, 6);
        let v = Update {
            metric: 0,
            value: Some(Value::Float(1.0)),
            ts: 7,
        };
        let m = n.data(0, &[v], false, 7);
        assert_eq!(m.len(), 2, "a value is an answer: DBIRTH, DDATA");
    }

    #[test]
    fn seq_wraps_after_255_and_a_message_not_sent_gives_its_seq_back() {
        let mut n = node();
        n.will(0, 0);
        n.births(0);
        let mut seqs = vec![];
        for i in 0..300 {
            let m = n.data(
                0,
                &[Update {
                    metric: 0,
                    value: None,
                    ts: i,
                }],
                false,
                i,
            );
            seqs.push(decode(&m[0]).seq.unwrap());
            if i == 10 {
                n.take_back();
                seqs.pop();
            }
        }
        for w in seqs.windows(2) {
            assert_eq!((w[0] + 1) % 256, w[1]);
        }
        assert_eq!(seqs[0], 2);
    }

    #[test]
    fn commands_ask_for_a_rebirth_or_a_write_to_a_writable_metric() {
        let n = node();
        let ncmd = Payload {
            metrics: vec![Metric {
                name: Some(REBIRTH.into()),
                datatype: Some(11),
                value: Some(MetricValue::BooleanValue(true)),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            n.command("spBv1.0/plant/NCMD/gw1", &ncmd.to_bytes()),
            Some(Ok(Command::Rebirth))
        );
        let dcmd = |name: &str, v: MetricValue| Payload {
            metrics: vec![Metric {
                name: Some(name.into()),
                datatype: Some(DataType::Int16.code()),
                value: Some(v),
                ..Default::default()
            }],
            ..Default::default()
        };
        let t = "spBv1.0/plant/DCMD/gw1/meter";
        assert_eq!(
            n.command(
                t,
                &dcmd("setpoint", MetricValue::IntValue((-3i32) as u32)).to_bytes()
            ),
            Some(Ok(Command::Write(vec![Write {
                topic: "cmd/field/meter/setpoint/set".into(),
                value: Value::Int(-3),
                raw: false,
            }])))
        );
        assert!(matches!(
            n.command(t, &dcmd("power", MetricValue::IntValue(1)).to_bytes()),
            Some(Err(CommandError::ReadOnly(_)))
        ));
        assert!(matches!(
            n.command(t, &dcmd("nope", MetricValue::IntValue(1)).to_bytes()),
            Some(Err(CommandError::UnknownMetric { .. }))
        ));
        assert!(matches!(
            n.command(
                "spBv1.0/plant/DCMD/gw1/other",
                &dcmd("x", MetricValue::IntValue(1)).to_bytes()
            ),
            Some(Err(CommandError::UnknownDevice(_)))
        ));
        assert!(matches!(
            n.command(t, b"\xff\xff"),
            Some(Err(CommandError::Decode(_)))
        ));
        assert_eq!(n.command("field/meter/power", b""), None);
    }
}
