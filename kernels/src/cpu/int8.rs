//! The `fast` precision's matmul: activations quantised per 32 values to int8 (as llama.cpp's
//! Q8 activations), integer dot products against the stored weight values of each sub-block,
//! then one f32 step per sub-block to apply the two scales (and the weight offset). A matrix
//! may take its activations in two passes ([`super::PackedMatrix::two_pass_activations`]): the
//! int8 values, then the int8 rounding of what they left, summed in f32 — about 15 bits.
//!
//! Kernels come in one variant per instruction set ([`Isa`]): AVX-512 VNNI (`vpdpbusd`),
//! AVX-512BW and AVX2 (`vpmaddubsw` + `vpmaddwd`), and a portable one. The integer sums are
//! exact in every variant, and the f32 step is the same operations in the same order (a multiply
//! of the two scales, then a fused multiply-add per sub-block, ascending in `k`), so **every
//! variant gives bit-identical results** — tested against the portable one on random blocks of
//! every quantised type. A row's result never depends on the other rows of the batch: the row
//! tiling changes with `m`, the arithmetic of an element does not.
//!
//! Weight layout ([`super::matmul`]'s panels of [`NR`] rows, regrouped): bytes are grouped by
//! four consecutive `k` per row, so one 64-byte vector holds the 16 rows' four values side by
//! side, which is what `vpdpbusd` multiplies against four broadcast activation bytes.
//! - 4-bit kinds: per 8 `k`, 64 bytes; byte `4j + t` holds row `j`'s value at `k + t` (low
//!   nibble) and at `k + 4 + t` (high nibble). Q4_0's values keep their +8.
//! - 8-bit kinds: per 4 `k`, 64 bytes; byte `4j + t` holds row `j`'s value at `k + t` plus 128,
//!   as an unsigned byte.

use std::sync::OnceLock;

use super::matmul::{QKind, QPanel, NR};

/// Rows of activations per micro-kernel call.
pub const MR: usize = 8;
/// Activation values per quantisation block (one f32 scale each).
pub const QK: usize = 32;

/// An instruction set with its own int8 kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Portable,
    Avx2,
    Avx512Bw,
    Avx512Vnni,
}

impl Isa {
    pub const ALL: [Isa; 4] = [Isa::Avx512Vnni, Isa::Avx512Bw, Isa::Avx2, Isa::Portable];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512Bw => "avx512bw",
            Isa::Avx512Vnni => "avx512vnni",
        }
    }

    /// Whether this CPU runs the variant.
    pub fn runs_here(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma");
            let bw = avx2 && has!("avx512f") && has!("avx512bw");
            match self {
                Isa::Portable => true,
                Isa::Avx2 => avx2,
                Isa::Avx512Bw => bw,
                Isa::Avx512Vnni => bw && has!("avx512vnni"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Portable
        }
    }

    /// Every variant this CPU runs, best first.
    pub fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.runs_here()).collect()
    }

    /// The variant for this process: the best this CPU runs, or `GRISTMILL_CPU_ISA` (a variant
    /// name) if it names one the CPU runs. Chosen once.
    pub fn chosen() -> Isa {
        static CHOSEN: OnceLock<Isa> = OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let best = Isa::available()[0];
            match std::env::var("GRISTMILL_CPU_ISA") {
                Ok(name) if !name.is_empty() => Isa::ALL
                    .into_iter()
                    .find(|i| i.name() == name && i.runs_here())
                    .unwrap_or(best),
                _ => best,
            }
        })
    }
}

/// Rows of activations quantised for the int8 kernels. Per row and block of 32 values: 32 signed
/// bytes `q` with `x ≈ d · q` (`d = max|x| / 127`), and, with a fine pass, 32 more `q2` with
/// `x ≈ d · (q + q2 / 256)` — about 15 bits. The kernels multiply the weights by both and
/// combine the integer sums as `256 · Σ w·q + Σ w·q2`, then apply one scale `dx` (`d`, or
/// `d / 256` with a fine pass). Per sub-block of the weight (`sub` values, 16 or 32): `s`, the
/// same combination of the activations' sums (for the weight offsets and the offset storage of
/// some kinds), `dx`, and `dx · s`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Int8Rows {
    pub k: usize,
    pub sub: usize,
    pub q: Vec<i8>,
    /// The fine pass (empty without one).
    pub q2: Vec<i8>,
    pub s: Vec<i32>,
    pub dx: Vec<f32>,
    pub dxs: Vec<f32>,
}

impl Int8Rows {
    /// Quantises `m` rows of `k` values (`k` a multiple of [`QK`]) for weights whose sub-blocks
    /// are `sub` wide (16 or 32), with a fine pass if `fine`.
    pub fn quantize(x: &[f32], m: usize, k: usize, sub: usize, fine: bool) -> Self {
        assert!(
            k.is_multiple_of(QK) && x.len() == m * k && matches!(sub, 16 | 32),
            "int8 rows: x is not [{m}, {k}] in blocks of 32, or sub-blocks of {sub}"
        );
        let per = QK / sub;
        let mut out = Self {
            k,
            sub,
            q: vec![0; m * k],
            q2: vec![0; if fine { m * k } else { 0 }],
            s: vec![0; m * k / sub],
            dx: vec![0.0; m * k / sub],
            dxs: vec![0.0; m * k / sub],
        };
        let q2_len = if fine { QK } else { 0 };
        // Runs of blocks, one per task: the whole batch, or an eighth of a large one each.
        let blocks = m * k / QK;
        let per_task = if m * k >= 1 << 15 {
            blocks.div_ceil(8)
        } else {
            blocks.max(1)
        };
        /// First block, blocks, and their q, q2, s, dx, dxs.
        type Task<'a> = (
            usize,
            usize,
            &'a mut [i8],
            &'a mut [i8],
            &'a mut [i32],
            &'a mut [f32],
            &'a mut [f32],
        );
        let mut tasks: Vec<Task<'_>> = Vec::new();
        let (mut q, mut q2) = (&mut out.q[..], &mut out.q2[..]);
        let (mut sr, mut dxr, mut dxsr) = (&mut out.s[..], &mut out.dx[..], &mut out.dxs[..]);
        let mut b0 = 0;
        while b0 < blocks {
            let n = per_task.min(blocks - b0);
            let (a, rest) = std::mem::take(&mut q).split_at_mut(n * QK);
            q = rest;
            let (a2, rest) = std::mem::take(&mut q2).split_at_mut(n * q2_len);
            q2 = rest;
            let (s, rest) = std::mem::take(&mut sr).split_at_mut(n * per);
            sr = rest;
            let (dx, rest) = std::mem::take(&mut dxr).split_at_mut(n * per);
            dxr = rest;
            let (dxs, rest) = std::mem::take(&mut dxsr).split_at_mut(n * per);
            dxsr = rest;
            tasks.push((b0, n, a, a2, s, dx, dxs));
            b0 += n;
        }
        let run = |(b0, n, q, q2, s, dx, dxs): Task<'_>| {
            for l in 0..n {
                let xb = &x[(b0 + l) * QK..(b0 + l + 1) * QK];
                let qb = &mut q[l * QK..(l + 1) * QK];
                let q2b = &mut q2[l * q2_len..(l + 1) * q2_len];
                let mut d = 0f32;
                #[cfg(target_arch = "x86_64")]
                if Isa::chosen() >= Isa::Avx2 {
                    // SAFETY: AVX2 is present (the chosen variant runs here); sizes are fixed.
                    unsafe { avx2::quantize_block(xb, qb, q2b, &mut d) };
                } else {
                    quantize_block(xb, qb, q2b, &mut d);
                }
                #[cfg(not(target_arch = "x86_64"))]
                quantize_block(xb, qb, q2b, &mut d);
                for i in 0..per {
                    let r = i * sub..(i + 1) * sub;
                    let s1: i32 = qb[r.clone()].iter().map(|&v| v as i32).sum();
                    let (si, di) = if fine {
                        let s2: i32 = q2b[r].iter().map(|&v| v as i32).sum();
                        (256 * s1 + s2, d / 256.0)
                    } else {
                        (s1, d)
                    };
                    s[l * per + i] = si;
                    dx[l * per + i] = di;
                    dxs[l * per + i] = di * si as f32;
                }
            }
        };
        if tasks.len() > 1 {
            use rayon::prelude::*;
            tasks.into_par_iter().for_each(run);
        } else {
            tasks.into_iter().for_each(run);
        }
        out
    }

    /// Whether the rows carry a fine pass.
    pub fn fine(&self) -> bool {
        !self.q2.is_empty()
    }
}

/// One block of 32: `d = max|x| / 127`, `q = round_ties_even(x · 127 / max|x|)`, and for the fine
/// pass (`q2` of 32, else empty) `q2 = round_ties_even((x - d·q) · 256 · 127 / max|x|)`.
fn quantize_block(x: &[f32], q: &mut [i8], q2: &mut [i8], d: &mut f32) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    *d = amax / 127.0;
    let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
    for (q, &v) in q.iter_mut().zip(x) {
        *q = ((v * id).round_ties_even() as i32).clamp(-127, 127) as i8;
    }
    let id2 = id * 256.0;
    for ((q2, &q), &v) in q2.iter_mut().zip(q.iter()).zip(x) {
        let r = v - *d * q as f32;
        *q2 = ((r * id2).round_ties_even() as i32).clamp(-127, 127) as i8;
    }
}

/// Weight `(j, kk)` of an int8-layout panel, as the integer the kernels multiply: the nibble
/// (0..=15, Q4_0's still +8) or the signed byte.
pub(super) fn stored_value(kind: QKind, q: &[u8], j: usize, kk: usize) -> i32 {
    if kind.nibbles() {
        let byte = q[kk / 8 * 64 + j * 4 + kk % 4];
        (if kk % 8 < 4 { byte & 0x0f } else { byte >> 4 }) as i32
    } else {
        (q[kk / 4 * 64 + j * 4 + kk % 4] ^ 0x80) as i8 as i32
    }
}

/// Stores `value` (see [`stored_value`]) at `(j, kk)` of a zeroed int8-layout panel.
pub(super) fn store_value(kind: QKind, q: &mut [u8], j: usize, kk: usize, value: i8) {
    if kind.nibbles() {
        let nib = if kind == QKind::Q4Sym {
            value + 8
        } else {
            value
        } as u8;
        let at = kk / 8 * 64 + j * 4 + kk % 4;
        q[at] |= if kk % 8 < 4 { nib } else { nib << 4 };
    } else {
        q[kk / 4 * 64 + j * 4 + kk % 4] = (value as u8) ^ 0x80;
    }
}

/// The integer subtracted per unit of activation sum from a sub-block's raw dot product: Q4_0
/// stores its values +8.
fn offset(kind: QKind) -> i32 {
    if kind == QKind::Q4Sym {
        8
    } else {
        0
    }
}

/// Computes `rows` (≤ [`MR`]) rows × [`NR`] columns of `x · Wᵀ` into `tile` (row stride `NR`),
/// from activation rows `row0..row0 + rows` of `a` and one int8-layout panel, with `isa`'s
/// kernel.
///
/// # Panics
/// If `isa` does not run here, or the sizes do not fit.
pub fn tile(isa: Isa, a: &Int8Rows, row0: usize, rows: usize, panel: QPanel<'_>, tile: &mut [f32]) {
    let k = a.k;
    assert!(
        isa.runs_here(),
        "the {} kernel does not run on this CPU",
        isa.name()
    );
    assert!(
        (1..=MR).contains(&rows)
            && (row0 + rows) * k <= a.q.len()
            && (!a.fine() || a.q2.len() == a.q.len())
            && tile.len() >= rows * NR
            && panel.q.len() >= k * panel.kind.bytes_per_k()
            && panel.sc.len() >= k / panel.sub * panel.kind.scale_sets() * NR
            && panel.sub == a.sub
    );
    // One monomorphised kernel per (variant, rows, fine pass).
    #[cfg(target_arch = "x86_64")]
    macro_rules! by_rows {
        ($m:ident :: $f:ident, $fine:expr, $rows:expr, $row0:expr, $t:expr) => {
            match ($fine, $rows) {
                (false, 1) => $m::$f::<1, false>(a, $row0, panel, $t),
                (false, 2) => $m::$f::<2, false>(a, $row0, panel, $t),
                (false, 3) => $m::$f::<3, false>(a, $row0, panel, $t),
                (false, 4) => $m::$f::<4, false>(a, $row0, panel, $t),
                (false, 5) => $m::$f::<5, false>(a, $row0, panel, $t),
                (false, 6) => $m::$f::<6, false>(a, $row0, panel, $t),
                (false, 7) => $m::$f::<7, false>(a, $row0, panel, $t),
                (false, _) => $m::$f::<8, false>(a, $row0, panel, $t),
                (true, 1) => $m::$f::<1, true>(a, $row0, panel, $t),
                (true, 2) => $m::$f::<2, true>(a, $row0, panel, $t),
                (true, 3) => $m::$f::<3, true>(a, $row0, panel, $t),
                (true, _) => $m::$f::<4, true>(a, $row0, panel, $t),
            }
        };
    }
    match isa {
        Isa::Portable => portable(a, row0, rows, panel, tile),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the variant runs here and the sizes were checked above.
        _ => unsafe {
            let fine = a.fine();
            // The register file bounds the rows per call: AVX-512 8 (4 with the fine pass),
            // AVX2 4 (2).
            let step = match (isa, fine) {
                (Isa::Avx2, false) => 4,
                (Isa::Avx2, true) => 2,
                (_, false) => 8,
                (_, true) => 4,
            };
            for r0 in (0..rows).step_by(step) {
                let (n, t) = ((rows - r0).min(step), &mut tile[r0 * NR..]);
                match isa {
                    Isa::Avx512Vnni => by_rows!(avx512::tile_vnni, fine, n, row0 + r0, t),
                    Isa::Avx512Bw => by_rows!(avx512::tile_bw, fine, n, row0 + r0, t),
                    _ => by_rows!(avx2::tile, fine, n, row0 + r0, t),
                }
            }
        },
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("only the portable kernel runs here (checked above)"),
    }
}

/// The reference: the same integer sums and the same f32 steps, one element at a time.
fn portable(a: &Int8Rows, row0: usize, rows: usize, panel: QPanel<'_>, tile: &mut [f32]) {
    let QPanel { kind, sub, q, sc } = panel;
    let (k, sets) = (a.k, kind.scale_sets());
    for r in 0..rows {
        let row = row0 + r;
        let xq = &a.q[row * k..(row + 1) * k];
        let xq2 = if a.fine() {
            &a.q2[row * k..(row + 1) * k]
        } else {
            &[][..]
        };
        for j in 0..NR {
            let mut acc = 0f32;
            for sb in 0..k / sub {
                let k0 = sb * sub;
                let dot1: i32 = (k0..k0 + sub)
                    .map(|kk| stored_value(kind, q, j, kk) * xq[kk] as i32)
                    .sum();
                let dot = if a.fine() {
                    let dot2: i32 = (k0..k0 + sub)
                        .map(|kk| stored_value(kind, q, j, kk) * xq2[kk] as i32)
                        .sum();
                    (dot1 << 8) + dot2
                } else {
                    dot1
                };
                let at = row * (k / sub) + sb;
                let (xs, dx) = (a.s[at], a.dx[at]);
                let s = &sc[sb * sets * NR..];
                acc = (dx * s[j]).mul_add((dot - offset(kind) * xs) as f32, acc);
                if sets == 2 {
                    acc = s[NR + j].mul_add(a.dxs[at], acc);
                }
            }
            tile[r * NR + j] = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{offset, Int8Rows, QPanel, NR, QK};

    /// [`super::quantize_block`] with AVX2; bit-identical (the same operations lane by lane;
    /// conversions round to nearest even).
    ///
    /// # Safety
    /// AVX2 must be available; `x` and `q` hold 32 values, `q2` 32 or none.
    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize_block(x: &[f32], q: &mut [i8], q2: &mut [i8], d: &mut f32) {
        assert!(x.len() >= QK && q.len() >= QK && (q2.is_empty() || q2.len() >= QK));
        // SAFETY: 32 floats are read from x and 32 bytes written to q (and q2) (asserted).
        unsafe {
            let p = x.as_ptr();
            let v = [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ];
            let sign = _mm256_set1_ps(-0.0);
            let mut m = _mm256_setzero_ps();
            for vi in v {
                m = _mm256_max_ps(m, _mm256_andnot_ps(sign, vi));
            }
            let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let m1 = _mm_max_ss(m2, _mm_movehdup_ps(m2));
            let amax = _mm_cvtss_f32(m1);
            *d = amax / 127.0;
            let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            let (lo, hi) = (_mm256_set1_epi32(-127), _mm256_set1_epi32(127));
            let round =
                |f: __m256| _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(f), lo), hi);
            let i: [__m256i; 4] = v.map(|vi| round(_mm256_mul_ps(vi, _mm256_set1_ps(id))));
            store32(q, i);
            if !q2.is_empty() {
                let (dv, id2) = (_mm256_set1_ps(*d), _mm256_set1_ps(id * 256.0));
                let r: [__m256i; 4] = [0, 1, 2, 3].map(|t| {
                    let back = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(i[t]));
                    round(_mm256_mul_ps(_mm256_sub_ps(v[t], back), id2))
                });
                store32(q2, r);
            }
        }
    }

    /// Stores 32 i32 (each within i8) as 32 bytes, in order.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn store32(q: &mut [i8], i: [__m256i; 4]) {
        let a = _mm256_packs_epi32(i[0], i[1]);
        let b = _mm256_packs_epi32(i[2], i[3]);
        let ab = _mm256_packs_epi16(a, b);
        let ordered = _mm256_permutevar8x32_epi32(ab, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        assert!(q.len() >= 32);
        // SAFETY: q holds at least 32 bytes (asserted).
        unsafe { _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, ordered) };
    }

    /// `R` rows × 16 columns, in two halves of 8 columns (to stay within 16 registers); `FINE`:
    /// the activations' fine pass too.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; sizes as [`super::tile`] checks.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile<const R: usize, const FINE: bool>(
        a: &Int8Rows,
        row0: usize,
        panel: QPanel<'_>,
        out: &mut [f32],
    ) {
        let QPanel { kind, sub, q, sc } = panel;
        let (k, sets) = (a.k, kind.scale_sets());
        let ones = _mm256_set1_epi16(1);
        let nib = _mm256_set1_epi8(0x0f);
        let flip = _mm256_set1_epi8(-128);
        let (xp, xp2) = (a.q.as_ptr(), a.q2.as_ptr());
        let off = offset(kind);
        for h in 0..2 {
            let mut acc = [_mm256_setzero_ps(); R];
            for sb in 0..k / sub {
                let k0 = sb * sub;
                let mut dot = [_mm256_setzero_si256(); R];
                let mut dot2 = [_mm256_setzero_si256(); R];
                // SAFETY: every offset is within the panel (k × bytes_per_k bytes) and the R
                // activation rows of both passes (checked by the caller).
                unsafe {
                    if kind.nibbles() {
                        for kk in (k0..k0 + sub).step_by(8) {
                            let b = _mm256_loadu_si256(
                                q.as_ptr().add(kk / 8 * 64 + h * 32) as *const __m256i
                            );
                            let lo = _mm256_and_si256(b, nib);
                            let hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), nib);
                            for r in 0..R {
                                let at = (row0 + r) * k + kk;
                                let pl = _mm256_maddubs_epi16(lo, x4(xp, at));
                                let ph = _mm256_maddubs_epi16(hi, x4(xp, at + 4));
                                let sum = _mm256_madd_epi16(_mm256_add_epi16(pl, ph), ones);
                                dot[r] = _mm256_add_epi32(dot[r], sum);
                                if FINE {
                                    let pl = _mm256_maddubs_epi16(lo, x4(xp2, at));
                                    let ph = _mm256_maddubs_epi16(hi, x4(xp2, at + 4));
                                    let sum = _mm256_madd_epi16(_mm256_add_epi16(pl, ph), ones);
                                    dot2[r] = _mm256_add_epi32(dot2[r], sum);
                                }
                            }
                        }
                    } else {
                        for kk in (k0..k0 + sub).step_by(4) {
                            let b = _mm256_loadu_si256(
                                q.as_ptr().add(kk / 4 * 64 + h * 32) as *const __m256i
                            );
                            let w = _mm256_xor_si256(b, flip);
                            let aw = _mm256_abs_epi8(w);
                            for r in 0..R {
                                let at = (row0 + r) * k + kk;
                                let p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(x4(xp, at), w));
                                dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(p, ones));
                                if FINE {
                                    let x = _mm256_sign_epi8(x4(xp2, at), w);
                                    let p = _mm256_maddubs_epi16(aw, x);
                                    dot2[r] = _mm256_add_epi32(dot2[r], _mm256_madd_epi16(p, ones));
                                }
                            }
                        }
                    }
                    let s = sc.as_ptr().add(sb * sets * NR + h * 8);
                    let dw = _mm256_loadu_ps(s);
                    for r in 0..R {
                        let at = (row0 + r) * (k / sub) + sb;
                        let mut d = dot[r];
                        if FINE {
                            d = _mm256_add_epi32(_mm256_slli_epi32(d, 8), dot2[r]);
                        }
                        if off != 0 {
                            let c = _mm256_set1_epi32(off * *a.s.get_unchecked(at));
                            d = _mm256_sub_epi32(d, c);
                        }
                        let dx = _mm256_set1_ps(*a.dx.get_unchecked(at));
                        let d = _mm256_cvtepi32_ps(d);
                        acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(dx, dw), d, acc[r]);
                        if sets == 2 {
                            let m = _mm256_loadu_ps(s.add(NR));
                            let dxs = _mm256_set1_ps(*a.dxs.get_unchecked(at));
                            acc[r] = _mm256_fmadd_ps(m, dxs, acc[r]);
                        }
                    }
                }
            }
            for (r, acc) in acc.into_iter().enumerate() {
                // SAFETY: out holds R × NR floats (checked by the caller).
                unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(r * NR + h * 8), acc) };
            }
        }
    }

    /// Four activation bytes at `xp + at` as one broadcast i32.
    ///
    /// # Safety
    /// Four bytes must be readable at `xp + at`.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn x4(xp: *const i8, at: usize) -> __m256i {
        // SAFETY: per the contract.
        unsafe { _mm256_set1_epi32((xp.add(at) as *const i32).read_unaligned()) }
    }

    // `vpmaddubsw` saturates its pair sums at 2¹⁵ - 1, which neither kind reaches: the 4-bit
    // values give at most 2 × 15 × 127 = 3,810; the 8-bit kinds multiply |w| ≤ 128 by x with w's
    // sign, at most 2 × 128 × 127 = 32,512.
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{offset, Int8Rows, QPanel, NR};

    /// Four activation bytes at `xp + at` as one broadcast i32.
    ///
    /// # Safety
    /// Four bytes must be readable at `xp + at`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn x4(xp: *const i8, at: usize) -> __m512i {
        // SAFETY: per the contract.
        unsafe { _mm512_set1_epi32((xp.add(at) as *const i32).read_unaligned()) }
    }

    /// `d + Σ w·x` per 32-bit lane over four byte pairs, with `vpdpbusd`.
    #[target_feature(enable = "avx512f,avx512vnni")]
    #[inline]
    fn dp_vnni(d: __m512i, w: __m512i, x: __m512i) -> __m512i {
        _mm512_dpbusd_epi32(d, w, x)
    }

    /// The same with `vpmaddubsw` + `vpmaddwd` (no saturation: see the AVX2 kernel).
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    fn dp_bw(d: __m512i, w: __m512i, x: __m512i) -> __m512i {
        _mm512_add_epi32(
            d,
            _mm512_madd_epi16(_mm512_maddubs_epi16(w, x), _mm512_set1_epi16(1)),
        )
    }

    /// One variant's kernel: `R` rows × 16 columns, one 512-bit vector per row; `FINE`: the
    /// activations' fine pass too.
    macro_rules! kernel {
        ($name:ident, $features:literal, $dp:ident, $vnni:expr) => {
            /// # Safety
            /// The variant's instruction sets must be available; sizes as [`super::tile`]
            /// checks.
            #[target_feature(enable = $features)]
            pub unsafe fn $name<const R: usize, const FINE: bool>(
                a: &Int8Rows,
                row0: usize,
                panel: QPanel<'_>,
                out: &mut [f32],
            ) {
                let QPanel { kind, sub, q, sc } = panel;
                let (k, sets) = (a.k, kind.scale_sets());
                let nib = _mm512_set1_epi8(0x0f);
                let flip = _mm512_set1_epi8(-128);
                let zero = _mm512_setzero_si512();
                let (xp, xp2) = (a.q.as_ptr(), a.q2.as_ptr());
                // With VNNI the 8-bit kinds are multiplied as stored (+128, unsigned) and the
                // activations' sum times 128 comes off at the end of the sub-block.
                let off = offset(kind) + if $vnni && !kind.nibbles() { 128 } else { 0 };
                let mut acc = [_mm512_setzero_ps(); R];
                for sb in 0..k / sub {
                    let k0 = sb * sub;
                    let mut dot = [zero; R];
                    let mut dot2 = [zero; R];
                    // SAFETY: every offset is within the panel and the R activation rows of
                    // both passes (checked by the caller).
                    unsafe {
                        if kind.nibbles() {
                            for kk in (k0..k0 + sub).step_by(8) {
                                let b = _mm512_loadu_si512(q.as_ptr().add(kk / 8 * 64) as *const _);
                                let lo = _mm512_and_si512(b, nib);
                                let hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), nib);
                                for r in 0..R {
                                    let at = (row0 + r) * k + kk;
                                    dot[r] = $dp($dp(dot[r], lo, x4(xp, at)), hi, x4(xp, at + 4));
                                    if FINE {
                                        let d2 = $dp(dot2[r], lo, x4(xp2, at));
                                        dot2[r] = $dp(d2, hi, x4(xp2, at + 4));
                                    }
                                }
                            }
                        } else if $vnni {
                            for kk in (k0..k0 + sub).step_by(4) {
                                let b = _mm512_loadu_si512(q.as_ptr().add(kk / 4 * 64) as *const _);
                                for r in 0..R {
                                    let at = (row0 + r) * k + kk;
                                    dot[r] = $dp(dot[r], b, x4(xp, at));
                                    if FINE {
                                        dot2[r] = $dp(dot2[r], b, x4(xp2, at));
                                    }
                                }
                            }
                        } else {
                            for kk in (k0..k0 + sub).step_by(4) {
                                let b = _mm512_loadu_si512(q.as_ptr().add(kk / 4 * 64) as *const _);
                                let w = _mm512_xor_si512(b, flip);
                                let aw = _mm512_abs_epi8(w);
                                let neg = _mm512_movepi8_mask(w);
                                for r in 0..R {
                                    let at = (row0 + r) * k + kk;
                                    let x = x4(xp, at);
                                    let sx = _mm512_mask_sub_epi8(x, neg, zero, x);
                                    dot[r] = $dp(dot[r], aw, sx);
                                    if FINE {
                                        let x = x4(xp2, at);
                                        let sx = _mm512_mask_sub_epi8(x, neg, zero, x);
                                        dot2[r] = $dp(dot2[r], aw, sx);
                                    }
                                }
                            }
                        }
                        let s = sc.as_ptr().add(sb * sets * NR);
                        let dw = _mm512_loadu_ps(s);
                        for r in 0..R {
                            let at = (row0 + r) * (k / sub) + sb;
                            let mut d = dot[r];
                            if FINE {
                                d = _mm512_add_epi32(_mm512_slli_epi32(d, 8), dot2[r]);
                            }
                            if off != 0 {
                                let c = _mm512_set1_epi32(off * *a.s.get_unchecked(at));
                                d = _mm512_sub_epi32(d, c);
                            }
                            let dx = _mm512_set1_ps(*a.dx.get_unchecked(at));
                            let d = _mm512_cvtepi32_ps(d);
                            acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(dx, dw), d, acc[r]);
                            if sets == 2 {
                                let m = _mm512_loadu_ps(s.add(NR));
                                let dxs = _mm512_set1_ps(*a.dxs.get_unchecked(at));
                                acc[r] = _mm512_fmadd_ps(m, dxs, acc[r]);
                            }
                        }
                    }
                }
                for (r, acc) in acc.into_iter().enumerate() {
                    // SAFETY: out holds R × NR floats (checked by the caller).
                    unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(r * NR), acc) };
                }
            }
        };
    }

    kernel!(tile_vnni, "avx512f,avx512bw,avx512vnni,fma", dp_vnni, true);
    kernel!(tile_bw, "avx512f,avx512bw,fma", dp_bw, false);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::matmul::Storage;
    use crate::cpu::{linear, PackedMatrix};
    use crate::quant::{dequantize, random_blocks, GgmlType};

    fn data(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                // Mostly small values with an occasional large one, as activations have.
                let v = (s % 2001) as f32 / 1000.0 - 1.0;
                if s.is_multiple_of(97) {
                    v * 20.0
                } else {
                    v
                }
            })
            .collect()
    }

    fn quantised_types() -> impl Iterator<Item = GgmlType> {
        GgmlType::ALL
            .into_iter()
            .filter(|t| t.sub_blocks().is_some())
    }

    #[test]
    fn every_variant_that_runs_here_matches_the_portable_kernel_bit_for_bit() {
        let (k, n) = (512, 16 * 3);
        let x = data(11 * k, 1);
        let available = Isa::available();
        eprintln!(
            "int8 kernels tested here: {:?}",
            available.iter().map(|i| i.name()).collect::<Vec<_>>()
        );
        for ty in quantised_types() {
            let bytes = random_blocks(ty, n * k / ty.block_len(), ty.id() as u64 + 7, 0.01);
            let w = PackedMatrix::pack_int8(ty, &bytes, n, k).expect("packs");
            let Storage::Int8(qp) = &w.storage else {
                panic!("{ty:?} is not in the int8 layout")
            };
            for fine in [false, true] {
                let a = Int8Rows::quantize(&x, 11, k, qp.sub, fine);
                for p in 0..n / NR {
                    let panel = super::super::matmul::qpanel(qp, k, p);
                    for (row0, rows) in [
                        (0, 8),
                        (8, 3),
                        (2, 5),
                        (10, 1),
                        (1, 7),
                        (3, 2),
                        (4, 4),
                        (0, 6),
                    ] {
                        let mut want = [0f32; MR * NR];
                        tile(Isa::Portable, &a, row0, rows, panel, &mut want);
                        for &isa in &available {
                            let mut got = [f32::NAN; MR * NR];
                            tile(isa, &a, row0, rows, panel, &mut got);
                            assert_eq!(
                                got[..rows * NR],
                                want[..rows * NR],
                                "{ty:?} {} panel {p} rows {row0}+{rows} fine {fine}",
                                isa.name()
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_vector_quantiser_matches_the_scalar_one() {
        let x = data(64 * 32, 3);
        let mut x = x.clone();
        x[5 * 32..6 * 32].fill(0.0); // an all-zero block
        x[7 * 32 + 3] = 0.5 * 127.0 / 127.0; // and ties are rounded to even in both
        for (b, xb) in x.chunks_exact(QK).enumerate() {
            let (mut q1, mut f1, mut d1) = ([0i8; QK], [0i8; QK], 0f32);
            quantize_block(xb, &mut q1, &mut f1, &mut d1);
            #[cfg(target_arch = "x86_64")]
            if Isa::Avx2.runs_here() {
                let (mut q2, mut f2, mut d2) = ([0i8; QK], [0i8; QK], 0f32);
                // SAFETY: AVX2 runs here; the blocks hold 32 values.
                unsafe { avx2::quantize_block(xb, &mut q2, &mut f2, &mut d2) };
                assert_eq!((q1, f1, d1.to_bits()), (q2, f2, d2.to_bits()), "block {b}");
            }
            // The fine pass leaves half of its own step (a whole one where ±127 clamps it).
            for ((&q, &f), &v) in q1.iter().zip(&f1).zip(xb) {
                let back = d1 * q as f32 + d1 / 256.0 * f as f32;
                let bound = if f.unsigned_abs() == 127 {
                    256.0
                } else {
                    512.0
                };
                assert!(
                    (back - v).abs() <= d1 / bound * 1.01 + 1e-7,
                    "block {b}: {v} → {back} ({q}, {f}, step {d1})"
                );
            }
            let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
            for (&q, &v) in q1.iter().zip(xb) {
                assert!(
                    (q as f32 * d1 - v).abs() <= d1 * 0.5 + 1e-6,
                    "block {b}: {v} → {q}"
                );
            }
            assert_eq!(
                q1.iter().map(|q| q.unsigned_abs()).max(),
                Some(if amax > 0.0 { 127 } else { 0 })
            );
        }
    }

    #[test]
    fn int8_linear_is_close_to_the_exact_product_and_batch_invariant() {
        let (k, n) = (256, 70);
        let x = data(40 * k, 4);
        for ty in quantised_types() {
            let bytes = random_blocks(ty, n * k / ty.block_len(), ty.id() as u64, 0.01);
            let mut deq = vec![0f32; n * k];
            dequantize(ty, &bytes, &mut deq);
            let w = PackedMatrix::pack_int8(ty, &bytes, n, k).expect("packs");
            assert!(w.is_int8());
            assert_eq!(
                w.bytes(),
                PackedMatrix::pack_quantized(ty, &bytes, n, k)
                    .expect("packs")
                    .bytes()
            );
            let mut row = vec![0f32; k];
            for i in [0, 33, n - 1] {
                w.row_into(i, &mut row);
                assert_eq!(row, &deq[i * k..(i + 1) * k], "{ty:?} row {i} reads back");
            }
            let mut all = vec![0f32; 40 * n];
            linear(&x, 40, &w, &mut all);
            for i in 0..40 {
                for j in 0..n {
                    let exact: f64 = (0..k)
                        .map(|p| x[i * k + p] as f64 * deq[j * k + p] as f64)
                        .sum();
                    // Error of 8-bit activations: half a step per value, at most.
                    let bound: f64 = (0..k / QK)
                        .map(|b| {
                            let xb = &x[i * k + b * QK..i * k + (b + 1) * QK];
                            let step = xb.iter().fold(0f32, |a, v| a.max(v.abs())) as f64 / 127.0;
                            let wsum: f64 = deq[j * k + b * QK..j * k + (b + 1) * QK]
                                .iter()
                                .map(|v| v.abs() as f64)
                                .sum();
                            0.5 * step * wsum
                        })
                        .sum();
                    let got = all[i * n + j] as f64;
                    assert!(
                        (got - exact).abs() <= bound * 1.01 + 1e-4,
                        "{ty:?} [{i},{j}]: {got} vs {exact} (bound {bound})"
                    );
                }
            }
            // Alone or in any batch, a row's outputs are the same bits.
            for (m, r) in [(1, 0), (3, 2), (5, 4), (9, 8), (40, 39)] {
                let mut out = vec![0f32; m * n];
                linear(
                    &x[(r + 1 - m.min(r + 1)) * k..(r + 1) * k],
                    m.min(r + 1),
                    &w,
                    &mut out,
                );
                let at = m.min(r + 1) - 1;
                assert_eq!(
                    out[at * n..(at + 1) * n],
                    all[r * n..(r + 1) * n],
                    "{ty:?} m={m}"
                );
            }
        }
    }
}

#[cfg(test)]
mod two_pass_tests {
    use crate::cpu::{linear, PackedMatrix};
    use crate::quant::{dequantize, random_blocks, GgmlType};

    #[test]
    fn two_passes_bring_the_product_much_closer_to_the_exact_one() {
        let (k, n, m) = (512, 48, 5);
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        for ty in [
            GgmlType::Q4_1,
            GgmlType::Q4_0,
            GgmlType::Q8_0,
            GgmlType::Q6K,
        ] {
            let bytes = random_blocks(ty, n * k / ty.block_len(), 3, 0.01);
            let mut deq = vec![0f32; n * k];
            dequantize(ty, &bytes, &mut deq);
            let one = PackedMatrix::pack_int8(ty, &bytes, n, k).expect("packs");
            let two = one.clone().two_pass_activations();
            let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
            linear(&x, m, &one, &mut a);
            linear(&x, m, &two, &mut b);
            let err = |o: &[f32]| -> f64 {
                (0..m * n)
                    .map(|e| {
                        let (i, j) = (e / n, e % n);
                        let exact: f64 = (0..k)
                            .map(|p| x[i * k + p] as f64 * deq[j * k + p] as f64)
                            .sum();
                        (o[e] as f64 - exact).powi(2)
                    })
                    .sum::<f64>()
                    .sqrt()
            };
            let (e1, e2) = (err(&a), err(&b));
            assert!(e2 * 20.0 < e1, "{ty:?}: one pass {e1:e}, two passes {e2:e}");
        }
    }
}
