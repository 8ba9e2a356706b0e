//! `y = x · Wᵀ` for row-major `x [m, k]` and `W [n, k]` (the checkpoint layout of a linear layer).
//!
//! Determinism: every output element is one dot product computed with eight-lane partial sums
//! over `k` in ascending order, reduced in a fixed order, whichever micro-kernel (4×4, 1×4, 4×1,
//! 1×1) computes it. The tiling depends on `m` but the arithmetic of an element does not, so a
//! row's result is bit-identical at any batch size.

use rayon::prelude::*;

/// Computes `out[m, n] = x[m, k] · w[n, k]ᵀ`, splitting the columns over the rayon pool.
///
/// # Panics
/// If the slice lengths do not match `m`, `k` and `n`.
pub fn linear(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
    assert_eq!(x.len(), m * k, "linear: x is not [{m}, {k}]");
    assert_eq!(w.len(), n * k, "linear: w is not [{n}, {k}]");
    assert_eq!(out.len(), m * n, "linear: out is not [{m}, {n}]");
    if m == 0 || n == 0 {
        return;
    }
    // Column chunks: a multiple of 4 rows of W, several per thread for load balance.
    let threads = rayon::current_num_threads().max(1);
    let chunk = (n.div_ceil(threads * 4)).next_multiple_of(4).max(16);
    let starts: Vec<usize> = (0..n).step_by(chunk).collect();
    // Each task writes a disjoint column range of every output row; gather them through raw
    // row pointers wrapped so rayon can share them.
    let out_ptr = SendPtr(out.as_mut_ptr());
    starts.par_iter().for_each(|&n0| {
        let n1 = (n0 + chunk).min(n);
        let out_ptr = &out_ptr;
        // SAFETY: tasks cover disjoint column ranges [n0, n1) of `out`, which outlives the
        // parallel loop; each writes only out[i * n + j] for j in its range.
        unsafe { tile(x, m, k, w, n, n0, n1, out_ptr.0) };
    });
}

struct SendPtr(*mut f32);
// SAFETY: used only to hand disjoint output ranges to rayon tasks (see `linear`).
unsafe impl Sync for SendPtr {}

/// # Safety
/// `out` must point to `m * n` writable floats and no other thread may write columns `n0..n1`.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    n0: usize,
    n1: usize,
    out: *mut f32,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA (checked above); pointer contract passed on.
            unsafe { avx2::tile(x, m, k, w, n, n0, n1, out) };
            return;
        }
    }
    for j in n0..n1 {
        let wr = &w[j * k..(j + 1) * k];
        for i in 0..m {
            let v = portable_dot(&x[i * k..(i + 1) * k], wr);
            // SAFETY: i < m, j < n; column j belongs to this task.
            unsafe { *out.add(i * n + j) = v };
        }
    }
}

/// Dot product with eight partial sums in a fixed order (the no-AVX2 fallback).
fn portable_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8 * 8;
    for (ca, cb) in a[..chunks].chunks_exact(8).zip(b[..chunks].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += ca[l] * cb[l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in a[chunks..].iter().zip(&b[chunks..]) {
        s += x * y;
    }
    s
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX2 and FMA must be available; `out` as in [`super::tile`].
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile(
        x: &[f32],
        m: usize,
        k: usize,
        w: &[f32],
        n: usize,
        n0: usize,
        n1: usize,
        out: *mut f32,
    ) {
        let mut j = n0;
        while j < n1 {
            let cols = (n1 - j).min(4);
            let mut i = 0;
            while i < m {
                let rows = (m - i).min(4);
                // SAFETY: rows/cols are within bounds of x, w and out by construction.
                unsafe {
                    match (rows, cols) {
                        (4, 4) => block::<4, 4>(x, i, k, w, j, n, out),
                        (4, _) => {
                            for c in 0..cols {
                                block::<4, 1>(x, i, k, w, j + c, n, out)
                            }
                        }
                        (_, 4) => {
                            for r in 0..rows {
                                block::<1, 4>(x, i + r, k, w, j, n, out)
                            }
                        }
                        _ => {
                            for r in 0..rows {
                                for c in 0..cols {
                                    block::<1, 1>(x, i + r, k, w, j + c, n, out)
                                }
                            }
                        }
                    }
                }
                i += rows;
            }
            j += cols;
        }
    }

    /// Computes the R×C block of outputs at rows `i..i+R`, columns `j..j+C`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn block<const R: usize, const C: usize>(
        x: &[f32],
        i: usize,
        k: usize,
        w: &[f32],
        j: usize,
        n: usize,
        out: *mut f32,
    ) {
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let kv = k / 8 * 8;
        let xp = x.as_ptr();
        let wp = w.as_ptr();
        let mut p = 0;
        while p < kv {
            let mut wv = [_mm256_setzero_ps(); C];
            for (c, v) in wv.iter_mut().enumerate() {
                // SAFETY: (j + c) * k + p + 8 <= n * k since j + c < n and p + 8 <= k.
                *v = unsafe { _mm256_loadu_ps(wp.add((j + c) * k + p)) };
            }
            for (r, row) in acc.iter_mut().enumerate() {
                // SAFETY: (i + r) * k + p + 8 <= m * k.
                let xv = unsafe { _mm256_loadu_ps(xp.add((i + r) * k + p)) };
                for (a, v) in row.iter_mut().zip(&wv) {
                    *a = _mm256_fmadd_ps(xv, *v, *a);
                }
            }
            p += 8;
        }
        for (r, row) in acc.iter().enumerate() {
            for (c, a) in row.iter().enumerate() {
                let mut lanes = [0f32; 8];
                // SAFETY: lanes holds 8 floats.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), *a) };
                let mut s = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
                    + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
                for q in kv..k {
                    s = x[(i + r) * k + q].mul_add(w[(j + c) * k + q], s);
                }
                // SAFETY: the caller owns column j + c of row i + r.
                unsafe { *out.add((i + r) * n + j + c) = s };
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

    #[test]
    fn matches_naive_f64_at_odd_shapes() {
        for &(m, k, n) in &[
            (1, 8, 1),
            (3, 13, 7),
            (5, 64, 33),
            (9, 576, 50),
            (17, 100, 130),
        ] {
            let x = data(m * k, 1);
            let w = data(n * k, 2);
            let mut out = vec![f32::NAN; m * n];
            linear(&x, m, k, &w, n, &mut out);
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
        let rows = data(64 * k, 4);
        let mut alone = vec![0f32; n];
        linear(&rows[5 * k..6 * k], 1, k, &w, n, &mut alone);
        for m in [6, 7, 8, 33, 64] {
            let mut out = vec![0f32; m * n];
            linear(&rows[..m * k], m, k, &w, n, &mut out);
            assert_eq!(&out[5 * n..6 * n], &alone[..], "batch of {m} changed row 5");
        }
    }
}
