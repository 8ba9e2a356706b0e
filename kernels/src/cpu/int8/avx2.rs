//! The AVX2 int8 kernels and activation quantiser (`vpmaddubsw` + `vpmaddwd`).

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
        let round = |f: __m256| _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(f), lo), hi);
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
