//! Tensor parallelism: the [`Collective`] ranks talk through, and the split plan that says which
//! slice of every weight a rank holds.
//!
//! Megatron-style: q/k/v and gate/up are split by output rows (heads, FFN columns), o_proj and
//! down by input columns, each followed by an all-reduce; the embedding and lm_head are split by
//! vocabulary rows (the embedding's partial rows are summed, the logits gathered). KV heads are
//! split like the query heads, or replicated when the degree exceeds them.
//!
//! Failure rule: a rank that fails poisons its group; every collective call on the group then
//! panics with the reason instead of waiting forever, and the rank threads' owner turns that into
//! an error (see [`crate::tensor_parallel`]).

use std::sync::{Arc, Condvar, Mutex};

use crate::config::ModelConfig;

#[cfg(feature = "cuda")]
pub mod nccl;

/// Communication among the ranks of one tensor-parallel group. Every rank calls the same
/// operations in the same order.
pub trait Collective: Send + Sync + std::fmt::Debug {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Element-wise sum over the ranks, in rank order (deterministic), into every rank's `buf`.
    fn all_reduce_sum(&self, buf: &mut [f32]);
    /// Every rank's `local` (equal lengths) concatenated in rank order, on every rank.
    fn all_gather(&self, local: &[f32]) -> Vec<f32>;
    /// `root`'s `buf` into every rank's `buf`.
    fn broadcast(&self, buf: &mut [f32], root: usize);
    /// Returns once every rank has called it.
    fn barrier(&self);
}

/// World size 1: every operation is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct Local;

impl Collective for Local {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) {}
    fn all_gather(&self, local: &[f32]) -> Vec<f32> {
        local.to_vec()
    }
    fn broadcast(&self, _buf: &mut [f32], _root: usize) {}
    fn barrier(&self) {}
}

#[derive(Debug)]
struct Round {
    generation: u64,
    arrived: usize,
    slots: Vec<Vec<f32>>,
    result: Arc<Vec<Vec<f32>>>,
    poisoned: Option<String>,
}

#[derive(Debug)]
struct Group {
    size: usize,
    round: Mutex<Round>,
    wake: Condvar,
}

/// One rank of an in-process group: one thread per rank, shared memory. Every operation is an
/// exchange of each rank's contribution; reductions add the contributions in rank order, so all
/// ranks get bit-identical results whatever the thread timing.
#[derive(Debug, Clone)]
pub struct ThreadCollective {
    rank: usize,
    group: Arc<Group>,
}

impl ThreadCollective {
    /// The `size` ranks of a new group, rank 0 first.
    pub fn group(size: usize) -> Vec<ThreadCollective> {
        let size = size.max(1);
        let group = Arc::new(Group {
            size,
            round: Mutex::new(Round {
                generation: 0,
                arrived: 0,
                slots: vec![Vec::new(); size],
                result: Arc::new(Vec::new()),
                poisoned: None,
            }),
            wake: Condvar::new(),
        });
        (0..size)
            .map(|rank| ThreadCollective {
                rank,
                group: group.clone(),
            })
            .collect()
    }

    /// Marks the group failed: ranks waiting in (or later entering) a collective panic with
    /// `why` instead of waiting for a rank that will not come.
    pub fn poison(&self, why: String) {
        let mut r = self.lock();
        r.poisoned.get_or_insert(why);
        self.group.wake.notify_all();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Round> {
        // A rank that panicked while holding the lock leaves consistent data (every update is
        // a single assignment); keep going and let the poison flag speak.
        self.group.round.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check(&self, r: &Round) {
        if let Some(why) = &r.poisoned {
            panic!(
                "tensor-parallel rank {} stopped: another rank failed: {why}",
                self.rank
            );
        }
    }

    /// Every rank's contribution, in rank order.
    fn exchange(&self, mine: Vec<f32>) -> Arc<Vec<Vec<f32>>> {
        let mut r = self.lock();
        self.check(&r);
        let generation = r.generation;
        r.slots[self.rank] = mine;
        r.arrived += 1;
        if r.arrived == self.group.size {
            let all = std::mem::replace(&mut r.slots, vec![Vec::new(); self.group.size]);
            r.result = Arc::new(all);
            r.arrived = 0;
            r.generation += 1;
            self.group.wake.notify_all();
            return r.result.clone();
        }
        while r.generation == generation {
            self.check(&r);
            r = self.group.wake.wait(r).unwrap_or_else(|p| p.into_inner());
        }
        // The next round cannot finish before this rank joins it, so `result` is still ours.
        r.result.clone()
    }
}

impl Collective for ThreadCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.group.size
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) {
        let all = self.exchange(buf.to_vec());
        buf.copy_from_slice(&all[0]);
        for part in &all[1..] {
            for (b, p) in buf.iter_mut().zip(part) {
                *b += p;
            }
        }
    }

    fn all_gather(&self, local: &[f32]) -> Vec<f32> {
        self.exchange(local.to_vec()).concat()
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) {
        let mine = if self.rank == root {
            buf.to_vec()
        } else {
            Vec::new()
        };
        let all = self.exchange(mine);
        buf.copy_from_slice(&all[root]);
    }

    fn barrier(&self) {
        self.exchange(Vec::new());
    }
}

/// How a model splits over `world` ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TpPlan {
    pub rank: usize,
    pub world: usize,
    /// Query heads of this rank: `heads_start .. heads_start + heads`.
    pub heads_start: usize,
    pub heads: usize,
    /// KV heads of this rank.
    pub kv_heads_start: usize,
    pub kv_heads: usize,
    /// FFN columns of this rank.
    pub ffn_start: usize,
    pub ffn: usize,
    /// Vocabulary rows of this rank (embedding and lm_head).
    pub vocab_start: usize,
    pub vocab: usize,
}

/// Degrees from 1 to `limit` that split every dimension of `cfg`.
pub fn valid_degrees(cfg: &ModelConfig, limit: usize) -> Vec<usize> {
    (1..=limit).filter(|&w| check(cfg, w).is_ok()).collect()
}

fn check(cfg: &ModelConfig, world: usize) -> Result<(), String> {
    let (h, kv) = (cfg.num_heads, cfg.num_kv_heads);
    if world == 0 {
        return Err("the tensor-parallel size must be at least 1".into());
    }
    if !h.is_multiple_of(world) {
        return Err(format!(
            "num_attention_heads = {h} is not divisible by {world}"
        ));
    }
    if kv >= world && !kv.is_multiple_of(world) {
        return Err(format!(
            "num_key_value_heads = {kv} is not divisible by {world}"
        ));
    }
    if kv < world && !world.is_multiple_of(kv.max(1)) {
        return Err(format!(
            "num_key_value_heads = {kv} cannot be replicated evenly over {world} ranks ({world} is not a multiple of {kv})"
        ));
    }
    if !cfg.intermediate_size.is_multiple_of(world) {
        return Err(format!(
            "intermediate_size = {} is not divisible by {world}",
            cfg.intermediate_size
        ));
    }
    if !cfg.vocab_size.is_multiple_of(world) {
        return Err(format!(
            "vocab_size = {} is not divisible by {world}",
            cfg.vocab_size
        ));
    }
    Ok(())
}

/// The split of rank `rank` of `world`, or an error naming the dimension that does not divide
/// and the degrees that would work.
pub fn plan(cfg: &ModelConfig, rank: usize, world: usize) -> Result<TpPlan, String> {
    if let Err(why) = check(cfg, world) {
        let limit = cfg.num_heads.max(1);
        let ok: Vec<String> = valid_degrees(cfg, limit)
            .iter()
            .map(|d| d.to_string())
            .collect();
        return Err(format!(
            "cannot split the model over {world} tensor-parallel ranks: {why}; sizes that work for this model: {}",
            ok.join(", ")
        ));
    }
    let heads = cfg.num_heads / world;
    let (kv_heads_start, kv_heads) = if cfg.num_kv_heads >= world {
        let n = cfg.num_kv_heads / world;
        (rank * n, n)
    } else {
        // Replicated: the KV head that this rank's query heads read.
        let group = cfg.num_heads / cfg.num_kv_heads;
        (rank * heads / group, 1)
    };
    let ffn = cfg.intermediate_size / world;
    let vocab = cfg.vocab_size / world;
    Ok(TpPlan {
        rank,
        world,
        heads_start: rank * heads,
        heads,
        kv_heads_start,
        kv_heads,
        ffn_start: rank * ffn,
        ffn,
        vocab_start: rank * vocab,
        vocab,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(heads: usize, kv: usize, ffn: usize, vocab: usize) -> ModelConfig {
        ModelConfig {
            architecture: "llama".into(),
            hidden_size: heads * 64,
            intermediate_size: ffn,
            num_layers: 2,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim: 64,
            vocab_size: vocab,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            longrope: None,
            max_position_embeddings: 2048,
            tie_word_embeddings: true,
            attention_bias: false,
            qk_norm: false,
            fused_projections: false,
            gemma3: None,
        }
    }

    #[test]
    fn thread_collective_is_deterministic_and_in_rank_order() {
        for world in [1, 2, 3, 4] {
            let ranks = ThreadCollective::group(world);
            let handles: Vec<_> = ranks
                .into_iter()
                .map(|c| {
                    std::thread::spawn(move || {
                        let r = c.rank() as f32;
                        let mut out = Vec::new();
                        for step in 0..50 {
                            // Values whose float sum depends on the order.
                            let mut buf = vec![1e8 * (r - 1.0) + step as f32, 0.1 * r, -r];
                            c.all_reduce_sum(&mut buf);
                            out.push(buf);
                            out.push(c.all_gather(&[r, r + 0.5]));
                            let mut b = vec![r; 2];
                            c.broadcast(&mut b, world - 1);
                            out.push(b);
                            c.barrier();
                        }
                        out
                    })
                })
                .collect();
            let results: Vec<Vec<Vec<f32>>> = handles
                .into_iter()
                .map(|h| h.join().expect("rank thread"))
                .collect();
            for r in &results {
                assert_eq!(r, &results[0], "ranks disagree at world {world}");
            }
            // Reference: the same sums in rank order on one thread.
            for step in 0..50 {
                let mut want = vec![0f32; 3];
                for k in 0..world {
                    let k = k as f32;
                    let part = [1e8 * (k - 1.0) + step as f32, 0.1 * k, -k];
                    for (w, p) in want.iter_mut().zip(part) {
                        if k == 0.0 {
                            *w = p;
                        } else {
                            *w += p;
                        }
                    }
                }
                assert_eq!(results[0][step * 3], want);
                let gathered: Vec<f32> = (0..world)
                    .flat_map(|k| [k as f32, k as f32 + 0.5])
                    .collect();
                assert_eq!(results[0][step * 3 + 1], gathered);
                assert_eq!(results[0][step * 3 + 2], vec![(world - 1) as f32; 2]);
            }
        }
    }

    #[test]
    fn a_failed_rank_stops_the_others_instead_of_hanging() {
        let mut ranks = ThreadCollective::group(3);
        let failing = ranks.pop().expect("rank 2");
        let waiting: Vec<_> = ranks
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || {
                    let mut buf = vec![1.0];
                    c.all_reduce_sum(&mut buf);
                })
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(50));
        failing.poison("rank 2 ran out of memory".into());
        for h in waiting {
            let err = h.join().expect_err("a waiting rank must stop");
            let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
            assert!(msg.contains("rank 2 ran out of memory"), "{msg}");
        }
    }

    #[test]
    fn plans_split_heads_kv_heads_ffn_and_vocab() {
        // The default model: 9 heads, 3 KV heads, FFN 1536, vocab 49152.
        let smol = cfg(9, 3, 1536, 49152);
        let p = plan(&smol, 2, 3).expect("TP 3 divides");
        assert_eq!(
            (p.heads_start, p.heads, p.kv_heads_start, p.kv_heads),
            (6, 3, 2, 1)
        );
        assert_eq!(
            (p.ffn_start, p.ffn, p.vocab_start, p.vocab),
            (1024, 512, 32768, 16384)
        );
        assert_eq!(valid_degrees(&smol, 9), vec![1, 3]);
        let err = plan(&smol, 0, 2).expect_err("9 heads over 2");
        assert!(
            err.contains("num_attention_heads = 9 is not divisible by 2"),
            "{err}"
        );
        assert!(
            err.contains("sizes that work for this model: 1, 3"),
            "{err}"
        );
        // KV heads replicated when the degree exceeds them: 8 heads, 2 KV heads, TP 4.
        let small = cfg(8, 2, 64, 256);
        let kv: Vec<(usize, usize)> = (0..4)
            .map(|r| {
                let p = plan(&small, r, 4).expect("divides");
                (p.kv_heads_start, p.kv_heads)
            })
            .collect();
        assert_eq!(kv, vec![(0, 1), (0, 1), (1, 1), (1, 1)]);
        let err = plan(&cfg(8, 2, 60, 256), 0, 8).expect_err("ffn 60 over 8");
        assert!(err.contains("intermediate_size = 60"), "{err}");
        let err = plan(&cfg(6, 4, 60, 256), 0, 3).expect_err("kv 4 over 3");
        assert!(err.contains("num_key_value_heads = 4"), "{err}");
    }
}
