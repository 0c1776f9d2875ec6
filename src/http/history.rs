//! The last hour of the queue, in memory: one [`Point`] every [`INTERVAL`] (queued records,
//! age of the oldest unsent record, messages in and out per second), at most [`POINTS`] of
//! them. It is the `history` of `/api/v1/status` and the chart on the operator page.
//!
//! Invariants:
//! - one task ([`run`]) writes it; it reads only gauges and counters the queue already keeps
//!   (`store.records()`, the oldest age, `fieldgate_messages_in_total` and `_out_total`), so
//!   the data path does nothing more for it: no lock, no allocation per message;
//! - the ring never holds more than [`POINTS`] points (the oldest goes first); its lock is
//!   taken once per sample and once per API request, never by the data path;
//! - a rate is the counter's growth over the time since the previous sample, measured on the
//!   monotonic clock; the first point comes one interval after the start (the baseline).
//!   After a restart the history starts empty.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// Time between two points.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// Points kept: one hour at [`INTERVAL`].
pub const POINTS: usize = 360;

/// One sample of the queue.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    /// Wall clock, Unix ms.
    pub t: u64,
    /// Records in the queue.
    pub records: u64,
    /// Age of the oldest unsent record, seconds (0 when the queue is empty).
    pub oldest_age_seconds: f64,
    /// Messages accepted into the queue per second since the previous point.
    pub in_per_second: f64,
    /// Messages the cloud acknowledged per second since the previous point.
    pub out_per_second: f64,
}

/// What the sampler reads each interval.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reading {
    /// Records in the queue.
    pub records: u64,
    /// Age of the oldest unsent record, seconds.
    pub oldest_age_seconds: f64,
    /// `fieldgate_messages_in_total`.
    pub messages_in: u64,
    /// `fieldgate_messages_out_total`.
    pub messages_out: u64,
}

/// The ring of points (see the module header).
#[derive(Debug, Default)]
pub struct History {
    points: Mutex<VecDeque<Point>>,
}

impl History {
    /// An empty history.
    pub fn new() -> Arc<History> {
        Arc::new(History::default())
    }

    /// Appends `p`, dropping the oldest point beyond [`POINTS`].
    pub fn push(&self, p: Point) {
        let mut pts = self.points.lock().unwrap_or_else(|e| e.into_inner());
        if pts.len() == POINTS {
            pts.pop_front();
        }
        pts.push_back(p);
    }

    /// The points, oldest first.
    pub fn points(&self) -> Vec<Point> {
        let pts = self.points.lock().unwrap_or_else(|e| e.into_inner());
        pts.iter().copied().collect()
    }

    /// The newest point, if there is one.
    pub fn last(&self) -> Option<Point> {
        let pts = self.points.lock().unwrap_or_else(|e| e.into_inner());
        pts.back().copied()
    }
}

/// Samples `read` every `interval` into `history` until `stop` is cancelled. The first
/// reading is the baseline of the first rates; points follow one per interval. A tick that
/// comes late (a busy runtime) measures its rates over the real time since the last one.
pub async fn run(
    history: Arc<History>,
    interval: Duration,
    mut read: impl FnMut() -> Reading + Send,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticks.tick().await;
    let mut prev = read();
    let mut prev_at = Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let now = read();
        let at = Instant::now();
        let secs = at.duration_since(prev_at).as_secs_f64().max(1e-3);
        let per_second = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
        history.push(Point {
            t: crate::clock::now_ms(),
            records: now.records,
            oldest_age_seconds: now.oldest_age_seconds,
            in_per_second: per_second(now.messages_in, prev.messages_in),
            out_per_second: per_second(now.messages_out, prev.messages_out),
        });
        prev = now;
        prev_at = at;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[tokio::test(start_paused = true)]
    async fn one_point_per_interval_with_rates_and_at_most_an_hour() {
        let history = History::new();
        let stop = CancellationToken::new();
        // The counters grow by 50 in and 30 out per second; the queue by 20 records.
        let started = Instant::now();
        let messages = Arc::new(AtomicU64::new(0));
        let m = messages.clone();
        let read = move || {
            let s = started.elapsed().as_secs();
            m.store(s, Ordering::Relaxed);
            Reading {
                records: 20 * s,
                oldest_age_seconds: s as f64,
                messages_in: 50 * s,
                messages_out: 30 * s,
            }
        };
        let task = tokio::spawn(run(history.clone(), INTERVAL, read, stop.clone()));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(
            history.points().is_empty(),
            "the first point waits one interval"
        );
        tokio::time::sleep(Duration::from_secs(10)).await;
        let pts = history.points();
        assert_eq!(pts.len(), 1);
        assert_eq!(pts[0].records, 200);
        assert_eq!(pts[0].oldest_age_seconds, 10.0);
        assert!((pts[0].in_per_second - 50.0).abs() < 1e-6, "{pts:?}");
        assert!((pts[0].out_per_second - 30.0).abs() < 1e-6, "{pts:?}");
        // Two hours later: one hour of points, the newest last.
        tokio::time::sleep(Duration::from_secs(7200)).await;
        let pts = history.points();
        assert_eq!(pts.len(), POINTS);
        let newest = messages.load(Ordering::Relaxed);
        assert_eq!(history.last().map(|p| p.records), Some(20 * newest));
        assert!(pts.windows(2).all(|w| w[1].records - w[0].records == 200));
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_counter_that_goes_back_reads_as_zero_not_a_huge_rate() {
        let history = History::new();
        let stop = CancellationToken::new();
        let mut n = 0u64;
        let read = move || {
            n += 1;
            Reading {
                messages_in: if n == 1 { 100 } else { 0 },
                ..Reading::default()
            }
        };
        let task = tokio::spawn(run(history.clone(), INTERVAL, read, stop.clone()));
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(history.points()[0].in_per_second, 0.0);
        stop.cancel();
        task.await.unwrap();
    }
}
