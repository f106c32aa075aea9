//! The SwiGLU hidden layer of LLaMA's MLP: `silu(x @ w_gate^T) * (x @ w_up^T)`.
//!
//! Layouts: `x` is `... x hidden`, `w_gate` and `w_up` are `inter x hidden`, the result is
//! `... x inter`. Fused, both projections are one linear layer whose packed output, rows of
//! `[gate (inter) | up (inter)]`, feeds one elementwise kernel; its backward returns the
//! gradient of that packed output.

use super::linear::linear;
use crate::cpu_kernels::{float_dispatch, fusable, last_dim, owned, slice, Elem};
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The SwiGLU hidden layer `silu(x @ w_gate^T) * (x @ w_up^T)`. Fused, both projections
/// are one matmul whose packed output feeds one elementwise kernel.
pub fn swiglu(x: &Tensor, w_gate: &Tensor, w_up: &Tensor) -> Result<Tensor> {
    if fusable(x) || gpu_kernels_apply(x, w_gate) {
        let packed = linear(x, &Tensor::cat(&[w_gate, w_up], 0)?)?;
        packed.apply_op1(Swiglu)
    } else {
        reference::swiglu(x, w_gate, w_up)
    }
}

/// Whether `x` is on a GPU whose Triton SwiGLU kernels serve it (`cuda` module).
#[cfg(feature = "cuda")]
fn gpu_kernels_apply(x: &Tensor, w_gate: &Tensor) -> bool {
    w_gate.dim(0).is_ok_and(|inter| cuda::applies(x, inter))
}

#[cfg(not(feature = "cuda"))]
fn gpu_kernels_apply(_: &Tensor, _: &Tensor) -> bool {
    false
}

#[cfg(feature = "cuda")]
#[path = "swiglu_cuda.rs"]
mod cuda;

/// `silu(gate) * up` for `gu` of shape `... x (2 * inter)`, each row holding the gate
/// projection then the up projection (one linear layer computes both).
struct Swiglu;

fn sigmoid<T: Elem>(x: T) -> T {
    T::one() / (T::one() + (-x).exp())
}

impl CustomOp1 for Swiglu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Elem>(gu: &[T], inter: usize) -> Vec<T> {
            let mut y = vec![T::zero(); gu.len() / 2];
            y.par_chunks_mut(inter)
                .zip(gu.par_chunks(2 * inter))
                .for_each(|(y, gu)| {
                    let (g, u) = gu.split_at(inter);
                    for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                        *y = g * sigmoid(g) * u;
                    }
                });
            y
        }
        let width = last_dim(l);
        if !width.is_multiple_of(2) {
            bail!("swiglu: packed width {width} is odd");
        }
        let mut dims = l.dims().to_vec();
        *dims.last_mut().expect("has a last dim") = width / 2;
        let shape = Shape::from(dims);
        float_dispatch!(s, self.name(), |T| Ok(owned(
            run::<T>(slice(s, l)?, width / 2),
            &shape
        )))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward(s, l)
    }

    fn bwd(&self, gu: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            gu.detach()
                .apply_op2_no_bwd(&dy.contiguous()?, &SwigluGrad)?,
        ))
    }
}

/// Packed `[d/dgate | d/dup]` per row: `dy * up * s * (1 + g * (1 - s))` and `dy * g * s`,
/// with `s = sigmoid(g)`.
struct SwigluGrad;

impl CustomOp2 for SwigluGrad {
    fn name(&self) -> &'static str {
        "swiglu-grad"
    }

    fn cpu_fwd(
        &self,
        gus: &CpuStorage,
        gul: &Layout,
        dys: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Elem>(gu: &[T], dy: &[T], inter: usize) -> Vec<T> {
            let mut d = vec![T::zero(); gu.len()];
            d.par_chunks_mut(2 * inter)
                .zip(gu.par_chunks(2 * inter).zip(dy.par_chunks(inter)))
                .for_each(|(d, (gu, dy))| {
                    let (g, u) = gu.split_at(inter);
                    let (dg, du) = d.split_at_mut(inter);
                    for j in 0..inter {
                        let s = sigmoid(g[j]);
                        dg[j] = dy[j] * u[j] * s * (T::one() + g[j] * (T::one() - s));
                        du[j] = dy[j] * g[j] * s;
                    }
                });
            d
        }
        float_dispatch!(gus, self.name(), |T| Ok(owned(
            run::<T>(slice(gus, gul)?, slice(dys, dyl)?, last_dim(dyl)),
            gul.shape()
        )))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gus: &candle_core::CudaStorage,
        gul: &Layout,
        dys: &candle_core::CudaStorage,
        dyl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::backward(gus, gul, dys, dyl)
    }
}

/// SwiGLU as candle primitives.
pub mod reference {
    use super::super::linear::reference::linear;
    use candle_core::{Result, Tensor};

    /// `silu(x @ w_gate^T) * (x @ w_up^T)` as two linear layers, a `silu` and a product.
    pub fn swiglu(x: &Tensor, w_gate: &Tensor, w_up: &Tensor) -> Result<Tensor> {
        linear(x, w_gate)?.silu()? * linear(x, w_up)?
    }
}
