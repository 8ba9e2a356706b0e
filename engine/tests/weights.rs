//! Checkpoint loading: a GGUF written from the tiny safetensors fixture (with llama.cpp's Q/K
//! permutation and a `rope_freqs` tensor) must give the same logits as the safetensors original;
//! broken files must fail with errors that name the file, the tensor and what was expected.

use std::path::{Path, PathBuf};

use gristmill_engine::config::ModelConfig;
use gristmill_engine::weights::{Checkpoint, GgufWriter, MetaValue};
use gristmill_engine::{Engine, Error};
use gristmill_kernels::quant::{dequantize, random_blocks};
use gristmill_kernels::GgmlType;
use gristmill_testkit::fixture;
use serde_json::Value;

/// llama.cpp's `permute` for interleaved RoPE: HF row (h, j, i) goes to h*d + 2i + j.
fn permute(w: &[f32], heads: usize, d: usize) -> Vec<f32> {
    let width = w.len() / (heads * d);
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..d / 2 {
                let src = h * d + j * d / 2 + i;
                let dst = h * d + 2 * i + j;
                out[dst * width..(dst + 1) * width]
                    .copy_from_slice(&w[src * width..(src + 1) * width]);
            }
        }
    }
    out
}

/// Writes the tiny Llama-3 fixture as a GGUF file the way llama.cpp's converter would.
/// `skip` leaves a tensor out; `ty` quantises the matrices.
fn tiny_llama_gguf(ty: GgmlType, skip: Option<&str>) -> GgufWriter {
    let dir = fixture("tiny-llama3");
    let ckpt = Checkpoint::open(&dir).expect("fixture opens");
    let cfg = ckpt.config().expect("config");
    let mut w = llama_meta(&cfg);
    tokenizer_meta(&mut w);
    llama_tensors(w, &ckpt, &cfg, ty, skip)
}

/// The tiny Llama-3 fixture's byte-level BPE tokenizer (320 tokens) as GGUF metadata.
fn tokenizer_meta(w: &mut GgufWriter) {
    let dir = fixture("tiny-llama3");
    let tok: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("tokenizer.json")).expect("tokenizer"),
    )
    .expect("json");
    let mut vocab: Vec<(String, u64)> = tok["model"]["vocab"]
        .as_object()
        .expect("vocab")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().expect("id")))
        .collect();
    for a in tok["added_tokens"].as_array().expect("added") {
        let (c, id) = (
            a["content"].as_str().expect("content").to_string(),
            a["id"].as_u64().expect("id"),
        );
        if !vocab.iter().any(|(_, i)| *i == id) {
            vocab.push((c, id));
        }
    }
    vocab.sort_by_key(|(_, id)| *id);
    let specials: Vec<u64> = tok["added_tokens"]
        .as_array()
        .expect("added")
        .iter()
        .map(|a| a["id"].as_u64().expect("id"))
        .collect();
    let merges: Vec<MetaValue> = tok["model"]["merges"]
        .as_array()
        .expect("merges")
        .iter()
        .map(|m| match m {
            Value::Array(p) => MetaValue::String(format!(
                "{} {}",
                p[0].as_str().expect("a"),
                p[1].as_str().expect("b")
            )),
            Value::String(s) => MetaValue::String(s.clone()),
            _ => panic!("odd merge"),
        })
        .collect();
    w.meta("tokenizer.ggml.model", MetaValue::String("gpt2".into()))
        .meta("tokenizer.ggml.pre", MetaValue::String("default".into()))
        .meta(
            "tokenizer.ggml.tokens",
            MetaValue::Array(
                vocab
                    .iter()
                    .map(|(t, _)| MetaValue::String(t.clone()))
                    .collect(),
            ),
        )
        .meta(
            "tokenizer.ggml.token_type",
            MetaValue::Array(
                vocab
                    .iter()
                    .map(|(_, id)| MetaValue::Int(if specials.contains(id) { 3 } else { 1 }))
                    .collect(),
            ),
        )
        .meta("tokenizer.ggml.merges", MetaValue::Array(merges))
        .meta("tokenizer.ggml.bos_token_id", MetaValue::Int(1))
        .meta("tokenizer.ggml.eos_token_id", MetaValue::Int(2));
}

/// A GGUF writer with the `llama` architecture's metadata for `cfg`.
fn llama_meta(cfg: &ModelConfig) -> GgufWriter {
    let mut w = GgufWriter::new();
    let int = |v: usize| MetaValue::Int(v as i64);
    w.meta("general.architecture", MetaValue::String("llama".into()))
        .meta("llama.embedding_length", int(cfg.hidden_size))
        .meta("llama.feed_forward_length", int(cfg.intermediate_size))
        .meta("llama.block_count", int(cfg.num_layers))
        .meta("llama.attention.head_count", int(cfg.num_heads))
        .meta("llama.attention.head_count_kv", int(cfg.num_kv_heads))
        .meta(
            "llama.attention.layer_norm_rms_epsilon",
            MetaValue::Float(cfg.rms_norm_eps as f64),
        )
        .meta(
            "llama.rope.freq_base",
            MetaValue::Float(cfg.rope_theta as f64),
        )
        .meta("llama.context_length", int(cfg.max_position_embeddings));
    w
}

/// Adds the checkpoint's tensors (matrices as `ty`, norms as F32) and rope factors to `w`.
fn llama_tensors(
    mut w: GgufWriter,
    ckpt: &Checkpoint,
    cfg: &ModelConfig,
    ty: GgmlType,
    skip: Option<&str>,
) -> GgufWriter {
    // Llama-3 rope scaling travels as per-dimension divisors of the unscaled frequencies.
    let mut unscaled = cfg.clone();
    unscaled.rope_scaling = None;
    let factors: Vec<f32> = unscaled
        .rope_inv_freq()
        .iter()
        .zip(cfg.rope_inv_freq())
        .map(|(base, scaled)| base / scaled)
        .collect();
    w.tensor(
        "rope_freqs.weight",
        &[factors.len()],
        GgmlType::F32,
        &factors,
    );
    let (h, hd) = (cfg.hidden_size, cfg.head_dim);
    let mut put =
        |hf: &str, gguf: &str, shape: &[usize], ty: GgmlType, permute_heads: Option<usize>| {
            if skip == Some(gguf) {
                return;
            }
            let mut data = ckpt.tensor(hf, shape, cfg).expect("fixture tensor");
            if let Some(heads) = permute_heads {
                data = permute(&data, heads, hd);
            }
            w.tensor(gguf, shape, ty, &data);
        };
    put(
        "model.embed_tokens.weight",
        "token_embd.weight",
        &[cfg.vocab_size, h],
        ty,
        None,
    );
    put(
        "model.norm.weight",
        "output_norm.weight",
        &[h],
        GgmlType::F32,
        None,
    );
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        let b = format!("blk.{l}");
        let q = cfg.num_heads * hd;
        let kv = cfg.num_kv_heads * hd;
        let f = cfg.intermediate_size;
        put(
            &format!("{p}.input_layernorm.weight"),
            &format!("{b}.attn_norm.weight"),
            &[h],
            GgmlType::F32,
            None,
        );
        put(
            &format!("{p}.self_attn.q_proj.weight"),
            &format!("{b}.attn_q.weight"),
            &[q, h],
            ty,
            Some(cfg.num_heads),
        );
        put(
            &format!("{p}.self_attn.k_proj.weight"),
            &format!("{b}.attn_k.weight"),
            &[kv, h],
            ty,
            Some(cfg.num_kv_heads),
        );
        put(
            &format!("{p}.self_attn.v_proj.weight"),
            &format!("{b}.attn_v.weight"),
            &[kv, h],
            ty,
            None,
        );
        put(
            &format!("{p}.self_attn.o_proj.weight"),
            &format!("{b}.attn_output.weight"),
            &[h, q],
            ty,
            None,
        );
        put(
            &format!("{p}.post_attention_layernorm.weight"),
            &format!("{b}.ffn_norm.weight"),
            &[h],
            GgmlType::F32,
            None,
        );
        put(
            &format!("{p}.mlp.gate_proj.weight"),
            &format!("{b}.ffn_gate.weight"),
            &[f, h],
            ty,
            None,
        );
        put(
            &format!("{p}.mlp.up_proj.weight"),
            &format!("{b}.ffn_up.weight"),
            &[f, h],
            ty,
            None,
        );
        put(
            &format!("{p}.mlp.down_proj.weight"),
            &format!("{b}.ffn_down.weight"),
            &[h, f],
            ty,
            None,
        );
    }
    w
}

fn write(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, bytes).expect("write test file");
    p
}

fn logits(engine: &Engine, text: &str) -> Vec<f32> {
    engine
        .model
        .score(&engine.tokenizer.encode(text).expect("encodes"))
        .expect("scores")
}

#[test]
fn gguf_with_permuted_qk_and_rope_freqs_matches_safetensors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = write(
        &tmp,
        "tiny.gguf",
        &tiny_llama_gguf(GgmlType::F32, None).to_bytes(),
    );
    let from_gguf = Engine::load(&path).expect("gguf loads");
    let from_st = Engine::load(&fixture("tiny-llama3")).expect("safetensors loads");
    let text = "fn main() { println!(\"hi\"); } 1234567890 digits";
    assert_eq!(
        from_gguf.tokenizer.encode(text).expect("ids"),
        from_st.tokenizer.encode(text).expect("ids")
    );
    let (a, b) = (logits(&from_gguf, text), logits(&from_st, text));
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(
        worst < 1e-4,
        "GGUF and safetensors logits differ by {worst}"
    );
}

#[test]
fn every_supported_gguf_type_loads_and_stays_close() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let reference = logits(
        &Engine::load(&fixture("tiny-llama3")).expect("loads"),
        "Hello, world!",
    );
    for (ty, tol) in [
        (GgmlType::F16, 1e-5),
        (GgmlType::BF16, 1e-5),
        (GgmlType::Q8_0, 0.06),
        (GgmlType::Q4_1, 0.6),
        (GgmlType::Q4_0, 0.6),
        // llama.cpp writes these in place of K-quants in rows not a multiple of 256 long.
        (GgmlType::Q5_0, 0.3),
        (GgmlType::Q5_1, 0.3),
    ] {
        let path = write(
            &tmp,
            &format!("tiny-{ty:?}.gguf"),
            &tiny_llama_gguf(ty, None).to_bytes(),
        );
        let got = logits(
            &Engine::load(&path).unwrap_or_else(|e| panic!("{ty:?} loads: {e}")),
            "Hello, world!",
        );
        // Relative L2 error of all logits: quantisation noise grows from f16 to 4 bits.
        let err: f32 = got
            .iter()
            .zip(&reference)
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f32>()
            .sqrt()
            / reference.iter().map(|y| y * y).sum::<f32>().sqrt();
        eprintln!("{ty:?}: relative logit error {err:.2e}");
        assert!(
            err < tol,
            "{ty:?}: logits differ from f32 by {err} relative (allowed {tol})"
        );
    }
}

/// A model whose matrices are K-quant and 5-bit blocks, mixed per tensor as llama.cpp's
/// `Q4_K_M` and `Q5_K_M` files mix them (every quantised type but Q4_0, which the tiny model
/// covers, appears), and its twin with
/// the same weights dequantised to F32 (the values ggml's reference dequantisers give, as
/// `kernels/tests/quant_reference.rs` checks). Rows are 256 and 512 long, whole super-blocks.
fn k_quant_twins() -> (GgufWriter, GgufWriter) {
    let mut cfg = Checkpoint::open(&fixture("tiny-llama3"))
        .expect("fixture opens")
        .config()
        .expect("config");
    (cfg.hidden_size, cfg.intermediate_size) = (256, 512);
    (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) = (4, 2, 64);
    cfg.rope_scaling = None;
    let (mut quant, mut twin) = (llama_meta(&cfg), llama_meta(&cfg));
    tokenizer_meta(&mut quant);
    tokenizer_meta(&mut twin);
    let (h, f, kv) = (256, 512, 2 * 64);
    let mut seed = 0;
    let mut put = |name: &str, shape: [usize; 2], ty: GgmlType| {
        seed += 1;
        let n = shape[0] * shape[1];
        let bytes = random_blocks(ty, n / ty.block_len(), seed, 2e-3);
        let mut values = vec![0f32; n];
        dequantize(ty, &bytes, &mut values);
        quant.raw_tensor(name, &shape, ty.id(), bytes);
        twin.tensor(name, &shape, GgmlType::F32, &values);
    };
    use GgmlType::*;
    put("token_embd.weight", [cfg.vocab_size, h], Q6K);
    let layers = [
        [Q4K, IQ4XS, Q6K, Q5K, Q3K, Q2K, Q6K],
        [Q5_0, Q5_1, Q8_0, IQ4NL, Q4_1, Q5K, Q4K],
    ];
    for (l, types) in layers.iter().enumerate() {
        let names = [
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ];
        let shapes = [[h, h], [kv, h], [kv, h], [h, h], [f, h], [f, h], [h, f]];
        for ((name, shape), ty) in names.iter().zip(shapes).zip(types) {
            put(&format!("blk.{l}.{name}.weight"), shape, *ty);
        }
    }
    for w in [&mut quant, &mut twin] {
        let ones = vec![1.0f32; h];
        w.tensor("output_norm.weight", &[h], F32, &ones);
        for l in 0..2 {
            w.tensor(&format!("blk.{l}.attn_norm.weight"), &[h], F32, &ones);
            w.tensor(&format!("blk.{l}.ffn_norm.weight"), &[h], F32, &ones);
        }
    }
    (quant, twin)
}

#[test]
fn k_quant_models_compute_exactly_what_their_dequantised_twins_compute() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (quant, twin) = k_quant_twins();
    let q = Engine::load(&write(&tmp, "mixed.gguf", &quant.to_bytes())).expect("K-quants load");
    let f = Engine::load(&write(&tmp, "twin.gguf", &twin.to_bytes())).expect("twin loads");
    for text in ["Hello, world!", "fn main() { 1234 }"] {
        let (a, b) = (logits(&q, text), logits(&f, text));
        assert!(a.iter().all(|x| x.is_finite()), "{a:?}");
        assert!(a.iter().any(|&x| x != a[0]), "the logits say something");
        assert_eq!(a, b, "{text:?}: the quantised weights changed a logit");
    }
}

#[test]
fn a_model_larger_than_memory_fails_before_allocating_and_says_so() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut w = tiny_llama_gguf(GgmlType::F32, None);
    // A header that promises 4 TB of f16 weights (the bytes are not there: nothing may read
    // them before the size check).
    w.raw_tensor("blk.0.huge.weight", &[1 << 20, 1 << 20], 1, Vec::new());
    let p = write(&tmp, "huge.gguf", &w.to_bytes());
    let e = load_err(&p);
    let msg = e.to_string();
    assert!(matches!(e, Error::NotEnoughMemory { .. }), "{msg}");
    assert!(
        msg.contains("huge.gguf") && msg.contains("MB of memory") && msg.contains("available"),
        "{msg}"
    );
}

fn load_err(path: &Path) -> Error {
    Engine::load(path).expect_err("loading should fail")
}

#[test]
fn truncated_gguf_names_file_and_tensor() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bytes = tiny_llama_gguf(GgmlType::F32, None).to_bytes();
    let path = write(&tmp, "cut.gguf", &bytes[..bytes.len() - 1000]);
    let e = load_err(&path);
    let msg = e.to_string();
    assert!(matches!(e, Error::TruncatedTensor { .. }), "{msg}");
    assert!(
        msg.contains("cut.gguf") && msg.contains("truncated") && msg.contains("blk.1."),
        "{msg}"
    );

    let header_only = write(&tmp, "header.gguf", &bytes[..100]);
    let msg = load_err(&header_only).to_string();
    assert!(
        msg.contains("header.gguf") && msg.contains("header ends early"),
        "{msg}"
    );
}

#[test]
fn unknown_tensor_type_missing_tensor_and_wrong_shape_are_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut w = tiny_llama_gguf(GgmlType::F32, Some("blk.0.ffn_up.weight"));
    let p = write(&tmp, "missing.gguf", &w.to_bytes());
    let msg = load_err(&p).to_string();
    assert!(
        msg.contains("missing.gguf")
            && msg.contains("blk.0.ffn_up.weight")
            && msg.contains("missing"),
        "{msg}"
    );

    // IQ2_XXS (ggml type 16) is a real type Gristmill does not read yet.
    w.raw_tensor(
        "blk.0.ffn_up.weight",
        &[160, 64],
        16,
        vec![0u8; 160 * 64 / 256 * 66],
    );
    let p = write(&tmp, "iq2.gguf", &w.to_bytes());
    let msg = load_err(&p).to_string();
    assert!(
        msg.contains("iq2.gguf") && msg.contains("blk.0.ffn_up.weight") && msg.contains("IQ2_XXS"),
        "{msg}"
    );

    let mut w = tiny_llama_gguf(GgmlType::F32, Some("blk.0.ffn_up.weight"));
    w.tensor(
        "blk.0.ffn_up.weight",
        &[64, 160],
        GgmlType::F32,
        &vec![0.0; 64 * 160],
    );
    let p = write(&tmp, "shape.gguf", &w.to_bytes());
    let msg = load_err(&p).to_string();
    assert!(
        msg.contains("shape.gguf")
            && msg.contains("[64, 160]")
            && msg.contains("expected [160, 64]"),
        "{msg}"
    );
}

#[test]
fn missing_and_corrupt_models_fail_fast() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let msg = load_err(&tmp.path().join("nope.gguf")).to_string();
    assert!(
        msg.contains("nope.gguf") && msg.contains("does not exist"),
        "{msg}"
    );
    let p = write(&tmp, "junk.gguf", b"this is not a model at all, just text");
    let msg = load_err(&p).to_string();
    assert!(
        msg.contains("junk.gguf") && msg.contains("bad magic"),
        "{msg}"
    );
    let empty = tempfile::tempdir().expect("tempdir");
    let msg = load_err(empty.path()).to_string();
    assert!(msg.contains("no config.json"), "{msg}");
}

#[test]
fn broken_safetensors_checkpoints_are_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = fixture("tiny-llama3");
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).expect("copy");
    }
    let weights = std::fs::read(src.join("model.safetensors")).expect("weights");
    std::fs::write(
        tmp.path().join("model.safetensors"),
        &weights[..weights.len() / 2],
    )
    .expect("write");
    let msg = load_err(tmp.path()).to_string();
    assert!(
        msg.contains("model.safetensors") && (msg.contains("truncated") || msg.contains("header")),
        "{msg}"
    );

    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).expect("cfg"))
            .expect("json");
    cfg["model_type"] = Value::String("gpt_neox".into());
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).expect("write");
    std::fs::write(tmp.path().join("model.safetensors"), &weights).expect("write");
    let msg = load_err(tmp.path()).to_string();
    assert!(
        msg.contains("config.json") && msg.contains("\"gpt_neox\" is not supported"),
        "{msg}"
    );
}

#[test]
fn a_dummy_checkpoint_has_the_configs_shapes_and_fixed_made_up_weights() {
    use gristmill_engine::tensor_parallel::load_model;
    let dir = fixture("tiny-llama3");
    let dummy = gristmill_engine::weights::dummy_path(&dir);
    let real_cfg = Checkpoint::open(&dir)
        .expect("opens")
        .config()
        .expect("config");
    let ckpt = Checkpoint::open(&dummy).expect("opens from config.json alone");
    assert_eq!(ckpt.config().expect("config"), real_cfg);
    assert!(ckpt.weight_bytes() > 0);
    let ids = [1u32, 17, 200, 5, 9];
    let a = load_model(&dummy, 1, Default::default()).expect("loads");
    let b = load_model(&dummy, 1, Default::default()).expect("loads");
    let (la, lb) = (
        a.score(&ids).expect("scores"),
        b.score(&ids).expect("scores"),
    );
    assert!(la.iter().all(|x| x.is_finite()));
    assert_eq!(la, lb, "the same made-up weights every time");
    let real = load_model(&dir, 1, Default::default()).expect("loads");
    assert_ne!(
        la,
        real.score(&ids).expect("scores"),
        "not the checkpoint's weights"
    );
    // The tokenizer is the directory's; split over 2 ranks, the made-up model is still one
    // model.
    let engine = Engine::load(&dummy).expect("an engine");
    assert_eq!(engine.tokenizer.vocab_size(), 320);
    let split = load_model(&dummy, 2, Default::default()).expect("splits");
    let ls = split.score(&ids).expect("scores");
    let worst = la
        .iter()
        .zip(&ls)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(worst < 1e-3, "TP 2 vs TP 1: {worst}");
}
