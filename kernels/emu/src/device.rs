//! [`EmuDevice`]: the emulated kernels as a [`Device`], buffers in host memory, the GEMM on the
//! CPU in bf16 with f32 accumulation (what cuBLAS computes with `CUBLAS_COMPUTE_32F`). The GPU
//! backend runs whole models on it in `make test`.

use std::sync::Mutex;

use gristmill_kernels::device::{need, violations_result, Device, Elem, PagedAttention, Result};
use half::bf16;
use rayon::prelude::*;

/// The CUDA kernels on CPU threads, with `capacity` bytes of pretend device memory (what
/// [`Device::memory`] reports, for the backend's KV sizing).
#[derive(Debug)]
pub struct EmuDevice {
    capacity: u64,
    violations: Mutex<i32>,
}

impl EmuDevice {
    pub fn new(capacity: u64) -> Self {
        Self {
            capacity,
            violations: Mutex::new(0),
        }
    }

    fn report(&self, bits: i32) {
        *self.violations.lock().unwrap_or_else(|p| p.into_inner()) |= bits;
    }
}

impl Default for EmuDevice {
    fn default() -> Self {
        Self::new(1 << 30)
    }
}

impl Device for EmuDevice {
    type Buf<T: Elem> = Vec<T>;

    fn name(&self) -> String {
        "CUDA kernel emulation on the CPU".into()
    }

    fn memory(&self) -> Result<(u64, u64)> {
        Ok((self.capacity, self.capacity))
    }

    fn len<T: Elem>(&self, buf: &Vec<T>) -> usize {
        buf.len()
    }

    fn zeros<T: Elem>(&self, n: usize) -> Result<Vec<T>> {
        Ok(vec![T::default(); n])
    }

    fn upload<T: Elem>(&self, host: &[T]) -> Result<Vec<T>> {
        Ok(host.to_vec())
    }

    fn download<T: Elem>(&self, buf: &Vec<T>) -> Result<Vec<T>> {
        Ok(buf.clone())
    }

    fn copy<T: Elem>(
        &self,
        src: &Vec<T>,
        src_at: usize,
        dst: &mut Vec<T>,
        dst_at: usize,
        n: usize,
    ) -> Result<()> {
        need(
            src_at + n <= src.len() && dst_at + n <= dst.len(),
            "copy: ranges",
        )?;
        dst[dst_at..dst_at + n].copy_from_slice(&src[src_at..src_at + n]);
        Ok(())
    }

    fn gemm(
        &self,
        x: &Vec<bf16>,
        w: &Vec<bf16>,
        out: &mut Vec<bf16>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        need(
            x.len() >= m * k && w.len() >= n * k && out.len() >= m * n,
            "gemm: sizes",
        )?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        let xf: Vec<f32> = x[..m * k].iter().map(|v| v.to_f32()).collect();
        let wf: Vec<f32> = w[..n * k].iter().map(|v| v.to_f32()).collect();
        out[..m * n]
            .par_chunks_mut(n)
            .zip(xf.par_chunks(k.max(1)))
            .for_each(|(row, xr)| {
                for (o, wr) in row.iter_mut().zip(wf.chunks(k.max(1))) {
                    let dot: f32 = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
                    *o = bf16::from_f32(dot);
                }
            });
        Ok(())
    }

    fn embedding(
        &self,
        table: &Vec<bf16>,
        ids: &Vec<u32>,
        out: &mut Vec<bf16>,
        dim: usize,
        first_id: u32,
    ) -> Result<()> {
        need(dim > 0 && out.len() >= ids.len() * dim, "embedding")?;
        crate::embedding(table, ids, out, dim, first_id);
        Ok(())
    }

    fn add_rms_norm(
        &self,
        hidden: &mut Vec<bf16>,
        delta: Option<&Vec<bf16>>,
        weight: &Vec<bf16>,
        out: &mut Vec<bf16>,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        let n = hidden.len();
        need(
            dim > 0
                && n.is_multiple_of(dim)
                && out.len() >= n
                && weight.len() >= dim
                && delta.is_none_or(|d| d.len() >= n),
            "add_rms_norm",
        )?;
        crate::add_rms_norm(hidden, delta.map(|d| &d[..]), weight, out, dim, eps);
        Ok(())
    }

    fn rms_norm(
        &self,
        x: &Vec<bf16>,
        weight: &Vec<bf16>,
        out: &mut Vec<bf16>,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        need(
            dim > 0 && x.len().is_multiple_of(dim) && out.len() >= x.len() && weight.len() >= dim,
            "rms_norm",
        )?;
        crate::rms_norm(x, weight, out, dim, eps);
        Ok(())
    }

    fn rope(
        &self,
        x: &mut Vec<bf16>,
        positions: &Vec<i32>,
        inv_freq: &Vec<f32>,
        heads: usize,
        head_dim: usize,
        interleaved: bool,
    ) -> Result<()> {
        need(
            x.len() >= positions.len() * heads * head_dim && inv_freq.len() >= head_dim / 2,
            "rope",
        )?;
        crate::rope(x, positions, inv_freq, heads, head_dim, interleaved);
        Ok(())
    }

    fn silu_mul(&self, gate: &mut Vec<bf16>, up: &Vec<bf16>) -> Result<()> {
        need(up.len() >= gate.len(), "silu_mul")?;
        crate::silu_mul(gate, up);
        Ok(())
    }

    fn gelu_tanh_mul(&self, gate: &mut Vec<bf16>, up: &Vec<bf16>) -> Result<()> {
        need(up.len() >= gate.len(), "gelu_tanh_mul")?;
        crate::gelu_tanh_mul(gate, up);
        Ok(())
    }

    fn add(&self, x: &mut Vec<bf16>, y: &Vec<bf16>) -> Result<()> {
        need(y.len() >= x.len(), "add")?;
        crate::add(x, y);
        Ok(())
    }

    fn scale(&self, x: &mut Vec<bf16>, s: f32) -> Result<()> {
        crate::scale(x, s);
        Ok(())
    }

    fn add_bias(&self, x: &mut Vec<bf16>, bias: &Vec<bf16>) -> Result<()> {
        need(
            !bias.is_empty() && x.len().is_multiple_of(bias.len()),
            "add_bias",
        )?;
        crate::add_bias(x, bias);
        Ok(())
    }

    fn write_kv(
        &self,
        k: &Vec<bf16>,
        v: &Vec<bf16>,
        k_cache: &mut Vec<bf16>,
        v_cache: &mut Vec<bf16>,
        slots: &Vec<i64>,
        width: usize,
    ) -> Result<()> {
        let rows = slots.len();
        need(
            width > 0
                && k.len() >= rows * width
                && v.len() >= rows * width
                && k_cache.len() == v_cache.len(),
            "write_kv",
        )?;
        let bits = crate::write_kv(k, v, k_cache, v_cache, slots, width);
        self.report(bits);
        Ok(())
    }

    fn paged_attention(
        &self,
        q: &Vec<bf16>,
        k_cache: &Vec<bf16>,
        v_cache: &Vec<bf16>,
        tables: &Vec<i32>,
        groups: &Vec<i32>,
        out: &mut Vec<bf16>,
        partial: &mut Vec<f32>,
        shape: &PagedAttention,
    ) -> Result<()> {
        shape.check()?;
        let per_row = shape.heads * shape.head_dim;
        let rows = q.len() / per_row;
        need(
            out.len() >= rows * per_row
                && tables.len() >= groups.len() / 3 * shape.max_blocks
                && partial.len() >= shape.partial_len(rows),
            "paged attention",
        )?;
        let bits = crate::paged_attention(q, k_cache, v_cache, tables, groups, out, partial, shape);
        self.report(bits);
        Ok(())
    }

    fn argmax(&self, logits: &Vec<f32>, vocab: usize, out: &mut Vec<u32>) -> Result<()> {
        need(vocab > 0 && logits.len() >= out.len() * vocab, "argmax")?;
        let got = crate::argmax(&logits[..out.len() * vocab], vocab);
        out.copy_from_slice(&got);
        Ok(())
    }

    fn take_violations(&self) -> Result<()> {
        let bits = std::mem::take(&mut *self.violations.lock().unwrap_or_else(|p| p.into_inner()));
        violations_result(bits)
    }
}
