//! Token sources and batch sampling; `images` holds the ViT's image data.

pub mod bpe;
pub mod builtin;
mod config;
pub mod hub;
pub mod images;
pub mod loader;
pub mod parquet_file;
pub mod parquet_text;
mod position;
pub mod prepare;
pub mod shards;
pub mod tokenizer;

use crate::lock;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub use config::{DataConfig, DataSpec};
pub use position::{Position, TokenPosition};
pub use tokenizer::Tokenizer;

/// Training and validation token streams.
pub struct TokenData {
    pub train: TokenSegments,
    pub val: TokenSegments,
}

/// Opens the train and validation sources. Shards (`shards:DIR`, or a dataset name such as
/// `wikitext103`, whose prepared shards are found in the cache or prepared there) validate
/// against the `_val_` shards of the same folder unless `data.val` names others (one shard
/// file needs `data.val`); text sources without a validation source hold out their last
/// `val_fraction` of tokens.
pub fn load(
    data: &DataConfig,
    tokenizer: &Tokenizer,
    seq_len: usize,
    vocab_size: usize,
) -> Result<TokenData> {
    let train_spec = &resolve_dataset(&data.train, data)?;
    let val_spec = data
        .val
        .as_ref()
        .map(|v| resolve_dataset(v, data))
        .transpose()?;
    let val_spec = val_spec.as_ref();
    let val_fraction = data.val_fraction;
    let open = |spec, split| TokenSegments::open(spec, tokenizer, split, vocab_size);
    let mut train = open(train_spec, "train")?;
    let val = match val_spec {
        Some(spec) => open(spec, "val")?,
        // Text: the last `val_fraction` of it; shards: the folder's `_val_` shards.
        None => match train.hold_out(val_fraction) {
            Some(held_out) => held_out,
            None => open(no_single_shard_file(train_spec)?, "val")?,
        },
    };
    for (what, tokens, spec) in [
        ("training", &train, train_spec),
        ("validation", &val, val_spec.unwrap_or(train_spec)),
    ] {
        if tokens.windows(seq_len) == 0 {
            bail!(
                "the {what} data from '{spec}' has {} tokens, with no segment as long as one \
                 sequence of seq_len + 1 = {}; provide more text or lower --seq-len",
                tokens.len(),
                seq_len + 1
            );
        }
    }
    Ok(TokenData { train, val })
}

/// `spec`, to find validation shards beside: a folder. One shard file has none beside it,
/// and validating on the training file itself would report training loss as validation loss.
fn no_single_shard_file(spec: &DataSpec) -> Result<&DataSpec> {
    match spec {
        DataSpec::Shards(path) if path.is_file() => bail!(
            "--data {spec} is one shard file, so there are no validation shards beside it (a \
             folder's are its *_val_*.bin files); pass the validation data with --val-data \
             shards:FILE (data.val), or --data shards:DIR with a folder holding both splits"
        ),
        _ => Ok(spec),
    }
}

/// `wikitext103` / `openwebtext` become `shards:DIR` of their prepared shards (prepared now
/// when missing and the hub is reachable); other specs are returned as they are.
pub fn resolve_dataset(spec: &DataSpec, data: &DataConfig) -> Result<DataSpec> {
    let DataSpec::Dataset(name) = spec else {
        return Ok(spec.clone());
    };
    let dir = hub::shard_dir(data.data_dir.as_deref(), name, &data.tokenizer);
    if !prepared(&dir) {
        if hub::offline() {
            return Err(unprepared(
                name,
                data,
                anyhow::anyhow!("HF_HUB_OFFLINE is set"),
            ));
        }
        // Every rank of a job may get here at once: one prepares, the others wait.
        let _lock = lock::exclusive(&dir.with_extension("lock"), &format!("'{name}'"))?;
        if prepared(&dir) {
            return Ok(DataSpec::Shards(dir));
        }
        eprintln!("preparing '{name}' into '{}' (once)", dir.display());
        prepare::run(&prepare::PrepareOptions {
            source: name.to_string(),
            tokenizer: data.tokenizer.clone(),
            out: dir.clone(),
            shard_tokens: prepare::DEFAULT_SHARD_TOKENS,
            val_tokens: prepare::DEFAULT_VAL_TOKENS,
            revision: data.revision.clone(),
        })
        .map_err(|e| unprepared(name, data, e))?;
    }
    Ok(DataSpec::Shards(dir))
}

/// Prepares the named datasets (`wikitext103`, `openwebtext`) of `data` that are not
/// prepared yet. Ranks call it before they join their job: preparing can take hours, far
/// beyond the bound on waits for other ranks, and ranks sharing a file system prepare once.
pub fn prepare_named(data: &DataConfig) -> Result<()> {
    if hub::offline() {
        // Nothing can be prepared; loading explains what is missing (tokenizer or data).
        return Ok(());
    }
    for spec in std::iter::once(&data.train).chain(&data.val) {
        resolve_dataset(spec, data)?;
    }
    Ok(())
}

/// True when `dir` holds a complete preparation (`prepare` writes its meta file last).
fn prepared(dir: &std::path::Path) -> bool {
    prepare::completed(dir).is_some()
}

/// `error` (the tokenizer or dataset could not be fetched), explained when `data` names a
/// dataset (`wikitext103`, `openwebtext`) that is not prepared yet: which dataset, the
/// `prepare` command that makes it, and how to train on local data instead.
pub fn explain_unprepared(data: &DataConfig, error: anyhow::Error) -> anyhow::Error {
    let named = std::iter::once(&data.train)
        .chain(&data.val)
        .find_map(|spec| match spec {
            DataSpec::Dataset(name) => Some(name),
            _ => None,
        });
    match named {
        Some(name)
            if !prepared(&hub::shard_dir(
                data.data_dir.as_deref(),
                name,
                &data.tokenizer,
            )) =>
        {
            unprepared(name, data, error)
        }
        _ => error,
    }
}

fn unprepared(name: &str, data: &DataConfig, cause: anyhow::Error) -> anyhow::Error {
    let dir = hub::shard_dir(data.data_dir.as_deref(), name, &data.tokenizer);
    let data_dir = data
        .data_dir
        .as_ref()
        .map_or(String::new(), |d| format!(" --data-dir {d}"));
    anyhow::anyhow!(
        "dataset '{name}' is not prepared in '{dir}' (for tokenizer '{tok}') and cannot be \
         prepared now ({cause:#}). Prepare it where the Hugging Face hub is reachable: \
         `bsfa-train prepare --data {name} --tokenizer {tok}{data_dir}` (then copy '{dir}' \
         here, or pass --data-dir). Or train on local data instead: --data text:FILE (a UTF-8 \
         text file) or --data shards:DIR (llm.c shards), or the built-in corpus with --data \
         builtin --tokenizer bytes",
        tok = data.tokenizer,
        dir = dir.display(),
    )
}

/// A token stream in independent segments: one per shard file, or one for a text source.
/// Windows never cross a segment boundary.
///
/// Every id is below the model's vocabulary: checked whole when the stream is opened, and
/// again on the host (one max per window) before a batch becomes a tensor, in
/// [`batch_of`]. An id outside the vocabulary would otherwise be a device-side assert on
/// CUDA (the embedding's gather, the loss' index), which leaves the context unusable rather
/// than returning an error.
pub struct TokenSegments {
    segments: Segments,
    /// The `--data` source the tokens come from, for errors.
    source: String,
    /// The model's vocabulary size: every id is below it.
    vocab_size: usize,
}

enum Segments {
    Memory(Vec<u32>),
    Shards(Vec<shards::Shard>),
}

impl TokenSegments {
    /// Opens `builtin`, `text:PATH` (tokenized whole) or `shards:PATH` (a `.bin` file, or the
    /// `_<split>_` shards of a folder), checking every id against `vocab_size`.
    pub fn open(
        spec: &DataSpec,
        tokenizer: &Tokenizer,
        split: &str,
        vocab_size: usize,
    ) -> Result<Self> {
        if let DataSpec::Shards(path) = spec {
            let opened = shards::files(path, split)?
                .iter()
                .map(|f| shards::Shard::open(f))
                .collect::<Result<Vec<_>>>()?;
            for shard in &opened {
                shard.check_vocab(vocab_size)?;
            }
            Ok(Self {
                segments: Segments::Shards(opened),
                source: spec.to_string(),
                vocab_size,
            })
        } else {
            Self::from_tokens(read_tokens(spec, tokenizer)?, &spec.to_string(), vocab_size)
        }
    }

    /// Tokens already in memory, from `source` (for errors), checked against `vocab_size`.
    pub fn from_tokens(tokens: Vec<u32>, source: &str, vocab_size: usize) -> Result<Self> {
        let out = Self {
            segments: Segments::Memory(tokens),
            source: source.to_string(),
            vocab_size,
        };
        if let Segments::Memory(tokens) = &out.segments {
            if let Some(pos) = tokens.iter().position(|&id| id as usize >= vocab_size) {
                return Err(out.out_of_vocabulary(tokens[pos], &format!("position {pos}")));
            }
        }
        Ok(out)
    }

    /// For a source in memory: its last `fraction` of tokens, split off as a stream of their
    /// own (a held-out validation set). `None` for shards, which have their own split.
    fn hold_out(&mut self, fraction: f64) -> Option<Self> {
        let Segments::Memory(tokens) = &mut self.segments else {
            return None;
        };
        let held_out = ((tokens.len() as f64) * fraction) as usize;
        Some(Self {
            segments: Segments::Memory(tokens.split_off(tokens.len() - held_out)),
            source: self.source.clone(),
            vocab_size: self.vocab_size,
        })
    }

    /// Tokens per segment.
    pub fn segment_lens(&self) -> Vec<usize> {
        match &self.segments {
            Segments::Memory(tokens) => vec![tokens.len()],
            Segments::Shards(shards) => shards.iter().map(|s| s.len()).collect(),
        }
    }

    /// Total tokens.
    pub fn len(&self) -> usize {
        self.segment_lens().iter().sum()
    }

    /// True when there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Distinct start positions of `seq_len + 1`-token windows, over all segments.
    pub fn windows(&self, seq_len: usize) -> usize {
        self.segment_lens()
            .iter()
            .map(|&n| n.saturating_sub(seq_len))
            .sum()
    }

    /// Appends tokens `start .. start + len` of segment `segment` to `out`.
    pub fn read(&self, segment: usize, start: usize, len: usize, out: &mut Vec<u32>) {
        match &self.segments {
            Segments::Memory(tokens) => out.extend_from_slice(&tokens[start..start + len]),
            Segments::Shards(shards) => shards[segment].read(start, len, out),
        }
    }

    /// The vocabulary size every id is checked against.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Fails unless every id of the window read at `start` of `segment` is inside the
    /// vocabulary: the host-side check before a batch is uploaded (a max per window).
    fn check_window(&self, window: &[u32], segment: usize, start: usize) -> Result<()> {
        let max = window.iter().copied().max().unwrap_or(0);
        if (max as usize) < self.vocab_size {
            return Ok(());
        }
        let pos = window.iter().position(|&id| id == max).unwrap_or(0) + start;
        let at = match &self.segments {
            Segments::Shards(shards) => {
                format!("position {pos} of '{}'", shards[segment].path().display())
            }
            Segments::Memory(_) => format!("position {pos}"),
        };
        Err(self.out_of_vocabulary(max, &at))
    }

    /// The error for id `id` found at `at`: which source, which id, the vocabulary, the fix.
    fn out_of_vocabulary(&self, id: u32, at: &str) -> anyhow::Error {
        anyhow::anyhow!(
            "the data '{}' holds token id {id} at {at}, outside the model's vocabulary of {} \
             (model.vocab_size); raise model.vocab_size above {id} (--set \
             model.vocab_size={}) or use data tokenized with the model's tokenizer",
            self.source,
            self.vocab_size,
            (id as usize + 1).div_ceil(64) * 64
        )
    }
}

fn read_tokens(spec: &DataSpec, tokenizer: &Tokenizer) -> Result<Vec<u32>> {
    let text = match spec {
        DataSpec::Builtin => builtin::corpus(),
        DataSpec::Text(path) => {
            let shown = path.display();
            let bytes = std::fs::read(path).with_context(|| {
                format!(
                    "cannot read data file '{shown}' (check the path given to --data text:PATH)"
                )
            })?;
            String::from_utf8(bytes)
                .with_context(|| format!("data file '{shown}' is not valid UTF-8 text"))?
        }
        other => {
            bail!(
                "'{other}' holds no text; a LLaMA trains on builtin, text:PATH, shards:PATH, \
             wikitext103 or openwebtext"
            )
        }
    };
    if text.trim().is_empty() {
        bail!("data source '{spec}' is empty");
    }
    tokenizer.encode(&text)
}

/// Draws random windows of `seq_len + 1` tokens, uniformly over every window of every
/// segment, deterministically from a seed.
pub struct Batcher<'a> {
    tokens: &'a TokenSegments,
    seed: u64,
    rng: ChaCha8Rng,
}

impl<'a> Batcher<'a> {
    /// A sampler over `tokens`, which must hold at least one window.
    pub fn new(tokens: &'a TokenSegments, seed: u64) -> Self {
        Self {
            tokens,
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// The current position, for checkpoints.
    pub fn position(&self) -> TokenPosition {
        TokenPosition {
            seed: self.seed,
            word_pos: self.rng.get_word_pos(),
        }
    }

    /// Moves to `position`, so the next batch is the one drawn after it was taken.
    pub fn seek(&mut self, position: TokenPosition) {
        self.seed = position.seed;
        self.rng = ChaCha8Rng::seed_from_u64(position.seed);
        self.rng.set_word_pos(position.word_pos);
    }

    /// The next random window of `seq_len + 1` tokens, as `(segment, start)`.
    pub fn draw(&mut self, seq_len: usize) -> (usize, usize) {
        let lens = self.tokens.segment_lens();
        let mut start = self.rng.random_range(0..self.tokens.windows(seq_len));
        let mut segment = 0;
        while start >= lens[segment].saturating_sub(seq_len) {
            start -= lens[segment].saturating_sub(seq_len);
            segment += 1;
        }
        (segment, start)
    }

    /// Inputs and next-token targets, each `batch x seq_len` (u32).
    pub fn next_batch(
        &mut self,
        batch: usize,
        seq_len: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let windows: Vec<(usize, usize)> = (0..batch).map(|_| self.draw(seq_len)).collect();
        batch_of(self.tokens, &windows, seq_len, device)
    }
}

/// Inputs and targets (`windows.len() x seq_len`, u32) of the given windows, on `device`.
/// Every id is checked against the vocabulary on the host first (see [`TokenSegments`]).
pub fn batch_of(
    tokens: &TokenSegments,
    windows: &[(usize, usize)],
    seq_len: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let mut window = Vec::with_capacity(seq_len + 1);
    let mut inputs = Vec::with_capacity(windows.len() * seq_len);
    let mut targets = Vec::with_capacity(windows.len() * seq_len);
    for &(segment, start) in windows {
        window.clear();
        tokens.read(segment, start, seq_len + 1, &mut window);
        tokens.check_window(&window, segment, start)?;
        inputs.extend_from_slice(&window[..seq_len]);
        targets.extend_from_slice(&window[1..]);
    }
    let shape = (windows.len(), seq_len);
    Ok((
        Tensor::from_vec(inputs, shape, device)?,
        Tensor::from_vec(targets, shape, device)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_inputs_shifted_by_one_and_seek_replays() {
        let tokens = TokenSegments::from_tokens((0..100).collect(), "test", 100).unwrap();
        let mut b = Batcher::new(&tokens, 7);
        let (x, y) = b.next_batch(3, 10, &Device::Cpu).unwrap();
        let x: Vec<Vec<u32>> = x.to_vec2().unwrap();
        let y: Vec<Vec<u32>> = y.to_vec2().unwrap();
        for (xr, yr) in x.iter().zip(&y) {
            for t in 0..10 {
                assert_eq!(yr[t], xr[t] + 1);
            }
        }
        let mut again = Batcher::new(&tokens, 7);
        let (x2, _) = again.next_batch(3, 10, &Device::Cpu).unwrap();
        assert_eq!(x, x2.to_vec2::<u32>().unwrap());

        // A sampler restored from a position draws what the original draws next.
        let position = b.position();
        let (next, _) = b.next_batch(4, 10, &Device::Cpu).unwrap();
        let mut restored = Batcher::new(&tokens, 0);
        restored.seek(position);
        let (replayed, _) = restored.next_batch(4, 10, &Device::Cpu).unwrap();
        assert_eq!(
            next.to_vec2::<u32>().unwrap(),
            replayed.to_vec2::<u32>().unwrap()
        );
    }

    #[test]
    fn windows_stay_inside_one_shard_and_cover_all_shards() {
        let dir = tempfile::tempdir().unwrap();
        // Shard k holds ids 1000k .. 1000k + n_k; a window crossing shards would mix them.
        for (k, n) in [(0u32, 20u32), (1, 5), (2, 40)] {
            let ids: Vec<u32> = (1000 * k..1000 * k + n).collect();
            let path = dir.path().join(format!("d_train_{k:06}.bin"));
            shards::write(&path, &ids, 4096).unwrap();
        }
        let spec = format!("shards:{}", dir.path().display())
            .parse::<crate::data::DataSpec>()
            .unwrap();
        let tokens = TokenSegments::open(&spec, &Tokenizer::Bytes, "train", 4096).unwrap();
        // Shard 1 (5 tokens) is too short for a window of 9.
        assert_eq!(tokens.windows(8), 12 + 32);
        let mut b = Batcher::new(&tokens, 3);
        let (x, y) = b.next_batch(200, 8, &Device::Cpu).unwrap();
        let mut seen = [false; 3];
        for (xr, yr) in x
            .to_vec2::<u32>()
            .unwrap()
            .iter()
            .zip(y.to_vec2::<u32>().unwrap())
        {
            let shard = xr[0] / 1000;
            seen[shard as usize] = true;
            assert!(yr.iter().all(|id| id / 1000 == shard), "{xr:?} {yr:?}");
            assert_eq!(yr[7], xr[7] + 1);
        }
        assert_eq!(seen, [true, false, true]);
        let err = TokenSegments::open(&spec, &Tokenizer::Bytes, "train", 1000)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("d_train_000001.bin") || err.contains("d_train_000002.bin"),
            "{err}"
        );
    }

    /// Ids outside the model's vocabulary never reach a tensor: a text source is checked when
    /// opened, and every batch on the host before upload (here: shards whose bound is lowered
    /// after opening, as if a shard changed under a run), each error naming the source, the id,
    /// the vocabulary and the fix.
    #[test]
    fn ids_outside_the_vocabulary_are_host_errors() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("t.txt");
        std::fs::write(&text, "abc~").unwrap();
        let spec: DataSpec = format!("text:{}", text.display()).parse().unwrap();
        let err = TokenSegments::open(&spec, &Tokenizer::Bytes, "val", 100)
            .err()
            .unwrap()
            .to_string();
        for needle in [
            "t.txt",
            "token id 126 at position 3",
            "vocabulary of 100",
            "model.vocab_size=128",
        ] {
            assert!(err.contains(needle), "'{needle}' not in: {err}");
        }
        assert!(TokenSegments::open(&spec, &Tokenizer::Bytes, "val", 127).is_ok());

        let ids: Vec<u32> = (0..40).map(|i| if i == 17 { 2000 } else { i }).collect();
        shards::write(&dir.path().join("s_train_000000.bin"), &ids, 4096).unwrap();
        let spec: DataSpec = format!("shards:{}", dir.path().display()).parse().unwrap();
        let mut tokens = TokenSegments::open(&spec, &Tokenizer::Bytes, "train", 4096).unwrap();
        let window = [(0, 10)];
        assert!(batch_of(&tokens, &window, 8, &Device::Cpu).is_ok());
        tokens.vocab_size = 1000;
        let err = batch_of(&tokens, &window, 8, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        for needle in [
            "token id 2000",
            "position 17 of",
            "s_train_000000.bin",
            "of 1000",
        ] {
            assert!(err.contains(needle), "'{needle}' not in: {err}");
        }
        // A window that does not reach the bad id is fine.
        assert!(batch_of(&tokens, &[(0, 0)], 8, &Device::Cpu).is_ok());
    }

    #[test]
    fn held_out_tail_and_short_data() {
        let builtin = DataConfig::default();
        let data = load(&builtin, &Tokenizer::Bytes, 64, 256).unwrap();
        let total = data.train.len() + data.val.len();
        assert!(data.val.len().abs_diff(total / 10) <= 1);
        let err = load(&builtin, &Tokenizer::Bytes, 5_000_000, 256)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("no segment as long as one sequence"), "{err}");
    }
}
