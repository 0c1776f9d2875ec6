//! Sparkplug B (Eclipse Sparkplug 3.0) for the uplink: the payload, the topics, and one edge
//! node's session state. A leaf: the bridge drives an [`node::EdgeNode`], the sources say
//! what their devices are ([`node::DeviceSpec`]); nothing here does I/O.
//!
//! How the pieces meet (docs/sparkplug.md has the operator's view):
//! - the queue keeps what the sources published, unchanged (JSON readings); the bridge turns
//!   each record into Sparkplug when it sends it, so a reading queued through an outage
//!   goes up as DDATA of the session that finally carries it, flagged historical when it
//!   is replayed backlog;
//! - [`reading`] reads the sources' payloads back as typed values;
//! - a record whose topic is no device's goes up as plain MQTT, as without Sparkplug.

pub mod config;
pub mod node;
pub mod payload;
pub mod reading;
pub mod topic;

pub use config::SparkplugConfig;
pub use node::{
    Batch, BatchShape, Command, CommandError, DeviceSpec, EdgeNode, Message, MetricSpec, Route,
    Update, Write,
};
