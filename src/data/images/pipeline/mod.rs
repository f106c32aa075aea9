//! The image batch pipeline: decoding and augmentation on a pool of worker threads, batches
//! assembled (and mixed) on a background thread and prefetched, exactly reproducible.
//!
//! Training reads an endless stream of "slots": slot `s` is position `s % N` of epoch
//! `s / N`'s shuffled order of the `N` images. Every random choice is keyed by what it
//! belongs to (the epoch's shuffle by the epoch, a sample's augmentation by its slot, a
//! batch's Mixup/CutMix by its first slot; see `keyed_rng`), never drawn from a shared
//! sequence, so batches are the same whatever the thread count, and a run resumes exactly
//! from the [`ImagePosition`] (slots consumed) of its last batch.
//!
//! Data parallelism follows the token loader: each of `world` ranks takes its contiguous
//! `global_batch / world` share of every global batch, so the union over ranks is the
//! one-rank batch (Mixup/CutMix then mixes within each rank's share).
//!
//! An unreadable or corrupt image is skipped with a warning on stderr (the first ten, then
//! at every power of ten) and counted ([`ImagePipeline::skipped`]). In training its slot
//! takes the next readable image of the epoch's order instead, so every batch stays full
//! and the stream's positions do not move (the stand-in appears twice that epoch, with
//! different augmentations); in evaluation it is left out of its batch, so every readable
//! image counts exactly once.
//!
//! Layout: `config` says what a pipeline does ([`PipelineConfig`], [`Transform`]),
//! `producer` makes the batches on the worker pool, this file runs the producer on its
//! thread and hands out [`ImageBatch`]es, and `throughput` times it.

mod config;
mod producer;
mod throughput;

pub use config::{PipelineConfig, Transform, DEFAULT_SHUFFLE_WINDOW};
pub use producer::epoch_order;
pub use throughput::{measure_throughput, Throughput};

use super::ImageSource;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use producer::Producer;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;

/// Where a pipeline stands: its seed and the slots (samples of the stream, over all ranks)
/// consumed by the batches delivered so far. Saved with a checkpoint, it restarts the
/// pipeline at the next batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagePosition {
    pub seed: u64,
    pub samples: u64,
}

impl ImagePosition {
    /// The start of the stream for `seed`.
    pub fn start(seed: u64) -> Self {
        Self { seed, samples: 0 }
    }

    /// The epoch the next sample belongs to, for a set of `len` images.
    pub fn epoch(&self, len: usize) -> u64 {
        self.samples / len.max(1) as u64
    }
}

/// One batch for this rank.
pub struct ImageBatch {
    /// `batch x 3 x image_size x image_size`, f32 on the CPU, normalised.
    pub images: Tensor,
    /// `batch x classes`, f32, rows summing to 1 (label smoothing and mixing included).
    pub soft_targets: Tensor,
    /// Each image's own label (before mixing), for accuracy.
    pub labels: Vec<u32>,
    /// The pipeline's position after this batch: where a resumed run continues.
    pub position: ImagePosition,
}

/// Produces [`ImageBatch`]es on a background thread, `prefetch` ahead of the consumer.
pub struct ImagePipeline {
    receiver: Option<Receiver<Result<ImageBatch>>>,
    thread: Option<JoinHandle<()>>,
    skipped: Arc<AtomicU64>,
    /// Training: the thread never ends while the pipeline lives.
    endless: bool,
}

impl ImagePipeline {
    /// Starts producing batches of `source` from `position` (`ImagePosition::start(seed)`,
    /// or a checkpoint's; evaluation always starts from sample 0 of the position's seed).
    pub fn start(
        source: Arc<dyn ImageSource>,
        config: PipelineConfig,
        position: ImagePosition,
    ) -> Result<Self> {
        config.validate()?;
        if source.is_empty() {
            bail!("the image source holds no image");
        }
        let threads = if config.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            config.threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("image-worker-{i}"))
            .build()
            .context("cannot start the image worker threads")?;
        let skipped = Arc::new(AtomicU64::new(0));
        let endless = matches!(config.transform, Transform::Train { .. });
        let (sender, receiver) = sync_channel(config.prefetch.max(1));
        let mut producer = Producer {
            source,
            seed: position.seed,
            pool,
            bad: RwLock::new(HashSet::new()),
            skipped: skipped.clone(),
            orders: HashMap::new(),
            config,
        };
        let thread = std::thread::Builder::new()
            .name("image-pipeline".into())
            .spawn(move || {
                let global = producer.config.global_batch as u64;
                let mut next = match producer.config.transform {
                    Transform::Train { .. } => position.samples,
                    Transform::Eval(_) => 0,
                };
                loop {
                    let batch = match producer.config.transform.clone() {
                        Transform::Train { .. } => producer.train_batch(next).map(Some),
                        Transform::Eval(t) => producer.eval_batch(next, &t),
                    };
                    next += global;
                    let batch = match batch {
                        Ok(Some(b)) if b.labels.is_empty() => continue,
                        Ok(Some(b)) => Ok(b),
                        Ok(None) => return,
                        Err(e) => Err(e),
                    };
                    let failed = batch.is_err();
                    // The receiver is gone: the run is over.
                    if sender.send(batch).is_err() || failed {
                        return;
                    }
                }
            })?;
        Ok(Self {
            receiver: Some(receiver),
            thread: Some(thread),
            skipped,
            endless,
        })
    }

    /// The next batch; None once an evaluation pass is complete (training never ends). A
    /// failed batch (a data set with no readable image, an out-of-range label) is an error,
    /// after which the pipeline is finished.
    pub fn next_batch(&mut self) -> Result<Option<ImageBatch>> {
        if let Some(Ok(batch)) = self.receiver.as_ref().map(|r| r.recv()) {
            return batch.map(Some);
        }
        // The batch thread has ended: normally after an evaluation pass, or after sending
        // an error; a panic is reported, and a training stream never ends on its own.
        self.receiver.take();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                bail!("the image pipeline thread panicked");
            }
            if self.endless {
                bail!("the image pipeline thread stopped unexpectedly");
            }
        }
        Ok(None)
    }

    /// Distinct unreadable images met so far (the batch thread may be ahead of the
    /// consumer).
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }
}

impl Iterator for ImagePipeline {
    type Item = Result<ImageBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_batch().transpose()
    }
}

impl Drop for ImagePipeline {
    fn drop(&mut self) {
        // Closing the channel ends the thread at its next send.
        self.receiver.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
