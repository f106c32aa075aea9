//! The linear layer without bias, `x @ w^T`, as `torch.nn.Linear(bias=False)`.
//!
//! Layouts: `x` is `... x in` (any leading dimensions), `w` is `out x in`, the result is
//! `... x out`. The backward returns `dx` shaped as `x` and `dw` as `w`.

use super::kernel::x_times_w_t;
use crate::cpu_kernels::{float_dispatch, fusable, last_dim, owned, slice};
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// `x @ w^T` over the last dimension, as `torch.nn.Linear` without bias (`w` is `out x in`).
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if fusable(x) {
        x.contiguous()?.apply_op2(&w.contiguous()?, Linear)
    } else {
        reference::linear(x, w)
    }
}

/// `x @ w^T` over the last dimension of `x` (`w` is `out x in`, as in `torch.nn.Linear`).
///
/// As candle primitives a linear layer is a reshape, a transpose and a matmul, and the
/// backward pass zero-fills and sums a gradient for each of them (the transposed one with
/// strided, unvectorised indexing). Here the forward is one gemm reading `w` transposed
/// in place, and the backward two matmuls with contiguous results.
struct Linear;

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (out, inp) = match wl.dims() {
            [out, inp] => (*out, *inp),
            dims => bail!("linear: weight must be 2-d, got {dims:?}"),
        };
        if last_dim(xl) != inp {
            bail!(
                "linear: input rows have {} features, the weight expects {inp}",
                last_dim(xl)
            );
        }
        let rows = xl.shape().elem_count() / inp;
        let mut dims = xl.dims().to_vec();
        *dims.last_mut().expect("checked above") = out;
        let shape = Shape::from(dims);
        float_dispatch!(xs, self.name(), |T| Ok(owned(
            x_times_w_t::<T>(slice(xs, xl)?, slice(ws, wl)?, rows, inp, out),
            &shape
        )))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Detached inputs: the backward products need no graph of their own.
        let (x, w) = (x.detach(), w.detach());
        let (out, inp) = w.dims2()?;
        let rows = x.elem_count() / inp;
        let dy = dy.contiguous()?.reshape((rows, out))?;
        let dx = dy.matmul(&w)?.reshape(x.shape())?;
        let dw = dy.t()?.matmul(&x.reshape((rows, inp))?)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// The linear layer as candle primitives.
pub mod reference {
    use candle_core::{Result, Tensor};

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
}
