//! Checkpoints as a preempted user meets them: `kill -9` at random moments, a crash inside a
//! checkpoint write, SIGTERM, then `--resume auto` must log exactly the losses of an
//! uninterrupted run; damaged or mismatched checkpoints are clear errors that change nothing.

mod common;

use bsfa_train::checkpoint::{self, read_safetensors};
use common::ranks::{sigterm, wait_until_logged};
use common::{
    command, fails, max_abs_diff, ok, ok_summary, records, restamp, run, summary, test_model,
    SMALL_BSFA,
};
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

const STEPS: usize = 40;

/// A small run of the test model that takes about a second: checkpoints every 4 steps,
/// every step logged.
fn args(out: &Path, steps: usize, optimizer: &[&str]) -> Vec<String> {
    let steps = steps.to_string();
    let out = out.display().to_string();
    let flags = [
        "--eval-every",
        "10",
        "--eval-batches",
        "1",
        "--checkpoint-every",
        "4",
        "--threads",
        "2",
        "--steps",
        &steps,
        "--out",
        &out,
    ];
    test_model(&[&flags[..], &SMALL_BSFA, optimizer].concat())
}

fn with(mut a: Vec<String>, extra: &[&str]) -> Vec<String> {
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// `(step, loss, val_loss, BSFA diagnostics or sample)` of every metrics record, in file order.
fn logged(out: &Path) -> Vec<(u64, String)> {
    records(out)
        .iter()
        .map(|r| {
            let (key, value) = ["loss", "val_loss", "bsfa", "sample"]
                .into_iter()
                .find_map(|k| r.get(k).map(|v| (k, v)))
                .unwrap();
            (r["step"].as_u64().unwrap(), format!("{key}={value}"))
        })
        .collect()
}

const OPTIMIZERS: [&[&str]; 3] = [
    &["--optimizer", "adamw"],
    &["--optimizer", "adam-mini"],
    &["--optimizer", "adam-mini", "--bsfa"],
];

/// Trials per optimizer; more by hand with `BSFA_KILL_TRIALS=20 cargo test --release`.
fn trials() -> usize {
    std::env::var("BSFA_KILL_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
}

#[test]
fn kill_9_at_random_moments_then_resume_logs_the_uninterrupted_losses() {
    let seed: u64 = std::env::var("BSFA_KILL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("kill times drawn with BSFA_KILL_SEED={seed}");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    // The three optimizers on the built-in data, and the BSFA one on token shards.
    let shards = dir.path().join("shards");
    std::fs::create_dir(&shards).unwrap();
    let ids: Vec<u32> = bsfa_train::data::builtin::corpus()
        .bytes()
        .take(200_000)
        .map(u32::from)
        .collect();
    for (name, part) in [
        ("b_train_000000.bin", &ids[..90_000]),
        ("b_train_000001.bin", &ids[90_000..180_000]),
        ("b_val_000000.bin", &ids[180_000..]),
    ] {
        bsfa_train::data::shards::write(&shards.join(name), part, 256).unwrap();
    }
    let on_shards = format!("shards:{}", shards.display());
    let mut cases: Vec<Vec<&str>> = OPTIMIZERS.iter().map(|o| o.to_vec()).collect();
    cases.push([OPTIMIZERS[2], &["--data", on_shards.as_str()]].concat());
    cases.push([OPTIMIZERS[2], &["--set", "bsfa.bits=4"]].concat());
    for optimizer in &cases {
        let optimizer = optimizer.as_slice();
        let reference = dir.path().join("reference");
        let started = Instant::now();
        ok(run(&args(&reference, STEPS, optimizer)));
        let full = started.elapsed();
        let expected = logged(&reference);
        // A line per step, 4 evaluations and the final step's training sample.
        assert_eq!(
            expected
                .iter()
                .filter(|(_, v)| !v.starts_with("bsfa="))
                .count(),
            STEPS + 5
        );
        let mut killed_mid_run = 0;
        for trial in 0..trials() {
            let out = dir.path().join(format!("trial{trial}"));
            // A random moment: after a random number of logged steps (0: during start-up),
            // plus up to one step's time, so kills land anywhere in a step or a checkpoint
            // write whatever the machine's speed.
            let after_lines = rng.random_range(0..STEPS);
            let extra = full.mul_f64(rng.random_range(0.0..1.0) / STEPS as f64);
            let mut child = command()
                .args(args(&out, STEPS, optimizer))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let started = Instant::now();
            let metrics = out.join("metrics.jsonl");
            while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < after_lines
                && child.try_wait().unwrap().is_none()
            {
                std::thread::sleep(Duration::from_micros(200));
            }
            std::thread::sleep(extra);
            let delay = started.elapsed();
            if child.try_wait().unwrap().is_none() {
                killed_mid_run += 1;
            }
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            let logged_at_kill =
                std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |t| t.lines().count());
            let resumed = ok(run(&with(
                args(&out, STEPS, optimizer),
                &["--resume", "auto"],
            )));
            let err = String::from_utf8_lossy(&resumed.stderr);
            let from = err
                .lines()
                .find(|l| l.starts_with("resuming from") || l.starts_with("no checkpoint"))
                .unwrap_or_else(|| panic!("neither resumed nor started fresh: {err}"));
            assert_eq!(
                logged(&out),
                expected,
                "{optimizer:?}: trial {trial} killed after {delay:?} diverged from the \
                 uninterrupted run"
            );
            eprintln!(
                "{optimizer:?} trial {trial}: killed after {delay:?} with {logged_at_kill} \
                 metrics lines written; {from}; identical"
            );
            std::fs::remove_dir_all(&out).unwrap();
        }
        assert!(
            killed_mid_run > 0,
            "no trial was killed before the run ended"
        );
        std::fs::remove_dir_all(&reference).unwrap();
    }
}

#[test]
fn crash_inside_a_checkpoint_write_keeps_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let optimizer = OPTIMIZERS[2];
    let reference = dir.path().join("reference");
    ok(run(&args(&reference, STEPS, optimizer)));
    let out = dir.path().join("crashed");
    let crashed = command()
        .args(args(&out, STEPS, optimizer))
        .env("BSFA_TRAIN_FAILPOINT", "checkpoint-write:12")
        .env("BSFA_TRAIN_TEST_HOOKS", "1")
        .output()
        .unwrap();
    assert!(!crashed.status.success());
    let root = out.join("checkpoints");
    // The write of step 12 was cut after the weights: a hidden partial folder remains.
    assert!(root
        .join(".tmp-step-00000012")
        .join("model.safetensors")
        .exists());
    assert!(!root
        .join(".tmp-step-00000012")
        .join("trainer.json")
        .exists());
    let complete: Vec<usize> = checkpoint::list(&root)
        .unwrap()
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(complete, vec![4, 8]);

    let resumed = ok(run(&with(
        args(&out, STEPS, optimizer),
        &["--resume", "auto"],
    )));
    let err = String::from_utf8_lossy(&resumed.stderr);
    assert!(err.contains("step-00000008' at step 8"), "{err}");
    assert_eq!(logged(&out), logged(&reference));
    assert!(!root.join(".tmp-step-00000012").exists());
    // --keep-checkpoints defaults to 3.
    let complete: Vec<usize> = checkpoint::list(&root)
        .unwrap()
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(complete, vec![32, 36, 40]);
}

#[test]
fn sigterm_checkpoints_and_exits_then_resume_continues() {
    let dir = tempfile::tempdir().unwrap();
    let optimizer = OPTIMIZERS[0];
    let reference = dir.path().join("reference");
    ok(run(&args(&reference, STEPS, optimizer)));
    let out = dir.path().join("stopped");
    let child = command()
        .args(args(&out, STEPS, optimizer))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until a few steps are logged, then ask it to stop as a scheduler would.
    wait_until_logged(&out, 6);
    sigterm(&child);
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(143), "{err}");
    assert!(
        err.contains("stopped by SIGTERM") && err.contains("--resume auto"),
        "{err}"
    );
    let summary = summary(&o);
    let stopped_at = summary["steps"].as_u64().unwrap() as usize;
    assert!(stopped_at < STEPS, "{summary}");
    assert_eq!(summary["interrupted_by"], "SIGTERM");
    let newest = checkpoint::list(&out.join("checkpoints"))
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(newest.0, stopped_at);

    ok(run(&with(
        args(&out, STEPS, optimizer),
        &["--resume", "auto"],
    )));
    assert_eq!(logged(&out), logged(&reference));
}

/// A finished run to damage, and the metrics file it wrote.
fn finished_run(dir: &Path) -> (Vec<String>, PathBuf, String) {
    let out = dir.join("run");
    ok(run(&args(&out, 8, OPTIMIZERS[2])));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    (
        args(&out, 12, OPTIMIZERS[2]),
        out.join("checkpoints").join("step-00000008"),
        metrics,
    )
}

/// Resuming from `ckpt` with the run arguments `a` fails with `needle` in the message,
/// without a panic, and leaves the run's metrics and the checkpoint's files as they were.
fn resume_fails(a: &[String], ckpt: &Path, metrics: &str, needle: &str) {
    let before: Vec<Vec<u8>> = ["model.safetensors", "optimizer.safetensors", "trainer.json"]
        .iter()
        .map(|f| std::fs::read(ckpt.join(f)).unwrap_or_default())
        .collect();
    fails(
        run(&with(a.to_vec(), &["--resume", ckpt.to_str().unwrap()])),
        &[needle],
    );
    let out = ckpt.parent().unwrap().parent().unwrap();
    assert_eq!(
        std::fs::read_to_string(out.join("metrics.jsonl")).unwrap(),
        metrics
    );
    let after: Vec<Vec<u8>> = ["model.safetensors", "optimizer.safetensors", "trainer.json"]
        .iter()
        .map(|f| std::fs::read(ckpt.join(f)).unwrap_or_default())
        .collect();
    assert!(before == after, "the checkpoint was modified");
}

#[test]
fn damaged_or_mismatched_checkpoints_are_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (a, ckpt, metrics) = finished_run(dir.path());
    let model = ckpt.join("model.safetensors");
    let optimizer = ckpt.join("optimizer.safetensors");
    let pristine_model = std::fs::read(&model).unwrap();
    let pristine_optimizer = std::fs::read(&optimizer).unwrap();

    // Truncated weights, truncated optimizer state.
    std::fs::write(&model, &pristine_model[..pristine_model.len() / 2]).unwrap();
    resume_fails(
        &a,
        &ckpt,
        &metrics,
        "model.safetensors' is corrupted or truncated",
    );
    std::fs::write(&model, &pristine_model).unwrap();
    std::fs::write(&optimizer, &pristine_optimizer[..1000]).unwrap();
    resume_fails(
        &a,
        &ckpt,
        &metrics,
        "optimizer.safetensors' is corrupted or truncated",
    );
    std::fs::write(&optimizer, &pristine_optimizer).unwrap();

    // A missing tensor and a tensor of the wrong shape.
    let (mut tensors, _) = read_safetensors(&model).unwrap();
    let name = "model.layers.1.mlp.up_proj.weight";
    let up = tensors.remove(name).unwrap();
    let save = |t: &std::collections::HashMap<String, candle_core::Tensor>| {
        let list: Vec<_> = t.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        checkpoint::write_safetensors(&model, &list, &[]).unwrap();
        // Past the checksum, to the checks of names and shapes.
        restamp(&ckpt, "model.safetensors");
    };
    save(&tensors);
    resume_fails(&a, &ckpt, &metrics, &format!("has no tensor '{name}'"));
    tensors.insert(name.into(), up.t().unwrap());
    save(&tensors);
    resume_fails(&a, &ckpt, &metrics, &format!("tensor '{name}'"));
    std::fs::write(&model, &pristine_model).unwrap();
    restamp(&ckpt, "model.safetensors");

    // A BSFA history of the wrong width.
    let (mut state, meta) = read_safetensors(&optimizer).unwrap();
    let key = "model.norm.weight.bsfa_history";
    let h = state[key].clone();
    state.insert(key.into(), h.narrow(1, 0, 3).unwrap());
    let list: Vec<_> = state.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let meta: Vec<(&str, &str)> = meta.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    checkpoint::write_safetensors(&optimizer, &list, &meta).unwrap();
    restamp(&ckpt, "optimizer.safetensors");
    resume_fails(&a, &ckpt, &metrics, key);
    std::fs::write(&optimizer, &pristine_optimizer).unwrap();
    restamp(&ckpt, "optimizer.safetensors");

    // Another model: every differing key is listed.
    let wider = with(
        a.clone(),
        &[
            "--set",
            "model.hidden_size=32",
            "--set",
            "model.num_hidden_layers=3",
        ],
    );
    resume_fails(
        &wider,
        &ckpt,
        &metrics,
        "model.hidden_size (checkpoint 64, requested 32)",
    );
    resume_fails(&wider, &ckpt, &metrics, "model.num_hidden_layers");
    // Another optimizer.
    let adamw = args(&ckpt.join("../.."), 12, OPTIMIZERS[0]);
    resume_fails(&adamw, &ckpt, &metrics, "optimizer 'adam-mini+bsfa'");

    // An unknown format version.
    let trainer = ckpt.join("trainer.json");
    let text = std::fs::read_to_string(&trainer).unwrap();
    std::fs::write(
        &trainer,
        text.replace("\"format_version\": 1", "\"format_version\": 99"),
    )
    .unwrap();
    resume_fails(&a, &ckpt, &metrics, "format version 99");
    std::fs::write(&trainer, &text).unwrap();

    // A path that does not exist.
    let o = run(&with(a.clone(), &["--resume", "/no/such/checkpoint"]));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("'/no/such/checkpoint' does not exist"));

    // Untouched, it resumes and extends the run to 12 steps.
    let summary = ok_summary(run(&with(a.clone(), &["--resume", "auto"])));
    assert_eq!(summary["steps"], 12);
    assert_eq!(summary["resumed_from"], 8);
}

#[test]
fn every_weight_changes_between_checkpoints_without_weight_decay() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let a = with(
        args(&out, 8, OPTIMIZERS[2]),
        &["--set", "optimizer.weight_decay=0"],
    );
    ok(run(&a));
    let root = out.join("checkpoints");
    let (first, _) = read_safetensors(&root.join("step-00000004/model.safetensors")).unwrap();
    let (second, _) = read_safetensors(&root.join("step-00000008/model.safetensors")).unwrap();
    assert_eq!(first.len(), 2 + 2 * 9 + 1);
    for (name, before) in &first {
        let after = &second[name];
        let moved = max_abs_diff(after, before);
        assert!(moved > 0.0, "'{name}' did not change between steps 4 and 8");
    }
}

/// After a resume every restored tensor sits on the parameters' device: the weights, Adam's
/// moments and BSFA's history and directions (f32 and 4-bit), each one visited. Checkpoints
/// are read on the host, and on CUDA a tensor left there fails (`Var::set` refuses it, a CPU
/// moment breaks the first step). On a CPU-only machine every device is the CPU, so this
/// guards the code path (every state tensor is listed and compared, and the resume runs
/// through `Checkpoint::restore`'s check); a CUDA run proves the placement itself.
#[test]
fn resume_restores_every_state_tensor_on_the_parameters_device() {
    use bsfa_train::optim::{self, OptimizerState};
    let dir = tempfile::tempdir().unwrap();
    let (steps, history) = (6, 4);
    for (i, sets) in [
        &["optimizer.name=\"adamw\""][..],
        &["optimizer.name=\"adam-mini\"", "bsfa.enabled=true"][..],
        &[
            "optimizer.name=\"adam-mini\"",
            "bsfa.enabled=true",
            "bsfa.bits=4",
        ][..],
    ]
    .iter()
    .enumerate()
    {
        let out = dir.path().join(format!("run{i}"));
        let mut all = vec![
            "train.steps=6".to_string(),
            "bsfa.rank=2".into(),
            format!("bsfa.history={history}"),
            "bsfa.interval=2".into(),
        ];
        all.extend(sets.iter().map(|s| s.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let config = common::small_config(&out, &all);
        bsfa_train::train::run(&config, None).unwrap();

        let device = bsfa_train::device::select(config.train.device, 0).unwrap();
        let config = config.on_device(&device);
        let ck =
            checkpoint::Checkpoint::open(&out.join("checkpoints/step-00000006"), true).unwrap();
        let (params, optimizer) = common::restored(&config, &device, &ck);

        for p in &params {
            assert!(p.var.device().same_device(&device), "{}", p.name);
        }
        let devices = optimizer.devices();
        // Adam: one moments tensor per parameter; BSFA: per block, its directions and its
        // full history, one matrix in f32 and one tensor per update in 4-bit.
        let bsfa_blocks = if config.bsfa.enabled {
            optim::bsfa::owners(&config.bsfa, &params, 1)
                .iter()
                .flatten()
                .count()
        } else {
            0
        };
        assert!(steps > history && (!config.bsfa.enabled || bsfa_blocks > 0));
        let history_tensors = if config.bsfa.bits == 4 { history } else { 1 };
        assert_eq!(
            devices.len(),
            params.len() + bsfa_blocks * (history_tensors + 1),
            "{sets:?}: {} parameters, {bsfa_blocks} BSFA blocks; listed: {} ... {}",
            params.len(),
            devices.first().map_or("", |d| d.0.as_str()),
            devices.last().map_or("", |d| d.0.as_str())
        );
        for (name, d) in &devices {
            assert!(d.same_device(&device), "{sets:?}: {name}");
        }
        assert_eq!(
            optim::check_state_devices(&optimizer, &device).unwrap(),
            devices.len()
        );
    }
}
