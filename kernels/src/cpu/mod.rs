//! CPU reference kernels (f32). Rows are contiguous, row-major; shapes are passed explicitly.

mod attention;
mod matmul;
mod ops;

pub use attention::{paged_attention, write_kv, AttentionShape, PagedKv, SeqAttention};
pub use matmul::{linear, PackedMatrix};
/// The instruction set the CPU kernels use on this machine (chosen at run time): `avx2+fma`
/// for the vectorised matmul and attention kernels, else `portable` (plain Rust).
pub fn isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        return "avx2+fma";
    }
    "portable"
}

pub use ops::{
    add_assign, argmax, gelu_tanh_mul, rms_norm, rope_neox, scale, silu_mul, softmax_in_place,
};
