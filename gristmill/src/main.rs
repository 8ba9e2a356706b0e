//! `gristmill`: bulk LLM generation over OpenAI batch files.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod autoscale_bench;
mod bench;
mod client;
mod jobs;
mod run;
mod throughput;

use gristmill::{cluster, engine_args};

/// Bulk LLM generation: OpenAI batch files in, completions out, nothing lost or duplicated.
#[derive(Debug, Parser)]
#[command(
    name = "gristmill",
    version,
    about,
    long_about = None,
    after_help = "Logging: GRISTMILL_LOG sets what is logged to stderr, in tracing's filter syntax \
                  (`debug`, `info`, `warn`, or per module: `info,gristmill_engine=debug`). The \
                  default is `info` for `coordinator` and `worker`, `warn` for the rest. \
                  NO_COLOR=1 turns colours off."
)]
struct Cli {
    /// How log lines on stderr are written: `text` for people, `json` (one object per line:
    /// timestamp, level, target, fields, the current span) for log collectors.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "GRISTMILL_LOG_FORMAT"
    )]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a whole batch file on this machine (no cluster needed).
    Run(run::RunArgs),
    /// Serve the OpenAI Files and Batches API, dispatching batches to workers over NATS.
    Coordinator(cluster::CoordinatorArgs),
    /// Pull shards from NATS and generate their completions.
    Worker(cluster::WorkerArgs),
    /// Upload a batch file to a coordinator and create the batch (optionally wait for it).
    Submit(client::SubmitArgs),
    /// Show one batch, or list the latest ones.
    Status(client::StatusArgs),
    /// Cancel a batch: unfinished lines become error lines.
    Cancel(client::CancelArgs),
    /// Apply one instruction to every matching file of a git repository, verified, onto a new
    /// branch; re-runs send only what changed.
    Migrate(jobs::migrate::MigrateArgs),
    /// Generate one file tree per spec row (JSONL or CSV) from a template.
    Scaffold(jobs::scaffold::ScaffoldArgs),
    /// Benchmark tools.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The long-running services say what they do; the commands with a progress bar only warn.
    let default = match cli.command {
        Command::Coordinator(_) | Command::Worker(_) => "info,async_nats=warn",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("GRISTMILL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only on a terminal, and never with NO_COLOR set (https://no-color.org).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let service = match cli.command {
        Command::Coordinator(_) => "gristmill-coordinator",
        Command::Worker(_) => "gristmill-worker",
        _ => "gristmill",
    };
    // Spans go to an OTLP collector too when OTEL_EXPORTER_OTLP_ENDPOINT says where.
    let telemetry = match gristmill::telemetry::init(service) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    {
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;
        use tracing_subscriber::Layer as _;
        let logs = match cli.log_format {
            LogFormat::Text => tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(ansi)
                .boxed(),
            LogFormat::Json => tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .json()
                .with_current_span(true)
                .boxed(),
        };
        let spans = telemetry
            .as_ref()
            .map(|t| tracing_opentelemetry::layer().with_tracer(t.tracer()));
        tracing_subscriber::registry()
            .with(filter)
            .with(spans)
            .with(logs)
            .init();
    }
    let json_logs = cli.log_format == LogFormat::Json;
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Coordinator(args) => cluster::coordinator(args),
        Command::Worker(args) => cluster::worker(args),
        Command::Submit(args) => client::submit(args),
        Command::Status(args) => client::status(args),
        Command::Cancel(args) => client::cancel(args),
        Command::Migrate(args) => jobs::migrate::migrate(args),
        Command::Scaffold(args) => jobs::scaffold::scaffold(args),
        Command::Bench(cmd) => bench::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if json_logs {
                // A log collector reads the reason a process ended like any other line.
                tracing::error!(error = %format!("{e:#}"), "exiting");
            } else {
                eprintln!("error: {e:#}");
            }
            // A worker says how it stopped (70: its engine panicked; 130: a second signal).
            let code = e
                .downcast_ref::<gristmill_worker::node::WorkerError>()
                .map_or(2, |w| w.exit_code());
            ExitCode::from(code)
        }
    }
}
