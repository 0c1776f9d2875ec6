//! The decisions of one bus, without I/O: the poll schedule, device state
//! and backoff, what the outcome of a read publishes, the retained status, and the steps of a
//! write. [`super::Bus::run`] is its driver: it asks [`Engine::next_action`] what to do,
//! sends the requests the engine plans on its lanes with tokio-modbus, feeds every outcome
//! back, and publishes the engine's [`Out`]puts in the order they were made. Time comes in
//! as arguments (`now: Instant` for the schedule and the backoff, `ts` wall-clock
//! milliseconds for payloads), so the unit tests below drive it explicitly.
//!
//! Driver protocol:
//! - [`Engine::next_action`]`(now, write_waiting)`: [`Action::Write`] when a `/set` message
//!   waits (writes go before polls, even overdue ones; a cycle that runs is never
//!   interrupted), [`Action::Poll`] when a poll group or a batch is due, else
//!   [`Action::Wait`] until the next one is;
//! - a poll cycle: [`Engine::begin_cycle`]`(start)`, then [`Engine::next_poll`] until it says
//!   `None` (a [`Poll`] for each due device that is not waiting out a backoff: its reads, or
//!   for an offline device the one read that re-probes it). The outcomes of a [`Poll`]'s reads
//!   go to [`Engine::next_reads`], which hands out the device's next reads (the rest of its
//!   poll, once the probe was answered) or says `None`; then every outcome of the device's
//!   poll through [`Engine::apply_read`], in the order sent, and [`Engine::end_poll`] (the
//!   status); then [`Engine::batches`] and [`Engine::end_cycle`]`(end, requests)`;
//! - a write: [`Engine::begin_write`] answers at once or gives the first request;
//!   [`Engine::write_answered`] gives the next one (read-modify-write of a bit) or answers.
//!
//! Invariants (the bus's, see [`super`]):
//! - a poll cycle that ends after its next one was due is an overrun: counted, logged at most
//!   once a minute per bus, and the missed slots are skipped, not queued up; batch slots
//!   are skipped the same way;
//! - an offline device is not polled before its `retry_at`; then one read re-probes it,
//!   tried once and sent alone, and the rest of its poll are handed out only if it answers
//!   (data or an exception); after a failed probe they are not sent. `retry_at` moves once
//!   per failure episode (`reconnect_min` doubling to `reconnect_max`); an answer resets the
//!   backoff;
//! - only answers change the failing tags: a device that answers with some tags failing is
//!   `degraded`; the status is published at the end of a poll when it differs from the last
//!   one published;
//! - a failing tag publishes its bad reading when the quality changes, then at most once per
//!   `bad_repeat` (never with `retain`); in batch mode readings are kept for the batch only;
//! - a write that succeeded makes the groups of its tag due at once (read back).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_modbus::{Request, Response};
use tracing::{debug, info, warn};

use super::{exception_text, labels, Answer, RequestError, Unit};
use crate::board::{Board, Slot};
use crate::sources::modbus::codec::{self, Encoded, Format, Value};
use crate::sources::modbus::config::{ModbusDeviceConfig, PublishMode, TagConfig, Transport};
use crate::sources::modbus::metrics::ModbusMetrics;
use crate::sources::modbus::plan::{self, Limits, Read, Span};
use crate::sources::modbus::publish::{self, Failing, Quality, Status};

/// Tries of the read that re-probes an offline device.
pub const PROBE_ATTEMPTS: u32 = 1;
/// Tries of every request of a write (a write that timed out may have been applied).
pub const WRITE_ATTEMPTS: u32 = 1;
/// Shortest time between two overrun warnings of one bus.
const OVERRUN_LOG_EVERY: Duration = Duration::from_secs(60);

/// What the driver does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Take the waiting `/set` message ([`Engine::begin_write`]).
    Write,
    /// Run a poll cycle ([`Engine::begin_cycle`]).
    Poll,
    /// Nothing is due: sleep until then, or until a `/set` message arrives.
    Wait(Instant),
}

/// Reads of one device's poll to send now; their outcomes go to [`Engine::next_reads`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Poll {
    /// The device.
    pub device: usize,
    /// The reads, in plan order: all of the poll's when the device is not offline, else
    /// first the probe alone, then (once it is answered) the others.
    pub reads: Vec<Read>,
    /// Tries of each of `reads`: [`PROBE_ATTEMPTS`] for the probe, else `retries + 1`.
    pub attempts: u32,
    /// `reads` is the one read that re-probes an offline device.
    pub probe: bool,
}

/// One request of a write, tried [`WRITE_ATTEMPTS`] times.
#[derive(Debug, Clone, PartialEq)]
pub struct Txn {
    /// The device.
    pub device: usize,
    /// The request.
    pub req: Request<'static>,
}

/// Where an output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum To {
    /// A tag's topic, retained as its device says.
    Tag {
        /// Device index.
        device: usize,
        /// Tag index.
        tag: usize,
    },
    /// A device's batch topic, retained as the device says.
    Batch(usize),
    /// A device's status topic, retained.
    Status(usize),
    /// A `/set/result` topic, not retained.
    Reply(String),
}

/// One message to publish. Topics of tags and devices are looked up with [`Engine::route`]
/// when published, so making an output copies no topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Out {
    /// Where.
    pub to: To,
    /// What.
    pub payload: Vec<u8>,
}

/// How a cycle ended ([`Engine::end_cycle`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CycleEnd {
    /// A poll group's next slot had passed: counted as an overrun.
    pub overran: bool,
    /// The overrun was logged (at most once per [`OVERRUN_LOG_EVERY`]).
    pub logged: bool,
}

// ---------------------------------------------------------------------------------------------
// Devices and tags at run time

struct Tag {
    cfg: TagConfig,
    fmt: Format,
    addr: u16,
    topic: String,
    /// What was published last: (value, quality).
    last: Option<(Option<Value>, Quality)>,
    /// When a reading was published last (to repeat a bad one, see `bad_repeat`).
    last_at: Option<Instant>,
    /// Batch mode: the latest reading, whatever its quality, for the next batch.
    latest: Option<Latest>,
}

/// The latest reading of a tag (batch mode).
struct Latest {
    value: Option<Value>,
    quality: Quality,
    error: Option<String>,
    ts: u64,
}

/// `publish = "batch"`: where and when the device's batch goes.
struct Batch {
    topic: String,
    interval: Duration,
    next_due: Instant,
}

struct Group {
    interval: Duration,
    tags: Vec<usize>,
    next_due: Instant,
}

/// Explicit device state (see the bus's module header).
#[derive(Debug, Clone, PartialEq)]
enum State {
    Unknown,
    Online,
    Offline { kind: &'static str, error: String },
}

struct Device {
    cfg: ModbusDeviceConfig,
    unit: Unit,
    limits: Limits,
    tags: Vec<Tag>,
    groups: Vec<Group>,
    state: State,
    retry_at: Instant,
    backoff: Duration,
    status_topic: String,
    /// Tags whose last reading failed while the device answered: tag index -> (quality,
    /// error). A good reading removes the tag.
    failing: BTreeMap<usize, (Quality, String)>,
    /// The status last published (without its `ts`), to publish only changes.
    published: Option<Vec<u8>>,
    /// `Some` in batch mode: the tags' readings go into one message per interval.
    batch: Option<Batch>,
}

/// The write being carried out.
struct Write {
    device: usize,
    tag: usize,
    id: Option<serde_json::Value>,
    /// `Some((addr, bit, value))` while the register of a bit tag is being read.
    bit: Option<(u16, u8, bool)>,
}

/// A cycle in progress: its start and the due devices, with their due groups and tags.
struct Cycle {
    start: Instant,
    due: Vec<(usize, Vec<usize>, Vec<usize>)>,
    /// Next entry of `due` for [`Engine::next_poll`].
    next: usize,
    /// The other reads of the device being re-probed: handed out by [`Engine::next_reads`]
    /// once the probe is answered, dropped when it failed.
    held: Option<Poll>,
}

/// The state and decisions of one bus (see the module header).
pub struct Engine {
    name: String,
    devices: Vec<Device>,
    metrics: Arc<ModbusMetrics>,
    /// Exact set topic -> (device, tag).
    set_topics: HashMap<String, (usize, usize)>,
    /// Filters to subscribe to.
    filters: Vec<String>,
    /// Command prefixes in use (to find a result topic for an unknown tag).
    prefixes: Vec<String>,
    cycle: Option<Cycle>,
    write: Option<Write>,
    overruns_unlogged: u64,
    last_overrun_log: Option<Instant>,
    /// Overruns since start (what the device board shows for every device of the bus).
    overruns_total: u64,
    /// Each device's slot on the operator page's board (empty until [`Engine::show_on`]).
    slots: Vec<Arc<Slot>>,
}

impl Engine {
    /// The engine of bus `name` for `devices` (all on one line; configs must have passed
    /// [`crate::sources::modbus::config::validate`]). Every poll group and batch is due at
    /// `now`.
    pub fn new(
        name: String,
        devices: &[ModbusDeviceConfig],
        gateway_id: &str,
        metrics: Arc<ModbusMetrics>,
        now: Instant,
    ) -> Engine {
        let gap = devices
            .iter()
            .map(|d| match d.transport {
                // The converter paces the serial line; only a configured gap is kept here.
                Transport::RtuOverTcp => d.inter_frame_gap.unwrap_or_default(),
                _ => d.frame_gap(),
            })
            .max()
            .unwrap_or_default();
        let mut set_topics = HashMap::new();
        let mut filters = Vec::new();
        let mut prefixes = Vec::new();
        let mut devs = Vec::new();
        for (di, d) in devices.iter().enumerate() {
            let mut tags = Vec::new();
            let mut by_interval: BTreeMap<Duration, Vec<usize>> = BTreeMap::new();
            for (ti, t) in d.tags.iter().enumerate() {
                let topic = d.tag_topic(gateway_id, &t.name);
                set_topics.insert(format!("{topic}/set"), (di, ti));
                if !d.command_prefix.is_empty() {
                    set_topics.insert(format!("{}{topic}/set", d.command_prefix), (di, ti));
                }
                by_interval
                    .entry(t.poll_interval.unwrap_or(d.poll_interval))
                    .or_default()
                    .push(ti);
                tags.push(Tag {
                    fmt: t.format(),
                    addr: t.wire_address(d.address_base).unwrap_or(0),
                    cfg: t.clone(),
                    topic,
                    last: None,
                    last_at: None,
                    latest: None,
                });
            }
            // One wildcard filter when `{tag}` is a whole topic level, else one per tag.
            let template =
                crate::topic::with_gateway_id(&d.topic, gateway_id).replace("{device}", &d.name);
            let whole_level = template.split('/').any(|l| l == "{tag}")
                && !template.replace("{tag}", "").contains('+');
            let mut mine: Vec<String> = if whole_level {
                vec![format!("{}/set", template.replace("{tag}", "+"))]
            } else {
                tags.iter().map(|t| format!("{}/set", t.topic)).collect()
            };
            if !d.command_prefix.is_empty() {
                let prefixed: Vec<String> = mine
                    .iter()
                    .map(|f| format!("{}{f}", d.command_prefix))
                    .collect();
                mine.extend(prefixed);
                if !prefixes.contains(&d.command_prefix) {
                    prefixes.push(d.command_prefix.clone());
                }
            }
            for f in mine {
                if !filters.contains(&f) {
                    filters.push(f);
                }
            }
            devs.push(Device {
                unit: Unit {
                    name: d.name.clone(),
                    id: d.unit_id,
                    timeout: d.timeout,
                    retries: d.retries,
                    request_delay: d.request_delay,
                    gap,
                },
                limits: Limits {
                    max_gap: d.max_gap,
                    max_registers: d.max_read_registers,
                    max_coils: d.max_read_coils,
                },
                tags,
                groups: by_interval
                    .into_iter()
                    .map(|(interval, tags)| Group {
                        interval,
                        tags,
                        next_due: now,
                    })
                    .collect(),
                state: State::Unknown,
                retry_at: now,
                backoff: d.reconnect_min,
                status_topic: d.status_topic(gateway_id),
                failing: BTreeMap::new(),
                published: None,
                batch: (d.publish == PublishMode::Batch).then(|| Batch {
                    topic: d.batch_topic(gateway_id),
                    interval: d.publish_interval(),
                    next_due: now,
                }),
                cfg: d.clone(),
            });
        }
        for d in &devs {
            metrics
                .online
                .get_or_create(&labels(&[("device", &d.cfg.name)]))
                .set(0);
            // Materialise every label so a scrape shows zeros, not absence.
            for kind in ["timeout", "exception", "bad_frame", "io", "connect"] {
                metrics
                    .errors
                    .get_or_create(&labels(&[("device", &d.cfg.name), ("kind", kind)]))
                    .inc_by(0);
            }
        }
        Engine {
            name,
            devices: devs,
            metrics,
            set_topics,
            filters,
            prefixes,
            cycle: None,
            write: None,
            overruns_unlogged: 0,
            last_overrun_log: None,
            overruns_total: 0,
            slots: Vec::new(),
        }
    }

    /// Puts every device of the bus on the operator page's `board`: from now on their status
    /// changes, tag readings (at poll rate) and the bus's overruns are shown there.
    pub fn show_on(&mut self, board: &Board) {
        self.slots = self
            .devices
            .iter()
            .map(|d| {
                let tags: Vec<(&str, &str)> = d
                    .tags
                    .iter()
                    .map(|t| (t.cfg.name.as_str(), t.cfg.unit.as_str()))
                    .collect();
                board.add("modbus", &d.cfg.name, &tags)
            })
            .collect();
    }

    /// Number of devices on the bus.
    pub fn devices(&self) -> usize {
        self.devices.len()
    }

    /// Topic filters the bus takes writes on.
    pub fn filters(&self) -> &[String] {
        &self.filters
    }

    /// Request settings of device `di`.
    pub fn unit(&self, di: usize) -> &Unit {
        &self.devices[di].unit
    }

    /// The topic of an output, and whether it is retained.
    pub fn route<'a>(&'a self, to: &'a To) -> (&'a str, bool) {
        match to {
            To::Tag { device, tag } => {
                let d = &self.devices[*device];
                (&d.tags[*tag].topic, d.cfg.retain)
            }
            To::Batch(di) => {
                let d = &self.devices[*di];
                (d.batch.as_ref().map_or("", |b| &b.topic), d.cfg.retain)
            }
            To::Status(di) => (&self.devices[*di].status_topic, true),
            To::Reply(topic) => (topic, false),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Schedule

    /// When the next poll group or batch is due (an hour from `now` when there is none).
    pub fn next_due(&self, now: Instant) -> Instant {
        self.devices
            .iter()
            .flat_map(|d| {
                d.groups
                    .iter()
                    .map(|g| g.next_due)
                    .chain(d.batch.as_ref().map(|b| b.next_due))
            })
            .min()
            .unwrap_or_else(|| now + Duration::from_secs(3600))
    }

    /// What to do at `now`. A waiting write goes first: a write is one or two requests,
    /// while a cycle may take many (and the write's tag is read back in the next one).
    pub fn next_action(&self, now: Instant, write_waiting: bool) -> Action {
        if write_waiting {
            return Action::Write;
        }
        let next = self.next_due(now);
        if next <= now {
            Action::Poll
        } else {
            Action::Wait(next)
        }
    }

    /// Starts a poll cycle at `start`: every poll group due by then, device by device.
    pub fn begin_cycle(&mut self, start: Instant) {
        let mut due: Vec<(usize, Vec<usize>, Vec<usize>)> = Vec::new();
        for (di, d) in self.devices.iter().enumerate() {
            let groups: Vec<usize> = (0..d.groups.len())
                .filter(|&gi| d.groups[gi].next_due <= start)
                .collect();
            if groups.is_empty() {
                continue;
            }
            let tags = groups
                .iter()
                .flat_map(|&gi| d.groups[gi].tags.iter().copied())
                .collect();
            due.push((di, groups, tags));
        }
        self.cycle = Some(Cycle {
            start,
            due,
            next: 0,
            held: None,
        });
    }

    /// The first reads of the next due device of the cycle, skipping the devices that are
    /// offline and wait for their re-probe at `now`: all of its reads, or when it is offline
    /// the probe alone (the others wait for [`Engine::next_reads`]). `None`: every due device
    /// had its turn.
    pub fn next_poll(&mut self, now: Instant) -> Option<Poll> {
        let cycle = self.cycle.as_mut()?;
        cycle.held = None;
        while let Some((di, _, tags)) = cycle.due.get(cycle.next) {
            cycle.next += 1;
            let d = &self.devices[*di];
            let offline = matches!(d.state, State::Offline { .. });
            if offline && now < d.retry_at {
                continue;
            }
            let spans: Vec<Span> = tags
                .iter()
                .map(|&ti| Span {
                    tag: ti,
                    kind: d.tags[ti].cfg.kind,
                    start: d.tags[ti].addr,
                    count: d.tags[ti].fmt.registers(),
                })
                .collect();
            let mut reads = plan::plan(&spans, d.limits);
            let attempts = d.unit.retries + 1;
            if offline && !reads.is_empty() {
                // Re-probe with one request; the rest only if the device is back.
                let rest = reads.split_off(1);
                cycle.held = (!rest.is_empty()).then_some(Poll {
                    device: *di,
                    reads: rest,
                    attempts,
                    probe: false,
                });
                return Some(Poll {
                    device: *di,
                    reads,
                    attempts: PROBE_ATTEMPTS,
                    probe: true,
                });
            }
            return Some(Poll {
                device: *di,
                reads,
                attempts,
                probe: false,
            });
        }
        None
    }

    /// The reads of the device being polled to send after `outcomes` (those of the reads the
    /// engine handed out last): the rest of its poll when those were its probe and it was
    /// answered (data or an exception: the device is back). `None` when the probe failed (the
    /// device is still gone, so the other reads are not sent and their tags keep their last
    /// readings) or when nothing is left to send.
    pub fn next_reads(
        &mut self,
        outcomes: &[(Read, Result<Answer, RequestError>)],
    ) -> Option<Poll> {
        let held = self.cycle.as_mut()?.held.take()?;
        let answered = !outcomes.is_empty() && outcomes.iter().all(|(_, r)| r.is_ok());
        answered.then_some(held)
    }

    /// Publishes the batches due at the cycle's start (after its polls, so a batch due with a
    /// poll carries that poll's readings). `ts`: for a batch whose readings carry none.
    pub fn batches(&mut self, ts: u64, out: &mut Vec<Out>) {
        let Some(start) = self.cycle.as_ref().map(|c| c.start) else {
            return;
        };
        for di in 0..self.devices.len() {
            if self.devices[di]
                .batch
                .as_ref()
                .is_some_and(|b| b.next_due <= start)
            {
                self.publish_batch(di, ts, out);
            }
        }
    }

    /// Ends the cycle at `end` after `requests` requests: moves every polled group and
    /// published batch to its next slot (skipping the slots that already passed), and counts
    /// the cycle.
    pub fn end_cycle(&mut self, end: Instant, requests: usize) -> CycleEnd {
        let Some(cycle) = self.cycle.take() else {
            return CycleEnd::default();
        };
        let start = cycle.start;
        let mut overran = false;
        for (di, groups, _) in &cycle.due {
            for &gi in groups {
                let g = &mut self.devices[*di].groups[gi];
                g.next_due += g.interval;
                if g.next_due <= end {
                    overran = true;
                    g.next_due = skip_missed(g.next_due, g.interval, end);
                }
            }
        }
        for d in &mut self.devices {
            if let Some(b) = d.batch.as_mut().filter(|b| b.next_due <= start) {
                // Missed batches are skipped, not sent in a burst.
                b.next_due += b.interval;
                if b.next_due <= end {
                    b.next_due = skip_missed(b.next_due, b.interval, end);
                }
            }
        }
        if cycle.due.is_empty() {
            // Only a batch was due: not a poll cycle (its metrics stay as they were).
            return CycleEnd::default();
        }
        let bus = labels(&[("bus", &self.name)]);
        self.metrics.cycles.get_or_create(&bus).inc();
        self.metrics
            .cycle_requests
            .get_or_create(&bus)
            .set(requests as i64);
        let mut logged = false;
        if overran {
            self.metrics.overruns.get_or_create(&bus).inc();
            self.overruns_total += 1;
            for s in &self.slots {
                s.overruns(self.overruns_total);
            }
            self.overruns_unlogged += 1;
            logged = self
                .last_overrun_log
                .is_none_or(|t| end.saturating_duration_since(t) >= OVERRUN_LOG_EVERY);
            if logged {
                warn!(
                    bus = %self.name,
                    cycle_ms = (end - start).as_millis() as u64,
                    requests,
                    overruns = self.overruns_unlogged,
                    "modbus poll cycle did not fit its interval; polls are skipped, not queued \
                     (raise poll_interval, lower timeout/retries, or raise max_gap to coalesce more)"
                );
                self.overruns_unlogged = 0;
                self.last_overrun_log = Some(end);
            }
        }
        CycleEnd { overran, logged }
    }

    // -----------------------------------------------------------------------------------------
    // Outcomes of reads

    /// The outcome of one read of device `di` at `now` (`ts`: its wall-clock time): updates
    /// the device state and its tags, and adds what is published to `out`.
    pub fn apply_read(
        &mut self,
        di: usize,
        read: &Read,
        r: Result<Answer, RequestError>,
        now: Instant,
        ts: u64,
        out: &mut Vec<Out>,
    ) {
        match r {
            Ok(Answer::Data(resp)) => {
                self.metrics
                    .reads
                    .get_or_create(&labels(&[("device", &self.devices[di].cfg.name)]))
                    .inc();
                self.set_state(di, State::Online, now);
                let (words, bits): (&[u16], &[bool]) = match &resp {
                    Response::ReadHoldingRegisters(w) | Response::ReadInputRegisters(w) => (w, &[]),
                    Response::ReadCoils(b) | Response::ReadDiscreteInputs(b) => (&[], b),
                    _ => (&[], &[]),
                };
                for &(ti, off) in &read.tags {
                    let tag = &self.devices[di].tags[ti];
                    let off = usize::from(off);
                    let decoded = if tag.cfg.kind.is_bit() {
                        codec::decode_bits(&tag.fmt, bits.get(off..).unwrap_or(&[]))
                    } else {
                        codec::decode(&tag.fmt, words.get(off..).unwrap_or(&[]))
                    };
                    let (value, quality, error) = match decoded {
                        Ok(v) if v.is_finite() => (Some(v), Quality::Good, None),
                        Ok(v) => (
                            None,
                            Quality::Invalid,
                            Some(format!("not a finite number: {v}")),
                        ),
                        Err(e) => (None, Quality::BadFrame, Some(e.to_string())),
                    };
                    self.publish_tag(di, ti, value, quality, error, now, ts, out);
                }
            }
            Ok(Answer::Exception(code)) => {
                self.set_state(di, State::Online, now);
                let text = exception_text(code);
                debug!(device = %self.devices[di].cfg.name, kind = ?read.kind, start = read.start, count = read.count, error = %text, "exception answer");
                for &(ti, _) in &read.tags {
                    let error = Some(text.clone());
                    self.publish_tag(di, ti, None, Quality::Exception, error, now, ts, out);
                }
            }
            Err(e) => {
                let state = State::Offline {
                    kind: e.kind(),
                    error: format!(
                        "{e} (reading {} {}..{})",
                        read.kind.as_str(),
                        read.start,
                        u32::from(read.start) + u32::from(read.count)
                    ),
                };
                self.set_state(di, state, now);
                for &(ti, _) in &read.tags {
                    let error = Some(e.to_string());
                    self.publish_tag(di, ti, None, e.quality(), error, now, ts, out);
                }
            }
        }
    }

    /// Ends the poll of device `di`: its retained status, if it differs from the last one
    /// published.
    pub fn end_poll(&mut self, di: usize, ts: u64, out: &mut Vec<Out>) {
        let d = &mut self.devices[di];
        let failing: Vec<Failing> = d
            .failing
            .iter()
            .map(|(&ti, (quality, error))| Failing {
                tag: d.tags[ti].cfg.name.clone(),
                quality: *quality,
                error: error.clone(),
            })
            .collect();
        let status = match &d.state {
            State::Unknown => return,
            State::Offline { kind, error } => Status::Offline(kind, error),
            State::Online if failing.is_empty() => Status::Online,
            State::Online => Status::Degraded(&failing),
        };
        // Compared without the timestamp.
        let key = publish::status(&status, 0);
        if d.published.as_ref() == Some(&key) {
            return;
        }
        if let Status::Degraded(f) = &status {
            let tags: Vec<&str> = f.iter().map(|f| f.tag.as_str()).collect();
            warn!(device = %d.cfg.name, failing = ?tags, "modbus device degraded: it answers, but some tags fail");
        }
        let payload = publish::status(&status, ts);
        d.published = Some(key);
        if let Some(slot) = self.slots.get(di) {
            match &status {
                Status::Online => slot.status("online", None),
                Status::Degraded(f) => {
                    let why: Vec<String> = f
                        .iter()
                        .map(|f| format!("{}: {}", f.tag, f.error))
                        .collect();
                    slot.status("degraded", Some(&why.join("; ")));
                }
                Status::Offline(_, e) => slot.status("offline", Some(e)),
            }
        }
        out.push(Out {
            to: To::Status(di),
            payload,
        });
    }

    /// The statuses published when the bus stops: every device offline, "gateway stopping".
    pub fn stopping(&self, ts: u64, out: &mut Vec<Out>) {
        for di in 0..self.devices.len() {
            out.push(Out {
                to: To::Status(di),
                payload: publish::status(&Status::Offline("stopped", "gateway stopping"), ts),
            });
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn publish_tag(
        &mut self,
        di: usize,
        ti: usize,
        value: Option<Value>,
        quality: Quality,
        error: Option<String>,
        now: Instant,
        ts: u64,
        out: &mut Vec<Out>,
    ) {
        if let Some(slot) = self.slots.get(di) {
            let v = value.as_ref().map(Value::to_json).unwrap_or_default();
            slot.tag(ti, v, quality.as_str(), ts);
        }
        let d = &mut self.devices[di];
        let (format, retain, repeat) = (d.cfg.payload, d.cfg.retain, d.cfg.bad_repeat);
        // Only answers count: when the request failed the device is offline, and its status
        // says so.
        if d.state == State::Online {
            if quality == Quality::Good {
                d.failing.remove(&ti);
            } else {
                // The device answered, this tag did not read: the device is degraded.
                d.failing
                    .insert(ti, (quality, error.clone().unwrap_or_default()));
            }
        }
        let tag = &mut d.tags[ti];
        if quality != Quality::Good {
            self.metrics
                .tag_errors
                .get_or_create(&labels(&[("device", &d.cfg.name), ("tag", &tag.cfg.name)]))
                .inc();
        }
        if d.batch.is_some() {
            // Batch mode: kept for the next batch, never published on its own.
            tag.latest = Some(Latest {
                value,
                quality,
                error,
                ts,
            });
            return;
        }
        let changed = publish::changed(
            tag.cfg.on_change,
            tag.cfg.deadband,
            tag.last.as_ref(),
            value.as_ref(),
            quality,
        );
        let repeated = quality != Quality::Good
            && tag
                .last_at
                .is_some_and(|t| publish::repeat_bad(retain, repeat, now - t));
        if !changed && !repeated {
            return;
        }
        tag.last_at = Some(now);
        let payload = publish::reading(
            format,
            value.as_ref(),
            quality,
            error.as_deref(),
            &tag.cfg.unit,
            ts,
        );
        tag.last = Some((value, quality));
        if let Some(payload) = payload {
            out.push(Out {
                to: To::Tag {
                    device: di,
                    tag: ti,
                },
                payload,
            });
        }
    }

    /// Publishes device `di`'s batch: the latest reading of every tag read so far (nothing
    /// before the first reading).
    fn publish_batch(&mut self, di: usize, ts: u64, out: &mut Vec<Out>) {
        let d = &self.devices[di];
        if d.batch.is_none() {
            return;
        }
        let entries: Vec<publish::Entry<'_>> = d
            .tags
            .iter()
            .filter_map(|t| {
                let l = t.latest.as_ref()?;
                Some(publish::Entry {
                    tag: &t.cfg.name,
                    value: l.value.as_ref(),
                    quality: l.quality,
                    error: l.error.as_deref(),
                    unit: &t.cfg.unit,
                })
            })
            .collect();
        if entries.is_empty() {
            return;
        }
        let ts = d
            .tags
            .iter()
            .filter_map(|t| t.latest.as_ref().map(|l| l.ts))
            .max()
            .unwrap_or(ts);
        out.push(Out {
            to: To::Batch(di),
            payload: publish::batch(&entries, ts),
        });
    }

    /// Updates the device's reachability (backoff, metric, log); the status topic follows
    /// at the end of the poll ([`Engine::end_poll`]).
    fn set_state(&mut self, di: usize, state: State, now: Instant) {
        let d = &mut self.devices[di];
        match &state {
            State::Online => d.backoff = d.cfg.reconnect_min,
            // Once per failure episode: the reads after the first failure of a cycle do not
            // push the re-probe further out.
            State::Offline { .. }
                if !matches!(d.state, State::Offline { .. }) || now >= d.retry_at =>
            {
                d.retry_at = now + d.backoff;
                d.backoff = d.backoff.saturating_mul(2).min(d.cfg.reconnect_max);
            }
            State::Offline { .. } => {}
            State::Unknown => {}
        }
        let changed = !matches!(
            (&d.state, &state),
            (State::Online, State::Online) | (State::Offline { .. }, State::Offline { .. })
        );
        if !changed {
            return;
        }
        let online = matches!(state, State::Online);
        self.metrics
            .online
            .get_or_create(&labels(&[("device", &d.cfg.name)]))
            .set(i64::from(online));
        match &state {
            State::Offline { kind, error } => {
                warn!(device = %d.cfg.name, kind, error = %error, retry_in_ms = (d.retry_at - now).as_millis() as u64, "modbus device offline");
            }
            _ => info!(device = %d.cfg.name, "modbus device online"),
        }
        d.state = state;
    }

    // -----------------------------------------------------------------------------------------
    // Writes

    /// Takes one message on a set topic at `now`: the first request of the write, or `None`
    /// when it is answered at once (in `out`: unknown tag, malformed, read-only, out of
    /// range).
    pub fn begin_write(
        &mut self,
        topic: &str,
        payload: &[u8],
        now: Instant,
        out: &mut Vec<Out>,
    ) -> Option<Txn> {
        let Some(&(di, ti)) = self.set_topics.get(topic) else {
            // Matched a wildcard filter but names no tag.
            let base = topic.strip_suffix("/set").unwrap_or(topic);
            let base = self
                .prefixes
                .iter()
                .find_map(|p| base.strip_prefix(p.as_str()))
                .unwrap_or(base);
            let id = publish::request_id(payload);
            let p = publish::set_result(
                Some(("unknown_tag", &format!("no tag publishes on {base}"))),
                id.as_ref(),
            );
            out.push(Out {
                to: To::Reply(format!("{base}/set/result")),
                payload: p,
            });
            return None;
        };
        let mut w = Write {
            device: di,
            tag: ti,
            id: None,
            bit: None,
        };
        let d = &self.devices[di];
        let tag = &d.tags[ti];
        let text = tag.fmt.ty == codec::DataType::String;
        let req = match publish::parse_set(payload, text) {
            Ok(r) => r,
            Err(e) => {
                w.id = publish::request_id(payload);
                self.finish_write(w, Err(("bad_request", e)), now, out);
                return None;
            }
        };
        w.id = req.id.clone();
        if !tag.cfg.writable {
            let e = format!(
                "tag {} of device {} is read-only (writable = false in its config)",
                tag.cfg.name, d.cfg.name
            );
            self.finish_write(w, Err(("read_only", e)), now, out);
            return None;
        }
        let enc = match codec::encode(&tag.fmt, &req.value) {
            Ok(e) => e,
            Err(e @ (codec::CodecError::WrongType { .. } | codec::CodecError::Count { .. })) => {
                self.finish_write(w, Err(("bad_request", e.to_string())), now, out);
                return None;
            }
            Err(e) => {
                self.finish_write(w, Err(("out_of_range", e.to_string())), now, out);
                return None;
            }
        };
        let addr = tag.addr;
        let req = match enc {
            Encoded::Coil(b) => Request::WriteSingleCoil(addr, b),
            Encoded::Coils(b) => Request::WriteMultipleCoils(addr, Cow::Owned(b)),
            Encoded::Registers(r) if r.len() == 1 => Request::WriteSingleRegister(addr, r[0]),
            Encoded::Registers(r) => Request::WriteMultipleRegisters(addr, Cow::Owned(r)),
            Encoded::Bit { bit, value } => {
                // Read-modify-write; safe because the bus is the only writer on the line.
                w.bit = Some((addr, bit, value));
                Request::ReadHoldingRegisters(addr, 1)
            }
        };
        self.write = Some(w);
        Some(Txn { device: di, req })
    }

    /// The answer to the write's last request at `now`: the next request, or `None` when the
    /// write is done (its result in `out`, and on success its tag is read back at once).
    pub fn write_answered(
        &mut self,
        r: Result<Answer, RequestError>,
        now: Instant,
        out: &mut Vec<Out>,
    ) -> Option<Txn> {
        let mut w = self.write.take()?;
        let outcome = match (w.bit.take(), r) {
            (Some((addr, bit, value)), r) => match r {
                Ok(Answer::Data(Response::ReadHoldingRegisters(words))) if !words.is_empty() => {
                    let req = Request::WriteSingleRegister(addr, set_bit(words[0], bit, value));
                    let device = w.device;
                    self.write = Some(w);
                    return Some(Txn { device, req });
                }
                Ok(Answer::Exception(code)) => Err(("exception", exception_text(code))),
                Ok(_) => Err(("bad_frame", "unexpected answer".into())),
                Err(e) => Err((e.kind(), e.to_string())),
            },
            (None, Ok(Answer::Data(_))) => Ok(()),
            (None, Ok(Answer::Exception(code))) => Err(("exception", exception_text(code))),
            (None, Err(e)) => Err((e.kind(), e.to_string())),
        };
        self.finish_write(w, outcome, now, out);
        None
    }

    /// Counts, logs and answers a write; a successful one makes its tag due at once.
    fn finish_write(
        &mut self,
        w: Write,
        outcome: Result<(), (&'static str, String)>,
        now: Instant,
        out: &mut Vec<Out>,
    ) {
        let d = &mut self.devices[w.device];
        let result_topic = format!("{}/set/result", d.tags[w.tag].topic);
        let result = if outcome.is_ok() { "ok" } else { "error" };
        self.metrics
            .writes
            .get_or_create(&labels(&[("device", &d.cfg.name), ("result", result)]))
            .inc();
        let tag_name = &d.tags[w.tag].cfg.name;
        let payload = match &outcome {
            Ok(()) => {
                info!(device = %d.cfg.name, tag = %tag_name, "modbus write done");
                // Read the tag back soon, so its topic shows what the device now holds.
                for g in d.groups.iter_mut().filter(|g| g.tags.contains(&w.tag)) {
                    g.next_due = g.next_due.min(now);
                }
                publish::set_result(None, w.id.as_ref())
            }
            Err((code, msg)) => {
                info!(device = %d.cfg.name, tag = %tag_name, code, error = %msg, "modbus write refused or failed");
                publish::set_result(Some((code, msg)), w.id.as_ref())
            }
        };
        out.push(Out {
            to: To::Reply(result_topic),
            payload,
        });
    }
}

/// The first slot after `end` of a schedule whose slot `next` (at or before `end`) was
/// missed: the missed slots are skipped, not run in a burst.
fn skip_missed(next: Instant, interval: Duration, end: Instant) -> Instant {
    let behind = (end - next).as_nanos();
    let skip = behind / interval.as_nanos().max(1) + 1;
    next + interval * u32::try_from(skip).unwrap_or(u32::MAX)
}

/// `current` with bit `bit` (0..=15) set to `value`.
fn set_bit(current: u16, bit: u8, value: bool) -> u16 {
    let mask = 1u16 << (bit & 15);
    if value {
        current | mask
    } else {
        current & !mask
    }
}

/// Spreads `reads` over `lanes` connections round-robin (lane `k` gets reads `k`, `k + n`,
/// ...); at most one lane per read, at least one lane.
pub fn spread(reads: Vec<Read>, lanes: usize) -> Vec<Vec<Read>> {
    let n = lanes.min(reads.len()).max(1);
    let mut chunks: Vec<Vec<Read>> = (0..n).map(|_| Vec::new()).collect();
    for (k, r) in reads.into_iter().enumerate() {
        chunks[k % n].push(r);
    }
    chunks
}

#[cfg(test)]
mod tests {
    //! The engine driven the way [`super::super::Bus`] drives it, with explicit time and
    //! answers made up per read: no line, no broker, no runtime.

    use super::*;
    use serde_json::{json, Value as Json};
    use tokio_modbus::ExceptionCode;

    const TS: u64 = 1_712_345_678_901;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn tag(name: &str, address: u32) -> TagConfig {
        TagConfig {
            name: name.into(),
            address,
            ..TagConfig::default()
        }
    }

    fn dev(name: &str, poll_ms: u64, tags: Vec<TagConfig>) -> ModbusDeviceConfig {
        ModbusDeviceConfig {
            name: name.into(),
            host: "127.0.0.1:502".into(),
            poll_interval: ms(poll_ms),
            tags,
            ..ModbusDeviceConfig::default()
        }
    }

    fn engine(devices: &[ModbusDeviceConfig], t0: Instant) -> Engine {
        Engine::new("bus".into(), devices, "gw", ModbusMetrics::new(), t0)
    }

    /// Every register answers its own address.
    fn echo(read: &Read) -> Result<Answer, RequestError> {
        Ok(Answer::Data(Response::ReadHoldingRegisters(
            (read.start..read.start + read.count).collect(),
        )))
    }

    fn timeout() -> Result<Answer, RequestError> {
        Err(RequestError::Timeout(ms(300)))
    }

    fn exception() -> Result<Answer, RequestError> {
        Ok(Answer::Exception(ExceptionCode::IllegalDataAddress))
    }

    /// The reads the engine handed out for one device in a cycle, in the order it did.
    #[derive(Debug)]
    struct Polled {
        device: usize,
        steps: Vec<Poll>,
    }

    impl Polled {
        /// The read that re-probed the device, if it was offline.
        fn probe(&self) -> Option<&Read> {
            let first = self.steps.first().filter(|p| p.probe)?;
            assert_eq!(first.reads.len(), 1, "a probe is one read");
            assert_eq!(first.attempts, PROBE_ATTEMPTS);
            first.reads.first()
        }
    }

    /// What one cycle did.
    #[derive(Debug)]
    struct Ran {
        /// Milliseconds from the start of the test.
        at: u64,
        polls: Vec<Polled>,
        /// Requests sent (the driver's count).
        requests: usize,
        out: Vec<(String, bool, Json)>,
        end: CycleEnd,
    }

    impl Ran {
        fn polled(&self, device: usize) -> Option<&Polled> {
            self.polls.iter().find(|p| p.device == device)
        }

        fn on(&self, topic: &str) -> Vec<&Json> {
            self.out
                .iter()
                .filter(|(t, _, _)| t == topic)
                .map(|(_, _, j)| j)
                .collect()
        }
    }

    fn decode(e: &Engine, out: Vec<Out>) -> Vec<(String, bool, Json)> {
        out.into_iter()
            .map(|o| {
                let (topic, retain) = e.route(&o.to);
                let j = serde_json::from_slice(&o.payload).unwrap_or(Json::Null);
                (topic.to_string(), retain, j)
            })
            .collect()
    }

    /// One cycle at `at` as the driver runs it on one lane: the reads the engine hands out
    /// are sent in order (`answer(device, read)` for each; after a failed read the others of
    /// the lane fail alike without being sent), their outcomes go back to the engine for its
    /// next reads, then all of the device's to `apply_read`; the cycle ends `took(sent)`
    /// later.
    fn cycle(
        e: &mut Engine,
        t0: Instant,
        at: Instant,
        took: &mut impl FnMut(&[(usize, Result<Answer, RequestError>)]) -> Duration,
        answer: &mut impl FnMut(usize, &Read) -> Result<Answer, RequestError>,
    ) -> Ran {
        let mut out = Vec::new();
        let mut polls = Vec::new();
        let mut sent = Vec::new();
        let mut requests = 0;
        e.begin_cycle(at);
        while let Some(first) = e.next_poll(at) {
            let di = first.device;
            let mut results = Vec::new();
            let mut steps = Vec::new();
            let mut next = Some(first);
            while let Some(p) = next {
                assert_eq!(p.device, di);
                let from = results.len();
                requests += p.reads.len();
                let mut failed: Option<RequestError> = None;
                for read in p.reads.iter().cloned() {
                    let r = match &failed {
                        Some(err) => Err(err.clone()),
                        None => {
                            let r = answer(di, &read);
                            sent.push((di, r.clone()));
                            r
                        }
                    };
                    if let Err(err) = &r {
                        failed = Some(err.clone());
                    }
                    results.push((read, r));
                }
                steps.push(p);
                next = e.next_reads(&results[from..]);
            }
            for (read, r) in results {
                e.apply_read(di, &read, r, at, TS, &mut out);
            }
            e.end_poll(di, TS, &mut out);
            polls.push(Polled { device: di, steps });
        }
        e.batches(TS, &mut out);
        let end = e.end_cycle(at + took(&sent), requests);
        Ran {
            at: (at - t0).as_millis() as u64,
            polls,
            requests,
            out: decode(e, out),
            end,
        }
    }

    /// Drives the engine from `t0` until `until` (ms), as the run loop does with no write
    /// waiting: sleep until something is due, run the cycle, repeat.
    fn drive(
        e: &mut Engine,
        t0: Instant,
        until: u64,
        mut answer: impl FnMut(usize, &Read) -> Result<Answer, RequestError>,
    ) -> Vec<Ran> {
        let mut now = t0;
        let mut ran = Vec::new();
        loop {
            match e.next_action(now, false) {
                Action::Wait(t) => now = t,
                Action::Poll => {
                    if now > t0 + ms(until) {
                        return ran;
                    }
                    // Cycles take no time here.
                    ran.push(cycle(e, t0, now, &mut instant, &mut answer));
                }
                Action::Write => unreachable!("no write waits"),
            }
        }
    }

    fn instant(_: &[(usize, Result<Answer, RequestError>)]) -> Duration {
        Duration::ZERO
    }

    /// The starts of every read handed out for the device, in order.
    fn starts(p: &Polled) -> Vec<u16> {
        p.steps
            .iter()
            .flat_map(|s| &s.reads)
            .map(|r| r.start)
            .collect()
    }

    type Counters = prometheus_client::metrics::family::Family<
        Vec<(String, String)>,
        prometheus_client::metrics::counter::Counter,
    >;

    fn count(f: &Counters, l: &[(&str, &str)]) -> u64 {
        f.get_or_create(&labels(l)).get()
    }

    /// A device and the starts of its reads.
    type DeviceStarts = (usize, Vec<u16>);

    #[test]
    fn polls_follow_every_groups_interval_device_by_device() {
        let t0 = Instant::now();
        let slow = TagConfig {
            poll_interval: Some(ms(300)),
            ..tag("slow", 5)
        };
        let devs = [
            dev("a", 100, vec![tag("x", 0), slow]),
            dev("b", 200, vec![tag("z", 0)]),
        ];
        let mut e = engine(&devs, t0);
        let ran = drive(&mut e, t0, 600, |_, r| echo(r));
        let got: Vec<(u64, Vec<DeviceStarts>)> = ran
            .iter()
            .map(|r| {
                (
                    r.at,
                    r.polls.iter().map(|p| (p.device, starts(p))).collect(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (0, vec![(0, vec![0, 5]), (1, vec![0])]),
                (100, vec![(0, vec![0])]),
                (200, vec![(0, vec![0]), (1, vec![0])]),
                (300, vec![(0, vec![0, 5])]),
                (400, vec![(0, vec![0]), (1, vec![0])]),
                (500, vec![(0, vec![0])]),
                (600, vec![(0, vec![0, 5]), (1, vec![0])]),
            ]
        );
        // Readings go out per tag, in read order, after which the status follows once.
        let first = &ran[0];
        let topics: Vec<&str> = first.out.iter().map(|(t, _, _)| t.as_str()).collect();
        assert_eq!(
            topics,
            [
                "field/a/x",
                "field/a/slow",
                "field/a/status",
                "field/b/z",
                "field/b/status"
            ]
        );
        assert_eq!(first.on("field/a/slow")[0]["value"], 5);
        assert_eq!(
            first.on("field/a/status")[0],
            &json!({"state":"online","ts":TS})
        );
        assert!(ran[1..].iter().all(|r| r.on("field/a/status").is_empty()));
        assert!(ran.iter().all(|r| !r.end.overran));
    }

    #[test]
    fn an_overrun_is_counted_its_missed_slots_skipped_and_logged_once_a_minute() {
        let t0 = Instant::now();
        let mut e = engine(&[dev("a", 100, vec![tag("x", 0)])], t0);
        let took = |d: u64| move |_: &[(usize, Result<Answer, RequestError>)]| ms(d);
        let r = cycle(&mut e, t0, t0, &mut took(350), &mut |_, r| echo(r));
        assert_eq!(
            r.end,
            CycleEnd {
                overran: true,
                logged: true
            }
        );
        // Slots 100, 200 and 300 passed during the cycle: skipped, not run in a burst.
        assert_eq!(
            e.next_action(t0 + ms(350), false),
            Action::Wait(t0 + ms(400))
        );
        let r = cycle(&mut e, t0, t0 + ms(400), &mut took(10), &mut |_, r| echo(r));
        assert_eq!(r.end, CycleEnd::default());
        assert_eq!(e.next_due(t0), t0 + ms(500));
        // A slot that ends exactly on the next one is an overrun too.
        let r = cycle(&mut e, t0, t0 + ms(500), &mut took(100), &mut |_, r| {
            echo(r)
        });
        assert_eq!(
            r.end,
            CycleEnd {
                overran: true,
                logged: false
            }
        );
        assert_eq!(e.next_due(t0), t0 + ms(700));
        let bus = [("bus", "bus")];
        assert_eq!(count(&e.metrics.overruns, &bus), 2);
        assert_eq!(count(&e.metrics.cycles, &bus), 3);
        // A minute after the last warning, the next overrun is logged again (with the count).
        let later = t0 + ms(350) + OVERRUN_LOG_EVERY;
        e.begin_cycle(later);
        assert!(e.next_poll(later).is_some());
        assert!(e.next_poll(later).is_none());
        let end = e.end_cycle(later + ms(150), 1);
        assert!(end.overran && end.logged, "{end:?}");
        assert_eq!(e.overruns_unlogged, 0);
    }

    #[test]
    fn a_waiting_write_goes_before_an_overdue_poll_and_its_tag_is_read_back() {
        let t0 = Instant::now();
        let sp = TagConfig {
            writable: true,
            ..tag("sp", 3)
        };
        let other = TagConfig {
            poll_interval: Some(ms(7_200_000)),
            ..tag("other", 0)
        };
        let mut e = engine(&[dev("d", 3_600_000, vec![sp, other])], t0);
        let mut out = Vec::new();
        let r = cycle(&mut e, t0, t0, &mut instant, &mut |_, r| echo(r));
        assert_eq!(starts(&r.polls[0]), vec![0, 3]);
        let now = t0 + ms(600_000);
        assert_eq!(e.next_action(now, false), Action::Wait(t0 + ms(3_600_000)));
        // A write waits while a poll is overdue: the write goes first.
        let late = t0 + ms(3_700_000);
        assert_eq!(e.next_action(late, false), Action::Poll);
        assert_eq!(e.next_action(late, true), Action::Write);
        // Before the poll is due: written, answered, and the tag's group (only) due now.
        let txn = e.begin_write(
            "cmd/field/d/sp/set",
            br#"{"value":7,"id":"w1"}"#,
            now,
            &mut out,
        );
        assert_eq!(
            txn,
            Some(Txn {
                device: 0,
                req: Request::WriteSingleRegister(3, 7)
            })
        );
        assert!(out.is_empty(), "answered only once the device answered");
        let ack = Ok(Answer::Data(Response::WriteSingleRegister(3, 7)));
        assert_eq!(e.write_answered(ack, now, &mut out), None);
        assert_eq!(
            decode(&e, out),
            vec![(
                "field/d/sp/set/result".to_string(),
                false,
                json!({"ok":true,"id":"w1"})
            )]
        );
        assert_eq!(e.next_action(now, false), Action::Poll);
        let r = cycle(&mut e, t0, now, &mut instant, &mut |_, r| echo(r));
        assert_eq!(starts(&r.polls[0]), vec![3], "read back, nothing else");
        // The group's schedule goes on from the read-back.
        assert_eq!(e.next_due(now), now + ms(3_600_000));
        let ok = [("device", "d"), ("result", "ok")];
        assert_eq!(count(&e.metrics.writes, &ok), 1);
    }

    #[test]
    fn a_failed_write_is_answered_with_its_error_and_reads_nothing_back() {
        let t0 = Instant::now();
        let sp = TagConfig {
            writable: true,
            ..tag("sp", 3)
        };
        let mut e = engine(&[dev("d", 60_000, vec![sp])], t0);
        let _ = cycle(&mut e, t0, t0, &mut instant, &mut |_, r| echo(r));
        let mut out = Vec::new();
        let now = t0 + ms(10);
        assert!(e
            .begin_write("field/d/sp/set", b"7", now, &mut out)
            .is_some());
        assert_eq!(e.write_answered(timeout(), now, &mut out), None);
        let got = decode(&e, out);
        assert_eq!(got[0].2["code"], "timeout");
        assert_eq!(got[0].2["ok"], false);
        assert_eq!(e.next_action(now, false), Action::Wait(t0 + ms(60_000)));
    }

    #[test]
    fn a_bit_is_written_by_reading_its_register_and_writing_it_back() {
        let t0 = Instant::now();
        let flag = TagConfig {
            writable: true,
            data_type: Some(codec::DataType::Bit),
            bit: Some(4),
            ..tag("flag", 9)
        };
        let mut e = engine(&[dev("d", 1000, vec![flag])], t0);
        let mut out = Vec::new();
        let read = e.begin_write("field/d/flag/set", b"true", t0, &mut out);
        assert_eq!(
            read.map(|t| t.req),
            Some(Request::ReadHoldingRegisters(9, 1))
        );
        let current = Ok(Answer::Data(Response::ReadHoldingRegisters(vec![0b1])));
        let write = e.write_answered(current, t0, &mut out);
        assert_eq!(
            write.map(|t| t.req),
            Some(Request::WriteSingleRegister(9, 0b1_0001))
        );
        assert!(out.is_empty());
        let ack = Ok(Answer::Data(Response::WriteSingleRegister(9, 0b1_0001)));
        assert_eq!(e.write_answered(ack, t0, &mut out), None);
        assert_eq!(decode(&e, out)[0].2, json!({"ok":true}));
        // Clearing; the read answered with an exception ends the write there.
        let mut out = Vec::new();
        assert!(e
            .begin_write("field/d/flag/set", b"false", t0, &mut out)
            .is_some());
        assert_eq!(e.write_answered(exception(), t0, &mut out), None);
        let got = decode(&e, out);
        assert_eq!(got[0].2["code"], "exception");
        assert_eq!(got[0].2["error"], "illegal data address (exception 2)");
        assert_eq!(set_bit(0xffff, 4, false), 0xffef);
        assert_eq!(set_bit(0, 15, true), 0x8000);
    }

    #[test]
    fn refused_writes_are_answered_at_once_without_a_request() {
        let t0 = Instant::now();
        let sp = TagConfig {
            writable: true,
            ..tag("sp", 3)
        };
        let mut e = engine(&[dev("d", 1000, vec![sp, tag("ro", 4)])], t0);
        let mut refused = |topic: &str, payload: &str| {
            let mut out = Vec::new();
            assert!(e
                .begin_write(topic, payload.as_bytes(), t0, &mut out)
                .is_none());
            let got = decode(&e, out);
            assert_eq!(got.len(), 1, "{got:?}");
            got.into_iter().next().map(|(t, r, j)| {
                assert!(!r);
                (t, j["code"].clone(), j["id"].clone())
            })
        };
        assert_eq!(
            refused("cmd/field/d/nope/set", r#"{"value":1,"id":5}"#),
            Some((
                "field/d/nope/set/result".into(),
                json!("unknown_tag"),
                json!(5)
            ))
        );
        assert_eq!(
            refused("field/d/ro/set", r#"{"value":1,"id":"r"}"#),
            Some((
                "field/d/ro/set/result".into(),
                json!("read_only"),
                json!("r")
            ))
        );
        assert_eq!(
            refused("field/d/sp/set", r#"{"id":"x"}"#).map(|r| (r.1, r.2)),
            Some((json!("bad_request"), json!("x")))
        );
        assert_eq!(
            refused("field/d/sp/set", "70000").map(|r| r.1),
            Some(json!("out_of_range"))
        );
        // Refusals of a known tag are counted; the unknown tag is not a write.
        let error = [("device", "d"), ("result", "error")];
        assert_eq!(count(&e.metrics.writes, &error), 3);
    }

    #[test]
    fn status_goes_online_degraded_offline_and_back() {
        let t0 = Instant::now();
        let mut d = dev("d", 100, vec![tag("ok", 0), tag("broken", 500)]);
        d.reconnect_min = ms(150);
        d.reconnect_max = ms(150);
        let mut e = engine(&[d], t0);
        let status = |r: &Ran| r.on("field/d/status").first().map(|j| (*j).clone());
        let online = |e: &Engine| {
            e.metrics
                .online
                .get_or_create(&labels(&[("device", "d")]))
                .get()
        };
        assert_eq!(online(&e), 0);
        let at =
            |e: &mut Engine, ms_: u64, f: &mut dyn FnMut(&Read) -> Result<Answer, RequestError>| {
                cycle(e, t0, t0 + ms(ms_), &mut instant, &mut |_, r| f(r))
            };
        // The device answers, one tag with an exception: degraded, naming it.
        let r = at(&mut e, 0, &mut |r| {
            if r.start == 500 {
                exception()
            } else {
                echo(r)
            }
        });
        assert_eq!(
            status(&r),
            Some(
                json!({"state":"degraded","ts":TS,"failing":[{"tag":"broken","quality":"exception","error":"illegal data address (exception 2)"}]})
            )
        );
        assert_eq!(r.on("field/d/broken")[0]["quality"], "exception");
        assert_eq!(online(&e), 1);
        // The same again: the status is not published again.
        let r = at(&mut e, 100, &mut |r| {
            if r.start == 500 {
                exception()
            } else {
                echo(r)
            }
        });
        assert_eq!(status(&r), None);
        // The tag reads again: online, nothing failing.
        let r = at(&mut e, 200, &mut echo);
        assert_eq!(status(&r), Some(json!({"state":"online","ts":TS})));
        // No answer: offline with the reason and the read, every tag with its quality.
        let r = at(&mut e, 300, &mut |_| timeout());
        assert_eq!(
            status(&r),
            Some(
                json!({"state":"offline","ts":TS,"kind":"timeout","error":"no answer within 300ms (reading holding_register 0..1)"})
            )
        );
        assert_eq!(r.on("field/d/ok")[0]["quality"], "timeout");
        assert_eq!(r.on("field/d/broken")[0]["quality"], "timeout");
        assert_eq!(online(&e), 0);
        // Re-probed after the backoff with the first read only. A garbled answer keeps it
        // offline; the status keeps the reason the episode began with, the probed tag shows
        // the new quality.
        let r = at(&mut e, 400, &mut echo);
        assert!(r.polls.is_empty(), "in backoff until 450");
        let r = at(&mut e, 500, &mut |_| {
            Err(RequestError::BadFrame("crc".into()))
        });
        assert_eq!(r.polls[0].probe().map(|p| p.start), Some(0));
        assert_eq!(r.requests, 1);
        assert_eq!(status(&r), None);
        assert_eq!(r.on("field/d/ok")[0]["quality"], "bad_frame");
        assert!(
            r.on("field/d/broken").is_empty(),
            "not read: the probe failed"
        );
        // Answers again: online.
        let r = at(&mut e, 700, &mut echo);
        assert_eq!(status(&r), Some(json!({"state":"online","ts":TS})));
        assert_eq!(r.on("field/d/ok")[0]["quality"], "good");
        assert_eq!(online(&e), 1);
    }

    #[test]
    fn a_non_finite_reading_degrades_an_answering_device() {
        let t0 = Instant::now();
        let f = TagConfig {
            data_type: Some(codec::DataType::F32),
            ..tag("f", 0)
        };
        let mut e = engine(&[dev("d", 100, vec![f])], t0);
        let nan = f32::NAN.to_bits();
        let words = vec![(nan >> 16) as u16, nan as u16];
        let r = cycle(&mut e, t0, t0, &mut instant, &mut |_, _| {
            Ok(Answer::Data(Response::ReadHoldingRegisters(words.clone())))
        });
        assert_eq!(r.on("field/d/f")[0]["quality"], "invalid");
        let st = r.on("field/d/status")[0];
        assert_eq!(st["state"], "degraded", "{st}");
        assert_eq!(st["failing"][0]["quality"], "invalid");
    }

    #[test]
    fn a_bad_reading_repeats_once_per_bad_repeat_and_never_when_retained() {
        for retain in [false, true] {
            let t0 = Instant::now();
            let mut d = dev("d", 100, vec![tag("good", 0), tag("broken", 500)]);
            d.bad_repeat = ms(200);
            d.retain = retain;
            let mut e = engine(&[d], t0);
            let ran = drive(&mut e, t0, 500, |_, r| {
                if r.start == 500 {
                    exception()
                } else {
                    echo(r)
                }
            });
            let when = |topic: &str| -> Vec<u64> {
                ran.iter()
                    .filter(|r| !r.on(topic).is_empty())
                    .map(|r| r.at)
                    .collect()
            };
            assert_eq!(when("field/d/good"), [0, 100, 200, 300, 400, 500]);
            if retain {
                assert_eq!(when("field/d/broken"), [0], "retained: published once");
            } else {
                assert_eq!(when("field/d/broken"), [0, 200, 400]);
            }
            assert_eq!(when("field/d/status"), [0]);
            assert!(ran
                .iter()
                .flat_map(|r| &r.out)
                .all(|(t, r, _)| *r == retain || t == "field/d/status"));
        }
    }

    #[test]
    fn a_dead_device_backs_off_doubling_is_reprobed_with_one_read_and_recovers() {
        let t0 = Instant::now();
        let mut d = dev("d", 50, vec![tag("a", 0), tag("b", 10)]);
        d.reconnect_min = ms(100);
        d.reconnect_max = ms(400);
        let mut e = engine(&[d], t0);
        let mut sent_at = Vec::new();
        let run = |e: &mut Engine, upto: u64, alive: bool| {
            drive(
                e,
                t0,
                upto,
                move |_, r| if alive { echo(r) } else { timeout() },
            )
        };
        // Dies at once: both reads tried at 0 (the second fails like the first without
        // moving the re-probe further out), then one probe per backoff: 100, 300, 700, 1100.
        let ran = run(&mut e, 1199, false);
        for r in &ran {
            if let Some(p) = r.polled(0) {
                sent_at.push((r.at, p.probe().is_some(), r.requests));
            }
        }
        assert_eq!(
            sent_at,
            vec![
                (0, false, 2),
                (100, true, 1),
                (300, true, 1),
                (700, true, 1),
                (1100, true, 1)
            ]
        );
        // The schedule itself goes on: every slot is a cycle, most of them send nothing.
        assert_eq!(ran.len(), 24);
        // Comes back: the probe at 1500 answers and the rest of the reads follow at once.
        let ran = run(&mut e, 1500, true);
        let back: Vec<&Ran> = ran.iter().filter(|r| !r.polls.is_empty()).collect();
        assert_eq!(back.len(), 1, "{back:?}");
        let p = &back[0].polls[0];
        assert_eq!(
            (back[0].at, p.probe().map(|r| r.start), starts(p)),
            (1500, Some(0), vec![0, 10])
        );
        assert_eq!(back[0].requests, 2);
        assert_eq!(back[0].on("field/d/status")[0]["state"], "online");
        // An answer resets the backoff: the next failure waits reconnect_min again.
        let ran = run(&mut e, 1550, false);
        assert_eq!(ran.last().map(|r| r.at), Some(1550));
        let ran = run(&mut e, 1700, false);
        let probes: Vec<u64> = ran
            .iter()
            .filter(|r| !r.polls.is_empty())
            .map(|r| r.at)
            .collect();
        assert_eq!(probes, [1650]);
    }

    #[test]
    fn a_reprobe_goes_alone_and_the_other_reads_follow_only_once_it_is_answered() {
        let t0 = Instant::now();
        let mut d = dev("d", 100, vec![tag("a", 0), tag("b", 10), tag("c", 20)]);
        d.retries = 2;
        d.reconnect_min = ms(100);
        d.reconnect_max = ms(100);
        let starts = |p: &Poll| -> Vec<u16> { p.reads.iter().map(|r| r.start).collect() };
        type Answering = fn(&Read) -> Result<Answer, RequestError>;
        let answers: [(&str, Answering, bool); 4] = [
            ("timeout", |_| timeout(), false),
            (
                "bad frame",
                |_| Err(RequestError::BadFrame("crc".into())),
                false,
            ),
            ("exception", |_| exception(), true),
            ("data", echo, true),
        ];
        for (what, answer, answered) in answers {
            let mut e = engine(&[d.clone()], t0);
            let r = cycle(&mut e, t0, t0, &mut instant, &mut |_, _| timeout());
            assert_eq!(r.on("field/d/status")[0]["state"], "offline");
            // Due for its re-probe: one read, tried once, and nothing else yet.
            let at = t0 + ms(100);
            e.begin_cycle(at);
            let probe = e.next_poll(at).expect("due for its re-probe");
            assert_eq!(
                (probe.probe, starts(&probe), probe.attempts),
                (true, vec![0], PROBE_ATTEMPTS),
                "{what}"
            );
            let outcome = vec![(probe.reads[0].clone(), answer(&probe.reads[0]))];
            let rest = e.next_reads(&outcome);
            if answered {
                // The device is back: the other reads of the poll, with their retries.
                let rest = rest.unwrap_or_else(|| panic!("{what}: the other reads held back"));
                assert_eq!(
                    (rest.device, rest.probe, starts(&rest), rest.attempts),
                    (0, false, vec![10, 20], 3),
                    "{what}"
                );
                let outcomes: Vec<_> = rest.reads.iter().map(|r| (r.clone(), echo(r))).collect();
                assert_eq!(
                    e.next_reads(&outcomes),
                    None,
                    "{what}: the poll is complete"
                );
            } else {
                assert_eq!(rest, None, "{what}: the other reads are not sent");
            }
            assert_eq!(e.next_poll(at), None, "{what}");
        }
    }

    #[test]
    fn a_dead_device_does_not_starve_the_others() {
        let t0 = Instant::now();
        let mut dead = dev("dead", 100, vec![tag("x", 0)]);
        dead.reconnect_min = ms(1000);
        dead.reconnect_max = ms(4000);
        let alive = dev("alive", 100, vec![tag("y", 0)]);
        let mut e = engine(&[dead, alive], t0);
        // A timeout costs 300 ms of the line, an answer 10 ms.
        let cost = |sent: &[(usize, Result<Answer, RequestError>)]| {
            sent.iter()
                .map(|(_, r)| if r.is_err() { ms(300) } else { ms(10) })
                .sum::<Duration>()
        };
        let mut costs = Vec::new();
        let ran = {
            let mut now = t0;
            let mut ran = Vec::new();
            while now <= t0 + ms(10_000) {
                match e.next_action(now, false) {
                    Action::Wait(t) => now = t,
                    Action::Write => unreachable!(),
                    Action::Poll => {
                        let mut took = |s: &[(usize, Result<Answer, RequestError>)]| {
                            let c = cost(s);
                            costs.push(c);
                            c
                        };
                        let r = cycle(&mut e, t0, now, &mut took, &mut |d, r| {
                            if d == 0 {
                                timeout()
                            } else {
                                echo(r)
                            }
                        });
                        now += *costs.last().unwrap_or(&Duration::ZERO);
                        ran.push(r);
                    }
                }
            }
            ran
        };
        // Every cycle polls the live device and publishes its reading.
        assert!(ran.iter().all(|r| r.polled(1).is_some()));
        assert!(ran.iter().all(|r| r.on("field/alive/y").len() == 1));
        assert!(ran.len() > 80, "{}", ran.len());
        // The dead one costs the line one request per backoff period: 0, 1 s, 3 s, 7 s.
        let dead_at: Vec<u64> = ran
            .iter()
            .filter(|r| r.polled(0).is_some())
            .map(|r| r.at)
            .collect();
        assert_eq!(dead_at, [0, 1000, 3000, 7000]);
        // Each of those cycles overran (300 ms > 100 ms); the others did not.
        let overran: Vec<u64> = ran.iter().filter(|r| r.end.overran).map(|r| r.at).collect();
        assert_eq!(overran, dead_at);
        assert_eq!(
            ran.iter()
                .filter(|r| r.at > 0)
                .find(|r| r.end.overran)
                .map(|r| r.end.logged),
            Some(false),
            "logged at most once a minute"
        );
    }

    #[test]
    fn batch_mode_keeps_readings_for_one_message_per_interval() {
        let t0 = Instant::now();
        let mut d = dev("d", 100, vec![tag("a", 0), tag("b", 1)]);
        d.publish = PublishMode::Batch;
        d.publish_interval = Some(ms(250));
        let mut e = engine(&[d], t0);
        let mut n = 0u16;
        let ran = drive(&mut e, t0, 600, |_, r| {
            n += 1;
            Ok(Answer::Data(Response::ReadHoldingRegisters(
                vec![n; usize::from(r.count)],
            )))
        });
        assert!(ran
            .iter()
            .all(|r| r.on("field/d/a").is_empty() && r.on("field/d/b").is_empty()));
        let batches: Vec<(u64, Json)> = ran
            .iter()
            .flat_map(|r| r.on("field/d/batch").into_iter().map(|j| (r.at, j.clone())))
            .collect();
        // Due at 0, 250 and 500: with the polls at 0 and 500 (after them, carrying their
        // readings), at 250 on a wake-up of its own.
        let at: Vec<u64> = batches.iter().map(|(t, _)| *t).collect();
        assert_eq!(at, [0, 250, 500]);
        assert_eq!(
            batches[0].1,
            json!({"ts":TS,"values":{"a":1,"b":1},"quality":{"a":"good","b":"good"}})
        );
        assert_eq!(
            batches[2].1["values"]["a"], 6,
            "the reading of the cycle at 500"
        );
        // The batch-only wake-up at 250 is not a poll cycle.
        let cycles = count(&e.metrics.cycles, &[("bus", "bus")]);
        assert_eq!(cycles, 7);
        assert_eq!(
            ran.iter().find(|r| r.at == 250).map(|r| r.polls.len()),
            Some(0)
        );
        assert_eq!(ran[0].on("field/d/status").len(), 1);
    }

    #[test]
    fn reads_are_spread_round_robin_over_the_lanes() {
        let read = |start| Read {
            kind: crate::sources::modbus::config::RegisterKind::HoldingRegister,
            start,
            count: 1,
            tags: vec![],
        };
        let reads: Vec<Read> = (0..5).map(read).collect();
        let s = |lanes| -> Vec<Vec<u16>> {
            spread(reads.clone(), lanes)
                .iter()
                .map(|l| l.iter().map(|r| r.start).collect())
                .collect()
        };
        assert_eq!(s(2), vec![vec![0, 2, 4], vec![1, 3]]);
        assert_eq!(s(8).len(), 5);
        assert_eq!(s(0), vec![vec![0, 1, 2, 3, 4]]);
        assert_eq!(spread(Vec::new(), 3), vec![Vec::<Read>::new()]);
    }

    #[test]
    fn stopping_publishes_every_device_offline_retained() {
        let t0 = Instant::now();
        let e = engine(
            &[
                dev("a", 100, vec![tag("x", 0)]),
                dev("b", 100, vec![tag("y", 0)]),
            ],
            t0,
        );
        let mut out = Vec::new();
        e.stopping(TS, &mut out);
        let got = decode(&e, out);
        let st = json!({"state":"offline","ts":TS,"error":"gateway stopping","kind":"stopped"});
        assert_eq!(
            got,
            vec![
                ("field/a/status".to_string(), true, st.clone()),
                ("field/b/status".to_string(), true, st)
            ]
        );
    }
}
