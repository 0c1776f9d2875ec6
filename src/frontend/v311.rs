//! MQTT 3.1.1 devices in the relay's MQTT 5 terms: their packets converted both ways.
//!
//! The relay ([`super::relay`]) decides in MQTT 5 packets for every device, so one set of
//! rules serves both protocol levels. A 3.1.1 device's packets are read with the 3.1.1 codec
//! and turned into their MQTT 5 equivalents ([`to_v5`]: no properties, success reason
//! codes); what the relay sends it is turned back ([`to_v4`]), dropping what 3.1.1 cannot
//! carry: properties, reason strings, and reason codes, where a SUBACK's refusal becomes
//! 0x80 and a CONNACK refusal the nearest 3.1.1 return code.
//!
//! Invariants: the conversion copies no payload (the `Bytes` move); the relay never relies on
//! a 3.1.1 device seeing a negative acknowledgement (it decides those by protocol level, see
//! `relay`), and a packet 3.1.1 has no form for (a server's DISCONNECT, AUTH) is not sent.

use bytes::Bytes;
use rumqttc::mqttbytes::v4::{self, Packet as P4};
use rumqttc::v5::mqttbytes::v5::{self, Packet as P5};

use super::upstream::{q4, q5};

/// A 3.1.1 device's packet as the relay sees it.
pub fn to_v5(p: P4) -> P5 {
    match p {
        P4::Publish(p) => P5::Publish(publish_v5(p)),
        P4::PubAck(a) => P5::PubAck(v5::PubAck::new(a.pkid, None)),
        P4::PubRec(a) => P5::PubRec(v5::PubRec::new(a.pkid, None)),
        P4::PubRel(a) => P5::PubRel(v5::PubRel::new(a.pkid, None)),
        P4::PubComp(a) => P5::PubComp(v5::PubComp::new(a.pkid, None)),
        P4::Subscribe(s) => P5::Subscribe(v5::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| v5::Filter::new(f.path, q5(f.qos)))
                .collect(),
            properties: None,
        }),
        P4::Unsubscribe(u) => P5::Unsubscribe(v5::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
            properties: None,
        }),
        P4::PingReq => P5::PingReq(v5::PingReq),
        P4::PingResp => P5::PingResp(v5::PingResp),
        P4::Disconnect => P5::Disconnect(v5::Disconnect::new(
            v5::DisconnectReasonCode::NormalDisconnection,
        )),
        P4::Connect(c) => P5::Connect(
            v5::Connect {
                keep_alive: c.keep_alive,
                client_id: c.client_id,
                clean_start: c.clean_session,
                properties: None,
            },
            None,
            None,
        ),
        P4::ConnAck(a) => P5::ConnAck(v5::ConnAck {
            session_present: a.session_present,
            code: v5::ConnectReturnCode::Success,
            properties: None,
        }),
        P4::SubAck(a) => P5::SubAck(v5::SubAck {
            pkid: a.pkid,
            return_codes: Vec::new(),
            properties: None,
        }),
        P4::UnsubAck(a) => P5::UnsubAck(v5::UnsubAck {
            pkid: a.pkid,
            reasons: Vec::new(),
            properties: None,
        }),
    }
}

/// A 3.1.1 PUBLISH as MQTT 5 (no properties).
pub fn publish_v5(p: v4::Publish) -> v5::Publish {
    v5::Publish {
        dup: p.dup,
        qos: q5(p.qos),
        retain: p.retain,
        topic: Bytes::from(p.topic.into_bytes()),
        pkid: p.pkid,
        payload: p.payload,
        properties: None,
    }
}

/// What the relay sends a 3.1.1 device, in 3.1.1; None: 3.1.1 has no such packet.
pub fn to_v4(p: P5) -> Option<P4> {
    Some(match p {
        P5::Publish(p) => {
            let topic = match String::from_utf8(p.topic.to_vec()) {
                Ok(t) => t,
                Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
            };
            P4::Publish(v4::Publish {
                dup: p.dup,
                qos: q4(p.qos),
                retain: p.retain,
                topic,
                pkid: p.pkid,
                payload: p.payload,
            })
        }
        P5::PubAck(a) => P4::PubAck(v4::PubAck::new(a.pkid)),
        P5::PubRec(a) => P4::PubRec(v4::PubRec::new(a.pkid)),
        P5::PubRel(a) => P4::PubRel(v4::PubRel::new(a.pkid)),
        P5::PubComp(a) => P4::PubComp(v4::PubComp::new(a.pkid)),
        P5::SubAck(a) => P4::SubAck(v4::SubAck::new(
            a.pkid,
            a.return_codes
                .into_iter()
                .map(|c| match c {
                    v5::SubscribeReasonCode::Success(q) => v4::SubscribeReasonCode::Success(q4(q)),
                    _ => v4::SubscribeReasonCode::Failure,
                })
                .collect(),
        )),
        P5::UnsubAck(a) => P4::UnsubAck(v4::UnsubAck::new(a.pkid)),
        P5::PingResp(_) => P4::PingResp,
        P5::PingReq(_) => P4::PingReq,
        P5::ConnAck(a) => P4::ConnAck(v4::ConnAck::new(
            super::upstream::connack_code(a.code),
            a.session_present,
        )),
        P5::Disconnect(_) | P5::Auth(_) | P5::Connect(..) => return None,
        P5::Subscribe(_) | P5::Unsubscribe(_) => return None,
    })
}

#[cfg(test)]
mod tests {
    use rumqttc::mqttbytes::QoS;

    use super::*;

    #[test]
    fn a_publish_round_trips_and_a_refusing_suback_becomes_0x80() {
        let p = v4::Publish::new("a/b", QoS::AtLeastOnce, vec![1u8, 2, 3]);
        let back = to_v4(to_v5(P4::Publish(p.clone())));
        assert_eq!(back, Some(P4::Publish(p)));
        let ack = P5::SubAck(v5::SubAck {
            pkid: 7,
            return_codes: vec![
                v5::SubscribeReasonCode::Success(rumqttc::v5::mqttbytes::QoS::AtLeastOnce),
                v5::SubscribeReasonCode::NotAuthorized,
            ],
            properties: None,
        });
        assert_eq!(
            to_v4(ack),
            Some(P4::SubAck(v4::SubAck::new(
                7,
                vec![
                    v4::SubscribeReasonCode::Success(QoS::AtLeastOnce),
                    v4::SubscribeReasonCode::Failure
                ]
            )))
        );
        let refused = v5::PubAck {
            pkid: 3,
            reason: v5::PubAckReason::NotAuthorized,
            properties: None,
        };
        assert_eq!(
            to_v4(P5::PubAck(refused)),
            Some(P4::PubAck(v4::PubAck::new(3)))
        );
        let gone = v5::Disconnect::new(v5::DisconnectReasonCode::PacketTooLarge);
        assert_eq!(to_v4(P5::Disconnect(gone)), None);
    }
}
