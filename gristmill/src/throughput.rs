//! `gristmill bench throughput`: offline throughput of the engine on a workload.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use gristmill_bench::report::{
    load_average, svg_line_chart, wait_for_quiet, MachineLoad, Percentiles, ThroughputResult,
    VllmKeys, THROUGHPUT_SCHEMA,
};
use gristmill_coordinator::LineValidator;
use gristmill_engine::{Engine, Outcome};
use gristmill_protocol::Request;

use crate::bench::SyntheticArgs;
use crate::engine_args::EngineArgs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Dataset {
    /// Random prompts of `--input-len` words (about one token each).
    Random,
    /// Prompts of exactly `--input-len` token ids drawn uniformly from the tokenizer's
    /// vocabulary (vLLM's random dataset): exact lengths whatever the tokenizer.
    RandomIds,
    /// Prompts that share one of `--num-prefixes` prefixes of `--prefix-len` words.
    PrefixRepetition,
    /// Random prompts whose outputs must follow a nested JSON Schema (a manifest of at least
    /// 64 services, so every request generates `--output-len` tokens): the cost of structured
    /// outputs, against `random` with the same flags.
    JsonSchema,
    /// Requests from an OpenAI batch file (`--dataset-path`).
    Jsonl,
}

#[derive(Debug, Args)]
pub struct ThroughputArgs {
    #[command(flatten)]
    pub engine: EngineArgs,

    /// Workload.
    #[arg(long, value_enum, default_value_t = Dataset::Random)]
    pub dataset: Dataset,

    /// The batch file for `--dataset jsonl`.
    #[arg(long)]
    pub dataset_path: Option<PathBuf>,

    #[command(flatten)]
    pub synthetic: SyntheticArgs,

    /// Generate exactly `max_tokens` for every request, also for `--dataset jsonl` (synthetic
    /// datasets always do).
    #[arg(long)]
    pub ignore_eos: bool,

    /// Run once per value with `--max-num-seqs` set to it and as many prompts, e.g.
    /// `1,4,16,32,64`: throughput against parallel sequences.
    #[arg(long, value_delimiter = ',')]
    pub sweep_num_seqs: Vec<usize>,

    /// Write the results as JSON (one object; an array with `--sweep-num-seqs`).
    #[arg(long)]
    pub output_json: Option<PathBuf>,

    /// Write an SVG plot of total tokens/s against parallel sequences (with `--sweep-num-seqs`).
    #[arg(long)]
    pub plot: Option<PathBuf>,

    /// Wait before each run until the 1-minute load average is below this [default: half the
    /// cores].
    #[arg(long)]
    pub quiet_load: Option<f64>,

    /// Longest wait for a quiet machine, in seconds; the run starts anyway after it (the load
    /// is recorded in the results).
    #[arg(long, default_value_t = 120.0)]
    pub max_wait: f64,
}

fn requests(a: &ThroughputArgs, num_prompts: usize, vocab: usize) -> Result<Vec<Request>> {
    let lines = match a.dataset {
        Dataset::RandomIds => a.synthetic.workload(num_prompts, true)?.id_lines(vocab),
        Dataset::Jsonl => {
            let path = a
                .dataset_path
                .as_ref()
                .context("--dataset jsonl needs --dataset-path")?;
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string)
                .collect()
        }
        Dataset::Random | Dataset::PrefixRepetition => {
            if a.dataset == Dataset::PrefixRepetition && a.synthetic.prefix_len == 0 {
                bail!("--dataset prefix-repetition needs --prefix-len > 0");
            }
            a.synthetic.workload(num_prompts, true)?.lines()
        }
        Dataset::JsonSchema => {
            gristmill_bench::with_bench_schema(a.synthetic.workload(num_prompts, true)?.lines())
        }
    };
    let mut v = LineValidator::new();
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let mut r = v
                .validate(i + 1, l)
                .map_err(|e| anyhow::anyhow!("{}", e.error.message))?;
            r.params.ignore_eos |= a.ignore_eos;
            Ok(r)
        })
        .collect()
}

fn one_run(
    engine: &Engine,
    a: &ThroughputArgs,
    max_num_seqs: usize,
    num_prompts: usize,
    model: &str,
) -> Result<ThroughputResult> {
    let mut opts = a.engine.options_no_pool()?;
    opts.max_num_seqs = max_num_seqs;
    // Ids both the tokenizer and the model know.
    let vocab = engine
        .tokenizer
        .vocab_size()
        .min(engine.model.cfg().vocab_size);
    let reqs = requests(a, num_prompts, vocab)?;
    if reqs.iter().any(|r| r.params.constraint.is_some()) {
        // Once per process, and not what a benchmark of steady throughput measures.
        engine
            .prepare_structured_outputs()
            .map_err(|e| anyhow::anyhow!("structured outputs: {e}"))?;
    }
    let n = reqs.len();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threshold = a.quiet_load.unwrap_or(cpus as f64 / 2.0);
    let waited = wait_for_quiet(threshold, a.max_wait);
    let load_before = load_average();
    let (mut ttft, mut itl) = (Vec::new(), Vec::new());
    let (mut completed, mut failed, mut prompt_tokens, mut output_tokens) = (0, 0, 0u64, 0u64);
    let start = Instant::now();
    let stats = engine.run(reqs, opts, |o| match o {
        Outcome::Done(c) => {
            completed += 1;
            prompt_tokens += c.usage.prompt_tokens as u64;
            output_tokens += c.usage.completion_tokens as u64;
            ttft.push(c.time_to_first_token.as_secs_f64() * 1e3);
            if c.usage.completion_tokens > 1 {
                itl.push(
                    c.decode_time.as_secs_f64() * 1e3 / (c.usage.completion_tokens - 1) as f64,
                );
            }
        }
        Outcome::Failed { line, error, .. } => {
            failed += 1;
            eprintln!("request on line {line} failed: {}", error.message);
        }
    });
    let elapsed = start.elapsed().as_secs_f64();
    let sc = stats.scheduler;
    Ok(ThroughputResult {
        schema_version: THROUGHPUT_SCHEMA,
        gristmill_version: env!("CARGO_PKG_VERSION").to_string(),
        model: model.to_string(),
        dataset: a
            .dataset
            .to_possible_value()
            .map_or_else(String::new, |v| v.get_name().to_string()),
        num_prompts: n,
        max_num_seqs,
        threads: rayon::current_num_threads(),
        elapsed_s: elapsed,
        completed,
        failed,
        prompt_tokens,
        output_tokens,
        requests_per_s: completed as f64 / elapsed,
        total_tokens_per_s: (prompt_tokens + output_tokens) as f64 / elapsed,
        output_tokens_per_s: output_tokens as f64 / elapsed,
        ttft: Percentiles::of(&ttft),
        itl: Percentiles::of(&itl),
        prefix_cache_hit_rate: sc.cached_tokens as f64 / sc.prefill_tokens.max(1) as f64,
        preemptions: sc.preemptions,
        engine_steps: stats.steps,
        machine: MachineLoad {
            load_before,
            load_after: load_average(),
            waited_s: waited,
            cpus,
        },
        precision: a.engine.precision.to_string(),
        kv_cache_dtype: a.engine.backend().kv_value_name().into(),
        cpu_kernels: gristmill_engine::cpu_isa(),
        masks: stats.masks,
        mask_us_mean: stats.mask_time.as_secs_f64() * 1e6 / stats.masks.max(1) as f64,
        vllm: VllmKeys::new(elapsed, completed, prompt_tokens, output_tokens),
    })
}

pub fn run(a: ThroughputArgs) -> Result<()> {
    a.engine.options()?; // validates flags and sets up the thread pool once
    let engine = a.engine.load_engine()?;
    let model = engine.model_name.clone();
    let points: Vec<(usize, usize)> = if a.sweep_num_seqs.is_empty() {
        vec![(a.engine.max_num_seqs, a.synthetic.num_prompts)]
    } else {
        if a.sweep_num_seqs.contains(&0) {
            bail!("--sweep-num-seqs values must be at least 1");
        }
        a.sweep_num_seqs.iter().map(|&n| (n, n)).collect()
    };
    println!(
        "{:>8} {:>8} {:>9} {:>10} {:>10} {:>9} {:>9} {:>9} {:>8} {:>6} {:>6}",
        "seqs",
        "prompts",
        "req/s",
        "total t/s",
        "output t/s",
        "ttft p50",
        "ttft p99",
        "itl p50",
        "hit",
        "preem",
        "load"
    );
    let mut results = Vec::new();
    for (seqs, prompts) in points {
        let r = one_run(&engine, &a, seqs, prompts, &model)?;
        println!(
            "{:>8} {:>8} {:>9.2} {:>10.1} {:>10.1} {:>7.0}ms {:>7.0}ms {:>7.1}ms {:>7.1}% {:>6} {:>6}",
            r.max_num_seqs,
            r.num_prompts,
            r.requests_per_s,
            r.total_tokens_per_s,
            r.output_tokens_per_s,
            r.ttft.p50_ms,
            r.ttft.p99_ms,
            r.itl.p50_ms,
            100.0 * r.prefix_cache_hit_rate,
            r.preemptions,
            r.machine.load_before.map_or("?".into(), |l| format!("{l:.2}")),
        );
        if r.masks > 0 {
            println!(
                "{:>8} constrained: {} token masks, {:.0} µs each on average (beside the forward pass)",
                "", r.masks, r.mask_us_mean
            );
        }
        results.push(r);
    }
    if let Some(p) = &a.output_json {
        let json = if a.sweep_num_seqs.is_empty() {
            serde_json::to_string_pretty(&results[0])?
        } else {
            serde_json::to_string_pretty(&results)?
        };
        std::fs::write(p, json + "\n").with_context(|| format!("cannot write {}", p.display()))?;
    }
    if let Some(p) = &a.plot {
        let pts: Vec<(f64, f64)> = results
            .iter()
            .map(|r| (r.max_num_seqs as f64, r.total_tokens_per_s))
            .collect();
        let title = format!(
            "{model}: total tokens/s ({} threads)",
            rayon::current_num_threads()
        );
        std::fs::write(
            p,
            svg_line_chart(
                &title,
                "parallel sequences",
                "tokens/s (prompt + generated)",
                &pts,
            ),
        )
        .with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}
