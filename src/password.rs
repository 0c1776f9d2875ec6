//! Passwords, shared by everything that has a login (the device broker's accounts, the
//! operator page's `[http.admin]`): argon2id PHC hashes as `fieldgate passwd` makes them, their
//! check, a constant-time comparison for other secrets, and [`LoginGuard`], the delay after a
//! failed login.
//!
//! A leaf: it imports nothing from the crate. Invariants: a secret is never compared with
//! `==` (argon2's verifier, or [`constant_time_eq`]); the guard's memory is bounded
//! ([`GUARD_ADDRESSES`] addresses) whatever the number of addresses that try.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    /// A `password_hash` is not an argon2 PHC string; the config is refused (exit 64).
    #[error("not an argon2 PHC string ({0})")]
    BadHash(String),
    /// Hashing failed (out of memory); `fieldgate passwd` exits non-zero, try again.
    #[error("cannot hash the password: {0}")]
    Hash(String),
}

/// Checks that `phc` is an argon2 PHC string (used by config validation).
pub fn check_hash(phc: &str) -> Result<(), PasswordError> {
    let h = PasswordHash::new(phc).map_err(|e| PasswordError::BadHash(e.to_string()))?;
    if !h.algorithm.as_str().starts_with("argon2") {
        return Err(PasswordError::BadHash(format!(
            "algorithm {} instead of argon2id",
            h.algorithm
        )));
    }
    Ok(())
}

/// Hashes `password` as an argon2id PHC string with a random salt (`fieldgate passwd`).
pub fn hash_password(password: &str) -> Result<String, PasswordError> {
    let mut salt = [0u8; 16];
    rand::Rng::fill(&mut rand::rng(), &mut salt[..]);
    let salt = SaltString::encode_b64(&salt).map_err(|e| PasswordError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| PasswordError::Hash(e.to_string()))
}

/// Whether `password` is the one `phc` was made from. Slow on purpose (argon2, about 19 MiB
/// of memory for the check): call it off the async workers, and bound how many run at once.
pub fn verify(phc: &str, password: &[u8]) -> bool {
    PasswordHash::new(phc).is_ok_and(|h| Argon2::default().verify_password(password, &h).is_ok())
}

/// `a == b` in a time that depends on the lengths only, not on where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

/// Most addresses [`LoginGuard`] remembers; past it, forgotten failures go first, then any.
const GUARD_ADDRESSES: usize = 4096;
/// Failures older than this are forgotten.
const GUARD_FORGET: Duration = Duration::from_secs(600);

/// Slows password guessing down per source address: after a failed login, the next attempt
/// from that address waits `base`, doubled per further failure up to 32 x `base`. Memory is
/// bounded by [`GUARD_ADDRESSES`]; connection limits per address bound the parallel tries.
#[derive(Debug)]
pub struct LoginGuard {
    base: Duration,
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl LoginGuard {
    /// `base`: `broker.failed_login_delay` (zero: never delay).
    pub fn new(base: Duration) -> LoginGuard {
        LoginGuard {
            base,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// How long a login attempt from `ip` waits before its password is checked.
    pub fn delay(&self, ip: IpAddr) -> Duration {
        let f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        match f.get(&ip) {
            Some((n, at)) if *n > 0 && at.elapsed() < GUARD_FORGET => {
                self.base * (1u32 << (n - 1).min(5))
            }
            _ => Duration::ZERO,
        }
    }

    /// A login from `ip` failed.
    pub fn failed(&self, ip: IpAddr) {
        if self.base.is_zero() {
            return;
        }
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if f.len() >= GUARD_ADDRESSES && !f.contains_key(&ip) {
            f.retain(|_, (_, at)| at.elapsed() < GUARD_FORGET);
            if f.len() >= GUARD_ADDRESSES {
                if let Some(k) = f.keys().next().copied() {
                    f.remove(&k);
                }
            }
        }
        let e = f.entry(ip).or_insert((0, Instant::now()));
        if e.1.elapsed() >= GUARD_FORGET {
            e.0 = 0;
        }
        *e = (e.0.saturating_add(1), Instant::now());
    }

    /// A login from `ip` succeeded: its failures are forgotten.
    pub fn succeeded(&self, ip: IpAddr) {
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        f.remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_logins_delay_their_address_only_and_success_forgets() {
        let g = LoginGuard::new(Duration::from_millis(100));
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        assert_eq!(g.delay(a), Duration::ZERO);
        let waits: Vec<u128> = (0..8)
            .map(|_| {
                g.failed(a);
                g.delay(a).as_millis()
            })
            .collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 3200, 3200]);
        assert_eq!(g.delay(b), Duration::ZERO);
        g.succeeded(a);
        assert_eq!(g.delay(a), Duration::ZERO);
        let off = LoginGuard::new(Duration::ZERO);
        off.failed(a);
        assert_eq!(off.delay(a), Duration::ZERO);
    }

    #[test]
    fn a_hash_checks_its_password_only() {
        let h = hash_password("s3cret").unwrap();
        check_hash(&h).unwrap();
        assert!(verify(&h, b"s3cret"));
        assert!(!verify(&h, b"s3cret "));
        assert!(!verify("not a hash", b"s3cret"));
        assert!(check_hash("$pbkdf2$x").is_err());
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
