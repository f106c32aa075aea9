//! Rotary position embeddings (RoPE) in the Hugging Face LLaMA rotate-half layout: each
//! `head_dim`-channel head `x = [x1 | x2]` at position `t` becomes
//! `x * cos_t + [-x2 | x1] * sin_t`.
//!
//! Layouts: the tables `cos` and `sin` are `seq x head_dim` (frequencies laid out twice,
//! `[f_0..f_{d/2}, f_0..f_{d/2}]`); activations are rows of `heads * head_dim`, row `r` at
//! position `r % seq`. The fused rotation has no op of its own: the causal attention kernel
//! applies it (and its inverse in the backward) to the queries and keys it reads.

use crate::cpu_kernels::Elem;
use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

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

/// Where a run of columns sits in a row-major buffer: row stride and first column.
#[derive(Clone, Copy)]
pub(super) struct Columns {
    pub(super) stride: usize,
    pub(super) offset: usize,
}

/// Rotary embedding of `width` columns of every row of `src`, written to `width` columns of
/// `dst`: each `dim`-channel head of a row is rotated by the table row of its position
/// (`row % seq`) and multiplied by `scale`. With `inverse`, the rotation by `-sin` (the
/// transpose, for the backward pass).
#[allow(clippy::too_many_arguments)]
pub(super) fn rotate<T: Elem>(
    (src, from): (&[T], Columns),
    (dst, to): (&mut [T], Columns),
    width: usize,
    seq: usize,
    (cos, sin): (&[T], &[T]),
    dim: usize,
    scale: T,
    inverse: bool,
) {
    let half = dim / 2;
    let sign = if inverse { -T::one() } else { T::one() };
    dst.par_chunks_mut(to.stride)
        .enumerate()
        .for_each(|(row, dst_row)| {
            let t = row % seq;
            let (c, s) = (&cos[t * dim..(t + 1) * dim], &sin[t * dim..(t + 1) * dim]);
            let x = &src[row * from.stride + from.offset..][..width];
            let y = &mut dst_row[to.offset..to.offset + width];
            for (y, x) in y.chunks_mut(dim).zip(x.chunks(dim)) {
                for i in 0..half {
                    y[i] = scale * (x[i] * c[i] - sign * x[i + half] * s[i]);
                    y[i + half] = scale * (x[i + half] * c[i + half] + sign * x[i] * s[i + half]);
                }
            }
        });
}

/// Rotary embeddings as candle primitives.
pub mod reference {
    use candle_core::{Result, Tensor, D};

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
}
