//! `[sparkplug]`: the uplink as a Sparkplug B edge node.

use serde::{Deserialize, Serialize};

use super::topic::validate_id;
use crate::problem::{problem, Problem};

/// `[sparkplug]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SparkplugConfig {
    /// Speak Sparkplug B to the cloud: Modbus devices become Sparkplug devices of this edge
    /// node, their readings DDATA; everything else the uplink forwards goes on as before.
    pub enabled: bool,
    /// The Sparkplug group id (`spBv1.0/<group_id>/...`). Required when enabled.
    pub group_id: String,
    /// The edge node id. Empty: the gateway id.
    pub edge_node_id: String,
    /// The primary host application's id. When set, the edge node publishes only while
    /// that host's STATE says it is online (and buffers meanwhile). Empty: none.
    pub primary_host_id: String,
    /// Data messages name metrics by the alias their birth gave them (smaller); false:
    /// by name.
    pub aliases: bool,
}

impl Default for SparkplugConfig {
    fn default() -> Self {
        SparkplugConfig {
            enabled: false,
            group_id: String::new(),
            edge_node_id: String::new(),
            primary_host_id: String::new(),
            aliases: true,
        }
    }
}

impl SparkplugConfig {
    /// The edge node id in force.
    pub fn edge_node<'a>(&'a self, gateway_id: &'a str) -> &'a str {
        if self.edge_node_id.is_empty() {
            gateway_id
        } else {
            &self.edge_node_id
        }
    }

    /// Every problem, with its key. `cloud_enabled`: whether `[cloud]` is on.
    pub fn validate(&self, cloud_enabled: bool) -> Vec<Problem> {
        let mut p = Vec::new();
        if !self.enabled {
            return p;
        }
        if let Err(why) = validate_id(&self.group_id) {
            p.push(problem(
                "sparkplug.group_id",
                format!(
                    "{:?} {why}; set the plant's Sparkplug group, e.g. group_id = \"plant1\"",
                    self.group_id
                ),
            ));
        }
        if !self.edge_node_id.is_empty() {
            if let Err(why) = validate_id(&self.edge_node_id) {
                p.push(problem(
                    "sparkplug.edge_node_id",
                    format!(
                        "{:?} {why}; leave it empty to use gateway.id",
                        self.edge_node_id
                    ),
                ));
            }
        }
        if !self.primary_host_id.is_empty() {
            if let Err(why) = validate_id(&self.primary_host_id) {
                p.push(problem(
                    "sparkplug.primary_host_id",
                    format!(
                        "{:?} {why}; use the host application's id, or leave it empty",
                        self.primary_host_id
                    ),
                ));
            }
        }
        if !cloud_enabled {
            p.push(problem(
                "sparkplug.enabled",
                "Sparkplug B needs the cloud broker: configure [cloud], or set enabled = false",
            ));
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_by_default_and_checked_when_on() {
        let c = SparkplugConfig::default();
        assert!(c.validate(false).is_empty());
        let c = SparkplugConfig {
            enabled: true,
            group_id: "a/b".into(),
            primary_host_id: "#".into(),
            ..Default::default()
        };
        let keys: Vec<String> = c.validate(false).into_iter().map(|p| p.key).collect();
        assert_eq!(
            keys,
            [
                "sparkplug.group_id",
                "sparkplug.primary_host_id",
                "sparkplug.enabled"
            ]
        );
        let c = SparkplugConfig {
            enabled: true,
            group_id: "plant".into(),
            ..Default::default()
        };
        assert!(c.validate(true).is_empty());
        assert_eq!(c.edge_node("gw"), "gw");
    }
}
