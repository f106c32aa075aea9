//! The typed run configuration and how it is resolved.
//!
//! A run's config is built in layers, each a JSON object with the same keys:
//! code defaults, then the `--model` preset (`configs/*.json`), then `--config FILE`,
//! then the dedicated CLI flags (`--lr`, `--steps`, ...), then every `--set key=value`.
//! Only after all layers are merged is the result deserialised and validated, so every
//! error names the key a user typed.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Presets shipped inside the binary, as `(name, JSON)`.
pub const PRESETS: &[(&str, &str)] = &[
    ("tiny", include_str!("../configs/tiny.json")),
    ("llama72m", include_str!("../configs/llama72m.json")),
    ("llama134m", include_str!("../configs/llama134m.json")),
    ("vit-s16", include_str!("../configs/vit-s16.json")),
    ("vit-tiny", include_str!("../configs/vit-tiny.json")),
];

/// LLaMA architecture, with Hugging Face `LlamaConfig` key names, and which architecture a
/// run trains (a ViT's shape is the `vit` section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// `llama` (this section) or `vit` (the `vit` section; the LLaMA keys are then unused).
    pub architecture: String,
    /// Embedding rows; may exceed the tokenizer's vocabulary (padding rows are never targets).
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Grouped-query attention: number of key/value heads (null means `num_attention_heads`).
    pub num_key_value_heads: Option<usize>,
    /// Longest sequence the rotary tables are built for.
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Share the embedding matrix with the output head.
    pub tie_word_embeddings: bool,
    /// Standard deviation of the normal init of every matrix (norm weights start at 1).
    pub initializer_range: f64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            architecture: "llama".into(),
            vocab_size: 256,
            hidden_size: 128,
            intermediate_size: 344,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: None,
            max_position_embeddings: 1024,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            tie_word_embeddings: false,
            initializer_range: 0.02,
        }
    }
}

impl ModelConfig {
    /// Key/value heads after resolving the `None` default.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// True when the run trains the `vit` section's ViT.
    pub fn is_vit(&self) -> bool {
        self.architecture == "vit"
    }

    /// Checks the architecture is buildable; every message names the key to fix.
    pub fn validate(&self) -> Result<()> {
        match self.architecture.as_str() {
            "llama" => {}
            "vit" => return Ok(()),
            other => bail!("model.architecture must be llama or vit, got '{other}'"),
        }
        for (key, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                bail!("model.{key} must be a positive integer, got 0");
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            bail!(
                "model.num_attention_heads ({}) must divide model.hidden_size ({}); \
                 pick a head count such as {}",
                self.num_attention_heads,
                self.hidden_size,
                divisors_near(self.hidden_size, self.num_attention_heads)
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            bail!(
                "head dimension hidden_size/num_attention_heads = {} is odd; rotary embeddings \
                 rotate pairs of channels and need it even: change model.hidden_size or \
                 model.num_attention_heads",
                self.head_dim()
            );
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            bail!(
                "model.num_key_value_heads ({}) must divide model.num_attention_heads ({})",
                self.kv_heads(),
                self.num_attention_heads
            );
        }
        if !positive(self.rms_norm_eps)
            || !positive(self.rope_theta)
            || !positive(self.initializer_range)
        {
            bail!("model.rms_norm_eps, model.rope_theta and model.initializer_range must be > 0");
        }
        Ok(())
    }
}

/// True for a finite number above zero (false for NaN).
fn positive(x: f64) -> bool {
    x > 0.0 && x.is_finite()
}

/// True for a finite number at or above zero (false for NaN).
fn non_negative(x: f64) -> bool {
    x >= 0.0 && x.is_finite()
}

fn divisors_near(n: usize, around: usize) -> String {
    let mut divs: Vec<usize> = (1..=n).filter(|d| n.is_multiple_of(*d)).collect();
    divs.sort_by_key(|d| d.abs_diff(around));
    divs.truncate(3);
    divs.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(" or ")
}

/// Optimizer and learning-rate schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerConfig {
    /// Which optimizer: `adamw` or `adam-mini`.
    pub name: String,
    /// Peak learning rate, reached at the end of warmup.
    pub lr: f64,
    /// Decoupled weight decay, applied to matrices only (never to norm weights).
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm clip; 0 disables clipping.
    pub grad_clip: f64,
    /// Steps of linear warmup from ~0 to `lr`.
    pub warmup_steps: usize,
    /// Cosine decay floor as a fraction of `lr` (the paper decays to lr/20).
    pub min_lr_ratio: f64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            name: "adamw".into(),
            lr: 3e-3,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            warmup_steps: 20,
            min_lr_ratio: 0.05,
        }
    }
}

impl OptimizerConfig {
    fn validate(&self) -> Result<()> {
        if !crate::optim::OPTIMIZERS.contains(&self.name.as_str()) {
            bail!(
                "optimizer.name '{}' is unknown; available: {}",
                self.name,
                crate::optim::OPTIMIZERS.join(", ")
            );
        }
        if !positive(self.lr) {
            bail!("optimizer.lr must be a positive number, got {}", self.lr);
        }
        for (key, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                bail!("optimizer.{key} must be in [0, 1), got {v}");
            }
        }
        if !positive(self.eps) {
            bail!("optimizer.eps must be > 0, got {}", self.eps);
        }
        if !non_negative(self.weight_decay) || !non_negative(self.grad_clip) {
            bail!("optimizer.weight_decay and optimizer.grad_clip must be >= 0");
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            bail!(
                "optimizer.min_lr_ratio must be in [0, 1], got {}",
                self.min_lr_ratio
            );
        }
        Ok(())
    }
}

/// Loop lengths, batch shape and bookkeeping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Global batch in sequences per optimizer step.
    pub batch_size: usize,
    /// Sequences per forward/backward pass; the batch is accumulated over
    /// `batch_size / micro_batch_size` passes (null means the whole batch at once).
    pub micro_batch_size: Option<usize>,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Evaluate every N steps (and after the last); 0 evaluates only at the end.
    pub eval_every: usize,
    /// Micro-batches (of `micro_batch_size` sequences) per evaluation.
    pub eval_batches: usize,
    /// Write a metrics line every N steps.
    pub log_every: usize,
    /// Seeds model init and batch sampling.
    pub seed: u64,
    /// Compute threads (null means every core).
    pub threads: Option<usize>,
    /// Output folder; empty means `runs/<preset>`.
    pub out: String,
    /// Write a checkpoint every N steps (0: only at the end and on SIGINT/SIGTERM).
    pub checkpoint_every: usize,
    /// Complete checkpoints kept; older ones are deleted (the newest never is).
    pub keep_checkpoints: usize,
    /// `cpu`, `cuda`, or `auto` (CUDA when built with it and a GPU is present).
    pub device: String,
    /// Compute precision: `f32`, or `bf16` (bf16 weights and activations in the forward and
    /// backward passes; f32 master weights, gradients and optimizer state).
    pub dtype: String,
    /// Seconds a data-parallel rank waits for the others inside one collective (or at
    /// start-up) before it fails, naming the rank it waited for.
    pub dist_timeout_s: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 200,
            batch_size: 16,
            micro_batch_size: None,
            seq_len: 128,
            eval_every: 50,
            eval_batches: 4,
            log_every: 10,
            seed: 1337,
            threads: None,
            out: String::new(),
            checkpoint_every: 1000,
            keep_checkpoints: 3,
            device: "auto".into(),
            dtype: "f32".into(),
            dist_timeout_s: 1800,
        }
    }
}

impl TrainConfig {
    /// Micro-batch size after resolving the `None` default.
    pub fn micro_batch(&self) -> usize {
        self.micro_batch_size.unwrap_or(self.batch_size)
    }

    fn validate(&self) -> Result<()> {
        for (key, value) in [
            ("steps", self.steps),
            ("batch_size", self.batch_size),
            ("micro_batch_size", self.micro_batch()),
            ("seq_len", self.seq_len),
            ("eval_batches", self.eval_batches),
            ("log_every", self.log_every),
            ("threads", self.threads.unwrap_or(1)),
            ("keep_checkpoints", self.keep_checkpoints),
            ("dist_timeout_s", self.dist_timeout_s as usize),
        ] {
            if value == 0 {
                bail!("train.{key} must be a positive integer, got 0");
            }
        }
        if !self.batch_size.is_multiple_of(self.micro_batch()) {
            bail!(
                "train.micro_batch_size ({}) must divide train.batch_size ({})",
                self.micro_batch(),
                self.batch_size
            );
        }
        crate::device::DeviceKind::parse(&self.device)?;
        crate::device::compute_dtype(&self.dtype)?;
        Ok(())
    }
}

/// Where tokens come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// `builtin`, `text:PATH`, `shards:PATH`, `wikitext103` or `openwebtext`.
    pub train: String,
    /// Validation source; null holds out the tail of the training data.
    pub val: Option<String>,
    /// Fraction of the training tokens held out for validation when `val` is null.
    pub val_fraction: f64,
    /// `bytes`, a path to a `tokenizer.json`, or a hub repository name such as `gpt2`.
    pub tokenizer: String,
    /// Where `wikitext103` / `openwebtext` shards are prepared and looked for (null: under
    /// the Hugging Face hub cache).
    pub data_dir: Option<String>,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            train: "builtin".into(),
            val: None,
            val_fraction: 0.1,
            tokenizer: "bytes".into(),
            data_dir: None,
        }
    }
}

/// The BSFA wrapper (`--bsfa`); defaults from the paper's LLaMA-72M setting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BsfaConfig {
    /// Wrap the optimizer in BSFA.
    pub enabled: bool,
    /// Scale of the update inside the estimated dominant subspace.
    pub alpha: f64,
    /// Scale of the update in the bulk (the orthogonal complement).
    pub gamma: f64,
    /// Dominant directions per block (k).
    pub rank: usize,
    /// Updates kept per block for the PCA (l, more than `rank`).
    pub history: usize,
    /// Steps between re-estimations of the directions (T).
    pub interval: usize,
    /// Parameter groups BSFA applies to: any of `norm,attn,mlp` (embeddings and the output
    /// head never, as in the paper).
    pub blocks: String,
    /// Precision of the stored history and directions: 32 (the parameters' own) or 4.
    pub bits: usize,
}

impl Default for BsfaConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            alpha: 0.5,
            gamma: 1.5,
            rank: 30,
            history: 40,
            interval: 10,
            blocks: "norm,attn,mlp".into(),
            bits: 32,
        }
    }
}

impl BsfaConfig {
    /// The parameter groups named in `blocks`.
    pub fn groups(&self) -> Result<Vec<crate::model::ParamGroup>> {
        crate::optim::bsfa::parse_groups(&self.blocks)
    }

    fn validate(&self) -> Result<()> {
        if self.rank == 0 || self.rank >= self.history {
            bail!(
                "bsfa.rank ({}) must be at least 1 and below bsfa.history ({})",
                self.rank,
                self.history
            );
        }
        if self.interval == 0 {
            bail!("bsfa.interval must be a positive integer, got 0");
        }
        if self.bits != 32 && self.bits != 4 {
            bail!("bsfa.bits must be 32 or 4, got {}", self.bits);
        }
        if !non_negative(self.alpha) || !non_negative(self.gamma) {
            bail!(
                "bsfa.alpha ({}) and bsfa.gamma ({}) must be >= 0",
                self.alpha,
                self.gamma
            );
        }
        self.groups().map(|_| ())
    }
}

/// Image augmentation for ViT training; the defaults are the paper's recipe (Beyer et al.
/// 2022: random resized crop and flip, RandAugment 2 ops at magnitude 10, Mixup with Beta
/// parameter 0.2 on every batch).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// Smallest crop area of the random resized crop, as a fraction of the image.
    pub min_crop_scale: f64,
    /// Flip half the images left to right.
    pub hflip: bool,
    /// RandAugment operations per image (0 disables RandAugment).
    pub randaugment_ops: usize,
    /// RandAugment magnitude, 0 to 10 (strongest).
    pub randaugment_magnitude: f64,
    /// Mixup's Beta(alpha, alpha) parameter (0 disables Mixup).
    pub mixup_alpha: f64,
    /// CutMix's Beta(alpha, alpha) parameter (0 disables CutMix).
    pub cutmix_alpha: f64,
    /// Probability that a batch is mixed at all.
    pub mix_prob: f64,
    /// Label smoothing epsilon.
    pub label_smoothing: f64,
    /// Centre-crop fraction at evaluation; null: 0.875 for ImageNet (`imagenet:`,
    /// `parquet:`), 1 for the small sets.
    pub eval_crop_fraction: Option<f64>,
    /// Decoding and augmentation threads (0: every core).
    pub workers: usize,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            min_crop_scale: 0.08,
            hflip: true,
            randaugment_ops: 2,
            randaugment_magnitude: 10.0,
            mixup_alpha: 0.2,
            cutmix_alpha: 0.0,
            mix_prob: 1.0,
            label_smoothing: 0.0,
            eval_crop_fraction: None,
            workers: 0,
        }
    }
}

/// The fully resolved configuration of a run (written to `OUT/config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    pub model: ModelConfig,
    /// The ViT trained when `model.architecture` is `vit` (Hugging Face `ViTConfig` names).
    pub vit: crate::model::VitConfig,
    pub optimizer: OptimizerConfig,
    pub bsfa: BsfaConfig,
    pub train: TrainConfig,
    pub data: DataConfig,
    /// Image augmentation of ViT runs.
    pub augment: AugmentConfig,
}

impl RunConfig {
    /// What one optimizer step consumes, the unit of `tokens_per_s` and `tokens_seen`:
    /// tokens, or images for a ViT.
    pub fn units_per_step(&self) -> usize {
        if self.model.is_vit() {
            self.train.batch_size
        } else {
            self.train.batch_size * self.train.seq_len
        }
    }

    /// Checks every section; messages name the offending key.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        self.optimizer.validate()?;
        self.bsfa.validate()?;
        self.train.validate()?;
        if !positive(self.data.val_fraction) || self.data.val_fraction >= 1.0 {
            bail!(
                "data.val_fraction must be in (0, 1), got {}",
                self.data.val_fraction
            );
        }
        if self.model.is_vit() {
            return self.validate_vit();
        }
        if self.train.seq_len > self.model.max_position_embeddings {
            bail!(
                "train.seq_len ({}) exceeds model.max_position_embeddings ({}); lower \
                 --seq-len or raise model.max_position_embeddings",
                self.train.seq_len,
                self.model.max_position_embeddings
            );
        }
        Ok(())
    }
}

impl RunConfig {
    fn validate_vit(&self) -> Result<()> {
        self.vit.validate()?;
        let a = &self.augment;
        let unit = |x: f64| (0.0..=1.0).contains(&x);
        if !(a.min_crop_scale > 0.0 && a.min_crop_scale <= 1.0) {
            bail!(
                "augment.min_crop_scale must be in (0, 1], got {}",
                a.min_crop_scale
            );
        }
        if !(0.0..=10.0).contains(&a.randaugment_magnitude) {
            bail!(
                "augment.randaugment_magnitude must be in [0, 10], got {}",
                a.randaugment_magnitude
            );
        }
        if !non_negative(a.mixup_alpha) || !non_negative(a.cutmix_alpha) {
            bail!("augment.mixup_alpha and augment.cutmix_alpha must be >= 0");
        }
        if !unit(a.mix_prob) || !(0.0..1.0).contains(&a.label_smoothing) {
            bail!("augment.mix_prob must be in [0, 1] and augment.label_smoothing in [0, 1)");
        }
        if let Some(f) = a.eval_crop_fraction {
            if !(f > 0.0 && f <= 1.0) {
                bail!("augment.eval_crop_fraction must be in (0, 1], got {f}");
            }
        }
        Ok(())
    }
}

/// Builds a run config layer by layer; see the module docs for the order.
pub struct ConfigBuilder {
    value: Value,
    preset: String,
}

impl ConfigBuilder {
    /// Starts from the code defaults and the `--model` preset: a preset name, or a JSON
    /// file holding either a run config (`{"model": {...}, ...}`) or a flat Hugging Face
    /// `config.json` whose LLaMA keys become the `model` section.
    pub fn new(model: &str) -> Result<Self> {
        let mut builder = Self {
            value: serde_json::to_value(RunConfig::default())?,
            preset: String::new(),
        };
        if let Some((name, text)) = PRESETS.iter().find(|(name, _)| *name == model) {
            let layer: Value = serde_json::from_str(text)
                .with_context(|| format!("built-in preset '{name}' is not valid JSON"))?;
            builder.merge_layer(&layer, &format!("preset '{name}'"))?;
            builder.preset = (*name).to_string();
        } else if model.ends_with(".json") {
            let layer = read_json(model)?;
            let layer = if layer.get("model").is_some() {
                layer
            } else {
                hf_model_layer(&layer)
            };
            builder.merge_layer(&layer, model)?;
            builder.preset = std::path::Path::new(model)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "custom".into());
        } else {
            let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
            bail!(
                "unknown --model '{model}': use one of {} or a path to a .json config",
                names.join(", ")
            );
        }
        Ok(builder)
    }

    /// Merges a `--config run.json` file.
    pub fn merge_file(&mut self, path: &str) -> Result<()> {
        let layer = read_json(path)?;
        self.merge_layer(&layer, path)
    }

    /// Sets one dotted key from a typed value (used for dedicated CLI flags).
    pub fn set_value(&mut self, key: &str, value: Value) -> Result<()> {
        let slot = self.slot(key)?;
        check_type(key, slot, &value)?;
        *slot = value;
        Ok(())
    }

    /// Applies one `--set key=value`; the value is read as JSON when it parses as
    /// JSON, otherwise as a string.
    pub fn apply_set(&mut self, assignment: &str) -> Result<()> {
        let (key, raw) = assignment.split_once('=').with_context(|| {
            format!("--set expects key=value (e.g. model.hidden_size=128), got '{assignment}'")
        })?;
        let key = key.trim();
        let raw = raw.trim();
        let value = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string()));
        self.set_value(key, value)
    }

    /// The preset name (or file stem) the config started from.
    pub fn preset(&self) -> &str {
        &self.preset
    }

    /// Deserialises, fills the automatic output folder and validates.
    pub fn build(self) -> Result<RunConfig> {
        let mut config: RunConfig = serde_json::from_value(self.value)
            .context("the merged configuration does not have the expected types")?;
        if config.train.out.is_empty() {
            config.train.out = format!("runs/{}", self.preset);
        }
        config.validate()?;
        Ok(config)
    }

    fn merge_layer(&mut self, layer: &Value, source: &str) -> Result<()> {
        let mut keys = Vec::new();
        flatten_keys(layer, "", &mut keys);
        if keys.is_empty() && !layer.is_object() {
            bail!("{source}: expected a JSON object");
        }
        for (key, value) in keys {
            self.set_value(&key, value)
                .with_context(|| format!("in {source}"))?;
        }
        Ok(())
    }

    fn slot(&mut self, key: &str) -> Result<&mut Value> {
        let valid = valid_keys();
        let mut node = &mut self.value;
        for part in key.split('.') {
            node = match node.as_object_mut().and_then(|m| m.get_mut(part)) {
                Some(child) => child,
                None => bail!(
                    "unknown config key '{key}'; valid keys are: {}",
                    valid.join(", ")
                ),
            };
        }
        if node.is_object() {
            bail!(
                "config key '{key}' is a section, not a value; valid keys are: {}",
                valid.join(", ")
            );
        }
        Ok(node)
    }
}

/// Every settable dotted key, in declaration order.
pub fn valid_keys() -> Vec<String> {
    let defaults = serde_json::to_value(RunConfig::default()).expect("config serialises");
    let mut keys = Vec::new();
    flatten_keys(&defaults, "", &mut keys);
    keys.into_iter().map(|(k, _)| k).collect()
}

/// The dotted keys whose values differ between two configs, with the value in `a` and in `b`.
pub fn differences(a: &RunConfig, b: &RunConfig) -> Result<Vec<(String, Value, Value)>> {
    let (mut x, mut y) = (Vec::new(), Vec::new());
    flatten_keys(&serde_json::to_value(a)?, "", &mut x);
    flatten_keys(&serde_json::to_value(b)?, "", &mut y);
    // Both come from the same struct: the same keys in the same order.
    Ok(x.into_iter()
        .zip(y)
        .filter(|((_, va), (_, vb))| va != vb)
        .map(|((key, va), (_, vb))| (key, va, vb))
        .collect())
}

fn flatten_keys(value: &Value, prefix: &str, out: &mut Vec<(String, Value)>) {
    if let Value::Object(map) = value {
        for (k, v) in map {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            if v.is_object() {
                flatten_keys(v, &key, out);
            } else {
                out.push((key, v.clone()));
            }
        }
    }
}

/// Rejects a value whose JSON type differs from the key's, naming the key.
fn check_type(key: &str, current: &Value, value: &Value) -> Result<()> {
    let expected = match key {
        // Optional integers: null or a whole number.
        "model.num_key_value_heads" | "train.micro_batch_size" | "train.threads" => {
            if value.is_null() || value.is_u64() {
                return Ok(());
            }
            "a non-negative integer (or null)"
        }
        "augment.eval_crop_fraction" => {
            if value.is_null() || value.is_number() {
                return Ok(());
            }
            "a number (or null)"
        }
        "data.val" | "data.data_dir" => {
            if value.is_null() || value.is_string() {
                return Ok(());
            }
            "a string (or null)"
        }
        _ => match current {
            Value::Number(n) if n.is_u64() => {
                if value.is_u64() {
                    return Ok(());
                }
                "a non-negative integer"
            }
            Value::Number(_) => {
                if value.is_number() {
                    return Ok(());
                }
                "a number"
            }
            Value::Bool(_) => {
                if value.is_boolean() {
                    return Ok(());
                }
                "true or false"
            }
            Value::String(_) => {
                if value.is_string() {
                    return Ok(());
                }
                "a string"
            }
            _ => return Ok(()),
        },
    };
    bail!("malformed value {value} for config key '{key}': expected {expected}")
}

fn read_json(path: &str) -> Result<Value> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file '{path}'"))?;
    serde_json::from_str(&text).with_context(|| format!("'{path}' is not valid JSON"))
}

/// Picks the LLaMA keys out of a flat Hugging Face `config.json`; the rest of such a
/// file (architectures, torch_dtype, ...) describes nothing we build and is ignored.
fn hf_model_layer(flat: &Value) -> Value {
    let known = serde_json::to_value(ModelConfig::default()).expect("config serialises");
    let mut model = Map::new();
    if let (Some(flat), Some(known)) = (flat.as_object(), known.as_object()) {
        for (k, v) in flat {
            if known.contains_key(k) {
                model.insert(k.clone(), v.clone());
            }
        }
    }
    serde_json::json!({ "model": model })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_parse_and_validate() {
        for (name, _) in PRESETS {
            let config = ConfigBuilder::new(name).unwrap().build().unwrap();
            config.validate().unwrap();
        }
    }

    #[test]
    fn set_overrides_and_rejects_unknown_keys() {
        let mut b = ConfigBuilder::new("tiny").unwrap();
        b.apply_set("model.hidden_size=64").unwrap();
        b.apply_set("optimizer.weight_decay=0").unwrap();
        let err = b.apply_set("model.hiden_size=64").unwrap_err().to_string();
        assert!(err.contains("model.hiden_size") && err.contains("model.hidden_size"));
        let err = b
            .apply_set("model.hidden_size=abc")
            .unwrap_err()
            .to_string();
        assert!(err.contains("malformed"), "{err}");
        let err = b.apply_set("model.hidden_size=-3").unwrap_err().to_string();
        assert!(err.contains("non-negative integer"), "{err}");
        let c = b.build().unwrap();
        assert_eq!(c.model.hidden_size, 64);
        assert_eq!(c.optimizer.weight_decay, 0.0);
        assert_eq!(c.train.out, "runs/tiny");
    }

    #[test]
    fn heads_must_divide_hidden() {
        let mut b = ConfigBuilder::new("tiny").unwrap();
        b.apply_set("model.num_attention_heads=5").unwrap();
        let err = b.build().unwrap_err().to_string();
        assert!(err.contains("must divide model.hidden_size"), "{err}");
    }
}
