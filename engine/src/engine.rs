//! The generation engine: turns validated requests into completions.
//!
//! Requests are pulled lazily from an iterator, so memory stays bounded however long the input
//! is: at most `2 × max_num_seqs` requests are held at once. The [`Scheduler`] plans each step
//! (continuous batching, chunked prefill, paged KV blocks with prefix caching, preemption by
//! recompute); the model runs it; sampled tokens go back to the scheduler. A finished sequence
//! leaves the batch at once and a waiting request takes its place.
//!
//! Invariants: every request pulled from the iterator produces exactly one [`Outcome`]; a
//! sequence's output depends only on its own prompt, parameters and seed.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gristmill_protocol::{codes, Endpoint, FinishReason, LineError, Prompt, Request, Usage};

use crate::backend::{Backend, CpuBackend};
use crate::error::Result;
use crate::kv_cache::BlockPool;
use crate::model::llama::{Llama, Logits, StepSeq};
use crate::sampler::{token_logprob, Sampler, TokenLogprob};
use crate::scheduler::{Scheduler, SchedulerConfig, SchedulerStats, SeqId, Sequence};
use crate::tensor_parallel::{load_model, Model};
use crate::tokenizer::Tokenizer;
use crate::weights::Checkpoint;

/// Limits of the engine.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    /// Most sequences in flight at once.
    pub max_num_seqs: usize,
    /// Most tokens (prompt chunks plus decode tokens) in one step.
    pub max_num_batched_tokens: usize,
    /// Bytes of KV cache memory.
    pub kv_cache_bytes: usize,
    /// Token positions per KV block.
    pub block_size: usize,
    /// Reuse the KV blocks of earlier requests with the same prefix.
    pub enable_prefix_caching: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            max_num_seqs: 64,
            max_num_batched_tokens: 2048,
            kv_cache_bytes: 2 << 30,
            block_size: 16,
            enable_prefix_caching: true,
        }
    }
}

/// What a run did, for summaries and benchmarks.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunStats {
    pub steps: u64,
    pub scheduler: SchedulerStats,
    /// KV blocks of the run's cache.
    pub kv_blocks: usize,
    /// Largest number of sequences in one step.
    pub max_batch: usize,
}

/// A request that finished generating.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub custom_id: String,
    pub line: usize,
    pub endpoint: Endpoint,
    /// The `model` the request named, echoed back.
    pub model: Option<String>,
    /// One per requested completion (`n`), in index order.
    pub choices: Vec<Choice>,
    /// Prompt tokens once, completion tokens of all choices.
    pub usage: Usage,
    /// From admission into the engine to the first generated token.
    pub time_to_first_token: Duration,
    /// From the first generated token to the last.
    pub decode_time: Duration,
}

/// One generated completion of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    /// Per output token, when the request asked for logprobs.
    pub logprobs: Option<Vec<OutputLogprob>>,
}

/// One output token's logprob, as the response formats need it.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputLogprob {
    /// The token's text.
    pub text: String,
    pub logprob: f32,
    /// Byte offset of the token in the output text.
    pub offset: usize,
    /// Most likely alternatives: text and logprob.
    pub top: Vec<(String, f32)>,
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
    pub model: Model<B>,
    pub tokenizer: Tokenizer,
    /// Name reported in responses when a request names none (the file or directory stem).
    pub model_name: String,
    /// Seed base for requests that bring none.
    seed_base: u64,
    /// Tokens generated so far by every run of this engine (for live progress displays).
    pub generated_tokens: AtomicU64,
}

/// What a request source has for the engine.
#[derive(Debug)]
enum Poll<T> {
    Ready(Box<(T, Request)>),
    /// Nothing now; ask again after the next step.
    NotYet,
    /// No more requests will come.
    Closed,
}

impl From<Option<Request>> for Poll<()> {
    fn from(r: Option<Request>) -> Self {
        r.map_or(Poll::Closed, |r| Poll::Ready(Box::new(((), r))))
    }
}

/// One sequence inside the engine (a request has `n` of them); its tokens and KV blocks live
/// in the scheduler.
struct Live {
    group: u64,
    choice: usize,
    max_tokens: usize,
    sampler: Sampler,
    /// One entry per generated token when the request asked for logprobs.
    logprobs: Vec<TokenLogprob>,
}

/// A request inside the engine, waiting for its `n` choices.
struct Group<T> {
    tag: T,
    req: Request,
    prompt_len: usize,
    admitted: Instant,
    first_token: Option<Instant>,
    choices: Vec<Option<Choice>>,
    error: Option<LineError>,
}

/// The outcome of a request that failed with `error`.
fn failed(req: Request, error: LineError) -> Outcome {
    Outcome::Failed {
        custom_id: req.custom_id,
        line: req.line,
        error,
    }
}

/// Fails every request in flight with `message(line)` and frees its sequences (the engine
/// cannot go on with them).
fn fail_all<T>(
    sched: &mut Scheduler,
    live: &mut HashMap<SeqId, Live>,
    groups: &mut HashMap<u64, Group<T>>,
    on_outcome: &mut impl FnMut(T, Outcome),
    message: impl Fn(usize) -> String,
) {
    for id in live.keys().copied().collect::<Vec<_>>() {
        sched.finish(id);
    }
    live.clear();
    for (_, g) in groups.drain() {
        let error = LineError::new(codes::INTERNAL, message(g.req.line));
        on_outcome(g.tag, failed(g.req, error));
    }
}

impl<T> Group<T> {
    fn remaining(&self) -> usize {
        self.choices.iter().filter(|c| c.is_none()).count()
    }

    fn into_outcome(self) -> (T, Outcome) {
        let req = self.req;
        if let Some(error) = self.error {
            return (self.tag, failed(req, error));
        }
        let choices: Vec<Choice> = self.choices.into_iter().flatten().collect();
        let now = Instant::now();
        let first = self.first_token.unwrap_or(now);
        let done = Outcome::Done(Completion {
            usage: Usage::new(
                self.prompt_len,
                choices.iter().map(|c| c.token_ids.len()).sum(),
            ),
            custom_id: req.custom_id,
            line: req.line,
            endpoint: req.endpoint,
            model: req.model,
            choices,
            time_to_first_token: first - self.admitted,
            decode_time: now - first,
        });
        (self.tag, done)
    }
}

/// The tokenizer (and chat template) of a GGUF file or HF directory, without its weights: what
/// the coordinator needs to plan shards by shared prompt prefix.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    checkpoint_tokenizer(&Checkpoint::open(path)?)
}

fn checkpoint_tokenizer(ckpt: &Checkpoint) -> Result<Tokenizer> {
    match ckpt {
        Checkpoint::Gguf(g) => Tokenizer::from_gguf(g),
        Checkpoint::Safetensors { dir, .. } => {
            let (eos, bos) = hf_special_ids(&dir.join("config.json"));
            Tokenizer::from_hf_dir(dir, &eos, bos)
        }
    }
}

impl Engine<CpuBackend> {
    /// Loads a GGUF file or HF safetensors directory on the CPU backend.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, CpuBackend)
    }

    /// Loads a model split over `tensor_parallel_size` rank threads (whole when 1).
    pub fn load_parallel(path: &Path, tensor_parallel_size: usize) -> Result<Self> {
        if tensor_parallel_size <= 1 {
            return Self::load(path);
        }
        let tokenizer = checkpoint_tokenizer(&Checkpoint::open(path)?)?;
        let model = load_model(path, tensor_parallel_size)?;
        Ok(Self::assemble(path, model, tokenizer))
    }
}

impl<B: Backend> Engine<B> {
    pub fn load_with(path: &Path, backend: B) -> Result<Self> {
        let ckpt = Checkpoint::open(path)?;
        let cfg = ckpt.config()?;
        let tokenizer = checkpoint_tokenizer(&ckpt)?;
        if tokenizer.vocab_size() > cfg.vocab_size {
            tracing::warn!(
                tokenizer = tokenizer.vocab_size(),
                model = cfg.vocab_size,
                "the tokenizer knows more tokens than the model has embeddings"
            );
        }
        let model = Model::Single(Llama::load(&ckpt, backend)?);
        Ok(Self::assemble(path, model, tokenizer))
    }

    fn assemble(path: &Path, model: Model<B>, tokenizer: Tokenizer) -> Self {
        let stem = path
            .file_stem()
            .or(path.file_name())
            .map(|s| s.to_string_lossy().into_owned());
        let seed_base = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Self {
            model,
            tokenizer,
            model_name: stem.unwrap_or_else(|| "model".into()),
            seed_base,
            generated_tokens: AtomicU64::new(0),
        }
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
                let vocab = self.model.cfg().vocab_size;
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
        let ctx = self.model.cfg().max_position_embeddings;
        // The tokenizer may know more tokens than the model embeds (a mismatched checkpoint).
        let vocab = self.model.cfg().vocab_size;
        if let Some(&t) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(LineError::new(
                codes::INVALID_REQUEST,
                format!(
                    "line {line}: the prompt tokenizes to id {t}, but the model has only {vocab} \
                     embeddings; the checkpoint's tokenizer and weights do not match"
                ),
            ));
        }
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
    pub fn run<I, F>(&self, requests: I, opts: EngineOptions, on_outcome: F) -> RunStats
    where
        I: IntoIterator<Item = Request>,
        F: FnMut(Outcome),
    {
        let mut iter = requests.into_iter();
        let mut on_outcome = on_outcome;
        self.run_source(
            |_| Poll::from(iter.next()),
            opts,
            |_| false,
            |_| {},
            |(), o| on_outcome(o),
        )
    }

    /// Serves requests that arrive on a channel while the engine runs: new requests join the
    /// running batch at the next step. Returns when the sender is dropped and all work is done.
    ///
    /// Each request travels with a tag `T` that comes back with its outcome (a worker serving
    /// several shards at once tells them apart by it). Before every step `aborted(tag)` is asked
    /// of each request in flight; one it answers `true` for stops at once and reports
    /// [`codes::CANCELLED`] (a cancelled batch frees the engine for other work).
    /// `on_token(tag)` is called for every token generated for a request (a worker reports a
    /// shard's progress from it while its lines run).
    pub fn run_channel<T, A, P, F>(
        &self,
        requests: Receiver<(T, Request)>,
        opts: EngineOptions,
        aborted: A,
        on_token: P,
        on_outcome: F,
    ) -> RunStats
    where
        A: FnMut(&T) -> bool,
        P: FnMut(&T),
        F: FnMut(T, Outcome),
    {
        self.run_source(
            |busy| {
                if busy {
                    match requests.try_recv() {
                        Ok(r) => Poll::Ready(Box::new(r)),
                        Err(TryRecvError::Empty) => Poll::NotYet,
                        Err(TryRecvError::Disconnected) => Poll::Closed,
                    }
                } else {
                    // Nothing to compute: block until work arrives.
                    requests
                        .recv()
                        .map_or(Poll::Closed, |r| Poll::Ready(Box::new(r)))
                }
            },
            opts,
            aborted,
            on_token,
            on_outcome,
        )
    }

    /// The engine loop. `next(busy)` yields the next request; `busy` says whether sequences are
    /// in flight (a source may then answer `NotYet` instead of waiting).
    fn run_source<T, S, A, P, F>(
        &self,
        mut next: S,
        opts: EngineOptions,
        mut aborted: A,
        mut on_token: P,
        mut on_outcome: F,
    ) -> RunStats
    where
        S: FnMut(bool) -> Poll<T>,
        A: FnMut(&T) -> bool,
        P: FnMut(&T),
        F: FnMut(T, Outcome),
    {
        let ctx = self.model.cfg().max_position_embeddings;
        let block_size = opts.block_size.max(1);
        let num_blocks =
            (opts.kv_cache_bytes / (block_size * self.model.kv_bytes_per_token())).max(1);
        // A failed tensor-parallel group (or KV allocation) fails every request from then on.
        let mut broken: Option<String> = None;
        let mut kv = match self.model.kv_cache(num_blocks, block_size) {
            Ok(kv) => Some(kv),
            Err(e) => {
                broken = Some(e.to_string());
                None
            }
        };
        let max_seqs = opts.max_num_seqs.max(1);
        let mut sched = Scheduler::new(
            SchedulerConfig {
                max_num_seqs: max_seqs,
                max_num_batched_tokens: opts.max_num_batched_tokens.max(1),
                enable_prefix_caching: opts.enable_prefix_caching,
            },
            BlockPool::new(num_blocks, block_size),
        );
        let mut live: HashMap<SeqId, Live> = HashMap::new();
        let mut groups: HashMap<u64, Group<T>> = HashMap::new();
        let mut next_id: SeqId = 0;
        let mut stats = RunStats {
            kv_blocks: num_blocks,
            ..RunStats::default()
        };
        let mut exhausted = false;
        loop {
            // Keep a queue of admitted requests ahead of the running batch, no more.
            while !exhausted && sched.num_waiting() < max_seqs {
                let (tag, req) = match next(!sched.is_idle()) {
                    Poll::Ready(r) => *r,
                    Poll::NotYet => break,
                    Poll::Closed => {
                        exhausted = true;
                        break;
                    }
                };
                if let Some(why) = &broken {
                    let error = LineError::new(
                        codes::INTERNAL,
                        format!("line {}: the engine failed: {why}", req.line),
                    );
                    on_outcome(tag, failed(req, error));
                    continue;
                }
                let prompt = match self.prompt_ids(&req) {
                    Ok(p) => p,
                    Err(error) => {
                        on_outcome(tag, failed(req, error));
                        continue;
                    }
                };
                let max_tokens = req.params.max_tokens.unwrap_or(ctx - prompt.len());
                let n = req.params.n.max(1);
                let group = next_id;
                let mut refused = None;
                for choice in 0..n {
                    let id = next_id;
                    next_id += 1;
                    if let Err(e) = sched.add(id, prompt.clone(), prompt.len() + max_tokens) {
                        refused = Some(e);
                        break;
                    }
                    let fallback_seed =
                        self.seed_base ^ (req.line as u64).wrapping_mul(0x2545_f491_4f6c_dd1d);
                    let sampler = Sampler::new(&req.params, fallback_seed, choice);
                    live.insert(
                        id,
                        Live {
                            group,
                            choice,
                            max_tokens,
                            sampler,
                            logprobs: Vec::new(),
                        },
                    );
                }
                if let Some(e) = refused {
                    // Take back the choices already queued: the request fails as a whole.
                    for id in group..next_id {
                        sched.finish(id);
                        live.remove(&id);
                    }
                    let error = LineError::new(
                        codes::CONTEXT_LENGTH_EXCEEDED,
                        format!("line {}: {e}", req.line),
                    );
                    on_outcome(tag, failed(req, error));
                    continue;
                }
                groups.insert(
                    group,
                    Group {
                        tag,
                        prompt_len: prompt.len(),
                        admitted: Instant::now(),
                        first_token: None,
                        choices: vec![None; n],
                        error: None,
                        req,
                    },
                );
            }
            let stopped: Vec<u64> = groups
                .iter()
                .filter(|(_, g)| aborted(&g.tag))
                .map(|(&k, _)| k)
                .collect();
            for key in stopped {
                let ids: Vec<SeqId> = live
                    .iter()
                    .filter(|(_, l)| l.group == key)
                    .map(|(&id, _)| id)
                    .collect();
                for id in ids {
                    sched.finish(id);
                    live.remove(&id);
                }
                if let Some(g) = groups.remove(&key) {
                    let error = LineError::new(
                        codes::CANCELLED,
                        format!("line {}: stopped before it finished", g.req.line),
                    );
                    on_outcome(g.tag, failed(g.req, error));
                }
            }
            if sched.is_idle() {
                if exhausted {
                    return stats;
                }
                continue;
            }
            let plan = sched.schedule();
            if plan.chunks.is_empty() {
                // Cannot happen while `add` refuses sequences larger than the pool; fail the rest
                // loudly rather than spin.
                fail_all(
                    &mut sched,
                    &mut live,
                    &mut groups,
                    &mut on_outcome,
                    |line| format!("line {line}: the scheduler could not make progress"),
                );
                continue;
            }
            stats.steps += 1;
            stats.max_batch = stats.max_batch.max(plan.chunks.len());
            let logits = {
                let steps: Vec<StepSeq<'_>> = plan
                    .chunks
                    .iter()
                    .filter_map(|c| {
                        let s = sched.seq(c.seq)?;
                        Some(StepSeq {
                            tokens: &s.tokens[c.start..c.start + c.len],
                            start: c.start,
                            block_table: s.block_table(),
                            logits: if c.sample { Logits::Last } else { Logits::None },
                        })
                    })
                    .collect();
                match kv.as_mut() {
                    Some(kv) => self.model.forward(kv, &steps).map_err(|e| e.to_string()),
                    None => Err("no KV cache".to_string()),
                }
            };
            let logits = match logits {
                Ok(l) => l,
                Err(why) => {
                    tracing::error!(error = %why, "engine step failed; failing every request");
                    fail_all(
                        &mut sched,
                        &mut live,
                        &mut groups,
                        &mut on_outcome,
                        |line| format!("line {line}: the engine failed: {why}"),
                    );
                    broken = Some(why);
                    continue;
                }
            };
            let mut done = Vec::new();
            for (c, row) in plan.chunks.iter().zip(logits) {
                if !c.sample {
                    continue;
                }
                let (Some(l), Some(seq)) = (live.get_mut(&c.seq), sched.seq(c.seq)) else {
                    continue;
                };
                let Some(g) = groups.get_mut(&l.group) else {
                    continue;
                };
                let step = (seq.tokens.len() - seq.prompt_len) as u64;
                let token = l.sampler.sample(&row, step, seq.generated());
                if let Some(top) = g.req.params.logprobs {
                    l.logprobs.push(token_logprob(&row, token, top));
                }
                g.first_token.get_or_insert_with(Instant::now);
                self.generated_tokens.fetch_add(1, Ordering::Relaxed);
                on_token(&g.tag);
                sched.append_token(c.seq, token);
                let Some(seq) = sched.seq(c.seq) else {
                    continue;
                };
                match self.check_finished(l, &g.req, seq, ctx) {
                    None => continue,
                    Some(Ok(choice)) => g.choices[l.choice] = Some(choice),
                    Some(Err(error)) => {
                        g.error.get_or_insert(error);
                        g.choices[l.choice] = Some(Choice {
                            text: String::new(),
                            token_ids: Vec::new(),
                            finish_reason: FinishReason::Stop,
                            logprobs: None,
                        });
                    }
                }
                let group = l.group;
                sched.finish(c.seq);
                live.remove(&c.seq);
                if groups.get(&group).is_some_and(|g| g.remaining() == 0) {
                    if let Some(g) = groups.remove(&group) {
                        done.push(g.into_outcome());
                    }
                }
            }
            // Report in input order among those finishing in the same step.
            done.sort_by_key(|(_, o)| match o {
                Outcome::Done(c) => c.line,
                Outcome::Failed { line, .. } => *line,
            });
            for (tag, o) in done {
                on_outcome(tag, o);
            }
            stats.scheduler = sched.stats();
        }
    }

    /// Whether a stop string may have just completed. Checked every step, so a new occurrence
    /// ends in the last token: decoding a tail a little longer than the longest stop string is
    /// enough, instead of the whole output each step. The window grows until its text is long
    /// enough (tokens that decode to nothing, such as special tokens, do not count).
    fn tail_has_stop(&self, generated: &[u32], stop: &[String]) -> bool {
        let Some(longest) = stop.iter().map(String::len).max() else {
            return false;
        };
        let mut k = (longest + 4).min(generated.len());
        loop {
            let tail = self
                .tokenizer
                .decode(&generated[generated.len() - k..])
                .unwrap_or_default();
            if stop.iter().any(|s| tail.contains(s.as_str())) {
                return true;
            }
            if tail.len() >= longest + 4 || k == generated.len() {
                return false;
            }
            k = (k * 2).min(generated.len());
        }
    }

    /// Decides whether a sequence is done after its latest token, and builds its choice.
    fn check_finished(
        &self,
        l: &Live,
        req: &Request,
        seq: &Sequence,
        ctx: usize,
    ) -> Option<Result<Choice, LineError>> {
        let generated = seq.generated();
        let last = *generated.last()?;
        let p = &req.params;
        let eos = !p.ignore_eos && self.tokenizer.eos_ids.contains(&last);
        let at_limit = generated.len() >= l.max_tokens || seq.tokens.len() >= ctx;
        if !eos && !at_limit && !self.tail_has_stop(generated, &p.stop) {
            return None;
        }
        let visible = if eos {
            &generated[..generated.len() - 1]
        } else {
            generated
        };
        let text = match self.tokenizer.decode(visible) {
            Ok(t) => t,
            Err(e) => {
                return Some(Err(LineError::new(
                    codes::INTERNAL,
                    format!("line {}: {e}", req.line),
                )))
            }
        };
        let cut = p
            .stop
            .iter()
            .filter_map(|stop| text.find(stop.as_str()))
            .min();
        let (text, finish_reason) = match cut {
            Some(cut) => (text[..cut].to_string(), FinishReason::Stop),
            None if eos => (text, FinishReason::Stop),
            None if at_limit => (text, FinishReason::Length),
            None => return None,
        };
        let logprobs = p
            .logprobs
            .map(|_| self.visible_logprobs(&l.logprobs, visible, text.len()));
        Some(Ok(Choice {
            text,
            token_ids: generated.to_vec(),
            finish_reason,
            logprobs,
        }))
    }

    /// The logprobs of the tokens whose text is in the output (`text_len` bytes of the decoded
    /// `visible` tokens), each with its text and its offset in the output.
    fn visible_logprobs(
        &self,
        all: &[TokenLogprob],
        visible: &[u32],
        text_len: usize,
    ) -> Vec<OutputLogprob> {
        let piece = |id: u32| self.tokenizer.decode(&[id]).unwrap_or_default();
        let mut out = Vec::new();
        let mut offset = 0;
        for (i, lp) in all.iter().enumerate().take(visible.len()) {
            if offset >= text_len {
                break;
            }
            // Offsets from decoding the prefix, so multi-token characters land where they end.
            let end = self
                .tokenizer
                .decode(&visible[..=i])
                .map_or(offset, |t| t.len());
            out.push(OutputLogprob {
                text: piece(lp.token),
                logprob: lp.logprob,
                offset,
                top: lp.top.iter().map(|&(id, l)| (piece(id), l)).collect(),
            });
            offset = end;
        }
        out
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
