//! Safetensors files of checkpoints and exports: written and synced, read (mapped) with
//! every tensor checked finite.

use super::integrity;
use crate::optim::StateTensor;
use anyhow::{bail, Context, Result};
use candle_core::safetensors::Load;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::fs::{self, File};
use std::path::Path;

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
        // A resumed NaN would only show as a diverged loss, blamed on the learning rate.
        if integrity::has_non_finite(view.dtype(), view.data()) {
            bail!(
                "'{}' holds non-finite values (NaN or infinity) in tensor '{name}': the \
                 checkpoint itself is damaged (saved from a broken state or edited), not the \
                 learning rate; {}",
                path.display(),
                integrity::use_another(path.parent().unwrap_or(Path::new(".")))
            );
        }
        let t = view
            .load(&Device::Cpu)
            .map_err(|e| corrupt(&format!("tensor '{name}': {e}")))?;
        tensors.insert(name, t);
    }
    Ok((tensors, header.metadata().clone().unwrap_or_default()))
}
