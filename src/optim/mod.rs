//! Optimizers, gradient clipping and the learning-rate schedule.

pub mod adam;
pub mod bsfa;
mod config;
mod fused;
pub mod schedule;

use crate::cpu::fusable;
use crate::dist::Communicator;
use crate::model::Param;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::sync::Arc;

pub use adam::Adam;
pub use bsfa::{BsfaConfig, BsfaGroup, BsfaGroups};
pub use config::{OptimizerConfig, OptimizerName};

/// What every optimizer (AdamW, Adam-mini, and the BSFA wrapper around either) offers the
/// loop.
pub trait Optimizer: Send {
    /// Updates `params` in place from `grads * grad_scale` (same order, same shapes) at
    /// learning rate `lr`. The scale carries gradient clipping (see [`clip_coefficient`]) into
    /// the update, sparing a pass over every gradient.
    fn step(&mut self, params: &[Param], grads: &[Tensor], lr: f64, grad_scale: f64) -> Result<()>;

    /// Optimizer steps taken so far.
    fn steps_taken(&self) -> u64;

    /// What BSFA's latest re-estimation found, once, right after the step that made it
    /// (`None` for optimizers without one, and between re-estimations).
    fn take_diagnostics(&mut self) -> Option<Vec<bsfa::GroupDiagnostics>> {
        None
    }

    /// The state every data-parallel rank holds alike, by a stable name (`<param
    /// name>.<slot>`), for checkpoints (rank 0 writes it).
    fn state(&self) -> Result<Vec<(String, Tensor)>>;

    /// The state only this rank holds (its shard of BSFA), for checkpoints: every rank
    /// writes its own. With one rank, [`Optimizer::state`] and this are the whole state.
    fn shard_state(&self) -> Result<Vec<(String, StateTensor)>> {
        Ok(Vec::new())
    }

    /// Whether [`Optimizer::load_state`] on this rank needs the tensor `key` of a checkpoint
    /// (a rank skips the other ranks' shards, whichever rank count wrote them).
    fn wants_state(&self, _key: &str) -> bool {
        true
    }

    /// Restores what [`Optimizer::state`] and [`Optimizer::shard_state`] returned (the
    /// tensors [`Optimizer::wants_state`] asked for), together with the step count.
    fn load_state(&mut self, steps_taken: u64, state: &HashMap<String, Tensor>) -> Result<()>;

    /// Bytes held by the optimizer state.
    fn state_bytes(&self) -> usize;
}

/// An optimizer state tensor on its way to a checkpoint: whole, or as equal rows that stay
/// apart in memory and are joined only as the file is written. BSFA's history is kept as
/// rows; stacking every block's at once before writing would double its memory.
pub enum StateTensor {
    Whole(Tensor),
    /// Rows of one type and width (`1 x n` each), written as one `rows x n` tensor.
    Rows {
        rows: Vec<Tensor>,
        shape: [usize; 2],
    },
}

impl StateTensor {
    /// `rows` (each `1 x n`) as one `rows x n` tensor.
    pub fn rows(rows: Vec<Tensor>) -> Result<Self> {
        let width = match rows.first() {
            Some(r) => r.elem_count(),
            None => bail!("a state tensor needs at least one row"),
        };
        if rows
            .iter()
            .any(|r| r.elem_count() != width || r.dtype() != rows[0].dtype())
        {
            bail!("state rows differ in width or type");
        }
        Ok(Self::Rows {
            shape: [rows.len(), width],
            rows,
        })
    }
}

/// Builds the base optimizer `optimizer` names, wrapped in BSFA when `bsfa.enabled` (its
/// state sharded over the ranks of `comm`). `blocks[i]` is the elements per Adam-mini block
/// of parameter `i`, the model's partition (unused by AdamW).
pub fn build(
    optimizer: &OptimizerConfig,
    bsfa: &BsfaConfig,
    params: &[Param],
    blocks: &[usize],
    comm: &Arc<dyn Communicator>,
) -> Result<Box<dyn Optimizer>> {
    let base: Box<dyn Optimizer> = match optimizer.name {
        OptimizerName::AdamW => Box::new(Adam::adamw(optimizer, params)?),
        OptimizerName::AdamMini => Box::new(Adam::adam_mini(optimizer, params, blocks)?),
    };
    if bsfa.enabled {
        Ok(Box::new(bsfa::Bsfa::new(
            base,
            bsfa,
            params,
            Arc::clone(comm),
        )?))
    } else {
        Ok(base)
    }
}

/// The global L2 norm of all gradients, as `torch.nn.utils.clip_grad_norm_` computes it.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sum = 0.0f64;
    for g in grads {
        let squares = if fusable(g) {
            g.contiguous()?.apply_op1_no_bwd(&fused::SumSquares)?
        } else {
            g.sqr()?.sum_all()?
        };
        sum += squares.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    }
    Ok(sum.sqrt())
}

/// The global gradient norm and the factor that clips it to `max_norm` (0 disables), with
/// PyTorch's rule: `coef = max_norm / (norm + 1e-6)`, applied only when `coef < 1`.
pub fn clip_coefficient(grads: &[Tensor], max_norm: f64) -> Result<(f64, f64)> {
    let norm = global_norm(grads)?;
    let coef = max_norm / (norm + 1e-6);
    Ok((
        norm,
        if max_norm > 0.0 && coef < 1.0 {
            coef
        } else {
            1.0
        },
    ))
}
