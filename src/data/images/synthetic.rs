//! `synthetic-images`: a small built-in, deterministic and learnable image set.
//!
//! Ten texture classes (flat, horizontal stripes, vertical stripes, checkerboard, grid,
//! dots, concentric rings, smooth gradient, pixel noise, blobs) in a random foreground
//! colour on a random, contrasting background, at a random scale and phase, with pixel
//! noise. Textures rather than single shapes: every patch carries evidence of its class, so
//! a tiny ViT learns the set in a few hundred steps on a CPU, and no class turns into
//! another under a horizontal flip. Each image is a pure function of `(seed, split,
//! index)`, drawn when loaded, so the set costs no memory or disk and train and val never
//! share an image. Class `index % 10`: classes are balanced.

use super::{to_u8, ImageSource, Rgb8, Split};
use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Classes of the synthetic set.
pub const CLASSES: usize = 10;

/// Class names in label order.
pub const CLASS_NAMES: [&str; CLASSES] = [
    "flat",
    "horizontal-stripes",
    "vertical-stripes",
    "checkerboard",
    "grid",
    "dots",
    "rings",
    "gradient",
    "noise",
    "blobs",
];

/// The generated set of one split.
pub struct SyntheticImages {
    split: Split,
    len: usize,
    size: usize,
    seed: u64,
}

impl SyntheticImages {
    /// `len` images of `size x size` pixels for `split`, drawn from `seed`.
    pub fn new(split: Split, len: usize, size: usize, seed: u64) -> Self {
        Self {
            split,
            len,
            size,
            seed,
        }
    }

    /// What the spec `synthetic-images` opens: 32x32 pixels, 10,000 training and 1,000
    /// validation images, seed 0.
    pub fn standard(split: Split) -> Self {
        let len = match split {
            Split::Train => 10_000,
            Split::Val => 1_000,
        };
        Self::new(split, len, 32, 0)
    }

    fn draw(&self, index: usize) -> Rgb8 {
        let split = match self.split {
            Split::Train => 0u64,
            Split::Val => 1,
        };
        let key = self.seed ^ (split << 62) ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut rng = ChaCha8Rng::seed_from_u64(key);
        let class = index % CLASSES;
        let s = self.size as f32;
        let background: [f32; 3] = std::array::from_fn(|_| rng.random_range(0.0..255.0));
        // A foreground far enough from the background that the texture is always visible.
        let foreground = loop {
            let c: [f32; 3] = std::array::from_fn(|_| rng.random_range(0.0..255.0));
            let d2: f32 = c
                .iter()
                .zip(&background)
                .map(|(a, b)| (a - b).powi(2))
                .sum();
            if d2 > 120.0f32.powi(2) {
                break c;
            }
        };
        let period = rng.random_range(4.0..8.0) * s / 32.0;
        let (phase_x, phase_y) = (rng.random_range(0.0..period), rng.random_range(0.0..period));
        let (cx, cy) = (rng.random_range(0.0..s), rng.random_range(0.0..s));
        let angle = rng.random_range(0.0..std::f32::consts::TAU);
        let blobs: Vec<(f32, f32, f32)> = (0..rng.random_range(2..5))
            .map(|_| {
                let r = rng.random_range(0.15 * s..0.28 * s);
                (rng.random_range(0.0..s), rng.random_range(0.0..s), r)
            })
            .collect();
        let band = |v: f32, phase: f32| ((v + phase) / period).floor() as i64 % 2 == 0;
        let mut pixels = Vec::with_capacity(3 * self.size * self.size);
        for y in 0..self.size {
            for x in 0..self.size {
                let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
                let (mx, my) = ((px + phase_x) % period, (py + phase_y) % period);
                // Fraction of the foreground colour at this pixel.
                let weight = match class {
                    0 => 0.0,
                    1 => band(py, phase_y) as u8 as f32,
                    2 => band(px, phase_x) as u8 as f32,
                    3 => (band(px, phase_x) ^ band(py, phase_y)) as u8 as f32,
                    4 => (mx < 1.5 || my < 1.5) as u8 as f32,
                    5 => {
                        let (dx, dy) = (mx - period / 2.0, my - period / 2.0);
                        (dx * dx + dy * dy < (period / 3.0).powi(2)) as u8 as f32
                    }
                    6 => band(((px - cx).powi(2) + (py - cy).powi(2)).sqrt(), phase_x) as u8 as f32,
                    7 => {
                        let along = (px - s / 2.0) * angle.cos() + (py - s / 2.0) * angle.sin();
                        (along / s + 0.5).clamp(0.0, 1.0)
                    }
                    8 => rng.random_bool(0.5) as u8 as f32,
                    _ => blobs
                        .iter()
                        .any(|&(bx, by, r)| (px - bx).powi(2) + (py - by).powi(2) < r * r)
                        as u8 as f32,
                };
                for (f, b) in foreground.iter().zip(background) {
                    let noisy = b + weight * (f - b) + rng.random_range(-16.0..16.0);
                    pixels.push(to_u8(noisy));
                }
            }
        }
        Rgb8 {
            width: self.size,
            height: self.size,
            pixels,
        }
    }
}

impl ImageSource for SyntheticImages {
    fn len(&self) -> usize {
        self.len
    }

    fn num_classes(&self) -> usize {
        CLASSES
    }

    fn class_names(&self) -> Option<Vec<String>> {
        Some(CLASS_NAMES.iter().map(|s| s.to_string()).collect())
    }

    fn load(&self, index: usize) -> Result<(Rgb8, u32)> {
        if index >= self.len {
            bail!("synthetic image {index} is past the end ({})", self.len);
        }
        Ok((self.draw(index), (index % CLASSES) as u32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_balanced_and_split_apart() {
        let train = SyntheticImages::new(Split::Train, 50, 32, 3);
        let again = SyntheticImages::new(Split::Train, 50, 32, 3);
        let val = SyntheticImages::new(Split::Val, 50, 32, 3);
        let other_seed = SyntheticImages::new(Split::Train, 50, 32, 4);
        let mut counts = [0; CLASSES];
        for i in 0..50 {
            let (img, label) = train.load(i).unwrap();
            assert_eq!((img.width, img.height, img.pixels.len()), (32, 32, 3072));
            assert_eq!(img, again.load(i).unwrap().0);
            assert_ne!(img, val.load(i).unwrap().0);
            assert_ne!(img, other_seed.load(i).unwrap().0);
            counts[label as usize] += 1;
        }
        assert_eq!(counts, [5; CLASSES]);
        assert!(train.load(50).is_err());
        // Textures are visible: foreground and background differ by 120 in RGB distance, so
        // by at least 120/sqrt(3) in some channel (less the noise); "flat" has no foreground.
        for i in 1..10 {
            let (img, _) = train.load(i).unwrap();
            let spread = (0..3)
                .map(|c| {
                    let channel = img.pixels.iter().skip(c).step_by(3);
                    channel.clone().max().unwrap() - channel.min().unwrap()
                })
                .max()
                .unwrap();
            assert!(spread > 60, "image {i}: channel spread {spread}");
        }
    }
}
