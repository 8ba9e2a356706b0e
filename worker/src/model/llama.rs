//! The Llama family (Llama 2/3, SmolLM, Mistral, Qwen2), written once over a [`Backend`].
//!
//! Names mirror the HF checkpoint keys. One forward call runs a *step*: the new tokens of several
//! sequences go through every linear layer together as one matrix, attention runs per sequence
//! over its own KV cache.

use crate::backend::{AttentionShape, AttnSeq, Backend};
use crate::config::ModelConfig;
use crate::error::Result;
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
    post_attention_layernorm: B::Vector,
    mlp: Mlp<B>,
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

impl<B: Backend> Loader<'_, B> {
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<B::Matrix> {
        // Quantised GGUF weights stay quantised where the backend computes on them exactly.
        if let Some((ty, bytes)) = self.ckpt.quantized(name, &[rows, cols], self.cfg)? {
            if let Some(m) = self.backend.quantized_matrix(ty, &bytes, rows, cols) {
                return Ok(m);
            }
        }
        let data = self.ckpt.tensor(name, &[rows, cols], self.cfg)?;
        Ok(self.backend.matrix(data, rows, cols))
    }

    fn vector(&self, name: &str, len: usize) -> Result<B::Vector> {
        let data = self.ckpt.tensor(name, &[len], self.cfg)?;
        Ok(self.backend.vector(data))
    }

    fn linear(&self, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Linear<B>> {
        Ok(Linear {
            weight: self.matrix(&format!("{prefix}.weight"), out, inp)?,
            bias: if bias {
                Some(self.vector(&format!("{prefix}.bias"), out)?)
            } else {
                None
            },
        })
    }
}

impl<B: Backend> Llama<B> {
    /// Loads every weight of the checkpoint onto the backend.
    pub fn load(ckpt: &Checkpoint, backend: B) -> Result<Self> {
        let cfg = ckpt.config()?;
        let l = Loader {
            ckpt,
            cfg: &cfg,
            backend: &backend,
        };
        let (h, kv, hd) = (cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim);
        let q_out = cfg.num_heads * hd;
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                Ok(DecoderLayer {
                    input_layernorm: l.vector(&format!("{p}.input_layernorm.weight"), h)?,
                    self_attn: Attention {
                        q_proj: l.linear(
                            &format!("{p}.self_attn.q_proj"),
                            q_out,
                            h,
                            cfg.attention_bias,
                        )?,
                        k_proj: l.linear(
                            &format!("{p}.self_attn.k_proj"),
                            kv * hd,
                            h,
                            cfg.attention_bias,
                        )?,
                        v_proj: l.linear(
                            &format!("{p}.self_attn.v_proj"),
                            kv * hd,
                            h,
                            cfg.attention_bias,
                        )?,
                        o_proj: l.linear(&format!("{p}.self_attn.o_proj"), h, q_out, false)?,
                    },
                    post_attention_layernorm: l
                        .vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
                    mlp: Mlp {
                        gate_proj: l.linear(
                            &format!("{p}.mlp.gate_proj"),
                            cfg.intermediate_size,
                            h,
                            false,
                        )?,
                        up_proj: l.linear(
                            &format!("{p}.mlp.up_proj"),
                            cfg.intermediate_size,
                            h,
                            false,
                        )?,
                        down_proj: l.linear(
                            &format!("{p}.mlp.down_proj"),
                            h,
                            cfg.intermediate_size,
                            false,
                        )?,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed_tokens = l.matrix("model.embed_tokens.weight", cfg.vocab_size, h)?;
        // Some checkpoints say "untied" yet ship no lm_head; tie them then, as HF does.
        let lm_head = if cfg.tie_word_embeddings || !ckpt.contains("lm_head.weight") {
            None
        } else {
            Some(l.matrix("lm_head.weight", cfg.vocab_size, h)?)
        };
        let norm = l.vector("model.norm.weight", h)?;
        let mut inv_freq = cfg.rope_inv_freq();
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
        })
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Bytes of KV memory one token position takes over all layers (f32 keys and values).
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.cfg.num_layers
            * self.cfg.num_kv_heads
            * self.cfg.head_dim
            * std::mem::size_of::<f32>()
    }

    /// Allocates paged KV memory of `num_blocks` blocks of `block_size` positions.
    pub fn kv_cache(&self, num_blocks: usize, block_size: usize) -> KvCache<B> {
        let width = self.cfg.num_kv_heads * self.cfg.head_dim;
        KvCache {
            store: self
                .backend
                .kv_store(self.cfg.num_layers, num_blocks, block_size, width),
            block_size,
            num_blocks,
        }
    }

    /// Logits at every position of one sequence, computed from scratch in its own cache
    /// (scoring and tests).
    pub fn score(&self, tokens: &[u32]) -> Vec<f32> {
        let block_size = 16;
        let blocks = tokens.len().div_ceil(block_size);
        let mut kv = self.kv_cache(blocks, block_size);
        let table: Vec<u32> = (0..blocks as u32).collect();
        let seq = StepSeq {
            tokens,
            start: 0,
            block_table: &table,
            logits: Logits::All,
        };
        self.forward(&mut kv, &[seq]).remove(0)
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
        let shape = AttentionShape {
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
        };
        let mut hidden = b.embed(&self.embed_tokens, &ids);
        for (li, layer) in self.layers.iter().enumerate() {
            let x = b.rms_norm(&hidden, &layer.input_layernorm, cfg.rms_norm_eps);
            let att = &layer.self_attn;
            let mut q = self.linear(&x, &att.q_proj);
            let mut k = self.linear(&x, &att.k_proj);
            let v = self.linear(&x, &att.v_proj);
            b.rope(
                &mut q,
                &positions,
                cfg.num_heads,
                cfg.head_dim,
                &self.inv_freq,
            );
            b.rope(
                &mut k,
                &positions,
                cfg.num_kv_heads,
                cfg.head_dim,
                &self.inv_freq,
            );
            // Every sequence's new keys and values are stored before any attention reads them, so
            // sequences sharing prefix blocks within one step see complete blocks.
            b.write_kv(&mut kv.store, li, &k, &v, &slots);
            let attn = b.attention(&q, &kv.store, li, &attn_seqs, shape);
            let attn = self.linear(&attn, &att.o_proj);
            b.add(&mut hidden, &attn);
            let x = b.rms_norm(&hidden, &layer.post_attention_layernorm, cfg.rms_norm_eps);
            let mut gate = self.linear(&x, &layer.mlp.gate_proj);
            let up = self.linear(&x, &layer.mlp.up_proj);
            b.silu_mul(&mut gate, &up);
            let down = self.linear(&gate, &layer.mlp.down_proj);
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
        if wanted.is_empty() {
            return counts.iter().map(|_| Vec::new()).collect();
        }
        let x = b.rms_norm(&b.concat_rows(wanted), &self.norm, cfg.rms_norm_eps);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        let logits = b.to_host(&b.linear(&x, head, None));
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
