//! Typed launch wrappers for the kernels of this folder: compiled by NVRTC for the device's
//! compute capability when [`CudaKernels::new`] runs, once per device.
//!
//! No driver, no device, or a kernel that does not compile: a [`CudaError`] that says which,
//! never a panic (the CPU backend keeps working).

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use half::bf16;

use super::{compile, SOURCES};
use crate::shapes;

/// Why the CUDA kernels are unavailable or a launch failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CudaError {
    #[error("no CUDA driver library (libcuda) on this machine")]
    NoDriver,
    #[error("no CUDA device {0} (this machine has {1})")]
    NoDevice(usize, usize),
    #[error("kernel compilation: {0}")]
    Compile(String),
    #[error("CUDA driver: {0}")]
    Driver(String),
    /// A kernel was handed indices outside its buffers (nothing was read or written there).
    #[error("a CUDA kernel refused out-of-range indices: {0}")]
    OutOfBounds(String),
}

fn driver<E: std::fmt::Debug>(e: E) -> CudaError {
    CudaError::Driver(format!("{e:?}"))
}

/// The compiled kernels of one device, and the stream they run on.
#[derive(Debug)]
pub struct CudaKernels {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    functions: HashMap<&'static str, CudaFunction>,
    /// `sm_XY` of the device.
    pub arch: &'static str,
    /// Bits the bounds-checking kernels set when handed an index outside their buffers
    /// ([`CudaKernels::take_violations`]).
    violations: std::sync::Mutex<CudaSlice<i32>>,
}

/// Bits of the violations word, and what each means.
const VIOLATIONS: [(i32, &str); 3] = [
    (1, "write_kv: a slot outside the KV cache"),
    (
        2,
        "paged_attention_decode: a context length beyond the block table",
    ),
    (4, "paged_attention_decode: a block outside the KV cache"),
];

/// What the set bits of a violations word mean.
pub fn describe_violations(bits: i32) -> Option<String> {
    let said: Vec<&str> = VIOLATIONS
        .iter()
        .filter(|(b, _)| bits & b != 0)
        .map(|(_, what)| *what)
        .collect();
    (bits != 0).then(|| said.join("; "))
}

/// `sm_XY` for NVRTC (a `&'static str`, as cudarc's options want).
fn arch_name(major: i32, minor: i32) -> &'static str {
    match (major, minor) {
        (8, 0) => "sm_80",
        (8, 6) => "sm_86",
        (8, 9) => "sm_89",
        (9, 0) => "sm_90",
        (10, 0) => "sm_100",
        (12, 0) => "sm_120",
        // Newer or unlisted devices: PTX for sm_90 is forward-compatible (JIT by the driver).
        _ => "sm_90",
    }
}

/// The CUDA include folders: `GRISTMILL_CUDA_INCLUDE` (`:`-separated), else none (NVRTC's
/// own built-in headers).
pub fn include_dirs() -> Vec<String> {
    std::env::var("GRISTMILL_CUDA_INCLUDE")
        .map(|v| {
            v.split(':')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// A launch shape ([`crate::shapes`], shared with the CPU emulation) as cudarc's config.
fn config(s: shapes::Shape) -> LaunchConfig {
    LaunchConfig {
        grid_dim: s.grid,
        block_dim: s.block,
        shared_mem_bytes: s.shared_bytes,
    }
}

impl CudaKernels {
    /// Compiles and loads every kernel on device `ordinal`.
    pub fn new(ordinal: usize) -> Result<Self, CudaError> {
        // SAFETY: only opens (dlopen) and closes the driver library to see whether it exists.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(CudaError::NoDriver);
        }
        let count = CudaContext::device_count().map_err(driver)?.max(0) as usize;
        if ordinal >= count {
            return Err(CudaError::NoDevice(ordinal, count));
        }
        let ctx = CudaContext::new(ordinal).map_err(driver)?;
        let (major, minor) = ctx.compute_capability().map_err(driver)?;
        let arch = arch_name(major, minor);
        let dirs = include_dirs();
        let mut functions = HashMap::new();
        for src in SOURCES {
            let ptx = compile(src, arch, &dirs).map_err(CudaError::Compile)?;
            let module = ctx.load_module(ptx).map_err(driver)?;
            for &f in src.functions {
                functions.insert(f, module.load_function(f).map_err(driver)?);
            }
        }
        let stream = ctx.default_stream();
        let violations = stream.alloc_zeros::<i32>(1).map_err(driver)?;
        Ok(Self {
            stream,
            ctx,
            functions,
            arch,
            violations: std::sync::Mutex::new(violations),
        })
    }

    /// Reads (and clears) what the bounds-checking kernels reported since the last call: an
    /// [`CudaError::OutOfBounds`] naming each kind of index they refused. It waits for the
    /// stream, so call it where the host waits anyway (after a step's tokens come back).
    pub fn take_violations(&self) -> Result<(), CudaError> {
        let mut flag = self.violations.lock().unwrap_or_else(|p| p.into_inner());
        let bits = self.stream.clone_dtoh(&*flag).map_err(driver)?;
        let bits = bits.first().copied().unwrap_or(0);
        if bits == 0 {
            return Ok(());
        }
        self.stream.memset_zeros(&mut *flag).map_err(driver)?;
        Err(CudaError::OutOfBounds(
            describe_violations(bits).unwrap_or_default(),
        ))
    }

    fn function(&self, name: &'static str) -> Result<&CudaFunction, CudaError> {
        self.functions
            .get(name)
            .ok_or_else(|| CudaError::Compile(format!("kernel {name} was not loaded")))
    }

    /// `out[r] = table[ids[r] - first_id]` (zeros outside the shard); `out` is `[rows, dim]`.
    pub fn embedding(
        &self,
        table: &CudaSlice<bf16>,
        table_rows: usize,
        ids: &CudaSlice<u32>,
        out: &mut CudaSlice<bf16>,
        dim: usize,
        first_id: u32,
    ) -> Result<(), CudaError> {
        let rows = ids.len();
        assert!(
            out.len() >= rows * dim && table.len() >= table_rows * dim,
            "embedding: buffer sizes"
        );
        let (rows_i, dim_i, tr) = (rows as i32, dim as i32, table_rows as u32);
        let f = self.function("embedding_bf16")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(table)
            .arg(ids)
            .arg(out)
            .arg(&rows_i)
            .arg(&dim_i)
            .arg(&first_id)
            .arg(&tr);
        let cfg = config(shapes::embedding(rows));
        // SAFETY: the argument list matches `embedding_bf16`'s signature; `out` holds
        // `rows * dim` elements and every id reads inside `table` or writes zeros (asserted
        // sizes above, bounds checked in the kernel).
        unsafe { b.launch(cfg) }.map_err(driver)?;
        Ok(())
    }

    /// `hidden += delta` (if any), then `out = rmsnorm(hidden) * weight`, row by row.
    pub fn add_rms_norm(
        &self,
        hidden: &mut CudaSlice<bf16>,
        delta: Option<&CudaSlice<bf16>>,
        weight: &CudaSlice<bf16>,
        out: &mut CudaSlice<bf16>,
        dim: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        let rows = hidden.len() / dim.max(1);
        assert!(
            out.len() >= rows * dim && weight.len() >= dim,
            "add_rms_norm: buffer sizes"
        );
        assert!(
            delta.is_none_or(|d| d.len() >= rows * dim),
            "add_rms_norm: delta size"
        );
        let dim_i = dim as i32;
        let null = 0u64;
        let f = self.function("add_rms_norm_bf16")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(hidden);
        match delta {
            Some(d) => b.arg(d),
            None => b.arg(&null),
        };
        b.arg(weight).arg(out).arg(&dim_i).arg(&eps);
        let cfg = config(shapes::add_rms_norm(rows));
        // SAFETY: arguments match `add_rms_norm_bf16` (a null pointer stands for "no delta",
        // which the kernel checks); 256 threads, a power of two, with 256 floats of shared
        // memory as the kernel requires; buffers hold `rows * dim` elements (asserted).
        unsafe { b.launch(cfg) }.map_err(driver)?;
        Ok(())
    }

    /// RoPE in place on `x` = `[rows, heads, head_dim]`, half-split or interleaved.
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        x: &mut CudaSlice<bf16>,
        positions: &CudaSlice<i32>,
        inv_freq: &CudaSlice<f32>,
        heads: usize,
        head_dim: usize,
        interleaved: bool,
    ) -> Result<(), CudaError> {
        let rows = positions.len();
        assert!(
            x.len() >= rows * heads * head_dim && inv_freq.len() >= head_dim / 2,
            "rope: sizes"
        );
        let (h, d, il) = (heads as i32, head_dim as i32, interleaved as i32);
        let f = self.function("rope_bf16")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(x)
            .arg(positions)
            .arg(inv_freq)
            .arg(&h)
            .arg(&d)
            .arg(&il);
        let cfg = config(shapes::rope(rows, heads, head_dim));
        // SAFETY: arguments match `rope_bf16`; the grid covers rows × heads and each thread
        // strides over the head's pairs inside `x` (sizes asserted).
        unsafe { b.launch(cfg) }.map_err(driver)?;
        Ok(())
    }

    /// `gate = silu(gate) * up`, element-wise.
    pub fn silu_mul(
        &self,
        gate: &mut CudaSlice<bf16>,
        up: &CudaSlice<bf16>,
    ) -> Result<(), CudaError> {
        let n = gate.len();
        assert!(up.len() >= n, "silu_mul: sizes");
        let n_i = n as i64;
        let f = self.function("silu_mul_bf16")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(gate).arg(up).arg(&n_i);
        let cfg = config(shapes::silu_mul(n));
        // SAFETY: arguments match `silu_mul_bf16`; the kernel's grid-stride loop stays below `n`.
        unsafe { b.launch(cfg) }.map_err(driver)?;
        Ok(())
    }

    /// Stores rows of `k` and `v` (`[rows, width]`) at their cache slots. Safe whatever the
    /// slots hold: the kernel skips a slot outside `[0, cache_slots)` and says so through
    /// [`CudaKernels::take_violations`].
    #[allow(clippy::too_many_arguments)]
    pub fn write_kv(
        &self,
        k: &CudaSlice<bf16>,
        v: &CudaSlice<bf16>,
        k_cache: &mut CudaSlice<bf16>,
        v_cache: &mut CudaSlice<bf16>,
        slots: &CudaSlice<i64>,
        width: usize,
        cache_slots: usize,
    ) -> Result<(), CudaError> {
        let rows = slots.len();
        assert!(
            k.len() >= rows * width && v.len() >= rows * width,
            "write_kv: row sizes"
        );
        assert!(
            k_cache.len() >= cache_slots * width && v_cache.len() >= cache_slots * width,
            "write_kv: cache sizes"
        );
        let (w, limit) = (width as i32, cache_slots as i64);
        let f = self.function("write_kv_bf16")?;
        let flag = self.violations.lock().unwrap_or_else(|p| p.into_inner());
        let mut b = self.stream.launch_builder(f);
        b.arg(k).arg(v).arg(k_cache).arg(v_cache).arg(slots).arg(&w);
        b.arg(&limit).arg(&*flag);
        let cfg = config(shapes::write_kv(rows));
        // SAFETY: arguments match `write_kv_bf16`; the rows read are below `rows * width`
        // (asserted), and the kernel writes only slots in `[0, cache_slots)`, inside the caches
        // (asserted), whatever `slots` holds.
        unsafe { b.launch(cfg) }.map_err(driver)?;
        Ok(())
    }

    /// Decode attention: one query row per sequence over its paged cache. Safe whatever the
    /// block tables and context lengths hold: the kernel reads only slots inside the caches
    /// (`cache_slots` rows of `kv_heads * head_dim`) and context lengths up to
    /// `max_blocks * block_size`, and reports anything else through
    /// [`CudaKernels::take_violations`] (that head's output is zeros).
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention_decode(
        &self,
        q: &CudaSlice<bf16>,
        k_cache: &CudaSlice<bf16>,
        v_cache: &CudaSlice<bf16>,
        block_tables: &CudaSlice<i32>,
        context_lens: &CudaSlice<i32>,
        out: &mut CudaSlice<bf16>,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        block_size: usize,
        max_blocks: usize,
        cache_slots: usize,
    ) -> Result<(), CudaError> {
        let seqs = context_lens.len();
        assert!(
            heads > 0 && kv_heads > 0 && heads.is_multiple_of(kv_heads),
            "paged attention: heads must be a multiple of kv_heads"
        );
        assert!(
            k_cache.len() >= cache_slots * kv_heads * head_dim
                && v_cache.len() >= cache_slots * kv_heads * head_dim,
            "paged attention: cache sizes"
        );
        assert!(
            head_dim.is_power_of_two() && head_dim <= 256,
            "paged attention: head_dim must be a power of two up to 256"
        );
        assert!(
            q.len() >= seqs * heads * head_dim && out.len() >= seqs * heads * head_dim,
            "paged attention: sizes"
        );
        assert!(
            block_tables.len() >= seqs * max_blocks,
            "paged attention: block tables"
        );
        let scale = 1.0f32 / (head_dim as f32).sqrt();
        let (h, kvh, d, bs, mb) = (
            heads as i32,
            kv_heads as i32,
            head_dim as i32,
            block_size as i32,
            max_blocks as i32,
        );
        let f = self.function("paged_attention_decode_bf16")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(q)
            .arg(k_cache)
            .arg(v_cache)
            .arg(block_tables)
            .arg(context_lens)
            .arg(out);
        let limit = cache_slots as i64;
        let flag = self.violations.lock().unwrap_or_else(|p| p.into_inner());
        b.arg(&h).arg(&kvh).arg(&d).arg(&bs).arg(&mb).arg(&scale);
        b.arg(&limit).arg(&*flag);
        let cfg = config(shapes::paged_attention_decode(seqs, heads, head_dim));
        // SAFETY: arguments match `paged_attention_decode_bf16`; one thread per head dimension
        // (a power of two, asserted) with head_dim floats of shared memory; q, out and the
        // block tables are as large as the grid reads (asserted); the kernel reads cache rows
        // only below `cache_slots` (the caches' size, asserted) and table entries only below
        // `max_blocks` per sequence, whatever the tables and lengths hold.
        unsafe { b.launch(cfg) }.map_err(driver)?;
        Ok(())
    }

    /// Index of each row's largest logit (`logits` is `[rows, vocab]`).
    pub fn argmax(
        &self,
        logits: &CudaSlice<f32>,
        vocab: usize,
        out: &mut CudaSlice<u32>,
    ) -> Result<(), CudaError> {
        let rows = out.len();
        assert!(logits.len() >= rows * vocab, "argmax: sizes");
        let v = vocab as i32;
        let f = self.function("argmax_f32")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(logits).arg(&v).arg(out);
        let cfg = config(shapes::argmax(rows));
        // SAFETY: arguments match `argmax_f32`; 1024 threads (a power of two) with 1024 floats
        // and 1024 ints of shared memory, as the kernel requires.
        unsafe { b.launch(cfg) }.map_err(driver)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn violation_bits_are_named() {
        assert_eq!(describe_violations(0), None);
        assert_eq!(
            describe_violations(1).as_deref(),
            Some("write_kv: a slot outside the KV cache")
        );
        let both = describe_violations(6).unwrap_or_default();
        assert!(
            both.contains("context length") && both.contains("a block outside"),
            "{both}"
        );
    }
}
