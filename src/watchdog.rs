//! systemd integration: `READY=1` once the pipeline runs, `STOPPING=1` when an orderly stop
//! begins, and `WATCHDOG=1` pings that are sent only while the pipeline is alive.
//!
//! Each long-running loop (uplink tap, committer, bridge) owns a [`Heartbeat`] and beats it
//! every time round. The watchdog task pings systemd every half watchdog interval, but only if
//! every heartbeat is younger than that half interval; a loop that is stuck (blocked disk,
//! deadlocked bridge) therefore stops the pings and systemd restarts the service. Everything
//! here is a no-op when `NOTIFY_SOCKET` / `WATCHDOG_USEC` are not set.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::clock::now_ms;

/// The last time a loop made progress (ms since the Unix epoch). Cheap to clone and share.
#[derive(Clone, Debug)]
pub struct Heartbeat {
    name: &'static str,
    last: Arc<AtomicU64>,
}

impl Heartbeat {
    /// A heartbeat that has just beaten.
    pub fn new(name: &'static str) -> Heartbeat {
        Heartbeat {
            name,
            last: Arc::new(AtomicU64::new(now_ms())),
        }
    }

    /// Records progress.
    pub fn beat(&self) {
        self.last.store(now_ms(), Ordering::Relaxed);
    }

    /// Time since the last beat.
    pub fn age(&self, now_ms: u64) -> Duration {
        Duration::from_millis(now_ms.saturating_sub(self.last.load(Ordering::Relaxed)))
    }
}

/// The first heartbeat older than `limit`, if any.
pub fn stalled(beats: &[Heartbeat], limit: Duration, now_ms: u64) -> Option<&'static str> {
    beats.iter().find(|b| b.age(now_ms) > limit).map(|b| b.name)
}

/// Tells systemd the gateway is ready (no-op outside systemd).
pub fn ready(status: &str) {
    if let Err(e) = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]) {
        warn!(error = %e, "cannot notify systemd of readiness");
    }
}

/// Tells systemd an orderly stop has begun.
pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}

/// Runs the watchdog loop until `stop`, if systemd asked for one.
pub async fn run(beats: Vec<Heartbeat>, stop: CancellationToken) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let half = interval / 2;
    debug!(?interval, "systemd watchdog enabled");
    let mut tick = tokio::time::interval(half);
    let mut was_stalled = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match stalled(&beats, half, now_ms()) {
            None => {
                was_stalled = false;
                let _ = sd_notify::notify(&[NotifyState::Watchdog]);
            }
            Some(name) => {
                if !was_stalled {
                    warn!(
                        component = name,
                        "pipeline stalled; withholding the systemd watchdog ping"
                    );
                }
                was_stalled = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_heartbeat_stops_the_pings() {
        let tap = Heartbeat::new("uplink_tap");
        let bridge = Heartbeat::new("cloud");
        let now = now_ms();
        let limit = Duration::from_secs(5);
        assert_eq!(stalled(&[tap.clone(), bridge.clone()], limit, now), None);
        // Ten seconds later only the tap has beaten.
        tap.last.store(now + 10_000, Ordering::Relaxed);
        assert_eq!(stalled(&[tap, bridge], limit, now + 10_000), Some("cloud"));
    }
}
