//! What a run trains: a [`Task`] pairs a model with its data. [`language`]: a LLaMA on token
//! windows (`model.architecture = "llama"`); [`vision`]: a ViT on images (`"vit"`). The
//! training loop sees only the trait: the loss of a micro-batch, each step's micro-batches,
//! where the data stands, and an evaluation.

pub mod language;
pub mod vision;

use crate::config::RunConfig;
use crate::dist::Communicator;
use crate::model::{Architecture, Model, Param};
use anyhow::Result;
use candle_core::{Device, Tensor};

pub use crate::data::Position;

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
    open_with(config, device, comm, position, language::Corpus::load)
}

/// Before the ranks join: prepares a named dataset a LLaMA run reads (download and
/// tokenisation can take far longer than any wait for the other ranks is allowed to).
pub fn prepare_data(config: &RunConfig) -> Result<()> {
    match config.model.architecture {
        Architecture::Llama => crate::data::prepare_named(&config.data),
        Architecture::Vit => Ok(()),
    }
}

/// The task `bench` times: a LLaMA on random tokens (no corpus to read), or a ViT on the
/// run's images.
pub fn open_for_bench(
    config: &RunConfig,
    device: &Device,
    comm: &dyn Communicator,
) -> Result<(Box<dyn Task>, Vec<Param>)> {
    let start = config.spec().start_position(config.train.seed);
    open_with(config, device, comm, start, |config, _| {
        language::Corpus::random(config)
    })
}

/// [`open`], a LLaMA's tokens coming from `corpus`.
fn open_with(
    config: &RunConfig,
    device: &Device,
    comm: &dyn Communicator,
    position: Position,
    corpus: impl FnOnce(&RunConfig, &dyn Communicator) -> Result<language::Corpus>,
) -> Result<(Box<dyn Task>, Vec<Param>)> {
    match config.model.architecture {
        Architecture::Llama => {
            let corpus = corpus(config, comm)?;
            language::LanguageTask::start(config, corpus, device, comm, position)
        }
        Architecture::Vit => vision::VisionTask::open(config, device, comm, position),
    }
}

/// The model's parameters alone, without data (for sizing a run).
pub fn params(config: &RunConfig, device: &Device) -> Result<Vec<Param>> {
    let spec = config.spec();
    Ok(spec.build(config.train.seed, config.train.dtype, device)?.1)
}

/// Elements per Adam-mini block of each parameter: Adam-mini's partition of this model.
pub fn adam_mini_blocks(config: &RunConfig, params: &[Param]) -> Result<Vec<usize>> {
    let spec = config.spec();
    params
        .iter()
        .map(|p| spec.adam_mini_block(&p.name, p.var.dims()))
        .collect()
}
