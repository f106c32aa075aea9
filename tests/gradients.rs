//! Every gradient is checked against central finite differences in f64.
//!
//! candle-nn's fused ops have no backward and silently cut the graph; these tests make
//! sure every op we use (our fused CPU kernels, which `ops` picks on the CPU, and the
//! `reference` compositions) and every parameter of the model really trains.

mod common;

use bsfa_train::model::{ops, Llama, LlamaConfig};
use candle_core::{DType, Device, Tensor, Var};
use common::finite_differences::{
    check_all_coordinates, every_parameter_matches, random, scalar, tiny_llama, tiny_llama_batch,
    values, weighted_sum,
};
use common::op_cases::{assert_close, attention_case_with, fused_matches_reference, Sizes};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[test]
fn rms_norm_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let x = Var::from_tensor(&random(&[2, 3, 8], 2.0, &mut rng)).unwrap();
    let w = Var::from_tensor(&random(&[8], 1.5, &mut rng)).unwrap();
    let r = random(&[2, 3, 8], 1.0, &mut rng);
    check_all_coordinates(
        &[x.clone(), w.clone()],
        || {
            weighted_sum(
                &ops::rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap(),
                &r,
            )
        },
        "rms_norm",
    );
}

/// The residual add and the norm after it, the sum and the norm both in the loss: the norm's
/// backward adds the sum's gradient into its own `dx` pass (`bwd_accumulating`).
#[test]
fn add_rms_norm_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let x = Var::from_tensor(&random(&[2, 3, 8], 2.0, &mut rng)).unwrap();
    let delta = Var::from_tensor(&random(&[2, 3, 8], 1.0, &mut rng)).unwrap();
    let w = Var::from_tensor(&random(&[8], 1.5, &mut rng)).unwrap();
    let r = random(&[2, 3, 8], 1.0, &mut rng);
    check_all_coordinates(
        &[x.clone(), delta.clone(), w.clone()],
        || {
            let (sum, normed) =
                ops::add_rms_norm(x.as_tensor(), delta.as_tensor(), w.as_tensor(), 1e-5).unwrap();
            weighted_sum(&(sum + normed).unwrap(), &r)
        },
        "add_rms_norm",
    );
}

#[test]
fn reference_softmax_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let x = Var::from_tensor(&random(&[2, 2, 5, 5], 3.0, &mut rng)).unwrap();
    let mask = ops::causal_mask(5, DType::F64, &Device::Cpu).unwrap();
    let r = random(&[2, 2, 5, 5], 1.0, &mut rng);
    check_all_coordinates(
        std::slice::from_ref(&x),
        || {
            let masked = x.as_tensor().broadcast_add(&mask).unwrap();
            weighted_sum(&ops::reference::softmax_last_dim(&masked).unwrap(), &r)
        },
        "reference masked softmax",
    );
}

/// Fused and reference attention, projections included (grouped heads: 4 query heads
/// share 2 key/value heads).
#[test]
fn attention_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let (batch, seq, hidden, heads, kv_heads, dim) = (2, 5, 6, 4, 2, 4);
    let (cos, sin) = ops::rope_tables(dim, 8, 10000.0, DType::F64, &Device::Cpu).unwrap();
    let (cos, sin) = (
        cos.narrow(0, 0, seq).unwrap(),
        sin.narrow(0, 0, seq).unwrap(),
    );
    let mut var = |shape: &[usize]| Var::from_tensor(&random(shape, 1.0, &mut rng)).unwrap();
    let x = var(&[batch, seq, hidden]);
    let wq = var(&[heads * dim, hidden]);
    let wk = var(&[kv_heads * dim, hidden]);
    let wv = var(&[kv_heads * dim, hidden]);
    let r = random(&[batch, seq, heads * dim], 1.0, &mut rng);
    let inputs = [x.clone(), wq.clone(), wk.clone(), wv.clone()];
    let w = (wq.as_tensor(), wk.as_tensor(), wv.as_tensor());
    let fused = |x: &Tensor| ops::attention(x, w, (&cos, &sin), heads, kv_heads).unwrap();
    let reference = |x: &Tensor| {
        let (q, k, v) = (
            ops::reference::linear(x, w.0).unwrap(),
            ops::reference::linear(x, w.1).unwrap(),
            ops::reference::linear(x, w.2).unwrap(),
        );
        ops::reference::causal_attention(&q, &k, &v, (&cos, &sin), heads, kv_heads).unwrap()
    };
    check_all_coordinates(
        &inputs,
        || weighted_sum(&fused(x.as_tensor()), &r),
        "fused attention",
    );
    check_all_coordinates(
        &inputs,
        || weighted_sum(&reference(x.as_tensor()), &r),
        "reference attention",
    );
    // Causality: the first position's output depends on the first position's input alone.
    let first = |x: &Tensor| values(&fused(x).narrow(1, 0, 1).unwrap());
    let xt = x.as_tensor();
    let later = (xt.narrow(1, 1, seq - 1).unwrap() * 3.0).unwrap();
    let changed = Tensor::cat(&[&xt.narrow(1, 0, 1).unwrap(), &later], 1).unwrap();
    assert_eq!(first(xt), first(&changed));
    assert_ne!(
        values(&fused(xt).narrow(1, 1, 1).unwrap()),
        values(&fused(&changed).narrow(1, 1, 1).unwrap())
    );
}

/// Sequences longer than the fused kernel's row chunk (64), with a partial last chunk, and
/// one key/value head for two query heads: the fused attention and its gradients match the
/// reference composition (the shared check), the output to 1e-12.
#[test]
fn attention_over_several_row_chunks_matches_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let sizes = Sizes {
        batch: 2,
        seq: 150,
        hidden: 8,
        vit_heads: 1,
        dtype: DType::F64,
    };
    let case = attention_case_with(sizes, (2, 1), &mut rng);
    let (fused, reference) = (values(&case.op()), values(&case.reference()));
    for (a, b) in fused.iter().zip(&reference) {
        assert!((a - b).abs() < 1e-12, "forward {a} vs {b}");
    }
    fused_matches_reference(&case);
}

#[test]
fn reference_rope_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (cos, sin) = ops::rope_tables(8, 16, 10000.0, DType::F64, &Device::Cpu).unwrap();
    let cos = cos.narrow(0, 0, 4).unwrap();
    let sin = sin.narrow(0, 0, 4).unwrap();
    // batch 1, seq 4, two heads of 8.
    let x = Var::from_tensor(&random(&[1, 4, 16], 1.0, &mut rng)).unwrap();
    let r = random(&[1, 4, 16], 1.0, &mut rng);
    check_all_coordinates(
        std::slice::from_ref(&x),
        || {
            weighted_sum(
                &ops::reference::rope(x.as_tensor(), &cos, &sin).unwrap(),
                &r,
            )
        },
        "reference rope",
    );
    // Rotary embedding is a rotation: it keeps the norm of every head's vector, and
    // position 0 is not rotated at all.
    let y = ops::reference::rope(x.as_tensor(), &cos, &sin).unwrap();
    let per_head = |t: &Tensor| {
        t.reshape((1, 4, 2, 8))
            .unwrap()
            .sqr()
            .unwrap()
            .sum_keepdim(3)
    };
    let nx = values(&per_head(x.as_tensor()).unwrap());
    let ny = values(&per_head(&y).unwrap());
    for (a, b) in nx.iter().zip(&ny) {
        assert!((a - b).abs() < 1e-12);
    }
    let at0 = |t: &Tensor| values(&t.narrow(1, 0, 1).unwrap());
    assert_eq!(at0(x.as_tensor()), at0(&y));
}

#[test]
fn cross_entropy_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let logits = Var::from_tensor(&random(&[6, 7], 3.0, &mut rng)).unwrap();
    let targets = Tensor::new(&[0u32, 3, 6, 2, 2, 5], &Device::Cpu).unwrap();
    check_all_coordinates(
        std::slice::from_ref(&logits),
        || ops::reference::cross_entropy(logits.as_tensor(), &targets).unwrap(),
        "reference cross_entropy",
    );
    // Against the definition: mean of -log softmax at the target.
    let l: Vec<Vec<f64>> = logits.as_tensor().to_vec2().unwrap();
    let t = [0usize, 3, 6, 2, 2, 5];
    let expected: f64 = l
        .iter()
        .zip(t)
        .map(|(row, t)| row.iter().map(|v| v.exp()).sum::<f64>().ln() - row[t])
        .sum::<f64>()
        / 6.0;
    let got = scalar(&ops::reference::cross_entropy(logits.as_tensor(), &targets).unwrap());
    assert!((got - expected).abs() < 1e-12);
}

#[test]
fn linear_cross_entropy_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let x = Var::from_tensor(&random(&[6, 4], 1.5, &mut rng)).unwrap();
    let w = Var::from_tensor(&random(&[7, 4], 1.5, &mut rng)).unwrap();
    let targets = Tensor::new(&[0u32, 3, 6, 2, 2, 5], &Device::Cpu).unwrap();
    let (xt, wt) = (x.as_tensor(), w.as_tensor());
    check_all_coordinates(
        &[x.clone(), w.clone()],
        || ops::linear_cross_entropy(xt, wt, &targets).unwrap(),
        "fused linear_cross_entropy",
    );
    let logits = ops::reference::linear(xt, wt).unwrap();
    let reference = scalar(&ops::reference::cross_entropy(&logits, &targets).unwrap());
    let fused = scalar(&ops::linear_cross_entropy(xt, wt, &targets).unwrap());
    assert!((fused - reference).abs() < 1e-12, "{fused} vs {reference}");
}

#[test]
fn linear_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    let x = Var::from_tensor(&random(&[2, 3, 6], 1.0, &mut rng)).unwrap();
    let w = Var::from_tensor(&random(&[5, 6], 1.0, &mut rng)).unwrap();
    let r = random(&[2, 3, 5], 1.0, &mut rng);
    check_all_coordinates(
        &[x.clone(), w.clone()],
        || weighted_sum(&ops::linear(x.as_tensor(), w.as_tensor()).unwrap(), &r),
        "fused linear",
    );
}

#[test]
fn swiglu_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let x = Var::from_tensor(&random(&[2, 3, 5], 2.0, &mut rng)).unwrap();
    let wg = Var::from_tensor(&random(&[7, 5], 1.0, &mut rng)).unwrap();
    let wu = Var::from_tensor(&random(&[7, 5], 1.0, &mut rng)).unwrap();
    let r = random(&[2, 3, 7], 1.0, &mut rng);
    let (xt, gt, ut) = (x.as_tensor(), wg.as_tensor(), wu.as_tensor());
    check_all_coordinates(
        &[x.clone(), wg.clone(), wu.clone()],
        || weighted_sum(&ops::swiglu(xt, gt, ut).unwrap(), &r),
        "fused swiglu",
    );
}

/// The fused kernels compute what the reference compositions compute, in f32 too.
#[test]
fn fused_forward_matches_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let close = |a: &Tensor, b: &Tensor, what: &str| {
        let f64_values = |t: &Tensor| values(&t.to_dtype(DType::F64).unwrap());
        assert_close(&f64_values(a), &f64_values(b), 1e-5, what);
    };
    for dtype in [DType::F32, DType::F64] {
        let t = |shape: &[usize], scale: f64, rng: &mut ChaCha8Rng| {
            random(shape, scale, rng).to_dtype(dtype).unwrap()
        };
        let (cos, sin) = ops::rope_tables(8, 16, 10000.0, dtype, &Device::Cpu).unwrap();
        let x = t(&[2, 16, 12], 2.0, &mut rng);
        let (wq, wk, wv) = (
            t(&[32, 12], 1.0, &mut rng),
            t(&[16, 12], 1.0, &mut rng),
            t(&[16, 12], 1.0, &mut rng),
        );
        let qkv = |w: &Tensor| ops::reference::linear(&x, w).unwrap();
        let reference =
            ops::reference::causal_attention(&qkv(&wq), &qkv(&wk), &qkv(&wv), (&cos, &sin), 4, 2)
                .unwrap();
        let fused = ops::attention(&x, (&wq, &wk, &wv), (&cos, &sin), 4, 2).unwrap();
        close(&fused, &reference, "attention");

        let (x, w) = (t(&[3, 5, 24], 1.0, &mut rng), t(&[7, 24], 1.0, &mut rng));
        let reference = ops::reference::linear(&x, &w).unwrap();
        close(&ops::linear(&x, &w).unwrap(), &reference, "linear");

        let x = t(&[4, 5, 32], 2.0, &mut rng);
        let w = t(&[32], 1.0, &mut rng);
        let reference = ops::reference::rms_norm(&x, &w, 1e-5).unwrap();
        close(
            &ops::rms_norm(&x, &w, 1e-5).unwrap(),
            &reference,
            "rms_norm",
        );

        let (x, w) = (t(&[9, 16], 2.0, &mut rng), t(&[50, 16], 2.0, &mut rng));
        let targets: Vec<u32> = (0..9).map(|_| rng.random_range(0..50)).collect();
        let targets = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
        let logits = ops::reference::linear(&x, &w).unwrap();
        let reference = ops::reference::cross_entropy(&logits, &targets).unwrap();
        close(
            &ops::linear_cross_entropy(&x, &w, &targets).unwrap(),
            &reference,
            "linear_cross_entropy",
        );

        let x = t(&[3, 4, 9], 2.0, &mut rng);
        let (wg, wu) = (t(&[11, 9], 1.0, &mut rng), t(&[11, 9], 1.0, &mut rng));
        let gate = ops::reference::linear(&x, &wg).unwrap().silu().unwrap();
        let reference = (gate * ops::reference::linear(&x, &wu).unwrap()).unwrap();
        close(&ops::swiglu(&x, &wg, &wu).unwrap(), &reference, "swiglu");
    }
}

#[test]
fn cross_entropy_rejects_targets_outside_the_vocabulary() {
    let x = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::zeros((5, 3), DType::F32, &Device::Cpu).unwrap();
    let targets = Tensor::new(&[1u32, 5], &Device::Cpu).unwrap();
    let err = ops::linear_cross_entropy(&x, &w, &targets)
        .unwrap_err()
        .to_string();
    assert!(err.contains("target id 5"), "{err}");
}

/// Every parameter gets a nonzero gradient whose directional derivative along a random
/// direction, and whose value at sampled coordinates, match finite differences.
fn check_model(tie: bool) {
    let config = tiny_llama(tie);
    let (model, params) = Llama::new(&config, DType::F64, &Device::Cpu, 5).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let (ids, targets) = tiny_llama_batch(2, 6, &mut rng);
    let loss = || model.loss(&ids, &targets).unwrap();
    // The fused loss is the cross-entropy of the model's logits.
    let logits = model.forward(&ids).unwrap().reshape(((), 19)).unwrap();
    let reference = ops::reference::cross_entropy(&logits, &targets.flatten_all().unwrap());
    assert!((scalar(&loss()) - scalar(&reference.unwrap())).abs() < 1e-12);
    let expected_params = if tie { 2 + 9 * 2 } else { 3 + 9 * 2 };
    assert_eq!(params.len(), expected_params);
    every_parameter_matches(&params, &loss, "", &mut rng);
}

#[test]
fn every_llama_parameter_matches_finite_differences() {
    check_model(false);
}

#[test]
fn tied_embeddings_gradient_matches_finite_differences() {
    check_model(true);
}

/// Mixed precision: with bf16 compute the f32 master weights still get every gradient, in
/// f32, pointing where the f32 gradient points (bf16 keeps 8 bits of mantissa).
#[test]
fn bf16_compute_gradients_reach_the_f32_weights() {
    let config = LlamaConfig {
        initializer_range: 0.05,
        ..tiny_llama(false)
    };
    let (model, params) = Llama::new(&config, DType::F32, &Device::Cpu, 5).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let (ids, targets) = tiny_llama_batch(4, 8, &mut rng);
    let full_loss = model.loss(&ids, &targets).unwrap();
    let full = full_loss.backward().unwrap();
    let model = model.compute_in(DType::BF16);
    let half_loss = model.loss(&ids, &targets).unwrap();
    assert_eq!(half_loss.dtype(), DType::F32);
    let (a, b): (f32, f32) = (
        full_loss.to_scalar().unwrap(),
        half_loss.to_scalar().unwrap(),
    );
    assert!((a - b).abs() < 2e-2 * a.abs(), "loss f32 {a} vs bf16 {b}");
    let half = half_loss.backward().unwrap();
    for p in &params {
        let g32 = full.get(p.var.as_tensor()).unwrap();
        let g16 = half
            .get(p.var.as_tensor())
            .unwrap_or_else(|| panic!("{} has no bf16 gradient", p.name));
        assert_eq!(g16.dtype(), DType::F32, "{}", p.name);
        let dot = |x: &Tensor, y: &Tensor| -> f64 {
            let x: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            x.iter().zip(&y).map(|(a, b)| f64::from(a * b)).sum()
        };
        let cosine = dot(g32, g16) / (dot(g32, g32) * dot(g16, g16)).sqrt();
        assert!(cosine > 0.99, "{}: cosine {cosine}", p.name);
    }
}
