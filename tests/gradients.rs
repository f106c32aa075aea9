//! Every gradient is checked against central finite differences in f64.
//!
//! candle-nn's fused ops have no backward and silently cut the graph; these tests make
//! sure every op we use and every parameter of the model really trains.

use bsfa_train::config::ModelConfig;
use bsfa_train::model::{ops, Llama};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const EPS: f64 = 1e-5;
/// Relative error allowed between analytic and finite-difference derivatives. Central
/// differences in f64 with eps 1e-5 are accurate to about 1e-9 here.
const REL_TOL: f64 = 1e-6;

fn random(shape: &[usize], scale: f64, rng: &mut ChaCha8Rng) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f64>().unwrap()
}

fn rel_err(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(b.abs()).max(1e-8)
}

/// Checks d loss / d input for every element of every input by central differences.
fn check_all_coordinates(inputs: &[Var], loss: impl Fn() -> Tensor, what: &str) {
    let grads = loss().backward().unwrap();
    for (k, var) in inputs.iter().enumerate() {
        let g = values(grads.get(var.as_tensor()).expect("input has a gradient"));
        assert!(
            g.iter().any(|x| *x != 0.0),
            "{what}: input {k} has an all-zero gradient"
        );
        let base = values(var.as_tensor());
        for i in 0..base.len() {
            let mut plus = base.clone();
            plus[i] += EPS;
            var.set(&Tensor::from_vec(plus, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let up = scalar(&loss());
            let mut minus = base.clone();
            minus[i] -= EPS;
            var.set(&Tensor::from_vec(minus, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let down = scalar(&loss());
            var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let fd = (up - down) / (2.0 * EPS);
            assert!(
                rel_err(g[i], fd) < REL_TOL || (g[i] - fd).abs() < 1e-9,
                "{what}: input {k}[{i}] analytic {} vs finite difference {fd}",
                g[i]
            );
        }
    }
}

/// Reduces an op's output to a scalar with fixed random weights, so every output
/// element contributes a distinct amount to the loss.
fn weighted_sum(out: &Tensor, weights: &Tensor) -> Tensor {
    (out * weights).unwrap().sum_all().unwrap()
}

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

#[test]
fn softmax_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let x = Var::from_tensor(&random(&[2, 2, 5, 5], 3.0, &mut rng)).unwrap();
    let mask = ops::causal_mask(5, DType::F64, &Device::Cpu).unwrap();
    let r = random(&[2, 2, 5, 5], 1.0, &mut rng);
    check_all_coordinates(
        std::slice::from_ref(&x),
        || {
            let masked = x.as_tensor().broadcast_add(&mask).unwrap();
            weighted_sum(&ops::softmax_last_dim(&masked).unwrap(), &r)
        },
        "masked softmax",
    );
    // The forward pass is a softmax: rows sum to one and masked entries are zero.
    let p = ops::softmax_last_dim(&x.as_tensor().broadcast_add(&mask).unwrap()).unwrap();
    let rows: Vec<f64> = values(&p.sum_keepdim(3).unwrap());
    assert!(rows.iter().all(|s| (s - 1.0).abs() < 1e-12));
    let p: Vec<Vec<f64>> = p.get(0).unwrap().get(0).unwrap().to_vec2().unwrap();
    assert_eq!(p[0][1], 0.0);
}

#[test]
fn rope_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (cos, sin) = ops::rope_tables(8, 16, 10000.0, DType::F64, &Device::Cpu).unwrap();
    let cos = cos.narrow(0, 0, 4).unwrap();
    let sin = sin.narrow(0, 0, 4).unwrap();
    let x = Var::from_tensor(&random(&[1, 2, 4, 8], 1.0, &mut rng)).unwrap();
    let r = random(&[1, 2, 4, 8], 1.0, &mut rng);
    check_all_coordinates(
        std::slice::from_ref(&x),
        || weighted_sum(&ops::rope(x.as_tensor(), &cos, &sin).unwrap(), &r),
        "rope",
    );
    // Rotary embedding is a rotation: it keeps the norm of every position's vector.
    let y = ops::rope(x.as_tensor(), &cos, &sin).unwrap();
    let nx = values(&x.as_tensor().sqr().unwrap().sum_keepdim(3).unwrap());
    let ny = values(&y.sqr().unwrap().sum_keepdim(3).unwrap());
    for (a, b) in nx.iter().zip(&ny) {
        assert!((a - b).abs() < 1e-12);
    }
}

#[test]
fn cross_entropy_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let logits = Var::from_tensor(&random(&[6, 7], 3.0, &mut rng)).unwrap();
    let targets = Tensor::new(&[0u32, 3, 6, 2, 2, 5], &Device::Cpu).unwrap();
    check_all_coordinates(
        std::slice::from_ref(&logits),
        || ops::cross_entropy(logits.as_tensor(), &targets).unwrap(),
        "cross_entropy",
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
    let got = scalar(&ops::cross_entropy(logits.as_tensor(), &targets).unwrap());
    assert!((got - expected).abs() < 1e-12);
}

fn tiny_config(tie: bool) -> ModelConfig {
    ModelConfig {
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

/// Every parameter gets a nonzero gradient whose directional derivative along a random
/// direction, and whose value at sampled coordinates, match finite differences.
fn check_model(tie: bool) {
    let config = tiny_config(tie);
    let (model, params) = Llama::new(&config, DType::F64, &Device::Cpu, 5).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let ids: Vec<u32> = (0..2 * 6).map(|_| rng.random_range(0..19)).collect();
    let targets: Vec<u32> = (0..2 * 6).map(|_| rng.random_range(0..19)).collect();
    let ids = Tensor::from_vec(ids, (2, 6), &Device::Cpu).unwrap();
    let targets = Tensor::from_vec(targets, (2, 6), &Device::Cpu).unwrap();
    let loss = || scalar(&model.loss(&ids, &targets).unwrap());
    let grads = model.loss(&ids, &targets).unwrap().backward().unwrap();
    let expected_params = if tie { 2 + 9 * 2 } else { 3 + 9 * 2 };
    assert_eq!(params.len(), expected_params);
    for p in &params {
        let g = grads
            .get(p.var.as_tensor())
            .unwrap_or_else(|| panic!("{} has no gradient", p.name));
        let g = values(g);
        let nonzero = g.iter().filter(|v| v.abs() > 0.0).count();
        assert!(nonzero > 0, "{} has an all-zero gradient", p.name);
        // `copy`, not `clone`: a clone shares storage with the Var that `set` overwrites.
        let base = p.var.as_tensor().copy().unwrap();
        let set = |t: &Tensor| p.var.set(t).unwrap();

        // Directional derivative along a random direction covers every element at once.
        let u = random(base.dims(), 1.0, &mut rng);
        let analytic: f64 = g.iter().zip(values(&u)).map(|(a, b)| a * b).sum();
        set(&(&base + (&u * EPS).unwrap()).unwrap());
        let up = loss();
        set(&(&base - (&u * EPS).unwrap()).unwrap());
        let down = loss();
        set(&base.copy().unwrap());
        let fd = (up - down) / (2.0 * EPS);
        assert!(
            rel_err(analytic, fd) < REL_TOL,
            "{}: directional derivative {analytic} vs finite difference {fd}",
            p.name
        );

        // A few single coordinates, chosen among those with a non-negligible gradient.
        let flat = values(&base);
        for _ in 0..3 {
            let i = rng.random_range(0..flat.len());
            if g[i].abs() < 1e-7 {
                continue;
            }
            let mut v = flat.clone();
            v[i] += EPS;
            set(&Tensor::from_vec(v.clone(), base.shape(), &Device::Cpu).unwrap());
            let up = loss();
            v[i] -= 2.0 * EPS;
            set(&Tensor::from_vec(v, base.shape(), &Device::Cpu).unwrap());
            let down = loss();
            set(&base.copy().unwrap());
            let fd = (up - down) / (2.0 * EPS);
            assert!(
                rel_err(g[i], fd) < 1e-5,
                "{}[{i}]: analytic {} vs finite difference {fd}",
                p.name,
                g[i]
            );
        }
    }
}

#[test]
fn every_llama_parameter_matches_finite_differences() {
    check_model(false);
}

#[test]
fn tied_embeddings_gradient_matches_finite_differences() {
    check_model(true);
}
