//! The compute backend the model is written over.
//!
//! The model never touches memory directly: activations are `Backend::Buf` (rows of equal width),
//! weights are `Backend::Weight`. The CPU backend is the reference; a CUDA backend implements the
//! same trait with device buffers, and tensor parallelism wraps the linear ops with collectives.

use gristmill_kernels::cpu::int8::Isa;
use gristmill_kernels::cpu::{self, PackedMatrix};
use gristmill_kernels::GgmlType;

use crate::parallel::Collective;

pub use gristmill_kernels::cpu::AttentionShape;

/// One sequence's rows in a step, for attention: the kernels' own description, shared by
/// every backend.
pub use gristmill_kernels::cpu::SeqAttention as AttnSeq;

/// Operations of one forward pass. Every op is deterministic and row-independent: a row's result
/// does not depend on the other rows of the buffer.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// A matrix of activations: `rows` rows of `cols` values.
    type Buf: Send + std::fmt::Debug;
    /// A weight matrix `[rows, cols]` (a linear layer's `[out, in]`, an embedding table), laid out
    /// however the backend's matmul wants it.
    type Matrix: Send + Sync + std::fmt::Debug;
    /// A weight vector (norm weights, biases).
    type Vector: Send + Sync + std::fmt::Debug;

    /// Paged KV memory of every layer.
    type KvStore: Send + std::fmt::Debug;

    /// Uploads a row-major `[rows, cols]` matrix.
    fn matrix(&self, data: Vec<f32>, rows: usize, cols: usize) -> Self::Matrix;
    fn vector(&self, data: Vec<f32>) -> Self::Vector;
    /// Uploads a matrix of ggml blocks (rows of `cols / 32` blocks) without dequantising it, if
    /// the backend computes on that type exactly; `None` makes the loader dequantise and call
    /// [`Backend::matrix`].
    fn quantized_matrix(
        &self,
        ty: GgmlType,
        data: &[u8],
        rows: usize,
        cols: usize,
    ) -> Option<Self::Matrix> {
        let _ = (ty, data, rows, cols);
        None
    }
    /// Free and total bytes of the device the backend computes on (`None`: host memory, sized
    /// by `--kv-cache-memory` instead).
    fn device_memory(&self) -> Option<(u64, u64)> {
        None
    }
    /// Bytes one cached key or value takes (4 for f32, 2 for f16): sizes the KV cache.
    fn kv_value_bytes(&self) -> usize {
        std::mem::size_of::<f32>()
    }
    /// KV memory for `layers` layers of `num_blocks` blocks of `block_size` positions, each
    /// position `kv_heads × head_dim` values of keys and as many of values.
    fn kv_store(
        &self,
        layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Self::KvStore;
    /// Rows `ids[i]` of an embedding table.
    /// Rows of `table` for `ids`, where `table` holds the ids `first_id ..` (a vocabulary shard);
    /// ids outside it give zero rows.
    fn embed(&self, table: &Self::Matrix, ids: &[u32], first_id: u32) -> Self::Buf;
    /// Element-wise sum of `x` over the ranks of `c` (tensor parallelism).
    fn all_reduce_sum(&self, x: &mut Self::Buf, c: &dyn Collective);
    /// Every rank's columns side by side, in rank order: `[rows, cols]` → `[rows, cols × world]`.
    fn all_gather_cols(&self, x: &Self::Buf, c: &dyn Collective) -> Self::Buf;
    /// RMSNorm of every `weight.len()`-wide chunk of each row (the whole row, or each head when
    /// the weight is `head_dim` long), times `weight`.
    fn rms_norm(&self, x: &Self::Buf, weight: &Self::Vector, eps: f32) -> Self::Buf;
    /// `x · Wᵀ (+ bias)`.
    fn linear(&self, x: &Self::Buf, w: &Self::Matrix, bias: Option<&Self::Vector>) -> Self::Buf;
    /// Half-split rotary embedding of each row at `positions[row]`.
    fn rope(
        &self,
        x: &mut Self::Buf,
        positions: &[usize],
        heads: usize,
        head_dim: usize,
        inv_freq: &[f32],
    );
    /// `gate = silu(gate) * up`.
    fn silu_mul(&self, gate: &mut Self::Buf, up: &Self::Buf);
    /// `gate = gelu_tanh(gate) * up` (Gemma's GeGLU).
    fn gelu_tanh_mul(&self, gate: &mut Self::Buf, up: &Self::Buf);
    /// `x *= s`.
    fn scale(&self, x: &mut Self::Buf, s: f32);
    /// `x += y`.
    fn add(&self, x: &mut Self::Buf, y: &Self::Buf);
    /// Copies rows `start..start + n` out of `x`.
    fn slice_rows(&self, x: &Self::Buf, start: usize, n: usize) -> Self::Buf;
    /// Concatenates row blocks (in order) into one buffer.
    fn concat_rows(&self, parts: Vec<Self::Buf>) -> Self::Buf;
    /// Stores the keys and values of a step's rows of one layer in their cache slots.
    fn write_kv(
        &self,
        store: &mut Self::KvStore,
        layer: usize,
        k: &Self::Buf,
        v: &Self::Buf,
        slots: &[usize],
    );
    /// Causal attention of a step's query rows (sequences in order) over their paged caches,
    /// which already hold the new rows.
    fn attention(
        &self,
        q: &Self::Buf,
        store: &Self::KvStore,
        layer: usize,
        seqs: &[AttnSeq<'_>],
        shape: AttentionShape,
    ) -> Self::Buf;
    /// Copies a buffer to host memory, row-major.
    fn to_host(&self, x: &Self::Buf) -> Vec<f32>;
}

/// Rank-major `[world, rows, cols]` (what an all-gather returns) as `[rows, world × cols]`:
/// every rank's columns of a row side by side, in rank order.
pub fn ranks_side_by_side(all: &[f32], rows: usize, cols: usize, world: usize) -> Vec<f32> {
    let part = rows * cols;
    let mut data = vec![0f32; part * world];
    for r in 0..rows {
        for k in 0..world {
            let src = &all[k * part + r * cols..k * part + (r + 1) * cols];
            data[(r * world + k) * cols..(r * world + k + 1) * cols].copy_from_slice(src);
        }
    }
    data
}

/// Row-major f32 activations in host memory.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuTensor {
    pub data: Vec<f32>,
    pub cols: usize,
}

impl CpuTensor {
    fn rows(&self) -> usize {
        self.data.len().checked_div(self.cols).unwrap_or(0)
    }
}

/// How the CPU computes the linear layers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// f32 activations against weights expanded to f32 in registers: HF transformers' results
    /// up to near-ties (the oracle).
    #[default]
    Exact,
    /// Activations quantised per 32 values to int8, in two passes (the values, then what the
    /// first rounding left: about 15 bits), integer dot products against the stored blocks of
    /// quantised weights, a vectorised `exp`, and keys and values cached in f16 (half the
    /// memory: twice the sequences in the same `--kv-cache-memory`). Weights that are not
    /// quantised (f32, f16, bf16 checkpoints) stay on the f32 path.
    Fast,
}

impl Precision {
    /// Whether quantised weights are multiplied in int8 on this CPU: at `fast`, where the CPU has
    /// AVX-512 VNNI. Only `vpdpbusd` makes the two activation passes pay: without it the int8
    /// matmul is slower than the f32 one, so the weights take `exact`'s layout
    /// (docs/benchmarks.md).
    pub fn int8_matmuls(self) -> bool {
        self == Precision::Fast && Isa::chosen() >= Isa::Avx512Vnni
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::Exact => "exact",
            Precision::Fast => "fast",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "exact" => Ok(Precision::Exact),
            "fast" => Ok(Precision::Fast),
            _ => Err(format!("unknown precision {s:?}: expected fast or exact")),
        }
    }
}

/// The value type of the KV cache (vLLM's `--kv-cache-dtype`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum KvCacheDtype {
    /// f32 at [`Precision::Exact`], f16 at [`Precision::Fast`].
    #[default]
    Auto,
    F32,
    F16,
}

impl KvCacheDtype {
    pub fn name(self) -> &'static str {
        match self {
            KvCacheDtype::Auto => "auto",
            KvCacheDtype::F32 => "f32",
            KvCacheDtype::F16 => "f16",
        }
    }
}

impl std::str::FromStr for KvCacheDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(KvCacheDtype::Auto),
            "f32" | "float32" => Ok(KvCacheDtype::F32),
            "f16" | "float16" | "half" => Ok(KvCacheDtype::F16),
            _ => Err(format!(
                "unknown KV cache dtype {s:?}: expected auto, f32 or f16"
            )),
        }
    }
}

/// The reference backend: f32 on the host (int8 matmuls at [`Precision::Fast`]), parallel over
/// the rayon pool.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuBackend {
    pub precision: Precision,
    pub kv_cache_dtype: KvCacheDtype,
}

impl From<Precision> for CpuBackend {
    fn from(precision: Precision) -> Self {
        Self {
            precision,
            kv_cache_dtype: KvCacheDtype::Auto,
        }
    }
}

impl CpuBackend {
    /// Whether keys and values are cached in f16 (else f32).
    pub fn kv_f16(&self) -> bool {
        match self.kv_cache_dtype {
            KvCacheDtype::Auto => self.precision == Precision::Fast,
            KvCacheDtype::F32 => false,
            KvCacheDtype::F16 => true,
        }
    }

    /// The KV cache's value type as the start-up line and the bench JSON name it.
    pub fn kv_value_name(&self) -> &'static str {
        if self.kv_f16() {
            "f16"
        } else {
            "f32"
        }
    }
}

/// Host KV memory: per layer, keys and values as `[num_blocks, kv_heads, block_size, head_dim]`
/// (each KV head's positions of a block side by side, so attention reads them in one run), in
/// f32 or f16 ([`CpuBackend::kv_f16`]).
#[derive(Debug)]
pub struct CpuKvStore {
    values: KvValues,
    block_size: usize,
    head_dim: usize,
}

/// Per layer, keys and values.
#[derive(Debug)]
enum KvValues {
    F32(Vec<Vec<f32>>, Vec<Vec<f32>>),
    F16(Vec<Vec<half::f16>>, Vec<Vec<half::f16>>),
}

impl Backend for CpuBackend {
    type Buf = CpuTensor;
    type Matrix = PackedMatrix;
    type Vector = Vec<f32>;
    type KvStore = CpuKvStore;

    fn matrix(&self, data: Vec<f32>, rows: usize, cols: usize) -> PackedMatrix {
        PackedMatrix::pack(&data, rows, cols)
    }

    fn vector(&self, data: Vec<f32>) -> Vec<f32> {
        data
    }

    fn quantized_matrix(
        &self,
        ty: GgmlType,
        data: &[u8],
        rows: usize,
        cols: usize,
    ) -> Option<PackedMatrix> {
        match self.precision {
            Precision::Exact => PackedMatrix::pack_quantized(ty, data, rows, cols),
            // Two int8 passes per activation block (about 15 bits): on 48 prompts × 64 greedy
            // tokens this agreed with HF transformers on 3,022 of 3,072 tokens, where one pass
            // (llama.cpp's 8-bit activations) agreed on fewer than half (bench/accuracy).
            Precision::Fast if self.precision.int8_matmuls() => {
                PackedMatrix::pack_int8(ty, data, rows, cols).map(|m| m.two_pass_activations())
            }
            Precision::Fast => PackedMatrix::pack_quantized(ty, data, rows, cols),
        }
    }

    fn kv_value_bytes(&self) -> usize {
        if self.kv_f16() {
            std::mem::size_of::<half::f16>()
        } else {
            std::mem::size_of::<f32>()
        }
    }

    fn kv_store(
        &self,
        layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> CpuKvStore {
        // Zeroed allocations are mapped lazily by the OS: untouched blocks cost no memory.
        let n = num_blocks * block_size * kv_heads * head_dim;
        let values = if self.kv_f16() {
            // From zeroed u16s, reinterpreted (f16 is u16's layout; zero bits are 0.0): `vec![f16::ZERO;
            // n]` would write every element, committing the whole cache at start-up.
            let zeroed = || half::vec::HalfBitsVecExt::reinterpret_into(vec![0u16; n]);
            KvValues::F16(
                (0..layers).map(|_| zeroed()).collect(),
                (0..layers).map(|_| zeroed()).collect(),
            )
        } else {
            KvValues::F32(
                (0..layers).map(|_| vec![0f32; n]).collect(),
                (0..layers).map(|_| vec![0f32; n]).collect(),
            )
        };
        CpuKvStore {
            values,
            block_size,
            head_dim,
        }
    }

    fn embed(&self, table: &PackedMatrix, ids: &[u32], first_id: u32) -> CpuTensor {
        let d = table.cols();
        let mut data = vec![0f32; ids.len() * d];
        for (row, &id) in data.chunks_exact_mut(d).zip(ids) {
            if let Some(local) = id
                .checked_sub(first_id)
                .filter(|&i| (i as usize) < table.rows())
            {
                table.row_into(local as usize, row);
            }
        }
        CpuTensor { data, cols: d }
    }

    fn all_reduce_sum(&self, x: &mut CpuTensor, c: &dyn Collective) {
        c.all_reduce_sum(&mut x.data);
    }

    fn all_gather_cols(&self, x: &CpuTensor, c: &dyn Collective) -> CpuTensor {
        let world = c.world_size();
        let data = ranks_side_by_side(&c.all_gather(&x.data), x.rows(), x.cols, world);
        CpuTensor {
            data,
            cols: x.cols * world,
        }
    }

    fn rms_norm(&self, x: &CpuTensor, weight: &Vec<f32>, eps: f32) -> CpuTensor {
        let mut out = vec![0f32; x.data.len()];
        cpu::rms_norm(&x.data, weight, eps, &mut out);
        CpuTensor {
            data: out,
            cols: x.cols,
        }
    }

    fn linear(&self, x: &CpuTensor, w: &PackedMatrix, bias: Option<&Vec<f32>>) -> CpuTensor {
        let (m, n) = (x.rows(), w.rows());
        debug_assert_eq!(x.cols, w.cols());
        let mut out = vec![0f32; m * n];
        cpu::linear(&x.data, m, w, &mut out);
        if let Some(b) = bias {
            for row in out.chunks_exact_mut(n) {
                cpu::add_assign(row, b);
            }
        }
        CpuTensor { data: out, cols: n }
    }

    fn rope(
        &self,
        x: &mut CpuTensor,
        positions: &[usize],
        heads: usize,
        head_dim: usize,
        inv_freq: &[f32],
    ) {
        cpu::rope_neox(&mut x.data, positions, heads, head_dim, inv_freq);
    }

    fn silu_mul(&self, gate: &mut CpuTensor, up: &CpuTensor) {
        match self.precision {
            Precision::Exact => cpu::silu_mul(&mut gate.data, &up.data),
            Precision::Fast => cpu::fastmath::silu_mul(&mut gate.data, &up.data),
        }
    }

    fn gelu_tanh_mul(&self, gate: &mut CpuTensor, up: &CpuTensor) {
        cpu::gelu_tanh_mul(&mut gate.data, &up.data);
    }

    fn scale(&self, x: &mut CpuTensor, s: f32) {
        cpu::scale(&mut x.data, s);
    }

    fn add(&self, x: &mut CpuTensor, y: &CpuTensor) {
        cpu::add_assign(&mut x.data, &y.data);
    }

    fn slice_rows(&self, x: &CpuTensor, start: usize, n: usize) -> CpuTensor {
        CpuTensor {
            data: x.data[start * x.cols..(start + n) * x.cols].to_vec(),
            cols: x.cols,
        }
    }

    fn concat_rows(&self, parts: Vec<CpuTensor>) -> CpuTensor {
        let cols = parts.first().map_or(0, |p| p.cols);
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.data.len()).sum());
        for p in parts {
            debug_assert_eq!(p.cols, cols);
            data.extend_from_slice(&p.data);
        }
        CpuTensor { data, cols }
    }

    fn write_kv(
        &self,
        store: &mut CpuKvStore,
        layer: usize,
        k: &CpuTensor,
        v: &CpuTensor,
        slots: &[usize],
    ) {
        let (hd, bs) = (store.head_dim, store.block_size);
        match &mut store.values {
            KvValues::F32(ks, vs) => {
                cpu::write_kv(&mut ks[layer], &k.data, slots, k.cols, hd, bs);
                cpu::write_kv(&mut vs[layer], &v.data, slots, v.cols, hd, bs);
            }
            KvValues::F16(ks, vs) => {
                cpu::write_kv(&mut ks[layer], &k.data, slots, k.cols, hd, bs);
                cpu::write_kv(&mut vs[layer], &v.data, slots, v.cols, hd, bs);
            }
        }
    }

    fn attention(
        &self,
        q: &CpuTensor,
        store: &CpuKvStore,
        layer: usize,
        seqs: &[AttnSeq<'_>],
        shape: AttentionShape,
    ) -> CpuTensor {
        let mut out = vec![0f32; q.data.len()];
        let shape = AttentionShape {
            fast_exp: self.precision == Precision::Fast,
            ..shape
        };
        let block_size = store.block_size;
        match &store.values {
            KvValues::F32(k, v) => {
                let kv = cpu::PagedKv {
                    k: &k[layer],
                    v: &v[layer],
                    block_size,
                };
                cpu::paged_attention(&q.data, kv, seqs, shape, &mut out);
            }
            KvValues::F16(k, v) => {
                let kv = cpu::PagedKv {
                    k: &k[layer],
                    v: &v[layer],
                    block_size,
                };
                cpu::paged_attention(&q.data, kv, seqs, shape, &mut out);
            }
        }
        CpuTensor {
            data: out,
            cols: q.cols,
        }
    }

    fn to_host(&self, x: &CpuTensor) -> Vec<f32> {
        x.data.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resident memory of this process (Linux), in bytes.
    fn rss() -> Option<u64> {
        let s = std::fs::read_to_string("/proc/self/status").ok()?;
        let kb = s.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
        Some(
            kb.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()?
                * 1024,
        )
    }

    #[test]
    fn an_untouched_kv_cache_takes_no_memory_in_either_value_type() {
        for kv_cache_dtype in [KvCacheDtype::F32, KvCacheDtype::F16] {
            let backend = CpuBackend {
                precision: Precision::Fast,
                kv_cache_dtype,
            };
            let Some(before) = rss() else { return };
            // 2 layers × 2 × 2^27 values: 1 GiB in f32, 512 MiB in f16.
            let store = backend.kv_store(2, 1 << 17, 16, 1, 64);
            let grown = rss().unwrap_or(before).saturating_sub(before);
            assert!(
                grown < 64 << 20,
                "{kv_cache_dtype:?}: allocating the cache made {} MiB resident",
                grown >> 20
            );
            drop(store);
        }
    }
}
