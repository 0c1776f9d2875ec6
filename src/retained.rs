//! Retained messages that survive a gateway restart.
//!
//! rumqttd 0.20 keeps retained messages only in memory, and it clears the retain flag on
//! every live delivery (MQTT asks for that). fieldgate therefore keeps them itself: every
//! retained publish passes [`crate::ingest`] before the router sees it (device publishes and
//! wills in the front end, the gateway's own sources in [`crate::sources::LocalTx`]), within
//! the retained budget (`broker.max_retained_messages`, `max_retained_bytes`), and the
//! journal writes it to the store's `retained` tree in the same commit that queues it for the
//! cloud. Retained publishes are also marked with the user property [`RETAIN_PROPERTY`] (and
//! the publisher's QoS with [`QOS_PROPERTY`]) on their way into rumqttd, so the front end
//! can deliver them at the right QoS.
//!
//! On start, before the listeners or any source exist, [`restore`] publishes every kept
//! message into the router through an in-process link, retained and marked; they were
//! queued for the cloud in the run that accepted them, and are not queued again.
//!
//! Invariants: a retained publish with an empty payload deletes the kept message (MQTT
//! 3.3.1.3); the kept QoS is the publisher's QoS ([`crate::frontend`] delivers at most that).

use bytes::Bytes;
use rumqttd::local::LinkTx;
use rumqttd::protocol::{Packet, Publish, PublishProperties};
use tracing::{info, warn};

use crate::broker::{Broker, BrokerError};
use crate::store::Store;

/// User property marking a publish as retained (value "1").
pub const RETAIN_PROPERTY: &str = "fieldgate-retain";

/// User property carrying the publisher's QoS ("0", "1", "2") through rumqttd.
pub const QOS_PROPERTY: &str = "fieldgate-qos";

/// The user properties that mark a publish: its QoS, and `retain` when set.
pub fn marks(qos: u8, retain: bool) -> Vec<(String, String)> {
    let mut v = vec![(QOS_PROPERTY.to_string(), qos.min(2).to_string())];
    if retain {
        v.push((RETAIN_PROPERTY.to_string(), "1".to_string()));
    }
    v
}

/// Whether a publish seen in the router was published retained.
pub fn is_marked(props: Option<&PublishProperties>) -> bool {
    props.is_some_and(|p| {
        p.user_properties
            .iter()
            .any(|(k, v)| k == RETAIN_PROPERTY && v == "1")
    })
}

/// The publisher's QoS from the marks; None for unmarked publishes.
pub fn marked_qos(props: Option<&PublishProperties>) -> Option<u8> {
    props.and_then(|p| {
        p.user_properties
            .iter()
            .find(|(k, _)| k == QOS_PROPERTY)
            .and_then(|(_, v)| v.parse::<u8>().ok())
            .filter(|q| *q <= 2)
    })
}

/// A retained, marked publish as the router takes it from an in-process link.
pub fn packet(topic: &str, qos: u8, payload: Bytes) -> Packet {
    let publish = Publish::new(Bytes::copy_from_slice(topic.as_bytes()), payload, true);
    let props = PublishProperties {
        user_properties: marks(qos, true),
        ..Default::default()
    };
    Packet::Publish(publish, Some(props))
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_round_trip() {
        let p = PublishProperties {
            user_properties: marks(1, true),
            ..Default::default()
        };
        assert!(is_marked(Some(&p)));
        assert_eq!(marked_qos(Some(&p)), Some(1));
        let plain = PublishProperties {
            user_properties: marks(2, false),
            ..Default::default()
        };
        assert!(!is_marked(Some(&plain)));
        assert_eq!(marked_qos(Some(&plain)), Some(2));
        assert!(!is_marked(None));
        assert_eq!(marked_qos(None), None);
        let bad = PublishProperties {
            user_properties: vec![(QOS_PROPERTY.into(), "7".into())],
            ..Default::default()
        };
        assert_eq!(marked_qos(Some(&bad)), None);
    }
}
