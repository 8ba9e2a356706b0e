//! GFLOP/s of the CPU matmul at model shapes, side by side: f32, bf16 (the same bf16 values in
//! 16 bits, as a bf16 checkpoint is stored) and Q4_1 storage on the exact path, then Q4_1 and Q8_0 on the fast path's int8 kernels, one line per variant this CPU runs:
//! `cargo run --release -p gristmill-kernels --example gemm`.

use std::time::Instant;

use gristmill_kernels::cpu::int8::Isa;
use gristmill_kernels::cpu::{linear_with, PackedMatrix};
use gristmill_kernels::quant::{quantize, GgmlType};

fn main() {
    println!("{} threads", rayon::current_num_threads());
    let shapes = [
        (1, 576, 1536),
        (1, 1536, 576),
        (1, 576, 49152),
        (32, 576, 1536),
        (512, 576, 1536),
    ];
    for &(m, k, n) in &shapes {
        let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        // Values a bf16 checkpoint could hold, so that f32 and bf16 storage compute the same.
        let w: Vec<f32> = (0..n * k)
            .map(|i| half::bf16::from_f32((i % 5) as f32 * 0.1).to_f32())
            .collect();
        let q4 = quantize(GgmlType::Q4_1, &w);
        let q8 = quantize(GgmlType::Q8_0, &w);
        let best = Isa::available()[0];
        let mut variants = vec![
            (
                "f32 exact".to_string(),
                best,
                PackedMatrix::pack_f32(&w, n, k),
            ),
            ("bf16 exact".to_string(), best, PackedMatrix::pack(&w, n, k)),
            (
                "q4_1 exact".to_string(),
                best,
                PackedMatrix::pack_quantized(GgmlType::Q4_1, &q4, n, k).expect("q4_1 packs"),
            ),
        ];
        for isa in Isa::available() {
            for (ty, bytes) in [(GgmlType::Q4_1, &q4), (GgmlType::Q8_0, &q8)] {
                let m8 = PackedMatrix::pack_int8(ty, bytes, n, k).expect("packs");
                variants.push((
                    format!("{} int8 {}", ty.name(), isa.name()),
                    isa,
                    m8.clone(),
                ));
                variants.push((
                    format!("{} int8x2 {}", ty.name(), isa.name()),
                    isa,
                    m8.two_pass_activations(),
                ));
            }
        }
        for (name, isa, p) in &variants {
            let linear = |x: &[f32], m, p, out: &mut [f32]| linear_with(*isa, x, m, p, out);
            let mut out = vec![0f32; m * n];
            let flops = 2.0 * (m * k * n) as f64;
            let reps = ((2e10 / flops) as usize).clamp(3, 2000);
            linear(&x, m, p, &mut out);
            let t = Instant::now();
            for _ in 0..reps {
                linear(&x, m, p, &mut out);
            }
            let s = t.elapsed().as_secs_f64() / reps as f64;
            println!(
                "{name:24} m={m:4} k={k:5} n={n:6}: {:7.1} GFLOP/s {:8.3} ms ({:5.1} GB/s of weights)",
                flops / s / 1e9,
                s * 1e3,
                p.bytes() as f64 / s / 1e9
            );
        }
    }
}
