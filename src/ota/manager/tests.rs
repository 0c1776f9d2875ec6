//! The manager driven input by input under a clock the test moves; every assertion is on the
//! outputs (and the state they imply), never on a sleep.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::super::cache::{Digests, Opened};
use super::super::serve::{self, Served, Slots, Via, DOWNLOAD_IDLE, QUEUE_GRACE};
use super::super::Query;
use super::*;
use crate::ota::config::{OtaConfig, OtaDeviceConfig};
use crate::ota::metrics::OtaMetrics;

const SHA_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const SHA_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
/// Chunk size of the tests: 1000-byte images have 4 chunks.
const CHUNK: usize = 256;

struct T {
    m: Manager,
    metrics: Arc<OtaMetrics>,
    t0: Instant,
    now: Now,
}

fn cfg(slots: usize) -> OtaConfig {
    OtaConfig {
        chunk_size: CHUNK,
        max_concurrent_downloads: slots,
        cache_max_bytes: 1500,
        progress_interval: Duration::from_secs(1),
        ..OtaConfig::default()
    }
}

impl T {
    fn new(cfg: OtaConfig) -> T {
        let metrics = OtaMetrics::new();
        let slots = Slots::new(cfg.max_concurrent_downloads, cfg.max_downloads_per_ip);
        let m = Manager::new(cfg, "http://gw:9183".into(), metrics.clone(), slots);
        let t0 = Instant::now();
        let now = Now {
            at: t0,
            ms: 1_000_000,
        };
        let mut t = T {
            m,
            metrics,
            t0,
            now,
        };
        assert!(t.m.restore(None).is_empty());
        let outs = t.m.start(t.now, Vec::new());
        assert!(outs.is_empty(), "{outs:?}");
        t
    }

    /// Moves the clock to `t0 + ms`.
    fn at_ms(&mut self, ms: u64) {
        self.now = Now {
            at: self.t0 + Duration::from_millis(ms),
            ms: 1_000_000 + ms,
        };
    }

    fn input(&mut self, i: Input) -> Vec<Out> {
        self.m.handle(self.now, i)
    }

    fn msg_room(&mut self, topic: &str, v: &Value, chunk_room: usize) -> Vec<Out> {
        let payload = bytes::Bytes::from(v.to_string());
        self.input(Input::Message {
            topic: topic.into(),
            payload,
            chunk_room,
        })
    }

    fn msg(&mut self, topic: &str, v: &Value) -> Vec<Out> {
        self.msg_room(topic, v, serve::JOB_QUEUE)
    }

    fn dev(&mut self, dev: &str, kind: &str, v: &Value) -> Vec<Out> {
        self.msg(&format!("ota/{dev}/{kind}"), v)
    }

    fn upgrade(&mut self, v: Value) -> Vec<Out> {
        self.msg(CMD_UPGRADE, &v)
    }

    /// The download of `sha` finished: verified, installed and opened.
    fn fetched(&mut self, sha: &str, size: u64) -> Vec<Out> {
        let file = tempfile::tempfile().map_err(|e| e.to_string());
        let done = Installed {
            digests: Digests {
                size,
                sha256: sha.into(),
                md5: String::new(),
            },
            opened: Opened {
                path: format!("/cache/{sha}.bin").into(),
                file,
            },
        };
        self.input(Input::Fetch(FetchEvent::Done {
            key: sha.into(),
            result: Ok(done),
        }))
    }

    fn device_state(&self, dev: &str) -> String {
        self.m.state.devices[dev].state.clone()
    }
}

fn upgrade_a(devices: &[&str]) -> Value {
    json!({"name": "fw", "version": "2", "size": 1000, "sha256": SHA_A,
           "url": "https://store/fw-2.bin", "devices": devices, "rollout": "rA"})
}

fn upgrade_b(devices: &[&str]) -> Value {
    json!({"name": "fw", "version": "3", "size": 1000, "sha256": SHA_B,
           "url": "https://store/fw-3.bin", "devices": devices, "rollout": "rB"})
}

/// `(topic, payload)` of every publish, payloads parsed as JSON.
fn pubs(outs: &[Out]) -> Vec<(String, Value)> {
    outs.iter()
        .filter_map(|o| match o {
            Out::Publish { topic, payload } => Some((
                topic.clone(),
                serde_json::from_slice(payload).unwrap_or(Value::Null),
            )),
            _ => None,
        })
        .collect()
}

/// One short word per output, to assert on their order.
fn kinds(outs: &[Out]) -> Vec<String> {
    outs.iter()
        .map(|o| match o {
            Out::Publish { topic, .. } => format!("pub {topic}"),
            Out::Chunk(j) => format!("chunk {}", j.topic),
            Out::Catalog(c) => format!("catalog {}", c.by_sha.len()),
            Out::StartFetch { key, .. } => format!("fetch {}", &key[..1]),
            Out::InstallPushed { key, .. } => format!("install {}", &key[..1]),
            Out::WritePart { index, .. } => format!("write {index}"),
            Out::Evict { sha256 } => format!("evict {}", &sha256[..1]),
            Out::Persist { .. } => "persist".into(),
        })
        .collect()
}

fn error_of(outs: &[Out], dev: &str) -> Option<Value> {
    let t = format!("ota/{dev}/error");
    pubs(outs)
        .into_iter()
        .find(|(p, _)| *p == t)
        .map(|(_, v)| v)
}

/// A ready image `A` assigned to `devices`.
fn ready_a(devices: &[&str], slots: usize) -> T {
    ready_a_with(cfg(slots), devices)
}

fn ready_a_with(cfg: OtaConfig, devices: &[&str]) -> T {
    let mut t = T::new(cfg);
    t.upgrade(upgrade_a(devices));
    t.fetched(SHA_A, 1000);
    t
}

#[test]
fn a_rollout_is_reported_saved_and_fetched_once() {
    let mut t = T::new(cfg(4));
    let outs = t.upgrade(upgrade_a(&["d1", "d2"]));
    assert_eq!(
        kinds(&outs),
        ["pub ota/_gateway/rollout", "persist", "fetch a"]
    );
    let (_, v) = &pubs(&outs)[0];
    assert_eq!(v["state"], "accepted");
    assert_eq!(v["devices"], json!(["d1", "d2"]));
    match &outs[2] {
        Out::StartFetch { url, expect, .. } => {
            assert_eq!(
                (url.host.as_str(), url.path.as_str()),
                ("store", "/fw-2.bin")
            );
            assert_eq!(expect.size, 1000);
        }
        o => panic!("{o:?}"),
    }
    assert_eq!(t.device_state("d1"), "assigned");
    // The same command again: one download per image, and no device starts over.
    t.dev(
        "d1",
        "progress",
        &json!({"state": "downloading", "received": 256}),
    );
    let outs = t.upgrade(upgrade_a(&["d1", "d2"]));
    assert_eq!(kinds(&outs), ["pub ota/_gateway/rollout", "persist"]);
    assert_eq!(t.m.state.devices["d1"].received, 256);
    // A refused command changes nothing and says why.
    let outs = t.upgrade(json!({"name": "fw", "version": "4", "size": 1}));
    assert_eq!(kinds(&outs), ["pub ota/_gateway/error"]);
    assert_eq!(t.m.state.rollouts.len(), 1);
}

#[test]
fn a_device_asking_early_waits_and_gets_the_metadata_once_verified() {
    let mut t = T::new(cfg(4));
    t.upgrade(upgrade_a(&["d1"]));
    let outs = t.dev("d1", "request", &json!({}));
    assert!(outs.is_empty(), "no reply, no second download: {outs:?}");
    assert_eq!(t.device_state("d1"), "waiting");
    let outs = t.fetched(SHA_A, 1000);
    // The catalog first (so the url works), then the metadata, then the report and the save.
    assert_eq!(
        kinds(&outs),
        [
            "catalog 1",
            "pub ota/d1/metadata",
            "pub ota/_gateway/fetch",
            "persist"
        ]
    );
    let p = pubs(&outs);
    let md = &p[0].1;
    assert_eq!(md["sha256"], SHA_A);
    assert_eq!(md["chunks"], 4);
    assert_eq!(md["chunk_size"], CHUNK);
    assert_eq!(
        md["url"],
        format!("http://gw:9183/ota/image/{SHA_A}?device=d1")
    );
    assert_eq!(
        (md["received"].clone(), md["next_chunk"].clone()),
        (json!(0), json!(0))
    );
    assert_eq!(p[1].1["result"], "ok");
    assert_eq!(t.device_state("d1"), "assigned");
    // Asking again answers at once.
    let outs = t.dev("d1", "request", &json!({}));
    assert_eq!(kinds(&outs), ["pub ota/d1/metadata"]);
    // A device no rollout names is told so.
    let outs = t.dev("x9", "request", &json!({}));
    assert_eq!(error_of(&outs, "x9").unwrap()["code"], "not_assigned");
}

#[test]
fn devices_progress_and_verify_per_device() {
    let mut t = ready_a(&["d1", "d2"], 4);
    let outs = t.dev(
        "d1",
        "chunk/get",
        &json!({"version": "2", "from": 0, "to": 3}),
    );
    let k = kinds(&outs);
    assert_eq!(
        k,
        [
            "chunk ota/d1/chunk/0",
            "chunk ota/d1/chunk/1",
            "chunk ota/d1/chunk/2",
            "chunk ota/d1/chunk/3"
        ]
    );
    match &outs[3] {
        Out::Chunk(j) => assert_eq!((j.offset, j.len), (768, 1000 - 768)),
        o => panic!("{o:?}"),
    }
    assert_eq!(t.device_state("d1"), "downloading");
    t.dev(
        "d1",
        "progress",
        &json!({"state": "verifying", "received": 1000, "total": 1000}),
    );
    let outs = t.dev(
        "d1",
        "verify",
        &json!({"version": "2", "sha256": SHA_A.to_uppercase()}),
    );
    assert_eq!(kinds(&outs), ["pub ota/d1/success"]);
    assert_eq!(t.device_state("d1"), "verified");
    t.dev("d1", "progress", &json!({"state": "done"}));
    // d2 assembled something else: it is told to download again, from the start.
    let outs = t.dev("d2", "verify", &json!({"version": "2", "sha256": SHA_B}));
    let p = pubs(&outs);
    assert_eq!(p[0].0, "ota/d2/retry");
    assert_eq!(p[0].1["code"], "sha256_mismatch");
    assert_eq!(t.device_state("d2"), "retry");
    assert_eq!(t.metrics.errors_of("verify_mismatch"), 1);
    // The wrong version or a malformed request is refused with its code.
    let outs = t.dev("d2", "chunk/get", &json!({"version": "1", "index": 0}));
    assert_eq!(error_of(&outs, "d2").unwrap()["code"], "unknown_version");
    let outs = t.msg("ota/d2/progress", &json!({"state": "sleeping"}));
    assert_eq!(error_of(&outs, "d2").unwrap()["code"], "invalid");
    let r = t.m.answer(&Query::Rollout("rA".into())).unwrap();
    assert_eq!(r["states"], json!({"done": 1, "retry": 1}));
    assert_eq!(r["image_state"], "ready");
}

#[test]
fn chunk_requests_beyond_the_image_or_the_queue_are_refused() {
    let mut t = ready_a(&["d1"], 4);
    let outs = t.dev(
        "d1",
        "chunk/get",
        &json!({"version": "2", "indexes": [9, 0]}),
    );
    assert_eq!(kinds(&outs), ["pub ota/d1/error", "chunk ota/d1/chunk/0"]);
    let e = error_of(&outs, "d1").unwrap();
    assert_eq!(
        (e["code"].clone(), e["index"].clone()),
        (json!("out_of_range"), json!(9))
    );
    // Room for one job: the first is queued, the second refused with its index, the rest
    // not even looked at.
    let outs = t.msg_room(
        "ota/d1/chunk/get",
        &json!({"version": "2", "indexes": [1, 2, 3]}),
        1,
    );
    assert_eq!(kinds(&outs), ["chunk ota/d1/chunk/1", "pub ota/d1/error"]);
    let e = error_of(&outs, "d1").unwrap();
    assert_eq!(e["code"], "busy");
    assert_eq!(e["index"], 2);
    assert_eq!(e["retry_after"], serve::RETRY_AFTER_MIN);
    assert!(e.get("position").is_none());
}

#[test]
fn devices_without_a_slot_queue_in_order_and_are_told_when_to_come_back() {
    let mut t = ready_a(&["d1", "d2", "d3"], 1);
    let get = json!({"version": "2", "index": 0});
    assert_eq!(
        kinds(&t.dev("d1", "chunk/get", &get)),
        ["chunk ota/d1/chunk/0"]
    );
    let e2 = error_of(&t.dev("d2", "chunk/get", &get), "d2").unwrap();
    let e3 = error_of(&t.dev("d3", "chunk/get", &get), "d3").unwrap();
    assert_eq!(
        (e2["code"].clone(), e2["position"].clone()),
        (json!("busy"), json!(1))
    );
    assert_eq!(e3["position"], 2);
    // d1 just started and nothing was served yet: soon.
    assert_eq!(e2["retry_after"], serve::RETRY_AFTER_UNKNOWN);
    assert_eq!(t.metrics.errors_of("busy"), 2);
    // 8 s later (before d2's place lapses), nothing served: the first idle lease's expiry,
    // bounded.
    t.at_ms(8_000);
    let e3 = error_of(&t.dev("d3", "chunk/get", &get), "d3").unwrap();
    assert_eq!(e3["retry_after"], serve::RETRY_AFTER_MAX);
    // d1 is done: its slot is d2's, not d3's, though d3 asks first.
    t.dev("d1", "progress", &json!({"state": "done"}));
    let e3 = error_of(&t.dev("d3", "chunk/get", &get), "d3").unwrap();
    assert_eq!(e3["position"], 2);
    assert_eq!(
        kinds(&t.dev("d2", "chunk/get", &get)),
        ["chunk ota/d2/chunk/0"]
    );
    let e3 = error_of(&t.dev("d3", "chunk/get", &get), "d3").unwrap();
    assert_eq!(e3["position"], 1);
}

#[test]
fn an_idle_slot_is_freed_after_a_minute_and_a_waiter_that_left_loses_its_place() {
    let mut t = ready_a(&["d1", "d2", "d3"], 1);
    let get = json!({"version": "2", "index": 0});
    t.dev("d1", "chunk/get", &get);
    let e = error_of(&t.dev("d2", "chunk/get", &get), "d2").unwrap();
    assert_eq!(e["position"], 1);
    // d2 does not come back within 2 * retry_after + grace; d3 asks later and is first.
    let gone = 2 * e["retry_after"].as_u64().unwrap() * 1000 + QUEUE_GRACE.as_millis() as u64;
    t.at_ms(gone + 1);
    t.input(Input::Tick);
    let e = error_of(&t.dev("d3", "chunk/get", &get), "d3").unwrap();
    assert_eq!(e["position"], 1);
    // d1 has made no request for DOWNLOAD_IDLE: housekeeping frees its slot for d3.
    t.at_ms(DOWNLOAD_IDLE.as_millis() as u64 - 1);
    t.input(Input::Tick);
    assert_eq!(t.metrics.active_downloads.get(), 1);
    assert_eq!(t.metrics.waiting_devices.get(), 1);
    t.at_ms(DOWNLOAD_IDLE.as_millis() as u64 + 1);
    t.input(Input::Tick);
    assert_eq!(t.metrics.active_downloads.get(), 0);
    assert_eq!(
        kinds(&t.dev("d3", "chunk/get", &get)),
        ["chunk ota/d3/chunk/0"]
    );
}

#[test]
fn a_failed_fetch_answers_the_waiting_devices_and_no_device_starts_another() {
    let mut t = T::new(cfg(4));
    t.upgrade(upgrade_a(&["d1", "d2"]));
    t.dev("d1", "request", &json!({}));
    let outs = t.input(Input::Fetch(FetchEvent::Attempt {
        key: SHA_A.into(),
        result: "error",
        error: "attempt 1: refused".into(),
    }));
    assert_eq!(pubs(&outs)[0].1["result"], "error");
    let outs = t.input(Input::Fetch(FetchEvent::Done {
        key: SHA_A.into(),
        result: Err("6 attempts failed; last: refused".into()),
    }));
    assert_eq!(kinds(&outs), ["pub ota/_gateway/fetch", "pub ota/d1/error"]);
    assert_eq!(pubs(&outs)[0].1["result"], "failed");
    assert_eq!(error_of(&outs, "d1").unwrap()["code"], "fetch_failed");
    assert_eq!(t.m.state.images[SHA_A].state, ImageState::Failed);
    // Another device asking is told, and causes no download.
    let outs = t.dev("d2", "request", &json!({}));
    assert_eq!(kinds(&outs), ["pub ota/d2/error"]);
    let e = error_of(&outs, "d2").unwrap();
    assert_eq!(e["code"], "fetch_failed");
    assert!(e["reason"].as_str().unwrap().contains("refused"));
    // Only the cloud's command fetches it again.
    let outs = t.upgrade(upgrade_a(&["d1", "d2"]));
    assert!(kinds(&outs).contains(&"fetch a".to_string()), "{outs:?}");
    assert_eq!(t.m.state.images[SHA_A].state, ImageState::Fetching);
}

#[test]
fn the_resume_hint_is_only_what_the_device_confirmed() {
    let mut t = ready_a(&["d1"], 4);
    t.dev(
        "d1",
        "chunk/get",
        &json!({"version": "2", "from": 0, "to": 3}),
    );
    let outs = t.input(Input::Served(Served {
        device: "d1".into(),
        sha256: SHA_A.into(),
        via: Via::Mqtt,
        bytes: 1000,
    }));
    assert!(outs.is_empty());
    let md = |t: &mut T| pubs(&t.dev("d1", "request", &json!({})))[0].1.clone();
    let v = md(&mut t);
    assert_eq!(
        (v["received"].clone(), v["next_chunk"].clone()),
        (json!(0), json!(0))
    );
    t.dev(
        "d1",
        "progress",
        &json!({"state": "downloading", "received": 600}),
    );
    let v = md(&mut t);
    assert_eq!(
        (v["received"].clone(), v["next_chunk"].clone()),
        (json!(600), json!(2))
    );
    // A device claiming more than the image never gets a hint past its end.
    t.dev(
        "d1",
        "progress",
        &json!({"state": "downloading", "received": 5000}),
    );
    assert_eq!(md(&mut t)["received"], 1000);
}

#[test]
fn served_bytes_are_reported_per_device_at_most_once_per_interval() {
    let mut t = ready_a(&["d1"], 4);
    t.at_ms(10);
    let outs = t.input(Input::Tick); // both timers were due at start
    assert!(
        !kinds(&outs).iter().any(|k| k.contains("served")),
        "{outs:?}"
    );
    let served = |dev: &str, sha: &str, via| {
        Input::Served(Served {
            device: dev.into(),
            sha256: sha.into(),
            via,
            bytes: 256,
        })
    };
    t.at_ms(100);
    t.input(served("d1", SHA_A, Via::Mqtt));
    t.input(served("d1", SHA_A, Via::Http));
    // Bytes of an image the device is not assigned, or for an unknown device, do not count.
    t.input(served("d1", SHA_B, Via::Http));
    t.input(served("zz", SHA_A, Via::Http));
    assert_eq!(t.m.next_deadline(), Some(t.t0 + PERSIST_EVERY));
    t.at_ms(500);
    let outs = t.input(Input::Tick);
    assert!(
        !kinds(&outs).iter().any(|k| k.contains("served")),
        "{outs:?}"
    );
    t.at_ms(1010);
    let outs = t.input(Input::Tick);
    let p: Vec<_> = pubs(&outs)
        .into_iter()
        .filter(|(t, _)| t == "ota/_gateway/served")
        .collect();
    assert_eq!(p.len(), 1, "{outs:?}");
    assert_eq!(
        (
            p[0].1["device"].clone(),
            p[0].1["mqtt"].clone(),
            p[0].1["http"].clone()
        ),
        (json!("d1"), json!(256), json!(256))
    );
    assert_eq!(p[0].1["rollout"], "rA");
    // Nothing moved: no report.
    t.at_ms(2100);
    let outs = t.input(Input::Tick);
    assert!(
        !kinds(&outs).iter().any(|k| k.contains("served")),
        "{outs:?}"
    );
}

#[test]
fn progress_is_saved_by_housekeeping_and_clean_only_once_saved() {
    let mut t = ready_a(&["d1"], 4);
    let generation = |outs: &[Out]| {
        outs.iter().find_map(|o| match o {
            Out::Persist { generation, bytes } => {
                assert!(State::decode(bytes).is_ok());
                Some(*generation)
            }
            _ => None,
        })
    };
    // Due at once after start; the fetch made the state dirty.
    let g = generation(&t.input(Input::Tick)).expect("a save");
    t.input(Input::Persisted { generation: g });
    t.at_ms(500);
    assert_eq!(
        generation(&t.input(Input::Tick)),
        None,
        "clean: nothing to save"
    );
    // Device progress is not saved at once, but by the next housekeeping.
    t.at_ms(600);
    let outs = t.dev(
        "d1",
        "progress",
        &json!({"state": "downloading", "received": 256}),
    );
    assert!(outs.is_empty());
    assert_eq!(
        t.m.next_deadline(),
        Some(t.t0 + Duration::from_millis(1000))
    );
    t.at_ms(1000);
    let g = generation(&t.input(Input::Tick)).expect("a save");
    // The save failed (no Persisted): the next tick saves again.
    t.at_ms(1500);
    let g2 = generation(&t.input(Input::Tick)).expect("saved again");
    assert_eq!(g, g2);
    // A change after the save was asked for survives its success.
    t.dev(
        "d1",
        "progress",
        &json!({"state": "downloading", "received": 512}),
    );
    t.input(Input::Persisted { generation: g2 });
    t.at_ms(2000);
    let outs = t.input(Input::Tick);
    let bytes = outs
        .iter()
        .find_map(|o| match o {
            Out::Persist { bytes, .. } => Some(bytes.clone()),
            _ => None,
        })
        .expect("the later change is saved");
    assert_eq!(State::decode(&bytes).unwrap().devices["d1"].received, 512);
    // Stopping always saves.
    assert_eq!(kinds(&t.input(Input::Stop)), ["persist"]);
}

#[test]
fn eviction_spares_images_an_active_rollout_needs() {
    // 1500 bytes of cache: A (1000) and B (1000) do not fit together.
    let mut t = ready_a(&["d1"], 4);
    t.dev(
        "d1",
        "progress",
        &json!({"state": "downloading", "received": 256}),
    );
    let outs = t.upgrade(upgrade_b(&["d2"]));
    assert_eq!(
        kinds(&outs),
        [
            "pub ota/_gateway/rollout",
            "persist",
            "pub ota/_gateway/fetch"
        ]
    );
    assert!(pubs(&outs)[1].1["error"]
        .as_str()
        .unwrap()
        .contains("ota.cache_max_bytes"));
    assert_eq!(t.m.state.images[SHA_A].state, ImageState::Ready);
    // d1 is done with A: the command again evicts A, then fetches B.
    t.dev("d1", "progress", &json!({"state": "done"}));
    let outs = t.upgrade(upgrade_b(&["d2"]));
    assert_eq!(
        kinds(&outs),
        [
            "pub ota/_gateway/rollout",
            "persist",
            "evict a",
            "catalog 0",
            "fetch b"
        ]
    );
    assert_eq!(t.m.state.images[SHA_A].state, ImageState::Evicted);
}

#[test]
fn tag_rollouts_reach_configured_and_announcing_devices() {
    let mut c = cfg(4);
    c.devices.insert(
        "p1".into(),
        OtaDeviceConfig {
            tags: vec!["pumps".into()],
        },
    );
    let mut t = T::new(c);
    let outs = t.upgrade(
        json!({"name": "fw", "version": "2", "size": 1000, "sha256": SHA_A,
                                "url": "https://store/a", "tag": "pumps"}),
    );
    assert_eq!(pubs(&outs)[0].1["devices"], json!(["p1"]));
    t.fetched(SHA_A, 1000);
    // A device announcing the tag later gets the newest rollout for it.
    let outs = t.dev("p2", "request", &json!({"tags": ["pumps"]}));
    let p = pubs(&outs);
    assert_eq!(p[0].0, "ota/p2/metadata");
    assert_eq!(p[0].1["rollout"], "fw-2");
}

#[test]
fn pushed_chunks_are_checked_written_and_installed_when_complete() {
    let mut t = T::new(cfg(4));
    let outs = t.upgrade(
        json!({"name": "fw", "version": "2", "size": 600, "sha256": SHA_A,
                                "chunk_size": 256, "devices": ["d1"]}),
    );
    assert_eq!(
        kinds(&outs),
        ["pub ota/_gateway/rollout", "persist"],
        "no download"
    );
    let push = |t: &mut T, i: u64, len: usize| {
        let topic = format!("{CMD_IMAGE}{SHA_A}/{i}");
        t.input(Input::Message {
            topic,
            payload: vec![7u8; len].into(),
            chunk_room: 0,
        })
    };
    assert!(push(&mut t, 0, 100).is_empty(), "wrong size");
    assert!(push(&mut t, 3, 88).is_empty(), "out of range");
    assert_eq!(t.metrics.errors_of("push_invalid"), 2);
    for (i, len) in [(0u64, 256usize), (1, 256), (2, 88)] {
        let outs = push(&mut t, i, len);
        match &outs[..] {
            [Out::WritePart {
                index,
                offset,
                data,
                ..
            }] => {
                assert_eq!((*index, *offset, data.len()), (i, i * 256, len));
            }
            o => panic!("{o:?}"),
        }
        let back = t.input(Input::PartWritten {
            key: SHA_A.into(),
            index: i,
            len: len as u64,
            result: if i == 1 {
                Err("disk full".into())
            } else {
                Ok(())
            },
        });
        assert!(back.is_empty(), "{back:?}");
    }
    assert_eq!(t.metrics.errors_of("push_io"), 1);
    // Chunk 1 again, written this time: all three are in, the install starts once.
    push(&mut t, 1, 256);
    let outs = t.input(Input::PartWritten {
        key: SHA_A.into(),
        index: 1,
        len: 256,
        result: Ok(()),
    });
    assert_eq!(kinds(&outs), ["install a"]);
    push(&mut t, 1, 256);
    let outs = t.input(Input::PartWritten {
        key: SHA_A.into(),
        index: 1,
        len: 256,
        result: Ok(()),
    });
    assert!(outs.is_empty(), "one install at a time: {outs:?}");
    assert_eq!(t.metrics.fetch_bytes.get(), 256 + 88 + 256 + 256);
}

#[test]
fn start_up_serves_what_reverifies_and_refetches_what_does_not() {
    let mut big = cfg(4);
    big.cache_max_bytes = 10_000;
    let mut t = ready_a_with(big.clone(), &["d1", "d2"]);
    t.upgrade(upgrade_b(&["d2"]));
    let saved = t.m.state.encode();
    // A restart: A was ready (d1 still needs it), B was being fetched.
    let metrics = OtaMetrics::new();
    let mut m = Manager::new(
        big,
        "http://gw:9183".into(),
        metrics.clone(),
        Slots::new(4, 2),
    );
    let check = m.restore(Some(&saved));
    assert_eq!(
        check,
        [ToReverify {
            key: SHA_A.into(),
            sha256: SHA_A.into(),
            size: 1000
        }]
    );
    let outs = m.start(
        t.now,
        vec![Reverified {
            key: SHA_A.into(),
            sha256: SHA_A.into(),
            result: Err("sha256 mismatch".into()),
        }],
    );
    assert_eq!(
        kinds(&outs),
        ["pub ota/_gateway/fetch", "fetch a", "fetch b"]
    );
    assert_eq!(pubs(&outs)[0].1["result"], "cache_corrupt");
    assert_eq!(metrics.errors_of("cache_corrupt"), 1);
    assert!(m.catalog.by_sha.is_empty(), "nothing unverified is served");
    // An unreadable state file starts empty.
    let mut m = Manager::new(cfg(4), String::new(), metrics.clone(), Slots::new(4, 2));
    assert!(m.restore(Some(b"{not json")).is_empty());
    assert_eq!(metrics.errors_of("state_corrupt"), 1);
}
