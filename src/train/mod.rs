//! The training loop, top to bottom: set up the task, optimizer and outputs (resuming
//! from a checkpoint when asked), then step after step: update, log, evaluate, sample, checkpoint.

mod record;
mod set_aside;
mod step;

pub use record::Summary;
pub use set_aside::{CHECKPOINTS_DIR, PREVIOUS_DIR};
pub use step::{StepOutcome, Trainer};

use crate::checkpoint;
use crate::config::RunConfig;
use crate::dist::{self, Job};
use crate::failpoint::{self, Point};
use crate::interrupt;
use crate::lock;
use crate::memory_check::{self, Workload};
use crate::optim::schedule::lr_at;
use crate::profile::Profiler;
use crate::sample::TrainingSampler;
use crate::task::{self, Position};
use anyhow::{bail, Context, Result};
use record::Recorder;
use std::fs::File;
use std::path::Path;
use std::time::Instant;

/// Trains as `config` says in this one process, writing `config.json`, `metrics.jsonl` and
/// `checkpoints/` into its out folder. `resume` is `--resume`: `auto` or a checkpoint folder.
pub fn run(config: &RunConfig, resume: Option<&str>) -> Result<Summary> {
    run_job(config, resume, &Job::single(config.train.device)?)
}

/// The lock file in a run's out folder, held by the run that writes there.
pub const LOCK_FILE: &str = "run.lock";

/// [`run`] as one rank of a data-parallel `job`: every rank calls it with the same config.
/// Rank 0 alone writes the out folder (and locks it); an error on any rank stops every rank.
pub fn run_job(config: &RunConfig, resume: Option<&str>, job: &Job) -> Result<Summary> {
    let outcome = train(&config.on_device(&job.device), resume, job);
    if let Err(e) = &outcome {
        job.comm.abort(&format!("{e:#}"));
    }
    outcome
}

fn train(config: &RunConfig, resume: Option<&str>, job: &Job) -> Result<Summary> {
    let wall = Instant::now();
    // Before anything is read or written there; held until training ends. Other ranks
    // write only checkpoint shards, and only after rank 0 has the lock.
    let _lock = match job.is_root() {
        true => Some(lock_out_folder(Path::new(&config.train.out))?),
        false => None,
    };
    config.train.set_compute(&job.device)?;
    let workload = Workload::Training {
        world: job.comm.world(),
    };
    memory_check::check(config, &job.device, workload)?;
    let (mut trainer, mut recorder, start) = setup(config, resume, job, wall)?;
    let (steps, opt) = (config.train.steps, &config.optimizer);
    let out = std::path::Path::new(&config.train.out);
    let sampler = match job.is_root() {
        true => TrainingSampler::new(config, &trainer.params)?,
        false => None,
    };
    let mut profiler = job
        .is_root()
        .then(|| Profiler::new(config.train.profile_steps, start, out))
        .flatten();
    for step in start..steps {
        let started = Instant::now();
        let done = step + 1;
        if let Some(profiler) = &mut profiler {
            profiler.before(done);
        }
        let lr = lr_at(step, steps, opt.warmup_steps, opt.lr, opt.min_lr_ratio);
        let outcome = tracing::info_span!("step", step = done)
            .in_scope(|| trainer.step(lr, interrupt::requested()))?;
        failpoint::hit(Point::AfterStep, job.rank(), done)?;
        crate::device::self_check_failure()?;
        recorder.step(done, lr, &outcome, started.elapsed())?;
        if recorder.evaluates_at(done) {
            let evaluation = tracing::info_span!("evaluation")
                .in_scope(|| trainer.task.evaluate(job.comm.as_ref()))?;
            crate::device::self_check_failure()?;
            recorder.evaluation(done, &evaluation)?;
        }
        if let Some(sampler) = sampler.as_ref().filter(|_| recorder.samples_at(done)) {
            let sample = tracing::info_span!("sample").in_scope(|| sampler.write())?;
            recorder.sample(done, &sample)?;
        }
        if recorder.checkpoints_at(done) || outcome.stop.is_some() {
            tracing::info_span!("checkpoint").in_scope(|| recorder.checkpoint(done, &trainer))?;
        }
        if let Some(profiler) = &mut profiler {
            profiler.after(done, done == steps || outcome.stop.is_some());
        }
        if let Some(signal) = outcome.stop {
            recorder.stopped(signal, done);
            break;
        }
    }
    recorder.finish(&trainer, start)
}

/// Locks the out folder `out` (creating it) for this run: a second run writing into it too
/// would replace the first's checkpoints and garble its `metrics.jsonl`. Fails at once,
/// naming the holder, when another run holds it.
fn lock_out_folder(out: &Path) -> Result<File> {
    let path = out.join(LOCK_FILE);
    match lock::try_exclusive(&path)? {
        Some(file) => Ok(file),
        None => bail!(
            "out folder '{}' is in use by another run ({}, which holds '{}'); wait for that \
             run to end or stop it, or choose another --out",
            out.display(),
            lock::holder(&path),
            path.display()
        ),
    }
}

/// Opens the checkpoint to resume (if any), the task, the optimizer and the outputs; every
/// rank starts from the same weights. Returns the step training starts at; `wall` is when
/// the run started, for the summary.
fn setup(
    config: &RunConfig,
    resume: Option<&str>,
    job: &Job,
    wall: Instant,
) -> Result<(Trainer, Recorder, usize)> {
    let (comm, root) = (job.comm.as_ref(), job.is_root());
    let out = Path::new(&config.train.out);
    let checkpoints = out.join(CHECKPOINTS_DIR);
    // Read and check the checkpoint before anything in the out folder is written (but the
    // lock).
    let resumed = checkpoint::open_resumed(resume, &checkpoints, config, comm)?;
    if root {
        std::fs::create_dir_all(out)
            .with_context(|| format!("cannot create output folder '{}'", out.display()))?;
    }
    let position = resumed
        .as_ref()
        .map_or(config.spec().start_position(config.train.seed), |ck| {
            Position {
                tokens: ck.state.data_position,
                images: ck.state.image_position,
            }
        });
    let (task, params) = task::open(config, &job.device, comm, position)?;
    let mut trainer = Trainer::new(config, task, params, &job.comm)?;
    let recorder = Recorder::open(config, job, resumed.as_ref().map(|ck| &ck.state), wall);
    let start = match &resumed {
        Some(ck) => {
            ck.restore(&trainer.params, &mut trainer.optimizer)?;
            recorder.note(&format!(
                "resuming from '{}' at step {}",
                ck.dir.display(),
                ck.state.step
            ));
            ck.state.step
        }
        None => {
            if resume.is_some() {
                recorder.note(&format!(
                    "no checkpoint in '{}': starting fresh",
                    checkpoints.display()
                ));
            }
            0
        }
    };
    // Once the checkpoint is restored (an error leaves the folder as it was), and before
    // anything of this run is written.
    if root {
        if let Some(note) = set_aside::set_aside(out, resumed.as_ref())? {
            recorder.note(&note);
        }
    }
    // Every rank starts from rank 0's weights, as PyTorch's DDP does.
    dist::broadcast_params(&trainer.params, comm)?;
    let recorder = recorder.started(&trainer, resumed.map(|ck| ck.dir), start)?;
    Ok((trainer, recorder, start))
}
