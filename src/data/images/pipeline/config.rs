//! What a pipeline does: the batch shape, the ranks, the threads, and each image's
//! transform (training augmentation and mixing, or the evaluation crop), with the paper's
//! presets and their checks.

use crate::data::images::augment::{EvalTransform, Normalize, TrainAugment};
use crate::data::images::mix::MixConfig;
use anyhow::{bail, Result};

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
        let transform = Transform::Train {
            augment: TrainAugment::paper(image_size),
            mix: MixConfig::PAPER,
            shuffle_window: DEFAULT_SHUFFLE_WINDOW,
        };
        Self::one_rank(global_batch, threads, transform)
    }

    /// The evaluation pipeline: centre crop of `crop_fraction` (0.875 for ImageNet, 1 for
    /// sets at the model's size) resized to `image_size`, values in [-1, 1], on one rank.
    pub fn eval(
        global_batch: usize,
        image_size: usize,
        crop_fraction: f64,
        threads: usize,
    ) -> Self {
        let transform = Transform::Eval(EvalTransform {
            image_size,
            crop_fraction,
        });
        Self::one_rank(global_batch, threads, transform)
    }

    /// A preset's common part: one rank, two batches prefetched, values in [-1, 1].
    fn one_rank(global_batch: usize, threads: usize, transform: Transform) -> Self {
        Self {
            global_batch,
            rank: 0,
            world: 1,
            threads,
            prefetch: 2,
            transform,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::images::pipeline::{ImagePipeline, ImagePosition};
    use crate::data::images::synthetic::SyntheticImages;
    use crate::data::images::{ImageSource, Split};
    use std::sync::Arc;

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
