//! Where tensors live and in which precision the model computes.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

/// The `train.device` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda,
    /// CUDA when this build has it and a GPU is present, else the CPU.
    Auto,
}

impl DeviceKind {
    /// Parses `cpu`, `cuda` or `auto`.
    pub fn parse(spec: &str) -> Result<Self> {
        match spec {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda),
            "auto" => Ok(Self::Auto),
            other => bail!("train.device must be cpu, cuda or auto, got '{other}'"),
        }
    }
}

/// The device for `spec` on a rank whose local rank is `local_rank` (its GPU ordinal).
pub fn select(spec: &str, local_rank: usize) -> Result<Device> {
    match DeviceKind::parse(spec)? {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Cuda => {
            if !cfg!(feature = "cuda") {
                bail!(
                    "--device cuda: this binary was built without CUDA; rebuild with \
                     `cargo build --release --features cuda,nccl` (or use the Docker image)"
                );
            }
            Device::new_cuda(local_rank).with_context(|| {
                format!("cannot open CUDA device {local_rank} (LOCAL_RANK); is a GPU visible?")
            })
        }
        DeviceKind::Auto if cfg!(feature = "cuda") && candle_core::utils::cuda_is_available() => {
            select("cuda", local_rank)
        }
        DeviceKind::Auto => Ok(Device::Cpu),
    }
}

/// The model's compute type for `train.dtype`: `f32` or `bf16`.
pub fn compute_dtype(spec: &str) -> Result<DType> {
    match spec {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        other => bail!("train.dtype must be f32 or bf16, got '{other}'"),
    }
}

/// A device's name for messages and summaries.
pub fn name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}
