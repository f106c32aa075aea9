//! Adam-mini's partition of our networks' parameters into second-moment blocks, by their
//! Hugging Face names: what each network's [`super::ModelSpec::adam_mini_block`] answers.
//!
//! Adam-mini's partition, mapped to our Hugging Face parameter names (its rules match
//! lower-cased name substrings, checked in this order):
//!
//! | parameter | rule (1.1.1) | one second moment per |
//! |---|---|---|
//! | `self_attn.q_proj`, `self_attn.k_proj` | `q_proj`, `k_proj` | head: `hidden*hidden/heads` elements (a key/value head under grouped-query attention) |
//! | `embed_tokens`, `lm_head` | `embed`, `lm_head` | row (token) |
//! | `self_attn.v_proj`, `self_attn.o_proj` | `v_proj`, `o_proj` | row (output neuron) |
//! | `mlp.gate_proj`, `mlp.up_proj`, `mlp.down_proj` | `mlp` | row (output neuron) |
//! | `input_layernorm`, `post_attention_layernorm`, `model.norm` | anything else | whole tensor |
//!

use super::{LlamaConfig, VitConfig};
use anyhow::{bail, Result};

/// Elements per second-moment block of a parameter under Adam-mini 1.1.1's partition.
pub fn adam_mini_block(name: &str, dims: &[usize], model: &LlamaConfig) -> Result<usize> {
    let name = name.to_lowercase();
    let has = |keys: &[&str]| keys.iter().any(|k| name.contains(k));
    let numel: usize = dims.iter().product();
    let block = if has(&["bias"]) {
        1
    } else if has(&["k_proj", "q_proj", "wq", "wk", "query", "key"]) {
        model.hidden_size * model.hidden_size / model.num_attention_heads
    } else if has(&[
        "embed",
        "embd",
        "wte",
        "lm_head",
        "output",
        "final_layer",
        "v_proj",
        "wv",
        "value",
        "o_proj",
        "wo",
        "attn.proj",
        "feed_forward",
        "linear",
        "mlp",
    ]) {
        match dims {
            [_, cols] => *cols,
            _ => bail!("adam-mini: '{name}' should be a matrix, got shape {dims:?}"),
        }
    } else {
        numel
    };
    if block == 0 || !numel.is_multiple_of(block) {
        bail!("adam-mini: '{name}' ({numel} elements) does not split into blocks of {block}");
    }
    Ok(block)
}

/// Elements per second-moment block of a ViT parameter (Hugging Face names). Adam-mini's
/// rules carried over to vision: query and key per head; every other matrix per output
/// neuron (row); the patch embedding per output channel (a convolution kernel); the class
/// token and position embeddings per token (row), as token embeddings are; biases per
/// element; each LayerNorm weight one block.
pub fn adam_mini_vit_block(name: &str, dims: &[usize], vit: &VitConfig) -> Result<usize> {
    let numel: usize = dims.iter().product();
    let block = if name.ends_with(".bias") {
        1
    } else if name.contains("attention.attention.query") || name.contains("attention.attention.key")
    {
        vit.head_dim() * vit.hidden_size
    } else if name.contains("patch_embeddings") {
        numel / dims.first().copied().unwrap_or(1).max(1)
    } else if dims.len() >= 2 {
        dims[dims.len() - 1]
    } else {
        numel
    };
    if block == 0 || !numel.is_multiple_of(block) {
        bail!("adam-mini: '{name}' ({numel} elements) does not split into blocks of {block}");
    }
    Ok(block)
}
