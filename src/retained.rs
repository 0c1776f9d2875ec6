//! Retained messages that survive a gateway restart.
//!
//! rumqttd 0.20 keeps retained messages only in memory, and it clears the retain flag on
//! every live delivery (MQTT asks for that). fieldgate therefore keeps them itself: every
//! retained publish passes [`crate::ingest`] before the router sees it (device publishes and
//! wills in the front end, the gateway's own sources in [`crate::sources::LocalTx`]), within
//! the retained budget (`broker.max_retained_messages`, `max_retained_bytes`), and the
//! journal writes it to the store's `retained` tree in the same commit that queues it for the
//! cloud. Retained publishes are also marked ([`crate::marks`]) on their way into rumqttd, so
//! the front end can deliver them at the right QoS with the retain flag.
//!
//! On start, before the listeners or any source exist, [`restore`] publishes every kept
//! message into the router through an in-process link, retained and marked; they were
//! queued for the cloud in the run that accepted them, and are not queued again.
//!
//! Invariants: a retained publish with an empty payload deletes the kept message (MQTT
//! 3.3.1.3); the kept QoS is the publisher's QoS ([`crate::frontend`] delivers at most that).

use bytes::Bytes;
use rumqttd::local::LinkTx;
use tracing::{info, warn};

use crate::broker::{Broker, BrokerError};
use crate::marks::packet;
use crate::store::Store;

/// The kept retained messages (topic, QoS, payload); none, with a WARN, when the store
/// cannot read them.
pub fn kept(store: &Store) -> Vec<(String, u8, Bytes)> {
    store.retained().unwrap_or_else(|e| {
        warn!(error = %e, "cannot read the kept retained messages; starting without them");
        Vec::new()
    })
}

/// Publishes `kept` (see [`kept`]) into the broker. Call before the listeners and the
/// sources start. Returns how many were restored.
pub async fn restore(
    broker: &Broker,
    kept: Vec<(String, u8, Bytes)>,
) -> Result<usize, BrokerError> {
    if kept.is_empty() {
        return Ok(0);
    }
    let (mut tx, _rx): (LinkTx, _) = broker.link("fieldgate-retained-restore")?;
    let mut n = 0;
    for (topic, qos, payload) in kept {
        if let Err(e) = tx.send(packet(&topic, qos, payload)).await {
            warn!(error = %e, %topic, "could not restore a retained message");
            continue;
        }
        n += 1;
    }
    info!(restored = n, "retained messages restored from the store");
    Ok(n)
}
