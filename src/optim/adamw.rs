//! AdamW (Loshchilov & Hutter), with PyTorch's update rule and our own, inspectable state.

use super::Optimizer;
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
    /// First moments, one per parameter, in parameter order.
    exp_avg: Vec<Tensor>,
    /// Second moments, one per parameter, in parameter order.
    exp_avg_sq: Vec<Tensor>,
    names: Vec<String>,
}

impl AdamW {
    /// Zero state for `params`.
    pub fn new(config: &OptimizerConfig, params: &[Param]) -> Result<Self> {
        let zeros =
            || -> Result<Vec<Tensor>> { params.iter().map(|p| Ok(p.var.zeros_like()?)).collect() };
        Ok(Self {
            beta1: config.beta1,
            beta2: config.beta2,
            eps: config.eps,
            weight_decay: config.weight_decay,
            step: 0,
            exp_avg: zeros()?,
            exp_avg_sq: zeros()?,
            names: params.iter().map(|p| p.name.clone()).collect(),
        })
    }
}

impl Optimizer for AdamW {
    /// PyTorch's AdamW: `p *= 1 - lr*wd`; `m = b1 m + (1-b1) g`; `v = b2 v + (1-b2) g^2`;
    /// `p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)`.
    fn step(&mut self, params: &[Param], grads: &[Tensor], lr: f64) -> Result<()> {
        if params.len() != self.exp_avg.len() || grads.len() != params.len() {
            bail!(
                "AdamW was built for {} parameters but got {} parameters and {} gradients",
                self.exp_avg.len(),
                params.len(),
                grads.len()
            );
        }
        self.step += 1;
        let t = self.step as i32;
        let bias1 = 1.0 - self.beta1.powi(t);
        let bias2_sqrt = (1.0 - self.beta2.powi(t)).sqrt();
        for (i, (param, grad)) in params.iter().zip(grads).enumerate() {
            let m = ((&self.exp_avg[i] * self.beta1)? + (grad * (1.0 - self.beta1))?)?;
            let v = ((&self.exp_avg_sq[i] * self.beta2)? + (grad.sqr()? * (1.0 - self.beta2))?)?;
            let denom = ((v.sqrt()? / bias2_sqrt)? + self.eps)?;
            let update = (m.div(&denom)? * (lr / bias1))?;
            let theta = param.var.as_tensor();
            let decayed = if param.decays() && self.weight_decay > 0.0 {
                (theta * (1.0 - lr * self.weight_decay))?
            } else {
                theta.clone()
            };
            param.var.set(&(decayed - update)?)?;
            self.exp_avg[i] = m;
            self.exp_avg_sq[i] = v;
        }
        Ok(())
    }

    fn steps_taken(&self) -> u64 {
        self.step
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.names.len());
        for (i, name) in self.names.iter().enumerate() {
            out.push((format!("{name}.exp_avg"), self.exp_avg[i].clone()));
            out.push((format!("{name}.exp_avg_sq"), self.exp_avg_sq[i].clone()));
        }
        out
    }

    fn load_state(&mut self, steps_taken: u64, state: &HashMap<String, Tensor>) -> Result<()> {
        for (i, name) in self.names.iter().enumerate() {
            for (slot, target) in [
                ("exp_avg", &mut self.exp_avg[i]),
                ("exp_avg_sq", &mut self.exp_avg_sq[i]),
            ] {
                let key = format!("{name}.{slot}");
                let t = state
                    .get(&key)
                    .with_context(|| format!("optimizer state lacks '{key}'"))?;
                if t.shape() != target.shape() {
                    bail!(
                        "optimizer state '{key}' has shape {:?}, the model needs {:?}",
                        t.shape(),
                        target.shape()
                    );
                }
                *target = t.to_dtype(target.dtype())?;
            }
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
        opt.step(&params, &grads(0.5, -1.0, 2.0), 0.1).unwrap();
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

        opt.step(&params, &grads(-0.5, 0.0, 1.0), 0.05).unwrap();
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

    #[test]
    fn state_round_trips() {
        let config = OptimizerConfig::default();
        let params = vec![param("w", &[1.0, 2.0], &[2, 1])];
        let mut opt = AdamW::new(&config, &params).unwrap();
        let g = vec![Tensor::from_slice(&[0.3, -0.1], (2, 1), &Device::Cpu).unwrap()];
        opt.step(&params, &g, 0.01).unwrap();
        let state: HashMap<_, _> = opt.state().into_iter().collect();
        assert_eq!(state.len(), 2);
        let mut fresh = AdamW::new(&config, &params).unwrap();
        fresh.load_state(opt.steps_taken(), &state).unwrap();
        assert_eq!(fresh.steps_taken(), 1);
        let a: Vec<f64> = fresh.exp_avg_sq[0]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f64> = opt.exp_avg_sq[0].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, b);
        assert_eq!(opt.state_bytes(), 4 * 8);
    }
}
