//! Per-image transforms: the training augmentation (random resized crop, horizontal flip,
//! RandAugment), the evaluation crop, and normalisation into a `3 x H x W` float tensor.
//!
//! Every random choice comes from the generator passed in, so a sample's augmentation is
//! reproduced exactly from its seed (see `pipeline`).

use super::randaugment::RandAugment;
use super::resize::{resize_crop, Crop};
use super::Rgb8;
use anyhow::{bail, Result};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// torchvision's `RandomResizedCrop.get_params`: up to ten tries at a box with area
/// `scale` of the image's (uniform) and aspect ratio `ratio` (log-uniform) that fits inside,
/// else the largest central box with the ratio clamped into `ratio`.
pub fn random_resized_crop_box(
    width: usize,
    height: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut ChaCha8Rng,
) -> Crop {
    let area = (width * height) as f64;
    let (log_lo, log_hi) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale.0..=scale.1);
        let aspect = rng.random_range(log_lo..=log_hi).exp();
        let w = (target * aspect).sqrt().round() as usize;
        let h = (target / aspect).sqrt().round() as usize;
        if 0 < w && w <= width && 0 < h && h <= height {
            let y = rng.random_range(0..=height - h);
            let x = rng.random_range(0..=width - w);
            return Crop {
                x,
                y,
                width: w,
                height: h,
            };
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < ratio.0 {
        (
            width,
            ((width as f64 / ratio.0).round() as usize).clamp(1, height),
        )
    } else if in_ratio > ratio.1 {
        (
            ((height as f64 * ratio.1).round() as usize).clamp(1, width),
            height,
        )
    } else {
        (width, height)
    };
    Crop {
        x: (width - w) / 2,
        y: (height - h) / 2,
        width: w,
        height: h,
    }
}

/// Mirrors `img` left to right in place.
pub fn hflip(img: &mut Rgb8) {
    let w = img.width;
    for row in img.pixels.chunks_mut(3 * w) {
        for x in 0..w / 2 {
            for c in 0..3 {
                row.swap(3 * x + c, 3 * (w - 1 - x) + c);
            }
        }
    }
}

/// The training augmentation, in the order of Beyer et al. (2022) / big_vision: random
/// resized crop to `image_size`, horizontal flip with probability 1/2, then RandAugment.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainAugment {
    /// Side of the square output.
    pub image_size: usize,
    /// Crop area as a fraction of the image's, drawn uniformly in this range.
    pub scale: (f64, f64),
    /// Crop aspect ratio (width/height), drawn log-uniformly in this range.
    pub ratio: (f64, f64),
    /// Flip half the images left to right.
    pub hflip: bool,
    /// RandAugment after crop and flip, if any.
    pub randaugment: Option<RandAugment>,
}

impl TrainAugment {
    /// The paper's ImageNet recipe at `image_size`: crop scale 0.08-1, ratio 3/4-4/3
    /// (torchvision's defaults), flips, RandAugment with 2 ops at magnitude 10.
    pub fn paper(image_size: usize) -> Self {
        Self {
            image_size,
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            hflip: true,
            randaugment: Some(RandAugment::new(2, 10.0).expect("valid RandAugment settings")),
        }
    }

    /// Checks the ranges.
    pub fn validate(&self) -> Result<()> {
        let (s, r) = (self.scale, self.ratio);
        if self.image_size == 0 {
            bail!("augmentation image size must be positive");
        }
        if !(s.0 > 0.0 && s.0 <= s.1 && s.1 <= 1.0) {
            bail!("crop scale range {s:?} must satisfy 0 < min <= max <= 1");
        }
        if !(r.0 > 0.0 && r.0 <= r.1 && r.1.is_finite()) {
            bail!("crop ratio range {r:?} must satisfy 0 < min <= max");
        }
        Ok(())
    }

    /// Augments `img`, drawing every choice from `rng`. Images smaller than `image_size`
    /// are upscaled: the crop is resized to `image_size` whatever its size.
    pub fn apply(&self, img: &Rgb8, rng: &mut ChaCha8Rng) -> Result<Rgb8> {
        let crop = random_resized_crop_box(img.width, img.height, self.scale, self.ratio, rng);
        let mut out = resize_crop(img, crop, self.image_size, self.image_size)?;
        if self.hflip && rng.random_bool(0.5) {
            hflip(&mut out);
        }
        match &self.randaugment {
            Some(ra) => Ok(ra.apply(&out, rng)),
            None => Ok(out),
        }
    }
}

/// The evaluation transform: the central square covering `crop_fraction` of the shorter
/// side, resized to `image_size` (what "resize the short side to `image_size /
/// crop_fraction`, then centre-crop `image_size`" computes, in one resampling). ImageNet
/// uses 0.875 (224 from 256); sets already at the model's size use 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalTransform {
    pub image_size: usize,
    pub crop_fraction: f64,
}

impl EvalTransform {
    /// Crops and resizes `img`; smaller images are upscaled.
    pub fn apply(&self, img: &Rgb8) -> Result<Rgb8> {
        if !(self.crop_fraction > 0.0 && self.crop_fraction <= 1.0) {
            bail!(
                "eval crop fraction {} must be in (0, 1]",
                self.crop_fraction
            );
        }
        let short = img.width.min(img.height);
        let side = ((short as f64 * self.crop_fraction).round() as usize).clamp(1, short);
        let crop = Crop {
            x: (img.width - side) / 2,
            y: (img.height - side) / 2,
            width: side,
            height: side,
        };
        resize_crop(img, crop, self.image_size, self.image_size)
    }
}

/// Per-channel normalisation `(v / 255 - mean) / std`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalize {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Normalize {
    /// Mean and std 0.5: values in [-1, 1], as big_vision's `value_range(-1, 1)` and the
    /// timm / Hugging Face ViT checkpoints use.
    pub const MINUS_ONE_TO_ONE: Normalize = Normalize {
        mean: [0.5; 3],
        std: [0.5; 3],
    };

    /// The ImageNet channel statistics torchvision models use.
    pub const IMAGENET: Normalize = Normalize {
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
    };

    /// Writes `img` as `3 x height x width` floats (channel planes) into `out`.
    pub fn write_chw(&self, img: &Rgb8, out: &mut [f32]) {
        let plane = img.width * img.height;
        debug_assert_eq!(out.len(), 3 * plane);
        for c in 0..3 {
            let scale = 1.0 / (255.0 * self.std[c]);
            let shift = self.mean[c] / self.std[c];
            for (o, p) in out[c * plane..(c + 1) * plane]
                .iter_mut()
                .zip(img.pixels.chunks_exact(3))
            {
                *o = p[c] as f32 * scale - shift;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::synthetic::SyntheticImages;
    use super::super::{ImageSource, Split};
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn crop_boxes_fit_and_follow_the_ranges() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for (w, h) in [(500, 375), (32, 32), (40, 300), (1, 1)] {
            for _ in 0..200 {
                let c = random_resized_crop_box(w, h, (0.08, 1.0), (0.75, 4.0 / 3.0), &mut rng);
                assert!(c.width >= 1 && c.height >= 1);
                assert!(
                    c.x + c.width <= w && c.y + c.height <= h,
                    "{c:?} in {w}x{h}"
                );
            }
        }
        // A very tall image falls back to the central box with the smallest ratio.
        let c = random_resized_crop_box(10, 1000, (0.9, 1.0), (0.75, 4.0 / 3.0), &mut rng);
        assert_eq!((c.width, c.height, c.x), (10, 13, 0));
        // Scale 1, ratio 1 on a square image: the whole image.
        let c = random_resized_crop_box(32, 32, (1.0, 1.0), (1.0, 1.0), &mut rng);
        assert_eq!(
            c,
            Crop {
                x: 0,
                y: 0,
                width: 32,
                height: 32
            }
        );
    }

    #[test]
    fn train_augment_is_deterministic_and_sized() {
        let img = SyntheticImages::new(Split::Train, 1, 48, 0)
            .load(0)
            .unwrap()
            .0;
        let aug = TrainAugment::paper(32);
        aug.validate().unwrap();
        let run = |seed| {
            aug.apply(&img, &mut ChaCha8Rng::seed_from_u64(seed))
                .unwrap()
        };
        let a = run(3);
        assert_eq!((a.width, a.height), (32, 32));
        assert_eq!(a, run(3));
        assert_ne!(a, run(4));
        // No randomness left: scale 1, ratio 1, no flip, no RandAugment is the identity.
        let plain = TrainAugment {
            image_size: 48,
            scale: (1.0, 1.0),
            ratio: (1.0, 1.0),
            hflip: false,
            randaugment: None,
        };
        assert_eq!(
            plain
                .apply(&img, &mut ChaCha8Rng::seed_from_u64(0))
                .unwrap(),
            img
        );
        let mut flipped = img.clone();
        hflip(&mut flipped);
        assert_eq!(flipped.pixel(0, 5), img.pixel(47, 5));
        hflip(&mut flipped);
        assert_eq!(flipped, img);
        let bad = TrainAugment {
            scale: (0.5, 0.2),
            ..plain
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn eval_crop_and_normalisation() {
        let img = SyntheticImages::new(Split::Val, 1, 32, 0)
            .load(0)
            .unwrap()
            .0;
        let same = EvalTransform {
            image_size: 32,
            crop_fraction: 1.0,
        };
        assert_eq!(same.apply(&img).unwrap(), img);
        let tall = Rgb8::filled(20, 50, [1, 2, 3]);
        let out = EvalTransform {
            image_size: 64,
            crop_fraction: 0.875,
        }
        .apply(&tall)
        .unwrap();
        assert_eq!(out, Rgb8::filled(64, 64, [1, 2, 3]));
        let mut chw = vec![0f32; 3 * 4];
        let tiny = Rgb8::new(2, 2, vec![0, 255, 51, 255, 0, 51, 0, 0, 0, 255, 255, 255]).unwrap();
        Normalize::MINUS_ONE_TO_ONE.write_chw(&tiny, &mut chw);
        assert_eq!(&chw[..4], &[-1.0, 1.0, -1.0, 1.0]);
        assert_eq!(&chw[4..8], &[1.0, -1.0, -1.0, 1.0]);
        assert!((chw[8] + 0.6).abs() < 1e-6);
        assert!(chw.iter().all(|v| (-1.0..=1.0).contains(v)));
    }
}
