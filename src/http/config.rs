//! `[http]`: the operator endpoint's section (`/metrics`, `/health`, the OTA routes, and with
//! the page on, the operator page and its JSON API under `/api/v1`), its login accounts
//! (`[http.admin]`), the `/metrics` token and TLS (`[http.tls]`, the keys of a broker
//! listener's TLS).
//!
//! The rule this section enforces: **the page and the API are never served beyond loopback
//! without a login.** With accounts in `[[http.admin.users]]` every page and API request
//! needs a session (on loopback too). Without accounts, on an address beyond loopback, an
//! explicit `page = true` is a configuration problem, and an unset `page` turns the page off
//! with a notice (so a config that only exposed `/metrics` keeps working after an upgrade).
//!
//! The section was called `[metrics]` before the page existed. That name still loads: its
//! keys map onto `[http]` (see [`crate::config`], which owns the section names), with one
//! warning naming the new key. Both sections at once are a configuration problem.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::problem::{problem, Problem};
use crate::tls::ServerTlsConfig;

/// `[http]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Serve the endpoint at all (`/metrics`, `/health`, OTA routes, the page).
    pub enabled: bool,
    /// Address of the HTTP endpoint. Beyond loopback the page needs `[http.admin]` accounts.
    pub listen: SocketAddr,
    /// Serve the operator page (`/`) and its JSON API (`/api/v1/...`). Unset: on when
    /// `listen` is loopback or `[http.admin]` has accounts, else off (see the module header).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page: Option<bool>,
    /// When not empty, `GET /metrics` needs `Authorization: Bearer <metrics_token>`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub metrics_token: String,
    /// Login accounts for the page and the API.
    pub admin: AdminConfig,
    /// HTTPS instead of HTTP. Absent: plain HTTP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServerTlsConfig>,
}

/// `[http.admin]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Who may sign in. None: no login (only allowed on loopback).
    pub users: Vec<AdminUser>,
    /// How long a session lasts after sign-in.
    #[serde(with = "humantime_serde")]
    pub session_ttl: Duration,
    /// A wrong password is answered after this long, doubled per further failure from the
    /// same address (up to 32x).
    #[serde(with = "humantime_serde")]
    pub failed_login_delay: Duration,
}

/// `[[http.admin.users]]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminUser {
    /// The name typed at sign-in.
    pub username: String,
    /// argon2id PHC string from `fieldgate passwd` (plain-text passwords are not accepted).
    pub password_hash: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9183)),
            page: None,
            metrics_token: String::new(),
            admin: AdminConfig::default(),
            tls: None,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            users: Vec::new(),
            session_ttl: Duration::from_secs(8 * 3600),
            failed_login_delay: Duration::from_secs(1),
        }
    }
}

impl HttpConfig {
    /// Whether the page and the API are served (the rule of the module header).
    pub fn serves_page(&self) -> bool {
        self.enabled
            && self
                .page
                .unwrap_or(self.listen.ip().is_loopback() || self.login_required())
    }

    /// Whether page and API requests need a session: there are accounts.
    pub fn login_required(&self) -> bool {
        !self.admin.users.is_empty()
    }

    /// The notice for a page turned off by the rule (`page` unset, beyond loopback, no
    /// accounts), if that is the case.
    pub fn page_off_notice(&self) -> Option<String> {
        (self.enabled && self.page.is_none() && !self.serves_page()).then(|| {
            format!(
                "http.page is off: http.listen {} is beyond loopback and [http.admin] has no \
                 users; add [[http.admin.users]] (password_hash from `fieldgate passwd`) to \
                 serve the page with a login, or set http.page = false to silence this",
                self.listen
            )
        })
    }

    /// Every problem of the section.
    pub fn validate(&self) -> Vec<Problem> {
        let mut p = Vec::new();
        if !self.enabled {
            return p;
        }
        if self.page == Some(true) && !self.listen.ip().is_loopback() && !self.login_required() {
            p.push(problem(
                "http.page",
                format!(
                    "the page would be open to anyone who reaches {} (beyond loopback) without \
                     a login; add [[http.admin.users]] with a password_hash from `fieldgate \
                     passwd`, or listen on 127.0.0.1, or set page = false",
                    self.listen
                ),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, u) in self.admin.users.iter().enumerate() {
            let key = format!("http.admin.users[{i}]");
            if u.username.is_empty() || u.username.len() > 64 {
                p.push(problem(format!("{key}.username"), "use 1-64 characters"));
            } else if !seen.insert(u.username.as_str()) {
                p.push(problem(
                    format!("{key}.username"),
                    format!("{:?} is listed twice; keep one entry", u.username),
                ));
            }
            if let Err(e) = crate::password::check_hash(&u.password_hash) {
                p.push(problem(
                    format!("{key}.password_hash"),
                    format!("{e}; make one with `fieldgate passwd`"),
                ));
            }
        }
        let a = &self.admin;
        if a.session_ttl < Duration::from_secs(60)
            || a.session_ttl > Duration::from_secs(30 * 86400)
        {
            p.push(problem(
                "http.admin.session_ttl",
                "use between 1m and 30d, e.g. \"8h\"",
            ));
        }
        if a.failed_login_delay > Duration::from_secs(60) {
            p.push(problem(
                "http.admin.failed_login_delay",
                "longer than 60s would lock people out; use e.g. \"1s\"",
            ));
        }
        let t = &self.metrics_token;
        if !t.is_empty() && (t.len() < 16 || !t.bytes().all(|b| b.is_ascii_graphic())) {
            p.push(problem(
                "http.metrics_token",
                "use at least 16 printable characters without spaces, e.g. the output of \
                 `openssl rand -hex 16`",
            ));
        }
        if let Some(t) = &self.tls {
            crate::tls::check_server(&mut p, "http.tls", t);
        }
        p
    }
}
