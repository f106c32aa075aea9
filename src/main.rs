use anyhow::Result;
use bsfa_train::cli::{Cli, Command};
use bsfa_train::config::RunConfig;
use bsfa_train::dist::{self, Job};
use bsfa_train::model::{llama, ParamCounts, VitConfig};
use bsfa_train::task::Model;
use bsfa_train::{bench, data, eval, export, interrupt, optim, plot, train};
use candle_core::{DType, Device};
use clap::Parser;
use serde_json::json;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

// Training allocates and frees large tensors every step; the system allocator hands them
// back to the kernel and page-faults them in again, which cost about a third of CPU time
// (the tiny model trained 5.5x faster with mimalloc).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its `mimalloc.h` enum; libmimalloc-sys names no
/// constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> ExitCode {
    // Keep freed memory instead of returning it to the kernel: every step frees and
    // reallocates the same large tensors, and re-faulting them cost tens of thousands of
    // zeroed pages per benchmark run (measured with `perf stat -e page-faults`).
    // SAFETY: a plain option setter, called before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    let cli = Cli::parse();
    match run(&cli) {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            // Ranks of a job share one terminal: say whose error this is.
            match dist::env::from_env() {
                Ok(Some(layout)) => eprintln!("error (rank {}): {e:#}", layout.rank),
                _ => eprintln!("error: {e:#}"),
            }
            if dist::caused_by_peer(&e) {
                return ExitCode::from(dist::PEER_FAILED_STATUS);
            }
            ExitCode::FAILURE
        }
    }
}

/// Runs the command; returns the exit status (non-zero only for a run a signal stopped).
fn run(cli: &Cli) -> Result<u8> {
    let args = match &cli.command {
        Some(Command::Bench(bench)) => &bench.run,
        Some(Command::Eval(e)) => {
            set_threads(e.threads);
            let options = eval::EvalOptions {
                seq_len: e.seq_len,
                batch_size: e.batch_size,
                batches: e.eval_batches,
            };
            let report = eval::run(Path::new(&e.checkpoint), &e.data, &options)?;
            println!("{}", serde_json::to_string(&report)?);
            return Ok(0);
        }
        Some(Command::Prepare(p)) => {
            set_threads(p.threads);
            let out = match (&p.out, data::hub::known(&p.data)) {
                (Some(out), _) => PathBuf::from(out),
                (None, Some(_)) => {
                    data::hub::shard_dir(p.data_dir.as_deref(), &p.data, &p.tokenizer)
                }
                (None, None) => anyhow::bail!("prepare --data {} needs --out DIR", p.data),
            };
            let meta = data::prepare::run(&data::prepare::PrepareOptions {
                source: p.data.clone(),
                tokenizer: p.tokenizer.clone(),
                out: out.clone(),
                shard_tokens: p.shard_tokens,
                val_tokens: p.val_tokens,
            })?;
            eprintln!("prepared '{}'", out.display());
            println!("{}", serde_json::to_string(&meta)?);
            return Ok(0);
        }
        Some(Command::Plot(p)) => {
            let dirs: Vec<PathBuf> = p.runs.iter().map(PathBuf::from).collect();
            let rows = plot::run(&dirs, Path::new(&p.out), &p.title)?;
            eprintln!("| run | final val loss | reaches the first run's final val loss at | steps ratio | median step ms |");
            eprintln!("|---|---|---|---|---|");
            for r in &rows {
                let at = r
                    .reaches_baseline_at
                    .map_or("never".into(), |s| s.to_string());
                let ratio = r.steps_ratio.map_or("-".into(), |x| format!("{x:.2}"));
                eprintln!(
                    "| {} | {:.4} | {at} | {ratio} | {:.1} |",
                    r.run, r.final_val_loss, r.median_step_ms
                );
            }
            println!("{}", json!({"png": p.out, "rows": rows}));
            return Ok(0);
        }
        Some(Command::Export(e)) => {
            let report = export::run(Path::new(&e.checkpoint), Path::new(&e.out))?;
            println!("{}", serde_json::to_string(&report)?);
            return Ok(0);
        }
        None => &cli.run,
    };
    let config = args.resolve()?;
    if let Some(nproc) = args.nproc_per_node {
        // Inside a job already (our launcher, torchrun, srun): the flag has done its part.
        if dist::env::from_env()?.is_none() && !args.dry_run {
            return dist::launch::run(nproc, &without_nproc_flag(std::env::args_os().skip(1)));
        }
    }
    let threads = set_threads(config.train.threads);
    if args.dry_run {
        dry_run(&config)?;
        return Ok(0);
    }
    interrupt::install()?;
    let job = Job::from_env(&config.train)?;
    if let Some(Command::Bench(b)) = &cli.command {
        let options = bench::BenchOptions {
            threads,
            warmup: b.warmup,
            iters: b.iters,
            loader_steps: b.loader_steps,
            peak_tflops: b.peak_tflops,
        };
        let report = bench::run(&job, &config, &options)?;
        if job.is_root() {
            println!("{}", serde_json::to_string(&report)?);
        }
        return Ok(0);
    }
    let summary = train::run_job(&config, args.resume.as_deref(), &job)?;
    if job.is_root() {
        println!("{}", serde_json::to_string(&summary)?);
    }
    // Shells report a run stopped by a signal as 128 + the signal number.
    Ok(summary.signal.map_or(0, |s| (128 + s) as u8))
}

/// The command line for the ranks: this one without `--nproc-per-node N`.
fn without_nproc_flag(args: impl Iterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut skip_value = false;
    for arg in args {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        match arg.to_str() {
            Some("--nproc-per-node") => skip_value = true,
            Some(a) if a.starts_with("--nproc-per-node=") => {}
            _ => out.push(arg),
        }
    }
    out
}

/// Sizes the compute thread pool and returns the thread count: `--threads`, else the share
/// of the cores the launcher gave this rank, else every core.
fn set_threads(threads: Option<usize>) -> usize {
    let threads = threads
        .or_else(|| {
            std::env::var("BSFA_RANK_THREADS")
                .ok()
                .and_then(|t| t.parse().ok())
        })
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // Candle sizes its thread pool from this variable when it first computes, so it must be
    // set before any tensor work.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    threads
}

/// Rough bytes of activations a ViT keeps for the backward pass of one micro-batch: per layer
/// and token about 12 hidden-sized tensors and 2 MLP-sized ones, plus each head's attention
/// probabilities (`seq x seq`). An estimate, like LLaMA's.
fn vit_activation_bytes(vit: &VitConfig, micro_batch: usize, elem_bytes: usize) -> usize {
    let seq = vit.seq_len();
    let per_token =
        12 * vit.hidden_size + 2 * vit.intermediate_size + vit.num_attention_heads * seq;
    micro_batch * seq * per_token * vit.num_hidden_layers * elem_bytes
}

/// Prints parameter counts and a training-memory estimate without training.
fn dry_run(config: &RunConfig) -> Result<()> {
    let (_, params) = Model::build(config, &Device::Cpu)?;
    let counts = ParamCounts::of(&params);
    // State of every optimizer on this model, so their memory can be compared.
    let mut state_by_optimizer = serde_json::Map::new();
    let single: Arc<dyn dist::Communicator> = Arc::new(dist::SingleRank);
    for name in optim::OPTIMIZERS {
        let mut other = config.clone();
        other.optimizer.name = name.to_string();
        other.bsfa.enabled = false;
        let optimizer = optim::build(&other, &params, &single)?;
        state_by_optimizer.insert(name.to_string(), json!(optimizer.state_bytes()));
    }
    // BSFA adds its full history and directions once warmed up, at the configured precision
    // (`bsfa_extra`) and at both precisions for comparison.
    let bsfa_state = optim::bsfa::steady_state_bytes(&config.bsfa, &params)?;
    state_by_optimizer.insert("bsfa_extra".into(), json!(bsfa_state));
    for bits in [32, 4] {
        let mut at = config.bsfa.clone();
        at.bits = bits;
        let bytes = optim::bsfa::steady_state_bytes(&at, &params)?;
        state_by_optimizer.insert(format!("bsfa_extra_{bits}bit"), json!(bytes));
    }
    // BSFA sharded over data-parallel ranks: the largest rank's share.
    let mut bsfa_per_rank = serde_json::Map::new();
    for world in [1, 2, 4, 8] {
        let shares = optim::bsfa::steady_state_bytes_per_rank(&config.bsfa, &params, world)?;
        let largest = shares.iter().copied().max().unwrap_or(0);
        bsfa_per_rank.insert(world.to_string(), json!(largest));
    }
    let optimizer_state = state_by_optimizer[config.optimizer.name.as_str()]
        .as_u64()
        .map_or(0, |b| b as usize)
        + if config.bsfa.enabled { bsfa_state } else { 0 };
    let elem = DType::F32.size_in_bytes();
    let weights = counts.total * elem;
    // Gradients, plus an accumulation buffer when the batch is split into micro-batches.
    let accumulating = config.train.micro_batch() < config.train.batch_size;
    let grads = counts.total * elem * if accumulating { 2 } else { 1 };
    let activations = if config.model.is_vit() {
        vit_activation_bytes(&config.vit, config.train.micro_batch(), elem)
    } else {
        llama::activation_bytes(
            &config.model,
            config.train.micro_batch(),
            config.train.seq_len,
            elem,
        )
    };
    let total = weights + grads + optimizer_state + activations;
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
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
    eprintln!(
        "estimated training memory (f32): {:.0} MiB = weights {:.0} + grads {:.0} + {} state {:.0} \
         + activations {:.0} (micro-batch {} x {})",
        mib(total),
        mib(weights),
        mib(grads),
        config.optimizer.name,
        mib(optimizer_state),
        mib(activations),
        config.train.micro_batch(),
        config.train.seq_len
    );
    let by_optimizer: Vec<String> = state_by_optimizer
        .iter()
        .map(|(name, b)| {
            format!(
                "{name} {:.0} MiB",
                mib(b.as_u64().map_or(0, |b| b as usize))
            )
        })
        .collect();
    eprintln!("optimizer state: {}", by_optimizer.join(", "));
    let per_rank: Vec<String> = bsfa_per_rank
        .iter()
        .map(|(world, b)| {
            format!(
                "{world} ranks {:.0} MiB",
                mib(b.as_u64().map_or(0, |b| b as usize))
            )
        })
        .collect();
    eprintln!(
        "bsfa state per rank at bsfa.bits={}: {}",
        config.bsfa.bits,
        per_rank.join(", ")
    );
    let report = json!({
        "dry_run": true,
        "params": counts,
        "memory_bytes": {
            "weights": weights,
            "grads": grads,
            "optimizer_state": optimizer_state,
            "optimizer_state_by_optimizer": state_by_optimizer,
            "bsfa_extra_per_rank_by_ranks": bsfa_per_rank,
            "activations_estimate": activations,
            "total_estimate": total,
        },
    });
    println!("{report}");
    Ok(())
}
