use crate::cpu::{linear, PackedMatrix};
use crate::quant::{dequantize, random_blocks, GgmlType};

#[test]
fn two_passes_bring_the_product_much_closer_to_the_exact_one() {
    let (k, n, m) = (512, 48, 5);
    let x: Vec<f32> = (0..m * k)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    for ty in [
        GgmlType::Q4_1,
        GgmlType::Q4_0,
        GgmlType::Q8_0,
        GgmlType::Q6K,
    ] {
        let bytes = random_blocks(ty, n * k / ty.block_len(), 3, 0.01);
        let mut deq = vec![0f32; n * k];
        dequantize(ty, &bytes, &mut deq);
        let one = PackedMatrix::pack_int8(ty, &bytes, n, k).expect("packs");
        let two = one.clone().two_pass_activations();
        let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
        linear(&x, m, &one, &mut a);
        linear(&x, m, &two, &mut b);
        let err = |o: &[f32]| -> f64 {
            (0..m * n)
                .map(|e| {
                    let (i, j) = (e / n, e % n);
                    let exact: f64 = (0..k)
                        .map(|p| x[i * k + p] as f64 * deq[j * k + p] as f64)
                        .sum();
                    (o[e] as f64 - exact).powi(2)
                })
                .sum::<f64>()
                .sqrt()
        };
        let (e1, e2) = (err(&a), err(&b));
        assert!(e2 * 20.0 < e1, "{ty:?}: one pass {e1:e}, two passes {e2:e}");
    }
}
