//! The Hugging Face hub: the datasets we know by name, their parquet files, and where
//! prepared shards are cached. `HF_ENDPOINT` and `HF_HOME` are honoured (hf-hub reads them);
//! `HF_HUB_OFFLINE=1` forbids any network access.

use anyhow::{Context, Result};
use hf_hub::{Repo, RepoType};
use std::path::{Path, PathBuf};

/// A dataset `--data NAME` and `prepare --data NAME` know.
#[derive(Debug, Clone, Copy)]
pub struct KnownDataset {
    /// The name on our command line and in shard file names.
    pub name: &'static str,
    /// Hub repository.
    pub repo: &'static str,
    /// Git revision holding the parquet files.
    pub revision: &'static str,
    /// Folder of the parquet files inside the repository.
    pub prefix: &'static str,
    /// How rows become documents.
    pub documents: DocumentRule,
}

/// How the rows of a dataset's `text` column form documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocumentRule {
    /// Every row is a document.
    Rows,
    /// Rows are lines of Wikipedia articles; a top-level heading line (` = Title = `) starts
    /// a new article.
    WikiTextArticles,
}

/// The datasets known by name.
pub const DATASETS: &[KnownDataset] = &[
    KnownDataset {
        name: "wikitext103",
        repo: "Salesforce/wikitext",
        revision: "main",
        prefix: "wikitext-103-raw-v1/",
        documents: DocumentRule::WikiTextArticles,
    },
    KnownDataset {
        // The hub's automatic parquet conversion of OpenWebText (train split only).
        name: "openwebtext",
        repo: "Skylion007/openwebtext",
        revision: "refs/convert/parquet",
        prefix: "plain_text/",
        documents: DocumentRule::Rows,
    },
];

/// The known dataset called `name`, if any.
pub fn known(name: &str) -> Option<&'static KnownDataset> {
    DATASETS.iter().find(|d| d.name == name)
}

/// True when `HF_HUB_OFFLINE` forbids network access.
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.to_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// A hub client configured from the environment.
pub fn api() -> Result<hf_hub::api::sync::Api> {
    hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .build()
        .context("cannot set up the Hugging Face hub client")
}

/// Downloads (or finds in the hub cache) every parquet file of `dataset`, with the split
/// each belongs to (`train`, `validation`, `test`), sorted by path.
pub fn download_parquet(dataset: &KnownDataset) -> Result<Vec<(String, PathBuf)>> {
    let repo = Repo::with_revision(
        dataset.repo.to_string(),
        RepoType::Dataset,
        dataset.revision.to_string(),
    );
    let api = api()?;
    let handle = api.repo(repo);
    let info = handle.info().with_context(|| {
        format!(
            "cannot list the files of hub dataset '{}' (revision {})",
            dataset.repo, dataset.revision
        )
    })?;
    let mut files: Vec<String> = info
        .siblings
        .into_iter()
        .map(|s| s.rfilename)
        .filter(|f| f.starts_with(dataset.prefix) && f.ends_with(".parquet"))
        .collect();
    files.sort();
    if files.is_empty() {
        anyhow::bail!(
            "hub dataset '{}' has no parquet files under '{}'",
            dataset.repo,
            dataset.prefix
        );
    }
    files
        .iter()
        .filter_map(|f| split_of(Path::new(f)).map(|split| (split, f)))
        .map(|(split, f)| {
            let path = handle
                .get(f)
                .with_context(|| format!("cannot download '{f}' of '{}'", dataset.repo))?;
            Ok((split, path))
        })
        .collect()
}

/// The split a parquet file belongs to, from its name (`train-00000-of-00002.parquet`) or
/// its folder (`train/0000.parquet`), as the hub lays them out.
pub fn split_of(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_string_lossy().into_owned();
    let folder = path
        .parent()
        .and_then(|p| p.file_name())
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    ["train", "validation", "test"]
        .into_iter()
        .find(|split| {
            name.starts_with(&format!("{split}-"))
                || name.starts_with(&format!("{split}."))
                || folder == *split
                || folder == format!("partial-{split}")
        })
        .map(str::to_string)
}

/// Where prepared shards of `dataset` tokenized with `tokenizer` live: under `data_dir`, or
/// by default under the hub cache (`$HF_HOME/hub/bsfa-train/`).
pub fn shard_dir(data_dir: Option<&str>, dataset: &str, tokenizer: &str) -> PathBuf {
    let root = data_dir.map_or_else(
        || hf_hub::Cache::from_env().path().join("bsfa-train"),
        PathBuf::from,
    );
    let slug: String = tokenizer
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    root.join(format!("{dataset}-{slug}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_from_hub_layouts() {
        for (path, split) in [
            (
                "wikitext-103-raw-v1/train-00000-of-00002.parquet",
                Some("train"),
            ),
            (
                "wikitext-103-raw-v1/validation-00000-of-00001.parquet",
                Some("validation"),
            ),
            ("plain_text/train/0000.parquet", Some("train")),
            ("plain_text/partial-train/0003.parquet", Some("train")),
            ("x/test.parquet", Some("test")),
            ("x/unsupervised-0.parquet", None),
        ] {
            assert_eq!(split_of(Path::new(path)).as_deref(), split, "{path}");
        }
    }
}
