//! The gateway under test: the real `fieldgate` binary as a child process (started with a
//! config file in a temp dir, stopped with SIGTERM or SIGKILL, restarted on the same data
//! dir), its ports, its `/health` and `/metrics` endpoints, and the configs tests give it,
//! built from typed values ([`GatewayConfig`], [`ModbusDevice`], [`Listener`]).

use std::io::{Read, Write};
use std::net::TcpStream as StdStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::pki::{CertFiles, Pki};
use super::util::free_port;

/// What a test needs to write a gateway config.
pub struct GatewayPorts {
    pub mqtt: u16,
    pub http: u16,
}

impl GatewayPorts {
    pub fn new() -> GatewayPorts {
        GatewayPorts {
            mqtt: free_port(),
            http: free_port(),
        }
    }
}

/// A gateway config built from typed values: a TOML table, serialised by [`Self::to_toml`]
/// when the gateway is started. Keys are dotted paths (`"cloud.server_name"`); tables on the
/// way are created. Setting a key that is already set replaces it, so a test overrides a
/// default by setting it. Tables of keys are easiest written with [`toml::toml!`], whose
/// values may be Rust expressions in parentheses:
///
/// ```ignore
/// GatewayConfig::local(&ports, dir)
///     .push("serial", toml::toml! { name = "term" port = (path(&pty.gw)) baud = 115200 })
/// ```
///
/// Device tables and listeners have builders of their own: [`ModbusDevice`] (with
/// [`Self::modbus`]) and [`Listener`] (with [`Self::listener`]).
///
/// Configs that are wrong on purpose (tests/cli.rs checks the errors) stay text: that is
/// what those tests are about.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    table: toml::Table,
}

/// A path as a config value (the tests' temp paths are UTF-8).
pub fn path(p: &Path) -> String {
    p.display().to_string()
}

/// `127.0.0.1:<port>`, as the config spells a listen or host address.
pub fn loopback(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

impl GatewayConfig {
    /// A gateway without a cloud: id `gw1`, `data_dir`, an anonymous MQTT listener on
    /// `ports.mqtt` and the HTTP endpoint on `ports.http`, all on 127.0.0.1; every other
    /// key at its built-in default.
    pub fn local(ports: &GatewayPorts, data_dir: &Path) -> GatewayConfig {
        GatewayConfig {
            table: toml::toml! {
                [gateway]
                id = "gw1"
                data_dir = (path(data_dir))

                [http]
                listen = (loopback(ports.http))
            },
        }
        .listener("default", ports.mqtt, Listener::new().anonymous())
    }

    /// [`Self::local`] bridging to `cloud_port` (usually a [`super::Proxy`]) with mutual TLS
    /// from `pki`, quick to reconnect, committing the store every 20 ms, with 3 s to stop.
    pub fn bridged(
        pki: &Pki,
        ports: &GatewayPorts,
        data_dir: &Path,
        cloud_port: u16,
    ) -> GatewayConfig {
        GatewayConfig::local(ports, data_dir)
            .set("gateway.shutdown_grace", "3s")
            .set("store.commit_interval", "20ms")
            .with(
                "cloud",
                toml::toml! {
                    enabled = true
                    host = "127.0.0.1"
                    port = cloud_port
                    ca_file = (path(&pki.ca))
                    client_cert_file = (path(&pki.client.cert))
                    client_key_file = (path(&pki.client.key))
                    keepalive = "5s"
                    connect_timeout = "3s"
                    reconnect_min = "50ms"
                    reconnect_max = "500ms"
                },
            )
    }

    /// Sets the key at the dotted `key` path.
    pub fn set(mut self, key: &str, value: impl Into<toml::Value>) -> GatewayConfig {
        let (parent, last) = split_key(key);
        table_at(&mut self.table, parent).insert(last.to_string(), value.into());
        self
    }

    /// Removes the key at the dotted `key` path (nothing if it is not set).
    pub fn remove(mut self, key: &str) -> GatewayConfig {
        let (parent, last) = split_key(key);
        table_at(&mut self.table, parent).remove(last);
        self
    }

    /// Sets every key of `keys` in the table at the dotted path `at` (`""`: the root);
    /// tables in `keys` are merged into tables already there, key by key.
    pub fn with(mut self, at: &str, keys: toml::Table) -> GatewayConfig {
        merge(table_at(&mut self.table, at), keys);
        self
    }

    /// Appends `table` to the array of tables at the dotted path `at` (`[[serial]]`,
    /// `[[modbus]]`, `[[broker.users]]`).
    pub fn push(mut self, at: &str, table: toml::Table) -> GatewayConfig {
        let (parent, last) = split_key(at);
        let array = table_at(&mut self.table, parent)
            .entry(last)
            .or_insert_with(|| toml::Value::Array(Vec::new()));
        match array {
            toml::Value::Array(a) => a.push(toml::Value::Table(table)),
            other => panic!("{at} is {other}, not an array of tables"),
        }
        self
    }

    /// Sets the listener `name` (`[broker.listeners.<name>]`) to `listener` on
    /// 127.0.0.1:`port`, replacing whatever that listener had.
    pub fn listener(mut self, name: &str, port: u16, listener: Listener) -> GatewayConfig {
        let mut table = listener.table;
        table.insert("listen".into(), loopback(port).into());
        table_at(&mut self.table, "broker.listeners").insert(name.into(), table.into());
        self
    }

    /// Appends `device` to `[[modbus]]`.
    pub fn modbus(self, device: ModbusDevice) -> GatewayConfig {
        self.push("modbus", device.table)
    }

    /// Merges TOML text (keys before its first `[header]` go into the table at the dotted
    /// path `at`, the tables after it from the root), as [`Self::with`] does. For callers
    /// that hold TOML fragments, like the benches' `gateway_config`.
    pub fn with_text(self, at: &str, text: &str) -> GatewayConfig {
        let split = text
            .lines()
            .scan(0, |offset, line| {
                let start = *offset;
                *offset += line.len() + 1;
                Some((start, line))
            })
            .find(|(_, line)| line.trim_start().starts_with('['))
            .map_or(text.len(), |(start, _)| start);
        let parse = |t: &str| -> toml::Table {
            toml::from_str(t).unwrap_or_else(|e| panic!("test config fragment: {e}\n{t}"))
        };
        let (keys, tables) = text.split_at(split);
        self.with(at, parse(keys)).with("", parse(tables))
    }

    /// The config file's text.
    pub fn to_toml(&self) -> String {
        toml::to_string(&self.table).expect("a TOML table serialises")
    }
}

impl std::fmt::Display for GatewayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_toml())
    }
}

/// One `[broker.listeners.<name>]` table from typed values; [`GatewayConfig::listener`] puts
/// it into a config with its `listen` address. Without [`Self::anonymous`] the key is left
/// out, as in a config file that does not set it: clients need credentials.
#[derive(Clone, Debug, Default)]
pub struct Listener {
    table: toml::Table,
}

impl Listener {
    /// A plain TCP listener that lets no anonymous client in.
    pub fn new() -> Listener {
        Listener::default()
    }

    /// Clients without credentials are let in (`allow_anonymous = true`).
    pub fn anonymous(mut self) -> Listener {
        self.table.insert("allow_anonymous".into(), true.into());
        self
    }

    /// TLS with the certificate and key `server` (`[..tls] cert_file`, `key_file`).
    pub fn tls(mut self, server: &CertFiles) -> Listener {
        let tls = self.tls_table();
        tls.insert("cert_file".into(), path(&server.cert).into());
        tls.insert("key_file".into(), path(&server.key).into());
        self
    }

    /// Client certificates signed by `ca`; `mode` is `client_cert` (`none`, `optional`,
    /// `required`).
    pub fn client_certs(mut self, ca: &Path, mode: &str) -> Listener {
        let tls = self.tls_table();
        tls.insert("client_ca_file".into(), path(ca).into());
        tls.insert("client_cert".into(), mode.into());
        self
    }

    fn tls_table(&mut self) -> &mut toml::Table {
        table_at(&mut self.table, "tls")
    }
}

/// One `[[modbus]]` device from typed values; [`GatewayConfig::modbus`] appends it to a
/// config. Its keys are set with [`Self::with`], its `[[modbus.tags]]` appended in order with
/// [`Self::tag`] and [`Self::tag_with`].
///
/// ```ignore
/// ModbusDevice::tcp("ex", srv.port)
///     .with(toml::toml! { poll_interval = "100ms" timeout = "5s" })
///     .tag("ok", 0)
///     .tag_with("temp", 2, toml::toml! { type = "f32" order = "CDAB" })
/// ```
#[derive(Clone, Debug)]
pub struct ModbusDevice {
    table: toml::Table,
}

impl ModbusDevice {
    /// Device `name`, Modbus TCP at 127.0.0.1:`port`.
    pub fn tcp(name: &str, port: u16) -> ModbusDevice {
        ModbusDevice {
            table: toml::toml! { name = (name) host = (loopback(port)) },
        }
    }

    /// Device `name` behind the serial-to-Ethernet converter at 127.0.0.1:`port`
    /// (`transport = "rtu_over_tcp"`).
    pub fn rtu_over_tcp(name: &str, port: u16) -> ModbusDevice {
        ModbusDevice::tcp(name, port).with(toml::toml! { transport = "rtu_over_tcp" })
    }

    /// Device `name` on the serial port `serial_port` at 115200 baud (`transport = "rtu"`).
    pub fn rtu(name: &str, serial_port: &Path) -> ModbusDevice {
        ModbusDevice {
            table: toml::toml! {
                name = (name)
                transport = "rtu"
                serial_port = (path(serial_port))
                baud = 115200
            },
        }
    }

    /// Sets every key of `keys` (`poll_interval`, `timeout`, `unit_id`, ...).
    pub fn with(mut self, keys: toml::Table) -> ModbusDevice {
        merge(&mut self.table, keys);
        self
    }

    /// Appends the tag `name` at `address`, every other key at its default.
    pub fn tag(self, name: &str, address: u32) -> ModbusDevice {
        self.tag_with(name, address, toml::Table::new())
    }

    /// Appends the tag `name` at `address` with the keys `keys` (`type`, `kind`, `order`,
    /// `scale`, `writable`, ...).
    pub fn tag_with(self, name: &str, address: u32, keys: toml::Table) -> ModbusDevice {
        let mut tag = toml::toml! { name = (name) address = (address) };
        merge(&mut tag, keys);
        self.tags([tag])
    }

    /// Appends tag tables as they are (e.g. the ones `fieldgate modbus import` prints).
    pub fn tags(mut self, tags: impl IntoIterator<Item = toml::Table>) -> ModbusDevice {
        let array = self
            .table
            .entry("tags")
            .or_insert_with(|| toml::Value::Array(Vec::new()));
        match array {
            toml::Value::Array(a) => a.extend(tags.into_iter().map(toml::Value::Table)),
            other => panic!("tags is {other}, not an array of tables"),
        }
        self
    }
}

/// `"a.b.c"` -> (`"a.b"`, `"c"`).
fn split_key(key: &str) -> (&str, &str) {
    key.rsplit_once('.').unwrap_or(("", key))
}

/// The table at the dotted path `at` (`""`: `root`), created where missing.
fn table_at<'a>(root: &'a mut toml::Table, at: &str) -> &'a mut toml::Table {
    at.split('.').filter(|k| !k.is_empty()).fold(root, |t, k| {
        match t
            .entry(k)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        {
            toml::Value::Table(t) => t,
            other => panic!("{k} is {other}, not a table"),
        }
    })
}

/// Sets every key of `from` in `into`; a table merges into a table already there.
fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(old)), toml::Value::Table(new)) => merge(old, new),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// Config for a gateway bridging to `cloud_port` (usually a proxy) with mutual TLS:
/// [`GatewayConfig::bridged`] with TOML fragments, `extra` for keys of `[cloud]` and any
/// tables after them, `store_extra` for keys of `[store]`. The benches use it.
pub fn gateway_config(
    pki: &Pki,
    ports: &GatewayPorts,
    data_dir: &Path,
    cloud_port: u16,
    extra: &str,
    store_extra: &str,
) -> String {
    GatewayConfig::bridged(pki, ports, data_dir, cloud_port)
        .with_text("store", store_extra)
        .with_text("cloud", extra)
        .to_toml()
}

/// The real gateway binary, as a child process.
pub struct Gateway {
    child: Child,
    pub http: u16,
    pub mqtt: u16,
    pub log: PathBuf,
    _conf_dir: TempDir,
}

impl Gateway {
    /// Starts `fieldgate run -c <config>` and waits until `/health` answers.
    pub async fn start(config: &str, ports: &GatewayPorts) -> Gateway {
        Self::start_env(config, ports, &[]).await
    }

    /// As [`Gateway::start`], with extra environment variables.
    pub async fn start_env(config: &str, ports: &GatewayPorts, env: &[(&str, &str)]) -> Gateway {
        Self::start_until(config, ports, env, |g| g.get("/health").is_some()).await
    }

    /// Starts the gateway and waits until `ready` holds (for an endpoint a plain `GET
    /// /health` cannot reach, e.g. over TLS).
    pub async fn start_until(
        config: &str,
        ports: &GatewayPorts,
        env: &[(&str, &str)],
        ready: impl Fn(&Gateway) -> bool,
    ) -> Gateway {
        let conf_dir = tempfile::tempdir().unwrap();
        let conf = conf_dir.path().join("fieldgate.toml");
        std::fs::write(&conf, config).unwrap();
        let log = conf_dir.path().join("gateway.log");
        let child = fieldgate_command()
            .args(["run", "-c"])
            .arg(&conf)
            .env("RUST_LOG", "info,rumqttd=warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut g = Gateway {
            child,
            http: ports.http,
            mqtt: ports.mqtt,
            log,
            _conf_dir: conf_dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if ready(&g) {
                break;
            }
            if let Ok(Some(status)) = g.child.try_wait() {
                panic!("gateway exited early ({status}):\n{}", g.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "gateway not healthy:\n{}",
                g.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        g
    }

    /// Process id of the gateway.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET path` on the HTTP endpoint; the body, or None.
    pub fn get(&self, path: &str) -> Option<String> {
        let mut s = StdStream::connect(("127.0.0.1", self.http)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let (_, body) = out.split_once("\r\n\r\n")?;
        Some(body.to_string())
    }

    /// `POST path` on the HTTP endpoint with `body` as `content_type`: the status line and
    /// the body, or None.
    pub fn post(&self, path: &str, content_type: &str, body: &str) -> Option<(String, String)> {
        let mut s = StdStream::connect(("127.0.0.1", self.http)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let (head, body) = out.split_once("\r\n\r\n")?;
        Some((head.lines().next()?.to_string(), body.to_string()))
    }

    /// The value of one Prometheus sample, e.g. `fieldgate_queue_records` or
    /// `fieldgate_dropped_total{reason="queue_full"}`.
    pub fn metric(&self, sample: &str) -> f64 {
        let text = self.get("/metrics").unwrap_or_default();
        text.lines()
            .find_map(|l| {
                let (name, v) = l.rsplit_once(' ')?;
                (name == sample).then(|| v.parse().ok())?
            })
            .unwrap_or(f64::NAN)
    }

    /// SIGKILL, keeping the handle (its log, for what follows the death).
    pub fn kill9_in_place(&self) {
        let status = Command::new("kill")
            .args(["-KILL", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -KILL {}", self.child.id());
    }

    /// SIGKILL, no goodbye.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait (bounded) for the exit status; also returns the log.
    pub fn terminate(mut self) -> (ExitStatus, String) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return (s, self.log_text());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("gateway ignored SIGTERM:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The `fieldgate` binary under test, as a command ready for arguments.
///
/// By default the binary cargo built for these tests. `FIELDGATE_TEST_BIN` points at another
/// build (e.g. a cross-compiled release), and `FIELDGATE_TEST_RUNNER` is a whitespace-separated
/// command prefix that runs it (e.g. `qemu-aarch64-static -L /usr/aarch64-linux-gnu`): CI runs
/// the smoke tests against the ARM images this way.
pub fn fieldgate_command() -> Command {
    let bin = std::env::var("FIELDGATE_TEST_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_fieldgate").to_string());
    let runner = std::env::var("FIELDGATE_TEST_RUNNER").unwrap_or_default();
    let mut prefix = runner.split_whitespace();
    match prefix.next() {
        Some(program) => {
            let mut c = Command::new(program);
            c.args(prefix).arg(bin);
            c
        }
        None => Command::new(bin),
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
