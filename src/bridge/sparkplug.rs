//! The bridge as a Sparkplug B edge node (`[sparkplug] enabled = true`): what each queued
//! record becomes on the wire, the births of every session, the primary host's STATE, and
//! the commands from the host. The session rules live in [`crate::sparkplug::node`]; this is
//! their driver for the pump in [`super::Bridge`].
//!
//! # Invariants
//! - The queue is unchanged by Sparkplug: a record is turned into Sparkplug when it is sent,
//!   and one record is one QoS 1 PUBLISH (its PUBACK removes it) or none (it is acknowledged
//!   to the store at once: a status the births already told, a dead device's failed reading).
//!   Births the session adds of its own (after CONNACK, before a device's first DDATA, on a
//!   rebirth request) go at QoS 0, as the specification asks, and carry no record.
//! - Every accepted connection has a new `bdSeq` (kept in `<data_dir>/sparkplug-bdseq`, so
//!   a restart continues the count): its NDEATH is the connection's will, its NBIRTH says
//!   the same value. Attempts that got no CONNACK do not count.
//! - With a primary host, nothing but the births waits for its STATE to say online: until
//!   then the pump sends nothing and the queue keeps everything; STATE offline ends the
//!   session (NDEATH first), and the next one waits again.
//! - A record that is no device's, or that cannot be read back as a reading, goes up as
//!   plain MQTT on its cloud topic, exactly as without Sparkplug: nothing is lost for not
//!   fitting the model.

use std::path::PathBuf;

use bytes::Bytes;
use serde_json::Value as Json;
use tracing::warn;

use crate::sparkplug::payload::Value;
use crate::sparkplug::{
    reading, topic, Command, EdgeNode, Message, Route, SparkplugConfig, Update,
};
use crate::store::Record;

/// What a queued record becomes.
#[derive(Debug, PartialEq)]
pub enum Encoded {
    /// Not a device's: the record goes up as it is.
    Plain,
    /// QoS 0 births to send first, then the message that carries the record (`None`:
    /// nothing carries it, the record is done).
    Sparkplug(Vec<Message>, Option<Message>),
}

/// What a message from the cloud asks of the pump.
#[derive(Debug, PartialEq)]
pub enum Heard {
    /// Not a Sparkplug topic of this node: the downlink's.
    NotOurs,
    /// Handled; nothing to send.
    Nothing,
    /// Publish these births (QoS 0) now.
    Births(Vec<Message>),
    /// Publish these on the local broker (DCMD writes: `<tag topic>/set`, a JSON value).
    Local(Vec<(String, Vec<u8>)>),
    /// The primary host went offline: end the session.
    HostOffline,
}

/// The edge node of one bridge, across its sessions.
pub struct Uplink {
    node: EdgeNode,
    state_topic: Option<String>,
    bd_seq_file: PathBuf,
    next_bd_seq: u64,
    /// The session waits for the primary host's STATE online.
    holding: bool,
}

impl Uplink {
    /// The edge node of `[sparkplug]` over these devices; the `bdSeq` count lives in
    /// `data_dir`.
    pub fn new(
        cfg: &SparkplugConfig,
        gateway_id: &str,
        devices: Vec<crate::sparkplug::DeviceSpec>,
        data_dir: &std::path::Path,
    ) -> Uplink {
        let bd_seq_file = data_dir.join("sparkplug-bdseq");
        let next_bd_seq = std::fs::read_to_string(&bd_seq_file)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(|n| n % 256)
            .unwrap_or(0);
        Uplink {
            node: EdgeNode::new(
                &cfg.group_id,
                cfg.edge_node(gateway_id),
                devices,
                cfg.aliases,
            ),
            state_topic: (!cfg.primary_host_id.is_empty())
                .then(|| topic::state(&cfg.primary_host_id)),
            bd_seq_file,
            next_bd_seq,
            holding: false,
        }
    }

    /// A new connection attempt: its will, the NDEATH with the next `bdSeq`. The count
    /// moves on only once a broker accepted the connection ([`Uplink::connected`]): an
    /// attempt that never got a CONNACK registered no will, and no host saw its `bdSeq`.
    pub fn connecting(&mut self, now: u64) -> Message {
        self.holding = self.state_topic.is_some();
        self.node.will(self.next_bd_seq, now)
    }

    fn count_connection(&mut self) {
        self.next_bd_seq = (self.node.bd_seq() + 1) % 256;
        let tmp = self.bd_seq_file.with_extension("tmp");
        let saved = std::fs::write(&tmp, format!("{}\n", self.next_bd_seq))
            .and_then(|_| std::fs::rename(&tmp, &self.bd_seq_file));
        if let Err(e) = saved {
            warn!(error = %e, file = %self.bd_seq_file.display(),
                "could not save the Sparkplug bdSeq; after a restart the count starts again");
        }
    }

    /// The filters the session subscribes to besides the downlink's.
    pub fn filters(&self) -> Vec<String> {
        let t = self.node.topics();
        let mut f = vec![t.ncmd(), t.dcmd_filter()];
        f.extend(self.state_topic.clone());
        f
    }

    /// The connection is accepted (CONNACK): the `bdSeq` is used, and the births to send
    /// now (none while the primary host is awaited).
    pub fn connected(&mut self, now: u64) -> Vec<Message> {
        self.count_connection();
        if self.holding {
            return Vec::new();
        }
        self.node.births(now)
    }

    /// The session may not send records (the primary host is not online).
    pub fn holding(&self) -> bool {
        self.holding
    }

    /// The NDEATH of the current connection, for an orderly goodbye.
    pub fn goodbye(&self, now: u64) -> Message {
        self.node.death_certificate(now)
    }

    /// The message that was made last could not be sent: its `seq` is given back.
    pub fn not_sent(&mut self) {
        self.node.take_back();
    }

    /// What record `rec` becomes (`historical`: replayed backlog).
    pub fn encode(&mut self, rec: &Record, historical: bool, now: u64) -> Encoded {
        let Some(route) = self.node.route(&rec.topic) else {
            return Encoded::Plain;
        };
        match route {
            Route::Status(d) => match reading::status(&rec.payload) {
                Some((true, _)) => Encoded::Sparkplug(Vec::new(), self.node.device_online(d, now)),
                Some((false, _)) => Encoded::Sparkplug(Vec::new(), self.node.device_death(d, now)),
                None => Encoded::Plain,
            },
            Route::Metric(d, m) => {
                let ty = self.node.device(d).metrics[m].datatype;
                let Some(r) = reading::tag(&rec.payload, ty) else {
                    return Encoded::Plain;
                };
                let update = Update {
                    metric: m,
                    value: r.value,
                    ts: r.ts.unwrap_or(rec.ts_ms),
                };
                self.data(d, &[update], historical, now)
            }
            Route::Batch(d) => {
                let Some((ts, values)) = reading::batch(&rec.payload) else {
                    return Encoded::Plain;
                };
                let spec = self.node.device(d);
                let updates: Vec<Update> = values
                    .iter()
                    .filter_map(|(name, v)| {
                        let m = spec.metrics.iter().position(|s| &s.name == name)?;
                        Some(Update {
                            metric: m,
                            value: reading::value_of(v, spec.metrics[m].datatype),
                            ts,
                        })
                    })
                    .collect();
                self.data(d, &updates, historical, now)
            }
        }
    }

    fn data(&mut self, d: usize, updates: &[Update], historical: bool, now: u64) -> Encoded {
        let mut msgs = self.node.data(d, updates, historical, now);
        let last = msgs.pop();
        Encoded::Sparkplug(msgs, last)
    }

    /// What a message from the cloud on `topic` asks.
    pub fn heard(&mut self, topic: &str, payload: &Bytes, now: u64) -> Heard {
        if self.state_topic.as_deref() == Some(topic) {
            return self.host_state(payload, now);
        }
        match self.node.command(topic, payload) {
            None => Heard::NotOurs,
            Some(Ok(Command::Rebirth)) if self.holding => Heard::Nothing,
            Some(Ok(Command::Rebirth)) => Heard::Births(self.node.births(now)),
            Some(Ok(Command::Write(writes))) => Heard::Local(
                writes
                    .into_iter()
                    .map(|(t, v)| (t, json_of(&v).to_string().into_bytes()))
                    .collect(),
            ),
            Some(Err(e)) => {
                warn!(topic, error = %e, "Sparkplug command refused");
                Heard::Nothing
            }
        }
    }

    fn host_state(&mut self, payload: &[u8], now: u64) -> Heard {
        let online = serde_json::from_slice::<Json>(payload)
            .ok()
            .and_then(|j| j.get("online").and_then(Json::as_bool));
        match (online, self.holding) {
            (Some(true), true) => {
                self.holding = false;
                Heard::Births(self.node.births(now))
            }
            (Some(false), false) => Heard::HostOffline,
            (None, _) => {
                warn!(topic = ?self.state_topic, "primary host STATE is not {{\"online\":..}}; ignored");
                Heard::Nothing
            }
            _ => Heard::Nothing,
        }
    }
}

/// A write's value as the `/set` topic takes it.
fn json_of(v: &Value) -> Json {
    match v {
        Value::Int(i) => i64::try_from(*i)
            .map(Json::from)
            .or_else(|_| u64::try_from(*i).map(Json::from))
            .unwrap_or(Json::Null),
        Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(Json::Number)
            .unwrap_or(Json::Null),
        Value::Bool(b) => Json::Bool(*b),
        Value::Text(s) => Json::String(s.clone()),
    }
}
