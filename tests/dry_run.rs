//! `--dry-run` as a user meets it: the presets' parameter groups, the config the paper's
//! presets resolve to (with and without BSFA, and under what the user sets), the config a
//! run writes, and the micro-batch that fits a GPU; an unprepared paper dataset offline; and
//! sizes no machine holds, refused before anything is allocated.

mod common;

use common::{command, fails_with, ok, read_json, run, stderr, test_model};

#[test]
fn dry_run_reports_parameter_groups_of_the_presets() {
    for (model, lo, hi) in [
        ("llama72m", 72e6 * 0.98, 72e6 * 1.02),
        ("llama134m", 134e6 * 0.98, 134e6 * 1.02),
    ] {
        let o = ok(run(&["--model", model, "--dry-run"]));
        let report: serde_json::Value =
            serde_json::from_str(String::from_utf8(o.stdout).unwrap().trim()).unwrap();
        let p = &report["params"];
        let total = p["total"].as_f64().unwrap();
        assert!(total > lo && total < hi, "{model}: {total} parameters");
        let groups: f64 = ["embeddings", "attention", "mlp", "norms", "head"]
            .iter()
            .map(|g| p[g].as_f64().unwrap())
            .sum();
        assert_eq!(groups, total);
        assert!(report["memory_bytes"]["total_estimate"].as_f64().unwrap() > total * 16.0);
        // AdamW keeps two floats per parameter; Adam-mini one and a few per-block means.
        let state = &report["memory_bytes"]["optimizer_state_by_optimizer"];
        assert_eq!(state["adamw"].as_f64().unwrap(), total * 8.0);
        let mini = state["adam-mini"].as_f64().unwrap();
        assert!(mini > total * 4.0 && mini < total * 4.02, "{model}: {mini}");
        // BSFA keeps history + rank vectors of every norm, attention and MLP block.
        let covered = ["attention", "mlp", "norms"]
            .iter()
            .map(|g| p[g].as_f64().unwrap())
            .sum::<f64>();
        let b = &report["config"]["bsfa"];
        let rows = b["history"].as_f64().unwrap() + b["rank"].as_f64().unwrap();
        assert_eq!(state["bsfa_extra"].as_f64().unwrap(), covered * rows * 4.0);
    }
}

/// The `config` object of a `--dry-run`'s JSON line.
fn dry_run_config(args: &[&str]) -> serde_json::Value {
    let o = run(&[args, &["--dry-run"]].concat());
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    let report: serde_json::Value =
        serde_json::from_str(String::from_utf8(o.stdout).unwrap().trim()).unwrap();
    report["config"].clone()
}

#[test]
fn paper_presets_with_bsfa_resolve_to_the_papers_method() {
    // (preset, gamma, dataset, BSFA steps, baseline steps): section 5.2 and Appendix A.3.
    for (model, gamma, dataset, steps, baseline_steps) in [
        ("llama72m", 4.0, "wikitext103", 50_000, 100_000),
        ("llama134m", 2.0, "openwebtext", 50_000, 100_000),
    ] {
        let c = dry_run_config(&["--model", model, "--bsfa"]);
        assert_eq!(c["optimizer"]["name"], "adam-mini", "{model}");
        let b = &c["bsfa"];
        assert_eq!(b["enabled"], true);
        assert_eq!(
            (&b["rank"], &b["history"], &b["interval"]),
            (&50.into(), &60.into(), &10.into()),
            "{model}"
        );
        assert_eq!(
            (b["alpha"].as_f64(), b["gamma"].as_f64()),
            (Some(0.5), Some(gamma))
        );
        assert_eq!(c["data"]["train"], dataset);
        assert_eq!(c["data"]["tokenizer"], "gpt2");
        assert_eq!(c["train"]["steps"], steps);
        // The CPU computes in f32; `auto` is resolved in what the dry run shows.
        assert_eq!(c["train"]["dtype"], "f32");
        let baseline = dry_run_config(&["--model", model]);
        assert_eq!(baseline["optimizer"]["name"], "adamw");
        assert_eq!(baseline["bsfa"]["enabled"], false);
        assert_eq!(baseline["train"]["steps"], baseline_steps);
        assert_eq!(baseline["data"]["train"], dataset);
    }
    let vit = dry_run_config(&["--model", "vit-s16", "--bsfa"]);
    assert_eq!(vit["optimizer"]["name"], "adam-mini");
    assert_eq!(vit["bsfa"]["gamma"].as_f64(), Some(3.0));
    assert_eq!(vit["bsfa"]["rank"], 50);
}

#[test]
fn what_the_user_sets_overrides_the_presets_bsfa_layer() {
    let c = dry_run_config(&["--model", "llama72m", "--bsfa", "--optimizer", "adamw"]);
    assert_eq!(c["optimizer"]["name"], "adamw");
    assert_eq!(c["bsfa"]["rank"], 50, "the rest of the layer still applies");
    let c = dry_run_config(&[
        "--model",
        "llama72m",
        "--bsfa",
        "--set",
        "bsfa.gamma=3",
        "--steps",
        "7",
    ]);
    assert_eq!(
        (c["bsfa"]["gamma"].as_f64(), &c["train"]["steps"]),
        (Some(3.0), &7.into())
    );
    // Enabled through --set instead of --bsfa: the same layer.
    let c = dry_run_config(&["--model", "llama134m", "--set", "bsfa.enabled=true"]);
    assert_eq!(
        (c["optimizer"]["name"].as_str(), c["bsfa"]["gamma"].as_f64()),
        (Some("adam-mini"), Some(2.0))
    );
    // A config file's choice of optimizer is the user's too.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("run.json");
    std::fs::write(&file, r#"{"optimizer": {"name": "adamw"}}"#).unwrap();
    let c = dry_run_config(&[
        "--model",
        "llama72m",
        "--bsfa",
        "--config",
        file.to_str().unwrap(),
    ]);
    assert_eq!(c["optimizer"]["name"], "adamw");
}

#[test]
fn dry_run_config_is_what_config_json_holds() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let args = test_model(&["--bsfa", "--steps", "2", "--out", out]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let shown = dry_run_config(&args);
    ok(run(&args));
    let written = read_json(&dir.path().join("config.json"));
    assert_eq!(shown, written);
}

#[test]
fn an_unprepared_paper_dataset_offline_stops_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    for (model, dataset) in [("llama72m", "wikitext103"), ("llama134m", "openwebtext")] {
        let o = command()
            .args(["--model", model, "--bsfa", "--steps", "1", "--out"])
            .arg(&out)
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_HOME", dir.path().join("hf"))
            .output()
            .unwrap();
        let err = stderr(&o);
        assert!(!o.status.success() && !err.contains("panicked"), "{err}");
        for needle in [
            format!("dataset '{dataset}'"),
            format!("bsfa-train prepare --data {dataset} --tokenizer gpt2"),
            "--data text:".into(),
            "--data builtin".into(),
        ] {
            assert!(
                err.contains(&needle),
                "{model}: expected '{needle}' in: {err}"
            );
        }
        assert!(!out.join("metrics.jsonl").exists(), "nothing trained");
    }
}

/// `--dry-run --gpu-memory` reports the measured GPU peak and the largest micro-batch that
/// fits the budget, in its JSON line; a budget below the fixed part fits nothing; a budget
/// that is not a positive number is refused.
#[test]
fn dry_run_suggests_a_micro_batch_that_fits_the_gpu() {
    let gpu_memory = |gib: f64| -> serde_json::Value {
        let o = ok(run(&[
            "--dry-run",
            "--gpu-memory",
            &gib.to_string(),
            "--batch-size",
            "32",
        ]));
        let line = String::from_utf8(o.stdout).unwrap();
        let report: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        report["gpu_memory"].clone()
    };
    let gib = 1073741824.0;
    let roomy = gpu_memory(4.0);
    let number = |v: &serde_json::Value, key: &str| v[key].as_f64().unwrap();
    let (fixed, step) = (number(&roomy, "fixed_bytes"), number(&roomy, "step_bytes"));
    let per_sequence = number(&roomy, "per_sequence_bytes");
    assert!(per_sequence > 0.0 && fixed > gib, "{roomy}");
    assert_eq!(roomy["largest_micro_batch"], 32);
    assert_eq!(roomy["fits"], true);
    // Room for 5.5 sequences within 95% of the budget: 4 is the largest divisor of 32 that fits.
    let budget = (fixed + step - per_sequence * (32.0 - 5.5)) / 0.95;
    let tight = gpu_memory(budget / gib);
    assert_eq!(tight["largest_micro_batch"], 4, "{tight}");
    assert_eq!(tight["fits"], false);
    assert!(gpu_memory(0.5)["largest_micro_batch"].is_null());
    fails_with(
        &["--dry-run", "--gpu-memory", "0"],
        "--gpu-memory must be a positive",
    );
}

/// Huge sizes from the command line are refused before anything is allocated, stating the
/// memory needed and the memory there is (or that the sizes overflow 64-bit arithmetic),
/// not aborted by the allocator.
#[test]
fn sizes_beyond_the_machine_are_refused_with_the_memory_they_need() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out = out.to_str().unwrap();
    for (set, needles) in [
        (
            "model.vocab_size=100000000000",
            &[
                "training this model needs at least",
                "TiB",
                "gradients",
                "MemTotal",
            ][..],
        ),
        (
            "model.hidden_size=4000000000",
            &["overflows 64-bit arithmetic"][..],
        ),
        (
            "train.batch_size=1000000000000",
            &["needs at least", "activations of one micro-batch", "PiB"][..],
        ),
    ] {
        let args = test_model(&["--steps", "1", "--set", set, "--out", out]);
        let o = run(&args);
        let err = stderr(&o);
        assert!(!o.status.success(), "{set}: {err}");
        assert!(!err.contains("memory allocation"), "{set}: {err}");
        for needle in needles {
            assert!(err.contains(needle), "{set}: {err}");
        }
    }
}

/// The parameter count the memory check uses, from the shape alone, is the built model's.
#[test]
fn parameter_counts_from_the_shape_match_the_built_models() {
    use bsfa_train::config::ConfigBuilder;
    use bsfa_train::model::ParamCounts;
    for (preset, sets) in [
        ("test", &[][..]),
        (
            "test",
            &[
                "model.tie_word_embeddings=true",
                "model.num_key_value_heads=2",
            ][..],
        ),
        ("vit-tiny", &[][..]),
    ] {
        let mut builder = ConfigBuilder::new(preset).unwrap();
        for set in sets {
            builder.apply_set(set).unwrap();
        }
        let config = builder.build().unwrap();
        let params = bsfa_train::task::params(&config, &candle_core::Device::Cpu).unwrap();
        let built = ParamCounts::of(&params).total;
        assert_eq!(
            config.spec().parameter_count(),
            Some(built),
            "{preset} {sets:?}"
        );
    }
}
