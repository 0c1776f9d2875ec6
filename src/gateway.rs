//! Assembles the gateway from a validated [`Settings`] and runs it until `shutdown` resolves.
//!
//! Start order: store (open, recover, salvage) -> journal thread -> ingest (routing) -> broker
//! router and the gateway's own clients (Modbus buses, serial ports, OTA) -> bridge -> source
//! tasks and the OTA manager -> broker listeners (devices may connect) -> metrics endpoint.
//! Only then is the gateway "ready".
//!
//! Stop order (house rule 6), all under one root cancellation token with a child per stage:
//! 0. sources stop first (Modbus buses and serial ports publish their devices `offline`
//!    while the broker still runs; the OTA manager saves its state);
//! 1. broker listeners close and every device connection with them (no new input). Every
//!    PUBLISH a device was acknowledged for is already durable (ack after durable);
//! 2. the journal writes and commits what is still in its channel and stops;
//! 3. the bridge finishes what is in flight, within `gateway.shutdown_grace`;
//! 4. the cloud's last acknowledgements are persisted (compact + commit); the metrics
//!    endpoint closes.
//!
//! Every task and thread started here is joined here.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rumqttd::Notification;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn, Instrument};

use crate::bridge::metrics::CloudMetrics;
use crate::bridge::{self, Bridge};
use crate::broker::{Broker, BrokerError};
use crate::config::Settings;
use crate::frontend::metrics::BrokerMetrics;
use crate::http::{self, HealthSource};
use crate::ingest::{Ingest, Routing};
use crate::metrics::{Metrics, Registry};
use crate::sources::serial;
use crate::sources::serial::metrics::SerialMetrics;
use crate::store::metrics::StoreMetrics;
use crate::store::{journal, Store, StoreError};
use crate::topic::FilterSet;
use crate::watchdog::{self, Heartbeat};

/// Why the gateway could not start (or failed while running). `main` exits non-zero.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The queue store could not be opened even after moving a damaged one aside.
    #[error("store at {path}: {source}")]
    Store {
        /// Store directory.
        path: String,
        /// Why.
        source: Box<StoreError>,
    },
    /// The embedded broker could not start.
    #[error(transparent)]
    Broker(#[from] Box<BrokerError>),
    /// The cloud TLS material is unusable.
    #[error(transparent)]
    Tls(#[from] Box<bridge::tls::TlsError>),
    /// A source could not be set up (e.g. too few broker connections for its links).
    #[error(transparent)]
    Modbus(#[from] crate::sources::modbus::ModbusError),
    /// A serial device could not be set up.
    #[error(transparent)]
    Serial(#[from] Box<serial::SerialError>),
    /// The OTA manager could not be set up (cache directory, broker link).
    #[error(transparent)]
    Ota(#[from] Box<crate::ota::OtaError>),
    /// The metrics endpoint or a thread could not be started.
    #[error("{what}: {source}")]
    Io {
        /// What failed.
        what: String,
        /// Why.
        source: std::io::Error,
    },
}

impl From<BrokerError> for GatewayError {
    fn from(e: BrokerError) -> Self {
        GatewayError::Broker(Box::new(e))
    }
}

impl From<bridge::tls::TlsError> for GatewayError {
    fn from(e: bridge::tls::TlsError) -> Self {
        GatewayError::Tls(Box::new(e))
    }
}

/// Runs the gateway until `shutdown` resolves, then stops it in order.
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()>,
) -> Result<(), GatewayError> {
    crate::tls::install_default_provider();
    // Every component's metric families, registered once.
    let registry = Registry::new();
    let metrics = Metrics::new();
    let serial_metrics = Arc::new(SerialMetrics::default());
    let broker_metrics = Arc::new(BrokerMetrics::default());
    let store_metrics = StoreMetrics::new();
    let cloud_metrics = CloudMetrics::new();
    registry.add(&*metrics);
    registry.add(&*serial_metrics);
    registry.add(&*broker_metrics);
    registry.add(&*store_metrics);
    registry.add(&*cloud_metrics);
    let root = CancellationToken::new();

    // 1. Store.
    let qdir = settings.gateway.data_dir.join("queue");
    let store = Arc::new(open_store(&qdir, &settings, &store_metrics).await?);

    // 2. Journal: where cloud-bound messages become durable.
    let journal_stop = root.child_token();
    let store_beat = Heartbeat::new("store");
    let mut beats = vec![store_beat.clone()];
    let (journal, journal_thread) = journal::spawn(
        store.clone(),
        store_metrics.clone(),
        journal_stop.clone(),
        store_beat,
    )
    .map_err(|source| GatewayError::Io {
        what: "queue journal thread".into(),
        source,
    })?;
    let ingest = Ingest::new(
        routing(&settings),
        journal,
        store_metrics.clone(),
        broker_metrics.limit_counter("retained"),
    );
    // The kept retained messages, read once: they seed the ingest's retained set (budget,
    // and what the front end sends new subscriptions) and go back into the router below.
    let kept = crate::retained::kept(&store);
    ingest.set_retained(
        settings.broker.max_retained_messages,
        settings.broker.max_retained_bytes,
        &kept,
    );

    // 3. Broker.
    let broker_span = tracing::info_span!("broker");
    // OTA raises the broker's max payload (and segment size) so a chunk fits.
    let broker_cfg = settings.effective_broker();
    let mut broker =
        broker_span.in_scope(|| Broker::new(&broker_cfg, broker_metrics.clone(), ingest))?;
    // Kept retained messages go back into the router before anyone can subscribe.
    crate::retained::restore(&broker, kept).await?;
    let downlink_link = if settings.cloud.enabled {
        Some(broker.link("fieldgate-downlink")?)
    } else {
        None
    };
    // Modbus buses: one link each, made before the listeners start.
    let modbus = crate::sources::modbus::Modbus::build(
        &settings.modbus,
        &settings.gateway.id,
        &broker,
        metrics.clone(),
    )?;
    let serial_links = serial::links(&broker, &settings.serial)?;
    let ota = if settings.ota.enabled {
        Some(crate::ota::Ota::build(&settings, &broker, metrics.clone()).map_err(Box::new)?)
    } else {
        None
    };

    // 5. Bridge.
    let bridge_stop = root.child_token();
    let mut downlink_drain = None;
    let bridge_task = if let Some((dl_tx, mut dl_rx)) = downlink_link {
        // The downlink link only publishes; drain its notifications so the router never
        // parks it.
        let stop = bridge_stop.clone();
        downlink_drain = Some(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    n = dl_rx.next() => match n {
                        Ok(Some(Notification::Unschedule)) => { let _ = dl_rx.wake().await; }
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            }
        }));
        let bridge_beat = Heartbeat::new("cloud");
        beats.push(bridge_beat.clone());
        // OTA raises the cloud's max packet size so a pushed image chunk fits.
        let mut bridged = settings.clone();
        bridged.cloud = settings.effective_cloud();
        let b = Bridge::build(
            &bridged,
            store.clone(),
            cloud_metrics.clone(),
            dl_tx,
            bridge_stop.clone(),
            bridge_beat,
        )?;
        info!(host = %settings.cloud.host, port = settings.cloud.port, "cloud bridge starting");
        Some(tokio::spawn(
            b.run().instrument(tracing::info_span!("cloud")),
        ))
    } else if settings.uplink.forward.is_empty() {
        info!("local only: no cloud configured and uplink.forward = [], nothing is queued");
        None
    } else {
        warn!(
            forward = ?settings.uplink.forward,
            max_bytes = settings.store.max_bytes,
            "no cloud configured (cloud.enabled = false): messages matching uplink.forward are \
             queued on disk for a cloud, up to store.max_bytes; set [cloud], or \
             uplink.forward = [] for a local-only gateway"
        );
        None
    };

    // 5b. Modbus bus tasks, under their own token so they stop before anything else.
    let modbus_stop = root.child_token();
    let modbus_running = (!modbus.is_empty()).then(|| modbus.spawn(modbus_stop.clone()));
    // 5b. Sources: one task per serial port.
    let sources_stop = root.child_token();
    let mut sources = Vec::new();
    sources.extend(
        serial::spawn_all(&settings, serial_links, &serial_metrics, &sources_stop)
            .map_err(Box::new)?,
    );

    // 5c. The OTA manager, stopped with the sources.
    let (ota_task, ota_handle) = match ota {
        Some((o, handle)) => (
            Some(tokio::spawn(
                o.run(sources_stop.clone())
                    .instrument(tracing::info_span!("ota")),
            )),
            Some(handle),
        ),
        None => (None, None),
    };

    // 6. Devices may connect now that the pipeline behind the broker runs.
    broker.listen().instrument(broker_span).await?;

    // 7. Metrics endpoint.
    let http_stop = root.child_token();
    let http_task = if settings.metrics.enabled {
        let listener = tokio::net::TcpListener::bind(settings.metrics.listen)
            .await
            .map_err(|source| GatewayError::Io {
                what: format!("metrics.listen {}", settings.metrics.listen),
                source,
            })?;
        let health = HealthSource {
            registry: registry.clone(),
            cloud: cloud_metrics.clone(),
            metrics: metrics.clone(),
            store: store.clone(),
            cloud_enabled: settings.cloud.enabled,
            gateway_id: settings.gateway.id.clone(),
            ota: ota_handle,
        };
        Some(tokio::spawn(http::serve(
            listener,
            health,
            http_stop.clone(),
        )))
    } else {
        None
    };

    info!(
        gateway_id = %settings.gateway.id,
        data_dir = %settings.gateway.data_dir.display(),
        queued = store.records(),
        "fieldgate ready"
    );
    watchdog::ready(&format!("queued {} records", store.records()));
    let watchdog_stop = root.child_token();
    let watchdog_task = tokio::spawn(watchdog::run(beats, watchdog_stop.clone()));

    shutdown.await;
    info!("shutting down: closing inputs");
    watchdog::stopping();
    watchdog_stop.cancel();
    let _ = watchdog_task.await;

    // Ordered stop. Sources first: what they publish on the way out is still queued.
    modbus_stop.cancel();
    sources_stop.cancel();
    if let Some(m) = modbus_running {
        m.join().await;
    }
    if let Some(t) = ota_task {
        if tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .is_err()
        {
            warn!("the OTA manager did not stop within 5s");
        }
    }
    for t in sources {
        if tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .is_err()
        {
            warn!("a source did not stop within 5s");
        }
    }
    broker.stop_listeners().await;
    // Drop the broker (and the ingest handles of the gateway's own clients with it).
    drop(broker);
    journal_stop.cancel();
    let _ = tokio::task::spawn_blocking(move || journal_thread.join()).await;
    bridge_stop.cancel();
    if let Some(t) = bridge_task {
        let limit = settings.gateway.shutdown_grace + Duration::from_secs(3);
        if tokio::time::timeout(limit, t).await.is_err() {
            warn!("bridge did not stop within the grace period");
        }
    }
    if let Some(t) = downlink_drain {
        let _ = t.await;
    }
    // The journal has stopped and the bridge is gone: persist the cloud's last
    // acknowledgements here (no other writer is left).
    {
        let s = store.clone();
        let done = tokio::task::spawn_blocking(move || {
            s.compact()?;
            s.checkpoint()?;
            s.save_mark();
            Ok::<_, StoreError>(())
        })
        .await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(error = %e, "persisting the last cloud acknowledgements failed; those records are sent again")
            }
            Err(e) => error!(error = %e, "final queue task failed"),
        }
    }
    http_stop.cancel();
    if let Some(t) = http_task {
        let _ = t.await;
    }
    root.cancel();
    info!(queued = store.records(), "fieldgate stopped");
    Ok(())
}

/// Builds the uplink routing from the settings (the OTA chunk topics stay on the LAN: the
/// cloud sent the image once already).
fn routing(settings: &Settings) -> Routing {
    Routing {
        forward: FilterSet::new(settings.uplink.forward.clone()),
        exclude: FilterSet::new(settings.uplink.exclude.iter().cloned().chain(
            if settings.ota.enabled {
                crate::ota::uplink_exclude(&settings.ota.prefix)
            } else {
                Vec::new()
            },
        )),
        cloud_prefix: settings.expand(&settings.uplink.cloud_prefix),
        downlink: FilterSet::new(
            settings
                .downlink
                .subscribe
                .iter()
                .map(|f| settings.expand(f)),
        ),
    }
}

/// Opens the queue off the runtime threads. A full disk is not damage: the gateway waits
/// (ERROR every 30 s) and tries again every second until space is freed or it is stopped.
async fn open_store(
    qdir: &std::path::Path,
    settings: &Settings,
    metrics: &Arc<StoreMetrics>,
) -> Result<Store, GatewayError> {
    let mut last_log: Option<std::time::Instant> = None;
    loop {
        let (qdir2, cfg, m) = (qdir.to_path_buf(), settings.store.clone(), metrics.clone());
        let opened = tokio::task::spawn_blocking(move || Store::open(&qdir2, &cfg, m))
            .await
            .map_err(|e| GatewayError::Io {
                what: "store open task".into(),
                source: std::io::Error::other(e),
            })?;
        match opened {
            Ok(s) => return Ok(s),
            Err(StoreError::NoSpace) => {
                if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
                    error!(
                        store = %qdir.display(),
                        "no space left on the device holding the queue; waiting for space \
                         (free some and the gateway starts by itself)"
                    );
                    last_log = Some(std::time::Instant::now());
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => {
                return Err(GatewayError::Store {
                    path: qdir.display().to_string(),
                    source: Box::new(e),
                })
            }
        }
    }
}
