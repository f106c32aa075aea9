//! The projection of a block's update onto its directions: the update `v` (`numel` values,
//! flat) becomes `gamma * v + (alpha - gamma) * U^T (U v)` for the directions `U` (`k x
//! numel`, orthonormal rows). Applied to a parameter that already took the base step (`theta
//! + v`), that is `theta += (gamma - 1) v + (alpha - gamma) U^T (U v)`.
//!
//! Two paths: f32 parameters on the CPU take a fused rayon kernel that reads f32 or 4-bit
//! directions in place, in column chunks; anything else (a CUDA tensor, another type, or
//! every tensor under `train.kernels = reference`) takes candle tensor ops on dequantized
//! directions.

use super::cpu::{with_cpu_f32, CHUNK};
use super::quant::Quant4;
use super::state::Stored;
use crate::cpu_kernels::fusable;
use crate::model::Param;
use anyhow::{Context, Result};
use candle_core::{Tensor, Var};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
#[path = "projection_cuda.rs"]
mod cuda;

/// `gamma * v + (alpha - gamma) * U^T (U v)` for a flat update `v` and orthonormal rows `U`.
pub fn project(v: &Tensor, directions: &Tensor, alpha: f64, gamma: f64) -> Result<Tensor> {
    Ok(((v * gamma)? + dominant_part(v, directions, alpha - gamma)?)?)
}

/// `scale U^T (U v)`: the part of `v` inside the span of the rows of `U`, scaled. The scale
/// multiplies the `k` coordinates, not the `numel` values (one pass less over the block).
fn dominant_part(v: &Tensor, directions: &Tensor, scale: f64) -> Result<Tensor> {
    let coordinates = (directions.matmul(&v.unsqueeze(1)?)? * scale)?;
    Ok(directions.t()?.matmul(&coordinates)?.squeeze(1)?)
}

/// A block's parameter before the base step, to take its update from: the f32 values of a
/// CPU tensor (the fused path), or a flat copy of any other.
pub(super) enum Before {
    CpuF32(Vec<f32>),
    Tensor(Tensor),
}

impl Before {
    /// Copies `param` as it is now. The choice of path is made here, once per step: under
    /// `train.kernels = reference` no tensor is fusable and every block takes the tensor
    /// path, as on a GPU.
    pub(super) fn of(param: &Tensor) -> Result<Self> {
        let fast = fusable(param)
            .then(|| with_cpu_f32(param, <[f32]>::to_vec))
            .flatten();
        match fast {
            Some(values) => Ok(Self::CpuF32(values)),
            None => Ok(Self::Tensor(param.flatten_all()?.copy()?)),
        }
    }
}

/// Projects at once, on their GPU, every block the batched kernels take (`projection_cuda.rs`:
/// a whole f32 tensor whose `before` is a tensor copy, with at most `BSFA_K` f32 directions,
/// once their self-check passed there), as [`project_update`] would one by one. Takes those
/// blocks' `before` and returns their indices with their updates (flat); the other blocks are
/// left for [`project_update`] and [`project_update_chunked`]. Takes none on a CPU-only build.
#[cfg(feature = "cuda")]
pub(super) fn project_batched(
    params: &[Param],
    directions: &[Option<&Stored>],
    chunks: &[usize],
    before: &mut [Option<Before>],
    alpha: f64,
    gamma: f64,
) -> Result<Vec<(usize, Tensor)>> {
    // (index, the copy before the step, the directions) of every block the kernels take.
    let mut chosen = Vec::new();
    for (i, ((param, stored), &chunk)) in params.iter().zip(directions).zip(chunks).enumerate() {
        let after = param.var.as_tensor();
        let whole = chunk == after.elem_count() && after.is_contiguous();
        // The parameter is asked first: 4-bit directions are decoded only for a block the
        // kernels may take (under `train.kernels = reference` none).
        if !matches!(before[i], Some(Before::Tensor(_))) || !whole || !cuda::applies(after) {
            continue;
        }
        let directions = match stored {
            Some(stored) => Some(stored.matrix()?.contiguous()?),
            None => None,
        };
        if !directions.as_ref().is_none_or(cuda::fits) {
            continue;
        }
        if let Some(Before::Tensor(copy)) = before[i].take() {
            chosen.push((i, copy, directions));
        }
    }
    let batch: Vec<cuda::Block> = chosen
        .iter()
        .map(|(i, before, directions)| cuda::Block {
            after: params[*i].var.as_tensor(),
            before,
            directions: directions.clone(),
        })
        .collect();
    let updates = cuda::project_all(&batch, alpha, gamma)?;
    Ok(chosen.into_iter().map(|(i, ..)| i).zip(updates).collect())
}

/// [`project_batched`] on a CPU-only build: no block is taken.
#[cfg(not(feature = "cuda"))]
pub(super) fn project_batched(
    _: &[Param],
    _: &[Option<&Stored>],
    _: &[usize],
    _: &mut [Option<Before>],
    _: f64,
    _: f64,
) -> Result<Vec<(usize, Tensor)>> {
    Ok(Vec::new())
}

/// One step's projection of whole-tensor blocks as a run takes it (the GPU's batched kernels,
/// the CPU's fused kernel, or the tensor ops, as the device and `train.kernels` decide): each
/// of `params` moved from `before` by the base step is projected in place on its
/// `directions` (`k x numel`, orthonormal rows). Returns the updates. For `bench --kernels`.
pub fn project_blocks(
    params: &[Param],
    before: &[Tensor],
    directions: &[Tensor],
    alpha: f64,
    gamma: f64,
) -> Result<Vec<Tensor>> {
    let stored: Vec<Stored> = directions.iter().cloned().map(Stored::Full).collect();
    let stored: Vec<Option<&Stored>> = stored.iter().map(Some).collect();
    let chunks: Vec<usize> = params.iter().map(|p| p.var.elem_count()).collect();
    let mut before = before
        .iter()
        .map(|b| Before::of(b).map(Some))
        .collect::<Result<Vec<_>>>()?;
    let mut updates: Vec<Option<Tensor>> = vec![None; params.len()];
    for (i, update) in project_batched(params, &stored, &chunks, &mut before, alpha, gamma)? {
        updates[i] = Some(update);
    }
    for (i, (param, before)) in params.iter().zip(before).enumerate() {
        if let Some(before) = before {
            updates[i] = Some(project_update(&param.var, before, stored[i], alpha, gamma)?);
        }
    }
    updates
        .into_iter()
        .map(|u| u.context("bsfa: a block was not projected"))
        .collect()
}

/// Takes the update of `param` since `before` (the base step) and, given directions, projects
/// it in place. Returns the update as the base optimizer made it (flat), for the history.
pub(super) fn project_update(
    param: &Var,
    before: Before,
    directions: Option<&Stored>,
    alpha: f64,
    gamma: f64,
) -> Result<Tensor> {
    let after = param.as_tensor();
    Ok(match before {
        // One pass for the update, one for U v, one for the projection; 4-bit directions are
        // read without being dequantized.
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
            match directions {
                Some(Stored::Bits4 { q, .. }) => {
                    param.set(&projected(&RowsRef::Bits4(q))?)?;
                }
                Some(stored) => {
                    let u = stored.matrix()?;
                    let theta = with_cpu_f32(&u, |u| projected(&RowsRef::Full(u)))
                        .context("bsfa: directions are not f32 on the CPU")??;
                    param.set(&theta)?;
                }
                None => {}
            }
            Tensor::from_vec(v, after.elem_count(), after.device())?
        }
        Before::Tensor(before) => {
            let update = (after.flatten_all()? - &before)?;
            if let Some(directions) = directions {
                let directions = directions.matrix()?;
                // theta + (gamma - 1) v + (alpha - gamma) U^T U v: exactly the base step when
                // alpha = gamma = 1.
                let correction = ((&update * (gamma - 1.0))?
                    + dominant_part(&update, &directions, alpha - gamma)?)?;
                param.set(&(after + correction.reshape(after.shape())?)?)?;
            }
            update
        }
    })
}

/// [`project_update`] for a parameter of several blocks of `chunk` elements
/// (`bsfa.partition = adam-mini`), its directions laid out as `pca::estimate_chunked` gives
/// them (row `j` holds every block's `j`-th direction in the block's columns, zeros where a
/// block has fewer): each block's part of the update is projected on its own directions.
/// Tensor ops on every device.
pub(super) fn project_update_chunked(
    param: &Var,
    before: Before,
    directions: Option<&Stored>,
    alpha: f64,
    gamma: f64,
    chunk: usize,
) -> Result<Tensor> {
    let after = param.as_tensor();
    let before = match before {
        Before::CpuF32(values) => Tensor::from_vec(values, after.elem_count(), after.device())?,
        Before::Tensor(t) => t,
    };
    let update = (after.flatten_all()? - &before)?;
    if let Some(directions) = directions {
        let u = directions.matrix()?;
        let (k, blocks) = (u.dim(0)?, update.elem_count() / chunk);
        let u = u.reshape((k, blocks, chunk))?;
        // Per block, its coordinates in its directions (`k x blocks x 1`), then their sum.
        let coordinates = u
            .broadcast_mul(&update.reshape((1, blocks, chunk))?)?
            .sum_keepdim(2)?;
        let dominant = u.broadcast_mul(&coordinates)?.sum(0)?.flatten_all()?;
        let correction = ((&update * (gamma - 1.0))? + (dominant * (alpha - gamma))?)?;
        param.set(&(after + correction.reshape(after.shape())?)?)?;
    }
    Ok(update)
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
        .par_chunks_mut(CHUNK)
        .zip(v.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(c, (theta, v))| {
            let start = c * CHUNK;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::bsfa::test_tensors::{max_diff, random};
    use crate::optim::bsfa::top_directions;
    use candle_core::Device;

    /// The fused CPU kernel agrees with the tensor-op definition it replaces, for f32 and for
    /// 4-bit directions.
    #[test]
    fn cpu_kernel_matches_the_tensor_definition() {
        let n = 2 * CHUNK + 77;
        let u = top_directions(&random(9, n, 1), 5).unwrap().unwrap();
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
