//! The local broker's front end, driven with plain MQTT clients on loopback against the real
//! gateway binary: authentication, ACLs, safe TLS listeners, limits, and the MQTT 3.1.1 rules
//! rumqttd 0.20 breaks on its own (each test here fails against a bare rumqttd listener).

mod common;

use std::process::Stdio;
use std::time::Duration;

use bytes::BytesMut;
use common::*;
use rumqttc::mqttbytes::v4::{self, Packet as P4};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet, QoS,
    TlsConfiguration, Transport,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use toml::{toml, Table};

const WAIT: Duration = Duration::from_secs(10);

/// A gateway without cloud whose `[broker]` section has the keys and tables of `broker`
/// (`[[users]]`, `[acl.default]`, limits) and whose default listener is `listener`.
async fn gateway(broker: Table, listener: Listener) -> (Gateway, tempfile::TempDir) {
    let data = tempfile::tempdir().unwrap();
    (gateway_in(data.path(), broker, listener).await, data)
}

/// [`gateway`] on an existing data directory (for restarts).
async fn gateway_in(data: &std::path::Path, broker: Table, listener: Listener) -> Gateway {
    let ports = GatewayPorts::new();
    // The default listener is anonymous only where `listener` says so.
    let config = GatewayConfig::local(&ports, data)
        .listener("default", ports.mqtt, listener)
        .set("gateway.shutdown_grace", "1s")
        .with("broker", broker);
    Gateway::start(&config.to_toml(), &ports).await
}

/// A listener that lets anonymous clients in.
fn anonymous() -> Listener {
    Listener::new().anonymous()
}

/// `[[broker.users]]` (keys of `[broker]`): these usernames and passwords.
fn users(accounts: &[(&str, &str)]) -> Table {
    let users = accounts
        .iter()
        .map(|(username, password)| toml! { username = (*username) password = (*password) })
        .map(toml::Value::Table)
        .collect::<Vec<_>>();
    toml! { users = (users) }
}

/// Where the MQTT 3.1.1 rule tests connect: the gateway's front end, or, with
/// `FIELDGATE_TEST_PLAIN_RUMQTTD=1`, a bare rumqttd 0.20 listener (to see those tests fail
/// against the behaviour the front end corrects).
async fn rules_target() -> (Option<(Gateway, tempfile::TempDir)>, u16) {
    if std::env::var("FIELDGATE_TEST_PLAIN_RUMQTTD").is_err() {
        let g = gateway(Table::new(), anonymous()).await;
        let port = g.0.mqtt;
        return (Some(g), port);
    }
    let port = free_port();
    spawn_plain_rumqttd(port);
    assert!(
        eventually(WAIT, || std::net::TcpStream::connect(("127.0.0.1", port))
            .is_ok())
        .await
    );
    (None, port)
}

/// `fieldgate passwd` with `password` on stdin.
fn passwd(password: &str) -> String {
    let mut child = fieldgate_command()
        .arg("passwd")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}
use std::io::Write as _;

/// A connected rumqttc client and the packets it receives.
struct Dev {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Packet>,
    /// Publishes that arrived while waiting for something else.
    held: Vec<Packet>,
}

impl Dev {
    /// Next incoming packet matching `f` within the deadline.
    async fn wait<T>(&mut self, mut f: impl FnMut(&Packet) -> Option<T>) -> Option<T> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let p = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .ok()??;
            if let Some(t) = f(&p) {
                return Some(t);
            }
            if matches!(p, Packet::Publish(_)) {
                self.held.push(p);
            }
        }
    }

    async fn suback(&mut self) -> Vec<rumqttc::SubscribeReasonCode> {
        self.wait(|p| match p {
            Packet::SubAck(a) => Some(a.return_codes.clone()),
            _ => None,
        })
        .await
        .expect("no SUBACK")
    }

    /// Publishes at QoS 1 and waits for the PUBACK.
    async fn publish1(&mut self, topic: &str, payload: &str) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec())
            .await
            .unwrap();
        self.wait(|p| matches!(p, Packet::PubAck(_)).then_some(()))
            .await
            .expect("no PUBACK");
    }

    /// Publishes retained at QoS 1 and waits for the PUBACK.
    async fn publish_retained(&mut self, topic: &str, payload: &str) {
        self.client
            .publish(topic, QoS::AtLeastOnce, true, payload.as_bytes().to_vec())
            .await
            .unwrap();
        self.wait(|p| matches!(p, Packet::PubAck(_)).then_some(()))
            .await
            .expect("no PUBACK");
    }

    /// Publishes received within `within` (topic, payload, qos, retain).
    async fn received_retain(&mut self, within: Duration) -> Vec<(String, String, QoS, bool)> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + within;
        let mut held = std::mem::take(&mut self.held).into_iter();
        loop {
            let p = match held.next() {
                Some(p) => p,
                None => match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                    Ok(Some(p)) => p,
                    _ => break,
                },
            };
            if let Packet::Publish(p) = p {
                let payload = String::from_utf8_lossy(&p.payload).into_owned();
                out.push((p.topic.clone(), payload, p.qos, p.retain));
            }
        }
        out
    }

    /// Publishes received within `within` (topic, payload, qos).
    async fn received(&mut self, within: Duration) -> Vec<(String, String, QoS)> {
        let got = self.received_retain(within).await;
        got.into_iter().map(|(t, p, q, _)| (t, p, q)).collect()
    }
}

/// Connects with rumqttc; Err(code) when the broker refused with a CONNACK code.
async fn connect(
    port: u16,
    id: &str,
    login: Option<(&str, &str)>,
    tls: Option<TlsConfiguration>,
    keepalive: Duration,
) -> Result<Dev, ConnectReturnCode> {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(keepalive);
    if let Some((u, p)) = login {
        o.set_credentials(u, p);
    }
    if let Some(t) = tls {
        o.set_transport(Transport::tls_with_config(t));
    }
    connect_with(o).await.map(|(d, _)| d)
}

/// Connects with `o`; the device and CONNACK's session-present flag, or the refusal code.
async fn connect_with(o: MqttOptions) -> Result<(Dev, bool), ConnectReturnCode> {
    let id = o.client_id();
    let (client, mut el) = AsyncClient::new(o, 100);
    let first = tokio::time::timeout(WAIT, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(a))) => return Ok(a.session_present),
                Ok(_) => {}
                Err(ConnectionError::ConnectionRefused(code)) => return Err(code),
                Err(e) => panic!("{id}: connection failed without CONNACK: {e}"),
            }
        }
    })
    .await
    .expect("no CONNACK");
    let session_present = first?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(p)) => {
                    if tx.send(p).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    Ok((
        Dev {
            client,
            rx,
            held: Vec::new(),
        },
        session_present,
    ))
}

/// A persistent (`clean_session = false`) or clean session as `login`.
async fn connect_session(
    port: u16,
    id: &str,
    login: Option<(&str, &str)>,
    clean: bool,
) -> Result<(Dev, bool), ConnectReturnCode> {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(clean);
    if let Some((u, p)) = login {
        o.set_credentials(u, p);
    }
    connect_with(o).await
}

async fn anon(port: u16, id: &str) -> Dev {
    connect(port, id, None, None, Duration::from_secs(30))
        .await
        .unwrap()
}

/// A raw MQTT 3.1.1 connection for the packets rumqttc refuses to send.
struct Raw {
    s: TcpStream,
    buf: BytesMut,
}

impl Raw {
    async fn connect(port: u16, id: &str, keepalive: u16) -> (Raw, Option<P4>) {
        let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut r = Raw {
            s,
            buf: BytesMut::new(),
        };
        let mut c = v4::Connect::new(id);
        c.keep_alive = keepalive;
        r.send(P4::Connect(c)).await;
        let ack = r.recv().await;
        (r, ack)
    }

    async fn send(&mut self, p: P4) {
        let mut out = BytesMut::new();
        p.write(&mut out, usize::MAX).unwrap();
        let _ = self.s.write_all(&out).await;
    }

    /// Opens a connection and sends a CONNECT with any protocol `name` and `level` (clean
    /// session, keepalive 30 s, client id `id`, then `extra` bytes: MQTT 5 properties, say,
    /// in front of the client id); returns the first answer.
    async fn connect_as(
        port: u16,
        name: &str,
        level: u8,
        extra: &[u8],
        id: &str,
    ) -> (Raw, Option<P4>) {
        let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut r = Raw {
            s,
            buf: BytesMut::new(),
        };
        let mut body = Vec::new();
        body.extend_from_slice(&(name.len() as u16).to_be_bytes());
        body.extend_from_slice(name.as_bytes());
        body.extend_from_slice(&[level, 0x02, 0, 30]);
        body.extend_from_slice(extra);
        body.extend_from_slice(&(id.len() as u16).to_be_bytes());
        body.extend_from_slice(id.as_bytes());
        let mut pkt = vec![0x10, body.len() as u8];
        pkt.extend_from_slice(&body);
        let _ = r.s.write_all(&pkt).await;
        let ack = r.recv().await;
        (r, ack)
    }

    /// The next packet; None when the connection closed (or nothing came within WAIT).
    async fn recv(&mut self) -> Option<P4> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match P4::read(&mut self.buf, 1 << 20) {
                Ok(p) => return Some(p),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("bad packet from broker: {e}"),
            }
            match tokio::time::timeout_at(deadline, self.s.read_buf(&mut self.buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        }
    }

    /// True when the broker closed the connection (EOF or reset) within WAIT.
    async fn closed(&mut self) -> bool {
        let mut b = [0u8; 256];
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.s.read(&mut b)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
                Err(_) => return false,
            }
        }
    }
}

fn connack_ok(p: Option<P4>) -> bool {
    matches!(p, Some(P4::ConnAck(a)) if a.code == v4::ConnectReturnCode::Success)
}

// ---------------------------------------------------------------------------------------------
// Authentication

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_unknown_user_and_anonymous_are_refused() {
    let hash = passwd("s3cret");
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    let broker = toml! {
        [[users]]
        username = "plc"
        password_hash = (hash.as_str())
    };
    let (gw, _d) = gateway(broker, Listener::new()).await;
    let port = gw.mqtt;
    let long = Duration::from_secs(30);
    let r = connect(port, "a", Some(("plc", "wrong")), None, long).await;
    assert!(matches!(r, Err(ConnectReturnCode::BadUserNamePassword)));
    let r = connect(port, "b", Some(("nobody", "s3cret")), None, long).await;
    assert!(matches!(r, Err(ConnectReturnCode::BadUserNamePassword)));
    let r = connect(port, "c", None, None, long).await;
    assert!(matches!(r, Err(ConnectReturnCode::NotAuthorized)));
    let mut ok = connect(port, "d", Some(("plc", "s3cret")), None, long)
        .await
        .expect("right password refused");
    ok.publish1("field/plc/x", "1").await;
    assert_eq!(
        gw.metric("fieldgate_broker_refused_total{reason=\"bad_password\"}"),
        1.0
    );
    assert_eq!(
        gw.metric("fieldgate_broker_refused_total{reason=\"unknown_user\"}"),
        1.0
    );
    assert_eq!(
        gw.metric("fieldgate_broker_refused_total{reason=\"anonymous\"}"),
        1.0
    );
}

/// Password guessing from one address is slowed down: after a failed login, the next login
/// attempt from that address waits (`broker.failed_login_delay`, doubling per failure), and
/// each wait is counted. A successful login forgets the failures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_slow_down_their_address() {
    let mut broker = users(&[("plc", "s3cret")]);
    broker.insert("failed_login_delay".into(), "20ms".into());
    let (gw, _d) = gateway(broker, Listener::new()).await;
    let long = Duration::from_secs(30);
    let delayed = || gw.metric("fieldgate_broker_login_delayed_total");
    for i in 0..5 {
        let r = connect(
            gw.mqtt,
            &format!("g{i}"),
            Some(("plc", "guess")),
            None,
            long,
        )
        .await;
        assert!(matches!(r, Err(ConnectReturnCode::BadUserNamePassword)));
    }
    // The first attempt was not delayed, the four after it were.
    assert_eq!(delayed(), 4.0);
    let ok = connect(gw.mqtt, "ok", Some(("plc", "s3cret")), None, long).await;
    assert!(ok.is_ok(), "the right password was refused");
    assert_eq!(delayed(), 5.0);
    // Success forgets: the next failure is not delayed, nor are anonymous attempts.
    let r = connect(gw.mqtt, "g5", Some(("plc", "guess")), None, long).await;
    assert!(matches!(r, Err(ConnectReturnCode::BadUserNamePassword)));
    assert_eq!(delayed(), 5.0);
    assert_eq!(
        gw.metric("fieldgate_broker_refused_total{reason=\"bad_password\"}"),
        6.0
    );
}

// ---------------------------------------------------------------------------------------------
// Authorization

/// `[broker.acl]` (a key of `[broker]`): a device publishes under `field/<its name>/` and
/// reads its own commands; `admin` publishes and reads everything.
fn acl() -> Table {
    toml! {
        [acl.default]
        publish = ["field/%u/#"]
        subscribe = ["cmd/%u/#"]
        [acl.users.admin]
        publish = ["#"]
        subscribe = ["#"]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_is_kept_to_its_acl_while_admin_sees_everything() {
    let mut broker = users(&[("dev1", "p1"), ("admin", "pa")]);
    broker.extend(acl());
    let (gw, _d) = gateway(broker, Listener::new()).await;
    let long = Duration::from_secs(30);
    let mut admin = connect(gw.mqtt, "admin", Some(("admin", "pa")), None, long)
        .await
        .unwrap();
    admin.client.subscribe("#", QoS::AtLeastOnce).await.unwrap();
    assert_eq!(
        admin.suback().await,
        [rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    let mut dev = connect(gw.mqtt, "dev1c", Some(("dev1", "p1")), None, long)
        .await
        .unwrap();
    // Subscribe: own command subtree granted, someone else's and everything refused (0x80).
    dev.client
        .subscribe_many([
            rumqttc::SubscribeFilter::new("cmd/dev1/#".into(), QoS::AtLeastOnce),
            rumqttc::SubscribeFilter::new("cmd/dev2/#".into(), QoS::AtLeastOnce),
            rumqttc::SubscribeFilter::new("#".into(), QoS::AtMostOnce),
        ])
        .await
        .unwrap();
    assert_eq!(
        dev.suback().await,
        [
            rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce),
            rumqttc::SubscribeReasonCode::Failure,
            rumqttc::SubscribeReasonCode::Failure,
        ]
    );
    // Publish: outside the ACL still PUBACKed (3.1.1 has no negative ack) but dropped.
    dev.publish1("field/dev2/temp", "forged").await;
    dev.publish1("field/dev1/temp", "mine").await;
    // The admin publishes a command for dev1 and one for dev2.
    admin.publish1("cmd/dev2/reboot", "no").await;
    admin.publish1("cmd/dev1/reboot", "yes").await;
    let seen = admin.received(Duration::from_secs(1)).await;
    let topics: Vec<&str> = seen.iter().map(|(t, _, _)| t.as_str()).collect();
    assert!(topics.contains(&"field/dev1/temp"), "{seen:?}");
    assert!(!topics.contains(&"field/dev2/temp"), "{seen:?}");
    let got = dev.received(Duration::from_secs(1)).await;
    let got: Vec<&str> = got.iter().map(|(t, _, _)| t.as_str()).collect();
    assert_eq!(got, ["cmd/dev1/reboot"]);
    // Internal topics are the gateway's: not even the admin (publish "#") may forge firmware
    // metadata or chunks for a device; device-side OTA topics stay open.
    admin.publish1("ota/dev1/metadata", "forged").await;
    admin.publish1("ota/dev1/chunk/0", "forged").await;
    admin.publish1("ota/dev1/chunk/get", "{}").await;
    let seen = admin.received(Duration::from_secs(3)).await;
    let topics: Vec<&str> = seen.iter().map(|(t, _, _)| t.as_str()).collect();
    assert!(topics.contains(&"ota/dev1/chunk/get"), "{seen:?}");
    assert!(
        !topics.contains(&"ota/dev1/metadata") && !topics.contains(&"ota/dev1/chunk/0"),
        "{seen:?}"
    );
    // The gateway's own OTA manager still answers on its topics (here: the request was bad).
    assert!(topics.contains(&"ota/dev1/error"), "{seen:?}");
    assert_eq!(
        gw.metric("fieldgate_broker_denied_total{action=\"publish\"}"),
        3.0
    );
    assert_eq!(
        gw.metric("fieldgate_broker_denied_total{action=\"subscribe\"}"),
        2.0
    );
}

/// A session belongs to the identity that made it: another account using its client id is
/// refused (CONNACK 2) and gets none of its queued messages; the owner resumes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_identity_cannot_take_over_a_session() {
    let mut broker = users(&[("dev1", "p1"), ("dev2", "p2"), ("admin", "pa")]);
    broker.extend(acl());
    let (gw, _d) = gateway(broker, Listener::new()).await;
    let (mut dev2, present) = connect_session(gw.mqtt, "dev2", Some(("dev2", "p2")), false)
        .await
        .unwrap();
    assert!(!present);
    dev2.client
        .subscribe("cmd/dev2/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    dev2.suback().await;
    dev2.client.disconnect().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut admin = connect(gw.mqtt, "admin", Some(("admin", "pa")), None, WAIT)
        .await
        .unwrap();
    for i in 0..4 {
        admin.publish1(&format!("cmd/dev2/{i}"), "for dev2").await;
    }
    // dev1 claims dev2's client id, persistent or clean: refused, nothing delivered.
    for clean in [false, true] {
        let r = connect_session(gw.mqtt, "dev2", Some(("dev1", "p1")), clean).await;
        assert!(
            matches!(r, Err(ConnectReturnCode::BadClientId)),
            "clean {clean}: {:?}",
            r.as_ref().map(|(_, p)| *p)
        );
    }
    assert_eq!(
        gw.metric("fieldgate_broker_refused_total{reason=\"client_id_owned\"}"),
        2.0
    );
    // The owner resumes its session and gets all four.
    let (mut dev2, present) = connect_session(gw.mqtt, "dev2", Some(("dev2", "p2")), false)
        .await
        .unwrap();
    assert!(present);
    let got = dev2.received(Duration::from_secs(2)).await;
    assert_eq!(got.len(), 4, "{got:?}");
    // Once the owner ends its session cleanly, the client id is free again.
    dev2.client.disconnect().await.unwrap();
    drop(dev2);
    let (dev2, _) = connect_session(gw.mqtt, "dev2", Some(("dev2", "p2")), true)
        .await
        .unwrap();
    dev2.client.disconnect().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(connect_session(gw.mqtt, "dev2", Some(("dev1", "p1")), true)
        .await
        .is_ok());
}

/// `client_id_pattern` ties client ids to identities: `%u-*` lets dev1 use `dev1-...` only,
/// and an anonymous client (no `%u`) none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_id_pattern_ties_client_ids_to_identities() {
    let mut broker = users(&[("dev1", "p1")]);
    broker.insert("client_id_pattern".into(), "%u-*".into());
    let (gw, _d) = gateway(broker, anonymous()).await;
    assert!(
        connect_session(gw.mqtt, "dev1-a", Some(("dev1", "p1")), true)
            .await
            .is_ok()
    );
    for (id, login) in [
        ("dev2-a", Some(("dev1", "p1"))),
        ("dev1", Some(("dev1", "p1"))),
        ("dev1-a", None),
    ] {
        let r = connect_session(gw.mqtt, id, login, true).await;
        assert!(
            matches!(r, Err(ConnectReturnCode::BadClientId)),
            "{id} as {login:?}: accepted"
        );
    }
    assert_eq!(
        gw.metric("fieldgate_broker_refused_total{reason=\"client_id_pattern\"}"),
        3.0
    );
}

// ---------------------------------------------------------------------------------------------
// TLS listeners

/// A TLS listener with the test server certificate; client certificates signed by the test
/// CA, `client_cert` saying whether one is needed.
fn tls_listener(pki: &Pki, client_cert: &str) -> Listener {
    Listener::new()
        .tls(&pki.server)
        .client_certs(&pki.ca, client_cert)
}

fn device_tls(pki: &Pki, with_cert: bool) -> TlsConfiguration {
    TlsConfiguration::Simple {
        ca: std::fs::read(&pki.ca).unwrap(),
        alpn: None,
        client_auth: with_cert.then(|| {
            (
                std::fs::read(&pki.client.cert).unwrap(),
                std::fs::read(&pki.client.key).unwrap(),
            )
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_tls_handshake_does_not_block_other_clients() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pki = Pki::new();
    let listener = tls_listener(&pki, "none").anonymous();
    let (gw, _d) = gateway(toml! { tls_handshake_timeout = "1s" }, listener).await;
    // An idle TCP client on the TLS port: sends nothing.
    let mut idle = TcpStream::connect(("127.0.0.1", gw.mqtt)).await.unwrap();
    let mut idle2 = TcpStream::connect(("127.0.0.1", gw.mqtt)).await.unwrap();
    let mut dev = connect(
        gw.mqtt,
        "tls-dev",
        None,
        Some(device_tls(&pki, false)),
        Duration::from_secs(30),
    )
    .await
    .expect("a TLS client was blocked or refused");
    dev.publish1("field/x", "1").await;
    // And the idle ones are dropped after the handshake timeout.
    let mut b = [0u8; 16];
    for s in [&mut idle, &mut idle2] {
        let r = tokio::time::timeout(WAIT, s.read(&mut b)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "idle client not dropped"
        );
    }
    assert!(
        eventually(WAIT, || gw.metric(
            "fieldgate_broker_refused_total{reason=\"tls_handshake_timeout\"}"
        ) == 2.0)
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_cn_is_the_identity_and_a_missing_one_is_refused() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pki = Pki::new();
    // The test client certificate's CN is "client".
    let acl = toml! {
        [acl.default]
        publish = ["field/%u/#"]
        subscribe = ["field/%u/#"]
    };
    let (gw, _d) = gateway(acl, tls_listener(&pki, "required")).await;
    let long = Duration::from_secs(30);
    let r = connect(gw.mqtt, "nocert", None, Some(device_tls(&pki, false)), long).await;
    assert!(
        matches!(r, Err(ConnectReturnCode::NotAuthorized)),
        "{:?}",
        r.err()
    );
    let mut dev = connect(
        gw.mqtt,
        "withcert",
        None,
        Some(device_tls(&pki, true)),
        long,
    )
    .await
    .expect("a device with a valid certificate was refused");
    dev.client
        .subscribe("field/client/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    assert_eq!(
        dev.suback().await,
        [rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    dev.publish1("field/other/x", "denied").await;
    dev.publish1("field/client/x", "allowed").await;
    let got = dev.received(Duration::from_secs(1)).await;
    let got: Vec<&str> = got.iter().map(|(t, _, _)| t.as_str()).collect();
    assert_eq!(got, ["field/client/x"]);
    assert_eq!(
        gw.metric("fieldgate_broker_refused_total{reason=\"no_certificate\"}"),
        1.0
    );
}

// ---------------------------------------------------------------------------------------------
// Limits

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_and_packet_limits_hold() {
    let limits = toml! { max_connections_per_ip = 2 max_payload_size = 2048 };
    let (gw, _d) = gateway(limits, anonymous()).await;
    let (_a, ack) = Raw::connect(gw.mqtt, "a", 30).await;
    assert!(connack_ok(ack));
    let (mut b, ack) = Raw::connect(gw.mqtt, "b", 30).await;
    assert!(connack_ok(ack));
    let (mut c, ack) = Raw::connect(gw.mqtt, "c", 30).await;
    assert!(ack.is_none(), "third connection from one IP was served");
    assert!(c.closed().await);
    // Too large a packet closes the connection.
    b.send(P4::Publish(v4::Publish::new(
        "field/x",
        rumqttc::QoS::AtMostOnce,
        vec![b'x'; 4096],
    )))
    .await;
    assert!(
        b.closed().await,
        "oversized packet did not close the connection"
    );
    assert_eq!(
        gw.metric("fieldgate_broker_refused_total{reason=\"max_connections_per_ip\"}"),
        1.0
    );
    assert!(
        eventually(WAIT, || gw
            .metric("fieldgate_broker_closed_total{reason=\"too_large\"}")
            == 1.0)
        .await
    );
}

/// Sends `n` QoS 1 PUBLISHes on `topic` (payload = sequence number) in one write.
async fn burst(r: &mut Raw, topic: &str, n: u16) {
    let mut out = BytesMut::new();
    for i in 1..=n {
        let mut p = v4::Publish::new(topic, rumqttc::QoS::AtLeastOnce, i.to_string());
        p.pkid = i;
        P4::Publish(p).write(&mut out, usize::MAX).unwrap();
    }
    r.s.write_all(&out).await.unwrap();
}

/// Counts PUBACKs until `n` arrived or the connection closed.
async fn pubacks(r: &mut Raw, n: usize) -> usize {
    let mut got = 0;
    while got < n {
        match r.recv().await {
            Some(P4::PubAck(_)) => got += 1,
            Some(_) => {}
            None => break,
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_rate_limit_policies() {
    let limited = |policy: &str| {
        toml! { max_publish_rate = 20 publish_burst = 5 rate_limit_policy = (policy) }
    };
    let (c1, c2, c3) = (limited("slow_down"), limited("drop"), limited("disconnect"));
    let ((slow, _d1), (drop, _d2), (cut, _d3)) = tokio::join!(
        gateway(c1, anonymous()),
        gateway(c2, anonymous()),
        gateway(c3, anonymous()),
    );

    // slow_down: every message arrives, in order; the device was only read more slowly.
    let mut sub = anon(slow.mqtt, "sub").await;
    sub.client
        .subscribe("rate/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    sub.suback().await;
    let (mut r, ack) = Raw::connect(slow.mqtt, "fast", 30).await;
    assert!(connack_ok(ack));
    burst(&mut r, "rate/slow", 30).await;
    assert_eq!(pubacks(&mut r, 30).await, 30);
    let mut seqs = Vec::new();
    for _ in 0..20 {
        seqs.extend(
            sub.received(Duration::from_millis(500))
                .await
                .into_iter()
                .map(|(_, p, _)| p.parse::<u16>().unwrap()),
        );
        if seqs.len() >= 30 {
            break;
        }
    }
    assert_eq!(seqs, (1..=30).collect::<Vec<_>>());
    assert!(slow.metric("fieldgate_broker_rate_limited_total{policy=\"slow_down\"}") >= 1.0);

    // drop: every publish is acknowledged, the excess is dropped and counted.
    let mut sub = anon(drop.mqtt, "sub").await;
    sub.client
        .subscribe("rate/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    sub.suback().await;
    let (mut r, ack) = Raw::connect(drop.mqtt, "fast", 30).await;
    assert!(connack_ok(ack));
    burst(&mut r, "rate/drop", 100).await;
    assert_eq!(pubacks(&mut r, 100).await, 100);
    let dropped = || drop.metric("fieldgate_broker_rate_limited_total{policy=\"drop\"}");
    let mut delivered = 0;
    for _ in 0..20 {
        delivered += sub.received(Duration::from_millis(300)).await.len();
        if delivered as f64 + dropped() == 100.0 {
            break;
        }
    }
    assert!(delivered >= 5, "the burst was not let through: {delivered}");
    assert!(delivered < 100, "nothing was dropped");
    assert_eq!(delivered as f64 + dropped(), 100.0);

    // disconnect: the connection is closed once the device is over the rate.
    let (mut r, ack) = Raw::connect(cut.mqtt, "fast", 30).await;
    assert!(connack_ok(ack));
    burst(&mut r, "rate/cut", 100).await;
    let acked = pubacks(&mut r, 100).await;
    assert!(acked < 100, "all {acked} publishes were taken");
    assert!(r.closed().await);
    assert!(
        eventually(WAIT, || cut
            .metric("fieldgate_broker_closed_total{reason=\"rate_limited\"}")
            == 1.0)
        .await
    );
}

// ---------------------------------------------------------------------------------------------
// MQTT 3.1.1 rules rumqttd breaks

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_zero_is_accepted() {
    let (_gw, port) = rules_target().await;
    let (mut r, ack) = Raw::connect(port, "ka0", 0).await;
    assert!(connack_ok(ack), "keepalive 0 refused");
    r.send(P4::PingReq).await;
    assert!(matches!(r.recv().await, Some(P4::PingResp)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_topic_names_close_the_connection() {
    let (_gw, port) = rules_target().await;
    for topic in ["a/+", "a/#", ""] {
        let (mut r, ack) = Raw::connect(port, "badtopic", 30).await;
        assert!(connack_ok(ack));
        let mut p = v4::Publish::new(topic, rumqttc::QoS::AtLeastOnce, "x");
        p.pkid = 1;
        r.send(P4::Publish(p)).await;
        assert!(
            r.closed().await,
            "PUBLISH to {topic:?} did not close the connection"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_filters_get_a_failure_return_code() {
    let (_gw, port) = rules_target().await;
    let (mut r, ack) = Raw::connect(port, "badfilter", 30).await;
    assert!(connack_ok(ack));
    let mut s = v4::Subscribe::new("a/#/b", rumqttc::QoS::AtLeastOnce);
    s.add("a/b+".into(), rumqttc::QoS::AtMostOnce);
    s.add("a/+/b".into(), rumqttc::QoS::AtLeastOnce);
    s.pkid = 3;
    r.send(P4::Subscribe(s)).await;
    match r.recv().await {
        Some(P4::SubAck(a)) => assert_eq!(
            a.return_codes,
            [
                v4::SubscribeReasonCode::Failure,
                v4::SubscribeReasonCode::Failure,
                v4::SubscribeReasonCode::Success(rumqttc::QoS::AtLeastOnce),
            ]
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

/// A device that drops its connection and reconnects at once with the same client id, over
/// and over (flaky Wi-Fi, a watchdog reset). With rumqttd 0.20 alone the old connection's
/// late disconnect can kill the new one during CONNECT, which leaves a stale will handler;
/// the next reconnect then panics on it and poisons the listener for every later client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reconnects_with_one_client_id_keep_the_broker_healthy() {
    let (_gw, port) = rules_target().await;
    let mut refused = Vec::new();
    for i in 0..150 {
        let (mut r, ack) = Raw::connect(port, "flappy", 30).await;
        if !connack_ok(ack.clone()) {
            refused.push((i, ack));
            continue;
        }
        if i % 3 == 0 {
            // Sometimes a publish first, so the session is in use when it is cut.
            let mut p = v4::Publish::new("flappy/x", rumqttc::QoS::AtLeastOnce, "x");
            p.pkid = 1;
            r.send(P4::Publish(p)).await;
        }
        drop(r); // no DISCONNECT: an abrupt loss
    }
    assert!(refused.is_empty(), "reconnects refused: {refused:?}");
    // Takeover: a second live connection with the same id closes the first (MQTT-3.1.4-2).
    let (mut first, ack) = Raw::connect(port, "twin", 30).await;
    assert!(connack_ok(ack));
    let (_second, ack) = Raw::connect(port, "twin", 30).await;
    assert!(connack_ok(ack));
    assert!(
        first.closed().await,
        "the older connection was not taken over"
    );
    let mut ok = anon(port, "still-served-after-flapping").await;
    ok.publish1("any/topic", "x").await;
}

/// rumqttd 0.20's router reuses a freed connection id at once (a slab), and a connection
/// that ends with DISCONNECT can be freed twice: once by the router when it reads the
/// DISCONNECT, once more by the connection's task when it sees the socket close. A second
/// free that lands after another client's CONNECT took the id drops that client, whatever
/// its client id ("router-drop" in rumqttd's log). Clients with distinct ids come and go
/// with DISCONNECT side by side here; every one must get its CONNACK and SUBACK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_disconnects_never_drop_another_clients_connection() {
    let (gw, port) = rules_target().await;
    let workers: Vec<_> = (0..4)
        .map(|w| {
            tokio::spawn(async move {
                let mut failed = Vec::new();
                for i in 0..60 {
                    let id = format!("churn-{w}-{i}");
                    let (mut r, ack) = Raw::connect(port, &id, 30).await;
                    if !connack_ok(ack.clone()) {
                        failed.push(format!("{id}: CONNACK {ack:?}"));
                        continue;
                    }
                    let mut s = v4::Subscribe::new("churn/x", rumqttc::QoS::AtLeastOnce);
                    s.pkid = 1;
                    r.send(P4::Subscribe(s)).await;
                    match r.recv().await {
                        Some(P4::SubAck(_)) => {}
                        other => failed.push(format!("{id}: no SUBACK, got {other:?}")),
                    }
                    r.send(P4::Disconnect).await;
                }
                failed
            })
        })
        .collect();
    let mut failed = Vec::new();
    for w in workers {
        failed.extend(w.await.unwrap());
    }
    let log = gw.map(|(g, _)| g.log_text()).unwrap_or_default();
    assert!(
        failed.is_empty(),
        "{} of 240 sessions failed: {failed:?}\n--- gateway log ---\n{log}",
        failed.len()
    );
}

/// Found by the fuzz test below: rumqttd 0.20's router silently drops a connection whose
/// client id holds `/`, `+`, `#` or `$`, leaving that id's will handler behind; the next
/// CONNECT with the same id panics the connection task on it and poisons a mutex every
/// later connection takes, so no new client gets in any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ids_the_router_cannot_take_are_refused_without_harm() {
    let (_gw, port) = rules_target().await;
    for _ in 0..2 {
        for id in ["a/b", "x+y", "s#", "$sys", "nul\0id"] {
            let (mut r, ack) = Raw::connect(port, id, 30).await;
            assert!(
                matches!(&ack, Some(P4::ConnAck(a)) if a.code == v4::ConnectReturnCode::BadClientId),
                "{id}: {ack:?}"
            );
            assert!(r.closed().await);
        }
    }
    let mut ok = anon(port, "still-served").await;
    ok.publish1("any/topic", "x").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connect_closes_the_connection() {
    let (_gw, port) = rules_target().await;
    let (mut r, ack) = Raw::connect(port, "twice", 30).await;
    assert!(connack_ok(ack));
    r.send(P4::Connect(v4::Connect::new("twice"))).await;
    assert!(
        r.closed().await,
        "second CONNECT did not close the connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_qos_is_the_minimum_of_published_and_granted() {
    let (_gw, port) = rules_target().await;
    let mut sub = anon(port, "sub").await;
    sub.client.subscribe("q/#", QoS::ExactlyOnce).await.unwrap();
    sub.suback().await;
    let publ = anon(port, "pub").await;
    for (t, q) in [
        ("q/0", QoS::AtMostOnce),
        ("q/1", QoS::AtLeastOnce),
        ("q/2", QoS::ExactlyOnce),
    ] {
        publ.client.publish(t, q, false, "x").await.unwrap();
    }
    let mut got = sub.received(Duration::from_secs(2)).await;
    got.sort_by(|a, b| a.0.cmp(&b.0));
    let qos: Vec<(&str, QoS)> = got.iter().map(|(t, _, q)| (t.as_str(), *q)).collect();
    assert_eq!(
        qos,
        [
            ("q/0", QoS::AtMostOnce),
            ("q/1", QoS::AtLeastOnce),
            ("q/2", QoS::ExactlyOnce)
        ]
    );
    // A QoS 1 subscriber gets QoS 2 publishes at QoS 1, and acknowledging them completes
    // the flow (the next one still arrives).
    let mut sub1 = anon(port, "sub1").await;
    sub1.client
        .subscribe("r/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    sub1.suback().await;
    for i in 0..3 {
        publ.client
            .publish(format!("r/{i}"), QoS::ExactlyOnce, false, "y")
            .await
            .unwrap();
    }
    let got = sub1.received(Duration::from_secs(2)).await;
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(
        got.iter().all(|(_, _, q)| *q == QoS::AtLeastOnce),
        "{got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_retry_before_pubrel_is_delivered_once() {
    let (_gw, port) = rules_target().await;
    let mut sub = anon(port, "sub2").await;
    sub.client
        .subscribe("once/#", QoS::ExactlyOnce)
        .await
        .unwrap();
    sub.suback().await;
    let (mut r, ack) = Raw::connect(port, "q2pub", 30).await;
    assert!(connack_ok(ack));
    let mut p = v4::Publish::new("once/x", rumqttc::QoS::ExactlyOnce, "payload");
    p.pkid = 9;
    r.send(P4::Publish(p.clone())).await;
    assert!(matches!(r.recv().await, Some(P4::PubRec(a)) if a.pkid == 9));
    p.dup = true;
    r.send(P4::Publish(p)).await;
    assert!(matches!(r.recv().await, Some(P4::PubRec(a)) if a.pkid == 9));
    r.send(P4::PubRel(v4::PubRel::new(9))).await;
    assert!(matches!(r.recv().await, Some(P4::PubComp(a)) if a.pkid == 9));
    // A PUBREL retried (it must be handled idempotently) releases nothing more.
    r.send(P4::PubRel(v4::PubRel::new(9))).await;
    assert!(matches!(r.recv().await, Some(P4::PubComp(a)) if a.pkid == 9));
    let got = sub.received(Duration::from_secs(2)).await;
    assert_eq!(got.len(), 1, "delivered {} times: {got:?}", got.len());
}

// ---------------------------------------------------------------------------------------------
// State across restarts.

/// Retained messages as a fresh subscriber to `filter` sees them, sorted by topic.
async fn retained_view(port: u16, id: &str, filter: &str) -> Vec<(String, String, QoS, bool)> {
    let mut sub = anon(port, id).await;
    sub.client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .unwrap();
    sub.suback().await;
    let mut got = sub.received_retain(Duration::from_secs(2)).await;
    got.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_status_survives_a_gateway_restart() {
    let data = tempfile::tempdir().unwrap();
    let gw = gateway_in(data.path(), Table::new(), anonymous()).await;
    let mut dev = anon(gw.mqtt, "dev").await;
    let publish = |topic: &'static str, qos: QoS, retain: bool, payload: &'static str| {
        let c = dev.client.clone();
        async move { c.publish(topic, qos, retain, payload).await.unwrap() }
    };
    publish("status/dev1", QoS::AtLeastOnce, true, "online").await;
    publish("status/dev2", QoS::AtMostOnce, true, "idle").await;
    publish("status/dev3", QoS::AtLeastOnce, true, "x").await;
    // An empty retained publish deletes the kept message; a plain one is not kept.
    publish("status/dev3", QoS::AtLeastOnce, true, "").await;
    publish("status/dev4", QoS::AtLeastOnce, false, "live").await;
    // rumqttd 0.20 also drops a retained message on an empty publish without the flag; the
    // kept copy follows it, so what a restart brings back is what was there before.
    publish("status/dev5", QoS::AtLeastOnce, true, "r").await;
    publish("status/dev5", QoS::AtLeastOnce, false, "").await;
    let mut acks = 0;
    while acks < 6 {
        dev.wait(|p| matches!(p, Packet::PubAck(_)).then_some(()))
            .await
            .expect("no PUBACK");
        acks += 1;
    }
    let want = vec![
        (
            "status/dev1".to_string(),
            "online".to_string(),
            QoS::AtLeastOnce,
            true,
        ),
        (
            "status/dev2".to_string(),
            "idle".to_string(),
            QoS::AtMostOnce,
            true,
        ),
    ];
    assert_eq!(retained_view(gw.mqtt, "before", "status/#").await, want);
    // No cloud: every publish stays queued, which shows what the restart adds to the queue.
    assert!(eventually(WAIT, || gw.metric("fieldgate_queue_records") == 7.0).await);
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");

    let gw = gateway_in(data.path(), Table::new(), anonymous()).await;
    assert_eq!(retained_view(gw.mqtt, "after", "status/#").await, want);
    assert!(gw.log_text().contains("retained messages restored"));
    // Restored messages were queued for the cloud in the run that took them: not again.
    assert!(eventually(WAIT, || gw.metric("fieldgate_queue_records") == 7.0).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(gw.metric("fieldgate_queue_records"), 7.0);
    assert_eq!(gw.metric("fieldgate_broker_retained"), 2.0);

    // Changes after the restart are kept too, across a second restart.
    let dev = anon(gw.mqtt, "dev-again").await;
    dev.client
        .publish("status/dev1", QoS::AtLeastOnce, true, "offline")
        .await
        .unwrap();
    dev.client
        .publish("status/dev2", QoS::AtLeastOnce, true, "")
        .await
        .unwrap();
    let changed = vec![(
        "status/dev1".to_string(),
        "offline".to_string(),
        QoS::AtLeastOnce,
        true,
    )];
    let mut seen = Vec::new();
    for i in 0..20 {
        seen = retained_view(gw.mqtt, &format!("poll{i}"), "status/#").await;
        if seen == changed {
            break;
        }
    }
    assert_eq!(seen, changed);
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
    let gw = gateway_in(data.path(), Table::new(), anonymous()).await;
    assert_eq!(retained_view(gw.mqtt, "third", "status/#").await, changed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_sessions_hold_while_the_gateway_runs_and_end_with_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let gw = gateway_in(data.path(), Table::new(), anonymous()).await;
    let persistent = |port: u16| {
        let mut o = MqttOptions::new("sleepy", "127.0.0.1", port);
        o.set_clean_session(false);
        o.set_keep_alive(Duration::from_secs(30));
        o
    };
    // Within one gateway run: subscriptions and QoS 1 messages missed while away are kept.
    let (c, mut el) = AsyncClient::new(persistent(gw.mqtt), 10);
    let first = next_connack(&mut el).await;
    assert!(!first.session_present);
    c.subscribe("cmd/sleepy/#", QoS::AtLeastOnce).await.unwrap();
    wait_suback(&mut el).await;
    c.disconnect().await.unwrap();
    let _ = tokio::time::timeout(WAIT, async { while el.poll().await.is_ok() {} }).await;
    let mut publ = anon(gw.mqtt, "pub").await;
    publ.publish1("cmd/sleepy/a", "while-away").await;
    let (_c, mut el) = AsyncClient::new(persistent(gw.mqtt), 10);
    let again = next_connack(&mut el).await;
    assert!(again.session_present, "session not kept within one run");
    let got = next_publishes(&mut el, 1).await;
    assert_eq!(
        got,
        vec![("cmd/sleepy/a".to_string(), "while-away".to_string())]
    );
    drop(el);
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");

    // After a gateway restart the session is gone (documented in the README): the device
    // sees session_present = false, must subscribe again, and gets what comes after that.
    let gw = gateway_in(data.path(), Table::new(), anonymous()).await;
    let (c, mut el) = AsyncClient::new(persistent(gw.mqtt), 10);
    let after = next_connack(&mut el).await;
    assert!(!after.session_present, "a session survived the restart");
    let mut publ = anon(gw.mqtt, "pub").await;
    publ.publish1("cmd/sleepy/b", "before-resubscribe").await;
    c.subscribe("cmd/sleepy/#", QoS::AtLeastOnce).await.unwrap();
    wait_suback(&mut el).await;
    publ.publish1("cmd/sleepy/c", "after-resubscribe").await;
    let got = next_publishes(&mut el, 1).await;
    assert_eq!(
        got,
        vec![("cmd/sleepy/c".to_string(), "after-resubscribe".to_string())]
    );
}

/// A queued publish no local client can receive is answered without rumqttd; one that a
/// local reader may receive (a persistent session while it is away, a live subscriber, the
/// gateway's own links) still reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_without_local_readers_skip_the_broker_and_readers_still_get_theirs() {
    let data = tempfile::tempdir().unwrap();
    let gw = gateway_in(data.path(), Table::new(), anonymous()).await;
    let bypassed = || gw.metric("fieldgate_broker_bypassed_total");
    let mut publ = anon(gw.mqtt, "pub").await;
    publ.publish1("plant/a/temp", "nobody reads this").await;
    assert_eq!(bypassed(), 1.0, "{}", gw.log_text());

    // A persistent subscriber that goes away keeps its filter: the publish goes to rumqttd,
    // which holds it for the session.
    let persistent = |port: u16| {
        let mut o = MqttOptions::new("away", "127.0.0.1", port);
        o.set_clean_session(false);
        o.set_keep_alive(Duration::from_secs(30));
        o
    };
    let (c, mut el) = AsyncClient::new(persistent(gw.mqtt), 10);
    next_connack(&mut el).await;
    c.subscribe("plant/#", QoS::AtLeastOnce).await.unwrap();
    wait_suback(&mut el).await;
    c.disconnect().await.unwrap();
    let _ = tokio::time::timeout(WAIT, async { while el.poll().await.is_ok() {} }).await;
    publ.publish1("plant/a/temp", "while-away").await;
    let (c, mut el) = AsyncClient::new(persistent(gw.mqtt), 10);
    assert!(next_connack(&mut el).await.session_present);
    assert_eq!(
        next_publishes(&mut el, 1).await,
        vec![("plant/a/temp".to_string(), "while-away".to_string())]
    );
    // Live, it gets the next one too; neither went around rumqttd.
    publ.publish1("plant/b/temp", "live").await;
    assert_eq!(
        next_publishes(&mut el, 1).await,
        vec![("plant/b/temp".to_string(), "live".to_string())]
    );
    assert_eq!(bypassed(), 1.0);

    // Once it unsubscribes (and the session is cleaned) nobody reads `plant/` again.
    c.unsubscribe("plant/#").await.unwrap();
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while el.poll().await.is_ok() {}
    })
    .await;
    publ.publish1("plant/c/temp", "nobody again").await;
    assert_eq!(bypassed(), 2.0);
    // The gateway's own links count as readers: the OTA manager listens on `ota/+/request`.
    publ.publish1("ota/dev9/request", "{}").await;
    assert_eq!(
        bypassed(),
        2.0,
        "a publish the OTA manager reads went around rumqttd"
    );
}

async fn next_connack(el: &mut rumqttc::EventLoop) -> rumqttc::ConnAck {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Event::Incoming(Packet::ConnAck(a)) = el.poll().await.unwrap() {
                return a;
            }
        }
    })
    .await
    .expect("no CONNACK")
}

async fn wait_suback(el: &mut rumqttc::EventLoop) {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Event::Incoming(Packet::SubAck(_)) = el.poll().await.unwrap() {
                return;
            }
        }
    })
    .await
    .expect("no SUBACK")
}

/// The first `n` publishes (topic, payload); panics if they do not come within WAIT.
async fn next_publishes(el: &mut rumqttc::EventLoop, n: usize) -> Vec<(String, String)> {
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, async {
        while out.len() < n {
            if let Event::Incoming(Packet::Publish(p)) = el.poll().await.unwrap() {
                out.push((
                    p.topic.clone(),
                    String::from_utf8_lossy(&p.payload).into_owned(),
                ));
            }
        }
    })
    .await
    .expect("publishes did not arrive");
    out
}

// ---------------------------------------------------------------------------------------------
// Fuzzing the listener path.

/// A valid 3.1.1 session as bytes: CONNECT, SUBSCRIBE, PUBLISH at each QoS, PUBREL, PINGREQ,
/// UNSUBSCRIBE, DISCONNECT. The fuzzer mutates it, so most inputs get past CONNECT.
fn valid_session() -> Vec<u8> {
    let mut out = BytesMut::new();
    let mut c = v4::Connect::new("fuzz");
    c.keep_alive = 5;
    let mut sub = v4::Subscribe::new("fuzz/#", rumqttc::QoS::ExactlyOnce);
    sub.pkid = 1;
    let mut p1 = v4::Publish::new("fuzz/a", rumqttc::QoS::AtLeastOnce, "one");
    p1.pkid = 2;
    let mut p2 = v4::Publish::new("fuzz/b", rumqttc::QoS::ExactlyOnce, "two");
    p2.pkid = 3;
    let mut unsub = v4::Unsubscribe::new("fuzz/#");
    unsub.pkid = 4;
    for p in [
        P4::Connect(c),
        P4::Subscribe(sub),
        P4::Publish(v4::Publish::new("fuzz/z", rumqttc::QoS::AtMostOnce, "zero")),
        P4::Publish(p1),
        P4::Publish(p2),
        P4::PubRel(v4::PubRel::new(3)),
        P4::PingReq,
        P4::Unsubscribe(unsub),
        P4::Disconnect,
    ] {
        p.write(&mut out, usize::MAX).unwrap();
    }
    out.to_vec()
}

/// One fuzz input: raw bytes, or the valid session with bytes flipped, cut and inserted.
fn fuzz_input() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    use proptest::prelude::*;
    let random = proptest::collection::vec(any::<u8>(), 0..600);
    let mutated = (
        proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        any::<prop::sample::Index>(),
    )
        .prop_map(|(flips, inserts, cut)| {
            let mut v = valid_session();
            for (i, b) in flips {
                let at = i.index(v.len());
                v[at] = b;
            }
            for (i, b) in inserts {
                let at = i.index(v.len());
                v.insert(at, b);
            }
            let keep = cut.index(v.len()) + 1;
            v.truncate(keep.max(v.len() / 2));
            v
        });
    prop_oneof![1 => random, 3 => mutated]
}

/// Malformed packets on the device listener: no panic, no hang, a well-behaved client on the
/// same listener keeps working, and every fuzz connection is let go. Cases:
/// `FIELDGATE_FUZZ_CASES` (default 300, which CI runs).
#[test]
fn listener_path_survives_malformed_packets() {
    use proptest::strategy::{Strategy, ValueTree};
    use proptest::test_runner::{Config, TestRunner};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cases: u32 = std::env::var("FIELDGATE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let (gw, _d) = rt.block_on(gateway(
        toml! { connect_timeout = "1s" max_payload_size = 4096 },
        anonymous(),
    ));
    let port = gw.mqtt;
    let mut control = rt.block_on(anon(port, "control"));
    rt.block_on(async {
        control
            .client
            .subscribe("ctl/#", QoS::AtLeastOnce)
            .await
            .unwrap();
        control.suback().await;
    });
    // Inputs are drawn from the strategy without shrinking: a failure prints its input.
    let mut runner = TestRunner::new(Config {
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = fuzz_input();
    for round in 1..=cases {
        let bytes = strategy.new_tree(&mut runner).unwrap().current();
        rt.block_on(async {
            let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let _ = s.write_all(&bytes).await;
            if round % 2 == 0 {
                // Half the inputs end with EOF, half leave the connection open mid-packet.
                let _ = s.shutdown().await;
            }
            // Read whatever comes back until the gateway closes or a short while passed.
            let mut b = [0u8; 1024];
            let deadline = tokio::time::Instant::now() + Duration::from_millis(200);
            while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, s.read(&mut b)).await {
                if n == 0 {
                    break;
                }
            }
        });
        if round % 25 == 0 {
            // The well-behaved client is still served.
            let payload = format!("alive-{round}");
            let got = rt.block_on(async {
                control.publish1("ctl/ping", &payload).await;
                control.received(Duration::from_millis(500)).await
            });
            assert!(
                got.iter().any(|(t, p, _)| t == "ctl/ping" && *p == payload),
                "control client not served after input {round} ({bytes:02x?}): {got:?}\n\
                 --- gateway log ---\n{}",
                gw.log_text()
            );
        }
    }
    // Every fuzz connection is let go (by EOF, violation, connect or keepalive timeout):
    // only the control client stays.
    let settled = rt.block_on(eventually(Duration::from_secs(20), || {
        gw.metric("fieldgate_broker_connections") == 1.0
    }));
    assert!(
        settled,
        "fuzz connections still open: {}",
        gw.metric("fieldgate_broker_connections")
    );
    let log = gw.log_text();
    assert!(!log.contains("panicked"), "the gateway panicked:\n{log}");
    // And the gateway still takes new clients.
    rt.block_on(async {
        let mut fresh = anon(port, "fresh").await;
        fresh.publish1("ctl/fresh", "ok").await;
    });
    // The inputs reached past CONNECT into the relay (not all refused at the door).
    let closed: Vec<String> = gw
        .get("/metrics")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("fieldgate_broker_closed_total"))
        .map(str::to_string)
        .collect();
    eprintln!("fuzz: {cases} inputs; {closed:?}");
    assert!(gw.metric("fieldgate_broker_closed_total{reason=\"protocol_violation\"}") > 0.0);
}

/// State a client can create is bounded: `max_subscriptions_per_client` filters per session
/// (SUBACK 0x80 past it), `max_retained_messages` and `max_retained_bytes` kept retained
/// messages (past them a retained publish is delivered but not kept, locally or across a
/// restart). Each refusal is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_and_retained_messages_are_bounded() {
    let data = tempfile::tempdir().unwrap();
    let broker = toml! {
        max_subscriptions_per_client = 2
        max_retained_messages = 3
        max_retained_bytes = 1000
    };
    let gw = gateway_in(data.path(), broker.clone(), anonymous()).await;
    let limited = |what: &str| {
        gw.metric(&format!(
            "fieldgate_broker_limited_total{{what=\"{what}\"}}"
        ))
    };
    let mut sub = anon(gw.mqtt, "sub").await;
    sub.client
        .subscribe_many(
            ["a/#", "b/#", "c/#"]
                .map(|f| rumqttc::SubscribeFilter::new(f.into(), QoS::AtLeastOnce)),
        )
        .await
        .unwrap();
    assert_eq!(
        sub.suback().await,
        [
            rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce),
            rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce),
            rumqttc::SubscribeReasonCode::Failure,
        ]
    );
    // Subscribing again to a filter the session has is not a new one.
    sub.client.subscribe("a/#", QoS::AtMostOnce).await.unwrap();
    assert_eq!(
        sub.suback().await,
        [rumqttc::SubscribeReasonCode::Success(QoS::AtMostOnce)]
    );
    assert_eq!(limited("subscriptions"), 1.0);

    let mut dev = anon(gw.mqtt, "dev").await;
    for i in 0..5 {
        dev.client
            .publish(format!("a/{i}"), QoS::AtLeastOnce, true, "kept?")
            .await
            .unwrap();
        dev.wait(|p| matches!(p, Packet::PubAck(_)).then_some(()))
            .await
            .expect("no PUBACK");
    }
    // Replacing a kept message is fine; a big one over the byte budget is not kept.
    dev.publish_retained("a/0", "replaced").await;
    dev.publish_retained("a/9", &"x".repeat(1200)).await;
    // Every one was delivered live.
    let live = sub.received(Duration::from_secs(2)).await;
    assert_eq!(live.len(), 7, "{live:?}");
    assert_eq!(limited("retained"), 3.0);
    let kept: Vec<String> = retained_view(gw.mqtt, "view", "a/#")
        .await
        .into_iter()
        .map(|(t, p, _, _)| format!("{t}={p}"))
        .collect();
    assert_eq!(kept, ["a/0=replaced", "a/1=kept?", "a/2=kept?"]);
    // Deleting one makes room again.
    dev.publish_retained("a/1", "").await;
    dev.publish_retained("a/7", "new").await;
    let kept: Vec<String> = retained_view(gw.mqtt, "view2", "a/#")
        .await
        .into_iter()
        .map(|(t, _, _, _)| t)
        .collect();
    assert_eq!(kept, ["a/0", "a/2", "a/7"]);
    // And a restart brings back exactly those.
    drop((sub, dev));
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
    let gw = gateway_in(data.path(), broker, anonymous()).await;
    let kept: Vec<String> = retained_view(gw.mqtt, "view3", "a/#")
        .await
        .into_iter()
        .map(|(t, _, _, _)| t)
        .collect();
    assert_eq!(kept, ["a/0", "a/2", "a/7"]);
}

/// `deny_publish` / `deny_subscribe` are checked before the allow rules: a denied publish is
/// dropped (and counted), a filter inside a denied topic is refused (0x80), and a wider
/// filter (`#`, `plant/+/a`) is granted but never delivers a denied topic, even to an
/// identity whose rules allow `#`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_rules_win_over_allow_rules() {
    let acl = toml! {
        [acl.default]
        publish = ["#"]
        subscribe = ["#"]
        deny_publish = ["plant/locked/#"]
        deny_subscribe = ["plant/secret/#"]
    };
    let (gw, _d) = gateway(acl, anonymous()).await;
    let mut sub = anon(gw.mqtt, "sub").await;
    sub.client
        .subscribe_many(
            ["plant/secret/x", "#", "plant/+/a"]
                .map(|f| rumqttc::SubscribeFilter::new(f.into(), QoS::ExactlyOnce)),
        )
        .await
        .unwrap();
    let ok = rumqttc::SubscribeReasonCode::Success(QoS::ExactlyOnce);
    assert_eq!(
        sub.suback().await,
        [rumqttc::SubscribeReasonCode::Failure, ok, ok]
    );
    let mut publ = anon(gw.mqtt, "pub").await;
    for q in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        publ.client
            .publish("plant/secret/a", q, false, "hidden")
            .await
            .unwrap();
    }
    publ.publish1("plant/locked/a", "dropped").await;
    publ.publish1("plant/public/a", "yes").await;
    let got = sub.received(Duration::from_secs(1)).await;
    let topics: std::collections::BTreeSet<&str> = got.iter().map(|(t, _, _)| t.as_str()).collect();
    assert_eq!(
        topics.into_iter().collect::<Vec<_>>(),
        ["plant/public/a"],
        "{got:?}"
    );
    // The subscriber's link survived the withheld deliveries: it still gets new ones.
    publ.publish1("plant/public/a", "again").await;
    assert!(!sub.received(Duration::from_secs(1)).await.is_empty());
    assert_eq!(
        gw.metric("fieldgate_broker_denied_total{action=\"publish\"}"),
        1.0
    );
    assert_eq!(
        gw.metric("fieldgate_broker_denied_total{action=\"subscribe\"}"),
        1.0
    );
    // Three publishes, each matched by two of the subscriber's filters.
    assert_eq!(
        gw.metric("fieldgate_broker_denied_total{action=\"deliver\"}"),
        6.0
    );
}

/// rumqttd takes the acknowledgements of its deliveries only in the order it sent them. The
/// front end answers lowered deliveries itself and forwards the device's answers for the
/// others, in rumqttd's order: a subscriber at QoS 2 receiving a mix of QoS 0, 1 and 2 keeps
/// its connection and gets every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_qos_deliveries_are_acknowledged_upstream_in_order() {
    let (_gw, port) = rules_target().await;
    let mut sub = anon(port, "mix-sub").await;
    sub.client
        .subscribe("mix/#", QoS::ExactlyOnce)
        .await
        .unwrap();
    sub.suback().await;
    let publ = anon(port, "mix-pub").await;
    let qos = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce];
    for i in 0..300usize {
        publ.client
            .publish(format!("mix/{i}"), qos[i % 3], false, i.to_string())
            .await
            .unwrap();
    }
    let mut got = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while got.len() < 300 && tokio::time::Instant::now() < deadline {
        for (t, _, _) in sub.received(Duration::from_millis(500)).await {
            got.insert(t);
        }
    }
    assert_eq!(got.len(), 300, "the subscriber got {} of 300", got.len());
}

/// CONNECT with another protocol: MQTT 3.1 (`MQIsdp`, level 3) is accepted as mosquitto
/// does (older PLCs speak it); any other level but MQTT 5 (tests/mqtt5.rs) gets CONNACK 0x01
/// and the connection closed (MQTT-3.1.2-2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_protocol_levels_get_connack_1_and_mqtt_3_1_is_served() {
    let (gw, _d) = gateway(Table::new(), anonymous()).await;
    let refused = |p: &Option<P4>| matches!(p, Some(P4::ConnAck(a)) if a.code == v4::ConnectReturnCode::RefusedProtocolVersion);
    for (name, level, extra) in [
        ("MQTT", 6u8, &[][..]),
        ("MQTT", 3, &[][..]),
        ("MQIsdp", 4, &[][..]),
        ("MQIsdp", 5, &[0u8][..]),
    ] {
        let (mut r, ack) = Raw::connect_as(gw.mqtt, name, level, extra, "old").await;
        assert!(refused(&ack), "{name} level {level}: {ack:?}");
        assert!(r.closed().await, "{name} level {level} left open");
    }
    // MQTT 3.1: served like 3.1.1.
    let (mut r, ack) = Raw::connect_as(gw.mqtt, "MQIsdp", 3, &[], "plc31").await;
    assert!(connack_ok(ack.clone()), "MQTT 3.1: {ack:?}");
    r.send(P4::Subscribe(v4::Subscribe::new("plc/#", QoS::AtLeastOnce)))
        .await;
    assert!(matches!(r.recv().await, Some(P4::SubAck(_))));
    let mut other = anon(gw.mqtt, "modern").await;
    other.publish1("plc/x", "hello").await;
    match r.recv().await {
        Some(P4::Publish(p)) => assert_eq!(&p.payload[..], b"hello"),
        other => panic!("3.1 client got {other:?}"),
    }
    assert_eq!(
        gw.metric("fieldgate_broker_refused_total{reason=\"protocol_version\"}"),
        4.0
    );
}

/// UNSUBSCRIBE works on a resumed persistent session too: UNSUBACK, and no more deliveries
/// on the filter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_on_a_resumed_session_takes_effect() {
    let (gw, _d) = gateway(Table::new(), anonymous()).await;
    let (mut d, _) = connect_session(gw.mqtt, "keeper", None, false)
        .await
        .unwrap();
    d.client
        .subscribe("keep/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    d.suback().await;
    d.client.disconnect().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut d, present) = connect_session(gw.mqtt, "keeper", None, false)
        .await
        .unwrap();
    assert!(present);
    d.client.unsubscribe("keep/#").await.unwrap();
    let unsuback = d
        .wait(|p| matches!(p, Packet::UnsubAck(_)).then_some(()))
        .await;
    assert!(unsuback.is_some(), "no UNSUBACK on the resumed session");
    let mut publ = anon(gw.mqtt, "keep-pub").await;
    publ.publish1("keep/x", "after").await;
    let got = d.received(Duration::from_secs(1)).await;
    assert!(got.is_empty(), "delivered after UNSUBSCRIBE: {got:?}");
}

/// A new subscription gets every matching retained message, however many (rumqttd 0.20
/// sends at most 100 to a QoS 1/2 subscription, its in-flight limit), each at
/// min(publisher's QoS, granted QoS) with the retain flag; subscribing to the same filter
/// again sends them again (MQTT-3.3.1-6, MQTT-3.8.4-3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_matching_retained_message_reaches_a_new_subscription() {
    let (gw, _d) = gateway(Table::new(), anonymous()).await;
    let mut dev = anon(gw.mqtt, "field-dev").await;
    const N: usize = 230;
    for i in 0..N {
        dev.publish_retained(&format!("field/d{i}/status"), &format!("up{i}"))
            .await;
    }
    dev.client
        .publish("field/q0", QoS::AtMostOnce, true, "zero")
        .await
        .unwrap();
    dev.client
        .publish("field/q2", QoS::ExactlyOnce, true, "two")
        .await
        .unwrap();
    dev.wait(|p| matches!(p, Packet::PubComp(_)).then_some(()))
        .await
        .expect("no PUBCOMP");
    // Something outside the filter, and a QoS 0 retained message seen by a probe first.
    dev.publish_retained("other/x", "no").await;
    let mut probe = anon(gw.mqtt, "field-probe").await;
    probe
        .client
        .subscribe("field/q0", QoS::AtMostOnce)
        .await
        .unwrap();
    probe.suback().await;
    assert_eq!(probe.received(Duration::from_secs(2)).await.len(), 1);

    let mut scada = anon(gw.mqtt, "scada").await;
    let want: std::collections::BTreeMap<String, (String, QoS)> = (0..N)
        .map(|i| {
            (
                format!("field/d{i}/status"),
                (format!("up{i}"), QoS::AtLeastOnce),
            )
        })
        .chain([
            (
                "field/q0".to_string(),
                ("zero".to_string(), QoS::AtMostOnce),
            ),
            (
                "field/q2".to_string(),
                ("two".to_string(), QoS::AtLeastOnce),
            ),
        ])
        .collect();
    for round in 0..2 {
        scada
            .client
            .subscribe("field/#", QoS::AtLeastOnce)
            .await
            .unwrap();
        assert_eq!(
            scada.suback().await,
            [rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)]
        );
        let mut got = std::collections::BTreeMap::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while got.len() < want.len() && tokio::time::Instant::now() < deadline {
            for (t, p, q, retain) in scada.received_retain(Duration::from_millis(500)).await {
                assert!(retain, "round {round}: {t} arrived without the retain flag");
                assert!(
                    got.insert(t.clone(), (p, q)).is_none(),
                    "round {round}: {t} arrived twice"
                );
            }
        }
        assert_eq!(
            got.len(),
            want.len(),
            "round {round}: {} of {} retained messages arrived",
            got.len(),
            want.len()
        );
        assert_eq!(got, want, "round {round}");
    }
    // At QoS 2, through the whole handshake.
    probe
        .client
        .subscribe("field/q2", QoS::ExactlyOnce)
        .await
        .unwrap();
    probe.suback().await;
    assert_eq!(
        probe.received_retain(Duration::from_secs(2)).await,
        [(
            "field/q2".to_string(),
            "two".to_string(),
            QoS::ExactlyOnce,
            true
        )]
    );
    // Live traffic after them is plain (no retain flag), and nothing else is pending.
    dev.publish1("field/d0/status", "live").await;
    let live = scada.received_retain(Duration::from_secs(2)).await;
    assert_eq!(
        live,
        [(
            "field/d0/status".to_string(),
            "live".to_string(),
            QoS::AtLeastOnce,
            false
        )]
    );
}

/// SUBSCRIBE to a filter the session already holds replaces that subscription
/// (MQTT-3.8.4-3): deliveries come at the new QoS, once each, on a fresh session and on a
/// resumed persistent one (clients commonly subscribe again after every CONNECT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_subscribe_replaces_the_subscription() {
    let (gw, _d) = gateway(Table::new(), anonymous()).await;
    let mut publ = anon(gw.mqtt, "re-pub").await;
    let mut seq = 0;
    let mut check = |label: &'static str, want: QoS| {
        seq += 1;
        (label, want, format!("m{seq}"))
    };
    // A fresh session: QoS 0, then 1, then 0 again.
    let (mut d, _) = connect_session(gw.mqtt, "re-sub", None, false)
        .await
        .unwrap();
    for (label, q) in [
        ("first", QoS::AtMostOnce),
        ("raised", QoS::AtLeastOnce),
        ("lowered", QoS::AtMostOnce),
        ("raised again", QoS::AtLeastOnce),
    ] {
        d.client.subscribe("re/#", q).await.unwrap();
        assert_eq!(
            d.suback().await,
            [rumqttc::SubscribeReasonCode::Success(q)],
            "{label}"
        );
        let (label, want, payload) = check(label, q);
        publ.publish1("re/x", &payload).await;
        let got = d.received(Duration::from_secs(1)).await;
        assert_eq!(got, [("re/x".to_string(), payload, want)], "{label}");
    }
    // Resumed, with a message queued while away: subscribing again at the same QoS (as
    // clients do after every CONNECT) loses nothing and duplicates nothing.
    d.client.disconnect().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    publ.publish1("re/x", "while-away").await;
    let (mut d, present) = connect_session(gw.mqtt, "re-sub", None, false)
        .await
        .unwrap();
    assert!(present);
    d.client.subscribe("re/#", QoS::AtLeastOnce).await.unwrap();
    d.suback().await;
    let (label, want, payload) = check("resumed, same QoS", QoS::AtLeastOnce);
    publ.publish1("re/x", &payload).await;
    let got = d.received(Duration::from_secs(1)).await;
    let away = (
        "re/x".to_string(),
        "while-away".to_string(),
        QoS::AtLeastOnce,
    );
    assert_eq!(got, [away, ("re/x".to_string(), payload, want)], "{label}");
    d.client.subscribe("re/#", QoS::AtMostOnce).await.unwrap();
    d.suback().await;
    let (label, want, payload) = check("resumed, lowered", QoS::AtMostOnce);
    publ.publish1("re/x", &payload).await;
    let got = d.received(Duration::from_secs(1)).await;
    assert_eq!(got, [("re/x".to_string(), payload, want)], "{label}");
    // Raised to QoS 2 on the resumed session: a QoS 2 publish arrives at QoS 2.
    d.client.subscribe("re/#", QoS::ExactlyOnce).await.unwrap();
    d.suback().await;
    let (label, want, payload) = check("resumed, raised", QoS::ExactlyOnce);
    publ.client
        .publish("re/x", QoS::ExactlyOnce, false, payload.clone())
        .await
        .unwrap();
    publ.wait(|p| matches!(p, Packet::PubComp(_)).then_some(()))
        .await
        .expect("no PUBCOMP");
    let got = d.received(Duration::from_secs(1)).await;
    assert_eq!(got, [("re/x".to_string(), payload, want)], "{label}");
}
