//! The gateway's own clients of the embedded broker: in-process rumqttd links for the
//! sources and the OTA manager (the downlink publishes on a bare link of its own).
//!
//! A [`LocalClient`] is made by [`crate::broker::Broker::client`]. What it publishes passes
//! [`crate::ingest`] first, like a device's publish, so what is meant for the cloud is in the
//! journal before local subscribers see it; commands reach it on the filters it subscribes
//! to on its own link, which also carries the cloud's downlink republished locally.
//!
//! Invariants:
//! - a link must be created before the broker's listeners start (see [`crate::broker`]), so
//!   the gateway builds every client's link during start-up;
//! - a link is owned by one task: [`LocalClient::split`] hands the publishing half and the
//!   receiving half to the two sides of that task's `select!`;
//! - the receiving half answers rumqttd's `Unschedule` with a wake-up, so a client that
//!   subscribes but rarely receives is never parked by the router.

use bytes::Bytes;
use rumqttd::local::{LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish};
use rumqttd::Notification;

use crate::ingest::Ingest;

/// The QoS a source's publishes are marked with, and its retained messages kept and
/// restored with (subscribers still get at most their granted QoS).
const SOURCE_QOS: u8 = 2;

/// An in-process MQTT client of the embedded broker, as one `(LinkTx, LinkRx)` pair.
pub struct LocalClient {
    id: String,
    tx: LinkTx,
    rx: LinkRx,
    ingest: Ingest,
}

/// The publishing half of a [`LocalClient`].
pub struct LocalTx {
    tx: LinkTx,
    ingest: Ingest,
    /// When the last "journal full" warning was logged.
    warned: Option<std::time::Instant>,
}

/// The receiving half of a [`LocalClient`].
pub struct LocalRx {
    rx: LinkRx,
}

/// One message received on a subscribed filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    /// Topic it was published to.
    pub topic: String,
    /// Raw payload.
    pub payload: Bytes,
}

impl LocalClient {
    /// Wraps the link `id` made by [`crate::broker::Broker::link`]; publishes pass `ingest`.
    pub fn new(id: &str, (tx, rx): (LinkTx, LinkRx), ingest: Ingest) -> LocalClient {
        LocalClient {
            id: id.to_string(),
            tx,
            rx,
            ingest,
        }
    }

    /// Subscribes to `filter` (delivered at most once; a source re-reads devices rather than
    /// relying on broker redelivery). The error is boxed: `LinkError` is over 800 bytes.
    pub fn subscribe(&mut self, filter: &str) -> Result<(), Box<LinkError>> {
        // Known before the broker has it: a publish racing the subscription goes to the broker.
        self.ingest.audience().add(&self.id, filter);
        self.tx
            .subscribe(filter.to_string())
            .map(|_| ())
            .map_err(Box::new)
    }

    /// Splits into the publishing and receiving halves.
    pub fn split(self) -> (LocalTx, LocalRx) {
        (
            LocalTx {
                tx: self.tx,
                ingest: self.ingest,
                warned: None,
            },
            LocalRx { rx: self.rx },
        )
    }
}

impl LocalTx {
    /// Publishes `payload` on `topic`; `retain` keeps it as the topic's retained message
    /// (device status, last values). What is meant for the cloud goes to the journal first,
    /// without waiting: when the journal is full the reading is counted as
    /// `dropped{reason="refused"}` (a source re-reads its device; nobody was promised
    /// anything) and still published locally. Waits only if the router's queue is full.
    pub async fn publish(
        &mut self,
        topic: &str,
        payload: impl Into<Bytes>,
        retain: bool,
    ) -> Result<(), Box<LinkError>> {
        let payload: Bytes = payload.into();
        let retain = self
            .ingest
            .admit_retain(topic, &payload, SOURCE_QOS, retain);
        if !self
            .ingest
            .offer_or_count(topic, &payload, SOURCE_QOS, retain)
            && self
                .warned
                .is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(10))
        {
            self.warned = Some(std::time::Instant::now());
            tracing::warn!(
                topic,
                "the queue's journal is full: source readings are not queued for the cloud"
            );
        }
        let packet = if retain {
            // Marked retained, as the front end marks device publishes (see `crate::marks`).
            crate::marks::packet(topic, SOURCE_QOS, payload)
        } else {
            let publish = Publish::new(Bytes::copy_from_slice(topic.as_bytes()), payload, false);
            Packet::Publish(publish, None)
        };
        self.tx.send(packet).await?;
        Ok(())
    }
}

impl LocalRx {
    /// The next message on a subscribed filter. `Err` means the broker is gone (shutdown):
    /// the caller stops.
    pub async fn next(&mut self) -> Result<Inbound, Box<LinkError>> {
        loop {
            match self.rx.next().await? {
                Some(Notification::Forward(f)) => {
                    let Ok(topic) = std::str::from_utf8(&f.publish.topic) else {
                        continue;
                    };
                    return Ok(Inbound {
                        topic: topic.to_string(),
                        payload: f.publish.payload,
                    });
                }
                Some(Notification::Unschedule) => self.rx.wake().await?,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::Broker;
    use crate::frontend::config::BrokerConfig;
    use std::time::Duration;

    #[tokio::test]
    async fn publish_reaches_a_subscriber_with_topic_and_payload() {
        let broker = Broker::build(
            &BrokerConfig::default(),
            Default::default(),
            Ingest::local_only(),
        )
        .expect("broker");
        let mut sub = broker.client("t-sub").expect("link");
        sub.subscribe("field/#").expect("subscribe");
        let (_sub_tx, mut sub_rx) = sub.split();
        let (mut tx, _rx) = broker.client("t-pub").expect("link").split();
        // The subscription is processed by the router asynchronously: publish until it lands.
        let got = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                tx.publish("other/x", "no", false).await.expect("publish");
                tx.publish("field/a/b", "42", false).await.expect("publish");
                if let Ok(m) = tokio::time::timeout(Duration::from_millis(100), sub_rx.next()).await
                {
                    return m.expect("next");
                }
            }
        })
        .await
        .expect("message within 5 s");
        assert_eq!(got.topic, "field/a/b");
        assert_eq!(&got.payload[..], b"42");
    }
}
