//! Continuous-batching scheduler: which tokens of which sequences go into the next step.
//!
//! Pure state, no I/O and no model: the engine asks [`Scheduler::schedule`] for a step plan,
//! runs it, and reports sampled tokens back with [`Scheduler::append_token`]. Policy:
//!
//! 1. *Running* sequences come first, in admission order: each gets its remaining uncomputed
//!    tokens (one when decoding; a chunk of its prompt while prefilling), within the step's
//!    token budget (`max_num_batched_tokens`).
//! 2. When a running sequence needs a KV block and none is free, the most recently admitted
//!    running sequence is *preempted*: its blocks are released and it goes back to the front of
//!    the waiting queue, to be recomputed later (its full blocks usually survive in the prefix
//!    cache). Memory never runs out; a sequence preempts only ones admitted after it.
//! 3. *Waiting* sequences are admitted in arrival order while the budget, `max_num_seqs` and free
//!    blocks allow; on admission, the longest run of its full prompt blocks found in the prefix
//!    cache is reused instead of recomputed.
//!
//! No request starves: the running set is served oldest first, a waiting request is never
//! overtaken by a later one, and preempted requests re-enter at the front.
//!
//! Invariants: a sequence is in exactly one of `waiting` or `running`; a running sequence holds
//! exactly `blocks_for(num_computed)` blocks after a step is planned; a waiting one holds none.

use std::collections::{HashMap, VecDeque};

use crate::kv_cache::{block_hash, BlockHash, BlockId, BlockPool};

/// Caller-chosen id of a sequence.
pub type SeqId = u64;

/// Limits of a step.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub enable_prefix_caching: bool,
}

/// A sequence as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct Sequence {
    /// Prompt followed by the tokens generated so far.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Positions whose keys and values are in the cache (or will be after the planned step).
    pub num_computed: usize,
    blocks: Vec<BlockId>,
    /// Chained hashes of the full blocks whose hashes are known.
    hashes: Vec<BlockHash>,
}

impl Sequence {
    pub fn block_table(&self) -> &[BlockId] {
        &self.blocks
    }

    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }
}

/// One sequence's share of a step: positions `start..start + len` of its tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub seq: SeqId,
    pub start: usize,
    pub len: usize,
    /// The chunk ends at the sequence's last token: sample from its logits.
    pub sample: bool,
}

/// What the next step computes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StepPlan {
    pub chunks: Vec<Chunk>,
    /// Sequences preempted while planning (their KV is gone; they will be recomputed).
    pub preempted: Vec<SeqId>,
}

/// Counters over the scheduler's life.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerStats {
    /// Tokens that had to be in the cache when a sequence was admitted (prompt, plus generated
    /// tokens after a preemption).
    pub prefill_tokens: u64,
    /// Of those, tokens found in the prefix cache and so not recomputed.
    pub cached_tokens: u64,
    pub preemptions: u64,
}

/// Why a sequence cannot be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddError {
    #[error("the request needs {needed} KV blocks of {block_size} tokens ({tokens} tokens) but the KV cache has only {available}; raise --kv-cache-memory or lower max_tokens")]
    TooLarge {
        needed: usize,
        available: usize,
        block_size: usize,
        tokens: usize,
    },
    #[error("sequence id {0} is already in use")]
    DuplicateId(SeqId),
    #[error("the prompt is empty")]
    EmptyPrompt,
}

/// The scheduler state.
#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    pool: BlockPool,
    seqs: HashMap<SeqId, Sequence>,
    waiting: VecDeque<SeqId>,
    running: Vec<SeqId>,
    stats: SchedulerStats,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, pool: BlockPool) -> Self {
        Self {
            cfg,
            pool,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            stats: SchedulerStats::default(),
        }
    }

    pub fn stats(&self) -> SchedulerStats {
        self.stats
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn is_idle(&self) -> bool {
        self.seqs.is_empty()
    }

    pub fn seq(&self, id: SeqId) -> Option<&Sequence> {
        self.seqs.get(&id)
    }

    /// Queues a sequence that will grow to at most `max_len` tokens.
    pub fn add(&mut self, id: SeqId, prompt: Vec<u32>, max_len: usize) -> Result<(), AddError> {
        if prompt.is_empty() {
            return Err(AddError::EmptyPrompt);
        }
        if self.seqs.contains_key(&id) {
            return Err(AddError::DuplicateId(id));
        }
        let needed = self.pool.blocks_for(max_len.max(prompt.len()));
        if needed > self.pool.num_blocks() {
            return Err(AddError::TooLarge {
                needed,
                available: self.pool.num_blocks(),
                block_size: self.pool.block_size(),
                tokens: max_len,
            });
        }
        let prompt_len = prompt.len();
        self.seqs.insert(
            id,
            Sequence {
                tokens: prompt,
                prompt_len,
                num_computed: 0,
                blocks: Vec::new(),
                hashes: Vec::new(),
            },
        );
        self.waiting.push_back(id);
        Ok(())
    }

    /// Records a sampled token; the sequence must have just been sampled from.
    pub fn append_token(&mut self, id: SeqId, token: u32) {
        if let Some(s) = self.seqs.get_mut(&id) {
            s.tokens.push(token);
        }
    }

    /// Removes a finished sequence and releases its blocks (full ones stay cached).
    pub fn finish(&mut self, id: SeqId) -> Option<Sequence> {
        let mut s = self.seqs.remove(&id)?;
        self.running.retain(|&r| r != id);
        self.waiting.retain(|&w| w != id);
        commit_full_blocks(&mut self.pool, self.cfg.enable_prefix_caching, &mut s);
        for &b in &s.blocks {
            self.pool.release(b);
        }
        s.blocks.clear();
        Some(s)
    }

    fn preempt(&mut self, id: SeqId) {
        self.running.retain(|&r| r != id);
        if let Some(s) = self.seqs.get_mut(&id) {
            commit_full_blocks(&mut self.pool, self.cfg.enable_prefix_caching, s);
            for &b in &s.blocks {
                self.pool.release(b);
            }
            s.blocks.clear();
            s.num_computed = 0;
        }
        self.waiting.push_front(id);
        self.stats.preemptions += 1;
    }

    /// Grows a sequence's block table to hold `tokens` positions; false if blocks ran out
    /// (nothing is allocated then).
    fn reserve(&mut self, id: SeqId, tokens: usize) -> bool {
        let Some(s) = self.seqs.get(&id) else {
            return false;
        };
        let need = self.pool.blocks_for(tokens).saturating_sub(s.blocks.len());
        if need > self.pool.num_free() {
            return false;
        }
        let new: Vec<BlockId> = (0..need).filter_map(|_| self.pool.allocate()).collect();
        if let Some(s) = self.seqs.get_mut(&id) {
            s.blocks.extend(new);
        }
        true
    }

    /// Plans the next step.
    pub fn schedule(&mut self) -> StepPlan {
        let mut plan = StepPlan::default();
        let mut budget = self.cfg.max_num_batched_tokens.max(1);
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let Some(s) = self.seqs.get_mut(&id) else {
                self.running.remove(i);
                continue;
            };
            commit_full_blocks(&mut self.pool, self.cfg.enable_prefix_caching, s);
            let start = s.num_computed;
            let total = s.tokens.len();
            let len = (total - start).min(budget);
            let mut self_preempted = false;
            while !self.reserve(id, start + len) {
                let victim = *self.running.last().unwrap_or(&id);
                plan.preempted.push(victim);
                self.preempt(victim);
                if victim == id {
                    self_preempted = true;
                    break;
                }
            }
            if self_preempted {
                break;
            }
            plan.chunks.push(self.commit_chunk(id, start, len, total));
            budget -= len;
            i += 1;
        }
        while budget > 0 && self.running.len() < self.cfg.max_num_seqs.max(1) {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let hits = self.lookup_prefix(id);
            let Some(s) = self.seqs.get(&id) else {
                self.waiting.pop_front();
                continue;
            };
            let start = s.num_computed;
            let total = s.tokens.len();
            let len = (total - start).min(budget);
            if !self.reserve(id, start + len) {
                self.unlookup(id);
                break;
            }
            self.stats.prefill_tokens += total as u64;
            self.stats.cached_tokens += hits as u64;
            self.waiting.pop_front();
            self.running.push(id);
            plan.chunks.push(self.commit_chunk(id, start, len, total));
            budget -= len;
        }
        plan
    }

    /// Marks positions `start..start + len` of a sequence as computed by the planned step and
    /// returns its chunk.
    fn commit_chunk(&mut self, id: SeqId, start: usize, len: usize, total: usize) -> Chunk {
        if let Some(s) = self.seqs.get_mut(&id) {
            s.num_computed = start + len;
            // Blocks this step fills become visible to requests admitted later in this same
            // pass: the model writes every sequence's K/V of a layer before any attention reads
            // them, and a planned chunk is never preempted within its pass.
            commit_full_blocks(&mut self.pool, self.cfg.enable_prefix_caching, s);
        }
        Chunk {
            seq: id,
            start,
            len,
            sample: start + len == total,
        }
    }

    /// Takes the cached blocks of the longest known prefix of a waiting sequence; returns the
    /// number of tokens covered. At least the last token is always left to compute (its logits
    /// are needed).
    fn lookup_prefix(&mut self, id: SeqId) -> usize {
        if !self.cfg.enable_prefix_caching {
            return 0;
        }
        let bs = self.pool.block_size();
        let Some(s) = self.seqs.get_mut(&id) else {
            return 0;
        };
        debug_assert!(s.blocks.is_empty() && s.num_computed == 0);
        let max_blocks = (s.tokens.len() - 1) / bs;
        let mut parent = None;
        s.hashes.clear();
        for i in 0..max_blocks {
            let h = block_hash(parent, &s.tokens[i * bs..(i + 1) * bs]);
            let Some(b) = self.pool.lookup(h) else { break };
            s.blocks.push(b);
            s.hashes.push(h);
            parent = Some(h);
        }
        s.num_computed = s.blocks.len() * bs;
        s.num_computed
    }

    /// Gives back the blocks taken by a lookup whose admission then failed.
    fn unlookup(&mut self, id: SeqId) {
        if let Some(s) = self.seqs.get_mut(&id) {
            for &b in &s.blocks {
                self.pool.release(b);
            }
            s.blocks.clear();
            s.num_computed = 0;
        }
    }

    /// Checks the module invariants (tests).
    pub fn check_invariants(&self) {
        self.pool.check_invariants();
        for (&id, s) in &self.seqs {
            let w = self.waiting.contains(&id);
            let r = self.running.contains(&id);
            assert!(w != r, "sequence {id}: waiting {w}, running {r}");
            if w {
                assert!(s.blocks.is_empty(), "waiting sequence {id} holds blocks");
            } else {
                assert_eq!(
                    s.blocks.len(),
                    self.pool.blocks_for(s.num_computed),
                    "sequence {id} block count"
                );
            }
        }
    }
}

/// Registers the hashes of a sequence's full, computed blocks in the prefix cache.
fn commit_full_blocks(pool: &mut BlockPool, enabled: bool, s: &mut Sequence) {
    if !enabled {
        return;
    }
    let bs = pool.block_size();
    let full = (s.num_computed / bs).min(s.blocks.len());
    while s.hashes.len() < full {
        let i = s.hashes.len();
        let h = block_hash(s.hashes.last().copied(), &s.tokens[i * bs..(i + 1) * bs]);
        s.hashes.push(h);
    }
    for i in 0..full {
        pool.commit(s.blocks[i], s.hashes[i]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(num_blocks: usize, block_size: usize, max_seqs: usize, budget: usize) -> Scheduler {
        Scheduler::new(
            SchedulerConfig {
                max_num_seqs: max_seqs,
                max_num_batched_tokens: budget,
                enable_prefix_caching: true,
            },
            BlockPool::new(num_blocks, block_size),
        )
    }

    /// Runs the plan as an engine would: every sampled chunk yields token 7.
    fn step(s: &mut Scheduler) -> StepPlan {
        let plan = s.schedule();
        for c in &plan.chunks {
            if c.sample {
                s.append_token(c.seq, 7);
            }
        }
        s.check_invariants();
        plan
    }

    fn chunk(seq: SeqId, start: usize, len: usize, sample: bool) -> Chunk {
        Chunk {
            seq,
            start,
            len,
            sample,
        }
    }

    #[test]
    fn prefill_is_chunked_by_the_budget_and_decode_goes_first() {
        let mut s = sched(64, 4, 8, 6);
        s.add(1, vec![1; 10], 20).expect("fits");
        s.add(2, vec![2; 3], 20).expect("fits");
        let table: &[&[Chunk]] = &[
            &[chunk(1, 0, 6, false)],
            &[chunk(1, 6, 4, true), chunk(2, 0, 2, false)],
            &[chunk(1, 10, 1, true), chunk(2, 2, 1, true)],
            &[chunk(1, 11, 1, true), chunk(2, 3, 1, true)],
        ];
        for (n, want) in table.iter().enumerate() {
            assert_eq!(step(&mut s).chunks, *want, "step {n}");
        }
    }

    #[test]
    fn max_num_seqs_limits_admission_and_finishing_frees_a_slot() {
        let mut s = sched(64, 4, 2, 100);
        for id in 1..=3 {
            s.add(id, vec![id as u32; 5], 10).expect("fits");
        }
        let p = step(&mut s);
        assert_eq!(
            p.chunks.iter().map(|c| c.seq).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(s.num_waiting(), 1);
        s.finish(1);
        let p = step(&mut s);
        assert_eq!(
            p.chunks.iter().map(|c| (c.seq, c.len)).collect::<Vec<_>>(),
            vec![(2, 1), (3, 5)]
        );
    }

    #[test]
    fn blocks_running_out_preempts_the_newest_and_it_resumes_later() {
        // 4 blocks of 2 tokens: two sequences of 3 prompt tokens need 2 blocks each, then a third
        // block each as they decode.
        let mut s = Scheduler::new(
            SchedulerConfig {
                max_num_seqs: 8,
                max_num_batched_tokens: 100,
                enable_prefix_caching: false,
            },
            BlockPool::new(4, 2),
        );
        s.add(1, vec![1, 2, 3], 8).expect("fits");
        s.add(2, vec![4, 5, 6], 8).expect("fits");
        assert_eq!(
            step(&mut s).chunks,
            vec![chunk(1, 0, 3, true), chunk(2, 0, 3, true)]
        );
        // Both now have 4 tokens in 2 blocks each; the next decode needs no block.
        assert_eq!(
            step(&mut s).chunks,
            vec![chunk(1, 3, 1, true), chunk(2, 3, 1, true)]
        );
        // Position 4 needs a third block for each: sequence 2 (newest) is preempted.
        let p = step(&mut s);
        assert_eq!(p.preempted, vec![2]);
        assert_eq!(p.chunks, vec![chunk(1, 4, 1, true)]);
        assert_eq!(s.stats().preemptions, 1);
        s.finish(1);
        // Sequence 2 comes back and recomputes its prompt and generated tokens.
        let p = step(&mut s);
        assert_eq!(p.chunks, vec![chunk(2, 0, 5, true)]);
        assert_eq!(s.seq(2).expect("alive").generated(), &[7, 7, 7]);
    }

    #[test]
    fn a_lone_sequence_never_preempts_itself_into_a_loop() {
        let mut s = sched(3, 2, 4, 100);
        s.add(1, vec![1, 2, 3], 6).expect("fits in 3 blocks");
        for _ in 0..4 {
            let p = step(&mut s);
            assert!(p.preempted.is_empty());
            assert_eq!(p.chunks.len(), 1);
        }
        assert_eq!(s.seq(1).expect("alive").tokens.len(), 7);
    }

    #[test]
    fn too_large_requests_are_refused_up_front() {
        let mut s = sched(4, 16, 4, 100);
        let e = s
            .add(1, vec![1; 10], 100)
            .expect_err("100 tokens need 7 blocks");
        assert!(
            matches!(
                e,
                AddError::TooLarge {
                    needed: 7,
                    available: 4,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("--kv-cache-memory"));
        assert_eq!(s.add(2, vec![], 3), Err(AddError::EmptyPrompt));
    }

    #[test]
    fn shared_prefixes_are_reused_and_counted() {
        let mut s = sched(32, 4, 8, 100);
        let prefix: Vec<u32> = (100..112).collect(); // 3 full blocks
        let mut a = prefix.clone();
        a.extend([1, 2]);
        s.add(1, a, 20).expect("fits");
        step(&mut s);
        step(&mut s); // hashes of computed full blocks are committed while planning
        let mut b = prefix.clone();
        b.extend([3, 4, 5]);
        s.add(2, b, 20).expect("fits");
        let p = step(&mut s);
        let c2 = p.chunks.iter().find(|c| c.seq == 2).expect("admitted");
        assert_eq!(
            (c2.start, c2.len),
            (12, 3),
            "12 shared tokens are not recomputed"
        );
        assert_eq!(s.stats().cached_tokens, 12);
        assert_eq!(s.stats().prefill_tokens, 14 + 15);
        let (t1, t2) = (
            s.seq(1).expect("1").block_table().to_vec(),
            s.seq(2).expect("2").block_table().to_vec(),
        );
        assert_eq!(t1[..3], t2[..3], "the prefix blocks are shared");
        assert_ne!(t1[3], t2[3]);
        // A prompt that is entirely cached still computes its last token.
        s.add(3, prefix.clone(), 20).expect("fits");
        let p = step(&mut s);
        let c3 = p.chunks.iter().find(|c| c.seq == 3).expect("admitted");
        assert_eq!((c3.start, c3.len, c3.sample), (8, 4, true));
        for id in 1..=3 {
            s.finish(id);
        }
        s.check_invariants();
        assert_eq!(s.pool().num_free(), 32);
    }

    #[test]
    fn requests_admitted_in_the_same_step_share_a_prefix() {
        let mut s = sched(32, 4, 8, 100);
        let prefix: Vec<u32> = (100..108).collect(); // 2 full blocks
        for (id, tail) in [(1, 1u32), (2, 2), (3, 3)] {
            let mut p = prefix.clone();
            p.extend([tail, tail]);
            s.add(id, p, 20).expect("fits");
        }
        let plan = step(&mut s);
        let starts: Vec<(SeqId, usize, usize)> = plan
            .chunks
            .iter()
            .map(|c| (c.seq, c.start, c.len))
            .collect();
        assert_eq!(starts, vec![(1, 0, 10), (2, 8, 2), (3, 8, 2)]);
        assert_eq!(s.stats().cached_tokens, 16);
    }

    #[test]
    fn nobody_starves_under_steady_arrivals() {
        let mut s = sched(16, 4, 3, 8);
        let mut next_id = 0;
        let mut first_token_at = HashMap::new();
        for t in 0..200 {
            if t % 2 == 0 {
                s.add(next_id, vec![1; 5], 9).expect("fits");
                next_id += 1;
            }
            let plan = step(&mut s);
            for c in plan.chunks.iter().filter(|c| c.sample) {
                first_token_at.entry(c.seq).or_insert(t);
            }
            let done: Vec<SeqId> = plan
                .chunks
                .iter()
                .filter(|c| s.seq(c.seq).is_some_and(|q| q.tokens.len() >= 9))
                .map(|c| c.seq)
                .collect();
            for d in done {
                s.finish(d);
            }
        }
        // Arrivals outpace service here, so the queue grows, but it is served in order.
        let served: Vec<SeqId> = (0..next_id)
            .filter(|id| first_token_at.contains_key(id))
            .collect();
        assert!(served.len() > 20);
        assert_eq!(
            served,
            (0..served.len() as SeqId).collect::<Vec<_>>(),
            "served out of arrival order"
        );
    }
}
