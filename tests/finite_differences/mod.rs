//! Central finite differences in f64, shared by the gradient tests of the LLaMA and ViT
//! ops and models.
// Each test crate that includes this module uses only part of it.
#![allow(dead_code)]

use bsfa_train::model::Param;
use candle_core::{Device, Tensor, Var};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

pub const EPS: f64 = 1e-5;
/// Relative error allowed between analytic and finite-difference derivatives (central
/// differences in f64 with eps 1e-5 are accurate to about 1e-9 here).
pub const REL_TOL: f64 = 1e-6;

pub fn random(shape: &[usize], scale: f64, rng: &mut ChaCha8Rng) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

pub fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

pub fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f64>().unwrap()
}

pub fn rel_err(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(b.abs()).max(1e-8)
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
pub fn check_parameter(p: &Param, g: &[f64], loss: &dyn Fn() -> f64, rng: &mut ChaCha8Rng) {
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
