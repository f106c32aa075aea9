//! Central finite differences in f64, shared by the gradient tests of the LLaMA and ViT
//! ops and models, and the tiny models they check.

use bsfa_train::model::{Architecture, LlamaConfig, Param, VitConfig};
use candle_core::{Device, Tensor, Var};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// The step of the central differences.
const EPS: f64 = 1e-5;
/// Relative error allowed between analytic and finite-difference derivatives (central
/// differences in f64 with eps 1e-5 are accurate to about 1e-9 here).
const REL_TOL: f64 = 1e-6;

/// A tensor of random f64 values in `[-scale, scale)`.
pub fn random(shape: &[usize], scale: f64, rng: &mut ChaCha8Rng) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// `t`'s values, flattened.
pub fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// The value of a scalar tensor.
pub fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f64>().unwrap()
}

/// `a - b` relative to the larger of the two (and to at least 1e-8).
fn rel_err(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(b.abs()).max(1e-8)
}

/// Reduces an op's output to a scalar with fixed random weights, so every output element
/// contributes a distinct amount to the loss.
pub fn weighted_sum(out: &Tensor, weights: &Tensor) -> Tensor {
    (out * weights).unwrap().sum_all().unwrap()
}

/// Random soft targets: positive rows summing to 1.
pub fn soft_targets(rows: usize, classes: usize, rng: &mut ChaCha8Rng) -> Tensor {
    let raw = random(&[rows, classes], 1.0, rng).exp().unwrap();
    raw.broadcast_div(&raw.sum_keepdim(1).unwrap()).unwrap()
}

/// Random token ids and targets for [`tiny_llama`] (vocabulary 19): `batch` sequences of
/// `seq` tokens each, the ids drawn first.
pub fn tiny_llama_batch(batch: usize, seq: usize, rng: &mut ChaCha8Rng) -> (Tensor, Tensor) {
    let mut draw = || -> Vec<u32> { (0..batch * seq).map(|_| rng.random_range(0..19)).collect() };
    let (ids, targets) = (draw(), draw());
    let tensor = |v: Vec<u32>| Tensor::from_vec(v, (batch, seq), &Device::Cpu).unwrap();
    (tensor(ids), tensor(targets))
}

/// A tiny LLaMA (vocabulary 19, hidden 16, 2 layers) with grouped-query attention (4 query
/// heads, 2 key/value heads), its embeddings tied to the head if `tie`.
pub fn tiny_llama(tie: bool) -> LlamaConfig {
    LlamaConfig {
        architecture: Architecture::Llama,
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

/// A tiny ViT: 8-pixel images in 4-pixel patches, hidden 8, 2 layers, 5 classes.
pub fn tiny_vit() -> VitConfig {
    VitConfig {
        image_size: 8,
        patch_size: 4,
        num_channels: 3,
        hidden_size: 8,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 12,
        num_classes: 5,
        layer_norm_eps: 1e-6,
        // A large init makes every nonlinearity work away from its linear regime.
        initializer_range: 0.3,
    }
}

/// Checks d loss / d input for every element of every input by central differences.
pub fn check_all_coordinates(inputs: &[Var], loss: impl Fn() -> Tensor, what: &str) {
    let grads = loss().backward().unwrap();
    for (k, var) in inputs.iter().enumerate() {
        let g = values(grads.get(var.as_tensor()).expect("input has a gradient"));
        assert!(
            g.iter().any(|x| *x != 0.0),
            "{what}: input {k} has an all-zero gradient"
        );
        let base = values(var.as_tensor());
        let set = |v: Vec<f64>| {
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                .unwrap()
        };
        for i in 0..base.len() {
            let mut plus = base.clone();
            plus[i] += EPS;
            set(plus);
            let up = scalar(&loss());
            let mut minus = base.clone();
            minus[i] -= EPS;
            set(minus);
            let down = scalar(&loss());
            set(base.clone());
            let fd = (up - down) / (2.0 * EPS);
            assert!(
                rel_err(g[i], fd) < REL_TOL || (g[i] - fd).abs() < 1e-9,
                "{what}: input {k}[{i}] analytic {} vs finite difference {fd}",
                g[i]
            );
        }
    }
}

/// Checks the gradient `g` of parameter `p` against central differences of `loss`: the
/// directional derivative along a random direction (every element at once) and three
/// sampled coordinates with a non-negligible gradient.
fn check_parameter(p: &Param, g: &[f64], loss: &dyn Fn() -> f64, rng: &mut ChaCha8Rng) {
    // `copy`, not `clone`: a clone shares storage with the Var that `set` overwrites.
    let base = p.var.as_tensor().copy().unwrap();
    let set = |t: &Tensor| p.var.set(t).unwrap();
    let rng = &mut *rng;
    // Directional derivative along a random direction covers every element at once.
    let u = random(base.dims(), 1.0, rng);
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

/// Every parameter of `params` has a nonzero gradient of `loss` that matches finite
/// differences (but the parameters `exempt` names: gradient zero by the maths).
pub fn every_parameter_matches(
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
