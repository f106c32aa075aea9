//! ViT runs as users start them: `--model vit-tiny` on the built-in images learns, logs
//! top-1/top-5, resumes exactly, and follows the one-process run on two ranks.

mod common;

use bsfa_train::config::{ConfigBuilder, RunConfig};
use bsfa_train::train;
use common::{ok, records, run, strings, SMALL_BSFA};
use serde_json::Value;
use std::path::Path;

fn vit_tiny(out: &Path, sets: &[&str]) -> RunConfig {
    let mut b = ConfigBuilder::new("vit-tiny").unwrap();
    for s in sets {
        b.apply_set(s).unwrap();
    }
    b.apply_set(&format!("train.out=\"{}\"", out.display()))
        .unwrap();
    b.build().unwrap()
}

#[test]
fn vit_tiny_learns_synthetic_images_with_adam_mini_bsfa() {
    let dir = tempfile::tempdir().unwrap();
    let config = vit_tiny(
        dir.path(),
        &["optimizer.name=adam-mini", "bsfa.enabled=true"],
    );
    let summary = train::run(&config, None).unwrap();
    let evals: Vec<Value> = records(dir.path())
        .into_iter()
        .filter(|r| r.get("val_top1").is_some())
        .collect();
    for r in &evals {
        eprintln!(
            "step {}: val_loss {:.4} top-1 {:.3} top-5 {:.3}",
            r["step"], r["val_loss"], r["val_top1"], r["val_top5"]
        );
        let (top1, top5) = (
            r["val_top1"].as_f64().unwrap(),
            r["val_top5"].as_f64().unwrap(),
        );
        assert!((0.0..=1.0).contains(&top1) && top1 <= top5 && top5 <= 1.0);
    }
    assert_eq!(evals.len(), 4, "evaluations at 50, 100, 150, 200");
    let top1 = summary.final_val_top1.unwrap();
    // Ten classes: chance is 10%.
    assert!(top1 > 0.35, "top-1 {top1} after 200 steps");
    assert!(
        summary.final_val_loss < 0.8 * 10f64.ln(),
        "{}",
        summary.final_val_loss
    );
    assert_eq!(
        summary.final_val_top1,
        evals.last().unwrap()["val_top1"].as_f64()
    );
}

#[test]
fn vit_resume_continues_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let sets = [
        "optimizer.name=adam-mini",
        "bsfa.enabled=true",
        "bsfa.rank=3",
        "bsfa.history=6",
        "bsfa.interval=4",
        "train.batch_size=16",
        "train.log_every=1",
        "train.eval_every=10",
        "train.checkpoint_every=10",
        // The paper's augmentation, so its state is part of what must resume.
        "augment.randaugment_ops=2",
        "augment.mixup_alpha=0.2",
    ];
    let straight = dir.path().join("straight");
    let resumed = dir.path().join("resumed");
    let with_steps = |out: &Path, steps: &str| {
        let mut all = sets.to_vec();
        all.push(steps);
        vit_tiny(out, &all)
    };
    train::run(&with_steps(&straight, "train.steps=20"), None).unwrap();
    train::run(&with_steps(&resumed, "train.steps=10"), None).unwrap();
    let summary = train::run(&with_steps(&resumed, "train.steps=20"), Some("auto")).unwrap();
    assert_eq!(summary.resumed_from, Some(10));
    let strip = |rs: Vec<Value>| -> Vec<Value> {
        rs.into_iter()
            .map(|mut r| {
                let o = r.as_object_mut().unwrap();
                for timing in [
                    "tokens_per_s",
                    "step_ms",
                    "tflops",
                    "mfu",
                    "mem_mib",
                    "peak_mem_mib",
                ] {
                    o.remove(timing);
                }
                r
            })
            .collect()
    };
    assert_eq!(strip(records(&straight)), strip(records(&resumed)));

    // Another ViT shape cannot continue this checkpoint.
    let mut other = sets.to_vec();
    other.extend(["train.steps=30", "vit.intermediate_size=128"]);
    let err = train::run(&vit_tiny(&resumed, &other), Some("auto")).unwrap_err();
    let message = format!("{err:#}");
    assert!(message.contains("holds a different model"), "{message}");
    assert!(message.contains("vit.intermediate_size"), "{message}");
}

#[test]
fn vit_on_two_ranks_follows_one_rank() {
    let dir = tempfile::tempdir().unwrap();
    let args = |out: &Path, extra: &[&str]| -> Vec<String> {
        let flags = [
            "--model",
            "vit-tiny",
            "--optimizer",
            "adam-mini",
            "--bsfa",
            "--steps",
            "20",
            "--batch-size",
            "16",
            "--eval-every",
            "10",
            "--log-every",
            "1",
            "--set",
            "augment.workers=1",
            "--out",
            out.to_str().unwrap(),
        ];
        strings(&[&flags[..], &SMALL_BSFA, extra].concat())
    };
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    ok(run(&args(&one, &["--threads", "2"])));
    ok(run(&args(&two, &["--nproc-per-node", "2"])));
    let (a, b) = (records(&one), records(&two));
    assert_eq!(a.len(), b.len());
    let mut worst = 0.0f64;
    for (x, y) in a.iter().zip(&b) {
        for key in ["loss", "val_loss", "val_top1"] {
            if let (Some(p), Some(q)) = (
                x.get(key).and_then(Value::as_f64),
                y.get(key).and_then(Value::as_f64),
            ) {
                worst = worst.max((p - q).abs() / p.abs().max(1e-12));
            }
        }
    }
    eprintln!("ViT, 2 ranks vs 1: largest relative difference {worst:.3e}");
    assert!(worst < 1e-4, "{worst}");
}

#[test]
fn vit_presets_and_errors() {
    let o = run(&["--model", "vit-s16", "--dry-run"]);
    assert!(o.status.success());
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["params"]["total"], 22_050_664);
    let o = run(&["--model", "vit-tiny", "--data", "builtin"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("a ViT trains on images"));
    let o = run(&[
        "--model",
        "vit-tiny",
        "--set",
        "vit.num_classes=7",
        "--steps",
        "1",
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("has 10 classes but vit.num_classes is 7"));
}

/// Weight decay: kernels and matrices decay; biases, LayerNorm weights, the class token and
/// the position embeddings do not (as timm and big_vision).
#[test]
fn vit_weight_decay_spares_added_embeddings_and_vectors() {
    let config = bsfa_train::model::VitConfig::preset("vit-tiny").unwrap();
    let (_, params) = bsfa_train::model::Vit::new(
        &config,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
        0,
    )
    .unwrap();
    let decays = |name: &str| {
        params
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no parameter '{name}'"))
            .decays()
    };
    assert!(!decays("vit.embeddings.cls_token"));
    assert!(!decays("vit.embeddings.position_embeddings"));
    assert!(decays("vit.embeddings.patch_embeddings.projection.weight"));
    assert!(decays(
        "vit.encoder.layer.0.attention.attention.query.weight"
    ));
    assert!(!decays(
        "vit.encoder.layer.0.attention.attention.query.bias"
    ));
    assert!(!decays("vit.encoder.layer.0.layernorm_before.weight"));
    assert!(decays("classifier.weight"));
    assert!(!decays("classifier.bias"));
}
