//! `bsfa-train bench`: times training steps on random tokens and reports one JSON line.
//!
//! The step is the training loop's own ([`Trainer::step`]: forward, backward, averaging,
//! clipping, the optimizer), so what is measured is what trains.

use crate::config::RunConfig;
use crate::dist::{Job, SingleRank};
use crate::memory_check::{self, Workload};
use crate::model::ParamCounts;
use crate::task;
use crate::train::Trainer;
use anyhow::{bail, Result};
use candle_core::Device;
use serde::Serialize;
use std::time::Instant;

/// What `bench` prints: medians over the timed steps.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub params: usize,
    pub batch_size: usize,
    pub micro_batch_size: usize,
    pub seq_len: usize,
    pub threads: usize,
    /// Data-parallel ranks; `batch_size` is the global batch over all of them.
    pub ranks: usize,
    pub device: String,
    pub dtype: crate::device::Precision,
    pub optimizer: String,
    /// Untimed steps before the timed ones (with BSFA at least `bsfa.history + 1`).
    pub warmup_steps: usize,
    pub timed_steps: usize,
    pub ms_per_step: f64,
    /// Mean step time: unlike the median, it includes periodic work (BSFA's re-estimation
    /// every `bsfa.interval` steps).
    pub mean_ms_per_step: f64,
    pub tokens_per_s: f64,
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub optimizer_ms: f64,
    /// Median time averaging gradients over the ranks.
    pub communication_ms: f64,
    /// Mean optimizer time per step (periodic work included).
    pub mean_optimizer_ms: f64,
    /// With BSFA: re-estimations among the timed steps.
    pub reestimations_timed: Option<usize>,
    /// With BSFA: whether its timed steps were at steady state, the history full and a
    /// re-estimation timed (the default step counts make sure of both).
    pub bsfa_steady_state: Option<bool>,
    /// With BSFA: the median optimizer time of a timed step that re-estimated, less the
    /// median of one that did not: one re-estimation's cost at a full history.
    pub reestimation_ms: Option<f64>,
    /// Peak resident memory of the process (Linux `VmHWM`), if known.
    pub peak_rss_mib: Option<f64>,
    /// Tokens/s the data loader delivers on `data.train` with this batch shape, when
    /// measured (`--loader-steps`).
    pub loader_tokens_per_s: Option<f64>,
    /// `loader_tokens_per_s / tokens_per_s`: how much faster data comes than it is consumed.
    pub loader_vs_trainer: Option<f64>,
    /// Training FLOPs per token, as nanoGPT counts them: `6 N + 12 layers hidden seq` with `N`
    /// the parameters besides the input embedding.
    pub flops_per_token: f64,
    /// Peak dense TFLOP/s of one rank's device (see [`crate::mfu::peak`]), when known.
    pub peak_tflops: Option<f64>,
    /// Where `peak_tflops` comes from: `--peak-tflops`, a datasheet, or a measurement.
    pub peak_tflops_source: Option<String>,
    /// Model FLOPs utilisation against `peak_tflops` per rank, when known.
    pub mfu: Option<f64>,
}

/// What `bench` times besides the run config.
pub struct BenchOptions {
    /// Compute threads of this process.
    pub threads: usize,
    /// Untimed steps first (None: the default of [`steps`]).
    pub warmup: Option<usize>,
    /// Timed steps (None: the default of [`steps`]).
    pub iters: Option<usize>,
    /// Steps to time the data loader alone (0: skip).
    pub loader_steps: usize,
}

/// Runs `warmup` untimed and `iters` timed training steps of `config`'s model as this rank
/// of `job`, then, when `loader_steps > 0`, times the data loader alone on
/// `config.data.train`.
pub fn run(job: &Job, config: &RunConfig, options: &BenchOptions) -> Result<BenchReport> {
    let BenchOptions {
        threads,
        warmup,
        iters,
        loader_steps,
    } = *options;
    let (warmup, iters) = steps(config, warmup, iters);
    if iters == 0 {
        bail!("--iters must be at least 1");
    }
    let device = &job.device;
    let config = &config.on_device(device);
    config.train.set_compute(device)?;
    let comm = job.comm.as_ref();
    let world = comm.world();
    memory_check::check(config, device, Workload::Training { world })?;
    let train = &config.train;
    let (task, params) = task::open_for_bench(config, device, comm)?;
    let mut trainer = Trainer::new(config, task, params, &job.comm)?;
    let lr = config.optimizer.lr;
    let (mut total, mut forward, mut backward, mut update) = (vec![], vec![], vec![], vec![]);
    let mut communication = vec![];
    // Optimizer times of the timed steps that re-estimated BSFA's directions.
    let mut reestimating = vec![];
    for step in 0..warmup + iters {
        let started = Instant::now();
        let outcome = trainer.step(lr, None)?;
        let step_s = started.elapsed().as_secs_f64();
        if step >= warmup {
            total.push(step_s);
            forward.push(outcome.forward_s);
            backward.push(outcome.backward_s);
            communication.push(outcome.communication_s);
            if config.bsfa.enabled && config.bsfa.reestimates_at(step as u64) {
                reestimating.push(outcome.optimizer_s);
            } else {
                update.push(outcome.optimizer_s);
            }
        }
    }
    let reestimation_ms = (!reestimating.is_empty() && !update.is_empty())
        .then(|| (crate::metrics::median(&reestimating) - crate::metrics::median(&update)) * 1e3);
    let reestimations_timed = config.bsfa.enabled.then_some(reestimating.len());
    let mean_optimizer_s = mean(&[&update[..], &reestimating[..]].concat());
    let mean_step_s = mean(&total);
    let step_s = crate::metrics::median(&total);
    let tokens_per_s = config.units_per_step() as f64 / step_s;
    let loader_tokens_per_s = (loader_steps > 0)
        .then(|| loader_throughput(config, loader_steps))
        .transpose()?;
    let counts = ParamCounts::of(&trainer.params);
    let flops_per_token = config
        .spec()
        .flops_per_unit(counts.total - counts.embeddings, train.seq_len);
    let peak = crate::mfu::peak(train.peak_tflops, train.dtype, device)?;
    let mfu = peak.as_ref().map(|peak| {
        crate::mfu::utilisation(flops_per_token, tokens_per_s, peak.tflops, comm.world())
    });
    Ok(BenchReport {
        params: counts.total,
        batch_size: train.batch_size,
        micro_batch_size: train.micro_batch(),
        seq_len: train.seq_len,
        threads,
        ranks: comm.world(),
        device: crate::device::name(device),
        dtype: train.dtype,
        optimizer: crate::checkpoint::optimizer_kind(config),
        warmup_steps: warmup,
        timed_steps: iters,
        ms_per_step: step_s * 1e3,
        mean_ms_per_step: mean_step_s * 1e3,
        tokens_per_s,
        forward_ms: crate::metrics::median(&forward) * 1e3,
        backward_ms: crate::metrics::median(&backward) * 1e3,
        // The steady step's (with `bsfa.interval = 1` every step re-estimates).
        optimizer_ms: crate::metrics::median(if update.is_empty() {
            &reestimating
        } else {
            &update
        }) * 1e3,
        communication_ms: crate::metrics::median(&communication) * 1e3,
        mean_optimizer_ms: mean_optimizer_s * 1e3,
        reestimations_timed,
        bsfa_steady_state: reestimations_timed.map(|n| bsfa_steady(config, warmup, n)),
        reestimation_ms,
        peak_rss_mib: crate::metrics::peak_rss_mib(),
        loader_tokens_per_s,
        loader_vs_trainer: loader_tokens_per_s.map(|l| l / tokens_per_s),
        flops_per_token,
        peak_tflops: peak.as_ref().map(|p| p.tflops),
        peak_tflops_source: peak.map(|p| p.source),
        mfu,
    })
}

/// The warm-up and timed step counts for `config`, `warmup` and `iters` where given. By
/// default 2 and 5; with BSFA the history fills first (`bsfa.history + 1` untimed steps:
/// before that a re-estimation sees fewer rows and the history holds less memory, so time
/// and memory come out far below steady state) and at least one re-estimation is timed
/// (`bsfa.interval` timed steps).
pub fn steps(config: &RunConfig, warmup: Option<usize>, iters: Option<usize>) -> (usize, usize) {
    let bsfa = &config.bsfa;
    let (steady_warmup, steady_iters) = if bsfa.enabled {
        (bsfa.history + 1, bsfa.interval.max(5))
    } else {
        (2, 5)
    };
    (
        warmup.unwrap_or(steady_warmup),
        iters.unwrap_or(steady_iters),
    )
}

/// Whether BSFA's timed steps were at steady state: its history full before the first one,
/// and at least one re-estimation among them.
fn bsfa_steady(config: &RunConfig, warmup: usize, reestimations: usize) -> bool {
    warmup > config.bsfa.history && reestimations > 0
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// Tokens/s of the data loader over `steps` steps of `config`'s batch shape on its training
/// data (built-in, text or memory-mapped shards), consumed as fast as it produces them; for
/// a ViT, images/s of the decoding and augmentation pipeline. The data comes through the
/// training loop's own [`task::open`].
pub fn loader_throughput(config: &RunConfig, steps: usize) -> Result<f64> {
    let start = config.spec().start_position(config.train.seed);
    let (mut task, _) = task::open(config, &Device::Cpu, &SingleRank, start)?;
    // The first step pays for start-up (threads, first reads).
    task.next_batch()?;
    let started = Instant::now();
    for _ in 0..steps {
        task.next_batch()?;
    }
    Ok((steps * config.units_per_step()) as f64 / started.elapsed().as_secs_f64())
}
