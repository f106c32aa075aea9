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

/// The `train.kernels` setting: which implementation of the model ops and optimizer updates
/// a run executes. Every op has two: a fused CPU kernel (f32/f64 on the CPU) and a reference
/// composition of candle primitives, which is what runs on a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kernels {
    /// The fused kernels wherever they apply (f32 on the CPU), the reference elsewhere.
    Auto,
    /// The fused kernels, and an error at start-up for a run they cannot serve (a GPU, bf16).
    Fused,
    /// The reference compositions and tensor-op updates everywhere: on the CPU, exactly the
    /// ops a CUDA run executes.
    Reference,
}

impl Kernels {
    /// Fails when `fused` is asked of a run on a GPU (`on_cpu` false) or in bf16; the message
    /// names the fix. An unresolved `auto` device or precision passes: the config check calls
    /// this before the device is known, [`Kernels::apply`] again once it is.
    pub fn check(self, on_cpu: bool, precision: Precision) -> Result<()> {
        if self != Self::Fused {
            return Ok(());
        }
        if !on_cpu {
            bail!(
                "train.kernels = fused: the fused kernels run on the CPU only, and this run is on \
                 a GPU; use train.kernels=auto (or reference), or --device cpu"
            );
        }
        if precision == Precision::Bf16 {
            bail!(
                "train.kernels = fused: the fused kernels compute in f32, and this run computes \
                 in bf16; use --dtype f32, or train.kernels=auto (or reference)"
            );
        }
        Ok(())
    }

    /// Makes this the choice of the whole process, for a run on `device` computing in
    /// `precision` (resolved): the ops read it, not a config, so it holds for every op and
    /// optimizer step until the next run starts, and runs sharing a process at the same time
    /// must agree on it. `fused` where the fused kernels cannot run is an error.
    pub fn apply(self, device: &Device, precision: Precision) -> Result<()> {
        self.check(device.is_cpu(), precision)?;
        crate::cpu::set_reference_only(self == Self::Reference);
        Ok(())
    }
}

impl std::fmt::Display for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Fused => "fused",
            Self::Reference => "reference",
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
