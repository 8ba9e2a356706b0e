use super::*;
use crate::cpu::matmul::Storage;
use crate::cpu::{linear, PackedMatrix};
use crate::quant::{dequantize, random_blocks, GgmlType};

fn data(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            // Mostly small values with an occasional large one, as activations have.
            let v = (s % 2001) as f32 / 1000.0 - 1.0;
            if s.is_multiple_of(97) {
                v * 20.0
            } else {
                v
            }
        })
        .collect()
}

fn quantised_types() -> impl Iterator<Item = GgmlType> {
    GgmlType::ALL
        .into_iter()
        .filter(|t| t.sub_blocks().is_some())
}

#[test]
fn every_variant_that_runs_here_matches_the_portable_kernel_bit_for_bit() {
    let (k, n) = (512, 16 * 3);
    let x = data(11 * k, 1);
    let available = Isa::available();
    eprintln!(
        "int8 kernels tested here: {:?}",
        available.iter().map(|i| i.name()).collect::<Vec<_>>()
    );
    for ty in quantised_types() {
        let bytes = random_blocks(ty, n * k / ty.block_len(), ty.id() as u64 + 7, 0.01);
        let w = PackedMatrix::pack_int8(ty, &bytes, n, k).expect("packs");
        let Storage::Int8(qp) = &w.storage else {
            panic!("{ty:?} is not in the int8 layout")
        };
        for fine in [false, true] {
            let a = Int8Rows::quantize(&x, 11, k, qp.sub, fine);
            for p in 0..n / NR {
                let panel = super::super::matmul::qpanel(qp, k, p);
                for (row0, rows) in [
                    (0, 8),
                    (8, 3),
                    (2, 5),
                    (10, 1),
                    (1, 7),
                    (3, 2),
                    (4, 4),
                    (0, 6),
                ] {
                    let mut want = [0f32; MR * NR];
                    tile(Isa::Portable, &a, row0, rows, panel, &mut want);
                    for &isa in &available {
                        let mut got = [f32::NAN; MR * NR];
                        tile(isa, &a, row0, rows, panel, &mut got);
                        assert_eq!(
                            got[..rows * NR],
                            want[..rows * NR],
                            "{ty:?} {} panel {p} rows {row0}+{rows} fine {fine}",
                            isa.name()
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn the_vector_quantiser_matches_the_scalar_one() {
    let mut x = data(64 * 32, 3);
    x[5 * 32..6 * 32].fill(0.0); // an all-zero block
                                 // A block whose step is exactly 1, so that 2.5, -3.5 and 0.5 are ties: to even in both.
    x[7 * 32..8 * 32].fill(0.0);
    x[7 * 32..7 * 32 + 4].copy_from_slice(&[127.0, 2.5, -3.5, 0.5]);
    let (mut q, mut d) = ([0i8; QK], 0f32);
    quantize_block(&x[7 * 32..8 * 32], &mut q, &mut [], &mut d);
    assert_eq!((&q[..4], d), (&[127, 2, -4, 0][..], 1.0));
    for (b, xb) in x.chunks_exact(QK).enumerate() {
        let (mut q1, mut f1, mut d1) = ([0i8; QK], [0i8; QK], 0f32);
        quantize_block(xb, &mut q1, &mut f1, &mut d1);
        #[cfg(target_arch = "x86_64")]
        if Isa::Avx2.runs_here() {
            let (mut q2, mut f2, mut d2) = ([0i8; QK], [0i8; QK], 0f32);
            // SAFETY: AVX2 runs here; the blocks hold 32 values.
            unsafe { avx2::quantize_block(xb, &mut q2, &mut f2, &mut d2) };
            assert_eq!((q1, f1, d1.to_bits()), (q2, f2, d2.to_bits()), "block {b}");
        }
        // The fine pass leaves half of its own step (a whole one where ±127 clamps it).
        for ((&q, &f), &v) in q1.iter().zip(&f1).zip(xb) {
            let back = d1 * q as f32 + d1 / 256.0 * f as f32;
            let bound = if f.unsigned_abs() == 127 {
                256.0
            } else {
                512.0
            };
            assert!(
                (back - v).abs() <= d1 / bound * 1.01 + 1e-7,
                "block {b}: {v} → {back} ({q}, {f}, step {d1})"
            );
        }
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        for (&q, &v) in q1.iter().zip(xb) {
            assert!(
                (q as f32 * d1 - v).abs() <= d1 * 0.5 + 1e-6,
                "block {b}: {v} → {q}"
            );
        }
        assert_eq!(
            q1.iter().map(|q| q.unsigned_abs()).max(),
            Some(if amax > 0.0 { 127 } else { 0 })
        );
    }
}

#[test]
fn int8_linear_is_close_to_the_exact_product_and_batch_invariant() {
    let (k, n) = (256, 70);
    let x = data(40 * k, 4);
    for ty in quantised_types() {
        let bytes = random_blocks(ty, n * k / ty.block_len(), ty.id() as u64, 0.01);
        let mut deq = vec![0f32; n * k];
        dequantize(ty, &bytes, &mut deq);
        let w = PackedMatrix::pack_int8(ty, &bytes, n, k).expect("packs");
        assert!(w.is_int8());
        assert_eq!(
            w.bytes(),
            PackedMatrix::pack_quantized(ty, &bytes, n, k)
                .expect("packs")
                .bytes()
        );
        let mut row = vec![0f32; k];
        for i in [0, 33, n - 1] {
            w.row_into(i, &mut row);
            assert_eq!(row, &deq[i * k..(i + 1) * k], "{ty:?} row {i} reads back");
        }
        let mut all = vec![0f32; 40 * n];
        linear(&x, 40, &w, &mut all);
        for i in 0..40 {
            for j in 0..n {
                let exact: f64 = (0..k)
                    .map(|p| x[i * k + p] as f64 * deq[j * k + p] as f64)
                    .sum();
                // Error of 8-bit activations: half a step per value, at most.
                let bound: f64 = (0..k / QK)
                    .map(|b| {
                        let xb = &x[i * k + b * QK..i * k + (b + 1) * QK];
                        let step = xb.iter().fold(0f32, |a, v| a.max(v.abs())) as f64 / 127.0;
                        let wsum: f64 = deq[j * k + b * QK..j * k + (b + 1) * QK]
                            .iter()
                            .map(|v| v.abs() as f64)
                            .sum();
                        0.5 * step * wsum
                    })
                    .sum();
                let got = all[i * n + j] as f64;
                assert!(
                    (got - exact).abs() <= bound * 1.01 + 1e-4,
                    "{ty:?} [{i},{j}]: {got} vs {exact} (bound {bound})"
                );
            }
        }
        // Alone or in any batch, a row's outputs are the same bits.
        for (m, r) in [(1, 0), (3, 2), (5, 4), (9, 8), (40, 39)] {
            let mut out = vec![0f32; m * n];
            linear(
                &x[(r + 1 - m.min(r + 1)) * k..(r + 1) * k],
                m.min(r + 1),
                &w,
                &mut out,
            );
            let at = m.min(r + 1) - 1;
            assert_eq!(
                out[at * n..(at + 1) * n],
                all[r * n..(r + 1) * n],
                "{ty:?} m={m}"
            );
        }
    }
}
