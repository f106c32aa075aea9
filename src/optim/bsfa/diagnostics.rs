//! What each re-estimation found, per parameter group (`norm`, `attn`, `mlp`): the fraction
//! of the update history's variance its top-k directions capture, and how much the new
//! subspace overlaps the previous one. Logged to `metrics.jsonl` as one `bsfa` line per
//! re-estimation, and drawn by `plot`.

use super::config::BsfaGroup;
use crate::dist::{all_gather_f64, Communicator};
use crate::model::ParamGroup;
use anyhow::Result;
use candle_core::{DType, Tensor};
use serde::Serialize;

/// One group's means over its blocks at one re-estimation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupDiagnostics {
    /// `norm`, `attn` or `mlp`.
    pub group: BsfaGroup,
    /// Blocks of the group.
    pub blocks: usize,
    /// Mean over blocks of the fraction of the centred history's variance (sum of its Gram
    /// eigenvalues) that the kept directions capture; a block without variance counts 0.
    pub energy: f64,
    /// Mean over blocks that had directions before of `|U_old U_new^T|_F^2 / min(k_old,
    /// k_new)`: 1 when one subspace contains the other, near k/numel for unrelated ones.
    pub overlap: Option<f64>,
    /// Mean number of directions kept per block (at most `bsfa.rank`).
    pub directions: f64,
}

/// Sums over the blocks this rank owns, per group, until every rank's are added up.
#[derive(Default)]
pub(super) struct Accumulator {
    /// Per group (in `GROUPS` order): blocks, energy sum, overlap sum, blocks with an
    /// overlap, directions sum.
    sums: [[f64; 5]; 3],
}

const GROUPS: [BsfaGroup; 3] = [BsfaGroup::Norm, BsfaGroup::Attn, BsfaGroup::Mlp];

impl Accumulator {
    /// Adds one block of `group`: the variance fraction captured, the overlap with its
    /// previous directions (if it had any) and how many directions it kept.
    pub(super) fn add(
        &mut self,
        group: ParamGroup,
        energy: f64,
        overlap: Option<f64>,
        directions: usize,
    ) {
        let Some(i) = GROUPS.iter().position(|g| ParamGroup::from(*g) == group) else {
            return;
        };
        let s = &mut self.sums[i];
        s[0] += 1.0;
        s[1] += energy;
        if let Some(o) = overlap {
            s[2] += o;
            s[3] += 1.0;
        }
        s[4] += directions as f64;
    }

    /// Every rank's sums added up (every rank calls this at the same step), as group means.
    pub(super) fn finish(&self, comm: &dyn Communicator) -> Result<Vec<GroupDiagnostics>> {
        let flat: Vec<f64> = self.sums.iter().flatten().copied().collect();
        let mut total = vec![0.0; flat.len()];
        for part in all_gather_f64(comm, &flat)? {
            for (t, v) in total.iter_mut().zip(part) {
                *t += v;
            }
        }
        Ok(GROUPS
            .iter()
            .zip(total.chunks_exact(5))
            .filter(|(_, s)| s[0] > 0.0)
            .map(|(&group, s)| GroupDiagnostics {
                group,
                blocks: s[0] as usize,
                energy: s[1] / s[0],
                overlap: (s[3] > 0.0).then(|| s[2] / s[3]),
                directions: s[4] / s[0],
            })
            .collect())
    }
}

/// `|A B^T|_F^2 / min(rows)` for two sets of orthonormal rows of the same width.
pub(super) fn overlap(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok(overlaps(&[(a, b)])?[0])
}

/// [`overlap`] of each pair, read back in one transfer when the pairs share a device (one
/// wait for the device per re-estimation, not one per block).
pub(super) fn overlaps(pairs: &[(&Tensor, &Tensor)]) -> Result<Vec<f64>> {
    let mut rows = Vec::with_capacity(pairs.len());
    let mut sums = Vec::with_capacity(pairs.len());
    for (a, b) in pairs {
        rows.push(a.dim(0)?.min(b.dim(0)?).max(1) as f64);
        let products = a.matmul(&b.t()?)?;
        sums.push(
            products
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .reshape(1)?,
        );
    }
    let squared = super::pca::read_back(&sums)?;
    Ok(squared.iter().zip(rows).map(|(s, r)| s[0] / r).collect())
}
