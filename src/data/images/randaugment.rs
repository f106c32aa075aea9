//! RandAugment (Cubuk et al. 2020) on 8-bit RGB images, with PIL's semantics for each op.
//!
//! Each of `num_ops` rounds picks an op uniformly (with replacement) and applies it with
//! probability `apply_prob`, as timm does (TensorFlow's implementation, which big_vision
//! and Beyer et al. 2022 use, applies it with a probability drawn from U(0.2, 0.8): the same
//! 0.5 on average). Magnitude runs from 0 to 10 (`_MAX_LEVEL` in TensorFlow, timm's
//! `_LEVEL_DENOM`), so Beyer et al.'s level 10 is the strongest setting. At fraction
//! `f = magnitude / 10`:
//!
//! | op | effect |
//! |---|---|
//! | rotate | `±30 f` degrees about the centre |
//! | shear x / y | `±0.3 f` about the centre |
//! | translate x / y | `±0.45 f` of the width / height (timm's `translate_pct`) |
//! | color, contrast, brightness, sharpness | PIL `ImageEnhance` with factor `1 ± 0.9 f` |
//! | posterize | keep `8 - round(4 f)` bits (timm's increasing form: 0 is the identity) |
//! | solarize | invert values `>= 256 (1 - f)` (increasing: 0 inverts nothing) |
//! | identity, autocontrast, equalize | no magnitude |
//!
//! The sign of a signed op is a coin flip. Geometric ops sample bilinearly and fill with grey
//! 128, as timm and big_vision fill. So magnitude 0 leaves the image unchanged for every op
//! but autocontrast and equalize. Not included: TensorFlow's `Invert`, `Cutout` and
//! `SolarizeAdd` (the usual torchvision / timm list is implemented).

use super::{to_u8, Rgb8};
use anyhow::{bail, Result};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// One RandAugment operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AugmentOp {
    Identity,
    AutoContrast,
    Equalize,
    Rotate,
    Solarize,
    Color,
    Posterize,
    Contrast,
    Brightness,
    Sharpness,
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
}

/// Every op, in the order above.
pub const ALL_OPS: [AugmentOp; 14] = [
    AugmentOp::Identity,
    AugmentOp::AutoContrast,
    AugmentOp::Equalize,
    AugmentOp::Rotate,
    AugmentOp::Solarize,
    AugmentOp::Color,
    AugmentOp::Posterize,
    AugmentOp::Contrast,
    AugmentOp::Brightness,
    AugmentOp::Sharpness,
    AugmentOp::ShearX,
    AugmentOp::ShearY,
    AugmentOp::TranslateX,
    AugmentOp::TranslateY,
];

/// Grey used where geometric ops uncover the image's outside.
pub const FILL: u8 = 128;

/// RandAugment settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RandAugment {
    /// Ops applied per image.
    pub num_ops: usize,
    /// Strength, 0 to 10.
    pub magnitude: f64,
    /// Probability that a picked op is applied.
    pub apply_prob: f64,
    /// The ops to pick from.
    pub ops: Vec<AugmentOp>,
}

impl RandAugment {
    /// `num_ops` ops at `magnitude` (0-10) from [`ALL_OPS`], each applied with probability
    /// 1/2.
    pub fn new(num_ops: usize, magnitude: f64) -> Result<Self> {
        let ra = Self {
            num_ops,
            magnitude,
            apply_prob: 0.5,
            ops: ALL_OPS.to_vec(),
        };
        ra.validate()?;
        Ok(ra)
    }

    /// Checks the ranges.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=10.0).contains(&self.magnitude) {
            bail!(
                "RandAugment magnitude {} must be in [0, 10]",
                self.magnitude
            );
        }
        if !(0.0..=1.0).contains(&self.apply_prob) {
            bail!(
                "RandAugment apply probability {} must be in [0, 1]",
                self.apply_prob
            );
        }
        if self.ops.is_empty() && self.num_ops > 0 {
            bail!("RandAugment needs at least one op to pick from");
        }
        Ok(())
    }

    /// Augments `img` with ops and signs drawn from `rng`.
    pub fn apply(&self, img: &Rgb8, rng: &mut ChaCha8Rng) -> Rgb8 {
        let mut out = img.clone();
        for _ in 0..self.num_ops {
            let op = self.ops[rng.random_range(0..self.ops.len())];
            if rng.random_bool(self.apply_prob) {
                let negate = rng.random_bool(0.5);
                out = apply_op(&out, op, self.magnitude, negate);
            }
        }
        out
    }
}

/// Applies one op at `magnitude` (0-10); `negate` flips the sign of signed ops.
pub fn apply_op(img: &Rgb8, op: AugmentOp, magnitude: f64, negate: bool) -> Rgb8 {
    let f = (magnitude / 10.0).clamp(0.0, 1.0) as f32;
    let sign = if negate { -1.0 } else { 1.0 };
    let factor = 1.0 + 0.9 * f * sign;
    let (w, h) = (img.width as f32, img.height as f32);
    match op {
        AugmentOp::Identity => img.clone(),
        AugmentOp::AutoContrast => autocontrast(img),
        AugmentOp::Equalize => equalize(img),
        AugmentOp::Rotate => {
            let (sin, cos) = (30.0 * f * sign).to_radians().sin_cos();
            affine(img, [cos, -sin, 0.0, sin, cos, 0.0])
        }
        AugmentOp::ShearX => affine(img, [1.0, 0.3 * f * sign, 0.0, 0.0, 1.0, 0.0]),
        AugmentOp::ShearY => affine(img, [1.0, 0.0, 0.0, 0.3 * f * sign, 1.0, 0.0]),
        AugmentOp::TranslateX => affine(img, [1.0, 0.0, 0.45 * f * sign * w, 0.0, 1.0, 0.0]),
        AugmentOp::TranslateY => affine(img, [1.0, 0.0, 0.0, 0.0, 1.0, 0.45 * f * sign * h]),
        AugmentOp::Solarize => {
            let threshold = (256.0 * (1.0 - f)).round() as u16;
            map_values(img, |v| if v as u16 >= threshold { 255 - v } else { v })
        }
        AugmentOp::Posterize => {
            let bits = 8 - (4.0 * f).round() as u32;
            let mask = !((1u16 << (8 - bits)) - 1) as u8;
            map_values(img, |v| v & mask)
        }
        AugmentOp::Color => {
            let grey: Vec<u8> = img
                .pixels
                .chunks_exact(3)
                .flat_map(|p| [luma(p); 3])
                .collect();
            blend(img, &grey, factor)
        }
        AugmentOp::Contrast => {
            let total: u64 = img.pixels.chunks_exact(3).map(|p| luma(p) as u64).sum();
            let mean = (total as f64 / (img.width * img.height) as f64 + 0.5) as u8;
            blend(img, &vec![mean; img.pixels.len()], factor)
        }
        AugmentOp::Brightness => blend(img, &vec![0; img.pixels.len()], factor),
        AugmentOp::Sharpness => blend(img, &smooth(img), factor),
    }
}

/// PIL's RGB -> L conversion (ITU-R 601-2 luma, rounded).
fn luma(p: &[u8]) -> u8 {
    ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8
}

fn map_values(img: &Rgb8, f: impl Fn(u8) -> u8) -> Rgb8 {
    Rgb8 {
        width: img.width,
        height: img.height,
        pixels: img.pixels.iter().map(|&v| f(v)).collect(),
    }
}

/// PIL's `ImageEnhance`: `degenerate + factor * (img - degenerate)`, rounded and clipped.
fn blend(img: &Rgb8, degenerate: &[u8], factor: f32) -> Rgb8 {
    if factor == 1.0 {
        return img.clone();
    }
    let pixels = img
        .pixels
        .iter()
        .zip(degenerate)
        .map(|(&v, &d)| to_u8(d as f32 + factor * (v as f32 - d as f32)))
        .collect();
    Rgb8 {
        width: img.width,
        height: img.height,
        pixels,
    }
}

/// PIL's `ImageFilter.SMOOTH` (3x3 kernel, centre 5, others 1, over 13) on the interior;
/// border pixels keep their values, as `ImageEnhance.Sharpness` leaves them.
fn smooth(img: &Rgb8) -> Vec<u8> {
    let (w, h) = (img.width, img.height);
    let mut out = img.pixels.clone();
    let stride = 3 * w;
    for y in 1..h.saturating_sub(1) {
        let (above, row, below) = (
            &img.pixels[(y - 1) * stride..y * stride],
            &img.pixels[y * stride..(y + 1) * stride],
            &img.pixels[(y + 1) * stride..(y + 2) * stride],
        );
        for i in 3..stride.saturating_sub(3) {
            let sum = |r: &[u8]| r[i - 3] as u32 + r[i] as u32 + r[i + 3] as u32;
            let acc = sum(above) + sum(row) + sum(below) + 4 * row[i] as u32;
            out[y * stride + i] = to_u8(acc as f32 / 13.0);
        }
    }
    out
}

/// Stretches each channel to the full 0-255 range (channels of one value are left alone).
fn autocontrast(img: &Rgb8) -> Rgb8 {
    let mut out = img.clone();
    for c in 0..3 {
        let channel = img.pixels.iter().skip(c).step_by(3);
        let lo = *channel.clone().min().expect("non-empty image");
        let hi = *channel.max().expect("non-empty image");
        if hi > lo {
            let scale = 255.0 / (hi - lo) as f32;
            for v in out.pixels.iter_mut().skip(c).step_by(3) {
                *v = to_u8((*v - lo) as f32 * scale);
            }
        }
    }
    out
}

/// PIL's `ImageOps.equalize`, per channel.
fn equalize(img: &Rgb8) -> Rgb8 {
    let mut out = img.clone();
    for c in 0..3 {
        let mut hist = [0usize; 256];
        for &v in img.pixels.iter().skip(c).step_by(3) {
            hist[v as usize] += 1;
        }
        let used: Vec<usize> = hist.iter().copied().filter(|&n| n > 0).collect();
        if used.len() <= 1 {
            continue;
        }
        let step = (used.iter().sum::<usize>() - used[used.len() - 1]) / 255;
        if step == 0 {
            continue;
        }
        let mut lut = [0u8; 256];
        let mut n = step / 2;
        for (l, &count) in lut.iter_mut().zip(&hist) {
            *l = (n / step).min(255) as u8;
            n += count;
        }
        for v in out.pixels.iter_mut().skip(c).step_by(3) {
            *v = lut[*v as usize];
        }
    }
    out
}

/// `v` rounded down; a truncation and a compare, where `f32::floor` is a library call on
/// baseline x86-64.
#[inline]
fn floor(v: f32) -> i64 {
    let t = v as i64;
    if t as f32 > v {
        t - 1
    } else {
        t
    }
}

/// Resamples `img` through the affine map `m` from output to input coordinates, both
/// relative to the image centre: `x_in = m0 x + m1 y + m2`, `y_in = m3 x + m4 y + m5`.
/// Bilinear; outside the image is [`FILL`]. The identity map returns the image unchanged.
fn affine(img: &Rgb8, m: [f32; 6]) -> Rgb8 {
    if m == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0] {
        return img.clone();
    }
    let (w, h) = (img.width, img.height);
    let (cx, cy) = (w as f32 / 2.0, h as f32 / 2.0);
    let fill = [FILL; 3];
    // The pixel at (x, y), or the fill colour outside the image.
    let fetch = |x: i64, y: i64| -> &[u8] {
        if x < 0 || y < 0 || x >= w as i64 || y >= h as i64 {
            &fill
        } else {
            let i = 3 * (y as usize * w + x as usize);
            &img.pixels[i..i + 3]
        }
    };
    let mut pixels = Vec::with_capacity(img.pixels.len());
    for y in 0..h {
        let py = y as f32 + 0.5 - cy;
        for x in 0..w {
            let px = x as f32 + 0.5 - cx;
            // Source position in pixel-index space (pixel i's centre at i).
            let u = m[0] * px + m[1] * py + m[2] + cx - 0.5;
            let v = m[3] * px + m[4] * py + m[5] + cy - 0.5;
            let (x0, y0) = (floor(u), floor(v));
            let (fx, fy) = (u - x0 as f32, v - y0 as f32);
            let (a, b) = (fetch(x0, y0), fetch(x0 + 1, y0));
            let (c, d) = (fetch(x0, y0 + 1), fetch(x0 + 1, y0 + 1));
            for ch in 0..3 {
                let top = a[ch] as f32 * (1.0 - fx) + b[ch] as f32 * fx;
                let bottom = c[ch] as f32 * (1.0 - fx) + d[ch] as f32 * fx;
                let value = top * (1.0 - fy) + bottom * fy;
                pixels.push(to_u8(value));
            }
        }
    }
    Rgb8 {
        width: w,
        height: h,
        pixels,
    }
}

#[cfg(test)]
mod tests {
    use super::super::synthetic::SyntheticImages;
    use super::super::{ImageSource, Split};
    use super::*;
    use rand::SeedableRng;

    fn sample() -> Rgb8 {
        SyntheticImages::new(Split::Train, 4, 24, 5)
            .load(3)
            .unwrap()
            .0
    }

    #[test]
    fn magnitude_zero_is_the_identity_for_every_op_with_a_magnitude() {
        let img = sample();
        for op in ALL_OPS {
            if matches!(op, AugmentOp::AutoContrast | AugmentOp::Equalize) {
                continue;
            }
            for negate in [false, true] {
                assert_eq!(apply_op(&img, op, 0.0, negate), img, "{op:?}");
            }
        }
        // No rounds, or rounds that never apply, change nothing.
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(
            RandAugment::new(0, 10.0).unwrap().apply(&img, &mut rng),
            img
        );
        let never = RandAugment {
            apply_prob: 0.0,
            ..RandAugment::new(3, 10.0).unwrap()
        };
        assert_eq!(never.apply(&img, &mut rng), img);
        let zero = RandAugment {
            ops: ALL_OPS[3..].to_vec(),
            apply_prob: 1.0,
            ..RandAugment::new(4, 0.0).unwrap()
        };
        assert_eq!(zero.apply(&img, &mut rng), img);
    }

    #[test]
    fn ops_change_images_as_their_definitions_say() {
        let img = sample();
        // Every op at full strength changes this image (identity aside) and keeps its size.
        for op in &ALL_OPS[1..] {
            let out = apply_op(&img, *op, 10.0, false);
            assert_eq!((out.width, out.height), (24, 24));
            assert_ne!(out, img, "{op:?}");
        }
        // Solarize at 10 inverts everything; posterize at 10 keeps 4 bits.
        let inverted = apply_op(&img, AugmentOp::Solarize, 10.0, false);
        assert!(inverted
            .pixels
            .iter()
            .zip(&img.pixels)
            .all(|(a, b)| *a == 255 - b));
        let poster = apply_op(&img, AugmentOp::Posterize, 10.0, false);
        assert!(poster.pixels.iter().all(|v| v & 0x0f == 0));
        // Brightness at -10 (factor 0.1) darkens; autocontrast spans 0..255.
        let dark = apply_op(&img, AugmentOp::Brightness, 10.0, true);
        assert!(dark
            .pixels
            .iter()
            .zip(&img.pixels)
            .all(|(a, b)| *a as f32 <= *b as f32 * 0.1 + 0.5));
        let stretched = apply_op(&img, AugmentOp::AutoContrast, 0.0, false);
        assert_eq!(*stretched.pixels.iter().max().unwrap(), 255);
        assert_eq!(*stretched.pixels.iter().min().unwrap(), 0);
        // Translating by a whole number of pixels shifts exactly, filling with grey.
        let ten_pixels = 100.0 / (0.45 * 24.0);
        let shifted = apply_op(&img, AugmentOp::TranslateX, ten_pixels, false);
        assert_eq!(shifted.pixel(5, 7), img.pixel(15, 7));
        assert_eq!(shifted.pixel(20, 7), [FILL; 3]);
        // Equalize spreads a two-level image to the ends of the range (PIL's algorithm).
        let two: Vec<u8> = (0..600)
            .flat_map(|i| [if i < 300 { 10 } else { 20 }; 3])
            .collect();
        let eq = apply_op(
            &Rgb8::new(600, 1, two).unwrap(),
            AugmentOp::Equalize,
            0.0,
            false,
        );
        assert_eq!((eq.pixel(0, 0), eq.pixel(599, 0)), ([0; 3], [255; 3]));
    }

    #[test]
    fn randaugment_is_deterministic_under_a_seed() {
        let img = sample();
        let ra = RandAugment::new(2, 10.0).unwrap();
        let run = |seed| ra.apply(&img, &mut ChaCha8Rng::seed_from_u64(seed));
        assert_eq!(run(9), run(9));
        let distinct: std::collections::HashSet<Vec<u8>> = (0..20).map(|s| run(s).pixels).collect();
        assert!(distinct.len() > 10);
        assert!(RandAugment::new(2, 11.0).is_err());
    }
}
