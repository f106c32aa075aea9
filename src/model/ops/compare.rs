//! Comparing a fused op with its reference composition: outputs and input gradients, as the
//! worst relative difference. The GPU's self-check (`gpu_self_check`) and `bench --kernels`
//! use it.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};

/// A standard normal tensor of `dtype` on `device`, drawn on the CPU: the GPU's random
/// generator is the run's, not the check's.
pub fn random(shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)
}

/// The largest absolute difference between `a` and `b` over the largest magnitude of `b`.
pub fn relative(a: &Tensor, b: &Tensor) -> Result<f64> {
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
pub fn worst_difference(
    inputs: &[Tensor],
    fused: impl Fn(&[Tensor]) -> Result<Tensor>,
    reference: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<f64> {
    let mut weights = None;
    let mut run = |op: &dyn Fn(&[Tensor]) -> Result<Tensor>| -> Result<Vec<Tensor>> {
        let (vars, tensors) = tracked(inputs)?;
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

/// `inputs` as variables (for their gradients) and as the tensors an op takes.
pub fn tracked(inputs: &[Tensor]) -> Result<(Vec<Var>, Vec<Tensor>)> {
    let vars = inputs
        .iter()
        .map(Var::from_tensor)
        .collect::<Result<Vec<_>>>()?;
    let tensors = vars.iter().map(|v| v.as_tensor().clone()).collect();
    Ok((vars, tensors))
}
