//! The self-check of our GPU kernels: before a GPU's first use of a kernel family for a shape,
//! it runs against the reference composition on a small random input of that shape; beyond
//! the bound, or where a kernel cannot load, a warning names the kernels once and the run
//! takes the reference ops for that shape.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

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
    /// The kernels, the GPU's ordinal and the shape.
    type Key = (String, usize, String);
    static CHECKED: OnceLock<Mutex<HashMap<Key, bool>>> = OnceLock::new();
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
        eprintln!(
            "warning: the Triton {what} kernels failed their self-check on GPU {ordinal} ({}): \
             {e}; {what} takes the reference ops (slower, the same math)",
            key.2
        );
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

/// A standard normal tensor of `dtype` on `device`, drawn on the CPU: the GPU's random
/// generator is the run's, not the check's.
pub(crate) fn random(shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)
}

/// The largest absolute difference between `a` and `b` over the largest magnitude of `b`.
pub(crate) fn relative(a: &Tensor, b: &Tensor) -> Result<f64> {
    let b = b.to_dtype(DType::F64)?;
    let diff = (a.to_dtype(DType::F64)? - &b)?
        .abs()?
        .max_all()?
        .to_scalar::<f64>()?;
    let scale = b.abs()?.max_all()?.to_scalar::<f64>()?;
    Ok(diff / scale.max(f64::MIN_POSITIVE))
}

/// The worst [`relative`] difference between the `fused` op and its `reference` composition
/// applied to `inputs`: their outputs, and the gradients of every input through the sum of
/// the output weighted by random weights (drawn once, the same for both).
pub(super) fn worst_difference(
    inputs: &[Tensor],
    fused: impl Fn(&[Tensor]) -> Result<Tensor>,
    reference: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<f64> {
    let mut weights = None;
    let mut run = |op: &dyn Fn(&[Tensor]) -> Result<Tensor>| -> Result<Vec<Tensor>> {
        let vars = inputs
            .iter()
            .map(Var::from_tensor)
            .collect::<Result<Vec<_>>>()?;
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = op(&tensors)?;
        let weights = match &weights {
            Some(w) => w,
            None => weights.insert(random(out.shape(), out.dtype(), out.device())?),
        };
        let grads = (&out * weights)?.sum_all()?.backward()?;
        let mut results = vec![out];
        for v in &vars {
            let grad = grads.get(v.as_tensor()).cloned();
            results.push(grad.ok_or_else(|| candle_core::Error::Msg("no gradient".into()))?);
        }
        Ok(results)
    };
    let (fused, reference) = (run(&fused)?, run(&reference)?);
    fused
        .iter()
        .zip(&reference)
        .try_fold(0f64, |worst, (a, b)| Ok(worst.max(relative(a, b)?)))
}
