//! The generation engine: turns validated requests into completions.
//!
//! Requests are pulled lazily from an iterator, so memory stays bounded however long the input
//! is: at most `max_num_seqs` sequences are live at once. Every step, each live sequence
//! contributes either one decode token or a chunk of its prompt (within a per-step token budget),
//! and all of them go through the model together. A finished sequence leaves the batch at once
//! and a waiting request takes its place (continuous batching).
//!
//! Invariants: every request pulled from the iterator produces exactly one [`Outcome`]; a
//! sequence's output depends only on its own prompt, parameters and seed.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use gristmill_protocol::{codes, Endpoint, FinishReason, LineError, Prompt, Request, Usage};

use crate::backend::{Backend, CpuBackend};
use crate::error::Result;
use crate::model::llama::{Llama, Logits, SeqCache, StepInput};
use crate::sampler::Sampler;
use crate::tokenizer::Tokenizer;
use crate::weights::Checkpoint;

/// Limits of one engine step.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    /// Most sequences in flight at once.
    pub max_num_seqs: usize,
    /// Most tokens (prompt chunks plus decode tokens) in one step.
    pub max_num_batched_tokens: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            max_num_seqs: 32,
            max_num_batched_tokens: 2048,
        }
    }
}

/// A request that finished generating.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub custom_id: String,
    pub line: usize,
    pub endpoint: Endpoint,
    /// The `model` the request named, echoed back.
    pub model: Option<String>,
    pub text: String,
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    pub usage: Usage,
}

/// What became of one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Done(Completion),
    Failed {
        custom_id: String,
        line: usize,
        error: LineError,
    },
}

/// A loaded model with its tokenizer.
#[derive(Debug)]
pub struct Engine<B: Backend = CpuBackend> {
    pub model: Llama<B>,
    pub tokenizer: Tokenizer,
    /// Name reported in responses when a request names none (the file or directory stem).
    pub model_name: String,
    /// Seed base for requests that bring none.
    seed_base: u64,
}

struct Live<B: Backend> {
    req: Request,
    prompt: Vec<u32>,
    max_tokens: usize,
    cache: SeqCache<B>,
    generated: Vec<u32>,
    sampler: Sampler,
}

impl Engine<CpuBackend> {
    /// Loads a GGUF file or HF safetensors directory on the CPU backend.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, CpuBackend)
    }
}

impl<B: Backend> Engine<B> {
    pub fn load_with(path: &Path, backend: B) -> Result<Self> {
        let ckpt = Checkpoint::open(path)?;
        let cfg = ckpt.config()?;
        let tokenizer = match &ckpt {
            Checkpoint::Gguf(g) => Tokenizer::from_gguf(g)?,
            Checkpoint::Safetensors { dir, .. } => {
                let (eos, bos) = hf_special_ids(&dir.join("config.json"));
                Tokenizer::from_hf_dir(dir, &eos, bos)?
            }
        };
        if tokenizer.vocab_size() > cfg.vocab_size {
            tracing::warn!(
                tokenizer = tokenizer.vocab_size(),
                model = cfg.vocab_size,
                "the tokenizer knows more tokens than the model has embeddings"
            );
        }
        let model = Llama::load(&ckpt, backend)?;
        let stem = path
            .file_stem()
            .or(path.file_name())
            .map(|s| s.to_string_lossy().into_owned());
        let seed_base = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Ok(Self {
            model,
            tokenizer,
            model_name: stem.unwrap_or_else(|| "model".into()),
            seed_base,
        })
    }

    /// Tokenizes a request and checks it against the model's context.
    pub fn prompt_ids(&self, req: &Request) -> std::result::Result<Vec<u32>, LineError> {
        let line = req.line;
        let ids = match &req.prompt {
            Prompt::Chat(messages) => {
                let text = self
                    .tokenizer
                    .apply_chat_template(messages)
                    .map_err(|e| LineError::new(codes::TEMPLATE_ERROR, format!("line {line}: {e}")))?;
                self.tokenizer.encode(&text)
            }
            Prompt::Text(text) => self.tokenizer.encode_prompt(text),
            Prompt::Tokens(ids) => {
                let vocab = self.model.cfg.vocab_size;
                if let Some((i, t)) = ids.iter().enumerate().find(|(_, &t)| t as usize >= vocab) {
                    return Err(LineError::new(
                        codes::INVALID_REQUEST,
                        format!("line {line}: body.prompt[{i}] is token {t}, but the vocabulary has {vocab} tokens"),
                    )
                    .with_param(format!("body.prompt[{i}]")));
                }
                Ok(ids.clone())
            }
        }
        .map_err(|e| LineError::new(codes::INVALID_REQUEST, format!("line {line}: {e}")))?;
        let ctx = self.model.cfg.max_position_embeddings;
        if ids.is_empty() {
            return Err(LineError::new(
                codes::INVALID_REQUEST,
                format!("line {line}: the prompt is empty"),
            ));
        }
        if ids.len() >= ctx {
            return Err(LineError::new(
                codes::CONTEXT_LENGTH_EXCEEDED,
                format!(
                    "line {line}: the prompt is {} tokens, but the model's context is {ctx} tokens \
                     (at least one must be left to generate)",
                    ids.len()
                ),
            ));
        }
        if let Some(m) = req.params.max_tokens {
            if ids.len() + m > ctx {
                return Err(LineError::new(
                    codes::CONTEXT_LENGTH_EXCEEDED,
                    format!(
                        "line {line}: the prompt is {} tokens and max_tokens is {m}, {} in all, but the model's \
                         context is {ctx} tokens; lower max_tokens to at most {}",
                        ids.len(),
                        ids.len() + m,
                        ctx - ids.len()
                    ),
                )
                .with_param("body.max_tokens"));
            }
        }
        Ok(ids)
    }

    /// Runs every request of `requests` to completion, calling `on_outcome` as each finishes
    /// (in completion order, not input order).
    pub fn run<I, F>(&self, requests: I, opts: EngineOptions, mut on_outcome: F)
    where
        I: IntoIterator<Item = Request>,
        F: FnMut(Outcome),
    {
        let mut pending = requests.into_iter();
        let mut live: Vec<Live<B>> = Vec::new();
        let max_seqs = opts.max_num_seqs.max(1);
        let budget = opts.max_num_batched_tokens.max(1);
        let ctx = self.model.cfg.max_position_embeddings;
        loop {
            while live.len() < max_seqs {
                let Some(req) = pending.next() else { break };
                match self.prompt_ids(&req) {
                    Ok(prompt) => {
                        let max_tokens = req.params.max_tokens.unwrap_or(ctx - prompt.len());
                        let sampler = Sampler::new(
                            &req.params,
                            self.seed_base ^ (req.line as u64).wrapping_mul(0x2545_f491_4f6c_dd1d),
                        );
                        live.push(Live {
                            req,
                            prompt,
                            max_tokens,
                            cache: self.model.new_cache(),
                            generated: Vec::new(),
                            sampler,
                        });
                    }
                    Err(error) => on_outcome(Outcome::Failed {
                        custom_id: req.custom_id,
                        line: req.line,
                        error,
                    }),
                }
            }
            if live.is_empty() {
                return;
            }
            // Plan the step: decode tokens first (one each), then prompt chunks in arrival order.
            let mut plan: Vec<(usize, usize, usize)> = Vec::new(); // (live index, start, len)
            let mut left = budget;
            for (i, s) in live.iter().enumerate() {
                if s.cache.len() >= s.prompt.len() && left > 0 {
                    plan.push((i, s.cache.len(), 1));
                    left -= 1;
                }
            }
            for (i, s) in live.iter().enumerate() {
                let todo = s.prompt.len().saturating_sub(s.cache.len());
                if todo > 0 && left > 0 {
                    let n = todo.min(left);
                    plan.push((i, s.cache.len(), n));
                    left -= n;
                }
            }
            plan.sort_unstable_by_key(|p| p.0);
            let mut inputs = Vec::with_capacity(plan.len());
            let mut planned = plan.iter().peekable();
            for (i, s) in live.iter_mut().enumerate() {
                let Some(&(_, start, n)) = planned.next_if(|p| p.0 == i) else {
                    continue;
                };
                let tokens: &[u32] = if start < s.prompt.len() {
                    &s.prompt[start..start + n]
                } else {
                    std::slice::from_ref(
                        s.generated.last().unwrap_or(&s.prompt[s.prompt.len() - 1]),
                    )
                };
                let finishes_prompt = start + n >= s.prompt.len();
                let logits = if finishes_prompt {
                    Logits::Last
                } else {
                    Logits::None
                };
                inputs.push(StepInput {
                    tokens,
                    cache: &mut s.cache,
                    logits,
                });
            }
            let logits = self.model.forward(&mut inputs);
            drop(inputs);
            let mut finished = Vec::new();
            for (&(i, _, _), row) in plan.iter().zip(logits) {
                if row.is_empty() {
                    continue;
                }
                let s = &mut live[i];
                let step = s.generated.len() as u64;
                let token = s.sampler.sample(&row, step);
                s.generated.push(token);
                if let Some(outcome) = self.check_finished(s, ctx) {
                    finished.push((i, outcome));
                }
            }
            // Remove from the back so indices stay valid.
            finished.sort_unstable_by_key(|f| std::cmp::Reverse(f.0));
            let mut done = Vec::with_capacity(finished.len());
            for (i, outcome) in finished {
                live.swap_remove(i);
                done.push(outcome);
            }
            // Report in input order among those finishing in the same step.
            done.sort_by_key(|o| match o {
                Outcome::Done(c) => c.line,
                Outcome::Failed { line, .. } => *line,
            });
            done.into_iter().for_each(&mut on_outcome);
        }
    }

    /// Decides whether a sequence is done after its latest token, and builds its outcome.
    fn check_finished(&self, s: &mut Live<B>, ctx: usize) -> Option<Outcome> {
        let last = *s.generated.last()?;
        let p = &s.req.params;
        let eos = !p.ignore_eos && self.tokenizer.eos_ids.contains(&last);
        let visible = if eos {
            &s.generated[..s.generated.len() - 1]
        } else {
            &s.generated[..]
        };
        let mut finish = None;
        let mut text = None;
        if eos {
            finish = Some(FinishReason::Stop);
        }
        if !p.stop.is_empty()
            || finish.is_some()
            || s.generated.len() >= s.max_tokens
            || s.prompt.len() + s.generated.len() >= ctx
        {
            let t = match self.tokenizer.decode(visible) {
                Ok(t) => t,
                Err(e) => {
                    return Some(Outcome::Failed {
                        custom_id: s.req.custom_id.clone(),
                        line: s.req.line,
                        error: LineError::new(codes::INTERNAL, format!("line {}: {e}", s.req.line)),
                    })
                }
            };
            if let Some(cut) = p.stop.iter().filter_map(|stop| t.find(stop.as_str())).min() {
                text = Some(t[..cut].to_string());
                finish = Some(FinishReason::Stop);
            } else {
                text = Some(t);
            }
        }
        if finish.is_none()
            && (s.generated.len() >= s.max_tokens || s.prompt.len() + s.generated.len() >= ctx)
        {
            finish = Some(FinishReason::Length);
        }
        let finish_reason = finish?;
        let token_ids = std::mem::take(&mut s.generated);
        Some(Outcome::Done(Completion {
            custom_id: s.req.custom_id.clone(),
            line: s.req.line,
            endpoint: s.req.endpoint,
            model: s.req.model.clone(),
            text: text.unwrap_or_default(),
            usage: Usage::new(s.prompt.len(), token_ids.len()),
            token_ids,
            finish_reason,
        }))
    }
}

/// `eos_token_id` (int or list) and `bos_token_id` from an HF `config.json`; empty if unreadable
/// (the config was already validated by the model loader).
fn hf_special_ids(path: &Path) -> (Vec<u32>, Option<u32>) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return (Vec::new(), None);
    };
    let Ok(j) = serde_json::from_str::<serde_json::Value>(&text) else {
        return (Vec::new(), None);
    };
    let eos = match j.get("eos_token_id") {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|v| vec![v as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_u64())
            .map(|v| v as u32)
            .collect(),
        _ => Vec::new(),
    };
    let bos = j
        .get("bos_token_id")
        .and_then(|v| v.as_u64())
        .map(|v| v as u32);
    (eos, bos)
}
