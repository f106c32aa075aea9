//! Where tensors live and in which precision the model computes.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

/// The `train.device` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// The CPU, with the fused kernels.
    Cpu,
    /// The rank's CUDA device: local rank `LOCAL_RANK` among the GPUs it sees.
    Cuda,
    /// CUDA when this build has it and a GPU is present, else the CPU.
    Auto,
}

/// The device for `spec` on a rank whose GPU is CUDA ordinal `gpu` (see
/// [`crate::dist::env::gpu_ordinal`]).
pub fn select(spec: DeviceKind, gpu: usize) -> Result<Device> {
    match spec {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Cuda => {
            if !cfg!(feature = "cuda") {
                bail!(
                    "--device cuda: this binary was built without CUDA; rebuild with \
                     `cargo build --release --features cuda,nccl` (or use the Docker image)"
                );
            }
            Device::new_cuda(gpu).with_context(|| {
                format!(
                    "cannot open CUDA device {gpu} (this rank's local rank among the GPUs it \
                     sees, CUDA_VISIBLE_DEVICES='{}'); is a GPU visible?",
                    std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default()
                )
            })
        }
        DeviceKind::Auto if cfg!(feature = "cuda") && candle_core::utils::cuda_is_available() => {
            select(DeviceKind::Cuda, gpu)
        }
        DeviceKind::Auto => Ok(Device::Cpu),
    }
}

/// The model's compute precision (`train.dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 throughout.
    F32,
    /// bf16 weights and activations in the forward and backward passes; f32 master weights,
    /// gradients and optimizer state.
    Bf16,
    /// bf16 on a GPU, f32 on the CPU (whose fused kernels compute in f32); resolved with
    /// [`Precision::on`] once the device is known.
    Auto,
}

impl Precision {
    /// This precision on `device`: `auto` becomes bf16 on CUDA and f32 elsewhere.
    pub fn on(self, device: &Device) -> Self {
        match self {
            Self::Auto if device.is_cuda() => Self::Bf16,
            Self::Auto => Self::F32,
            fixed => fixed,
        }
    }

    /// The candle type the model computes in (an unresolved `auto`: the CPU's f32).
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 | Self::Auto => DType::F32,
            Self::Bf16 => DType::BF16,
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::Auto => "auto",
        })
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
