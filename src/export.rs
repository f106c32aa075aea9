//! `bsfa-train export`: a checkpoint as a Hugging Face `LlamaForCausalLM` folder
//! (`config.json`, `model.safetensors`, and `tokenizer.json` when the run used one). Every
//! file comes from inside the checkpoint: the export is for upload, and a path that a
//! checkpoint names must not pull other local files into it.

use crate::checkpoint::{self, Checkpoint};
use crate::data::Tokenizer;
use crate::model::{Llama, LlamaConfig, Param};
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
/// `dir`. The folder is assembled in `<out>.export-tmp` (which must not exist) and renamed
/// when complete.
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

    let temp = claim_temp_folder(out)?;
    let written = write_folder(&temp, &params, &ck);
    let files = match written.and_then(|files| move_into(&temp, out).map(|()| files)) {
        Ok(files) => files,
        Err(e) => {
            // Ours, created above: a failed export leaves nothing behind.
            let _ = std::fs::remove_dir_all(&temp);
            return Err(e);
        }
    };
    Ok(ExportReport {
        out: out.display().to_string(),
        step: ck.state.step,
        files,
    })
}

/// Creates the empty folder `<out>.export-tmp` that the export is assembled in. One that
/// exists already is not ours to delete (another export may be writing it, or it holds
/// someone's files): that is an error naming it.
fn claim_temp_folder(out: &Path) -> Result<PathBuf> {
    let mut name = out.file_name().unwrap_or(out.as_os_str()).to_os_string();
    name.push(".export-tmp");
    let temp = out.with_file_name(name);
    if let Some(parent) = temp.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create '{}'", parent.display()))?;
    }
    match std::fs::create_dir(&temp) {
        Ok(()) => Ok(temp),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => bail!(
            "'{}' already exists: export assembles '{}' there and deletes nothing it did not \
             create; if it is a leftover of an interrupted export (and no export is running), \
             remove it by hand and export again",
            temp.display(),
            out.display()
        ),
        Err(e) => Err(e).with_context(|| format!("cannot create '{}'", temp.display())),
    }
}

/// Writes the export's files into `temp`; returns their names.
fn write_folder(temp: &Path, params: &[Param], ck: &Checkpoint) -> Result<Vec<String>> {
    let config = &ck.state.config;
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
    std::fs::write(temp.join("config.json"), hf_config)
        .with_context(|| format!("cannot write '{}'", temp.join("config.json").display()))?;
    let mut files = vec!["config.json".to_string(), "model.safetensors".to_string()];
    let spec = &config.data.tokenizer;
    match ck.tokenizer_file()? {
        Some(file) => {
            // Only a tokenizer goes into the export, whatever else a file of that name holds.
            Tokenizer::load(&file.to_string_lossy())?;
            std::fs::copy(&file, temp.join(checkpoint::TOKENIZER_FILE))
                .with_context(|| format!("cannot copy '{}'", file.display()))?;
            files.push(checkpoint::TOKENIZER_FILE.into());
        }
        None if spec == "bytes" => eprintln!(
            "note: no tokenizer.json exported (the run used the bytes tokenizer, which maps \
             each UTF-8 byte to its value)"
        ),
        None => eprintln!(
            "note: no tokenizer.json exported: '{}' holds none (written by an older version); \
             copy the run's tokenizer ('{spec}') into the export yourself",
            ck.dir.display()
        ),
    }
    Ok(files)
}

/// Renames the finished `temp` to `out`, which is missing or an empty folder.
fn move_into(temp: &Path, out: &Path) -> Result<()> {
    if out.exists() {
        // Only an empty folder: remove_dir fails on anything else.
        std::fs::remove_dir(out)
            .with_context(|| format!("cannot replace the empty folder '{}'", out.display()))?;
    }
    std::fs::rename(temp, out)
        .with_context(|| format!("cannot move the export into '{}'", out.display()))
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
