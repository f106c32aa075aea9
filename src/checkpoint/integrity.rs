//! What a reader checks before it trusts a checkpoint's file: that its name stays inside the
//! checkpoint folder, that it is a regular file there (not a link out of it), that its bytes
//! are those written (the CRC-32 that `trainer.json` records), and that its tensors are
//! finite. And what a save says when the disk is full.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Component, Path, PathBuf};

/// Prefix of a recorded checksum: the algorithm, so that another can follow.
const CRC32: &str = "crc32:";

/// The checksum of the file at `path`, as `trainer.json` records it (`crc32:<8 hex digits>`).
pub fn checksum(path: &Path) -> Result<String> {
    let file = File::open(path).with_context(|| format!("cannot read '{}'", path.display()))?;
    // SAFETY: checkpoint files are written once, renamed into place and never modified.
    let bytes = unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("cannot read '{}'", path.display()))?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&bytes);
    Ok(format!("{CRC32}{:08x}", hasher.finalize()))
}

/// The file `name` of the checkpoint `dir`, checked before it is read: a bare file name (not
/// absolute, no folder, no `..`: metadata cannot point out of the checkpoint), a regular file
/// (not a link), and, when the checkpoint records checksums (`checksums` is not empty: those
/// written before checksums are read unverified), the bytes that were written.
pub fn checked_file(
    dir: &Path,
    name: &str,
    checksums: &BTreeMap<String, String>,
) -> Result<PathBuf> {
    let mut parts = Path::new(name).components();
    if !matches!(
        (parts.next(), parts.next()),
        (Some(Component::Normal(_)), None)
    ) {
        bail!(
            "the checkpoint '{}' names the file '{name}', which is not a file inside the \
             checkpoint folder (crafted or corrupted metadata); refusing to read it",
            dir.display()
        );
    }
    let path = dir.join(name);
    let meta =
        fs::symlink_metadata(&path).with_context(|| format!("cannot read '{}'", path.display()))?;
    if !meta.file_type().is_file() {
        bail!(
            "'{}' is not a regular file (a link or a folder): a checkpoint holds its own files; \
             refusing to read it",
            path.display()
        );
    }
    if checksums.is_empty() {
        return Ok(path);
    }
    let Some(recorded) = checksums.get(name) else {
        bail!(
            "'{}' has no checksum in '{}' (an edited checkpoint?); {}",
            path.display(),
            dir.join(super::TRAINER_FILE).display(),
            use_another(dir)
        );
    };
    let actual = checksum(&path)?;
    if &actual != recorded {
        bail!(
            "'{}' is corrupted or truncated: the checkpoint is damaged (its checksum is {actual}, \
             {recorded} when it was written: bytes changed on disk or in a copy); {}",
            path.display(),
            use_another(dir)
        );
    }
    Ok(path)
}

/// What to do instead of loading the damaged checkpoint `dir`: the newest other complete
/// checkpoint beside it, when there is one.
pub fn use_another(dir: &Path) -> String {
    let others = dir
        .parent()
        .and_then(|root| super::list(root).ok())
        .unwrap_or_default();
    match others
        .iter()
        .rev()
        .find(|(_, d)| d.file_name() != dir.file_name())
    {
        Some((_, other)) => format!(
            "use another checkpoint, such as '{}' (the newest other one; --resume takes its \
             path)",
            other.display()
        ),
        None => "there is no other checkpoint beside it: restore it from a copy or train again"
            .to_string(),
    }
}

/// Whether the little-endian `bytes` of a tensor of `dtype` hold a NaN or an infinity
/// (all exponent bits set); integer and 8-bit float tensors are not checked.
pub fn has_non_finite(dtype: safetensors::Dtype, bytes: &[u8]) -> bool {
    use safetensors::Dtype;
    fn any<const N: usize>(bytes: &[u8], exponent: u64) -> bool {
        bytes.chunks_exact(N).any(|b| {
            let mut word = [0u8; 8];
            word[..N].copy_from_slice(b);
            u64::from_le_bytes(word) & exponent == exponent
        })
    }
    match dtype {
        Dtype::F64 => any::<8>(bytes, 0x7ff0_0000_0000_0000),
        Dtype::F32 => any::<4>(bytes, 0x7f80_0000),
        Dtype::BF16 => any::<2>(bytes, 0x7f80),
        Dtype::F16 => any::<2>(bytes, 0x7c00),
        _ => false,
    }
}

/// `e`, a failed write of the checkpoint of `step` under `root`, restated when the disk (or
/// a quota) was full: once, with what failed, that the previous checkpoint is intact, and
/// the fix. Other errors pass unchanged.
pub fn explain_disk_full(e: anyhow::Error, root: &Path, step: usize) -> anyhow::Error {
    let full = e
        .chain()
        .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
        .find(|io| matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)));
    let Some(io) = full else {
        return e;
    };
    // The outermost message names the file; the I/O error's own text follows it once.
    let what = match e.to_string() {
        outer if outer == io.to_string() => String::new(),
        outer => format!("{outer}: "),
    };
    let previous = match super::list(root).ok().and_then(|mut found| found.pop()) {
        Some((_, dir)) => format!(
            "the previous checkpoint '{}' is intact. Free space on that disk and run the same \
             command with --resume auto, or run it with --out on another disk and --resume '{}'",
            dir.display(),
            dir.display()
        ),
        None => "there is no earlier checkpoint. Free space on that disk, or pass --out on \
                 another disk, and run again"
            .to_string(),
    };
    anyhow::anyhow!(
        "cannot save the checkpoint '{}': the disk is full ({what}{io}). The incomplete one is \
         discarded and {previous}",
        root.join(super::step_dir_name(step)).display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full disk under safetensors' writer reads once, names the file and says the fix
    /// (it repeated the I/O error, as safetensors' error and as its source, and said nothing
    /// else: #26 item 10).
    #[test]
    fn a_full_disk_is_said_once_with_the_fix() {
        let io = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let e = anyhow::Error::new(safetensors::SafeTensorError::IoError(io))
            .context("cannot write '/run/checkpoints/.tmp-step-00000008/model.safetensors'");
        let message = format!(
            "{:#}",
            explain_disk_full(e, Path::new("/run/checkpoints"), 8)
        );
        assert_eq!(
            message.matches("No space left on device").count(),
            1,
            "{message}"
        );
        for needle in ["model.safetensors", "step-00000008", "--out", "Free space"] {
            assert!(message.contains(needle), "{needle}: {message}");
        }
        let other = anyhow::anyhow!("cannot write: permission denied");
        let kept = explain_disk_full(other, Path::new("/run"), 8).to_string();
        assert_eq!(kept, "cannot write: permission denied");
    }

    #[test]
    fn non_finite_values_are_found_in_every_float_type() {
        use safetensors::Dtype;
        let f32s: Vec<u8> = [1.0f32, f32::NAN]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert!(has_non_finite(Dtype::F32, &f32s));
        assert!(!has_non_finite(Dtype::F32, &f32s[..4]));
        let f64s: Vec<u8> = [f64::NEG_INFINITY]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert!(has_non_finite(Dtype::F64, &f64s));
        // bf16 +inf is 0x7f80, f16 NaN 0x7e00; 1.0 is 0x3f80 and 0x3c00.
        assert!(has_non_finite(Dtype::BF16, &[0x80, 0x3f, 0x80, 0x7f]));
        assert!(!has_non_finite(Dtype::BF16, &[0x80, 0x3f]));
        assert!(has_non_finite(Dtype::F16, &[0x00, 0x7e]));
        assert!(!has_non_finite(Dtype::F16, &[0x00, 0x3c]));
        assert!(!has_non_finite(Dtype::U8, &[0xff, 0xff]));
    }
}
