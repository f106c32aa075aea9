//! What data-parallel training asks of the ranks, built on the [`Communicator`] trait:
//! averaged gradients, rank 0's weights everywhere, the step's agreed loss and stop signal,
//! and a typed all-gather of small values.

use super::{Communicator, PeerFailed};
use crate::model::Param;
use anyhow::{bail, Result};
use candle_core::Tensor;
use std::path::PathBuf;

/// Gradients are averaged in buckets of this many elements: large enough for few
/// collectives, small enough that the packed copy stays modest.
const BUCKET_ELEMENTS: usize = 1 << 24;

/// Every rank's `values`, in rank order (bit-exact: sent as little-endian bytes). Ranks may
/// send different counts; a part that is not whole numbers is an error naming its rank.
pub fn all_gather_f64(comm: &dyn Communicator, values: &[f64]) -> Result<Vec<Vec<f64>>> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    comm.all_gather_bytes(&bytes)?
        .iter()
        .enumerate()
        .map(|(rank, part)| {
            if part.len() % 8 != 0 {
                bail!(PeerFailed(format!(
                    "rank {rank} sent {} bytes where f64 values were expected: is every rank \
                     running the same build?",
                    part.len()
                )));
            }
            Ok(part
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("chunks of 8 bytes")))
                .collect())
        })
        .collect()
}

/// [`all_gather_f64`] where every rank sends exactly `N` values.
pub fn all_gather_array<const N: usize>(
    comm: &dyn Communicator,
    values: [f64; N],
) -> Result<Vec<[f64; N]>> {
    all_gather_f64(comm, &values)?
        .into_iter()
        .enumerate()
        .map(|(rank, part)| {
            <[f64; N]>::try_from(part).map_err(|part| {
                PeerFailed(format!(
                    "rank {rank} sent {} values where {N} were expected: is every rank running \
                     the same build?",
                    part.len()
                ))
                .into()
            })
        })
        .collect()
}

/// The step's loss averaged over the ranks (in rank order, so alike everywhere) and the
/// first stop signal any rank received.
pub fn agree(comm: &dyn Communicator, loss: f64, stop: Option<i32>) -> Result<(f64, Option<i32>)> {
    if comm.world() == 1 {
        return Ok((loss, stop));
    }
    // A signal number is a small integer: exact as an f64.
    let parts = all_gather_array(comm, [loss, f64::from(stop.unwrap_or(0))])?;
    let sum: f64 = parts.iter().map(|[loss, _]| loss).sum();
    let first_stop = parts.iter().map(|&[_, s]| s as i32).find(|&s| s != 0);
    Ok((sum / parts.len() as f64, first_stop))
}

/// Replaces every gradient by its mean over the ranks, packing small ones into buckets.
pub fn average_gradients(grads: &mut [Tensor], comm: &dyn Communicator) -> Result<()> {
    let world = comm.world();
    if world == 1 {
        return Ok(());
    }
    let scale = 1.0 / world as f64;
    let mut start = 0;
    while start < grads.len() {
        let mut end = start;
        let mut size = 0;
        while end < grads.len()
            && (end == start || size + grads[end].elem_count() <= BUCKET_ELEMENTS)
        {
            size += grads[end].elem_count();
            end += 1;
        }
        let flat: Vec<Tensor> = grads[start..end]
            .iter()
            .map(|g| g.flatten_all())
            .collect::<candle_core::Result<_>>()?;
        let summed = comm.all_reduce_sum(&Tensor::cat(&flat, 0)?)?;
        let mut offset = 0;
        for g in &mut grads[start..end] {
            let n = g.elem_count();
            *g = (summed.narrow(0, offset, n)?.reshape(g.shape())? * scale)?;
            offset += n;
        }
        start = end;
    }
    Ok(())
}

/// Rank 0's weights on every rank.
pub fn broadcast_params(params: &[Param], comm: &dyn Communicator) -> Result<()> {
    if comm.world() == 1 {
        return Ok(());
    }
    for p in params {
        let shared = comm.broadcast(p.var.as_tensor(), 0)?;
        if comm.rank() != 0 {
            p.var.set(&shared)?;
        }
    }
    Ok(())
}

/// Rank 0's `path` on every rank.
pub fn share_path(comm: &dyn Communicator, path: Option<PathBuf>) -> Result<Option<PathBuf>> {
    if comm.world() == 1 {
        return Ok(path);
    }
    let mine = path.map(|p| p.display().to_string()).unwrap_or_default();
    let parts = comm.all_gather_bytes(mine.as_bytes())?;
    let root = String::from_utf8_lossy(&parts[0]).into_owned();
    Ok((!root.is_empty()).then(|| PathBuf::from(root)))
}
