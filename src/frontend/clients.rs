//! The table of connected MQTT clients the operator page lists (`/api/v1/clients`).
//!
//! A session registers once its CONNACK (success) was sent and holds the [`Registration`]
//! until it ends: dropping it removes the row, so a session that ends any way (error, panic
//! unwinding, shutdown) leaves no row behind. The table holds at most one row per live
//! session, so it is bounded by `broker.max_connections`. Its lock is taken twice per
//! session (register, drop) and once per page request; the per-packet counters are relaxed
//! atomic adds on the session's own row, never the lock.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Every connected client.
#[derive(Debug, Default)]
pub struct Clients {
    next: AtomicU64,
    rows: Mutex<BTreeMap<u64, Arc<Client>>>,
}

/// One connected client.
#[derive(Debug)]
pub struct Client {
    /// The CONNECT's client id (empty: rumqttd named it).
    pub client_id: String,
    /// Username or certificate CN; `None`: anonymous.
    pub identity: Option<String>,
    /// Listener name.
    pub listener: String,
    /// Peer address.
    pub address: SocketAddr,
    /// When the CONNACK was sent, Unix ms.
    pub connected_since_ms: u64,
    messages_in: AtomicU64,
    messages_out: AtomicU64,
    subscriptions: AtomicU64,
}

impl Client {
    /// A PUBLISH came from the client.
    pub fn message_in(&self) {
        self.messages_in.fetch_add(1, Ordering::Relaxed);
    }

    /// A PUBLISH went to the client.
    pub fn message_out(&self) {
        self.messages_out.fetch_add(1, Ordering::Relaxed);
    }

    /// The session now holds `n` subscriptions.
    pub fn subscriptions(&self, n: usize) {
        self.subscriptions.store(n as u64, Ordering::Relaxed);
    }
}

/// A client's row, removed from the table when this is dropped.
#[derive(Debug)]
pub struct Registration {
    clients: Arc<Clients>,
    key: u64,
    /// The row, for the session's counters.
    pub client: Arc<Client>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.clients.lock().remove(&self.key);
    }
}

/// What `/api/v1/clients` shows of one client.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ClientView {
    /// See [`Client`].
    pub client_id: String,
    /// See [`Client`].
    pub identity: Option<String>,
    /// See [`Client`].
    pub listener: String,
    /// See [`Client`].
    pub address: String,
    /// See [`Client`].
    pub connected_since_ms: u64,
    /// PUBLISHes from the client.
    pub messages_in: u64,
    /// PUBLISHes to the client.
    pub messages_out: u64,
    /// Subscriptions it holds.
    pub subscriptions: u64,
}

impl Clients {
    /// An empty table.
    pub fn new() -> Arc<Clients> {
        Arc::new(Clients::default())
    }

    /// Adds a row for a session that was just accepted.
    pub fn register(
        self: &Arc<Self>,
        client_id: &str,
        identity: Option<&str>,
        listener: &str,
        address: SocketAddr,
    ) -> Registration {
        let client = Arc::new(Client {
            client_id: client_id.to_string(),
            identity: identity.map(str::to_string),
            listener: listener.to_string(),
            address,
            connected_since_ms: crate::clock::now_ms(),
            messages_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
            subscriptions: AtomicU64::new(0),
        });
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(key, client.clone());
        Registration {
            clients: self.clone(),
            key,
            client,
        }
    }

    /// Every connected client, oldest connection first.
    pub fn list(&self) -> Vec<ClientView> {
        let rows: Vec<Arc<Client>> = self.lock().values().cloned().collect();
        rows.iter()
            .map(|c| ClientView {
                client_id: c.client_id.clone(),
                identity: c.identity.clone(),
                listener: c.listener.clone(),
                address: c.address.to_string(),
                connected_since_ms: c.connected_since_ms,
                messages_in: c.messages_in.load(Ordering::Relaxed),
                messages_out: c.messages_out.load(Ordering::Relaxed),
                subscriptions: c.subscriptions.load(Ordering::Relaxed),
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Arc<Client>>> {
        // Inserts and removes are single map operations: a poisoned map is still whole.
        self.rows.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_lives_as_long_as_its_registration_and_counts_what_the_session_counts() {
        let t = Clients::new();
        let addr: SocketAddr = "192.168.1.40:50211".parse().unwrap();
        let a = t.register("sensor-12", Some("sensor-12"), "default", addr);
        let b = t.register("", None, "tls", addr);
        a.client.message_in();
        a.client.message_in();
        a.client.message_out();
        a.client.subscriptions(2);
        let l = t.list();
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].client_id, "sensor-12");
        assert_eq!(
            (l[0].messages_in, l[0].messages_out, l[0].subscriptions),
            (2, 1, 2)
        );
        assert_eq!(l[0].address, "192.168.1.40:50211");
        assert_eq!(l[1].identity, None);
        drop(a);
        let l = t.list();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].listener, "tls");
        drop(b);
        assert!(t.list().is_empty());
    }
}
