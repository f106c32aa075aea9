//! MFU and memory in every metrics line: FLOPs per token by nanoGPT's count (checked against
//! the model's shapes by hand), achieved TFLOP/s and MFU consistent with the logged
//! throughput and the stated peak, memory readings present.

mod common;

use common::{ok_summary, records, run, test_model};
use serde_json::Value;

/// A 6-step run of the test model into `out` with `extra` flags: its summary and its
/// training lines (every other step's and the first).
fn run_test_model(out: &std::path::Path, extra: &[&str]) -> (Value, Vec<Value>) {
    let flags = [
        "--steps",
        "6",
        "--log-every",
        "2",
        "--out",
        out.to_str().unwrap(),
    ];
    let summary = ok_summary(run(&test_model(&[&flags[..], extra].concat())));
    let lines = records(out)
        .into_iter()
        .filter(|r| r.get("loss").is_some())
        .collect();
    (summary, lines)
}

#[test]
fn metrics_lines_carry_mfu_against_the_stated_peak_and_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (summary, lines) = run_test_model(&dir.path().join("given"), &["--peak-tflops", "0.5"]);
    // Non-embedding parameters of the test model: per layer q, k, v, o (4 x 64 x 64), SwiGLU
    // (3 x 64 x 172) and two norms (2 x 64); the final norm (64) and the untied head
    // (256 x 64).
    let n = 2 * (4 * 64 * 64 + 3 * 64 * 172 + 2 * 64) + 64 + 256 * 64;
    // Attention: 12 x layers x hidden x sequence length (64).
    let expected = 6.0 * n as f64 + 12.0 * 2.0 * 64.0 * 64.0;
    assert_eq!(summary["flops_per_token"].as_f64().unwrap(), expected);
    assert_eq!(summary["peak_tflops"].as_f64().unwrap(), 0.5);
    assert_eq!(summary["peak_tflops_source"], "--peak-tflops");
    assert_eq!(lines.len(), 4, "steps 1, 2, 4, 6");
    for line in &lines {
        let tflops = expected * line["tokens_per_s"].as_f64().unwrap() / 1e12;
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs();
        assert!(close(line["tflops"].as_f64().unwrap(), tflops), "{line}");
        assert!(close(line["mfu"].as_f64().unwrap(), tflops / 0.5), "{line}");
        let (now, peak) = (
            line["mem_mib"].as_f64().unwrap(),
            line["peak_mem_mib"].as_f64().unwrap(),
        );
        assert!(now > 10.0 && peak >= now, "{line}");
    }
    let mfu = summary["mfu"].as_f64().unwrap();
    let mean = expected * summary["tokens_per_s"].as_f64().unwrap() / 0.5e12;
    assert!((mfu - mean).abs() <= 1e-9 * mean, "{mfu} vs {mean}");

    // Without --peak-tflops, the CPU's peak is measured, and said to be.
    let (summary, lines) = run_test_model(&dir.path().join("measured"), &[]);
    let source = summary["peak_tflops_source"].as_str().unwrap();
    assert!(source.starts_with("measured"), "{source}");
    let peak = summary["peak_tflops"].as_f64().unwrap();
    assert!(peak > 0.0 && lines.iter().all(|l| l["mfu"].as_f64().unwrap() > 0.0));
}
