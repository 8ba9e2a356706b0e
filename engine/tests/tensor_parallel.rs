//! Tensor parallelism on the CPU: a model split over rank threads (in-process collective)
//! against the same model whole, and against HF transformers' logits for the tiny models.
//!
//! Tolerance: the split changes only the order of float additions (partial dot products of
//! o_proj and down are summed by the all-reduce), so logits must agree within 1e-3 absolute plus
//! 1e-3 relative; greedy tokens must be equal up to the first step whose whole-model top-1 minus
//! top-2 margin is below 0.05.

use std::collections::HashMap;

use gristmill_engine::backend::CpuBackend;
use gristmill_engine::model::llama::{slice_matrix, Part};
use gristmill_engine::tensor_parallel::{load_model, Model};
use gristmill_engine::{Engine, EngineOptions, Outcome, Precision};
use gristmill_protocol::{ChatMessage, Endpoint, GenerationParams, Prompt, Request};
use gristmill_testkit::{default_model, fixture};
use serde_json::Value;

const ATOL: f32 = 1e-3;
const RTOL: f32 = 1e-3;

/// Largest difference; panics past the tolerance.
fn compare(a: &[f32], b: &[f32], what: &str) -> f32 {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let mut worst = 0f32;
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let d = (x - y).abs();
        assert!(d <= ATOL + RTOL * y.abs(), "{what}: logit {i}: {x} vs {y}");
        worst = worst.max(d);
    }
    worst
}

fn score(m: &Model<CpuBackend>, ids: &[u32]) -> Vec<f32> {
    m.score(ids).expect("scores")
}

#[test]
fn default_model_split_over_3_ranks_matches_the_whole_model() {
    let path = default_model();
    let whole = load_model(&path, 1, Default::default()).expect("loads");
    let split =
        load_model(&path, 3, Default::default()).expect("9 heads and 3 KV heads split over 3");
    assert_eq!(split.world_size(), 3);
    assert_eq!(split.kv_bytes_per_token(), whole.kv_bytes_per_token());
    let engine = Engine::load(&path).expect("loads");
    let mut worst = 0f32;
    for text in [
        "The capital of France is",
        "fn main() { println!(\"hello\"); }",
        "Scaffold a Go service with a /healthz endpoint and structured logging.",
    ] {
        let ids = engine.tokenizer.encode(text).expect("encodes");
        worst = worst.max(compare(&score(&split, &ids), &score(&whole, &ids), text));
    }
    eprintln!("TP 3 vs TP 1, largest logit difference: {worst:e}");
}

/// The model at `path` split over each of `worlds` ranks gives the whole model's logits and
/// `reference`'s (transformers') for every case of it.
fn splits_match(name: &str, path: &std::path::Path, reference: &std::path::Path, worlds: &[usize]) {
    let fx: Value = serde_json::from_str(&std::fs::read_to_string(reference).expect("reference"))
        .expect("json");
    let whole = load_model(path, 1, Default::default()).expect("loads");
    for &world in worlds {
        let split = load_model(path, world, Default::default()).expect("splits");
        for case in fx["cases"].as_array().expect("cases") {
            let ids: Vec<u32> = case["ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|v| v.as_u64().expect("id") as u32)
                .collect();
            let got = score(&split, &ids);
            compare(
                &got,
                &score(&whole, &ids),
                &format!("{name} TP {world} vs TP 1"),
            );
            let want: Vec<f32> = case["logits"]
                .as_array()
                .expect("rows")
                .iter()
                .flat_map(|r| {
                    r.as_array()
                        .expect("row")
                        .iter()
                        .map(|v| v.as_f64().expect("logit") as f32)
                })
                .collect();
            compare(&got, &want, &format!("{name} TP {world} vs transformers"));
        }
    }
}

#[test]
fn tiny_models_split_over_2_and_4_ranks_match_the_whole_model_and_transformers() {
    for name in [
        "tiny-qwen2",
        "tiny-llama3",
        "tiny-qwen3",
        "tiny-phi3",
        "tiny-phi3-longrope",
        "tiny-gemma3",
    ] {
        let dir = fixture(name);
        // 4 heads, 2 KV heads: TP 2 splits the KV heads, TP 4 replicates them.
        splits_match(name, &dir, &dir.join("reference.json"), &[2, 4]);
    }
}

#[test]
fn a_q4_k_m_gguf_split_over_2_ranks_matches_the_whole_model_and_transformers() {
    // Row splits keep whole Q4_K/Q6_K rows quantised; column splits of 128 fall inside a
    // 256-wide super-block and are dequantised: both paths run.
    splits_match(
        "Q4_K_M",
        &fixture("tiny-qwen3-Q4_K_M.gguf"),
        &fixture("tiny-qwen3-Q4_K_M.json"),
        &[2],
    );
}

fn request(i: usize, max_tokens: usize, temperature: f32) -> Request {
    Request {
        custom_id: format!("r{i}"),
        line: i + 1,
        endpoint: Endpoint::ChatCompletions,
        model: None,
        prompt: Prompt::Chat(vec![ChatMessage {
            role: "user".into(),
            content: format!("Give one tip about topic number {i}."),
        }]),
        params: GenerationParams {
            max_tokens: Some(max_tokens),
            temperature,
            seed: Some(7 + i as u64),
            ..GenerationParams::default()
        },
    }
}

fn run(engine: &Engine, reqs: Vec<Request>) -> HashMap<String, Vec<u32>> {
    let mut out = HashMap::new();
    let opts = EngineOptions {
        max_num_seqs: 16,
        max_num_batched_tokens: 512,
        ..EngineOptions::default()
    };
    engine.run(reqs, opts, |o| match o {
        Outcome::Done(c) => {
            out.insert(c.custom_id, c.choices[0].token_ids.clone());
        }
        Outcome::Failed { error, .. } => panic!("{}", error.message),
    });
    out
}

#[test]
fn greedy_tokens_at_tp3_equal_tp1_up_to_the_first_near_tie_and_are_batch_invariant() {
    let path = default_model();
    let whole = Engine::load(&path).expect("loads");
    let split = Engine::load_parallel(&path, 3, Precision::default()).expect("splits");
    let reqs: Vec<Request> = (0..6).map(|i| request(i, 16, 0.0)).collect();
    let a = run(&whole, reqs.clone());
    let b = run(&split, reqs.clone());
    for r in &reqs {
        let (x, y) = (&a[&r.custom_id], &b[&r.custom_id]);
        if let Some(i) = x.iter().zip(y).position(|(p, q)| p != q) {
            // A divergence is allowed only where the whole model's top two were nearly tied.
            let prompt = whole.prompt_ids(r).expect("prompt");
            let mut ids = prompt.clone();
            ids.extend(&x[..i]);
            let vocab = whole.model.cfg().vocab_size;
            let logits = whole.model.score(&ids).expect("scores");
            let mut last: Vec<f32> = logits[logits.len() - vocab..].to_vec();
            last.sort_by(|p, q| q.total_cmp(p));
            assert!(
                last[0] - last[1] < 0.05,
                "{}: TP 3 diverged at token {i} with margin {}",
                r.custom_id,
                last[0] - last[1]
            );
        }
    }
    // The determinism contract at a fixed degree: alone or in a batch, sampled or greedy.
    let mixed: Vec<Request> = (0..8)
        .map(|i| request(i, 10, if i % 2 == 0 { 0.0 } else { 0.8 }))
        .collect();
    let batch = run(&split, mixed.clone());
    for r in mixed.iter().take(3) {
        let alone = run(&split, vec![r.clone()]);
        assert_eq!(
            alone[&r.custom_id], batch[&r.custom_id],
            "{} differs alone vs in a batch at TP 3",
            r.custom_id
        );
    }
}

#[test]
fn an_impossible_split_names_the_dimension_and_the_sizes_that_work() {
    let err = Engine::load_parallel(&default_model(), 2, Precision::default())
        .expect_err("9 heads over 2");
    let msg = err.to_string();
    assert!(
        msg.contains("num_attention_heads = 9 is not divisible by 2"),
        "{msg}"
    );
    assert!(
        msg.contains("sizes that work for this model: 1, 3"),
        "{msg}"
    );
    let err = Engine::load_parallel(&fixture("tiny-qwen2"), 3, Precision::default())
        .expect_err("4 heads over 3");
    assert!(err.to_string().contains("1, 2, 4"), "{err}");
}

#[test]
fn weights_are_sliced_by_rows_columns_and_whole_blocks() {
    // A 3 × 4 matrix.
    let m: Vec<u32> = (0..12).collect();
    assert_eq!(
        slice_matrix(&m, 3, 4, 1, 1, Part::Rows(1, 2)),
        Some((4..12).collect())
    );
    assert_eq!(
        slice_matrix(&m, 3, 4, 1, 1, Part::Cols(2, 2)),
        Some(vec![2, 3, 6, 7, 10, 11])
    );
    assert_eq!(slice_matrix(&m, 3, 4, 1, 1, Part::All), Some(m.clone()));
    // Two rows of 64 columns as two 32-column blocks of 3 bytes each (a toy block format).
    let q: Vec<u8> = (0..12).collect();
    assert_eq!(
        slice_matrix(&q, 2, 6, 3, 32, Part::Cols(32, 32)),
        Some(vec![3, 4, 5, 9, 10, 11])
    );
    assert_eq!(
        slice_matrix(&q, 2, 6, 3, 32, Part::Rows(1, 1)),
        Some(vec![6, 7, 8, 9, 10, 11])
    );
    // A column split inside a block cannot stay quantised (the loader dequantises instead).
    assert_eq!(slice_matrix(&q, 2, 6, 3, 32, Part::Cols(16, 32)), None);
}
