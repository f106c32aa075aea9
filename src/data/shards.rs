//! Token shards in llm.c's format: a header of 256 little-endian int32 (`[0]` magic, `[1]`
//! version, `[2]` token count, the rest zero), then the ids. GPT-2-sized vocabularies use
//! magic 20240520, version 1 and u16 ids; larger ones magic 20240801 and u32 ids (version 7,
//! as llm.c writes for LLaMA-3).
//!
//! Shards are memory-mapped, so a loader touches only the windows it reads.

use crate::durable;
use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Magic number of u16 shards.
pub const MAGIC_U16: i32 = 20240520;
/// Magic number of u32 shards.
pub const MAGIC_U32: i32 = 20240801;
const VERSION_U16: i32 = 1;
const VERSION_U32: i32 = 7;
/// Header length in int32 values.
pub const HEADER_INTS: usize = 256;
const HEADER_BYTES: usize = HEADER_INTS * 4;

/// One memory-mapped, validated shard.
pub struct Shard {
    path: PathBuf,
    map: Mmap,
    tokens: usize,
    /// Bytes per id: 2 or 4.
    width: usize,
}

impl Shard {
    /// Maps `path` and checks its header against its size; errors name the file and
    /// what was expected.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path)
            .with_context(|| format!("cannot open token shard '{}'", path.display()))?;
        // SAFETY: the map is read-only; a shard changed underneath a run is outside our
        // contract (shards are written once, atomically).
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot map token shard '{}'", path.display()))?;
        if map.len() < HEADER_BYTES {
            bail!(
                "token shard '{}' is truncated: {} bytes, shorter than the {HEADER_BYTES}-byte \
                 header",
                path.display(),
                map.len()
            );
        }
        let header = |i: usize| i32::from_le_bytes(map[4 * i..4 * i + 4].try_into().unwrap());
        let (magic, version, count) = (header(0), header(1), header(2));
        let width = match (magic, version) {
            (MAGIC_U16, VERSION_U16) => 2,
            (MAGIC_U32, VERSION_U32) => 4,
            _ => bail!(
                "token shard '{}' has magic {magic} version {version}; expected {MAGIC_U16} \
                 version {VERSION_U16} (u16 ids) or {MAGIC_U32} version {VERSION_U32} (u32 ids). \
                 Is it an llm.c token file?",
                path.display()
            ),
        };
        if count < 0 {
            bail!("token shard '{}' declares {count} tokens", path.display());
        }
        let tokens = count as usize;
        let expected = HEADER_BYTES + tokens * width;
        if map.len() != expected {
            bail!(
                "token shard '{}' has {} bytes but its header declares {tokens} tokens \
                 ({expected} bytes expected){}",
                path.display(),
                map.len(),
                if map.len() < expected {
                    ": it is truncated, prepare it again"
                } else {
                    ""
                }
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            map,
            tokens,
            width,
        })
    }

    /// Tokens in the shard.
    pub fn len(&self) -> usize {
        self.tokens
    }

    /// True for a shard without tokens.
    pub fn is_empty(&self) -> bool {
        self.tokens == 0
    }

    /// The shard's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends ids `start .. start + len` to `out`.
    pub fn read(&self, start: usize, len: usize, out: &mut Vec<u32>) {
        let bytes = &self.map[HEADER_BYTES + start * self.width..][..len * self.width];
        match self.width {
            2 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| u32::from(u16::from_le_bytes([b[0], b[1]]))),
            ),
            _ => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            ),
        }
    }

    /// Fails, naming the shard and the id, when an id is `vocab_size` or more.
    pub fn check_vocab(&self, vocab_size: usize) -> Result<()> {
        let mut ids = Vec::new();
        let chunk = 1 << 20;
        for start in (0..self.tokens).step_by(chunk) {
            ids.clear();
            self.read(start, chunk.min(self.tokens - start), &mut ids);
            if let Some(pos) = ids.iter().position(|&id| id as usize >= vocab_size) {
                bail!(
                    "token shard '{}' holds id {} at position {}, outside the model's \
                     vocabulary of {vocab_size} (model.vocab_size); raise model.vocab_size \
                     (--set model.vocab_size={}) or prepare the data with the model's tokenizer",
                    self.path.display(),
                    ids[pos],
                    start + pos,
                    (ids[pos] as usize + 1).div_ceil(64) * 64
                );
            }
        }
        Ok(())
    }
}

/// Writes `tokens` as an llm.c shard at `path`, atomically (temp file, fsync, rename), with
/// u16 ids when `vocab_size` fits and u32 ids otherwise.
pub fn write(path: &Path, tokens: &[u32], vocab_size: usize) -> Result<()> {
    let wide = vocab_size > usize::from(u16::MAX) + 1;
    let count = i32::try_from(tokens.len())
        .ok()
        .with_context(|| format!("{} tokens do not fit one shard", tokens.len()))?;
    let mut header = [0i32; HEADER_INTS];
    header[0] = if wide { MAGIC_U32 } else { MAGIC_U16 };
    header[1] = if wide { VERSION_U32 } else { VERSION_U16 };
    header[2] = count;
    let temp = durable::temporary(path);
    let context = || format!("cannot write token shard '{}'", path.display());
    let file =
        File::create(&temp).with_context(|| format!("cannot create '{}'", temp.display()))?;
    // Streamed through a buffer: a shard is never held twice in memory.
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    for v in header {
        out.write_all(&v.to_le_bytes()).with_context(context)?;
    }
    for &id in tokens {
        if wide {
            out.write_all(&id.to_le_bytes()).with_context(context)?;
        } else {
            let id = u16::try_from(id)
                .ok()
                .with_context(|| format!("id {id} does not fit a u16 shard"))?;
            out.write_all(&id.to_le_bytes()).with_context(context)?;
        }
    }
    let file = out
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(context)?;
    file.sync_all().with_context(context)?;
    durable::rename(&temp, path)
}

/// The shard files a `shards:` spec names: a single `.bin` file, or the `.bin` files of a
/// folder whose names contain `_<split>_` (e.g. `_val_`), in name order.
pub fn files(spec_path: &Path, split: &str) -> Result<Vec<PathBuf>> {
    if spec_path.is_file() {
        return Ok(vec![spec_path.to_path_buf()]);
    }
    if !spec_path.is_dir() {
        bail!(
            "shard path '{}' does not exist; pass a folder of llm.c .bin shards (from \
             `bsfa-train prepare`) or one .bin file",
            spec_path.display()
        );
    }
    let marker = format!("_{split}_");
    let mut found: Vec<PathBuf> = std::fs::read_dir(spec_path)
        .with_context(|| format!("cannot list '{}'", spec_path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "bin")
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().contains(&marker))
        })
        .collect();
    found.sort();
    if found.is_empty() {
        bail!(
            "no '*{marker}*.bin' shards in '{}'; prepare the data with `bsfa-train prepare`",
            spec_path.display()
        );
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn damaged_shards_are_named_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d_val_000000.bin");
        write(&path, &[1, 2, 3, 4], 256).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 2]).unwrap();
        let err = Shard::open(&path).err().unwrap().to_string();
        assert!(
            err.contains("d_val_000000.bin") && err.contains("truncated"),
            "{err}"
        );
        let mut bad = bytes.clone();
        bad[0] = 0;
        std::fs::write(&path, &bad).unwrap();
        let err = Shard::open(&path).err().unwrap().to_string();
        assert!(err.contains("magic"), "{err}");
        std::fs::write(&path, &bytes[..100]).unwrap();
        assert!(Shard::open(&path).is_err());
        let err = files(dir.path(), "train").unwrap_err().to_string();
        assert!(err.contains("_train_"), "{err}");
    }
}
