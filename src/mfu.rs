//! Model FLOPs utilisation and memory: the peak FLOP/s of one rank's device, the utilisation
//! a throughput reaches against it, and what a process holds in memory. (A network's
//! training FLOPs per token are its spec's: `ModelSpec::flops_per_unit` (module `model`).)

use crate::device::Precision;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use std::time::Instant;

/// Model FLOPs utilisation: the model FLOP/s of `tokens_per_s` (all ranks) over the peak
/// of all `ranks` devices.
pub fn utilisation(flops_per_token: f64, tokens_per_s: f64, peak_tflops: f64, ranks: usize) -> f64 {
    flops_per_token * tokens_per_s / (peak_tflops * 1e12 * ranks as f64)
}

/// The peak dense FLOP/s of one rank's device that MFU is measured against.
#[derive(Debug, Clone, Serialize)]
pub struct Peak {
    pub tflops: f64,
    /// Where the figure comes from: `--peak-tflops`, a GPU's datasheet, or a measurement.
    pub source: String,
}

/// The peak of `device` computing in `precision`: `given` (`train.peak_tflops`) when set; on
/// a known NVIDIA GPU its datasheet's dense figure; on the CPU the rate of a short f32 matrix
/// product on this process's threads (measured here, so it says what this machine reaches,
/// not a spec). None on a GPU this table does not know (set `--peak-tflops`).
pub fn peak(given: Option<f64>, precision: Precision, device: &Device) -> Result<Option<Peak>> {
    if let Some(tflops) = given {
        return Ok(Some(Peak {
            tflops,
            source: "--peak-tflops".into(),
        }));
    }
    let dtype = precision.on(device);
    if device.is_cpu() {
        let tflops = measure_cpu_tflops()?;
        return Ok(Some(Peak {
            tflops,
            source: "measured: f32 matmul 1024^3 on this process's threads".into(),
        }));
    }
    Ok(gpu_name(device).and_then(|name| {
        datasheet_tflops(&name, dtype).map(|tflops| Peak {
            tflops,
            source: format!("datasheet: {name}, dense {dtype}"),
        })
    }))
}

/// Dense tensor-core TFLOP/s of common NVIDIA GPUs from their datasheets: bf16, and f32 as
/// it runs without TF32 (candle's default).
fn datasheet_tflops(name: &str, dtype: Precision) -> Option<f64> {
    const TABLE: &[(&str, f64, f64)] = &[
        // (name contains, bf16, f32)
        ("H200", 989.0, 67.0),
        ("H100 PCIe", 756.0, 51.0),
        ("H100", 989.0, 67.0),
        ("GH200", 989.0, 67.0),
        ("B200", 2250.0, 80.0),
        ("A100", 312.0, 19.5),
        ("A10", 125.0, 31.2),
        ("L40S", 362.0, 91.6),
        ("L40", 181.0, 90.5),
        ("L4", 121.0, 30.3),
        ("RTX 4090", 165.0, 82.6),
        ("RTX 3090", 71.0, 35.6),
    ];
    let (_, bf16, f32) = TABLE.iter().find(|(key, _, _)| name.contains(key))?;
    Some(match dtype {
        Precision::Bf16 => *bf16,
        _ => *f32,
    })
}

#[cfg(feature = "cuda")]
fn gpu_name(device: &Device) -> Option<String> {
    let cuda = device.as_cuda_device().ok()?;
    cuda.cuda_stream().context().name().ok()
}

#[cfg(not(feature = "cuda"))]
fn gpu_name(_device: &Device) -> Option<String> {
    None
}

/// TFLOP/s of the best of eight 1024 x 1024 x 1024 f32 matrix products (after one to warm
/// up), about 0.2 s on two cores. It varies from run to run by up to a third on a busy
/// machine: the MFU it gives is an indication, and the summary says it was measured.
fn measure_cpu_tflops() -> Result<f64> {
    const N: usize = 1024;
    let a = Tensor::ones((N, N), DType::F32, &Device::Cpu)?;
    let mut best = f64::INFINITY;
    for round in 0..9 {
        let started = Instant::now();
        let c = a.matmul(&a)?;
        // Reading one value waits for the product.
        c.get(0)?.get(0)?.to_scalar::<f32>()?;
        if round > 0 {
            best = best.min(started.elapsed().as_secs_f64());
        }
    }
    Ok(2.0 * (N * N * N) as f64 / best / 1e12)
}

/// What this process holds in memory, MiB: now and at its peak. On the CPU its resident
/// set (`VmRSS`, `VmHWM`); on a GPU the device's used memory (all processes on it) now,
/// with the peak of the readings so far kept by the caller.
pub fn memory_mib(device: &Device) -> Option<(f64, f64)> {
    if device.is_cpu() {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let field = |name: &str| -> Option<f64> {
            let line = status.lines().find(|l| l.starts_with(name))?;
            let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib / 1024.0)
        };
        return Some((field("VmRSS:")?, field("VmHWM:")?));
    }
    gpu_used_mib(device).map(|used| (used, used))
}

#[cfg(feature = "cuda")]
fn gpu_used_mib(device: &Device) -> Option<f64> {
    let cuda = device.as_cuda_device().ok()?;
    let (free, total) = cuda.cuda_stream().context().mem_get_info().ok()?;
    Some((total - free) as f64 / (1024.0 * 1024.0))
}

#[cfg(not(feature = "cuda"))]
fn gpu_used_mib(_device: &Device) -> Option<f64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datasheet_lookup_prefers_the_specific_name() {
        assert_eq!(
            datasheet_tflops("NVIDIA H100 PCIe", Precision::Bf16),
            Some(756.0)
        );
        assert_eq!(
            datasheet_tflops("NVIDIA H100 80GB HBM3", Precision::Bf16),
            Some(989.0)
        );
        assert_eq!(datasheet_tflops("NVIDIA H200", Precision::F32), Some(67.0));
        assert_eq!(
            datasheet_tflops("NVIDIA L40S", Precision::Bf16),
            Some(362.0)
        );
        assert_eq!(datasheet_tflops("Tesla T4", Precision::Bf16), None);
    }

    #[test]
    fn cpu_peak_is_measured_and_plausible() -> Result<()> {
        let tflops = measure_cpu_tflops()?;
        // Between 1 GFLOP/s and 100 TFLOP/s on any CPU.
        assert!((1e-3..100.0).contains(&tflops), "{tflops}");
        Ok(())
    }

    #[test]
    fn memory_of_this_process_is_known_on_linux() {
        let (now, peak) = memory_mib(&Device::Cpu).expect("/proc/self/status");
        assert!(now > 0.0 && peak >= now, "{now} {peak}");
    }
}
