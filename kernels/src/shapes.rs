//! The launch shape of each CUDA kernel (grid, block, dynamic shared memory): one place that
//! both the CUDA launcher (`cuda::launch`) and the CPU emulation of the kernels (`kernels/emu`)
//! read, so the shapes the emulation tests are the ones a GPU runs. Pure and always compiled.
//!
//! The kernels' assumptions, checked in the tests below: reductions (`add_rms_norm`, `argmax`)
//! need a power-of-two block and one float (argmax: a float and an int) of shared memory per
//! thread; attention fits its tiles in 48 KiB of shared memory and 16 accumulators a thread; no grid dimension exceeds 65,535 except x (2^31 - 1).

/// Grid, block and dynamic shared memory of one launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
}

fn blocks(n: usize) -> u32 {
    n.clamp(1, i32::MAX as usize) as u32
}

const fn flat(grid: u32, threads: u32, shared_bytes: u32) -> Shape {
    Shape {
        grid: (grid, 1, 1),
        block: (threads, 1, 1),
        shared_bytes,
    }
}

/// `embedding_bf16`: a block per row.
pub fn embedding(rows: usize) -> Shape {
    flat(blocks(rows), 256, 0)
}

/// Threads of `add_rms_norm_bf16`'s blocks (a power of two: its tree reduction).
pub const RMS_NORM_THREADS: u32 = 256;

/// `add_rms_norm_bf16`: a block per row, a float of shared memory per thread.
pub fn add_rms_norm(rows: usize) -> Shape {
    flat(blocks(rows), RMS_NORM_THREADS, RMS_NORM_THREADS * 4)
}

/// `rope_bf16`: a block per (row, head), a thread per rotated pair (at most 256).
pub fn rope(rows: usize, heads: usize, head_dim: usize) -> Shape {
    Shape {
        grid: (blocks(rows), heads.clamp(1, 65_535) as u32, 1),
        block: ((head_dim / 2).clamp(1, 256) as u32, 1, 1),
        shared_bytes: 0,
    }
}

/// The element-wise kernels (`silu_mul_bf16`, `elementwise.cu`): a grid-stride loop over at
/// most 65,535 blocks of 256.
pub fn elementwise(n: usize) -> Shape {
    flat(blocks(n.div_ceil(256).min(65_535)), 256, 0)
}

/// `write_kv_bf16`: a block per row.
pub fn write_kv(rows: usize) -> Shape {
    flat(blocks(rows), 256, 0)
}

/// Threads of `paged_attention_bf16`'s blocks.
pub const ATTENTION_THREADS: u32 = 128;
/// Output accumulators one attention thread keeps (`ACC_MAX` in `attention.cu`).
pub const ATTENTION_ACCUMULATORS: usize = 16;

/// Query rows per group and keys per tile of `paged_attention_bf16` for a head size: as many
/// as keep the shared memory within the default 48 KiB and a thread's accumulators within
/// [`ATTENTION_ACCUMULATORS`].
pub fn attention_tiles(head_dim: usize) -> (usize, usize) {
    if head_dim > 128 {
        (8, 16)
    } else {
        (16, 32)
    }
}

/// Floats of shared memory `paged_attention_bf16` needs (its layout: q rows, key and value
/// tiles, scores, per-row max, sum and correction, one flag).
pub fn attention_shared_floats(head_dim: usize) -> usize {
    let (g, kt) = attention_tiles(head_dim);
    (g + 2 * kt) * head_dim + g * kt + 3 * g + 1
}

/// `paged_attention_bf16`: a block per (group of query rows, head, context partition).
pub fn paged_attention(groups: usize, heads: usize, partitions: usize, head_dim: usize) -> Shape {
    Shape {
        grid: (
            blocks(groups),
            heads.clamp(1, 65_535) as u32,
            partitions.clamp(1, 65_535) as u32,
        ),
        block: (ATTENTION_THREADS, 1, 1),
        shared_bytes: (attention_shared_floats(head_dim) * 4) as u32,
    }
}

/// `attention_combine_bf16`: a block per (query row, head).
pub fn attention_combine(rows: usize, heads: usize) -> Shape {
    Shape {
        grid: (blocks(rows), heads.clamp(1, 65_535) as u32, 1),
        block: (ATTENTION_THREADS, 1, 1),
        shared_bytes: 0,
    }
}

/// Keys in each partition of a split context: a multiple of every key tile.
pub const PARTITION_KEYS: usize = 512;

/// How many partitions (of [`PARTITION_KEYS`] keys, at fixed positions) split the contexts of
/// an attention launch whose longest context is `max_context`. The split depends on nothing
/// else: a row's keys always fall in the same partitions and tiles whatever it is batched with
/// (a row shorter than the longest leaves the extra partitions empty, which the merge skips
/// exactly), so attention keeps the determinism contract; long decodes in small batches get
/// more blocks (split-K) as a side effect.
pub fn attention_partitions(max_context: usize) -> (usize, usize) {
    (
        max_context.div_ceil(PARTITION_KEYS).clamp(1, 65_535),
        PARTITION_KEYS,
    )
}

/// Threads of `argmax_f32`'s blocks (a power of two: its tree reduction).
pub const ARGMAX_THREADS: u32 = 1024;

/// `argmax_f32`: a block per row, a float and an int of shared memory per thread.
pub fn argmax(rows: usize) -> Shape {
    flat(blocks(rows), ARGMAX_THREADS, ARGMAX_THREADS * 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_meet_the_kernels_assumptions_and_the_device_limits() {
        for s in [add_rms_norm(7), argmax(3)] {
            assert!(
                s.block.0.is_power_of_two(),
                "a tree reduction needs 2^k threads: {s:?}"
            );
            assert!(s.shared_bytes >= s.block.0 * 4, "{s:?}");
        }
        assert_eq!(
            argmax(1).shared_bytes,
            ARGMAX_THREADS * 8,
            "a float and an int per thread"
        );
        for s in [embedding(0), write_kv(0), elementwise(0), add_rms_norm(0)] {
            assert_eq!(s.grid.0, 1, "an empty launch still has a block: {s:?}");
        }
        assert_eq!(
            elementwise(100_000_000).grid.0,
            65_535,
            "the grid-stride loop does the rest"
        );
        assert_eq!(rope(3, 100_000, 64).grid.1, 65_535);
        assert_eq!(rope(3, 8, 2).block.0, 1);
        assert_eq!(rope(3, 8, 1024).block.0, 256);
        for s in [
            embedding(5),
            rope(5, 8, 128),
            paged_attention(5, 8, 3, 256),
            paged_attention(5, 8, 1, 128),
            argmax(5),
        ] {
            assert!(s.block.0 * s.block.1 * s.block.2 <= 1024, "{s:?}");
            assert!(
                s.shared_bytes <= 48 * 1024,
                "within the default shared memory: {s:?}"
            );
        }
    }

    #[test]
    fn attention_tiles_fit_shared_memory_and_the_accumulators() {
        for hd in [16, 32, 64, 80, 96, 128, 160, 256] {
            let (g, _) = attention_tiles(hd);
            assert!(
                attention_shared_floats(hd) * 4 <= 48 * 1024,
                "head_dim {hd}"
            );
            assert!(
                g * hd <= ATTENTION_ACCUMULATORS * ATTENTION_THREADS as usize,
                "head_dim {hd}: accumulators"
            );
        }
    }

    #[test]
    fn contexts_split_at_fixed_positions() {
        assert_eq!(attention_partitions(0), (1, 512));
        assert_eq!(attention_partitions(512), (1, 512));
        assert_eq!(attention_partitions(513), (2, 512));
        assert_eq!(attention_partitions(8192), (16, 512));
        let (_, kt) = attention_tiles(256);
        assert_eq!(
            PARTITION_KEYS % kt,
            0,
            "partitions start on tile boundaries"
        );
        assert_eq!(PARTITION_KEYS % attention_tiles(64).1, 0);
    }
}
