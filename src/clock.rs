//! The wall clock, in the one unit the gateway stores and publishes: milliseconds since the
//! Unix epoch.
//!
//! A leaf: it imports nothing from the crate. Record accept times in the queue, reading
//! timestamps, heartbeats and OTA reports all read it here, so a test or a port has one
//! place to look. Durations and deadlines use `std::time::Instant` (monotonic) instead.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch; 0 if the system clock is set before 1970.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
