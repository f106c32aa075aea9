//! MFU and memory in every metrics line: FLOPs per token by nanoGPT's count (checked against
//! the model's shapes by hand), achieved TFLOP/s and MFU consistent with the logged
//! throughput and the stated peak, memory readings present.

use serde_json::Value;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_bsfa-train");

fn run(out: &std::path::Path, extra: &[&str]) -> (Value, Vec<Value>) {
    let output = Command::new(BIN)
        .args([
            "--set",
            "model.vocab_size=256",
            "--set",
            "model.hidden_size=64",
            "--set",
            "model.num_hidden_layers=2",
            "--set",
            "model.num_attention_heads=4",
            "--set",
            "model.intermediate_size=172",
            "--set",
            "model.tie_word_embeddings=false",
            "--batch-size",
            "4",
            "--seq-len",
            "64",
            "--steps",
            "6",
            "--log-every",
            "2",
            "--eval-batches",
            "1",
            "--out",
        ])
        .arg(out)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let summary = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let lines = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &Value| r.get("loss").is_some())
        .collect();
    (summary, lines)
}

#[test]
fn metrics_lines_carry_mfu_against_the_stated_peak_and_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (summary, lines) = run(&dir.path().join("given"), &["--peak-tflops", "0.5"]);
    // Non-embedding parameters: per layer q, k, v, o (4 x 64 x 64), SwiGLU (3 x 64 x 172)
    // and two norms (2 x 64); the final norm (64) and the untied head (256 x 64).
    let n = 2 * (4 * 64 * 64 + 3 * 64 * 172 + 2 * 64) + 64 + 256 * 64;
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
    let (summary, lines) = run(&dir.path().join("measured"), &[]);
    let source = summary["peak_tflops_source"].as_str().unwrap();
    assert!(source.starts_with("measured"), "{source}");
    let peak = summary["peak_tflops"].as_f64().unwrap();
    assert!(peak > 0.0 && lines.iter().all(|l| l["mfu"].as_f64().unwrap() > 0.0));
}
