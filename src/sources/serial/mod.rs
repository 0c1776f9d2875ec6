//! Serial-line devices (`[[serial]]`): scales, barcode readers, GPS receivers, sensors that
//! print lines or frames on a serial port, turned into MQTT messages on the embedded broker.
//!
//! Owns, per device, one task that owns its serial port (house rule 8): it opens the port,
//! cuts the byte stream into frames ([`framing`]), decodes them ([`decode`]) and publishes
//! each on the device's data topic; it writes to the port what arrives on the write topic;
//! and it keeps the retained status topic true. Nothing else ever touches the port.
//!
//! State machine of the port task (each state an `async fn` returning the next):
//!
//! ```text
//!            open ok                      read error / EOF / write error /
//!                                         path vanished or replaced
//! Opening ─────────────▶ Online ──────────────────────────────────────┐
//!    ▲  │ open failed                                                 │
//!    │  ▼                                                             ▼
//!    └── Waiting(delay) ◀─────────────────────────────────── Waiting(reconnect_min)
//!        (delay doubles per failed open, up to reconnect_max, randomised to 50-100 %)
//! any state ── stop token ──▶ Stopped (status "offline" is published on the way out)
//! ```
//!
//! Invariants:
//! - the status topic (retained) says `online` exactly while the port is open, with the last
//!   port error; it is republished only when the state or the error changes, so a port that
//!   stays unplugged does not flood the broker;
//! - an open port is given up within [`PRESENCE_CHECK`] once its path no longer names the
//!   device that was opened (gone, or another device). A USB-serial unplug hangs the tty up
//!   and the next read ends at once; but a line that is never hung up (a pty whose master
//!   another process still holds, e.g. one that inherited it) reads neither data nor an
//!   error, and without the check would stay `online` forever;
//! - a partial frame is never carried across a reconnect (the framer is reset);
//! - writes while the port is closed are dropped and counted (`offline`), never queued for
//!   later: a command meant for a device that was unplugged must not fire minutes later;
//! - the port is never `flush`ed: on Linux that is `tcdrain`, which blocks the thread until
//!   the line is idle (forever on a stalled pty). Bytes handed to the kernel are the write.
//!
//! Channels and their full policy:
//! - writes: the broker link's receiving half is read by a small inbox task that forwards
//!   payloads into a bounded channel of [`WRITE_QUEUE`] to the port task. When it is full the
//!   inbox waits, and rumqttd holds further writes in the link's own bounded buffer. The port
//!   task drains it at least once per `write_timeout`, so the wait is bounded.
//! - frames: publishing waits when the router's queue is full. Meanwhile the port is not read
//!   and the kernel's tty buffer fills; past that the device's bytes are lost at the line, as
//!   on any serial port whose reader stalls (there is no flow control to the device unless
//!   `flow_control` is set).

pub mod config;
pub mod decode;
pub mod framing;
pub mod metrics;
pub mod sparkplug;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::clock::now_ms;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_serial::SerialStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use self::config::{FlowControl, Parity, SerialDeviceConfig};
use self::decode::{DecodeError, Decoded, Decoder};
use self::framing::{Frame, Framer};
use self::metrics::{DeviceMetrics, FrameDrop, SerialMetrics, WriteDrop};
use crate::board::Slot;
use crate::broker::Broker;
use crate::component::{Ctx, Running};
use crate::local::{LocalClient, LocalRx, LocalTx};
use crate::pacing::Backoff;

/// Capacity of the channel from a device's write inbox to its port task.
pub const WRITE_QUEUE: usize = 32;
/// Bytes asked of the port per read.
const READ_CHUNK: usize = 4096;
/// How long the final `offline` status may take to publish at shutdown.
const STOP_PUBLISH: Duration = Duration::from_secs(1);
/// At most one decode warning per device in this interval (the counters count them all).
const WARN_EVERY: Duration = Duration::from_secs(10);
/// How often an open port's path is checked to still name the device that was opened (see
/// the module header). One `stat` per device per interval, on the blocking pool.
pub const PRESENCE_CHECK: Duration = Duration::from_secs(1);

/// Why a serial device could not be set up. The gateway does not start.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// A setting that validation should have refused: fix the named key of the device.
    #[error("serial device {device}: {key}: {message}")]
    Config {
        /// Device name.
        device: String,
        /// Key under the device.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The device's broker link could not be made: the broker is out of connections; raise
    /// `broker.max_connections`.
    #[error("serial device {device}: broker link: {message}")]
    Link {
        /// Device name.
        device: String,
        /// Why.
        message: String,
    },
    /// The broker refused the subscription to the write topic: the broker is shutting down or
    /// out of connections; raise `broker.max_connections` or restart.
    #[error("serial device {device}: subscribing to {topic}: {source}")]
    Subscribe {
        /// Device name.
        device: String,
        /// Write topic.
        topic: String,
        /// Why.
        source: Box<rumqttd::local::LinkError>,
    },
}

/// Why an open port was lost or could not be opened. The port task reports it on the status
/// topic, counts it, and tries to open the port again after a backoff.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// The port cannot be opened (absent, busy, no permission): retried with backoff.
    #[error("cannot open {path}: {source}")]
    Open {
        /// Port path.
        path: String,
        /// Why.
        source: tokio_serial::Error,
    },
    /// Reading failed (device unplugged: EIO): the port is closed and reopened.
    #[error("read failed: {0}")]
    Read(std::io::Error),
    /// The port reported end of file (the other end hung up): closed and reopened.
    #[error("port closed (end of file)")]
    Closed,
    /// A write failed: the port is closed and reopened.
    #[error("write failed: {0}")]
    Write(std::io::Error),
    /// The port's path no longer exists while the port was open and its line was not hung up:
    /// the port is closed and reopened once the path is back.
    #[error("{path} vanished while open")]
    Vanished {
        /// Port path.
        path: String,
    },
    /// The port's path now names another device than the one open (a link re-pointed, a node
    /// made anew): the port is closed and the path reopened.
    #[error("{path} now names another device")]
    Replaced {
        /// Port path.
        path: String,
    },
}

/// Which file a path named when its port was opened: device number of the filesystem,
/// inode, and the device node's own number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NodeId {
    dev: u64,
    ino: u64,
    rdev: u64,
}

impl NodeId {
    fn of(m: &std::fs::Metadata) -> NodeId {
        NodeId {
            dev: m.dev(),
            ino: m.ino(),
            rdev: m.rdev(),
        }
    }
}

/// `Err` when `path` no longer names the file it named at open (`opened`; `None`: unknown,
/// then only its existence is checked). Any other answer from `stat` (no permission on a
/// directory on the way, ...) says nothing about the device, and the port stays open.
async fn still_there(path: &Path, opened: Option<NodeId>) -> Result<(), PortError> {
    let shown = || path.display().to_string();
    match tokio::fs::metadata(path).await {
        Ok(m) if opened.is_some_and(|o| o != NodeId::of(&m)) => {
            Err(PortError::Replaced { path: shown() })
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(PortError::Vanished { path: shown() })
        }
        Err(e) => {
            debug!(error = %e, "cannot check the serial port's path; keeping the port open");
            Ok(())
        }
    }
}

/// Every serial device, built and linked, not yet running.
pub struct Serial {
    devices: Vec<SerialDevice>,
}

impl Serial {
    /// Builds every device of `[[serial]]` with its broker link (call before
    /// `Broker::start`: rumqttd refuses to reuse a client id a device might have taken)
    /// and adds the serial metric families to the context's registry. Nothing runs yet, so a
    /// failure leaves no task behind.
    pub fn build(
        devices: &[SerialDeviceConfig],
        ctx: &Ctx,
        broker: &Broker,
    ) -> Result<Serial, SerialError> {
        let metrics = SerialMetrics::default();
        ctx.registry.add(&metrics);
        let devices = devices
            .iter()
            .map(|cfg| {
                let link = broker
                    .client(&format!("fieldgate-serial-{}", cfg.name))
                    .map_err(|e| SerialError::Link {
                        device: cfg.name.clone(),
                        message: e.to_string(),
                    })?;
                let slot = ctx.board.add("serial", &cfg.name, &[]);
                SerialDevice::build(cfg, &ctx.gateway_id, link, metrics.device(&cfg.name))
                    .map(|d| d.show_on(slot))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Serial { devices })
    }

    /// Spawns one port task per device under `stop`, each in a span `serial{device=..}`.
    pub fn start(self, stop: CancellationToken) -> Running {
        let tasks = self
            .devices
            .into_iter()
            .map(|dev| {
                let span = tracing::info_span!("serial", device = %dev.name);
                tokio::spawn(dev.run(stop.clone()).instrument(span))
            })
            .collect();
        Running::tasks("serial", stop, tasks)
    }
}

/// The port task's state.
enum State {
    /// Try to open the port.
    Opening,
    /// The port is open; `node` is what its path named then (`None`: could not be told).
    Online {
        port: SerialStream,
        node: Option<NodeId>,
    },
    /// Closed; try again after `delay` (from the backoff, already jittered).
    Waiting { delay: Duration },
    /// The stop token fired or the broker is gone.
    Stopped,
}

/// Online or offline, as published on the status topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Online,
    Offline,
}

/// One serial device, built and ready to run.
pub struct SerialDevice {
    /// Config name: the span's `device`.
    name: String,
    path: PathBuf,
    builder: tokio_serial::SerialPortBuilder,
    framer: Framer,
    decoder: Decoder,
    envelope: bool,
    data_topic: String,
    status_topic: String,
    line_ending: Vec<u8>,
    write_timeout: Duration,
    /// Delay before reopening a failed port: `reconnect_min` doubling to `reconnect_max`,
    /// jittered; reset once the port is open.
    backoff: Backoff,
    metrics: DeviceMetrics,
    tx: LocalTx,
    rx: Option<LocalRx>,
    /// Last status published: what, and with which error.
    published: Option<(Status, Option<String>)>,
    last_error: Option<String>,
    was_online: bool,
    last_warn: Option<Instant>,
    /// The device's entry on the operator page's board.
    slot: Option<Arc<Slot>>,
}

impl SerialDevice {
    /// Builds a device from its validated config, on its own broker link, subscribing to its
    /// write topic.
    pub fn build(
        cfg: &SerialDeviceConfig,
        gateway_id: &str,
        mut link: LocalClient,
        metrics: DeviceMetrics,
    ) -> Result<SerialDevice, SerialError> {
        let bad = |key, message: String| SerialError::Config {
            device: cfg.name.clone(),
            key,
            message,
        };
        let framer = Framer::new(&cfg.framing).map_err(|e| bad("framing.delimiter", e))?;
        let decoder =
            Decoder::new(&cfg.decode).map_err(|e| bad("decode.pattern", e.to_string()))?;
        let line_ending =
            config::unescape(&cfg.write_line_ending).map_err(|e| bad("write_line_ending", e))?;
        if !cfg.write_topic.is_empty() {
            let topic = cfg.expand(&cfg.write_topic, gateway_id);
            link.subscribe(&topic)
                .map_err(|source| SerialError::Subscribe {
                    device: cfg.name.clone(),
                    topic,
                    source,
                })?;
        }
        let (tx, rx) = link.split();
        let builder = tokio_serial::new(cfg.port.to_string_lossy(), cfg.baud)
            .parity(match cfg.parity {
                Parity::None => tokio_serial::Parity::None,
                Parity::Odd => tokio_serial::Parity::Odd,
                Parity::Even => tokio_serial::Parity::Even,
            })
            .data_bits(match cfg.data_bits {
                5 => tokio_serial::DataBits::Five,
                6 => tokio_serial::DataBits::Six,
                7 => tokio_serial::DataBits::Seven,
                _ => tokio_serial::DataBits::Eight,
            })
            .stop_bits(if cfg.stop_bits == 2 {
                tokio_serial::StopBits::Two
            } else {
                tokio_serial::StopBits::One
            })
            .flow_control(match cfg.flow_control {
                FlowControl::None => tokio_serial::FlowControl::None,
                FlowControl::Software => tokio_serial::FlowControl::Software,
                FlowControl::Hardware => tokio_serial::FlowControl::Hardware,
            });
        Ok(SerialDevice {
            name: cfg.name.clone(),
            path: cfg.port.clone(),
            builder,
            framer,
            decoder,
            envelope: cfg.envelope,
            data_topic: cfg.expand(&cfg.topic, gateway_id),
            status_topic: cfg.expand(&cfg.status_topic, gateway_id),
            line_ending,
            write_timeout: cfg.write_timeout,
            backoff: Backoff::new(cfg.reconnect_min, cfg.reconnect_max),
            metrics,
            tx,
            rx: Some(rx),
            published: None,
            last_error: None,
            was_online: false,
            last_warn: None,
            slot: None,
        })
    }

    /// Shows the device on the operator page's board: its status, and per frame its decoded
    /// fields (regex captures) or the frame itself (shortened), as tags.
    pub fn show_on(mut self, slot: Arc<Slot>) -> SerialDevice {
        self.slot = Some(slot);
        self
    }

    /// Runs the port task until `stop` fires, then publishes `offline` and returns.
    pub async fn run(mut self, stop: CancellationToken) {
        let (writes_tx, mut writes) = mpsc::channel(WRITE_QUEUE);
        let inbox = self
            .rx
            .take()
            .map(|rx| tokio::spawn(inbox(rx, writes_tx, stop.clone()).in_current_span()));
        info!(port = %self.path.display(), topic = %self.data_topic, "serial device starting");
        let mut state = State::Opening;
        loop {
            state = match state {
                State::Opening => self.opening().await,
                State::Online { port, node } => self.online(port, node, &mut writes, &stop).await,
                State::Waiting { delay } => self.waiting(delay, &mut writes, &stop).await,
                State::Stopped => break,
            };
            if stop.is_cancelled() {
                break;
            }
        }
        self.metrics.online.set(0);
        let _ = tokio::time::timeout(STOP_PUBLISH, self.set_status(Status::Offline)).await;
        writes.close();
        if let Some(t) = inbox {
            let _ = t.await;
        }
        info!("serial device stopped");
    }

    async fn opening(&mut self) -> State {
        // Opening a tty is a non-blocking open(2) plus a few ioctls, and the stat that tells
        // which node was opened finds the path just resolved: cheap enough to do on the
        // runtime thread.
        match SerialStream::open(&self.builder) {
            Ok(port) => {
                let node = std::fs::metadata(&self.path).ok().map(|m| NodeId::of(&m));
                if self.was_online {
                    self.metrics.reconnects.inc();
                    info!(port = %self.path.display(), "serial port back");
                } else {
                    info!(port = %self.path.display(), "serial port open");
                }
                self.was_online = true;
                self.backoff.reset();
                self.framer.reset();
                self.metrics.online.set(1);
                if self.set_status(Status::Online).await.is_err() {
                    return State::Stopped;
                }
                State::Online { port, node }
            }
            Err(source) => {
                let e = PortError::Open {
                    path: self.path.display().to_string(),
                    source,
                };
                let delay = self.backoff.next_delay();
                self.failed(e, delay).await
            }
        }
    }

    /// Counts and reports a port failure; the next state waits `delay`.
    async fn failed(&mut self, e: PortError, delay: Duration) -> State {
        self.metrics.port_errors.inc();
        self.metrics.online.set(0);
        let msg = e.to_string();
        if self.last_error.as_deref() == Some(msg.as_str()) {
            debug!(error = %msg, retry_in = ?delay, "serial port still unavailable");
        } else {
            warn!(error = %msg, retry_in = ?delay, "serial port unavailable; retrying with backoff");
        }
        self.last_error = Some(msg);
        if self.set_status(Status::Offline).await.is_err() {
            return State::Stopped;
        }
        State::Waiting { delay }
    }

    async fn waiting(
        &mut self,
        delay: Duration,
        writes: &mut mpsc::Receiver<Bytes>,
        stop: &CancellationToken,
    ) -> State {
        let until = tokio::time::sleep(delay);
        tokio::pin!(until);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return State::Stopped,
                _ = &mut until => return State::Opening,
                w = writes.recv() => match w {
                    Some(p) => {
                        self.metrics.drop_write(WriteDrop::Offline);
                        warn!(bytes = p.len(), "write dropped: serial port is offline");
                    }
                    None => return State::Stopped,
                },
            }
        }
    }

    async fn online(
        &mut self,
        mut port: SerialStream,
        node: Option<NodeId>,
        writes: &mut mpsc::Receiver<Bytes>,
        stop: &CancellationToken,
    ) -> State {
        let mut buf = vec![0u8; READ_CHUNK];
        let mut presence =
            tokio::time::interval_at(tokio::time::Instant::now() + PRESENCE_CHECK, PRESENCE_CHECK);
        presence.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let lost = loop {
            tokio::select! {
                _ = stop.cancelled() => return State::Stopped,
                _ = presence.tick() => if let Err(e) = still_there(&self.path, node).await {
                    break e;
                },
                r = port.read(&mut buf) => match r {
                    Ok(0) => break PortError::Closed,
                    Ok(n) => {
                        self.metrics.bytes_in.inc_by(n as u64);
                        self.framer.push(&buf[..n]);
                        while let Some(frame) = self.framer.next_frame() {
                            if self.frame(frame).await.is_err() {
                                return State::Stopped;
                            }
                        }
                    }
                    Err(e) => break PortError::Read(e),
                },
                w = writes.recv() => match w {
                    Some(p) => if let Err(e) = self.write(&mut port, p).await {
                        break e;
                    },
                    None => return State::Stopped,
                },
            }
        };
        drop(port);
        let partial = self.framer.reset();
        if partial > 0 {
            debug!(
                bytes = partial,
                "partial frame discarded with the lost port"
            );
        }
        let delay = self.backoff.next_delay();
        self.failed(lost, delay).await
    }

    /// Handles one frame. `Err`: the broker is gone.
    async fn frame(&mut self, frame: Frame) -> Result<(), Box<rumqttd::local::LinkError>> {
        self.metrics.frames_in.inc();
        let frame = match frame {
            Frame::Data(f) => f,
            Frame::TooLong => {
                self.metrics.drop_frame(FrameDrop::TooLong);
                self.warn_sometimes("frame longer than framing.max_length dropped", None);
                return Ok(());
            }
        };
        match self.decoder.decode(&frame) {
            Ok(d) => {
                if let Some(slot) = &self.slot {
                    show_frame(slot, &d, now_ms());
                }
                let payload = decode::render(d, self.envelope.then(now_ms));
                self.tx.publish(&self.data_topic, payload, false).await
            }
            Err(e) => {
                let why = match e {
                    DecodeError::Invalid(_) => FrameDrop::DecodeError,
                    DecodeError::NoMatch => FrameDrop::NoMatch,
                };
                self.metrics.drop_frame(why);
                self.warn_sometimes("frame dropped", Some((&e, &frame)));
                Ok(())
            }
        }
    }

    fn warn_sometimes(&mut self, what: &str, detail: Option<(&DecodeError, &Bytes)>) {
        if self.last_warn.is_some_and(|t| t.elapsed() < WARN_EVERY) {
            return;
        }
        self.last_warn = Some(Instant::now());
        match detail {
            Some((e, frame)) => {
                let shown = String::from_utf8_lossy(&frame[..frame.len().min(80)]).into_owned();
                warn!(error = %e, frame = %shown, "{what} (further ones for 10s only counted)");
            }
            None => warn!("{what} (further ones for 10s only counted)"),
        }
    }

    /// Writes one message, line ending appended. `Err` only when the port must be reopened.
    async fn write(&mut self, port: &mut SerialStream, payload: Bytes) -> Result<(), PortError> {
        let mut data = Vec::with_capacity(payload.len() + self.line_ending.len());
        data.extend_from_slice(&payload);
        data.extend_from_slice(&self.line_ending);
        match tokio::time::timeout(self.write_timeout, port.write_all(&data)).await {
            Ok(Ok(())) => {
                self.metrics.writes.inc();
                debug!(bytes = data.len(), "written to the port");
                Ok(())
            }
            Ok(Err(e)) => {
                self.metrics.drop_write(WriteDrop::Failed);
                Err(PortError::Write(e))
            }
            Err(_) => {
                // The port took part of it, or nothing: the device is not reading (hardware
                // flow control held, or a stalled line). The port stays open.
                self.metrics.drop_write(WriteDrop::Failed);
                warn!(timeout = ?self.write_timeout, "write timed out and was dropped");
                Ok(())
            }
        }
    }

    /// Publishes the retained status if it changed. `Err`: the broker is gone.
    async fn set_status(&mut self, status: Status) -> Result<(), Box<rumqttd::local::LinkError>> {
        let now = (status, self.last_error.clone());
        if self.published.as_ref() == Some(&now) {
            return Ok(());
        }
        let body = serde_json::json!({
            "state": match status { Status::Online => "online", Status::Offline => "offline" },
            "error": self.last_error,
            "ts": now_ms(),
        });
        self.tx
            .publish(&self.status_topic, body.to_string(), true)
            .await?;
        if let Some(slot) = &self.slot {
            let state = match status {
                Status::Online => "online",
                Status::Offline => "offline",
            };
            slot.status(state, self.last_error.as_deref());
        }
        self.published = Some(now);
        Ok(())
    }
}

/// The longest text of a frame the board keeps, in characters.
const SHOWN_TEXT: usize = 200;

/// A decoded frame on the board: each regex capture as a tag, else the frame as tag `frame`.
fn show_frame(slot: &Slot, d: &Decoded, at_ms: u64) {
    match d {
        Decoded::Object(o) => {
            for (k, v) in o {
                slot.named_tag(k, v.clone(), "good", at_ms);
            }
        }
        Decoded::Json(_, v) => slot.named_tag("frame", v.clone(), "good", at_ms),
        Decoded::Text(t) => {
            let short: String = t.chars().take(SHOWN_TEXT).collect();
            slot.named_tag("frame", short.into(), "good", at_ms);
        }
    }
}

/// Forwards payloads published on the write topic to the port task (see the module header
/// for the full policy). Ends at `stop`, when the broker is gone, or when the port task is.
async fn inbox(mut rx: LocalRx, out: mpsc::Sender<Bytes>, stop: CancellationToken) {
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => return,
            m = rx.next() => match m {
                Ok(m) => m,
                Err(_) => return,
            },
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            r = out.send(msg.payload) => if r.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(p: &Path) -> Option<NodeId> {
        Some(NodeId::of(&std::fs::metadata(p).unwrap()))
    }

    #[tokio::test]
    async fn an_open_ports_path_is_there_until_it_vanishes_or_names_another_file() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, link) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("l"),
        );
        std::fs::write(&a, "").unwrap();
        std::fs::write(&b, "").unwrap();
        std::os::unix::fs::symlink(&a, &link).unwrap();
        let opened = node(&link);
        assert!(still_there(&link, opened).await.is_ok());
        assert!(still_there(&link, None).await.is_ok());

        // The link re-pointed: another file, though the path exists.
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(&b, &link).unwrap();
        let e = still_there(&link, opened).await.unwrap_err();
        assert!(matches!(e, PortError::Replaced { .. }), "{e}");
        assert!(
            still_there(&link, None).await.is_ok(),
            "unknown: existence only"
        );

        // Gone: named in the error, whatever was known at open.
        std::fs::remove_file(&link).unwrap();
        for known in [opened, None] {
            let e = still_there(&link, known).await.unwrap_err();
            assert!(matches!(e, PortError::Vanished { .. }), "{e}");
            assert_eq!(
                e.to_string(),
                format!("{} vanished while open", link.display())
            );
        }
        // A dangling link is gone too.
        std::fs::remove_file(&b).unwrap();
        std::os::unix::fs::symlink(&b, &link).unwrap();
        let e = still_there(&link, opened).await.unwrap_err();
        assert!(matches!(e, PortError::Vanished { .. }), "{e}");
    }
}
