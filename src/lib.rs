//! fieldgate: an edge gateway that never loses a reading.
//!
//! One process: an embedded MQTT broker for local devices ([`broker`], [`frontend`]); the
//! path of every message meant for the cloud, which enters at [`ingest`], becomes durable in
//! the [`store`]'s journal before its publisher is acknowledged, and leaves through the TLS
//! [`bridge`] to a cloud MQTT broker, which carries commands back down. [`gateway::run`] wires them together; `main` only parses the command
//! line, loads the [`config`] and maps errors to exit codes.

pub mod bridge;
pub mod broker;
pub mod config;
pub mod frontend;
pub mod gateway;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod ota;
pub mod retained;
pub mod sources;
pub mod store;

pub mod topic;
pub mod watchdog;

pub use config::Settings;
pub use gateway::run;
