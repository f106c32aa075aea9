//! The image pipeline end to end: batches independent of the thread count, exact resume,
//! ranks that split the global batch, evaluation passes, unreadable images, and its speed.

use bsfa_train::data::images::mix::MixConfig;
use bsfa_train::data::images::pipeline::{
    measure_throughput, ImageBatch, ImagePipeline, ImagePosition, PipelineConfig, Transform,
};
use bsfa_train::data::images::synthetic::SyntheticImages;
use bsfa_train::data::images::{self, ImageSource, Rgb8, Split};
use std::path::Path;
use std::sync::Arc;

fn synthetic(len: usize) -> Arc<dyn ImageSource> {
    Arc::new(SyntheticImages::new(Split::Train, len, 32, 1))
}

/// What a batch holds, as plain values.
#[derive(Debug, PartialEq)]
struct Plain {
    images: Vec<f32>,
    targets: Vec<f32>,
    labels: Vec<u32>,
    position: ImagePosition,
}

fn plain(b: ImageBatch) -> Plain {
    Plain {
        images: b.images.flatten_all().unwrap().to_vec1().unwrap(),
        targets: b.soft_targets.flatten_all().unwrap().to_vec1().unwrap(),
        labels: b.labels,
        position: b.position,
    }
}

fn take(
    source: &Arc<dyn ImageSource>,
    config: &PipelineConfig,
    from: ImagePosition,
    n: usize,
) -> Vec<Plain> {
    ImagePipeline::start(source.clone(), config.clone(), from)
        .unwrap()
        .take(n)
        .map(|b| plain(b.unwrap()))
        .collect()
}

/// 37 images in batches of 8: epochs end inside batches.
#[test]
fn batches_are_the_same_for_any_thread_count_and_resume_exactly() {
    let source = synthetic(37);
    let mut config = PipelineConfig::paper_train(8, 32, 1);
    let one = take(&source, &config, ImagePosition::start(5), 7);
    config.threads = 3;
    config.prefetch = 4;
    let three = take(&source, &config, ImagePosition::start(5), 7);
    assert_eq!(one, three);
    for (k, batch) in one.iter().enumerate() {
        assert_eq!(batch.images.len(), 8 * 3 * 32 * 32);
        assert_eq!(batch.position.samples, 8 * (k as u64 + 1));
        // Mixup is a convex combination, so values stay in [-1, 1]; targets sum to 1.
        assert!(batch.images.iter().all(|v| (-1.0..=1.0).contains(v)));
        for row in batch.targets.chunks(10) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
    }
    // Every image appears once per epoch (slots 0..37 are epoch 0).
    let mut first_epoch: Vec<u32> = one.iter().flat_map(|b| b.labels.clone()).take(37).collect();
    first_epoch.sort();
    let mut expected: Vec<u32> = (0..37).map(|i| i % 10).collect();
    expected.sort();
    assert_eq!(first_epoch, expected);
    // Restarting from batch 2's position replays batches 3.. exactly.
    let resumed = take(&source, &config, one[1].position, 5);
    assert_eq!(&one[2..], &resumed[..]);
    // Another seed gives other batches.
    assert_ne!(
        take(&source, &config, ImagePosition::start(6), 1)[0],
        one[0]
    );
}

#[test]
fn ranks_split_each_global_batch() {
    let source = synthetic(50);
    let mut config = PipelineConfig::paper_train(8, 32, 2);
    // Without mixing (which mixes within each rank's share) the shares are exactly the
    // one-rank batch's halves.
    if let Transform::Train { mix, .. } = &mut config.transform {
        *mix = MixConfig::NONE;
    }
    let whole = take(&source, &config, ImagePosition::start(1), 3);
    config.world = 2;
    let halves: Vec<Vec<Plain>> = (0..2)
        .map(|rank| {
            let mut c = config.clone();
            c.rank = rank;
            take(&source, &c, ImagePosition::start(1), 3)
        })
        .collect();
    for (k, batch) in whole.iter().enumerate() {
        let (a, b) = (&halves[0][k], &halves[1][k]);
        assert_eq!([a.labels.clone(), b.labels.clone()].concat(), batch.labels);
        assert_eq!([a.images.clone(), b.images.clone()].concat(), batch.images);
        assert_eq!(a.position, batch.position);
    }
}

#[test]
fn evaluation_covers_every_image_once_in_order() {
    let source: Arc<dyn ImageSource> = Arc::new(SyntheticImages::new(Split::Val, 21, 32, 1));
    let config = PipelineConfig::eval(8, 32, 1.0, 2);
    let batches = take(&source, &config, ImagePosition::start(0), 10);
    assert_eq!(batches.len(), 3);
    assert_eq!(batches[2].labels.len(), 5);
    assert_eq!(batches[2].position.samples, 21);
    let labels: Vec<u32> = batches.iter().flat_map(|b| b.labels.clone()).collect();
    assert_eq!(labels, (0..21).map(|i| i % 10).collect::<Vec<_>>());
    // One-hot targets; crop fraction 1 at the source's size is the image itself.
    assert_eq!(
        batches[0].targets[..10],
        [1.0, 0., 0., 0., 0., 0., 0., 0., 0., 0.]
    );
    let (img, _) = source.load(0).unwrap();
    let red: Vec<f32> = img
        .pixels
        .iter()
        .step_by(3)
        .map(|&v| v as f32 / 127.5 - 1.0)
        .collect();
    for (a, b) in batches[0].images[..1024].iter().zip(&red) {
        assert!((a - b).abs() < 1e-6);
    }
}

/// Writes an ImageFolder of JPEGs (`classes` classes, `per_class` images each, `w x h`
/// pixels, drawn from the synthetic set and resized) under `dir/split`.
fn write_jpeg_folder(
    dir: &Path,
    split: &str,
    classes: usize,
    per_class: usize,
    w: usize,
    h: usize,
) {
    let source = SyntheticImages::new(Split::Train, classes * per_class, 64, 9);
    for c in 0..classes {
        let folder = dir.join(split).join(format!("n{c:08}"));
        std::fs::create_dir_all(&folder).unwrap();
        for i in 0..per_class {
            let small = source.load(c + classes * i).unwrap().0;
            let img = image::RgbImage::from_raw(64, 64, small.pixels).unwrap();
            let img = image::imageops::resize(
                &img,
                w as u32,
                h as u32,
                image::imageops::FilterType::Triangle,
            );
            img.save(folder.join(format!("img_{i:04}.JPEG"))).unwrap();
        }
    }
}

#[test]
fn unreadable_images_are_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    write_jpeg_folder(dir.path(), "train", 3, 4, 40, 30);
    write_jpeg_folder(dir.path(), "val", 3, 2, 40, 30);
    std::fs::write(
        dir.path().join("train/n00000001/img_0002.JPEG"),
        b"not a jpeg",
    )
    .unwrap();
    std::fs::write(dir.path().join("val/n00000002/img_0000.JPEG"), b"").unwrap();
    let spec = format!("imagefolder:{}", dir.path().display())
        .parse()
        .unwrap();
    let (train, val) = images::open_pair(&spec).unwrap();
    let config = PipelineConfig::paper_train(5, 24, 2);
    let mut pipeline =
        ImagePipeline::start(train.clone(), config.clone(), ImagePosition::start(0)).unwrap();
    // Five batches of 5 are 25 slots: two epochs of 12 and one more.
    for _ in 0..5 {
        let batch = pipeline.next_batch().unwrap().unwrap();
        assert_eq!(batch.images.dims(), [5, 3, 24, 24]);
    }
    assert_eq!(pipeline.skipped(), 1);
    // The same batches with more threads, the bad image and all.
    let a = take(&train, &config, ImagePosition::start(0), 5);
    let b = take(
        &train,
        &PipelineConfig {
            threads: 1,
            ..config
        },
        ImagePosition::start(0),
        5,
    );
    assert_eq!(a, b);

    let mut eval = ImagePipeline::start(
        val,
        PipelineConfig::eval(4, 24, 0.875, 2),
        ImagePosition::start(0),
    )
    .unwrap();
    let mut seen = 0;
    while let Some(batch) = eval.next_batch().unwrap() {
        seen += batch.labels.len();
    }
    assert_eq!((seen, eval.skipped()), (5, 1));
}

/// The data set of only unreadable images is an error, not an endless search.
#[test]
fn a_set_without_readable_images_is_an_error() {
    struct Broken;
    impl ImageSource for Broken {
        fn len(&self) -> usize {
            3
        }
        fn num_classes(&self) -> usize {
            2
        }
        fn load(&self, index: usize) -> anyhow::Result<(Rgb8, u32)> {
            anyhow::bail!("image {index} is broken")
        }
    }
    let mut pipeline = ImagePipeline::start(
        Arc::new(Broken),
        PipelineConfig::paper_train(2, 8, 1),
        ImagePosition::start(0),
    )
    .unwrap();
    let err = pipeline.next_batch().err().unwrap().to_string();
    assert!(
        err.contains("no image of the data set could be read"),
        "{err}"
    );
    assert_eq!(pipeline.skipped(), 3);
}

/// Measures the pipeline on the built-in set and on a JPEG ImageFolder and prints images/s
/// (run with `--nocapture` to see them).
#[test]
fn throughput_is_measured() {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let source = synthetic(2048);
    let report =
        measure_throughput(source, PipelineConfig::paper_train(128, 32, threads), 0, 4).unwrap();
    assert_eq!((report.images, report.batches), (512, 4));
    assert!(report.images_per_s > 0.0);
    println!("synthetic-images 32x32 -> 32: {report:?}");

    let dir = tempfile::tempdir().unwrap();
    write_jpeg_folder(dir.path(), "train", 4, 16, 500, 375);
    let spec = format!("imagefolder:{}", dir.path().display())
        .parse()
        .unwrap();
    let source = images::open(&spec, Split::Train).unwrap();
    let config = PipelineConfig::paper_train(32, 224, threads);
    let report = measure_throughput(source, config, 0, 2).unwrap();
    assert_eq!(report.images, 64);
    println!("ImageFolder JPEG 500x375 -> 224: {report:?}");
}
