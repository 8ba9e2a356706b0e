//! GGML tensor types and their dequantisation to f32.
//!
//! Block layouts follow ggml: a `Q4_0` block is an f16 scale and 16 bytes holding 32 4-bit values
//! (low nibbles are elements 0..16, high nibbles 16..32); `Q4_1` adds an f16 minimum; `Q8_0` is an
//! f16 scale and 32 signed bytes; `Q5_0`/`Q5_1` add a 32-bit word of fifth bits. The K-quants
//! (`Q2_K` … `Q6_K`) hold 256 values in super-blocks with an f16 scale (and minimum) and 6- or
//! 8-bit sub-block scales of 16 or 32 values; `IQ4_NL`/`IQ4_XS` are 4-bit indices into a fixed
//! non-linear table, with an f16 scale per 32 values (IQ4_NL) or 6-bit scales per 32 in a
//! 256-value super-block (IQ4_XS).
//!
//! Every quantised type is read the same way ([`decode_block`]): a block is small integers `v`,
//! and per sub-block a scale `d` and, for types with minima, an offset `m`; the weight is
//! `v * d` or `v * d + m`, a multiply then an add in f32. `d` and `m` are computed in f32 exactly
//! as ggml's and the `gguf` Python package's reference dequantisers compute them (`d * sc`,
//! `-(dmin * m)`), so [`dequantize`] is bit-identical to them (tested on committed blocks), and
//! so is the matmul that expands the same values in registers.

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
    Q5_0,
    Q5_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    IQ4NL,
    IQ4XS,
}

/// The 16 values a 4-bit index picks in IQ4_NL and IQ4_XS blocks (ggml's `kvalues_iq4nl`).
const IQ4_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// Values per K-quant super-block.
pub const QK_K: usize = 256;

impl GgmlType {
    /// Maps a ggml type id; `None` for types Gristmill does not read (yet).
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            10 => Self::Q2K,
            11 => Self::Q3K,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            20 => Self::IQ4NL,
            23 => Self::IQ4XS,
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
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q2K => 10,
            Self::Q3K => 11,
            Self::Q4K => 12,
            Self::Q5K => 13,
            Self::Q6K => 14,
            Self::IQ4NL => 20,
            Self::IQ4XS => 23,
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
            Self::Q4_0 | Self::Q4_1 | Self::Q8_0 | Self::Q5_0 | Self::Q5_1 | Self::IQ4NL => 32,
            Self::Q2K | Self::Q3K | Self::Q4K | Self::Q5K | Self::Q6K | Self::IQ4XS => QK_K,
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
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q2K => 84,
            Self::Q3K => 110,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
            Self::IQ4NL => 18,
            Self::IQ4XS => 136,
        }
    }

    /// Bytes taken by `n` elements, or `None` if `n` is not a whole number of blocks.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_len()) {
            return None;
        }
        (n / self.block_len()).checked_mul(self.block_bytes())
    }

    /// The ggml name (`Q4_K`, …).
    pub fn name(self) -> &'static str {
        Self::name_of_id(self.id())
    }

    /// Every type Gristmill reads.
    pub const ALL: [GgmlType; 15] = [
        Self::F32,
        Self::F16,
        Self::BF16,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q2K,
        Self::Q3K,
        Self::Q4K,
        Self::Q5K,
        Self::Q6K,
        Self::IQ4NL,
        Self::IQ4XS,
    ];

    /// How a block of this type decodes, for the quantised types; `None` for F32, F16, BF16.
    pub fn sub_blocks(self) -> Option<SubBlocks> {
        let (len, min) = match self {
            Self::F32 | Self::F16 | Self::BF16 => return None,
            Self::Q4_0 | Self::Q8_0 | Self::Q5_0 | Self::IQ4NL | Self::IQ4XS => (32, false),
            Self::Q4_1 | Self::Q5_1 | Self::Q4K | Self::Q5K => (32, true),
            Self::Q3K | Self::Q6K => (16, false),
            Self::Q2K => (16, true),
        };
        Some(SubBlocks { len, min })
    }
}

/// The shape of a quantised type's blocks as [`decode_block`] gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubBlocks {
    /// Values per scale (16 or 32).
    pub len: usize,
    /// Whether each sub-block has an offset `m` (the weight is `v * d + m`).
    pub min: bool,
}

/// The f16 at `b[i..i + 2]`, as f32.
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// The 6-bit scale and minimum of sub-block `j` (0..8) of a Q4_K/Q5_K block's 12 scale bytes.
fn k_scale_min(sc: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (sc[j] & 63, sc[j + 4] & 63)
    } else {
        (
            (sc[j + 4] & 0x0f) | ((sc[j - 4] >> 6) << 4),
            (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4),
        )
    }
}

/// Decodes one block of a quantised `ty` into its integer values `v` (one per element, all
/// within -128..=127) and per sub-block its scale `d` and offset `m` (0 for types without
/// minima): element `e` is `v[e] * d[e / len] + m[e / len]` (without the `+ m` when the type has
/// no minima). `v` holds `ty.block_len()` values, `d` and `m` one per sub-block.
///
/// # Panics
/// If `ty` is not quantised or a slice is too short (callers size them from `ty`).
pub fn decode_block(ty: GgmlType, b: &[u8], v: &mut [i8], d: &mut [f32], m: &mut [f32]) {
    assert!(b.len() >= ty.block_bytes() && v.len() >= ty.block_len());
    match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            panic!("decode_block: {ty:?} is not a quantised type")
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let qs = &b[b.len() - 16..];
            d[0] = f16_at(b, 0);
            let off = if ty == GgmlType::Q4_0 { 8 } else { 0 };
            if ty == GgmlType::Q4_1 {
                m[0] = f16_at(b, 2);
            }
            for (i, &q) in qs.iter().enumerate() {
                v[i] = (q & 0x0f) as i8 - off;
                v[i + 16] = (q >> 4) as i8 - off;
            }
        }
        GgmlType::Q8_0 => {
            d[0] = f16_at(b, 0);
            for (x, &q) in v.iter_mut().zip(&b[2..34]) {
                *x = q as i8;
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let at = if ty == GgmlType::Q5_0 { 2 } else { 4 };
            d[0] = f16_at(b, 0);
            if ty == GgmlType::Q5_1 {
                m[0] = f16_at(b, 2);
            }
            let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
            let off = if ty == GgmlType::Q5_0 { 16 } else { 0 };
            for (i, &q) in b[at + 4..at + 20].iter().enumerate() {
                let h0 = ((qh >> i) & 1) as u8;
                let h1 = ((qh >> (i + 16)) & 1) as u8;
                v[i] = ((q & 0x0f) | (h0 << 4)) as i8 - off;
                v[i + 16] = ((q >> 4) | (h1 << 4)) as i8 - off;
            }
        }
        GgmlType::Q2K => {
            let (scales, qs) = (&b[0..16], &b[16..80]);
            let (dd, dmin) = (f16_at(b, 80), f16_at(b, 82));
            for (j, &s) in scales.iter().enumerate() {
                d[j] = dd * (s & 0x0f) as f32;
                m[j] = -(dmin * (s >> 4) as f32);
            }
            for (e, ve) in v.iter_mut().enumerate().take(QK_K) {
                let (h, s, l) = (e / 128, (e / 32) % 4, e % 32);
                *ve = ((qs[h * 32 + l] >> (2 * s)) & 3) as i8;
            }
        }
        GgmlType::Q3K => {
            let (hmask, qs, sc) = (&b[0..32], &b[32..96], &b[96..108]);
            let dd = f16_at(b, 108);
            for (j, dj) in d.iter_mut().enumerate().take(16) {
                let lo = if j < 8 { sc[j] & 0x0f } else { sc[j - 8] >> 4 };
                let hi = (sc[8 + j % 4] >> (2 * (j / 4))) & 3;
                *dj = dd * (((lo | (hi << 4)) as i8) - 32) as f32;
            }
            for (e, ve) in v.iter_mut().enumerate().take(QK_K) {
                let (h, s, l) = (e / 128, (e / 32) % 4, e % 32);
                let low = ((qs[h * 32 + l] >> (2 * s)) & 3) as i8;
                let high = (hmask[l] >> (e / 32)) & 1;
                *ve = low - if high == 1 { 0 } else { 4 };
            }
        }
        GgmlType::Q4K | GgmlType::Q5K => {
            let (dd, dmin, sc) = (f16_at(b, 0), f16_at(b, 2), &b[4..16]);
            for j in 0..8 {
                let (s, mm) = k_scale_min(sc, j);
                d[j] = dd * s as f32;
                m[j] = -(dmin * mm as f32);
            }
            let (qh, qs) = if ty == GgmlType::Q5K {
                (Some(&b[16..48]), &b[48..176])
            } else {
                (None, &b[16..144])
            };
            for (e, ve) in v.iter_mut().enumerate().take(QK_K) {
                let (c, s, l) = (e / 64, (e / 32) % 2, e % 32);
                let low = (qs[c * 32 + l] >> (4 * s)) & 0x0f;
                let high = qh.map_or(0, |qh| ((qh[l] >> (e / 32)) & 1) << 4);
                *ve = (low | high) as i8;
            }
        }
        GgmlType::IQ4NL => {
            d[0] = f16_at(b, 0);
            for (i, &q) in b[2..18].iter().enumerate() {
                v[i] = IQ4_VALUES[(q & 0x0f) as usize];
                v[i + 16] = IQ4_VALUES[(q >> 4) as usize];
            }
        }
        GgmlType::IQ4XS => {
            let dd = f16_at(b, 0);
            let scales_h = u16::from_le_bytes([b[2], b[3]]);
            let (scales_l, qs) = (&b[4..8], &b[8..136]);
            for (j, dj) in d.iter_mut().enumerate().take(8) {
                let lo = (scales_l[j / 2] >> (4 * (j % 2))) & 0x0f;
                let hi = ((scales_h >> (2 * j)) & 3) as u8;
                *dj = dd * (((lo | (hi << 4)) as i8) - 32) as f32;
            }
            for (e, ve) in v.iter_mut().enumerate().take(QK_K) {
                let (j, t) = (e / 32, e % 32);
                *ve = IQ4_VALUES[((qs[j * 16 + t % 16] >> (4 * (t / 16))) & 0x0f) as usize];
            }
        }
        GgmlType::Q6K => {
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            let dd = f16_at(b, 208);
            for (j, dj) in d.iter_mut().enumerate().take(16) {
                *dj = dd * (sc[j] as i8) as f32;
            }
            for (e, ve) in v.iter_mut().enumerate().take(QK_K) {
                let (h, r) = (e / 128, e % 128);
                let low = (ql[h * 64 + r % 64] >> (4 * (r / 64))) & 0x0f;
                let high = (qh[h * 32 + r % 32] >> (2 * (r / 32))) & 3;
                *ve = (low | (high << 4)) as i8 - 32;
            }
        }
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
        _ => {
            let Some(sb) = ty.sub_blocks() else {
                unreachable!("every type without sub-blocks is matched above")
            };
            let (len, bb) = (ty.block_len(), ty.block_bytes());
            let mut v = [0i8; QK_K];
            let (mut d, mut m) = ([0f32; QK_K / 16], [0f32; QK_K / 16]);
            for (out, b) in dst.chunks_exact_mut(len).zip(src.chunks_exact(bb)) {
                decode_block(ty, b, &mut v, &mut d, &mut m);
                for (e, o) in out.iter_mut().enumerate() {
                    let j = e / sb.len;
                    // A multiply, then an add: the reference's two roundings.
                    *o = if sb.min {
                        v[e] as f32 * d[j] + m[j]
                    } else {
                        v[e] as f32 * d[j]
                    };
                }
            }
        }
    }
}

/// Random blocks of a quantised `ty`, for tests (GGUF test models, kernel checks): every byte
/// random except the f16 scale fields, which get finite values of either sign up to `max_scale`
/// in magnitude (the first block's are zero).
///
/// # Panics
/// If `ty` is not quantised.
pub fn random_blocks(ty: GgmlType, blocks: usize, seed: u64, max_scale: f32) -> Vec<u8> {
    let f16_fields: &[usize] = match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::IQ4NL | GgmlType::IQ4XS => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
        GgmlType::Q2K => &[80, 82],
        GgmlType::Q3K => &[108],
        GgmlType::Q6K => &[208],
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => panic!("{ty:?} has no blocks"),
    };
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let bb = ty.block_bytes();
    let mut out: Vec<u8> = (0..blocks * bb).map(|_| next() as u8).collect();
    for b in 0..blocks {
        for &at in f16_fields {
            let v = if b == 0 {
                0.0
            } else {
                ((next() % 2001) as f32 - 1000.0) / 1000.0 * max_scale
            };
            out[b * bb + at..b * bb + at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
        }
    }
    out
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
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            for b in src.chunks(32) {
                // Q5_0: ggml's scale maps the value of largest magnitude to -16; Q5_1: the range
                // over 31 steps from the minimum.
                let (d, min) = if ty == GgmlType::Q5_0 {
                    let max = b
                        .iter()
                        .fold(0f32, |m, &x| if x.abs() > m.abs() { x } else { m });
                    (max / -16.0, 0.0)
                } else {
                    let min = b.iter().copied().fold(f32::INFINITY, f32::min);
                    let max = b.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    ((max - min) / 31.0, min)
                };
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                if ty == GgmlType::Q5_1 {
                    out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                }
                let q = |x: f32| {
                    if ty == GgmlType::Q5_0 {
                        ((x * id + 16.5) as i32).clamp(0, 31) as u32
                    } else {
                        (((x - min) * id + 0.5) as i32).clamp(0, 31) as u32
                    }
                };
                let mut qh = 0u32;
                for j in 0..16 {
                    qh |= ((q(b[j]) >> 4) << j) | ((q(b[j + 16]) >> 4) << (j + 16));
                }
                out.extend_from_slice(&qh.to_le_bytes());
                out.extend((0..16).map(|i| (q(b[i]) & 15) as u8 | (((q(b[i + 16]) & 15) as u8) << 4)));
            }
        }
        other => panic!(
            "quantize: {other:?} test data comes from llama-quantize (scripts/make_quant_fixtures.py)"
        ),
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
            (GgmlType::Q5_0, 0.3),
            (GgmlType::Q5_1, 0.15),
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
        for ty in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(ty.id()), Some(ty));
        }
        assert_eq!(GgmlType::Q4K.name(), "Q4_K");
        assert_eq!(GgmlType::from_id(16), None);
        assert_eq!(GgmlType::name_of_id(16), "IQ2_XXS");
        assert_eq!(GgmlType::name_of_id(999), "unknown");
    }
}
