//! The chunked output head's row passes on CUDA: the Triton kernels of
//! `triton/cross_entropy.py` (`row_logsumexp`, `softmax_gradient`; layouts and grid stated
//! there), bf16 or f32 logits. Before a GPU's first use for a type, [`applies`] runs the whole
//! chunked head against the reference composition (loss, `dx`, `dw`) on a small input; on
//! disagreement, or where a kernel cannot load, it warns once and the run takes the
//! reference ops.

use super::super::gpu_self_check as self_check;
use super::super::triton::{self, launch};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaStorage, DType, Device, Layout, Result, Shape, Tensor};

/// `rows x vocab` as the kernels' grid and i32 vocabulary.
fn sizes(l: &Layout) -> Result<(u32, i32)> {
    let (rows, vocab) = l.shape().dims2()?;
    Ok((triton::blocks(rows, 1)?, triton::int(vocab)?))
}

/// Each row's log-sum-exp (`rows`, f32) of the `rows x vocab` logits.
pub(super) fn row_logsumexp(logits: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    fn run<T: CudaDType + DeviceRepr>(logits: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
        let device = logits.device().clone();
        let loaded = triton::load_for(logits, "row_logsumexp")?;
        let (rows, vocab) = sizes(l)?;
        let input = triton::view::<T>(logits, l)?;
        // SAFETY: one program per row writes its element.
        let lse = unsafe { device.alloc::<f32>(rows as usize)? };
        let null = 0u64;
        let stream = device.cuda_stream();
        launch!(stream, loaded, loaded.config((rows, 1, 1)), triton::ROW_LOGSUMEXP_PARAMS;
            logits = &input, lse = &lse, vocab = &vocab, scratch0 = &null, scratch1 = &null)
        .w()?;
        Ok(CudaStorage::wrap_cuda_slice(lse, device))
    }
    let rows = l.shape().dims2()?.0;
    let lse = match logits.dtype() {
        DType::BF16 => run::<half::bf16>(logits, l)?,
        DType::F32 => run::<f32>(logits, l)?,
        dtype => bail!("cross-entropy on CUDA: no kernel for {dtype:?}"),
    };
    Ok((lse, Shape::from(rows)))
}

/// `logits <- scale * (softmax - onehot(targets))` in place, from each row's log-sum-exp.
pub(super) fn softmax_gradient(
    logits: &mut CudaStorage,
    l: &Layout,
    (lse, lse_layout): (&CudaStorage, &Layout),
    (targets, targets_layout): (&CudaStorage, &Layout),
    scale: f64,
) -> Result<()> {
    let loaded = triton::load_for(logits, "softmax_gradient")?;
    let (rows, vocab) = sizes(l)?;
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("cross-entropy: strided logits".into()))?;
    let lse = triton::view::<f32>(lse, lse_layout)?;
    let targets = triton::view::<u32>(targets, targets_layout)?;
    let scale = scale as f32;
    let null = 0u64;
    let config = loaded.config((rows, 1, 1));
    let stream = logits.device().cuda_stream();
    match logits.dtype() {
        DType::BF16 => {
            let mut out = logits
                .as_cuda_slice_mut::<half::bf16>()?
                .slice_mut(start..end);
            launch!(stream, loaded, config, triton::SOFTMAX_GRADIENT_PARAMS;
                logits = &mut out, lse = &lse, targets = &targets, vocab = &vocab, scale = &scale,
                scratch0 = &null, scratch1 = &null)
        }
        DType::F32 => {
            let mut out = logits.as_cuda_slice_mut::<f32>()?.slice_mut(start..end);
            launch!(stream, loaded, config, triton::SOFTMAX_GRADIENT_PARAMS;
                logits = &mut out, lse = &lse, targets = &targets, vocab = &vocab, scale = &scale,
                scratch0 = &null, scratch1 = &null)
        }
        dtype => bail!("cross-entropy on CUDA: no kernel for {dtype:?}"),
    }
    .w()?;
    Ok(())
}

/// Whether the output head on `x` (`rows x hidden`) and `w` (`vocab x hidden`, on a GPU)
/// runs chunked through our kernels: a CUDA tensor of a compiled type, `train.kernels` not
/// `reference`, the kernels loaded and their self-check passed for this type and size.
pub(crate) fn applies(x: &Tensor, w: &Tensor) -> bool {
    let Ok((vocab, hidden)) = w.dims2() else {
        return false;
    };
    let shape = format!("vocabulary {vocab}, hidden {hidden}");
    self_check::applies(x, "cross-entropy", shape, || {
        self_check(x.dtype(), x.device(), (vocab, hidden))
    })
}

/// The worst relative difference between the chunked head and the reference composition
/// (loss, `dx` and `dw`) on 300 random rows in chunks of 128 (the last one partial).
fn self_check(dtype: DType, device: &Device, (vocab, hidden): (usize, usize)) -> Result<f64> {
    let rows = 300;
    let x = self_check::random((rows, hidden), dtype, device)?;
    let w = (self_check::random((vocab, hidden), dtype, device)? * 0.1)?;
    let targets: Vec<u32> = (0..rows).map(|i| (i * 7919 % vocab) as u32).collect();
    let targets = Tensor::from_vec(targets, rows, device)?;
    self_check::worst_difference(
        &[x, w],
        |v| super::linear_cross_entropy(&v[0], &v[1], &targets, 128),
        |v| super::super::reference::linear_cross_entropy(&v[0], &v[1], &targets),
    )
}
