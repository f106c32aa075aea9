//! One run per out folder. A run that does not continue the run already there (a fresh
//! start, or a resume from a checkpoint outside `OUT/checkpoints/`) first sets that run
//! aside whole; a resume from an older checkpoint of the run there sets aside the
//! checkpoints after it (the branch it abandons) with a copy of the run's metrics, so that
//! they can never win a later `--resume auto` nor be pruned. A set-aside run goes to a new
//! folder `OUT/previous/<NNN>-step-<S>/` (S: its newest checkpoint) that is itself a run
//! folder (`checkpoints/`, `metrics.jsonl`, `config.json`, `tb/`, `trace.json`): `--out` it
//! with `--resume auto` continues it. Nothing under `previous/` is ever deleted or reused.
//!
//! Crash safety: the files beside the checkpoints are copied (and synced) before the
//! checkpoints move, by renames, and the originals are removed only after that, so a crash
//! at any moment leaves every file in the out folder, in the new folder or in both.

use crate::checkpoint::{self, Checkpoint};
use crate::durable::{rename, sync_dir, write_synced};
use anyhow::{Context, Result};
use std::fs;
use std::path::{Path, PathBuf};

/// The folder under OUT that holds the runs set aside there.
pub const PREVIOUS_DIR: &str = "previous";
/// The checkpoints folder under OUT.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// A run's files beside its checkpoints (the lock file belongs to the folder, not a run).
const RUN_FILES: [&str; 4] = ["metrics.jsonl", "config.json", "trace.json", "tb"];

/// Sets aside what in the out folder `out` the run about to start does not continue (see
/// the module documentation); `resumed` is the checkpoint it resumes from. Returns the
/// note that says where it went and how to continue it, when anything was moved.
pub fn set_aside(out: &Path, resumed: Option<&Checkpoint>) -> Result<Option<String>> {
    let checkpoints = out.join(CHECKPOINTS_DIR);
    match resumed {
        Some(ck) if is_in(&ck.dir, &checkpoints) => set_aside_after(out, ck.state.step),
        _ => set_aside_whole(out, resumed),
    }
}

/// Whether checkpoint folder `dir` lies directly in the checkpoints folder `checkpoints`.
fn is_in(dir: &Path, checkpoints: &Path) -> bool {
    let parent = dir.parent().and_then(|p| p.canonicalize().ok());
    parent.is_some() && parent == checkpoints.canonicalize().ok()
}

/// A resume from step `step` of the run in `out`: its checkpoints after `step` go, with a
/// copy of its files (the out folder's `metrics.jsonl` is then cut back to `step`).
fn set_aside_after(out: &Path, step: usize) -> Result<Option<String>> {
    let checkpoints = out.join(CHECKPOINTS_DIR);
    let newer = checkpoint::folders_after(&checkpoints, step)?;
    let Some(&(newest, _)) = newer.last() else {
        return Ok(None);
    };
    let dest = new_folder(out, &format!("step-{newest}"))?;
    copy_run_files(out, &dest)?;
    let moved = dest.join(CHECKPOINTS_DIR);
    fs::create_dir(&moved).with_context(|| format!("cannot create '{}'", moved.display()))?;
    for (_, dir) in &newer {
        rename(dir, &moved.join(dir.file_name().unwrap_or_default()))?;
    }
    for dir in [&moved, &checkpoints, &dest] {
        sync_dir(dir)?;
    }
    // A step can have two folders (`step-N` and `step-N.old`).
    let mut steps: Vec<String> = newer.iter().map(|(s, _)| s.to_string()).collect();
    steps.dedup();
    Ok(Some(format!(
        "note: resuming from step {step} of a run that went on to step {newest}: its \
         checkpoints after step {step} (steps {}) and a copy of its metrics were set aside in \
         '{}'; continue that run with the same command, its --out and --resume replaced by \
         --out '{}' --resume auto",
        steps.join(", "),
        dest.display(),
        dest.display()
    )))
}

/// A fresh start, or a resume from elsewhere: the run in `out` (if it left a checkpoint or
/// a metrics line) goes whole.
fn set_aside_whole(out: &Path, resumed: Option<&Checkpoint>) -> Result<Option<String>> {
    let checkpoints = out.join(CHECKPOINTS_DIR);
    let newest = checkpoint::list(&checkpoints)?
        .last()
        .map(|(step, _)| *step);
    let logged = fs::metadata(out.join(RUN_FILES[0])).is_ok_and(|m| m.len() > 0);
    if newest.is_none() && !logged {
        return Ok(None);
    }
    let label = newest.map_or("no-checkpoint".to_string(), |step| format!("step-{step}"));
    let dest = new_folder(out, &label)?;
    copy_run_files(out, &dest)?;
    if checkpoints.exists() {
        rename(&checkpoints, &dest.join(CHECKPOINTS_DIR))?;
    }
    sync_dir(&dest)?;
    sync_dir(out)?;
    for name in RUN_FILES {
        let path = out.join(name);
        let removed = match path.is_dir() {
            true => fs::remove_dir_all(&path),
            false if path.exists() => fs::remove_file(&path),
            false => Ok(()),
        };
        removed.with_context(|| format!("cannot remove '{}' (copied)", path.display()))?;
    }
    let why = match resumed {
        Some(ck) => format!(
            "resuming from '{}', which is not the run in '{}'",
            ck.dir.display(),
            out.display()
        ),
        None => "starting fresh".to_string(),
    };
    let how = match newest {
        Some(step) => format!(
            "with its checkpoints (up to step {step}); continue it with the same command, its \
             --out and --resume replaced by --out '{}' --resume auto",
            dest.display()
        ),
        None => "(it wrote no checkpoint: its metrics only)".to_string(),
    };
    Ok(Some(format!(
        "note: {why}; the earlier run there was set aside in '{}' {how}",
        dest.display()
    )))
}

/// Creates `out/previous/<NNN>-<label>`, NNN one above every number there (never reused).
fn new_folder(out: &Path, label: &str) -> Result<PathBuf> {
    let previous = out.join(PREVIOUS_DIR);
    fs::create_dir_all(&previous)
        .with_context(|| format!("cannot create '{}'", previous.display()))?;
    let mut n = 1 + fs::read_dir(&previous)
        .with_context(|| format!("cannot list '{}'", previous.display()))?
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.split('-').next()?.parse::<usize>().ok()
        })
        .max()
        .unwrap_or(0);
    loop {
        let dest = previous.join(format!("{n:03}-{label}"));
        match fs::create_dir(&dest) {
            Ok(()) => {
                sync_dir(&previous)?;
                return Ok(dest);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
            Err(e) => return Err(e).with_context(|| format!("cannot create '{}'", dest.display())),
        }
    }
}

/// Copies the run files of `out` that exist into `dest`, synced.
fn copy_run_files(out: &Path, dest: &Path) -> Result<()> {
    for name in RUN_FILES {
        let path = out.join(name);
        if path.exists() {
            copy_tree(&path, &dest.join(name))?;
        }
    }
    Ok(())
}

/// Copies the file or folder `from` to `to` (which must not exist), every file synced.
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    if !from.is_dir() {
        let bytes = fs::read(from).with_context(|| format!("cannot read '{}'", from.display()))?;
        return write_synced(to, &bytes);
    }
    fs::create_dir(to).with_context(|| format!("cannot create '{}'", to.display()))?;
    for entry in fs::read_dir(from).with_context(|| format!("cannot list '{}'", from.display()))? {
        let entry = entry.with_context(|| format!("cannot list '{}'", from.display()))?;
        copy_tree(&entry.path(), &to.join(entry.file_name()))?;
    }
    sync_dir(to)
}
