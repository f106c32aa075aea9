//! The image batch pipeline: decoding and augmentation on a pool of worker threads, batches
//! assembled (and mixed) on a background thread and prefetched, exactly reproducible.
//!
//! Training reads an endless stream of "slots": slot `s` is position `s % N` of epoch
//! `s / N`'s shuffled order of the `N` images. Every random choice is keyed by what it
//! belongs to (the epoch's shuffle by the epoch, a sample's augmentation by its slot, a
//! batch's Mixup/CutMix by its first slot; see `keyed_rng`), never drawn from a shared
//! sequence, so batches are the same whatever the thread count, and a run resumes exactly
//! from the [`ImagePosition`] (slots consumed) of its last batch.
//!
//! Data parallelism follows the token loader: each of `world` ranks takes its contiguous
//! `global_batch / world` share of every global batch, so the union over ranks is the
//! one-rank batch (Mixup/CutMix then mixes within each rank's share).
//!
//! An unreadable or corrupt image is skipped with a warning on stderr (the first ten, then
//! at every power of ten) and counted ([`ImagePipeline::skipped`]). In training its slot
//! takes the next readable image of the epoch's order instead, so every batch stays full
//! and the stream's positions do not move (the stand-in appears twice that epoch, with
//! different augmentations); in evaluation it is left out of its batch, so every readable
//! image counts exactly once.

use super::augment::{EvalTransform, Normalize, TrainAugment};
use super::mix::{draw_mix, mix_images, soft_targets, MixConfig};
use super::{keyed_rng, ImageSource, Stream};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Instant;

/// Where a pipeline stands: its seed and the slots (samples of the stream, over all ranks)
/// consumed by the batches delivered so far. Saved with a checkpoint, it restarts the
/// pipeline at the next batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagePosition {
    pub seed: u64,
    pub samples: u64,
}

impl ImagePosition {
    /// The start of the stream for `seed`.
    pub fn start(seed: u64) -> Self {
        Self { seed, samples: 0 }
    }

    /// The epoch the next sample belongs to, for a set of `len` images.
    pub fn epoch(&self, len: usize) -> u64 {
        self.samples / len.max(1) as u64
    }
}

/// What the pipeline does to each image.
#[derive(Debug, Clone, PartialEq)]
pub enum Transform {
    /// Endless shuffled epochs, augmented and mixed.
    Train {
        augment: TrainAugment,
        mix: MixConfig,
        /// Locality groups (parquet row groups) pooled per shuffle window; sources without
        /// locality are shuffled whole.
        shuffle_window: usize,
    },
    /// One pass in order with the eval crop and one-hot targets; the last batch may be
    /// short.
    Eval(EvalTransform),
}

/// Row groups pooled per shuffle window by default (a few thousand images of a hub parquet
/// set, about 180 MB of ImageNet JPEGs in the row-group cache).
pub const DEFAULT_SHUFFLE_WINDOW: usize = 16;

/// How the pipeline shapes batches and where it runs.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineConfig {
    /// Images per optimizer step over all ranks.
    pub global_batch: usize,
    /// This process's data-parallel rank and the number of ranks.
    pub rank: usize,
    pub world: usize,
    /// Decoding/augmentation worker threads (0: every core).
    pub threads: usize,
    /// Batches prepared ahead of the consumer.
    pub prefetch: usize,
    pub transform: Transform,
    pub normalize: Normalize,
}

impl PipelineConfig {
    /// The paper's training pipeline at `image_size` (random resized crop, flip,
    /// RandAugment 2 ops at magnitude 10, Mixup alpha 0.2, values in [-1, 1]) on one rank.
    pub fn paper_train(global_batch: usize, image_size: usize, threads: usize) -> Self {
        Self {
            global_batch,
            rank: 0,
            world: 1,
            threads,
            prefetch: 2,
            transform: Transform::Train {
                augment: TrainAugment::paper(image_size),
                mix: MixConfig::PAPER,
                shuffle_window: DEFAULT_SHUFFLE_WINDOW,
            },
            normalize: Normalize::MINUS_ONE_TO_ONE,
        }
    }

    /// The evaluation pipeline: centre crop of `crop_fraction` (0.875 for ImageNet, 1 for
    /// sets at the model's size) resized to `image_size`, values in [-1, 1], on one rank.
    pub fn eval(
        global_batch: usize,
        image_size: usize,
        crop_fraction: f64,
        threads: usize,
    ) -> Self {
        Self {
            global_batch,
            rank: 0,
            world: 1,
            threads,
            prefetch: 2,
            transform: Transform::Eval(EvalTransform {
                image_size,
                crop_fraction,
            }),
            normalize: Normalize::MINUS_ONE_TO_ONE,
        }
    }

    /// Side of the output images.
    pub fn image_size(&self) -> usize {
        match &self.transform {
            Transform::Train { augment, .. } => augment.image_size,
            Transform::Eval(t) => t.image_size,
        }
    }

    /// Images per batch on this rank.
    pub fn local_batch(&self) -> usize {
        self.global_batch / self.world.max(1)
    }

    /// Checks shapes and ranges.
    pub fn validate(&self) -> Result<()> {
        if self.world == 0 || self.rank >= self.world {
            bail!(
                "data-parallel rank {} is not below the world size {}",
                self.rank,
                self.world
            );
        }
        if self.global_batch == 0 || !self.global_batch.is_multiple_of(self.world) {
            bail!(
                "the batch size ({}) must be a positive multiple of the number of ranks ({})",
                self.global_batch,
                self.world
            );
        }
        match &self.transform {
            Transform::Train {
                augment,
                mix,
                shuffle_window,
            } => {
                augment.validate()?;
                if let Some(ra) = &augment.randaugment {
                    ra.validate()?;
                }
                mix.validate()?;
                if *shuffle_window == 0 {
                    bail!("the shuffle window must hold at least one row group");
                }
            }
            Transform::Eval(t) => {
                if t.image_size == 0 || !(t.crop_fraction > 0.0 && t.crop_fraction <= 1.0) {
                    bail!("eval image size must be positive and crop fraction in (0, 1]");
                }
            }
        }
        Ok(())
    }
}

/// One batch for this rank.
pub struct ImageBatch {
    /// `batch x 3 x image_size x image_size`, f32 on the CPU, normalised.
    pub images: Tensor,
    /// `batch x classes`, f32, rows summing to 1 (label smoothing and mixing included).
    pub soft_targets: Tensor,
    /// Each image's own label (before mixing), for accuracy.
    pub labels: Vec<u32>,
    /// The pipeline's position after this batch: where a resumed run continues.
    pub position: ImagePosition,
}

/// The image order of `epoch`: a permutation of `0..len` when `groups` is one range, else
/// the groups shuffled and pooled `window` at a time, each pool shuffled.
pub fn epoch_order(
    groups: &[std::ops::Range<usize>],
    seed: u64,
    epoch: u64,
    window: usize,
) -> Vec<usize> {
    let mut rng = keyed_rng(seed, Stream::Shuffle, epoch, 0);
    let mut groups = groups.to_vec();
    groups.shuffle(&mut rng);
    let mut order = Vec::with_capacity(groups.iter().map(|g| g.len()).sum());
    for pool in groups.chunks(window.max(1)) {
        let start = order.len();
        order.extend(pool.iter().flat_map(|g| g.clone()));
        order[start..].shuffle(&mut rng);
    }
    order
}

/// The work shared by the batch thread and its workers.
struct Producer {
    source: Arc<dyn ImageSource>,
    config: PipelineConfig,
    seed: u64,
    pool: rayon::ThreadPool,
    /// Images found unreadable: never retried, counted once.
    bad: RwLock<HashSet<usize>>,
    skipped: Arc<AtomicU64>,
    orders: HashMap<u64, Arc<Vec<usize>>>,
}

/// One processed image: its normalised pixels and label.
type Sample = (Vec<f32>, u32);

impl Producer {
    /// Records image `index` as unreadable and warns (the first ten, then at powers of ten).
    fn skip(&self, index: usize, error: &anyhow::Error) {
        if self.bad.write().expect("bad-image set").insert(index) {
            let n = self.skipped.fetch_add(1, Ordering::Relaxed) + 1;
            if n <= 10 || is_power_of_ten(n) {
                eprintln!(
                    "warning: skipping unreadable image {index}: {error:#} ({n} skipped so far)"
                );
            }
        }
    }

    fn is_bad(&self, index: usize) -> bool {
        self.bad.read().expect("bad-image set").contains(&index)
    }

    /// Loads image `index` and transforms it with `transform`; None if unreadable.
    fn load(
        &self,
        index: usize,
        transform: impl FnOnce(&super::Rgb8) -> Result<super::Rgb8>,
    ) -> Result<Option<Sample>> {
        if self.is_bad(index) {
            return Ok(None);
        }
        let (img, label) = match self.source.load(index) {
            Ok(loaded) => loaded,
            Err(e) => {
                self.skip(index, &e);
                return Ok(None);
            }
        };
        if label as usize >= self.source.num_classes() {
            bail!(
                "image {index} has label {label}, not below the {} classes",
                self.source.num_classes()
            );
        }
        let img = transform(&img)?;
        let mut pixels = vec![0f32; 3 * img.width * img.height];
        self.config.normalize.write_chw(&img, &mut pixels);
        Ok(Some((pixels, label)))
    }

    /// The training sample of `slot`: the image at its place in its epoch's order, or the
    /// next readable one after it, augmented from the slot's own generator.
    fn train_sample(&self, slot: u64, order: &[usize], augment: &TrainAugment) -> Result<Sample> {
        let n = order.len();
        let offset = (slot % n as u64) as usize;
        for k in 0..n {
            let index = order[(offset + k) % n];
            let mut rng = keyed_rng(self.seed, Stream::Sample, slot, 0);
            if let Some(sample) = self.load(index, |img| augment.apply(img, &mut rng))? {
                return Ok(sample);
            }
        }
        bail!("no image of the data set could be read");
    }

    /// The order of `epoch`, computed once and kept while batches still need it.
    fn order(&mut self, epoch: u64, window: usize) -> Arc<Vec<usize>> {
        if !self.orders.contains_key(&epoch) {
            self.orders.retain(|&e, _| e + 1 >= epoch);
            let order = epoch_order(&self.source.locality(), self.seed, epoch, window);
            self.orders.insert(epoch, Arc::new(order));
        }
        self.orders[&epoch].clone()
    }

    /// Slots of this rank in the global batch starting at `first`.
    fn local_slots(&self, first: u64) -> std::ops::Range<u64> {
        let local = self.config.local_batch() as u64;
        let start = first + self.config.rank as u64 * local;
        start..start + local
    }

    /// Builds the training batch that starts at global slot `first`.
    fn train_batch(&mut self, first: u64) -> Result<ImageBatch> {
        let Transform::Train {
            augment,
            mix,
            shuffle_window,
        } = self.config.transform.clone()
        else {
            unreachable!("train_batch runs only for Transform::Train");
        };
        let n = self.source.len() as u64;
        let slots = self.local_slots(first);
        let epochs = (slots.start / n)..=((slots.end - 1) / n);
        let orders: HashMap<u64, Arc<Vec<usize>>> =
            epochs.map(|e| (e, self.order(e, shuffle_window))).collect();
        let this = &*self;
        let samples: Vec<Sample> = self.pool.install(|| {
            slots
                .clone()
                .into_par_iter()
                .map(|slot| this.train_sample(slot, &orders[&(slot / n)], &augment))
                .collect::<Result<_>>()
        })?;
        let size = augment.image_size;
        let mut rng = keyed_rng(self.seed, Stream::Mix, slots.start, 0);
        let mixing = draw_mix(&mix, size, size, &mut rng);
        let (mut pixels, labels) = flatten(samples);
        mix_images(&mixing, &mut pixels, labels.len(), 3, size, size);
        let targets = soft_targets(
            &labels,
            self.source.num_classes(),
            mix.label_smoothing,
            &mixing,
        );
        let position = ImagePosition {
            seed: self.seed,
            samples: first + self.config.global_batch as u64,
        };
        self.batch(pixels, targets, labels, size, position)
    }

    /// Builds the eval batch that starts at global position `first` (None past the end);
    /// unreadable images are left out.
    fn eval_batch(&self, first: u64, transform: &EvalTransform) -> Result<Option<ImageBatch>> {
        let n = self.source.len() as u64;
        if first >= n {
            return Ok(None);
        }
        let slots = self.local_slots(first);
        let slots = slots.start.min(n)..slots.end.min(n);
        let samples: Vec<Option<Sample>> = self.pool.install(|| {
            slots
                .into_par_iter()
                .map(|p| self.load(p as usize, |img| transform.apply(img)))
                .collect::<Result<_>>()
        })?;
        let (pixels, labels) = flatten(samples.into_iter().flatten().collect());
        let targets = soft_targets(
            &labels,
            self.source.num_classes(),
            0.0,
            &super::mix::Mix::None,
        );
        let position = ImagePosition {
            seed: self.seed,
            samples: (first + self.config.global_batch as u64).min(n),
        };
        self.batch(pixels, targets, labels, transform.image_size, position)
            .map(Some)
    }

    fn batch(
        &self,
        pixels: Vec<f32>,
        targets: Vec<f32>,
        labels: Vec<u32>,
        size: usize,
        position: ImagePosition,
    ) -> Result<ImageBatch> {
        let b = labels.len();
        Ok(ImageBatch {
            images: Tensor::from_vec(pixels, (b, 3, size, size), &Device::Cpu)?,
            soft_targets: Tensor::from_vec(targets, (b, self.source.num_classes()), &Device::Cpu)?,
            labels,
            position,
        })
    }
}

fn is_power_of_ten(mut n: u64) -> bool {
    while n >= 10 && n.is_multiple_of(10) {
        n /= 10;
    }
    n == 1
}

/// Concatenates samples' pixels and collects their labels.
fn flatten(samples: Vec<Sample>) -> (Vec<f32>, Vec<u32>) {
    let mut pixels = Vec::with_capacity(samples.iter().map(|s| s.0.len()).sum());
    let mut labels = Vec::with_capacity(samples.len());
    for (p, l) in samples {
        pixels.extend_from_slice(&p);
        labels.push(l);
    }
    (pixels, labels)
}

/// Produces [`ImageBatch`]es on a background thread, `prefetch` ahead of the consumer.
pub struct ImagePipeline {
    receiver: Option<Receiver<Result<ImageBatch>>>,
    thread: Option<JoinHandle<()>>,
    skipped: Arc<AtomicU64>,
    /// Training: the thread never ends while the pipeline lives.
    endless: bool,
}

impl ImagePipeline {
    /// Starts producing batches of `source` from `position` (`ImagePosition::start(seed)`,
    /// or a checkpoint's; evaluation always starts from sample 0 of the position's seed).
    pub fn start(
        source: Arc<dyn ImageSource>,
        config: PipelineConfig,
        position: ImagePosition,
    ) -> Result<Self> {
        config.validate()?;
        if source.is_empty() {
            bail!("the image source holds no image");
        }
        let threads = if config.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            config.threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("image-worker-{i}"))
            .build()
            .context("cannot start the image worker threads")?;
        let skipped = Arc::new(AtomicU64::new(0));
        let endless = matches!(config.transform, Transform::Train { .. });
        let (sender, receiver) = sync_channel(config.prefetch.max(1));
        let mut producer = Producer {
            source,
            seed: position.seed,
            pool,
            bad: RwLock::new(HashSet::new()),
            skipped: skipped.clone(),
            orders: HashMap::new(),
            config,
        };
        let thread = std::thread::Builder::new()
            .name("image-pipeline".into())
            .spawn(move || {
                let global = producer.config.global_batch as u64;
                let mut next = match producer.config.transform {
                    Transform::Train { .. } => position.samples,
                    Transform::Eval(_) => 0,
                };
                loop {
                    let batch = match producer.config.transform.clone() {
                        Transform::Train { .. } => producer.train_batch(next).map(Some),
                        Transform::Eval(t) => producer.eval_batch(next, &t),
                    };
                    next += global;
                    let batch = match batch {
                        Ok(Some(b)) if b.labels.is_empty() => continue,
                        Ok(Some(b)) => Ok(b),
                        Ok(None) => return,
                        Err(e) => Err(e),
                    };
                    let failed = batch.is_err();
                    // The receiver is gone: the run is over.
                    if sender.send(batch).is_err() || failed {
                        return;
                    }
                }
            })?;
        Ok(Self {
            receiver: Some(receiver),
            thread: Some(thread),
            skipped,
            endless,
        })
    }

    /// The next batch; None once an evaluation pass is complete (training never ends). A
    /// failed batch (a data set with no readable image, an out-of-range label) is an error,
    /// after which the pipeline is finished.
    pub fn next_batch(&mut self) -> Result<Option<ImageBatch>> {
        if let Some(Ok(batch)) = self.receiver.as_ref().map(|r| r.recv()) {
            return batch.map(Some);
        }
        // The batch thread has ended: normally after an evaluation pass, or after sending
        // an error; a panic is reported, and a training stream never ends on its own.
        self.receiver.take();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                bail!("the image pipeline thread panicked");
            }
            if self.endless {
                bail!("the image pipeline thread stopped unexpectedly");
            }
        }
        Ok(None)
    }

    /// Distinct unreadable images met so far (the batch thread may be ahead of the
    /// consumer).
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }
}

impl Iterator for ImagePipeline {
    type Item = Result<ImageBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_batch().transpose()
    }
}

impl Drop for ImagePipeline {
    fn drop(&mut self) {
        // Closing the channel ends the thread at its next send.
        self.receiver.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What [`measure_throughput`] reports.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub images_per_s: f64,
    pub images: usize,
    pub batches: usize,
    pub seconds: f64,
    pub threads: usize,
}

/// Times the pipeline alone: one untimed batch (thread start-up, first reads), then
/// `batches` timed ones, consumed as fast as they come, so the pipeline is the bottleneck.
pub fn measure_throughput(
    source: Arc<dyn ImageSource>,
    config: PipelineConfig,
    seed: u64,
    batches: usize,
) -> Result<Throughput> {
    if batches == 0 {
        bail!("measure at least one batch");
    }
    let threads = config.threads;
    let mut pipeline = ImagePipeline::start(source, config, ImagePosition::start(seed))?;
    pipeline
        .next_batch()?
        .context("the pipeline produced no batch")?;
    let started = Instant::now();
    let mut images = 0;
    let mut timed = 0;
    while timed < batches {
        let Some(batch) = pipeline.next_batch()? else {
            break;
        };
        images += batch.labels.len();
        timed += 1;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Throughput {
        images_per_s: images as f64 / seconds.max(1e-9),
        images,
        batches: timed,
        seconds,
        threads,
    })
}

#[cfg(test)]
mod tests {
    use super::super::synthetic::SyntheticImages;
    use super::super::Split;
    use super::*;

    #[test]
    fn epoch_orders_are_permutations_that_respect_locality_windows() {
        let all: Vec<_> = std::iter::once(0..50).collect();
        let whole = epoch_order(&all, 3, 0, 4);
        let mut sorted = whole.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_ne!(whole, epoch_order(&all, 3, 1, 4));
        assert_eq!(whole, epoch_order(&all, 3, 0, 4));
        let groups: Vec<_> = (0..10).map(|g| g * 5..g * 5 + 5).collect();
        let order = epoch_order(&groups, 3, 0, 2);
        // Each run of 10 draws from exactly two groups.
        for pool in order.chunks(10) {
            let mut g: Vec<usize> = pool.iter().map(|i| i / 5).collect();
            g.sort();
            g.dedup();
            assert_eq!(g.len(), 2, "{pool:?}");
        }
    }

    #[test]
    fn config_errors() {
        let mut c = PipelineConfig::paper_train(8, 32, 1);
        c.world = 3;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("multiple of the number of ranks"));
        c.world = 2;
        c.rank = 2;
        assert!(c.validate().is_err());
        let source: Arc<dyn ImageSource> = Arc::new(SyntheticImages::new(Split::Train, 0, 8, 0));
        let c = PipelineConfig::paper_train(8, 32, 1);
        assert!(ImagePipeline::start(source, c, ImagePosition::start(0)).is_err());
    }
}
