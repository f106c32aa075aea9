//! The resume policy: which checkpoint a run continues from, and whether it may.

use super::{list, optimizer_kind, Checkpoint, TRAINER_FILE};
use crate::config::{self, RunConfig};
use crate::dist::{self, Communicator};
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// The checkpoint `--resume` (`spec`: `auto` or a checkpoint folder) names under `root`,
/// opened and checked against `config`; `None` means start fresh. Rank 0 picks it, so every
/// rank of `comm` resumes the same one, and it is read before the out folder is touched.
pub fn open_resumed(
    spec: Option<&str>,
    root: &Path,
    config: &RunConfig,
    comm: &dyn Communicator,
) -> Result<Option<Checkpoint>> {
    let picked = match spec {
        Some(spec) if comm.rank() == 0 => resolve(spec, root)?,
        _ => None,
    };
    let Some(dir) = dist::share_path(comm, picked)? else {
        return Ok(None);
    };
    let checkpoint = Checkpoint::open(&dir, true)?;
    if comm.rank() == 0 {
        check_resumable(config, &checkpoint)?;
    }
    Ok(Some(checkpoint))
}

/// Where `--resume` points: `auto` is the newest complete checkpoint under `root` (None when
/// there is none); anything else is a checkpoint folder.
fn resolve(spec: &str, root: &Path) -> Result<Option<PathBuf>> {
    if spec == "auto" {
        return Ok(list(root)?.pop().map(|(_, dir)| dir));
    }
    let path = PathBuf::from(spec);
    if !path.exists() {
        bail!(
            "--resume '{spec}' does not exist; pass a checkpoint folder (OUT/checkpoints/step-N) \
             or 'auto'"
        );
    }
    Ok(Some(path))
}

/// A checkpoint can continue this run only with the same model and optimizer; other
/// changed settings (more steps, another log interval) are allowed and listed.
fn check_resumable(config: &RunConfig, ck: &Checkpoint) -> Result<()> {
    let changed = config::differences(&ck.state.config, config)?;
    // `model.*` names the architecture (and a LLaMA's shape); the spec's section holds the
    // shape of the network trained.
    let section = format!("{}.", config.spec().section());
    let model: Vec<String> = changed
        .iter()
        .filter(|(key, _, _)| key.starts_with("model.") || key.starts_with(&section))
        .map(|(key, saved, now)| format!("{key} (checkpoint {saved}, requested {now})"))
        .collect();
    if !model.is_empty() {
        bail!(
            "the checkpoint '{}' holds a different model: {}. Resume with the checkpoint's \
             settings (see '{}') or start a new run in another --out",
            ck.dir.display(),
            model.join(", "),
            ck.dir.join(TRAINER_FILE).display()
        );
    }
    let (was, now) = (optimizer_kind(&ck.state.config), optimizer_kind(config));
    if was != now {
        bail!(
            "the checkpoint '{}' was trained with optimizer '{was}', this run asks for '{now}'; \
             resume with the same --optimizer/--bsfa or start a new run in another --out",
            ck.dir.display()
        );
    }
    if ck.state.step > config.train.steps {
        bail!(
            "the checkpoint '{}' is at step {}, beyond --steps {}; raise --steps",
            ck.dir.display(),
            ck.state.step,
            config.train.steps
        );
    }
    if !changed.is_empty() {
        let keys: Vec<&str> = changed.iter().map(|(key, _, _)| key.as_str()).collect();
        eprintln!("note: resuming with changed settings: {}", keys.join(", "));
    }
    Ok(())
}
