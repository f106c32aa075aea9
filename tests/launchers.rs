//! The job under the launchers users start it with: each 2-rank run must log the losses of
//! the `--nproc-per-node 2` run, and a SIGTERM to the launcher must leave a checkpoint that
//! resumes exactly.
//!
//! Real launchers where the machine has them: torchrun (`BSFA_TORCHRUN`, or `torchrun` on
//! the PATH), Open MPI's `mpirun.openmpi` and MPICH's `mpirun.mpich`. `.ci/run` installs
//! them and sets `BSFA_REQUIRE_TOOLS=1`, so that CI fails where a developer's machine
//! skips. Slurm's `srun` and a Kubeflow PyTorchJob are played by stand-ins that set the
//! variables those launchers set and stop ranks as they do: SIGTERM to every rank, SIGKILL
//! after the grace period.

mod common;

use common::ranks::{free_port, logged_steps, sigterm, spawn, stops_before_training, wait_bounded};
use common::tools::tool;
use common::{logged, ok, run, small_bsfa_run, strings, summary, worst_relative_difference, BIN};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Steps of every compared run: a checkpoint at 10, an evaluation at 10.
const STEPS: usize = 12;

/// A learning rate that stays at its peak after warm-up, whatever the run's length: a run
/// stopped at an unpredictable step then resumes onto the schedule of a shorter straight run.
const FLAT_LR: [&str; 2] = ["--set", "optimizer.min_lr_ratio=1"];

/// The job every stop test stops: long enough that only a signal ends it.
fn long_job(out: &Path) -> Vec<String> {
    small_bsfa_run(out, 400, &FLAT_LR)
}

/// The longest any launcher may take to stop its ranks after a SIGTERM.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(15);

/// The losses of the `--nproc-per-node 2` run every launcher must reproduce.
fn reference(dir: &Path) -> Vec<(u64, &'static str, f64)> {
    let out = dir.join("reference");
    ok(run(&small_bsfa_run(
        &out,
        STEPS,
        &["--nproc-per-node", "2"],
    )));
    logged(&out)
}

/// Checks that the run in `out` logged `reference`'s losses.
fn same_losses(reference: &[(u64, &'static str, f64)], out: &Path, what: &str) {
    let got = logged(out);
    assert_eq!(got.len(), reference.len(), "{what}: {got:?}");
    let worst = worst_relative_difference(reference, &got);
    assert!(worst < 1e-6, "{what}: relative difference {worst}");
}

/// Starts every command (one per launcher process) with captured output.
fn start(commands: Vec<Command>) -> Vec<Child> {
    commands
        .into_iter()
        .map(|mut c| {
            c.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("launcher starts")
        })
        .collect()
}

/// Waits for every process, each bounded; returns their outputs and the time until the last
/// ended.
fn finish(children: Vec<Child>) -> (Vec<Output>, Duration) {
    let started = Instant::now();
    let outputs = children
        .into_iter()
        .map(|c| wait_bounded(c, Duration::from_secs(180)).0)
        .collect();
    (outputs, started.elapsed())
}

fn all_succeeded(outputs: &[Output], what: &str) {
    for o in outputs {
        assert!(
            o.status.success(),
            "{what}: {:?}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// torchrun running this binary (`--no-python`) with `launcher_args`.
fn torchrun(program: &[PathBuf], launcher_args: &[String], job: &[String]) -> Command {
    let mut command = Command::new(&program[0]);
    command
        .args(&program[1..])
        .args(launcher_args)
        .arg("--no-python")
        .arg(BIN)
        .args(job);
    command
}

/// `python -m torch.distributed.run` with the Python that runs `torchrun` (its neighbour in
/// a virtual environment's `bin`, else `python3`).
fn python_module(torchrun: &Path) -> Vec<PathBuf> {
    let beside = torchrun.with_file_name("python3");
    let python = if beside.is_file() {
        beside
    } else {
        PathBuf::from("python3")
    };
    vec![python, "-m".into(), "torch.distributed.run".into()]
}

#[test]
fn torchrun_single_and_multi_node_match_nproc_per_node() {
    let Some(program) = tool("BSFA_TORCHRUN", &["torchrun"]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let reference = reference(dir.path());
    let torchrun_program = vec![program.clone()];
    // (name, launcher invocations: one per node)
    let cases: Vec<(&str, Vec<Command>)> = vec![
        ("static, one node", {
            let out = dir.path().join("static-1");
            let port = free_port().to_string();
            vec![torchrun(
                &torchrun_program,
                &strings(&["--nproc-per-node", "2", "--master-port", &port]),
                &small_bsfa_run(&out, STEPS, &[]),
            )]
        }),
        ("standalone (c10d), python -m torch.distributed.run", {
            let out = dir.path().join("standalone");
            vec![torchrun(
                &python_module(&program),
                &strings(&["--standalone", "--nproc-per-node", "2"]),
                &small_bsfa_run(&out, STEPS, &[]),
            )]
        }),
        ("static, two nodes", {
            let out = dir.path().join("static-2");
            let port = free_port().to_string();
            (0..2)
                .map(|node| {
                    let node = node.to_string();
                    let launch = strings(&[
                        "--nnodes",
                        "2",
                        "--node-rank",
                        &node,
                        "--nproc-per-node",
                        "1",
                        "--master-addr",
                        "127.0.0.1",
                        "--master-port",
                        &port,
                    ]);
                    torchrun(
                        &torchrun_program,
                        &launch,
                        &small_bsfa_run(&out, STEPS, &[]),
                    )
                })
                .collect()
        }),
        ("c10d, two nodes", {
            let out = dir.path().join("c10d-2");
            let endpoint = format!("127.0.0.1:{}", free_port());
            (0..2)
                .map(|_| {
                    let launch = strings(&[
                        "--nnodes",
                        "2",
                        "--nproc-per-node",
                        "1",
                        "--rdzv-backend",
                        "c10d",
                        "--rdzv-endpoint",
                        &endpoint,
                        "--rdzv-id",
                        "bsfa-test",
                    ]);
                    torchrun(
                        &torchrun_program,
                        &launch,
                        &small_bsfa_run(&out, STEPS, &[]),
                    )
                })
                .collect()
        }),
    ];
    let outs = ["static-1", "standalone", "static-2", "c10d-2"];
    for ((what, commands), out) in cases.into_iter().zip(outs) {
        let (outputs, took) = finish(start(commands));
        all_succeeded(&outputs, what);
        same_losses(&reference, &dir.path().join(out), what);
        eprintln!(
            "torchrun {what}: {STEPS} steps in {:.1} s",
            took.as_secs_f64()
        );
    }
}

#[test]
fn torchrun_restarts_a_crashed_job_from_its_checkpoint() {
    let Some(program) = tool("BSFA_TORCHRUN", &["torchrun"]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let reference = reference(dir.path());
    let out = dir.path().join("restarted");
    let port = free_port().to_string();
    let launch = strings(&[
        "--nproc-per-node",
        "2",
        "--master-port",
        &port,
        "--max-restarts",
        "1",
    ]);
    let mut command = torchrun(
        &[program],
        &launch,
        &small_bsfa_run(&out, STEPS, &["--resume", "auto"]),
    );
    // Rank 1 dies after step 11 of the first attempt; the restart resumes from step 10.
    command.env("BSFA_TRAIN_FAILPOINT", "rank-abort:1:11");
    command.env("BSFA_TRAIN_TEST_HOOKS", "1");
    let (outputs, _) = finish(start(vec![command]));
    all_succeeded(&outputs, "--max-restarts 1");
    let stderr = String::from_utf8_lossy(&outputs[0].stderr);
    assert!(stderr.contains("resum"), "no resume in: {stderr}");
    same_losses(&reference, &out, "restarted");
}

/// Starts `commands`, sends SIGTERM to `signalled` (the launcher processes) once three steps
/// are logged in `out`, and checks that everything stops within [`SHUTDOWN_LIMIT`] with a
/// checkpoint that resumes exactly as a run that never stopped. Returns the start-up time
/// (until the first step is logged) and the shutdown time (from the signal until every
/// launcher process exited).
fn stops_and_resumes(
    dir: &Path,
    out: &Path,
    commands: Vec<Command>,
    what: &str,
) -> (Duration, Duration) {
    let children = start(commands);
    let started = Instant::now();
    let mut startup = None;
    while logged_steps(out) < 3 {
        if startup.is_none() && logged_steps(out) > 0 {
            startup = Some(started.elapsed());
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{what}: no progress"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let startup = startup.unwrap_or_else(|| started.elapsed());
    for child in &children {
        sigterm(child);
    }
    let (outputs, took) = finish(children);
    let stderr: String = outputs
        .iter()
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .collect();
    assert!(
        took < SHUTDOWN_LIMIT,
        "{what}: stopping took {took:?}\n{stderr}"
    );
    assert!(stderr.contains("checkpoint saved"), "{what}: {stderr}");
    let step = latest_checkpoint(out);
    assert!(step >= 3, "{what}: checkpoint at {step}");
    let checkpoint = out.join(format!("checkpoints/step-{step:08}"));
    assert!(
        checkpoint.join("optimizer-rank-00001.safetensors").exists(),
        "{what}: rank 1's shard is missing\n{stderr}"
    );
    let to = step + 3;
    let two = ["--nproc-per-node", "2"];
    ok(run(&small_bsfa_run(
        out,
        to,
        &[&two[..], &FLAT_LR, &["--resume", "auto"]].concat(),
    )));
    let straight = dir.join(format!("straight-{to}"));
    if !straight.exists() {
        ok(run(&small_bsfa_run(
            &straight,
            to,
            &[&two[..], &FLAT_LR].concat(),
        )));
    }
    let losses = |o: &Path| -> Vec<(u64, f64)> {
        logged(o)
            .into_iter()
            .filter(|(_, k, _)| *k == "loss")
            .map(|(s, _, v)| (s, v))
            .collect()
    };
    assert_eq!(
        losses(out),
        losses(&straight),
        "{what}: resumed run differs"
    );
    (startup, took)
}

/// The step of the newest checkpoint in `out`.
fn latest_checkpoint(out: &Path) -> usize {
    std::fs::read_dir(out.join("checkpoints"))
        .expect("a checkpoints folder")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_prefix("step-")?.parse().ok()
        })
        .max()
        .expect("a checkpoint")
}

#[test]
fn sigterm_to_torchrun_leaves_a_resumable_checkpoint() {
    let Some(program) = tool("BSFA_TORCHRUN", &["torchrun"]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("stopped");
    let port = free_port().to_string();
    let command = torchrun(
        &[program],
        &strings(&["--nproc-per-node", "2", "--master-port", &port]),
        &long_job(&out),
    );
    let (startup, took) = stops_and_resumes(dir.path(), &out, vec![command], "torchrun");
    eprintln!(
        "torchrun: first step after {:.2} s; stopped {:.2} s after SIGTERM",
        startup.as_secs_f64(),
        took.as_secs_f64()
    );
}

/// `mpirun -np 2` of Open MPI or MPICH, with the variables Open MPI needs to run as root.
fn mpirun(program: &Path, job: &[String], port: u16) -> Command {
    let mut command = Command::new(program);
    command
        .args(["-np", "2"])
        .arg(BIN)
        .args(job)
        .env("MASTER_PORT", port.to_string())
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1");
    command
}

#[test]
fn mpirun_of_open_mpi_and_mpich_match_and_stop_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut reference_losses = None;
    for (var, name) in [
        ("BSFA_MPIRUN_OPENMPI", "mpirun.openmpi"),
        ("BSFA_MPIRUN_MPICH", "mpirun.mpich"),
    ] {
        let Some(program) = tool(var, &[name]) else {
            continue;
        };
        let reference = reference_losses.get_or_insert_with(|| reference(dir.path()));
        let out = dir.path().join(name);
        let (outputs, took) = finish(start(vec![mpirun(
            &program,
            &small_bsfa_run(&out, STEPS, &[]),
            free_port(),
        )]));
        all_succeeded(&outputs, name);
        assert_eq!(summary(&outputs[0])["ranks"], 2, "{name}");
        same_losses(reference, &out, name);
        let stopped = dir.path().join(format!("{name}-stopped"));
        let command = mpirun(&program, &long_job(&stopped), free_port());
        let (startup, shutdown) = stops_and_resumes(dir.path(), &stopped, vec![command], name);
        eprintln!(
            "{name}: {STEPS} steps in {:.1} s; first step after {:.2} s; stopped {:.2} s after SIGTERM",
            took.as_secs_f64(),
            startup.as_secs_f64(),
            shutdown.as_secs_f64()
        );
    }
}

/// One rank as a launcher stand-in starts it: the binary with `vars`, in its own process
/// group as a remote node's would be (a signal reaches it only when sent to it).
fn rank_command(job: &[String], vars: &[(&str, String)]) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(job)
        .envs(vars.iter().map(|(k, v)| (*k, v.clone())))
        .process_group(0);
    command
}

/// Slurm's variables for task `rank` of a 2-task step on one node (`srun -n 2`).
fn srun_vars(rank: usize, job_id: u32) -> Vec<(&'static str, String)> {
    vec![
        ("SLURM_PROCID", rank.to_string()),
        ("SLURM_LOCALID", rank.to_string()),
        ("SLURM_NODEID", "0".into()),
        ("SLURM_STEP_NUM_TASKS", "2".into()),
        ("SLURM_STEP_NUM_NODES", "1".into()),
        ("SLURM_STEP_TASKS_PER_NODE", "2".into()),
        ("SLURM_STEP_NODELIST", "localhost".into()),
        ("SLURM_JOB_ID", job_id.to_string()),
        ("SLURM_STEP_ID", "0".into()),
    ]
}

/// Kubeflow PyTorchJob variables of pod `rank` of 2, one process per pod.
fn pod_vars(rank: usize, port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("RANK", rank.to_string()),
        ("WORLD_SIZE", "2".into()),
        ("MASTER_ADDR", "localhost".into()),
        ("MASTER_PORT", port.to_string()),
        ("PET_NPROC_PER_NODE", "1".into()),
        ("PET_NNODES", "2".into()),
        ("PET_NODE_RANK", rank.to_string()),
    ]
}

/// A Kubeflow pod whose container runs this binary with `PET_NPROC_PER_NODE=2`: the
/// binary starts both ranks itself.
fn node_pod_vars(port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("RANK", "0".into()),
        ("WORLD_SIZE", "2".into()),
        ("MASTER_ADDR", "127.0.0.1".into()),
        ("MASTER_PORT", port.to_string()),
        ("PET_NPROC_PER_NODE", "2".into()),
        ("PET_NNODES", "1".into()),
        ("PET_NODE_RANK", "0".into()),
    ]
}

#[test]
fn srun_and_kubeflow_stand_ins_match_and_stop_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let reference = reference(dir.path());
    // Slurm derives the port from the job id (15000 + 8 job mod 40000): one whose port is
    // free now.
    let job_id = (std::process::id()..)
        .find(|job| {
            let port = 15000 + (u64::from(*job) * 8 % 40000) as u16;
            std::net::TcpListener::bind(("0.0.0.0", port)).is_ok()
        })
        .unwrap();
    type Layout = Box<dyn Fn(usize, u16) -> Vec<(&'static str, String)>>;
    let stand_ins: [(&str, usize, Layout); 3] = [
        ("srun", 2, Box::new(move |rank, _| srun_vars(rank, job_id))),
        ("PyTorchJob, a pod per rank", 2, Box::new(pod_vars)),
        (
            "PyTorchJob, a pod of 2",
            1,
            Box::new(|_, port| node_pod_vars(port)),
        ),
    ];
    for (i, (what, processes, vars)) in stand_ins.iter().enumerate() {
        let commands = |job: &[String]| -> Vec<Command> {
            let port = free_port();
            (0..*processes)
                .map(|rank| rank_command(job, &vars(rank, port)))
                .collect()
        };
        let out = dir.path().join(format!("stand-in-{i}"));
        let (outputs, took) = finish(start(commands(&small_bsfa_run(&out, STEPS, &[]))));
        all_succeeded(&outputs, what);
        same_losses(&reference, &out, what);
        let stopped = dir.path().join(format!("stand-in-{i}-stopped"));
        let (startup, shutdown) =
            stops_and_resumes(dir.path(), &stopped, commands(&long_job(&stopped)), what);
        eprintln!(
            "{what}: {STEPS} steps in {:.1} s; first step after {:.2} s; stopped {:.2} s after SIGTERM",
            took.as_secs_f64(),
            startup.as_secs_f64(),
            shutdown.as_secs_f64()
        );
    }
}

#[test]
fn a_signal_ends_the_wait_for_other_ranks() {
    let dir = tempfile::tempdir().unwrap();
    // Rank 0 waiting for rank 1, and rank 1 waiting for rank 0, each alone; rank 0 also
    // holds a connection that never says anything (it used to block rank 0 for 30 s).
    for rank in [0, 1] {
        let out = dir.path().join(format!("alone-{rank}"));
        let port = free_port();
        let vars = [
            ("RANK", rank.to_string()),
            ("WORLD_SIZE", "2".into()),
            ("MASTER_ADDR", "127.0.0.1".into()),
            ("MASTER_PORT", port.to_string()),
        ];
        let child = spawn(&small_bsfa_run(&out, STEPS, &[]), &vars);
        std::thread::sleep(Duration::from_millis(1500));
        let _silent = (rank == 0)
            .then(|| std::net::TcpStream::connect(("127.0.0.1", port)).expect("rank 0 listens"));
        std::thread::sleep(Duration::from_millis(200));
        let took = stops_before_training(child, &format!("rank {rank}"));
        assert!(took < Duration::from_secs(2), "rank {rank} took {took:?}");
        eprintln!(
            "rank {rank} left the join {:.2} s after SIGTERM",
            took.as_secs_f64()
        );
    }
}

/// The argument lists of the launch examples users copy: the Dockerfile's `docker run`, the
/// sbatch script's `srun` and the PyTorchJob's container args, each checked by a dry run
/// (on this CPU build, with `--device cpu` for `cuda`).
#[test]
fn documented_launch_commands_parse() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |file: &str| std::fs::read_to_string(root.join(file)).unwrap();
    // The command on the last line holding `marker` (continuation lines joined, comment
    // markers dropped), as words after the marker.
    let words_after = |text: &str, marker: &str| -> Vec<String> {
        let mut commands = vec![String::new()];
        for line in text.lines() {
            let line = line.trim_start_matches('#').trim();
            let current = commands.last_mut().unwrap();
            match line.strip_suffix('\\') {
                Some(continued) => current.push_str(continued),
                None => {
                    current.push_str(line);
                    commands.push(String::new());
                }
            }
        }
        let command = commands
            .iter()
            .rfind(|c| c.contains(marker))
            .unwrap_or_else(|| panic!("no {marker}"));
        command[command.find(marker).unwrap() + marker.len()..]
            .split_whitespace()
            .map(|w| w.trim_matches('"').to_string())
            .collect()
    };
    let docker = words_after(&read("Dockerfile"), "bsfa-train:cuda ");
    let srun = words_after(
        &read("scripts/slurm.sbatch"),
        "srun --kill-on-bad-exit=1 bsfa-train",
    );
    let manifest = read("scripts/pytorchjob.yaml");
    let list = &manifest[manifest.find("args: [").expect("container args") + 6..];
    let list = &list[..=list.find(']').unwrap()];
    let pod: Vec<String> = serde_json::from_str(&list.replace('\n', " ")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (what, mut words) in [("docker run", docker), ("srun", srun), ("PyTorchJob", pod)] {
        assert!(words.iter().any(|w| w == "--model"), "{what}: {words:?}");
        for w in words.iter_mut() {
            if w == "cuda" {
                *w = "cpu".into();
            }
            if w.starts_with("/runs/") || w == "$OUT" {
                *w = dir.path().join("run").display().to_string();
            }
        }
        let output = Command::new(BIN)
            .args(&words)
            .arg("--dry-run")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{what}: {words:?}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
