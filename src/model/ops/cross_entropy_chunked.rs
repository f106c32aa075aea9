//! The output head fused with the mean token cross-entropy, chunk by chunk over the rows:
//! the GPU's path (Liger's fused linear cross-entropy scheme). The `rows x vocab` logits are
//! never whole: the largest tensor is one chunk of them.
//!
//! Layouts: `x` is `rows x hidden`, `w` is `vocab x hidden`, `targets` is `rows` (u32, each
//! below `vocab`: the data loader checks every id against the vocabulary). Per chunk of `R`
//! rows:
//! 1. `logits = x_c @ w^T` (`R x vocab`, `x`'s type): one GEMM;
//! 2. `lse = row_logsumexp(logits)` (`R`, f32, f64 for f64 logits), and the chunk's losses
//!    `lse - logits[r, t_r]` summed;
//! 3. when a gradient is wanted, `softmax_gradient` turns the logits in place into the loss's
//!    gradient `(softmax - onehot) / rows`, then `dx_c = dlogits @ w` and `dw += dlogits^T @
//!    x_c` (accumulated in f32 over the chunks, rounded once to `w`'s type).
//!
//! The gradients are thus computed with the loss, in the forward pass: three GEMMs of `2 R
//! hidden vocab` each, the two that an unfused backward runs plus the forward's, and no
//! logits kept for a backward. The backward only scales them by the loss's gradient. Without a
//! gradient (neither `x` nor `w` tracked: a loss of detached tensors) only steps 1 and 2 run.
//! The training loop's evaluation detaches the loss after computing it from tracked
//! parameters, so on a GPU it still pays for the gradients (correct, slower).
//!
//! The row passes are Triton kernels on CUDA (`triton/cross_entropy.py`) and plain loops on
//! the CPU, where they serve the tests of this chunking against the reference composition (the
//! CPU trains through `cross_entropy.rs`'s whole-logits kernel).

use crate::cpu_kernels::{float_dispatch, owned, slice, Elem};
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, DType, InplaceOp3, Layout, Result, Shape, Storage,
    Tensor,
};
use std::sync::Mutex;

/// The most bytes one chunk of logits may take: 256 MiB (1,280 rows of llama's 50,304 f32
/// logits, 2,560 in bf16): GEMMs of that many rows run at full speed, and the chunk is small
/// beside the model's activations.
const CHUNK_BYTES: usize = 256 << 20;

/// The rows per chunk for `vocab` logits of `dtype`: as many as fit [`CHUNK_BYTES`], a
/// multiple of 128 (the GEMMs' tiles), at least 128.
pub fn chunk_rows(vocab: usize, dtype: DType) -> usize {
    let rows = CHUNK_BYTES / (vocab.max(1) * dtype.size_in_bytes());
    (rows / 128).max(1) * 128
}

/// Mean token cross-entropy of `x @ w^T` (`x`: `rows x hidden`, `w`: `vocab x hidden`)
/// against `targets` (`rows`, u32), `chunk` rows of logits at a time; the loss is f32 (f64
/// for f64 inputs) and carries the gradients of `x` and `w` when either is tracked.
pub fn linear_cross_entropy(
    x: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    chunk: usize,
) -> Result<Tensor> {
    let (rows, hidden) = x.dims2()?;
    let w_hidden = w.dims2()?.1;
    if hidden != w_hidden || targets.dims1()? != rows || rows == 0 || chunk == 0 {
        bail!(
            "linear-cross-entropy: x {:?}, w {:?}, targets {:?}, chunk {chunk}",
            x.dims(),
            w.dims(),
            targets.dims()
        );
    }
    let wants_gradient = x.track_op() || w.track_op();
    let (xd, wd) = (x.detach(), w.detach());
    let scale = 1.0 / rows as f64;
    let mut total: Option<Tensor> = None;
    let mut dx_chunks = Vec::new();
    let mut dw: Option<Tensor> = None;
    for start in (0..rows).step_by(chunk) {
        let len = chunk.min(rows - start);
        let x_chunk = xd.narrow(0, start, len)?;
        let t_chunk = targets.narrow(0, start, len)?.contiguous()?;
        let logits = x_chunk.matmul(&wd.t()?)?;
        let lse = logits.apply_op1_no_bwd(&RowLogSumExp)?;
        let target_logits = logits
            .gather(&t_chunk.unsqueeze(1)?, 1)?
            .squeeze(1)?
            .to_dtype(lse.dtype())?;
        let sum = (&lse - target_logits)?.sum_all()?;
        total = Some(match total {
            Some(t) => (t + sum)?,
            None => sum,
        });
        if wants_gradient {
            logits.inplace_op3(&lse, &t_chunk, &SoftmaxGradient { scale })?;
            dx_chunks.push(logits.matmul(&wd)?);
            let dw_chunk = logits
                .t()?
                .matmul(&x_chunk)?
                .to_dtype(accumulator(w.dtype()))?;
            dw = Some(match dw {
                Some(acc) => (acc + dw_chunk)?,
                None => dw_chunk,
            });
        }
    }
    let loss = (total.expect("rows > 0, so one chunk at least") * scale)?;
    let grads = match dw {
        Some(dw) => Some((Tensor::cat(&dx_chunks, 0)?, dw.to_dtype(w.dtype())?)),
        None => None,
    };
    let grads = Mutex::new(grads);
    x.apply_op2(w, WithGradients { loss, grads })
}

/// The type `dw` is summed in over the chunks: f32 for half-precision weights (as a single
/// GEMM accumulates), else the weights' own.
fn accumulator(dtype: DType) -> DType {
    match dtype {
        DType::BF16 | DType::F16 => DType::F32,
        other => other,
    }
}

/// Each row's log-sum-exp of `rows x vocab` logits: `rows`, f32 (f64 for f64 logits).
struct RowLogSumExp;

impl CustomOp1 for RowLogSumExp {
    fn name(&self) -> &'static str {
        "row-logsumexp"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, vocab) = l.shape().dims2()?;
        float_dispatch!(s, self.name(), |T| {
            let logits = slice::<T>(s, l)?;
            let lse: Vec<T> = logits.chunks(vocab).map(log_sum_exp).collect();
            Ok(owned(lse, &Shape::from(rows)))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::row_logsumexp(s, l)
    }
}

/// `log(sum(exp(row)))`, shifted by the row's maximum.
fn log_sum_exp<T: Elem>(row: &[T]) -> T {
    let top = row
        .iter()
        .fold(T::neg_infinity(), |m, &v| num_traits::Float::max(m, v));
    top + row.iter().fold(T::zero(), |s, &v| s + (v - top).exp()).ln()
}

/// `logits <- scale * (softmax(logits) - onehot(targets))` in place, from each row's
/// log-sum-exp (the op's second input) and target (its third).
struct SoftmaxGradient {
    scale: f64,
}

impl InplaceOp3 for SoftmaxGradient {
    fn name(&self) -> &'static str {
        "softmax-gradient"
    }

    fn cpu_fwd(
        &self,
        logits: &mut CpuStorage,
        ll: &Layout,
        lse: &CpuStorage,
        lsel: &Layout,
        targets: &CpuStorage,
        tl: &Layout,
    ) -> Result<()> {
        fn run<T: Elem>(logits: &mut [T], lse: &[T], targets: &[u32], scale: f64) {
            let scale = T::from(scale).expect("scale fits the float type");
            let vocab = logits.len() / lse.len();
            for ((row, &lse), &t) in logits.chunks_mut(vocab).zip(lse).zip(targets) {
                for (j, z) in row.iter_mut().enumerate() {
                    let p = (*z - lse).exp();
                    *z = if j == t as usize { p - T::one() } else { p } * scale;
                }
            }
        }
        let (start, end) = ll
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("softmax-gradient: strided logits".into()))?;
        let targets = slice::<u32>(targets, tl)?;
        match logits {
            CpuStorage::F32(v) => run(&mut v[start..end], slice(lse, lsel)?, targets, self.scale),
            CpuStorage::F64(v) => run(&mut v[start..end], slice(lse, lsel)?, targets, self.scale),
            other => bail!(
                "softmax-gradient supports f32 and f64, got {:?}",
                other.dtype()
            ),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        logits: &mut candle_core::CudaStorage,
        ll: &Layout,
        lse: &candle_core::CudaStorage,
        lsel: &Layout,
        targets: &candle_core::CudaStorage,
        tl: &Layout,
    ) -> Result<()> {
        cuda::softmax_gradient(logits, ll, (lse, lsel), (targets, tl), self.scale)
    }
}

/// Hands a loss computed beside the graph to it: the forward returns `loss`, the backward
/// the gradients of `x` and `w` computed with it, scaled by the loss's gradient.
struct WithGradients {
    loss: Tensor,
    grads: Mutex<Option<(Tensor, Tensor)>>,
}

impl WithGradients {
    /// A copy of the loss's storage on the backend `S`, picked out by `pick`.
    fn loss_storage<S: BackendStorage>(
        &self,
        pick: impl FnOnce(&Storage) -> Option<&S>,
    ) -> Result<(S, Shape)> {
        let (storage, layout) = self.loss.storage_and_layout();
        let loss = pick(&storage).ok_or_else(|| {
            candle_core::Error::Msg("linear-cross-entropy: loss elsewhere".into())
        })?;
        Ok((loss.try_clone(layout)?, Shape::from(())))
    }
}

impl CustomOp2 for WithGradients {
    fn name(&self) -> &'static str {
        "linear-cross-entropy-chunked"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.loss_storage(|s| match s {
            Storage::Cpu(s) => Some(s),
            _ => None,
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.loss_storage(|s| match s {
            Storage::Cuda(s) => Some(s),
            _ => None,
        })
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _w: &Tensor,
        _loss: &Tensor,
        dloss: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = self
            .grads
            .lock()
            .map_err(|_| candle_core::Error::Msg("linear-cross-entropy: poisoned".into()))?
            .take()
            .ok_or_else(|| {
                candle_core::Error::Msg("linear-cross-entropy: no gradient (or taken)".into())
            })?;
        let scaled = |g: Tensor| g.broadcast_mul(&dloss.to_dtype(g.dtype())?);
        Ok((Some(scaled(dx)?), Some(scaled(dw)?)))
    }
}

#[cfg(feature = "cuda")]
#[path = "cross_entropy_chunked_cuda.rs"]
mod cuda;
#[cfg(feature = "cuda")]
pub(super) use cuda::applies;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The chunked head's loss and gradients against the reference composition in f64, with
    /// chunks that do not divide the rows, one chunk, and one row per chunk.
    #[test]
    fn chunks_match_the_reference_composition() -> Result<()> {
        let device = Device::Cpu;
        let (rows, hidden, vocab) = (37, 8, 300);
        let x = Var::from_tensor(&(Tensor::randn(0f64, 1.0, (rows, hidden), &device)? * 2.0)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f64, 1.0, (vocab, hidden), &device)?)?;
        let targets = Tensor::from_vec(
            (0..rows as u32).map(|i| (i * 97) % vocab as u32).collect(),
            rows,
            &device,
        )?;
        // A loss gradient other than 1, as gradient accumulation gives.
        let weight = 0.25;
        let reference = super::super::reference::linear_cross_entropy(&x, &w, &targets)?;
        let grads = (&reference * weight)?.backward()?;
        let (rx, rw) = (grads.get(&x).unwrap(), grads.get(&w).unwrap());
        for chunk in [1, 10, 37, 64] {
            let loss = linear_cross_entropy(&x, &w, &targets, chunk)?;
            let diff = (loss.to_scalar::<f64>()? - reference.to_scalar::<f64>()?).abs();
            assert!(diff < 1e-12, "chunk {chunk}: loss off by {diff}");
            let grads = (&loss * weight)?.backward()?;
            for (got, want) in [(grads.get(&x).unwrap(), rx), (grads.get(&w).unwrap(), rw)] {
                let err = (got - want)?.abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(err < 1e-12, "chunk {chunk}: gradient off by {err}");
            }
        }
        Ok(())
    }

    /// Evaluation (no tracked input) computes the loss alone, and the rows per chunk respect
    /// the budget.
    #[test]
    fn evaluation_needs_no_gradient_and_chunks_fit_the_budget() -> Result<()> {
        let device = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (5, 4), &device)?;
        let w = Tensor::randn(0f32, 1.0, (9, 4), &device)?;
        let targets = Tensor::new(&[0u32, 8, 3, 3, 1], &device)?;
        let loss = linear_cross_entropy(&x, &w, &targets, 2)?;
        let want = super::super::reference::linear_cross_entropy(&x, &w, &targets)?;
        let diff = (loss.to_scalar::<f32>()? - want.to_scalar::<f32>()?).abs();
        assert!(diff < 1e-5, "loss off by {diff}");
        assert_eq!(chunk_rows(50_304, DType::F32), 1280);
        assert_eq!(chunk_rows(50_304, DType::BF16), 2560);
        assert_eq!(chunk_rows(1 << 30, DType::F32), 128);
        Ok(())
    }
}
