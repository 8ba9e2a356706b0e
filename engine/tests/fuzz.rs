//! Hostile checkpoints: the GGUF reader and the safetensors reader, fed their seeds and
//! thousands of deterministic mutants of them (`fuzz/mutate.rs`), never panic and never make
//! an allocation over 256 MB; every input is read or refused with a message. Inputs that once
//! failed live in `fuzz/corpus/{gguf,safetensors}/` and are replayed first.

#[path = "../../fuzz/mutate.rs"]
mod mutate;

use std::sync::atomic::{AtomicUsize, Ordering};

use gristmill_engine::weights::{GgufFile, GgufWriter, MetaValue, SafetensorsDir};
use gristmill_kernels::quant::GgmlType;

#[global_allocator]
static ALLOC: mutate::CappedAlloc = mutate::CappedAlloc;

/// A small GGUF with metadata of every kind and a tensor of every type the reader knows.
fn gguf_seed() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::String("llama".into()))
        .meta("general.alignment", MetaValue::Int(32))
        .meta("llama.block_count", MetaValue::Int(1))
        .meta("llama.rope.freq_base", MetaValue::Float(10000.0))
        .meta("tokenizer.ggml.add_bos_token", MetaValue::Bool(true))
        .meta(
            "tokenizer.ggml.tokens",
            MetaValue::Array(vec![
                MetaValue::String("<s>".into()),
                MetaValue::String("ü".into()),
            ]),
        )
        .meta(
            "nested",
            MetaValue::Array(vec![MetaValue::Array(vec![MetaValue::Int(-1)])]),
        );
    let data: Vec<f32> = (0..64).map(|i| i as f32 * 0.25 - 3.0).collect();
    for (i, ty) in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
    ]
    .into_iter()
    .enumerate()
    {
        w.tensor(&format!("t{i}.weight"), &[2, 32], ty, &data);
    }
    w.to_bytes()
}

fn safetensors_seeds() -> Vec<Vec<u8>> {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let mut seeds: Vec<Vec<u8>> = mutate::corpus("safetensors")
        .into_iter()
        .map(|(_, d)| d)
        .collect();
    for f in [
        "tiny-qwen2/model-00001-of-00010.safetensors",
        "tiny-qwen2/model-00006-of-00010.safetensors",
    ] {
        seeds.push(std::fs::read(fixtures.join(f)).expect("fixture"));
    }
    seeds
}

#[test]
fn the_gguf_reader_reads_or_refuses_every_input() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fuzz.gguf");
    let mut seeds: Vec<Vec<u8>> = mutate::corpus("gguf").into_iter().map(|(_, d)| d).collect();
    let seed = gguf_seed();
    std::fs::write(&path, &seed).expect("write");
    let f = GgufFile::open(&path).expect("the seed is a valid GGUF file");
    assert_eq!(f.tensors.len(), 6);
    for (name, t) in &f.tensors {
        f.tensor_f32(name, &t.shape())
            .expect("the seed's tensors read");
    }
    seeds.push(seed);
    let dictionary: &[&[u8]] = &[
        b"GGUF",
        &[3, 0, 0, 0],
        &[0xff; 8],
        &[0; 8],
        b"general.alignment",
    ];
    let (opened, read) = (AtomicUsize::new(0), AtomicUsize::new(0));
    mutate::run("gguf", &seeds, 3000, dictionary, |bytes| {
        std::fs::write(&path, bytes).expect("write");
        match GgufFile::open(&path) {
            Ok(f) => {
                opened.fetch_add(1, Ordering::Relaxed);
                let tensors: Vec<(String, Vec<usize>)> = f
                    .tensors
                    .iter()
                    .map(|(n, t)| (n.clone(), t.shape()))
                    .collect();
                for (name, shape) in tensors {
                    if let Err(e) = f.tensor_raw(&name, &shape) {
                        assert!(!e.to_string().is_empty());
                    }
                    // Only tensors the file can hold are expanded (their size is checked).
                    match f.tensor_f32(&name, &shape) {
                        Ok(_) => {
                            read.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => assert!(!e.to_string().is_empty()),
                    }
                }
            }
            Err(e) => {
                if std::env::var("FUZZ_DEBUG").is_ok() {
                    eprintln!("{e}");
                }
                assert!(!e.to_string().is_empty())
            }
        }
    });
    // The mutants reach past the header, not only into its first bytes.
    let (opened, read) = (opened.into_inner(), read.into_inner());
    eprintln!("gguf: {opened} files opened, {read} tensors read");
    assert!(
        opened > 300 && read > 1000,
        "{opened} files opened, {read} tensors read"
    );
}

#[test]
fn the_safetensors_reader_reads_or_refuses_every_input() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("model.safetensors");
    let dictionary: &[&[u8]] = &[
        b"\"dtype\":\"F32\"",
        b"\"shape\":[4294967296,4294967296]",
        b"\"data_offsets\":[0,18446744073709551615]",
        b"{",
        b"}",
        &[0xff; 8],
    ];
    let (opened, read) = (AtomicUsize::new(0), AtomicUsize::new(0));
    mutate::run(
        "safetensors",
        &safetensors_seeds(),
        2000,
        dictionary,
        |bytes| {
            std::fs::write(&file, bytes).expect("write");
            match SafetensorsDir::open(dir.path()) {
                Ok(st) => {
                    opened.fetch_add(1, Ordering::Relaxed);
                    let tensors: Vec<(String, Vec<usize>)> = st
                        .tensors()
                        .map(|(n, s)| (n.to_string(), s.to_vec()))
                        .collect();
                    for (name, shape) in tensors {
                        match st.tensor_f32(&name, &shape) {
                            Ok(_) => {
                                read.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => assert!(!e.to_string().is_empty()),
                        }
                    }
                }
                Err(e) => assert!(!e.to_string().is_empty()),
            }
        },
    );
    let (opened, read) = (opened.into_inner(), read.into_inner());
    eprintln!("safetensors: {opened} files opened, {read} tensors read");
    assert!(
        opened > 300 && read > 300,
        "{opened} files opened, {read} tensors read"
    );
}
