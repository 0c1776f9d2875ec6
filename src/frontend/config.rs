//! `[broker]`: the device listeners (TCP, TLS), accounts, the ACL and the broker's limits;
//! the section's types and their validation (TLS files are read and checked here, so a bad
//! certificate is reported by `check-config`, not at the first connection).
//!
//! The broker component is [`crate::broker`] (rumqttd) behind the front end; both are built
//! from this section.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::problem::{problem, Problem};
use crate::tls::{ClientCertMode, ServerTlsConfig};
use crate::topic;

/// `[broker]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// MQTT 3.1.1 listeners (plain TCP or TLS), by name. Served by the gateway's front end.
    pub listeners: BTreeMap<String, ListenerConfig>,
    /// Accounts. A client that sends a username must match one of them.
    pub users: Vec<UserConfig>,
    /// Who may publish and subscribe where.
    pub acl: AclConfig,
    /// Most simultaneous device connections over all listeners.
    pub max_connections: usize,
    /// Most simultaneous device connections from one source IP address.
    pub max_connections_per_ip: usize,
    /// Largest MQTT packet (its remaining length: topic + payload + headers) accepted from a
    /// device, in bytes. A bigger one closes the connection.
    pub max_payload_size: usize,
    /// Most unacknowledged QoS 1/2 messages per client connection.
    pub max_inflight: usize,
    /// Most PUBLISHes per second from one device connection. 0: unlimited.
    pub max_publish_rate: u32,
    /// PUBLISHes a device may send at once above the rate. 0: one second's worth.
    pub publish_burst: u32,
    /// What happens to a device over `max_publish_rate`.
    pub rate_limit_policy: RateLimitPolicy,
    /// How long a new connection may take to send CONNECT (after the TLS handshake).
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// After a failed password login, the next login attempt from the same address waits
    /// this long, doubled per further failure up to 32 times it; a successful login (or ten
    /// minutes without a failure) forgets the failures. `"0s"`: no delay.
    #[serde(with = "humantime_serde")]
    pub failed_login_delay: Duration,
    /// How long a TLS handshake may take before the connection is dropped.
    #[serde(with = "humantime_serde")]
    pub tls_handshake_timeout: Duration,
    /// Most subscription filters one client session holds (rumqttd keeps about 7 KB per
    /// filter); a SUBSCRIBE filter past it gets 0x80 in SUBACK.
    pub max_subscriptions_per_client: usize,
    /// Most retained messages kept (rumqttd keeps several KB each, and all survive a
    /// restart); past it a new retained topic is delivered but not kept.
    pub max_retained_messages: usize,
    /// Most bytes (topic + payload) of retained messages kept; past it a retained publish
    /// is delivered but not kept.
    pub max_retained_bytes: u64,
    /// Size of one in-memory log segment per subscription filter, in bytes.
    pub segment_bytes: usize,
    /// Client ids each identity may use, e.g. `"%u"` (the username or certificate name) or
    /// `"%u-*"` (`*`: any characters). A CONNECT with another client id is refused with
    /// CONNACK 2; with `%u` in it, anonymous clients are refused. Empty: any client id. A
    /// session belongs to the identity that made it either way: another identity may not
    /// take over its client id while it exists.
    pub client_id_pattern: String,
    /// Segments kept per subscription filter (memory per filter <= bytes x count).
    pub segment_count: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        let mut listeners = BTreeMap::new();
        listeners.insert(
            "default".to_string(),
            ListenerConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
                // The built-in listener is on loopback only: local apps need no account.
                allow_anonymous: true,
                tls: None,
            },
        );
        BrokerConfig {
            listeners,
            users: Vec::new(),
            acl: AclConfig::default(),
            max_connections: 1024,
            max_connections_per_ip: 64,
            max_payload_size: 256 * 1024,
            max_inflight: 100,
            max_publish_rate: 0,
            publish_burst: 0,
            rate_limit_policy: RateLimitPolicy::SlowDown,
            connect_timeout: Duration::from_secs(10),
            tls_handshake_timeout: Duration::from_secs(5),
            failed_login_delay: Duration::from_secs(1),
            max_subscriptions_per_client: 256,
            max_retained_messages: 10_000,
            max_retained_bytes: 16 * 1024 * 1024,
            segment_bytes: 1024 * 1024,
            segment_count: 4,
            client_id_pattern: String::new(),
        }
    }
}

/// `[broker.listeners.NAME]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Address to listen on, e.g. `0.0.0.0:1883`.
    pub listen: SocketAddr,
    /// Let clients in without a username (and without a client certificate).
    #[serde(default)]
    pub allow_anonymous: bool,
    /// TLS on this listener. Absent: plain TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServerTlsConfig>,
}

/// `broker.rate_limit_policy`: what the front end does with a device that publishes faster
/// than `broker.max_publish_rate`.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitPolicy {
    /// Stop reading from the device until it is back under the rate (TCP back-pressure).
    /// Nothing is lost; the device's sends slow down.
    #[default]
    SlowDown,
    /// Drop the excess PUBLISHes (still acknowledged, as for an ACL denial) and count them.
    Drop,
    /// Close the connection.
    Disconnect,
}

/// Deserializes a unit enum from its snake_case name, naming the allowed values on error
/// (serde's own message through the config crate does not).
macro_rules! named_enum {
    ($ty:ident, $what:literal, { $($name:literal => $v:ident),+ $(,)? }) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                match s.as_str() {
                    $($name => Ok($ty::$v),)+
                    other => Err(serde::de::Error::custom(format!(
                        concat!("`{}` is not ", $what, "; use one of: {}"),
                        other,
                        [$($name),+].join(", ")
                    ))),
                }
            }
        }
    };
}

named_enum!(RateLimitPolicy, "a rate limit policy", {
    "slow_down" => SlowDown,
    "drop" => Drop,
    "disconnect" => Disconnect,
});

/// `[[broker.users]]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// MQTT username.
    pub username: String,
    /// argon2id PHC string from `fieldgate passwd` (preferred).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub password_hash: String,
    /// Plain-text password: accepted for compatibility, warned about at start.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub password: String,
}

/// `[broker.acl]`: a client may publish to (subscribe to) a topic when a pattern of the
/// `default` rules or of its own identity's rules allows it. `%u` is the identity (username
/// or certificate CN), `%c` the client id.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AclConfig {
    /// Rules for every client.
    pub default: AclRules,
    /// Extra rules per identity (username or certificate CN).
    pub users: BTreeMap<String, AclRules>,
    /// Topics only the gateway itself publishes to, whatever the rules above say.
    pub internal: InternalTopics,
}

/// `[broker.acl.internal]`: topics the gateway's own components publish on (OTA answers to
/// devices, the tap's drain marker). No device may publish there, not even an identity with
/// `#`: a device could otherwise forge firmware metadata or chunks for another device.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct InternalTopics {
    /// Filters of gateway-only topics.
    pub gateway_only: Vec<String>,
    /// Filters inside `gateway_only` that devices may still publish to.
    pub device_may_publish: Vec<String>,
    /// Command topics the gateway obeys: only the cloud (through the bridge's downlink) may
    /// publish there, and the identities in `ota.local_commands`; no ACL grant opens them.
    pub commands: Vec<String>,
    /// `ota.local_commands`, filled in at start (not a key of this section).
    #[serde(skip)]
    pub command_identities: Vec<String>,
}

impl Default for InternalTopics {
    fn default() -> Self {
        InternalTopics {
            gateway_only: vec![
                "fieldgate-internal/#".into(),
                "ota/+/metadata".into(),
                "ota/+/chunk/+".into(),
                "ota/+/success".into(),
                "ota/+/retry".into(),
                "ota/+/error".into(),
                "ota/_gateway/#".into(),
            ],
            device_may_publish: vec!["ota/+/chunk/get".into()],
            commands: vec!["cmd/ota/#".into()],
            command_identities: Vec::new(),
        }
    }
}

impl Default for AclConfig {
    fn default() -> Self {
        AclConfig {
            default: AclRules {
                publish: vec!["#".into()],
                subscribe: vec!["#".into()],
                ..AclRules::default()
            },
            users: BTreeMap::new(),
            internal: InternalTopics::default(),
        }
    }
}

/// Publish and subscribe patterns (MQTT filters, with `%u` / `%c`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AclRules {
    /// Topics the client may publish to.
    pub publish: Vec<String>,
    /// Filters the client may subscribe to (a filter must lie inside a pattern).
    pub subscribe: Vec<String>,
    /// Topics the client may not publish to, whatever `publish` allows (checked first).
    pub deny_publish: Vec<String>,
    /// Topics the client may not receive, whatever `subscribe` allows (checked first): a
    /// filter inside one of them is refused, and a wider filter (`#`) never delivers them.
    pub deny_subscribe: Vec<String>,
}

impl BrokerConfig {
    /// Every problem of `[broker]` (listener ports against other sections' are checked by
    /// [`crate::config`]).
    pub fn validate(&self) -> Vec<Problem> {
        let mut p = Vec::new();
        let b = self;
        if b.listeners.is_empty() {
            p.push(problem(
                "broker.listeners",
                "no listener; add [broker.listeners.default] listen = \"127.0.0.1:1883\"",
            ));
        }
        p.extend(validate_auth(b));
        if b.max_connections < 4 {
            p.push(problem(
                "broker.max_connections",
                "must be at least 4; e.g. 1024",
            ));
        }
        if b.max_payload_size < 1024 {
            p.push(problem(
                "broker.max_payload_size",
                "must be at least 1024 bytes",
            ));
        }
        if b.max_inflight == 0 || b.max_inflight > 65535 {
            p.push(problem(
                "broker.max_inflight",
                "must be 1..=65535; e.g. 100",
            ));
        }
        if b.connect_timeout.as_millis() == 0 || b.connect_timeout > Duration::from_secs(300) {
            p.push(problem(
                "broker.connect_timeout",
                "must be between 1ms and 300s; e.g. \"10s\"",
            ));
        }
        if b.tls_handshake_timeout.as_millis() == 0
            || b.tls_handshake_timeout > Duration::from_secs(300)
        {
            p.push(problem(
                "broker.tls_handshake_timeout",
                "must be between 1ms and 300s; e.g. \"5s\"",
            ));
        }
        if b.max_subscriptions_per_client == 0 {
            p.push(problem(
                "broker.max_subscriptions_per_client",
                "must be at least 1; e.g. 256",
            ));
        }
        if b.failed_login_delay > Duration::from_secs(60) {
            p.push(problem(
                "broker.failed_login_delay",
                "must be at most 60s (it doubles per failure up to 32 times); e.g. \"1s\"",
            ));
        }
        if b.client_id_pattern.contains(['/', '+', '#', '$', '\0'])
            || b.client_id_pattern.contains("%c")
        {
            p.push(problem(
                "broker.client_id_pattern",
                "may hold %u, * and the characters of a client id (no / + # $, no %c); e.g. \"%u\" or \"%u-*\"",
            ));
        }
        if b.max_connections_per_ip == 0 {
            p.push(problem(
                "broker.max_connections_per_ip",
                "must be at least 1; e.g. 64",
            ));
        }
        if b.segment_bytes < 64 * 1024 || b.segment_bytes < b.max_payload_size {
            p.push(problem(
                "broker.segment_bytes",
                "must be at least 65536 and at least broker.max_payload_size; e.g. 1048576",
            ));
        }
        if b.segment_count < 2 {
            p.push(problem(
                "broker.segment_count",
                "must be at least 2; e.g. 4",
            ));
        }
        p
    }
}

/// Listeners, accounts and ACL patterns of `[broker]`.
fn validate_auth(b: &BrokerConfig) -> Vec<Problem> {
    let mut p = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (i, u) in b.users.iter().enumerate() {
        let key = format!("broker.users[{i}]");
        if u.username.is_empty() {
            p.push(problem(
                format!("{key}.username"),
                "empty; give the account a name",
            ));
        } else if !seen.insert(u.username.as_str()) {
            p.push(problem(
                format!("{key}.username"),
                format!("{:?} is listed twice; keep one entry", u.username),
            ));
        }
        match (u.password_hash.is_empty(), u.password.is_empty()) {
            (true, true) => p.push(problem(
                format!("{key}.password_hash"),
                "missing; set password_hash to the output of `fieldgate passwd`",
            )),
            (false, false) => p.push(problem(
                format!("{key}.password"),
                "both password and password_hash are set; keep only password_hash",
            )),
            (false, true) => {
                if let Err(e) = crate::password::check_hash(&u.password_hash) {
                    p.push(problem(
                        format!("{key}.password_hash"),
                        format!("{e}; paste the whole line `fieldgate passwd` printed"),
                    ));
                }
            }
            (true, false) => {}
        }
    }
    for (name, l) in &b.listeners {
        let key = format!("broker.listeners.{name}");
        let cert_mode = l.tls.as_ref().map(|t| t.client_cert);
        let nobody = !l.allow_anonymous
            && b.users.is_empty()
            && !matches!(
                cert_mode,
                Some(ClientCertMode::Optional | ClientCertMode::Required)
            );
        if nobody {
            p.push(problem(
                format!("{key}.allow_anonymous"),
                "no client could log in: add [[broker.users]], client certificates (tls.client_cert), or allow_anonymous = true",
            ));
        }
        if let Some(t) = &l.tls {
            crate::tls::check_server(&mut p, &format!("{key}.tls"), t);
        }
    }
    let rules = std::iter::once(("broker.acl.default".to_string(), &b.acl.default)).chain(
        b.acl
            .users
            .iter()
            .map(|(u, r)| (format!("broker.acl.users.{u}"), r)),
    );
    let internal = &b.acl.internal;
    for (what, list) in [
        ("gateway_only", &internal.gateway_only),
        ("device_may_publish", &internal.device_may_publish),
        ("commands", &internal.commands),
    ] {
        for (i, f) in list.iter().enumerate() {
            if let Err(e) = topic::validate_filter(f) {
                p.push(problem(
                    format!("broker.acl.internal.{what}[{i}]"),
                    format!("{f:?}: {e}"),
                ));
            }
        }
    }
    for (key, r) in rules {
        for (what, list) in [
            ("publish", &r.publish),
            ("subscribe", &r.subscribe),
            ("deny_publish", &r.deny_publish),
            ("deny_subscribe", &r.deny_subscribe),
        ] {
            for (i, pat) in list.iter().enumerate() {
                // %u / %c stand for one level; check the shape with a placeholder.
                let probe = pat.replace("%u", "x").replace("%c", "x");
                if let Err(e) = topic::validate_filter(&probe) {
                    p.push(problem(
                        format!("{key}.{what}[{i}]"),
                        format!("{pat:?}: {e}"),
                    ));
                }
            }
        }
    }
    p
}
