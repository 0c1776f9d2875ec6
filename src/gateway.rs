//! Assembles the gateway from a validated [`Settings`] and runs it until `shutdown` resolves.
//!
//! Every component has one shape ([`crate::component`]): built from its config section and
//! the [`Ctx`] (all that can fail fails there), started under a stop token, stopped from an
//! explicit stop list. [`run`] reads as: build and start in order, wait, stop.
//!
//! Start order: store (open, recover, salvage) -> journal thread -> ingest (routing) -> broker
//! router and the gateway's own clients (Modbus buses, serial ports, OTA) -> bridge -> source
//! tasks and the OTA manager -> broker listeners (devices may connect) -> HTTP endpoint.
//! Only then is the gateway "ready".
//!
//! Stop list (house rule 6), walked in order under one budget (`gateway.shutdown_grace` +
//! [`STOP_SLACK`]) by [`stop_all`], which names whoever overran:
//! 0. the watchdog (systemd is told `STOPPING=1`);
//! 1. the sources, together: Modbus buses and serial ports publish their devices `offline`
//!    while the broker still runs; the OTA manager saves its state (each at most 5 s);
//! 2. the broker listeners close and every device connection with them (no new input). Every
//!    PUBLISH a device was acknowledged for is already durable (ack after durable);
//! 3. the journal writes and commits what is still in its channel and stops;
//! 4. the bridge finishes what is in flight, within `gateway.shutdown_grace` (+ 3 s for the
//!    session to close), then the downlink drain;
//! 5. the cloud's last acknowledgements are persisted (compact + commit);
//! 6. the HTTP endpoint closes.
//!
//! Every task and thread started here is in the stop list.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rumqttd::Notification;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use crate::bridge::metrics::CloudMetrics;
use crate::bridge::{Bridge, BridgeDeps};
use crate::broker::{Broker, BrokerError};
use crate::component::{stop_all, Ctx, Running};
use crate::config::Settings;
use crate::frontend::metrics::BrokerMetrics;
use crate::http::{HealthSource, Http, HttpError, PageInfo, PageSource};
use crate::ingest::{Ingest, Routing};
use crate::metrics::Registry;
use crate::ota::Ota;
use crate::sources::modbus::Modbus;
use crate::sources::serial::{Serial, SerialError};
use crate::store::metrics::StoreMetrics;
use crate::store::{journal, Store, StoreError};
use crate::watchdog::{self, Heartbeat};

/// What the stop list may take beyond `gateway.shutdown_grace` (the sources' 5 s, the
/// bridge's 3 s to close its session, the journal and the final commit).
pub const STOP_SLACK: Duration = Duration::from_secs(20);
/// The longest a source (Modbus, serial, OTA) is waited for at shutdown.
const SOURCE_STOP: Duration = Duration::from_secs(5);

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
    Tls(#[from] Box<crate::tls::TlsError>),
    /// A source could not be set up (e.g. too few broker connections for its links).
    #[error(transparent)]
    Modbus(#[from] crate::sources::modbus::ModbusError),
    /// A serial device could not be set up.
    #[error(transparent)]
    Serial(#[from] Box<SerialError>),
    /// The OTA manager could not be set up (cache directory, broker link).
    #[error(transparent)]
    Ota(#[from] Box<crate::ota::OtaError>),
    /// The HTTP endpoint or a thread could not be started.
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

impl From<crate::tls::TlsError> for GatewayError {
    fn from(e: crate::tls::TlsError) -> Self {
        GatewayError::Tls(Box::new(e))
    }
}

impl From<SerialError> for GatewayError {
    fn from(e: SerialError) -> Self {
        GatewayError::Serial(Box::new(e))
    }
}

/// The metric families the gateway hands to more than one part.
struct Families {
    broker: Arc<BrokerMetrics>,
    store: Arc<StoreMetrics>,
    cloud: Arc<CloudMetrics>,
}

/// The queue, open and journalling: the store, the ingest in front of it, the retained
/// messages it kept (for the router), and the journal thread.
struct Queue {
    store: Arc<Store>,
    ingest: Ingest,
    kept: Vec<(String, u8, bytes::Bytes)>,
    journal: Running,
}

/// Runs the gateway until `shutdown` resolves, then walks the stop list.
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()>,
) -> Result<(), GatewayError> {
    crate::tls::install_default_provider();
    for notice in &settings.notices {
        warn!("{notice}");
    }
    let ctx = Ctx {
        gateway_id: settings.gateway.id.clone(),
        registry: Registry::new(),
        board: crate::board::Board::new(),
    };
    let m = Families {
        broker: Arc::new(BrokerMetrics::default()),
        store: StoreMetrics::new(),
        cloud: CloudMetrics::new(),
    };
    ctx.registry.add(&*m.broker);
    ctx.registry.add(&*m.store);
    ctx.registry.add(&*m.cloud);
    let mut beats = Vec::new();

    // Build and start, in order (see the module header).
    let queue = open_queue(&settings, &ctx, &m, &mut beats).await?;
    let store = queue.store.clone();
    let broker = open_broker(&settings, &m, queue.ingest, queue.kept).await?;
    let downlink = if settings.cloud.enabled {
        Some(broker.link("fieldgate-downlink")?)
    } else {
        None
    };
    let modbus = Modbus::build(&settings.modbus, &ctx, &broker)?;
    let serial = Serial::build(&settings.serial, &ctx, &broker)?;
    let ota = if settings.ota.enabled {
        let built = Ota::build(&settings.ota, &settings.ota_paths(), &ctx, &broker);
        Some(built.map_err(Box::new)?)
    } else {
        None
    };
    let cloud = start_cloud(&settings, &ctx, &store, &m, downlink, &mut beats)?;
    let mut sources = vec![
        modbus.start(CancellationToken::new()).at_most(SOURCE_STOP),
        serial.start(CancellationToken::new()).at_most(SOURCE_STOP),
    ];
    let ota_handle = ota.map(|(o, handle)| {
        sources.push(o.start(CancellationToken::new()).at_most(SOURCE_STOP));
        handle
    });
    let clients = broker.clients();
    // Devices may connect now that the pipeline behind the broker runs.
    let broker = broker
        .start()
        .instrument(tracing::info_span!("broker"))
        .await?;
    let health = HealthSource {
        registry: ctx.registry.clone(),
        cloud: m.cloud.clone(),
        store: store.clone(),
        cloud_enabled: settings.cloud.enabled,
        gateway_id: settings.gateway.id.clone(),
        ota: ota_handle,
        page: settings.http.serves_page().then(|| PageSource {
            info: Arc::new(page_info(&settings)),
            history: crate::http::history::History::new(),
            board: ctx.board.clone(),
            clients,
        }),
    };
    let http = start_http(&settings, health).await?;
    let watchdog = ready(&settings, &store, beats);

    shutdown.await;
    info!("shutting down: closing inputs");
    watchdog::stopping();
    let stages = vec![
        vec![watchdog],
        sources,
        vec![broker],
        vec![queue.journal],
        cloud,
        vec![Running::step("store", store.clone().persist_final())],
        http.into_iter().collect(),
    ];
    stop_all(stages, settings.gateway.shutdown_grace + STOP_SLACK).await;
    info!(queued = store.records(), "fieldgate stopped");
    Ok(())
}

/// Opens the store (waiting out a full disk), starts the journal thread, and puts the ingest
/// in front of it with the routing of `[uplink]` and the kept retained messages.
async fn open_queue(
    settings: &Settings,
    ctx: &Ctx,
    m: &Families,
    beats: &mut Vec<Heartbeat>,
) -> Result<Queue, GatewayError> {
    let qdir = settings.gateway.data_dir.join("queue");
    let store = Store::open_waiting(&qdir, &settings.store, m.store.clone())
        .await
        .map_err(|e| GatewayError::Store {
            path: qdir.display().to_string(),
            source: Box::new(e),
        })?;
    let store = Arc::new(store);
    let stop = CancellationToken::new();
    let beat = Heartbeat::new("store");
    beats.push(beat.clone());
    let (journal, thread) = journal::spawn(store.clone(), m.store.clone(), stop.clone(), beat)
        .map_err(|source| GatewayError::Io {
            what: "queue journal thread".into(),
            source,
        })?;
    let ota_exclude = if settings.ota.enabled {
        crate::ota::uplink_exclude(&settings.ota.prefix)
    } else {
        Vec::new()
    };
    let routing = Routing::new(
        &settings.uplink,
        &settings.downlink.subscribe,
        ota_exclude,
        &|t| ctx.expand(t),
    );
    let ingest = Ingest::new(
        routing,
        journal,
        m.store.clone(),
        m.broker.limit_counter("retained"),
    );
    // The kept retained messages, read once: they seed the ingest's retained set (budget,
    // and what the front end sends new subscriptions) and go back into the router.
    let kept = crate::retained::kept(&store);
    ingest.set_retained(
        settings.broker.max_retained_messages,
        settings.broker.max_retained_bytes,
        &kept,
    );
    Ok(Queue {
        store,
        ingest,
        kept,
        journal: Running::thread("journal", stop, thread),
    })
}

/// Starts the broker's router (OTA raises its segment size so a chunk fits) and puts the
/// kept retained messages back before anyone can subscribe. Listeners are not open yet.
async fn open_broker(
    settings: &Settings,
    m: &Families,
    ingest: Ingest,
    kept: Vec<(String, u8, bytes::Bytes)>,
) -> Result<Broker, GatewayError> {
    let cfg = settings.effective_broker();
    let broker =
        tracing::info_span!("broker").in_scope(|| Broker::build(&cfg, m.broker.clone(), ingest))?;
    crate::retained::restore(&broker, kept).await?;
    Ok(broker)
}

/// Builds and starts the bridge and its downlink drain when a cloud is configured; says
/// what a gateway without one does with what it queues.
fn start_cloud(
    settings: &Settings,
    ctx: &Ctx,
    store: &Arc<Store>,
    m: &Families,
    downlink: Option<(rumqttd::local::LinkTx, rumqttd::local::LinkRx)>,
    beats: &mut Vec<Heartbeat>,
) -> Result<Vec<Running>, GatewayError> {
    let Some((dl_tx, dl_rx)) = downlink else {
        if settings.uplink.forward.is_empty() {
            info!("local only: no cloud configured and uplink.forward = [], nothing is queued");
        } else {
            warn!(
                forward = ?settings.uplink.forward,
                max_bytes = settings.store.max_bytes,
                "no cloud configured (cloud.enabled = false): messages matching uplink.forward \
                 are queued on disk for a cloud, up to store.max_bytes; set [cloud], or \
                 uplink.forward = [] for a local-only gateway"
            );
        }
        return Ok(Vec::new());
    };
    let heartbeat = Heartbeat::new("cloud");
    beats.push(heartbeat.clone());
    let deps = BridgeDeps {
        store: store.clone(),
        metrics: m.cloud.clone(),
        downlink: dl_tx,
        heartbeat,
        cloud_prefix: ctx.expand(&settings.uplink.cloud_prefix),
        shutdown_grace: settings.gateway.shutdown_grace,
        sparkplug: settings.sparkplug.enabled.then(|| {
            crate::bridge::sparkplug::Uplink::new(
                &settings.sparkplug,
                &settings.gateway.id,
                settings.sparkplug_devices(),
                &settings.gateway.data_dir,
                m.cloud.clone(),
            )
        }),
    };
    // OTA raises the cloud's max packet size so a pushed image chunk fits.
    let bridge = Bridge::build(&settings.effective_cloud(), &settings.downlink, ctx, deps)?;
    info!(host = %settings.cloud.host, port = settings.cloud.port, "cloud bridge starting");
    Ok(vec![
        bridge
            .start(CancellationToken::new())
            .at_most(settings.gateway.shutdown_grace + Duration::from_secs(3)),
        drain_downlink(dl_rx),
    ])
}

/// Binds and starts the HTTP endpoint when `[http]` enables it.
async fn start_http(
    settings: &Settings,
    health: HealthSource,
) -> Result<Option<Running>, GatewayError> {
    if !settings.http.enabled {
        return Ok(None);
    }
    let http = Http::build(&settings.http, health)
        .await
        .map_err(|e| match e {
            HttpError::Bind { addr, source } => GatewayError::Io {
                what: format!("http.listen {addr}"),
                source,
            },
            HttpError::Tls(e) => GatewayError::from(e),
        })?;
    Ok(Some(http.start(CancellationToken::new())))
}

/// What the operator page shows of the configuration, computed once: the cloud's address,
/// the queue's bounds, the effective configuration with its secrets redacted, and what
/// `check-config` reports for it.
fn page_info(settings: &Settings) -> PageInfo {
    PageInfo {
        cloud_address: settings
            .cloud
            .enabled
            .then(|| format!("{}:{}", settings.cloud.host, settings.cloud.port)),
        max_bytes: settings.store.max_bytes,
        max_age: settings.store.max_age,
        config_toml: settings.redacted().to_toml(),
        problems: settings.validate(),
    }
}

/// Says "ready" (log, systemd `READY=1`) and starts the watchdog over `beats`.
fn ready(settings: &Settings, store: &Store, beats: Vec<Heartbeat>) -> Running {
    info!(
        gateway_id = %settings.gateway.id,
        data_dir = %settings.gateway.data_dir.display(),
        queued = store.records(),
        "fieldgate ready"
    );
    watchdog::ready(&format!("queued {} records", store.records()));
    let stop = CancellationToken::new();
    let task = tokio::spawn(watchdog::run(beats, stop.clone()));
    Running::tasks("watchdog", stop, vec![task])
}

/// The downlink link only publishes; its notifications are drained so the router never
/// parks it. Stopped after the bridge.
fn drain_downlink(mut rx: rumqttd::local::LinkRx) -> Running {
    let stop = CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = s.cancelled() => return,
                n = rx.next() => match n {
                    Ok(Some(Notification::Unschedule)) => { let _ = rx.wake().await; }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        }
    });
    Running::tasks("downlink", stop, vec![task])
}
