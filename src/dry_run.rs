//! `--dry-run`: parameter counts and a training-memory estimate, without training.

use crate::config::RunConfig;
use crate::device::Kernels;
use crate::dist;
use crate::memory::{Heap, StepPeak, CUDA_RUNTIME_BYTES};
use crate::model::{Param, ParamCounts};
use crate::optim::{self, BsfaConfig, Optimizer, OptimizerName};
use crate::task;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde_json::json;
use std::sync::Arc;

/// Prints what the run would be (its resolved config), parameter counts and a
/// training-memory estimate, without training. With `gpu_memory_gib`, or on a GPU (its own
/// memory), it also measures the step's peak GPU memory with `heap`, the process's counting
/// allocator (see [`crate::memory`]), and suggests the largest micro-batch that fits.
pub fn report(config: &RunConfig, heap: &dyn Heap, gpu_memory_gib: Option<f64>) -> Result<()> {
    let device = crate::device::select(config.train.device, 0)?;
    let as_given = config;
    let config = &config.on_device(&device);
    // Only checked: a dry run computes nothing.
    config
        .train
        .kernels
        .check(device.is_cpu(), config.train.dtype)?;
    eprintln!("{}", describe(config, &device));
    let params = task::params(config, &Device::Cpu)?;
    let counts = ParamCounts::of(&params);
    let state = StateBytes::of(config, &params)?;
    let elem = DType::F32.size_in_bytes();
    let weights = counts.total * elem;
    // Gradients, plus an accumulation buffer when the batch is split into micro-batches.
    let accumulating = config.train.micro_batch() < config.train.batch_size;
    let grads = counts.total * elem * if accumulating { 2 } else { 1 };
    let activations = config
        .spec()
        .activation_bytes(config.train.micro_batch(), config.train.seq_len, elem)
        .context("the activations' size overflows 64-bit arithmetic")?;
    let total = weights + grads + state.run + activations;
    print_counts(&counts);
    eprintln!(
        "estimated training memory (f32): {:.0} MiB = weights {:.0} + grads {:.0} + {} state {:.0} \
         + activations {:.0} (micro-batch {} x {})",
        mib(total),
        mib(weights),
        mib(grads),
        config.optimizer.name,
        mib(state.run),
        mib(activations),
        config.train.micro_batch(),
        config.train.seq_len
    );
    state.print(config.bsfa.bits);
    let budget = match gpu_memory_gib {
        Some(gib) if !(gib > 0.0 && gib.is_finite()) => {
            bail!("--gpu-memory must be a positive number of GiB, got {gib}")
        }
        Some(gib) => Some(gib * (1u64 << 30) as f64),
        None => crate::device::cuda_memory(&device)?.map(|b| b as f64),
    };
    let gpu = match budget {
        Some(budget) => {
            let accumulation = if accumulating { weights } else { 0 };
            let fixed = (weights + state.run + accumulation) as f64 + CUDA_RUNTIME_BYTES;
            Some(gpu_peak(as_given, heap, budget, fixed)?)
        }
        None => None,
    };
    let report = json!({
        "dry_run": true,
        "config": config,
        "params": counts,
        "memory_bytes": {
            "weights": weights,
            "grads": grads,
            "optimizer_state": state.run,
            "optimizer_state_by_optimizer": state.by_optimizer,
            "bsfa_extra_per_rank_by_ranks": state.bsfa_per_rank,
            "activations_estimate": activations,
            "total_estimate": total,
        },
        "gpu_memory": gpu,
    });
    println!("{report}");
    Ok(())
}

/// Bytes to MiB.
fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// Bytes in a JSON number (0 where it is not one).
fn bytes_in(value: &serde_json::Value) -> usize {
    value.as_u64().map_or(0, |b| b as usize)
}

/// Prints the parameter count, in total and by group.
fn print_counts(counts: &ParamCounts) {
    eprintln!(
        "parameters: {} ({:.2}M)",
        counts.total,
        counts.total as f64 / 1e6
    );
    for (group, n) in [
        ("embeddings", counts.embeddings),
        ("attention", counts.attention),
        ("mlp", counts.mlp),
        ("norms", counts.norms),
        ("head", counts.head),
    ] {
        eprintln!("  {group:<11} {n:>12}");
    }
}

/// The optimizer state of a model: of every optimizer and of BSFA, so their memory can be
/// compared, and of the run's own.
struct StateBytes {
    /// Each base optimizer's state; BSFA's once warmed up (full history and directions), at
    /// the configured precision (`bsfa_extra`) and at both (`bsfa_extra_<bits>bit`).
    by_optimizer: serde_json::Map<String, serde_json::Value>,
    /// BSFA sharded over 1, 2, 4 and 8 data-parallel ranks: the largest rank's share.
    bsfa_per_rank: serde_json::Map<String, serde_json::Value>,
    /// The run's optimizer: its base, plus BSFA's state when enabled.
    run: usize,
}

impl StateBytes {
    /// Builds every optimizer on `params` (one rank) and sizes BSFA's state.
    fn of(config: &RunConfig, params: &[Param]) -> Result<Self> {
        let mut by_optimizer = serde_json::Map::new();
        let single: Arc<dyn dist::Communicator> = Arc::new(dist::SingleRank);
        let blocks = task::adam_mini_blocks(config, params)?;
        let no_bsfa = BsfaConfig::default();
        for name in OptimizerName::ALL {
            let mut base = config.optimizer.clone();
            base.name = name;
            let optimizer = optim::build(&base, &no_bsfa, params, &blocks, &single)?;
            by_optimizer.insert(name.to_string(), json!(optimizer.state_bytes()));
        }
        let bsfa_state = optim::bsfa::steady_state_bytes(&config.bsfa, params)?;
        by_optimizer.insert("bsfa_extra".into(), json!(bsfa_state));
        for bits in [32, 4] {
            let mut at = config.bsfa.clone();
            at.bits = bits;
            let bytes = optim::bsfa::steady_state_bytes(&at, params)?;
            by_optimizer.insert(format!("bsfa_extra_{bits}bit"), json!(bytes));
        }
        let mut bsfa_per_rank = serde_json::Map::new();
        for world in [1, 2, 4, 8] {
            let shares = optim::bsfa::steady_state_bytes_per_rank(&config.bsfa, params, world)?;
            let largest = shares.iter().copied().max().unwrap_or(0);
            bsfa_per_rank.insert(world.to_string(), json!(largest));
        }
        let run = bytes_in(&by_optimizer[config.optimizer.name.as_str()])
            + if config.bsfa.enabled { bsfa_state } else { 0 };
        Ok(Self {
            by_optimizer,
            bsfa_per_rank,
            run,
        })
    }

    /// Prints the state of every optimizer, and BSFA's per rank at `bits`.
    fn print(&self, bits: usize) {
        let by_optimizer: Vec<String> = self
            .by_optimizer
            .iter()
            .map(|(name, b)| format!("{name} {:.0} MiB", mib(bytes_in(b))))
            .collect();
        eprintln!("optimizer state: {}", by_optimizer.join(", "));
        let per_rank: Vec<String> = self
            .bsfa_per_rank
            .iter()
            .map(|(world, b)| format!("{world} ranks {:.0} MiB", mib(bytes_in(b))))
            .collect();
        eprintln!(
            "bsfa state per rank at bsfa.bits={bits}: {}",
            per_rank.join(", ")
        );
    }
}

/// One rank's peak GPU memory on the reference path at the run's micro-batch, in the
/// precision `config` gives a GPU: the measured step peak plus `fixed` (weights, optimizer
/// state, accumulation buffer, CUDA's own). Printed with the largest micro-batch dividing
/// `train.batch_size` that fits `budget` bytes less 5% (the allocator's fragmentation), and
/// returned for the JSON line.
fn gpu_peak(
    config: &RunConfig,
    heap: &dyn Heap,
    budget: f64,
    fixed: f64,
) -> Result<serde_json::Value> {
    let layers = config.spec().layers();
    let dtype = config.precision_on(true);
    eprintln!(
        "measuring the step's peak GPU memory: the GPU's ops in {dtype} on the CPU, 1-2 layers, \
         micro-batches 2-3 ..."
    );
    let step = StepPeak::measure(config, heap)?;
    let micro_batch = config.train.micro_batch();
    let peak = fixed + step.bytes(layers, micro_batch);
    let usable = budget * 0.95;
    let fits = (1..=config.train.batch_size)
        .filter(|m| config.train.batch_size.is_multiple_of(*m))
        .filter(|m| fixed + step.bytes(layers, *m) <= usable)
        .max();
    let gib = |b: f64| b / (1u64 << 30) as f64;
    eprintln!(
        "peak GPU memory (reference path, {dtype}): {:.1} GiB at micro-batch {micro_batch} = \
         {:.1} GiB fixed (weights, optimizer state, CUDA) + {:.1} GiB for the step, {:.2} GiB \
         per sequence; measured in {:.0} s",
        gib(peak),
        gib(fixed),
        gib(step.bytes(layers, micro_batch)),
        gib(step.per_sequence(layers)),
        step.seconds
    );
    match fits {
        Some(m) if m >= micro_batch => eprintln!(
            "fits {:.1} GiB (5% kept free); the largest micro-batch that fits is {m} \
             (--set train.micro_batch_size={m}, {:.1} GiB)",
            gib(budget),
            gib(fixed + step.bytes(layers, m))
        ),
        Some(m) => eprintln!(
            "does not fit {:.1} GiB (5% kept free): use --set train.micro_batch_size={m} \
             ({:.1} GiB)",
            gib(budget),
            gib(fixed + step.bytes(layers, m))
        ),
        None => eprintln!(
            "does not fit {:.1} GiB even one sequence at a time: use a shorter --seq-len, \
             4-bit BSFA state (--set bsfa.bits=4) or a GPU with more memory",
            gib(budget)
        ),
    }
    Ok(json!({
        "dtype": dtype,
        "budget_bytes": budget,
        "peak_bytes": peak,
        "fixed_bytes": fixed,
        "step_bytes": step.bytes(layers, micro_batch),
        "per_sequence_bytes": step.per_sequence(layers),
        "fits": peak <= usable,
        "largest_micro_batch": fits,
        "measured_s": step.seconds,
    }))
}

/// The BSFA options that differ from the paper's algorithm as we run it by default, for
/// [`describe`] (empty for the defaults).
fn bsfa_variants(bsfa: &crate::optim::BsfaConfig) -> String {
    use crate::optim::bsfa::{BsfaPartition, FirstProjection};
    let mut out = String::new();
    if bsfa.partition == BsfaPartition::AdamMini {
        out.push_str(", Adam-mini blocks");
    }
    if bsfa.first_projection == FirstProjection::RankUpdates {
        out.push_str(&format!(
            ", first projection at step {} (history of k updates)",
            bsfa.first_estimate_step()
        ));
    }
    out
}

/// One line saying what would run: optimizer and BSFA settings, data, precision, device
/// (and kernels, when not `auto`) and the loop's length.
fn describe(config: &RunConfig, device: &Device) -> String {
    let (opt, bsfa, train, data) = (&config.optimizer, &config.bsfa, &config.train, &config.data);
    let method = if bsfa.enabled {
        format!(
            "{} + BSFA (k={}, l={}, T={}, alpha={}, gamma={}, {}-bit state, groups {})",
            opt.name,
            bsfa.rank,
            bsfa.history,
            bsfa.interval,
            bsfa.alpha,
            bsfa.gamma,
            bsfa.bits,
            String::from(bsfa.blocks.clone())
        ) + &bsfa_variants(bsfa)
    } else {
        opt.name.to_string()
    };
    let spec = config.spec();
    let shape = spec.batch_shape(train.batch_size, train.seq_len);
    let tokenizer = match spec.language_model() {
        Some(_) => format!(" ({} tokenizer)", data.tokenizer),
        None => String::new(),
    };
    let kernels = match train.kernels {
        Kernels::Auto => String::new(),
        chosen => format!(", {chosen} kernels"),
    };
    format!(
        "run: {method}, lr {} ({} warmup steps, cosine to {}x), {} steps of {shape} from '{}'{tokenizer}, \
         {} on {}{kernels}",
        opt.lr,
        opt.warmup_steps,
        opt.min_lr_ratio,
        train.steps,
        data.train,
        train.dtype,
        crate::device::name(device)
    )
}
