//! Element-wise and row-wise ops, computed in f32 exactly as the HF reference does.

/// RMSNorm of each `dim`-wide row of `x` into `out`: `x / sqrt(mean(x²) + eps) * weight`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let dim = weight.len();
    assert_eq!(x.len(), out.len(), "rms_norm: in/out lengths differ");
    assert_eq!(x.len() % dim, 0, "rms_norm: input is not rows of {dim}");
    for (row, o) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let ss = sum_of_squares(row);
        let inv = 1.0 / (ss / dim as f32 + eps).sqrt();
        for ((o, &v), &g) in o.iter_mut().zip(row).zip(weight) {
            *o = g * (v * inv);
        }
    }
}

/// Sum of squares with eight partial sums in a fixed order (vectorises, stays deterministic).
fn sum_of_squares(row: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let full = row.len() / 8 * 8;
    for c in row[..full].chunks_exact(8) {
        for l in 0..8 {
            acc[l] += c[l] * c[l];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for v in &row[full..] {
        s += v * v;
    }
    s
}

/// Rotary embedding in the half-split ("NeoX", HF Llama) layout, in place.
///
/// `x` holds `positions.len()` rows of `heads * head_dim`; element `i` of a head pairs with
/// element `i + head_dim / 2`, rotated by `positions[row] * inv_freq[i]`.
pub fn rope_neox(
    x: &mut [f32],
    positions: &[usize],
    heads: usize,
    head_dim: usize,
    inv_freq: &[f32],
) {
    let half = head_dim / 2;
    assert_eq!(
        inv_freq.len(),
        half,
        "rope: inv_freq must have head_dim / 2 entries"
    );
    assert_eq!(
        x.len(),
        positions.len() * heads * head_dim,
        "rope: x is not [tokens, heads * head_dim]"
    );
    let mut cos = vec![0f32; half];
    let mut sin = vec![0f32; half];
    for (row, &pos) in x.chunks_exact_mut(heads * head_dim).zip(positions) {
        for i in 0..half {
            let angle = pos as f32 * inv_freq[i];
            cos[i] = angle.cos();
            sin[i] = angle.sin();
        }
        for head in row.chunks_exact_mut(head_dim) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x0, x1) = (a[i], b[i]);
                a[i] = x0 * cos[i] - x1 * sin[i];
                b[i] = x1 * cos[i] + x0 * sin[i];
            }
        }
    }
}

/// `gate[i] = silu(gate[i]) * up[i]`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "silu_mul: lengths differ");
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// `gate = gelu_tanh(gate) * up`, GELU with the tanh approximation as PyTorch computes
/// `gelu(x, approximate="tanh")`: `0.5 x (1 + tanh(sqrt(2/π) (x + 0.044715 x³)))` (Gemma).
pub fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "gelu_tanh_mul: lengths differ");
    const BETA: f32 = 0.797_884_6; // sqrt(2 / pi)
    const KAPPA: f32 = 0.044_715;
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        let inner = BETA * (x + KAPPA * x * x * x);
        *g = 0.5 * x * (1.0 + inner.tanh()) * u;
    }
}

/// `x[i] *= s`.
pub fn scale(x: &mut [f32], s: f32) {
    for v in x {
        *v *= s;
    }
}

/// `x[i] += y[i]`.
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    assert_eq!(x.len(), y.len(), "add_assign: lengths differ");
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Numerically stable softmax in place.
pub fn softmax_in_place(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Index of the largest value; the lowest index wins ties. NaN is never chosen over a number.
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] || x[best].is_nan() {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_matches_definition() {
        let x = [1.0, -2.0, 3.0, 4.0, 0.5, 0.5, 0.5, 0.5, 0.5];
        let w = [1.0, 2.0, 0.5];
        let mut out = [0f32; 9];
        rms_norm(&x, &w, 1e-5, &mut out);
        let inv = 1.0 / ((1.0f32 + 4.0 + 9.0) / 3.0 + 1e-5).sqrt();
        assert!((out[1] - (-2.0 * inv * 2.0)).abs() < 1e-6);
        assert!((out[3] - 4.0 / ((16.0f32 + 0.25 + 0.25) / 3.0 + 1e-5).sqrt()).abs() < 1e-5);
    }

    #[test]
    fn rope_rotates_pairs_half_apart() {
        let mut x = vec![1.0, 0.0, 0.0, 1.0]; // one head, head_dim 4: pairs (0,2) and (1,3)
        rope_neox(&mut x, &[1], 1, 4, &[std::f32::consts::FRAC_PI_2, 0.0]);
        assert!(
            (x[0] - 0.0).abs() < 1e-6 && (x[2] - 1.0).abs() < 1e-6,
            "{x:?}"
        );
        assert_eq!((x[1], x[3]), (0.0, 1.0));
    }

    #[test]
    fn softmax_and_argmax() {
        let mut x = [1.0, 3.0, 3.0, -1.0];
        assert_eq!(argmax(&x), 1);
        softmax_in_place(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(x[1], x[2]);
    }
}
