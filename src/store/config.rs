//! `[store]`: the queue's bounds, what it does when full, and its page cache; the section's
//! types and their validation.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::problem::{problem, Problem};

/// What the queue does when it is full.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FullPolicy {
    /// Delete the oldest records to make room; each deleted record is counted.
    DropOldest,
    /// Refuse the new record; each refused record is counted.
    RejectNew,
}

/// `[store]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Most bytes of queued records (topic + payload + header).
    pub max_bytes: u64,
    /// Records older than this are dropped (counted as `expired`). `0s`: no age limit.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// `drop_oldest` or `reject_new`.
    pub full_policy: FullPolicy,
    /// No effect (kept so that old configs load): every cloud-bound message is fsynced before
    /// its publisher is acknowledged, in group commits that follow each other back to back.
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// sled page cache, in bytes.
    pub cache_bytes: u64,
    /// While the cloud link is up: device acknowledgements wait (at most [`LIVE_HOLD`]) while
    /// more than this many durable records wait to be sent live. Keeps the delay to the cloud
    /// bounded when devices publish faster than the link drains; never applies during an
    /// outage or to a replayed backlog. 0: off.
    ///
    /// [`LIVE_HOLD`]: crate::store::journal::LIVE_HOLD
    pub live_window: u64,
    /// Most dead letters kept (records an MQTT 5 cloud refused for good, see
    /// [`crate::store::dead`]); beyond it the oldest goes, counted as
    /// `dropped{reason="dead_letters_full"}`. 0: a refused record is dropped at once.
    pub max_dead_letters: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            max_bytes: 1024 * 1024 * 1024,
            max_age: Duration::from_secs(7 * 24 * 3600),
            full_policy: FullPolicy::DropOldest,
            commit_interval: Duration::from_millis(100),
            cache_bytes: 32 * 1024 * 1024,
            live_window: 4096,
            max_dead_letters: 10_000,
        }
    }
}

impl StoreConfig {
    /// Every problem of `[store]`.
    pub fn validate(&self) -> Vec<Problem> {
        let mut p = Vec::new();
        let st = self;
        if st.max_bytes < 1024 * 1024 {
            p.push(problem(
                "store.max_bytes",
                "must be at least 1048576 (1 MiB)",
            ));
        }
        if st.commit_interval < Duration::from_millis(1)
            || st.commit_interval > Duration::from_secs(10)
        {
            p.push(problem(
                "store.commit_interval",
                "must be between 1ms and 10s; the default 100ms bounds what a power cut can cost",
            ));
        }
        if st.cache_bytes < 1024 * 1024 {
            p.push(problem(
                "store.cache_bytes",
                "must be at least 1048576 (1 MiB)",
            ));
        }
        p
    }
}
