//! Command-line interface: flags map onto config keys (see `config`).

use crate::config::{ConfigBuilder, RunConfig, MAX_THREADS};
use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

/// Pre-train LLaMA models with AdamW, Adam-mini and the BSFA wrapper on Candle.
///
/// Training is the default command: `bsfa-train` alone trains the `tiny` model on the
/// built-in corpus. Config layers: preset < --config < flags < --set.
#[derive(Debug, Parser)]
#[command(name = "bsfa-train", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

/// Subcommands besides training.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Time training steps of a model on random tokens and print one JSON line.
    Bench(Box<BenchArgs>),
    /// Mean loss of a checkpoint's model on a data source; prints `{"val_loss", "tokens"}`.
    Eval(EvalArgs),
    /// Write a checkpoint as a Hugging Face LlamaForCausalLM folder.
    Export(ExportArgs),
    /// Tokenize a text source into llm.c token shards (train/val) with a meta.json.
    Prepare(PrepareArgs),
    /// Train a byte-level BPE tokenizer (GPT-2's scheme) on text; prints a JSON report.
    Tokenizer(TokenizerArgs),
    /// Plot runs' loss curves to a PNG and compare them with the first run.
    Plot(PlotArgs),
    /// Continue a prompt with a checkpoint's model; the text streams to stdout, a JSON report
    /// (ids, tokens/s, why it stopped) goes to stderr.
    Sample(SampleArgs),
}

/// `sample`: which model, the prompt, and how to pick tokens.
#[derive(Debug, Args)]
pub struct SampleArgs {
    /// A checkpoint folder (OUT/checkpoints/step-N), a run folder (OUT: its newest
    /// checkpoint) or a Hugging Face folder written by `export`.
    #[arg(long)]
    pub checkpoint: String,
    /// Text to continue (printed first).
    #[arg(long)]
    pub prompt: String,
    /// Tokens to write (fewer if the model writes its end-of-text token or the context is
    /// full).
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 always picks the most likely token (greedy).
    #[arg(long, default_value_t = 0.8, allow_negative_numbers = true)]
    pub temperature: f64,
    /// Draw among the K most likely tokens only.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Draw among the most likely tokens whose probabilities sum to P only (nucleus).
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f64>,
    /// Seed of the draws.
    #[arg(long, default_value_t = 1337)]
    pub seed: u64,
    /// Tokenizer (default: the run's, or the Hugging Face folder's tokenizer.json).
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// Re-run the whole context through the training model for every token instead of
    /// caching keys and values (slow; a cross-check).
    #[arg(long)]
    pub no_kv_cache: bool,
    /// Compute device: cpu, cuda, or auto.
    #[arg(long, default_value = "auto", value_parser = ["cpu", "cuda", "auto"])]
    pub device: String,
    /// Compute threads (default: every core).
    #[arg(long, value_parser = thread_count)]
    pub threads: Option<usize>,
}

impl SampleArgs {
    /// The sampling options these flags give.
    pub fn options(&self) -> crate::sample::SampleOptions {
        crate::sample::SampleOptions {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
            kv_cache: !self.no_kv_cache,
        }
    }
}

/// `plot`: run folders and the image to write.
#[derive(Debug, Args)]
pub struct PlotArgs {
    /// Run folders (each with metrics.jsonl); the first is the baseline of the table.
    #[arg(required = true)]
    pub runs: Vec<String>,
    /// PNG to write.
    #[arg(long, default_value = "curves.png")]
    pub out: String,
    /// Title above the panels.
    #[arg(long, default_value = "bsfa-train")]
    pub title: String,
}

/// `prepare`: source, tokenizer, destination and shard sizes.
#[derive(Debug, Args)]
pub struct PrepareArgs {
    /// Source: text:PATH (a file or a folder of .txt), parquet:DIR (hub layout, `text` column),
    /// wikitext103 or openwebtext.
    #[arg(long)]
    pub data: String,
    /// Tokenizer: bytes, PATH/tokenizer.json, or a hub name such as gpt2.
    #[arg(long, default_value = "gpt2")]
    pub tokenizer: String,
    /// Output folder (default for wikitext103/openwebtext: the cache folder training reads).
    #[arg(long)]
    pub out: Option<String>,
    /// Cache root for named datasets (default: under the Hugging Face hub cache).
    #[arg(long)]
    pub data_dir: Option<String>,
    /// Tokens per shard.
    #[arg(long, default_value_t = crate::data::prepare::DEFAULT_SHARD_TOKENS)]
    pub shard_tokens: usize,
    /// Validation tokens held back from the end when the source has no validation split.
    #[arg(long, default_value_t = crate::data::prepare::DEFAULT_VAL_TOKENS)]
    pub val_tokens: usize,
    /// Hub revision (branch, tag or commit) of wikitext103/openwebtext to read (default: the
    /// dataset's own, `main`); meta.json records the commit it resolved to.
    #[arg(long)]
    pub revision: Option<String>,
    /// Threads for tokenization (default: every core).
    #[arg(long, value_parser = thread_count)]
    pub threads: Option<usize>,
}

/// `tokenizer`: the text to train on, the vocabulary size and where to write it.
#[derive(Debug, Args)]
pub struct TokenizerArgs {
    /// Training text: text:PATH (a UTF-8 file or a folder of .txt files).
    #[arg(long)]
    pub data: String,
    /// Held-out text the report measures bytes per token on (never trained on).
    #[arg(long)]
    pub val_data: Option<String>,
    /// Vocabulary size, `<|endoftext|>` included.
    #[arg(long, default_value_t = 8192)]
    pub vocab_size: usize,
    /// The tokenizer.json to write.
    #[arg(long, default_value = "tokenizer.json")]
    pub out: String,
    /// Threads (default: every core).
    #[arg(long, value_parser = thread_count)]
    pub threads: Option<usize>,
}

/// `eval`: which checkpoint, on which data, how much.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Checkpoint folder (OUT/checkpoints/step-N).
    #[arg(long)]
    pub checkpoint: String,
    /// Data: shards:DIR (its _val_ shards), shards:FILE.bin, text:PATH or builtin.
    #[arg(long)]
    pub data: String,
    /// Tokens per window (default: the run's seq_len).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Windows per forward pass (default: the run's micro-batch size).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Batches to evaluate (default: every window of the data).
    #[arg(long)]
    pub eval_batches: Option<usize>,
    /// Compute threads (default: every core).
    #[arg(long, value_parser = thread_count)]
    pub threads: Option<usize>,
}

/// `export`: which checkpoint, and where to.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Checkpoint folder (OUT/checkpoints/step-N).
    #[arg(long)]
    pub checkpoint: String,
    /// New folder for the Hugging Face files.
    #[arg(long)]
    pub out: String,
}

/// `bench` takes the training flags plus how many steps to time.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Untimed steps first, for allocator and caches to warm up [default: 2; with BSFA
    /// bsfa.history + 1, so that the timed steps see a full history].
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Timed steps; the report gives their medians [default: 5; with BSFA at least
    /// bsfa.interval, so that one re-estimation is timed].
    #[arg(long)]
    pub iters: Option<usize>,
    /// Also time the data loader alone for this many steps on --data (0: skip).
    #[arg(long, default_value_t = 0)]
    pub loader_steps: usize,
    /// Instead of training steps, compare each fused op (attention, cross-entropy, RMSNorm,
    /// SwiGLU) with its reference composition at the run's shapes: worst difference and
    /// median forward + backward times (--iters of them, default 5).
    #[arg(long)]
    pub kernels: bool,
}

/// The flags shared by training and `bench`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Model preset (tiny, llama72m, llama134m, vit-s16, vit-tiny, test) or a path to a JSON
    /// config; with --bsfa, a preset runs the paper's BSFA setting for that model.
    #[arg(long, default_value = "tiny")]
    pub model: String,
    /// A run config JSON file (same keys as --set) merged over the preset.
    #[arg(long)]
    pub config: Option<String>,
    /// Override any config key by dotted path, e.g. model.hidden_size=128 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Training data: builtin, text:PATH, shards:DIR, wikitext103 or openwebtext.
    #[arg(long)]
    pub data: Option<String>,
    /// Validation data (default: a held-out tail of the training data).
    #[arg(long)]
    pub val_data: Option<String>,
    /// Tokenizer: bytes, PATH/tokenizer.json, or a hub name such as gpt2.
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// Cache root of prepared wikitext103/openwebtext shards (default: under the hub cache).
    #[arg(long)]
    pub data_dir: Option<String>,
    /// Optimizer steps.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Global batch in sequences per optimizer step.
    #[arg(long)]
    pub batch_size: Option<u64>,
    /// Sequences per forward/backward pass (gradient accumulation splits the batch).
    #[arg(long)]
    pub micro_batch_size: Option<u64>,
    /// Tokens per sequence.
    #[arg(long)]
    pub seq_len: Option<u64>,
    /// Peak learning rate.
    #[arg(long, value_parser = finite, allow_negative_numbers = true)]
    pub lr: Option<f64>,
    /// Linear warmup steps.
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// Final learning rate as a fraction of the peak (cosine floor).
    #[arg(long, value_parser = finite, allow_negative_numbers = true)]
    pub min_lr_ratio: Option<f64>,
    /// Global gradient-norm clip (0 disables).
    #[arg(long, value_parser = finite, allow_negative_numbers = true)]
    pub grad_clip: Option<f64>,
    /// Optimizer: adamw or adam-mini.
    #[arg(long)]
    pub optimizer: Option<String>,
    /// Wrap the optimizer in BSFA (settings under the `bsfa.*` keys); the base optimizer is
    /// the preset's BSFA base (Adam-mini, as in the paper) unless --optimizer names one.
    #[arg(long)]
    pub bsfa: bool,
    /// Evaluate every N steps (and at the end).
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Micro-batches per evaluation.
    #[arg(long)]
    pub eval_batches: Option<u64>,
    /// Write a metrics line every N steps.
    #[arg(long)]
    pub log_every: Option<u64>,
    /// Seed for initialisation and batch sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Compute threads (default: every core).
    #[arg(long, value_parser = thread_count)]
    pub threads: Option<usize>,
    /// Output folder (default: `runs/<model>`).
    #[arg(long)]
    pub out: Option<String>,
    /// Write a checkpoint every N steps (0: only at the end and on Ctrl-C/SIGTERM).
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Complete checkpoints to keep (older ones are deleted).
    #[arg(long)]
    pub keep_checkpoints: Option<u64>,
    /// Continue from a checkpoint: `auto` (the newest in OUT/checkpoints, or a fresh start
    /// when there is none) or a checkpoint folder.
    #[arg(long, value_name = "auto|PATH")]
    pub resume: Option<String>,
    /// Compute device: cpu, cuda, or auto (CUDA when built with it and a GPU is present).
    #[arg(long, value_name = "cpu|cuda|auto")]
    pub device: Option<String>,
    /// Compute precision: f32, bf16 (f32 master weights and optimizer state), or auto (bf16
    /// on CUDA, f32 on the CPU).
    #[arg(long, value_name = "f32|bf16|auto")]
    pub dtype: Option<String>,
    /// Run N data-parallel ranks on this machine (like torchrun --nproc-per-node); each
    /// takes its share of every global batch.
    #[arg(long, value_name = "N")]
    pub nproc_per_node: Option<usize>,
    /// Seconds a rank waits for the others in one collective (or to join) before failing;
    /// at most 604800 (a week).
    #[arg(long, value_name = "SECONDS")]
    pub dist_timeout: Option<u64>,
    /// Trace N training steps (after the first) into OUT/trace.json, for chrome://tracing or
    /// ui.perfetto.dev.
    #[arg(long, value_name = "STEPS")]
    pub profile: Option<usize>,
    /// Peak dense TFLOP/s of one rank's device at the run's dtype, for model FLOPs
    /// utilisation (default: a known GPU's datasheet figure; on the CPU, measured).
    #[arg(long, value_name = "TFLOPS", value_parser = finite, allow_negative_numbers = true)]
    pub peak_tflops: Option<f64>,
    /// Print parameter counts and a memory estimate, then exit without training.
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry-run: measure the step's peak GPU memory (the GPU's ops, run on the CPU at
    /// 1-2 layers and extrapolated) and suggest the largest micro-batch that fits GIB
    /// gibibytes per GPU. On a GPU, --dry-run does this for the device's own memory.
    #[arg(long, value_name = "GIB", requires = "dry_run", value_parser = finite,
          allow_negative_numbers = true)]
    pub gpu_memory: Option<f64>,
}

impl RunArgs {
    /// Resolves preset, config file, flags and `--set` into a validated run config.
    pub fn resolve(&self) -> Result<RunConfig> {
        let mut builder = ConfigBuilder::new(&self.model)?;
        if let Some(path) = &self.config {
            builder.merge_file(path)?;
        }
        let flags: [(&str, Option<Value>); 27] = [
            ("data.train", self.data.as_ref().map(|v| json!(v))),
            ("data.val", self.val_data.as_ref().map(|v| json!(v))),
            ("data.tokenizer", self.tokenizer.as_ref().map(|v| json!(v))),
            ("data.data_dir", self.data_dir.as_ref().map(|v| json!(v))),
            ("train.steps", self.steps.map(|v| json!(v))),
            ("train.batch_size", self.batch_size.map(|v| json!(v))),
            (
                "train.micro_batch_size",
                self.micro_batch_size.map(|v| json!(v)),
            ),
            ("train.seq_len", self.seq_len.map(|v| json!(v))),
            ("optimizer.lr", self.lr.map(|v| json!(v))),
            (
                "optimizer.warmup_steps",
                self.warmup_steps.map(|v| json!(v)),
            ),
            (
                "optimizer.min_lr_ratio",
                self.min_lr_ratio.map(|v| json!(v)),
            ),
            ("optimizer.grad_clip", self.grad_clip.map(|v| json!(v))),
            ("optimizer.name", self.optimizer.as_ref().map(|v| json!(v))),
            ("bsfa.enabled", self.bsfa.then(|| json!(true))),
            ("train.eval_every", self.eval_every.map(|v| json!(v))),
            ("train.eval_batches", self.eval_batches.map(|v| json!(v))),
            ("train.log_every", self.log_every.map(|v| json!(v))),
            ("train.seed", self.seed.map(|v| json!(v))),
            ("train.threads", self.threads.map(|v| json!(v))),
            ("train.out", self.out.as_ref().map(|v| json!(v))),
            (
                "train.checkpoint_every",
                self.checkpoint_every.map(|v| json!(v)),
            ),
            (
                "train.keep_checkpoints",
                self.keep_checkpoints.map(|v| json!(v)),
            ),
            ("train.device", self.device.as_ref().map(|v| json!(v))),
            ("train.dtype", self.dtype.as_ref().map(|v| json!(v))),
            ("train.dist_timeout_s", self.dist_timeout.map(|v| json!(v))),
            ("train.peak_tflops", self.peak_tflops.map(|v| json!(v))),
            ("train.profile_steps", self.profile.map(|v| json!(v))),
        ];
        for (key, value) in flags {
            if let Some(value) = value {
                builder.set_value(key, value)?;
            }
        }
        for assignment in &self.set {
            builder.apply_set(assignment)?;
        }
        builder.build()
    }
}

/// A float flag's value: a finite number (the config is JSON, which has no NaN or
/// infinity, so they would arrive as null).
fn finite(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if value.is_finite() => Ok(value),
        Ok(_) => Err(format!("must be a finite number, got {text}")),
        Err(e) => Err(format!("{e}: must be a finite number")),
    }
}

/// A `--threads` value: at most [`MAX_THREADS`], which every machine can spawn.
fn thread_count(text: &str) -> Result<usize, String> {
    let threads: usize = text.parse().map_err(|e| format!("{e}"))?;
    if threads > MAX_THREADS {
        return Err(format!(
            "at most {MAX_THREADS} threads are allowed, got {threads}"
        ));
    }
    Ok(threads)
}
