//! Every CUDA kernel compiles to PTX for sm_80 (A100) and sm_90 (H100/H200) with NVRTC — no GPU
//! needed. `make test` provides NVRTC and the headers from pinned pip wheels and sets
//! `GRISTMILL_REQUIRE_NVRTC=1`, so there a missing NVRTC fails instead of skipping.

#![cfg(feature = "cuda")]

use gristmill_kernels::cuda::launch::include_dirs;
use gristmill_kernels::cuda::{compile, nvrtc_available, SOURCES};

#[test]
fn every_kernel_compiles_to_ptx_for_sm80_and_sm90() {
    if !nvrtc_available() {
        assert!(
            std::env::var("GRISTMILL_REQUIRE_NVRTC").is_err(),
            "NVRTC is required here but libnvrtc is not on LD_LIBRARY_PATH"
        );
        eprintln!("skipped: NVRTC (libnvrtc) is not on LD_LIBRARY_PATH; `make test` provides it");
        return;
    }
    let dirs = include_dirs();
    for arch in ["sm_80", "sm_90"] {
        for src in SOURCES {
            let ptx = compile(src, arch, &dirs).unwrap_or_else(|e| panic!("{arch}: {e}"));
            let text = ptx.to_src();
            assert!(
                text.contains(&format!(".target {arch}")),
                "{} for {arch}: no target line",
                src.file
            );
            for f in src.functions {
                assert!(
                    text.contains(&format!(".entry {f}(")),
                    "{}: no kernel {f} in the PTX for {arch}",
                    src.file
                );
            }
        }
    }
}
