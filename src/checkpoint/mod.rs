//! Checkpoints: `OUT/checkpoints/step-<8-digit step>/` holds
//!
//! - `model.safetensors`: the weights under their Hugging Face names;
//! - `optimizer.safetensors`: every optimizer state tensor (`<param>.<slot>`, BSFA history and
//!   directions included), with the optimizer name, step count and shard files in its
//!   metadata;
//! - `optimizer-rank-<5-digit rank>.safetensors`: written by data-parallel ranks other than 0,
//!   the BSFA blocks that rank owned (see `optim::bsfa`); any rank count can resume them;
//! - `tokenizer.json`: the run's tokenizer (none for the bytes tokenizer), so that `export`,
//!   `sample` and `eval` never read a file outside the checkpoint;
//! - `trainer.json`: [`TrainerState`] (step, tokens seen, sampler position, resolved config,
//!   format version, the CRC-32 of every other file).
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
//! take, and at worst a hidden folder that they ignore and the next save deletes. A write
//! that fails (a full disk) removes its hidden folder and says so.
//!
//! A reader opens only files named inside the folder, checks each against its recorded
//! checksum (checkpoints written before checksums are read unverified), and refuses tensors
//! that hold NaN or infinity (see `integrity`).

mod folder;
mod integrity;
mod resume;
mod tensors;
mod tokenizer;

use crate::config::RunConfig;
use crate::data::TokenPosition;
use crate::dist::Communicator;
use crate::durable::{sync_dir, write_synced};
use crate::memory_check::{self, Workload};
use crate::model::Param;
use crate::optim::{OptimizerState, StateTensor};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

pub use folder::{folders_after, list, prune, step_dir_name};
use integrity::{checked_file, explain_disk_full};
pub use integrity::{checksum, has_non_finite};
pub use resume::open_resumed;
pub use tensors::{
    read_safetensors, read_safetensors_where, write_safetensors, write_state_safetensors,
};

/// Version of the checkpoint layout this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Weights file inside a checkpoint folder.
pub const MODEL_FILE: &str = "model.safetensors";
/// Optimizer state file inside a checkpoint folder.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Trainer state file inside a checkpoint folder.
pub const TRAINER_FILE: &str = "trainer.json";
/// The run's tokenizer inside a checkpoint folder (none for the bytes tokenizer).
pub const TOKENIZER_FILE: &str = "tokenizer.json";

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
    /// The checksum of every other file of the checkpoint by name (`crc32:<8 hex digits>`),
    /// recorded by [`save`] (which fills it in) and checked on every load; empty in
    /// checkpoints written before checksums, whose files are read unverified.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub checksums: BTreeMap<String, String>,
}

/// The shard file of data-parallel rank `rank` (> 0).
pub fn shard_file(rank: usize) -> String {
    format!("optimizer-rank-{rank:05}.safetensors")
}

/// Writes a checkpoint under `root` atomically and returns its folder; a collective: every
/// rank of `comm` calls it. Rank 0 writes the weights, the shared optimizer state with its
/// own shard, the trainer state and `tokenizer` (the run's tokenizer.json, `None` for the
/// bytes tokenizer); every other rank writes its optimizer shard, if any. An existing
/// checkpoint of the same step is replaced only once the new one is complete (see the
/// module documentation).
pub fn save(
    root: &Path,
    state: &TrainerState,
    params: &[Param],
    optimizer: &dyn OptimizerState,
    comm: &dyn Communicator,
    tokenizer: Option<&[u8]>,
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
    // `<file> <checksum>` of this rank's shard, if it has one.
    let mut written = String::new();
    if comm.rank() > 0 && !shard.is_empty() {
        let name = shard_file(comm.rank());
        let path = temp.join(&name);
        let sum = write_state_safetensors(&path, &shard, &[])
            .and_then(|()| checksum(&path))
            .map_err(|e| explain_disk_full(e, root, state.step))?;
        written = format!("{name} {sum}");
    }
    // Doubles as the barrier after which every shard is on disk.
    let shard_files: Vec<(String, String)> = comm
        .all_gather_bytes(written.as_bytes())?
        .into_iter()
        .filter_map(|b| {
            let entry = String::from_utf8_lossy(&b).into_owned();
            let (name, sum) = entry.split_once(' ')?;
            Some((name.to_string(), sum.to_string()))
        })
        .collect();
    if comm.rank() > 0 {
        comm.barrier()?;
        return Ok(root.join(&name));
    }
    let files = RootFiles {
        params,
        optimizer,
        shard,
        shard_files: &shard_files,
        tokenizer,
    };
    let target = write_root_part(root, &temp, &name, state, files);
    // The other ranks wait for the complete checkpoint (or rank 0's error).
    comm.barrier()?;
    target
}

/// What rank 0 writes into a checkpoint besides the trainer state.
struct RootFiles<'a> {
    params: &'a [Param],
    optimizer: &'a dyn OptimizerState,
    /// Rank 0's own optimizer shard, written into the shared file.
    shard: Vec<(String, StateTensor)>,
    /// The other ranks' shard files and their checksums.
    shard_files: &'a [(String, String)],
    tokenizer: Option<&'a [u8]>,
}

/// Rank 0's part of [`save`]: its files (see [`write_root_files`]), then the rename.
fn write_root_part(
    root: &Path,
    temp: &Path,
    name: &str,
    state: &TrainerState,
    files: RootFiles,
) -> Result<PathBuf> {
    if let Err(e) = write_root_files(temp, state, files) {
        // Nothing half-written stays behind to fill the disk further.
        let _ = fs::remove_dir_all(temp);
        return Err(explain_disk_full(e, root, state.step));
    }
    folder::put_in_place(root, temp, name, state.step)
}

/// Writes rank 0's files into `temp`: weights, shared optimizer state, the tokenizer, and
/// last the trainer state with every file's checksum; then syncs the folder.
fn write_root_files(temp: &Path, state: &TrainerState, files: RootFiles) -> Result<()> {
    let weights: Vec<(String, Tensor)> = files
        .params
        .iter()
        .map(|p| (p.name.clone(), p.var.as_tensor().clone()))
        .collect();
    // `format: pt` is what `transformers` expects of a safetensors weights file.
    write_safetensors(&temp.join(MODEL_FILE), &weights, &[("format", "pt")])?;
    crate::failpoint::hit(crate::failpoint::Point::CheckpointWrite, 0, state.step)?;
    let mut checksums: BTreeMap<String, String> = files.shard_files.iter().cloned().collect();
    checksums.insert(MODEL_FILE.into(), checksum(&temp.join(MODEL_FILE))?);
    let optimizer = files.optimizer;
    let steps = optimizer.steps_taken().to_string();
    let mut tensors: Vec<(String, StateTensor)> = optimizer
        .shared()?
        .into_iter()
        .map(|(key, t)| (key, StateTensor::Whole(t)))
        .collect();
    tensors.extend(files.shard);
    let names: Vec<&str> = files.shard_files.iter().map(|(n, _)| n.as_str()).collect();
    write_state_safetensors(
        &temp.join(OPTIMIZER_FILE),
        &tensors,
        &[
            ("optimizer", &optimizer_kind(&state.config)),
            ("steps", &steps),
            (SHARDS_KEY, &names.join(",")),
        ],
    )?;
    checksums.insert(OPTIMIZER_FILE.into(), checksum(&temp.join(OPTIMIZER_FILE))?);
    if let Some(bytes) = files.tokenizer {
        write_synced(&temp.join(TOKENIZER_FILE), bytes)?;
        checksums.insert(TOKENIZER_FILE.into(), checksum(&temp.join(TOKENIZER_FILE))?);
    }
    let state = TrainerState {
        checksums,
        ..state.clone()
    };
    let json = serde_json::to_vec_pretty(&state)?;
    write_synced(&temp.join(TRAINER_FILE), &json)?;
    sync_dir(temp)
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
        // Valid but huge sizes would make the allocator abort the process: refused here,
        // before the tensors are read (on the host) or a model is built.
        memory_check::check(&state.config, &Device::Cpu, Workload::Loading).with_context(|| {
            format!(
                "'{}' holds a config whose model does not fit this machine (edited or \
                 corrupted?)",
                trainer.display()
            )
        })?;
        let sums = &state.checksums;
        if sums.is_empty() {
            eprintln!(
                "note: '{}' was written before checkpoints recorded checksums: its files are \
                 read unverified",
                dir.display()
            );
        }
        let (model, _) = read_safetensors(&checked_file(dir, MODEL_FILE, sums)?)?;
        let optimizer = if with_optimizer {
            let path = checked_file(dir, OPTIMIZER_FILE, sums)?;
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
                let context = || format!("the checkpoint lists the optimizer shard '{shard}'");
                let shard = checked_file(dir, shard, sums).with_context(context)?;
                read_safetensors_where(&shard, &|_| false).with_context(context)?;
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
