//! The state BSFA stores per block: its update history and its directions, each kept in
//! full precision or, with `bsfa.bits = 4`, in the 4-bit form of `quant` (dequantized only
//! when used); how that state goes into a checkpoint and comes back; and what it weighs.
//!
//! Layouts: a history row is one update, `1 x numel`; the directions are `k x numel`
//! (orthonormal rows, `k <= rank`). Checkpoint keys: `<param>.bsfa_history` (`rows x
//! numel`, oldest first) and `<param>.bsfa_directions`; in 4-bit, each as four tensors under
//! `<key>.codes`, `.scales`, `.zeros`, `.norms` (see [`Quant4::to_tensors`]).

use super::quant::{self, Quant4};
use super::shard::owners;
use super::BsfaConfig;
use crate::model::Param;
use crate::optim::StateTensor;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::{HashMap, VecDeque};

/// A matrix BSFA keeps (`rows x numel`): in full precision, or 4-bit (`bsfa.bits = 4`) and
/// dequantized only when used.
pub(super) enum Stored {
    Full(Tensor),
    Bits4 {
        q: Quant4,
        dtype: DType,
        device: Device,
    },
}

impl Stored {
    /// Keeps `t` (`rows x numel`) at `bits` precision.
    pub(super) fn keep(t: &Tensor, bits: usize) -> Result<Self> {
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
    pub(super) fn matrix(&self) -> Result<Tensor> {
        match self {
            Self::Full(t) => Ok(t.clone()),
            Self::Bits4 { q, dtype, device } => {
                Ok(Tensor::from_vec(q.dequantize(), (q.rows, q.cols), device)?.to_dtype(*dtype)?)
            }
        }
    }

    /// The device the matrix computes on (4-bit: the one it is dequantized to).
    fn device(&self) -> &Device {
        match self {
            Self::Full(t) => t.device(),
            Self::Bits4 { device, .. } => device,
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

    /// The matrix a checkpoint holds under `key` (`None` if absent), checked against `bits`
    /// and against at most `max_rows` rows of `row`; `setting` names the `bsfa.*` key that
    /// bounds the rows, for the error.
    fn read(
        state: &HashMap<String, Tensor>,
        key: &str,
        bits: usize,
        max_rows: usize,
        row: &RowKind,
        setting: &str,
    ) -> Result<Option<Self>> {
        let RowKind {
            numel,
            dtype,
            device,
        } = row;
        if bits == 32 {
            let Some(t) = state.get(key) else {
                return Ok(None);
            };
            return match t.dims() {
                // Read on the host, kept on the parameter's device.
                &[rows, cols] if rows <= max_rows && cols == *numel => {
                    Ok(Some(Self::Full(t.to_dtype(*dtype)?.to_device(device)?)))
                }
                dims => bail!(
                    "optimizer state '{key}' has shape {dims:?}, expected at most \
                     {max_rows} rows of {numel} (bsfa.{setting} or bsfa.bits changed?)"
                ),
            };
        }
        let parts: Vec<Option<&Tensor>> = QUANT_SUFFIXES
            .iter()
            .map(|s| state.get(&format!("{key}.{s}")))
            .collect();
        let [Some(codes), Some(scales), Some(zeros), Some(norms)] = parts[..] else {
            if state.contains_key(key) {
                bail!("optimizer state '{key}' is full precision but bsfa.bits = 4");
            }
            return Ok(None);
        };
        let q = Quant4::from_tensors([codes, scales, zeros, norms], *numel)
            .with_context(|| format!("optimizer state '{key}'"))?;
        if q.rows > max_rows {
            bail!(
                "optimizer state '{key}' has {} rows, expected at most {max_rows} \
                 (bsfa.{setting} changed?)",
                q.rows
            );
        }
        Ok(Some(Self::Bits4 {
            q,
            dtype: *dtype,
            device: device.clone(),
        }))
    }
}

/// Checkpoint suffixes of the four arrays of a 4-bit matrix.
const QUANT_SUFFIXES: [&str; 4] = ["codes", "scales", "zeros", "norms"];

/// What one stored row of a block holds: `numel` values of a parameter of type `dtype` on
/// `device` (what 4-bit state is restored to).
pub(super) struct RowKind {
    pub(super) numel: usize,
    pub(super) dtype: DType,
    pub(super) device: Device,
}

impl RowKind {
    /// The rows of `param`.
    pub(super) fn of(param: &Param) -> Self {
        Self {
            numel: param.var.elem_count(),
            dtype: param.var.dtype(),
            device: param.var.device().clone(),
        }
    }
}

/// The state of one block.
pub(super) struct BlockState {
    /// The most recent base updates (`1 x numel` each), oldest first.
    pub(super) history: VecDeque<Stored>,
    /// Estimated dominant directions as orthonormal rows (`rank x numel`), once estimated.
    pub(super) directions: Option<Stored>,
}

impl BlockState {
    /// No history yet, room for `capacity` updates.
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            history: VecDeque::with_capacity(capacity),
            directions: None,
        }
    }

    /// The history as one `rows x numel` matrix.
    pub(super) fn stacked_history(&self) -> Result<Stored> {
        let history: Vec<&Stored> = self.history.iter().collect();
        Stored::stack(&history)
    }

    /// Appends `update` (flat) at `bits` precision, dropping the oldest once `capacity`
    /// updates are held.
    pub(super) fn record(&mut self, update: &Tensor, capacity: usize, bits: usize) -> Result<()> {
        if self.history.len() == capacity {
            self.history.pop_front();
        }
        self.history
            .push_back(Stored::keep(&update.unsqueeze(0)?, bits)?);
        Ok(())
    }

    /// The checkpoint tensors of the block of parameter `name` (see the module doc).
    pub(super) fn checkpoint(&self, name: &str) -> Result<Vec<(String, StateTensor)>> {
        let mut out = Vec::new();
        let whole = |tensors: Vec<(String, Tensor)>| {
            tensors
                .into_iter()
                .map(|(key, t)| (key, StateTensor::Whole(t)))
        };
        let key = format!("{name}.bsfa_history");
        let full: Option<Vec<Tensor>> = self
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
            None => out.extend(whole(self.stacked_history()?.tensors(&key)?)),
        }
        if let Some(directions) = &self.directions {
            out.extend(whole(
                directions.tensors(&format!("{name}.bsfa_directions"))?,
            ));
        }
        Ok(out)
    }

    /// Replaces the state with what `state` holds for the block of parameter `name` (nothing
    /// where the checkpoint has none).
    pub(super) fn load(
        &mut self,
        name: &str,
        state: &HashMap<String, Tensor>,
        config: &BsfaConfig,
        row: &RowKind,
    ) -> Result<()> {
        let key = format!("{name}.bsfa_history");
        self.history = match Stored::read(state, &key, config.bits, config.history, row, "history")?
        {
            Some(history) => history.into_rows()?.into(),
            None => VecDeque::new(),
        };
        let key = format!("{name}.bsfa_directions");
        self.directions = Stored::read(state, &key, config.bits, config.rank, row, "rank")?;
        Ok(())
    }

    /// The device of every stored matrix of the block of parameter `name`, named as in
    /// checkpoints (history rows by their index).
    pub(super) fn devices(&self, name: &str) -> Vec<(String, Device)> {
        let history = self
            .history
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("{name}.bsfa_history[{i}]"), s.device().clone()));
        let directions = self
            .directions
            .iter()
            .map(|s| (format!("{name}.bsfa_directions"), s.device().clone()));
        history.chain(directions).collect()
    }

    /// Bytes held.
    pub(super) fn bytes(&self) -> usize {
        self.history
            .iter()
            .chain(&self.directions)
            .map(Stored::bytes)
            .sum()
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
    for (p, owner) in params.iter().zip(owners(config, params, world)) {
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
