//! The Gristmill engine: checkpoint readers (GGUF, safetensors), tokenizer and chat templates,
//! the Llama-family model over a compute [`backend::Backend`], the per-request sampler and the
//! continuously batching [`engine::Engine`].

pub mod backend;
pub mod config;
pub mod engine;
pub mod error;
pub mod kv_cache;
pub mod model;
pub mod parallel;
pub mod response;
pub mod sampler;
pub mod scheduler;
pub mod tensor_parallel;
pub mod tokenizer;
pub mod weights;

pub use engine::{load_tokenizer, Completion, Engine, EngineOptions, Outcome, RunStats};
pub use error::{Error, Result};
/// The instruction set of the CPU kernels on this machine (chosen at run time).
pub use gristmill_kernels::cpu::isa as cpu_isa;

use std::path::PathBuf;

/// The cache folder: `$GRISTMILL_CACHE_DIR`, else `$HOME/.cache/gristmill`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os(gristmill_protocol::ENV_CACHE_DIR) {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("gristmill")
}

/// Where the default model lives once `scripts/fetch-model.sh` has run.
pub fn default_model_path() -> PathBuf {
    cache_dir()
        .join("models")
        .join(gristmill_protocol::DEFAULT_MODEL_FILE)
}

/// The model named by `$GRISTMILL_MODEL`, else the default model's path (which may not exist).
pub fn model_path_from_env() -> PathBuf {
    std::env::var_os("GRISTMILL_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(default_model_path)
}
