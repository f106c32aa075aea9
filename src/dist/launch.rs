//! `--nproc-per-node N` (or a Kubeflow pod's `PET_NPROC_PER_NODE`): runs this node's ranks
//! of this same command, as torchrun does, and watches them. A rank that fails stops the
//! others; a signal to the launcher (Ctrl-C, `docker stop`, a closed terminal) is passed on
//! once to every rank, which checkpoint and exit. Ranks also get SIGTERM when the launcher
//! dies without passing anything on (`kill -9`): they never outlive it.

use super::env::{generate_secret, NodeLaunch, SECRET_VAR};
use super::PEER_FAILED_STATUS;
use crate::interrupt;
use anyhow::{bail, Context, Result};
use signal_hook::iterator::Signals;
use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// How long the other ranks get to stop by themselves after one failed, before they are
/// killed.
const GRACE: Duration = Duration::from_secs(15);

/// The node of `--nproc-per-node N` on one machine: rank 0 on loopback, at `MASTER_PORT`
/// or else (unset or 0) a free port, which this launcher picks and passes to its ranks.
pub fn single_node(nproc: usize) -> Result<NodeLaunch> {
    let port = std::env::var("MASTER_PORT").ok();
    let master_port = port
        .as_deref()
        .filter(|p| p.trim() != "0")
        .map(super::env::parse_port)
        .transpose()?;
    Ok(NodeLaunch {
        nproc,
        nnodes: 1,
        node_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port,
    })
}

/// Spawns `node.nproc` copies of this binary with `args` (the command line without
/// `--nproc-per-node`) and torchrun's variables, waits for all of them, and returns the
/// exit status for the launcher: 0 when every rank succeeded, rank 0's status after a
/// signal, otherwise non-zero after naming the first rank that failed.
pub fn run(node: &NodeLaunch, args: &[OsString]) -> Result<u8> {
    let nproc = node.nproc;
    if nproc == 0 {
        bail!("--nproc-per-node must be at least 1");
    }
    let exe = std::env::current_exe().context("cannot find this program's path to start ranks")?;
    let port = match node.master_port {
        Some(port) => port,
        None => free_port()?,
    };
    let world = node.nnodes * nproc;
    // The ranks of one node prove to rank 0 that they belong to this job with a secret the
    // launcher makes up, unless one is given. Several nodes (Kubeflow pods) would each make
    // up their own: theirs must come from outside, or is derived (see `env::JobSecret`).
    let secret = match std::env::var_os(SECRET_VAR) {
        None if node.nnodes == 1 => Some(generate_secret()?),
        _ => None,
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Caught before the first rank starts: a signal while they start is passed on to them
    // once they all run, instead of killing the launcher.
    let signals = Signals::new(interrupt::stop_signals())
        .context("cannot install the launcher's signal handlers")?;
    let mut children: Vec<Child> = Vec::with_capacity(nproc);
    for local_rank in 0..nproc {
        let rank = node.node_rank * nproc + local_rank;
        let mut command = Command::new(&exe);
        command
            .args(args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", local_rank.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", &node.master_addr)
            .env("MASTER_PORT", port.to_string())
            .envs(secret.iter().map(|s| (SECRET_VAR, s)))
            // A terminal's Ctrl-C reaches only the launcher, which passes it on exactly once
            // (a second signal would make a rank exit without its checkpoint).
            .process_group(0);
        die_with_launcher(&mut command);
        if std::env::var_os("BSFA_RANK_THREADS").is_none() {
            // The ranks share the cores, unless told otherwise (`--threads` still wins).
            command.env("BSFA_RANK_THREADS", (cores / nproc).max(1).to_string());
        }
        match command.spawn() {
            Ok(child) => children.push(child),
            Err(e) => {
                for child in children.iter_mut() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                return Err(e).with_context(|| format!("cannot start rank {rank}"));
            }
        }
    }
    watch(children, signals)
}

/// Makes the rank that `command` starts get SIGTERM (checkpoint and exit) when the launcher
/// dies, even by SIGKILL: left running, it would train on to the end under PID 1 and
/// collide with a relaunch. The launcher has one thread, which spawns the ranks: when a
/// process with several threads dies, Linux hands its children from thread to thread and
/// sends the signal at each move, and a second SIGTERM makes a rank exit at once, without
/// its checkpoint.
#[cfg(target_os = "linux")]
fn die_with_launcher(command: &mut Command) {
    let launcher = std::process::id();
    // SAFETY: the closure runs in the child between fork and exec and calls only prctl(2)
    // and getppid(2), which are async-signal-safe, and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The launcher may have died before prctl: the rank has a new parent already
            // and would never get the signal, so it does not start.
            if libc::getppid() as u32 != launcher {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        })
    };
}

/// Elsewhere there is no parent-death signal: ranks rely on the launcher passing signals on.
#[cfg(not(target_os = "linux"))]
fn die_with_launcher(_command: &mut Command) {}

/// Sends `signal` to the ranks not yet reaped (a reaped rank's pid may belong to another
/// process by now).
fn signal_running(pids: &[u32], statuses: &[Option<ExitStatus>], signal: i32) {
    for (pid, status) in pids.iter().zip(statuses) {
        if status.is_none() {
            // SAFETY: kill(2) on a child we spawned and have not reaped.
            unsafe { libc::kill(*pid as libc::pid_t, signal) };
        }
    }
}

/// Waits for the ranks; see [`run`] for the returned status. Every stop signal (SIGINT,
/// SIGTERM, SIGHUP) the launcher gets is passed on to the ranks: the first makes them
/// checkpoint and exit, a second makes them exit at once. This loop does it, not a thread
/// of its own: see [`die_with_launcher`].
fn watch(mut children: Vec<Child>, mut signals: Signals) -> Result<u8> {
    let pids: Vec<u32> = children.iter().map(Child::id).collect();
    let mut statuses: Vec<Option<ExitStatus>> = vec![None; children.len()];
    // Ranks that failed, in the order noticed.
    let mut failures: Vec<(usize, ExitStatus)> = Vec::new();
    let mut first_failure: Option<Instant> = None;
    let (mut killed, mut signalled) = (false, false);
    loop {
        for signal in signals.pending() {
            // Ranks then exit 129, 130 or 143 by request.
            signalled = true;
            signal_running(&pids, &statuses, signal);
        }
        for (rank, child) in children.iter_mut().enumerate() {
            if statuses[rank].is_some() {
                continue;
            }
            let Some(status) = child.try_wait()? else {
                continue;
            };
            statuses[rank] = Some(status);
            let requested = signalled && status.code().is_some_and(interrupt::is_stop_status);
            if status.success() || requested {
                continue;
            }
            failures.push((rank, status));
            if first_failure.is_none() {
                eprintln!(
                    "launcher: rank {rank} {}; stopping the other ranks",
                    describe(status)
                );
                first_failure = Some(Instant::now());
                signal_running(&pids, &statuses, libc::SIGTERM);
            }
        }
        if statuses.iter().all(Option::is_some) {
            break;
        }
        if first_failure.is_some_and(|at| at.elapsed() > GRACE) && !killed {
            killed = true;
            signal_running(&pids, &statuses, libc::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // The rank at fault is the first that did not fail because of another rank.
    let culprit = failures
        .iter()
        .find(|(_, s)| s.code() != Some(i32::from(PEER_FAILED_STATUS)))
        .or(failures.first());
    if let Some((rank, status)) = culprit {
        eprintln!(
            "launcher: the job failed: rank {rank} {}",
            describe(*status)
        );
        return Ok(status.code().filter(|&c| c > 0 && c < 256).unwrap_or(1) as u8);
    }
    let first = statuses[0].expect("every rank has exited");
    Ok(first.code().map_or(1, |c| c as u8))
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        _ => "ended".to_string(),
    }
}

/// A TCP port free right now, for rank 0 to listen on.
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
        .context("cannot find a free port for the ranks (set MASTER_PORT)")?;
    Ok(listener.local_addr()?.port())
}
