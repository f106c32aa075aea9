//! Differentiable building blocks of the Vision Transformer.
//!
//! As in `ops`, each op runs a fused CPU kernel with a hand-written backward (`vit_fused`)
//! for contiguous f32/f64 CPU tensors and otherwise the `reference` composition of candle
//! primitives, which all have a backward (candle-nn's fused `layer_norm` and
//! `softmax_last_dim` do not: gradients would silently stop there).

use super::{ops, vit_fused};
use candle_core::{DType, Result, Tensor, D};

/// True where the fused CPU kernels apply.
fn fusable(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// `torch.nn.LayerNorm` over the last dimension: `(x - mean) / sqrt(var + eps) * w + b`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if fusable(x) {
        x.contiguous()?.apply_op3(
            &weight.contiguous()?,
            &bias.contiguous()?,
            vit_fused::LayerNorm { eps },
        )
    } else {
        reference::layer_norm(x, weight, bias, eps)
    }
}

/// `torch.nn.GELU()` (the exact erf form): `0.5 x (1 + erf(x / sqrt 2))`.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if fusable(x) {
        x.contiguous()?.apply_op1(vit_fused::Gelu)
    } else {
        reference::gelu(x)
    }
}

/// `torch.nn.Linear`: `x @ w^T + b` over the last dimension (`w` is `out x in`).
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let y = ops::linear(x, w)?;
    if fusable(&y) {
        y.apply_op2(&b.contiguous()?, vit_fused::AddBias)
    } else {
        y.broadcast_add(b)
    }
}

/// Bidirectional multi-head self-attention of `x` (`batch x seq x hidden`) with query, key
/// and value projections (`hidden x hidden` weights and their biases), queries scaled by
/// `1/sqrt(head_dim)`. Returns `batch x seq x hidden`, ready for the output projection. The
/// three projections run as one matmul; fused, attention reads its packed output in place
/// and recomputes the probabilities in the backward pass instead of keeping them.
pub fn self_attention(
    x: &Tensor,
    (wq, bq): (&Tensor, &Tensor),
    (wk, bk): (&Tensor, &Tensor),
    (wv, bv): (&Tensor, &Tensor),
    heads: usize,
) -> Result<Tensor> {
    let w = Tensor::cat(&[wq, wk, wv], 0)?;
    let b = Tensor::cat(&[bq, bk, bv], 0)?;
    attention(&linear(x, &w, &b)?, heads)
}

/// Bidirectional attention on the packed projection `qkv` (`batch x seq x 3 hidden`:
/// queries, keys, values, each `heads` heads wide), queries scaled by `1/sqrt(head_dim)`;
/// returns `batch x seq x hidden`.
pub fn attention(qkv: &Tensor, heads: usize) -> Result<Tensor> {
    if fusable(qkv) {
        qkv.contiguous()?.apply_op1(vit_fused::Attention { heads })
    } else {
        reference::attention(qkv, heads)
    }
}

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

/// The same ops composed of candle primitives: the path for devices without our fused
/// kernels, and the reference the fused kernels are tested against.
pub mod reference {
    use candle_core::{Result, Tensor, D};

    /// LayerNorm over the last dimension with the biased variance.
    pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
        let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let inv_std = (var + eps)?.sqrt()?.recip()?;
        centred
            .broadcast_mul(&inv_std)?
            .broadcast_mul(weight)?
            .broadcast_add(bias)
    }

    /// Bidirectional attention on the packed projection `qkv` (`batch x seq x 3 hidden`:
    /// queries, keys, values), as matmuls, a softmax and head transposes.
    pub fn attention(qkv: &Tensor, heads: usize) -> Result<Tensor> {
        let (batch, seq, width) = qkv.dims3()?;
        let hidden = width / 3;
        let head_dim = hidden / heads;
        // -> three `batch x heads x seq x head_dim` tensors; contiguous because candle's
        // batched matmul rejects some transposed operands.
        let qkv = qkv
            .reshape((batch, seq, 3, heads, head_dim))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()?;
        let q = (qkv.get(0)? * (1.0 / (head_dim as f64).sqrt()))?;
        let (k, v) = (qkv.get(1)?, qkv.get(2)?);
        let probs = crate::model::ops::reference::softmax_last_dim(&q.matmul(&k.t()?)?)?;
        probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((batch, seq, hidden))
    }

    /// GELU from candle's `erf`, whose backward is exact (`gelu_erf`'s uses a rounded
    /// constant).
    pub fn gelu(x: &Tensor) -> Result<Tensor> {
        let phi = ((x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)?;
        (x * phi)? * 0.5
    }
}
