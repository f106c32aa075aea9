//! Tokenizers: raw bytes, or any Hugging Face `tokenizer.json` (local or from the hub).

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// Turns text into token ids.
pub enum Tokenizer {
    /// One id per UTF-8 byte (256 ids).
    Bytes,
    /// A Hugging Face tokenizer, with the name it was loaded from.
    HuggingFace {
        source: String,
        inner: Box<tokenizers::Tokenizer>,
    },
}

impl Tokenizer {
    /// Loads `bytes`, a path to a `tokenizer.json`, or a hub repository name (e.g. `gpt2`).
    pub fn load(spec: &str) -> Result<Self> {
        let Some(file) = Self::file(spec)? else {
            return Ok(Self::Bytes);
        };
        let inner = tokenizers::Tokenizer::from_file(&file)
            .map_err(|e| anyhow::anyhow!("cannot load tokenizer '{}': {e}", file.display()))?;
        Ok(Self::HuggingFace {
            source: spec.to_string(),
            inner: Box::new(inner),
        })
    }

    /// The `tokenizer.json` that [`Tokenizer::load`] reads for `spec` (downloading a hub
    /// repository's into the local cache); `None` for `bytes`, which has no file.
    pub fn file(spec: &str) -> Result<Option<PathBuf>> {
        if spec == "bytes" {
            return Ok(None);
        }
        let path = Path::new(spec);
        let file = if path.exists() {
            if path.is_dir() {
                path.join("tokenizer.json")
            } else {
                path.to_path_buf()
            }
        } else if spec.ends_with(".json") {
            anyhow::bail!(
                "tokenizer file '{spec}' does not exist; pass an existing tokenizer.json, a hub \
                 name such as gpt2, or 'bytes'"
            );
        } else {
            download(spec)?
        };
        Ok(Some(file))
    }

    /// Number of distinct ids this tokenizer can emit (added tokens included).
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Bytes => 256,
            Self::HuggingFace { inner, .. } => inner.get_vocab_size(true),
        }
    }

    /// Encodes many documents at once, on every core, without adding special tokens.
    pub fn encode_batch(&self, texts: &[String]) -> Result<Vec<Vec<u32>>> {
        use rayon::prelude::*;
        match self {
            Self::Bytes => Ok(texts
                .par_iter()
                .map(|t| t.bytes().map(u32::from).collect())
                .collect()),
            // Each worker keeps only the ids: an `Encoding` (token strings, offsets, masks)
            // is many times their size, and freeing millions of them on one thread (as
            // `encode_batch`'s result would be) is a serial tail. `encode_fast` skips the
            // offsets, which are not needed; the ids are the same.
            Self::HuggingFace { source, inner } => texts
                .par_iter()
                .map(|t| {
                    inner
                        .encode_fast(t.as_str(), false)
                        .map(|e| e.get_ids().to_vec())
                })
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| anyhow::anyhow!("tokenizer '{source}' failed: {e}")),
        }
    }

    /// The id and text of the token that separates documents: the tokenizer's end-of-text
    /// token (`<|endoftext|>`, `</s>`, `<eos>`, `<|end_of_text|>`), or for the bytes
    /// tokenizer, which has none, the newline byte.
    pub fn document_separator(&self) -> Result<(u32, String)> {
        match self {
            Self::Bytes => Ok((u32::from(b'\n'), "\n".into())),
            Self::HuggingFace { source, .. } => self.end_of_text().with_context(|| {
                format!(
                    "tokenizer '{source}' has no end-of-text token (<|endoftext|>, </s>, <eos> \
                     or <|end_of_text|>) to separate documents with"
                )
            }),
        }
    }

    /// The id and text of the tokenizer's end-of-text token, if it has one (the bytes
    /// tokenizer has none).
    pub fn end_of_text(&self) -> Option<(u32, String)> {
        match self {
            Self::Bytes => None,
            Self::HuggingFace { inner, .. } => {
                ["<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"]
                    .iter()
                    .find_map(|t| inner.token_to_id(t).map(|id| (id, t.to_string())))
            }
        }
    }

    /// The text of `ids`, special tokens included; bytes that are not valid UTF-8 (such as
    /// the first bytes of an unfinished character) become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Self::Bytes => {
                let bytes = ids
                    .iter()
                    .map(|&id| u8::try_from(id))
                    .collect::<std::result::Result<Vec<u8>, _>>()
                    .context("the bytes tokenizer has ids 0-255 only")?;
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Self::HuggingFace { source, inner } => inner
                .decode(ids, false)
                .map_err(|e| anyhow::anyhow!("tokenizer '{source}' cannot decode: {e}")),
        }
    }

    /// Encodes `text` without adding special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Self::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Self::HuggingFace { source, inner } => Ok(inner
                .encode(text, false)
                .map_err(|e| anyhow::anyhow!("tokenizer '{source}' failed: {e}"))?
                .get_ids()
                .to_vec()),
        }
    }
}

/// Fetches `tokenizer.json` of a hub repository into the local Hugging Face cache (or finds
/// it there: offline, only there).
fn download(repo: &str) -> Result<PathBuf> {
    if let Some(cached) = hf_hub::Cache::from_env()
        .model(repo.to_string())
        .get("tokenizer.json")
    {
        return Ok(cached);
    }
    if super::hub::offline() {
        anyhow::bail!(
            "tokenizer '{repo}' is not in the local Hugging Face cache ('{}') and \
             HF_HUB_OFFLINE is set. On a machine with network access run `bsfa-train prepare \
             --data text:SOME.txt --tokenizer {repo} --out /tmp/x` (or any command using \
             --tokenizer {repo}) and copy its cache folder here, or pass --tokenizer \
             PATH/tokenizer.json",
            hf_hub::Cache::from_env().path().display()
        );
    }
    super::hub::api()?
        .model(repo.to_string())
        .get("tokenizer.json")
        .with_context(|| {
            format!(
                "cannot download tokenizer.json of '{repo}' from the Hugging Face hub (no \
                 network, or no such repository); download it on a machine with access and \
                 pass its path with --tokenizer PATH/tokenizer.json, or use --tokenizer bytes"
            )
        })
}
