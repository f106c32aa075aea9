//! The GPU performance model on paper (`scripts/gpu_perf_model.py`) against the code it
//! models: the loss of one micro-batch is built as a CUDA run builds it (the `reference`
//! ops, bf16, through the model spec's `build`, as training builds it), its backprop graph and the gradient
//! store of its backward are traced (`bsfa_train::model::graph`), and the model must build
//! the same graph node by node at the same shapes: `tiny`, and llama134m's widths (the
//! model's own workload) at a short sequence. The model's llama134m workload (micro-batch,
//! sequence, batch, BSFA's k, l, T and groups) must be the preset's.
//!
//! `train.kernels = reference` is process-wide, so this file holds only tests that want it.

use anyhow::{Context, Result};
use bsfa_train::config::ConfigBuilder;
use bsfa_train::model::graph::{graph_nodes, stored_gradients};
use bsfa_train::task::adam_mini_blocks;
use candle_core::Device;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Output};

/// The candle-core release Cargo.lock pins: the backward rules the model replays are its.
fn candle_version() -> Result<String> {
    let lock = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.lock"))?;
    let mut lines = lock.lines();
    lines
        .find(|l| *l == "name = \"candle-core\"")
        .and_then(|_| lines.next())
        .and_then(|l| l.strip_prefix("version = \""))
        .map(|v| v.trim_end_matches('"').to_string())
        .context("no candle-core in Cargo.lock")
}

/// The graph and gradients of one micro-batch of preset `preset` with the `--set`
/// assignments `sets`, in bf16 on the reference ops, as the model's check reads them.
fn trace(preset: &str, sets: &[&str]) -> Result<Value> {
    let mut builder = ConfigBuilder::new(preset)?;
    for set in ["train.dtype=bf16", "train.kernels=reference"]
        .iter()
        .chain(sets)
    {
        builder.apply_set(set)?;
    }
    let config = builder.build()?;
    let device = Device::Cpu;
    config.train.set_compute(&device)?;
    let spec = config.spec();
    let (model, params) = spec.build(config.train.seed, config.train.dtype, &device)?;
    let (batch, seq) = (config.train.micro_batch(), config.train.seq_len);
    // The ids' values change no shape: zeros serve as inputs and targets.
    let (inputs, targets) = spec.probe_batch(batch, seq, &device)?;
    // train/step.rs weights each micro-batch's loss before its backward.
    let root = (model.loss(&inputs, &targets)? * 1.0)?;
    let nodes = graph_nodes(&root);
    let gradients = stored_gradients(&root.backward()?, &params);
    let blocks = adam_mini_blocks(&config, &params)?;
    let m = &config.model;
    Ok(json!({
        "preset": preset,
        "candle": candle_version()?,
        "dims": {"B": batch, "T": seq, "C": m.hidden_size, "H": m.num_attention_heads,
                 "KV": m.kv_heads(), "I": m.intermediate_size, "V": m.vocab_size,
                 "L": m.num_hidden_layers},
        "workload": workload(preset)?,
        "nodes": nodes,
        "gradients": gradients,
        "params": params.iter().zip(blocks).map(|(p, block)| json!({
            "name": p.name, "shape": p.var.dims(), "group": p.group, "adam_mini_block": block,
        })).collect::<Vec<_>>(),
    }))
}

/// The workload of preset `preset` the model's tables are for: its micro-batch, sequence,
/// micro-batches per optimizer step and BSFA's settings (its `with_bsfa` layer applied).
fn workload(preset: &str) -> Result<Value> {
    let mut builder = ConfigBuilder::new(preset)?;
    builder.apply_set("bsfa.enabled=true")?;
    let config = builder.build()?;
    let (train, bsfa) = (&config.train, &config.bsfa);
    Ok(json!({
        "B": train.micro_batch(), "T": train.seq_len,
        "micro_batches": train.batch_size / train.micro_batch(),
        "bsfa_rank": bsfa.rank, "bsfa_history": bsfa.history, "bsfa_interval": bsfa.interval,
        "bsfa_groups": bsfa.groups(),
    }))
}

/// `gpu_perf_model.py --check-inventory` over `traces`.
fn check(dir: &Path, name: &str, traces: &Value) -> Result<Output> {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_string(traces)?)?;
    Ok(Command::new("python3")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["scripts/gpu_perf_model.py", "--check-inventory"])
        .arg(&path)
        .output()?)
}

/// The model builds the graph the code builds, node for node, and leaves the same
/// gradients; a trace with one kernel fewer is caught, so the check can fail.
#[test]
fn model_builds_the_traced_graph() -> Result<()> {
    let traces = json!([
        trace("tiny", &["train.micro_batch_size=2", "train.seq_len=8"])?,
        trace(
            "llama134m",
            &["train.micro_batch_size=2", "train.seq_len=16"]
        )?,
    ]);
    let dir = tempfile::tempdir()?;
    let out = check(dir.path(), "traces.json", &traces)?;
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{report}");

    let mut broken = json!([traces[0].clone()]);
    let nodes = broken[0]["nodes"].as_array_mut().context("nodes")?;
    let fresh = nodes
        .iter()
        .position(|n| n["origin"] == "fresh")
        .context("no kernel")?;
    nodes.remove(fresh);
    let out = check(dir.path(), "broken.json", &broken)?;
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() && report.contains("DRIFT"),
        "{report}"
    );
    Ok(())
}
