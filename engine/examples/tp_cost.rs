//! What tensor parallelism costs on the CPU (docs/benchmarks.md): the in-process all-reduce's
//! latency at the default model's hidden size, and engine steps per second at TP 1 and TP 3.
//!
//! `cargo run --release -p gristmill-engine --example tp_cost [MODEL]`

use std::sync::Arc;
use std::time::Instant;

use gristmill_engine::model::llama::{Logits, StepSeq};
use gristmill_engine::parallel::{Collective, ThreadCollective};
use gristmill_engine::tensor_parallel::load_model;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn all_reduce_latency(world: usize, len: usize, iters: usize) -> f64 {
    let ranks = ThreadCollective::group(world);
    let handles: Vec<_> = ranks
        .into_iter()
        .map(|c| {
            std::thread::spawn(move || {
                let mut buf = vec![c.rank() as f32; len];
                let mut times = Vec::with_capacity(iters);
                for _ in 0..iters {
                    c.barrier();
                    let t = Instant::now();
                    c.all_reduce_sum(&mut buf);
                    times.push(t.elapsed().as_secs_f64());
                }
                median(times)
            })
        })
        .collect();
    let medians: Vec<f64> = handles
        .into_iter()
        .map(|h| h.join().expect("rank"))
        .collect();
    medians.into_iter().fold(0.0, f64::max)
}

fn main() {
    let path = std::env::args()
        .nth(1)
        .map(Into::into)
        .unwrap_or_else(gristmill_engine::model_path_from_env);
    let hidden = 576;
    println!("all-reduce (in-process, 3 ranks), median of 2000:");
    for rows in [1, 32] {
        let s = all_reduce_latency(3, hidden * rows, 2000);
        println!("  {rows:>2} rows x {hidden}: {:.1} us", s * 1e6);
    }
    let layers = 30;
    println!("  per decode step: 2 all-reduces x {layers} layers + 1 embedding all-reduce + 1 logits all-gather");
    for world in [1, 3] {
        let model = Arc::new(load_model(&path, world, Default::default()).expect("model loads"));
        for batch in [1usize, 16] {
            let prompt: Vec<u32> = (0..32).map(|i| 100 + i).collect();
            let blocks_per_seq = 8; // 128 positions
            let mut kv = model
                .kv_cache(batch * blocks_per_seq, 16)
                .expect("KV cache");
            let tables: Vec<Vec<u32>> = (0..batch)
                .map(|s| ((s * blocks_per_seq) as u32..((s + 1) * blocks_per_seq) as u32).collect())
                .collect();
            let prefill: Vec<StepSeq<'_>> = tables
                .iter()
                .map(|t| StepSeq {
                    tokens: &prompt,
                    start: 0,
                    block_table: t,
                    logits: Logits::Last,
                })
                .collect();
            model.forward(&mut kv, &prefill).expect("prefill");
            let steps = 32;
            let token = [42u32];
            let t = Instant::now();
            for i in 0..steps {
                let step: Vec<StepSeq<'_>> = tables
                    .iter()
                    .map(|tb| StepSeq {
                        tokens: &token,
                        start: 32 + i,
                        block_table: tb,
                        logits: Logits::Last,
                    })
                    .collect();
                model.forward(&mut kv, &step).expect("step");
            }
            let per = t.elapsed().as_secs_f64() / steps as f64;
            println!(
                "TP {world}, {batch:>2} sequences: {:.1} decode steps/s ({:.1} ms/step)",
                1.0 / per,
                per * 1e3
            );
        }
    }
}
