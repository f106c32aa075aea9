//! `bsfa-train tokenizer`: a byte-level BPE, GPT-2's scheme (bytes mapped to printable
//! characters, no normaliser, `<|endoftext|>` as the one special token), trained with the
//! `tokenizers` crate and saved as a `tokenizer.json` that `prepare`, training and
//! `transformers` load.

use super::prepare::text_files;
use super::{DataSpec, Tokenizer};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, TokenizerBuilder};

/// The end-of-text token, spelled as GPT-2 spells it.
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// The largest vocabulary `tokenizer` trains (2^22, about 4.2 million): the BPE trainer
/// reserves its tables for the whole vocabulary before it reads a byte (so 10^11 aborts
/// the process for want of memory), and the largest vocabularies in use hold about 256k.
pub const MAX_VOCAB_SIZE: usize = 1 << 22;

/// What `bsfa-train tokenizer` trains.
pub struct BpeOptions {
    /// The training text (`text:PATH`).
    pub train: DataSpec,
    /// Text to measure the tokenizer on (`text:PATH`), never trained on.
    pub val: Option<DataSpec>,
    /// Vocabulary size, special token included.
    pub vocab_size: usize,
    /// Where to write `tokenizer.json`.
    pub out: PathBuf,
}

/// What was trained, and how well it compresses held-out text.
#[derive(Debug, Serialize)]
pub struct BpeReport {
    /// The `tokenizer.json` written.
    pub tokenizer: PathBuf,
    /// Tokens in the vocabulary (at most the size asked for: a small text can run out of
    /// pairs to merge first).
    pub vocab_size: usize,
    /// Bytes of training text.
    pub train_bytes: u64,
    /// Bytes of validation text (0 without `val`).
    pub val_bytes: usize,
    /// Tokens of the validation text.
    pub val_tokens: usize,
    /// Validation bytes per token (higher compresses better).
    pub val_bytes_per_token: Option<f64>,
}

/// Trains the BPE on `train`, saves it, and measures it on `val`.
pub fn train(options: &BpeOptions) -> Result<BpeReport> {
    // 256 byte symbols and the special token come first.
    if options.vocab_size <= 257 {
        bail!(
            "--vocab-size must exceed 257 (the 256 bytes and {END_OF_TEXT}), got {}",
            options.vocab_size
        );
    }
    if options.vocab_size > MAX_VOCAB_SIZE {
        bail!(
            "--vocab-size {} is above the limit of {MAX_VOCAB_SIZE} (2^22): the BPE trainer \
             reserves memory for every entry up front, and no text needs that many merges \
             (the largest vocabularies in use hold about 256k); pass a smaller --vocab-size, \
             such as 50257 (GPT-2's)",
            options.vocab_size
        );
    }
    let files = source_files(&options.train)?;
    let train_bytes = files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()))
        .sum::<std::io::Result<u64>>()
        .context("cannot read the training text")?;
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(options.vocab_size)
        .min_frequency(2)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
        .show_progress(false)
        .build();
    let mut tokenizer =
        TokenizerBuilder::<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel>::new()
            .with_model(BPE::default())
            .with_normalizer(None)
            .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
            .with_post_processor(Some(ByteLevel::new(false, true, true)))
            .with_decoder(Some(ByteLevel::new(false, true, true)))
            .build()
            .map_err(|e| anyhow::anyhow!("cannot build the BPE tokenizer: {e}"))?;
    let paths = files
        .iter()
        .map(|f| f.to_string_lossy().into_owned())
        .collect();
    tokenizer
        .train_from_files(&mut trainer, paths)
        .map_err(|e| anyhow::anyhow!("BPE training failed: {e}"))?;
    if let Some(parent) = options.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create '{}'", parent.display()))?;
    }
    tokenizer
        .save(&options.out, false)
        .map_err(|e| anyhow::anyhow!("cannot write '{}': {e}", options.out.display()))?;
    // Measured through the same loader training uses.
    let saved = Tokenizer::load(&options.out.to_string_lossy())?;
    let (mut val_bytes, mut val_tokens) = (0, 0);
    if let Some(val) = &options.val {
        for file in source_files(val)? {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read '{}' as UTF-8 text", file.display()))?;
            val_bytes += text.len();
            val_tokens += saved.encode(&text)?.len();
        }
    }
    Ok(BpeReport {
        tokenizer: options.out.clone(),
        vocab_size: saved.vocab_size(),
        train_bytes,
        val_bytes,
        val_tokens,
        val_bytes_per_token: (val_tokens > 0).then(|| val_bytes as f64 / val_tokens as f64),
    })
}

fn source_files(spec: &DataSpec) -> Result<Vec<PathBuf>> {
    match spec {
        DataSpec::Text(path) => text_files(Path::new(path)),
        other => bail!(
            "the tokenizer trains on text: pass --data text:PATH (a UTF-8 file or a folder of \
             .txt files), not '{other}'"
        ),
    }
}
