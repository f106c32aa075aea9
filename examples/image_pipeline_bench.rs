//! Measures the image pipeline's training throughput (decode, random resized crop, flip,
//! RandAugment 2/10, Mixup, normalisation) on `synthetic-images` and on a generated
//! ImageFolder of photo-sized JPEGs, and prints one JSON line per source.
//!
//! `cargo run --release --example image_pipeline_bench -- [THREADS] [IMAGES]`
//! (default: every core, 256 JPEGs of 500x375, ImageNet's typical size, in 8 classes).

use anyhow::Result;
use bsfa_train::data::images::pipeline::{measure_throughput, PipelineConfig};
use bsfa_train::data::images::synthetic::SyntheticImages;
use bsfa_train::data::images::{self, ImageSource, Split};
use std::path::Path;
use std::sync::Arc;

/// Writes `count` JPEGs of `width x height` in 8 class folders under `dir/train`, cut from
/// full-size synthetic textures (pixel noise included, so they compress like photos rather
/// than like flat drawings). Returns the mean file size in bytes.
fn write_folder(dir: &Path, count: usize, width: u32, height: u32) -> Result<usize> {
    let source = SyntheticImages::new(Split::Train, count, width.max(height) as usize, 3);
    let mut bytes = 0;
    for i in 0..count {
        let folder = dir.join("train").join(format!("n{:08}", i % 8));
        std::fs::create_dir_all(&folder)?;
        let img = source.load(i)?.0;
        let full = image::RgbImage::from_raw(img.width as u32, img.height as u32, img.pixels)
            .expect("pixel count matches");
        let cut = image::imageops::crop_imm(&full, 0, 0, width, height).to_image();
        let path = folder.join(format!("img_{i:05}.JPEG"));
        cut.save(&path)?;
        bytes += std::fs::metadata(&path)?.len() as usize;
    }
    Ok(bytes / count.max(1))
}

fn main() -> Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = args.first().copied().unwrap_or(cores);
    let count = args.get(1).copied().unwrap_or(256);

    let synthetic: Arc<dyn ImageSource> = Arc::new(SyntheticImages::new(Split::Train, 8192, 32, 0));
    let report = measure_throughput(
        synthetic,
        PipelineConfig::paper_train(256, 32, threads),
        0,
        16,
    )?;
    println!(
        "{{\"source\": \"synthetic-images 32x32\", \"output\": 32, \"threads\": {threads}, \
         \"images_per_s\": {:.0}, \"images\": {}}}",
        report.images_per_s, report.images
    );

    let dir = tempfile::tempdir()?;
    let mean_bytes = write_folder(dir.path(), count, 500, 375)?;
    let spec = format!("imagefolder:{}", dir.path().display()).parse()?;
    let folder = images::open(&spec, Split::Train)?;
    let batch = 32;
    let batches = (count / batch).saturating_sub(1).max(1);
    let report = measure_throughput(
        folder,
        PipelineConfig::paper_train(batch, 224, threads),
        0,
        batches,
    )?;
    println!(
        "{{\"source\": \"ImageFolder JPEG 500x375 (mean {mean_bytes} bytes)\", \"output\": 224, \
         \"threads\": {threads}, \"images_per_s\": {:.0}, \"images\": {}}}",
        report.images_per_s, report.images
    );
    Ok(())
}
