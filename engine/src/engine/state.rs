//! What is in flight during one engine run, and the three things the loop does with it:
//! admit a request, abort the requests their owner gave up on, and run a step.

use super::*;
use crate::tensor_parallel::ModelKv;

/// The state of one engine run (see [`Engine::run_channel`]): the scheduler with its sequences
/// and KV blocks, the engine's view of each sequence and request, the model's KV memory, and
/// the run's statistics. Invariants: every sequence in `live` is in the scheduler and belongs
/// to a request in `groups`; a request leaves `groups` exactly once, with its outcome.
pub(super) struct InFlight<T, B: Backend> {
    pub(super) sched: Scheduler,
    live: HashMap<SeqId, Live>,
    groups: HashMap<u64, Group<T>>,
    next_id: SeqId,
    kv: Option<ModelKv<B>>,
    /// Set once the model or its KV memory failed: every request from then on fails with it.
    broken: Option<String>,
    ctx: usize,
    pub(super) stats: RunStats,
}

impl<T, B: Backend> InFlight<T, B> {
    pub(super) fn new(engine: &Engine<B>, opts: &EngineOptions) -> Self {
        let model = &engine.model;
        let block_size = opts.block_size.max(1);
        // On a device, what its memory holds after the weights (--gpu-memory-utilization).
        let device_kv = model.device_kv_bytes(opts.max_num_batched_tokens, opts.max_num_seqs);
        let kv_bytes = device_kv.unwrap_or(opts.kv_cache_bytes);
        let block_bytes = block_size * model.kv_bytes_per_token();
        let num_blocks = (kv_bytes / block_bytes).max(1);
        // A failed tensor-parallel group (or KV allocation) fails every request from then on.
        let (kv, broken) = if device_kv.is_some_and(|b| b < block_bytes) {
            let why = format!(
                "no device memory is left for the KV cache after the weights and a step's \
                 activations (at most {} sequences, {} tokens a step); raise \
                 --gpu-memory-utilization or lower --max-num-seqs / --max-num-batched-tokens",
                opts.max_num_seqs, opts.max_num_batched_tokens
            );
            (None, Some(why))
        } else {
            match model.kv_cache(num_blocks, block_size) {
                Ok(kv) => (Some(kv), None),
                Err(e) => (None, Some(e.to_string())),
            }
        };
        let sched = Scheduler::new(
            SchedulerConfig {
                max_num_seqs: opts.max_num_seqs.max(1),
                max_num_batched_tokens: opts.max_num_batched_tokens.max(1),
                enable_prefix_caching: opts.enable_prefix_caching,
            },
            BlockPool::new(num_blocks, block_size),
        );
        Self {
            sched,
            live: HashMap::new(),
            groups: HashMap::new(),
            next_id: 0,
            kv,
            broken,
            ctx: model.cfg().max_position_embeddings,
            stats: RunStats {
                kv_blocks: num_blocks,
                ..RunStats::default()
            },
        }
    }

    /// Takes a request in: its `n` sequences join the scheduler's queue. Returns its outcome
    /// at once when it cannot run (a broken engine, a bad prompt, too large for the cache).
    pub(super) fn admit(
        &mut self,
        engine: &Engine<B>,
        tag: T,
        req: Request,
    ) -> Option<(T, Outcome)> {
        if let Some(why) = &self.broken {
            let error = LineError::new(
                codes::INTERNAL,
                format!("line {}: the engine failed: {why}", req.line),
            );
            return Some((tag, failed(req, error)));
        }
        let prompt = match engine.prompt_ids(&req) {
            Ok(p) => p,
            Err(error) => return Some((tag, failed(req, error))),
        };
        let guide = match engine.guide(&req) {
            Ok(g) => g,
            Err(error) => return Some((tag, failed(req, error))),
        };
        let max_tokens = req.params.max_tokens.unwrap_or(self.ctx - prompt.len());
        let n = req.params.n.max(1);
        let group = self.next_id;
        let mut refused = None;
        for choice in 0..n {
            let id = self.next_id;
            self.next_id += 1;
            if let Err(e) = self
                .sched
                .add(id, prompt.clone(), prompt.len() + max_tokens)
            {
                refused = Some(e);
                break;
            }
            let fallback_seed =
                engine.seed_base ^ (req.line as u64).wrapping_mul(0x2545_f491_4f6c_dd1d);
            let sampler = Sampler::new(&req.params, fallback_seed, choice);
            self.live.insert(
                id,
                Live {
                    group,
                    choice,
                    max_tokens,
                    sampler,
                    guide: guide.clone(),
                    logprobs: Vec::new(),
                },
            );
        }
        if let Some(e) = refused {
            // Take back the choices already queued: the request fails as a whole.
            for id in group..self.next_id {
                self.sched.finish(id);
                self.live.remove(&id);
            }
            let error = LineError::new(
                codes::CONTEXT_LENGTH_EXCEEDED,
                format!("line {}: {e}", req.line),
            );
            return Some((tag, failed(req, error)));
        }
        self.groups.insert(
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
        None
    }

    /// Stops every request `aborted` answers `true` for; their outcomes say so.
    pub(super) fn abort(&mut self, aborted: &mut impl FnMut(&T) -> bool) -> Vec<(T, Outcome)> {
        let stopped: Vec<u64> = self
            .groups
            .iter()
            .filter(|(_, g)| aborted(&g.tag))
            .map(|(&k, _)| k)
            .collect();
        let mut out = Vec::new();
        for key in stopped {
            let ids: Vec<SeqId> = self
                .live
                .iter()
                .filter(|(_, l)| l.group == key)
                .map(|(&id, _)| id)
                .collect();
            for id in ids {
                self.sched.finish(id);
                self.live.remove(&id);
            }
            if let Some(g) = self.groups.remove(&key) {
                let error = LineError::new(
                    codes::CANCELLED,
                    format!("line {}: stopped before it finished", g.req.line),
                );
                out.push((g.tag, failed(g.req, error)));
            }
        }
        out
    }

    /// Fails every request in flight with `message(line)` and frees its sequences (the engine
    /// cannot go on with them).
    fn fail_all(&mut self, message: impl Fn(usize) -> String) -> Vec<(T, Outcome)> {
        for id in self.live.keys().copied().collect::<Vec<_>>() {
            self.sched.finish(id);
        }
        self.live.clear();
        self.groups
            .drain()
            .map(|(_, g)| {
                let error = LineError::new(codes::INTERNAL, message(g.req.line));
                (g.tag, failed(g.req, error))
            })
            .collect()
    }

    /// One step: the scheduler's plan through the model, a token sampled for every sequence
    /// that asked for one (`on_token` told whose), and the outcomes of the requests whose
    /// every choice finished, in input order.
    pub(super) fn step(
        &mut self,
        engine: &Engine<B>,
        on_token: &mut impl FnMut(&T),
    ) -> Vec<(T, Outcome)> {
        let plan = self.sched.schedule();
        if plan.chunks.is_empty() {
            // Cannot happen while `add` refuses sequences larger than the pool; fail the rest
            // loudly rather than spin.
            return self
                .fail_all(|line| format!("line {line}: the scheduler could not make progress"));
        }
        self.stats.steps += 1;
        self.stats.max_batch = self.stats.max_batch.max(plan.chunks.len());
        let mut masks = HashMap::new();
        let logits = {
            let steps: Vec<StepSeq<'_>> = plan
                .chunks
                .iter()
                .filter_map(|c| {
                    let s = self.sched.seq(c.seq)?;
                    Some(StepSeq {
                        tokens: &s.tokens[c.start..c.start + c.len],
                        start: c.start,
                        block_table: s.block_table(),
                        logits: if c.sample { Logits::Last } else { Logits::None },
                    })
                })
                .collect();
            // The masks of constrained sequences are computed beside the forward pass, on a
            // thread of their own; a step without constrained sequences starts no thread.
            let live = &mut self.live;
            let constrained: Vec<SeqId> = plan
                .chunks
                .iter()
                .filter(|c| c.sample && live.get(&c.seq).is_some_and(|l| l.guide.is_some()))
                .map(|c| c.seq)
                .collect();
            let kv = self.kv.as_mut();
            let forward = move || match kv {
                Some(kv) => engine.model.forward(kv, &steps).map_err(|e| e.to_string()),
                None => Err("no KV cache".to_string()),
            };
            if constrained.is_empty() {
                forward()
            } else {
                let (logits, (m, took)) = std::thread::scope(|scope| {
                    let masker = scope.spawn(|| {
                        let start = Instant::now();
                        let masks: HashMap<SeqId, _> = constrained
                            .iter()
                            .filter_map(|id| {
                                let guide = live.get_mut(id)?.guide.as_mut()?;
                                Some((*id, guide.mask()))
                            })
                            .collect();
                        (masks, start.elapsed())
                    });
                    let logits = forward();
                    // The masking thread only calls llguidance, which catches its own panics
                    // and reports them as errors.
                    let masks = masker
                        .join()
                        .unwrap_or_else(|_| (HashMap::new(), Duration::ZERO));
                    (logits, masks)
                });
                self.stats.masks += m.len() as u64;
                self.stats.mask_time += took;
                masks = m;
                logits
            }
        };
        let logits = match logits {
            Ok(l) => l,
            Err(why) => {
                tracing::error!(error = %why, "engine step failed; failing every request");
                let out = self.fail_all(|line| format!("line {line}: the engine failed: {why}"));
                self.broken = Some(why);
                return out;
            }
        };
        let mut done = Vec::new();
        for (c, mut row) in plan.chunks.iter().zip(logits) {
            if !c.sample {
                continue;
            }
            let (Some(l), Some(seq)) = (self.live.get_mut(&c.seq), self.sched.seq(c.seq)) else {
                continue;
            };
            let Some(g) = self.groups.get_mut(&l.group) else {
                continue;
            };
            let step = (seq.tokens.len() - seq.prompt_len) as u64;
            let mut guided = Ok(());
            let token = match masks.remove(&c.seq) {
                None => l.sampler.sample(&row, step, seq.generated()),
                Some(Ok(mask)) => {
                    // The mask goes on the row itself unless logprobs need the raw row later.
                    let mut copy;
                    let allowed = if g.req.params.logprobs.is_some() {
                        copy = row.clone();
                        &mut copy
                    } else {
                        &mut row
                    };
                    gristmill_structured::apply(&mask, allowed);
                    let token = l.sampler.sample(allowed, step, seq.generated());
                    if let Some(guide) = l.guide.as_mut() {
                        guided = guide.commit(token);
                    }
                    token
                }
                Some(Err(e)) => {
                    guided = Err(e);
                    0
                }
            };
            // Logprobs are the model's own (before the mask), as vLLM reports them by default.
            if let Some(top) = g.req.params.logprobs {
                l.logprobs.push(token_logprob(&row, token, top));
            }
            g.first_token.get_or_insert_with(Instant::now);
            engine.generated_tokens.fetch_add(1, Ordering::Relaxed);
            on_token(&g.tag);
            self.sched.append_token(c.seq, token);
            let Some(seq) = self.sched.seq(c.seq) else {
                continue;
            };
            let verdict = match guided {
                Ok(()) => engine.check_finished(l, &g.req, seq, self.ctx),
                Err(why) => Some(Err(LineError::new(
                    codes::INTERNAL,
                    format!(
                        "line {}: the structured-output constraint failed while generating: {why}",
                        g.req.line
                    ),
                ))),
            };
            match verdict {
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
            self.sched.finish(c.seq);
            self.live.remove(&c.seq);
            if self.groups.get(&group).is_some_and(|g| g.remaining() == 0) {
                if let Some(g) = self.groups.remove(&group) {
                    done.push(g.into_outcome());
                }
            }
        }
        // Report in input order among those finishing in the same step.
        done.sort_by_key(|(_, o)| match o {
            Outcome::Done(c) => c.line,
            Outcome::Failed { line, .. } => *line,
        });
        self.stats.scheduler = self.sched.stats();
        done
    }
}
