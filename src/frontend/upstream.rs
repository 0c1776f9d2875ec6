//! The front end's side of the loopback link to rumqttd: packet translation.
//!
//! Devices speak MQTT 3.1.1 to the front end; the front end speaks MQTT 5 to rumqttd's
//! internal listener. The only reason for v5 is one user property: rumqttd overwrites a
//! forwarded message's QoS with the subscription's QoS, so the publisher's QoS would be lost
//! on the way through the router. The front end tags every PUBLISH (and will) it forwards
//! with [`QOS_PROPERTY`]; rumqttd keeps publish properties in its commit log (retained
//! messages included) and hands them back on delivery, where the front end reads and strips
//! the tag. Messages without the tag come from the gateway's in-process links. Retained
//! publishes carry a second mark (`crate::retained`).
//!
//! No v5 feature reaches a device: topic aliases, subscription ids, reason strings and
//! properties are never asked for and are dropped if they appear.

use bytes::Bytes;
use rumqttc::mqttbytes::v4;
use rumqttc::mqttbytes::QoS as Q4;
use rumqttc::v5::mqttbytes::v5;
use rumqttc::v5::mqttbytes::QoS as Q5;

use crate::marks::QOS_PROPERTY;

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
pub fn connect(c: &v4::Connect, keep_alive: u16, user: &str, pass: &str) -> v5::Packet {
    let will = c.last_will.as_ref().map(|w| v5::LastWill {
        topic: Bytes::copy_from_slice(w.topic.as_bytes()),
        message: w.message.clone(),
        qos: q5(w.qos),
        retain: w.retain,
        properties: Some(v5::LastWillProperties {
            delay_interval: None,
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: tag(w.qos, w.retain),
        }),
    });
    v5::Packet::Connect(
        v5::Connect {
            keep_alive,
            client_id: c.client_id.clone(),
            clean_start: c.clean_session,
            properties: None,
        },
        will,
        Some(v5::Login::new(user, pass)),
    )
}

/// A device's PUBLISH, tagged with its QoS.
pub fn publish(p: v4::Publish) -> v5::Packet {
    v5::Packet::Publish(v5::Publish {
        dup: p.dup,
        qos: q5(p.qos),
        retain: p.retain,
        topic: Bytes::from(p.topic.into_bytes()),
        pkid: p.pkid,
        payload: p.payload,
        properties: Some(v5::PublishProperties {
            user_properties: tag(p.qos, p.retain),
            ..Default::default()
        }),
    })
}

/// A delivery from rumqttd as a v4 PUBLISH, and the publisher's QoS when it was tagged.
pub fn delivery(p: v5::Publish) -> (v4::Publish, Option<Q4>) {
    let origin = p.properties.as_ref().and_then(|props| {
        props
            .user_properties
            .iter()
            .find(|(k, _)| k == QOS_PROPERTY)
            .and_then(|(_, v)| match v.as_str() {
                "0" => Some(Q4::AtMostOnce),
                "1" => Some(Q4::AtLeastOnce),
                "2" => Some(Q4::ExactlyOnce),
                _ => None,
            })
    });
    let topic = match String::from_utf8(p.topic.to_vec()) {
        Ok(t) => t,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    };
    let out = v4::Publish {
        dup: p.dup,
        qos: q4(p.qos),
        retain: p.retain,
        topic,
        pkid: p.pkid,
        payload: p.payload,
    };
    (out, origin)
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
