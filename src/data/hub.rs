//! The Hugging Face hub: the datasets we know by name, the listing of their parquet files
//! (checked complete), downloads with retries, and where prepared shards are cached.
//! `HF_ENDPOINT`, `HF_HOME` and the token are honoured (hf-hub reads them);
//! `HF_HUB_OFFLINE=1` forbids any network access: files then come from the cache alone.

use anyhow::{bail, Context, Result};
use hf_hub::{Repo, RepoType};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A dataset `--data NAME` and `prepare --data NAME` know.
#[derive(Debug, Clone, Copy)]
pub struct KnownDataset {
    /// The name on our command line and in shard file names.
    pub name: &'static str,
    /// Hub repository.
    pub repo: &'static str,
    /// Git revision holding the parquet files, unless `--revision` pins another.
    pub revision: &'static str,
    /// Folder of the parquet files inside the repository.
    pub prefix: &'static str,
    /// How rows become documents.
    pub documents: DocumentRule,
    /// The dataset's published size, which `prepare` compares its counts with.
    pub published: Published,
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

/// A dataset's size as its authors (or a reference preparation) publish it.
#[derive(Debug, Clone, Copy)]
pub struct Published {
    /// Where the numbers come from.
    pub source: &'static str,
    /// Documents per split (`train`, `val`, `test`); compared in total, since our held-out
    /// validation split is not the publisher's.
    pub documents: &'static [(&'static str, u64)],
    /// The tokenizer the token counts were made with: compared only when ours is the same.
    pub tokenizer: &'static str,
    /// Tokens per split with that tokenizer, compared in total.
    pub tokens: &'static [(&'static str, u64)],
}

/// The datasets known by name.
pub const DATASETS: &[KnownDataset] = &[
    KnownDataset {
        name: "wikitext103",
        repo: "Salesforce/wikitext",
        revision: "main",
        prefix: "wikitext-103-raw-v1/",
        documents: DocumentRule::WikiTextArticles,
        published: Published {
            source: "Merity et al. 2016, table 1 (the dataset card's source); tokens are its words",
            documents: &[("train", 28_475), ("val", 60), ("test", 60)],
            tokenizer: "words",
            tokens: &[("train", 103_227_021), ("val", 217_646), ("test", 245_569)],
        },
    },
    KnownDataset {
        // The owner's own parquet files of the whole corpus (main branch), not the hub's
        // automatic conversion, which stops at about 5 GB (`partial-train/`).
        name: "openwebtext",
        repo: "Skylion007/openwebtext",
        revision: "main",
        prefix: "data/",
        documents: DocumentRule::Rows,
        published: Published {
            source: "the dataset card (documents) and nanoGPT's GPT-2 preparation (tokens; its \
                     validation split is a random 0.05% of documents, not ours)",
            documents: &[("train", 8_013_769)],
            tokenizer: "gpt2",
            tokens: &[("train", 9_035_582_198), ("val", 4_434_897)],
        },
    },
];

/// Download attempts per file before giving up.
const ATTEMPTS: u32 = 4;
/// Wait after the first failed attempt; doubled after each further one (1 + 2 + 4 s).
const FIRST_WAIT: Duration = Duration::from_secs(1);

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

/// The parquet files of a named dataset at one commit: complete, in split and index order.
#[derive(Debug, Clone)]
pub struct HubFiles {
    /// Hub repository.
    pub repo: String,
    /// The revision asked for (a branch, tag or commit).
    pub revision: String,
    /// The commit it resolved to; every file is downloaded at this commit.
    pub commit: String,
    /// `(split, repository path)`, splits `train`, `validation`, `test` in that order.
    pub files: Vec<(String, String)>,
}

/// Lists the parquet files of `dataset` at `revision` (default: the dataset's own) and checks
/// them: none from a partial conversion, every `-of-N` set complete. Offline, the listing is
/// the hub cache's copy of that revision.
pub fn list(dataset: &KnownDataset, revision: Option<&str>) -> Result<HubFiles> {
    let revision = revision.unwrap_or(dataset.revision).to_string();
    // Only a failure to reach the listing gets the advice to prepare elsewhere: a refused
    // listing would be refused there too.
    let (commit, names) = fetch_listing(dataset, &revision)
        .map_err(|e| super::prepare::offline_advice(dataset.name, e))?;
    let files = dataset_files(dataset, &revision, &names)?;
    Ok(HubFiles {
        repo: dataset.repo.to_string(),
        revision,
        commit,
        files,
    })
}

/// The commit `revision` resolves to and every file at it: from the hub, or offline from
/// the hub cache's copy.
fn fetch_listing(dataset: &KnownDataset, revision: &str) -> Result<(String, Vec<String>)> {
    if offline() {
        cached_listing(dataset.repo, revision)
    } else {
        let handle = api()?.repo(dataset_repo(dataset.repo, revision));
        let info = retrying(&format!("the file list of '{}'", dataset.repo), || {
            handle.info()
        })?;
        // Offline runs find this revision in the cache by this reference (files are
        // downloaded at the commit, which records only the commit's own).
        hf_hub::Cache::from_env()
            .repo(dataset_repo(dataset.repo, revision))
            .create_ref(&info.sha)
            .context("cannot write to the Hugging Face cache")?;
        let names = info.siblings.into_iter().map(|s| s.rfilename).collect();
        Ok((info.sha, names))
    }
}

/// The parquet files under the dataset's folder, refused when they are a partial conversion
/// or an incomplete set, with their splits in order.
fn dataset_files(
    dataset: &KnownDataset,
    revision: &str,
    names: &[String],
) -> Result<Vec<(String, String)>> {
    // In name order: `-NNNNN-of-` indices sort as numbers, the order documents are read in.
    let mut parquet: Vec<&String> = names.iter().filter(|f| f.ends_with(".parquet")).collect();
    parquet.sort();
    let ours: Vec<&String> = parquet
        .iter()
        .copied()
        .filter(|f| f.starts_with(dataset.prefix))
        .collect();
    let partial: Vec<&String> = parquet
        .iter()
        .copied()
        .filter(|f| is_partial(f) && (ours.is_empty() || f.starts_with(dataset.prefix)))
        .collect();
    if let Some(first) = partial.first() {
        bail!(
            "hub dataset '{}' at revision '{revision}' offers '{first}' ({} file(s) in \
             'partial-*' folders): the hub's automatic parquet conversion stops at about 5 GB \
             and keeps only part of a large split there, so '{}' would silently be a fraction \
             of the dataset. Refused; prepare the whole dataset from the revision holding \
             '{}*.parquet' (the default), or, to use the partial files anyway, download them \
             and run `bsfa-train prepare --data parquet:DIR`",
            dataset.repo,
            partial.len(),
            dataset.name,
            dataset.prefix
        );
    }
    if ours.is_empty() {
        let tars = names.iter().any(|f| f.ends_with(".tar"));
        bail!(
            "hub dataset '{}' has no parquet files under '{}' at revision '{revision}'{}",
            dataset.repo,
            dataset.prefix,
            if tars {
                "; it holds the old `subsets/*.tar` layout, which prepare does not read: use \
                 a revision with the parquet files (the default)"
            } else {
                ""
            }
        );
    }
    let mut by_split: Vec<(String, String)> = Vec::new();
    for split in ["train", "validation", "test"] {
        let set: Vec<&String> = ours
            .iter()
            .copied()
            .filter(|f| split_of(Path::new(f)).as_deref() == Some(split))
            .collect();
        check_complete(dataset.repo, revision, split, &set)?;
        by_split.extend(set.into_iter().map(|f| (split.to_string(), f.clone())));
    }
    Ok(by_split)
}

/// True when `path` lies in a `partial-<split>` folder (the hub's truncated conversion).
fn is_partial(path: &str) -> bool {
    path.split('/').any(|part| part.starts_with("partial-"))
}

/// `(index, count)` of a file named `<split>-NNNNN-of-MMMMM.parquet`.
fn index_of(path: &str) -> Option<(usize, usize)> {
    let name = path.rsplit('/').next()?.strip_suffix(".parquet")?;
    let (head, count) = name.rsplit_once("-of-")?;
    let index = head.rsplit('-').next()?;
    Some((index.parse().ok()?, count.parse().ok()?))
}

/// Checks that `files` (one split's) are exactly `-00000-of-N` ... `-(N-1)-of-N`; the error
/// names the first missing (or foreign) file.
fn check_complete(repo: &str, revision: &str, split: &str, files: &[&String]) -> Result<()> {
    let Some(first) = files.first() else {
        return Ok(());
    };
    let stop = |what: String| {
        anyhow::anyhow!(
            "hub dataset '{repo}' at revision '{revision}': {what}. Its {split} split is \
             incomplete (an upload in progress, or files removed); retry later, or pin a \
             complete commit with --revision (config key data.revision)"
        )
    };
    let (_, count) = index_of(first).ok_or_else(|| {
        stop(format!(
            "'{first}' is not named <split>-NNNNN-of-MMMMM.parquet"
        ))
    })?;
    let mut present = std::collections::BTreeSet::new();
    for file in files {
        match index_of(file) {
            Some((i, n)) if n == count && i < count => present.insert(i),
            _ => {
                return Err(stop(format!(
                    "'{file}' is not one of the {count} files of '{first}'"
                )))
            }
        };
    }
    if let Some(missing) = (0..count).find(|i| !present.contains(i)) {
        let stem = first
            .strip_suffix(".parquet")
            .and_then(|s| s.rsplit_once("-of-"))
            .and_then(|(head, _)| head.rsplit_once('-'))
            .map_or(split, |(stem, _)| stem);
        return Err(stop(format!(
            "'{stem}-{missing:05}-of-{count:05}.parquet' is missing"
        )));
    }
    Ok(())
}

/// The commit and files of `repo` at `revision` in the hub cache (offline: no listing can
/// be asked for).
fn cached_listing(repo: &str, revision: &str) -> Result<(String, Vec<String>)> {
    let cache = hf_hub::Cache::from_env();
    let folder = cache
        .path()
        .join(dataset_repo(repo, revision).folder_name());
    let commit = std::fs::read_to_string(folder.join("refs").join(revision))
        .map(|c| c.trim().to_string())
        .map_err(|_| {
            anyhow::anyhow!(
                "HF_HUB_OFFLINE is set and the hub cache ('{}') holds no revision '{revision}' \
                 of '{repo}'",
                cache.path().display()
            )
        })?;
    let root = folder.join("snapshots").join(&commit);
    let mut names = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("cannot list '{}'", dir.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(rel) = path.strip_prefix(&root) {
                names.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    names.sort();
    Ok((commit, names))
}

/// `repo` as a hub dataset at `revision`.
fn dataset_repo(repo: &str, revision: &str) -> Repo {
    Repo::with_revision(repo.to_string(), RepoType::Dataset, revision.to_string())
}

/// Fetches the files of one [`HubFiles`] listing, at its commit, into the hub cache.
pub struct Downloader {
    repo: String,
    handle: hf_hub::api::sync::ApiRepo,
}

impl Downloader {
    /// A downloader for the files of `listing`.
    pub fn new(listing: &HubFiles) -> Result<Self> {
        Ok(Self {
            repo: listing.repo.clone(),
            handle: api()?.repo(dataset_repo(&listing.repo, &listing.commit)),
        })
    }

    /// The local path of `file`: from the cache when it is there (no network), else
    /// downloaded (a download cut off before resumes from its `.part` file), with retries.
    pub fn fetch(&self, file: &str) -> Result<PathBuf> {
        retrying(&format!("'{file}' of '{}'", self.repo), || {
            self.handle.get(file)
        })
        .map_err(|e| {
            anyhow::anyhow!(
                "{e:#}. Run the same command again to resume: completed files are kept (and \
                 a cut download continues where it stopped)"
            )
        })
    }
}

/// `call` until it succeeds, at most [`ATTEMPTS`] times, waiting 1, 2, 4 s between tries
/// (offline, once: the cache will not change).
fn retrying<T, E: std::fmt::Display>(
    what: &str,
    mut call: impl FnMut() -> Result<T, E>,
) -> Result<T> {
    let (mut attempt, mut wait) = (1, FIRST_WAIT);
    loop {
        match call() {
            Ok(value) => return Ok(value),
            Err(e) if attempt < ATTEMPTS && !offline() => {
                eprintln!(
                    "cannot fetch {what} ({e}); retrying in {} s (attempt {attempt} of \
                     {ATTEMPTS})",
                    wait.as_secs()
                );
                crate::interrupt::sleep(wait)?;
                attempt += 1;
                wait *= 2;
            }
            Err(e) => bail!("cannot fetch {what} after {attempt} attempt(s): {e}"),
        }
    }
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

    #[test]
    fn only_complete_sets_of_whole_files_are_accepted() {
        let owt = known("openwebtext").unwrap();
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let files = |n: &[&str]| dataset_files(owt, "main", &names(n));
        let ok = files(&[
            "data/train-00001-of-00002.parquet",
            "data/train-00000-of-00002.parquet",
            "README.md",
        ])
        .unwrap();
        assert_eq!(ok[0].1, "data/train-00000-of-00002.parquet");
        assert_eq!(ok.len(), 2);
        let err = |n: &[&str]| format!("{:#}", files(n).unwrap_err());
        let e = err(&[
            "data/train-00000-of-00003.parquet",
            "data/train-00002-of-00003.parquet",
        ]);
        assert!(
            e.contains("'data/train-00001-of-00003.parquet' is missing"),
            "{e}"
        );
        let e = err(&[
            "data/train-00000-of-00002.parquet",
            "data/train-00001-of-00003.parquet",
        ]);
        assert!(e.contains("is not one of the 2 files"), "{e}");
        let e = err(&["plain_text/partial-train/0000.parquet"]);
        assert!(
            e.contains("partial") && e.contains("--data parquet:DIR"),
            "{e}"
        );
        let e = err(&["subsets/urlsf_subset00.tar"]);
        assert!(e.contains("old `subsets/*.tar` layout"), "{e}");
    }
}
