//! Optimizers, gradient clipping and the learning-rate schedule.

pub mod adamw;
mod fused;
pub mod schedule;

use crate::model::Param;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use std::collections::HashMap;

pub use adamw::AdamW;

/// What every optimizer (AdamW, and the later AdamMini and BSFA wrapper) offers the loop.
pub trait Optimizer: Send {
    /// Updates `params` in place from `grads` (same order, same shapes) at learning rate `lr`.
    fn step(&mut self, params: &[Param], grads: &[Tensor], lr: f64) -> Result<()>;

    /// Optimizer steps taken so far.
    fn steps_taken(&self) -> u64;

    /// Every state tensor, by a stable name (`<param name>.<slot>`), for checkpoints.
    fn state(&self) -> Vec<(String, Tensor)>;

    /// Restores what [`Optimizer::state`] returned, together with the step count.
    fn load_state(&mut self, steps_taken: u64, state: &HashMap<String, Tensor>) -> Result<()>;

    /// Bytes held by the optimizer state.
    fn state_bytes(&self) -> usize {
        self.state()
            .iter()
            .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
}

/// Builds the optimizer named in the config.
pub fn build(
    config: &crate::config::OptimizerConfig,
    params: &[Param],
) -> Result<Box<dyn Optimizer>> {
    match config.name.as_str() {
        "adamw" => Ok(Box::new(AdamW::new(config, params)?)),
        other => bail!("unknown optimizer '{other}'; available: adamw"),
    }
}

/// True where the fused CPU optimizer kernels apply.
fn fusable(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
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

/// Scales `grads` so their global norm is at most `max_norm` (0 disables), with PyTorch's
/// rule `coef = max_norm / (norm + 1e-6)` applied only when `coef < 1`. Returns the norm
/// before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(norm)
}
