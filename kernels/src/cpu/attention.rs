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
        }
    }
}

/// A paged KV cache of one layer: `num_slots = num_blocks * block_size` rows of
/// `kv_heads * head_dim` keys (and values); position `p` of a sequence lives in slot
/// `block_table[p / block_size] * block_size + p % block_size`.
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

/// Writes rows of keys or values into their cache slots.
pub fn write_kv(cache: &mut [f32], rows: &[f32], slots: &[usize], width: usize) {
    assert_eq!(
        rows.len(),
        slots.len() * width,
        "write_kv: rows and slots differ in count"
    );
    for (row, &slot) in rows.chunks_exact(width).zip(slots) {
        cache[slot * width..(slot + 1) * width].copy_from_slice(row);
    }
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
            attend_group(&job, scratch, o);
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
    attend_group(job, scratch, out);
}

/// Scores in ascending position order, a max-subtracted softmax summed sequentially, values
/// accumulated in ascending order: the same arithmetic whatever else is in the step.
#[inline(always)]
fn attend_group(job: &GroupJob<'_>, scratch: &mut Scratch, out: &mut [f32]) {
    let AttentionShape {
        kv_heads,
        head_dim: hd,
        ..
    } = job.shape;
    let group = job.q.len() / hd;
    let (n, bs) = (job.len - job.first, job.kv.block_size);
    let kv_row = kv_heads * hd;
    let scale = job.shape.scale;
    let Scratch { scores, rows } = scratch;
    rows.clear();
    rows.extend(
        (job.first..job.len)
            .map(|p| (job.table[p / bs] as usize * bs + p % bs) * kv_row + job.g * hd),
    );
    scores.clear();
    scores.resize(group * n, 0.0);
    for (j, &base) in rows.iter().enumerate() {
        let kr = &job.kv.k[base..base + hd];
        for h in 0..group {
            scores[h * n + j] = dot(&job.q[h * hd..(h + 1) * hd], kr) * scale;
        }
    }
    for h in 0..group {
        let sc = &mut scores[h * n..(h + 1) * n];
        let max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for s in sc.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        for s in sc.iter_mut() {
            *s *= inv;
        }
    }
    out.fill(0.0);
    for (j, &base) in rows.iter().enumerate() {
        let vr = &job.kv.v[base..base + hd];
        for h in 0..group {
            let w = scores[h * n + j];
            for (a, &b) in out[h * hd..(h + 1) * hd].iter_mut().zip(vr) {
                *a += w * b;
            }
        }
    }
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

    const ONE: AttentionShape = AttentionShape {
        heads: 1,
        kv_heads: 1,
        head_dim: 1,
        scale: 1.0,
        window: None,
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
        write_kv(&mut cache, &[1.0, 2.0, 3.0, 4.0], &[2, 0], 2);
        assert_eq!(cache, [3.0, 4.0, 0.0, 0.0, 1.0, 2.0]);
    }
}
