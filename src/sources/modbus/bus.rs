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
//!
//! The decisions above (schedule, overruns, backoff, which reads a poll sends and when the
//! re-probe holds the others back, device state and status, what a reading publishes, the
//! steps of a write) are made by `engine` (`bus/engine.rs`), which does no I/O and is unit
//! tested with explicit time; this file is its driver ([`Bus::run`]: it sends the reads the
//! engine hands out, spread over the lanes, one lane's reads in order, and after a failed
//! read the lane's other reads are not sent but fail alike) and the line's I/O ([`Lane`]).

mod engine;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tokio::sync::mpsc;
use tokio_modbus::client::{Client, Context};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{ExceptionCode, Request, Response, Slave};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use self::engine::{Action, Engine, Out, Poll, Txn, WRITE_ATTEMPTS};
use super::config::{ModbusDeviceConfig, Parity, RegisterKind, Transport};
use super::plan::Read;
use super::publish::Quality;
use crate::clock::now_ms;
use crate::local::{Inbound, LocalRx, LocalTx};
use crate::sources::modbus::metrics::ModbusMetrics;

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
        metrics: &ModbusMetrics,
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

fn count_error(m: &ModbusMetrics, device: &str, kind: &str) {
    m.errors
        .get_or_create(&labels(&[("device", device), ("kind", kind)]))
        .inc();
}

fn observe_rtt(m: &ModbusMetrics, device: &str, d: Duration) {
    m.rtt
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
// The driver

/// A bus ready to run: its line, its lanes, and the [`Engine`] that decides what they do.
pub struct Bus {
    name: String,
    endpoint: Endpoint,
    engine: Engine,
    lanes: Vec<Lane>,
    metrics: Arc<ModbusMetrics>,
    /// The engine's outputs not yet published (reused: an output costs its payload only).
    outs: Vec<Out>,
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
        metrics: Arc<ModbusMetrics>,
    ) -> Bus {
        let endpoint = devices
            .first()
            .map(Endpoint::of)
            .unwrap_or(Endpoint::Tcp(String::new()));
        let lanes = match endpoint {
            Endpoint::Tcp(_) => devices.first().map(|d| d.max_in_flight).unwrap_or(1),
            Endpoint::Rtu { .. } | Endpoint::RtuOverTcp(_) => 1,
        };
        let engine = Engine::new(
            name.clone(),
            devices,
            gateway_id,
            metrics.clone(),
            Instant::now(),
        );
        Bus {
            name,
            endpoint,
            engine,
            lanes: (0..lanes.max(1)).map(|_| Lane::default()).collect(),
            metrics,
            outs: Vec::new(),
        }
    }

    /// Shows the bus's devices on the operator page's `board` (see [`Engine::show_on`]).
    pub fn show_on(&mut self, board: &crate::board::Board) {
        self.engine.show_on(board);
    }

    /// Bus name (`<device>` for TCP, `rtu:<port>` for a serial line).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Topic filters this bus takes writes on.
    pub fn filters(&self) -> &[String] {
        self.engine.filters()
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
        info!(bus = %self.name, devices = self.engine.devices(), "modbus bus running");
        let result: Result<(), BusError> = async {
            // A set message taken from the channel and not yet carried out.
            let mut waiting: Option<Inbound> = None;
            loop {
                if stop.is_cancelled() {
                    return Ok(());
                }
                if waiting.is_none() {
                    match cmds.try_recv() {
                        Ok(m) => waiting = Some(m),
                        Err(mpsc::error::TryRecvError::Empty) => {}
                        Err(mpsc::error::TryRecvError::Disconnected) => return Ok(()),
                    }
                }
                match self.engine.next_action(Instant::now(), waiting.is_some()) {
                    Action::Write => {
                        if let Some(m) = waiting.take() {
                            self.write(&mut tx, m).await?;
                        }
                    }
                    Action::Poll => {
                        tokio::select! {
                            _ = stop.cancelled() => return Ok(()),
                            r = self.cycle(&mut tx) => r?,
                        }
                    }
                    Action::Wait(until) => {
                        tokio::select! {
                            biased;
                            _ = stop.cancelled() => return Ok(()),
                            c = cmds.recv() => match c {
                                Some(m) => waiting = Some(m),
                                None => return Ok(()),
                            },
                            _ = tokio::time::sleep_until(until.into()) => {}
                        }
                    }
                }
            }
        }
        .await;
        if let Err(e) = result {
            debug!(bus = %self.name, error = %e, "modbus bus stopping");
        }
        self.outs.clear();
        self.engine.stopping(now_ms(), &mut self.outs);
        for Out { to, payload } in self.outs.drain(..) {
            let (topic, retain) = self.engine.route(&to);
            let _ =
                tokio::time::timeout(Duration::from_secs(1), tx.publish(topic, payload, retain))
                    .await;
        }
        fwd_stop.cancel();
        let _ = forwarder.await;
        info!(bus = %self.name, "modbus bus stopped");
    }

    /// One poll cycle: every device with a due group, then the due batches.
    async fn cycle(&mut self, tx: &mut LocalTx) -> Result<(), BusError> {
        self.engine.begin_cycle(Instant::now());
        let mut requests = 0;
        while let Some(poll) = self.engine.next_poll(Instant::now()) {
            requests += self.poll_device(tx, poll).await?;
        }
        self.engine.batches(now_ms(), &mut self.outs);
        flush(tx, &self.engine, &mut self.outs).await?;
        self.engine.end_cycle(Instant::now(), requests);
        Ok(())
    }

    /// Sends the reads the engine hands out for one device's poll, feeds their outcomes to
    /// the engine and publishes what it says; returns the requests sent.
    async fn poll_device(&mut self, tx: &mut LocalTx, poll: Poll) -> Result<usize, BusError> {
        let di = poll.device;
        let mut results: Vec<(Read, Result<Answer, RequestError>)> = Vec::new();
        let mut sent = 0;
        let mut next = Some(poll);
        while let Some(poll) = next {
            let from = results.len();
            sent += poll.reads.len();
            self.send(poll, &mut results).await;
            next = self.engine.next_reads(&results[from..]);
        }
        for (read, r) in results {
            let (now, ts) = (Instant::now(), now_ms());
            self.engine
                .apply_read(di, &read, r, now, ts, &mut self.outs);
            flush(tx, &self.engine, &mut self.outs).await?;
        }
        self.engine.end_poll(di, now_ms(), &mut self.outs);
        flush(tx, &self.engine, &mut self.outs).await?;
        Ok(sent)
    }

    /// Sends `poll`'s reads, spread over the lanes, and adds their outcomes to `results`.
    async fn send(&mut self, poll: Poll, results: &mut Vec<(Read, Result<Answer, RequestError>)>) {
        if poll.reads.is_empty() {
            return;
        }
        let (ep, unit, m) = (&self.endpoint, self.engine.unit(poll.device), &self.metrics);
        let chunks = engine::spread(poll.reads, self.lanes.len());
        let attempts = poll.attempts;
        let lanes = self
            .lanes
            .iter_mut()
            .zip(chunks)
            .map(|(lane, reads)| async move {
                let mut out = Vec::with_capacity(reads.len());
                // After a failure the lane's other reads are not sent: they fail alike.
                let mut failed: Option<RequestError> = None;
                for r in reads {
                    if let Some(e) = &failed {
                        out.push((r, Err(e.clone())));
                        continue;
                    }
                    let req = read_request(r.kind, r.start, r.count);
                    let a = lane.request(ep, unit, &req, attempts, m).await;
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

    /// Carries out one message on a set topic: the engine's requests, one at a time on the
    /// first lane, then its answer.
    async fn write(&mut self, tx: &mut LocalTx, m: Inbound) -> Result<(), BusError> {
        let mut next =
            self.engine
                .begin_write(&m.topic, &m.payload, Instant::now(), &mut self.outs);
        while let Some(Txn { device, req }) = next {
            let unit = self.engine.unit(device);
            let r = self.lanes[0]
                .request(&self.endpoint, unit, &req, WRITE_ATTEMPTS, &self.metrics)
                .await;
            next = self
                .engine
                .write_answered(r, Instant::now(), &mut self.outs);
        }
        flush(tx, &self.engine, &mut self.outs).await
    }
}

/// Publishes the engine's outputs in order.
async fn flush(tx: &mut LocalTx, engine: &Engine, outs: &mut Vec<Out>) -> Result<(), BusError> {
    for Out { to, payload } in outs.drain(..) {
        let (topic, retain) = engine.route(&to);
        tx.publish(topic, payload, retain)
            .await
            .map_err(|e| BusError::Broker(e.to_string()))?;
    }
    Ok(())
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
