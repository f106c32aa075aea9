//! LLaMA (RMSNorm, RoPE, SwiGLU, causal grouped-query attention) for training.
//!
//! Parameter names match Hugging Face `LlamaForCausalLM`, so weights map 1:1.

use super::ops::{
    add_rms_norm, attention, embedding, linear, linear_cross_entropy, rms_norm, rope_tables, swiglu,
};
use super::partition::adam_mini_block;
use super::spec::{Architecture, ModelSpec};
use super::{Model, Param, ParamGroup, ParamInit};
use crate::check::{positive, sum_of_products};
use crate::data::Position;
use crate::device::Precision;
use anyhow::{bail, Context};
use candle_core::{DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// LLaMA architecture, with Hugging Face `LlamaConfig` key names, and which architecture a
/// run trains (a ViT's shape is the `vit` section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LlamaConfig {
    /// `llama` (this section) or `vit` (the `vit` section; the LLaMA keys are then unused).
    pub architecture: Architecture,
    /// Embedding rows; may exceed the tokenizer's vocabulary (padding rows are never targets).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Transformer blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Grouped-query attention: number of key/value heads (null means `num_attention_heads`).
    pub num_key_value_heads: Option<usize>,
    /// Longest sequence the rotary tables are built for.
    pub max_position_embeddings: usize,
    /// Added to the mean square in RMSNorm.
    pub rms_norm_eps: f64,
    /// Base of the rotary embedding frequencies.
    pub rope_theta: f64,
    /// Share the embedding matrix with the output head.
    pub tie_word_embeddings: bool,
    /// Standard deviation of the normal init of every matrix (norm weights start at 1).
    pub initializer_range: f64,
}

impl Default for LlamaConfig {
    fn default() -> Self {
        Self {
            architecture: Architecture::Llama,
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

impl LlamaConfig {
    /// Key/value heads after resolving the `None` default.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Trainable parameters, from the architecture alone (what [`Llama::new`] creates), or
    /// `None` when the count overflows `usize`.
    pub fn num_parameters(&self) -> Option<usize> {
        let (h, inter, vocab) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let kv = sum_of_products(&[&[self.kv_heads(), self.head_dim()]])?;
        // q and o (h x h), k and v (kv x h), the MLP's three (inter x h), two norms.
        let layer = sum_of_products(&[&[2, h, h], &[2, kv, h], &[3, inter, h], &[2, h]])?;
        let embeddings = if self.tie_word_embeddings { 1 } else { 2 };
        sum_of_products(&[
            &[self.num_hidden_layers, layer],
            &[embeddings, vocab, h],
            &[h],
        ])
    }

    /// Checks the architecture is buildable; every message names the key to fix.
    pub fn validate(&self) -> anyhow::Result<()> {
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

fn divisors_near(n: usize, around: usize) -> String {
    let mut divs: Vec<usize> = (1..=n).filter(|d| n.is_multiple_of(*d)).collect();
    divs.sort_by_key(|d| d.abs_diff(around));
    divs.truncate(3);
    divs.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(" or ")
}

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

/// Creates a LLaMA's parameters in Hugging Face `state_dict` order.
struct Builder {
    init: ParamInit,
    /// Standard deviation of every matrix.
    std: f64,
}

impl Builder {
    /// A `rows x cols` weight drawn from `N(0, std^2)`.
    fn matrix(
        &mut self,
        name: &str,
        group: ParamGroup,
        rows: usize,
        cols: usize,
    ) -> Result<Tensor> {
        self.init.normal(name, group, rows, cols, self.std)
    }

    /// Transformer block `p` (`model.layers.<i>`).
    fn block(&mut self, config: &LlamaConfig, p: &str) -> Result<Block> {
        let h = config.hidden_size;
        let kv = config.kv_heads() * config.head_dim();
        let inter = config.intermediate_size;
        let (attn, mlp, norms) = (ParamGroup::Attention, ParamGroup::Mlp, ParamGroup::Norms);
        Ok(Block {
            input_layernorm: self
                .init
                .ones(&format!("{p}.input_layernorm.weight"), norms, h)?,
            self_attn: Attention {
                q_proj: self.matrix(&format!("{p}.self_attn.q_proj.weight"), attn, h, h)?,
                k_proj: self.matrix(&format!("{p}.self_attn.k_proj.weight"), attn, kv, h)?,
                v_proj: self.matrix(&format!("{p}.self_attn.v_proj.weight"), attn, kv, h)?,
                o_proj: self.matrix(&format!("{p}.self_attn.o_proj.weight"), attn, h, h)?,
            },
            post_attention_layernorm: self.init.ones(
                &format!("{p}.post_attention_layernorm.weight"),
                norms,
                h,
            )?,
            mlp: Mlp {
                gate_proj: self.matrix(&format!("{p}.mlp.gate_proj.weight"), mlp, inter, h)?,
                up_proj: self.matrix(&format!("{p}.mlp.up_proj.weight"), mlp, inter, h)?,
                down_proj: self.matrix(&format!("{p}.mlp.down_proj.weight"), mlp, h, inter)?,
            },
        })
    }
}

/// A LLaMA causal language model.
pub struct Llama {
    config: LlamaConfig,
    embed_tokens: Tensor,
    layers: Vec<Block>,
    norm: Tensor,
    lm_head: Tensor,
    cos: Tensor,
    sin: Tensor,
    /// The type matmuls and activations run in: the weights' own, or bf16 (weights cast
    /// on the way in, so gradients reach the f32 master weights in f32).
    compute: DType,
}

impl Llama {
    /// Builds a model with freshly initialised weights (normal with
    /// `initializer_range` for matrices, ones for norms, as Hugging Face does) and
    /// returns it with its parameters in a fixed order.
    pub fn new(
        config: &LlamaConfig,
        dtype: DType,
        device: &Device,
        seed: u64,
    ) -> Result<(Self, Vec<Param>)> {
        let mut b = Builder {
            init: ParamInit::new(seed, dtype, device),
            std: config.initializer_range,
        };
        let h = config.hidden_size;
        let embed_tokens = b.matrix(
            "model.embed_tokens.weight",
            ParamGroup::Embeddings,
            config.vocab_size,
            h,
        )?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| b.block(config, &format!("model.layers.{i}")))
            .collect::<Result<Vec<_>>>()?;
        let mut init = b.init;
        let norm = init.ones("model.norm.weight", ParamGroup::Norms, h)?;
        let lm_head = if config.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            init.normal(
                "lm_head.weight",
                ParamGroup::Head,
                config.vocab_size,
                h,
                config.initializer_range,
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
            compute: dtype,
        };
        Ok((model, init.into_params()))
    }

    /// A model with seeded f32 master weights computing in `precision` (resolved): what a
    /// training run builds.
    pub fn build(
        config: &LlamaConfig,
        precision: Precision,
        device: &Device,
        seed: u64,
    ) -> Result<(Self, Vec<Param>)> {
        let (llama, params) = Self::new(config, DType::F32, device, seed)?;
        Ok((llama.compute_in(precision.dtype()), params))
    }

    /// Computes in `dtype` (e.g. bf16) from now on; the weights keep their own type. Norms,
    /// softmax and the loss still run in f32, as mixed-precision PyTorch does.
    pub fn compute_in(mut self, dtype: DType) -> Self {
        self.compute = dtype;
        self
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// Logits (`batch x seq x vocab`) for token ids (`batch x seq`, u32).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        linear(&self.hidden_states(input_ids)?, &self.cast(&self.lm_head)?)
    }

    /// Mean next-token cross-entropy of `input_ids` against `targets` (both `batch x seq`).
    pub fn loss(&self, input_ids: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let hidden = self.hidden_states(input_ids)?;
        let hidden = hidden.reshape(((), self.config.hidden_size))?;
        linear_cross_entropy(&hidden, &self.cast(&self.lm_head)?, &targets.flatten_all()?)
    }

    /// A weight in the compute type.
    fn cast(&self, w: &Tensor) -> Result<Tensor> {
        w.to_dtype(self.compute)
    }

    /// RMSNorm in the weights' type (f32 under bf16 compute), returned in the compute type.
    fn norm(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        // `x` is in the compute type, which `rms_norm` returns.
        rms_norm(x, weight, self.config.rms_norm_eps)
    }

    /// The final normalised hidden states (`batch x seq x hidden`).
    fn hidden_states(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (batch, seq) = input_ids.dims2()?;
        if seq > self.config.max_position_embeddings {
            candle_core::bail!(
                "sequence length {seq} exceeds max_position_embeddings {}",
                self.config.max_position_embeddings
            );
        }
        let h = self.config.hidden_size;
        let mut x = embedding(&self.embed_tokens, &input_ids.flatten_all()?)?
            .reshape((batch, seq, h))?
            .to_dtype(self.compute)?;
        let cos = self.cos.narrow(0, 0, seq)?.to_dtype(self.compute)?;
        let sin = self.sin.narrow(0, 0, seq)?.to_dtype(self.compute)?;
        // Each branch's output is added to the residual stream `x` together with the next
        // norm (the next block's, or the final one): `add_rms_norm`, one kernel on a GPU.
        let eps = self.config.rms_norm_eps;
        let mut normed = match self.layers.first() {
            Some(block) => self.norm(&x, &block.input_layernorm)?,
            None => return self.norm(&x, &self.norm),
        };
        for (i, block) in self.layers.iter().enumerate() {
            let attended = self.attention(&block.self_attn, &normed, &cos, &sin)?;
            (x, normed) = add_rms_norm(&x, &attended, &block.post_attention_layernorm, eps)?;
            let next = match self.layers.get(i + 1) {
                Some(next) => &next.input_layernorm,
                None => &self.norm,
            };
            let mlp = self.mlp(&block.mlp, &normed)?;
            (x, normed) = add_rms_norm(&x, &mlp, next, eps)?;
        }
        Ok(normed)
    }

    fn attention(
        &self,
        attn: &Attention,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Tensor> {
        let out = attention(
            x,
            (
                &self.cast(&attn.q_proj)?,
                &self.cast(&attn.k_proj)?,
                &self.cast(&attn.v_proj)?,
            ),
            (cos, sin),
            self.config.num_attention_heads,
            self.config.kv_heads(),
        )?;
        linear(&out, &self.cast(&attn.o_proj)?)
    }

    fn mlp(&self, mlp: &Mlp, x: &Tensor) -> Result<Tensor> {
        let hidden = swiglu(x, &self.cast(&mlp.gate_proj)?, &self.cast(&mlp.up_proj)?)?;
        linear(&hidden, &self.cast(&mlp.down_proj)?)
    }
}

impl ModelSpec for LlamaConfig {
    fn name(&self) -> &'static str {
        "LLaMA"
    }

    fn section(&self) -> &'static str {
        "model"
    }

    fn check_shape(&self, seq_len: usize) -> anyhow::Result<()> {
        self.validate()?;
        if seq_len > self.max_position_embeddings {
            bail!(
                "train.seq_len ({seq_len}) exceeds model.max_position_embeddings ({}); lower \
                 --seq-len or raise model.max_position_embeddings",
                self.max_position_embeddings
            );
        }
        Ok(())
    }

    fn precision(&self, requested: Precision, gpu: bool) -> Precision {
        requested.on_gpu(gpu)
    }

    fn build(
        &self,
        seed: u64,
        precision: Precision,
        device: &Device,
    ) -> anyhow::Result<(Box<dyn Model>, Vec<Param>)> {
        let (llama, params) = Llama::build(self, precision, device, seed)?;
        Ok((Box::new(llama), params))
    }

    fn adam_mini_block(&self, name: &str, dims: &[usize]) -> anyhow::Result<usize> {
        adam_mini_block(name, dims, self)
    }

    fn units_per_example(&self, seq_len: usize) -> usize {
        seq_len
    }

    fn batch_shape(&self, batch: usize, seq_len: usize) -> String {
        format!("{batch} x {seq_len} tokens")
    }

    /// `6 N + 12 layers hidden seq`: the second term is attention's scores and weighted
    /// sum, forward and backward.
    fn flops_per_unit(&self, non_embedding: usize, seq_len: usize) -> f64 {
        6.0 * non_embedding as f64
            + 12.0 * (self.num_hidden_layers * self.hidden_size * seq_len) as f64
    }

    fn activation_bytes(
        &self,
        micro_batch: usize,
        seq_len: usize,
        elem_bytes: usize,
    ) -> Option<usize> {
        activation_bytes(self, micro_batch, seq_len, elem_bytes)
    }

    fn parameter_count(&self) -> Option<usize> {
        self.num_parameters()
    }

    fn layers(&self) -> usize {
        self.num_hidden_layers
    }

    fn with_layers(&self, layers: usize) -> Box<dyn ModelSpec> {
        Box::new(Self {
            num_hidden_layers: layers,
            ..self.clone()
        })
    }

    /// Token ids 0 as inputs and targets.
    fn probe_batch(
        &self,
        micro_batch: usize,
        seq_len: usize,
        device: &Device,
    ) -> anyhow::Result<(Tensor, Tensor)> {
        let ids = Tensor::zeros((micro_batch, seq_len), DType::U32, device)?;
        Ok((ids.clone(), ids))
    }

    fn start_position(&self, seed: u64) -> Position {
        Position::tokens_from(seed)
    }

    fn language_model(&self) -> Option<&LlamaConfig> {
        Some(self)
    }
}

/// The LLaMA a Hugging Face `config.json` (`flat`, read from `path`) describes: its keys
/// over our defaults. Settings our LLaMA does not implement are errors, not ignored.
pub fn from_hf(flat: &Value, path: &std::path::Path) -> anyhow::Result<LlamaConfig> {
    check_hf_supported(flat, path)?;
    let layer = hf_model_layer(flat);
    let model: LlamaConfig = serde_json::from_value(layer["model"].clone())
        .with_context(|| format!("'{}' is not a LLaMA config", path.display()))?;
    model
        .validate()
        .with_context(|| format!("in '{}'", path.display()))?;
    if let Some(head_dim) = flat.get("head_dim").and_then(Value::as_u64) {
        if head_dim != model.head_dim() as u64 {
            bail!(
                "'{}' sets head_dim = {head_dim}; this LLaMA needs hidden_size / \
                 num_attention_heads = {}",
                path.display(),
                model.head_dim()
            );
        }
    }
    Ok(model)
}

/// Fails when a flat Hugging Face `config.json` (`flat`, read from `path`) sets what our
/// LLaMA does not implement (another `model_type`, activation, RoPE scaling, biases), naming
/// the key: such a model must not train or load as a plain LLaMA.
pub fn check_hf_supported(flat: &Value, path: &std::path::Path) -> anyhow::Result<()> {
    let unsupported = [
        ("model_type", Value::from("llama")),
        ("hidden_act", Value::from("silu")),
        ("rope_scaling", Value::Null),
        ("attention_bias", Value::Bool(false)),
        ("mlp_bias", Value::Bool(false)),
    ];
    for (key, plain) in unsupported {
        match flat.get(key) {
            Some(v) if *v != plain => bail!(
                "'{}' sets {key} = {v}; this LLaMA supports only {key} = {plain}",
                path.display()
            ),
            _ => {}
        }
    }
    Ok(())
}

/// Picks the LLaMA keys out of a flat Hugging Face `config.json` as a run-config layer
/// (`{"model": {...}}`); the rest of such a file (architectures, torch_dtype, ...) describes nothing we build and is ignored.
pub fn hf_model_layer(flat: &Value) -> Value {
    let known = serde_json::to_value(LlamaConfig::default()).expect("config serialises");
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

/// Rough bytes of activations kept for the backward pass of one micro-batch, for the fused
/// CPU path: per layer and token about 12 hidden-sized tensors (residual stream, norms,
/// packed q|k|v, attention output, projections) and 3 intermediate-sized ones (packed
/// gate|up, SwiGLU output); attention probabilities are recomputed, not kept; plus two
/// vocab-sized rows per token (softmax probabilities of the output head and their gradient).
/// An estimate, not a measurement: `bench` reports the measured peak. `None` when it
/// overflows `usize`.
pub fn activation_bytes(
    config: &LlamaConfig,
    micro_batch: usize,
    seq: usize,
    elem_bytes: usize,
) -> Option<usize> {
    let per_layer = sum_of_products(&[&[12, config.hidden_size], &[3, config.intermediate_size]])?;
    let (layers, vocab) = (config.num_hidden_layers, config.vocab_size);
    let per_token = sum_of_products(&[&[per_layer, layers], &[2, vocab]])?;
    sum_of_products(&[&[micro_batch, seq, per_token, elem_bytes]])
}
