//! Softmax over the last dimension: the row kernels the fused attention and cross-entropy
//! kernels share, and the composition of candle primitives (candle-nn's fused
//! `softmax_last_dim` has no backward).
//!
//! The kernels work on one row (a slice) at a time; the reference takes any shape and
//! normalises its last dimension.

use crate::cpu_kernels::Elem;
use num_traits::Float;

/// Softmax of `row` in place; returns the row's maximum and the sum of `exp(v - max)`, from
/// which a cross-entropy follows as `max + ln(sum) - target`.
pub(super) fn softmax_in_place<T: Elem>(row: &mut [T]) -> (T, T) {
    let max = row.iter().fold(T::neg_infinity(), |m, &v| Float::max(m, v));
    let mut sum = T::zero();
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = T::one() / sum;
    row.iter_mut().for_each(|v| *v *= inv);
    (max, sum)
}

/// The softmax backward for one row, in place: `dp <- p * (dp - sum(p * dp))` turns the
/// gradient of the probabilities `p` into that of the scores.
pub(super) fn softmax_grad_in_place<T: Elem>(p: &[T], dp: &mut [T]) {
    let dot = p
        .iter()
        .zip(dp.iter())
        .fold(T::zero(), |a, (&p, &g)| a + p * g);
    for (&p, g) in p.iter().zip(dp.iter_mut()) {
        *g = p * (*g - dot);
    }
}

/// Softmax as candle primitives.
pub mod reference {
    use candle_core::{Result, Tensor, D};

    /// Softmax over the last dimension. The row maximum is subtracted for stability and
    /// detached: softmax is shift-invariant, so its gradient through the max is exactly zero.
    pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
        let max = x.max_keepdim(D::Minus1)?.detach();
        let exp = x.broadcast_sub(&max)?.exp()?;
        let sum = exp.sum_keepdim(D::Minus1)?;
        exp.broadcast_div(&sum)
    }
}
