//! One bus task: owns a Modbus line (a serial port with its RTU units, the RTU units behind
//! one serial-to-Ethernet converter reached over TCP, or one TCP device),
//! polls its tags on schedule, executes writes, and publishes readings and device status.
//!
//! Invariants:
//! - one task owns the line: every request to every unit on it (polls and writes) goes
//!   through [`Bus::run`], one at a time on RTU, at most `max_in_flight` at a time on TCP
//!   (one connection per request in flight, since a Modbus TCP context is sequential);
//! - every request is bounded by the device's `timeout`; after a timeout or a bad frame the
//!   client context is dropped and rebuilt, so a late answer can never be taken for the next
//!   request's. On RTU the port itself stays open (a blocking handle keeps it) and the new
//!   context starts on an emptied input buffer after one inter-frame gap of silence; on RTU
//!   over TCP the connection to the converter is closed and opened again, which discards
//!   whatever was still in flight;
//! - RTU: at least the inter-frame gap passes between an answer and the next request, plus
//!   the device's `request_delay` (RTU over TCP: only an `inter_frame_gap` that is set, the
//!   converter keeps the line's timing);
//! - a device that fails (timeout, I/O, connect, bad frame after retries) goes offline and is
//!   re-probed with one request after a backoff (`reconnect_min` doubling to
//!   `reconnect_max`); meanwhile its polls are skipped, so a dead unit costs its bus one
//!   request per backoff period and never stops the other units;
//! - a poll cycle that ends after its next one was due is an overrun: counted, logged (at most
//!   once a minute per bus), and the missed slots are skipped, not queued up.
//! - `publish = "batch"`: a device's readings are kept (the latest per tag, any quality),
//!   never published per tag; its batch is published every `publish_interval`, after the
//!   polls of the cycle it falls in, on its own schedule next to the poll groups' (a missed
//!   batch slot is skipped like a missed poll). Failing tags, the status and writes work as
//!   in per-tag mode.
//!
//! Device state: `Unknown -> Online | Offline`, `Online <-> Offline`. An exception answer
//! keeps a device online (it answered). The retained status is derived from the state and
//! the device's failing tags (exception, undecodable or non-finite readings while it
//! answers): `online`, `degraded` (with each failing tag and its last error) or `offline`.
//! It is published at the end of a poll of the device whenever it differs from what was
//! published last, so a tag that fails from the first poll is visible to any later
//! subscriber.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tokio::sync::mpsc;
use tokio_modbus::client::{Client, Context};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{ExceptionCode, Request, Response, Slave};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::codec::{self, Encoded, Format, Value};
use super::config::{ModbusDeviceConfig, Parity, PublishMode, RegisterKind, TagConfig, Transport};
use super::plan::{self, Limits, Read, Span};
use super::publish::{self, Failing, Quality, Status};
use crate::metrics::Metrics;
use crate::sources::{Inbound, LocalRx, LocalTx};

/// Why one request got no usable answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// No answer within the timeout. The context was rebuilt; the device is marked offline
    /// when retries are used up.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// A corrupt, short or mismatched answer (CRC, framing, wrong unit or function). The
    /// context was rebuilt; retried like a timeout.
    #[error("bad frame: {0}")]
    BadFrame(String),
    /// The connection or port failed mid-request. It is reopened on the next request.
    #[error("i/o error: {0}")]
    Io(String),
    /// The TCP connection or the serial port could not be opened. Retried after a backoff.
    #[error("cannot connect: {0}")]
    Connect(String),
}

impl RequestError {
    /// Metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            RequestError::Timeout(_) => "timeout",
            RequestError::BadFrame(_) => "bad_frame",
            RequestError::Io(_) => "io",
            RequestError::Connect(_) => "connect",
        }
    }

    fn quality(&self) -> Quality {
        match self {
            RequestError::Timeout(_) => Quality::Timeout,
            RequestError::BadFrame(_) => Quality::BadFrame,
            RequestError::Io(_) | RequestError::Connect(_) => Quality::Offline,
        }
    }
}

/// A device's answer.
#[derive(Debug, Clone)]
pub enum Answer {
    /// Data (or a write acknowledgement).
    Data(Response),
    /// A Modbus exception.
    Exception(ExceptionCode),
}

/// How to open the line.
#[derive(Debug, Clone, PartialEq)]
pub enum Endpoint {
    /// `host:port`.
    Tcp(String),
    /// `host:port` of a serial-to-Ethernet converter that passes RTU frames through.
    RtuOverTcp(String),
    /// A serial port and its line settings.
    Rtu {
        /// Port path.
        path: String,
        /// Baud rate.
        baud: u32,
        /// Parity.
        parity: Parity,
        /// Data bits.
        data_bits: u8,
        /// Stop bits.
        stop_bits: u8,
    },
}

impl Endpoint {
    /// The endpoint of a device's config.
    pub fn of(d: &ModbusDeviceConfig) -> Endpoint {
        match d.transport {
            Transport::Tcp => Endpoint::Tcp(d.host.clone()),
            Transport::RtuOverTcp => Endpoint::RtuOverTcp(d.host.clone()),
            Transport::Rtu => Endpoint::Rtu {
                path: d.serial_port.clone(),
                baud: d.baud,
                parity: d.parity,
                data_bits: d.data_bits,
                stop_bits: d.stop_bits,
            },
        }
    }

    /// RTU framing: one transaction at a time, paced by the inter-frame gap.
    fn is_rtu(&self) -> bool {
        matches!(self, Endpoint::Rtu { .. } | Endpoint::RtuOverTcp(_))
    }
}

/// Per-request settings of one unit.
#[derive(Debug, Clone)]
pub struct Unit {
    /// Device name (metric label).
    pub name: String,
    /// Unit id.
    pub id: u8,
    /// Bound of every request.
    pub timeout: Duration,
    /// Further attempts of reads.
    pub retries: u32,
    /// Pause before each request.
    pub request_delay: Duration,
    /// RTU inter-frame gap.
    pub gap: Duration,
}

/// One connection (one request at a time).
#[derive(Default)]
pub struct Lane {
    ctx: Option<Context>,
    /// RTU: a blocking handle that keeps the port open while contexts come and go.
    keeper: Option<serialport::TTYPort>,
    /// End of the last exchange on this lane (RTU pacing).
    last_end: Option<Instant>,
}

impl Lane {
    async fn connect(&mut self, ep: &Endpoint, unit: &Unit) -> Result<(), RequestError> {
        let ctx = match ep {
            Endpoint::Tcp(host) | Endpoint::RtuOverTcp(host) => {
                let s = tokio::time::timeout(
                    unit.timeout,
                    tokio::net::TcpStream::connect(host.as_str()),
                )
                .await
                .map_err(|_| {
                    RequestError::Connect(format!(
                        "{host}: no connection within {:?}",
                        unit.timeout
                    ))
                })?
                .map_err(|e| RequestError::Connect(format!("{host}: {e}")))?;
                let _ = s.set_nodelay(true);
                if matches!(ep, Endpoint::RtuOverTcp(_)) {
                    // RTU frames (unit, PDU, CRC) on the TCP stream, no MBAP header.
                    tokio_modbus::client::rtu::attach_slave(s, Slave(unit.id))
                } else {
                    tokio_modbus::client::tcp::attach_slave(s, Slave(unit.id))
                }
            }
            Endpoint::Rtu {
                path,
                baud,
                parity,
                data_bits,
                stop_bits,
            } => {
                if self.keeper.is_none() {
                    let b = tokio_serial::new(path, *baud)
                        .parity(match parity {
                            Parity::None => tokio_serial::Parity::None,
                            Parity::Even => tokio_serial::Parity::Even,
                            Parity::Odd => tokio_serial::Parity::Odd,
                        })
                        .data_bits(match data_bits {
                            5 => tokio_serial::DataBits::Five,
                            6 => tokio_serial::DataBits::Six,
                            7 => tokio_serial::DataBits::Seven,
                            _ => tokio_serial::DataBits::Eight,
                        })
                        .stop_bits(if *stop_bits == 2 {
                            tokio_serial::StopBits::Two
                        } else {
                            tokio_serial::StopBits::One
                        });
                    self.keeper = Some(
                        b.open_native()
                            .map_err(|e| RequestError::Connect(format!("{path}: {e}")))?,
                    );
                }
                let Some(keeper) = &self.keeper else {
                    return Err(RequestError::Connect(format!("{path}: not open")));
                };
                let port = keeper
                    .try_clone_native()
                    .map_err(|e| RequestError::Connect(format!("{path}: {e}")))?;
                use serialport::SerialPort as _;
                // Whatever arrived since the last context (a late answer) is not an answer to
                // the next request.
                let _ = port.clear(serialport::ClearBuffer::All);
                let stream = tokio_serial::SerialStream::try_from(port)
                    .map_err(|e| RequestError::Connect(format!("{path}: {e}")))?;
                tokio_modbus::client::rtu::attach_slave(stream, Slave(unit.id))
            }
        };
        self.ctx = Some(ctx);
        Ok(())
    }

    /// Drops the context (and on an I/O error, the port too).
    fn reset(&mut self, io_failed: bool) {
        self.ctx = None;
        if io_failed {
            self.keeper = None;
        }
    }

    /// One request, with up to `attempts` tries, every try bounded by the unit's timeout.
    pub async fn request(
        &mut self,
        ep: &Endpoint,
        unit: &Unit,
        req: &Request<'static>,
        attempts: u32,
        metrics: &Metrics,
    ) -> Result<Answer, RequestError> {
        let mut last = RequestError::Timeout(unit.timeout);
        for _ in 0..attempts.max(1) {
            if !unit.request_delay.is_zero() {
                tokio::time::sleep(unit.request_delay).await;
            }
            if ep.is_rtu() {
                if let Some(end) = self.last_end {
                    tokio::time::sleep_until((end + unit.gap).into()).await;
                }
            }
            if self.ctx.is_none() {
                if let Err(e) = self.connect(ep, unit).await {
                    count_error(metrics, &unit.name, e.kind());
                    self.reset(true);
                    return Err(e);
                }
            }
            let Some(ctx) = self.ctx.as_mut() else {
                return Err(RequestError::Connect("no context".into()));
            };
            ctx.set_slave(Slave(unit.id));
            let t0 = Instant::now();
            let r = tokio::time::timeout(unit.timeout, ctx.call(req.clone())).await;
            let now = Instant::now();
            self.last_end = Some(now);
            let err = match r {
                Ok(Ok(Ok(resp))) => {
                    observe_rtt(metrics, &unit.name, now - t0);
                    return match check_response(req, resp) {
                        Ok(resp) => Ok(Answer::Data(resp)),
                        Err(e) => {
                            count_error(metrics, &unit.name, "bad_frame");
                            self.reset(false);
                            Err(e)
                        }
                    };
                }
                Ok(Ok(Err(code))) => {
                    observe_rtt(metrics, &unit.name, now - t0);
                    count_error(metrics, &unit.name, "exception");
                    return Ok(Answer::Exception(code));
                }
                Ok(Err(tokio_modbus::Error::Protocol(e))) => RequestError::BadFrame(e.to_string()),
                Ok(Err(tokio_modbus::Error::Transport(e)))
                    if e.kind() == std::io::ErrorKind::InvalidData =>
                {
                    RequestError::BadFrame(e.to_string())
                }
                Ok(Err(tokio_modbus::Error::Transport(e))) => RequestError::Io(e.to_string()),
                Err(_) => RequestError::Timeout(unit.timeout),
            };
            count_error(metrics, &unit.name, err.kind());
            debug!(device = %unit.name, error = %err, "request failed; rebuilding the context");
            self.reset(matches!(err, RequestError::Io(_)));
            last = err;
        }
        Err(last)
    }
}

/// Checks that an answer has what the request asked for (a short answer is a bad frame,
/// never a panic or a silently shorter value).
fn check_response(req: &Request<'static>, resp: Response) -> Result<Response, RequestError> {
    let ok = match (req, &resp) {
        (Request::ReadCoils(_, n), Response::ReadCoils(v))
        | (Request::ReadDiscreteInputs(_, n), Response::ReadDiscreteInputs(v)) => {
            v.len() >= usize::from(*n)
        }
        (Request::ReadHoldingRegisters(_, n), Response::ReadHoldingRegisters(v))
        | (Request::ReadInputRegisters(_, n), Response::ReadInputRegisters(v)) => {
            v.len() == usize::from(*n)
        }
        (Request::WriteSingleCoil(..), Response::WriteSingleCoil(..))
        | (Request::WriteSingleRegister(..), Response::WriteSingleRegister(..))
        | (Request::WriteMultipleRegisters(..), Response::WriteMultipleRegisters(..))
        | (Request::WriteMultipleCoils(..), Response::WriteMultipleCoils(..)) => true,
        _ => false,
    };
    if ok {
        Ok(resp)
    } else {
        Err(RequestError::BadFrame(format!(
            "answer {resp:?} does not match request {req:?}"
        )))
    }
}

fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn count_error(m: &Metrics, device: &str, kind: &str) {
    m.modbus
        .errors
        .get_or_create(&labels(&[("device", device), ("kind", kind)]))
        .inc();
}

fn observe_rtt(m: &Metrics, device: &str, d: Duration) {
    m.modbus
        .rtt
        .get_or_create(&labels(&[("device", device)]))
        .observe(d.as_secs_f64());
}

/// Exception text for payloads: `illegal data address (exception 2)`.
pub fn exception_text(code: ExceptionCode) -> String {
    format!(
        "{} (exception {})",
        code.to_string().to_lowercase(),
        u8::from(code)
    )
}

/// The read request of a planned read.
pub fn read_request(kind: RegisterKind, start: u16, count: u16) -> Request<'static> {
    match kind {
        RegisterKind::Coil => Request::ReadCoils(start, count),
        RegisterKind::DiscreteInput => Request::ReadDiscreteInputs(start, count),
        RegisterKind::InputRegister => Request::ReadInputRegisters(start, count),
        RegisterKind::HoldingRegister => Request::ReadHoldingRegisters(start, count),
    }
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

/// Explicit device state (see the module header).
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

/// A bus ready to run: its devices, its line, and the topics it answers writes on.
pub struct Bus {
    name: String,
    endpoint: Endpoint,
    devices: Vec<Device>,
    lanes: Vec<Lane>,
    metrics: Arc<Metrics>,
    /// Exact set topic -> (device, tag).
    set_topics: HashMap<String, (usize, usize)>,
    /// Filters to subscribe to.
    filters: Vec<String>,
    /// Command prefixes in use (to find a result topic for an unknown tag).
    prefixes: Vec<String>,
    overruns_unlogged: u64,
    last_overrun_log: Option<Instant>,
}

/// Why a bus task stopped early.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The broker link is gone (the gateway is stopping). Nothing to do.
    #[error("broker link closed: {0}")]
    Broker(String),
}

impl Bus {
    /// Builds a bus for `devices` (all on one line: one TCP device, or the RTU units of one
    /// serial port). Configs must have passed [`super::config::validate`].
    pub fn new(
        name: String,
        devices: &[ModbusDeviceConfig],
        gateway_id: &str,
        metrics: Arc<Metrics>,
    ) -> Bus {
        let endpoint = devices
            .first()
            .map(Endpoint::of)
            .unwrap_or(Endpoint::Tcp(String::new()));
        let gap = devices
            .iter()
            .map(|d| match d.transport {
                // The converter paces the serial line; only a configured gap is kept here.
                Transport::RtuOverTcp => d.inter_frame_gap.unwrap_or_default(),
                _ => d.frame_gap(),
            })
            .max()
            .unwrap_or_default();
        let lanes = match endpoint {
            Endpoint::Tcp(_) => devices.first().map(|d| d.max_in_flight).unwrap_or(1),
            Endpoint::Rtu { .. } | Endpoint::RtuOverTcp(_) => 1,
        };
        let now = Instant::now();
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
            let template = d
                .topic
                .replace("{gateway_id}", gateway_id)
                .replace("{device}", &d.name);
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
                .modbus
                .online
                .get_or_create(&labels(&[("device", &d.cfg.name)]))
                .set(0);
            // Materialise every label so a scrape shows zeros, not absence.
            for kind in ["timeout", "exception", "bad_frame", "io", "connect"] {
                metrics
                    .modbus
                    .errors
                    .get_or_create(&labels(&[("device", &d.cfg.name), ("kind", kind)]))
                    .inc_by(0);
            }
        }
        Bus {
            name,
            endpoint,
            devices: devs,
            lanes: (0..lanes.max(1)).map(|_| Lane::default()).collect(),
            metrics,
            set_topics,
            filters,
            prefixes,
            overruns_unlogged: 0,
            last_overrun_log: None,
        }
    }

    /// Bus name (`<device>` for TCP, `rtu:<port>` for a serial line).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Topic filters this bus takes writes on.
    pub fn filters(&self) -> &[String] {
        &self.filters
    }

    /// Runs until `stop` is cancelled or the broker goes away; publishes every device
    /// offline ("gateway stopping") on the way out.
    pub async fn run(mut self, mut tx: LocalTx, rx: LocalRx, stop: CancellationToken) {
        // Commands are read by a forwarder so a long poll cycle never parks the link; the
        // channel holds 64 writes, beyond that the forwarder waits (the broker holds the
        // rest in the link's queue).
        let (cmd_tx, mut cmds) = mpsc::channel::<Inbound>(64);
        let fwd_stop = stop.child_token();
        let forwarder = tokio::spawn(forward(rx, cmd_tx, fwd_stop.clone()));
        info!(bus = %self.name, devices = self.devices.len(), "modbus bus running");
        let result: Result<(), BusError> = async {
            loop {
                let next = self.next_due();
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => return Ok(()),
                    c = cmds.recv() => match c {
                        Some(m) => self.handle_set(&mut tx, m).await?,
                        None => return Ok(()),
                    },
                    _ = tokio::time::sleep_until(next.into()) => {
                        tokio::select! {
                            _ = stop.cancelled() => return Ok(()),
                            r = self.cycle(&mut tx) => r?,
                        }
                    }
                }
            }
        }
        .await;
        if let Err(e) = result {
            debug!(bus = %self.name, error = %e, "modbus bus stopping");
        }
        for d in &self.devices {
            let p = publish::status(
                &Status::Offline("stopped", "gateway stopping"),
                publish::now_ms(),
            );
            let _ =
                tokio::time::timeout(Duration::from_secs(1), tx.publish(&d.status_topic, p, true))
                    .await;
        }
        fwd_stop.cancel();
        let _ = forwarder.await;
        info!(bus = %self.name, "modbus bus stopped");
    }

    fn next_due(&self) -> Instant {
        self.devices
            .iter()
            .flat_map(|d| {
                d.groups
                    .iter()
                    .map(|g| g.next_due)
                    .chain(d.batch.as_ref().map(|b| b.next_due))
            })
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))
    }

    /// One poll cycle: every group that is due, device by device.
    async fn cycle(&mut self, tx: &mut LocalTx) -> Result<(), BusError> {
        let start = Instant::now();
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
        let mut requests = 0;
        for (di, _, tags) in &due {
            requests += self.poll_device(tx, *di, tags).await?;
        }
        // Batches after the polls, so a batch due with a poll carries that poll's readings.
        for di in 0..self.devices.len() {
            if self.devices[di]
                .batch
                .as_ref()
                .is_some_and(|b| b.next_due <= start)
            {
                self.publish_batch(tx, di).await?;
            }
        }
        let end = Instant::now();
        let mut overran = false;
        for (di, groups, _) in &due {
            for &gi in groups {
                let g = &mut self.devices[*di].groups[gi];
                g.next_due += g.interval;
                if g.next_due <= end {
                    overran = true;
                    let behind = (end - g.next_due).as_nanos();
                    let skip = behind / g.interval.as_nanos().max(1) + 1;
                    g.next_due += g.interval * u32::try_from(skip).unwrap_or(u32::MAX);
                }
            }
        }
        for d in &mut self.devices {
            if let Some(b) = d.batch.as_mut().filter(|b| b.next_due <= start) {
                // Missed batches are skipped, not sent in a burst.
                b.next_due += b.interval;
                if b.next_due <= end {
                    let behind = (end - b.next_due).as_nanos();
                    let skip = behind / b.interval.as_nanos().max(1) + 1;
                    b.next_due += b.interval * u32::try_from(skip).unwrap_or(u32::MAX);
                }
            }
        }
        if due.is_empty() {
            // Only a batch was due: not a poll cycle (its metrics stay as they were).
            return Ok(());
        }
        let bus = labels(&[("bus", &self.name)]);
        self.metrics.modbus.cycles.get_or_create(&bus).inc();
        self.metrics
            .modbus
            .cycle_requests
            .get_or_create(&bus)
            .set(requests as i64);
        if overran {
            self.metrics.modbus.overruns.get_or_create(&bus).inc();
            self.overruns_unlogged += 1;
            let log_now = self
                .last_overrun_log
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
            if log_now {
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
        Ok(())
    }

    /// Polls `due` tags of device `di`; returns the requests sent.
    async fn poll_device(
        &mut self,
        tx: &mut LocalTx,
        di: usize,
        due: &[usize],
    ) -> Result<usize, BusError> {
        let d = &self.devices[di];
        let offline = matches!(d.state, State::Offline { .. });
        if offline && Instant::now() < d.retry_at {
            return Ok(0);
        }
        let spans: Vec<Span> = due
            .iter()
            .map(|&ti| Span {
                tag: ti,
                kind: d.tags[ti].cfg.kind,
                start: d.tags[ti].addr,
                count: d.tags[ti].fmt.registers(),
            })
            .collect();
        let mut reads = plan::plan(&spans, d.limits);
        let mut results: Vec<(Read, Result<Answer, RequestError>)> = Vec::new();
        let mut sent = 0;
        if offline && !reads.is_empty() {
            // Re-probe with one request; the rest only if the device is back.
            let first = reads.remove(0);
            sent += 1;
            let r = self.lanes[0]
                .request(
                    &self.endpoint,
                    &d.unit,
                    &read_request(first.kind, first.start, first.count),
                    1,
                    &self.metrics,
                )
                .await;
            let failed = r.is_err();
            results.push((first, r));
            if failed {
                reads.clear();
            }
        }
        if !reads.is_empty() {
            sent += reads.len();
            let n = self.lanes.len().min(reads.len()).max(1);
            let mut chunks: Vec<Vec<Read>> = (0..n).map(|_| Vec::new()).collect();
            for (k, r) in reads.into_iter().enumerate() {
                chunks[k % n].push(r);
            }
            let (ep, unit, m) = (&self.endpoint, &d.unit, &self.metrics);
            let lanes = self
                .lanes
                .iter_mut()
                .zip(chunks)
                .map(|(lane, reads)| async move {
                    let mut out = Vec::with_capacity(reads.len());
                    let mut failed: Option<RequestError> = None;
                    for r in reads {
                        if let Some(e) = &failed {
                            out.push((r, Err(e.clone())));
                            continue;
                        }
                        let a = lane
                            .request(
                                ep,
                                unit,
                                &read_request(r.kind, r.start, r.count),
                                unit.retries + 1,
                                m,
                            )
                            .await;
                        if let Err(e) = &a {
                            failed = Some(e.clone());
                        }
                        out.push((r, a));
                    }
                    out
                });
            for out in join_all(lanes).await {
                results.extend(out);
            }
        }
        for (read, r) in results {
            self.apply(tx, di, &read, r).await?;
        }
        self.publish_status(tx, di).await?;
        Ok(sent)
    }

    /// Decodes and publishes the outcome of one read; updates the device state.
    async fn apply(
        &mut self,
        tx: &mut LocalTx,
        di: usize,
        read: &Read,
        r: Result<Answer, RequestError>,
    ) -> Result<(), BusError> {
        let ts = publish::now_ms();
        let name = self.devices[di].cfg.name.clone();
        match r {
            Ok(Answer::Data(resp)) => {
                self.metrics
                    .modbus
                    .reads
                    .get_or_create(&labels(&[("device", &name)]))
                    .inc();
                self.set_state(di, State::Online);
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
                    match decoded {
                        Ok(v) if v.is_finite() => {
                            self.publish_tag(tx, di, ti, Some(v), Quality::Good, None, ts)
                                .await?
                        }
                        Ok(v) => {
                            let e = format!("not a finite number: {v}");
                            self.publish_tag(tx, di, ti, None, Quality::Invalid, Some(e), ts)
                                .await?
                        }
                        Err(e) => {
                            let e = e.to_string();
                            self.publish_tag(tx, di, ti, None, Quality::BadFrame, Some(e), ts)
                                .await?
                        }
                    }
                }
            }
            Ok(Answer::Exception(code)) => {
                self.set_state(di, State::Online);
                let text = exception_text(code);
                debug!(device = %name, kind = ?read.kind, start = read.start, count = read.count, error = %text, "exception answer");
                for &(ti, _) in &read.tags {
                    self.publish_tag(tx, di, ti, None, Quality::Exception, Some(text.clone()), ts)
                        .await?;
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
                self.set_state(di, state);
                for &(ti, _) in &read.tags {
                    self.publish_tag(tx, di, ti, None, e.quality(), Some(e.to_string()), ts)
                        .await?;
                }
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn publish_tag(
        &mut self,
        tx: &mut LocalTx,
        di: usize,
        ti: usize,
        value: Option<Value>,
        quality: Quality,
        error: Option<String>,
        ts: u64,
    ) -> Result<(), BusError> {
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
                .modbus
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
            return Ok(());
        }
        let now = Instant::now();
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
            return Ok(());
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
        if let Some(p) = payload {
            tx.publish(&tag.topic, p, retain)
                .await
                .map_err(|e| BusError::Broker(e.to_string()))?;
        }
        Ok(())
    }

    /// Publishes device `di`'s batch: the latest reading of every tag read so far (nothing
    /// before the first reading).
    async fn publish_batch(&mut self, tx: &mut LocalTx, di: usize) -> Result<(), BusError> {
        let d = &self.devices[di];
        let Some(b) = &d.batch else {
            return Ok(());
        };
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
            return Ok(());
        }
        let ts = d
            .tags
            .iter()
            .filter_map(|t| t.latest.as_ref().map(|l| l.ts))
            .max()
            .unwrap_or_else(publish::now_ms);
        let payload = publish::batch(&entries, ts);
        tx.publish(&b.topic, payload, d.cfg.retain)
            .await
            .map_err(|e| BusError::Broker(e.to_string()))
    }

    /// Updates the device's reachability (backoff, metric, log); the status topic follows
    /// at the end of the poll ([`Bus::publish_status`]).
    fn set_state(&mut self, di: usize, state: State) {
        let d = &mut self.devices[di];
        let now = Instant::now();
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
            .modbus
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

    /// Publishes the device's retained status if it differs from the last one published.
    async fn publish_status(&mut self, tx: &mut LocalTx, di: usize) -> Result<(), BusError> {
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
            State::Unknown => return Ok(()),
            State::Offline { kind, error } => Status::Offline(kind, error),
            State::Online if failing.is_empty() => Status::Online,
            State::Online => Status::Degraded(&failing),
        };
        // Compared without the timestamp.
        let key = publish::status(&status, 0);
        if d.published.as_ref() == Some(&key) {
            return Ok(());
        }
        if let Status::Degraded(f) = &status {
            let tags: Vec<&str> = f.iter().map(|f| f.tag.as_str()).collect();
            warn!(device = %d.cfg.name, failing = ?tags, "modbus device degraded: it answers, but some tags fail");
        }
        let payload = publish::status(&status, publish::now_ms());
        d.published = Some(key);
        tx.publish(&d.status_topic, payload, true)
            .await
            .map_err(|e| BusError::Broker(e.to_string()))
    }

    /// Answers one message on a set topic.
    async fn handle_set(&mut self, tx: &mut LocalTx, m: Inbound) -> Result<(), BusError> {
        let Some(&(di, ti)) = self.set_topics.get(&m.topic) else {
            // Matched a wildcard filter but names no tag.
            let base = m.topic.strip_suffix("/set").unwrap_or(&m.topic);
            let base = self
                .prefixes
                .iter()
                .find_map(|p| base.strip_prefix(p.as_str()))
                .unwrap_or(base);
            let id = publish::request_id(&m.payload);
            let p = publish::set_result(
                Some(("unknown_tag", &format!("no tag publishes on {base}"))),
                id.as_ref(),
            );
            return tx
                .publish(&format!("{base}/set/result"), p, false)
                .await
                .map_err(|e| BusError::Broker(e.to_string()));
        };
        let result_topic = format!("{}/set/result", self.devices[di].tags[ti].topic);
        let (outcome, id) = self.write(di, ti, &m.payload).await;
        let name = self.devices[di].cfg.name.clone();
        let tag_name = self.devices[di].tags[ti].cfg.name.clone();
        let result = if outcome.is_ok() { "ok" } else { "error" };
        self.metrics
            .modbus
            .writes
            .get_or_create(&labels(&[("device", &name), ("result", result)]))
            .inc();
        let payload = match &outcome {
            Ok(()) => {
                info!(device = %name, tag = %tag_name, "modbus write done");
                // Read the tag back soon, so its topic shows what the device now holds.
                let d = &mut self.devices[di];
                let now = Instant::now();
                for g in d.groups.iter_mut().filter(|g| g.tags.contains(&ti)) {
                    g.next_due = g.next_due.min(now);
                }
                publish::set_result(None, id.as_ref())
            }
            Err((code, msg)) => {
                info!(device = %name, tag = %tag_name, code, error = %msg, "modbus write refused or failed");
                publish::set_result(Some((code, msg)), id.as_ref())
            }
        };
        tx.publish(&result_topic, payload, false)
            .await
            .map_err(|e| BusError::Broker(e.to_string()))
    }

    /// Validates, encodes and performs one write. `Err((code, message))`.
    async fn write(
        &mut self,
        di: usize,
        ti: usize,
        payload: &[u8],
    ) -> (
        Result<(), (&'static str, String)>,
        Option<serde_json::Value>,
    ) {
        let d = &self.devices[di];
        let tag = &d.tags[ti];
        let text = tag.fmt.ty == codec::DataType::String;
        let req = match publish::parse_set(payload, text) {
            Ok(r) => r,
            Err(e) => return (Err(("bad_request", e)), publish::request_id(payload)),
        };
        let id = req.id.clone();
        if !tag.cfg.writable {
            return (
                Err((
                    "read_only",
                    format!(
                        "tag {} of device {} is read-only (writable = false in its config)",
                        tag.cfg.name, d.cfg.name
                    ),
                )),
                id,
            );
        }
        let enc = match codec::encode(&tag.fmt, &req.value) {
            Ok(e) => e,
            Err(e @ (codec::CodecError::WrongType { .. } | codec::CodecError::Count { .. })) => {
                return (Err(("bad_request", e.to_string())), id)
            }
            Err(e) => return (Err(("out_of_range", e.to_string())), id),
        };
        let addr = tag.addr;
        let (ep, unit, m) = (&self.endpoint, &d.unit, &self.metrics);
        let lane = &mut self.lanes[0];
        let req = match enc {
            Encoded::Coil(b) => Request::WriteSingleCoil(addr, b),
            Encoded::Coils(b) => Request::WriteMultipleCoils(addr, Cow::Owned(b)),
            Encoded::Registers(r) if r.len() == 1 => Request::WriteSingleRegister(addr, r[0]),
            Encoded::Registers(r) => Request::WriteMultipleRegisters(addr, Cow::Owned(r)),
            Encoded::Bit { bit, value } => {
                // Read-modify-write; safe because this task is the only writer on the line.
                let current = match lane
                    .request(ep, unit, &Request::ReadHoldingRegisters(addr, 1), 1, m)
                    .await
                {
                    Ok(Answer::Data(Response::ReadHoldingRegisters(w))) if !w.is_empty() => w[0],
                    Ok(Answer::Exception(code)) => {
                        return (Err(("exception", exception_text(code))), id)
                    }
                    Ok(_) => return (Err(("bad_frame", "unexpected answer".into())), id),
                    Err(e) => return (Err((e.kind(), e.to_string())), id),
                };
                let mask = 1u16 << (bit & 15);
                let new = if value {
                    current | mask
                } else {
                    current & !mask
                };
                Request::WriteSingleRegister(addr, new)
            }
        };
        // Writes are tried once: a write that timed out may have been applied.
        let r = match lane.request(ep, unit, &req, 1, m).await {
            Ok(Answer::Data(_)) => Ok(()),
            Ok(Answer::Exception(code)) => Err(("exception", exception_text(code))),
            Err(e) => Err((e.kind(), e.to_string())),
        };
        (r, id)
    }
}

/// Moves set messages from the broker link into the bus's bounded channel.
async fn forward(mut rx: LocalRx, tx: mpsc::Sender<Inbound>, stop: CancellationToken) {
    loop {
        let m = tokio::select! {
            _ = stop.cancelled() => return,
            m = rx.next() => m,
        };
        match m {
            Ok(m) => {
                if tx.send(m).await.is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}
