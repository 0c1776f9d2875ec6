//! One live upstream connection per client id: takeover is done here, not by rumqttd.
//!
//! rumqttd 0.20 breaks when a client id reconnects quickly. Its router reuses the slot of a
//! connection it dropped, and the old connection's task sends its `Disconnect` event late,
//! so that event can kill the new connection during CONNECT. That failed connection leaves
//! its will handler registered, and the next CONNECT with the same client id `unwrap`s a
//! send on it, panics while holding the will-handler lock and poisons it: from then on every
//! new connection panics, and no device can connect until the gateway restarts
//! (`tests/broker.rs::rapid_reconnects_with_one_client_id_keep_the_broker_healthy`).
//!
//! Invariant kept here: rumqttd never sees two connections with the same client id at the
//! same time, and a new one is opened only after the previous one is fully gone. A session
//! [`Sessions::claim`]s its client id before it dials rumqttd. If another session holds the
//! id, the newcomer cancels it (MQTT takeover: the newest connection wins) and waits until
//! the old session has closed its upstream socket *and seen rumqttd close its side*: rumqttd
//! queues a connection's `Disconnect` event for its router before it closes the socket, and
//! the router handles events in order, so the old connection is gone from the router before
//! the new one's CONNECT reaches it. The wait is bounded by [`TAKEOVER_WAIT`].
//!
//! A session also belongs to the identity that made it ([`Sessions::bind`]): from its
//! CONNECT until a clean session of that client id ends, only that identity (the same
//! username or certificate name, or anonymous for anonymous) may connect with the client id.
//! Otherwise any account could take another device's client id, kick it off, resume its
//! persistent session and receive its queued messages.
//!
//! A session outlives its connection by its session expiry ([`Sessions::release`]: 0 for a
//! 3.1.1 clean session and by default in MQTT 5, for ever for a 3.1.1 persistent one). Once
//! it expired, [`Sessions::resumable`] says no and the next CONNECT of the client id starts
//! clean, and the binding to its identity is gone.
//!
//! rumqttd 0.20 knows only 3.1.1's clean session: a connection with `clean_start` drops what
//! rumqttd held for the client id *and* is dropped when it ends; one without resumes and is
//! kept for ever. So the front end remembers for which client ids rumqttd still holds a
//! session it no longer resumes ([`Sessions::rumqttd_holds`]: an expired one, or one that
//! ended with expiry 0 after a connection that had to resume it), and `session` purges that
//! one before a session that starts clean but outlives its connection. Those ids stay listed
//! until they connect again (one short string each).
//!
//! A persistent session's filters, with the QoS rumqttd delivers each at and the QoS the
//! device was granted, are kept here between its connections ([`Sessions::keep_filters`],
//! [`Sessions::take_filters`]): a resumed session's front end must know what rumqttd holds
//! to replace a subscription (see `session`). They go with the binding.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::mqttbytes::QoS;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Session expiry meaning "never" (MQTT 5's 0xFFFFFFFF; a 3.1.1 persistent session).
pub const NEVER_EXPIRES: u32 = u32::MAX;

/// Longest wait for the previous session of a client id to close.
pub const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

struct Live {
    generation: u64,
    stop: CancellationToken,
    /// Closed when the holding session's [`Claim`] is dropped.
    gone: watch::Receiver<()>,
}

/// The client ids with a live upstream connection, shared by every listener.
#[derive(Default)]
pub struct Sessions {
    live: Mutex<HashMap<String, Live>>,
    next: AtomicU64,
    /// Client id -> whose session it is.
    owners: Mutex<HashMap<String, Owner>>,
    /// Client ids whose session ended while rumqttd still holds one for them.
    stale: Mutex<HashSet<String>>,
    /// Client ids whose will waits out its delay (for the cloud's copy), and the token of
    /// that wait.
    wills: Mutex<HashMap<String, u64>>,
}

/// One filter of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granted {
    /// The QoS rumqttd delivers at (its subscription's).
    pub upstream: QoS,
    /// The QoS the device was last granted: lower than `upstream` after it subscribed
    /// again at a lower QoS (the front end lowers the deliveries).
    pub device: QoS,
    /// MQTT 5 no local: the session's own publishes are not delivered on this filter.
    pub no_local: bool,
    /// MQTT 5 retain as published: deliveries keep the retain flag they were published with.
    pub retain_as_published: bool,
    /// MQTT 5 subscription identifier: deliveries on this filter carry it.
    pub id: Option<u32>,
}

impl Granted {
    /// A filter delivered at `upstream` and granted `device`, without subscription options.
    pub fn new(upstream: QoS, device: QoS) -> Granted {
        Granted {
            upstream,
            device,
            no_local: false,
            retain_as_published: false,
            id: None,
        }
    }
}

/// A session's filters.
pub type Filters = HashMap<String, Granted>;

/// Whether some filter's device QoS is below rumqttd's (the front end lowers deliveries).
pub fn any_lowered(filters: &Filters) -> bool {
    filters.values().any(|g| g.device < g.upstream)
}

/// The identity a client id's session belongs to, while the session exists.
struct Owner {
    /// Username or certificate name; None: anonymous.
    identity: Option<String>,
    /// Connections of this client id between CONNECT and their end (a takeover overlaps two).
    active: usize,
    /// A persistent session is kept by rumqttd after its connection ended.
    kept: bool,
    /// When a kept session expires (None: never).
    expires: Option<Instant>,
    /// The session's filters, while no connection of it holds them.
    filters: Filters,
}

/// A session's hold on its client id; dropping it (after the upstream socket is closed)
/// lets the next session with that id proceed.
pub struct Claim {
    sessions: Arc<Sessions>,
    client_id: String,
    generation: u64,
    /// Cancelled when a newer connection takes the client id over.
    pub stop: CancellationToken,
    _gone: watch::Sender<()>,
}

impl Sessions {
    /// A CONNECT of `client_id` by `identity`: false (refuse it) when the client id's session
    /// belongs to another identity. Each true is paired with one [`Sessions::release`].
    pub fn bind(&self, client_id: &str, identity: Option<&str>) -> bool {
        let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        let expired = owners
            .get(client_id)
            .is_some_and(|o| o.active == 0 && o.expires.is_some_and(|t| Instant::now() >= t));
        if expired {
            // The session is gone, and with it whose it was; rumqttd still holds it.
            owners.remove(client_id);
            self.stale_ids().insert(client_id.to_string());
        }
        match owners.get_mut(client_id) {
            Some(o) if o.identity.as_deref() != identity => false,
            Some(o) => {
                o.active += 1;
                true
            }
            None => {
                owners.insert(
                    client_id.to_string(),
                    Owner {
                        identity: identity.map(str::to_string),
                        active: 1,
                        kept: false,
                        expires: None,
                        filters: Filters::new(),
                    },
                );
                true
            }
        }
    }

    /// A bound connection of `client_id` ended; its session lives on for `expiry` seconds
    /// (0: it ended with the connection; [`NEVER_EXPIRES`]: for ever), and so does the
    /// binding. `at_rumqttd`: the connection's upstream session was a persistent one (rumqttd
    /// keeps it whatever `expiry` says).
    pub fn release(&self, client_id: &str, expiry: u32, at_rumqttd: bool) {
        if expiry == 0 && at_rumqttd {
            self.stale_ids().insert(client_id.to_string());
        }
        let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(o) = owners.get_mut(client_id) {
            o.active = o.active.saturating_sub(1);
            o.kept = expiry != 0;
            o.expires = (expiry != NEVER_EXPIRES)
                .then(|| Instant::now() + Duration::from_secs(expiry as u64));
            if o.active == 0 && !o.kept {
                owners.remove(client_id);
            }
        }
    }

    /// Whether the last connection of `client_id` left a session that has not expired (call
    /// once the id is claimed: a session being taken over has released it by then).
    pub fn resumable(&self, client_id: &str) -> bool {
        let owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        owners
            .get(client_id)
            .is_some_and(|o| o.kept && o.expires.is_none_or(|t| Instant::now() < t))
    }

    /// Whether rumqttd may hold a session for `client_id` that is not to be resumed: a
    /// kept one (the caller starts clean), an expired one, or an ended one it kept.
    pub fn rumqttd_holds(&self, client_id: &str) -> bool {
        let kept = {
            let owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
            owners.get(client_id).is_some_and(|o| o.kept)
        };
        kept || self.stale_ids().contains(client_id)
    }

    /// rumqttd dropped what it held for `client_id` (a clean upstream connection).
    pub fn purged(&self, client_id: &str) {
        self.stale_ids().remove(client_id);
    }

    fn stale_ids(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.stale.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps the filters of a bound persistent session of `client_id` for its next
    /// connection (call before [`Sessions::release`]).
    pub fn keep_filters(&self, client_id: &str, filters: Filters) {
        let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(o) = owners.get_mut(client_id) {
            o.filters = filters;
        }
    }

    /// The filters kept for `client_id`'s session (empty when none were): for a connection
    /// that resumed it.
    pub fn take_filters(&self, client_id: &str) -> Filters {
        let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        owners
            .get_mut(client_id)
            .map(|o| std::mem::take(&mut o.filters))
            .unwrap_or_default()
    }

    /// A will of `client_id` waits out its delay: the token to take it with, once the delay
    /// is over ([`Sessions::take_will`]). A new connection of the client id cancels it.
    pub fn defer_will(&self, client_id: &str) -> u64 {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let mut wills = self.wills.lock().unwrap_or_else(|e| e.into_inner());
        wills.insert(client_id.to_string(), token);
        token
    }

    /// Whether the deferred will `token` of `client_id` is still due (no new connection of
    /// the client id came meanwhile); it is taken.
    pub fn take_will(&self, client_id: &str, token: u64) -> bool {
        let mut wills = self.wills.lock().unwrap_or_else(|e| e.into_inner());
        if wills.get(client_id) == Some(&token) {
            wills.remove(client_id);
            return true;
        }
        false
    }

    /// Takes `client_id`, first stopping and awaiting the session that holds it (a deferred
    /// will of the client id is cancelled).
    pub async fn claim(self: &Arc<Self>, client_id: &str) -> Claim {
        self.wills
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(client_id);
        loop {
            let previous = {
                let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
                match live.get(client_id) {
                    Some(l) => (l.generation, l.stop.clone(), l.gone.clone()),
                    None => {
                        let generation = self.next.fetch_add(1, Ordering::Relaxed);
                        let stop = CancellationToken::new();
                        let (tx, rx) = watch::channel(());
                        live.insert(
                            client_id.to_string(),
                            Live {
                                generation,
                                stop: stop.clone(),
                                gone: rx,
                            },
                        );
                        return Claim {
                            sessions: self.clone(),
                            client_id: client_id.to_string(),
                            generation,
                            stop,
                            _gone: tx,
                        };
                    }
                }
            };
            let (generation, stop, mut gone) = previous;
            stop.cancel();
            // Err from `changed`: the sender was dropped, i.e. the old session is gone.
            let _ = tokio::time::timeout(TAKEOVER_WAIT, async {
                while gone.changed().await.is_ok() {}
            })
            .await;
            // Gone, or stuck past the bound: either way it no longer holds the id.
            let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
            if live.get(client_id).map(|l| l.generation) == Some(generation) {
                live.remove(client_id);
            }
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut live = self.sessions.live.lock().unwrap_or_else(|e| e.into_inner());
        if live.get(&self.client_id).map(|l| l.generation) == Some(self.generation) {
            live.remove(&self.client_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_newcomer_stops_the_holder_and_waits_for_it() {
        let s = Arc::new(Sessions::default());
        let first = s.claim("dev").await;
        let stop = first.stop.clone();
        let s2 = s.clone();
        let second = tokio::spawn(async move { s2.claim("dev").await });
        stop.cancelled().await;
        // The holder is still closing: the newcomer waits.
        tokio::task::yield_now().await;
        assert!(!second.is_finished());
        drop(first);
        let second = second.await.unwrap();
        assert!(!second.stop.is_cancelled());
        // Another id is independent.
        let other = s.claim("other").await;
        assert!(!other.stop.is_cancelled());
        drop(second);
        assert!(s.live.lock().unwrap().get("dev").is_none());
    }

    #[test]
    fn a_client_id_belongs_to_one_identity_while_its_session_exists() {
        let s = Sessions::default();
        // A persistent session: bound after its connection ended.
        assert!(s.bind("dev2", Some("dev2")));
        s.release("dev2", NEVER_EXPIRES, true);
        assert!(!s.bind("dev2", Some("dev1")));
        assert!(!s.bind("dev2", None));
        // A takeover by the owner overlaps two connections; the old one ending (clean)
        // does not free the id while the new one lives.
        assert!(s.bind("dev2", Some("dev2")));
        assert!(s.bind("dev2", Some("dev2")));
        s.release("dev2", 0, false);
        assert!(!s.bind("dev2", Some("dev1")));
        s.release("dev2", 0, false);
        assert!(s.bind("dev2", Some("dev1")));
        // Filters kept between the connections of a persistent session go with it.
        let f = Filters::from([(
            "a/#".to_string(),
            Granted::new(QoS::AtLeastOnce, QoS::AtMostOnce),
        )]);
        s.keep_filters("dev2", f.clone());
        s.release("dev2", NEVER_EXPIRES, true);
        assert!(s.bind("dev2", Some("dev1")));
        assert_eq!(s.take_filters("dev2"), f);
        assert!(s.take_filters("dev2").is_empty());
        s.release("dev2", 0, false);
        s.keep_filters("gone", f);
        assert!(s.take_filters("gone").is_empty());
        // An expired session is gone with its binding: another identity may take the id, and
        // nothing is resumed.
        assert!(s.bind("dev3", Some("a")));
        s.release("dev3", 0, false);
        assert!(!s.resumable("dev3"));
        assert!(!s.rumqttd_holds("dev3"));
        assert!(s.bind("dev3", Some("a")));
        s.release("dev3", 3600, true);
        assert!(s.resumable("dev3"));
        assert!(!s.bind("dev3", Some("b")));
        if let Some(o) = s.owners.lock().unwrap().get_mut("dev3") {
            o.expires = Some(Instant::now());
        }
        assert!(!s.resumable("dev3"));
        assert!(s.bind("dev3", Some("b")));
        // rumqttd still holds the expired session until it is purged.
        assert!(s.rumqttd_holds("dev3"));
        s.purged("dev3");
        assert!(!s.rumqttd_holds("dev3"));
        // Anonymous is an identity of its own.
        assert!(s.bind("anon", None));
        assert!(s.bind("anon", None));
        assert!(!s.bind("anon", Some("x")));
    }
}
