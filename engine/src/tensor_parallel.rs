//! A model on one backend instance, or split over a tensor-parallel group of rank threads.
//!
//! With `--tensor-parallel-size N` (N > 1) the engine's scheduler still runs once; every step is
//! sent to N OS threads, one per rank, each owning its slice of the weights and of the KV cache
//! ([`crate::parallel`]) and talking to the others through an in-process
//! [`ThreadCollective`]. Rank 0 returns the logits. A rank that panics poisons the group, so the
//! others stop at their next collective instead of waiting, and the step returns an error that
//! names the failed rank; the group is then unusable and the engine fails its requests.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::backend::{Backend, CpuBackend};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::llama::{KvCache, Llama, Logits, StepSeq};
use crate::parallel::{plan, Collective, ThreadCollective};
use crate::weights::Checkpoint;

/// The engine's model: whole, or split over rank threads, or scripted (no weights: tests of the
/// engine loop).
#[derive(Debug)]
pub enum Model<B: Backend> {
    Single(Llama<B>),
    Parallel(TpGroup),
    Scripted(ScriptedModel),
}

/// KV memory matching a [`Model`]: in the caller's hands, or inside the rank threads.
#[derive(Debug)]
pub enum ModelKv<B: Backend> {
    Single(KvCache<B>),
    Parallel,
    /// The scripted model's "cache": the token at every slot of every block.
    Scripted {
        tokens: Vec<u32>,
        block_size: usize,
    },
}

/// The next token of a scripted model, from a sequence's whole context.
pub type NextToken = Arc<dyn Fn(&[u32]) -> u32 + Send + Sync>;

/// A model without weights whose greedy next token is a function of the context: the engine's
/// scheduling, paged KV (blocks really hold the tokens, so prefix sharing and preemption are
/// exercised), sampling and finishing rules are tested with it in milliseconds, and with
/// outputs known in advance. Its logits put 10 on the chosen token and 0 elsewhere.
pub struct ScriptedModel {
    pub cfg: ModelConfig,
    pub next: NextToken,
}

impl std::fmt::Debug for ScriptedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptedModel")
            .field("vocab", &self.cfg.vocab_size)
            .finish()
    }
}

impl ScriptedModel {
    fn forward(&self, kv: &mut [u32], block_size: usize, seqs: &[StepSeq<'_>]) -> Vec<Vec<f32>> {
        let vocab = self.cfg.vocab_size;
        let slot = |table: &[u32], pos: usize| {
            table[pos / block_size] as usize * block_size + pos % block_size
        };
        seqs.iter()
            .map(|s| {
                for (i, &t) in s.tokens.iter().enumerate() {
                    kv[slot(s.block_table, s.start + i)] = t;
                }
                let rows: Vec<usize> = match s.logits {
                    Logits::None => Vec::new(),
                    Logits::Last => vec![s.start + s.tokens.len()],
                    Logits::All => (s.start + 1..=s.start + s.tokens.len()).collect(),
                };
                let mut out = Vec::with_capacity(rows.len() * vocab);
                for end in rows {
                    // The context as the cache holds it, not as the caller passed it.
                    let context: Vec<u32> = (0..end).map(|p| kv[slot(s.block_table, p)]).collect();
                    let mut row = vec![0.0; vocab];
                    row[(self.next)(&context) as usize % vocab] = 10.0;
                    out.extend(row);
                }
                out
            })
            .collect()
    }
}

impl<B: Backend> Model<B> {
    pub fn cfg(&self) -> &ModelConfig {
        match self {
            Model::Single(m) => &m.cfg,
            Model::Parallel(g) => &g.cfg,
            Model::Scripted(m) => &m.cfg,
        }
    }

    /// Tensor-parallel degree.
    pub fn world_size(&self) -> usize {
        match self {
            Model::Single(_) | Model::Scripted(_) => 1,
            Model::Parallel(g) => g.world,
        }
    }

    /// Bytes of KV memory one token position takes, summed over the ranks.
    pub fn kv_bytes_per_token(&self) -> usize {
        match self {
            Model::Single(m) => m.kv_bytes_per_token(),
            Model::Parallel(g) => g.kv_bytes_per_token,
            Model::Scripted(_) => std::mem::size_of::<u32>(),
        }
    }

    /// KV bytes that fit on the model's devices next to a step of these limits (`None`: the
    /// model is in host memory, sized by the engine options' `kv_cache_bytes`).
    pub fn device_kv_bytes(
        &self,
        max_num_batched_tokens: usize,
        max_num_seqs: usize,
    ) -> Option<usize> {
        match self {
            Model::Parallel(g) => g.device_kv_bytes(max_num_batched_tokens, max_num_seqs),
            Model::Single(_) | Model::Scripted(_) => None,
        }
    }

    /// Free and total memory of the model's devices after loading (the smallest over the
    /// ranks); `None` in host memory.
    pub fn device_memory(&self) -> Option<(u64, u64)> {
        match self {
            Model::Parallel(g) => g.device_memory(),
            Model::Single(_) | Model::Scripted(_) => None,
        }
    }

    /// Allocates `num_blocks` KV blocks of `block_size` positions (on every rank).
    pub fn kv_cache(&self, num_blocks: usize, block_size: usize) -> Result<ModelKv<B>> {
        match self {
            Model::Single(m) => Ok(ModelKv::Single(m.kv_cache(num_blocks, block_size))),
            Model::Scripted(_) => Ok(ModelKv::Scripted {
                tokens: vec![0; num_blocks * block_size],
                block_size,
            }),
            Model::Parallel(g) => {
                g.run(Job::Kv {
                    num_blocks,
                    block_size,
                })?;
                Ok(ModelKv::Parallel)
            }
        }
    }

    /// Logits at every position of one sequence, computed from scratch in its own cache
    /// (scoring and tests).
    pub fn score(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let block_size = 16;
        let blocks = tokens.len().div_ceil(block_size);
        let mut kv = self.kv_cache(blocks, block_size)?;
        let table: Vec<u32> = (0..blocks as u32).collect();
        let seq = StepSeq {
            tokens,
            start: 0,
            block_table: &table,
            logits: Logits::All,
        };
        Ok(self.forward(&mut kv, &[seq])?.remove(0))
    }

    /// One engine step: the logits each sequence asked for.
    pub fn forward(&self, kv: &mut ModelKv<B>, seqs: &[StepSeq<'_>]) -> Result<Vec<Vec<f32>>> {
        match (self, kv) {
            // The whole step runs on a worker of the rayon pool: each op's parallel loop then
            // splits work with the other workers (kept spinning between ops) instead of handing
            // every op from this thread to the pool and waiting on a lock.
            (Model::Single(m), ModelKv::Single(kv)) => Ok(rayon::scope(|_| m.forward(kv, seqs))),
            (Model::Scripted(m), ModelKv::Scripted { tokens, block_size }) => {
                Ok(m.forward(tokens, *block_size, seqs))
            }
            (Model::Parallel(g), ModelKv::Parallel) => {
                let owned = seqs
                    .iter()
                    .map(|s| OwnedSeq {
                        tokens: s.tokens.to_vec(),
                        start: s.start,
                        block_table: s.block_table.to_vec(),
                        logits: s.logits,
                    })
                    .collect();
                g.run(Job::Step(Arc::new(owned)))
            }
            _ => Err(Error::TensorParallel(
                "KV cache and model do not match (single vs parallel)".into(),
            )),
        }
    }
}

#[derive(Debug)]
struct OwnedSeq {
    tokens: Vec<u32>,
    start: usize,
    block_table: Vec<u32>,
    logits: Logits,
}

#[derive(Debug, Clone)]
enum Job {
    Kv {
        num_blocks: usize,
        block_size: usize,
    },
    Step(Arc<Vec<OwnedSeq>>),
}

type Reply = (usize, std::result::Result<Vec<Vec<f32>>, String>);

/// Rank threads of one tensor-parallel group, each owning its slice of the model and of the KV
/// cache: CPU ranks over an in-process collective, or device ranks (one per GPU, or a single
/// one: a GPU model always runs in its rank thread, where a device error fails the group
/// instead of the process).
#[derive(Debug)]
pub struct TpGroup {
    pub cfg: ModelConfig,
    pub world: usize,
    kv_bytes_per_token: usize,
    /// The smallest free and total memory of the ranks' devices, after loading (`None`: host).
    device_memory: Option<(u64, u64)>,
    /// The fraction of each device the engine may use (vLLM's `--gpu-memory-utilization`).
    memory_utilization: f32,
    jobs: Vec<Sender<Job>>,
    replies: Mutex<Receiver<Reply>>,
    threads: Vec<JoinHandle<()>>,
    /// Set once a rank failed: the group cannot run another step.
    failed: Mutex<Option<String>>,
}

/// How one rank thread of a [`TpGroup`] gets its model.
pub struct RankSpec<B: Backend> {
    /// The rank's end of the group's collective.
    pub collective: Arc<dyn Collective>,
    /// Tells the other ranks this one failed (so none waits for it forever).
    pub poison: Box<dyn Fn(String) + Send>,
    /// Loads the rank's slice of the checkpoint, in the rank thread.
    #[allow(clippy::type_complexity)]
    pub load: Box<dyn FnOnce(&Checkpoint, Arc<dyn Collective>) -> Result<Llama<B>> + Send>,
}

impl<B: Backend> std::fmt::Debug for RankSpec<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RankSpec")
            .field("rank", &self.collective.rank())
            .finish_non_exhaustive()
    }
}

/// What a rank reports once loaded: its KV bytes per token and its device's memory.
type Ready = (
    usize,
    std::result::Result<(usize, Option<(u64, u64)>), String>,
);

impl TpGroup {
    /// Loads a checkpoint split over `world` CPU rank threads. Fails early, naming the
    /// dimension, if the model does not split that way.
    pub fn load(path: &Path, world: usize, backend: CpuBackend) -> Result<Self> {
        let cfg = Checkpoint::open(path)?.config()?;
        for r in 0..world {
            plan(&cfg, r, world).map_err(Error::TensorParallel)?;
        }
        let ranks = ThreadCollective::group(world)
            .into_iter()
            .map(|c| {
                let poisoner = c.clone();
                RankSpec {
                    collective: Arc::new(c),
                    poison: Box::new(move |why| poisoner.poison(why)),
                    load: Box::new(move |ckpt: &Checkpoint, c: Arc<dyn Collective>| {
                        Llama::load_rank(ckpt, backend, c)
                    }),
                }
            })
            .collect();
        Self::start(path, ranks, 1.0)
    }

    /// Starts one thread per rank of `ranks` (in rank order), each loading its model from
    /// `path`; returns once all have loaded, or the first load error.
    pub fn start<B: Backend + 'static>(
        path: &Path,
        ranks: Vec<RankSpec<B>>,
        memory_utilization: f32,
    ) -> Result<Self> {
        let cfg = Checkpoint::open(path)?.config()?;
        let world = ranks.len();
        let (reply_tx, replies) = channel::<Reply>();
        let (ready_tx, ready) = channel::<Ready>();
        let mut jobs = Vec::new();
        let mut threads = Vec::new();
        for spec in ranks {
            let (tx, rx) = channel::<Job>();
            jobs.push(tx);
            let (path, reply_tx, ready_tx) =
                (path.to_path_buf(), reply_tx.clone(), ready_tx.clone());
            let rank = spec.collective.rank();
            let handle = std::thread::Builder::new()
                .name(format!("tp-rank-{rank}"))
                .spawn(move || rank_main(path, spec, rx, reply_tx, ready_tx))
                .map_err(|e| Error::TensorParallel(format!("cannot start rank {rank}: {e}")))?;
            threads.push(handle);
        }
        drop(ready_tx);
        let mut kv_bytes_per_token = 0;
        let mut device_memory: Option<(u64, u64)> = None;
        let mut group = Self {
            cfg,
            world,
            kv_bytes_per_token: 0,
            device_memory: None,
            memory_utilization,
            jobs,
            replies: Mutex::new(replies),
            threads,
            failed: Mutex::new(None),
        };
        for _ in 0..world {
            match ready.recv() {
                Ok((_, Ok((kv, memory)))) => {
                    kv_bytes_per_token += kv;
                    if let Some((free, total)) = memory {
                        let (f, t) = device_memory.unwrap_or((u64::MAX, u64::MAX));
                        device_memory = Some((f.min(free), t.min(total)));
                    }
                }
                // Dropping the group closes the job channels and joins the threads.
                Ok((rank, Err(e))) => {
                    return Err(Error::TensorParallel(format!(
                        "rank {rank} failed to load: {e}"
                    )))
                }
                Err(_) => return Err(Error::TensorParallel("a rank exited while loading".into())),
            }
        }
        group.kv_bytes_per_token = kv_bytes_per_token;
        group.device_memory = device_memory;
        Ok(group)
    }

    /// Bytes of KV cache the ranks' devices can hold after the weights, at the group's
    /// memory utilisation, keeping room for one step's activations (`None` on the host).
    pub fn device_kv_bytes(
        &self,
        max_num_batched_tokens: usize,
        max_num_seqs: usize,
    ) -> Option<usize> {
        let (free, total) = self.device_memory?;
        let cfg = &self.cfg;
        // One step's largest buffers in bf16 (hidden states, q/k/v, the MLP's gate and up, the
        // logits of every sequence), twice over for buffers alive at once.
        let activations = 2
            * 2
            * (max_num_batched_tokens * (6 * cfg.hidden_size + 3 * cfg.intermediate_size)
                + max_num_seqs * cfg.vocab_size * 2) as u64;
        let held_back =
            ((1.0 - f64::from(self.memory_utilization.clamp(0.0, 1.0))) * total as f64) as u64;
        let per_rank = free.saturating_sub(held_back).saturating_sub(activations);
        Some((per_rank as usize).saturating_mul(self.world))
    }

    /// The smallest free and total memory of the ranks' devices after loading.
    pub fn device_memory(&self) -> Option<(u64, u64)> {
        self.device_memory
    }

    /// Sends a job to every rank and waits for all of them; rank 0's logits come back.
    fn run(&self, job: Job) -> Result<Vec<Vec<f32>>> {
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = failed.as_ref() {
            return Err(Error::TensorParallel(why.clone()));
        }
        let replies = self.replies.lock().unwrap_or_else(|p| p.into_inner());
        for (rank, tx) in self.jobs.iter().enumerate() {
            if tx.send(job.clone()).is_err() {
                let why = format!("rank {rank} has exited");
                *failed = Some(why.clone());
                return Err(Error::TensorParallel(why));
            }
        }
        let mut logits = Vec::new();
        let mut first_error: Option<(usize, String)> = None;
        for _ in 0..self.world {
            match replies.recv() {
                Ok((0, Ok(l))) => logits = l,
                Ok((_, Ok(_))) => {}
                Ok((rank, Err(e))) => {
                    // The rank that failed first explains; the others only saw its poison.
                    let secondary = e.contains("another rank failed");
                    if first_error
                        .as_ref()
                        .is_none_or(|(_, f)| f.contains("another rank failed") && !secondary)
                    {
                        first_error = Some((rank, e));
                    }
                }
                Err(_) => {
                    first_error.get_or_insert((usize::MAX, "a rank thread exited".into()));
                    break;
                }
            }
        }
        if let Some((rank, e)) = first_error {
            let why = if rank == usize::MAX {
                e
            } else {
                format!("rank {rank} failed: {e}")
            };
            *failed = Some(why.clone());
            return Err(Error::TensorParallel(why));
        }
        Ok(logits)
    }
}

impl Drop for TpGroup {
    fn drop(&mut self) {
        // Closing the job channels ends the rank loops.
        self.jobs.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn panic_text(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panicked".into())
}

fn rank_main<B: Backend + 'static>(
    path: std::path::PathBuf,
    spec: RankSpec<B>,
    jobs: Receiver<Job>,
    replies: Sender<Reply>,
    ready: Sender<Ready>,
) {
    let RankSpec {
        collective: c,
        poison,
        load,
    } = spec;
    let rank = c.rank();
    // A panic while loading (a device error) fails the load like an error does.
    let loaded = catch_unwind(AssertUnwindSafe(|| {
        Checkpoint::open(&path).and_then(|ckpt| load(&ckpt, c.clone()))
    }))
    .unwrap_or_else(|e| Err(Error::TensorParallel(panic_text(e.as_ref()))));
    let model = match loaded {
        Ok(m) => {
            let _ = ready.send((rank, Ok((m.kv_bytes_per_token(), m.device_memory()))));
            m
        }
        Err(e) => {
            poison(format!("rank {rank} failed to load: {e}"));
            let _ = ready.send((rank, Err(e.to_string())));
            return;
        }
    };
    drop(ready);
    let mut kv: Option<KvCache<B>> = None;
    for job in jobs {
        let result = catch_unwind(AssertUnwindSafe(|| match &job {
            Job::Kv {
                num_blocks,
                block_size,
            } => {
                kv = Some(model.kv_cache(*num_blocks, *block_size));
                Vec::new()
            }
            Job::Step(seqs) => {
                let Some(kv) = kv.as_mut() else {
                    panic!("step before the KV cache was allocated");
                };
                let steps: Vec<StepSeq<'_>> = seqs
                    .iter()
                    .map(|s| StepSeq {
                        tokens: &s.tokens,
                        start: s.start,
                        block_table: &s.block_table,
                        logits: s.logits,
                    })
                    .collect();
                let logits = model.forward(kv, &steps);
                if rank == 0 {
                    logits
                } else {
                    Vec::new()
                }
            }
        }));
        let reply = match result {
            Ok(l) => Ok(l),
            Err(e) => {
                let why = panic_text(e.as_ref());
                poison(format!("rank {rank}: {why}"));
                Err(why)
            }
        };
        let failed = reply.is_err();
        if replies.send((rank, reply)).is_err() || failed {
            return;
        }
    }
}

/// Loads a model whole (`world` 1) or split over `world` rank threads.
pub fn load_model(path: &Path, world: usize, backend: CpuBackend) -> Result<Model<CpuBackend>> {
    if world <= 1 {
        let ckpt = Checkpoint::open(path)?;
        Ok(Model::Single(Llama::load(&ckpt, backend)?))
    } else {
        Ok(Model::Parallel(TpGroup::load(path, world, backend)?))
    }
}
