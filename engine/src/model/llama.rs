//! The Llama family (Llama 2/3, SmolLM, Mistral, Qwen2, Qwen3, Phi-3, Gemma 3), written once over a
//! [`Backend`]. Phi-3's fused `qkv_proj` and `gate_up_proj` are read as row ranges of one
//! tensor, so every projection below is the same `Linear` whatever the checkpoint fuses.
//!
//! Names mirror the HF checkpoint keys. One forward call runs a *step*: the new tokens of several
//! sequences go through every linear layer together as one matrix, attention runs per sequence
//! over its own KV cache.

use std::sync::Arc;

use crate::backend::{AttentionShape, AttnSeq, Backend};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::parallel::{plan, Collective, Local, TpPlan};
use crate::weights::Checkpoint;

#[derive(Debug)]
struct Linear<B: Backend> {
    weight: B::Matrix,
    bias: Option<B::Vector>,
}

#[derive(Debug)]
struct Attention<B: Backend> {
    q_proj: Linear<B>,
    k_proj: Linear<B>,
    v_proj: Linear<B>,
    o_proj: Linear<B>,
    /// Per-head RMSNorm weights over `head_dim` for queries and keys (Qwen3).
    q_norm: Option<B::Vector>,
    k_norm: Option<B::Vector>,
}

#[derive(Debug)]
struct Mlp<B: Backend> {
    gate_proj: Linear<B>,
    up_proj: Linear<B>,
    down_proj: Linear<B>,
}

#[derive(Debug)]
struct DecoderLayer<B: Backend> {
    input_layernorm: B::Vector,
    self_attn: Attention<B>,
    /// The norm before the MLP (Llama's `post_attention_layernorm`, Gemma's
    /// `pre_feedforward_layernorm`).
    post_attention_layernorm: B::Vector,
    mlp: Mlp<B>,
    /// Gemma 3: norms of the attention's and the MLP's outputs before the residual add.
    attn_out_norm: Option<B::Vector>,
    mlp_out_norm: Option<B::Vector>,
    /// Gemma 3: a local layer (sliding window, local RoPE base).
    sliding: bool,
}

/// A loaded model.
#[derive(Debug)]
pub struct Llama<B: Backend> {
    pub cfg: ModelConfig,
    backend: B,
    embed_tokens: B::Matrix,
    layers: Vec<DecoderLayer<B>>,
    norm: B::Vector,
    /// `None` when the embeddings are tied.
    lm_head: Option<B::Matrix>,
    inv_freq: Vec<f32>,
    /// Gemma 3: the local layers' RoPE frequencies.
    inv_freq_local: Vec<f32>,
    /// This rank's slice of the model (everything at world size 1).
    pub tp: TpPlan,
    collective: Arc<dyn Collective>,
}

/// Paged KV memory for every layer: `num_blocks` blocks of `block_size` positions. Which block
/// holds which positions of which sequence is the scheduler's business (`crate::kv_cache`).
#[derive(Debug)]
pub struct KvCache<B: Backend> {
    store: B::KvStore,
    pub block_size: usize,
    pub num_blocks: usize,
}

/// Which logits a sequence wants from a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None (a prefill chunk that does not finish the prompt).
    None,
    /// The last new position only (sampling).
    Last,
    /// Every new position (scoring, tests).
    All,
}

/// One sequence's part of a step: `tokens` at positions `start..start + tokens.len()`, cached in
/// the blocks of `block_table` (which must already cover those positions).
#[derive(Debug, Clone, Copy)]
pub struct StepSeq<'a> {
    pub tokens: &'a [u32],
    pub start: usize,
    pub block_table: &'a [u32],
    pub logits: Logits,
}

struct Loader<'a, B: Backend> {
    ckpt: &'a Checkpoint,
    cfg: &'a ModelConfig,
    backend: &'a B,
}

/// Which part of a `[rows, cols]` weight a rank holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    All,
    /// Rows `start .. start + n` (column-parallel layers, vocabulary shards).
    Rows(usize, usize),
    /// Columns `start .. start + n` of every row (row-parallel layers).
    Cols(usize, usize),
}

impl Part {
    fn shape(self, rows: usize, cols: usize) -> (usize, usize) {
        match self {
            Part::All => (rows, cols),
            Part::Rows(_, n) => (n, cols),
            Part::Cols(_, n) => (rows, n),
        }
    }
}

/// The `part` of a row-major `[rows, row_len]` matrix of units (elements, or the bytes of ggml
/// blocks when `unit` is a block's bytes and `per_unit` its columns). `None` if a column split
/// does not fall on whole units.
pub fn slice_matrix<T: Copy>(
    data: &[T],
    rows: usize,
    row_len: usize,
    unit: usize,
    per_unit: usize,
    part: Part,
) -> Option<Vec<T>> {
    match part {
        Part::All => Some(data.to_vec()),
        Part::Rows(start, n) => Some(data[start * row_len..(start + n) * row_len].to_vec()),
        Part::Cols(start, n) => {
            if start % per_unit != 0 || n % per_unit != 0 {
                return None;
            }
            let (a, b) = (start / per_unit * unit, (start + n) / per_unit * unit);
            Some(
                (0..rows)
                    .flat_map(|r| data[r * row_len + a..r * row_len + b].iter().copied())
                    .collect(),
            )
        }
    }
}

impl<B: Backend> Loader<'_, B> {
    fn matrix(&self, name: &str, rows: usize, cols: usize, part: Part) -> Result<B::Matrix> {
        let (out_rows, out_cols) = part.shape(rows, cols);
        // Quantised GGUF weights stay quantised where the backend computes on them exactly (and
        // the slice falls on whole blocks).
        if let Some((ty, bytes)) = self.ckpt.quantized(name, &[rows, cols], self.cfg)? {
            let row_bytes = cols / ty.block_len() * ty.block_bytes();
            let sliced = slice_matrix(
                &bytes,
                rows,
                row_bytes,
                ty.block_bytes(),
                ty.block_len(),
                part,
            );
            if let Some(sliced) = sliced {
                if let Some(m) = self
                    .backend
                    .quantized_matrix(ty, &sliced, out_rows, out_cols)
                {
                    return Ok(m);
                }
            }
        }
        let data = self.ckpt.tensor(name, &[rows, cols], self.cfg)?;
        let data = slice_matrix(&data, rows, cols, 1, 1, part)
            .ok_or_else(|| Error::TensorParallel(format!("cannot slice {name} by {part:?}")))?;
        Ok(self.backend.matrix(data, out_rows, out_cols))
    }

    /// An RMSNorm weight, as the model applies it (`1 + w` where the checkpoint stores `w`).
    fn norm(&self, name: &str, len: usize) -> Result<B::Vector> {
        let mut data = self.ckpt.tensor(name, &[len], self.cfg)?;
        if self.cfg.gemma3.as_ref().is_some_and(|g| g.norm_plus_one) {
            for w in &mut data {
                *w += 1.0;
            }
        }
        Ok(self.backend.vector(data))
    }

    fn vector(&self, name: &str, len: usize, range: Option<(usize, usize)>) -> Result<B::Vector> {
        let data = self.ckpt.tensor(name, &[len], self.cfg)?;
        let data = match range {
            Some((start, n)) => data[start..start + n].to_vec(),
            None => data,
        };
        Ok(self.backend.vector(data))
    }

    /// A linear layer `[out, inp]`; a bias, when there is one, follows a row split.
    fn linear(
        &self,
        prefix: &str,
        out: usize,
        inp: usize,
        bias: bool,
        part: Part,
    ) -> Result<Linear<B>> {
        let bias_range = match part {
            Part::Rows(start, n) => Some((start, n)),
            _ => None,
        };
        Ok(Linear {
            weight: self.matrix(&format!("{prefix}.weight"), out, inp, part)?,
            bias: if bias {
                Some(self.vector(&format!("{prefix}.bias"), out, bias_range)?)
            } else {
                None
            },
        })
    }
}

impl<B: Backend> Llama<B> {
    /// Loads every weight of the checkpoint onto the backend.
    pub fn load(ckpt: &Checkpoint, backend: B) -> Result<Self> {
        Self::load_rank(ckpt, backend, Arc::new(Local))
    }

    /// Loads this rank's slice of every weight (see [`crate::parallel`]); the whole model at
    /// world size 1. Errors if the model does not split over the collective's world size.
    pub fn load_rank(
        ckpt: &Checkpoint,
        backend: B,
        collective: Arc<dyn Collective>,
    ) -> Result<Self> {
        let cfg = ckpt.config()?;
        let tp = plan(&cfg, collective.rank(), collective.world_size())
            .map_err(Error::TensorParallel)?;
        let l = Loader {
            ckpt,
            cfg: &cfg,
            backend: &backend,
        };
        let (h, kv, hd) = (cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim);
        let q_out = cfg.num_heads * hd;
        let whole = tp.world == 1;
        let rows = |start: usize, n: usize| {
            if whole {
                Part::All
            } else {
                Part::Rows(start, n)
            }
        };
        let cols = |start: usize, n: usize| {
            if whole {
                Part::All
            } else {
                Part::Cols(start, n)
            }
        };
        let q_part = rows(tp.heads_start * hd, tp.heads * hd);
        let kv_part = rows(tp.kv_heads_start * hd, tp.kv_heads * hd);
        let o_part = cols(tp.heads_start * hd, tp.heads * hd);
        let ffn_rows = rows(tp.ffn_start, tp.ffn);
        let ffn_cols = cols(tp.ffn_start, tp.ffn);
        let vocab_part = rows(tp.vocab_start, tp.vocab);
        let ffn = cfg.intermediate_size;
        // Phi-3 fuses q, k, v (and gate, up) into one tensor each: a projection is then a row
        // range of it, at an offset, whatever the rank's part.
        let fused = |offset: usize, part: Part, n: usize| match part {
            Part::All => Part::Rows(offset, n),
            Part::Rows(start, len) => Part::Rows(offset + start, len),
            cols => cols,
        };
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                let (q_proj, k_proj, v_proj) = if cfg.fused_projections {
                    let (name, rows) = (format!("{p}.self_attn.qkv_proj"), q_out + 2 * kv * hd);
                    (
                        l.linear(&name, rows, h, false, fused(0, q_part, q_out))?,
                        l.linear(&name, rows, h, false, fused(q_out, kv_part, kv * hd))?,
                        l.linear(
                            &name,
                            rows,
                            h,
                            false,
                            fused(q_out + kv * hd, kv_part, kv * hd),
                        )?,
                    )
                } else {
                    let bias = cfg.attention_bias;
                    (
                        l.linear(&format!("{p}.self_attn.q_proj"), q_out, h, bias, q_part)?,
                        l.linear(&format!("{p}.self_attn.k_proj"), kv * hd, h, bias, kv_part)?,
                        l.linear(&format!("{p}.self_attn.v_proj"), kv * hd, h, bias, kv_part)?,
                    )
                };
                let (gate_proj, up_proj) = if cfg.fused_projections {
                    let name = format!("{p}.mlp.gate_up_proj");
                    (
                        l.linear(&name, 2 * ffn, h, false, fused(0, ffn_rows, ffn))?,
                        l.linear(&name, 2 * ffn, h, false, fused(ffn, ffn_rows, ffn))?,
                    )
                } else {
                    (
                        l.linear(&format!("{p}.mlp.gate_proj"), ffn, h, false, ffn_rows)?,
                        l.linear(&format!("{p}.mlp.up_proj"), ffn, h, false, ffn_rows)?,
                    )
                };
                let gemma = cfg.gemma3.as_ref();
                let norm = |name: &str| l.norm(&format!("{p}.{name}.weight"), h);
                Ok(DecoderLayer {
                    input_layernorm: norm("input_layernorm")?,
                    attn_out_norm: gemma
                        .map(|_| norm("post_attention_layernorm"))
                        .transpose()?,
                    mlp_out_norm: gemma
                        .map(|_| norm("post_feedforward_layernorm"))
                        .transpose()?,
                    sliding: gemma.is_some_and(|g| g.sliding_layers.get(i) == Some(&true)),
                    self_attn: Attention {
                        q_proj,
                        k_proj,
                        v_proj,
                        o_proj: l.linear(
                            &format!("{p}.self_attn.o_proj"),
                            h,
                            q_out,
                            false,
                            o_part,
                        )?,
                        q_norm: cfg
                            .qk_norm
                            .then(|| l.norm(&format!("{p}.self_attn.q_norm.weight"), hd))
                            .transpose()?,
                        k_norm: cfg
                            .qk_norm
                            .then(|| l.norm(&format!("{p}.self_attn.k_norm.weight"), hd))
                            .transpose()?,
                    },
                    post_attention_layernorm: norm(if gemma.is_some() {
                        "pre_feedforward_layernorm"
                    } else {
                        "post_attention_layernorm"
                    })?,
                    mlp: Mlp {
                        gate_proj,
                        up_proj,
                        down_proj: l.linear(
                            &format!("{p}.mlp.down_proj"),
                            h,
                            cfg.intermediate_size,
                            false,
                            ffn_cols,
                        )?,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed_tokens = l.matrix("model.embed_tokens.weight", cfg.vocab_size, h, vocab_part)?;
        // Some checkpoints say "untied" yet ship no lm_head; tie them then, as HF does.
        let lm_head = if cfg.tie_word_embeddings || !ckpt.contains("lm_head.weight") {
            None
        } else {
            Some(l.matrix("lm_head.weight", cfg.vocab_size, h, vocab_part)?)
        };
        let norm = l.norm("model.norm.weight", h)?;
        let mut inv_freq = cfg.rope_inv_freq();
        if let Some(l) = &cfg.longrope {
            for (f, d) in inv_freq.iter_mut().zip(&l.short_factor) {
                *f /= d;
            }
        }
        let mut inv_freq_local = inv_freq.clone();
        if let Some(g) = &cfg.gemma3 {
            for f in &mut inv_freq {
                *f /= g.rope_global_factor;
            }
            let mut local = cfg.clone();
            (local.rope_theta, local.rope_scaling) = (g.rope_local_theta, None);
            inv_freq_local = local.rope_inv_freq();
        }
        if let Some(factors) = ckpt.rope_freq_factors(&cfg)? {
            for (f, d) in inv_freq.iter_mut().zip(factors) {
                *f /= d;
            }
        }
        Ok(Self {
            cfg,
            backend,
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq,
            inv_freq_local,
            tp,
            collective,
        })
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Bytes of KV memory one token position takes over all layers on this rank (keys and
    /// values of its KV heads, in the backend's cache type).
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.cfg.num_layers
            * self.tp.kv_heads
            * self.cfg.head_dim
            * self.backend.kv_value_bytes()
    }

    /// Free and total memory of the backend's device (`None`: the host).
    pub fn device_memory(&self) -> Option<(u64, u64)> {
        self.backend.device_memory()
    }

    /// Allocates paged KV memory of `num_blocks` blocks of `block_size` positions.
    pub fn kv_cache(&self, num_blocks: usize, block_size: usize) -> KvCache<B> {
        let (kv_heads, head_dim) = (self.tp.kv_heads, self.cfg.head_dim);
        KvCache {
            store: self.backend.kv_store(
                self.cfg.num_layers,
                num_blocks,
                block_size,
                kv_heads,
                head_dim,
            ),
            block_size,
            num_blocks,
        }
    }

    fn linear(&self, x: &B::Buf, l: &Linear<B>) -> B::Buf {
        self.backend.linear(x, &l.weight, l.bias.as_ref())
    }

    /// Runs one step over several sequences and returns, per sequence, the logits it asked for
    /// (`rows × vocab`, row-major; empty for [`Logits::None`]). Keys and values of the new tokens
    /// are written to their slots. Token ids must be below the vocabulary size (callers
    /// validate).
    pub fn forward(&self, kv: &mut KvCache<B>, seqs: &[StepSeq<'_>]) -> Vec<Vec<f32>> {
        let b = &self.backend;
        let cfg = &self.cfg;
        let bs = kv.block_size;
        let ids: Vec<u32> = seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        let positions: Vec<usize> = seqs
            .iter()
            .flat_map(|s| s.start..s.start + s.tokens.len())
            .collect();
        let slots: Vec<usize> = seqs
            .iter()
            .flat_map(|s| {
                (s.start..s.start + s.tokens.len())
                    .map(|p| s.block_table[p / bs] as usize * bs + p % bs)
            })
            .collect();
        let attn_seqs: Vec<AttnSeq<'_>> = seqs
            .iter()
            .map(|s| AttnSeq {
                rows: s.tokens.len(),
                start: s.start,
                block_table: s.block_table,
            })
            .collect();
        let tp = self.tp;
        let c = self.collective.as_ref();
        let parallel = tp.world > 1;
        let mut shape = AttentionShape::new(tp.heads, tp.kv_heads, cfg.head_dim);
        if let Some(g) = &cfg.gemma3 {
            shape.scale = g.attn_scale;
        }
        // Vocabulary-parallel: each rank embeds the ids in its shard (zeros elsewhere).
        let mut hidden = b.embed(&self.embed_tokens, &ids, tp.vocab_start as u32);
        if parallel {
            b.all_reduce_sum(&mut hidden, c);
        }
        if cfg.gemma3.is_some() {
            // As transformers: a Python float `hidden_size ** 0.5`, rounded to f32.
            b.scale(&mut hidden, (cfg.hidden_size as f64).sqrt() as f32);
        }
        for (li, layer) in self.layers.iter().enumerate() {
            let (inv_freq, shape) = match &cfg.gemma3 {
                Some(g) if layer.sliding => (
                    &self.inv_freq_local,
                    AttentionShape {
                        window: Some(g.sliding_window),
                        ..shape
                    },
                ),
                _ => (&self.inv_freq, shape),
            };
            let x = b.rms_norm(&hidden, &layer.input_layernorm, cfg.rms_norm_eps);
            let att = &layer.self_attn;
            let mut q = self.linear(&x, &att.q_proj);
            let mut k = self.linear(&x, &att.k_proj);
            let v = self.linear(&x, &att.v_proj);
            // Per-head norms: a weight of `head_dim` normalises each head of a row on its own.
            if let (Some(qn), Some(kn)) = (&att.q_norm, &att.k_norm) {
                q = b.rms_norm(&q, qn, cfg.rms_norm_eps);
                k = b.rms_norm(&k, kn, cfg.rms_norm_eps);
            }
            b.rope(&mut q, &positions, tp.heads, cfg.head_dim, inv_freq);
            b.rope(&mut k, &positions, tp.kv_heads, cfg.head_dim, inv_freq);
            // longrope scales the rotated queries and keys (transformers: cos and sin).
            if let Some(l) = cfg.longrope.as_ref().filter(|l| l.attention_factor != 1.0) {
                b.scale(&mut q, l.attention_factor);
                b.scale(&mut k, l.attention_factor);
            }
            // Every sequence's new keys and values are stored before any attention reads them, so
            // sequences sharing prefix blocks within one step see complete blocks.
            b.write_kv(&mut kv.store, li, &k, &v, &slots);
            let attn = b.attention(&q, &kv.store, li, &attn_seqs, shape);
            let mut attn = self.linear(&attn, &att.o_proj);
            if parallel {
                b.all_reduce_sum(&mut attn, c);
            }
            if let Some(n) = &layer.attn_out_norm {
                attn = b.rms_norm(&attn, n, cfg.rms_norm_eps);
            }
            b.add(&mut hidden, &attn);
            let x = b.rms_norm(&hidden, &layer.post_attention_layernorm, cfg.rms_norm_eps);
            let mut gate = self.linear(&x, &layer.mlp.gate_proj);
            let up = self.linear(&x, &layer.mlp.up_proj);
            if cfg.gemma3.is_some() {
                b.gelu_tanh_mul(&mut gate, &up);
            } else {
                b.silu_mul(&mut gate, &up);
            }
            let mut down = self.linear(&gate, &layer.mlp.down_proj);
            if parallel {
                b.all_reduce_sum(&mut down, c);
            }
            if let Some(n) = &layer.mlp_out_norm {
                down = b.rms_norm(&down, n, cfg.rms_norm_eps);
            }
            b.add(&mut hidden, &down);
        }
        // Only the rows whose logits are wanted go through the final norm and the LM head.
        let mut wanted = Vec::new();
        let mut counts = Vec::with_capacity(seqs.len());
        let mut row = 0;
        for s in seqs {
            let n = s.tokens.len();
            let (first, count) = match s.logits {
                Logits::None => (row, 0),
                Logits::Last => (row + n - 1, 1),
                Logits::All => (row, n),
            };
            if count > 0 {
                wanted.push(b.slice_rows(&hidden, first, count));
            }
            counts.push(count);
            row += n;
        }
        // Every rank sees the same `seqs`, so all take this branch together.
        if wanted.is_empty() {
            return counts.iter().map(|_| Vec::new()).collect();
        }
        let x = b.rms_norm(&b.concat_rows(wanted), &self.norm, cfg.rms_norm_eps);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        let mut logits = b.linear(&x, head, None);
        if parallel {
            logits = b.all_gather_cols(&logits, c);
        }
        let logits = b.to_host(&logits);
        let vocab = cfg.vocab_size;
        let mut at = 0;
        counts
            .into_iter()
            .map(|c| {
                let rows = logits[at * vocab..(at + c) * vocab].to_vec();
                at += c;
                rows
            })
            .collect()
    }
}
