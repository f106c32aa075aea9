//! The optimizer's fused ops on CUDA: the Triton kernels of `model/ops/triton/adam.py` (layouts
//! and grids stated there) behind `AdamUpdate`'s `cuda_fwd` (`adamw_update` for blocks of 1,
//! `adam_mini_update` otherwise) and `SumSquares`' (`sum_squares_part`, whose f64 parts are
//! summed here in a fixed order), f32 only. Before a GPU's first use for a block size,
//! [`update_applies`] checks the update against the tensor-op composition; [`sum_applies`]
//! checks the sum once per GPU.

use super::{AdamUpdate, UpdateReference};
use crate::model::ops::compare::{random, relative};
use crate::model::ops::gpu_self_check as self_check;
use crate::model::ops::triton::{self, launch};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::WrapErr;
use candle_core::op::ReduceOp;
use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape, Tensor};

/// Whether the fused update of the f32 GPU parameter `theta` with blocks of `block` runs the
/// kernels: their self-check passed on its GPU for that block size. The check runs one update
/// of a random parameter of three blocks (3,001 elements for AdamW) at step 3 with a learning
/// rate that makes the update as large as the parameters, `h`'s betas and eps, weight decay and
/// a clip scale, and compares the new parameter, first and second moments each with
/// `reference`'s (the tensor-op update a GPU ran before).
pub(super) fn update_applies(theta: &Tensor, h: &AdamUpdate, reference: UpdateReference) -> bool {
    if theta.dtype() != DType::F32 {
        return false;
    }
    let block = h.block;
    self_check::applies(theta, "adam-update", format!("block {block}"), || {
        let n = if block == 1 { 3001 } else { 3 * block };
        let blocks = n / block;
        let device = theta.device();
        let draw = |len: usize| random(len, DType::F32, device);
        let (p, g) = (draw(n)?, draw(n)?);
        let moments = Tensor::cat(&[(draw(n)? * 0.1)?, (draw(blocks)?.sqr()? * 0.05)?], 0)?;
        let check = AdamUpdate {
            lr: 0.1,
            grad_scale: 0.7,
            decay: 0.01,
            bias1: 1.0 - h.beta1.powi(3),
            bias2_sqrt: (1.0 - h.beta2.powi(3)).sqrt(),
            ..*h
        };
        let packed = p.apply_op3_no_bwd(&g, &moments, &check)?;
        let (theta_ref, moments_ref) = reference(&p, &g, &moments, &check)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let parts = [
            (packed.narrow(0, 0, n)?, theta_ref),
            (packed.narrow(0, n, n)?, moments_ref.narrow(0, 0, n)?),
            (
                packed.narrow(0, 2 * n, blocks)?,
                moments_ref.narrow(0, n, blocks)?,
            ),
        ];
        parts
            .iter()
            .try_fold(0f64, |worst, (a, b)| Ok(worst.max(relative(a, b)?)))
    })
}

/// Whether the sum of squares of the f32 GPU tensor `g` runs the kernel: its self-check (once
/// per GPU: 40,000 random elements, three parts, the last partial, against `reference`, the
/// tensor ops' f32 sum) passed.
pub(super) fn sum_applies(g: &Tensor, reference: fn(&Tensor) -> anyhow::Result<Tensor>) -> bool {
    if g.dtype() != DType::F32 {
        return false;
    }
    self_check::applies(g, "sum-squares", "any size".into(), || {
        let x = random(40_000, DType::F32, g.device())?;
        let fused = x.apply_op1_no_bwd(&super::SumSquares)?;
        let reference = reference(&x).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        relative(&fused, &reference)
    })
}

/// One Adam update: `[p' (n) | m' (n) | v' (n / block)]`, f32.
pub(super) fn update(
    h: &AdamUpdate,
    (p, pl): (&CudaStorage, &Layout),
    (g, gl): (&CudaStorage, &Layout),
    (m, ml): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    if [p.dtype(), g.dtype(), m.dtype()] != [DType::F32; 3] {
        bail!("adam-update on CUDA: f32 only");
    }
    let (n, block) = (pl.shape().elem_count(), h.block);
    if block == 0 || !n.is_multiple_of(block) {
        bail!("adam-update: {n} elements do not split into blocks of {block}");
    }
    let blocks = n / block;
    if gl.shape().elem_count() != n || ml.shape().elem_count() != n + blocks {
        bail!("adam-update: parameter, gradient and moments sizes differ");
    }
    let device = p.device().clone();
    let (theta, grad) = (triton::view::<f32>(p, pl)?, triton::view::<f32>(g, gl)?);
    let moments = triton::view::<f32>(m, ml)?;
    // SAFETY: the programs write every p', m' and v' (the grids cover every element or block).
    let out = unsafe { device.alloc::<f32>(2 * n + blocks)? };
    // The hyper-parameters rounded once to f32, as the CPU op rounds them.
    let (beta1, beta2, eps) = (h.beta1 as f32, h.beta2 as f32, h.eps as f32);
    let (keep, step) = ((1.0 - h.decay) as f32, (h.lr / h.bias1) as f32);
    let (inv_bias2, grad_scale) = ((1.0 / h.bias2_sqrt) as f32, h.grad_scale as f32);
    let size = triton::int(n)?;
    let null = 0u64;
    let stream = device.cuda_stream();
    if block == 1 {
        let kernel = triton::load_for(p, "adamw_update")?;
        let grid = (triton::blocks(n, triton::ADAM_BLOCK)?, 1, 1);
        launch!(stream, kernel, kernel.config(grid), triton::ADAMW_UPDATE_PARAMS;
            theta = &theta, grad = &grad, moments = &moments, out = &out, n = &size,
            beta1 = &beta1, beta2 = &beta2, eps = &eps, keep = &keep, step = &step,
            inv_bias2 = &inv_bias2, grad_scale = &grad_scale, scratch0 = &null,
            scratch1 = &null)
        .w()?;
    } else {
        let kernel = triton::load_for(p, "adam_mini_update")?;
        let grid = (triton::blocks(blocks, 1)?, 1, 1);
        let (width, inv_block) = (triton::int(block)?, (1.0 / block as f64) as f32);
        launch!(stream, kernel, kernel.config(grid), triton::ADAM_MINI_UPDATE_PARAMS;
            theta = &theta, grad = &grad, moments = &moments, out = &out, n = &size,
            block = &width, beta1 = &beta1, beta2 = &beta2, eps = &eps, keep = &keep,
            step = &step, inv_bias2 = &inv_bias2, grad_scale = &grad_scale,
            inv_block = &inv_block, scratch0 = &null, scratch1 = &null)
        .w()?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(out, device),
        Shape::from(2 * n + blocks),
    ))
}

/// The sum of squares of `x` (f32): a `()`-shaped f64, the kernel's f64 parts summed by candle's
/// reduction in a fixed order.
pub(super) fn sum_squares(x: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    if x.dtype() != DType::F32 {
        bail!("sum-squares on CUDA: f32 only");
    }
    let device = x.device().clone();
    let kernel = triton::load_for(x, "sum_squares_part")?;
    let n = l.shape().elem_count();
    let input = triton::view::<f32>(x, l)?;
    let parts = triton::blocks(n, triton::SUM_SQUARES_PER_PROGRAM)?.max(1);
    // SAFETY: one program per part writes it.
    let part = unsafe { device.alloc::<f64>(parts as usize)? };
    let size = triton::int(n)?;
    let null = 0u64;
    let stream = device.cuda_stream();
    launch!(stream, kernel, kernel.config((parts, 1, 1)), triton::SUM_SQUARES_PART_PARAMS;
        x = &input, part = &part, n = &size, scratch0 = &null, scratch1 = &null)
    .w()?;
    let layout = Layout::contiguous(parts as usize);
    let sum = CudaStorage::wrap_cuda_slice(part, device).reduce_op(ReduceOp::Sum, &layout, &[0])?;
    Ok((sum, Shape::from(())))
}
