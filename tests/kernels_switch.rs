//! The `train.kernels = reference` switch reroutes every fused decision: each model op takes
//! its reference composition, and Adam, the gradient norm and BSFA's centring and
//! projection their tensor-op paths; whole models under it match finite differences.
//!
//! The setting is process-wide, so each of these tests reruns itself alone in a new process
//! of this test binary.

mod common;

use anyhow::Result;
use bsfa_train::device::{Kernels, Precision};
use bsfa_train::dist::{Communicator, SingleRank};
use bsfa_train::model::{Llama, Param, ParamGroup, ParamInit, Vit};
use bsfa_train::optim::bsfa::Bsfa;
use bsfa_train::optim::{
    global_norm, Adam, BsfaConfig, Optimizer, OptimizerConfig, OptimizerState, Stack,
};
use candle_core::{DType, Device, Tensor};
use common::finite_differences::{
    every_parameter_matches, random, soft_targets, tiny_llama, tiny_llama_batch, tiny_vit,
};
use common::op_cases::{f64_values, op_cases, output_and_gradients, without, OpCase, Sizes};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;

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
        let (ids, targets) = tiny_llama_batch(2, 6, &mut rng);
        every_parameter_matches(
            &params,
            &|| model.loss(&ids, &targets).unwrap(),
            "",
            &mut rng,
        );
    }
    let (model, params) = Vit::new(&tiny_vit(), DType::F64, &Device::Cpu, 5).unwrap();
    let images = random(&[3, 3, 8, 8], 1.0, &mut rng);
    let soft = soft_targets(3, 5, &mut rng);
    // A key bias shifts every score of a query's row alike: softmax cancels it.
    every_parameter_matches(
        &params,
        &|| model.loss(&images, &soft).unwrap(),
        "attention.attention.key.bias",
        &mut rng,
    );
}
