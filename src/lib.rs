//! fieldgate: an edge gateway that never loses a reading.
//!
//! One process: an embedded MQTT broker for local devices ([`broker`], [`frontend`]); the
//! path of every message meant for the cloud, which enters at [`ingest`], becomes durable in
//! the [`store`]'s journal before its publisher is acknowledged, and leaves through the TLS
//! [`bridge`] to a cloud MQTT broker, which carries commands back down. [`gateway::run`]
//! wires them together; `main` only parses the command line, loads the [`config`] and maps
//! errors to exit codes.

pub mod board;
pub mod bridge;
pub mod broker;
pub mod clock;
pub mod component;
pub mod config;
pub mod form;
pub mod frontend;
pub mod gateway;
pub mod http;
pub mod ingest;
pub mod local;
pub mod marks;
pub mod metrics;
pub mod ota;
pub mod pacing;
pub mod password;
pub mod problem;
pub mod retained;
pub mod sources;
pub mod sparkplug;
pub mod store;

pub mod tls;
pub mod topic;
pub mod watchdog;

pub use config::Settings;
pub use gateway::run;

/// glibc gives threads that allocate their own malloc arenas (up to eight per core), and the
/// threads of sled, rumqttd, the journal and the runtimes then keep freed memory in many of
/// them. Two arenas kept a restart with 1M queued records at 154 MiB instead of 210 (`cargo
/// bench --bench store`). `MALLOC_ARENA_MAX` set in the environment wins.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes allocator tuning; call it before any thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}
