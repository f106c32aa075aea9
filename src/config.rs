//! The typed run configuration and how it is resolved.
//!
//! A run's config is built in layers, each a JSON object with the same keys:
//! code defaults, then the `--model` preset (`configs/*.json`), then the preset's
//! `with_bsfa` section when BSFA ends up enabled (the paper's BSFA run of that model: its
//! base optimizer, k, l, T, alpha, gamma and steps), then `--config FILE`, then the
//! dedicated CLI flags (`--lr`, `--steps`, ...), then every `--set key=value`.
//! Each value is type-checked as it is set (against the section types that the components
//! own), and ranges are validated once all layers are merged, so every error names the key
//! a user typed.

use crate::data::images::augment_config::AugmentConfig;
use crate::data::loader::LoaderShape;
use crate::data::DataConfig;
use crate::device::{DeviceKind, Kernels, Precision};
use crate::model::{self, LlamaConfig, ModelSpec, VitConfig};
use crate::optim::{BsfaConfig, OptimizerConfig};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::presets::PRESETS;

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
    pub device: DeviceKind,
    /// Compute precision: `f32`, `bf16` (bf16 weights and activations in the forward and
    /// backward passes; f32 master weights, gradients and optimizer state), or `auto` (bf16
    /// on CUDA, f32 on the CPU).
    pub dtype: Precision,
    /// `auto` (the fused CPU kernels where they apply), `fused` (those, or an error), or
    /// `reference` (the CPU runs the candle compositions a CUDA run executes). Process-wide:
    /// see [`Kernels::apply`].
    pub kernels: Kernels,
    /// Seconds a data-parallel rank waits for the others inside one collective (or at
    /// start-up) before it fails, naming the rank it waited for.
    pub dist_timeout_s: u64,
    /// Mirror every metrics line into TensorBoard event files in `OUT/tb/`.
    pub tensorboard: bool,
    /// Peak dense TFLOP/s of one rank's device, for MFU (null: a known GPU's datasheet
    /// figure, or measured on the CPU).
    pub peak_tflops: Option<f64>,
    /// Let CUDA's f32 matrix products run on TF32 tensor cores (PyTorch's `allow_tf32`):
    /// several times faster, with 10-bit mantissas in the products. Off by default, as in
    /// PyTorch; no effect on the CPU or in bf16.
    pub tf32: bool,
    /// Trace this many training steps (after the first) into `OUT/trace.json`, a Chrome /
    /// Perfetto trace (0: none).
    pub profile_steps: usize,
    /// LLaMA runs: every N steps (and after the last) the model continues `sample_prompt`
    /// with `sample_tokens` tokens, printed and logged to `metrics.jsonl` (0: never).
    pub sample_every: usize,
    /// The text training samples continue.
    pub sample_prompt: String,
    /// Tokens each training sample writes.
    pub sample_tokens: usize,
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
            device: DeviceKind::Auto,
            dtype: Precision::F32,
            kernels: Kernels::Auto,
            dist_timeout_s: 1800,
            tensorboard: true,
            peak_tflops: None,
            tf32: false,
            profile_steps: 0,
            sample_every: 0,
            sample_prompt: "The".into(),
            sample_tokens: 64,
        }
    }
}

impl TrainConfig {
    /// Micro-batch size after resolving the `None` default.
    pub fn micro_batch(&self) -> usize {
        self.micro_batch_size.unwrap_or(self.batch_size)
    }

    /// Sequences (or images) per forward/backward pass on one of `world` ranks: an unset
    /// `micro_batch_size` means each rank's whole share at once.
    pub fn micro_batch_per_rank(&self, world: usize) -> usize {
        self.micro_batch_size
            .unwrap_or(self.batch_size / world.max(1))
    }

    /// How the token loader shapes and splits each step's batch for `rank` of `world`.
    pub fn loader_shape(&self, rank: usize, world: usize) -> LoaderShape {
        LoaderShape {
            global_batch: self.batch_size,
            micro_batch: self.micro_batch_per_rank(world),
            seq_len: self.seq_len,
            rank,
            world,
        }
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
            ("sample_tokens", self.sample_tokens),
        ] {
            if value == 0 {
                bail!("train.{key} must be a positive integer, got 0");
            }
        }
        if self
            .peak_tflops
            .is_some_and(|p| !(p > 0.0 && p.is_finite()))
        {
            bail!("train.peak_tflops must be a positive number of TFLOP/s");
        }
        if self.sample_every > 0 && self.sample_prompt.is_empty() {
            bail!("train.sample_prompt is empty: samples continue a text, give it one");
        }
        if !self.batch_size.is_multiple_of(self.micro_batch()) {
            bail!(
                "train.micro_batch_size ({}) must divide train.batch_size ({})",
                self.micro_batch(),
                self.batch_size
            );
        }
        // `auto` devices and precisions are checked again once resolved, when a run starts.
        self.kernels
            .check(self.device != DeviceKind::Cuda, self.dtype)
    }
}

/// The fully resolved configuration of a run (written to `OUT/config.json`): one section
/// per component, each owned and validated by its component.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// The LLaMA architecture, and which architecture the run trains.
    pub model: LlamaConfig,
    /// The ViT trained when `model.architecture` is `vit` (Hugging Face `ViTConfig` names).
    pub vit: VitConfig,
    /// The base optimizer and the learning-rate schedule.
    pub optimizer: OptimizerConfig,
    /// The BSFA wrapper around the base optimizer.
    pub bsfa: BsfaConfig,
    /// The loop: steps, batch shape, evaluation, checkpoints, device.
    pub train: TrainConfig,
    /// Where tokens (or images) come from.
    pub data: DataConfig,
    /// Image augmentation of ViT runs.
    pub augment: AugmentConfig,
}

impl RunConfig {
    /// The network this run trains, as everything outside `task/` sees it.
    pub fn spec(&self) -> &dyn ModelSpec {
        model::spec::select(&self.model, &self.vit)
    }

    /// What one optimizer step consumes, the unit of `tokens_per_s` and `tokens_seen`:
    /// tokens, or images for a ViT.
    pub fn units_per_step(&self) -> usize {
        self.train.batch_size * self.spec().units_per_example(self.train.seq_len)
    }

    /// This config as it runs on `device`: `train.dtype = auto` resolved.
    pub fn on_device(&self, device: &candle_core::Device) -> Self {
        let mut config = self.clone();
        config.train.dtype = self.precision_on(device.is_cuda());
        config
    }

    /// `train.dtype` resolved for a GPU (`gpu = true`) or for the CPU (`false`): `auto` is
    /// bf16 on a GPU and f32 on the CPU, or what the network has (a ViT: f32).
    pub fn precision_on(&self, gpu: bool) -> Precision {
        self.spec().precision(self.train.dtype, gpu)
    }

    /// Checks every section, then what sections must agree on; messages name the key.
    pub fn validate(&self) -> Result<()> {
        self.optimizer.validate()?;
        self.bsfa.validate()?;
        self.train.validate()?;
        self.data.validate()?;
        self.spec().check_shape(self.train.seq_len)?;
        // Checked for every run, though only image runs augment: a bad value is an error
        // wherever it is set.
        self.augment.validate()
    }
}

/// The key of a preset's layer that applies only when BSFA is enabled.
pub const WITH_BSFA: &str = "with_bsfa";

/// Builds a run config layer by layer; see the module docs for the order.
pub struct ConfigBuilder {
    /// Every layer merged so far.
    value: Value,
    /// The code defaults and the preset alone (without its `with_bsfa` layer).
    preset_value: Value,
    /// The preset's `with_bsfa` layer, if it has one.
    with_bsfa: Option<Value>,
    /// Every assignment made after the preset, in order, to replay over `with_bsfa`.
    assignments: Vec<(String, Value)>,
    preset: String,
}

impl ConfigBuilder {
    /// Starts from the code defaults and the `--model` preset: a preset name, or a JSON
    /// file holding either a run config (`{"model": {...}, ...}`) or a flat Hugging Face
    /// `config.json` whose LLaMA keys become the `model` section.
    pub fn new(model: &str) -> Result<Self> {
        let (mut layer, source, preset) =
            if let Some((name, text)) = PRESETS.iter().find(|(name, _)| *name == model) {
                let layer: Value = serde_json::from_str(text)
                    .with_context(|| format!("built-in preset '{name}' is not valid JSON"))?;
                (layer, format!("preset '{name}'"), name.to_string())
            } else if model.ends_with(".json") {
                let layer = read_json(model)?;
                let layer = if layer.get("model").is_some() {
                    layer
                } else {
                    crate::model::llama::hf_model_layer(&layer)
                };
                let stem = std::path::Path::new(model)
                    .file_stem()
                    .map_or_else(|| "custom".into(), |s| s.to_string_lossy().into_owned());
                (layer, model.to_string(), stem)
            } else {
                let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
                bail!(
                    "unknown --model '{model}': use one of {} or a path to a .json config",
                    names.join(", ")
                );
            };
        let with_bsfa = layer.as_object_mut().and_then(|m| m.remove(WITH_BSFA));
        let mut value = serde_json::to_value(RunConfig::default())?;
        merge(&mut value, &layer, &source)?;
        if let Some(overlay) = &with_bsfa {
            // Checked now, so that a broken layer fails whether or not BSFA is enabled.
            merge(
                &mut value.clone(),
                overlay,
                &format!("{source}, section '{WITH_BSFA}'"),
            )?;
        }
        Ok(Self {
            preset_value: value.clone(),
            value,
            with_bsfa,
            assignments: Vec::new(),
            preset,
        })
    }

    /// Merges a `--config run.json` file.
    pub fn merge_file(&mut self, path: &str) -> Result<()> {
        let layer = read_json(path)?;
        let mut keys = Vec::new();
        flatten_keys(&layer, "", &mut keys);
        if keys.is_empty() && !layer.is_object() {
            bail!("{path}: expected a JSON object");
        }
        for (key, value) in keys {
            self.set_value(&key, value)
                .with_context(|| format!("in {path}"))?;
        }
        Ok(())
    }

    /// Sets one dotted key from a typed value (used for dedicated CLI flags).
    pub fn set_value(&mut self, key: &str, value: Value) -> Result<()> {
        assign(&mut self.value, key, value.clone())?;
        self.assignments.push((key.to_string(), value));
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

    /// Applies the preset's `with_bsfa` layer when BSFA is enabled, deserialises, fills the
    /// automatic output folder and validates.
    pub fn build(mut self) -> Result<RunConfig> {
        let enabled = self.value["bsfa"]["enabled"] == Value::Bool(true);
        if let (true, Some(overlay)) = (enabled, &self.with_bsfa) {
            // The layer sits between the preset and everything the user set.
            let mut value = self.preset_value.clone();
            merge(&mut value, overlay, WITH_BSFA)?;
            for (key, v) in &self.assignments {
                assign(&mut value, key, v.clone())?;
            }
            self.value = value;
        }
        let mut config: RunConfig = serde_json::from_value(self.value)
            .context("the merged configuration does not have the expected types")?;
        if config.train.out.is_empty() {
            config.train.out = format!("runs/{}", self.preset);
        }
        config.validate()?;
        Ok(config)
    }
}

/// Merges every key of `layer` into `root`; errors name `source`.
fn merge(root: &mut Value, layer: &Value, source: &str) -> Result<()> {
    let mut keys = Vec::new();
    flatten_keys(layer, "", &mut keys);
    if keys.is_empty() && !layer.is_object() {
        bail!("{source}: expected a JSON object");
    }
    for (key, value) in keys {
        assign(root, &key, value).with_context(|| format!("in {source}"))?;
    }
    Ok(())
}

/// Sets the dotted `key` of `root` to `value`, which must have the key's type.
fn assign(root: &mut Value, key: &str, value: Value) -> Result<()> {
    let shown = value.to_string();
    let previous = std::mem::replace(slot(root, key)?, value);
    // Every earlier value was accepted, so a type error can only be this key's; the
    // section types say what each key takes (serde lists an enum's spellings).
    if let Err(e) = serde_path_to_error::deserialize::<_, RunConfig>(&*root) {
        *slot(root, key)? = previous;
        bail!(
            "malformed value {shown} for config key '{key}': {}",
            readable(&e.inner().to_string())
        );
    }
    Ok(())
}

/// The value of the dotted `key` in `root`; an unknown key or a section is an error that
/// lists the valid keys.
fn slot<'a>(root: &'a mut Value, key: &str) -> Result<&'a mut Value> {
    let valid = valid_keys();
    let mut node = root;
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

/// serde's message with Rust's type names said the way a user reads them.
fn readable(message: &str) -> String {
    message
        .replace("expected usize", "expected a non-negative integer")
        .replace("expected u64", "expected a non-negative integer")
        .replace("expected f64", "expected a number")
        .replace("expected a boolean", "expected true or false")
}

fn read_json(path: &str) -> Result<Value> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file '{path}'"))?;
    serde_json::from_str(&text).with_context(|| format!("'{path}' is not valid JSON"))
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
    fn fused_kernels_are_refused_on_a_gpu_or_in_bf16() {
        for (set, fix) in [
            ("train.device=cuda", "--device cpu"),
            ("train.dtype=bf16", "--dtype f32"),
        ] {
            let mut b = ConfigBuilder::new("tiny").unwrap();
            b.apply_set("train.kernels=fused").unwrap();
            b.apply_set(set).unwrap();
            let err = b.build().unwrap_err().to_string();
            assert!(
                err.contains("train.kernels = fused") && err.contains(fix),
                "{err}"
            );
        }
        // `auto` passes until resolved: f32 on the CPU, which the fused kernels serve.
        let mut b = ConfigBuilder::new("tiny").unwrap();
        b.apply_set("train.kernels=fused").unwrap();
        b.apply_set("train.dtype=auto").unwrap();
        let config = b.build().unwrap();
        let cpu = candle_core::Device::Cpu;
        let on_cpu = config.on_device(&cpu).train;
        assert!(on_cpu.kernels.check(true, on_cpu.dtype).is_ok());
        assert!(Kernels::Fused.check(true, Precision::Bf16).is_err());
    }

    #[test]
    fn heads_must_divide_hidden() {
        let mut b = ConfigBuilder::new("tiny").unwrap();
        b.apply_set("model.num_attention_heads=5").unwrap();
        let err = b.build().unwrap_err().to_string();
        assert!(err.contains("must divide model.hidden_size"), "{err}");
    }
}
