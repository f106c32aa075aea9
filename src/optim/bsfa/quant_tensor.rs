//! The 4-bit encoding of `quant` in candle tensor ops, on any device: what a GPU run (or
//! `train.kernels = reference`) keeps, so that BSFA's 4-bit state never leaves the device.
//! It writes bit for bit the bytes of [`quant::Quant4::quantize`] and decodes to the same
//! f32 values (tested), so a checkpoint has one format whichever form wrote it.
//!
//! Layouts, as [`quant::Quant4::to_tensors`]: codes `rows x ceil(cols / 2)` u8 (value `2i`
//! in the low nibble), scales and zeros `rows x groups` u8 holding FP8 E4M3 bits, norms
//! `rows` f32.
//!
//! FP8's directed rounding is exact arithmetic here: around a value of magnitude below 2
//! (every normalised value, zero point and scale is), E4M3's representable values are the
//! multiples of a spacing `q = 2^(n - 9)`, where `n` counts the powers of two `2^-5 ..= 2^0`
//! at or below the magnitude. Rounding down is `floor(x / q) * q`, up `ceil(x / q) * q`,
//! and the bits of such a value `v` are `8 n(v) + |v| / q(v)`, plus 128 when negative.

use super::quant::{self, GROUP};
use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};
use std::sync::{Mutex, PoisonError};

/// Largest 4-bit code.
const LEVELS: f64 = 15.0;

/// A `rows x cols` matrix in 4-bit form, as tensors on one device.
#[derive(Debug, Clone)]
pub struct Quant4Tensors {
    /// Values per row.
    pub cols: usize,
    /// `rows x ceil(cols / 2)` u8.
    pub codes: Tensor,
    /// `rows x groups` u8, FP8 E4M3 bits of each group's scale.
    pub scales: Tensor,
    /// `rows x groups` u8, FP8 E4M3 bits of each group's zero point.
    pub zeros: Tensor,
    /// `rows` f32: the largest magnitude each row was divided by.
    pub norms: Tensor,
}

impl Quant4Tensors {
    /// Quantizes `t` (`rows x cols`, any float type) where it lies. Unlike
    /// [`quant::Quant4::quantize`] it does not read the values back to refuse non-finite
    /// rows, which would sync the device every step: a step whose loss or gradient norm is
    /// not finite updates nothing, so its update never gets here.
    pub fn quantize(t: &Tensor) -> Result<Self> {
        let (rows, cols) = t.dims2()?;
        let groups = quant::groups(cols);
        let c = Constants::on(t.device())?;
        let t = t.to_dtype(DType::F32)?;
        let norms = t.abs()?.max_keepdim(1)?;
        // A zero row divides by 1 instead: its values stay 0, and so do its codes.
        let divisor = (&norms + norms.broadcast_eq(&c.zero)?.to_dtype(DType::F32)?)?;
        let x = t.broadcast_div(&divisor)?;
        // The last group is padded with copies of the last value: its range is unchanged.
        let padded = x
            .pad_with_same(1, 0, groups * GROUP - cols)?
            .reshape((rows, groups, GROUP))?;
        let lo = padded.min(D::Minus1)?;
        let hi = padded.max(D::Minus1)?;
        let zero = c.round_down(&lo)?;
        // Divided as the host divides (candle's `tensor / scalar` multiplies by 1 / 15).
        let scale = c.round_up(&(hi - &zero)?.broadcast_div(&c.levels)?)?;
        // A group of equal values has scale 0 and codes 0: divide by 1 there.
        let step = (&scale + scale.broadcast_eq(&c.zero)?.to_dtype(DType::F32)?)?;
        let codes = padded
            .broadcast_sub(&zero.unsqueeze(2)?)?
            .broadcast_div(&step.unsqueeze(2)?)?
            .round()?
            .broadcast_maximum(&c.zero)?
            .broadcast_minimum(&c.levels)?
            .reshape((rows, groups * GROUP))?
            .narrow(1, 0, cols)?
            .pad_with_zeros(1, 0, cols % 2)?
            .reshape((rows, cols.div_ceil(2), 2))?;
        let low = codes.narrow(2, 0, 1)?;
        let high = codes.narrow(2, 1, 1)?;
        let codes = (low + (high * 16.0)?)?.squeeze(2)?.to_dtype(DType::U8)?;
        Ok(Self {
            cols,
            codes,
            scales: c.bits(&scale)?,
            zeros: c.bits(&zero)?,
            norms: norms.squeeze(1)?,
        })
    }

    /// The values, `rows x cols` f32: `(norm * scale) * code + norm * zero`, the f32
    /// operations of [`quant::Quant4::dequantize`], so the same values bit for bit.
    pub fn dequantize(&self) -> Result<Tensor> {
        let rows = self.rows()?;
        let groups = quant::groups(self.cols);
        let c = Constants::on(self.device())?;
        let bytes = self.codes.to_dtype(DType::F32)?;
        let high = (&bytes / 16.0)?.floor()?;
        let low = (bytes - (&high * 16.0)?)?;
        let codes = Tensor::stack(&[low, high], 2)?
            .reshape((rows, 2 * self.cols.div_ceil(2)))?
            .pad_with_zeros(1, 0, groups * GROUP - 2 * self.cols.div_ceil(2))?
            .reshape((rows, groups, GROUP))?;
        let norms = self.norms.unsqueeze(1)?;
        let scale = c.decode_fp8(&self.scales)?.broadcast_mul(&norms)?;
        let zero = c.decode_fp8(&self.zeros)?.broadcast_mul(&norms)?;
        let values = codes
            .broadcast_mul(&scale.unsqueeze(2)?)?
            .broadcast_add(&zero.unsqueeze(2)?)?;
        Ok(values
            .reshape((rows, groups * GROUP))?
            .narrow(1, 0, self.cols)?)
    }

    /// Rows held.
    pub fn rows(&self) -> Result<usize> {
        Ok(self.norms.dims1()?)
    }

    /// The device the tensors are on.
    pub fn device(&self) -> &Device {
        self.norms.device()
    }

    /// Rows of several matrices with the same columns, stacked.
    pub fn concat(parts: &[&Self]) -> Result<Self> {
        let cols = parts.first().map_or(0, |p| p.cols);
        if parts.iter().any(|p| p.cols != cols) {
            anyhow::bail!("cannot stack 4-bit matrices of different widths");
        }
        let cat = |field: fn(&Self) -> &Tensor| -> Result<Tensor> {
            let all: Vec<&Tensor> = parts.iter().map(|p| field(p)).collect();
            Ok(Tensor::cat(&all, 0)?)
        };
        Ok(Self {
            cols,
            codes: cat(|p| &p.codes)?,
            scales: cat(|p| &p.scales)?,
            zeros: cat(|p| &p.zeros)?,
            norms: cat(|p| &p.norms)?,
        })
    }

    /// Row `r` as a one-row matrix.
    pub fn row(&self, r: usize) -> Result<Self> {
        Ok(Self {
            cols: self.cols,
            codes: self.codes.narrow(0, r, 1)?,
            scales: self.scales.narrow(0, r, 1)?,
            zeros: self.zeros.narrow(0, r, 1)?,
            norms: self.norms.narrow(0, r, 1)?,
        })
    }

    /// The four arrays, for checkpoints (the layout of [`quant::Quant4::to_tensors`]).
    pub fn to_tensors(&self) -> [Tensor; 4] {
        [
            self.codes.clone(),
            self.scales.clone(),
            self.zeros.clone(),
            self.norms.clone(),
        ]
    }

    /// The inverse of [`Quant4Tensors::to_tensors`] for rows of `cols` values, kept on
    /// `device`; shapes are checked.
    pub fn from_tensors(t: [&Tensor; 4], cols: usize, device: &Device) -> Result<Self> {
        quant::check_layout(t, cols)?;
        Ok(Self {
            cols,
            codes: t[0].to_device(device)?,
            scales: t[1].to_device(device)?,
            zeros: t[2].to_device(device)?,
            norms: t[3].to_dtype(DType::F32)?.to_device(device)?,
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        [&self.codes, &self.scales, &self.zeros, &self.norms]
            .iter()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
}

/// The constants the encoding compares with and looks up, uploaded once per device: on a
/// GPU every tensor built on the host (candle's comparisons with a scalar build one) is a
/// copy that waits for the device, which an encoding per block and step cannot afford.
#[derive(Clone)]
struct Constants {
    /// 0 and 15 (f32 scalars).
    zero: Tensor,
    levels: Tensor,
    /// `2^-5 ..= 2^0`, the powers of two at which FP8's spacing doubles below 2.
    powers: Tensor,
    /// `2^(n - 9)` for `n = 0 ..= 6`: the spacing above `n` of those powers.
    spacings: Tensor,
    /// The f32 value of each of the 256 FP8 E4M3 bit patterns.
    fp8: Tensor,
}

impl Constants {
    /// Those of `device`, uploaded on first use.
    fn on(device: &Device) -> Result<Self> {
        static UPLOADED: Mutex<Vec<Constants>> = Mutex::new(Vec::new());
        let mut uploaded = UPLOADED.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = uploaded
            .iter()
            .find(|c| c.zero.device().same_device(device))
        {
            return Ok(c.clone());
        }
        let powers: Vec<f32> = (-5..=0).map(|k| 2f32.powi(k)).collect();
        let spacings: Vec<f32> = (0..=6).map(|n| 2f32.powi(n - 9)).collect();
        let fp8: Vec<f32> = (0..=255u8)
            .map(|b| float8::F8E4M3::from_bits(b).to_f32())
            .collect();
        let c = Self {
            zero: Tensor::new(0f32, device)?,
            levels: Tensor::new(LEVELS as f32, device)?,
            powers: Tensor::new(powers.as_slice(), device)?,
            spacings: Tensor::new(spacings.as_slice(), device)?,
            fp8: Tensor::new(fp8.as_slice(), device)?,
        };
        uploaded.push(c.clone());
        Ok(c)
    }

    /// Per value: how many of `2^-5 ..= 2^0` lie at or below its magnitude (`n`, f32), and
    /// its FP8 E4M3 spacing `2^(n - 9)`.
    fn spacing(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = x
            .abs()?
            .unsqueeze(D::Minus1)?
            .broadcast_ge(&self.powers)?
            .sum(D::Minus1)?;
        let q = self
            .spacings
            .index_select(&n.flatten_all()?.to_dtype(DType::U32)?, 0)?
            .reshape(x.shape())?;
        Ok((n.to_dtype(DType::F32)?, q))
    }

    /// The largest FP8 E4M3 value at or below each value (magnitudes below 2).
    fn round_down(&self, x: &Tensor) -> Result<Tensor> {
        let (_, q) = self.spacing(x)?;
        Ok((x / &q)?.floor()?.mul(&q)?)
    }

    /// The smallest FP8 E4M3 value at or above each value (magnitudes below 2).
    fn round_up(&self, x: &Tensor) -> Result<Tensor> {
        let (_, q) = self.spacing(x)?;
        Ok((x / &q)?.ceil()?.mul(&q)?)
    }

    /// The FP8 E4M3 bits (u8) of values E4M3 represents exactly (magnitudes below 2).
    fn bits(&self, v: &Tensor) -> Result<Tensor> {
        let (n, q) = self.spacing(v)?;
        let sign = (v.broadcast_lt(&self.zero)?.to_dtype(DType::F32)? * 128.0)?;
        Ok(((n * 8.0)? + (v.abs()? / q)? + sign)?.to_dtype(DType::U8)?)
    }

    /// The f32 values of FP8 E4M3 bits (u8).
    fn decode_fp8(&self, bits: &Tensor) -> Result<Tensor> {
        Ok(self
            .fp8
            .index_select(&bits.flatten_all()?, 0)?
            .reshape(bits.shape())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::bsfa::quant::Quant4;
    use rand::{Rng, SeedableRng};

    /// Rows like BSFA's: updates at very different magnitudes, a zero row, a constant group,
    /// an outlier, tiny and negative values, a partial last group of odd width.
    fn awkward_rows(rows: usize, cols: usize) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let mut values: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let magnitude = 10f32.powi(-((i / cols) as i32 % 6) - 1);
                rng.random_range(-1.0f32..1.0).powi(3) * magnitude
            })
            .collect();
        values[2 * cols..3 * cols].fill(0.0);
        if cols >= 128 {
            values[3 * cols + 64..3 * cols + 128].fill(2.5e-4);
        }
        values[4 * cols + cols / 2] = 3e-2;
        values[5 * cols] = -0.0;
        values[rows * cols - 1] = -1e-3;
        values
    }

    /// The tensor encoding writes exactly the bytes of the host encoding, and decodes to
    /// exactly its values; the round trip through the checkpoint layout keeps both.
    #[test]
    fn tensor_encoding_is_the_host_encoding_bit_for_bit() {
        for cols in [64 * 4 + 17, 64 * 3, 1, 63] {
            let rows = 7;
            let values = awkward_rows(rows, cols);
            let host = Quant4::quantize(&values, cols).unwrap();
            let t = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
            let q = Quant4Tensors::quantize(&t).unwrap();
            let [codes, scales, zeros, norms] = q.to_tensors();
            let bytes = |t: Tensor| -> Vec<u8> { t.flatten_all().unwrap().to_vec1().unwrap() };
            assert_eq!(bytes(codes), host.codes, "codes, {cols} columns");
            assert_eq!(bytes(scales), host.scales, "scales, {cols} columns");
            assert_eq!(bytes(zeros), host.zeros, "zeros, {cols} columns");
            assert_eq!(norms.to_vec1::<f32>().unwrap(), host.norms);
            let decoded: Vec<f32> = q
                .dequantize()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let expected = host.dequantize();
            assert!(
                decoded
                    .iter()
                    .zip(&expected)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "decoded values, {cols} columns"
            );
            let back =
                Quant4::from_tensors([&q.codes, &q.scales, &q.zeros, &q.norms], cols).unwrap();
            assert_eq!(back, host);
            // Stacking and splitting rows keeps every byte.
            let split: Vec<Quant4Tensors> = (0..rows).map(|r| q.row(r).unwrap()).collect();
            let joined = Quant4Tensors::concat(&split.iter().collect::<Vec<_>>()).unwrap();
            assert_eq!(bytes(joined.codes.clone()), host.codes);
            assert_eq!(joined.bytes(), host.bytes());
        }
    }

    /// The exact-arithmetic rounding agrees with the host's FP8 rounding on every E4M3 value
    /// below 2 and on the points between them.
    #[test]
    fn directed_rounding_matches_fp8() {
        let mut xs = Vec::new();
        for b in 0..=255u8 {
            let v = float8::F8E4M3::from_bits(b).to_f32();
            if v.is_finite() && v.abs() < 2.0 && b != 0x80 {
                xs.extend([v, v * 1.01 + 1e-7, v * 0.99 - 1e-7]);
            }
        }
        xs.retain(|x| x.abs() < 1.99);
        let t = Tensor::new(xs.as_slice(), &Device::Cpu).unwrap();
        let c = Constants::on(&Device::Cpu).unwrap();
        let down: Vec<u8> = c
            .bits(&c.round_down(&t).unwrap())
            .unwrap()
            .to_vec1()
            .unwrap();
        let up: Vec<u8> = c.bits(&c.round_up(&t).unwrap()).unwrap().to_vec1().unwrap();
        for (i, &x) in xs.iter().enumerate() {
            assert_eq!(down[i], quant::fp8_down(x).to_bits(), "down {x}");
            assert_eq!(up[i], quant::fp8_up(x).to_bits(), "up {x}");
        }
    }
}
