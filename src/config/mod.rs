//! The typed run configuration and how it is resolved.
//!
//! A run's config is built in layers, each a JSON object with the same keys:
//! code defaults, then the `--model` preset (`configs/*.json`), then the preset's
//! `with_bsfa` section when BSFA ends up enabled (the paper's BSFA run of that model: its
//! base optimizer, k, l, T, alpha, gamma and steps), then `--config FILE`, then the
//! dedicated CLI flags (`--lr`, `--steps`, ...), then every `--set key=value`.
//! Each value is type-checked as it is set (against the section types that the components
//! own), and ranges are validated once all layers are merged, so every error names the key
//! a user typed.
mod builder;
mod train;

pub use builder::{ConfigBuilder, WITH_BSFA};
pub use train::{TrainConfig, MAX_THREADS};

use crate::data::images::augment_config::AugmentConfig;
use crate::data::DataConfig;
use crate::device::Precision;
use crate::model::{self, LlamaConfig, ModelSpec, VitConfig};
use crate::optim::{BsfaConfig, OptimizerConfig};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::presets::PRESETS;

/// The fully resolved configuration of a run (written to `OUT/config.json`): one section
/// per component, each owned and validated by its component.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// The LLaMA architecture, and which architecture the run trains.
    pub model: LlamaConfig,
    /// The ViT trained when `model.architecture` is `vit` (Hugging Face `ViTConfig` names).
    pub vit: VitConfig,
    /// The base optimizer and the learning-rate schedule.
    pub optimizer: OptimizerConfig,
    /// The BSFA wrapper around the base optimizer.
    pub bsfa: BsfaConfig,
    /// The loop: steps, batch shape, evaluation, checkpoints, device.
    pub train: TrainConfig,
    /// Where tokens (or images) come from.
    pub data: DataConfig,
    /// Image augmentation of ViT runs.
    pub augment: AugmentConfig,
}

impl RunConfig {
    /// The network this run trains, as everything outside `task/` sees it.
    pub fn spec(&self) -> &dyn ModelSpec {
        model::spec::select(&self.model, &self.vit)
    }

    /// What one optimizer step consumes, the unit of `tokens_per_s` and `tokens_seen`:
    /// tokens, or images for a ViT.
    pub fn units_per_step(&self) -> usize {
        self.train.batch_size * self.spec().units_per_example(self.train.seq_len)
    }

    /// This config as it runs on `device`: `train.dtype = auto` resolved.
    pub fn on_device(&self, device: &candle_core::Device) -> Self {
        let mut config = self.clone();
        config.train.dtype = self.precision_on(device.is_cuda());
        config
    }

    /// `train.dtype` resolved for a GPU (`gpu = true`) or for the CPU (`false`): `auto` is
    /// bf16 on a GPU and f32 on the CPU, or what the network has (a ViT: f32).
    pub fn precision_on(&self, gpu: bool) -> Precision {
        self.spec().precision(self.train.dtype, gpu)
    }

    /// Checks every section, then what sections must agree on; messages name the key.
    pub fn validate(&self) -> Result<()> {
        self.optimizer.validate()?;
        self.bsfa.validate()?;
        self.train.validate()?;
        self.data.validate()?;
        self.spec().check_shape(self.train.seq_len)?;
        // Checked for every run, though only image runs augment: a bad value is an error
        // wherever it is set.
        self.augment.validate()
    }
}

/// Every settable dotted key, in declaration order.
pub fn valid_keys() -> Vec<String> {
    let defaults = serde_json::to_value(RunConfig::default()).expect("config serialises");
    let mut keys = Vec::new();
    flatten_keys(&defaults, "", &mut keys);
    keys.into_iter().map(|(k, _)| k).collect()
}

/// The dotted keys whose values differ between two configs, with the value in `a` and in `b`.
pub fn differences(a: &RunConfig, b: &RunConfig) -> Result<Vec<(String, Value, Value)>> {
    let (mut x, mut y) = (Vec::new(), Vec::new());
    flatten_keys(&serde_json::to_value(a)?, "", &mut x);
    flatten_keys(&serde_json::to_value(b)?, "", &mut y);
    // Both come from the same struct: the same keys in the same order.
    Ok(x.into_iter()
        .zip(y)
        .filter(|((_, va), (_, vb))| va != vb)
        .map(|((key, va), (_, vb))| (key, va, vb))
        .collect())
}

fn flatten_keys(value: &Value, prefix: &str, out: &mut Vec<(String, Value)>) {
    if let Value::Object(map) = value {
        for (k, v) in map {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            if v.is_object() {
                flatten_keys(v, &key, out);
            } else {
                out.push((key, v.clone()));
            }
        }
    }
}
