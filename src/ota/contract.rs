//! OTA's topic contract with the rest of the gateway: the topics and sizes other components
//! must honour while OTA runs. (The built-in defaults of `[broker.acl.internal]` in
//! `frontend::config` spell the same filters under [`DEFAULT_PREFIX`]; a test here keeps
//! them equal.)
//!
//! Owns:
//! - what the OTA task subscribes to ([`subscriptions`]);
//! - what the uplink leaves on the LAN ([`uplink_exclude`]: chunk requests and chunk bytes;
//!   the cloud sent the image once already);
//! - the broker's internal topics ([`internal_topics`]): devices may not publish the
//!   gateway's answers ([`GATEWAY_ONLY`], except [`DEVICE_MAY_PUBLISH`]); the identities
//!   whose local publishes on the OTA commands are obeyed (`ota.local_commands`). The
//!   defaults of `[broker.acl.internal]` carry these filters under the default prefix
//!   [`DEFAULT_PREFIX`]; with another `ota.prefix` every `ota/...` filter there is repeated
//!   under that prefix (the operator's own additions included);
//! - the packet room one chunk needs ([`max_packet`]): the broker's log segments and the
//!   cloud link's packet limit are raised to it, while what devices may send is not.
//!
//! Invariant: every topic here is built from `ota.prefix` and the suffix lists below; the
//! manager's own topics use the same suffixes.

use super::config::OtaConfig;
use crate::frontend::config::InternalTopics;

/// `ota.prefix` by default; the built-in `[broker.acl.internal]` filters use it.
pub const DEFAULT_PREFIX: &str = "ota";
/// Largest `ota.chunk_size`.
pub const MAX_CHUNK: usize = 1024 * 1024;
/// Room an MQTT packet needs besides the chunk (fixed header, topic, packet id).
pub const PACKET_OVERHEAD: usize = 1024;

/// Topics under `<prefix>/` only the gateway publishes: its answers to devices and its
/// reports.
pub const GATEWAY_ONLY: [&str; 6] = [
    "+/metadata",
    "+/chunk/+",
    "+/success",
    "+/retry",
    "+/error",
    "_gateway/#",
];
/// Topics inside [`GATEWAY_ONLY`] devices still publish: their chunk requests.
pub const DEVICE_MAY_PUBLISH: [&str; 1] = ["+/chunk/get"];

/// The filters the OTA task subscribes to: device requests and the cloud's commands.
pub fn subscriptions(prefix: &str) -> Vec<String> {
    vec![
        format!("{prefix}/+/request"),
        format!("{prefix}/+/chunk/get"),
        format!("{prefix}/+/progress"),
        format!("{prefix}/+/verify"),
        "cmd/ota/#".to_string(),
    ]
}

/// Uplink filters the gateway adds to `[uplink] exclude` while OTA is enabled.
pub fn uplink_exclude(prefix: &str) -> Vec<String> {
    vec![format!("{prefix}/+/chunk/#")]
}

/// [`GATEWAY_ONLY`] under `prefix`.
pub fn gateway_only(prefix: &str) -> Vec<String> {
    GATEWAY_ONLY
        .iter()
        .map(|s| format!("{prefix}/{s}"))
        .collect()
}

/// [`DEVICE_MAY_PUBLISH`] under `prefix`.
pub fn device_may_publish(prefix: &str) -> Vec<String> {
    DEVICE_MAY_PUBLISH
        .iter()
        .map(|s| format!("{prefix}/{s}"))
        .collect()
}

/// Applies OTA's part of `[broker.acl.internal]` (see the module header).
pub fn internal_topics(cfg: &OtaConfig, internal: &mut InternalTopics) {
    internal.command_identities = cfg.local_commands.clone();
    if !cfg.enabled || cfg.prefix == DEFAULT_PREFIX {
        return;
    }
    // The gateway-only OTA topics follow a custom prefix.
    let moved = |list: &[String]| -> Vec<String> {
        list.iter()
            .filter_map(|f| f.strip_prefix("ota/"))
            .map(|rest| format!("{}/{rest}", cfg.prefix))
            .collect()
    };
    let gw = moved(&internal.gateway_only);
    let dev = moved(&internal.device_may_publish);
    internal.gateway_only.extend(gw);
    internal.device_may_publish.extend(dev);
}

/// Bytes one MQTT packet carrying a chunk needs, while OTA is enabled.
pub fn max_packet(cfg: &OtaConfig) -> Option<usize> {
    cfg.enabled.then(|| cfg.chunk_size + PACKET_OVERHEAD)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_acl_carries_the_contract_under_the_default_prefix() {
        let d = InternalTopics::default();
        for f in gateway_only(DEFAULT_PREFIX) {
            assert!(d.gateway_only.contains(&f), "{f} missing");
        }
        for f in device_may_publish(DEFAULT_PREFIX) {
            assert!(d.device_may_publish.contains(&f), "{f} missing");
        }
        assert!(d.commands.contains(&"cmd/ota/#".to_string()));
    }

    #[test]
    fn a_custom_prefix_moves_the_internal_topics_and_keeps_the_default_ones() {
        let cfg = OtaConfig {
            prefix: "fw".into(),
            local_commands: vec!["scada".into()],
            ..OtaConfig::default()
        };
        let mut t = InternalTopics::default();
        internal_topics(&cfg, &mut t);
        for f in gateway_only("fw").into_iter().chain(gateway_only("ota")) {
            assert!(t.gateway_only.contains(&f), "{f} missing");
        }
        assert_eq!(t.device_may_publish, ["ota/+/chunk/get", "fw/+/chunk/get"]);
        assert!(t.gateway_only.contains(&"fieldgate-internal/#".to_string()));
        assert_eq!(t.command_identities, ["scada"]);
        // Disabled: nothing moves, the identities are still set.
        let off = OtaConfig {
            enabled: false,
            ..cfg.clone()
        };
        let mut t = InternalTopics::default();
        internal_topics(&off, &mut t);
        assert_eq!(t.gateway_only, InternalTopics::default().gateway_only);
        assert_eq!(t.command_identities, ["scada"]);
        assert_eq!(max_packet(&off), None);
        assert_eq!(max_packet(&cfg), Some(16 * 1024 + PACKET_OVERHEAD));
    }

    #[test]
    fn subscriptions_and_exclusions_follow_the_prefix() {
        assert!(subscriptions("fw").contains(&"fw/+/chunk/get".to_string()));
        assert_eq!(uplink_exclude("fw"), ["fw/+/chunk/#"]);
    }
}
