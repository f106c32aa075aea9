//! 4-bit storage of BSFA's update history and directions (the paper's scheme): linear
//! quantization in groups of 64 values, two 4-bit codes per byte, and per group a scale and
//! a zero point in FP8 E4M3. Values are dequantized only when BSFA uses them.
//!
//! One addition: each row is first divided by its largest magnitude (one f32 per row, i.e.
//! per stored update). Optimizer updates are ~1e-4..1e-7, below FP8 E4M3's smallest
//! subnormal (2^-9); normalised, every group's scale and zero point fall in its range.
//!
//! The zero point is rounded down and the scale up to FP8, so every code fits in 0..=15
//! without clipping and each value is reconstructed to within half a (decoded) step:
//! `|x - x̂| <= norm * scale / 2`.
//!
//! This is the encoding only; which matrices are kept 4-bit, and how, is `state`'s.

use anyhow::{bail, Result};
use float8::F8E4M3;
use rayon::prelude::*;

/// Values sharing one scale and zero point.
pub const GROUP: usize = 64;
/// Largest 4-bit code.
const LEVELS: f32 = 15.0;

/// The two codes of every byte as floats (low nibble, high nibble): decoding is a lookup.
static NIBBLES: [[f32; 2]; 256] = {
    let mut table = [[0.0f32; 2]; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = [(b & 0xF) as f32, (b >> 4) as f32];
        b += 1;
    }
    table
};

/// A `rows x cols` matrix in 4-bit form.
#[derive(Debug, Clone, PartialEq)]
pub struct Quant4 {
    /// Rows held (one per stored update or direction).
    pub rows: usize,
    /// Values per row.
    pub cols: usize,
    /// `rows x ceil(cols / 2)` bytes; value `2i` in the low nibble, `2i + 1` in the high one.
    pub codes: Vec<u8>,
    /// Per row and group: FP8 E4M3 bits of the scale.
    pub scales: Vec<u8>,
    /// Per row and group: FP8 E4M3 bits of the zero point.
    pub zeros: Vec<u8>,
    /// Per row: the largest magnitude the row was divided by.
    pub norms: Vec<f32>,
}

/// Groups per row of `cols` values.
pub fn groups(cols: usize) -> usize {
    cols.div_ceil(GROUP)
}

/// Bytes per row of `cols` values in 4-bit form.
pub fn row_bytes(cols: usize) -> usize {
    cols.div_ceil(2) + 2 * groups(cols) + 4
}

impl Quant4 {
    /// Quantizes `values` (`rows x cols`, row-major).
    pub fn quantize(values: &[f32], cols: usize) -> Result<Self> {
        if cols == 0 || !values.len().is_multiple_of(cols) {
            bail!("cannot quantize {} values as rows of {cols}", values.len());
        }
        let rows = values.len() / cols;
        let (row_codes, row_groups) = (cols.div_ceil(2), groups(cols));
        let mut q = Self {
            rows,
            cols,
            codes: vec![0; rows * row_codes],
            scales: vec![0; rows * row_groups],
            zeros: vec![0; rows * row_groups],
            norms: vec![0.0; rows],
        };
        for (r, row) in values.chunks_exact(cols).enumerate() {
            let norm = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            if !norm.is_finite() {
                bail!("cannot quantize a row holding {norm}");
            }
            q.norms[r] = norm;
            if norm == 0.0 {
                continue;
            }
            let codes = &mut q.codes[r * row_codes..(r + 1) * row_codes];
            let scales = &mut q.scales[r * row_groups..(r + 1) * row_groups];
            let zeros = &mut q.zeros[r * row_groups..(r + 1) * row_groups];
            // Groups are independent: GROUP values own GROUP / 2 code bytes.
            codes
                .par_chunks_mut(GROUP / 2)
                .zip(scales.par_iter_mut().zip(zeros.par_iter_mut()))
                .zip(row.par_chunks(GROUP))
                .for_each(|((codes, (scale_bits, zero_bits)), group)| {
                    let (lo, hi) = group.iter().fold((f32::MAX, f32::MIN), |(lo, hi), v| {
                        (lo.min(v / norm), hi.max(v / norm))
                    });
                    let zero = fp8_down(lo);
                    let scale = fp8_up((hi - zero.to_f32()) / LEVELS);
                    *zero_bits = zero.to_bits();
                    *scale_bits = scale.to_bits();
                    let (zero, scale) = (zero.to_f32(), scale.to_f32());
                    for (j, v) in group.iter().enumerate() {
                        let code = if scale > 0.0 {
                            ((v / norm - zero) / scale).round().clamp(0.0, LEVELS) as u8
                        } else {
                            0
                        };
                        codes[j / 2] |= code << (4 * (j % 2));
                    }
                });
        }
        Ok(q)
    }

    /// The values, `rows x cols`, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols)
            .enumerate()
            .for_each(|(r, row)| {
                row.par_chunks_mut(GROUP * 64)
                    .enumerate()
                    .for_each(|(k, chunk)| self.add_row(r, 1.0, k * GROUP * 64, chunk));
            });
        out
    }

    /// Decoded scale and zero point of group `g` of row `r`.
    fn group(&self, r: usize, g: usize) -> (f32, f32) {
        let i = r * groups(self.cols) + g;
        (
            F8E4M3::from_bits(self.scales[i]).to_f32(),
            F8E4M3::from_bits(self.zeros[i]).to_f32(),
        )
    }

    /// The code bytes of group `g` of row `r` (two codes per byte).
    fn group_codes(&self, r: usize, g: usize) -> &[u8] {
        let row = &self.codes[r * self.cols.div_ceil(2)..(r + 1) * self.cols.div_ceil(2)];
        &row[g * GROUP / 2..((g + 1) * GROUP / 2).min(row.len())]
    }

    /// `<row r, v>` computed from the codes, group by group, without dequantizing the row:
    /// `norm * sum_g (scale_g * <codes_g, v_g> + zero_g * sum(v_g))`.
    pub fn dot_row(&self, r: usize, v: &[f32]) -> f32 {
        let mut total = 0.0f32;
        for (g, vg) in v.chunks(GROUP).enumerate() {
            let (scale, zero) = self.group(r, g);
            let (mut coded, mut plain) = (0.0f32, 0.0f32);
            for (&byte, pair) in self.group_codes(r, g).iter().zip(vg.chunks(2)) {
                let [lo, hi] = NIBBLES[byte as usize];
                coded += lo * pair[0];
                plain += pair[0];
                if let Some(&x) = pair.get(1) {
                    coded += hi * x;
                    plain += x;
                }
            }
            total += scale * coded + zero * plain;
        }
        self.norms[r] * total
    }

    /// `out += coef * row r` over the columns `start .. start + out.len()` (`start` a
    /// multiple of [`GROUP`]).
    pub fn add_row(&self, r: usize, coef: f32, start: usize, out: &mut [f32]) {
        let c = coef * self.norms[r];
        for (k, chunk) in out.chunks_mut(GROUP).enumerate() {
            let g = start / GROUP + k;
            let (scale, zero) = self.group(r, g);
            let (a, b) = (c * scale, c * zero);
            for (&byte, pair) in self.group_codes(r, g).iter().zip(chunk.chunks_mut(2)) {
                let [lo, hi] = NIBBLES[byte as usize];
                pair[0] += a * lo + b;
                if let Some(x) = pair.get_mut(1) {
                    *x += a * hi + b;
                }
            }
        }
    }

    /// Rows of several matrices with the same columns, stacked.
    pub fn concat(parts: &[&Quant4]) -> Result<Self> {
        let cols = parts.first().map_or(0, |p| p.cols);
        if parts.iter().any(|p| p.cols != cols) {
            bail!("cannot stack 4-bit matrices of different widths");
        }
        Ok(Self {
            rows: parts.iter().map(|p| p.rows).sum(),
            cols,
            codes: parts.iter().flat_map(|p| p.codes.iter().copied()).collect(),
            scales: parts
                .iter()
                .flat_map(|p| p.scales.iter().copied())
                .collect(),
            zeros: parts.iter().flat_map(|p| p.zeros.iter().copied()).collect(),
            norms: parts.iter().flat_map(|p| p.norms.iter().copied()).collect(),
        })
    }

    /// Row `r` as a one-row matrix.
    pub fn row(&self, r: usize) -> Self {
        let (c, g) = (self.cols.div_ceil(2), groups(self.cols));
        Self {
            rows: 1,
            cols: self.cols,
            codes: self.codes[r * c..(r + 1) * c].to_vec(),
            scales: self.scales[r * g..(r + 1) * g].to_vec(),
            zeros: self.zeros[r * g..(r + 1) * g].to_vec(),
            norms: vec![self.norms[r]],
        }
    }

    /// The four arrays as tensors, for checkpoints: codes (`rows x ceil(cols/2)`, u8),
    /// scales and zeros (`rows x groups`, u8 holding FP8 E4M3 bits), norms (`rows`, f32).
    pub fn to_tensors(&self) -> Result<[candle_core::Tensor; 4]> {
        use candle_core::{Device, Tensor};
        let (c, g) = (self.cols.div_ceil(2), groups(self.cols));
        let cpu = &Device::Cpu;
        Ok([
            Tensor::from_slice(&self.codes, (self.rows, c), cpu)?,
            Tensor::from_slice(&self.scales, (self.rows, g), cpu)?,
            Tensor::from_slice(&self.zeros, (self.rows, g), cpu)?,
            Tensor::from_slice(&self.norms, self.rows, cpu)?,
        ])
    }

    /// The inverse of [`Quant4::to_tensors`] for rows of `cols` values; shapes are checked.
    pub fn from_tensors(t: [&candle_core::Tensor; 4], cols: usize) -> Result<Self> {
        let rows = check_layout(t, cols)?;
        let bytes =
            |t: &candle_core::Tensor| -> Result<Vec<u8>> { Ok(t.flatten_all()?.to_vec1()?) };
        Ok(Self {
            rows,
            cols,
            codes: bytes(t[0])?,
            scales: bytes(t[1])?,
            zeros: bytes(t[2])?,
            norms: t[3].to_dtype(candle_core::DType::F32)?.to_vec1()?,
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.codes.len() + self.scales.len() + self.zeros.len() + 4 * self.norms.len()
    }
}

/// The rows of the four arrays of [`Quant4::to_tensors`] for rows of `cols` values, once
/// their shapes and types are checked.
pub(super) fn check_layout(t: [&candle_core::Tensor; 4], cols: usize) -> Result<usize> {
    use candle_core::DType;
    let rows = t[3].dims1()?;
    let (c, g) = (cols.div_ceil(2), groups(cols));
    for (tensor, dims, dtype) in [
        (t[0], [rows, c], DType::U8),
        (t[1], [rows, g], DType::U8),
        (t[2], [rows, g], DType::U8),
    ] {
        if tensor.dims() != dims || tensor.dtype() != dtype {
            bail!(
                "4-bit state has shape {:?} ({:?}), expected {dims:?} ({dtype:?})",
                tensor.dims(),
                tensor.dtype()
            );
        }
    }
    Ok(rows)
}

/// The largest FP8 E4M3 value at or below `x` (|x| <= 448); zero as +0.
pub(super) fn fp8_down(x: f32) -> F8E4M3 {
    let r = F8E4M3::from_f32(x);
    positive_zero(if r.to_f32() <= x { r } else { step(r, false) })
}

/// The smallest FP8 E4M3 value at or above `x` (|x| <= 448); zero as +0.
pub(super) fn fp8_up(x: f32) -> F8E4M3 {
    let r = F8E4M3::from_f32(x);
    positive_zero(if r.to_f32() >= x { r } else { step(r, true) })
}

/// `v`, with -0 written as +0: one byte per value, whichever encoder wrote it (the tensor
/// encoder's sign test sees no sign on a zero).
fn positive_zero(v: F8E4M3) -> F8E4M3 {
    if v.to_bits() == 0x80 {
        F8E4M3::from_bits(0)
    } else {
        v
    }
}

/// The neighbour of `v` above (`up`) or below it. E4M3 is sign-magnitude: on the positive
/// side a larger value has larger bits, on the negative side smaller bits.
fn step(v: F8E4M3, up: bool) -> F8E4M3 {
    let bits = v.to_bits();
    let negative = bits & 0x80 != 0;
    let magnitude = bits & 0x7F;
    let next = match (up, negative) {
        (true, false) => bits + 1,
        (false, true) => bits + 1,
        (true, true) if magnitude == 0 => 0x01,
        (true, true) => bits - 1,
        (false, false) if magnitude == 0 => 0x81,
        (false, false) => bits - 1,
    };
    F8E4M3::from_bits(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn directed_rounding_brackets_the_value() {
        for x in [
            0.0f32, 1e-4, -1e-4, 0.3, -0.3, 0.0123, -0.987, 1.0, -1.0, 0.07,
        ] {
            let (d, u) = (fp8_down(x).to_f32(), fp8_up(x).to_f32());
            assert!(d <= x && x <= u, "{x}: {d} {u}");
            // Neighbours: nothing representable lies strictly between them and x.
            assert!(step(fp8_down(x), true).to_f32() > x || d == x, "{x}");
            assert!(step(fp8_up(x), false).to_f32() < x || u == x, "{x}");
        }
    }

    /// Every value is reconstructed within half its group's decoded step (times the row
    /// norm), and that step is within FP8's rounding of the ideal `range / 15`.
    #[test]
    fn reconstruction_error_is_bounded_by_half_a_step() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let cols = 64 * 5 + 17; // a partial last group
        let rows = 7;
        let mut values: Vec<f32> = (0..rows * cols)
            .map(|i| {
                // Rows at very different magnitudes, like optimizer updates.
                let magnitude = 10f32.powi(-((i / cols) as i32) - 2);
                rng.random_range(-1.0f32..1.0).powi(3) * magnitude
            })
            .collect();
        values[5 * cols..6 * cols].fill(0.0); // an all-zero row
        values[3] = 7e-3; // an outlier in one group
        let q = Quant4::quantize(&values, cols).unwrap();
        let back = q.dequantize();
        assert_eq!(back.len(), values.len());
        let g = groups(cols);
        for r in 0..rows {
            let row = &values[r * cols..(r + 1) * cols];
            let norm = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert_eq!(q.norms[r], norm);
            for (k, group) in row.chunks(GROUP).enumerate() {
                let lo = group
                    .iter()
                    .fold(f32::MAX, |m, v| m.min(v / norm.max(1e-30)));
                let hi = group
                    .iter()
                    .fold(f32::MIN, |m, v| m.max(v / norm.max(1e-30)));
                let scale = F8E4M3::from_bits(q.scales[r * g + k]).to_f32();
                // E4M3 has 3 mantissa bits: directed rounding moves a normal value by at most
                // 1/8 of itself, a subnormal one by at most 2^-9.
                let ideal = (hi - lo + lo.abs() / 8.0 + 2f32.powi(-9)) / 15.0;
                if norm > 0.0 {
                    assert!(
                        scale <= ideal * 1.125 + 2f32.powi(-9),
                        "r{r} g{k}: {scale} vs {ideal}"
                    );
                }
                for (j, v) in group.iter().enumerate() {
                    let i = r * cols + k * GROUP + j;
                    let err = (back[i] - v).abs();
                    assert!(
                        err <= norm * scale / 2.0 * 1.0001 + 1e-12,
                        "r{r} i{i}: {err}"
                    );
                }
            }
        }
        // Products computed from the codes equal those of the dequantized rows.
        let v: Vec<f32> = (0..cols).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
        for r in 0..rows {
            let dense: f32 = back[r * cols..(r + 1) * cols]
                .iter()
                .zip(&v)
                .map(|(a, b)| a * b)
                .sum();
            let scale = dense.abs().max(q.norms[r]) * 1e-4 + 1e-12;
            assert!((q.dot_row(r, &v) - dense).abs() <= scale, "row {r}");
        }
        // An eighth of the f32 size, give or take the scales.
        assert_eq!(q.bytes(), rows * row_bytes(cols));
        assert!((q.bytes() as f64) < 0.14 * (4 * rows * cols) as f64);
    }
}
