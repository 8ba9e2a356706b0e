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
    /// Replay a synthetic day of batch arrivals against the autoscaling policy and KEDA's
    /// message-count rule: GPU-hours, deadline misses, peak replicas, and a plot.
    Autoscale(crate::autoscale_bench::AutoscaleArgs),
}

/// The shape of a synthetic workload (shared by `dataset` and `throughput`).
#[derive(Debug, Clone, Args)]
pub struct SyntheticArgs {
    /// Number of requests.
    #[arg(long, default_value_t = 64)]
    pub num_prompts: usize,
    /// Prompt length in words (about one token each), shared prefix included.
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,
    /// `max_tokens` of every request.
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    /// Words at the start of each prompt shared with other prompts.
    #[arg(long, default_value_t = 0)]
    pub prefix_len: usize,
    /// Distinct shared prefixes, used round-robin.
    #[arg(long, default_value_t = 1)]
    pub num_prefixes: usize,
    /// Seed of the word draw (same seed, same prompts).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SyntheticArgs {
    /// The workload, with `ignore_eos` set as given.
    pub fn workload(&self, num_prompts: usize, ignore_eos: bool) -> Result<Workload> {
        if self.input_len == 0 || self.output_len == 0 {
            bail!("--input-len and --output-len must be at least 1");
        }
        Ok(Workload {
            num_prompts,
            input_len: self.input_len,
            output_len: self.output_len,
            prefix_len: self.prefix_len,
            num_prefixes: self.num_prefixes,
            ignore_eos,
            seed: self.seed,
        })
    }
}

#[derive(Debug, Args)]
pub struct DatasetArgs {
    #[command(flatten)]
    pub workload: SyntheticArgs,
    /// Let requests stop at end-of-sequence instead of generating exactly `--output-len` tokens.
    #[arg(long)]
    pub allow_eos: bool,
    /// Where to write the file [default: stdout].
    #[arg(short, long)]
    pub output: Option<PathBuf>,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Throughput(a) => crate::throughput::run(a),
        BenchCommand::Autoscale(a) => crate::autoscale_bench::run(a),
        BenchCommand::Dataset(a) => {
            let w = a.workload.workload(a.workload.num_prompts, !a.allow_eos)?;
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
