//! `gristmill`: bulk LLM generation over OpenAI batch files.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod autoscale_bench;
mod bench;
mod client;
mod cluster;
mod engine_args;
mod nats;
mod run;
mod throughput;

/// Bulk LLM generation: OpenAI batch files in, completions out, nothing lost or duplicated.
#[derive(Debug, Parser)]
#[command(name = "gristmill", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
    /// Benchmark tools.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GRISTMILL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Coordinator(args) => cluster::coordinator(args),
        Command::Worker(args) => cluster::worker(args),
        Command::Submit(args) => client::submit(args),
        Command::Status(args) => client::status(args),
        Command::Cancel(args) => client::cancel(args),
        Command::Bench(cmd) => bench::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
