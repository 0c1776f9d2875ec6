//! The operator page's JSON API, `GET /api/v1/{status,devices,clients,ota,config}`,
//! `GET /api/v1/dead-letters` and its one write, `POST /api/v1/dead-letters/drop`
//! (docs/api.md is its contract; the two must agree).
//!
//! Every document is built per request from state other parts already keep: the queue's
//! gauges and counters, the cloud link's [`LinkInfo`], the [`History`] the sampler fills,
//! the device [`Board`], the front end's client table, the OTA manager's answer, and the
//! configuration text computed once at start. Nothing here is on the data path, and the
//! documents are bounded by what they describe (devices, tags and clients are bounded by the
//! configuration and `broker.max_connections`; the history by its ring; the dead letters
//! are read a page at a time, at most [`DEAD_LETTER_PAGE_MAX`] per request).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::history::{History, INTERVAL, POINTS};
use super::HealthSource;
use crate::board::Board;
use crate::bridge::metrics::LinkInfo;
use crate::problem::Problem;

/// What the page shows that is fixed at start: derived once from the configuration by the
/// gateway.
#[derive(Debug, Clone, Default)]
pub struct PageInfo {
    /// `host:port` of the cloud broker; `None` without `[cloud]`.
    pub cloud_address: Option<String>,
    /// `store.max_bytes`.
    pub max_bytes: u64,
    /// `store.max_age`.
    pub max_age: Duration,
    /// The effective configuration as TOML, secrets redacted.
    pub config_toml: String,
    /// What `check-config` reports for it.
    pub problems: Vec<Problem>,
}

/// The page's parts of the endpoint's state.
#[derive(Clone)]
pub struct PageSource {
    /// Fixed at start.
    pub info: Arc<PageInfo>,
    /// The sampler's ring.
    pub history: Arc<History>,
    /// Every field device.
    pub board: Arc<Board>,
    /// Every connected MQTT client.
    pub clients: Arc<crate::frontend::clients::Clients>,
}

/// The metric families whose labelled series are losses: (family as rendered, `what`).
const LOSSES: [(&str, &str); 7] = [
    ("fieldgate_dropped_total", "dropped"),
    // Kept on disk, but not delivered: the cloud refused them for good.
    ("fieldgate_bridge_dead_letters_total", "dead_letter"),
    ("fieldgate_store_refusals_total", "refused"),
    ("fieldgate_broker_refused_total", "connection_refused"),
    ("fieldgate_broker_denied_total", "denied"),
    ("fieldgate_broker_rate_limited_total", "rate_limited"),
    ("fieldgate_broker_limited_total", "over_limit"),
];

/// `{what, reason, count}` for every labelled series of the [`LOSSES`] families in a
/// rendered registry (`name{label="reason"} count`), in family order. Reading the rendered
/// text keeps one owner per counter: the families stay where they are counted.
pub fn losses(rendered: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for (family, what) in LOSSES {
        let first = out.len();
        for line in rendered.lines() {
            let Some(rest) = line.strip_prefix(family).and_then(|r| r.strip_prefix('{')) else {
                continue;
            };
            let Some((labels, count)) = rest.rsplit_once("} ") else {
                continue;
            };
            let reason = labels
                .split_once("=\"")
                .and_then(|(_, v)| v.split('"').next())
                .unwrap_or(labels);
            let count = count.trim().parse::<f64>().unwrap_or(0.0) as u64;
            out.push(json!({ "what": what, "reason": reason, "count": count }));
        }
        // A family's labels render in hash order: sort them so rows keep their place.
        out[first..].sort_by(|a, b| a["reason"].as_str().cmp(&b["reason"].as_str()));
    }
    out
}

/// `/api/v1/status`.
pub fn status(h: &HealthSource, p: &PageSource) -> Value {
    let m = h.store.metrics();
    let link: LinkInfo = h.cloud.link.get();
    let cloud_state = h.cloud_state();
    let refusing = m.store_refusing_cause();
    let last = p.history.last();
    json!({
        "gateway_id": h.gateway_id,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": h.registry.uptime_secs(),
        "status": h.overall(),
        "cloud": {
            "state": cloud_state,
            "address": p.info.cloud_address,
            "connected_since_ms": link.connected_since_ms.filter(|_| cloud_state == "connected"),
            "reconnects": h.cloud.cloud_reconnects.get(),
            "last_error": link.last_error,
        },
        "queue": {
            "state": if refusing.is_some() { "refusing" } else { "ok" },
            "cause": refusing,
            "records": h.store.records(),
            "bytes": h.store.bytes(),
            "bytes_on_disk": m.store_disk_bytes.get(),
            "max_bytes": p.info.max_bytes,
            "oldest_age_seconds": h.store.oldest_age().map(|d| d.as_secs_f64()).unwrap_or(0.0),
            "max_age_seconds": p.info.max_age.as_secs(),
        },
        "messages": { "in": m.messages_in.get(), "out": m.messages_out.get() },
        "rates": {
            "in_per_second": last.map(|p| p.in_per_second).unwrap_or(0.0),
            "out_per_second": last.map(|p| p.out_per_second).unwrap_or(0.0),
        },
        "losses": losses(&h.registry.render()),
        "history": {
            "interval_seconds": INTERVAL.as_secs(),
            "window_seconds": INTERVAL.as_secs() * POINTS as u64,
            "points": p.history.points(),
        },
    })
}

/// Dead letters listed per request when `limit` is not given.
pub const DEAD_LETTER_PAGE: usize = 100;
/// Most dead letters listed per request.
pub const DEAD_LETTER_PAGE_MAX: usize = 1000;

/// `/api/v1/dead-letters?after=SEQ&limit=N`: the records the cloud refused for good, oldest
/// first, `limit` (default [`DEAD_LETTER_PAGE`], at most [`DEAD_LETTER_PAGE_MAX`]) of those
/// with a sequence number above `after` (default 0); `next_after` continues the listing.
/// `Err`: the status and body of a bad request or a store that cannot be read.
pub async fn dead_letters(
    store: &Arc<crate::store::Store>,
    query: &str,
) -> Result<Value, (&'static str, Value)> {
    let mut after = 0u64;
    let mut limit = DEAD_LETTER_PAGE;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let bad = |fix: &str| {
            (
                "400 Bad Request",
                json!({ "error": format!("{k}={v:?}: {fix}") }),
            )
        };
        match k {
            "after" => {
                after = v
                    .parse()
                    .map_err(|_| bad("a sequence number, e.g. after=0"))?
            }
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=DEAD_LETTER_PAGE_MAX).contains(n))
                    .ok_or_else(|| bad("a number from 1 to 1000, e.g. limit=100"))?
            }
            _ => return Err(bad("unknown parameter; use after and limit")),
        }
    }
    let s = store.clone();
    let page = tokio::task::spawn_blocking(move || s.dead_letters(after, limit))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    let page = page.map_err(|e| ("503 Service Unavailable", json!({ "error": e })))?;
    let rfc3339 = |ms: u64| {
        humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms))
            .to_string()
    };
    let next_after = (page.len() == limit)
        .then(|| page.last().map(|d| d.seq))
        .flatten();
    let items: Vec<Value> = page
        .iter()
        .map(|d| {
            json!({
                "seq": d.seq,
                "topic": d.topic,
                "size": d.size,
                "retain": d.retain,
                "accepted_ms": d.accepted_ms,
                "accepted_at": rfc3339(d.accepted_ms),
                "refused_ms": d.refused_ms,
                "refused_at": rfc3339(d.refused_ms),
                "reason_code": d.reason,
                "reason": crate::store::dead::reason_name(d.reason),
            })
        })
        .collect();
    Ok(json!({
        "kept": store.dead_letter_count(),
        "dead_letters": items,
        "next_after": next_after,
    }))
}

/// `POST /api/v1/dead-letters/drop` with the JSON body `{"seq": N}`: deletes dead letter `N`
/// (the one write of the API; an operator has read it and given it up). Only a request with
/// `Content-Type: application/json` is taken, which a page of another origin cannot send
/// without the browser asking first. `Err`: the status and body of a refusal.
pub async fn drop_dead_letter(
    store: &Arc<crate::store::Store>,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<Value, (&'static str, Value)> {
    let json_body = content_type.is_some_and(|c| {
        c.split(';')
            .next()
            .is_some_and(|t| t.trim() == "application/json")
    });
    if !json_body {
        return Err((
            "415 Unsupported Media Type",
            json!({ "error": "send Content-Type: application/json with {\"seq\": N}" }),
        ));
    }
    let seq = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("seq").and_then(Value::as_u64))
        .ok_or((
            "400 Bad Request",
            json!({ "error": "the body must be {\"seq\": N}, N a dead letter's seq" }),
        ))?;
    let s = store.clone();
    let dropped = tokio::task::spawn_blocking(move || s.drop_dead_letter(seq))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
        .map_err(|e| ("503 Service Unavailable", json!({ "error": e })))?;
    if !dropped {
        return Err((
            "404 Not Found",
            json!({ "error": format!("no dead letter {seq}") }),
        ));
    }
    tracing::info!(seq, "dead letter dropped by the operator");
    Ok(json!({ "dropped": seq, "kept": store.dead_letter_count() }))
}

/// `/api/v1/devices`.
pub fn devices(p: &PageSource) -> Value {
    let now = crate::clock::now_ms();
    let devices: Vec<Value> = p
        .board
        .devices()
        .into_iter()
        .map(|d| {
            let tags: Vec<Value> = d
                .tags
                .iter()
                .map(|t| {
                    let age = (t.at_ms > 0).then(|| now.saturating_sub(t.at_ms) as f64 / 1000.0);
                    json!({
                        "name": t.name,
                        "value": t.value,
                        "unit": (!t.unit.is_empty()).then_some(t.unit.as_str()),
                        "quality": t.quality,
                        "age_seconds": age,
                    })
                })
                .collect();
            json!({
                "name": d.name,
                "kind": d.kind,
                "status": d.status,
                "last_error": d.last_error,
                "overruns": d.overruns,
                "tags": tags,
            })
        })
        .collect();
    json!({ "devices": devices })
}

/// `/api/v1/clients`.
pub fn clients(p: &PageSource) -> Value {
    json!({ "clients": p.clients.list() })
}

/// `/api/v1/config`.
pub fn config(p: &PageSource) -> Value {
    let problems: Vec<Value> = p
        .info
        .problems
        .iter()
        .map(|x| json!({ "key": x.key, "message": x.message }))
        .collect();
    json!({ "toml": p.info.config_toml, "problems": problems })
}

/// `/api/v1/session`: whether a sign-in is needed, and who is signed in (a session's user
/// with the seconds it has left, or a TLS client certificate's CN, which has no end).
pub fn session(login_required: bool, user: Option<(String, Option<std::time::Duration>)>) -> Value {
    let (user, left) = match user {
        Some((u, left)) => (Some(u), left.map(|d| d.as_secs())),
        None => (None, None),
    };
    json!({ "login_required": login_required, "user": user, "expires_in_seconds": left })
}

/// `/api/v1/ota`: the manager's full answer mapped onto the page's shape; `enabled: false`
/// without `[ota]`, and empty lists when the manager does not answer in time.
pub async fn ota(h: &HealthSource) -> Value {
    let Some(handle) = &h.ota else {
        return json!({ "enabled": false, "images": [], "rollouts": [] });
    };
    let all = handle
        .query(crate::ota::Query::All)
        .await
        .unwrap_or(Value::Null);
    ota_shape(&all)
}

/// Maps the OTA manager's `Query::All` answer (`images`, `rollouts`, `devices`) onto the
/// documented shape.
pub fn ota_shape(all: &Value) -> Value {
    let list = |k: &str| {
        all.get(k)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let devices = list("devices");
    let images: Vec<Value> = list("images")
        .iter()
        .map(|i| {
            json!({
                "name": i["name"], "version": i["version"], "size": i["size"],
                "sha256": i["sha256"], "state": i["state"], "fetched": i["fetched"],
                "last_served_ms": i["last_served_ms"], "error": i["error"],
            })
        })
        .collect();
    let rollouts: Vec<Value> = list("rollouts")
        .iter()
        .map(|r| {
            let id = r["rollout"].as_str().unwrap_or_default();
            let members: Vec<Value> = devices
                .iter()
                .filter(|d| d["rollout"].as_str() == Some(id))
                .map(|d| {
                    let total = d["total"].as_u64().unwrap_or(0);
                    let received = d["received"].as_u64().unwrap_or(0);
                    let state = d["state"].as_str().unwrap_or_default();
                    let progress = if state == "done" {
                        1.0
                    } else if total > 0 {
                        (received as f64 / total as f64).min(1.0)
                    } else {
                        0.0
                    };
                    json!({ "device": d["device"], "state": state, "progress": progress,
                            "version": d["version"], "error": d["error"] })
                })
                .collect();
            let image = match (r["name"].as_str(), r["version"].as_str()) {
                (Some(n), Some(v)) => format!("{n} {v}"),
                _ => r["image"].as_str().unwrap_or_default().to_string(),
            };
            json!({
                "id": id,
                "image": image,
                "image_state": r["image_state"],
                "state": if r["active"].as_bool() == Some(true) { "running" } else { "finished" },
                "devices": members,
            })
        })
        .collect();
    json!({ "enabled": true, "images": images, "rollouts": rollouts })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn losses_are_read_from_the_rendered_families() {
        let text = "# HELP fieldgate_dropped_total Records dropped, by reason\n\
                    fieldgate_dropped_total{reason=\"queue_full\"} 4\n\
                    fieldgate_dropped_total{reason=\"expired\"} 0\n\
                    fieldgate_store_refusals_total{cause=\"disk_full\"} 3\n\
                    fieldgate_broker_refused_total{reason=\"bad_credentials\"} 2\n\
                    fieldgate_messages_in_total 100\n";
        let l = losses(text);
        assert_eq!(l.len(), 4);
        // Sorted by reason within a family, whatever order the registry rendered.
        assert_eq!(
            l[0],
            json!({"what": "dropped", "reason": "expired", "count": 0})
        );
        assert_eq!(
            l[1],
            json!({"what": "dropped", "reason": "queue_full", "count": 4})
        );
        assert_eq!(
            l[2],
            json!({"what": "refused", "reason": "disk_full", "count": 3})
        );
        assert_eq!(
            l[3],
            json!({"what": "connection_refused", "reason": "bad_credentials", "count": 2})
        );
    }

    #[test]
    fn the_ota_answer_maps_onto_images_rollouts_and_device_progress() {
        let all = json!({
            "images": [{"image": "k", "name": "fw", "version": "2.1", "size": 100,
                        "sha256": "ab", "state": "ready", "fetched": 100,
                        "last_served_ms": null, "error": null}],
            "rollouts": [{"rollout": "r1", "name": "fw", "version": "2.1", "image": "k",
                          "image_state": "ready", "active": true, "devices": {"d1": "downloading"}}],
            "devices": [
                {"device": "d1", "rollout": "r1", "state": "downloading", "received": 25, "total": 100},
                {"device": "d2", "rollout": "other", "state": "done", "received": 0, "total": 0},
            ],
        });
        let o = ota_shape(&all);
        assert_eq!(o["enabled"], true);
        assert_eq!(o["images"][0]["name"], "fw");
        assert_eq!(o["rollouts"][0]["image"], "fw 2.1");
        assert_eq!(o["rollouts"][0]["state"], "running");
        let devs = o["rollouts"][0]["devices"].as_array().unwrap();
        assert_eq!(devs.len(), 1);
        assert_eq!(devs[0]["progress"], 0.25);
        // Nothing from the manager: empty lists, not an error.
        let none = ota_shape(&Value::Null);
        assert_eq!(none["images"], json!([]));
        assert_eq!(none["rollouts"], json!([]));
    }
}
