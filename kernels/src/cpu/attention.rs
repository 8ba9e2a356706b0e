//! Causal attention of new query rows over a sequence's cached keys and values.
//!
//! Each (token, head) output is computed independently — scores in ascending key order, a
//! max-subtracted softmax summed sequentially, values accumulated in ascending order — so it is
//! the same whatever else is in the step.

use rayon::prelude::*;

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
/// contiguous, so attention, which works per KV head, reads them in one run.
#[derive(Debug, Clone, Copy)]
pub struct PagedKv<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
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
/// slots (`slot = block × block_size + position in the block`), in [`PagedKv`]'s layout.
pub fn write_kv(
    cache: &mut [f32],
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
            cache[at..at + head_dim].copy_from_slice(head);
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
pub fn paged_attention(
    q: &[f32],
    kv: PagedKv<'_>,
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
    let group = heads / kv_heads;
    #[cfg(target_arch = "x86_64")]
    let fast =
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
    out.par_chunks_mut(group * head_dim)
        .enumerate()
        .for_each_init(Scratch::default, |scratch, (idx, o)| {
            let (r, g) = (idx / kv_heads, idx % kv_heads);
            let (si, pos) = rows[r];
            let qg = &q[r * row + g * group * head_dim..r * row + (g + 1) * group * head_dim];
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
            if fast {
                // SAFETY: AVX2 and FMA are present (checked above).
                unsafe { attend_group_avx2(&job, scratch, o) };
                return;
            }
            attend_group::<false>(&job, scratch, o);
        });
}

/// One (query row, KV head) of an attention call.
struct GroupJob<'a> {
    /// The `group` query heads that share KV head `g`, concatenated.
    q: &'a [f32],
    kv: PagedKv<'a>,
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
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_group_avx2(job: &GroupJob<'_>, scratch: &mut Scratch, out: &mut [f32]) {
    attend_group::<true>(job, scratch, out);
}

/// `scores[h][j] = dot(q_h, k_{rows[j]}) · scale` for the `group` heads of `q`.
fn scores_portable(
    q: &[f32],
    group: usize,
    hd: usize,
    rows: &[usize],
    k: &[f32],
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
/// AVX2 must be available; `hd` a multiple of 8; `q` holds `group × hd` values and every
/// `rows[j]` starts `hd` values of `k`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn scores_avx2(
    q: &[f32],
    group: usize,
    hd: usize,
    rows: &[usize],
    k: &[f32],
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
                    let kv = r.map(|r| _mm256_loadu_ps(k.as_ptr().add(r + c)));
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
fn attend_group<const AVX2: bool>(job: &GroupJob<'_>, scratch: &mut Scratch, out: &mut [f32]) {
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
        // SAFETY: AVX2 is present (only attend_group_avx2 passes AVX2 = true); every row in
        // `rows` has hd keys in the cache.
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
        match hd {
            64 => weighted_sum::<64>(w, rows, job.kv.v, o),
            128 => weighted_sum::<128>(w, rows, job.kv.v, o),
            _ => {
                o.fill(0.0);
                for (&wj, &base) in w.iter().zip(rows.iter()) {
                    for (a, &b) in o.iter_mut().zip(&job.kv.v[base..base + hd]) {
                        *a += wj * b;
                    }
                }
            }
        }
    }
}

/// `o = Σ_j w[j] · v[rows[j]..][..HD]`, summed in order of `j`, in a local array the compiler
/// keeps in registers.
#[inline(always)]
fn weighted_sum<const HD: usize>(w: &[f32], rows: &[usize], v: &[f32], o: &mut [f32]) {
    let mut acc = [0f32; HD];
    for (&wj, &base) in w.iter().zip(rows) {
        let vr: &[f32; HD] = v[base..base + HD].try_into().expect("a row of HD values");
        for (a, &b) in acc.iter_mut().zip(vr) {
            *a += wj * b;
        }
    }
    o.copy_from_slice(&acc);
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let full = a.len() / 8 * 8;
    for (x, y) in a[..full].chunks_exact(8).zip(b[..full].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in a[full..].iter().zip(&b[full..]) {
        s += x * y;
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
