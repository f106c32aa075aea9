//! What the rest of the program knows of a network without naming it, as torchtitan's
//! `ModelSpec` does: a [`ModelSpec`] is implemented by each architecture's config section
//! ([`LlamaConfig`] in `llama.rs`, [`VitConfig`] in `vit.rs`) and picked in one place,
//! [`select`]. Sizing (`--dry-run`, the memory probe), benchmarks, metrics, checkpoints and
//! sampling ask the spec; only `task/`, which pairs a network with its data, names the
//! architectures. A third network implements this trait and adds one arm to [`select`].

use super::{LlamaConfig, Model, Param, VitConfig};
use crate::data::Position;
use crate::device::Precision;
use anyhow::Result;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// Which network a run trains (`model.architecture`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// The LLaMA of the `model` section.
    Llama,
    /// The ViT of the `vit` section.
    Vit,
}

/// The spec of the network a run trains (`model.architecture`, kept in the LLaMA section for
/// its config key): that network's own config section.
pub fn select<'a>(llama: &'a LlamaConfig, vit: &'a VitConfig) -> &'a dyn ModelSpec {
    match llama.architecture {
        Architecture::Llama => llama,
        Architecture::Vit => vit,
    }
}

/// A network as everything outside `task/` sees it. An *example* is what one row of a batch
/// holds (a sequence of `seq_len` tokens, or one image); a *unit* is what throughput counts
/// (tokens, or images).
pub trait ModelSpec: Sync {
    /// The network's name in messages ("LLaMA", "ViT").
    fn name(&self) -> &'static str;

    /// The config section that holds the network's shape: a checkpoint resumes only when
    /// its keys (and `model.*`, which names the architecture) are unchanged.
    fn section(&self) -> &'static str;

    /// Checks the shape, and that it takes the run's `train.seq_len`; every message names a
    /// key.
    fn check_shape(&self, seq_len: usize) -> Result<()>;

    /// `requested` (`train.dtype`) resolved for a GPU (`gpu`) or the CPU.
    fn precision(&self, requested: Precision, gpu: bool) -> Precision;

    /// The network with seeded f32 master weights, computing in `precision` (resolved), and
    /// its parameters in a fixed order.
    fn build(
        &self,
        seed: u64,
        precision: Precision,
        device: &Device,
    ) -> Result<(Box<dyn Model>, Vec<Param>)>;

    /// Elements per Adam-mini second-moment block of parameter `name` of shape `dims`: this
    /// network's partition.
    fn adam_mini_block(&self, name: &str, dims: &[usize]) -> Result<usize>;

    /// Units one example holds at `seq_len` (a LLaMA's tokens; one image).
    fn units_per_example(&self, seq_len: usize) -> usize;

    /// A batch of `batch` examples, as the start-up lines say it ("16 x 128 tokens").
    fn batch_shape(&self, batch: usize, seq_len: usize) -> String;

    /// Training FLOPs per unit as nanoGPT counts them, from the parameters besides the input
    /// embedding (`non_embedding`).
    fn flops_per_unit(&self, non_embedding: usize, seq_len: usize) -> f64;

    /// Estimated bytes of activations kept for the backward pass of `micro_batch` examples;
    /// `None` when the count overflows `usize` (a config's sizes can be any integer).
    fn activation_bytes(
        &self,
        micro_batch: usize,
        seq_len: usize,
        elem_bytes: usize,
    ) -> Option<usize>;

    /// Trainable parameters, from the shape alone (nothing is built); `None` when the count
    /// overflows `usize`.
    fn parameter_count(&self) -> Option<usize>;

    /// Transformer blocks.
    fn layers(&self) -> usize;

    /// The same network cut to `layers` blocks (the memory probe measures one or two).
    fn with_layers(&self, layers: usize) -> Box<dyn ModelSpec>;

    /// A micro-batch `(inputs, targets)` of `micro_batch` examples, all zeros, on `device`:
    /// the memory probe's input.
    fn probe_batch(
        &self,
        micro_batch: usize,
        seq_len: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor)>;

    /// Where a fresh run's data starts for `seed`.
    fn start_position(&self, seed: u64) -> Position;

    /// The causal language model's shape, when the network is one: `eval`, `export`,
    /// `sample` and training samples serve only those.
    fn language_model(&self) -> Option<&LlamaConfig>;
}
