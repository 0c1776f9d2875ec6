//! MQTT 5 peers of the cloud side: a subscriber that keeps every message's properties
//! ([`Collector5`], rumqttc's v5 client over TLS with a client certificate), and a scripted
//! MQTT 5 broker over TLS on loopback that answers chosen PUBLISHes with a PUBACK error
//! reason code ([`ScriptedCloud`]: the quota-exceeded case no stock broker produces on
//! demand). The scripted broker speaks real MQTT 5 (rumqttc's v5 codec) over real TLS; it
//! takes one connection at a time and accepts the next when it ends.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, SubAck, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::{Error as CodecError, QoS};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::Transport;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::pki::Pki;
use super::report::{check, Report};
use super::util::free_port;

/// One message as an MQTT 5 subscriber got it.
#[derive(Debug, Clone)]
pub struct Msg5 {
    pub topic: String,
    pub payload: Vec<u8>,
    /// `message_expiry_interval` as delivered (the broker counts down what it held).
    pub expiry: Option<u32>,
    pub user: Vec<(String, String)>,
}

impl Msg5 {
    /// The value of user property `key`.
    pub fn user(&self, key: &str) -> Option<&str> {
        self.user
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A cloud-side MQTT 5 subscriber (TLS + client certificate) that records every message
/// with its properties; its client publishes commands too.
pub struct Collector5 {
    pub received: Arc<Mutex<Vec<Msg5>>>,
    pub client: AsyncClient,
    stop: CancellationToken,
}

impl Collector5 {
    pub async fn start(pki: &Pki, cloud_port: u16, filter: &str) -> Collector5 {
        let mut o = MqttOptions::new(
            format!("collector5-{}", free_port()),
            "127.0.0.1",
            cloud_port,
        );
        o.set_keep_alive(Duration::from_secs(30));
        o.set_transport(Transport::tls_with_config(pki.client_tls()));
        o.set_max_packet_size(Some(2 * 1024 * 1024));
        let (client, mut el) = AsyncClient::new(o, 100);
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (r2, s2) = (received.clone(), stop.clone());
        let (sub_tx, sub_rx) = tokio::sync::oneshot::channel();
        let mut sub_tx = Some(sub_tx);
        client
            .subscribe_many([Filter::new(filter, QoS::AtLeastOnce)])
            .await
            .unwrap();
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    _ = s2.cancelled() => return,
                    ev = el.poll() => ev,
                };
                match ev {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let props = p.properties.clone();
                        r2.lock().unwrap().push(Msg5 {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload.to_vec(),
                            expiry: props.as_ref().and_then(|p| p.message_expiry_interval),
                            user: props.map(|p| p.user_properties).unwrap_or_default(),
                        });
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = sub_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), sub_rx)
            .await
            .expect("collector5: no SUBACK from the cloud")
            .unwrap();
        Collector5 {
            received,
            client,
            stop,
        }
    }

    /// Waits until `pred` holds on the sequence report, or the deadline passes.
    pub async fn wait_for(&self, within: Duration, pred: impl Fn(&Report) -> bool) -> Report {
        let deadline = Instant::now() + within;
        loop {
            let r = self.report();
            if pred(&r) || Instant::now() > deadline {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The sequence report of everything received so far.
    pub fn report(&self) -> Report {
        let v: Vec<(String, Vec<u8>)> = self
            .received
            .lock()
            .unwrap()
            .iter()
            .map(|m| (m.topic.clone(), m.payload.clone()))
            .collect();
        check(&v)
    }

    /// Messages on one exact topic.
    pub fn on_topic(&self, topic: &str) -> Vec<Msg5> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.topic == topic)
            .cloned()
            .collect()
    }
}

impl Drop for Collector5 {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A scripted MQTT 5 broker over TLS: it accepts every CONNECT and SUBSCRIBE, and answers
/// the first `refuse` QoS 1 PUBLISHes whose topic contains `on` with PUBACK `code`, every
/// other one with success. What it acknowledged with success is in `accepted`, in order.
pub struct ScriptedCloud {
    pub port: u16,
    /// (topic, payload) of every PUBLISH it took, in arrival order.
    pub accepted: super::mqtt::Received,
    /// PUBLISHes it refused.
    pub refused: Arc<AtomicUsize>,
    /// CONNECTs it accepted.
    pub connects: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl ScriptedCloud {
    pub async fn start(pki: &Pki, on: &str, code: u8, refuse: usize) -> ScriptedCloud {
        fieldgate::tls::install_default_provider();
        let certs = fieldgate::tls::certs("server", &pki.server.cert).unwrap();
        let key = fieldgate::tls::private_key("server", &pki.server.key).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(fieldgate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cloud = ScriptedCloud {
            port,
            accepted: Arc::default(),
            refused: Arc::default(),
            connects: Arc::default(),
            stop: CancellationToken::new(),
        };
        let (accepted, refused, connects, stop) = (
            cloud.accepted.clone(),
            cloud.refused.clone(),
            cloud.connects.clone(),
            cloud.stop.clone(),
        );
        let on = on.to_string();
        tokio::spawn(async move {
            loop {
                let tcp = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
                };
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let mut buf = BytesMut::new();
                'conn: loop {
                    let mut out = BytesMut::new();
                    loop {
                        // A DISCONNECT without a body ends the connection (the codec wants one).
                        if buf.starts_with(&[0xE0, 0x00]) {
                            break 'conn;
                        }
                        let p = match Packet::read(&mut buf, None) {
                            Ok(p) => p,
                            Err(CodecError::InsufficientBytes(_)) => break,
                            Err(_) => break 'conn,
                        };
                        match p {
                            Packet::Connect(..) => {
                                connects.fetch_add(1, Ordering::SeqCst);
                                // CONNACK, success, no session, no properties.
                                out.extend_from_slice(&[0x20, 0x03, 0x00, 0x00, 0x00]);
                            }
                            Packet::Subscribe(s) => {
                                let codes = vec![
                                    SubscribeReasonCode::Success(QoS::AtLeastOnce);
                                    s.filters.len()
                                ];
                                Packet::SubAck(SubAck {
                                    pkid: s.pkid,
                                    return_codes: codes,
                                    properties: None,
                                })
                                .write(&mut out, None)
                                .unwrap();
                            }
                            Packet::Publish(p) => {
                                let topic = String::from_utf8_lossy(&p.topic).into_owned();
                                let [hi, lo] = p.pkid.to_be_bytes();
                                if p.qos != QoS::AtLeastOnce {
                                    accepted.lock().unwrap().push((topic, p.payload.to_vec()));
                                } else if topic.contains(&on)
                                    && refused.load(Ordering::SeqCst) < refuse
                                {
                                    refused.fetch_add(1, Ordering::SeqCst);
                                    out.extend_from_slice(&[0x40, 0x03, hi, lo, code]);
                                } else {
                                    accepted.lock().unwrap().push((topic, p.payload.to_vec()));
                                    out.extend_from_slice(&[0x40, 0x02, hi, lo]);
                                }
                            }
                            Packet::PingReq(_) => out.extend_from_slice(&[0xD0, 0x00]),
                            Packet::Disconnect(_) => break 'conn,
                            _ => {}
                        }
                    }
                    if !out.is_empty() && tls.write_all(&out).await.is_err() {
                        break;
                    }
                    let n = tokio::select! {
                        _ = stop.cancelled() => return,
                        n = tls.read_buf(&mut buf) => n,
                    };
                    if !matches!(n, Ok(n) if n > 0) {
                        break;
                    }
                }
                let _ = tls.shutdown().await;
            }
        });
        cloud
    }

    /// The sequence report of what it acknowledged.
    pub fn report(&self) -> Report {
        check(&self.accepted.lock().unwrap())
    }
}

impl Drop for ScriptedCloud {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
