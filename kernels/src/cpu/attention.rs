//! Causal attention of new query rows over a sequence's cached keys and values.
//!
//! Each (token, head) output is computed independently — scores in ascending key order, a
//! max-subtracted softmax summed sequentially, values accumulated in ascending order — so it is
//! the same whatever else is in the step.

use rayon::prelude::*;

/// Head geometry of an attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
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
/// `h / (heads / kv_heads)`.
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
    } = shape;
    let row = heads * head_dim;
    let kv_row = kv_heads * head_dim;
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
    let bs = kv.block_size;
    // Row r of the call -> (sequence, position).
    let rows: Vec<(usize, usize)> = seqs
        .iter()
        .enumerate()
        .flat_map(|(i, s)| (0..s.rows).map(move |r| (i, s.start + r)))
        .collect();
    for s in seqs {
        assert!(
            s.block_table.len() * bs >= s.start + s.rows,
            "attention: block table too short"
        );
    }
    let group = heads / kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    out.par_chunks_mut(head_dim)
        .enumerate()
        .for_each_init(Vec::new, |scores, (idx, o)| {
            let (r, h) = (idx / heads, idx % heads);
            let (si, pos) = rows[r];
            let table = seqs[si].block_table;
            let g = h / group;
            let qh = &q[r * row + h * head_dim..r * row + (h + 1) * head_dim];
            let slot = |j: usize| table[j / bs] as usize * bs + j % bs;
            scores.clear();
            let mut max = f32::NEG_INFINITY;
            for j in 0..=pos {
                let base = slot(j) * kv_row + g * head_dim;
                let s = dot(qh, &kv.k[base..base + head_dim]) * scale;
                max = max.max(s);
                scores.push(s);
            }
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let inv = 1.0 / sum;
            o.fill(0.0);
            for (j, &p) in scores.iter().enumerate() {
                let base = slot(j) * kv_row + g * head_dim;
                let w = p * inv;
                for (a, &b) in o.iter_mut().zip(&kv.v[base..base + head_dim]) {
                    *a += w * b;
                }
            }
        });
}

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
    };

    #[test]
    fn single_key_returns_its_value_and_gqa_shares_kv() {
        let shape = AttentionShape {
            heads: 2,
            kv_heads: 1,
            head_dim: 2,
        };
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
    fn write_kv_puts_rows_in_slots() {
        let mut cache = [0f32; 6];
        write_kv(&mut cache, &[1.0, 2.0, 3.0, 4.0], &[2, 0], 2);
        assert_eq!(cache, [3.0, 4.0, 0.0, 0.0, 1.0, 2.0]);
    }
}
