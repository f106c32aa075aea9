//! `bench --kernels`: each fused LLaMA op against its reference composition at the run's
//! shapes (one micro-batch of `train.micro_batch_size x train.seq_len` tokens, the model's
//! widths, the run's device and compute type): the worst relative difference of the output
//! and the input gradients, and the median time of a forward and backward of each; and the
//! optimizer's update and BSFA's projection over the model's parameters, each step against
//! its tensor ops. On a GPU
//! the fused path is our Triton kernels (after their self-check), on the CPU the fused CPU
//! kernels (f32); where neither applies both sides are the reference and the report says so.

use crate::config::RunConfig;
use crate::model::ops::{self, compare, reference};
use crate::model::Param;
use crate::optim::{Adam, Optimizer, OptimizerName};
use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use serde::Serialize;
use std::time::Instant;

/// One op's comparison.
#[derive(Debug, Clone, Serialize)]
pub struct KernelReport {
    /// The op: adam-update, bsfa-projection, attention, cross-entropy, rms-norm,
    /// residual-rms-norm or swiglu.
    pub kernel: String,
    /// Its input shapes.
    pub shape: String,
    /// Which implementation the run's dispatch took: `triton`, `cpu-fused` or `reference`.
    pub path: String,
    /// The worst difference from the reference over the output and the input gradients,
    /// relative to each one's largest magnitude.
    pub worst_difference: f64,
    /// Median ms of a forward and backward through the run's dispatch.
    pub fused_ms: f64,
    /// Median ms of the same through the reference composition.
    pub reference_ms: f64,
}

/// An op of tensors: the inputs in, the output out.
type Op<'a> = Box<dyn Fn(&[Tensor]) -> candle_core::Result<Tensor> + 'a>;

/// Compares and times every op on `device` with `config`'s shapes, `iters` timed runs each
/// after one untimed one.
pub fn run(config: &RunConfig, device: &Device, iters: usize) -> Result<Vec<KernelReport>> {
    let config = config.on_device(device);
    config.train.set_compute(device)?;
    let m = &config.model;
    let dtype = config.train.dtype.dtype();
    let (batch, seq) = (config.train.micro_batch(), config.train.seq_len);
    let (rows, hidden, heads, kv) = (
        batch * seq,
        m.hidden_size,
        m.num_attention_heads,
        m.kv_heads(),
    );
    let (dim, inter, vocab) = (m.head_dim(), m.intermediate_size, m.vocab_size);
    let draw = |shape: &[usize]| compare::random(shape, dtype, device);
    let (cos, sin) = ops::rope_tables(dim, seq, m.rope_theta, dtype, device)?;
    let targets: Vec<u32> = (0..rows).map(|i| (i * 7919 % vocab) as u32).collect();
    let targets = Tensor::from_vec(targets, rows, device)?;
    let eps = m.rms_norm_eps;
    let widths = (heads * dim, kv * dim);
    let cases: Vec<(&str, String, Vec<Tensor>, Op, Op)> = vec![
        (
            "attention",
            format!("x {batch}x{seq}x{hidden}, {heads} heads, {kv} kv heads, head dim {dim}"),
            vec![
                (draw(&[batch, seq, hidden])? * 0.5)?,
                (draw(&[widths.0, hidden])? * (hidden as f64).powf(-0.5))?,
                (draw(&[widths.1, hidden])? * (hidden as f64).powf(-0.5))?,
                (draw(&[widths.1, hidden])? * (hidden as f64).powf(-0.5))?,
            ],
            Box::new(|v| ops::attention(&v[0], (&v[1], &v[2], &v[3]), (&cos, &sin), heads, kv)),
            Box::new(|v| {
                reference::attention(&v[0], (&v[1], &v[2], &v[3]), (&cos, &sin), heads, kv)
            }),
        ),
        (
            "cross-entropy",
            format!("x {rows}x{hidden}, head {vocab}x{hidden}"),
            vec![draw(&[rows, hidden])?, (draw(&[vocab, hidden])? * 0.05)?],
            Box::new(|v| ops::linear_cross_entropy(&v[0], &v[1], &targets)),
            Box::new(|v| reference::linear_cross_entropy(&v[0], &v[1], &targets)),
        ),
        (
            // The model normalises in f32 (its norm weights' type) under bf16 compute.
            "rms-norm",
            format!("x {rows}x{hidden}, f32"),
            vec![
                compare::random(&[rows, hidden][..], DType::F32, device)?,
                compare::random(&[hidden][..], DType::F32, device)?,
            ],
            Box::new(move |v| ops::rms_norm(&v[0], &v[1], eps)),
            Box::new(move |v| reference::rms_norm(&v[0], &v[1], eps)),
        ),
        (
            // The residual stream in the compute type, the norm's weight f32, as the model has
            // them; the sum and its norm both in the output.
            "residual-rms-norm",
            format!("x and delta {rows}x{hidden}, f32 weight"),
            vec![
                draw(&[rows, hidden])?,
                draw(&[rows, hidden])?,
                compare::random(&[hidden][..], DType::F32, device)?,
            ],
            Box::new(move |v| {
                let (sum, normed) = ops::add_rms_norm(&v[0], &v[1], &v[2], eps)?;
                sum + normed
            }),
            Box::new(move |v| {
                let sum = (&v[0] + &v[1])?;
                let wide = reference::rms_norm(&sum.to_dtype(DType::F32)?, &v[2], eps)?;
                sum.clone() + wide.to_dtype(sum.dtype())?
            }),
        ),
        (
            "swiglu",
            format!("x {rows}x{hidden}, gate and up {inter}x{hidden}"),
            vec![
                draw(&[rows, hidden])?,
                (draw(&[inter, hidden])? * (hidden as f64).powf(-0.5))?,
                (draw(&[inter, hidden])? * (hidden as f64).powf(-0.5))?,
            ],
            Box::new(|v| ops::swiglu(&v[0], &v[1], &v[2])),
            Box::new(|v| reference::swiglu(&v[0], &v[1], &v[2])),
        ),
    ];
    let mut reports = optimizer_reports(&config, device, iters)?;
    for (kernel, shape, inputs, fused, reference) in cases {
        let worst_difference = compare::worst_difference(&inputs, &fused, &reference)?;
        let fused_ms = median_ms(&inputs, &fused, device, iters)?;
        let reference_ms = median_ms(&inputs, &reference, device, iters)?;
        reports.push(KernelReport {
            kernel: kernel.to_string(),
            path: path(kernel, &inputs[0])?,
            shape,
            worst_difference,
            fused_ms,
            reference_ms,
        });
    }
    Ok(reports)
}

/// The run's optimizer update (`adam-update`) and BSFA's per-step projection
/// (`bsfa-projection`) over the model's parameters, each through the run's dispatch against
/// its tensor ops (`train.kernels = reference` for the comparison): the worst relative
/// difference of the parameters after the untimed and `iters` timed steps, and the median ms
/// of one step.
fn optimizer_reports(
    config: &RunConfig,
    device: &Device,
    iters: usize,
) -> Result<Vec<KernelReport>> {
    let spec = config.spec();
    let (_, params) = spec.build(config.train.seed, config.train.dtype, device)?;
    let blocks = params
        .iter()
        .map(|p| spec.adam_mini_block(&p.name, p.var.dims()))
        .collect::<Result<Vec<_>>>()?;
    let grads = params
        .iter()
        .map(|p| compare::random(p.var.shape(), DType::F32, device))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let (optimizer, grads) = (&config.optimizer, &grads);
    let what = format!("{:?} over the model", optimizer.name);
    let update = compared(("adam-update", &what), device, iters, &params, |copies| {
        let mut adam = match optimizer.name {
            OptimizerName::AdamW => Adam::adamw(optimizer, copies)?,
            OptimizerName::AdamMini => Adam::adam_mini(optimizer, copies, &blocks)?,
        };
        Ok(Box::new(move |p: &[Param]| {
            adam.step(p, grads, optimizer.lr, 0.7)
        }))
    })?;
    // One of BSFA's blocks of each shape (the kernels take any number; all of llama134m's
    // would need 11 GiB of directions, too much for the CPU rehearsal), each a whole tensor,
    // on `bsfa.rank` random rows of norm about 1 (as its directions: the products do not
    // need them orthogonal), after a step of 1e-3.
    let groups = config.bsfa.groups();
    let mut shapes: Vec<Vec<usize>> = Vec::new();
    let covered: Vec<Param> = params
        .into_iter()
        .filter(|p| groups.contains(&p.group))
        .filter(|p| {
            let fresh = !shapes.iter().any(|s| s == p.var.dims());
            if fresh {
                shapes.push(p.var.dims().to_vec());
            }
            fresh
        })
        .collect();
    let rank = config.bsfa.rank;
    let directions = covered
        .iter()
        .map(|p| {
            let n = p.var.elem_count();
            compare::random((rank.min(n), n), DType::F32, device)? / (n as f64).sqrt()
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let (alpha, gamma) = (config.bsfa.alpha, config.bsfa.gamma);
    let what = format!(
        "{} blocks, one of each shape, {rank} directions each",
        covered.len()
    );
    let projection = compared(("bsfa-projection", &what), device, iters, &covered, |_| {
        Ok(Box::new(|p: &[Param]| {
            let before = p
                .iter()
                .map(|p| p.var.as_tensor().flatten_all()?.copy())
                .collect::<candle_core::Result<Vec<_>>>()?;
            for (p, b) in p.iter().zip(&before) {
                p.var.set(&(b + 1e-3)?.reshape(p.var.shape())?)?;
            }
            crate::optim::bsfa::project_blocks(p, &before, &directions, alpha, gamma)?;
            Ok(())
        }))
    })?;
    Ok(vec![update, projection])
}

/// The values in `params`.
fn values(params: &[Param]) -> usize {
    params.iter().map(|p| p.var.elem_count()).sum()
}

/// A step over parameters, as `make` builds it for a set of them.
type Step<'a> = Box<dyn FnMut(&[Param]) -> Result<()> + 'a>;

/// `kernel`'s step as `make` builds it, run on copies of `params` through the run's dispatch
/// and through the tensor ops: the worst relative difference of the parameters after one
/// untimed and `iters` timed steps, and each side's median ms per step; `what` describes the
/// step's shape.
fn compared<'a>(
    (kernel, what): (&str, &str),
    device: &Device,
    iters: usize,
    params: &[Param],
    make: impl Fn(&[Param]) -> Result<Step<'a>>,
) -> Result<KernelReport> {
    // The run's dispatch as `train.kernels` set it, then the tensor ops; the setting restored.
    let run_setting = crate::cpu_kernels::reference_only();
    let mut sides = Vec::new();
    for reference in [run_setting, true] {
        crate::cpu_kernels::set_reference_only(reference);
        let side = (|| -> Result<(Vec<Param>, f64)> {
            let copies = params
                .iter()
                .map(|p| {
                    Ok(Param {
                        name: p.name.clone(),
                        group: p.group,
                        // A detached view: `from_tensor` copies it once into a new variable.
                        var: Var::from_tensor(&p.var.as_tensor().detach())?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let mut step = make(&copies)?;
            let mut times = Vec::with_capacity(iters);
            for i in 0..=iters {
                device.synchronize()?;
                let started = Instant::now();
                step(&copies)?;
                device.synchronize()?;
                if i > 0 {
                    times.push(started.elapsed().as_secs_f64() * 1e3);
                }
            }
            Ok((copies, crate::metrics::median(&times)))
        })();
        crate::cpu_kernels::set_reference_only(run_setting);
        sides.push(side?);
    }
    let path = match params.first() {
        Some(p) => path(kernel, p.var.as_tensor())?,
        None => "reference".to_string(),
    };
    let (fused, reference) = (&sides[0], &sides[1]);
    let worst = fused
        .0
        .iter()
        .zip(&reference.0)
        .try_fold(0f64, |worst, (a, b)| {
            compare::relative(a.var.as_tensor(), b.var.as_tensor()).map(|d| worst.max(d))
        })?;
    Ok(KernelReport {
        kernel: kernel.to_string(),
        shape: format!("{what}, {} parameters", values(params)),
        path,
        worst_difference: worst,
        fused_ms: fused.1,
        reference_ms: reference.1,
    })
}

/// The implementation the dispatch took for `kernel` on an input like `x`.
fn path(kernel: &str, x: &Tensor) -> Result<String> {
    if x.device().is_cpu() {
        let fused = crate::cpu_kernels::fusable(x);
        return Ok(if fused { "cpu-fused" } else { "reference" }.to_string());
    }
    #[cfg(feature = "cuda")]
    if ops::gpu_self_check::verdict(kernel) == Some(true) {
        return Ok("triton".to_string());
    }
    let _ = kernel;
    Ok("reference".to_string())
}

/// The median ms of `iters` forwards and backwards of `op` (after one untimed), the device
/// synchronised around each.
fn median_ms(inputs: &[Tensor], op: &Op, device: &Device, iters: usize) -> Result<f64> {
    // The tensors are variables: the timed backward computes their gradients.
    let (_, tensors) = compare::tracked(inputs)?;
    let mut times = Vec::with_capacity(iters);
    for i in 0..=iters {
        device.synchronize()?;
        let started = Instant::now();
        let out = op(&tensors)?;
        let grads = out.sum_all()?.backward()?;
        device.synchronize()?;
        drop(grads);
        if i > 0 {
            times.push(started.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(crate::metrics::median(&times))
}
