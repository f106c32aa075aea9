//! An exclusive lock on a file, held while one process prepares data that others then read.

use crate::interrupt;
use anyhow::{Context, Result};
use std::fs::{File, TryLockError};
use std::path::Path;
use std::time::{Duration, Instant};

/// How often a waiting process says that it still waits.
const REPORT_EVERY: Duration = Duration::from_secs(30);

/// Takes the exclusive lock on `path` (created if missing), waiting as long as another
/// process holds it: the holder may take hours. The wait reports itself every half minute
/// and ends at once on a signal. The lock is released when the returned file is dropped
/// (or the process dies).
pub fn exclusive(path: &Path, what: &str) -> Result<File> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create '{}'", parent.display()))?;
    }
    let file = File::create(path)
        .with_context(|| format!("cannot create the lock file '{}'", path.display()))?;
    let (started, mut reported) = (Instant::now(), Instant::now());
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(TryLockError::WouldBlock) => {}
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock '{}'", path.display()))
            }
        }
        if reported.elapsed() >= REPORT_EVERY {
            reported = Instant::now();
            eprintln!(
                "waiting for another process to prepare {what} ({} s so far; it holds '{}')",
                started.elapsed().as_secs(),
                path.display()
            );
        }
        interrupt::sleep(Duration::from_millis(200))?;
    }
}
