//! Each CUDA kernel, run by the CPU emulation, against the CPU op on random inputs (the same
//! cases and tolerance as `kernels/tests/gpu_kernels.rs`, which runs them on a GPU): inputs are
//! bf16, kernels accumulate in f32 and round to bf16, so |kernel - cpu| <= 1e-2 + 1e-2·|cpu|;
//! copies (embedding, KV writes) and argmax match exactly. Outputs start poisoned (NaN).

use gristmill_kernels::cpu::{self, AttentionShape, PagedKv, SeqAttention};
use gristmill_kernels::device::PagedAttention;
use gristmill_kernels_emu as emu;
use half::bf16;

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

fn close(got: &[bf16], cpu: &[f32], what: &str) {
    assert_eq!(got.len(), cpu.len(), "{what}: lengths");
    for (i, (g, c)) in got.iter().zip(cpu).enumerate() {
        let g = g.to_f32();
        assert!(
            (g - c).abs() <= 1e-2 + 1e-2 * c.abs(),
            "{what}: element {i}: kernel {g} vs cpu {c}"
        );
    }
}

#[test]
fn bf16_conversion_rounds_to_nearest_even_like_the_half_crate() {
    // Through the embedding kernel's zero and a copy, and rms_norm's rounding of sums: the
    // emulated __float2bfloat16 must agree with half's from_f32 on every value it sees.
    let mut rng = Rng(9);
    let dim = 64;
    let hidden = rng.bf16s(dim);
    let delta = rng.bf16s(dim);
    let weight = vec![bf16::ONE; dim];
    let mut h = hidden.clone();
    let mut out = vec![bf16::NAN; dim];
    emu::add_rms_norm(&mut h, Some(&delta), &weight, &mut out, dim, 1e-5);
    let want: Vec<bf16> = hidden
        .iter()
        .zip(&delta)
        .map(|(a, b)| bf16::from_f32(a.to_f32() + b.to_f32()))
        .collect();
    assert_eq!(h, want);
}

#[test]
fn embedding_gathers_its_shard_and_zeros_the_rest() {
    let mut rng = Rng(1);
    for dim in [64, 576] {
        let (first, rows_in_table) = (10u32, 50usize);
        let table = rng.bf16s(rows_in_table * dim);
        let ids: Vec<u32> = (0..33).map(|i| (i * 7) % 80).collect();
        let mut out = vec![bf16::NAN; ids.len() * dim];
        emu::embedding(&table, &ids, &mut out, dim, first);
        for (r, &id) in ids.iter().enumerate() {
            let row = &out[r * dim..(r + 1) * dim];
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
fn add_rms_norm_matches_the_cpu_op() {
    let mut rng = Rng(2);
    for (rows, dim) in [(1, 64), (7, 576), (3, 1536)] {
        let hidden = rng.bf16s(rows * dim);
        let delta = rng.bf16s(rows * dim);
        let weight = rng.bf16s(dim);
        let mut h = hidden.clone();
        let mut out = vec![bf16::NAN; rows * dim];
        emu::add_rms_norm(&mut h, Some(&delta), &weight, &mut out, dim, 1e-5);
        let summed: Vec<bf16> = hidden
            .iter()
            .zip(&delta)
            .map(|(a, b)| bf16::from_f32(a.to_f32() + b.to_f32()))
            .collect();
        assert_eq!(h, summed, "the residual");
        let mut want = vec![0f32; rows * dim];
        for r in 0..rows {
            cpu::rms_norm(
                &f32s(&summed[r * dim..(r + 1) * dim]),
                &f32s(&weight),
                1e-5,
                &mut want[r * dim..(r + 1) * dim],
            );
        }
        close(&out, &want, &format!("rms_norm {rows}x{dim}"));
        // Without a delta the residual is left alone.
        let mut again = summed.clone();
        let mut out2 = vec![bf16::NAN; rows * dim];
        emu::add_rms_norm(&mut again, None, &weight, &mut out2, dim, 1e-5);
        assert_eq!(again, summed);
        assert_eq!(out2, out, "the same norm without the add");
    }
}

#[test]
fn rope_matches_the_cpu_op_in_both_layouts() {
    let mut rng = Rng(3);
    for (rows, heads, head_dim) in [(1, 9, 64), (5, 3, 64), (4, 8, 128)] {
        let x = rng.bf16s(rows * heads * head_dim);
        let positions: Vec<i32> = (0..rows as i32).map(|r| r * 37 + 3).collect();
        let pos: Vec<usize> = positions.iter().map(|&p| p as usize).collect();
        let inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / head_dim as f32))
            .collect();
        let half = head_dim / 2;
        for interleaved in [false, true] {
            let mut got = x.clone();
            emu::rope(
                &mut got,
                &positions,
                &inv_freq,
                heads,
                head_dim,
                interleaved,
            );
            let mut want = f32s(&x);
            if interleaved {
                for head in want.chunks_exact_mut(head_dim) {
                    let split: Vec<f32> = (0..half)
                        .map(|i| head[2 * i])
                        .chain((0..half).map(|i| head[2 * i + 1]))
                        .collect();
                    head.copy_from_slice(&split);
                }
            }
            cpu::rope_neox(&mut want, &pos, heads, head_dim, &inv_freq);
            if interleaved {
                for head in want.chunks_exact_mut(head_dim) {
                    let merged: Vec<f32> =
                        (0..half).flat_map(|i| [head[i], head[i + half]]).collect();
                    head.copy_from_slice(&merged);
                }
            }
            close(
                &got,
                &want,
                &format!("rope {rows}x{heads}x{head_dim} interleaved={interleaved}"),
            );
        }
    }
}

#[test]
fn silu_mul_matches_the_cpu_op() {
    let mut rng = Rng(4);
    // (A size past the 65,535-block grid, where the loop's second lap starts, would spawn 16
    // million emulated threads: gpu_kernels.rs covers it on a device.)
    for n in [1, 1536, 64 * 1536 + 5] {
        let gate = rng.bf16s(n);
        let upv = rng.bf16s(n);
        let mut got = gate.clone();
        emu::silu_mul(&mut got, &upv);
        let mut want = f32s(&gate);
        cpu::silu_mul(&mut want, &f32s(&upv));
        close(&got, &want, &format!("silu_mul {n}"));
    }
}

#[test]
fn argmax_matches_the_cpu_op_and_takes_the_first_of_ties() {
    let mut rng = Rng(6);
    for (rows, vocab) in [(1, 10), (3, 49_152), (2, 1_500)] {
        let mut logits: Vec<f32> = (0..rows * vocab).map(|_| rng.next()).collect();
        // A tie in row 0: the first index wins, as the CPU sampler's.
        logits[vocab / 2] = 5.0;
        logits[vocab - 1] = 5.0;
        let got = emu::argmax(&logits, vocab);
        let want: Vec<u32> = logits
            .chunks_exact(vocab)
            .map(|r| cpu::argmax(r) as u32)
            .collect();
        assert_eq!(got, want, "{rows}x{vocab}");
        assert_eq!(got[0] as usize, vocab / 2);
    }
}

#[test]
fn write_kv_and_paged_decode_attention_match_the_cpu_ops() {
    let mut rng = Rng(5);
    for (heads, kv_heads, head_dim, lens) in [
        (9, 3, 64, vec![1, 17, 40]),
        (8, 8, 128, vec![33, 5]),
        (4, 1, 32, vec![16, 48]),
    ] {
        let block_size: usize = 16;
        let width = kv_heads * head_dim;
        let max_blocks = lens
            .iter()
            .max()
            .copied()
            .unwrap_or(1usize)
            .div_ceil(block_size);
        let n = lens.len();
        let num_blocks = max_blocks * n;
        // Scrambled block tables: sequence i owns blocks i, i + n, i + 2n, ...
        let tables: Vec<i32> = (0..n)
            .flat_map(|i| (0..max_blocks).map(move |j| (i + j * n) as i32))
            .collect();
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
        let mut k_cache = vec![bf16::ZERO; num_blocks * block_size * width];
        let mut v_cache = k_cache.clone();
        assert_eq!(
            emu::write_kv(&kr, &vr, &mut k_cache, &mut v_cache, &slots, width),
            0
        );
        let us: Vec<usize> = slots.iter().map(|&x| x as usize).collect();
        let slot_major = |rows: &[f32]| {
            let mut c = vec![0f32; num_blocks * block_size * width];
            for (row, &slot) in rows.chunks_exact(width).zip(&us) {
                c[slot * width..(slot + 1) * width].copy_from_slice(row);
            }
            c
        };
        assert_eq!(f32s(&k_cache), slot_major(&f32s(&kr)), "keys");
        assert_eq!(f32s(&v_cache), slot_major(&f32s(&vr)), "values");
        let mut kh = vec![0f32; num_blocks * block_size * width];
        let mut vh = kh.clone();
        cpu::write_kv(&mut kh, &f32s(&kr), &us, width, head_dim, block_size);
        cpu::write_kv(&mut vh, &f32s(&vr), &us, width, head_dim, block_size);
        let q = rng.bf16s(n * heads * head_dim);
        let mut out = vec![bf16::NAN; n * heads * head_dim];
        let ctx: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
        let shape = PagedAttention {
            heads,
            kv_heads,
            head_dim,
            block_size,
            max_blocks,
            scale: 1.0 / (head_dim as f32).sqrt(),
            window: 0,
        };
        assert_eq!(
            emu::paged_attention_decode(&q, &k_cache, &v_cache, &tables, &ctx, &mut out, &shape),
            0
        );
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
            &out,
            &want,
            &format!("paged attention {heads}/{kv_heads}x{head_dim} {lens:?}"),
        );
    }
}

#[test]
fn out_of_range_slots_and_blocks_are_refused_and_reported() {
    let mut rng = Rng(11);
    let (kv_heads, head_dim, block_size, blocks) = (2usize, 64usize, 16usize, 2usize);
    let width = kv_heads * head_dim;
    let slots_total = blocks * block_size;
    let mut k_cache = vec![bf16::ZERO; slots_total * width];
    let mut v_cache = k_cache.clone();
    let rows = rng.bf16s(3 * width);
    let bits = emu::write_kv(
        &rows,
        &rows,
        &mut k_cache,
        &mut v_cache,
        &[3, slots_total as i64, -1],
        width,
    );
    assert_eq!(bits, 1, "a slot outside the cache");
    assert_eq!(
        &k_cache[3 * width..4 * width],
        &rows[..width],
        "the good row is written"
    );
    assert_eq!(
        k_cache.iter().filter(|x| x.to_f32() != 0.0).count(),
        rows[..width].iter().filter(|x| x.to_f32() != 0.0).count(),
        "nothing else is written"
    );
    let heads = 4;
    let q = rng.bf16s(2 * heads * head_dim);
    let mut out = vec![bf16::NAN; 2 * heads * head_dim];
    let shape = PagedAttention {
        heads,
        kv_heads,
        head_dim,
        block_size,
        max_blocks: 2,
        scale: 1.0 / (head_dim as f32).sqrt(),
        window: 0,
    };
    let bits = emu::paged_attention_decode(
        &q,
        &k_cache,
        &v_cache,
        &[0, 99, 1, 0],
        &[20, 1000],
        &mut out,
        &shape,
    );
    assert_eq!(
        bits,
        2 | 4,
        "a block outside the cache and a context beyond the table"
    );
    assert!(
        out.iter().all(|x| x.to_f32() == 0.0),
        "refused heads are zeros"
    );
}
