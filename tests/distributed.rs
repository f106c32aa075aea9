//! Data parallelism with CPU ranks, as users launch it: `--nproc-per-node N` (or torchrun's
//! variables) must follow the one-process run, resume across rank counts, stop together on
//! a signal, and fail fast, naming the rank, when one rank dies, errors or hangs.

mod common;

use bsfa_train::checkpoint::read_safetensors;
use common::ranks::{free_port, sigterm, spawn, wait_bounded, wait_until_logged};
use common::{logged, max_abs_diff, ok, run, small_bsfa_run, summary, worst_relative_difference};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

#[test]
fn two_ranks_follow_one_rank_and_halve_bsfa_state() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let single = ok(run(&small_bsfa_run(&one, 30, &["--threads", "2"])));
    let double = ok(run(&small_bsfa_run(&two, 30, &["--nproc-per-node", "2"])));
    let (a, b) = (logged(&one), logged(&two));
    assert_eq!(a.len(), b.len());
    assert_eq!(b.len(), 30 + 3, "30 losses and 3 val losses");
    let worst = worst_relative_difference(&a, &b);
    eprintln!("2 ranks vs 1: largest relative loss difference {worst:.3e}");
    assert!(worst < 1e-4, "{worst}");

    // The final weights agree too.
    let checkpoint = |out: &Path| out.join("checkpoints/step-00000030/model.safetensors");
    let (wa, _) = read_safetensors(&checkpoint(&one)).unwrap();
    let (wb, _) = read_safetensors(&checkpoint(&two)).unwrap();
    for (name, x) in &wa {
        let y = &wb[name];
        let diff = max_abs_diff(x, y);
        let scale: f32 = x.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(diff <= 1e-3 * scale, "{name}: {diff} vs scale {scale}");
    }

    // Each rank holds the base optimizer state plus its share of BSFA's.
    let (s1, s2) = (summary(&single), summary(&double));
    assert_eq!(s2["ranks"], 2);
    let one_rank = s1["optimizer_state_bytes_per_rank"][0].as_f64().unwrap();
    let per_rank: Vec<f64> = s2["optimizer_state_bytes_per_rank"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_f64().unwrap())
        .collect();
    let base = per_rank.iter().sum::<f64>() - one_rank;
    let bsfa = one_rank - base;
    assert!(base > 0.0 && bsfa > 0.0, "{per_rank:?} vs {one_rank}");
    for bytes in &per_rank {
        let share = (bytes - base) / bsfa;
        assert!((0.4..0.6).contains(&share), "share {share} of {per_rank:?}");
    }
    // Rank 1 wrote its BSFA shard beside rank 0's files.
    let step = one.join("checkpoints/step-00000030");
    assert!(!step.join("optimizer-rank-00001.safetensors").exists());
    let shard = two.join("checkpoints/step-00000030/optimizer-rank-00001.safetensors");
    let (tensors, _) = read_safetensors(&shard).unwrap();
    assert!(!tensors.is_empty() && tensors.keys().all(|k| k.contains(".bsfa_")));
}

#[test]
fn checkpoints_resume_on_another_rank_count() {
    let dir = tempfile::tempdir().unwrap();
    let reference = dir.path().join("reference");
    ok(run(&small_bsfa_run(&reference, 30, &["--threads", "2"])));
    let expected = logged(&reference);
    for (first, then) in [(2, 1), (1, 2)] {
        let out = dir.path().join(format!("{first}-then-{then}"));
        let ranks = |n: usize| -> Vec<String> {
            if n == 1 {
                vec!["--threads".into(), "2".into()]
            } else {
                vec!["--nproc-per-node".into(), n.to_string()]
            }
        };
        let with_ranks = |steps: usize, n: usize, more: &[&str]| {
            let mut a = small_bsfa_run(&out, steps, more);
            a.extend(ranks(n));
            a
        };
        ok(run(&with_ranks(10, first, &[])));
        ok(run(&with_ranks(30, then, &["--resume", "auto"])));
        let got = logged(&out);
        assert_eq!(got.len(), expected.len(), "{first} then {then} ranks");
        let worst = worst_relative_difference(&expected, &got);
        eprintln!("{first} ranks then {then}: largest relative loss difference {worst:.3e}");
        assert!(worst < 1e-4, "{first} then {then}: {worst}");
    }
}

#[test]
fn a_rank_that_dies_or_errors_stops_the_whole_job() {
    let dir = tempfile::tempdir().unwrap();
    for (kind, expected) in [
        ("rank-error", "rank 1 of 2 failed: failpoint"),
        ("rank-abort", "rank 1 of 2 left the job"),
    ] {
        let out = dir.path().join(kind);
        let child = spawn(
            &small_bsfa_run(&out, 200, &["--nproc-per-node", "2"]),
            &[
                ("BSFA_TRAIN_FAILPOINT", format!("{kind}:1:3")),
                ("BSFA_TRAIN_TEST_HOOKS", "1".into()),
            ],
        );
        let (output, took) = wait_bounded(child, Duration::from_secs(120));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{kind}: {stderr}");
        assert!(stderr.contains(expected), "{kind}: {stderr}");
        assert!(
            stderr.contains("launcher: the job failed: rank 1"),
            "{kind}: {stderr}"
        );
        assert!(took < Duration::from_secs(60), "{kind} took {took:?}");
    }
}

/// Ranks started by another launcher (torchrun's variables): no parent watches them, so
/// the ranks themselves must notice a dead or silent peer.
#[test]
fn ranks_started_by_an_outside_launcher_detect_dead_and_silent_peers() {
    let dir = tempfile::tempdir().unwrap();
    for (kind, expected) in [
        ("rank-abort", "rank 1 of 2 left the job"),
        ("rank-hang", "rank 1 of 2 sent nothing for 3 s"),
    ] {
        let out = dir.path().join(kind);
        let port = free_port();
        let ranks: Vec<Child> = (0..2)
            .map(|rank| {
                spawn(
                    &small_bsfa_run(
                        &out,
                        200,
                        &["--set", "train.dist_timeout_s=3", "--threads", "1"],
                    ),
                    &[
                        ("RANK", rank.to_string()),
                        ("WORLD_SIZE", "2".into()),
                        ("MASTER_ADDR", "127.0.0.1".into()),
                        ("MASTER_PORT", port.to_string()),
                        ("BSFA_TRAIN_FAILPOINT", format!("{kind}:1:3")),
                        ("BSFA_TRAIN_TEST_HOOKS", "1".into()),
                    ],
                )
            })
            .collect();
        let mut ranks = ranks.into_iter();
        let (root, culprit) = (ranks.next().unwrap(), ranks.next().unwrap());
        let (output, took) = wait_bounded(root, Duration::from_secs(120));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{kind}: {stderr}");
        assert!(stderr.contains(expected), "{kind}: {stderr}");
        assert!(took < Duration::from_secs(60), "{kind} took {took:?}");
        // The hung rank would sleep forever: an outside launcher reaps it.
        let mut culprit = culprit;
        let _ = culprit.kill();
        let _ = culprit.wait();
    }
}

#[test]
fn sigterm_to_the_launcher_checkpoints_every_rank_at_one_step() {
    let dir = tempfile::tempdir().unwrap();
    let (stopped, straight) = (dir.path().join("stopped"), dir.path().join("straight"));
    let two = ["--nproc-per-node", "2"];
    let child = spawn(&small_bsfa_run(&stopped, 400, &two), &[]);
    // Stop once a few steps are logged.
    wait_until_logged(&stopped, 3);
    sigterm(&child);
    let (output, _) = wait_bounded(child, Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(143), "{stderr}");
    let step = summary(&output)["steps"].as_u64().unwrap() as usize;
    let dir_of = stopped.join(format!("checkpoints/step-{step:08}"));
    assert!(
        dir_of.join("optimizer-rank-00001.safetensors").exists(),
        "{stderr}"
    );

    // Resuming continues exactly as a 2-rank run that never stopped.
    let to = step + 3;
    ok(run(&small_bsfa_run(
        &stopped,
        to,
        &["--nproc-per-node", "2", "--resume", "auto"],
    )));
    ok(run(&small_bsfa_run(&straight, to, &two)));
    let (a, b) = (logged(&straight), logged(&stopped));
    let a: Vec<_> = a.iter().filter(|(_, k, _)| *k == "loss").collect();
    let b: Vec<_> = b.iter().filter(|(_, k, _)| *k == "loss").collect();
    assert_eq!(a, b);
}

/// The pids of `parent`'s children, from /proc.
fn children_of(parent: u32) -> Vec<i32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // `pid (name) state ppid ...`: the name may hold spaces and parentheses.
        let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let ppid = after_name.split_whitespace().nth(1);
        if ppid.and_then(|p| p.parse::<u32>().ok()) == Some(parent) {
            children.push(pid);
        }
    }
    children
}

/// Whether process `pid` still runs (a zombie has ended).
fn alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().next());
    state.is_some_and(|s| s != "Z" && s != "X")
}

/// Processes that are not this test's children, killed when dropped if they still run.
struct KillPids(Vec<i32>);

impl Drop for KillPids {
    fn drop(&mut self) {
        for &pid in self.0.iter().filter(|&&pid| alive(pid)) {
            // SAFETY: kill(2); the pids are ranks this test started, checked alive just now.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// A launcher killed outright (SIGKILL: it passes nothing on) takes its ranks with it:
/// the system sends them SIGTERM, so they checkpoint at one step and exit instead of
/// training on under PID 1.
#[test]
fn ranks_stop_and_checkpoint_when_their_launcher_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let log = dir.path().join("stderr.txt");
    let mut launcher = std::process::Command::new(common::BIN)
        .args(small_bsfa_run(&out, 100_000, &["--nproc-per-node", "2"]))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_until_logged(&out, 3);
    let ranks = KillPids(children_of(launcher.id()));
    assert_eq!(ranks.0.len(), 2, "the launcher's ranks: {:?}", ranks.0);
    // A dying process with several threads hands its children from thread to thread, and
    // each move sends them SIGTERM again: a second one ends a rank without its checkpoint.
    let threads = std::fs::read_dir(format!("/proc/{}/task", launcher.id()))
        .unwrap()
        .count();
    assert_eq!(threads, 1, "the launcher must stay single-threaded");
    launcher.kill().unwrap();
    launcher.wait().unwrap();
    let killed = Instant::now();
    while ranks.0.iter().any(|&pid| alive(pid)) {
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "ranks {:?} outlived their launcher by a minute",
            ranks.0
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let stderr = std::fs::read_to_string(&log).unwrap();
    let stopped = stderr
        .split("stopped by SIGTERM after step ")
        .nth(1)
        .unwrap_or_else(|| panic!("no checkpoint on the way out: {stderr}"));
    let step: usize = stopped.split_whitespace().next().unwrap().parse().unwrap();
    let checkpoint = out.join(format!("checkpoints/step-{step:08}"));
    assert!(
        checkpoint.join("optimizer-rank-00001.safetensors").exists(),
        "{stderr}"
    );
}

/// SIGHUP (a closed terminal or SSH session) stops a run as SIGTERM does, with a
/// checkpoint and exit status 129: one process, and a launcher passing it on to its ranks.
#[test]
fn sighup_checkpoints_and_exits_one_process_or_a_launchers_ranks() {
    let dir = tempfile::tempdir().unwrap();
    for (what, extra) in [
        ("one process", &[][..]),
        ("launcher", &["--nproc-per-node", "2"]),
    ] {
        let out = dir.path().join(what.replace(' ', "-"));
        let mut command = std::process::Command::new(common::BIN);
        command
            .args(small_bsfa_run(&out, 100_000, extra))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        // SAFETY: signal(2) between fork and exec. Under a test runner started by nohup the
        // run would inherit an ignored SIGHUP, and rightly keep ignoring it.
        unsafe {
            command.pre_exec(|| {
                libc::signal(libc::SIGHUP, libc::SIG_DFL);
                Ok(())
            })
        };
        let child = command.spawn().unwrap();
        wait_until_logged(&out, 3);
        // SAFETY: kill(2) on a child this test spawned and has not reaped.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGHUP) }, 0);
        let (output, _) = wait_bounded(child, Duration::from_secs(120));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(129), "{what}: {stderr}");
        assert!(stderr.contains("stopped by SIGHUP"), "{what}: {stderr}");
        let summary = summary(&output);
        assert_eq!(summary["interrupted_by"], "SIGHUP", "{what}");
        let step = summary["steps"].as_u64().unwrap() as usize;
        let checkpoint = out.join(format!("checkpoints/step-{step:08}"));
        assert!(checkpoint.join("trainer.json").exists(), "{what}: {stderr}");
    }
}
