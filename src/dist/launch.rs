//! `--nproc-per-node N` (or a Kubeflow pod's `PET_NPROC_PER_NODE`): runs this node's ranks
//! of this same command, as torchrun does, and watches them. A rank that fails stops the
//! others; a signal to the launcher (Ctrl-C, `docker stop`) is passed on once to every rank,
//! which checkpoint and exit.

use super::env::NodeLaunch;
use super::PEER_FAILED_STATUS;
use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the other ranks get to stop by themselves after one failed, before they are
/// killed.
const GRACE: Duration = Duration::from_secs(15);

/// The node of `--nproc-per-node N` on one machine: rank 0 on loopback, at `MASTER_PORT`
/// or else a free port.
pub fn single_node(nproc: usize) -> Result<NodeLaunch> {
    let port = std::env::var("MASTER_PORT").ok();
    let master_port = port.as_deref().map(super::env::parse_port).transpose()?;
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
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
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
            // A terminal's Ctrl-C reaches only the launcher, which passes it on exactly once
            // (a second signal would make a rank exit without its checkpoint).
            .process_group(0);
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
    let ranks = Arc::new(Ranks {
        pids: children.iter().map(Child::id).collect(),
        running: children.iter().map(|_| AtomicBool::new(true)).collect(),
        signalled: AtomicBool::new(false),
    });
    forward_signals(Arc::clone(&ranks))?;
    watch(children, &ranks)
}

/// The ranks' processes, shared with the signal-forwarding thread.
struct Ranks {
    pids: Vec<u32>,
    /// Cleared once a rank has been reaped: its pid may belong to another process then.
    running: Vec<AtomicBool>,
    /// Set once the launcher passed a signal on: ranks then exit 130/143 by request.
    signalled: AtomicBool,
}

impl Ranks {
    fn signal(&self, signal: i32) {
        for (pid, running) in self.pids.iter().zip(&self.running) {
            if running.load(Ordering::SeqCst) {
                // SAFETY: kill(2) on a child we spawned and have not reaped.
                unsafe { libc::kill(*pid as libc::pid_t, signal) };
            }
        }
    }
}

/// Passes every SIGINT/SIGTERM the launcher gets on to the ranks: the first makes them
/// checkpoint and exit, a second makes them exit at once.
fn forward_signals(ranks: Arc<Ranks>) -> Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM])
        .context("cannot install the launcher's signal handlers")?;
    std::thread::Builder::new()
        .name("signal-forwarder".into())
        .spawn(move || {
            for signal in signals.forever() {
                ranks.signalled.store(true, Ordering::SeqCst);
                ranks.signal(signal);
            }
        })?;
    Ok(())
}

/// Waits for the ranks; see [`run`] for the returned status.
fn watch(mut children: Vec<Child>, ranks: &Ranks) -> Result<u8> {
    let mut statuses: Vec<Option<ExitStatus>> = vec![None; children.len()];
    // Ranks that failed, in the order noticed.
    let mut failures: Vec<(usize, ExitStatus)> = Vec::new();
    let mut first_failure: Option<Instant> = None;
    let mut killed = false;
    loop {
        for (rank, child) in children.iter_mut().enumerate() {
            if statuses[rank].is_some() {
                continue;
            }
            // Cleared before the reaping try_wait, so the forwarder does not signal a reaped
            // pid (which the system may give to another process).
            ranks.running[rank].store(false, Ordering::SeqCst);
            let Some(status) = child.try_wait()? else {
                ranks.running[rank].store(true, Ordering::SeqCst);
                continue;
            };
            statuses[rank] = Some(status);
            let requested = ranks.signalled.load(Ordering::SeqCst)
                && status.code().is_some_and(|c| c == 130 || c == 143);
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
                ranks.signal(libc::SIGTERM);
            }
        }
        if statuses.iter().all(Option::is_some) {
            break;
        }
        if first_failure.is_some_and(|at| at.elapsed() > GRACE) && !killed {
            killed = true;
            ranks.signal(libc::SIGKILL);
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
