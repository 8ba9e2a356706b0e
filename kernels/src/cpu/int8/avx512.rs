//! The AVX-512 int8 kernels: VNNI (`vpdpbusd`) and AVX-512BW (`vpmaddubsw` + `vpmaddwd`).

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
