//! LayerNorm over the last dimension, as `torch.nn.LayerNorm`: `(x - mean) / sqrt(var +
//! eps) * w + b` with the biased variance (candle-nn's `layer_norm` has no backward).
//!
//! Layouts: `x` is `... x n` (rows of `n`), `w` and `b` are `n`; the result is shaped as
//! `x`. The backward returns `dx` shaped as `x` and `dw`, `db` as `w`, `b` (computed in one
//! pass, packed as the two rows of a `2 x n` tensor).

use super::kernel::{check_row, sum_over_chunks};
use crate::cpu_kernels::{float_dispatch, fusable, last_dim, owned, slice, Elem};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `torch.nn.LayerNorm` over the last dimension: `(x - mean) / sqrt(var + eps) * w + b`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if fusable(x) {
        x.contiguous()?.apply_op3(
            &weight.contiguous()?,
            &bias.contiguous()?,
            LayerNorm { eps },
        )
    } else {
        reference::layer_norm(x, weight, bias, eps)
    }
}

/// `(x - mean) / sqrt(var + eps) * w + b` over the last dimension (biased variance, as
/// `torch.nn.LayerNorm`).
struct LayerNorm {
    eps: f64,
}

/// Mean and `1 / sqrt(var + eps)` of one row.
fn moments<T: Elem>(x: &[T], eps: f64) -> (T, T) {
    let n = T::from(x.len()).expect("row length fits the float type");
    let mean = x.iter().fold(T::zero(), |a, &v| a + v) / n;
    let var = x
        .iter()
        .fold(T::zero(), |a, &v| a + (v - mean) * (v - mean))
        / n;
    let eps = T::from(eps).expect("eps fits the float type");
    (mean, T::one() / (var + eps).sqrt())
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Elem>(x: &[T], w: &[T], b: &[T], eps: f64) -> Vec<T> {
            let n = w.len();
            let mut y = vec![T::zero(); x.len()];
            y.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(y, x)| {
                let (mean, r) = moments(x, eps);
                for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
                    *y = (x - mean) * r * w + b;
                }
            });
            y
        }
        check_row(self.name(), xl, wl)?;
        check_row(self.name(), xl, bl)?;
        float_dispatch!(xs, self.name(), |T| Ok(owned(
            run::<T>(slice(xs, xl)?, slice(ws, wl)?, slice(bs, bl)?, self.eps),
            xl.shape()
        )))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &dy, &LayerNormGradInput { eps: self.eps })?;
        // One pass computes both parameter gradients, packed as two rows.
        let dwb = x.apply_op2_no_bwd(&dy, &LayerNormGradParams { eps: self.eps })?;
        Ok((Some(dx), Some(dwb.get(0)?), Some(dwb.get(1)?)))
    }
}

/// `dx = r * (g - mean(g) - xhat * mean(g * xhat))` per row, with `g = w * dy`.
struct LayerNormGradInput {
    eps: f64,
}

impl CustomOp3 for LayerNormGradInput {
    fn name(&self) -> &'static str {
        "layer-norm-grad-input"
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
        fn run<T: Elem>(x: &[T], w: &[T], dy: &[T], eps: f64) -> Vec<T> {
            let n = w.len();
            let nt = T::from(n).expect("row length fits the float type");
            let mut dx = vec![T::zero(); x.len()];
            dx.par_chunks_mut(n)
                .zip(x.par_chunks(n).zip(dy.par_chunks(n)))
                .for_each(|(dx, (x, dy))| {
                    let (mean, r) = moments(x, eps);
                    let (mut sum_g, mut sum_gx) = (T::zero(), T::zero());
                    for ((&x, &d), &w) in x.iter().zip(dy).zip(w) {
                        let g = w * d;
                        sum_g += g;
                        sum_gx += g * (x - mean) * r;
                    }
                    let (mean_g, mean_gx) = (sum_g / nt, sum_gx / nt);
                    for (((dx, &x), &d), &w) in dx.iter_mut().zip(x).zip(dy).zip(w) {
                        *dx = r * (w * d - mean_g - (x - mean) * r * mean_gx);
                    }
                });
            dx
        }
        float_dispatch!(xs, self.name(), |T| Ok(owned(
            run::<T>(slice(xs, xl)?, slice(ws, wl)?, slice(dys, dyl)?, self.eps),
            xl.shape()
        )))
    }
}

/// `[sum over rows of dy * xhat; sum over rows of dy]`, shape `2 x n`.
struct LayerNormGradParams {
    eps: f64,
}

impl CustomOp2 for LayerNormGradParams {
    fn name(&self) -> &'static str {
        "layer-norm-grad-params"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        dys: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Elem>(x: &[T], dy: &[T], n: usize, eps: f64) -> Vec<T> {
            sum_over_chunks(x.len() / n, 2 * n, |rows, acc| {
                let (dw, db) = acc.split_at_mut(n);
                for row in rows {
                    let (x, dy) = (&x[row * n..][..n], &dy[row * n..][..n]);
                    let (mean, r) = moments(x, eps);
                    for (((dw, db), &x), &d) in dw.iter_mut().zip(db.iter_mut()).zip(x).zip(dy) {
                        *dw += d * (x - mean) * r;
                        *db += d;
                    }
                }
            })
        }
        let n = last_dim(xl);
        let shape = Shape::from((2, n));
        float_dispatch!(xs, self.name(), |T| Ok(owned(
            run::<T>(slice(xs, xl)?, slice(dys, dyl)?, n, self.eps),
            &shape
        )))
    }
}

/// LayerNorm as candle primitives.
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
}
