//! Vision Transformer (ViT) for image classification, for training.
//!
//! The architecture of Dosovitskiy et al. (2021) as timm's `VisionTransformer` and Hugging
//! Face's `ViTForImageClassification` build it: 16x16 patches embedded by one linear map
//! (the `patch_size`-stride convolution, computed as a matmul over unfolded patches), a
//! learned class token and learned position embeddings, pre-norm blocks (LayerNorm,
//! multi-head self-attention with biases, LayerNorm, MLP with the exact erf GELU), a final
//! LayerNorm and a linear head on the class token.
//!
//! Parameter names and shapes match Hugging Face `ViTForImageClassification`, so weights
//! map 1:1 (`vit.embeddings.cls_token` is `1 x 1 x hidden`, the patch kernel
//! `hidden x channels x patch x patch`, as there).

use super::ops::vit::{gelu, layer_norm, linear, self_attention, soft_cross_entropy};
use super::partition::adam_mini_vit_block;
use super::spec::ModelSpec;
use super::{LlamaConfig, Model, Param, ParamGroup, ParamInit};
use crate::check::sum_of_products;
use crate::data::Position;
use crate::device::Precision;
use anyhow::{bail, Context};
use candle_core::{DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};

/// ViT architecture, with Hugging Face `ViTConfig` key names (`num_classes` is HF's
/// `num_labels`, accepted under both names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VitConfig {
    /// Side of the (square) input image in pixels.
    pub image_size: usize,
    /// Side of a square patch; must divide `image_size`.
    pub patch_size: usize,
    /// Input channels (3 for RGB).
    #[serde(alias = "channels")]
    pub num_channels: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    /// Must divide `hidden_size`.
    pub num_attention_heads: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Output classes.
    #[serde(alias = "num_labels")]
    pub num_classes: usize,
    pub layer_norm_eps: f64,
    /// Standard deviation of the normal init of every matrix, the class token and the
    /// position embeddings (biases start at 0, LayerNorm weights at 1).
    pub initializer_range: f64,
}

impl Default for VitConfig {
    /// `vit-tiny`, the configuration that trains on two CPU cores (the code default of the
    /// `vit` section; a test checks it equals `configs/vit-tiny.json`).
    fn default() -> Self {
        Self {
            image_size: 32,
            patch_size: 8,
            num_channels: 3,
            hidden_size: 64,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            intermediate_size: 256,
            num_classes: 10,
            layer_norm_eps: 1e-6,
            initializer_range: 0.02,
        }
    }
}

impl VitConfig {
    /// The `vit` section of a shipped ViT preset (`configs/<name>.json`). `vit-s16`: ViT-S/16
    /// at 224 pixels on ImageNet-1k (22,050,664 parameters), as in the paper; `vit-tiny`:
    /// 32-pixel images in 8-pixel patches (16 tokens and the class token), hidden 64, 4
    /// layers of 4 heads, MLP 256, 10 classes (214,218 parameters), small enough to train
    /// on two CPU cores (docs/vit.md has what it reaches and how fast). LayerNorm eps is
    /// 1e-6 as in timm and big_vision (Hugging Face defaults to 1e-12).
    pub fn preset(name: &str) -> anyhow::Result<Self> {
        let section = crate::presets::find(name)
            .and_then(|json| serde_json::from_str::<serde_json::Value>(json).ok())
            .and_then(|layer| layer.get("vit").cloned());
        match section {
            Some(vit) => Ok(serde_json::from_value(vit)?),
            None => bail!("unknown ViT preset '{name}'; available: vit-s16, vit-tiny"),
        }
    }

    /// Patches per image.
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }

    /// Tokens per image: the patches and the class token.
    pub fn seq_len(&self) -> usize {
        self.num_patches() + 1
    }

    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Trainable parameters, from the architecture alone (what [`Vit::new`] creates).
    pub fn num_parameters(&self) -> Option<usize> {
        let (h, inter, classes) = (self.hidden_size, self.intermediate_size, self.num_classes);
        let (channels, patch) = (self.num_channels, self.patch_size);
        let seq = self.checked_seq_len()?;
        // Patch projection and bias, class token, position embeddings.
        let embeddings = sum_of_products(&[&[h, channels, patch, patch], &[2, h], &[seq, h]])?;
        // q, k, v, o with biases; the MLP's two with biases; two LayerNorms.
        let layer = sum_of_products(&[&[4, h, h], &[4, h], &[2, h, inter], &[inter], &[5, h]])?;
        sum_of_products(&[
            &[embeddings],
            &[self.num_hidden_layers, layer],
            &[2, h],
            &[classes, h],
            &[classes],
        ])
    }

    /// [`VitConfig::seq_len`], or `None` when it overflows `usize`.
    fn checked_seq_len(&self) -> Option<usize> {
        (self.image_size / self.patch_size)
            .checked_pow(2)?
            .checked_add(1)
    }

    /// Checks the architecture is buildable; every message names the key to fix.
    pub fn validate(&self) -> anyhow::Result<()> {
        for (key, value) in [
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
            ("num_channels", self.num_channels),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("num_classes", self.num_classes),
        ] {
            if value == 0 {
                bail!("vit.{key} must be a positive integer, got 0");
            }
        }
        if !self.image_size.is_multiple_of(self.patch_size) {
            bail!(
                "vit.patch_size ({}) must divide vit.image_size ({})",
                self.patch_size,
                self.image_size
            );
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            bail!(
                "vit.num_attention_heads ({}) must divide vit.hidden_size ({})",
                self.num_attention_heads,
                self.hidden_size
            );
        }
        let positive = |x: f64| x > 0.0 && x.is_finite();
        if !positive(self.layer_norm_eps) || !positive(self.initializer_range) {
            bail!("vit.layer_norm_eps and vit.initializer_range must be > 0");
        }
        Ok(())
    }
}

/// A linear layer's weight (`out x in`) and bias.
struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        linear(x, &self.weight, &self.bias)
    }
}

/// A LayerNorm's weight and bias.
struct Norm {
    weight: Tensor,
    bias: Tensor,
}

struct Block {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_output: Linear,
    intermediate: Linear,
    output: Linear,
    layernorm_before: Norm,
    layernorm_after: Norm,
}

/// A ViT image classifier.
pub struct Vit {
    config: VitConfig,
    dtype: DType,
    cls_token: Tensor,
    position_embeddings: Tensor,
    /// The patch convolution's kernel as an `hidden x (channels*patch*patch)` matrix (a view
    /// of the `hidden x channels x patch x patch` parameter).
    patch_weight: Tensor,
    patch_bias: Tensor,
    layers: Vec<Block>,
    layernorm: Norm,
    classifier: Linear,
}

/// Creates parameters in Hugging Face `state_dict` order.
struct Builder {
    init: ParamInit,
    std: f64,
}

impl Builder {
    fn linear(
        &mut self,
        prefix: &str,
        group: ParamGroup,
        out: usize,
        inp: usize,
    ) -> Result<Linear> {
        Ok(Linear {
            weight: self
                .init
                .normal(&format!("{prefix}.weight"), group, out, inp, self.std)?,
            bias: self.init.zeros(&format!("{prefix}.bias"), group, out)?,
        })
    }

    fn norm(&mut self, prefix: &str, len: usize) -> Result<Norm> {
        Ok(Norm {
            weight: self
                .init
                .ones(&format!("{prefix}.weight"), ParamGroup::Norms, len)?,
            bias: self
                .init
                .zeros(&format!("{prefix}.bias"), ParamGroup::Norms, len)?,
        })
    }
}

impl Vit {
    /// Builds a model with freshly initialised weights, as Hugging Face initialises
    /// `ViTForImageClassification` (normal with `initializer_range` for matrices, the patch
    /// kernel, class token and position embeddings; biases 0; LayerNorm weights 1), and
    /// returns it with its parameters in a fixed order. Groups: patch embedding, class token
    /// and position embeddings are `Embeddings`; query/key/value/attention output (weights and
    /// biases) `Attention`; intermediate/output dense `Mlp`; every LayerNorm `Norms`; the
    /// classifier `Head`.
    pub fn new(
        config: &VitConfig,
        dtype: DType,
        device: &Device,
        seed: u64,
    ) -> anyhow::Result<(Self, Vec<Param>)> {
        config.validate()?;
        let (h, inter) = (config.hidden_size, config.intermediate_size);
        let (c, p) = (config.num_channels, config.patch_size);
        let std = config.initializer_range;
        let mut b = Builder {
            init: ParamInit::new(seed, dtype, device),
            std,
        };
        let emb = ParamGroup::Embeddings;
        let cls_token = b
            .init
            .normal_shaped("vit.embeddings.cls_token", emb, &[1, 1, h], std)?;
        let position_embeddings = b.init.normal_shaped(
            "vit.embeddings.position_embeddings",
            emb,
            &[1, config.seq_len(), h],
            std,
        )?;
        let patch_kernel = b.init.normal_shaped(
            "vit.embeddings.patch_embeddings.projection.weight",
            emb,
            &[h, c, p, p],
            std,
        )?;
        let patch_bias = b
            .init
            .zeros("vit.embeddings.patch_embeddings.projection.bias", emb, h)?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = format!("vit.encoder.layer.{i}");
            let (attn, mlp) = (ParamGroup::Attention, ParamGroup::Mlp);
            layers.push(Block {
                query: b.linear(&format!("{l}.attention.attention.query"), attn, h, h)?,
                key: b.linear(&format!("{l}.attention.attention.key"), attn, h, h)?,
                value: b.linear(&format!("{l}.attention.attention.value"), attn, h, h)?,
                attention_output: b.linear(&format!("{l}.attention.output.dense"), attn, h, h)?,
                intermediate: b.linear(&format!("{l}.intermediate.dense"), mlp, inter, h)?,
                output: b.linear(&format!("{l}.output.dense"), mlp, h, inter)?,
                layernorm_before: b.norm(&format!("{l}.layernorm_before"), h)?,
                layernorm_after: b.norm(&format!("{l}.layernorm_after"), h)?,
            });
        }
        let layernorm = b.norm("vit.layernorm", h)?;
        let classifier = b.linear("classifier", ParamGroup::Head, config.num_classes, h)?;
        let model = Self {
            config: config.clone(),
            dtype,
            cls_token,
            position_embeddings,
            patch_weight: patch_kernel.reshape((h, c * p * p))?,
            patch_bias,
            layers,
            layernorm,
            classifier,
        };
        Ok((model, b.init.into_params()))
    }

    /// A model computing in `precision` (resolved): f32, the only one implemented, else an
    /// error that says so.
    pub fn build(
        config: &VitConfig,
        precision: Precision,
        device: &Device,
        seed: u64,
    ) -> anyhow::Result<(Self, Vec<Param>)> {
        if precision != Precision::F32 {
            bail!("train.dtype = bf16 is implemented for LLaMA; train the ViT in f32");
        }
        Self::new(config, DType::F32, device, seed)
    }

    /// The architecture.
    pub fn config(&self) -> &VitConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.cls_token.device()
    }

    /// Class logits (`batch x num_classes`) of `images` (`batch x channels x image_size x
    /// image_size`, any float dtype: converted to the model's).
    pub fn logits(&self, images: &Tensor) -> anyhow::Result<Tensor> {
        let features = self.features(images)?;
        Ok(self.classifier.forward(&features)?)
    }

    /// Mean soft-target cross-entropy of the logits of `images` against `soft_targets`
    /// (`batch x num_classes`, rows summing to 1), which carry label smoothing and
    /// Mixup/CutMix.
    pub fn loss(&self, images: &Tensor, soft_targets: &Tensor) -> anyhow::Result<Tensor> {
        let logits = self.logits(images)?;
        Ok(soft_cross_entropy(&logits, soft_targets)?)
    }

    /// The final LayerNorm of the class token (`batch x hidden`).
    fn features(&self, images: &Tensor) -> anyhow::Result<Tensor> {
        let mut x = self.embeddings(images)?;
        let eps = self.config.layer_norm_eps;
        for block in &self.layers {
            let normed = layer_norm(
                &x,
                &block.layernorm_before.weight,
                &block.layernorm_before.bias,
                eps,
            )?;
            let attended = self_attention(
                &normed,
                (&block.query.weight, &block.query.bias),
                (&block.key.weight, &block.key.bias),
                (&block.value.weight, &block.value.bias),
                self.config.num_attention_heads,
            )?;
            x = (x + block.attention_output.forward(&attended)?)?;
            let normed = layer_norm(
                &x,
                &block.layernorm_after.weight,
                &block.layernorm_after.bias,
                eps,
            )?;
            let hidden = gelu(&block.intermediate.forward(&normed)?)?;
            x = (x + block.output.forward(&hidden)?)?;
        }
        // LayerNorm acts per token, so normalising the class token alone is what Hugging
        // Face's "normalise every token, then take token 0" computes.
        let cls = x.narrow(1, 0, 1)?.squeeze(1)?;
        Ok(layer_norm(
            &cls,
            &self.layernorm.weight,
            &self.layernorm.bias,
            eps,
        )?)
    }

    /// Patch embeddings with the class token prepended and positions added
    /// (`batch x seq_len x hidden`): the encoder's input.
    pub fn embeddings(&self, images: &Tensor) -> anyhow::Result<Tensor> {
        let cfg = &self.config;
        let (c, s, p) = (cfg.num_channels, cfg.image_size, cfg.patch_size);
        let dims = images.dims();
        if dims.len() != 4 || dims[1] != c || dims[2] != s || dims[3] != s {
            bail!("images must have shape batch x {c} x {s} x {s}, got {dims:?}");
        }
        let batch = dims[0];
        let g = s / p;
        // `b c (gy py) (gx px)` -> `b (gy gx) (c py px)`: each row one patch, flattened in
        // the convolution kernel's `c x p x p` order.
        let patches = images
            .to_dtype(self.dtype)?
            .reshape(vec![batch, c, g, p, g, p])?
            .permute(vec![0, 2, 4, 1, 3, 5])?
            .contiguous()?
            .reshape((batch, g * g, c * p * p))
            .context("unfolding patches")?;
        let tokens = linear(&patches, &self.patch_weight, &self.patch_bias)?;
        let cls = self.cls_token.broadcast_as((batch, 1, cfg.hidden_size))?;
        let x = Tensor::cat(&[&cls, &tokens], 1)?;
        Ok(x.broadcast_add(&self.position_embeddings)?)
    }
}

impl ModelSpec for VitConfig {
    fn name(&self) -> &'static str {
        "ViT"
    }

    fn section(&self) -> &'static str {
        "vit"
    }

    /// A ViT's sequence is its patches; `train.seq_len` does not apply.
    fn check_shape(&self, _seq_len: usize) -> anyhow::Result<()> {
        self.validate()
    }

    /// `auto` is f32 everywhere, the only precision this model has.
    fn precision(&self, requested: Precision, gpu: bool) -> Precision {
        match requested {
            Precision::Auto => Precision::F32,
            _ => requested.on_gpu(gpu),
        }
    }

    fn build(
        &self,
        seed: u64,
        precision: Precision,
        device: &Device,
    ) -> anyhow::Result<(Box<dyn Model>, Vec<Param>)> {
        let (vit, params) = Vit::build(self, precision, device, seed)?;
        Ok((Box::new(vit), params))
    }

    fn adam_mini_block(&self, name: &str, dims: &[usize]) -> anyhow::Result<usize> {
        adam_mini_vit_block(name, dims, self)
    }

    fn units_per_example(&self, _seq_len: usize) -> usize {
        1
    }

    fn batch_shape(&self, batch: usize, _seq_len: usize) -> String {
        format!("{batch} images")
    }

    /// Per image: `seq` tokens (patches and the class token) of a LLaMA's count each.
    fn flops_per_unit(&self, non_embedding: usize, _seq_len: usize) -> f64 {
        let seq = self.seq_len() as f64;
        seq * (6.0 * non_embedding as f64
            + 12.0 * (self.num_hidden_layers * self.hidden_size) as f64 * seq)
    }

    fn activation_bytes(
        &self,
        micro_batch: usize,
        _seq_len: usize,
        elem_bytes: usize,
    ) -> Option<usize> {
        activation_bytes(self, micro_batch, elem_bytes)
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

    /// Black images and all-zero soft targets.
    fn probe_batch(
        &self,
        micro_batch: usize,
        _seq_len: usize,
        device: &Device,
    ) -> anyhow::Result<(Tensor, Tensor)> {
        let side = self.image_size;
        let images = Tensor::zeros(
            (micro_batch, self.num_channels, side, side),
            DType::F32,
            device,
        )?;
        let targets = Tensor::zeros((micro_batch, self.num_classes), DType::F32, device)?;
        Ok((images, targets))
    }

    fn start_position(&self, seed: u64) -> Position {
        Position::images_from(seed)
    }

    fn language_model(&self) -> Option<&LlamaConfig> {
        None
    }
}

/// Rough bytes of activations a ViT keeps for the backward pass of one micro-batch: per layer
/// and token about 12 hidden-sized tensors and 2 MLP-sized ones, plus each head's attention
/// probabilities (`seq x seq`). An estimate, like LLaMA's; `None` when it overflows `usize`.
pub fn activation_bytes(vit: &VitConfig, micro_batch: usize, elem_bytes: usize) -> Option<usize> {
    let seq = vit.checked_seq_len()?;
    let per_token = sum_of_products(&[
        &[12, vit.hidden_size],
        &[2, vit.intermediate_size],
        &[vit.num_attention_heads, seq],
    ])?;
    sum_of_products(&[&[
        micro_batch,
        seq,
        per_token,
        vit.num_hidden_layers,
        elem_bytes,
    ]])
}
