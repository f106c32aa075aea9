//! Differentiable building blocks of the transformer.
//!
//! candle-nn's fused `softmax_last_dim`, `rms_norm` and `rope*` kernels have no backward
//! pass: gradients silently stop at them. Every op here is composed of candle primitives
//! that all have a backward, and each is checked against finite differences in the tests.

use candle_core::{DType, Device, Result, Tensor, D};

/// `x @ w^T` over the last dimension, as `torch.nn.Linear` without bias (`w` is `out x in`).
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let features = dims[dims.len() - 1];
    let rows = x.elem_count() / features;
    let out = x.reshape((rows, features))?.matmul(&w.t()?)?;
    let mut shape = dims.to_vec();
    *shape.last_mut().expect("linear input has at least one dim") = w.dim(0)?;
    out.reshape(shape)
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x^2) + eps) * weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv_rms = (mean_square + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv_rms)?.broadcast_mul(weight)
}

/// Softmax over the last dimension. The row maximum is subtracted for stability and
/// detached: softmax is shift-invariant, so its gradient through the max is exactly zero.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let exp = x.broadcast_sub(&max)?.exp()?;
    let sum = exp.sum_keepdim(D::Minus1)?;
    exp.broadcast_div(&sum)
}

/// Mean token cross-entropy of `logits` (`N x V`) against `targets` (`N`, u32).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_sum_exp = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let target_logit = shifted.gather(&targets.unsqueeze(1)?, 1)?;
    (log_sum_exp - target_logit)?.mean_all()
}

/// Rotary position tables (`cos`, `sin`, each `max_len x head_dim`) in the Hugging Face
/// LLaMA layout: the frequencies are laid out twice, `[f_0..f_{d/2}, f_0..f_{d/2}]`.
pub fn rope_tables(
    head_dim: usize,
    max_len: usize,
    theta: f64,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(max_len * head_dim);
    let mut sin = Vec::with_capacity(max_len * head_dim);
    for pos in 0..max_len {
        for i in 0..head_dim {
            let freq = 1.0 / theta.powf((2 * (i % half)) as f64 / head_dim as f64);
            let angle = pos as f64 * freq;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    let cos = Tensor::from_vec(cos, (max_len, head_dim), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (max_len, head_dim), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// Applies rotary embeddings to `x` (`batch x heads x seq x head_dim`), with `cos`/`sin`
/// already cut to `seq x head_dim`: `x * cos + rotate_half(x) * sin`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let head_dim = x.dim(D::Minus1)?;
    let half = head_dim / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// Additive causal mask (`seq x seq`): 0 on and below the diagonal, -inf above.
pub fn causal_mask(seq: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| (0..seq).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (seq, seq), device)?.to_dtype(dtype)
}
