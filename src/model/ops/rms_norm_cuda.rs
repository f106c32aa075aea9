//! RMSNorm on CUDA: the Triton kernels of `triton/rms_norm.py` (layouts and grids stated
//! there) behind the op's `cuda_fwd` (`rms_norm_forward`) and its gradient ops'
//! (`rms_norm_dx`; `rms_norm_dw`, whose per-program parts are summed here in a fixed order),
//! bf16 or f32 rows with f32 weights (the weight's gradient is f32). Before a GPU's first use for a type and width, [`applies`] checks them against
//! the reference composition.

use super::super::gpu_self_check as self_check;
use super::super::triton::{self, launch};
use super::{reference, RmsNorm};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape, Tensor};

/// Whether RMSNorm on `x` (`... x n`, bf16 or f32) with the f32 `weight` and `eps` runs our
/// kernels.
pub(super) fn applies(x: &Tensor, weight: &Tensor, eps: f64) -> bool {
    let Some(&n) = x.dims().last() else {
        return false;
    };
    if weight.dtype() != DType::F32 {
        return false;
    }
    self_check::applies(x, "rms-norm", format!("width {n}, f32 weight"), || {
        let rows = self_check::random(&[130, n][..], x.dtype(), x.device())?;
        let w = self_check::random(&[n][..], DType::F32, x.device())?;
        self_check::worst_difference(
            &[rows, w],
            |v| v[0].apply_op2(&v[1], RmsNorm { eps }),
            |v| {
                reference::rms_norm(&v[0].to_dtype(DType::F32)?, &v[1], eps)?.to_dtype(v[0].dtype())
            },
        )
    })
}

/// Rows and row width `n` of `l`.
fn sizes(l: &Layout) -> (usize, usize) {
    let n = *l.dims().last().unwrap_or(&1);
    (l.shape().elem_count() / n.max(1), n)
}

/// Runs `$body` with `$t` bound to the element type of `$storage` (bf16 or f32).
macro_rules! dispatch {
    ($storage:expr, |$t:ident| $body:expr) => {
        match $storage.dtype() {
            DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            DType::F32 => {
                type $t = f32;
                $body
            }
            dtype => bail!("rms-norm on CUDA: no kernel for {dtype:?}"),
        }
    };
}

/// `y = x * r * w` per row: shaped as `x`.
pub(super) fn forward(
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    eps: f64,
) -> Result<(CudaStorage, Shape)> {
    fn run<T: CudaDType + DeviceRepr>(
        (x, xl): (&CudaStorage, &Layout),
        (w, wl): (&CudaStorage, &Layout),
        eps: f32,
    ) -> Result<CudaStorage> {
        let device = x.device().clone();
        let kernel = triton::load_for(x, "rms_norm_forward")?;
        let (rows, n) = sizes(xl);
        let (xv, wv) = (triton::view::<T>(x, xl)?, triton::view::<f32>(w, wl)?);
        // SAFETY: one program per row writes all of it.
        let y = unsafe { device.alloc::<T>(rows * n)? };
        let width = triton::int(n)?;
        let null = 0u64;
        let stream = device.cuda_stream();
        launch!(stream, kernel, kernel.config((triton::blocks(rows, 1)?, 1, 1)),
            triton::RMS_NORM_FORWARD_PARAMS;
            x = &xv, w = &wv, y = &y, n = &width, eps = &eps, scratch0 = &null, scratch1 = &null)
        .w()?;
        Ok(CudaStorage::wrap_cuda_slice(y, device))
    }
    let y = dispatch!(x, |T| run::<T>((x, xl), (w, wl), eps as f32)?);
    Ok((y, xl.shape().clone()))
}

/// `dx = r * w * dy - x * r^3 * sum(w * dy * x) / n` per row: shaped as `x`.
pub(super) fn grad_input(
    (x, xl): (&CudaStorage, &Layout),
    (w, wl): (&CudaStorage, &Layout),
    (dy, dyl): (&CudaStorage, &Layout),
    eps: f64,
) -> Result<(CudaStorage, Shape)> {
    fn run<T: CudaDType + DeviceRepr>(
        (x, xl): (&CudaStorage, &Layout),
        (w, wl): (&CudaStorage, &Layout),
        (dy, dyl): (&CudaStorage, &Layout),
        eps: f32,
    ) -> Result<CudaStorage> {
        let device = x.device().clone();
        let kernel = triton::load_for(x, "rms_norm_dx")?;
        let (rows, n) = sizes(xl);
        let (xv, wv) = (triton::view::<T>(x, xl)?, triton::view::<f32>(w, wl)?);
        let dyv = triton::view::<T>(dy, dyl)?;
        // SAFETY: one program per row writes all of it.
        let dx = unsafe { device.alloc::<T>(rows * n)? };
        let width = triton::int(n)?;
        let null = 0u64;
        let stream = device.cuda_stream();
        launch!(stream, kernel, kernel.config((triton::blocks(rows, 1)?, 1, 1)),
            triton::RMS_NORM_DX_PARAMS;
            x = &xv, w = &wv, dy = &dyv, dx = &dx, n = &width, eps = &eps, scratch0 = &null,
            scratch1 = &null)
        .w()?;
        Ok(CudaStorage::wrap_cuda_slice(dx, device))
    }
    let dx = dispatch!(x, |T| run::<T>((x, xl), (w, wl), (dy, dyl), eps as f32)?);
    Ok((dx, xl.shape().clone()))
}

/// `dw = sum over rows of dy * x * r` (`n`, f32): the kernel's f32 parts per block of rows,
/// summed over the blocks in order.
pub(super) fn grad_weight(
    (x, xl): (&CudaStorage, &Layout),
    (dy, dyl): (&CudaStorage, &Layout),
    eps: f64,
) -> Result<(CudaStorage, Shape)> {
    fn run<T: CudaDType + DeviceRepr>(
        (x, xl): (&CudaStorage, &Layout),
        (dy, dyl): (&CudaStorage, &Layout),
        eps: f32,
    ) -> Result<CudaStorage> {
        let device = x.device().clone();
        let kernel = triton::load_for(x, "rms_norm_dw")?;
        let (rows, n) = sizes(xl);
        let (xv, dyv) = (triton::view::<T>(x, xl)?, triton::view::<T>(dy, dyl)?);
        let parts = triton::blocks(rows, triton::RMS_NORM_ROWS)?;
        // SAFETY: the grid covers every part and column.
        let dw_part = unsafe { device.alloc::<f32>(parts as usize * n)? };
        let (count, width) = (triton::int(rows)?, triton::int(n)?);
        let grid = (parts, triton::blocks(n, triton::RMS_NORM_BLOCK)?, 1);
        let null = 0u64;
        let stream = device.cuda_stream();
        launch!(stream, kernel, kernel.config(grid), triton::RMS_NORM_DW_PARAMS;
            x = &xv, dy = &dyv, dw_part = &dw_part, rows = &count, n = &width, eps = &eps,
            scratch0 = &null, scratch1 = &null)
        .w()?;
        // The parts summed by candle's reduction over the first dimension: f32, the weight's
        // type.
        let layout = Layout::contiguous((parts as usize, n));
        let parts = CudaStorage::wrap_cuda_slice(dw_part, device);
        parts.reduce_op(candle_core::op::ReduceOp::Sum, &layout, &[0])
    }
    let dw = dispatch!(x, |T| run::<T>((x, xl), (dy, dyl), eps as f32)?);
    Ok((dw, Shape::from(sizes(xl).1)))
}
