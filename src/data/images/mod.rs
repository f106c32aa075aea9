//! Image classification data for the ViT: sources, augmentation and the batch pipeline.
//!
//! Layout: [`synthetic`] (a built-in learnable set), [`folder`] (ImageFolder: `DIR/train/<wnid>/*`),
//! [`parquet`] (the hub's imagenet-1k parquet files), [`cifar`] (CIFAR-10 binary batches) are
//! the [`ImageSource`]s, opened by spec with [`open`] / [`open_pair`]; [`resize`] (antialiased
//! bilinear resampling), [`augment`] (random resized crop, flip, the eval crop,
//! normalisation), [`randaugment`] and [`mix`] (Mixup, CutMix, label smoothing) transform
//! them; [`pipeline`] decodes and augments on worker threads into batches.

pub mod augment;
pub mod augment_config;
pub mod cifar;
pub mod folder;
pub mod mix;
pub mod parquet;
pub mod pipeline;
pub mod randaugment;
pub mod resize;
pub mod synthetic;

use crate::data::DataSpec;
use anyhow::{bail, Context, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::ops::Range;

use std::sync::Arc;

/// An 8-bit RGB image: rows top to bottom, pixels interleaved `R, G, B`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rgb8 {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

impl Rgb8 {
    /// An image from its pixels, which must number `3 * width * height`.
    pub fn new(width: usize, height: usize, pixels: Vec<u8>) -> Result<Self> {
        if pixels.len() != 3 * width * height {
            bail!(
                "a {width}x{height} RGB image needs {} bytes, got {}",
                3 * width * height,
                pixels.len()
            );
        }
        Ok(Self {
            width,
            height,
            pixels,
        })
    }

    /// An image of one colour.
    pub fn filled(width: usize, height: usize, rgb: [u8; 3]) -> Self {
        Self {
            width,
            height,
            pixels: rgb.repeat(width * height),
        }
    }

    /// The pixel at column `x`, row `y`.
    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let i = 3 * (y * self.width + x);
        [self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]]
    }

    /// Decodes a JPEG or PNG file's bytes (the format is recognised from the content, not
    /// a file name), converting grey, CMYK and alpha images to RGB. Empty images are errors.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let image = image::load_from_memory(bytes).context("cannot decode the image")?;
        let rgb = image.into_rgb8();
        let (width, height) = (rgb.width() as usize, rgb.height() as usize);
        if width == 0 || height == 0 {
            bail!("the image is empty ({width}x{height})");
        }
        Self::new(width, height, rgb.into_raw())
    }
}

/// `v` rounded to the nearest byte value, clamped to 0-255. Adding one half and truncating
/// rounds halves up, as `round` does for non-negative values, without the `roundf` call that
/// baseline x86-64 makes of `f32::round` (the hot loops of resizing and RandAugment).
#[inline]
pub(crate) fn to_u8(v: f32) -> u8 {
    (v.clamp(0.0, 255.0) + 0.5) as u8
}

/// Which part of a data set to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

impl Split {
    /// `train` or `val`.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }
}

/// A labelled image data set with random access. Implementations are shared by the
/// pipeline's worker threads.
pub trait ImageSource: Send + Sync {
    /// Images in the set.
    fn len(&self) -> usize;

    /// True when the set holds no image.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Classes; every label is below this.
    fn num_classes(&self) -> usize;

    /// Class names in label order, where the set has them (ImageFolder's folder names).
    fn class_names(&self) -> Option<Vec<String>> {
        None
    }

    /// Decodes image `index` (below [`ImageSource::len`]) and returns it with its label. An
    /// unreadable or corrupt image is an error naming it; the pipeline skips it.
    fn load(&self, index: usize) -> Result<(Rgb8, u32)>;

    /// Index ranges that are cheap to read together (a parquet row group); shuffling stays
    /// within a window of a few of them. One range over everything means no constraint.
    fn locality(&self) -> Vec<Range<usize>> {
        std::iter::once(0..self.len()).collect()
    }
}

/// Opens split `split` of an image source: `synthetic-images` (the built-in set,
/// [`synthetic`]), `imagefolder:DIR` (`DIR/train/<class>/*.JPEG`, `DIR/val/<class>/...`),
/// `parquet:DIR` (hub parquet files `train-*.parquet` / `validation-*.parquet` under DIR)
/// or `cifar10:DIR` (the CIFAR-10 binary batches).
pub fn open(spec: &DataSpec, split: Split) -> Result<Arc<dyn ImageSource>> {
    let source: Arc<dyn ImageSource> = match spec {
        DataSpec::SyntheticImages => Arc::new(synthetic::SyntheticImages::standard(split)),
        DataSpec::ImageFolder(dir) => Arc::new(folder::ImageFolder::open(dir, split)?),
        DataSpec::Parquet(dir) => Arc::new(parquet::ParquetImages::open(dir, split)?),
        DataSpec::Cifar10(dir) => Arc::new(cifar::Cifar10::open(dir, split)?),
        other => bail!(
            "a ViT trains on images, not '{other}': pass --data synthetic-images (built in), \
             imagefolder:DIR (train/<class>/*.JPEG and val/<class>/*.JPEG), parquet:DIR (the \
             hub's imagenet-1k parquet files) or cifar10:DIR"
        ),
    };
    if source.is_empty() {
        bail!("the {} split of '{spec}' holds no image", split.name());
    }
    Ok(source)
}

/// Opens the train and validation splits of `spec` and checks they agree on the classes:
/// the same number, and the same names where the source has names.
pub fn open_pair(spec: &DataSpec) -> Result<(Arc<dyn ImageSource>, Arc<dyn ImageSource>)> {
    let train = open(spec, Split::Train)?;
    let val = open(spec, Split::Val)?;
    check_same_classes(spec, train.as_ref(), val.as_ref())?;
    Ok((train, val))
}

/// Errors when `train` and `val` disagree on the classes, naming the first difference.
pub fn check_same_classes(
    spec: &DataSpec,
    train: &dyn ImageSource,
    val: &dyn ImageSource,
) -> Result<()> {
    if let (Some(t), Some(v)) = (train.class_names(), val.class_names()) {
        if t != v {
            let only_train: Vec<&String> = t.iter().filter(|c| !v.contains(c)).take(3).collect();
            let only_val: Vec<&String> = v.iter().filter(|c| !t.contains(c)).take(3).collect();
            bail!(
                "'{spec}': train has {} classes and val {}; they must match (only in train: \
                 {only_train:?}, only in val: {only_val:?})",
                t.len(),
                v.len()
            );
        }
    }
    if train.num_classes() != val.num_classes() {
        bail!(
            "'{spec}': train has {} classes and val {}; they must match",
            train.num_classes(),
            val.num_classes()
        );
    }
    Ok(())
}

/// Random streams of the pipeline, kept apart by a domain tag.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stream {
    /// The epoch's shuffle.
    Shuffle = 1,
    /// One sample's augmentation.
    Sample = 2,
    /// One batch's Mixup/CutMix.
    Mix = 3,
}

/// A generator determined by `(seed, stream, a, b)` alone: ChaCha8 keyed by the four words,
/// so any sample's or batch's randomness can be recreated without replaying the ones before
/// it (what makes the pipeline independent of thread count and resumable anywhere).
pub(crate) fn keyed_rng(seed: u64, stream: Stream, a: u64, b: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    for (chunk, word) in key.chunks_mut(8).zip([seed, stream as u64, a, b]) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    ChaCha8Rng::from_seed(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_png_and_jpeg_and_rejects_garbage() {
        let img = synthetic::SyntheticImages::new(Split::Train, 4, 16, 0)
            .load(1)
            .unwrap()
            .0;
        let png = encode(&img, image::ImageFormat::Png);
        assert_eq!(Rgb8::decode(&png).unwrap(), img);
        let jpeg = encode(&img, image::ImageFormat::Jpeg);
        let decoded = Rgb8::decode(&jpeg).unwrap();
        assert_eq!((decoded.width, decoded.height), (16, 16));
        let err = Rgb8::decode(b"not an image").unwrap_err();
        assert!(format!("{err:#}").contains("cannot decode"), "{err:#}");
        assert!(Rgb8::new(2, 2, vec![0; 11]).is_err());
    }

    /// Encodes `img` with the image crate (tests build data sets this way).
    pub(crate) fn encode(img: &Rgb8, format: image::ImageFormat) -> Vec<u8> {
        let buffer =
            image::RgbImage::from_raw(img.width as u32, img.height as u32, img.pixels.clone())
                .unwrap();
        let mut out = std::io::Cursor::new(Vec::new());
        buffer.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    #[test]
    fn keyed_streams_differ_and_repeat() {
        use rand::Rng;
        let draw = |s, a, b| keyed_rng(7, s, a, b).random::<u64>();
        assert_eq!(draw(Stream::Sample, 3, 4), draw(Stream::Sample, 3, 4));
        assert_ne!(draw(Stream::Sample, 3, 4), draw(Stream::Sample, 4, 3));
        assert_ne!(draw(Stream::Sample, 3, 4), draw(Stream::Mix, 3, 4));
        let err = open(&DataSpec::Builtin, Split::Train)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("a ViT trains on images, not 'builtin'"),
            "{err}"
        );
    }
}
