//! One run per out folder, and nothing of a run lost: a resume from an older checkpoint sets
//! the newer ones aside (no later `--resume auto` continues the abandoned branch, pruning never
//! deletes the running run's checkpoints); every fresh start keeps the earlier run under its
//! own name; a kill while a checkpoint of the same step is replaced leaves one to resume;
//! stray files in `checkpoints/` are left alone.

mod common;

use bsfa_train::checkpoint::{self, step_dir_name, Checkpoint};
use bsfa_train::dist::SingleRank;
use common::{fails, logged, ok, ok_summary, run, small_bsfa_run, stderr};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The steps of the complete checkpoints under `root`.
fn steps(root: &Path) -> Vec<usize> {
    checkpoint::list(root)
        .unwrap()
        .iter()
        .map(|c| c.0)
        .collect()
}

fn metrics(out: &Path) -> String {
    std::fs::read_to_string(out.join("metrics.jsonl")).unwrap()
}

/// The metrics lines of steps up to `step`.
fn up_to(text: &str, step: u64) -> Vec<&str> {
    text.lines()
        .filter(|l| {
            let record: serde_json::Value = serde_json::from_str(l).unwrap();
            record["step"].as_u64().unwrap() <= step
        })
        .collect()
}

fn resume_from(dir: &Path) -> String {
    dir.display().to_string()
}

#[test]
fn resuming_from_an_older_checkpoint_sets_the_newer_ones_aside() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    ok(run(&small_bsfa_run(&out, 30, &[])));
    let root = out.join("checkpoints");
    assert_eq!(steps(&root), vec![10, 20, 30]);
    let abandoned = metrics(&out);

    // The case: resumed from step 10 with --steps 25, checkpointing every 5 steps.
    let step_10 = resume_from(&root.join(step_dir_name(10)));
    let every_5 = ["--set", "train.checkpoint_every=5", "--resume", &step_10];
    let o = ok(run(&small_bsfa_run(&out, 25, &every_5)));
    let err = stderr(&o);
    let aside = out.join("previous/001-step-30");
    // Pruning (3 kept) deleted step 10, not this run's own.
    assert_eq!(steps(&root), vec![15, 20, 25]);
    assert!(
        err.contains(&format!("'{}'", aside.display())) && err.contains("--resume auto"),
        "{err}"
    );
    assert_eq!(steps(&aside.join("checkpoints")), vec![20, 30]);
    assert_eq!(metrics(&aside), abandoned);
    let now = metrics(&out);
    assert_eq!(up_to(&now, 10), up_to(&abandoned, 10));
    assert_eq!(up_to(&now, 25), now.lines().collect::<Vec<_>>());

    let later = ok_summary(run(&small_bsfa_run(&out, 30, &["--resume", "auto"])));
    assert_eq!(later["resumed_from"], 25);
    // The abandoned run continues in its own folder.
    let aside_args = small_bsfa_run(&aside, 40, &["--resume", "auto"]);
    assert_eq!(ok_summary(run(&aside_args))["resumed_from"], 30);
}

#[test]
fn every_fresh_start_keeps_the_earlier_run_under_its_own_name() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let first = small_bsfa_run(&out, 10, &[]);
    ok(run(&first));
    let first_metrics = metrics(&out);
    let first_logged = logged(&out);
    let second = small_bsfa_run(&out, 20, &["--seed", "2"]);
    let err = stderr(&ok(run(&second)));
    let second_metrics = metrics(&out);
    let one = out.join("previous/001-step-10");
    assert!(
        err.contains(&format!("'{}'", one.display())) && err.contains("--resume auto"),
        "{err}"
    );
    ok(run(&first));
    let two = out.join("previous/002-step-20");
    for (aside, text, kept) in [
        (&one, &first_metrics, &[10][..]),
        (&two, &second_metrics, &[10, 20]),
    ] {
        assert_eq!(&metrics(aside), text);
        assert_eq!(steps(&aside.join("checkpoints")), kept);
        assert!(aside.join("config.json").is_file());
    }
    assert_eq!(logged(&out), first_logged);
    let continued = ok_summary(run(&small_bsfa_run(&one, 20, &["--resume", "auto"])));
    assert_eq!(continued["resumed_from"], 10);

    // Resuming a set-aside run in the out folder sets aside the run there instead.
    let step_20 = resume_from(&two.join("checkpoints").join(step_dir_name(20)));
    let back = small_bsfa_run(&out, 30, &["--seed", "2", "--resume", &step_20]);
    let o = ok(run(&back));
    assert!(
        stderr(&o).contains("previous/003-step-10"),
        "{}",
        stderr(&o)
    );
    assert_eq!(common::summary(&o)["resumed_from"], 20);
    assert_eq!(logged(&out.join("previous/003-step-10")), first_logged);
    assert_eq!(up_to(&metrics(&out), 20), Vec::<&str>::new());
    assert_eq!(steps(&two.join("checkpoints")), vec![10, 20]);
}

/// Names the test that a rerun of this binary runs, and the checkpoints folder it writes to.
const OWN_PROCESS: &str = "BSFA_CHECKPOINT_FOLDER_TEST";

/// In a new process of this test binary (`checkpoints` in [`OWN_PROCESS`]): saves the
/// checkpoint of step 10 again over the one there, as a resumed run would, under the
/// failpoint that kills it between the swap's renames.
fn replace_step_10(checkpoints: &Path) {
    let ck = Checkpoint::open(&checkpoints.join(step_dir_name(10)), true).unwrap();
    let device = bsfa_train::device::select(ck.state.config.train.device, 0).unwrap();
    let config = ck.state.config.on_device(&device);
    let (params, optimizer) = common::restored(&config, &device, &ck);
    checkpoint::save(
        checkpoints,
        &ck.state,
        &params,
        &optimizer,
        &SingleRank,
        None,
    )
    .unwrap();
    panic!("the failpoint did not stop the save");
}

#[test]
fn a_kill_while_replacing_a_checkpoint_of_the_same_step_leaves_it_to_resume() {
    let name = "a_kill_while_replacing_a_checkpoint_of_the_same_step_leaves_it_to_resume";
    if let Some(checkpoints) = std::env::var_os(OWN_PROCESS) {
        return replace_step_10(&PathBuf::from(checkpoints));
    }
    let dir = tempfile::tempdir().unwrap();
    let reference = dir.path().join("reference");
    ok(run(&small_bsfa_run(&reference, 10, &[])));
    ok(run(&small_bsfa_run(&reference, 20, &["--resume", "auto"])));
    let out = dir.path().join("replaced");
    ok(run(&small_bsfa_run(&out, 10, &[])));
    let root = out.join("checkpoints");
    let killed = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--test-threads", "1", "--nocapture"])
        .env(OWN_PROCESS, &root)
        .env("BSFA_TRAIN_FAILPOINT", "checkpoint-replace:10")
        .env("BSFA_TRAIN_TEST_HOOKS", "1")
        .output()
        .unwrap();
    let err = stderr(&killed);
    assert!(
        err.contains("failpoint checkpoint-replace:10: aborting"),
        "{err}"
    );
    // Between the renames: the old checkpoint is `.old`, the new one still hidden, and the
    // old one is what readers take for step 10.
    let old = root.join("step-00000010.old");
    assert!(!root.join(step_dir_name(10)).exists());
    assert!(root.join(".tmp-step-00000010/trainer.json").is_file());
    assert_eq!(checkpoint::list(&root).unwrap(), vec![(10, old.clone())]);
    let o = ok(run(&small_bsfa_run(&out, 20, &["--resume", "auto"])));
    assert!(
        stderr(&o).contains("step-00000010.old' at step 10"),
        "{}",
        stderr(&o)
    );
    assert_eq!(logged(&out), logged(&reference));
    assert!(!root.join(".tmp-step-00000010").exists());
    assert_eq!(steps(&root), vec![10, 20]);

    // Killed after the new one is in, before the `.old` is deleted: the new one counts, and
    // pruning deletes the superseded `.old` and a half-deleted hidden one.
    std::fs::create_dir(root.join(step_dir_name(10))).unwrap();
    std::fs::write(root.join("step-00000010/trainer.json"), "{}").unwrap();
    std::fs::create_dir_all(root.join(".tmp-step-00000020.old")).unwrap();
    assert_eq!(
        checkpoint::list(&root).unwrap()[0].1,
        root.join("step-00000010")
    );
    checkpoint::prune(&root, 3, 20).unwrap();
    assert!(!old.exists() && !root.join(".tmp-step-00000020.old").exists());
    assert_eq!(steps(&root), vec![10, 20]);
}

#[test]
fn stray_files_in_the_checkpoints_folder_are_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    ok(run(&small_bsfa_run(&out, 10, &[])));
    let root = out.join("checkpoints");
    let stray = [
        ".tmp-notes",
        "README.txt",
        ".tmp-keep/file",
        "step-backup/file",
    ];
    for path in stray {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, "mine").unwrap();
    }
    let summary = ok_summary(run(&small_bsfa_run(&out, 20, &["--resume", "auto"])));
    assert_eq!(summary["resumed_from"], 10);
    for path in stray {
        assert_eq!(std::fs::read_to_string(root.join(path)).unwrap(), "mine");
    }
    assert_eq!(steps(&root), vec![10, 20]);
    // A file where a checkpoint goes is an error that names it.
    std::fs::write(root.join(step_dir_name(30)), "mine").unwrap();
    fails(
        run(&small_bsfa_run(&out, 30, &["--resume", "auto"])),
        &["step-00000030' is in the way of the checkpoint of step 30"],
    );
}
