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
        let row = datasheet(&name)?;
        Some(Peak {
            tflops: row.tflops(dtype),
            source: format!(
                "datasheet: {} (the device reports '{name}'), dense {dtype}",
                row.product
            ),
        })
    }))
}

/// One row of the datasheet table: a product and the exact names its devices report.
#[derive(Debug, PartialEq)]
struct Datasheet {
    /// The product, as its datasheet names it.
    product: &'static str,
    /// What `nvidia-smi` (and the driver's `cuDeviceGetName`) report for it, exactly.
    names: &'static [&'static str],
    /// Dense tensor-core bf16 TFLOP/s (f32 accumulation).
    bf16: f64,
    /// f32 TFLOP/s without TF32 (candle's default).
    f32: f64,
}

impl Datasheet {
    fn tflops(&self, dtype: Precision) -> f64 {
        match dtype {
            Precision::Bf16 => self.bf16,
            _ => self.f32,
        }
    }
}

/// Dense TFLOP/s of NVIDIA GPUs from their datasheets, by the exact product names their
/// devices report. Exact, not "contains": an H100 SXM, PCIe and NVL all have "H100" in
/// their names and differ by a quarter in peak; a name missing here gives no MFU (set
/// `--peak-tflops`) rather than another product's figure.
const DATASHEETS: &[Datasheet] = &[
    Datasheet {
        product: "H100 SXM5",
        names: &["NVIDIA H100 80GB HBM3", "NVIDIA H100 64GB HBM3"],
        bf16: 989.4,
        f32: 66.9,
    },
    Datasheet {
        product: "H100 PCIe",
        names: &["NVIDIA H100 PCIe"],
        bf16: 756.5,
        f32: 51.2,
    },
    Datasheet {
        product: "H100 NVL",
        names: &["NVIDIA H100 NVL"],
        bf16: 835.5,
        f32: 60.0,
    },
    Datasheet {
        product: "H200 SXM",
        names: &["NVIDIA H200"],
        bf16: 989.4,
        f32: 66.9,
    },
    Datasheet {
        product: "H200 NVL",
        names: &["NVIDIA H200 NVL"],
        bf16: 835.5,
        f32: 60.0,
    },
    Datasheet {
        product: "GH200",
        names: &["NVIDIA GH200 480GB", "NVIDIA GH200 144G HBM3e"],
        bf16: 989.4,
        f32: 66.9,
    },
    Datasheet {
        product: "B200",
        names: &["NVIDIA B200"],
        bf16: 2250.0,
        f32: 80.0,
    },
    Datasheet {
        product: "A100",
        names: &[
            "NVIDIA A100-SXM4-40GB",
            "NVIDIA A100-SXM4-80GB",
            "NVIDIA A100-PCIE-40GB",
            "NVIDIA A100 80GB PCIe",
        ],
        bf16: 312.0,
        f32: 19.5,
    },
    Datasheet {
        product: "A10",
        names: &["NVIDIA A10"],
        bf16: 125.0,
        f32: 31.2,
    },
    Datasheet {
        product: "L40S",
        names: &["NVIDIA L40S"],
        bf16: 362.0,
        f32: 91.6,
    },
    Datasheet {
        product: "L40",
        names: &["NVIDIA L40"],
        bf16: 181.0,
        f32: 90.5,
    },
    Datasheet {
        product: "L4",
        names: &["NVIDIA L4"],
        bf16: 121.0,
        f32: 30.3,
    },
    Datasheet {
        product: "GeForce RTX 4090",
        names: &["NVIDIA GeForce RTX 4090"],
        bf16: 165.2,
        f32: 82.6,
    },
    Datasheet {
        product: "GeForce RTX 3090",
        names: &["NVIDIA GeForce RTX 3090"],
        bf16: 71.0,
        f32: 35.6,
    },
];

/// The datasheet row of the device named `name` (surrounding spaces ignored).
fn datasheet(name: &str) -> Option<&'static Datasheet> {
    DATASHEETS
        .iter()
        .find(|row| row.names.contains(&name.trim()))
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
    fn datasheet_rows_match_exact_product_names_only() {
        let bf16 = |name| datasheet(name).map(|row| row.tflops(Precision::Bf16));
        assert_eq!(bf16("NVIDIA H100 80GB HBM3"), Some(989.4));
        assert_eq!(bf16("NVIDIA H100 PCIe"), Some(756.5));
        assert_eq!(bf16("NVIDIA H100 NVL"), Some(835.5));
        assert_eq!(bf16("NVIDIA H200"), Some(989.4));
        assert_eq!(bf16("NVIDIA H200 NVL"), Some(835.5));
        assert_eq!(
            datasheet("NVIDIA H200").map(|r| r.product),
            Some("H200 SXM")
        );
        assert_eq!(
            datasheet("NVIDIA A100-SXM4-80GB").map(|row| row.tflops(Precision::F32)),
            Some(19.5)
        );
        // Unknown products and partial names get no row, not a neighbour's.
        for name in [
            "Tesla T4",
            "H100",
            "NVIDIA H100",
            "NVIDIA L40S-X",
            "NVIDIA H100 PCIe 2",
        ] {
            assert_eq!(datasheet(name), None, "{name}");
        }
        // Every name belongs to one row.
        let names: Vec<_> = DATASHEETS.iter().flat_map(|r| r.names.iter()).collect();
        let unique: std::collections::HashSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len());
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
