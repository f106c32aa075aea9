//! `--dtype bf16` end to end on the CPU, through the binary as a user runs it: a small LLaMA
//! learns, checkpoints, resumes bit for bit after a stop, and `eval` reads its checkpoint.
//! bf16 is the precision `--dtype auto` picks on a GPU: here its code path (bf16 compute,
//! f32 master weights, gradients and optimizer state) runs on the CPU.

mod common;

use common::{ok, ok_summary, read_json, records, run, run_with, small_bsfa_run};
use serde_json::Value;
use std::path::Path;

const STEPS: usize = 30;

/// The small Adam-mini + BSFA run of the multi-rank tests (re-estimating every 4 steps, so a
/// resume restores history and directions; every step logged, a checkpoint every 10 steps),
/// in bf16.
fn args(out: &Path) -> Vec<String> {
    args_in("bf16", out)
}

/// [`args`] computing in `dtype`.
fn args_in(dtype: &str, out: &Path) -> Vec<String> {
    small_bsfa_run(out, STEPS, &["--dtype", dtype, "--threads", "2"])
}

/// The training losses, by step.
fn losses(records: &[Value]) -> Vec<(u64, f64)> {
    records
        .iter()
        .filter_map(|r| Some((r["step"].as_u64()?, r.get("loss")?.as_f64()?)))
        .collect()
}

#[test]
fn bf16_run_learns_checkpoints_resumes_bit_exactly_and_evaluates() {
    let dir = tempfile::tempdir().unwrap();

    // A straight run.
    let straight = dir.path().join("straight");
    let summary = ok_summary(run(&args(&straight)));
    assert_eq!(summary["steps"], STEPS as u64);
    let config = read_json(&straight.join("config.json"));
    assert_eq!(config["train"]["dtype"], "bf16");
    let expected = records(&straight);
    let loss = losses(&expected);
    assert_eq!(loss.len(), STEPS);
    assert!(loss.iter().all(|(_, l)| l.is_finite()), "{loss:?}");
    // It learns: from about ln 256 = 5.5 (uniform over bytes) clearly down.
    let first = loss[0].1;
    let last: f64 = loss[STEPS - 5..].iter().map(|(_, l)| l).sum::<f64>() / 5.0;
    assert!(first > 5.0, "first loss {first}");
    assert!(last < first - 1.5, "loss {first} -> {last} (last 5 steps)");
    let val: Vec<f64> = expected
        .iter()
        .filter_map(|r| r.get("val_loss")?.as_f64())
        .collect();
    assert_eq!(val.len(), 3, "{expected:?}");
    assert!(val[2] < val[0], "{val:?}");
    // The model really computes in bf16: the first loss (same weights, same batch) is the
    // f32 run's up to bf16 rounding, not equal to it.
    let f32_run = dir.path().join("f32");
    ok(run(&args_in("f32", &f32_run)));
    let f32_first = losses(&records(&f32_run))[0].1;
    assert!(
        first != f32_first && (first - f32_first).abs() < 0.05,
        "first loss bf16 {first} vs f32 {f32_first}"
    );
    let ckpts = straight.join("checkpoints");
    for step in ["step-00000010", "step-00000020", "step-00000030"] {
        assert!(
            ckpts.join(step).join("model.safetensors").is_file(),
            "{step}"
        );
    }

    // The same run stopped right after step 11 (its checkpoint of step 10 written), then
    // resumed: the metrics are the straight run's, bit for bit.
    let stopped = dir.path().join("stopped");
    let o = run_with(
        &args(&stopped),
        &[
            ("BSFA_TRAIN_FAILPOINT", "rank-error:11"),
            ("BSFA_TRAIN_TEST_HOOKS", "1"),
        ],
    );
    assert!(!o.status.success(), "the failpoint did not stop the run");
    let steps_logged = losses(&records(&stopped)).len();
    assert_eq!(steps_logged, 10, "stopped after step 11, before logging it");
    let resumed = ok(run(&[
        args(&stopped),
        vec!["--resume".into(), "auto".into()],
    ]
    .concat()));
    let err = String::from_utf8_lossy(&resumed.stderr);
    assert!(err.contains("step-00000010' at step 10"), "{err}");
    assert_eq!(records(&stopped).len(), expected.len());
    for (got, want) in records(&stopped).iter().zip(&expected) {
        for key in ["step", "loss", "grad_norm", "val_loss", "bsfa"] {
            assert_eq!(got.get(key), want.get(key), "{key}: {got} vs {want}");
        }
    }

    // `eval` reads the bf16 run's checkpoint (its f32 master weights).
    let report = ok_summary(run(&[
        "eval",
        "--checkpoint",
        ckpts.join("step-00000030").to_str().unwrap(),
        "--data",
        "builtin",
        "--eval-batches",
        "4",
    ]));
    let eval_loss = report["val_loss"].as_f64().unwrap();
    assert_eq!(report["tokens"], 4 * 8 * 64);
    // Other windows than the run's validation, in f32: close to the run's, far below the start.
    assert!(
        eval_loss.is_finite() && eval_loss < first - 1.0,
        "eval loss {eval_loss}, first training loss {first}"
    );
    assert!(
        (eval_loss - val[2]).abs() < 0.5,
        "eval loss {eval_loss} vs the run's final val loss {}",
        val[2]
    );
}
