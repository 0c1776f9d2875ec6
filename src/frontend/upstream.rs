//! The front end's side of the loopback link to rumqttd: packet translation.
//!
//! The front end speaks MQTT 5 to rumqttd's internal listener, for every device (3.1.1
//! devices' packets are MQTT 5 ones by then, see `v311`). rumqttd overwrites a forwarded
//! message's QoS with the subscription's QoS, so the publisher's QoS would be lost on the way
//! through the router: the front end tags every PUBLISH (and will) it forwards with
//! [`QOS_PROPERTY`]; rumqttd keeps publish properties in its commit log (retained messages
//! included) and hands them back on delivery, where the front end reads and strips the tag.
//! Messages without the tag come from the gateway's in-process links. Retained publishes
//! carry a second mark (`crate::retained`); one published by a session with a no-local
//! subscription carries its client id ([`ORIGIN_PROPERTY`]).
//!
//! Message expiry is rumqttd's for what it holds: it drops a message whose expiry passed
//! while it waited and hands the others on with what is left of it.
//!
//! An MQTT 5 device's own properties (user properties, content type, payload format,
//! response topic, correlation data, message expiry) pass through rumqttd untouched; the
//! marks are the only user properties added, and they never reach a device. Topic aliases
//! are resolved before a PUBLISH goes upstream (rumqttd is never asked to use them).

use rumqttc::mqttbytes::v4;
use rumqttc::mqttbytes::QoS as Q4;
use rumqttc::v5::mqttbytes::v5;
use rumqttc::v5::mqttbytes::QoS as Q5;

use crate::marks::{QOS_PROPERTY, RETAIN_PROPERTY};

/// User property: the client id of a publisher that holds a no-local subscription.
pub const ORIGIN_PROPERTY: &str = "fieldgate-origin";

/// v4 QoS to v5 QoS.
pub fn q5(q: Q4) -> Q5 {
    match q {
        Q4::AtMostOnce => Q5::AtMostOnce,
        Q4::AtLeastOnce => Q5::AtLeastOnce,
        Q4::ExactlyOnce => Q5::ExactlyOnce,
    }
}

/// v5 QoS to v4 QoS.
pub fn q4(q: Q5) -> Q4 {
    match q {
        Q5::AtMostOnce => Q4::AtMostOnce,
        Q5::AtLeastOnce => Q4::AtLeastOnce,
        Q5::ExactlyOnce => Q4::ExactlyOnce,
    }
}

/// The marks of a forwarded publish or will: its QoS, and whether it was retained (the
/// uplink tap keeps marked retained messages across restarts, see `crate::retained`).
fn tag(q: Q4, retain: bool) -> Vec<(String, String)> {
    crate::marks::marks(q as u8, retain)
}

/// The upstream CONNECT for a device's CONNECT, logged in with the internal account.
/// `clean_start`: whether rumqttd drops what it holds for the client id (the front end
/// decides, see `sessions`). The device's own CONNECT properties are not passed on (the
/// front end enforces them itself), but for the session expiry when its will has a delay:
/// rumqttd delays the will by the smaller of the two.
pub fn connect(
    c: &v5::Connect,
    will: Option<&v5::LastWill>,
    clean_start: bool,
    keep_alive: u16,
    user: &str,
    pass: &str,
) -> v5::Packet {
    let delayed = will
        .and_then(|w| w.properties.as_ref())
        .is_some_and(|p| p.delay_interval.is_some_and(|d| d > 0));
    let properties = c
        .properties
        .as_ref()
        .filter(|_| delayed)
        .map(|p| v5::ConnectProperties {
            session_expiry_interval: p.session_expiry_interval,
            ..v5::ConnectProperties::new()
        });
    let will = will.map(|w| {
        let mut props = w.properties.clone().unwrap_or(v5::LastWillProperties {
            delay_interval: None,
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        });
        props.user_properties.extend(tag(q4(w.qos), w.retain));
        v5::LastWill {
            topic: w.topic.clone(),
            message: w.message.clone(),
            qos: w.qos,
            retain: w.retain,
            properties: Some(props),
        }
    });
    v5::Packet::Connect(
        v5::Connect {
            keep_alive,
            client_id: c.client_id.clone(),
            clean_start,
            properties,
        },
        will,
        Some(v5::Login::new(user, pass)),
    )
}

/// A device's PUBLISH (its topic alias already resolved), tagged with its QoS, and with
/// `origin` when given.
pub fn publish(mut p: v5::Publish, origin: Option<&str>) -> v5::Packet {
    let marks = tag(q4(p.qos), p.retain);
    let props = p.properties.get_or_insert_with(Default::default);
    props.topic_alias = None;
    props.subscription_identifiers.clear();
    props.user_properties.extend(marks);
    if let Some(o) = origin {
        props
            .user_properties
            .push((ORIGIN_PROPERTY.to_string(), o.to_string()));
    }
    v5::Packet::Publish(p)
}

/// What the marks of a delivery said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Marks {
    /// The publisher's QoS (None: untagged, from the gateway's own links).
    pub origin_qos: Option<Q4>,
    /// Published retained.
    pub retained: bool,
    /// The publisher's client id, if it holds a no-local subscription.
    pub origin: Option<String>,
}

/// A delivery from rumqttd with the marks taken off, and what they said. The properties
/// left are the publisher's own (None when there are none).
pub fn delivery(mut p: v5::Publish) -> (v5::Publish, Marks) {
    let mut m = Marks::default();
    if let Some(props) = p.properties.as_mut() {
        props.user_properties.retain(|(k, v)| {
            match k.as_str() {
                QOS_PROPERTY => {
                    m.origin_qos = match v.as_str() {
                        "0" => Some(Q4::AtMostOnce),
                        "1" => Some(Q4::AtLeastOnce),
                        "2" => Some(Q4::ExactlyOnce),
                        _ => None,
                    }
                }
                RETAIN_PROPERTY => m.retained = v == "1",
                ORIGIN_PROPERTY => m.origin = Some(v.clone()),
                _ => return true,
            }
            false
        });
        props.topic_alias = None;
        props.subscription_identifiers.clear();
        if *props == v5::PublishProperties::default() {
            p.properties = None;
        }
    }
    (p, m)
}

/// A device's SUBSCRIBE (already filtered) as v5.
pub fn subscribe(pkid: u16, filters: &[(String, Q4)]) -> v5::Packet {
    v5::Packet::Subscribe(v5::Subscribe {
        pkid,
        filters: filters
            .iter()
            .map(|(f, q)| v5::Filter::new(f.clone(), q5(*q)))
            .collect(),
        properties: None,
    })
}

/// rumqttd's CONNACK refusal as the nearest 3.1.1 return code.
pub fn connack_code(c: v5::ConnectReturnCode) -> v4::ConnectReturnCode {
    use v4::ConnectReturnCode as R4;
    use v5::ConnectReturnCode as R5;
    match c {
        R5::Success => R4::Success,
        R5::RefusedProtocolVersion | R5::UnsupportedProtocolVersion => R4::RefusedProtocolVersion,
        R5::BadClientId | R5::ClientIdentifierNotValid => R4::BadClientId,
        R5::BadUserNamePassword => R4::BadUserNamePassword,
        R5::NotAuthorized | R5::Banned => R4::NotAuthorized,
        _ => R4::ServiceUnavailable,
    }
}
