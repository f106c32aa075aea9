//! The checkpoints folder (`OUT/checkpoints/`): which entries are checkpoints, putting a new
//! one in place, and deleting old ones, each safe against a crash at any instant (the
//! protocol is stated in the parent module's documentation).

use super::TRAINER_FILE;
use crate::durable::{rename, sync_dir};
use crate::failpoint::{self, Point};
use anyhow::{bail, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};

const STEP_PREFIX: &str = "step-";
/// Hidden names: a checkpoint being written or being deleted.
pub(super) const TEMP_PREFIX: &str = ".tmp-";
/// A checkpoint replaced by a newer one of the same step, until that one is in place.
const OLD_SUFFIX: &str = ".old";

/// The folder name of the checkpoint after `step` steps.
pub fn step_dir_name(step: usize) -> String {
    format!("{STEP_PREFIX}{step:08}")
}

/// One checkpoint folder under the checkpoints folder.
struct Entry {
    step: usize,
    path: PathBuf,
    /// A `step-N.old` folder: the checkpoint of step N only while no `step-N` exists.
    old: bool,
    complete: bool,
}

/// Every `step-N` and `step-N.old` folder under `root`, complete or not, sorted by step
/// (plain before `.old`). Other entries (stray files, hidden folders) are not listed.
fn entries(root: &Path) -> Result<Vec<Entry>> {
    if !root.exists() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for entry in fs::read_dir(root).with_context(|| format!("cannot list '{}'", root.display()))? {
        let path = entry
            .with_context(|| format!("cannot list '{}'", root.display()))?
            .path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(rest) = name.strip_prefix(STEP_PREFIX) else {
            continue;
        };
        let (digits, old) = match rest.strip_suffix(OLD_SUFFIX) {
            Some(digits) => (digits, true),
            None => (rest, false),
        };
        let Ok(step) = digits.parse::<usize>() else {
            continue;
        };
        if path.is_dir() {
            let complete = path.join(TRAINER_FILE).is_file();
            found.push(Entry {
                step,
                path,
                old,
                complete,
            });
        }
    }
    found.sort_by_key(|e| (e.step, e.old));
    Ok(found)
}

/// The complete checkpoints under `root`, oldest first, as `(step, folder)`: per step the
/// `step-N` folder, or `step-N.old` when a replacement was cut short before `step-N` was in
/// place. Folders of interrupted writes and stray files are not listed.
pub fn list(root: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut found: Vec<(usize, PathBuf)> = Vec::new();
    for e in entries(root)?.into_iter().filter(|e| e.complete) {
        // Plain sorts before `.old`: a step already found has its plain folder.
        if found.last().is_none_or(|(step, _)| *step != e.step) {
            found.push((e.step, e.path));
        }
    }
    Ok(found)
}

/// Every folder of the checkpoints after `step` under `root` (`step-N` and `step-N.old`,
/// complete or not), oldest first.
pub fn folders_after(root: &Path, step: usize) -> Result<Vec<(usize, PathBuf)>> {
    Ok(entries(root)?
        .into_iter()
        .filter(|e| e.step > step)
        .map(|e| (e.step, e.path))
        .collect())
}

/// Renames the complete, synced `temp` to `root/name`, the checkpoint of `step`. A
/// checkpoint already there is first renamed to `name.old` (still read as step `step`), and
/// deleted once the new one is in place.
pub(super) fn put_in_place(root: &Path, temp: &Path, name: &str, step: usize) -> Result<PathBuf> {
    let target = root.join(name);
    let old = root.join(format!("{name}{OLD_SUFFIX}"));
    for path in [&target, &old] {
        if path.exists() && !path.is_dir() {
            bail!(
                "'{}' is in the way of the checkpoint of step {step} and is not a checkpoint \
                 folder; move it out of '{}'",
                path.display(),
                root.display()
            );
        }
    }
    if target.exists() {
        // Same step written twice (e.g. a test's direct save): an `.old` beside a complete
        // `step-N` was left by a cut-short replacement and is superseded.
        if old.exists() {
            discard(root, &old)?;
        }
        rename(&target, &old)?;
        sync_dir(root)?;
        failpoint::hit(Point::CheckpointReplace, 0, step)?;
    }
    rename(temp, &target)?;
    sync_dir(root)?;
    if old.exists() {
        discard(root, &old)?;
    }
    Ok(target)
}

/// Deletes the checkpoint folder `dir` under `root`: renamed to a hidden name first, so that
/// a crash part way through leaves no partial folder that looks like a checkpoint.
fn discard(root: &Path, dir: &Path) -> Result<()> {
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    let hidden = root.join(format!("{TEMP_PREFIX}{name}"));
    if hidden.is_dir() {
        remove(&hidden)?;
    }
    rename(dir, &hidden)?;
    sync_dir(root)?;
    remove(&hidden)
}

fn remove(dir: &Path) -> Result<()> {
    fs::remove_dir_all(dir).with_context(|| format!("cannot delete '{}'", dir.display()))
}

/// Deletes all but the newest `keep` complete checkpoints up to step `newest` (the one just
/// written; a newer one, which a run never meets, is left alone), the `.old` folders
/// superseded by a complete `step-N`, and the hidden folders of interrupted writes and
/// deletions. Never deletes the newest complete one, nor anything that is not a checkpoint
/// folder of ours.
pub fn prune(root: &Path, keep: usize, newest: usize) -> Result<()> {
    let all = entries(root)?;
    let kept: Vec<usize> = list(root)?
        .iter()
        .map(|(step, _)| *step)
        .filter(|step| *step <= newest)
        .rev()
        .take(keep.max(1))
        .collect();
    let oldest_kept = kept.last().copied().unwrap_or(0);
    let plain = |step: usize| all.iter().any(|e| e.step == step && !e.old && e.complete);
    // `.old` first: deleting the plain folder before it would let a stale `.old` stand in.
    for e in all
        .iter()
        .filter(|e| e.old)
        .chain(all.iter().filter(|e| !e.old))
    {
        let superseded = e.old && plain(e.step);
        let pruned = e.complete && e.step < oldest_kept;
        if superseded || pruned {
            discard(root, &e.path)?;
        }
    }
    for entry in fs::read_dir(root).with_context(|| format!("cannot list '{}'", root.display()))? {
        let path = entry
            .with_context(|| format!("cannot list '{}'", root.display()))?
            .path();
        let ours = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(TEMP_PREFIX))
            .and_then(|n| n.strip_prefix(STEP_PREFIX))
            .is_some_and(|rest| {
                let digits = rest.strip_suffix(OLD_SUFFIX).unwrap_or(rest);
                !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
            });
        if ours && path.is_dir() {
            remove(&path)?;
        }
    }
    Ok(())
}
