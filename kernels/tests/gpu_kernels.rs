//! Each CUDA kernel against the CPU op on fresh random inputs at several sizes, with the output
//! poisoned (NaN) before every launch. They need a GPU and its driver, so they are `#[ignore]`d:
//! `cargo test` lists them as ignored, never as passed, and `scripts/gpu-check.sh` runs them on
//! a GPU machine with `--include-ignored` (where a missing GPU fails them).
//!
//! Tolerance: inputs are bf16; kernels accumulate in f32 and round their outputs to bf16, so a
//! value may differ from the f32 CPU op by bf16 rounding: |gpu - cpu| <= 1e-2 + 1e-2·|cpu|.
//! Copies (embedding, KV writes) and argmax must match exactly.

#![cfg(feature = "cuda")]

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use gristmill_kernels::cpu::{self, AttentionShape, PagedKv, SeqAttention};
use gristmill_kernels::cuda::launch::{CudaKernels, PagedAttention};
use half::bf16;

/// Why every test here is ignored by default.
const NEEDS_GPU: &str = "needs a CUDA GPU and driver: scripts/gpu-check.sh runs it";

fn kernels() -> Option<CudaKernels> {
    match CudaKernels::new(0) {
        Ok(k) => Some(k),
        Err(e) => panic!("these tests need a GPU ({NEEDS_GPU}): {e}"),
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn bf16s(&mut self, n: usize) -> Vec<bf16> {
        (0..n).map(|_| bf16::from_f32(self.next())).collect()
    }
}

fn f32s(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

fn up<T: cudarc::driver::DeviceRepr>(s: &Arc<CudaStream>, v: &[T]) -> CudaSlice<T> {
    s.clone_htod(v).expect("host to device")
}

fn poisoned(s: &Arc<CudaStream>, n: usize) -> CudaSlice<bf16> {
    up(s, &vec![bf16::NAN; n])
}

fn down<T: cudarc::driver::DeviceRepr + Default + Clone>(
    s: &Arc<CudaStream>,
    d: &CudaSlice<T>,
) -> Vec<T> {
    s.clone_dtoh(d).expect("device to host")
}

fn close(gpu: &[bf16], cpu: &[f32], what: &str) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        let g = g.to_f32();
        assert!(
            (g - c).abs() <= 1e-2 + 1e-2 * c.abs(),
            "{what}: element {i}: gpu {g} vs cpu {c}"
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU and driver: scripts/gpu-check.sh runs it"]
fn embedding_gathers_its_shard_and_zeros_the_rest() {
    let Some(k) = kernels() else { return };
    let s = &k.stream;
    let mut rng = Rng(1);
    for dim in [64, 576] {
        let (first, rows_in_table) = (10u32, 50usize);
        let table = rng.bf16s(rows_in_table * dim);
        let ids: Vec<u32> = (0..33).map(|i| (i * 7) % 80).collect();
        let mut out = poisoned(s, ids.len() * dim);
        k.embedding(
            &up(s, &table),
            rows_in_table,
            &up(s, &ids),
            &mut out,
            dim,
            first,
        )
        .expect("launch");
        let got = down(s, &out);
        for (r, &id) in ids.iter().enumerate() {
            let row = &got[r * dim..(r + 1) * dim];
            if id >= first && ((id - first) as usize) < rows_in_table {
                let at = (id - first) as usize * dim;
                assert_eq!(row, &table[at..at + dim], "row {r}");
            } else {
                assert!(
                    row.iter().all(|x| x.to_f32() == 0.0),
                    "row {r} outside the shard"
                );
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU and driver: scripts/gpu-check.sh runs it"]
fn add_rms_norm_matches_the_cpu_op() {
    let Some(k) = kernels() else { return };
    let s = &k.stream;
    let mut rng = Rng(2);
    for (rows, dim) in [(1, 64), (7, 576), (3, 1536)] {
        let hidden = rng.bf16s(rows * dim);
        let delta = rng.bf16s(rows * dim);
        let weight = rng.bf16s(dim);
        let mut h = up(s, &hidden);
        let mut out = poisoned(s, rows * dim);
        k.add_rms_norm(
            &mut h,
            Some(&up(s, &delta)),
            &up(s, &weight),
            &mut out,
            dim,
            1e-5,
        )
        .expect("launch");
        let summed: Vec<bf16> = hidden
            .iter()
            .zip(&delta)
            .map(|(a, b)| bf16::from_f32(a.to_f32() + b.to_f32()))
            .collect();
        assert_eq!(down(s, &h), summed, "the residual");
        let mut want = vec![0f32; rows * dim];
        for r in 0..rows {
            cpu::rms_norm(
                &f32s(&summed[r * dim..(r + 1) * dim]),
                &f32s(&weight),
                1e-5,
                &mut want[r * dim..(r + 1) * dim],
            );
        }
        close(&down(s, &out), &want, &format!("rms_norm {rows}x{dim}"));
    }
}

#[test]
#[ignore = "needs a CUDA GPU and driver: scripts/gpu-check.sh runs it"]
fn rope_matches_the_cpu_op_in_both_layouts() {
    let Some(k) = kernels() else { return };
    let s = &k.stream;
    let mut rng = Rng(3);
    for (rows, heads, head_dim) in [(1, 9, 64), (5, 3, 64), (4, 8, 128)] {
        let x = rng.bf16s(rows * heads * head_dim);
        let positions: Vec<i32> = (0..rows as i32).map(|r| r * 37 + 3).collect();
        let inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / head_dim as f32))
            .collect();
        for interleaved in [false, true] {
            let mut d = up(s, &x);
            k.rope(
                &mut d,
                &up(s, &positions),
                &up(s, &inv_freq),
                heads,
                head_dim,
                interleaved,
            )
            .expect("launch");
            let mut want = f32s(&x);
            if interleaved {
                // Pairs (2i, 2i+1): de-interleave, rotate as half-split, re-interleave.
                let half = head_dim / 2;
                for head in want.chunks_exact_mut(head_dim) {
                    let split: Vec<f32> = (0..half)
                        .map(|i| head[2 * i])
                        .chain((0..half).map(|i| head[2 * i + 1]))
                        .collect();
                    head.copy_from_slice(&split);
                }
                let pos: Vec<usize> = positions.iter().map(|&p| p as usize).collect();
                cpu::rope_neox(&mut want, &pos, heads, head_dim, &inv_freq);
                for head in want.chunks_exact_mut(head_dim) {
                    let merged: Vec<f32> =
                        (0..half).flat_map(|i| [head[i], head[i + half]]).collect();
                    head.copy_from_slice(&merged);
                }
            } else {
                let pos: Vec<usize> = positions.iter().map(|&p| p as usize).collect();
                cpu::rope_neox(&mut want, &pos, heads, head_dim, &inv_freq);
            }
            close(
                &down(s, &d),
                &want,
                &format!("rope {rows}x{heads}x{head_dim} interleaved={interleaved}"),
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU and driver: scripts/gpu-check.sh runs it"]
fn silu_mul_matches_the_cpu_op() {
    let Some(k) = kernels() else { return };
    let s = &k.stream;
    let mut rng = Rng(4);
    for n in [1, 1536, 64 * 1536 + 5] {
        let gate = rng.bf16s(n);
        let upv = rng.bf16s(n);
        let mut g = up(s, &gate);
        k.silu_mul(&mut g, &up(s, &upv)).expect("launch");
        let mut want = f32s(&gate);
        cpu::silu_mul(&mut want, &f32s(&upv));
        close(&down(s, &g), &want, &format!("silu_mul {n}"));
    }
}

#[test]
#[ignore = "needs a CUDA GPU and driver: scripts/gpu-check.sh runs it"]
fn write_kv_and_paged_decode_attention_match_the_cpu_ops() {
    let Some(k) = kernels() else { return };
    let s = &k.stream;
    let mut rng = Rng(5);
    for (heads, kv_heads, head_dim, lens) in [(9, 3, 64, vec![1, 17, 40]), (8, 8, 128, vec![33, 5])]
    {
        let block_size: usize = 16;
        let width = kv_heads * head_dim;
        let max_blocks = lens
            .iter()
            .max()
            .copied()
            .unwrap_or(1usize)
            .div_ceil(block_size);
        let num_blocks = max_blocks * lens.len();
        // Scrambled block tables: sequence i owns blocks i, i + n, i + 2n, ...
        let n = lens.len();
        let tables: Vec<i32> = (0..n)
            .flat_map(|i| (0..max_blocks).map(move |j| (i + j * n) as i32))
            .collect();
        let mut k_cache = up(s, &vec![bf16::ZERO; num_blocks * block_size * width]);
        let mut v_cache = up(s, &vec![bf16::ZERO; num_blocks * block_size * width]);
        let mut kh = vec![0f32; num_blocks * block_size * width];
        let mut vh = vec![0f32; num_blocks * block_size * width];
        // Every position of every sequence written through write_kv.
        let mut slots = Vec::new();
        for (i, &len) in lens.iter().enumerate() {
            for p in 0..len {
                slots.push(
                    tables[i * max_blocks + p / block_size] as i64 * block_size as i64
                        + (p % block_size) as i64,
                );
            }
        }
        let kr = rng.bf16s(slots.len() * width);
        let vr = rng.bf16s(slots.len() * width);
        k.write_kv(
            &up(s, &kr),
            &up(s, &vr),
            &mut k_cache,
            &mut v_cache,
            &up(s, &slots),
            width,
        )
        .expect("launch");
        let us: Vec<usize> = slots.iter().map(|&x| x as usize).collect();
        // The GPU cache is slot-major (`[slot, width]`); the CPU one keeps each KV head's
        // positions of a block together. Compare the GPU's with a slot-major copy of the rows.
        let slot_major = |rows: &[f32]| {
            let mut c = vec![0f32; num_blocks * block_size * width];
            for (row, &slot) in rows.chunks_exact(width).zip(&us) {
                c[slot * width..(slot + 1) * width].copy_from_slice(row);
            }
            c
        };
        assert_eq!(f32s(&down(s, &k_cache)), slot_major(&f32s(&kr)), "keys");
        assert_eq!(f32s(&down(s, &v_cache)), slot_major(&f32s(&vr)), "values");
        cpu::write_kv(&mut kh, &f32s(&kr), &us, width, head_dim, block_size);
        cpu::write_kv(&mut vh, &f32s(&vr), &us, width, head_dim, block_size);
        let q = rng.bf16s(n * heads * head_dim);
        let mut out = poisoned(s, n * heads * head_dim);
        let ctx: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
        k.paged_attention_decode(
            &up(s, &q),
            &k_cache,
            &v_cache,
            &up(s, &tables),
            &up(s, &ctx),
            &mut out,
            &PagedAttention {
                heads,
                kv_heads,
                head_dim,
                block_size,
                max_blocks,
                scale: 1.0 / (head_dim as f32).sqrt(),
                window: 0,
            },
        )
        .expect("launch");
        k.take_violations().expect("no index out of range");
        let utables: Vec<Vec<u32>> = (0..n)
            .map(|i| {
                tables[i * max_blocks..(i + 1) * max_blocks]
                    .iter()
                    .map(|&b| b as u32)
                    .collect()
            })
            .collect();
        let seqs: Vec<SeqAttention<'_>> = lens
            .iter()
            .zip(&utables)
            .map(|(&len, t)| SeqAttention {
                rows: 1,
                start: len - 1,
                block_table: t,
            })
            .collect();
        let mut want = vec![0f32; n * heads * head_dim];
        cpu::paged_attention(
            &f32s(&q),
            PagedKv {
                k: &kh,
                v: &vh,
                block_size,
            },
            &seqs,
            AttentionShape::new(heads, kv_heads, head_dim),
            &mut want,
        );
        close(
            &down(s, &out),
            &want,
            &format!("attention heads {heads}/{kv_heads} lens {lens:?}"),
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU and driver: scripts/gpu-check.sh runs it"]
fn argmax_matches_the_cpu_op() {
    let Some(k) = kernels() else { return };
    let s = &k.stream;
    let mut rng = Rng(6);
    for (rows, vocab) in [(1, 1000), (5, 49152)] {
        let logits: Vec<f32> = (0..rows * vocab).map(|_| rng.next()).collect();
        let mut out = up(s, &vec![u32::MAX; rows]);
        k.argmax(&up(s, &logits), vocab, &mut out).expect("launch");
        let want: Vec<u32> = logits
            .chunks_exact(vocab)
            .map(|r| cpu::argmax(r) as u32)
            .collect();
        assert_eq!(down(s, &out), want);
    }
}

#[test]
#[ignore = "needs a CUDA GPU and driver: scripts/gpu-check.sh runs it"]
fn out_of_range_slots_and_blocks_are_refused_and_reported() {
    let Some(k) = kernels() else { return };
    let s = &k.stream;
    let mut rng = Rng(11);
    let (kv_heads, head_dim, block_size, blocks) = (2usize, 64usize, 16usize, 2usize);
    let width = kv_heads * head_dim;
    let slots_total = blocks * block_size;
    let mut k_cache = up(s, &vec![bf16::ZERO; slots_total * width]);
    let mut v_cache = up(s, &vec![bf16::ZERO; slots_total * width]);
    // Row 0 to slot 3; row 1 to a slot past the end; row 2 to a negative slot.
    let rows = rng.bf16s(3 * width);
    k.write_kv(
        &up(s, &rows),
        &up(s, &rows),
        &mut k_cache,
        &mut v_cache,
        &up(s, &[3i64, slots_total as i64, -1]),
        width,
    )
    .expect("launch");
    let e = k.take_violations().expect_err("a slot out of range");
    assert!(e.to_string().contains("write_kv: a slot outside"), "{e}");
    k.take_violations().expect("the flag is cleared once read");
    let cache = f32s(&down(s, &k_cache));
    assert_eq!(
        &cache[3 * width..4 * width],
        &f32s(&rows[..width])[..],
        "the good row is written"
    );
    let written = cache.iter().filter(|x| **x != 0.0).count();
    assert!(written <= width, "nothing else is written");
    // Attention: a block id past the cache, and a context longer than the table.
    let heads = 4;
    let q = rng.bf16s(2 * heads * head_dim);
    let mut out = poisoned(s, 2 * heads * head_dim);
    k.paged_attention_decode(
        &up(s, &q),
        &k_cache,
        &v_cache,
        &up(s, &[0i32, 99, 1, 0]),
        &up(s, &[20i32, 1000]),
        &mut out,
        &PagedAttention {
            heads,
            kv_heads,
            head_dim,
            block_size,
            max_blocks: 2,
            scale: 1.0 / (head_dim as f32).sqrt(),
            window: 0,
        },
    )
    .expect("launch");
    let e = k.take_violations().expect_err("bad tables").to_string();
    assert!(
        e.contains("a block outside") && e.contains("context length"),
        "{e}"
    );
    assert!(
        f32s(&down(s, &out)).iter().all(|x| *x == 0.0),
        "refused heads are zeros"
    );
}
