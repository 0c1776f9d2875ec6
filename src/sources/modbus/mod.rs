//! Modbus TCP and RTU sources: `[[modbus]]` devices polled into the embedded broker, and
//! writes from `<tag topic>/set` back to the devices.
//!
//! Shape (house rule 2, [`crate::component`]): [`config::ModbusDeviceConfig`] ->
//! [`Modbus::build`] (groups devices into buses and makes each bus's broker link, before the
//! broker listens) -> [`Modbus::start`] (one task per bus) -> [`Running::stop`].
//!
//! A bus is one TCP device, every RTU device on one serial port, or every RTU-over-TCP
//! device behind one serial-to-Ethernet converter (`host`): one task owns each line and
//! serialises its requests ([`bus`]). [`plan`] coalesces due tags into the fewest reads,
//! [`codec`] turns registers into values and back, [`publish`] is the MQTT contract (one
//! message per tag reading, or with `publish = "batch"` one per device and interval), and
//! [`probe`] is the `fieldgate modbus probe` command.
//!
//! Cloud commands: the bridge republishes `fieldgate/<id>/cmd/<rest>` locally as
//! `cmd/<rest>` (default `[downlink]`), and every bus also accepts `<command_prefix><tag
//! topic>/set` (`command_prefix = "cmd/"` by default). So the cloud writes a tag by
//! publishing to `fieldgate/<id>/cmd/field/<device>/<tag>/set`; the answer goes to
//! `<tag topic>/set/result`, which the uplink carries back to the cloud as
//! `fieldgate/<id>/field/<device>/<tag>/set/result`.

pub mod bus;
pub mod codec;
pub mod config;
pub mod import;
pub mod metrics;
pub mod plan;
pub mod probe;
pub mod publish;
pub mod sparkplug;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use self::bus::Bus;
use self::config::{ModbusDeviceConfig, Transport};
use self::metrics::ModbusMetrics;
use crate::broker::{Broker, BrokerError};
use crate::component::{Ctx, Running};
use crate::local::LocalClient;

/// Why the Modbus sources could not be set up. The gateway does not start.
#[derive(Debug, thiserror::Error)]
pub enum ModbusError {
    /// A bus's broker link could not be made or subscribed. Check `broker.max_connections`.
    #[error("modbus bus {bus}: broker link: {message}")]
    Link {
        /// Bus name.
        bus: String,
        /// Why.
        message: String,
    },
}

impl From<(String, BrokerError)> for ModbusError {
    fn from((bus, e): (String, BrokerError)) -> Self {
        ModbusError::Link {
            bus,
            message: e.to_string(),
        }
    }
}

/// Buses built and linked, not yet running.
pub struct Modbus {
    buses: Vec<(Bus, LocalClient)>,
}

/// Groups devices into buses: each TCP device alone, RTU devices by serial port path and
/// RTU-over-TCP devices by converter `host` (in config order). Returns `(bus name, devices)`.
pub fn buses(devices: &[ModbusDeviceConfig]) -> Vec<(String, Vec<ModbusDeviceConfig>)> {
    let mut out: Vec<(String, Vec<ModbusDeviceConfig>)> = Vec::new();
    for d in devices {
        match d.transport {
            Transport::Tcp => out.push((d.name.clone(), vec![d.clone()])),
            Transport::Rtu | Transport::RtuOverTcp => {
                let name = match d.transport {
                    Transport::Rtu => format!("rtu:{}", d.serial_port),
                    _ => format!("rtu_over_tcp:{}", d.host),
                };
                match out.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, v)) => v.push(d.clone()),
                    None => out.push((name, vec![d.clone()])),
                }
            }
        }
    }
    out
}

impl Modbus {
    /// Builds every bus and its broker link (call before the broker listens).
    pub fn build(
        devices: &[ModbusDeviceConfig],
        ctx: &Ctx,
        broker: &Broker,
    ) -> Result<Modbus, ModbusError> {
        let metrics = ModbusMetrics::new();
        ctx.registry.add(&*metrics);
        let mut out = Vec::new();
        for (i, (name, devs)) in buses(devices).into_iter().enumerate() {
            let mut bus = Bus::new(name.clone(), &devs, &ctx.gateway_id, metrics.clone());
            bus.show_on(&ctx.board);
            let mut client = broker
                .client(&format!("fieldgate-modbus-{i}"))
                .map_err(|e| ModbusError::from((name.clone(), e)))?;
            for f in bus.filters() {
                client.subscribe(f).map_err(|e| ModbusError::Link {
                    bus: name.clone(),
                    message: format!("subscribe {f}: {e}"),
                })?;
            }
            out.push((bus, client));
        }
        Ok(Modbus { buses: out })
    }

    /// Number of buses.
    pub fn len(&self) -> usize {
        self.buses.len()
    }

    /// Whether there is no bus.
    pub fn is_empty(&self) -> bool {
        self.buses.is_empty()
    }

    /// Starts one task per bus; they stop when `stop` is cancelled.
    pub fn start(self, stop: CancellationToken) -> Running {
        let tasks = self
            .buses
            .into_iter()
            .map(|(bus, client)| {
                let (tx, rx) = client.split();
                let span = tracing::info_span!("modbus", bus = %bus.name());
                tokio::spawn(bus.run(tx, rx, stop.clone()).instrument(span))
            })
            .collect();
        Running::tasks("modbus", stop, tasks)
    }
}
