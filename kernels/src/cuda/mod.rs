//! CUDA C kernels, compiled at run time by NVRTC for the device's compute capability.
//!
//! The sources are embedded (`include_str!`); [`compile`] turns one into PTX. Without a GPU,
//! every source is still compiled for sm_80 and sm_90 in the tests (`tests/nvrtc.rs`), with
//! NVRTC and the CUDA headers from pinned pip wheels (`scripts/fetch-tools.sh`). Typed launch
//! wrappers are in [`launch`]; each kernel's comment states its grid, block and shared-memory
//! contract. [`device::CudaDevice`] adds cuBLAS and implements [`crate::device::Device`] for the GPU
//! backend (`gristmill_engine::gpu`).

use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};

pub mod device;
pub mod launch;

/// One `.cu` file and the `extern "C"` kernels it defines.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    pub file: &'static str,
    pub source: &'static str,
    pub functions: &'static [&'static str],
}

/// Every kernel source of the CUDA backend.
pub const SOURCES: &[KernelSource] = &[
    KernelSource {
        file: "embedding.cu",
        source: include_str!("embedding.cu"),
        functions: &["embedding_bf16"],
    },
    KernelSource {
        file: "rms_norm.cu",
        source: include_str!("rms_norm.cu"),
        functions: &["add_rms_norm_bf16"],
    },
    KernelSource {
        file: "rope.cu",
        source: include_str!("rope.cu"),
        functions: &["rope_bf16"],
    },
    KernelSource {
        file: "silu_mul.cu",
        source: include_str!("silu_mul.cu"),
        functions: &["silu_mul_bf16"],
    },
    KernelSource {
        file: "elementwise.cu",
        source: include_str!("elementwise.cu"),
        functions: &[
            "add_bf16",
            "scale_bf16",
            "gelu_tanh_mul_bf16",
            "add_bias_bf16",
        ],
    },
    KernelSource {
        file: "write_kv.cu",
        source: include_str!("write_kv.cu"),
        functions: &["write_kv_bf16"],
    },
    KernelSource {
        file: "attention.cu",
        source: include_str!("attention.cu"),
        functions: &["paged_attention_bf16", "attention_combine_bf16"],
    },
    KernelSource {
        file: "argmax.cu",
        source: include_str!("argmax.cu"),
        functions: &["argmax_f32"],
    },
];

/// Whether NVRTC can be loaded (it is looked up on `LD_LIBRARY_PATH` at run time).
pub fn nvrtc_available() -> bool {
    // SAFETY: only opens (dlopen) and closes the NVRTC library to see whether it exists.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compiles `src` to PTX for `arch` (`"sm_90"`, `"compute_80"`, ...), with the CUDA headers
/// found in `include_dirs`. Errors carry NVRTC's log.
pub fn compile(
    src: &KernelSource,
    arch: &'static str,
    include_dirs: &[String],
) -> Result<Ptx, String> {
    if !nvrtc_available() {
        return Err("NVRTC (libnvrtc) is not on the library path".into());
    }
    let opts = CompileOptions {
        arch: Some(arch),
        include_paths: include_dirs.to_vec(),
        name: Some(src.file.to_string()),
        // Exact IEEE division and square roots: the CPU reference does not use fast math.
        use_fast_math: Some(false),
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    compile_ptx_with_opts(src.source, opts).map_err(|e| format!("{}: {e:?}", src.file))
}
