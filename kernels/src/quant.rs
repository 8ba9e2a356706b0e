//! GGML tensor types and their dequantisation to f32.
//!
//! Block layouts follow ggml: a `Q4_0` block is an f16 scale and 16 bytes holding 32 4-bit values
//! (low nibbles are elements 0..16, high nibbles 16..32); `Q4_1` adds an f16 minimum; `Q8_0` is an
//! f16 scale and 32 signed bytes.

use half::{bf16, f16};

/// The tensor types Gristmill can read, with their ggml type ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    BF16,
}

impl GgmlType {
    /// Maps a ggml type id; `None` for types Gristmill does not read (yet).
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            30 => Self::BF16,
            _ => return None,
        })
    }

    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 8,
            Self::BF16 => 30,
        }
    }

    /// Name of a ggml type id, including the ones Gristmill cannot read, for error messages.
    pub fn name_of_id(id: u32) -> &'static str {
        const NAMES: [&str; 31] = [
            "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K",
            "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S",
            "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M",
            "BF16",
        ];
        NAMES.get(id as usize).copied().unwrap_or("unknown")
    }

    /// Elements per block.
    pub fn block_len(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q8_0 => 32,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }

    /// Bytes taken by `n` elements, or `None` if `n` is not a whole number of blocks.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_len()) {
            return None;
        }
        (n / self.block_len()).checked_mul(self.block_bytes())
    }
}

/// Dequantises `src` (whole blocks of `ty`) into `dst`; `dst.len()` elements are produced.
///
/// # Panics
/// If `src` does not hold exactly `dst.len()` elements of `ty` (callers check sizes first).
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    assert_eq!(
        Some(src.len()),
        ty.bytes_for(dst.len()),
        "dequantize: size mismatch for {ty:?}"
    );
    let f16_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    match ty {
        GgmlType::F32 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            }
        }
        GgmlType::F16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = f16::from_le_bytes([s[0], s[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = bf16::from_le_bytes([s[0], s[1]]).to_f32();
            }
        }
        GgmlType::Q4_0 => {
            for (d, b) in dst.chunks_exact_mut(32).zip(src.chunks_exact(18)) {
                let scale = f16_at(b, 0);
                for (i, &q) in b[2..18].iter().enumerate() {
                    d[i] = ((q & 0x0f) as i32 - 8) as f32 * scale;
                    d[i + 16] = ((q >> 4) as i32 - 8) as f32 * scale;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (d, b) in dst.chunks_exact_mut(32).zip(src.chunks_exact(20)) {
                let scale = f16_at(b, 0);
                let min = f16_at(b, 2);
                for (i, &q) in b[4..20].iter().enumerate() {
                    d[i] = (q & 0x0f) as f32 * scale + min;
                    d[i + 16] = (q >> 4) as f32 * scale + min;
                }
            }
        }
        GgmlType::Q8_0 => {
            for (d, b) in dst.chunks_exact_mut(32).zip(src.chunks_exact(34)) {
                let scale = f16_at(b, 0);
                for (x, &q) in d.iter_mut().zip(&b[2..34]) {
                    *x = (q as i8) as f32 * scale;
                }
            }
        }
    }
}

/// Quantises f32 values into whole blocks of `ty` the way ggml's reference quantisers do.
/// Used to write test models; round-trips with [`dequantize`].
pub fn quantize(ty: GgmlType, src: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ty.bytes_for(src.len()).unwrap_or(0));
    match ty {
        GgmlType::F32 => src
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        GgmlType::F16 => src
            .iter()
            .for_each(|x| out.extend_from_slice(&f16::from_f32(*x).to_le_bytes())),
        GgmlType::BF16 => src
            .iter()
            .for_each(|x| out.extend_from_slice(&bf16::from_f32(*x).to_le_bytes())),
        GgmlType::Q8_0 => {
            for b in src.chunks(32) {
                let amax = b.iter().fold(0f32, |m, x| m.max(x.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend(b.iter().map(|x| (x * id).round() as i8 as u8));
            }
        }
        GgmlType::Q4_0 => {
            for b in src.chunks(32) {
                // ggml: the scale maps the value of largest magnitude to -8.
                let max = b
                    .iter()
                    .fold(0f32, |m, &x| if x.abs() > m.abs() { x } else { m });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                let q = |x: f32| ((x * id + 8.5) as i32).clamp(0, 15) as u8;
                out.extend((0..16).map(|i| q(b[i]) | (q(b[i + 16]) << 4)));
            }
        }
        GgmlType::Q4_1 => {
            for b in src.chunks(32) {
                let min = b.iter().copied().fold(f32::INFINITY, f32::min);
                let max = b.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                let q = |x: f32| (((x - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                out.extend((0..16).map(|i| q(b[i]) | (q(b[i + 16]) << 4)));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_block_layout_matches_ggml() {
        // scale 0.5, min -1: value = q * 0.5 - 1; low nibble -> element i, high -> i + 16.
        let mut block = Vec::new();
        block.extend_from_slice(&f16::from_f32(0.5).to_le_bytes());
        block.extend_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        block.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
        let mut out = [0f32; 32];
        dequantize(GgmlType::Q4_1, &block, &mut out);
        for i in 0..16 {
            assert_eq!(out[i], i as f32 * 0.5 - 1.0);
            assert_eq!(out[i + 16], (15 - i) as f32 * 0.5 - 1.0);
        }
    }

    #[test]
    fn q4_0_and_q8_0_layouts_match_ggml() {
        let mut block = f16::from_f32(2.0).to_le_bytes().to_vec();
        block.extend((0..16u8).map(|i| i | (i << 4)));
        let mut out = [0f32; 32];
        dequantize(GgmlType::Q4_0, &block, &mut out);
        assert_eq!(out[0], -16.0);
        assert_eq!(out[15], 14.0);
        assert_eq!(out[31], 14.0);

        let mut block = f16::from_f32(0.25).to_le_bytes().to_vec();
        block.extend((0..32i8).map(|i| (i - 16) as u8));
        dequantize(GgmlType::Q8_0, &block, &mut out);
        assert_eq!(out[0], -4.0);
        assert_eq!(out[31], 3.75);
    }

    #[test]
    fn quantize_round_trips_within_a_step() {
        let src: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 64) as f32 - 30.0) / 7.0)
            .collect();
        for (ty, tol) in [
            (GgmlType::F32, 0.0),
            (GgmlType::F16, 5e-3),
            (GgmlType::BF16, 4e-2),
            (GgmlType::Q8_0, 0.04),
            (GgmlType::Q4_0, 0.6),
            (GgmlType::Q4_1, 0.3),
        ] {
            let bytes = quantize(ty, &src);
            assert_eq!(Some(bytes.len()), ty.bytes_for(src.len()));
            let mut back = vec![0f32; src.len()];
            dequantize(ty, &bytes, &mut back);
            for (a, b) in src.iter().zip(&back) {
                assert!((a - b).abs() <= tol, "{ty:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn type_ids_round_trip_and_unknown_ids_are_named() {
        for ty in [
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q8_0,
            GgmlType::BF16,
        ] {
            assert_eq!(GgmlType::from_id(ty.id()), Some(ty));
        }
        assert_eq!(GgmlType::from_id(12), None);
        assert_eq!(GgmlType::name_of_id(12), "Q4_K");
        assert_eq!(GgmlType::name_of_id(999), "unknown");
    }
}
