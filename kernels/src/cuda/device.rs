//! [`CudaDevice`]: one GPU as a [`Device`] — the NVRTC-compiled kernels of this folder, cuBLAS
//! for the GEMMs (both loaded at run time: the binary builds and starts without CUDA), buffers
//! on the device's default stream.

use std::sync::Arc;

use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;

use super::launch::{driver, CudaKernels};
use crate::device::{need, Device, DeviceError, Elem, PagedAttention, Result};

/// A cuBLAS handle that moves between threads.
struct Blas(CudaBlas);

// SAFETY: a cuBLAS handle may be used from any thread as long as one thread uses it at a time;
// `CudaDevice` only calls it under the `Mutex` that holds it.
unsafe impl Send for Blas {}

/// One GPU: its kernels, its cuBLAS handle and its stream.
pub struct CudaDevice {
    pub kernels: CudaKernels,
    blas: std::sync::Mutex<Blas>,
    ordinal: usize,
    name: String,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("ordinal", &self.ordinal)
            .field("name", &self.name)
            .field("arch", &self.kernels.arch)
            .finish_non_exhaustive()
    }
}

impl CudaDevice {
    /// GPU `ordinal`: compiles the kernels for it and opens cuBLAS. A missing driver, device,
    /// NVRTC or cuBLAS is a [`DeviceError`] that names it.
    pub fn new(ordinal: usize) -> Result<Self> {
        let kernels = CudaKernels::new(ordinal)?;
        // SAFETY: only opens (dlopen) and closes the library to see whether it exists.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(DeviceError::NoLibrary("cuBLAS (libcublas)"));
        }
        let blas = CudaBlas::new(kernels.stream.clone()).map_err(driver)?;
        let name = kernels.ctx.name().map_err(driver)?;
        Ok(Self {
            kernels,
            blas: std::sync::Mutex::new(Blas(blas)),
            ordinal,
            name,
        })
    }

    /// GPUs visible to this process (0 without a driver).
    pub fn count() -> usize {
        // SAFETY: only opens (dlopen) and closes the driver library to see whether it exists.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return 0;
        }
        cudarc::driver::CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.kernels.stream
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
}

impl Device for CudaDevice {
    type Buf<T: Elem> = CudaSlice<T>;

    fn name(&self) -> String {
        format!(
            "{} (cuda:{}, {})",
            self.name, self.ordinal, self.kernels.arch
        )
    }

    fn memory(&self) -> Result<(u64, u64)> {
        let (free, total) = self.kernels.ctx.mem_get_info().map_err(driver)?;
        Ok((free as u64, total as u64))
    }

    fn len<T: Elem>(&self, buf: &CudaSlice<T>) -> usize {
        buf.len()
    }

    fn zeros<T: Elem>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream().alloc_zeros::<T>(n.max(1)).map_err(driver)
    }

    fn upload<T: Elem>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        if host.is_empty() {
            return self.zeros(1);
        }
        self.stream().clone_htod(host).map_err(driver)
    }

    fn download<T: Elem>(&self, buf: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream().clone_dtoh(buf).map_err(driver)
    }

    fn copy<T: Elem>(
        &self,
        src: &CudaSlice<T>,
        src_at: usize,
        dst: &mut CudaSlice<T>,
        dst_at: usize,
        n: usize,
    ) -> Result<()> {
        need(
            src_at + n <= src.len() && dst_at + n <= dst.len(),
            "copy: ranges",
        )?;
        if n == 0 {
            return Ok(());
        }
        let from = src.slice(src_at..src_at + n);
        let mut to = dst.slice_mut(dst_at..dst_at + n);
        self.stream().memcpy_dtod(&from, &mut to).map_err(driver)
    }

    fn gemm(
        &self,
        x: &CudaSlice<bf16>,
        w: &CudaSlice<bf16>,
        out: &mut CudaSlice<bf16>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        need(
            x.len() >= m * k && w.len() >= n * k && out.len() >= m * n,
            "gemm: sizes",
        )?;
        let fits = |v: usize| i32::try_from(v).is_ok();
        need(fits(m) && fits(n) && fits(k), "gemm: dimensions")?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        // Row-major out[m, n] = x[m, k] · w[n, k]ᵀ is column-major outᵀ[n, m] = wᵀ… i.e.
        // cuBLAS computes C(n×m) = op(A)(n×k) · B(k×m) with A = w read transposed (k×n
        // column-major is w row-major) and B = x as stored (k×m column-major).
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: n as i32,
            n: m as i32,
            k: k as i32,
            alpha: bf16::ONE,
            lda: k as i32,
            ldb: k as i32,
            beta: bf16::ZERO,
            ldc: n as i32,
        };
        let blas = self.blas.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: the operands hold at least n×k, k×m and n×m elements (checked above), as the
        // leading dimensions and sizes given to cuBLAS read and write; all three live on the
        // stream the handle is bound to.
        unsafe { blas.0.gemm(cfg, w, x, out) }.map_err(driver)
    }

    fn embedding(
        &self,
        table: &CudaSlice<bf16>,
        ids: &CudaSlice<u32>,
        out: &mut CudaSlice<bf16>,
        dim: usize,
        first_id: u32,
    ) -> Result<()> {
        need(dim > 0, "embedding: dim")?;
        self.kernels
            .embedding(table, table.len() / dim, ids, out, dim, first_id)
    }

    fn add_rms_norm(
        &self,
        hidden: &mut CudaSlice<bf16>,
        delta: Option<&CudaSlice<bf16>>,
        weight: &CudaSlice<bf16>,
        out: &mut CudaSlice<bf16>,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        self.kernels
            .add_rms_norm(hidden, delta, weight, out, dim, eps)
    }

    fn rms_norm(
        &self,
        x: &CudaSlice<bf16>,
        weight: &CudaSlice<bf16>,
        out: &mut CudaSlice<bf16>,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        self.kernels.rms_norm(x, weight, out, dim, eps)
    }

    fn rope(
        &self,
        x: &mut CudaSlice<bf16>,
        positions: &CudaSlice<i32>,
        inv_freq: &CudaSlice<f32>,
        heads: usize,
        head_dim: usize,
        interleaved: bool,
    ) -> Result<()> {
        self.kernels
            .rope(x, positions, inv_freq, heads, head_dim, interleaved)
    }

    fn silu_mul(&self, gate: &mut CudaSlice<bf16>, up: &CudaSlice<bf16>) -> Result<()> {
        self.kernels.silu_mul(gate, up)
    }

    fn gelu_tanh_mul(&self, gate: &mut CudaSlice<bf16>, up: &CudaSlice<bf16>) -> Result<()> {
        self.kernels.gelu_tanh_mul(gate, up)
    }

    fn add(&self, x: &mut CudaSlice<bf16>, y: &CudaSlice<bf16>) -> Result<()> {
        self.kernels.add(x, y)
    }

    fn scale(&self, x: &mut CudaSlice<bf16>, s: f32) -> Result<()> {
        self.kernels.scale(x, s)
    }

    fn add_bias(&self, x: &mut CudaSlice<bf16>, bias: &CudaSlice<bf16>) -> Result<()> {
        self.kernels.add_bias(x, bias)
    }

    fn write_kv(
        &self,
        k: &CudaSlice<bf16>,
        v: &CudaSlice<bf16>,
        k_cache: &mut CudaSlice<bf16>,
        v_cache: &mut CudaSlice<bf16>,
        slots: &CudaSlice<i64>,
        width: usize,
    ) -> Result<()> {
        self.kernels.write_kv(k, v, k_cache, v_cache, slots, width)
    }

    fn paged_attention(
        &self,
        q: &CudaSlice<bf16>,
        k_cache: &CudaSlice<bf16>,
        v_cache: &CudaSlice<bf16>,
        tables: &CudaSlice<i32>,
        groups: &CudaSlice<i32>,
        out: &mut CudaSlice<bf16>,
        partial: &mut CudaSlice<f32>,
        shape: &PagedAttention,
    ) -> Result<()> {
        self.kernels
            .paged_attention(q, k_cache, v_cache, tables, groups, out, partial, shape)
    }

    fn argmax(
        &self,
        logits: &CudaSlice<f32>,
        vocab: usize,
        out: &mut CudaSlice<u32>,
    ) -> Result<()> {
        self.kernels.argmax(logits, vocab, out)
    }

    fn take_violations(&self) -> Result<()> {
        self.kernels.take_violations()
    }
}
