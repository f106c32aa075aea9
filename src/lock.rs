//! Exclusive locks on files, flock-style (std's `File::try_lock`): the system releases a
//! lock when its holder's file is closed or its process dies, so even `kill -9` leaves no
//! stale lock behind. The holder writes its pid and host into the lock file, so that the
//! others can say whom they wait for or collide with.

use crate::interrupt;
use anyhow::{Context, Result};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

/// How often a waiting process says that it still waits.
const REPORT_EVERY: Duration = Duration::from_secs(30);

/// How long [`holder`] waits for a holder that has just taken a lock to write its name.
const HOLDER_WRITES_WITHIN: Duration = Duration::from_millis(500);

/// Takes the exclusive lock on `path` (created if missing), waiting as long as another
/// process holds it: the holder may take hours. The wait reports itself every half minute
/// and ends at once on a signal. The lock is released when the returned file is dropped
/// (or the process dies).
pub fn exclusive(path: &Path, what: &str) -> Result<File> {
    let file = open(path)?;
    let (started, mut reported) = (Instant::now(), Instant::now());
    while !try_lock(&file, path)? {
        if reported.elapsed() >= REPORT_EVERY {
            reported = Instant::now();
            eprintln!(
                "waiting for another process ({}) to prepare {what} ({} s so far; it holds '{}')",
                holder(path),
                started.elapsed().as_secs(),
                path.display()
            );
        }
        interrupt::sleep(Duration::from_millis(200))?;
    }
    write_holder(&file, path)?;
    Ok(file)
}

/// Takes the exclusive lock on `path` (created if missing) if no other process holds it:
/// one try, no wait. None when another process holds it ([`holder`] names it). The lock is
/// released when the returned file is dropped (or the process dies).
pub fn try_exclusive(path: &Path) -> Result<Option<File>> {
    let file = open(path)?;
    if !try_lock(&file, path)? {
        return Ok(None);
    }
    write_holder(&file, path)?;
    Ok(Some(file))
}

/// The holder of the lock on `path` as it wrote itself there (`pid 1234 on host node0`),
/// for messages.
pub fn holder(path: &Path) -> String {
    let started = Instant::now();
    loop {
        // A holder that has just taken the lock may not have written its name yet.
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let text = text.trim();
        if !text.is_empty() {
            return text.to_string();
        }
        if started.elapsed() >= HOLDER_WRITES_WITHIN {
            return "a process that has not written its pid into the lock file".into();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Opens the lock file, creating it and its folder if missing. Not truncated: the current
/// holder's name in it must stay readable.
fn open(path: &Path) -> Result<File> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create '{}'", parent.display()))?;
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("cannot create the lock file '{}'", path.display()))
}

/// One try at the lock: false when another process holds it.
fn try_lock(file: &File, path: &Path) -> Result<bool> {
    match file.try_lock() {
        Ok(()) => Ok(true),
        Err(TryLockError::WouldBlock) => Ok(false),
        Err(TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock '{}'", path.display()))
        }
    }
}

/// Replaces the lock file's text (a previous holder's, or nothing) with this process's
/// pid and host.
fn write_holder(mut file: &File, path: &Path) -> Result<()> {
    let me = format!("pid {} on host {}\n", std::process::id(), hostname());
    file.set_len(0)
        .and_then(|()| file.write_all(me.as_bytes()))
        .with_context(|| format!("cannot write to the lock file '{}'", path.display()))
}

/// This machine's name (out folders may be shared between machines), `unknown` if unset.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}
