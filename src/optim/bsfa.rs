//! The Bulk-Space-Filtration-Accelerator (BSFA) wrapper with the block-wise PCA projector
//! estimator (BPPE), the paper's Algorithms 1-3.
//!
//! Per parameter block (one tensor; embeddings and the output head excluded, as in the
//! paper), the wrapper keeps the last `history` updates of the base optimizer. Every
//! `interval` steps it re-estimates the block's dominant subspace as the top `rank`
//! principal components of that history, through the small Gram matrix and a symmetric
//! eigendecomposition (never a `p x p` matrix). Each update `v` of the base optimizer is then
//! replaced by `gamma * v + (alpha - gamma) * U (U^T v)`: scaled by `alpha` inside the
//! dominant subspace and by `gamma` in the bulk.
//!
//! The history is centred before the PCA: PCA is the decomposition of variance, and
//! Proposition 1's signal is the oscillation of the dominant components (their sign flips
//! step to step) while bulk components drift steadily one way. Centring removes that drift,
//! so a large but steady bulk update cannot pass for a dominant direction.

use super::Optimizer;
use crate::config::BsfaConfig;
use crate::model::{Param, ParamGroup};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use std::collections::{HashMap, VecDeque};

/// Per-block BSFA state.
struct BlockState {
    /// The most recent base updates, flattened, oldest first.
    history: VecDeque<Tensor>,
    /// Estimated dominant directions as orthonormal rows (`rank x numel`), once estimated.
    directions: Option<Tensor>,
}

/// BSFA around any base optimizer.
pub struct Bsfa {
    base: Box<dyn Optimizer>,
    config: BsfaConfig,
    /// Per parameter, in parameter order: `None` where BSFA does not apply.
    blocks: Vec<Option<BlockState>>,
    names: Vec<String>,
    /// Elements per parameter, to check restored state against.
    numels: Vec<usize>,
    steps: u64,
}

impl Bsfa {
    /// Wraps `base`; BSFA applies to the parameter groups listed in `config.blocks`.
    pub fn new(base: Box<dyn Optimizer>, config: &BsfaConfig, params: &[Param]) -> Result<Self> {
        let groups = config.groups()?;
        let blocks = params
            .iter()
            .map(|p| {
                groups.contains(&p.group).then(|| BlockState {
                    history: VecDeque::with_capacity(config.history),
                    directions: None,
                })
            })
            .collect();
        Ok(Self {
            base,
            config: config.clone(),
            blocks,
            names: params.iter().map(|p| p.name.clone()).collect(),
            numels: params.iter().map(|p| p.var.elem_count()).collect(),
            steps: 0,
        })
    }
}

/// Top `rank` principal directions of `history` (`m x n`, one update per row), centred, as
/// orthonormal rows (`rank x n`). Through the `m x m` Gram matrix: with `H` centred and
/// `H H^T = W L W^T`, the directions are `L^-1/2 W^T H`. Directions whose variance is
/// negligible against the largest are dropped, so fewer than `rank` rows may come back.
pub fn top_directions(history: &Tensor, rank: usize) -> Result<Tensor> {
    let (m, _) = history.dims2()?;
    let dtype = history.dtype();
    let history64 = history.to_dtype(DType::F64)?;
    let centred = history64.broadcast_sub(&history64.mean_keepdim(0)?)?;
    let gram: Vec<f64> = centred.matmul(&centred.t()?)?.flatten_all()?.to_vec1()?;
    let eigen = nalgebra::DMatrix::from_row_slice(m, m, &gram).symmetric_eigen();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| eigen.eigenvalues[b].total_cmp(&eigen.eigenvalues[a]));
    let largest = eigen.eigenvalues[order[0]].max(0.0);
    let mut coefficients = Vec::with_capacity(rank * m);
    let mut kept = 0;
    for &i in order.iter().take(rank) {
        let lambda = eigen.eigenvalues[i];
        if lambda.is_nan() || lambda <= largest * 1e-12 {
            break;
        }
        let scale = 1.0 / lambda.sqrt();
        coefficients.extend((0..m).map(|j| eigen.eigenvectors[(j, i)] * scale));
        kept += 1;
    }
    if kept == 0 {
        bail!("bsfa: the update history has no variance to estimate directions from");
    }
    let coefficients = Tensor::from_vec(coefficients, (kept, m), history.device())?;
    Ok(coefficients.matmul(&centred)?.to_dtype(dtype)?)
}

/// `gamma * v + (alpha - gamma) * U^T (U v)` for a flat update `v` and orthonormal rows `U`.
pub fn project(v: &Tensor, directions: &Tensor, alpha: f64, gamma: f64) -> Result<Tensor> {
    Ok(((v * gamma)? + (dominant_part(v, directions)? * (alpha - gamma))?)?)
}

/// `U^T (U v)`: the part of `v` inside the span of the rows of `U`.
fn dominant_part(v: &Tensor, directions: &Tensor) -> Result<Tensor> {
    let coordinates = directions.matmul(&v.unsqueeze(1)?)?;
    Ok(directions.t()?.matmul(&coordinates)?.squeeze(1)?)
}

impl Optimizer for Bsfa {
    /// Algorithm 1: the base step, then the projection of its update in every BSFA block,
    /// re-estimating the projectors every `interval` steps from the updates so far.
    fn step(&mut self, params: &[Param], grads: &[Tensor], lr: f64, grad_scale: f64) -> Result<()> {
        let before: Vec<Option<Tensor>> = params
            .iter()
            .zip(&self.blocks)
            .map(|(p, b)| {
                b.as_ref()
                    .map(|_| p.var.as_tensor().flatten_all()?.copy())
                    .transpose()
            })
            .collect::<candle_core::Result<_>>()?;
        self.base.step(params, grads, lr, grad_scale)?;
        let refresh = self.steps > 0 && self.steps.is_multiple_of(self.config.interval as u64);
        let (alpha, gamma) = (self.config.alpha, self.config.gamma);
        for ((param, block), before) in params.iter().zip(&mut self.blocks).zip(before) {
            let (Some(block), Some(before)) = (block, before) else {
                continue;
            };
            if refresh && block.history.len() > self.config.rank {
                let history = Tensor::stack(block.history.make_contiguous(), 0)?;
                block.directions = Some(top_directions(&history, self.config.rank)?);
            }
            let after = param.var.as_tensor();
            let update = (after.flatten_all()? - &before)?;
            if let Some(directions) = &block.directions {
                // theta + (gamma - 1) v + (alpha - gamma) U^T U v: exactly the base step when
                // alpha = gamma = 1.
                let correction = ((&update * (gamma - 1.0))?
                    + (dominant_part(&update, directions)? * (alpha - gamma))?)?;
                param
                    .var
                    .set(&(after + correction.reshape(after.shape())?)?)?;
            }
            if block.history.len() == self.config.history {
                block.history.pop_front();
            }
            block.history.push_back(update);
        }
        self.steps += 1;
        Ok(())
    }

    fn steps_taken(&self) -> u64 {
        self.steps
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = self.base.state()?;
        for (name, block) in self.names.iter().zip(&self.blocks) {
            let Some(block) = block else { continue };
            if !block.history.is_empty() {
                let history: Vec<&Tensor> = block.history.iter().collect();
                out.push((format!("{name}.bsfa_history"), Tensor::stack(&history, 0)?));
            }
            if let Some(directions) = &block.directions {
                out.push((format!("{name}.bsfa_directions"), directions.clone()));
            }
        }
        Ok(out)
    }

    fn load_state(&mut self, steps_taken: u64, state: &HashMap<String, Tensor>) -> Result<()> {
        self.base.load_state(steps_taken, state)?;
        for ((name, block), numel) in self.names.iter().zip(&mut self.blocks).zip(&self.numels) {
            let Some(block) = block else { continue };
            // Rows of a state matrix: at most `max_rows`, each one flattened parameter.
            let checked = |slot: &str, max_rows: usize| -> Result<Option<Tensor>> {
                let key = format!("{name}.{slot}");
                let Some(t) = state.get(&key) else {
                    return Ok(None);
                };
                match t.dims() {
                    &[rows, cols] if rows <= max_rows && cols == *numel => Ok(Some(t.clone())),
                    dims => bail!(
                        "optimizer state '{key}' has shape {dims:?}, expected at most \
                         {max_rows} rows of {numel} (bsfa.{} changed?)",
                        if slot == "bsfa_history" {
                            "history"
                        } else {
                            "rank"
                        }
                    ),
                }
            };
            block.history.clear();
            if let Some(history) = checked("bsfa_history", self.config.history)? {
                for i in 0..history.dim(0)? {
                    block.history.push_back(history.get(i)?);
                }
            }
            block.directions = checked("bsfa_directions", self.config.rank)?;
        }
        self.steps = steps_taken;
        Ok(())
    }

    fn state_bytes(&self) -> usize {
        let own: usize = self
            .blocks
            .iter()
            .flatten()
            .flat_map(|b| b.history.iter().chain(&b.directions))
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum();
        self.base.state_bytes() + own
    }
}

/// Bytes BSFA holds once its history is full: `history + rank` vectors per covered block.
pub fn steady_state_bytes(config: &BsfaConfig, params: &[Param]) -> Result<usize> {
    let groups = config.groups()?;
    Ok(params
        .iter()
        .filter(|p| groups.contains(&p.group))
        .map(|p| {
            (config.history + config.rank) * p.var.elem_count() * p.var.dtype().size_in_bytes()
        })
        .sum())
}

/// Which parameter groups BSFA applies to, from `bsfa.blocks`.
pub fn parse_groups(spec: &str) -> Result<Vec<ParamGroup>> {
    spec.split(',')
        .map(|s| match s.trim() {
            "norm" => Ok(ParamGroup::Norms),
            "attn" => Ok(ParamGroup::Attention),
            "mlp" => Ok(ParamGroup::Mlp),
            other => bail!("bsfa.blocks: unknown block group '{other}'; use any of norm,attn,mlp"),
        })
        .collect::<Result<Vec<_>>>()
        .context("invalid bsfa.blocks")
}
