//! A ViT trained on augmented, mixed image batches, evaluated on the whole validation split.

use super::{Evaluation, Position, Task};
use crate::config::RunConfig;
use crate::data::images::pipeline::{ImagePipeline, ImagePosition, PipelineConfig};
use crate::data::images::{self, ImageSource};
use crate::dist::{self, Communicator};
use crate::model::accuracy::Accuracy;
use crate::model::{Model, Param, Vit};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

/// A ViT and its image pipeline.
pub struct VisionTask {
    model: Vit,
    pipeline: ImagePipeline,
    val: Arc<dyn ImageSource>,
    /// Evaluation batches: the same pipeline settings for every evaluation.
    eval: PipelineConfig,
    /// Images per forward/backward pass.
    micro_batch: usize,
    seed: u64,
    position: ImagePosition,
    sizes: String,
}

impl VisionTask {
    /// Opens the image source, checks its classes against `vit.num_classes`, builds the
    /// model and starts this rank's pipeline from `position`.
    pub fn open(
        config: &RunConfig,
        device: &Device,
        comm: &dyn Communicator,
        position: Position,
    ) -> Result<(Box<dyn Task>, Vec<Param>)> {
        let (train, val) = images::open_pair(&config.data.train)?;
        if train.num_classes() != config.vit.num_classes {
            bail!(
                "'{}' has {} classes but vit.num_classes is {}; set --set vit.num_classes={}",
                config.data.train,
                train.num_classes(),
                config.vit.num_classes,
                train.num_classes()
            );
        }
        let (dtype, seed) = (config.train.dtype, config.train.seed);
        let (model, params) = Vit::build(&config.vit, dtype, device, seed)?;
        let sizes = format!(
            "{} train / {} val images of {} classes",
            train.len(),
            val.len(),
            train.num_classes()
        );
        let (batch, image_size) = (config.train.batch_size, config.vit.image_size);
        let (rank, world) = (comm.rank(), comm.world());
        let position = position
            .images
            .unwrap_or(ImagePosition::start(config.train.seed));
        let pipeline = ImagePipeline::start(
            train,
            config
                .augment
                .train_pipeline(batch, image_size, rank, world)?,
            position,
        )?;
        let micro_batch = config.train.micro_batch_per_rank(world);
        let eval = config.augment.eval_pipeline(
            &config.data.train,
            micro_batch * world,
            image_size,
            rank,
            world,
        );
        let task = Self {
            model,
            pipeline,
            val,
            eval,
            micro_batch,
            seed: config.train.seed,
            position,
            sizes,
        };
        Ok((Box::new(task), params))
    }
}

impl Task for VisionTask {
    fn model(&self) -> &dyn Model {
        &self.model
    }

    fn next_batch(&mut self) -> Result<Vec<(Tensor, Tensor)>> {
        let batch = self
            .pipeline
            .next_batch()?
            .context("the image pipeline ended, but training batches never end")?;
        self.position = batch.position;
        let n = batch.images.dim(0)?;
        (0..n)
            .step_by(self.micro_batch)
            .map(|start| {
                let len = self.micro_batch.min(n - start);
                Ok((
                    batch.images.narrow(0, start, len)?,
                    batch.soft_targets.narrow(0, start, len)?,
                ))
            })
            .collect()
    }

    fn position(&self) -> Position {
        Position {
            images: Some(self.position),
            ..Position::tokens_from(self.seed)
        }
    }

    /// Loss, top-1 and top-5 over the whole validation split, centre-cropped; each rank
    /// takes its share of every batch and the sums are combined.
    fn evaluate(&self, comm: &dyn Communicator) -> Result<Evaluation> {
        let device = self.model.device();
        let (mut loss_sum, mut accuracy) = (0.0f64, Accuracy::default());
        let batches = ImagePipeline::start(
            Arc::clone(&self.val),
            self.eval.clone(),
            ImagePosition::start(0),
        )?;
        for batch in batches {
            let batch = batch?;
            if batch.labels.is_empty() {
                continue;
            }
            let images = batch.images.to_device(device)?;
            let targets = batch.soft_targets.to_device(device)?;
            let logits = self.model.logits(&images)?.detach();
            let loss = crate::model::ops::vit::soft_cross_entropy(&logits, &targets)?;
            loss_sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * batch.labels.len() as f64;
            accuracy.add(Accuracy::of(&logits, &batch.labels)?);
        }
        let mine = [
            loss_sum,
            accuracy.samples as f64,
            accuracy.top1_correct as f64,
            accuracy.top5_correct as f64,
        ];
        let mut total = [0.0f64; 4];
        for part in dist::all_gather_array(comm, mine)? {
            for (t, v) in total.iter_mut().zip(part) {
                *t += v;
            }
        }
        let [loss, samples, top1, top5] = total;
        if samples == 0.0 {
            bail!("the validation split holds no readable image");
        }
        Ok(Evaluation {
            loss: loss / samples,
            top1: Some(top1 / samples),
            top5: Some(top5 / samples),
        })
    }

    fn describe(&self) -> String {
        self.sizes.clone()
    }
}
