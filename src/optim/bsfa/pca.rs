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
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use rayon::prelude::*;

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
    });
    match fast {
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
}
