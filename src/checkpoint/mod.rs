//! Checkpoints: `OUT/checkpoints/step-<8-digit step>/` holds
//!
//! - `model.safetensors`: the weights under their Hugging Face names;
//! - `optimizer.safetensors`: every optimizer state tensor (`<param>.<slot>`, BSFA history and
//!   directions included), with the optimizer name, step count and shard files in its
//!   metadata;
//! - `optimizer-rank-<5-digit rank>.safetensors`: written by data-parallel ranks other than 0,
//!   the BSFA blocks that rank owned (see `optim::bsfa`); any rank count can resume them;
//! - `trainer.json`: [`TrainerState`] (step, tokens seen, sampler position, resolved config,
//!   format version).
//!
//! The checkpoints folder's protocol ([`folder`]), under which a crash at any instant loses
//! no complete checkpoint:
//!
//! - a checkpoint is written into the hidden folder `.tmp-step-N`, every file and the folder
//!   are fsynced, and only then is the folder renamed to `step-N`;
//! - a checkpoint of the same step already there is first renamed to `step-N.old`, which
//!   readers take for step N while no `step-N` exists, and is deleted once `step-N` is in;
//! - a checkpoint is deleted (pruned, or an `.old` one replaced) by renaming it to a hidden
//!   `.tmp-` name first, then removing that;
//! - readers ignore hidden folders and anything else that is not a `step-N[.old]` folder
//!   with its `trainer.json`; pruning deletes only checkpoints and hidden folders of ours.
//!
//! A crash at any moment therefore leaves every checkpoint complete under a name readers
//! take, and at worst a hidden folder that they ignore and the next save deletes.

mod folder;
mod resume;

use crate::config::RunConfig;
use crate::data::TokenPosition;
use crate::dist::Communicator;
use crate::durable::{sync_dir, write_synced};
use crate::model::Param;
use crate::optim::{OptimizerState, StateTensor};
use anyhow::{bail, Context, Result};
use candle_core::safetensors::Load;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

pub use folder::{folders_after, list, prune, step_dir_name};
pub use resume::open_resumed;

/// Version of the checkpoint layout this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Weights file inside a checkpoint folder.
pub const MODEL_FILE: &str = "model.safetensors";
/// Optimizer state file inside a checkpoint folder.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Trainer state file inside a checkpoint folder.
pub const TRAINER_FILE: &str = "trainer.json";

/// Metadata key of `optimizer.safetensors` listing the other ranks' shard files.
const SHARDS_KEY: &str = "shard_files";

/// Everything besides tensors that a run needs to continue exactly.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    pub format_version: u32,
    /// Optimizer steps completed.
    pub step: usize,
    /// Training tokens consumed so far.
    pub tokens_seen: u64,
    /// Where the training batch sampler stands (its RNG state).
    pub data_position: TokenPosition,
    /// Image runs: where the image pipeline stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_position: Option<crate::data::images::pipeline::ImagePosition>,
    /// The resolved config of the run that wrote the checkpoint.
    pub config: RunConfig,
}

/// The shard file of data-parallel rank `rank` (> 0).
pub fn shard_file(rank: usize) -> String {
    format!("optimizer-rank-{rank:05}.safetensors")
}

/// Writes a checkpoint under `root` atomically and returns its folder; a collective: every
/// rank of `comm` calls it. Rank 0 writes the weights, the shared optimizer state with its
/// own shard, and the trainer state; every other rank writes its optimizer shard, if any.
/// An existing checkpoint of the same step is replaced only once the new one is complete
/// (see the module documentation).
pub fn save(
    root: &Path,
    state: &TrainerState,
    params: &[Param],
    optimizer: &dyn OptimizerState,
    comm: &dyn Communicator,
) -> Result<PathBuf> {
    let name = step_dir_name(state.step);
    let temp = root.join(format!("{}{name}", folder::TEMP_PREFIX));
    if comm.rank() == 0 {
        fs::create_dir_all(root)
            .with_context(|| format!("cannot create checkpoint folder '{}'", root.display()))?;
        if temp.exists() {
            fs::remove_dir_all(&temp)
                .with_context(|| format!("cannot remove stale '{}'", temp.display()))?;
        }
        fs::create_dir(&temp).with_context(|| format!("cannot create '{}'", temp.display()))?;
    }
    comm.barrier()?;
    let shard = optimizer.shard()?;
    let mut written = String::new();
    if comm.rank() > 0 && !shard.is_empty() {
        written = shard_file(comm.rank());
        write_state_safetensors(&temp.join(&written), &shard, &[])?;
    }
    // Doubles as the barrier after which every shard is on disk.
    let shard_files: Vec<String> = comm
        .all_gather_bytes(written.as_bytes())?
        .into_iter()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .filter(|f| !f.is_empty())
        .collect();
    if comm.rank() > 0 {
        comm.barrier()?;
        return Ok(root.join(&name));
    }
    let target = write_root_part(
        root,
        &temp,
        &name,
        state,
        params,
        optimizer,
        shard,
        &shard_files,
    );
    // The other ranks wait for the complete checkpoint (or rank 0's error).
    comm.barrier()?;
    target
}

/// Rank 0's part of [`save`]: weights, shared state, trainer state, then the rename.
#[allow(clippy::too_many_arguments)]
fn write_root_part(
    root: &Path,
    temp: &Path,
    name: &str,
    state: &TrainerState,
    params: &[Param],
    optimizer: &dyn OptimizerState,
    shard: Vec<(String, StateTensor)>,
    shard_files: &[String],
) -> Result<PathBuf> {
    let weights: Vec<(String, Tensor)> = params
        .iter()
        .map(|p| (p.name.clone(), p.var.as_tensor().clone()))
        .collect();
    // `format: pt` is what `transformers` expects of a safetensors weights file.
    write_safetensors(&temp.join(MODEL_FILE), &weights, &[("format", "pt")])?;
    crate::failpoint::hit(crate::failpoint::Point::CheckpointWrite, 0, state.step)?;
    let steps = optimizer.steps_taken().to_string();
    let mut tensors: Vec<(String, StateTensor)> = optimizer
        .shared()?
        .into_iter()
        .map(|(key, t)| (key, StateTensor::Whole(t)))
        .collect();
    tensors.extend(shard);
    write_state_safetensors(
        &temp.join(OPTIMIZER_FILE),
        &tensors,
        &[
            ("optimizer", &optimizer_kind(&state.config)),
            ("steps", &steps),
            (SHARDS_KEY, &shard_files.join(",")),
        ],
    )?;
    let json = serde_json::to_vec_pretty(state)?;
    write_synced(&temp.join(TRAINER_FILE), &json)?;
    sync_dir(temp)?;

    folder::put_in_place(root, temp, name, state.step)
}

/// A checkpoint read from disk and checked: its trainer state and its tensors.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: TrainerState,
    model: HashMap<String, Tensor>,
    /// Optimizer files (shared state first, then the shards) and the step count, checked
    /// at open and read by [`Checkpoint::load_optimizer`].
    optimizer: Option<(Vec<PathBuf>, u64)>,
}

impl Checkpoint {
    /// Opens the checkpoint at `dir` for `command` (`eval`, `export`), which handles
    /// language-model checkpoints only: another network's is an error that says where its
    /// results are.
    pub fn open_llama(dir: &Path, command: &str) -> Result<Self> {
        let ck = Self::open(dir, false)?;
        let spec = ck.state.config.spec();
        if spec.language_model().is_none() {
            bail!(
                "`{command}` handles LLaMA checkpoints; '{}' holds a {}, whose validation \
                 results are in the run's metrics.jsonl",
                dir.display(),
                spec.name()
            );
        }
        Ok(ck)
    }

    /// Reads the checkpoint folder `dir` (and its optimizer state when `with_optimizer`).
    /// Every error names the file and what is wrong with it.
    pub fn open(dir: &Path, with_optimizer: bool) -> Result<Self> {
        if !dir.is_dir() {
            bail!(
                "checkpoint '{}' does not exist (expected a folder such as \
                 OUT/checkpoints/step-00001000)",
                dir.display()
            );
        }
        let trainer = dir.join(TRAINER_FILE);
        let text = fs::read_to_string(&trainer).with_context(|| {
            format!(
                "cannot read '{}': the folder is not a complete checkpoint",
                trainer.display()
            )
        })?;
        let raw: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("'{}' is not valid JSON", trainer.display()))?;
        let version = raw.get("format_version").and_then(|v| v.as_u64());
        if version != Some(u64::from(FORMAT_VERSION)) {
            bail!(
                "'{}' has checkpoint format version {}, this build reads version \
                 {FORMAT_VERSION}; use the bsfa-train version that wrote it",
                trainer.display(),
                version.map_or("(missing)".to_string(), |v| v.to_string())
            );
        }
        let state: TrainerState = serde_json::from_value(raw)
            .with_context(|| format!("'{}' is not a valid trainer state", trainer.display()))?;
        // The same checks as a config from the command line: an edited or corrupted file must
        // not reach the model (zero heads divide by zero, huge sizes allocate terabytes).
        state.config.validate().with_context(|| {
            format!(
                "'{}' holds a config that does not validate (edited or corrupted?)",
                trainer.display()
            )
        })?;
        let (model, _) = read_safetensors(&dir.join(MODEL_FILE))?;
        let optimizer = if with_optimizer {
            let path = dir.join(OPTIMIZER_FILE);
            // Headers only: every rank reads just the tensors it needs later.
            let meta = read_safetensors_where(&path, &|_| false)?.1;
            let steps = meta
                .get("steps")
                .and_then(|s| s.parse::<u64>().ok())
                .with_context(|| format!("'{}' lacks its step count", path.display()))?;
            let mut files = vec![path];
            for shard in meta.get(SHARDS_KEY).into_iter().flat_map(|s| s.split(',')) {
                if shard.is_empty() {
                    continue;
                }
                let shard = dir.join(shard);
                read_safetensors_where(&shard, &|_| false).with_context(|| {
                    format!(
                        "the checkpoint lists the optimizer shard '{}' of another rank",
                        shard.display()
                    )
                })?;
                files.push(shard);
            }
            Some((files, steps))
        } else {
            None
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            state,
            model,
            optimizer,
        })
    }

    /// Restores a run from this checkpoint: the weights into `params`, the optimizer state
    /// into `optimizer`, then checks that every restored tensor lives on the parameters'
    /// device (see [`crate::optim::check_state_devices`]): tensors are read on the host, and
    /// a CUDA run must get them on its GPU.
    pub fn restore(&self, params: &[Param], optimizer: &mut dyn OptimizerState) -> Result<()> {
        self.load_model(params)?;
        self.load_optimizer(optimizer)?;
        if let Some(first) = params.first() {
            crate::optim::check_state_devices(optimizer, first.var.device())
                .with_context(|| format!("resuming from '{}'", self.dir.display()))?;
        }
        Ok(())
    }

    /// Copies the checkpoint's weights into `params`, checking names and shapes. The
    /// weights are read on the host and land on each parameter's own device and dtype
    /// (`Var::set` refuses a tensor on another device).
    pub fn load_model(&self, params: &[Param]) -> Result<()> {
        load_weights(params, &self.model, &self.dir.join(MODEL_FILE))
    }

    /// Restores `optimizer` from the checkpoint's optimizer state: the tensors it wants,
    /// from the shared file and every rank's shard, whatever rank count wrote them. The
    /// tensors are handed over on the host; [`OptimizerState::load`] moves them to the
    /// parameters' device.
    pub fn load_optimizer(&self, optimizer: &mut dyn OptimizerState) -> Result<()> {
        let file = self.dir.join(OPTIMIZER_FILE);
        let (files, steps) = self
            .optimizer
            .as_ref()
            .context("the checkpoint was opened without its optimizer state")?;
        let mut tensors = HashMap::new();
        for path in files {
            tensors.extend(read_safetensors_where(path, &|key| optimizer.wants(key))?.0);
        }
        optimizer
            .load(*steps, &tensors)
            .with_context(|| format!("cannot restore the optimizer from '{}'", file.display()))
    }
}

/// Copies `tensors` (read from `file`, named in errors) into `params` by name, checking
/// that each is there with the parameter's shape; each lands on its parameter's device and
/// dtype (`Var::set` refuses a tensor on another device). Extra tensors are ignored.
pub fn load_weights(
    params: &[Param],
    tensors: &HashMap<String, Tensor>,
    file: &Path,
) -> Result<()> {
    for p in params {
        let t = tensors
            .get(&p.name)
            .with_context(|| format!("'{}' has no tensor '{}'", file.display(), p.name))?;
        if t.shape() != p.var.shape() {
            bail!(
                "tensor '{}' in '{}' has shape {:?}, the model needs {:?}",
                p.name,
                file.display(),
                t.dims(),
                p.var.dims()
            );
        }
        p.var
            .set(&t.to_dtype(p.var.dtype())?.to_device(p.var.device())?)?;
    }
    Ok(())
}

/// The optimizer a config builds, as recorded in checkpoints (e.g. `adam-mini+bsfa`).
pub fn optimizer_kind(config: &RunConfig) -> String {
    if config.bsfa.enabled {
        format!("{}+bsfa", config.optimizer.name)
    } else {
        config.optimizer.name.to_string()
    }
}

/// Writes named tensors with string metadata, then fsyncs the file.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    meta: &[(&str, &str)],
) -> Result<()> {
    let whole: Vec<(String, StateTensor)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), StateTensor::Whole(t.clone())))
        .collect();
    write_state_safetensors(path, &whole, meta)
}

/// [`write_safetensors`] for optimizer state, whose row tensors are joined one at a time as
/// they are written.
pub fn write_state_safetensors(
    path: &Path,
    tensors: &[(String, StateTensor)],
    meta: &[(&str, &str)],
) -> Result<()> {
    let metadata: HashMap<String, String> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let views = tensors.iter().map(|(n, t)| (n.as_str(), t));
    safetensors::serialize_to_file(views, Some(metadata), path)
        .with_context(|| format!("cannot write '{}'", path.display()))?;
    // The writer goes through a private (0600) temp file; checkpoints and exports are for
    // sharing, like every other output.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o644))?;
    }
    File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot sync '{}'", path.display()))
}

impl safetensors::View for &StateTensor {
    fn dtype(&self) -> safetensors::Dtype {
        match self {
            StateTensor::Whole(t) => <Tensor as safetensors::View>::dtype(t),
            StateTensor::Rows { rows, .. } => <Tensor as safetensors::View>::dtype(&rows[0]),
        }
    }

    fn shape(&self) -> &[usize] {
        match self {
            StateTensor::Whole(t) => t.dims(),
            StateTensor::Rows { shape, .. } => shape,
        }
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        match self {
            StateTensor::Whole(t) => <Tensor as safetensors::View>::data(t),
            StateTensor::Rows { rows, .. } => {
                let mut bytes = Vec::with_capacity(self.data_len());
                for row in rows {
                    bytes.extend_from_slice(&<Tensor as safetensors::View>::data(row));
                }
                std::borrow::Cow::Owned(bytes)
            }
        }
    }

    fn data_len(&self) -> usize {
        match self {
            StateTensor::Whole(t) => t.elem_count() * t.dtype().size_in_bytes(),
            StateTensor::Rows { rows, shape } => {
                shape[0] * shape[1] * rows[0].dtype().size_in_bytes()
            }
        }
    }
}

/// Reads every tensor of a safetensors file (on the CPU) and its metadata.
pub fn read_safetensors(path: &Path) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    read_safetensors_where(path, &|_| true)
}

/// Reads the tensors of a safetensors file whose names `keep` accepts, and its metadata;
/// the file is mapped, so the others are never read. The whole header is checked either
/// way.
pub fn read_safetensors_where(
    path: &Path,
    keep: &dyn Fn(&str) -> bool,
) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let file = File::open(path).with_context(|| format!("cannot read '{}'", path.display()))?;
    // SAFETY: checkpoint files are written once, renamed into place and never modified.
    let bytes = unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("cannot read '{}'", path.display()))?;
    let corrupt = |e: &dyn std::fmt::Display| {
        anyhow::anyhow!(
            "'{}' is corrupted or truncated ({e}); resume from an earlier checkpoint",
            path.display()
        )
    };
    let parsed = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| corrupt(&e))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| corrupt(&e))?;
    let mut tensors = HashMap::new();
    for (name, view) in parsed.tensors() {
        if !keep(&name) {
            continue;
        }
        let t = view
            .load(&Device::Cpu)
            .map_err(|e| corrupt(&format!("tensor '{name}': {e}")))?;
        tensors.insert(name, t);
    }
    Ok((tensors, header.metadata().clone().unwrap_or_default()))
}
