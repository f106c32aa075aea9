//! The `optimizer` config section: which base optimizer, its hyper-parameters and the
//! learning-rate schedule.

use crate::check::{non_negative, positive};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// The base optimizer (`optimizer.name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OptimizerName {
    /// Adam with decoupled weight decay: one second moment per element.
    #[serde(rename = "adamw")]
    AdamW,
    /// Adam-mini: one second moment per block of its partition.
    #[serde(rename = "adam-mini")]
    AdamMini,
}

impl OptimizerName {
    /// Every base optimizer, for comparisons (the dry run's memory table).
    pub const ALL: [Self; 2] = [Self::AdamW, Self::AdamMini];

    /// The name as `optimizer.name` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AdamW => "adamw",
            Self::AdamMini => "adam-mini",
        }
    }
}

impl std::fmt::Display for OptimizerName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Optimizer and learning-rate schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerConfig {
    /// Which optimizer: `adamw` or `adam-mini`.
    pub name: OptimizerName,
    /// Peak learning rate, reached at the end of warmup.
    pub lr: f64,
    /// Decoupled weight decay, applied to matrices only (never to norm weights).
    pub weight_decay: f64,
    /// Adam's first-moment decay.
    pub beta1: f64,
    /// Adam's second-moment decay.
    pub beta2: f64,
    /// Added to the root of the second moment.
    pub eps: f64,
    /// Global gradient-norm clip; 0 disables clipping.
    pub grad_clip: f64,
    /// Steps of linear warmup from ~0 to `lr`.
    pub warmup_steps: usize,
    /// Cosine decay floor as a fraction of `lr` (the paper decays to lr/20).
    pub min_lr_ratio: f64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            name: OptimizerName::AdamW,
            lr: 3e-3,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            warmup_steps: 20,
            min_lr_ratio: 0.05,
        }
    }
}

impl OptimizerConfig {
    /// Checks the ranges; messages name the key.
    pub fn validate(&self) -> Result<()> {
        if !positive(self.lr) {
            bail!("optimizer.lr must be a positive number, got {}", self.lr);
        }
        for (key, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                bail!("optimizer.{key} must be in [0, 1), got {v}");
            }
        }
        if !positive(self.eps) {
            bail!("optimizer.eps must be > 0, got {}", self.eps);
        }
        if !non_negative(self.weight_decay) || !non_negative(self.grad_clip) {
            bail!("optimizer.weight_decay and optimizer.grad_clip must be >= 0");
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            bail!(
                "optimizer.min_lr_ratio must be in [0, 1], got {}",
                self.min_lr_ratio
            );
        }
        Ok(())
    }
}
