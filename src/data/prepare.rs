//! `bsfa-train prepare`: text -> token shards (llm.c format), streamed.
//!
//! Sources are read a unit at a time (a parquet row group, or a text file), tokenized on all
//! cores and appended to the current shard, which is written (atomically) whenever it holds
//! `shard_tokens` tokens: memory stays bounded by one shard plus one unit. Every document is
//! preceded by the tokenizer's end-of-text id (llm.c's convention; the newline byte for the
//! bytes tokenizer). A split without validation data of its own (text, OpenWebText) keeps its
//! last `val_tokens` tokens back, from a document start, as the validation shard.
//!
//! `meta.json` is written last: a folder with it is complete. A re-run with the same request
//! finds it and does nothing; any other re-run deletes the dataset's shards and restarts.

use super::hub::{self, DocumentRule};
use super::parquet_text::TextColumn;
use super::shards;
use super::Tokenizer;
use crate::metrics::Progress;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What to prepare and where.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// `text:PATH`, `parquet:DIR`, `wikitext103` or `openwebtext`.
    pub source: String,
    /// Tokenizer spec (as `--tokenizer`).
    pub tokenizer: String,
    pub out: PathBuf,
    /// Tokens per shard.
    pub shard_tokens: usize,
    /// Tokens held back for validation when the source has no validation split.
    pub val_tokens: usize,
}

/// The summary `prepare` prints, and the folder's `meta.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub source: String,
    pub dataset: String,
    pub tokenizer: String,
    pub vocab_size: usize,
    /// `u16` or `u32`.
    pub id_type: String,
    pub shard_tokens: usize,
    pub val_tokens: usize,
    /// Per split (`train`, `val`, `test`): documents, tokens and shard file names.
    pub splits: serde_json::Map<String, serde_json::Value>,
    /// How documents are separated.
    pub document_separator: serde_json::Value,
    /// True when `val` was held out from the end of the training text.
    pub val_held_out: bool,
    pub seconds: f64,
    pub tokens_per_s: f64,
}

/// Default tokens per shard (llm.c's 100M).
pub const DEFAULT_SHARD_TOKENS: usize = 100_000_000;
/// Default validation tokens held back from sources without a validation split.
pub const DEFAULT_VAL_TOKENS: usize = 10_000_000;

/// Documents tokenized per call (in parallel), bounding the tokenizer's transient memory.
const TOKENIZE_DOCS: usize = 256;

/// File name of the completion marker and summary.
pub const META_FILE: &str = "meta.json";

/// Prepares `options.source` into `options.out`, or does nothing when it already holds the
/// same preparation.
pub fn run(options: &PrepareOptions) -> Result<Meta> {
    if options.shard_tokens == 0 || options.val_tokens == 0 {
        bail!("--shard-tokens and --val-tokens must be at least 1");
    }
    let started = Instant::now();
    let tokenizer = Tokenizer::load(&options.tokenizer)?;
    let (dataset, units) = plan(&options.source)?;
    let meta_path = options.out.join(META_FILE);
    if let Some(meta) = existing(&meta_path, options)? {
        eprintln!(
            "'{}' already holds {} prepared with {}: nothing to do",
            options.out.display(),
            meta.source,
            meta.tokenizer
        );
        return Ok(meta);
    }
    std::fs::create_dir_all(&options.out)
        .with_context(|| format!("cannot create '{}'", options.out.display()))?;
    remove_previous(&options.out, &dataset)?;

    let (separator, separator_text) = tokenizer.document_separator()?;
    let vocab_size = tokenizer.vocab_size();
    let has_val = units.iter().any(|u| u.split == "val");
    let mut progress = UnitProgress::new(units.len());
    let mut splits = serde_json::Map::new();
    for split in ["train", "val", "test"] {
        let split_units: Vec<&Unit> = units.iter().filter(|u| u.split == split).collect();
        if split_units.is_empty() {
            continue;
        }
        let hold_back = if split == "train" && !has_val {
            options.val_tokens
        } else {
            0
        };
        let mut sink = ShardSink::new(
            &options.out,
            &dataset,
            split,
            options,
            vocab_size,
            hold_back,
        );
        let mut documents = 0usize;
        let mut pending = String::new();
        for unit in split_units {
            let docs = unit.documents(&mut pending)?;
            documents += docs.len();
            // In slices: a tokenizer's encodings are many times larger than their ids.
            for slice in docs.chunks(TOKENIZE_DOCS) {
                sink.push_documents(&tokenizer.encode_batch(slice)?, separator)?;
            }
            progress.unit_done(split, documents, sink.tokens_total());
        }
        if !pending.is_empty() {
            documents += 1;
            sink.push_documents(&tokenizer.encode_batch(&[pending])?, separator)?;
        }
        let (train, val) = sink.finish(separator)?;
        progress.split_done(train.tokens + val.as_ref().map_or(0, |v| v.tokens));
        splits.insert(
            split.to_string(),
            json!({"documents": documents, "tokens": train.tokens, "shards": train.files}),
        );
        if let Some(val) = val {
            splits.insert(
                "val".into(),
                json!({"documents": null, "tokens": val.tokens, "shards": val.files}),
            );
        }
    }
    let total_tokens = progress.finish();
    if !splits.contains_key("train") {
        bail!("'{}' holds no training data", options.source);
    }
    let seconds = started.elapsed().as_secs_f64();
    let meta = Meta {
        source: options.source.clone(),
        dataset,
        tokenizer: options.tokenizer.clone(),
        vocab_size,
        id_type: if vocab_size > 65536 { "u32" } else { "u16" }.into(),
        shard_tokens: options.shard_tokens,
        val_tokens: options.val_tokens,
        splits,
        document_separator: json!({
            "id": separator,
            "token": separator_text,
            "placement": "before every document",
        }),
        val_held_out: !has_val,
        seconds,
        tokens_per_s: total_tokens as f64 / seconds,
    };
    crate::durable::replace(&meta_path, serde_json::to_string_pretty(&meta)?.as_bytes())?;
    Ok(meta)
}

/// Progress over the units of a prepare, with the tokens/s so far.
struct UnitProgress {
    bar: Progress,
    started: Instant,
    /// When a line was last printed: without a terminal, one every few seconds.
    last_line: Instant,
    done: usize,
    /// Tokens written by the splits already finished.
    tokens_before: usize,
}

impl UnitProgress {
    fn new(units: usize) -> Self {
        Self {
            bar: Progress::counting("unit", units, 0),
            started: Instant::now(),
            last_line: Instant::now(),
            done: 0,
            tokens_before: 0,
        }
    }

    /// A unit of `split` is done: `documents` and `tokens` written in that split so far.
    fn unit_done(&mut self, split: &str, documents: usize, tokens: usize) {
        self.done += 1;
        let rate = (self.tokens_before + tokens) as f64 / self.started.elapsed().as_secs_f64();
        let print = self.last_line.elapsed().as_secs() >= 5;
        if print {
            self.last_line = Instant::now();
        }
        let msg = format!("{split}: {documents} docs, {tokens} tokens, {rate:.0} tok/s");
        self.bar.update(self.done, &msg, print);
    }

    /// A split is written, with `tokens` in all (its held-out validation tail included).
    fn split_done(&mut self, tokens: usize) {
        self.tokens_before += tokens;
    }

    /// Closes the display; returns the tokens written in all.
    fn finish(&self) -> usize {
        self.bar.finish();
        self.tokens_before
    }
}

/// One unit of reading: a parquet row group or a text file, in a split.
struct Unit {
    split: String,
    source: UnitSource,
    rule: DocumentRule,
}

enum UnitSource {
    TextFile(PathBuf),
    RowGroup(std::sync::Arc<TextColumn>, usize),
}

impl Unit {
    /// The unit's complete documents. Under the WikiText rule an article may continue into
    /// the next unit: its start is kept in `pending`.
    fn documents(&self, pending: &mut String) -> Result<Vec<String>> {
        let rows = match &self.source {
            UnitSource::TextFile(path) => {
                let bytes = std::fs::read(path)
                    .with_context(|| format!("cannot read '{}'", path.display()))?;
                vec![String::from_utf8(bytes)
                    .with_context(|| format!("'{}' is not UTF-8 text", path.display()))?]
            }
            UnitSource::RowGroup(file, group) => file.read_row_group(*group)?,
        };
        Ok(match self.rule {
            DocumentRule::Rows => rows,
            DocumentRule::WikiTextArticles => {
                let mut docs = Vec::new();
                for row in rows {
                    if is_article_title(&row) && !pending.trim().is_empty() {
                        docs.push(std::mem::take(pending));
                    }
                    pending.push_str(&row);
                }
                docs
            }
        })
    }
}

/// ` = Title = ` (one `=` on each side): a new WikiText article; ` = = Section = = ` is not.
fn is_article_title(line: &str) -> bool {
    let t = line.trim();
    t.len() > 4 && t.starts_with("= ") && t.ends_with(" =") && !t.starts_with("= =")
}

/// The files of a `text:PATH` source: PATH itself, or the `.txt` files of the folder PATH
/// in name order.
pub fn text_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("cannot list '{}'", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "txt"))
            .collect();
        files.sort();
        if files.is_empty() {
            bail!("'{}' holds no .txt files", path.display());
        }
        Ok(files)
    } else if path.is_file() {
        Ok(vec![path.to_path_buf()])
    } else {
        bail!("text source '{}' does not exist", path.display());
    }
}

/// The dataset name (for shard names) and the units to read, in order.
fn plan(source: &str) -> Result<(String, Vec<Unit>)> {
    let stem = |p: &Path| {
        p.file_stem()
            .map_or("data".into(), |s| s.to_string_lossy().replace('_', "-"))
    };
    if let Some(path) = source.strip_prefix("text:") {
        let path = Path::new(path);
        let files = text_files(path)?;
        let units = files
            .into_iter()
            .map(|f| Unit {
                split: "train".into(),
                source: UnitSource::TextFile(f),
                rule: DocumentRule::Rows,
            })
            .collect();
        return Ok((stem(path), units));
    }
    let (name, files, rule) = if let Some(dir) = source.strip_prefix("parquet:") {
        let dir = Path::new(dir);
        (stem(dir), local_parquet(dir)?, DocumentRule::Rows)
    } else if let Some(dataset) = hub::known(source) {
        (
            dataset.name.to_string(),
            hub::download_parquet(dataset).map_err(|e| offline_advice(source, e))?,
            dataset.documents,
        )
    } else {
        bail!(
            "unknown source '{source}'; use text:PATH, parquet:DIR, or one of: {}",
            hub::DATASETS
                .iter()
                .map(|d| d.name)
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    let mut units = Vec::new();
    for (split, path) in files {
        let file = std::sync::Arc::new(TextColumn::open(&path)?);
        let split = if split == "validation" {
            "val".into()
        } else {
            split
        };
        for group in 0..file.row_groups() {
            units.push(Unit {
                split: split.clone(),
                source: UnitSource::RowGroup(file.clone(), group),
                rule,
            });
        }
    }
    Ok((name, units))
}

/// The parquet files of a local folder (searched recursively) with their splits.
fn local_parquet(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    if !dir.is_dir() {
        bail!("parquet folder '{}' does not exist", dir.display());
    }
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in
            std::fs::read_dir(&d).with_context(|| format!("cannot list '{}'", d.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|x| x == "parquet") {
                match hub::split_of(&path) {
                    Some(split) => found.push((split, path)),
                    None => eprintln!(
                        "note: skipping '{}': its name says no split (train-*, validation-*, test-*)",
                        path.display()
                    ),
                }
            }
        }
    }
    found.sort_by(|a, b| a.1.cmp(&b.1));
    if found.is_empty() {
        bail!(
            "'{}' holds no parquet files named train-*, validation-* or test-*",
            dir.display()
        );
    }
    Ok(found)
}

/// Wraps a hub failure into the advice to prepare elsewhere.
pub fn offline_advice(dataset: &str, cause: anyhow::Error) -> anyhow::Error {
    anyhow::anyhow!(
        "cannot download dataset '{dataset}' from the Hugging Face hub ({cause:#}). On a \
         machine with network access run `bsfa-train prepare --data {dataset} --tokenizer gpt2 \
         --out DIR`, copy DIR to this machine and train with --data shards:DIR (or copy the \
         whole Hugging Face cache, {}, and use --data {dataset})",
        hf_hub::Cache::from_env().path().display()
    )
}

/// The earlier preparation in `meta_path`, when it matches this request.
fn existing(meta_path: &Path, options: &PrepareOptions) -> Result<Option<Meta>> {
    let Ok(text) = std::fs::read_to_string(meta_path) else {
        return Ok(None);
    };
    let Ok(meta) = serde_json::from_str::<Meta>(&text) else {
        return Ok(None);
    };
    let same = meta.source == options.source
        && meta.tokenizer == options.tokenizer
        && meta.shard_tokens == options.shard_tokens
        && meta.val_tokens == options.val_tokens;
    Ok(same.then_some(meta))
}

/// Deletes `meta.json` and the dataset's shards (complete or partial) of an earlier run.
fn remove_previous(out: &Path, dataset: &str) -> Result<()> {
    let _ = std::fs::remove_file(out.join(META_FILE));
    for entry in std::fs::read_dir(out)? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with(&format!("{dataset}_"))
            && (name.ends_with(".bin") || name.ends_with(".bin.tmp"))
        {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// Shards written for one split.
#[derive(Default)]
struct Written {
    tokens: usize,
    files: Vec<String>,
}

/// Accumulates a split's tokens and writes full shards, keeping `hold_back` tokens unwritten
/// until the end (the held-out validation tail).
struct ShardSink<'a> {
    out: &'a Path,
    dataset: &'a str,
    split: &'a str,
    shard_tokens: usize,
    vocab_size: usize,
    hold_back: usize,
    buffer: Vec<u32>,
    next_index: usize,
    written: Written,
}

impl<'a> ShardSink<'a> {
    fn new(
        out: &'a Path,
        dataset: &'a str,
        split: &'a str,
        options: &PrepareOptions,
        vocab_size: usize,
        hold_back: usize,
    ) -> Self {
        Self {
            out,
            dataset,
            split,
            shard_tokens: options.shard_tokens,
            vocab_size,
            hold_back,
            buffer: Vec::new(),
            // llm.c numbers training shards from 1 (its shard 0 is validation).
            next_index: usize::from(split == "train"),
            written: Written::default(),
        }
    }

    fn tokens_total(&self) -> usize {
        self.written.tokens + self.buffer.len()
    }

    fn push_documents(&mut self, docs: &[Vec<u32>], separator: u32) -> Result<()> {
        for doc in docs {
            self.buffer.push(separator);
            self.buffer.extend_from_slice(doc);
        }
        if self.buffer.capacity() == 0 {
            // Reserved once: the buffer never grows by doubling past a shard, and pages it
            // never touches (a small source) are never resident.
            self.buffer
                .reserve(self.shard_tokens + self.hold_back + (1 << 20));
        }
        while self.buffer.len() >= self.shard_tokens + self.hold_back {
            let (shard, split) = (self.shard_tokens, self.split);
            let full = std::mem::take(&mut self.buffer);
            self.write(split, &full[..shard])?;
            self.buffer = full;
            self.buffer.drain(..shard);
        }
        Ok(())
    }

    fn write(&mut self, split: &str, tokens: &[u32]) -> Result<()> {
        let name = format!("{}_{split}_{:06}.bin", self.dataset, self.next_index);
        shards::write(&self.out.join(&name), tokens, self.vocab_size)?;
        self.next_index += 1;
        self.written.tokens += tokens.len();
        self.written.files.push(name);
        Ok(())
    }

    /// Writes what is left; returns this split's shards and, when tokens were held back, the
    /// validation shard cut from the tail at a document start.
    fn finish(mut self, separator: u32) -> Result<(Written, Option<Written>)> {
        if self.hold_back == 0 {
            let rest = std::mem::take(&mut self.buffer);
            if !rest.is_empty() {
                self.write(self.split, &rest)?;
            }
            return Ok((self.written, None));
        }
        let total = self.tokens_total();
        // A source too small for the requested tail gives a tenth of itself instead.
        let want = if total < 2 * self.hold_back {
            total / 10
        } else {
            self.hold_back
        };
        // Cut at a document start: the first one in the tail, else the last one before it
        // (a long final document), else exactly (a single document).
        let from = self.buffer.len().saturating_sub(want);
        let cut = self.buffer[from..]
            .iter()
            .position(|&id| id == separator)
            .map(|p| from + p)
            .or_else(|| {
                self.buffer[..from]
                    .iter()
                    .rposition(|&id| id == separator)
                    .filter(|&p| p > 0)
            })
            .unwrap_or(from);
        let val_tokens = self.buffer.split_off(cut);
        let rest = std::mem::take(&mut self.buffer);
        if !rest.is_empty() {
            self.write(self.split, &rest)?;
        }
        let name = format!("{}_val_000000.bin", self.dataset);
        shards::write(&self.out.join(&name), &val_tokens, self.vocab_size)?;
        let val = Written {
            tokens: val_tokens.len(),
            files: vec![name],
        };
        Ok((self.written, Some(val)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wikitext_titles_start_articles() {
        assert!(is_article_title(" = Valkyria Chronicles III = \n"));
        assert!(!is_article_title(" = = Gameplay = = \n"));
        assert!(!is_article_title(" The game = fun = \n"));
        let unit = |rows: &[&str]| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("train-0.parquet");
            super::super::parquet_text::write_string_column(&path, "text", rows, 100).unwrap();
            let file = std::sync::Arc::new(TextColumn::open(&path).unwrap());
            Unit {
                split: "train".into(),
                source: UnitSource::RowGroup(file, 0),
                rule: DocumentRule::WikiTextArticles,
            }
        };
        let mut pending = String::new();
        let docs = unit(&[
            "",
            " = A = \n",
            " a1 \n",
            " = = S = = \n",
            " a2 \n",
            " = B = \n",
            " b \n",
        ])
        .documents(&mut pending)
        .unwrap();
        assert_eq!(docs, vec![" = A = \n a1 \n = = S = = \n a2 \n"]);
        assert_eq!(pending, " = B = \n b \n");
    }
}
