//! Files written so that a crash leaves either the old content or the new, never a torn
//! mix: the new content goes to a temporary name beside the target, is synced to disk, and
//! is then renamed over it (a rename within a folder is atomic on POSIX file systems).

use anyhow::{Context, Result};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` and syncs them to disk before returning.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f =
        File::create(path).with_context(|| format!("cannot create '{}'", path.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("cannot write '{}'", path.display()))
}

/// Replaces the file at `path` by `bytes`: written and synced as [`temporary`]`(path)`,
/// then renamed over `path`.
pub fn replace(path: &Path, bytes: &[u8]) -> Result<()> {
    let temp = temporary(path);
    write_synced(&temp, bytes)?;
    rename(&temp, path)
}

/// The temporary name [`replace`] writes `path` under: `<path>.tmp`, beside it.
pub fn temporary(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Renames the complete, synced `temp` (a file or a folder) to `path`; the error names both.
pub fn rename(temp: &Path, path: &Path) -> Result<()> {
    std::fs::rename(temp, path)
        .with_context(|| format!("cannot move '{}' to '{}'", temp.display(), path.display()))
}

/// Makes a folder's entries (new files, renames) durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot sync folder '{}'", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_swaps_the_content_and_leaves_no_temporary() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("meta.json");
        replace(&path, b"old")?;
        replace(&path, b"new")?;
        assert_eq!(std::fs::read(&path)?, b"new");
        assert_eq!(temporary(&path), dir.path().join("meta.json.tmp"));
        assert!(!temporary(&path).exists());
        Ok(())
    }
}
