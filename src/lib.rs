//! fieldgate: an edge gateway that never loses a reading.
//!
//! One process: an embedded MQTT broker for local devices ([`broker`]), an uplink tap that
//! appends every message meant for the cloud to a crash-proof disk queue ([`tap`], [`store`]),
//! and a TLS bridge that replays that queue to a cloud MQTT broker and carries commands back
//! down ([`bridge`]). [`gateway::run`] wires them together; `main` only parses the command
//! line, loads the [`config`] and maps errors to exit codes.

pub mod bridge;
pub mod broker;
pub mod config;
pub mod frontend;
pub mod gateway;
pub mod http;
pub mod metrics;
pub mod ota;
pub mod retained;
pub mod sources;
pub mod store;
pub mod tap;
pub mod topic;
pub mod watchdog;

pub use config::Settings;
pub use gateway::run;
