//! The Bulk-Space-Filtration-Accelerator (BSFA) wrapper with the block-wise PCA projector
//! estimator (BPPE), the paper's Algorithms 1-3.
//!
//! Per parameter block (one tensor; embeddings and the output head excluded, as in the
//! paper), the wrapper keeps the last `history` updates of the base optimizer. Every
//! `interval` steps it re-estimates the block's dominant subspace as the top `rank`
//! principal components of that history, through the small Gram matrix and a symmetric
//! eigendecomposition (never a `p x p` matrix). Each update `v` of the base optimizer is then
//! replaced by `gamma * v + (alpha - gamma) * U (U^T v)`: scaled by `alpha` inside the
//! dominant subspace and by `gamma` in the bulk.
//!
//! With several data-parallel ranks the BSFA state is sharded (ZeRO-1 style): each block
//! belongs to one rank (blocks are dealt out by size, largest first, to the least-loaded
//! rank), which alone keeps its history and directions and projects its update; the
//! projected blocks are then broadcast from their owners. Every rank runs the same base
//! optimizer step, so BSFA memory per rank falls as 1 / ranks while the result stays the
//! one-rank result bit for bit.
//!
//! The history is centred before the PCA: PCA is the decomposition of variance, and
//! Proposition 1's signal is the oscillation of the dominant components (their sign flips
//! step to step) while bulk components drift steadily one way. Centring removes that drift,
//! so a large but steady bulk update cannot pass for a dominant direction.

use super::quant::{self, Quant4};
use super::BsfaConfig;
use super::{Optimizer, StateTensor};
use crate::dist::Communicator;
use crate::model::Param;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use rayon::prelude::*;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// A matrix BSFA keeps (`rows x numel`): in full precision, or 4-bit (`bsfa.bits = 4`,
/// see [`quant`]) and dequantized only when used.
enum Stored {
    Full(Tensor),
    Bits4 {
        q: Quant4,
        dtype: DType,
        device: candle_core::Device,
    },
}

impl Stored {
    /// Keeps `t` (`rows x numel`) at `bits` precision.
    fn keep(t: &Tensor, bits: usize) -> Result<Self> {
        if bits == 32 {
            return Ok(Self::Full(t.clone()));
        }
        let cols = t.dim(1)?;
        let values: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        Ok(Self::Bits4 {
            q: Quant4::quantize(&values, cols)?,
            dtype: t.dtype(),
            device: t.device().clone(),
        })
    }

    /// The matrix, `rows x numel`.
    fn matrix(&self) -> Result<Tensor> {
        match self {
            Self::Full(t) => Ok(t.clone()),
            Self::Bits4 { q, dtype, device } => {
                Ok(Tensor::from_vec(q.dequantize(), (q.rows, q.cols), device)?.to_dtype(*dtype)?)
            }
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Self::Full(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Self::Bits4 { q, .. } => q.bytes(),
        }
    }

    /// The rows of several matrices of one precision, as one matrix.
    fn stack(parts: &[&Stored]) -> Result<Self> {
        match parts.first() {
            Some(Self::Bits4 { dtype, device, .. }) => {
                let qs: Vec<&Quant4> = parts
                    .iter()
                    .filter_map(|s| match s {
                        Self::Bits4 { q, .. } => Some(q),
                        Self::Full(_) => None,
                    })
                    .collect();
                Ok(Self::Bits4 {
                    q: Quant4::concat(&qs)?,
                    dtype: *dtype,
                    device: device.clone(),
                })
            }
            _ => {
                let rows: Vec<Tensor> = parts.iter().map(|s| s.matrix()).collect::<Result<_>>()?;
                Ok(Self::Full(Tensor::cat(&rows, 0)?))
            }
        }
    }

    /// One matrix per row.
    fn into_rows(self) -> Result<Vec<Self>> {
        match self {
            Self::Full(t) => (0..t.dim(0)?)
                .map(|r| Ok(Self::Full(t.narrow(0, r, 1)?)))
                .collect(),
            Self::Bits4 { q, dtype, device } => Ok((0..q.rows)
                .map(|r| Self::Bits4 {
                    q: q.row(r),
                    dtype,
                    device: device.clone(),
                })
                .collect()),
        }
    }

    /// Checkpoint tensors under `key`: the matrix itself, or for 4-bit the four arrays of
    /// [`Quant4::to_tensors`] under `key.<suffix>`.
    fn tensors(&self, key: &str) -> Result<Vec<(String, Tensor)>> {
        match self {
            Self::Full(t) => Ok(vec![(key.to_string(), t.clone())]),
            Self::Bits4 { q, .. } => Ok(QUANT_SUFFIXES
                .iter()
                .zip(q.to_tensors()?)
                .map(|(suffix, t)| (format!("{key}.{suffix}"), t))
                .collect()),
        }
    }
}

/// Checkpoint suffixes of the four arrays of a 4-bit matrix.
const QUANT_SUFFIXES: [&str; 4] = ["codes", "scales", "zeros", "norms"];

/// Per-block BSFA state.
struct BlockState {
    /// The most recent base updates (`1 x numel` each), oldest first.
    history: VecDeque<Stored>,
    /// Estimated dominant directions as orthonormal rows (`rank x numel`), once estimated.
    directions: Option<Stored>,
}

/// BSFA around any base optimizer.
pub struct Bsfa {
    base: Box<dyn Optimizer>,
    config: BsfaConfig,
    /// Per parameter, in parameter order: `None` where BSFA does not apply or another rank
    /// owns the block.
    blocks: Vec<Option<BlockState>>,
    /// Per parameter: the rank that owns its BSFA state, `None` where BSFA does not apply.
    owners: Vec<Option<usize>>,
    comm: Arc<dyn Communicator>,
    names: Vec<String>,
    /// Elements per parameter, to check restored state against.
    numels: Vec<usize>,
    /// Element type and device per parameter, to restore 4-bit state to.
    kinds: Vec<(DType, candle_core::Device)>,
    steps: u64,
}

impl Bsfa {
    /// Wraps `base`; BSFA applies to the parameter groups listed in `config.blocks`, and
    /// this rank of `comm` keeps the state of the blocks [`owners`] gives it.
    pub fn new(
        base: Box<dyn Optimizer>,
        config: &BsfaConfig,
        params: &[Param],
        comm: Arc<dyn Communicator>,
    ) -> Result<Self> {
        let owners = owners(config, params, comm.world())?;
        let blocks = owners
            .iter()
            .map(|owner| {
                (*owner == Some(comm.rank())).then(|| BlockState {
                    history: VecDeque::with_capacity(config.history),
                    directions: None,
                })
            })
            .collect();
        Ok(Self {
            base,
            config: config.clone(),
            blocks,
            owners,
            comm,
            names: params.iter().map(|p| p.name.clone()).collect(),
            numels: params.iter().map(|p| p.var.elem_count()).collect(),
            kinds: params
                .iter()
                .map(|p| (p.var.dtype(), p.var.device().clone()))
                .collect(),
            steps: 0,
        })
    }
}

impl Bsfa {
    /// Whether this step projects: from the first re-estimation that had more updates
    /// than `rank` (the same on every rank, owner of a block or not).
    fn projects_at(&self, step: u64) -> bool {
        let (rank, history, interval) = (
            self.config.rank as u64,
            self.config.history as u64,
            self.config.interval as u64,
        );
        history > rank && step >= (rank / interval + 1) * interval
    }

    /// Broadcasts every rank's projected blocks to all ranks.
    fn share_projected(&self, params: &[Param]) -> Result<()> {
        for owner in 0..self.comm.world() {
            let mine: Vec<&Param> = params
                .iter()
                .zip(&self.owners)
                .filter(|(_, o)| **o == Some(owner))
                .map(|(p, _)| p)
                .collect();
            let Some(first) = mine.first() else { continue };
            let flat = if owner == self.comm.rank() {
                let parts: Vec<Tensor> = mine
                    .iter()
                    .map(|p| p.var.as_tensor().flatten_all())
                    .collect::<candle_core::Result<_>>()?;
                Tensor::cat(&parts, 0)?
            } else {
                let total = mine.iter().map(|p| p.var.elem_count()).sum::<usize>();
                Tensor::zeros(total, first.var.dtype(), first.var.device())?
            };
            let shared = self.comm.broadcast(&flat, owner)?;
            if owner == self.comm.rank() {
                continue;
            }
            let mut offset = 0;
            for p in mine {
                let n = p.var.elem_count();
                p.var
                    .set(&shared.narrow(0, offset, n)?.reshape(p.var.shape())?)?;
                offset += n;
            }
        }
        Ok(())
    }

    /// The parameter index of a BSFA state key (`<param>.bsfa_<slot>[.<part>]`).
    fn block_of(&self, key: &str) -> Option<usize> {
        let (name, _) = key.split_once(".bsfa_")?;
        self.names.iter().position(|n| n == name)
    }
}

/// The rank that owns each parameter's BSFA state (`None` where BSFA does not apply): the
/// blocks, largest first (ties by position), each to the rank holding the fewest elements so
/// far (ties to the lowest rank). The same on every rank.
pub fn owners(config: &BsfaConfig, params: &[Param], world: usize) -> Result<Vec<Option<usize>>> {
    let groups = config.groups();
    let mut order: Vec<usize> = (0..params.len())
        .filter(|&i| groups.contains(&params[i].group))
        .collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(params[i].var.elem_count()), i));
    let mut load = vec![0usize; world.max(1)];
    let mut owners = vec![None; params.len()];
    for i in order {
        let rank = (0..load.len())
            .min_by_key(|&r| (load[r], r))
            .expect("at least one rank");
        load[rank] += params[i].var.elem_count();
        owners[i] = Some(rank);
    }
    Ok(owners)
}

/// Top `rank` principal directions of `history` (`m x n`, one update per row), centred, as
/// orthonormal rows (`rank x n`). Through the `m x m` Gram matrix: with `H` centred and
/// `H H^T = W L W^T`, the directions are `L^-1/2 W^T H`. Directions whose variance is
/// negligible against the largest are dropped, so fewer than `rank` rows may come back.
pub fn top_directions(history: &Tensor, rank: usize) -> Result<Tensor> {
    let (m, _) = history.dims2()?;
    let dtype = history.dtype();
    // The two large products run in the history's precision (f32 in training); the small
    // eigenproblem in f64.
    let centred = centre_rows(history)?;
    let gram: Vec<f64> = centred
        .matmul(&centred.t()?)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1()?;
    let centred_gram = nalgebra::DMatrix::from_row_slice(m, m, &gram);
    let eigen = centred_gram.symmetric_eigen();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| eigen.eigenvalues[b].total_cmp(&eigen.eigenvalues[a]));
    let largest = eigen.eigenvalues[order[0]].max(0.0);
    let mut coefficients = Vec::with_capacity(rank * m);
    let mut kept = 0;
    for &i in order.iter().take(rank) {
        let lambda = eigen.eigenvalues[i];
        if lambda.is_nan() || lambda <= largest * 1e-12 {
            break;
        }
        let scale = 1.0 / lambda.sqrt();
        coefficients.extend((0..m).map(|j| eigen.eigenvectors[(j, i)] * scale));
        kept += 1;
    }
    if kept == 0 {
        bail!("bsfa: the update history has no variance to estimate directions from");
    }
    let coefficients =
        Tensor::from_vec(coefficients, (kept, m), history.device())?.to_dtype(dtype)?;
    Ok(coefficients.matmul(&centred)?)
}

/// `H - 1 mu^T`: every row minus the mean row. On the CPU in f32 a parallel pass (candle's
/// broadcast subtraction took half of a re-estimation), elsewhere tensor ops.
fn centre_rows(history: &Tensor) -> Result<Tensor> {
    let (m, n) = history.dims2()?;
    let fast = with_cpu_f32(history, |h| {
        let mut out = h.to_vec();
        // Column means over the rows, then subtraction, in column chunks.
        let mut mean = vec![0.0f32; n];
        mean.par_chunks_mut(PROJECT_CHUNK)
            .enumerate()
            .for_each(|(c, mean)| {
                let (start, len) = (c * PROJECT_CHUNK, mean.len());
                for row in h.chunks_exact(n) {
                    for (acc, x) in mean.iter_mut().zip(&row[start..start + len]) {
                        *acc += x;
                    }
                }
                for acc in mean.iter_mut() {
                    *acc /= m as f32;
                }
            });
        out.par_chunks_mut(n).for_each(|row| {
            for (x, mu) in row.iter_mut().zip(&mean) {
                *x -= mu;
            }
        });
        out
    });
    match fast {
        Some(values) => Ok(Tensor::from_vec(values, (m, n), history.device())?),
        None => Ok(history.broadcast_sub(&history.mean_keepdim(0)?)?),
    }
}

/// `gamma * v + (alpha - gamma) * U^T (U v)` for a flat update `v` and orthonormal rows `U`.
pub fn project(v: &Tensor, directions: &Tensor, alpha: f64, gamma: f64) -> Result<Tensor> {
    Ok(((v * gamma)? + (dominant_part(v, directions)? * (alpha - gamma))?)?)
}

/// `U^T (U v)`: the part of `v` inside the span of the rows of `U`.
fn dominant_part(v: &Tensor, directions: &Tensor) -> Result<Tensor> {
    let coordinates = directions.matmul(&v.unsqueeze(1)?)?;
    Ok(directions.t()?.matmul(&coordinates)?.squeeze(1)?)
}

/// A parameter before the base step.
enum Before {
    CpuF32(Vec<f32>),
    Tensor(Tensor),
}

/// Runs `f` on the contiguous f32 data of a CPU tensor (None for other devices, types or
/// layouts).
fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => {
            let data = cpu.as_slice::<f32>().ok()?;
            let (start, end) = layout.contiguous_offsets()?;
            Some(f(&data[start..end]))
        }
        _ => None,
    }
}

/// Directions as the CPU kernel reads them: f32 rows, or 4-bit rows.
enum RowsRef<'a> {
    Full(&'a [f32]),
    Bits4(&'a Quant4),
}

impl RowsRef<'_> {
    fn count(&self, n: usize) -> usize {
        match self {
            Self::Full(u) => u.len() / n,
            Self::Bits4(q) => q.rows,
        }
    }
}

/// Columns per parallel chunk of the projection (a multiple of the 4-bit group).
const PROJECT_CHUNK: usize = 64 * quant::GROUP;

/// `theta += (gamma - 1) v + (alpha - gamma) U^T (U v)` for orthonormal rows `U`.
fn project_cpu(theta: &mut [f32], v: &[f32], rows: &RowsRef, alpha: f64, gamma: f64) {
    let (alpha, gamma) = (alpha as f32, gamma as f32);
    let n = v.len();
    let k = rows.count(n);
    let coords: Vec<f32> = (0..k)
        .into_par_iter()
        .map(|j| match rows {
            RowsRef::Full(u) => dot(&u[j * n..(j + 1) * n], v),
            RowsRef::Bits4(q) => q.dot_row(j, v),
        })
        .collect();
    let (a, b) = (gamma - 1.0, alpha - gamma);
    theta
        .par_chunks_mut(PROJECT_CHUNK)
        .zip(v.par_chunks(PROJECT_CHUNK))
        .enumerate()
        .for_each(|(c, (theta, v))| {
            let start = c * PROJECT_CHUNK;
            let mut dominant = vec![0.0f32; theta.len()];
            for (j, &coord) in coords.iter().enumerate() {
                match rows {
                    RowsRef::Full(u) => {
                        let row = &u[j * n + start..j * n + start + theta.len()];
                        for (d, x) in dominant.iter_mut().zip(row) {
                            *d += coord * x;
                        }
                    }
                    RowsRef::Bits4(q) => q.add_row(j, coord, start, &mut dominant),
                }
            }
            for ((t, v), d) in theta.iter_mut().zip(v).zip(dominant) {
                *t += a * v + b * d;
            }
        });
}

/// A dot product with eight independent partial sums (vectorisable, fixed order).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

impl Optimizer for Bsfa {
    /// Algorithm 1: the base step, then the projection of its update in every BSFA block,
    /// re-estimating the projectors every `interval` steps from the updates so far.
    fn step(&mut self, params: &[Param], grads: &[Tensor], lr: f64, grad_scale: f64) -> Result<()> {
        // The parameters before the base step: the update is the difference. f32 data on the
        // CPU takes the fused path; anything else candle tensor ops.
        let before: Vec<Option<Before>> = params
            .iter()
            .zip(&self.blocks)
            .map(|(p, b)| {
                b.as_ref()
                    .map(|_| {
                        let t = p.var.as_tensor();
                        match with_cpu_f32(t, <[f32]>::to_vec) {
                            Some(values) => Ok(Before::CpuF32(values)),
                            None => Ok(Before::Tensor(t.flatten_all()?.copy()?)),
                        }
                    })
                    .transpose()
            })
            .collect::<Result<_>>()?;
        self.base.step(params, grads, lr, grad_scale)?;
        let refresh = self.steps > 0 && self.steps.is_multiple_of(self.config.interval as u64);
        let (alpha, gamma, bits) = (self.config.alpha, self.config.gamma, self.config.bits);
        for ((param, block), before) in params.iter().zip(&mut self.blocks).zip(before) {
            let (Some(block), Some(before)) = (block, before) else {
                continue;
            };
            if refresh && block.history.len() > self.config.rank {
                let history: Vec<&Stored> = block.history.iter().collect();
                let history = Stored::stack(&history)?.matrix()?;
                let directions = top_directions(&history, self.config.rank)?;
                block.directions = Some(Stored::keep(&directions, bits)?);
            }
            let after = param.var.as_tensor();
            let update = match before {
                // One pass for the update, one for U v, one for the projection; 4-bit
                // directions are read without being dequantized.
                Before::CpuF32(before) => {
                    let moved = "bsfa: the base optimizer changed the parameter's type";
                    let v: Vec<f32> = with_cpu_f32(after, |a| {
                        a.iter().zip(&before).map(|(a, b)| a - b).collect()
                    })
                    .context(moved)?;
                    // The projected parameter, copied out only when there is a projection.
                    let projected = |rows: &RowsRef| -> Result<Tensor> {
                        let mut theta = with_cpu_f32(after, <[f32]>::to_vec).context(moved)?;
                        project_cpu(&mut theta, &v, rows, alpha, gamma);
                        Ok(Tensor::from_vec(theta, after.shape(), after.device())?)
                    };
                    match &block.directions {
                        Some(Stored::Full(u)) => {
                            let theta = with_cpu_f32(u, |u| projected(&RowsRef::Full(u)))
                                .context("bsfa: directions are not f32 on the CPU")??;
                            param.var.set(&theta)?;
                        }
                        Some(Stored::Bits4 { q, .. }) => {
                            param.var.set(&projected(&RowsRef::Bits4(q))?)?;
                        }
                        None => {}
                    }
                    Tensor::from_vec(v, after.elem_count(), after.device())?
                }
                Before::Tensor(before) => {
                    let update = (after.flatten_all()? - &before)?;
                    if let Some(directions) = &block.directions {
                        let directions = directions.matrix()?;
                        // theta + (gamma - 1) v + (alpha - gamma) U^T U v: exactly the base
                        // step when alpha = gamma = 1.
                        let correction = ((&update * (gamma - 1.0))?
                            + (dominant_part(&update, &directions)? * (alpha - gamma))?)?;
                        param
                            .var
                            .set(&(after + correction.reshape(after.shape())?)?)?;
                    }
                    update
                }
            };
            if block.history.len() == self.config.history {
                block.history.pop_front();
            }
            block
                .history
                .push_back(Stored::keep(&update.unsqueeze(0)?, bits)?);
        }
        if self.comm.world() > 1 && self.projects_at(self.steps) {
            self.share_projected(params)?;
        }
        self.steps += 1;
        Ok(())
    }

    fn steps_taken(&self) -> u64 {
        self.steps
    }

    /// The base optimizer's state, which every rank holds alike.
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        self.base.state()
    }

    /// The blocks this rank owns. Full precision: `<p>.bsfa_history` (`rows x numel`, oldest
    /// first) and `<p>.bsfa_directions` (`rank x numel`). 4-bit: each as four tensors with
    /// the suffixes `.codes`, `.scales`, `.zeros`, `.norms` (see [`Quant4::to_tensors`]).
    fn shard_state(&self) -> Result<Vec<(String, StateTensor)>> {
        let mut out = self.base.shard_state()?;
        let whole = |tensors: Vec<(String, Tensor)>| {
            tensors
                .into_iter()
                .map(|(key, t)| (key, StateTensor::Whole(t)))
        };
        for (name, block) in self.names.iter().zip(&self.blocks) {
            let Some(block) = block else { continue };
            let key = format!("{name}.bsfa_history");
            let full: Option<Vec<Tensor>> = block
                .history
                .iter()
                .map(|s| match s {
                    Stored::Full(t) => Some(t.clone()),
                    Stored::Bits4 { .. } => None,
                })
                .collect();
            match full {
                // f32 history: its rows are joined only while the file is written.
                Some(rows) if !rows.is_empty() => out.push((key, StateTensor::rows(rows)?)),
                Some(_) => {}
                None => {
                    let history: Vec<&Stored> = block.history.iter().collect();
                    out.extend(whole(Stored::stack(&history)?.tensors(&key)?));
                }
            }
            if let Some(directions) = &block.directions {
                out.extend(whole(
                    directions.tensors(&format!("{name}.bsfa_directions"))?,
                ));
            }
        }
        Ok(out)
    }

    fn wants_state(&self, key: &str) -> bool {
        match self.block_of(key) {
            Some(i) => self.blocks[i].is_some(),
            None => self.base.wants_state(key),
        }
    }

    fn load_state(&mut self, steps_taken: u64, state: &HashMap<String, Tensor>) -> Result<()> {
        self.base.load_state(steps_taken, state)?;
        let bits = self.config.bits;
        for (((name, block), numel), (dtype, device)) in self
            .names
            .iter()
            .zip(&mut self.blocks)
            .zip(&self.numels)
            .zip(&self.kinds)
        {
            let Some(block) = block else { continue };
            // One state matrix: at most `max_rows` rows of one flattened parameter.
            let read = |slot: &str, max_rows: usize| -> Result<Option<Stored>> {
                let key = format!("{name}.{slot}");
                let hint = if slot == "bsfa_history" {
                    "history"
                } else {
                    "rank"
                };
                if bits == 32 {
                    let Some(t) = state.get(&key) else {
                        return Ok(None);
                    };
                    return match t.dims() {
                        &[rows, cols] if rows <= max_rows && cols == *numel => {
                            Ok(Some(Stored::Full(t.to_dtype(*dtype)?)))
                        }
                        dims => bail!(
                            "optimizer state '{key}' has shape {dims:?}, expected at most \
                             {max_rows} rows of {numel} (bsfa.{hint} or bsfa.bits changed?)"
                        ),
                    };
                }
                let parts: Vec<Option<&Tensor>> = QUANT_SUFFIXES
                    .iter()
                    .map(|s| state.get(&format!("{key}.{s}")))
                    .collect();
                let [Some(codes), Some(scales), Some(zeros), Some(norms)] = parts[..] else {
                    if state.contains_key(&key) {
                        bail!("optimizer state '{key}' is full precision but bsfa.bits = 4");
                    }
                    return Ok(None);
                };
                let q = Quant4::from_tensors([codes, scales, zeros, norms], *numel)
                    .with_context(|| format!("optimizer state '{key}'"))?;
                if q.rows > max_rows {
                    bail!(
                        "optimizer state '{key}' has {} rows, expected at most {max_rows} \
                         (bsfa.{hint} changed?)",
                        q.rows
                    );
                }
                Ok(Some(Stored::Bits4 {
                    q,
                    dtype: *dtype,
                    device: device.clone(),
                }))
            };
            block.history = match read("bsfa_history", self.config.history)? {
                Some(history) => history.into_rows()?.into(),
                None => VecDeque::new(),
            };
            block.directions = read("bsfa_directions", self.config.rank)?;
        }
        self.steps = steps_taken;
        Ok(())
    }

    fn state_bytes(&self) -> usize {
        let own: usize = self
            .blocks
            .iter()
            .flatten()
            .flat_map(|b| b.history.iter().chain(&b.directions))
            .map(Stored::bytes)
            .sum();
        self.base.state_bytes() + own
    }
}

/// Bytes BSFA holds once its history is full: `history + rank` rows per covered block, in
/// the parameters' precision or, with `bits = 4`, in 4-bit form.
pub fn steady_state_bytes(config: &BsfaConfig, params: &[Param]) -> Result<usize> {
    Ok(steady_state_bytes_per_rank(config, params, 1)?[0])
}

/// [`steady_state_bytes`] of each rank when `world` ranks share the state.
pub fn steady_state_bytes_per_rank(
    config: &BsfaConfig,
    params: &[Param],
    world: usize,
) -> Result<Vec<usize>> {
    let mut bytes = vec![0; world.max(1)];
    for (p, owner) in params.iter().zip(owners(config, params, world)?) {
        let Some(owner) = owner else { continue };
        let n = p.var.elem_count();
        let row = if config.bits == 4 {
            quant::row_bytes(n)
        } else {
            n * p.var.dtype().size_in_bytes()
        };
        bytes[owner] += (config.history + config.rank) * row;
    }
    Ok(bytes)
}

/// Which parameter groups BSFA applies to, from `bsfa.blocks`.

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn random(rows: usize, cols: usize, seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// The fused CPU paths agree with the tensor-op definitions they replace.
    #[test]
    fn cpu_kernels_match_the_tensor_definitions() {
        let n = 2 * PROJECT_CHUNK + 77;
        let h = random(9, n, 1);
        let by_definition = h.broadcast_sub(&h.mean_keepdim(0).unwrap()).unwrap();
        assert!(max_diff(&centre_rows(&h).unwrap(), &by_definition) < 1e-6);

        let u = top_directions(&h, 5).unwrap();
        let v = random(1, n, 2).squeeze(0).unwrap();
        let theta = random(1, n, 3).squeeze(0).unwrap();
        let (alpha, gamma) = (0.5, 3.0);
        // theta + (gamma - 1) v + (alpha - gamma) U^T U v = theta - v + project(v).
        let expected = ((&theta - &v).unwrap() + project(&v, &u, alpha, gamma).unwrap()).unwrap();
        let mut fused: Vec<f32> = theta.to_vec1().unwrap();
        let v_values: Vec<f32> = v.to_vec1().unwrap();
        let u_values: Vec<f32> = u.flatten_all().unwrap().to_vec1().unwrap();
        project_cpu(
            &mut fused,
            &v_values,
            &RowsRef::Full(&u_values),
            alpha,
            gamma,
        );
        let fused = Tensor::from_vec(fused, n, &Device::Cpu).unwrap();
        assert!(max_diff(&fused, &expected) < 1e-5);

        // 4-bit directions read in place equal the dequantized directions.
        let q = Quant4::quantize(&u_values, n).unwrap();
        let dequantized = Tensor::from_vec(q.dequantize(), (5, n), &Device::Cpu).unwrap();
        let expected =
            ((&theta - &v).unwrap() + project(&v, &dequantized, alpha, gamma).unwrap()).unwrap();
        let mut fused: Vec<f32> = theta.to_vec1().unwrap();
        project_cpu(&mut fused, &v_values, &RowsRef::Bits4(&q), alpha, gamma);
        let fused = Tensor::from_vec(fused, n, &Device::Cpu).unwrap();
        assert!(max_diff(&fused, &expected) < 1e-5);
    }
}
