//! A LLaMA trained on random token windows, evaluated on windows of the validation tokens.

use super::{Evaluation, Position, Task};
use crate::config::RunConfig;
use crate::data::loader::{Loader, PREFETCH_STEPS};
use crate::data::{self, Batcher, TokenPosition, TokenSegments, Tokenizer};
use crate::dist::{self, Communicator};
use crate::model::{Llama, Model, Param};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

/// Seed offset for evaluation windows, so they never coincide with training draws.
const EVAL_SEED_OFFSET: u64 = 0x5EED_0FE7_A100;

/// A run's training and validation tokens, loaded but not yet streaming.
pub struct Corpus {
    /// The tokens training windows are drawn from.
    pub train: TokenSegments,
    /// The tokens evaluation windows are drawn from.
    pub val: TokenSegments,
}

impl Corpus {
    /// Opens `data.train` (and the validation data) with the run's tokenizer. Rank 0 goes
    /// first: loading may download and prepare a dataset, which the other ranks then read.
    pub fn load(config: &RunConfig, comm: &dyn Communicator) -> Result<Self> {
        let tokenizer = Tokenizer::load(&config.data.tokenizer)
            .map_err(|e| data::explain_unprepared(&config.data, e))?;
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
        Ok(Self {
            train: loaded.train,
            val: loaded.val,
        })
    }

    /// Four batches of uniformly random tokens to train on, and no validation tokens: what
    /// `bench` times, with no corpus to read.
    pub fn random(config: &RunConfig) -> Result<Self> {
        let train = &config.train;
        let mut rng = ChaCha8Rng::seed_from_u64(train.seed);
        let vocab = config.model.vocab_size;
        let tokens = (0..train.batch_size * (train.seq_len + 1) * 4)
            .map(|_| rng.random_range(0..vocab as u32))
            .collect();
        Ok(Self {
            train: TokenSegments::from_tokens(tokens, "random tokens", vocab)?,
            val: TokenSegments::from_tokens(Vec::new(), "random tokens", vocab)?,
        })
    }
}

/// Which windows an evaluation scores: the same ones at every evaluation.
#[derive(Debug, Clone, Copy)]
struct EvalWindows {
    seed: u64,
    /// Micro-batches per evaluation.
    batches: usize,
    /// Windows per micro-batch.
    micro_batch: usize,
    seq_len: usize,
}

/// A LLaMA and its token stream.
pub struct LanguageTask {
    model: Llama,
    loader: Loader,
    val: TokenSegments,
    position: TokenPosition,
    eval: EvalWindows,
    sizes: String,
}

impl LanguageTask {
    /// Builds the model and starts streaming this rank's batches of `corpus` from
    /// `position`.
    pub fn start(
        config: &RunConfig,
        corpus: Corpus,
        device: &Device,
        comm: &dyn Communicator,
        position: Position,
    ) -> Result<(Box<dyn Task>, Vec<Param>)> {
        let (dtype, seed) = (config.train.dtype, config.train.seed);
        let (model, params) = Llama::build(&config.model, dtype, device, seed)?;
        let train = &config.train;
        let sizes = format!(
            "{} train / {} val tokens",
            corpus.train.len(),
            corpus.val.len()
        );
        let shape = train.loader_shape(comm.rank(), comm.world());
        let loader = Loader::start(
            Arc::new(corpus.train),
            position.tokens,
            shape,
            PREFETCH_STEPS,
        )?;
        let task = Self {
            model,
            loader,
            val: corpus.val,
            position: position.tokens,
            eval: EvalWindows {
                seed: train.seed.wrapping_add(EVAL_SEED_OFFSET),
                batches: train.eval_batches,
                micro_batch: train.micro_batch(),
                seq_len: train.seq_len,
            },
            sizes,
        };
        Ok((Box::new(task), params))
    }
}

impl Task for LanguageTask {
    fn model(&self) -> &dyn Model {
        &self.model
    }

    fn next_batch(&mut self) -> Result<Vec<(Tensor, Tensor)>> {
        let batch = self.loader.next_step()?;
        self.position = batch.position;
        Ok(batch.micro_batches)
    }

    fn position(&self) -> Position {
        Position {
            tokens: self.position,
            images: None,
        }
    }

    /// Mean loss over `eval_batches` micro-batches drawn from a fixed seed (rank `r`
    /// computes those numbered `r`, `r + world`, ..., summed in batch order).
    fn evaluate(&self, comm: &dyn Communicator) -> Result<Evaluation> {
        let EvalWindows {
            seed,
            batches,
            micro_batch,
            seq_len,
        } = self.eval;
        let mut batcher = Batcher::new(&self.val, seed);
        let mut mine = Vec::new();
        for i in 0..batches {
            let (inputs, targets) =
                batcher.next_batch(micro_batch, seq_len, self.model.device())?;
            if i % comm.world() != comm.rank() {
                continue;
            }
            let loss = self.model.loss(&inputs, &targets)?.detach();
            mine.push(loss.to_dtype(DType::F64)?.to_scalar::<f64>()?);
        }
        let losses = dist::all_gather_f64(comm, &mine)?;
        let world = comm.world();
        let sum = (0..batches)
            .map(|i| {
                losses[i % world]
                    .get(i / world)
                    .copied()
                    .with_context(|| format!("rank {} sent too few evaluation losses", i % world))
            })
            .sum::<Result<f64>>()?;
        Ok(Evaluation {
            loss: sum / batches as f64,
            top1: None,
            top5: None,
        })
    }

    fn describe(&self) -> String {
        self.sizes.clone()
    }
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
