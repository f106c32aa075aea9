//! Models and their trainable parameters.

pub mod accuracy;
pub mod graph;
pub mod llama;
pub mod ops;
pub mod partition;
pub mod spec;
pub mod vit;

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::Serialize;

pub use llama::{Llama, LlamaConfig};
pub use spec::{Architecture, ModelSpec};
pub use vit::{Vit, VitConfig};

/// A network being trained, as the training step uses it: shared by the step's worker
/// threads, hence `Sync`.
pub trait Model: Sync {
    /// Mean loss of one micro-batch `(inputs, targets)` on the model's device.
    fn loss(&self, inputs: &Tensor, targets: &Tensor) -> anyhow::Result<Tensor>;

    /// The device the weights live on.
    fn device(&self) -> &Device;
}

/// Which part of the network a parameter belongs to (used for reporting and for the
/// groups BSFA covers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamGroup {
    Embeddings,
    Attention,
    Mlp,
    Norms,
    Head,
}

/// Names of embeddings added to activations, exempt from weight decay.
const ADDED_EMBEDDINGS: [&str; 2] = [".cls_token", ".position_embeddings"];

/// One trainable tensor with its Hugging Face name.
#[derive(Debug, Clone)]
pub struct Param {
    pub name: String,
    pub group: ParamGroup,
    pub var: Var,
}

impl Param {
    /// Matrices and kernels get weight decay, vectors (norm weights, biases) do not, as in
    /// nanoGPT and the paper; nor do a ViT's class token and position embeddings, which are
    /// added to activations rather than multiplying them (as timm and big_vision exempt them).
    pub fn decays(&self) -> bool {
        self.var.rank() >= 2 && !ADDED_EMBEDDINGS.iter().any(|n| self.name.ends_with(n))
    }
}

/// Creates parameters in a fixed order from a seeded generator, so a run is reproducible
/// (candle's own CPU `randn` draws from an unseeded thread RNG).
pub struct ParamInit {
    rng: ChaCha8Rng,
    dtype: DType,
    device: Device,
    params: Vec<Param>,
}

impl ParamInit {
    /// A fresh initialiser; `seed` fixes every value it draws.
    pub fn new(seed: u64, dtype: DType, device: &Device) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            dtype,
            device: device.clone(),
            params: Vec::new(),
        }
    }

    /// A `rows x cols` matrix drawn from `N(0, std^2)`.
    pub fn normal(
        &mut self,
        name: &str,
        group: ParamGroup,
        rows: usize,
        cols: usize,
        std: f64,
    ) -> Result<Tensor> {
        self.normal_shaped(name, group, &[rows, cols], std)
    }

    /// A tensor of shape `dims` drawn from `N(0, std^2)`, for parameters that keep a Hugging
    /// Face shape other than a matrix (ViT's class token, position embeddings, patch kernel).
    pub fn normal_shaped(
        &mut self,
        name: &str,
        group: ParamGroup,
        dims: &[usize],
        std: f64,
    ) -> Result<Tensor> {
        let normal = Normal::new(0.0f64, std).map_err(candle_core::Error::wrap)?;
        let values: Vec<f64> = (0..dims.iter().product::<usize>())
            .map(|_| normal.sample(&mut self.rng))
            .collect();
        let t = Tensor::from_vec(values, dims, &self.device)?.to_dtype(self.dtype)?;
        self.register(name, group, t)
    }

    /// A vector of zeros (biases).
    pub fn zeros(&mut self, name: &str, group: ParamGroup, len: usize) -> Result<Tensor> {
        let t = Tensor::zeros(len, self.dtype, &self.device)?;
        self.register(name, group, t)
    }

    /// A vector of ones (RMSNorm weights).
    pub fn ones(&mut self, name: &str, group: ParamGroup, len: usize) -> Result<Tensor> {
        let t = Tensor::ones(len, self.dtype, &self.device)?;
        self.register(name, group, t)
    }

    fn register(&mut self, name: &str, group: ParamGroup, t: Tensor) -> Result<Tensor> {
        let var = Var::from_tensor(&t)?;
        let tensor = var.as_tensor().clone();
        self.params.push(Param {
            name: name.to_string(),
            group,
            var,
        });
        Ok(tensor)
    }

    /// The parameters created so far, in creation order.
    pub fn into_params(self) -> Vec<Param> {
        self.params
    }
}

/// Parameter counts per group.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ParamCounts {
    pub total: usize,
    pub embeddings: usize,
    pub attention: usize,
    pub mlp: usize,
    pub norms: usize,
    pub head: usize,
}

impl ParamCounts {
    /// Counts `params` by group.
    pub fn of(params: &[Param]) -> Self {
        let mut c = Self::default();
        for p in params {
            let n = p.var.elem_count();
            c.total += n;
            match p.group {
                ParamGroup::Embeddings => c.embeddings += n,
                ParamGroup::Attention => c.attention += n,
                ParamGroup::Mlp => c.mlp += n,
                ParamGroup::Norms => c.norms += n,
                ParamGroup::Head => c.head += n,
            }
        }
        c
    }
}

impl Model for Llama {
    fn loss(&self, inputs: &Tensor, targets: &Tensor) -> anyhow::Result<Tensor> {
        Ok(Llama::loss(self, inputs, targets)?)
    }

    fn device(&self) -> &Device {
        Llama::device(self)
    }
}

impl Model for Vit {
    fn loss(&self, inputs: &Tensor, targets: &Tensor) -> anyhow::Result<Tensor> {
        Vit::loss(self, inputs, targets)
    }

    fn device(&self) -> &Device {
        Vit::device(self)
    }
}
