//! Helpers shared by our fused CPU kernels (`model::ops`, `optim::fused`), and the one
//! switch that decides, for the whole process, whether they run at all.

use candle_core::{CpuStorage, DType, Device, Error, Layout, Result, Shape, Tensor, WithDType};
use num_traits::{Float, NumAssign};
use std::sync::atomic::{AtomicBool, Ordering};

/// Element types the kernels are written for.
pub(crate) trait Elem: WithDType + Float + NumAssign + Send + Sync {}
impl Elem for f32 {}
impl Elem for f64 {}

/// `train.kernels = reference`: every [`fusable`] decision says no, so the CPU runs the
/// reference compositions and tensor-op updates a CUDA run executes. Process-wide because
/// the ops are plain functions of tensors that never see a run's config; set when a run
/// starts, by `Kernels::apply` (module `device`).
static REFERENCE_ONLY: AtomicBool = AtomicBool::new(false);

/// Turns the fused kernels off (`true`) or on again for every op and optimizer step of the
/// process.
pub(crate) fn set_reference_only(on: bool) {
    // Relaxed is enough: it is set before a run computes, and the compute threads start
    // (or receive their work) after that, which orders the store before their loads.
    REFERENCE_ONLY.store(on, Ordering::Relaxed);
}

/// Whether `train.kernels = reference` holds for this process (the GPU's fused kernels
/// honour it too).
pub(crate) fn reference_only() -> bool {
    REFERENCE_ONLY.load(Ordering::Relaxed)
}

/// True where the fused CPU kernels apply: f32 or f64 tensors on the CPU, unless
/// `train.kernels = reference` turned them off for the process.
pub(crate) fn fusable(t: &Tensor) -> bool {
    fusable_on(t.device(), t.dtype())
}

/// [`fusable`] for a tensor of type `dtype` on `device`, before it exists.
pub(crate) fn fusable_on(device: &Device, dtype: DType) -> bool {
    !reference_only() && device.is_cpu() && matches!(dtype, DType::F32 | DType::F64)
}

/// The contiguous slice of `storage` described by `layout`.
pub(crate) fn slice<'a, T: WithDType>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [T]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| Error::Msg("fused op input must be contiguous".into()))?;
    Ok(&storage.as_slice::<T>()?[start..end])
}

/// Runs `$body` with `$t` bound to the storage's float type.
macro_rules! float_dispatch {
    ($storage:expr, $name:expr, |$t:ident| $body:expr) => {
        match $storage {
            CpuStorage::F32(_) => {
                type $t = f32;
                $body
            }
            CpuStorage::F64(_) => {
                type $t = f64;
                $body
            }
            other => candle_core::bail!(
                "{} supports f32 and f64, got {:?}",
                $name,
                candle_core::backend::BackendStorage::dtype(other)
            ),
        }
    };
}

pub(crate) fn last_dim(layout: &Layout) -> usize {
    layout.dims().last().copied().unwrap_or(1)
}

pub(crate) fn owned<T: WithDType>(values: Vec<T>, shape: &Shape) -> (CpuStorage, Shape) {
    (T::to_cpu_storage_owned(values), shape.clone())
}

pub(crate) use float_dispatch;
