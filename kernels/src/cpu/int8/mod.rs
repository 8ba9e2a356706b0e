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
                Ok(name) if !name.is_empty() => {
                    let found = Isa::ALL
                        .into_iter()
                        .find(|i| i.name() == name && i.runs_here());
                    found.unwrap_or_else(|| {
                        let here: Vec<&str> = Isa::available().iter().map(|i| i.name()).collect();
                        eprintln!(
                            "GRISTMILL_CPU_ISA={name:?} is not a kernel variant this CPU runs \
                             (it runs: {}); using {}",
                            here.join(", "),
                            best.name()
                        );
                        best
                    })
                }
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
        let nib = kind.nibble(value);
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
mod avx2;

#[cfg(target_arch = "x86_64")]
mod avx512;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod two_pass_tests;
