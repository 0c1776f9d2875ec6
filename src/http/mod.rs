//! The operator endpoint: `GET /metrics` (Prometheus text) and `GET /health` (JSON), the OTA
//! routes when OTA is enabled (`/ota/image/...`, `/ota/status...`; they live with OTA, see
//! [`crate::ota::http`]), and with `http.page` the operator page (`/`, `/ui/...`, files built
//! into the binary, see [`ui`]) and its JSON API (`/api/v1/...`, see [`api`], docs/api.md).
//!
//! A deliberately tiny HTTP/1.1 server: one request per connection, request head at most
//! 8 KiB, 5 s to send it, then the connection is closed. Small answers must be written within
//! 5 s (image transfers have their own bound, see [`crate::ota::http`]). Only `GET` (and
//! `HEAD` for OTA images) is served: another method is `405`, an unknown path `404`, a
//! request line that does not parse `400`. It only reads shared state, so a slow or hostile
//! client cannot stall the pipeline. With the page, one more task runs beside the accept
//! loop: the [`history`] sampler, every 10 s.
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

pub mod api;
pub mod config;
pub mod history;
pub mod ui;
pub use api::{PageInfo, PageSource};
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
    /// The operator page's sources; `None` with `http.page = false`.
    pub page: Option<PageSource>,
}

impl HealthSource {
    /// The cloud link: `connected`, `disconnected` or `disabled` (no `[cloud]`).
    pub fn cloud_state(&self) -> &'static str {
        if !self.cloud_enabled {
            "disabled"
        } else if self.cloud.cloud_connected.get() == 1 {
            "connected"
        } else {
            "disconnected"
        }
    }

    /// `degraded` while the cloud is disconnected or the queue refuses writes, else `ok`.
    pub fn overall(&self) -> &'static str {
        let refusing = self.store.metrics().store_refusing_cause().is_some();
        if refusing || self.cloud_state() == "disconnected" {
            "degraded"
        } else {
            "ok"
        }
    }

    /// The `/health` document.
    pub fn json(&self) -> serde_json::Value {
        let m = self.store.metrics();
        let cloud = self.cloud_state();
        let refusing = m.store_refusing_cause();
        serde_json::json!({
            "status": self.overall(),
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

    /// Serves until `stop` is cancelled; with the page, samples the queue's history too.
    pub fn start(self, stop: CancellationToken) -> Running {
        let mut tasks = Vec::new();
        if let Some(page) = &self.health.page {
            let store = self.health.store.clone();
            let read = move || {
                let m = store.metrics();
                history::Reading {
                    records: store.records(),
                    oldest_age_seconds: store.oldest_age().map(|d| d.as_secs_f64()).unwrap_or(0.0),
                    messages_in: m.messages_in.get(),
                    messages_out: m.messages_out.get(),
                }
            };
            tasks.push(tokio::spawn(history::run(
                page.history.clone(),
                history::INTERVAL,
                read,
                stop.clone(),
            )));
        }
        tasks.push(tokio::spawn(serve(
            self.listener,
            self.health,
            stop.clone(),
        )));
        Running::tasks("http", stop, tasks)
    }
}

/// Serves until `stop` is cancelled.
async fn serve(listener: TcpListener, health: HealthSource, stop: CancellationToken) {
    if let Ok(a) = listener.local_addr() {
        info!(addr = %a, page = health.page.is_some(), "http endpoint listening");
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

/// One answer: status line, content type, body, and how it may be cached (`no-store` for
/// documents, `no-cache` for the page's files).
struct Answer {
    status: &'static str,
    ctype: &'static str,
    body: std::borrow::Cow<'static, str>,
    cache: &'static str,
}

impl Answer {
    fn json(status: &'static str, v: serde_json::Value) -> Answer {
        Answer {
            status,
            ctype: "application/json",
            body: v.to_string().into(),
            cache: "no-store",
        }
    }

    fn text(status: &'static str, body: &'static str) -> Answer {
        Answer {
            status,
            ctype: "text/plain; charset=utf-8",
            body: body.into(),
            cache: "no-store",
        }
    }
}

async fn handle(mut sock: TcpStream, peer: IpAddr, h: HealthSource) -> std::io::Result<()> {
    let Ok(head) = tokio::time::timeout(SMALL, read_head(&mut sock)).await else {
        return Ok(());
    };
    let Some(head) = head? else { return Ok(()) };
    let mut parts = head.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    // The query string is for the OTA status routes only; the rest route on the path.
    let path = target.split('?').next().unwrap_or("");
    if let (Some(ota), Some(what)) = (&h.ota, target.strip_prefix("/ota/image/")) {
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
    let a = route(&h, method, target, path).await;
    // Every answer: the page's files and documents load only from here, nothing inline.
    let csp = "Content-Security-Policy: default-src 'self'\r\nX-Content-Type-Options: nosniff\r\n";
    let allow = if a.status.starts_with("405") {
        "Allow: GET\r\n"
    } else {
        ""
    };
    let head = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: {}\r\n{csp}{allow}Connection: close\r\n\r\n",
        a.status,
        a.ctype,
        a.body.len(),
        a.cache,
    );
    let _ = tokio::time::timeout(SMALL, async {
        sock.write_all(head.as_bytes()).await?;
        sock.write_all(a.body.as_bytes()).await?;
        sock.shutdown().await
    })
    .await;
    Ok(())
}

/// The answer to `method target` (`path`: the target without its query).
async fn route(h: &HealthSource, method: &str, target: &str, path: &str) -> Answer {
    if method.is_empty() || !target.starts_with('/') {
        return Answer::text("400 Bad Request", "malformed request line\n");
    }
    if method != "GET" {
        return Answer::text("405 Method Not Allowed", "GET only\n");
    }
    if let (Some(ota), Some(rest)) = (&h.ota, target.strip_prefix("/ota/status")) {
        return match crate::ota::http::status(ota, rest).await {
            Some(v) => Answer::json("200 OK", v),
            None => Answer::json(
                "404 Not Found",
                serde_json::json!({"error": "unknown device or rollout"}),
            ),
        };
    }
    match path {
        "/metrics" => {
            return Answer {
                status: "200 OK",
                ctype: "application/openmetrics-text; version=1.0.0; charset=utf-8",
                body: h.registry.render().into(),
                cache: "no-store",
            }
        }
        "/health" => return Answer::json("200 OK", h.json()),
        _ => {}
    }
    let Some(page) = &h.page else {
        return Answer::text("404 Not Found", "try /metrics or /health\n");
    };
    if let Some(f) = ui::file(path) {
        return Answer {
            status: "200 OK",
            ctype: f.content_type,
            body: f.body.into(),
            cache: "no-cache",
        };
    }
    match path {
        "/api/v1/status" => Answer::json("200 OK", api::status(h, page)),
        "/api/v1/devices" => Answer::json("200 OK", api::devices(page)),
        "/api/v1/clients" => Answer::json("200 OK", api::clients(page)),
        "/api/v1/config" => Answer::json("200 OK", api::config(page)),
        "/api/v1/ota" => Answer::json("200 OK", api::ota(h).await),
        p if p.starts_with("/api/") => Answer::json(
            "404 Not Found",
            serde_json::json!({"error": "unknown API path; see docs/api.md"}),
        ),
        _ => Answer::text("404 Not Found", "try /, /metrics or /health\n"),
    }
}

/// The value of header `name` (lower case) in a request head.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}
