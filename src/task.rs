//! What a run trains: LLaMA on token windows (`model.architecture = "llama"`) or a ViT on
//! images (`"vit"`). The training loop sees one interface for both: the model's loss on a
//! micro-batch `(inputs, targets)`, each step's micro-batches with the data position after
//! them, and an evaluation.

use crate::config::RunConfig;
use crate::data::images::pipeline::{ImagePipeline, ImagePosition, PipelineConfig, Transform};
use crate::data::images::{self, ImageSource};
use crate::data::loader::{Loader, LoaderShape, PREFETCH_STEPS};
use crate::data::{self, Batcher, SamplerPosition, TokenSegments, Tokenizer};
use crate::dist::Communicator;
use crate::model::accuracy::Accuracy;
use crate::model::{Llama, Param, Vit};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

/// Seed offset for evaluation windows, so they never coincide with training draws.
const EVAL_SEED_OFFSET: u64 = 0x5EED_0FE7_A100;

/// The model being trained.
pub enum Model {
    Llama(Llama),
    Vit(Vit),
}

impl Model {
    /// The model `config` describes, with seeded f32 master weights, computing in
    /// `train.dtype`, and its parameters in a fixed order.
    pub fn build(config: &RunConfig, device: &Device) -> Result<(Self, Vec<Param>)> {
        let dtype = crate::device::compute_dtype(&config.train.dtype)?;
        let seed = config.train.seed;
        if config.model.is_vit() {
            if dtype != DType::F32 {
                bail!("train.dtype = bf16 is implemented for LLaMA; train the ViT in f32");
            }
            let (vit, params) = Vit::new(&config.vit, DType::F32, device, seed)?;
            return Ok((Self::Vit(vit), params));
        }
        let (llama, params) = Llama::new(&config.model, DType::F32, device, seed)?;
        Ok((Self::Llama(llama.compute_in(dtype)), params))
    }

    /// Mean loss of one micro-batch: next-token cross-entropy of token ids against their
    /// targets, or soft-target cross-entropy of images against their (mixed) targets.
    pub fn loss(&self, inputs: &Tensor, targets: &Tensor) -> Result<Tensor> {
        match self {
            Self::Llama(m) => Ok(m.loss(inputs, targets)?),
            Self::Vit(m) => m.loss(inputs, targets),
        }
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        match self {
            Self::Llama(m) => m.device(),
            Self::Vit(m) => m.device(),
        }
    }
}

/// Where the training data stands after a step; saved in checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// The token sampler's (its seed alone for image runs).
    pub tokens: SamplerPosition,
    /// The image pipeline's, for image runs.
    pub images: Option<ImagePosition>,
}

impl Position {
    /// The start of the data for `seed`.
    pub fn start(seed: u64, images: bool) -> Self {
        Self {
            tokens: SamplerPosition { seed, word_pos: 0 },
            images: images.then(|| ImagePosition::start(seed)),
        }
    }
}

/// A run's training and validation data, loaded but not yet streaming.
pub enum Corpus {
    Tokens {
        train: TokenSegments,
        val: TokenSegments,
    },
    Images {
        train: Arc<dyn ImageSource>,
        val: Arc<dyn ImageSource>,
    },
}

impl Corpus {
    /// Opens `data.train` (and the validation data). Rank 0 goes first: loading tokens may
    /// download and prepare a dataset, which the other ranks then read.
    pub fn load(config: &RunConfig, comm: &dyn Communicator) -> Result<Self> {
        if config.model.is_vit() {
            if config.data.train == "builtin" {
                bail!(
                    "a ViT trains on images: pass --data synthetic-images (built in), \
                     imagenet:DIR (train/<class>/*.JPEG and val/<class>/*.JPEG), parquet:DIR \
                     (the hub's imagenet-1k parquet files) or cifar10:DIR"
                );
            }
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
            return Ok(Self::Images { train, val });
        }
        let tokenizer = Tokenizer::load(&config.data.tokenizer)?;
        check_vocab(config, &tokenizer)?;
        let root = comm.rank() == 0;
        if !root {
            comm.barrier()?;
        }
        let loaded = data::load(
            &config.data,
            &tokenizer,
            config.train.seq_len,
            config.model.vocab_size,
        );
        if root {
            comm.barrier()?;
        }
        let loaded = loaded?;
        Ok(Self::Tokens {
            train: loaded.train,
            val: loaded.val,
        })
    }

    /// The sizes, for the start-up line.
    pub fn describe(&self) -> String {
        match self {
            Self::Tokens { train, val } => {
                format!("{} train / {} val tokens", train.len(), val.len())
            }
            Self::Images { train, val } => format!(
                "{} train / {} val images of {} classes",
                train.len(),
                val.len(),
                train.num_classes()
            ),
        }
    }

    /// Starts streaming this rank's training batches from `position`.
    pub fn start(
        self,
        config: &RunConfig,
        position: Position,
        comm: &dyn Communicator,
    ) -> Result<Data> {
        let train = &config.train;
        match self {
            Self::Tokens { train: tokens, val } => {
                let shape = LoaderShape::for_rank(train, comm.rank(), comm.world());
                let loader =
                    Loader::start(Arc::new(tokens), position.tokens, shape, PREFETCH_STEPS)?;
                Ok(Data::Tokens { loader, val })
            }
            Self::Images { train: images, val } => {
                let pipeline = ImagePipeline::start(
                    images,
                    train_pipeline(config, comm)?,
                    position.images.unwrap_or(ImagePosition::start(train.seed)),
                )?;
                let micro_batch = train
                    .micro_batch_size
                    .unwrap_or(train.batch_size / comm.world());
                Ok(Data::Images {
                    pipeline,
                    val,
                    micro_batch,
                    seed: train.seed,
                })
            }
        }
    }
}

/// ViT training batches as `augment.*` describes, for this rank.
pub fn train_pipeline(config: &RunConfig, comm: &dyn Communicator) -> Result<PipelineConfig> {
    let a = &config.augment;
    let mut pipeline =
        PipelineConfig::paper_train(config.train.batch_size, config.vit.image_size, a.workers);
    pipeline.rank = comm.rank();
    pipeline.world = comm.world();
    if let Transform::Train { augment, mix, .. } = &mut pipeline.transform {
        augment.scale = (a.min_crop_scale, 1.0);
        augment.hflip = a.hflip;
        augment.randaugment = (a.randaugment_ops > 0)
            .then(|| {
                images::randaugment::RandAugment::new(a.randaugment_ops, a.randaugment_magnitude)
            })
            .transpose()?;
        mix.mixup_alpha = a.mixup_alpha;
        mix.cutmix_alpha = a.cutmix_alpha;
        mix.prob = a.mix_prob;
        mix.switch_prob = if a.mixup_alpha > 0.0 && a.cutmix_alpha > 0.0 {
            0.5
        } else {
            0.0
        };
        mix.label_smoothing = a.label_smoothing;
    }
    pipeline.validate()?;
    Ok(pipeline)
}

/// This rank's training data, streaming.
pub enum Data {
    Tokens {
        loader: Loader,
        val: TokenSegments,
    },
    Images {
        pipeline: ImagePipeline,
        val: Arc<dyn ImageSource>,
        /// Images per forward/backward pass.
        micro_batch: usize,
        seed: u64,
    },
}

/// What an evaluation measured.
#[derive(Debug, Clone, Copy)]
pub struct Evaluation {
    pub loss: f64,
    /// Image runs: fraction of validation images whose label has the highest logit.
    pub top1: Option<f64>,
    /// Image runs: fraction whose label is among the five highest.
    pub top5: Option<f64>,
}

impl Data {
    /// The next step's micro-batches for this rank, `(inputs, targets)` on the CPU, and the
    /// data position after the step.
    pub fn next_step(&mut self) -> Result<(Vec<(Tensor, Tensor)>, Position)> {
        match self {
            Self::Tokens { loader, .. } => {
                let batch = loader.next_step()?;
                let position = Position {
                    tokens: batch.position,
                    images: None,
                };
                Ok((batch.micro_batches, position))
            }
            Self::Images {
                pipeline,
                micro_batch,
                seed,
                ..
            } => {
                let batch = pipeline
                    .next_batch()?
                    .context("the image pipeline ended, but training batches never end")?;
                let n = batch.images.dim(0)?;
                let micro_batches = (0..n)
                    .step_by(*micro_batch)
                    .map(|start| {
                        let len = (*micro_batch).min(n - start);
                        Ok((
                            batch.images.narrow(0, start, len)?,
                            batch.soft_targets.narrow(0, start, len)?,
                        ))
                    })
                    .collect::<Result<_>>()?;
                let position = Position {
                    tokens: SamplerPosition {
                        seed: *seed,
                        word_pos: 0,
                    },
                    images: Some(batch.position),
                };
                Ok((micro_batches, position))
            }
        }
    }

    /// Evaluates `model` on the validation data, the ranks of `comm` sharing the work; the
    /// result does not depend on the rank count. Tokens: `eval_batches` micro-batches of
    /// windows drawn from a fixed seed. Images: the whole validation split, centre-cropped.
    pub fn evaluate(
        &self,
        model: &Model,
        config: &RunConfig,
        comm: &dyn Communicator,
    ) -> Result<Evaluation> {
        match self {
            Self::Tokens { val, .. } => Ok(Evaluation {
                loss: evaluate_tokens(model, val, config, comm)?,
                top1: None,
                top5: None,
            }),
            Self::Images {
                val, micro_batch, ..
            } => evaluate_images(model, val, *micro_batch, config, comm),
        }
    }
}

/// Mean loss over `eval_batches` micro-batches drawn from a fixed seed (rank `r` computes
/// those numbered `r`, `r + world`, ..., summed in batch order).
fn evaluate_tokens(
    model: &Model,
    val: &TokenSegments,
    config: &RunConfig,
    comm: &dyn Communicator,
) -> Result<f64> {
    let train = &config.train;
    let device = model.device();
    let mut batcher = Batcher::new(val, train.seed.wrapping_add(EVAL_SEED_OFFSET));
    let mut mine = Vec::new();
    for i in 0..train.eval_batches {
        let (inputs, targets) = batcher.next_batch(train.micro_batch(), train.seq_len, device)?;
        if i % comm.world() != comm.rank() {
            continue;
        }
        let loss = model.loss(&inputs, &targets)?.detach();
        mine.extend(loss.to_dtype(DType::F64)?.to_scalar::<f64>()?.to_le_bytes());
    }
    let parts = comm.all_gather_bytes(&mine)?;
    let losses: Vec<Vec<f64>> = parts.iter().map(|p| f64s(p)).collect();
    let sum: f64 = (0..train.eval_batches)
        .map(|i| losses[i % comm.world()][i / comm.world()])
        .sum();
    Ok(sum / train.eval_batches as f64)
}

/// Loss, top-1 and top-5 over the whole validation split; each rank takes its share of
/// every batch and the sums are combined.
fn evaluate_images(
    model: &Model,
    val: &Arc<dyn ImageSource>,
    micro_batch: usize,
    config: &RunConfig,
    comm: &dyn Communicator,
) -> Result<Evaluation> {
    let crop = config.augment.eval_crop_fraction.unwrap_or({
        let full_size = ["imagenet:", "imagefolder:", "parquet:"];
        if full_size.iter().any(|p| config.data.train.starts_with(p)) {
            0.875
        } else {
            1.0
        }
    });
    let mut pipeline = PipelineConfig::eval(
        micro_batch * comm.world(),
        config.vit.image_size,
        crop,
        config.augment.workers,
    );
    pipeline.rank = comm.rank();
    pipeline.world = comm.world();
    let Model::Vit(vit) = model else {
        bail!("image evaluation needs a ViT");
    };
    let device = vit.device();
    let (mut loss_sum, mut accuracy) = (0.0f64, Accuracy::default());
    for batch in ImagePipeline::start(Arc::clone(val), pipeline, ImagePosition::start(0))? {
        let batch = batch?;
        if batch.labels.is_empty() {
            continue;
        }
        let images = batch.images.to_device(device)?;
        let targets = batch.soft_targets.to_device(device)?;
        let logits = vit.logits(&images)?.detach();
        let loss = crate::model::vit_ops::soft_cross_entropy(&logits, &targets)?;
        loss_sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * batch.labels.len() as f64;
        accuracy.add(Accuracy::of(&logits, &batch.labels)?);
    }
    let mut mine = loss_sum.to_le_bytes().to_vec();
    for count in [
        accuracy.samples,
        accuracy.top1_correct,
        accuracy.top5_correct,
    ] {
        mine.extend((count as f64).to_le_bytes());
    }
    let mut total = [0.0f64; 4];
    for part in comm.all_gather_bytes(&mine)? {
        for (t, v) in total.iter_mut().zip(f64s(&part)) {
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

fn f64s(bytes: &[u8]) -> Vec<f64> {
    bytes
        .chunks_exact(8)
        .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect()
}

fn check_vocab(config: &RunConfig, tokenizer: &Tokenizer) -> Result<()> {
    let needed = tokenizer.vocab_size();
    if config.model.vocab_size < needed {
        bail!(
            "model.vocab_size ({}) is smaller than the tokenizer's vocabulary ({needed}); \
             set --set model.vocab_size={} or more (a multiple of 64 is fastest)",
            config.model.vocab_size,
            needed.div_ceil(64) * 64
        );
    }
    Ok(())
}
