//! The MQTT front end: every device connection ends here, never at rumqttd.
//!
//! Owns the device listeners (plain TCP or TLS), the connection limits, and one session task
//! per device (see [`session`]). Each admitted device gets its own loopback TCP connection to
//! rumqttd's internal listener, which binds 127.0.0.1 on a port chosen at start and accepts
//! only the front end's internal account (a random password made at every start), so no
//! other local process can bypass authentication or the ACL by dialling it.
//!
//! Invariants:
//! - the accept loop never waits on a client: the TLS handshake (bounded by
//!   `tls_handshake_timeout`), CONNECT (bounded by `connect_timeout`) and password checks all
//!   run in the connection's own task, so one idle or slow client cannot stall others;
//! - connection limits (total, per source IP) are taken before the handshake and released
//!   when the task ends, by a guard, whatever the way out;
//! - every task runs on the broker's device runtime: shutting that runtime down closes every
//!   device connection and its upstream connection.

pub mod auth;
pub mod clients;
pub mod config;
pub mod framed;
pub mod metrics;
pub mod relay;
pub mod retained_out;
pub mod session;
pub mod sessions;
pub mod upacks;
pub mod upstream;
pub mod v311;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::tokio_rustls::TlsAcceptor;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use self::config::{BrokerConfig, ListenerConfig, RateLimitPolicy};
use crate::ingest::Ingest;
use crate::tls::{self, ClientCertMode};
use auth::{Acl, Users};
use metrics::BrokerMetrics;

/// Where and how the front end reaches rumqttd.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// rumqttd's internal listener (loopback).
    pub addr: SocketAddr,
    /// Internal account name.
    pub username: String,
    /// Internal account password (random per start).
    pub password: String,
}

/// Everything a session needs, shared read-only by the sessions of one listener.
pub struct Context {
    /// Listener name (logs).
    pub listener: String,
    /// Clients without credentials are let in.
    pub allow_anonymous: bool,
    /// Client certificate policy (None on plain listeners).
    pub cert_mode: ClientCertMode,
    /// Accounts.
    pub users: Arc<Users>,
    /// Topic rules.
    pub acl: Arc<Acl>,
    /// rumqttd.
    pub upstream: Arc<Upstream>,
    /// Metrics.
    pub metrics: Arc<BrokerMetrics>,
    /// Largest packet (remaining length) from a device.
    pub max_packet: usize,
    /// CONNECT deadline.
    pub connect_timeout: Duration,
    /// Concurrent password verifications.
    pub verify_slots: Arc<Semaphore>,
    /// Client ids with a live upstream connection (all listeners), and whose sessions they are.
    pub sessions: Arc<sessions::Sessions>,
    /// `broker.client_id_pattern`; None: any client id.
    pub client_id_pattern: Option<String>,
    /// Failed logins per source address (all listeners).
    pub logins: Arc<crate::password::LoginGuard>,
    /// `broker.max_subscriptions_per_client`.
    pub max_subscriptions: usize,
    /// `broker.max_inflight`: also the window of the retained messages the front end sends,
    /// and the receive maximum announced to MQTT 5 devices.
    pub max_inflight: usize,
    /// Per-connection publish rate (messages/s, burst) and what happens above it.
    pub rate: Option<(u32, u32, RateLimitPolicy)>,
    /// Where cloud-bound publishes enter the queue.
    pub ingest: Ingest,
    /// Connected clients, for the operator page (all listeners).
    pub clients: Arc<clients::Clients>,
}

/// Connection counts, total and per source IP. A plain mutex: the critical sections are a
/// few integer updates, taken once per connection, never across an await.
#[derive(Debug)]
struct Limits {
    max_total: usize,
    max_per_ip: usize,
    counts: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// Releases one connection's slot on drop.
struct Slot {
    limits: Arc<Limits>,
    ip: IpAddr,
}

impl Limits {
    fn take(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, &'static str> {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if c.0 >= self.max_total {
            return Err("max_connections");
        }
        let n = c.1.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            return Err("max_connections_per_ip");
        }
        *n += 1;
        c.0 += 1;
        Ok(Slot {
            limits: self.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.limits.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.0 = c.0.saturating_sub(1);
        if let Some(n) = c.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.1.remove(&self.ip);
            }
        }
    }
}

/// Errors building the front end. The gateway does not start; the message names the key.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// A listener's TLS files are unusable: fix them and start again.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// A listener ready to be served: bound socket plus its settings.
pub struct Prepared {
    /// Listener name.
    pub name: String,
    /// Settings for its sessions.
    ctx: Arc<Context>,
    acceptor: Option<TlsAcceptor>,
    handshake_timeout: Duration,
    limits: Arc<Limits>,
}

/// Builds the per-listener contexts (TLS material is loaded here, so a bad file fails the
/// start before anything listens).
pub fn prepare(
    cfg: &BrokerConfig,
    upstream: Upstream,
    metrics: Arc<BrokerMetrics>,
    ingest: Ingest,
    clients: Arc<clients::Clients>,
) -> Result<Vec<(Prepared, ListenerConfig)>, FrontendError> {
    let users = Arc::new(Users::new(&cfg.users));
    for name in users.plain_text() {
        warn!(
            username = name,
            "broker.users: password stored in plain text; replace it with password_hash from `fieldgate passwd`"
        );
    }
    let acl = Arc::new(Acl::new(&cfg.acl));
    let upstream = Arc::new(upstream);
    let limits = Arc::new(Limits {
        max_total: cfg.max_connections,
        max_per_ip: cfg.max_connections_per_ip,
        counts: Mutex::new((0, HashMap::new())),
    });
    let verify_slots = Arc::new(Semaphore::new(2));
    let live_sessions = Arc::new(sessions::Sessions::default());
    let logins = Arc::new(crate::password::LoginGuard::new(cfg.failed_login_delay));
    let mut out = Vec::new();
    for (name, l) in &cfg.listeners {
        let acceptor = match &l.tls {
            Some(t) => Some(TlsAcceptor::from(tls::server_config(
                &format!("broker.listeners.{name}.tls"),
                t,
            )?)),
            None => None,
        };
        let ctx = Arc::new(Context {
            listener: name.clone(),
            allow_anonymous: l.allow_anonymous,
            cert_mode: l
                .tls
                .as_ref()
                .map_or(ClientCertMode::None, |t| t.client_cert),
            users: users.clone(),
            acl: acl.clone(),
            upstream: upstream.clone(),
            metrics: metrics.clone(),
            max_packet: cfg.max_payload_size,
            connect_timeout: cfg.connect_timeout,
            verify_slots: verify_slots.clone(),
            sessions: live_sessions.clone(),
            clients: clients.clone(),
            client_id_pattern: (!cfg.client_id_pattern.is_empty())
                .then(|| cfg.client_id_pattern.clone()),
            logins: logins.clone(),
            max_subscriptions: cfg.max_subscriptions_per_client,
            max_inflight: cfg.max_inflight,
            rate: (cfg.max_publish_rate > 0).then(|| {
                let burst = match cfg.publish_burst {
                    0 => cfg.max_publish_rate,
                    b => b,
                };
                (cfg.max_publish_rate, burst, cfg.rate_limit_policy)
            }),
            ingest: ingest.clone(),
        });
        out.push((
            Prepared {
                name: name.clone(),
                ctx,
                acceptor,
                handshake_timeout: cfg.tls_handshake_timeout,
                limits: limits.clone(),
            },
            l.clone(),
        ));
    }
    Ok(out)
}

impl Prepared {
    /// Serves `listener` until the task is aborted (or its runtime shut down).
    pub fn serve(self, listener: TcpListener, rt: &tokio::runtime::Handle) -> JoinHandle<()> {
        let rt2 = rt.clone();
        rt.spawn(async move {
            loop {
                let (sock, peer) = match listener.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(listener = %self.name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let slot = match self.limits.take(peer.ip()) {
                    Ok(s) => s,
                    Err(limit) => {
                        self.ctx.metrics.refuse(limit);
                        debug!(listener = %self.name, %peer, limit, "connection over the limit");
                        drop(sock);
                        continue;
                    }
                };
                let _ = sock.set_nodelay(true);
                let ctx = self.ctx.clone();
                let acceptor = self.acceptor.clone();
                let hs = self.handshake_timeout;
                // Not joined: the task ends with its connection, and shutting the device
                // runtime down ends all of them.
                rt2.spawn(async move {
                    let _slot = slot;
                    let m = ctx.metrics.clone();
                    m.connections.inc();
                    let end = match acceptor {
                        None => session::run(sock, peer, None, ctx).await,
                        Some(acc) => match tokio::time::timeout(hs, acc.accept(sock)).await {
                            Ok(Ok(tls)) => {
                                let cn = tls
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .and_then(|c| c.first())
                                    .and_then(tls::common_name);
                                run_tls(tls, peer, cn, ctx).await
                            }
                            Ok(Err(e)) => {
                                debug!(%peer, error = %e, "TLS handshake failed");
                                m.refuse("tls_handshake");
                                session::End::Refused
                            }
                            Err(_) => {
                                m.refuse("tls_handshake_timeout");
                                session::End::Refused
                            }
                        },
                    };
                    m.connections.dec();
                    m.closed(end.as_str());
                });
            }
        })
    }
}

async fn run_tls<S>(s: S, peer: SocketAddr, cn: Option<String>, ctx: Arc<Context>) -> session::End
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    session::run(s, peer, cn, ctx).await
}
