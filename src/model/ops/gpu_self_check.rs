//! The self-check of our GPU kernels: before a GPU's first use of a kernel family for a shape,
//! it runs against the reference composition on a small random input of that shape; beyond
//! the bound, or where a kernel cannot load, a warning names the kernels once and the run
//! takes the reference ops for that shape; under `train.kernels = fused` the run stops with
//! an error instead (`device::self_check_failure`).

pub(super) use super::compare::{random, worst_difference};
use candle_core::{DType, Device, Result, Tensor};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// The kernels, the GPU's ordinal and the shape.
type Key = (String, usize, String);

/// Each self-check's verdict.
static CHECKED: OnceLock<Mutex<HashMap<Key, bool>>> = OnceLock::new();

/// Whether the kernels `what` passed every self-check they ran in this process (None: none
/// ran): `bench --kernels` reports which path an op took.
pub(crate) fn verdict(what: &str) -> Option<bool> {
    let checked = CHECKED.get()?.lock().ok()?;
    let mut verdicts = checked
        .iter()
        .filter(|(key, _)| key.0 == what)
        .map(|(_, &ok)| ok);
    let first = verdicts.next()?;
    Some(verdicts.fold(first, |all, ok| all && ok))
}

/// Whether the kernels `what` serve `x`: a CUDA tensor of bf16 or f32, `train.kernels` not
/// `reference`, and the kernels' self-check `check` passed on its GPU for `shape` ([`passes`]).
pub(crate) fn applies(
    x: &Tensor,
    what: &str,
    shape: String,
    check: impl FnOnce() -> Result<f64>,
) -> bool {
    let Device::Cuda(device) = x.device() else {
        return false;
    };
    if crate::cpu_kernels::reference_only() || !matches!(x.dtype(), DType::BF16 | DType::F32) {
        return false;
    }
    let ordinal = device.cuda_stream().context().ordinal();
    let shape = format!("{:?}, {shape}", x.dtype());
    passes(what, ordinal, shape, bound(x.dtype()), check)
}

/// Whether the kernels `what` passed their self-check for `shape` (a description, with the
/// type) on GPU `ordinal`: `check` (the worst relative difference from the reference) runs
/// once per GPU and shape, and must stay within `bound`.
pub(super) fn passes(
    what: &str,
    ordinal: usize,
    shape: String,
    bound: f64,
    check: impl FnOnce() -> Result<f64>,
) -> bool {
    let Ok(mut checked) = CHECKED.get_or_init(Default::default).lock() else {
        return false;
    };
    let key = (what.to_string(), ordinal, shape);
    if let Some(&verdict) = checked.get(&key) {
        return verdict;
    }
    let verdict = match check() {
        Ok(worst) if worst <= bound => Ok(()),
        Ok(worst) => Err(format!(
            "worst difference from the reference {worst:.2e} > {bound:.0e}"
        )),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = &verdict {
        // Under `train.kernels = fused` an error the training loop reports, else a warning;
        // either way the verdict is kept, so the check runs once.
        let why = format!("GPU {ordinal}, {}: {e}", key.2);
        if !crate::device::strict_self_check_failed(what, &why) {
            eprintln!(
                "warning: the Triton {what} kernels failed their self-check on GPU {ordinal} \
                 ({}): {e}; {what} takes the reference ops (slower, the same math)",
                key.2
            );
        }
    }
    *checked.entry(key).or_insert(verdict.is_ok())
}

/// The bound of [`passes`] for kernels computing in `dtype`: f32 kernels agree with the
/// reference to rounding; bf16 ones round differently (each to the math no worse than it).
fn bound(dtype: DType) -> f64 {
    if dtype == DType::F32 {
        1e-4
    } else {
        3e-2
    }
}
