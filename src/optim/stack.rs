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
