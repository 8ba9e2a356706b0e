//! CPU reference kernels (f32). Rows are contiguous, row-major; shapes are passed explicitly.

mod attention;
pub mod fastmath;
pub mod int8;
mod matmul;
mod ops;

pub use attention::{paged_attention, write_kv, AttentionShape, PagedKv, SeqAttention};
pub use matmul::{linear, linear_with, PackedMatrix};
/// The instruction sets the CPU kernels use on this machine (chosen at run time): for the f32
/// kernels (the `exact` precision, attention and everything but the `fast` matmul) `avx2+fma`,
/// else `portable`; for the int8 matmul of the `fast` precision, [`int8::Isa::chosen`].
pub fn isa() -> String {
    #[cfg(target_arch = "x86_64")]
    let f32_isa = if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        "avx2+fma"
    } else {
        "portable"
    };
    #[cfg(not(target_arch = "x86_64"))]
    let f32_isa = "portable";
    format!("f32 {f32_isa}, int8 {}", int8::Isa::chosen().name())
}

pub use ops::{
    add_assign, argmax, gelu_tanh_mul, rms_norm, rope_neox, scale, silu_mul, softmax_in_place,
};
