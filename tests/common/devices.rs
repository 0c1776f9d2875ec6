//! A device simulator for the durability tests: a hand-rolled MQTT 3.1.1 QoS 1 publisher.
//!
//! Hand-rolled (not rumqttc) so the test owns the packet ids and knows, for every PUBACK, which
//! sequence number it acknowledges, across reconnects.
//!
//! What one [`Device`] does:
//! - publishes `dev/<src>/data` at QoS 1 with [`payload`]`(src, seq, size)`, seq from 0 up to a
//!   limit the test can raise at run time ([`Device::allow_up_to`]), with at most `inflight`
//!   PUBLISHes unacknowledged, optionally paced to one new message per `interval`;
//! - records every seq it got a PUBACK for in a shared set: exactly the messages the gateway
//!   told the device it had accepted;
//! - when the connection drops (kill -9, restart) it reconnects with a bounded retry loop and
//!   first resends (with DUP set) everything it sent and was not acknowledged, then continues;
//! - optionally reads one gateway metric after each PUBACK, before handling the next packet
//!   ([`DeviceConfig::probe`]), so a test can compare what was acknowledged with what the
//!   gateway says is durable at that moment.
//!
//! It runs until [`Device::stop`], until every seq below the limit is acknowledged and the
//! limit is final ([`DeviceConfig::exit_when_done`]), or until it could not reconnect for
//! `reconnect_for` (then [`DeviceStats::gave_up`] is set).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::payload;

/// How one simulated device behaves.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    /// The gateway's MQTT port (127.0.0.1).
    pub port: u16,
    /// Source name: topic `dev/<src>/data`, client id `dev-<src>`, payload prefix.
    pub src: String,
    /// Payload size in bytes.
    pub size: usize,
    /// Sequence numbers `0..max` are published (raise later with [`Device::allow_up_to`]).
    pub max: u64,
    /// Most PUBLISHes awaiting their PUBACK at once.
    pub inflight: usize,
    /// At most one new message per interval (resends are not paced). `None`: as fast as the
    /// window allows.
    pub interval: Option<Duration>,
    /// Give up after this long without a working connection.
    pub reconnect_for: Duration,
    /// After each PUBACK, read this sample from `GET /metrics` on this port and log it.
    pub probe: Option<(u16, String)>,
    /// Stop by itself once every seq below `max` is acknowledged.
    pub exit_when_done: bool,
}

impl DeviceConfig {
    /// A device on `port` that publishes `0..max` as fast as a 100-message window allows.
    pub fn new(port: u16, src: &str, max: u64) -> DeviceConfig {
        DeviceConfig {
            port,
            src: src.to_string(),
            size: 100,
            max,
            inflight: 100,
            interval: None,
            reconnect_for: Duration::from_secs(60),
            probe: None,
            exit_when_done: false,
        }
    }
    pub fn size(mut self, size: usize) -> Self {
        self.size = size;
        self
    }
    pub fn inflight(mut self, n: usize) -> Self {
        self.inflight = n.clamp(1, 60_000);
        self
    }
    pub fn interval(mut self, every: Duration) -> Self {
        self.interval = Some(every);
        self
    }
    pub fn probe(mut self, http_port: u16, sample: &str) -> Self {
        self.probe = Some((http_port, sample.to_string()));
        self
    }
    pub fn exit_when_done(mut self) -> Self {
        self.exit_when_done = true;
        self
    }
}

/// A metric value read right after one PUBACK.
#[derive(Clone, Debug)]
pub struct AckProbe {
    /// The acknowledged seq.
    pub seq: u64,
    /// Distinct seqs acknowledged so far, this one included.
    pub acked: usize,
    /// The probed sample (NaN if absent or unreadable).
    pub value: f64,
}

/// Counters of one device.
#[derive(Clone, Debug, Default)]
pub struct DeviceStats {
    /// Successful CONNECT/CONNACK exchanges.
    pub connects: u64,
    /// Failed connection attempts (refused, timed out, CONNACK not 0).
    pub connect_failures: u64,
    /// PUBLISH packets written (resends included).
    pub sent: u64,
    /// PUBLISH packets written again after a reconnect.
    pub resent: u64,
    /// Highest seq ever sent, plus one (0: nothing sent).
    pub next_seq: u64,
    /// The device stopped because it could not reconnect within `reconnect_for`.
    pub gave_up: bool,
    /// The last connection or protocol error seen.
    pub last_error: Option<String>,
}

#[derive(Default)]
struct Shared {
    /// Set by [`Device::finish`]: publish nothing new, end once nothing is in flight.
    draining: std::sync::atomic::AtomicBool,
    acked: Mutex<BTreeSet<u64>>,
    stats: Mutex<DeviceStats>,
    probes: Mutex<Vec<AckProbe>>,
}

/// What a device reports when stopped.
#[derive(Clone, Debug)]
pub struct DeviceReport {
    pub src: String,
    pub acked: BTreeSet<u64>,
    pub stats: DeviceStats,
    pub probes: Vec<AckProbe>,
}

/// A running simulated device.
pub struct Device {
    pub src: String,
    shared: Arc<Shared>,
    limit: Arc<AtomicU64>,
    wake: Arc<Notify>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Device {
    /// Starts the device task on the current runtime.
    pub fn spawn(cfg: DeviceConfig) -> Device {
        let shared = Arc::new(Shared::default());
        let limit = Arc::new(AtomicU64::new(cfg.max));
        let wake = Arc::new(Notify::new());
        let stop = CancellationToken::new();
        let src = cfg.src.clone();
        let task = tokio::spawn(run(
            cfg,
            shared.clone(),
            limit.clone(),
            wake.clone(),
            stop.clone(),
        ));
        Device {
            src,
            shared,
            limit,
            wake,
            stop,
            task: Some(task),
        }
    }

    /// Lets the device publish seqs up to (not including) `max`.
    pub fn allow_up_to(&self, max: u64) {
        self.limit.fetch_max(max, Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// The current publish limit.
    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::SeqCst)
    }

    /// Seqs acknowledged so far.
    pub fn acked(&self) -> BTreeSet<u64> {
        self.shared.acked.lock().unwrap().clone()
    }

    /// Number of seqs acknowledged so far.
    pub fn acked_count(&self) -> usize {
        self.shared.acked.lock().unwrap().len()
    }

    pub fn stats(&self) -> DeviceStats {
        self.shared.stats.lock().unwrap().clone()
    }

    pub fn probes(&self) -> Vec<AckProbe> {
        self.shared.probes.lock().unwrap().clone()
    }

    /// Whether the device task ended (done, gave up).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Publishes nothing new, waits (at most `within`) until everything sent so far is
    /// acknowledged, then stops and reports. `report.drained()` tells whether it got there.
    pub async fn finish(mut self, within: Duration) -> DeviceReport {
        self.shared.draining.store(true, Ordering::SeqCst);
        self.wake.notify_one();
        if let Some(mut t) = self.task.take() {
            if tokio::time::timeout(within, &mut t).await.is_err() {
                self.stop.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
            }
        }
        self.report()
    }

    /// Stops at once (what is in flight stays unacknowledged) and reports.
    pub async fn stop(mut self) -> DeviceReport {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        self.report()
    }

    /// A snapshot of what the device saw so far.
    pub fn report(&self) -> DeviceReport {
        DeviceReport {
            src: self.src.clone(),
            acked: self.acked(),
            stats: self.stats(),
            probes: self.probes(),
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl DeviceReport {
    /// Whether every seq the device ever sent was acknowledged.
    pub fn drained(&self) -> bool {
        self.acked.len() as u64 == self.stats.next_seq
    }
}

/// Stops every device and returns their reports, in order.
pub async fn stop_all(devices: Vec<Device>) -> Vec<DeviceReport> {
    let mut out = Vec::new();
    for d in devices {
        out.push(d.stop().await);
    }
    out
}

/// Total acknowledged over several devices.
pub fn total_acked(devices: &[Device]) -> usize {
    devices.iter().map(|d| d.acked_count()).sum()
}

// ---------------------------------------------------------------------------------------------
// The device task

/// Per-device state that survives reconnects.
struct Progress {
    /// Next new seq to publish.
    next_new: u64,
    /// Sent on an earlier connection, not acknowledged: resent first after a reconnect.
    resend: BTreeSet<u64>,
}

enum Ended {
    /// Stop requested, or all done.
    Finished,
    /// The connection broke; reconnect.
    Broken(String),
}

async fn run(
    cfg: DeviceConfig,
    shared: Arc<Shared>,
    limit: Arc<AtomicU64>,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut progress = Progress {
        next_new: 0,
        resend: BTreeSet::new(),
    };
    let mut last_ok = Instant::now();
    let mut backoff = Duration::from_millis(20);
    loop {
        if stop.is_cancelled() {
            return;
        }
        let draining = shared.draining.load(Ordering::SeqCst);
        let all_sent = progress.next_new >= limit.load(Ordering::SeqCst);
        if progress.resend.is_empty() && (draining || (cfg.exit_when_done && all_sent)) {
            return;
        }
        match connect(&cfg).await {
            Ok(stream) => {
                shared.stats.lock().unwrap().connects += 1;
                backoff = Duration::from_millis(20);
                let ended = session(&cfg, stream, &shared, &limit, &wake, &stop, &mut progress);
                match ended.await {
                    Ended::Finished => return,
                    Ended::Broken(e) => shared.stats.lock().unwrap().last_error = Some(e),
                }
                last_ok = Instant::now();
            }
            Err(e) => {
                let mut s = shared.stats.lock().unwrap();
                s.connect_failures += 1;
                s.last_error = Some(e);
            }
        }
        if last_ok.elapsed() > cfg.reconnect_for {
            shared.stats.lock().unwrap().gave_up = true;
            return;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_millis(250));
    }
}

/// TCP connect, CONNECT (clean session, keepalive 0), CONNACK 0.
async fn connect(cfg: &DeviceConfig) -> Result<TcpStream, String> {
    let attempt = async {
        let mut s = TcpStream::connect(("127.0.0.1", cfg.port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = s.set_nodelay(true);
        let client_id = format!("dev-{}", cfg.src);
        let mut body = Vec::new();
        put_str(&mut body, b"MQTT");
        body.push(4); // protocol level 3.1.1
        body.push(0x02); // clean session
        body.extend_from_slice(&0u16.to_be_bytes()); // keepalive 0: no idle limit
        put_str(&mut body, client_id.as_bytes());
        let mut pkt = vec![0x10];
        put_len(&mut pkt, body.len());
        pkt.extend_from_slice(&body);
        s.write_all(&pkt)
            .await
            .map_err(|e| format!("CONNECT: {e}"))?;
        let mut connack = [0u8; 4];
        s.read_exact(&mut connack)
            .await
            .map_err(|e| format!("CONNACK: {e}"))?;
        if connack[0] != 0x20 || connack[1] != 2 || connack[3] != 0 {
            return Err(format!("CONNACK refused: {connack:?}"));
        }
        Ok(s)
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .map_err(|_| "CONNACK timeout".to_string())?
}

/// One connection: publish within the window, read PUBACKs, until it breaks or stops.
async fn session(
    cfg: &DeviceConfig,
    stream: TcpStream,
    shared: &Shared,
    limit: &AtomicU64,
    wake: &Notify,
    stop: &CancellationToken,
    progress: &mut Progress,
) -> Ended {
    let (mut rd, mut wr) = stream.into_split();
    let topic = format!("dev/{}/data", cfg.src);
    // pkid -> seq of what this connection sent and is not acknowledged yet.
    let mut inflight: HashMap<u16, u64> = HashMap::new();
    let mut next_pkid: u16 = 0;
    let mut inbuf = BytesMut::with_capacity(64 * 1024);
    let mut out = Vec::with_capacity(64 * 1024);
    // Pacing: one new message per tick; unpaced devices have unlimited allowance.
    let mut ticker = cfg.interval.map(|every| {
        let mut t = tokio::time::interval(every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    let mut allowance: u64 = if ticker.is_some() { 0 } else { u64::MAX };
    let resend_now: Vec<u64> = std::mem::take(&mut progress.resend).into_iter().collect();
    let mut resend_now = resend_now.into_iter().peekable();

    let broken = |progress: &mut Progress, inflight: &HashMap<u16, u64>, rest: Vec<u64>, why| {
        progress.resend.extend(inflight.values().copied());
        progress.resend.extend(rest);
        Ended::Broken(why)
    };

    loop {
        // Fill the window.
        out.clear();
        let max = limit.load(Ordering::SeqCst);
        let mut resent = 0u64;
        let mut sent = 0u64;
        while inflight.len() < cfg.inflight {
            let (seq, dup) = if let Some(s) = resend_now.next() {
                (s, true)
            } else if progress.next_new < max
                && allowance > 0
                && !shared.draining.load(Ordering::SeqCst)
            {
                let s = progress.next_new;
                progress.next_new += 1;
                if allowance != u64::MAX {
                    allowance -= 1;
                }
                (s, false)
            } else {
                break;
            };
            loop {
                next_pkid = next_pkid.wrapping_add(1).max(1);
                if !inflight.contains_key(&next_pkid) {
                    break;
                }
            }
            inflight.insert(next_pkid, seq);
            put_publish(
                &mut out,
                &topic,
                next_pkid,
                &payload(&cfg.src, seq, cfg.size),
                dup,
            );
            sent += 1;
            resent += u64::from(dup);
        }
        if sent > 0 {
            {
                let mut s = shared.stats.lock().unwrap();
                s.sent += sent;
                s.resent += resent;
                s.next_seq = s.next_seq.max(progress.next_new);
            }
            let written = tokio::select! {
                _ = stop.cancelled() => return Ended::Finished,
                r = wr.write_all(&out) => r,
            };
            if let Err(e) = written {
                let rest: Vec<u64> = resend_now.collect();
                return broken(progress, &inflight, rest, format!("write: {e}"));
            }
        }
        let draining = shared.draining.load(Ordering::SeqCst);
        if (cfg.exit_when_done || draining)
            && inflight.is_empty()
            && resend_now.peek().is_none()
            && (draining || progress.next_new >= limit.load(Ordering::SeqCst))
        {
            let _ = wr.write_all(&[0xE0, 0x00]).await; // DISCONNECT
            return Ended::Finished;
        }

        // Wait for a packet, a tick, a raised limit or the stop.
        let n = tokio::select! {
            _ = stop.cancelled() => return Ended::Finished,
            _ = wake.notified() => continue,
            _ = async {
                match ticker.as_mut() {
                    Some(t) => { t.tick().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {
                allowance = allowance.saturating_add(1);
                continue;
            }
            r = rd.read_buf(&mut inbuf) => r,
        };
        match n {
            Ok(0) => {
                let rest: Vec<u64> = resend_now.collect();
                return broken(progress, &inflight, rest, "closed by the gateway".into());
            }
            Err(e) => {
                let rest: Vec<u64> = resend_now.collect();
                return broken(progress, &inflight, rest, format!("read: {e}"));
            }
            Ok(_) => {}
        }
        // Handle every complete packet.
        while let Ok(Some((first, body_at, total))) = frame(&inbuf) {
            let kind = first & 0xF0;
            if kind == 0x40 && total - body_at >= 2 {
                let pkid = u16::from_be_bytes([inbuf[body_at], inbuf[body_at + 1]]);
                if let Some(seq) = inflight.remove(&pkid) {
                    let acked = {
                        let mut a = shared.acked.lock().unwrap();
                        a.insert(seq);
                        a.len()
                    };
                    if let Some((http, sample)) = &cfg.probe {
                        let value = metric(*http, sample).await;
                        shared
                            .probes
                            .lock()
                            .unwrap()
                            .push(AckProbe { seq, acked, value });
                    }
                }
            }
            inbuf.advance(total);
        }
    }
}

/// One complete packet at the front of `buf`: `(first byte, body start, packet end)`.
/// `Ok(None)`: not all of it is there yet. Shared with `benches/bridge.rs`.
pub fn frame(buf: &[u8]) -> Result<Option<(u8, usize, usize)>, String> {
    let (mut len, mut mult, mut i) = (0usize, 1usize, 1usize);
    loop {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        len += (b & 0x7f) as usize * mult;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        mult *= 128;
        if i > 4 {
            return Err("malformed remaining length".into());
        }
    }
    Ok((buf.len() >= i + len).then_some((buf[0], i, i + len)))
}

/// Appends an MQTT remaining length.
pub fn put_len(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
}

/// Appends a length-prefixed MQTT string.
pub fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn put_publish(out: &mut Vec<u8>, topic: &str, pkid: u16, payload: &[u8], dup: bool) {
    out.push(0x32 | if dup { 0x08 } else { 0 });
    put_len(out, 2 + topic.len() + 2 + payload.len());
    put_str(out, topic.as_bytes());
    out.extend_from_slice(&pkid.to_be_bytes());
    out.extend_from_slice(payload);
}

// ---------------------------------------------------------------------------------------------
// Async access to the gateway's operator endpoint (the harness's `Gateway::get` is blocking).

/// `GET path` on `127.0.0.1:port`; the body, or None.
pub async fn http_get(port: u16, path: &str) -> Option<String> {
    let fetch = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (_, body) = text.split_once("\r\n\r\n")?;
        Some(body.to_string())
    };
    tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .ok()
        .flatten()
}

/// One Prometheus sample from `GET /metrics`, NaN if absent.
pub async fn metric(port: u16, sample: &str) -> f64 {
    let text = http_get(port, "/metrics").await.unwrap_or_default();
    text.lines()
        .find_map(|l| {
            let (name, v) = l.rsplit_once(' ')?;
            (name == sample).then(|| v.parse().ok())?
        })
        .unwrap_or(f64::NAN)
}
