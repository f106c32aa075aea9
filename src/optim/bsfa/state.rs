//! The state BSFA stores per block: its update history and its directions, each kept in
//! full precision or, with `bsfa.bits = 4`, in the 4-bit form of `quant` (dequantized only
//! when used); how that state goes into a checkpoint and comes back; and what it weighs.
//!
//! Layouts: a history row is one update, `1 x numel`; the directions are `k x numel`
//! (orthonormal rows, `k <= rank`). Checkpoint keys: `<param>.bsfa_history` (`rows x
//! numel`, oldest first) and `<param>.bsfa_directions`; in 4-bit, each as four tensors under
//! `<key>.codes`, `.scales`, `.zeros`, `.norms` (see [`Quant4::to_tensors`]).

use super::history::History;
use super::quant::{self, Quant4};
use super::quant_tensor::Quant4Tensors;
use super::shard::owners;
use super::BsfaConfig;
use crate::cpu_kernels::{fusable, fusable_on};
use crate::model::Param;
use crate::optim::StateTensor;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;

/// A matrix BSFA keeps (`rows x numel`): in full precision, or 4-bit (`bsfa.bits = 4`) and
/// dequantized only when used. 4-bit state lives where it is used: on the host for the CPU
/// kernels, which read it in place; as tensors on the parameter's device for the tensor
/// path (a GPU, or `train.kernels = reference`), so that it never crosses to the host.
pub(super) enum Stored {
    Full(Tensor),
    Bits4 {
        q: Quant4,
        dtype: DType,
        device: Device,
    },
    Bits4Tensors {
        q: Quant4Tensors,
        dtype: DType,
    },
}

impl Stored {
    /// Keeps `t` (`rows x numel`) at `bits` precision.
    pub(super) fn keep(t: &Tensor, bits: usize) -> Result<Self> {
        if bits == 32 {
            return Ok(Self::Full(t.clone()));
        }
        if !fusable(t) {
            return Ok(Self::Bits4Tensors {
                q: Quant4Tensors::quantize(t)?,
                dtype: t.dtype(),
            });
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
            Self::Bits4Tensors { q, dtype } => Ok(q.dequantize()?.to_dtype(*dtype)?),
        }
    }

    /// The device the matrix computes on (4-bit on the host: the one it is dequantized to).
    pub(super) fn device(&self) -> &Device {
        match self {
            Self::Full(t) => t.device(),
            Self::Bits4 { device, .. } => device,
            Self::Bits4Tensors { q, .. } => q.device(),
        }
    }

    pub(super) fn bytes(&self) -> usize {
        match self {
            Self::Full(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Self::Bits4 { q, .. } => q.bytes(),
            Self::Bits4Tensors { q, .. } => q.bytes(),
        }
    }

    /// The rows of several matrices of one form, as one matrix.
    pub(super) fn stack(parts: &[&Stored]) -> Result<Self> {
        match parts.first() {
            Some(Self::Bits4 { dtype, device, .. }) => {
                let qs: Vec<&Quant4> = parts
                    .iter()
                    .filter_map(|s| match s {
                        Self::Bits4 { q, .. } => Some(q),
                        _ => None,
                    })
                    .collect();
                Ok(Self::Bits4 {
                    q: Quant4::concat(&qs)?,
                    dtype: *dtype,
                    device: device.clone(),
                })
            }
            Some(Self::Bits4Tensors { dtype, .. }) => {
                let qs: Vec<&Quant4Tensors> = parts
                    .iter()
                    .filter_map(|s| match s {
                        Self::Bits4Tensors { q, .. } => Some(q),
                        _ => None,
                    })
                    .collect();
                Ok(Self::Bits4Tensors {
                    q: Quant4Tensors::concat(&qs)?,
                    dtype: *dtype,
                })
            }
            _ => {
                let rows: Vec<Tensor> = parts.iter().map(|s| s.matrix()).collect::<Result<_>>()?;
                Ok(Self::Full(Tensor::cat(&rows, 0)?))
            }
        }
    }

    /// One matrix per row.
    pub(super) fn into_rows(self) -> Result<Vec<Self>> {
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
            Self::Bits4Tensors { q, dtype } => (0..q.rows()?)
                .map(|r| {
                    Ok(Self::Bits4Tensors {
                        q: q.row(r)?,
                        dtype,
                    })
                })
                .collect(),
        }
    }

    /// Checkpoint tensors under `key`: the matrix itself, or for 4-bit the four arrays of
    /// [`Quant4::to_tensors`] under `key.<suffix>` (the same from either form).
    fn tensors(&self, key: &str) -> Result<Vec<(String, Tensor)>> {
        let quant = match self {
            Self::Full(t) => return Ok(vec![(key.to_string(), t.clone())]),
            Self::Bits4 { q, .. } => q.to_tensors()?,
            Self::Bits4Tensors { q, .. } => q.to_tensors(),
        };
        Ok(QUANT_SUFFIXES
            .iter()
            .zip(quant)
            .map(|(suffix, t)| (format!("{key}.{suffix}"), t))
            .collect())
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
        let arrays = [codes, scales, zeros, norms];
        let rows = quant::check_layout(arrays, *numel)
            .with_context(|| format!("optimizer state '{key}'"))?;
        if rows > max_rows {
            bail!(
                "optimizer state '{key}' has {rows} rows, expected at most {max_rows} \
                 (bsfa.{setting} changed?)"
            );
        }
        // In the form `keep` gives the parameter's rows.
        Ok(Some(if fusable_on(device, *dtype) {
            Self::Bits4 {
                q: Quant4::from_tensors(arrays, *numel)?,
                dtype: *dtype,
                device: device.clone(),
            }
        } else {
            Self::Bits4Tensors {
                q: Quant4Tensors::from_tensors(arrays, *numel, device)?,
                dtype: *dtype,
            }
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
    /// The most recent base updates.
    history: History,
    /// Estimated dominant directions as orthonormal rows (`rank x numel`), once estimated.
    pub(super) directions: Option<Stored>,
}

impl BlockState {
    /// No history yet, kept at `bits` precision.
    pub(super) fn new(bits: usize) -> Self {
        Self {
            history: History::new(bits),
            directions: None,
        }
    }

    /// The history as one `rows x numel` matrix, its rows in any order (`None` before the
    /// first update).
    pub(super) fn history_matrix(&self) -> Result<Option<Tensor>> {
        self.history.matrix()
    }

    /// Appends `update` (flat), dropping the oldest once `capacity` updates are held (the
    /// Gram matrix kept in products of `group` rows, see `history`).
    pub(super) fn record(&mut self, update: &Tensor, capacity: usize, group: usize) -> Result<()> {
        self.history.record(update, capacity, group)
    }

    /// The products the Gram matrix of `history` (what [`BlockState::history_matrix`] gave)
    /// needs computed now (see `history`).
    pub(super) fn gram_parts(&self, history: &Tensor) -> Result<Vec<Tensor>> {
        self.history.gram_parts(history)
    }

    /// The Gram matrix of [`BlockState::history_matrix`]'s rows from the values of
    /// [`BlockState::gram_parts`].
    pub(super) fn gram(&mut self, parts: Vec<Vec<f64>>) -> Result<Vec<f64>> {
        self.history.gram(parts)
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
        // Full-precision rows are joined only while the file is written.
        match self.history.full_rows()? {
            Some(rows) if !rows.is_empty() => out.push((key, StateTensor::rows(rows)?)),
            Some(_) => {}
            None => {
                if let Some(stacked) = self.history.stacked_rows()? {
                    out.extend(whole(stacked.tensors(&key)?));
                }
            }
        }
        if let Some(directions) = &self.directions {
            out.extend(whole(
                directions.tensors(&format!("{name}.bsfa_directions"))?,
            ));
        }
        Ok(out)
    }

    /// Replaces the state with what `state` holds for the block of parameter `name` (nothing
    /// where the checkpoint has none), saved after `recorded` updates.
    pub(super) fn load(
        &mut self,
        name: &str,
        state: &HashMap<String, Tensor>,
        config: &BsfaConfig,
        row: &RowKind,
        recorded: u64,
    ) -> Result<()> {
        let key = format!("{name}.bsfa_history");
        self.history = match Stored::read(state, &key, config.bits, config.history, row, "history")?
        {
            Some(history) => History::restore(history, config.history, config.interval, recorded)
                .with_context(|| format!("optimizer state '{key}'"))?,
            None => History::new(config.bits),
        };
        let key = format!("{name}.bsfa_directions");
        self.directions = Stored::read(state, &key, config.bits, config.rank, row, "rank")?;
        Ok(())
    }

    /// The device of every stored matrix of the block of parameter `name`, named as in
    /// checkpoints (4-bit history rows by their index).
    pub(super) fn devices(&self, name: &str) -> Vec<(String, Device)> {
        let mut out = self.history.devices(&format!("{name}.bsfa_history"));
        out.extend(
            self.directions
                .iter()
                .map(|s| (format!("{name}.bsfa_directions"), s.device().clone())),
        );
        out
    }

    /// Bytes held.
    pub(super) fn bytes(&self) -> usize {
        self.history.bytes() + self.directions.as_ref().map_or(0, Stored::bytes)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::bsfa::test_tensors::{max_diff, random};

    /// 4-bit state the CPU kernels cannot read (here bf16; on a GPU, every tensor) is kept
    /// as tensors where it lies; its checkpoint arrays are the host form's, and restore to
    /// either form with the same values.
    #[test]
    fn four_bit_state_is_kept_where_it_is_used_and_checkpoints_alike() {
        let (rows, cols) = (3, 64 * 2 + 9);
        let values = (random(rows, cols, 5) * 1e-3).unwrap();
        let bf16 = values.to_dtype(DType::BF16).unwrap();
        let kept = Stored::keep(&bf16, 4).unwrap();
        assert!(matches!(kept, Stored::Bits4Tensors { .. }));
        let host = Stored::keep(&bf16.to_dtype(DType::F32).unwrap(), 4).unwrap();
        assert!(matches!(host, Stored::Bits4 { .. }));
        let state: HashMap<String, Tensor> = kept.tensors("w").unwrap().into_iter().collect();
        let host_state: HashMap<String, Tensor> = host.tensors("w").unwrap().into_iter().collect();
        for suffix in QUANT_SUFFIXES {
            let key = format!("w.{suffix}");
            let (a, b) = (&state[&key], &host_state[&key]);
            assert_eq!(a.dims(), b.dims(), "{key}");
            let wide = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            assert_eq!(max_diff(&wide(a), &wide(b)), 0.0, "{key}");
        }
        let row = |dtype| RowKind {
            numel: cols,
            dtype,
            device: Device::Cpu,
        };
        let f32_values = |s: &Stored| -> Vec<f32> {
            let m = s.matrix().unwrap().to_dtype(DType::F32).unwrap();
            m.flatten_all().unwrap().to_vec1().unwrap()
        };
        let as_bf16 = Stored::read(&state, "w", 4, rows, &row(DType::BF16), "history")
            .unwrap()
            .unwrap();
        assert!(matches!(as_bf16, Stored::Bits4Tensors { .. }));
        assert_eq!(f32_values(&as_bf16), f32_values(&kept));
        let as_f32 = Stored::read(&state, "w", 4, rows, &row(DType::F32), "history")
            .unwrap()
            .unwrap();
        assert!(matches!(as_f32, Stored::Bits4 { .. }));
        let host_rounded: Vec<f32> = Tensor::new(f32_values(&as_f32).as_slice(), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(host_rounded, f32_values(&kept));
        // Rows split and stacked again (the history's round trip) keep the values.
        let rows_back = Stored::stack(&kept.into_rows().unwrap().iter().collect::<Vec<_>>());
        assert_eq!(f32_values(&rows_back.unwrap()), f32_values(&as_bf16));
    }
}
