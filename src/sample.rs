//! `bsfa-train sample`: a LLaMA continues a prompt token by token, and the text is streamed
//! as it comes; training calls the same code every `train.sample_every` steps.
//!
//! Two engines compute the next token's logits from the same weights (our parameter names
//! are Hugging Face's):
//! - cached (the default): candle-transformers' inference LLaMA with a key/value cache, so
//!   a new token costs one position against the cached context, O(context), instead of a
//!   re-run of the whole context, O(context²);
//! - recompute (`--no-kv-cache`): our training model re-runs the whole context for every
//!   token. Slow, but an implementation independent of the cached one: the tests require
//!   both to pick the same greedy tokens.
//!
//! candle-transformers' `LogitsProcessor` picks each token: the most likely one at
//! temperature 0, else a seeded draw from softmax(logits / T), cut to the `top_k` most likely
//! tokens and then to the smallest set whose probability reaches `top_p`. Ids the model
//! has but the tokenizer lacks (padding rows of the embedding) are never picked.

use crate::checkpoint::{self, Checkpoint};
use crate::config::RunConfig;
use crate::data::Tokenizer;
use crate::model::{Llama, LlamaConfig, Param};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use candle_transformers::models::llama as inference;
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How tokens are picked, and how many.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    /// Tokens to write after the prompt (fewer when the context fills up or the model writes
    /// its end-of-text token).
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 picks the most likely token (greedy).
    pub temperature: f64,
    /// Draw only among the `top_k` most likely tokens.
    pub top_k: Option<usize>,
    /// Draw only among the most likely tokens whose probabilities sum to `top_p`.
    pub top_p: Option<f64>,
    /// Seeds the draws: the same seed, weights and prompt give the same text.
    pub seed: u64,
    /// Keep past positions' keys and values (false: re-run the training model on the whole
    /// context for every token).
    pub kv_cache: bool,
}

impl SampleOptions {
    /// Checks the ranges; each message names the flag to fix.
    pub fn validate(&self) -> Result<()> {
        if self.max_new_tokens == 0 {
            bail!("--max-new-tokens must be at least 1");
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            bail!(
                "--temperature must be a number >= 0 (0 picks the most likely token), got {}",
                self.temperature
            );
        }
        if self.top_k == Some(0) {
            bail!("--top-k must be at least 1");
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                bail!("--top-p must be in (0, 1], got {p}");
            }
        }
        Ok(())
    }

    fn sampling(&self) -> Sampling {
        let temperature = self.temperature;
        match (self.top_k, self.top_p) {
            _ if temperature == 0.0 => Sampling::ArgMax,
            (None, None) => Sampling::All { temperature },
            (Some(k), None) => Sampling::TopK { k, temperature },
            (None, Some(p)) => Sampling::TopP { p, temperature },
            (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature },
        }
    }
}

/// Why writing stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stop {
    /// `max_new_tokens` were written.
    Length,
    /// The model wrote the tokenizer's end-of-text token.
    EndOfText,
    /// The context (`max_position_embeddings`) is full.
    Context,
}

/// What one call wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// The ids written after the prompt (the end-of-text token included, if written).
    pub ids: Vec<u32>,
    /// Their text (without the end-of-text token).
    pub text: String,
    /// Why it stopped.
    pub stop: Stop,
    /// Seconds from the first forward pass to the last token.
    pub seconds: f64,
    /// New tokens per second.
    pub tokens_per_s: f64,
}

/// A LLaMA's weights and tokenizer, ready to write.
pub struct Generator {
    config: LlamaConfig,
    /// Every parameter by its Hugging Face name, f32, on `device`; names and shapes checked.
    weights: HashMap<String, Tensor>,
    /// Where the weights came from, for error messages.
    source: PathBuf,
    tokenizer: Tokenizer,
    device: Device,
}

impl Generator {
    /// Opens `path`: a checkpoint folder (`OUT/checkpoints/step-N`), a run's out folder (its
    /// newest checkpoint), or a Hugging Face folder (`config.json` and `*.safetensors`, as
    /// `export` writes it). `tokenizer` overrides the run's (or the folder's) tokenizer.
    pub fn open(path: &Path, tokenizer: Option<&str>, device: &Device) -> Result<Self> {
        if path.is_file() {
            bail!(
                "'{}' is a file: pass the folder that holds it (a checkpoint, a run folder or \
                 a Hugging Face folder)",
                path.display()
            );
        }
        let is_checkpoint = path.join(checkpoint::TRAINER_FILE).is_file();
        let is_run = path.join("checkpoints").is_dir();
        if !is_checkpoint && !is_run && path.join("config.json").is_file() {
            return Self::open_hugging_face(path, tokenizer, device);
        }
        let dir = if is_run && !is_checkpoint {
            let root = path.join("checkpoints");
            let (_, newest) = checkpoint::list(&root)?
                .pop()
                .with_context(|| format!("'{}' holds no complete checkpoint", root.display()))?;
            newest
        } else if path.is_dir() && !is_checkpoint {
            bail!(
                "'{}' is neither a checkpoint (OUT/checkpoints/step-N, with {}), a run folder \
                 (OUT, with checkpoints/) nor a Hugging Face folder (config.json and \
                 model.safetensors, as `export` writes)",
                path.display(),
                checkpoint::TRAINER_FILE
            );
        } else {
            path.to_path_buf()
        };
        let ck = Checkpoint::open_llama(&dir, "sample")?;
        let config = ck.state.config.model.clone();
        let (_, params) = Llama::new(&config, DType::F32, device, 0)?;
        ck.load_model(&params)?;
        let tokenizer = match tokenizer {
            Some(spec) => Tokenizer::load(spec),
            None => ck.tokenizer(),
        }
        .with_context(|| format!("loading the tokenizer of '{}'", dir.display()))?;
        Self::new(
            &config,
            &params,
            tokenizer,
            &dir.join(checkpoint::MODEL_FILE),
        )
    }

    /// Opens a Hugging Face `LlamaForCausalLM` folder.
    fn open_hugging_face(dir: &Path, tokenizer: Option<&str>, device: &Device) -> Result<Self> {
        let config_file = dir.join("config.json");
        let text = std::fs::read_to_string(&config_file)
            .with_context(|| format!("cannot read '{}'", config_file.display()))?;
        let flat: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("'{}' is not valid JSON", config_file.display()))?;
        let config = crate::model::llama::from_hf(&flat, &config_file)?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            bail!("'{}' has no .safetensors weights", dir.display());
        }
        let mut tensors = HashMap::new();
        for file in &files {
            tensors.extend(checkpoint::read_safetensors(file)?.0);
        }
        let (_, params) = Llama::new(&config, DType::F32, device, 0)?;
        checkpoint::load_weights(&params, &tensors, dir)?;
        let tokenizer = match tokenizer {
            Some(spec) => Tokenizer::load(spec)?,
            None if dir.join("tokenizer.json").is_file() => {
                Tokenizer::load(&dir.join("tokenizer.json").display().to_string())?
            }
            None => bail!(
                "'{}' has no tokenizer.json: pass --tokenizer bytes if the run used the bytes \
                 tokenizer (`export` writes no tokenizer.json for it), or --tokenizer \
                 PATH/tokenizer.json",
                dir.display()
            ),
        };
        Self::new(&config, &params, tokenizer, dir)
    }

    /// A generator over a model's parameters as they are now (e.g. during training; the
    /// tensors are shared, not copied), read from `source`.
    pub fn new(
        config: &LlamaConfig,
        params: &[Param],
        tokenizer: Tokenizer,
        source: &Path,
    ) -> Result<Self> {
        if tokenizer.vocab_size() > config.vocab_size {
            bail!(
                "the tokenizer has {} ids but the model only {} (model.vocab_size): pass the \
                 tokenizer the model was trained with (--tokenizer)",
                tokenizer.vocab_size(),
                config.vocab_size
            );
        }
        let device = params
            .first()
            .map_or(Device::Cpu, |p| p.var.device().clone());
        let weights = params
            .iter()
            .map(|p| {
                Ok((
                    p.name.clone(),
                    p.var.as_tensor().detach().to_dtype(DType::F32)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            config: config.clone(),
            weights,
            source: source.to_path_buf(),
            tokenizer,
            device,
        })
    }

    /// The token ids of `text`, checked to leave room for at least one new token.
    pub fn prompt(&self, text: &str) -> Result<Vec<u32>> {
        let ids = self.tokenizer.encode(text)?;
        self.check_prompt(&ids)?;
        Ok(ids)
    }

    fn check_prompt(&self, ids: &[u32]) -> Result<()> {
        let context = self.config.max_position_embeddings;
        if ids.is_empty() {
            bail!(
                "the prompt is empty: pass --prompt TEXT (the model continues a text, so it \
                 needs at least one token of it)"
            );
        }
        if ids.len() >= context {
            bail!(
                "the prompt is {} tokens long but the model's context (max_position_embeddings) \
                 is {context} tokens, and at least one new token must fit: shorten the prompt",
                ids.len()
            );
        }
        if let Some(bad) = ids
            .iter()
            .find(|&&id| id as usize >= self.config.vocab_size)
        {
            bail!(
                "the prompt has token id {bad}, outside the model's {} ids",
                self.config.vocab_size
            );
        }
        Ok(())
    }

    /// Writes after `prompt` (token ids), handing each piece of text to `emit` as soon as it
    /// is whole (a character split over several tokens waits for its last one).
    pub fn generate(
        &self,
        prompt: &[u32],
        options: &SampleOptions,
        emit: &mut dyn FnMut(&str) -> Result<()>,
    ) -> Result<Sample> {
        options.validate()?;
        self.check_prompt(prompt)?;
        let room = self.config.max_position_embeddings - prompt.len();
        let budget = options.max_new_tokens.min(room);
        let mut engine = Engine::new(self, options.kv_cache)?;
        let mut picker = LogitsProcessor::from_sampling(options.seed, options.sampling());
        let end = self.tokenizer.end_of_text().map(|(id, _)| id);
        let vocab = self.tokenizer.vocab_size();
        let started = Instant::now();
        let mut ids = prompt.to_vec();
        let mut stream = TextStream::new(&self.tokenizer, prompt)?;
        let mut stop = if budget < options.max_new_tokens {
            Stop::Context
        } else {
            Stop::Length
        };
        for _ in 0..budget {
            let logits = self
                .device
                .with_context(|| engine.next_logits(&ids, &self.device))?;
            let id = picker.sample(&logits.narrow(0, 0, vocab)?)?;
            ids.push(id);
            if Some(id) == end {
                stop = Stop::EndOfText;
                break;
            }
            if let Some(piece) = stream.push(&self.tokenizer, id)? {
                emit(&piece)?;
            }
        }
        let rest = stream.finish(&self.tokenizer)?;
        if !rest.is_empty() {
            emit(&rest)?;
        }
        let seconds = started.elapsed().as_secs_f64();
        let new = ids.split_off(prompt.len());
        Ok(Sample {
            prompt_tokens: prompt.len(),
            tokens_per_s: new.len() as f64 / seconds.max(1e-9),
            ids: new,
            text: stream.text,
            stop,
            seconds,
        })
    }
}

/// Computes the logits of the position after the ids fed so far.
enum Engine {
    /// candle-transformers' LLaMA and its key/value cache of the first `fed` positions.
    Cached {
        model: inference::Llama,
        cache: inference::Cache,
        fed: usize,
    },
    /// Our training model, re-run on the whole context.
    Recompute(Llama),
}

impl Engine {
    fn new(generator: &Generator, kv_cache: bool) -> Result<Self> {
        let (g, device) = (&generator.config, &generator.device);
        if !kv_cache {
            let (model, params) = Llama::new(g, DType::F32, device, 0)?;
            checkpoint::load_weights(&params, &generator.weights, &generator.source)?;
            return Ok(Self::Recompute(model));
        }
        let config = inference::Config {
            hidden_size: g.hidden_size,
            intermediate_size: g.intermediate_size,
            vocab_size: g.vocab_size,
            num_hidden_layers: g.num_hidden_layers,
            num_attention_heads: g.num_attention_heads,
            num_key_value_heads: g.kv_heads(),
            use_flash_attn: false,
            rms_norm_eps: g.rms_norm_eps,
            rope_theta: g.rope_theta as f32,
            bos_token_id: None,
            eos_token_id: None,
            rope_scaling: None,
            max_position_embeddings: g.max_position_embeddings,
            tie_word_embeddings: g.tie_word_embeddings,
        };
        // Every name and shape was checked against our model's when the weights were
        // loaded, so candle-transformers' loader (which panics on a missing tensor) finds
        // them all.
        let vb = VarBuilder::from_tensors(generator.weights.clone(), DType::F32, device);
        Ok(Self::Cached {
            model: inference::Llama::load(vb, &config)?,
            cache: inference::Cache::new(true, DType::F32, &config, device)?,
            fed: 0,
        })
    }

    /// Logits (`vocab`) for the token after `ids`.
    fn next_logits(&mut self, ids: &[u32], device: &Device) -> Result<Tensor> {
        match self {
            Self::Cached { model, cache, fed } => {
                let new = Tensor::new(&ids[*fed..], device)?.unsqueeze(0)?;
                let logits = model.forward(&new, *fed, cache)?;
                *fed = ids.len();
                Ok(logits.squeeze(0)?)
            }
            Self::Recompute(model) => {
                let all = Tensor::new(ids, device)?.unsqueeze(0)?;
                Ok(model.forward(&all)?.i((0, ids.len() - 1))?)
            }
        }
    }
}

/// The text of the ids written after a prompt, handed out in whole characters: byte-level
/// tokenizers split a character over several tokens, whose partial decodings end in U+FFFD.
struct TextStream {
    /// The prompt's ids and those written since.
    ids: Vec<u32>,
    /// Length of the prompt's decoded text.
    prompt_len: usize,
    /// The written text handed out so far.
    text: String,
}

impl TextStream {
    fn new(tokenizer: &Tokenizer, prompt: &[u32]) -> Result<Self> {
        Ok(Self {
            ids: prompt.to_vec(),
            prompt_len: tokenizer.decode(prompt)?.len(),
            text: String::new(),
        })
    }

    /// Adds `id`; returns the new text if it ends in a whole character.
    fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let all = tokenizer.decode(&self.ids)?;
        if all.ends_with(char::REPLACEMENT_CHARACTER) {
            return Ok(None);
        }
        Ok(self.take_new(&all))
    }

    /// The text not handed out yet, whole or not.
    fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String> {
        let all = tokenizer.decode(&self.ids)?;
        Ok(self.take_new(&all).unwrap_or_default())
    }

    fn take_new(&mut self, all: &str) -> Option<String> {
        // Decoding is by concatenation for byte-level tokenizers, so the text handed out is
        // a prefix of `all`; `get` guards tokenizers whose decoding is not.
        let written = all.get(self.prompt_len..)?;
        let new = written.get(self.text.len()..)?.to_string();
        self.text.push_str(&new);
        (!new.is_empty()).then_some(new)
    }
}

/// `text` for a terminal: control characters other than newline and tab written as
/// `\u{..}` escapes, so that a sample cannot move the cursor, recolour or clear the screen.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// Temperature of training's samples (nanoGPT's `sample.py` default).
const TRAINING_TEMPERATURE: f64 = 0.8;
/// Training's samples draw among this many most likely tokens (nanoGPT's default).
const TRAINING_TOP_K: usize = 200;

/// Training's samples: `train.sample_tokens` tokens after `train.sample_prompt`, at
/// temperature 0.8 among the 200 most likely tokens, seeded with `train.seed`, so every
/// sample of a run draws alike and the text changes only as the weights do.
pub struct TrainingSampler {
    generator: Generator,
    prompt: Vec<u32>,
    options: SampleOptions,
}

impl TrainingSampler {
    /// The sampler of a LLaMA run that asks for samples (`train.sample_every` > 0), over
    /// its parameters: the generator shares their storage, so each sample sees the weights
    /// of its step. Checks the prompt now, before training starts.
    pub fn new(config: &RunConfig, params: &[Param]) -> Result<Option<Self>> {
        let train = &config.train;
        let model = match config.spec().language_model() {
            Some(model) if train.sample_every > 0 => model,
            _ => return Ok(None),
        };
        let tokenizer = Tokenizer::load(&config.data.tokenizer)?;
        let generator = Generator::new(
            model,
            params,
            tokenizer,
            Path::new("the training run's parameters"),
        )?;
        let prompt = generator
            .prompt(&train.sample_prompt)
            .context("train.sample_prompt")?;
        Ok(Some(Self {
            generator,
            prompt,
            options: SampleOptions {
                max_new_tokens: train.sample_tokens,
                temperature: TRAINING_TEMPERATURE,
                top_k: Some(TRAINING_TOP_K),
                top_p: None,
                seed: train.seed,
                kv_cache: true,
            },
        }))
    }

    /// Writes one sample with the weights as they are now.
    pub fn write(&self) -> Result<Sample> {
        self.generator
            .generate(&self.prompt, &self.options, &mut |_| Ok(()))
    }
}
