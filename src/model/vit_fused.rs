//! Fused CPU kernels for the ViT's LayerNorm and erf GELU, with hand-written backward passes.
//!
//! candle-nn's `layer_norm` has no backward, and candle's own `gelu_erf` backward uses a
//! 6-digit constant for `1/sqrt(2 pi)`, too coarse for our finite-difference checks. These
//! kernels take contiguous f32/f64 CPU tensors; `vit_ops` dispatches here only then and
//! otherwise composes candle primitives, which all have exact backward passes.

use crate::cpu::{float_dispatch, last_dim, owned, slice, Elem};
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

// ---------------------------------------------------------------------------------------
// LayerNorm.

/// `(x - mean) / sqrt(var + eps) * w + b` over the last dimension (biased variance, as
/// `torch.nn.LayerNorm`).
pub struct LayerNorm {
    pub eps: f64,
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

fn check_row(name: &str, xl: &Layout, params: &Layout) -> Result<()> {
    if last_dim(xl) != params.shape().elem_count() {
        bail!(
            "{name}: weight has {} elements, rows have {}",
            params.shape().elem_count(),
            last_dim(xl)
        );
    }
    Ok(())
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
            // Fixed-size chunks summed in order: bitwise the same result for any thread
            // count (rayon's `reduce` tree is not).
            let chunk = 64 * n;
            let partials: Vec<Vec<T>> = x
                .par_chunks(chunk)
                .zip(dy.par_chunks(chunk))
                .map(|(x, dy)| {
                    let mut acc = vec![T::zero(); 2 * n];
                    let (dw, db) = acc.split_at_mut(n);
                    for (x, dy) in x.chunks(n).zip(dy.chunks(n)) {
                        let (mean, r) = moments(x, eps);
                        for (((dw, db), &x), &d) in dw.iter_mut().zip(db.iter_mut()).zip(x).zip(dy)
                        {
                            *dw += d * (x - mean) * r;
                            *db += d;
                        }
                    }
                    acc
                })
                .collect();
            let mut total = vec![T::zero(); 2 * n];
            for partial in partials {
                total.iter_mut().zip(partial).for_each(|(a, b)| *a += b);
            }
            total
        }
        let n = last_dim(xl);
        let shape = Shape::from((2, n));
        float_dispatch!(xs, self.name(), |T| Ok(owned(
            run::<T>(slice(xs, xl)?, slice(dys, dyl)?, n, self.eps),
            &shape
        )))
    }
}

// ---------------------------------------------------------------------------------------
// GELU (erf form, as `torch.nn.GELU()`).

/// `x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))`, elementwise.
pub struct Gelu;

fn erf<T: Elem>(x: T) -> T {
    let x = WithDType::to_f64(x);
    T::from(candle_core::cpu::erf::erf_f64(x)).expect("erf fits the float type")
}

fn gelu<T: Elem>(x: T) -> T {
    let half = T::from(0.5).expect("0.5 fits");
    let inv_sqrt2 = T::from(std::f64::consts::FRAC_1_SQRT_2).expect("constant fits");
    half * x * (T::one() + erf(x * inv_sqrt2))
}

/// `d gelu / dx = Phi(x) + x phi(x)`.
fn gelu_grad<T: Elem>(x: T) -> T {
    let half = T::from(0.5).expect("0.5 fits");
    let inv_sqrt2 = T::from(std::f64::consts::FRAC_1_SQRT_2).expect("constant fits");
    let inv_sqrt_2pi =
        T::from(0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2)
            .expect("constant fits");
    half * (T::one() + erf(x * inv_sqrt2)) + x * inv_sqrt_2pi * (-half * x * x).exp()
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Elem>(x: &[T]) -> Vec<T> {
            let mut y = vec![T::zero(); x.len()];
            y.par_chunks_mut(4096)
                .zip(x.par_chunks(4096))
                .for_each(|(y, x)| y.iter_mut().zip(x).for_each(|(y, &x)| *y = gelu(x)));
            y
        }
        float_dispatch!(s, self.name(), |T| Ok(owned(
            run::<T>(slice(s, l)?),
            l.shape()
        )))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&dy.contiguous()?, &GeluGrad)?))
    }
}

/// `dx = dy * gelu'(x)`.
struct GeluGrad;

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "gelu-erf-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        dys: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Elem>(x: &[T], dy: &[T]) -> Vec<T> {
            let mut dx = vec![T::zero(); x.len()];
            dx.par_chunks_mut(4096)
                .zip(x.par_chunks(4096).zip(dy.par_chunks(4096)))
                .for_each(|(dx, (x, dy))| {
                    for ((dx, &x), &d) in dx.iter_mut().zip(x).zip(dy) {
                        *dx = d * gelu_grad(x);
                    }
                });
            dx
        }
        float_dispatch!(xs, self.name(), |T| Ok(owned(
            run::<T>(slice(xs, xl)?, slice(dys, dyl)?),
            xl.shape()
        )))
    }
}
