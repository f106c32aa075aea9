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

/// The runs `gpu_perf_model.py --json` predicts, under each path.
const RUNS: [&str; 6] = [
    "bench_adamw",
    "bench_adam_mini_bsfa_f32",
    "bench_adam_mini_bsfa_4bit",
    "preset_adamw",
    "preset_adam_mini_bsfa_f32",
    "preset_adam_mini_bsfa_4bit",
];
/// The code paths, slowest first: candle's ops only, the code today, every fusion planned.
const PATHS: [&str; 3] = ["reference", "now", "planned"];

/// A run's milliseconds per step and peak GiB.
type StepAndPeak = (f64, f64);

/// `gpu_perf_model.py --json`: its whole stdout must be one JSON object.
fn predictions() -> Result<Value> {
    let out = Command::new("python3")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["scripts/gpu_perf_model.py", "--json"])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).context("--json printed more than one JSON object")
}

/// `v[key]` as a number, or a problem naming `at`.
fn number(v: &Value, key: &str, at: &str) -> Result<f64, String> {
    v.get(key)
        .and_then(Value::as_f64)
        .ok_or_else(|| format!("{at}: no number {key}"))
}

/// The model, micro-batch, type and GPU of a `--json` object, or what is wrong with them.
fn header_problem(p: &Value) -> Result<(), String> {
    if p["model"] != "llama134m" || p["micro_batch"] != 12 || p["dtype"] != "bf16" {
        return Err(format!(
            "not llama134m at micro-batch 12 in bf16: {} {} {}",
            p["model"], p["micro_batch"], p["dtype"]
        ));
    }
    let gpu = &p["gpu"];
    if !gpu["name"].is_string() {
        return Err("gpu: no name".into());
    }
    let (memory, usable) = (
        number(gpu, "memory_gib", "gpu")?,
        number(gpu, "usable_gib", "gpu")?,
    );
    if !(0.0 < usable && usable <= memory) {
        return Err(format!("gpu: usable {usable} GiB of {memory}"));
    }
    Ok(())
}

/// Peak FLOP/s, model FLOPs per token, tokens per micro-batch, micro-batches per preset
/// step and usable GiB of a `--json` object.
fn figures_of(p: &Value) -> Result<[f64; 5], String> {
    Ok([
        number(&p["gpu"], "peak_bf16_tflops", "gpu")? * 1e12,
        number(p, "model_flops_per_token", "top level")?,
        number(p, "micro_batch", "top level")? * number(p, "seq_len", "top level")?,
        number(p, "micro_batches_per_preset_step", "top level")?,
        number(&p["gpu"], "usable_gib", "gpu")?,
    ])
}

/// Tokens per step, ms per step, MFU and peak GiB of one run at `at`.
fn run_figures(r: &Value, at: &str) -> Result<[f64; 4], String> {
    Ok([
        number(r, "tokens_per_step", at)?,
        number(r, "ms_per_step", at)?,
        number(r, "mfu_percent", at)?,
        number(r, "peak_gib", at)?,
    ])
}

/// What is wrong with a `--json` object, in words: a key missing or of the wrong type, or
/// figures that disagree with each other (MFU with the step time, tokens/s, the fit with
/// the peak, a later path slower or larger than an earlier one). Checks no figure itself:
/// the model's numbers may move, its arithmetic may not.
fn prediction_problems(p: &Value) -> Vec<String> {
    let mut problems: Vec<String> = header_problem(p).err().into_iter().collect();
    let [peak, flops, tokens, micro_batches, usable] = match figures_of(p) {
        Ok(h) => h,
        Err(e) => {
            problems.push(e);
            return problems;
        }
    };
    let mut last: Option<(&str, Vec<Option<StepAndPeak>>)> = None;
    for path in PATHS {
        let mut figures = Vec::new();
        for run in RUNS {
            let at = format!("{path}.{run}");
            let r = &p[path][run];
            let [step_tokens, ms, mfu, gib] = match run_figures(r, &at) {
                Ok(f) => f,
                Err(e) => {
                    problems.push(e);
                    figures.push(None);
                    continue;
                }
            };
            let want = if run.starts_with("bench") {
                1.0
            } else {
                micro_batches
            } * tokens;
            if step_tokens != want {
                problems.push(format!("{at}: {step_tokens} tokens per step, not {want}"));
            }
            let secs = ms / 1e3;
            let expected = flops * step_tokens / secs / peak * 100.0;
            if !(ms > 0.0 && (mfu - expected).abs() <= 0.01 + 1e-3 * expected) {
                problems.push(format!(
                    "{at}: MFU {mfu}% but model FLOPs / (time x peak) = {expected:.3}%"
                ));
            }
            match number(r, "tokens_per_s", &at) {
                Ok(tps) if (tps - step_tokens / secs).abs() <= 1.0 + 1e-4 * tps => {}
                Ok(tps) => problems.push(format!("{at}: {tps} tokens/s in {ms} ms")),
                Err(e) => problems.push(e),
            }
            match r["fits_80gb"].as_bool() {
                // the peak is rounded to 0.01 GiB, the verdict is not
                Some(fits) if fits == (gib <= usable) || (gib - usable).abs() < 0.01 => {}
                Some(fits) => problems.push(format!("{at}: fits_80gb {fits} at {gib} GiB")),
                None => problems.push(format!("{at}: no fits_80gb")),
            }
            figures.push(Some((ms, gib)));
        }
        if let Some((before, earlier)) = &last {
            for ((run, was), now) in RUNS.iter().zip(earlier).zip(&figures) {
                if let (Some((ms0, gib0)), Some((ms, gib))) = (was, now) {
                    if ms > ms0 || gib > gib0 {
                        problems.push(format!(
                            "{path}.{run}: {ms} ms, {gib} GiB, above {before}'s {ms0} ms, \
                             {gib0} GiB"
                        ));
                    }
                }
            }
        }
        last = Some((path, figures));
    }
    problems
}

/// `--json` prints one object whose figures agree with each other; the check catches a key
/// dropped and an MFU that is not the step time's, so it can fail.
#[test]
fn json_predictions_are_consistent() -> Result<()> {
    let p = predictions()?;
    let problems = prediction_problems(&p);
    assert!(problems.is_empty(), "{problems:#?}\n{p:#}");
    for path in PATHS {
        let r = &p[path];
        println!(
            "{path}: bench AdamW {} ms, {}% MFU; bench Adam-mini + BSFA f32 {} ms, {}% MFU, \
             peak {} GiB",
            r["bench_adamw"]["ms_per_step"],
            r["bench_adamw"]["mfu_percent"],
            r["bench_adam_mini_bsfa_f32"]["ms_per_step"],
            r["bench_adam_mini_bsfa_f32"]["mfu_percent"],
            r["bench_adam_mini_bsfa_f32"]["peak_gib"]
        );
    }

    let mut dropped = p.clone();
    dropped["now"]["bench_adamw"]
        .as_object_mut()
        .context("now.bench_adamw")?
        .remove("peak_gib");
    assert!(!prediction_problems(&dropped).is_empty());
    let mut wrong = p.clone();
    let mfu = wrong["planned"]["bench_adamw"]["mfu_percent"]
        .as_f64()
        .context("mfu")?;
    wrong["planned"]["bench_adamw"]["mfu_percent"] = json!(mfu * 1.1);
    assert!(!prediction_problems(&wrong).is_empty());
    Ok(())
}
