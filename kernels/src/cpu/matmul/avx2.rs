//! The AVX2+FMA f32 micro-kernels of the `exact` matmul, and the in-register expansion of
//! quantised panels.

use std::arch::x86_64::*;

use super::{HalfKind, QKind, QPanel, MR, NR};

/// Eight 16-bit floats widened to f32 (exactly).
///
/// # Safety
/// AVX2 and F16C must be available; `p` must point at eight readable values.
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn widen8(kind: HalfKind, p: *const u16) -> __m256 {
    // SAFETY: reads 16 bytes at p, per the contract.
    unsafe {
        let b = _mm_loadu_si128(p as *const __m128i);
        match kind {
            HalfKind::F16 => _mm256_cvtph_ps(b),
            HalfKind::Bf16 => _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16)),
        }
    }
}

/// Widens a 16-bit panel into f32 `out` (as many values).
///
/// # Safety
/// AVX2 and F16C must be available.
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn widen_panel(kind: HalfKind, bits: &[u16], out: &mut [f32]) {
    assert!(out.len() >= bits.len() && bits.len().is_multiple_of(8));
    for c in (0..bits.len()).step_by(8) {
        // SAFETY: c + 8 ≤ bits.len() ≤ out.len().
        unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(c), widen8(kind, bits.as_ptr().add(c))) };
    }
}

/// [`kernel`] straight from a 16-bit panel (`k × NR` values), widening each `k` step in
/// registers: the same FMA chains on the same f32 weights.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `xs` holds `rows × k` floats, rows ≤ MR.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn hkernel(
    xs: &[f32],
    rows: usize,
    k: usize,
    kind: HalfKind,
    bits: &[u16],
    tile: &mut [f32; MR * NR],
) {
    assert!(xs.len() >= rows * k && bits.len() >= k * NR && rows <= MR);
    // SAFETY: sizes asserted above.
    unsafe {
        match rows {
            6 => hblock::<6>(xs, k, kind, bits, tile),
            5 => hblock::<5>(xs, k, kind, bits, tile),
            4 => hblock::<4>(xs, k, kind, bits, tile),
            3 => hblock::<3>(xs, k, kind, bits, tile),
            2 => hblock::<2>(xs, k, kind, bits, tile),
            _ => hblock::<1>(xs, k, kind, bits, tile),
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn hblock<const R: usize>(
    xs: &[f32],
    k: usize,
    kind: HalfKind,
    bits: &[u16],
    tile: &mut [f32; MR * NR],
) {
    let wp = bits.as_ptr();
    // SAFETY: the caller's panel holds k × NR values, so step kk's 16 lie at kk * NR.
    let load = |kk: usize| unsafe {
        [
            widen8(kind, wp.add(kk * NR)),
            widen8(kind, wp.add(kk * NR + 8)),
        ]
    };
    // SAFETY: xs holds R × k floats (the caller's contract).
    unsafe { chains::<R>(xs, k, load, tile) };
}

/// The `R × NR` tile of FMA chains `acc = fma(x[r][kk], w[kk], acc)`, `kk` ascending, with
/// step `kk`'s 16 weights from `load(kk)`.
///
/// # Safety
/// AVX2 and FMA must be available; `xs` holds `R × k` floats; `load` is valid for `kk < k`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn chains<const R: usize>(
    xs: &[f32],
    k: usize,
    load: impl Fn(usize) -> [__m256; 2],
    tile: &mut [f32; MR * NR],
) {
    let mut lo = [_mm256_setzero_ps(); R];
    let mut hi = [_mm256_setzero_ps(); R];
    let xp = xs.as_ptr();
    for kk in 0..k {
        let [w0, w1] = load(kk);
        for r in 0..R {
            // SAFETY: r < R and kk < k: xp.add(r * k + kk) is xs[r][kk].
            let xv = unsafe { _mm256_broadcast_ss(&*xp.add(r * k + kk)) };
            lo[r] = _mm256_fmadd_ps(xv, w0, lo[r]);
            hi[r] = _mm256_fmadd_ps(xv, w1, hi[r]);
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
        q.len() >= k * bpk && out.len() >= k * NR && sc.len() >= k / sub * kind.scale_sets() * NR
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
pub unsafe fn kernel(xs: &[f32], rows: usize, k: usize, panel: &[f32], tile: &mut [f32; MR * NR]) {
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
unsafe fn block<const R: usize>(xs: &[f32], k: usize, panel: &[f32], tile: &mut [f32; MR * NR]) {
    let wp = panel.as_ptr();
    // SAFETY: the panel holds k × NR floats, so step kk's 16 lie at kk * NR.
    let load = |kk: usize| unsafe {
        [
            _mm256_loadu_ps(wp.add(kk * NR)),
            _mm256_loadu_ps(wp.add(kk * NR + 8)),
        ]
    };
    // SAFETY: xs holds R × k floats (the caller's contract).
    unsafe { chains::<R>(xs, k, load, tile) };
}
