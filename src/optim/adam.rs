//! Adam with decoupled weight decay and PyTorch's update rule, in two partitions of the
//! second moment: AdamW keeps one per element; Adam-mini (Zhang et al. 2024, official
//! implementation 1.1.1) one per block of a parameter, which cuts the state nearly in half.
//!
//! Adam-mini's partition of each network is its spec's (`model/partition.rs`).
//!
//! Weight decay, as in both references, skips norm weights (Adam-mini: names containing
//! `norm`, `ln` or `bias`; here: tensors of rank 1, the same set for LLaMA).

use super::fused::AdamUpdate;
use super::OptimizerConfig;
use super::{fusable, Optimizer, OptimizerState};
use crate::model::Param;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;

/// Adam with bias correction, decoupled weight decay, and second moments shared by blocks.
pub struct Adam {
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    step: u64,
    /// Per parameter, in parameter order: `[m (numel) | v (numel / block)]` in one tensor,
    /// so the fused kernel updates both in one pass.
    moments: Vec<Tensor>,
    /// Per parameter: elements sharing one second moment (1 for AdamW).
    blocks: Vec<usize>,
    names: Vec<String>,
    shapes: Vec<candle_core::Shape>,
}

impl Adam {
    /// AdamW: one second moment per element.
    pub fn adamw(config: &OptimizerConfig, params: &[Param]) -> Result<Self> {
        Self::with_blocks(config, params, vec![1; params.len()])
    }

    /// Adam-mini: one second moment per block; `blocks[i]` is the elements per block of
    /// parameter `i` (the model's partition: [`crate::model::ModelSpec::adam_mini_block`]).
    pub fn adam_mini(config: &OptimizerConfig, params: &[Param], blocks: &[usize]) -> Result<Self> {
        if blocks.len() != params.len() {
            bail!(
                "adam-mini: {} block sizes for {} parameters",
                blocks.len(),
                params.len()
            );
        }
        Self::with_blocks(config, params, blocks.to_vec())
    }

    fn with_blocks(config: &OptimizerConfig, params: &[Param], blocks: Vec<usize>) -> Result<Self> {
        let moments = params
            .iter()
            .zip(&blocks)
            .map(|(p, block)| {
                let n = p.var.elem_count();
                Tensor::zeros(n + n / block, p.var.dtype(), p.var.device())
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            beta1: config.beta1,
            beta2: config.beta2,
            eps: config.eps,
            weight_decay: config.weight_decay,
            step: 0,
            moments,
            blocks,
            names: params.iter().map(|p| p.name.clone()).collect(),
            shapes: params.iter().map(|p| p.var.shape().clone()).collect(),
        })
    }

    /// The update with candle tensor ops, for devices without the fused kernel (and every
    /// device under `train.kernels = reference`); returns the new parameter (flat) and
    /// moments.
    fn update_with_tensor_ops(
        &self,
        theta: &Tensor,
        grad: &Tensor,
        moments: &Tensor,
        h: &AdamUpdate,
    ) -> Result<(Tensor, Tensor)> {
        let n = theta.elem_count();
        let blocks = n / h.block;
        let grad = (grad.flatten_all()? * h.grad_scale)?;
        let m = ((moments.narrow(0, 0, n)? * self.beta1)? + (&grad * (1.0 - self.beta1))?)?;
        let mean_sq = grad.sqr()?.reshape((blocks, h.block))?.mean(1)?;
        let v = ((moments.narrow(0, n, blocks)? * self.beta2)? + (mean_sq * (1.0 - self.beta2))?)?;
        let denom = ((v.sqrt()? / h.bias2_sqrt)? + self.eps)?;
        let update = m
            .reshape((blocks, h.block))?
            .broadcast_div(&denom.unsqueeze(1)?)?
            .flatten_all()?;
        let theta = ((theta.flatten_all()? * (1.0 - h.decay))? - (update * (h.lr / h.bias1))?)?;
        Ok((theta, Tensor::cat(&[m, v], 0)?))
    }

    /// State names of parameter `i`: first moments, and second moments per element
    /// (`exp_avg_sq`, as PyTorch names them) or per block (`vmean`, as Adam-mini does).
    fn slots(&self, i: usize) -> [&'static str; 2] {
        if self.blocks[i] == 1 {
            ["exp_avg", "exp_avg_sq"]
        } else {
            ["exp_avg", "vmean"]
        }
    }

    /// The shapes the two state tensors of parameter `i` are exposed in.
    fn slot_shapes(&self, i: usize) -> [candle_core::Shape; 2] {
        let n = self.shapes[i].elem_count();
        let v_shape = if self.blocks[i] == 1 {
            self.shapes[i].clone()
        } else {
            candle_core::Shape::from(n / self.blocks[i])
        };
        [self.shapes[i].clone(), v_shape]
    }

    /// Every parameter's update with `shared` (the decaying parameters' hyper-parameters) on
    /// their GPU in a few multi-tensor launches, parameters and moments in place, when the
    /// kernels serve them (`fused::gpu_update_all`): whether it ran.
    #[cfg(feature = "cuda")]
    fn gpu_step(&self, params: &[Param], grads: &[Tensor], shared: &AdamUpdate) -> Result<bool> {
        let group = super::fused::Group {
            thetas: params.iter().map(|p| p.var.as_tensor()).collect(),
            grads,
            moments: &self.moments,
            decays: params.iter().map(Param::decays).collect(),
            blocks: &self.blocks,
        };
        let reference = |t: &Tensor, g: &Tensor, m: &Tensor, h: &AdamUpdate| {
            self.update_with_tensor_ops(t, g, m, h)
        };
        Ok(super::fused::gpu_update_all(&group, shared, &reference)?)
    }

    /// Without CUDA there are no multi-tensor kernels: never runs.
    #[cfg(not(feature = "cuda"))]
    fn gpu_step(&self, _: &[Param], _: &[Tensor], _: &AdamUpdate) -> Result<bool> {
        Ok(false)
    }
}

impl Optimizer for Adam {
    /// PyTorch's AdamW: `p *= 1 - lr*wd`; `m = b1 m + (1-b1) g`; `v = b2 v + (1-b2) g^2`
    /// (Adam-mini: the mean of `g^2` over the block); `p -= lr/(1-b1^t) * m /
    /// (sqrt(v)/sqrt(1-b2^t) + eps)`. Fused into one pass per parameter on the CPU; on a GPU
    /// (f32) every parameter in a few multi-tensor launches, in place, once their Triton
    /// kernels passed their self-check there; the tensor ops elsewhere.
    fn step(&mut self, params: &[Param], grads: &[Tensor], lr: f64, grad_scale: f64) -> Result<()> {
        if params.len() != self.moments.len() || grads.len() != params.len() {
            bail!(
                "the optimizer was built for {} parameters but got {} parameters and {} gradients",
                self.moments.len(),
                params.len(),
                grads.len()
            );
        }
        self.step += 1;
        let t = self.step as i32;
        // The decaying parameters' hyper-parameters; the block is each parameter's.
        let shared = AdamUpdate {
            lr,
            grad_scale,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            decay: lr * self.weight_decay,
            bias1: 1.0 - self.beta1.powi(t),
            bias2_sqrt: (1.0 - self.beta2.powi(t)).sqrt(),
            block: 1,
        };
        if self.gpu_step(params, grads, &shared)? {
            return Ok(());
        }
        for (i, (param, grad)) in params.iter().zip(grads).enumerate() {
            let h = AdamUpdate {
                decay: if param.decays() { shared.decay } else { 0.0 },
                block: self.blocks[i],
                ..shared
            };
            let theta = param.var.as_tensor();
            let n = theta.elem_count();
            let (new_theta, moments) = if fusable(theta) {
                let packed = theta.contiguous()?.apply_op3_no_bwd(
                    &grad.contiguous()?,
                    &self.moments[i],
                    &h,
                )?;
                (
                    packed.narrow(0, 0, n)?,
                    packed.narrow(0, n, packed.elem_count() - n)?,
                )
            } else {
                self.update_with_tensor_ops(theta, grad, &self.moments[i], &h)?
            };
            param.var.set(&new_theta.reshape(theta.shape())?)?;
            self.moments[i] = moments;
        }
        Ok(())
    }

    fn state_bytes(&self) -> usize {
        self.moments
            .iter()
            .map(|m| m.elem_count() * m.dtype().size_in_bytes())
            .sum()
    }
}

impl OptimizerState for Adam {
    fn steps_taken(&self) -> u64 {
        self.step
    }

    /// The moments, which every rank holds alike, as `<param>.<slot>` (the slots
    /// `slots` names, in the shapes `slot_shapes` gives).
    fn shared(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(2 * self.names.len());
        for (i, name) in self.names.iter().enumerate() {
            let n = self.shapes[i].elem_count();
            let parts = [
                self.moments[i].narrow(0, 0, n)?,
                self.moments[i].narrow(0, n, n / self.blocks[i])?,
            ];
            for ((slot, shape), part) in self.slots(i).iter().zip(self.slot_shapes(i)).zip(parts) {
                out.push((format!("{name}.{slot}"), part.reshape(shape)?));
            }
        }
        Ok(out)
    }

    /// Its `<param>.<slot>` keys only: the other keys of the same files (BSFA's) are for
    /// the other parts of a [`super::Stack`].
    fn wants(&self, key: &str) -> bool {
        key.rsplit_once('.').is_some_and(|(name, slot)| {
            let i = self.names.iter().position(|n| n == name);
            i.is_some_and(|i| self.slots(i).contains(&slot))
        })
    }

    fn load(&mut self, steps_taken: u64, state: &HashMap<String, Tensor>) -> Result<()> {
        for (i, name) in self.names.iter().enumerate() {
            let mut parts = Vec::with_capacity(2);
            for (slot, shape) in self.slots(i).iter().zip(self.slot_shapes(i)) {
                let key = format!("{name}.{slot}");
                let t = state
                    .get(&key)
                    .with_context(|| format!("optimizer state lacks '{key}'"))?;
                if t.shape() != &shape {
                    bail!(
                        "optimizer state '{key}' has shape {:?}, the model needs {:?}",
                        t.shape(),
                        shape
                    );
                }
                // Checkpoints are read on the host; the moments live with the parameter.
                let moments = &self.moments[i];
                parts.push(
                    t.flatten_all()?
                        .to_dtype(moments.dtype())?
                        .to_device(moments.device())?,
                );
            }
            self.moments[i] = Tensor::cat(&parts, 0)?;
        }
        self.step = steps_taken;
        Ok(())
    }

    fn devices(&self) -> Vec<(String, Device)> {
        self.names
            .iter()
            .zip(&self.moments)
            .map(|(name, m)| (format!("{name}.moments"), m.device().clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::partition::adam_mini_block;
    use crate::model::{LlamaConfig, ParamGroup};
    use candle_core::Var;

    fn param(name: &str, values: &[f64], shape: &[usize]) -> Param {
        let t = Tensor::from_slice(values, shape, &Device::Cpu).unwrap();
        Param {
            name: name.into(),
            group: ParamGroup::Mlp,
            var: Var::from_tensor(&t).unwrap(),
        }
    }

    fn values(p: &Param) -> Vec<f64> {
        p.var.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Two steps worked out by hand from the AdamW equations.
    #[test]
    fn matches_hand_computed_updates() {
        let config = OptimizerConfig {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            ..Default::default()
        };
        let matrix = param("w", &[1.0, -2.0], &[1, 2]);
        let vector = param("norm", &[0.5], &[1]);
        let params = vec![matrix, vector];
        let mut opt = Adam::adamw(&config, &params).unwrap();
        let grads = |a: f64, b: f64, c: f64| {
            vec![
                Tensor::from_slice(&[a, b], (1, 2), &Device::Cpu).unwrap(),
                Tensor::from_slice(&[c], 1, &Device::Cpu).unwrap(),
            ]
        };
        opt.step(&params, &grads(0.5, -1.0, 2.0), 0.1, 1.0).unwrap();
        // Step 1: m = 0.1 g, v = 0.05 g^2; m_hat = g, v_hat = g^2, so the update is
        // lr * g/(|g| + eps) = lr * sign(g) (up to eps), after decay p *= 1 - lr*wd = 0.99.
        let w = values(&params[0]);
        let expected_w0 = 1.0 * 0.99 - 0.1 * 0.5 / (0.5 + 1e-8);
        let expected_w1 = -2.0 * 0.99 + 0.1 * 1.0 / (1.0 + 1e-8);
        assert!((w[0] - expected_w0).abs() < 1e-12, "{w:?}");
        assert!((w[1] - expected_w1).abs() < 1e-12, "{w:?}");
        // Norm weights are not decayed.
        let n = values(&params[1]);
        assert!((n[0] - (0.5 - 0.1 * 2.0 / (2.0 + 1e-8))).abs() < 1e-12);

        // Halving gradients through the clip scale is the same as halving them.
        opt.step(&params, &grads(-1.0, 0.0, 2.0), 0.05, 0.5)
            .unwrap();
        // Step 2 for w[0]: m = 0.9*0.05 + 0.1*(-0.5) = -0.005; v = 0.95*0.0125 + 0.05*0.25
        // = 0.024375; m_hat = m/0.19, v_hat = v/0.0975.
        let m = -0.005f64;
        let v = 0.024375f64;
        let update = 0.05 / 0.19 * m / (v.sqrt() / 0.0975f64.sqrt() + 1e-8);
        let expected = expected_w0 * (1.0 - 0.05 * 0.1) - update;
        let w = values(&params[0]);
        assert!((w[0] - expected).abs() < 1e-12, "{} vs {expected}", w[0]);
        assert_eq!(opt.steps_taken(), 2);
    }

    /// The tensor-op path (other devices) computes what the fused CPU kernel computes,
    /// per element (AdamW) and per block (Adam-mini).
    #[test]
    fn tensor_op_path_matches_fused_kernel() {
        for block in [1, 3] {
            check_tensor_op_path(block);
        }
    }

    fn check_tensor_op_path(block: usize) {
        let config = OptimizerConfig::default();
        let params = vec![param("w", &[0.3, -1.2, 2.0, 0.1, -0.4, 0.9], &[2, 3])];
        let opt = Adam::adamw(&config, &params).unwrap();
        let theta = params[0].var.as_tensor();
        let grad =
            Tensor::from_slice(&[0.5, -0.1, 0.2, -2.0, 1.0, 0.03], (2, 3), &Device::Cpu).unwrap();
        // [m (6) | v (6 / block)], v positive.
        let values = [
            0.1, 0.0, -0.2, 0.3, 0.05, -0.01, 0.2, 0.1, 0.4, 0.3, 0.02, 0.05,
        ];
        let moments =
            Tensor::from_slice(&values[..6 + 6 / block], 6 + 6 / block, &Device::Cpu).unwrap();
        let h = AdamUpdate {
            lr: 0.01,
            grad_scale: 0.7,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            decay: 0.001,
            bias1: 0.271,
            bias2_sqrt: 0.38,
            block,
        };
        let (theta_ref, moments_ref) = opt
            .update_with_tensor_ops(theta, &grad, &moments, &h)
            .unwrap();
        let packed = theta.apply_op3_no_bwd(&grad, &moments, &h).unwrap();
        let flat = |t: &Tensor| -> Vec<f64> { t.flatten_all().unwrap().to_vec1().unwrap() };
        let fused = flat(&packed);
        let expected: Vec<f64> = flat(&theta_ref)
            .into_iter()
            .chain(flat(&moments_ref))
            .collect();
        assert_eq!(fused.len(), expected.len());
        for (a, b) in fused.iter().zip(&expected) {
            assert!(
                (a - b).abs() < 1e-14,
                "block {block}: {fused:?} vs {expected:?}"
            );
        }
    }

    fn llama(heads: usize, kv_heads: usize) -> LlamaConfig {
        LlamaConfig {
            vocab_size: 11,
            hidden_size: 8,
            intermediate_size: 12,
            num_hidden_layers: 1,
            num_attention_heads: heads,
            num_key_value_heads: Some(kv_heads),
            ..Default::default()
        }
    }

    fn llama_blocks(params: &[Param], model: &LlamaConfig) -> Vec<usize> {
        params
            .iter()
            .map(|p| adam_mini_block(&p.name, p.var.dims(), model).unwrap())
            .collect()
    }

    /// Adam-mini 1.1.1's partition on our names: second moments per head for q/k, per row
    /// for embeddings, head, v/o and MLP, one per norm.
    #[test]
    fn adam_mini_partition_of_a_llama() {
        let model = llama(4, 2);
        let (_, params) =
            crate::model::Llama::new(&model, candle_core::DType::F32, &Device::Cpu, 0).unwrap();
        let blocks = llama_blocks(&params, &model);
        let opt = Adam::adam_mini(&OptimizerConfig::default(), &params, &blocks).unwrap();
        let second_moments: HashMap<String, usize> = params
            .iter()
            .zip(&opt.blocks)
            .map(|(p, b)| (p.name.clone(), p.var.elem_count() / b))
            .collect();
        let expect = [
            ("model.embed_tokens.weight", 11),
            ("model.layers.0.self_attn.q_proj.weight", 4),
            ("model.layers.0.self_attn.k_proj.weight", 2),
            ("model.layers.0.self_attn.v_proj.weight", 4),
            ("model.layers.0.self_attn.o_proj.weight", 8),
            ("model.layers.0.mlp.gate_proj.weight", 12),
            ("model.layers.0.mlp.up_proj.weight", 12),
            ("model.layers.0.mlp.down_proj.weight", 8),
            ("model.layers.0.input_layernorm.weight", 1),
            ("model.layers.0.post_attention_layernorm.weight", 1),
            ("model.norm.weight", 1),
            ("lm_head.weight", 11),
        ];
        assert_eq!(second_moments.len(), expect.len());
        for (name, n) in expect {
            assert_eq!(second_moments[name], n, "{name}");
        }
        // Its state is a fraction of AdamW's: first moments plus a few hundredths.
        let adamw = Adam::adamw(&OptimizerConfig::default(), &params).unwrap();
        let numel: usize = params.iter().map(|p| p.var.elem_count()).sum();
        assert_eq!(adamw.state_bytes(), 2 * numel * 4);
        let blocks: usize = second_moments.values().sum();
        assert_eq!(opt.state_bytes(), (numel + blocks) * 4);
    }

    /// One Adam-mini step worked out from its equations: each row shares the mean of its
    /// squared gradients.
    #[test]
    fn adam_mini_matches_its_equations() {
        let config = OptimizerConfig {
            lr: 0.1,
            weight_decay: 0.1,
            ..Default::default()
        };
        let w = Param {
            name: "model.layers.0.mlp.down_proj.weight".into(),
            group: ParamGroup::Mlp,
            var: Var::from_tensor(
                &Tensor::from_slice(&[1.0, -2.0, 0.5, 3.0], (2, 2), &Device::Cpu).unwrap(),
            )
            .unwrap(),
        };
        let params = vec![w];
        let mut opt =
            Adam::adam_mini(&config, &params, &llama_blocks(&params, &llama(2, 2))).unwrap();
        assert_eq!(opt.blocks, vec![2]);
        let g = [0.3f64, -0.4, 1.0, 0.0];
        let grads = vec![Tensor::from_slice(&g, (2, 2), &Device::Cpu).unwrap()];
        opt.step(&params, &grads, 0.1, 1.0).unwrap();
        let got = values(&params[0]);
        let start = [1.0, -2.0, 0.5, 3.0];
        for row in 0..2 {
            let mean_sq = (g[2 * row].powi(2) + g[2 * row + 1].powi(2)) / 2.0;
            let v = 0.05 * mean_sq;
            let denom = v.sqrt() / 0.05f64.sqrt() + 1e-8;
            for col in 0..2 {
                let i = 2 * row + col;
                let m = 0.1 * g[i];
                let expected = start[i] * (1.0 - 0.1 * 0.1) - 0.1 / 0.1 * m / denom;
                assert!(
                    (got[i] - expected).abs() < 1e-12,
                    "{i}: {} vs {expected}",
                    got[i]
                );
            }
        }
        let state: HashMap<_, _> = opt.shared().unwrap().into_iter().collect();
        let vmean: Vec<f64> = state["model.layers.0.mlp.down_proj.weight.vmean"]
            .to_vec1()
            .unwrap();
        assert!((vmean[0] - 0.05 * 0.125).abs() < 1e-15 && (vmean[1] - 0.05 * 0.5).abs() < 1e-15);
        let mut fresh =
            Adam::adam_mini(&config, &params, &llama_blocks(&params, &llama(2, 2))).unwrap();
        fresh.load(1, &state).unwrap();
        assert_eq!(
            fresh.moments[0].to_vec1::<f64>().unwrap(),
            opt.moments[0].to_vec1::<f64>().unwrap()
        );
    }

    #[test]
    fn state_round_trips() {
        let config = OptimizerConfig::default();
        let params = vec![param("w", &[1.0, 2.0], &[2, 1])];
        let mut opt = Adam::adamw(&config, &params).unwrap();
        let g = vec![Tensor::from_slice(&[0.3, -0.1], (2, 1), &Device::Cpu).unwrap()];
        opt.step(&params, &g, 0.01, 1.0).unwrap();
        let state: HashMap<_, _> = opt.shared().unwrap().into_iter().collect();
        assert_eq!(state.len(), 2);
        let mut fresh = Adam::adamw(&config, &params).unwrap();
        fresh.load(opt.steps_taken(), &state).unwrap();
        assert_eq!(fresh.steps_taken(), 1);
        // It claims its own keys only, leaving BSFA's in the same files to BSFA.
        assert!(opt.wants("w.exp_avg") && opt.wants("w.exp_avg_sq"));
        assert!(
            !opt.wants("w.vmean") && !opt.wants("w.bsfa_directions") && !opt.wants("v.exp_avg")
        );
        let a: Vec<f64> = fresh.moments[0].flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f64> = opt.moments[0].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, b);
        // After one step the second moments are (1 - beta2) g^2.
        let v: Vec<f64> = state["w.exp_avg_sq"]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!((v[0] - 0.05 * 0.09).abs() < 1e-15 && (v[1] - 0.05 * 0.01).abs() < 1e-15);
        assert_eq!(opt.state_bytes(), 4 * 8);
    }
}
