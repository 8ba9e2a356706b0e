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

/// An SVG line chart of `(x, y)` points, with labelled axes and values at the points.
pub fn svg_line_chart(title: &str, x_label: &str, y_label: &str, points: &[(f64, f64)]) -> String {
    let (w, h, left, right, top, bottom) = (640.0, 400.0, 70.0, 20.0, 40.0, 50.0);
    let x_max = points.iter().map(|p| p.0).fold(1.0, f64::max);
    let y_max = points.iter().map(|p| p.1).fold(1.0, f64::max) * 1.15;
    // log2 x axis: the sweep doubles the number of sequences.
    let lx = |x: f64| (x.max(1.0)).log2() / x_max.log2().max(1.0);
    let px = |x: f64| left + lx(x) * (w - left - right);
    let py = |y: f64| h - bottom - y / y_max * (h - top - bottom);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>
<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="black"/>
<line x1="{left}" y1="{top}" x2="{left}" y2="{}" stroke="black"/>
<text x="{}" y="{}" text-anchor="middle">{}</text>
<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{}</text>
"#,
        w / 2.0,
        escape(title),
        h - bottom,
        w - right,
        h - bottom,
        h - bottom,
        (left + w - right) / 2.0,
        h - 12.0,
        escape(x_label),
        (top + h - bottom) / 2.0,
        (top + h - bottom) / 2.0,
        escape(y_label),
    );
    for i in 0..=4 {
        let y = y_max * i as f64 / 4.0;
        s += &format!(
            "<line x1=\"{left}\" y1=\"{0:.1}\" x2=\"{1}\" y2=\"{0:.1}\" stroke=\"#ddd\"/><text x=\"{2}\" y=\"{3:.1}\" text-anchor=\"end\">{4:.0}</text>\n",
            py(y),
            w - right,
            left - 6.0,
            py(y) + 4.0,
            y
        );
    }
    let path: Vec<String> = points
        .iter()
        .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
        .collect();
    s += &format!(
        "<polyline points=\"{}\" fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\"/>\n",
        path.join(" ")
    );
    for &(x, y) in points {
        s += &format!(
            "<circle cx=\"{0:.1}\" cy=\"{1:.1}\" r=\"4\" fill=\"#1f77b4\"/><text x=\"{0:.1}\" y=\"{2:.1}\" text-anchor=\"middle\">{3:.0}</text><text x=\"{0:.1}\" y=\"{4:.1}\" text-anchor=\"middle\">{5}</text>\n",
            px(x),
            py(y),
            py(y) - 9.0,
            y,
            h - bottom + 16.0,
            x
        );
    }
    s + "</svg>\n"
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
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
        };
        let v = serde_json::to_value(&r).expect("serialises");
        assert_eq!(v["schema_version"], 1);
        assert!(v["ttft"]["p99_ms"].is_number());
    }
}
