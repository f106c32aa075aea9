//! BSFA, the Bulk-Space-Filtration-Accelerator, around any base optimizer, with the
//! block-wise PCA projector estimator (BPPE): the paper's Algorithms 1-3.
//!
//! Vocabulary, for every file of this module:
//! - *block*: one parameter tensor BSFA covers (the groups `bsfa.blocks` lists; never the
//!   embeddings or the output head, as in the paper). BSFA keeps state per block and nothing
//!   across blocks. Under `bsfa.partition = adam-mini` a tensor holds several blocks (the
//!   model's Adam-mini partition, contiguous runs of its elements): its state is still kept
//!   per tensor, and each block's directions lie in its own columns of one matrix.
//! - *update*: a block's change in one base optimizer step, flattened (`numel` values).
//! - *history*: a block's last `bsfa.history` updates (`rows x numel`; `history`).
//! - *directions*: `k <= bsfa.rank` orthonormal rows (`k x numel`) spanning the block's
//!   estimated dominant subspace; its orthogonal complement is the *bulk*.
//! - *owner*: the data-parallel rank that keeps a block's history and directions.
//!
//! Algorithm, every step: the base optimizer steps; the wrapper sees each block only before
//! and after (it is handed the base step as a closure, and never the base optimizer), and
//! takes the difference as the update `v`. Every `bsfa.interval` steps (from
//! step `interval` on, as the paper's Algorithm 1) it re-estimates the directions `U` as the
//! top principal components of the centred history (`pca`), however many updates it holds,
//! and notes what it found (`diagnostics`). Once there are directions, the update becomes
//! `gamma * v + (alpha - gamma) * U^T (U v)` (`projection`): scaled by `alpha` inside the
//! dominant subspace and by `gamma` in the bulk. `v` itself joins the history.
//!
//! Files: `pca` (the estimate), `projection` (its use), `diagnostics` (what each estimate
//! found), `history` (the updates kept, a ring written in place), `state` (the stored
//! history and directions, f32 or 4-bit through `quant` on the
//! host or `quant_tensor` on the parameters' device), `shard`
//! (owners and what moves between ranks), `cpu` (what the CPU fast paths share).

mod config;
mod cpu;
mod diagnostics;
mod history;
mod pca;
mod projection;
pub mod quant;
mod quant_tensor;
mod shard;
mod state;

pub use config::{BsfaConfig, BsfaGroup, BsfaGroups, BsfaPartition, FirstProjection};
pub use diagnostics::GroupDiagnostics;
pub use pca::{estimate, estimate_all, top_directions, Estimate};
pub use projection::{project, project_blocks};
pub use shard::owners;
pub use state::{steady_state_bytes, steady_state_bytes_per_rank};

use super::{OptimizerState, StateTensor};
use crate::dist::Communicator;
use crate::model::Param;
use anyhow::Result;
use candle_core::Tensor;
use projection::Before;
use shard::Shard;
use state::{BlockState, RowKind, Stored};
use std::collections::HashMap;
use std::sync::Arc;

/// BSFA around the steps of any base optimizer ([`crate::optim::Stack`] puts the two
/// together). Its checkpoint state ([`OptimizerState`]) is its own: the blocks this rank
/// owns and the step count.
pub struct Bsfa {
    config: BsfaConfig,
    /// Per parameter, in parameter order: its block's state, `None` where BSFA does not
    /// apply or another rank owns the block.
    blocks: Vec<Option<BlockState>>,
    shard: Shard,
    names: Vec<String>,
    /// Per parameter: what its stored rows hold, to check and restore checkpointed state.
    row_kinds: Vec<RowKind>,
    /// Per parameter: its group, for the diagnostics.
    groups: Vec<crate::model::ParamGroup>,
    /// Per parameter: elements per block, its `numel` for one block per tensor, less under
    /// `bsfa.partition = adam-mini` (contiguous blocks of that many elements).
    chunks: Vec<usize>,
    /// What the latest re-estimation found, until taken.
    diagnostics: Option<Vec<GroupDiagnostics>>,
    steps: u64,
}

impl Bsfa {
    /// BSFA over `params`, one block per tensor: it applies to the parameter groups listed
    /// in `config.blocks`, and this rank of `comm` keeps the state of the blocks [`owners`]
    /// gives it.
    pub fn new(config: &BsfaConfig, params: &[Param], comm: Arc<dyn Communicator>) -> Result<Self> {
        let whole: Vec<usize> = params.iter().map(|p| p.var.elem_count()).collect();
        Self::partitioned(config, params, &whole, comm)
    }

    /// [`Bsfa::new`] with `chunks[i]` elements per block of parameter `i` (contiguous, in
    /// its row-major order; its `numel` for one block per tensor): each block has its own
    /// directions, estimated from its own columns of the history.
    pub fn partitioned(
        config: &BsfaConfig,
        params: &[Param],
        chunks: &[usize],
        comm: Arc<dyn Communicator>,
    ) -> Result<Self> {
        if chunks.len() != params.len() {
            anyhow::bail!(
                "bsfa: {} block sizes for {} parameters (bsfa.partition needs the model's)",
                chunks.len(),
                params.len()
            );
        }
        for (p, &chunk) in params.iter().zip(chunks) {
            if chunk == 0 || !p.var.elem_count().is_multiple_of(chunk) {
                anyhow::bail!("bsfa: '{}' does not split into blocks of {chunk}", p.name);
            }
        }
        let shard = Shard::new(config, params, comm);
        let blocks = shard
            .owned()
            .map(|owned| owned.then(|| BlockState::new(config.bits)))
            .collect();
        Ok(Self {
            config: config.clone(),
            blocks,
            shard,
            names: params.iter().map(|p| p.name.clone()).collect(),
            row_kinds: params.iter().map(RowKind::of).collect(),
            groups: params.iter().map(|p| p.group).collect(),
            chunks: chunks.to_vec(),
            diagnostics: None,
            steps: 0,
        })
    }

    /// Whether this step may project: from the first re-estimation on, at step `interval`
    /// or as `bsfa.first_projection` says (the same on every rank, owner of a block or not).
    fn projects_at(&self, step: u64) -> bool {
        step >= self.config.first_estimate_step()
    }

    /// The parameter index of a BSFA state key (`<param>.bsfa_<slot>[.<part>]`).
    fn block_of(&self, key: &str) -> Option<usize> {
        let (name, _) = key.split_once(".bsfa_")?;
        self.names.iter().position(|n| n == name)
    }

    /// Algorithm 1 around one step of the base optimizer, `base_step`, which updates
    /// `params`: the projection of its update in every BSFA block, re-estimating the
    /// projectors every `interval` steps from the updates so far.
    pub fn step(&mut self, params: &[Param], base_step: impl FnOnce() -> Result<()>) -> Result<()> {
        // The parameters before the base step: the update is the difference.
        let before: Vec<Option<Before>> = params
            .iter()
            .zip(&self.blocks)
            .map(|(p, b)| {
                b.as_ref()
                    .map(|_| Before::of(p.var.as_tensor()))
                    .transpose()
            })
            .collect::<Result<_>>()?;
        base_step()?;
        let refresh = self.config.reestimates_at(self.steps);
        let (alpha, gamma) = (self.config.alpha, self.config.gamma);
        let mut found = diagnostics::Accumulator::default();
        // As Algorithm 1 does: from the first interval on, with the updates there are (until
        // the history is full, fewer than `history`, giving at most one direction fewer than
        // there are updates). Every block at once, before any block records this update.
        if refresh {
            let _span = tracing::info_span!("bsfa re-estimation").entered();
            re_estimate_all(
                &mut self.blocks,
                &self.chunks,
                &self.groups,
                &self.config,
                &mut found,
            )?;
        }
        // The blocks the GPU's batched kernels take, all at once; the others one by one.
        let mut before = before;
        let directions: Vec<Option<&state::Stored>> = self
            .blocks
            .iter()
            .map(|b| b.as_ref().and_then(|b| b.directions.as_ref()))
            .collect();
        let batched = projection::project_batched(
            params,
            &directions,
            &self.chunks,
            &mut before,
            alpha,
            gamma,
        )?;
        for (i, update) in batched {
            if let Some(block) = &mut self.blocks[i] {
                block.record(&update, self.config.history, self.config.interval)?;
            }
        }
        for ((param, block), (before, &chunk)) in params
            .iter()
            .zip(&mut self.blocks)
            .zip(before.into_iter().zip(&self.chunks))
        {
            let (Some(block), Some(before)) = (block, before) else {
                continue;
            };
            let update = if chunk == param.var.elem_count() {
                projection::project_update(
                    &param.var,
                    before,
                    block.directions.as_ref(),
                    alpha,
                    gamma,
                )?
            } else {
                let directions = block.directions.as_ref();
                projection::project_update_chunked(
                    &param.var, before, directions, alpha, gamma, chunk,
                )?
            };
            block.record(&update, self.config.history, self.config.interval)?;
        }
        if refresh {
            self.diagnostics = Some(found.finish(self.shard.comm())?);
        }
        if self.projects_at(self.steps) {
            tracing::info_span!("bsfa share projected")
                .in_scope(|| self.shard.share_projected(params))?;
        }
        self.steps += 1;
        Ok(())
    }

    /// What the latest re-estimation found, once, right after the step that made it
    /// (`None` between re-estimations).
    pub fn take_diagnostics(&mut self) -> Option<Vec<GroupDiagnostics>> {
        self.diagnostics.take()
    }

    /// Bytes held by the blocks this rank owns.
    pub fn state_bytes(&self) -> usize {
        self.blocks.iter().flatten().map(BlockState::bytes).sum()
    }
}

/// Re-estimates the directions of every block from its history and reports what each found
/// to `found` (variance captured, overlap with the previous directions, directions kept). A
/// history without variance (a frozen or constant block) gives no directions: the block
/// keeps the identity projection. Blocks of one tensor each are estimated together
/// ([`pca::estimate_all`], one wait for the device for their Gram matrices and one for their
/// overlaps); a tensor of several blocks (`bsfa.partition = adam-mini`) block by block.
fn re_estimate_all(
    blocks: &mut [Option<BlockState>],
    chunks: &[usize],
    groups: &[crate::model::ParamGroup],
    config: &BsfaConfig,
    found: &mut diagnostics::Accumulator,
) -> Result<()> {
    let (rank, bits) = (config.rank, config.bits);
    // The blocks of one tensor each: their group, state and history.
    let mut whole = Vec::new();
    for ((block, &chunk), &group) in blocks.iter_mut().zip(chunks).zip(groups) {
        let Some(block) = block else { continue };
        let Some(history) = block.history_matrix()? else {
            continue;
        };
        if chunk == history.dim(1)? {
            whole.push((group, block, history));
            continue;
        }
        let old = block.directions.as_ref().map(Stored::matrix).transpose()?;
        let directions =
            pca::estimate_chunked(&history, rank, chunk, old.as_ref(), &mut |e, o, k| {
                found.add(group, e, o, k)
            })?;
        block.directions = directions.map(|d| Stored::keep(&d, bits)).transpose()?;
    }
    // Every block's Gram products in one transfer, then the eigenproblems in parallel.
    let parts: Vec<Vec<Tensor>> = whole
        .iter()
        .map(|(_, block, history)| block.gram_parts(history))
        .collect::<Result<_>>()?;
    let flat: Vec<Tensor> = parts.iter().flatten().cloned().collect();
    let mut values = pca::read_back(&flat)?.into_iter();
    let mut grams = Vec::with_capacity(whole.len());
    for ((_, block, _), parts) in whole.iter_mut().zip(&parts) {
        grams.push(block.gram(values.by_ref().take(parts.len()).collect())?);
    }
    let histories: Vec<Tensor> = whole.iter().map(|(_, _, h)| h.clone()).collect();
    let estimates = pca::estimate_with(&histories, grams, rank)?;
    // Their overlaps with the previous directions in one more transfer.
    let olds: Vec<Option<Tensor>> = whole
        .iter()
        .map(|(_, block, _)| block.directions.as_ref().map(Stored::matrix).transpose())
        .collect::<Result<_>>()?;
    let pairs: Vec<(&Tensor, &Tensor)> = olds
        .iter()
        .zip(&estimates)
        .filter_map(|(old, e)| Some((old.as_ref()?, e.directions.as_ref()?)))
        .collect();
    let mut overlaps = diagnostics::overlaps(&pairs)?.into_iter();
    for (((group, block, _), old), estimate) in whole.into_iter().zip(&olds).zip(estimates) {
        let overlap = match (old, &estimate.directions) {
            (Some(_), Some(_)) => overlaps.next(),
            _ => None,
        };
        let kept = estimate.directions.as_ref().map_or(Ok(0), |d| d.dim(0))?;
        found.add(group, estimate.energy, overlap, kept);
        block.directions = estimate
            .directions
            .map(|d| Stored::keep(&d, bits))
            .transpose()?;
    }
    Ok(())
}

impl OptimizerState for Bsfa {
    fn steps_taken(&self) -> u64 {
        self.steps
    }

    /// The blocks this rank owns: `<p>.bsfa_history` and `<p>.bsfa_directions`, in full
    /// precision or 4-bit (the layouts are in `state`'s module doc).
    fn shard(&self) -> Result<Vec<(String, StateTensor)>> {
        let mut out = Vec::new();
        for (name, block) in self.names.iter().zip(&self.blocks) {
            let Some(block) = block else { continue };
            out.extend(block.checkpoint(name)?);
        }
        Ok(out)
    }

    /// The blocks this rank owns, whichever rank wrote them.
    fn wants(&self, key: &str) -> bool {
        self.block_of(key).is_some_and(|i| self.blocks[i].is_some())
    }

    fn load(&mut self, steps_taken: u64, state: &HashMap<String, Tensor>) -> Result<()> {
        for ((name, block), row) in self.names.iter().zip(&mut self.blocks).zip(&self.row_kinds) {
            let Some(block) = block else { continue };
            block.load(name, state, &self.config, row, steps_taken)?;
        }
        self.steps = steps_taken;
        Ok(())
    }

    fn devices(&self) -> Vec<(String, candle_core::Device)> {
        let mut out = Vec::new();
        for (name, block) in self.names.iter().zip(&self.blocks) {
            let Some(block) = block else { continue };
            out.extend(block.devices(name));
        }
        out
    }
}

/// Random matrices and their comparison, for the unit tests of the kernels.
#[cfg(test)]
mod test_tensors {
    use candle_core::{Device, Tensor};

    /// A `rows x cols` f32 CPU matrix of values uniform in [-1, 1), fixed by `seed`.
    pub(super) fn random(rows: usize, cols: usize, seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    /// The largest absolute difference between `a` and `b`.
    pub(super) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }
}
