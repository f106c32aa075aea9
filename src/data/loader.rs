//! The training data loader: each optimizer step's micro-batches for this data-parallel
//! rank, prepared ahead by a background thread so the trainer never waits on data.
//!
//! Every rank draws the same windows for a step (the same seeded sampler) and keeps its own
//! contiguous slice of them: `global_batch / world` windows starting at
//! `rank * global_batch / world`. The slices of all ranks are disjoint and together make
//! the global batch, whatever the world size; with one rank the windows are exactly those
//! of [`Batcher::next_batch`] called micro-batch after micro-batch.

use super::{batch_of, Batcher, TokenPosition, TokenSegments};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

/// How the loader shapes and splits each step's batch.
#[derive(Debug, Clone, Copy)]
pub struct LoaderShape {
    /// Sequences per optimizer step over all ranks.
    pub global_batch: usize,
    /// Sequences per forward/backward pass on one rank.
    pub micro_batch: usize,
    pub seq_len: usize,
    /// This process's data-parallel rank and the number of ranks.
    pub rank: usize,
    pub world: usize,
}

impl LoaderShape {
    fn validate(&self) -> Result<()> {
        if self.world == 0 || self.rank >= self.world {
            bail!(
                "data-parallel rank {} is not below the world size {}",
                self.rank,
                self.world
            );
        }
        if !self.global_batch.is_multiple_of(self.world) {
            bail!(
                "train.batch_size ({}) must be divisible by the number of ranks ({})",
                self.global_batch,
                self.world
            );
        }
        let per_rank = self.global_batch / self.world;
        if self.micro_batch == 0 || !per_rank.is_multiple_of(self.micro_batch) {
            bail!(
                "the per-rank batch ({per_rank} = batch_size / ranks) must be a multiple of \
                 train.micro_batch_size ({})",
                self.micro_batch
            );
        }
        Ok(())
    }
}

/// Steps the loader prepares ahead of the trainer by default.
pub const PREFETCH_STEPS: usize = 2;

/// One optimizer step's data for this rank.
pub struct StepBatch {
    /// `(inputs, targets)` per micro-batch, each `micro_batch x seq_len` (u32, CPU).
    pub micro_batches: Vec<(Tensor, Tensor)>,
    /// The sampler's position after this step: where a resumed run continues.
    pub position: TokenPosition,
}

/// Prefetches [`StepBatch`]es on a background thread.
pub struct Loader {
    receiver: Option<Receiver<Result<StepBatch>>>,
    thread: Option<JoinHandle<()>>,
}

impl Loader {
    /// Starts producing steps from `position` (a fresh `TokenPosition { seed, word_pos: 0 }`
    /// or a checkpoint's), keeping up to `depth` steps ready.
    pub fn start(
        tokens: Arc<TokenSegments>,
        position: TokenPosition,
        shape: LoaderShape,
        depth: usize,
    ) -> Result<Self> {
        shape.validate()?;
        let (sender, receiver) = sync_channel(depth.max(1));
        let thread = std::thread::Builder::new()
            .name("data-loader".into())
            .spawn(move || {
                let mut batcher = Batcher::new(&tokens, position.seed);
                batcher.seek(position);
                let per_rank = shape.global_batch / shape.world;
                loop {
                    let windows: Vec<(usize, usize)> = (0..shape.global_batch)
                        .map(|_| batcher.draw(shape.seq_len))
                        .collect();
                    let mine = &windows[shape.rank * per_rank..(shape.rank + 1) * per_rank];
                    let step = mine
                        .chunks(shape.micro_batch)
                        .map(|w| batch_of(&tokens, w, shape.seq_len, &Device::Cpu))
                        .collect::<Result<Vec<_>>>()
                        .map(|micro_batches| StepBatch {
                            micro_batches,
                            position: batcher.position(),
                        });
                    // The receiver is gone: the run is over.
                    if sender.send(step).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Self {
            receiver: Some(receiver),
            thread: Some(thread),
        })
    }

    /// The next step's micro-batches (waiting only when the thread has fallen behind).
    pub fn next_step(&mut self) -> Result<StepBatch> {
        match self.receiver.as_ref().map(|r| r.recv()) {
            Some(Ok(step)) => step,
            _ => bail!("the data loader thread stopped unexpectedly"),
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Closing the channel ends the thread at its next send.
        self.receiver.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Arc<TokenSegments> {
        Arc::new(TokenSegments::from_tokens((0..5000).collect(), "test", 5000).unwrap())
    }

    fn rows(t: &Tensor) -> Vec<Vec<u32>> {
        t.to_vec2().unwrap()
    }

    #[test]
    fn one_rank_sees_the_batchers_windows_and_ranks_split_the_batch() {
        let start = TokenPosition {
            seed: 11,
            word_pos: 0,
        };
        let shape = |rank, world, micro| LoaderShape {
            global_batch: 8,
            micro_batch: micro,
            seq_len: 16,
            rank,
            world,
        };
        let tokens = tokens();
        let mut single = Loader::start(tokens.clone(), start, shape(0, 1, 2), 2).unwrap();
        let mut batcher = Batcher::new(&tokens, 11);
        let mut global: Vec<Vec<Vec<u32>>> = Vec::new();
        for _ in 0..3 {
            let step = single.next_step().unwrap();
            assert_eq!(step.micro_batches.len(), 4);
            let mut all = Vec::new();
            for (x, y) in &step.micro_batches {
                let (bx, _) = batcher.next_batch(2, 16, &Device::Cpu).unwrap();
                assert_eq!(rows(x), rows(&bx));
                for (xr, yr) in rows(x).iter().zip(rows(y)) {
                    assert_eq!(yr[15], xr[15] + 1);
                }
                all.extend(rows(x));
            }
            assert_eq!(step.position, batcher.position());
            global.push(all);
        }
        // Four ranks: disjoint quarters that together are the global batch, step by step.
        let mut ranks: Vec<Loader> = (0..4)
            .map(|r| Loader::start(tokens.clone(), start, shape(r, 4, 1), 2).unwrap())
            .collect();
        for expected in &global {
            let mut joined = Vec::new();
            for loader in &mut ranks {
                let step = loader.next_step().unwrap();
                assert_eq!(step.micro_batches.len(), 2);
                for (x, _) in &step.micro_batches {
                    joined.extend(rows(x));
                }
            }
            assert_eq!(&joined, expected);
        }
        // A loader started from a step's position continues with the next step.
        let mut first = Loader::start(tokens.clone(), start, shape(0, 1, 8), 1).unwrap();
        let after_one = first.next_step().unwrap().position;
        let mut resumed = Loader::start(tokens, after_one, shape(0, 1, 8), 1).unwrap();
        assert_eq!(
            rows(&resumed.next_step().unwrap().micro_batches[0].0),
            global[1]
        );
    }

    #[test]
    fn shapes_that_do_not_divide_are_errors() {
        let start = TokenPosition {
            seed: 1,
            word_pos: 0,
        };
        let bad = LoaderShape {
            global_batch: 6,
            micro_batch: 2,
            seq_len: 8,
            rank: 0,
            world: 4,
        };
        let err = Loader::start(tokens(), start, bad, 1)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("divisible by the number of ranks"), "{err}");
    }
}
