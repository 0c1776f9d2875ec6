//! `[http]`: the operator endpoint's section (`/metrics`, `/health`, the OTA routes, and with
//! `page = true` the operator page and its JSON API under `/api/v1`).
//!
//! The section was called `[metrics]` before the page existed. That name still loads: its
//! keys map onto `[http]` (see [`crate::config`], which owns the section names), with one
//! warning naming the new key. Both sections at once are a configuration problem.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// `[http]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Serve the endpoint at all (`/metrics`, `/health`, OTA routes, the page).
    pub enabled: bool,
    /// Address of the HTTP endpoint. Keep it on loopback unless a firewall protects it: the
    /// page and the API have no login yet (docs/api.md).
    pub listen: SocketAddr,
    /// Serve the operator page (`/`) and its JSON API (`/api/v1/...`).
    pub page: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9183)),
            page: true,
        }
    }
}
