//! Small helpers every part of the harness uses: test ports that never collide, and the
//! bounded polling loop that stands in for sleeping (a deadline bounds the wait; nothing
//! asserts how long it took).

use std::net::TcpListener as StdListener;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1, never the same twice in one test process.
///
/// Ports come from a per-process counter below the kernel's ephemeral range (32768+), so
/// tests running in parallel cannot be handed the same port, and outgoing connections cannot
/// take it meanwhile.
pub fn free_port() -> u16 {
    use std::sync::atomic::AtomicU16;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        12_000 + (std::process::id() % 600) as u16 * 30,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let p = NEXT.fetch_add(1, Ordering::SeqCst);
        assert!(p < 32_000, "ran out of test ports");
        if StdListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

/// Polls `f` until it returns true or `within` passes. Returns the last answer.
pub async fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of environment variable `name` (a bench's or a test's knob), or `default` when
/// it is unset or does not parse.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
