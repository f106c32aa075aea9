//! The `data` config section, and `--data` parsed once into a typed [`DataSpec`].

use crate::check::positive;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// A data source as `--data` and `data.train` / `data.val` name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DataSpec {
    /// `builtin`: the ~1 MB generated English-like corpus shipped in the binary.
    Builtin,
    /// `text:PATH`: a UTF-8 text file, tokenized whole.
    Text(PathBuf),
    /// `shards:PATH`: llm.c token shards (a `.bin` file, or the `_<split>_` shards of a folder).
    Shards(PathBuf),
    /// `wikitext103` / `openwebtext`: a hub dataset, prepared into shards on first use.
    Dataset(String),
    /// `synthetic-images`: the built-in image set.
    SyntheticImages,
    /// `imagefolder:DIR` (or `imagenet:DIR`): `DIR/train/<class>/*` and `DIR/val/<class>/*`.
    ImageFolder(PathBuf),
    /// `parquet:DIR`: the hub's image parquet files.
    Parquet(PathBuf),
    /// `cifar10:DIR`: the CIFAR-10 binary batches.
    Cifar10(PathBuf),
}

impl DataSpec {
    /// True for full-size photographs (ImageNet-like), evaluated on a centre crop.
    pub fn is_full_size_images(&self) -> bool {
        matches!(self, Self::ImageFolder(_) | Self::Parquet(_))
    }
}

impl std::str::FromStr for DataSpec {
    type Err = anyhow::Error;

    fn from_str(spec: &str) -> Result<Self> {
        let path = |p: &str| PathBuf::from(p);
        Ok(match spec.split_once(':') {
            _ if spec == "builtin" => Self::Builtin,
            _ if spec == "synthetic-images" => Self::SyntheticImages,
            Some(("text", p)) => Self::Text(path(p)),
            Some(("shards", p)) => Self::Shards(path(p)),
            Some(("imagefolder" | "imagenet", p)) => Self::ImageFolder(path(p)),
            Some(("parquet", p)) => Self::Parquet(path(p)),
            Some(("cifar10", p)) => Self::Cifar10(path(p)),
            _ => match super::hub::known(spec) {
                Some(dataset) => Self::Dataset(dataset.name.to_string()),
                None => bail!(
                    "unknown data source '{spec}'; use 'builtin', 'text:PATH', 'shards:PATH', \
                     'wikitext103' or 'openwebtext' (a ViT: 'synthetic-images', \
                     'imagefolder:DIR', 'parquet:DIR' or 'cifar10:DIR')"
                ),
            },
        })
    }
}

impl std::fmt::Display for DataSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Builtin => f.write_str("builtin"),
            Self::Text(p) => write!(f, "text:{}", p.display()),
            Self::Shards(p) => write!(f, "shards:{}", p.display()),
            Self::Dataset(name) => f.write_str(name),
            Self::SyntheticImages => f.write_str("synthetic-images"),
            Self::ImageFolder(p) => write!(f, "imagefolder:{}", p.display()),
            Self::Parquet(p) => write!(f, "parquet:{}", p.display()),
            Self::Cifar10(p) => write!(f, "cifar10:{}", p.display()),
        }
    }
}

impl TryFrom<String> for DataSpec {
    type Error = anyhow::Error;

    fn try_from(spec: String) -> Result<Self> {
        spec.parse()
    }
}

impl From<DataSpec> for String {
    fn from(spec: DataSpec) -> Self {
        spec.to_string()
    }
}

/// Where tokens come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// `builtin`, `text:PATH`, `shards:PATH`, `wikitext103` or `openwebtext`; for a ViT,
    /// `synthetic-images`, `imagefolder:DIR` (or `imagenet:DIR`), `parquet:DIR` or
    /// `cifar10:DIR`.
    pub train: DataSpec,
    /// Validation source; null holds out the tail of the training data.
    pub val: Option<DataSpec>,
    /// Fraction of the training tokens held out for validation when `val` is null.
    pub val_fraction: f64,
    /// `bytes`, a path to a `tokenizer.json`, or a hub repository name such as `gpt2`.
    pub tokenizer: String,
    /// Where `wikitext103` / `openwebtext` shards are prepared and looked for (null: under
    /// the Hugging Face hub cache).
    pub data_dir: Option<String>,
    /// Hub revision (branch, tag or commit) a named dataset is prepared from (null: the
    /// dataset's own, `main`); pin a commit for reproducible runs.
    pub revision: Option<String>,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            train: DataSpec::Builtin,
            val: None,
            val_fraction: 0.1,
            tokenizer: "bytes".into(),
            data_dir: None,
            revision: None,
        }
    }
}

impl DataConfig {
    /// Checks the ranges; messages name the key.
    pub fn validate(&self) -> Result<()> {
        if !positive(self.val_fraction) || self.val_fraction >= 1.0 {
            bail!(
                "data.val_fraction must be in (0, 1), got {}",
                self.val_fraction
            );
        }
        Ok(())
    }
}
