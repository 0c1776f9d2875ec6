//! The `fieldgate` command: parse the command line, load and validate the configuration, set
//! up logging, run the gateway, map the outcome to an exit code (64 = bad configuration).

use std::path::PathBuf;
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
    /// Run the gateway (built-in defaults when no file is given). OTA status and images are
    /// served on the metrics endpoint under /ota/ (see docs/ota.md).
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
    /// `[[broker.users]] password_hash`.
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
        Command::CheckConfig { config } => match load(config.as_ref()) {
            Ok(_) => {
                println!("configuration OK");
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Passwd => {
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
            match fieldgate::frontend::auth::hash_password(password) {
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
        Command::PrintConfig { config } => match load(config.as_ref()) {
            Ok(s) => {
                print!("{}", s.to_toml());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Modbus(ModbusCommand::Probe(args)) => {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("fieldgate: cannot start the async runtime: {e}");
                    return ExitCode::from(EX_SOFTWARE);
                }
            };
            use fieldgate::sources::modbus::probe::{self, ProbeError};
            match rt.block_on(probe::run(&args)) {
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
        Command::Run { config } => {
            let settings = match load(config.as_ref()) {
                Ok(s) => s,
                Err(code) => return code,
            };
            let filter = EnvFilter::try_from_default_env()
                .or_else(|_| EnvFilter::try_new(&settings.log.level))
                .unwrap_or_else(|_| EnvFilter::new("info"));
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .init();
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("fieldgate: cannot start the async runtime: {e}");
                    return ExitCode::from(EX_SOFTWARE);
                }
            };
            let run = async {
                // Handlers go in before anything starts, so an early SIGTERM is orderly too.
                let signals = Signals::install()?;
                fieldgate::run(settings, signals.first())
                    .await
                    .map_err(anyhow::Error::from)
            };
            match rt.block_on(run) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "fieldgate failed");
                    ExitCode::from(EX_SOFTWARE)
                }
            }
        }
    }
}

/// SIGTERM and SIGINT, installed once.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves on the first signal; a second one exits the process at once.
    async fn first(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
        tracing::info!("signal received; stopping (send it again to exit at once)");
        tokio::spawn(async move {
            tokio::select! {
                _ = self.term.recv() => {}
                _ = self.int.recv() => {}
            }
            eprintln!("fieldgate: second signal, exiting now");
            std::process::exit(130);
        });
    }
}
