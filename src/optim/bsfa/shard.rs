//! BSFA's state sharded over data-parallel ranks (ZeRO-1 style). Each block belongs to one
//! rank, its owner (blocks are dealt out by size, largest first, to the least-loaded rank),
//! which alone keeps its history and directions and projects its update. What moves between
//! ranks: after a projecting step, each owner broadcasts its projected blocks (their
//! parameters, flattened and joined in parameter order) and the other ranks overwrite theirs.
//! Every rank runs the same base optimizer step, so BSFA memory per rank falls as 1 / ranks
//! while the result stays the one-rank result bit for bit.

use super::BsfaConfig;
use crate::dist::Communicator;
use crate::model::Param;
use anyhow::Result;
use candle_core::Tensor;
use std::sync::Arc;

/// Each parameter's owner (`None` where the parameter is not a block): the blocks, largest
/// first (ties by position), each to the rank holding the fewest elements so far (ties to
/// the lowest rank). The same on every rank.
pub fn owners(config: &BsfaConfig, params: &[Param], world: usize) -> Vec<Option<usize>> {
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
    owners
}

/// This rank's view of the sharding: who owns each block, and the ranks to share with.
pub(super) struct Shard {
    /// Per parameter: the rank that owns its BSFA state, `None` where BSFA does not apply.
    owners: Vec<Option<usize>>,
    comm: Arc<dyn Communicator>,
}

impl Shard {
    /// The ranks the blocks are dealt out over.
    pub(super) fn comm(&self) -> &dyn Communicator {
        self.comm.as_ref()
    }

    /// The blocks of `params` dealt out over the ranks of `comm` (see [`owners`]).
    pub(super) fn new(config: &BsfaConfig, params: &[Param], comm: Arc<dyn Communicator>) -> Self {
        Self {
            owners: owners(config, params, comm.world()),
            comm,
        }
    }

    /// Per parameter: whether this rank keeps its BSFA state.
    pub(super) fn owned(&self) -> impl Iterator<Item = bool> + '_ {
        self.owners
            .iter()
            .map(|owner| *owner == Some(self.comm.rank()))
    }

    /// Broadcasts every rank's projected blocks to all ranks (nothing to do with one rank).
    pub(super) fn share_projected(&self, params: &[Param]) -> Result<()> {
        if self.comm.world() <= 1 {
            return Ok(());
        }
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
}
