//! `train.kernels = reference`: the CPU runs the ops a CUDA run executes (the reference
//! compositions of candle primitives, the tensor-op paths of Adam, of the gradient norm and
//! of BSFA), and they compute what the fused CPU kernels compute.
//!
//! - Whole runs, fused against reference: LLaMA (grouped-query and tied variants) and
//!   vit-tiny, with Adam-mini + BSFA, f32 and 4-bit state.
//! - The switch reroutes every fused decision (each op, Adam, the gradient norm, BSFA's
//!   centring and projection), and whole models under it match finite differences.
//! - Every reference composition's backward against finite differences, in f64.
//! - Fused against reference gradients on more rows than one of the fused kernels' 64-row
//!   chunks, for every op with a weight gradient.
//!
//! The setting is process-wide, so whatever sets it runs in a process of its own: runs as
//! subprocesses of the binary, the rerouting checks as a rerun of this test binary.

mod finite_differences;
mod ranks;

use anyhow::Result;
use bsfa_train::device::{Kernels, Precision};
use bsfa_train::dist::{Communicator, SingleRank};
use bsfa_train::model::ops::{self, vit as vit_ops};
use bsfa_train::model::{Llama, LlamaConfig, Param, ParamGroup, ParamInit, Vit, VitConfig};
use bsfa_train::optim::bsfa::{estimate, Bsfa};
use bsfa_train::optim::{
    global_norm, Adam, BsfaConfig, Optimizer, OptimizerConfig, OptimizerState, Stack,
};
use candle_core::{DType, Device, Tensor, Var};
use finite_differences::{check_all_coordinates, check_parameter, random, scalar, values};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use ranks::{args, logged, ok, run, spawn, worst_relative_difference};
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

// ---------------------------------------------------------------------------------------
// Whole runs: reference kernels follow the fused ones.

/// Losses and val losses of a 20-step run of `ranks::args` (Adam-mini + BSFA, projecting
/// from step 4) with `train.kernels = kernels` and the `extra` flags.
fn losses(
    dir: &Path,
    kernels: &str,
    steps: usize,
    extra: &[&str],
) -> Vec<(u64, &'static str, f64)> {
    let out = dir.join(kernels);
    let setting = format!("train.kernels={kernels}");
    // One thread per run: the tests of this file run two at a time on two cores.
    let mut flags = vec!["--threads", "1", "--set", &setting];
    flags.extend_from_slice(extra);
    ok(run(&args(&out, steps, &flags)));
    logged(&out)
}

/// The same 20-step run with fused and with reference kernels logs the same losses (20
/// train, 2 val) within 1e-5 relative, but not bitwise: the two paths round differently, so
/// equal logs would mean the reference path never ran.
fn reference_follows_fused(what: &str, extra: &[&str]) {
    reference_follows_fused_over(what, 20, extra);
}

/// [`reference_follows_fused`] over `steps` steps (a multiple of the evaluation interval,
/// 10).
fn reference_follows_fused_over(what: &str, steps: usize, extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let fused = losses(dir.path(), "fused", steps, extra);
    let reference = losses(dir.path(), "reference", steps, extra);
    assert_eq!(
        fused.len(),
        steps + steps / 10,
        "{what}: losses and val losses"
    );
    assert_eq!(reference.len(), fused.len(), "{what}");
    assert_ne!(
        fused, reference,
        "{what}: the reference run rounded as the fused one"
    );
    let worst = worst_relative_difference(&fused, &reference);
    eprintln!("{what}: reference vs fused kernels, largest relative difference {worst:.2e}");
    assert!(worst < 1e-5, "{what}: relative difference {worst:.2e}");
}

/// 4-bit state rounds every stored value to one of 16 codes, and each group's scale to 3
/// bits of FP8 mantissa: an f32-sized difference in an update can move a value to the next
/// code, and the model trains on from there. At the default peak learning rate (3e-3) that
/// alone moves the step-20 val loss by up to 3e-4 (a 1e-7 relative change of the learning
/// rate does it in the fused path, seeds 1337 and 2); at 1e-3 reference and fused stayed
/// within 5.5e-6 over eight seeds of the GQA variant and six of the tied one.
const FOUR_BIT: [&str; 4] = ["--set", "bsfa.bits=4", "--lr", "1e-3"];

const GQA: [&str; 2] = ["--set", "model.num_key_value_heads=2"];
const TIED: [&str; 2] = ["--set", "model.tie_word_embeddings=true"];

#[test]
fn gqa_llama_reference_follows_fused() {
    reference_follows_fused("GQA LLaMA, 32-bit BSFA state", &GQA);
}

#[test]
fn gqa_llama_with_4bit_state_reference_follows_fused() {
    reference_follows_fused(
        "GQA LLaMA, 4-bit BSFA state",
        &[&GQA[..], &FOUR_BIT].concat(),
    );
}

#[test]
fn tied_llama_reference_follows_fused() {
    reference_follows_fused("tied LLaMA, 32-bit BSFA state", &TIED);
}

#[test]
fn tied_llama_with_4bit_state_reference_follows_fused() {
    reference_follows_fused(
        "tied LLaMA, 4-bit BSFA state",
        &[&TIED[..], &FOUR_BIT].concat(),
    );
}

#[test]
fn vit_tiny_reference_follows_fused() {
    reference_follows_fused(
        "vit-tiny",
        &["--model", "vit-tiny", "--set", "vit.num_hidden_layers=2"],
    );
}

/// AdamW's tensor-op path (Adam-mini with blocks of one) under BSFA's tensor-op projection,
/// over 30 steps: seven re-estimations.
#[test]
fn adamw_and_bsfa_tensor_paths_follow_fused_over_30_steps() {
    reference_follows_fused_over(
        "AdamW + BSFA, 30 steps",
        30,
        &["--set", "optimizer.name=adamw"],
    );
}

/// A run resumed under reference kernels continues bit for bit: the restore puts every
/// tensor on the parameters' device (and checks it) on the path a CUDA resume takes.
#[test]
fn resume_under_reference_kernels_is_exact() {
    resumed_under_reference_continues_exactly(&[]);
}

/// The same with 4-bit BSFA state, which the tensor path keeps as tensors on the
/// parameters' device (encoded and decoded by tensor ops, as on a GPU) and checkpoints in
/// the host form's layout.
#[test]
fn resume_with_4bit_state_under_reference_kernels_is_exact() {
    resumed_under_reference_continues_exactly(&FOUR_BIT);
}

/// A 20-step run under reference kernels with `extra` flags, killed after step 13 and
/// resumed from its step-10 checkpoint, logs what the run without the crash logs.
fn resumed_under_reference_continues_exactly(extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let straight = losses(dir.path(), "reference", 20, extra);
    let out = dir.path().join("resumed");
    let flags = [
        &["--threads", "1", "--set", "train.kernels=reference"],
        extra,
    ]
    .concat();
    // Dies after step 13, as kill -9 would; the checkpoint of step 10 remains.
    let crashed = spawn(
        &args(&out, 20, &flags),
        &[("BSFA_TRAIN_FAILPOINT", "rank-abort:13".into())],
    )
    .wait_with_output()
    .unwrap();
    assert!(!crashed.status.success());
    ok(run(&args(
        &out,
        20,
        &[&flags[..], &["--resume", "auto"]].concat(),
    )));
    assert_eq!(logged(&out), straight);
}

// ---------------------------------------------------------------------------------------
// The model ops against their reference compositions: the cases both the rerouting check
// and the check over several row chunks (below) run.

/// Which side of an [`OpCase`] runs: the model op, or its reference composition of candle
/// primitives.
#[derive(Clone, Copy)]
enum Side {
    Op,
    Reference,
}

/// A model op and its reference composition on fixed random inputs: compared are the
/// output and the gradients of `inputs` of the output's sum weighted by `r`.
struct OpCase {
    what: String,
    inputs: Vec<Var>,
    r: Tensor,
    run: Box<dyn Fn(Side) -> candle_core::Result<Tensor>>,
}

impl OpCase {
    fn new(
        what: impl Into<String>,
        inputs: &[&Var],
        r: &Tensor,
        run: impl Fn(Side) -> candle_core::Result<Tensor> + 'static,
    ) -> Self {
        OpCase {
            what: what.into(),
            inputs: inputs.iter().map(|&v| v.clone()).collect(),
            r: r.clone(),
            run: Box::new(run),
        }
    }

    fn op(&self) -> Tensor {
        (self.run)(Side::Op).unwrap()
    }

    fn reference(&self) -> Tensor {
        (self.run)(Side::Reference).unwrap()
    }
}

/// The sizes of [`op_cases`]' inputs: `batch × seq` rows of `hidden` features, in `dtype`.
#[derive(Clone, Copy)]
struct Sizes {
    batch: usize,
    seq: usize,
    hidden: usize,
    /// The ViT attention's heads (a divisor of `hidden`).
    vit_heads: usize,
    dtype: DType,
}

/// A variable of random values in `[-scale, scale)`, in `dtype`.
fn var(shape: &[usize], scale: f64, dtype: DType, rng: &mut ChaCha8Rng) -> Var {
    Var::from_tensor(&random_in(shape, scale, dtype, rng)).unwrap()
}

/// Random values in `[-scale, scale)`, in `dtype`.
fn random_in(shape: &[usize], scale: f64, dtype: DType, rng: &mut ChaCha8Rng) -> Tensor {
    random(shape, scale, rng).to_dtype(dtype).unwrap()
}

/// Every model op with its reference composition, on random inputs of the sizes `z`.
fn op_cases(z: Sizes, rng: &mut ChaCha8Rng) -> Vec<OpCase> {
    let Sizes {
        batch: b,
        seq: s,
        hidden: h,
        vit_heads,
        dtype,
    } = z;
    let x = var(&[b, s, h], 1.5, dtype, rng);
    let mut cases = Vec::new();

    let w = var(&[10, h], 1.0, dtype, rng);
    let r = random_in(&[b, s, 10], 1.0, dtype, rng);
    cases.push(OpCase::new("linear", &[&x, &w], &r, {
        let (x, w) = (x.clone(), w.clone());
        move |side| match side {
            Side::Op => ops::linear(&x, &w),
            Side::Reference => ops::reference::linear(&x, &w),
        }
    }));

    let bias = var(&[10], 1.0, dtype, rng);
    cases.push(OpCase::new("linear with bias", &[&x, &w, &bias], &r, {
        let (x, w, bias) = (x.clone(), w.clone(), bias.clone());
        move |side| match side {
            Side::Op => vit_ops::linear(&x, &w, &bias),
            Side::Reference => vit_ops::reference::linear(&x, &w, &bias),
        }
    }));

    let norm = var(&[h], 1.5, dtype, rng);
    let r = random_in(&[b, s, h], 1.0, dtype, rng);
    cases.push(OpCase::new("rms_norm", &[&x, &norm], &r, {
        let (x, norm) = (x.clone(), norm.clone());
        move |side| match side {
            Side::Op => ops::rms_norm(&x, &norm, 1e-5),
            Side::Reference => ops::reference::rms_norm(&x, &norm, 1e-5),
        }
    }));

    let shift = var(&[h], 1.0, dtype, rng);
    cases.push(OpCase::new("layer_norm", &[&x, &norm, &shift], &r, {
        let (x, norm, shift) = (x.clone(), norm.clone(), shift.clone());
        move |side| match side {
            Side::Op => vit_ops::layer_norm(&x, &norm, &shift, 1e-6),
            Side::Reference => vit_ops::reference::layer_norm(&x, &norm, &shift, 1e-6),
        }
    }));

    cases.push(OpCase::new("gelu", &[&x], &r, {
        let x = x.clone();
        move |side| match side {
            Side::Op => vit_ops::gelu(&x),
            Side::Reference => vit_ops::reference::gelu(&x),
        }
    }));

    let (wg, wu) = (
        var(&[12, h], 1.0, dtype, rng),
        var(&[12, h], 1.0, dtype, rng),
    );
    let r = random_in(&[b, s, 12], 1.0, dtype, rng);
    cases.push(OpCase::new("swiglu", &[&x, &wg, &wu], &r, {
        let (x, wg, wu) = (x.clone(), wg.clone(), wu.clone());
        move |side| match side {
            Side::Op => ops::swiglu(&x, &wg, &wu),
            Side::Reference => ops::reference::swiglu(&x, &wg, &wu),
        }
    }));

    cases.push(attention_case(z, rng));

    let rows = var(&[b * s, h], 1.5, dtype, rng);
    let head = var(&[30, h], 1.5, dtype, rng);
    let targets: Vec<u32> = (0..b * s).map(|_| rng.random_range(0..30)).collect();
    let targets = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
    let one = Tensor::new(1f64, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    cases.push(OpCase::new(
        "linear_cross_entropy",
        &[&rows, &head],
        &one,
        {
            let (rows, head) = (rows.clone(), head.clone());
            move |side| match side {
                Side::Op => ops::linear_cross_entropy(&rows, &head, &targets),
                Side::Reference => {
                    let logits = ops::reference::linear(&rows, &head)?;
                    ops::reference::cross_entropy(&logits, &targets)
                }
            }
        },
    ));

    // The ViT's attention block: projections with biases over all `batch × seq` rows.
    let (wq, wk, wv) = (
        var(&[h, h], 1.0, dtype, rng),
        var(&[h, h], 1.0, dtype, rng),
        var(&[h, h], 1.0, dtype, rng),
    );
    let (bq, bv) = (var(&[h], 1.0, dtype, rng), var(&[h], 1.0, dtype, rng));
    // The key bias is no input: its gradient is zero by the maths (see vit_gradients.rs).
    let bk = random_in(&[h], 1.0, dtype, rng);
    let r = random_in(&[b, s, h], 1.0, dtype, rng);
    cases.push(OpCase::new(
        "vit self_attention",
        &[&x, &wq, &bq, &wk, &wv, &bv],
        &r,
        {
            let (x, wq, wk, wv) = (x.clone(), wq.clone(), wk.clone(), wv.clone());
            let (bq, bv) = (bq.clone(), bv.clone());
            move |side| match side {
                Side::Op => {
                    vit_ops::self_attention(&x, (&wq, &bq), (&wk, &bk), (&wv, &bv), vit_heads)
                }
                Side::Reference => {
                    let w = Tensor::cat(&[&*wq, &*wk, &*wv], 0)?;
                    let b = Tensor::cat(&[&*bq, &bk, &*bv], 0)?;
                    let qkv = vit_ops::reference::linear(&x, &w, &b)?;
                    vit_ops::reference::attention(&qkv, vit_heads)
                }
            }
        },
    ));
    cases
}

/// Grouped-query causal attention (4 query heads, 2 key/value heads of 4 dimensions),
/// projections and rotary embeddings included, on random inputs of the sizes `z`.
fn attention_case(z: Sizes, rng: &mut ChaCha8Rng) -> OpCase {
    let Sizes {
        batch: b,
        seq: s,
        hidden: h,
        dtype,
        ..
    } = z;
    let (heads, kv_heads, dim) = (4, 2, 4);
    let (cos, sin) = ops::rope_tables(dim, s, 10000.0, dtype, &Device::Cpu).unwrap();
    let x = var(&[b, s, h], 1.0, dtype, rng);
    let (wq, wk, wv) = (
        var(&[heads * dim, h], 1.0, dtype, rng),
        var(&[kv_heads * dim, h], 1.0, dtype, rng),
        var(&[kv_heads * dim, h], 1.0, dtype, rng),
    );
    let r = random_in(&[b, s, heads * dim], 1.0, dtype, rng);
    OpCase::new(
        format!("attention over {s} positions"),
        &[&x, &wq, &wk, &wv],
        &r,
        {
            let (x, wq, wk, wv) = (x.clone(), wq.clone(), wk.clone(), wv.clone());
            move |side| match side {
                Side::Op => ops::attention(&x, (&wq, &wk, &wv), (&cos, &sin), heads, kv_heads),
                Side::Reference => {
                    let lin = |w: &Tensor| ops::reference::linear(&x, w);
                    let (q, k, v) = (lin(&wq)?, lin(&wk)?, lin(&wv)?);
                    ops::reference::causal_attention(&q, &k, &v, (&cos, &sin), heads, kv_heads)
                }
            }
        },
    )
}

/// `cases` but the one named `what` (which must be there).
fn without(mut cases: Vec<OpCase>, what: &str) -> Vec<OpCase> {
    let before = cases.len();
    cases.retain(|c| c.what != what);
    assert_eq!(cases.len() + 1, before, "no single case {what}");
    cases
}

// ---------------------------------------------------------------------------------------
// The switch itself, in processes of their own.

/// Names the test a rerun of this binary runs (and that may set `train.kernels`).
const OWN_PROCESS: &str = "BSFA_KERNELS_TEST";

/// Reruns the test `name` alone in a new process of this test binary: true in that process
/// (the test goes on there), false here once it passed.
fn in_own_process(name: &str) -> bool {
    if std::env::var(OWN_PROCESS).as_deref() == Ok(name) {
        return true;
    }
    let o = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--test-threads", "1", "--nocapture"])
        .env(OWN_PROCESS, name)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{name}:\n{stdout}\n{stderr}");
    assert!(stdout.contains("1 passed"), "{name} did not run:\n{stdout}");
    eprint!("{stderr}");
    false
}

/// Makes `kernels` the process's setting for CPU f32 (or f64) work.
fn use_kernels(kernels: Kernels) {
    kernels.apply(&Device::Cpu, Precision::F32).unwrap();
}

/// `t`'s values as f64.
fn f64_values(t: &Tensor) -> Vec<f64> {
    values(&t.to_dtype(DType::F64).unwrap())
}

/// The output of `f` and the gradients of `inputs` of its sum weighted by `r`.
fn output_and_gradients(inputs: &[Var], r: &Tensor, f: &dyn Fn() -> Tensor) -> Vec<Vec<f64>> {
    let out = f();
    let grads = out
        .broadcast_mul(r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let mut all = vec![f64_values(&out)];
    for v in inputs {
        all.push(f64_values(grads.get(v.as_tensor()).expect("a gradient")));
    }
    all
}

/// Under `reference`, the case's op is bitwise its reference composition, forward and
/// backward; under `auto` it is not (its fused kernel rounds differently), so the switch is
/// what made it take the composition.
fn rerouted(case: &OpCase) {
    let OpCase {
        what, inputs, r, ..
    } = case;
    let expected = output_and_gradients(inputs, r, &|| case.reference());
    use_kernels(Kernels::Auto);
    let fused = output_and_gradients(inputs, r, &|| case.op());
    use_kernels(Kernels::Reference);
    let reference = output_and_gradients(inputs, r, &|| case.op());
    assert!(
        reference == expected,
        "{what}: under reference, not the composition"
    );
    assert!(
        fused != expected,
        "{what}: under auto, already the composition"
    );
}

/// Every model op takes its reference composition under `train.kernels = reference`.
#[test]
fn reference_setting_reroutes_every_model_op() {
    if !in_own_process("reference_setting_reroutes_every_model_op") {
        return;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    // 80 rows: the bias gradient sums more than one of the fused kernels' 64-row chunks
    // (which it adds in another order than candle's sum).
    let sizes = Sizes {
        batch: 2,
        seq: 40,
        hidden: 12,
        vit_heads: 3,
        dtype: DType::F32,
    };
    // The bias-free linear layer's fused kernel makes the gemm calls of its composition,
    // bitwise the same forward and backward: which one runs can neither be seen nor matter.
    // It is checked inside the other ops' cases.
    for case in without(op_cases(sizes, &mut rng), "linear") {
        rerouted(&case);
    }
}

/// Plain SGD in tensor ops: the same under either setting, so that what differs between
/// the settings in a BSFA step is BSFA's own path.
struct Sgd {
    steps: u64,
}

impl Optimizer for Sgd {
    fn step(&mut self, params: &[Param], grads: &[Tensor], lr: f64, scale: f64) -> Result<()> {
        for (p, g) in params.iter().zip(grads) {
            p.var.set(&(p.var.as_tensor() - (g * (lr * scale))?)?)?;
        }
        self.steps += 1;
        Ok(())
    }

    fn state_bytes(&self) -> usize {
        0
    }
}

impl OptimizerState for Sgd {
    fn steps_taken(&self) -> u64 {
        self.steps
    }

    fn load(&mut self, steps_taken: u64, _: &HashMap<String, Tensor>) -> Result<()> {
        self.steps = steps_taken;
        Ok(())
    }
}

/// Two MLP matrices and a norm vector in f32, drawn from `seed`.
fn small_params(seed: u64) -> Vec<Param> {
    let mut init = ParamInit::new(seed, DType::F32, &Device::Cpu);
    init.normal("a.weight", ParamGroup::Mlp, 40, 70, 0.1)
        .unwrap();
    init.normal("b.weight", ParamGroup::Mlp, 70, 40, 0.1)
        .unwrap();
    init.ones("c.weight", ParamGroup::Norms, 40).unwrap();
    init.into_params()
}

fn param_values(params: &[Param]) -> Vec<Vec<f64>> {
    params
        .iter()
        .map(|p| f64_values(p.var.as_tensor()))
        .collect()
}

/// Random f32 gradients for `params`.
fn gradients(params: &[Param], rng: &mut ChaCha8Rng) -> Vec<Tensor> {
    params
        .iter()
        .map(|p| random(p.var.dims(), 1.0, rng).to_dtype(DType::F32).unwrap())
        .collect()
}

/// The largest difference between two sets of values, relative to the largest value.
fn relative_gap(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    let (mut gap, mut scale) = (0.0f64, 0.0f64);
    for (a, b) in a.iter().zip(b) {
        for (x, y) in a.iter().zip(b) {
            gap = gap.max((x - y).abs());
            scale = scale.max(x.abs());
        }
    }
    gap / scale
}

/// Two optimizers over two copies of the same parameters step alike under `auto` for
/// `warm` steps; then one more step, the first under `auto`, the second under `reference`.
/// Returns the parameters after that step, `auto`'s then `reference`'s.
fn last_step_under_each(
    make: &dyn Fn(&[Param]) -> Box<dyn Optimizer>,
    warm: usize,
) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let (a, b) = (small_params(5), small_params(5));
    let (mut oa, mut ob) = (make(&a), make(&b));
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    use_kernels(Kernels::Auto);
    for _ in 0..warm {
        let g = gradients(&a, &mut rng);
        oa.step(&a, &g, 1e-2, 1.0).unwrap();
        ob.step(&b, &g, 1e-2, 1.0).unwrap();
    }
    assert_eq!(param_values(&a), param_values(&b));
    let g = gradients(&a, &mut rng);
    oa.step(&a, &g, 1e-2, 1.0).unwrap();
    use_kernels(Kernels::Reference);
    ob.step(&b, &g, 1e-2, 1.0).unwrap();
    (param_values(&a), param_values(&b))
}

/// The optimizer's fused decisions (Adam's update, the gradient norm, BSFA's centring and
/// projection, in f32 and 4-bit) each take the tensor path under `reference`: each result
/// differs from `auto`'s in rounding only.
#[test]
fn reference_setting_reroutes_every_optimizer_path() {
    if !in_own_process("reference_setting_reroutes_every_optimizer_path") {
        return;
    }
    let config = OptimizerConfig::default();
    let adam = |p: &[Param]| -> Box<dyn Optimizer> { Box::new(Adam::adamw(&config, p).unwrap()) };
    let (fused, reference) = last_step_under_each(&adam, 2);
    let gap = relative_gap(&fused, &reference);
    eprintln!("adam: tensor path vs fused kernel, relative gap {gap:.1e}");
    assert!(fused != reference && gap < 1e-6, "adam: {gap:.1e}");

    // The gradient norm: exactly the tensor formula under `reference`, not under `auto`.
    use_kernels(Kernels::Reference);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let grads = gradients(&small_params(5), &mut rng);
    let tensor_formula = grads
        .iter()
        .map(|g| {
            let s = g.sqr().unwrap().sum_all().unwrap();
            s.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
        })
        .sum::<f64>()
        .sqrt();
    assert_eq!(global_norm(&grads).unwrap(), tensor_formula);
    use_kernels(Kernels::Auto);
    let fused = global_norm(&grads).unwrap();
    assert_ne!(fused, tensor_formula);
    assert!((fused - tensor_formula).abs() < 1e-6 * fused);

    // BSFA's centring, inside the estimate of the directions.
    let history = random(&[6, 3000], 1.0, &mut rng)
        .to_dtype(DType::F32)
        .unwrap();
    let history = (history + 0.5).unwrap();
    let directions = |kernels| {
        use_kernels(kernels);
        f64_values(&estimate(&history, 3).unwrap().directions.unwrap())
    };
    let (fused, reference) = (directions(Kernels::Auto), directions(Kernels::Reference));
    let gap = relative_gap(
        std::slice::from_ref(&fused),
        std::slice::from_ref(&reference),
    );
    eprintln!("bsfa centring: tensor path vs fused, relative gap {gap:.1e}");
    assert!(fused != reference && gap < 1e-4, "bsfa centring: {gap:.1e}");

    // BSFA's projection, over plain SGD: the fifth step estimates directions, the sixth
    // only projects.
    for bits in [32, 4] {
        let bsfa = BsfaConfig {
            enabled: true,
            rank: 3,
            history: 6,
            interval: 4,
            bits,
            ..BsfaConfig::default()
        };
        let comm: Arc<dyn Communicator> = Arc::new(SingleRank);
        let wrapped = |p: &[Param]| -> Box<dyn Optimizer> {
            let bsfa = Bsfa::new(&bsfa, p, Arc::clone(&comm)).unwrap();
            Box::new(Stack::new(Box::new(Sgd { steps: 0 }), Some(bsfa)))
        };
        let (fused, reference) = last_step_under_each(&wrapped, 5);
        let gap = relative_gap(&fused, &reference);
        eprintln!("bsfa projection, {bits}-bit: tensor path vs fused, relative gap {gap:.1e}");
        assert!(fused != reference && gap < 1e-5, "{bits}-bit: {gap:.1e}");
    }
}

/// A small LLaMA with grouped-query attention (4 query heads, 2 key/value heads).
fn tiny_llama(tie: bool) -> LlamaConfig {
    LlamaConfig {
        architecture: bsfa_train::model::Architecture::Llama,
        vocab_size: 19,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        max_position_embeddings: 16,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        tie_word_embeddings: tie,
        // A large init makes every nonlinearity work away from its linear regime.
        initializer_range: 0.3,
    }
}

/// Every parameter of `params` has a nonzero gradient of `loss` that matches finite
/// differences (but the parameters `exempt` names: gradient zero by the maths).
fn every_parameter_matches(
    params: &[Param],
    loss: &dyn Fn() -> Tensor,
    exempt: &str,
    rng: &mut ChaCha8Rng,
) {
    let grads = loss().backward().unwrap();
    let value = || scalar(&loss());
    for p in params
        .iter()
        .filter(|p| exempt.is_empty() || !p.name.ends_with(exempt))
    {
        let g = values(
            grads
                .get(p.var.as_tensor())
                .unwrap_or_else(|| panic!("{}: no gradient", p.name)),
        );
        assert!(
            g.iter().any(|v| v.abs() > 1e-9),
            "{}: all-zero gradient",
            p.name
        );
        check_parameter(p, &g, &value, rng);
    }
}

/// Whole models under `reference` (every op its composition): each parameter's gradient
/// matches finite differences, in f64.
#[test]
fn models_under_reference_kernels_match_finite_differences() {
    if !in_own_process("models_under_reference_kernels_match_finite_differences") {
        return;
    }
    use_kernels(Kernels::Reference);
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for tie in [false, true] {
        let (model, params) = Llama::new(&tiny_llama(tie), DType::F64, &Device::Cpu, 5).unwrap();
        let ids: Vec<u32> = (0..2 * 6).map(|_| rng.random_range(0..19)).collect();
        let targets: Vec<u32> = (0..2 * 6).map(|_| rng.random_range(0..19)).collect();
        let ids = Tensor::from_vec(ids, (2, 6), &Device::Cpu).unwrap();
        let targets = Tensor::from_vec(targets, (2, 6), &Device::Cpu).unwrap();
        every_parameter_matches(
            &params,
            &|| model.loss(&ids, &targets).unwrap(),
            "",
            &mut rng,
        );
    }
    let vit = VitConfig {
        image_size: 8,
        patch_size: 4,
        num_channels: 3,
        hidden_size: 8,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 12,
        num_classes: 5,
        layer_norm_eps: 1e-6,
        initializer_range: 0.3,
    };
    let (model, params) = Vit::new(&vit, DType::F64, &Device::Cpu, 5).unwrap();
    let images = random(&[3, 3, 8, 8], 1.0, &mut rng);
    let raw = random(&[3, 5], 1.0, &mut rng).exp().unwrap();
    let soft = raw.broadcast_div(&raw.sum_keepdim(1).unwrap()).unwrap();
    // A key bias shifts every score of a query's row alike: softmax cancels it.
    every_parameter_matches(
        &params,
        &|| model.loss(&images, &soft).unwrap(),
        "attention.attention.key.bias",
        &mut rng,
    );
}

// ---------------------------------------------------------------------------------------
// Every reference composition's backward against finite differences, in f64.

/// `out` reduced to a scalar with fixed random weights, so every output element
/// contributes a distinct amount.
fn weighted_sum(out: &Tensor, weights: &Tensor) -> Tensor {
    (out * weights).unwrap().sum_all().unwrap()
}

/// A variable of random f64 values in `[-scale, scale)`.
fn var64(shape: &[usize], scale: f64, rng: &mut ChaCha8Rng) -> Var {
    Var::from_tensor(&random(shape, scale, rng)).unwrap()
}

#[test]
fn llama_reference_ops_match_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    let rng = &mut rng;
    let (b, s, h) = (2, 4, 6);
    let x = var64(&[b, s, h], 1.5, rng);
    let xt = x.as_tensor();

    let w = var64(&[5, h], 1.0, rng);
    let r = random(&[b, s, 5], 1.0, rng);
    check_all_coordinates(
        &[x.clone(), w.clone()],
        || weighted_sum(&ops::reference::linear(xt, w.as_tensor()).unwrap(), &r),
        "reference linear",
    );

    let norm = var64(&[h], 1.5, rng);
    let r = random(&[b, s, h], 1.0, rng);
    check_all_coordinates(
        &[x.clone(), norm.clone()],
        || {
            weighted_sum(
                &ops::reference::rms_norm(xt, norm.as_tensor(), 1e-5).unwrap(),
                &r,
            )
        },
        "reference rms_norm",
    );

    let (wg, wu) = (var64(&[7, h], 1.0, rng), var64(&[7, h], 1.0, rng));
    let r = random(&[b, s, 7], 1.0, rng);
    check_all_coordinates(
        &[x.clone(), wg.clone(), wu.clone()],
        || {
            let y = ops::reference::swiglu(xt, wg.as_tensor(), wu.as_tensor()).unwrap();
            weighted_sum(&y, &r)
        },
        "reference swiglu",
    );

    // Grouped-query attention, projections and rotary embeddings included.
    let (heads, kv_heads, dim) = (4, 2, 4);
    let (cos, sin) = ops::rope_tables(dim, s, 10000.0, DType::F64, &Device::Cpu).unwrap();
    let (wq, wk, wv) = (
        var64(&[heads * dim, h], 1.0, rng),
        var64(&[kv_heads * dim, h], 1.0, rng),
        var64(&[kv_heads * dim, h], 1.0, rng),
    );
    let r = random(&[b, s, heads * dim], 1.0, rng);
    check_all_coordinates(
        &[x.clone(), wq.clone(), wk.clone(), wv.clone()],
        || {
            let lin = |w: &Var| ops::reference::linear(xt, w.as_tensor()).unwrap();
            let y = ops::reference::causal_attention(
                &lin(&wq),
                &lin(&wk),
                &lin(&wv),
                (&cos, &sin),
                heads,
                kv_heads,
            )
            .unwrap();
            weighted_sum(&y, &r)
        },
        "reference attention",
    );

    // The output head and the token cross-entropy, as `linear_cross_entropy` composes them
    // off the fused path.
    let rows = var64(&[b * s, h], 1.5, rng);
    let head = var64(&[9, h], 1.5, rng);
    let targets: Vec<u32> = (0..b * s).map(|_| rng.random_range(0..9)).collect();
    let targets = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
    check_all_coordinates(
        &[rows.clone(), head.clone()],
        || {
            let logits = ops::reference::linear(rows.as_tensor(), head.as_tensor()).unwrap();
            ops::reference::cross_entropy(&logits, &targets).unwrap()
        },
        "reference linear cross-entropy",
    );
}

#[test]
fn vit_reference_ops_match_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(32);
    let rng = &mut rng;
    let (b, s, h, heads) = (2, 4, 6, 2);
    let x = var64(&[b, s, h], 1.5, rng);
    let xt = x.as_tensor();

    let (w, bias) = (var64(&[5, h], 1.0, rng), var64(&[5], 1.0, rng));
    let r = random(&[b, s, 5], 1.0, rng);
    check_all_coordinates(
        &[x.clone(), w.clone(), bias.clone()],
        || {
            let y = vit_ops::reference::linear(xt, w.as_tensor(), bias.as_tensor()).unwrap();
            weighted_sum(&y, &r)
        },
        "reference linear with bias",
    );

    let (ln_w, ln_b) = (var64(&[h], 1.5, rng), var64(&[h], 1.0, rng));
    let r = random(&[b, s, h], 1.0, rng);
    check_all_coordinates(
        &[x.clone(), ln_w.clone(), ln_b.clone()],
        || {
            let y = vit_ops::reference::layer_norm(xt, ln_w.as_tensor(), ln_b.as_tensor(), 1e-6);
            weighted_sum(&y.unwrap(), &r)
        },
        "reference layer_norm",
    );

    check_all_coordinates(
        std::slice::from_ref(&x),
        || weighted_sum(&vit_ops::reference::gelu(xt).unwrap(), &r),
        "reference gelu",
    );

    let qkv = var64(&[b, s, 3 * h], 1.0, rng);
    check_all_coordinates(
        std::slice::from_ref(&qkv),
        || {
            weighted_sum(
                &vit_ops::reference::attention(qkv.as_tensor(), heads).unwrap(),
                &r,
            )
        },
        "reference bidirectional attention",
    );

    // The soft-target cross-entropy has no fused kernel: it is its own reference.
    let logits = var64(&[4, 6], 3.0, rng);
    let raw = random(&[4, 6], 1.0, rng).exp().unwrap();
    let soft = raw.broadcast_div(&raw.sum_keepdim(1).unwrap()).unwrap();
    check_all_coordinates(
        std::slice::from_ref(&logits),
        || vit_ops::soft_cross_entropy(logits.as_tensor(), &soft).unwrap(),
        "soft cross-entropy",
    );
}

// ---------------------------------------------------------------------------------------
// Fused against reference on more rows than one 64-row chunk.

/// Rows of the inputs below: two whole 64-row chunks of the fused reductions and a partial
/// third.
const BATCH: usize = 3;
const SEQ: usize = 61;

/// The case's op (fused kernels) and its reference composition agree to f64 rounding,
/// forward and in the gradients of every input.
fn fused_matches_reference(case: &OpCase) {
    let OpCase {
        what, inputs, r, ..
    } = case;
    let a = output_and_gradients(inputs, r, &|| case.op());
    let b = output_and_gradients(inputs, r, &|| case.reference());
    for (k, (a, b)) in a.iter().zip(&b).enumerate() {
        let part = if k == 0 {
            "output".into()
        } else {
            format!("gradient {}", k - 1)
        };
        assert_eq!(a.len(), b.len(), "{what}: {part}");
        for (x, y) in a.iter().zip(b) {
            assert!(
                (x - y).abs() <= 1e-10 * (1.0 + y.abs()),
                "{what}, {part}: {x} vs {y}"
            );
        }
    }
}

#[test]
fn fused_gradients_over_several_row_chunks_match_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(33);
    let sizes = Sizes {
        batch: BATCH,
        seq: SEQ,
        hidden: 16,
        vit_heads: 4,
        dtype: DType::F64,
    };
    // gelu is elementwise: no weight gradient, no row chunks.
    let mut cases = without(op_cases(sizes, &mut rng), "gelu");
    // Grouped-query causal attention over 130 positions as well as 61: its query rows are
    // chunked too.
    let longer = Sizes {
        batch: 2,
        seq: 130,
        ..sizes
    };
    cases.push(attention_case(longer, &mut rng));
    for case in &cases {
        fused_matches_reference(case);
    }
}
