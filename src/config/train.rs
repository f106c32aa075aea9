//! The training loop's section (`train.*`): loop lengths, batch shape, device and
//! bookkeeping. It lives beside the other sections' composition rather than in `train/`,
//! since every component reads the composed [`super::RunConfig`] and `train/` reads them:
//! owning this section there would make `config` and `train` import each other.

use crate::data::loader::LoaderShape;
use crate::device::{DeviceKind, Kernels, Precision};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// The longest `--dist-timeout` accepted: deadlines are the clock plus it, which must not
/// overflow, and a week covers any wait (another rank preparing a corpus included).
pub const MAX_DIST_TIMEOUT_S: u64 = 7 * 24 * 3600;

/// The most compute threads a run may ask for (`--threads`): far above any machine's
/// cores, and far below the count at which spawning them fails.
pub const MAX_THREADS: usize = 4096;

/// Loop lengths, batch shape and bookkeeping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Global batch in sequences per optimizer step.
    pub batch_size: usize,
    /// Sequences per forward/backward pass; the batch is accumulated over
    /// `batch_size / micro_batch_size` passes (null means the whole batch at once).
    pub micro_batch_size: Option<usize>,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Evaluate every N steps (and after the last); 0 evaluates only at the end.
    pub eval_every: usize,
    /// Micro-batches (of `micro_batch_size` sequences) per evaluation.
    pub eval_batches: usize,
    /// LLaMA runs: seeds which validation windows an evaluation scores (null: `seed`, so
    /// the windows change with the training seed); set it to compare runs of different
    /// seeds on the same windows.
    pub eval_seed: Option<u64>,
    /// Write a metrics line every N steps.
    pub log_every: usize,
    /// Seeds model init and batch sampling.
    pub seed: u64,
    /// Compute threads (null means every core).
    pub threads: Option<usize>,
    /// Output folder; empty means `runs/<preset>`.
    pub out: String,
    /// Write a checkpoint every N steps (0: only at the end and on SIGINT/SIGTERM).
    pub checkpoint_every: usize,
    /// Complete checkpoints kept; older ones are deleted (the newest never is).
    pub keep_checkpoints: usize,
    /// `cpu`, `cuda`, or `auto` (CUDA when built with it and a GPU is present).
    pub device: DeviceKind,
    /// Compute precision: `f32`, `bf16` (bf16 weights and activations in the forward and
    /// backward passes; f32 master weights, gradients and optimizer state), or `auto` (bf16
    /// on CUDA, f32 on the CPU).
    pub dtype: Precision,
    /// `auto` (the fused CPU kernels where they apply), `fused` (those, or an error), or
    /// `reference` (the CPU runs the candle compositions a CUDA run executes). Process-wide:
    /// see [`Kernels::apply`].
    pub kernels: Kernels,
    /// Seconds a data-parallel rank waits for the others inside one collective (or at
    /// start-up) before it fails, naming the rank it waited for.
    pub dist_timeout_s: u64,
    /// Mirror every metrics line into TensorBoard event files in `OUT/tb/`.
    pub tensorboard: bool,
    /// Peak dense TFLOP/s of one rank's device, for MFU (null: a known GPU's datasheet
    /// figure, or measured on the CPU).
    pub peak_tflops: Option<f64>,
    /// Let CUDA's f32 matrix products run on TF32 tensor cores (PyTorch's `allow_tf32`):
    /// several times faster, with 10-bit mantissas in the products. Off by default, as in
    /// PyTorch; no effect on the CPU or in bf16.
    pub tf32: bool,
    /// Trace this many training steps (after the first) into `OUT/trace.json`, a Chrome /
    /// Perfetto trace (0: none).
    pub profile_steps: usize,
    /// LLaMA runs: every N steps (and after the last) the model continues `sample_prompt`
    /// with `sample_tokens` tokens, printed and logged to `metrics.jsonl` (0: never).
    pub sample_every: usize,
    /// The text training samples continue.
    pub sample_prompt: String,
    /// Tokens each training sample writes.
    pub sample_tokens: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 200,
            batch_size: 16,
            micro_batch_size: None,
            seq_len: 128,
            eval_every: 50,
            eval_batches: 4,
            eval_seed: None,
            log_every: 10,
            seed: 1337,
            threads: None,
            out: String::new(),
            checkpoint_every: 1000,
            keep_checkpoints: 3,
            device: DeviceKind::Auto,
            dtype: Precision::F32,
            kernels: Kernels::Auto,
            dist_timeout_s: 1800,
            tensorboard: true,
            peak_tflops: None,
            tf32: false,
            profile_steps: 0,
            sample_every: 0,
            sample_prompt: "The".into(),
            sample_tokens: 64,
        }
    }
}

impl TrainConfig {
    /// Micro-batch size after resolving the `None` default.
    pub fn micro_batch(&self) -> usize {
        self.micro_batch_size.unwrap_or(self.batch_size)
    }

    /// The seed of the validation windows LLaMA evaluations score: `eval_seed`, or the
    /// training `seed` when it is null.
    pub fn eval_windows_seed(&self) -> u64 {
        self.eval_seed.unwrap_or(self.seed)
    }

    /// Sequences (or images) per forward/backward pass on one of `world` ranks: an unset
    /// `micro_batch_size` means each rank's whole share at once.
    pub fn micro_batch_per_rank(&self, world: usize) -> usize {
        self.micro_batch_size
            .unwrap_or(self.batch_size / world.max(1))
    }

    /// How the token loader shapes and splits each step's batch for `rank` of `world`.
    pub fn loader_shape(&self, rank: usize, world: usize) -> LoaderShape {
        LoaderShape {
            global_batch: self.batch_size,
            micro_batch: self.micro_batch_per_rank(world),
            seq_len: self.seq_len,
            rank,
            world,
        }
    }

    /// Sets the process-wide compute switches this section asks for on `device` (resolved
    /// `dtype`): fused or reference kernels ([`Kernels::apply`]) and TF32 matrix products.
    pub fn set_compute(&self, device: &candle_core::Device) -> Result<()> {
        self.kernels.apply(device, self.dtype)?;
        crate::device::allow_tf32(self.tf32);
        Ok(())
    }

    /// Checks the ranges; every message names the key.
    pub(super) fn validate(&self) -> Result<()> {
        for (key, value) in [
            ("steps", self.steps),
            ("batch_size", self.batch_size),
            ("micro_batch_size", self.micro_batch()),
            ("seq_len", self.seq_len),
            ("eval_batches", self.eval_batches),
            ("log_every", self.log_every),
            ("threads", self.threads.unwrap_or(1)),
            ("keep_checkpoints", self.keep_checkpoints),
            ("dist_timeout_s", self.dist_timeout_s as usize),
            ("sample_tokens", self.sample_tokens),
        ] {
            if value == 0 {
                bail!("train.{key} must be a positive integer, got 0");
            }
        }
        if let Some(threads) = self.threads.filter(|&t| t > MAX_THREADS) {
            bail!("train.threads is {threads}; at most {MAX_THREADS} is allowed");
        }
        if self.dist_timeout_s > MAX_DIST_TIMEOUT_S {
            bail!(
                "train.dist_timeout_s (--dist-timeout) is {} s; at most {MAX_DIST_TIMEOUT_S} s \
                 (a week) is allowed: a rank silent for longer is hung",
                self.dist_timeout_s
            );
        }
        if self
            .peak_tflops
            .is_some_and(|p| !(p > 0.0 && p.is_finite()))
        {
            bail!("train.peak_tflops must be a positive number of TFLOP/s");
        }
        if self.sample_every > 0 && self.sample_prompt.is_empty() {
            bail!("train.sample_prompt is empty: samples continue a text, give it one");
        }
        if !self.batch_size.is_multiple_of(self.micro_batch()) {
            bail!(
                "train.micro_batch_size ({}) must divide train.batch_size ({})",
                self.micro_batch(),
                self.batch_size
            );
        }
        // `auto` devices and precisions are checked again once resolved, when a run starts.
        self.kernels
            .check(self.device == DeviceKind::Cpu, self.dtype)
    }
}
