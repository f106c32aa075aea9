//! The optimizer on CUDA: the multi-tensor Triton kernels of `model/ops/triton/adam.py` (layouts
//! and grids stated there), f32 only. [`gpu_update_all`] updates every parameter and its moments
//! in place in a few launches (`adamw_multi` over the tensors with one second moment per element,
//! `adam_mini_multi` over those with blocks), and [`gpu_sum_of_squares`] sums the squares of every
//! gradient in one launch (`sum_squares_multi`, whose f64 parts candle's reduction adds in a
//! fixed order). Before a GPU's first use each is checked against the tensor ops.

use super::{AdamUpdate, UpdateReference};
use crate::model::ops::compare::{random, relative};
use crate::model::ops::gpu_self_check as self_check;
use crate::model::ops::triton::{self, launch};
use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{bail, CudaStorage, DType, Device, Error, Result, Storage, Tensor};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// The tensors of one multi-tensor update, in parameter order.
pub(in crate::optim) struct Group<'a> {
    /// The parameters (contiguous), updated in place.
    pub thetas: Vec<&'a Tensor>,
    /// Their gradients.
    pub grads: &'a [Tensor],
    /// Per parameter `[m (n) | v (n / block)]` (contiguous), updated in place.
    pub moments: &'a [Tensor],
    /// Per parameter: whether weight decay applies.
    pub decays: Vec<bool>,
    /// Per parameter: elements sharing one second moment (1: AdamW).
    pub blocks: &'a [usize],
}

/// One tensor of a multi-tensor launch: its elements, the elements sharing one second moment
/// (1: AdamW) and whether weight decay applies.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Slot {
    n: usize,
    block: usize,
    decays: bool,
}

/// Adam's update with `h` (its `decay`: the decaying parameters'; its `block` unused) of every
/// tensor of `group` on their GPU, in place, when the multi-tensor kernels serve it: all f32 on
/// one GPU, and the kernels' self-check against `reference` (the tensor-op update) passed there.
/// Returns whether it ran.
pub(in crate::optim) fn gpu_update_all(
    group: &Group,
    h: &AdamUpdate,
    reference: UpdateReference,
) -> Result<bool> {
    let Some(&first) = group.thetas.first() else {
        return Ok(false);
    };
    let tensors = group.thetas.iter().copied();
    let mut tensors = tensors.chain(group.grads).chain(group.moments);
    if !tensors.all(|t| t.dtype() == DType::F32 && t.device().same_device(first.device())) {
        return Ok(false);
    }
    for adamw in [true, false] {
        let present = group.blocks.iter().any(|&b| (b == 1) == adamw);
        if present && !update_applies(first, adamw, h, reference) {
            return Ok(false);
        }
    }
    update_all(group, h)?;
    Ok(true)
}

/// Whether the multi-tensor update of AdamW's tensors (`adamw`) or Adam-mini's runs on `theta`'s
/// GPU: its self-check passed there (once per GPU and kind). The check updates three random
/// tensors in one launch (AdamW: 3,001, 1,024 and 1 elements; Adam-mini: blocks of 2,100, 100
/// and 768), one of them without weight decay, at step 3 with a learning rate that makes the
/// update as large as the parameters, `h`'s betas and eps and a clip scale, and compares each
/// new parameter, first and second moments with `reference`'s.
fn update_applies(theta: &Tensor, adamw: bool, h: &AdamUpdate, reference: UpdateReference) -> bool {
    let kind = if adamw { "AdamW" } else { "Adam-mini" };
    self_check::applies(theta, "adam-update", format!("multi-tensor {kind}"), || {
        let shapes: [(usize, usize, bool); 3] = if adamw {
            [(3001, 1, true), (1024, 1, false), (1, 1, true)]
        } else {
            [
                (3 * 2100, 2100, true),
                (5 * 100, 100, false),
                (2 * 768, 768, true),
            ]
        };
        let draw = |len: usize| random(len, DType::F32, theta.device());
        let check = AdamUpdate {
            lr: 0.1,
            grad_scale: 0.7,
            decay: 0.01,
            bias1: 1.0 - h.beta1.powi(3),
            bias2_sqrt: (1.0 - h.beta2.powi(3)).sqrt(),
            ..*h
        };
        let (mut thetas, mut grads, mut moments, mut expected) = (vec![], vec![], vec![], vec![]);
        for &(n, block, decays) in &shapes {
            let (p, g) = (draw(n)?, draw(n)?);
            let m = Tensor::cat(&[(draw(n)? * 0.1)?, (draw(n / block)?.sqr()? * 0.05)?], 0)?;
            let decay = if decays { check.decay } else { 0.0 };
            let one = AdamUpdate {
                decay,
                block,
                ..check
            };
            // Before the update: it writes `p` and `m` in place.
            expected.push(reference(&p, &g, &m, &one).map_err(|e| Error::Msg(e.to_string()))?);
            thetas.push(p);
            grads.push(g);
            moments.push(m);
        }
        let blocks = shapes.map(|(_, block, _)| block);
        let group = Group {
            thetas: thetas.iter().collect(),
            grads: &grads,
            moments: &moments,
            decays: shapes.iter().map(|&(_, _, decays)| decays).collect(),
            blocks: &blocks,
        };
        update_all(&group, &check)?;
        let mut worst = 0f64;
        for (i, (theta_ref, moments_ref)) in expected.iter().enumerate() {
            let (n, block, _) = shapes[i];
            let m = moments[i].narrow(0, 0, n)?;
            let v = moments[i].narrow(0, n, n / block)?;
            worst = worst
                .max(relative(&thetas[i], theta_ref)?)
                .max(relative(&m, &moments_ref.narrow(0, 0, n)?)?)
                .max(relative(&v, &moments_ref.narrow(0, n, n / block)?)?);
        }
        Ok(worst)
    })
}

/// The update of [`gpu_update_all`], unconditionally: one `adamw_multi` launch over the tensors
/// with blocks of 1 and one `adam_mini_multi` launch over the others (each only if there are
/// any), each after one upload of the tensors' addresses.
fn update_all(group: &Group, h: &AdamUpdate) -> Result<()> {
    let count = group.thetas.len();
    if [
        group.grads.len(),
        group.moments.len(),
        group.decays.len(),
        group.blocks.len(),
    ] != [count; 4]
    {
        bail!("adam-update: the parameters, gradients, moments and blocks differ in number");
    }
    let mut slots = Vec::with_capacity(count);
    for (i, theta) in group.thetas.iter().enumerate() {
        let (n, block) = (theta.elem_count(), group.blocks[i]);
        if block == 0 || !n.is_multiple_of(block) {
            bail!("adam-update: {n} elements do not split into blocks of {block}");
        }
        if group.grads[i].elem_count() != n || group.moments[i].elem_count() != n + n / block {
            bail!("adam-update: parameter, gradient and moments sizes differ");
        }
        let decays = group.decays[i];
        slots.push(Slot { n, block, decays });
    }
    let device = cuda_device(group.thetas.first().copied())?;
    let grads = contiguous(group.grads)?;
    for adamw in [true, false] {
        // Empty tensors have no programs.
        let picked: Vec<usize> = (0..count)
            .filter(|&i| (slots[i].block == 1) == adamw && slots[i].n > 0)
            .collect();
        if picked.is_empty() {
            continue;
        }
        let mut tensors: Vec<&Tensor> = picked.iter().map(|&i| group.thetas[i]).collect();
        tensors.extend(picked.iter().map(|&i| &grads[i]));
        tensors.extend(picked.iter().map(|&i| &group.moments[i]));
        let pointers = triton::pointer_table::<f32>(&device, &tensors)?;
        let slots: Vec<Slot> = picked.iter().map(|&i| slots[i]).collect();
        launch_update(&device, &pointers, &slots, h)?;
    }
    Ok(())
}

/// Launches `adamw_multi` (every block 1) or `adam_mini_multi` over the tensors `slots` whose
/// addresses `pointers` holds (`[theta | grad | moments]`).
fn launch_update(
    device: &CudaDevice,
    pointers: &CudaSlice<u64>,
    slots: &[Slot],
    h: &AdamUpdate,
) -> Result<()> {
    let adamw = slots.iter().all(|s| s.block == 1);
    let t = tables(device, adamw.then_some(triton::ADAM_BLOCK as usize), slots)?;
    // The hyper-parameters rounded once to f32, as the CPU op rounds them; the parameters
    // without weight decay keep 1 (the kernel's choice by `decays`), as the CPU op's `1 - 0`.
    let (beta1, beta2, eps) = (h.beta1 as f32, h.beta2 as f32, h.eps as f32);
    let (keep, step) = ((1.0 - h.decay) as f32, (h.lr / h.bias1) as f32);
    let (inv_bias2, grad_scale) = ((1.0 / h.bias2_sqrt) as f32, h.grad_scale as f32);
    let tensors = triton::int(slots.len())?;
    let null = 0u64;
    let stream = device.cuda_stream();
    let grid = (t.programs, 1, 1);
    if adamw {
        let kernel = load(device, "adamw_multi")?;
        launch!(stream, kernel, kernel.config(grid), triton::ADAMW_MULTI_PARAMS;
            pointers = pointers, tensors = &tensors, owner = &t.owner, first = &t.first,
            sizes = &t.sizes, decays = &t.decays, beta1 = &beta1, beta2 = &beta2, eps = &eps,
            keep = &keep, step = &step, inv_bias2 = &inv_bias2, grad_scale = &grad_scale,
            scratch0 = &null, scratch1 = &null)
        .w()?;
    } else {
        let kernel = load(device, "adam_mini_multi")?;
        launch!(stream, kernel, kernel.config(grid), triton::ADAM_MINI_MULTI_PARAMS;
            pointers = pointers, tensors = &tensors, owner = &t.owner, first = &t.first,
            sizes = &t.sizes, blocks = &t.blocks, inv_blocks = &t.inv_blocks,
            decays = &t.decays, beta1 = &beta1, beta2 = &beta2, eps = &eps, keep = &keep,
            step = &step, inv_bias2 = &inv_bias2, grad_scale = &grad_scale, scratch0 = &null,
            scratch1 = &null)
        .w()?;
    }
    Ok(())
}

/// The sum of squares of every gradient of `grads` (f32, on one GPU) as a `()`-shaped f64
/// tensor there, when the multi-tensor kernel serves them (its self-check against `reference`,
/// the tensor ops' sum of one tensor, passed on that GPU); None otherwise.
pub(in crate::optim) fn gpu_sum_of_squares(
    grads: &[Tensor],
    reference: fn(&Tensor) -> anyhow::Result<Tensor>,
) -> Result<Option<Tensor>> {
    let Some(first) = grads.first() else {
        return Ok(None);
    };
    let same = |g: &Tensor| g.dtype() == DType::F32 && g.device().same_device(first.device());
    if !grads.iter().all(same) || !sum_applies(first, reference) {
        return Ok(None);
    }
    sum_of_squares(grads).map(Some)
}

/// Whether [`sum_of_squares`] runs on `g`'s GPU: its self-check (once per GPU: 40,000, 1 and
/// 20,001 random elements in one launch, against the sum of `reference`'s f32 sums) passed.
fn sum_applies(g: &Tensor, reference: fn(&Tensor) -> anyhow::Result<Tensor>) -> bool {
    self_check::applies(g, "sum-squares", "multi-tensor".into(), || {
        let xs = [40_000, 1, 20_001]
            .into_iter()
            .map(|n| random(n, DType::F32, g.device()))
            .collect::<Result<Vec<_>>>()?;
        let fused = sum_of_squares(&xs)?;
        let mut expected = Tensor::zeros((), DType::F64, g.device())?;
        for x in &xs {
            expected = (expected + reference(x).map_err(|e| Error::Msg(e.to_string()))?)?;
        }
        relative(&fused, &expected)
    })
}

/// One `sum_squares_multi` launch over `grads` (after one upload of their addresses); its f64
/// parts, in tensor order and chunk order within each, summed by candle's reduction (a fixed
/// order: deterministic).
fn sum_of_squares(grads: &[Tensor]) -> Result<Tensor> {
    let device = cuda_device(grads.first())?;
    let grads = contiguous(grads)?;
    let slots: Vec<Slot> = grads
        .iter()
        .map(|g| Slot {
            n: g.elem_count(),
            block: 1,
            decays: false,
        })
        .collect();
    if slots.iter().all(|s| s.n == 0) {
        return Tensor::zeros((), DType::F64, &Device::Cuda(device));
    }
    let t = tables(
        &device,
        Some(triton::SUM_SQUARES_PER_PROGRAM as usize),
        &slots,
    )?;
    let pointers = triton::pointer_table::<f32>(&device, &grads.iter().collect::<Vec<_>>())?;
    let programs = t.programs as usize;
    // SAFETY: one program per part writes it.
    let part = unsafe { device.alloc::<f64>(programs)? };
    let kernel = load(&device, "sum_squares_multi")?;
    let stream = device.cuda_stream();
    let null = 0u64;
    launch!(stream, kernel, kernel.config((t.programs, 1, 1)), triton::SUM_SQUARES_MULTI_PARAMS;
        pointers = &pointers, owner = &t.owner, first = &t.first, sizes = &t.sizes,
        part = &part, scratch0 = &null, scratch1 = &null)
    .w()?;
    let part = Storage::Cuda(CudaStorage::wrap_cuda_slice(part, device));
    Tensor::from_storage(part, programs, BackpropOp::none(), false).sum_all()
}

/// The per-tensor tables of a multi-tensor launch (layouts: `adam.py`) on one GPU.
struct Tables {
    owner: CudaSlice<i32>,
    first: CudaSlice<i32>,
    sizes: CudaSlice<i64>,
    blocks: CudaSlice<i32>,
    inv_blocks: CudaSlice<f32>,
    decays: CudaSlice<i32>,
    /// The grid: programs over all tensors.
    programs: u32,
}

/// The tables of the tensors `slots` on `device`'s GPU, `per_program` elements per program (None:
/// one program per Adam-mini block). Uploaded once per GPU and set of tensors, then kept: a run's
/// parameters and gradients keep their shapes, so each step reuses them (a few hundred KB at
/// most, 4 bytes per program).
fn tables(device: &CudaDevice, per_program: Option<usize>, slots: &[Slot]) -> Result<Arc<Tables>> {
    type Key = (usize, Option<usize>, Vec<Slot>);
    static CACHE: OnceLock<Mutex<HashMap<Key, Arc<Tables>>>> = OnceLock::new();
    let ordinal = device.cuda_stream().context().ordinal();
    let key = (ordinal, per_program, slots.to_vec());
    let mut cache = CACHE.get_or_init(Default::default).lock().map_err(|_| {
        Error::Msg("a thread panicked while building the optimizer's tables".into())
    })?;
    if let Some(tables) = cache.get(&key) {
        return Ok(Arc::clone(tables));
    }
    let (mut first, mut owner) = (Vec::with_capacity(slots.len()), Vec::new());
    for (t, s) in slots.iter().enumerate() {
        let programs = per_program.map_or(s.n / s.block, |k| s.n.div_ceil(k));
        first.push(triton::int(owner.len())?);
        owner.extend(std::iter::repeat_n(triton::int(t)?, programs));
    }
    let programs = u32::try_from(owner.len()).map_err(|e| Error::Msg(e.to_string()))?;
    let sizes = slots
        .iter()
        .map(|s| i64::try_from(s.n).map_err(|e| Error::Msg(e.to_string())))
        .collect::<Result<Vec<_>>>()?;
    let blocks = slots
        .iter()
        .map(|s| triton::int(s.block))
        .collect::<Result<Vec<_>>>()?;
    // 1 / block rounded once to f32 from f64, as the CPU op rounds it.
    let inv_blocks: Vec<f32> = slots
        .iter()
        .map(|s| (1.0 / s.block as f64) as f32)
        .collect();
    let decays: Vec<i32> = slots.iter().map(|s| i32::from(s.decays)).collect();
    let tables = Arc::new(Tables {
        owner: device.clone_htod(&owner)?,
        first: device.clone_htod(&first)?,
        sizes: device.clone_htod(&sizes)?,
        blocks: device.clone_htod(&blocks)?,
        inv_blocks: device.clone_htod(&inv_blocks)?,
        decays: device.clone_htod(&decays)?,
        programs,
    });
    cache.insert(key, Arc::clone(&tables));
    Ok(tables)
}

/// The GPU of `tensor` (the first of a group).
fn cuda_device(tensor: Option<&Tensor>) -> Result<CudaDevice> {
    match tensor.map(Tensor::device) {
        Some(Device::Cuda(device)) => Ok(device.clone()),
        _ => bail!("a multi-tensor optimizer kernel's tensors are not on a GPU"),
    }
}

/// `tensors`, each contiguous (copied where it is not).
fn contiguous(tensors: &[Tensor]) -> Result<Vec<Tensor>> {
    tensors.iter().map(Tensor::contiguous).collect()
}

/// `kernel`'s f32 variant on `device`'s GPU.
fn load(device: &CudaDevice, kernel: &str) -> Result<triton::Loaded> {
    triton::load(device, kernel, "fp32").map_err(Error::Msg)
}
