//! The run's tokenizer, which travels inside each checkpoint: `export`, `sample` and `eval`
//! read it there, never from a path the checkpoint names.

use super::{checked_file, integrity, Checkpoint, TOKENIZER_FILE};
use crate::data::Tokenizer;
use anyhow::{bail, Result};
use std::path::PathBuf;

impl Checkpoint {
    /// The checkpoint's own copy of its run's tokenizer.json, checked like its other files;
    /// `None` when it holds none (a bytes-tokenizer run, or a checkpoint written before
    /// checkpoints held their tokenizer).
    pub fn tokenizer_file(&self) -> Result<Option<PathBuf>> {
        let sums = &self.state.checksums;
        let present = std::fs::symlink_metadata(self.dir.join(TOKENIZER_FILE)).is_ok();
        if sums.contains_key(TOKENIZER_FILE) || (sums.is_empty() && present) {
            return checked_file(&self.dir, TOKENIZER_FILE, sums).map(Some);
        }
        Ok(None)
    }

    /// The tokenizer of the checkpoint's run: its own tokenizer.json, or the bytes
    /// tokenizer. Only a checkpoint written before checkpoints held their tokenizer falls
    /// back to the run's `data.tokenizer` (a note says so); a newer one that lacks the file
    /// is an error.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        if let Some(file) = self.tokenizer_file()? {
            return Tokenizer::load(&file.to_string_lossy());
        }
        let spec = &self.state.config.data.tokenizer;
        if spec == "bytes" {
            return Ok(Tokenizer::Bytes);
        }
        if !self.state.checksums.is_empty() {
            bail!(
                "checkpoint '{}' lacks the {TOKENIZER_FILE} of its run's tokenizer '{spec}' (an \
                 incomplete copy?); {}",
                self.dir.display(),
                integrity::use_another(&self.dir)
            );
        }
        eprintln!(
            "note: '{}' holds no {TOKENIZER_FILE} (written by an older version): loading the \
             run's tokenizer '{spec}'",
            self.dir.display()
        );
        Tokenizer::load(spec)
    }
}
