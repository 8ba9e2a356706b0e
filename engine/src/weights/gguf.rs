//! A GGUF (v2/v3) reader over a memory map.
//!
//! The header (metadata and tensor table) is parsed eagerly with bounds checks, so a truncated or
//! corrupt file fails at open with a message naming the file. Tensor data stays in the map until a
//! tensor is asked for; then it is checked against the file length and dequantised to f32.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use gristmill_kernels::quant::{dequantize, GgmlType};
use memmap2::Mmap;

use crate::error::{Error, Result};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Self::Int(i) => u64::try_from(*i).ok(),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Self::Float(f) => Some(*f),
            Self::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Self::Bool(b) => Some(*b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where a tensor lives in the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Dimensions in ggml order (fastest-varying first), as stored.
    pub dims: Vec<u64>,
    /// ggml type id (may be one Gristmill cannot read; checked on access).
    pub type_id: u32,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
}

impl TensorInfo {
    /// Shape in row-major (PyTorch) order: the ggml dims reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An open GGUF file.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    pub metadata: HashMap<String, MetaValue>,
    pub tensors: HashMap<String, TensorInfo>,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize, what: &str) -> Result<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| {
            Error::format(
                self.path,
                format!(
                    "header ends early while reading {what} at byte {} (file is {} bytes; truncated?)",
                    self.pos,
                    self.buf.len()
                ),
            )
        })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        let len = usize::try_from(len)
            .map_err(|_| Error::format(self.path, format!("{what}: absurd length {len}")))?;
        let b = self.take(len, what)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| Error::format(self.path, format!("{what} is not UTF-8")))
    }
    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<MetaValue> {
        let mut fixed = |n: usize| -> Result<[u8; 8]> {
            let b = self.take(n, key)?;
            let mut a = [0u8; 8];
            a[..n].copy_from_slice(b);
            Ok(a)
        };
        Ok(match ty {
            0 => MetaValue::Int(fixed(1)?[0] as i64),
            1 => MetaValue::Int(fixed(1)?[0] as i8 as i64),
            2 => MetaValue::Int(
                u16::from_le_bytes(fixed(2)?[..2].try_into().unwrap_or_default()) as i64,
            ),
            3 => MetaValue::Int(
                i16::from_le_bytes(fixed(2)?[..2].try_into().unwrap_or_default()) as i64,
            ),
            4 => MetaValue::Int(
                u32::from_le_bytes(fixed(4)?[..4].try_into().unwrap_or_default()) as i64,
            ),
            5 => MetaValue::Int(
                i32::from_le_bytes(fixed(4)?[..4].try_into().unwrap_or_default()) as i64,
            ),
            6 => MetaValue::Float(
                f32::from_le_bytes(fixed(4)?[..4].try_into().unwrap_or_default()) as f64,
            ),
            7 => MetaValue::Bool(fixed(1)?[0] != 0),
            8 => MetaValue::String(self.string(key)?),
            9 => {
                if depth > 2 {
                    return Err(Error::format(
                        self.path,
                        format!("metadata {key}: arrays nested too deep"),
                    ));
                }
                let ety = self.u32(key)?;
                let n = self.u64(key)?;
                // Every element takes at least one byte: reject counts the file cannot hold.
                if n > (self.buf.len() - self.pos) as u64 {
                    return Err(Error::format(
                        self.path,
                        format!("metadata {key}: array of {n} elements overruns the file"),
                    ));
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(ety, key, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::Int(
                fixed(8)?
                    .into_iter()
                    .rev()
                    .fold(0u64, |a, b| (a << 8) | b as u64) as i64,
            ),
            11 => MetaValue::Int(i64::from_le_bytes(fixed(8)?)),
            12 => MetaValue::Float(f64::from_le_bytes(fixed(8)?)),
            other => {
                return Err(Error::format(
                    self.path,
                    format!("metadata {key}: unknown value type {other}"),
                ))
            }
        })
    }
}

impl GgufFile {
    /// Opens and parses the header of a GGUF file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; a model file changed underneath a running process is
        // outside what we can defend against, as for every mmap-based loader.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let mut c = Cursor {
            buf: &map,
            pos: 0,
            path,
        };
        let magic = c.take(4, "magic")?;
        if magic != b"GGUF" {
            return Err(Error::format(
                path,
                format!("bad magic {magic:?}, expected \"GGUF\""),
            ));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::format(
                path,
                format!("GGUF version {version} is not supported (2 or 3)"),
            ));
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        if n_tensors > 1 << 20 || n_kv > 1 << 20 {
            return Err(Error::format(
                path,
                format!("implausible counts: {n_tensors} tensors, {n_kv} metadata entries"),
            ));
        }
        let mut metadata = HashMap::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.u32(&key)?;
            let v = c.value(ty, &key, 0)?;
            metadata.insert(key, v);
        }
        // Each entry takes at least 24 bytes: never reserve more than the file can describe.
        let mut table = Vec::with_capacity((n_tensors as usize).min((c.buf.len() - c.pos) / 24));
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let n_dims = c.u32(&name)?;
            if n_dims > 4 {
                return Err(Error::format(
                    path,
                    format!("tensor {name:?} has {n_dims} dimensions (at most 4)"),
                ));
            }
            let dims = (0..n_dims)
                .map(|_| c.u64(&name))
                .collect::<Result<Vec<_>>>()?;
            let type_id = c.u32(&name)?;
            let offset = c.u64(&name)?;
            table.push((name, dims, type_id, offset));
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(MetaValue::as_u64)
            .unwrap_or(32)
            .max(1);
        let data_start = (c.pos as u64)
            .checked_next_multiple_of(alignment)
            .ok_or_else(|| {
                Error::format(path, format!("general.alignment {alignment} is absurd"))
            })?;
        let tensors = table
            .into_iter()
            .map(|(name, dims, type_id, offset)| {
                let offset = data_start.checked_add(offset).ok_or_else(|| {
                    Error::format(path, format!("tensor {name:?}: offset {offset} is absurd"))
                })?;
                Ok((
                    name,
                    TensorInfo {
                        dims,
                        type_id,
                        offset,
                    },
                ))
            })
            .collect::<Result<HashMap<_, _>>>()?;
        Ok(Self {
            path: path.to_path_buf(),
            map,
            metadata,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// Reads a tensor as f32 in row-major order, checking its shape (row-major, PyTorch order).
    pub fn tensor_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let (ty, bytes) = self.tensor_raw(name, expected)?;
        let mut out = vec![0f32; expected.iter().product()];
        dequantize(ty, bytes, &mut out);
        Ok(out)
    }

    /// A tensor's type and raw bytes, checked against its row-major shape and the file length.
    pub fn tensor_raw(&self, name: &str, expected: &[usize]) -> Result<(GgmlType, &[u8])> {
        let info = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            tensor: name.to_string(),
        })?;
        let shape = info.shape();
        if shape != expected {
            return Err(Error::ShapeMismatch {
                path: self.path.clone(),
                tensor: name.to_string(),
                expected: expected.to_vec(),
                found: shape,
            });
        }
        let ty = GgmlType::from_id(info.type_id).ok_or_else(|| Error::UnsupportedTensorType {
            path: self.path.clone(),
            tensor: name.to_string(),
            ty: format!(
                "{} (ggml type {})",
                GgmlType::name_of_id(info.type_id),
                info.type_id
            ),
        })?;
        let n = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| {
                Error::format(
                    &self.path,
                    format!("tensor {name:?}: shape {shape:?} has more elements than memory holds"),
                )
            })?;
        let bytes = ty.bytes_for(n).ok_or_else(|| {
            Error::format(
                &self.path,
                format!("tensor {name:?}: {n} elements is not a whole number of {ty:?} blocks, or too many"),
            )
        })?;
        let end = info.offset.saturating_add(bytes as u64);
        if end > self.map.len() as u64 {
            return Err(Error::TruncatedTensor {
                path: self.path.clone(),
                tensor: name.to_string(),
                start: info.offset,
                end,
                file_len: self.map.len() as u64,
            });
        }
        Ok((ty, &self.map[info.offset as usize..end as usize]))
    }
}

/// Writes a GGUF v3 file. Gristmill uses it to build small test models; it is also the inverse
/// of [`GgufFile`] and so checks the reader.
#[derive(Debug, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
    /// Tensors written with a type id other than their `GgmlType` (index, id).
    raw_ids: Vec<(usize, u32)>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn meta(&mut self, key: &str, value: MetaValue) -> &mut Self {
        self.metadata.push((key.to_string(), value));
        self
    }

    /// Adds a tensor given in row-major `shape` (PyTorch order), quantised to `ty`.
    pub fn tensor(&mut self, name: &str, shape: &[usize], ty: GgmlType, data: &[f32]) -> &mut Self {
        let dims = shape.iter().rev().map(|&d| d as u64).collect();
        let bytes = gristmill_kernels::quant::quantize(ty, data);
        self.tensors.push((name.to_string(), dims, ty, bytes));
        self
    }

    /// Adds a tensor with raw bytes and any type id (to test unsupported types).
    pub fn raw_tensor(
        &mut self,
        name: &str,
        shape: &[usize],
        type_id: u32,
        bytes: Vec<u8>,
    ) -> &mut Self {
        let dims = shape.iter().rev().map(|&d| d as u64).collect();
        self.tensors
            .push((name.to_string(), dims, GgmlType::F32, bytes));
        self.raw_ids.push((self.tensors.len() - 1, type_id));
        self
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        fn s(out: &mut Vec<u8>, v: &str) {
            out.extend_from_slice(&(v.len() as u64).to_le_bytes());
            out.extend_from_slice(v.as_bytes());
        }
        fn val(out: &mut Vec<u8>, v: &MetaValue, with_type: bool) {
            let ty: u32 = match v {
                MetaValue::Int(_) => 11,
                MetaValue::Float(_) => 12,
                MetaValue::Bool(_) => 7,
                MetaValue::String(_) => 8,
                MetaValue::Array(_) => 9,
            };
            if with_type {
                out.extend_from_slice(&ty.to_le_bytes());
            }
            match v {
                MetaValue::Int(i) => out.extend_from_slice(&i.to_le_bytes()),
                MetaValue::Float(f) => out.extend_from_slice(&f.to_le_bytes()),
                MetaValue::Bool(b) => out.push(*b as u8),
                MetaValue::String(x) => s(out, x),
                MetaValue::Array(items) => {
                    let ety: u32 = match items.first() {
                        Some(MetaValue::Float(_)) => 12,
                        Some(MetaValue::Bool(_)) => 7,
                        Some(MetaValue::String(_)) => 8,
                        Some(MetaValue::Array(_)) => 9,
                        _ => 11,
                    };
                    out.extend_from_slice(&ety.to_le_bytes());
                    out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                    for i in items {
                        val(out, i, false);
                    }
                }
            }
        }
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            s(&mut out, k);
            val(&mut out, v, true);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for (i, (name, dims, ty, bytes)) in self.tensors.iter().enumerate() {
            s(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            let id = self
                .raw_ids
                .iter()
                .find(|(j, _)| *j == i)
                .map_or(ty.id(), |(_, id)| *id);
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + bytes.len() as u64).next_multiple_of(32);
        }
        out.resize(out.len().next_multiple_of(32), 0);
        let base = out.len();
        for ((_, _, _, bytes), off) in self.tensors.iter().zip(offsets) {
            out.resize(base + off as usize, 0);
            out.extend_from_slice(bytes);
        }
        out
    }
}
