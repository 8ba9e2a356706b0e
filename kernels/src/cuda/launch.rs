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

use crate::device::need;
/// Why the CUDA kernels are unavailable or a launch failed (the device layer's error).
pub use crate::device::DeviceError as CudaError;
pub use crate::device::{describe_violations, PagedAttention};

pub(crate) fn driver<E: std::fmt::Debug>(e: E) -> CudaError {
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
        need(
            out.len() >= rows * dim && table.len() >= table_rows * dim,
            "embedding",
        )?;
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
        // `rows * dim` elements and every id reads inside `table` or writes zeros (sizes
        // checked above, ids checked in the kernel).
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
        self.norm(hidden, delta, weight, out, dim, eps)
    }

    /// `out = rmsnorm(x) * weight`, row by row (`x` is only read).
    pub fn rms_norm(
        &self,
        x: &CudaSlice<bf16>,
        weight: &CudaSlice<bf16>,
        out: &mut CudaSlice<bf16>,
        dim: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        self.norm(x, None, weight, out, dim, eps)
    }

    /// `add_rms_norm_bf16`: writes `hidden` only when `delta` is given, which only
    /// [`CudaKernels::add_rms_norm`] passes (holding `hidden` mutably).
    fn norm(
        &self,
        hidden: &CudaSlice<bf16>,
        delta: Option<&CudaSlice<bf16>>,
        weight: &CudaSlice<bf16>,
        out: &mut CudaSlice<bf16>,
        dim: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        need(
            dim > 0 && hidden.len().is_multiple_of(dim),
            "add_rms_norm: rows",
        )?;
        let rows = hidden.len() / dim;
        need(
            out.len() >= rows * dim && weight.len() >= dim,
            "add_rms_norm: buffer sizes",
        )?;
        need(
            delta.is_none_or(|d| d.len() >= rows * dim),
            "add_rms_norm: delta size",
        )?;
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
        // which the kernel checks, and then it does not write `hidden`); 256 threads, a power
        // of two, with 256 floats of shared memory as the kernel requires; buffers hold
        // `rows * dim` elements (checked).
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
        need(
            x.len() >= rows * heads * head_dim && inv_freq.len() >= head_dim / 2,
            "rope: sizes",
        )?;
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
        // strides over the head's pairs inside `x` (sizes checked).
        unsafe { b.launch(cfg) }.map_err(driver)?;
        Ok(())
    }

    /// An element-wise kernel `name(x, other, n[, extra])` over `x.len()` elements.
    fn elementwise(
        &self,
        name: &'static str,
        x: &mut CudaSlice<bf16>,
        other: Option<&CudaSlice<bf16>>,
        scalar: Option<f32>,
        cols: Option<i32>,
    ) -> Result<(), CudaError> {
        let n = x.len();
        let n_i = n as i64;
        let f = self.function(name)?;
        let mut b = self.stream.launch_builder(f);
        b.arg(x);
        if let Some(o) = other {
            b.arg(o);
        }
        if let Some(s) = &scalar {
            b.arg(s);
        }
        b.arg(&n_i);
        if let Some(c) = &cols {
            b.arg(c);
        }
        let cfg = config(shapes::elementwise(n));
        // SAFETY: every caller passes the arguments of `name`'s signature in order (checked by
        // the emulation tests against the same sources); the grid-stride loop stays below `n`,
        // and `other` (if any) holds at least `n` elements or is a bias indexed modulo `cols`
        // (checked by the callers).
        unsafe { b.launch(cfg) }.map_err(driver)?;
        Ok(())
    }

    /// `gate = silu(gate) * up`, element-wise.
    pub fn silu_mul(
        &self,
        gate: &mut CudaSlice<bf16>,
        up: &CudaSlice<bf16>,
    ) -> Result<(), CudaError> {
        need(up.len() >= gate.len(), "silu_mul: sizes")?;
        self.elementwise("silu_mul_bf16", gate, Some(up), None, None)
    }

    /// `gate = gelu_tanh(gate) * up`, element-wise.
    pub fn gelu_tanh_mul(
        &self,
        gate: &mut CudaSlice<bf16>,
        up: &CudaSlice<bf16>,
    ) -> Result<(), CudaError> {
        need(up.len() >= gate.len(), "gelu_tanh_mul: sizes")?;
        self.elementwise("gelu_tanh_mul_bf16", gate, Some(up), None, None)
    }

    /// `x += y`, element-wise.
    pub fn add(&self, x: &mut CudaSlice<bf16>, y: &CudaSlice<bf16>) -> Result<(), CudaError> {
        need(y.len() >= x.len(), "add: sizes")?;
        self.elementwise("add_bf16", x, Some(y), None, None)
    }

    /// `x *= s`.
    pub fn scale(&self, x: &mut CudaSlice<bf16>, s: f32) -> Result<(), CudaError> {
        self.elementwise("scale_bf16", x, None, Some(s), None)
    }

    /// `x[r, c] += bias[c]` for rows of `bias.len()` values.
    pub fn add_bias(
        &self,
        x: &mut CudaSlice<bf16>,
        bias: &CudaSlice<bf16>,
    ) -> Result<(), CudaError> {
        let cols = bias.len();
        need(
            cols > 0 && x.len().is_multiple_of(cols) && cols <= i32::MAX as usize,
            "add_bias: sizes",
        )?;
        self.elementwise("add_bias_bf16", x, Some(bias), None, Some(cols as i32))
    }

    /// Stores rows of `k` and `v` (`[rows, width]`) at their cache slots. Safe whatever the
    /// slots hold: the kernel skips a slot outside the caches and says so through
    /// [`CudaKernels::take_violations`].
    pub fn write_kv(
        &self,
        k: &CudaSlice<bf16>,
        v: &CudaSlice<bf16>,
        k_cache: &mut CudaSlice<bf16>,
        v_cache: &mut CudaSlice<bf16>,
        slots: &CudaSlice<i64>,
        width: usize,
    ) -> Result<(), CudaError> {
        let rows = slots.len();
        need(
            width > 0 && k.len() >= rows * width && v.len() >= rows * width,
            "write_kv: row sizes",
        )?;
        let cache_slots = k_cache.len().min(v_cache.len()) / width;
        let (w, limit) = (width as i32, cache_slots as i64);
        let f = self.function("write_kv_bf16")?;
        let flag = self.violations.lock().unwrap_or_else(|p| p.into_inner());
        let mut b = self.stream.launch_builder(f);
        b.arg(k).arg(v).arg(k_cache).arg(v_cache).arg(slots).arg(&w);
        b.arg(&limit).arg(&*flag);
        let cfg = config(shapes::write_kv(rows));
        // SAFETY: arguments match `write_kv_bf16`; the rows read are below `rows * width`
        // (checked), and the kernel writes only slots in `[0, cache_slots)`, inside both
        // caches by construction, whatever `slots` holds.
        unsafe { b.launch(cfg) }.map_err(driver)?;
        Ok(())
    }

    /// Paged attention of `q`'s rows packed in groups ([`AttentionPacking`]), then, when the
    /// context is split, the merge of the partitions (`partial`: the f32 workspace). Safe
    /// whatever the groups and block tables hold: the kernel reads only rows inside `q`, table
    /// entries below `max_blocks` per group and slots inside the caches, and reports anything
    /// else through [`CudaKernels::take_violations`] (those rows get zeros).
    ///
    /// [`AttentionPacking`]: crate::device::AttentionPacking
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention(
        &self,
        q: &CudaSlice<bf16>,
        k_cache: &CudaSlice<bf16>,
        v_cache: &CudaSlice<bf16>,
        tables: &CudaSlice<i32>,
        groups: &CudaSlice<i32>,
        out: &mut CudaSlice<bf16>,
        partial: &mut CudaSlice<f32>,
        s: &PagedAttention,
    ) -> Result<(), CudaError> {
        s.check()?;
        let width = s.kv_heads * s.head_dim;
        let per_row = s.heads * s.head_dim;
        let rows = q.len() / per_row;
        let n_groups = groups.len() / 3;
        need(out.len() >= rows * per_row, "paged attention: sizes")?;
        need(
            tables.len() >= n_groups * s.max_blocks,
            "paged attention: block tables",
        )?;
        need(
            partial.len() >= s.partial_len(rows),
            "paged attention: split-K workspace",
        )?;
        let (g, kt) = shapes::attention_tiles(s.head_dim);
        let cache_slots = (k_cache.len().min(v_cache.len()) / width) as i64;
        let int = |v: usize| v.min(i32::MAX as usize) as i32;
        let (h, kvh, d, bs, mb, win) = (
            int(s.heads),
            int(s.kv_heads),
            int(s.head_dim),
            int(s.block_size),
            int(s.max_blocks),
            int(s.window),
        );
        let (q_rows, gi, kti, ps) = (int(rows), int(g), int(kt), int(s.partition_size));
        let f = self.function("paged_attention_bf16")?;
        {
            let flag = self.violations.lock().unwrap_or_else(|p| p.into_inner());
            let mut b = self.stream.launch_builder(f);
            b.arg(q).arg(k_cache).arg(v_cache).arg(tables).arg(groups);
            b.arg(&q_rows).arg(&mut *out).arg(&mut *partial);
            b.arg(&h)
                .arg(&kvh)
                .arg(&d)
                .arg(&bs)
                .arg(&mb)
                .arg(&s.scale)
                .arg(&win);
            b.arg(&gi).arg(&kti).arg(&ps).arg(&cache_slots).arg(&*flag);
            let cfg = config(shapes::paged_attention(
                n_groups,
                s.heads,
                s.partitions,
                s.head_dim,
            ));
            // SAFETY: arguments match `paged_attention_bf16`; the shared memory and thread count
            // are the shapes module's (its tests check the tiles fit 48 KiB and 16 accumulators a
            // thread); `out` and `partial` hold what `q_rows` rows write (checked), the tables
            // `max_blocks` entries per group (checked); the kernel reads q and writes out only for
            // groups inside `q_rows`, and reads the caches only below `cache_slots`, whatever the
            // groups and tables hold.
            unsafe { b.launch(cfg) }.map_err(driver)?;
        }
        if s.partitions > 1 {
            let f = self.function("attention_combine_bf16")?;
            let parts = int(s.partitions);
            let mut b = self.stream.launch_builder(f);
            b.arg(&*partial).arg(out).arg(&h).arg(&d).arg(&parts);
            let cfg = config(shapes::attention_combine(rows, s.heads));
            // SAFETY: arguments match `attention_combine_bf16`; the grid covers the `rows`
            // rows × heads the workspace (checked above) and `out` hold.
            unsafe { b.launch(cfg) }.map_err(driver)?;
        }
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
        need(logits.len() >= rows * vocab, "argmax: sizes")?;
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
