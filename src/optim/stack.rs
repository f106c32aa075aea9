//! The optimizer `build` makes: a base optimizer, and BSFA around its steps when enabled.

use super::bsfa::Bsfa;
use super::{Optimizer, OptimizerState, StateTensor};
use crate::model::Param;
use anyhow::Result;
use candle_core::{Device, Tensor};
use std::collections::HashMap;

/// A base optimizer as [`Stack`] holds it: an update with its checkpoint state, as one
/// trait object. Implemented for every type that is both (AdamW and Adam-mini are).
pub trait BaseOptimizer: Optimizer + OptimizerState {}

impl<T: Optimizer + OptimizerState> BaseOptimizer for T {}

/// A base optimizer and, when enabled, BSFA around its steps: one object that is the
/// update the loop calls ([`Optimizer`]) and the state checkpoints save
/// ([`OptimizerState`]). It is the container of torchtitan's `Stateful` design: its state
/// is its parts' states put together, base first, so neither part forwards the other's.
/// BSFA is held apart from the base rather than around it, so it sees only the parameters
/// before and after each base step, and the loop can ask it, and only it, for what its
/// re-estimation found ([`Stack::bsfa`]) without the update trait knowing BSFA's types.
pub struct Stack {
    base: Box<dyn BaseOptimizer>,
    bsfa: Option<Bsfa>,
}

impl Stack {
    /// `base`, with `bsfa` (built over the same parameters) around its steps if given.
    pub fn new(base: Box<dyn BaseOptimizer>, bsfa: Option<Bsfa>) -> Self {
        Self { base, bsfa }
    }

    /// BSFA, when it wraps the base: for its diagnostics.
    pub fn bsfa(&mut self) -> Option<&mut Bsfa> {
        self.bsfa.as_mut()
    }

    /// The parts whose states make up this one, in the order checkpoints list them.
    fn parts(&self) -> impl Iterator<Item = &dyn OptimizerState> {
        let bsfa = self.bsfa.as_ref().map(|b| b as &dyn OptimizerState);
        std::iter::once(self.base.as_ref() as &dyn OptimizerState).chain(bsfa)
    }
}

impl Optimizer for Stack {
    /// The base step, inside BSFA's step when there is one.
    fn step(&mut self, params: &[Param], grads: &[Tensor], lr: f64, grad_scale: f64) -> Result<()> {
        let base = &mut self.base;
        let mut base_step = || base.step(params, grads, lr, grad_scale);
        match &mut self.bsfa {
            Some(bsfa) => bsfa.step(params, base_step),
            None => base_step(),
        }
    }

    fn state_bytes(&self) -> usize {
        self.base.state_bytes() + self.bsfa.as_ref().map_or(0, Bsfa::state_bytes)
    }
}

impl OptimizerState for Stack {
    /// The base's count; BSFA's, counting the same steps, is always the same.
    fn steps_taken(&self) -> u64 {
        self.base.steps_taken()
    }

    fn shared(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for part in self.parts() {
            out.extend(part.shared()?);
        }
        Ok(out)
    }

    fn shard(&self) -> Result<Vec<(String, StateTensor)>> {
        let mut out = Vec::new();
        for part in self.parts() {
            out.extend(part.shard()?);
        }
        Ok(out)
    }

    fn wants(&self, key: &str) -> bool {
        self.parts().any(|part| part.wants(key))
    }

    /// Every part takes its own tensors from `state`, base first.
    fn load(&mut self, steps_taken: u64, state: &HashMap<String, Tensor>) -> Result<()> {
        self.base.load(steps_taken, state)?;
        if let Some(bsfa) = &mut self.bsfa {
            bsfa.load(steps_taken, state)?;
        }
        Ok(())
    }

    fn devices(&self) -> Vec<(String, Device)> {
        self.parts().flat_map(|part| part.devices()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::{Communicator, SingleRank};
    use crate::model::{ParamGroup, ParamInit};
    use crate::optim::{Adam, BsfaConfig, OptimizerConfig};
    use candle_core::DType;
    use std::sync::Arc;

    /// AdamW with BSFA (re-estimating every 2 steps) over `params`, on one rank.
    fn stack(params: &[Param]) -> Stack {
        let bsfa = BsfaConfig {
            enabled: true,
            rank: 2,
            history: 4,
            interval: 2,
            ..BsfaConfig::default()
        };
        let comm: Arc<dyn Communicator> = Arc::new(SingleRank);
        let adam = Adam::adamw(&OptimizerConfig::default(), params).unwrap();
        Stack::new(
            Box::new(adam),
            Some(Bsfa::new(&bsfa, params, comm).unwrap()),
        )
    }

    /// The tensors of `state`, as a checkpoint file holds them, by key.
    fn as_file(state: Vec<(String, StateTensor)>) -> Vec<(String, Tensor)> {
        let join = |t| match t {
            StateTensor::Whole(t) => t,
            StateTensor::Rows { rows, .. } => Tensor::cat(&rows, 0).unwrap(),
        };
        state.into_iter().map(|(key, t)| (key, join(t))).collect()
    }

    /// The container's state is the base's shared tensors and BSFA's shard, each key claimed
    /// by the part that wrote it alone; a fresh stack restored from it saves the same.
    #[test]
    fn state_is_the_parts_states_and_round_trips() {
        let mut init = ParamInit::new(1, DType::F32, &Device::Cpu);
        init.normal("a.weight", ParamGroup::Mlp, 6, 5, 0.1).unwrap();
        init.ones("b.weight", ParamGroup::Norms, 6).unwrap();
        let params = init.into_params();
        let mut trained = stack(&params);
        for step in 0..5 {
            let grads: Vec<Tensor> = params
                .iter()
                .map(|p| (p.var.as_tensor() * (0.3 - 0.1 * step as f64)).unwrap())
                .collect();
            trained.step(&params, &grads, 1e-2, 1.0).unwrap();
        }
        let (shared, shard) = (trained.shared().unwrap(), trained.shard().unwrap());
        let bsfa = trained.bsfa.as_ref().unwrap();
        assert_eq!(shared.len(), 4);
        assert!(!shard.is_empty());
        for (key, _) in &shared {
            assert!(trained.base.wants(key) && !bsfa.wants(key), "{key}");
        }
        for (key, _) in &shard {
            assert!(bsfa.wants(key) && !trained.base.wants(key), "{key}");
        }
        let saved: Vec<(String, Tensor)> = shared.into_iter().chain(as_file(shard)).collect();
        let mut restored = stack(&params);
        let file: HashMap<String, Tensor> = saved.iter().cloned().collect();
        restored.load(trained.steps_taken(), &file).unwrap();
        assert_eq!(restored.steps_taken(), 5);
        let names = |s: &Stack| {
            s.devices()
                .into_iter()
                .map(|(name, _)| name)
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&restored), names(&trained));
        let again = restored.shared().unwrap().into_iter();
        let again: Vec<(String, Tensor)> =
            again.chain(as_file(restored.shard().unwrap())).collect();
        assert_eq!(again.len(), saved.len());
        for ((k1, t1), (k2, t2)) in saved.iter().zip(&again) {
            let (a, b) = (t1.flatten_all().unwrap(), t2.flatten_all().unwrap());
            let (a, b): (Vec<f32>, Vec<f32>) = (a.to_vec1().unwrap(), b.to_vec1().unwrap());
            assert!(k1 == k2 && a == b, "{k1}");
        }
    }
}
