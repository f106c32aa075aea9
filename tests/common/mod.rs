//! The one harness of the integration tests: the binary under test, running it, reading
//! what a run wrote, and the small test model (the `test` preset, `configs/test.json`).
// Each test binary compiles this module on its own and uses a different part of it.
#![allow(dead_code)]

pub mod data;
pub mod finite_differences;
pub mod hub;
pub mod op_cases;
pub mod ranks;
pub mod tools;

use bsfa_train::config::{ConfigBuilder, RunConfig};
use candle_core::Tensor;
use serde_json::Value;
use std::ffi::OsStr;
use std::fmt::Debug;
use std::path::Path;
use std::process::{Command, Output};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_bsfa-train");

/// The flags that pick the small test model.
pub const TEST_MODEL: [&str; 2] = ["--model", "test"];

/// The small BSFA setting: rank 3 < history 6, re-estimated every 4 steps, so the
/// projection starts at step 4.
pub const SMALL_BSFA: [&str; 6] = [
    "--set",
    "bsfa.rank=3",
    "--set",
    "bsfa.history=6",
    "--set",
    "bsfa.interval=4",
];

/// The binary as a command, to add arguments and environment to.
pub fn command() -> Command {
    Command::new(BIN)
}

/// Runs the binary with `args` to the end.
pub fn run<S: AsRef<OsStr>>(args: &[S]) -> Output {
    command().args(args).output().expect("binary runs")
}

/// Runs the binary with `args` and the environment variables `envs` to the end.
pub fn run_with<S: AsRef<OsStr>>(args: &[S], envs: &[(&str, &str)]) -> Output {
    command()
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .expect("binary runs")
}

/// The run's stderr, as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `o`, after checking the run succeeded (showing its stderr if not).
pub fn ok(o: Output) -> Output {
    assert!(o.status.success(), "status {:?}\n{}", o.status, stderr(&o));
    o
}

/// The last stdout line, as JSON: the summary or report every command ends with.
pub fn summary(o: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(stdout.lines().last().expect("a summary line")).expect("JSON summary")
}

/// The summary of a run that must have succeeded.
pub fn ok_summary(o: Output) -> Value {
    summary(&ok(o))
}

/// Checks a clean failure: a non-zero exit, no panic, and every one of `needles` in the
/// message; returns the message.
pub fn fails(o: Output, needles: &[&str]) -> String {
    clean_failure(&"the run", &o, needles)
}

/// Runs the binary with `args` and checks it fails cleanly with `needle` in the message;
/// returns the message.
pub fn fails_with<S: AsRef<OsStr> + Debug>(args: &[S], needle: &str) -> String {
    clean_failure(&args, &run(args), &[needle])
}

/// [`fails`], naming `what` ran in its messages.
fn clean_failure(what: &dyn Debug, o: &Output, needles: &[&str]) -> String {
    let err = stderr(o);
    assert!(!o.status.success(), "{what:?} succeeded; stderr: {err}");
    assert!(!err.contains("panicked"), "{what:?} panicked: {err}");
    for needle in needles {
        assert!(
            err.contains(needle),
            "{what:?}: expected '{needle}' in: {err}"
        );
    }
    err
}

/// A JSON file.
pub fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).expect("JSON")
}

/// Every record of the run's metrics.jsonl, in file order.
pub fn records(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// `(step, key, value)` of every loss and val_loss in metrics.jsonl.
pub fn logged(out: &Path) -> Vec<(u64, &'static str, f64)> {
    let mut found = Vec::new();
    for r in records(out) {
        for key in ["loss", "val_loss"] {
            if let Some(v) = r.get(key).and_then(Value::as_f64) {
                found.push((r["step"].as_u64().expect("a step"), key, v));
            }
        }
    }
    found
}

/// The largest relative difference between two logs over the steps of `b` (which must all
/// be in `a`).
pub fn worst_relative_difference(
    a: &[(u64, &'static str, f64)],
    b: &[(u64, &'static str, f64)],
) -> f64 {
    let mut worst = 0.0f64;
    for (step, key, value) in b {
        let (_, _, reference) = a
            .iter()
            .find(|(s, k, _)| s == step && k == key)
            .unwrap_or_else(|| panic!("step {step} {key} missing from the reference"));
        worst = worst.max((value - reference).abs() / reference.abs());
    }
    worst
}

/// The largest absolute difference between two tensors of one shape, in f32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let largest = (a - b).and_then(|d| d.abs()?.max_all());
    largest.and_then(|m| m.to_scalar()).unwrap()
}

/// `items` as owned strings, for argument lists.
pub fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The test model's arguments followed by `extra`.
pub fn test_model(extra: &[&str]) -> Vec<String> {
    strings(&[&TEST_MODEL[..], extra].concat())
}

/// A small Adam-mini + BSFA run of the test model on the CPU ([`SMALL_BSFA`]: projecting
/// from step 4), evaluated and checkpointed every 10 steps, into `out`.
pub fn small_bsfa_run(out: &Path, steps: usize, extra: &[&str]) -> Vec<String> {
    bsfa_run(out, steps, &[&TEST_MODEL[..], extra].concat())
}

/// [`small_bsfa_run`] of the model `extra` picks (`--model`).
pub fn bsfa_run(out: &Path, steps: usize, extra: &[&str]) -> Vec<String> {
    let steps = steps.to_string();
    let out = out.display().to_string();
    let flags = [
        "--eval-every",
        "10",
        "--checkpoint-every",
        "10",
        "--optimizer",
        "adam-mini",
        "--bsfa",
        "--device",
        "cpu",
        "--dist-timeout",
        "60",
        "--steps",
        &steps,
        "--out",
        &out,
    ];
    strings(&[&SMALL_BSFA[..], &flags, extra].concat())
}

/// The test model's config for an in-process run writing into `out`, with `sets`
/// (`key=value`) applied; evaluated only after the last step.
pub fn small_config(out: &Path, sets: &[&str]) -> RunConfig {
    let mut b = ConfigBuilder::new("test").unwrap();
    b.apply_set("train.eval_every=0").unwrap();
    for s in sets {
        b.apply_set(s).unwrap();
    }
    b.apply_set(&format!("train.out=\"{}\"", out.display()))
        .unwrap();
    b.build().unwrap()
}

/// The parameters and optimizer that `config` (on `device`) builds, restored from the
/// checkpoint `ck`, as a resumed run has them before its first step.
pub fn restored(
    config: &RunConfig,
    device: &candle_core::Device,
    ck: &bsfa_train::checkpoint::Checkpoint,
) -> (Vec<bsfa_train::model::Param>, bsfa_train::optim::Stack) {
    use bsfa_train::dist::{Communicator, SingleRank};
    use bsfa_train::{optim, task};
    let params = task::params(config, device).unwrap();
    let blocks = match config.optimizer.name {
        optim::OptimizerName::AdamMini => task::adam_mini_blocks(config, &params).unwrap(),
        optim::OptimizerName::AdamW => Vec::new(),
    };
    let comm: std::sync::Arc<dyn Communicator> = std::sync::Arc::new(SingleRank);
    let mut optimizer =
        optim::build(&config.optimizer, &config.bsfa, &params, &blocks, &comm).unwrap();
    ck.restore(&params, &mut optimizer).unwrap();
    (params, optimizer)
}

/// Records the checksum of the checkpoint `ckpt`'s file `file`, which a test changed, in its
/// trainer.json, as `save` would have: the change then meets the checks behind the checksum.
pub fn restamp(ckpt: &Path, file: &str) {
    let sum = bsfa_train::checkpoint::checksum(&ckpt.join(file)).unwrap();
    let trainer = ckpt.join("trainer.json");
    let mut state = read_json(&trainer);
    state["checksums"][file] = sum.into();
    std::fs::write(&trainer, serde_json::to_string_pretty(&state).unwrap()).unwrap();
}

/// The three commands that load a checkpoint, for `checkpoint` (a folder): `eval` on the
/// built-in corpus, `export` into `export_to`, and a two-token `sample`.
pub fn loading_commands<'a>(checkpoint: &'a str, export_to: &'a str) -> [Vec<&'a str>; 3] {
    [
        vec!["eval", "--checkpoint", checkpoint, "--data", "builtin"],
        vec!["export", "--checkpoint", checkpoint, "--out", export_to],
        vec![
            "sample",
            "--checkpoint",
            checkpoint,
            "--prompt",
            "a",
            "--max-new-tokens",
            "2",
        ],
    ]
}
