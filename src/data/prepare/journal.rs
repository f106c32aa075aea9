//! The journal of a prepare in progress, so that a killed one (`kill -9`, SIGTERM, a dropped
//! connection) continues from its last completed input file: after each file, the tokens
//! not yet in a full shard go to a carry file (written atomically, named by the file count)
//! and the journal, naming it, replaces the previous one atomically; only then is the
//! previous carry deleted. Whatever a crash leaves, the journal names a complete state; the
//! shards and carries it does not name are deleted when the prepare resumes.

use super::sink::{ShardSink, SinkState};
use crate::data::shards::{self, Shard};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::Path;

/// File name of the journal, beside the shards.
pub const JOURNAL_FILE: &str = "prepare-journal.json";
/// Prefix of carry files (no `_train_` or `_val_`: the loader never reads them).
const CARRY_PREFIX: &str = "prepare-carry-";

/// A prepare's progress over its input files.
#[derive(Debug, Serialize, Deserialize)]
pub struct Journal {
    /// The request and its inputs (source, tokenizer, sizes, commit, file list): a journal
    /// for anything else is discarded.
    pub key: Value,
    /// Input files completed, in order.
    pub files_done: usize,
    /// The finished splits' entries of `meta.json`.
    pub splits: Map<String, Value>,
    /// The split in progress, if any.
    pub sink: Option<SinkState>,
    /// The file holding the split's unwritten tokens.
    pub carry: Option<String>,
    /// How many tokens it holds.
    pub carried: usize,
}

impl Journal {
    /// An empty journal for `key`.
    pub fn fresh(key: Value) -> Self {
        Self {
            key,
            files_done: 0,
            splits: Map::new(),
            sink: None,
            carry: None,
            carried: 0,
        }
    }

    /// The journal in `out` when it belongs to `key`.
    pub fn load(out: &Path, key: &Value) -> Option<Self> {
        let text = std::fs::read_to_string(out.join(JOURNAL_FILE)).ok()?;
        let journal: Self = serde_json::from_str(&text).ok()?;
        (journal.key == *key).then_some(journal)
    }

    /// Records `files_done` input files as complete, with `sink` the split in progress.
    pub fn commit(
        &mut self,
        out: &Path,
        files_done: usize,
        sink: Option<&ShardSink>,
        vocab_size: usize,
    ) -> Result<()> {
        let previous = self.carry.take();
        self.files_done = files_done;
        self.sink = None;
        if let Some(sink) = sink {
            let (state, tokens) = sink.state();
            let name = format!("{CARRY_PREFIX}{files_done:06}.bin");
            shards::write(&out.join(&name), tokens, vocab_size)?;
            self.sink = Some(state.clone());
            self.carry = Some(name);
        }
        self.carried = sink.map_or(0, |s| s.state().1.len());
        crate::durable::replace(
            &out.join(JOURNAL_FILE),
            serde_json::to_string(self)?.as_bytes(),
        )?;
        if let Some(previous) = previous.filter(|p| Some(p) != self.carry.as_ref()) {
            let _ = std::fs::remove_file(out.join(previous));
        }
        Ok(())
    }

    /// The split in progress's unwritten tokens.
    pub fn carry_tokens(&self, out: &Path) -> Result<Vec<u32>> {
        let Some(name) = &self.carry else {
            return Ok(Vec::new());
        };
        let shard = Shard::open(&out.join(name)).with_context(|| {
            format!("the journal of '{}' names a bad carry file", out.display())
        })?;
        let mut tokens = Vec::with_capacity(shard.len());
        shard.read(0, shard.len(), &mut tokens);
        Ok(tokens)
    }

    /// Tokens tokenized so far: written to shards or carried.
    pub fn tokens(&self) -> usize {
        let finished: u64 = self
            .splits
            .values()
            .filter_map(|s| s["tokens"].as_u64())
            .sum();
        let current = self.sink.as_ref().map_or(0, |s| s.written.tokens);
        finished as usize + current + self.carried
    }

    /// Deletes what a killed run wrote after its last commit: `dataset`'s shards (and
    /// temporaries) and carry files this journal does not name.
    pub fn remove_strays(&self, out: &Path, dataset: &str) -> Result<()> {
        let mut named: Vec<&str> = self
            .splits
            .values()
            .filter_map(|s| s["shards"].as_array())
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if let Some(sink) = &self.sink {
            named.extend(sink.written.files.iter().map(String::as_str));
        }
        named.extend(self.carry.as_deref());
        remove_files(out, |name| is_ours(name, dataset) && !named.contains(&name))
    }
}

/// Deletes `meta.json`, the journal, carries and `dataset`'s shards (complete or partial)
/// of an earlier run.
pub fn remove_previous(out: &Path, dataset: &str) -> Result<()> {
    let _ = std::fs::remove_file(out.join(super::META_FILE));
    let _ = std::fs::remove_file(out.join(JOURNAL_FILE));
    remove_files(out, |name| is_ours(name, dataset))
}

/// A shard, carry or temporary that a prepare of `dataset` writes.
fn is_ours(name: &str, dataset: &str) -> bool {
    (name.starts_with(&format!("{dataset}_")) || name.starts_with(CARRY_PREFIX))
        && (name.ends_with(".bin") || name.ends_with(".bin.tmp"))
}

/// Deletes the files of `out` whose names `doomed` picks.
fn remove_files(out: &Path, doomed: impl Fn(&str) -> bool) -> Result<()> {
    for entry in
        std::fs::read_dir(out).with_context(|| format!("cannot list '{}'", out.display()))?
    {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if doomed(&name) {
            std::fs::remove_file(&path)
                .with_context(|| format!("cannot remove '{}'", path.display()))?;
        }
    }
    Ok(())
}
