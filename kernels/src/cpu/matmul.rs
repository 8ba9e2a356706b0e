//! `y = x · Wᵀ` for row-major `x [m, k]` and a weight `W [n, k]` (a linear layer's `[out, in]`),
//! with `W` packed once at load into panels of [`NR`] output columns stored k-major
//! (`panel[k][j]`), so that a micro-kernel can broadcast one `x` value against 16 weights.
//!
//! Determinism: every output element is a single FMA chain over `k` in ascending order, starting
//! from zero — `acc = fma(x[i][k], w[j][k], acc)` for `k = 0, 1, …` — whichever micro-kernel
//! (1 to [`MR`] rows) and whichever thread computes it. The tiling depends on `m`; the arithmetic
//! of an element does not, so a row's result is bit-identical at any batch size.

use rayon::prelude::*;

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
    /// `ceil(n / NR)` panels of `k × NR` floats; columns past `n` are zero.
    data: Vec<f32>,
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
        Self { n, k, data }
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn cols(&self) -> usize {
        self.k
    }

    /// Row `i` of the original matrix (an embedding lookup), gathered from its panel.
    pub fn row_into(&self, i: usize, out: &mut [f32]) {
        let (p, j) = (i / NR, i % NR);
        let panel = &self.data[p * self.k * NR..(p + 1) * self.k * NR];
        for (kk, o) in out.iter_mut().enumerate().take(self.k) {
            *o = panel[kk * NR + j];
        }
    }
}

/// Computes `out[m, n] = x[m, k] · Wᵀ`, splitting the panels over the rayon pool.
///
/// # Panics
/// If the slice lengths do not match `m`, `w.cols()` and `w.rows()`.
pub fn linear(x: &[f32], m: usize, w: &PackedMatrix, out: &mut [f32]) {
    let (n, k) = (w.n, w.k);
    assert_eq!(x.len(), m * k, "linear: x is not [{m}, {k}]");
    assert_eq!(out.len(), m * n, "linear: out is not [{m}, {n}]");
    if m == 0 || n == 0 {
        return;
    }
    let panels = n.div_ceil(NR);
    let threads = rayon::current_num_threads().max(1);
    // A few tasks per thread for balance, each a run of whole panels.
    let per_task = panels.div_ceil(threads * 3).max(1);
    let tasks: Vec<usize> = (0..panels).step_by(per_task).collect();
    let out_ptr = SendPtr(out.as_mut_ptr());
    tasks.par_iter().for_each(|&p0| {
        let p1 = (p0 + per_task).min(panels);
        let out_ptr = &out_ptr;
        // SAFETY: tasks cover disjoint panel ranges, hence disjoint output columns, of `out`,
        // which outlives the parallel loop.
        unsafe { task(x, m, w, p0, p1, out_ptr.0) };
    });
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
    for m0 in (0..m).step_by(MC) {
        let m1 = (m0 + MC).min(m);
        for p in p0..p1 {
            let panel = &w.data[p * k * NR..(p + 1) * k * NR];
            let cols = NR.min(w.n - p * NR);
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

    use super::{MR, NR};

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
