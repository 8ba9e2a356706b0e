//! `gristmill bench`: benchmark tools.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use gristmill_bench::Workload;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Write a synthetic batch file (`/v1/completions`, greedy) for `gristmill run`.
    Dataset(DatasetArgs),
    /// Offline throughput: run a workload through the engine and report requests/s, tokens/s,
    /// latency percentiles, prefix-cache hit rate and preemptions (flags follow vLLM's
    /// `benchmark_throughput`).
    Throughput(crate::throughput::ThroughputArgs),
}

#[derive(Debug, Args)]
pub struct DatasetArgs {
    /// Number of requests.
    #[arg(long, default_value_t = 32)]
    pub num_prompts: usize,
    /// Prompt length in words (about one token each).
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,
    /// `max_tokens` of every request.
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    /// Words shared by the start of every prompt.
    #[arg(long, default_value_t = 0)]
    pub prefix_len: usize,
    /// Let requests stop at end-of-sequence instead of generating exactly `--output-len` tokens.
    #[arg(long)]
    pub allow_eos: bool,
    /// Seed of the word draw (same seed, same file).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to write the file [default: stdout].
    #[arg(short, long)]
    pub output: Option<PathBuf>,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Throughput(a) => crate::throughput::run(a),
        BenchCommand::Dataset(a) => {
            if a.input_len == 0 || a.output_len == 0 {
                bail!("--input-len and --output-len must be at least 1");
            }
            let w = Workload {
                num_prompts: a.num_prompts,
                input_len: a.input_len,
                output_len: a.output_len,
                prefix_len: a.prefix_len,
                num_prefixes: 1,
                ignore_eos: !a.allow_eos,
                seed: a.seed,
            };
            let text = w.lines().join("\n") + "\n";
            match a.output {
                Some(p) => {
                    if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                        std::fs::create_dir_all(dir)
                            .with_context(|| format!("cannot create {}", dir.display()))?;
                    }
                    std::fs::write(&p, text)
                        .with_context(|| format!("cannot write {}", p.display()))?
                }
                None => std::io::stdout()
                    .write_all(text.as_bytes())
                    .context("cannot write to stdout")?,
            }
            Ok(())
        }
    }
}
