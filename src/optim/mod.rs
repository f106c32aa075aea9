//! Optimizers, gradient clipping and the learning-rate schedule.

pub mod adam;
pub mod bsfa;
mod config;
mod fused;
pub mod schedule;
mod stack;

use crate::cpu_kernels::fusable;
use crate::dist::Communicator;
use crate::model::Param;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::sync::Arc;

pub use adam::Adam;
pub use bsfa::{BsfaConfig, BsfaGroup, BsfaGroups};
pub use config::{OptimizerConfig, OptimizerName};
pub use stack::{BaseOptimizer, Stack};

/// The update: what the training loop asks of an optimizer every step. Its checkpoint
/// state is the separate [`OptimizerState`] (burn's `SimpleOptimizer` keeps its update
/// apart from its records the same way), so the loop depends on this trait and checkpoints
/// on that one; [`Stack`], which `build` returns, is both.
pub trait Optimizer: Send {
    /// Updates `params` in place from `grads * grad_scale` (same order, same shapes) at
    /// learning rate `lr`. The scale carries gradient clipping (see [`clip_coefficient`]) into
    /// the update, sparing a pass over every gradient.
    fn step(&mut self, params: &[Param], grads: &[Tensor], lr: f64, grad_scale: f64) -> Result<()>;

    /// Bytes held by the optimizer state.
    fn state_bytes(&self) -> usize;
}

/// What a checkpoint saves of an optimizer and restores into it (torchtitan's `Stateful`):
/// named tensors and the step count. The step count is here, not in [`Optimizer`], because
/// it is saved and restored with the tensors (Adam's bias correction and BSFA's
/// re-estimation interval depend on it). A wrapper's state is its own parts' states put
/// together by a container ([`Stack`]), not forwarded by the wrapper.
pub trait OptimizerState {
    /// Optimizer steps taken so far (those before a resume included).
    fn steps_taken(&self) -> u64;

    /// The state every data-parallel rank holds alike, by a stable name (`<param
    /// name>.<slot>`), for checkpoints (rank 0 writes it). None by default.
    fn shared(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(Vec::new())
    }

    /// The state only this rank holds (its shard of BSFA), for checkpoints: every rank
    /// writes its own. With one rank, [`OptimizerState::shared`] and this are the whole
    /// state. None by default.
    fn shard(&self) -> Result<Vec<(String, StateTensor)>> {
        Ok(Vec::new())
    }

    /// Whether [`OptimizerState::load`] on this rank needs the tensor `key` of a checkpoint
    /// (a rank skips the other ranks' shards, whichever rank count wrote them). A container
    /// reads a key when any of its parts wants it, so each part claims only its own keys;
    /// the default claims none, for optimizers without tensors.
    fn wants(&self, _key: &str) -> bool {
        false
    }

    /// Restores what [`OptimizerState::shared`] and [`OptimizerState::shard`] returned (the
    /// tensors [`OptimizerState::wants`] asked for, and perhaps others'), together with the
    /// step count.
    fn load(&mut self, steps_taken: u64, state: &HashMap<String, Tensor>) -> Result<()>;

    /// Where each state tensor this rank holds lives, by a descriptive name: the device it
    /// computes on (4-bit BSFA state: the device it is dequantized to). Checked after a
    /// resume by [`check_state_devices`]; the default (no tensors) suits optimizers
    /// without state.
    fn devices(&self) -> Vec<(String, Device)> {
        Vec::new()
    }
}

/// Fails, naming the tensor, when a state tensor of `optimizer` is not on `device` (the
/// parameters'). Checkpoints are read on the host, so every restored tensor must be moved to
/// the parameters' device; on a GPU a tensor left behind would fail in the first step, far
/// from its cause. Returns how many tensors were checked. (On a CPU-only machine every
/// tensor is on the CPU: there this guards the code path, not the placement.)
pub fn check_state_devices(optimizer: &dyn OptimizerState, device: &Device) -> Result<usize> {
    let devices = optimizer.devices();
    for (name, d) in &devices {
        if !d.same_device(device) {
            bail!(
                "optimizer state '{name}' is on {} but the parameters are on {}",
                crate::device::name(d),
                crate::device::name(device)
            );
        }
    }
    Ok(devices.len())
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

/// Builds the base optimizer `optimizer` names, with BSFA around its steps when
/// `bsfa.enabled` (its state sharded over the ranks of `comm`). `blocks[i]` is the elements
/// per Adam-mini block of parameter `i`, the model's partition (unused by AdamW unless
/// `bsfa.partition = adam-mini`, whose BSFA blocks they are).
pub fn build(
    optimizer: &OptimizerConfig,
    bsfa: &BsfaConfig,
    params: &[Param],
    blocks: &[usize],
    comm: &Arc<dyn Communicator>,
) -> Result<Stack> {
    let base: Box<dyn BaseOptimizer> = match optimizer.name {
        OptimizerName::AdamW => Box::new(Adam::adamw(optimizer, params)?),
        OptimizerName::AdamMini => Box::new(Adam::adam_mini(optimizer, params, blocks)?),
    };
    let comm = Arc::clone(comm);
    let bsfa = bsfa
        .enabled
        .then(|| match bsfa.partition {
            bsfa::BsfaPartition::Tensor => bsfa::Bsfa::new(bsfa, params, comm),
            bsfa::BsfaPartition::AdamMini => bsfa::Bsfa::partitioned(bsfa, params, blocks, comm),
        })
        .transpose()?;
    Ok(Stack::new(base, bsfa))
}

/// The global L2 norm of all gradients, as `torch.nn.utils.clip_grad_norm_` computes it.
///
/// One host read per step: the sum of squares stays a (0-dim, f64) tensor on the gradients'
/// device and only the total is read back (on a GPU a read is a sync, which per parameter
/// would stall the stream once per tensor). On a GPU (f32, once the kernel passed its
/// self-check) one multi-tensor launch sums every gradient's squares; elsewhere each
/// gradient's sum is added there in parameter order. On the CPU the fused kernel gives each
/// sum, and adding them in order from zero is what candle's f64 sum does, so the norm is the
/// one a running host sum gives.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    #[cfg(feature = "cuda")]
    if let Some(total) = fused::gpu_sum_of_squares(grads, tensor_sum_of_squares)? {
        return Ok(total.to_scalar::<f64>()?.sqrt());
    }
    norm_with(grads, sum_of_squares)
}

/// The square root of the sum over `grads` of `squares(g)` (0-dim f64 tensors), added on
/// the device and read once.
fn norm_with(grads: &[Tensor], squares: fn(&Tensor) -> Result<Tensor>) -> Result<f64> {
    if grads.is_empty() {
        return Ok(0.0);
    }
    let parts = grads.iter().map(squares).collect::<Result<Vec<_>>>()?;
    let total = Tensor::stack(&parts, 0)?.sum_all()?.to_scalar::<f64>()?;
    Ok(total.sqrt())
}

/// The sum of squares of `g` as a 0-dim f64 tensor on `g`'s device, without a host read:
/// the fused kernel on the CPU, candle ops elsewhere (a GPU's gradients where the
/// multi-tensor kernel does not serve them).
fn sum_of_squares(g: &Tensor) -> Result<Tensor> {
    if fusable(g) {
        Ok(g.contiguous()?.apply_op1_no_bwd(&fused::SumSquares)?)
    } else {
        tensor_sum_of_squares(g)
    }
}

/// [`sum_of_squares`] with candle ops, for any device: in f32 or f64 (a half-precision
/// gradient is widened first: a sum of thousands of squares in bf16 stalls far below its
/// value, as its 8-bit mantissa cannot add small terms to a large total).
fn tensor_sum_of_squares(g: &Tensor) -> Result<Tensor> {
    let g = match g.dtype() {
        DType::F32 | DType::F64 => g.clone(),
        _ => g.to_dtype(DType::F32)?,
    };
    Ok(g.sqr()?.sum_all()?.to_dtype(DType::F64)?)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn grads(dtype: DType) -> Vec<Tensor> {
        let device = Device::Cpu;
        [(3usize, 50usize), (1, 7), (40, 41)]
            .iter()
            .enumerate()
            .map(|(i, &(r, c))| {
                let values: Vec<f32> = (0..r * c)
                    .map(|j| ((j * 37 + i * 11) % 101) as f32 / 50.0 - 1.0)
                    .collect();
                Tensor::from_vec(values, (r, c), &device)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            })
            .collect()
    }

    /// On the CPU the one-read norm is bit for bit the per-parameter running sum it
    /// replaced, so CPU runs log the same gradient norms and clip alike.
    #[test]
    fn global_norm_is_the_running_host_sum_on_the_cpu() {
        let grads = grads(DType::F32);
        let mut running = 0.0f64;
        for g in &grads {
            running += sum_of_squares(g).unwrap().to_scalar::<f64>().unwrap();
        }
        assert_eq!(global_norm(&grads).unwrap(), running.sqrt());
        assert_eq!(global_norm(&[]).unwrap(), 0.0);
    }

    /// The tensor path (CUDA tensors, or any type the fused kernel does not take) gives the
    /// same norm, up to its f32 sums.
    #[test]
    fn tensor_path_norm_matches_the_fused_one() {
        let fused = global_norm(&grads(DType::F32)).unwrap();
        let exact: f64 = grads(DType::F64)
            .iter()
            .map(|g| {
                g.flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
                    .iter()
                    .map(|v| v * v)
                    .sum::<f64>()
            })
            .sum::<f64>()
            .sqrt();
        assert!((fused - exact).abs() <= 1e-12 * exact, "{fused} vs {exact}");
        // bf16 gradients are not fusable: they take the tensor path, summed in f32 (bf16
        // rounding of the values themselves is the difference; a bf16 sum was 30% low).
        let bf16 = global_norm(&grads(DType::BF16)).unwrap();
        assert!((bf16 - exact).abs() <= 1e-2 * exact, "{bf16} vs {exact}");
        // What a CUDA run computes, here on the CPU's f32 gradients.
        let tensor_path = norm_with(&grads(DType::F32), tensor_sum_of_squares).unwrap();
        assert!(
            (tensor_path - exact).abs() <= 1e-6 * exact,
            "{tensor_path} vs {exact}"
        );
        let (norm, coef) = clip_coefficient(&grads(DType::F32), 1.0).unwrap();
        assert_eq!(norm, fused);
        assert!((coef - 1.0 / (fused + 1e-6)).abs() < 1e-15);
    }
}
