//! The linear layer with bias, `torch.nn.Linear`: `x @ w^T + b`, as the bias-free linear
//! layer followed by a fused bias addition. candle's broadcast-add backward reduces over the
//! leading dimensions with a strided sum, the slowest part of a ViT step on the CPU.
//!
//! Layouts: `x` is `... x in`, `w` is `out x in`, `b` is `out`; the result is `... x out`.
//! The bias addition's backward passes `dy` through and sums its rows into `db`.

use super::kernel::{check_row, sum_over_chunks, CHUNK_ROWS};
use crate::cpu_kernels::{float_dispatch, fusable, owned, slice, Elem};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `torch.nn.Linear`: `x @ w^T + b` over the last dimension (`w` is `out x in`).
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    if fusable(x) {
        super::linear::linear(x, w)?.apply_op2(&b.contiguous()?, AddBias)
    } else {
        reference::linear(x, w, b)
    }
}

/// `x + b` with `b` broadcast over the rows of `x` (its last dimension). candle's
/// broadcast-add backward reduces over the leading dimensions with a strided sum, the
/// slowest part of a ViT step on the CPU; this one sums rows in order.
struct AddBias;

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "add-bias"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Elem>(x: &[T], b: &[T]) -> Vec<T> {
            let mut y = x.to_vec();
            y.par_chunks_mut(b.len() * CHUNK_ROWS).for_each(|rows| {
                for row in rows.chunks_mut(b.len()) {
                    row.iter_mut().zip(b).for_each(|(y, &b)| *y += b);
                }
            });
            y
        }
        check_row(self.name(), xl, bl)?;
        float_dispatch!(xs, self.name(), |T| Ok(owned(
            run::<T>(slice(xs, xl)?, slice(bs, bl)?),
            xl.shape()
        )))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let db = dy.apply_op1_no_bwd(&SumRows { n: b.elem_count() })?;
        Ok((Some(dy), Some(db)))
    }
}

/// Sum of the rows of `n` elements of a contiguous tensor, in a fixed order.
struct SumRows {
    n: usize,
}

impl CustomOp1 for SumRows {
    fn name(&self) -> &'static str {
        "sum-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Elem>(x: &[T], n: usize) -> Vec<T> {
            sum_over_chunks(x.len() / n, n, |rows, acc| {
                for row in rows {
                    let row = &x[row * n..][..n];
                    acc.iter_mut().zip(row).for_each(|(a, &v)| *a += v);
                }
            })
        }
        let shape = Shape::from(self.n);
        float_dispatch!(s, self.name(), |T| Ok(owned(
            run::<T>(slice(s, l)?, self.n),
            &shape
        )))
    }
}

/// The linear layer with bias as candle primitives.
pub mod reference {
    use candle_core::{Result, Tensor};

    /// `x @ w^T + b` over the last dimension (`w` is `out x in`).
    pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
        super::super::linear::reference::linear(x, w)?.broadcast_add(b)
    }
}
