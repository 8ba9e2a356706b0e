//! A compute device as the GPU backend sees it: typed buffers in its memory, copies, one GEMM and
//! the kernels of `cuda/*.cu`. Two implementations: the CUDA device (`cuda::device`, feature
//! `cuda`: cudarc, NVRTC, cuBLAS) and the same kernels compiled as C++ and run on CPU threads
//! (`gristmill-kernels-emu`), which runs the whole GPU backend — buffer offsets, block tables,
//! batch packing — in `make test` on machines without a GPU.
//!
//! Every launch checks its buffers' sizes against what the kernel will touch and returns an
//! error (never undefined behaviour) when they do not fit; indices held in device memory (KV
//! slots, block tables) are checked by the kernels themselves and reported through
//! [`Device::take_violations`].

use half::bf16;

/// Why a device is unavailable or an operation on it failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("no CUDA driver library (libcuda) on this machine")]
    NoDriver,
    #[error("no CUDA device {0} (this machine has {1})")]
    NoDevice(usize, usize),
    #[error("no {0} library on this machine")]
    NoLibrary(&'static str),
    #[error("kernel compilation: {0}")]
    Compile(String),
    #[error("CUDA driver: {0}")]
    Driver(String),
    /// A kernel was handed indices outside its buffers (nothing was read or written there).
    #[error("a kernel refused out-of-range indices: {0}")]
    OutOfBounds(String),
    /// Buffers too small for the launch asked of them (a bug in the caller).
    #[error("{0}: buffer sizes do not fit the launch")]
    Sizes(&'static str),
}

pub type Result<T> = std::result::Result<T, DeviceError>;

/// Bits of the violations word the bounds-checking kernels set, and what each means.
const VIOLATIONS: [(i32, &str); 3] = [
    (1, "write_kv: a slot outside the KV cache"),
    (
        2,
        "paged attention: query rows outside q or a context beyond the block table",
    ),
    (4, "paged attention: a block outside the KV cache"),
];

/// What the set bits of a violations word mean.
pub fn describe_violations(bits: i32) -> Option<String> {
    let said: Vec<&str> = VIOLATIONS
        .iter()
        .filter(|(b, _)| bits & b != 0)
        .map(|(_, what)| *what)
        .collect();
    (bits != 0).then(|| said.join("; "))
}

/// A violations word as a result.
pub fn violations_result(bits: i32) -> Result<()> {
    match describe_violations(bits) {
        None => Ok(()),
        Some(what) => Err(DeviceError::OutOfBounds(what)),
    }
}

/// Element types of device buffers.
#[cfg(feature = "cuda")]
pub trait Elem:
    Copy
    + Default
    + Send
    + Sync
    + std::fmt::Debug
    + 'static
    + cudarc::driver::DeviceRepr
    + cudarc::driver::ValidAsZeroBits
{
}
/// Element types of device buffers.
#[cfg(not(feature = "cuda"))]
pub trait Elem: Copy + Default + Send + Sync + std::fmt::Debug + 'static {}

impl Elem for bf16 {}
impl Elem for f32 {}
impl Elem for i32 {}
impl Elem for i64 {}
impl Elem for u32 {}

/// The shape and paging of one paged-attention launch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PagedAttention {
    pub heads: usize,
    pub kv_heads: usize,
    /// Up to 256.
    pub head_dim: usize,
    pub block_size: usize,
    /// Entries of each group's block table.
    pub max_blocks: usize,
    /// Scores are `q·k × scale`.
    pub scale: f32,
    /// Attend only the last `window` positions (0: all).
    pub window: usize,
    /// Partitions of the context (split-K; 1: none) and keys in each, a multiple of the key
    /// tile ([`crate::shapes::attention_partitions`]).
    pub partitions: usize,
    pub partition_size: usize,
}

impl PagedAttention {
    /// What the kernel needs of its shape: an error naming the first thing it cannot do.
    pub fn check(&self) -> Result<()> {
        if self.heads == 0 || self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return Err(DeviceError::Sizes(
                "paged attention: heads must be a multiple of kv_heads",
            ));
        }
        if self.head_dim == 0 || self.head_dim > 256 {
            return Err(DeviceError::Sizes(
                "paged attention: head_dim must be 1 to 256",
            ));
        }
        if self.partitions == 0 || self.partition_size == 0 || self.block_size == 0 {
            return Err(DeviceError::Sizes(
                "paged attention: partitions, their size and the block size must be positive",
            ));
        }
        Ok(())
    }

    /// f32 values of the split-K workspace for `rows` query rows (0 without partitions).
    pub fn partial_len(&self, rows: usize) -> usize {
        if self.partitions <= 1 {
            0
        } else {
            rows * self.heads * self.partitions * (self.head_dim + 2)
        }
    }
}

/// A step's query rows as the attention kernel reads them: groups of up to `group_rows`
/// consecutive rows of one sequence (`groups`: first row, row count, position of the first row;
/// three `i32`s each), each with its sequence's block table (`tables`: `[groups, max_blocks]`,
/// entries the group's context does not reach are -1, which the kernel would refuse).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttentionPacking {
    pub groups: Vec<i32>,
    pub tables: Vec<i32>,
    pub max_blocks: usize,
    /// The longest context of any group.
    pub max_context: usize,
    pub rows: usize,
}

impl AttentionPacking {
    /// Packs sequences (their query rows consecutive, in order) for rows of `head_dim`.
    pub fn new(seqs: &[crate::cpu::SeqAttention<'_>], block_size: usize, head_dim: usize) -> Self {
        let (group_rows, _) = crate::shapes::attention_tiles(head_dim);
        let bs = block_size.max(1);
        let max_blocks = seqs
            .iter()
            .map(|s| (s.start + s.rows).div_ceil(bs))
            .max()
            .unwrap_or(0)
            .max(1);
        let mut p = Self {
            groups: Vec::new(),
            tables: Vec::new(),
            max_blocks,
            max_context: 0,
            rows: 0,
        };
        for s in seqs {
            let mut done = 0;
            while done < s.rows {
                let n = group_rows.min(s.rows - done);
                let pos = s.start + done;
                let used = (pos + n).div_ceil(bs);
                p.groups
                    .extend([(p.rows + done) as i32, n as i32, pos as i32]);
                p.tables
                    .extend((0..max_blocks).map(|b| match s.block_table.get(b) {
                        Some(&id) if b < used => id as i32,
                        _ => -1,
                    }));
                p.max_context = p.max_context.max(pos + n);
                done += n;
            }
            p.rows += s.rows;
        }
        p
    }

    pub fn group_count(&self) -> usize {
        self.groups.len() / 3
    }

    /// The launch's shape for `heads` query heads, the context split at fixed positions
    /// ([`crate::shapes::attention_partitions`]).
    pub fn shape(
        &self,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        block_size: usize,
        scale: f32,
        window: usize,
    ) -> PagedAttention {
        let (partitions, partition_size) = crate::shapes::attention_partitions(self.max_context);
        PagedAttention {
            heads,
            kv_heads,
            head_dim,
            block_size,
            max_blocks: self.max_blocks,
            scale,
            window,
            partitions,
            partition_size,
        }
    }
}

/// A compute device: its buffers, copies, GEMM and kernels. Launches are queued in order on one
/// stream; [`Device::download`] waits for what came before it.
pub trait Device: Send + Sync + std::fmt::Debug + 'static {
    /// A buffer of `T` in device memory.
    type Buf<T: Elem>: Send + Sync + std::fmt::Debug;

    /// The device's name and index, for logs (`"NVIDIA H100 80GB HBM3 (cuda:0)"`).
    fn name(&self) -> String;
    /// Free and total memory in bytes.
    fn memory(&self) -> Result<(u64, u64)>;
    /// Elements of a buffer.
    fn len<T: Elem>(&self, buf: &Self::Buf<T>) -> usize;
    /// A zeroed buffer of `n` elements.
    fn zeros<T: Elem>(&self, n: usize) -> Result<Self::Buf<T>>;
    fn upload<T: Elem>(&self, host: &[T]) -> Result<Self::Buf<T>>;
    fn download<T: Elem>(&self, buf: &Self::Buf<T>) -> Result<Vec<T>>;
    /// `dst[dst_at..dst_at + n] = src[src_at..src_at + n]`.
    fn copy<T: Elem>(
        &self,
        src: &Self::Buf<T>,
        src_at: usize,
        dst: &mut Self::Buf<T>,
        dst_at: usize,
        n: usize,
    ) -> Result<()>;

    /// `out[m, n] = x[m, k] · w[n, k]ᵀ` in bf16 with f32 accumulation (a linear layer).
    fn gemm(
        &self,
        x: &Self::Buf<bf16>,
        w: &Self::Buf<bf16>,
        out: &mut Self::Buf<bf16>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()>;

    /// `out[r] = table[ids[r] - first_id]`, zeros for ids outside the table (`[table_rows, dim]`).
    fn embedding(
        &self,
        table: &Self::Buf<bf16>,
        ids: &Self::Buf<u32>,
        out: &mut Self::Buf<bf16>,
        dim: usize,
        first_id: u32,
    ) -> Result<()>;
    /// `hidden += delta` (if any, rounded to bf16), then `out = rmsnorm(hidden) × weight` for
    /// every `dim`-wide chunk of `hidden`.
    fn add_rms_norm(
        &self,
        hidden: &mut Self::Buf<bf16>,
        delta: Option<&Self::Buf<bf16>>,
        weight: &Self::Buf<bf16>,
        out: &mut Self::Buf<bf16>,
        dim: usize,
        eps: f32,
    ) -> Result<()>;
    /// `out = rmsnorm(x) × weight` for every `dim`-wide chunk of `x`.
    fn rms_norm(
        &self,
        x: &Self::Buf<bf16>,
        weight: &Self::Buf<bf16>,
        out: &mut Self::Buf<bf16>,
        dim: usize,
        eps: f32,
    ) -> Result<()>;
    /// Rotary embedding in place of `x` = `[positions.len(), heads, head_dim]`: half-split
    /// (the model's layout) or interleaved pairs.
    fn rope(
        &self,
        x: &mut Self::Buf<bf16>,
        positions: &Self::Buf<i32>,
        inv_freq: &Self::Buf<f32>,
        heads: usize,
        head_dim: usize,
        interleaved: bool,
    ) -> Result<()>;
    /// `gate = silu(gate) × up`.
    fn silu_mul(&self, gate: &mut Self::Buf<bf16>, up: &Self::Buf<bf16>) -> Result<()>;
    /// `gate = gelu_tanh(gate) × up`.
    fn gelu_tanh_mul(&self, gate: &mut Self::Buf<bf16>, up: &Self::Buf<bf16>) -> Result<()>;
    /// `x += y`.
    fn add(&self, x: &mut Self::Buf<bf16>, y: &Self::Buf<bf16>) -> Result<()>;
    /// `x *= s`.
    fn scale(&self, x: &mut Self::Buf<bf16>, s: f32) -> Result<()>;
    /// `x[r, c] += bias[c]` for rows of `bias.len()` values.
    fn add_bias(&self, x: &mut Self::Buf<bf16>, bias: &Self::Buf<bf16>) -> Result<()>;
    /// Rows of `k` and `v` (`[slots.len(), width]`) into the caches (`[cache slots, width]`)
    /// at `slots`; a slot outside the caches is skipped and reported.
    #[allow(clippy::too_many_arguments)]
    fn write_kv(
        &self,
        k: &Self::Buf<bf16>,
        v: &Self::Buf<bf16>,
        k_cache: &mut Self::Buf<bf16>,
        v_cache: &mut Self::Buf<bf16>,
        slots: &Self::Buf<i64>,
        width: usize,
    ) -> Result<()>;
    /// Attention of the query rows of `q` (`[rows, heads, head_dim]`) packed in groups
    /// ([`AttentionPacking`]: `groups`, `tables`) over the caches, into `out`; `partial` is
    /// the split-K workspace ([`PagedAttention::partial_len`] values). A block or group outside
    /// the caches or `q` is skipped (zeros) and reported.
    #[allow(clippy::too_many_arguments)]
    fn paged_attention(
        &self,
        q: &Self::Buf<bf16>,
        k_cache: &Self::Buf<bf16>,
        v_cache: &Self::Buf<bf16>,
        tables: &Self::Buf<i32>,
        groups: &Self::Buf<i32>,
        out: &mut Self::Buf<bf16>,
        partial: &mut Self::Buf<f32>,
        shape: &PagedAttention,
    ) -> Result<()>;
    /// The index of each row's largest logit (`logits` = `[out.len(), vocab]`).
    fn argmax(&self, logits: &Self::Buf<f32>, vocab: usize, out: &mut Self::Buf<u32>)
        -> Result<()>;
    /// What the bounds-checking kernels refused since the last call (and clears it). Waits for
    /// the device.
    fn take_violations(&self) -> Result<()>;
}

/// Sizes a launch needs, as an error rather than a panic.
pub fn need(ok: bool, what: &'static str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(DeviceError::Sizes(what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn violation_bits_are_named() {
        assert_eq!(describe_violations(0), None);
        assert_eq!(
            describe_violations(1).as_deref(),
            Some("write_kv: a slot outside the KV cache")
        );
        let both = describe_violations(6).unwrap_or_default();
        assert!(
            both.contains("context beyond the block table") && both.contains("a block outside"),
            "{both}"
        );
        assert!(violations_result(0).is_ok());
        assert!(matches!(
            violations_result(4),
            Err(DeviceError::OutOfBounds(_))
        ));
    }

    #[test]
    fn attention_shapes_the_kernel_cannot_run_are_errors() {
        let ok = PagedAttention {
            heads: 8,
            kv_heads: 2,
            head_dim: 64,
            block_size: 16,
            max_blocks: 4,
            scale: 0.125,
            window: 0,
            partitions: 1,
            partition_size: 64,
        };
        assert!(ok.check().is_ok());
        assert!(PagedAttention { head_dim: 96, ..ok }.check().is_ok());
        for bad in [
            PagedAttention { head_dim: 0, ..ok },
            PagedAttention {
                head_dim: 512,
                ..ok
            },
            PagedAttention {
                partitions: 0,
                ..ok
            },
            PagedAttention { kv_heads: 3, ..ok },
            PagedAttention { kv_heads: 0, ..ok },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn query_rows_are_packed_in_groups_of_one_sequence_with_its_reached_blocks() {
        use crate::cpu::SeqAttention;
        let (a, b, c) = ([7u32, 3, 9], [4u32, 8], [1u32, 2, 6]);
        let seqs = [
            // A prompt chunk of 20 rows at positions 14..34 (head_dim 64: groups of 16).
            SeqAttention {
                rows: 20,
                start: 14,
                block_table: &a,
            },
            // A decode row at position 20: 21 positions, both blocks.
            SeqAttention {
                rows: 1,
                start: 20,
                block_table: &b,
            },
            // A decode row at position 40: three blocks, the widest table.
            SeqAttention {
                rows: 1,
                start: 40,
                block_table: &c,
            },
        ];
        let p = AttentionPacking::new(&seqs, 16, 64);
        assert_eq!(p.max_blocks, 3);
        assert_eq!(p.rows, 22);
        assert_eq!(p.max_context, 41);
        assert_eq!(
            p.groups,
            vec![0, 16, 14, 16, 4, 30, 20, 1, 20, 21, 1, 40],
            "rows 0..16 at 14, rows 16..20 at 30, then one row each"
        );
        assert_eq!(
            &p.tables[0..3],
            &[7, 3, -1],
            "positions up to 29: two blocks"
        );
        assert_eq!(&p.tables[3..6], &[7, 3, 9], "positions up to 33: three");
        assert_eq!(&p.tables[6..9], &[4, 8, -1]);
        assert_eq!(&p.tables[9..12], &[1, 2, 6]);
        let shape = p.shape(8, 2, 64, 16, 0.125, 0);
        assert_eq!((shape.partitions, shape.max_blocks), (1, 3));
        assert_eq!(shape.partial_len(22), 0);
        // Groups of 8 rows for a head of 256.
        let wide = AttentionPacking::new(&seqs[..1], 16, 256);
        assert_eq!(wide.groups, vec![0, 8, 14, 8, 8, 22, 16, 4, 30]);
    }
}
