//! BSFA's per-step projection on CUDA, every block of a step in three launches: the Triton
//! kernels of `model/ops/triton/bsfa.py` (layouts, tables and grids stated there) behind
//! [`project_all`]. f32 parameters and directions, at most `BSFA_K` directions per block.
//! Before a GPU's first use, [`applies`] checks them against the tensor ops of
//! [`super::project_update`].

use super::{project_update, Before, Stored};
use crate::model::ops::compare::{random, relative};
use crate::model::ops::gpu_self_check as self_check;
use crate::model::ops::triton::{self, launch};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CudaStorage, DType, Device, Layout, Result, Shape, Tensor, Var};

/// One block of a batched projection: its parameter after the base step (f32, contiguous,
/// updated in place), a flat copy from before it, and its directions (`k x numel`, f32), if
/// it has any yet.
pub(super) struct Block<'a> {
    pub after: &'a Tensor,
    pub before: &'a Tensor,
    pub directions: Option<Tensor>,
}

/// Whether the batched kernels take a block of the parameter `after`: f32 on a GPU, and their
/// self-check passed there ([`fits`] asks the same of its directions).
pub(super) fn applies(after: &Tensor) -> bool {
    after.dtype() == DType::F32
        && self_check::applies(after, "bsfa-projection", "any block".into(), || {
            check(after.device())
        })
}

/// Whether the batched kernels take `directions` (`k x numel`): f32, at most `BSFA_K` rows.
pub(super) fn fits(directions: &Tensor) -> bool {
    directions.dtype() == DType::F32 && directions.dims()[0] <= triton::BSFA_K
}

/// The self-check: three blocks (one value without directions; 5,000 values, not a multiple
/// of a program's, with 3 directions; 4,097 with 50 random ones), projected with alpha 0.2 and gamma 2 by
/// the kernels and by the tensor ops, compared parameter by parameter and update by update.
fn check(device: &Device) -> Result<f64> {
    let (alpha, gamma) = (0.2, 2.0);
    let mut worst = 0f64;
    let specs = [(1usize, 0usize), (5000, 3), (4097, 50)];
    let mut blocks = Vec::new();
    for &(n, k) in &specs {
        let before = random(n, DType::F32, device)?;
        let after = (&before + (random(n, DType::F32, device)? * 0.01)?)?;
        // Rows of norm about 1, as re-estimation's are (the kernels do not need them
        // orthogonal to compute the same products).
        let directions = (k > 0)
            .then(|| random((k, n), DType::F32, device)? / (n as f64).sqrt())
            .transpose()?;
        blocks.push((after, before, directions));
    }
    let kernel_params: Vec<Tensor> = blocks.iter().map(|b| b.0.copy()).collect::<Result<_>>()?;
    let batch: Vec<Block> = kernel_params
        .iter()
        .zip(&blocks)
        .map(|(after, (_, before, d))| Block {
            after,
            before,
            directions: d.clone(),
        })
        .collect();
    let updates = project_all(&batch, alpha, gamma)?;
    for ((after, before, d), (got, update)) in blocks.iter().zip(kernel_params.iter().zip(updates))
    {
        let param = Var::from_tensor(after)?;
        let stored = d
            .as_ref()
            .map(|d| d.contiguous().map(Stored::Full))
            .transpose()?;
        let reference = project_update(
            &param,
            Before::Tensor(before.clone()),
            stored.as_ref(),
            alpha,
            gamma,
        )
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        worst = worst
            .max(relative(got, param.as_tensor())?)
            .max(relative(&update, &reference)?);
    }
    Ok(worst)
}

/// Projects every block of `blocks` (all on one GPU) in three launches: each block's parameter
/// becomes `after + ((gamma - 1) v + (alpha - gamma) U^T U v)`, in place (a block without
/// directions keeps the base step's). Returns each block's update `v = after - before`, flat.
pub(super) fn project_all(blocks: &[Block], alpha: f64, gamma: f64) -> Result<Vec<Tensor>> {
    let Some(first) = blocks.first() else {
        return Ok(Vec::new());
    };
    let Device::Cuda(device) = first.after.device() else {
        bail!("bsfa's batched projection: the parameters are not on a GPU");
    };
    let sizes: Vec<usize> = blocks.iter().map(|b| b.after.elem_count()).collect();
    let op = ProjectAll {
        tables: Tables::upload(device, blocks, &sizes)?,
        alpha,
        gamma,
    };
    let update = first.before.apply_op1_no_bwd(&op)?;
    let mut offset = 0;
    sizes
        .iter()
        .map(|&n| {
            let v = update.narrow(0, offset, n);
            offset += n;
            v
        })
        .collect()
}

/// The tables of `bsfa.py` on the GPU: `[after | before | directions | numel | offset]` (one
/// u64 per block each) and `[rank (blocks) | first (blocks + 1)]` (i32), two copies per step.
struct Tables {
    wide: CudaSlice<u64>,
    narrow: CudaSlice<i32>,
    blocks: usize,
    programs: usize,
    total: usize,
}

impl Tables {
    fn upload(device: &candle_core::CudaDevice, blocks: &[Block], sizes: &[usize]) -> Result<Self> {
        let count = blocks.len();
        let mut wide = vec![0u64; 5 * count];
        let mut narrow = vec![0i32; 2 * count + 1];
        let (mut offset, mut programs) = (0usize, 0usize);
        for (i, (block, &n)) in blocks.iter().zip(sizes).enumerate() {
            wide[i] = triton::address::<f32>(block.after)?;
            wide[count + i] = triton::address::<f32>(block.before)?;
            if let Some(d) = &block.directions {
                wide[2 * count + i] = triton::address::<f32>(d)?;
                narrow[i] = triton::int(d.dims()[0])?;
            }
            wide[3 * count + i] = n as u64;
            wide[4 * count + i] = offset as u64;
            narrow[count + i] = triton::int(programs)?;
            offset += n;
            programs += triton::blocks(n, triton::BSFA_CHUNK)? as usize;
        }
        narrow[2 * count] = triton::int(programs)?;
        Ok(Self {
            wide: device.clone_htod(&wide)?,
            narrow: device.clone_htod(&narrow)?,
            blocks: count,
            programs,
            total: offset,
        })
    }
}

/// The projection of every block the tables name: the op's output is the blocks' updates, one
/// after another (its input only places it on the GPU); the parameters change in place.
struct ProjectAll {
    tables: Tables,
    alpha: f64,
    gamma: f64,
}

impl candle_core::CustomOp1 for ProjectAll {
    fn name(&self) -> &'static str {
        "bsfa-projection"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        bail!("bsfa's batched projection runs on a GPU only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        let device = s.device().clone();
        let load = |name| triton::load(&device, name, "fp32").map_err(candle_core::Error::Msg);
        let (coordinates, sum, apply) = (
            load("bsfa_coordinates")?,
            load("bsfa_coordinate_sum")?,
            load("bsfa_apply")?,
        );
        let t = &self.tables;
        let b = t.blocks;
        let table = |i: usize| t.wide.slice(i * b..(i + 1) * b);
        let (after, before, directions) = (table(0), table(1), table(2));
        let (numel, offset) = (table(3), table(4));
        let (rank, first) = (t.narrow.slice(0..b), t.narrow.slice(b..2 * b + 1));
        // SAFETY: the programs write every value of every block's update, every part and
        // every block's coordinates (rows beyond a block's directions as zeros).
        let update = unsafe { device.alloc::<f32>(t.total)? };
        let parts = unsafe { device.alloc::<f32>(t.programs * triton::BSFA_K)? };
        let coords = unsafe { device.alloc::<f32>(b * triton::BSFA_K)? };
        let (blocks, programs) = (triton::int(b)?, triton::blocks(t.programs, 1)?);
        let (scale, keep) = ((self.alpha - self.gamma) as f32, (self.gamma - 1.0) as f32);
        let null = 0u64;
        let stream = device.cuda_stream();
        launch!(stream, coordinates, coordinates.config((programs, 1, 1)),
            triton::BSFA_COORDINATES_PARAMS;
            after = &after, before = &before, directions = &directions, numel = &numel,
            offset = &offset, rank = &rank, first = &first, update = &update, parts = &parts,
            blocks = &blocks, scratch0 = &null, scratch1 = &null)
        .w()?;
        launch!(stream, sum, sum.config((triton::blocks(b, 1)?, 1, 1)),
            triton::BSFA_COORDINATE_SUM_PARAMS;
            parts = &parts, first = &first, coordinates = &coords, scale = &scale,
            scratch0 = &null, scratch1 = &null)
        .w()?;
        launch!(stream, apply, apply.config((programs, 1, 1)), triton::BSFA_APPLY_PARAMS;
            after = &after, directions = &directions, numel = &numel, offset = &offset,
            rank = &rank, first = &first, update = &update, coordinates = &coords,
            blocks = &blocks, gamma_minus_one = &keep, scratch0 = &null, scratch1 = &null)
        .w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(update, device),
            Shape::from(t.total),
        ))
    }
}
