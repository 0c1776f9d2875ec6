//! Durability tests (issue 11, "Tests"): a PUBACK from the gateway means the message is on
//! disk, under kill -9, a slow or failing fsync, a full disk, a flooding device and damaged
//! store files.
//!
//! Everything is counted by sequence number: simulated devices ([`common::devices`]) log
//! every seq they got a PUBACK for, and a subscriber on the real cloud broker (TLS, through a
//! cuttable proxy) logs what arrived. The property checked everywhere: every acknowledged seq
//! reaches the cloud (at least once). Nothing here asserts a timing: deadlines only bound the
//! waiting, sampling windows only give the gateway a chance to misbehave.
//!
//! The contract these tests are written against (the gateway side is issue 11's change):
//! - `FIELDGATE_FAULT_FILE=<path>`: before each queue commit the gateway reads the file;
//!   `fsync_delay_ms=<N>` delays each commit, `fsync_fail` fails it with EIO, `enospc` fails
//!   it with "no space left on device"; missing or empty: normal;
//! - metrics `fieldgate_store_durable_seq`, `fieldgate_store_commit_errors_total`,
//!   `fieldgate_store_refusals_total{cause="disk_full"|"io"|"queue_full"}`,
//!   `fieldgate_dropped_total{reason="corrupt"}`, `fieldgate_queue_records`;
//! - `/health`: `"status": "ok"` only when all is well; while the store cannot write,
//!   `"status": "degraded"` and `"store": {"state": "refusing", "cause": ...}`.
//!
//! Disk-full tests mount an 8 MiB tmpfs (needs root / CAP_SYS_ADMIN; unmounted on drop, also
//! on panic); where mounting is not permitted (or with `FIELDGATE_TEST_NO_MOUNT=1`) they say
//! so and use the `enospc` fault hook.
//!
//! Run: `cargo test --test durability` (about a minute on 2 cores).
//!
//! Knobs (defaults keep the file short on a 2-core CI box): `FIELDGATE_KILL_ROUNDS` (10 per
//! variant; the issue asks for 20), `FIELDGATE_KILL_DEVICES` (4), `FIELDGATE_KILL_SEED`,
//! `FIELDGATE_FLOOD_SECS` (10; the issue says 30), `FIELDGATE_FLOOD_BYTES` (1024: with 100-byte
//! payloads a debug build is too slow to overrun the old tap), `FIELDGATE_DAMAGE_RECORDS`
//! (20000).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::devices::{stop_all, total_acked, Device, DeviceConfig, DeviceReport};
use common::*;

const WAIT: Duration = Duration::from_secs(90);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------------
// Setup

struct Setup {
    pki: Pki,
    cloud: Cloud,
    proxy: Proxy,
    ports: GatewayPorts,
    data: tempfile::TempDir,
    /// Holds the fault file (`FIELDGATE_FAULT_FILE`), which every gateway here is given.
    fault_dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let pki = Pki::new();
    let cloud = Cloud::start(&pki, &pki.server);
    let proxy = Proxy::start(cloud.port).await;
    Setup {
        pki,
        cloud,
        proxy,
        ports: GatewayPorts::new(),
        data: tempfile::tempdir().unwrap(),
        fault_dir: tempfile::tempdir().unwrap(),
    }
}

impl Setup {
    fn fault_file(&self) -> PathBuf {
        self.fault_dir.path().join("faults")
    }

    /// Sets the fault file's content; `""` removes the file (normal operation).
    fn fault(&self, what: &str) {
        if what.is_empty() {
            let _ = std::fs::remove_file(self.fault_file());
        } else {
            std::fs::write(self.fault_file(), format!("{what}\n")).unwrap();
        }
    }

    /// Gateway config on `ports` and `data_dir`, with extra `[broker]` keys.
    fn config(&self, ports: &GatewayPorts, data_dir: &Path, broker: toml::Table) -> String {
        GatewayConfig::bridged(&self.pki, ports, data_dir, self.proxy.port)
            .with("broker", broker)
            .to_toml()
    }

    async fn gateway_on(
        &self,
        ports: &GatewayPorts,
        data_dir: &Path,
        broker: toml::Table,
    ) -> Gateway {
        let fault = self.fault_file().display().to_string();
        Gateway::start_env(
            &self.config(ports, data_dir, broker),
            ports,
            &[("FIELDGATE_FAULT_FILE", &fault)],
        )
        .await
    }

    /// Starts a gateway in a task of its own: the harness's start (which waits for `/health`
    /// and panics if the gateway exits first, or after 30 s) runs meanwhile.
    fn spawn_gateway(
        &self,
        ports: &GatewayPorts,
        data_dir: &Path,
        broker: toml::Table,
    ) -> tokio::task::JoinHandle<Gateway> {
        let config = self.config(ports, data_dir, broker);
        let ports = GatewayPorts {
            mqtt: ports.mqtt,
            http: ports.http,
        };
        let fault = self.fault_file().display().to_string();
        tokio::spawn(async move {
            Gateway::start_env(&config, &ports, &[("FIELDGATE_FAULT_FILE", &fault)]).await
        })
    }

    /// As [`Setup::gateway_on`], but a gateway that exits before `/health` answers is an
    /// `Err` with the harness's message (its log), not a panic.
    async fn try_gateway_on(
        &self,
        ports: &GatewayPorts,
        data_dir: &Path,
        broker: toml::Table,
    ) -> Result<Gateway, String> {
        started(self.spawn_gateway(ports, data_dir, broker)).await
    }

    async fn gateway(&self) -> Gateway {
        self.gateway_on(&self.ports, self.data.path(), toml::Table::new())
            .await
    }

    async fn collector(&self) -> Collector {
        Collector::start(&self.pki, self.cloud.port, "fieldgate/gw1/#").await
    }
}

/// The gateway of [`Setup::spawn_gateway`], or the harness's panic message.
async fn started(start: tokio::task::JoinHandle<Gateway>) -> Result<Gateway, String> {
    start.await.map_err(|e| {
        e.try_into_panic()
            .ok()
            .and_then(|p| p.downcast::<String>().ok().map(|s| plain(&s)))
            .unwrap_or_else(|| "gateway start failed".into())
    })
}

// ---------------------------------------------------------------------------------------------
// Checks

/// `/health` as JSON.
fn health(gw: &Gateway) -> Option<serde_json::Value> {
    serde_json::from_str(&gw.get("/health")?).ok()
}

/// `(store.state, store.cause)` from `/health`; empty strings when absent.
fn store_state(gw: &Gateway) -> (String, String) {
    let h = health(gw).unwrap_or_default();
    let s = |k: &str| h["store"][k].as_str().unwrap_or_default().to_string();
    (s("state"), s("cause"))
}

fn refusing(gw: &Gateway, cause: &str) -> bool {
    store_state(gw) == ("refusing".to_string(), cause.to_string())
}

/// Acknowledged seqs of `d` the cloud has not seen.
fn missing(r: &Report, d: &DeviceReport) -> Vec<u64> {
    let seen = r.sources.get(&d.src).map(|s| &s.unique);
    d.acked
        .iter()
        .copied()
        .filter(|q| !seen.is_some_and(|u| u.contains(q)))
        .collect()
}

fn missing_total(r: &Report, ds: &[DeviceReport]) -> usize {
    ds.iter().map(|d| missing(r, d).len()).sum()
}

/// Waits until the cloud has every acknowledged seq of `ds`, or until nothing more can come
/// (the cloud saw nothing new for 5 s and the gateway's queue is empty, or for 20 s whatever
/// the queue says: a connected bridge with a backlog does not pause that long), or `within`
/// passes.
async fn wait_delivered(
    col: &Collector,
    gw: &Gateway,
    ds: &[DeviceReport],
    within: Duration,
) -> Report {
    let deadline = Instant::now() + within;
    let (mut last, mut since) = (usize::MAX, Instant::now());
    loop {
        let r = check(&col.received.lock().unwrap());
        if missing_total(&r, ds) == 0 {
            return r;
        }
        let n = col.count();
        if n != last {
            (last, since) = (n, Instant::now());
        }
        let quiet = since.elapsed();
        let idle = quiet > Duration::from_secs(20)
            || (quiet > Duration::from_secs(5) && gw.metric("fieldgate_queue_records") == 0.0);
        if idle || Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One line per device: acknowledged, delivered, lost (first few), duplicates; and the total
/// number of acknowledged seqs lost.
fn loss_table(r: &Report, ds: &[DeviceReport]) -> (usize, String) {
    let mut lost = 0;
    let mut out = String::new();
    for d in ds {
        let m = missing(r, d);
        lost += m.len();
        let src = r.sources.get(&d.src);
        out += &format!(
            "  {}: acked {}, in cloud {}, LOST {} (first {:?}), duplicates {}, sent {} \
             (resent {}), connects {}, gave_up {}, last error {:?}\n",
            d.src,
            d.acked.len(),
            src.map(|s| s.unique.len()).unwrap_or(0),
            m.len(),
            &m[..m.len().min(8)],
            src.map(|s| s.duplicates).unwrap_or(0),
            d.stats.sent,
            d.stats.resent,
            d.stats.connects,
            d.stats.gave_up,
            d.stats.last_error,
        );
    }
    (lost, out)
}

/// Seqs in the cloud a device never sent (a harness sanity check: the gateway cannot invent).
fn phantoms(r: &Report, ds: &[DeviceReport]) -> usize {
    ds.iter()
        .map(|d| {
            r.sources
                .get(&d.src)
                .map(|s| s.unique.range(d.stats.next_seq..).count())
                .unwrap_or(0)
        })
        .sum()
}

/// A gateway log without its ANSI colour codes.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ parameters final-byte (a letter)
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// WARN and ERROR lines of a gateway log, at most `n` of them (the first ones).
fn notable(log: &str, n: usize) -> String {
    let log = plain(log);
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains("ERROR"))
        .collect();
    let mut out = lines[..lines.len().min(n)].join("\n");
    if lines.len() > n {
        out += &format!("\n  ... {} more WARN/ERROR lines", lines.len() - n);
    }
    out
}

/// The non-zero `fieldgate_dropped_total{reason}` samples, e.g. `broker_overrun=12`.
fn dropped_summary(gw: &Gateway) -> String {
    let text = gw.get("/metrics").unwrap_or_default();
    let parts: Vec<String> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("fieldgate_dropped_total{reason=\"")?;
            let (reason, v) = rest.split_once("\"} ")?;
            (v.trim() != "0").then(|| format!("{reason}={}", v.trim()))
        })
        .collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(" ")
    }
}

/// The first `n` lines of a gateway log containing `pat`, joined, without the timestamp.
fn lines_with(log: &str, pat: &str, n: usize) -> String {
    plain(log)
        .lines()
        .filter(|l| l.contains(pat))
        .take(n)
        .map(|l| l.split_once(' ').map(|(_, rest)| rest.trim()).unwrap_or(l))
        .collect::<Vec<_>>()
        .join(" | ")
}

fn tail(log: &str, n: usize) -> String {
    let log = plain(log);
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Directories `queue.damaged-*` in `data_dir` (a store moved aside as corrupt).
fn damaged_dirs(data_dir: &Path) -> Vec<String> {
    std::fs::read_dir(data_dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(".damaged-"))
                .collect()
        })
        .unwrap_or_default()
}

/// A small seeded PRNG (xorshift64*): the seed is printed so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

// ---------------------------------------------------------------------------------------------
// 1. kill -9 at random moments

async fn kill9_rounds(cloud_up: bool) {
    let rounds = env_u64("FIELDGATE_KILL_ROUNDS", 10);
    let n_dev = env_u64("FIELDGATE_KILL_DEVICES", 4);
    let seed = env_u64(
        "FIELDGATE_KILL_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    )
    .max(1);
    let variant = if cloud_up { "cloud up" } else { "cloud down" };
    println!("kill -9 ({variant}): {rounds} rounds, {n_dev} devices, FIELDGATE_KILL_SEED={seed}");
    let mut rng = Rng(seed);

    let s = setup().await;
    if !cloud_up {
        s.proxy.cut();
    }
    let col = s.collector().await;
    let mut gw = s.gateway().await;
    let devices: Vec<Device> = (0..n_dev)
        .map(|i| Device::spawn(DeviceConfig::new(s.ports.mqtt, &format!("k{i}"), u64::MAX)))
        .collect();
    let mut history = String::new();
    let mut stalled_rounds = 0;
    for round in 0..rounds {
        // Kill while the devices are publishing on this incarnation: after some acks came.
        let before = total_acked(&devices);
        if !eventually(Duration::from_secs(30), || total_acked(&devices) > before).await {
            stalled_rounds += 1;
        }
        let ms = 50 + rng.below(1200);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        let acked_at_kill = total_acked(&devices);
        let errors = lines_with(&gw.log_text(), "ERROR", 3);
        let dropped = dropped_summary(&gw);
        gw.kill9();
        gw = s.gateway().await;
        history += &format!(
            "  round {round}: killed {ms} ms after acks resumed with {acked_at_kill} acked \
             (dropped before the kill: {dropped}); restart: {}{}\n",
            lines_with(&gw.log_text(), "queue opened", 1),
            if errors.is_empty() {
                String::new()
            } else {
                format!("\n    before the kill: {errors}")
            }
        );
    }
    // Let the last incarnation take some traffic too, then stop the devices where they are.
    let before = total_acked(&devices);
    let _ = eventually(Duration::from_secs(30), || total_acked(&devices) > before).await;
    tokio::time::sleep(Duration::from_millis(50 + rng.below(1200))).await;
    let reports = stop_all(devices).await;
    s.proxy.restore();
    let r = wait_delivered(&col, &gw, &reports, Duration::from_secs(180)).await;
    let (lost, table) = loss_table(&r, &reports);
    let acked: usize = reports.iter().map(|d| d.acked.len()).sum();
    println!(
        "kill -9 ({variant}): {rounds} kills, {acked} acknowledged, {lost} lost, {} duplicates; \
         last gateway dropped: {}\n{table}",
        r.duplicates(),
        dropped_summary(&gw)
    );
    assert!(
        lost == 0,
        "kill -9 ({variant}, seed {seed}): {lost} of {acked} acknowledged messages never reached \
         the cloud after {rounds} kills\n{table}\n{history}--- last gateway, tail:\n{}",
        tail(&gw.log_text(), 40)
    );
    assert_eq!(phantoms(&r, &reports), 0, "the cloud got seqs never sent");
    assert!(acked > 0, "no message was ever acknowledged\n{table}");
    assert!(
        reports.iter().all(|d| !d.stats.gave_up),
        "a device could not reconnect\n{table}"
    );
    if stalled_rounds > 0 {
        println!("note: in {stalled_rounds} rounds no ack came within 30 s before the kill");
    }
}

/// kill -9 at random moments while devices publish as fast as they can, cloud unreachable:
/// after the last restart the cloud comes up and gets every acknowledged seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_at_random_moments_loses_nothing_acknowledged_cloud_down() {
    kill9_rounds(false).await;
}

/// The same with the cloud up all along (records in flight to the cloud when killed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_at_random_moments_loses_nothing_acknowledged_cloud_up() {
    kill9_rounds(true).await;
}

// ---------------------------------------------------------------------------------------------
// 2. The PUBACK waits for the fsync

/// With every commit failing there is no PUBACK; with slow commits each PUBACK comes only
/// once `fieldgate_store_durable_seq` covers it; once the fault is gone everything is
/// acknowledged and delivered, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_waits_for_the_fsync() {
    let s = setup().await;
    let col = s.collector().await;
    let gw = s.gateway().await;
    // An empty queue: nothing is durable yet (the gauge may not exist before a first commit).
    let durable0 = Some(gw.metric("fieldgate_store_durable_seq"))
        .filter(|v| !v.is_nan())
        .unwrap_or(0.0);
    let errors0 = gw.metric("fieldgate_store_commit_errors_total");

    // Phase 1: every commit fails.
    s.fault("fsync_fail");
    let dev = Device::spawn(
        DeviceConfig::new(s.ports.mqtt, "f", 5)
            .inflight(10)
            .probe(gw.http, "fieldgate_store_durable_seq"),
    );
    let attempted = eventually(Duration::from_secs(20), || {
        gw.metric("fieldgate_store_commit_errors_total") > errors0
    })
    .await;
    let refused_io = eventually(Duration::from_secs(10), || refusing(&gw, "io")).await;
    let acked_while_failing = dev.acked();
    let errors1 = gw.metric("fieldgate_store_commit_errors_total");
    assert!(
        acked_while_failing.is_empty(),
        "the device got PUBACKs for {acked_while_failing:?} while every commit fails \
         (commit errors {errors0} -> {errors1}, durable seq {})\n{}",
        gw.metric("fieldgate_store_durable_seq"),
        tail(&gw.log_text(), 30)
    );
    assert!(
        attempted,
        "fieldgate_store_commit_errors_total stayed {errors1} with fsync_fail set: no commit \
         was attempted, or the fault hook is not active\n{}",
        tail(&gw.log_text(), 30)
    );
    assert!(
        refused_io,
        "/health while commits fail: {:?}",
        gw.get("/health")
    );
    assert_eq!(
        health(&gw).unwrap_or_default()["status"],
        "degraded",
        "/health status while commits fail"
    );
    assert!(gw.metric("fieldgate_store_refusals_total{cause=\"io\"}") >= 1.0);

    // Phase 2: commits succeed, slowly. The 5 held messages and 20 more get their PUBACK,
    // each only when the durable seq (read right after it) covers as many records.
    s.fault("fsync_delay_ms=300");
    dev.allow_up_to(25);
    let all = eventually(WAIT, || dev.acked_count() == 25).await;
    assert!(
        all,
        "with a slow fsync only {} of 25 acknowledged\n{}",
        dev.acked_count(),
        tail(&gw.log_text(), 30)
    );
    let probes = dev.probes();
    let early: Vec<_> = probes
        .iter()
        .filter(|p| p.value.is_nan() || p.value - durable0 < p.acked as f64)
        .collect();
    assert!(
        early.is_empty(),
        "PUBACKs before the durable seq covered them (durable seq at start {durable0}): {early:?}"
    );
    // A 300 ms commit is a slow disk: counted, and said in the log.
    assert!(gw.metric("fieldgate_store_slow_writes_total") >= 1.0);
    assert!(
        gw.log_text().contains("the queue's disk is slow"),
        "{}",
        tail(&gw.log_text(), 20)
    );
    assert!(
        eventually(Duration::from_secs(10), || store_state(&gw).0 == "ok").await,
        "store state once commits succeed again: {:?}",
        gw.get("/health")
    );

    // Phase 3: no fault. Everything acknowledged and in the cloud.
    s.fault("");
    dev.allow_up_to(45);
    let all = eventually(WAIT, || dev.acked_count() == 45).await;
    let rep = dev.finish(Duration::from_secs(10)).await;
    assert!(all, "only {} of 45 acknowledged", rep.acked.len());
    let r = wait_delivered(&col, &gw, std::slice::from_ref(&rep), WAIT).await;
    let (lost, table) = loss_table(&r, std::slice::from_ref(&rep));
    assert_eq!(lost, 0, "{table}");
    assert_eq!(r.missing("f", 0..45), Vec::<u64>::new());
    println!(
        "fsync: commit errors {errors0} -> {errors1}, durable seq {durable0} -> {}, probes {}",
        gw.metric("fieldgate_store_durable_seq"),
        probes.len()
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Disk full

/// A tmpfs mounted for one test, unmounted when dropped (also on panic).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a `size`-byte tmpfs; None when not permitted (not root, no CAP_SYS_ADMIN).
    fn mount(size: u64) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs { dir })
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let umount = |lazy: bool| {
            let mut c = Command::new("umount");
            if lazy {
                c.arg("-l");
            }
            c.arg(self.dir.path()).status().is_ok_and(|s| s.success())
        };
        if !umount(false) {
            umount(true);
        }
    }
}

/// How a test makes the disk full: a real small file system, or the fault hook.
enum Disk {
    Tmpfs { fs: Tmpfs, filler: PathBuf },
    Hook,
}

impl Disk {
    /// A tmpfs of 8 MiB if mounting is permitted, else the `enospc` fault hook (said so).
    fn new(test: &str) -> Disk {
        let mount = std::env::var_os("FIELDGATE_TEST_NO_MOUNT").is_none();
        match mount.then(|| Tmpfs::mount(8 * 1024 * 1024)).flatten() {
            Some(fs) => {
                let filler = fs.path().join("filler");
                println!(
                    "{test}: data_dir on an 8 MiB tmpfs at {}",
                    fs.path().display()
                );
                Disk::Tmpfs { fs, filler }
            }
            None => {
                println!(
                    "{test}: cannot mount a tmpfs here (not root?); FALLING BACK to the fault \
                     hook `enospc` (FIELDGATE_FAULT_FILE)"
                );
                Disk::Hook
            }
        }
    }

    /// Where the gateway's data_dir goes.
    fn data_dir(&self, fallback: &Path) -> PathBuf {
        match self {
            Disk::Tmpfs { fs, .. } => fs.path().join("data"),
            Disk::Hook => fallback.to_path_buf(),
        }
    }

    /// Fills the disk, leaving about `leave` bytes free (tmpfs), or sets `enospc` (hook).
    fn fill(&self, s: &Setup, leave: u64) {
        match self {
            Disk::Tmpfs { filler, .. } => {
                use std::io::Write;
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(filler)
                    .unwrap();
                let chunk = vec![0x5Au8; 64 * 1024];
                let mut written = 0u64;
                while f.write_all(&chunk).is_ok() {
                    written += chunk.len() as u64;
                }
                let _ = f.sync_all();
                let len = std::fs::metadata(filler).map(|m| m.len()).unwrap_or(0);
                if leave > 0 {
                    f.set_len(len.saturating_sub(leave)).unwrap();
                }
                println!("filler: wrote {written} bytes, left {leave} free");
            }
            Disk::Hook => s.fault("enospc"),
        }
    }

    /// Gives the space back.
    fn free(&self, s: &Setup) {
        match self {
            Disk::Tmpfs { filler, .. } => std::fs::remove_file(filler).unwrap(),
            Disk::Hook => s.fault(""),
        }
    }
}

/// Devices publish with the cloud down until the disk is full: PUBACKs stop, `/health` says
/// why, nothing acknowledged is lost; space comes back: without a restart the held messages
/// are taken, PUBACKs resume, and everything acknowledged reaches the cloud.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_withholds_acks_and_recovers_without_restart() {
    let s = setup().await;
    s.proxy.cut();
    let disk = Disk::new("disk full");
    let data_dir = disk.data_dir(s.data.path());
    let col = s.collector().await;
    let gw = s.gateway_on(&s.ports, &data_dir, toml::Table::new()).await;
    let mut problems: Vec<String> = Vec::new();

    let (n_dev, window) = (3u64, 100usize);
    if matches!(disk, Disk::Tmpfs { .. }) {
        disk.fill(&s, 1024 * 1024);
    }
    let devices: Vec<Device> = (0..n_dev)
        .map(|i| {
            Device::spawn(
                DeviceConfig::new(s.ports.mqtt, &format!("d{i}"), u64::MAX).inflight(window),
            )
        })
        .collect();
    if matches!(disk, Disk::Hook) {
        let _ = eventually(WAIT, || total_acked(&devices) >= 3000).await;
        disk.fill(&s, 0);
    }

    // Until writes fail: the contract's signal, or today's (commit errors, store_error drops).
    let failing = || {
        refusing(&gw, "disk_full")
            || gw.metric("fieldgate_store_commit_errors_total") > 0.0
            || gw.metric("fieldgate_dropped_total{reason=\"store_error\"}") > 0.0
    };
    if !eventually(Duration::from_secs(60), failing).await {
        problems.push("writes never failed on the full disk (no refusal, no commit error)".into());
    }
    // The window starts once the store reports the refusal: a failed checkpoint is counted
    // as a commit error a moment before the next commit fails and the store says so (until
    // then writes still go to the write-ahead file, and `/health` rightly says "ok"). If it
    // never says so, the sampling below reports it.
    let _ = eventually(Duration::from_secs(10), || refusing(&gw, "disk_full")).await;
    // A sampling window: while the disk is full, at most what was already durable may still
    // be acknowledged (bounded by the devices' windows). Skipped if the store reports itself
    // writable again meanwhile (it reclaimed space: acks for what it then took are fine).
    // `/health` is sampled all along the window: on a full disk it must say so every time.
    let a1 = total_acked(&devices);
    let window_end = Instant::now() + Duration::from_secs(3);
    let mut seen: std::collections::BTreeMap<String, usize> = Default::default();
    while Instant::now() < window_end {
        let h = health(&gw).unwrap_or_default();
        let (state, cause) = (&h["store"]["state"], &h["store"]["cause"]);
        *seen
            .entry(format!("status={} store={state}/{cause}", h["status"]))
            .or_default() += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let a2 = total_acked(&devices);
    let store_ok_meanwhile = seen.keys().any(|k| k.contains("store=\"ok\""));
    let slack = n_dev as usize * window;
    if a2 - a1 > slack && !store_ok_meanwhile {
        problems.push(format!(
            "PUBACKs kept coming on a full disk: {} more in the sampling window (bound {slack})",
            a2 - a1
        ));
    }
    let want = "status=\"degraded\" store=\"refusing\"/\"disk_full\"";
    if seen.keys().any(|k| k != want) {
        problems.push(format!(
            "/health on a full disk, sampled {} times: {seen:?} (want always {want}); \
             last: {}",
            seen.values().sum::<usize>(),
            gw.get("/health").unwrap_or_default()
        ));
    }
    let refusals = gw.metric("fieldgate_store_refusals_total{cause=\"disk_full\"}");
    if refusals.is_nan() || refusals < 1.0 {
        problems.push(format!(
            "refusals_total{{cause=\"disk_full\"}} = {refusals}"
        ));
    }

    // Space comes back; no restart.
    disk.free(&s);
    let resumed = eventually(Duration::from_secs(60), || {
        total_acked(&devices) > a2 + slack && store_state(&gw).0 == "ok"
    })
    .await;
    if !resumed {
        problems.push(format!(
            "after space came back: {} acked (was {a2}), store {:?}",
            total_acked(&devices),
            store_state(&gw)
        ));
    }
    let reports = stop_all(devices).await;
    s.proxy.restore();
    let r = wait_delivered(&col, &gw, &reports, Duration::from_secs(120)).await;
    let (lost, table) = loss_table(&r, &reports);
    if lost > 0 {
        problems.push(format!(
            "{lost} acknowledged messages never reached the cloud"
        ));
    }
    let damaged = damaged_dirs(&data_dir);
    if !damaged.is_empty() {
        problems.push(format!("store moved aside as damaged: {damaged:?}"));
    }
    let log = plain(&gw.log_text());
    let enospc_lines = log
        .lines()
        .filter(|l| l.contains("No space left") || l.contains("disk_full"))
        .count();
    println!(
        "disk full: acked {a1} at the first failure, {a2} after the sampling window, {} at the end; \
         {lost} lost; {} log lines, {enospc_lines} about the full disk\n{table}",
        reports.iter().map(|d| d.acked.len()).sum::<usize>(),
        log.lines().count()
    );
    assert!(
        problems.is_empty(),
        "disk full:\n- {}\n{table}\n{}\n--- tail:\n{}",
        problems.join("\n- "),
        notable(&log, 15),
        tail(&log, 20)
    );
}

/// A gateway started on a disk that is already full does not take ENOSPC for corruption (no
/// `queue.damaged-*`, the queue kept), does not exit, and carries on by itself once space
/// comes back: the old queue and new messages all reach the cloud. If it serves `/health` on
/// the full disk it must say `refusing`/`disk_full` and withhold PUBACKs; waiting for space
/// before serving is accepted too (the contract does not say which; the run prints which).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_on_a_full_disk_is_not_corruption() {
    let s = setup().await;
    s.proxy.cut();
    let disk = Disk::new("full at start");
    let data_dir = disk.data_dir(s.data.path());
    let col = s.collector().await;
    let mut problems: Vec<String> = Vec::new();

    // A queue of 2000 records, stopped cleanly.
    let gw = s.gateway_on(&s.ports, &data_dir, toml::Table::new()).await;
    let pre = Device::spawn(DeviceConfig::new(s.ports.mqtt, "pre", 2000).exit_when_done());
    assert!(
        eventually(WAIT, || pre.is_finished()).await,
        "pre: {} of 2000 acked",
        pre.acked_count()
    );
    let pre = pre.stop().await;
    assert_eq!(pre.acked.len(), 2000);
    assert!(eventually(WAIT, || gw.metric("fieldgate_queue_records") == 2000.0).await);
    let (status, log) = gw.terminate();
    assert!(status.success(), "exit {status}\n{log}");

    disk.fill(&s, 0);
    // The gateway may serve `/health` at once (degraded: refusing, disk_full) or wait for space
    // before it serves anything; the contract does not say which, so both are accepted and the
    // run says which it was. Exiting (a crash loop under systemd) or a quarantined queue is not.
    let start = s.spawn_gateway(&s.ports, &data_dir, toml::Table::new());
    let served_at_once = eventually(Duration::from_secs(10), || start.is_finished()).await;
    let damaged = damaged_dirs(&data_dir);
    if !damaged.is_empty() {
        problems.push(format!("ENOSPC at start taken for corruption: {damaged:?}"));
    }
    let fail_start = |problems: &[String], why: String| -> ! {
        panic!(
            "start on a full disk:\n- {}\n- the gateway did not start:\n{}",
            problems.join("\n- "),
            tail(&why, 15)
        )
    };
    let (gw, post) = if served_at_once {
        let gw = started(start)
            .await
            .unwrap_or_else(|why| fail_start(&problems, why));
        println!(
            "full at start: /health served on the full disk: {:?}",
            gw.get("/health")
        );
        let post = Device::spawn(DeviceConfig::new(s.ports.mqtt, "post", 200).inflight(50));
        if !eventually(Duration::from_secs(20), || refusing(&gw, "disk_full")).await {
            problems.push(format!("/health on a full disk: {:?}", gw.get("/health")));
        } else if post.acked_count() == 200 {
            // A few records may fit in the slack of pages the store already has; not all.
            problems.push("all 200 PUBACKed while the store says it refuses".into());
        }
        disk.free(&s);
        (gw, post)
    } else {
        println!(
            "full at start: NOTE the gateway did not serve /health within 10 s on the full disk \
             (it waits for space before it starts); freeing space now"
        );
        disk.free(&s);
        let gw = started(start)
            .await
            .unwrap_or_else(|why| fail_start(&problems, why));
        let post = Device::spawn(DeviceConfig::new(s.ports.mqtt, "post", 200).inflight(50));
        (gw, post)
    };
    let damaged = damaged_dirs(&data_dir);
    if !damaged.is_empty() && !problems.iter().any(|p| p.contains("corruption")) {
        problems.push(format!("ENOSPC at start taken for corruption: {damaged:?}"));
    }
    if gw.metric("fieldgate_store_quarantined") == 1.0 {
        problems.push("fieldgate_store_quarantined = 1".into());
    }
    let records = gw.metric("fieldgate_queue_records");
    if records < 2000.0 {
        problems.push(format!(
            "queue has {records} records after the restart, want the 2000 of before"
        ));
    }
    if !eventually(WAIT, || post.acked_count() == 200).await {
        problems.push(format!(
            "after space came back only {} of 200 acked",
            post.acked_count()
        ));
    }
    let post = post.stop().await;
    s.proxy.restore();
    let reports = [pre, post];
    let r = wait_delivered(&col, &gw, &reports, WAIT).await;
    let (lost, table) = loss_table(&r, &reports);
    if lost > 0 {
        problems.push(format!(
            "{lost} acknowledged messages never reached the cloud"
        ));
    }
    let log = gw.log_text();
    println!("full at start: {lost} lost\n{table}");
    assert!(
        problems.is_empty(),
        "start on a full disk:\n- {}\n{table}\n{}\n--- tail:\n{}",
        problems.join("\n- "),
        notable(&log, 15),
        tail(&log, 20)
    );
}

// ---------------------------------------------------------------------------------------------
// 4. A flooding device next to a quiet one

/// One device floods QoS 1 with a 1000-message window while another publishes every 50 ms;
/// cloud up. Neither loses an acknowledged message, the quiet one is still served, and the
/// gateway's memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flooding_device_next_to_a_quiet_one_loses_nothing_acknowledged() {
    const RSS_LIMIT_KIB: u64 = 256 * 1024;
    let secs = env_u64("FIELDGATE_FLOOD_SECS", 10);
    let s = setup().await;
    let col = s.collector().await;
    let gw = s
        .gateway_on(&s.ports, s.data.path(), toml::toml! { max_inflight = 1000 })
        .await;
    assert!(eventually(WAIT, || gw.metric("fieldgate_cloud_connected") == 1.0).await);
    let flood = Device::spawn(
        DeviceConfig::new(s.ports.mqtt, "flood", u64::MAX)
            .inflight(1000)
            .size(env_u64("FIELDGATE_FLOOD_BYTES", 1024) as usize),
    );
    let quiet = Device::spawn(
        DeviceConfig::new(s.ports.mqtt, "quiet", u64::MAX)
            .inflight(10)
            .interval(Duration::from_millis(50)),
    );
    let pid = gw.pid();
    let mut max_rss = 0u64;
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        max_rss = max_rss.max(proc_kib(pid, "VmRSS").unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let flood = flood.stop().await;
    let quiet = quiet.finish(WAIT).await;
    max_rss = max_rss.max(proc_kib(pid, "VmRSS").unwrap_or(0));
    let reports = [flood, quiet];
    let r = wait_delivered(&col, &gw, &reports, Duration::from_secs(180)).await;
    let (lost, table) = loss_table(&r, &reports);
    let overrun = gw.metric("fieldgate_dropped_total{reason=\"broker_overrun\"}");
    println!(
        "flood {secs} s: max RSS {} MiB, {lost} acknowledged lost, broker_overrun {overrun}\n{table}",
        max_rss / 1024
    );
    assert!(
        lost == 0,
        "{lost} acknowledged messages lost next to a flood (broker_overrun {overrun})\n{table}\n{}",
        notable(&gw.log_text(), 15)
    );
    assert!(
        reports[1].drained() && !reports[1].acked.is_empty(),
        "the quiet device: {} sent, {} acknowledged\n{table}",
        reports[1].stats.next_seq,
        reports[1].acked.len()
    );
    assert!(
        max_rss < RSS_LIMIT_KIB,
        "gateway RSS reached {} MiB (bound {} MiB)",
        max_rss / 1024,
        RSS_LIMIT_KIB / 1024
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Damaged store files

#[derive(Debug, Clone, Copy)]
enum Damage {
    /// The sled `db` file cut to half its length.
    Truncate,
    /// One bit flipped in the middle of `db`.
    FlipBit,
    /// A 4 KiB block of zeros in the middle of `db`.
    ZeroBlock,
}

fn damage(db: &Path, kind: Damage) -> String {
    use std::io::{Seek, SeekFrom, Write};
    let len = std::fs::metadata(db).unwrap().len();
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(db)
        .unwrap();
    match kind {
        Damage::Truncate => {
            f.set_len(len / 2).unwrap();
            format!("truncated {len} -> {}", len / 2)
        }
        Damage::FlipBit => {
            use std::io::Read;
            let at = len / 2;
            let mut b = [0u8];
            f.seek(SeekFrom::Start(at)).unwrap();
            f.read_exact(&mut b).unwrap();
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(&[b[0] ^ 0x10]).unwrap();
            format!("flipped bit 4 of byte {at} of {len}")
        }
        Damage::ZeroBlock => {
            let at = (len / 2) & !4095;
            let n = 4096.min(len - at) as usize;
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(&vec![0u8; n]).unwrap();
            format!("zeroed {n} bytes at {at} of {len}")
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

fn listing(dir: &Path) -> String {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let m = e.metadata().ok();
        out.push(format!(
            "{} ({} bytes{})",
            e.file_name().to_string_lossy(),
            m.as_ref().map(|m| m.len()).unwrap_or(0),
            if m.is_some_and(|m| m.is_dir()) {
                ", dir"
            } else {
                ""
            }
        ));
    }
    out.sort();
    out.join(", ")
}

/// A queue of 20,000 records (cloud down, SIGTERM), then for each kind of damage to sled's
/// `db` file, a gateway started on a copy: it starts and serves /health, reports what it
/// recovered and lost, and delivers what is left; delivered + counted as corrupt accounts for
/// every record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_store_files_are_survived() {
    let n = env_u64("FIELDGATE_DAMAGE_RECORDS", 20_000);
    let s = setup().await;
    s.proxy.cut();
    let gw = s.gateway().await;
    let dev = Device::spawn(DeviceConfig::new(s.ports.mqtt, "z", n).exit_when_done());
    assert!(
        eventually(Duration::from_secs(180), || dev.is_finished()).await,
        "only {} of {n} acknowledged",
        dev.acked_count()
    );
    let rep = dev.stop().await;
    assert_eq!(rep.acked.len() as u64, n, "{:?}", rep.stats);
    assert!(
        eventually(WAIT, || gw.metric("fieldgate_queue_records") == n as f64).await,
        "queue records {}",
        gw.metric("fieldgate_queue_records")
    );
    let (status, log) = gw.terminate();
    assert!(status.success(), "exit {status}\n{log}");
    let queue = s.data.path().join("queue");
    println!("queue files: {}", listing(&queue));
    assert!(
        queue.join("db").exists(),
        "no sled db file in {}",
        queue.display()
    );

    let mut problems = Vec::new();
    let mut table = String::new();
    for kind in [Damage::Truncate, Damage::FlipBit, Damage::ZeroBlock] {
        let copy = tempfile::tempdir().unwrap();
        copy_dir(s.data.path(), copy.path());
        let what = damage(&copy.path().join("queue").join("db"), kind);
        s.proxy.cut();
        let col = s.collector().await;
        let started = s
            .try_gateway_on(&GatewayPorts::new(), copy.path(), toml::Table::new())
            .await;
        let gw = match started {
            Ok(gw) => gw,
            Err(why) => {
                problems.push(format!(
                    "{kind:?} ({what}): did not start: {}",
                    tail(&why, 15)
                ));
                table += &format!("  {kind:?}: did not start\n");
                continue;
            }
        };
        let h = health(&gw);
        let after_start = gw.metric("fieldgate_queue_records");
        s.proxy.restore();
        let r = wait_delivered(
            &col,
            &gw,
            std::slice::from_ref(&rep),
            Duration::from_secs(120),
        )
        .await;
        let delivered = r.unique("z") as u64;
        let corrupt = gw.metric("fieldgate_dropped_total{reason=\"corrupt\"}");
        let dups = r.duplicates();
        let alive = gw.get("/health").is_some();
        let log = plain(&gw.log_text());
        let reported: Vec<&str> = log
            .lines()
            .filter(|l| {
                let l = l.to_lowercase();
                l.contains("recover")
                    || l.contains("corrupt")
                    || l.contains("damaged")
                    || l.contains("lost")
            })
            .take(6)
            .collect();
        table += &format!(
            "  {kind:?} ({what}): queue at start {after_start}, delivered {delivered} of {n}, \
             corrupt {corrupt}, duplicates {dups}, quarantined {}, alive {alive}\n    {}\n",
            gw.metric("fieldgate_store_quarantined"),
            reported.join("\n    ")
        );
        let k = format!("{kind:?} ({what})");
        if !h.is_some_and(|h| h["status"].is_string()) {
            problems.push(format!("{k}: /health did not answer with a status"));
        }
        if !alive {
            problems.push(format!(
                "{k}: gateway died while delivering\n{}",
                tail(&log, 15)
            ));
        }
        if delivered == 0 {
            problems.push(format!("{k}: nothing delivered"));
        }
        if corrupt.is_nan() || delivered as f64 + corrupt < n as f64 {
            problems.push(format!(
                "{k}: {} records neither delivered nor counted as corrupt (delivered {delivered}, \
                 corrupt {corrupt})",
                n as f64 - delivered as f64 - if corrupt.is_nan() { 0.0 } else { corrupt }
            ));
        }
        if delivered < n && notable(&log, 1).is_empty() {
            problems.push(format!(
                "{k}: {} records lost without a WARN or ERROR",
                n - delivered
            ));
        }
        if dups > 256 {
            problems.push(format!("{k}: {dups} duplicates with no link cut"));
        }
        if phantoms(&r, std::slice::from_ref(&rep)) > 0 {
            problems.push(format!("{k}: seqs delivered that were never sent"));
        }
        gw.kill9();
    }
    println!("damaged store, {n} records:\n{table}");
    assert!(
        problems.is_empty(),
        "damaged store files:\n- {}\n{table}",
        problems.join("\n- ")
    );
}

/// On a full disk an MQTT 5 device is told so: once the store refuses writes, a QoS 1
/// publish gets PUBACK 0x97 (quota exceeded) and is not taken, and the answers already held
/// go as 0x97 too, where a 3.1.1 device's are held. When space comes back, PUBACKs say
/// success again, and every message acknowledged with success reaches the cloud. Of those
/// answered 0x97 only the ones the journal held when the refusal began may.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_tells_an_mqtt5_device_quota_exceeded() {
    use common::client5::C5;
    use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, Publish};
    use rumqttc::v5::mqttbytes::QoS as Q5;
    let s = setup().await;
    s.proxy.cut();
    let disk = Disk::new("mqtt5 disk full");
    let data_dir = disk.data_dir(s.data.path());
    let col = s.collector().await;
    let gw = s.gateway_on(&s.ports, &data_dir, toml::Table::new()).await;
    let mut dev = C5::clean(s.ports.mqtt, "dev-v5").await;
    disk.fill(&s, 0);
    // Publish one every 20 ms, reading what comes back, until some were refused and the
    // store said why; then give the space back and keep going a little.
    let mut sent: Vec<(u16, u64)> = Vec::new();
    let mut answers: std::collections::HashMap<u16, PubAckReason> = Default::default();
    let mut freed_at = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    for seq in 0u64.. {
        assert!(
            Instant::now() < deadline,
            "no 0x97 within 2 minutes: {} answered of {}, store {:?}, commit errors {}, \
             refused by queue {}\n{}",
            answers.len(),
            sent.len(),
            store_state(&gw),
            gw.metric("fieldgate_store_commit_errors_total"),
            gw.metric("fieldgate_broker_refused_by_queue_total"),
            gw.log_text()
        );
        let mut p = Publish::new("dev/v5/data", Q5::AtLeastOnce, seq.to_string(), None);
        p.pkid = (seq % 60_000 + 1) as u16;
        sent.push((p.pkid, seq));
        dev.send(Packet::Publish(p)).await;
        while let Some(Packet::PubAck(a)) = dev.recv_within(Duration::from_millis(20)).await {
            answers.insert(a.pkid, a.reason);
        }
        let refused = answers
            .values()
            .filter(|r| **r == PubAckReason::QuotaExceeded)
            .count();
        if freed_at.is_none() && refused >= 5 && refusing(&gw, "disk_full") {
            disk.free(&s);
            freed_at = Some(seq);
        }
        if freed_at.is_some_and(|f| seq >= f + 50) {
            break;
        }
    }
    // Every publish gets its answer (the held ones once the store took them).
    let end = Instant::now() + WAIT;
    while answers.len() < sent.len() && Instant::now() < end {
        if let Some(Packet::PubAck(a)) = dev.recv_within(Duration::from_millis(500)).await {
            answers.insert(a.pkid, a.reason);
        }
    }
    assert_eq!(answers.len(), sent.len(), "publishes answered");
    let ok: Vec<u64> = sent
        .iter()
        .filter(|(p, _)| answers[p] == PubAckReason::Success)
        .map(|(_, s)| *s)
        .collect();
    let refused: Vec<u64> = sent
        .iter()
        .filter(|(p, _)| answers[p] == PubAckReason::QuotaExceeded)
        .map(|(_, s)| *s)
        .collect();
    assert!(
        !refused.is_empty() && !ok.is_empty(),
        "ok {ok:?} refused {refused:?}"
    );
    assert!(gw.metric("fieldgate_broker_refused_by_queue_total") >= refused.len() as f64);
    s.proxy.restore();
    let topic = "fieldgate/gw1/dev/v5/data";
    assert!(
        eventually(WAIT, || col.on_topic(topic).len() >= ok.len()).await,
        "{} of {} acknowledged messages reached the cloud\n{}",
        col.on_topic(topic).len(),
        ok.len(),
        gw.log_text()
    );
    let got: std::collections::BTreeSet<u64> = col
        .on_topic(topic)
        .iter()
        .map(|p| String::from_utf8_lossy(p).parse().unwrap())
        .collect();
    let lost: Vec<u64> = ok.iter().filter(|s| !got.contains(s)).copied().collect();
    assert!(lost.is_empty(), "acknowledged and lost: {lost:?}");
    let taken: Vec<u64> = refused
        .iter()
        .filter(|s| got.contains(s))
        .copied()
        .collect();
    // The journal held only the first few when the refusal began; the rest were never taken.
    let first_refused = refused.first().copied().unwrap_or(0);
    assert!(
        taken.iter().all(|s| *s < first_refused + 10),
        "answered 0x97 but sent anyway: {taken:?} (first 0x97: {first_refused})"
    );
}
