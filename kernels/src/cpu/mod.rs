//! CPU reference kernels (f32). Rows are contiguous, row-major; shapes are passed explicitly.

mod attention;
mod matmul;
mod ops;

pub use attention::{paged_attention, write_kv, AttentionShape, PagedKv, SeqAttention};
pub use matmul::{linear, PackedMatrix};
pub use ops::{add_assign, argmax, rms_norm, rope_neox, silu_mul, softmax_in_place};
