//! The `sonde` command: argument parsing and wiring only.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use sonde::config::{self, CliSelection, PrintMode};

#[derive(Parser)]
#[command(
    name = "sonde",
    version,
    about = "Traces selected processes without touching their code: eBPF sees the HTTP/1.x, HTTP/2, gRPC, PostgreSQL and Redis \
             traffic they send and receive (TLS too, at the OpenSSL boundary); sonde rebuilds spans and RED metrics \
             and exports them over OTLP (gRPC or HTTP, TLS, gzip) and on a Prometheus endpoint",
    long_about = None
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Which processes to select (shared by `run`, `config` and `check`).
#[derive(clap::Args)]
struct SelectionArgs {
    /// YAML config file (see README.md for the keys).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Trace processes listening on one of these TCP ports, e.g. 8080,9000-9100.
    #[arg(long)]
    open_ports: Option<String>,
    /// Trace processes whose executable path matches this glob.
    #[arg(long)]
    exe_path: Option<String>,
    /// Trace this process (repeatable).
    #[arg(long = "pid")]
    pids: Vec<u32>,
}

/// The selection plus where output goes (shared by `run` and `config`).
#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    selection: SelectionArgs,
    /// Print finished spans on stdout. Default: text without an OTLP endpoint, else none.
    #[arg(long, value_enum)]
    print: Option<PrintMode>,
    /// Serve Prometheus metrics on this port (127.0.0.1 unless the config says otherwise).
    #[arg(long)]
    prometheus_port: Option<u16>,
    /// Write a W3C traceparent header into outgoing plaintext HTTP/1.x requests of traced
    /// processes (changes their traffic; same as `propagation.inject_http: true`).
    #[arg(long)]
    inject_traceparent: bool,
    /// Export what traced processes write to stdout, stderr and `logs.files` as OTLP log
    /// records carrying the trace of the request that wrote them (same as `logs.capture: true`).
    #[arg(long)]
    capture_logs: bool,
    /// Benchmarks only: attach programs that only return at sonde's hook points, and nothing
    /// else (`cargo xtask bench` measures the hooks' own cost with it).
    #[arg(long, hide = true)]
    floor: bool,
    /// Benchmarks only: hook the data syscalls at enter and exit (the design before the exit
    /// hook), so `cargo xtask bench --syscalls paired` can compare the two.
    #[arg(long, hide = true)]
    paired_syscalls: bool,
}

impl SelectionArgs {
    fn is_empty(&self) -> bool {
        self.config.is_none() && self.open_ports.is_none() && self.exe_path.is_none() && self.pids.is_empty()
    }
}

impl RunArgs {
    fn split(self) -> (Option<PathBuf>, CliSelection) {
        let Self {
            selection: SelectionArgs { config, open_ports, exe_path, pids },
            print,
            prometheus_port,
            inject_traceparent,
            capture_logs,
            floor,
            paired_syscalls,
        } = self;
        let cli = CliSelection {
            open_ports,
            exe_path,
            pids,
            print,
            prometheus_port,
            inject_traceparent,
            floor,
            paired_syscalls,
            capture_logs,
        };
        (config, cli)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Trace the selected processes until SIGINT/SIGTERM.
    Run(RunArgs),
    /// Validate the configuration (file, command line, environment) and print what it resolves
    /// to; exits 2 naming the key when it is bad. Loads nothing into the kernel.
    Config(RunArgs),
    /// Report what this host offers sonde; exits non-zero when sonde cannot run here. With
    /// selectors, also say which TLS library each selected process uses and whether it is traced.
    Check(SelectionArgs),
}

/// Exit code for bad configuration (distinct from runtime failures).
const EXIT_CONFIG: i32 = 2;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::new().filter_or("SONDE_LOG", "info"))
        .target(env_logger::Target::Stderr)
        .init();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Check(selection) => {
            let (kubernetes, selected) = if selection.is_empty() {
                (None, Vec::new())
            } else {
                let (config, cli) = RunArgs {
                    selection,
                    print: None,
                    prometheus_port: None,
                    inject_traceparent: false,
                    capture_logs: false,
                    floor: false,
                    paired_syscalls: false,
                }
                .split();
                match load_config(config, cli) {
                    Ok(cfg) => sonde::check::select(cfg),
                    Err(code) => std::process::exit(code),
                }
            };
            sonde::check::report(&sonde::check::run_checks(&selected, kubernetes))
        }
        Command::Config(args) => {
            let (config, selection) = args.split();
            match load_config(config, selection) {
                Ok(cfg) => {
                    print!("{}", config::describe(&cfg));
                    0
                }
                Err(code) => code,
            }
        }
        Command::Run(args) => {
            let (config, selection) = args.split();
            run(config, selection)
        }
    };
    std::process::exit(code);
}

/// The validated configuration, or the exit code for a bad one (after saying why).
fn load_config(config_path: Option<PathBuf>, cli: CliSelection) -> Result<config::AgentConfig, i32> {
    let file = config_path.as_deref().map(config::load_file).transpose().map_err(|e| {
        log::error!("bad configuration: {e}");
        EXIT_CONFIG
    })?;
    config::build(file.unwrap_or_default(), cli, &|k| std::env::var(k).ok()).map_err(|e| {
        log::error!("bad configuration: {e}");
        EXIT_CONFIG
    })
}

fn run(config_path: Option<PathBuf>, cli: CliSelection) -> i32 {
    let cfg = match load_config(config_path, cli) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            log::error!("cannot start the runtime: {e}");
            return 1;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = shutdown_signal().map_err(|e| anyhow::anyhow!("cannot install signal handlers: {e}"))?;
        sonde::agent::run(cfg, shutdown).await
    });
    match result {
        Ok(()) => 0,
        Err(e) => {
            log::error!("{e:#}");
            1
        }
    }
}

/// Installs the SIGTERM/SIGINT handlers now (so a signal during startup stops sonde cleanly
/// instead of killing it) and returns the future that completes on the first of them.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => log::info!("SIGTERM received"),
            _ = int.recv() => log::info!("SIGINT received"),
        }
    })
}
