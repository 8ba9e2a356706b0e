//! Loading an engine: the checkpoint, its tokenizer and chat template, the special tokens.

use super::*;

impl<B: Backend> Engine<B> {
    pub fn load_with(path: &Path, backend: B) -> Result<Self> {
        let ckpt = Checkpoint::open(path)?;
        let cfg = ckpt.config()?;
        let tokenizer = checkpoint_tokenizer(&ckpt)?;
        let weight_bytes = ckpt.check_fits_in_memory()?;
        if tokenizer.vocab_size() > cfg.vocab_size {
            tracing::warn!(
                tokenizer = tokenizer.vocab_size(),
                model = cfg.vocab_size,
                "the tokenizer knows more tokens than the model has embeddings"
            );
        }
        let model = Model::Single(Llama::load(&ckpt, backend)?);
        Ok(Self::assemble(path, model, tokenizer, weight_bytes))
    }

    pub(super) fn assemble(
        path: &Path,
        model: Model<B>,
        tokenizer: Tokenizer,
        weight_bytes: u64,
    ) -> Self {
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
            weight_bytes,
            seed_base,
            generated_tokens: AtomicU64::new(0),
            structured: std::sync::OnceLock::new(),
        }
    }
}

/// The tokenizer (and chat template) of a GGUF file or HF directory, without its weights: what
/// the coordinator needs to plan shards by shared prompt prefix.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    checkpoint_tokenizer(&Checkpoint::open(path)?)
}

pub(super) fn checkpoint_tokenizer(ckpt: &Checkpoint) -> Result<Tokenizer> {
    match ckpt {
        Checkpoint::Gguf(g) => Tokenizer::from_gguf(g),
        Checkpoint::Safetensors { dir, .. } | Checkpoint::Dummy { dir, .. } => {
            let (eos, bos) = hf_special_ids(&dir.join("config.json"));
            Tokenizer::from_hf_dir(dir, &eos, bos)
        }
    }
}

impl Engine<CpuBackend> {
    /// Loads a model into rank threads, one per entry of `ranks` (a device per rank: the GPU
    /// backend), at `memory_utilization` of each device.
    pub fn load_ranks<B: Backend + 'static>(
        path: &Path,
        ranks: Vec<crate::tensor_parallel::RankSpec<B>>,
        memory_utilization: f32,
    ) -> Result<Self> {
        let ckpt = Checkpoint::open(path)?;
        let tokenizer = checkpoint_tokenizer(&ckpt)?;
        let weight_bytes = ckpt.check_fits_in_memory()?;
        drop(ckpt);
        let group = crate::tensor_parallel::TpGroup::start(path, ranks, memory_utilization)?;
        Ok(Self::assemble(
            path,
            Model::Parallel(group),
            tokenizer,
            weight_bytes,
        ))
    }

    /// Loads a GGUF file or HF safetensors directory on the CPU backend, `exact` precision.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, CpuBackend::default())
    }

    /// An engine over a [`ScriptedModel`] (no weights) with the tokenizer and configuration of
    /// the checkpoint at `path`: the engine loop's tests, with outputs known in advance.
    pub fn scripted(path: &Path, next: crate::tensor_parallel::NextToken) -> Result<Self> {
        let ckpt = Checkpoint::open(path)?;
        let cfg = ckpt.config()?;
        let tokenizer = checkpoint_tokenizer(&ckpt)?;
        let model = Model::Scripted(crate::tensor_parallel::ScriptedModel { cfg, next });
        Ok(Self::assemble(path, model, tokenizer, 0))
    }

    /// Loads a model split over `tensor_parallel_size` rank threads (whole when 1), computing
    /// at a precision (or with a [`CpuBackend`]'s settings).
    pub fn load_parallel(
        path: &Path,
        tensor_parallel_size: usize,
        backend: impl Into<CpuBackend>,
    ) -> Result<Self> {
        let backend = backend.into();
        if tensor_parallel_size <= 1 {
            return Self::load_with(path, backend);
        }
        let ckpt = Checkpoint::open(path)?;
        let tokenizer = checkpoint_tokenizer(&ckpt)?;
        let weight_bytes = ckpt.check_fits_in_memory()?;
        drop(ckpt);
        let model = load_model(path, tensor_parallel_size, backend)?;
        Ok(Self::assemble(path, model, tokenizer, weight_bytes))
    }
}

/// `eos_token_id` (int or list) and `bos_token_id` from an HF `config.json`; empty if unreadable
/// (the config was already validated by the model loader).
pub(super) fn hf_special_ids(path: &Path) -> (Vec<u32>, Option<u32>) {
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
