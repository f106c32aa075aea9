//! RMSNorm on CUDA: the Triton kernels of `triton/rms_norm.py` (layouts and grids stated
//! there) behind the op's `cuda_fwd` (`rms_norm_forward`) and its gradient ops'
//! (`rms_norm_dx`; `rms_norm_dw`, whose per-program parts are summed here in a fixed order),
//! bf16 or f32 rows with f32 weights (the weight's gradient is f32). Before a GPU's first use for a type and width, [`applies`] checks them against
//! the reference composition.

use super::super::compare;
use super::super::gpu_self_check as self_check;
use super::super::triton::{self, launch};
use super::{reference, RmsNorm};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape, Tensor};
use std::sync::{Arc, Mutex};

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

/// `dx = r * w * dy - x * r^3 * sum(w * dy * x) / n` per row, plus `residual`'s row when given
/// (`rms_norm_dx_add`): shaped as `x`.
pub(super) fn grad_input(
    (x, xl): (&CudaStorage, &Layout),
    (w, wl): (&CudaStorage, &Layout),
    (dy, dyl): (&CudaStorage, &Layout),
    residual: Option<&Tensor>,
    eps: f64,
) -> Result<(CudaStorage, Shape)> {
    fn run<T: CudaDType + DeviceRepr>(
        (x, xl): (&CudaStorage, &Layout),
        (w, wl): (&CudaStorage, &Layout),
        (dy, dyl): (&CudaStorage, &Layout),
        residual: Option<&Tensor>,
        eps: f32,
    ) -> Result<CudaStorage> {
        let device = x.device().clone();
        let (rows, n) = sizes(xl);
        let (xv, wv) = (triton::view::<T>(x, xl)?, triton::view::<f32>(w, wl)?);
        let dyv = triton::view::<T>(dy, dyl)?;
        // SAFETY: one program per row writes all of it.
        let dx = unsafe { device.alloc::<T>(rows * n)? };
        let width = triton::int(n)?;
        let null = 0u64;
        let stream = device.cuda_stream();
        let grid = (triton::blocks(rows, 1)?, 1, 1);
        let Some(residual) = residual else {
            let kernel = triton::load_for(x, "rms_norm_dx")?;
            launch!(stream, kernel, kernel.config(grid), triton::RMS_NORM_DX_PARAMS;
                x = &xv, w = &wv, dy = &dyv, dx = &dx, n = &width, eps = &eps,
                scratch0 = &null, scratch1 = &null)
            .w()?;
            return Ok(CudaStorage::wrap_cuda_slice(dx, device));
        };
        let kernel = triton::load_for(x, "rms_norm_dx_add")?;
        let (storage, layout) = residual.storage_and_layout();
        let candle_core::Storage::Cuda(storage) = &*storage else {
            bail!("rms-norm on CUDA: the residual gradient is not on the GPU");
        };
        let rv = triton::view::<T>(storage, layout)?;
        launch!(stream, kernel, kernel.config(grid), triton::RMS_NORM_DX_ADD_PARAMS;
            x = &xv, w = &wv, dy = &dyv, residual = &rv, dx = &dx, n = &width, eps = &eps,
            scratch0 = &null, scratch1 = &null)
        .w()?;
        Ok(CudaStorage::wrap_cuda_slice(dx, device))
    }
    let dx = dispatch!(x, |T| run::<T>(
        (x, xl),
        (w, wl),
        (dy, dyl),
        residual,
        eps as f32
    )?);
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

/// Whether [`add_rms_norm`] serves `x + delta` (bf16 or f32, shaped alike) with the f32
/// `weight`: RMSNorm's kernels do for that width, and the fused add's self-check passed (130
/// random rows: the sum, the norm and the gradients of `x`, `delta` and `weight` through
/// `(sum + normed) * r`, whose backward adds the sum's gradient in the norm's `dx` pass,
/// against the add and the reference composition).
pub(super) fn add_applies(x: &Tensor, delta: &Tensor, weight: &Tensor, eps: f64) -> bool {
    if x.shape() != delta.shape() || x.dtype() != delta.dtype() || !applies(x, weight, eps) {
        return false;
    }
    let n = weight.elem_count();
    self_check::applies(x, "residual-rms-norm", format!("width {n}"), || {
        let rows = || self_check::random(&[130, n][..], x.dtype(), x.device());
        let (a, b, r) = (rows()?, rows()?, rows()?);
        let w = self_check::random(&[n][..], DType::F32, x.device())?;
        let run = |fused: bool| -> Result<Vec<Tensor>> {
            let (vars, t) = compare::tracked(&[a.clone(), b.clone(), w.clone()])?;
            let (sum, normed) = if fused {
                add_rms_norm(&t[0], &t[1], &t[2], eps)?
            } else {
                let sum = (&t[0] + &t[1])?;
                let wide = reference::rms_norm(&sum.to_dtype(DType::F32)?, &t[2], eps)?;
                let normed = wide.to_dtype(sum.dtype())?;
                (sum, normed)
            };
            let grads = ((&sum + &normed)? * &r)?.sum_all()?.backward()?;
            let mut out = vec![sum, normed];
            for v in &vars {
                out.push(grads.get(v.as_tensor()).cloned().ok_or_else(|| {
                    candle_core::Error::Msg("residual-rms-norm: no gradient".into())
                })?);
            }
            Ok(out)
        };
        let (fused, reference) = (run(true)?, run(false)?);
        fused
            .iter()
            .zip(&reference)
            .try_fold(
                0f64,
                |worst, (f, r)| Ok(worst.max(compare::relative(f, r)?)),
            )
    })
}

/// `(x + delta, rms_norm(x + delta))` in one kernel (`add_rms_norm_forward`): the add's op
/// writes both and hands the normed rows to the norm's op, which only adopts them, so the
/// backward is the add's (the gradient to both operands) and RMSNorm's (with the residual
/// gradient added in its `dx` pass).
pub(super) fn add_rms_norm(
    x: &Tensor,
    delta: &Tensor,
    weight: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let normed: Handoff = Arc::default();
    let add = ResidualAdd {
        weight: weight.contiguous()?,
        eps,
        normed: Arc::clone(&normed),
    };
    let sum = x.contiguous()?.apply_op2(&delta.contiguous()?, add)?;
    let normed = sum.apply_op2(weight, NormOfSum { eps, normed })?;
    Ok((sum, normed))
}

/// The normed rows the fused add computed, until the norm's op takes them.
type Handoff = Arc<Mutex<Option<CudaStorage>>>;

/// `x + delta`, the kernel also writing the sum's RMSNorm into `normed`.
struct ResidualAdd {
    weight: Tensor,
    eps: f64,
    normed: Handoff,
}

impl candle_core::CustomOp2 for ResidualAdd {
    fn name(&self) -> &'static str {
        "residual-add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        gpu_only()
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        delta: &CudaStorage,
        dl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        fn run<T: CudaDType + DeviceRepr>(
            op: &ResidualAdd,
            (x, xl): (&CudaStorage, &Layout),
            (delta, dl): (&CudaStorage, &Layout),
        ) -> Result<(CudaStorage, CudaStorage)> {
            let device = x.device().clone();
            let kernel = triton::load_for(x, "add_rms_norm_forward")?;
            let (rows, n) = sizes(xl);
            let (xv, dv) = (triton::view::<T>(x, xl)?, triton::view::<T>(delta, dl)?);
            let (w, wl) = op.weight.storage_and_layout();
            let candle_core::Storage::Cuda(w) = &*w else {
                bail!("the fused residual add: the norm's weight is not on the GPU");
            };
            let wv = triton::view::<f32>(w, wl)?;
            // SAFETY: one program per row writes all of both.
            let (s, y) = unsafe { (device.alloc::<T>(rows * n)?, device.alloc::<T>(rows * n)?) };
            let (width, eps) = (triton::int(n)?, op.eps as f32);
            let null = 0u64;
            let stream = device.cuda_stream();
            launch!(stream, kernel, kernel.config((triton::blocks(rows, 1)?, 1, 1)),
                triton::ADD_RMS_NORM_FORWARD_PARAMS;
                x = &xv, delta = &dv, w = &wv, s = &s, y = &y, n = &width, eps = &eps,
                scratch0 = &null, scratch1 = &null)
            .w()?;
            Ok((
                CudaStorage::wrap_cuda_slice(s, device.clone()),
                CudaStorage::wrap_cuda_slice(y, device),
            ))
        }
        let (s, y) = dispatch!(x, |T| run::<T>(self, (x, xl), (delta, dl))?);
        *self.normed.lock().map_err(|_| poisoned())? = Some(y);
        Ok((s, xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _delta: &Tensor,
        _sum: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.clone()), Some(grad.clone())))
    }
}

/// RMSNorm of the sum [`ResidualAdd`] computed, adopting the rows its kernel wrote; its
/// backward is [`RmsNorm`]'s.
struct NormOfSum {
    eps: f64,
    normed: Handoff,
}

impl candle_core::CustomOp2 for NormOfSum {
    fn name(&self) -> &'static str {
        "rms-norm-of-sum"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        gpu_only()
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        sl: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let normed = self.normed.lock().map_err(|_| poisoned())?.take();
        match normed {
            Some(y) => Ok((y, sl.shape().clone())),
            None => bail!("rms-norm-of-sum: the fused residual add did not run first"),
        }
    }

    fn bwd(
        &self,
        s: &Tensor,
        w: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        candle_core::CustomOp2::bwd(&RmsNorm { eps: self.eps }, s, w, y, dy)
    }

    fn bwd_accumulating(
        &self,
        s: &Tensor,
        w: &Tensor,
        y: &Tensor,
        dy: &Tensor,
        existing: &Tensor,
    ) -> Result<Option<(Tensor, Option<Tensor>)>> {
        RmsNorm { eps: self.eps }.bwd_accumulating(s, w, y, dy, existing)
    }
}

/// The CPU side of the fused add's ops: `add_rms_norm` takes them on a GPU only.
fn gpu_only() -> Result<(candle_core::CpuStorage, Shape)> {
    bail!("the fused residual add runs on a GPU only")
}

/// The hand-off's lock was poisoned: a thread panicked holding it.
fn poisoned() -> candle_core::Error {
    candle_core::Error::Msg("a thread panicked in the fused residual add".into())
}
