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
//! Float weights that are exactly 16-bit values (bf16 and f16 checkpoints, read as f32) are
//! stored in 16 bits, in the same k-major panels, and widened in registers (bf16 by a shift, f16
//! by F16C): the FMA chains see the same f32 weights, so the results are bit-identical to f32
//! storage with half the memory to stream.
//!
//! Determinism: every output element is a single FMA chain over `k` in ascending order, starting
//! from zero — `acc = fma(x[i][k], w[j][k], acc)` for `k = 0, 1, …` — whichever micro-kernel
//! (1 to [`MR`] rows) and whichever thread computes it. The tiling depends on `m`; the arithmetic
//! of an element does not, so a row's result is bit-identical at any batch size.

use half::f16;
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
    /// As `F32`, each weight in 16 bits (bf16 or f16) because every one of them fits exactly.
    Half(HalfKind, Vec<u16>),
    /// Quantised panels; rows past `n` have zero scales (so they dequantise to zero).
    Quant(QuantPanels),
    /// Quantised panels in the int8 kernels' layout (see [`super::int8`]), for the `fast`
    /// precision.
    Int8(QuantPanels),
}

/// Which 16-bit float a [`Storage::Half`] matrix holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum HalfKind {
    Bf16,
    F16,
}

impl HalfKind {
    /// The kind that holds every value of `w` exactly, if one does (bf16 first: it widens by a
    /// shift).
    fn exact_for(w: &[f32]) -> Option<Self> {
        if w.iter().all(|x| x.to_bits() & 0xffff == 0) {
            Some(HalfKind::Bf16)
        } else if w.iter().all(|&x| f16::from_f32(x).to_f32() == x) {
            Some(HalfKind::F16)
        } else {
            None
        }
    }

    fn bits(self, x: f32) -> u16 {
        match self {
            HalfKind::Bf16 => (x.to_bits() >> 16) as u16,
            HalfKind::F16 => f16::from_f32(x).to_bits(),
        }
    }

    pub(super) fn widen(self, b: u16) -> f32 {
        match self {
            HalfKind::Bf16 => f32::from_bits((b as u32) << 16),
            HalfKind::F16 => f16::from_bits(b).to_f32_const(),
        }
    }
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

    /// The nibble a 4-bit kind stores for a decoded value: Q4_0's values keep their +8 (as the
    /// block holds them).
    pub(super) fn nibble(self, value: i8) -> u8 {
        if self == QKind::Q4Sym {
            (value + 8) as u8
        } else {
            value as u8
        }
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
    /// Packs a row-major `[n, k]` matrix: in 16 bits where every value is a bf16 or every value
    /// an f16 (a 16-bit checkpoint widened to f32; lossless), else in f32.
    pub fn pack(w: &[f32], n: usize, k: usize) -> Self {
        let m = Self::pack_f32(w, n, k);
        match (HalfKind::exact_for(w), m.storage) {
            (Some(kind), Storage::F32(data)) => Self {
                storage: Storage::Half(kind, data.iter().map(|&x| kind.bits(x)).collect()),
                ..m
            },
            (_, storage) => Self { storage, ..m },
        }
    }

    /// Packs a row-major `[n, k]` matrix in f32.
    pub fn pack_f32(w: &[f32], n: usize, k: usize) -> Self {
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
                        let nib = kind.nibble(value);
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
            _ if matches!(ty, GgmlType::F16 | GgmlType::BF16) => n * k * 2,
            _ => n * k * 4,
        }
    }

    /// Bytes of weight memory the matrix takes.
    pub fn bytes(&self) -> usize {
        match &self.storage {
            Storage::F32(d) => d.len() * 4,
            Storage::Half(_, d) => d.len() * 2,
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
            Storage::Half(kind, d) => {
                let bits = &d[p * k * NR..(p + 1) * k * NR];
                scratch.resize(k * NR, 0.0);
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("f16c")
                {
                    // SAFETY: AVX2 and F16C are present; scratch holds as many values as bits.
                    unsafe { avx2::widen_panel(*kind, bits, scratch) };
                    return scratch;
                }
                for (o, &b) in scratch.iter_mut().zip(bits) {
                    *o = kind.widen(b);
                }
                scratch
            }
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
            Storage::Half(kind, d) => {
                let panel = &d[p * k * NR..(p + 1) * k * NR];
                for (kk, o) in out.iter_mut().enumerate().take(k) {
                    *o = kind.widen(panel[kk * NR + j]);
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
    let fast = std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c");
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
            #[cfg(target_arch = "x86_64")]
            if let (true, Storage::Half(kind, d), true) = (fast, &w.storage, m1 - m0 <= MR) {
                let rows = m1 - m0;
                let bits = &d[p * k * NR..(p + 1) * k * NR];
                // SAFETY: AVX2, FMA and F16C are present; bits is one k × NR panel.
                unsafe { avx2::hkernel(&x[m0 * k..m1 * k], rows, k, *kind, bits, &mut tile) };
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
mod avx2;

#[cfg(test)]
mod tests;
