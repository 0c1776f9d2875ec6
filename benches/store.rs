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
//!    compaction by the journal: records/s;
//! 5. paced: one publisher at `BENCH_PACED_RATE=1000` records/s for `BENCH_PACED_RECORDS=3000`,
//!    each waiting for its ack: the journal thread's CPU per record and commits per record,
//!    next to the floor, the CPU of one bare `pwrite` + `fdatasync` of a preallocated file on
//!    the same file system at the same rate. Below saturation each ack needs an fsync of its
//!    own (acks are never held to gather more), so that floor is the least CPU a durable
//!    message costs there.
//!
//! At the end it prints the process's peak RSS (VmHWM).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fieldgate::store::config::StoreConfig;
use fieldgate::store::journal::{self, Entry, Journal};
use fieldgate::store::metrics::StoreMetrics;
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

/// utime + stime of one thread of this process, in seconds (`/proc/self/task/<tid>/stat`).
fn thread_cpu_s(tid: u64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap_or_default();
    // The fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    // utime and stime are fields 14 and 15 of stat; `rest` starts at field 3.
    (ticks(11) + ticks(12)) / clock_ticks()
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// The id of this process's thread called `name` (as the kernel keeps it: 15 bytes at most).
fn thread_named(name: &str) -> Option<u64> {
    let name = &name[..name.len().min(15)];
    std::fs::read_dir("/proc/self/task").ok()?.find_map(|e| {
        let e = e.ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        (comm.trim_end() == name)
            .then(|| e.file_name().to_str()?.parse().ok())
            .flatten()
    })
}

/// CPU of the calling thread, in seconds (`getrusage(RUSAGE_THREAD)`, microsecond resolution).
fn own_thread_cpu_s() -> f64 {
    // SAFETY: a zeroed rusage is a valid out-parameter for getrusage.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable rusage.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// `n` bare `pwrite`s of `size` bytes, each followed by `fdatasync`, into a preallocated
/// 2 MiB file in `dir`, paced at `rate`/s: the CPU of the calling thread per write and sync
/// (the sleeps between them not counted), seconds.
fn bare_fsync_cpu(dir: &std::path::Path, n: u64, size: usize, rate: f64) -> f64 {
    use std::os::unix::fs::FileExt;
    const LEN: usize = 2 << 20;
    let path = dir.join("bare-fsync");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    file.write_all_at(&vec![0; LEN], 0).unwrap();
    file.sync_all().unwrap();
    let buf = vec![b'y'; size];
    let gap = Duration::from_secs_f64(1.0 / rate);
    let t0 = Instant::now();
    let mut cpu = 0.0;
    for i in 0..n {
        let off = (i as usize * size) % (LEN - size);
        let c0 = own_thread_cpu_s();
        file.write_all_at(&buf, off as u64).unwrap();
        file.sync_data().unwrap();
        cpu += own_thread_cpu_s() - c0;
        if let Some(wait) = (t0 + gap * (i as u32 + 1)).checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    cpu / n as f64
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Appends one cloud-bound record and waits until an fsync covers it, as a device session
/// waits before its PUBACK.
async fn append_durable(
    j: &Journal,
    durable: &mut tokio::sync::watch::Receiver<u64>,
    topic: String,
    payload: &Bytes,
) {
    let e = Entry {
        topic,
        payload: payload.clone(),
        retain: false,
        keep: None,
        queue: true,
        ts_ms: 0,
        extra: Default::default(),
    };
    let t = j.append(e).await.unwrap();
    while *durable.borrow_and_update() < t {
        durable.changed().await.unwrap();
    }
}

/// The journal thread over `store`, and the token that stops it.
fn start_journal(
    store: &Arc<Store>,
    metrics: &Arc<StoreMetrics>,
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
            "cargo bench --bench store  (env: BENCH_RECORDS, BENCH_SIZE, BENCH_WRITERS, BENCH_DIR, \
             BENCH_PACED_RATE, BENCH_PACED_RECORDS)"
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
    let metrics = StoreMetrics::new();
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
                    append_durable(&j, &mut durable, format!("dev/{w}/data"), &payload).await;
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
    let commits = metrics.store_commits.get() as f64;
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
    let metrics = StoreMetrics::new();
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

    // 5. Paced: one publisher below saturation, each record waiting for its own ack.
    let rate = env("BENCH_PACED_RATE", 1000).max(1) as f64;
    let paced = env("BENCH_PACED_RECORDS", 3000).max(1);
    let (j, thread, stop) = start_journal(&store, &metrics);
    // A thread names itself once it runs: look for a moment.
    let mut tid = None;
    for _ in 0..100 {
        tid = thread_named("fieldgate-journal");
        if tid.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let commits_before = metrics.store_commits.get() as f64;
    let cpu_before = tid.map_or(f64::NAN, thread_cpu_s);
    rt.block_on(async {
        let mut durable = j.durable();
        let gap = Duration::from_secs_f64(1.0 / rate);
        let mut tick = tokio::time::interval(gap);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for _ in 0..paced {
            tick.tick().await;
            append_durable(&j, &mut durable, "dev/paced/data".into(), &payload).await;
        }
    });
    let journal_cpu = tid.map_or(f64::NAN, thread_cpu_s) - cpu_before;
    let paced_commits = metrics.store_commits.get() as f64 - commits_before;
    stop.cancel();
    thread.join().unwrap();
    drop(j);
    let bare = bare_fsync_cpu(tmp.path(), paced, size + 40, rate);
    println!(
        "paced:   {:>10.1} us journal CPU per record at {rate:.0} records/s, one in flight \
         ({:.2} commits per record); floor: {:.1} us CPU per bare pwrite + fdatasync on this \
         file system at the same rate",
        journal_cpu * 1e6 / paced as f64,
        paced_commits / paced as f64,
        bare * 1e6,
    );
    println!(
        "rss:     peak {:.1} MiB (VmHWM), now {:.1} MiB",
        vm_kib("VmHWM:") as f64 / 1024.0,
        vm_kib("VmRSS:") as f64 / 1024.0
    );
}
