//! Correctness against HF transformers: fixtures made by `scripts/make_fixtures.py` (run by hand)
//! and committed under `tests/fixtures/`.
//!
//! Tolerances: the engine computes in f32 on weights dequantised exactly as transformers does, so
//! logits agree to summation-order noise. We require |ours − ref| ≤ 2e-3 + 1e-3·|ref| for every
//! compared logit; greedy tokens must be equal up to the first step whose reference top-1 minus
//! top-2 margin is below 0.05 (past a near-tie, either token is a correct answer): a
//! divergence anywhere else fails.

use gristmill_engine::backend::CpuBackend;
use gristmill_engine::model::llama::{Logits, StepSeq};
use gristmill_engine::tensor_parallel::Model;
use gristmill_engine::Engine;
use gristmill_protocol::ChatMessage;
use gristmill_testkit::{default_model, fixtures};
use serde_json::Value;

const ATOL: f32 = 2e-3;
const RTOL: f32 = 1e-3;
const MARGIN: f64 = 0.05;

fn load_json(name: &str) -> Value {
    let p = fixtures().join(name);
    let text = std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", p.display()));
    serde_json::from_str(&text).expect("fixture is JSON")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// Asserts a logit is within tolerance of the reference; returns the absolute difference.
fn check_logit(ours: f32, reference: &Value, what: impl Fn() -> String) -> f32 {
    let r = reference.as_f64().expect("logit") as f32;
    assert!(
        (ours - r).abs() <= ATOL + RTOL * r.abs(),
        "{}: {ours} vs {r}",
        what()
    );
    (ours - r).abs()
}

fn all_logits(model: &Model<CpuBackend>, tokens: &[u32]) -> Vec<Vec<f32>> {
    let vocab = model.cfg().vocab_size;
    model
        .score(tokens)
        .expect("scores")
        .chunks_exact(vocab)
        .map(<[f32]>::to_vec)
        .collect()
}

/// Greedy decoding one token per step through the paged cache.
fn greedy(model: &Model<CpuBackend>, prompt: &[u32], steps: usize) -> Vec<u32> {
    let block_size = 16;
    let blocks = (prompt.len() + steps).div_ceil(block_size);
    let mut kv = model.kv_cache(blocks, block_size).expect("KV cache");
    // A scrambled block table: positions need not live in consecutive blocks.
    let table: Vec<u32> = (0..blocks as u32).rev().collect();
    let mut tokens = prompt.to_vec();
    let mut start = 0;
    let mut out = Vec::new();
    for _ in 0..steps {
        let seq = StepSeq {
            tokens: &tokens,
            start,
            block_table: &table,
            logits: Logits::Last,
        };
        let logits = model.forward(&mut kv, &[seq]).expect("step");
        start += tokens.len();
        let next = gristmill_kernels::cpu::argmax(&logits[0]) as u32;
        out.push(next);
        tokens = vec![next];
    }
    out
}

#[test]
fn smollm2_logits_match_transformers() {
    let engine = Engine::load(&default_model()).expect("default model loads");
    let fx = load_json("smollm2_logits.json");
    let probes = ids(&fx["probe_ids"]);
    let mut worst = 0f32;
    for case in fx["cases"].as_array().expect("cases") {
        let prompt = case["prompt"].as_str().expect("prompt");
        let want_ids = ids(&case["ids"]);
        assert_eq!(
            engine.tokenizer.encode(prompt).expect("encodes"),
            want_ids,
            "tokenizer differs on {prompt:?}"
        );
        let rows = all_logits(&engine.model, &want_ids);
        for (pos, (row, r)) in rows
            .iter()
            .zip(case["positions"].as_array().expect("positions"))
            .enumerate()
        {
            let top = ids(&r["top_ids"])
                .into_iter()
                .zip(r["top_logits"].as_array().expect("top"));
            let probe = probes
                .iter()
                .copied()
                .zip(r["probe_logits"].as_array().expect("probes"));
            for (id, v) in top.chain(probe) {
                let diff = check_logit(row[id as usize], v, || {
                    format!("{prompt:?} pos {pos} id {id}")
                });
                worst = worst.max(diff);
            }
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|&x| (x as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            let want = r["logsumexp"].as_f64().expect("lse");
            assert!(
                (lse - want).abs() < 2e-3 + 1e-4 * want.abs(),
                "{prompt:?} pos {pos}: logsumexp {lse} vs {want}"
            );
        }
    }
    eprintln!("largest logit difference from transformers: {worst:.2e}");
}

#[test]
fn smollm2_greedy_matches_transformers_up_to_near_ties() {
    let engine = Engine::load(&default_model()).expect("default model loads");
    let fx = load_json("smollm2_greedy.json");
    let cases = fx["cases"].as_array().expect("cases");
    assert!(cases.len() >= 8);
    let mut compared = 0;
    for case in cases {
        let want_prompt = ids(&case["ids"]);
        let prompt = if case["kind"] == "chat" {
            let messages: Vec<ChatMessage> =
                serde_json::from_value(case["messages"].clone()).expect("messages");
            let text = engine
                .tokenizer
                .apply_chat_template(&messages)
                .expect("template renders");
            engine.tokenizer.encode(&text).expect("encodes")
        } else {
            engine
                .tokenizer
                .encode(case["prompt"].as_str().expect("prompt"))
                .expect("encodes")
        };
        assert_eq!(prompt, want_prompt, "prompt ids differ for {case}");
        let want = ids(&case["tokens"]);
        let margins: Vec<f64> = case["margins"]
            .as_array()
            .expect("margins")
            .iter()
            .map(|m| m.as_f64().expect("f64"))
            .collect();
        // Every token must match until the first divergence, and a divergence is only allowed at a
        // step where the reference itself was nearly tied (margin below MARGIN).
        let got = greedy(&engine.model, &prompt, want.len());
        let exact = got
            .iter()
            .zip(&want)
            .position(|(a, b)| a != b)
            .unwrap_or(want.len());
        if exact < want.len() {
            assert!(
                margins[exact] < MARGIN,
                "greedy token {exact} differs ({} vs reference {}) where the reference margin is {:.4}, \
                 not a near-tie; prompt {case}",
                got[exact],
                want[exact],
                margins[exact]
            );
        }
        compared += exact;
    }
    eprintln!("{compared} greedy tokens compared exactly");
    assert!(
        compared >= 100,
        "too few tokens compared ({compared}); fixtures have too many early near-ties"
    );
}

#[test]
fn smollm2_tokenizer_and_chat_template_match_transformers() {
    let engine = Engine::load(&default_model()).expect("default model loads");
    let fx = load_json("smollm2_tokenizer.json");
    for case in fx["encode_without_special_tokens"]
        .as_array()
        .expect("cases")
    {
        let text = case["text"].as_str().expect("text");
        assert_eq!(
            engine.tokenizer.encode(text).expect("encodes"),
            ids(&case["ids"]),
            "ids differ for {text:?}"
        );
    }
    for case in fx["chat_templates"].as_array().expect("templates") {
        let messages: Vec<ChatMessage> =
            serde_json::from_value(case["messages"].clone()).expect("messages");
        let text = engine
            .tokenizer
            .apply_chat_template(&messages)
            .expect("renders");
        assert_eq!(text, case["text"].as_str().expect("text"));
    }
    assert_eq!(
        engine.tokenizer.bos_id,
        fx["bos_token_id"].as_u64().map(|v| v as u32)
    );
    assert_eq!(
        engine.tokenizer.eos_ids.first().copied(),
        fx["eos_token_id"].as_u64().map(|v| v as u32)
    );
    // Decoding drops special tokens and restores bytes exactly.
    let text = "unicode: naïve café, 日本語 🚀";
    let ids = engine.tokenizer.encode(text).expect("encodes");
    assert_eq!(engine.tokenizer.decode(&ids).expect("decodes"), text);
}

/// The tiny model `name` gives transformers' ids and logits (`name/reference.json`); returns it.
fn tiny_model_matches(name: &str) -> Engine {
    model_matches(
        name,
        &fixtures().join(name),
        &format!("{name}/reference.json"),
    )
}

/// The model at `model` gives the token ids and the logits of the fixture `reference`
/// (transformers'); returns it.
fn model_matches(name: &str, model: &std::path::Path, reference: &str) -> Engine {
    let engine = Engine::load(model).unwrap_or_else(|e| panic!("{name} loads: {e}"));
    let fx = load_json(reference);
    for case in fx["cases"].as_array().expect("cases") {
        let prompt = case["prompt"].as_str().expect("prompt");
        let want_ids = ids(&case["ids"]);
        assert_eq!(
            engine.tokenizer.encode(prompt).expect("encodes"),
            want_ids,
            "{name}: tokenizer differs on {prompt:?}"
        );
        logits_match(
            &engine,
            &want_ids,
            &case["logits"],
            &format!("{name} {prompt:?}"),
        );
    }
    engine
}

/// Every logit the model gives at every position of `ids` is `want`'s (rows of logits).
fn logits_match(engine: &Engine, ids: &[u32], want: &Value, what: &str) {
    let rows = all_logits(&engine.model, ids);
    for (pos, (row, want)) in rows
        .iter()
        .zip(want.as_array().expect("logit rows"))
        .enumerate()
    {
        for (id, (&got, w)) in row.iter().zip(want.as_array().expect("row")).enumerate() {
            check_logit(got, w, || format!("{what} pos {pos} id {id}"));
        }
    }
}

#[test]
fn tiny_qwen2_sharded_f32_with_bias_and_untied_head_matches_transformers() {
    tiny_model_matches("tiny-qwen2");
}

#[test]
fn tiny_llama3_bf16_with_rope_scaling_and_tied_head_matches_transformers() {
    tiny_model_matches("tiny-llama3");
}

#[test]
fn tiny_phi3_with_longrope_matches_transformers_within_its_original_length() {
    let engine = tiny_model_matches("tiny-phi3-longrope");
    assert_eq!(engine.model.cfg().max_position_embeddings, 64);
}

#[test]
fn tiny_gemma3_with_a_sliding_window_and_sandwich_norms_matches_transformers() {
    tiny_model_matches("tiny-gemma3");
}

#[test]
fn tiny_phi3_with_fused_projections_matches_transformers() {
    let engine = tiny_model_matches("tiny-phi3");
    // Its sliding window (200 positions) caps the context: within it, attention is exact.
    assert_eq!(engine.model.cfg().max_position_embeddings, 200);
}

/// A real `Q4_K_M` file (Q4_K and Q6_K blocks, F32 norms), converted and quantised by
/// llama.cpp's own tools, against transformers loading that GGUF.
#[test]
fn a_q4_k_m_gguf_made_by_llama_quantize_matches_transformers() {
    model_matches(
        "tiny-qwen3-Q4_K_M",
        &fixtures().join("tiny-qwen3-Q4_K_M.gguf"),
        "tiny-qwen3-Q4_K_M.json",
    );
}

#[test]
fn tiny_qwen3_bf16_with_per_head_qk_norms_matches_transformers() {
    tiny_model_matches("tiny-qwen3");
}

/// SentencePiece vocabularies in GGUF (scores, token types, byte fallback, no merges), as
/// llama.cpp's converter writes them for a Llama, a Phi-3 and a Gemma 3 model: the same ids as
/// transformers'
/// tokenizer for that GGUF, with and without the BOS a prompt gets, and the same decoded text.
#[test]
fn sentencepiece_gguf_tokenizers_give_transformers_ids() {
    for arch in ["llama", "phi3", "gemma3"] {
        let fx = load_json(&format!("tiny-spm-{arch}.json"));
        let path = fixtures().join(fx["file"].as_str().expect("file"));
        let tok = gristmill_engine::load_tokenizer(&path).expect("the tokenizer loads");
        {
            // The model the converter wrote (Phi-3's fused projections under their GGUF names)
            // gives transformers' logits for that GGUF.
            let engine = Engine::load(&path).expect("the model loads");
            for case in fx["logits"].as_array().expect("logits") {
                let want_ids = ids(&case["ids"]);
                assert_eq!(
                    tok.encode_prompt(case["prompt"].as_str().expect("prompt"))
                        .expect("ids"),
                    want_ids
                );
                logits_match(
                    &engine,
                    &want_ids,
                    &case["logits"],
                    &format!("tiny-spm-{arch}"),
                );
            }
        }
        for case in fx["cases"].as_array().expect("cases") {
            let text = case["text"].as_str().expect("text");
            assert_eq!(
                tok.encode(text).expect("encodes"),
                ids(&case["ids"]),
                "{arch}: {text:?}"
            );
            assert_eq!(
                tok.encode_prompt(text).expect("encodes"),
                ids(&case["prompt_ids"]),
                "{arch} prompt: {text:?}"
            );
            assert_eq!(
                tok.decode(&ids(&case["ids"])).expect("decodes"),
                case["decoded"].as_str().expect("decoded"),
                "{arch} decode: {text:?}"
            );
        }
    }
}

/// Real chat templates (Qwen3, Phi-3.5, Gemma 2's — Gemma 3's is not among llama.cpp's copies,
/// Gemma 2's has its role checks) render as transformers renders them, and a conversation a
/// template refuses (Gemma: a system turn) is refused with the template's own message.
#[test]
fn real_chat_templates_render_as_transformers_renders_them() {
    let fx = load_json("chat_templates.json");
    for case in fx["cases"].as_array().expect("cases") {
        let name = case["template"].as_str().expect("name");
        let template = fx["templates"][name].as_str().expect("template");
        let specials = &fx["specials"][name];
        let messages: Vec<ChatMessage> =
            serde_json::from_value(case["messages"].clone()).expect("messages");
        let got = gristmill_engine::tokenizer::render_chat_template(
            template,
            &messages,
            specials["bos"].as_str().expect("bos"),
            specials["eos"].as_str().expect("eos"),
        );
        match (case["rendered"].as_str(), case["error"].as_str()) {
            (Some(want), _) => assert_eq!(got.expect("renders"), want, "{name}: {messages:?}"),
            (None, Some(why)) => {
                let e = got.expect_err("the template refuses it").to_string();
                assert!(e.contains(why), "{name}: {e} (wanted {why:?})");
            }
            _ => panic!("a case without an outcome"),
        }
    }
}
