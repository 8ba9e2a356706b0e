//! Gristmill's CUDA kernels (`kernels/src/cuda/*.cu`) compiled as C++ and run on CPU threads:
//! each block's threads are OS threads that meet at `__syncthreads`, blocks run one after
//! another, `__nv_bfloat16` is emulated bit for bit (`include/`). The launch shapes come from
//! [`gristmill_kernels::shapes`], as the CUDA launcher's do. The tests compare each kernel with the
//! CPU op, which proves the kernels' indexing, reductions, masking and paged layouts without a
//! GPU; not their speed, and not the absence of races on a real device (`scripts/gpu-check.sh`
//! checks the same kernels on one).
//!
//! Launches are serialised (the emulated grid state is global), so tests may run in parallel.

use std::sync::Mutex;

use gristmill_kernels::device::PagedAttention;
use gristmill_kernels::shapes::{self, Shape};
use half::bf16;

/// CUDA's `dim3`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Dim3 {
    pub x: u32,
    pub y: u32,
    pub z: u32,
}

/// A shared launch shape as the emulator's grid, block and shared bytes.
fn dims(s: Shape) -> (Dim3, Dim3, usize) {
    let d = |(x, y, z): (u32, u32, u32)| Dim3 { x, y, z };
    (d(s.grid), d(s.block), s.shared_bytes as usize)
}

extern "C" {
    fn emu_write_kv_bf16(
        g: Dim3,
        b: Dim3,
        s: usize,
        k: *const bf16,
        v: *const bf16,
        kc: *mut bf16,
        vc: *mut bf16,
        slots: *const i64,
        width: i32,
        cache_slots: i64,
        violations: *mut i32,
    );
    fn emu_paged_attention_bf16(
        g: Dim3,
        b: Dim3,
        s: usize,
        q: *const bf16,
        kc: *const bf16,
        vc: *const bf16,
        tables: *const i32,
        groups: *const i32,
        q_rows: i32,
        out: *mut bf16,
        partial: *mut f32,
        heads: i32,
        kv_heads: i32,
        head_dim: i32,
        block_size: i32,
        max_blocks: i32,
        scale: f32,
        window: i32,
        group_rows: i32,
        key_tile: i32,
        partition_size: i32,
        cache_slots: i64,
        violations: *mut i32,
    );
    fn emu_attention_combine_bf16(
        g: Dim3,
        b: Dim3,
        s: usize,
        partial: *const f32,
        out: *mut bf16,
        heads: i32,
        head_dim: i32,
        partitions: i32,
    );
    fn emu_add_bf16(g: Dim3, b: Dim3, s: usize, x: *mut bf16, y: *const bf16, n: i64);
    fn emu_scale_bf16(g: Dim3, b: Dim3, s: usize, x: *mut bf16, k: f32, n: i64);
    fn emu_gelu_tanh_mul_bf16(g: Dim3, b: Dim3, s: usize, gate: *mut bf16, up: *const bf16, n: i64);
    fn emu_add_bias_bf16(
        g: Dim3,
        b: Dim3,
        s: usize,
        x: *mut bf16,
        bias: *const bf16,
        n: i64,
        cols: i32,
    );
    fn emu_add_rms_norm_bf16(
        g: Dim3,
        b: Dim3,
        s: usize,
        hidden: *mut bf16,
        delta: *const bf16,
        weight: *const bf16,
        out: *mut bf16,
        dim: i32,
        eps: f32,
    );
    fn emu_argmax_f32(g: Dim3, b: Dim3, s: usize, logits: *const f32, vocab: i32, out: *mut u32);
    fn emu_silu_mul_bf16(g: Dim3, b: Dim3, s: usize, gate: *mut bf16, up: *const bf16, n: i64);
    fn emu_embedding_bf16(
        g: Dim3,
        b: Dim3,
        s: usize,
        table: *const bf16,
        ids: *const u32,
        out: *mut bf16,
        rows: i32,
        dim: i32,
        first_id: u32,
        table_rows: u32,
    );
    fn emu_rope_bf16(
        g: Dim3,
        b: Dim3,
        s: usize,
        x: *mut bf16,
        positions: *const i32,
        inv_freq: *const f32,
        heads: i32,
        head_dim: i32,
        interleaved: i32,
    );
}

static LAUNCH: Mutex<()> = Mutex::new(());

fn serial<R>(f: impl FnOnce() -> R) -> R {
    let _one = LAUNCH.lock().unwrap_or_else(|p| p.into_inner());
    f()
}

/// `write_kv_bf16`: rows of `k`, `v` (`[slots.len(), width]`) into the caches at `slots`;
/// returns the violation bits.
pub fn write_kv(
    k: &[bf16],
    v: &[bf16],
    k_cache: &mut [bf16],
    v_cache: &mut [bf16],
    slots: &[i64],
    width: usize,
) -> i32 {
    assert!(k.len() >= slots.len() * width && v.len() >= slots.len() * width);
    assert_eq!(k_cache.len(), v_cache.len());
    let cache_slots = (k_cache.len() / width) as i64;
    let mut violations = 0i32;
    // SAFETY: every buffer is as large as the kernel may touch: rows below slots.len() * width
    // (asserted), cache slots below cache_slots (the kernel's bound).
    let (g, b, sh) = dims(shapes::write_kv(slots.len()));
    serial(|| unsafe {
        emu_write_kv_bf16(
            g,
            b,
            sh,
            k.as_ptr(),
            v.as_ptr(),
            k_cache.as_mut_ptr(),
            v_cache.as_mut_ptr(),
            slots.as_ptr(),
            width as i32,
            cache_slots,
            &mut violations,
        )
    });
    violations
}

/// `paged_attention_bf16` over the groups of an [`AttentionPacking`] (`groups`, `tables`),
/// then `attention_combine_bf16` when the context is split (`partial`: the workspace); returns
/// the violation bits.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention(
    q: &[bf16],
    k_cache: &[bf16],
    v_cache: &[bf16],
    tables: &[i32],
    groups: &[i32],
    out: &mut [bf16],
    partial: &mut [f32],
    s: &PagedAttention,
) -> i32 {
    assert!(s.check().is_ok(), "{s:?}");
    let per_row = s.heads * s.head_dim;
    let rows = q.len() / per_row;
    let n_groups = groups.len() / 3;
    assert!(out.len() >= rows * per_row && tables.len() >= n_groups * s.max_blocks);
    assert!(partial.len() >= s.partial_len(rows));
    let cache_slots = (k_cache.len().min(v_cache.len()) / (s.kv_heads * s.head_dim)) as i64;
    let (gr, kt) = shapes::attention_tiles(s.head_dim);
    let int = |v: usize| v.min(i32::MAX as usize) as i32;
    let mut violations = 0i32;
    // SAFETY: sizes asserted as the CUDA launcher checks them; the kernel reads q and writes
    // out only for groups inside `rows`, table entries below max_blocks per group and cache
    // slots below cache_slots, whatever the groups and tables hold.
    let (g, b, sh) = dims(shapes::paged_attention(
        n_groups,
        s.heads,
        s.partitions,
        s.head_dim,
    ));
    serial(|| unsafe {
        emu_paged_attention_bf16(
            g,
            b,
            sh,
            q.as_ptr(),
            k_cache.as_ptr(),
            v_cache.as_ptr(),
            tables.as_ptr(),
            groups.as_ptr(),
            int(rows),
            out.as_mut_ptr(),
            partial.as_mut_ptr(),
            int(s.heads),
            int(s.kv_heads),
            int(s.head_dim),
            int(s.block_size),
            int(s.max_blocks),
            s.scale,
            int(s.window),
            int(gr),
            int(kt),
            int(s.partition_size),
            cache_slots,
            &mut violations,
        )
    });
    if s.partitions > 1 {
        let (g, b, sh) = dims(shapes::attention_combine(rows, s.heads));
        // SAFETY: the workspace and out hold rows × heads × partitions (× head_dim + 2) and
        // rows × heads × head_dim values (asserted).
        serial(|| unsafe {
            emu_attention_combine_bf16(
                g,
                b,
                sh,
                partial.as_ptr(),
                out.as_mut_ptr(),
                int(s.heads),
                int(s.head_dim),
                int(s.partitions),
            )
        });
    }
    violations
}

/// `add_rms_norm_bf16`: `hidden += delta` (rounded to bf16), then RMS norm into `out`. Without
/// a delta the kernel only reads `hidden` (see [`rms_norm`]).
pub fn add_rms_norm(
    hidden: &mut [bf16],
    delta: Option<&[bf16]>,
    weight: &[bf16],
    out: &mut [bf16],
    dim: usize,
    eps: f32,
) {
    let rows = hidden.len() / dim;
    assert!(
        out.len() >= rows * dim
            && weight.len() >= dim
            && delta.is_none_or(|x| x.len() >= rows * dim)
    );
    let delta = delta.map_or(std::ptr::null(), |x| x.as_ptr());
    // SAFETY: rows of `dim` within every buffer (asserted); a null delta is the kernel's "none".
    let (g, b, sh) = dims(shapes::add_rms_norm(rows));
    serial(|| unsafe {
        emu_add_rms_norm_bf16(
            g,
            b,
            sh,
            hidden.as_mut_ptr(),
            delta,
            weight.as_ptr(),
            out.as_mut_ptr(),
            dim as i32,
            eps,
        )
    });
}

/// `argmax_f32`: the index of each row's largest logit.
pub fn argmax(logits: &[f32], vocab: usize) -> Vec<u32> {
    let rows = logits.len() / vocab;
    let mut out = vec![u32::MAX; rows];
    // SAFETY: `rows` rows of `vocab` logits and one output per row.
    let (g, b, sh) = dims(shapes::argmax(rows));
    serial(|| unsafe { emu_argmax_f32(g, b, sh, logits.as_ptr(), vocab as i32, out.as_mut_ptr()) });
    out
}

/// `silu_mul_bf16`: `gate = silu(gate) * up`, over a grid-stride loop.
pub fn silu_mul(gate: &mut [bf16], up: &[bf16]) {
    let n = gate.len();
    assert!(up.len() >= n);
    // SAFETY: the grid-stride loop stays below n, inside both buffers.
    let (g, b, sh) = dims(shapes::elementwise(n));
    serial(|| unsafe { emu_silu_mul_bf16(g, b, sh, gate.as_mut_ptr(), up.as_ptr(), n as i64) });
}

/// `embedding_bf16`: rows of `table` (ids from `first_id`) into `out`, zeros outside.
pub fn embedding(table: &[bf16], ids: &[u32], out: &mut [bf16], dim: usize, first_id: u32) {
    let table_rows = table.len() / dim;
    assert!(out.len() >= ids.len() * dim);
    // SAFETY: the kernel reads table rows only below table_rows and writes rows below ids.len().
    let (g, b, sh) = dims(shapes::embedding(ids.len()));
    serial(|| unsafe {
        emu_embedding_bf16(
            g,
            b,
            sh,
            table.as_ptr(),
            ids.as_ptr(),
            out.as_mut_ptr(),
            ids.len() as i32,
            dim as i32,
            first_id,
            table_rows as u32,
        )
    });
}

/// `rope_bf16`: rotary embedding in place (`x` is `[rows, heads, head_dim]`).
pub fn rope(
    x: &mut [bf16],
    positions: &[i32],
    inv_freq: &[f32],
    heads: usize,
    head_dim: usize,
    interleaved: bool,
) {
    let rows = positions.len();
    assert!(x.len() >= rows * heads * head_dim && inv_freq.len() >= head_dim / 2);
    // SAFETY: rows × heads × head_dim within x (asserted); inv_freq has head_dim / 2 entries.
    let (g, b, sh) = dims(shapes::rope(rows, heads, head_dim));
    serial(|| unsafe {
        emu_rope_bf16(
            g,
            b,
            sh,
            x.as_mut_ptr(),
            positions.as_ptr(),
            inv_freq.as_ptr(),
            heads as i32,
            head_dim as i32,
            i32::from(interleaved),
        )
    });
}

/// `add_rms_norm_bf16` without a delta: `out = rmsnorm(x) × weight` (the kernel does not write
/// its first argument when the delta is null).
pub fn rms_norm(x: &[bf16], weight: &[bf16], out: &mut [bf16], dim: usize, eps: f32) {
    let rows = x.len() / dim;
    assert!(out.len() >= rows * dim && weight.len() >= dim);
    // SAFETY: rows of `dim` within every buffer (asserted); with a null delta the kernel only
    // reads `x`, so passing it as the (mutable) hidden pointer writes nothing.
    let (g, b, sh) = dims(shapes::add_rms_norm(rows));
    serial(|| unsafe {
        emu_add_rms_norm_bf16(
            g,
            b,
            sh,
            x.as_ptr().cast_mut(),
            std::ptr::null(),
            weight.as_ptr(),
            out.as_mut_ptr(),
            dim as i32,
            eps,
        )
    });
}

/// `add_bf16`: `x += y`.
pub fn add(x: &mut [bf16], y: &[bf16]) {
    let n = x.len();
    assert!(y.len() >= n);
    // SAFETY: the grid-stride loop stays below n, inside both buffers.
    let (g, b, sh) = dims(shapes::elementwise(n));
    serial(|| unsafe { emu_add_bf16(g, b, sh, x.as_mut_ptr(), y.as_ptr(), n as i64) });
}

/// `scale_bf16`: `x *= s`.
pub fn scale(x: &mut [bf16], s: f32) {
    let n = x.len();
    // SAFETY: the grid-stride loop stays below n.
    let (g, b, sh) = dims(shapes::elementwise(n));
    serial(|| unsafe { emu_scale_bf16(g, b, sh, x.as_mut_ptr(), s, n as i64) });
}

/// `gelu_tanh_mul_bf16`: `gate = gelu_tanh(gate) × up`.
pub fn gelu_tanh_mul(gate: &mut [bf16], up: &[bf16]) {
    let n = gate.len();
    assert!(up.len() >= n);
    // SAFETY: the grid-stride loop stays below n, inside both buffers.
    let (g, b, sh) = dims(shapes::elementwise(n));
    serial(|| unsafe {
        emu_gelu_tanh_mul_bf16(g, b, sh, gate.as_mut_ptr(), up.as_ptr(), n as i64)
    });
}

/// `add_bias_bf16`: `x[r, c] += bias[c]`.
pub fn add_bias(x: &mut [bf16], bias: &[bf16]) {
    let (n, cols) = (x.len(), bias.len());
    assert!(cols > 0 && n.is_multiple_of(cols));
    // SAFETY: the loop stays below n and reads the bias modulo its length.
    let (g, b, sh) = dims(shapes::elementwise(n));
    serial(|| unsafe {
        emu_add_bias_bf16(
            g,
            b,
            sh,
            x.as_mut_ptr(),
            bias.as_ptr(),
            n as i64,
            cols as i32,
        )
    });
}

mod device;
pub use device::EmuDevice;
