//! The queue store on its own: durable appends through the journal (group commit, fsync),
//! the cloud side acknowledging, bytes per record on disk, RSS, and recovery time.
//!
//! Run: `cargo bench --bench store` (`BENCH_RECORDS=1000000` records of `BENCH_SIZE=100`
//! bytes, `BENCH_WRITERS=1000` concurrent publishers each waiting for its own ack before
//! the next, as a device with one message in flight would; `BENCH_DIR` to put the store on
//! another file system, e.g. an SD card).
//!
//! Phases:
//! 1. fill: `writers` tasks append and wait for durability; prints durable appends/s,
//!    fsyncs/s (commits), records per commit, append-to-durable latency percentiles;
//! 2. disk: bytes sled uses for those records, per record;
//! 3. recover: reopen the store (what a restart after kill -9 does) and time it;
//! 4. drain: read everything back in order and acknowledge it (the bridge's work), with
//!    compaction by the journal: records/s.
//!
//! At the end it prints the process's peak RSS (VmHWM).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fieldgate::config::StoreConfig;
use fieldgate::metrics::Metrics;
use fieldgate::store::journal::{self, Entry, Journal};
use fieldgate::store::Store;
use fieldgate::watchdog::Heartbeat;
use tokio_util::sync::CancellationToken;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn vm_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// The journal thread over `store`, and the token that stops it.
fn start_journal(
    store: &Arc<Store>,
    metrics: &Arc<Metrics>,
) -> (Journal, std::thread::JoinHandle<()>, CancellationToken) {
    let stop = CancellationToken::new();
    let (j, thread) = journal::spawn(
        store.clone(),
        metrics.clone(),
        stop.clone(),
        Heartbeat::new("bench"),
    )
    .unwrap();
    (j, thread, stop)
}

fn main() {
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        println!(
            "cargo bench --bench store  (env: BENCH_RECORDS, BENCH_SIZE, BENCH_WRITERS, BENCH_DIR)"
        );
        return;
    }
    // As the gateway runs (see its `main`).
    fieldgate::limit_malloc_arenas();
    let n = env("BENCH_RECORDS", 1_000_000);
    let size = env("BENCH_SIZE", 100) as usize;
    let writers = env("BENCH_WRITERS", 1000).max(1);
    let base = std::env::var("BENCH_DIR").ok();
    let tmp = match &base {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    let dir = tmp.path().join("queue");
    let cfg = StoreConfig {
        max_bytes: 64 * 1024 * 1024 * 1024,
        max_age: Duration::ZERO,
        ..StoreConfig::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "store bench: {n} records x {size} B payload, {writers} publishers each with one \
         message in flight, store at {}",
        dir.display()
    );

    // 1. Fill.
    let metrics = Metrics::new();
    let store = Arc::new(Store::open(&dir, &cfg, metrics.clone()).unwrap());
    let (j, thread, stop) = start_journal(&store, &metrics);
    let payload = Bytes::from(vec![b'x'; size]);
    let started = Instant::now();
    let lat = rt.block_on(async {
        let mut tasks = Vec::new();
        for w in 0..writers {
            let (j, payload) = (j.clone(), payload.clone());
            let mine = n / writers + u64::from(w < n % writers);
            tasks.push(tokio::spawn(async move {
                let mut durable = j.durable();
                let mut lat = Vec::with_capacity(mine as usize);
                for _ in 0..mine {
                    let t0 = Instant::now();
                    let e = Entry {
                        topic: format!("dev/{w}/data"),
                        payload: payload.clone(),
                        retain: false,
                        keep: None,
                        queue: true,
                        ts_ms: 0,
                    };
                    let t = j.append(e).await.unwrap();
                    while *durable.borrow_and_update() < t {
                        durable.changed().await.unwrap();
                    }
                    lat.push(t0.elapsed().as_secs_f64() * 1000.0);
                }
                lat
            }));
        }
        let mut all = Vec::with_capacity(n as usize);
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    });
    let fill = started.elapsed().as_secs_f64();
    let mut lat = lat;
    let commits = metrics.render();
    let commits = commits
        .lines()
        .find_map(|l| l.strip_prefix("fieldgate_store_commits_total "))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    println!(
        "fill:    {:>10.0} durable appends/s  ({:.2} s; {:.0} fsyncs/s, {:.1} records per commit; \
         append->durable p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms)",
        n as f64 / fill,
        fill,
        commits / fill,
        n as f64 / commits,
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99),
        pct(&mut lat, 1.0)
    );
    stop.cancel();
    thread.join().unwrap();
    drop(j);
    let disk = store.bytes_on_disk();
    println!(
        "disk:    {:>10} bytes for {n} records = {:.1} bytes per record ({} B payload + topic)",
        disk,
        disk as f64 / n as f64,
        size
    );
    println!(
        "rss:     {:.1} MiB holding {n} records after the fill",
        vm_kib("VmRSS:") as f64 / 1024.0
    );
    drop(store);

    // 3. Recover.
    let t0 = Instant::now();
    let metrics = Metrics::new();
    let store = Arc::new(Store::open(&dir, &cfg, metrics.clone()).unwrap());
    println!(
        "recover: {:>10.3} s to reopen {} records",
        t0.elapsed().as_secs_f64(),
        store.records()
    );
    println!(
        "rss:     {:.1} MiB after the reopen",
        vm_kib("VmRSS:") as f64 / 1024.0
    );

    // 4. Drain: read in order from disk, acknowledge, let the journal compact.
    let (j, thread, stop) = start_journal(&store, &metrics);
    let t0 = Instant::now();
    let mut from = 0;
    let mut got = 0u64;
    loop {
        let recs = store.read_from(from, 1024).unwrap();
        let Some((last, _)) = recs.last() else { break };
        from = last + 1;
        got += recs.len() as u64;
        let seqs: Vec<u64> = recs.iter().map(|(s, _)| *s).collect();
        store.ack(&seqs);
    }
    let drain = t0.elapsed().as_secs_f64();
    // Let the journal remove the acknowledged batches.
    let deadline = Instant::now() + Duration::from_secs(60);
    while store.bytes() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "drain:   {:>10.0} records/s read + acknowledged ({got} records in {:.2} s; batches \
         left after compaction: {} bytes)",
        got as f64 / drain,
        drain,
        store.bytes()
    );
    stop.cancel();
    thread.join().unwrap();
    drop(j);
    println!(
        "rss:     peak {:.1} MiB (VmHWM), now {:.1} MiB",
        vm_kib("VmHWM:") as f64 / 1024.0,
        vm_kib("VmRSS:") as f64 / 1024.0
    );
}
