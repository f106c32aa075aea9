//! What a run leaves behind as it trains: the progress display, `metrics.jsonl`,
//! `config.json`, checkpoints, and the summary printed last.

use super::{StepOutcome, Trainer};
use crate::checkpoint::{self, TrainerState};
use crate::config::RunConfig;
use crate::data::Tokenizer;
use crate::device::Precision;
use crate::dist::{self, Job};
use crate::interrupt;
use crate::metrics::{MetricsLog, Progress};
use crate::model::ParamCounts;
use crate::optim::Optimizer;
use crate::sample::{printable, Sample};
use crate::task::Evaluation;
use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The one-line JSON summary a run prints last on stdout.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Optimizer steps completed (counting those before a resume).
    pub steps: usize,
    /// Trainable parameters.
    pub params: usize,
    /// Training tokens (images for a ViT) consumed, counting those before a resume.
    pub tokens_seen: u64,
    /// Train loss of the last step.
    pub final_train_loss: f64,
    /// Validation loss at the last evaluation.
    pub final_val_loss: f64,
    /// `exp(final_val_loss)`.
    pub final_val_ppl: f64,
    /// Image runs: top-1 accuracy on the validation split at the last evaluation.
    pub final_val_top1: Option<f64>,
    /// Image runs: top-5 accuracy at the last evaluation.
    pub final_val_top5: Option<f64>,
    /// Mean over this process's steps.
    pub tokens_per_s: f64,
    /// Seconds from start to end.
    pub wall_s: f64,
    /// The out folder.
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
    pub dtype: Precision,
    /// Optimizer state bytes each rank held at the end (BSFA's share falls as 1/ranks).
    pub optimizer_state_bytes_per_rank: Vec<usize>,
    /// Peak resident memory of each rank's process, MiB (0 where unknown).
    pub peak_rss_mib_per_rank: Vec<f64>,
    /// Training FLOPs per token (per image for a ViT), see [`crate::model::ModelSpec::flops_per_unit`].
    pub flops_per_token: f64,
    /// Peak dense TFLOP/s of one rank's device that MFU is measured against, when known.
    pub peak_tflops: Option<f64>,
    /// Where `peak_tflops` comes from: `--peak-tflops`, a datasheet, or a measurement.
    pub peak_tflops_source: Option<String>,
    /// Model FLOPs utilisation over this process's steps, when the peak is known.
    pub mfu: Option<f64>,
    /// Train loss of every optimizer step this process ran, for tests and scripts.
    #[serde(skip)]
    pub losses: Vec<f64>,
}

/// The outputs of one run on one rank (rank 0 alone writes files and shows progress).
pub struct Recorder {
    config: RunConfig,
    root: bool,
    checkpoints: PathBuf,
    progress: Progress,
    metrics: Option<MetricsLog>,
    summary: Summary,
    wall: Instant,
    /// Seconds spent in training steps, for the mean throughput.
    train_s: f64,
    /// The device this rank computes on, for its peak FLOP/s and memory.
    device: candle_core::Device,
    /// The highest memory reading so far (MiB): a GPU reports only the current use.
    peak_mem_mib: f64,
    /// Rank 0 of a language model run: the run's tokenizer.json as read when it started
    /// (none for the bytes tokenizer), stored in every checkpoint.
    tokenizer: Option<Vec<u8>>,
}

impl Recorder {
    /// The progress display, before anything is written; `resumed` is the checkpoint's
    /// trainer state when the run resumes, `wall` when the run started.
    pub fn open(
        config: &RunConfig,
        job: &Job,
        resumed: Option<&TrainerState>,
        wall: Instant,
    ) -> Self {
        let root = job.is_root();
        let progress = if root {
            Progress::new(config.train.steps, resumed.map_or(0, |s| s.step))
        } else {
            Progress::silent()
        };
        let out = PathBuf::from(&config.train.out);
        Self {
            config: config.clone(),
            root,
            checkpoints: out.join(super::CHECKPOINTS_DIR),
            progress,
            metrics: None,
            summary: Summary {
                steps: resumed.map_or(0, |s| s.step),
                params: 0,
                tokens_seen: resumed.map_or(0, |s| s.tokens_seen),
                final_train_loss: f64::NAN,
                final_val_loss: f64::NAN,
                final_val_ppl: f64::NAN,
                final_val_top1: None,
                final_val_top5: None,
                tokens_per_s: f64::NAN,
                wall_s: 0.0,
                out: out.display().to_string(),
                checkpoint: None,
                resumed_from: resumed.map(|s| s.step),
                interrupted_by: None,
                signal: None,
                ranks: job.comm.world(),
                device: crate::device::name(&job.device),
                dtype: config.train.dtype,
                optimizer_state_bytes_per_rank: Vec::new(),
                peak_rss_mib_per_rank: Vec::new(),
                flops_per_token: f64::NAN,
                peak_tflops: None,
                peak_tflops_source: None,
                mfu: None,
                losses: Vec::new(),
            },
            wall,
            train_s: 0.0,
            device: job.device.clone(),
            peak_mem_mib: 0.0,
            tokenizer: None,
        }
    }

    /// Shows a line above the progress display (rank 0 only).
    pub fn note(&self, line: &str) {
        self.progress.println(line);
    }

    /// Opens `metrics.jsonl` (cut back to the step a resume starts at), writes
    /// `config.json` and announces the run.
    pub fn started(
        mut self,
        trainer: &Trainer,
        resumed_dir: Option<PathBuf>,
        start: usize,
    ) -> Result<Self> {
        let config = &self.config;
        let out = PathBuf::from(&config.train.out);
        let metrics_path = out.join("metrics.jsonl");
        if self.root {
            let tensorboard = config.train.tensorboard.then(|| out.join("tb"));
            let tensorboard = tensorboard.as_deref();
            self.metrics = Some(match start {
                0 => MetricsLog::create(&metrics_path, tensorboard)?,
                step => MetricsLog::resume(&metrics_path, step, tensorboard)?,
            });
            let path = out.join("config.json");
            std::fs::write(&path, serde_json::to_string_pretty(config)?)
                .with_context(|| format!("cannot write '{}'", path.display()))?;
        }
        if self.root && config.spec().language_model().is_some() {
            // Read once: every checkpoint holds the tokenizer this run started with.
            let file = Tokenizer::file(&config.data.tokenizer)?;
            self.tokenizer = file
                .map(|f| {
                    std::fs::read(&f).with_context(|| format!("cannot read '{}'", f.display()))
                })
                .transpose()?;
        }
        self.summary.checkpoint = resumed_dir.map(|dir| dir.display().to_string());
        let train = &config.train;
        let counts = ParamCounts::of(&trainer.params);
        self.summary.params = counts.total;
        self.summary.flops_per_token = config
            .spec()
            .flops_per_unit(counts.total - counts.embeddings, train.seq_len);
        if self.root {
            if let Some(peak) = crate::mfu::peak(train.peak_tflops, train.dtype, &self.device)? {
                self.summary.peak_tflops = Some(peak.tflops);
                self.summary.peak_tflops_source = Some(peak.source);
            }
        }
        let world = trainer.comm.world();
        let ranks = if world > 1 {
            format!(" on {world} ranks")
        } else {
            String::new()
        };
        let batch = config.spec().batch_shape(train.batch_size, train.seq_len);
        self.note(&format!(
            "training {} parameters on {}, {} steps of {batch}{ranks} ({})",
            self.summary.params,
            trainer.task.describe(),
            train.steps,
            self.summary.device,
        ));
        Ok(self)
    }

    /// Records finished step `done` (taking `elapsed`): refuses a diverged one, updates the
    /// progress display and, every `log_every` steps, the metrics.
    pub fn step(
        &mut self,
        done: usize,
        lr: f64,
        outcome: &StepOutcome,
        elapsed: Duration,
    ) -> Result<()> {
        let (loss, grad_norm) = (outcome.loss, outcome.grad_norm);
        if !loss.is_finite() {
            return Err(self.diverged(format!("loss is {loss}"), done, lr));
        }
        if !grad_norm.is_finite() {
            return Err(self.diverged(format!("gradient norm is {grad_norm}"), done, lr));
        }
        let step_s = elapsed.as_secs_f64();
        let units = self.config.units_per_step();
        self.train_s += step_s;
        self.summary.losses.push(loss);
        self.summary.tokens_seen += units as u64;
        self.summary.steps = done;
        let tokens_per_s = units as f64 / step_s;
        let log_every = self.config.train.log_every;
        let log_now = done.is_multiple_of(log_every)
            || done == self.config.train.steps
            || self.summary.losses.len() == 1;
        self.progress.step(done, loss, tokens_per_s, log_now);
        if log_now && self.metrics.is_some() {
            let mut record = json!({
                "step": done,
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": tokens_per_s,
                "step_ms": step_s * 1e3,
            });
            self.add_utilisation(&mut record, tokens_per_s);
            if let Some(metrics) = &mut self.metrics {
                metrics.write(&record)?;
            }
        }
        if let (Some(groups), Some(metrics)) = (&outcome.bsfa, &mut self.metrics) {
            metrics.write(&json!({ "step": done, "bsfa": groups }))?;
        }
        Ok(())
    }

    /// Adds to a step's metrics line the achieved TFLOP/s of all ranks, MFU against the
    /// peak (when known) and this rank's memory now and at its peak.
    fn add_utilisation(&mut self, record: &mut serde_json::Value, tokens_per_s: f64) {
        let tflops = self.summary.flops_per_token * tokens_per_s / 1e12;
        record["tflops"] = json!(tflops);
        if let Some(mfu) = self.mfu(tokens_per_s) {
            record["mfu"] = json!(mfu);
        }
        if let Some((now, peak)) = crate::mfu::memory_mib(&self.device) {
            self.peak_mem_mib = self.peak_mem_mib.max(peak);
            record["mem_mib"] = json!(now);
            record["peak_mem_mib"] = json!(self.peak_mem_mib);
        }
    }

    /// MFU at `tokens_per_s` (all ranks), against every rank's peak.
    fn mfu(&self, tokens_per_s: f64) -> Option<f64> {
        let summary = &self.summary;
        Some(crate::mfu::utilisation(
            summary.flops_per_token,
            tokens_per_s,
            summary.peak_tflops?,
            summary.ranks,
        ))
    }

    /// Whether to evaluate after step `done`: every `eval_every` steps and after the last.
    pub fn evaluates_at(&self, done: usize) -> bool {
        let every = self.config.train.eval_every;
        (every > 0 && done.is_multiple_of(every)) || done == self.config.train.steps
    }

    /// Records the evaluation after step `done`.
    pub fn evaluation(&mut self, done: usize, evaluation: &Evaluation) -> Result<()> {
        let val_loss = evaluation.loss;
        self.summary.final_val_loss = val_loss;
        self.summary.final_val_ppl = val_loss.exp();
        self.summary.final_val_top1 = evaluation.top1;
        self.summary.final_val_top5 = evaluation.top5;
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
        if let Some(metrics) = &mut self.metrics {
            metrics.write(&record)?;
        }
        self.note(&format!(
            "step {done}: val_loss {val_loss:.4} (ppl {:.2}){accuracy}",
            val_loss.exp()
        ));
        Ok(())
    }

    /// Whether to write a training sample after step `done`: every `sample_every` steps
    /// and after the last (never when it is 0).
    pub fn samples_at(&self, done: usize) -> bool {
        let every = self.config.train.sample_every;
        every > 0 && (done.is_multiple_of(every) || done == self.config.train.steps)
    }

    /// Prints and logs the sample written after step `done`.
    pub fn sample(&mut self, done: usize, sample: &Sample) -> Result<()> {
        let prompt = &self.config.train.sample_prompt;
        if let Some(metrics) = &mut self.metrics {
            metrics.write(&json!({
                "step": done,
                "sample_prompt": prompt,
                "sample": sample.text,
            }))?;
        }
        // The file keeps the text as it is (JSON escapes it); the terminal gets it escaped.
        self.note(&printable(&format!(
            "step {done}: sample: {prompt}{}",
            sample.text
        )));
        Ok(())
    }

    /// Whether to checkpoint after step `done`: every `checkpoint_every` steps and after the
    /// last (and on a stop signal, which the loop decides).
    pub fn checkpoints_at(&self, done: usize) -> bool {
        let every = self.config.train.checkpoint_every;
        (every > 0 && done.is_multiple_of(every)) || done == self.config.train.steps
    }

    /// Writes the checkpoint after step `done` (every rank takes part) and prunes old ones
    /// (never one after `done`).
    pub fn checkpoint(&mut self, done: usize, trainer: &Trainer) -> Result<()> {
        let position = trainer.task.position();
        let state = TrainerState {
            format_version: checkpoint::FORMAT_VERSION,
            step: done,
            tokens_seen: self.summary.tokens_seen,
            data_position: position.tokens,
            image_position: position.images,
            config: self.config.clone(),
            checksums: Default::default(),
        };
        let saving = Instant::now();
        let comm = trainer.comm.as_ref();
        let optimizer = &trainer.optimizer;
        let tokenizer = self.tokenizer.as_deref();
        let dir = checkpoint::save(
            &self.checkpoints,
            &state,
            &trainer.params,
            optimizer,
            comm,
            tokenizer,
        )?;
        if self.root {
            checkpoint::prune(&self.checkpoints, self.config.train.keep_checkpoints, done)?;
        }
        self.note(&format!(
            "checkpoint '{}' written in {:.1}s",
            dir.display(),
            saving.elapsed().as_secs_f64()
        ));
        self.summary.checkpoint = Some(dir.display().to_string());
        Ok(())
    }

    /// Records that every rank stops after step `done` on `signal` (checkpoint written).
    pub fn stopped(&mut self, signal: i32, done: usize) {
        self.progress.finish();
        self.summary.signal = Some(signal);
        if !self.root {
            return;
        }
        let name = interrupt::signal_name(signal);
        eprintln!(
            "stopped by {name} after step {done} of {}; checkpoint saved. Resume with the same \
             command plus --resume auto",
            self.config.train.steps
        );
        self.summary.interrupted_by = Some(name.to_string());
    }

    /// The summary, with every rank's optimizer state and peak memory.
    pub fn finish(mut self, trainer: &Trainer, start: usize) -> Result<Summary> {
        self.progress.finish();
        let mine = [
            trainer.optimizer.state_bytes() as f64,
            crate::metrics::peak_rss_mib().unwrap_or(0.0),
        ];
        for [bytes, rss] in dist::all_gather_array(trainer.comm.as_ref(), mine)? {
            self.summary
                .optimizer_state_bytes_per_rank
                .push(bytes as usize);
            self.summary.peak_rss_mib_per_rank.push(rss);
        }
        if self.root && start == self.config.train.steps {
            eprintln!(
                "the checkpoint is at step {start}, the run's last: nothing to do (raise --steps \
                 to go on)"
            );
        }
        let summary = &mut self.summary;
        summary.final_train_loss = summary.losses.last().copied().unwrap_or(f64::NAN);
        let units = self.config.units_per_step() * summary.losses.len();
        summary.tokens_per_s = units as f64 / self.train_s;
        summary.wall_s = self.wall.elapsed().as_secs_f64();
        self.summary.mfu = self.mfu(self.summary.tokens_per_s);
        Ok(self.summary)
    }

    /// A non-finite loss or gradient at step `done` as an error that names the fix.
    fn diverged(&self, cause: String, done: usize, lr: f64) -> anyhow::Error {
        let logged = self.metrics.as_ref().map_or(String::new(), |m| {
            format!(
                "; the metrics logged so far are in '{}'",
                m.path().display()
            )
        });
        anyhow::anyhow!(
            "training diverged at step {done}: {cause}. Lower the learning rate (--lr, {lr:.3e} \
             at this step) or lengthen warmup (--warmup-steps){logged}"
        )
    }
}
