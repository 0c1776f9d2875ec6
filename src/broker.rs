//! The embedded MQTT broker (rumqttd 0.20) that local devices connect to.
//!
//! Owns the rumqttd router (its own OS thread, which rumqttd never stops: it ends with the
//! process) and a tokio runtime of its own for the listeners and every device connection
//! (rumqttd spawns one task per connection and gives no handle to them). Other components get
//! in-process links to it through [`Broker::link`].
//!
//! Invariants and rumqttd traps handled here:
//! - the router limits are always set explicitly: rumqttd's zero defaults refuse every client
//!   and its per-filter in-memory logs grow to `segment_bytes x segment_count`;
//! - nothing on the cloud path subscribes here: what goes up was queued by
//!   [`crate::ingest`] before the router saw it, so the router's in-memory logs (a subscriber
//!   that falls behind them is silently moved to the head) only serve local subscribers;
//! - `dynamic_filters = false`: a publish nobody subscribes to costs no memory;
//! - every listener address is bound once before rumqttd takes it, so a port clash is a clear
//!   start-up error instead of a log line from a background task;
//! - stopping what [`Broker::start`] returned shuts the device runtime down, which closes every
//!   device connection: after it returns no device can publish (and be acknowledged) any more.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::{ConnectionSettings, LinkType, Router, RouterConfig, ServerSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tracing::{error, info};

use crate::component::Running;
use crate::frontend;
use crate::frontend::config::BrokerConfig;
use crate::frontend::metrics::BrokerMetrics;

/// Errors starting the broker. The gateway does not start; the message names the listener.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// A listener address cannot be bound (in use, no permission, no such interface).
    #[error("broker.listeners.{name}: cannot listen on {addr}: {source}; pick a free port or stop what holds it")]
    Bind {
        /// Listener name.
        name: String,
        /// Address.
        addr: SocketAddr,
        /// Why.
        source: Box<std::io::Error>,
    },
    /// A listener did not start accepting within the deadline.
    #[error("broker.listeners.{name}: {addr} did not start listening")]
    NotListening {
        /// Listener name.
        name: String,
        /// Address.
        addr: SocketAddr,
    },
    /// The runtime for device connections could not be built (out of threads or memory).
    #[error("broker: cannot start the device runtime: {0}")]
    Runtime(Box<std::io::Error>),
    /// A device listener's TLS files are unusable: fix the named key's file.
    #[error(transparent)]
    Frontend(#[from] frontend::FrontendError),
    /// The router refused an in-process link (too many connections).
    #[error("broker link {id}: {source}")]
    Link {
        /// Link client id.
        id: String,
        /// Why.
        source: Box<LinkError>,
    },
}

type LinkFactory = dyn Fn(&str) -> Result<(LinkTx, LinkRx), Box<LinkError>> + Send + Sync;
type Listeners = Vec<(String, SocketAddr, JoinHandle<()>)>;
type StartInternal = dyn FnOnce(&tokio::runtime::Handle) -> JoinHandle<()> + Send;

/// Name of the front end's account on rumqttd's internal listener.
const INTERNAL_USER: &str = "fieldgate-frontend";

/// Links of the gateway itself plus readiness probes, on top of the device connections.
const INTERNAL_CONNECTIONS: usize = 64;

/// A running embedded broker.
pub struct Broker {
    // rumqttd's router sender type cannot be named outside the crate, so links are made by a
    // closure that owns it.
    make_link: Arc<LinkFactory>,
    start_internal: Option<Box<StartInternal>>,
    upstream: frontend::Upstream,
    /// Device listeners, bound in [`Broker::build`] and served from [`Broker::start`].
    bound: Vec<(frontend::Prepared, std::net::TcpListener)>,
    listeners: Listeners,
    /// Runs the listeners and all device connections; dropped to disconnect every device.
    devices: Option<tokio::runtime::Runtime>,
    /// Handed to the gateway's own clients ([`Broker::client`]).
    ingest: crate::ingest::Ingest,
    /// Connected devices, for the operator page.
    clients: Arc<frontend::clients::Clients>,
}

impl Broker {
    /// Starts the router and binds every device listener. In-process links can be made at
    /// once; devices can connect after [`Broker::start`].
    pub fn build(
        cfg: &BrokerConfig,
        metrics: Arc<BrokerMetrics>,
        ingest: crate::ingest::Ingest,
    ) -> Result<Broker, BrokerError> {
        // rumqttd's internal listener: loopback, a port the kernel picks now. rumqttd binds it
        // itself a moment later; the probe in `listen` proves it did.
        let internal = std::net::TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.local_addr())
            .map_err(|e| BrokerError::Bind {
                name: "(internal)".into(),
                addr: SocketAddr::from(([127, 0, 0, 1], 0)),
                source: Box::new(e),
            })?;
        let password: String = {
            use rand::Rng;
            let mut rng = rand::rng();
            (0..32)
                .map(|_| char::from(rng.sample(rand::distr::Alphanumeric)))
                .collect()
        };
        let upstream = frontend::Upstream {
            addr: internal,
            username: INTERNAL_USER.into(),
            password: password.clone(),
        };
        let clients = frontend::clients::Clients::new();
        let prepared = frontend::prepare(
            cfg,
            upstream.clone(),
            metrics,
            ingest.clone(),
            clients.clone(),
        )?;
        let mut bound = Vec::new();
        for (p, l) in prepared {
            let sock = std::net::TcpListener::bind(l.listen)
                .and_then(|s| s.set_nonblocking(true).map(|()| s))
                .map_err(|e| BrokerError::Bind {
                    name: p.name.clone(),
                    addr: l.listen,
                    source: Box::new(e),
                })?;
            bound.push((p, sock));
        }
        let router_cfg = RouterConfig {
            max_connections: cfg.max_connections + INTERNAL_CONNECTIONS,
            max_outgoing_packet_count: 1024,
            max_segment_size: cfg.segment_bytes,
            max_segment_count: cfg.segment_count,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        };
        let router_tx = Router::new(0, router_cfg).spawn();
        let make_link: Arc<LinkFactory> = {
            let router_tx = router_tx.clone();
            Arc::new(move |id: &str| {
                let (tx, rx, _ack) = LinkBuilder::new(id, router_tx.clone())
                    .build()
                    .map_err(Box::new)?;
                Ok((tx, rx))
            })
        };
        let (max_payload, max_inflight) = (cfg.max_payload_size, cfg.max_inflight);
        let start_internal: Box<StartInternal> = Box::new(move |rt| {
            let mut auth = HashMap::new();
            auth.insert(INTERNAL_USER.to_string(), password);
            let settings = ServerSettings {
                name: "internal".into(),
                listen: internal,
                tls: None,
                next_connection_delay_ms: 0,
                connections: ConnectionSettings {
                    // The front end sends CONNECT at once; this only bounds a stray dialler.
                    connection_timeout_ms: 5_000,
                    // Headroom for the front end's QoS tag (a user property).
                    max_payload_size: max_payload + 4096,
                    max_inflight_count: max_inflight,
                    auth: Some(auth),
                    external_auth: None,
                    dynamic_filters: false,
                },
            };
            let mut server =
                rumqttd::Server::new(settings, router_tx.clone(), rumqttd::protocol::v5::V5);
            rt.spawn(async move {
                if let Err(e) = server.start(LinkType::Remote).await {
                    error!(error = %e, "internal broker listener stopped");
                }
            })
        });
        Ok(Broker {
            make_link,
            start_internal: Some(start_internal),
            upstream,
            bound,
            listeners: Vec::new(),
            devices: None,
            ingest,
            clients,
        })
    }

    /// The table of connected devices the operator page lists.
    pub fn clients(&self) -> Arc<frontend::clients::Clients> {
        self.clients.clone()
    }

    /// Starts rumqttd's internal listener and every device listener, once rumqttd answers MQTT
    /// on the internal one; devices may connect from then on. The [`Running`] it returns
    /// closes the listeners and every device connection (house rule 6: stage "broker"), then
    /// drops the broker with the ingest handles of the gateway's own clients.
    ///
    /// Unlike other components' `start`, this one can fail: the listeners open last, after
    /// the pipeline behind them runs (see [`crate::component`]).
    ///
    /// Make the gateway's own links before this: rumqttd reuses connection ids, and a late
    /// second disconnect event for a departed client can tear down whichever link got its id.
    /// Links made before any client connects hold the first ids for good.
    pub async fn start(mut self) -> Result<Running, BrokerError> {
        self.listen().await?;
        Ok(Running::step("broker", async move {
            self.stop_listeners().await;
            drop(self);
        }))
    }

    async fn listen(&mut self) -> Result<(), BrokerError> {
        let Some(start) = self.start_internal.take() else {
            return Ok(());
        };
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("fieldgate-mqtt")
            .enable_all()
            .build()
            .map_err(|e| BrokerError::Runtime(Box::new(e)))?;
        let internal = start(rt.handle());
        self.listeners
            .push(("(internal)".into(), self.upstream.addr, internal));
        let up = self.upstream.clone();
        if !wait_listening(up.addr, (&up.username, &up.password)).await {
            return Err(BrokerError::NotListening {
                name: "(internal)".into(),
                addr: up.addr,
            });
        }
        for (p, sock) in self.bound.drain(..) {
            let name = p.name.clone();
            let addr = sock.local_addr().map_err(|e| BrokerError::Bind {
                name: name.clone(),
                addr: up.addr,
                source: Box::new(e),
            })?;
            let listener = {
                let _guard = rt.enter();
                tokio::net::TcpListener::from_std(sock).map_err(|e| BrokerError::Bind {
                    name: name.clone(),
                    addr,
                    source: Box::new(e),
                })?
            };
            let task = p.serve(listener, rt.handle());
            info!(listener = %name, %addr, "broker listening");
            self.listeners.push((name, addr, task));
        }
        self.devices = Some(rt);
        Ok(())
    }

    /// An in-process link to the broker, as client `id`.
    pub fn link(&self, id: &str) -> Result<(LinkTx, LinkRx), BrokerError> {
        (self.make_link)(id).map_err(|source| BrokerError::Link {
            id: id.to_string(),
            source,
        })
    }

    /// An in-process client of the broker whose publishes go through [`crate::ingest`]
    /// first, as a device's do: the sources and the OTA manager use these.
    pub fn client(&self, id: &str) -> Result<crate::local::LocalClient, BrokerError> {
        Ok(crate::local::LocalClient::new(
            id,
            self.link(id)?,
            self.ingest.clone(),
        ))
    }

    /// Stops accepting connections and closes every device connection. When it returns, no
    /// device can publish any more.
    async fn stop_listeners(&mut self) {
        for (name, _, task) in self.listeners.drain(..) {
            task.abort();
            info!(listener = %name, "broker listener closed");
        }
        if let Some(rt) = self.devices.take() {
            // Dropping the runtime drops every front-end session and every rumqttd
            // connection task, closing both sockets; that blocks, so it runs off the async
            // workers.
            let closed = tokio::task::spawn_blocking(move || {
                rt.shutdown_timeout(Duration::from_secs(5));
            })
            .await;
            match closed {
                Ok(()) => info!("device connections closed"),
                Err(e) => error!(error = %e, "closing device connections failed"),
            }
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        // A runtime may not be dropped (blocking) inside async code; let it go in the
        // background instead.
        if let Some(rt) = self.devices.take() {
            rt.shutdown_background();
        }
    }
}

/// Waits until rumqttd's internal listener answers an MQTT 5 CONNECT (internal account) with
/// a successful CONNACK: a real readiness check.
///
/// Each probe closes its socket without DISCONNECT: rumqttd then ends the connection exactly
/// once, when it sees the socket close (a DISCONNECT first would have its router end it too,
/// and the second end could drop a later connection given the freed id; see
/// `frontend::session`). Each attempt has a client id of its own: an attempt abandoned at its
/// timeout may leave rumqttd a will handler for its id, and a later CONNECT with that same id
/// would panic rumqttd's connection task on it and poison the lock every connection takes.
async fn wait_listening(addr: SocketAddr, user: (&str, &str)) -> bool {
    use rumqttc::v5::mqttbytes::v5::{Connect, ConnectReturnCode, Login, Packet};
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut n = 0u32;
    while Instant::now() < deadline {
        n += 1;
        let mut connect = bytes::BytesMut::new();
        let probe = Packet::Connect(
            Connect {
                keep_alive: 10,
                client_id: format!("fieldgate-readiness-probe-{n}"),
                clean_start: true,
                properties: None,
            },
            None,
            Some(Login::new(user.0, user.1)),
        );
        if probe.write(&mut connect, None).is_err() {
            return false;
        }
        let attempt = async {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            s.write_all(&connect).await?;
            let mut buf = bytes::BytesMut::with_capacity(64);
            loop {
                if s.read_buf(&mut buf).await? == 0 {
                    return Ok::<_, std::io::Error>(false);
                }
                match Packet::read(&mut buf, None) {
                    Ok(Packet::ConnAck(a)) => return Ok(a.code == ConnectReturnCode::Success),
                    Ok(_) => return Ok(false),
                    Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => continue,
                    Err(_) => return Ok(false),
                }
            }
        };
        if let Ok(Ok(true)) = tokio::time::timeout(Duration::from_secs(1), attempt).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}
