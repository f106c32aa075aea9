//! BSFA checked against its mathematics: the projector's action, Proposition 1, and
//! the identity case; then against training.

mod common;

use bsfa_train::optim::bsfa::{project, top_directions};
use bsfa_train::train;
use candle_core::{Device, Tensor};
use common::finite_differences::{random, values};
use common::small_config;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn assert_close(a: &Tensor, b: &Tensor, tol: f64, what: &str) {
    for (x, y) in values(a).iter().zip(values(b)) {
        assert!((x - y).abs() < tol, "{what}: {x} vs {y}");
    }
}

/// Sum of squared inner products between the rows of `a` and of `b` (orthonormal rows):
/// the sum of squared cosines of the principal angles between the two subspaces.
fn squared_overlap(a: &Tensor, b: &Tensor) -> f64 {
    let products = a.matmul(&b.t().unwrap()).unwrap();
    products
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// The projector maps its estimated directions to alpha times themselves and their
/// orthogonal complement to gamma times.
#[test]
fn projector_scales_directions_by_alpha_and_the_rest_by_gamma() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let history = random(&[12, 50], 1.0, &mut rng);
    let u = top_directions(&history, 4).unwrap().unwrap();
    assert_eq!(u.dims(), [4, 50]);
    let gram = u.matmul(&u.t().unwrap()).unwrap();
    let identity = Tensor::eye(4, candle_core::DType::F64, &Device::Cpu).unwrap();
    assert_close(&gram, &identity, 1e-10, "directions are orthonormal");
    let (alpha, gamma) = (0.5, 3.0);
    for i in 0..4 {
        let ui = u.get(i).unwrap();
        let expected = (&ui * alpha).unwrap();
        assert_close(
            &project(&ui, &u, alpha, gamma).unwrap(),
            &expected,
            1e-10,
            "alpha u",
        );
    }
    let w = random(&[50], 1.0, &mut rng);
    let inside = u
        .t()
        .unwrap()
        .matmul(&u.matmul(&w.unsqueeze(1).unwrap()).unwrap())
        .unwrap()
        .squeeze(1)
        .unwrap();
    let perp = (&w - inside).unwrap();
    let expected = (&perp * gamma).unwrap();
    assert_close(
        &project(&perp, &u, alpha, gamma).unwrap(),
        &expected,
        1e-10,
        "gamma w_perp",
    );
    // The directions are the top principal components: the first explains more variance of
    // the centred history than any other unit vector we try.
    let centred = history
        .broadcast_sub(&history.mean_keepdim(0).unwrap())
        .unwrap();
    let variance = |d: &Tensor| {
        let p = centred.matmul(&d.unsqueeze(1).unwrap()).unwrap();
        p.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let top = variance(&u.get(0).unwrap());
    for _ in 0..20 {
        let d = random(&[50], 1.0, &mut rng);
        let norm = d.sqr().unwrap().sum_all().unwrap().sqrt().unwrap();
        let d = d.broadcast_div(&norm).unwrap();
        assert!(variance(&d) <= top + 1e-9);
    }
}

/// Proposition 1: gradient descent on a quadratic whose top-k curvatures satisfy
/// eta*lambda_k > 1, 0 < eta*lambda_tail < 1 and eta*(lambda_k + lambda_tail) > 2; PCA of a
/// window of its updates recovers the top-k eigenspace.
#[test]
fn pca_of_gradient_descent_recovers_the_top_hessian_eigenspace() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (d, k, eta) = (20, 3, 0.5);
    // A random orthonormal eigenbasis: top directions from a random matrix's PCA.
    let basis = top_directions(&random(&[d + 1, d], 1.0, &mut rng), d)
        .unwrap()
        .unwrap();
    assert_eq!(basis.dims(), [d, d]);
    let mut lambdas = vec![1.0; d];
    lambdas[..k].copy_from_slice(&[3.9, 3.7, 3.5]);
    let h = basis
        .t()
        .unwrap()
        .broadcast_mul(&Tensor::new(lambdas.as_slice(), &Device::Cpu).unwrap())
        .unwrap()
        .matmul(&basis)
        .unwrap();
    let mut theta = random(&[d, 1], 1.0, &mut rng);
    let mut updates = Vec::new();
    for _ in 0..40 {
        let update = (h.matmul(&theta).unwrap() * -eta).unwrap();
        theta = (&theta + &update).unwrap();
        updates.push(update.squeeze(1).unwrap());
    }
    let window = Tensor::stack(&updates[30..], 0).unwrap();
    let u = top_directions(&window, k).unwrap().unwrap();
    // Squared cosines of the principal angles sum to k when the subspaces coincide.
    let top = basis.narrow(0, 0, k).unwrap();
    let captured = squared_overlap(&u, &top);
    assert!(
        (captured - k as f64).abs() < 1e-6,
        "captured {captured} of {k}"
    );
    // The bulk is orthogonal to what was found.
    let bulk = basis.narrow(0, k, d - k).unwrap();
    let leak = squared_overlap(&u, &bulk);
    assert!(leak < 1e-6, "leak {leak}");
}

/// Train losses of a 40-step run of the small config with a small BSFA setting and `sets`.
fn losses(sets: &[&str]) -> Vec<f64> {
    let dir = tempfile::tempdir().unwrap();
    let base = [
        "train.steps=40",
        "optimizer.warmup_steps=5",
        "bsfa.rank=4",
        "bsfa.history=8",
        "bsfa.interval=5",
    ];
    let all: Vec<&str> = base.iter().chain(sets).copied().collect();
    train::run(&small_config(dir.path(), &all), None)
        .unwrap()
        .losses
}

/// With alpha = gamma = 1 the projector is the identity: BSFA reproduces its base optimizer
/// bit for bit, through several re-estimations.
#[test]
fn alpha_gamma_one_reproduces_the_base_optimizer() {
    for base in ["adamw", "adam-mini"] {
        let name = format!("optimizer.name=\"{base}\"");
        let plain = losses(&[&name]);
        let wrapped = losses(&[&name, "bsfa.enabled=true", "bsfa.alpha=1", "bsfa.gamma=1"]);
        assert_eq!(plain, wrapped, "{base}");
    }
}

/// With the paper's alpha and a bulk boost, BSFA changes the run and still trains.
#[test]
fn bsfa_changes_the_steps_and_trains() {
    let plain = losses(&["optimizer.name=\"adam-mini\""]);
    let bsfa = losses(&[
        "optimizer.name=\"adam-mini\"",
        "bsfa.enabled=true",
        "bsfa.gamma=2",
    ]);
    // Identical until the first estimate (after `interval` steps), different after.
    assert_eq!(plain[..6], bsfa[..6]);
    assert_ne!(plain[6..], bsfa[6..]);
    let last5 = |l: &[f64]| l[35..].iter().sum::<f64>() / 5.0;
    assert!(last5(&bsfa) < bsfa[0] - 2.0, "{bsfa:?}");
}

/// 4-bit history and directions (`bsfa.bits=4`) keep the run close to full precision and
/// hold about an eighth of the memory.
#[test]
fn four_bit_state_trains_like_full_precision() {
    let full = losses(&["optimizer.name=\"adam-mini\"", "bsfa.enabled=true"]);
    let four = losses(&[
        "optimizer.name=\"adam-mini\"",
        "bsfa.enabled=true",
        "bsfa.bits=4",
    ]);
    let last5 = |l: &[f64]| l[35..].iter().sum::<f64>() / 5.0;
    assert_ne!(full[6..], four[6..], "4-bit storage changed nothing");
    assert!(
        (last5(&full) - last5(&four)).abs() < 0.05 * last5(&full),
        "{} vs {}",
        last5(&full),
        last5(&four)
    );

    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path(), &["bsfa.enabled=true", "bsfa.bits=4"]);
    let (_, params) =
        bsfa_train::model::Llama::new(&config.model, candle_core::DType::F32, &Device::Cpu, 0)
            .unwrap();
    let four_bytes = bsfa_train::optim::bsfa::steady_state_bytes(&config.bsfa, &params).unwrap();
    let mut full_cfg = config.bsfa.clone();
    full_cfg.bits = 32;
    let full_bytes = bsfa_train::optim::bsfa::steady_state_bytes(&full_cfg, &params).unwrap();
    let ratio = four_bytes as f64 / full_bytes as f64;
    assert!((0.12..0.14).contains(&ratio), "{ratio}");
}

/// `bsfa.first_projection = rank_updates`: the run is the base optimizer's, bit for bit,
/// until the first re-estimation with `rank` updates in the history (rank 6, interval 5:
/// step 10), and BSFA's after; by default BSFA departs after step `interval` (5).
#[test]
fn the_first_projection_key_delays_bsfa_until_rank_updates() {
    let base = ["optimizer.name=\"adam-mini\"", "bsfa.rank=6"];
    let with = |sets: &[&str]| losses(&[&base[..], sets].concat());
    let plain = with(&[]);
    let bsfa = with(&["bsfa.enabled=true", "bsfa.gamma=2"]);
    let later = with(&[
        "bsfa.enabled=true",
        "bsfa.gamma=2",
        "bsfa.first_projection=\"rank_updates\"",
    ]);
    // losses[t] is measured before step t's update: a projection in step t shows at t + 1.
    assert_eq!(plain[..6], bsfa[..6]);
    assert_ne!(plain[6], bsfa[6]);
    assert_eq!(plain[..11], later[..11]);
    assert_ne!(plain[11..], later[11..]);
}

/// `bsfa.partition = adam-mini`: BSFA's blocks are the model's Adam-mini partition, under
/// either base optimizer (the `test` model: 2 layers, hidden 64, 4 heads, MLP 172: q and k
/// per head, v, o and the MLP per row, every norm whole), as each re-estimation's
/// diagnostics count them; by default one block per tensor.
#[test]
fn the_partition_key_makes_the_adam_mini_blocks_bsfas() {
    let (attn, mlp) = (2 * (4 + 4 + 64 + 64), 2 * (172 + 172 + 64));
    for base in ["adamw", "adam-mini"] {
        for (partition, expected) in [("tensor", [5, 8, 6]), ("adam-mini", [5, attn, mlp])] {
            let dir = tempfile::tempdir().unwrap();
            let sets = [
                format!("optimizer.name=\"{base}\""),
                format!("bsfa.partition=\"{partition}\""),
                "bsfa.enabled=true".into(),
                "train.steps=11".into(),
                "bsfa.rank=4".into(),
                "bsfa.history=8".into(),
                "bsfa.interval=5".into(),
            ];
            let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
            train::run(&small_config(dir.path(), &sets), None).unwrap();
            let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
            let found: Vec<serde_json::Value> = metrics
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .filter_map(|v| v.get("bsfa").cloned())
                .collect();
            assert_eq!(
                found.len(),
                2,
                "{base} {partition}: re-estimations at steps 5, 10"
            );
            for groups in &found {
                let blocks: Vec<u64> = groups
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|g| g["blocks"].as_u64().unwrap())
                    .collect();
                assert_eq!(
                    blocks, expected,
                    "{base} {partition}: norm, attn, mlp blocks"
                );
            }
        }
    }
}
