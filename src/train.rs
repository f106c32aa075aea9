//! The training loop, top to bottom: data, model, optimizer, then step after step of
//! accumulate gradients -> clip -> update -> log -> evaluate.

use crate::config::RunConfig;
use crate::data::{self, Batcher, Tokenizer};
use crate::metrics::{MetricsLog, Progress};
use crate::model::{Llama, Param, ParamCounts};
use crate::optim::{self, schedule::lr_at};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

/// The one-line JSON summary a run prints last on stdout.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub steps: usize,
    pub params: usize,
    pub final_train_loss: f64,
    pub final_val_loss: f64,
    pub final_val_ppl: f64,
    pub tokens_per_s: f64,
    pub wall_s: f64,
    pub out: String,
    /// Train loss of every optimizer step, for tests and scripts (not printed).
    #[serde(skip)]
    pub losses: Vec<f64>,
}

/// Seed offset for evaluation windows, so they never coincide with training draws.
const EVAL_SEED_OFFSET: u64 = 0x5EED_0FE7_A100;

/// Trains as `config` says, writing `config.json` and `metrics.jsonl` into its out folder.
pub fn run(config: &RunConfig) -> Result<Summary> {
    let wall = Instant::now();
    let device = Device::Cpu;
    let train_cfg = &config.train;
    let out = PathBuf::from(&train_cfg.out);
    std::fs::create_dir_all(&out)
        .with_context(|| format!("cannot create output folder '{}'", out.display()))?;
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(config)?,
    )
    .with_context(|| format!("cannot write '{}'", out.join("config.json").display()))?;

    let tokenizer = Tokenizer::load(&config.data.tokenizer)?;
    check_vocab(config, &tokenizer)?;
    let data = data::load(
        &config.data.train,
        config.data.val.as_deref(),
        config.data.val_fraction,
        &tokenizer,
        train_cfg.seq_len,
    )?;

    let (model, params) = Llama::new(&config.model, DType::F32, &device, train_cfg.seed)?;
    let param_count = ParamCounts::of(&params).total;
    let mut optimizer = optim::build(config, &params)?;
    let mut metrics = MetricsLog::create(&out.join("metrics.jsonl"))?;
    let mut batcher = Batcher::new(&data.train, train_cfg.seed);
    let progress = Progress::new(train_cfg.steps);
    progress.println(&format!(
        "training {} parameters on {} train / {} val tokens, {} steps of {} x {} tokens",
        param_count,
        data.train.len(),
        data.val.len(),
        train_cfg.steps,
        train_cfg.batch_size,
        train_cfg.seq_len
    ));

    let opt_cfg = &config.optimizer;
    let tokens_per_step = train_cfg.batch_size * train_cfg.seq_len;
    let mut losses = Vec::with_capacity(train_cfg.steps);
    let mut train_time = 0.0f64;
    let mut val_loss = f64::NAN;
    for step in 0..train_cfg.steps {
        let started = Instant::now();
        let lr = lr_at(
            step,
            train_cfg.steps,
            opt_cfg.warmup_steps,
            opt_cfg.lr,
            opt_cfg.min_lr_ratio,
        );
        let outcome = train_step(
            &model,
            &params,
            optimizer.as_mut(),
            &mut batcher,
            config,
            lr,
        )?;
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

        let done = step + 1;
        let tokens_per_s = tokens_per_step as f64 / step_s;
        let log_now = done % train_cfg.log_every == 0 || done == train_cfg.steps || step == 0;
        progress.step(done, loss, tokens_per_s, log_now);
        if log_now {
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
            val_loss = evaluate(&model, &data.val, config, &device)?;
            metrics.write(&json!({
                "step": done,
                "val_loss": val_loss,
                "val_ppl": val_loss.exp(),
            }))?;
            progress.println(&format!(
                "step {done}: val_loss {val_loss:.4} (ppl {:.2})",
                val_loss.exp()
            ));
        }
    }
    progress.finish();
    Ok(Summary {
        steps: train_cfg.steps,
        params: param_count,
        final_train_loss: losses.last().copied().unwrap_or(f64::NAN),
        final_val_loss: val_loss,
        final_val_ppl: val_loss.exp(),
        tokens_per_s: (tokens_per_step * train_cfg.steps) as f64 / train_time,
        wall_s: wall.elapsed().as_secs_f64(),
        out: out.display().to_string(),
        losses,
    })
}

/// What one optimizer step measured.
pub struct StepOutcome {
    /// The batch's mean loss (non-finite: nothing was updated).
    pub loss: f64,
    /// Global gradient norm before clipping (non-finite: nothing was updated).
    pub grad_norm: f64,
    pub forward_s: f64,
    pub backward_s: f64,
    /// Clipping and the optimizer update.
    pub optimizer_s: f64,
}

/// One optimizer step: forward and backward over the micro-batches, clipping, update. It
/// runs inside candle's CPU thread pool, so the many short parallel sections of a step
/// (candle's and our kernels') find their worker threads awake. A non-finite loss or
/// gradient norm is returned without updating anything.
pub fn train_step(
    model: &Llama,
    params: &[Param],
    optimizer: &mut dyn optim::Optimizer,
    batcher: &mut Batcher,
    config: &RunConfig,
    lr: f64,
) -> Result<StepOutcome> {
    let device = model.device().clone();
    device.with_context(|| {
        let acc = accumulate_gradients(model, params, batcher, config, &device)?;
        let mut outcome = StepOutcome {
            loss: acc.loss,
            grad_norm: f64::NAN,
            forward_s: acc.forward_s,
            backward_s: acc.backward_s,
            optimizer_s: 0.0,
        };
        if !acc.loss.is_finite() {
            return Ok(outcome);
        }
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
/// micro-batch loss is weighted by its share of the batch, so the split does not change the
/// result. A non-finite loss is returned at once, without gradients, for the caller to
/// report.
pub fn accumulate_gradients(
    model: &Llama,
    params: &[Param],
    batcher: &mut Batcher,
    config: &RunConfig,
    device: &Device,
) -> Result<Accumulated> {
    let train = &config.train;
    let micro = train.micro_batch();
    let weight = micro as f64 / train.batch_size as f64;
    let mut out = Accumulated {
        loss: 0.0,
        grads: Vec::new(),
        forward_s: 0.0,
        backward_s: 0.0,
    };
    let mut grads: Vec<Option<Tensor>> = vec![None; params.len()];
    for _ in 0..train.batch_size / micro {
        let (inputs, targets) = batcher.next_batch(micro, train.seq_len, device)?;
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

/// Mean validation loss over `eval_batches` micro-batches drawn from a fixed seed, so every
/// evaluation of a run sees the same windows.
pub fn evaluate(model: &Llama, val: &[u32], config: &RunConfig, device: &Device) -> Result<f64> {
    let train = &config.train;
    let mut batcher = Batcher::new(val, train.seed.wrapping_add(EVAL_SEED_OFFSET));
    let mut sum = 0.0;
    for _ in 0..train.eval_batches {
        let (inputs, targets) = batcher.next_batch(train.micro_batch(), train.seq_len, device)?;
        let loss = model.loss(&inputs, &targets)?.detach();
        sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    }
    Ok(sum / train.eval_batches as f64)
}

fn check_vocab(config: &RunConfig, tokenizer: &Tokenizer) -> Result<()> {
    let needed = tokenizer.vocab_size();
    if config.model.vocab_size < needed {
        bail!(
            "model.vocab_size ({}) is smaller than the tokenizer's vocabulary ({needed}); \
             set --set model.vocab_size={} or more (a multiple of 64 is fastest)",
            config.model.vocab_size,
            needed.div_ceil(64) * 64
        );
    }
    Ok(())
}

/// Wraps a non-finite loss or gradient into an error that names the step and the fix.
fn diverged(cause: String, step: usize, lr: f64, metrics: &MetricsLog) -> anyhow::Error {
    anyhow::anyhow!(
        "training diverged at step {}: {cause}. Lower the learning rate (--lr, {lr:.3e} at \
         this step) or lengthen warmup (--warmup-steps); the metrics logged so far are in '{}'",
        step + 1,
        metrics.path().display()
    )
}
