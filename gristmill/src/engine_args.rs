//! Engine flags shared by the subcommands that run a model (`run`, `bench throughput`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use gristmill_engine::gpu::DeviceChoice;
use gristmill_engine::EngineOptions;

#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// A GGUF file, an HF directory with config.json, safetensors weights and tokenizer.json, or
    /// a Hugging Face id: `org/name` (an HF checkpoint) or `org/name:file.gguf` (one GGUF file),
    /// taken from the Hugging Face cache ($HF_HOME/hub, else ~/.cache/huggingface/hub) or
    /// downloaded into it (HF_TOKEN authenticates; HF_HUB_OFFLINE=1 forbids downloads). The
    /// default is the default model under $GRISTMILL_CACHE_DIR (else ~/.cache/gristmill),
    /// fetched by `make model`.
    #[arg(short, long, env = "GRISTMILL_MODEL",
          default_value_os_t = gristmill_engine::default_model_path())]
    pub model: PathBuf,

    /// Most sequences generated at once.
    #[arg(long, default_value_t = 64, env = "GRISTMILL_MAX_NUM_SEQS")]
    pub max_num_seqs: usize,

    /// Most tokens (prompt chunks and decode tokens together) in one engine step.
    #[arg(long, default_value_t = 2048, env = "GRISTMILL_MAX_NUM_BATCHED_TOKENS")]
    pub max_num_batched_tokens: usize,

    /// KV cache memory: bytes with an optional unit (`2GiB`, `512MiB`, `1e9`), or a fraction of
    /// this machine's RAM (`0.1`).
    #[arg(long, default_value = "2GiB", env = "GRISTMILL_KV_CACHE_MEMORY")]
    pub kv_cache_memory: String,

    /// Token positions per KV cache block.
    #[arg(long, default_value_t = 16, env = "GRISTMILL_BLOCK_SIZE")]
    pub block_size: usize,

    /// Do not reuse the KV cache of earlier requests that share a prompt prefix.
    #[arg(long, env = "GRISTMILL_NO_PREFIX_CACHING")]
    pub no_prefix_caching: bool,

    /// Compute threads [default: all cores].
    #[arg(long, env = "GRISTMILL_THREADS")]
    pub threads: Option<usize>,

    /// Split the model over this many ranks (Megatron-style tensor parallelism; one thread per
    /// rank on the CPU). Must divide the model's heads, FFN and vocabulary; an impossible size
    /// gets an error listing those that work.
    #[arg(long, default_value_t = 1, env = "GRISTMILL_TENSOR_PARALLEL_SIZE")]
    pub tensor_parallel_size: usize,

    /// How the model computes. `fast`: activations quantised per 32 values to int8 in two passes
    /// (about 15 bits), integer dot products against the quantised weight blocks with kernels
    /// chosen for this CPU (AVX-512 VNNI, AVX-512BW, AVX2 or portable), a vectorised exp;
    /// weights that are not quantised stay f32. `exact`: f32 throughout, HF transformers' results
    /// up to near-ties. Both give a request the same tokens whatever it is batched with (see
    /// docs/concepts.md on other machines).
    #[arg(long, default_value = "fast", env = "GRISTMILL_PRECISION",
          value_parser = clap::builder::TypedValueParser::map(
              clap::builder::PossibleValuesParser::new(["fast", "exact"]),
              // Only the listed values reach here, and both parse.
              |s| s.parse::<gristmill_engine::Precision>().unwrap_or_default()))]
    pub precision: gristmill_engine::Precision,

    /// The value type of cached keys and values: `f16` halves the KV memory (twice the
    /// sequences in the same --kv-cache-memory) and the attention's memory traffic, `f32` keeps
    /// them exact. `auto`: f16 at --precision fast, f32 at exact.
    #[arg(long, default_value = "auto", env = "GRISTMILL_KV_CACHE_DTYPE",
          value_parser = clap::builder::TypedValueParser::map(
              clap::builder::PossibleValuesParser::new(["auto", "f32", "f16"]),
              // Only the listed values reach here, and all of them parse.
              |s| s.parse::<gristmill_engine::KvCacheDtype>().unwrap_or_default()))]
    pub kv_cache_dtype: gristmill_engine::KvCacheDtype,

    /// Where the model computes: `cpu`; `cuda` (GPU 0, or GPUs 0..N with
    /// --tensor-parallel-size N over NCCL); `cuda:N` (GPU N alone); `auto`: cuda when this
    /// build has CUDA support (`--features cuda`, the GPU worker image) and the machine a GPU,
    /// else cpu. The choice is logged at start. On a GPU, weights, activations and the KV cache
    /// are bf16 and --precision and --kv-cache-dtype do not apply.
    #[arg(long, default_value = "auto", env = "GRISTMILL_DEVICE")]
    pub device: gristmill_engine::gpu::DeviceChoice,

    /// The fraction of each GPU's memory the engine may use (vLLM's flag): the KV cache gets
    /// what the weights and one step's activations leave of it. Used with --device cuda only;
    /// on the CPU --kv-cache-memory sizes the cache.
    #[arg(long, default_value_t = 0.9, env = "GRISTMILL_GPU_MEMORY_UTILIZATION")]
    pub gpu_memory_utilization: f32,

    /// `auto`: the model's own weights. `dummy`: made-up weights in the shapes of the HF
    /// directory's config.json (which needs only config.json and tokenizer.json): benchmarks of
    /// a model's shape without downloading it (vLLM's flag). Its outputs mean nothing.
    #[arg(long, value_enum, default_value_t = LoadFormat::Auto, env = "GRISTMILL_LOAD_FORMAT")]
    pub load_format: LoadFormat,
}

/// Where the weights come from (`--load-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LoadFormat {
    Auto,
    Dummy,
}

impl EngineArgs {
    /// `--device` with `auto` decided: the CPU, or a CUDA GPU (an ordinal when one was named).
    pub fn device(&self) -> DeviceChoice {
        match self.device {
            DeviceChoice::Auto if gristmill_engine::gpu::cuda_device_count() > 0 => {
                DeviceChoice::Cuda(None)
            }
            DeviceChoice::Auto => DeviceChoice::Cpu,
            d => d,
        }
    }

    /// Loads the model (`--model`, or the default one) on `--device` at
    /// `--tensor-parallel-size`.
    pub fn load_engine(&self) -> Result<gristmill_engine::Engine> {
        if self.tensor_parallel_size == 0 {
            bail!("--tensor-parallel-size must be at least 1");
        }
        if !(self.gpu_memory_utilization > 0.0 && self.gpu_memory_utilization <= 1.0) {
            bail!(
                "--gpu-memory-utilization must be in (0, 1], not {}",
                self.gpu_memory_utilization
            );
        }
        let mut path = crate::hub::resolve_model(&self.model)?;
        if self.load_format == LoadFormat::Dummy {
            if !path.join("config.json").is_file() {
                bail!(
                    "--load-format dummy needs an HF directory with config.json (and \
                     tokenizer.json); {} is not one",
                    path.display()
                );
            }
            tracing::warn!("--load-format dummy: made-up weights, outputs mean nothing");
            path = gristmill_engine::weights::dummy_path(&path);
        }
        let device = self.device();
        tracing::info!(device = %device, requested = %self.device, "computing on {device}");
        let loaded = match device {
            DeviceChoice::Cuda(ordinal) => {
                if ordinal.is_some() && self.tensor_parallel_size > 1 {
                    bail!(
                        "--device {device} names one GPU; with --tensor-parallel-size {} use \
                         --device cuda (GPUs 0..{})",
                        self.tensor_parallel_size,
                        self.tensor_parallel_size
                    );
                }
                self.load_cuda(&path, ordinal.unwrap_or(0))
            }
            _ => gristmill_engine::Engine::load_parallel(
                &path,
                self.tensor_parallel_size,
                self.backend(),
            ),
        };
        loaded
            .with_context(|| format!("cannot load the model {} on {device}", self.model.display()))
    }

    #[cfg(feature = "cuda")]
    fn load_cuda(
        &self,
        path: &std::path::Path,
        ordinal: usize,
    ) -> gristmill_engine::Result<gristmill_engine::Engine> {
        gristmill_engine::gpu::cuda::load_engine(
            path,
            ordinal,
            self.tensor_parallel_size,
            self.gpu_memory_utilization,
        )
    }

    #[cfg(not(feature = "cuda"))]
    fn load_cuda(
        &self,
        _path: &std::path::Path,
        _ordinal: usize,
    ) -> gristmill_engine::Result<gristmill_engine::Engine> {
        Err(gristmill_engine::Error::Device(format!(
            "--device {} needs a build with CUDA support: `cargo build --release --features \
             cuda` (k8s/Dockerfile.worker builds the GPU worker that way); this one computes on \
             the CPU only (--device cpu)",
            self.device
        )))
    }

    /// The CPU backend's settings from the flags.
    pub fn backend(&self) -> gristmill_engine::CpuBackend {
        gristmill_engine::CpuBackend {
            precision: self.precision,
            kv_cache_dtype: self.kv_cache_dtype,
        }
    }

    /// One line about a loaded engine: the model, its shape, the process's memory and the CPU
    /// kernels chosen for this machine.
    pub fn describe(&self, engine: &gristmill_engine::Engine, load_secs: f64) -> String {
        let cfg = engine.model.cfg();
        let rss_mb = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map_or_else(|| "?".to_string(), |kb| (kb / 1024).to_string());
        if let Some((free, total)) = engine.model.device_memory() {
            return format!(
                "loaded {} ({} {} layers, {} heads, vocab {}) in {load_secs:.1} s on {} \
                 (bf16, tensor parallel {}); device memory {} of {} MB free after the weights; \
                 KV cache {} KB per token (bf16)",
                self.model.display(),
                cfg.architecture,
                cfg.num_layers,
                cfg.num_heads,
                cfg.vocab_size,
                self.device(),
                engine.model.world_size(),
                free >> 20,
                total >> 20,
                engine.model.kv_bytes_per_token().div_ceil(1024),
            );
        }
        format!(
            "loaded {} ({} {} layers, {} heads, vocab {}) in {load_secs:.1} s; weights {} MB, KV cache {} KB \
             per token ({}); process memory {rss_mb} MB; precision {}, CPU kernels {}, {} threads",
            self.model.display(),
            cfg.architecture,
            cfg.num_layers,
            cfg.num_heads,
            cfg.vocab_size,
            engine.weight_bytes >> 20,
            engine.model.kv_bytes_per_token().div_ceil(1024),
            self.backend().kv_value_name(),
            if self.precision == gristmill_engine::Precision::Fast
                && !self.precision.int8_matmuls()
            {
                "fast (f32 matmuls: no AVX-512 VNNI)".to_string()
            } else {
                self.precision.to_string()
            },
            gristmill_engine::cpu_isa(),
            rayon::current_num_threads(),
        )
    }

    /// Checks the flags, sets up the thread pool (once per process) and returns the engine
    /// options.
    pub fn options(&self) -> Result<EngineOptions> {
        if let Some(n) = self.threads {
            if n == 0 {
                bail!("--threads must be at least 1");
            }
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build_global()
                .context("cannot set up the thread pool")?;
        }
        self.options_no_pool()
    }

    /// The engine options, without touching the thread pool.
    pub fn options_no_pool(&self) -> Result<EngineOptions> {
        if self.max_num_seqs == 0 || self.max_num_batched_tokens == 0 || self.block_size == 0 {
            bail!("--max-num-seqs, --max-num-batched-tokens and --block-size must be at least 1");
        }
        Ok(EngineOptions {
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            kv_cache_bytes: parse_memory(&self.kv_cache_memory, total_memory())
                .with_context(|| format!("--kv-cache-memory {:?}", self.kv_cache_memory))?,
            block_size: self.block_size,
            enable_prefix_caching: !self.no_prefix_caching,
        })
    }
}

/// This machine's RAM in bytes (from /proc/meminfo), if known.
fn total_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Parses `2GiB`, `512MB`, `1e9` or a fraction of `total` such as `0.1`.
pub fn parse_memory(text: &str, total: Option<u64>) -> Result<usize> {
    let t = text.trim();
    // The number ends at the first letter that is not an exponent's `e`.
    let b = t.as_bytes();
    let split = (0..b.len())
        .find(|&i| {
            let exponent = matches!(b[i], b'e' | b'E')
                && i > 0
                && b.get(i + 1)
                    .is_some_and(|n| n.is_ascii_digit() || *n == b'-' || *n == b'+');
            b[i].is_ascii_alphabetic() && !exponent
        })
        .unwrap_or(b.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .trim()
        .parse()
        .with_context(|| format!("{num:?} is not a number"))?;
    if !value.is_finite() || value <= 0.0 {
        bail!("must be positive");
    }
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" if value < 1.0 => {
            let total = total.context("a fraction of RAM was given but the machine's RAM is unknown")?;
            return Ok((value * total as f64) as usize);
        }
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        other => bail!("unknown unit {other:?} (use B, KB, MB, GB, KiB, MiB, GiB, or a fraction of RAM like 0.1)"),
    };
    Ok((value * scale) as usize)
}

#[cfg(test)]
mod tests {
    use super::parse_memory;

    #[test]
    fn memory_sizes_parse() {
        assert_eq!(parse_memory("2GiB", None).expect("ok"), 2 << 30);
        assert_eq!(parse_memory("512 MiB", None).expect("ok"), 512 << 20);
        assert_eq!(parse_memory("1e9", None).expect("ok"), 1_000_000_000);
        assert_eq!(parse_memory("0.25", Some(1000)).expect("ok"), 250);
        assert!(parse_memory("0.25", None).is_err());
        assert!(parse_memory("-3GB", None).is_err());
        assert!(parse_memory("3 parsecs", None)
            .expect_err("bad unit")
            .to_string()
            .contains("unknown unit"));
    }
}
