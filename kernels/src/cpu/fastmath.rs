//! A vectorised `exp` for the `fast` precision (attention's softmax, SiLU): Cephes' polynomial
//! after a range reduction by ln 2, about 2 ulp from the true value. The AVX2 lanes and the
//! portable scalar do the same fused multiply-adds in the same order, so both give the same
//! bits, whatever the machine.

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two, so that `x - n ln 2` loses nothing.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];
/// Inputs are clamped to where the result is a normal f32.
const MAX: f32 = 88.376_26;
const MIN: f32 = -87.336_54;

/// `e^x` (the portable kernel; the reference for the vector one).
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(MIN, MAX);
    let n = (x * LOG2E).round_ties_even();
    let r = (-n).mul_add(LN2_HI, x);
    let r = (-n).mul_add(LN2_LO, r);
    let mut p = P[0];
    for c in &P[1..] {
        p = p.mul_add(r, *c);
    }
    let y = p.mul_add(r * r, r) + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `x[i] = e^x[i]`.
pub fn exp_in_place(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA are present.
        unsafe { avx2::exp_in_place(x) };
        return;
    }
    for v in x {
        *v = exp(*v);
    }
}

/// `gate = silu(gate) * up` with this module's `exp`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "silu_mul: lengths differ");
    for chunk in gate.chunks_mut(256).zip(up.chunks(256)) {
        let (g, u) = chunk;
        let mut e = [0f32; 256];
        let e = &mut e[..g.len()];
        for (e, &g) in e.iter_mut().zip(g.iter()) {
            *e = -g;
        }
        exp_in_place(e);
        for ((g, &u), &e) in g.iter_mut().zip(u).zip(e.iter()) {
            *g = *g / (1.0 + e) * u;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{LN2_HI, LN2_LO, LOG2E, MAX, MIN, P};

    /// # Safety
    /// AVX2 and FMA must be available.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_in_place(x: &mut [f32]) {
        let full = x.len() / 8 * 8;
        let p = x.as_mut_ptr();
        for i in (0..full).step_by(8) {
            // SAFETY: i + 8 ≤ full ≤ x.len().
            unsafe { _mm256_storeu_ps(p.add(i), exp8(_mm256_loadu_ps(p.add(i)))) };
        }
        for v in &mut x[full..] {
            *v = super::exp(*v);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn exp8(x: __m256) -> __m256 {
        let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(MIN)), _mm256_set1_ps(MAX));
        let n = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(P[0]);
        for c in &P[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let y = _mm256_add_ps(
            _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
            _mm256_set1_ps(1.0),
        );
        let pow2 = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
            23,
        );
        _mm256_mul_ps(y, _mm256_castsi256_ps(pow2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulp_and_the_vector_kernel_gives_the_same_bits() {
        let xs: Vec<f32> = (0..20_001)
            .map(|i| -87.0 + i as f32 * (175.0 / 20_000.0))
            .chain([0.0, -0.0, -1e-8, 1e-8, -200.0, f32::NEG_INFINITY])
            .collect();
        let mut v = xs.clone();
        exp_in_place(&mut v);
        for (&x, &got) in xs.iter().zip(&v) {
            assert_eq!(got.to_bits(), exp(x).to_bits(), "exp({x})");
            let want = (x as f64).max(MIN as f64).exp();
            let rel = ((got as f64 - want) / want).abs();
            assert!(
                rel < 4.0 * f32::EPSILON as f64,
                "exp({x}) = {got}, want {want}"
            );
        }
    }

    #[test]
    fn fast_silu_is_close_to_the_exact_one() {
        let g: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.03).collect();
        let u: Vec<f32> = (0..1000).map(|i| 1.0 + i as f32 * 1e-3).collect();
        let (mut a, mut b) = (g.clone(), g);
        silu_mul(&mut a, &u);
        crate::cpu::silu_mul(&mut b, &u);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "{x} vs {y}");
        }
    }
}
