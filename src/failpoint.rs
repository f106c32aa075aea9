//! Test hooks that make a process fail at a chosen point, as a crash, a bug or a hung peer
//! would there. Set `BSFA_TRAIN_FAILPOINT` to `<kind>[:<rank>]:<step>`, together with
//! `BSFA_TRAIN_TEST_HOOKS=1`:
//!
//! | kind | where | what happens |
//! |---|---|---|
//! | `checkpoint-write` | while writing the checkpoint of `<step>` | the process aborts, as `kill -9` would |
//! | `checkpoint-disk-full` | same | the write fails with ENOSPC, as on a full disk |
//! | `checkpoint-replace` | while replacing a checkpoint of `<step>` by a new one, between renaming the old one to `step-N.old` and the new one in | the process aborts |
//! | `rank-abort` | after step `<step>` on rank `<rank>` | the rank aborts without a word to the others |
//! | `rank-error` | same | the rank fails with an error, as on bad data |
//! | `rank-hang` | same | the rank stops answering |
//! | `prepare-shard` | after `prepare` writes a shard while reading input file `<step>` (from 0) | the process aborts, as `kill -9` would |
//!
//! A failpoint fires in a launcher's first attempt only: the ranks torchrun restarts
//! (`TORCHELASTIC_RESTART_COUNT` above 0) run on, as after a transient crash.
//!
//! The hook ships in every build, so it is armed by two variables: `BSFA_TRAIN_FAILPOINT` alone
//! (left in a shell, copied from a test) is ignored with one warning, since a failpoint aborts
//! a run on purpose and a production job must never crash because of a stray variable. The
//! tests and `scripts/gpu_check.py` set both.

use anyhow::{bail, Context, Result};
use std::sync::Once;

/// The failpoint's variable.
const FAILPOINT_VAR: &str = "BSFA_TRAIN_FAILPOINT";
/// The switch that arms it: `1` lets [`FAILPOINT_VAR`] fire.
const TEST_HOOKS_VAR: &str = "BSFA_TRAIN_TEST_HOOKS";

/// The points a failpoint can stop at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// Half way through writing a checkpoint.
    CheckpointWrite,
    /// Between the two renames of a checkpoint replaced by one of the same step.
    CheckpointReplace,
    /// After an optimizer step.
    AfterStep,
    /// After `prepare` writes a token shard (the "step" is the input file's index).
    PrepareShard,
}

/// Fails as `BSFA_TRAIN_FAILPOINT` asks if it names `point` at `step` on `rank` and
/// `BSFA_TRAIN_TEST_HOOKS=1` arms it; otherwise (and when unset) returns `Ok`.
pub fn hit(point: Point, rank: usize, step: usize) -> Result<()> {
    let Some(spec) = armed() else {
        return Ok(());
    };
    if std::env::var("TORCHELASTIC_RESTART_COUNT").is_ok_and(|c| c.trim() != "0") {
        return Ok(());
    }
    let parts: Vec<&str> = spec.split(':').collect();
    let (kind, at_rank, at_step) = match parts[..] {
        [kind, at_step] => (kind, None, at_step),
        [kind, at_rank, at_step] => (kind, Some(at_rank), at_step),
        _ => return Ok(()),
    };
    let here = at_step == step.to_string() && at_rank.is_none_or(|r| r == rank.to_string());
    match (point, kind) {
        _ if !here => Ok(()),
        (Point::CheckpointWrite, "checkpoint-write")
        | (Point::CheckpointReplace, "checkpoint-replace")
        | (Point::AfterStep, "rank-abort")
        | (Point::PrepareShard, "prepare-shard") => {
            eprintln!("failpoint {spec}: aborting");
            std::process::abort();
        }
        (Point::AfterStep, "rank-error") => bail!("failpoint {spec}: injected error"),
        (Point::CheckpointWrite, "checkpoint-disk-full") => {
            Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
                .with_context(|| format!("failpoint {spec}: injected write error"))
        }
        (Point::AfterStep, "rank-hang") => loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        },
        _ => Ok(()),
    }
}

/// The failpoint's spec when it is set and armed. Set but not armed, it is ignored with one
/// warning per process (the hook is called at every step).
fn armed() -> Option<String> {
    let spec = std::env::var(FAILPOINT_VAR).ok()?;
    if std::env::var(TEST_HOOKS_VAR).is_ok_and(|v| v.trim() == "1") {
        return Some(spec);
    }
    static WARNED: Once = Once::new();
    WARNED.call_once(|| {
        eprintln!(
            "warning: {FAILPOINT_VAR}={spec} is ignored: failpoints crash a process on purpose \
             and fire only in tests, with {TEST_HOOKS_VAR}=1 also set; unset {FAILPOINT_VAR} \
             (or set {TEST_HOOKS_VAR}=1 to test a crash)"
        );
    });
    None
}
