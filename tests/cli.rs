//! The binary as a user meets it: flags, outputs, and clear errors on bad input.

mod common;

use common::data::word_tokenizer;
use common::ranks::{spawn, wait_until_logged, KillOnDrop};
use common::{
    fails, fails_with, ok, read_json, records, run, run_with, stderr, strings, test_model,
};
use std::path::Path;
use std::process::Output;

/// Runs the test model with `extra` flags.
fn run_fast(extra: &[&str]) -> Output {
    run(&test_model(extra))
}

#[test]
fn trains_and_prints_a_json_summary() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let o = ok(run_fast(&["--steps", "3", "--out", out]));
    let stdout = String::from_utf8(o.stdout).unwrap();
    let last = stdout.lines().last().unwrap();
    let summary: serde_json::Value = serde_json::from_str(last).unwrap();
    for key in [
        "steps",
        "params",
        "final_train_loss",
        "final_val_loss",
        "tokens_per_s",
        "wall_s",
        "out",
    ] {
        assert!(summary.get(key).is_some(), "summary lacks {key}: {last}");
    }
    assert_eq!(summary["steps"], 3);
    assert_eq!(summary["out"], out);
    // stdout carries only JSON.
    for line in stdout.lines() {
        serde_json::from_str::<serde_json::Value>(line).expect("stdout line is JSON");
    }
    assert!(Path::new(out).join("metrics.jsonl").exists());
    assert!(Path::new(out).join("config.json").exists());
}

#[test]
fn bad_config_input_is_a_clear_error() {
    let err = fails_with(
        &["--set", "model.hiden_size=3", "--dry-run"],
        "unknown config key",
    );
    assert!(
        err.contains("model.hidden_size"),
        "valid keys are listed: {err}"
    );
    // Each refused with a message naming the problem.
    let cases: &[(&[&str], &str)] = &[
        (&["--set", "model.hidden_size=big"], "malformed value"),
        (&["--set", "model.hidden_size"], "key=value"),
        (
            &["--set", "model.num_attention_heads=3"],
            "must divide model.hidden_size",
        ),
        (&["--set", "model.num_hidden_layers=0"], "positive integer"),
        (&["--set", "model.hidden_size=-8"], "non-negative integer"),
        (&["--steps", "-3"], "-3"),
        // NaN and infinity used to reach the config as JSON null ("malformed value null").
        (&["--lr", "NaN"], "'--lr <LR>': must be a finite number"),
        (&["--lr", "inf"], "'--lr <LR>': must be a finite number"),
        (
            &["--grad-clip=-inf"],
            "'--grad-clip <GRAD_CLIP>': must be a finite",
        ),
        (
            &["--peak-tflops", "nan"],
            "'--peak-tflops <TFLOPS>': must be a finite",
        ),
        (
            &["--lr", "-1"],
            "optimizer.lr must be a positive number, got -1",
        ),
        // Used to panic spawning the threads.
        (
            &["--threads", "100000"],
            "'--threads <THREADS>': at most 4096",
        ),
        (
            &["--set", "train.threads=100000"],
            "train.threads is 100000; at most 4096",
        ),
        (
            &["--batch-size", "0"],
            "train.batch_size must be a positive",
        ),
        (&["--model", "gpt5"], "unknown --model"),
        // Used to overflow the clock, a panic, once ranks joined.
        (
            &["--dist-timeout", "18446744073709551615"],
            "train.dist_timeout_s (--dist-timeout) is 18446744073709551615 s",
        ),
        (&["--bsfa", "--set", "bsfa.rank=60"], "below bsfa.history"),
        (&["--bsfa", "--set", "bsfa.rank=0"], "bsfa.rank"),
        (&["--bsfa", "--set", "bsfa.interval=0"], "bsfa.interval"),
        (&["--bsfa", "--set", "bsfa.gamma=-1"], "bsfa.gamma"),
        (
            &["--bsfa", "--set", "bsfa.blocks=norm,ffn"],
            "unknown block group 'ffn'",
        ),
        (
            &["--bsfa", "--set", "bsfa.bits=8"],
            "bsfa.bits must be 32 or 4, got 8",
        ),
        (
            &["--config", "/nonexistent/run.json"],
            "cannot read config file",
        ),
    ];
    for (args, needle) in cases {
        fails_with(&[*args, &["--dry-run"]].concat(), needle);
    }
}

#[test]
fn missing_or_empty_data_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let out = out.to_str().unwrap();
    fails_with(
        &["--data", "text:/nonexistent/corpus.txt", "--out", out],
        "cannot read data file '/nonexistent/corpus.txt'",
    );
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let spec = format!("text:{}", empty.display());
    fails_with(&["--data", &spec, "--out", out], "is empty");
    fails_with(
        &["--data", "wikipedia", "--out", out],
        "unknown data source",
    );
}

#[test]
fn hugging_face_tokenizer_trains_and_vocab_must_fit() {
    let dir = tempfile::tempdir().unwrap();
    // A word-level tokenizer of 300 tokens: larger than the byte vocabulary.
    let tok_path = dir.path().join("tokenizer.json");
    word_tokenizer(&tok_path, 300);
    let text: String = (0..4000).map(|i| format!("w{} ", (i * 7) % 299)).collect();
    let data = dir.path().join("words.txt");
    std::fs::write(&data, text).unwrap();
    let data = format!("text:{}", data.display());
    let tok_path = tok_path.to_str().unwrap();
    let out = dir.path().join("run");
    let out = out.to_str().unwrap();

    fails_with(
        &["--data", &data, "--tokenizer", tok_path, "--out", out],
        "smaller than the tokenizer's vocabulary (300)",
    );
    ok(run_fast(&[
        "--data",
        &data,
        "--tokenizer",
        tok_path,
        "--set",
        "model.vocab_size=320",
        "--steps",
        "2",
        "--out",
        out,
    ]));
    // The export carries the run's tokenizer.json along.
    let export = dir.path().join("hf");
    let ckpt = format!("{out}/checkpoints/step-00000002");
    ok(run(&[
        "export",
        "--checkpoint",
        &ckpt,
        "--out",
        export.to_str().unwrap(),
    ]));
    assert_eq!(
        std::fs::read(export.join("tokenizer.json")).unwrap(),
        std::fs::read(tok_path).unwrap()
    );
    fails_with(
        &["--tokenizer", "/nonexistent/tokenizer.json", "--out", out],
        "does not exist",
    );
}

#[test]
fn nan_loss_stops_with_the_step_and_keeps_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let args = test_model(&[
        "--lr",
        "1e30",
        "--warmup-steps",
        "0",
        "--steps",
        "20",
        "--log-every",
        "1",
        "--out",
        out,
    ]);
    let err = fails_with(&args, "training diverged at step");
    assert!(err.contains("Lower the learning rate"), "{err}");
    let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    assert!(
        !metrics.is_empty(),
        "metrics before the divergence are kept"
    );
    for line in metrics.lines() {
        serde_json::from_str::<serde_json::Value>(line).unwrap();
    }
}

#[test]
fn bsfa_flag_trains_and_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    ok(run_fast(&[
        "--bsfa",
        "--optimizer",
        "adam-mini",
        "--set",
        "bsfa.rank=2",
        "--set",
        "bsfa.history=3",
        "--set",
        "bsfa.interval=2",
        "--steps",
        "6",
        "--out",
        out,
    ]));
    let config = read_json(&dir.path().join("config.json"));
    assert_eq!(config["bsfa"]["enabled"], true);
    assert_eq!(config["optimizer"]["name"], "adam-mini");
    // One diagnostics line per re-estimation (after steps 2 and 4 of 0..6), per group.
    let found: Vec<serde_json::Value> = records(dir.path())
        .into_iter()
        .filter(|r| r.get("bsfa").is_some())
        .collect();
    assert_eq!(
        found
            .iter()
            .map(|r| r["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [3, 5]
    );
    for record in &found {
        let groups: Vec<&str> = record["bsfa"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| {
                let energy = g["energy"].as_f64().unwrap();
                assert!(energy > 0.0 && energy <= 1.0 + 1e-6, "{g}");
                g["group"].as_str().unwrap()
            })
            .collect();
        assert_eq!(groups, ["norm", "attn", "mlp"]);
    }
    assert!(found[0]["bsfa"][0]["overlap"].is_null());
    assert!(found[1]["bsfa"][0]["overlap"].as_f64().is_some());
}

#[test]
fn bench_prints_one_json_line_with_the_phase_split() {
    // Batches of 2 sequences of 16 tokens: the throughput below counts them.
    let args = test_model(&[
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--iters",
        "2",
        "--warmup",
        "1",
        "--loader-steps",
        "20",
    ]);
    let o = ok(run(&[&["bench".to_string()][..], &args].concat()));
    let stdout = String::from_utf8(o.stdout).unwrap();
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let ms = report["ms_per_step"].as_f64().unwrap();
    let parts: f64 = ["forward_ms", "backward_ms", "optimizer_ms"]
        .iter()
        .map(|k| report[k].as_f64().unwrap())
        .sum();
    assert!(ms > 0.0 && parts > 0.0 && parts <= ms * 1.01, "{report}");
    let tps = report["tokens_per_s"].as_f64().unwrap();
    assert!((tps - 2.0 * 16.0 / (ms / 1e3)).abs() / tps < 1e-9);
    assert!(report["peak_rss_mib"].as_f64().unwrap() > 0.0);
    let loader = report["loader_tokens_per_s"].as_f64().unwrap();
    let ratio = report["loader_vs_trainer"].as_f64().unwrap();
    assert!(
        loader > 0.0 && (ratio - loader / tps).abs() / ratio < 1e-9,
        "{report}"
    );
}

#[test]
fn trains_from_token_shards_with_their_val_split() {
    let dir = tempfile::tempdir().unwrap();
    let shards = dir.path().join("shards");
    std::fs::create_dir(&shards).unwrap();
    let text = bsfa_train::data::builtin::corpus();
    let ids: Vec<u32> = text.bytes().take(60_000).map(u32::from).collect();
    for (name, part) in [
        ("d_train_000000.bin", &ids[..25_000]),
        ("d_train_000001.bin", &ids[25_000..50_000]),
    ] {
        bsfa_train::data::shards::write(&shards.join(name), part, 256).unwrap();
    }
    let spec = format!("shards:{}", shards.display());
    let out = dir.path().join("run");
    let out = out.to_str().unwrap();
    fails_with(&["--data", &spec, "--out", out], "no '*_val_*.bin' shards");
    let val = shards.join("d_val_000000.bin");
    bsfa_train::data::shards::write(&val, &ids[50_000..], 256).unwrap();
    let o = ok(run_fast(&["--data", &spec, "--steps", "3", "--out", out]));
    assert!(
        stderr(&o).contains("on 50000 train / 10000 val tokens"),
        "{}",
        stderr(&o)
    );
    // Ids outside the model's vocabulary stop the run before training (on a GPU they would
    // be a device-side assert), naming the shard, the id, the vocabulary and the fix.
    let wide = dir.path().join("wide");
    std::fs::create_dir(&wide).unwrap();
    let mut bad = ids[..30_000].to_vec();
    bad[12_345] = 300;
    bsfa_train::data::shards::write(&wide.join("w_train_000000.bin"), &bad, 1000).unwrap();
    bsfa_train::data::shards::write(&wide.join("w_val_000000.bin"), &ids[..5_000], 256).unwrap();
    let wide_spec = format!("shards:{}", wide.display());
    let err = fails_with(&["--data", &wide_spec, "--out", out], "w_train_000000.bin");
    for needle in [
        "id 300 at position 12345",
        "vocabulary of 256",
        "model.vocab_size=320",
    ] {
        assert!(err.contains(needle), "'{needle}' not in: {err}");
    }
    assert!(
        !err.contains("step 1/"),
        "found only after training started: {err}"
    );
    // A damaged shard stops the run before training, naming the file.
    let bytes = std::fs::read(&val).unwrap();
    std::fs::write(&val, &bytes[..bytes.len() - 7]).unwrap();
    fails_with(&["--data", &spec, "--out", out], "d_val_000000.bin");
}

#[test]
fn plot_draws_runs_and_compares_them_with_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let mut runs = Vec::new();
    for (name, extra) in [
        ("adamw", vec!["--steps", "6"]),
        (
            "bsfa",
            vec!["--steps", "6", "--optimizer", "adam-mini", "--bsfa"],
        ),
        ("adamw-short", vec!["--steps", "4", "--lr", "0.006"]),
    ] {
        let out = dir.path().join(name);
        let out = out.to_str().unwrap().to_string();
        let mut args = vec!["--eval-every", "2", "--out", &out];
        args.extend(extra);
        ok(run_fast(&args));
        runs.push(out);
    }
    let png = dir.path().join("curves.png");
    let png = png.to_str().unwrap();
    let o = ok(run(&["plot", &runs[0], &runs[1], &runs[2], "--out", png]));
    assert_eq!(&std::fs::read(png).unwrap()[1..4], b"PNG");
    let report: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    let rows = report["rows"].as_array().unwrap();
    // Runs that share an optimizer are told apart by the settings in which they differ.
    assert_eq!(rows[0]["run"], "adamw lr=0.003 steps=6");
    assert_eq!(rows[1]["run"], "adam-mini+bsfa");
    assert_eq!(rows[2]["run"], "adamw lr=0.006 steps=4");
    // The baseline reaches its own final loss, at the latest at its last evaluation.
    assert!(rows[0]["reaches_baseline_at"].as_u64().unwrap() <= 6);
    assert!(rows[0]["steps_ratio"].as_f64().unwrap() <= 1.0);
    assert!(stderr(&o).contains("| adam-mini+bsfa |"));
    fails_with(&["plot", "/no/such/run"], "metrics.jsonl");
}

#[test]
fn tokenizer_trains_a_bpe_that_prepare_and_training_use() {
    let dir = tempfile::tempdir().unwrap();
    let words = [
        "the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "far", "away",
    ];
    let sentence = |i: usize| {
        (0..8)
            .map(|j| words[(i * 7 + j * 3) % words.len()])
            .collect::<Vec<_>>()
            .join(" ")
    };
    let train: String = (0..3000).map(|i| sentence(i) + ".\n").collect();
    let val: String = (3000..3300).map(|i| sentence(i) + ".\n").collect();
    let (train_path, val_path) = (dir.path().join("train.txt"), dir.path().join("val.txt"));
    std::fs::write(&train_path, &train).unwrap();
    std::fs::write(&val_path, &val).unwrap();
    let tok = dir.path().join("tok").join("tokenizer.json");
    let (train_spec, val_spec) = (
        format!("text:{}", train_path.display()),
        format!("text:{}", val_path.display()),
    );
    let o = ok(run(&[
        "tokenizer",
        "--data",
        &train_spec,
        "--val-data",
        &val_spec,
        "--vocab-size",
        "300",
        "--out",
        tok.to_str().unwrap(),
    ]));
    let report: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    // At most the size asked for: a small corpus runs out of pairs to merge first.
    let size = report["vocab_size"].as_u64().unwrap();
    assert!(size > 257 && size <= 300, "{report}");
    assert_eq!(report["val_bytes"], val.len());
    // Whole words became tokens: several bytes per token on text it never saw.
    let per_token = report["val_bytes_per_token"].as_f64().unwrap();
    assert!(per_token > 2.0, "{report}");
    let json = read_json(&tok);
    assert_eq!(json["added_tokens"][0]["content"], "<|endoftext|>");
    assert_eq!(json["added_tokens"][0]["id"], 0);
    assert_eq!(json["pre_tokenizer"]["type"], "ByteLevel");
    // Training reads it as it is.
    let out = dir.path().join("run");
    ok(run_fast(&[
        "--data",
        &train_spec,
        "--tokenizer",
        tok.to_str().unwrap(),
        "--set",
        "model.vocab_size=300",
        "--steps",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]));
    fails_with(
        &["tokenizer", "--data", &train_spec, "--vocab-size", "100"],
        "must exceed 257",
    );
    fails_with(&["tokenizer", "--data", "builtin"], "--data text:PATH");
}

/// `bench` times random tokens: it never prepares (downloads) the run's dataset, which a GPU
/// machine without network cannot; only `--loader-steps`, which reads it, does.
#[test]
fn bench_needs_no_dataset_unless_it_times_the_loader() {
    let hf_home = tempfile::tempdir().unwrap();
    // An empty cache and a hub that refuses at once: a download attempt is an error.
    let offline = [
        ("HF_HOME", hf_home.path().to_str().unwrap()),
        ("HF_ENDPOINT", "http://127.0.0.1:9"),
    ];
    let mut args = strings(&["bench"]);
    args.extend(test_model(&[
        "--data",
        "openwebtext",
        "--tokenizer",
        "gpt2",
        "--set",
        "model.vocab_size=50304",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--warmup",
        "0",
        "--iters",
        "1",
    ]));
    ok(run_with(&args, &offline));
    args.extend(strings(&["--loader-steps", "1"]));
    fails(
        run_with(&args, &offline),
        &["openwebtext", "is not prepared"],
    );
}

/// `bench --kernels` compares each fused op with its reference: on the CPU in f32 through the
/// fused CPU kernels (within rounding), under `train.kernels=reference` the reference on both
/// sides (no difference at all).
#[test]
fn bench_kernels_compares_each_fused_op_with_its_reference() {
    let report = |extra: &[&str]| -> serde_json::Value {
        let mut args = strings(&["bench", "--kernels", "--iters", "1"]);
        args.extend(test_model(&["--batch-size", "2", "--seq-len", "16"]));
        args.extend(strings(extra));
        let o = ok(run(&args));
        serde_json::from_str(String::from_utf8(o.stdout).unwrap().trim()).unwrap()
    };
    let names = [
        "adam-update",
        "bsfa-projection",
        "attention",
        "cross-entropy",
        "rms-norm",
        "residual-rms-norm",
        "swiglu",
    ];
    let fused = report(&[]);
    let kernels = fused["kernels"].as_array().unwrap();
    assert_eq!(kernels.len(), names.len(), "{fused}");
    for (k, name) in kernels.iter().zip(names) {
        assert_eq!(k["kernel"], name);
        assert_eq!(k["path"], "cpu-fused", "{k}");
        let worst = k["worst_difference"].as_f64().unwrap();
        assert!(worst > 0.0 && worst < 1e-5, "{k}");
        assert!(k["fused_ms"].as_f64().unwrap() > 0.0, "{k}");
    }
    let reference = report(&["--set", "train.kernels=reference"]);
    for k in reference["kernels"].as_array().unwrap() {
        assert_eq!(k["path"], "reference", "{k}");
        assert_eq!(k["worst_difference"].as_f64().unwrap(), 0.0, "{k}");
    }
}

/// With BSFA, `bench`'s default step counts reach steady state: the history full before the
/// first timed step, and one re-estimation timed (and priced); explicit counts that do not
/// are said to.
#[test]
fn bench_times_bsfa_at_steady_state_by_default() {
    let shape = ["--batch-size", "2", "--seq-len", "16", "--bsfa"];
    let bsfa = [
        "--set",
        "bsfa.rank=2",
        "--set",
        "bsfa.history=6",
        "--set",
        "bsfa.interval=4",
    ];
    let shape = [&shape[..], &bsfa].concat();
    let bench = |extra: &[&str]| -> serde_json::Value {
        let mut args = strings(&["bench"]);
        args.extend(test_model(&[&shape[..], extra].concat()));
        let o = ok(run(&args));
        serde_json::from_str(String::from_utf8(o.stdout).unwrap().trim()).unwrap()
    };
    let steady = bench(&[]);
    assert_eq!(steady["warmup_steps"], 7, "{steady}");
    assert_eq!(steady["timed_steps"], 5, "{steady}");
    // Timed steps 7..=11: step 8 re-estimates.
    assert_eq!(steady["reestimations_timed"], 1, "{steady}");
    assert_eq!(steady["bsfa_steady_state"], true, "{steady}");
    assert!(steady["reestimation_ms"].as_f64().is_some(), "{steady}");
    let early = bench(&["--warmup", "1", "--iters", "2"]);
    assert_eq!(early["bsfa_steady_state"], false, "{early}");
    assert!(early["reestimation_ms"].is_null(), "{early}");
}

/// Two runs writing one out folder would replace each other's checkpoints and garble
/// `metrics.jsonl`: the second (one process, or a launcher's ranks) fails at once, naming
/// the first's pid, and the lock dies with its holder, so `kill -9` leaves none behind.
#[test]
fn a_second_run_on_a_busy_out_folder_fails_naming_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = out.to_str().unwrap();
    let long = test_model(&["--steps", "100000", "--checkpoint-every", "5", "--out", o]);
    let mut first = KillOnDrop(spawn(&long, &[]));
    wait_until_logged(&out, 1);
    let holder = format!("pid {} on host", first.0.id());
    for extra in [&[][..], &["--nproc-per-node", "2"]] {
        let second = [&["--steps", "3", "--seed", "7", "--out", o][..], extra].concat();
        fails(
            run_fast(&second),
            &["is in use by another run", &holder, "choose another --out"],
        );
    }
    assert!(
        first.0.try_wait().unwrap().is_none(),
        "the first run goes on"
    );
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    ok(run_fast(&["--steps", "2", "--out", o]));
}
