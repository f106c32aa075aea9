//! `synthetic-images`: a small built-in, deterministic and learnable image set.
//!
//! Ten classes of shapes and textures (disk, ring, square, frame, triangle, plus,
//! horizontal stripes, vertical stripes, checkerboard, two dots) in a random foreground
//! colour on a random, contrasting background, at a random place and size, with pixel
//! noise. Each image is a pure function of `(seed, split, index)`, drawn when loaded, so
//! the set costs no memory or disk and train and val never share an image. Class `index %
//! 10`: classes are balanced.

use super::{ImageSource, Rgb8, Split};
use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Classes of the synthetic set.
pub const CLASSES: usize = 10;

/// Class names in label order.
pub const CLASS_NAMES: [&str; CLASSES] = [
    "disk",
    "ring",
    "square",
    "frame",
    "triangle",
    "plus",
    "horizontal-stripes",
    "vertical-stripes",
    "checkerboard",
    "two-dots",
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
        // A foreground far enough from the background that the shape is always visible.
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
        let cx = rng.random_range(0.3 * s..0.7 * s);
        let cy = rng.random_range(0.3 * s..0.7 * s);
        let r = rng.random_range(0.18 * s..0.32 * s);
        let period = rng.random_range(3..7) as f32 * s / 32.0;
        let phase = rng.random_range(0.0..period);
        let mut pixels = Vec::with_capacity(3 * self.size * self.size);
        for y in 0..self.size {
            for x in 0..self.size {
                let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
                let (dx, dy) = (px - cx, py - cy);
                let dist = (dx * dx + dy * dy).sqrt();
                let box_dist = dx.abs().max(dy.abs());
                let band = |v: f32| ((v + phase) / period).floor() as i64 % 2 == 0;
                let inside = match class {
                    0 => dist < r,
                    1 => dist < r && dist > 0.6 * r,
                    2 => box_dist < r,
                    3 => box_dist < r && box_dist > 0.6 * r,
                    4 => dy.abs() < r && dx.abs() < (dy + r) / 2.0,
                    5 => {
                        (dx.abs() < r / 3.0 && dy.abs() < r) || (dy.abs() < r / 3.0 && dx.abs() < r)
                    }
                    6 => band(py),
                    7 => band(px),
                    8 => band(px) ^ band(py),
                    _ => {
                        let d = |ox: f32| ((dx - ox).powi(2) + dy * dy).sqrt() < 0.45 * r;
                        d(-0.6 * r) || d(0.6 * r)
                    }
                };
                let colour = if inside { foreground } else { background };
                for c in colour {
                    let noisy = c + rng.random_range(-16.0..16.0);
                    pixels.push(noisy.round().clamp(0.0, 255.0) as u8);
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
        // Shapes are visible: foreground and background differ by 120 in RGB distance, so by
        // at least 120/sqrt(3) in some channel (less the noise).
        for i in 0..10 {
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
