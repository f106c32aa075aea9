//! What a checkpoint's reader trusts (#26 items 4 and 10): only files inside the checkpoint
//! (the tokenizer travels in it; shard names cannot leave it), only the bytes that were
//! written (checksums), only finite tensors; and a save on a full disk says once what failed
//! and what to do.

mod common;

use bsfa_train::checkpoint::{self, read_safetensors};
use common::data::word_tokenizer;
use common::{fails, ok, ok_summary, read_json, restamp, run, run_with, stderr, test_model};
use std::path::{Path, PathBuf};

/// A test-model run of `steps` steps into `out`, checkpointed every 4 steps.
fn args(out: &Path, steps: usize, extra: &[&str]) -> Vec<String> {
    let (steps, out) = (steps.to_string(), out.display().to_string());
    let flags = [
        "--steps",
        &steps,
        "--checkpoint-every",
        "4",
        "--eval-batches",
        "1",
        "--threads",
        "2",
        "--out",
        &out,
    ];
    test_model(&[&flags[..], extra].concat())
}

/// Runs `args` plus `--resume ckpt`.
fn resume(args: &[String], ckpt: &Path) -> std::process::Output {
    let mut a = args.to_vec();
    a.extend(["--resume".to_string(), ckpt.display().to_string()]);
    run(&a)
}

/// A finished 8-step Adam-mini + BSFA run: its arguments for 12 steps and its last checkpoint.
fn finished_run(dir: &Path) -> (Vec<String>, PathBuf) {
    let out = dir.join("run");
    let bsfa = ["--optimizer", "adam-mini", "--bsfa", "--set", "bsfa.rank=3"];
    ok(run(&args(&out, 8, &bsfa)));
    (args(&out, 12, &bsfa), out.join("checkpoints/step-00000008"))
}

/// Replaces tensor `name` of the safetensors file `file` by NaNs (metadata kept).
fn poison(file: &Path, name: &str) {
    let (mut tensors, meta) = read_safetensors(file).unwrap();
    let t = &tensors[name];
    let nan = t.affine(0.0, f64::NAN).unwrap();
    tensors.insert(name.into(), nan);
    let list: Vec<_> = tensors.into_iter().collect();
    let meta: Vec<(&str, &str)> = meta.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    checkpoint::write_safetensors(file, &list, &meta).unwrap();
}

/// `export` copies the tokenizer the checkpoint holds, never a file its trainer.json names:
/// the run's own file may be gone, a crafted path pulls nothing in, a link is refused.
#[test]
fn export_takes_the_tokenizer_from_inside_the_checkpoint_only() {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("tokenizer.json");
    word_tokenizer(&tok, 300);
    let original = std::fs::read(&tok).unwrap();
    let text: String = (0..4000).map(|i| format!("w{} ", (i * 7) % 299)).collect();
    std::fs::write(dir.path().join("words.txt"), text).unwrap();
    let data = format!("text:{}", dir.path().join("words.txt").display());
    let out = dir.path().join("run");
    let tok_arg = tok.to_str().unwrap();
    let extra = [
        "--data",
        &data,
        "--tokenizer",
        tok_arg,
        "--set",
        "model.vocab_size=320",
    ];
    ok(run(&args(&out, 2, &extra)));
    let ckpt = out.join("checkpoints/step-00000002");
    assert_eq!(
        std::fs::read(ckpt.join("tokenizer.json")).unwrap(),
        original
    );

    // The run's file is gone and trainer.json names a private file instead.
    std::fs::remove_file(&tok).unwrap();
    let secret = dir.path().join("secret.txt");
    std::fs::write(&secret, "password").unwrap();
    let trainer = ckpt.join("trainer.json");
    let mut state = read_json(&trainer);
    state["config"]["data"]["tokenizer"] = secret.to_str().unwrap().into();
    std::fs::write(&trainer, state.to_string()).unwrap();
    let export = |name: &str| {
        let o = run(&[
            "export",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--out",
            dir.path().join(name).to_str().unwrap(),
        ]);
        (o, dir.path().join(name))
    };
    let (o, hf) = export("hf");
    ok(o);
    assert_eq!(std::fs::read(hf.join("tokenizer.json")).unwrap(), original);
    // `sample` reads the checkpoint's copy too.
    let path = ckpt.to_str().unwrap();
    let sample = [
        "sample",
        "--checkpoint",
        path,
        "--prompt",
        "w1",
        "--max-new-tokens",
        "2",
    ];
    ok(run(&sample));

    // A link in the checkpoint is not its own file.
    let copy = dir.path().join("tokenizer-copy.json");
    std::fs::rename(ckpt.join("tokenizer.json"), &copy).unwrap();
    std::os::unix::fs::symlink(&secret, ckpt.join("tokenizer.json")).unwrap();
    let (o, hf) = export("hf-link");
    fails(o, &["tokenizer.json' is not a regular file"]);
    assert!(!hf.exists());

    // A checkpoint of an older version (no checksums, no tokenizer.json): nothing from the
    // path its config names.
    std::fs::remove_file(ckpt.join("tokenizer.json")).unwrap();
    let mut state = read_json(&trainer);
    state.as_object_mut().unwrap().remove("checksums");
    std::fs::write(&trainer, state.to_string()).unwrap();
    let (o, hf) = export("hf-old");
    let err = stderr(&ok(o));
    assert!(
        err.contains("holds none (written by an older version)"),
        "{err}"
    );
    assert!(!hf.join("tokenizer.json").exists());
}

/// The optimizer's `shard_files` may name only files inside the checkpoint.
#[test]
fn optimizer_shard_files_cannot_leave_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (a, ckpt) = finished_run(dir.path());
    let optimizer = ckpt.join("optimizer.safetensors");
    let outside = dir.path().join("outside.safetensors");
    std::fs::copy(&optimizer, &outside).unwrap();
    let (tensors, meta) = read_safetensors(&optimizer).unwrap();
    let list: Vec<_> = tensors.into_iter().collect();
    for shard in [
        "../../../outside.safetensors".to_string(),
        outside.display().to_string(),
    ] {
        let mut meta: Vec<(&str, &str)> =
            meta.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        meta.retain(|(k, _)| *k != "shard_files");
        meta.push(("shard_files", &shard));
        checkpoint::write_safetensors(&optimizer, &list, &meta).unwrap();
        restamp(&ckpt, "optimizer.safetensors");
        let needle = format!("names the file '{shard}', which is not a file inside");
        fails(resume(&a, &ckpt), &[&needle]);
    }
}

/// A flipped byte in any file of a checkpoint is refused by every command that loads it,
/// naming the file and the checkpoint to use instead; one written before checksums still
/// loads, unverified.
#[test]
fn flipped_bytes_are_refused_on_every_load() {
    let dir = tempfile::tempdir().unwrap();
    let (a, ckpt) = finished_run(dir.path());
    let path = ckpt.to_str().unwrap();
    let hf = dir.path().join("hf");
    let commands = common::loading_commands(path, hf.to_str().unwrap());
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let file = ckpt.join(file);
        let pristine = std::fs::read(&file).unwrap();
        let mut flipped = pristine.clone();
        // A low mantissa byte of the last tensor: the value stays finite and plausible.
        let n = flipped.len();
        flipped[n - 4] ^= 0x01;
        std::fs::write(&file, &flipped).unwrap();
        let corrupted = format!("{}' is corrupted or truncated", file.display());
        let needles = [
            corrupted.as_str(),
            "the checkpoint is damaged",
            "step-00000004' (the newest other one",
        ];
        fails(resume(&a, &ckpt), &needles);
        if file.ends_with("model.safetensors") {
            for args in &commands {
                fails(run(args), &needles);
            }
        }
        std::fs::write(&file, &pristine).unwrap();
    }
    // Written before checksums: loads, with a note.
    let trainer = ckpt.join("trainer.json");
    let mut state = read_json(&trainer);
    state.as_object_mut().unwrap().remove("checksums");
    std::fs::write(&trainer, state.to_string()).unwrap();
    let o = ok(resume(&a, &ckpt));
    assert!(stderr(&o).contains("read unverified"), "{}", stderr(&o));
}

/// NaN in a checkpoint's weights or optimizer state is the checkpoint's fault, named as
/// such, not a divergence blamed on the learning rate.
#[test]
fn non_finite_values_in_a_checkpoint_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (a, ckpt) = finished_run(dir.path());
    for (file, tensor) in [
        ("model.safetensors", "model.norm.weight"),
        ("optimizer.safetensors", "model.norm.weight.exp_avg"),
    ] {
        let path = ckpt.join(file);
        let pristine = std::fs::read(&path).unwrap();
        let name = read_safetensors(&path)
            .unwrap()
            .0
            .into_keys()
            .filter(|k| k.starts_with(tensor))
            .min()
            .unwrap();
        poison(&path, &name);
        restamp(&ckpt, file);
        let needle = format!("non-finite values (NaN or infinity) in tensor '{name}'");
        let err = fails(resume(&a, &ckpt), &[&needle, "the checkpoint itself"]);
        assert!(!err.contains("diverged"), "{err}");
        std::fs::write(&path, &pristine).unwrap();
        restamp(&ckpt, file);
    }
    ok_summary(resume(&a, &ckpt));
}

/// A save that meets a full disk says so once, naming the checkpoint and the file, that the
/// previous checkpoint is intact and the fix; it leaves no partial folder behind.
#[test]
fn a_full_disk_while_saving_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = run_with(
        &args(&out, 8, &[]),
        &[
            ("BSFA_TRAIN_FAILPOINT", "checkpoint-disk-full:8"),
            ("BSFA_TRAIN_TEST_HOOKS", "1"),
        ],
    );
    let err = fails(
        o,
        &[
            "cannot save the checkpoint",
            "step-00000008': the disk is full",
            "step-00000004' is intact",
            "Free space",
            "--out on another disk",
            "--resume auto",
        ],
    );
    assert_eq!(err.matches("No space left on device").count(), 1, "{err}");
    let root = out.join("checkpoints");
    assert!(!root.join(".tmp-step-00000008").exists());
    let complete: Vec<usize> = checkpoint::list(&root)
        .unwrap()
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(complete, vec![4]);
}

/// The failpoint hook ships in release builds, so `BSFA_TRAIN_FAILPOINT` alone (a variable
/// left in a shell) never fires: the run trains to the end, warning once that it is ignored.
#[test]
fn a_failpoint_without_the_test_hooks_switch_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = run_with(
        &args(&out, 8, &[]),
        &[("BSFA_TRAIN_FAILPOINT", "checkpoint-disk-full:8")],
    );
    let err = stderr(&o);
    assert!(o.status.success(), "the failpoint fired: {err}");
    let warning = "BSFA_TRAIN_FAILPOINT=checkpoint-disk-full:8 is ignored";
    assert_eq!(err.matches(warning).count(), 1, "{err}");
    assert!(err.contains("BSFA_TRAIN_TEST_HOOKS=1"), "{err}");
}

/// The cost of checksums on a checkpoint file of `BSFA_CHECKSUM_BENCH_MB` MB (default 500) of
/// f32: what `save` adds (one CRC-32 pass over the file just written) and what a load adds
/// (the same pass), beside writing and reading the file. By hand, for docs/checkpoints.md:
/// `cargo test --release --test checkpoint_integrity -- --ignored --nocapture`.
#[test]
#[ignore]
fn checksum_cost() {
    use std::time::Instant;
    let mb: usize = std::env::var("BSFA_CHECKSUM_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.safetensors");
    let n = mb * 1_000_000 / 4;
    let values: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 1e-3).collect();
    let t = candle_core::Tensor::from_vec(values, n, &candle_core::Device::Cpu).unwrap();
    let time = |what: &str, f: &mut dyn FnMut()| {
        let best = (0..3)
            .map(|_| {
                let start = Instant::now();
                f();
                start.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min);
        eprintln!("{what}: {:.3} s ({:.2} GB/s)", best, mb as f64 / 1e3 / best);
    };
    time("write and fsync", &mut || {
        checkpoint::write_safetensors(&file, &[("w".into(), t.clone())], &[]).unwrap()
    });
    time("checksum (save and load each add one)", &mut || {
        checkpoint::checksum(&file).unwrap();
    });
    time("read (finite check included)", &mut || {
        read_safetensors(&file).unwrap();
    });
    let bytes = std::fs::read(&file).unwrap();
    time("finite check alone", &mut || {
        assert!(!checkpoint::has_non_finite(safetensors::Dtype::F32, &bytes));
    });
}
