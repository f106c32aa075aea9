//! `bsfa-train export`: a checkpoint as a Hugging Face `LlamaForCausalLM` folder
//! (`config.json`, `model.safetensors`, and `tokenizer.json` when the run used one).

use crate::checkpoint::{self, Checkpoint};
use crate::model::Llama;
use crate::model::LlamaConfig;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// What `export` wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportReport {
    pub out: String,
    pub step: usize,
    pub files: Vec<String>,
}

/// Writes the Hugging Face folder `out` (which must not exist or be empty) from checkpoint
/// `dir`. The folder is assembled under a temporary name and renamed when complete.
pub fn run(dir: &Path, out: &Path) -> Result<ExportReport> {
    if out.exists() && out.read_dir().map_or(true, |mut d| d.next().is_some()) {
        bail!(
            "export folder '{}' already exists and is not empty; choose another --out or \
             delete it",
            out.display()
        );
    }
    let ck = Checkpoint::open_llama(dir, "export")?;
    let config = &ck.state.config;
    // Building the model and loading into it checks every tensor's name and shape.
    let (_, params) = Llama::new(&config.model, DType::F32, &Device::Cpu, 0)?;
    ck.load_model(&params)?;

    let temp = out.with_extension("export-tmp");
    if temp.exists() {
        std::fs::remove_dir_all(&temp)?;
    }
    std::fs::create_dir_all(&temp)
        .with_context(|| format!("cannot create '{}'", temp.display()))?;
    let weights: Vec<(String, Tensor)> = params
        .iter()
        .map(|p| (p.name.clone(), p.var.as_tensor().clone()))
        .collect();
    checkpoint::write_safetensors(
        &temp.join("model.safetensors"),
        &weights,
        &[("format", "pt")],
    )?;
    let hf_config = serde_json::to_string_pretty(&hf_config(&config.model))?;
    std::fs::write(temp.join("config.json"), hf_config)?;
    let mut files = vec!["config.json".to_string(), "model.safetensors".to_string()];
    match tokenizer_file(&config.data.tokenizer) {
        Some(file) => {
            std::fs::copy(&file, temp.join("tokenizer.json"))
                .with_context(|| format!("cannot copy '{}'", file.display()))?;
            files.push("tokenizer.json".into());
        }
        None => eprintln!(
            "note: no tokenizer.json exported (the run used '{}'; the bytes tokenizer maps \
             each UTF-8 byte to its value)",
            config.data.tokenizer
        ),
    }
    if out.exists() {
        std::fs::remove_dir(out)?;
    }
    std::fs::rename(&temp, out)
        .with_context(|| format!("cannot move the export into '{}'", out.display()))?;
    Ok(ExportReport {
        out: out.display().to_string(),
        step: ck.state.step,
        files,
    })
}

/// `config.json` of `LlamaForCausalLM` with our model's values.
pub fn hf_config(model: &LlamaConfig) -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.intermediate_size,
        "num_hidden_layers": model.num_hidden_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.kv_heads(),
        "head_dim": model.head_dim(),
        "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.rms_norm_eps,
        "rope_theta": model.rope_theta,
        "rope_scaling": null,
        "tie_word_embeddings": model.tie_word_embeddings,
        "initializer_range": model.initializer_range,
        "hidden_act": "silu",
        "attention_bias": false,
        "attention_dropout": 0.0,
        "mlp_bias": false,
        "torch_dtype": "float32",
    })
}

/// The `tokenizer.json` a run's tokenizer spec refers to, when it is one on this machine
/// (a file, a folder holding one, or a hub name already in the local cache).
fn tokenizer_file(spec: &str) -> Option<PathBuf> {
    if spec == "bytes" {
        return None;
    }
    let path = Path::new(spec);
    if path.is_file() {
        return Some(path.to_path_buf());
    }
    if path.join("tokenizer.json").is_file() {
        return Some(path.join("tokenizer.json"));
    }
    hf_hub::Cache::from_env()
        .model(spec.to_string())
        .get("tokenizer.json")
}
