//! Southbound sources: field devices turned into MQTT messages on the embedded broker.
//!
//! Every source kind lives in its own folder, owns its config section and its validation
//! (`<kind>/config.rs`), and talks to the broker only through a [`crate::local::LocalClient`]
//! made during start-up, like any other of the gateway's own clients. Commands (Modbus
//! writes, serial writes) arrive the same way: the source subscribes to its command filters
//! on its own link.

pub mod modbus;
pub mod serial;
