//! GFLOP/s of the CPU matmul at model shapes: `cargo run --release -p gristmill-kernels --example gemm`.

use std::time::Instant;

use gristmill_kernels::cpu::{linear, PackedMatrix};

fn main() {
    let threads = rayon::current_num_threads();
    println!("{threads} threads");
    for &(m, k, n) in &[
        (1, 576, 1536),
        (32, 576, 1536),
        (64, 576, 1536),
        (512, 576, 1536),
        (512, 1536, 576),
        (32, 576, 49152),
    ] {
        let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
        let p = PackedMatrix::pack(&w, n, k);
        let mut out = vec![0f32; m * n];
        let flops = 2.0 * (m * k * n) as f64;
        let reps = ((2e10 / flops) as usize).clamp(3, 2000);
        linear(&x, m, &p, &mut out);
        let t = Instant::now();
        for _ in 0..reps {
            linear(&x, m, &p, &mut out);
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        println!(
            "m={m:4} k={k:5} n={n:6}: {:8.1} GFLOP/s  {:8.3} ms  ({:.1} GB/s of weights)",
            flops / s / 1e9,
            s * 1e3,
            (n * k * 4) as f64 / s / 1e9
        );
    }
}
