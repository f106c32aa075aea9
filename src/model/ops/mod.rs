//! Differentiable building blocks of the models, one op per file.
//!
//! candle-nn's fused `softmax_last_dim`, `rms_norm`, `layer_norm` and `rope*` kernels have
//! no backward pass: gradients silently stop at them. Each op here runs our fused CPU kernel
//! (a candle `CustomOp` with a hand-written backward) for f32/f64 CPU tensors, and otherwise
//! its `reference` composition of candle primitives, which all have a backward and are the
//! oracle the fused kernels are tested against (finite differences check both). The
//! reference is what a GPU runs; `train.kernels = reference` makes the CPU run it too.
//!
//! LLaMA:
//! - [`embedding`](embedding()): the token embedding (its own backward off the fused path;
//!   a CUDA kernel on the GPU).
//! - [`linear`](linear()): `x @ w^T`, without bias.
//! - [`rms_norm`](rms_norm()): RMSNorm; [`add_rms_norm`] the residual add before it.
//! - [`rope_tables`] and `reference::rope`: rotary embeddings (fused inside attention).
//! - [`attention`](attention()): causal self-attention with RoPE and grouped-query heads.
//! - [`swiglu`](swiglu()): the SwiGLU hidden layer.
//! - [`linear_cross_entropy`]: the output head fused with the token cross-entropy (on a GPU
//!   chunk by chunk: [`cross_entropy_chunked`]).
//!
//! ViT, under [`vit`] where its names differ from LLaMA's:
//! - `vit::layer_norm`: LayerNorm.
//! - `vit::gelu`: the exact erf GELU.
//! - `vit::linear`: `x @ w^T + b`, with a fused bias addition.
//! - `vit::self_attention`, `vit::attention`: bidirectional multi-head attention.
//! - `vit::soft_cross_entropy`: cross-entropy against soft targets.
//!
//! Shared: `softmax` (the row kernels and `reference::softmax_last_dim`) and `kernel` (gemm
//! wrappers and the fixed row chunks that keep reductions bitwise reproducible).

mod bias;
mod bidirectional_attention;
mod causal_attention;
pub mod compare;
mod cross_entropy;
pub mod cross_entropy_chunked;
mod embedding;
mod gelu;
#[cfg(feature = "cuda")]
pub(crate) mod gpu_self_check;
mod kernel;
mod layer_norm;
mod linear;
mod rms_norm;
mod rope;
mod soft_cross_entropy;
mod softmax;
mod swiglu;
#[cfg(feature = "cuda")]
pub(crate) mod triton;

use candle_core::{DType, Result, Tensor};

pub use causal_attention::{attention, causal_mask};
pub use cross_entropy::linear_cross_entropy;
pub use embedding::embedding;
pub use linear::linear;
pub use rms_norm::{add_rms_norm, rms_norm};
pub use rope::rope_tables;
pub use swiglu::swiglu;

/// The LLaMA ops composed of candle primitives: the path for devices without our fused
/// kernels, and the reference the fused kernels are tested against.
pub mod reference {
    pub use super::causal_attention::reference::{attention, causal_attention};
    pub use super::cross_entropy::reference::{cross_entropy, linear_cross_entropy};
    pub use super::linear::reference::linear;
    pub use super::rms_norm::reference::rms_norm;
    pub use super::rope::reference::rope;
    pub use super::softmax::reference::softmax_last_dim;
    pub use super::swiglu::reference::swiglu;
}

/// The ViT's ops: LayerNorm, erf GELU, the linear layer with bias, bidirectional attention
/// and the soft-target cross-entropy.
pub mod vit {
    pub use super::bias::linear;
    pub use super::bidirectional_attention::{attention, self_attention};
    pub use super::gelu::gelu;
    pub use super::layer_norm::layer_norm;
    pub use super::soft_cross_entropy::soft_cross_entropy;

    /// The ViT ops composed of candle primitives.
    pub mod reference {
        pub use super::super::bias::reference::linear;
        pub use super::super::bidirectional_attention::reference::attention;
        pub use super::super::gelu::reference::gelu;
        pub use super::super::layer_norm::reference::layer_norm;
    }
}

/// `x` in f32 if it is a half-precision type, else unchanged: the reference softmaxes of
/// attention and cross-entropy need f32 over long rows.
fn widen(x: &Tensor) -> Result<Tensor> {
    match x.dtype() {
        DType::BF16 | DType::F16 => x.to_dtype(DType::F32),
        _ => Ok(x.clone()),
    }
}
