//! Benchmark results: a JSON schema that stays stable across versions, percentiles, the
//! machine's load, and an SVG plot of throughput against parallel sequences.

use serde::{Deserialize, Serialize};

/// Version of [`ThroughputResult`]'s JSON shape; bumped only on incompatible changes.
pub const THROUGHPUT_SCHEMA: u32 = 1;

/// p50 / p90 / p99 and mean of a latency, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
}

impl Percentiles {
    /// Percentiles of `values_ms` (nearest-rank); all zero for no values.
    pub fn of(values_ms: &[f64]) -> Self {
        if values_ms.is_empty() {
            return Self::default();
        }
        let mut v = values_ms.to_vec();
        v.sort_by(f64::total_cmp);
        let rank = |p: f64| v[((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Self {
            mean_ms: v.iter().sum::<f64>() / v.len() as f64,
            p50_ms: rank(50.0),
            p90_ms: rank(90.0),
            p99_ms: rank(99.0),
        }
    }
}

/// How busy the machine was (1-minute load average, from /proc/loadavg).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct MachineLoad {
    pub load_before: Option<f64>,
    pub load_after: Option<f64>,
    /// Seconds spent waiting for the machine to become quiet before starting.
    pub waited_s: f64,
    pub cpus: usize,
}

/// One run of `gristmill bench throughput`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ThroughputResult {
    pub schema_version: u32,
    pub gristmill_version: String,
    pub model: String,
    pub dataset: String,
    pub num_prompts: usize,
    pub max_num_seqs: usize,
    pub threads: usize,
    pub elapsed_s: f64,
    pub completed: usize,
    pub failed: usize,
    pub prompt_tokens: u64,
    pub output_tokens: u64,
    pub requests_per_s: f64,
    pub total_tokens_per_s: f64,
    pub output_tokens_per_s: f64,
    /// Time to first token, measured from the moment a request entered the engine.
    pub ttft: Percentiles,
    /// Mean time between a request's generated tokens.
    pub itl: Percentiles,
    pub prefix_cache_hit_rate: f64,
    pub preemptions: u64,
    pub engine_steps: u64,
    pub machine: MachineLoad,
    /// `fast` or `exact` (`--precision`).
    #[serde(default)]
    pub precision: String,
    /// `f32` or `f16`: the value type of the KV cache (`--kv-cache-dtype`).
    #[serde(default)]
    pub kv_cache_dtype: String,
    /// The CPU kernels used (`f32 avx2+fma, int8 avx512vnni`).
    #[serde(default)]
    pub cpu_kernels: String,
    /// Token masks computed for constrained requests (`--dataset json-schema`), and their mean
    /// time in microseconds (computed beside the forward pass, not added to it).
    #[serde(default)]
    pub masks: u64,
    #[serde(default)]
    pub mask_us_mean: f64,
    /// The same figures under the key names of vLLM's `benchmark_throughput` JSON.
    #[serde(flatten)]
    pub vllm: VllmKeys,
}

/// The keys of vLLM's `benchmarks/benchmark_throughput.py --output-json` (plus
/// `output_tokens_per_second`), so that its readers read ours.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct VllmKeys {
    pub elapsed_time: f64,
    pub num_requests: usize,
    pub total_num_tokens: u64,
    pub requests_per_second: f64,
    pub tokens_per_second: f64,
    pub output_tokens_per_second: f64,
}

impl VllmKeys {
    pub fn new(elapsed_s: f64, requests: usize, prompt_tokens: u64, output_tokens: u64) -> Self {
        let total = prompt_tokens + output_tokens;
        let per_s = |v: f64| if elapsed_s > 0.0 { v / elapsed_s } else { 0.0 };
        Self {
            elapsed_time: elapsed_s,
            num_requests: requests,
            total_num_tokens: total,
            requests_per_second: per_s(requests as f64),
            tokens_per_second: per_s(total as f64),
            output_tokens_per_second: per_s(output_tokens as f64),
        }
    }
}

/// 1-minute load average, if the system reports one.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Waits (up to `max_wait_s`) until the load average drops below `threshold`; returns the
/// seconds waited.
pub fn wait_for_quiet(threshold: f64, max_wait_s: f64) -> f64 {
    let start = std::time::Instant::now();
    while start.elapsed().as_secs_f64() < max_wait_s {
        match load_average() {
            Some(l) if l >= threshold => std::thread::sleep(std::time::Duration::from_secs(2)),
            _ => break,
        }
    }
    start.elapsed().as_secs_f64()
}

/// An SVG line chart of `(x, y)` points on a log2 x axis, with values at the points.
pub fn svg_line_chart(title: &str, x_label: &str, y_label: &str, points: &[(f64, f64)]) -> String {
    crate::chart::Chart {
        title,
        x_label,
        y_label,
        x_axis: crate::chart::XAxis::Log2,
        series: vec![crate::chart::Series {
            name: y_label,
            color: "#1f77b4",
            points: points.to_vec(),
        }],
        markers: true,
    }
    .svg()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = Percentiles::of(&v);
        assert_eq!((p.p50_ms, p.p90_ms, p.p99_ms), (50.0, 90.0, 99.0));
        assert!((p.mean_ms - 50.5).abs() < 1e-9);
        assert_eq!(Percentiles::of(&[]), Percentiles::default());
        assert_eq!(Percentiles::of(&[7.0]).p99_ms, 7.0);
    }

    #[test]
    fn chart_has_a_point_per_value_and_escapes_text() {
        let svg = svg_line_chart("a < b", "x", "y", &[(1.0, 10.0), (4.0, 30.0), (16.0, 80.0)]);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<circle").count(), 3);
        assert!(svg.contains("a &lt; b"));
    }

    #[test]
    fn result_json_has_the_schema_version() {
        let r = ThroughputResult {
            schema_version: THROUGHPUT_SCHEMA,
            gristmill_version: "0".into(),
            model: "m".into(),
            dataset: "random".into(),
            num_prompts: 1,
            max_num_seqs: 1,
            threads: 2,
            elapsed_s: 1.0,
            completed: 1,
            failed: 0,
            prompt_tokens: 1,
            output_tokens: 1,
            requests_per_s: 1.0,
            total_tokens_per_s: 2.0,
            output_tokens_per_s: 1.0,
            ttft: Percentiles::default(),
            itl: Percentiles::default(),
            prefix_cache_hit_rate: 0.0,
            preemptions: 0,
            engine_steps: 1,
            machine: MachineLoad::default(),
            precision: "fast".into(),
            masks: 0,
            mask_us_mean: 0.0,
            kv_cache_dtype: "f16".into(),
            cpu_kernels: "f32 portable, int8 portable".into(),
            vllm: VllmKeys::new(2.0, 4, 300, 100),
        };
        let v = serde_json::to_value(&r).expect("serialises");
        assert_eq!(v["schema_version"], 1);
        assert!(v["ttft"]["p99_ms"].is_number());
        assert_eq!(v["precision"], "fast");
        // vLLM's keys, at the top level as its benchmark writes them.
        assert_eq!(v["elapsed_time"], 2.0);
        assert_eq!(v["num_requests"], 4);
        assert_eq!(v["total_num_tokens"], 400);
        assert_eq!(v["requests_per_second"], 2.0);
        assert_eq!(v["tokens_per_second"], 200.0);
        assert_eq!(v["output_tokens_per_second"], 50.0);
        let back: ThroughputResult = serde_json::from_value(v).expect("reads back");
        assert_eq!(back, r);
    }
}
