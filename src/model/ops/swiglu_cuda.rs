//! SwiGLU on CUDA: the Triton kernels of `triton/swiglu.py` (layouts and grid stated there)
//! behind the packed op's `cuda_fwd` (`swiglu_forward`) and its gradient op's
//! (`swiglu_backward`), bf16 or f32. Before a GPU's first use for a type and width,
//! [`applies`] checks them against the reference composition.

use super::super::gpu_self_check as self_check;
use super::super::triton::{self, launch};
use super::{reference, Swiglu};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape, Tensor};

/// Whether SwiGLU on `x` (`... x hidden`) with `inter` hidden units runs our kernels.
pub(super) fn applies(x: &Tensor, inter: usize) -> bool {
    let Some(&hidden) = x.dims().last() else {
        return false;
    };
    self_check::applies(
        x,
        "swiglu",
        format!("hidden {hidden}, inter {inter}"),
        || {
            let draw = |shape: (usize, usize)| self_check::random(shape, x.dtype(), x.device());
            let inputs = [
                draw((70, hidden))?,
                draw((inter, hidden))?,
                draw((inter, hidden))?,
            ];
            self_check::worst_difference(
                &inputs,
                |v| {
                    let packed = reference_linear(&v[0], &Tensor::cat(&[&v[1], &v[2]], 0)?)?;
                    packed.apply_op1(Swiglu)
                },
                |v| reference::swiglu(&v[0], &v[1], &v[2]),
            )
        },
    )
}

/// The GPU's linear layer (the reference composition: candle's matmul).
fn reference_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    super::super::linear::reference::linear(x, w)
}

/// Rows and `inter` of a packed `... x 2 inter` layout.
fn sizes(l: &Layout) -> Result<(usize, usize)> {
    let width = *l.dims().last().unwrap_or(&0);
    if width == 0 || !width.is_multiple_of(2) {
        bail!("swiglu: packed width {width} is not even");
    }
    Ok((l.shape().elem_count() / width, width / 2))
}

/// The kernels' grid: one row and `SWIGLU_BLOCK` columns of `inter` per program.
fn grid(rows: usize, inter: usize) -> Result<(u32, u32, u32)> {
    Ok((
        triton::blocks(rows, 1)?,
        triton::blocks(inter, triton::SWIGLU_BLOCK)?,
        1,
    ))
}

/// `silu(gate) * up` of the packed `gu` (`... x 2 inter`): `... x inter`.
pub(super) fn forward(gu: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    fn run<T: CudaDType + DeviceRepr>(gu: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
        let device = gu.device().clone();
        let kernel = triton::load_for(gu, "swiglu_forward")?;
        let (rows, inter) = sizes(l)?;
        let input = triton::view::<T>(gu, l)?;
        // SAFETY: the grid covers every row and column of `y`.
        let y = unsafe { device.alloc::<T>(rows * inter)? };
        let (width, grid) = (triton::int(inter)?, grid(rows, inter)?);
        let null = 0u64;
        let stream = device.cuda_stream();
        launch!(stream, kernel, kernel.config(grid), triton::SWIGLU_FORWARD_PARAMS;
            gu = &input, y = &y, inter = &width, scratch0 = &null, scratch1 = &null)
        .w()?;
        Ok(CudaStorage::wrap_cuda_slice(y, device))
    }
    let y = match gu.dtype() {
        DType::BF16 => run::<half::bf16>(gu, l)?,
        DType::F32 => run::<f32>(gu, l)?,
        dtype => bail!("swiglu on CUDA: no kernel for {dtype:?}"),
    };
    let mut dims = l.dims().to_vec();
    *dims.last_mut().expect("sizes checked a last dim") /= 2;
    Ok((y, Shape::from(dims)))
}

/// The gradient of the packed `gu` from `dy` (`... x inter`): shaped as `gu`.
pub(super) fn backward(
    gu: &CudaStorage,
    l: &Layout,
    dy: &CudaStorage,
    dyl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    fn run<T: CudaDType + DeviceRepr>(
        gu: &CudaStorage,
        l: &Layout,
        dy: &CudaStorage,
        dyl: &Layout,
    ) -> Result<CudaStorage> {
        let device = gu.device().clone();
        let kernel = triton::load_for(gu, "swiglu_backward")?;
        let (rows, inter) = sizes(l)?;
        let (input, d_out) = (triton::view::<T>(gu, l)?, triton::view::<T>(dy, dyl)?);
        // SAFETY: the grid covers every row; each program writes its gate and up columns.
        let d_gu = unsafe { device.alloc::<T>(rows * 2 * inter)? };
        let (width, grid) = (triton::int(inter)?, grid(rows, inter)?);
        let null = 0u64;
        let stream = device.cuda_stream();
        launch!(stream, kernel, kernel.config(grid), triton::SWIGLU_BACKWARD_PARAMS;
            gu = &input, dy = &d_out, d_gu = &d_gu, inter = &width, scratch0 = &null,
            scratch1 = &null)
        .w()?;
        Ok(CudaStorage::wrap_cuda_slice(d_gu, device))
    }
    let d_gu = match gu.dtype() {
        DType::BF16 => run::<half::bf16>(gu, l, dy, dyl)?,
        DType::F32 => run::<f32>(gu, l, dy, dyl)?,
        dtype => bail!("swiglu on CUDA: no kernel for {dtype:?}"),
    };
    Ok((d_gu, l.shape().clone()))
}
