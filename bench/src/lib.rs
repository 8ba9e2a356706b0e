//! Workload generators for benchmarks: synthetic OpenAI batch files with a chosen prompt
//! length, output length and amount of shared prefix, reproducible from a seed.
//!
//! Prompt lengths are counted in words from a fixed vocabulary of common English words, each of
//! which is one token for typical byte-level BPE vocabularies (a leading space included), so a
//! `--input-len` of N gives prompts of about N tokens.

use serde_json::{json, Value};

pub mod chart;
pub mod report;

/// Common words that are single tokens (with their leading space) in GPT-2 style vocabularies.
const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by",
    "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an",
    "had", "they", "you", "were", "their", "one", "all", "we", "can", "her", "has", "there",
    "been", "if", "more", "when", "will", "would", "who", "so", "no", "time", "system", "data",
    "file", "code", "service", "user", "test", "value", "list", "model", "order", "water", "house",
    "light", "world",
];

/// What a generated batch looks like.
#[derive(Debug, Clone)]
pub struct Workload {
    pub num_prompts: usize,
    /// Words per prompt (shared prefix included).
    pub input_len: usize,
    /// `max_tokens` of every request.
    pub output_len: usize,
    /// Words at the start of every prompt that are shared with other prompts.
    pub prefix_len: usize,
    /// Distinct shared prefixes, used round-robin (1: every prompt shares one prefix).
    pub num_prefixes: usize,
    /// Generate exactly `output_len` tokens (sets `ignore_eos`).
    pub ignore_eos: bool,
    pub seed: u64,
}

fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Workload {
    /// Lines whose prompts are `input_len` token ids drawn uniformly from `0..vocab` (the first
    /// `prefix_len` of them shared round-robin as with [`Workload::lines`]).
    pub fn id_lines(&self, vocab: usize) -> Vec<String> {
        let mut state = self.seed;
        let vocab = vocab.max(1) as u64;
        let mut ids = |n: usize| -> Vec<u64> { (0..n).map(|_| next(&mut state) % vocab).collect() };
        let prefixes: Vec<Vec<u64>> = (0..self.num_prefixes.max(1))
            .map(|_| ids(self.prefix_len.min(self.input_len)))
            .collect();
        (0..self.num_prompts)
            .map(|i| {
                let mut prompt = prefixes[i % prefixes.len()].clone();
                prompt.extend(ids(self.input_len - prompt.len()));
                self.line(i, json!(prompt))
            })
            .collect()
    }

    /// Request `i` of the batch file, greedy, with `prompt` (text or ids).
    fn line(&self, i: usize, prompt: Value) -> String {
        json!({
            "custom_id": format!("bench-{i}"),
            "method": "POST",
            "url": "/v1/completions",
            "body": {"prompt": prompt, "max_tokens": self.output_len, "temperature": 0, "ignore_eos": self.ignore_eos},
        })
        .to_string()
    }

    /// The batch file's lines (`/v1/completions`, greedy), one per prompt.
    pub fn lines(&self) -> Vec<String> {
        let mut state = self.seed;
        let mut words = |n: usize| -> String {
            (0..n)
                .map(|_| WORDS[(next(&mut state) % WORDS.len() as u64) as usize])
                .collect::<Vec<_>>()
                .join(" ")
        };
        let prefixes: Vec<String> = (0..self.num_prefixes.max(1))
            .map(|_| words(self.prefix_len.min(self.input_len)))
            .collect();
        (0..self.num_prompts)
            .map(|i| {
                let prefix = &prefixes[i % prefixes.len()];
                let rest = words(self.input_len - self.prefix_len.min(self.input_len));
                let prompt = [prefix.as_str(), rest.as_str()]
                    .iter()
                    .filter(|s| !s.is_empty())
                    .copied()
                    .collect::<Vec<_>>()
                    .join(" ");
                self.line(i, json!(prompt))
            })
            .collect()
    }
}

/// The schema of `--dataset json-schema`: a manifest of services, each a nested object with
/// a bounded string, integers with ranges, an enum and an array of strings. It asks for at
/// least 64 services, more than any `--output-len` in use fits, so every constrained request
/// runs to `max_tokens` exactly as an unconstrained one with `ignore_eos` does, and the two
/// runs compare tokens for tokens.
pub fn bench_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "services": {
                "type": "array",
                "minItems": 64,
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "maxLength": 24},
                        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                        "replicas": {"type": "integer", "minimum": 1, "maximum": 9},
                        "tier": {"enum": ["web", "worker", "cron"]},
                        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}
                    },
                    "required": ["name", "port", "replicas", "tier", "tags"],
                    "additionalProperties": false
                }
            }
        },
        "required": ["services"],
        "additionalProperties": false
    })
}

/// `lines` (batch lines) with every request constrained to [`bench_schema`] through the
/// `structured_outputs` field.
pub fn with_bench_schema(lines: Vec<String>) -> Vec<String> {
    let schema = bench_schema();
    lines
        .into_iter()
        .map(|l| match serde_json::from_str::<Value>(&l) {
            Ok(mut v) => {
                v["body"]["structured_outputs"] = json!({"json": schema});
                v.to_string()
            }
            Err(_) => l,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_lines_have_exact_lengths_ids_in_the_vocabulary_and_shared_prefixes() {
        let w = Workload {
            num_prompts: 6,
            input_len: 40,
            output_len: 7,
            prefix_len: 10,
            num_prefixes: 2,
            ignore_eos: true,
            seed: 3,
        };
        let prompts: Vec<Vec<u64>> = w
            .id_lines(320)
            .iter()
            .map(|l| {
                let v: Value = serde_json::from_str(l).expect("json");
                assert_eq!(v["body"]["max_tokens"], 7);
                v["body"]["prompt"]
                    .as_array()
                    .expect("ids")
                    .iter()
                    .map(|x| x.as_u64().expect("id"))
                    .collect()
            })
            .collect();
        for p in &prompts {
            assert_eq!(p.len(), 40);
            assert!(p.iter().all(|&id| id < 320));
        }
        assert_eq!(prompts[0][..10], prompts[2][..10], "prefix 0");
        assert_eq!(prompts[1][..10], prompts[3][..10], "prefix 1");
        assert_ne!(prompts[0][..10], prompts[1][..10]);
        assert_ne!(prompts[0][10..], prompts[2][10..]);
        assert_eq!(
            w.id_lines(320),
            w.id_lines(320),
            "the same seed, the same prompts"
        );
    }

    #[test]
    fn lines_have_the_requested_shape_and_shared_prefix() {
        let w = Workload {
            num_prompts: 3,
            input_len: 20,
            output_len: 7,
            prefix_len: 5,
            num_prefixes: 1,
            ignore_eos: true,
            seed: 1,
        };
        let lines = w.lines();
        assert_eq!(lines.len(), 3);
        let prompts: Vec<String> = lines
            .iter()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("json");
                assert_eq!(v["body"]["max_tokens"], 7);
                assert_eq!(v["body"]["ignore_eos"], true);
                v["body"]["prompt"].as_str().expect("prompt").to_string()
            })
            .collect();
        for p in &prompts {
            assert_eq!(p.split(' ').count(), 20);
        }
        let head = |p: &str| p.split(' ').take(5).collect::<Vec<_>>().join(" ");
        assert_eq!(head(&prompts[0]), head(&prompts[1]));
        assert_ne!(prompts[0], prompts[1]);
        assert_eq!(w.lines(), lines, "same seed, same file");
    }
}
