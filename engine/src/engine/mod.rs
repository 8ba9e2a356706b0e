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
//!
//! This file holds the types and the loop; `state` what is in flight and the loop's three
//! moves on it (admit, abort, step); `load` builds an engine from a checkpoint; `finish` turns
//! a request into prompt ids and decides when a sequence is done.
mod finish;
mod load;
mod state;
pub use load::load_tokenizer;
use state::InFlight;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gristmill_protocol::{
    codes, Endpoint, FinishReason, LineError, Prompt, Request, ToolChoice, Usage,
};
use gristmill_structured::{Guide, Vocabulary};

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
    /// Token masks computed for constrained sequences, and the time spent computing them (on a
    /// thread beside the model's forward pass).
    pub masks: u64,
    pub mask_time: Duration,
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
    /// The request's forced tool call, if any: its choices' text is the call's JSON.
    pub tool_choice: Option<ToolChoice>,
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
    /// Bytes the weights take in memory (estimated from the checkpoint's headers at load).
    pub weight_bytes: u64,
    /// Seed base for requests that bring none.
    seed_base: u64,
    /// Tokens generated so far by every run of this engine (for live progress displays).
    pub generated_tokens: AtomicU64,
    /// llguidance's view of the vocabulary, built on the first constrained request.
    structured: OnceLock<std::result::Result<Vocabulary, String>>,
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
    /// The sequence's place in its structured-output constraint, if it has one.
    guide: Option<Guide>,
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
            tool_choice: req.params.tools.map(|t| t.choice),
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

impl<B: Backend> Engine<B> {
    /// Builds llguidance's view of the vocabulary now rather than at the first constrained
    /// request (about 0.3 s for a 49k-token vocabulary on one core): benchmarks call it before
    /// timing. Returns why the model cannot follow constraints, if it cannot.
    pub fn prepare_structured_outputs(&self) -> std::result::Result<(), String> {
        self.vocabulary().as_ref().map(|_| ()).map_err(Clone::clone)
    }

    fn vocabulary(&self) -> &std::result::Result<Vocabulary, String> {
        self.structured.get_or_init(|| {
            let start = Instant::now();
            let vocab_size = self.model.cfg().vocab_size;
            let v = Vocabulary::new(
                self.tokenizer.token_bytes(vocab_size),
                &self.tokenizer.eos_ids,
            )
            .map_err(|e| e.to_string());
            tracing::info!(
                elapsed_ms = start.elapsed().as_millis() as u64,
                "structured outputs: the vocabulary is ready for token masks"
            );
            v
        })
    }

    /// A guide for a request's constraint over this model's vocabulary (built once), or the
    /// error line that says why there is none.
    fn guide(&self, req: &Request) -> std::result::Result<Option<Guide>, LineError> {
        let Some(c) = &req.params.constraint else {
            return Ok(None);
        };
        let vocab = self.vocabulary().as_ref().map_err(|why| {
            LineError::new(
                codes::INVALID_REQUEST,
                format!(
                    "line {}: this model cannot follow a {} constraint: {why}",
                    req.line,
                    c.kind()
                ),
            )
        })?;
        vocab.guide(c).map(Some).map_err(|why| {
            LineError::new(
                codes::INVALID_REQUEST,
                format!(
                    "line {}: the {} constraint cannot be enforced over this model's vocabulary: {why}",
                    req.line,
                    c.kind()
                ),
            )
        })
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
        let mut run = InFlight::new(self, &opts);
        let max_seqs = opts.max_num_seqs.max(1);
        let mut exhausted = false;
        loop {
            // Keep a queue of admitted requests ahead of the running batch, no more.
            while !exhausted && run.sched.num_waiting() < max_seqs {
                let (tag, req) = match next(!run.sched.is_idle()) {
                    Poll::Ready(r) => *r,
                    Poll::NotYet => break,
                    Poll::Closed => {
                        exhausted = true;
                        break;
                    }
                };
                if let Some((tag, o)) = run.admit(self, tag, req) {
                    on_outcome(tag, o);
                }
            }
            for (tag, o) in run.abort(&mut aborted) {
                on_outcome(tag, o);
            }
            if run.sched.is_idle() {
                if exhausted {
                    return run.stats;
                }
                continue;
            }
            for (tag, o) in run.step(self, &mut on_token) {
                on_outcome(tag, o);
            }
        }
    }
}
