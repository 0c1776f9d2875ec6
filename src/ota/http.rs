//! OTA's routes on the operator endpoint ([`crate::http`]), beside the MQTT serving
//! ([`super::serve`]):
//! - `GET|HEAD /ota/image/<sha256>` and `/ota/image/<name>/<version>`: a verified firmware
//!   image, with `Range: bytes=a-b | a- | -n` (206 + `Content-Range`; 416 for a range outside
//!   the image; several ranges are answered with the whole image, 200). Only images the
//!   gateway verified are listed. With `?device=<id>` (as in the metadata `url`) the
//!   transfer runs under that device's OTA download slot, which it keeps across its
//!   requests until it is done (see [`super::serve`]), and the bytes are reported to the OTA
//!   manager as served to it; without, each transfer holds a slot of its own. No slot: 503
//!   with `Retry-After: <s>` and a JSON body `{"code":"busy","reason","retry_after",
//!   "position"?}` (also when the address holds `ota.max_downloads_per_ip` already).
//!   Transfers are paced by `ota.max_bytes_per_sec`;
//! - `GET /ota/status`, `/ota/status/device/<id>`, `/ota/status/rollout/<id>`: JSON status
//!   ([`status`]; the endpoint writes the answer).
//!
//! Small answers must be written within [`SMALL`]; an image transfer may take as long as it
//! needs but no single write may stall for more than `ota.stall_timeout` (then it is cut,
//! counted as `http_stalled`, and its slot is free). It only reads shared state (the catalog,
//! the slot table) and hands served bytes to the manager without waiting on it, so a slow or
//! hostile client cannot stall the OTA manager.

use std::net::IpAddr;
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tracing::debug;

use super::serve::{parse_range, Busy, Via};
use super::{OtaHandle, Query};

/// How long a small answer may take to write (the operator endpoint's own bound).
pub const SMALL: Duration = Duration::from_secs(5);

/// One image request: what, which bytes, and from whom.
pub struct ImageRequest<'a> {
    /// The path after `/ota/image/`, query included.
    pub what: &'a str,
    /// The `Range` header.
    pub range: Option<&'a str>,
    /// `HEAD`: the head only.
    pub head_only: bool,
    /// The client's address (its per-address share).
    pub peer: IpAddr,
}

/// The answer to `GET /ota/status<rest>`: `None` for an unknown device, rollout or path (or
/// no answer from the manager).
pub async fn status(ota: &OtaHandle, rest: &str) -> Option<serde_json::Value> {
    let q = if rest.is_empty() || rest == "/" {
        Some(Query::All)
    } else if let Some(d) = rest.strip_prefix("/device/") {
        Some(Query::Device(d.to_string()))
    } else {
        rest.strip_prefix("/rollout/")
            .map(|r| Query::Rollout(r.to_string()))
    };
    match q {
        Some(q) => ota.query(q).await,
        None => None,
    }
}

async fn small<S: AsyncWrite + Unpin>(
    sock: &mut S,
    status: &str,
    extra: &str,
    body: &str,
) -> std::io::Result<()> {
    small_typed(sock, status, "text/plain", extra, body).await
}

async fn small_typed<S: AsyncWrite + Unpin>(
    sock: &mut S,
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

/// Streams (a range of) a verified image.
pub async fn image<S: AsyncWrite + Unpin>(
    sock: &mut S,
    ota: &OtaHandle,
    req: ImageRequest<'_>,
) -> std::io::Result<()> {
    let metrics = &*ota.metrics;
    let ImageRequest {
        what,
        range,
        head_only,
        peer,
    } = req;
    let (what, query) = what.split_once('?').unwrap_or((what, ""));
    let device = crate::form::query_value(query, "device");
    let img = ota.catalog.borrow().find(what);
    let Some(img) = img else {
        metrics.error("http_not_found");
        return small(
            sock,
            "404 Not Found",
            "",
            "no verified image by that name\n",
        )
        .await;
    };
    let r = match parse_range(range, img.size) {
        Ok(r) => r,
        Err(_) => {
            metrics.error("http_bad_range");
            let extra = format!("Content-Range: bytes */{}\r\n", img.size);
            return small(sock, "416 Range Not Satisfiable", &extra, "bad range\n").await;
        }
    };
    // A device (`?device=`) keeps one slot across its requests; without an id, per request.
    let _slot = match ota.slots.for_http(device.as_deref(), peer, img.size) {
        Ok(slot) => slot,
        Err(w) => {
            let reason = match (w.why, w.position) {
                (Busy::Address, _) => {
                    metrics.error("busy_per_ip");
                    "this address holds ota.max_downloads_per_ip downloads already".to_string()
                }
                (Busy::All, Some(p)) => {
                    metrics.error("busy");
                    format!("all download slots are taken; you are number {p} in line")
                }
                (Busy::All, None) => {
                    metrics.error("busy");
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
        metrics.error("http_stalled");
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
                tokio::task::spawn_blocking(move || super::cache::read_at(&img2.file, off, n))
                    .await
                    .map_err(std::io::Error::other)??;
            tokio::time::timeout(stall, sock.write_all(&data))
                .await
                .map_err(|_| stalled())??;
            metrics.served("http", n as u64);
            ota.slots.served(device.as_deref(), n as u64);
            if let (Some(t), Some(d)) = (tally.as_mut(), device.as_deref()) {
                t.add(d, &img.sha256, Via::Http, n as u64);
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
