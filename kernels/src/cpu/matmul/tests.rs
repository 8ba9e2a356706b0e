use super::*;

fn data(len: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

fn run(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; m * n];
    linear(x, m, &PackedMatrix::pack(w, n, k), &mut out);
    out
}

#[test]
fn matches_naive_f64_at_odd_shapes() {
    for &(m, k, n) in &[
        (1, 8, 1),
        (3, 13, 7),
        (5, 64, 33),
        (9, 576, 50),
        (17, 100, 130),
        (200, 40, 17),
    ] {
        let x = data(m * k, 1);
        let w = data(n * k, 2);
        let out = run(&x, m, k, &w, n);
        for i in 0..m {
            for j in 0..n {
                let r: f64 = (0..k)
                    .map(|p| x[i * k + p] as f64 * w[j * k + p] as f64)
                    .sum();
                let got = out[i * n + j] as f64;
                assert!(
                    (got - r).abs() < 1e-4 * (1.0 + r.abs()),
                    "({m},{k},{n})[{i},{j}]: {got} vs {r}"
                );
            }
        }
    }
}

#[test]
fn a_row_is_bit_identical_at_any_batch_size() {
    let (k, n) = (200, 70);
    let w = data(n * k, 3);
    let rows = data(130 * k, 4);
    let alone = run(&rows[5 * k..6 * k], 1, k, &w, n);
    for m in [6, 7, 8, 33, 64, 130] {
        let out = run(&rows[..m * k], m, k, &w, n);
        assert_eq!(&out[5 * n..6 * n], &alone[..], "batch of {m} changed row 5");
    }
}

/// Packs the `[n, k]` blocks `bytes` of `ty` quantised and (dequantised) as f32, checks that
/// both give the same `linear` results at every `m` of `ms` (m ≤ MR takes the fused kernel,
/// larger m the dequantised panels) and the same rows, and returns the two matrices.
fn packed_twins(
    ty: GgmlType,
    bytes: &[u8],
    (n, k): (usize, usize),
    x: &[f32],
    ms: &[usize],
) -> (PackedMatrix, PackedMatrix) {
    use crate::quant::dequantize;
    let mut deq = vec![0f32; n * k];
    dequantize(ty, bytes, &mut deq);
    let q = PackedMatrix::pack_quantized(ty, bytes, n, k).expect("packs");
    let f = PackedMatrix::pack(&deq, n, k);
    for &m in ms {
        let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
        linear(&x[..m * k], m, &q, &mut a);
        linear(&x[..m * k], m, &f, &mut b);
        assert_eq!(a, b, "{ty:?} m={m}: quantised storage changed a result");
    }
    let mut row = vec![0f32; k];
    for i in [0, n / 2, n - 1] {
        q.row_into(i, &mut row);
        assert_eq!(row, &deq[i * k..(i + 1) * k], "{ty:?} row {i}");
    }
    (q, f)
}

#[test]
fn quantized_panels_give_exactly_the_f32_results() {
    use crate::quant::quantize;
    let (k, n) = (96, 37);
    let src = data(n * k, 6);
    let x = data(40 * k, 7);
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
        let (q, f) = packed_twins(ty, &quantize(ty, &src), (n, k), &x, &[1, 4, 6, 7, 40]);
        assert!(
            q.bytes() * 3 < f.bytes(),
            "{ty:?}: {} vs {} bytes",
            q.bytes(),
            f.bytes()
        );
    }
    assert!(PackedMatrix::pack_quantized(GgmlType::F16, &[0; 4], 1, 2).is_none());
    assert!(PackedMatrix::pack_quantized(GgmlType::Q8_0, &[0; 34], 1, 16).is_none());
}

#[test]
fn every_quantised_type_packs_and_multiplies_exactly_as_dequantised() {
    use crate::quant::random_blocks;
    let (k, n) = (512, 21);
    let x = data(7 * k, 8);
    for ty in GgmlType::ALL
        .into_iter()
        .filter(|t| t.sub_blocks().is_some())
    {
        let bytes = random_blocks(ty, n * k / ty.block_len(), ty.id() as u64, 0.01);
        let (q, f) = packed_twins(ty, &bytes, (n, k), &x, &[1, 5, 7]);
        assert!(q.bytes() * 2 < f.bytes(), "{ty:?}: {} bytes", q.bytes());
        // The size a model's weights are checked against before loading is the real one.
        assert_eq!(
            q.bytes() as u64,
            PackedMatrix::packed_bytes(ty, n, k),
            "{ty:?}"
        );
        assert_eq!(
            f.bytes() as u64,
            PackedMatrix::packed_bytes(GgmlType::F32, n, k)
        );
    }
    // A row that is not a whole number of K-quant super-blocks stays unpacked.
    let bytes = random_blocks(GgmlType::Q4K, 2, 1, 0.01);
    assert!(PackedMatrix::pack_quantized(GgmlType::Q4K, &bytes, 4, 128).is_none());
}

#[test]
fn packed_rows_read_back() {
    let (n, k) = (21, 5);
    let w = data(n * k, 5);
    let p = PackedMatrix::pack(&w, n, k);
    let mut row = vec![0f32; k];
    for i in 0..n {
        p.row_into(i, &mut row);
        assert_eq!(row, &w[i * k..(i + 1) * k]);
    }
}

/// Weights that are exactly bf16 (or f16) values, as a 16-bit checkpoint gives them.
fn rounded(w: &[f32], kind: HalfKind) -> Vec<f32> {
    w.iter()
        .map(|&x| match kind {
            HalfKind::Bf16 => half::bf16::from_f32(x).to_f32(),
            HalfKind::F16 => half::f16::from_f32(x).to_f32(),
        })
        .collect()
}

#[test]
fn sixteen_bit_weights_are_stored_in_16_bits_and_give_the_f32_bits() {
    for kind in [HalfKind::Bf16, HalfKind::F16] {
        for &(k, n) in &[(64, 16), (200, 70), (576, 33)] {
            let w = rounded(&data(n * k, 5), kind);
            let half = PackedMatrix::pack(&w, n, k);
            let full = PackedMatrix::pack_f32(&w, n, k);
            assert!(
                matches!(half.storage, Storage::Half(kd, _) if kd == kind),
                "{kind:?}"
            );
            assert_eq!(half.bytes() * 2, full.bytes());
            // The decode kernel (≤ MR rows), the widened-panel path (more rows), the gather.
            for m in [1, 2, 5, 6, 7, 13, 100] {
                let x = data(m * k, 6 + m as u32);
                let (mut a, mut b) = (vec![0f32; m * n], vec![1f32; m * n]);
                linear(&x, m, &full, &mut a);
                linear(&x, m, &half, &mut b);
                assert_eq!(a, b, "{kind:?} ({m}, {k}, {n})");
            }
            let (mut a, mut b) = (vec![0f32; k], vec![1f32; k]);
            full.row_into(n - 1, &mut a);
            half.row_into(n - 1, &mut b);
            assert_eq!(a, b);
        }
    }
    // One value off the grid keeps the matrix in f32.
    let mut w = rounded(&data(64 * 16, 7), HalfKind::Bf16);
    w[100] = 0.1;
    assert!(matches!(
        PackedMatrix::pack(&w, 16, 64).storage,
        Storage::F32(_)
    ));
}
