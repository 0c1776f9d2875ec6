//! Southbound sources: field devices turned into MQTT messages on the embedded broker.
//!
//! Every source kind lives in its own folder and talks to the broker only through a
//! [`LocalClient`], an in-process rumqttd link. What a source publishes is seen by local
//! subscribers and by the uplink tap like any device's publish, so it reaches the durable queue
//! and the cloud with the same guarantees. Commands (e.g. Modbus writes, serial writes) arrive
//! the same way: the source subscribes to its command filters on its own link, which also
//! carries the cloud's downlink republished locally.
//!
//! Invariants:
//! - a link must be created before the broker's listeners start (see [`crate::broker`]), so
//!   the gateway builds every source's link during start-up;
//! - a link is owned by one task: [`LocalClient::split`] hands the publishing half and the
//!   receiving half to the two sides of that task's `select!`;
//! - the receiving half answers rumqttd's `Unschedule` with a wake-up, so a source that
//!   subscribes but rarely receives is never parked by the router.

pub mod modbus;
pub mod serial;

use bytes::Bytes;
use rumqttd::local::{LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish};
use rumqttd::Notification;

/// An in-process MQTT client of the embedded broker, as one `(LinkTx, LinkRx)` pair.
pub struct LocalClient {
    tx: LinkTx,
    rx: LinkRx,
}

/// The publishing half of a [`LocalClient`].
pub struct LocalTx {
    tx: LinkTx,
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
    /// Wraps a link made by [`crate::broker::Broker::link`].
    pub fn new((tx, rx): (LinkTx, LinkRx)) -> LocalClient {
        LocalClient { tx, rx }
    }

    /// Subscribes to `filter` (delivered at most once; a source re-reads devices rather than
    /// relying on broker redelivery). The error is boxed: `LinkError` is over 800 bytes.
    pub fn subscribe(&mut self, filter: &str) -> Result<(), Box<LinkError>> {
        self.tx
            .subscribe(filter.to_string())
            .map(|_| ())
            .map_err(Box::new)
    }

    /// Splits into the publishing and receiving halves.
    pub fn split(self) -> (LocalTx, LocalRx) {
        (LocalTx { tx: self.tx }, LocalRx { rx: self.rx })
    }
}

impl LocalTx {
    /// Publishes `payload` on `topic`; `retain` keeps it as the topic's retained message
    /// (device status, last values). Waits only if the router's queue is full.
    pub async fn publish(
        &mut self,
        topic: &str,
        payload: impl Into<Bytes>,
        retain: bool,
    ) -> Result<(), Box<LinkError>> {
        let packet = if retain {
            // Marked, so the uplink tap keeps it across restarts (see `crate::retained`).
            crate::retained::packet(topic, 2, payload.into())
        } else {
            let publish = Publish::new(
                Bytes::copy_from_slice(topic.as_bytes()),
                payload.into(),
                false,
            );
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
    use crate::config::BrokerConfig;
    use std::time::Duration;

    #[tokio::test]
    async fn publish_reaches_a_subscriber_with_topic_and_payload() {
        let broker =
            Broker::new(&BrokerConfig::default(), crate::metrics::Metrics::new()).expect("broker");
        let mut sub = LocalClient::new(broker.link("t-sub").expect("link"));
        sub.subscribe("field/#").expect("subscribe");
        let (_sub_tx, mut sub_rx) = sub.split();
        let (mut tx, _rx) = LocalClient::new(broker.link("t-pub").expect("link")).split();
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
