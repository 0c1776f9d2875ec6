//! The OTA task: everything the [`Manager`] decides, carried out.
//!
//! Owns the I/O: the two broker links (requests, commands and small replies; chunks, through
//! the [`serve`] task), the fetch and install tasks, the state file, the catalog the HTTP
//! server reads, the status queries and served tallies from the HTTP side, and the timer the
//! manager asks for. It turns each event into one [`Input`], hands it to the manager with
//! the clock reading, and carries out the [`Out`]puts in order before it takes the next
//! event. An output whose result a decision needs (a pushed chunk written, the TLS roots of
//! a download loaded) is fed back at once, and what that yields is carried out before the
//! rest, so the order is the one the manager would have had doing the I/O itself.
//!
//! Channels: the chunk queue ([`serve::JOB_QUEUE`]; the manager is told its free room with
//! every message and never queues beyond it), fetch reports (64; a task waits, except its
//! progress, which is dropped when full: the next follows an interval later), served tallies
//! ([`serve::SERVED_QUEUE`], see [`serve`]) and status queries (64; the HTTP side gets no
//! answer when full).
//!
//! Stop: the serve task is cancelled, fetch tasks aborted and awaited, and the state saved.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::cache::{Cache, CacheError, Expect};
use super::fetch;
use super::manager::{FetchEvent, Input, Installed, Manager, Now, Out, Reverified};
use super::serve::{self, Catalog, ChunkJob, Pacer, Served, ServedTally, Slots};
use super::{contract, OtaError, OtaHandle, Query};
use crate::broker::Broker;
use crate::component::{Ctx, Running};
use crate::local::{LocalClient, LocalTx};
use crate::ota::config::{OtaConfig, OtaPaths};
use crate::ota::metrics::OtaMetrics;
use crate::pacing::Backoff;

const STATE_FILE: &str = "state.json";

type QueryRx = mpsc::Receiver<(Query, oneshot::Sender<Option<serde_json::Value>>)>;

/// The OTA manager, built before the broker listens.
pub struct Ota {
    cfg: OtaConfig,
    base_url: String,
    cache: Cache,
    ca_file: std::path::PathBuf,
    link: LocalClient,
    serve_link: LocalClient,
    metrics: Arc<OtaMetrics>,
    catalog_tx: watch::Sender<Arc<Catalog>>,
    queries_rx: QueryRx,
    slots: Slots,
    pacer: Pacer,
    served_tx: mpsc::Sender<Served>,
    served_rx: mpsc::Receiver<Served>,
}

impl Ota {
    /// Makes the links and subscriptions (before the listeners start), adds OTA's metric
    /// families to the context's registry, and returns the handle for the HTTP server.
    pub fn build(
        cfg: &OtaConfig,
        paths: &OtaPaths,
        ctx: &Ctx,
        broker: &Broker,
    ) -> Result<(Ota, OtaHandle), OtaError> {
        let cfg = cfg.clone();
        let metrics = OtaMetrics::new();
        ctx.registry.add(&*metrics);
        let cache = Cache::open(&paths.cache_dir)?;
        let mut link = broker.client("fieldgate-ota").map_err(Box::new)?;
        let serve_link = broker.client("fieldgate-ota-serve").map_err(Box::new)?;
        for filter in contract::subscriptions(&cfg.prefix) {
            link.subscribe(&filter).map_err(|e| OtaError::Subscribe {
                filter: filter.clone(),
                why: e.to_string(),
            })?;
        }
        let (catalog_tx, catalog) = watch::channel(Arc::new(Catalog::default()));
        let (queries, queries_rx) = mpsc::channel(64);
        let slots = Slots::new(cfg.max_concurrent_downloads, cfg.max_downloads_per_ip);
        let pacer = Pacer::new(cfg.max_bytes_per_sec);
        let (served_tx, served_rx) = mpsc::channel(serve::SERVED_QUEUE);
        let handle = OtaHandle {
            catalog,
            queries,
            slots: slots.clone(),
            pacer: pacer.clone(),
            stall_timeout: cfg.stall_timeout,
            served: served_tx.clone(),
            metrics: metrics.clone(),
        };
        Ok((
            Ota {
                base_url: paths.http_base_url.clone(),
                ca_file: paths.fetch_ca_file.clone(),
                cfg,
                cache,
                link,
                serve_link,
                metrics,
                catalog_tx,
                queries_rx,
                slots,
                pacer,
                served_tx,
                served_rx,
            },
            handle,
        ))
    }

    /// Starts the manager task under `stop`, in a span `ota`.
    pub fn start(self, stop: CancellationToken) -> Running {
        let task = tokio::spawn(
            self.run(stop.clone())
                .instrument(tracing::info_span!("ota")),
        );
        Running::tasks("ota", stop, vec![task])
    }

    /// Runs until `stop` is cancelled or the broker goes away; saves the state on the way out.
    async fn run(self, stop: CancellationToken) {
        let Ota {
            cfg,
            base_url,
            cache,
            ca_file,
            link,
            serve_link,
            metrics,
            catalog_tx,
            mut queries_rx,
            slots,
            pacer,
            served_tx,
            mut served_rx,
        } = self;
        let (tx, mut rx) = link.split();
        // The serving link only publishes (QoS 0, nothing comes back); its receiving half is
        // kept alive until the end so the router keeps the link.
        let (serve_tx, _serve_rx) = serve_link.split();
        let (jobs_tx, jobs_rx) = mpsc::channel(serve::JOB_QUEUE);
        let serve_stop = stop.child_token();
        let server = tokio::spawn(serve::run_mqtt(
            serve_tx,
            jobs_rx,
            pacer,
            slots.clone(),
            metrics.clone(),
            ServedTally::new(served_tx),
            serve_stop.clone(),
        ));
        let (fetch_tx, mut fetch_rx) = mpsc::channel(64);
        let progress_every = cfg.progress_interval;
        let (fetch_timeout, fetch_attempts) = (cfg.fetch_timeout, cfg.fetch_attempts);
        let mut m = Manager::new(cfg, base_url, metrics.clone(), slots);
        let mut d = Driver {
            cache,
            ca_file,
            tx,
            metrics,
            catalog_tx,
            jobs: jobs_tx,
            fetch_tx,
            fetches: JoinSet::new(),
            fetch_timeout,
            fetch_attempts,
            progress_every,
        };
        let outs = d.start(&mut m).await;
        d.execute(&mut m, outs).await;
        loop {
            let deadline = m
                .next_deadline()
                .map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            let input = tokio::select! {
                _ = stop.cancelled() => break,
                msg = rx.next() => match msg {
                    Ok(msg) => Input::Message {
                        topic: msg.topic,
                        payload: msg.payload,
                        chunk_room: d.jobs.capacity(),
                    },
                    Err(_) => { debug!("broker gone; OTA manager stops"); break; }
                },
                Some(f) = fetch_rx.recv() => Input::Fetch(f),
                Some(s) = served_rx.recv() => Input::Served(s),
                Some(_) = d.fetches.join_next(), if !d.fetches.is_empty() => continue,
                Some((q, reply)) = queries_rx.recv() => {
                    let _ = reply.send(m.answer(&q));
                    continue;
                }
                _ = tokio::time::sleep_until(deadline) => Input::Tick,
            };
            let outs = m.handle(Now::system(), input);
            d.execute(&mut m, outs).await;
        }
        serve_stop.cancel();
        d.fetches.abort_all();
        while d.fetches.join_next().await.is_some() {}
        let _ = server.await;
        let outs = m.handle(Now::system(), Input::Stop);
        d.execute(&mut m, outs).await;
        info!("OTA manager stopped");
    }
}

/// The I/O half of the OTA task (see the module header).
struct Driver {
    cache: Cache,
    ca_file: std::path::PathBuf,
    tx: LocalTx,
    metrics: Arc<OtaMetrics>,
    catalog_tx: watch::Sender<Arc<Catalog>>,
    jobs: mpsc::Sender<ChunkJob>,
    fetch_tx: mpsc::Sender<FetchEvent>,
    fetches: JoinSet<()>,
    fetch_timeout: Duration,
    fetch_attempts: u32,
    progress_every: Duration,
}

impl Driver {
    /// Reads the state file and re-hashes every cached image before the manager serves it.
    async fn start(&mut self, m: &mut Manager) -> Vec<Out> {
        let cache = self.cache.clone();
        let saved = match tokio::task::spawn_blocking(move || cache.read(STATE_FILE)).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                warn!(error = %e, "cannot read the OTA state");
                None
            }
            Err(_) => None,
        };
        let mut checks = Vec::new();
        for r in m.restore(saved.as_deref()) {
            let cache = self.cache.clone();
            let (sha, size) = (r.sha256.clone(), r.size);
            let result = match tokio::task::spawn_blocking(move || {
                cache.reverify(&sha, size).map(|()| cache.open_bin(&sha))
            })
            .await
            {
                Ok(Ok(opened)) => Ok(opened),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("verification task failed".into()),
            };
            checks.push(Reverified {
                key: r.key,
                sha256: r.sha256,
                result,
            });
        }
        m.start(Now::system(), checks)
    }

    /// Carries out `outs` in order; what an output feeds back is carried out before the rest.
    async fn execute(&mut self, m: &mut Manager, outs: Vec<Out>) {
        let mut queue: VecDeque<Out> = outs.into();
        while let Some(o) = queue.pop_front() {
            let Some(back) = self.one(o).await else {
                continue;
            };
            let more = m.handle(Now::system(), back);
            for o in more.into_iter().rev() {
                queue.push_front(o);
            }
        }
    }

    /// Verifies and installs a pushed image off the runtime; reports like a download.
    fn spawn_install(&mut self, key: String, expect: Expect) {
        let (cache, tx, metrics) = (
            self.cache.clone(),
            self.fetch_tx.clone(),
            self.metrics.clone(),
        );
        self.fetches.spawn(async move {
            let k2 = key.clone();
            let r = tokio::task::spawn_blocking(move || install(&cache, &k2, &expect)).await;
            let result = match r {
                Ok(Ok(d)) => {
                    metrics.fetch("ok");
                    Ok(d)
                }
                Ok(Err(e)) => {
                    metrics.fetch("hash_mismatch");
                    Err(format!("pushed image: {e}; the cloud must push it again"))
                }
                Err(e) => Err(e.to_string()),
            };
            let _ = tx.send(FetchEvent::Done { key, result }).await;
        });
    }

    /// Carries out one output; `Some` is the input it yields.
    async fn one(&mut self, o: Out) -> Option<Input> {
        match o {
            Out::Publish { topic, payload } => {
                if let Err(e) = self.tx.publish(&topic, payload, false).await {
                    debug!(%topic, error = %e, "OTA publish failed (broker stopping)");
                }
                None
            }
            Out::Chunk(job) => {
                // The manager queues no more than the room it was told of, and only this
                // task sends: this cannot fail but when the serving task is gone.
                if self.jobs.try_send(job).is_err() {
                    debug!("chunk queue closed or full; chunk dropped");
                }
                None
            }
            Out::Catalog(c) => {
                self.catalog_tx.send_replace(c);
                None
            }
            Out::StartFetch { key, url, expect } => {
                let tls = match fetch::tls_config(&self.ca_file) {
                    Ok(t) => t,
                    Err(e) => {
                        return Some(Input::Fetch(FetchEvent::Done {
                            key,
                            result: Err(e.to_string()),
                        }))
                    }
                };
                let job = FetchJob {
                    key,
                    url,
                    tls,
                    expect,
                    cache: self.cache.clone(),
                    timeout: self.fetch_timeout,
                    attempts: self.fetch_attempts,
                    progress_every: self.progress_every,
                    metrics: self.metrics.clone(),
                    tx: self.fetch_tx.clone(),
                };
                self.fetches.spawn(job.run());
                None
            }
            Out::InstallPushed { key, expect } => {
                self.spawn_install(key, expect);
                None
            }
            Out::WritePart {
                key,
                index,
                offset,
                data,
            } => {
                let (cache, k, len) = (self.cache.clone(), key.clone(), data.len() as u64);
                match tokio::task::spawn_blocking(move || cache.write_part_at(&k, offset, &data))
                    .await
                {
                    Ok(r) => Some(Input::PartWritten {
                        key,
                        index,
                        len,
                        result: r.map_err(|e| e.to_string()),
                    }),
                    Err(_) => None,
                }
            }
            Out::Evict { sha256 } => {
                self.cache.remove(&sha256);
                None
            }
            Out::Persist { bytes, generation } => {
                let cache = self.cache.clone();
                match tokio::task::spawn_blocking(move || cache.write_atomic(STATE_FILE, &bytes))
                    .await
                {
                    Ok(Ok(())) => Some(Input::Persisted { generation }),
                    Ok(Err(e)) => {
                        warn!(error = %e, "cannot save the OTA state");
                        None
                    }
                    Err(_) => None,
                }
            }
        }
    }
}

/// Verifies and installs the partial file of `key`, then opens the result for serving.
fn install(cache: &Cache, key: &str, expect: &Expect) -> Result<Installed, CacheError> {
    let digests = cache.install(key, expect)?;
    let opened = cache.open_bin(&digests.sha256);
    Ok(Installed { digests, opened })
}

/// One image download with its retries; runs as a task of the driver's `JoinSet`.
struct FetchJob {
    key: String,
    url: fetch::Url,
    tls: Arc<rustls::ClientConfig>,
    expect: Expect,
    cache: Cache,
    timeout: Duration,
    attempts: u32,
    progress_every: Duration,
    metrics: Arc<OtaMetrics>,
    tx: mpsc::Sender<FetchEvent>,
}

impl FetchJob {
    /// Runs one attempt's download `dl`, reporting progress every `progress_every` while it
    /// runs; `moved` counts the bytes it received.
    async fn with_progress<T>(
        &self,
        attempt: u32,
        moved: &std::sync::atomic::AtomicU64,
        dl: impl std::future::Future<Output = T>,
    ) -> T {
        use std::sync::atomic::Ordering::Relaxed;
        tokio::pin!(dl);
        let every = self.progress_every;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut at, mut before) = (Instant::now(), 0u64);
        let part = self.cache.part(&self.key);
        loop {
            tokio::select! {
                r = &mut dl => return r,
                _ = tick.tick() => {
                    let now = Instant::now();
                    let m = moved.load(Relaxed);
                    let secs = now.duration_since(at).as_secs_f64().max(1e-3);
                    let bytes_per_sec = ((m - before) as f64 / secs) as u64;
                    (at, before) = (now, m);
                    // What is in the partial file: resumed bytes included.
                    let received = tokio::fs::metadata(&part).await.map(|x| x.len()).unwrap_or(0);
                    let _ = self.tx.try_send(FetchEvent::Progress {
                        key: self.key.clone(),
                        attempt,
                        received,
                        bytes_per_sec,
                    });
                }
            }
        }
    }

    async fn run(self) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        let mut last = String::new();
        for attempt in 1..=self.attempts {
            let part = self.cache.part(&self.key);
            let have = self.cache.part_len(&self.key);
            let downloaded = if have == self.expect.size {
                Ok(())
            } else {
                let m = self.metrics.clone();
                let moved = std::sync::atomic::AtomicU64::new(0);
                let dl = fetch::download(
                    &self.url,
                    self.tls.clone(),
                    &part,
                    self.expect.size,
                    self.timeout,
                    |n| {
                        m.fetch_bytes.inc_by(n);
                        moved.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    },
                );
                self.with_progress(attempt, &moved, dl).await.map(|_| ())
            };
            let (result, why) = match downloaded {
                Ok(()) => {
                    let (cache, key, expect) =
                        (self.cache.clone(), self.key.clone(), self.expect.clone());
                    match tokio::task::spawn_blocking(move || install(&cache, &key, &expect)).await
                    {
                        Ok(Ok(d)) => {
                            self.metrics.fetch("ok");
                            let _ = self
                                .tx
                                .send(FetchEvent::Done {
                                    key: self.key.clone(),
                                    result: Ok(d),
                                })
                                .await;
                            return;
                        }
                        Ok(Err(e @ CacheError::Mismatch(_))) => ("hash_mismatch", e.to_string()),
                        Ok(Err(e)) => ("error", e.to_string()),
                        Err(e) => ("error", e.to_string()),
                    }
                }
                Err(e) => ("error", e.to_string()),
            };
            warn!(image = %self.key, attempt, result, error = %why, "image download attempt failed");
            self.metrics.fetch(result);
            let _ = self
                .tx
                .send(FetchEvent::Attempt {
                    key: self.key.clone(),
                    result,
                    error: format!("attempt {attempt}: {why}"),
                })
                .await;
            last = why;
            if attempt < self.attempts {
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
        let _ = self
            .tx
            .send(FetchEvent::Done {
                key: self.key.clone(),
                result: Err(format!("{} attempts failed; last: {}", self.attempts, last)),
            })
            .await;
    }
}
