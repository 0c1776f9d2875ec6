//! The operator endpoint: `GET /metrics` (Prometheus text) and `GET /health` (JSON), plus the
//! OTA endpoints when OTA is enabled:
//! - `GET|HEAD /ota/image/<sha256>` and `/ota/image/<name>/<version>`: a verified firmware
//!   image, with `Range: bytes=a-b | a- | -n` (206 + `Content-Range`; 416 for a range outside
//!   the image; several ranges are answered with the whole image, 200). Only images the
//!   gateway verified are listed. With `?device=<id>` (as in the metadata `url`) the
//!   transfer runs under that device's OTA download slot, which it keeps across its
//!   requests until it is done (see [`crate::ota::serve`]), and the bytes are reported to
//!   the OTA manager as served to it; without, each transfer holds a slot of its own. No slot:
//!   503 with `Retry-After: <s>` and a JSON body `{"code":"busy","reason","retry_after",
//!   "position"?}` (also when the address holds `ota.max_downloads_per_ip` already).
//!   Transfers are paced by `ota.max_bytes_per_sec`;
//! - `GET /ota/status`, `/ota/status/device/<id>`, `/ota/status/rollout/<id>`: JSON status.
//!
//! A deliberately tiny HTTP/1.1 server: one request per connection, request head at most
//! 8 KiB, 5 s to send it, then the connection is closed. Small answers must be written within
//! 5 s; an image transfer may take as long as it needs but no single write may stall for more
//! than `ota.stall_timeout` (then it is cut, counted as `http_stalled`, and its slot is free).
//! It only reads shared state, so a slow or hostile client cannot stall the pipeline.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::bridge::metrics::CloudMetrics;
use crate::component::Running;
use crate::metrics::{Metrics, Registry};
use crate::store::Store;

/// `[metrics]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve `/metrics` and `/health`.
    pub enabled: bool,
    /// Address of the HTTP endpoint. Keep it on loopback unless a firewall protects it.
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9183)),
        }
    }
}

/// What `/health` reports besides the metrics.
#[derive(Clone)]
pub struct HealthSource {
    /// Every component's metrics, for `/metrics`.
    pub registry: Arc<Registry>,
    /// The cloud link's state.
    pub cloud: Arc<CloudMetrics>,
    /// The OTA families (image requests are counted there).
    pub metrics: Arc<Metrics>,
    /// The queue.
    pub store: Arc<Store>,
    /// Whether a cloud is configured.
    pub cloud_enabled: bool,
    /// Gateway id.
    pub gateway_id: String,
    /// The OTA manager's handle, when OTA is enabled.
    pub ota: Option<crate::ota::OtaHandle>,
}

impl HealthSource {
    /// The `/health` document.
    pub fn json(&self) -> serde_json::Value {
        let m = self.store.metrics();
        let cloud = if !self.cloud_enabled {
            "disabled"
        } else if self.cloud.cloud_connected.get() == 1 {
            "connected"
        } else {
            "disconnected"
        };
        let refusing = m.store_refusing_cause();
        let degraded = cloud == "disconnected" || refusing.is_some();
        serde_json::json!({
            "status": if degraded { "degraded" } else { "ok" },
            "gateway_id": self.gateway_id,
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": self.registry.uptime_secs(),
            "cloud": cloud,
            "queue": {
                "records": self.store.records(),
                "bytes": self.store.bytes(),
                "oldest_age_seconds": self.store.oldest_age().map(|d| d.as_secs_f64()).unwrap_or(0.0),
            },
            "messages_in": m.messages_in.get(),
            "messages_out": m.messages_out.get(),
            "store_quarantined": m.store_quarantined.get() == 1,
            "store": match refusing {
                None => serde_json::json!({ "state": "ok" }),
                Some(cause) => serde_json::json!({ "state": "refusing", "cause": cause }),
            },
        })
    }
}

/// The endpoint, bound and ready to serve.
pub struct Http {
    listener: TcpListener,
    health: HealthSource,
}

impl Http {
    /// Binds `[metrics].listen`; a port in use fails here, at start-up.
    pub async fn build(cfg: &MetricsConfig, health: HealthSource) -> std::io::Result<Http> {
        let listener = TcpListener::bind(cfg.listen).await?;
        Ok(Http { listener, health })
    }

    /// Serves until `stop` is cancelled.
    pub fn start(self, stop: CancellationToken) -> Running {
        let task = tokio::spawn(serve(self.listener, self.health, stop.clone()));
        Running::tasks("metrics", stop, vec![task])
    }
}

/// Serves until `stop` is cancelled.
async fn serve(listener: TcpListener, health: HealthSource, stop: CancellationToken) {
    if let Ok(a) = listener.local_addr() {
        info!(addr = %a, "metrics endpoint listening");
    }
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((sock, peer)) => {
                    let h = health.clone();
                    // Bounded by its own timeouts (see the module header); ends by itself.
                    tokio::spawn(async move {
                        let _ = handle(sock, peer.ip(), h).await;
                    });
                }
                Err(e) => {
                    debug!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

const SMALL: Duration = Duration::from_secs(5);

async fn read_head(sock: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = sock.read(&mut chunk).await?;
        if n == 0 || buf.len() > 8192 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

async fn handle(mut sock: TcpStream, peer: IpAddr, h: HealthSource) -> std::io::Result<()> {
    let Ok(head) = tokio::time::timeout(SMALL, read_head(&mut sock)).await else {
        return Ok(());
    };
    let Some(head) = head? else { return Ok(()) };
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if let (Some(ota), Some(what)) = (&h.ota, path.strip_prefix("/ota/image/")) {
        if method == "GET" || method == "HEAD" {
            let range = header(&head, "range");
            let req = ImageRequest {
                what,
                range,
                head_only: method == "HEAD",
                peer,
            };
            return ota_image(&mut sock, ota, &h.metrics, req).await;
        }
    }
    let ota_status = match (&h.ota, method, path.strip_prefix("/ota/status")) {
        (Some(ota), "GET", Some(rest)) => {
            let q = if rest.is_empty() || rest == "/" {
                Some(crate::ota::Query::All)
            } else if let Some(d) = rest.strip_prefix("/device/") {
                Some(crate::ota::Query::Device(d.to_string()))
            } else {
                rest.strip_prefix("/rollout/")
                    .map(|r| crate::ota::Query::Rollout(r.to_string()))
            };
            match q {
                Some(q) => Some(ota.query(q).await),
                None => Some(None),
            }
        }
        _ => None,
    };
    let (status, ctype, body) = match (method, path) {
        _ if ota_status.is_some() => match ota_status.flatten() {
            Some(v) => ("200 OK", "application/json", v.to_string()),
            None => (
                "404 Not Found",
                "application/json",
                "{\"error\":\"unknown device or rollout\"}".into(),
            ),
        },
        ("GET", "/metrics") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            h.registry.render(),
        ),
        ("GET", "/health") => ("200 OK", "application/json", h.json().to_string()),
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "try /metrics or /health\n".into(),
        ),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(SMALL, async {
        sock.write_all(head.as_bytes()).await?;
        sock.write_all(body.as_bytes()).await?;
        sock.shutdown().await
    })
    .await;
    Ok(())
}

/// The value of header `name` (lower case) in a request head.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

async fn small(sock: &mut TcpStream, status: &str, extra: &str, body: &str) -> std::io::Result<()> {
    small_typed(sock, status, "text/plain", extra, body).await
}

async fn small_typed(
    sock: &mut TcpStream,
    status: &str,
    ctype: &str,
    extra: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(SMALL, sock.write_all(head.as_bytes())).await;
    Ok(())
}

/// One image request: what, which bytes, and from whom.
struct ImageRequest<'a> {
    what: &'a str,
    range: Option<&'a str>,
    head_only: bool,
    peer: IpAddr,
}

/// Streams (a range of) a verified image.
async fn ota_image(
    sock: &mut TcpStream,
    ota: &crate::ota::OtaHandle,
    metrics: &Metrics,
    req: ImageRequest<'_>,
) -> std::io::Result<()> {
    let ImageRequest {
        what,
        range,
        head_only,
        peer,
    } = req;
    let (what, query) = what.split_once('?').unwrap_or((what, ""));
    let device = crate::ota::protocol::query_value(query, "device");
    let img = ota.catalog.borrow().find(what);
    let Some(img) = img else {
        metrics.ota.error("http_not_found");
        return small(
            sock,
            "404 Not Found",
            "",
            "no verified image by that name\n",
        )
        .await;
    };
    let r = match crate::ota::serve::parse_range(range, img.size) {
        Ok(r) => r,
        Err(_) => {
            metrics.ota.error("http_bad_range");
            let extra = format!("Content-Range: bytes */{}\r\n", img.size);
            return small(sock, "416 Range Not Satisfiable", &extra, "bad range\n").await;
        }
    };
    // A device (`?device=`) keeps one slot across its requests; without an id, per request.
    let _slot = match ota.slots.for_http(device.as_deref(), peer, img.size) {
        Ok(slot) => slot,
        Err(w) => {
            let reason = match (w.why, w.position) {
                (crate::ota::serve::Busy::Address, _) => {
                    metrics.ota.error("busy_per_ip");
                    "this address holds ota.max_downloads_per_ip downloads already".to_string()
                }
                (crate::ota::serve::Busy::All, Some(p)) => {
                    metrics.ota.error("busy");
                    format!("all download slots are taken; you are number {p} in line")
                }
                (crate::ota::serve::Busy::All, None) => {
                    metrics.ota.error("busy");
                    "all download slots are taken".to_string()
                }
            };
            let mut body = serde_json::json!({
                "code": "busy",
                "reason": format!("{reason}: ask again in {} s", w.retry_after),
                "retry_after": w.retry_after,
            });
            if let (Some(p), Some(o)) = (w.position, body.as_object_mut()) {
                o.insert("position".into(), p.into());
            }
            return small_typed(
                sock,
                "503 Service Unavailable",
                "application/json",
                &format!("Retry-After: {}\r\n", w.retry_after),
                &body.to_string(),
            )
            .await;
        }
    };
    let (start, end, status, extra) = match r {
        Some(r) => (
            r.start,
            r.end,
            "206 Partial Content",
            format!(
                "Content-Range: bytes {}-{}/{}\r\n",
                r.start, r.end, img.size
            ),
        ),
        None => (0, img.size.saturating_sub(1), "200 OK", String::new()),
    };
    let len = if img.size == 0 { 0 } else { end - start + 1 };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\nAccept-Ranges: bytes\r\nETag: \"{}\"\r\n{extra}Connection: close\r\n\r\n",
        img.sha256
    );
    let stall = ota.stall_timeout;
    let stalled = || {
        metrics.ota.error("http_stalled");
        debug!(%peer, ?stall, "image transfer cut: the client read nothing");
        std::io::Error::new(std::io::ErrorKind::TimedOut, "client stalled")
    };
    tokio::time::timeout(stall, sock.write_all(head.as_bytes()))
        .await
        .map_err(|_| stalled())??;
    if head_only {
        return Ok(());
    }
    let mut tally = device.as_ref().map(|_| ota.served_tally());
    let sent = async {
        let mut off = start;
        while off <= end && len > 0 {
            let n = (end - off + 1).min(64 * 1024) as usize;
            ota.pacer.take(n as u64).await;
            let img2 = img.clone();
            let data =
                tokio::task::spawn_blocking(move || crate::ota::cache::read_at(&img2.file, off, n))
                    .await
                    .map_err(std::io::Error::other)??;
            tokio::time::timeout(stall, sock.write_all(&data))
                .await
                .map_err(|_| stalled())??;
            metrics.ota.served("http", n as u64);
            ota.slots.served(device.as_deref(), n as u64);
            if let (Some(t), Some(d)) = (tally.as_mut(), device.as_deref()) {
                t.add(d, &img.sha256, crate::ota::serve::Via::Http, n as u64);
            }
            off += n as u64;
        }
        let _ = tokio::time::timeout(SMALL, sock.shutdown()).await;
        Ok(())
    }
    .await;
    if let Some(t) = tally {
        t.finish().await;
    }
    sent
}
