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
                seed: train.eval_windows_seed().wrapping_add(EVAL_SEED_OFFSET),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::SingleRank;

    /// A one-layer LLaMA task trained with `seed` (evaluated with `eval_seed`) on fixed
    /// random tokens, its weights replaced by `weights` when given.
    fn task(seed: u64, eval_seed: Option<u64>, weights: Option<&[Param]>) -> Box<dyn Task> {
        let mut config = RunConfig::default();
        let model = &mut config.model;
        (model.hidden_size, model.intermediate_size) = (16, 32);
        (model.num_hidden_layers, model.num_attention_heads) = (1, 2);
        let train = &mut config.train;
        (train.seq_len, train.batch_size, train.eval_batches) = (8, 2, 3);
        (train.seed, train.eval_seed) = (seed, eval_seed);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut tokens = |n: usize, name: &str| {
            let ids = (0..n).map(|_| rng.random_range(0..256u32)).collect();
            TokenSegments::from_tokens(ids, name, 256).unwrap()
        };
        let corpus = Corpus {
            train: tokens(400, "train"),
            val: tokens(4000, "val"),
        };
        let position = Position::tokens_from(seed);
        let (task, params) =
            LanguageTask::start(&config, corpus, &Device::Cpu, &SingleRank, position).unwrap();
        for (p, w) in params.iter().zip(weights.unwrap_or(&[])) {
            p.var.set(w.var.as_tensor()).unwrap();
        }
        task
    }

    /// `train.eval_seed` fixes the validation windows whatever the training seed: the same
    /// weights score the same under two training seeds, where without it they do not; set to
    /// the training seed, it gives the default windows.
    #[test]
    fn eval_seed_fixes_the_validation_windows_across_training_seeds() {
        let (_, weights) = {
            let mut c = RunConfig::default().model;
            (c.hidden_size, c.intermediate_size) = (16, 32);
            (c.num_hidden_layers, c.num_attention_heads) = (1, 2);
            Llama::new(&c, DType::F32, &Device::Cpu, 1).unwrap()
        };
        let loss = |seed, eval_seed| {
            let task = task(seed, eval_seed, Some(&weights));
            task.evaluate(&SingleRank).unwrap().loss
        };
        assert_eq!(loss(1, Some(7)), loss(2, Some(7)));
        assert_ne!(loss(1, None), loss(2, None));
        assert_eq!(loss(1, Some(1)), loss(1, None));
        assert_ne!(loss(1, Some(7)), loss(1, None));
    }
}
