//! Sign-in for the operator page and its API (`[http.admin]`): the accounts, the sessions,
//! and the cookie that carries one.
//!
//! Owns the session table. Invariants:
//! - a session is a 256-bit random token handed out only in a `Set-Cookie` that is
//!   `HttpOnly; SameSite=Strict` (and `Secure` over TLS), so page scripts cannot read it and
//!   another site cannot make the browser send it; the table keeps the token's SHA-256, not
//!   the token, and looks it up by that digest (no comparison on the secret itself);
//! - the table is bounded ([`MAX_SESSIONS`]): a sign-in past it ends the session closest to
//!   expiry; expired sessions are gone at the next lookup;
//! - one password check at a time (argon2 holds ~19 MiB while it runs), off the async
//!   workers; an unknown user costs the same check as a known one (a hash made at start), so
//!   the answer's timing does not tell which names exist;
//! - a wrong password is answered only after the [`LoginGuard`] delay of its address (the
//!   base delay, doubled per further failure), and a try from an address with recent
//!   failures waits that long before its password is checked at all.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::config::AdminConfig;
use crate::password::{self, LoginGuard};

/// The cookie's name.
pub const COOKIE: &str = "fieldgate_session";
/// Most sessions kept at once.
pub const MAX_SESSIONS: usize = 64;

/// A sign-in's outcome.
pub enum SignIn {
    /// The `Set-Cookie` value that carries the new session.
    Ok(String),
    /// Wrong user or password (already delayed).
    Refused,
}

struct Session {
    user: String,
    expires: Instant,
}

/// The accounts and the live sessions.
pub struct Login {
    users: HashMap<String, String>,
    /// Checked for an unknown user, so that costs what a known one does.
    decoy: String,
    guard: LoginGuard,
    checks: Semaphore,
    ttl: Duration,
    secure: bool,
    sessions: Mutex<HashMap<[u8; 32], Session>>,
}

impl Login {
    /// From validated `[http.admin]`; `secure`: the endpoint speaks TLS (the cookie says
    /// `Secure`). Makes one argon2 hash (the decoy), so call it at start.
    pub fn new(cfg: &AdminConfig, secure: bool) -> Login {
        let users = cfg
            .users
            .iter()
            .map(|u| (u.username.clone(), u.password_hash.clone()))
            .collect();
        let mut noise = [0u8; 16];
        rand::Rng::fill(&mut rand::rng(), &mut noise[..]);
        let decoy = password::hash_password(&hex(&noise)).unwrap_or_default();
        Login {
            users,
            decoy,
            guard: LoginGuard::new(cfg.failed_login_delay),
            checks: Semaphore::new(1),
            ttl: cfg.session_ttl,
            secure,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// The user of the session named by the request's `Cookie` header, and how long it has
    /// left; `None` without a cookie or for an unknown or expired session.
    pub fn session(&self, cookie_header: Option<&str>) -> Option<(String, Duration)> {
        let key = digest(session_token(cookie_header?)?);
        let mut s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        s.retain(|_, v| v.expires > now);
        s.get(&key)
            .map(|v| (v.user.clone(), v.expires.saturating_duration_since(now)))
    }

    /// Checks `user`/`pass` from `ip`; on success starts a session.
    pub async fn sign_in(&self, ip: IpAddr, user: &str, pass: &str) -> SignIn {
        tokio::time::sleep(self.guard.delay(ip)).await;
        let (phc, known) = match self.users.get(user) {
            Some(phc) => (phc.clone(), true),
            None => (self.decoy.clone(), false),
        };
        let ok = {
            let Ok(_one) = self.checks.acquire().await else {
                return SignIn::Refused;
            };
            let pass = pass.as_bytes().to_vec();
            tokio::task::spawn_blocking(move || password::verify(&phc, &pass))
                .await
                .unwrap_or(false)
        };
        if !(ok && known) {
            self.guard.failed(ip);
            tokio::time::sleep(self.guard.delay(ip)).await;
            return SignIn::Refused;
        }
        self.guard.succeeded(ip);
        let mut raw = [0u8; 32];
        rand::Rng::fill(&mut rand::rng(), &mut raw[..]);
        let token = hex(&raw);
        let now = Instant::now();
        let mut s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        s.retain(|_, v| v.expires > now);
        if s.len() >= MAX_SESSIONS {
            let first = s.iter().min_by_key(|(_, v)| v.expires).map(|(k, _)| *k);
            if let Some(k) = first {
                s.remove(&k);
            }
        }
        s.insert(
            digest(&token),
            Session {
                user: user.to_string(),
                expires: now + self.ttl,
            },
        );
        SignIn::Ok(self.cookie(&token, self.ttl.as_secs()))
    }

    /// Ends the request's session; the `Set-Cookie` value that clears the cookie.
    pub fn sign_out(&self, cookie_header: Option<&str>) -> String {
        if let Some(t) = cookie_header.and_then(session_token) {
            let mut s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            s.remove(&digest(t));
        }
        self.cookie("", 0)
    }

    fn cookie(&self, token: &str, max_age: u64) -> String {
        let secure = if self.secure { "; Secure" } else { "" };
        format!("{COOKIE}={token}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}")
    }
}

/// Our token in a `Cookie` header (`a=1; fieldgate_session=...`).
fn session_token(header: &str) -> Option<&str> {
    header.split(';').find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        (k == COOKIE && !v.is_empty()).then_some(v)
    })
}

fn digest(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Where to go after signing in: `next` if it is a path on this endpoint, else `/` (never
/// another site: `//host` and `/\host` are refused).
pub fn safe_next(next: Option<&str>) -> &str {
    match next {
        Some(n)
            if n.starts_with('/') && !n.starts_with("//") && !n.contains(['\\', '\r', '\n']) =>
        {
            n
        }
        _ => "/",
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::AdminUser;
    use super::*;

    fn login(delay_ms: u64) -> Login {
        Login::new(
            &AdminConfig {
                users: vec![AdminUser {
                    username: "op".into(),
                    password_hash: password::hash_password("right").unwrap(),
                }],
                session_ttl: Duration::from_secs(60),
                failed_login_delay: Duration::from_millis(delay_ms),
            },
            true,
        )
    }

    fn cookie_of(set_cookie: &str) -> String {
        set_cookie.split(';').next().unwrap().to_string()
    }

    #[tokio::test]
    async fn a_session_lives_until_sign_out_and_is_kept_as_a_digest() {
        let l = login(0);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let SignIn::Ok(set) = l.sign_in(ip, "op", "right").await else {
            panic!("refused")
        };
        for attr in [
            "HttpOnly",
            "SameSite=Strict",
            "Secure",
            "Path=/",
            "Max-Age=60",
        ] {
            assert!(set.contains(attr), "{set}");
        }
        let c = cookie_of(&set);
        let token = c.strip_prefix("fieldgate_session=").unwrap();
        assert_eq!(token.len(), 64);
        let header = format!("theme=dark; {c}");
        let (user, left) = l.session(Some(&header)).expect("session");
        assert_eq!(user, "op");
        assert!(left <= Duration::from_secs(60));
        assert!(
            !l.sessions.lock().unwrap().contains_key(token.as_bytes()),
            "kept by digest"
        );
        assert!(l.session(Some("fieldgate_session=00")).is_none());
        assert!(l.session(None).is_none());
        let cleared = l.sign_out(Some(&header));
        assert!(cleared.contains("Max-Age=0"), "{cleared}");
        assert!(l.session(Some(&header)).is_none());
    }

    #[tokio::test]
    async fn wrong_passwords_and_unknown_users_are_refused_and_delayed() {
        let l = login(50);
        let ip: IpAddr = "10.0.0.2".parse().unwrap();
        let t = Instant::now();
        assert!(matches!(
            l.sign_in(ip, "op", "wrong").await,
            SignIn::Refused
        ));
        assert!(t.elapsed() >= Duration::from_millis(50));
        assert!(matches!(
            l.sign_in(ip, "nobody", "right").await,
            SignIn::Refused
        ));
        // The decoy hash is a real one: an unknown user with the decoy's password is refused.
        assert!(matches!(l.sign_in(ip, "", "").await, SignIn::Refused));
        assert!(matches!(l.sign_in(ip, "op", "right").await, SignIn::Ok(_)));
    }

    #[tokio::test]
    async fn the_table_is_bounded() {
        let l = login(0);
        let ip: IpAddr = "10.0.0.3".parse().unwrap();
        for _ in 0..MAX_SESSIONS + 3 {
            assert!(matches!(l.sign_in(ip, "op", "right").await, SignIn::Ok(_)));
        }
        assert_eq!(l.sessions.lock().unwrap().len(), MAX_SESSIONS);
    }

    #[test]
    fn next_stays_on_this_endpoint() {
        assert_eq!(safe_next(Some("/api/v1/status")), "/api/v1/status");
        for bad in [
            "//evil.example/",
            "https://evil.example/",
            "/\\evil",
            "",
            "x",
        ] {
            assert_eq!(safe_next(Some(bad)), "/", "{bad}");
        }
        assert_eq!(safe_next(None), "/");
    }
}
