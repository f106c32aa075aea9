//! A split's token stream becoming shards: full shards are written as soon as they fill,
//! `hold_back` tokens stay unwritten until the end (the held-out validation tail), and the
//! state between input files is plain data that the journal saves for a resume.

use crate::data::shards;
use crate::failpoint;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Shards written for one split.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Written {
    /// Tokens in those shards.
    pub tokens: usize,
    /// Their file names, in order.
    pub files: Vec<String>,
    /// Documents in them (the held-out tail's are counted in `val`).
    pub documents: usize,
}

/// What a split's sink holds between input files, apart from its unwritten tokens (the
/// journal's carry file): enough to continue exactly as an uninterrupted run would.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SinkState {
    /// `train`, `val` or `test`.
    pub split: String,
    /// Documents pushed so far.
    pub documents: usize,
    /// Shards written so far.
    pub written: Written,
    /// Number of the next shard file.
    pub next_index: usize,
    /// Where documents start in the unwritten tokens (the validation tail is cut at one).
    pub doc_starts: Vec<usize>,
    /// The start of a WikiText article that continues in the next input.
    pub pending: String,
}

/// The fixed part of a sink: where and how shards are written.
#[derive(Debug, Clone, Copy)]
pub struct SinkSetup<'a> {
    /// Output folder.
    pub out: &'a Path,
    /// Dataset name, the shard names' prefix.
    pub dataset: &'a str,
    /// Tokens per shard.
    pub shard_tokens: usize,
    /// Model vocabulary (u16 or u32 ids).
    pub vocab_size: usize,
}

/// Accumulates a split's tokens and writes full shards, keeping `hold_back` tokens unwritten
/// until the end.
pub struct ShardSink<'a> {
    setup: SinkSetup<'a>,
    hold_back: usize,
    buffer: Vec<u32>,
    state: SinkState,
    /// Index of the input file being read (where the `prepare-shard` failpoint fires).
    file: usize,
}

impl<'a> ShardSink<'a> {
    /// A sink for `split` that starts with nothing written.
    pub fn new(setup: SinkSetup<'a>, split: &str, hold_back: usize) -> Self {
        let state = SinkState {
            split: split.to_string(),
            // llm.c numbers training shards from 1 (its shard 0 is validation).
            next_index: usize::from(split == "train"),
            ..SinkState::default()
        };
        Self::restore(setup, state, Vec::new(), hold_back)
    }

    /// A sink continuing from a saved `state` and its unwritten tokens `carry`.
    pub fn restore(
        setup: SinkSetup<'a>,
        state: SinkState,
        carry: Vec<u32>,
        hold_back: usize,
    ) -> Self {
        Self {
            setup,
            hold_back,
            buffer: carry,
            state,
            file: 0,
        }
    }

    /// The split this sink writes.
    pub fn split(&self) -> &str {
        &self.state.split
    }

    /// The saved state and the unwritten tokens, for the journal.
    pub fn state(&self) -> (&SinkState, &[u32]) {
        (&self.state, &self.buffer)
    }

    /// The WikiText article continuing into the next input.
    pub fn pending(&mut self) -> &mut String {
        &mut self.state.pending
    }

    /// Documents pushed so far.
    pub fn documents(&self) -> usize {
        self.state.documents
    }

    /// Tokens pushed so far (written or not).
    pub fn tokens_total(&self) -> usize {
        self.state.written.tokens + self.buffer.len()
    }

    /// Notes that input file `index` is being read.
    pub fn reading_file(&mut self, index: usize) {
        self.file = index;
    }

    /// Appends `docs`, each preceded by `separator`, and writes every full shard.
    pub fn push_documents(&mut self, docs: &[Vec<u32>], separator: u32) -> Result<()> {
        if self.buffer.capacity() == 0 {
            // Reserved once: the buffer never grows by doubling past a shard, and pages it
            // never touches (a small source) are never resident.
            self.buffer
                .reserve(self.setup.shard_tokens + self.hold_back + (1 << 20));
        }
        for doc in docs {
            self.state.doc_starts.push(self.buffer.len());
            self.buffer.push(separator);
            self.buffer.extend_from_slice(doc);
        }
        self.state.documents += docs.len();
        let shard = self.setup.shard_tokens;
        while self.buffer.len() >= shard + self.hold_back {
            let full = std::mem::take(&mut self.buffer);
            let docs = self.state.doc_starts.partition_point(|&s| s < shard);
            self.write(&full[..shard], docs)?;
            self.buffer = full;
            self.buffer.drain(..shard);
            self.state.doc_starts.drain(..docs);
            self.state.doc_starts.iter_mut().for_each(|s| *s -= shard);
            failpoint::hit(failpoint::Point::PrepareShard, 0, self.file)?;
        }
        Ok(())
    }

    /// Writes the next shard of this split, with `documents` starting in it.
    fn write(&mut self, tokens: &[u32], documents: usize) -> Result<()> {
        let name = shard_name(self.setup.dataset, &self.state.split, self.state.next_index);
        shards::write(&self.setup.out.join(&name), tokens, self.setup.vocab_size)?;
        let written = &mut self.state.written;
        self.state.next_index += 1;
        written.tokens += tokens.len();
        written.documents += documents;
        written.files.push(name);
        Ok(())
    }

    /// Writes what is left; returns this split's shards and, when tokens were held back, the
    /// validation shard cut from the tail at a document start.
    pub fn finish(mut self) -> Result<(Written, Option<Written>)> {
        if self.hold_back == 0 {
            let rest = std::mem::take(&mut self.buffer);
            if !rest.is_empty() {
                self.write(&rest, self.state.doc_starts.len())?;
            }
            return Ok((self.state.written, None));
        }
        let cut = self.tail_cut();
        let val_tokens = self.buffer.split_off(cut);
        let val_docs =
            self.state.doc_starts.len() - self.state.doc_starts.partition_point(|&s| s < cut);
        let rest = std::mem::take(&mut self.buffer);
        if !rest.is_empty() {
            self.write(&rest, self.state.doc_starts.len() - val_docs)?;
        }
        let name = shard_name(self.setup.dataset, "val", 0);
        shards::write(
            &self.setup.out.join(&name),
            &val_tokens,
            self.setup.vocab_size,
        )?;
        let val = Written {
            tokens: val_tokens.len(),
            files: vec![name],
            documents: val_docs,
        };
        Ok((self.state.written, Some(val)))
    }

    /// Where the held-out tail starts in the buffer: `hold_back` tokens from the end (a tenth
    /// of the split when it is smaller than twice that), moved to the first document start
    /// in the tail, else the last one before it (a long final document), else exactly there
    /// (a single document).
    fn tail_cut(&self) -> usize {
        let total = self.tokens_total();
        let want = if total < 2 * self.hold_back {
            total / 10
        } else {
            self.hold_back
        };
        let from = self.buffer.len().saturating_sub(want);
        let starts = &self.state.doc_starts;
        let next = starts.partition_point(|&s| s < from);
        starts
            .get(next)
            .copied()
            .or_else(|| starts[..next].last().copied().filter(|&s| s > 0))
            .unwrap_or(from)
    }
}

/// `<dataset>_<split>_<NNNNNN>.bin`, llm.c's shard names.
pub fn shard_name(dataset: &str, split: &str, index: usize) -> String {
    format!("{dataset}_{split}_{index:06}.bin")
}
