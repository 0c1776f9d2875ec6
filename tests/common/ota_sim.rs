//! OTA test parts: an HTTPS firmware store (the cloud's side) and simulated field devices
//! that update over MQTT chunks or HTTP `Range`, as a device firmware would.
//!
//! - [`FirmwareServer`]: tokio-rustls with the test PKI's server certificate; counts every
//!   request (path and `Range` header), supports `Range: bytes=N-`, and can be told to cut the
//!   next body after some bytes, to hold the next body after some bytes until the test
//!   releases it (a slow store, without timing), or to serve corrupted bytes;
//! - [`run_device`]: one device, a plain rumqttc client of the gateway's broker, through the
//!   whole protocol (request -> metadata -> chunks or HTTP ranges -> progress -> verify ->
//!   done), optionally restarting mid-way. It only trusts what it reassembled: its own sha256.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Value as Json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Pki;

/// sha256 hex.
pub fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A deterministic pseudo-random image of `size` bytes.
pub fn image(size: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// One request the firmware store saw.
#[derive(Debug, Clone)]
pub struct FwRequest {
    pub path: String,
    pub range: Option<String>,
}

/// The cloud's firmware store over HTTPS.
pub struct FirmwareServer {
    pub port: u16,
    requests: Arc<Mutex<Vec<FwRequest>>>,
    /// Body bytes written in total.
    pub body_bytes: Arc<AtomicU64>,
    cuts: Arc<Mutex<VecDeque<u64>>>,
    holds: Arc<Mutex<VecDeque<u64>>>,
    released: Arc<tokio::sync::Semaphore>,
    corrupt: Arc<AtomicU32>,
    stop: CancellationToken,
}

/// What one response may be told to do.
struct Faults {
    cuts: Arc<Mutex<VecDeque<u64>>>,
    holds: Arc<Mutex<VecDeque<u64>>>,
    released: Arc<tokio::sync::Semaphore>,
    corrupt: Arc<AtomicU32>,
}

impl FirmwareServer {
    pub async fn start(pki: &Pki, image: Vec<u8>) -> FirmwareServer {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&pki.server.cert)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(&pki.server.key).unwrap();
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let s = FirmwareServer {
            port,
            requests: Arc::default(),
            body_bytes: Arc::default(),
            cuts: Arc::default(),
            holds: Arc::default(),
            released: Arc::new(tokio::sync::Semaphore::new(0)),
            corrupt: Arc::default(),
            stop: CancellationToken::new(),
        };
        let image = Arc::new(image);
        let (reqs, bytes, stop) = (s.requests.clone(), s.body_bytes.clone(), s.stop.clone());
        let faults = Arc::new(Faults {
            cuts: s.cuts.clone(),
            holds: s.holds.clone(),
            released: s.released.clone(),
            corrupt: s.corrupt.clone(),
        });
        tokio::spawn(async move {
            loop {
                let (sock, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                };
                let (acceptor, image, reqs, bytes, faults) = (
                    acceptor.clone(),
                    image.clone(),
                    reqs.clone(),
                    bytes.clone(),
                    faults.clone(),
                );
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(sock).await else {
                        return;
                    };
                    let _ = serve_one(tls, &image, &reqs, &bytes, &faults).await;
                });
            }
        });
        s
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}/fw/image.bin", self.port)
    }

    /// The next response's body is cut after `n` bytes.
    pub fn cut_next_after(&self, n: u64) {
        self.cuts.lock().unwrap().push_back(n);
    }

    /// The next response's body stops after `n` bytes until [`FirmwareServer::release`].
    pub fn hold_next_after(&self, n: u64) {
        self.holds.lock().unwrap().push_back(n);
    }

    /// Lets a held body go on.
    pub fn release(&self) {
        self.released.add_permits(1);
    }

    /// The next `k` responses serve corrupted bytes.
    pub fn corrupt_next(&self, k: u32) {
        self.corrupt.store(k, Ordering::SeqCst);
    }

    pub fn requests(&self) -> Vec<FwRequest> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for FirmwareServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn serve_one(
    mut s: tokio_rustls::server::TlsStream<TcpStream>,
    image: &[u8],
    reqs: &Mutex<Vec<FwRequest>>,
    bytes: &AtomicU64,
    faults: &Faults,
) -> std::io::Result<()> {
    let Faults {
        cuts,
        holds,
        released,
        corrupt,
    } = faults;
    let mut buf = Vec::new();
    let mut tmp = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut tmp).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
    let range = head.split("\r\n").find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("range")
            .then(|| v.trim().to_string())
    });
    reqs.lock().unwrap().push(FwRequest {
        path: path.clone(),
        range: range.clone(),
    });
    if path != "/fw/image.bin" {
        s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await?;
        return s.shutdown().await;
    }
    let size = image.len() as u64;
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<u64>().ok());
    let (status, start, extra) = match start {
        Some(n) if n < size => (
            "206 Partial Content",
            n,
            format!("Content-Range: bytes {n}-{}/{size}\r\n", size - 1),
        ),
        Some(_) => {
            s.write_all(b"HTTP/1.1 416 Range Not Satisfiable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await?;
            return s.shutdown().await;
        }
        None => ("200 OK", 0, String::new()),
    };
    let mut body = image[start as usize..].to_vec();
    if corrupt
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |k| k.checked_sub(1))
        .is_ok()
        && !body.is_empty()
    {
        let mid = body.len() / 2;
        body[mid] ^= 0xff;
    }
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    let cut = cuts.lock().unwrap().pop_front();
    let send = cut
        .map(|c| (c as usize).min(body.len()))
        .unwrap_or(body.len());
    let hold = holds.lock().unwrap().pop_front();
    let held = hold.map(|h| (h as usize).min(send)).unwrap_or(0);
    for piece in body[..held].chunks(16 * 1024) {
        s.write_all(piece).await?;
        bytes.fetch_add(piece.len() as u64, Ordering::SeqCst);
    }
    if hold.is_some() {
        s.flush().await?;
        // Bounded: a test that never releases does not leave the store hanging.
        if let Ok(Ok(p)) = tokio::time::timeout(Duration::from_secs(120), released.acquire()).await
        {
            p.forget();
        }
    }
    for piece in body[held..send].chunks(16 * 1024) {
        s.write_all(piece).await?;
        bytes.fetch_add(piece.len() as u64, Ordering::SeqCst);
    }
    s.flush().await?;
    if cut.is_some() {
        // Drop the connection without close_notify: a cut, as a broken link would.
        tokio::time::sleep(Duration::from_millis(50)).await;
        return Ok(());
    }
    s.shutdown().await
}

// ---------------------------------------------------------------------------------------------
// Devices

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Mqtt,
    Http,
}

#[derive(Debug, Clone)]
pub struct DeviceOpts {
    pub id: String,
    pub mqtt_port: u16,
    pub via: Via,
    /// Chunks per `chunk/get` (MQTT), or bytes per range request (HTTP).
    pub window: u64,
    /// Disconnect and reconnect (resuming) after this many chunks / bytes.
    pub restart_after: Option<u64>,
    /// Overall deadline.
    pub deadline: Duration,
}

impl DeviceOpts {
    pub fn new(id: &str, mqtt_port: u16, via: Via) -> DeviceOpts {
        DeviceOpts {
            id: id.into(),
            mqtt_port,
            via,
            window: if via == Via::Mqtt { 16 } else { 64 * 1024 },
            restart_after: None,
            deadline: Duration::from_secs(120),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct DeviceResult {
    pub id: String,
    pub sha256: String,
    pub size: u64,
    /// Chunks (MQTT) or range responses (HTTP) received, duplicates included.
    pub pieces: u64,
    /// Request -> arrival, per chunk or range.
    pub latencies: Vec<Duration>,
    /// `next_chunk` the gateway reported after the restart.
    pub resumed_next_chunk: Option<u64>,
    /// First chunk / byte asked for after the restart.
    pub resumed_from: Option<u64>,
    /// Whether the gateway answered `success` to the verify.
    pub success: bool,
    /// The metadata the device followed.
    pub metadata: Json,
    /// Every `busy` answer (MQTT error reply or HTTP 503) the device got, in order.
    pub busy: Vec<BusyAnswer>,
}

/// One `busy` answer, as the device saw it.
#[derive(Debug, Clone)]
pub struct BusyAnswer {
    /// Whether the device had received image bytes already (a refusal mid-download).
    pub started: bool,
    /// The `retry_after` of the MQTT reply or of the HTTP JSON body.
    pub retry_after: Option<u64>,
    /// The HTTP `Retry-After` header.
    pub header: Option<u64>,
    /// The whole answer (JSON reply or body), for a failure message.
    pub raw: String,
}

/// How long a device waits after `busy`: `retry_after` when the gateway gave one (at most 60 s:
/// the device's own bound), else 200 ms.
fn busy_wait(retry_after: Option<u64>) -> Duration {
    retry_after.map_or(Duration::from_millis(200), |s| {
        Duration::from_secs(s.min(60))
    })
}

/// A device's MQTT session: client plus the messages on `ota/<id>/#`.
pub struct Session {
    pub client: AsyncClient,
    pub rx: mpsc::UnboundedReceiver<(String, Vec<u8>, Instant)>,
    stop: CancellationToken,
    poller: tokio::task::JoinHandle<()>,
    /// QoS 1 publishes handed to the client and not yet acknowledged by the gateway.
    unacked: Arc<AtomicU64>,
}

impl Session {
    /// Connects and subscribes to `ota/<id>/#`. A connection the broker drops before the
    /// SUBACK is abandoned and a new one made with a fresh client id (see [`Self::try_connect`]).
    pub async fn connect(port: u16, id: &str) -> Session {
        let mut last = String::new();
        for _ in 0..5 {
            match Self::try_connect(port, id).await {
                Ok(s) => return s,
                Err(e) => last = e,
            }
        }
        panic!("device {id}: cannot connect: {last}");
    }

    /// One connection attempt, with a fresh MQTT client id (as a rebooted device with a random
    /// client id), never reconnected by rumqttc.
    ///
    /// Why: rumqttd 0.20's front end has two races this must not trip over. (1) A connection
    /// id freed by a disconnect is reused, and the old connection's late `Disconnect` event can
    /// drop the new connection during its CONNECT ("Remote link error ... Disconnected").
    /// (2) That failed connection leaves its will-channel sender registered; the next CONNECT
    /// with the same client id then `unwrap`s a send on it and panics while holding the
    /// will-handler lock, which poisons it: the broker refuses every connection from then on.
    /// So a dropped session is never reconnected with the same client id.
    pub async fn try_connect(port: u16, id: &str) -> Result<Session, String> {
        static SESSION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SESSION.fetch_add(1, Ordering::SeqCst);
        let mut o = MqttOptions::new(format!("dev-{id}-{n}"), "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(2 << 20, 2 << 20);
        o.set_clean_session(true);
        let (client, mut el) = AsyncClient::new(o, 256);
        let (tx, rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let s2 = stop.clone();
        let (ack_tx, ack_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
        let mut ack_tx = Some(ack_tx);
        let (sub_client, filter) = (client.clone(), format!("ota/{id}/#"));
        let unacked = Arc::new(AtomicU64::new(0));
        let unacked2 = unacked.clone();
        let poller = tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    _ = s2.cancelled() => return,
                    ev = el.poll() => ev,
                };
                match ev {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send((p.topic.clone(), p.payload.to_vec(), Instant::now()));
                    }
                    // After our DISCONNECT the event loop must not be polled again: rumqttc
                    // would reconnect with the same client id.
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = sub_client.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(t) = ack_tx.take() {
                            let _ = t.send(Ok(()));
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        unacked2.fetch_sub(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        // The session is over (see above): its receiver closes.
                        if let Some(t) = ack_tx.take() {
                            let _ = t.send(Err(e.to_string()));
                        }
                        return;
                    }
                }
            }
        });
        let r = tokio::time::timeout(Duration::from_secs(30), ack_rx).await;
        match r {
            Ok(Ok(Ok(()))) => Ok(Session {
                client,
                rx,
                stop,
                poller,
                unacked,
            }),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err("session task ended".into()),
            Err(_) => {
                stop.cancel();
                Err("no SUBACK within 30 s".into())
            }
        }
    }

    pub async fn send(&self, id: &str, kind: &str, v: Json) {
        self.send_raw(id, kind, v.to_string().into_bytes()).await;
    }

    pub async fn send_raw(&self, id: &str, kind: &str, payload: Vec<u8>) {
        self.unacked.fetch_add(1, Ordering::SeqCst);
        self.client
            .publish(format!("ota/{id}/{kind}"), QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }

    /// The next message on `ota/<id>/<kind>` for one of `kinds`, within `within`.
    pub async fn expect(
        &mut self,
        id: &str,
        kinds: &[&str],
        within: Duration,
    ) -> Option<(String, Vec<u8>)> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (t, p, _) = tokio::time::timeout(left, self.rx.recv()).await.ok()??;
            let kind = t
                .strip_prefix(&format!("ota/{id}/"))
                .unwrap_or("")
                .to_string();
            if kinds.contains(&kind.as_str()) {
                return Some((kind, p));
            }
        }
    }

    /// Disconnects once every publish is acknowledged (bounded), as a QoS 1 device must: the
    /// gateway acknowledges only what is on disk, a little later than it reads it, and a
    /// socket closed with acknowledgements still unread is reset, which discards whatever the
    /// gateway had not read yet (the device's last messages and its DISCONNECT).
    pub async fn close(self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.unacked.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = self.client.disconnect().await;
        if tokio::time::timeout(Duration::from_secs(5), self.poller)
            .await
            .is_err()
        {
            self.stop.cancel();
        }
    }
}

async fn get_metadata(s: &mut Session, id: &str, within: Duration) -> Result<Json, String> {
    s.send(id, "request", json!({"version": "1.0"})).await;
    match s.expect(id, &["metadata", "error"], within).await {
        Some((k, p)) if k == "metadata" => serde_json::from_slice(&p).map_err(|e| e.to_string()),
        Some((_, p)) => Err(format!("error reply: {}", String::from_utf8_lossy(&p))),
        None => Err("no metadata".into()),
    }
}

/// One device through the whole update. `Err` says where it got stuck.
pub async fn run_device(o: DeviceOpts) -> Result<DeviceResult, String> {
    let deadline = Instant::now() + o.deadline;
    let id = o.id.clone();
    let mut s = Session::connect(o.mqtt_port, &id).await;
    let md = get_metadata(&mut s, &id, o.deadline).await?;
    let size = md["size"].as_u64().ok_or("metadata without size")?;
    let chunk = md["chunk_size"].as_u64().ok_or("no chunk_size")?;
    let chunks = md["chunks"].as_u64().ok_or("no chunks")?;
    let version = md["version"].as_str().ok_or("no version")?.to_string();
    let url = md["url"].as_str().ok_or("no url")?.to_string();
    let mut r = DeviceResult {
        id: id.clone(),
        size,
        metadata: md.clone(),
        ..Default::default()
    };
    let mut data = vec![0u8; size as usize];
    let mut restarted = false;
    match o.via {
        Via::Mqtt => {
            let mut have = vec![false; chunks as usize];
            let mut next = 0u64;
            while next < chunks {
                if Instant::now() > deadline {
                    return Err(format!("{id}: deadline at chunk {next}/{chunks}"));
                }
                if let Some(k) = o.restart_after {
                    if !restarted && next >= k {
                        restarted = true;
                        s.close().await;
                        s = Session::connect(o.mqtt_port, &id).await;
                        let md2 = get_metadata(&mut s, &id, Duration::from_secs(30)).await?;
                        r.resumed_next_chunk = md2["next_chunk"].as_u64();
                        r.resumed_from = Some(next);
                    }
                }
                let end = (next + o.window).min(chunks);
                let want: Vec<u64> = (next..end).filter(|i| !have[*i as usize]).collect();
                let sent = Instant::now();
                s.send(
                    &id,
                    "chunk/get",
                    json!({"version": version, "from": next, "to": end - 1}),
                )
                .await;
                let mut missing: std::collections::BTreeSet<u64> = want.into_iter().collect();
                let mut tries = 0;
                while !missing.is_empty() {
                    let wait = Duration::from_secs(3);
                    match tokio::time::timeout(wait, s.rx.recv()).await {
                        Ok(Some((t, p, at))) => {
                            let Some(rest) = t.strip_prefix(&format!("ota/{id}/")) else {
                                continue;
                            };
                            if rest == "error" {
                                let e: Json = serde_json::from_slice(&p).unwrap_or(Json::Null);
                                if e["code"] == "busy" {
                                    let retry_after = e["retry_after"].as_u64();
                                    r.busy.push(BusyAnswer {
                                        started: r.pieces > 0,
                                        retry_after,
                                        header: None,
                                        raw: e.to_string(),
                                    });
                                    tokio::time::sleep(busy_wait(retry_after)).await;
                                    let l: Vec<u64> = missing.iter().copied().collect();
                                    s.send(
                                        &id,
                                        "chunk/get",
                                        json!({"version": version, "indexes": l}),
                                    )
                                    .await;
                                    continue;
                                }
                                return Err(format!("{id}: error {e}"));
                            }
                            let Some(i) = rest
                                .strip_prefix("chunk/")
                                .and_then(|i| i.parse::<u64>().ok())
                            else {
                                continue;
                            };
                            r.pieces += 1;
                            if i >= chunks {
                                return Err(format!("{id}: chunk {i} out of range"));
                            }
                            let off = (i * chunk) as usize;
                            if off + p.len() > data.len() {
                                return Err(format!("{id}: chunk {i} too long"));
                            }
                            data[off..off + p.len()].copy_from_slice(&p);
                            if missing.remove(&i) {
                                r.latencies.push(at.duration_since(sent));
                            }
                            have[i as usize] = true;
                        }
                        Ok(None) => return Err(format!("{id}: session ended")),
                        Err(_) => {
                            tries += 1;
                            if tries > 10 {
                                return Err(format!("{id}: chunks {missing:?} never came"));
                            }
                            let l: Vec<u64> = missing.iter().copied().collect();
                            s.send(&id, "chunk/get", json!({"version": version, "indexes": l}))
                                .await;
                        }
                    }
                }
                next = end;
                let received = (next * chunk).min(size);
                s.send(&id, "progress", json!({"version": version, "received": received, "total": size, "state": "downloading"})).await;
            }
        }
        Via::Http => {
            let mut off = 0u64;
            while off < size {
                if Instant::now() > deadline {
                    return Err(format!("{id}: deadline at byte {off}/{size}"));
                }
                if let Some(k) = o.restart_after {
                    if !restarted && off >= k {
                        restarted = true;
                        s.close().await;
                        s = Session::connect(o.mqtt_port, &id).await;
                        let md2 = get_metadata(&mut s, &id, Duration::from_secs(30)).await?;
                        r.resumed_next_chunk = md2["next_chunk"].as_u64();
                        r.resumed_from = Some(off);
                    }
                }
                let end = (off + o.window).min(size) - 1;
                let sent = Instant::now();
                match http_get_head(&url, Some(&format!("bytes={off}-{end}"))).await {
                    Ok((206, _, body)) => {
                        if body.len() as u64 != end - off + 1 {
                            return Err(format!(
                                "{id}: short range {} of {}",
                                body.len(),
                                end - off + 1
                            ));
                        }
                        data[off as usize..=end as usize].copy_from_slice(&body);
                        r.latencies.push(sent.elapsed());
                        r.pieces += 1;
                        off = end + 1;
                        s.send(&id, "progress", json!({"version": version, "received": off, "total": size, "state": "downloading"})).await;
                    }
                    Ok((503, head, body)) => {
                        let v: Json = serde_json::from_slice(&body).unwrap_or(Json::Null);
                        let header = head_value(&head, "retry-after").and_then(|v| v.parse().ok());
                        let retry_after = v["retry_after"].as_u64();
                        r.busy.push(BusyAnswer {
                            started: r.pieces > 0,
                            retry_after,
                            header,
                            raw: String::from_utf8_lossy(&body).into_owned(),
                        });
                        tokio::time::sleep(busy_wait(retry_after.or(header))).await;
                    }
                    Ok((st, _, _)) => return Err(format!("{id}: HTTP {st}")),
                    Err(e) => return Err(format!("{id}: HTTP {e}")),
                }
            }
        }
    }
    r.sha256 = sha256_hex(&data);
    s.send(
        &id,
        "progress",
        json!({"version": version, "received": size, "total": size, "state": "verifying"}),
    )
    .await;
    s.send(
        &id,
        "verify",
        json!({"version": version, "sha256": r.sha256}),
    )
    .await;
    match s
        .expect(&id, &["success", "retry"], Duration::from_secs(30))
        .await
    {
        Some((k, _)) if k == "success" => r.success = true,
        Some((_, p)) => return Err(format!("{id}: retry {}", String::from_utf8_lossy(&p))),
        None => return Err(format!("{id}: no verify answer")),
    }
    s.send(
        &id,
        "progress",
        json!({"version": version, "received": size, "total": size, "state": "installing"}),
    )
    .await;
    s.send(
        &id,
        "progress",
        json!({"version": version, "received": size, "total": size, "state": "done"}),
    )
    .await;
    s.close().await;
    Ok(r)
}

/// `GET url` with `Range: bytes=a-b` over plain TCP: (status, body).
pub async fn http_range(url: &str, a: u64, b: u64) -> std::io::Result<(u16, Vec<u8>)> {
    http_get(url, Some(&format!("bytes={a}-{b}"))).await
}

/// A minimal HTTP/1.1 GET: (status, body). Reads to EOF (the server closes).
pub async fn http_get(url: &str, range: Option<&str>) -> std::io::Result<(u16, Vec<u8>)> {
    http_get_head(url, range)
        .await
        .map(|(st, _, body)| (st, body))
}

/// The value of header `name` (any case) in a response head.
pub fn head_value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// A minimal HTTP/1.1 GET: (status, response head, body). Reads to EOF (the server closes).
pub async fn http_get_head(
    url: &str,
    range: Option<&str>,
) -> std::io::Result<(u16, String, Vec<u8>)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| std::io::Error::other("not http"))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut s = TcpStream::connect(authority).await?;
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\n");
    if let Some(r) = range {
        req.push_str(&format!("Range: {r}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut all))
        .await
        .map_err(|_| std::io::Error::other("timeout"))??;
    let i = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no head"))?;
    let head = String::from_utf8_lossy(&all[..i]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, head, all[i + 4..].to_vec()))
}

/// Percentile of durations (p in 0..=100).
pub fn percentile(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort_unstable();
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i.min(v.len() - 1)]
}

/// JSON payloads per cloud topic, from a collector's received list.
pub fn by_topic(received: &[(String, Vec<u8>)]) -> BTreeMap<String, Vec<Json>> {
    let mut m: BTreeMap<String, Vec<Json>> = BTreeMap::new();
    for (t, p) in received {
        m.entry(t.clone())
            .or_default()
            .push(serde_json::from_slice(p).unwrap_or(Json::Null));
    }
    m
}
