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
//! - the uplink tap's filter (`#`) gets its own, larger log (`tap_segment_count`), because a
//!   subscriber that falls more than that far behind is silently moved to the head;
//! - `dynamic_filters = false`: a publish nobody subscribes to costs no memory;
//! - every listener address is bound once before rumqttd takes it, so a port clash is a clear
//!   start-up error instead of a log line from a background task;
//! - [`Broker::stop_listeners`] shuts the device runtime down, which closes every device
//!   connection: after it returns no device can publish (and be acknowledged) any more, so
//!   the uplink tap can drain the router completely.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::{ConnectionSettings, LinkType, Router, RouterConfig, SegmentConfig, ServerSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tracing::{error, info};

use crate::config::BrokerConfig;

/// The filter the uplink tap subscribes to.
pub const TAP_FILTER: &str = "#";

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
type StartListeners = dyn FnOnce(&tokio::runtime::Handle) -> (Listeners, bool) + Send;

/// A running embedded broker.
pub struct Broker {
    // rumqttd's router sender type cannot be named outside the crate, so links are made by a
    // closure that owns it.
    make_link: Arc<LinkFactory>,
    start_listeners: Option<Box<StartListeners>>,
    users: Vec<crate::config::UserConfig>,
    listeners: Listeners,
    /// Runs the listeners and all device connections; dropped to disconnect every device.
    devices: Option<tokio::runtime::Runtime>,
}

impl Broker {
    /// Starts the router. In-process links can be made at once; devices can connect after
    /// [`Broker::listen`].
    pub fn new(cfg: &BrokerConfig) -> Result<Broker, BrokerError> {
        for (name, l) in &cfg.listeners {
            std::net::TcpListener::bind(l.listen).map_err(|e| BrokerError::Bind {
                name: name.clone(),
                addr: l.listen,
                source: Box::new(e),
            })?;
        }
        let mut custom = HashMap::new();
        custom.insert(
            TAP_FILTER.to_string(),
            SegmentConfig {
                max_segment_size: cfg.segment_bytes,
                max_segment_count: cfg.tap_segment_count,
            },
        );
        let router_cfg = RouterConfig {
            max_connections: cfg.max_connections,
            max_outgoing_packet_count: 1024,
            max_segment_size: cfg.segment_bytes,
            max_segment_count: cfg.segment_count,
            custom_segment: Some(custom),
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
        let cfg_users = cfg.users.clone();
        let cfg = cfg.clone();
        let start_listeners: Box<StartListeners> = Box::new(move |rt| {
            let auth: Option<HashMap<String, String>> = if cfg.users.is_empty() {
                None
            } else {
                Some(
                    cfg.users
                        .iter()
                        .map(|u| (u.username.clone(), u.password.clone()))
                        .collect(),
                )
            };
            let mut listeners = Vec::new();
            for (name, l) in &cfg.listeners {
                let settings = ServerSettings {
                    name: name.clone(),
                    listen: l.listen,
                    tls: None,
                    next_connection_delay_ms: 0,
                    connections: ConnectionSettings {
                        connection_timeout_ms: cfg.connect_timeout.as_millis().min(65_535) as u16,
                        max_payload_size: cfg.max_payload_size,
                        max_inflight_count: cfg.max_inflight,
                        auth: auth.clone(),
                        external_auth: None,
                        dynamic_filters: false,
                    },
                };
                let mut server =
                    rumqttd::Server::new(settings, router_tx.clone(), rumqttd::protocol::v4::V4);
                let lname = name.clone();
                let task = rt.spawn(async move {
                    if let Err(e) = server.start(LinkType::Remote).await {
                        error!(listener = %lname, error = %e, "broker listener stopped");
                    }
                });
                listeners.push((name.clone(), l.listen, task));
            }
            (listeners, auth.is_some())
        });
        Ok(Broker {
            make_link,
            start_listeners: Some(start_listeners),
            users: cfg_users,
            listeners: Vec::new(),
            devices: None,
        })
    }

    /// Starts every listener; returns once each answers MQTT.
    ///
    /// Make the gateway's own links before this: rumqttd reuses connection ids, and a late
    /// second disconnect event for a departed client can tear down whichever link got its id.
    /// Links made before any client connects hold the first ids for good.
    pub async fn listen(&mut self) -> Result<(), BrokerError> {
        let Some(start) = self.start_listeners.take() else {
            return Ok(());
        };
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("fieldgate-mqtt")
            .enable_all()
            .build()
            .map_err(|e| BrokerError::Runtime(Box::new(e)))?;
        let (listeners, auth) = start(rt.handle());
        self.devices = Some(rt);
        self.listeners = listeners;
        let probe_user = self
            .users
            .first()
            .map(|u| (u.username.as_str(), u.password.as_str()));
        for (name, addr, _) in &self.listeners {
            wait_listening(*addr, probe_user)
                .await
                .then_some(())
                .ok_or_else(|| BrokerError::NotListening {
                    name: name.clone(),
                    addr: *addr,
                })?;
            info!(listener = %name, %addr, auth, "broker listening");
        }
        Ok(())
    }

    /// An in-process link to the broker, as client `id`.
    pub fn link(&self, id: &str) -> Result<(LinkTx, LinkRx), BrokerError> {
        (self.make_link)(id).map_err(|source| BrokerError::Link {
            id: id.to_string(),
            source,
        })
    }

    /// Stops accepting connections and closes every device connection (first step of an
    /// orderly shutdown). When it returns, no device can publish any more.
    pub async fn stop_listeners(&mut self) {
        for (name, _, task) in self.listeners.drain(..) {
            task.abort();
            info!(listener = %name, "broker listener closed");
        }
        if let Some(rt) = self.devices.take() {
            // Dropping the runtime drops every connection task and so closes its socket;
            // that blocks, so it runs off the async workers.
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

/// Waits until the listener answers an MQTT CONNECT with CONNACK (a real readiness check, and
/// one rumqttd does not log as an error). Uses the first configured user when auth is on.
async fn wait_listening(addr: SocketAddr, user: Option<(&str, &str)>) -> bool {
    let target = if addr.ip().is_unspecified() {
        let ip: std::net::IpAddr = if addr.is_ipv4() {
            [127, 0, 0, 1].into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        };
        SocketAddr::new(ip, addr.port())
    } else {
        addr
    };
    let connect = connect_packet("fieldgate-readiness-probe", user);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let probe = async {
            let mut s = tokio::net::TcpStream::connect(target).await?;
            s.write_all(&connect).await?;
            let mut ack = [0u8; 4];
            s.read_exact(&mut ack).await?;
            Ok::<_, std::io::Error>(ack[0] == 0x20 && ack[3] == 0)
        };
        if let Ok(Ok(true)) = tokio::time::timeout(Duration::from_secs(1), probe).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// An MQTT 3.1.1 CONNECT packet (clean session, keepalive 10 s).
fn connect_packet(client_id: &str, user: Option<(&str, &str)>) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    let mut body = Vec::new();
    string(&mut body, "MQTT");
    body.push(4);
    body.push(if user.is_some() { 0xC2 } else { 0x02 });
    body.extend_from_slice(&10u16.to_be_bytes());
    string(&mut body, client_id);
    if let Some((u, p)) = user {
        string(&mut body, u);
        string(&mut body, p);
    }
    let mut pkt = vec![0x10];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        pkt.push(byte);
        if len == 0 {
            break;
        }
    }
    pkt.extend_from_slice(&body);
    pkt
}
