//! Model hyper-parameters, read from GGUF metadata or an HF `config.json`.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::weights::gguf::{GgufFile, MetaValue};

/// Llama-3 style RoPE frequency scaling (`rope_type: "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: f32,
}

/// Phi-3's long-context RoPE (`longrope`): per-dimension divisors of the rotary frequencies and
/// a factor on the rotated queries and keys. transformers switches to the long factors once a
/// sequence passes `original_max_position_embeddings`, a switch that depends on the longest
/// sequence of a batch; Gristmill keeps the short factors and caps the context there, where
/// every sequence is computed exactly.
#[derive(Debug, Clone, PartialEq)]
pub struct LongRope {
    pub short_factor: Vec<f32>,
    pub attention_factor: f32,
}

impl LongRope {
    /// transformers' default attention factor: `sqrt(1 + ln(s) / ln(original))` for the scale
    /// `s = max_position / original` above 1.
    fn default_attention_factor(max_position: f64, original: f64) -> f32 {
        let scale = max_position / original;
        if scale <= 1.0 {
            1.0
        } else {
            (1.0 + scale.ln() / original.ln()).sqrt() as f32
        }
    }
}

/// What Gemma 3 adds to the Llama shape: embeddings scaled by `sqrt(hidden_size)`, RMSNorm
/// weights applied as `1 + w`, norms after attention and after the MLP as well as before,
/// GeGLU (tanh GELU), its own attention scale, and local layers with a sliding window and their
/// own RoPE base between the global ones.
#[derive(Debug, Clone, PartialEq)]
pub struct Gemma3 {
    /// Attention scores are scaled by this (`query_pre_attn_scalar ^ -0.5`).
    pub attn_scale: f32,
    pub sliding_window: usize,
    /// Per layer: whether it is a local (sliding-window) layer.
    pub sliding_layers: Vec<bool>,
    /// RoPE base of the local layers (the global ones use `rope_theta`).
    pub rope_local_theta: f32,
    /// Linear RoPE scaling of the global layers (1: none).
    pub rope_global_factor: f32,
    /// Whether the checkpoint stores norm weights as `w` (HF) rather than `1 + w` (GGUF: the
    /// converter adds the one).
    pub norm_plus_one: bool,
}

impl Gemma3 {
    /// Which layers are local when a config gives only the period (`sliding_window_pattern`,
    /// 6 for Gemma 3): every layer but each sixth.
    fn pattern(layers: usize, period: usize) -> Vec<bool> {
        (0..layers)
            .map(|i| period == 0 || (i + 1) % period != 0)
            .collect()
    }
}

/// Gemma 3's additions from an HF `config.json` (transformers 5 `layer_types` and per-type
/// `rope_parameters`, or 4.x `sliding_window_pattern`, `rope_local_base_freq`, `rope_scaling`).
fn gemma3_from_hf(j: &Value, path: &Path) -> Result<Gemma3> {
    let num = |k: &str| j.get(k).and_then(Value::as_f64);
    let layers = num("num_hidden_layers").unwrap_or(0.0) as usize;
    let head_dim = num("head_dim").unwrap_or(256.0);
    let sliding_layers = match j.get("layer_types").and_then(Value::as_array) {
        Some(types) => types
            .iter()
            .map(|t| t.as_str() == Some("sliding_attention"))
            .collect(),
        None => Gemma3::pattern(
            layers,
            num("sliding_window_pattern").unwrap_or(6.0) as usize,
        ),
    };
    let params = j.get("rope_parameters");
    let theta_of = |kind: &str| {
        params
            .and_then(|p| p.get(kind))
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64)
    };
    let global = params
        .and_then(|p| p.get("full_attention"))
        .or_else(|| j.get("rope_scaling").filter(|v| v.is_object()));
    let rope_global_factor = match global.and_then(|g| g.get("rope_type").or_else(|| g.get("type")))
    {
        Some(Value::String(t)) if t == "linear" => global
            .and_then(|g| g.get("factor"))
            .and_then(Value::as_f64)
            .unwrap_or(1.0) as f32,
        Some(Value::String(t)) if t != "default" => {
            return Err(Error::config(
                path,
                format!("Gemma 3 rope scaling {t:?} is not supported (supported: default, linear)"),
            ))
        }
        _ => 1.0,
    };
    Ok(Gemma3 {
        // As transformers: a Python float `scalar ** -0.5`, rounded to f32 where it meets f32.
        attn_scale: num("query_pre_attn_scalar").unwrap_or(head_dim).powf(-0.5) as f32,
        sliding_window: num("sliding_window").unwrap_or(4096.0) as usize,
        sliding_layers,
        rope_local_theta: theta_of("sliding_attention")
            .or_else(|| num("rope_local_base_freq"))
            .unwrap_or(10_000.0) as f32,
        rope_global_factor,
        norm_plus_one: true,
    })
}

/// The architecture of a Llama-family checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// `llama`, `mistral`, `qwen2`, ... as the checkpoint names it.
    pub architecture: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Phi-3 `longrope` (short factors; the context is capped at the original length).
    pub longrope: Option<LongRope>,
    /// Longest sequence (prompt + generated) the model accepts.
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2).
    pub attention_bias: bool,
    /// Each head's queries and keys go through an RMSNorm over `head_dim` before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Queries, keys and values come from one fused `qkv_proj`, gate and up from one
    /// `gate_up_proj` (Phi-3).
    pub fused_projections: bool,
    /// Gemma 3's additions (`None` for the rest of the family).
    pub gemma3: Option<Gemma3>,
}

const SUPPORTED: &[&str] = &[
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma3",
    "gemma3_text",
];

impl ModelConfig {
    /// Inverse RoPE frequencies, one per pair of a head's dimensions, with scaling applied.
    /// Computed in f32 as HF transformers does.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let dim = self.head_dim;
        let mut inv: Vec<f32> = (0..dim / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f32 / dim as f32))
            .collect();
        if let Some(s) = self.rope_scaling {
            let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
            let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
            for f in inv.iter_mut() {
                let wavelen = 2.0 * std::f32::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= s.factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    *f = (1.0 - smooth) * *f / s.factor + smooth * *f;
                }
            }
        }
        inv
    }

    fn validate(self, path: &Path) -> Result<Self> {
        let bad = |reason: String| Err(Error::config(path, reason));
        if !SUPPORTED.contains(&self.architecture.as_str()) {
            return bad(format!(
                "architecture {:?} is not supported (supported: {})",
                self.architecture,
                SUPPORTED.join(", ")
            ));
        }
        for (name, v) in [
            ("hidden size", self.hidden_size),
            ("layer count", self.num_layers),
            ("head count", self.num_heads),
            ("KV head count", self.num_kv_heads),
            ("head dim", self.head_dim),
            ("vocab size", self.vocab_size),
            ("intermediate size", self.intermediate_size),
            ("context length", self.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(format!("{name} is 0"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "{} heads is not a multiple of {} KV heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        if let Some(l) = &self.longrope {
            if l.short_factor.len() != self.head_dim / 2 {
                return bad(format!(
                    "longrope has {} short factors for a head of {} dimensions (wants {})",
                    l.short_factor.len(),
                    self.head_dim,
                    self.head_dim / 2
                ));
            }
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head dim {} is odd; RoPE needs pairs",
                self.head_dim
            ));
        }
        Ok(self)
    }

    /// Reads `{arch}.*` keys of a GGUF file.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let path = g.path();
        let arch = g
            .meta("general.architecture")
            .and_then(MetaValue::as_str)
            .ok_or_else(|| Error::config(path, "metadata general.architecture is missing"))?
            .to_string();
        let int = |key: &str| -> Result<usize> {
            let full = format!("{arch}.{key}");
            g.meta(&full)
                .and_then(MetaValue::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| {
                    Error::config(
                        path,
                        format!("metadata {full} is missing or not an integer"),
                    )
                })
        };
        let float = |key: &str| g.meta(&format!("{arch}.{key}")).and_then(MetaValue::as_f64);
        let longrope = if g.tensors.contains_key("rope_factors_short.weight") {
            let heads = int("attention.head_count")?.max(1);
            let dim = int("attention.key_length").unwrap_or(int("embedding_length")? / heads);
            let original = int("rope.scaling.original_context_length")?;
            Some((
                LongRope {
                    short_factor: g.tensor_f32("rope_factors_short.weight", &[dim / 2])?,
                    attention_factor: match float("rope.scaling.attn_factor") {
                        Some(f) => f as f32,
                        None => LongRope::default_attention_factor(
                            int("context_length")? as f64,
                            original as f64,
                        ),
                    },
                },
                original,
            ))
        } else {
            None
        };
        let hidden_size = int("embedding_length")?;
        let num_heads = int("attention.head_count")?;
        let num_kv_heads = int("attention.head_count_kv").unwrap_or(num_heads);
        let head_dim =
            int("attention.key_length").unwrap_or(hidden_size.checked_div(num_heads).unwrap_or(0));
        let vocab_size = match int("vocab_size") {
            Ok(v) => v,
            Err(_) => g
                .meta("tokenizer.ggml.tokens")
                .and_then(MetaValue::as_array)
                .map(<[MetaValue]>::len)
                .ok_or_else(|| {
                    Error::config(
                        path,
                        "neither {arch}.vocab_size nor tokenizer.ggml.tokens is present",
                    )
                })?,
        };
        Self {
            hidden_size,
            intermediate_size: int("feed_forward_length")?,
            num_layers: int("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5) as f32,
            rope_theta: float("rope.freq_base").unwrap_or(10_000.0) as f32,
            // Llama-3 GGUFs carry their scaling as a `rope_freqs.weight` tensor, applied by the
            // model at load; there is no formula to reproduce here.
            rope_scaling: None,
            // As for HF configs below: a sliding window caps the context (Gemma 3 masks it), and
            // so does longrope's original length.
            max_position_embeddings: match int("attention.sliding_window") {
                Ok(w) if w > 0 && arch != "gemma3" => int("context_length")?.min(w),
                _ => int("context_length")?,
            }
            .min(longrope.as_ref().map_or(usize::MAX, |(_, o)| *o)),
            longrope: longrope.map(|(l, _)| l),
            tie_word_embeddings: !g.tensors.contains_key("output.weight"),
            attention_bias: g.tensors.contains_key("blk.0.attn_q.bias"),
            qk_norm: g.tensors.contains_key("blk.0.attn_q_norm.weight"),
            fused_projections: g.tensors.contains_key("blk.0.attn_qkv.weight"),
            gemma3: if arch == "gemma3" {
                let layers = int("block_count")?;
                // As llama.cpp: the 27B model (62 layers) scales by hidden / heads, the others by
                // the head size; local layers use base 10000; every sixth layer is global.
                let scalar = if layers == 62 {
                    hidden_size / num_heads.max(1)
                } else {
                    head_dim
                };
                Some(Gemma3 {
                    attn_scale: (scalar as f64).powf(-0.5) as f32,
                    sliding_window: int("attention.sliding_window").unwrap_or(512),
                    sliding_layers: Gemma3::pattern(layers, 6),
                    rope_local_theta: 10_000.0,
                    rope_global_factor: match g
                        .meta(&format!("{arch}.rope.scaling.type"))
                        .and_then(MetaValue::as_str)
                    {
                        Some("linear") => float("rope.scaling.factor").unwrap_or(1.0) as f32,
                        _ => 1.0,
                    },
                    norm_plus_one: false,
                })
            } else {
                None
            },
            architecture: arch,
        }
        .validate(path)
    }

    /// Reads an HF `config.json` (transformers 4.x `rope_theta`/`rope_scaling` or 5.x
    /// `rope_parameters`).
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let j: Value = serde_json::from_str(&text)
            .map_err(|e| Error::config(path, format!("not valid JSON: {e}")))?;
        let int = |key: &str| -> Result<usize> {
            j.get(key)
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| Error::config(path, format!("{key} is missing or not an integer")))
        };
        let arch = j
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::config(path, "model_type is missing"))?
            .to_string();
        if arch == "gemma3" {
            return Err(Error::config(
                path,
                "a multimodal Gemma 3 checkpoint (model_type gemma3): use its GGUF, or a text-only \
                 (gemma3_text) checkpoint",
            ));
        }
        for key in ["final_logit_softcapping", "attn_logit_softcapping"] {
            if j.get(key).is_some_and(|v| !v.is_null()) {
                return Err(Error::config(
                    path,
                    format!(
                        "{key} is not supported (Gemma 2 uses it; supported: {})",
                        SUPPORTED.join(", ")
                    ),
                ));
            }
        }
        let hidden_size = int("hidden_size")?;
        let num_heads = int("num_attention_heads")?;
        if let Some(f) = j.get("partial_rotary_factor").and_then(Value::as_f64) {
            if f != 1.0 {
                return Err(Error::config(
                    path,
                    format!(
                        "partial_rotary_factor {f} is not supported (only RoPE over whole heads)"
                    ),
                ));
            }
        }
        let gemma3 = (arch == "gemma3_text")
            .then(|| gemma3_from_hf(&j, path))
            .transpose()?;
        let rope = j
            .get("rope_scaling")
            .filter(|v| v.is_object())
            .or_else(|| j.get("rope_parameters"))
            // Gemma 3 keeps one set per layer type; the global layers' is the model's.
            .map(|r| r.get("full_attention").unwrap_or(r));
        let rope_theta = j
            .get("rope_theta")
            .and_then(Value::as_f64)
            .or_else(|| {
                rope.and_then(|r| r.get("rope_theta"))
                    .and_then(Value::as_f64)
            })
            .unwrap_or(10_000.0) as f32;
        let mut longrope = None;
        let rope_scaling = match rope {
            Some(r) => {
                let kind = r
                    .get("rope_type")
                    .or_else(|| r.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                let f = |k: &str| {
                    r.get(k)
                        .and_then(Value::as_f64)
                        .map(|v| v as f32)
                        .ok_or_else(|| Error::config(path, format!("rope scaling: {k} is missing")))
                };
                match kind {
                    "default" => None,
                    // Gemma 3's global layers: applied through `Gemma3::rope_global_factor`.
                    "linear" if gemma3.is_some() => None,
                    "llama3" => Some(Llama3RopeScaling {
                        factor: f("factor")?,
                        low_freq_factor: f("low_freq_factor")?,
                        high_freq_factor: f("high_freq_factor")?,
                        original_max_position_embeddings: f("original_max_position_embeddings")?,
                    }),
                    "longrope" | "su" => {
                        let original = r
                            .get("original_max_position_embeddings")
                            .or_else(|| j.get("original_max_position_embeddings"))
                            .and_then(Value::as_u64)
                            .ok_or_else(|| {
                                Error::config(path, "longrope: original_max_position_embeddings is missing")
                            })?;
                        let short_factor: Vec<f32> = r
                            .get("short_factor")
                            .and_then(Value::as_array)
                            .ok_or_else(|| Error::config(path, "longrope: short_factor is missing"))?
                            .iter()
                            .map(|v| v.as_f64().unwrap_or(1.0) as f32)
                            .collect();
                        let attention_factor = match r.get("attention_factor").and_then(Value::as_f64) {
                            Some(a) => a as f32,
                            None => LongRope::default_attention_factor(
                                int("max_position_embeddings")? as f64,
                                original as f64,
                            ),
                        };
                        longrope = Some((
                            LongRope {
                                short_factor,
                                attention_factor,
                            },
                            original as usize,
                        ));
                        None
                    }
                    other => {
                        return Err(Error::config(
                            path,
                            format!("rope scaling type {other:?} is not supported (supported: default, llama3, longrope)"),
                        ))
                    }
                }
            }
            None => None,
        };
        Self {
            hidden_size,
            intermediate_size: int("intermediate_size")?,
            num_layers: int("num_hidden_layers")?,
            num_heads,
            num_kv_heads: int("num_key_value_heads").unwrap_or(num_heads),
            head_dim: int("head_dim").unwrap_or(hidden_size.checked_div(num_heads).unwrap_or(0)),
            vocab_size: int("vocab_size")?,
            rms_norm_eps: j
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6) as f32,
            rope_theta,
            rope_scaling,
            // A sliding attention window (Mistral v0.1, Phi-3) masks keys further back than the
            // window; sequences that stay within it are computed exactly, so the context is
            // capped there (the paged cache has no window mask).
            max_position_embeddings: match (
                j.get("sliding_window").and_then(Value::as_u64),
                j.get("use_sliding_window").and_then(Value::as_bool),
            ) {
                (Some(w), None | Some(true)) if w > 0 && gemma3.is_none() => {
                    int("max_position_embeddings")?.min(w as usize)
                }
                _ => int("max_position_embeddings")?,
            }
            .min(longrope.as_ref().map_or(usize::MAX, |(_, o)| *o)),
            longrope: longrope.map(|(l, _)| l),
            // Gemma ties its embeddings unless it says otherwise.
            tie_word_embeddings: j
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(gemma3.is_some()),
            attention_bias: arch == "qwen2"
                || j.get("attention_bias")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            qk_norm: arch == "qwen3" || gemma3.is_some(),
            fused_projections: arch == "phi3",
            gemma3,
            architecture: arch,
        }
        .validate(path)
    }
}
