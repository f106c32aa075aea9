//! One optimizer step: forward and backward over this rank's micro-batches, gradients
//! averaged over the ranks, clipping, update.

use crate::config::RunConfig;
use crate::dist::{self, Communicator};
use crate::model::{Model, Param};
use crate::optim::bsfa::BsfaPartition;
use crate::optim::{self, Optimizer, OptimizerName, Stack};
use crate::task::Task;
use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use std::sync::Arc;
use std::time::Instant;

/// What a step needs: the task (model and data), its parameters, the optimizer, the other
/// ranks, and the gradient-norm clip (0: none).
pub struct Trainer {
    /// The model and the data it trains on.
    pub task: Box<dyn Task>,
    /// The task's parameters, in the order gradients and optimizer state follow.
    pub params: Vec<Param>,
    /// The optimizer that updates them (BSFA, when enabled, inside).
    pub optimizer: Stack,
    /// The data-parallel ranks.
    pub comm: Arc<dyn Communicator>,
    /// `optimizer.grad_clip`.
    pub clip: f64,
}

/// What one optimizer step measured.
pub struct StepOutcome {
    /// The batch's mean loss over all ranks (non-finite: nothing was updated).
    pub loss: f64,
    /// Global gradient norm before clipping (non-finite: nothing was updated).
    pub grad_norm: f64,
    /// Wall time in forward passes.
    pub forward_s: f64,
    /// Wall time in backward passes (and summing micro-batch gradients).
    pub backward_s: f64,
    /// Clipping and the optimizer update.
    pub optimizer_s: f64,
    /// Averaging gradients over the ranks.
    pub communication_s: f64,
    /// A stop signal one of the ranks received before this step ended: every rank agrees
    /// on it, so all of them checkpoint after the same step.
    pub stop: Option<i32>,
    /// What BSFA's re-estimation in this step found, per group (only in such steps).
    pub bsfa: Option<Vec<crate::optim::bsfa::GroupDiagnostics>>,
}

impl Trainer {
    /// A trainer for `task`'s `params` with the optimizer `config` names (Adam-mini over the
    /// task's partition, wrapped in BSFA when enabled, its state sharded over `comm`).
    pub fn new(
        config: &RunConfig,
        task: Box<dyn Task>,
        params: Vec<Param>,
        comm: &Arc<dyn Communicator>,
    ) -> Result<Self> {
        // Adam-mini's partition of the model; AdamW needs none, unless BSFA's blocks are it.
        let bsfa_blocks = config.bsfa.enabled && config.bsfa.partition == BsfaPartition::AdamMini;
        let blocks = match config.optimizer.name {
            OptimizerName::AdamW if !bsfa_blocks => Vec::new(),
            _ => crate::task::adam_mini_blocks(config, &params)?,
        };
        let optimizer = optim::build(&config.optimizer, &config.bsfa, &params, &blocks, comm)?;
        Ok(Self {
            task,
            params,
            optimizer,
            comm: Arc::clone(comm),
            clip: config.optimizer.grad_clip,
        })
    }

    /// One optimizer step on the task's next batch at learning rate `lr`. `stop` is a signal
    /// this rank received; the outcome carries the one the ranks agree on. It runs inside
    /// candle's CPU thread pool, so the many short parallel sections of a step (candle's and
    /// our kernels') find their worker threads awake. A non-finite loss or gradient norm is
    /// returned without updating anything, on every rank alike.
    pub fn step(&mut self, lr: f64, stop: Option<i32>) -> Result<StepOutcome> {
        let micro_batches = tracing::info_span!("data wait").in_scope(|| self.task.next_batch())?;
        let model = self.task.model();
        let comm = self.comm.as_ref();
        // The step runs on candle's thread pool: it takes this thread's tracing subscriber
        // (the profiler's) along.
        let dispatch = tracing::dispatcher::get_default(|d| d.clone());
        model.device().with_context(|| {
            tracing::dispatcher::with_default(&dispatch, || {
                let mut acc = accumulate_gradients(model, &self.params, &micro_batches)?;
                let started = Instant::now();
                let (loss, stop) = dist::agree(comm, acc.loss, stop)?;
                let mut outcome = StepOutcome {
                    loss,
                    grad_norm: f64::NAN,
                    forward_s: acc.forward_s,
                    backward_s: acc.backward_s,
                    optimizer_s: 0.0,
                    communication_s: 0.0,
                    stop,
                    bsfa: None,
                };
                if !loss.is_finite() {
                    return Ok(outcome);
                }
                tracing::info_span!("all-reduce gradients")
                    .in_scope(|| dist::average_gradients(&mut acc.grads, comm))?;
                outcome.communication_s = started.elapsed().as_secs_f64();
                let started = Instant::now();
                let _optimizer = tracing::info_span!("optimizer").entered();
                let (norm, clip) = optim::clip_coefficient(&acc.grads, self.clip)?;
                outcome.grad_norm = norm;
                if norm.is_finite() {
                    self.optimizer.step(&self.params, &acc.grads, lr, clip)?;
                    outcome.bsfa = self.optimizer.bsfa().and_then(|b| b.take_diagnostics());
                }
                outcome.optimizer_s = started.elapsed().as_secs_f64();
                Ok(outcome)
            })
        })
    }
}

/// The outcome of forward and backward over one optimizer step's micro-batches.
struct Accumulated {
    /// The batch's mean loss (non-finite: the step was abandoned and `grads` is empty).
    loss: f64,
    /// Summed gradients, in parameter order.
    grads: Vec<Tensor>,
    forward_s: f64,
    backward_s: f64,
}

/// Runs forward and backward over the micro-batches of one optimizer step. Each
/// micro-batch loss is weighted by its share of the step's sequences, so the split does not
/// change the result. A non-finite loss is returned at once, without gradients, for the
/// caller to report.
fn accumulate_gradients(
    model: &dyn Model,
    params: &[Param],
    micro_batches: &[(Tensor, Tensor)],
) -> Result<Accumulated> {
    let device = model.device();
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
        let forward = tracing::info_span!("forward").entered();
        let loss = model.loss(&inputs, &targets)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        drop(forward);
        out.forward_s += started.elapsed().as_secs_f64();
        if !value.is_finite() {
            out.loss = value;
            return Ok(out);
        }
        out.loss += value * weight;
        let started = Instant::now();
        let _backward = tracing::info_span!("backward").entered();
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
