//! The BSFA wrapper step by step against a reference written from the paper's Algorithms
//! 1-3 in f64: a scripted base optimizer hands it known updates, and every parameter value
//! is compared after every step. This pins down what the wrapper must do exactly: alpha in
//! the dominant subspace and gamma in the bulk (not the other way round), raw base updates
//! in the history (not projected ones), the first projection at step `interval` (or, with
//! `bsfa.first_projection = rank_updates`, at the first re-estimation with `rank` updates),
//! re-estimation every `interval` steps, no more often, and under `bsfa.partition =
//! adam-mini` each block of a tensor projected on its own directions.

use bsfa_train::dist::{Communicator, SingleRank};
use bsfa_train::model::{Param, ParamGroup};
use bsfa_train::optim::bsfa::{Bsfa, FirstProjection};
use bsfa_train::optim::{BsfaConfig, Optimizer};
use candle_core::{DType, Device, Tensor, Var};
use nalgebra::DMatrix;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::VecDeque;
use std::sync::Arc;

/// A base optimizer that adds the next scripted update to each parameter.
struct Scripted {
    /// Per step, per parameter: the update.
    updates: Vec<Vec<Vec<f64>>>,
    steps: u64,
}

impl Optimizer for Scripted {
    fn step(&mut self, params: &[Param], _: &[Tensor], _: f64, _: f64) -> anyhow::Result<()> {
        for (p, v) in params.iter().zip(&self.updates[self.steps as usize]) {
            let v = Tensor::new(v.as_slice(), &Device::Cpu)?.to_dtype(p.var.dtype())?;
            p.var
                .set(&(p.var.as_tensor() + v.reshape(p.var.shape())?)?)?;
        }
        self.steps += 1;
        Ok(())
    }

    fn state_bytes(&self) -> usize {
        0
    }
}

/// BSFA's update of one block, from the paper in f64: the history of raw base updates, the
/// top principal directions of the centred history (an SVD, not our Gram route), and
/// `alpha P + gamma (I - P)` applied to each update.
struct Reference {
    config: BsfaConfig,
    history: VecDeque<Vec<f64>>,
    /// Orthonormal directions as columns (`n x k`), once estimated.
    directions: Option<DMatrix<f64>>,
    /// At the latest re-estimation: the variance fraction captured, and the overlap
    /// `|U_old^T U_new|_F^2 / min(k_old, k_new)` when there were directions before.
    /// and how many directions were kept.
    found: Option<(f64, Option<f64>, usize)>,
}

impl Reference {
    fn new(config: &BsfaConfig) -> Self {
        Self {
            config: config.clone(),
            history: VecDeque::new(),
            directions: None,
            found: None,
        }
    }

    /// The change of the parameter at step `t` (0-based) for the base update `v`.
    fn step(&mut self, t: usize, v: &[f64]) -> Vec<f64> {
        self.found = None;
        let c = &self.config;
        // The first estimate: at step `interval` whatever the history holds (Algorithm 1), or
        // once it holds `rank` updates when asked.
        let ready = match c.first_projection {
            FirstProjection::Interval => true,
            FirstProjection::RankUpdates => self.history.len() >= c.rank,
        };
        if t > 0 && t.is_multiple_of(c.interval) && ready {
            let (m, n) = (self.history.len(), v.len());
            let h = DMatrix::from_fn(m, n, |i, j| self.history[i][j]);
            let mean = h.row_mean();
            let centred = DMatrix::from_fn(m, n, |i, j| h[(i, j)] - mean[j]);
            // The SVD of the tall n x m matrix (nalgebra's SVD of the wide one is off in the
            // sixth digit here); its left singular vectors are the principal directions.
            let svd = centred.transpose().svd(true, false);
            let u = svd.u.unwrap();
            let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
            order.sort_by(|&a, &b| svd.singular_values[b].total_cmp(&svd.singular_values[a]));
            let total: f64 = svd.singular_values.iter().map(|s| s * s).sum();
            let kept: Vec<usize> = order
                .into_iter()
                .take(c.rank)
                .filter(|&i| svd.singular_values[i].powi(2) > 1e-9 * total)
                .collect();
            let new = (!kept.is_empty())
                .then(|| DMatrix::from_fn(n, kept.len(), |r, col| u[(r, kept[col])]));
            let captured: f64 = kept.iter().map(|&i| svd.singular_values[i].powi(2)).sum();
            let overlap = match (&self.directions, &new) {
                (Some(old), Some(new)) => {
                    let products = old.transpose() * new;
                    Some(products.norm_squared() / old.ncols().min(new.ncols()) as f64)
                }
                _ => None,
            };
            self.found = Some((captured / total, overlap, kept.len()));
            self.directions = new;
        }
        let raw = DMatrix::from_column_slice(v.len(), 1, v);
        let out = match &self.directions {
            Some(u) => {
                let dominant = u * (u.transpose() * &raw);
                &dominant * c.alpha + (&raw - &dominant) * c.gamma
            }
            None => raw,
        };
        if self.history.len() == c.history {
            self.history.pop_front();
        }
        self.history.push_back(v.to_vec());
        out.iter().copied().collect()
    }
}

fn config(rank: usize, history: usize, interval: usize) -> BsfaConfig {
    BsfaConfig {
        enabled: true,
        alpha: 0.5,
        gamma: 3.0,
        rank,
        history,
        interval,
        ..BsfaConfig::default()
    }
}

fn param(name: &str, values: &[f64], dtype: DType) -> Param {
    let t = Tensor::new(values, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
        .reshape((values.len() / 8, 8))
        .unwrap();
    Param {
        name: name.into(),
        group: ParamGroup::Mlp,
        var: Var::from_tensor(&t).unwrap(),
    }
}

fn read(p: &Param) -> Vec<f64> {
    p.var
        .as_tensor()
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Updates with a few large oscillating components (the dominant subspace of the paper's
/// Proposition 1) over smaller random ones, of comparable total size so the estimate
/// depends on how the history is weighted.
fn scripted_updates(steps: usize, n: usize, seed: u64) -> Vec<Vec<f64>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dominant: Vec<Vec<f64>> = (0..3)
        .map(|_| (0..n).map(|_| rng.random_range(-1.0..1.0)).collect())
        .collect();
    (0..steps)
        .map(|t| {
            let sign = if t % 2 == 0 { 1.0 } else { -1.0 };
            let coefficients: Vec<f64> = (0..3)
                .map(|i| sign * (0.3 / (i + 1) as f64) * rng.random_range(0.5..1.5))
                .collect();
            (0..n)
                .map(|j| {
                    let oscillating: f64 = (0..3).map(|i| coefficients[i] * dominant[i][j]).sum();
                    oscillating + 0.1 * rng.random_range(-1.0..1.0) + 0.02
                })
                .collect()
        })
        .collect()
}

fn single() -> Arc<dyn Communicator> {
    Arc::new(SingleRank)
}

/// Runs BSFA (`rank`, history 8, `interval`) around the scripted base on parameters of
/// `dtype` and the reference side by side; returns the first step whose update was
/// projected.
fn compare_with_reference(dtype: DType, tol: f64, rank: usize, interval: usize) -> usize {
    compare_config_with_reference(dtype, tol, &config(rank, 8, interval))
}

/// [`compare_with_reference`] for any configuration `cfg`.
fn compare_config_with_reference(dtype: DType, tol: f64, cfg: &BsfaConfig) -> usize {
    let (n, steps) = (48, 40);
    let cfg = cfg.clone();
    let updates = scripted_updates(steps, n, 5);
    let start: Vec<f64> = (0..n).map(|j| (j as f64 * 0.37).sin()).collect();
    let params = vec![param("layers.0.mlp.up_proj.weight", &start, dtype)];
    let mut base = Scripted {
        updates: updates.iter().map(|v| vec![v.clone()]).collect(),
        steps: 0,
    };
    let mut bsfa = Bsfa::new(&cfg, &params, single()).unwrap();
    let mut reference = Reference::new(&cfg);
    let mut expected = start.clone();
    let mut first_projected = None;
    for (t, v) in updates.iter().enumerate() {
        bsfa.step(&params, || base.step(&params, &[], 1.0, 1.0))
            .unwrap();
        let change = reference.step(t, v);
        if first_projected.is_none() && change.iter().zip(v).any(|(a, b)| (a - b).abs() > 1e-12) {
            first_projected = Some(t);
        }
        for (e, c) in expected.iter_mut().zip(&change) {
            *e += c;
        }
        // The diagnostics of a re-estimation, and only of one.
        let found = bsfa.take_diagnostics();
        match (reference.found, found.as_deref()) {
            (None, None) => {}
            (Some((energy, overlap, kept)), Some([mlp])) => {
                assert_eq!((mlp.blocks, mlp.directions), (1, kept as f64));
                assert!(
                    (mlp.energy - energy).abs() < 1e-5,
                    "step {t}: {mlp:?} vs {energy}"
                );
                match (mlp.overlap, overlap) {
                    (None, None) => {}
                    (Some(got), Some(want)) => {
                        assert!(
                            (got - want).abs() < 1e-4,
                            "step {t}: overlap {got} vs {want}"
                        )
                    }
                    other => panic!("step {t}: overlap {other:?}"),
                }
            }
            other => panic!("step {t}: diagnostics {other:?}"),
        }
        for (j, (got, want)) in read(&params[0]).iter().zip(&expected).enumerate() {
            assert!(
                (got - want).abs() < tol,
                "{dtype:?} step {t}, element {j}: {got} vs the paper's {want}"
            );
        }
    }
    first_projected.expect("the reference projects")
}

#[test]
fn the_cpu_path_matches_the_papers_algorithm_at_every_step() {
    // f32 parameters on the CPU take the fused kernels. The first projection is at the
    // first re-estimation, at step `interval`, whatever the rank.
    assert_eq!(compare_with_reference(DType::F32, 2e-4, 3, 4), 4);
    assert_eq!(compare_with_reference(DType::F32, 2e-4, 6, 4), 4);
    assert_eq!(compare_with_reference(DType::F32, 2e-4, 2, 3), 3);
}

#[test]
fn the_tensor_path_matches_the_papers_algorithm_at_every_step() {
    // f64 parameters take the tensor-op path a CUDA tensor takes.
    assert_eq!(compare_with_reference(DType::F64, 1e-9, 3, 4), 4);
    assert_eq!(compare_with_reference(DType::F64, 1e-9, 6, 4), 4);
}

/// `bsfa.first_projection = rank_updates`: the first estimate (and projection) waits for a
/// history of `rank` updates, at the first re-estimation step from there on; the rest is
/// Algorithm 1 unchanged.
#[test]
fn the_first_projection_waits_for_rank_updates_when_asked() {
    let later = |rank, interval| BsfaConfig {
        first_projection: FirstProjection::RankUpdates,
        ..config(rank, 8, interval)
    };
    // 6 updates are held from step 6 on: the first re-estimation then is step 8.
    assert_eq!(later(6, 4).first_estimate_step(), 8);
    assert_eq!(
        compare_config_with_reference(DType::F32, 2e-4, &later(6, 4)),
        8
    );
    assert_eq!(
        compare_config_with_reference(DType::F64, 1e-9, &later(6, 4)),
        8
    );
    // A rank of at most `interval` updates is there at step `interval`, as by default.
    assert_eq!(
        compare_config_with_reference(DType::F32, 2e-4, &later(3, 4)),
        4
    );
    // The paper's k = 50, T = 10: step 50 instead of 10.
    assert_eq!(later(50, 10).first_estimate_step(), 50);
    assert_eq!(later(51, 10).first_estimate_step(), 60);
    assert_eq!(config(50, 60, 10).first_estimate_step(), 10);
}

/// `bsfa.partition = adam-mini` (`Bsfa::partitioned`): a tensor of several blocks, each
/// with its own history columns, directions and projection, is the paper's algorithm run
/// on every block by itself. Checked on both paths against one reference per block.
#[test]
fn each_block_of_a_partitioned_tensor_is_projected_on_its_own_directions() {
    for (dtype, tol) in [(DType::F32, 2e-4), (DType::F64, 1e-9)] {
        let (n, chunk, steps) = (48, 16, 30);
        let cfg = config(3, 8, 4);
        let updates = scripted_updates(steps, n, 6);
        let start: Vec<f64> = (0..n).map(|j| (j as f64 * 0.29).cos()).collect();
        let params = vec![param("layers.0.mlp.up_proj.weight", &start, dtype)];
        let mut base = Scripted {
            updates: updates.iter().map(|v| vec![v.clone()]).collect(),
            steps: 0,
        };
        let mut bsfa = Bsfa::partitioned(&cfg, &params, &[chunk], single()).unwrap();
        let mut references: Vec<Reference> = (0..n / chunk).map(|_| Reference::new(&cfg)).collect();
        let mut expected = start.clone();
        for (t, v) in updates.iter().enumerate() {
            bsfa.step(&params, || base.step(&params, &[], 1.0, 1.0))
                .unwrap();
            for (b, reference) in references.iter_mut().enumerate() {
                let part = &v[b * chunk..(b + 1) * chunk];
                for (e, c) in expected[b * chunk..]
                    .iter_mut()
                    .zip(reference.step(t, part))
                {
                    *e += c;
                }
            }
            if let Some([mlp]) = bsfa.take_diagnostics().as_deref() {
                assert_eq!(mlp.blocks, n / chunk, "step {t}");
            }
            for (j, (got, want)) in read(&params[0]).iter().zip(&expected).enumerate() {
                assert!(
                    (got - want).abs() < tol,
                    "{dtype:?} step {t}, element {j}: {got} vs the per-block reference {want}"
                );
            }
        }
        // The blocks' directions differ from the whole tensor's: a per-tensor run departs.
        let whole = compare_whole(&cfg, &updates, &start);
        assert!(whole
            .iter()
            .zip(&expected)
            .any(|(a, b)| (a - b).abs() > 1e-3));
    }
}

/// The parameter the per-tensor reference ends at, for `updates` from `start`.
fn compare_whole(cfg: &BsfaConfig, updates: &[Vec<f64>], start: &[f64]) -> Vec<f64> {
    let mut reference = Reference::new(cfg);
    let mut out = start.to_vec();
    for (t, v) in updates.iter().enumerate() {
        for (e, c) in out.iter_mut().zip(reference.step(t, v)) {
            *e += c;
        }
    }
    out
}

#[test]
fn a_block_without_variance_keeps_the_identity_and_training_goes_on() {
    let (n, steps) = (16, 12);
    let cfg = config(2, 4, 2);
    let start = vec![0.25; n];
    let params = vec![
        param("layers.0.mlp.up_proj.weight", &start, DType::F32),
        param("layers.0.mlp.gate_proj.weight", &start, DType::F32),
        param("layers.0.mlp.down_proj.weight", &start, DType::F32),
    ];
    let moving = scripted_updates(steps, n, 9);
    // A frozen block (no update), a constant one (the same update every step), a moving one.
    let updates: Vec<Vec<Vec<f64>>> = (0..steps)
        .map(|t| vec![vec![0.0; n], vec![0.01; n], moving[t].clone()])
        .collect();
    let mut base = Scripted { updates, steps: 0 };
    let mut bsfa = Bsfa::new(&cfg, &params, single()).unwrap();
    for _ in 0..steps {
        bsfa.step(&params, || base.step(&params, &[], 1.0, 1.0))
            .unwrap();
    }
    for (p, expected) in params.iter().zip([0.25, 0.25 + 0.01 * steps as f64]) {
        for got in read(p) {
            assert!(
                (got - expected).abs() < 1e-5,
                "{}: {got} vs {expected}",
                p.name
            );
        }
    }
    // The moving block was projected meanwhile.
    let plain: Vec<f64> = (0..n)
        .map(|j| 0.25 + moving.iter().map(|v| v[j]).sum::<f64>())
        .collect();
    let projected = read(&params[2])
        .iter()
        .zip(&plain)
        .any(|(a, b)| (a - b).abs() > 1e-3);
    assert!(projected);
}

/// The wrapper takes the update as `after - before` of the f32 parameter. Where the two
/// values are within a factor of two (Sterbenz) that difference is exact, precisely how the
/// stored parameter moved; it differs from the base optimizer's intended update `u` by the
/// rounding of `theta + u` to f32, at most half an ulp of `theta`. Measured here for
/// LLaMA-like weights (normal, std 0.02) and Adam-like updates of about `lr` per element,
/// down to the paper's final learning rate for LLaMA-72M (5e-4 / 20): the relative error of
/// the history rows stays far below what could move a principal direction.
#[test]
fn the_update_taken_as_a_difference_loses_little_to_cancellation() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let n = 100_000;
    let theta: Vec<f32> = (0..n)
        .map(|_| {
            // Box-Muller: a normal with std 0.02.
            let (a, b): (f64, f64) = (rng.random_range(1e-12..1.0), rng.random_range(0.0..1.0));
            (0.02 * (-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()) as f32
        })
        .collect();
    for lr in [1e-3, 1e-4, 2.5e-5] {
        let u: Vec<f32> = (0..n)
            .map(|_| (lr * rng.random_range(-1.5..1.5)) as f32)
            .collect();
        let (mut err, mut norm) = (0.0f64, 0.0f64);
        for (t, u) in theta.iter().zip(&u) {
            let after = t + u;
            let v = after - t;
            err += (v as f64 - *u as f64).powi(2);
            norm += (*u as f64).powi(2);
        }
        let relative = (err / norm).sqrt();
        eprintln!("lr {lr:e}: |v - u| / |u| = {relative:.2e}");
        assert!(relative < 1e-3, "lr {lr}: {relative}");
    }
}
