//! Checkpoint readers. The model asks for tensors by their HF names
//! (`model.layers.0.self_attn.q_proj.weight`) in row-major shape; GGUF names are translated and
//! GGUF's Q/K row permutation is undone here, so the model sees one layout whatever the file.

pub mod gguf;
mod safetensors_dir;

use std::path::{Path, PathBuf};

pub use gguf::{GgufFile, GgufWriter, MetaValue};
pub use safetensors_dir::SafetensorsDir;

use gristmill_kernels::GgmlType;

use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// An opened checkpoint: a GGUF file or an HF safetensors directory, or an HF directory's
/// `config.json` alone with made-up weights ([`dummy_path`], `--load-format dummy`).
#[derive(Debug)]
pub enum Checkpoint {
    Gguf(GgufFile),
    Safetensors {
        dir: PathBuf,
        tensors: SafetensorsDir,
    },
    /// Weights drawn from a fixed generator per tensor name, in the shapes the configuration
    /// implies: benchmarks of a model's shape without its weights (vLLM's `dummy` format).
    Dummy {
        dir: PathBuf,
        cfg: Box<ModelConfig>,
    },
}

/// How a model path asks for made-up weights: `dummy:` before an HF directory.
const DUMMY_PREFIX: &str = "dummy:";

/// The path that loads the model of `dir` (an HF directory: `config.json` and a tokenizer)
/// with made-up weights instead of its own (`--load-format dummy`).
pub fn dummy_path(dir: &Path) -> PathBuf {
    PathBuf::from(format!("{DUMMY_PREFIX}{}", dir.display()))
}

/// `count` made-up values of tensor `name`: ones for norm weights (a model that normalises),
/// else uniform in ±0.02, from a generator seeded by the name and the position, so a value
/// does not depend on how the work is split.
fn dummy_values(name: &str, count: usize) -> Vec<f32> {
    use rayon::prelude::*;
    if name.contains("norm") {
        return vec![1.0; count];
    }
    let seed = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    const CHUNK: usize = 1 << 16;
    let mut out = vec![0f32; count];
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(i, chunk)| {
            let mut x = seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            for v in chunk {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *v = ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * 0.02;
            }
        });
    out
}

impl Checkpoint {
    /// Opens a `.gguf` file, or a directory with `config.json` and safetensors weights (a
    /// directory holding exactly one `.gguf` file also works).
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.to_str().and_then(|p| p.strip_prefix(DUMMY_PREFIX)) {
            let dir = PathBuf::from(dir);
            let cfg = ModelConfig::from_hf_json(&dir.join("config.json"))?;
            return Ok(Self::Dummy {
                dir,
                cfg: Box::new(cfg),
            });
        }
        if !path.exists() {
            return Err(Error::ModelNotFound {
                path: path.to_path_buf(),
                hint: "the path does not exist; run `make model` (scripts/fetch-model.sh) for the default model, or pass --model PATH".into(),
            });
        }
        if path.is_dir() {
            if path.join("config.json").exists() {
                return Ok(Self::Safetensors {
                    dir: path.to_path_buf(),
                    tensors: SafetensorsDir::open(path)?,
                });
            }
            let ggufs: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| Error::io(path, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
                .collect();
            return match ggufs.as_slice() {
                [one] => Ok(Self::Gguf(GgufFile::open(one)?)),
                [] => Err(Error::ModelNotFound {
                    path: path.to_path_buf(),
                    hint: "the directory has no config.json (HF checkpoint) and no .gguf file"
                        .into(),
                }),
                _ => Err(Error::ModelNotFound {
                    path: path.to_path_buf(),
                    hint: format!("the directory holds {} .gguf files; name one", ggufs.len()),
                }),
            };
        }
        Ok(Self::Gguf(GgufFile::open(path)?))
    }

    pub fn path(&self) -> &Path {
        match self {
            Self::Gguf(g) => g.path(),
            Self::Safetensors { dir, .. } | Self::Dummy { dir, .. } => dir,
        }
    }

    pub fn config(&self) -> Result<ModelConfig> {
        match self {
            Self::Gguf(g) => ModelConfig::from_gguf(g),
            Self::Safetensors { dir, .. } => ModelConfig::from_hf_json(&dir.join("config.json")),
            Self::Dummy { cfg, .. } => Ok((**cfg).clone()),
        }
    }

    /// Bytes the model's weights take in memory once loaded: matrices packed as the CPU backend
    /// keeps them (quantised GGUF blocks stay quantised, everything else becomes f32), vectors
    /// as f32. Read from the headers alone, before anything is allocated.
    pub fn weight_bytes(&self) -> u64 {
        use gristmill_kernels::cpu::PackedMatrix;
        let f32_bytes = |shape: &[usize]| shape.iter().map(|&d| d as u64).product::<u64>() * 4;
        match self {
            Self::Gguf(g) => g
                .tensors
                .values()
                .map(|t| {
                    let shape = t.shape();
                    match (GgmlType::from_id(t.type_id), shape.as_slice()) {
                        (Some(ty), &[n, k]) => PackedMatrix::packed_bytes(ty, n, k),
                        _ => f32_bytes(&shape),
                    }
                })
                .sum(),
            Self::Safetensors { tensors, .. } => {
                tensors.tensors().map(|(_, shape)| f32_bytes(shape)).sum()
            }
            Self::Dummy { cfg, .. } => {
                let (h, hd) = (cfg.hidden_size as u64, cfg.head_dim as u64);
                let (q, kv) = (cfg.num_heads as u64 * hd, cfg.num_kv_heads as u64 * hd);
                let layer = h * (q + 2 * kv) + q * h + 3 * h * cfg.intermediate_size as u64 + 2 * h;
                let embed = cfg.vocab_size as u64 * h;
                let head = if cfg.tie_word_embeddings { 0 } else { embed };
                4 * (embed + head + cfg.num_layers as u64 * layer + h)
            }
        }
    }

    /// Fails with [`Error::NotEnoughMemory`] when the weights would not fit in the memory the
    /// system has available now (`MemAvailable`; unchecked where it cannot be read).
    pub fn check_fits_in_memory(&self) -> Result<u64> {
        let needed = self.weight_bytes();
        if let Some(available) = available_memory() {
            if needed > available {
                return Err(Error::NotEnoughMemory {
                    path: self.path().to_path_buf(),
                    needed,
                    available,
                });
            }
        }
        Ok(needed)
    }

    /// Whether the checkpoint has a tensor of this HF name.
    pub fn contains(&self, hf_name: &str) -> bool {
        match self {
            Self::Gguf(g) => gguf_name(hf_name).is_some_and(|n| g.tensors.contains_key(&n)),
            Self::Safetensors { tensors, .. } => tensors.contains(hf_name),
            // What an HF checkpoint of this configuration holds that the loader asks about.
            Self::Dummy { cfg, .. } => hf_name != "lm_head.weight" || !cfg.tie_word_embeddings,
        }
    }

    /// Reads a tensor by HF name as f32, checking its row-major shape.
    pub fn tensor(&self, hf_name: &str, shape: &[usize], cfg: &ModelConfig) -> Result<Vec<f32>> {
        match self {
            Self::Safetensors { tensors, .. } => tensors.tensor_f32(hf_name, shape),
            Self::Dummy { .. } => Ok(dummy_values(hf_name, shape.iter().product())),
            Self::Gguf(g) => {
                let name = gguf_name_for(hf_name, cfg).ok_or_else(|| Error::MissingTensor {
                    path: g.path().to_path_buf(),
                    tensor: hf_name.to_string(),
                })?;
                let data = g.tensor_f32(&name, shape)?;
                // llama.cpp's converter permutes the rows of Q and K of `llama` checkpoints for
                // its interleaved RoPE; undo it so that the half-split RoPE of HF applies.
                let permuted = cfg.architecture == "llama";
                Ok(match (permuted, name.rsplit('.').nth(1)) {
                    (true, Some("attn_q")) => unpermute_rows(&data, cfg.num_heads, cfg.head_dim),
                    (true, Some("attn_k")) => unpermute_rows(&data, cfg.num_kv_heads, cfg.head_dim),
                    _ => data,
                })
            }
        }
    }

    /// A matrix in its quantised form (GGUF tensors of any quantised type Gristmill reads), rows
    /// in HF order, for backends that compute on quantised weights; `None` for any other tensor.
    pub fn quantized(
        &self,
        hf_name: &str,
        shape: &[usize],
        cfg: &ModelConfig,
    ) -> Result<Option<(GgmlType, Vec<u8>)>> {
        let Self::Gguf(g) = self else { return Ok(None) };
        let Some(name) = gguf_name_for(hf_name, cfg) else {
            return Ok(None);
        };
        if !g.tensors.contains_key(&name) {
            return Ok(None);
        }
        let (ty, bytes) = g.tensor_raw(&name, shape)?;
        if ty.sub_blocks().is_none() {
            return Ok(None);
        }
        let permuted = cfg.architecture == "llama";
        Ok(Some(match (permuted, name.rsplit('.').nth(1)) {
            (true, Some("attn_q")) => (ty, unpermute_rows(bytes, cfg.num_heads, cfg.head_dim)),
            (true, Some("attn_k")) => (ty, unpermute_rows(bytes, cfg.num_kv_heads, cfg.head_dim)),
            _ => (ty, bytes.to_vec()),
        }))
    }

    /// Per-dimension RoPE frequency divisors stored in a GGUF (`rope_freqs.weight`, Llama 3).
    pub fn rope_freq_factors(&self, cfg: &ModelConfig) -> Result<Option<Vec<f32>>> {
        match self {
            Self::Gguf(g) if g.tensors.contains_key("rope_freqs.weight") => g
                .tensor_f32("rope_freqs.weight", &[cfg.head_dim / 2])
                .map(Some),
            _ => Ok(None),
        }
    }
}

/// Bytes of memory the system can give now (`MemAvailable` of `/proc/meminfo`, Linux).
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Undoes llama.cpp's `permute`: GGUF row `h*d + 2i + j` is HF row `h*d + j*d/2 + i`.
/// Works for weights (`[heads*d, in]`), biases (`[heads*d]`) and rows of quantised blocks.
fn unpermute_rows<T: Copy + Default>(data: &[T], heads: usize, head_dim: usize) -> Vec<T> {
    let rows = heads * head_dim;
    let width = data.len() / rows;
    let half = head_dim / 2;
    let mut out = vec![T::default(); data.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = h * head_dim + 2 * i + j;
                let dst = h * head_dim + j * half + i;
                out[dst * width..(dst + 1) * width]
                    .copy_from_slice(&data[src * width..(src + 1) * width]);
            }
        }
    }
    out
}

/// Maps an HF tensor name to its GGUF name.
fn gguf_name(hf: &str) -> Option<String> {
    gguf_name_in(hf, false)
}

/// [`gguf_name`] for a model of the Gemma family when `gemma`: its norm after attention is
/// `post_attention_norm`, its norm before the MLP (`pre_feedforward_layernorm`) `ffn_norm`.
fn gguf_name_for(hf: &str, cfg: &ModelConfig) -> Option<String> {
    gguf_name_in(hf, cfg.gemma3.is_some())
}

fn gguf_name_in(hf: &str, gemma: bool) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" if gemma => "post_attention_norm",
        "post_attention_layernorm" => "ffn_norm",
        "pre_feedforward_layernorm" => "ffn_norm",
        "post_feedforward_layernorm" => "post_ffw_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.qkv_proj" => "attn_qkv",
        "mlp.gate_up_proj" => "ffn_up",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_gguf() {
        assert_eq!(
            gguf_name("model.layers.12.self_attn.q_proj.bias").as_deref(),
            Some("blk.12.attn_q.bias")
        );
        assert_eq!(
            gguf_name("model.layers.0.mlp.down_proj.weight").as_deref(),
            Some("blk.0.ffn_down.weight")
        );
        assert_eq!(
            gguf_name("lm_head.weight").as_deref(),
            Some("output.weight")
        );
        assert_eq!(gguf_name("model.layers.0.unknown.weight"), None);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(heads, 2, d/2, in).swapaxes(1, 2): HF row (h, j, i) -> h*d + 2i + j.
        let (heads, d, width) = (2, 4, 3);
        let hf: Vec<f32> = (0..heads * d * width).map(|v| v as f32).collect();
        let mut gguf = vec![0f32; hf.len()];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..d / 2 {
                    let src = h * d + j * d / 2 + i;
                    let dst = h * d + 2 * i + j;
                    gguf[dst * width..(dst + 1) * width]
                        .copy_from_slice(&hf[src * width..(src + 1) * width]);
                }
            }
        }
        assert_eq!(unpermute_rows(&gguf, heads, d), hf);
    }
}
