//! Every CUDA kernel, and the GEMM, through the [`Device`] interface against the CPU op on
//! random inputs, with outputs poisoned (NaN) before every launch. One body per check, run on
//! two devices: the kernels compiled as C++ on CPU threads ([`EmuDevice`], in `make test`), and
//! a CUDA GPU (`--features cuda`, `#[ignore]`d: `scripts/gpu-check.sh` runs them on a GPU
//! machine with `--include-ignored`, where a missing GPU fails them).
//!
//! Tolerance: inputs are bf16; kernels accumulate in f32 and round their outputs to bf16, so
//! |kernel - cpu| <= 1e-2 + 1e-2·|cpu|; copies (embedding, KV writes) and argmax match exactly.

use gristmill_kernels::cpu::{self, AttentionShape, PagedKv, SeqAttention};
use gristmill_kernels::device::{AttentionPacking, Device, Elem, PagedAttention};
use gristmill_kernels_emu::EmuDevice;
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

fn up<D: Device, T: Elem>(d: &D, v: &[T]) -> D::Buf<T> {
    d.upload(v).expect("upload")
}

fn down<D: Device, T: Elem>(d: &D, b: &D::Buf<T>) -> Vec<T> {
    d.download(b).expect("download")
}

fn poisoned<D: Device>(d: &D, n: usize) -> D::Buf<bf16> {
    up(d, &vec![bf16::NAN; n])
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

/// Whether `d` is a real GPU (larger cases: an emulated thread is an OS thread).
fn on_gpu<D: Device>(d: &D) -> bool {
    !d.name().contains("emulation")
}

fn embedding<D: Device>(d: &D) {
    let mut rng = Rng(1);
    for dim in [64, 576] {
        let (first, rows_in_table) = (10u32, 50usize);
        let table = rng.bf16s(rows_in_table * dim);
        let ids: Vec<u32> = (0..33).map(|i| (i * 7) % 80).collect();
        let mut out = poisoned(d, ids.len() * dim);
        d.embedding(&up(d, &table), &up(d, &ids), &mut out, dim, first)
            .expect("launch");
        let got = down(d, &out);
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

fn bf16_rounding<D: Device>(d: &D) {
    // rms_norm's rounding of the residual sums: the device's __float2bfloat16 must agree with
    // half's from_f32 (round to nearest even) on every value it sees.
    let mut rng = Rng(9);
    let dim = 64;
    let hidden = rng.bf16s(dim * 16);
    let delta = rng.bf16s(dim * 16);
    let mut h = up(d, &hidden);
    let mut out = poisoned(d, dim * 16);
    let ones = up(d, &vec![bf16::ONE; dim]);
    d.add_rms_norm(&mut h, Some(&up(d, &delta)), &ones, &mut out, dim, 1e-5)
        .expect("launch");
    let want: Vec<bf16> = hidden
        .iter()
        .zip(&delta)
        .map(|(a, b)| bf16::from_f32(a.to_f32() + b.to_f32()))
        .collect();
    assert_eq!(down(d, &h), want);
}

fn add_rms_norm<D: Device>(d: &D) {
    let mut rng = Rng(2);
    for (rows, dim) in [(1, 64), (7, 576), (3, 1536)] {
        let hidden = rng.bf16s(rows * dim);
        let delta = rng.bf16s(rows * dim);
        let weight = up(d, &rng.bf16s(dim));
        let mut h = up(d, &hidden);
        let mut out = poisoned(d, rows * dim);
        d.add_rms_norm(&mut h, Some(&up(d, &delta)), &weight, &mut out, dim, 1e-5)
            .expect("launch");
        let summed: Vec<bf16> = hidden
            .iter()
            .zip(&delta)
            .map(|(a, b)| bf16::from_f32(a.to_f32() + b.to_f32()))
            .collect();
        assert_eq!(down(d, &h), summed, "the residual");
        let w = f32s(&down(d, &weight));
        let mut want = vec![0f32; rows * dim];
        for r in 0..rows {
            cpu::rms_norm(
                &f32s(&summed[r * dim..(r + 1) * dim]),
                &w,
                1e-5,
                &mut want[r * dim..(r + 1) * dim],
            );
        }
        let normed = down(d, &out);
        close(&normed, &want, &format!("rms_norm {rows}x{dim}"));
        // Without a delta the input is only read, and per-head norms (a weight of 64) work.
        let mut out2 = poisoned(d, rows * dim);
        d.rms_norm(&h, &weight, &mut out2, dim, 1e-5)
            .expect("launch");
        assert_eq!(down(d, &h), summed);
        assert_eq!(down(d, &out2), normed, "the same norm without the add");
        let head = up(d, &rng.bf16s(64));
        let mut per_head = poisoned(d, rows * dim);
        d.rms_norm(&h, &head, &mut per_head, 64, 1e-6)
            .expect("launch");
        let hw = f32s(&down(d, &head));
        let mut want = vec![0f32; rows * dim];
        for (x, o) in f32s(&summed).chunks(64).zip(want.chunks_mut(64)) {
            cpu::rms_norm(x, &hw, 1e-6, o);
        }
        close(
            &down(d, &per_head),
            &want,
            &format!("per-head rms_norm {rows}x{dim}"),
        );
    }
}

fn rope<D: Device>(d: &D) {
    let mut rng = Rng(3);
    for (rows, heads, head_dim) in [(1, 9, 64), (5, 3, 64), (4, 8, 128), (3, 2, 16)] {
        let x = rng.bf16s(rows * heads * head_dim);
        let positions: Vec<i32> = (0..rows as i32).map(|r| r * 37 + 3).collect();
        let pos: Vec<usize> = positions.iter().map(|&p| p as usize).collect();
        let inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / head_dim as f32))
            .collect();
        let half = head_dim / 2;
        for interleaved in [false, true] {
            let mut got = up(d, &x);
            d.rope(
                &mut got,
                &up(d, &positions),
                &up(d, &inv_freq),
                heads,
                head_dim,
                interleaved,
            )
            .expect("launch");
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
                &down(d, &got),
                &want,
                &format!("rope {rows}x{heads}x{head_dim} interleaved={interleaved}"),
            );
        }
    }
}

/// Sizes for the grid-stride kernels: on a GPU also one past the 65,535-block grid, where the
/// loop's second lap starts (16 million emulated threads would be too many).
fn elementwise_sizes<D: Device>(d: &D) -> Vec<usize> {
    let mut sizes = vec![1, 1536, 64 * 1536 + 5];
    if on_gpu(d) {
        sizes.push(65_535 * 256 + 1_000);
    }
    sizes
}

fn elementwise<D: Device>(d: &D) {
    let mut rng = Rng(4);
    for n in elementwise_sizes(d) {
        let (a, b) = (rng.bf16s(n), rng.bf16s(n));
        let (af, bf) = (f32s(&a), f32s(&b));
        let mut x = up(d, &a);
        d.silu_mul(&mut x, &up(d, &b)).expect("launch");
        let mut want = af.clone();
        cpu::silu_mul(&mut want, &bf);
        close(&down(d, &x), &want, &format!("silu_mul {n}"));
        let mut x = up(d, &a);
        d.gelu_tanh_mul(&mut x, &up(d, &b)).expect("launch");
        let mut want = af.clone();
        cpu::gelu_tanh_mul(&mut want, &bf);
        close(&down(d, &x), &want, &format!("gelu_tanh_mul {n}"));
        let mut x = up(d, &a);
        d.add(&mut x, &up(d, &b)).expect("launch");
        let mut want = af.clone();
        cpu::add_assign(&mut want, &bf);
        close(&down(d, &x), &want, &format!("add {n}"));
        let mut x = up(d, &a);
        d.scale(&mut x, 0.37).expect("launch");
        let mut want = af.clone();
        cpu::scale(&mut want, 0.37);
        close(&down(d, &x), &want, &format!("scale {n}"));
    }
    for (rows, cols) in [(1, 7), (13, 576), (3, 1536)] {
        let (a, bias) = (rng.bf16s(rows * cols), rng.bf16s(cols));
        let mut x = up(d, &a);
        d.add_bias(&mut x, &up(d, &bias)).expect("launch");
        let mut want = f32s(&a);
        for row in want.chunks_mut(cols) {
            cpu::add_assign(row, &f32s(&bias));
        }
        close(&down(d, &x), &want, &format!("add_bias {rows}x{cols}"));
    }
}

fn gemm<D: Device>(d: &D) {
    let mut rng = Rng(7);
    for (m, n, k) in [(1, 1, 1), (5, 96, 64), (17, 576, 192), (3, 1000, 576)] {
        let (x, w) = (rng.bf16s(m * k), rng.bf16s(n * k));
        let mut out = poisoned(d, m * n);
        d.gemm(&up(d, &x), &up(d, &w), &mut out, m, n, k)
            .expect("gemm");
        let (xf, wf) = (f32s(&x), f32s(&w));
        let want: Vec<f32> = (0..m * n)
            .map(|i| {
                let (r, c) = (i / n, i % n);
                (0..k).map(|j| xf[r * k + j] * wf[c * k + j]).sum()
            })
            .collect();
        close(&down(d, &out), &want, &format!("gemm {m}x{n}x{k}"));
    }
}

fn argmax<D: Device>(d: &D) {
    let mut rng = Rng(6);
    for (rows, vocab) in [(1, 10), (3, 49_152), (2, 1_500)] {
        let mut logits: Vec<f32> = (0..rows * vocab).map(|_| rng.next()).collect();
        // A tie in row 0: the first index wins, as the CPU sampler's.
        logits[vocab / 2] = 5.0;
        logits[vocab - 1] = 5.0;
        let mut out = up(d, &vec![u32::MAX; rows]);
        d.argmax(&up(d, &logits), vocab, &mut out).expect("launch");
        let got = down(d, &out);
        let want: Vec<u32> = logits
            .chunks_exact(vocab)
            .map(|r| cpu::argmax(r) as u32)
            .collect();
        assert_eq!(got, want, "{rows}x{vocab}");
        assert_eq!(got[0] as usize, vocab / 2);
    }
}

/// Heads, head size, paging, scale and window of an attention launch.
#[derive(Clone, Copy)]
struct Launch {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    scale: f32,
    window: usize,
}

/// Attention of `q`'s rows (the sequences' rows in order) over the caches on `d`, with the
/// output and the split-K workspace poisoned first: the output and the launch's shape.
fn attend<D: Device>(
    d: &D,
    q: &[bf16],
    (k_cache, v_cache): (&D::Buf<bf16>, &D::Buf<bf16>),
    seqs: &[SeqAttention<'_>],
    l: Launch,
) -> (Vec<bf16>, PagedAttention) {
    let rows: usize = seqs.iter().map(|s| s.rows).sum();
    let packing = AttentionPacking::new(seqs, l.block_size, l.head_dim);
    let shape = packing.shape(
        l.heads,
        l.kv_heads,
        l.head_dim,
        l.block_size,
        l.scale,
        l.window,
    );
    let mut out = poisoned(d, rows * l.heads * l.head_dim);
    let mut partial = up(d, &vec![f32::NAN; shape.partial_len(rows).max(1)]);
    d.paged_attention(
        &up(d, q),
        k_cache,
        v_cache,
        &up(d, &packing.tables),
        &up(d, &packing.groups),
        &mut out,
        &mut partial,
        &shape,
    )
    .expect("launch");
    d.take_violations().expect("no index out of range");
    (down(d, &out), shape)
}

/// One attention case: query heads, KV heads, head size, sliding window (0: none), and the
/// sequences' (query rows, position of the first).
type AttentionCase = (usize, usize, usize, usize, Vec<(usize, usize)>);

fn write_kv_and_attention<D: Device>(d: &D) {
    let mut rng = Rng(5);
    let mut cases: Vec<AttentionCase> = vec![
        // Decode rows beside a prompt chunk of 20 rows over a cached prefix of 20 (two groups).
        (9, 3, 64, 0, vec![(1, 0), (1, 16), (20, 20)]),
        (8, 8, 128, 0, vec![(33, 0), (1, 4)]),
        // A sliding window of 5, grouped-query heads.
        (4, 1, 32, 5, vec![(12, 3), (1, 47)]),
        // A long decode in a small launch: the context splits (split-K), head size 80.
        (2, 1, 80, 0, vec![(1, 1499)]),
        // Head size 256: groups of 8 rows.
        (2, 2, 256, 0, vec![(10, 2)]),
    ];
    if on_gpu(d) {
        // A long prompt chunk and a batch of long decodes, split.
        cases.push((32, 8, 128, 0, vec![(512, 1000)]));
        cases.push((32, 8, 128, 0, (0..4).map(|i| (1, 3000 + 97 * i)).collect()));
    }
    for (heads, kv_heads, head_dim, window, seqs) in cases {
        let block_size: usize = 16;
        let width = kv_heads * head_dim;
        let n = seqs.len();
        let max_blocks = seqs
            .iter()
            .map(|&(rows, start)| (rows + start).div_ceil(block_size))
            .max()
            .unwrap_or(1);
        let num_blocks = max_blocks * n;
        // Scrambled block tables: sequence i owns blocks i, i + n, i + 2n, ...
        let tables: Vec<Vec<u32>> = (0..n)
            .map(|i| (0..max_blocks).map(|j| (i + j * n) as u32).collect())
            .collect();
        // Every position of every sequence is cached (the prefix and the step's own rows).
        let mut slots = Vec::new();
        for (i, &(rows, start)) in seqs.iter().enumerate() {
            for p in 0..start + rows {
                slots.push(
                    (tables[i][p / block_size] as usize * block_size + p % block_size) as i64,
                );
            }
        }
        let kr = rng.bf16s(slots.len() * width);
        let vr = rng.bf16s(slots.len() * width);
        let mut k_cache = up(d, &vec![bf16::ZERO; num_blocks * block_size * width]);
        let mut v_cache = up(d, &vec![bf16::ZERO; num_blocks * block_size * width]);
        d.write_kv(
            &up(d, &kr),
            &up(d, &vr),
            &mut k_cache,
            &mut v_cache,
            &up(d, &slots),
            width,
        )
        .expect("launch");
        d.take_violations().expect("no slot out of range");
        let us: Vec<usize> = slots.iter().map(|&x| x as usize).collect();
        // The device cache is slot-major (`[slot, width]`); the CPU one keeps each KV head's
        // positions of a block together. Compare the device's with a slot-major copy.
        let slot_major = |rows: &[f32]| {
            let mut c = vec![0f32; num_blocks * block_size * width];
            for (row, &slot) in rows.chunks_exact(width).zip(&us) {
                c[slot * width..(slot + 1) * width].copy_from_slice(row);
            }
            c
        };
        assert_eq!(f32s(&down(d, &k_cache)), slot_major(&f32s(&kr)), "keys");
        assert_eq!(f32s(&down(d, &v_cache)), slot_major(&f32s(&vr)), "values");
        let mut kh = vec![0f32; num_blocks * block_size * width];
        let mut vh = kh.clone();
        cpu::write_kv(&mut kh, &f32s(&kr), &us, width, head_dim, block_size);
        cpu::write_kv(&mut vh, &f32s(&vr), &us, width, head_dim, block_size);
        let attn: Vec<SeqAttention<'_>> = seqs
            .iter()
            .zip(&tables)
            .map(|(&(rows, start), t)| SeqAttention {
                rows,
                start,
                block_table: t,
            })
            .collect();
        let rows: usize = seqs.iter().map(|s| s.0).sum();
        let q = rng.bf16s(rows * heads * head_dim);
        let launch = Launch {
            heads,
            kv_heads,
            head_dim,
            block_size,
            scale: 1.0 / (head_dim as f32).sqrt(),
            window,
        };
        let (out, shape) = attend(d, &q, (&k_cache, &v_cache), &attn, launch);
        let mut want = vec![0f32; rows * heads * head_dim];
        cpu::paged_attention(
            &f32s(&q),
            PagedKv {
                k: &kh,
                v: &vh,
                block_size,
            },
            &attn,
            AttentionShape {
                window: (window > 0).then_some(window),
                ..AttentionShape::new(heads, kv_heads, head_dim)
            },
            &mut want,
        );
        let lens: Vec<(usize, usize)> = seqs.iter().take(4).copied().collect();
        close(
            &out,
            &want,
            &format!(
                "paged attention {heads}/{kv_heads}x{head_dim} window {window} {lens:?} \
                 ({} partitions)",
                shape.partitions
            ),
        );
    }
}

/// A row's attention does not depend on the other rows of the launch: alone, beside a long
/// context (which splits the launch into partitions), or inside prefill chunks grouped
/// differently, with and without sliding windows, its output has the same bits. (Outputs are
/// bf16, so a changed order of f32 additions shows only where it moves a rounding; what
/// guarantees the contract is that tiles and partitions sit at fixed key positions.)
fn batch_invariance<D: Device>(d: &D) {
    let mut rng = Rng(13);
    let (heads, kv_heads, head_dim, block_size) = (4usize, 2usize, 64usize, 16usize);
    let width = kv_heads * head_dim;
    // Sequence 0: 40 positions in blocks 0..3; sequence 1: 1,300 positions in blocks 3..85.
    let tables: Vec<Vec<u32>> = vec![(0..3).collect(), (3..85).collect()];
    let num_blocks = 85;
    let k_cache = up(d, &rng.bf16s(num_blocks * block_size * width));
    let v_cache = up(d, &rng.bf16s(num_blocks * block_size * width));
    // Queries of every position of sequence 0 (the same query for a position in every run).
    let q0 = rng.bf16s(40 * heads * head_dim);
    let q1 = rng.bf16s(heads * head_dim);
    let per_row = heads * head_dim;
    // Runs sequence 0's rows `rows` (ending at position 39), optionally after sequence 1's
    // decode row; returns the output of position 39.
    let run = |rows: usize, with_long: bool, window: usize| -> Vec<bf16> {
        let mut q = Vec::new();
        let mut seqs = Vec::new();
        if with_long {
            q.extend_from_slice(&q1);
            seqs.push(SeqAttention {
                rows: 1,
                start: 1299,
                block_table: &tables[1],
            });
        }
        q.extend_from_slice(&q0[(40 - rows) * per_row..]);
        seqs.push(SeqAttention {
            rows,
            start: 40 - rows,
            block_table: &tables[0],
        });
        let total: usize = seqs.iter().map(|s| s.rows).sum();
        let launch = Launch {
            heads,
            kv_heads,
            head_dim,
            block_size,
            scale: 0.125,
            window,
        };
        let (out, shape) = attend(d, &q, (&k_cache, &v_cache), &seqs, launch);
        assert_eq!(
            shape.partitions > 1,
            with_long,
            "a long context splits the launch"
        );
        out[(total - 1) * per_row..].to_vec()
    };
    for window in [0, 7, 20] {
        let alone = run(1, false, window);
        assert!(alone.iter().all(|x| x.is_finite()));
        for (rows, with_long) in [(1, true), (16, false), (10, true), (40, false), (23, true)] {
            assert_eq!(
                run(rows, with_long, window),
                alone,
                "position 39 in a chunk of {rows} rows, beside a long context: {with_long}, \
                 window {window}"
            );
        }
    }
}

fn out_of_range_indices<D: Device>(d: &D) {
    let mut rng = Rng(11);
    let (kv_heads, head_dim, block_size, blocks) = (2usize, 64usize, 16usize, 2usize);
    let width = kv_heads * head_dim;
    let slots_total = blocks * block_size;
    let mut k_cache = up(d, &vec![bf16::ZERO; slots_total * width]);
    let mut v_cache = up(d, &vec![bf16::ZERO; slots_total * width]);
    // Row 0 to slot 3; row 1 to a slot past the end; row 2 to a negative slot.
    let rows = rng.bf16s(3 * width);
    d.write_kv(
        &up(d, &rows),
        &up(d, &rows),
        &mut k_cache,
        &mut v_cache,
        &up(d, &[3i64, slots_total as i64, -1]),
        width,
    )
    .expect("launch");
    let e = d.take_violations().expect_err("a slot out of range");
    assert!(e.to_string().contains("write_kv: a slot outside"), "{e}");
    d.take_violations().expect("the flag is cleared once read");
    let cache = f32s(&down(d, &k_cache));
    assert_eq!(
        &cache[3 * width..4 * width],
        &f32s(&rows[..width])[..],
        "the good row is written"
    );
    assert_eq!(
        cache.iter().filter(|x| **x != 0.0).count(),
        f32s(&rows[..width]).iter().filter(|x| **x != 0.0).count(),
        "nothing else is written"
    );
    // Attention: a block id past the cache, and a context longer than the table.
    let heads = 4;
    let q = up(d, &rng.bf16s(2 * heads * head_dim));
    let mut out = poisoned(d, 2 * heads * head_dim);
    let shape = PagedAttention {
        heads,
        kv_heads,
        head_dim,
        block_size,
        max_blocks: 2,
        scale: 1.0 / (head_dim as f32).sqrt(),
        window: 0,
        partitions: 1,
        partition_size: 1024,
    };
    let mut partial = up(d, &[0f32]);
    d.paged_attention(
        &q,
        &k_cache,
        &v_cache,
        &up(d, &[0i32, 99, 1, 0]),
        // Row 0 at position 19 (its table reaches block 99); row 1 at position 999.
        &up(d, &[0i32, 1, 19, 1, 1, 999]),
        &mut out,
        &mut partial,
        &shape,
    )
    .expect("launch");
    let e = d.take_violations().expect_err("bad tables").to_string();
    assert!(
        e.contains("a block outside") && e.contains("context beyond"),
        "{e}"
    );
    assert!(
        f32s(&down(d, &out)).iter().all(|x| *x == 0.0),
        "refused rows are zeros"
    );
    // A group naming rows outside q is not touched at all.
    let mut out = poisoned(d, 2 * heads * head_dim);
    d.paged_attention(
        &q,
        &k_cache,
        &v_cache,
        &up(d, &[0i32, 1]),
        &up(d, &[1i32, 5, 0]),
        &mut out,
        &mut partial,
        &shape,
    )
    .expect("launch");
    let e = d.take_violations().expect_err("rows beyond q").to_string();
    assert!(e.contains("query rows outside q"), "{e}");
    assert!(
        f32s(&down(d, &out)).iter().all(|x| x.is_nan()),
        "nothing written"
    );
}

/// The tests, once per device.
macro_rules! device_tests {
    ($device:expr, $($attr:meta),*) => {
        $(#[$attr])* #[test] fn embedding_gathers_its_shard_and_zeros_the_rest() { embedding(&$device) }
        $(#[$attr])* #[test] fn bf16_conversion_rounds_to_nearest_even_like_the_half_crate() { bf16_rounding(&$device) }
        $(#[$attr])* #[test] fn add_rms_norm_matches_the_cpu_op() { add_rms_norm(&$device) }
        $(#[$attr])* #[test] fn rope_matches_the_cpu_op_in_both_layouts() { rope(&$device) }
        $(#[$attr])* #[test] fn elementwise_ops_match_the_cpu_ops() { elementwise(&$device) }
        $(#[$attr])* #[test] fn gemm_matches_f32_dot_products() { gemm(&$device) }
        $(#[$attr])* #[test] fn argmax_matches_the_cpu_op_and_takes_the_first_of_ties() { argmax(&$device) }
        $(#[$attr])* #[test] fn write_kv_and_paged_attention_match_the_cpu_ops() { write_kv_and_attention(&$device) }
        $(#[$attr])* #[test] fn attention_is_batch_invariant() { batch_invariance(&$device) }
        $(#[$attr])* #[test] fn out_of_range_slots_and_blocks_are_refused_and_reported() { out_of_range_indices(&$device) }
    };
}

mod emulated {
    use super::*;
    device_tests!(EmuDevice::default(),);
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use gristmill_kernels::cuda::device::CudaDevice;

    fn gpu() -> CudaDevice {
        CudaDevice::new(0).unwrap_or_else(|e| {
            panic!("these tests need a GPU (scripts/gpu-check.sh runs them on one): {e}")
        })
    }

    device_tests!(
        gpu(),
        ignore = "needs a CUDA GPU and driver: scripts/gpu-check.sh runs it"
    );
}
