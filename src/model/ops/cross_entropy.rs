//! The output head fused with the mean token cross-entropy: `mean_i (logsumexp(z_i) -
//! z_i[t_i])` for the logits `z = x @ w^T`.
//!
//! Layouts: `x` is `rows x hidden`, `w` is `vocab x hidden`, `targets` is `rows` (u32); the
//! loss is a scalar. The backward returns `dx` (`rows x hidden`) and `dw` (`vocab x
//! hidden`). The reference takes the logits (`rows x vocab`) themselves.

use super::kernel::{with_cpu_slice, x_times_w_t};
use super::softmax::softmax_in_place;
use crate::cpu_kernels::{float_dispatch, fusable, owned, slice, Elem};
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp2, DType, Error, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

/// Mean token cross-entropy of the output head `x @ w^T` (`x`: `N x hidden`, `w`:
/// `vocab x hidden`) against `targets` (`N`, u32). Fused on the CPU, the `N x vocab` logits
/// never become a graph node; on a GPU with our kernels they are never whole
/// (`cross_entropy_chunked`).
pub fn linear_cross_entropy(x: &Tensor, w: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if fusable(x) {
        let op = LinearCrossEntropy::new(targets.contiguous()?);
        x.contiguous()?.apply_op2(&w.contiguous()?, op)
    } else if gpu_kernels_apply(x, w) {
        let chunk = super::cross_entropy_chunked::chunk_rows(w.dim(0)?, x.dtype());
        super::cross_entropy_chunked::linear_cross_entropy(x, w, targets, chunk)
    } else {
        reference::linear_cross_entropy(x, w, targets)
    }
}

/// Whether `x` and `w` are on a GPU whose Triton cross-entropy kernels serve them
/// (`cross_entropy_chunked`'s `cuda` module).
#[cfg(feature = "cuda")]
fn gpu_kernels_apply(x: &Tensor, w: &Tensor) -> bool {
    super::cross_entropy_chunked::applies(x, w)
}

#[cfg(not(feature = "cuda"))]
fn gpu_kernels_apply(_: &Tensor, _: &Tensor) -> bool {
    false
}

fn check_targets(targets: &[u32], vocab: usize) -> Result<()> {
    match targets.iter().find(|&&t| t as usize >= vocab) {
        Some(t) => bail!("cross-entropy: target id {t} is outside the vocabulary of {vocab}"),
        None => Ok(()),
    }
}

/// Mean cross-entropy of `x @ w^T` (`x`: `rows x hidden`, `w`: `vocab x hidden`) against
/// `targets` (`rows`, u32).
///
/// The `rows x vocab` logits are the largest tensor of a language model. Here they never
/// become a graph node: the forward turns them into softmax probabilities in place and
/// keeps them in the op, and the backward turns those into `dlogits = (p - onehot) *
/// dloss / rows` in place and multiplies out `dx` and `dw`. That saves the separate
/// gradient tensor and candle's zero-fill and sum of it.
struct LinearCrossEntropy {
    targets: Tensor,
    /// Softmax probabilities from the forward pass, `rows x vocab`, for the backward.
    probs: std::sync::Mutex<Option<CpuStorage>>,
}

impl LinearCrossEntropy {
    /// An op for these `targets` (u32, one per row of `x`).
    fn new(targets: Tensor) -> Self {
        Self {
            targets,
            probs: std::sync::Mutex::new(None),
        }
    }
}

impl CustomOp2 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "linear-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Elem + 'static>(
            x: &[T],
            w: &[T],
            targets: &[u32],
            (vocab, hidden): (usize, usize),
        ) -> (T, Vec<T>) {
            let rows = targets.len();
            let mut probs = x_times_w_t(x, w, rows, hidden, vocab);
            let row_losses: Vec<T> = probs
                .par_chunks_mut(vocab)
                .zip(targets.par_iter())
                .map(|(row, &t)| {
                    let target_logit = row[t as usize];
                    let (max, sum) = softmax_in_place(row);
                    max + sum.ln() - target_logit
                })
                .collect();
            // Summed in row order, so the loss does not depend on thread scheduling.
            let total = row_losses.into_iter().fold(T::zero(), |a, b| a + b);
            let rows_t = T::from(rows).expect("row count fits the float type");
            (total / rows_t, probs)
        }
        let (vocab, hidden) = match wl.dims() {
            [v, h] => (*v, *h),
            dims => bail!("linear-cross-entropy: weight must be 2-d, got {dims:?}"),
        };
        with_cpu_slice(&self.targets, |targets: &[u32]| {
            if xl.dims() != [targets.len(), hidden] {
                bail!(
                    "linear-cross-entropy: x {:?} must be ({}, {hidden})",
                    xl.dims(),
                    targets.len()
                );
            }
            check_targets(targets, vocab)?;
            float_dispatch!(xs, self.name(), |T| {
                let (loss, probs) =
                    run::<T>(slice(xs, xl)?, slice(ws, wl)?, targets, (vocab, hidden));
                *self.probs.lock().expect("no panic while holding the lock") =
                    Some(T::to_cpu_storage_owned(probs));
                Ok(owned(vec![loss], &Shape::from(())))
            })
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _loss: &Tensor,
        dloss: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let probs = self
            .probs
            .lock()
            .expect("no panic while holding the lock")
            .take()
            .ok_or_else(|| Error::Msg("linear-cross-entropy: backward ran twice".into()))?;
        let rows = x.dim(0)?;
        let vocab = w.dim(0)?;
        let scale = dloss.to_dtype(DType::F64)?.to_scalar::<f64>()? / rows as f64;
        let targets = self.targets.to_vec1::<u32>()?;
        let device = candle_core::Device::Cpu;
        let dlogits = match probs {
            CpuStorage::F32(mut p) => {
                softmax_minus_one_hot(&mut p, &targets, vocab, scale);
                Tensor::from_vec(p, (rows, vocab), &device)?
            }
            CpuStorage::F64(mut p) => {
                softmax_minus_one_hot(&mut p, &targets, vocab, scale);
                Tensor::from_vec(p, (rows, vocab), &device)?
            }
            other => bail!("linear-cross-entropy: unexpected {:?} state", other.dtype()),
        };
        let dx = dlogits.matmul(&w.detach())?;
        let dw = dlogits.t()?.matmul(&x.detach())?;
        Ok((Some(dx), Some(dw)))
    }
}

/// `p <- scale * (p - onehot(target))` per row of probabilities `p`, in place.
fn softmax_minus_one_hot<T: Elem>(p: &mut [T], targets: &[u32], vocab: usize, scale: f64) {
    let scale = T::from(scale).expect("scale fits the float type");
    p.par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .for_each(|(row, &t)| {
            row.iter_mut().for_each(|p| *p *= scale);
            row[t as usize] -= scale;
        });
}

/// Cross-entropy as candle primitives.
pub mod reference {
    use candle_core::{Result, Tensor, D};

    /// [`super::linear_cross_entropy`] as candle primitives: the logits of the output head
    /// (half-precision ones widened: log-softmax over a large vocabulary needs f32), then
    /// [`cross_entropy`].
    pub fn linear_cross_entropy(x: &Tensor, w: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let logits = super::super::linear::reference::linear(x, w)?;
        cross_entropy(&super::super::widen(&logits)?, targets)
    }

    /// Mean token cross-entropy of `logits` (`N x V`) against `targets` (`N`, u32).
    pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let max = logits.max_keepdim(D::Minus1)?.detach();
        let shifted = logits.broadcast_sub(&max)?;
        let log_sum_exp = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
        let target_logit = shifted.gather(&targets.unsqueeze(1)?, 1)?;
        (log_sum_exp - target_logit)?.mean_all()
    }
}
