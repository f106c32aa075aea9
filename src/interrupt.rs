//! Graceful stops on SIGINT, SIGTERM and SIGHUP (Ctrl-C, preemption, a closed terminal or
//! SSH session): the first signal asks the training loop to finish its step, write a
//! checkpoint and exit; a second one exits at once.

use anyhow::Result;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

struct Flags {
    requested: Arc<AtomicBool>,
    signal: Arc<AtomicUsize>,
}

static FLAGS: OnceLock<Flags> = OnceLock::new();

/// Installs the handlers (once per process). Without this call [`requested`] is always None.
pub fn install() -> Result<()> {
    if FLAGS.get().is_some() {
        return Ok(());
    }
    let flags = Flags {
        requested: Arc::new(AtomicBool::new(false)),
        signal: Arc::new(AtomicUsize::new(0)),
    };
    for signal in stop_signals() {
        // Registered first, so it sees the flag as it was before this signal: a second
        // signal while the checkpoint is written ends the process with the usual status.
        signal_hook::flag::register_conditional_shutdown(
            signal,
            128 + signal,
            Arc::clone(&flags.requested),
        )?;
        signal_hook::flag::register(signal, Arc::clone(&flags.requested))?;
        signal_hook::flag::register_usize(signal, Arc::clone(&flags.signal), signal as usize)?;
    }
    let _ = FLAGS.set(flags);
    Ok(())
}

/// The signals that stop a run: SIGINT, SIGTERM and SIGHUP, but SIGHUP not when it is
/// ignored (`nohup`): whoever started the process asked it to outlive its terminal.
pub fn stop_signals() -> Vec<i32> {
    let mut signals = vec![libc::SIGINT, libc::SIGTERM];
    if !ignored(libc::SIGHUP) {
        signals.push(libc::SIGHUP);
    }
    signals
}

/// Whether `signal` is set to be ignored in this process (ignoring survives exec).
fn ignored(signal: i32) -> bool {
    // SAFETY: sigaction(2) with no new action only reads the current one into `current`.
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        libc::sigaction(signal, std::ptr::null(), &mut current) == 0
            && current.sa_sigaction == libc::SIG_IGN
    }
}

/// Whether a process's exit status says that a stop signal ended it (128 + the signal, as
/// shells report it, and as runs stopped by a signal exit).
pub fn is_stop_status(code: i32) -> bool {
    [libc::SIGINT, libc::SIGTERM, libc::SIGHUP].contains(&(code - 128))
}

/// The signal that asked for a stop, if one did.
pub fn requested() -> Option<i32> {
    let flags = FLAGS.get()?;
    flags
        .requested
        .load(Ordering::SeqCst)
        .then(|| flags.signal.load(Ordering::SeqCst) as i32)
}

/// A signal's conventional name, for messages.
pub fn signal_name(signal: i32) -> &'static str {
    match signal {
        signal_hook::consts::SIGINT => "SIGINT",
        signal_hook::consts::SIGTERM => "SIGTERM",
        signal_hook::consts::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}

/// The error of a wait that a signal cut short (joining the job, waiting for data).
#[derive(Debug, thiserror::Error)]
#[error("stopped by {} before training started", signal_name(*.0))]
pub struct Interrupted(pub i32);

/// Fails with [`Interrupted`] once a stop was requested: long waits call it, so that a
/// signal ends them within moments instead of after their timeout.
pub fn check() -> Result<()> {
    match requested() {
        Some(signal) => Err(Interrupted(signal).into()),
        None => Ok(()),
    }
}

/// The signal that cut a wait short, if `e` is (or was caused by) an [`Interrupted`].
pub fn interrupted_by(e: &anyhow::Error) -> Option<i32> {
    e.chain()
        .find_map(|c| c.downcast_ref::<Interrupted>())
        .map(|i| i.0)
}

/// Sleeps `pause` unless a stop is requested, in steps short enough to notice one; fails
/// with [`Interrupted`] then.
pub fn sleep(pause: Duration) -> Result<()> {
    let until = Instant::now() + pause;
    loop {
        check()?;
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}
