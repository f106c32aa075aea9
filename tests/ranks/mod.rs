//! Helpers of the tests that start jobs of several ranks: the small run they all train,
//! and ways to start, watch and read it.
// Each test crate uses its own part of these helpers.
#![allow(dead_code)]

use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_bsfa-train");

/// A small Adam-mini + BSFA run whose projection starts at step 4 (rank 3 < history 6).
pub fn args(out: &Path, steps: usize, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--set",
        "model.hidden_size=64",
        "--set",
        "model.num_hidden_layers=2",
        "--set",
        "model.intermediate_size=172",
        "--batch-size",
        "8",
        "--seq-len",
        "64",
        "--eval-every",
        "10",
        "--eval-batches",
        "2",
        "--log-every",
        "1",
        "--checkpoint-every",
        "10",
        "--optimizer",
        "adam-mini",
        "--bsfa",
        "--set",
        "bsfa.rank=3",
        "--set",
        "bsfa.history=6",
        "--set",
        "bsfa.interval=4",
        "--device",
        "cpu",
        "--dist-timeout",
        "60",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(["--steps".into(), steps.to_string()]);
    a.extend(["--out".into(), out.display().to_string()]);
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// Runs the binary to the end.
pub fn run(args: &[String]) -> Output {
    Command::new(BIN).args(args).output().expect("binary runs")
}

/// `o`, after checking the run succeeded (showing its stderr if not).
pub fn ok(o: Output) -> Output {
    assert!(
        o.status.success(),
        "status {:?}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// The summary JSON (the last stdout line).
pub fn summary(o: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(stdout.lines().last().expect("a summary line")).expect("JSON summary")
}

/// `(step, key, value)` of every loss and val_loss in metrics.jsonl.
pub fn logged(out: &Path) -> Vec<(u64, &'static str, f64)> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).expect("metrics.jsonl");
    let mut found = Vec::new();
    for line in text.lines() {
        let r: Value = serde_json::from_str(line).expect("a JSON line");
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

/// Waits for `child`, killing it after `limit`; returns its output and how long it ran.
pub fn wait_bounded(child: Child, limit: Duration) -> (Output, Duration) {
    let started = Instant::now();
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(limit);
        // The test fails on the elapsed time below; this only ends a hang.
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    });
    let output = child.wait_with_output().expect("the job ends");
    drop(watchdog);
    (output, started.elapsed())
}

/// Starts the binary with extra environment variables, its output captured.
pub fn spawn(args: &[String], envs: &[(&str, String)]) -> Child {
    Command::new(BIN)
        .args(args)
        .envs(envs.iter().map(|(k, v)| (*k, v.clone())))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary starts")
}

/// Lines in the run's metrics.jsonl so far.
pub fn logged_steps(out: &Path) -> usize {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// A TCP port free right now, for a job's rank 0.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    listener.local_addr().unwrap().port()
}
