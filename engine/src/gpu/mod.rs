//! The GPU backend: the model's ops on a [`Device`] — bf16 weights and activations in device
//! memory, GEMMs with f32 accumulation, a paged bf16 KV cache, the kernels of
//! `kernels/src/cuda/`. One implementation for every device: CUDA ([`cuda`], feature `cuda`)
//! and the CPU emulation of the same kernels (`gristmill-kernels-emu`), on which `make test`
//! runs whole models against the CPU backend and HF transformers without a GPU.
//!
//! Host-side work per step: slot indices, positions, and the query rows packed for attention
//! in groups of consecutive rows of one sequence with its block table ([`AttentionPacking`];
//! the kernel is causal within a group and split over the context for long decodes), uploaded
//! once per step and reused by every layer (`Staging`). The model runs in a rank thread ([`crate::tensor_parallel::TpGroup`]), where a
//! device error panics with the device's message, which fails the group (and the step's
//! requests) instead of the process.

use std::sync::{Arc, Mutex};

use gristmill_kernels::device::{AttentionPacking, Device, Elem};
use half::bf16;

use crate::backend::{ranks_side_by_side, AttentionShape, AttnSeq, Backend};
use crate::parallel::Collective;

#[cfg(feature = "cuda")]
pub mod cuda;

pub use gristmill_kernels::device::DeviceError;

/// Where a model computes (`--device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CUDA GPU 0 when this build has CUDA and the machine a GPU, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// A CUDA GPU: `cuda` is GPU 0 (or GPUs `0..N` with tensor parallelism), `cuda:N` GPU N.
    Cuda(Option<usize>),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(None)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .map(|n| Self::Cuda(Some(n)))
                .ok_or_else(|| {
                    format!("unknown device {other:?}: expected auto, cpu, cuda or cuda:N")
                }),
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(None) => f.write_str("cuda"),
            Self::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

/// GPUs this build can use on this machine: 0 without the `cuda` feature or a driver.
pub fn cuda_device_count() -> usize {
    #[cfg(feature = "cuda")]
    {
        gristmill_kernels::cuda::device::CudaDevice::count()
    }
    #[cfg(not(feature = "cuda"))]
    {
        0
    }
}

/// A sum over the ranks done on device buffers (NCCL); without one, [`GpuBackend`] stages
/// through host memory and the rank's [`Collective`].
pub trait DeviceReduce<D: Device>: Send + Sync + std::fmt::Debug {
    fn all_reduce_sum(&self, dev: &D, x: &mut D::Buf<bf16>) -> Result<(), String>;
}

/// The model's ops on device `D`.
pub struct GpuBackend<D: Device> {
    pub dev: Arc<D>,
    staging: Mutex<Staging<D>>,
    reduce: Option<Arc<dyn DeviceReduce<D>>>,
}

impl<D: Device> std::fmt::Debug for GpuBackend<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuBackend")
            .field("device", &self.dev.name())
            .field("device_reduce", &self.reduce.is_some())
            .finish_non_exhaustive()
    }
}

impl<D: Device> GpuBackend<D> {
    pub fn new(dev: Arc<D>) -> Self {
        Self {
            dev,
            staging: Mutex::new(Staging::default()),
            reduce: None,
        }
    }

    /// Sums over the ranks on device buffers with `reduce` (NCCL).
    pub fn with_reduce(mut self, reduce: Arc<dyn DeviceReduce<D>>) -> Self {
        self.reduce = Some(reduce);
        self
    }

    /// The value of a device operation, or a panic naming the device and the op (caught by
    /// the rank thread, which fails the group with it).
    fn ok<T>(&self, r: Result<T, DeviceError>, op: &str) -> T {
        r.unwrap_or_else(|e| panic!("{}: {op}: {e}", self.dev.name()))
    }

    fn zeros(&self, n: usize) -> D::Buf<bf16> {
        self.ok(self.dev.zeros(n), "allocate")
    }

    /// `host` on the device, reusing the buffer of an equal earlier upload.
    fn staged<T: Elem + PartialEq>(
        &self,
        host: Vec<T>,
        pick: impl FnOnce(&mut Staging<D>) -> &mut Stage<D, T>,
    ) -> Arc<D::Buf<T>> {
        let mut s = self.staging.lock().unwrap_or_else(|p| p.into_inner());
        let stage = pick(&mut s);
        if let Some(buf) = stage.find(&host) {
            return buf;
        }
        let buf = Arc::new(self.ok(self.dev.upload(&host), "upload"));
        stage.keep(host, buf.clone());
        buf
    }

    fn upload_bf16(&self, data: &[f32]) -> D::Buf<bf16> {
        let host: Vec<bf16> = data.iter().map(|&v| bf16::from_f32(v)).collect();
        self.ok(self.dev.upload(&host), "upload weights")
    }
}

/// A matrix in device memory, `rows × cols` bf16 values: activations, and the weights (a
/// vector is one row).
pub struct GpuTensor<D: Device> {
    data: D::Buf<bf16>,
    rows: usize,
    cols: usize,
}

impl<D: Device> GpuTensor<D> {
    fn new(data: D::Buf<bf16>, rows: usize, cols: usize) -> Self {
        Self { data, rows, cols }
    }
}

impl<D: Device> std::fmt::Debug for GpuTensor<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuTensor[{}×{}]", self.rows, self.cols)
    }
}

/// Paged KV memory of every layer: keys and values as `[num_blocks × block_size, kv_heads ×
/// head_dim]` bf16 (slot-major: a position's heads side by side).
pub struct GpuKvStore<D: Device> {
    k: Vec<D::Buf<bf16>>,
    v: Vec<D::Buf<bf16>>,
    block_size: usize,
    width: usize,
}

impl<D: Device> std::fmt::Debug for GpuKvStore<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuKvStore")
            .field("layers", &self.k.len())
            .field("block_size", &self.block_size)
            .field("width", &self.width)
            .finish()
    }
}

/// Host data and its upload.
type Staged<D, T> = (Vec<T>, Arc<<D as Device>::Buf<T>>);

/// The last few uploads of one element type, kept to be reused while a step's layers ask for
/// the same host data again (positions, slots and attention tables are equal in every layer).
struct Stage<D: Device, T: Elem> {
    entries: Vec<Staged<D, T>>,
}

impl<D: Device, T: Elem> Default for Stage<D, T> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
        }
    }
}

/// Uploads a step remembers: a handful is enough (a step uploads at most three of a kind: the
/// positions, attention groups and block tables are all `i32`).
const STAGE_ENTRIES: usize = 4;

impl<D: Device, T: Elem + PartialEq> Stage<D, T> {
    fn find(&mut self, host: &[T]) -> Option<Arc<D::Buf<T>>> {
        let i = self.entries.iter().position(|(h, _)| h == host)?;
        // Most recently used last.
        let e = self.entries.remove(i);
        let buf = e.1.clone();
        self.entries.push(e);
        Some(buf)
    }

    fn keep(&mut self, host: Vec<T>, buf: Arc<D::Buf<T>>) {
        if self.entries.len() == STAGE_ENTRIES {
            self.entries.remove(0);
        }
        self.entries.push((host, buf));
    }
}

/// Host data of recent steps on the device, by element type.
struct Staging<D: Device> {
    u32s: Stage<D, u32>,
    i32s: Stage<D, i32>,
    i64s: Stage<D, i64>,
    f32s: Stage<D, f32>,
}

impl<D: Device> Default for Staging<D> {
    fn default() -> Self {
        Self {
            u32s: Stage::default(),
            i32s: Stage::default(),
            i64s: Stage::default(),
            f32s: Stage::default(),
        }
    }
}

impl<D: Device> Backend for GpuBackend<D> {
    type Buf = GpuTensor<D>;
    type Matrix = GpuTensor<D>;
    type Vector = GpuTensor<D>;
    type KvStore = GpuKvStore<D>;

    fn matrix(&self, data: Vec<f32>, rows: usize, cols: usize) -> GpuTensor<D> {
        GpuTensor::new(self.upload_bf16(&data), rows, cols)
    }

    fn vector(&self, data: Vec<f32>) -> GpuTensor<D> {
        GpuTensor::new(self.upload_bf16(&data), 1, data.len())
    }

    fn kv_value_bytes(&self) -> usize {
        std::mem::size_of::<bf16>()
    }

    fn device_memory(&self) -> Option<(u64, u64)> {
        self.dev.memory().ok()
    }

    fn kv_store(
        &self,
        layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> GpuKvStore<D> {
        let width = kv_heads * head_dim;
        let n = num_blocks * block_size * width;
        let mut k = Vec::with_capacity(layers);
        let mut v = Vec::with_capacity(layers);
        for _ in 0..layers {
            k.push(self.ok(self.dev.zeros(n), "allocate the KV cache"));
            v.push(self.ok(self.dev.zeros(n), "allocate the KV cache"));
        }
        GpuKvStore {
            k,
            v,
            block_size,
            width,
        }
    }

    fn embed(&self, table: &GpuTensor<D>, ids: &[u32], first_id: u32) -> GpuTensor<D> {
        let d = table.cols;
        let rows = ids.len();
        let ids = self.staged(ids.to_vec(), |s| &mut s.u32s);
        let mut out = self.zeros(rows * d);
        self.ok(
            self.dev.embedding(&table.data, &ids, &mut out, d, first_id),
            "embedding",
        );
        GpuTensor::new(out, rows, d)
    }

    fn all_reduce_sum(&self, x: &mut GpuTensor<D>, c: &dyn Collective) {
        if c.world_size() <= 1 {
            return;
        }
        if let Some(r) = &self.reduce {
            if let Err(e) = r.all_reduce_sum(&self.dev, &mut x.data) {
                panic!("{}: all-reduce: {e}", self.dev.name());
            }
            return;
        }
        let mut host: Vec<f32> = self.to_host(x);
        c.all_reduce_sum(&mut host);
        x.data = self.upload_bf16(&host);
    }

    fn all_gather_cols(&self, x: &GpuTensor<D>, c: &dyn Collective) -> GpuTensor<D> {
        let world = c.world_size();
        let all = c.all_gather(&self.to_host(x));
        let data = ranks_side_by_side(&all, x.rows, x.cols, world);
        let buf = self.upload_bf16(&data);
        GpuTensor::new(buf, x.rows, x.cols * world)
    }

    fn rms_norm(&self, x: &GpuTensor<D>, weight: &GpuTensor<D>, eps: f32) -> GpuTensor<D> {
        let mut out = self.zeros(x.rows * x.cols);
        self.ok(
            self.dev
                .rms_norm(&x.data, &weight.data, &mut out, weight.cols, eps),
            "rms_norm",
        );
        GpuTensor::new(out, x.rows, x.cols)
    }

    fn linear(
        &self,
        x: &GpuTensor<D>,
        w: &GpuTensor<D>,
        bias: Option<&GpuTensor<D>>,
    ) -> GpuTensor<D> {
        let (m, n, k) = (x.rows, w.rows, w.cols);
        debug_assert_eq!(x.cols, k);
        let mut out = self.zeros(m * n);
        self.ok(self.dev.gemm(&x.data, &w.data, &mut out, m, n, k), "gemm");
        if let Some(b) = bias {
            self.ok(self.dev.add_bias(&mut out, &b.data), "bias");
        }
        GpuTensor::new(out, m, n)
    }

    fn rope(
        &self,
        x: &mut GpuTensor<D>,
        positions: &[usize],
        heads: usize,
        head_dim: usize,
        inv_freq: &[f32],
    ) {
        let pos = self.staged(positions.iter().map(|&p| p as i32).collect(), |s| {
            &mut s.i32s
        });
        let freq = self.staged(inv_freq.to_vec(), |s| &mut s.f32s);
        self.ok(
            self.dev
                .rope(&mut x.data, &pos, &freq, heads, head_dim, false),
            "rope",
        );
    }

    fn silu_mul(&self, gate: &mut GpuTensor<D>, up: &GpuTensor<D>) {
        self.ok(self.dev.silu_mul(&mut gate.data, &up.data), "silu_mul");
    }

    fn gelu_tanh_mul(&self, gate: &mut GpuTensor<D>, up: &GpuTensor<D>) {
        self.ok(
            self.dev.gelu_tanh_mul(&mut gate.data, &up.data),
            "gelu_tanh_mul",
        );
    }

    fn scale(&self, x: &mut GpuTensor<D>, s: f32) {
        self.ok(self.dev.scale(&mut x.data, s), "scale");
    }

    fn add(&self, x: &mut GpuTensor<D>, y: &GpuTensor<D>) {
        self.ok(self.dev.add(&mut x.data, &y.data), "add");
    }

    fn slice_rows(&self, x: &GpuTensor<D>, start: usize, n: usize) -> GpuTensor<D> {
        let mut out = self.zeros(n * x.cols);
        self.ok(
            self.dev
                .copy(&x.data, start * x.cols, &mut out, 0, n * x.cols),
            "copy rows",
        );
        GpuTensor::new(out, n, x.cols)
    }

    fn concat_rows(&self, parts: Vec<GpuTensor<D>>) -> GpuTensor<D> {
        // One part (one sequence wanting logits) is already the result: no copy.
        let parts = match <[GpuTensor<D>; 1]>::try_from(parts) {
            Ok([one]) => return one,
            Err(parts) => parts,
        };
        let cols = parts.first().map_or(0, |p| p.cols);
        let rows: usize = parts.iter().map(|p| p.rows).sum();
        let mut out = self.zeros(rows * cols);
        let mut at = 0;
        for p in &parts {
            debug_assert_eq!(p.cols, cols);
            let n = p.rows * cols;
            self.ok(self.dev.copy(&p.data, 0, &mut out, at, n), "copy rows");
            at += n;
        }
        GpuTensor::new(out, rows, cols)
    }

    fn write_kv(
        &self,
        store: &mut GpuKvStore<D>,
        layer: usize,
        k: &GpuTensor<D>,
        v: &GpuTensor<D>,
        slots: &[usize],
    ) {
        let slots = self.staged(slots.iter().map(|&s| s as i64).collect(), |s| &mut s.i64s);
        let width = store.width;
        let (kc, vc) = (&mut store.k[layer], &mut store.v[layer]);
        self.ok(
            self.dev.write_kv(&k.data, &v.data, kc, vc, &slots, width),
            "write_kv",
        );
    }

    fn attention(
        &self,
        q: &GpuTensor<D>,
        store: &GpuKvStore<D>,
        layer: usize,
        seqs: &[AttnSeq<'_>],
        shape: AttentionShape,
    ) -> GpuTensor<D> {
        let packing = AttentionPacking::new(seqs, store.block_size, shape.head_dim);
        let attention = packing.shape(
            shape.heads,
            shape.kv_heads,
            shape.head_dim,
            store.block_size,
            shape.scale,
            shape.window.unwrap_or(0),
        );
        debug_assert_eq!(packing.rows, q.rows);
        let tables = self.staged(packing.tables, |s| &mut s.i32s);
        let groups = self.staged(packing.groups, |s| &mut s.i32s);
        let mut partial = self.ok(
            self.dev.zeros::<f32>(attention.partial_len(q.rows).max(1)),
            "allocate",
        );
        let mut out = self.zeros(q.rows * q.cols);
        self.ok(
            self.dev.paged_attention(
                &q.data,
                &store.k[layer],
                &store.v[layer],
                &tables,
                &groups,
                &mut out,
                &mut partial,
                &attention,
            ),
            "paged attention",
        );
        GpuTensor::new(out, q.rows, q.cols)
    }

    fn to_host(&self, x: &GpuTensor<D>) -> Vec<f32> {
        let host = self.ok(self.dev.download(&x.data), "download");
        // The host waits here anyway: anything a kernel refused since the last step is an
        // error of this step.
        self.ok(self.dev.take_violations(), "bounds");
        host.iter()
            .take(x.rows * x.cols)
            .map(|v| v.to_f32())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse_and_print_back() {
        for (text, want) in [
            ("auto", DeviceChoice::Auto),
            ("cpu", DeviceChoice::Cpu),
            ("cuda", DeviceChoice::Cuda(None)),
            ("cuda:3", DeviceChoice::Cuda(Some(3))),
        ] {
            let got: DeviceChoice = text.parse().expect("parses");
            assert_eq!(got, want);
            assert_eq!(got.to_string(), text);
        }
        for bad in ["tpu", "cuda:", "cuda:x", "cuda:-1"] {
            let e = bad.parse::<DeviceChoice>().expect_err(bad);
            assert!(e.contains("expected auto, cpu, cuda or cuda:N"), "{e}");
        }
    }
}
