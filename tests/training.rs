//! End-to-end behaviour of the training loop, in process.

mod common;

use bsfa_train::config::RunConfig;
use bsfa_train::train;
use common::{records, small_config};

#[test]
fn loss_drops_on_builtin_data() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path(), &["train.steps=60", "optimizer.warmup_steps=5"]);
    let s = train::run(&config, None).unwrap();
    let first = s.losses[0];
    let last5: f64 = s.losses[55..].iter().sum::<f64>() / 5.0;
    // A byte model starts near ln(256) = 5.55; the built-in text is very regular.
    assert!((first - 256f64.ln()).abs() < 0.1, "first loss {first}");
    assert!(last5 < first - 2.0, "loss went from {first} to {last5}");
    assert!(
        s.final_val_loss < first - 2.0,
        "val loss {}",
        s.final_val_loss
    );

    // Outputs: the resolved config and one metrics line per step, the final eval and the
    // final training sample (the `test` preset samples every 100 steps and after the last).
    let written: RunConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(written, config);
    let lines = records(dir.path());
    assert_eq!(lines.len(), 62);
    for key in ["step", "loss", "lr", "grad_norm", "tokens_per_s", "step_ms"] {
        assert!(lines[0].get(key).is_some(), "metrics line lacks {key}");
    }
    assert_eq!(lines[59]["step"], 60);
    assert_eq!(lines[60]["val_loss"].as_f64().unwrap(), s.final_val_loss);
    assert!(lines[60].get("val_ppl").is_some());
    assert_eq!(lines[61]["step"], 60);
    assert!(!lines[61]["sample"].as_str().unwrap().is_empty());
}

#[test]
fn adam_mini_trains_like_adamw() {
    let run = |optimizer: &str| {
        let dir = tempfile::tempdir().unwrap();
        let name = format!("optimizer.name=\"{optimizer}\"");
        let config = small_config(
            dir.path(),
            &["train.steps=60", "optimizer.warmup_steps=5", &name],
        );
        train::run(&config, None).unwrap()
    };
    let (adamw, mini) = (run("adamw"), run("adam-mini"));
    assert_ne!(
        adamw.losses[1..],
        mini.losses[1..],
        "a different optimizer takes other steps"
    );
    assert_eq!(
        adamw.losses[0], mini.losses[0],
        "same model, same first batch"
    );
    let last5 = |l: &[f64]| l[55..].iter().sum::<f64>() / 5.0;
    assert!(
        last5(&mini.losses) < mini.losses[0] - 2.0,
        "{:?}",
        mini.losses
    );
    // On this easy data Adam-mini lands within 10% of AdamW's loss.
    assert!((last5(&mini.losses) / last5(&adamw.losses) - 1.0).abs() < 0.1);
}

/// The training losses of a 4-step run of the test model with the setting `set`.
fn four_step_losses(set: &str) -> Vec<f64> {
    let dir = tempfile::tempdir().unwrap();
    train::run(&small_config(dir.path(), &["train.steps=4", set]), None)
        .unwrap()
        .losses
}

#[test]
fn same_seed_same_losses_other_seed_other_losses() {
    let run = |seed: u64| four_step_losses(&format!("train.seed={seed}"));
    let a = run(1);
    assert_eq!(
        a,
        run(1),
        "a fixed seed must reproduce every loss bit for bit"
    );
    assert_ne!(a, run(2));
}

#[test]
fn micro_batch_split_does_not_change_the_run() {
    let run = |micro: usize| four_step_losses(&format!("train.micro_batch_size={micro}"));
    let whole = run(8);
    let split = run(2);
    for (a, b) in whole.iter().zip(&split) {
        assert!((a - b).abs() / a < 1e-5, "{whole:?} vs {split:?}");
    }
}
