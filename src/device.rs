//! Where tensors live and in which precision the model computes.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// The `train.device` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// The CPU, with the fused kernels.
    Cpu,
    /// The rank's CUDA device: local rank `LOCAL_RANK` among the GPUs it sees.
    Cuda,
    /// CUDA when this build has it and the driver reports a GPU, else the CPU (a CUDA build
    /// says so in a one-line note on stderr). A CUDA build links the CUDA libraries (the
    /// driver's `libcuda.so.1` among them) at start-up: where one is missing the binary does
    /// not start at all, with the loader's message, so `auto` falls back only where the
    /// libraries load but the driver finds no GPU or cannot start (the compile-only
    /// toolchain's stub driver, a driver too old for CUDA 13).
    Auto,
}

/// The device for `spec` on a rank whose GPU is CUDA ordinal `gpu` (see
/// `dist::env::gpu_ordinal`).
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
            open_cuda(gpu)
        }
        // candle's `cuda_is_available()` only says whether the build has CUDA; ask the
        // driver how many GPUs this process sees instead. A GPU present but not this rank's
        // ordinal is an error (as `cuda` is), not a silent CPU rank in a GPU job.
        DeviceKind::Auto => match cuda_devices() {
            Ok(n) if n > 0 => select(DeviceKind::Cuda, gpu),
            Ok(_) if !cfg!(feature = "cuda") => Ok(Device::Cpu),
            found => {
                let why = match found {
                    Ok(_) => "the driver reports no GPU".to_string(),
                    Err(e) => format!("{e:#}"),
                };
                eprintln!("note: --device auto: no usable CUDA device ({why}); running on the CPU");
                Ok(Device::Cpu)
            }
        },
    }
}

/// CUDA device `gpu` with a CUDA stream of its own, on which candle runs every kernel and
/// copy of the device and NCCL its collectives (`dist::nccl`).
///
/// Why not `Device::new_cuda`: it uses the per-thread default stream, a handle that means
/// "the default stream of the calling thread". NCCL 2.27+ launches the collectives of a
/// communicator with several ranks from a thread of its own, where that handle names *its*
/// default stream: the all-reduce would then not be ordered after the backward that wrote
/// the gradients, nor the barrier's event after the all-reduce. An explicit stream is the
/// same stream from every thread. Every CUDA device of this crate (the binary, the tests)
/// is opened here.
pub fn open_cuda(gpu: usize) -> Result<Device> {
    let device = Device::new_cuda_with_stream(gpu).with_context(|| {
        format!(
            "cannot open CUDA device {gpu} (this rank's local rank among the GPUs it \
             sees, CUDA_VISIBLE_DEVICES='{}'); is a GPU visible?",
            std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default()
        )
    })?;
    #[cfg(feature = "cuda")]
    {
        // A context with a stream of its own is in cudarc's "multi-stream mode", where every
        // buffer records a CUDA event at each use (microseconds per kernel argument) so that
        // other streams can wait for it. Everything of this device runs on its one stream
        // (NCCL included), which orders the work by itself: the events would buy nothing.
        // SAFETY: no buffer of this context is used on another stream; buffers made from here
        // on skip the events (candle's device made none yet that a kernel reads).
        let cuda = device.as_cuda_device()?;
        unsafe { cuda.cuda_stream().context().disable_event_tracking() };
    }
    Ok(device)
}

/// CUDA devices this process sees, as the driver reports them (0 in a build without CUDA);
/// an error when the driver cannot be initialised (the compile-only toolchain's stub
/// library, a driver older than the CUDA the build needs, a broken install).
pub fn cuda_devices() -> Result<usize> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::result;
        // The code alone (e.g. CUDA_ERROR_NO_DEVICE, CUDA_ERROR_STUB_LIBRARY): the driver's
        // description is unavailable exactly when it cannot start.
        let code = |e: result::DriverError| anyhow::anyhow!("{:?}", e.0);
        result::init().map_err(code)?;
        let n = result::device::get_count().map_err(code)?;
        Ok(usize::try_from(n).unwrap_or(0))
    }
    #[cfg(not(feature = "cuda"))]
    Ok(0)
}

/// Total memory of `device` in bytes, when it is a CUDA device (the driver's figure).
pub fn cuda_memory(device: &Device) -> Result<Option<usize>> {
    #[cfg(feature = "cuda")]
    if let candle_core::DeviceLocation::Cuda { gpu_id } = device.location() {
        use candle_core::cuda_backend::cudarc::driver::result;
        let code = |e: result::DriverError| anyhow::anyhow!("{:?}", e.0);
        let ordinal = i32::try_from(gpu_id)?;
        let handle = result::device::get(ordinal).map_err(code)?;
        // SAFETY: `handle` is a device the driver just returned, and the driver is
        // initialised (the device exists).
        let bytes = unsafe { result::device::total_mem(handle) }.map_err(code)?;
        return Ok(Some(bytes));
    }
    let _ = device;
    Ok(None)
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
        self.on_gpu(device.is_cuda())
    }

    /// This precision on a GPU (`gpu`) or the CPU, for a device that need not exist here.
    pub fn on_gpu(self, gpu: bool) -> Self {
        match self {
            Self::Auto if gpu => Self::Bf16,
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
    /// The fused kernels: on the CPU in f32 (an error at start-up in bf16); on a GPU ours,
    /// with a failed self-check an error instead of a fall-back.
    Fused,
    /// The reference compositions and tensor-op updates everywhere: on the CPU, exactly the
    /// ops a CUDA run executes.
    Reference,
}

impl Kernels {
    /// Fails when `fused` is asked of a run on the CPU in bf16 (`on_cpu`): the CPU's fused
    /// kernels compute in f32; the message names the fix. On a GPU `fused` means our GPU
    /// kernels, with a failed self-check an error ([`self_check_failure`]). An unresolved
    /// `auto` device or precision passes: the config check calls this before the device is
    /// known, [`Kernels::apply`] again once it is.
    pub fn check(self, on_cpu: bool, precision: Precision) -> Result<()> {
        if self == Self::Fused && on_cpu && precision == Precision::Bf16 {
            bail!(
                "train.kernels = fused: the CPU's fused kernels compute in f32, and this run \
                 computes in bf16; use --dtype f32, or train.kernels=auto (or reference)"
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
        crate::cpu_kernels::set_reference_only(self == Self::Reference);
        SELF_CHECKS.set_strict(self == Self::Fused && !device.is_cpu());
        Ok(())
    }
}

/// What a failed self-check of our GPU kernels does: under `train.kernels = fused` on a GPU
/// (strict) it stops the run, otherwise the op warns and takes the reference composition.
/// Process-wide, as the choice of kernels is ([`SELF_CHECKS`], set by [`Kernels::apply`]).
pub(crate) struct SelfChecks {
    strict: AtomicBool,
    /// The first failure while strict, until reported.
    failure: Mutex<Option<String>>,
}

/// The process's [`SelfChecks`].
static SELF_CHECKS: SelfChecks = SelfChecks::new();

impl SelfChecks {
    const fn new() -> Self {
        Self {
            strict: AtomicBool::new(false),
            failure: Mutex::new(None),
        }
    }

    fn set_strict(&self, on: bool) {
        self.strict.store(on, Ordering::Relaxed);
    }

    /// Notes that the GPU kernels `what` failed their self-check (`why`, with the GPU and
    /// the shape); returns whether that is an error, which [`SelfChecks::failure`] reports.
    #[cfg(any(feature = "cuda", test))]
    fn failed(&self, what: &str, why: &str) -> bool {
        if !self.strict.load(Ordering::Relaxed) {
            return false;
        }
        if let Ok(mut failure) = self.failure.lock() {
            failure.get_or_insert_with(|| {
                format!(
                    "train.kernels = fused: the GPU's {what} kernels failed their self-check \
                     ({why}); use train.kernels=auto to run on with the reference ops for them \
                     (slower, the same math), and report this with the output of \
                     `bsfa-train bench --kernels`"
                )
            });
        }
        true
    }

    /// The first strict failure as an error, once.
    fn failure(&self) -> Result<()> {
        match self.failure.lock().ok().and_then(|mut f| f.take()) {
            Some(message) => bail!(message),
            None => Ok(()),
        }
    }
}

/// Notes that the GPU kernels `what` failed their self-check (`why`). Returns whether that
/// is an error (`train.kernels = fused` on a GPU), which [`self_check_failure`] reports;
/// otherwise the caller warns and takes the reference ops. The op that found the failure
/// computes with the reference ops either way: a self-check runs inside an op, which cannot
/// fail the step without losing it.
#[cfg(feature = "cuda")]
pub(crate) fn strict_self_check_failed(what: &str, why: &str) -> bool {
    SELF_CHECKS.failed(what, why)
}

/// An error for a GPU kernel that failed its self-check under `train.kernels = fused` (the
/// training loop asks after every step and evaluation); `Ok` otherwise.
pub fn self_check_failure() -> Result<()> {
    SELF_CHECKS.failure()
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

/// Lets (or forbids) CUDA's f32 matrix products use TF32 (`train.tf32`), for the whole
/// process; candle's default is strict f32. Nothing to do on the CPU.
pub fn allow_tf32(enabled: bool) {
    candle_core::cuda::set_gemm_reduced_precision_f32(enabled);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `auto` opens a GPU when the driver reports one and falls back to the CPU otherwise:
    /// in a CUDA build run without a GPU (the compile-only toolchain's stub driver, or a
    /// machine without GPUs) it must not fail.
    #[test]
    fn auto_falls_back_to_the_cpu_without_a_gpu() {
        let device = select(DeviceKind::Auto, 0).unwrap();
        let gpus = cuda_devices().unwrap_or(0);
        assert_eq!(device.is_cuda(), gpus > 0, "{gpus} GPUs");
        if !cfg!(feature = "cuda") {
            assert_eq!(gpus, 0);
            assert!(device.is_cpu());
        }
    }

    /// Under `train.kernels = fused` on a GPU a failed self-check is an error naming the
    /// kernels, reported once; otherwise it is only noted (the op warns and falls back).
    #[test]
    fn a_failed_self_check_is_an_error_only_when_strict() {
        let checks = super::SelfChecks::new();
        assert!(!checks.failed("attention", "not strict"));
        assert!(checks.failure().is_ok());
        // What `Kernels::apply(Fused, <a CUDA device>)` sets.
        checks.set_strict(true);
        assert!(checks.failed("attention", "GPU 0, BF16: 5e-1 > 3e-2"));
        assert!(checks.failed("swiglu", "a later one"));
        let err = checks.failure().unwrap_err().to_string();
        assert!(
            err.contains("train.kernels = fused")
                && err.contains("attention")
                && err.contains("5e-1"),
            "{err}"
        );
        assert!(!err.contains("swiglu"), "{err}");
        assert!(checks.failure().is_ok());
    }
}
