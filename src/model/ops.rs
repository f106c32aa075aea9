//! Differentiable building blocks of the transformer.
//!
//! candle-nn's fused `softmax_last_dim`, `rms_norm` and `rope*` kernels have no backward
//! pass: gradients silently stop at them. Each op here runs our fused CPU kernel (with a
//! hand-written backward, `fused`) for contiguous f32/f64 CPU tensors, and otherwise the
//! `reference` composition of candle primitives, which all have a backward. Both paths are
//! checked against finite differences and against each other in the tests.

use super::fused;
use candle_core::{DType, Device, Result, Tensor};

/// True where the fused CPU kernels apply.
fn fusable(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// `x @ w^T` over the last dimension, as `torch.nn.Linear` without bias (`w` is `out x in`).
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if fusable(x) {
        x.contiguous()?.apply_op2(&w.contiguous()?, fused::Linear)
    } else {
        reference::linear(x, w)
    }
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x^2) + eps) * weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if fusable(x) {
        x.contiguous()?
            .apply_op2(&weight.contiguous()?, fused::RmsNorm { eps })
    } else {
        reference::rms_norm(x, weight, eps)
    }
}

/// Mean token cross-entropy of the output head `x @ w^T` (`x`: `N x hidden`, `w`:
/// `vocab x hidden`) against `targets` (`N`, u32). Fused, the `N x vocab` logits never
/// become a graph node.
pub fn linear_cross_entropy(x: &Tensor, w: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if fusable(x) {
        let op = fused::LinearCrossEntropy::new(targets.contiguous()?);
        x.contiguous()?.apply_op2(&w.contiguous()?, op)
    } else {
        // Half-precision logits are widened: log-softmax over a large vocabulary needs f32.
        let logits = reference::linear(x, w)?;
        reference::cross_entropy(&widen(&logits)?, targets)
    }
}

/// The SwiGLU hidden layer `silu(x @ w_gate^T) * (x @ w_up^T)`. Fused, both projections
/// are one matmul whose packed output feeds one elementwise kernel.
pub fn swiglu(x: &Tensor, w_gate: &Tensor, w_up: &Tensor) -> Result<Tensor> {
    if fusable(x) {
        let packed = linear(x, &Tensor::cat(&[w_gate, w_up], 0)?)?;
        packed.apply_op1(fused::Swiglu)
    } else {
        reference::linear(x, w_gate)?.silu()? * reference::linear(x, w_up)?
    }
}

/// Causal self-attention of `x` (`batch x seq x hidden`) with query, key and value
/// projections `wq` (`heads*head_dim x hidden`), `wk`, `wv` (`kv_heads*head_dim x hidden`),
/// rotary embeddings from `cos`/`sin` (cut to `seq x head_dim`) and queries scaled by
/// `1/sqrt(head_dim)`. Returns `batch x seq x heads*head_dim`, ready for the output
/// projection. Fused, the three projections are one matmul and attention reads their packed
/// output in place.
pub fn attention(
    x: &Tensor,
    (wq, wk, wv): (&Tensor, &Tensor, &Tensor),
    (cos, sin): (&Tensor, &Tensor),
    heads: usize,
    kv_heads: usize,
) -> Result<Tensor> {
    if fusable(x) {
        let qkv = linear(x, &Tensor::cat(&[wq, wk, wv], 0)?)?;
        qkv.apply_op1(fused::Attention::new(cos, sin, heads, kv_heads)?)
    } else {
        let (q, k, v) = (
            reference::linear(x, wq)?,
            reference::linear(x, wk)?,
            reference::linear(x, wv)?,
        );
        reference::causal_attention(&q, &k, &v, (cos, sin), heads, kv_heads)
    }
}

/// The same ops composed of candle primitives: the path for devices without our fused
/// kernels, and the reference the fused kernels are tested against.
pub mod reference {
    use candle_core::{Result, Tensor, D};

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

    /// Rotary embeddings for `x` of shape `batch x seq x (heads * head_dim)` and tables of
    /// shape `seq x head_dim`: `x * cos + rotate_half(x) * sin` per head.
    pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (batch, seq, width) = x.dims3()?;
        let head_dim = cos.dim(D::Minus1)?;
        let half = head_dim / 2;
        let x = x.reshape((batch, seq, width / head_dim, head_dim))?;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        let (cos, sin) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?);
        let y = (x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?;
        y.reshape((batch, seq, width))
    }

    /// Causal attention as matmuls, a masked softmax and head transposes.
    pub fn causal_attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        heads: usize,
        kv_heads: usize,
    ) -> Result<Tensor> {
        let (batch, seq, width) = q.dims3()?;
        let head_dim = width / heads;
        let split_heads = |t: Tensor, n: usize| -> Result<Tensor> {
            t.reshape((batch, seq, n, head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = (rope(q, cos, sin)? * (1.0 / (head_dim as f64).sqrt()))?;
        let q = split_heads(q, heads)?;
        let k = repeat_kv(split_heads(rope(k, cos, sin)?, kv_heads)?, heads / kv_heads)?;
        let v = repeat_kv(split_heads(v.clone(), kv_heads)?, heads / kv_heads)?;
        let mask = super::causal_mask(seq, q.dtype(), q.device())?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(&mask)?;
        let probs = softmax_last_dim(&super::widen(&scores)?)?.to_dtype(v.dtype())?;
        probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((batch, seq, width))
    }

    /// Repeats each key/value head `n_rep` times so grouped heads line up with query heads.
    fn repeat_kv(x: Tensor, n_rep: usize) -> Result<Tensor> {
        if n_rep == 1 {
            return Ok(x);
        }
        let (b, kv_heads, seq, d) = x.dims4()?;
        x.unsqueeze(2)?
            .broadcast_as((b, kv_heads, n_rep, seq, d))?
            .reshape((b, kv_heads * n_rep, seq, d))
    }
}

/// `x` in f32 if it is a half-precision type, else unchanged.
fn widen(x: &Tensor) -> Result<Tensor> {
    match x.dtype() {
        DType::BF16 | DType::F16 => x.to_dtype(DType::F32),
        _ => Ok(x.clone()),
    }
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

/// Additive causal mask (`seq x seq`): 0 on and below the diagonal, -inf above.
pub fn causal_mask(seq: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| (0..seq).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (seq, seq), device)?.to_dtype(dtype)
}
