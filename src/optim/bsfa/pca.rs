//! The PCA of a block's update history (the paper's BPPE estimator): its top principal
//! directions through the small Gram matrix and a symmetric eigendecomposition, never a
//! `numel x numel` matrix. Layout: the history is `m x numel` (one update per row), the
//! directions `k x numel` (orthonormal rows, `k <= rank`).
//!
//! The history is centred before the PCA: PCA is the decomposition of variance, and
//! Proposition 1's signal is the oscillation of the dominant components (their sign flips
//! step to step) while bulk components drift steadily one way. Centring removes that drift,
//! so a large but steady bulk update cannot pass for a dominant direction.

use super::cpu::{with_cpu_f32, CHUNK};
use super::diagnostics::overlap;
use crate::cpu_kernels::fusable;
use anyhow::Result;
use candle_core::{DType, Tensor};
use rayon::prelude::*;

/// Top `rank` principal directions of `history` (`m x n`, one update per row), centred, as
/// orthonormal rows (`k x n`, `k <= rank`). Through the `m x m` Gram matrix: with `H`
/// centred and `H H^T = W L W^T`, the directions are `L^-1/2 W^T H`.
///
/// Eigenvalues at or below the Gram matrix's rounding noise give no direction: their
/// eigenvectors are noise, and `L^-1/2` would blow that noise up into rows that are not
/// orthonormal. The floor is `m * eps * trace(G)` for the history's precision `eps`: each
/// Gram entry `h_i . h_j` is rounded to about `eps |h_i| |h_j|`, so the rounding error
/// matrix has a norm of at most about `eps * trace(G)`; the factor `m` is margin (in f32 the
/// noise eigenvalues of rank-deficient histories measure 1e-8 of the trace, the floor at
/// m = 60 is 7e-6). So a rank-deficient history yields fewer than `rank` rows, and one
/// with no variance at all (a frozen or constant block) yields `None`: no directions, the
/// identity projection.
pub fn top_directions(history: &Tensor, rank: usize) -> Result<Option<Tensor>> {
    Ok(estimate(history, rank)?.directions)
}

/// The directions [`top_directions`] gives, and the fraction of the centred history's
/// variance they capture.
pub struct Estimate {
    /// Orthonormal rows (`k x n`), or `None` for a history without variance.
    pub directions: Option<Tensor>,
    /// Their eigenvalues over the Gram matrix's trace (0 without variance).
    pub energy: f64,
}

/// [`top_directions`] with the variance they capture.
pub fn estimate(history: &Tensor, rank: usize) -> Result<Estimate> {
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
    let trace = centred_gram.trace();
    let floor = m as f64 * epsilon(dtype) * trace;
    let eigen = centred_gram.symmetric_eigen();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| eigen.eigenvalues[b].total_cmp(&eigen.eigenvalues[a]));
    let mut coefficients = Vec::with_capacity(rank * m);
    let (mut kept, mut captured) = (0, 0.0);
    for &i in order.iter().take(rank) {
        let lambda = eigen.eigenvalues[i];
        if lambda.is_nan() || lambda <= floor {
            break;
        }
        let scale = 1.0 / lambda.sqrt();
        coefficients.extend((0..m).map(|j| eigen.eigenvectors[(j, i)] * scale));
        kept += 1;
        captured += lambda;
    }
    if kept == 0 {
        return Ok(Estimate {
            directions: None,
            energy: 0.0,
        });
    }
    let coefficients =
        Tensor::from_vec(coefficients, (kept, m), history.device())?.to_dtype(dtype)?;
    Ok(Estimate {
        directions: Some(coefficients.matmul(&centred)?),
        energy: captured / trace,
    })
}

/// [`estimate`] for each block of `chunk` columns of `history` (`m x n`, `n` a multiple of
/// `chunk`; `bsfa.partition = adam-mini`) on its own, each block's variance captured,
/// overlap with its columns of the previous directions `old` and directions kept reported
/// to `found`. The directions come back as one `k x n` matrix, `k` the most any block kept:
/// row `j` holds, in each block's columns, that block's `j`-th direction, or zeros where it
/// kept fewer (`None` when no block has any).
pub(super) fn estimate_chunked(
    history: &Tensor,
    rank: usize,
    chunk: usize,
    old: Option<&Tensor>,
    found: &mut impl FnMut(f64, Option<f64>, usize),
) -> Result<Option<Tensor>> {
    let (_, n) = history.dims2()?;
    let mut parts = Vec::with_capacity(n / chunk);
    for start in (0..n).step_by(chunk) {
        let estimate = estimate(&history.narrow(1, start, chunk)?.contiguous()?, rank)?;
        let kept = estimate.directions.as_ref().map_or(Ok(0), |d| d.dim(0))?;
        let overlap = match (old, &estimate.directions) {
            (Some(old), Some(new)) => nonzero_rows(&old.narrow(1, start, chunk)?)?
                .map(|old| overlap(&old, new))
                .transpose()?,
            _ => None,
        };
        found(estimate.energy, overlap, kept);
        parts.push(estimate.directions);
    }
    let k = parts.iter().flatten().map(|d| d.dim(0).unwrap_or(0)).max();
    let Some(k) = k.filter(|&k| k > 0) else {
        return Ok(None);
    };
    let (dtype, device) = (history.dtype(), history.device());
    let padded = parts
        .into_iter()
        .map(|d| -> Result<Tensor> {
            let rows = d.as_ref().map_or(Ok(0), |d| d.dim(0))?;
            let zeros = Tensor::zeros((k - rows, chunk), dtype, device)?;
            Ok(match d {
                Some(d) if rows == k => d,
                Some(d) => Tensor::cat(&[&d, &zeros], 0)?,
                None => zeros,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(Tensor::cat(&padded, 1)?))
}

/// The rows of `block` that are directions (unit length), without the zero rows that pad a
/// block with fewer directions; `None` when there are none.
fn nonzero_rows(block: &Tensor) -> Result<Option<Tensor>> {
    let norms: Vec<f64> = block.to_dtype(DType::F64)?.sqr()?.sum(1)?.to_vec1()?;
    let rows: Vec<u32> = (0..norms.len() as u32)
        .filter(|&i| norms[i as usize] > 0.5)
        .collect();
    if rows.is_empty() {
        return Ok(None);
    }
    let index = Tensor::new(rows.as_slice(), block.device())?;
    Ok(Some(block.contiguous()?.index_select(&index, 0)?))
}

/// The relative rounding error of `dtype` (machine epsilon).
fn epsilon(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::EPSILON,
        DType::F16 => 2f64.powi(-10),
        DType::BF16 => 2f64.powi(-7),
        _ => f32::EPSILON as f64,
    }
}

/// `H - 1 mu^T`: every row minus the mean row. On the CPU in f32 a parallel pass (candle's
/// broadcast subtraction took half of a re-estimation), elsewhere tensor ops.
fn centre_rows(history: &Tensor) -> Result<Tensor> {
    let (m, n) = history.dims2()?;
    // Under `train.kernels = reference` the tensor ops a GPU runs, on the CPU too.
    let fast = fusable(history).then(|| {
        with_cpu_f32(history, |h| {
            let mut out = h.to_vec();
            // Column means over the rows, then subtraction, in column chunks.
            let mut mean = vec![0.0f32; n];
            mean.par_chunks_mut(CHUNK)
                .enumerate()
                .for_each(|(c, mean)| {
                    let (start, len) = (c * CHUNK, mean.len());
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
        })
    });
    match fast.flatten() {
        Some(values) => Ok(Tensor::from_vec(values, (m, n), history.device())?),
        None => Ok(history.broadcast_sub(&history.mean_keepdim(0)?)?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::bsfa::test_tensors::{max_diff, random};

    /// The fused CPU centring agrees with the tensor-op definition it replaces.
    #[test]
    fn cpu_centring_matches_the_tensor_definition() {
        let h = random(9, 2 * CHUNK + 77, 1);
        let by_definition = h.broadcast_sub(&h.mean_keepdim(0).unwrap()).unwrap();
        assert!(max_diff(&centre_rows(&h).unwrap(), &by_definition) < 1e-6);
    }

    /// A history of rank 3 yields 3 orthonormal directions when asked for 8: the other
    /// eigenvalues of its f32 Gram matrix are rounding noise and give no direction.
    #[test]
    fn a_rank_deficient_history_yields_orthonormal_directions() {
        let (m, n, r) = (12, 3000, 3);
        let history = random(m, r, 8).matmul(&random(r, n, 7)).unwrap();
        let u = top_directions(&history, 8).unwrap().unwrap();
        assert_eq!(u.dims(), [r, n]);
        let gram = u.matmul(&u.t().unwrap()).unwrap();
        let identity = Tensor::eye(r, DType::F32, &candle_core::Device::Cpu).unwrap();
        assert!(max_diff(&gram, &identity) < 1e-5);
    }

    /// A history without variance (every update the same) has no directions.
    #[test]
    fn a_history_without_variance_has_no_directions() {
        let row = random(1, 100, 3);
        let history = Tensor::cat(&[&row, &row, &row, &row], 0).unwrap();
        assert!(top_directions(&history, 2).unwrap().is_none());
        let zeros = Tensor::zeros((4, 100), DType::F32, &candle_core::Device::Cpu).unwrap();
        assert!(top_directions(&zeros, 2).unwrap().is_none());
    }
}
