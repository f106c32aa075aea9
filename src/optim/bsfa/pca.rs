//! The PCA of a block's update history (the paper's BPPE estimator): its top principal
//! directions through the small Gram matrix and a symmetric eigendecomposition, never a
//! `numel x numel` matrix. Layout: the history is `m x numel` (one update per row, in any
//! order: the estimate does not depend on it), the directions `k x numel` (orthonormal rows,
//! `k <= rank`).
//!
//! The history is centred: PCA is the decomposition of variance, and Proposition 1's signal
//! is the oscillation of the dominant components (their sign flips step to step) while bulk
//! components drift steadily one way. Centring removes that drift, so a large but steady
//! bulk update cannot pass for a dominant direction. It is done on the `m x m` Gram matrix,
//! not on the history: with `P = I - 1 1^T / m`, the centred history is `P H`, its Gram
//! matrix `P (H H^T) P` and its directions `C P H` for the eigenvector coefficients `C`. So
//! the only passes over the history are the two products `H H^T` and `(C P) H`, and the
//! centring costs nothing on a GPU (docs/gpu.md). The price is the rounding of the
//! uncentred Gram matrix, which the eigenvalue floor accounts for (see [`estimate_all`]).
//!
//! Many blocks are estimated at once ([`estimate_all`]): their Gram matrices come to the
//! host in one transfer (one wait for the device per re-estimation, not one per block) and
//! their eigenproblems are solved in parallel.

use super::diagnostics::overlap;
use anyhow::Result;
use candle_core::{DType, Tensor};
use rayon::prelude::*;

/// Top `rank` principal directions of `history` (`m x n`, one update per row), centred, as
/// orthonormal rows (`k x n`, `k <= rank`); see [`estimate_all`].
pub fn top_directions(history: &Tensor, rank: usize) -> Result<Option<Tensor>> {
    Ok(estimate(history, rank)?.directions)
}

/// The directions [`top_directions`] gives, and the fraction of the centred history's
/// variance they capture.
pub struct Estimate {
    /// Orthonormal rows (`k x n`), or `None` for a history without variance.
    pub directions: Option<Tensor>,
    /// Their eigenvalues over the centred Gram matrix's trace (0 without variance).
    pub energy: f64,
}

/// [`top_directions`] with the variance they capture.
pub fn estimate(history: &Tensor, rank: usize) -> Result<Estimate> {
    let mut one = estimate_all(std::slice::from_ref(history), rank)?;
    Ok(one.pop().expect("one estimate per history"))
}

/// The estimate of each history (`m_i x n_i`, one update per row): its top `rank` principal
/// directions, centred, as orthonormal rows. With `G = H H^T`, its centred form `P G P =
/// W L W^T` and `C = L^-1/2 W^T`, the directions are `(C P) H`.
///
/// Eigenvalues at or below the rounding noise of `G` give no direction: their eigenvectors
/// are noise, and `L^-1/2` would blow that noise up into rows that are not orthonormal. The
/// floor is `m * eps * trace(G)` for the history's precision `eps`: each entry `h_i . h_j` of
/// `G` is rounded to about `eps |h_i| |h_j|`, so the rounding error matrix has a norm of at
/// most about `eps * trace(G)`, which centring (a projection) does not enlarge; the factor
/// `m` is margin (in f32 the noise eigenvalues of rank-deficient histories measure 1e-8 of the
/// trace, the floor at m = 60 is 7e-6). The trace is the uncentred one: a block whose updates
/// are a steady drift many times larger than their variation keeps fewer directions, those
/// its rounding can resolve. So a rank-deficient history yields fewer than `rank` rows, and
/// one with no variance at all (a frozen or constant block) yields `None`: no directions, the
/// identity projection.
pub fn estimate_all(histories: &[Tensor], rank: usize) -> Result<Vec<Estimate>> {
    let products = histories
        .iter()
        .map(|h| gram_product(h, h))
        .collect::<Result<Vec<_>>>()?;
    estimate_with(histories, read_back(&products)?, rank)
}

/// [`estimate_all`] given each history's Gram matrix (`m x m`, row-major).
pub(super) fn estimate_with(
    histories: &[Tensor],
    grams: Vec<Vec<f64>>,
    rank: usize,
) -> Result<Vec<Estimate>> {
    let solved: Vec<Solved> = grams
        .par_iter()
        .zip(histories)
        .map(|(gram, h)| solve(gram, h.dim(0).unwrap_or(0), rank, epsilon(h.dtype())))
        .collect();
    histories
        .iter()
        .zip(solved)
        .map(|(history, solved)| {
            if solved.kept == 0 {
                return Ok(Estimate {
                    directions: None,
                    energy: 0.0,
                });
            }
            let m = history.dim(0)?;
            let coefficients =
                Tensor::from_vec(solved.coefficients, (solved.kept, m), history.device())?
                    .to_dtype(history.dtype())?;
            Ok(Estimate {
                directions: Some(coefficients.matmul(history)?),
                energy: solved.energy,
            })
        })
        .collect()
}

/// `A B^T` in the rows' precision where they lie, as a flat f64 tensor: a Gram matrix, or
/// part of one.
pub(super) fn gram_product(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(a.matmul(&b.t()?)?.to_dtype(DType::F64)?.flatten_all()?)
}

/// The values of flat f64 tensors on the host, in one transfer when they share a device
/// (one wait for the device, not one per tensor).
pub(super) fn read_back(parts: &[Tensor]) -> Result<Vec<Vec<f64>>> {
    let Some(first) = parts.first() else {
        return Ok(Vec::new());
    };
    if parts
        .iter()
        .any(|p| !p.device().same_device(first.device()))
    {
        return parts.iter().map(|p| Ok(p.to_vec1()?)).collect();
    }
    let all: Vec<f64> = Tensor::cat(parts, 0)?.to_vec1()?;
    let mut rest = all.as_slice();
    Ok(parts
        .iter()
        .map(|p| {
            let (values, tail) = rest.split_at(p.elem_count());
            rest = tail;
            values.to_vec()
        })
        .collect())
}

/// What the eigenproblem of one history gives: `kept` rows of coefficients (`kept x m`,
/// row-major) for its directions, and the centred variance they capture.
struct Solved {
    coefficients: Vec<f64>,
    kept: usize,
    energy: f64,
}

/// The coefficients `C P` of the top `rank` directions from the Gram matrix `gram` (`m x m`)
/// of a history of precision `eps`, as [`estimate_all`] describes.
fn solve(gram: &[f64], m: usize, rank: usize, eps: f64) -> Solved {
    let none = Solved {
        coefficients: Vec::new(),
        kept: 0,
        energy: 0.0,
    };
    if m == 0 {
        return none;
    }
    let gram = nalgebra::DMatrix::from_row_slice(m, m, gram);
    let floor = m as f64 * eps * gram.trace();
    // P G P: every entry minus its row's and its column's mean, plus the overall mean.
    let means: Vec<f64> = (0..m).map(|i| gram.row(i).sum() / m as f64).collect();
    let overall = means.iter().sum::<f64>() / m as f64;
    let centred =
        nalgebra::DMatrix::from_fn(m, m, |i, j| gram[(i, j)] - means[i] - means[j] + overall);
    let trace = centred.trace();
    let eigen = centred.symmetric_eigen();
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
        let row: Vec<f64> = (0..m).map(|j| eigen.eigenvectors[(j, i)] * scale).collect();
        // Times P: the row minus its mean (an eigenvector of P G P with a nonzero eigenvalue
        // is orthogonal to 1, so this removes only rounding).
        let mean = row.iter().sum::<f64>() / m as f64;
        coefficients.extend(row.iter().map(|c| c - mean));
        kept += 1;
        captured += lambda;
    }
    if kept == 0 {
        return none;
    }
    Solved {
        coefficients,
        kept,
        energy: captured / trace,
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::bsfa::test_tensors::{max_diff, random};

    /// A history of a steady drift 20 times its variation, plus 4 oscillating directions
    /// and noise: `m x n` in f32.
    fn drifting_history(m: usize, n: usize, seed: u64) -> Tensor {
        let drift = (random(1, n, seed) * 20.0).unwrap();
        let oscillation = random(m, 4, seed + 1)
            .matmul(&random(4, n, seed + 2))
            .unwrap();
        let noise = (random(m, n, seed + 3) * 1e-2).unwrap();
        (oscillation.broadcast_add(&drift).unwrap() + noise).unwrap()
    }

    /// The top `k` right singular vectors (`k x n`) of the history centred in f64, and the
    /// fraction of its variance they hold: the definition, by another route (no Gram
    /// matrix).
    fn by_definition(history: &Tensor, k: usize) -> (nalgebra::DMatrix<f64>, f64) {
        let n = history.dim(1).unwrap();
        let mut h = matrix(history);
        for j in 0..n {
            let mean = h.column(j).mean();
            h.column_mut(j).add_scalar_mut(-mean);
        }
        let svd = h.svd(false, true);
        let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
        order.sort_by(|&a, &b| svd.singular_values[b].total_cmp(&svd.singular_values[a]));
        let v_t = svd.v_t.unwrap();
        let top = nalgebra::DMatrix::from_fn(k, n, |r, c| v_t[(order[r], c)]);
        let total: f64 = svd.singular_values.iter().map(|s| s * s).sum();
        let held: f64 = order
            .iter()
            .take(k)
            .map(|&i| svd.singular_values[i].powi(2))
            .sum();
        (top, held / total)
    }

    /// `|A B^T|_F^2 / k`: 1 when the two sets of `k` orthonormal rows span one subspace.
    fn same_span(a: &Tensor, b: &nalgebra::DMatrix<f64>) -> f64 {
        (matrix(a) * b.transpose()).norm_squared() / a.dim(0).unwrap() as f64
    }

    /// A matrix tensor's values in f64.
    fn matrix(t: &Tensor) -> nalgebra::DMatrix<f64> {
        let (rows, cols) = t.dims2().unwrap();
        let values: Vec<f64> = t
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        nalgebra::DMatrix::from_row_slice(rows, cols, &values)
    }

    /// Centring on the Gram matrix (`P G P`, then `C P`) gives the directions and variance
    /// of the centred history itself, for a history whose mean is 20 times its variation.
    #[test]
    fn centring_the_gram_matrix_equals_centring_the_history() {
        let (m, n, k) = (16, 700, 4);
        let history = drifting_history(m, n, 11);
        let estimate = estimate(&history, k).unwrap();
        let u = estimate.directions.unwrap();
        assert_eq!(u.dims(), [k, n]);
        let gram = u.matmul(&u.t().unwrap()).unwrap();
        let identity = Tensor::eye(k, DType::F32, &candle_core::Device::Cpu).unwrap();
        assert!(
            max_diff(&gram, &identity) < 1e-4,
            "{}",
            max_diff(&gram, &identity)
        );
        let (v, energy) = by_definition(&history, k);
        let span = same_span(&u, &v);
        assert!((1.0 - span).abs() < 1e-4, "span overlap {span}");
        assert!(
            (estimate.energy - energy).abs() < 1e-4,
            "{} vs {energy}",
            estimate.energy
        );
        // Without centring the drift would be the first direction: not in the span.
        let drift: Vec<f32> = history.mean(0).unwrap().to_vec1().unwrap();
        let norm = drift.iter().map(|x| x * x).sum::<f32>().sqrt();
        let drift = (Tensor::new(drift.as_slice(), &candle_core::Device::Cpu).unwrap()
            / norm as f64)
            .unwrap();
        let along: f32 = u
            .matmul(&drift.unsqueeze(1).unwrap())
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(along < 0.1, "the drift lies {along} in the directions");
    }

    /// The rows' order does not matter (the history is a ring), and estimating several
    /// histories at once gives what estimating each alone gives.
    #[test]
    fn estimates_ignore_row_order_and_batching() {
        let (m, n, k) = (12, 500, 4);
        let histories: Vec<Tensor> = (0..3)
            .map(|i| drifting_history(m, n + i, 20 + i as u64 * 5))
            .collect();
        let together = estimate_all(&histories, k).unwrap();
        for (history, batched) in histories.iter().zip(&together) {
            let alone = estimate(history, k).unwrap();
            let (a, b) = (
                alone.directions.unwrap(),
                batched.directions.as_ref().unwrap(),
            );
            assert_eq!(max_diff(&a, b), 0.0);
            assert_eq!(alone.energy, batched.energy);
            let order: Vec<u32> = (0..m as u32).map(|i| (i * 5 + 3) % m as u32).collect();
            let index = Tensor::new(order.as_slice(), history.device()).unwrap();
            let shuffled = estimate(&history.index_select(&index, 0).unwrap(), k).unwrap();
            let span = same_span(&a, &matrix(&shuffled.directions.unwrap()));
            // Rounding of the uncentred Gram matrix: about eps (drift / variation)^2 = 5e-5.
            assert!((1.0 - span).abs() < 1e-4, "span overlap {span}");
        }
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
