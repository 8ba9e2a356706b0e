//! The Gristmill engine: checkpoint readers (GGUF, safetensors), tokenizer and chat templates,
//! the Llama-family model over a compute [`backend::Backend`], the per-request sampler and the
//! continuously batching [`engine::Engine`].

pub mod backend;
pub mod config;
pub mod engine;
pub mod error;
pub mod gpu;
pub mod kv_cache;
pub mod model;
pub mod parallel;
pub mod response;
pub mod sampler;
pub mod scheduler;
pub mod spm;
pub mod tensor_parallel;
pub mod tokenizer;
pub mod weights;

pub use backend::{CpuBackend, KvCacheDtype, Precision};
pub use engine::{load_tokenizer, Completion, Engine, EngineOptions, Outcome, RunStats};
pub use error::{Error, Result};
/// The instruction set of the CPU kernels on this machine (chosen at run time).
pub use gristmill_kernels::cpu::isa as cpu_isa;

/// Where models live (the cache folder; the default model; `$GRISTMILL_MODEL`).
pub use gristmill_protocol::{cache_dir, default_model_path, model_path_from_env};
