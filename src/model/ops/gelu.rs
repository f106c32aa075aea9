//! GELU in the exact erf form, as `torch.nn.GELU()`: `0.5 x (1 + erf(x / sqrt 2))`,
//! elementwise. candle's own `gelu_erf` backward uses a 6-digit constant for `1/sqrt(2 pi)`,
//! too coarse for our finite-difference checks.
//!
//! Layouts: any shape in, the same shape out.

use crate::cpu_kernels::{float_dispatch, fusable, owned, slice, Elem};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// `torch.nn.GELU()` (the exact erf form): `0.5 x (1 + erf(x / sqrt 2))`.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if fusable(x) {
        x.contiguous()?.apply_op1(Gelu)
    } else {
        reference::gelu(x)
    }
}

/// `x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))`, elementwise.
struct Gelu;

fn erf<T: Elem>(x: T) -> T {
    use candle_core::cpu::erf::{erf_f32, erf_f64};
    // f32 goes through libm's erff: twice as fast, and exact to f32's precision.
    let x = WithDType::to_f64(x);
    let y = if T::DTYPE == candle_core::DType::F32 {
        erf_f32(x as f32) as f64
    } else {
        erf_f64(x)
    };
    T::from(y).expect("erf fits the float type")
}

/// GELU of one value.
fn gelu_scalar<T: Elem>(x: T) -> T {
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
                .for_each(|(y, x)| y.iter_mut().zip(x).for_each(|(y, &x)| *y = gelu_scalar(x)));
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

/// GELU as candle primitives.
pub mod reference {
    use candle_core::{Result, Tensor};

    /// GELU from candle's `erf`, whose backward is exact (`gelu_erf`'s uses a rounded
    /// constant).
    pub fn gelu(x: &Tensor) -> Result<Tensor> {
        let phi = ((x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)?;
        (x * phi)? * 0.5
    }
}
