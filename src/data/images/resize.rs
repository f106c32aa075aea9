//! Bilinear resampling of an image region, antialiased as PIL's `resize(BILINEAR)` (what
//! torchvision's `RandomResizedCrop` runs on PIL images): when shrinking, the triangle
//! filter widens by the scale factor so every source pixel contributes, instead of
//! sampling four and aliasing.

use super::{to_u8, Rgb8};
use anyhow::{bail, Result};

/// A pixel rectangle inside an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crop {
    pub x: usize,
    pub y: usize,
    pub width: usize,
    pub height: usize,
}

impl Crop {
    /// The whole of `img`.
    pub fn all(img: &Rgb8) -> Self {
        Self {
            x: 0,
            y: 0,
            width: img.width,
            height: img.height,
        }
    }
}

/// Per output position along one axis: the first source index and the normalised weights.
fn axis_weights(src: usize, dst: usize) -> Vec<(usize, Vec<f32>)> {
    let scale = src as f64 / dst as f64;
    let support = scale.max(1.0);
    (0..dst)
        .map(|i| {
            let centre = (i as f64 + 0.5) * scale;
            let lo = ((centre - support).floor().max(0.0)) as usize;
            let hi = ((centre + support).ceil() as usize).min(src);
            let mut w: Vec<f64> = (lo..hi)
                .map(|j| (1.0 - ((j as f64 + 0.5 - centre) / support).abs()).max(0.0))
                .collect();
            let total: f64 = w.iter().sum();
            w.iter_mut().for_each(|v| *v /= total);
            // Trim zero weights at both ends so the inner loops skip them.
            let first = w.iter().position(|&v| v > 0.0).unwrap_or(0);
            let last = w.iter().rposition(|&v| v > 0.0).map_or(w.len(), |p| p + 1);
            (
                lo + first,
                w[first..last].iter().map(|&v| v as f32).collect(),
            )
        })
        .collect()
}

/// Resamples `crop` of `img` to `width x height`. Taking all of an image to its own size
/// returns it unchanged. Crops outside the image, or empty sizes, are errors.
pub fn resize_crop(img: &Rgb8, crop: Crop, width: usize, height: usize) -> Result<Rgb8> {
    if crop.width == 0
        || crop.height == 0
        || crop.x + crop.width > img.width
        || crop.y + crop.height > img.height
        || width == 0
        || height == 0
    {
        bail!(
            "cannot resize {crop:?} of a {}x{} image to {width}x{height}",
            img.width,
            img.height
        );
    }
    let xs = axis_weights(crop.width, width);
    let ys = axis_weights(crop.height, height);
    // Horizontal pass over the crop's rows, then vertical.
    let mut rows = vec![0f32; crop.height * width * 3];
    for r in 0..crop.height {
        let src = &img.pixels[3 * ((crop.y + r) * img.width + crop.x)..];
        let out = &mut rows[r * width * 3..(r + 1) * width * 3];
        for (o, (first, w)) in out.chunks_mut(3).zip(&xs) {
            let mut acc = [0f32; 3];
            for (k, &wk) in w.iter().enumerate() {
                let p = &src[3 * (first + k)..3 * (first + k) + 3];
                acc[0] += wk * p[0] as f32;
                acc[1] += wk * p[1] as f32;
                acc[2] += wk * p[2] as f32;
            }
            o.copy_from_slice(&acc);
        }
    }
    let row_len = width * 3;
    let mut pixels = vec![0u8; width * height * 3];
    let mut acc = vec![0f32; row_len];
    for (y, (first, w)) in ys.iter().enumerate() {
        // Whole rows at a time: contiguous multiply-adds the compiler vectorises.
        acc.fill(0.0);
        for (k, &wk) in w.iter().enumerate() {
            let src = &rows[(first + k) * row_len..(first + k + 1) * row_len];
            acc.iter_mut().zip(src).for_each(|(a, &v)| *a += wk * v);
        }
        let out = &mut pixels[y * row_len..(y + 1) * row_len];
        for (o, &a) in out.iter_mut().zip(&acc) {
            *o = to_u8(a);
        }
    }
    Rgb8::new(width, height, pixels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: usize, h: usize) -> Rgb8 {
        let pixels = (0..h)
            .flat_map(|y| (0..w).flat_map(move |x| [(x * 255 / w) as u8, (y * 255 / h) as u8, 77]))
            .collect();
        Rgb8::new(w, h, pixels).unwrap()
    }

    #[test]
    fn identity_crop_and_constant_images_are_preserved() {
        let img = gradient(13, 9);
        assert_eq!(resize_crop(&img, Crop::all(&img), 13, 9).unwrap(), img);
        let crop = Crop {
            x: 2,
            y: 3,
            width: 5,
            height: 4,
        };
        let cut = resize_crop(&img, crop, 5, 4).unwrap();
        assert_eq!(cut.pixel(0, 0), img.pixel(2, 3));
        assert_eq!(cut.pixel(4, 3), img.pixel(6, 6));
        let flat = Rgb8::filled(40, 30, [10, 200, 99]);
        for (w, h) in [(7, 5), (64, 64), (40, 1)] {
            assert_eq!(
                resize_crop(&flat, Crop::all(&flat), w, h).unwrap(),
                Rgb8::filled(w, h, [10, 200, 99])
            );
        }
        assert!(resize_crop(
            &img,
            Crop {
                x: 10,
                y: 0,
                width: 5,
                height: 1
            },
            4,
            4
        )
        .is_err());
    }

    #[test]
    fn shrinking_averages_and_upscaling_interpolates() {
        // A 1-pixel checkerboard shrunk 4x becomes its mean grey (antialiasing), where
        // point sampling would keep black or white.
        let pixels = (0..16 * 16)
            .flat_map(|i| {
                let v = if (i % 16 + i / 16) % 2 == 0 { 0 } else { 255 };
                [v, v, v]
            })
            .collect();
        let board = Rgb8::new(16, 16, pixels).unwrap();
        let small = resize_crop(&board, Crop::all(&board), 4, 4).unwrap();
        assert!(
            small.pixels.iter().all(|&v| (120..=135).contains(&v)),
            "{:?}",
            small.pixels
        );
        // Upscaling a 2-pixel ramp gives values between the ends, monotone.
        let ramp = Rgb8::new(2, 1, vec![0, 0, 0, 200, 200, 200]).unwrap();
        let up = resize_crop(&ramp, Crop::all(&ramp), 8, 1).unwrap();
        let reds: Vec<u8> = up.pixels.chunks(3).map(|p| p[0]).collect();
        assert!(reds.windows(2).all(|w| w[0] <= w[1]), "{reds:?}");
        assert_eq!((reds[0], reds[7]), (0, 200));
    }
}
