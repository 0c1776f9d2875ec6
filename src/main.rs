//! The `fieldgate` command: parse the command line, load and validate the configuration, set
//! up logging, run the gateway, map the outcome to an exit code (64 = bad configuration).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fieldgate::config::Settings;
use tracing_subscriber::EnvFilter;

/// sysexits.h EX_USAGE: the configuration is wrong; restarting will not help.
const EX_USAGE: u8 = 64;
/// sysexits.h EX_UNAVAILABLE: the probed device did not answer usefully.
const EX_UNAVAILABLE: u8 = 69;
/// sysexits.h EX_SOFTWARE: the gateway failed at run time.
const EX_SOFTWARE: u8 = 70;

#[derive(Parser)]
#[command(
    name = "fieldgate",
    version,
    about = "Edge gateway: embedded MQTT broker, crash-proof store-and-forward queue, TLS bridge to the cloud, firmware cache and OTA serving for local devices"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (built-in defaults when no file is given). The HTTP endpoint
    /// (`[http]`, 127.0.0.1:9183 by default) serves the operator page at /, its JSON API under
    /// /api/v1 (docs/api.md), /metrics, /health, and OTA status and images under /ota/
    /// (docs/ota.md). Beyond loopback the page and the API need `[http.admin]` accounts
    /// and a sign-in at /login. With `[sparkplug] enabled = true` the cloud uplink is a
    /// Sparkplug B edge node (docs/sparkplug.md).
    Run {
        /// TOML configuration file. Environment variables FIELDGATE__SECTION__KEY override it.
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Validate the configuration, list every problem, exit 64 if there is any.
    CheckConfig {
        /// TOML configuration file.
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Read a password from stdin (one line) and print its argon2id hash for
    /// `password_hash` of `[[broker.users]]` (devices) and `[[http.admin.users]]` (the
    /// operator page).
    Passwd,
    /// Print the effective configuration (defaults + file + environment) as TOML.
    PrintConfig {
        /// TOML configuration file.
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Modbus tools.
    #[command(subcommand)]
    Modbus(ModbusCommand),
}

#[derive(Subcommand)]
enum ModbusCommand {
    /// Read a register range once and print it decoded in every type and byte order.
    Probe(fieldgate::sources::modbus::probe::ProbeArgs),
    /// Turn a vendor's tag list (CSV: name, address, type, order, scale, unit, ...) into
    /// `[[modbus.tags]]` tables on stdout, to paste under a `[[modbus]]` device (see
    /// docs/modbus.md for the columns).
    Import {
        /// The CSV file (`,`, `;` or tab separated, header line first).
        #[arg(value_name = "CSV")]
        csv: PathBuf,
    },
}

fn load(path: Option<&PathBuf>) -> Result<Settings, ExitCode> {
    Settings::load(path.map(|p| p.as_path())).map_err(|e| {
        eprint!("fieldgate: {e}");
        ExitCode::from(EX_USAGE)
    })
}

fn main() -> ExitCode {
    fieldgate::limit_malloc_arenas();
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => run(config.as_ref()),
        Command::CheckConfig { config } => match load(config.as_ref()) {
            Ok(s) => {
                for notice in &s.notices {
                    eprintln!("fieldgate: warning: {notice}");
                }
                println!("configuration OK");
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::PrintConfig { config } => match load(config.as_ref()) {
            Ok(s) => {
                print!("{}", s.to_toml());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Passwd => passwd(),
        Command::Modbus(ModbusCommand::Import { csv }) => modbus_import(&csv),
        Command::Modbus(ModbusCommand::Probe(args)) => modbus_probe(&args),
    }
}

/// `fieldgate passwd`: one line on stdin, its argon2 hash on stdout.
fn passwd() -> ExitCode {
    let mut line = String::new();
    if let Err(e) = std::io::stdin().read_line(&mut line) {
        eprintln!("fieldgate passwd: cannot read stdin: {e}");
        return ExitCode::from(EX_SOFTWARE);
    }
    let password = line.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        eprintln!("fieldgate passwd: empty password; type one line on stdin");
        return ExitCode::from(EX_USAGE);
    }
    match fieldgate::password::hash_password(password) {
        Ok(phc) => {
            println!("{phc}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fieldgate passwd: {e}");
            ExitCode::from(EX_SOFTWARE)
        }
    }
}

/// `fieldgate modbus import CSV`: `[[modbus.tags]]` tables on stdout.
fn modbus_import(csv: &Path) -> ExitCode {
    let text = match std::fs::read_to_string(csv) {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "fieldgate modbus import: cannot read {}: {e}",
                csv.display()
            );
            return ExitCode::from(EX_USAGE);
        }
    };
    use fieldgate::sources::modbus::import;
    match import::tags(&text) {
        Ok(tags) => {
            print!("{}", import::to_toml(&tags));
            eprintln!("fieldgate modbus import: {} tag(s)", tags.len());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprint!("fieldgate modbus import: {}: {e}", csv.display());
            ExitCode::from(EX_USAGE)
        }
    }
}

/// A runtime for one command; `None` (after saying why) when the OS refuses threads.
fn runtime(multi_thread: bool) -> Option<tokio::runtime::Runtime> {
    let mut b = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    match b.enable_all().build() {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("fieldgate: cannot start the async runtime: {e}");
            None
        }
    }
}

/// `fieldgate modbus probe`: one read, printed decoded every way.
fn modbus_probe(args: &fieldgate::sources::modbus::probe::ProbeArgs) -> ExitCode {
    let Some(rt) = runtime(false) else {
        return ExitCode::from(EX_SOFTWARE);
    };
    use fieldgate::sources::modbus::probe::{self, ProbeError};
    match rt.block_on(probe::run(args)) {
        Ok(table) => {
            print!("{table}");
            ExitCode::SUCCESS
        }
        Err(e @ ProbeError::Usage(_)) => {
            eprintln!("fieldgate modbus probe: {e}");
            ExitCode::from(EX_USAGE)
        }
        Err(e) => {
            eprintln!("fieldgate modbus probe: {e}");
            ExitCode::from(EX_UNAVAILABLE)
        }
    }
}

/// `fieldgate run`: logging, the runtime, the signals, then the gateway until the first
/// signal (a second one exits at once with 130).
fn run(config: Option<&PathBuf>) -> ExitCode {
    let settings = match load(config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal: journald and log files get plain text.
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
    let Some(rt) = runtime(true) else {
        return ExitCode::from(EX_SOFTWARE);
    };
    let run = async {
        // Handlers go in before anything starts, so an early SIGTERM is orderly too.
        let signals = Signals::install()?;
        tokio::select! {
            // A stop that completed wins over a signal that arrived meanwhile.
            biased;
            r = fieldgate::run(settings, signals.nth(1)) => r.map_err(anyhow::Error::from),
            () = signals.nth(2) => {
                eprintln!("fieldgate: second signal, exiting now");
                std::process::exit(130);
            }
        }
    };
    match rt.block_on(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "fieldgate failed");
            ExitCode::from(EX_SOFTWARE)
        }
    }
}

/// SIGTERM and SIGINT, installed once, counted: the first stops the gateway in order, a
/// second one before that stop is complete exits at once (130); one after it changes nothing.
struct Signals {
    count: tokio::sync::watch::Receiver<u32>,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let (tx, count) = tokio::sync::watch::channel(0u32);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                tx.send_modify(|n| *n += 1);
                if *tx.borrow() == 1 {
                    tracing::info!("signal received; stopping (send it again to exit at once)");
                }
            }
        });
        Ok(Signals { count })
    }

    /// Resolves once `n` signals have arrived.
    fn nth(&self, n: u32) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.count.clone();
        async move {
            if rx.wait_for(|c| *c >= n).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}
