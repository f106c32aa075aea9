//! RMSNorm over the last dimension: `x / sqrt(mean(x^2) + eps) * w`, and the residual add
//! before it (`add_rms_norm`).
//!
//! Layouts: `x` is `... x n` (rows of `n`), `w` is `n`; the result is shaped as `x`. The
//! backward returns `dx` shaped as `x` and `dw` as `w`; where `x` has a gradient already
//! (the residual stream's), `dx` is added to it in the same pass (`bwd_accumulating`).

use super::kernel::{check_row, sum_over_chunks, with_cpu_slice};
use crate::cpu_kernels::{float_dispatch, fusable, last_dim, owned, slice, Elem};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// RMSNorm over the last dimension: `x / sqrt(mean(x^2) + eps) * weight`, computed in the
/// weight's type and returned in `x`'s (LLaMA normalises bf16 activations with f32 weights).
/// On a GPU with our kernels the bf16 rows are read and written as they are; elsewhere `x` is
/// cast to the weight's type and the result back.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if gpu_kernels_apply(x, weight, eps) {
        return x
            .contiguous()?
            .apply_op2(&weight.contiguous()?, RmsNorm { eps });
    }
    let wide = x.to_dtype(weight.dtype())?;
    let y = if fusable(&wide) {
        wide.contiguous()?
            .apply_op2(&weight.contiguous()?, RmsNorm { eps })?
    } else {
        reference::rms_norm(&wide, weight, eps)?
    };
    y.to_dtype(x.dtype())
}

/// The residual stream's next value `x + delta` and its RMSNorm (`sum`, `normed`): what a
/// LLaMA block does after each branch. On a GPU with our kernels one kernel writes both, and
/// the backward adds the stream's gradient into the norm's `dx` pass; elsewhere the add and
/// [`rms_norm`], the same arithmetic.
pub fn add_rms_norm(
    x: &Tensor,
    delta: &Tensor,
    weight: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if cuda::add_applies(x, delta, weight, eps) {
        return cuda::add_rms_norm(x, delta, weight, eps);
    }
    let sum = (x + delta)?;
    let normed = rms_norm(&sum, weight, eps)?;
    Ok((sum, normed))
}

/// Whether `x` is on a GPU whose Triton RMSNorm kernels serve it with `weight` (`cuda` module).
#[cfg(feature = "cuda")]
fn gpu_kernels_apply(x: &Tensor, weight: &Tensor, eps: f64) -> bool {
    cuda::applies(x, weight, eps)
}

#[cfg(not(feature = "cuda"))]
fn gpu_kernels_apply(_: &Tensor, _: &Tensor, _: f64) -> bool {
    false
}

#[cfg(feature = "cuda")]
#[path = "rms_norm_cuda.rs"]
mod cuda;

/// `x / sqrt(mean(x^2) + eps) * w` over the last dimension.
struct RmsNorm {
    eps: f64,
}

/// `1 / sqrt(mean(x^2) + eps)` of one row.
fn inv_rms<T: Elem>(x: &[T], eps: f64) -> T {
    let n = T::from(x.len()).expect("row length fits the float type");
    let ms = x.iter().fold(T::zero(), |a, &v| a + v * v) / n;
    T::one() / (ms + T::from(eps).expect("eps fits the float type")).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Elem>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
            let n = w.len();
            let mut y = vec![T::zero(); x.len()];
            y.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(y, x)| {
                let r = inv_rms(x, eps);
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                    *y = x * r * w;
                }
            });
            y
        }
        check_row(self.name(), xl, wl)?;
        float_dispatch!(xs, self.name(), |T| Ok(owned(
            run::<T>(slice(xs, xl)?, slice(ws, wl)?, self.eps),
            xl.shape()
        )))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward(xs, xl, ws, wl, self.eps)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        grads(x, w, dy, self.eps, None)
    }

    /// Where `x` feeds the residual stream too, its gradient from there (`existing`) is added
    /// in the `dx` pass: `existing + dx` as the store would add them, one pass fewer.
    fn bwd_accumulating(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
        existing: &Tensor,
    ) -> Result<Option<(Tensor, Option<Tensor>)>> {
        if existing.dtype() != x.dtype() || existing.shape() != x.shape() {
            return Ok(None);
        }
        let (dx, dw) = grads(x, w, dy, self.eps, Some(existing.contiguous()?))?;
        Ok(dx.map(|dx| (dx, dw)))
    }
}

/// RMSNorm's `dx` (plus `residual`, when given) and `dw` for the output gradient `dy`.
fn grads(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    eps: f64,
    residual: Option<Tensor>,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let dy = dy.contiguous()?;
    let dx = x.apply_op3_no_bwd(w, &dy, &RmsNormGradInput { eps, residual })?;
    let dw = x.apply_op2_no_bwd(&dy, &RmsNormGradWeight { eps })?;
    Ok((Some(dx), Some(dw)))
}

/// `dx = r * (w*dy) - x * r^3 * sum(w*dy*x) / n` per row, with `r = 1/rms(x)`; with a
/// `residual` (shaped as `x`), `residual + dx`.
struct RmsNormGradInput {
    eps: f64,
    residual: Option<Tensor>,
}

impl CustomOp3 for RmsNormGradInput {
    fn name(&self) -> &'static str {
        "rms-norm-grad-input"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        dys: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Elem>(x: &[T], w: &[T], dy: &[T], residual: Option<&[T]>, eps: f64) -> Vec<T> {
            let n = w.len();
            let nt = T::from(n).expect("row length fits the float type");
            let mut dx = residual.map_or_else(|| vec![T::zero(); x.len()], <[T]>::to_vec);
            let add = residual.is_some();
            dx.par_chunks_mut(n)
                .zip(x.par_chunks(n).zip(dy.par_chunks(n)))
                .for_each(|(dx, (x, dy))| {
                    let r = inv_rms(x, eps);
                    let dot = x
                        .iter()
                        .zip(dy)
                        .zip(w)
                        .fold(T::zero(), |a, ((&x, &d), &w)| a + w * d * x);
                    let c = r * r * r * dot / nt;
                    for (((dx, &x), &d), &w) in dx.iter_mut().zip(x).zip(dy).zip(w) {
                        // The stored gradient first, as the store's add takes it.
                        let grad = r * w * d - x * c;
                        *dx = if add { *dx + grad } else { grad };
                    }
                });
            dx
        }
        float_dispatch!(xs, self.name(), |T| {
            let (x, w, dy) = (slice(xs, xl)?, slice(ws, wl)?, slice(dys, dyl)?);
            let dx = match &self.residual {
                Some(residual) => with_cpu_slice::<T, _>(residual, |res| {
                    Ok(run::<T>(x, w, dy, Some(res), self.eps))
                })?,
                None => run::<T>(x, w, dy, None, self.eps),
            };
            Ok(owned(dx, xl.shape()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        dys: &candle_core::CudaStorage,
        dyl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::grad_input(
            (xs, xl),
            (ws, wl),
            (dys, dyl),
            self.residual.as_ref(),
            self.eps,
        )
    }
}

/// `dw = sum over rows of dy * x * r`.
struct RmsNormGradWeight {
    eps: f64,
}

impl CustomOp2 for RmsNormGradWeight {
    fn name(&self) -> &'static str {
        "rms-norm-grad-weight"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        dys: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Elem>(x: &[T], dy: &[T], n: usize, eps: f64) -> Vec<T> {
            sum_over_chunks(x.len() / n, n, |rows, acc| {
                for row in rows {
                    let (x, dy) = (&x[row * n..][..n], &dy[row * n..][..n]);
                    let r = inv_rms(x, eps);
                    for ((a, &x), &d) in acc.iter_mut().zip(x).zip(dy) {
                        *a += d * x * r;
                    }
                }
            })
        }
        let n = last_dim(xl);
        let shape = Shape::from(n);
        float_dispatch!(xs, self.name(), |T| Ok(owned(
            run::<T>(slice(xs, xl)?, slice(dys, dyl)?, n, self.eps),
            &shape
        )))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        dys: &candle_core::CudaStorage,
        dyl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::grad_weight((xs, xl), (dys, dyl), self.eps)
    }
}

/// RMSNorm as candle primitives.
pub mod reference {
    use candle_core::{Result, Tensor, D};

    /// RMSNorm over the last dimension: `x / sqrt(mean(x^2) + eps) * weight`.
    pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
        let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
        let inv_rms = (mean_square + eps)?.sqrt()?.recip()?;
        x.broadcast_mul(&inv_rms)?.broadcast_mul(weight)
    }
}
