//! What a run trains: a [`Task`] pairs a model with its data. [`language`]: a LLaMA on token
//! windows (`model.architecture = "llama"`); [`vision`]: a ViT on images (`"vit"`). The
//! training loop sees only the trait: the loss of a micro-batch, each step's micro-batches,
//! where the data stands, and an evaluation.

pub mod language;
pub mod vision;

use crate::config::RunConfig;
use crate::data::images::pipeline::ImagePosition;
use crate::data::SamplerPosition;
use crate::dist::Communicator;
use crate::model::{Architecture, Model, Param};
use crate::optim::adam::{adam_mini_block, adam_mini_vit_block};
use anyhow::Result;
use candle_core::{Device, Tensor};

/// A model and the data it trains on, as the training loop uses them.
pub trait Task: Send {
    /// The network being trained.
    fn model(&self) -> &dyn Model;

    /// The next step's micro-batches for this rank, `(inputs, targets)` on the CPU.
    fn next_batch(&mut self) -> Result<Vec<(Tensor, Tensor)>>;

    /// Where the data stands after the last batch drawn; saved in checkpoints.
    fn position(&self) -> Position;

    /// Evaluates on the validation data, the ranks of `comm` sharing the work; the result
    /// does not depend on the rank count.
    fn evaluate(&self, comm: &dyn Communicator) -> Result<Evaluation>;

    /// The data's size, for the start-up line.
    fn describe(&self) -> String;
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

/// What an evaluation measured.
#[derive(Debug, Clone, Copy)]
pub struct Evaluation {
    /// Mean validation loss.
    pub loss: f64,
    /// Image runs: fraction of validation images whose label has the highest logit.
    pub top1: Option<f64>,
    /// Image runs: fraction whose label is among the five highest.
    pub top5: Option<f64>,
}

/// Opens the run's data and builds its model (seeded f32 master weights, computing in
/// `train.dtype`), streaming this rank's batches from `position`. Rank 0 loads first:
/// loading may download and prepare a dataset, which the other ranks then read.
pub fn open(
    config: &RunConfig,
    device: &Device,
    comm: &dyn Communicator,
    position: Position,
) -> Result<(Box<dyn Task>, Vec<Param>)> {
    match config.model.architecture {
        Architecture::Llama => {
            let corpus = language::Corpus::load(config, comm)?;
            language::LanguageTask::start(config, corpus, device, comm, position)
        }
        Architecture::Vit => vision::VisionTask::open(config, device, comm, position),
    }
}

/// The model's parameters alone, without data (for sizing a run).
pub fn params(config: &RunConfig, device: &Device) -> Result<Vec<Param>> {
    Ok(match config.model.architecture {
        Architecture::Llama => language::build_model(config, device)?.1,
        Architecture::Vit => vision::build_model(config, device)?.1,
    })
}

/// Elements per Adam-mini block of each parameter: Adam-mini's partition of this model.
pub fn adam_mini_blocks(config: &RunConfig, params: &[Param]) -> Result<Vec<usize>> {
    params
        .iter()
        .map(|p| match config.model.architecture {
            Architecture::Llama => adam_mini_block(&p.name, p.var.dims(), &config.model),
            Architecture::Vit => adam_mini_vit_block(&p.name, p.var.dims(), &config.vit),
        })
        .collect()
}
