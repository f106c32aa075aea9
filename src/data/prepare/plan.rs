//! What a prepare reads (its [`Plan`]): the input files of a `text:` or `parquet:` source, or
//! of a named hub dataset (listed and checked complete there), in order, with their splits.

use super::super::hub::{self, DocumentRule, HubFiles};
use super::PrepareOptions;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// The files of a `text:PATH` source: PATH itself, or the `.txt` files of the folder PATH
/// in name order. An empty source (an empty file, or a folder of empty files) is an error:
/// `prepare` and `tokenizer` would otherwise succeed with nothing in their output.
pub fn text_files(path: &Path) -> Result<Vec<PathBuf>> {
    let files = listed_text_files(path)?;
    let mut bytes = 0;
    for file in &files {
        bytes += std::fs::metadata(file)
            .with_context(|| format!("cannot read '{}'", file.display()))?
            .len();
    }
    if bytes == 0 {
        let what = match path.is_dir() {
            true => "holds only empty .txt files",
            false => "is empty",
        };
        bail!(
            "text source '{}' {what}: there is no text to read; pass a file (or a folder of \
             .txt files) that holds text",
            path.display()
        );
    }
    Ok(files)
}

/// PATH itself, or the `.txt` files of the folder PATH in name order.
fn listed_text_files(path: &Path) -> Result<Vec<PathBuf>> {
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

/// What a prepare reads: the dataset's name (for shard names), its input files in order,
/// how rows form documents, and for a named dataset its hub listing.
pub(super) struct Plan {
    pub(super) dataset: String,
    pub(super) inputs: Vec<Input>,
    pub(super) rule: DocumentRule,
    /// Text files (one document each) rather than parquet files.
    pub(super) text: bool,
    pub(super) known: Option<&'static hub::KnownDataset>,
    pub(super) hub: Option<HubFiles>,
}

/// One input file: its split (`train`, `val`, `test`) and its local path or, for a hub
/// dataset, its path in the repository.
pub(super) struct Input {
    pub(super) split: String,
    pub(super) name: String,
}

impl Plan {
    /// True when the source has a validation split of its own.
    pub(super) fn has_val(&self) -> bool {
        self.inputs.iter().any(|i| i.split == "val")
    }
}

/// The plan for `options.source`; for a named dataset, its files are listed (and checked
/// complete) on the hub, not yet downloaded.
pub(super) fn plan(options: &PrepareOptions) -> Result<Plan> {
    let source = options.source.as_str();
    let stem = |p: &Path| {
        p.file_stem()
            .map_or("data".into(), |s| s.to_string_lossy().replace('_', "-"))
    };
    let local = |p: PathBuf| p.to_string_lossy().into_owned();
    let mut plan = Plan {
        dataset: String::new(),
        inputs: Vec::new(),
        rule: DocumentRule::Rows,
        text: false,
        known: None,
        hub: None,
    };
    let files: Vec<(String, String)> = if let Some(path) = source.strip_prefix("text:") {
        let path = Path::new(path);
        plan.dataset = stem(path);
        plan.text = true;
        let files = text_files(path)?;
        files
            .into_iter()
            .map(|f| ("train".into(), local(f)))
            .collect()
    } else if let Some(dir) = source.strip_prefix("parquet:") {
        let dir = Path::new(dir);
        plan.dataset = stem(dir);
        let files = local_parquet(dir)?;
        files.into_iter().map(|(s, f)| (s, local(f))).collect()
    } else if let Some(dataset) = hub::known(source) {
        let listing = hub::list(dataset, options.revision.as_deref())?;
        plan.dataset = dataset.name.to_string();
        plan.rule = dataset.documents;
        plan.known = Some(dataset);
        let files = listing.files.clone();
        plan.hub = Some(listing);
        files
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
    if options.revision.is_some() && plan.hub.is_none() {
        bail!("--revision (data.revision) pins a hub dataset's commit; '{source}' is local");
    }
    for split in ["train", "val", "test"] {
        plan.inputs.extend(
            files
                .iter()
                .filter(|(s, _)| s == split || (split == "val" && s == "validation"))
                .map(|(_, name)| Input {
                    split: split.into(),
                    name: name.clone(),
                }),
        );
    }
    Ok(plan)
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
