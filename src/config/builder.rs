//! [`ConfigBuilder`]: a run's config resolved layer by layer (see the module docs of
//! [`super`]), each value type-checked as it is set.

use super::{flatten_keys, valid_keys, RunConfig, PRESETS};
use anyhow::{bail, Context, Result};
use serde_json::Value;

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
                    crate::model::llama::check_hf_supported(&layer, std::path::Path::new(model))?;
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

    /// Merges a `--config run.json` file: each of its keys is set as if by `--set`.
    pub fn merge_file(&mut self, path: &str) -> Result<()> {
        for (key, value) in layer_keys(&read_json(path)?, path)? {
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
    for (key, value) in layer_keys(layer, source)? {
        assign(root, &key, value).with_context(|| format!("in {source}"))?;
    }
    Ok(())
}

/// The dotted keys a layer sets, with their values; a layer that is not a JSON object is
/// an error naming `source`.
fn layer_keys(layer: &Value, source: &str) -> Result<Vec<(String, Value)>> {
    if !layer.is_object() {
        bail!("{source}: expected a JSON object");
    }
    let mut keys = Vec::new();
    flatten_keys(layer, "", &mut keys);
    Ok(keys)
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
    use crate::device::{Kernels, Precision};

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
    fn fused_kernels_are_refused_on_the_cpu_in_bf16_only() {
        let build = |sets: &[&str]| {
            let mut b = ConfigBuilder::new("tiny").unwrap();
            b.apply_set("train.kernels=fused").unwrap();
            for set in sets {
                b.apply_set(set).unwrap();
            }
            b.build()
        };
        let err = build(&["train.device=cpu", "train.dtype=bf16"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("train.kernels = fused") && err.contains("--dtype f32"),
            "{err}"
        );
        // On a GPU, `fused` means our GPU kernels (a failed self-check is an error), in bf16
        // too; an `auto` device or precision passes until resolved.
        build(&["train.device=cuda", "train.dtype=bf16"]).unwrap();
        build(&["train.device=auto", "train.dtype=bf16"]).unwrap();
        let config = build(&["train.dtype=auto"]).unwrap();
        let cpu = candle_core::Device::Cpu;
        let on_cpu = config.on_device(&cpu).train;
        assert!(on_cpu.kernels.check(true, on_cpu.dtype).is_ok());
        assert!(Kernels::Fused.check(true, Precision::Bf16).is_err());
        assert!(Kernels::Fused.check(false, Precision::Bf16).is_ok());
    }

    /// A Hugging Face `config.json` of another architecture (or with settings our LLaMA
    /// lacks) is refused by `--model`, naming the key, as `sample` refuses it.
    #[test]
    fn a_hugging_face_config_of_another_model_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for (key, value) in [
            ("model_type", "\"gpt2\""),
            ("hidden_act", "\"gelu\""),
            ("mlp_bias", "true"),
            ("rope_scaling", "{\"type\": \"linear\", \"factor\": 2.0}"),
        ] {
            let path = dir.path().join(format!("{key}.json"));
            let text =
                format!("{{\"hidden_size\": 64, \"num_attention_heads\": 4, \"{key}\": {value}}}");
            std::fs::write(&path, text).unwrap();
            let err = ConfigBuilder::new(path.to_str().unwrap())
                .err()
                .map(|e| e.to_string());
            assert!(
                err.as_deref().is_some_and(|e| e.contains(key)),
                "{key}: {err:?}"
            );
        }
        let plain = dir.path().join("llama.json");
        std::fs::write(
            &plain,
            r#"{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4}"#,
        )
        .unwrap();
        ConfigBuilder::new(plain.to_str().unwrap()).unwrap();
    }

    #[test]
    fn heads_must_divide_hidden() {
        let mut b = ConfigBuilder::new("tiny").unwrap();
        b.apply_set("model.num_attention_heads=5").unwrap();
        let err = b.build().unwrap_err().to_string();
        assert!(err.contains("must divide model.hidden_size"), "{err}");
    }
}
