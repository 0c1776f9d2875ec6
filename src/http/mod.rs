//! The operator endpoint: `GET /metrics` (Prometheus text) and `GET /health` (JSON), the OTA
//! routes when OTA is enabled (`/ota/image/...`, `/ota/status...`; they live with OTA, see
//! [`crate::ota::http`]), and with `http.page` the operator page (`/`, `/ui/...`, files built
//! into the binary, see [`ui`]) and its JSON API (`/api/v1/...`, see [`api`], docs/api.md).
//!
//! A deliberately tiny HTTP/1.1 server: one request per connection, request head at most
//! 8 KiB and a body at most 4 KiB, 5 s to send them (and to finish a TLS handshake), then the
//! connection is closed; at most [`MAX_CONNECTIONS`] at once (past it a connection is closed
//! unanswered). Small answers must be written within 5 s (image transfers have their own
//! bound, see [`crate::ota::http`]). `GET` is served (and `HEAD` for OTA images), `POST` only
//! for `/login` and `/logout`: another method is `405`, an unknown path `404`, a request line
//! that does not parse `400`. It only reads shared state, so a slow or hostile client cannot
//! stall the pipeline. With the page, one more task runs beside the accept loop: the
//! [`history`] sampler, every 10 s.
//!
//! Access (see [`config`] for the rule, [`login`] for sessions): with `[http.admin]`
//! accounts the page and `/api/v1` need a session (the page redirects to `/login`, the API
//! answers `401`), or over TLS with `client_cert` a verified client certificate (its CN is
//! the user); `/ui/*` (the page's script and styles, no data) stays open so the sign-in form
//! has its styles. `/metrics` needs `Authorization: Bearer <http.metrics_token>` when one is
//! set. `/health` and the OTA routes stay open: systemd checks and devices fetching images
//! have no login (OTA has its own limits, see [`crate::ota::http`]).
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::bridge::metrics::CloudMetrics;
use crate::component::Running;
use crate::metrics::Registry;
use crate::ota::http::SMALL;
use crate::store::Store;

pub mod api;
pub mod config;
pub mod history;
pub mod login;
pub mod metrics;
pub mod ui;
pub use api::{PageInfo, PageSource};
pub use config::HttpConfig;

/// What `/health` reports besides the metrics.
#[derive(Clone)]
pub struct HealthSource {
    /// Every component's metrics, for `/metrics`.
    pub registry: Arc<Registry>,
    /// The cloud link's state.
    pub cloud: Arc<CloudMetrics>,
    /// The queue.
    pub store: Arc<Store>,
    /// Whether a cloud is configured.
    pub cloud_enabled: bool,
    /// Gateway id.
    pub gateway_id: String,
    /// The OTA manager's handle, when OTA is enabled.
    pub ota: Option<crate::ota::OtaHandle>,
    /// The operator page's sources; `None` with `http.page = false`.
    pub page: Option<PageSource>,
}

impl HealthSource {
    /// The cloud link: `connected`, `disconnected` or `disabled` (no `[cloud]`).
    pub fn cloud_state(&self) -> &'static str {
        if !self.cloud_enabled {
            "disabled"
        } else if self.cloud.cloud_connected.get() == 1 {
            "connected"
        } else {
            "disconnected"
        }
    }

    /// `degraded` while the cloud is disconnected or the queue refuses writes, else `ok`.
    pub fn overall(&self) -> &'static str {
        let refusing = self.store.metrics().store_refusing_cause().is_some();
        if refusing || self.cloud_state() == "disconnected" {
            "degraded"
        } else {
            "ok"
        }
    }

    /// The `/health` document.
    pub fn json(&self) -> serde_json::Value {
        let m = self.store.metrics();
        let cloud = self.cloud_state();
        let refusing = m.store_refusing_cause();
        serde_json::json!({
            "status": self.overall(),
            "gateway_id": self.gateway_id,
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": self.registry.uptime_secs(),
            "cloud": cloud,
            "queue": {
                "records": self.store.records(),
                "bytes": self.store.bytes(),
                "oldest_age_seconds": self.store.oldest_age().map(|d| d.as_secs_f64()).unwrap_or(0.0),
            },
            "messages_in": m.messages_in.get(),
            "messages_out": m.messages_out.get(),
            "store_quarantined": m.store_quarantined.get() == 1,
            "store": match refusing {
                None => serde_json::json!({ "state": "ok" }),
                Some(cause) => serde_json::json!({ "state": "refusing", "cause": cause }),
            },
        })
    }
}

/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 128;
/// Largest request body read (`POST /login`).
const MAX_BODY: usize = 4096;

/// Who may see what: the accounts and sessions, the `/metrics` token.
struct Access {
    /// `None`: no accounts, the page and the API are open (on loopback only, by config).
    login: Option<login::Login>,
    metrics_token: String,
    metrics: metrics::HttpMetrics,
}

/// What every connection shares.
struct Shared {
    health: HealthSource,
    access: Access,
}

/// The endpoint, bound and ready to serve.
pub struct Http {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
}

/// Why the endpoint cannot start.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// `http.listen` cannot be bound (in use, no such address).
    #[error("http.listen {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// `[http.tls]` cannot be used.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

impl Http {
    /// Binds `[http].listen` and loads `[http.tls]`; a port in use or bad TLS material fails
    /// here, at start-up.
    pub async fn build(cfg: &HttpConfig, health: HealthSource) -> Result<Http, HttpError> {
        let tls = match &cfg.tls {
            Some(t) => Some(TlsAcceptor::from(crate::tls::server_config("http.tls", t)?)),
            None => None,
        };
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| HttpError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let login = cfg
            .login_required()
            .then(|| login::Login::new(&cfg.admin, tls.is_some()));
        let access = Access {
            login,
            metrics_token: cfg.metrics_token.clone(),
            metrics: metrics::HttpMetrics::default(),
        };
        health.registry.add(&access.metrics);
        Ok(Http {
            listener,
            tls,
            shared: Arc::new(Shared { health, access }),
        })
    }

    /// Serves until `stop` is cancelled; with the page, samples the queue's history too.
    pub fn start(self, stop: CancellationToken) -> Running {
        let mut tasks = Vec::new();
        if let Some(page) = &self.shared.health.page {
            let store = self.shared.health.store.clone();
            let read = move || {
                let m = store.metrics();
                history::Reading {
                    records: store.records(),
                    oldest_age_seconds: store.oldest_age().map(|d| d.as_secs_f64()).unwrap_or(0.0),
                    messages_in: m.messages_in.get(),
                    messages_out: m.messages_out.get(),
                }
            };
            tasks.push(tokio::spawn(history::run(
                page.history.clone(),
                history::INTERVAL,
                read,
                stop.clone(),
            )));
        }
        tasks.push(tokio::spawn(serve(self, stop.clone())));
        Running::tasks("http", stop, tasks)
    }
}

/// Serves until `stop` is cancelled.
async fn serve(http: Http, stop: CancellationToken) {
    let Http {
        listener,
        tls,
        shared,
    } = http;
    if let Ok(a) = listener.local_addr() {
        info!(
            addr = %a,
            page = shared.health.page.is_some(),
            login = shared.access.login.is_some(),
            tls = tls.is_some(),
            "http endpoint listening"
        );
    }
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((sock, peer)) => {
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        shared.access.metrics.refuse("busy");
                        debug!(%peer, "http: too many connections, closed");
                        continue;
                    };
                    let (shared, tls) = (shared.clone(), tls.clone());
                    // Bounded by its own timeouts (see the module header); ends by itself.
                    tokio::spawn(async move {
                        let _slot = slot;
                        let peer = peer.ip();
                        match tls {
                            None => {
                                let _ = handle(sock, peer, None, &shared).await;
                            }
                            Some(acceptor) => {
                                let Ok(Ok(s)) = tokio::time::timeout(SMALL, acceptor.accept(sock)).await else {
                                    return;
                                };
                                let cert_user = s
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .and_then(|c| c.first())
                                    .and_then(crate::tls::common_name);
                                let _ = handle(s, peer, cert_user, &shared).await;
                            }
                        }
                    });
                }
                Err(e) => {
                    debug!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// The request head (up to the blank line) and the body bytes read with it.
async fn read_head<S: AsyncRead + Unpin>(
    sock: &mut S,
) -> std::io::Result<Option<(String, Vec<u8>)>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok(Some((String::from_utf8_lossy(&buf).into_owned(), rest)));
        }
        let n = sock.read(&mut chunk).await?;
        if n == 0 || buf.len() > 8192 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The body of a request whose head is `head` (`Content-Length`, at most [`MAX_BODY`]);
/// `None` when it is too long or does not arrive.
async fn read_body<S: AsyncRead + Unpin>(
    sock: &mut S,
    head: &str,
    mut got: Vec<u8>,
) -> Option<Vec<u8>> {
    let len: usize = header(head, "content-length")?.parse().ok()?;
    if len > MAX_BODY {
        return None;
    }
    let mut chunk = [0u8; 1024];
    while got.len() < len {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&chunk[..n]);
    }
    got.truncate(len);
    Some(got)
}

/// One answer: status line, content type, body, how it may be cached (`no-store` for
/// documents, `no-cache` for the page's files), and any further header lines.
struct Answer {
    status: &'static str,
    ctype: &'static str,
    body: std::borrow::Cow<'static, str>,
    cache: &'static str,
    extra: String,
}

impl Answer {
    fn json(status: &'static str, v: serde_json::Value) -> Answer {
        Answer {
            status,
            ctype: "application/json",
            body: v.to_string().into(),
            cache: "no-store",
            extra: String::new(),
        }
    }

    fn text(status: &'static str, body: &'static str) -> Answer {
        Answer {
            status,
            ctype: "text/plain; charset=utf-8",
            body: body.into(),
            cache: "no-store",
            extra: String::new(),
        }
    }

    fn html(status: &'static str, body: String) -> Answer {
        Answer {
            status,
            ctype: "text/html; charset=utf-8",
            body: body.into(),
            cache: "no-store",
            extra: String::new(),
        }
    }

    /// One of the page's embedded files.
    fn file(f: ui::File) -> Answer {
        Answer {
            status: "200 OK",
            ctype: f.content_type,
            body: f.body.into(),
            cache: "no-cache",
            extra: String::new(),
        }
    }

    /// `303 See Other` to `location` (a path on this endpoint).
    fn see_other(location: &str) -> Answer {
        let mut a = Answer::text("303 See Other", "");
        a.extra = format!("Location: {location}\r\n");
        a
    }

    fn with(mut self, header: &str, value: &str) -> Answer {
        self.extra.push_str(&format!("{header}: {value}\r\n"));
        self
    }
}

/// One request, read.
struct Request<'a> {
    method: &'a str,
    /// The target with its query.
    target: &'a str,
    /// The target without its query.
    path: &'a str,
    head: &'a str,
    body: Vec<u8>,
    peer: IpAddr,
    /// The CN of a verified TLS client certificate.
    cert_user: Option<String>,
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    mut sock: S,
    peer: IpAddr,
    cert_user: Option<String>,
    shared: &Shared,
) -> std::io::Result<()> {
    let Ok(head) = tokio::time::timeout(SMALL, read_head(&mut sock)).await else {
        return Ok(());
    };
    let Some((head, rest)) = head? else {
        return Ok(());
    };
    let mut parts = head.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let h = &shared.health;
    if let (Some(ota), Some(what)) = (&h.ota, target.strip_prefix("/ota/image/")) {
        if method == "GET" || method == "HEAD" {
            let range = header(&head, "range");
            let req = crate::ota::http::ImageRequest {
                what,
                range,
                head_only: method == "HEAD",
                peer,
            };
            return crate::ota::http::image(&mut sock, ota, req).await;
        }
    }
    let body = if method == "POST" {
        match tokio::time::timeout(SMALL, read_body(&mut sock, &head, rest)).await {
            Ok(Some(b)) => b,
            _ => Vec::new(),
        }
    } else {
        Vec::new()
    };
    let req = Request {
        method,
        target,
        // The query string is for the OTA status routes and `/login`; the rest route on the path.
        path: target.split('?').next().unwrap_or(""),
        head: &head,
        body,
        peer,
        cert_user,
    };
    let a = route(shared, &req).await;
    // Every answer: the page's files and documents load only from here, nothing inline.
    let csp = "Content-Security-Policy: default-src 'self'\r\nX-Content-Type-Options: nosniff\r\n";
    let head = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: {}\r\n{csp}{}Connection: close\r\n\r\n",
        a.status,
        a.ctype,
        a.body.len(),
        a.cache,
        a.extra,
    );
    let _ = tokio::time::timeout(SMALL, async {
        sock.write_all(head.as_bytes()).await?;
        sock.write_all(a.body.as_bytes()).await?;
        sock.shutdown().await
    })
    .await;
    Ok(())
}

/// Which methods a path takes (for `405`).
fn allowed(path: &str) -> &'static str {
    match path {
        "/login" => "GET, POST",
        "/logout" | "/api/v1/dead-letters/drop" => "POST",
        _ => "GET",
    }
}

/// The answer to a request.
async fn route(shared: &Shared, req: &Request<'_>) -> Answer {
    let (h, access) = (&shared.health, &shared.access);
    let (method, path) = (req.method, req.path);
    if method.is_empty() || !req.target.starts_with('/') {
        return Answer::text("400 Bad Request", "malformed request line\n");
    }
    if !allowed(path).split(", ").any(|m| m == method) {
        return Answer::text("405 Method Not Allowed", "method not allowed here\n")
            .with("Allow", allowed(path));
    }
    if let (Some(ota), Some(rest)) = (&h.ota, req.target.strip_prefix("/ota/status")) {
        return match crate::ota::http::status(ota, rest).await {
            Some(v) => Answer::json("200 OK", v),
            None => Answer::json(
                "404 Not Found",
                serde_json::json!({"error": "unknown device or rollout"}),
            ),
        };
    }
    match path {
        "/metrics" => return metrics(h, access, req),
        "/health" => return Answer::json("200 OK", h.json()),
        _ => {}
    }
    let Some(page) = &h.page else {
        return Answer::text("404 Not Found", "try /metrics or /health\n");
    };
    if path.starts_with("/ui/") {
        return match ui::file(path) {
            Some(f) => Answer::file(f),
            None => Answer::text("404 Not Found", "no such file\n"),
        };
    }
    match (method, path) {
        ("GET", "/login") => return login_form(access, req),
        ("POST", "/login") => return sign_in(access, req).await,
        ("POST", "/logout") => {
            return match &access.login {
                Some(l) => Answer::see_other("/login")
                    .with("Set-Cookie", &l.sign_out(header(req.head, "cookie"))),
                None => Answer::see_other("/"),
            }
        }
        _ => {}
    }
    let user = match who(access, req) {
        Ok(user) => user,
        Err(refused) => return refused,
    };
    if let Some(f) = ui::file(path) {
        return Answer::file(f);
    }
    match path {
        "/api/v1/status" => Answer::json("200 OK", api::status(h, page)),
        "/api/v1/devices" => Answer::json("200 OK", api::devices(page)),
        "/api/v1/clients" => Answer::json("200 OK", api::clients(page)),
        "/api/v1/config" => Answer::json("200 OK", api::config(page)),
        "/api/v1/ota" => Answer::json("200 OK", api::ota(h).await),
        "/api/v1/session" => Answer::json("200 OK", api::session(access.login.is_some(), user)),
        "/api/v1/dead-letters/drop" => {
            let ctype = header(req.head, "content-type");
            match api::drop_dead_letter(&h.store, ctype, &req.body).await {
                Ok(v) => Answer::json("200 OK", v),
                Err((status, v)) => Answer::json(status, v),
            }
        }
        "/api/v1/dead-letters" => {
            let query = req.target.split_once('?').map_or("", |(_, q)| q);
            match api::dead_letters(&h.store, query).await {
                Ok(v) => Answer::json("200 OK", v),
                Err((status, v)) => Answer::json(status, v),
            }
        }
        p if p.starts_with("/api/") => Answer::json(
            "404 Not Found",
            serde_json::json!({"error": "unknown API path; see docs/api.md"}),
        ),
        _ => Answer::text("404 Not Found", "try /, /metrics or /health\n"),
    }
}

/// The signed-in user (`None` when no login is configured, and how long their session has
/// left), or the refusal: the page is sent to `/login`, the API gets `401`.
fn who(access: &Access, req: &Request<'_>) -> Result<Option<(String, Option<Duration>)>, Answer> {
    let Some(l) = &access.login else {
        return Ok(None);
    };
    if let Some(cn) = &req.cert_user {
        return Ok(Some((cn.clone(), None)));
    }
    if let Some((user, left)) = l.session(header(req.head, "cookie")) {
        return Ok(Some((user, Some(left))));
    }
    access.metrics.refuse("login_required");
    if req.path.starts_with("/api/") {
        return Err(Answer::json(
            "401 Unauthorized",
            serde_json::json!({"error": "sign in first: POST /login with user and password (docs/api.md)"}),
        ));
    }
    let next = crate::form::encode_query_value(req.target);
    Err(Answer::see_other(&format!("/login?next={next}")))
}

/// `GET /metrics`, behind `http.metrics_token` when one is set.
fn metrics(h: &HealthSource, access: &Access, req: &Request<'_>) -> Answer {
    let want = access.metrics_token.as_bytes();
    if !want.is_empty() {
        let given = header(req.head, "authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !crate::password::constant_time_eq(given.trim().as_bytes(), want) {
            access.metrics.refuse("metrics_token");
            return Answer::text(
                "401 Unauthorized",
                "send Authorization: Bearer <http.metrics_token>\n",
            )
            .with("WWW-Authenticate", "Bearer realm=\"fieldgate\"");
        }
    }
    Answer {
        status: "200 OK",
        ctype: "application/openmetrics-text; version=1.0.0; charset=utf-8",
        body: h.registry.render().into(),
        cache: "no-store",
        extra: String::new(),
    }
}

/// The sign-in form (or, with no accounts, straight to the page).
fn login_form(access: &Access, req: &Request<'_>) -> Answer {
    if access.login.is_none() {
        return Answer::see_other("/");
    }
    let query = req.target.split_once('?').map_or("", |(_, q)| q);
    let next = crate::form::query_value(query, "next");
    let next = login::safe_next(next.as_deref());
    Answer::html("200 OK", ui::login_page("", next))
}

/// `POST /login` with a form body `user=..&password=..&next=..`.
async fn sign_in(access: &Access, req: &Request<'_>) -> Answer {
    let Some(l) = &access.login else {
        return Answer::see_other("/");
    };
    let body = String::from_utf8_lossy(&req.body);
    let field = |k: &str| crate::form::query_value(&body, k).unwrap_or_default();
    let next = field("next");
    let next = login::safe_next(Some(&next)).to_string();
    let outcome = l
        .sign_in(req.peer, &field("user"), &field("password"))
        .await;
    let ok = matches!(outcome, login::SignIn::Ok(_));
    access.metrics.login(ok, req.peer);
    match outcome {
        login::SignIn::Ok(cookie) => Answer::see_other(&next).with("Set-Cookie", &cookie),
        login::SignIn::Refused => Answer::html(
            "401 Unauthorized",
            ui::login_page("Wrong user or password.", &next),
        ),
    }
}

/// The value of header `name` (lower case) in a request head.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}
