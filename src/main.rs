use anyhow::Result;
use bsfa_train::cli::{
    BenchArgs, Cli, Command, EvalArgs, PlotArgs, PrepareArgs, RunArgs, SampleArgs, TokenizerArgs,
};
use bsfa_train::dist::{self, Job};
use bsfa_train::{bench, data, eval, export, interrupt, plot, sample, task, train};
use clap::Parser;
use serde_json::json;
use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

// Training allocates and frees large tensors every step; the system allocator hands them
// back to the kernel and page-faults them in again (docs/design.md has the measurement).
// Counted only while `--dry-run` measures a step's peak.
#[global_allocator]
static GLOBAL: bsfa_train::memory::CountingAlloc<mimalloc::MiMalloc> =
    bsfa_train::memory::CountingAlloc::new(mimalloc::MiMalloc);

/// mimalloc's `mi_option_purge_delay` (its `mimalloc.h` enum; libmimalloc-sys names no
/// constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> ExitCode {
    // Keep freed memory instead of returning it to the kernel: every step frees and
    // reallocates the same large tensors, and re-faulting them costs zeroed pages on every
    // step (docs/performance.md has the page-fault counts).
    // SAFETY: a plain option setter, called before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    let cli = Cli::parse();
    match run(&cli) {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            // Ranks of a job share one terminal: say whose error this is.
            let whose = match dist::env::from_env() {
                Ok(Some(layout)) => format!(" (rank {})", layout.rank),
                _ => String::new(),
            };
            let interrupted = interrupt::interrupted_by(&e);
            let kind = if interrupted.is_some() {
                "interrupted"
            } else {
                "error"
            };
            // One write per line: `eprintln!` writes its pieces one by one, and the lines of
            // ranks sharing a terminal or a pipe would interleave mid-line.
            let line = format!("{kind}{whose}: {e:#}\n");
            let _ = std::io::stderr().write_all(line.as_bytes());
            if let Some(signal) = interrupted {
                // Asked to stop before training began: nothing to checkpoint.
                return ExitCode::from((128 + signal) as u8);
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
    match &cli.command {
        None => train_or_bench(&cli.run, None),
        Some(Command::Bench(b)) => train_or_bench(&b.run, Some(b)),
        Some(Command::Eval(e)) => eval(e),
        Some(Command::Prepare(p)) => prepare(p),
        Some(Command::Tokenizer(t)) => tokenizer(t),
        Some(Command::Plot(p)) => plot(p),
        Some(Command::Sample(s)) => sample(s),
        Some(Command::Export(e)) => {
            let report = export::run(Path::new(&e.checkpoint), Path::new(&e.out))?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(0)
        }
    }
}

/// Training (the default command), or `bench` timing its steps: launches the ranks when
/// asked to, else joins the job as one of them.
fn train_or_bench(args: &RunArgs, bench: Option<&BenchArgs>) -> Result<u8> {
    let config = args.resolve()?;
    if !args.dry_run {
        // A node to start (our flag, or a Kubeflow pod given several processes); inside a
        // job already (our launcher, torchrun, srun, mpirun) the flag has done its part.
        let node = match (dist::env::placement()?, args.nproc_per_node) {
            (dist::env::Placement::Node(node), _) => Some(node),
            (dist::env::Placement::Alone, Some(nproc)) => Some(dist::launch::single_node(nproc)?),
            _ => None,
        };
        if let Some(node) = node {
            return dist::launch::run(&node, &without_nproc_flag(std::env::args_os().skip(1)));
        }
    }
    let threads = set_threads(config.train.threads);
    if args.dry_run {
        bsfa_train::dry_run::report(&config, &GLOBAL, args.gpu_memory)?;
        return Ok(0);
    }
    interrupt::install()?;
    // `bench` times random tokens and needs no corpus (a GPU machine may have no network):
    // only its optional loader timing reads the run's data.
    if bench.is_none_or(|b| b.loader_steps > 0) {
        task::prepare_data(&config)?;
    }
    let timeout = Duration::from_secs(config.train.dist_timeout_s);
    let job = Job::from_env(config.train.device, timeout)?;
    if let Some(b) = bench.filter(|b| b.kernels) {
        let reports = bsfa_train::bench_kernels::run(&config, &job.device, b.iters.unwrap_or(5))?;
        if job.is_root() {
            let device = bsfa_train::device::name(&job.device);
            let dtype = config.precision_on(job.device.is_cuda());
            let line = serde_json::json!({"device": device, "dtype": dtype, "kernels": reports});
            println!("{line}");
        }
        return Ok(0);
    }
    if let Some(b) = bench {
        let options = bench::BenchOptions {
            threads,
            warmup: b.warmup,
            iters: b.iters,
            loader_steps: b.loader_steps,
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

/// `eval`: a checkpoint's mean loss on a data source.
fn eval(e: &EvalArgs) -> Result<u8> {
    set_threads(e.threads);
    let options = eval::EvalOptions {
        seq_len: e.seq_len,
        batch_size: e.batch_size,
        batches: e.eval_batches,
    };
    let report = eval::run(Path::new(&e.checkpoint), &e.data.parse()?, &options)?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(0)
}

/// `prepare`: tokenizes a source into token shards.
fn prepare(p: &PrepareArgs) -> Result<u8> {
    set_threads(p.threads);
    let out = match (&p.out, data::hub::known(&p.data)) {
        (Some(out), _) => PathBuf::from(out),
        (None, Some(_)) => data::hub::shard_dir(p.data_dir.as_deref(), &p.data, &p.tokenizer),
        (None, None) => anyhow::bail!("prepare --data {} needs --out DIR", p.data),
    };
    let meta = data::prepare::run(&data::prepare::PrepareOptions {
        source: p.data.clone(),
        tokenizer: p.tokenizer.clone(),
        out: out.clone(),
        shard_tokens: p.shard_tokens,
        val_tokens: p.val_tokens,
        revision: p.revision.clone(),
    })?;
    eprintln!("prepared '{}'", out.display());
    println!("{}", serde_json::to_string(&meta)?);
    Ok(0)
}

/// `tokenizer`: trains a byte-level BPE.
fn tokenizer(t: &TokenizerArgs) -> Result<u8> {
    set_threads(t.threads);
    let report = data::bpe::train(&data::bpe::BpeOptions {
        train: t.data.parse()?,
        val: t.val_data.as_deref().map(str::parse).transpose()?,
        vocab_size: t.vocab_size,
        out: PathBuf::from(&t.out),
    })?;
    eprintln!("wrote '{}'", t.out);
    println!("{}", serde_json::to_string(&report)?);
    Ok(0)
}

/// `plot`: loss curves to a PNG, and a table comparing the runs with the first.
fn plot(p: &PlotArgs) -> Result<u8> {
    let dirs: Vec<PathBuf> = p.runs.iter().map(PathBuf::from).collect();
    let rows = plot::run(&dirs, Path::new(&p.out), &p.title)?;
    eprintln!(
        "| run | final val loss | reaches the first run's final val loss at | steps ratio | \
         median step ms |"
    );
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
    Ok(0)
}

/// `sample`: streams a checkpoint's continuation of a prompt to stdout.
fn sample(s: &SampleArgs) -> Result<u8> {
    set_threads(s.threads);
    let kind = serde_json::from_value(json!(s.device))?;
    let device = bsfa_train::device::select(kind, 0)?;
    let generator =
        sample::Generator::open(Path::new(&s.checkpoint), s.tokenizer.as_deref(), &device)?;
    let prompt = generator.prompt(&s.prompt)?;
    let mut out = std::io::stdout().lock();
    // A terminal gets control characters escaped; a pipe or file gets the text as it is.
    let terminal = out.is_terminal();
    let shown = |text: &str| match terminal {
        true => sample::printable(text),
        false => text.to_string(),
    };
    out.write_all(shown(&s.prompt).as_bytes())?;
    out.flush()?;
    let report = generator.generate(&prompt, &s.options(), &mut |piece| {
        out.write_all(shown(piece).as_bytes())?;
        Ok(out.flush()?)
    })?;
    writeln!(out)?;
    eprintln!("{}", serde_json::to_string(&report)?);
    Ok(0)
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
/// of the cores our launcher gave this rank, else an equal share of the cores among the
/// ranks on this machine (other launchers), else every core.
fn set_threads(threads: Option<usize>) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = threads
        .or_else(|| {
            std::env::var("BSFA_RANK_THREADS")
                .ok()
                .and_then(|t| t.parse().ok())
        })
        .or_else(|| {
            let layout = dist::env::from_env().ok().flatten()?;
            Some((cores / layout.local_world).max(1))
        })
        .unwrap_or(cores);
    // Candle sizes its thread pool from this variable when it first computes, so it must be
    // set before any tensor work.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    threads
}
