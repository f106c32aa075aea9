//! How batches are made: each epoch's image order, samples loaded and transformed on the
//! worker pool, unreadable images skipped, and a batch's Mixup/CutMix and soft targets.

use super::{ImageBatch, ImagePosition, PipelineConfig, Transform};
use crate::data::images::augment::{EvalTransform, TrainAugment};
use crate::data::images::mix::{draw_mix, mix_images, soft_targets};
use crate::data::images::{keyed_rng, ImageSource, Stream};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rayon::prelude::*;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

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
pub(super) struct Producer {
    pub(super) source: Arc<dyn ImageSource>,
    pub(super) config: PipelineConfig,
    pub(super) seed: u64,
    pub(super) pool: rayon::ThreadPool,
    /// Images found unreadable: never retried, counted once.
    pub(super) bad: RwLock<HashSet<usize>>,
    pub(super) skipped: Arc<AtomicU64>,
    pub(super) orders: HashMap<u64, Arc<Vec<usize>>>,
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

    /// Whether image `index` was found unreadable before.
    fn is_bad(&self, index: usize) -> bool {
        self.bad.read().expect("bad-image set").contains(&index)
    }

    /// Loads image `index` and transforms it with `transform`; None if unreadable.
    fn load(
        &self,
        index: usize,
        transform: impl FnOnce(&crate::data::images::Rgb8) -> Result<crate::data::images::Rgb8>,
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
    pub(super) fn train_batch(&mut self, first: u64) -> Result<ImageBatch> {
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
    pub(super) fn eval_batch(
        &self,
        first: u64,
        transform: &EvalTransform,
    ) -> Result<Option<ImageBatch>> {
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
            &crate::data::images::mix::Mix::None,
        );
        let position = ImagePosition {
            seed: self.seed,
            samples: (first + self.config.global_batch as u64).min(n),
        };
        self.batch(pixels, targets, labels, transform.image_size, position)
            .map(Some)
    }

    /// The batch tensors of `labels.len()` images of side `size`.
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

/// Whether `n` is 1, 10, 100, ...
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

#[cfg(test)]
mod tests {
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
}
