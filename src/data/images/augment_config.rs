//! The `augment` config section: the image augmentation of ViT training, and the training
//! and evaluation pipelines it describes.

use super::pipeline::{PipelineConfig, Transform};
use super::randaugment::RandAugment;
use crate::check::non_negative;
use crate::data::DataSpec;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Image augmentation for ViT training; the defaults are the paper's recipe (Beyer et al.
/// 2022: random resized crop and flip, RandAugment 2 ops at magnitude 10, Mixup with Beta
/// parameter 0.2 on every batch).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// Smallest crop area of the random resized crop, as a fraction of the image.
    pub min_crop_scale: f64,
    /// Flip half the images left to right.
    pub hflip: bool,
    /// RandAugment operations per image (0 disables RandAugment).
    pub randaugment_ops: usize,
    /// RandAugment magnitude, 0 to 10 (strongest).
    pub randaugment_magnitude: f64,
    /// Mixup's Beta(alpha, alpha) parameter (0 disables Mixup).
    pub mixup_alpha: f64,
    /// CutMix's Beta(alpha, alpha) parameter (0 disables CutMix).
    pub cutmix_alpha: f64,
    /// Probability that a batch is mixed at all.
    pub mix_prob: f64,
    /// Label smoothing epsilon.
    pub label_smoothing: f64,
    /// Centre-crop fraction at evaluation; null: 0.875 for ImageNet (`imagenet:`,
    /// `parquet:`), 1 for the small sets.
    pub eval_crop_fraction: Option<f64>,
    /// Decoding and augmentation threads (0: every core).
    pub workers: usize,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            min_crop_scale: 0.08,
            hflip: true,
            randaugment_ops: 2,
            randaugment_magnitude: 10.0,
            mixup_alpha: 0.2,
            cutmix_alpha: 0.0,
            mix_prob: 1.0,
            label_smoothing: 0.0,
            eval_crop_fraction: None,
            workers: 0,
        }
    }
}

impl AugmentConfig {
    /// Checks the ranges; messages name the key.
    pub fn validate(&self) -> Result<()> {
        let unit = |x: f64| (0.0..=1.0).contains(&x);
        if !(self.min_crop_scale > 0.0 && self.min_crop_scale <= 1.0) {
            bail!(
                "augment.min_crop_scale must be in (0, 1], got {}",
                self.min_crop_scale
            );
        }
        if !(0.0..=10.0).contains(&self.randaugment_magnitude) {
            bail!(
                "augment.randaugment_magnitude must be in [0, 10], got {}",
                self.randaugment_magnitude
            );
        }
        if !non_negative(self.mixup_alpha) || !non_negative(self.cutmix_alpha) {
            bail!("augment.mixup_alpha and augment.cutmix_alpha must be >= 0");
        }
        if !unit(self.mix_prob) || !(0.0..1.0).contains(&self.label_smoothing) {
            bail!("augment.mix_prob must be in [0, 1] and augment.label_smoothing in [0, 1)");
        }
        if let Some(f) = self.eval_crop_fraction {
            if !(f > 0.0 && f <= 1.0) {
                bail!("augment.eval_crop_fraction must be in (0, 1], got {f}");
            }
        }
        Ok(())
    }

    /// Training batches of `batch_size` images of `image_size` pixels as this section
    /// describes, for rank `rank` of `world`.
    pub fn train_pipeline(
        &self,
        batch_size: usize,
        image_size: usize,
        rank: usize,
        world: usize,
    ) -> Result<PipelineConfig> {
        let mut pipeline = PipelineConfig::paper_train(batch_size, image_size, self.workers);
        pipeline.rank = rank;
        pipeline.world = world;
        if let Transform::Train { augment, mix, .. } = &mut pipeline.transform {
            augment.scale = (self.min_crop_scale, 1.0);
            augment.hflip = self.hflip;
            augment.randaugment = (self.randaugment_ops > 0)
                .then(|| RandAugment::new(self.randaugment_ops, self.randaugment_magnitude))
                .transpose()?;
            mix.mixup_alpha = self.mixup_alpha;
            mix.cutmix_alpha = self.cutmix_alpha;
            mix.prob = self.mix_prob;
            mix.switch_prob = if self.mixup_alpha > 0.0 && self.cutmix_alpha > 0.0 {
                0.5
            } else {
                0.0
            };
            mix.label_smoothing = self.label_smoothing;
        }
        pipeline.validate()?;
        Ok(pipeline)
    }

    /// Evaluation batches of `batch_size` images of `image_size` pixels from `spec`,
    /// centre-cropped (`eval_crop_fraction`, else 0.875 for full-size photographs and 1 for
    /// the small sets), for rank `rank` of `world`.
    pub fn eval_pipeline(
        &self,
        spec: &DataSpec,
        batch_size: usize,
        image_size: usize,
        rank: usize,
        world: usize,
    ) -> PipelineConfig {
        let full_size = if spec.is_full_size_images() {
            0.875
        } else {
            1.0
        };
        let crop = self.eval_crop_fraction.unwrap_or(full_size);
        let mut pipeline = PipelineConfig::eval(batch_size, image_size, crop, self.workers);
        pipeline.rank = rank;
        pipeline.world = world;
        pipeline
    }
}
