//! The operator endpoint: `GET /metrics` (Prometheus text) and `GET /health` (JSON), plus the
//! OTA routes when OTA is enabled (`/ota/image/...`, `/ota/status...`; they live with OTA, see
//! [`crate::ota::http`]).
//!
//! A deliberately tiny HTTP/1.1 server: one request per connection, request head at most
//! 8 KiB, 5 s to send it, then the connection is closed. Small answers must be written within
//! 5 s (image transfers have their own bound, see [`crate::ota::http`]). It only reads shared
//! state, so a slow or hostile client cannot stall the pipeline.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::bridge::metrics::CloudMetrics;
use crate::component::Running;
use crate::metrics::Registry;
use crate::ota::http::SMALL;
use crate::store::Store;

pub mod config;
pub mod history;
pub use config::HttpConfig;

/// What `/health` reports besides the metrics.
#[derive(Clone)]
pub struct HealthSource {
    /// Every component's metrics, for `/metrics`.
    pub registry: Arc<Registry>,
    /// The cloud link's state.
    pub cloud: Arc<CloudMetrics>,
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
    /// Binds `[http].listen`; a port in use fails here, at start-up.
    pub async fn build(cfg: &HttpConfig, health: HealthSource) -> std::io::Result<Http> {
        let listener = TcpListener::bind(cfg.listen).await?;
        Ok(Http { listener, health })
    }

    /// Serves until `stop` is cancelled.
    pub fn start(self, stop: CancellationToken) -> Running {
        let task = tokio::spawn(serve(self.listener, self.health, stop.clone()));
        Running::tasks("http", stop, vec![task])
    }
}

/// Serves until `stop` is cancelled.
async fn serve(listener: TcpListener, health: HealthSource, stop: CancellationToken) {
    if let Ok(a) = listener.local_addr() {
        info!(addr = %a, "http endpoint listening");
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
                    debug!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

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
            let req = crate::ota::http::ImageRequest {
                what,
                range,
                head_only: method == "HEAD",
                peer,
            };
            return crate::ota::http::image(&mut sock, ota, req).await;
        }
    }
    let ota_status = match (&h.ota, method, path.strip_prefix("/ota/status")) {
        (Some(ota), "GET", Some(rest)) => Some(crate::ota::http::status(ota, rest).await),
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
