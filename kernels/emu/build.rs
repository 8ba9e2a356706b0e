//! Compiles every `.cu` kernel of `kernels/src/cuda/` as C++ against `include/` (the CUDA
//! emulation header and an emulated `cuda_bf16.h`), plus `launchers.cpp`. The only rewrite of
//! the sources: `extern __shared__ T name[];` becomes a pointer to the block's emulated shared
//! memory (C++ has no per-block storage class); any other `__shared__` stops the build, so a
//! new kind of kernel cannot slip through unemulated.

use std::path::{Path, PathBuf};

fn main() {
    let here = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("manifest dir"));
    let sources = here.join("../src/cuda");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("out dir"));
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++20")
        .include(here.join("include"))
        .flag("-pthread")
        .warnings(false)
        .opt_level(2)
        .file(here.join("launchers.cpp"));
    println!("cargo:rerun-if-changed=launchers.cpp");
    println!("cargo:rerun-if-changed=include");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&sources)
        .expect("kernels/src/cuda")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    names.sort();
    for path in names {
        println!("cargo:rerun-if-changed={}", path.display());
        let text = std::fs::read_to_string(&path).expect("kernel source");
        let cpp = rewrite(&text, &path);
        let name = path
            .file_stem()
            .expect("name")
            .to_string_lossy()
            .to_string();
        let dst = out.join(format!("{name}.cpp"));
        std::fs::write(&dst, format!("#include \"cuda_emu.h\"\n{cpp}")).expect("write");
        build.file(dst);
    }
    build.compile("gristmill_kernels_emu");
    println!("cargo:rustc-link-lib=stdc++");
}

fn rewrite(text: &str, path: &Path) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("extern __shared__ ") {
            // `T name[];`
            let (ty, name) = rest
                .trim_end_matches(';')
                .trim_end_matches("[]")
                .rsplit_once(' ')
                .unwrap_or_else(|| {
                    panic!("{}: unreadable shared declaration {t:?}", path.display())
                });
            out.push_str(&format!(
                "  {ty}* {name} = reinterpret_cast<{ty}*>(emu::shared_memory.data());\n"
            ));
        } else {
            assert!(
                !line.contains("__shared__"),
                "{}: a __shared__ form the emulator does not handle: {t:?}",
                path.display()
            );
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}
