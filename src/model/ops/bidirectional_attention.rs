//! The ViT's bidirectional multi-head self-attention: softmax attention over every
//! position (no mask), queries scaled by `1/sqrt(head_dim)`.
//!
//! Layouts: `x` is `batch x seq x hidden`, the query, key and value weights `hidden x
//! hidden` with `hidden` biases; the three projections run as one linear layer whose packed
//! output `qkv` is `batch x seq x 3 hidden` (rows of `[q | k | v]`, each `heads` heads of
//! `head_dim`). [`attention`] takes that packed output and returns `batch x seq x hidden`;
//! fused, its backward returns the gradient of `qkv`, recomputing the attention
//! probabilities instead of keeping them.

use super::bias::linear;
use super::kernel::gemm_into;
use super::softmax::{softmax_grad_in_place, softmax_in_place};
use crate::cpu_kernels::{float_dispatch, fusable, owned, slice, Elem};
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

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
        qkv.contiguous()?
            .apply_op1(BidirectionalAttention { heads })
    } else {
        reference::attention(qkv, heads)
    }
}

/// One head's `q` (pre-scaled), `k`, `v` as contiguous `seq x dim` copies out of a batch
/// element's packed `seq x 3 hidden` rows.
fn gather_head<T: Elem>(
    qkv: &[T],
    (seq, hidden, dim): (usize, usize, usize),
    head: usize,
    scale: T,
) -> [Vec<T>; 3] {
    std::array::from_fn(|part| {
        let mut out = Vec::with_capacity(seq * dim);
        for t in 0..seq {
            let start = t * 3 * hidden + part * hidden + head * dim;
            let row = &qkv[start..start + dim];
            if part == 0 {
                out.extend(row.iter().map(|&v| v * scale));
            } else {
                out.extend_from_slice(row);
            }
        }
        out
    })
}

/// Softmax attention over every position (no mask) of the packed projection `qkv`
/// (`batch x seq x 3 hidden`: queries, keys, values, each `heads` heads wide), with queries
/// scaled by `1/sqrt(head_dim)`; output `batch x seq x hidden`. The backward recomputes the
/// attention probabilities instead of keeping them.
struct BidirectionalAttention {
    heads: usize,
}

impl BidirectionalAttention {
    fn dims(&self, l: &Layout) -> Result<(usize, usize, usize, usize)> {
        let dims = l.dims();
        let (batch, seq, width) = match dims {
            [b, s, w] => (*b, *s, *w),
            _ => bail!("vit-attention: expected batch x seq x 3 hidden, got {dims:?}"),
        };
        if !width.is_multiple_of(3 * self.heads) {
            bail!(
                "vit-attention: width {width} is not 3 x heads ({}) x head_dim",
                self.heads
            );
        }
        Ok((batch, seq, width / 3, width / 3 / self.heads))
    }
}

impl CustomOp1 for BidirectionalAttention {
    fn name(&self) -> &'static str {
        "vit-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Elem + 'static>(
            qkv: &[T],
            (seq, hidden, dim): (usize, usize, usize),
            heads: usize,
        ) -> Vec<T> {
            let batch = qkv.len() / (seq * 3 * hidden);
            let scale = T::one() / T::from(dim).expect("dim fits").sqrt();
            let mut out = vec![T::zero(); batch * seq * hidden];
            out.par_chunks_mut(seq * hidden)
                .zip(qkv.par_chunks(seq * 3 * hidden))
                .for_each(|(out, qkv)| {
                    let mut p = vec![T::zero(); seq * seq];
                    let mut o = vec![T::zero(); seq * dim];
                    for h in 0..heads {
                        let [q, k, v] = gather_head(qkv, (seq, hidden, dim), h, scale);
                        gemm_into((seq, seq, dim), &mut p, false, (&q, dim, 1), (&k, 1, dim));
                        p.chunks_mut(seq).for_each(|row| {
                            softmax_in_place(row);
                        });
                        gemm_into((seq, dim, seq), &mut o, false, (&p, seq, 1), (&v, dim, 1));
                        for t in 0..seq {
                            out[t * hidden + h * dim..][..dim]
                                .copy_from_slice(&o[t * dim..][..dim]);
                        }
                    }
                });
            out
        }
        let (batch, seq, hidden, dim) = self.dims(l)?;
        let shape = Shape::from((batch, seq, hidden));
        float_dispatch!(s, self.name(), |T| Ok(owned(
            run::<T>(slice(s, l)?, (seq, hidden, dim), self.heads),
            &shape
        )))
    }

    fn bwd(&self, qkv: &Tensor, _out: &Tensor, d_out: &Tensor) -> Result<Option<Tensor>> {
        let grad = qkv.apply_op2_no_bwd(
            &d_out.contiguous()?,
            &BidirectionalAttentionGrad { heads: self.heads },
        )?;
        Ok(Some(grad))
    }
}

/// The gradient of [`BidirectionalAttention`] with respect to its packed input.
struct BidirectionalAttentionGrad {
    heads: usize,
}

impl CustomOp2 for BidirectionalAttentionGrad {
    fn name(&self) -> &'static str {
        "vit-attention-grad"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        /// Per head: `P = softmax(q k^T)`, `dV = P^T dO`, `dP = dO V^T`,
        /// `dS = P * (dP - rowsum(P * dP))`, `dq = scale dS K`, `dK = dS^T (scale q)`.
        fn run<T: Elem + 'static>(
            qkv: &[T],
            d_out: &[T],
            (seq, hidden, dim): (usize, usize, usize),
            heads: usize,
        ) -> Vec<T> {
            let scale = T::one() / T::from(dim).expect("dim fits").sqrt();
            let mut grad = vec![T::zero(); qkv.len()];
            grad.par_chunks_mut(seq * 3 * hidden)
                .zip(
                    qkv.par_chunks(seq * 3 * hidden)
                        .zip(d_out.par_chunks(seq * hidden)),
                )
                .for_each(|(grad, (qkv, d_out))| {
                    let mut p = vec![T::zero(); seq * seq];
                    let mut dp = vec![T::zero(); seq * seq];
                    let mut buf = vec![T::zero(); seq * dim];
                    for h in 0..heads {
                        let [q, k, v] = gather_head(qkv, (seq, hidden, dim), h, scale);
                        let mut d_o = Vec::with_capacity(seq * dim);
                        for t in 0..seq {
                            d_o.extend_from_slice(&d_out[t * hidden + h * dim..][..dim]);
                        }
                        gemm_into((seq, seq, dim), &mut p, false, (&q, dim, 1), (&k, 1, dim));
                        p.chunks_mut(seq).for_each(|row| {
                            softmax_in_place(row);
                        });
                        let mut scatter = |part: usize, values: &[T], factor: T| {
                            for t in 0..seq {
                                let dst =
                                    &mut grad[t * 3 * hidden + part * hidden + h * dim..][..dim];
                                for (d, &v) in dst.iter_mut().zip(&values[t * dim..][..dim]) {
                                    *d = v * factor;
                                }
                            }
                        };
                        // dV = P^T dO.
                        gemm_into(
                            (seq, dim, seq),
                            &mut buf,
                            false,
                            (&p, 1, seq),
                            (&d_o, dim, 1),
                        );
                        scatter(2, &buf, T::one());
                        // dP = dO V^T, then dS in place.
                        gemm_into(
                            (seq, seq, dim),
                            &mut dp,
                            false,
                            (&d_o, dim, 1),
                            (&v, 1, dim),
                        );
                        for (ds, p) in dp.chunks_mut(seq).zip(p.chunks(seq)) {
                            softmax_grad_in_place(p, ds);
                        }
                        // dq = scale dS K (q was scaled before the product).
                        gemm_into(
                            (seq, dim, seq),
                            &mut buf,
                            false,
                            (&dp, seq, 1),
                            (&k, dim, 1),
                        );
                        scatter(0, &buf, scale);
                        // dK = dS^T (scale q).
                        gemm_into(
                            (seq, dim, seq),
                            &mut buf,
                            false,
                            (&dp, 1, seq),
                            (&q, dim, 1),
                        );
                        scatter(1, &buf, T::one());
                    }
                });
            grad
        }
        let (_, seq, hidden, dim) = BidirectionalAttention { heads: self.heads }.dims(l)?;
        float_dispatch!(s, self.name(), |T| Ok(owned(
            run::<T>(slice(s, l)?, slice(ds, dl)?, (seq, hidden, dim), self.heads),
            l.shape()
        )))
    }
}

/// Bidirectional attention as candle primitives.
pub mod reference {
    use super::super::softmax::reference::softmax_last_dim;
    use candle_core::{Result, Tensor};

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
        let probs = softmax_last_dim(&q.matmul(&k.t()?)?)?;
        probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((batch, seq, hidden))
    }
}
