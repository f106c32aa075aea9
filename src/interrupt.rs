//! Graceful stops on SIGINT and SIGTERM (Ctrl-C, preemption): the first signal asks the
//! training loop to finish its step, write a checkpoint and exit; a second one exits at once.

use anyhow::Result;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

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
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
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
        _ => "a signal",
    }
}
