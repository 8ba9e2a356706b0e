//! Causal attention of new query rows over a sequence's cached keys and values.
//!
//! Each (token, head) output is computed independently — scores in ascending key order, a
//! max-subtracted softmax summed sequentially, values accumulated in ascending order — so it is
//! the same whatever else is in the step.

use half::f16;
use rayon::prelude::*;

/// A value type of the KV cache: f32 (the `exact` precision) or f16 (the `fast` one, half the
/// memory and half the attention's memory traffic). Reads widen exactly to f32, so the
/// arithmetic after the load is the same for both.
pub trait KvValue: Copy + Default + Send + Sync + 'static {
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
    /// Eight consecutive values widened to f32.
    ///
    /// # Safety
    /// AVX2 and F16C must be available and `p` must point at eight readable values.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl KvValue for f32 {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller guarantees AVX2 and eight readable values at p.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
}

impl KvValue for f16 {
    /// Rounds to nearest, ties to even (IEEE 754), in software or with F16C alike.
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // The const conversion is plain integer code the compiler inlines and vectorises; it is
        // exact, as is F16C's.
        self.to_f32_const()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees AVX2 and F16C and eight readable values at p.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
}

/// Head geometry of an attention call, its score scale and its window.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Scores are `q·k * scale` (usually `1 / sqrt(head_dim)`; Gemma's `query_pre_attn_scalar`).
    pub scale: f32,
    /// A sliding window: a query at position `p` sees keys `p + 1 - window ..= p` only.
    pub window: Option<usize>,
    /// The softmax's `exp` is [`super::fastmath::exp`] (vectorised, about 2 ulp) instead of the
    /// C library's (the `fast` precision).
    pub fast_exp: bool,
}

impl AttentionShape {
    /// Full causal attention scaled by `1 / sqrt(head_dim)`.
    pub fn new(heads: usize, kv_heads: usize, head_dim: usize) -> Self {
        Self {
            heads,
            kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
            window: None,
            fast_exp: false,
        }
    }
}

/// A paged KV cache of one layer: keys (and values) as `[num_blocks, kv_heads, block_size,
/// head_dim]`; position `p` of a sequence lives in slot `p % block_size` of block
/// `block_table[p / block_size]` (see [`write_kv`]). Each KV head's positions of a block are
/// contiguous, so attention, which works per KV head, reads them in one run. The values are f32
/// or f16 ([`KvValue`]).
#[derive(Debug, Clone, Copy)]
pub struct PagedKv<'a, T = f32> {
    pub k: &'a [T],
    pub v: &'a [T],
    pub block_size: usize,
}

/// One sequence's rows in a paged attention call.
#[derive(Debug, Clone, Copy)]
pub struct SeqAttention<'a> {
    /// Number of consecutive query rows of this sequence.
    pub rows: usize,
    /// Position of the first of them; row `i` sees positions `0..=start + i`.
    pub start: usize,
    pub block_table: &'a [u32],
}

/// Writes rows of keys or values (`width = kv_heads × head_dim` values each) into their cache
/// slots (`slot = block × block_size + position in the block`), in [`PagedKv`]'s layout,
/// rounded to the cache's value type.
pub fn write_kv<T: KvValue>(
    cache: &mut [T],
    rows: &[f32],
    slots: &[usize],
    width: usize,
    head_dim: usize,
    block_size: usize,
) {
    assert_eq!(
        rows.len(),
        slots.len() * width,
        "write_kv: rows and slots differ in count"
    );
    assert!(
        width.is_multiple_of(head_dim),
        "write_kv: width is not whole heads"
    );
    let kv_heads = width / head_dim;
    for (row, &slot) in rows.chunks_exact(width).zip(slots) {
        for (g, head) in row.chunks_exact(head_dim).enumerate() {
            let at = kv_offset(
                slot / block_size,
                g,
                slot % block_size,
                kv_heads,
                head_dim,
                block_size,
            );
            for (c, &x) in cache[at..at + head_dim].iter_mut().zip(head) {
                *c = T::from_f32(x);
            }
        }
    }
}

/// Offset of (block, KV head, position in the block) in [`PagedKv`]'s layout.
#[inline]
fn kv_offset(block: usize, g: usize, pos: usize, kv_heads: usize, hd: usize, bs: usize) -> usize {
    ((block * kv_heads + g) * bs + pos) * hd
}

/// Causal attention of the query rows of several sequences over their paged caches, which
/// already hold the new rows' keys and values. `q` and `out` are `[rows, heads * head_dim]`, the
/// sequences' rows in order. Grouped-query attention maps head `h` to KV head
/// `h / (heads / kv_heads)`; the heads of a group are computed together so that each cached
/// key and value row is read once per group.
pub fn paged_attention<T: KvValue>(
    q: &[f32],
    kv: PagedKv<'_, T>,
    seqs: &[SeqAttention<'_>],
    shape: AttentionShape,
    out: &mut [f32],
) {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim,
        ..
    } = shape;
    let row = heads * head_dim;
    let total: usize = seqs.iter().map(|s| s.rows).sum();
    assert_eq!(
        q.len(),
        total * row,
        "attention: q is not [rows, heads * head_dim]"
    );
    assert_eq!(out.len(), q.len(), "attention: out and q differ in size");
    assert!(
        heads.is_multiple_of(kv_heads),
        "attention: heads must be a multiple of kv_heads"
    );
    // Row r of the call -> (sequence, position).
    let rows: Vec<(usize, usize)> = seqs
        .iter()
        .enumerate()
        .flat_map(|(i, s)| (0..s.rows).map(move |r| (i, s.start + r)))
        .collect();
    for s in seqs {
        assert!(
            s.block_table.len() * kv.block_size >= s.start + s.rows,
            "attention: block table too short"
        );
    }
    #[cfg(target_arch = "x86_64")]
    let simd = std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c");
    #[cfg(not(target_arch = "x86_64"))]
    let simd = false;
    attend_rows(q, kv, seqs, &rows, shape, out, simd);
}

/// The rows of [`paged_attention`], with AVX2 (`simd`, which the caller has checked) or
/// portable code: the two give the same bits.
fn attend_rows<T: KvValue>(
    q: &[f32],
    kv: PagedKv<'_, T>,
    seqs: &[SeqAttention<'_>],
    rows: &[(usize, usize)],
    shape: AttentionShape,
    out: &mut [f32],
    simd: bool,
) {
    let (kv_heads, width) = (
        shape.kv_heads,
        shape.heads / shape.kv_heads * shape.head_dim,
    );
    let row = kv_heads * width;
    #[cfg(not(target_arch = "x86_64"))]
    let _ = simd; // only x86-64 has a SIMD variant
    out.par_chunks_mut(width)
        .enumerate()
        .for_each_init(Scratch::default, |scratch, (idx, o)| {
            let (r, g) = (idx / kv_heads, idx % kv_heads);
            let (si, pos) = rows[r];
            let qg = &q[r * row + g * width..r * row + (g + 1) * width];
            let job = GroupJob {
                q: qg,
                kv,
                table: seqs[si].block_table,
                first: shape.window.map_or(0, |w| (pos + 1).saturating_sub(w)),
                len: pos + 1,
                g,
                shape,
            };
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: AVX2, FMA and F16C are present (checked by the caller).
                unsafe { attend_group_avx2(&job, scratch, o) };
                return;
            }
            attend_group::<false, T>(&job, scratch, o);
        });
}

/// One (query row, KV head) of an attention call.
struct GroupJob<'a, T> {
    /// The `group` query heads that share KV head `g`, concatenated.
    q: &'a [f32],
    kv: PagedKv<'a, T>,
    table: &'a [u32],
    /// Positions attended: `first..len`.
    first: usize,
    len: usize,
    g: usize,
    shape: AttentionShape,
}

/// Per-thread buffers of an attention call.
#[derive(Default)]
struct Scratch {
    /// `[group, len]` scores, then probabilities.
    scores: Vec<f32>,
    /// Offset of each position's K/V row (for the job's KV head) in the cache.
    rows: Vec<usize>,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_group_avx2<T: KvValue>(
    job: &GroupJob<'_, T>,
    scratch: &mut Scratch,
    out: &mut [f32],
) {
    attend_group::<true, T>(job, scratch, out);
}

/// `scores[h][j] = dot(q_h, k_{rows[j]}) · scale` for the `group` heads of `q`.
fn scores_portable<T: KvValue>(
    q: &[f32],
    group: usize,
    hd: usize,
    rows: &[usize],
    k: &[T],
    scale: f32,
    scores: &mut [f32],
) {
    let n = rows.len();
    for (j, &base) in rows.iter().enumerate() {
        for h in 0..group {
            scores[h * n + j] = dot(&q[h * hd..(h + 1) * hd], &k[base..base + hd]) * scale;
        }
    }
}

/// [`scores_portable`] with AVX2, bit-identical: each score is [`dot`]'s chain of additions,
/// but eight of them (4 heads × 2 positions) advance together so that their latencies overlap.
///
/// # Safety
/// AVX2 and F16C must be available; `hd` a multiple of 8; `q` holds `group × hd` values and
/// every `rows[j]` starts `hd` values of `k`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn scores_avx2<T: KvValue>(
    q: &[f32],
    group: usize,
    hd: usize,
    rows: &[usize],
    k: &[T],
    scale: f32,
    scores: &mut [f32],
) {
    use std::arch::x86_64::*;
    let n = rows.len();
    assert!(q.len() >= group * hd && scores.len() >= group * n);
    assert!(rows.iter().all(|&r| r + hd <= k.len()));
    for j0 in (0..n).step_by(2) {
        // A missing second position or head repeats the first (computed, not stored).
        let r = [rows[j0], rows[(j0 + 1).min(n - 1)]];
        for h0 in (0..group).step_by(4) {
            let hs = [0, 1, 2, 3].map(|i| (h0 + i).min(group - 1));
            let mut acc = [_mm256_setzero_ps(); 8];
            for c in (0..hd).step_by(8) {
                // SAFETY: c + 8 ≤ hd; rows and heads are in bounds (asserted above).
                unsafe {
                    let kv = r.map(|r| T::load8(k.as_ptr().add(r + c)));
                    for (i, &h) in hs.iter().enumerate() {
                        let qv = _mm256_loadu_ps(q.as_ptr().add(h * hd + c));
                        for (p, &kp) in kv.iter().enumerate() {
                            let a = &mut acc[i * 2 + p];
                            *a = _mm256_add_ps(*a, _mm256_mul_ps(qv, kp));
                        }
                    }
                }
            }
            for (i, &h) in hs.iter().enumerate().take(group - h0) {
                for (p, a) in acc[i * 2..i * 2 + 2].iter().enumerate().take(n - j0) {
                    let t = _mm_add_ps(_mm256_castps256_ps128(*a), _mm256_extractf128_ps(*a, 1));
                    let v = _mm_add_ps(t, _mm_shuffle_ps(t, t, 0b10_11_00_01));
                    let d = _mm_cvtss_f32(_mm_add_ss(v, _mm_movehl_ps(v, v)));
                    scores[h * n + j0 + p] = d * scale;
                }
            }
        }
    }
}

/// Scores in ascending position order, a max-subtracted softmax summed sequentially, values
/// accumulated in ascending order: the same arithmetic whatever else is in the step.
#[inline(always)]
fn attend_group<const AVX2: bool, T: KvValue>(
    job: &GroupJob<'_, T>,
    scratch: &mut Scratch,
    out: &mut [f32],
) {
    let AttentionShape {
        kv_heads,
        head_dim: hd,
        ..
    } = job.shape;
    let group = job.q.len() / hd;
    let (n, bs) = (job.len - job.first, job.kv.block_size);
    let scale = job.shape.scale;
    let Scratch { scores, rows } = scratch;
    rows.clear();
    rows.extend(
        (job.first..job.len)
            .map(|p| kv_offset(job.table[p / bs] as usize, job.g, p % bs, kv_heads, hd, bs)),
    );
    scores.clear();
    scores.resize(group * n, 0.0);
    #[cfg(target_arch = "x86_64")]
    if AVX2 && hd.is_multiple_of(8) {
        // SAFETY: AVX2 and F16C are present (only attend_group_avx2 passes AVX2 = true); every
        // row in `rows` has hd keys in the cache.
        unsafe { scores_avx2(job.q, group, hd, rows, job.kv.k, scale, scores) };
    } else {
        scores_portable(job.q, group, hd, rows, job.kv.k, scale, scores);
    }
    #[cfg(not(target_arch = "x86_64"))]
    scores_portable(job.q, group, hd, rows, job.kv.k, scale, scores);
    for h in 0..group {
        let sc = &mut scores[h * n..(h + 1) * n];
        let max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        if job.shape.fast_exp {
            for s in sc.iter_mut() {
                *s -= max;
            }
            super::fastmath::exp_in_place(sc);
            for s in sc.iter() {
                sum += *s;
            }
        } else {
            for s in sc.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
        }
        let inv = 1.0 / sum;
        for s in sc.iter_mut() {
            *s *= inv;
        }
    }
    // Each head's output in registers while the values stream past; every element is still
    // `a += w * v` in ascending position order.
    for (h, o) in out.chunks_exact_mut(hd).enumerate().take(group) {
        let w = &scores[h * n..(h + 1) * n];
        #[cfg(target_arch = "x86_64")]
        if AVX2 && hd.is_multiple_of(64) {
            // SAFETY: AVX2 and F16C are present (as above); every row in `rows` has hd values.
            unsafe { weighted_sum_avx2(w, rows, job.kv.v, o) };
            continue;
        }
        match hd {
            64 => weighted_sum::<64, T>(w, rows, job.kv.v, o),
            128 => weighted_sum::<128, T>(w, rows, job.kv.v, o),
            _ => {
                o.fill(0.0);
                for (&wj, &base) in w.iter().zip(rows.iter()) {
                    for (a, &b) in o.iter_mut().zip(&job.kv.v[base..base + hd]) {
                        *a += wj * b.to_f32();
                    }
                }
            }
        }
    }
}

/// `o = Σ_j w[j] · v[rows[j]..][..HD]`, summed in order of `j`, in a local array the compiler
/// keeps in registers.
#[inline(always)]
fn weighted_sum<const HD: usize, T: KvValue>(w: &[f32], rows: &[usize], v: &[T], o: &mut [f32]) {
    let mut acc = [0f32; HD];
    for (&wj, &base) in w.iter().zip(rows) {
        let vr: &[T; HD] = v[base..base + HD].try_into().expect("a row of HD values");
        for (a, &b) in acc.iter_mut().zip(vr) {
            *a += wj * b.to_f32();
        }
    }
    o.copy_from_slice(&acc);
}

/// [`weighted_sum`] with AVX2 for a multiple of 64 values, bit-identical (a multiply then an
/// add, no fused multiply-add; f16 values widened by F16C): 64 outputs at a time stay in eight
/// registers while the rows stream past.
///
/// # Safety
/// AVX2 and F16C must be available; `o.len()` (= hd) a multiple of 64; every `rows[j]` starts
/// `hd` values of `v`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn weighted_sum_avx2<T: KvValue>(w: &[f32], rows: &[usize], v: &[T], o: &mut [f32]) {
    use std::arch::x86_64::*;
    let hd = o.len();
    assert!(hd.is_multiple_of(64));
    assert!(rows.iter().all(|&r| r + hd <= v.len()));
    for (chunk, out) in o.chunks_exact_mut(64).enumerate() {
        let mut acc = [_mm256_setzero_ps(); 8];
        for (&wj, &base) in w.iter().zip(rows) {
            let wv = _mm256_set1_ps(wj);
            // SAFETY: base + 64·chunk + 64 ≤ base + hd ≤ v.len() (asserted above).
            let p = unsafe { v.as_ptr().add(base + chunk * 64) };
            for (c, a) in acc.iter_mut().enumerate() {
                // SAFETY: as above, c < 8.
                let x = unsafe { T::load8(p.add(c * 8)) };
                *a = _mm256_add_ps(*a, _mm256_mul_ps(wv, x));
            }
        }
        for (c, a) in acc.iter().enumerate() {
            // SAFETY: 8c + 8 ≤ 64 = out.len().
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(c * 8), *a) };
        }
    }
}

#[inline(always)]
fn dot<T: KvValue>(a: &[f32], b: &[T]) -> f32 {
    let mut acc = [0f32; 8];
    let full = a.len() / 8 * 8;
    for (x, y) in a[..full].chunks_exact(8).zip(b[..full].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] * y[l].to_f32();
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in a[full..].iter().zip(&b[full..]) {
        s += x * y.to_f32();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_scores_add_in_the_same_order_as_the_portable_ones() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let mut s = 12345u32;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 20001) as f32 / 997.0 - 10.0
        };
        // Scores of 1–5 heads over 1–7 positions: the batched chains give the same bits.
        for (group, n) in [(1, 1), (3, 7), (4, 2), (5, 5), (2, 3)] {
            let hd = 64;
            let q: Vec<f32> = (0..group * hd).map(|_| next()).collect();
            let k: Vec<f32> = (0..(n + 3) * hd).map(|_| next()).collect();
            let rows: Vec<usize> = (0..n).map(|j| ((j * 5) % (n + 3)) * hd).collect();
            let (mut a, mut b) = (vec![0f32; group * n], vec![1f32; group * n]);
            scores_portable(&q, group, hd, &rows, &k, 0.125, &mut a);
            // SAFETY: AVX2 is present (checked above); sizes as documented.
            unsafe { scores_avx2(&q, group, hd, &rows, &k, 0.125, &mut b) };
            assert_eq!(a, b, "{group} heads, {n} positions");
        }
    }

    /// Random caches of `blocks` blocks, query rows of three sequences (one decoding, two
    /// prefilling across blocks), written through [`write_kv`] into an f32 and an f16 cache.
    /// (queries, keys, values, block tables, (rows, start) per sequence).
    type Call = (
        Vec<f32>,
        Vec<f32>,
        Vec<f32>,
        Vec<Vec<u32>>,
        Vec<(usize, usize)>,
    );

    fn random_call(heads: usize, kv_heads: usize, hd: usize, seed: u32) -> Call {
        let mut s = seed;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 20001) as f32 / 2001.0 - 5.0
        };
        let (bs, blocks) = (4, 12);
        let width = kv_heads * hd;
        let k: Vec<f32> = (0..blocks * bs * width).map(|_| next()).collect();
        let v: Vec<f32> = (0..blocks * bs * width).map(|_| next()).collect();
        let tables = vec![vec![3, 0, 7], vec![5, 1, 2, 11], vec![9, 4]];
        // (rows, start) per sequence.
        let spans = vec![(1, 9), (6, 8), (3, 2)];
        let n: usize = spans.iter().map(|s| s.0).sum();
        let q: Vec<f32> = (0..n * heads * hd).map(|_| next()).collect();
        (q, k, v, tables, spans)
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_attention_gives_the_portable_bits_for_f32_and_f16_caches() {
        use std::arch::is_x86_feature_detected as has;
        if !(has!("avx2") && has!("fma") && has!("f16c")) {
            return;
        }
        fn both<T: KvValue>(
            q: &[f32],
            k: &[T],
            v: &[T],
            seqs: &[SeqAttention<'_>],
            shape: AttentionShape,
        ) -> (Vec<f32>, Vec<f32>) {
            let rows: Vec<(usize, usize)> = seqs
                .iter()
                .enumerate()
                .flat_map(|(i, s)| (0..s.rows).map(move |r| (i, s.start + r)))
                .collect();
            let kv = PagedKv {
                k,
                v,
                block_size: 4,
            };
            let (mut a, mut b) = (vec![0f32; q.len()], vec![1f32; q.len()]);
            attend_rows(q, kv, seqs, &rows, shape, &mut a, false);
            attend_rows(q, kv, seqs, &rows, shape, &mut b, true);
            (a, b)
        }
        for (heads, kv_heads, hd, fast_exp) in [
            (9, 3, 64, false),
            (9, 3, 64, true),
            (4, 4, 128, false),
            (2, 1, 40, true),
        ] {
            let (q, k, v, tables, spans) = random_call(heads, kv_heads, hd, 7 + hd as u32);
            let seqs: Vec<SeqAttention<'_>> = tables
                .iter()
                .zip(&spans)
                .map(|(t, &(rows, start))| SeqAttention {
                    rows,
                    start,
                    block_table: t,
                })
                .collect();
            let shape = AttentionShape {
                fast_exp,
                ..AttentionShape::new(heads, kv_heads, hd)
            };
            let (a, b) = both(&q, &k, &v, &seqs, shape);
            assert_eq!(a, b, "f32 cache, {heads}/{kv_heads} heads of {hd}");
            let k16: Vec<f16> = k.iter().map(|&x| f16::from_f32(x)).collect();
            let v16: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
            let (c, d) = both(&q, &k16, &v16, &seqs, shape);
            assert_eq!(c, d, "f16 cache, {heads}/{kv_heads} heads of {hd}");
            // f16 keys and values move the outputs by about their rounding (2^-11 relative).
            for (x, y) in a.iter().zip(&c) {
                assert!(
                    (x - y).abs() <= 0.02 + 0.01 * x.abs(),
                    "f16 {y} far from f32 {x}"
                );
            }
        }
    }

    #[test]
    fn an_f16_cache_stores_rounded_values_and_reads_them_back_exactly() {
        // 1 + 2^-11 is a tie between 1 and 1 + 2^-10: it rounds to even (1). 65504 is f16's
        // largest finite value; 1e-7 is subnormal in f16.
        let rows = [
            1.0 + 2f32.powi(-11),
            1.0 + 3.0 * 2f32.powi(-11),
            65504.0,
            1e-7,
        ];
        let mut cache = [f16::ZERO; 4];
        write_kv(&mut cache, &rows, &[0], 4, 4, 1);
        let back: Vec<f32> = cache.iter().map(|&h| KvValue::to_f32(h)).collect();
        assert_eq!(back[0], 1.0);
        assert_eq!(back[1], 1.0 + 2.0 * 2f32.powi(-10));
        assert_eq!(back[2], 65504.0);
        assert_eq!(back[3], f16::from_f32(1e-7).to_f32());
        assert!(back[3] > 0.0 && (back[3] - 1e-7).abs() < 3e-8);
    }

    const ONE: AttentionShape = AttentionShape {
        heads: 1,
        kv_heads: 1,
        head_dim: 1,
        scale: 1.0,
        window: None,
        fast_exp: false,
    };

    #[test]
    fn single_key_returns_its_value_and_gqa_shares_kv() {
        let shape = AttentionShape::new(2, 1, 2);
        let q = [1.0, 0.0, 0.0, 1.0];
        let (k, v) = ([0.3, 0.7], [5.0, -1.0]);
        let mut out = [0f32; 4];
        let seqs = [SeqAttention {
            rows: 1,
            start: 0,
            block_table: &[0],
        }];
        paged_attention(
            &q,
            PagedKv {
                k: &k,
                v: &v,
                block_size: 1,
            },
            &seqs,
            shape,
            &mut out,
        );
        assert_eq!(out, [5.0, -1.0, 5.0, -1.0]);
    }

    #[test]
    fn causal_rows_follow_their_block_tables() {
        // Two blocks of 2 slots: the sequence's positions 0,1 live in block 1, 2 in block 0.
        let k = [0.0; 4];
        let v = [10.0, 0.0, 2.0, 4.0]; // slots 0..4
        let seqs = [SeqAttention {
            rows: 3,
            start: 0,
            block_table: &[1, 0],
        }];
        let mut out = [0f32; 3];
        paged_attention(
            &[0.0; 3],
            PagedKv {
                k: &k,
                v: &v,
                block_size: 2,
            },
            &seqs,
            ONE,
            &mut out,
        );
        assert_eq!(out, [2.0, 3.0, (2.0 + 4.0 + 10.0) / 3.0]);
    }

    #[test]
    fn a_sliding_window_sees_only_the_last_positions() {
        // Values 1, 2, 3, 4 at positions 0..4; equal scores: the mean of what is seen.
        let (k, v) = ([0.0; 4], [1.0, 2.0, 3.0, 4.0]);
        let seqs = [SeqAttention {
            rows: 4,
            start: 0,
            block_table: &[0, 1],
        }];
        let mut out = [0f32; 4];
        let shape = AttentionShape {
            window: Some(2),
            ..ONE
        };
        paged_attention(
            &[0.0; 4],
            PagedKv {
                k: &k,
                v: &v,
                block_size: 2,
            },
            &seqs,
            shape,
            &mut out,
        );
        assert_eq!(out, [1.0, 1.5, 2.5, 3.5]);
    }

    #[test]
    fn write_kv_puts_rows_in_slots() {
        let mut cache = [0f32; 6];
        write_kv(&mut cache, &[1.0, 2.0, 3.0, 4.0], &[2, 0], 2, 2, 1);
        assert_eq!(cache, [3.0, 4.0, 0.0, 0.0, 1.0, 2.0]);
        // Two KV heads of 1 value, blocks of 2: [block][head][position].
        let mut cache = [0f32; 8];
        write_kv(&mut cache, &[1.0, 2.0, 3.0, 4.0], &[1, 2], 2, 1, 2);
        assert_eq!(cache, [0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 4.0, 0.0]);
    }
}
