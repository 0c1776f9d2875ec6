//! Test harness: real parts on loopback. Each part's own header says what it owns.
//!
//! - [`pki`]: a test CA and certificates made with rcgen (server, client, expired, wrong name,
//!   a second unrelated CA);
//! - [`client5`]: a raw MQTT 5 device client (every packet and reason code visible);
//! - [`cloud`]: a real cloud MQTT broker with TLS and client certificates required, either an
//!   in-process rumqttd (default) or Debian's mosquitto when `FIELDGATE_TEST_CLOUD=mosquitto`;
//! - [`cloud5`]: MQTT 5 peers of the cloud side: a subscriber that reads the properties and a
//!   scripted MQTT 5 broker over TLS that refuses chosen PUBLISHes with a reason code;
//! - [`proxy`]: a TCP proxy between the gateway and the cloud that a test can cut and restore;
//! - [`gateway`]: the real `fieldgate` binary as a child process (SIGKILL, SIGTERM, restart)
//!   and the configs it is given;
//! - [`mqtt`]: a plain MQTT device that publishes sequence numbers, subscribers of the local
//!   broker and of the cloud, a bare rumqttd to compare with;
//! - [`report`]: counting sequence numbers per source (lost, duplicated, reordered);
//! - [`measure`]: memory and CPU of a process, from `/proc`;
//! - [`util`]: test ports and the bounded polling loop;
//! - [`devices`]: simulated MQTT devices for the durability tests;
//! - [`modbus_sim`]: Modbus TCP/RTU servers with known register maps;
//! - [`ota_sim`]: a firmware server and simulated devices for OTA;
//! - [`pty`]: in-process pseudo-terminal pairs that stand in for serial ports;
//! - [`fleet`]: N gateways with their devices against one cloud broker behind one relay, and
//!   the outage, tag-rollout and command-isolation scenarios (tests/fleet.rs, benches/fleet.rs);
//! - [`tahu`]: Eclipse Tahu's Sparkplug B codec (npm, run by node), to decode what the cloud got.
//!
//! Everything public in the first eight is re-exported here, so a test says `use common::*;`.
#![allow(dead_code)]

pub mod client5;
pub mod cloud;
pub mod cloud5;
pub mod devices;
pub mod fleet;
pub mod gateway;
pub mod measure;
pub mod modbus_sim;
pub mod mqtt;
pub mod ota_sim;
pub mod pki;
pub mod proxy;
pub mod pty;
pub mod report;
pub mod tahu;
pub mod util;

// Every test binary (and bench) compiles this harness and uses a different part of it.
#[allow(unused_imports)]
pub use cloud::*;
#[allow(unused_imports)]
pub use gateway::*;
#[allow(unused_imports)]
pub use measure::*;
#[allow(unused_imports)]
pub use mqtt::*;
#[allow(unused_imports)]
pub use pki::*;
#[allow(unused_imports)]
pub use proxy::*;
#[allow(unused_imports)]
pub use report::*;
#[allow(unused_imports)]
pub use util::*;
