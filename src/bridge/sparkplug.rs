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
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value as Json;
use tracing::warn;

use prometheus_client::metrics::counter::Counter;

use super::metrics::{CloudMetrics, SPARKPLUG_KINDS};
use crate::metrics::label;
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
    metrics: Arc<CloudMetrics>,
    /// `sparkplug_messages` of each type in [`SPARKPLUG_KINDS`], looked up once: a DDATA
    /// per reading takes no label lookup.
    made: [Counter; SPARKPLUG_KINDS.len()],
    /// The newest primary host STATE timestamp seen.
    host_ts: u64,
    /// Refused commands not logged yet, and when the last line was.
    refused: (u64, Option<Instant>),
}

/// Shortest time between two log lines about refused commands.
const LOG_EVERY: Duration = Duration::from_secs(10);

impl Uplink {
    /// The edge node of `[sparkplug]` over these devices; the `bdSeq` count lives in
    /// `data_dir`.
    pub fn new(
        cfg: &SparkplugConfig,
        gateway_id: &str,
        devices: Vec<crate::sparkplug::DeviceSpec>,
        data_dir: &std::path::Path,
        metrics: Arc<CloudMetrics>,
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
            made: SPARKPLUG_KINDS.map(|k| {
                metrics
                    .sparkplug_messages
                    .get_or_create(&label("type", k))
                    .clone()
            }),
            metrics,
            host_ts: 0,
            refused: (0, None),
        }
    }

    /// Counts messages made, by the type their topic names.
    fn count(&self, msgs: &[Message]) {
        for m in msgs {
            let kind = m.topic.split('/').nth(2);
            if let Some(i) = SPARKPLUG_KINDS.iter().position(|k| Some(*k) == kind) {
                self.made[i].inc();
            }
        }
    }

    fn set_holding(&mut self, holding: bool) {
        self.holding = holding;
        self.metrics
            .sparkplug_waiting_for_host
            .set(i64::from(holding));
    }

    fn births(&mut self, now: u64) -> Vec<Message> {
        let b = self.node.births(now);
        self.count(&b);
        b
    }

    /// A new connection attempt: its will, the NDEATH with the next `bdSeq`. The count
    /// moves on only once a broker accepted the connection ([`Uplink::connected`]): an
    /// attempt that never got a CONNACK registered no will, and no host saw its `bdSeq`.
    pub fn connecting(&mut self, now: u64) -> Message {
        self.set_holding(self.state_topic.is_some());
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
        self.births(now)
    }

    /// The session may not send records (the primary host is not online).
    pub fn holding(&self) -> bool {
        self.holding
    }

    /// The NDEATH of the current connection, for an orderly goodbye.
    pub fn goodbye(&self, now: u64) -> Message {
        let m = self.node.death_certificate(now);
        self.count(std::slice::from_ref(&m));
        m
    }

    /// The session ended: nothing waits for the host any more.
    pub fn disconnected(&mut self) {
        self.set_holding(false);
    }

    /// The message that was made last could not be sent: its `seq` is given back.
    pub fn not_sent(&mut self) {
        self.node.take_back();
    }

    /// What record `rec` becomes (`historical`: replayed backlog).
    pub fn encode(&mut self, rec: &Record, historical: bool, now: u64) -> Encoded {
        let e = self.make(rec, historical, now);
        if let Encoded::Sparkplug(births, carrier) = &e {
            self.count(births);
            self.count(carrier.as_slice());
        }
        e
    }

    fn make(&mut self, rec: &Record, historical: bool, now: u64) -> Encoded {
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
            Route::Batch(d, shape) => {
                let Some((ts, values)) = reading::batch(&rec.payload, shape) else {
                    return Encoded::Plain;
                };
                let ts = ts.unwrap_or(rec.ts_ms);
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
        let heard = match self.node.command(topic, payload) {
            None => return Heard::NotOurs,
            Some(Ok(Command::Rebirth)) if self.holding => Heard::Nothing,
            Some(Ok(Command::Rebirth)) => Heard::Births(self.births(now)),
            Some(Ok(Command::Write(writes))) => Heard::Local(
                writes
                    .into_iter()
                    .map(|w| {
                        let payload = match (w.raw, w.value) {
                            (true, Value::Text(s)) => s.into_bytes(),
                            (_, v) => json_of(&v).to_string().into_bytes(),
                        };
                        (w.topic, payload)
                    })
                    .collect(),
            ),
            Some(Err(e)) => {
                self.refuse(topic, &e);
                return Heard::Nothing;
            }
        };
        let result = if matches!(heard, Heard::Local(_)) {
            "write"
        } else {
            "rebirth"
        };
        self.metrics
            .sparkplug_commands
            .get_or_create(&label("result", result))
            .inc();
        heard
    }

    /// Counts a refused command (or an unreadable STATE), and logs it at most once per [`LOG_EVERY`] (with how many
    /// were refused since the last line): a host sending garbage cannot flood the journal.
    fn refuse(&mut self, topic: &str, e: &dyn std::fmt::Display) {
        self.metrics
            .sparkplug_commands
            .get_or_create(&label("result", "refused"))
            .inc();
        self.refused.0 += 1;
        if self.refused.1.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            warn!(topic, error = %e, refused = self.refused.0, "Sparkplug command refused");
            self.refused = (0, Some(Instant::now()));
        }
    }

    fn host_state(&mut self, payload: &[u8], now: u64) -> Heard {
        let state = serde_json::from_slice::<Json>(payload).ok();
        let online = state
            .as_ref()
            .and_then(|j| j.get("online").and_then(Json::as_bool));
        // A STATE older than one already seen (a stale retained copy) says nothing now.
        let ts = state
            .as_ref()
            .and_then(|j| j.get("timestamp").and_then(Json::as_u64));
        if let Some(ts) = ts {
            if ts < self.host_ts {
                return Heard::Nothing;
            }
            self.host_ts = ts;
        }
        match (online, self.holding) {
            (Some(true), true) => {
                self.set_holding(false);
                Heard::Births(self.births(now))
            }
            (Some(false), false) => Heard::HostOffline,
            (None, _) => {
                let topic = self.state_topic.clone().unwrap_or_default();
                self.refuse(
                    &topic,
                    &"a STATE payload that is not {\"online\":true|false,..}",
                );
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sparkplug::payload::{DataType, Metric, MetricValue, Payload};
    use crate::sparkplug::{DeviceSpec, MetricSpec};

    fn uplink(dir: &std::path::Path, host: &str) -> Uplink {
        let metric = |name: &str| MetricSpec {
            name: name.into(),
            datatype: DataType::Double,
            unit: String::new(),
            topic: Some(format!("field/m/{name}")),
            write_topic: Some(format!("field/m/{name}/set")),
            write_raw: false,
            properties: vec![],
        };
        let cfg = SparkplugConfig {
            enabled: true,
            group_id: "g".into(),
            primary_host_id: host.into(),
            ..Default::default()
        };
        let devices = vec![DeviceSpec {
            id: "m".into(),
            status_topic: Some("field/m/status".into()),
            batch: Some(crate::sparkplug::Batch {
                topic: "field/m/batch".into(),
                shape: crate::sparkplug::BatchShape::Values,
            }),
            metrics: vec![metric("a"), metric("b")],
        }];
        Uplink::new(&cfg, "gw", devices, dir, CloudMetrics::new())
    }

    fn rec(topic: &str, payload: &str) -> Record {
        Record {
            topic: topic.into(),
            payload: Bytes::from(payload.to_string()),
            retain: false,
            ts_ms: 5,
            extra: Default::default(),
        }
    }

    fn payload(m: &Message) -> Payload {
        Payload::from_bytes(&m.payload).unwrap()
    }

    #[test]
    fn what_is_no_devices_or_cannot_be_read_goes_up_plain() {
        let dir = tempfile::tempdir().unwrap();
        let mut u = uplink(dir.path(), "");
        u.connecting(0);
        u.connected(0);
        assert_eq!(u.encode(&rec("other/topic", "1"), false, 0), Encoded::Plain);
        assert_eq!(
            u.encode(&rec("field/m/a", "not a number"), false, 0),
            Encoded::Plain
        );
        assert_eq!(
            u.encode(&rec("field/m/status", "{}"), false, 0),
            Encoded::Plain
        );
    }

    #[test]
    fn statuses_and_batches_become_deaths_births_and_one_ddata() {
        let dir = tempfile::tempdir().unwrap();
        let mut u = uplink(dir.path(), "");
        u.connecting(0);
        assert_eq!(u.connected(0).len(), 2, "NBIRTH and DBIRTH");
        // Born by the births: an online status has nothing to say, and is done.
        let online = rec("field/m/status", r#"{"state":"online","ts":1}"#);
        assert_eq!(
            u.encode(&online, false, 1),
            Encoded::Sparkplug(vec![], None)
        );
        let offline = rec("field/m/status", r#"{"state":"offline","ts":2}"#);
        let Encoded::Sparkplug(pre, Some(death)) = u.encode(&offline, false, 2) else {
            panic!("a DDEATH");
        };
        assert!(pre.is_empty());
        assert_eq!(death.topic, "spBv1.0/g/DDEATH/gw/m");
        // A batch with values: the device answers again, born first.
        let batch = rec(
            "field/m/batch",
            r#"{"ts":3,"values":{"a":1.5,"b":null,"zz":1}}"#,
        );
        let Encoded::Sparkplug(pre, Some(data)) = u.encode(&batch, true, 3) else {
            panic!("a DDATA");
        };
        assert_eq!(pre.len(), 1, "the DBIRTH first");
        let p = payload(&data);
        assert_eq!(p.metrics.len(), 2, "unknown names are left out");
        assert!(p.metrics.iter().all(|m| m.is_historical == Some(true)));
        assert_eq!(
            u.metrics
                .sparkplug_messages
                .get_or_create(&label("type", "DDATA"))
                .get(),
            1
        );
    }

    #[test]
    fn the_bd_seq_counts_accepted_connections_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let mut u = uplink(dir.path(), "");
        let bd = |m: &Message| payload(m).metrics[0].value.clone();
        assert_eq!(bd(&u.connecting(0)), Some(MetricValue::LongValue(0)));
        // No CONNACK: the next attempt has the same bdSeq.
        assert_eq!(bd(&u.connecting(0)), Some(MetricValue::LongValue(0)));
        u.connected(0);
        assert_eq!(bd(&u.connecting(0)), Some(MetricValue::LongValue(1)));
        u.connected(0);
        let mut again = uplink(dir.path(), "");
        assert_eq!(bd(&again.connecting(0)), Some(MetricValue::LongValue(2)));
    }

    #[test]
    fn a_primary_host_holds_the_session_until_its_state_is_online() {
        let dir = tempfile::tempdir().unwrap();
        let mut u = uplink(dir.path(), "scada");
        u.connecting(0);
        assert!(u.filters().contains(&"spBv1.0/STATE/scada".to_string()));
        assert!(u.connected(0).is_empty());
        assert!(u.holding());
        let rebirth = Payload {
            metrics: vec![Metric {
                name: Some(crate::sparkplug::node::REBIRTH.into()),
                datatype: Some(11),
                value: Some(MetricValue::BooleanValue(true)),
                ..Default::default()
            }],
            ..Default::default()
        };
        let ncmd = Bytes::from(rebirth.to_bytes());
        assert_eq!(u.heard("spBv1.0/g/NCMD/gw", &ncmd, 0), Heard::Nothing);
        let state = |s: &str| Bytes::from(s.to_string());
        assert_eq!(
            u.heard("spBv1.0/STATE/scada", &state("garbage"), 0),
            Heard::Nothing
        );
        let Heard::Births(b) = u.heard("spBv1.0/STATE/scada", &state(r#"{"online":true}"#), 0)
        else {
            panic!("births once the host is online");
        };
        assert_eq!(b.len(), 2);
        assert!(!u.holding());
        assert!(matches!(
            u.heard("spBv1.0/g/NCMD/gw", &ncmd, 0),
            Heard::Births(_)
        ));
        assert_eq!(
            u.heard(
                "spBv1.0/STATE/scada",
                &state(r#"{"online":false,"timestamp":9}"#),
                0
            ),
            Heard::HostOffline
        );
        // A STATE older than the last one seen is stale, whatever it says.
        u.connecting(0);
        u.connected(0);
        let stale = state(r#"{"online":true,"timestamp":5}"#);
        assert_eq!(u.heard("spBv1.0/STATE/scada", &stale, 0), Heard::Nothing);
        assert!(u.holding());
    }

    #[test]
    fn writes_go_to_the_set_topic_as_json_and_refusals_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let mut u = uplink(dir.path(), "");
        let dcmd = |name: &str| {
            Bytes::from(
                Payload {
                    metrics: vec![Metric {
                        name: Some(name.into()),
                        datatype: Some(DataType::Double.code()),
                        value: Some(MetricValue::DoubleValue(2.5)),
                        ..Default::default()
                    }],
                    ..Default::default()
                }
                .to_bytes(),
            )
        };
        assert_eq!(
            u.heard("spBv1.0/g/DCMD/gw/m", &dcmd("a"), 0),
            Heard::Local(vec![("field/m/a/set".into(), b"2.5".to_vec())])
        );
        assert_eq!(
            u.heard("spBv1.0/g/DCMD/gw/m", &dcmd("nope"), 0),
            Heard::Nothing
        );
        assert_eq!(u.heard("fieldgate/gw/cmd/x", &dcmd("a"), 0), Heard::NotOurs);
        let count = |r: &str| {
            u.metrics
                .sparkplug_commands
                .get_or_create(&label("result", r))
                .get()
        };
        assert_eq!((count("write"), count("refused")), (1, 1));
    }
}
