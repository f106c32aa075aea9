//! The training loop, top to bottom: data, model, optimizer, then step after step of
//! accumulate gradients -> clip -> update -> log -> evaluate.

use crate::checkpoint::{self, Checkpoint, TrainerState};
use crate::config::RunConfig;
use crate::dist::{Communicator, Job};
use crate::interrupt;
use crate::metrics::{MetricsLog, Progress};
use crate::model::{Param, ParamCounts};
use crate::optim::{self, schedule::lr_at};
use crate::task::{Corpus, Model, Position};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

/// The one-line JSON summary a run prints last on stdout.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Optimizer steps completed (counting those before a resume).
    pub steps: usize,
    pub params: usize,
    pub tokens_seen: u64,
    pub final_train_loss: f64,
    pub final_val_loss: f64,
    pub final_val_ppl: f64,
    /// Image runs: top-1 accuracy on the validation split at the last evaluation.
    pub final_val_top1: Option<f64>,
    /// Image runs: top-5 accuracy at the last evaluation.
    pub final_val_top5: Option<f64>,
    /// Mean over this process's steps.
    pub tokens_per_s: f64,
    pub wall_s: f64,
    pub out: String,
    /// The newest checkpoint written, if any.
    pub checkpoint: Option<String>,
    /// The step the run resumed from, if it did.
    pub resumed_from: Option<usize>,
    /// `SIGINT` or `SIGTERM` when a signal stopped the run early (after a checkpoint).
    pub interrupted_by: Option<String>,
    /// The signal number behind `interrupted_by`, for the exit status.
    #[serde(skip)]
    pub signal: Option<i32>,
    /// Data-parallel ranks (processes) that trained.
    pub ranks: usize,
    /// The device every rank computed on.
    pub device: String,
    /// The compute precision (`train.dtype`).
    pub dtype: String,
    /// Optimizer state bytes each rank held at the end (BSFA's share falls as 1/ranks).
    pub optimizer_state_bytes_per_rank: Vec<usize>,
    /// Peak resident memory of each rank's process, MiB (0 where unknown).
    pub peak_rss_mib_per_rank: Vec<f64>,
    /// Train loss of every optimizer step this process ran, for tests and scripts.
    #[serde(skip)]
    pub losses: Vec<f64>,
}

/// Trains as `config` says in this one process, writing `config.json`, `metrics.jsonl` and
/// `checkpoints/` into its out folder. `resume` is `--resume`: `auto` or a checkpoint folder.
pub fn run(config: &RunConfig, resume: Option<&str>) -> Result<Summary> {
    run_job(config, resume, &Job::single(&config.train)?)
}

/// [`run`] as one rank of a data-parallel `job`: every rank calls it with the same config.
/// Rank 0 alone writes the out folder; an error on any rank stops every rank.
pub fn run_job(config: &RunConfig, resume: Option<&str>, job: &Job) -> Result<Summary> {
    let outcome = train(config, resume, job);
    if let Err(e) = &outcome {
        job.comm.abort(&format!("{e:#}"));
    }
    outcome
}

fn train(config: &RunConfig, resume: Option<&str>, job: &Job) -> Result<Summary> {
    let wall = Instant::now();
    let (comm, device, root) = (job.comm.as_ref(), &job.device, job.is_root());
    let train_cfg = &config.train;
    let out = PathBuf::from(&train_cfg.out);
    let checkpoints = out.join("checkpoints");
    // Read and check the checkpoint before anything in the out folder is touched; rank 0
    // picks it, so every rank resumes the same one.
    let resume_dir = match resume {
        Some(spec) if root => checkpoint::resolve_resume(spec, &checkpoints)?,
        _ => None,
    };
    let resume_dir = shared_path(comm, resume_dir)?;
    let resumed = resume_dir
        .map(|dir| Checkpoint::open(&dir, true))
        .transpose()?;
    if let (Some(ck), true) = (&resumed, root) {
        check_resumable(config, ck)?;
    }
    if root {
        std::fs::create_dir_all(&out)
            .with_context(|| format!("cannot create output folder '{}'", out.display()))?;
    }
    let corpus = Corpus::load(config, comm)?;
    let (model, params) = Model::build(config, device)?;
    let param_count = ParamCounts::of(&params).total;
    let mut optimizer = optim::build(config, &params, &job.comm)?;
    let mut data_position = Position::start(train_cfg.seed, config.model.is_vit());
    let progress = if root {
        Progress::new(
            train_cfg.steps,
            resumed.as_ref().map_or(0, |ck| ck.state.step),
        )
    } else {
        Progress::silent()
    };
    let metrics_path = out.join("metrics.jsonl");
    let start = match &resumed {
        Some(ck) => {
            ck.load_model(&params)?;
            ck.load_optimizer(optimizer.as_mut())?;
            data_position = Position {
                tokens: ck.state.data_position,
                images: ck.state.image_position,
            };
            progress.println(&format!(
                "resuming from '{}' at step {}",
                ck.dir.display(),
                ck.state.step
            ));
            ck.state.step
        }
        None => {
            if resume.is_some() {
                progress.println(&format!(
                    "no checkpoint in '{}': starting fresh",
                    checkpoints.display()
                ));
            }
            if root {
                set_aside_old_checkpoints(&checkpoints, &progress)?;
            }
            0
        }
    };
    // Every rank starts from rank 0's weights, as PyTorch's DDP does.
    broadcast_params(&params, comm)?;
    let mut metrics = match (root, start) {
        (false, _) => None,
        (true, 0) => Some(MetricsLog::create(&metrics_path)?),
        (true, step) => Some(MetricsLog::resume(&metrics_path, step)?),
    };
    // Keep the checkpoint's trainer state, not its tensors (a copy of the whole model and
    // optimizer state).
    let resumed = resumed.map(|ck| (ck.dir, ck.state));
    if root {
        std::fs::write(
            out.join("config.json"),
            serde_json::to_string_pretty(config)?,
        )
        .with_context(|| format!("cannot write '{}'", out.join("config.json").display()))?;
    }
    let sizes = corpus.describe();
    let mut data = corpus.start(config, data_position, comm)?;
    let ranks = if comm.world() > 1 {
        format!(" on {} ranks", comm.world())
    } else {
        String::new()
    };
    progress.println(&format!(
        "training {param_count} parameters on {sizes}, {} steps of {}{ranks} ({})",
        train_cfg.steps,
        if config.model.is_vit() {
            format!("{} images", train_cfg.batch_size)
        } else {
            format!("{} x {} tokens", train_cfg.batch_size, train_cfg.seq_len)
        },
        crate::device::name(device),
    ));

    let opt_cfg = &config.optimizer;
    let tokens_per_step = config.units_per_step();
    let mut losses = Vec::with_capacity(train_cfg.steps - start);
    let mut train_time = 0.0f64;
    let mut val_loss = f64::NAN;
    let mut val_accuracy = (None, None);
    let mut summary = Summary {
        steps: start,
        params: param_count,
        tokens_seen: resumed.as_ref().map_or(0, |(_, state)| state.tokens_seen),
        final_train_loss: f64::NAN,
        final_val_loss: f64::NAN,
        final_val_ppl: f64::NAN,
        final_val_top1: None,
        final_val_top5: None,
        tokens_per_s: f64::NAN,
        wall_s: 0.0,
        out: out.display().to_string(),
        checkpoint: resumed.as_ref().map(|(dir, _)| dir.display().to_string()),
        resumed_from: resumed.as_ref().map(|(_, state)| state.step),
        interrupted_by: None,
        signal: None,
        ranks: comm.world(),
        device: crate::device::name(device),
        dtype: train_cfg.dtype.clone(),
        optimizer_state_bytes_per_rank: Vec::new(),
        peak_rss_mib_per_rank: Vec::new(),
        losses: Vec::new(),
    };
    for step in start..train_cfg.steps {
        let started = Instant::now();
        let lr = lr_at(
            step,
            train_cfg.steps,
            opt_cfg.warmup_steps,
            opt_cfg.lr,
            opt_cfg.min_lr_ratio,
        );
        let (micro_batches, position) = data.next_step()?;
        let outcome = train_step(
            &model,
            &params,
            optimizer.as_mut(),
            &micro_batches,
            config,
            lr,
            comm,
            interrupt::requested(),
        )?;
        data_position = position;
        injected_fault(comm.rank(), step + 1)?;
        let (loss, grad_norm) = (outcome.loss, outcome.grad_norm);
        if !loss.is_finite() {
            return Err(diverged(format!("loss is {loss}"), step, lr, &metrics));
        }
        if !grad_norm.is_finite() {
            let cause = format!("gradient norm is {grad_norm}");
            return Err(diverged(cause, step, lr, &metrics));
        }
        let step_s = started.elapsed().as_secs_f64();
        train_time += step_s;
        losses.push(loss);
        summary.tokens_seen += tokens_per_step as u64;

        let done = step + 1;
        let tokens_per_s = tokens_per_step as f64 / step_s;
        let log_now = done % train_cfg.log_every == 0 || done == train_cfg.steps || step == start;
        progress.step(done, loss, tokens_per_s, log_now);
        if let (true, Some(metrics)) = (log_now, &mut metrics) {
            metrics.write(&json!({
                "step": done,
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": tokens_per_s,
                "step_ms": step_s * 1e3,
            }))?;
        }
        let eval_now = (train_cfg.eval_every > 0 && done % train_cfg.eval_every == 0)
            || done == train_cfg.steps;
        if eval_now {
            let evaluation = data.evaluate(&model, config, comm)?;
            val_loss = evaluation.loss;
            val_accuracy = (evaluation.top1, evaluation.top5);
            let mut record = json!({
                "step": done,
                "val_loss": val_loss,
                "val_ppl": val_loss.exp(),
            });
            let accuracy = match (evaluation.top1, evaluation.top5) {
                (Some(top1), Some(top5)) => {
                    record["val_top1"] = json!(top1);
                    record["val_top5"] = json!(top5);
                    format!(", top-1 {:.2}%, top-5 {:.2}%", 100.0 * top1, 100.0 * top5)
                }
                _ => String::new(),
            };
            if let Some(metrics) = &mut metrics {
                metrics.write(&record)?;
            }
            progress.println(&format!(
                "step {done}: val_loss {val_loss:.4} (ppl {:.2}){accuracy}",
                val_loss.exp()
            ));
        }
        summary.steps = done;
        let signal = outcome.stop;
        let periodic = train_cfg.checkpoint_every > 0 && done % train_cfg.checkpoint_every == 0;
        if periodic || done == train_cfg.steps || signal.is_some() {
            let state = TrainerState {
                format_version: checkpoint::FORMAT_VERSION,
                step: done,
                tokens_seen: summary.tokens_seen,
                data_position: data_position.tokens,
                image_position: data_position.images,
                config: config.clone(),
            };
            let saving = Instant::now();
            let dir = checkpoint::save(&checkpoints, &state, &params, optimizer.as_ref(), comm)?;
            if root {
                checkpoint::prune(&checkpoints, train_cfg.keep_checkpoints)?;
            }
            progress.println(&format!(
                "checkpoint '{}' written in {:.1}s",
                dir.display(),
                saving.elapsed().as_secs_f64()
            ));
            summary.checkpoint = Some(dir.display().to_string());
        }
        if let Some(signal) = signal {
            progress.finish();
            if !root {
                summary.signal = Some(signal);
                break;
            }
            eprintln!(
                "stopped by {} after step {done} of {}; checkpoint saved. Resume with the same \
                 command plus --resume auto",
                interrupt::signal_name(signal),
                train_cfg.steps
            );
            summary.interrupted_by = Some(interrupt::signal_name(signal).to_string());
            summary.signal = Some(signal);
            break;
        }
    }
    progress.finish();
    let mut mine = (optimizer.state_bytes() as u64).to_le_bytes().to_vec();
    mine.extend(crate::metrics::peak_rss_mib().unwrap_or(0.0).to_le_bytes());
    for part in comm.all_gather_bytes(&mine)? {
        let (bytes, rss) = part.split_at(8);
        let bytes = u64::from_le_bytes(bytes.try_into()?) as usize;
        summary.optimizer_state_bytes_per_rank.push(bytes);
        summary
            .peak_rss_mib_per_rank
            .push(f64::from_le_bytes(rss.try_into()?));
    }
    if root && start == train_cfg.steps {
        eprintln!("the checkpoint is at step {start}, the run's last: nothing to do (raise --steps to go on)");
    }
    summary.final_train_loss = losses.last().copied().unwrap_or(f64::NAN);
    summary.final_val_loss = val_loss;
    summary.final_val_ppl = val_loss.exp();
    (summary.final_val_top1, summary.final_val_top5) = val_accuracy;
    summary.tokens_per_s = (tokens_per_step * losses.len()) as f64 / train_time;
    summary.wall_s = wall.elapsed().as_secs_f64();
    summary.losses = losses;
    Ok(summary)
}

/// A checkpoint can continue this run only with the same model and optimizer; other
/// changed settings (more steps, another log interval) are allowed and listed.
fn check_resumable(config: &RunConfig, ck: &Checkpoint) -> Result<()> {
    let changed = crate::config::differences(&ck.state.config, config)?;
    let model: Vec<String> = changed
        .iter()
        .filter(|(key, _, _)| {
            key.starts_with("model.") || (config.model.is_vit() && key.starts_with("vit."))
        })
        .map(|(key, saved, now)| format!("{key} (checkpoint {saved}, requested {now})"))
        .collect();
    if !model.is_empty() {
        bail!(
            "the checkpoint '{}' holds a different model: {}. Resume with the checkpoint's \
             settings (see '{}') or start a new run in another --out",
            ck.dir.display(),
            model.join(", "),
            ck.dir.join(checkpoint::TRAINER_FILE).display()
        );
    }
    let (was, now) = (
        checkpoint::optimizer_kind(&ck.state.config),
        checkpoint::optimizer_kind(config),
    );
    if was != now {
        bail!(
            "the checkpoint '{}' was trained with optimizer '{was}', this run asks for '{now}'; \
             resume with the same --optimizer/--bsfa or start a new run in another --out",
            ck.dir.display()
        );
    }
    if ck.state.step > config.train.steps {
        bail!(
            "the checkpoint '{}' is at step {}, beyond --steps {}; raise --steps",
            ck.dir.display(),
            ck.state.step,
            config.train.steps
        );
    }
    if !changed.is_empty() {
        let keys: Vec<&str> = changed.iter().map(|(key, _, _)| key.as_str()).collect();
        eprintln!("note: resuming with changed settings: {}", keys.join(", "));
    }
    Ok(())
}

/// A fresh run must not mix its checkpoints with an earlier run's in the same folder: those
/// are moved to `checkpoints.previous/` (replacing an older set there), never deleted outright.
fn set_aside_old_checkpoints(checkpoints: &std::path::Path, progress: &Progress) -> Result<()> {
    if checkpoint::list(checkpoints)?.is_empty() {
        return Ok(());
    }
    let previous = checkpoints.with_extension("previous");
    if previous.exists() {
        std::fs::remove_dir_all(&previous)
            .with_context(|| format!("cannot delete '{}'", previous.display()))?;
    }
    std::fs::rename(checkpoints, &previous)
        .with_context(|| format!("cannot move '{}'", checkpoints.display()))?;
    progress.println(&format!(
        "note: starting fresh; the earlier run's checkpoints were moved to '{}' (use --resume \
         auto to continue a run instead)",
        previous.display()
    ));
    Ok(())
}

/// What one optimizer step measured.
pub struct StepOutcome {
    /// The batch's mean loss over all ranks (non-finite: nothing was updated).
    pub loss: f64,
    /// Global gradient norm before clipping (non-finite: nothing was updated).
    pub grad_norm: f64,
    pub forward_s: f64,
    pub backward_s: f64,
    /// Clipping and the optimizer update.
    pub optimizer_s: f64,
    /// Averaging gradients over the ranks.
    pub communication_s: f64,
    /// A stop signal one of the ranks received before this step ended: every rank agrees
    /// on it, so all of them checkpoint after the same step.
    pub stop: Option<i32>,
}

/// One optimizer step: forward and backward over this rank's micro-batches, gradients
/// averaged over the ranks of `comm`, clipping, update. `stop` is a signal this rank
/// received; the outcome carries the one the ranks agree on. It runs inside candle's CPU
/// thread pool, so the many short parallel sections of a step (candle's and our kernels')
/// find their worker threads awake. A non-finite loss or gradient norm is returned without
/// updating anything, on every rank alike.
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    model: &Model,
    params: &[Param],
    optimizer: &mut dyn optim::Optimizer,
    micro_batches: &[(Tensor, Tensor)],
    config: &RunConfig,
    lr: f64,
    comm: &dyn Communicator,
    stop: Option<i32>,
) -> Result<StepOutcome> {
    let device = model.device().clone();
    device.with_context(|| {
        let mut acc = accumulate_gradients(model, params, micro_batches, &device)?;
        let started = Instant::now();
        let (loss, stop) = agree(comm, acc.loss, stop)?;
        let mut outcome = StepOutcome {
            loss,
            grad_norm: f64::NAN,
            forward_s: acc.forward_s,
            backward_s: acc.backward_s,
            optimizer_s: 0.0,
            communication_s: 0.0,
            stop,
        };
        if !loss.is_finite() {
            return Ok(outcome);
        }
        average_gradients(&mut acc.grads, comm)?;
        outcome.communication_s = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let (norm, clip) = optim::clip_coefficient(&acc.grads, config.optimizer.grad_clip)?;
        outcome.grad_norm = norm;
        if norm.is_finite() {
            optimizer.step(params, &acc.grads, lr, clip)?;
        }
        outcome.optimizer_s = started.elapsed().as_secs_f64();
        Ok(outcome)
    })
}

/// The outcome of forward and backward over one optimizer step's micro-batches.
pub struct Accumulated {
    /// The batch's mean loss (non-finite: the step was abandoned and `grads` is empty).
    pub loss: f64,
    /// Summed gradients, in parameter order.
    pub grads: Vec<Tensor>,
    /// Wall time in forward passes.
    pub forward_s: f64,
    /// Wall time in backward passes (and summing micro-batch gradients).
    pub backward_s: f64,
}

/// Runs forward and backward over the micro-batches of one optimizer step. Each
/// micro-batch loss is weighted by its share of the step's sequences, so the split does not change the
/// result. A non-finite loss is returned at once, without gradients, for the caller to
/// report.
pub fn accumulate_gradients(
    model: &Model,
    params: &[Param],
    micro_batches: &[(Tensor, Tensor)],
    device: &Device,
) -> Result<Accumulated> {
    let sequences: usize = micro_batches.iter().map(|(x, _)| x.dims()[0]).sum();
    let mut out = Accumulated {
        loss: 0.0,
        grads: Vec::new(),
        forward_s: 0.0,
        backward_s: 0.0,
    };
    let mut grads: Vec<Option<Tensor>> = vec![None; params.len()];
    for (inputs, targets) in micro_batches {
        let weight = inputs.dims()[0] as f64 / sequences as f64;
        let (inputs, targets) = (inputs.to_device(device)?, targets.to_device(device)?);
        let started = Instant::now();
        let loss = model.loss(&inputs, &targets)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        out.forward_s += started.elapsed().as_secs_f64();
        if !value.is_finite() {
            out.loss = value;
            return Ok(out);
        }
        out.loss += value * weight;
        let started = Instant::now();
        let mut store = (loss * weight)?.backward()?;
        for (slot, param) in grads.iter_mut().zip(params) {
            // Detached: a gradient computed from tracked tensors would otherwise keep this
            // step's whole graph alive through the optimizer state, step after step.
            let g = store
                .remove(param.var.as_tensor())
                .with_context(|| {
                    format!(
                        "parameter '{}' received no gradient: the graph is cut somewhere",
                        param.name
                    )
                })?
                .detach();
            *slot = Some(match slot.take() {
                Some(acc) => (acc + g)?,
                None => g,
            });
        }
        out.backward_s += started.elapsed().as_secs_f64();
    }
    out.grads = grads.into_iter().flatten().collect();
    Ok(out)
}

/// The step's loss averaged over the ranks (in rank order, so alike everywhere) and the
/// first stop signal any rank received.
fn agree(comm: &dyn Communicator, loss: f64, stop: Option<i32>) -> Result<(f64, Option<i32>)> {
    if comm.world() == 1 {
        return Ok((loss, stop));
    }
    let mut mine = loss.to_le_bytes().to_vec();
    mine.extend(stop.unwrap_or(0).to_le_bytes());
    let parts = comm.all_gather_bytes(&mine)?;
    let mut sum = 0.0;
    let mut first_stop = None;
    for part in &parts {
        let (loss, signal) = part.split_at(8);
        sum += f64::from_le_bytes(loss.try_into()?);
        let signal = i32::from_le_bytes(signal.try_into()?);
        if signal != 0 && first_stop.is_none() {
            first_stop = Some(signal);
        }
    }
    Ok((sum / parts.len() as f64, first_stop))
}

/// Gradients are averaged in buckets of this many elements: large enough for few
/// collectives, small enough that the packed copy stays modest.
const BUCKET_ELEMENTS: usize = 1 << 24;

/// Replaces every gradient by its mean over the ranks, packing small ones into buckets.
fn average_gradients(grads: &mut [Tensor], comm: &dyn Communicator) -> Result<()> {
    let world = comm.world();
    if world == 1 {
        return Ok(());
    }
    let scale = 1.0 / world as f64;
    let mut start = 0;
    while start < grads.len() {
        let mut end = start;
        let mut size = 0;
        while end < grads.len()
            && (end == start || size + grads[end].elem_count() <= BUCKET_ELEMENTS)
        {
            size += grads[end].elem_count();
            end += 1;
        }
        let flat: Vec<Tensor> = grads[start..end]
            .iter()
            .map(|g| g.flatten_all())
            .collect::<candle_core::Result<_>>()?;
        let summed = comm.all_reduce_sum(&Tensor::cat(&flat, 0)?)?;
        let mut offset = 0;
        for g in &mut grads[start..end] {
            let n = g.elem_count();
            *g = (summed.narrow(0, offset, n)?.reshape(g.shape())? * scale)?;
            offset += n;
        }
        start = end;
    }
    Ok(())
}

/// Rank 0's weights on every rank.
fn broadcast_params(params: &[Param], comm: &dyn Communicator) -> Result<()> {
    if comm.world() == 1 {
        return Ok(());
    }
    for p in params {
        let shared = comm.broadcast(p.var.as_tensor(), 0)?;
        if comm.rank() != 0 {
            p.var.set(&shared)?;
        }
    }
    Ok(())
}

/// Rank 0's `path` on every rank.
fn shared_path(comm: &dyn Communicator, path: Option<PathBuf>) -> Result<Option<PathBuf>> {
    if comm.world() == 1 {
        return Ok(path);
    }
    let mine = path.map(|p| p.display().to_string()).unwrap_or_default();
    let parts = comm.all_gather_bytes(mine.as_bytes())?;
    let root = String::from_utf8_lossy(&parts[0]).into_owned();
    Ok((!root.is_empty()).then(|| PathBuf::from(root)))
}

/// Wraps a non-finite loss or gradient into an error that names the step and the fix.
fn diverged(cause: String, step: usize, lr: f64, metrics: &Option<MetricsLog>) -> anyhow::Error {
    let logged = metrics.as_ref().map_or(String::new(), |m| {
        format!(
            "; the metrics logged so far are in '{}'",
            m.path().display()
        )
    });
    anyhow::anyhow!(
        "training diverged at step {}: {cause}. Lower the learning rate (--lr, {lr:.3e} at \
         this step) or lengthen warmup (--warmup-steps){logged}",
        step + 1,
    )
}

/// Test hook for data-parallel faults: `BSFA_TRAIN_FAILPOINT=rank-<kind>:<rank>:<step>`
/// makes that rank, after that step, `abort` (die as `kill -9` would leave it: no message
/// to the others), `error` (fail with an error, as on bad data), or `hang` (stop answering).
fn injected_fault(rank: usize, step: usize) -> Result<()> {
    let Ok(spec) = std::env::var("BSFA_TRAIN_FAILPOINT") else {
        return Ok(());
    };
    let mut parts = spec.split(':');
    let (Some(kind), Some(at_rank), Some(at_step)) = (parts.next(), parts.next(), parts.next())
    else {
        return Ok(());
    };
    if at_rank != rank.to_string() || at_step != step.to_string() {
        return Ok(());
    }
    match kind {
        "rank-abort" => {
            eprintln!("failpoint {spec}: aborting");
            std::process::abort();
        }
        "rank-error" => bail!("failpoint {spec}: injected error"),
        "rank-hang" => loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        },
        _ => Ok(()),
    }
}
