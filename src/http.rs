//! The operator endpoint: `GET /metrics` (Prometheus text) and `GET /health` (JSON).
//!
//! A deliberately tiny HTTP/1.1 server: one request per connection, request head at most
//! 8 KiB, 5 s to send it, then the connection is closed. It only reads shared metrics, so a
//! slow or hostile scraper cannot stall the pipeline.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::metrics::Metrics;
use crate::store::Store;

/// What `/health` reports besides the metrics.
#[derive(Clone)]
pub struct HealthSource {
    /// Shared metrics.
    pub metrics: Arc<Metrics>,
    /// The queue.
    pub store: Arc<Store>,
    /// Whether a cloud is configured.
    pub cloud_enabled: bool,
    /// Gateway id.
    pub gateway_id: String,
}

impl HealthSource {
    /// The `/health` document.
    pub fn json(&self) -> serde_json::Value {
        let m = &self.metrics;
        let cloud = if !self.cloud_enabled {
            "disabled"
        } else if m.cloud_connected.get() == 1 {
            "connected"
        } else {
            "disconnected"
        };
        serde_json::json!({
            "status": if cloud == "disconnected" { "degraded" } else { "ok" },
            "gateway_id": self.gateway_id,
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": m.uptime_secs(),
            "cloud": cloud,
            "queue": {
                "records": self.store.records(),
                "bytes": self.store.bytes(),
                "oldest_age_seconds": self.store.oldest_age().map(|d| d.as_secs_f64()).unwrap_or(0.0),
            },
            "messages_in": m.messages_in.get(),
            "messages_out": m.messages_out.get(),
            "store_quarantined": m.store_quarantined.get() == 1,
        })
    }
}

/// Serves until `stop` is cancelled.
pub async fn serve(listener: TcpListener, health: HealthSource, stop: CancellationToken) {
    if let Ok(a) = listener.local_addr() {
        info!(addr = %a, "metrics endpoint listening");
    }
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((sock, _)) => {
                    let h = health.clone();
                    // Bounded by its own timeout; ends by itself.
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(Duration::from_secs(5), handle(sock, h)).await;
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

async fn handle(mut sock: TcpStream, h: HealthSource) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = sock.read(&mut chunk).await?;
        if n == 0 || buf.len() > 8192 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            h.metrics.render(),
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
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(body.as_bytes()).await?;
    sock.shutdown().await
}
