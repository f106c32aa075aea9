//! LLaMA (RMSNorm, RoPE, SwiGLU, causal grouped-query attention) for training.
//!
//! Parameter names match Hugging Face `LlamaForCausalLM`, so weights map 1:1.

use super::ops::{
    causal_mask, cross_entropy, linear, rms_norm, rope, rope_tables, softmax_last_dim,
};
use super::{Param, ParamGroup, ParamInit};
use crate::config::ModelConfig;
use candle_core::{DType, Device, Result, Tensor};

struct Attention {
    q_proj: Tensor,
    k_proj: Tensor,
    v_proj: Tensor,
    o_proj: Tensor,
}

struct Mlp {
    gate_proj: Tensor,
    up_proj: Tensor,
    down_proj: Tensor,
}

struct Block {
    input_layernorm: Tensor,
    self_attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
}

/// A LLaMA causal language model.
pub struct Llama {
    config: ModelConfig,
    embed_tokens: Tensor,
    layers: Vec<Block>,
    norm: Tensor,
    lm_head: Tensor,
    cos: Tensor,
    sin: Tensor,
}

impl Llama {
    /// Builds a model with freshly initialised weights (normal with
    /// `initializer_range` for matrices, ones for norms, as Hugging Face does) and
    /// returns it with its parameters in a fixed order.
    pub fn new(
        config: &ModelConfig,
        dtype: DType,
        device: &Device,
        seed: u64,
    ) -> Result<(Self, Vec<Param>)> {
        let h = config.hidden_size;
        let kv = config.kv_heads() * config.head_dim();
        let inter = config.intermediate_size;
        let std = config.initializer_range;
        let mut init = ParamInit::new(seed, dtype, device);
        let embed_tokens = init.normal(
            "model.embed_tokens.weight",
            ParamGroup::Embeddings,
            config.vocab_size,
            h,
            std,
        )?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let attn = ParamGroup::Attention;
            let mlp = ParamGroup::Mlp;
            layers.push(Block {
                input_layernorm: init.ones(
                    &format!("{p}.input_layernorm.weight"),
                    ParamGroup::Norms,
                    h,
                )?,
                self_attn: Attention {
                    q_proj: init.normal(
                        &format!("{p}.self_attn.q_proj.weight"),
                        attn,
                        h,
                        h,
                        std,
                    )?,
                    k_proj: init.normal(
                        &format!("{p}.self_attn.k_proj.weight"),
                        attn,
                        kv,
                        h,
                        std,
                    )?,
                    v_proj: init.normal(
                        &format!("{p}.self_attn.v_proj.weight"),
                        attn,
                        kv,
                        h,
                        std,
                    )?,
                    o_proj: init.normal(
                        &format!("{p}.self_attn.o_proj.weight"),
                        attn,
                        h,
                        h,
                        std,
                    )?,
                },
                post_attention_layernorm: init.ones(
                    &format!("{p}.post_attention_layernorm.weight"),
                    ParamGroup::Norms,
                    h,
                )?,
                mlp: Mlp {
                    gate_proj: init.normal(
                        &format!("{p}.mlp.gate_proj.weight"),
                        mlp,
                        inter,
                        h,
                        std,
                    )?,
                    up_proj: init.normal(&format!("{p}.mlp.up_proj.weight"), mlp, inter, h, std)?,
                    down_proj: init.normal(
                        &format!("{p}.mlp.down_proj.weight"),
                        mlp,
                        h,
                        inter,
                        std,
                    )?,
                },
            });
        }
        let norm = init.ones("model.norm.weight", ParamGroup::Norms, h)?;
        let lm_head = if config.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            init.normal(
                "lm_head.weight",
                ParamGroup::Head,
                config.vocab_size,
                h,
                std,
            )?
        };
        let (cos, sin) = rope_tables(
            config.head_dim(),
            config.max_position_embeddings,
            config.rope_theta,
            dtype,
            device,
        )?;
        let model = Self {
            config: config.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            cos,
            sin,
        };
        Ok((model, init.into_params()))
    }

    /// Logits (`batch x seq x vocab`) for token ids (`batch x seq`, u32).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (batch, seq) = input_ids.dims2()?;
        if seq > self.config.max_position_embeddings {
            candle_core::bail!(
                "sequence length {seq} exceeds max_position_embeddings {}",
                self.config.max_position_embeddings
            );
        }
        let h = self.config.hidden_size;
        let mut x = self
            .embed_tokens
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((batch, seq, h))?;
        let cos = self.cos.narrow(0, 0, seq)?;
        let sin = self.sin.narrow(0, 0, seq)?;
        let mask = causal_mask(seq, x.dtype(), x.device())?;
        let eps = self.config.rms_norm_eps;
        for block in &self.layers {
            let normed = rms_norm(&x, &block.input_layernorm, eps)?;
            x = (x + self.attention(&block.self_attn, &normed, &cos, &sin, &mask)?)?;
            let normed = rms_norm(&x, &block.post_attention_layernorm, eps)?;
            x = (x + self.mlp(&block.mlp, &normed)?)?;
        }
        let x = rms_norm(&x, &self.norm, eps)?;
        linear(&x, &self.lm_head)
    }

    /// Mean next-token cross-entropy of `input_ids` against `targets` (both `batch x seq`).
    pub fn loss(&self, input_ids: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let logits = self.forward(input_ids)?;
        let vocab = self.config.vocab_size;
        cross_entropy(&logits.reshape(((), vocab))?, &targets.flatten_all()?)
    }

    fn attention(
        &self,
        attn: &Attention,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let (batch, seq, hidden) = x.dims3()?;
        let heads = self.config.num_attention_heads;
        let kv_heads = self.config.kv_heads();
        let head_dim = self.config.head_dim();
        let split_heads = |t: Tensor, n: usize| -> Result<Tensor> {
            t.reshape((batch, seq, n, head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split_heads(linear(x, &attn.q_proj)?, heads)?;
        let k = split_heads(linear(x, &attn.k_proj)?, kv_heads)?;
        let v = split_heads(linear(x, &attn.v_proj)?, kv_heads)?;
        // Scaling q before the product touches seq*head_dim values instead of seq*seq.
        let q = (rope(&q, cos, sin)? * (1.0 / (head_dim as f64).sqrt()))?;
        let k = repeat_kv(rope(&k, cos, sin)?, heads / kv_heads)?;
        let v = repeat_kv(v, heads / kv_heads)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(mask)?;
        let probs = softmax_last_dim(&scores)?;
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((batch, seq, hidden))?;
        linear(&out, &attn.o_proj)
    }

    fn mlp(&self, mlp: &Mlp, x: &Tensor) -> Result<Tensor> {
        let gate = linear(x, &mlp.gate_proj)?.silu()?;
        let up = linear(x, &mlp.up_proj)?;
        linear(&(gate * up)?, &mlp.down_proj)
    }
}

/// Repeats each key/value head `n_rep` times so grouped heads line up with query heads.
fn repeat_kv(x: Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x);
    }
    let (b, kv_heads, seq, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, kv_heads, n_rep, seq, d))?
        .reshape((b, kv_heads * n_rep, seq, d))
}

/// Rough bytes of activations kept for the backward pass of one micro-batch: per layer and
/// token about 30 hidden-sized, 4 intermediate-sized and 4 seq-sized-per-head tensors
/// (norms, projections, rotary temporaries, scores, softmax, SwiGLU), plus about 4 vocab-sized
/// tensors per token for the logits and the loss. An estimate, not a measurement.
pub fn activation_bytes(
    config: &ModelConfig,
    micro_batch: usize,
    seq: usize,
    elem_bytes: usize,
) -> usize {
    let tokens = micro_batch * seq;
    let per_layer = 30 * config.hidden_size
        + 4 * config.intermediate_size
        + 4 * config.num_attention_heads * seq;
    let floats = tokens * (per_layer * config.num_hidden_layers + 4 * config.vocab_size);
    floats * elem_bytes
}
