//! AdamW (Loshchilov & Hutter), with PyTorch's update rule and our own, inspectable state.

use super::fused::AdamWUpdate;
use super::{fusable, Optimizer};
use crate::config::OptimizerConfig;
use crate::model::Param;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::collections::HashMap;

/// AdamW with bias correction and decoupled weight decay on matrices only.
pub struct AdamW {
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    step: u64,
    /// Per parameter, in parameter order: `2 x numel`, first moments then second moments
    /// (one tensor, so the fused kernel updates both in one pass).
    moments: Vec<Tensor>,
    names: Vec<String>,
    shapes: Vec<candle_core::Shape>,
}

impl AdamW {
    /// Zero state for `params`.
    pub fn new(config: &OptimizerConfig, params: &[Param]) -> Result<Self> {
        let moments = params
            .iter()
            .map(|p| Tensor::zeros((2, p.var.elem_count()), p.var.dtype(), p.var.device()))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            beta1: config.beta1,
            beta2: config.beta2,
            eps: config.eps,
            weight_decay: config.weight_decay,
            step: 0,
            moments,
            names: params.iter().map(|p| p.name.clone()).collect(),
            shapes: params.iter().map(|p| p.var.shape().clone()).collect(),
        })
    }

    /// The update with candle tensor ops, for devices without the fused kernel; returns
    /// the new parameter and moments.
    fn update_with_tensor_ops(
        &self,
        theta: &Tensor,
        grad: &Tensor,
        moments: &Tensor,
        h: &AdamWUpdate,
    ) -> Result<(Tensor, Tensor)> {
        let grad = (grad.flatten_all()? * h.grad_scale)?;
        let m = ((moments.get(0)? * self.beta1)? + (&grad * (1.0 - self.beta1))?)?;
        let v = ((moments.get(1)? * self.beta2)? + (grad.sqr()? * (1.0 - self.beta2))?)?;
        let denom = ((v.sqrt()? / h.bias2_sqrt)? + self.eps)?;
        let update = (m.div(&denom)? * (h.lr / h.bias1))?;
        let theta = ((theta.flatten_all()? * (1.0 - h.decay))? - update)?;
        Ok((theta, Tensor::stack(&[m, v], 0)?))
    }
}

impl Optimizer for AdamW {
    /// PyTorch's AdamW: `p *= 1 - lr*wd`; `m = b1 m + (1-b1) g`; `v = b2 v + (1-b2) g^2`;
    /// `p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)`. Fused into one pass per
    /// parameter on the CPU.
    fn step(&mut self, params: &[Param], grads: &[Tensor], lr: f64, grad_scale: f64) -> Result<()> {
        if params.len() != self.moments.len() || grads.len() != params.len() {
            bail!(
                "AdamW was built for {} parameters but got {} parameters and {} gradients",
                self.moments.len(),
                params.len(),
                grads.len()
            );
        }
        self.step += 1;
        let t = self.step as i32;
        for (i, (param, grad)) in params.iter().zip(grads).enumerate() {
            let h = AdamWUpdate {
                lr,
                grad_scale,
                beta1: self.beta1,
                beta2: self.beta2,
                eps: self.eps,
                decay: if param.decays() {
                    lr * self.weight_decay
                } else {
                    0.0
                },
                bias1: 1.0 - self.beta1.powi(t),
                bias2_sqrt: (1.0 - self.beta2.powi(t)).sqrt(),
            };
            let theta = param.var.as_tensor();
            let (new_theta, moments) = if fusable(theta) {
                let packed = theta.contiguous()?.apply_op3_no_bwd(
                    &grad.contiguous()?,
                    &self.moments[i],
                    &h,
                )?;
                (packed.get(0)?, packed.narrow(0, 1, 2)?)
            } else {
                self.update_with_tensor_ops(theta, grad, &self.moments[i], &h)?
            };
            param.var.set(&new_theta.reshape(theta.shape())?)?;
            self.moments[i] = moments;
        }
        Ok(())
    }

    fn steps_taken(&self) -> u64 {
        self.step
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(2 * self.names.len());
        for ((name, moments), shape) in self.names.iter().zip(&self.moments).zip(&self.shapes) {
            for (k, slot) in ["exp_avg", "exp_avg_sq"].iter().enumerate() {
                // Views of the packed moments, in the parameter's shape (as PyTorch names them).
                out.push((format!("{name}.{slot}"), moments.get(k)?.reshape(shape)?));
            }
        }
        Ok(out)
    }

    fn state_bytes(&self) -> usize {
        self.moments
            .iter()
            .map(|m| m.elem_count() * m.dtype().size_in_bytes())
            .sum()
    }

    fn load_state(&mut self, steps_taken: u64, state: &HashMap<String, Tensor>) -> Result<()> {
        for (i, name) in self.names.iter().enumerate() {
            let mut halves = Vec::with_capacity(2);
            for slot in ["exp_avg", "exp_avg_sq"] {
                let key = format!("{name}.{slot}");
                let t = state
                    .get(&key)
                    .with_context(|| format!("optimizer state lacks '{key}'"))?;
                if t.shape() != &self.shapes[i] {
                    bail!(
                        "optimizer state '{key}' has shape {:?}, the model needs {:?}",
                        t.shape(),
                        self.shapes[i]
                    );
                }
                halves.push(t.flatten_all()?.to_dtype(self.moments[i].dtype())?);
            }
            self.moments[i] = Tensor::stack(&halves, 0)?;
        }
        self.step = steps_taken;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ParamGroup;
    use candle_core::{Device, Var};

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
        let mut opt = AdamW::new(&config, &params).unwrap();
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

    /// The tensor-op path (other devices) computes what the fused CPU kernel computes.
    #[test]
    fn tensor_op_path_matches_fused_kernel() {
        let config = OptimizerConfig::default();
        let params = vec![param("w", &[0.3, -1.2, 2.0, 0.1, -0.4, 0.9], &[2, 3])];
        let opt = AdamW::new(&config, &params).unwrap();
        let theta = params[0].var.as_tensor();
        let grad =
            Tensor::from_slice(&[0.5, -0.1, 0.2, -2.0, 1.0, 0.03], (2, 3), &Device::Cpu).unwrap();
        let moments = Tensor::from_slice(
            &[
                0.1, 0.0, -0.2, 0.3, 0.05, -0.01, 0.2, 0.1, 0.4, 0.3, 0.02, 0.05,
            ],
            (2, 6),
            &Device::Cpu,
        )
        .unwrap();
        let h = AdamWUpdate {
            lr: 0.01,
            grad_scale: 0.7,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            decay: 0.001,
            bias1: 0.271,
            bias2_sqrt: 0.38,
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
        for (a, b) in fused.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-14, "{fused:?} vs {expected:?}");
        }
    }

    #[test]
    fn state_round_trips() {
        let config = OptimizerConfig::default();
        let params = vec![param("w", &[1.0, 2.0], &[2, 1])];
        let mut opt = AdamW::new(&config, &params).unwrap();
        let g = vec![Tensor::from_slice(&[0.3, -0.1], (2, 1), &Device::Cpu).unwrap()];
        opt.step(&params, &g, 0.01, 1.0).unwrap();
        let state: HashMap<_, _> = opt.state().unwrap().into_iter().collect();
        assert_eq!(state.len(), 2);
        let mut fresh = AdamW::new(&config, &params).unwrap();
        fresh.load_state(opt.steps_taken(), &state).unwrap();
        assert_eq!(fresh.steps_taken(), 1);
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
