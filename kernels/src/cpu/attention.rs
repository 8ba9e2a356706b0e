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

/// Attention for `t` query rows of one sequence whose first new token sits at `start`.
///
/// `q` is `[t, heads * head_dim]`; `k` and `v` are `[start + t, kv_heads * head_dim]` (the
/// cache including the new tokens); `out` is `[t, heads * head_dim]`. Query row `i` sees keys
/// `0..=start + i`. Grouped-query attention maps head `h` to KV head `h / (heads / kv_heads)`.
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    start: usize,
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
    let t = q.len() / row;
    assert_eq!(
        q.len(),
        t * row,
        "attention: q is not rows of heads * head_dim"
    );
    assert_eq!(out.len(), q.len(), "attention: out and q differ in size");
    assert!(
        k.len() >= (start + t) * kv_row && v.len() >= (start + t) * kv_row,
        "attention: cache too short"
    );
    assert_eq!(
        heads % kv_heads,
        0,
        "attention: heads must be a multiple of kv_heads"
    );
    let group = heads / kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    out.par_chunks_mut(head_dim)
        .enumerate()
        .for_each_init(Vec::new, |scores, (idx, o)| {
            let (i, h) = (idx / heads, idx % heads);
            let g = h / group;
            let qh = &q[i * row + h * head_dim..i * row + (h + 1) * head_dim];
            let len = start + i + 1;
            scores.clear();
            let mut max = f32::NEG_INFINITY;
            for j in 0..len {
                let kh = &k[j * kv_row + g * head_dim..j * kv_row + (g + 1) * head_dim];
                let s = dot(qh, kh) * scale;
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
                let vh = &v[j * kv_row + g * head_dim..j * kv_row + (g + 1) * head_dim];
                let w = p * inv;
                for (a, &b) in o.iter_mut().zip(vh) {
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

    #[test]
    fn single_key_returns_its_value_and_gqa_shares_kv() {
        let shape = AttentionShape {
            heads: 2,
            kv_heads: 1,
            head_dim: 2,
        };
        let q = [1.0, 0.0, 0.0, 1.0];
        let k = [0.3, 0.7];
        let v = [5.0, -1.0];
        let mut out = [0f32; 4];
        attention(&q, &k, &v, 0, shape, &mut out);
        assert_eq!(out, [5.0, -1.0, 5.0, -1.0]);
    }

    #[test]
    fn causal_rows_see_only_their_past() {
        let shape = AttentionShape {
            heads: 1,
            kv_heads: 1,
            head_dim: 1,
        };
        let q = [0.0, 0.0];
        let k = [0.0, 0.0];
        let v = [2.0, 4.0];
        let mut out = [0f32; 2];
        attention(&q, &k, &v, 0, shape, &mut out);
        assert_eq!(out, [2.0, 3.0]); // row 0 sees v0; row 1 averages v0 and v1
    }
}
