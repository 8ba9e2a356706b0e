//! HF safetensors checkpoints: one `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, each memory-mapped once.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

#[derive(Debug)]
struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
}

/// All tensors of a safetensors checkpoint directory, by name.
#[derive(Debug)]
pub struct SafetensorsDir {
    files: Vec<(PathBuf, Mmap)>,
    entries: HashMap<String, Entry>,
}

impl SafetensorsDir {
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let names: Vec<String> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::format(&index, format!("not valid JSON: {e}")))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::format(&index, "has no \"weight_map\" object"))?;
            let mut files: Vec<String> = map
                .values()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            files.sort();
            files.dedup();
            files
        } else if dir.join("model.safetensors").exists() {
            vec!["model.safetensors".to_string()]
        } else {
            return Err(Error::ModelNotFound {
                path: dir.to_path_buf(),
                hint:
                    "the directory has neither model.safetensors nor model.safetensors.index.json"
                        .into(),
            });
        };
        let mut files = Vec::new();
        let mut entries = HashMap::new();
        for name in names {
            let path = dir.join(&name);
            let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: read-only map of a checkpoint file (see `GgufFile::open`).
            let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
            let (header_len, meta) = SafeTensors::read_metadata(&map)
                .map_err(|e| Error::format(&path, format!("bad safetensors header: {e}")))?;
            let base = 8 + header_len;
            for (tname, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                entries.insert(
                    tname,
                    Entry {
                        file: files.len(),
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start: base + s,
                        end: base + e,
                    },
                );
            }
            files.push((path, map));
        }
        Ok(Self { files, entries })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Every tensor's name and shape, as the headers say.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.entries
            .iter()
            .map(|(n, e)| (n.as_str(), e.shape.as_slice()))
    }

    /// The first shard's path (for messages about tensors that are missing everywhere).
    fn any_path(&self) -> PathBuf {
        self.files
            .first()
            .map(|(p, _)| p.clone())
            .unwrap_or_default()
    }

    pub fn tensor_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let e = self.entries.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.any_path(),
            tensor: name.to_string(),
        })?;
        let (path, map) = &self.files[e.file];
        if e.shape != expected {
            return Err(Error::ShapeMismatch {
                path: path.clone(),
                tensor: name.to_string(),
                expected: expected.to_vec(),
                found: e.shape.clone(),
            });
        }
        if e.end > map.len() || e.start > e.end {
            return Err(Error::TruncatedTensor {
                path: path.clone(),
                tensor: name.to_string(),
                start: e.start as u64,
                end: e.end as u64,
                file_len: map.len() as u64,
            });
        }
        let bytes = &map[e.start..e.end];
        // Overflowing products can only describe tensors no file holds.
        let n = e
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .unwrap_or(usize::MAX);
        let width = match e.dtype {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            other => {
                return Err(Error::UnsupportedTensorType {
                    path: path.clone(),
                    tensor: name.to_string(),
                    ty: format!("{other:?}"),
                })
            }
        };
        if n.checked_mul(width) != Some(bytes.len()) {
            return Err(Error::format(
                path,
                format!(
                    "tensor {name:?}: {} bytes for {n} elements of {:?}",
                    bytes.len(),
                    e.dtype
                ),
            ));
        }
        Ok(match e.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            _ => bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        })
    }
}
