//! Whether a run, or a checkpoint's model, fits its device's memory, estimated from the
//! config before anything is allocated. A config with huge sizes (from the command line or
//! an edited `trainer.json`) is then an error stating the memory needed and the memory there
//! is, not an allocator abort ("memory allocation failed") after minutes of work.
//!
//! The estimate is a lower bound, counted as `--dry-run` counts it but from the shape alone
//! (nothing is built): f32 weights, gradients (twice when micro-batches accumulate), the base
//! optimizer's moments and one micro-batch's activations, plus CUDA's own on a GPU; not BSFA's
//! state or the allocator's slack. So a run it refuses cannot fit; one it passes may still
//! not (`--dry-run --gpu-memory` measures the step's peak). Sizes whose byte counts overflow
//! 64-bit arithmetic are refused as such. Where the memory cannot be read (no
//! `/proc/meminfo`), nothing is checked.

use crate::config::RunConfig;
use crate::memory::CUDA_RUNTIME_BYTES;
use crate::optim::OptimizerName;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

/// What the memory is needed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Training (or `bench`) as one rank of `world`: weights, gradients, optimizer state and
    /// one micro-batch's activations.
    Training {
        /// Ranks in the job: each takes its share of the batch.
        world: usize,
    },
    /// Reading a checkpoint (`eval`, `export`, `sample`, a resume) on the host: the model's
    /// weights as read from `model.safetensors` (on the CPU the model they are copied into
    /// holds them again; on a GPU it does not) and the activations of one sequence.
    Loading,
}

/// The bytes a workload needs, by part.
#[derive(Debug)]
pub struct Need {
    /// What each part is, and its bytes.
    pub parts: Vec<(String, usize)>,
    /// Their sum.
    pub total: usize,
}

impl Need {
    /// What `config` (resolved for `device`) needs for `workload`; an error when a byte
    /// count overflows `usize`, naming the keys to lower.
    pub fn of(config: &RunConfig, device: &Device, workload: Workload) -> Result<Self> {
        let spec = config.spec();
        let params = spec.parameter_count().with_context(|| {
            format!(
                "the {}'s parameter count overflows 64-bit arithmetic: the sizes in the \
                 config's `{}` section are far beyond any machine's memory; lower them",
                spec.name(),
                spec.section()
            )
        })?;
        let f32_bytes = |copies: usize| {
            params
                .checked_mul(copies * DType::F32.size_in_bytes())
                .with_context(|| {
                    format!(
                        "{params} parameters in f32 overflow 64-bit arithmetic; lower the \
                         sizes in the config's `{}` section",
                        spec.section()
                    )
                })
        };
        let train = &config.train;
        let mut parts = Vec::new();
        let (micro_batch, elem, what) = match workload {
            Workload::Training { world } => {
                parts.push(("weights".to_string(), f32_bytes(1)?));
                let micro_batch = train.micro_batch_per_rank(world);
                let accumulating = micro_batch.saturating_mul(world.max(1)) < train.batch_size;
                parts.push(("gradients".into(), f32_bytes(1 + accumulating as usize)?));
                // AdamW keeps two moments per weight, Adam-mini one (and one per block).
                let moments = match config.optimizer.name {
                    OptimizerName::AdamW => 2,
                    OptimizerName::AdamMini => 1,
                };
                let state = format!("{} state", config.optimizer.name);
                parts.push((state, f32_bytes(moments)?));
                let dtype = config.precision_on(device.is_cuda()).dtype();
                (micro_batch, dtype.size_in_bytes(), "one micro-batch")
            }
            Workload::Loading => {
                parts.push(("weights as read".into(), f32_bytes(1)?));
                (1, DType::F32.size_in_bytes(), "one sequence")
            }
        };
        let activations = spec
            .activation_bytes(micro_batch, train.seq_len, elem)
            .with_context(|| {
                format!(
                    "the activations of {what} ({}) overflow 64-bit arithmetic; lower \
                     train.batch_size (or train.micro_batch_size), train.seq_len or the \
                     model's sizes",
                    spec.batch_shape(micro_batch, train.seq_len)
                )
            })?;
        parts.push((
            format!(
                "activations of {what} of {}",
                spec.batch_shape(micro_batch, train.seq_len)
            ),
            activations,
        ));
        if device.is_cuda() {
            parts.push(("CUDA's context".into(), CUDA_RUNTIME_BYTES as usize));
        }
        let total = parts
            .iter()
            .try_fold(0usize, |sum, (_, bytes)| sum.checked_add(*bytes))
            .context("the memory needed overflows 64-bit arithmetic; lower the model's sizes")?;
        Ok(Self { parts, total })
    }
}

/// Fails, before anything is allocated, when `config`'s `workload` cannot fit `device`'s
/// memory: the error states the memory needed (by part) and the memory there is, and what
/// to lower.
pub fn check(config: &RunConfig, device: &Device, workload: Workload) -> Result<()> {
    let need = Need::of(config, device, workload)?;
    let Some((available, whose, source)) = available(device)? else {
        return Ok(());
    };
    if need.total <= available {
        return Ok(());
    }
    let parts: Vec<String> = need
        .parts
        .iter()
        .map(|(what, bytes)| format!("{what} {}", size(*bytes)))
        .collect();
    let doing = match workload {
        Workload::Training { .. } => "training this model needs",
        Workload::Loading => "loading this model needs",
    };
    bail!(
        "{doing} at least {} of memory ({}), and {whose} {} ({source}); lower the model's \
         sizes (`{}` section), train.batch_size (or train.micro_batch_size) or \
         train.seq_len, or use a machine with more memory (--dry-run prints the estimate)",
        size(need.total),
        parts.join(", "),
        size(available),
        config.spec().section()
    )
}

/// `device`'s memory in bytes, whose it is and where the figure comes from, when it can be
/// read.
fn available(device: &Device) -> Result<Option<(usize, &'static str, &'static str)>> {
    if device.is_cuda() {
        let gpu = crate::device::cuda_memory(device)?;
        return Ok(gpu.map(|bytes| (bytes, "the GPU has", "its total memory")));
    }
    let Ok(text) = std::fs::read_to_string("/proc/meminfo") else {
        return Ok(None);
    };
    let total = mem_total(&text);
    Ok(total.map(|bytes| (bytes, "this machine has", "MemTotal in /proc/meminfo")))
}

/// `MemTotal` of a `/proc/meminfo` text, in bytes.
fn mem_total(meminfo: &str) -> Option<usize> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// `bytes` in the largest binary unit (up to PiB) that keeps it at 1 or more.
fn size(bytes: usize) -> String {
    let mut value = bytes as f64;
    for unit in ["B", "KiB", "MiB", "GiB", "TiB"] {
        if value < 1024.0 {
            return format!("{value:.1} {unit}");
        }
        value /= 1024.0;
    }
    format!("{value:.1} PiB")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_total_and_sizes_read_as_people_do() {
        let meminfo = "MemTotal:       16314332 kB\nMemFree:         1234 kB\n";
        assert_eq!(mem_total(meminfo), Some(16314332 * 1024));
        assert_eq!(mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(size(512), "512.0 B");
        assert_eq!(size(3 << 30), "3.0 GiB");
        assert_eq!(size(5 << 40), "5.0 TiB");
        assert_eq!(size(usize::MAX), "16384.0 PiB");
    }
}
