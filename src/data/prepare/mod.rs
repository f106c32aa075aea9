//! `bsfa-train prepare`: text -> token shards (llm.c format), streamed and resumable.
//!
//! Input files (text files, or parquet files read a row group at a time) are read in a
//! fixed order (split `train`, `val`, `test`, then file name or index), tokenized on all
//! cores and appended to the split's current shard, which is written (atomically) whenever
//! it holds `shard_tokens` tokens: memory stays bounded by one shard plus one row group.
//! Every document is preceded by the tokenizer's end-of-text id (llm.c's convention; the
//! newline byte for the bytes tokenizer). A split without validation data of its own (text,
//! OpenWebText) keeps its last `val_tokens` tokens back, from a document start, as the
//! validation shard.
//!
//! Hub files are downloaded one file ahead of the tokenizer. After each input file the
//! journal ([`journal`]) records the state, so a killed prepare continues from the last
//! completed file. `meta.json` is written last: a folder with it is complete. A re-run with
//! the same request finds it and does nothing; any other request restarts from scratch.

mod counts;
mod journal;
mod plan;
mod sink;

use super::hub::{self, DocumentRule};
use super::parquet_text::TextColumn;
use super::Tokenizer;
use crate::metrics::Progress;
use anyhow::{bail, Context, Result};
use journal::Journal;
pub use plan::text_files;
use plan::{plan, Plan};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sink::{ShardSink, SinkSetup, Written};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::time::Instant;

/// What to prepare and where.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// `text:PATH`, `parquet:DIR`, `wikitext103` or `openwebtext`.
    pub source: String,
    /// Tokenizer spec (as `--tokenizer`).
    pub tokenizer: String,
    /// Output folder.
    pub out: PathBuf,
    /// Tokens per shard.
    pub shard_tokens: usize,
    /// Tokens held back for validation when the source has no validation split.
    pub val_tokens: usize,
    /// Hub revision (branch, tag or commit) of a named dataset; `None`: its default.
    pub revision: Option<String>,
}

/// The summary `prepare` prints, and the folder's `meta.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    /// The `--data` source.
    pub source: String,
    /// The name in the shard file names.
    pub dataset: String,
    /// The `--tokenizer` spec.
    pub tokenizer: String,
    /// The tokenizer's vocabulary size.
    pub vocab_size: usize,
    /// `u16` or `u32`.
    pub id_type: String,
    /// Tokens per shard.
    pub shard_tokens: usize,
    /// Tokens held back for validation (when the source has no validation split).
    pub val_tokens: usize,
    /// Per split (`train`, `val`, `test`): documents, tokens and shard file names.
    pub splits: Map<String, Value>,
    /// How documents are separated.
    pub document_separator: Value,
    /// True when `val` was held out from the end of the training text.
    pub val_held_out: bool,
    /// The hub revision asked for (`None`: the dataset's default).
    #[serde(default)]
    pub revision: Option<String>,
    /// For a named dataset: repository, revision, the commit it resolved to and the files
    /// read, in order.
    #[serde(default)]
    pub hub: Option<Value>,
    /// For a named dataset: its published counts beside ours, and the warnings.
    #[serde(default)]
    pub published: Option<Value>,
    /// Input files an earlier, interrupted run had completed (0: none).
    #[serde(default)]
    pub resumed_files: usize,
    /// Seconds this run took.
    pub seconds: f64,
    /// Tokens this run wrote per second.
    pub tokens_per_s: f64,
}

/// Default tokens per shard (llm.c's 100M).
pub const DEFAULT_SHARD_TOKENS: usize = 100_000_000;
/// Default validation tokens held back from sources without a validation split.
pub const DEFAULT_VAL_TOKENS: usize = 10_000_000;

/// Documents tokenized per call (in parallel): enough for every core to stay busy despite
/// documents of very different lengths, few enough to bound the ids held at once.
const TOKENIZE_DOCS: usize = 4096;

/// File name of the completion marker and summary.
pub const META_FILE: &str = "meta.json";

/// Prepares `options.source` into `options.out`, or does nothing when it already holds the
/// same preparation; continues an interrupted preparation of the same request.
pub fn run(options: &PrepareOptions) -> Result<Meta> {
    if options.shard_tokens == 0 || options.val_tokens == 0 {
        bail!("--shard-tokens and --val-tokens must be at least 1");
    }
    let started = Instant::now();
    let meta_path = options.out.join(META_FILE);
    if let Some(meta) = existing(options) {
        eprintln!(
            "'{}' already holds {} prepared with {}: nothing to do",
            options.out.display(),
            meta.source,
            meta.tokenizer
        );
        return Ok(meta);
    }
    refuse_foreign_meta(&meta_path)?;
    let tokenizer = Tokenizer::load(&options.tokenizer)?;
    let plan = plan(options)?;
    std::fs::create_dir_all(&options.out)
        .with_context(|| format!("cannot create '{}'", options.out.display()))?;
    let mut journal = open_journal(options, &plan)?;
    let resumed_files = journal.files_done;
    let resumed_tokens = journal.tokens();
    let splits = tokenize_inputs(options, &plan, &tokenizer, &mut journal)?;
    let seconds = started.elapsed().as_secs_f64();
    let written: u64 = splits.values().filter_map(|s| s["tokens"].as_u64()).sum();
    let vocab_size = tokenizer.vocab_size();
    let (separator, separator_text) = tokenizer.document_separator()?;
    eprintln!("{}", counts::summary_line(&splits));
    let published = plan.known.map(|dataset| {
        let (lines, kept) = counts::compare(&dataset.published, &options.tokenizer, &splits);
        lines.iter().for_each(|line| eprintln!("{line}"));
        kept
    });
    let meta = Meta {
        source: options.source.clone(),
        dataset: plan.dataset.clone(),
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
        val_held_out: !plan.has_val(),
        revision: options.revision.clone(),
        hub: plan.hub.as_ref().map(|h| {
            json!({"repo": h.repo, "revision": h.revision, "commit": h.commit,
                   "files": h.files.iter().map(|f| &f.1).collect::<Vec<_>>()})
        }),
        published,
        resumed_files,
        seconds,
        tokens_per_s: (written as usize - resumed_tokens) as f64 / seconds,
    };
    crate::durable::replace(&meta_path, serde_json::to_string_pretty(&meta)?.as_bytes())?;
    let _ = std::fs::remove_file(options.out.join(journal::JOURNAL_FILE));
    Ok(meta)
}

/// Fails when `path` (the out folder's `meta.json`) exists but is not a summary a prepare
/// wrote: the prepare would replace it, and we never delete what we did not create. An
/// earlier prepare's summary, for another request, is ours to replace.
fn refuse_foreign_meta(path: &Path) -> Result<()> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot read '{}'", path.display())),
    };
    if serde_json::from_slice::<Meta>(&text).is_err() {
        bail!(
            "'{}' exists and was not written by `prepare` (it is not a prepare summary), and \
             prepare writes its own {META_FILE} there; move that file away or choose another \
             --out",
            path.display()
        );
    }
    Ok(())
}

/// The journal to continue from: the folder's own when it belongs to this very request and
/// input (what a killed run left is cleaned up), else a fresh one (earlier shards deleted).
fn open_journal(options: &PrepareOptions, plan: &Plan) -> Result<Journal> {
    let key = json!({
        "source": options.source,
        "tokenizer": options.tokenizer,
        "shard_tokens": options.shard_tokens,
        "val_tokens": options.val_tokens,
        "revision": options.revision,
        "commit": plan.hub.as_ref().map(|h| &h.commit),
        "files": plan.inputs.iter().map(|i| &i.name).collect::<Vec<_>>(),
    });
    match Journal::load(&options.out, &key) {
        Some(journal) => {
            journal.remove_strays(&options.out, &plan.dataset)?;
            eprintln!(
                "resuming the prepare in '{}': {} of {} input files were done",
                options.out.display(),
                journal.files_done,
                plan.inputs.len()
            );
            Ok(journal)
        }
        None => {
            journal::remove_previous(&options.out, &plan.dataset)?;
            Ok(Journal::fresh(key))
        }
    }
}

/// Reads, tokenizes and writes every input file the journal does not record as done,
/// committing the journal after each; returns the splits' entries of `meta.json`.
fn tokenize_inputs(
    options: &PrepareOptions,
    plan: &Plan,
    tokenizer: &Tokenizer,
    journal: &mut Journal,
) -> Result<Map<String, Value>> {
    let (separator, _) = tokenizer.document_separator()?;
    let vocab_size = tokenizer.vocab_size();
    let setup = SinkSetup {
        out: &options.out,
        dataset: &plan.dataset,
        shard_tokens: options.shard_tokens,
        vocab_size,
    };
    let hold_back = |split: &str| {
        if split == "train" && !plan.has_val() {
            options.val_tokens
        } else {
            0
        }
    };
    let carry = journal.carry_tokens(&options.out)?;
    let mut progress = FileProgress::new(plan.inputs.len(), journal.files_done, journal.tokens());
    let mut sink = journal.sink.clone().map(|state| {
        let hold = hold_back(&state.split);
        ShardSink::restore(setup, state, carry, hold)
    });
    let paths = fetch_ahead(plan, journal.files_done)?;
    for (index, input) in plan.inputs.iter().enumerate().skip(journal.files_done) {
        let path = paths.recv().context("the download thread stopped")??;
        let current = sink
            .get_or_insert_with(|| ShardSink::new(setup, &input.split, hold_back(&input.split)));
        current.reading_file(index);
        read_input(&path, plan, tokenizer, separator, current, &mut progress)?;
        let last_of_split = plan
            .inputs
            .get(index + 1)
            .is_none_or(|next| next.split != input.split);
        if let Some(done) = sink.take_if(|_| last_of_split) {
            finish_split(done, tokenizer, separator, &mut journal.splits)?;
        }
        journal.commit(&options.out, index + 1, sink.as_ref(), vocab_size)?;
        progress.file_done();
        crate::interrupt::check()?;
    }
    progress.finish();
    if !journal.splits.contains_key("train") {
        bail!("'{}' holds no training data", options.source);
    }
    Ok(journal.splits.clone())
}

/// Writes the rest of a split (its last WikiText article, its last shard and its held-out
/// tail) and records it in `splits`.
fn finish_split(
    mut sink: ShardSink,
    tokenizer: &Tokenizer,
    separator: u32,
    splits: &mut Map<String, Value>,
) -> Result<()> {
    let pending = std::mem::take(sink.pending());
    if !pending.is_empty() {
        sink.push_documents(&tokenizer.encode_batch(&[pending])?, separator)?;
    }
    let split = sink.split().to_string();
    let entry =
        |w: &Written| json!({"documents": w.documents, "tokens": w.tokens, "shards": w.files});
    let (main, val) = sink.finish()?;
    splits.insert(split, entry(&main));
    if let Some(val) = val {
        splits.insert("val".into(), entry(&val));
    }
    Ok(())
}

/// Reads input file `path` into `sink`: a text file (one document), or a parquet file whose
/// row groups are decoded on a thread of their own, one group ahead of the tokenizer.
fn read_input(
    path: &Path,
    plan: &Plan,
    tokenizer: &Tokenizer,
    separator: u32,
    sink: &mut ShardSink,
    progress: &mut FileProgress,
) -> Result<()> {
    let mut docs = Vec::new();
    if plan.text {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read '{}'", path.display()))?;
        let text = String::from_utf8(bytes)
            .with_context(|| format!("'{}' is not UTF-8 text", path.display()))?;
        docs = documents(vec![text], plan.rule, sink.pending());
        return tokenize(&mut docs, tokenizer, separator, sink, progress);
    }
    let file = TextColumn::open(path)?;
    std::thread::scope(|scope| {
        let (send, groups) = sync_channel(1);
        scope.spawn(move || {
            for group in 0..file.row_groups() {
                let rows = file.read_row_group(group);
                let failed = rows.is_err();
                if send.send(rows).is_err() || failed {
                    break;
                }
            }
        });
        for rows in groups {
            docs.extend(documents(rows?, plan.rule, sink.pending()));
            // Across row groups: small groups would leave cores idle at each one's end.
            if docs.len() >= TOKENIZE_DOCS {
                tokenize(&mut docs, tokenizer, separator, sink, progress)?;
            }
        }
        tokenize(&mut docs, tokenizer, separator, sink, progress)
    })
}

/// Tokenizes `docs` (emptied) into `sink`, [`TOKENIZE_DOCS`] at a time, on every core.
fn tokenize(
    docs: &mut Vec<String>,
    tokenizer: &Tokenizer,
    separator: u32,
    sink: &mut ShardSink,
    progress: &mut FileProgress,
) -> Result<()> {
    for slice in docs.chunks(TOKENIZE_DOCS) {
        sink.push_documents(&tokenizer.encode_batch(slice)?, separator)?;
    }
    docs.clear();
    progress.update(sink);
    crate::interrupt::check()
}

/// The complete documents of `rows`. Under the WikiText rule an article may continue into
/// the next rows: its start is kept in `pending`.
fn documents(rows: Vec<String>, rule: DocumentRule, pending: &mut String) -> Vec<String> {
    match rule {
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
    }
}

/// The local paths of `plan`'s input files from index `from` on, in order, each fetched
/// (downloaded when it is a hub file) one file ahead of the reader; the first error ends
/// the stream.
fn fetch_ahead(plan: &Plan, from: usize) -> Result<Receiver<Result<PathBuf>>> {
    let downloader = plan.hub.as_ref().map(hub::Downloader::new).transpose()?;
    let names: Vec<String> = plan.inputs[from..].iter().map(|i| i.name.clone()).collect();
    // A rendezvous: the next file is fetched while this one is read, no further ahead.
    let (send, receive) = sync_channel(0);
    std::thread::spawn(move || {
        for name in names {
            let path = match &downloader {
                Some(hub) => hub.fetch(&name),
                None => Ok(PathBuf::from(name)),
            };
            let failed = path.is_err();
            if send.send(path).is_err() || failed {
                break;
            }
        }
    });
    Ok(receive)
}

/// Progress over the input files, with the tokens/s of this run.
struct FileProgress {
    bar: Progress,
    started: Instant,
    /// When a line was last printed: without a terminal, one every few seconds.
    last_line: Instant,
    done: usize,
    /// Tokens an earlier run wrote (not counted in the rate).
    resumed_tokens: usize,
    /// Tokens of the splits finished in this run.
    tokens_before: usize,
    /// The split being written and its tokens so far.
    split: (String, usize),
}

impl FileProgress {
    fn new(files: usize, done: usize, resumed_tokens: usize) -> Self {
        Self {
            bar: Progress::counting("file", files, done),
            started: Instant::now(),
            last_line: Instant::now(),
            done,
            resumed_tokens,
            tokens_before: resumed_tokens,
            split: (String::new(), 0),
        }
    }

    /// More of `sink`'s split is written.
    fn update(&mut self, sink: &ShardSink) {
        if self.split.0 != sink.split() {
            self.tokens_before += self.split.1;
            self.split.0 = sink.split().to_string();
        }
        self.split.1 = sink.tokens_total();
        let tokens = self.tokens_before + self.split.1 - self.resumed_tokens;
        let rate = tokens as f64 / self.started.elapsed().as_secs_f64();
        let print = self.last_line.elapsed().as_secs() >= 5;
        if print {
            self.last_line = Instant::now();
        }
        let msg = format!(
            "{}: {} docs, {} tokens, {rate:.0} tok/s",
            sink.split(),
            sink.documents(),
            sink.tokens_total()
        );
        self.bar.update(self.done, &msg, print);
    }

    /// An input file is done.
    fn file_done(&mut self) {
        self.done += 1;
    }

    /// Closes the display.
    fn finish(&self) {
        self.bar.finish();
    }
}

/// ` = Title = ` (one `=` on each side): a new WikiText article; ` = = Section = = ` is not.
fn is_article_title(line: &str) -> bool {
    let t = line.trim();
    t.len() > 4 && t.starts_with("= ") && t.ends_with(" =") && !t.starts_with("= =")
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

/// The preparation recorded in `dir`'s `meta.json`, when it is complete. A named dataset's
/// records the hub files it read; one without that record was made before #27, when
/// `openwebtext` read the hub's partial conversion, and is prepared again.
pub fn completed(dir: &Path) -> Option<Meta> {
    let text = std::fs::read_to_string(dir.join(META_FILE)).ok()?;
    let meta = serde_json::from_str::<Meta>(&text).ok()?;
    (hub::known(&meta.source).is_none() || meta.hub.is_some()).then_some(meta)
}

/// The earlier preparation in `options.out`, when it is complete and matches this request.
fn existing(options: &PrepareOptions) -> Option<Meta> {
    let meta = completed(&options.out)?;
    let same = meta.source == options.source
        && meta.tokenizer == options.tokenizer
        && meta.shard_tokens == options.shard_tokens
        && meta.val_tokens == options.val_tokens
        && meta.revision == options.revision;
    same.then_some(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wikitext_titles_start_articles() {
        assert!(is_article_title(" = Valkyria Chronicles III = \n"));
        assert!(!is_article_title(" = = Gameplay = = \n"));
        assert!(!is_article_title(" The game = fun = \n"));
        let rows = [
            "",
            " = A = \n",
            " a1 \n",
            " = = S = = \n",
            " a2 \n",
            " = B = \n",
            " b \n",
        ];
        let mut pending = String::new();
        let rows = rows.iter().map(|r| r.to_string()).collect();
        let docs = documents(rows, DocumentRule::WikiTextArticles, &mut pending);
        assert_eq!(docs, vec![" = A = \n a1 \n = = S = = \n a2 \n"]);
        assert_eq!(pending, " = B = \n b \n");
    }
}
