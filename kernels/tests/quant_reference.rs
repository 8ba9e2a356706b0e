//! Dequantisation is bit-identical to the reference: the blocks in
//! `tests/fixtures/quant_blocks.json` (random and, where made, from llama-quantize's files) with
//! the f32 values gguf-py's dequantisers give for them (`scripts/make_quant_fixtures.py`).

use gristmill_kernels::cpu::{linear, PackedMatrix};
use gristmill_kernels::quant::{dequantize, GgmlType};

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// The fixture's cases: (type name, source, blocks, reference values).
fn cases() -> Vec<(String, String, Vec<u8>, Vec<f32>)> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/quant_blocks.json"
    );
    let text = std::fs::read_to_string(path).expect("the fixture is committed");
    let doc: serde_json::Value = serde_json::from_str(&text).expect("json");
    doc["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| {
            let values = hex(c["values_f32le"].as_str().expect("values"))
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (
                c["type"].as_str().expect("type").to_string(),
                c["source"].as_str().expect("source").to_string(),
                hex(c["blocks"].as_str().expect("blocks")),
                values,
            )
        })
        .collect()
}

fn ty(name: &str) -> GgmlType {
    GgmlType::ALL
        .into_iter()
        .find(|t| t.name() == name)
        .unwrap_or_else(|| panic!("no type {name}"))
}

#[test]
fn dequantisation_is_bit_identical_to_gguf_py() {
    let cases = cases();
    let mut seen = std::collections::BTreeSet::new();
    for (name, source, blocks, want) in &cases {
        let t = ty(name);
        let mut got = vec![0f32; want.len()];
        dequantize(t, blocks, &mut got);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{name} ({source}) element {i}: {g} vs the reference's {w}"
            );
        }
        seen.insert(name.clone());
    }
    for t in GgmlType::ALL
        .into_iter()
        .filter(|t| t.sub_blocks().is_some())
    {
        assert!(
            seen.contains(t.name()),
            "no reference blocks for {}",
            t.name()
        );
    }
}

#[test]
fn the_quantised_matmul_agrees_with_the_reference_values_bit_for_bit() {
    for (name, source, blocks, want) in cases() {
        let t = ty(&name);
        // The fixture's blocks as one row of a matrix with k = all its values.
        let k = want.len();
        let q = PackedMatrix::pack_quantized(t, &blocks, 1, k).expect("packs");
        let f = PackedMatrix::pack(&want, 1, k);
        let x: Vec<f32> = (0..3 * k)
            .map(|i| ((i * 7919 % 97) as f32 - 48.0) / 50.0)
            .collect();
        for m in [1, 3] {
            let (mut a, mut b) = (vec![0f32; m], vec![0f32; m]);
            linear(&x[..m * k], m, &q, &mut a);
            linear(&x[..m * k], m, &f, &mut b);
            assert_eq!(a, b, "{name} ({source}) m={m}");
        }
    }
}
