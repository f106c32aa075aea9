//! How tensors travel between ranks: their values as little-endian bytes.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// A tensor's values as they travel: f64 stays f64, every other float type goes as f32
/// (exact for bf16 and f16), so sums never lose precision in transit.
pub(super) enum Values {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl Values {
    /// The values of `t`, flattened.
    pub(super) fn of(t: &Tensor) -> Result<Self> {
        let flat = t.flatten_all()?;
        Ok(match t.dtype() {
            DType::F64 => Self::F64(flat.to_vec1()?),
            DType::F32 | DType::BF16 | DType::F16 => {
                Self::F32(flat.to_dtype(DType::F32)?.to_vec1()?)
            }
            other => bail!("collectives carry float tensors, got {other:?}"),
        })
    }

    /// Decodes `bytes` as values of this kind and length.
    pub(super) fn like(&self, bytes: &[u8]) -> Result<Self> {
        let (len, size) = match self {
            Self::F32(v) => (v.len(), 4),
            Self::F64(v) => (v.len(), 8),
        };
        if bytes.len() != len * size {
            bail!("{} bytes, expected {}", bytes.len(), len * size);
        }
        Ok(match self {
            Self::F32(_) => Self::F32(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                    .collect(),
            ),
            Self::F64(_) => Self::F64(
                bytes
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
                    .collect(),
            ),
        })
    }

    /// The values as they go on the wire.
    pub(super) fn to_bytes(&self) -> Vec<u8> {
        match self {
            Self::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Self::F64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    /// Adds `other` element-wise.
    pub(super) fn add(&mut self, other: &Self) {
        match (self, other) {
            (Self::F32(a), Self::F32(b)) => a.iter_mut().zip(b).for_each(|(a, b)| *a += b),
            (Self::F64(a), Self::F64(b)) => a.iter_mut().zip(b).for_each(|(a, b)| *a += b),
            _ => unreachable!("values decoded with `like` share the kind"),
        }
    }

    /// The values as a tensor shaped, typed and placed like `like`.
    pub(super) fn tensor(self, like: &Tensor) -> Result<Tensor> {
        let cpu = candle_core::Device::Cpu;
        let t = match self {
            Self::F32(v) => Tensor::from_vec(v, like.shape(), &cpu)?,
            Self::F64(v) => Tensor::from_vec(v, like.shape(), &cpu)?,
        };
        Ok(t.to_dtype(like.dtype())?.to_device(like.device())?)
    }
}
