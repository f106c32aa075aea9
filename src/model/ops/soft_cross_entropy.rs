//! The soft-target cross-entropy of the ViT's classifier: `-sum_c t_c log softmax(z)_c`,
//! averaged over rows. One-hot labels, label smoothing and Mixup/CutMix all arrive as soft
//! targets.
//!
//! Layouts: `logits` and `targets` are both `rows x classes`; the loss is a scalar. There is
//! no fused kernel: the composition of candle primitives is cheap next to the model.

use candle_core::{Result, Tensor, D};

/// Mean over rows of the soft-target cross-entropy `-sum_c t_c log softmax(z)_c` of
/// `logits` (`N x C`) against `targets` (`N x C`, rows summing to 1: one-hot labels, label
/// smoothing and Mixup/CutMix all arrive this way).
pub fn soft_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (rows, classes) = logits.dims2()?;
    if targets.dims() != [rows, classes] {
        candle_core::bail!(
            "soft targets have shape {:?}, logits {:?}",
            targets.dims(),
            logits.dims()
        );
    }
    let targets = targets.to_dtype(logits.dtype())?;
    // Softmax is shift-invariant, so the detached row maximum costs the gradient nothing.
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_sum_exp = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let log_probs = shifted.broadcast_sub(&log_sum_exp)?;
    (log_probs * targets)?.sum_all()? * (-1.0 / rows as f64)
}
