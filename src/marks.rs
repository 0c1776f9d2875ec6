//! How a publish carries its publisher's QoS and its retain flag through rumqttd.
//!
//! rumqttd 0.20 clears the retain flag on every live delivery (MQTT asks for that) and
//! delivers at the subscriber's QoS. fieldgate needs both at delivery (a device subscribed
//! at QoS 2 to a QoS 0 publish gets QoS 0; a retained message sent to a new subscription
//! keeps its flag), so every publish that enters the router from the front end, a local
//! client or the retained restore is marked with user properties: [`QOS_PROPERTY`] always,
//! [`RETAIN_PROPERTY`] when it was published retained. The front end reads the marks back and
//! strips them before a device sees the message.
//!
//! A leaf: it imports nothing from the crate, so whoever publishes into the router and the
//! front end that delivers agree on one spelling.

use bytes::Bytes;
use rumqttd::protocol::{Packet, Publish, PublishProperties};

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
