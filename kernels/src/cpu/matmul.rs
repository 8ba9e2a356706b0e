//! `y = x · Wᵀ` for row-major `x [m, k]` and a weight `W [n, k]` (a linear layer's `[out, in]`),
//! with `W` packed once at load into panels of [`NR`] output columns stored k-major
//! (`panel[k][j]`), so that a micro-kernel can broadcast one `x` value against 16 weights.
//!
//! Weights from quantised checkpoints (every GGML type [`crate::quant::decode_block`] reads) can
//! stay quantised: their panels hold, for each `k`, the 16 rows' integer values side by side (4
//! bits each where the values fit — Q4_0, Q4_1, Q4_K, Q2_K — else a signed byte), and per
//! sub-block of `k` (32 wide, or 16 for Q2_K, Q3_K and Q6_K) the 16 rows' scales (and offsets)
//! as f32. The micro-kernel expands a `k` step to two vectors of f32 weights in registers —
//! `v * d (+ m)`, a multiply then an add, exactly as [`crate::quant::dequantize`] computes — and
//! feeds the same FMA chains. Results are therefore bit-identical to the f32 path, with 3–6×
//! less weight memory to stream.
//!
//! Determinism: every output element is a single FMA chain over `k` in ascending order, starting
//! from zero — `acc = fma(x[i][k], w[j][k], acc)` for `k = 0, 1, …` — whichever micro-kernel
//! (1 to [`MR`] rows) and whichever thread computes it. The tiling depends on `m`; the arithmetic
//! of an element does not, so a row's result is bit-identical at any batch size.

use rayon::prelude::*;

use super::int8::{self, Int8Rows, Isa};
use crate::quant::{decode_block, GgmlType, QK_K};

/// Output columns per packed panel (two AVX2 vectors).
pub const NR: usize = 16;
/// Rows of `x` per micro-kernel call.
pub const MR: usize = 6;
/// Rows of `x` per cache block (their `x` rows stay in L2 while every panel passes).
const MC: usize = 96;

/// A weight matrix `[n, k]` packed for [`linear`].
#[derive(Debug, Clone, PartialEq)]
pub struct PackedMatrix {
    n: usize,
    k: usize,
    pub(super) storage: Storage,
    /// Int8 storage only: activations go in two int8 passes (the values, then what their
    /// rounding left, at 1/256 of the step), about 15 bits in all.
    two_pass: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Storage {
    /// `ceil(n / NR)` panels of `k × NR` floats, k-major; columns past `n` are zero.
    F32(Vec<f32>),
    /// Quantised panels; rows past `n` have zero scales (so they dequantise to zero).
    Quant(QuantPanels),
    /// Quantised panels in the int8 kernels' layout (see [`super::int8`]), for the `fast`
    /// precision.
    Int8(QuantPanels),
}

/// How a panel stores its values and which formula turns a value into a weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum QKind {
    /// A nibble `q`, the weight `(q - 8) * d` (Q4_0).
    Q4Sym,
    /// A nibble `q`, the weight `q * d + m` (Q4_1, Q4_K, Q2_K).
    Q4Min,
    /// A signed byte `q`, the weight `q * d` (Q8_0, Q5_0, Q3_K, Q6_K).
    Q8,
    /// A signed byte `q`, the weight `q * d + m` (Q5_1, Q5_K).
    Q8Min,
}

impl QKind {
    /// Bytes of quantised values per `k` step of a panel.
    pub(super) fn bytes_per_k(self) -> usize {
        match self {
            QKind::Q4Sym | QKind::Q4Min => NR / 2,
            QKind::Q8 | QKind::Q8Min => NR,
        }
    }

    /// f32 scale vectors per sub-block of a panel (`d`, and `m` for the kinds with offsets).
    pub(super) fn scale_sets(self) -> usize {
        if matches!(self, QKind::Q4Min | QKind::Q8Min) {
            2
        } else {
            1
        }
    }

    pub(super) fn nibbles(self) -> bool {
        matches!(self, QKind::Q4Sym | QKind::Q4Min)
    }

    /// The panel kind for a GGML type, if it is quantised.
    fn of(ty: GgmlType) -> Option<Self> {
        let sb = ty.sub_blocks()?;
        Some(match ty {
            GgmlType::Q4_0 => QKind::Q4Sym,
            GgmlType::Q4_1 | GgmlType::Q4K | GgmlType::Q2K => QKind::Q4Min,
            _ if sb.min => QKind::Q8Min,
            _ => QKind::Q8,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct QuantPanels {
    kind: QKind,
    /// Values per sub-block of `k` (32, or 16).
    pub(super) sub: usize,
    /// Per panel, per `k`: `NR` values. Q4: byte `t` holds row `t` (low nibble) and row `t + 8`
    /// (high nibble); Q8: one signed byte per row.
    q: Vec<u8>,
    /// Per panel, per sub-block of `k`: `NR` scales `d`, then (kinds with offsets) `NR`
    /// offsets `m`.
    scales: Vec<f32>,
}

impl PackedMatrix {
    /// Packs a row-major `[n, k]` matrix.
    pub fn pack(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "pack: w is not [{n}, {k}]");
        let panels = n.div_ceil(NR);
        let mut data = vec![0f32; panels * k * NR];
        for (p, panel) in data.chunks_exact_mut(k * NR).enumerate() {
            for j in 0..NR.min(n - p * NR) {
                let row = &w[(p * NR + j) * k..(p * NR + j + 1) * k];
                for (kk, &v) in row.iter().enumerate() {
                    panel[kk * NR + j] = v;
                }
            }
        }
        Self {
            n,
            k,
            storage: Storage::F32(data),
            two_pass: false,
        }
    }

    /// Packs a row-major `[n, k]` matrix of ggml blocks without dequantising it; `None` for a
    /// type that is not quantised, for a `k` that is not a whole number of blocks, or a size
    /// mismatch.
    pub fn pack_quantized(ty: GgmlType, bytes: &[u8], n: usize, k: usize) -> Option<Self> {
        Self::pack_blocks(ty, bytes, n, k, false)
    }

    /// Packs a row-major `[n, k]` matrix of ggml blocks for the int8 kernels of the `fast`
    /// precision (same bytes as [`PackedMatrix::pack_quantized`], regrouped); `None` where
    /// that returns `None`.
    pub fn pack_int8(ty: GgmlType, bytes: &[u8], n: usize, k: usize) -> Option<Self> {
        Self::pack_blocks(ty, bytes, n, k, true)
    }

    /// Whether [`linear`] computes with this matrix in int8 (the `fast` precision).
    pub fn is_int8(&self) -> bool {
        matches!(self.storage, Storage::Int8(_))
    }

    /// An int8 matrix takes its activations in two int8 passes: the rounded values, then their
    /// rounding error at 1/256 of the step, combined in the integer sums (twice the integer
    /// work, one f32 step per sub-block; about 15-bit activations). No effect on other storage.
    pub fn two_pass_activations(mut self) -> Self {
        self.two_pass = self.is_int8();
        self
    }

    fn pack_blocks(ty: GgmlType, bytes: &[u8], n: usize, k: usize, int8: bool) -> Option<Self> {
        let kind = QKind::of(ty)?;
        let sb = ty.sub_blocks()?;
        let (blen, bb) = (ty.block_len(), ty.block_bytes());
        if k == 0 || !k.is_multiple_of(blen) || Some(bytes.len()) != ty.bytes_for(n * k) {
            return None;
        }
        let (subs, panels) = (k / sb.len, n.div_ceil(NR));
        let (bpk, sets) = (kind.bytes_per_k(), kind.scale_sets());
        let mut q = vec![0u8; panels * k * bpk];
        let mut scales = vec![0f32; panels * subs * sets * NR];
        let mut v = [0i8; QK_K];
        let (mut d, mut m) = ([0f32; QK_K / 16], [0f32; QK_K / 16]);
        for i in 0..n {
            let (p, j) = (i / NR, i % NR);
            for (kb, b) in bytes[i * (k / blen) * bb..(i + 1) * (k / blen) * bb]
                .chunks_exact(bb)
                .enumerate()
            {
                decode_block(ty, b, &mut v, &mut d, &mut m);
                for s in 0..blen / sb.len {
                    let at = ((p * subs + kb * (blen / sb.len) + s) * sets) * NR;
                    scales[at + j] = d[s];
                    if sets == 2 {
                        scales[at + NR + j] = m[s];
                    }
                }
                for (t, &value) in v[..blen].iter().enumerate() {
                    if int8 {
                        let panel = &mut q[p * k * bpk..(p + 1) * k * bpk];
                        int8::store_value(kind, panel, j, kb * blen + t, value);
                        continue;
                    }
                    let at = (p * k + kb * blen + t) * bpk;
                    if kind.nibbles() {
                        // Q4_0's values are stored with their +8 (as the block holds them).
                        let nib = if kind == QKind::Q4Sym {
                            value + 8
                        } else {
                            value
                        } as u8;
                        q[at + j % 8] |= if j < 8 { nib } else { nib << 4 };
                    } else {
                        q[at + j] = value as u8;
                    }
                }
            }
        }
        let panels = QuantPanels {
            kind,
            sub: sb.len,
            q,
            scales,
        };
        Some(Self {
            n,
            k,
            storage: if int8 {
                Storage::Int8(panels)
            } else {
                Storage::Quant(panels)
            },
            two_pass: false,
        })
    }

    /// Bytes a `[n, k]` matrix stored as `ty` takes once packed (kept quantised where the type
    /// allows, else f32), to size a model before loading it.
    pub fn packed_bytes(ty: GgmlType, n: usize, k: usize) -> u64 {
        let (n, k) = (n.div_ceil(NR) as u64 * NR as u64, k as u64);
        match (QKind::of(ty), ty.sub_blocks()) {
            (Some(kind), Some(sb)) if k.is_multiple_of(ty.block_len() as u64) => {
                let values = n * k * kind.bytes_per_k() as u64 / NR as u64;
                values + n * (k / sb.len as u64) * kind.scale_sets() as u64 * 4
            }
            _ => n * k * 4,
        }
    }

    /// Bytes of weight memory the matrix takes.
    pub fn bytes(&self) -> usize {
        match &self.storage {
            Storage::F32(d) => d.len() * 4,
            Storage::Quant(qp) | Storage::Int8(qp) => qp.q.len() + qp.scales.len() * 4,
        }
    }

    /// Weight `(j, kk)` of panel `p` (scalar dequantisation; the reference for the SIMD path).
    fn quant_weight(qp: &QuantPanels, k: usize, p: usize, j: usize, kk: usize) -> f32 {
        let (bpk, sets, subs) = (qp.kind.bytes_per_k(), qp.kind.scale_sets(), k / qp.sub);
        let byte = qp.q[(p * k + kk) * bpk + if qp.kind.nibbles() { j % 8 } else { j }];
        let sc = &qp.scales[((p * subs + kk / qp.sub) * sets) * NR..];
        Self::weight_of(qp.kind, byte, j, sc)
    }

    /// Weight `(j, kk)` of panel `p` of an int8-layout matrix.
    fn int8_weight(qp: &QuantPanels, k: usize, p: usize, j: usize, kk: usize) -> f32 {
        let (bpk, sets, subs) = (qp.kind.bytes_per_k(), qp.kind.scale_sets(), k / qp.sub);
        let v = int8::stored_value(qp.kind, &qp.q[p * k * bpk..(p + 1) * k * bpk], j, kk);
        let sc = &qp.scales[((p * subs + kk / qp.sub) * sets) * NR..];
        // The same formulas as the original layout's, from the value as it would be stored there.
        let byte = if qp.kind.nibbles() {
            (v as u8) | ((v as u8) << 4)
        } else {
            v as i8 as u8
        };
        Self::weight_of(qp.kind, byte, j, sc)
    }

    /// A weight from its stored byte (a nibble pair for the 4-bit kinds, `j` picking one) and
    /// its sub-block's scales.
    fn weight_of(kind: QKind, byte: u8, j: usize, sc: &[f32]) -> f32 {
        match kind {
            QKind::Q4Min => {
                let v = if j < 8 { byte & 0x0f } else { byte >> 4 };
                v as f32 * sc[j] + sc[NR + j]
            }
            QKind::Q4Sym => {
                let v = if j < 8 { byte & 0x0f } else { byte >> 4 };
                (v as i32 - 8) as f32 * sc[j]
            }
            QKind::Q8 => (byte as i8) as f32 * sc[j],
            QKind::Q8Min => (byte as i8) as f32 * sc[j] + sc[NR + j],
        }
    }

    /// Panel `p` as k-major f32: a view of f32 storage, or dequantised into `scratch`.
    fn panel<'a>(&'a self, p: usize, scratch: &'a mut Vec<f32>) -> &'a [f32] {
        let k = self.k;
        match &self.storage {
            Storage::F32(d) => &d[p * k * NR..(p + 1) * k * NR],
            Storage::Int8(_) => unreachable!("int8 matrices go through int8::linear"),
            Storage::Quant(qp) => {
                scratch.resize(k * NR, 0.0);
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: AVX2 is present; the panel's slices have the sizes `qpanel` checks.
                    unsafe { avx2::dequantize_panel(qpanel(qp, k, p), k, scratch) };
                    return scratch;
                }
                for kk in 0..k {
                    for j in 0..NR {
                        scratch[kk * NR + j] = Self::quant_weight(qp, k, p, j, kk);
                    }
                }
                scratch
            }
        }
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn cols(&self) -> usize {
        self.k
    }

    /// Row `i` of the original matrix (an embedding lookup), gathered from its panel.
    pub fn row_into(&self, i: usize, out: &mut [f32]) {
        let (p, j, k) = (i / NR, i % NR, self.k);
        match &self.storage {
            Storage::F32(d) => {
                let panel = &d[p * k * NR..(p + 1) * k * NR];
                for (kk, o) in out.iter_mut().enumerate().take(k) {
                    *o = panel[kk * NR + j];
                }
            }
            Storage::Quant(qp) => {
                for (kk, o) in out.iter_mut().enumerate().take(k) {
                    *o = Self::quant_weight(qp, k, p, j, kk);
                }
            }
            Storage::Int8(qp) => {
                for (kk, o) in out.iter_mut().enumerate().take(k) {
                    *o = Self::int8_weight(qp, k, p, j, kk);
                }
            }
        }
    }
}

/// The quantised values and scales of panel `p`.
pub(super) fn qpanel(qp: &QuantPanels, k: usize, p: usize) -> QPanel<'_> {
    let (bpk, sets, subs) = (qp.kind.bytes_per_k(), qp.kind.scale_sets(), k / qp.sub);
    QPanel {
        kind: qp.kind,
        sub: qp.sub,
        q: &qp.q[p * k * bpk..(p + 1) * k * bpk],
        sc: &qp.scales[p * subs * sets * NR..(p + 1) * subs * sets * NR],
    }
}

/// One panel of a quantised matrix: its values and its sub-blocks' scales.
#[derive(Debug, Clone, Copy)]
pub struct QPanel<'a> {
    pub(super) kind: QKind,
    pub(super) sub: usize,
    pub(super) q: &'a [u8],
    pub(super) sc: &'a [f32],
}

/// Computes `out[m, n] = x[m, k] · Wᵀ`, splitting the panels over the rayon pool.
///
/// # Panics
/// If the slice lengths do not match `m`, `w.cols()` and `w.rows()`.
pub fn linear(x: &[f32], m: usize, w: &PackedMatrix, out: &mut [f32]) {
    linear_with(Isa::chosen(), x, m, w, out)
}

/// [`linear`] with the int8 kernels of `isa` (for int8-layout matrices; benchmarks and tests).
///
/// # Panics
/// As [`linear`]; if `isa` does not run on this CPU.
pub fn linear_with(isa: Isa, x: &[f32], m: usize, w: &PackedMatrix, out: &mut [f32]) {
    let (n, k) = (w.n, w.k);
    assert_eq!(x.len(), m * k, "linear: x is not [{m}, {k}]");
    assert_eq!(out.len(), m * n, "linear: out is not [{m}, {n}]");
    if m == 0 || n == 0 {
        return;
    }
    if let Storage::Int8(qp) = &w.storage {
        let a = Int8Rows::quantize(x, m, k, qp.sub, w.two_pass);
        for_panels(n, out, |p0, p1, out| {
            // SAFETY: as `task`'s.
            unsafe { int8_task(isa, &a, w.n, qp, p0, p1, out) }
        });
        return;
    }
    for_panels(n, out, |p0, p1, out| {
        // SAFETY: `for_panels` hands each task disjoint panels of `out`.
        unsafe { task(x, m, w, p0, p1, out) }
    });
}

/// Splits the panels of an `n`-column output over the rayon pool: `f(p0, p1, out)` computes the
/// columns of panels `p0..p1` of every row (and no other column) through `out`.
fn for_panels(n: usize, out: &mut [f32], f: impl Fn(usize, usize, *mut f32) + Sync) {
    let panels = n.div_ceil(NR);
    let threads = rayon::current_num_threads().max(1);
    // A few tasks per thread for balance, each a run of whole panels.
    let per_task = panels.div_ceil(threads * 3).max(1);
    let tasks: Vec<usize> = (0..panels).step_by(per_task).collect();
    let out_ptr = SendPtr(out.as_mut_ptr());
    tasks.par_iter().for_each(|&p0| {
        let p1 = (p0 + per_task).min(panels);
        let out_ptr = &out_ptr;
        // Tasks cover disjoint panel ranges, hence disjoint output columns, of `out`, which
        // outlives the parallel loop.
        f(p0, p1, out_ptr.0);
    });
}

/// [`task`] for an int8-layout matrix and quantised activations.
///
/// # Safety
/// As [`task`]'s.
unsafe fn int8_task(
    isa: Isa,
    a: &Int8Rows,
    n: usize,
    qp: &QuantPanels,
    p0: usize,
    p1: usize,
    out: *mut f32,
) {
    let (k, m) = (a.k, a.q.len() / a.k);
    let mut tile = [0f32; int8::MR * NR];
    for m0 in (0..m).step_by(MC) {
        let m1 = (m0 + MC).min(m);
        for p in p0..p1 {
            let cols = NR.min(n - p * NR);
            let panel = qpanel(qp, k, p);
            for i in (m0..m1).step_by(int8::MR) {
                let rows = int8::MR.min(m1 - i);
                int8::tile(isa, a, i, rows, panel, &mut tile);
                for r in 0..rows {
                    for c in 0..cols {
                        // SAFETY: row i + r < m and column p * NR + c < n; the column belongs
                        // to this task.
                        unsafe { *out.add((i + r) * n + p * NR + c) = tile[r * NR + c] };
                    }
                }
            }
        }
    }
}

struct SendPtr(*mut f32);
// SAFETY: only used to hand disjoint output columns to rayon tasks (see `linear`).
unsafe impl Sync for SendPtr {}

/// # Safety
/// `out` must point to `m * w.n` floats; no other thread writes the columns of panels `p0..p1`.
unsafe fn task(x: &[f32], m: usize, w: &PackedMatrix, p0: usize, p1: usize, out: *mut f32) {
    let k = w.k;
    #[cfg(target_arch = "x86_64")]
    let fast =
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    let fast = false;
    let mut tile = [0f32; MR * NR];
    let mut scratch = Vec::new();
    for m0 in (0..m).step_by(MC) {
        let m1 = (m0 + MC).min(m);
        for p in p0..p1 {
            let cols = NR.min(w.n - p * NR);
            // A single row block of a quantised matrix: expand the weights in registers, no
            // scratch round trip (the decode case, where weight bandwidth is everything).
            #[cfg(target_arch = "x86_64")]
            if let (true, Storage::Quant(qp), true) = (fast, &w.storage, m1 - m0 <= MR) {
                let rows = m1 - m0;
                // SAFETY: AVX2 and FMA are present; the slices have the sizes `qpanel` gives.
                unsafe { avx2::qkernel(&x[m0 * k..m1 * k], rows, k, qpanel(qp, k, p), &mut tile) };
                for r in 0..rows {
                    for c in 0..cols {
                        // SAFETY: as below.
                        unsafe { *out.add((m0 + r) * w.n + p * NR + c) = tile[r * NR + c] };
                    }
                }
                continue;
            }
            let panel = w.panel(p, &mut scratch);
            let mut i = m0;
            while i < m1 {
                let rows = MR.min(m1 - i);
                let xs = &x[i * k..(i + rows) * k];
                #[cfg(target_arch = "x86_64")]
                if fast {
                    // SAFETY: AVX2 and FMA are present (checked above).
                    unsafe { avx2::kernel(xs, rows, k, panel, &mut tile) };
                } else {
                    portable_kernel(xs, rows, k, panel, &mut tile);
                }
                #[cfg(not(target_arch = "x86_64"))]
                portable_kernel(xs, rows, k, panel, &mut tile);
                for r in 0..rows {
                    for c in 0..cols {
                        // SAFETY: row i + r < m and column p * NR + c < n; the column belongs
                        // to this task.
                        unsafe { *out.add((i + r) * w.n + p * NR + c) = tile[r * NR + c] };
                    }
                }
                i += rows;
            }
        }
    }
}

/// The same FMA chains without SIMD (machines without AVX2/FMA).
fn portable_kernel(xs: &[f32], rows: usize, k: usize, panel: &[f32], tile: &mut [f32; MR * NR]) {
    tile.fill(0.0);
    for r in 0..rows {
        let xr = &xs[r * k..(r + 1) * k];
        let acc = &mut tile[r * NR..(r + 1) * NR];
        for (kk, &xv) in xr.iter().enumerate() {
            for (a, &wv) in acc.iter_mut().zip(&panel[kk * NR..(kk + 1) * NR]) {
                *a = xv.mul_add(wv, *a);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{QKind, QPanel, MR, NR};

    /// The 16 weights of one `k` step of a quantised panel: rows 0–7 and rows 8–15.
    ///
    /// # Safety
    /// `q` must point at the step's `kind.bytes_per_k()` bytes; `d` (and `m`) at the block's 16
    /// scales (minima).
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn expand(kind: QKind, q: *const u8, d: [__m256; 2], m: [__m256; 2]) -> [__m256; 2] {
        // SAFETY: reads 8 (Q4) or 16 (Q8) bytes at q, per the contract.
        unsafe {
            match kind {
                QKind::Q8Min => {
                    let b = _mm_loadu_si128(q as *const __m128i);
                    let lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
                    let hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
                    [
                        _mm256_add_ps(_mm256_mul_ps(lo, d[0]), m[0]),
                        _mm256_add_ps(_mm256_mul_ps(hi, d[1]), m[1]),
                    ]
                }
                QKind::Q4Min | QKind::Q4Sym => {
                    let b = _mm_loadl_epi64(q as *const __m128i);
                    let mask = _mm_set1_epi8(0x0f);
                    let lo = _mm256_cvtepu8_epi32(_mm_and_si128(b, mask));
                    let hi = _mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), mask));
                    if kind == QKind::Q4Min {
                        [
                            _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(lo), d[0]), m[0]),
                            _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(hi), d[1]), m[1]),
                        ]
                    } else {
                        let eight = _mm256_set1_epi32(8);
                        [
                            _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(lo, eight)), d[0]),
                            _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(hi, eight)), d[1]),
                        ]
                    }
                }
                QKind::Q8 => {
                    let b = _mm_loadu_si128(q as *const __m128i);
                    [
                        _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), d[0]),
                        _mm256_mul_ps(
                            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8))),
                            d[1],
                        ),
                    ]
                }
            }
        }
    }

    /// The scale (and offset) vectors of sub-block `kb` of a panel.
    ///
    /// # Safety
    /// Sub-block `kb`'s scales must lie within `sc`.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn scales(kind: QKind, sc: &[f32], kb: usize) -> ([__m256; 2], [__m256; 2]) {
        let sets = kind.scale_sets();
        let base = sc.as_ptr();
        // SAFETY: sub-block kb's scales lie at (kb * sets) * NR .. (kb + 1) * sets * NR of sc.
        unsafe {
            let s = base.add(kb * sets * NR);
            let d = [_mm256_loadu_ps(s), _mm256_loadu_ps(s.add(8))];
            let m = if sets == 2 {
                [_mm256_loadu_ps(s.add(NR)), _mm256_loadu_ps(s.add(NR + 8))]
            } else {
                [_mm256_setzero_ps(); 2]
            };
            (d, m)
        }
    }

    /// Dequantises a quantised panel into k-major f32 `out` (`k * NR` floats).
    ///
    /// # Safety
    /// AVX2 must be available; `(q, sc)` must be one panel as `super::qpanel` returns it.
    #[target_feature(enable = "avx2")]
    pub unsafe fn dequantize_panel(panel: QPanel<'_>, k: usize, out: &mut [f32]) {
        let QPanel { kind, sub, q, sc } = panel;
        let bpk = kind.bytes_per_k();
        assert!(
            q.len() >= k * bpk
                && out.len() >= k * NR
                && sc.len() >= k / sub * kind.scale_sets() * NR
        );
        for kb in 0..k / sub {
            // SAFETY: sizes asserted above.
            let (d, m) = unsafe { scales(kind, sc, kb) };
            for kk in kb * sub..(kb + 1) * sub {
                // SAFETY: kk < k, so the step's bytes and the 16 output floats are in bounds.
                unsafe {
                    let w = expand(kind, q.as_ptr().add(kk * bpk), d, m);
                    _mm256_storeu_ps(out.as_mut_ptr().add(kk * NR), w[0]);
                    _mm256_storeu_ps(out.as_mut_ptr().add(kk * NR + 8), w[1]);
                }
            }
        }
    }

    /// The fused kernel: a `rows × NR` tile (rows ≤ MR) straight from a quantised panel.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `xs` holds `rows × k` floats and `(q, sc)` is one panel.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn qkernel(
        xs: &[f32],
        rows: usize,
        k: usize,
        panel: QPanel<'_>,
        tile: &mut [f32; MR * NR],
    ) {
        assert!(
            xs.len() >= rows * k
                && panel.q.len() >= k * panel.kind.bytes_per_k()
                && panel.sc.len() >= k / panel.sub * panel.kind.scale_sets() * NR
        );
        // SAFETY: sizes asserted above; rows ≤ MR.
        unsafe {
            match rows {
                6 => qblock::<6>(xs, k, panel, tile),
                5 => qblock::<5>(xs, k, panel, tile),
                4 => qblock::<4>(xs, k, panel, tile),
                3 => qblock::<3>(xs, k, panel, tile),
                2 => qblock::<2>(xs, k, panel, tile),
                _ => qblock::<1>(xs, k, panel, tile),
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn qblock<const R: usize>(
        xs: &[f32],
        k: usize,
        QPanel { kind, sub, q, sc }: QPanel<'_>,
        tile: &mut [f32; MR * NR],
    ) {
        let mut lo = [_mm256_setzero_ps(); R];
        let mut hi = [_mm256_setzero_ps(); R];
        let xp = xs.as_ptr();
        let bpk = kind.bytes_per_k();
        for kb in 0..k / sub {
            // SAFETY: the caller's panel covers every sub-block of k.
            let (d, m) = unsafe { scales(kind, sc, kb) };
            for kk in kb * sub..(kb + 1) * sub {
                // SAFETY: kk < k: the step's bytes are in q and xp.add(r * k + kk) in xs.
                unsafe {
                    let [w0, w1] = expand(kind, q.as_ptr().add(kk * bpk), d, m);
                    for r in 0..R {
                        let xv = _mm256_broadcast_ss(&*xp.add(r * k + kk));
                        lo[r] = _mm256_fmadd_ps(xv, w0, lo[r]);
                        hi[r] = _mm256_fmadd_ps(xv, w1, hi[r]);
                    }
                }
            }
        }
        for r in 0..R {
            // SAFETY: tile has MR * NR floats and r < R ≤ MR.
            unsafe {
                _mm256_storeu_ps(tile.as_mut_ptr().add(r * NR), lo[r]);
                _mm256_storeu_ps(tile.as_mut_ptr().add(r * NR + 8), hi[r]);
            }
        }
    }

    /// Computes a `rows × NR` tile (rows ≤ MR) into `tile`.
    ///
    /// # Safety
    /// AVX2 and FMA must be available.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn kernel(
        xs: &[f32],
        rows: usize,
        k: usize,
        panel: &[f32],
        tile: &mut [f32; MR * NR],
    ) {
        // SAFETY (all blocks below): `xs` holds rows × k floats, `panel` k × NR, `tile` MR × NR;
        // every offset used is inside those bounds.
        unsafe {
            match rows {
                6 => block::<6>(xs, k, panel, tile),
                5 => block::<5>(xs, k, panel, tile),
                4 => block::<4>(xs, k, panel, tile),
                3 => block::<3>(xs, k, panel, tile),
                2 => block::<2>(xs, k, panel, tile),
                _ => block::<1>(xs, k, panel, tile),
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn block<const R: usize>(
        xs: &[f32],
        k: usize,
        panel: &[f32],
        tile: &mut [f32; MR * NR],
    ) {
        let mut lo = [_mm256_setzero_ps(); R];
        let mut hi = [_mm256_setzero_ps(); R];
        let xp = xs.as_ptr();
        let mut wp = panel.as_ptr();
        for kk in 0..k {
            // SAFETY: kk < k, so wp points at panel[kk * NR..kk * NR + 16] and
            // xp.add(r * k + kk) at xs[r][kk].
            unsafe {
                let w0 = _mm256_loadu_ps(wp);
                let w1 = _mm256_loadu_ps(wp.add(8));
                for r in 0..R {
                    let xv = _mm256_broadcast_ss(&*xp.add(r * k + kk));
                    lo[r] = _mm256_fmadd_ps(xv, w0, lo[r]);
                    hi[r] = _mm256_fmadd_ps(xv, w1, hi[r]);
                }
                wp = wp.add(NR);
            }
        }
        for r in 0..R {
            // SAFETY: tile has MR * NR floats and r < R ≤ MR.
            unsafe {
                _mm256_storeu_ps(tile.as_mut_ptr().add(r * NR), lo[r]);
                _mm256_storeu_ps(tile.as_mut_ptr().add(r * NR + 8), hi[r]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn run(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![f32::NAN; m * n];
        linear(x, m, &PackedMatrix::pack(w, n, k), &mut out);
        out
    }

    #[test]
    fn matches_naive_f64_at_odd_shapes() {
        for &(m, k, n) in &[
            (1, 8, 1),
            (3, 13, 7),
            (5, 64, 33),
            (9, 576, 50),
            (17, 100, 130),
            (200, 40, 17),
        ] {
            let x = data(m * k, 1);
            let w = data(n * k, 2);
            let out = run(&x, m, k, &w, n);
            for i in 0..m {
                for j in 0..n {
                    let r: f64 = (0..k)
                        .map(|p| x[i * k + p] as f64 * w[j * k + p] as f64)
                        .sum();
                    let got = out[i * n + j] as f64;
                    assert!(
                        (got - r).abs() < 1e-4 * (1.0 + r.abs()),
                        "({m},{k},{n})[{i},{j}]: {got} vs {r}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_row_is_bit_identical_at_any_batch_size() {
        let (k, n) = (200, 70);
        let w = data(n * k, 3);
        let rows = data(130 * k, 4);
        let alone = run(&rows[5 * k..6 * k], 1, k, &w, n);
        for m in [6, 7, 8, 33, 64, 130] {
            let out = run(&rows[..m * k], m, k, &w, n);
            assert_eq!(&out[5 * n..6 * n], &alone[..], "batch of {m} changed row 5");
        }
    }

    /// Packs the `[n, k]` blocks `bytes` of `ty` quantised and (dequantised) as f32, checks that
    /// both give the same `linear` results at every `m` of `ms` (m ≤ MR takes the fused kernel,
    /// larger m the dequantised panels) and the same rows, and returns the two matrices.
    fn packed_twins(
        ty: GgmlType,
        bytes: &[u8],
        (n, k): (usize, usize),
        x: &[f32],
        ms: &[usize],
    ) -> (PackedMatrix, PackedMatrix) {
        use crate::quant::dequantize;
        let mut deq = vec![0f32; n * k];
        dequantize(ty, bytes, &mut deq);
        let q = PackedMatrix::pack_quantized(ty, bytes, n, k).expect("packs");
        let f = PackedMatrix::pack(&deq, n, k);
        for &m in ms {
            let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
            linear(&x[..m * k], m, &q, &mut a);
            linear(&x[..m * k], m, &f, &mut b);
            assert_eq!(a, b, "{ty:?} m={m}: quantised storage changed a result");
        }
        let mut row = vec![0f32; k];
        for i in [0, n / 2, n - 1] {
            q.row_into(i, &mut row);
            assert_eq!(row, &deq[i * k..(i + 1) * k], "{ty:?} row {i}");
        }
        (q, f)
    }

    #[test]
    fn quantized_panels_give_exactly_the_f32_results() {
        use crate::quant::quantize;
        let (k, n) = (96, 37);
        let src = data(n * k, 6);
        let x = data(40 * k, 7);
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            let (q, f) = packed_twins(ty, &quantize(ty, &src), (n, k), &x, &[1, 4, 6, 7, 40]);
            assert!(
                q.bytes() * 3 < f.bytes(),
                "{ty:?}: {} vs {} bytes",
                q.bytes(),
                f.bytes()
            );
        }
        assert!(PackedMatrix::pack_quantized(GgmlType::F16, &[0; 4], 1, 2).is_none());
        assert!(PackedMatrix::pack_quantized(GgmlType::Q8_0, &[0; 34], 1, 16).is_none());
    }

    #[test]
    fn every_quantised_type_packs_and_multiplies_exactly_as_dequantised() {
        use crate::quant::random_blocks;
        let (k, n) = (512, 21);
        let x = data(7 * k, 8);
        for ty in GgmlType::ALL
            .into_iter()
            .filter(|t| t.sub_blocks().is_some())
        {
            let bytes = random_blocks(ty, n * k / ty.block_len(), ty.id() as u64, 0.01);
            let (q, f) = packed_twins(ty, &bytes, (n, k), &x, &[1, 5, 7]);
            assert!(q.bytes() * 2 < f.bytes(), "{ty:?}: {} bytes", q.bytes());
            // The size a model's weights are checked against before loading is the real one.
            assert_eq!(
                q.bytes() as u64,
                PackedMatrix::packed_bytes(ty, n, k),
                "{ty:?}"
            );
            assert_eq!(
                f.bytes() as u64,
                PackedMatrix::packed_bytes(GgmlType::F32, n, k)
            );
        }
        // A row that is not a whole number of K-quant super-blocks stays unpacked.
        let bytes = random_blocks(GgmlType::Q4K, 2, 1, 0.01);
        assert!(PackedMatrix::pack_quantized(GgmlType::Q4K, &bytes, 4, 128).is_none());
    }

    #[test]
    fn packed_rows_read_back() {
        let (n, k) = (21, 5);
        let w = data(n * k, 5);
        let p = PackedMatrix::pack(&w, n, k);
        let mut row = vec![0f32; k];
        for i in 0..n {
            p.row_into(i, &mut row);
            assert_eq!(row, &w[i * k..(i + 1) * k]);
        }
    }
}
