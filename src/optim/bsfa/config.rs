//! The `bsfa` config section: whether the BSFA wrapper runs, its k, l, T, alpha and gamma,
//! the parameter groups it covers and the precision of its stored state.

use crate::check::non_negative;
use crate::model::ParamGroup;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// The BSFA wrapper (`--bsfa`). Defaults: the paper's k = 50, l = 60, T = 10, alpha = 0.5; gamma
/// 1.5, the best of the reproduction study's sweep at its smallest model (docs/bsfa.md). The
/// paper presets set their own gamma.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BsfaConfig {
    /// Wrap the optimizer in BSFA.
    pub enabled: bool,
    /// Scale of the update inside the estimated dominant subspace.
    pub alpha: f64,
    /// Scale of the update in the bulk (the orthogonal complement).
    pub gamma: f64,
    /// Dominant directions per block (k).
    pub rank: usize,
    /// Updates kept per block for the PCA (l, more than `rank`).
    pub history: usize,
    /// Steps between re-estimations of the directions (T).
    pub interval: usize,
    /// Parameter groups BSFA applies to: any of `norm,attn,mlp` (embeddings and the output
    /// head never, as in the paper).
    pub blocks: BsfaGroups,
    /// Precision of the stored history and directions: 32 (the parameters' own) or 4.
    pub bits: usize,
    /// What one block is: a whole parameter tensor (the paper's "PyTorch default
    /// partition"), or a block of the model's Adam-mini partition (`model/partition.rs`).
    pub partition: BsfaPartition,
    /// When the first directions are estimated (and the projection starts).
    pub first_projection: FirstProjection,
}

impl Default for BsfaConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            alpha: 0.5,
            gamma: 1.5,
            rank: 50,
            history: 60,
            interval: 10,
            blocks: BsfaGroups(vec![BsfaGroup::Norm, BsfaGroup::Attn, BsfaGroup::Mlp]),
            bits: 32,
            partition: BsfaPartition::Tensor,
            first_projection: FirstProjection::Interval,
        }
    }
}

impl BsfaConfig {
    /// The parameter groups BSFA covers.
    pub fn groups(&self) -> Vec<ParamGroup> {
        self.blocks.0.iter().map(|&g| g.into()).collect()
    }

    /// The step (0-based, counting base steps) of the first re-estimation, from which every
    /// update is projected: `interval` (Algorithm 1), or under
    /// [`FirstProjection::RankUpdates`] the first multiple of `interval` at which the history
    /// holds `rank` updates (it holds `t` before step `t`'s update joins it).
    pub fn first_estimate_step(&self) -> u64 {
        let interval = self.interval.max(1) as u64;
        match self.first_projection {
            FirstProjection::Interval => interval,
            FirstProjection::RankUpdates => (self.rank as u64).max(1).div_ceil(interval) * interval,
        }
    }

    /// Whether the optimizer step `step` (counted from 0) re-estimates the directions: every
    /// `interval` steps from [`BsfaConfig::first_estimate_step`] on. `Bsfa` follows it, and
    /// `bench` uses it to tell the steps that re-estimated.
    pub fn reestimates_at(&self, step: u64) -> bool {
        step > 0 && step.is_multiple_of(self.interval as u64) && step >= self.first_estimate_step()
    }

    /// Checks the ranges; messages name the key.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 || self.rank >= self.history {
            bail!(
                "bsfa.rank ({}) must be at least 1 and below bsfa.history ({})",
                self.rank,
                self.history
            );
        }
        if self.interval == 0 {
            bail!("bsfa.interval must be a positive integer, got 0");
        }
        if self.bits != 32 && self.bits != 4 {
            bail!("bsfa.bits must be 32 or 4, got {}", self.bits);
        }
        if !non_negative(self.alpha) || !non_negative(self.gamma) {
            bail!(
                "bsfa.alpha ({}) and bsfa.gamma ({}) must be >= 0",
                self.alpha,
                self.gamma
            );
        }
        Ok(())
    }
}

/// What one BSFA block is (`bsfa.partition`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BsfaPartition {
    /// One block per parameter tensor, norm vectors included (the paper's "PyTorch default
    /// partition").
    #[serde(rename = "tensor")]
    Tensor,
    /// The blocks of the model's Adam-mini partition (`model/partition.rs`): for a LLaMA,
    /// q and k per head, v, o and the MLP per row (output neuron), each norm vector whole.
    #[serde(rename = "adam-mini")]
    AdamMini,
}

/// When BSFA first estimates directions and starts projecting (`bsfa.first_projection`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FirstProjection {
    /// At step `interval`, with the updates the history holds so far (Algorithm 1:
    /// `t mod T = 0, t > 0`).
    #[serde(rename = "interval")]
    Interval,
    /// At the first re-estimation at which the history holds `rank` updates.
    #[serde(rename = "rank_updates")]
    RankUpdates,
}

/// One group name of `bsfa.blocks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BsfaGroup {
    /// The RMSNorm / LayerNorm weights.
    #[serde(rename = "norm")]
    Norm,
    /// The attention projections.
    #[serde(rename = "attn")]
    Attn,
    /// The MLP projections.
    #[serde(rename = "mlp")]
    Mlp,
}

impl From<BsfaGroup> for ParamGroup {
    fn from(name: BsfaGroup) -> Self {
        match name {
            BsfaGroup::Norm => Self::Norms,
            BsfaGroup::Attn => Self::Attention,
            BsfaGroup::Mlp => Self::Mlp,
        }
    }
}

/// The parameter groups of `bsfa.blocks`, spelled in JSON as a comma-separated list of
/// `norm`, `attn` and `mlp`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BsfaGroups(pub Vec<BsfaGroup>);

impl TryFrom<String> for BsfaGroups {
    type Error = String;

    fn try_from(spec: String) -> Result<Self, String> {
        spec.split(',')
            .map(|part| {
                let part = part.trim();
                serde_json::from_value(part.into())
                    .map_err(|e| format!("unknown block group '{part}' ({e})"))
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }
}

impl From<BsfaGroups> for String {
    fn from(groups: BsfaGroups) -> Self {
        let names: Vec<String> = groups
            .0
            .iter()
            .filter_map(|g| serde_json::to_value(g).ok()?.as_str().map(str::to_owned))
            .collect();
        names.join(",")
    }
}
